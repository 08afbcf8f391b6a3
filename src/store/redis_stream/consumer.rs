//! `StreamConsumer`: one worker's place in the consumer group, as the worker's
//! [`EventSource`].

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gate::{KeepAlive, OwnConnection};

use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};

use super::retry;
use super::scripts::{FORGET_SCRIPT, TRIM_SCRIPT};
use super::{RECORD_FIELD, RedisStreamConfig, connect, unavailable};
use crate::store::broker::{ConsumerConfig, Consumers, StopHandle};
use crate::store::spool::record_event;
use crate::store::{Delivery, EventSource, RetryDue};
use crate::{Error, Event};

/// How long one read waits for new entries before it looks at the stop flag and
/// for entries to take over.
const READ_BLOCK: Duration = Duration::from_millis(250);
/// How often finished entries are trimmed from the stream, at most.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// One worker's consumer in the stream's consumer group: the worker's
/// [`EventSource`] on Redis.
///
/// It reads new entries (`XREADGROUP`), takes over entries another consumer held
/// longer than the lease without acknowledging them (`XAUTOCLAIM`: a crashed
/// worker's events), keeps the entries it is still on from being taken over (every
/// third of a lease, while a handler runs long or waits to retry), acknowledges finished ones (`XACK`, one round trip per
/// batch), keeps dead letters in `<prefix>events:dead`, and trims what every group
/// acknowledged. Decide with [`RedisGate`](crate::gate::RedisGate): the entry id is the
/// delivery, so across any number of workers each event is processed once,
/// barring a lease expiry.
///
/// ```no_run
/// # async fn demo() -> Result<(), comapi_webhook::Error> {
/// use comapi_webhook::store::redis_stream::{RedisStreamConfig, StreamConsumer};
/// use comapi_webhook::Event;
/// use comapi_webhook::gate::{RedisGate, RedisGateConfig};
/// use comapi_webhook::worker::{RetryPolicy, run_worker};
///
/// let url = "redis://127.0.0.1:6379/";
/// let consumer = StreamConsumer::connect(url, RedisStreamConfig::default(), "worker-1").await?;
/// let stop = consumer.stop_handle(); // stop.stop() on SIGTERM
/// let gate = RedisGate::connect(url, RedisGateConfig::default()).await?;
/// run_worker(consumer, &gate, |event: Event<'static>| async move {
///     println!("{} {:?}", event.name(), event.message_id());
///     Ok::<(), std::io::Error>(())
/// }, RetryPolicy::default()).await?;
/// # Ok(()) }
/// ```
pub struct StreamConsumer {
    pub(super) client: redis::Client,
    pub(super) connection: ConnectionManager,
    pub(super) key: String,
    pub(super) dead_key: String,
    /// The retry schedule's sorted set and records.
    pub(super) retry_key: String,
    pub(super) records_key: String,
    pub(super) group: String,
    pub(super) name: String,
    pub(super) lease: Duration,
    pub(super) batch: usize,
    pub(super) stop: StopHandle,
    /// The entries this consumer holds: kept alive from the worker's keep-alive
    /// thread, so the lock is tokio's (shared across runtimes).
    pub(super) held: Arc<tokio::sync::Mutex<Held>>,
    /// Where the next take-over scan starts (`0-0`: from the beginning).
    pub(super) claim_from: String,
    pub(super) last_claim: Option<Instant>,
    /// `None` until the first trim, which comes with the first acknowledgement.
    pub(super) last_trim: Option<Instant>,
    /// When the retry schedule was last asked, and when its first retry is due
    /// (ms since the Unix epoch), as far as this consumer knows.
    pub(super) last_retries: Option<Instant>,
    pub(super) next_retry_ms: Option<u64>,
    /// Moves into the retry schedule not yet sent: the member, the stream entry
    /// (empty for a retry moved again), the due time (ms), the hash value. Sent
    /// before the next acknowledgement.
    pub(super) moving: Vec<(String, String, u64, Vec<u8>)>,
    /// The pause mark as last read, and when.
    pub(super) paused: bool,
    pub(super) pause_read: Option<Instant>,
}

/// The entries a consumer holds, each with how many times it was delivered.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// Entries of the last batch not yet finished, in order.
    pub(super) in_hand: VecDeque<(String, u32)>,
    /// Finished entries not yet acknowledged.
    pub(super) finished: Vec<String>,
    /// Retries from the schedule in hand (leased), and finished ones to remove.
    pub(super) retries: Vec<String>,
    pub(super) retries_done: Vec<String>,
    /// Retries in hand moved back into the schedule: finished, but kept there.
    pub(super) rescheduled: Vec<String>,
}

/// One stream entry handed to the worker.
#[derive(Debug, Clone)]
pub struct StreamDelivery {
    pub(super) id: String,
    pub(super) record: Vec<u8>,
    pub(super) times_delivered: u32,
    /// From the retry schedule: the attempts made before.
    pub(super) retry: Option<u32>,
    /// Its attempts so far, from the retry schedule ([`history`](crate::store::history)).
    pub(super) history: String,
}

impl Delivery for StreamDelivery {
    fn id(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }

    fn record(&self) -> &[u8] {
        &self.record
    }

    fn event(&self) -> Result<Event<'_>, Error> {
        record_event(&self.record, || format!("in stream entry {}", self.id))
    }

    fn times_delivered(&self) -> u32 {
        self.times_delivered
    }

    fn attempts(&self) -> u32 {
        self.retry.unwrap_or(0)
    }
}

impl StreamConsumer {
    /// Joins the consumer group as `name` (unique per worker process: a host name
    /// and process id do), creating the group, and the stream, if missing. A new
    /// group starts at the beginning of the stream, so nothing stored before the
    /// first worker started is missed.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] if Redis cannot be reached or refuses the group.
    pub async fn connect(
        url: &str,
        config: RedisStreamConfig,
        name: impl Into<String>,
    ) -> Result<Self, Error> {
        // A read blocks its connection for up to READ_BLOCK: leave room for it.
        let connection = connect(url, config.deadline.max(READ_BLOCK * 2)).await?;
        let client = redis::Client::open(url).map_err(|e| unavailable("invalid Redis URL", e))?;
        let consumer = StreamConsumer {
            client,
            connection,
            key: config.stream_key(),
            dead_key: config.dead_key(),
            retry_key: retry::schedule_key(&config.stream_key()),
            records_key: retry::records_key(&config.stream_key()),
            group: config.group,
            name: name.into(),
            lease: config.lease,
            batch: config.batch.max(1),
            stop: StopHandle::default(),
            held: Arc::default(),
            claim_from: "0-0".to_owned(),
            last_claim: None,
            last_trim: None,
            last_retries: None,
            next_retry_ms: None,
            moving: Vec::new(),
            paused: false,
            pause_read: None,
        };
        let created: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&consumer.key)
            .arg(&consumer.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut consumer.connection.clone())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => {
                Err(unavailable("cannot create the consumer group", e))
            }
            _ => Ok(consumer),
        }
    }

    /// The same consumer, stopped by `stop` (a handle shared with consumers made
    /// before it, such as the one a restarted worker replaces) instead of its own.
    #[must_use]
    pub fn stopped_by(mut self, stop: &StopHandle) -> Self {
        self.stop = stop.clone();
        self
    }

    /// A handle that asks this consumer to stop (for a signal handler).
    #[must_use]
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// This consumer's name in the group.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    fn millis(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sends the moves into the retry schedule, acknowledges the finished entries,
    /// and now and then trims the stream.
    async fn acknowledge(&mut self) -> Result<(), Error> {
        self.send_moves().await?;
        let finished = self.held.lock().await.finished.clone();
        if !finished.is_empty() {
            let _: i64 = redis::cmd("XACK")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&finished)
                .query_async(&mut self.connection)
                .await
                .map_err(|e| unavailable("cannot acknowledge stream entries", e))?;
            let mut held = self.held.lock().await;
            held.finished.retain(|id| !finished.contains(id));
        }
        self.remove_done_retries().await?;
        if self.last_trim.is_none_or(|at| at.elapsed() >= TRIM_EVERY) {
            self.last_trim = Some(Instant::now());
            // Best effort: what is not trimmed now is trimmed next time.
            let _: Result<i64, _> = TRIM_SCRIPT
                .key(&self.key)
                .invoke_async(&mut self.connection)
                .await;
        }
        Ok(())
    }

    /// Entries other consumers held longer than the lease, now this one's.
    async fn take_over(&mut self) -> Result<Vec<StreamDelivery>, Error> {
        let due = self
            .last_claim
            .is_none_or(|at| at.elapsed() >= self.lease / 2);
        if !due {
            return Ok(Vec::new());
        }
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.name)
            .arg(Self::millis(self.lease))
            .arg(&self.claim_from)
            .arg("COUNT")
            .arg(self.batch)
            .query_async(&mut self.connection)
            .await
            .map_err(|e| unavailable("cannot take over stream entries", e))?;
        self.claim_from = reply.next_stream_id;
        if self.claim_from == "0-0" {
            // A full pass: the next one after half a lease.
            self.last_claim = Some(Instant::now());
            self.forget_idle_consumers().await;
        }
        let (Some(first), Some(last)) = (reply.claimed.first(), reply.claimed.last()) else {
            return Ok(Vec::new());
        };
        let counts: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(reply.claimed.len())
            .arg(&self.name)
            .query_async(&mut self.connection)
            .await
            .map_err(|e| unavailable("cannot read stream delivery counts", e))?;
        let times: HashMap<String, usize> = counts
            .ids
            .into_iter()
            .map(|p| (p.id, p.times_delivered))
            .collect();
        Ok(reply
            .claimed
            .into_iter()
            .map(|entry| {
                let count = times.get(&entry.id).copied().unwrap_or(2);
                delivery(entry, u32::try_from(count).unwrap_or(u32::MAX))
            })
            .collect())
    }

    /// Marks this consumer alive (in the hash `<stream>:consumers`) and removes
    /// from the group the consumers with nothing pending, idle and not marked alive
    /// for longer than the lease: those of workers that stopped or were killed,
    /// once their entries were taken over. One that is alive after all comes back
    /// with its next read. A failure waits for the next pass.
    async fn forget_idle_consumers(&mut self) {
        let forgotten: Result<i64, _> = FORGET_SCRIPT
            .key(&self.key)
            .key(format!("{}:consumers", self.key))
            .arg(&self.group)
            .arg(Self::millis(self.lease))
            .arg(&self.name)
            .invoke_async(&mut self.connection)
            .await;
        match forgotten {
            Ok(0) => {}
            Ok(n) => tracing::info!(consumers = n, "idle consumers with nothing pending removed"),
            Err(error) => tracing::debug!(%error, "cannot remove idle consumers"),
        }
    }

    /// New entries, waiting up to [`READ_BLOCK`] for some, and no longer than
    /// until the first retry this consumer knows of is due.
    async fn read_new(&mut self) -> Result<Vec<StreamDelivery>, Error> {
        let block = self.read_block(READ_BLOCK);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(self.batch)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut self.connection)
            .await
            .map_err(|e| unavailable("cannot read the stream", e))?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| delivery(entry, 1))
            .collect())
    }

    /// Marks the entries read and not started idle for a whole lease, so that the
    /// next look of another worker takes them; their delivery counts go back to
    /// what they were, since they were never attempted here.
    async fn hand_back(&mut self) -> Result<(), Error> {
        // Held across the round trips, so that no keep-alive undoes the hand-back.
        let mut held = self.held.lock().await;
        retry::hand_back(&mut self.connection, &self.retry_key, &mut held).await?;
        let mut by_count: HashMap<u32, Vec<String>> = HashMap::new();
        for (id, times) in held.in_hand.drain(..) {
            by_count
                .entry(times.saturating_sub(1))
                .or_default()
                .push(id);
        }
        for (count, ids) in by_count {
            let _: Vec<String> = redis::cmd("XCLAIM")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&self.name)
                .arg(0)
                .arg(&ids)
                .arg("IDLE")
                .arg(Self::millis(self.lease))
                .arg("RETRYCOUNT")
                .arg(count)
                .arg("JUSTID")
                .query_async(&mut self.connection)
                .await
                .map_err(|e| unavailable("cannot hand back stream entries", e))?;
        }
        drop(held);
        Ok(())
    }
}

fn delivery(entry: StreamId, times_delivered: u32) -> StreamDelivery {
    let record = entry.get::<Vec<u8>>(RECORD_FIELD).unwrap_or_default();
    StreamDelivery {
        id: entry.id,
        record,
        times_delivered,
        retry: None,
        history: String::new(),
    }
}

impl EventSource for StreamConsumer {
    type Delivery = StreamDelivery;

    async fn next_batch(&mut self) -> Result<Option<Vec<StreamDelivery>>, Error> {
        self.acknowledge().await?;
        if self.stop.is_stopped() {
            return Ok(None);
        }
        let retries = self.take_due_retries().await?;
        if !retries.is_empty() {
            let mut held = self.held.lock().await;
            held.retries.extend(retries.iter().map(|d| d.id.clone()));
            return Ok(Some(retries));
        }
        let mut batch = self.take_over().await?;
        if batch.is_empty() {
            // Empty after a second's wait: the worker does its other work, and asks again.
            batch = self.read_new().await?;
        }
        self.held
            .lock()
            .await
            .in_hand
            .extend(batch.iter().map(|d| (d.id.clone(), d.times_delivered)));
        Ok(Some(batch))
    }

    async fn finished(&mut self, delivery: &StreamDelivery) -> Result<(), Error> {
        let unacknowledged = {
            let mut held = self.held.lock().await;
            if delivery.retry.is_some() {
                held.retries.retain(|id| *id != delivery.id);
                let before = held.rescheduled.len();
                held.rescheduled.retain(|id| *id != delivery.id);
                if held.rescheduled.len() == before {
                    held.retries_done.push(delivery.id.clone());
                }
                let waiting = held.retries_done.len() + held.finished.len();
                drop(held);
                if self.stop.is_stopped() || waiting >= self.batch {
                    self.acknowledge().await?;
                }
                return Ok(());
            }
            // Finished in the order handed out, as a rule: the front one.
            if held
                .in_hand
                .front()
                .is_some_and(|(id, _)| *id == delivery.id)
            {
                held.in_hand.pop_front();
            } else {
                held.in_hand.retain(|(id, _)| *id != delivery.id);
            }
            held.finished.push(delivery.id.clone());
            held.finished.len()
        };
        if self.stop.is_stopped() || unacknowledged >= self.batch {
            self.acknowledge().await?;
        }
        Ok(())
    }

    fn keep_alive(&self) -> Option<KeepAlive> {
        let connection = OwnConnection::new(self.client.clone());
        let held = Arc::clone(&self.held);
        let (key, group, name) = (self.key.clone(), self.group.clone(), self.name.clone());
        let (retry_key, lease) = (self.retry_key.clone(), self.lease);
        Some(KeepAlive::new(self.lease / 3, move |_claims| {
            let (connection, held) = (connection.clone(), Arc::clone(&held));
            let (key, group, name) = (key.clone(), group.clone(), name.clone());
            let retry_key = retry_key.clone();
            Box::pin(async move {
                // Held across the round trip: a hand-back waits for it, never undone.
                let held = held.lock().await;
                if !held.retries.is_empty() {
                    // The leases of the retries in hand, renewed.
                    let command = retry::renewal(&retry_key, &held.retries, lease);
                    let renewed = "cannot keep retries";
                    connection.run::<i64>(&command, renewed).await?;
                }
                let ids: Vec<&String> = held
                    .in_hand
                    .iter()
                    .map(|(id, _)| id)
                    .chain(&held.finished)
                    .collect();
                if ids.is_empty() {
                    return Ok(());
                }
                // Resets their idle time; their delivery counts stay as they are.
                let mut command = redis::cmd("XCLAIM");
                command
                    .arg(&key)
                    .arg(&group)
                    .arg(&name)
                    .arg(0)
                    .arg(&ids)
                    .arg("JUSTID");
                let kept = "cannot keep stream entries";
                connection
                    .run::<Vec<String>>(&command, kept)
                    .await
                    .map(drop)
            })
        }))
    }

    async fn dead_letter(
        &mut self,
        delivery: &StreamDelivery,
        error: &str,
        attempts: u32,
    ) -> Result<(), Error> {
        self.add_dead(delivery, error, attempts).await
    }

    async fn schedule_retry(
        &mut self,
        delivery: &StreamDelivery,
        retry: &RetryDue<'_>,
    ) -> Result<(), Error> {
        self.move_out(delivery, retry).await;
        Ok(())
    }

    async fn set_aside(&mut self, delivery: &StreamDelivery, error: &Error) -> Result<(), Error> {
        self.add_dead(delivery, &error.report().to_string(), 0)
            .await
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.acknowledge().await?;
        self.hand_back().await
    }

    fn stopping(&self) -> bool {
        self.stop.is_stopped()
    }

    async fn paused(&mut self) -> bool {
        self.paused_now().await
    }
}

/// The stream's consumers for a supervised [`Worker`](crate::Worker): each run
/// connects a new [`StreamConsumer`] of the group, all under one name.
pub type StreamConsumers = Consumers<RedisStreamConfig>;

impl ConsumerConfig for RedisStreamConfig {
    type Consumer = StreamConsumer;

    async fn connect(
        &self,
        url: &str,
        name: &str,
        stop: &StopHandle,
    ) -> Result<StreamConsumer, Error> {
        let consumer = StreamConsumer::connect(url, self.clone(), name).await?;
        tracing::info!(consumer = %name, "worker reading the Redis stream");
        Ok(consumer.stopped_by(stop))
    }
}

impl fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("name", &self.name)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}
