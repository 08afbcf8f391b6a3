//! The flow of stored events through a worker: it reads ahead, claims each batch
//! in one call, runs every entity's events in stored order on a lane of their own
//! with up to `concurrency` handlers in flight across lanes, completes the claims
//! of what was processed together, and acknowledges in stored order.
//!
//! The lanes (`lanes.rs`) are futures polled by the worker's one task, also while
//! it waits for the source or the store ([`drive`]), so no handler waits on a
//! read, and no read is ever cancelled halfway.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::hash::{BuildHasher, RandomState};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Notify, Semaphore};

use super::keeper::{Claims, Keeper};
use super::lanes::{Item, Lane, LaneKey, Lanes, Outcome, Running, lock};
use super::supervise::Health;
use super::{ASK_AGAIN_AFTER, Abandon, EventHandler, WorkerConfig, unless};
use crate::gate::DecisionStore;
use crate::store::{Delivery, EventSource, RetryDue};
use crate::{Decision, Error, Event};

/// A stored event read and not yet acknowledged.
struct Entry<D> {
    delivery: D,
    /// Its delivery id, unless the record is not an event.
    id: Option<String>,
    /// `None` while its lane (or the completer) is on it.
    outcome: Option<Outcome>,
}

/// The lanes and the completer, polled together while the worker waits.
struct Pump<'a> {
    running: Running<'a>,
    completer: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
}

/// Runs `work` to its end while the lanes go on.
async fn drive<T>(pump: &mut Pump<'_>, work: impl Future<Output = T>) -> T {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        pump.poll(cx);
        Poll::Pending
    })
    .await
}

impl Pump<'_> {
    /// Polls the lanes and the completer (which never ends).
    fn poll(&mut self, cx: &mut std::task::Context<'_>) {
        while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
        let _ = self.completer.as_mut().poll(cx);
    }
}

/// Lets the lanes and the completer run until there is a result, or nothing is
/// left to report.
async fn next_result<S: DecisionStore, H: EventHandler>(
    pump: &mut Pump<'_>,
    lanes: &Lanes<'_, S, H>,
) {
    poll_fn(|cx| {
        pump.poll(cx);
        if !lock(&lanes.results).is_empty() || lanes.idle(&pump.running) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Runs a store call until it succeeds, a second apart, the lanes going on
/// meanwhile; `None` when the worker stops first (`quit`).
async fn retrying<T, F, Fut>(
    pump: &mut Pump<'_>,
    abandon: &Abandon,
    quit: &(dyn Fn() -> bool + Sync),
    mut call: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    loop {
        match drive(pump, unless(|| abandon.is_set(), call())).await? {
            Ok(done) => return Some(done),
            Err(_) => {
                let wait = unless(quit, tokio::time::sleep(ASK_AGAIN_AFTER));
                drive(pump, wait).await?;
            }
        }
    }
}

/// How long a run that failed waits for the claims of what it processed to be
/// completed before its lanes go.
const COMPLETE_WITHIN: Duration = Duration::from_secs(5);

/// Lets the completer complete the claims already queued (the lanes start nothing
/// new: they are stopping), for at most [`COMPLETE_WITHIN`].
async fn complete_finished<S: DecisionStore, H: EventHandler>(
    pump: &mut Pump<'_>,
    lanes: &Lanes<'_, S, H>,
) {
    let completed = poll_fn(|cx| {
        pump.poll(cx);
        if lanes.completing.load(Ordering::Acquire) == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    let _ = tokio::time::timeout(COMPLETE_WITHIN, completed).await;
}

/// The events read and not acknowledged, and the lanes they are in.
struct Flow<D> {
    /// The events read and not acknowledged, in order; the first is number `base`.
    window: VecDeque<Entry<D>>,
    base: u64,
    lanes: HashMap<LaneKey, Arc<Mutex<Lane>>>,
    hasher: RandomState,
}

/// See [`run_worker`](super::run_worker).
/// How often a paused worker with nothing in hand looks at the pause again.
const PAUSE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

pub(super) async fn run_with<Src, S, H>(
    mut source: Src,
    store: &S,
    handler: &H,
    config: &WorkerConfig,
    abandon: &Abandon,
    health: &Health,
) -> Result<(), Error>
where
    Src: EventSource,
    S: DecisionStore,
    H: EventHandler,
{
    let (source_keeps, store_keeps) = (source.keep_alive(), store.keep_alive());
    let lanes = Lanes {
        store,
        handler,
        config,
        abandon,
        permits: Semaphore::new(config.concurrency.max(1)),
        claims: Claims::new(store_keeps.is_some()),
        stopping: AtomicBool::new(false),
        results: Mutex::default(),
        settled: Notify::new(),
        to_complete: Mutex::default(),
        completing: AtomicUsize::new(0),
        completions: Notify::new(),
        ended: Mutex::default(),
    };
    let keep_alives = [source_keeps, store_keeps].into_iter().flatten().collect();
    let _keeper = Keeper::start(keep_alives, lanes.claims.clone());
    let mut flow = Flow {
        window: VecDeque::new(),
        base: 0,
        lanes: HashMap::new(),
        hasher: RandomState::new(),
    };
    let mut pump = Pump {
        running: FuturesUnordered::new(),
        completer: Box::pin(lanes.completer()),
    };
    let read = async {
        let mut exhausted = false;
        loop {
            let stopping = source.stopping() || abandon.is_set();
            lanes.stopping.store(stopping, Ordering::Release);
            // Handlers in flight go on while the pause is read (a broker may be slow).
            let paused = !stopping && !exhausted && drive(&mut pump, source.paused()).await;
            if flow.settle(&lanes, &mut source, &mut pump).await? {
                // A retry was scheduled: a finished source may hand it out yet (a
                // closed spool serves its retries before it ends).
                exhausted = false;
            }
            let idle = lanes.idle(&pump.running);
            if idle && (exhausted || stopping) {
                break;
            }
            if !exhausted && !stopping && !paused && flow.window.len() < config.window.max(1) {
                match drive(&mut pump, source.next_batch()).await? {
                    None => exhausted = true,
                    Some(batch) => {
                        health.up();
                        flow.admit(batch, &lanes, &mut source, &mut pump).await?;
                    }
                }
                continue;
            }
            if idle && paused {
                // Nothing in hand: look at the pause again in a while.
                drive(&mut pump, tokio::time::sleep(PAUSE_POLL)).await;
                continue;
            }
            if idle {
                break; // stopping, or the window's head can go no further
            }
            next_result(&mut pump, &lanes).await;
        }
        Ok::<(), Error>(())
    }
    .await;
    if let Err(error) = read {
        // The lanes go with this run: first the claims of what was processed are
        // completed, so that the copies the source hands out again are duplicates.
        lanes.stopping.store(true, Ordering::Release);
        complete_finished(&mut pump, &lanes).await;
        return Err(error);
    }
    source.flush().await
}

impl<D: Delivery + Send + Sync> Flow<D> {
    /// Takes in a batch the source handed out: sets aside what is not an event,
    /// dead-letters what was handed out too often, claims the rest in one call and
    /// puts the fresh and busy ones in their lanes.
    async fn admit<'a, Src, S, H>(
        &mut self,
        batch: Vec<D>,
        lanes: &'a Lanes<'_, S, H>,
        source: &mut Src,
        pump: &mut Pump<'a>,
    ) -> Result<(), Error>
    where
        Src: EventSource<Delivery = D>,
        S: DecisionStore,
        H: EventHandler,
    {
        let attempts = lanes.config.retry.attempts;
        // The events to claim: number, event, delivery id, receipt time, attempts made.
        let mut asked: Vec<(u64, Event<'static>, String, Option<SystemTime>, u32)> = Vec::new();
        for delivery in batch {
            let seq = self.base + self.window.len() as u64;
            let event = match delivery.event() {
                Ok(event) => event.into_owned(),
                Err(error) => {
                    drive(pump, source.set_aside(&delivery, &error)).await?;
                    lanes.handler.set_aside(delivery.record(), &error);
                    self.window.push_back(done(delivery, None));
                    continue;
                }
            };
            let id = delivery.id().into_owned();
            let (times, made) = (delivery.times_delivered(), delivery.attempts());
            let given_up = if times > redelivery_limit(attempts) {
                Some(format!(
                    "handed to a worker {times} times without being finished (did workers crash processing it?)"
                ))
            } else if made >= attempts {
                Some(format!(
                    "{made} attempts made already, the retry policy allows {attempts}"
                ))
            } else {
                None
            };
            if let Some(error) = given_up {
                drive(pump, source.dead_letter(&delivery, &error, made)).await?;
                lanes.handler.dead_lettered(&event, &error, made);
                self.window.push_back(done(delivery, Some(id)));
                continue;
            }
            let received_at = delivery.received_at();
            self.window.push_back(Entry {
                delivery,
                id: Some(id.clone()),
                outcome: None,
            });
            asked.push((seq, event, id, received_at, made));
        }
        if asked.is_empty() {
            return Ok(());
        }
        let claims: Vec<(&Event<'_>, &str, Option<SystemTime>)> = asked
            .iter()
            .map(|(_, event, id, received_at, _)| (event, id.as_str(), *received_at))
            .collect();
        let quit = || source.stopping() || lanes.abandon.is_set();
        let call = || lanes.store.claim_batch(&claims);
        let decisions = retrying(pump, lanes.abandon, &quit, call).await;
        drop(claims);
        let decisions = match decisions {
            Some(decisions) if decisions.len() == asked.len() => decisions,
            _ => {
                for (seq, ..) in &asked {
                    self.outcome(*seq, Outcome::Unfinished);
                }
                return Ok(());
            }
        };
        for ((seq, event, id, received_at, attempts), decision) in asked.into_iter().zip(decisions)
        {
            match decision {
                Decision::Fresh | Decision::Busy => {
                    if decision == Decision::Fresh {
                        lanes.claims.hold(event.event_id(), &id);
                    }
                    let key = match event.entity_id() {
                        Some(entity) => {
                            LaneKey::Entity(self.hasher.hash_one((event.kind().family(), entity)))
                        }
                        None => LaneKey::Alone(seq),
                    };
                    let item = Item {
                        seq,
                        event,
                        delivery: id,
                        received_at,
                        decision,
                        attempts,
                    };
                    self.push(key, item, lanes, pump);
                }
                other => {
                    lanes.handler.skipped(&event, other);
                    self.outcome(seq, Outcome::Done);
                }
            }
        }
        Ok(())
    }

    /// Puts `item` at the end of its lane, starting the lane if it is not running.
    fn push<'a, S: DecisionStore, H: EventHandler>(
        &mut self,
        key: LaneKey,
        item: Item,
        lanes: &'a Lanes<'_, S, H>,
        pump: &mut Pump<'a>,
    ) {
        if let Some(lane) = self.lanes.get(&key) {
            let mut open = lock(lane);
            if !open.closed {
                open.queue.push_back(item);
                return;
            }
        }
        let lane = Arc::new(Mutex::new(Lane {
            key,
            queue: VecDeque::from([item]),
            closed: false,
        }));
        self.lanes.insert(key, Arc::clone(&lane));
        pump.running.push(Box::pin(lanes.run_lane(lane)));
    }

    fn outcome(&mut self, seq: u64, outcome: Outcome) {
        let at = seq
            .checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok());
        if let Some(entry) = at.and_then(|at| self.window.get_mut(at)) {
            entry.outcome = Some(outcome);
        }
    }

    /// Takes the lanes' and the completer's results: moves what failed into the
    /// retry schedule or, after its last attempt, the dead letter, releasing their
    /// claims in one call, then acknowledges, in stored order, every finished
    /// event up to the first one that is not. Whether a retry was scheduled.
    async fn settle<'a, Src, S, H>(
        &mut self,
        lanes: &'a Lanes<'_, S, H>,
        source: &mut Src,
        pump: &mut Pump<'a>,
    ) -> Result<bool, Error>
    where
        Src: EventSource<Delivery = D>,
        S: DecisionStore,
        H: EventHandler,
    {
        let mut retried = false;
        let results = std::mem::take(&mut *lock(&lanes.results));
        // Events that failed an attempt: to the dead letter or the retry schedule.
        let mut moved = Vec::new();
        for (seq, outcome) in results {
            match outcome {
                Outcome::Failed { .. } | Outcome::Retry { .. } => moved.push((seq, outcome)),
                outcome => self.outcome(seq, outcome),
            }
        }
        let mut given_up: Vec<(u64, Box<Event<'static>>)> = Vec::new();
        for (seq, outcome) in moved {
            let Some(entry) = self.entry(seq) else {
                continue;
            };
            match outcome {
                Outcome::Failed {
                    event,
                    error,
                    attempts,
                } => {
                    drive(pump, source.dead_letter(&entry.delivery, &error, attempts)).await?;
                    lanes.handler.dead_lettered(&event, &error, attempts);
                    given_up.push((seq, event));
                }
                Outcome::Retry {
                    event,
                    error,
                    attempts,
                    retry_in,
                    due,
                } => {
                    let retry = RetryDue {
                        attempts,
                        error: &error,
                        due,
                    };
                    drive(pump, source.schedule_retry(&entry.delivery, &retry)).await?;
                    retried = true;
                    // What is left of the wait, so that a log says the due time kept.
                    let retry_in = due
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                        .min(retry_in);
                    lanes
                        .handler
                        .attempt_failed(&event, &error, attempts, retry_in);
                    given_up.push((seq, event));
                }
                _ => {}
            }
        }
        if !given_up.is_empty() {
            // Best effort: if the store cannot hear it, the claims expire with their
            // lease. A retry claims its event again when it is due.
            let claims: Vec<(&Event<'_>, &str)> = given_up
                .iter()
                .filter_map(|(seq, event)| Some((&**event, self.id(*seq)?)))
                .collect();
            let _ = drive(pump, lanes.store.release_batch(&claims)).await;
            drop(claims);
            for (seq, _) in given_up {
                if let Some(id) = self.id(seq) {
                    lanes.claims.drop_claim(id);
                }
                self.outcome(seq, Outcome::Done);
            }
        }
        while self
            .window
            .front()
            .is_some_and(|entry| matches!(entry.outcome, Some(Outcome::Done)))
        {
            let Some(entry) = self.window.pop_front() else {
                break;
            };
            self.base += 1;
            drive(pump, source.finished(&entry.delivery)).await?;
        }
        // Lanes that ended are forgotten, unless a new one took the key meanwhile.
        for key in std::mem::take(&mut *lock(&lanes.ended)) {
            if self.lanes.get(&key).is_some_and(|lane| lock(lane).closed) {
                self.lanes.remove(&key);
            }
        }
        lanes.settled.notify_waiters();
        Ok(retried)
    }

    /// Event number `seq`, while it is in the window.
    fn entry(&self, seq: u64) -> Option<&Entry<D>> {
        let at = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.window.get(at)
    }

    /// The delivery id of event number `seq`.
    fn id(&self, seq: u64) -> Option<&str> {
        self.entry(seq)?.id.as_deref()
    }
}

/// How many times a copy may be handed to a worker without being finished
/// (workers crashed in its handler, or handed it back on a stop) before it goes to
/// the dead letter: a backstop against an event that kills workers, well above the
/// attempts, which are counted where a handler call starts.
fn redelivery_limit(attempts: u32) -> u32 {
    attempts.saturating_mul(2).max(20)
}

/// An entry finished as it was read.
fn done<D>(delivery: D, id: Option<String>) -> Entry<D> {
    Entry {
        delivery,
        id,
        outcome: Some(Outcome::Done),
    }
}
