//! Parsing without verifying, behind a name that says so (as `jsonwebtoken` does
//! with `dangerous::insecure_decode`): for bytes whose signature was checked
//! before, such as events read back from your own queue. Never for bytes straight
//! off an HTTP request: use [`Verifier::verify_events`](crate::Verifier::verify_events) there.

use crate::{Error, Event};

/// Parses a body **without checking its signature** into its events: one envelope
/// object gives one event, a batch (a JSON array of envelopes) gives them all in
/// order, and an empty array gives none. It needs no secret, which is exactly why it
/// must never see unverified bytes.
///
/// ```
/// let stored = br#"{"eventId":"e-1","name":"profile.update","payload":{"id":"p-7"},"revision":3}"#;
/// let events = comapi_webhook::dangerous::parse_unverified(stored)?;
/// assert_eq!(events[0].entity_id(), Some("p-7"));
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
///
/// Only what identifies the events is checked: that the body is JSON, one object or
/// an array of them, each with a string `eventId` and a string `name`. Every other
/// field is read leniently when asked for, and the typed payload is parsed only when
/// asked for ([`Event::message`]), so a field of an unexpected type never fails the
/// body.
///
/// # Errors
/// [`Error::InvalidEvent`] (HTTP 400) with the JSON path of the first problem, for
/// example `[3].eventId: invalid type: integer, expected a string`. One bad element
/// fails the whole batch, so a receiver never stores half of it.
pub fn parse_unverified(body: &[u8]) -> Result<Vec<Event<'_>>, Error> {
    crate::event::parse_events(body)
}
