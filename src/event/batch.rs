//! Splitting a body into its events: one envelope or a batch, with errors that say
//! where, and verification before parsing.

use http::HeaderMap;
use serde::Deserialize;
#[cfg(feature = "receiver")]
use serde_json::value::RawValue;

use super::Event;
use super::payload::without_position;
use crate::{Error, Verifier};

/// The events of a body, not verified here: see [`crate::dangerous::parse_unverified`].
pub(crate) fn parse_events(body: &[u8]) -> Result<Vec<Event<'_>>, Error> {
    let batch = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => true,
        Some(b'{') => false,
        first => {
            return Err(Error::InvalidEvent {
                path: "$".to_owned(),
                message: not_an_event(body, first),
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

/// Why a body that starts with neither `{` nor `[` is not an event: empty, not
/// JSON at all, or JSON of another kind.
fn not_an_event(body: &[u8], first: Option<&u8>) -> String {
    const EXPECTED: &str = "expected an event object or an array of events";
    let Some(first) = first else {
        return format!("the body is empty: {EXPECTED}");
    };
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return format!("the body is not JSON ({error}): {EXPECTED}");
    }
    let kind = match first {
        b'"' => "a string",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => "a number",
    };
    format!("{EXPECTED}, not {kind}")
}

/// Parses a body that is UTF-8 as text, which is faster (serde_json then checks no
/// string again), and any other through `from_slice`, which says where it breaks.
fn from_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

/// Checks an already verified body like [`parse_events`] and returns each
/// event's envelope as its raw JSON text, in order: what a receiver stores.
#[cfg(feature = "receiver")]
pub(crate) fn split_already_verified(body: &[u8]) -> Result<Vec<&str>, Error> {
    let batch = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => true,
        Some(b'{') => false,
        _ => return parse_events(body).map(|_| Vec::new()),
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

/// Only on the error path: parses again with path tracking, to say where the body
/// failed.
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
    let path = if path == "." || path == "?" {
        "$".to_owned()
    } else {
        path
    };
    Error::InvalidEvent { path, message }
}

impl Verifier {
    /// Verifies the request's signature, then parses the body into its events (see
    /// [`dangerous::parse_unverified`](crate::dangerous::parse_unverified) for the forms accepted). The events borrow from
    /// `body`.
    ///
    /// ```
    /// use comapi_webhook::{SIGNATURE_HEADER, Verifier};
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
        parse_events(body)
    }
}
