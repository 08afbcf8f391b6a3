//! Reaching the broker: a connection opened and set up within the store's
//! deadline (closed when its set-up does not finish), the topology every store
//! and consumer declares, and the deadline every broker round trip runs under.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use super::{RabbitConfig, retry};
use crate::Error;

/// A connection to `url`, named `name` for the broker's management view, set up
/// by `set_up`; all within the deadline. A connection whose set-up failed or ran
/// out of time is closed: dropped, one whose `basic.consume` the broker had taken
/// would stay open with a consumer nobody reads, holding its prefetch for good.
pub(super) async fn connected<T>(
    url: &str,
    name: &str,
    config: &RabbitConfig,
    context: &str,
    set_up: impl AsyncFnOnce(&Connection) -> Result<T, lapin::Error>,
) -> Result<(Connection, T), Error> {
    let until = tokio::time::Instant::now() + config.deadline;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let deadline = config.deadline;
    let connection = Connection::connect(url, properties);
    let connection = within_until(until, deadline, context, connection).await?;
    match within_until(until, deadline, context, set_up(&connection)).await {
        Ok(made) => Ok((connection, made)),
        Err(error) => {
            tokio::spawn(async move {
                let closing = connection.close(200, "set-up failed".into());
                let _ = tokio::time::timeout(deadline, closing).await;
            });
            Err(error)
        }
    }
}

/// Declares the queue, the dead-letter exchange and queue, and the binding.
pub(super) async fn declare(channel: &Channel, config: &RabbitConfig) -> Result<(), lapin::Error> {
    let dead = config.dead_queue();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), text("quorum"));
    channel
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut stream = FieldTable::default();
    stream.insert("x-queue-type".into(), text("stream"));
    for name in [&dead, &config.console_stream()] {
        channel
            .queue_declare(name.as_str().into(), durable, stream.clone())
            .await?;
    }
    channel
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut arguments = quorum;
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(config.delivery_limit).unwrap_or(i32::MAX)),
    );
    arguments.insert("x-dead-letter-exchange".into(), text(&dead));
    arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    arguments.insert("x-overflow".into(), text("reject-publish"));
    channel
        .queue_declare(config.queue.as_str().into(), durable, arguments)
        .await?;
    retry::declare(channel, config).await
}

pub(super) fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// `work` within `deadline`, its lapin error or the timeout as [`Error::StoreUnavailable`].
pub(super) async fn within<T>(
    deadline: Duration,
    context: &str,
    work: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, Error> {
    within_until(
        tokio::time::Instant::now() + deadline,
        deadline,
        context,
        work,
    )
    .await
}

/// [`within`] the `deadline` that ends at `until`.
async fn within_until<T>(
    until: tokio::time::Instant,
    deadline: Duration,
    context: &str,
    work: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout_at(until, work).await {
        Ok(done) => done.map_err(|e| unavailable(context, e)),
        Err(_) => Err(Error::store_unavailable(
            context,
            format!("no answer within {deadline:?}"),
        )),
    }
}

pub(super) fn unavailable(context: &str, error: lapin::Error) -> Error {
    Error::store_unavailable(context, error)
}
