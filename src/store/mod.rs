//! Where the receive step stores events and where the worker reads them back: the
//! [`EventStore`] and [`EventSource`] traits, the local [`Spool`](spool::Spool) (the
//! embedded default), a Redis stream (`redis_stream::RedisStream`, feature `redis`)
//! and a RabbitMQ quorum queue (`rabbitmq::RabbitStore`, feature `rabbitmq`).
//!
//! # Design
//!
//! The three stores hold the same record per event, `{"receivedAt":…,"secretIndex":…,
//! "event":{…}}` with the envelope as received, so intake rules, answers, the
//! handler contract, retries and the dead letter are the same for all three; only
//! durability and distribution differ. A store answers only once every event of a
//! request is durable by its own definition: synced to disk (spool), replied to by
//! Redis (whose durability is its `appendfsync` setting, see `redis_stream`), or
//! confirmed by the queue's quorum (RabbitMQ).

use std::borrow::Cow;
use std::future::Future;

use crate::{Error, Event};

#[cfg(any(feature = "redis", feature = "rabbitmq"))]
mod broker;
pub mod history;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis_stream;
pub mod spool;

#[cfg(any(feature = "redis", feature = "rabbitmq"))]
pub use broker::{ConsumerConfig, Consumers, StopHandle};

/// The records of one request, one per event, as the receive step encodes them:
/// each a line of JSON `{"receivedAt":…,"secretIndex":…,"event":{…}}` ending in a
/// line feed, with no other line feed inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    lines: Vec<u8>,
    events: u64,
}

impl Records {
    pub(crate) fn new(lines: Vec<u8>, events: u64) -> Self {
        Records { lines, events }
    }

    /// How many events (records) there are.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.events
    }

    /// Whether there is none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Each record, without its line feed.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.lines
            .strip_suffix(b"\n")
            .unwrap_or(&self.lines)
            .split(|&b| b == b'\n')
            .filter(|_| !self.lines.is_empty())
    }

    /// Every record with its line feed, one after the other (JSON Lines).
    #[must_use]
    pub fn into_lines(self) -> Vec<u8> {
        self.lines
    }
}

/// Where the receive step ([`Inbox`](crate::Inbox)) stores events: the local
/// [`Spool`](spool::Spool), or a Redis stream
/// (`redis_stream::RedisStream`, feature `redis`).
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Stores `records` and resolves once every one of them is durable. The receive
    /// step answers 200 only after this succeeded.
    ///
    /// # Errors
    /// [`Error::Storage`] or [`Error::StoreUnavailable`] when they could not all be
    /// stored (or not in time); the receive step then answers 503 and Comapi sends
    /// them again. Some may have been stored: the worker's gate tells the copies apart.
    fn store(&self, records: Records) -> impl Future<Output = Result<(), Error>> + Send;

    /// What an operator needs to know about the store now, for a status page and
    /// the metrics' gauges.
    fn status(&self) -> impl Future<Output = StoreStatus> + Send;
}

/// A store chosen at run time, as the reference receivers do: the local spool, a
/// Redis stream (feature `redis`) or a RabbitMQ queue (feature `rabbitmq`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Store {
    /// The local spool.
    Spool(spool::Spool),
    /// A Redis stream.
    #[cfg(feature = "redis")]
    Redis(redis_stream::RedisStream),
    /// A RabbitMQ quorum queue.
    #[cfg(feature = "rabbitmq")]
    Rabbit(rabbitmq::RabbitStore),
}

impl From<spool::Spool> for Store {
    fn from(spool: spool::Spool) -> Self {
        Store::Spool(spool)
    }
}

#[cfg(feature = "rabbitmq")]
impl From<rabbitmq::RabbitStore> for Store {
    fn from(queue: rabbitmq::RabbitStore) -> Self {
        Store::Rabbit(queue)
    }
}

#[cfg(feature = "redis")]
impl From<redis_stream::RedisStream> for Store {
    fn from(stream: redis_stream::RedisStream) -> Self {
        Store::Redis(stream)
    }
}

impl EventStore for Store {
    async fn store(&self, records: Records) -> Result<(), Error> {
        match self {
            Store::Spool(spool) => spool.store(records).await,
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.store(records).await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(queue) => queue.store(records).await,
        }
    }

    async fn status(&self) -> StoreStatus {
        match self {
            Store::Spool(spool) => spool.status().await,
            #[cfg(feature = "redis")]
            Store::Redis(stream) => stream.status().await,
            #[cfg(feature = "rabbitmq")]
            Store::Rabbit(queue) => queue.status().await,
        }
    }
}

/// What [`EventStore::status`] reports. A figure the store cannot tell is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStatus {
    /// Which store, in a few words: `the local spool in /var/spool/comapi`.
    pub store: String,
    /// Events stored, processed or not (a spool's events, a stream's length).
    pub stored: Option<u64>,
    /// Events stored but not yet processed.
    pub backlog: Option<u64>,
    /// Of the backlog, events handed to a worker and not yet acknowledged.
    pub pending: Option<u64>,
    /// Events in the dead letter.
    pub dead_letters: Option<u64>,
    /// Events in the retry schedule: they failed an attempt and wait for the next.
    pub retries: Option<u64>,
    /// When the first of them is due (`None` when none waits, or the store cannot
    /// tell).
    pub next_retry_at: Option<std::time::SystemTime>,
    /// Workers consuming now (a RabbitMQ queue's consumers).
    pub consumers: Option<u64>,
    /// Why the figures are missing, when the store could not be asked.
    pub error: Option<String>,
}

/// Where the worker ([`run_worker`](crate::worker::run_worker)) reads stored events
/// from: a [`SpoolReader`](spool::SpoolReader), or a Redis consumer
/// (`redis_stream::StreamConsumer`, feature `redis`).
///
/// The worker calls [`EventSource::next_batch`] (again and again, reading ahead),
/// and [`EventSource::finished`] for each delivery in the order they were handed
/// out, once it was processed, skipped or dead-lettered (after
/// [`EventSource::dead_letter`]) or set aside (after [`EventSource::set_aside`]).
/// A source acknowledges only finished deliveries: what was handed out and not
/// finished when a worker crashes comes again.
pub trait EventSource: Send + Sync {
    /// One stored event as this source hands it out.
    type Delivery: Delivery + Send + Sync;

    /// Waits for stored events, a short while at most (a quarter of a second in
    /// this crate's sources), and returns those that
    /// came (none, when none did: the worker does its other work and asks again);
    /// `None` once the source is finished: a closed spool read to its end, or a
    /// consumer asked to stop. It may be called while earlier deliveries are still
    /// being worked on: a source keeps every delivery it handed out and has not
    /// been told is finished.
    ///
    /// # Errors
    /// [`Error::Storage`] or [`Error::StoreUnavailable`] when the store cannot be read.
    fn next_batch(
        &mut self,
    ) -> impl Future<Output = Result<Option<Vec<Self::Delivery>>, Error>> + Send;

    /// `delivery` is done with: processed, skipped, dead-lettered or set aside.
    ///
    /// # Errors
    /// When the acknowledgement cannot be stored; the delivery may come again.
    fn finished(
        &mut self,
        delivery: &Self::Delivery,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Keeps `delivery` in the dead letter, with the last `error` and how many
    /// `attempts` were made, durably, before it is finished.
    ///
    /// # Errors
    /// When it cannot be kept; the worker then stops rather than lose it.
    fn dead_letter(
        &mut self,
        delivery: &Self::Delivery,
        error: &str,
        attempts: u32,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Moves `delivery` into the source's durable retry schedule, with what
    /// `retry` says (the attempts made, the last error, the time it is due), before
    /// it is finished: the line moves on past it, and once due it is handed out
    /// again by [`EventSource::next_batch`] (to whichever worker asks first), with
    /// [`Delivery::attempts`] giving the attempts made. A crash between the move and
    /// the acknowledgement may leave two copies, never none.
    ///
    /// # Errors
    /// When it cannot be kept; the worker then stops rather than lose it.
    fn schedule_retry(
        &mut self,
        delivery: &Self::Delivery,
        retry: &RetryDue<'_>,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Keeps a delivery whose record cannot be read as an event, byte for byte,
    /// durably, before it is finished.
    ///
    /// # Errors
    /// When it cannot be kept; the worker then stops rather than lose it.
    fn set_aside(
        &mut self,
        delivery: &Self::Delivery,
        error: &Error,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Acknowledges what is finished and not yet acknowledged; called when the
    /// worker stops.
    ///
    /// # Errors
    /// When the acknowledgement cannot be stored; those deliveries come again.
    fn flush(&mut self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Something that keeps what this source handed out from being taken over by
    /// another worker while this one is still on it, from a thread of the worker's
    /// own (see [`KeepAlive`](crate::gate::KeepAlive)): every event of the batch in
    /// hand, whether its handler runs, waits to be retried or waits for a busy
    /// claim, and every finished one not yet acknowledged. `None` (the default):
    /// nothing is ever taken over.
    fn keep_alive(&self) -> Option<crate::gate::KeepAlive> {
        None
    }

    /// Whether processing is paused (the console's pause, kept in the store, so
    /// every worker on it obeys and a restart stays paused): the worker then takes
    /// no new batch and finishes what it has in hand. Asked before each read; a
    /// source that asks its store keeps the answer for a second. Default: never.
    fn paused(&mut self) -> impl Future<Output = bool> + Send {
        async { false }
    }

    /// Whether the worker should stop after the event in hand, leaving the rest of
    /// the batch unfinished (they come again to the next worker). Default: never;
    /// a spool's worker drains the spool.
    fn stopping(&self) -> bool {
        false
    }
}

/// Where a supervised [`Worker`](crate::Worker) gets the source of each run, and
/// how it is told to stop. A [`Spool`](spool::Spool) is one (each run reads it
/// with a new [`SpoolReader`](spool::SpoolReader); stopping closes it, the worker
/// processes what it holds, and the retries waiting stay in the schedule for the
/// next start); so are a broker's consumers (`StreamConsumers`, feature `redis`;
/// `RabbitConsumers`, feature `rabbitmq`).
pub trait Sources: Clone + Send + Sync + 'static {
    /// What one run reads.
    type Source: EventSource;

    /// The source of the next run: the first, or one after a failure.
    ///
    /// # Errors
    /// When it cannot be opened; the worker tries again a second later.
    fn open(&self) -> impl Future<Output = Result<Self::Source, Error>> + Send;

    /// Asks the current and later runs to finish.
    fn stop(&self) -> impl Future<Output = ()> + Send;

    /// Whether [`Sources::stop`] was asked.
    fn is_stopped(&self) -> bool;
}

/// What [`EventSource::schedule_retry`] keeps with an event that failed an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryDue<'a> {
    /// Handler calls made so far, the failed one included.
    pub attempts: u32,
    /// The last call's error.
    pub error: &'a str,
    /// When the next attempt is due.
    pub due: std::time::SystemTime,
}

impl<'a> RetryDue<'a> {
    /// A retry due at `due`, after `attempts` calls, the last failing with `error`.
    #[must_use]
    pub fn new(attempts: u32, error: &'a str, due: std::time::SystemTime) -> Self {
        RetryDue {
            attempts,
            error,
            due,
        }
    }
}

/// One stored event handed out by an [`EventSource`].
pub trait Delivery {
    /// Names this stored copy of the event for the gate (see
    /// [`DecisionStore`](crate::gate::DecisionStore)): a spool position, a stream
    /// entry id.
    fn id(&self) -> Cow<'_, str>;

    /// The stored record, without its line feed.
    fn record(&self) -> &[u8];

    /// The event, parsed from the envelope as it was received.
    ///
    /// # Errors
    /// [`Error::Storage`] when the record cannot be read as one.
    fn event(&self) -> Result<Event<'_>, Error>;

    /// When the receive step stored this copy (the record's `receivedAt`): the
    /// replay window is judged at this time, never at the time a worker gets to
    /// it. `None` when the record holds no readable time.
    fn received_at(&self) -> Option<std::time::SystemTime> {
        spool::record_received_at(self.record())
    }

    /// How many times this copy was handed to a worker, this time included (more
    /// than 1 after a worker crashed while it held it). Default 1.
    fn times_delivered(&self) -> u32 {
        1
    }

    /// Handler calls made before this delivery: 0 for an event from the line,
    /// the stored count for one from the retry schedule
    /// ([`EventSource::schedule_retry`]).
    fn attempts(&self) -> u32 {
        0
    }
}

/// A JSON string of `text`.
pub(crate) fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_into_lines_without_their_line_feed() {
        let records = Records::new(b"{\"a\":1}\n{\"b\":2}\n".to_vec(), 2);
        let lines: Vec<&[u8]> = records.iter().collect();
        assert_eq!(lines, [&b"{\"a\":1}"[..], &b"{\"b\":2}"[..]]);
        assert_eq!(Records::new(Vec::new(), 0).iter().count(), 0);
        assert_eq!(records.len(), 2);
        assert!(!records.is_empty());
    }
}
