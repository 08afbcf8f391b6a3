//! One-line framework integration: extractors that verify and parse before the
//! handler runs (features `actix` and `axum`). The body is read by the framework,
//! under its own limit: axum's `DefaultBodyLimit` (2 MB unless set), actix-web's
//! `PayloadConfig` (256 KiB unless set: register a larger one, since a full batch
//! of 500 Comapi events is about 400 KB).

use crate::{Error, Event, Reply, Verified, Verifier, dangerous};

#[cfg(feature = "actix")]
mod actix;
#[cfg(feature = "axum")]
mod axum;

/// What the extractors need from your app state: the verifier.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WebhookConfig {
    /// Checks the signatures.
    pub verifier: Verifier,
}

impl WebhookConfig {
    /// Extractors checking with `verifier`.
    #[must_use]
    pub fn new(verifier: Verifier) -> Self {
        WebhookConfig { verifier }
    }

    fn check<'v>(
        &self,
        signatures: impl IntoIterator<Item = &'v [u8]>,
        body: &[u8],
    ) -> Result<VerifiedEvents, Reply> {
        let verified = self.verifier.verify_values(signatures, body)?;
        let events = dangerous::parse_unverified(body)?;
        Ok(VerifiedEvents {
            verified,
            events: events.into_iter().map(Event::into_owned).collect(),
        })
    }
}

/// The framework's refusal to read a body: 413 over its limit, 503 otherwise (see
/// [`Reply::unreadable_body`]).
fn refused(status: u16, why: impl std::fmt::Display) -> Reply {
    if status == http::StatusCode::PAYLOAD_TOO_LARGE.as_u16() {
        Reply::from(Error::BodyTooLarge { limit: None })
    } else {
        Reply::unreadable_body(why)
    }
}

/// The events of a request whose `X-Comapi-Signature` was verified, as a handler
/// argument. The handler never runs for a request that fails: it is answered with
/// the [`Reply`] of the failure, 401 (signature), 400 (not events) or 413 (over the
/// framework's body limit).
#[derive(Debug, Clone)]
pub struct VerifiedEvents {
    verified: Verified,
    events: Vec<Event<'static>>,
}

impl VerifiedEvents {
    /// Which secret matched.
    #[must_use]
    pub fn verified(&self) -> Verified {
        self.verified
    }

    /// The events, in the order of the body (one, or a batch).
    #[must_use]
    pub fn events(&self) -> &[Event<'static>] {
        &self.events
    }

    /// The events, owned.
    #[must_use]
    pub fn into_events(self) -> Vec<Event<'static>> {
        self.events
    }
}
