//! The stored line: `{"receivedAt":…,"secretIndex":…,"event":{…}}`, written by the
//! receive step, checked for `Spool::append`, and read back by the reader.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Position, corrupt};
use crate::{Error, Event};

/// What [`Spool::append`] takes: whole spool records holding `events` events.
pub(super) fn check_records(lines: &[u8], events: u64) -> Result<(), Error> {
    let refuse = |what: String| {
        Err(Error::storage(
            "cannot append",
            io::Error::new(io::ErrorKind::InvalidInput, what),
        ))
    };
    if lines.is_empty() {
        return if events == 0 {
            Ok(())
        } else {
            refuse(format!("no lines, but {events} events"))
        };
    }
    if lines.last() != Some(&b'\n') || memchr::memchr(0, lines).is_some() {
        return refuse("lines must end in a line feed and hold no zero byte".to_owned());
    }
    let mut count = 0u64;
    for (number, line) in lines[..lines.len() - 1].split(|&b| b == b'\n').enumerate() {
        let record = serde_json::from_slice::<Line<'_>>(line)
            .map_err(|e| e.to_string())
            .and_then(|record| {
                serde_json::from_str::<Event<'_>>(record.event.get()).map_err(|e| e.to_string())
            });
        if let Err(error) = record {
            return refuse(format!(
                "line {} is not a spool record: {error}",
                number + 1
            ));
        }
        count += 1;
    }
    if count != events {
        return refuse(format!("{count} lines, but {events} events"));
    }
    Ok(())
}

/// One spool line as stored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    #[serde(borrow)]
    received_at: Cow<'a, str>,
    secret_index: usize,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// One event read back from the spool.
#[derive(Debug, Clone)]
pub struct SpooledEvent {
    /// The batch this line was read in, shared by its events: one read, no copies.
    pub(super) chunk: Arc<Vec<u8>>,
    pub(super) line: std::ops::Range<usize>,
    pub(super) end: Position,
    /// Where it came from in the retry schedule, if it did.
    pub(super) retry: Option<Arc<super::retry::RetryTag>>,
}

/// A spool line's parts: `receivedAt`, `secretIndex` and the raw event.
struct Parts<'a> {
    received_at: Cow<'a, str>,
    secret_index: usize,
    event: &'a str,
}

impl SpooledEvent {
    /// Its attempts so far, from the retry schedule (`""` for none).
    pub(crate) fn history(&self) -> &str {
        self.retry.as_ref().map_or("", |tag| tag.history.as_str())
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.chunk.get(self.line.clone()).unwrap_or_default()
    }

    fn parts(&self) -> Result<Parts<'_>, Error> {
        parts(self.bytes(), || {
            format!("in the spool before {:?}", self.end)
        })
    }

    /// The event, parsed from the envelope as it was received (it was verified
    /// before it was stored).
    ///
    /// # Errors
    /// [`Error::Storage`] if the line is corrupt.
    pub fn event(&self) -> Result<Event<'_>, Error> {
        record_event(self.bytes(), || {
            format!("in the spool before {:?}", self.end)
        })
    }

    /// When the receiver stored it (RFC 3339, UTC).
    ///
    /// # Errors
    /// [`Error::Storage`] if the line is corrupt.
    pub fn received_at(&self) -> Result<String, Error> {
        Ok(self.parts()?.received_at.into_owned())
    }

    /// Which of the verifier's secrets matched when it arrived (0 is the primary).
    ///
    /// # Errors
    /// [`Error::Storage`] if the line is corrupt.
    pub fn secret_index(&self) -> Result<usize, Error> {
        Ok(self.parts()?.secret_index)
    }

    /// The spool position just after this event; acknowledge it once processed.
    #[must_use]
    pub fn end(&self) -> Position {
        self.end
    }
}

/// A record's parts, with or without its line end; `at` says where it was stored.
fn parts(record: &[u8], at: impl Fn() -> String) -> Result<Parts<'_>, Error> {
    // The layout this crate writes, taken apart without a second JSON scan; any
    // other valid record goes through serde.
    if let Some(parts) = split_line(record) {
        return Ok(parts);
    }
    let parsed: Line<'_> = serde_json::from_slice(record)
        .map_err(|e| corrupt(format!("corrupt record {}", at()), e))?;
    Ok(Parts {
        received_at: parsed.received_at,
        secret_index: parsed.secret_index,
        event: parsed.event.get(),
    })
}

/// When a stored record was received, if it says so readably.
pub(crate) fn record_received_at(record: &[u8]) -> Option<std::time::SystemTime> {
    let parts = parts(record, String::new).ok()?;
    crate::timestamp::parse_rfc3339(&parts.received_at)
}

/// The event of a stored record (a spool line, a stream entry's `record`), with or
/// without its line end; `at` says where it was stored.
pub(crate) fn record_event(record: &[u8], at: impl Fn() -> String) -> Result<Event<'_>, Error> {
    let raw = parts(record, &at)?.event;
    // One envelope, already valid UTF-8: parsed straight, without the batch check.
    serde_json::from_str(raw).map_err(|e| corrupt(format!("corrupt event {}", at()), e))
}

/// One spool line per event, in the layout [`split_line`] reads back: the envelope's raw bytes with line breaks (which in
/// valid JSON can only be insignificant whitespace) turned into spaces.
pub(crate) fn encode_lines(events: &[&str], secret_index: usize) -> Vec<u8> {
    // `{"receivedAt":"<24 bytes>","secretIndex":<up to 20 digits>,"event":` and `}\n`.
    const FRAME: usize = 84 + 2;
    let received_at = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let mut lines = Vec::with_capacity(events.iter().map(|e| FRAME + e.len()).sum());
    let mut prefix = 0..0;
    for (i, event) in events.iter().enumerate() {
        if i == 0 {
            // Writing to a Vec cannot fail.
            let _ = write!(
                lines,
                "{{\"receivedAt\":\"{received_at}\",\"secretIndex\":{secret_index},\"event\":"
            );
            prefix = 0..lines.len();
        } else {
            lines.extend_from_within(prefix.clone());
        }
        let start = lines.len();
        lines.extend_from_slice(event.as_bytes());
        if let Some(raw) = lines.get_mut(start..) {
            raw.iter_mut()
                .filter(|b| matches!(**b, b'\n' | b'\r'))
                .for_each(|b| *b = b' ');
        }
        lines.extend_from_slice(b"}\n");
    }
    lines
}

/// `{"receivedAt":"…","secretIndex":N,"event":…}\n`, exactly as [`encode_lines`]
/// writes it, with or without the line end.
fn split_line(line: &[u8]) -> Option<Parts<'_>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let rest = line.strip_prefix(b"{\"receivedAt\":\"")?;
    let quote = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    let (received_at, rest) = rest.split_at(quote);
    let rest = rest.strip_prefix(b"\",\"secretIndex\":")?;
    let comma = rest.iter().position(|&b| b == b',')?;
    let (index, rest) = rest.split_at(comma);
    let event = rest.strip_prefix(b",\"event\":")?.strip_suffix(b"}")?;
    Some(Parts {
        received_at: Cow::Borrowed(std::str::from_utf8(received_at).ok()?),
        secret_index: std::str::from_utf8(index).ok()?.parse().ok()?,
        event: std::str::from_utf8(event).ok()?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_through_the_fast_split() {
        let events = [
            r#"{"eventId":"a","name":"n"}"#,
            "{\"eventId\":\"b\",\r\n\"name\":\"n\"}",
        ];
        let lines = encode_lines(&events, 3);
        let mut count = 0;
        for (line, event) in lines.split_inclusive(|&b| b == b'\n').zip(events) {
            let parts = split_line(line).unwrap_or_else(|| panic!("{line:?}"));
            assert_eq!(parts.secret_index, 3);
            assert_eq!(parts.received_at.len(), 24);
            // Line breaks inside an envelope are whitespace, stored as spaces.
            assert_eq!(parts.event, event.replace(['\r', '\n'], " "));
            let stripped = split_line(&line[..line.len() - 1]).map(|p| p.event);
            assert_eq!(stripped, Some(parts.event), "without its line end too");
            count += 1;
        }
        assert_eq!(count, 2);
        assert!(check_records(&lines, 2).is_ok());
        assert!(check_records(&lines, 3).is_err(), "the count must match");
    }

    #[test]
    fn other_layouts_go_through_serde_and_junk_is_corrupt() {
        let reordered = br#"{"secretIndex":1,"event":{"eventId":"e","name":"n"},"receivedAt":"t"}"#;
        assert!(split_line(reordered).is_none());
        let event = record_event(reordered, String::new).map(|e| e.event_id().to_owned());
        assert_eq!(event.ok().as_deref(), Some("e"));
        assert!(record_event(b"not json", String::new).is_err());
    }
}
