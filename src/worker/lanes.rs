//! The lanes: each entity's events, one at a time in stored order, with up to
//! `concurrency` handler calls in flight across lanes, and the completer that
//! completes the claims of what was processed, many in one call.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, Semaphore};

use super::keeper::Claims;
use super::{ASK_AGAIN_AFTER, Abandon, EventHandler, WorkerConfig, attempt_once, unless};
use crate::gate::DecisionStore;
use crate::{Decision, Event};

/// What became of a stored event, as far as the worker took it.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Skipped, set aside, dead-lettered or processed and completed: acknowledge it.
    Done,
    /// Failed its last attempt: dead-letter it, release its claim, acknowledge it.
    Failed {
        event: Box<Event<'static>>,
        error: String,
        attempts: u32,
    },
    /// Failed with attempts left: move it into the source's retry schedule, due
    /// after `retry_in`, release its claim, acknowledge it.
    Retry {
        event: Box<Event<'static>>,
        error: String,
        attempts: u32,
        retry_in: std::time::Duration,
        /// `retry_in` after the attempt failed.
        due: SystemTime,
    },
    /// Not finished (the worker is stopping): it comes again.
    Unfinished,
    /// Processed, its claim being completed (never in the window: the completer
    /// reports `Done` or `Unfinished`).
    Completing,
}

/// A fresh (or busy) event waiting in its entity's lane.
pub(super) struct Item {
    pub(super) seq: u64,
    pub(super) event: Event<'static>,
    pub(super) delivery: String,
    pub(super) received_at: Option<SystemTime>,
    pub(super) decision: Decision,
    /// Handler calls made before this delivery (kept in the retry schedule).
    pub(super) attempts: u32,
}

/// The events of one entity still to handle; `closed` once its future ended.
pub(super) struct Lane {
    pub(super) key: LaneKey,
    pub(super) queue: VecDeque<Item>,
    pub(super) closed: bool,
}

/// Which lane an event goes to: a hash of its entity (two entities that collide
/// share a lane, which costs concurrency, never order), or one of its own.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum LaneKey {
    Entity(u64),
    Alone(u64),
}

pub(super) type Running<'a> = FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>;

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can leave the data half-updated on a panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the lanes share.
pub(super) struct Lanes<'w, S, H> {
    pub(super) store: &'w S,
    pub(super) handler: &'w H,
    pub(super) config: &'w WorkerConfig,
    pub(super) abandon: &'w Abandon,
    pub(super) permits: Semaphore,
    pub(super) claims: Claims,
    /// The source asked to stop: start nothing new.
    pub(super) stopping: AtomicBool,
    pub(super) results: Mutex<Vec<(u64, Outcome)>>,
    /// Told each time the worker completed or released claims: a copy waiting for
    /// a claim this worker held asks again at once.
    pub(super) settled: Notify,
    /// Processed events whose claims the completer is to complete, and how many
    /// it has taken and not yet reported.
    pub(super) to_complete: Mutex<Vec<(u64, Event<'static>, String)>>,
    pub(super) completing: AtomicUsize,
    pub(super) completions: Notify,
    /// Lanes whose future ended, for the worker to forget.
    pub(super) ended: Mutex<Vec<LaneKey>>,
}

impl<S: DecisionStore, H: EventHandler> Lanes<'_, S, H> {
    pub(super) fn quit(&self) -> bool {
        self.stopping.load(Ordering::Acquire) || self.abandon.is_set()
    }

    pub(super) async fn run_lane(&self, lane: Arc<Mutex<Lane>>) {
        loop {
            let item = {
                let mut lane = lock(&lane);
                match lane.queue.pop_front() {
                    Some(item) => item,
                    None => {
                        lane.closed = true;
                        lock(&self.ended).push(lane.key);
                        return;
                    }
                }
            };
            let seq = item.seq;
            let outcome = self.handle(item).await;
            if !matches!(outcome, Outcome::Completing) {
                lock(&self.results).push((seq, outcome));
            }
        }
    }

    /// One event in its lane: claimed again while busy, then attempted once. A
    /// failure with attempts left goes to the retry schedule ([`Outcome::Retry`]):
    /// the lane goes on with the entity's next event meanwhile.
    pub(super) async fn handle(&self, item: Item) -> Outcome {
        let Item {
            seq,
            event,
            delivery,
            received_at,
            mut decision,
            attempts,
        } = item;
        let quit = || self.quit();
        let abandoned = || self.abandon.is_set();
        while decision == Decision::Busy {
            let wait = async {
                tokio::select! {
                    () = tokio::time::sleep(ASK_AGAIN_AFTER) => {}
                    () = self.settled.notified() => {}
                }
            };
            if unless(quit, wait).await.is_none() {
                return Outcome::Unfinished;
            }
            let claimed = self.store.claim_received(&event, &delivery, received_at);
            match unless(abandoned, claimed).await {
                None => return Outcome::Unfinished,
                Some(Ok(now)) => decision = now,
                Some(Err(_)) => {} // the store is unavailable: ask again
            }
            if decision == Decision::Fresh {
                self.claims.hold(event.event_id(), &delivery);
            }
        }
        if decision != Decision::Fresh {
            self.handler.skipped(&event, decision);
            return Outcome::Done;
        }
        let left = || {
            // Not finished: the claim expires with its lease, and the same delivery
            // may claim it again.
            self.claims.drop_claim(&delivery);
            Outcome::Unfinished
        };
        if quit() {
            return left();
        }
        let permit = match self.permits.try_acquire() {
            Ok(permit) => Some(Ok(permit)),
            Err(_) => unless(quit, self.permits.acquire()).await,
        };
        let Some(Ok(permit)) = permit else {
            return left();
        };
        // Counted where the call starts: a crash in it costs the attempt only if
        // the move below happened, so attempts continue from the stored count.
        let attempt = attempts.saturating_add(1);
        let outcome = unless(abandoned, attempt_once(self.handler, event.clone())).await;
        drop(permit);
        let error = match outcome {
            None => return left(),
            Some(Ok(())) => {
                // The completer completes its claim with others' and reports it.
                self.completing.fetch_add(1, Ordering::AcqRel);
                lock(&self.to_complete).push((seq, event, delivery));
                self.completions.notify_one();
                return Outcome::Completing;
            }
            Some(Err(error)) => error,
        };
        let retry = &self.config.retry;
        if attempt >= retry.attempts {
            Outcome::Failed {
                event: Box::new(event),
                error,
                attempts: attempt,
            }
        } else {
            Outcome::Retry {
                event: Box::new(event),
                error,
                attempts: attempt,
                retry_in: retry.delay(attempt),
                due: SystemTime::now() + retry.delay(attempt),
            }
        }
    }
}

impl<S: DecisionStore, H: EventHandler> Lanes<'_, S, H> {
    /// Completes the claims of processed events, as many as are waiting, in one
    /// call to the store, again and again for as long as the worker runs.
    pub(super) async fn completer(&self) {
        loop {
            let batch = std::mem::take(&mut *lock(&self.to_complete));
            if batch.is_empty() {
                self.completions.notified().await;
                continue;
            }
            let claims: Vec<(&Event<'_>, &str)> = batch
                .iter()
                .map(|(_, event, id)| (event, id.as_str()))
                .collect();
            let completed = loop {
                let call = self.store.complete_batch(&claims);
                match unless(|| self.abandon.is_set(), call).await {
                    None => break false,
                    Some(Ok(())) => break true,
                    Some(Err(_)) => {
                        let wait = tokio::time::sleep(ASK_AGAIN_AFTER);
                        if unless(|| self.quit(), wait).await.is_none() {
                            break false;
                        }
                    }
                }
            };
            drop(claims);
            let mut results = lock(&self.results);
            for (seq, _, id) in &batch {
                self.claims.drop_claim(id);
                let outcome = if completed {
                    Outcome::Done
                } else {
                    Outcome::Unfinished
                };
                results.push((*seq, outcome));
            }
            drop(results);
            self.completing.fetch_sub(batch.len(), Ordering::AcqRel);
            self.settled.notify_waiters();
        }
    }

    /// Whether nothing is left to report: no lane running (`running`), no result
    /// waiting, no claim being completed.
    pub(super) fn idle(&self, running: &Running<'_>) -> bool {
        running.is_empty()
            && lock(&self.results).is_empty()
            && self.completing.load(Ordering::Acquire) == 0
    }
}
