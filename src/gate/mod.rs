//! The revision gate: claims on events, telling fresh ones from retried duplicates,
//! stale and expired ones, made final once processed.
//!
//! # Design
//!
//! A decision is a claim with a lease, made final ([`DecisionStore::complete`]) only
//! after the handler succeeded. Recording the decision before the handler ran would
//! lose the event whenever the worker crashed in between, or the store's reply to the
//! claim was lost: the next attempt would read `Duplicate`. With a claim, the same
//! delivery claiming again gets `Fresh` again, and a claim nobody completes expires
//! after its lease. Both stores, in memory and Redis, follow the same rule.

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::event::Family;
use crate::{Error, Event};

/// `with_lease` and `with_replay_window` for a gate's settings, which both stores share.
macro_rules! claim_settings {
    ($config:ident) => {
        impl $config {
            /// The same settings with another lease: how long a claim holds when nobody
            /// completes or releases it (at least one millisecond on Redis).
            #[must_use]
            pub fn with_lease(mut self, lease: std::time::Duration) -> Self {
                self.lease = lease;
                self
            }

            /// The same settings with another replay window (for Redis, keep its
            /// `max_age` no longer than the TTL: a replay older than the TTL but inside
            /// the window would pass as fresh).
            #[must_use]
            pub fn with_replay_window(mut self, replay_window: $crate::gate::ReplayWindow) -> Self {
                self.replay_window = replay_window;
                self
            }
        }
    };
}

mod memory;
#[cfg(feature = "redis")]
mod redis_store;
pub use memory::{Gate, GateConfig};
#[cfg(all(feature = "redis", feature = "receiver"))]
pub(crate) use redis_store::OwnConnection;
#[cfg(feature = "redis")]
pub use redis_store::{RedisGate, RedisGateConfig};

/// How long a claim holds when nobody completes or releases it: 60 seconds.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// What to do with an event, decided by a [`Gate`] (or a `RedisGate` shared by
/// many processes).
///
/// Comapi delivers at least once, so an `eventId` can come again when Comapi retries;
/// and it does not deliver in order, so a message's `read` can arrive before its
/// `delivered`. Each event carries a `revision` that is higher for later states of
/// the same entity; the gate keeps the highest revision it accepted per entity.
///
/// A captured request can also be replayed long after the gate has forgotten its
/// `eventId`; the event's own `timestamp`, which the signature covers, tells such a
/// replay apart ([`Decision::Expired`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Decision {
    /// Not processed before, and the newest state of its entity: process it. From
    /// [`DecisionStore::claim`], the caller now holds the claim on it: complete it
    /// once processed, or release it if processing failed.
    Fresh,
    /// This `eventId` was completed before: a retry. Drop it.
    Duplicate,
    /// A higher revision was already claimed or completed for the same entity, or an
    /// equal one under another `eventId` (the first arrival wins): this event is
    /// obsolete. Drop it. Nothing is recorded for it.
    Stale {
        /// The revision already accepted, which supersedes this event's.
        current: u64,
    },
    /// Another delivery of this `eventId` holds an unexpired claim on it: it is
    /// being processed elsewhere. Claim again later; once that claim is completed
    /// the answer is `Duplicate`, and once its lease passes unused, `Fresh`.
    Busy,
    /// The event's `timestamp` lay outside the replay window when it was
    /// received: older than the gate's `max_age` (25 hours by default: Comapi
    /// retries for 24), or more than its `max_skew` (5 minutes by default) ahead of
    /// the receiving machine's clock. A genuine delivery never arrives that old, so
    /// this is a replay of a captured request, or a clock gone wrong. Drop it;
    /// nothing is recorded.
    ///
    /// The window is judged against the time the event was *received* (a stored
    /// record's `receivedAt`), never against the time a worker gets to it: an event
    /// that arrived in time is processed however late, after an outage or from a
    /// dead letter requeued days later. An event without a readable timestamp
    /// ([`Event::time`] is `None`), or claimed without a receipt time, skips this
    /// check and is decided by its `eventId` and `revision` alone.
    Expired {
        /// How old the event was, in whole seconds: past `max_age` when positive,
        /// and negative for an event dated in the future.
        age_secs: i64,
    },
}

impl Decision {
    /// Whether to process the event.
    #[must_use]
    pub fn is_fresh(self) -> bool {
        self == Decision::Fresh
    }

    /// `fresh`, `duplicate`, `stale`, `busy` or `expired`, for logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Fresh => "fresh",
            Decision::Duplicate => "duplicate",
            Decision::Stale { .. } => "stale",
            Decision::Busy => "busy",
            Decision::Expired { .. } => "expired",
        }
    }
}

/// The replay window both gates apply before they look anything up: an event dated
/// outside it is [`Decision::Expired`].
///
/// ```
/// use std::time::Duration;
/// use comapi_webhook::Gate;
/// use comapi_webhook::gate::{GateConfig, ReplayWindow};
///
/// let window = ReplayWindow::default().with_max_age(Duration::from_secs(2 * 3600));
/// let gate = Gate::with_config(GateConfig::default().with_replay_window(window));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayWindow {
    /// Events whose `timestamp` is older than this are expired. Default
    /// [`ReplayWindow::DEFAULT_MAX_AGE`]; `Duration::MAX` turns the check off.
    pub max_age: Duration,
    /// Events dated more than this ahead of the local clock are expired. Default
    /// [`ReplayWindow::DEFAULT_MAX_SKEW`].
    pub max_skew: Duration,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            max_age: Self::DEFAULT_MAX_AGE,
            max_skew: Self::DEFAULT_MAX_SKEW,
        }
    }
}

impl ReplayWindow {
    /// The default `max_age`: 25 hours, Comapi's retry horizon of 24 hours plus an
    /// hour, and the default TTL of `RedisGate`.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(25 * 60 * 60);

    /// The default `max_skew`: 5 minutes.
    pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(5 * 60);

    /// The same window with another [`ReplayWindow::max_age`].
    #[must_use]
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The same window with another [`ReplayWindow::max_skew`].
    #[must_use]
    pub fn with_max_skew(mut self, max_skew: Duration) -> Self {
        self.max_skew = max_skew;
        self
    }

    /// [`Decision::Expired`] when `event`'s time lay outside the window when it was
    /// received, at `received_at`; `None` when it lay inside, or the event has no
    /// readable time, or the receipt time is unknown.
    pub(crate) fn expired(
        &self,
        event: &Event<'_>,
        received_at: Option<SystemTime>,
    ) -> Option<Decision> {
        let (time, received_at) = (event.time()?, received_at?);
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        match received_at.duration_since(time) {
            Ok(age) => (age > self.max_age).then(|| Decision::Expired {
                age_secs: secs(age),
            }),
            Err(ahead) => (ahead.duration() > self.max_skew).then(|| Decision::Expired {
                age_secs: -secs(ahead.duration()),
            }),
        }
    }
}

/// A place that makes gate decisions: the in-memory [`Gate`], or `RedisGate` to
/// share one consistent decision across processes and machines. Code that
/// processes events (such as a receiver's worker) can be generic over it.
///
/// The lifecycle of an event: [`claim`](DecisionStore::claim) it; on
/// [`Decision::Fresh`] process it, then [`complete`](DecisionStore::complete) it
/// (every later claim within the store's memory is `Duplicate`), or, if processing
/// failed, [`release`](DecisionStore::release) it so that the next attempt may claim
/// it at once. A claim nobody completes or releases expires after its lease.
///
/// `delivery` names one stored copy of the event, unique among copies (a spool
/// position, a stream entry id): the same delivery claiming again gets `Fresh`
/// again, which is the retry after a crash or a lost reply; another delivery gets
/// [`Decision::Busy`] while the claim holds.
pub trait DecisionStore: Send + Sync {
    /// Claims `event`, received just now, for `delivery`. See [`Decision`]. A worker
    /// that reads stored events claims them with their receipt time instead
    /// ([`DecisionStore::claim_received`]).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when a shared store cannot answer. A lost store is
    /// never read as [`Decision::Fresh`]; claiming again with the same delivery is
    /// safe.
    fn claim(
        &self,
        event: &Event<'_>,
        delivery: &str,
    ) -> impl Future<Output = Result<Decision, Error>> + Send {
        self.claim_received(event, delivery, Some(SystemTime::now()))
    }

    /// Claims `event` for `delivery`, judging the replay window at `received_at`,
    /// when the event was received (a stored record's `receivedAt`; `None` when it
    /// is unknown, which skips the window). See [`Decision`].
    ///
    /// # Errors
    /// As [`DecisionStore::claim`].
    fn claim_received(
        &self,
        event: &Event<'_>,
        delivery: &str,
        received_at: Option<SystemTime>,
    ) -> impl Future<Output = Result<Decision, Error>> + Send;

    /// Claims every event of `claims`, each `(event, delivery, received_at)`, in
    /// order, as [`DecisionStore::claim_received`] one after the other would: later
    /// events see the effect of earlier ones. A shared store answers in one round
    /// trip; the default claims one at a time.
    ///
    /// # Errors
    /// As [`DecisionStore::claim`]; then nothing is known of which were claimed,
    /// and claiming them again with the same deliveries is safe.
    fn claim_batch(
        &self,
        claims: &[(&Event<'_>, &str, Option<SystemTime>)],
    ) -> impl Future<Output = Result<Vec<Decision>, Error>> + Send {
        async move {
            let mut decisions = Vec::with_capacity(claims.len());
            for (event, delivery, received_at) in claims {
                decisions.push(self.claim_received(event, delivery, *received_at).await?);
            }
            Ok(decisions)
        }
    }

    /// Completes every `(event, delivery)` claim of `done`: in one round trip on a
    /// shared store; the default completes one at a time.
    ///
    /// # Errors
    /// As [`DecisionStore::complete`]; completing again is safe.
    fn complete_batch(
        &self,
        done: &[(&Event<'_>, &str)],
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async move {
            for (event, delivery) in done {
                self.complete(event, delivery).await?;
            }
            Ok(())
        }
    }

    /// Releases every `(event, delivery)` claim of `given_up`: in one round trip on
    /// a shared store; the default releases one at a time.
    ///
    /// # Errors
    /// As [`DecisionStore::release`]; the claims then expire after their lease.
    fn release_batch(
        &self,
        given_up: &[(&Event<'_>, &str)],
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async move {
            for (event, delivery) in given_up {
                self.release(event, delivery).await?;
            }
            Ok(())
        }
    }

    /// Something that renews this store's claims from a thread of its own (see
    /// [`KeepAlive`]): a worker still on an event renews its claim every third of
    /// the lease, so that a copy of the event (a Comapi retry) stays
    /// [`Decision::Busy`] however long the handler runs. `None` (the default): the
    /// store's claims need no renewal.
    fn keep_alive(&self) -> Option<KeepAlive> {
        None
    }

    /// Makes the event's claim final: it was processed.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when a shared store cannot answer; completing
    /// again is safe.
    fn complete(
        &self,
        event: &Event<'_>,
        delivery: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Gives up `delivery`'s claim on the event after a failed attempt; a claim held
    /// by another delivery is left alone.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when a shared store cannot answer; the claim then
    /// expires after its lease.
    fn release(
        &self,
        event: &Event<'_>,
        delivery: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The future a [`KeepAlive`] returns.
pub type Renewal = std::pin::Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Renews leases from a thread of the worker's own, so that they hold however the
/// handler behaves (even one that blocks its thread): a gate's claims
/// ([`DecisionStore::keep_alive`]), or the deliveries a source has handed out
/// (`EventSource::keep_alive`, feature `receiver`).
///
/// It is called every [`KeepAlive::every`] with the claims the worker holds,
/// `(event id, delivery)` pairs, and runs on a runtime of its own: it must not use
/// a connection whose driver runs on the worker's runtime (make its own, lazily).
pub struct KeepAlive {
    every: Duration,
    renew: Box<Renew>,
}

/// What a [`KeepAlive`] calls.
type Renew = dyn FnMut(&[(String, String)]) -> Renewal + Send;

impl KeepAlive {
    /// Renews by calling `renew` every `every` (at least a millisecond).
    pub fn new(
        every: Duration,
        renew: impl FnMut(&[(String, String)]) -> Renewal + Send + 'static,
    ) -> Self {
        KeepAlive {
            every: every.max(Duration::from_millis(1)),
            renew: Box::new(renew),
        }
    }

    /// How often it renews.
    #[must_use]
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Renews now, for the claims the worker holds.
    pub fn renew(&mut self, claims: &[(String, String)]) -> Renewal {
        (self.renew)(claims)
    }
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAlive")
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// The gate's view of an event: its id, and the entity and revision to order by.
/// Both stores derive their keys here, so they decide on the same facts.
pub(crate) struct GateKey<'e> {
    pub(crate) event_id: &'e str,
    pub(crate) ordering: Option<(Family, &'e str, u64)>,
}

impl<'e> GateKey<'e> {
    pub(crate) fn of(event: &'e Event<'_>) -> Self {
        let ordering = match (event.entity_id(), event.revision()) {
            (Some(entity), Some(revision)) => Some((event.kind().family(), entity, revision)),
            _ => None,
        };
        GateKey {
            event_id: event.event_id(),
            ordering,
        }
    }
}
