//! The spool's retry schedule: `retries.jsonl` in its folder, the events that failed
//! an attempt and wait for the next, off the line.
//!
//! # Design
//!
//! An append-only log of two kinds of line: a schedule line, written when an event
//! moves in (`retry`, its number; `dueAt`; `attempts`; `error`; `delivery`; `record`,
//! the spool line as stored), and a done line (`{"done":N}`) once that retry is
//! finished (processed, skipped, moved on again or dead-lettered). What is live is
//! kept in memory, due time first, and handed out when due.
//!
//! Writes are batched with the reader's acknowledgement, at most once a second:
//! schedule lines are written and synced *before* the offset moves past the events
//! they hold, and done lines only after the schedule lines before them are synced.
//! A crash can therefore leave an event both on the line and in the schedule, or a
//! retry that was finished but not marked done: a duplicate, never a loss. The log
//! is rewritten with only its live entries when it opens, and once most of its
//! lines are done.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Position;
use super::files::sync_dir;
use super::record::SpooledEvent;
use crate::Error;
use crate::store::{RetryDue, json_string};

pub(crate) fn lock(log: &std::sync::Mutex<RetryLog>) -> std::sync::MutexGuard<'_, RetryLog> {
    // Every change to the log is complete before its lock is let go.
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The file in the spool folder that holds the retry schedule.
pub const RETRY_FILE: &str = "retries.jsonl";

/// The log is rewritten once it has this many lines and most are done.
const COMPACT_AFTER_LINES: u64 = 4096;

/// What a delivery from the schedule carries back to it.
#[derive(Debug)]
pub(crate) struct RetryTag {
    /// Its number in the log.
    pub(crate) number: u64,
    /// Handler calls made before this delivery.
    pub(crate) attempts: u32,
    /// The delivery id it had on the line, kept for the gate.
    pub(crate) delivery: String,
    /// Its attempts so far ([`history`](crate::store::history)).
    pub(crate) history: String,
}

/// One live retry.
#[derive(Debug)]
struct Live {
    due_ms: u64,
    attempts: u32,
    error: String,
    delivery: String,
    record: Arc<Vec<u8>>,
    /// Its attempts so far, as JSON ([`history`](crate::store::history)).
    history: String,
}

/// The schedule as the spool and its reader share it.
#[derive(Debug)]
pub(crate) struct RetryLog {
    dir: PathBuf,
    next_number: u64,
    /// Live and not handed out, by due time.
    waiting: BTreeMap<(u64, u64), Live>,
    /// Handed out and not finished, by number.
    taken: HashMap<u64, Live>,
    /// Schedule lines not yet written, and done lines to write once they are synced.
    unwritten: Vec<u8>,
    undone: Vec<u8>,
    /// Lines in the file.
    lines: u64,
}

/// One line of the log: a schedule line (`retry` and the rest) or a done line
/// (`done` alone).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    retry: Option<u64>,
    done: Option<u64>,
    #[serde(default)]
    due_ms: u64,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    error: String,
    #[serde(default)]
    delivery: String,
    #[serde(borrow)]
    record: Option<&'a RawValue>,
    #[serde(borrow)]
    history: Option<&'a RawValue>,
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn summary(number: u64, live: &Live) -> crate::console::Summary {
    let due = UNIX_EPOCH + Duration::from_millis(live.due_ms);
    crate::console::Summary::of_record(
        number.to_string(),
        u128::from(number),
        &live.record,
        &live.error,
        live.attempts,
        humantime::format_rfc3339_seconds(due).to_string(),
    )
}

fn schedule_line(number: u64, live: &Live) -> Vec<u8> {
    let due = UNIX_EPOCH + Duration::from_millis(live.due_ms);
    let record = serde_json::from_slice::<&RawValue>(&live.record)
        .map(|raw| raw.get().to_owned())
        .unwrap_or_else(|_| json_string(&String::from_utf8_lossy(&live.record)));
    format!(
        "{{\"retry\":{number},\"dueAt\":\"{}\",\"dueMs\":{},\"attempts\":{},\"error\":{},\"delivery\":{},\"history\":{},\"record\":{record}}}\n",
        humantime::format_rfc3339_millis(due),
        live.due_ms,
        live.attempts,
        json_string(&live.error),
        json_string(&live.delivery),
        if live.history.is_empty() {
            "[]"
        } else {
            &live.history
        },
    )
    .into_bytes()
}

impl RetryLog {
    /// Reads the schedule in `dir` (none yet is an empty one) and rewrites it with
    /// its live entries only, which also cuts a line torn by a crash.
    pub(crate) fn open(dir: &Path) -> Result<RetryLog, Error> {
        let path = dir.join(RETRY_FILE);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::storage("cannot read the retry schedule", e)),
        };
        let mut log = RetryLog {
            dir: dir.to_owned(),
            next_number: 1,
            waiting: BTreeMap::new(),
            taken: HashMap::new(),
            unwritten: Vec::new(),
            undone: Vec::new(),
            lines: 0,
        };
        let mut live: HashMap<u64, Live> = HashMap::new();
        let complete = data
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(&data[..0], |end| &data[..=end]);
        for (index, line) in complete.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed: Line<'_> = serde_json::from_slice(line).map_err(|e| {
                Error::storage(
                    format!("cannot read line {} of {RETRY_FILE}", index + 1),
                    io::Error::new(io::ErrorKind::InvalidData, e),
                )
            })?;
            match (parsed.retry, parsed.record, parsed.done) {
                (Some(retry), Some(record), _) => {
                    log.next_number = log.next_number.max(retry + 1);
                    let entry = Live {
                        due_ms: parsed.due_ms,
                        attempts: parsed.attempts,
                        error: parsed.error,
                        delivery: parsed.delivery,
                        record: Arc::new(record.get().as_bytes().to_vec()),
                        history: parsed
                            .history
                            .map_or_else(String::new, |h| h.get().to_owned()),
                    };
                    live.insert(retry, entry);
                }
                (None, None, Some(done)) => {
                    live.remove(&done);
                }
                _ => {
                    return Err(Error::storage(
                        format!("cannot read line {} of {RETRY_FILE}", index + 1),
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            "neither a retry with its record nor a done line",
                        ),
                    ));
                }
            }
        }
        log.waiting = live
            .into_iter()
            .map(|(number, entry)| ((entry.due_ms, number), entry))
            .collect();
        if !data.is_empty() {
            log.rewrite()?;
        }
        Ok(log)
    }

    /// Events in the schedule: waiting, or handed out and not finished.
    pub(crate) fn len(&self) -> u64 {
        (self.waiting.len() + self.taken.len()) as u64
    }

    /// When the first waiting one is due.
    pub(crate) fn next_due(&self) -> Option<SystemTime> {
        let (&(due_ms, _), _) = self.waiting.first_key_value()?;
        Some(UNIX_EPOCH + Duration::from_millis(due_ms))
    }

    /// Moves `record` (stored on the line as `delivery`) into the schedule.
    pub(crate) fn schedule(
        &mut self,
        record: &[u8],
        delivery: &str,
        retry: &RetryDue<'_>,
        history: String,
    ) {
        let number = self.next_number;
        self.next_number += 1;
        let live = Live {
            due_ms: millis(retry.due),
            attempts: retry.attempts,
            error: retry.error.to_owned(),
            delivery: delivery.to_owned(),
            record: Arc::new(record.to_vec()),
            history,
        };
        self.unwritten
            .extend_from_slice(&schedule_line(number, &live));
        self.waiting.insert((live.due_ms, number), live);
    }

    /// Every retry waiting, with its record and whole error, as the console
    /// lists them (ordered by number: later moves have larger numbers).
    pub(crate) fn listed(&self) -> Vec<crate::console::Entry> {
        let mut all: Vec<_> = self
            .waiting
            .iter()
            .map(|(&(_, number), live)| crate::console::Entry {
                summary: summary(number, live),
                record: live.record.to_vec(),
                error: live.error.clone(),
                history: crate::store::history::parse(&live.history),
            })
            .collect();
        all.sort_by_key(|e| e.summary.order);
        all
    }

    /// Makes retry `number` due at `now` if it waits; whether it did. Kept in
    /// memory only: after a crash it is due when it was.
    pub(crate) fn make_due(&mut self, number: u64, now: SystemTime) -> bool {
        let Some(&key) = self.waiting.keys().find(|&&(_, n)| n == number) else {
            return false;
        };
        if let Some(live) = self.waiting.remove(&key) {
            self.waiting.insert((millis(now), number), live);
        }
        true
    }

    /// Hands out up to `max` retries due at `now`.
    pub(crate) fn take_due(&mut self, now: SystemTime, max: usize) -> Vec<SpooledEvent> {
        let now = millis(now);
        let mut due = Vec::new();
        while due.len() < max {
            let Some(entry) = self.waiting.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let ((_, number), live) = entry.remove_entry();
            let len = live.record.len();
            due.push(SpooledEvent {
                chunk: Arc::clone(&live.record),
                line: 0..len,
                end: Position::default(),
                retry: Some(Arc::new(RetryTag {
                    number,
                    attempts: live.attempts,
                    delivery: live.delivery.clone(),
                    history: live.history.clone(),
                })),
            });
            self.taken.insert(number, live);
        }
        due
    }

    /// Retry `number`, handed out, is finished.
    pub(crate) fn done(&mut self, number: u64) {
        if self.taken.remove(&number).is_some() {
            self.undone
                .extend_from_slice(format!("{{\"done\":{number}}}\n").as_bytes());
        }
    }

    /// Retries handed out and not finished come back as waiting (the worker that
    /// had them stopped); they are due as they were.
    pub(crate) fn hand_back(&mut self) {
        for (number, live) in self.taken.drain() {
            self.waiting.insert((live.due_ms, number), live);
        }
    }

    /// Whether something is to be written.
    pub(crate) fn dirty(&self) -> bool {
        !self.unwritten.is_empty() || !self.undone.is_empty()
    }

    /// What [`RetryLog::write`] is to write, taken out so that the file work runs
    /// without the lock.
    pub(crate) fn take_writes(&mut self) -> Writes {
        let compact = self.lines >= COMPACT_AFTER_LINES && self.len() * 4 < self.lines;
        let writes = Writes {
            dir: self.dir.clone(),
            schedule: std::mem::take(&mut self.unwritten),
            done: std::mem::take(&mut self.undone),
            compact: compact.then(|| self.live_lines()),
        };
        self.lines = match &writes.compact {
            Some(_) => self.len(),
            None => {
                self.lines
                    + memchr::memchr_iter(b'\n', &writes.schedule).count() as u64
                    + memchr::memchr_iter(b'\n', &writes.done).count() as u64
            }
        };
        writes
    }

    fn live_lines(&self) -> Vec<u8> {
        let waiting = self
            .waiting
            .iter()
            .map(|(&(_, number), live)| (number, live));
        let taken = self.taken.iter().map(|(&number, live)| (number, live));
        waiting
            .chain(taken)
            .flat_map(|(number, live)| schedule_line(number, live))
            .collect()
    }

    fn rewrite(&mut self) -> Result<(), Error> {
        let lines = self.live_lines();
        self.lines = self.len();
        replace(&self.dir, &lines)
    }
}

/// A batch of writes to the log.
#[derive(Debug)]
pub(crate) struct Writes {
    dir: PathBuf,
    schedule: Vec<u8>,
    done: Vec<u8>,
    /// Every live line, to replace the file with instead.
    compact: Option<Vec<u8>>,
}

impl Writes {
    /// Writes the schedule lines and syncs them, then the done lines (synced with
    /// the next batch, or not at all: a done line lost repeats a retry).
    pub(crate) fn write(self) -> Result<(), Error> {
        if let Some(lines) = self.compact {
            return replace(&self.dir, &lines);
        }
        if self.schedule.is_empty() && self.done.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(RETRY_FILE);
        let fail = |e| Error::storage("cannot write the retry schedule", e);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(fail)?;
        if !self.schedule.is_empty() {
            file.write_all(&self.schedule).map_err(fail)?;
            file.sync_data().map_err(fail)?;
            if created {
                sync_dir(&self.dir).map_err(fail)?;
            }
        }
        file.write_all(&self.done).map_err(fail)
    }
}

/// Replaces the log with `lines`: a temporary file, synced, renamed into place.
fn replace(dir: &Path, lines: &[u8]) -> Result<(), Error> {
    let fail = |e| Error::storage("cannot rewrite the retry schedule", e);
    let temporary = dir.join(format!("{RETRY_FILE}.tmp"));
    let mut file = File::create(&temporary).map_err(fail)?;
    file.write_all(lines).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    fs::rename(&temporary, dir.join(RETRY_FILE)).map_err(fail)?;
    sync_dir(dir).map_err(fail)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "comapi-retry-{name}-{}-{:?}",
            std::process::id(),
            SystemTime::now()
        ));
        let _ = fs::create_dir_all(&dir);
        dir
    }

    const RECORD: &[u8] = br#"{"receivedAt":"2026-01-01T00:00:00.000Z","secretIndex":0,"event":{"eventId":"e","name":"message.sent"}}"#;

    #[test]
    fn a_schedule_outlives_a_restart_and_a_done_retry_does_not() {
        let dir = temp("restart");
        let mut log = RetryLog::open(&dir).unwrap();
        let due = UNIX_EPOCH + Duration::from_secs(1);
        log.schedule(
            RECORD,
            "spool:1:10",
            &RetryDue::new(2, "down", due),
            String::new(),
        );
        log.schedule(
            RECORD,
            "spool:1:20",
            &RetryDue::new(1, "down", due),
            String::new(),
        );
        log.take_writes().write().unwrap();
        let taken = log.take_due(SystemTime::now(), 1);
        assert_eq!(taken.len(), 1);
        let number = taken[0].retry.as_ref().map_or(0, |tag| tag.number);
        log.done(number);
        log.take_writes().write().unwrap();

        let mut again = RetryLog::open(&dir).unwrap();
        assert_eq!(again.len(), 1);
        let left = again.take_due(SystemTime::now(), 10);
        let tag = left[0]
            .retry
            .as_ref()
            .map(|tag| (tag.attempts, tag.delivery.clone()));
        assert_eq!(tag, Some((1, "spool:1:20".to_owned())));
        assert_eq!(left[0].bytes(), RECORD);
        // The rewrite at open kept the live line only; a torn tail is cut.
        let text = fs::read_to_string(dir.join(RETRY_FILE)).unwrap_or_default();
        assert_eq!(text.lines().count(), 1);
        fs::write(dir.join(RETRY_FILE), format!("{text}{{\"retry\":9,\"due")).unwrap_or(());
        assert_eq!(RetryLog::open(&dir).map(|log| log.len()).ok(), Some(1));
        let _ = fs::remove_dir_all(dir);
    }
}
