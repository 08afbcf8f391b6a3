//! Reading a RabbitMQ stream without taking anything from it: a consumer from an
//! offset, whose acknowledgements only give the broker credit to send more.
//!
//! A stream does not say where it ends (a passive declare counts 0 messages), so
//! a read to the end first publishes a *fence*, an empty message with the header
//! [`FENCE_HEADER`], and reads until it comes: everything stored before the read
//! began is then read. Every reader skips fences; each is a few dozen bytes.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use super::consumer::{header_number, header_text, publish_confirmed};
use super::{RabbitConfig, delivery_id, text, within};
use crate::Error;

/// The header that marks a fence; its value is the reader's own id.
pub(super) const FENCE_HEADER: &str = "x-comapi-fence";

/// The header RabbitMQ gives each message read from a stream: its offset.
const OFFSET_HEADER: &str = "x-stream-offset";

/// How many messages the broker sends ahead of the acknowledgements.
const READ_AHEAD: u16 = 1000;

/// The longest wait for the next message of a read.
const GAP: Duration = Duration::from_secs(10);

/// A stream's message.
#[derive(Debug)]
pub(super) struct StreamMessage {
    pub(super) offset: u64,
    pub(super) properties: BasicProperties,
    pub(super) data: Vec<u8>,
}

impl StreamMessage {
    /// Its header `name` as text.
    pub(super) fn header(&self, name: &str) -> Option<String> {
        header_text(self.properties.headers().as_ref(), name).map(Into::into)
    }

    /// Its header `name` as a number.
    pub(super) fn number(&self, name: &str) -> Option<i64> {
        header_number(self.properties.headers().as_ref(), name)
    }
}

/// Publishes a fence to `stream` on `channel` (in confirm mode) and waits for its
/// confirm; its id.
pub(super) async fn fence(
    channel: &Channel,
    config: &RabbitConfig,
    stream: &str,
) -> Result<String, Error> {
    let id = delivery_id();
    let mut headers = FieldTable::default();
    headers.insert(FENCE_HEADER.into(), text(&id));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    publish_confirmed(channel, config, stream, b"", properties).await?;
    Ok(id)
}

/// `channel`, a channel of its own for a read, with the read-ahead set.
pub(super) async fn read_ahead(channel: Channel, config: &RabbitConfig) -> Result<Channel, Error> {
    within(config.deadline, "cannot read a RabbitMQ stream", async {
        channel
            .basic_qos(READ_AHEAD, BasicQosOptions::default())
            .await
    })
    .await?;
    Ok(channel)
}

/// Reads `stream` from offset `from` until the fence `until` or until `each`
/// returns `false`, on `channel` (from [`read_ahead`], closed at the end):
/// calls `each` with every message that is not a fence, in order. Returns the
/// offset after the last message read. Without a fence, the message `each` waits
/// for must exist.
pub(super) async fn read(
    channel: Channel,
    config: &RabbitConfig,
    stream: &str,
    from: u64,
    until: Option<&str>,
    mut each: impl FnMut(StreamMessage) -> bool,
) -> Result<u64, Error> {
    let read = read_on(&channel, config, stream, from, until, &mut each).await;
    // Closing a stream's reader returns nothing to it: its messages stay.
    let _ = tokio::time::timeout(config.deadline, channel.close(200, "read".into())).await;
    read
}

async fn read_on(
    channel: &Channel,
    config: &RabbitConfig,
    stream: &str,
    from: u64,
    until: Option<&str>,
    each: &mut impl FnMut(StreamMessage) -> bool,
) -> Result<u64, Error> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-stream-offset".into(),
        AMQPValue::LongLongInt(i64::try_from(from).unwrap_or(i64::MAX)),
    );
    let tag = format!("read-{}", delivery_id());
    let mut messages = within(config.deadline, "cannot read a RabbitMQ stream", async {
        channel
            .basic_consume(
                stream.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
    })
    .await?;
    let mut next = from;
    let mut unacknowledged = 0;
    loop {
        let Ok(message) = tokio::time::timeout(GAP, messages.next()).await else {
            return Err(Error::store_unavailable(
                "cannot read a RabbitMQ stream",
                format!("stream {stream}: no message for {GAP:?} after offset {next}"),
            ));
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                return Err(super::unavailable("cannot read a RabbitMQ stream", error));
            }
            None => {
                return Err(Error::store_unavailable(
                    "cannot read a RabbitMQ stream",
                    format!("stream {stream}: the broker cancelled the read"),
                ));
            }
        };
        let offset = header_number(message.properties.headers().as_ref(), OFFSET_HEADER)
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(next);
        unacknowledged += 1;
        if unacknowledged >= u32::from(READ_AHEAD) / 2 {
            let multiple = BasicAckOptions { multiple: true };
            within(config.deadline, "cannot read a RabbitMQ stream", async {
                channel.basic_ack(message.delivery_tag, multiple).await
            })
            .await?;
            unacknowledged = 0;
        }
        // A read starts at the chunk that holds `from`: earlier messages may come.
        if offset < from {
            continue;
        }
        next = offset + 1;
        let message = StreamMessage {
            offset,
            properties: message.properties,
            data: message.data,
        };
        match message.header(FENCE_HEADER) {
            Some(fence) if Some(fence.as_str()) == until => break,
            Some(_) => {}
            None => {
                if !each(message) {
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(
        config.deadline,
        channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    Ok(next)
}
