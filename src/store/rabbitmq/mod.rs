//! RabbitMQ as the store (feature `rabbitmq`): the receivers publish each event to a
//! quorum queue with publisher confirms and answer 200 once the broker confirmed
//! every one; workers consume it with manual acknowledgements.
//!
//! # What "stored" means here
//!
//! A quorum queue is replicated with Raft and every node fsyncs before it
//! confirms: with three nodes, a confirmed event survives the loss of a machine.
//! With one node it survives a crash of the broker, as a synced spool line does.
//!
//! # The topology, declared on connect (idempotently)
//!
//! - the queue ([`RabbitConfig::queue`], default `comapi-webhook.events`): a quorum
//!   queue with `x-delivery-limit` (a message handed out that many times without an
//!   acknowledgement, a poison message that crashes every worker, is
//!   dead-lettered), `x-dead-letter-exchange`, `x-dead-letter-strategy=at-least-once`
//!   and `x-overflow=reject-publish` (without which dead-lettering is at most once);
//! - the dead-letter exchange (fanout) and a stream, both named `<queue>.dead`:
//!   the broker's dead letters (the delivery limit) and the worker's (the last
//!   attempt failed) land there, the worker's with the headers `x-comapi-error`
//!   (the last attempt's), `x-comapi-attempts`, `x-comapi-history` and
//!   `x-comapi-dead-at` (RFC 3339, UTC). A stream, so that the console reads it by
//!   offset without taking a delivery; what is requeued or discarded stays in it,
//!   its offset written to the stream `<queue>.console`, the console's log (with
//!   the audit entries), which every reader leaves out;
//! - while the exchange `<queue>.paused` exists, the workers take no new event.
//! - the retry schedule's delay queues (quorum), `<queue>.retry.<ms>`, one per
//!   [`RETRY_TIERS_MS`], whose messages expire back into the queue (see `retry`
//!   in the source, and *Retries* below).
//!
//! Each event is one message: the record a spool line holds, persistent, published
//! `mandatory` with `message_id` = the event id, `content_type`
//! `application/json`, and a delivery id in the header `x-comapi-delivery` that
//! stays the same across redeliveries (the gate's delivery).
//!
//! # Retries
//!
//! An event whose attempt failed with attempts left leaves the queue at once: a
//! confirmed publish to the delay queue whose TTL does not pass its due time
//! (with `x-comapi-attempts`, `x-comapi-error` and `x-comapi-due` in headers),
//! then the acknowledgement. It comes back into the queue when it expires, at the
//! tail; one back early moves on to a shorter tier. So no delivery waits
//! unacknowledged for a retry, and `consumer_timeout` is reached only by a
//! handler slower than it. Attempts are the header's count, never the broker's
//! `x-delivery-count`, which also counts hand-backs on a stop; the delivery limit
//! stays a backstop against a message that kills its workers.
//!
//! # Slow handlers
//!
//! No keep-alive is needed: RabbitMQ hands a message to no other consumer while the
//! channel that holds it is open. But the broker's `consumer_timeout` (30 minutes by
//! default) closes a channel whose delivery was not acknowledged in time: a handler
//! slower than it has its batch handed out again, and the worker starts over.
//!
//! # The status
//!
//! [`EventStore::status`] reads the ready messages and the consumers over AMQP,
//! and counts the dead letters left in the stream. How many messages consumers hold unacknowledged AMQP does not
//! tell: given [`RabbitConfig::management_url`], the status reads it (`pending`) and
//! the backlog from the broker's management API.
//!
//! ```no_run
//! use comapi_webhook::store::EventStore;
//! use comapi_webhook::store::rabbitmq::{RabbitConfig, RabbitStore};
//!
//! # async fn run() -> Result<(), comapi_webhook::Error> {
//! let config = RabbitConfig::default().with_management_url("http://127.0.0.1:15672");
//! let store = RabbitStore::connect("amqp://guest:guest@127.0.0.1:5672/%2f", config).await?;
//! let status = store.status().await;
//! println!("{:?} waiting, {:?} of them in a worker's hands", status.backlog, status.pending);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use super::broker::Outage;
use super::{EventStore, Records, StoreStatus};
use crate::Error;

mod console;
mod consumer;
mod dead_letter;
mod link;
mod management;
mod retry;
mod stream;

pub(crate) use console::DeadCursor;
pub use consumer::{RabbitConsumer, RabbitConsumers, RabbitDelivery};
use link::{connected, declare, text, unavailable, within};
pub(crate) use management::check_url as check_management_url;
pub use retry::TIERS_MS as RETRY_TIERS_MS;

/// The header that names a stored copy of an event for the gate.
pub(crate) const DELIVERY_HEADER: &str = "x-comapi-delivery";

/// Where and how events are stored in RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// The quorum queue. Default `comapi-webhook.events`.
    pub queue: String,
    /// Deliveries of one message without an acknowledgement before the broker
    /// dead-letters it (`x-delivery-limit`): a backstop against a message that
    /// kills its workers, well above the retry policy's attempts, which are counted
    /// where a handler call starts (a hand-back on a stop counts here, never
    /// there). Default 20.
    pub delivery_limit: u32,
    /// How long connecting, publishing and waiting for the confirms may take
    /// before a store fails (503). Default 5 s.
    pub deadline: Duration,
    /// Messages a consumer holds unacknowledged at most (`basic.qos`): the worker's
    /// window. Default 512.
    pub prefetch: u16,
    /// The broker's management API (`http://[user:pass@]host:15672`, plugin
    /// `rabbitmq_management`; `https://` with the feature `rabbitmq-tls`, trusting
    /// the certificates `amqps://` does), where the status reads how many messages
    /// consumers hold unacknowledged, which AMQP does not tell. Without it that
    /// figure is unknown. The AMQP URL's credentials are used unless this one
    /// carries its own. Default none.
    pub management_url: Option<String>,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig {
            queue: "comapi-webhook.events".to_owned(),
            delivery_limit: 20,
            deadline: Duration::from_secs(5),
            prefetch: 512,
            management_url: None,
        }
    }
}

impl RabbitConfig {
    /// The same settings with another queue name.
    #[must_use]
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// The same settings with another delivery limit (at least 1).
    #[must_use]
    pub fn with_delivery_limit(mut self, delivery_limit: u32) -> Self {
        self.delivery_limit = delivery_limit.max(1);
        self
    }

    /// The same settings with another deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The same settings with another prefetch (at least 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The same settings reading the unacknowledged count from the management API
    /// at `url` (see [`RabbitConfig::management_url`]).
    #[must_use]
    pub fn with_management_url(mut self, url: impl Into<String>) -> Self {
        self.management_url = Some(url.into());
        self
    }

    /// The dead-letter exchange's and queue's name: `<queue>.dead`.
    #[must_use]
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }
}

/// A connection and a confirm-mode channel on it.
struct Link {
    connection: Connection,
    channel: Channel,
}

/// The receive step's store on RabbitMQ (see the [module](self)): cheap to clone;
/// clones share one connection and one confirm-mode channel, on which concurrent
/// requests publish side by side, each waiting for its own confirms only. It
/// reconnects by itself after the broker went away.
#[derive(Clone)]
pub struct RabbitStore {
    url: Arc<str>,
    config: Arc<RabbitConfig>,
    link: Arc<Mutex<Option<Link>>>,
    outage: Outage,
    management: Option<Arc<management::Management>>,
    /// Whether the log said, in this outage, that the queue takes no publish.
    told_no_leader: Arc<std::sync::atomic::AtomicBool>,
    /// Why the queue takes no publish, while it does not.
    diagnosis: Arc<Mutex<Option<String>>>,
    /// Its reading of the dead letter and the console's log.
    view: Arc<Mutex<console::DeadView>>,
}

impl std::fmt::Debug for RabbitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitStore")
            .field("queue", &self.config.queue)
            .finish_non_exhaustive()
    }
}

impl RabbitStore {
    /// Connects to the broker at `url` (`amqp://user:pass@host:port/vhost`, or
    /// `amqps://…` with the feature `rabbitmq-tls`, which trusts the system's root
    /// certificates or those in the PEM file `SSL_CERT_FILE` names) and declares
    /// the topology.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when the broker cannot be reached in time or
    /// refuses the topology (a queue of the same name with other arguments), or
    /// [`RabbitConfig::management_url`] is not an `http://` URL (or `https://`
    /// with `rabbitmq-tls`).
    pub async fn connect(url: &str, config: RabbitConfig) -> Result<Self, Error> {
        let management = match &config.management_url {
            None => None,
            Some(base) => Some(Arc::new(
                management::Management::new(base, url, &config.queue).map_err(|reason| {
                    Error::store_unavailable("cannot use the RabbitMQ management API", reason)
                })?,
            )),
        };
        let store = RabbitStore {
            management,
            url: url.into(),
            outage: Outage::new("RabbitMQ", config.queue.as_str().into()),
            config: Arc::new(config),
            link: Arc::default(),
            told_no_leader: Arc::default(),
            diagnosis: Arc::default(),
            view: Arc::default(),
        };
        store.channel().await?;
        Ok(store)
    }

    /// The queue's name.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.config.queue
    }

    /// The channel, connecting first when there is none or it broke.
    async fn channel(&self) -> Result<Channel, Error> {
        let mut link = self.link.lock().await;
        if let Some(Link { channel, .. }) = link.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let context = "cannot connect to RabbitMQ";
        let receiver = "comapi-webhook receiver";
        let (connection, channel) = connected(
            &self.url,
            receiver,
            &self.config,
            context,
            async |connection| {
                let channel = connection.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                declare(&channel, &self.config).await?;
                Ok(channel)
            },
        )
        .await
        .map_err(|e| console::old_dead_letter(e, &self.config))?;
        let made = Link {
            connection,
            channel,
        };
        let channel = made.channel.clone();
        if let Some(old) = link.replace(made) {
            drop(old.connection); // its I/O ends with its last handle
        }
        Ok(channel)
    }

    async fn publish(&self, records: &Records) -> Result<(), Error> {
        let channel = self.channel().await?;
        let mut confirms = Vec::with_capacity(usize::try_from(records.len()).unwrap_or(0));
        for record in records.iter() {
            let confirm = channel
                .basic_publish(
                    ShortString::from(""),
                    self.config.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    record,
                    properties(record),
                )
                .await
                .map_err(|e| unavailable("cannot publish the events", e))?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm
                .await
                .map_err(|e| unavailable("no confirm for the events", e))?;
            match confirmation {
                lapin::Confirmation::Ack(None) => {}
                lapin::Confirmation::Ack(Some(_)) => {
                    return Err(Error::store_unavailable(
                        "cannot store the events in RabbitMQ",
                        format!(
                            "queue {} is not there: the event was returned",
                            self.config.queue
                        ),
                    ));
                }
                lapin::Confirmation::Nack(_) => {
                    return Err(Error::store_unavailable(
                        "cannot store the events in RabbitMQ",
                        "the broker refused them (nack): the queue is full, or a quorum queue \
                     without a leader",
                    ));
                }
                lapin::Confirmation::NotRequested => {
                    return Err(Error::store_unavailable(
                        "cannot store the events in RabbitMQ",
                        "the channel is not in confirm mode",
                    ));
                }
            }
        }
        Ok(())
    }

    /// After a store that the broker refused (a nack) or never confirmed: looks,
    /// in the background (the 503 waits for nothing more), whether the queue still
    /// exists. Then it is full or, a quorum queue, has no leader: the status page
    /// says so while storing fails, and the log says once per outage what to run.
    fn diagnose_later(&self, error: &Error) {
        let Error::StoreUnavailable { source, .. } = error else {
            return;
        };
        let why = source.to_string();
        if !why.starts_with("no confirm within") && !why.contains("(nack)") {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move { store.diagnose().await });
    }

    async fn diagnose(&self) {
        let queue = self.config.queue.as_str();
        let exists = async {
            let channel = self.channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let asked = channel.queue_declare(queue.into(), passive, FieldTable::default());
            within(self.config.deadline, "cannot look at the queue", asked).await
        };
        // Stored again meanwhile: nothing to say.
        if exists.await.is_err() || !self.outage.failing() {
            return;
        }
        let cause = format!(
            "queue {queue} exists but takes no publish: it is full (x-max-length), or a quorum \
             queue without a leader (`rabbitmq-queues quorum_status {queue}` shows its members)"
        );
        if !self.told_no_leader.swap(true, Ordering::AcqRel) {
            tracing::error!(
                %queue,
                "{cause}. Run `rabbitmq-queues quorum_status {queue}` to see them; the recovery \
                 is in examples/README.md, \"A queue without a leader\""
            );
        }
        *self.diagnosis.lock().await = Some(cause);
    }

    /// Forgets the link after a failure: the next store connects again.
    async fn forget_link(&self) {
        self.link.lock().await.take();
    }
}

impl EventStore for RabbitStore {
    async fn store(&self, records: Records) -> Result<(), Error> {
        let stored = match tokio::time::timeout(self.config.deadline, self.publish(&records)).await
        {
            Ok(stored) => stored,
            Err(_) => Err(Error::store_unavailable(
                "cannot store the events in RabbitMQ",
                format!("no confirm within {:?}", self.config.deadline),
            )),
        };
        match &stored {
            Err(error) => {
                self.forget_link().await;
                self.diagnose_later(error);
            }
            Ok(()) => {
                if self.told_no_leader.swap(false, Ordering::AcqRel) {
                    self.diagnosis.lock().await.take();
                }
            }
        }
        self.outage.record(&stored);
        stored
    }

    /// The queue's consumers and dead letters, from AMQP. The backlog is its ready
    /// messages, from AMQP, unless [`RabbitConfig::management_url`] is set: then
    /// the backlog (ready and unacknowledged) and `pending` (unacknowledged) are the
    /// management API's last sample, which lags by its statistics interval (5 s
    /// by default).
    async fn status(&self) -> StoreStatus {
        let store = format!("the RabbitMQ quorum queue {}", self.config.queue);
        // Each under the deadline on its own: a management API that does not answer
        // leaves the AMQP figures standing.
        let deadline = self.config.deadline;
        let late = |what: &str| {
            Error::store_unavailable(what.to_owned(), format!("no answer within {deadline:?}"))
        };
        let counts = async {
            let asked = async {
                let channel = self.channel().await?;
                consumer::counts(&channel, &self.config).await
            };
            tokio::time::timeout(deadline, asked)
                .await
                .unwrap_or_else(|_| Err(late("cannot read the queue's counts")))
        };
        let sample = async {
            match &self.management {
                Some(management) => tokio::time::timeout(deadline, management.sample())
                    .await
                    .unwrap_or_else(|_| Err(late("cannot read the unacknowledged count"))),
                None => Ok(None),
            }
        };
        let dead = async {
            tokio::time::timeout(deadline, self.dead_count_and_audit(0))
                .await
                .unwrap_or_else(|_| Err(late("cannot read the dead letter")))
        };
        let (counts, sample, dead) = tokio::join!(counts, sample, dead);
        let counts = match counts {
            Ok(counts) => counts,
            Err(error) => {
                return StoreStatus {
                    store,
                    error: Some(error.report().to_string()),
                    ..StoreStatus::default()
                };
            }
        };
        let (sample, error) = match sample {
            Ok(sample) => (sample, None),
            Err(error) => (None, Some(error.report().to_string())),
        };
        let (dead, error) = match dead {
            Ok((dead, _)) => (Some(dead), error),
            Err(e) => (None, error.or_else(|| Some(e.report().to_string()))),
        };
        // Storing failing while the queue answers: say why on the page too.
        let diagnosis = self.diagnosis.lock().await.clone();
        let error = error.or(diagnosis).or_else(|| self.outage.why());
        StoreStatus {
            store,
            stored: None,
            backlog: Some(sample.map_or(counts.ready, |s| s.messages)),
            pending: sample.map(|s| s.unacknowledged),
            dead_letters: dead,
            retries: Some(counts.retries),
            // When the first is due the broker does not tell without taking it.
            next_retry_at: None,
            consumers: Some(counts.consumers),
            error,
        }
    }
}

/// A message's properties: persistent, JSON, the event id as `message_id`, and a
/// delivery id of its own.
fn properties(record: &[u8]) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(DELIVERY_HEADER.into(), text(&delivery_id()));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    match crate::store::spool::record_event(record, String::new) {
        Ok(event) => properties.with_message_id(event.event_id().into()),
        Err(_) => properties,
    }
}

/// An id no other publish of any receiver gives: this process's start (ns), its
/// id, and a counter.
pub(super) fn delivery_id() -> String {
    static STARTED: std::sync::LazyLock<u128> = std::sync::LazyLock::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}-{:x}-{}",
        *STARTED,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
