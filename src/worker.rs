//! The worker: reads stored events in order, claims each from the decision store,
//! runs the handler with retries, and sets aside what it cannot process.
//!
//! # Design
//!
//! Nothing is acknowledged (the spool offset, the gate's completion) before the
//! handler succeeded or the event went to the dead letter, whatever fails or
//! crashes in between: delivery to the handler is at least once. The worker's file
//! I/O (reads, offset writes, syncs, renames, deletions) runs on tokio's blocking
//! threads, never on the runtime's worker threads.

use std::any::Any;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use crate::spool::{Position, SpoolReader, SpooledEvent, sync_dir};
use crate::{Decision, DecisionStore, Error, Event, Spool};

/// The file in the spool folder that holds events given up after their last
/// attempt, one JSON object a line: `deadAt`, `attempts`, `error`, `delivery`, and
/// `record`, the spool line as it was stored.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// What a handler's failure is: any error, boxed.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Your processing, as [`run_worker`] calls it.
///
/// Any `FnMut(Event<'static>) -> impl Future<Output = Result<(), E>>` is one, for
/// an error type `E` that converts into a [`HandlerError`]:
///
/// ```
/// use comapi_webhook::{Event, EventHandler};
/// fn assert_handler(_: impl EventHandler) {}
/// assert_handler(|event: Event<'static>| async move {
///     println!("{} {:?}", event.name(), event.message_id());
///     Ok::<(), std::io::Error>(())
/// });
/// ```
///
/// Implement the trait yourself to also hear of the events the gate says not to
/// process, of failed attempts, of dead letters and of damaged lines.
pub trait EventHandler: Send {
    /// Processes one event the gate says is [`Decision::Fresh`]. An error, or a
    /// panic, means "not processed": the worker retries the event with backoff
    /// ([`RetryPolicy`]), and after the last attempt writes it to the dead letter.
    /// Delivery is at least once: after a crash, an event can come again even if
    /// this call succeeded, so make the processing idempotent.
    fn handle(
        &mut self,
        event: Event<'static>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// An event the gate says not to process: [`Decision::Duplicate`],
    /// [`Decision::Stale`] or [`Decision::Expired`]. The default does nothing.
    fn skipped(&mut self, event: &Event<'_>, decision: Decision) {
        let _ = (event, decision);
    }

    /// An attempt at `event` failed with `error` (its text; `the handler panicked:
    /// …` for a panic); the worker tries again after `retry_in`. The default does
    /// nothing.
    fn attempt_failed(&mut self, event: &Event<'_>, error: &str, attempt: u32, retry_in: Duration) {
        let _ = (event, error, attempt, retry_in);
    }

    /// `event` failed its last attempt with `error`, and is now in the dead letter
    /// ([`DEAD_LETTER_FILE`], synced). The default does nothing: override it to
    /// raise an alert. Once the cause is fixed, [`requeue_dead_letters`] brings the
    /// events back.
    fn dead_lettered(&mut self, event: &Event<'_>, error: &str, attempts: u32) {
        let _ = (event, error, attempts);
    }

    /// A stored line that cannot be read as an event: damaged on disk, or written
    /// in a form this version does not parse. [`run_worker`] has already copied it,
    /// byte for byte, to `rejected.jsonl` in the spool folder and synced it, and goes
    /// on with the next line; `error` says what is wrong with it. The default does
    /// nothing more. Like events, a line may come here again after a crash.
    fn set_aside(&mut self, line: &[u8], error: &Error) {
        let _ = (line, error);
    }
}

impl<F, Fut, E> EventHandler for F
where
    F: FnMut(Event<'static>) -> Fut + Send,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Into<HandlerError>,
{
    fn handle(
        &mut self,
        event: Event<'static>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let processing = self(event);
        async move { processing.await.map_err(Into::into) }
    }
}

/// How [`run_worker`] retries an event whose handler failed: after `first_delay`,
/// doubling each time up to `max_delay`, for `attempts` attempts in all; then the
/// event goes to the dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// The wait after the first failure. Default 1 s.
    pub first_delay: Duration,
    /// The longest wait between attempts. Default 60 s.
    pub max_delay: Duration,
    /// Attempts in all, the first included (at least 1). Default 8: about two
    /// minutes from the first attempt to the dead letter.
    pub attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60), 8)
    }
}

impl RetryPolicy {
    /// A policy with these delays and number of attempts (at least 1).
    #[must_use]
    pub fn new(first_delay: Duration, max_delay: Duration, attempts: u32) -> Self {
        RetryPolicy {
            first_delay,
            max_delay,
            attempts: attempts.max(1),
        }
    }

    /// The wait after the `failed`th failed attempt (1 for the first).
    fn delay(&self, failed: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failed.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.first_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

/// Runs the processing loop over `reader`, in spool order, until the spool is
/// closed and everything stored was processed.
///
/// For each stored event it claims the event from `store`, with the event's spool
/// position as the delivery (see [`DecisionStore`]):
/// - [`Decision::Fresh`]: `handler.handle`; on success the claim is completed. On
///   an error or a panic the claim is released and the event retried after the
///   policy's delay; after the last attempt it is written to the dead letter
///   ([`DEAD_LETTER_FILE`], synced), the claim released, and processing goes on.
/// - [`Decision::Busy`] (another copy is being processed elsewhere): claimed again
///   a second later, until completed there (`Duplicate`) or its lease passes
///   (`Fresh`).
/// - Anything else: [`EventHandler::skipped`].
///
/// While the decision store is unavailable (Redis down), it waits a second and asks
/// again: no event is skipped. A stored line that cannot be read as an event is
/// copied to `rejected.jsonl` and [`EventHandler::set_aside`] is told.
///
/// The position is acknowledged (the `offset` file, synced) at most once a second,
/// and within a second of the last event, and never past an event that was neither
/// processed nor dead-lettered: after a crash, processing resumes from there, and
/// the same delivery claims its event again.
///
/// Under load the worker reads at most every 10 ms and takes everything stored
/// meanwhile; while it is behind, it reads on without pausing.
///
/// # Errors
/// [`Error::Storage`] when the spool cannot be read, a line not set aside, an event
/// not dead-lettered, or the offset not written. Everything before the last
/// acknowledged position was processed; run it again with a new reader to resume.
///
/// ```no_run
/// use comapi_webhook::{Event, Gate, RetryPolicy, Spool, SpoolConfig, run_worker};
///
/// async fn process(event: Event<'static>) -> Result<(), std::io::Error> {
///     println!("{} {:?}", event.name(), event.message_id());
///     Ok(())
/// }
///
/// # async fn demo() -> Result<(), comapi_webhook::Error> {
/// let (spool, _) = Spool::open(&SpoolConfig::in_temp_dir())?;
/// run_worker(spool.reader()?, &Gate::in_memory(), process, RetryPolicy::default()).await?;
/// # Ok(()) }
/// ```
pub async fn run_worker<S, H>(
    reader: SpoolReader,
    store: &S,
    mut handler: H,
    retry: RetryPolicy,
) -> Result<(), Error>
where
    S: DecisionStore,
    H: EventHandler,
{
    const ACK_EVERY: Duration = Duration::from_secs(1);
    const READ_EVERY: Duration = Duration::from_millis(10);
    const MAX_BATCH_BYTES: usize = 1 << 20;
    let dir = reader.dir().to_owned();
    let mut reader = Some(reader);
    let mut last_ack = Instant::now();
    let mut last_read: Option<Instant> = None;
    let mut pending: Option<Position> = None;
    loop {
        if let Some(wait) = last_read.and_then(|at| READ_EVERY.checked_sub(at.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        let waiting = reader.as_mut().ok_or_else(lost_reader)?.wait_for_data();
        let committed = match pending {
            // Something to acknowledge: wait for more only until it is due.
            Some(upto) => {
                let due = ACK_EVERY.saturating_sub(last_ack.elapsed());
                match tokio::time::timeout(due, waiting).await {
                    Ok(committed) => committed,
                    Err(_) => {
                        off_thread(&mut reader, move |r| r.acknowledge(upto)).await?;
                        pending = None;
                        last_ack = Instant::now();
                        continue;
                    }
                }
            }
            None => waiting.await,
        };
        let Some(committed) = committed else { break };
        let batch =
            off_thread(&mut reader, move |r| r.read_now(committed, MAX_BATCH_BYTES)).await?;
        // Behind (the batch stopped short of what was committed): read on at once.
        let caught_up = reader.as_ref().is_some_and(SpoolReader::caught_up);
        last_read = caught_up.then(Instant::now);
        for spooled in &batch {
            process(spooled, store, &mut handler, &retry, &dir, &mut reader).await?;
        }
        pending = batch.last().map(SpooledEvent::end).or(pending);
        if let Some(upto) = pending.filter(|_| last_ack.elapsed() >= ACK_EVERY) {
            off_thread(&mut reader, move |r| r.acknowledge(upto)).await?;
            pending = None;
            last_ack = Instant::now();
        }
    }
    if let Some(upto) = pending {
        off_thread(&mut reader, move |r| r.acknowledge(upto)).await?;
    }
    Ok(())
}

/// One stored line, to the end: processed, skipped, dead-lettered or set aside.
async fn process<S: DecisionStore, H: EventHandler>(
    spooled: &SpooledEvent,
    store: &S,
    handler: &mut H,
    retry: &RetryPolicy,
    dir: &Path,
    reader: &mut Option<SpoolReader>,
) -> Result<(), Error> {
    let event = match spooled.event() {
        Ok(event) => event,
        Err(error) => {
            let line = trimmed(spooled.bytes()).to_vec();
            let kept = line.clone();
            off_thread(reader, move |r| r.set_aside(&kept)).await?;
            handler.set_aside(&line, &error);
            return Ok(());
        }
    };
    let end = spooled.end();
    let delivery = format!("spool:{}:{}", end.segment, end.offset);
    let mut attempt = 0;
    loop {
        match claim(store, &event, &delivery).await {
            Decision::Fresh => {}
            decision => {
                handler.skipped(&event, decision);
                return Ok(());
            }
        }
        attempt += 1;
        let error = match attempt_once(handler, event.clone().into_owned()).await {
            Ok(()) => {
                until_done(|| store.complete(&event, &delivery)).await;
                return Ok(());
            }
            Err(error) => error,
        };
        // Best effort: if the store cannot hear it, the claim expires with its lease.
        let _ = store.release(&event, &delivery).await;
        if attempt >= retry.attempts {
            let record = DeadLetter {
                error: &error,
                attempts: attempt,
                delivery: &delivery,
                record: trimmed(spooled.bytes()),
            }
            .to_line();
            let dir = dir.to_owned();
            blocking(move || append_synced(&dir, DEAD_LETTER_FILE, &record)).await?;
            if let Some(reader) = reader.as_ref() {
                reader.note_dead_letter();
            }
            handler.dead_lettered(&event, &error, attempt);
            return Ok(());
        }
        let delay = retry.delay(attempt);
        handler.attempt_failed(&event, &error, attempt, delay);
        tokio::time::sleep(delay).await;
    }
}

/// Claims until the store answers, and while another delivery holds the event.
async fn claim<S: DecisionStore>(store: &S, event: &Event<'_>, delivery: &str) -> Decision {
    loop {
        match store.claim(event, delivery).await {
            Ok(Decision::Busy) | Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            Ok(decision) => return decision,
        }
    }
}

/// Runs `step` until it succeeds, a second apart.
async fn until_done<F, Fut>(mut step: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    while step().await.is_err() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One attempt at the handler, with a panic (in the call or in its future) caught
/// and turned into an error's text.
async fn attempt_once<H: EventHandler>(
    handler: &mut H,
    event: Event<'static>,
) -> Result<(), String> {
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| Box::pin(handler.handle(event))));
    let outcome = match started {
        Ok(future) => CatchUnwind(future).await,
        Err(panic) => Err(panic),
    };
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => Err(format!("the handler panicked: {}", panic_text(&*panic))),
    }
}

/// A future that turns a panic while polling its inner future into an `Err`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(move || inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-text panic")
}

/// One line of the dead letter.
struct DeadLetter<'a> {
    error: &'a str,
    attempts: u32,
    delivery: &'a str,
    record: &'a [u8],
}

impl DeadLetter<'_> {
    fn to_line(&self) -> Vec<u8> {
        let dead_at = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        // The stored line was read as an event, so it is JSON; kept as it is.
        let record = serde_json::from_slice::<&RawValue>(self.record)
            .map(|raw| raw.get().to_owned())
            .unwrap_or_else(|_| json_string(&String::from_utf8_lossy(self.record)));
        format!(
            "{{\"deadAt\":\"{dead_at}\",\"attempts\":{},\"error\":{},\"delivery\":{},\"record\":{record}}}\n",
            self.attempts,
            json_string(self.error),
            json_string(self.delivery),
        )
        .into_bytes()
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Brings the events in the spool's dead letter back: appends each one's stored
/// line to the spool, as a new delivery, and then removes the dead letter. Run it
/// once the cause of the failures is fixed; the worker then processes them again
/// (the gate gives each a fresh claim, since a dead-lettered claim is released).
/// Returns how many events came back.
///
/// A crash between the append and the removal brings them back a second time at
/// the next call: at least once, like everything the worker does.
///
/// # Errors
/// [`Error::Storage`] when the dead letter cannot be read, a line of it is not one
/// this crate wrote (nothing is appended then), or the append or the removal fails.
pub async fn requeue_dead_letters(spool: &Spool) -> Result<usize, Error> {
    let path = spool.dir().join(DEAD_LETTER_FILE);
    let read_path = path.clone();
    let text = blocking(move || match fs::read_to_string(&read_path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::storage("cannot read the dead letter", e)),
    })
    .await?;
    let Some(text) = text else { return Ok(0) };
    let mut lines = Vec::new();
    let mut count = 0;
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
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
        lines.extend_from_slice(entry.record.get().as_bytes());
        lines.push(b'\n');
        count += 1;
    }
    spool.append(lines, count).await?;
    let dir = spool.dir().to_owned();
    blocking(move || {
        fs::remove_file(&path)
            .and_then(|()| sync_dir(&dir))
            .map_err(|e| Error::storage("cannot remove the requeued dead letter", e))
    })
    .await?;
    spool.dead_letters_requeued();
    Ok(usize::try_from(count).unwrap_or(usize::MAX))
}

/// A stored line without its line end.
fn trimmed(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// Appends `line` to `name` in `dir` and syncs it (and the folder, when the file is
/// new), so that it outlives the spool's segments.
pub(crate) fn append_synced(dir: &Path, name: &str, line: &[u8]) -> Result<(), Error> {
    let path: PathBuf = dir.join(name);
    let write = || -> io::Result<()> {
        let created = !path.exists();
        let mut file: File = OpenOptions::new().append(true).create(true).open(&path)?;
        file.write_all(line)?;
        file.sync_data()?;
        if created {
            sync_dir(dir)?;
        }
        Ok(())
    };
    write().map_err(|e| Error::storage(format!("cannot append to {name}"), e))
}

/// Runs blocking file work on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(Error::storage(
            "the worker's file thread failed",
            io::Error::other(e),
        ))
    })
}

/// Runs `work` on the reader on tokio's blocking threads, and puts it back.
async fn off_thread<T: Send + 'static>(
    reader: &mut Option<SpoolReader>,
    work: impl FnOnce(&mut SpoolReader) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let mut taken = reader.take().ok_or_else(lost_reader)?;
    let (taken, result) = tokio::task::spawn_blocking(move || {
        let result = work(&mut taken);
        (taken, result)
    })
    .await
    .map_err(|e| Error::storage("the worker's file thread failed", io::Error::other(e)))?;
    *reader = Some(taken);
    result
}

fn lost_reader() -> Error {
    Error::storage(
        "the spool reader was lost",
        io::Error::other("a file operation of the worker failed; start it again with a new reader"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let policy = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(1), 9);
        let delays: Vec<u128> = (1..=6).map(|n| policy.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.delay(200), Duration::from_secs(1), "no overflow");
        assert_eq!(
            RetryPolicy::new(Duration::ZERO, Duration::ZERO, 0).attempts,
            1
        );
    }

    #[test]
    fn a_dead_letter_line_keeps_the_record_as_it_was() {
        let record =
            br#"{"receivedAt":"2026-01-01T00:00:00.000Z","secretIndex":0,"event":{"eventId":"e"}}"#;
        let line = DeadLetter {
            error: "database \"down\"",
            attempts: 3,
            delivery: "spool:1:0",
            record,
        }
        .to_line();
        let text = String::from_utf8(line).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(value["error"], "database \"down\"");
        assert_eq!(value["attempts"], 3);
        assert_eq!(value["record"]["event"]["eventId"], "e");
        assert!(text.ends_with("}\n") && text.contains(std::str::from_utf8(record).unwrap_or("!")));
    }
}
