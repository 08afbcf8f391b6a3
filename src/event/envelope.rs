//! Reading the envelope: `eventId` and `name` must be strings; every other field is
//! kept as received and read leniently, so a field of an unexpected type is absent
//! rather than an error.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Event, EventKind, Family, Field};

impl<'de> Deserialize<'de> for Event<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Event<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Comapi event envelope (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event<'de>, A::Error> {
        let mut event_id = None;
        let mut name = None;
        let mut account_id = None;
        let mut api_space_id = None;
        let mut payload: Option<&'de RawValue> = None;
        let mut revision = None;
        let mut etag = None;
        let mut timestamp = None;
        let mut extra = Vec::new();
        while let Some(CowStr(key)) = map.next_key()? {
            // The two fields that identify an event must be strings. A field that
            // comes twice keeps its first value; the later ones are kept as extra
            // fields, so nothing of the envelope is lost.
            match key.as_ref() {
                "eventId" if event_id.is_none() => {
                    event_id = Some(map.next_value::<CowStr<'de>>()?.0);
                    continue;
                }
                "name" if name.is_none() => {
                    name = Some(map.next_value::<CowStr<'de>>()?.0);
                    continue;
                }
                _ => {}
            }
            let value: &'de RawValue = map.next_value()?;
            let slot_taken = match key.as_ref() {
                "accountId" => set_first(&mut account_id, value, read_integer),
                "apiSpaceId" => set_first(&mut api_space_id, value, read_str),
                "payload" if payload.is_none() => {
                    payload = Some(value);
                    true
                }
                "revision" => set_first(&mut revision, value, read_integer),
                "etag" => set_first(&mut etag, value, read_str),
                "timestamp" => set_first(&mut timestamp, value, read_str),
                _ => false,
            };
            if !slot_taken {
                extra.push((key, Cow::Borrowed(value)));
            }
        }
        let event_id = event_id.ok_or_else(|| de::Error::missing_field("eventId"))?;
        let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
        let kind = EventKind::from_name(&name);
        let entity_id = payload.and_then(|raw| entity_id(kind.family(), raw));
        Ok(Event {
            event_id,
            name,
            kind,
            account_id,
            api_space_id,
            payload: payload.map(Cow::Borrowed),
            revision,
            etag,
            timestamp,
            extra,
            entity_id,
        })
    }
}

/// Fills an empty `slot` with `value` and what `read` makes of it; false (and the
/// slot left alone) when it was filled already.
fn set_first<'de, T>(
    slot: &mut Option<Field<'de, T>>,
    value: &'de RawValue,
    read: impl FnOnce(&'de RawValue) -> Option<T>,
) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(Field {
        raw: Cow::Borrowed(value),
        value: read(value),
    });
    true
}

/// A JSON string, unescaped, borrowing where it has no escapes; `None` for any
/// other JSON value.
pub(super) fn read_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<CowStr<'_>>(raw.get())
        .ok()
        .map(|s| s.0)
}

/// A JSON integer, or a string holding a decimal integer (`"5"`); `None` for
/// anything else, and for a number out of `T`'s range.
pub(super) fn read_integer<T: std::str::FromStr + for<'a> Deserialize<'a>>(
    raw: &RawValue,
) -> Option<T> {
    match serde_json::from_str::<T>(raw.get()) {
        Ok(number) => Some(number),
        Err(_) => read_str(raw).and_then(|text| {
            let digits = text.strip_prefix('-').unwrap_or(&text);
            let decimal = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
            if decimal { text.parse().ok() } else { None }
        }),
    }
}

/// The id of the entity whose revisions are ordered, read from the payload.
fn entity_id(family: Family, payload: &RawValue) -> Option<Cow<'_, str>> {
    let ids = || serde_json::from_str::<PayloadIds<'_>>(payload.get()).unwrap_or_default();
    match family {
        Family::Message => {
            let ids = ids();
            ids.id.or(ids.message_id)
        }
        Family::ConversationMessage | Family::ChatMessage => {
            let ids = ids();
            ids.message_id.or(ids.id)
        }
        Family::Conversation | Family::Profile | Family::Chat => ids().id,
        Family::Unknown | Family::Interaction => None,
    }
}

/// A string that borrows from the input where it has no escapes.
pub(super) struct CowStr<'a>(pub(super) Cow<'a, str>);

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

/// The ids read from every payload when the event is parsed: lenient, since only
/// ordering depends on them. A non-string id counts as absent; a payload that is
/// not an object has none.
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn raw(json: &str) -> &RawValue {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn integers_read_from_numbers_and_decimal_strings_only() {
        assert_eq!(read_integer::<u64>(raw("5")), Some(5));
        assert_eq!(read_integer::<u64>(raw("\"5\"")), Some(5));
        assert_eq!(read_integer::<i64>(raw("\"-12\"")), Some(-12));
        for wrong in ["5.5", "\"5x\"", "\"\"", "\"-\"", "true", "null", "{}", "-1"] {
            assert_eq!(read_integer::<u64>(raw(wrong)), None, "{wrong}");
        }
        assert_eq!(
            read_integer::<u64>(raw("18446744073709551616")),
            None,
            "out of range"
        );
    }

    #[test]
    fn strings_borrow_unless_escaped_and_other_values_are_absent() {
        assert!(matches!(
            read_str(raw("\"plain\"")),
            Some(Cow::Borrowed("plain"))
        ));
        assert_eq!(read_str(raw(r#""caf\u00e9""#)).as_deref(), Some("café"));
        assert_eq!(read_str(raw("42")), None);
    }

    #[test]
    fn a_field_sent_twice_keeps_its_first_value() {
        let mut slot = None;
        assert!(set_first(&mut slot, raw("1"), read_integer::<u64>));
        assert!(!set_first(&mut slot, raw("2"), read_integer::<u64>));
        assert_eq!(slot.and_then(|field| field.value), Some(1));
    }
}
