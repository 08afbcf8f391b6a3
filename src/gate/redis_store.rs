//! `RedisGate`: the decision store shared through Redis, one atomic script call per
//! decision or per batch.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{DEFAULT_LEASE, Decision, DecisionStore, GateKey, KeepAlive, ReplayWindow};
use crate::{Error, Event};

/// Claims events (or, in `check` mode, claims and completes them at once), the
/// rule of [`Decision`] in Lua.
///
/// KEYS, two per event: its id key, then its entity key (`''` when the event has no
/// entity or no revision). ARGV: the mode (`claim` or `check`), the TTL in seconds,
/// the lease in milliseconds, then three per event: the delivery, the revision (a
/// decimal string, `''` without one) and the event id. An id key holds `done` once
/// completed, or `c:<delivery>` while claimed, expiring with the lease; an entity
/// key holds `<revision>:<event id>` of the highest revision claimed. Revisions
/// compare as decimal strings (longer is larger), so every `u64` compares exactly,
/// which Lua's doubles would not. Replies per event: `fresh`, `duplicate`, `busy`
/// or `stale:<revision>`.
const CLAIM: &str = r"
local mode, ttl, lease = ARGV[1], ARGV[2], ARGV[3]
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local out = {}
for i = 1, #KEYS / 2 do
  local id_key, entity_key = KEYS[2 * i - 1], KEYS[2 * i]
  local delivery, revision, event_id = ARGV[3 * i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3]
  local mine = 'c:' .. delivery
  local held = redis.call('GET', id_key)
  if held and string.sub(held, 1, 2) ~= 'c:' then
    out[i] = 'duplicate'
  elseif held and (held ~= mine or mode == 'check') then
    out[i] = 'busy'
  else
    local stale = nil
    if entity_key ~= '' then
      local current = redis.call('GET', entity_key)
      local raise = true
      if current then
        local sep = string.find(current, ':', 1, true)
        local rev = current
        local holder = ''
        if sep then
          rev = string.sub(current, 1, sep - 1)
          holder = string.sub(current, sep + 1)
        end
        if greater(rev, revision) or (rev == revision and holder ~= event_id) then
          stale = rev
        end
        raise = greater(revision, rev)
      end
      if not stale and raise then
        redis.call('SET', entity_key, revision .. ':' .. event_id, 'EX', ttl)
      end
    end
    if stale then
      out[i] = 'stale:' .. stale
    elseif mode == 'check' then
      redis.call('SET', id_key, 'done', 'EX', ttl)
      out[i] = 'fresh'
    else
      redis.call('SET', id_key, mine, 'PX', lease)
      out[i] = 'fresh'
    end
  end
end
return out
";

/// Completes (`done`, with the TTL) or releases (deletes, if still this delivery's
/// claim) events. KEYS: their id keys. ARGV: `complete` or `release`, the TTL in
/// seconds, then each key's delivery.
const SETTLE: &str = r"
for i = 1, #KEYS do
  if ARGV[1] == 'complete' then
    redis.call('SET', KEYS[i], 'done', 'EX', ARGV[2])
  elseif redis.call('GET', KEYS[i]) == 'c:' .. ARGV[i + 2] then
    redis.call('DEL', KEYS[i])
  end
end
return 1
";

/// Extends claims still held by their delivery. KEYS: the id keys. ARGV: the lease
/// in milliseconds, then each key's delivery.
const RENEW: &str = r"
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == 'c:' .. ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return 1
";

/// A connection of a keep-alive's own, made on its runtime when first used and
/// made again after a failure (see [`KeepAlive`]); cheap to clone.
#[derive(Clone)]
pub(crate) struct OwnConnection {
    client: redis::Client,
    slot: Arc<tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
}

impl OwnConnection {
    pub(crate) fn new(client: redis::Client) -> Self {
        OwnConnection {
            client,
            slot: Arc::default(),
        }
    }

    /// Runs `command` on the connection, `context` naming it in an error.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
        context: &str,
    ) -> Result<T, Error> {
        let mut slot = self.slot.lock().await;
        if slot.is_none() {
            let made = self.client.get_multiplexed_async_connection().await;
            *slot = Some(made.map_err(|e| unavailable("cannot connect to Redis", e))?);
        }
        let Some(live) = slot.as_mut() else {
            return Err(protocol("no connection"));
        };
        let answered = command.query_async(live).await;
        if answered.is_err() {
            *slot = None; // connect again next time
        }
        answered.map_err(|e| unavailable(context, e))
    }
}

/// How long a decision waits for Redis, by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of a [`RedisGate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisGateConfig {
    /// Prepended to every key, so several gates (or other users) can share a Redis.
    pub key_prefix: String,
    /// How long a completed event id and an entity's revision are remembered. The
    /// default, 25 hours, covers Comapi's retry horizon of about 24 hours.
    pub ttl: Duration,
    /// How long a claim holds when nobody completes or releases it. Default 60 s.
    pub lease: Duration,
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
            ttl: ReplayWindow::DEFAULT_MAX_AGE,
            lease: DEFAULT_LEASE,
            timeout: DEFAULT_TIMEOUT,
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
}

claim_settings!(RedisGateConfig);

/// The decision store shared through Redis: every receiver and worker that points
/// at the same Redis and key prefix makes one consistent decision per event.
///
/// Each claim is one round trip running one Lua script, which checks the event id
/// and checks-and-sets the entity's highest revision atomically;
/// [`RedisGate::check_batch`] decides a whole batch in one round trip. The rule is
/// the in-memory [`Gate`](crate::Gate)'s, see [`Decision`] and [`DecisionStore`].
///
/// A lost connection is an error ([`Error::StoreUnavailable`]), never a silent
/// [`Decision::Fresh`]; the connection is re-established on later calls. When a
/// reply is lost after Redis ran a claim, claiming again with the same delivery
/// gets `Fresh` again, so the event is neither lost nor processed twice. Redis
/// Cluster is not supported (a batch touches keys in many slots).
///
/// ```no_run
/// # async fn demo(event: &comapi_webhook::Event<'_>) -> Result<(), comapi_webhook::Error> {
/// use comapi_webhook::gate::{DecisionStore, RedisGate, RedisGateConfig};
/// let gate = RedisGate::connect("redis://127.0.0.1:6379/", RedisGateConfig::default()).await?;
/// if gate.claim(event, "stream:1700000000000-0").await?.is_fresh() {
///     // process it, then:
///     gate.complete(event, "stream:1700000000000-0").await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisGate {
    client: redis::Client,
    connection: ConnectionManager,
    claim: Arc<redis::Script>,
    settle: Arc<redis::Script>,
    key_prefix: Arc<str>,
    ttl_seconds: u64,
    lease_millis: u64,
    window: ReplayWindow,
}

/// What a claim script call leaves behind for a fresh event.
#[derive(Clone, Copy)]
enum Mode {
    /// A claim with a lease.
    Claim,
    /// The event completed at once.
    Check,
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
            client,
            connection,
            claim: Arc::new(redis::Script::new(CLAIM)),
            settle: Arc::new(redis::Script::new(SETTLE)),
            key_prefix: config.key_prefix.into(),
            ttl_seconds: config.ttl.as_secs().max(1),
            lease_millis: u64::try_from(config.lease.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            window: config.replay_window,
        })
    }

    /// Claims and completes one event in one step (see
    /// [`Gate::check`](crate::Gate::check)).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Redis cannot answer.
    pub async fn check(&self, event: &Event<'_>) -> Result<Decision, Error> {
        self.check_batch(std::slice::from_ref(event))
            .await?
            .pop()
            .ok_or_else(|| protocol("empty reply from Redis"))
    }

    /// Claims and completes every event of a batch, in order, in one round trip.
    /// Events later in the batch see the effect of earlier ones, exactly as if
    /// checked one by one.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when Redis cannot answer; then nothing is known
    /// about which events were recorded, and retrying the batch is safe only in the
    /// sense that recorded ones come back as duplicates.
    pub async fn check_batch(&self, events: &[Event<'_>]) -> Result<Vec<Decision>, Error> {
        let now = Some(SystemTime::now());
        let claims: Vec<_> = events.iter().map(|e| (e, "check", now)).collect();
        self.run_claims(&claims, Mode::Check).await
    }

    /// Runs the claim script on `claims`, each an event, its delivery and when it
    /// was received (events outside the replay window are decided here, and never
    /// reach Redis), in one round trip.
    async fn run_claims(
        &self,
        claims: &[(&Event<'_>, &str, Option<SystemTime>)],
        mode: Mode,
    ) -> Result<Vec<Decision>, Error> {
        let expired: Vec<Option<Decision>> = claims
            .iter()
            .map(|(event, _, received_at)| self.window.expired(event, *received_at))
            .collect();
        let asked: Vec<(GateKey<'_>, &str)> = claims
            .iter()
            .zip(&expired)
            .filter(|(_, expired)| expired.is_none())
            .map(|((event, delivery, _), _)| (GateKey::of(event), *delivery))
            .collect();
        if asked.is_empty() {
            return Ok(expired.into_iter().flatten().collect());
        }
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .arg(match mode {
                Mode::Claim => "claim",
                Mode::Check => "check",
            })
            .arg(self.ttl_seconds)
            .arg(self.lease_millis);
        for (key, delivery) in &asked {
            invocation.key(self.id_key(key.event_id));
            match key.ordering {
                Some((family, entity, revision)) => {
                    invocation.key(format!(
                        "{}rev:{}:{}",
                        self.key_prefix,
                        family.as_str(),
                        entity
                    ));
                    invocation.arg(*delivery).arg(revision);
                }
                None => {
                    invocation.key("");
                    invocation.arg(*delivery).arg("");
                }
            }
            invocation.arg(key.event_id);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<String> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| unavailable("the gate script failed", e))?;
        if replies.len() != asked.len() {
            return Err(protocol("reply count does not match the batch"));
        }
        let mut replies = replies.iter().map(|reply| match reply.as_str() {
            "fresh" => Ok(Decision::Fresh),
            "duplicate" => Ok(Decision::Duplicate),
            "busy" => Ok(Decision::Busy),
            other => other
                .strip_prefix("stale:")
                .and_then(|current| current.parse().ok())
                .map(|current| Decision::Stale { current })
                .ok_or_else(|| protocol("unexpected reply from Redis")),
        });
        expired
            .into_iter()
            .map(|expired| match expired {
                Some(decision) => Ok(decision),
                None => replies
                    .next()
                    .unwrap_or_else(|| Err(protocol("reply count does not match the batch"))),
            })
            .collect()
    }

    /// Completes or releases claims, in one round trip.
    async fn settle(&self, claims: &[(&Event<'_>, &str)], how: &str) -> Result<(), Error> {
        if claims.is_empty() {
            return Ok(());
        }
        let mut invocation = self.settle.prepare_invoke();
        invocation.arg(how).arg(self.ttl_seconds);
        for (event, delivery) in claims {
            invocation.key(self.id_key(event.event_id())).arg(*delivery);
        }
        let mut connection = self.connection.clone();
        invocation
            .invoke_async::<i64>(&mut connection)
            .await
            .map(drop)
            .map_err(|e| unavailable("the gate script failed", e))
    }

    fn id_key(&self, event_id: &str) -> String {
        format!("{}event:{}", self.key_prefix, event_id)
    }
}

impl DecisionStore for RedisGate {
    async fn claim_received(
        &self,
        event: &Event<'_>,
        delivery: &str,
        received_at: Option<SystemTime>,
    ) -> Result<Decision, Error> {
        self.run_claims(&[(event, delivery, received_at)], Mode::Claim)
            .await?
            .pop()
            .ok_or_else(|| protocol("empty reply from Redis"))
    }

    async fn complete(&self, event: &Event<'_>, delivery: &str) -> Result<(), Error> {
        self.settle(&[(event, delivery)], "complete").await
    }

    async fn release(&self, event: &Event<'_>, delivery: &str) -> Result<(), Error> {
        self.settle(&[(event, delivery)], "release").await
    }

    async fn claim_batch(
        &self,
        claims: &[(&Event<'_>, &str, Option<SystemTime>)],
    ) -> Result<Vec<Decision>, Error> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        self.run_claims(claims, Mode::Claim).await
    }

    async fn complete_batch(&self, done: &[(&Event<'_>, &str)]) -> Result<(), Error> {
        self.settle(done, "complete").await
    }

    async fn release_batch(&self, given_up: &[(&Event<'_>, &str)]) -> Result<(), Error> {
        self.settle(given_up, "release").await
    }

    fn keep_alive(&self) -> Option<KeepAlive> {
        let connection = OwnConnection::new(self.client.clone());
        let (prefix, lease) = (Arc::clone(&self.key_prefix), self.lease_millis);
        let every = Duration::from_millis(lease / 3);
        Some(KeepAlive::new(every, move |claims| {
            // EVAL, not EVALSHA: a Redis restarted since has no script cached.
            let mut command = redis::cmd("EVAL");
            command.arg(RENEW).arg(claims.len());
            for (event_id, _) in claims {
                command.arg(format!("{prefix}event:{event_id}"));
            }
            command.arg(lease);
            for (_, delivery) in claims {
                command.arg(delivery);
            }
            let (connection, empty) = (connection.clone(), claims.is_empty());
            Box::pin(async move {
                if empty {
                    return Ok(());
                }
                let renewal = "the gate's renewal failed";
                connection.run::<i64>(&command, renewal).await.map(drop)
            })
        }))
    }
}

impl fmt::Debug for RedisGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisGate")
            .field("key_prefix", &self.key_prefix)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("lease_millis", &self.lease_millis)
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
