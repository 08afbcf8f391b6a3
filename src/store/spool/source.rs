//! `SpoolReader`: the spool as the worker's [`EventSource`], acknowledging at most
//! once a second, with its file I/O on tokio's blocking threads.

use std::borrow::Cow;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::dead_letter::{DEAD_LETTER_FILE, dead_letter_line};
use super::files::{append_synced, lock_dead_letter};
use super::reader::{Cursor, REJECTED_FILE};
use super::retry::{self, RetryLog};
use super::{Position, Spool, SpooledEvent};
use crate::store::{Delivery, EventSource, RetryDue, Sources};
use crate::{Error, Event};

/// The worker acknowledges (writes the `offset` file) at most this often.
const ACK_EVERY: Duration = Duration::from_secs(1);
/// Under load the worker reads at most this often, and takes everything stored meanwhile.
const READ_EVERY: Duration = Duration::from_millis(10);
/// How long `next_batch` waits for new events before it returns an empty batch,
/// so that the worker settles what finished meanwhile (a failure's move into the
/// retry schedule among it).
const WAIT_AT_MOST: Duration = Duration::from_millis(250);
/// The most a batch reads at once.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// The most retries handed out at once.
const MAX_RETRIES: usize = 256;

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
    /// The retry schedule, shared with the spool.
    retries: Arc<Mutex<RetryLog>>,
    /// Whether to finish at the end of a closed spool without serving the retries.
    leave_retries: Arc<std::sync::atomic::AtomicBool>,
    /// The spool's pause mark.
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl SpoolReader {
    pub(super) fn new(
        cursor: Cursor,
        retries: Arc<Mutex<RetryLog>>,
        leave_retries: Arc<std::sync::atomic::AtomicBool>,
        paused: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        SpoolReader {
            dir: cursor.dir().to_owned(),
            cursor: Some(cursor),
            pending: None,
            last_ack: Instant::now(),
            last_read: None,
            retries,
            leave_retries,
            paused,
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

    /// Writes the retry schedule's changes (the moves synced first), then the
    /// offset: the offset never passes an event before the schedule holds it.
    async fn acknowledge_pending(&mut self) -> Result<(), Error> {
        let writes = {
            let mut log = retry::lock(&self.retries);
            log.dirty().then(|| log.take_writes())
        };
        let upto = self.pending.take();
        if writes.is_some() || upto.is_some() {
            self.off_thread(move |c| {
                if let Some(writes) = writes {
                    writes.write()?;
                }
                match upto {
                    Some(upto) => c.acknowledge(upto),
                    None => Ok(()),
                }
            })
            .await?;
            self.last_ack = Instant::now();
        }
        Ok(())
    }

    /// Something to acknowledge or to write to the retry schedule.
    fn pending(&self) -> bool {
        self.pending.is_some() || retry::lock(&self.retries).dirty()
    }

    /// The retries due now, and how long until the next one is due.
    fn due_retries(&self) -> (Vec<SpooledEvent>, Option<Duration>) {
        let now = SystemTime::now();
        let mut log = retry::lock(&self.retries);
        let due = log.take_due(now, MAX_RETRIES);
        let next = log
            .next_due()
            .map(|at| at.duration_since(now).unwrap_or_default());
        (due, next)
    }

    /// Whether to serve the schedule's retries once the spool is closed and read
    /// to its end: while it holds any (waiting or handed out), unless a supervised
    /// worker is stopping (then they wait for the next start).
    fn retries_left(&self) -> bool {
        !self
            .leave_retries
            .load(std::sync::atomic::Ordering::Acquire)
            && retry::lock(&self.retries).len() > 0
    }
}

impl EventSource for SpoolReader {
    type Delivery = SpooledEvent;

    async fn next_batch(&mut self) -> Result<Option<Vec<SpooledEvent>>, Error> {
        if self.paused.load(std::sync::atomic::Ordering::Acquire)
            && self.cursor.as_ref().is_some_and(Cursor::writer_gone)
        {
            // Paused and closed: what is left stays for the next start.
            self.acknowledge_pending().await?;
            return Ok(None);
        }
        loop {
            let (due, next_retry) = self.due_retries();
            if !due.is_empty() {
                return Ok(Some(due));
            }
            if let Some(wait) = self
                .last_read
                .and_then(|at| READ_EVERY.checked_sub(at.elapsed()))
            {
                tokio::time::sleep(wait).await;
            }
            let pending = self.pending();
            let due = ACK_EVERY.saturating_sub(self.last_ack.elapsed());
            // Wait for new events no longer than until the next retry is due.
            let most = next_retry.map_or(WAIT_AT_MOST, |next| next.min(WAIT_AT_MOST));
            let waiting = self.cursor()?.wait_for_data();
            let committed = if pending {
                // Something to acknowledge: wait for more only until it is due.
                match tokio::time::timeout(due.min(most), waiting).await {
                    Ok(committed) => committed,
                    Err(_) => {
                        if self.last_ack.elapsed() >= ACK_EVERY {
                            self.acknowledge_pending().await?;
                        }
                        return Ok(Some(Vec::new()));
                    }
                }
            } else {
                // Nothing new for a while: an empty batch, so the worker can do
                // its other work (completions) and ask again.
                match tokio::time::timeout(most, waiting).await {
                    Ok(committed) => committed,
                    Err(_) => return Ok(Some(Vec::new())),
                }
            };
            let Some(committed) = committed else {
                // Closed and read to its end: the retries are still served, then
                // the reader is finished.
                if self.retries_left() {
                    let wait = next_retry.map_or(WAIT_AT_MOST, |next| next.min(WAIT_AT_MOST));
                    tokio::time::sleep(wait).await;
                    return Ok(Some(Vec::new()));
                }
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
        match &delivery.retry {
            Some(tag) => retry::lock(&self.retries).done(tag.number),
            None => self.pending = Some(delivery.end()),
        }
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
        let history = crate::store::history::with_attempt(
            delivery.history(),
            std::time::SystemTime::now(),
            error,
        );
        let line = dead_letter_line(delivery.record(), error, attempts, &delivery.id(), &history);
        self.off_thread(move |c| {
            let _lock = lock_dead_letter(c.dir())
                .map_err(|e| Error::storage("cannot lock the dead letter", e))?;
            append_synced(c.dir(), DEAD_LETTER_FILE, &line)?;
            c.note_dead_letter();
            Ok(())
        })
        .await
    }

    async fn schedule_retry(
        &mut self,
        delivery: &SpooledEvent,
        retry: &RetryDue<'_>,
    ) -> Result<(), Error> {
        // Written with the next acknowledgement, before the offset passes it.
        let history = crate::store::history::with_attempt(
            delivery.history(),
            std::time::SystemTime::now(),
            retry.error,
        );
        retry::lock(&self.retries).schedule(delivery.record(), &delivery.id(), retry, history);
        Ok(())
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

    async fn paused(&mut self) -> bool {
        // Closed while paused: `next_batch` finishes at once.
        self.paused.load(std::sync::atomic::Ordering::Acquire)
            && !self.cursor.as_ref().is_some_and(Cursor::writer_gone)
    }
}

impl Sources for Spool {
    type Source = SpoolReader;

    async fn open(&self) -> Result<Self::Source, Error> {
        self.reader()
    }

    async fn stop(&self) {
        self.close_leaving_retries().await;
    }

    fn is_stopped(&self) -> bool {
        self.is_closed()
    }
}

impl Delivery for SpooledEvent {
    fn id(&self) -> Cow<'_, str> {
        if let Some(tag) = &self.retry {
            return Cow::Borrowed(&tag.delivery);
        }
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

    fn attempts(&self) -> u32 {
        self.retry.as_ref().map_or(0, |tag| tag.attempts)
    }
}

fn lost_cursor() -> Error {
    Error::storage(
        "the spool reader was lost",
        io::Error::other("a file operation of the worker failed; start it again with a new reader"),
    )
}
