//! Comapi events: the envelope (read leniently), typed payloads on demand, event
//! kinds and batch splitting.
//!
//! # Design
//!
//! Comapi never retries a `400`, so whatever earns one loses the whole body for
//! good. Parsing therefore checks only what identifies an event (a string `eventId`
//! and a string `name`), keeps every other field as received, and reads it when
//! asked: a field of an unexpected type is absent, not an error. The typed payload
//! of a `message.*` event is parsed when [`Event::message`] is called, and a
//! failure there fails that call alone. The shapes come from Comapi's docs and
//! samples, not from captures, so drift is expected.

use std::borrow::Cow;
use std::time::SystemTime;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::Error;

mod batch;
mod envelope;
mod kind;
mod payload;

pub(crate) use batch::parse_events;
#[cfg(feature = "receiver")]
pub(crate) use batch::split_already_verified;
pub use kind::{
    ChatAction, ConversationAction, ConversationMessageStatus, EventKind, Family, MessageStatus,
    ProfileAction,
};
pub use payload::{ChannelStatus, MessageDetails, MessagePayload};

/// One Comapi webhook event: the envelope as received, read leniently.
///
/// An `Event<'a>` borrows its strings and fields from the body it was parsed from;
/// [`Event::into_owned`] detaches it. Events come from
/// [`Verifier::verify_events`](crate::Verifier::verify_events) (HTTP requests) or
/// [`dangerous::parse_unverified`](crate::dangerous::parse_unverified) (bytes you verified earlier, read back from a queue or
/// spool).
///
/// Only `eventId` and `name` are required, and must be strings. Every other field
/// (`accountId`, `apiSpaceId`, `payload`, `revision`, `etag`, `timestamp`, and any
/// field this crate does not know) is kept exactly as received
/// ([`Event::field_json`]) and read when asked for: a value of an unexpected type
/// reads as absent, a `revision` or `accountId` given as a decimal string
/// (`"5"`) reads as that number. The typed payload is parsed on demand
/// ([`Event::message`]).
///
/// ```
/// let body = br#"{"eventId":"e-1","name":"message.read","revision":"5","accountId":true,
///               "payload":{"id":"m-1","body":42}}"#;
/// let event = &comapi_webhook::dangerous::parse_unverified(body)?[0];
/// assert_eq!(event.revision(), Some(5)); // a decimal string reads as the number
/// assert_eq!(event.account_id(), None); // a value that cannot be read is absent...
/// assert_eq!(event.field_json("accountId").map(|raw| raw.get()), Some("true")); // ...and kept
/// assert_eq!(event.message_id(), Some("m-1"));
/// let error = event.message().unwrap_err(); // a payload that does not match its type
/// assert_eq!(error.to_string(), "invalid event body at payload.body: invalid type: integer `42`, expected a string");
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
///
/// # Serialization
///
/// `Event` serializes back to JSON, and parse → serialize → parse gives an equal
/// event. What is normalized: the envelope's known fields come first in a fixed order
/// (`eventId`, `accountId`, `apiSpaceId`, `name`, `payload`, `revision`, `etag`,
/// `timestamp`, then other fields in their original order), whitespace between the
/// envelope's tokens is dropped, and escapes in `eventId` and `name` are rewritten in
/// serde_json's canonical form. Every other value is written back byte for byte.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    event_id: Cow<'a, str>,
    name: Cow<'a, str>,
    kind: EventKind,
    account_id: Option<Field<'a, i64>>,
    api_space_id: Option<Field<'a, Cow<'a, str>>>,
    payload: Option<Cow<'a, RawValue>>,
    revision: Option<Field<'a, u64>>,
    etag: Option<Field<'a, Cow<'a, str>>>,
    timestamp: Option<Field<'a, Cow<'a, str>>>,
    /// Fields this crate does not know, and later copies of a field that came twice.
    extra: Vec<(Cow<'a, str>, Cow<'a, RawValue>)>,
    /// Read from the payload when the event is parsed: the gate needs it for every
    /// event, and reading it never fails.
    entity_id: Option<Cow<'a, str>>,
}

/// An envelope field as received, and what it reads as (`None` when its value is
/// not of a type this field can be read from).
#[derive(Debug, Clone)]
struct Field<'a, T> {
    raw: Cow<'a, RawValue>,
    value: Option<T>,
}

impl<'a, T> Field<'a, T> {
    fn into_owned<U>(self, value: impl FnOnce(T) -> U) -> Field<'static, U> {
        Field {
            raw: owned_raw(self.raw),
            value: self.value.map(value),
        }
    }
}

/// An optional field as received.
fn raw<'f, T>(field: &'f Option<Field<'_, T>>) -> Option<&'f RawValue> {
    field.as_ref().map(|f| &*f.raw)
}

/// The value of an optional field, when it could be read.
fn read<'f, T>(field: &'f Option<Field<'_, T>>) -> Option<&'f T> {
    field.as_ref()?.value.as_ref()
}

impl<'a> Event<'a> {
    /// The event's unique id (`eventId`, a uuid). Comapi repeats it when it retries.
    #[must_use]
    pub fn event_id(&self) -> &str {
        &self.event_id
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

    /// The Comapi account (`accountId`): an integer, or a decimal string.
    #[must_use]
    pub fn account_id(&self) -> Option<i64> {
        read(&self.account_id).copied()
    }

    /// The API space (`apiSpaceId`, a uuid), when it is a string.
    #[must_use]
    pub fn api_space_id(&self) -> Option<&str> {
        read(&self.api_space_id).map(|s| s.as_ref())
    }

    /// The entity's revision: higher for later states of the same message or
    /// entity. An integer, or a decimal string.
    #[must_use]
    pub fn revision(&self) -> Option<u64> {
        read(&self.revision).copied()
    }

    /// The entity's `etag`, where Comapi sends one as a string.
    #[must_use]
    pub fn etag(&self) -> Option<&str> {
        read(&self.etag).map(|s| s.as_ref())
    }

    /// When Comapi raised the event (`timestamp`, ISO-8601), as sent, when it is a
    /// string.
    #[must_use]
    pub fn timestamp(&self) -> Option<&str> {
        read(&self.timestamp).map(|s| s.as_ref())
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
    /// let body = br#"{"eventId":"e1","name":"message.sent","timestamp":"2017-08-31T09:26:14.604Z"}"#;
    /// let event = &comapi_webhook::dangerous::parse_unverified(body)?[0];
    /// assert_eq!(event.time(), Some(UNIX_EPOCH + Duration::from_millis(1_504_171_574_604)));
    /// # Ok::<(), comapi_webhook::Error>(())
    /// ```
    #[must_use]
    pub fn time(&self) -> Option<SystemTime> {
        crate::timestamp::parse_rfc3339(self.timestamp()?)
    }

    /// The payload exactly as received; `None` when the envelope has none.
    #[must_use]
    pub fn payload_json(&self) -> Option<&RawValue> {
        self.payload.as_deref()
    }

    /// Any envelope field exactly as received, by its JSON name (`"revision"`,
    /// `"payload"`, or a field this crate does not know); for a field sent twice,
    /// the first. `eventId` and `name` are [`Event::event_id`] and [`Event::name`].
    #[must_use]
    pub fn field_json(&self, name: &str) -> Option<&RawValue> {
        self.raw_fields()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// The typed payload of a `message.*` event (`sent`, `delivered`, `read`,
    /// `expired`, `failed`, `inbound`), parsed now from [`Event::payload_json`].
    ///
    /// # Errors
    /// [`Error::InvalidEvent`] saying where the payload does not match
    /// [`MessagePayload`] (`payload.details.channel: invalid type: …`), when there
    /// is no payload, or when the event is not a `message.*` event. It fails this
    /// call only: the event was stored and can be read in other ways.
    pub fn message(&self) -> Result<MessagePayload<'_>, Error> {
        if self.kind.family() != Family::Message {
            return Err(Error::InvalidEvent {
                path: "name".to_owned(),
                message: format!("{:?} is not a message.* event", self.name),
            });
        }
        let raw = self.payload_json().ok_or_else(|| Error::InvalidEvent {
            path: "payload".to_owned(),
            message: "missing field `payload`".to_owned(),
        })?;
        payload::parse_message(raw.get())
    }

    /// The id of the message this event is about: `payload.id` (or
    /// `payload.messageId`) for `message.*` events, the message id for
    /// `conversationMessage.*` and `chatMessage.*`, and `None` for events that are
    /// not about a message.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        match self.kind.family() {
            Family::Message | Family::ConversationMessage | Family::ChatMessage => self.entity_id(),
            _ => None,
        }
    }

    /// The id of the thing whose revisions are ordered: the message for message,
    /// `conversationMessage.*` and `chatMessage.*` events; otherwise the
    /// conversation, profile or chat, from `payload.id`. `None` where there is none
    /// (or it is not a string), and for unknown events.
    #[must_use]
    pub fn entity_id(&self) -> Option<&str> {
        self.entity_id.as_deref()
    }

    /// Envelope fields this crate does not know, in the order they came, with their
    /// raw JSON values; also the later copies of a field that came twice.
    pub fn extra_fields(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.extra.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// Detaches the event from the body it was parsed from.
    #[must_use]
    pub fn into_owned(self) -> Event<'static> {
        Event {
            event_id: owned_str(self.event_id),
            name: owned_str(self.name),
            kind: self.kind,
            account_id: self.account_id.map(|f| f.into_owned(|v| v)),
            api_space_id: self.api_space_id.map(|f| f.into_owned(owned_str)),
            payload: self.payload.map(owned_raw),
            revision: self.revision.map(|f| f.into_owned(|v| v)),
            etag: self.etag.map(|f| f.into_owned(owned_str)),
            timestamp: self.timestamp.map(|f| f.into_owned(owned_str)),
            extra: self
                .extra
                .into_iter()
                .map(|(k, v)| (owned_str(k), owned_raw(v)))
                .collect(),
            entity_id: self.entity_id.map(owned_str),
        }
    }

    /// The envelope's fields other than `eventId` and `name`, in serialization
    /// order, as received.
    fn raw_fields(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        [
            ("accountId", raw(&self.account_id)),
            ("apiSpaceId", raw(&self.api_space_id)),
            ("payload", self.payload_json()),
            ("revision", raw(&self.revision)),
            ("etag", raw(&self.etag)),
            ("timestamp", raw(&self.timestamp)),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some((key, value?)))
        .chain(self.extra_fields())
    }
}

/// Equal when `eventId` and `name` are equal and every other field is the same JSON
/// text.
impl PartialEq for Event<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.event_id == other.event_id
            && self.name == other.name
            && self
                .raw_fields()
                .map(|(k, v)| (k, v.get()))
                .eq(other.raw_fields().map(|(k, v)| (k, v.get())))
    }
}

impl Serialize for Event<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("eventId", &self.event_id)?;
        // `name` keeps its place after `accountId` and `apiSpaceId`.
        let mut name_written = false;
        for (key, value) in self.raw_fields() {
            if !name_written && !matches!(key, "accountId" | "apiSpaceId") {
                map.serialize_entry("name", &self.name)?;
                name_written = true;
            }
            map.serialize_entry(key, value)?;
        }
        if !name_written {
            map.serialize_entry("name", &self.name)?;
        }
        map.end()
    }
}

fn owned_str(s: Cow<'_, str>) -> Cow<'static, str> {
    Cow::Owned(s.into_owned())
}

fn owned_raw(raw: Cow<'_, RawValue>) -> Cow<'static, RawValue> {
    Cow::Owned(raw.into_owned())
}
