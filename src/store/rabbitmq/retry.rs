//! The queue's retry schedule: delay queues whose messages expire back into the
//! queue.
//!
//! # Design
//!
//! RabbitMQ has no delayed delivery without a plugin, so waiting is done by
//! expiry: a few quorum queues `<queue>.retry.<ms>`, each with one message TTL
//! ([`TIERS_MS`]: 250 ms, 1 s, 4 s, 16 s, 64 s, 256 s, 1,024 s), dead-letter their
//! expired messages back into the queue through the default exchange,
//! at least once (`x-dead-letter-strategy=at-least-once`, `x-overflow=reject-publish`).
//! A queue of one TTL expires its messages in the order they came, so none waits
//! behind a later one.
//!
//! A move publishes the record, confirmed, to the longest tier that does not pass
//! its due time, with its attempts, last error and due time in headers
//! (`x-comapi-attempts`, `x-comapi-error`, `x-comapi-due` in ms since the Unix
//! epoch); only then is the delivery acknowledged, so a crash between the two
//! duplicates it, never loses it. A message that comes back before its due time
//! (a due time between tiers, or past the longest) is moved on to the next tier
//! that fits (the shortest, for what is left of a wait shorter than it) by the
//! consumer, without reaching the worker. Back in the queue, a retry waits behind what is
//! stored before it. A retry is never early, and late by less than the shortest
//! tier plus the queue ahead of it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

use super::{RabbitConfig, text};
use crate::store::RetryDue;

/// The delay queues' message TTLs, shortest first.
pub const TIERS_MS: [u64; 7] = [250, 1_000, 4_000, 16_000, 64_000, 256_000, 1_024_000];

/// The header with the handler calls made so far.
pub(super) const ATTEMPTS_HEADER: &str = "x-comapi-attempts";
/// The header with the time the next attempt is due, in ms since the Unix epoch.
pub(super) const DUE_HEADER: &str = "x-comapi-due";
/// The header with the last error.
pub(super) const ERROR_HEADER: &str = "x-comapi-error";

/// The header with the failed attempts, as `store::history` keeps them.
pub(super) const HISTORY_HEADER: &str = "x-comapi-history";

/// The broker's own headers of a delivery, not carried into a new message.
const BROKER_HEADERS: [&str; 6] = [
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-reason",
];

/// The delay queue of `tier` ms.
pub(super) fn tier_queue(config: &RabbitConfig, tier: u64) -> String {
    format!("{}.retry.{tier}", config.queue)
}

/// Milliseconds since the Unix epoch.
pub(super) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The delay queue for a message due in `wait`: the longest tier not past it, or
/// the shortest when `wait` is shorter still (a retry comes late by less than the
/// shortest tier, never early); `None` when it is due now (it goes back into the
/// queue).
pub(super) fn tier_for(wait: Duration) -> Option<u64> {
    let wait = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    if wait == 0 {
        return None;
    }
    TIERS_MS
        .iter()
        .rev()
        .copied()
        .find(|&tier| tier <= wait)
        .or(Some(TIERS_MS[0]))
}

/// Declares the delay queues (idempotently).
pub(super) async fn declare(channel: &Channel, config: &RabbitConfig) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for tier in TIERS_MS {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), text("quorum"));
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(tier).unwrap_or(i64::MAX)),
        );
        arguments.insert("x-dead-letter-exchange".into(), text(""));
        arguments.insert("x-dead-letter-routing-key".into(), text(&config.queue));
        arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        arguments.insert("x-overflow".into(), text("reject-publish"));
        let name = tier_queue(config, tier);
        channel
            .queue_declare(name.as_str().into(), durable, arguments)
            .await?;
    }
    Ok(())
}

/// The properties of a message moved into the schedule: the delivery's own, less
/// the broker's headers, with the attempts, the error and the due time.
pub(super) fn moved(properties: &BasicProperties, retry: &RetryDue<'_>) -> BasicProperties {
    let mut headers = clean(properties);
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongInt(i32::try_from(retry.attempts).unwrap_or(i32::MAX)),
    );
    headers.insert(ERROR_HEADER.into(), text(retry.error));
    headers.insert(
        HISTORY_HEADER.into(),
        text(&with_attempt(properties, retry.error)),
    );
    headers.insert(
        DUE_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(millis(retry.due)).unwrap_or(i64::MAX)),
    );
    properties.clone().with_headers(headers)
}

/// The attempts in `properties`' history header, with a failure now with `error`.
pub(super) fn with_attempt(properties: &BasicProperties, error: &str) -> String {
    let history = super::consumer::header_text(properties.headers().as_ref(), HISTORY_HEADER);
    crate::store::history::with_attempt(history.as_deref().unwrap_or(""), SystemTime::now(), error)
}

/// The delivery's headers without the broker's.
pub(super) fn clean(properties: &BasicProperties) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if !BROKER_HEADERS.contains(&name.as_str()) {
                headers.insert(ShortString::from(name.as_str()), value.clone());
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_goes_to_the_longest_tier_that_does_not_pass_it() {
        let tier = |ms| tier_for(Duration::from_millis(ms));
        assert_eq!(tier(0), None);
        assert_eq!(tier(100), Some(250));
        assert_eq!(tier(250), Some(250));
        assert_eq!(tier(999), Some(250));
        assert_eq!(tier(60_000), Some(16_000));
        assert_eq!(tier(u64::MAX), Some(1_024_000));
    }

    #[test]
    fn a_moved_message_keeps_its_own_headers_and_drops_the_brokers() {
        let mut headers = FieldTable::default();
        headers.insert("x-comapi-delivery".into(), text("d-1"));
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(3));
        let properties = BasicProperties::default().with_headers(headers);
        let retry = RetryDue::new(2, "down", UNIX_EPOCH + Duration::from_millis(1500));
        let moved = moved(&properties, &retry);
        let headers = moved.headers().clone().unwrap_or_default();
        let inner = headers.inner();
        assert!(inner.contains_key("x-comapi-delivery"));
        assert!(!inner.contains_key("x-delivery-count"));
        assert_eq!(inner.get(DUE_HEADER), Some(&AMQPValue::LongLongInt(1500)));
        assert_eq!(inner.get(ATTEMPTS_HEADER), Some(&AMQPValue::LongInt(2)));
    }
}
