//! `Gate`: the in-memory decision store, bounded, sharded and thread-safe.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::{DEFAULT_LEASE, Decision, DecisionStore, GateKey, KeepAlive, ReplayWindow};
use crate::event::Family;
use crate::{Error, Event};

/// Bounds, lease and replay window of the in-memory [`Gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GateConfig {
    /// How many event ids to remember for duplicate detection.
    pub max_event_ids: usize,
    /// How many entities (messages, conversations, …) to remember a revision for.
    pub max_entities: usize,
    /// How long a claim holds when nobody completes or releases it. Default 60 s.
    pub lease: Duration,
    /// Which event times are accepted; outside it, [`Decision::Expired`].
    pub replay_window: ReplayWindow,
}

impl Default for GateConfig {
    /// One million event ids and one million entities: a day of Comapi's retry
    /// horizon at about 11 events per second, in roughly 100 MB (see the README);
    /// the default lease and replay window.
    fn default() -> Self {
        Self::new(1_000_000, 1_000_000)
    }
}

impl GateConfig {
    /// Bounds with the given limits, and the default lease and replay window.
    #[must_use]
    pub fn new(max_event_ids: usize, max_entities: usize) -> Self {
        GateConfig {
            max_event_ids,
            max_entities,
            lease: DEFAULT_LEASE,
            replay_window: ReplayWindow::default(),
        }
    }
}

claim_settings!(GateConfig);

/// The in-memory decision store: thread-safe, bounded, and fast under contention.
///
/// ```
/// use comapi_webhook::{Decision, Gate};
/// use comapi_webhook::dangerous::parse_unverified;
///
/// let gate = Gate::in_memory();
/// let read = br#"{"eventId":"e-3","name":"message.read","payload":{"id":"m-1"},"revision":3}"#;
/// let delivered = br#"{"eventId":"e-2","name":"message.delivered","payload":{"id":"m-1"},"revision":2}"#;
/// let read = &parse_unverified(read)?[0];
/// let delivered = &parse_unverified(delivered)?[0];
///
/// // A worker claims, processes, completes.
/// assert_eq!(gate.claim(read, "spool:1:0"), Decision::Fresh);
/// assert_eq!(gate.claim(read, "spool:9:0"), Decision::Busy); // another copy, meanwhile
/// gate.complete(read, "spool:1:0");
/// assert_eq!(gate.claim(read, "spool:9:0"), Decision::Duplicate); // Comapi retried
/// assert_eq!(gate.check(delivered), Decision::Stale { current: 3 }); // arrived late
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
///
/// # Bounds
///
/// Memory is bounded by [`GateConfig`]: the gate remembers the most recently used
/// event ids and entities, never more than each limit (for limits of at least 128)
/// and, once full, about half of it or more (ids and entities live in two
/// generations in each of 64 shards; when a shard's newer generation fills, its
/// older one is dropped). Past the bound, an old entity forgotten means a very late
/// stale event for it passes as fresh, and an event id forgotten means a very late
/// retry of it passes as fresh. Size the limits to cover Comapi's retry horizon
/// (about 24 h) at your event rate, or share a `RedisGate` with a TTL.
///
/// Cloning is cheap and every clone shares the same memory.
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    event_ids: Sharded<IdKey, Held>,
    entities: Sharded<(Family, IdKey), (u64, IdKey)>,
    lease: Duration,
    window: ReplayWindow,
}

/// What the gate holds for an event id.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// Claimed by a delivery, until its lease ends.
    Claimed { delivery: Box<str>, until: Instant },
    /// Processed.
    Completed,
}

/// What a decision leaves behind for a fresh event.
enum Outcome<'d> {
    /// A claim for this delivery.
    Claim(&'d str),
    /// The event completed at once ([`Gate::check`]).
    Complete,
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
                lease: config.lease,
                window: config.replay_window,
            }),
        }
    }

    /// Claims `event` for `delivery`. See [`DecisionStore::claim`] and [`Decision`].
    ///
    /// An event outside the replay window is [`Decision::Expired`] before anything
    /// is looked up, and nothing is recorded for it; nor for a stale one.
    pub fn claim(&self, event: &Event<'_>, delivery: &str) -> Decision {
        self.claim_received(event, delivery, Some(SystemTime::now()))
    }

    /// Claims `event` for `delivery`, judging the replay window at `received_at`.
    /// See [`DecisionStore::claim_received`].
    pub fn claim_received(
        &self,
        event: &Event<'_>,
        delivery: &str,
        received_at: Option<SystemTime>,
    ) -> Decision {
        self.decide(event, Outcome::Claim(delivery), received_at)
    }

    /// Extends `delivery`'s claim on the event with id `event_id` by a lease from
    /// now, if it still holds it. A worker does it for every claim it holds, every
    /// third of the lease ([`DecisionStore::keep_alive`]), so that a copy of an event
    /// whose handler outlasts the lease stays [`Decision::Busy`] (copies of an event
    /// without an entity run in lanes of their own).
    pub fn renew(&self, event_id: &str, delivery: &str) {
        let until = Instant::now() + self.inner.lease;
        self.inner
            .event_ids
            .touch(IdKey::new(event_id), |held| match held {
                Some(Held::Claimed { delivery: d, .. }) if *d == *delivery => {
                    (Some(Held::Claimed { delivery: d, until }), ())
                }
                other => (other, ()),
            });
    }

    /// Makes the event's claim final. See [`DecisionStore::complete`].
    pub fn complete(&self, event: &Event<'_>, delivery: &str) {
        let _ = delivery;
        self.inner
            .event_ids
            .touch(IdKey::new(event.event_id()), |_| {
                (Some(Held::Completed), ())
            });
    }

    /// Gives up `delivery`'s claim on the event. See [`DecisionStore::release`].
    pub fn release(&self, event: &Event<'_>, delivery: &str) {
        self.inner
            .event_ids
            .touch(IdKey::new(event.event_id()), |held| match held {
                Some(Held::Claimed { delivery: d, .. }) if *d == *delivery => (None, ()),
                other => (other, ()),
            });
    }

    /// Claims and completes `event` in one step: for processing that cannot fail,
    /// or that you retry yourself. A `Fresh` event is recorded as processed at once.
    pub fn check(&self, event: &Event<'_>) -> Decision {
        self.decide(event, Outcome::Complete, Some(SystemTime::now()))
    }

    fn decide(
        &self,
        event: &Event<'_>,
        outcome: Outcome<'_>,
        received_at: Option<SystemTime>,
    ) -> Decision {
        if let Some(expired) = self.inner.window.expired(event, received_at) {
            return expired;
        }
        let key = GateKey::of(event);
        let id = IdKey::new(key.event_id);
        let now = Instant::now();
        // 1. The id, atomically: done, busy, or now ours.
        let prior = self.inner.event_ids.touch(id.clone(), |held| match held {
            Some(Held::Completed) => (held, Err(Decision::Duplicate)),
            Some(Held::Claimed { delivery, until })
                if until > now && !matches!(outcome, Outcome::Claim(d) if *d == *delivery) =>
            {
                (Some(Held::Claimed { delivery, until }), Err(Decision::Busy))
            }
            prior => {
                let held = match outcome {
                    Outcome::Claim(delivery) => Held::Claimed {
                        delivery: delivery.into(),
                        until: now + self.inner.lease,
                    },
                    Outcome::Complete => Held::Completed,
                };
                (Some(held), Ok(prior))
            }
        });
        let prior = match prior {
            Ok(prior) => prior,
            Err(decision) => return decision,
        };
        // 2. The entity's revision: raised to this event's, unless that is stale.
        let Some((family, entity, revision)) = key.ordering else {
            return Decision::Fresh;
        };
        let current = self
            .inner
            .entities
            .touch((family, IdKey::new(entity)), |held| match held {
                Some((current, holder))
                    if current > revision || (current == revision && !holder.is(key.event_id)) =>
                {
                    (Some((current, holder)), Some(current))
                }
                Some((current, holder)) if current == revision => (Some((current, holder)), None),
                _ => (Some((revision, id.clone())), None),
            });
        match current {
            None => Decision::Fresh,
            Some(current) => {
                // Stale: the id goes back to what it was.
                self.inner.event_ids.touch(id, |_| (prior, ()));
                Decision::Stale { current }
            }
        }
    }

    /// How many event ids and entities the gate remembers now: `(event ids,
    /// entities)`.
    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        (self.inner.event_ids.len(), self.inner.entities.len())
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl DecisionStore for Gate {
    fn claim_received(
        &self,
        event: &Event<'_>,
        delivery: &str,
        received_at: Option<SystemTime>,
    ) -> impl Future<Output = Result<Decision, Error>> + Send {
        let decision = Gate::claim_received(self, event, delivery, received_at);
        async move { Ok(decision) }
    }

    fn complete(
        &self,
        event: &Event<'_>,
        delivery: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        Gate::complete(self, event, delivery);
        async { Ok(()) }
    }

    fn release(
        &self,
        event: &Event<'_>,
        delivery: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        Gate::release(self, event, delivery);
        async { Ok(()) }
    }

    fn keep_alive(&self) -> Option<KeepAlive> {
        let gate = self.clone();
        let every = self.inner.lease / 3;
        Some(KeepAlive::new(every, move |claims| {
            for (event_id, delivery) in claims {
                gate.renew(event_id, delivery);
            }
            Box::pin(std::future::ready(Ok(())))
        }))
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

    /// Whether this is the key of `id`.
    fn is(&self, id: &str) -> bool {
        match self {
            IdKey::Uuid(uuid) => parse_uuid(id) == Some(*uuid),
            IdKey::Text(text) => **text == *id,
        }
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

impl<K: Hash + Eq, V> Sharded<K, V> {
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

    /// Runs `f` on the entry for `key`, under its shard's lock: `f` gets what is
    /// stored and says what to store instead (`None` removes it).
    fn touch<R>(&self, key: K, f: impl FnOnce(Option<V>) -> (Option<V>, R)) -> R {
        let index = (self.hasher.hash_one(&key) as usize) % SHARDS;
        let shard = &self.shards[index];
        // A panic while holding the lock cannot leave a generation half-updated, so a
        // poisoned lock is still consistent.
        let mut guard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        guard.touch(key, f)
    }

    #[cfg(test)]
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

/// A bounded map that forgets least recently used entries a generation at a time:
/// entries live in `current`; a hit in `previous` moves up to `current`; when
/// `current` is full it becomes `previous` and the old `previous` is dropped.
#[derive(Debug)]
struct Generations<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    capacity: usize,
}

impl<K: Hash + Eq, V> Generations<K, V> {
    fn new(capacity: usize) -> Self {
        Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity,
        }
    }

    /// Stores what `f` makes of the value for `key` in the current generation (or
    /// removes it, for `None`), and returns what `f` said.
    fn touch<R>(&mut self, key: K, f: impl FnOnce(Option<V>) -> (Option<V>, R)) -> R {
        let (key, old) = match self.current.remove_entry(&key) {
            Some((key, old)) => (key, Some(old)),
            None => {
                let old = self.previous.remove(&key);
                if self.current.len() >= self.capacity {
                    self.previous = std::mem::take(&mut self.current);
                }
                (key, old)
            }
        };
        let (new, result) = f(old);
        if let Some(new) = new {
            self.current.insert(key, new);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_forget_the_least_recently_used_a_generation_at_a_time() {
        let mut map = Generations::new(2);
        let put = |map: &mut Generations<u32, u32>, key, value| {
            map.touch(key, |_| (Some(value), ()));
        };
        put(&mut map, 1, 10);
        put(&mut map, 2, 20);
        put(&mut map, 3, 30); // current was full: {1, 2} becomes previous
        assert_eq!(map.touch(1, |v| (v, v)), Some(10)); // moved up from previous
        put(&mut map, 4, 40); // full again: {3, 1} previous, {2} dropped
        assert_eq!(map.touch(2, |v| (v, v)), None);
        assert_eq!(map.touch(3, |v| (None, v)), Some(30)); // removed
        assert_eq!(map.touch(3, |v| (v, v)), None);
        assert!(map.current.len() + map.previous.len() <= 2 * map.capacity);
    }

    #[test]
    fn memory_stays_within_the_bound() {
        let gate = Gate::with_config(GateConfig::new(1_000, 1_000));
        assert_eq!(gate.tracked(), (0, 0));
        let event = |i: u32| {
            let body = format!(
                r#"{{"eventId":"e-{i}","name":"message.read","payload":{{"id":"m-{i}"}},"revision":1}}"#
            );
            crate::dangerous::parse_unverified(body.as_bytes())
                .map(|mut events| events.remove(0).into_owned())
        };
        for i in 0..10_000 {
            if let Ok(event) = event(i) {
                gate.check(&event);
            }
        }
        let (ids, entities) = gate.tracked();
        assert!((500..=1_000).contains(&ids), "{ids} event ids remembered");
        assert!(
            (500..=1_000).contains(&entities),
            "{entities} entities remembered"
        );
        // The most recent ones are still known.
        let last = event(9_999).map(|e| gate.check(&e));
        assert_eq!(last.ok(), Some(Decision::Duplicate));
    }

    #[test]
    fn uuids_are_stored_as_numbers_and_match_their_text() {
        let id = "0DCEAF0D-93ea-4314-a6f8-b0cffe69799a";
        let key = IdKey::new(id);
        assert!(matches!(key, IdKey::Uuid(_)));
        assert!(key.is("0dceaf0d-93ea-4314-a6f8-b0cffe69799a"));
        assert!(!key.is("0dceaf0d-93ea-4314-a6f8-b0cffe69799b"));
        let text = IdKey::new("e-1");
        assert!(text.is("e-1") && !text.is("e-2"));
    }
}
