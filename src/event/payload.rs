//! The typed payload of `message.*` events, parsed when asked for
//! ([`Event::message`](crate::Event::message)), and where a payload failed to match it.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::envelope::CowStr;
use crate::Error;

/// The typed payload of a `message.*` event.
///
/// It covers the fields Comapi documents; anything else is in
/// [`Event::payload_json`](crate::Event::payload_json). JSON values that are the user's own or vary by channel
/// (`metadata`, `channelData`, `additionalInfo`, inbound `from`/`to`) are kept as raw
/// JSON for you to deserialize into your own types.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct MessagePayload<'a> {
    /// The message id: `id`, or `messageId` where a payload names it so.
    #[serde(borrow, alias = "messageId")]
    pub id: Cow<'a, str>,
    /// Delivery details: channel, per-channel status, additional information.
    #[serde(default, borrow)]
    pub details: Option<MessageDetails<'a>>,
    /// Channel-specific data keyed by channel, for example `sms.segmentCount`.
    #[serde(default, borrow, deserialize_with = "opt_raw")]
    pub channel_data: Option<Cow<'a, RawValue>>,
    /// When the message last changed (`updatedOn`, ISO-8601).
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub updated_on: Option<Cow<'a, str>>,
    /// The correlation data you attached when sending, as JSON.
    #[serde(default, borrow, deserialize_with = "opt_raw")]
    pub metadata: Option<Cow<'a, RawValue>>,
    /// The channel an inbound message arrived on (`message.inbound`).
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub channel: Option<Cow<'a, str>>,
    /// The sender of an inbound message (`message.inbound`), as JSON.
    #[serde(default, borrow, deserialize_with = "opt_raw")]
    pub from: Option<Cow<'a, RawValue>>,
    /// The recipient of an inbound message (`message.inbound`), as JSON.
    #[serde(default, borrow, deserialize_with = "opt_raw")]
    pub to: Option<Cow<'a, RawValue>>,
    /// The text of an inbound message (`message.inbound`).
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub body: Option<Cow<'a, str>>,
}

/// `payload.details` of a message event.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct MessageDetails<'a> {
    /// The channel the message went out on, for example `sms`.
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub channel: Option<Cow<'a, str>>,
    /// The status per channel tried, in the order Comapi listed them.
    #[serde(default, borrow, deserialize_with = "channel_statuses")]
    pub channel_status: Vec<ChannelStatus<'a>>,
    /// Extra information from the channel, as JSON.
    #[serde(default, borrow, deserialize_with = "opt_raw")]
    pub additional_info: Option<Cow<'a, RawValue>>,
}

/// One entry of `payload.details.channelStatus`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct ChannelStatus<'a> {
    /// The channel (the key in `channelStatus`), for example `sms`.
    #[serde(skip)]
    pub channel: Cow<'a, str>,
    /// The status on that channel, for example `sent` or `failed`.
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub status: Option<Cow<'a, str>>,
    /// Channel-specific details, as JSON.
    #[serde(default, borrow, deserialize_with = "opt_raw")]
    pub details: Option<Cow<'a, RawValue>>,
    /// When the status last changed (`updatedOn`).
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub updated_on: Option<Cow<'a, str>>,
}

fn opt_str<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    Ok(Option::<CowStr<'de>>::deserialize(deserializer)?.map(|s| s.0))
}

fn opt_raw<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'de, RawValue>>, D::Error> {
    Ok(Option::<&'de RawValue>::deserialize(deserializer)?.map(Cow::Borrowed))
}

fn channel_statuses<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<ChannelStatus<'de>>, D::Error> {
    struct MapVisitor;
    impl<'de> Visitor<'de> for MapVisitor {
        type Value = Vec<ChannelStatus<'de>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of statuses keyed by channel")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(CowStr(channel)) = map.next_key()? {
                let mut status: ChannelStatus<'de> = map.next_value()?;
                status.channel = channel;
                out.push(status);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(MapVisitor)
}

/// Parses a `message.*` payload. On failure, an [`Error::InvalidEvent`] whose path
/// starts at `payload`: `payload.details.channel`, say.
pub(super) fn parse_message(raw: &str) -> Result<MessagePayload<'_>, Error> {
    if !raw.starts_with('{') {
        return Err(Error::InvalidEvent {
            path: "payload".to_owned(),
            message: "expected an object".to_owned(),
        });
    }
    serde_json::from_str(raw).map_err(|error| locate(raw, &error))
}

/// Only on the error path: parses again, tracking the path this time.
fn locate(raw: &str, error: &serde_json::Error) -> Error {
    let mut de = serde_json::Deserializer::from_str(raw);
    let (path, message) = match serde_path_to_error::deserialize::<_, MessagePayload<'_>>(&mut de) {
        Err(located) => (
            located.path().to_string(),
            without_position(located.inner()),
        ),
        Ok(_) => (".".to_owned(), without_position(error)),
    };
    let path = if path == "." {
        "payload".to_owned()
    } else {
        format!("payload.{path}")
    };
    Error::InvalidEvent { path, message }
}

/// serde_json's message without its line and column.
pub(super) fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    match text.strip_suffix(&suffix) {
        Some(message) => message.to_owned(),
        None => text,
    }
}
