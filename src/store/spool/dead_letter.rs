//! The spool's dead letter: `dead-letter.jsonl` in its folder, and bringing its
//! events back.

use std::fs;
use std::io;

use serde_json::value::RawValue;

use super::Spool;
use super::files::{lock_dead_letter, sync_dir};
use crate::Error;
use crate::store::json_string;

/// The file in the spool folder that holds events given up after their last
/// attempt, one JSON object a line: `deadAt`, `attempts`, `error`, `delivery`, and
/// `record`, the spool line as it was stored.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// One line of the dead letter for `record` (a stored line without its line end).
pub(super) fn dead_letter_line(
    record: &[u8],
    error: &str,
    attempts: u32,
    delivery: &str,
    history: &str,
) -> Vec<u8> {
    let dead_at = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    // The stored line was read as an event, so it is JSON; kept as it is.
    let record = serde_json::from_slice::<&RawValue>(record)
        .map(|raw| raw.get().to_owned())
        .unwrap_or_else(|_| json_string(&String::from_utf8_lossy(record)));
    format!(
        "{{\"deadAt\":\"{dead_at}\",\"attempts\":{attempts},\"error\":{},\"delivery\":{},\"history\":{},\"record\":{record}}}\n",
        json_string(error),
        json_string(delivery),
        if history.is_empty() { "[]" } else { history },
    )
    .into_bytes()
}

/// Brings the events in the spool's dead letter back: appends each one's stored
/// line to the spool, as a new delivery, and then removes the dead letter. Run it
/// once the cause of the failures is fixed; the worker then processes them again
/// (the gate gives each a fresh claim, since a dead-lettered claim is released).
/// Returns how many events came back.
///
/// It is safe while a worker runs: the dead letter is locked from the read to the
/// removal, so a dead letter the worker writes meanwhile waits and lands in the
/// next file. A crash between the append and the removal brings them back a
/// second time at the next call: at least once, like everything the worker does.
///
/// # Errors
/// [`Error::Storage`] when the dead letter cannot be read, a line of it is not one
/// this crate wrote (nothing is appended then), or the append or the removal fails.
pub async fn requeue_dead_letters(spool: &Spool) -> Result<usize, Error> {
    let count = take_dead_letters(spool, None, true).await?;
    Ok(usize::try_from(count).unwrap_or(usize::MAX))
}

/// A dead letter's id: a 64-bit hash of its line, in hex. It names the line
/// whatever the file's other lines do, for as long as the console pages over it
/// (a fixed-key SipHash: the same in every process of one build).
pub(crate) fn dead_letter_id(line: &[u8]) -> String {
    use std::hash::Hasher;
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(line);
    format!("{:016x}", hasher.finish())
}

/// Takes the dead letters whose ids are in `ids` (all of them, for `None`) out of
/// the dead letter, under its lock: with `requeue`, appends their records to the
/// spool first, as new deliveries; then rewrites the dead letter with the others
/// (synced and renamed into place), or removes it when none is left. A crash
/// between the append and the rewrite brings them back twice, never loses one.
/// Returns how many it took.
pub(crate) async fn take_dead_letters(
    spool: &Spool,
    ids: Option<std::collections::HashSet<String>>,
    requeue: bool,
) -> Result<u64, Error> {
    let path = spool.dir().join(DEAD_LETTER_FILE);
    let read_path = path.clone();
    let dir = spool.dir().to_owned();
    // Held until the dead letter read here is rewritten (dropped on every return).
    let (lock, text) = blocking(move || {
        let lock =
            lock_dead_letter(&dir).map_err(|e| Error::storage("cannot lock the dead letter", e))?;
        match fs::read_to_string(&read_path) {
            Ok(text) => Ok((lock, Some(text))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((lock, None)),
            Err(e) => Err(Error::storage("cannot read the dead letter", e)),
        }
    })
    .await?;
    let Some(text) = text else { return Ok(0) };
    let mut records = Vec::new();
    let mut kept = Vec::new();
    let mut count = 0;
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if ids
            .as_ref()
            .is_some_and(|ids| !ids.contains(&dead_letter_id(line.as_bytes())))
        {
            kept.extend_from_slice(line.as_bytes());
            kept.push(b'\n');
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Entry<'a> {
            #[serde(borrow)]
            record: &'a RawValue,
        }
        let entry: Entry<'_> = serde_json::from_str(line).map_err(|e| {
            Error::storage(
                format!("cannot read line {} of the dead letter", number + 1),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        records.extend_from_slice(entry.record.get().as_bytes());
        records.push(b'\n');
        count += 1;
    }
    if count == 0 {
        return Ok(0);
    }
    if requeue {
        spool.append(records, count).await?;
    }
    let dir = spool.dir().to_owned();
    blocking(move || {
        let _lock = lock;
        let replaced = if kept.is_empty() {
            fs::remove_file(&path)
        } else {
            let temp = dir.join(format!("{DEAD_LETTER_FILE}.new"));
            fs::write(&temp, &kept)
                .and_then(|()| fs::File::open(&temp)?.sync_all())
                .and_then(|()| fs::rename(&temp, &path))
        };
        replaced
            .and_then(|()| sync_dir(&dir))
            .map_err(|e| Error::storage("cannot rewrite the dead letter", e))
    })
    .await?;
    spool.dead_letters_requeued(count);
    Ok(count)
}

/// Runs blocking file work on tokio's blocking threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(Error::storage(
            "the worker's file thread failed",
            io::Error::other(e),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_line_keeps_the_record_as_it_was() {
        let record =
            br#"{"receivedAt":"2026-01-01T00:00:00.000Z","secretIndex":0,"event":{"eventId":"e"}}"#;
        let line = dead_letter_line(record, "database \"down\"", 3, "spool:1:0", "[]");
        let text = String::from_utf8(line).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(value["error"], "database \"down\"");
        assert_eq!(value["attempts"], 3);
        assert_eq!(value["record"]["event"]["eventId"], "e");
        assert!(text.ends_with("}\n") && text.contains(std::str::from_utf8(record).unwrap_or("!")));
    }
}
