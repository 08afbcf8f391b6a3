//! `Worker`: [`run_worker`](super::run_worker) on a thread of its own, restarted
//! after a failure or a panic, logged, and stopped with
//! [`Worker::shutdown`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Abandon, EventHandler, HandlerError, WorkerConfig, flow};
use crate::gate::DecisionStore;
use crate::log_budget::LogBudget;
use crate::store::Sources;
use crate::{Decision, Error, Event};

/// A failed run starts again after this long, then twice as long after each
/// further failure, up to [`RESTART_AT_MOST_AFTER`].
const RESTART_AFTER: Duration = Duration::from_secs(1);
const RESTART_AT_MOST_AFTER: Duration = Duration::from_secs(8);
/// At most so many skipped events are logged a second, of each kind.
const SKIPS_LOGGED_PER_SECOND: u32 = 10;
/// The name of the worker's thread.
const THREAD_NAME: &str = "comapi-worker";
/// How long [`Worker::shutdown`] takes at most, by default: 25 s, inside the 30 s
/// that Heroku (and Kubernetes, by default) waits between SIGTERM and SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// The worker on a thread of its own: it runs [`run_worker`](super::run_worker)
/// over its [`Sources`], and when a run fails (a full disk, Redis down) or panics,
/// it logs the error and starts again a second later (then after 2, 4, 8, 8… s
/// while it keeps failing; one line when it runs again) from what was last
/// acknowledged; events processed since then come again, and the gate calls them
/// duplicates. It logs through `tracing`: failed attempts at `warn`, dead letters
/// and records set aside at `error`, skipped events at `info` (expired ones at
/// `warn`: a replay, or this machine's clock is off).
///
/// On Linux its thread runs at idle CPU priority (`SCHED_IDLE`): it uses the CPU
/// time requests leave, so processing never delays an acknowledgement; under
/// sustained full load it falls behind and the store holds the backlog.
///
/// ```no_run
/// use comapi_webhook::store::spool::{Spool, SpoolConfig};
/// use comapi_webhook::worker::RetryPolicy;
/// use comapi_webhook::{Event, Gate, Worker};
///
/// # async fn demo() -> Result<(), comapi_webhook::Error> {
/// let (spool, _) = Spool::open(&SpoolConfig::in_temp_dir())?;
/// let process = |event: Event<'static>| async move {
///     println!("{} {:?}", event.name(), event.message_id());
///     Ok::<(), std::io::Error>(())
/// };
/// let worker = Worker::spawn(spool, Gate::in_memory(), process, RetryPolicy::default())?;
/// // … serve requests into the spool, then:
/// worker.shutdown().await; // closes the spool and processes what it holds
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    /// Resolves (with an error: the sender is dropped) once the thread has ended.
    ended: Option<oneshot::Receiver<()>>,
    stop: Box<dyn Stop>,
    abandon: Abandon,
}

/// [`Sources::stop`], boxed.
trait Stop: std::fmt::Debug + Send + Sync {
    fn stop(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

#[derive(Debug)]
struct StopSources<T>(T);

impl<T: Sources + std::fmt::Debug> Stop for StopSources<T> {
    fn stop(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.stop())
    }
}

impl Worker {
    /// Starts the worker thread: runs of `handler` over `sources`, deciding with
    /// `store`, as `config` says (a [`RetryPolicy`](super::RetryPolicy) will do:
    /// the other settings keep their defaults).
    ///
    /// # Errors
    /// [`Error::Storage`] when the thread or its runtime cannot be started.
    pub fn spawn<T, S, H>(
        sources: T,
        store: S,
        handler: H,
        config: impl Into<WorkerConfig>,
    ) -> Result<Self, Error>
    where
        T: Sources + std::fmt::Debug,
        S: DecisionStore + 'static,
        H: EventHandler + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::storage("cannot start the worker's runtime", e))?;
        let running = sources.clone();
        let config = config.into();
        let abandon = Abandon::default();
        let abandoned = abandon.clone();
        let (ended, on_end) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || {
                let _ended = ended; // dropped when the thread ends, even by a panic
                yield_to_requests();
                let handler = Logged(handler);
                runtime.block_on(supervise(&running, &store, &handler, &config, &abandoned));
            })
            .map_err(|e| Error::storage("cannot start the worker thread", e))?;
        Ok(Worker {
            ended: Some(on_end),
            stop: Box::new(StopSources(sources)),
            abandon,
        })
    }

    /// Stops the worker within [`DEFAULT_SHUTDOWN_GRACE`]; see
    /// [`Worker::shutdown_within`].
    pub async fn shutdown(self) -> bool {
        self.shutdown_within(DEFAULT_SHUTDOWN_GRACE).await
    }

    /// Stops the worker and waits for it, for `grace` at most. A stream consumer
    /// finishes the event in hand (a retry's backoff, or a wait for an unavailable
    /// store, is cut short) and hands the rest back; a spool is closed and the
    /// worker processes what it holds. At four fifths of `grace` the worker lets go
    /// of the event in hand, however far it got, and stops. Whatever was not
    /// finished is delivered again later: by another worker, or at the next start.
    ///
    /// Returns whether the worker stopped in time. When not (a handler that blocks
    /// its thread), it is left running, and ends with the process.
    pub async fn shutdown_within(mut self, grace: Duration) -> bool {
        let Some(mut ended) = self.ended.take() else {
            return true;
        };
        // Timed on a thread of its own, so the caller's runtime needs no timer.
        let (deadline, mut at_deadline) = oneshot::channel::<()>();
        let (abandon, stopped) = (self.abandon.clone(), Arc::new(AtomicBool::new(false)));
        let done = Arc::clone(&stopped);
        let timer = std::thread::Builder::new()
            .name("comapi-shutdown".to_owned())
            .spawn(move || {
                std::thread::sleep(grace - grace / 5);
                if !done.load(Ordering::Acquire) {
                    tracing::warn!(
                        ?grace,
                        "the worker is still busy: letting go of its event in hand"
                    );
                    abandon.set();
                }
                std::thread::sleep(grace / 5);
                let _ = deadline.send(());
            });
        if timer.is_err() {
            self.abandon.set(); // no timer: let go at once rather than wait unbounded
        }
        let stopping = async {
            self.stop.stop().await;
            let _ = (&mut ended).await;
        };
        tokio::select! {
            () = stopping => {
                stopped.store(true, Ordering::Release);
                true
            }
            _ = &mut at_deadline => {
                tracing::warn!(
                    ?grace,
                    "the worker did not stop in time (a handler blocking its thread?): its event in hand comes again"
                );
                false
            }
        }
    }
}

/// Runs until the sources are stopped, starting again after a failure or a panic,
/// [`RESTART_AFTER`] later at first, then twice as long each time up to
/// [`RESTART_AT_MOST_AFTER`]. It logs a failure when the worker goes down or the
/// error changes, and one line when it runs again.
async fn supervise<T: Sources, S: DecisionStore, H: EventHandler>(
    sources: &T,
    store: &S,
    handler: &H,
    config: &WorkerConfig,
    abandon: &Abandon,
) {
    let health = Health::default();
    loop {
        let run = async {
            let source = sources.open().await?;
            flow::run_with(source, store, handler, config, abandon, &health).await
        };
        let error = match super::CatchUnwind(Box::pin(run)).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.report().to_string(),
            Err(panic) => format!("the worker panicked: {}", super::panic_text(&*panic)),
        };
        let stopped = || sources.is_stopped() || abandon.is_set();
        if stopped() {
            tracing::error!(%error, "worker stopped");
            return;
        }
        let wait = health.failed(error);
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until && !stopped() {
            tokio::time::sleep(Duration::from_millis(100).min(wait)).await;
        }
    }
}

/// Whether the worker's runs fail, for its log: one line when it goes down or the
/// error changes, one when it runs again.
#[derive(Debug, Default)]
pub(super) struct Health {
    down: AtomicBool,
    failing: Mutex<Option<Failing>>,
}

#[derive(Debug)]
struct Failing {
    since: Instant,
    runs: u32,
    last: String,
    wait: Duration,
    /// When the current run first got a batch from its source.
    read_at: Option<Instant>,
}

/// A run that keeps reading this long after its first batch runs again: one that
/// reads and then fails to acknowledge (a full disk) is still down.
const UP_AFTER: Duration = Duration::from_secs(1);

impl Health {
    /// A run failed: logs it if it is news, and returns how long to wait.
    fn failed(&self, error: String) -> Duration {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        self.down.store(true, Ordering::Release);
        match &mut *failing {
            Some(failing) => {
                failing.runs += 1;
                failing.wait = (failing.wait * 2).min(RESTART_AT_MOST_AFTER);
                failing.read_at = None;
                if failing.last == error {
                    tracing::debug!(%error, retry_in = %shown(failing.wait), "worker failed again");
                } else {
                    tracing::error!(%error, retry_in = %shown(failing.wait), "worker failed; retrying");
                    failing.last = error;
                }
                failing.wait
            }
            None => {
                tracing::error!(%error, retry_in = %shown(RESTART_AFTER), "worker failed; retrying");
                *failing = Some(Failing {
                    since: Instant::now(),
                    runs: 1,
                    last: error,
                    wait: RESTART_AFTER,
                    read_at: None,
                });
                RESTART_AFTER
            }
        }
    }

    /// The source handed out a batch: after a failure, the worker runs again once
    /// it keeps reading for [`UP_AFTER`]; that is logged once.
    pub(super) fn up(&self) {
        if !self.down.load(Ordering::Acquire) {
            return;
        }
        let mut guard = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(failing) = guard.as_mut() else {
            return;
        };
        let read_at = *failing.read_at.get_or_insert_with(Instant::now);
        if read_at.elapsed() >= UP_AFTER {
            tracing::info!(
                down_for = %shown(failing.since.elapsed()),
                failed_runs = failing.runs,
                "worker running again"
            );
            *guard = None;
            self.down.store(false, Ordering::Release);
        }
    }
}

/// A duration as a log shows it: `6.593s`, not Debug's `6.593468587s`.
fn shown(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    ))
}

/// A handler whose callbacks are also logged.
struct Logged<H>(H);

impl<H: EventHandler> EventHandler for Logged<H> {
    fn handle(
        &self,
        event: Event<'static>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self.0.handle(event)
    }

    fn skipped(&self, event: &Event<'_>, decision: Decision) {
        // A flood of replays or retries logs at most so many lines a second.
        static EXPIRED: LogBudget = LogBudget::new(
            SKIPS_LOGGED_PER_SECOND,
            "event skipped: dated outside the replay window",
        );
        static OTHERS: LogBudget = LogBudget::new(SKIPS_LOGGED_PER_SECOND, "event skipped");
        if let Decision::Expired { age_secs } = decision {
            if let Some(suppressed) = EXPIRED.admit() {
                tracing::warn!(
                    event_id = %event.event_id(),
                    name = %event.name(),
                    age_secs,
                    decision = %decision.as_str(),
                    suppressed_before = suppressed,
                    "event skipped: dated outside the replay window (a replay, or check this machine's clock)"
                );
            }
        } else if let Some(suppressed) = OTHERS.admit() {
            tracing::info!(
                event_id = %event.event_id(),
                name = %event.name(),
                revision = event.revision(),
                decision = %decision.as_str(),
                suppressed_before = suppressed,
                "event skipped"
            );
        }
        self.0.skipped(event, decision);
    }

    fn attempt_failed(&self, event: &Event<'_>, error: &str, attempt: u32, retry_in: Duration) {
        let due_at = humantime::format_rfc3339_millis(std::time::SystemTime::now() + retry_in);
        tracing::warn!(
            event_id = %event.event_id(),
            name = %event.name(),
            %error,
            attempt,
            %due_at,
            "processing failed; moved to the retry schedule"
        );
        self.0.attempt_failed(event, error, attempt, retry_in);
    }

    fn dead_lettered(&self, event: &Event<'_>, error: &str, attempts: u32) {
        tracing::error!(
            event_id = %event.event_id(),
            %error,
            attempts,
            "processing failed for good: kept in the dead letter (requeue it once fixed)"
        );
        self.0.dead_lettered(event, error, attempts);
    }

    fn set_aside(&self, line: &[u8], error: &Error) {
        tracing::error!(
            error = %error.report(),
            bytes = line.len(),
            "a stored record is not an event: kept in rejected.jsonl in the spool folder (on Redis, in the dead-letter stream), skipped"
        );
        self.0.set_aside(line, error);
    }
}

/// Puts the calling thread (the worker) at idle CPU priority, Linux's `SCHED_IDLE`.
fn yield_to_requests() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        if let Err(error) = set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Min,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
        ) {
            tracing::warn!(%error, "the worker keeps its normal CPU priority");
        }
    }
}
