//! The reader's cursor: reads committed lines in order and keeps the `offset` file.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::files::{ReadingFlag, segment_numbers, segment_path, sync_dir};
use super::record::SpooledEvent;
use super::{Position, corrupt, storage};
use crate::Error;

/// Reads committed events from a [`Spool`](super::Spool), in order, and remembers how far it got
/// in the spool's `offset` file. Delivery to the reader is at least once: after a
/// crash it resumes from the last acknowledged position. Its file I/O blocks; the
/// [`SpoolReader`](super::SpoolReader) around it runs that on tokio's blocking threads.
#[derive(Debug)]
pub(super) struct Cursor {
    dir: PathBuf,
    remove_processed: bool,
    position: Position,
    committed: watch::Receiver<Position>,
    /// What was committed when the last batch was read: the end it read towards.
    read_towards: Position,
    file: Option<(u64, File)>,
    /// The last chunk read, reused once every event handed out from it is dropped.
    chunk: Arc<Vec<u8>>,
    /// The end of each event handed out and not yet acknowledged, in order.
    unacknowledged: VecDeque<Position>,
    counters: Counters,
}

/// What a reader shares with its spool.
#[derive(Debug)]
pub(super) struct Counters {
    /// Lowered when the reader is dropped (its `Drop` does it), so the spool can
    /// hand out another.
    pub(super) _reading: ReadingFlag,
    /// Events acknowledged: [`Spool::backlog`](super::Spool::backlog) is what is
    /// stored and not yet among them.
    pub(super) acknowledged: Arc<AtomicU64>,
    /// Events in the dead letter.
    pub(super) dead_letters: Arc<AtomicU64>,
}

/// How many stored events lie before the persisted offset (processed already), and
/// how many lines the dead letter holds, when a spool opens.
pub(super) fn counts_at_open(dir: &Path) -> io::Result<(u64, u64)> {
    let dead_letters = match fs::read(dir.join(super::dead_letter::DEAD_LETTER_FILE)) {
        Ok(data) => memchr::memchr_iter(b'\n', &data).count() as u64,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let Some(upto) = fs::read_to_string(dir.join(OFFSET_FILE))
        .ok()
        .and_then(|text| parse_offset(&text))
    else {
        return Ok((0, dead_letters));
    };
    let mut processed = 0;
    for n in segment_numbers(dir)?
        .into_iter()
        .take_while(|&n| n <= upto.segment)
    {
        let data = fs::read(segment_path(dir, n))?;
        let end = if n == upto.segment {
            usize::try_from(upto.offset)
                .unwrap_or(usize::MAX)
                .min(data.len())
        } else {
            data.len()
        };
        processed += memchr::memchr_iter(b'\n', &data[..end]).count() as u64;
    }
    Ok((processed, dead_letters))
}

const OFFSET_FILE: &str = "offset";
/// Where [`run_worker`](crate::worker::run_worker) sets aside stored lines that cannot be read as events.
pub(super) const REJECTED_FILE: &str = "rejected.jsonl";

impl Cursor {
    pub(super) fn open(
        dir: &Path,
        remove_processed: bool,
        committed: watch::Receiver<Position>,
        counters: Counters,
    ) -> Result<Self, Error> {
        let position = match fs::read_to_string(dir.join(OFFSET_FILE)) {
            Ok(text) => parse_offset(&text).ok_or_else(|| {
                corrupt(
                    "corrupt offset file".to_owned(),
                    format!("not a spool position: {text:?}"),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Position {
                segment: segment_numbers(dir)
                    .ok()
                    .and_then(|n| n.first().copied())
                    .unwrap_or(1),
                offset: 0,
            },
            Err(e) => return Err(storage("read the offset file", e)),
        };
        // Never past the data: had damage cut acknowledged lines off the end, new
        // events would land behind the reader, unseen.
        let position = position.min(*committed.borrow());
        Ok(Cursor {
            dir: dir.to_owned(),
            remove_processed,
            position,
            committed,
            read_towards: position,
            file: None,
            chunk: Arc::default(),
            unacknowledged: VecDeque::new(),
            counters,
        })
    }

    /// Where the reader is: everything before it was handed out.
    #[must_use]
    pub(super) fn position(&self) -> Position {
        self.position
    }

    /// Whether the last batch reached what was committed when it was read (a batch
    /// cut short by its size limit or a segment's end did not). What was committed
    /// since is the next batch's business.
    pub(super) fn caught_up(&self) -> bool {
        self.position >= self.read_towards
    }

    /// Waits for committed events past the reader's position and returns up to
    /// about `max_bytes` of them (at least one). `None` once the spool is closed
    /// and everything was read.
    ///
    /// # Errors
    /// [`Error::Storage`] when a segment cannot be read.
    pub(super) async fn next_batch(
        &mut self,
        max_bytes: usize,
    ) -> Result<Option<Vec<SpooledEvent>>, Error> {
        while let Some(committed) = self.wait_for_data().await {
            let batch = self.read_now(committed, max_bytes)?;
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
        Ok(None)
    }

    /// Waits, without any I/O, until something is committed past the reader's
    /// position, and returns the committed end; `None` once the spool is closed and
    /// everything was read.
    /// Whether the spool's writer is gone (the spool closed).
    pub(crate) fn writer_gone(&self) -> bool {
        self.committed.has_changed().is_err()
    }

    pub(crate) async fn wait_for_data(&mut self) -> Option<Position> {
        loop {
            let committed = *self.committed.borrow_and_update();
            if self.position < committed {
                return Some(committed);
            }
            if self.committed.changed().await.is_err() {
                // The writer is gone; read what it committed last, then stop.
                let committed = *self.committed.borrow();
                return (self.position < committed).then_some(committed);
            }
        }
    }

    /// Reads up to about `max_bytes` of the events before `committed` (blocking
    /// file I/O).
    pub(super) fn read_now(
        &mut self,
        committed: Position,
        max_bytes: usize,
    ) -> Result<Vec<SpooledEvent>, Error> {
        self.read_towards = committed;
        self.read(committed, max_bytes.max(1))
    }

    /// The spool folder.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&mut self, committed: Position, max_bytes: usize) -> Result<Vec<SpooledEvent>, Error> {
        let segment = self.position.segment;
        if self.file.as_ref().is_none_or(|(n, _)| *n != segment) {
            let file = File::open(segment_path(&self.dir, segment))
                .map_err(|e| storage("open a segment", e))?;
            self.file = Some((segment, file));
        }
        let Some((_, file)) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        // A later segment exists: this one is complete, read it to its end.
        let limit = if committed.segment > segment {
            file.metadata()
                .map_err(|e| storage("read a segment", e))?
                .len()
        } else {
            committed.offset
        };
        let remaining = limit.saturating_sub(self.position.offset);
        if remaining == 0 {
            if committed.segment > segment {
                self.position = Position {
                    segment: segment + 1,
                    offset: 0,
                };
            }
            return Ok(Vec::new());
        }
        // The events of the last batch are usually gone by now: reuse their buffer.
        let mut data = match Arc::get_mut(&mut self.chunk) {
            Some(data) => std::mem::take(data),
            None => Vec::new(),
        };
        let mut budget = remaining.min(max_bytes as u64);
        read_at(file, self.position.offset, budget, &mut data)?;
        let mut whole = memchr::memrchr(b'\n', &data).map_or(0, |last| last + 1);
        while whole == 0 && budget < remaining {
            // The next line is longer than the budget: read it whole, and only it.
            budget = budget.saturating_mul(2).min(remaining);
            read_at(file, self.position.offset, budget, &mut data)?;
            whole = memchr::memchr(b'\n', &data).map_or(0, |first| first + 1);
        }
        if whole == 0 {
            if committed.segment == segment {
                return Err(corrupt(
                    format!("corrupt spool after {:?}", self.position),
                    "no line end",
                ));
            }
            // A finished segment whose end lost its line end (damage): hand the rest
            // out as one line, which the worker sets aside, rather than stop here.
            whole = data.len();
        }
        data.truncate(whole);
        self.chunk = Arc::new(data);
        let mut events = Vec::new();
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', &self.chunk).map(|newline| newline + 1);
        for end in ends.chain((!self.chunk.ends_with(b"\n")).then_some(whole)) {
            let event_end = Position {
                segment,
                offset: self.position.offset + end as u64,
            };
            self.unacknowledged.push_back(event_end);
            events.push(SpooledEvent {
                chunk: Arc::clone(&self.chunk),
                line: start..end,
                end: Position {
                    segment,
                    offset: self.position.offset + end as u64,
                },
                retry: None,
            });
            start = end;
        }
        self.position.offset += whole as u64;
        Ok(events)
    }

    /// Counts an event written to the dead letter.
    pub(super) fn note_dead_letter(&self) {
        self.counters.dead_letters.fetch_add(1, Ordering::AcqRel);
    }

    /// Persists `upto` as the point to resume from (written to a temporary file,
    /// synced and renamed into place, so a crash leaves the old or the new offset).
    /// With [`SpoolConfig::remove_processed`](super::SpoolConfig::remove_processed), then deletes the segments before
    /// `upto`'s; one that cannot be deleted now is tried again at the next call.
    ///
    /// # Errors
    /// [`Error::Storage`] when the offset cannot be written.
    pub(super) fn acknowledge(&mut self, upto: Position) -> Result<(), Error> {
        let tmp = self.dir.join(format!("{OFFSET_FILE}.tmp"));
        let write = || -> io::Result<()> {
            let mut file = File::create(&tmp)?;
            writeln!(file, "{} {}", upto.segment, upto.offset)?;
            file.sync_all()?;
            fs::rename(&tmp, self.dir.join(OFFSET_FILE))?;
            sync_dir(&self.dir)
        };
        write().map_err(|e| storage("write the offset file", e))?;
        let mut done = 0;
        while self.unacknowledged.front().is_some_and(|&end| end <= upto) {
            self.unacknowledged.pop_front();
            done += 1;
        }
        self.counters.acknowledged.fetch_add(done, Ordering::AcqRel);
        if self.remove_processed {
            // Only after the offset is durable: a restart never looks for them.
            for n in segment_numbers(&self.dir).unwrap_or_default() {
                if n < upto.segment {
                    let _ = fs::remove_file(segment_path(&self.dir, n));
                }
            }
        }
        Ok(())
    }
}

/// Reads `len` bytes at `offset` into `data`, replacing what it held.
fn read_at(file: &mut File, offset: u64, len: u64, data: &mut Vec<u8>) -> Result<(), Error> {
    data.clear();
    data.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(data))
        .map_err(|e| storage("read a segment", e))
}

fn parse_offset(text: &str) -> Option<Position> {
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Position {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}
