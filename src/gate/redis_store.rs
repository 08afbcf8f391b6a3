//! `RedisGate`: the revision gate shared through Redis, one atomic script call per
//! decision or per batch.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Decision, DecisionStore, GateKey, ReplayWindow, decide};
use crate::{Error, Event};

/// Records each event id (`SET NX` with a TTL) and raises its entity's revision if
/// the event's is higher, atomically; the decision itself is made in Rust by the
/// rule every store shares.
///
/// KEYS, two per event: its id key, then its entity key (`''` when the event has no
/// entity or no revision). ARGV: the TTL in seconds, then each event's revision as a
/// decimal string. Replies per event: `seen` (the id was there), `new` (no
/// ordering), or `new:<revision accepted before>` (empty when there was none).
/// Revisions are compared as decimal strings (longer is larger), so every `u64`
/// compares exactly, which Lua's doubles would not.
const SCRIPT: &str = r"
local ttl = ARGV[1]
local function at_least(a, b)
  if #a ~= #b then return #a > #b end
  return a >= b
end
local out = {}
for i = 1, #KEYS / 2 do
  local id_key, entity_key, revision = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 1]
  if not redis.call('SET', id_key, '1', 'NX', 'EX', ttl) then
    out[i] = 'seen'
  elseif entity_key == '' then
    out[i] = 'new'
  else
    local before = redis.call('GET', entity_key)
    if not before or not at_least(before, revision) then
      redis.call('SET', entity_key, revision, 'EX', ttl)
    end
    out[i] = 'new:' .. (before or '')
  end
end
return out
";

/// Settings of a [`RedisGate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisGateConfig {
    /// Prepended to every key, so several gates (or other users) can share a Redis.
    pub key_prefix: String,
    /// How long an event id and an entity's revision are remembered. The default,
    /// 25 hours, covers Comapi's retry horizon of about 24 hours.
    pub ttl: Duration,
    /// How long to wait for Redis to answer or to connect before the decision fails
    /// with [`Error::StoreUnavailable`].
    pub timeout: Duration,
    /// Which event times are accepted; outside it, [`Decision::Expired`]. Its
    /// default `max_age` matches the default TTL, so an event id is remembered for
    /// as long as a replay of it could pass the window.
    pub replay_window: ReplayWindow,
}

impl Default for RedisGateConfig {
    fn default() -> Self {
        RedisGateConfig {
            key_prefix: "comapi-webhook:".to_owned(),
            ttl: Duration::from_secs(25 * 60 * 60),
            timeout: Duration::from_secs(2),
            replay_window: ReplayWindow::default(),
        }
    }
}

impl RedisGateConfig {
    /// The defaults with another key prefix.
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The defaults with another TTL (at least one second).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The same settings with another [`RedisGateConfig::replay_window`]. Keep its
    /// `max_age` no longer than the TTL: a replay older than the TTL but inside the
    /// window would pass as fresh.
    #[must_use]
    pub fn with_replay_window(mut self, replay_window: ReplayWindow) -> Self {
        self.replay_window = replay_window;
        self
    }
}

/// The revision gate shared through Redis: every receiver and worker that points at
/// the same Redis and key prefix makes one consistent decision per event.
///
/// Each decision is one round trip running one Lua script, which records the event
/// id with `SET NX` and a TTL and checks-and-sets the entity's highest revision
/// atomically. [`RedisGate::check_batch`] decides a whole batch in one round trip.
/// The rule is the in-memory [`Gate`](crate::Gate)'s, see [`Decision`].
///
/// A lost connection is an error ([`Error::StoreUnavailable`]), never a silent
/// [`Decision::Fresh`]; the connection is re-established on later calls. Redis
/// Cluster is not supported (a batch touches keys in many slots).
///
/// ```no_run
/// # async fn demo(event: &comapi_webhook::Event<'_>) -> Result<(), comapi_webhook::Error> {
/// use comapi_webhook::{RedisGate, RedisGateConfig};
/// let gate = RedisGate::connect("redis://127.0.0.1:6379/", RedisGateConfig::default()).await?;
/// if gate.check(event).await?.is_fresh() {
///     // process it
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisGate {
    connection: ConnectionManager,
    script: Arc<redis::Script>,
    key_prefix: Arc<str>,
    ttl_seconds: u64,
    window: ReplayWindow,
}

impl RedisGate {
    /// Connects to Redis at `url` (`redis://[:password@]host:port/[db]`).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] if the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str, config: RedisGateConfig) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(|e| unavailable("invalid Redis URL", e))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let connection = client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(|e| unavailable("cannot connect to Redis", e))?;
        Ok(RedisGate {
            connection,
            script: Arc::new(redis::Script::new(SCRIPT)),
            key_prefix: config.key_prefix.into(),
            ttl_seconds: config.ttl.as_secs().max(1),
            window: config.replay_window,
        })
    }

    /// Decides on one event. See [`Decision`].
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Redis cannot answer.
    pub async fn check(&self, event: &Event<'_>) -> Result<Decision, Error> {
        self.check_batch(std::slice::from_ref(event))
            .await?
            .pop()
            .ok_or_else(|| protocol("empty reply from Redis"))
    }

    /// Decides on every event of a batch, in order, in one round trip. Events later
    /// in the batch see the effect of earlier ones, exactly as if checked one by one.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Redis cannot answer; then nothing is known
    /// about which events were recorded, and retrying the batch is safe only in the
    /// sense that recorded ones come back as duplicates.
    pub async fn check_batch(&self, events: &[Event<'_>]) -> Result<Vec<Decision>, Error> {
        // Events outside the replay window are decided here, and never reach Redis.
        let now = SystemTime::now();
        let expired: Vec<Option<Decision>> = events
            .iter()
            .map(|event| self.window.expired(event, now))
            .collect();
        let keys: Vec<GateKey<'_>> = events
            .iter()
            .zip(&expired)
            .filter(|(_, expired)| expired.is_none())
            .map(|(event, _)| GateKey::of(event))
            .collect();
        if keys.is_empty() {
            return Ok(expired.into_iter().flatten().collect());
        }
        let mut invocation = self.script.prepare_invoke();
        for key in &keys {
            invocation.key(format!("{}event:{}", self.key_prefix, key.event_id));
            match key.ordering {
                Some((family, entity, _)) => invocation.key(format!(
                    "{}rev:{}:{}",
                    self.key_prefix,
                    family.as_str(),
                    entity
                )),
                None => invocation.key(""),
            };
        }
        invocation.arg(self.ttl_seconds);
        for key in &keys {
            match key.ordering {
                Some((_, _, revision)) => invocation.arg(revision),
                None => invocation.arg(""),
            };
        }
        let mut connection = self.connection.clone();
        let replies: Vec<String> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| unavailable("the gate script failed", e))?;
        if replies.len() != keys.len() {
            return Err(protocol("reply count does not match the batch"));
        }
        let mut looked_up = keys.iter().zip(&replies).map(|(key, reply)| {
            let revision = key.ordering.map(|(_, _, revision)| revision);
            match reply.as_str() {
                "seen" => Ok(decide(false, None, revision)),
                "new" => Ok(decide(true, None, None)),
                other => match other.strip_prefix("new:") {
                    Some("") => Ok(decide(true, None, revision)),
                    Some(before) => before
                        .parse()
                        .map(|before| decide(true, Some(before), revision))
                        .map_err(|_| protocol("unexpected revision in Redis")),
                    None => Err(protocol("unexpected reply from Redis")),
                },
            }
        });
        expired
            .into_iter()
            .map(|expired| match expired {
                Some(decision) => Ok(decision),
                None => looked_up
                    .next()
                    .unwrap_or_else(|| Err(protocol("reply count does not match the batch"))),
            })
            .collect()
    }
}

impl DecisionStore for RedisGate {
    async fn decide(&self, event: &Event<'_>) -> Result<Decision, Error> {
        self.check(event).await
    }
}

impl fmt::Debug for RedisGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisGate")
            .field("key_prefix", &self.key_prefix)
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

fn unavailable(context: &str, error: redis::RedisError) -> Error {
    Error::store_unavailable(context, error)
}

/// A reply this crate's script never gives: Redis answered, but not as expected.
fn protocol(what: &'static str) -> Error {
    unavailable(
        "unexpected reply from the gate script",
        redis::RedisError::from((redis::ErrorKind::Parse, what)),
    )
}
