//! Typed Comapi events: the envelope, message payloads, event kinds and batch parsing.

use std::borrow::Cow;
use std::fmt;

use http::HeaderMap;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Error, Verifier};

/// One Comapi webhook event: the envelope, its raw payload, and a typed view of it.
///
/// An `Event<'a>` borrows its strings and payload from the body it was parsed from;
/// [`Event::into_owned`] detaches it. Events come from [`Verifier::verify_events`]
/// (HTTP requests) or [`parse_already_verified`] (bytes you verified earlier, read
/// back from a queue or spool).
///
/// The envelope's `eventId`, `name` and `payload` are required; `accountId`,
/// `apiSpaceId`, `revision`, `etag` and `timestamp` are optional, so an event Comapi
/// sends without one of them is still delivered. Unknown fields, at any level, are
/// tolerated and kept: [`Event::extra_fields`] for the envelope, [`Event::payload_json`]
/// for the payload.
///
/// # Serialization
///
/// `Event` serializes back to JSON, and parse → serialize → parse gives an equal
/// event. What is normalized: the envelope's known fields come first in a fixed order
/// (`eventId`, `accountId`, `apiSpaceId`, `name`, `payload`, `revision`, `etag`,
/// `timestamp`, then unknown fields in their original order), whitespace between the
/// envelope's tokens is dropped, and escapes in the envelope's own strings are
/// rewritten in serde_json's canonical form. The payload and the values of unknown
/// fields are written back byte for byte.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    event_id: Cow<'a, str>,
    account_id: Option<i64>,
    api_space_id: Option<Cow<'a, str>>,
    name: Cow<'a, str>,
    kind: EventKind,
    payload: Cow<'a, RawValue>,
    typed: Typed<'a>,
    revision: Option<u64>,
    etag: Option<Cow<'a, str>>,
    timestamp: Option<Cow<'a, str>>,
    extra: Vec<(Cow<'a, str>, Cow<'a, RawValue>)>,
}

/// What was read from the payload while parsing, by event family.
// Kept inline: most events are `message.*`, and boxing would cost one allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Typed<'a> {
    /// `message.*`: the whole typed payload.
    Message(MessagePayload<'a>),
    /// Other known families: only the id of the entity whose revisions are ordered.
    Entity(Option<Cow<'a, str>>),
    /// Unknown events: nothing; the raw payload is all there is.
    Untyped,
}

impl<'a> Event<'a> {
    /// The event's unique id (`eventId`, a uuid). Comapi repeats it when it retries.
    #[must_use]
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The Comapi account (`accountId`).
    #[must_use]
    pub fn account_id(&self) -> Option<i64> {
        self.account_id
    }

    /// The API space (`apiSpaceId`, a uuid).
    #[must_use]
    pub fn api_space_id(&self) -> Option<&str> {
        self.api_space_id.as_deref()
    }

    /// The event name as sent, for example `message.sent`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The event name as an enum; [`EventKind::Unknown`] for names this crate does
    /// not know yet (the event is still parsed and kept).
    #[must_use]
    pub fn kind(&self) -> EventKind {
        self.kind
    }

    /// The entity's revision: higher for later states of the same message or entity.
    #[must_use]
    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// The entity's `etag`, where Comapi sends one.
    #[must_use]
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// When Comapi raised the event (`timestamp`, ISO-8601), as sent.
    #[must_use]
    pub fn timestamp(&self) -> Option<&str> {
        self.timestamp.as_deref()
    }

    /// When Comapi raised the event, read from `timestamp` as an RFC 3339 time
    /// (`2017-08-31T09:26:14.604Z`, or with a `±HH:MM` offset). `None` when the
    /// field is absent or not such a time; one without an offset counts as not
    /// such a time, since whose clock it was cannot be known.
    ///
    /// The timestamp is inside the signed body, so once the body is verified its
    /// age can be trusted: the gate's replay window rests on it
    /// ([`Decision::Expired`](crate::Decision::Expired)).
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// let body = br#"{"eventId":"e1","name":"message.sent","payload":{"id":"m1"},
    ///              "timestamp":"2017-08-31T09:26:14.604Z"}"#;
    /// let event = &comapi_webhook::parse_already_verified(body)?[0];
    /// assert_eq!(event.time(), Some(UNIX_EPOCH + Duration::from_millis(1_504_171_574_604)));
    /// # Ok::<(), comapi_webhook::Error>(())
    /// ```
    #[must_use]
    pub fn time(&self) -> Option<std::time::SystemTime> {
        crate::timestamp::parse_rfc3339(self.timestamp.as_deref()?)
    }

    /// The payload exactly as received, for event kinds without a typed payload and
    /// for fields the typed payload does not cover.
    #[must_use]
    pub fn payload_json(&self) -> &RawValue {
        &self.payload
    }

    /// The typed payload of a `message.*` event (`sent`, `delivered`, `read`,
    /// `expired`, `failed`, `inbound`); `None` for other events.
    #[must_use]
    pub fn message(&self) -> Option<&MessagePayload<'a>> {
        match &self.typed {
            Typed::Message(message) => Some(message),
            _ => None,
        }
    }

    /// The id of the message this event is about: `payload.id` for `message.*`
    /// events, the message id for `conversationMessage.*` and `chatMessage.*`, and
    /// `None` for events that are not about a message.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        match self.kind.family() {
            Family::Message | Family::ConversationMessage | Family::ChatMessage => self.entity_id(),
            _ => None,
        }
    }

    /// The id of the thing whose revisions are ordered: the message for message,
    /// `conversationMessage.*` and `chatMessage.*` events; otherwise the
    /// conversation, profile or chat, from `payload.id`. `None` where there is none,
    /// and for unknown events.
    #[must_use]
    pub fn entity_id(&self) -> Option<&str> {
        match &self.typed {
            Typed::Message(message) => Some(&message.id),
            Typed::Entity(id) => id.as_deref(),
            Typed::Untyped => None,
        }
    }

    /// Envelope fields this crate does not know, in the order they came, with their
    /// raw JSON values.
    pub fn extra_fields(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.extra.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// Detaches the event from the body it was parsed from.
    #[must_use]
    pub fn into_owned(self) -> Event<'static> {
        Event {
            event_id: owned_str(self.event_id),
            account_id: self.account_id,
            api_space_id: self.api_space_id.map(owned_str),
            name: owned_str(self.name),
            kind: self.kind,
            payload: owned_raw(self.payload),
            typed: match self.typed {
                Typed::Message(message) => Typed::Message(message.into_owned()),
                Typed::Entity(id) => Typed::Entity(id.map(owned_str)),
                Typed::Untyped => Typed::Untyped,
            },
            revision: self.revision,
            etag: self.etag.map(owned_str),
            timestamp: self.timestamp.map(owned_str),
            extra: self
                .extra
                .into_iter()
                .map(|(k, v)| (owned_str(k), owned_raw(v)))
                .collect(),
        }
    }
}

/// Equal when every envelope field is equal and the payload and unknown fields are
/// the same JSON text.
impl PartialEq for Event<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.event_id == other.event_id
            && self.account_id == other.account_id
            && self.api_space_id == other.api_space_id
            && self.name == other.name
            && self.payload.get() == other.payload.get()
            && self.revision == other.revision
            && self.etag == other.etag
            && self.timestamp == other.timestamp
            && self.extra.len() == other.extra.len()
            && self
                .extra
                .iter()
                .zip(&other.extra)
                .all(|((k1, v1), (k2, v2))| k1 == k2 && v1.get() == v2.get())
    }
}

fn owned_str(s: Cow<'_, str>) -> Cow<'static, str> {
    Cow::Owned(s.into_owned())
}

fn owned_raw(raw: Cow<'_, RawValue>) -> Cow<'static, RawValue> {
    Cow::Owned(raw.into_owned())
}

/// The typed payload of a `message.*` event.
///
/// It covers the fields Comapi documents; anything else is in
/// [`Event::payload_json`]. JSON values that are the user's own or vary by channel
/// (`metadata`, `channelData`, `additionalInfo`, inbound `from`/`to`) are kept as raw
/// JSON for you to deserialize into your own types.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct MessagePayload<'a> {
    /// The message id (`id`).
    #[serde(borrow)]
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

impl MessagePayload<'_> {
    fn into_owned(self) -> MessagePayload<'static> {
        MessagePayload {
            id: owned_str(self.id),
            details: self.details.map(|d| MessageDetails {
                channel: d.channel.map(owned_str),
                channel_status: d
                    .channel_status
                    .into_iter()
                    .map(|s| ChannelStatus {
                        channel: owned_str(s.channel),
                        status: s.status.map(owned_str),
                        details: s.details.map(owned_raw),
                        updated_on: s.updated_on.map(owned_str),
                    })
                    .collect(),
                additional_info: d.additional_info.map(owned_raw),
            }),
            channel_data: self.channel_data.map(owned_raw),
            updated_on: self.updated_on.map(owned_str),
            metadata: self.metadata.map(owned_raw),
            channel: self.channel.map(owned_str),
            from: self.from.map(owned_raw),
            to: self.to.map(owned_raw),
            body: self.body.map(owned_str),
        }
    }
}

/// A string that borrows from the input where it has no escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
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

/// Ids read from the payload of events without a typed payload: lenient, since only
/// ordering depends on them. A non-string `id` counts as absent.
#[derive(Default)]
struct PayloadIds<'a> {
    id: Option<Cow<'a, str>>,
    message_id: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for PayloadIds<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdsVisitor;
        impl<'de> Visitor<'de> for IdsVisitor {
            type Value = PayloadIds<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut ids = PayloadIds::default();
                while let Some(CowStr(key)) = map.next_key()? {
                    let slot = match key.as_ref() {
                        "id" => &mut ids.id,
                        "messageId" => &mut ids.message_id,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value::<LenientStr<'de>>()?.0;
                }
                Ok(ids)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(PayloadIds::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(PayloadIds::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(PayloadIds::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(PayloadIds::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(PayloadIds::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(PayloadIds::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(PayloadIds::default())
            }
        }
        deserializer.deserialize_any(IdsVisitor)
    }
}

/// A string, or `None` for any other JSON value.
struct LenientStr<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for LenientStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let any = <&'de RawValue>::deserialize(deserializer)?;
        Ok(LenientStr(
            serde_json::from_str::<CowStr<'de>>(any.get())
                .ok()
                .map(|s| s.0),
        ))
    }
}

impl<'de> Deserialize<'de> for Event<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

fn set_once<T, E: de::Error>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), E> {
    if slot.replace(value).is_some() {
        return Err(E::duplicate_field(field));
    }
    Ok(())
}

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Event<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Comapi event envelope (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event<'de>, A::Error> {
        let mut event_id = None;
        let mut account_id = None;
        let mut api_space_id = None;
        let mut name = None;
        let mut payload: Option<&'de RawValue> = None;
        let mut revision = None;
        let mut etag = None;
        let mut timestamp = None;
        let mut extra = Vec::new();
        while let Some(CowStr(key)) = map.next_key()? {
            match key.as_ref() {
                "eventId" => {
                    set_once(&mut event_id, "eventId", map.next_value::<CowStr<'de>>()?.0)?
                }
                "accountId" => set_once(
                    &mut account_id,
                    "accountId",
                    map.next_value::<Option<i64>>()?,
                )?,
                "apiSpaceId" => set_once(
                    &mut api_space_id,
                    "apiSpaceId",
                    map.next_value::<Option<CowStr<'de>>>()?,
                )?,
                "name" => set_once(&mut name, "name", map.next_value::<CowStr<'de>>()?.0)?,
                "payload" => set_once(&mut payload, "payload", map.next_value()?)?,
                "revision" => {
                    set_once(&mut revision, "revision", map.next_value::<Option<u64>>()?)?
                }
                "etag" => set_once(&mut etag, "etag", map.next_value::<Option<CowStr<'de>>>()?)?,
                "timestamp" => set_once(
                    &mut timestamp,
                    "timestamp",
                    map.next_value::<Option<CowStr<'de>>>()?,
                )?,
                _ => {
                    let value: &'de RawValue = map.next_value()?;
                    extra.push((key, Cow::Borrowed(value)));
                }
            }
        }
        let event_id = event_id.ok_or_else(|| de::Error::missing_field("eventId"))?;
        let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
        let payload = payload.ok_or_else(|| de::Error::missing_field("payload"))?;
        let kind = EventKind::from_name(&name);
        let typed = type_payload(kind, payload).map_err(de::Error::custom)?;
        Ok(Event {
            event_id,
            account_id: account_id.flatten(),
            api_space_id: api_space_id.flatten().map(|s| s.0),
            name,
            kind,
            payload: Cow::Borrowed(payload),
            typed,
            revision: revision.flatten(),
            etag: etag.flatten().map(|s| s.0),
            timestamp: timestamp.flatten().map(|s| s.0),
            extra,
        })
    }
}

/// Reads what the event's family needs from the payload. A `message.*` payload
/// must match [`MessagePayload`]; the error then says where, relative to `payload`.
fn type_payload(kind: EventKind, payload: &RawValue) -> Result<Typed<'_>, PayloadError> {
    let raw = payload.get();
    Ok(match kind.family() {
        Family::Message if !raw.starts_with('{') => {
            return Err(PayloadError {
                path: String::new(),
                message: "expected an object".to_owned(),
            });
        }
        Family::Message => match serde_json::from_str::<MessagePayload<'_>>(raw) {
            Ok(message) => Typed::Message(message),
            Err(error) => return Err(PayloadError::locate(raw, error)),
        },
        Family::Unknown | Family::Interaction => Typed::Untyped,
        Family::ConversationMessage | Family::ChatMessage => {
            let ids = serde_json::from_str::<PayloadIds<'_>>(raw).unwrap_or_default();
            Typed::Entity(ids.message_id.or(ids.id))
        }
        Family::Conversation | Family::Profile | Family::Chat => Typed::Entity(
            serde_json::from_str::<PayloadIds<'_>>(raw)
                .unwrap_or_default()
                .id,
        ),
    })
}

/// A payload that does not match its typed form: the path inside the payload and
/// serde_json's message without its line and column.
struct PayloadError {
    path: String,
    message: String,
}

impl PayloadError {
    fn locate(raw: &str, error: serde_json::Error) -> Self {
        // Only on the error path: parse again, tracking the path this time.
        let mut de = serde_json::Deserializer::from_str(raw);
        match serde_path_to_error::deserialize::<_, MessagePayload<'_>>(&mut de) {
            Err(located) => {
                let path = located.path().to_string();
                PayloadError {
                    path: if path == "." { String::new() } else { path },
                    message: without_position(located.inner()),
                }
            }
            Ok(_) => PayloadError {
                path: String::new(),
                message: without_position(&error),
            },
        }
    }
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{PAYLOAD_MARK}: {}", self.message)
        } else {
            write!(f, "{PAYLOAD_MARK}.{}: {}", self.path, self.message)
        }
    }
}

/// How payload errors begin, so the envelope's path can be joined to them.
const PAYLOAD_MARK: &str = "payload";

fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    match text.strip_suffix(&suffix) {
        Some(message) => message.to_owned(),
        None => text,
    }
}

impl Serialize for Event<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("eventId", &self.event_id)?;
        if let Some(account_id) = self.account_id {
            map.serialize_entry("accountId", &account_id)?;
        }
        if let Some(api_space_id) = &self.api_space_id {
            map.serialize_entry("apiSpaceId", api_space_id)?;
        }
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("payload", &*self.payload)?;
        if let Some(revision) = self.revision {
            map.serialize_entry("revision", &revision)?;
        }
        if let Some(etag) = &self.etag {
            map.serialize_entry("etag", etag)?;
        }
        if let Some(timestamp) = &self.timestamp {
            map.serialize_entry("timestamp", timestamp)?;
        }
        for (key, value) in &self.extra {
            map.serialize_entry(key, &**value)?;
        }
        map.end()
    }
}

/// Parses a body that was **already verified** (for example read back from your
/// own queue or spool) into its events: one envelope object gives one event, a
/// batch (a JSON array of envelopes) gives them all in order, and an empty array
/// gives none. It needs no secret, which is exactly why it must never see bytes
/// straight off an HTTP request: use [`Verifier::verify_events`] there.
///
/// ```
/// let stored = br#"{"eventId":"e-1","name":"profile.update","payload":{"id":"p-7"},"revision":3}"#;
/// let events = comapi_webhook::parse_already_verified(stored)?;
/// assert_eq!(events[0].entity_id(), Some("p-7"));
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidEvent`] (HTTP 400) with the JSON path of the first problem, for
/// example `[3].payload.id: invalid type: integer, expected a string`. One bad
/// element fails the whole batch, so a receiver never stores half of it.
pub fn parse_already_verified(body: &[u8]) -> Result<Vec<Event<'_>>, Error> {
    let batch = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => true,
        Some(b'{') => false,
        _ => {
            return Err(Error::InvalidEvent {
                path: "$".to_owned(),
                message: "expected an event object or an array of events".to_owned(),
            });
        }
    };
    let parsed = if batch {
        from_body::<Vec<Event<'_>>>(body)
    } else {
        from_body::<Event<'_>>(body).map(|event| vec![event])
    };
    parsed.map_err(|error| locate_error(body, batch, &error))
}

/// Parses a body that is UTF-8 as text, which is faster (serde_json then checks no
/// string again), and any other through `from_slice`, which says where it breaks.
fn from_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

/// Validates an already verified body like [`parse_already_verified`] and returns
/// each event's envelope as its raw JSON text, in order: what a receiver stores.
#[cfg(feature = "receiver")]
pub(crate) fn split_already_verified(body: &[u8]) -> Result<Vec<&str>, Error> {
    let batch = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => true,
        Some(b'{') => false,
        _ => return parse_already_verified(body).map(|_| Vec::new()),
    };
    let split = if batch {
        serde_json::from_slice::<Vec<&RawValue>>(body).and_then(|raw| {
            raw.into_iter()
                .map(|element| {
                    serde_json::from_str::<Event<'_>>(element.get())?;
                    Ok(element.get())
                })
                .collect()
        })
    } else {
        // One envelope: the body itself is the raw event, so one pass checks it.
        match std::str::from_utf8(body) {
            Ok(text) => serde_json::from_str::<Event<'_>>(text)
                .map(|_| vec![text.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r'))]),
            Err(error) => {
                return Err(Error::InvalidEvent {
                    path: "$".to_owned(),
                    message: format!("the body is not UTF-8: {error}"),
                });
            }
        }
    };
    split.map_err(|error| locate_error(body, batch, &error))
}

/// Only on the error path: parses again with path tracking, and joins the path of
/// the envelope to the path inside the payload.
fn locate_error(body: &[u8], batch: bool, error: &serde_json::Error) -> Error {
    let mut de = serde_json::Deserializer::from_slice(body);
    let located = if batch {
        serde_path_to_error::deserialize::<_, Vec<Event<'_>>>(&mut de).map(drop)
    } else {
        serde_path_to_error::deserialize::<_, Event<'_>>(&mut de).map(drop)
    };
    let (path, message) = match located {
        Err(located) => (
            located.path().to_string(),
            without_position(located.inner()),
        ),
        Ok(()) => (".".to_owned(), without_position(error)),
    };
    let root = path == "." || path == "?";
    let (path, message) = match message.strip_prefix(PAYLOAD_MARK) {
        // "payload.details.channel: ..." raised for the envelope at `path`.
        Some(rest) if rest.starts_with(['.', ':']) => {
            let (inner, message) = rest.split_once(": ").unwrap_or((rest, ""));
            let prefix = if root {
                String::new()
            } else {
                format!("{path}.")
            };
            (format!("{prefix}{PAYLOAD_MARK}{inner}"), message.to_owned())
        }
        _ if root => ("$".to_owned(), message),
        _ => (path, message),
    };
    Error::InvalidEvent { path, message }
}

impl Verifier {
    /// Verifies the request's signature, then parses the body into its events (see
    /// [`parse_already_verified`] for the forms accepted). The events borrow from
    /// `body`.
    ///
    /// ```
    /// use comapi_webhook::{Verifier, SIGNATURE_HEADER};
    /// let verifier = Verifier::new("a-secret-of-at-least-16-bytes")?;
    /// let body = br#"[{"eventId":"e-1","name":"message.read","payload":{"id":"m-1"},"revision":3}]"#;
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert(SIGNATURE_HEADER, verifier.sign(body).to_string().parse()?);
    /// let events = verifier.verify_events(&headers, body)?;
    /// assert_eq!(events[0].message_id(), Some("m-1"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// The signature errors of [`Verifier::verify`] (401) come first, before any
    /// parsing; then [`Error::InvalidEvent`] (400).
    pub fn verify_events<'b>(
        &self,
        headers: &HeaderMap,
        body: &'b [u8],
    ) -> Result<Vec<Event<'b>>, Error> {
        self.verify(headers, body)?;
        parse_already_verified(body)
    }
}

/// The family an event name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Family {
    /// `message.*`: messages sent through Comapi's One API, and inbound messages.
    Message,
    /// `interaction.*`: a recipient's interaction, such as a link click.
    Interaction,
    /// `conversationMessage.*`: messages in a conversation.
    ConversationMessage,
    /// `conversation.*`: conversations and their participants.
    Conversation,
    /// `profile.*`: profiles.
    Profile,
    /// `chat.*`: chats.
    Chat,
    /// `chatMessage.*`: messages in a chat.
    ChatMessage,
    /// A name this crate does not know.
    Unknown,
}

impl Family {
    /// A short stable name, used in store keys: `message`, `conversation`, ….
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Message => "message",
            Family::Interaction => "interaction",
            Family::ConversationMessage => "conversationMessage",
            Family::Conversation => "conversation",
            Family::Profile => "profile",
            Family::Chat => "chat",
            Family::ChatMessage => "chatMessage",
            Family::Unknown => "unknown",
        }
    }
}

macro_rules! event_kinds {
    ($($name:literal => $kind:expr, $family:ident;)*) => {
        impl EventKind {
            /// The kind for an event name; [`EventKind::Unknown`] for a name this
            /// crate does not know.
            #[must_use]
            pub fn from_name(name: &str) -> EventKind {
                match name {
                    $($name => $kind,)*
                    _ => EventKind::Unknown,
                }
            }

            /// The event name Comapi uses for this kind; `None` for
            /// [`EventKind::Unknown`] (the event's own [`Event::name`] has it).
            #[must_use]
            pub fn as_name(self) -> Option<&'static str> {
                $(if self == $kind {
                    return Some($name);
                })*
                None
            }

            /// The family this kind belongs to.
            #[must_use]
            pub fn family(self) -> Family {
                $(if self == $kind {
                    return Family::$family;
                })*
                Family::Unknown
            }
        }

        #[cfg(test)]
        const ALL_NAMES: &[&str] = &[$($name),*];
    };
}

event_kinds! {
    "message.sent" => EventKind::Message(MessageStatus::Sent), Message;
    "message.delivered" => EventKind::Message(MessageStatus::Delivered), Message;
    "message.read" => EventKind::Message(MessageStatus::Read), Message;
    "message.expired" => EventKind::Message(MessageStatus::Expired), Message;
    "message.failed" => EventKind::Message(MessageStatus::Failed), Message;
    "message.inbound" => EventKind::MessageInbound, Message;
    "interaction.click" => EventKind::InteractionClick, Interaction;
    "conversationMessage.sent" => EventKind::ConversationMessage(ConversationMessageStatus::Sent), ConversationMessage;
    "conversationMessage.delivered" => EventKind::ConversationMessage(ConversationMessageStatus::Delivered), ConversationMessage;
    "conversationMessage.read" => EventKind::ConversationMessage(ConversationMessageStatus::Read), ConversationMessage;
    "conversation.create" => EventKind::Conversation(ConversationAction::Create), Conversation;
    "conversation.delete" => EventKind::Conversation(ConversationAction::Delete), Conversation;
    "conversation.undelete" => EventKind::Conversation(ConversationAction::Undelete), Conversation;
    "conversation.participantAdded" => EventKind::Conversation(ConversationAction::ParticipantAdded), Conversation;
    "profile.create" => EventKind::Profile(ProfileAction::Create), Profile;
    "profile.update" => EventKind::Profile(ProfileAction::Update), Profile;
    "profile.delete" => EventKind::Profile(ProfileAction::Delete), Profile;
    "profile.undelete" => EventKind::Profile(ProfileAction::Undelete), Profile;
    "profile.devicesUpdated" => EventKind::Profile(ProfileAction::DevicesUpdated), Profile;
    "chat.create" => EventKind::Chat(ChatAction::Create), Chat;
    "chat.channelUpdated" => EventKind::Chat(ChatAction::ChannelUpdated), Chat;
    "chat.closed" => EventKind::Chat(ChatAction::Closed), Chat;
    "chat.delete" => EventKind::Chat(ChatAction::Delete), Chat;
    "chatMessage.sent" => EventKind::ChatMessageSent, ChatMessage;
}

/// What an event is, from its name. Match on it to dispatch; a name this crate does
/// not know is [`EventKind::Unknown`] and the event is still delivered, with its raw
/// name ([`Event::name`]) and payload ([`Event::payload_json`]).
///
/// ```
/// use comapi_webhook::{EventKind, MessageStatus};
/// assert_eq!(EventKind::from_name("message.read"), EventKind::Message(MessageStatus::Read));
/// assert_eq!(EventKind::from_name("message.teleported"), EventKind::Unknown);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// `message.sent`, `message.delivered`, `message.read`, `message.expired`,
    /// `message.failed`.
    Message(MessageStatus),
    /// `message.inbound`: a message from one of your contacts.
    MessageInbound,
    /// `interaction.click`: a tracked link was clicked.
    InteractionClick,
    /// `conversationMessage.sent`, `.delivered`, `.read`.
    ConversationMessage(ConversationMessageStatus),
    /// `conversation.create`, `.delete`, `.undelete`, `.participantAdded`.
    Conversation(ConversationAction),
    /// `profile.create`, `.update`, `.delete`, `.undelete`, `.devicesUpdated`.
    Profile(ProfileAction),
    /// `chat.create`, `.channelUpdated`, `.closed`, `.delete`.
    Chat(ChatAction),
    /// `chatMessage.sent`.
    ChatMessageSent,
    /// Any other name: the fallback that keeps the event instead of failing it.
    Unknown,
}

/// The state a `message.*` event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageStatus {
    /// `message.sent`
    Sent,
    /// `message.delivered`
    Delivered,
    /// `message.read`
    Read,
    /// `message.expired`
    Expired,
    /// `message.failed`
    Failed,
}

/// The state a `conversationMessage.*` event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConversationMessageStatus {
    /// `conversationMessage.sent`
    Sent,
    /// `conversationMessage.delivered`
    Delivered,
    /// `conversationMessage.read`
    Read,
}

/// What happened to a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConversationAction {
    /// `conversation.create`
    Create,
    /// `conversation.delete`
    Delete,
    /// `conversation.undelete`
    Undelete,
    /// `conversation.participantAdded`
    ParticipantAdded,
}

/// What happened to a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProfileAction {
    /// `profile.create`
    Create,
    /// `profile.update`
    Update,
    /// `profile.delete`
    Delete,
    /// `profile.undelete`
    Undelete,
    /// `profile.devicesUpdated`
    DevicesUpdated,
}

/// What happened to a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChatAction {
    /// `chat.create`
    Create,
    /// `chat.channelUpdated`
    ChannelUpdated,
    /// `chat.closed`
    Closed,
    /// `chat.delete`
    Delete,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_through_its_kind() {
        for name in ALL_NAMES {
            let kind = EventKind::from_name(name);
            assert_ne!(kind, EventKind::Unknown, "{name}");
            assert_eq!(kind.as_name(), Some(*name));
            assert_ne!(kind.family(), Family::Unknown, "{name}");
        }
        assert_eq!(EventKind::Unknown.as_name(), None);
        assert_eq!(EventKind::Unknown.family(), Family::Unknown);
    }
}
