//! The queue's dead letter: the stream `<queue>.dead`, where the worker publishes
//! what failed its last attempt (with the error, the attempts, their history and
//! the time in headers). The console (`console`) reads it and takes events out.

use lapin::Channel;
use lapin::types::AMQPValue;

use super::consumer::{self, RabbitDelivery};
use super::{RabbitConfig, text};
use crate::Error;

/// Publishes `delivery` to the dead-letter queue with `error` and `attempts`,
/// and waits for the broker's confirm.
pub(super) async fn keep(
    channel: &Channel,
    config: &RabbitConfig,
    delivery: &RabbitDelivery,
    error: &str,
    attempts: u32,
) -> Result<(), Error> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert("x-comapi-error".into(), text(error));
    headers.insert(
        super::retry::HISTORY_HEADER.into(),
        text(&super::retry::with_attempt(&delivery.properties, error)),
    );
    headers.insert(
        "x-comapi-attempts".into(),
        AMQPValue::LongInt(i32::try_from(attempts).unwrap_or(i32::MAX)),
    );
    let dead_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    headers.insert("x-comapi-dead-at".into(), text(&dead_at));
    let properties = delivery.properties.clone().with_headers(headers);
    let dead = config.dead_queue();
    // Not acknowledged here: the worker dead-letters out of order (a later event's
    // last attempt may fail before an earlier one is finished) and acknowledgements
    // are cumulative; `finished`, called in order, acknowledges it.
    consumer::publish_confirmed(channel, config, &dead, &delivery.record, properties).await
}
