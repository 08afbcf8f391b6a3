//! The queue's dead letter: the quorum queue `<queue>.dead`, where the worker
//! publishes what failed its last attempt (with the error, the attempts and the
//! time in headers), and bringing its events back.

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::consumer::{self, RabbitDelivery};
use super::{DELIVERY_HEADER, RabbitConfig, delivery_id, text, within};
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

/// See [`RabbitStore::requeue_dead_letters`](super::RabbitStore::requeue_dead_letters).
pub(super) async fn requeue(channel: &Channel, config: &RabbitConfig) -> Result<u64, Error> {
    let dead = config.dead_queue();
    // What is in the dead letter now, and nothing added later: with a worker whose
    // handler still fails, the same events would otherwise go round and round.
    let at_start = consumer::counts(channel, config).await?.dead;
    let mut moved = 0;
    while moved < at_start {
        let got = within(
            config.deadline,
            "cannot read the dead-letter queue",
            async {
                channel
                    .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
            },
        )
        .await?;
        let Some(message) = got else {
            return Ok(moved);
        };
        let message = message.delivery;
        // A new stored copy, as a spool's or a stream's requeue makes: a delivery id
        // of its own; the worker's notes and the broker's `x-death` go.
        let mut headers = FieldTable::default();
        headers.insert(DELIVERY_HEADER.into(), text(&delivery_id()));
        let properties = message.properties.clone().with_headers(headers);
        consumer::publish_confirmed(channel, config, &config.queue, &message.data, properties)
            .await?;
        within(config.deadline, "cannot acknowledge a dead letter", async {
            channel
                .basic_ack(message.delivery_tag, BasicAckOptions::default())
                .await
        })
        .await?;
        moved += 1;
    }
    Ok(moved)
}
