//! `SpoolReader`: the spool as the worker's [`EventSource`], acknowledging at most
//! once a second, with its file I/O on tokio's blocking threads.

use std::borrow::Cow;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::dead_letter::{DEAD_LETTER_FILE, dead_letter_line};
use super::files::{append_synced, lock_dead_letter};
use super::reader::{Cursor, REJECTED_FILE};
use super::{Position, SpooledEvent};
use crate::store::{Delivery, EventSource};
use crate::{Error, Event};

/// The worker acknowledges (writes the `offset` file) at most this often.
const ACK_EVERY: Duration = Duration::from_secs(1);
/// Under load the worker reads at most this often, and takes everything stored meanwhile.
const READ_EVERY: Duration = Duration::from_millis(10);
/// How long `next_batch` waits for new events before it returns an empty batch.
const WAIT_AT_MOST: Duration = Duration::from_secs(1);
/// The most a batch reads at once.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Reads committed events from a [`Spool`](super::Spool), in order, and remembers
/// how far it got in the spool's `offset` file: the worker's
/// [`EventSource`] on a spool. Delivery is at least once: after a crash, reading
/// resumes from the last acknowledged position.
///
/// As an [`EventSource`] it acknowledges finished events at most once a second and
/// within a second of the last one; under load it reads at most every 10 ms and
/// takes everything stored meanwhile, and while it is behind it reads on without
/// pausing.
#[derive(Debug)]
pub struct SpoolReader {
    /// `None` only while a file operation runs on a blocking thread.
    cursor: Option<Cursor>,
    dir: PathBuf,
    /// Finished and not yet acknowledged up to here.
    pending: Option<Position>,
    last_ack: Instant,
    /// When the last batch that caught up was read.
    last_read: Option<Instant>,
}

impl SpoolReader {
    pub(super) fn new(cursor: Cursor) -> Self {
        SpoolReader {
            dir: cursor.dir().to_owned(),
            cursor: Some(cursor),
            pending: None,
            last_ack: Instant::now(),
            last_read: None,
        }
    }

    fn cursor(&mut self) -> Result<&mut Cursor, Error> {
        self.cursor.as_mut().ok_or_else(lost_cursor)
    }

    /// Where the reader is: everything before it was handed out.
    #[must_use]
    pub fn position(&self) -> Position {
        self.cursor
            .as_ref()
            .map_or(Position::default(), Cursor::position)
    }

    /// Waits for committed events past the reader's position and returns up to
    /// about `max_bytes` of them (at least one). `None` once the spool is closed
    /// and everything was read.
    ///
    /// # Errors
    /// [`Error::Storage`] when a segment cannot be read.
    pub async fn next_batch(
        &mut self,
        max_bytes: usize,
    ) -> Result<Option<Vec<SpooledEvent>>, Error> {
        self.cursor()?.next_batch(max_bytes).await
    }

    /// Persists `upto` as the point to resume from (written to a temporary file,
    /// synced and renamed into place, so a crash leaves the old or the new offset).
    /// With [`SpoolConfig::remove_processed`](super::SpoolConfig::remove_processed),
    /// then deletes the segments before `upto`'s; one that cannot be deleted now is
    /// tried again at the next call.
    ///
    /// # Errors
    /// [`Error::Storage`] when the offset cannot be written.
    pub fn acknowledge(&mut self, upto: Position) -> Result<(), Error> {
        self.cursor()?.acknowledge(upto)
    }

    /// Runs `work` on the cursor on tokio's blocking threads, and puts it back.
    async fn off_thread<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Cursor) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let mut cursor = self.cursor.take().ok_or_else(lost_cursor)?;
        let (cursor, result) = tokio::task::spawn_blocking(move || {
            let result = work(&mut cursor);
            (cursor, result)
        })
        .await
        .map_err(|e| Error::storage("the worker's file thread failed", io::Error::other(e)))?;
        self.cursor = Some(cursor);
        result
    }

    async fn acknowledge_pending(&mut self) -> Result<(), Error> {
        if let Some(upto) = self.pending.take() {
            self.off_thread(move |c| c.acknowledge(upto)).await?;
            self.last_ack = Instant::now();
        }
        Ok(())
    }
}

impl EventSource for SpoolReader {
    type Delivery = SpooledEvent;

    async fn next_batch(&mut self) -> Result<Option<Vec<SpooledEvent>>, Error> {
        loop {
            if let Some(wait) = self
                .last_read
                .and_then(|at| READ_EVERY.checked_sub(at.elapsed()))
            {
                tokio::time::sleep(wait).await;
            }
            let due = ACK_EVERY.saturating_sub(self.last_ack.elapsed());
            let pending = self.pending.is_some();
            let waiting = self.cursor()?.wait_for_data();
            let committed = if pending {
                // Something to acknowledge: wait for more only until it is due.
                match tokio::time::timeout(due, waiting).await {
                    Ok(committed) => committed,
                    Err(_) => {
                        self.acknowledge_pending().await?;
                        continue;
                    }
                }
            } else {
                // Nothing new for a while: an empty batch, so the worker can do
                // its other work (retries, completions) and ask again.
                match tokio::time::timeout(WAIT_AT_MOST, waiting).await {
                    Ok(committed) => committed,
                    Err(_) => return Ok(Some(Vec::new())),
                }
            };
            let Some(committed) = committed else {
                return Ok(None);
            };
            let batch = self
                .off_thread(move |c| c.read_now(committed, MAX_BATCH_BYTES))
                .await?;
            // Behind (the batch stopped short of what was committed): read on at once.
            let caught_up = self.cursor.as_ref().is_some_and(Cursor::caught_up);
            self.last_read = caught_up.then(Instant::now);
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
    }

    async fn finished(&mut self, delivery: &SpooledEvent) -> Result<(), Error> {
        self.pending = Some(delivery.end());
        if self.last_ack.elapsed() >= ACK_EVERY {
            self.acknowledge_pending().await?;
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        delivery: &SpooledEvent,
        error: &str,
        attempts: u32,
    ) -> Result<(), Error> {
        let line = dead_letter_line(delivery.record(), error, attempts, &delivery.id());
        self.off_thread(move |c| {
            let _lock = lock_dead_letter(c.dir())
                .map_err(|e| Error::storage("cannot lock the dead letter", e))?;
            append_synced(c.dir(), DEAD_LETTER_FILE, &line)?;
            c.note_dead_letter();
            Ok(())
        })
        .await
    }

    async fn set_aside(&mut self, delivery: &SpooledEvent, _error: &Error) -> Result<(), Error> {
        let line = [delivery.record(), b"\n"].concat();
        let dir = self.dir.clone();
        self.off_thread(move |_| append_synced(&dir, REJECTED_FILE, &line))
            .await
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.acknowledge_pending().await
    }
}

impl Delivery for SpooledEvent {
    fn id(&self) -> Cow<'_, str> {
        let end = self.end();
        Cow::Owned(format!("spool:{}:{}", end.segment, end.offset))
    }

    fn record(&self) -> &[u8] {
        let line = self.bytes();
        line.strip_suffix(b"\n").unwrap_or(line)
    }

    fn event(&self) -> Result<Event<'_>, Error> {
        SpooledEvent::event(self)
    }
}

fn lost_cursor() -> Error {
    Error::storage(
        "the spool reader was lost",
        io::Error::other("a file operation of the worker failed; start it again with a new reader"),
    )
}
