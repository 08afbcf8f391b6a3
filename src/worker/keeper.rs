//! The keep-alive thread: renews what the worker holds (the source's deliveries,
//! the gate's claims) on a thread and runtime of its own, so that no handler, even
//! one that blocks its thread, can let a lease run out while the worker is still on
//! its event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::gate::KeepAlive;

/// The claims the worker holds now, by delivery (each names one stored copy) with
/// its event id, shared with the keep-alive thread; kept only for a store whose
/// claims need renewing.
#[derive(Debug, Clone, Default)]
pub(super) struct Claims(Option<Arc<Mutex<HashMap<String, String>>>>);

impl Claims {
    /// Claims to keep track of when `renewed`, none otherwise.
    pub(super) fn new(renewed: bool) -> Self {
        Claims(renewed.then(Arc::default))
    }

    /// The worker holds a claim on `event_id` for `delivery`.
    pub(super) fn hold(&self, event_id: &str, delivery: &str) {
        if let Some(held) = &self.0 {
            lock(held).insert(delivery.to_owned(), event_id.to_owned());
        }
    }

    /// The worker no longer holds `delivery`'s claim (completed, released, or left
    /// to expire).
    pub(super) fn drop_claim(&self, delivery: &str) {
        if let Some(held) = &self.0 {
            lock(held).remove(delivery);
        }
    }

    /// `(event id, delivery)` pairs.
    fn snapshot(&self) -> Vec<(String, String)> {
        self.0.as_ref().map_or_else(Vec::new, |held| {
            lock(held)
                .iter()
                .map(|(delivery, event_id)| (event_id.clone(), delivery.clone()))
                .collect()
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map half-updated.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running keep-alive thread; dropping it stops the thread (without waiting
/// for a renewal in flight, which ends by its own deadline).
#[derive(Debug)]
pub(super) struct Keeper {
    stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Starts a thread that calls each of `keep_alives` at its own pace with the
    /// claims in `claims`; `None` when there is nothing to keep alive, or the
    /// thread cannot start (then leases are not renewed: at worst another worker
    /// takes an event over, at least once as always).
    pub(super) fn start(keep_alives: Vec<KeepAlive>, claims: Claims) -> Option<Keeper> {
        if keep_alives.is_empty() {
            return None;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .inspect_err(|error| tracing::warn!(%error, "no keep-alive thread"))
            .ok()?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopped);
        let thread = std::thread::Builder::new()
            .name("comapi-keep-alive".to_owned())
            .spawn(move || run(&runtime, keep_alives, &claims, &stop))
            .inspect_err(|error| tracing::warn!(%error, "no keep-alive thread"))
            .ok()?;
        Some(Keeper {
            stopped,
            thread: Some(thread),
        })
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
        }
    }
}

fn run(
    runtime: &tokio::runtime::Runtime,
    mut keep_alives: Vec<KeepAlive>,
    claims: &Claims,
    stopped: &AtomicBool,
) {
    let start = Instant::now();
    let mut due: Vec<Instant> = keep_alives.iter().map(|k| start + k.every()).collect();
    loop {
        let Some(next) = due.iter().min().copied() else {
            return;
        };
        while Instant::now() < next {
            if stopped.load(Ordering::Acquire) {
                return;
            }
            std::thread::park_timeout(next.saturating_duration_since(Instant::now()));
        }
        if stopped.load(Ordering::Acquire) {
            return;
        }
        let held = claims.snapshot();
        for (keep_alive, due) in keep_alives.iter_mut().zip(&mut due) {
            if *due > Instant::now() {
                continue;
            }
            let every = keep_alive.every();
            let renewal = keep_alive.renew(&held);
            // Best effort, and never longer than one interval: a renewal missed
            // at worst lets another worker take an event over.
            match runtime.block_on(async { tokio::time::timeout(every, renewal).await }) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(error = %error.report(), "a renewal failed"),
                Err(_) => tracing::debug!("a renewal timed out"),
            }
            *due = Instant::now() + every;
        }
    }
}
