//! The revision gate: tells fresh events from retried duplicates and stale ones.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::{Error, Event, Family};

#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "redis")]
pub use redis_store::{RedisGate, RedisGateConfig};

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
    /// The first arrival of this event, and it is the newest state of its entity:
    /// process it.
    Fresh,
    /// This `eventId` was seen before: a retry. Drop it.
    Duplicate,
    /// A revision at least as high was already accepted for the same entity, so this
    /// event is obsolete. Drop it.
    Stale {
        /// The revision already accepted, which supersedes this event's.
        current: u64,
    },
    /// The event's `timestamp` lies outside the replay window: older than the
    /// gate's `max_age` (25 hours by default: Comapi retries for 24), or more than
    /// its `max_skew` (5 minutes by default) ahead of this machine's clock. A
    /// genuine delivery is never that old, so this is a replay of a captured
    /// request, or a clock gone wrong. Drop it; nothing is recorded.
    ///
    /// An event without a readable timestamp ([`Event::time`] is `None`) skips
    /// this check and is decided by its `eventId` and `revision` alone.
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

    /// `fresh`, `duplicate`, `stale` or `expired`, for logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Fresh => "fresh",
            Decision::Duplicate => "duplicate",
            Decision::Stale { .. } => "stale",
            Decision::Expired { .. } => "expired",
        }
    }
}

/// The replay window both gates apply before they look anything up: an event dated
/// outside it is [`Decision::Expired`].
///
/// ```
/// use std::time::Duration;
/// use comapi_webhook::{Gate, GateConfig, ReplayWindow};
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

    /// [`Decision::Expired`] when `event`'s time lies outside the window at `now`;
    /// `None` when it lies inside, or the event has no readable time.
    pub(crate) fn expired(&self, event: &Event<'_>, now: SystemTime) -> Option<Decision> {
        let time = event.time()?;
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        match now.duration_since(time) {
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
pub trait DecisionStore: Send + Sync {
    /// Decides on `event` and records it, atomically.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when a shared store cannot answer. A lost store is
    /// never read as [`Decision::Fresh`].
    fn decide(&self, event: &Event<'_>) -> impl Future<Output = Result<Decision, Error>> + Send;
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

/// The decision rule, shared by every store: a seen `eventId` is a duplicate; else
/// an event without entity or revision is fresh; else it is fresh only if its
/// revision is strictly higher than the highest accepted so far. An equal revision
/// under a different `eventId` is stale: that state was already accepted, and the
/// first arrival wins.
pub(crate) fn decide(
    first_sighting: bool,
    accepted: Option<u64>,
    revision: Option<u64>,
) -> Decision {
    match (first_sighting, accepted, revision) {
        (false, _, _) => Decision::Duplicate,
        (true, Some(current), Some(revision)) if current >= revision => Decision::Stale { current },
        (true, _, _) => Decision::Fresh,
    }
}

/// Bounds and replay window of the in-memory [`Gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GateConfig {
    /// How many event ids to remember for duplicate detection.
    pub max_event_ids: usize,
    /// How many entities (messages, conversations, …) to remember a revision for.
    pub max_entities: usize,
    /// Which event times are accepted; outside it, [`Decision::Expired`].
    pub replay_window: ReplayWindow,
}

impl Default for GateConfig {
    /// One million event ids and one million entities: a day of Comapi's retry
    /// horizon at about 11 events per second, in roughly 100 MB (see the README);
    /// the default replay window.
    fn default() -> Self {
        Self::new(1_000_000, 1_000_000)
    }
}

impl GateConfig {
    /// Bounds with the given limits, and the default replay window.
    #[must_use]
    pub fn new(max_event_ids: usize, max_entities: usize) -> Self {
        GateConfig {
            max_event_ids,
            max_entities,
            replay_window: ReplayWindow::default(),
        }
    }

    /// The same settings with another [`GateConfig::replay_window`].
    #[must_use]
    pub fn with_replay_window(mut self, replay_window: ReplayWindow) -> Self {
        self.replay_window = replay_window;
        self
    }
}

/// The in-memory revision gate: thread-safe, bounded, and fast under contention.
///
/// ```
/// use comapi_webhook::{Decision, Gate, parse_already_verified};
///
/// let gate = Gate::in_memory();
/// let read = br#"{"eventId":"e-3","name":"message.read","payload":{"id":"m-1"},"revision":3}"#;
/// let delivered = br#"{"eventId":"e-2","name":"message.delivered","payload":{"id":"m-1"},"revision":2}"#;
/// let read = &parse_already_verified(read)?[0];
/// let delivered = &parse_already_verified(delivered)?[0];
///
/// assert_eq!(gate.check(read), Decision::Fresh);
/// assert_eq!(gate.check(delivered), Decision::Stale { current: 3 }); // arrived late
/// assert_eq!(gate.check(read), Decision::Duplicate); // Comapi retried
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
///
/// # Bounds
///
/// Memory is bounded by [`GateConfig`]: the gate remembers the most recently used
/// event ids and entities, never more than each limit (for limits of at least 128)
/// and, once full, about half of it or more (ids and entities live in two
/// generations in each of 64 shards; when a shard's newer generation fills, its
/// older one is dropped). Past the bound, an old entity forgotten means a very late stale
/// event for it passes as fresh, and an event id forgotten means a very late retry of
/// it passes as fresh. Size the limits to cover Comapi's retry horizon (about 24 h)
/// at your event rate, or share a `RedisGate` with a TTL.
///
/// Cloning is cheap and every clone shares the same memory.
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    event_ids: Sharded<IdKey, ()>,
    entities: Sharded<(Family, IdKey), u64>,
    window: ReplayWindow,
}

impl Gate {
    /// A gate with the default bounds ([`GateConfig::default`]).
    #[must_use]
    pub fn in_memory() -> Self {
        Self::with_config(GateConfig::default())
    }

    /// A gate with the given bounds.
    #[must_use]
    pub fn with_config(config: GateConfig) -> Self {
        Gate {
            inner: Arc::new(GateInner {
                event_ids: Sharded::new(config.max_event_ids),
                entities: Sharded::new(config.max_entities),
                window: config.replay_window,
            }),
        }
    }

    /// Decides on `event` and records it. See [`Decision`].
    ///
    /// An event outside the replay window is [`Decision::Expired`] before anything
    /// is looked up, and is not recorded. Otherwise the event id is recorded whatever the decision, so a retry of a stale event is
    /// a [`Decision::Duplicate`]. Each of the two steps (the id, then the entity's
    /// revision) is atomic, which is all the rule needs: a racing copy of the same
    /// event loses the first step, and of two racing revisions the higher one wins.
    pub fn check(&self, event: &Event<'_>) -> Decision {
        if let Some(expired) = self.inner.window.expired(event, SystemTime::now()) {
            return expired;
        }
        let key = GateKey::of(event);
        let first_sighting = self
            .inner
            .event_ids
            .insert_if_absent(IdKey::new(key.event_id));
        let Some((family, entity, revision)) = key.ordering.filter(|_| first_sighting) else {
            return decide(first_sighting, None, None);
        };
        let accepted = self
            .inner
            .entities
            .raise((family, IdKey::new(entity)), revision);
        decide(true, accepted, Some(revision))
    }

    /// How many event ids and entities the gate remembers now: `(event ids,
    /// entities)`.
    #[must_use]
    pub fn tracked(&self) -> (usize, usize) {
        (self.inner.event_ids.len(), self.inner.entities.len())
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl DecisionStore for Gate {
    fn decide(&self, event: &Event<'_>) -> impl Future<Output = Result<Decision, Error>> + Send {
        let decision = self.check(event);
        async move { Ok(decision) }
    }
}

/// An id as stored: a uuid (what Comapi uses for event and message ids) in 16 bytes,
/// anything else as its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdKey {
    Uuid(u128),
    Text(Box<str>),
}

impl IdKey {
    fn new(id: &str) -> Self {
        parse_uuid(id).map_or_else(|| IdKey::Text(id.into()), IdKey::Uuid)
    }
}

/// `8-4-4-4-12` hex digits, either case.
fn parse_uuid(id: &str) -> Option<u128> {
    let bytes = id.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut value = 0u128;
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
            continue;
        }
        let digit = char::from(b).to_digit(16)?;
        value = (value << 4) | u128::from(digit);
    }
    Some(value)
}

/// A concurrent map split into shards, each a two-generation bounded map behind its
/// own mutex, so threads working on different ids rarely wait for each other.
#[derive(Debug)]
struct Sharded<K, V> {
    shards: Box<[Mutex<Generations<K, V>>]>,
    hasher: RandomState,
}

const SHARDS: usize = 64;

impl<K: Hash + Eq, V: Copy> Sharded<K, V> {
    fn new(capacity: usize) -> Self {
        // Two generations per shard share the shard's part of the capacity, rounded
        // down so the total never exceeds it.
        let per_generation = (capacity / (SHARDS * 2)).max(1);
        Sharded {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Generations::new(per_generation)))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// Runs `f` on the entry for `key`, under its shard's lock.
    fn touch<R>(&self, key: K, f: impl FnOnce(Option<V>) -> (V, R)) -> R {
        let index = (self.hasher.hash_one(&key) as usize) % SHARDS;
        let shard = &self.shards[index];
        // A panic while holding the lock cannot leave a generation half-updated, so a
        // poisoned lock is still consistent.
        let mut guard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        guard.touch(key, f)
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let g = s.lock().unwrap_or_else(PoisonError::into_inner);
                g.current.len() + g.previous.len()
            })
            .sum()
    }
}

impl<K: Hash + Eq> Sharded<K, ()> {
    /// Records `key`; true if it was not there before.
    fn insert_if_absent(&self, key: K) -> bool {
        self.touch(key, |before| ((), before.is_none()))
    }
}

impl<K: Hash + Eq> Sharded<K, u64> {
    /// Raises the revision for `key` to `revision` if that is higher, and returns
    /// the revision accepted before this call.
    fn raise(&self, key: K, revision: u64) -> Option<u64> {
        self.touch(key, |before| match before {
            Some(current) if current >= revision => (current, before),
            _ => (revision, before),
        })
    }
}

/// A bounded map that forgets least recently used entries a generation at a time:
/// entries live in `current`; a hit in `previous` moves up to `current`; when
/// `current` is full it becomes `previous` and the old `previous` is dropped.
#[derive(Debug)]
struct Generations<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    capacity: usize,
}

impl<K: Hash + Eq, V: Copy> Generations<K, V> {
    fn new(capacity: usize) -> Self {
        Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity,
        }
    }

    /// Stores `f(previous value)` for `key` in the current generation, and returns
    /// what `f` said.
    fn touch<R>(&mut self, key: K, f: impl FnOnce(Option<V>) -> (V, R)) -> R
    where
        V: Copy,
    {
        if let Some(value) = self.current.get_mut(&key) {
            let (new, result) = f(Some(*value));
            *value = new;
            return result;
        }
        let (new, result) = f(self.previous.remove(&key));
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, new);
        result
    }
}
