//! The Redis stream backend (features `receiver` and `redis`): receivers store into
//! a stream ([`RedisStream`]), workers read it through a consumer group
//! ([`StreamConsumer`]), and events given up go to a `…:dead` stream.
//!
//! # What "stored" means
//!
//! [`RedisStream`] answers once Redis replied to the `XADD` of every event of a
//! request (one pipelined round trip per request; concurrent requests share the
//! connection, so Redis takes many in one event-loop turn). How durable that is
//! depends on Redis:
//! - with `appendonly yes` and `appendfsync always`, Redis writes and fsyncs its
//!   append-only file before it replies (grouping every write of one event-loop
//!   turn under one fsync): an acknowledged event survives a crash of Redis or of
//!   its machine;
//! - with `appendfsync everysec` (Redis's default once AOF is on), up to about a
//!   second of acknowledged events can be lost when the machine crashes;
//! - without AOF, everything since the last snapshot can be lost.
//!
//! [`RedisStream::connect`] reads `CONFIG GET appendonly` and `appendfsync` and
//! reports it ([`Durability`]); managed Redis often forbids `CONFIG`, which reads
//! as [`Durability::Unknown`]. With [`RedisStreamConfig::replicas`] set, each
//! request also waits (`WAIT`) for that many replicas to have the events.
//!
//! # Design
//!
//! - The stream is never trimmed with `MAXLEN` at `XADD`, which can drop unread
//!   entries. Consumers trim (`XTRIM MINID`) only entries every consumer group has
//!   acknowledged: older than each group's oldest pending entry and last delivery.
//! - If Redis is unreachable or slow, a store gives up after
//!   [`RedisStreamConfig::deadline`] and the receive step answers 503; the
//!   connection is re-established on later calls, without a restart.
//! - Each entry holds one field, `record`: the same record as a spool line.
//! - An entry of the dead stream `<prefix>events:dead` holds `record`, `error` (the
//!   last attempt's), `attempts`, `delivery` (the entry id it had in the stream) and
//!   `deadAt` (RFC 3339, UTC).

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::broker::Outage;
use super::{EventStore, Records, StoreStatus};
use crate::Error;

mod console;
mod consumer;
mod dead_letter;
mod retry;
mod scripts;

pub use crate::store::broker::StopHandle;
pub use consumer::{StreamConsumer, StreamConsumers, StreamDelivery};

/// The entry field holding the record.
const RECORD_FIELD: &str = "record";

/// How long a store may take before the receive step answers 503, by default:
/// well inside Comapi's 10 s.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// The most entries a worker reads at once, by default.
pub const DEFAULT_BATCH: usize = 64;

/// Settings of a [`RedisStream`] and its [`StreamConsumer`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStreamConfig {
    /// Prepended to the stream's keys: `<prefix>events` holds the events,
    /// `<prefix>events:dead` the dead letter. Default `comapi-webhook:`, as the gate's.
    pub key_prefix: String,
    /// The consumer group the workers share. Default `comapi-webhook`.
    pub group: String,
    /// How long a store may take, connecting included, before it fails and the
    /// receive step answers 503. Default 5 s, well inside Comapi's 10 s.
    pub deadline: Duration,
    /// Replicas that must have each request's events (`WAIT`) before it is
    /// answered. Default 0.
    pub replicas: u32,
    /// How long an entry may stay handed to a worker without being acknowledged
    /// before another worker takes it over (`XAUTOCLAIM`): a crashed worker's
    /// events are processed after this. Keep it as the gate's lease. Default 60 s.
    pub lease: Duration,
    /// The most entries a worker reads at once. Default 64.
    pub batch: usize,
}

impl Default for RedisStreamConfig {
    fn default() -> Self {
        RedisStreamConfig {
            key_prefix: "comapi-webhook:".to_owned(),
            group: "comapi-webhook".to_owned(),
            deadline: DEFAULT_DEADLINE,
            replicas: 0,
            lease: crate::gate::DEFAULT_LEASE,
            batch: DEFAULT_BATCH,
        }
    }
}

impl RedisStreamConfig {
    /// The same settings with another key prefix.
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The same settings with another consumer group.
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// The same settings with another [`RedisStreamConfig::deadline`].
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The same settings waiting for `replicas` replicas.
    #[must_use]
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }

    /// The same settings with another [`RedisStreamConfig::lease`] (at least 1 ms).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// The stream holding the events: `<prefix>events`.
    #[must_use]
    pub fn stream_key(&self) -> String {
        format!("{}events", self.key_prefix)
    }

    /// The dead-letter stream: `<prefix>events:dead`.
    #[must_use]
    pub fn dead_key(&self) -> String {
        format!("{}events:dead", self.key_prefix)
    }
}

/// How durable Redis says an acknowledged event is (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `appendonly yes` and `appendfsync always`: fsynced before Redis replies.
    Always,
    /// Anything weaker, as Redis reports it.
    Weaker {
        /// `appendonly`: `yes` or `no`.
        appendonly: String,
        /// `appendfsync`: `always`, `everysec` or `no`.
        appendfsync: String,
    },
    /// `CONFIG GET` failed (managed Redis often forbids it): why.
    Unknown(String),
}

impl Durability {
    /// One line to log when durability is weaker than fsync-before-reply, or
    /// cannot be read; `None` for [`Durability::Always`].
    #[must_use]
    pub fn warning(&self) -> Option<String> {
        match self {
            Durability::Always => None,
            Durability::Weaker {
                appendonly,
                appendfsync,
            } => Some(format!(
                "Redis has appendonly {appendonly}, appendfsync {appendfsync}: events answered 200 \
                 can be lost if Redis or its machine crashes; set appendonly yes and appendfsync always"
            )),
            Durability::Unknown(why) => Some(format!(
                "cannot read Redis's persistence settings ({why}): make sure it runs with appendonly \
                 yes and appendfsync always, or events answered 200 can be lost in a crash"
            )),
        }
    }
}

/// Backlog, pending, dead-letter and retry figures in one round trip. KEYS: the
/// stream, the dead stream, the retry schedule. ARGV: the group. Replies `{length,
/// pending, lag, dead, retries, next due (ms)}`, with -1 for what is unknown (no
/// group yet, a lag Redis cannot tell, no retry waiting).
const STATUS: &str = r"
local length = redis.call('XLEN', KEYS[1])
local dead = redis.call('XLEN', KEYS[2])
local retries = redis.call('ZCARD', KEYS[3])
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then next_due = tonumber(first[2]) end
local pending, lag = -1, -1
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == ARGV[1] then
      pending = f['pending']
      if type(f['lag']) == 'number' then lag = f['lag'] end
    end
  end
end
return {length, pending, lag, dead, retries, next_due}
";

static STATUS_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(STATUS));

/// The receive step's store on a Redis stream: every event of a request is one
/// `XADD`, all of them pipelined in one round trip, answered only once Redis
/// replied to each (see the [module docs](self) for what that means for
/// durability).
///
/// Cloning is cheap; clones share one multiplexed connection, re-established
/// after a failure.
///
/// ```no_run
/// # async fn demo() -> Result<(), comapi_webhook::Error> {
/// use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig};
/// use comapi_webhook::{Inbox, Verifier};
///
/// let stream = RedisStream::connect("redis://127.0.0.1:6379/", RedisStreamConfig::default()).await?;
/// if let Some(warning) = stream.durability().warning() {
///     eprintln!("warning: {warning}");
/// }
/// let inbox = Inbox::new(Verifier::new("a-secret-of-16-bytes-or-more")?, stream);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStream {
    connection: ConnectionManager,
    key: Arc<str>,
    dead_key: Arc<str>,
    group: Arc<str>,
    deadline: Duration,
    replicas: u32,
    /// What Redis said of its persistence, read again after every recovery.
    durability: Arc<Mutex<Durability>>,
    /// Its outages, for the log; after one the persistence is read again, since
    /// the Redis that answers may have restarted with other settings.
    outage: Outage,
}

impl RedisStream {
    /// Connects to Redis at `url` (`redis://[:password@]host:port/[db]`) and reads
    /// its persistence settings ([`RedisStream::durability`]).
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] if the URL is invalid or Redis cannot be reached
    /// within the deadline.
    pub async fn connect(url: &str, config: RedisStreamConfig) -> Result<Self, Error> {
        let connection = connect(url, config.deadline).await?;
        let durability = durability(&mut connection.clone()).await;
        let key: Arc<str> = config.stream_key().into();
        Ok(RedisStream {
            connection,
            outage: Outage::new("Redis", Arc::clone(&key)),
            key,
            dead_key: config.dead_key().into(),
            group: config.group.into(),
            deadline: config.deadline,
            replicas: config.replicas,
            durability: Arc::new(Mutex::new(durability)),
        })
    }

    /// What Redis said of its persistence when this store connected, or when it
    /// last recovered from a failure (Redis may have restarted with other
    /// settings; a change is logged at `warn`).
    #[must_use]
    pub fn durability(&self) -> Durability {
        self.durability
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// After a recovery: reads the persistence settings again, off the request's
    /// path.
    fn recovered(&self) {
        let (mut connection, shared) = (self.connection.clone(), Arc::clone(&self.durability));
        tokio::spawn(async move {
            let now = durability(&mut connection).await;
            let mut known = shared.lock().unwrap_or_else(PoisonError::into_inner);
            if *known != now {
                match now.warning() {
                    Some(warning) => tracing::warn!("Redis's persistence changed: {warning}"),
                    None => tracing::info!(durability = ?now, "Redis's persistence changed"),
                }
                *known = now;
            }
        });
    }

    /// The stream's key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    async fn store_now(&self, records: &Records) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        for record in records.iter() {
            pipe.cmd("XADD")
                .arg(&*self.key)
                .arg("*")
                .arg(RECORD_FIELD)
                .arg(record);
        }
        if self.replicas > 0 {
            let timeout = u64::try_from(self.deadline.as_millis()).unwrap_or(u64::MAX);
            pipe.cmd("WAIT").arg(self.replicas).arg(timeout);
        }
        let replies: Vec<redis::Value> = pipe
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| unavailable("cannot add the events to the Redis stream", e))?;
        if self.replicas > 0 {
            let acked = match replies.last() {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            };
            if acked < i64::from(self.replicas) {
                return Err(Error::store_unavailable(
                    "cannot add the events to the Redis stream",
                    format!("{acked} of {} replicas have them in time", self.replicas),
                ));
            }
        }
        Ok(())
    }
}

impl EventStore for RedisStream {
    async fn store(&self, records: Records) -> Result<(), Error> {
        let stored = match tokio::time::timeout(self.deadline, self.store_now(&records)).await {
            Ok(stored) => stored,
            Err(_) => Err(Error::store_unavailable(
                "cannot add the events to the Redis stream",
                format!("no answer within {:?}", self.deadline),
            )),
        };
        if self.outage.record(&stored) {
            self.recovered();
        }
        stored
    }

    async fn status(&self) -> StoreStatus {
        let store = format!("the Redis stream {}", self.key);
        let mut connection = self.connection.clone();
        let mut invocation = STATUS_SCRIPT.key(&*self.key);
        invocation
            .key(&*self.dead_key)
            .key(retry::schedule_key(&self.key))
            .arg(&*self.group);
        let asked = invocation.invoke_async::<(i64, i64, i64, i64, i64, i64)>(&mut connection);
        match tokio::time::timeout(self.deadline, asked).await {
            Ok(Ok((length, pending, lag, dead, retries, next_due))) => {
                let known = |n: i64| u64::try_from(n).ok();
                let backlog = match (known(pending), known(lag)) {
                    (Some(pending), Some(lag)) => pending + lag,
                    // No group yet: nothing was processed.
                    (None, _) => known(length).unwrap_or(0),
                    // A lag Redis cannot tell: at most what the stream holds.
                    (Some(_), None) => known(length).unwrap_or(0),
                };
                StoreStatus {
                    store,
                    stored: known(length),
                    backlog: Some(backlog),
                    pending: Some(known(pending).unwrap_or(0)),
                    dead_letters: known(dead),
                    retries: known(retries),
                    next_retry_at: known(next_due)
                        .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms)),
                    error: None,
                    consumers: None,
                }
            }
            Ok(Err(error)) => StoreStatus {
                store,
                error: Some(error.to_string()),
                ..StoreStatus::default()
            },
            Err(_) => StoreStatus {
                store,
                error: Some(format!("no answer within {:?}", self.deadline)),
                ..StoreStatus::default()
            },
        }
    }
}

impl fmt::Debug for RedisStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStream")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("deadline", &self.deadline)
            .field("replicas", &self.replicas)
            .field("durability", &self.durability())
            .finish_non_exhaustive()
    }
}

/// A connection that gives up on a reply or a connect after `timeout`, and
/// reconnects on later calls.
async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, Error> {
    let client = redis::Client::open(url).map_err(|e| unavailable("invalid Redis URL", e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    match tokio::time::timeout(timeout, client.get_connection_manager_with_config(config)).await {
        Ok(connected) => connected.map_err(|e| unavailable("cannot connect to Redis", e)),
        Err(_) => Err(Error::store_unavailable(
            "cannot connect to Redis",
            format!("no answer within {timeout:?}"),
        )),
    }
}

async fn durability(connection: &mut ConnectionManager) -> Durability {
    let mut setting = async |name: &str| -> Result<String, redis::RedisError> {
        let (_, value): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(connection)
            .await?;
        Ok(value)
    };
    let appendonly = setting("appendonly").await;
    let appendfsync = setting("appendfsync").await;
    match (appendonly, appendfsync) {
        (Ok(on), Ok(fsync)) if on == "yes" && fsync == "always" => Durability::Always,
        (Ok(appendonly), Ok(appendfsync)) => Durability::Weaker {
            appendonly,
            appendfsync,
        },
        (Err(e), _) | (_, Err(e)) => Durability::Unknown(e.to_string()),
    }
}

fn unavailable(context: &str, error: redis::RedisError) -> Error {
    Error::store_unavailable(context, error)
}
