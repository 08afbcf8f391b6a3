//! The crate's one error type and the HTTP status each error maps to.

use http::StatusCode;

/// Everything that can go wrong while verifying or parsing a Comapi webhook.
///
/// Signature errors are deliberately coarse: every wrong signature is the same
/// [`Error::SignatureMismatch`], so an attacker learns nothing about how close a
/// guess was. [`Error::status`] gives the HTTP status a receiver should answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request carries no `X-Comapi-Signature` header.
    #[error("missing X-Comapi-Signature header")]
    MissingSignature,
    /// The header is present more than once, so it is ambiguous which one to check.
    #[error("X-Comapi-Signature header present more than once")]
    DuplicateSignature,
    /// The header value is not exactly 40 hex digits (optionally surrounded by whitespace).
    #[error("malformed X-Comapi-Signature header: expected 40 hex digits")]
    MalformedSignature,
    /// The signature is well formed but matches none of the configured secrets.
    #[error("signature mismatch")]
    SignatureMismatch,
    /// A secret was empty.
    #[error("empty secret")]
    EmptySecret,
    /// A secret is shorter than Comapi's documented minimum of 16 bytes.
    #[error("secret too short: {len} bytes, Comapi requires at least 16")]
    SecretTooShort {
        /// The length of the rejected secret in bytes.
        len: usize,
    },
    /// A verifier was built from an empty list of secrets.
    #[error("no secrets given")]
    NoSecrets,
    /// The body is not a Comapi event or a batch of them. Comapi does not retry a
    /// `400`, so this is final for that delivery.
    #[error("invalid event body at {path}: {message}")]
    InvalidEvent {
        /// Where the problem is, as a JSON path: `$` for the whole body,
        /// `[3].payload.id` for the payload id of the fourth event of a batch.
        path: String,
        /// What is wrong there, for example `invalid type: integer, expected a string`.
        message: String,
    },
    /// Storing events durably failed (disk full, I/O error). Nothing was
    /// acknowledged, so Comapi retries later; a receiver answers 503.
    #[error("storage failed: {message}")]
    Storage {
        /// What failed.
        message: String,
    },
    /// The shared decision store (Redis) could not be reached or answered badly.
    /// Never read as "fresh": the caller should retry later (a receiver answers 503).
    #[error("decision store unavailable: {message}")]
    StoreUnavailable {
        /// What went wrong, without credentials.
        message: String,
    },
}

impl Error {
    /// The HTTP status a webhook receiver should answer with for this error.
    ///
    /// Signature errors map to `401 Unauthorized`. Configuration errors (bad
    /// secrets) never reach a request; they map to `500 Internal Server Error`.
    ///
    /// ```
    /// use comapi_webhook::Error;
    /// assert_eq!(Error::SignatureMismatch.status(), http::StatusCode::UNAUTHORIZED);
    /// ```
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Error::MissingSignature
            | Error::DuplicateSignature
            | Error::MalformedSignature
            | Error::SignatureMismatch => StatusCode::UNAUTHORIZED,
            Error::InvalidEvent { .. } => StatusCode::BAD_REQUEST,
            Error::StoreUnavailable { .. } | Error::Storage { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::EmptySecret | Error::SecretTooShort { .. } | Error::NoSecrets => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Whether this error means the request's signature failed (a `401`).
    #[must_use]
    pub fn is_signature_error(&self) -> bool {
        self.status() == StatusCode::UNAUTHORIZED
    }
}
