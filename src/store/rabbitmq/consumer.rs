//! `RabbitConsumer`: one worker's consumer of the queue, as the worker's
//! [`EventSource`], and the queue's counts.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer, PublisherConfirm};

use super::retry::{self, ATTEMPTS_HEADER, DUE_HEADER, TIERS_MS};
use super::{DELIVERY_HEADER, RabbitConfig, connected, dead_letter, declare, unavailable, within};
use crate::store::broker::{ConsumerConfig, Consumers, StopHandle};
use crate::store::spool::record_event;
use crate::store::{Delivery, EventSource, RetryDue};
use crate::{Error, Event};

/// How long one read waits for a first message before the worker does its other
/// work.
const READ_WAIT: Duration = Duration::from_millis(250);

/// One message handed to the worker.
#[derive(Debug, Clone)]
pub struct RabbitDelivery {
    pub(super) tag: u64,
    pub(super) id: String,
    pub(super) record: Vec<u8>,
    pub(super) times_delivered: u32,
    /// Handler calls made before (a retry's `x-comapi-attempts`).
    pub(super) attempts: u32,
    /// When a retry is due (`x-comapi-due`, ms since the Unix epoch).
    pub(super) due_ms: Option<u64>,
    pub(super) properties: BasicProperties,
}

impl Delivery for RabbitDelivery {
    fn id(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.id)
    }

    fn record(&self) -> &[u8] {
        &self.record
    }

    fn event(&self) -> Result<Event<'_>, Error> {
        record_event(&self.record, || format!("in message {}", self.id))
    }

    fn times_delivered(&self) -> u32 {
        self.times_delivered
    }

    fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// A header's value as text, if it is a string.
pub(super) fn header_text<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<Cow<'a, str>> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes())),
        AMQPValue::ShortString(text) => Some(Cow::Borrowed(text.as_str())),
        _ => None,
    }
}

/// A header's value as a number, if it is one.
pub(super) fn header_number(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    match headers?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn delivery(message: lapin::message::Delivery) -> RabbitDelivery {
    let headers = message.properties.headers().as_ref();
    // A quorum queue counts the earlier deliveries that were not acknowledged.
    let earlier = header_number(headers, "x-delivery-count")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(u32::from(message.redelivered));
    // A message published by another tool has no delivery id: its tag within this
    // channel names it (a redelivery is then a copy the gate calls fresh).
    let id = header_text(headers, DELIVERY_HEADER)
        .map_or_else(|| format!("tag-{}", message.delivery_tag), Cow::into_owned);
    let attempts = header_number(headers, ATTEMPTS_HEADER)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    let due_ms = header_number(headers, DUE_HEADER).and_then(|n| u64::try_from(n).ok());
    RabbitDelivery {
        tag: message.delivery_tag,
        id,
        record: message.data,
        times_delivered: earlier.saturating_add(1),
        attempts,
        due_ms,
        properties: message.properties,
    }
}

/// One worker's consumer of the queue: the worker's [`EventSource`] on RabbitMQ.
///
/// It holds at most [`RabbitConfig::prefetch`] messages unacknowledged; each is
/// acknowledged once the worker finished it (processed, skipped, dead-lettered or
/// set aside), in batches. The worker's dead letter is a confirmed publish to the
/// dead-letter queue, the record with the error and the attempts in headers, and
/// only then the acknowledgement. Stopped (see [`RabbitConsumers`]), it finishes the
/// event in hand, acknowledges and closes its channel: the broker hands what it
/// held and had not finished to another consumer.
pub struct RabbitConsumer {
    pub(super) connection: Connection,
    channel: Channel,
    messages: Consumer,
    pub(super) config: RabbitConfig,
    /// The last finished delivery tag: every earlier one is finished too, as the
    /// worker finishes deliveries in the order it got them.
    finished_up_to: Option<u64>,
    /// The last delivery tag acknowledged (cumulatively).
    acknowledged_up_to: Option<u64>,
    stop: StopHandle,
    /// Whether the consumer was cancelled (on a stop).
    cancelled: bool,
    /// Moves into the retry schedule published and not yet confirmed, oldest
    /// first: nothing from a move's delivery on is acknowledged before its confirm.
    moving: VecDeque<Move>,
    /// The pause, as last read, and when.
    pub(super) paused: bool,
    pub(super) pause_read: Option<std::time::Instant>,
}

/// A move into the retry schedule whose confirm is still to come.
struct Move {
    /// The last delivery finished before the moved one: what may be acknowledged
    /// while this move is unconfirmed.
    before: Option<u64>,
    queue: String,
    confirm: PublisherConfirm,
    /// When it was published: unconfirmed past the store's deadline, it fails.
    published: tokio::time::Instant,
}

impl std::fmt::Debug for RabbitConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConsumer")
            .field("queue", &self.config.queue)
            .field("finished_up_to", &self.finished_up_to)
            .finish_non_exhaustive()
    }
}

impl RabbitConsumer {
    /// Connects to the broker at `url`, declares the topology and starts consuming
    /// as `name`.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when the broker cannot be reached in time.
    pub async fn connect(url: &str, config: RabbitConfig, name: &str) -> Result<Self, Error> {
        let context = "cannot consume from RabbitMQ";
        let (connection, (channel, messages)) =
            connected(url, name, &config, context, async |connection| {
                let channel = connection.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                declare(&channel, &config).await?;
                channel
                    .basic_qos(config.prefetch, BasicQosOptions::default())
                    .await?;
                let messages = channel
                    .basic_consume(
                        config.queue.as_str().into(),
                        name.into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok((channel, messages))
            })
            .await
            .map_err(|e| super::console::old_dead_letter(e, &config))?;
        Ok(RabbitConsumer {
            connection,
            channel,
            messages,
            config,
            finished_up_to: None,
            acknowledged_up_to: None,
            stop: StopHandle::default(),
            cancelled: false,
            moving: VecDeque::new(),
            paused: false,
            pause_read: None,
        })
    }

    /// The same consumer, stopped by `stop`.
    #[must_use]
    pub fn stopped_by(mut self, stop: &StopHandle) -> Self {
        self.stop = stop.clone();
        self
    }

    /// Acknowledges every finished delivery before the first unconfirmed move.
    /// With `wait`, every move is confirmed first (so every finished delivery is
    /// acknowledged); without, only the confirms already in are taken.
    async fn acknowledge(&mut self, wait: bool) -> Result<(), Error> {
        while let Some(front) = self.moving.front_mut() {
            let deadline = self.config.deadline;
            let confirmation = if wait {
                let until = front.published + deadline;
                match tokio::time::timeout_at(until, &mut front.confirm).await {
                    Ok(confirmation) => confirmation,
                    Err(_) => return Err(no_confirm(&front.queue, deadline)),
                }
            } else {
                match (&mut front.confirm).now_or_never() {
                    Some(confirmation) => confirmation,
                    None if front.published.elapsed() < deadline => break,
                    None => return Err(no_confirm(&front.queue, deadline)),
                }
            };
            taken(&front.queue, confirmation)?;
            self.moving.pop_front();
        }
        let up_to = match self.moving.front() {
            Some(first) => first.before,
            None => self.finished_up_to,
        };
        if let Some(tag) = up_to.filter(|&tag| Some(tag) > self.acknowledged_up_to) {
            let multiple = BasicAckOptions { multiple: true };
            within(self.config.deadline, "cannot acknowledge messages", async {
                self.channel.basic_ack(tag, multiple).await
            })
            .await?;
            self.acknowledged_up_to = Some(tag);
        }
        Ok(())
    }

    /// Stops the broker's deliveries to this consumer (what it holds stays its
    /// own until acknowledged or the channel closes): asked once a stop is seen,
    /// so that little is handed back.
    async fn cancel(&mut self) {
        if self.cancelled {
            return;
        }
        self.cancelled = true;
        let tag = self.messages.tag();
        let cancelled = within(self.config.deadline, "cannot cancel the consumer", async {
            self.channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
        })
        .await;
        if let Err(error) = cancelled {
            tracing::debug!(error = %error.report(), "cannot cancel the consumer");
        }
    }

    /// Retries back before their due time: each on to the delay queue of its tier
    /// (ms), all confirmed, then each acknowledged on its own (never cumulatively:
    /// earlier deliveries may still be in the worker's hands).
    async fn wait_longer(&mut self, early: Vec<(RabbitDelivery, u64)>) -> Result<(), Error> {
        let mut confirms = Vec::with_capacity(early.len());
        for (delivery, tier) in &early {
            let properties = delivery
                .properties
                .clone()
                .with_headers(retry::clean(&delivery.properties));
            let queue = retry::tier_queue(&self.config, *tier);
            let record = &delivery.record;
            let confirm = publish(&self.channel, &self.config, &queue, record, properties).await?;
            confirms.push((queue, confirm));
        }
        for (queue, confirm) in confirms {
            confirmed(&self.config, &queue, confirm).await?;
        }
        for (delivery, _) in early {
            within(self.config.deadline, "cannot acknowledge a retry", async {
                self.channel
                    .basic_ack(delivery.tag, BasicAckOptions::default())
                    .await
            })
            .await?;
        }
        Ok(())
    }
}

impl RabbitConsumer {
    /// The next message from the broker (`Some(None)` when it ended the
    /// consumer), or `None` after [`READ_WAIT`] without one. Confirms of moves
    /// that come in meanwhile are taken, and what they held back acknowledged, so
    /// that the prefetch window refills.
    async fn first_message(
        &mut self,
    ) -> Result<Option<Option<Result<lapin::message::Delivery, lapin::Error>>>, Error> {
        let until = tokio::time::Instant::now() + READ_WAIT;
        while let Some(front) = self.moving.front_mut() {
            tokio::select! {
                message = self.messages.next() => return Ok(Some(message)),
                confirmation = &mut front.confirm => {
                    taken(&front.queue, confirmation)?;
                    self.moving.pop_front();
                    self.acknowledge(false).await?;
                }
                () = tokio::time::sleep_until(until) => return Ok(None),
            }
        }
        Ok(tokio::time::timeout_at(until, self.messages.next())
            .await
            .ok())
    }
}

/// Publishes `record` to `queue` (through the default exchange), mandatory, and
/// waits for the broker's confirm.
pub(super) async fn publish_confirmed(
    channel: &Channel,
    config: &RabbitConfig,
    queue: &str,
    record: &[u8],
    properties: BasicProperties,
) -> Result<(), Error> {
    let confirm = publish(channel, config, queue, record, properties).await?;
    confirmed(config, queue, confirm).await
}

/// Publishes `record` to `queue` (through the default exchange), mandatory; the
/// broker's confirm is to come.
async fn publish(
    channel: &Channel,
    config: &RabbitConfig,
    queue: &str,
    record: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, Error> {
    within(config.deadline, "cannot publish to RabbitMQ", async {
        channel
            .basic_publish(
                ShortString::from(""),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                record,
                properties,
            )
            .await
    })
    .await
}

/// Waits for the broker's confirm of a publish to `queue`.
async fn confirmed(
    config: &RabbitConfig,
    queue: &str,
    confirm: PublisherConfirm,
) -> Result<(), Error> {
    let confirmation = within(config.deadline, "cannot publish to RabbitMQ", confirm).await?;
    taken(queue, Ok(confirmation))
}

fn no_confirm(queue: &str, deadline: Duration) -> Error {
    Error::store_unavailable(
        "cannot publish to RabbitMQ",
        format!("queue {queue}: no confirm within {deadline:?}"),
    )
}

/// Whether the broker took a publish to `queue`, from its confirm.
fn taken(
    queue: &str,
    confirmation: Result<lapin::Confirmation, lapin::Error>,
) -> Result<(), Error> {
    match confirmation {
        Ok(lapin::Confirmation::Ack(None)) => Ok(()),
        Ok(other) => Err(Error::store_unavailable(
            "cannot publish to RabbitMQ",
            format!("queue {queue}: the broker did not take it ({other:?})"),
        )),
        Err(error) => Err(unavailable("cannot publish to RabbitMQ", error)),
    }
}

impl EventSource for RabbitConsumer {
    type Delivery = RabbitDelivery;

    async fn next_batch(&mut self) -> Result<Option<Vec<RabbitDelivery>>, Error> {
        self.acknowledge(false).await?;
        if self.stop.is_stopped() {
            self.cancel().await;
            return Ok(None);
        }
        let first = match self.first_message().await? {
            None => return Ok(Some(Vec::new())),
            Some(None) => {
                return Err(Error::store_unavailable(
                    "cannot consume from RabbitMQ",
                    "the broker cancelled the consumer",
                ));
            }
            Some(Some(message)) => {
                message.map_err(|e| unavailable("cannot consume from RabbitMQ", e))?
            }
        };
        let mut batch = vec![delivery(first)];
        // Whatever else came meanwhile, without waiting.
        while batch.len() < usize::from(self.config.prefetch) {
            match self.messages.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(delivery(message)),
                Some(Some(Err(error))) => {
                    return Err(unavailable("cannot consume from RabbitMQ", error));
                }
                Some(None) | None => break,
            }
        }
        // Retries back before their due time move on to the next tier.
        let now = std::time::SystemTime::now();
        let (mut due, mut early) = (Vec::with_capacity(batch.len()), Vec::new());
        for delivery in batch {
            let wait = delivery
                .due_ms
                .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .and_then(|at| at.duration_since(now).ok());
            match wait.and_then(retry::tier_for) {
                Some(tier) => early.push((delivery, tier)),
                None => due.push(delivery),
            }
        }
        if !early.is_empty() {
            self.wait_longer(early).await?;
        }
        Ok(Some(due))
    }

    async fn finished(&mut self, delivery: &RabbitDelivery) -> Result<(), Error> {
        self.finished_up_to = Some(delivery.tag);
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        delivery: &RabbitDelivery,
        error: &str,
        attempts: u32,
    ) -> Result<(), Error> {
        dead_letter::keep(&self.channel, &self.config, delivery, error, attempts).await
    }

    async fn schedule_retry(
        &mut self,
        delivery: &RabbitDelivery,
        retry: &RetryDue<'_>,
    ) -> Result<(), Error> {
        let wait = retry
            .due
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        // Due now: straight back into the queue.
        let queue = match retry::tier_for(wait) {
            Some(tier) => retry::tier_queue(&self.config, tier),
            None => self.config.queue.clone(),
        };
        let properties = retry::moved(&delivery.properties, retry);
        // Confirmed with the others before the next acknowledgement, which
        // `finished` (called in order) makes it part of: many moves, one wait.
        let confirm = publish(
            &self.channel,
            &self.config,
            &queue,
            &delivery.record,
            properties,
        )
        .await?;
        let before = self.finished_up_to;
        self.moving.push_back(Move {
            before,
            queue,
            confirm,
            published: tokio::time::Instant::now(),
        });
        Ok(())
    }

    async fn set_aside(&mut self, delivery: &RabbitDelivery, error: &Error) -> Result<(), Error> {
        let error = error.report().to_string();
        dead_letter::keep(&self.channel, &self.config, delivery, &error, 0).await
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.acknowledge(true).await?;
        if self.stop.is_stopped() {
            // What this consumer held and had not finished goes to another one.
            let closing = async {
                let _ = self.channel.close(200, "stopping".into()).await;
                self.connection.close(200, "stopping".into()).await
            };
            let _ = tokio::time::timeout(self.config.deadline, closing).await;
        }
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.stop.is_stopped()
    }

    async fn paused(&mut self) -> bool {
        self.paused_now().await
    }
}

/// The queue's consumers for a supervised [`Worker`](crate::Worker): each run
/// connects a new [`RabbitConsumer`], all under one consumer tag.
pub type RabbitConsumers = Consumers<RabbitConfig>;

impl ConsumerConfig for RabbitConfig {
    type Consumer = RabbitConsumer;

    async fn connect(
        &self,
        url: &str,
        name: &str,
        stop: &StopHandle,
    ) -> Result<RabbitConsumer, Error> {
        let consumer = RabbitConsumer::connect(url, self.clone(), name).await?;
        tracing::info!(consumer = %name, queue = %self.queue, "worker consuming from RabbitMQ");
        Ok(consumer.stopped_by(stop))
    }
}

/// The queue's ready messages and consumers, and the dead-letter queue's messages.
pub(super) struct Counts {
    pub(super) ready: u64,
    pub(super) consumers: u64,
    /// Messages waiting in the delay queues.
    pub(super) retries: u64,
}

pub(super) async fn counts(channel: &Channel, config: &RabbitConfig) -> Result<Counts, Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let asked = async {
        let queue = channel
            .queue_declare(config.queue.as_str().into(), passive, FieldTable::default())
            .await?;
        let mut retries = 0;
        for tier in TIERS_MS {
            let name = retry::tier_queue(config, tier);
            let tier = channel
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await?;
            retries += u64::from(tier.message_count());
        }
        Ok((queue, retries))
    };
    let (queue, retries) = within(config.deadline, "cannot read the queue's counts", asked).await?;
    Ok(Counts {
        ready: u64::from(queue.message_count()),
        consumers: u64::from(queue.consumer_count()),
        retries,
    })
}
