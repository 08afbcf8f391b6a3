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
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::gate::DecisionStore;
use crate::store::EventSource;
use crate::{Decision, Error, Event};

mod flow;
mod keeper;
mod lanes;
mod supervise;

pub use crate::store::Sources;
pub use supervise::{DEFAULT_SHUTDOWN_GRACE, Worker};

/// The wait after the first failure, by default.
const DEFAULT_FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between attempts, by default.
const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(60);
/// Attempts in all, by default.
const DEFAULT_ATTEMPTS: u32 = 8;
/// How long the worker waits before asking a busy or unavailable decision store again.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(1);
/// How often a worker that waits (for a handler, a retry, the store) looks whether
/// it is asked to stop.
const STOP_POLL: Duration = Duration::from_millis(50);

/// What a handler's failure is: any error, boxed.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Your processing, as [`run_worker`] calls it.
///
/// Any `Fn(Event<'static>) -> impl Future<Output = Result<(), E>>` that is `Send +
/// Sync` is one, for an error type `E` that converts into a [`HandlerError`]. The
/// worker runs up to [`WorkerConfig::concurrency`] calls at once (events of
/// different entities), so the handler takes `&self`: keep shared state behind a
/// `Mutex` or an atomic.
///
/// ```
/// use comapi_webhook::Event;
/// use comapi_webhook::worker::EventHandler;
/// fn assert_handler(_: impl EventHandler) {}
/// assert_handler(|event: Event<'static>| async move {
///     println!("{} {:?}", event.name(), event.message_id());
///     Ok::<(), std::io::Error>(())
/// });
/// ```
///
/// Implement the trait yourself to also hear of the events the gate says not to
/// process, of failed attempts, of dead letters and of damaged lines.
pub trait EventHandler: Send + Sync {
    /// Processes one event the gate says is [`Decision::Fresh`]. An error, or a
    /// panic, means "not processed": the worker moves the event into the source's
    /// retry schedule, off the line, to be tried again with backoff
    /// ([`RetryPolicy`]), and after the last attempt writes it to the dead letter.
    /// Delivery is at least once: after a crash, an event can come again even if
    /// this call succeeded, so make the processing idempotent. Events of one
    /// entity (a message, a conversation, …) come one at a time, in stored order,
    /// but for one that waits for a retry: the others go on meanwhile.
    fn handle(
        &self,
        event: Event<'static>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// An event the gate says not to process: [`Decision::Duplicate`],
    /// [`Decision::Stale`] or [`Decision::Expired`]. The default does nothing.
    fn skipped(&self, event: &Event<'_>, decision: Decision) {
        let _ = (event, decision);
    }

    /// Attempt number `attempt` at `event` failed with `error` (its text; `the
    /// handler panicked: …` for a panic), and the event is now in the source's retry
    /// schedule, durably, due after `retry_in`. The default does nothing.
    fn attempt_failed(&self, event: &Event<'_>, error: &str, attempt: u32, retry_in: Duration) {
        let _ = (event, error, attempt, retry_in);
    }

    /// `event` failed its last attempt with `error`, and is now in the source's
    /// dead letter, durably (a spool's [`DEAD_LETTER_FILE`](crate::store::spool::DEAD_LETTER_FILE),
    /// a stream's `…:dead` stream). The default does nothing: override it to raise
    /// an alert. Once the cause is fixed, requeueing brings the events back
    /// ([`requeue_dead_letters`](crate::store::spool::requeue_dead_letters) for a spool).
    fn dead_lettered(&self, event: &Event<'_>, error: &str, attempts: u32) {
        let _ = (event, error, attempts);
    }

    /// A stored record that cannot be read as an event: damaged on disk, or written
    /// in a form this version does not parse. [`run_worker`] has already had the
    /// source keep it, byte for byte and durably (`rejected.jsonl` in a spool's
    /// folder, the `…:dead` stream), and goes on with the next one; `error` says what is wrong with it. The default does
    /// nothing more. Like events, a line may come here again after a crash.
    fn set_aside(&self, line: &[u8], error: &Error) {
        let _ = (line, error);
    }
}

impl<F, Fut, E> EventHandler for F
where
    F: Fn(Event<'static>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Into<HandlerError>,
{
    fn handle(
        &self,
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
        RetryPolicy::new(DEFAULT_FIRST_DELAY, DEFAULT_MAX_DELAY, DEFAULT_ATTEMPTS)
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

/// How a worker runs: its [`RetryPolicy`], and how many handler calls it keeps in
/// flight. A [`RetryPolicy`] converts into one with the other defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// Handler calls in flight at once, each for a different entity. Default
    /// [`WorkerConfig::DEFAULT_CONCURRENCY`]; 1 handles one event at a time.
    pub concurrency: usize,
    /// Events read and not yet acknowledged, at most: how far the worker reads
    /// ahead of the oldest event it has not finished. An event waiting for a retry
    /// is not among them (it waits in the retry schedule), so only a handler call
    /// in progress, or a copy busy elsewhere, holds the window. Default
    /// [`WorkerConfig::DEFAULT_WINDOW`].
    pub window: usize,
}

impl WorkerConfig {
    /// 32 handler calls in flight: enough for handlers that wait on I/O.
    pub const DEFAULT_CONCURRENCY: usize = 32;
    /// 4,096 events read ahead.
    pub const DEFAULT_WINDOW: usize = 4096;

    /// The same settings with another concurrency (at least 1).
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The same settings with another window (at least 1).
    #[must_use]
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        RetryPolicy::default().into()
    }
}

impl From<RetryPolicy> for WorkerConfig {
    fn from(retry: RetryPolicy) -> Self {
        WorkerConfig {
            retry,
            concurrency: Self::DEFAULT_CONCURRENCY,
            window: Self::DEFAULT_WINDOW,
        }
    }
}

/// Runs the processing loop over `source` (a [`SpoolReader`](crate::store::spool::SpoolReader),
/// or a Redis stream consumer) until it is finished: a closed spool read to its
/// end, or a consumer asked to stop.
///
/// It reads a batch, claims all of its events from `store` in one call (each
/// with its delivery's id, a spool position or a stream entry id, and its receipt
/// time; see [`DecisionStore`]), and hands the fresh ones to the handler, up to
/// [`WorkerConfig::concurrency`] at once: events of one entity (what the gate
/// orders by revision: the message, the conversation, …) one at a time and in
/// stored order, events of different entities side by side. It reads on while
/// they run, up to [`WorkerConfig::window`] events ahead.
/// - [`Decision::Fresh`]: `handler.handle`; the claims of the events processed
///   are completed together, in one call. On an error or a panic with attempts
///   left, the event moves into the source's durable retry schedule
///   ([`EventSource::schedule_retry`]) with its attempts, its error and the time
///   the policy's delay makes it due, its claim is released, and the line moves
///   on past it at once: a failing event holds nothing behind it, not even its
///   own entity. When due, whichever worker asks first gets it and claims it again
///   like any event; the attempts go on from the stored count. After the last
///   attempt it goes to the source's dead letter.
///
///   Events of one entity may therefore overtake one waiting for its retry: a
///   later revision processed meanwhile makes the waiting one [`Decision::Stale`]
///   when it comes back (the gate never lets a lower revision run after a higher
///   one), and it is skipped as superseded. Events without a revision keep no
///   order across a retry.
///
///   **Order is per worker.** Lanes order one worker's events. Several workers
///   reading one Redis stream or RabbitMQ queue share the events of an entity
///   between them, and may run two revisions of it at once, even with the gate in
///   Redis: the gate makes sure a lower revision never runs after a higher one has
///   (it is `Stale` then), not that they never overlap. A handler that needs one
///   entity's events one at a time across workers must lock the entity itself,
///   or run one worker.
/// - [`Decision::Busy`] (another copy is being processed elsewhere): claimed again
///   a second later, until completed there (`Duplicate`) or its lease passes
///   (`Fresh`); its entity waits meanwhile.
/// - Anything else: [`EventHandler::skipped`].
///
/// Attempts are counted where a handler call starts, and stored with the event
/// when it moves; a hand-back on a stop or a crash before a call started costs
/// none. A copy handed out twice the policy's attempts and at least 20 times
/// without being finished (workers crashed in its handler) goes to the dead letter
/// without another attempt. While the
/// decision store is unavailable (Redis down), it waits a second and asks again: no
/// event is skipped. A stored record that cannot be read as an event is set aside
/// by the source and [`EventHandler::set_aside`] is told.
///
/// Events are acknowledged to the source in stored order, each only once it and
/// every event before it were processed, skipped, dead-lettered or set aside: after
/// a crash, processing resumes from the first one that was not, and the same
/// delivery claims its event again.
///
/// # Errors
/// When the source cannot be read, or a record not set aside, an event not
/// dead-lettered, or an acknowledgement not stored. What was acknowledged was
/// processed; run it again with a new source to resume. Before it returns the
/// error, the claims of what was processed are completed in the decision store
/// (for up to 5 s), so that the copies the next source hands out again are
/// [`Decision::Duplicate`], not handled twice.
///
/// ```no_run
/// use comapi_webhook::store::spool::{Spool, SpoolConfig};
/// use comapi_webhook::worker::{RetryPolicy, WorkerConfig, run_worker};
/// use comapi_webhook::{Event, Gate};
///
/// async fn process(event: Event<'static>) -> Result<(), std::io::Error> {
///     println!("{} {:?}", event.name(), event.message_id());
///     Ok(())
/// }
///
/// # async fn demo() -> Result<(), comapi_webhook::Error> {
/// let (spool, _) = Spool::open(&SpoolConfig::in_temp_dir())?;
/// let config = WorkerConfig::from(RetryPolicy::default()).with_concurrency(16);
/// run_worker(spool.reader()?, &Gate::in_memory(), process, config).await?;
/// # Ok(()) }
/// ```
pub async fn run_worker<Src, S, H>(
    source: Src,
    store: &S,
    handler: H,
    config: impl Into<WorkerConfig>,
) -> Result<(), Error>
where
    Src: EventSource,
    S: DecisionStore,
    H: EventHandler,
{
    let health = supervise::Health::default();
    flow::run_with(
        source,
        store,
        &handler,
        &config.into(),
        &Abandon::default(),
        &health,
    )
    .await
}

/// Asks a running worker to let go of its events in hand at once (a supervisor's
/// grace period ran out): their handlers are dropped, a backoff or a wait for the
/// store cut short, and the events left unfinished, to be delivered again.
#[derive(Debug, Clone, Default)]
pub(crate) struct Abandon(Arc<AtomicBool>);

impl Abandon {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Runs `work` to its end, or until `quit` says to stop (it is asked every
/// [`STOP_POLL`], the first time once `work` had that long): `None` then.
async fn unless<T>(quit: impl Fn() -> bool, work: impl Future<Output = T>) -> Option<T> {
    let mut work = std::pin::pin!(work);
    // Work that is done at once (a handler that does not wait) costs no timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    if let Poll::Ready(done) = first {
        return Some(done);
    }
    loop {
        if let Ok(done) = tokio::time::timeout(STOP_POLL, &mut work).await {
            return Some(done);
        }
        if quit() {
            return None;
        }
    }
}

/// One attempt at the handler, with a panic (in the call or in its future) caught
/// and turned into an error's text.
async fn attempt_once<H: EventHandler>(handler: &H, event: Event<'static>) -> Result<(), String> {
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
}
