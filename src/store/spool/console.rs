//! What the console reads and changes in a spool folder: the dead letter's
//! summaries and lines, the pause mark (`paused`) and the audit log (`audit.jsonl`).

use std::fs;
use std::io::{self, BufRead, Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;

use super::Spool;
use super::dead_letter::{DEAD_LETTER_FILE, blocking, dead_letter_id};
use super::files::{append_synced, sync_dir};
use crate::Error;
use crate::console::{AuditEntry, RecordHead, Summary};

/// The file whose presence in the spool folder pauses processing.
pub const PAUSE_FILE: &str = "paused";

/// The file in the spool folder that holds the console's audit log, a JSON object
/// a line.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// How far the console has read the dead letter: the file (its inode), the bytes
/// read of it, and where the last line read starts with a hash of it: a file
/// rewritten under the same inode (the file system may give a freed inode again)
/// is told by that line, which is no longer there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeadCursor {
    inode: u64,
    read: u64,
    last: (u64, u64),
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

/// Whether `file` still holds, where `cursor` says, the last line it read.
fn still_there(file: &mut fs::File, cursor: DeadCursor) -> io::Result<bool> {
    let (start, expected) = cursor.last;
    let mut line = vec![0; usize::try_from(cursor.read.saturating_sub(start)).unwrap_or(0)];
    file.seek(io::SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    Ok(hash(&line) == expected)
}

/// The dead letter's lines as summaries, ordered by their place in the file.
fn summarize(line: &[u8], offset: u64) -> Summary {
    let id = dead_letter_id(line);
    /// A dead letter's line as far as a summary needs, in one pass.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct DeadHead<'a> {
        #[serde(default)]
        attempts: u32,
        #[serde(default, borrow)]
        error: std::borrow::Cow<'a, str>,
        #[serde(default, borrow)]
        dead_at: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        record: Option<RecordHead<'a>>,
    }
    match serde_json::from_slice::<DeadHead<'_>>(line) {
        Ok(dead) => Summary::of_head(
            id,
            u128::from(offset),
            dead.record.as_ref(),
            &dead.error,
            dead.attempts,
            dead.dead_at.into_owned(),
        ),
        Err(e) => Summary::of_record(
            id,
            u128::from(offset),
            b"",
            &format!("not a dead letter this crate wrote: {e}"),
            0,
            String::new(),
        ),
    }
}

impl Spool {
    /// Whether processing is paused ([`Spool::set_paused`]).
    #[must_use]
    pub fn paused(&self) -> bool {
        self.shared.paused.load(Ordering::Acquire)
    }

    /// Pauses or resumes processing: a worker reading this spool takes no new
    /// event while it is paused and finishes those in hand. Kept as the file
    /// [`PAUSE_FILE`] in the folder, so a restart stays paused.
    ///
    /// # Errors
    /// [`Error::Storage`] when the mark cannot be written or removed.
    pub async fn set_paused(&self, paused: bool) -> Result<(), Error> {
        let dir = self.dir().to_owned();
        blocking(move || {
            let path = dir.join(PAUSE_FILE);
            let changed = if paused {
                fs::write(&path, b"paused by the console\n")
                    .and_then(|()| fs::File::open(&path)?.sync_all())
            } else {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            };
            changed
                .and_then(|()| sync_dir(&dir))
                .map_err(|e| Error::storage("cannot write the pause mark", e))
        })
        .await?;
        self.shared.paused.store(paused, Ordering::Release);
        Ok(())
    }

    /// The retries waiting, with their records and errors, as the console lists
    /// them.
    pub(crate) fn retry_summaries(&self) -> Vec<crate::console::Entry> {
        super::retry::lock(&self.shared.retries).listed()
    }

    /// Makes the retry `number` due at `now`; whether it waited.
    pub(crate) fn retry_now(&self, number: u64, now: std::time::SystemTime) -> bool {
        super::retry::lock(&self.shared.retries).make_due(number, now)
    }

    /// Appends `entry` to the audit log, synced.
    pub(crate) async fn append_audit(&self, entry: &AuditEntry) -> Result<(), Error> {
        let mut line = serde_json::to_vec(entry)
            .map_err(|e| Error::storage("cannot encode an audit entry", io::Error::other(e)))?;
        line.push(b'\n');
        let dir = self.dir().to_owned();
        blocking(move || append_synced(&dir, AUDIT_FILE, &line)).await
    }

    /// The last `limit` entries of the audit log, newest first.
    pub(crate) async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        let path = self.dir().join(AUDIT_FILE);
        blocking(move || {
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(Error::storage("cannot read the audit log", e)),
            };
            Ok(text
                .lines()
                .rev()
                .filter_map(|line| serde_json::from_str(line).ok())
                .take(limit)
                .collect())
        })
        .await
    }

    /// The dead letter's lines past `cursor` as summaries, and the new cursor;
    /// every line (and `true`) when the file was rewritten since. Only whole lines
    /// are read: one the worker is writing waits for the next call.
    pub(crate) async fn read_dead_letters(
        &self,
        cursor: DeadCursor,
    ) -> Result<(Vec<Summary>, DeadCursor, bool), Error> {
        let path = self.dir().join(DEAD_LETTER_FILE);
        blocking(move || {
            let mut file = match fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok((Vec::new(), DeadCursor::default(), cursor.read > 0));
                }
                Err(e) => return Err(Error::storage("cannot read the dead letter", e)),
            };
            let read_error = |e| Error::storage("cannot read the dead letter", e);
            let meta = file.metadata().map_err(read_error)?;
            let anew = meta.ino() != cursor.inode
                || meta.len() < cursor.read
                || (cursor.read > 0 && !still_there(&mut file, cursor).map_err(read_error)?);
            let start = if anew { 0 } else { cursor.read };
            file.seek(io::SeekFrom::Start(start)).map_err(read_error)?;
            let mut data = Vec::new();
            file.take(meta.len() - start)
                .read_to_end(&mut data)
                .map_err(read_error)?;
            let whole = data
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |end| end + 1);
            let mut summaries = Vec::new();
            let mut offset = start;
            let mut last = if anew { (0, 0) } else { cursor.last };
            for line in data[..whole].split_inclusive(|&b| b == b'\n') {
                let text = line.strip_suffix(b"\n").unwrap_or(line);
                if !text.iter().all(u8::is_ascii_whitespace) {
                    summaries.push(summarize(text, offset));
                }
                last = (offset, hash(line));
                offset += line.len() as u64;
            }
            let cursor = DeadCursor {
                inode: meta.ino(),
                read: start + whole as u64,
                last,
            };
            Ok((summaries, cursor, anew))
        })
        .await
    }

    /// The dead letter's line at byte `offset`, if it is still the line `id` names.
    pub(crate) async fn dead_letter_line(
        &self,
        offset: u64,
        id: String,
    ) -> Result<Option<Vec<u8>>, Error> {
        let path = self.dir().join(DEAD_LETTER_FILE);
        blocking(move || {
            let file = match fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::storage("cannot read the dead letter", e)),
            };
            let mut reader = io::BufReader::new(file);
            let mut line = Vec::new();
            reader
                .seek(io::SeekFrom::Start(offset))
                .and_then(|_| reader.read_until(b'\n', &mut line))
                .map_err(|e| Error::storage("cannot read the dead letter", e))?;
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            Ok((dead_letter_id(&line) == id).then_some(line))
        })
        .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::store::spool::SpoolConfig;

    fn line(id: &str) -> String {
        format!(
            "{{\"attempts\":1,\"error\":\"down\",\"record\":{{\"receivedAt\":\"2026-01-01T00:00:00.000Z\",\"secretIndex\":0,\"event\":{{\"eventId\":\"{id}\",\"name\":\"message.sent\"}}}}}}\n"
        )
    }

    #[test]
    fn a_dead_letter_rewritten_in_place_is_read_anew() {
        let dir = std::env::temp_dir().join(format!(
            "comapi-dead-cursor-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
            let path = dir.join(DEAD_LETTER_FILE);
            fs::write(&path, line("a-1") + &line("a-2")).unwrap();
            let (first, cursor, _) = spool
                .read_dead_letters(DeadCursor::default())
                .await
                .unwrap();
            assert_eq!(first.len(), 2);
            // Appended: only the new line.
            append_synced(&dir, DEAD_LETTER_FILE, line("a-3").as_bytes()).unwrap();
            let (added, cursor, anew) = spool.read_dead_letters(cursor).await.unwrap();
            assert_eq!((added.len(), anew), (1, false));
            assert_eq!(added[0].event_id, "a-3");
            // Rewritten in place, same inode, longer: every line again.
            let inode = fs::metadata(&path).unwrap().ino();
            fs::write(
                &path,
                line("b-1") + &line("b-2") + &line("b-3") + &line("b-4"),
            )
            .unwrap();
            assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
            let (all, _, anew) = spool.read_dead_letters(cursor).await.unwrap();
            assert!(anew);
            let ids: Vec<&str> = all.iter().map(|s| s.event_id.as_str()).collect();
            assert_eq!(ids, ["b-1", "b-2", "b-3", "b-4"]);
            spool.close().await;
        });
        fs::remove_dir_all(&dir).unwrap();
    }
}
