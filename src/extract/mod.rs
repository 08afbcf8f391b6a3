//! One-line framework integration: extractors that verify and parse before the
//! handler runs (features `actix` and `axum`).

use std::fmt;

use http::StatusCode;

use crate::{DEFAULT_MAX_BODY_BYTES, Error, Event, Verified, Verifier, parse_already_verified};

#[cfg(feature = "actix")]
mod actix;
#[cfg(feature = "axum")]
mod axum;

/// What the extractors need from your app state: the verifier and the body limit.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WebhookConfig {
    /// Checks the signatures.
    pub verifier: Verifier,
    /// The largest body read; more is answered 413 without reading it all.
    pub max_body_bytes: usize,
}

impl WebhookConfig {
    /// The verifier with the default body limit ([`DEFAULT_MAX_BODY_BYTES`]).
    #[must_use]
    pub fn new(verifier: Verifier) -> Self {
        WebhookConfig {
            verifier,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// The same configuration with another body limit.
    #[must_use]
    pub fn with_max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self
    }

    fn check<'v>(
        &self,
        signatures: impl IntoIterator<Item = &'v [u8]>,
        body: &[u8],
    ) -> Result<VerifiedEvents, Rejection> {
        let verified = self
            .verifier
            .verify_header_values(signatures, body)
            .map_err(Rejection::from)?;
        let events = parse_already_verified(body).map_err(Rejection::from)?;
        Ok(VerifiedEvents {
            verified,
            events: events.into_iter().map(Event::into_owned).collect(),
        })
    }

    fn too_large(&self) -> Rejection {
        Rejection {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("body over the limit of {} bytes", self.max_body_bytes),
        }
    }

    fn over_limit(&self, content_length: Option<&[u8]>) -> bool {
        content_length
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
            .is_some_and(|length| length > self.max_body_bytes as u64)
    }
}

/// The events of a request whose `X-Comapi-Signature` was verified, as a handler
/// argument. The handler never runs for a request that fails: it is answered 401
/// (signature), 400 (not events) or 413 (too large) with a short text body.
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

/// Why an extractor refused a request: the status and a short text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    /// The HTTP status answered: 400, 401, 413, or 500 when the app state lacks a
    /// [`WebhookConfig`].
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// actix-web finds the config in its app data at run time; axum's state is
    /// checked when the router is built, so it never needs this.
    #[cfg(feature = "actix")]
    fn missing_config() -> Self {
        Rejection {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "comapi-webhook: no WebhookConfig in the app state".to_owned(),
        }
    }

    fn unreadable_body() -> Self {
        Rejection {
            status: StatusCode::BAD_REQUEST,
            message: "cannot read the request body".to_owned(),
        }
    }
}

impl From<Error> for Rejection {
    fn from(error: Error) -> Self {
        let message = if error.is_signature_error() {
            "invalid or missing X-Comapi-Signature".to_owned()
        } else {
            error.to_string()
        };
        Rejection {
            status: error.status(),
            message,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}
