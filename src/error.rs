//! The crate's one error type and the HTTP status each error maps to.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use http::StatusCode;

/// Everything that can go wrong while verifying or parsing a Comapi webhook.
///
/// Signature errors are deliberately coarse: every wrong signature is the same
/// [`Error::SignatureMismatch`], so an attacker learns nothing about how close a
/// guess was. [`Error::status`] gives the HTTP status a receiver should answer with.
///
/// Storage and store failures keep their cause as [`source()`](StdError::source):
/// the [`io::Error`] of a spool, or the Redis client's error of a shared store, so a
/// caller can tell a full disk from a permission error. Their `Display` says what
/// was being done; print the source chain to see why it failed.
///
/// ```
/// use std::error::Error as _;
/// let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
/// let error = comapi_webhook::Error::storage("cannot write the spool", full);
/// assert_eq!(error.to_string(), "storage failed: cannot write the spool");
/// let cause = error.source().and_then(|e| e.downcast_ref::<std::io::Error>());
/// assert_eq!(cause.map(std::io::Error::kind), Some(std::io::ErrorKind::StorageFull));
/// ```
#[derive(Debug, thiserror::Error)]
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
    #[error("secret too short: {len} bytes, Comapi requires at least 16 bytes")]
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
    /// The body is over the receiver's limit; a receiver answers 413. Comapi
    /// retries it, so raise the limit if a real batch gets this.
    #[error("body over the limit{}", limit.map(|l| format!(" of {l} bytes")).unwrap_or_default())]
    BodyTooLarge {
        /// The limit in bytes, when known (a framework's own limit may not say).
        limit: Option<usize>,
    },
    /// Storing events durably failed (disk full, I/O error). Nothing was
    /// acknowledged, so Comapi retries later; a receiver answers 503.
    #[error("storage failed: {context}")]
    Storage {
        /// What was being done, for example `cannot write the spool`.
        context: String,
        /// The I/O error underneath, also given by `source()`. Data that could not be
        /// read back (a damaged spool line) is [`io::ErrorKind::InvalidData`].
        #[source]
        source: io::Error,
    },
    /// A store shared across processes (the Redis gate or the Redis stream) could
    /// not be reached or answered badly; `context` names which and what was being done.
    /// Never read as "fresh": the caller should retry later (a receiver answers 503).
    #[error("store unavailable: {context}")]
    StoreUnavailable {
        /// What was being done, without credentials.
        context: String,
        /// The store client's error underneath (a `redis::RedisError` for
        /// `RedisGate`), also given by `source()`.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl Error {
    /// An [`Error::Storage`]: `context` says what was being done, `source` why it
    /// failed.
    #[must_use]
    pub fn storage(context: impl Into<String>, source: io::Error) -> Self {
        Error::Storage {
            context: context.into(),
            source,
        }
    }

    /// An [`Error::StoreUnavailable`]: `context` says what was being done (never
    /// with credentials), `source` why it failed.
    #[must_use]
    pub fn store_unavailable(
        context: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Error::StoreUnavailable {
            context: context.into(),
            source: source.into(),
        }
    }

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
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::StoreUnavailable { .. } | Error::Storage { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::EmptySecret | Error::SecretTooShort { .. } | Error::NoSecrets => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The error and every cause under it, for logs: `storage failed: cannot write
    /// the spool: No space left on device (os error 28)`.
    ///
    /// ```
    /// let error = comapi_webhook::Error::storage(
    ///     "cannot write the offset file",
    ///     std::io::Error::other("disk quota exceeded"),
    /// );
    /// assert_eq!(
    ///     error.report().to_string(),
    ///     "storage failed: cannot write the offset file: disk quota exceeded"
    /// );
    /// ```
    #[must_use]
    pub fn report(&self) -> impl fmt::Display + '_ {
        Report(self)
    }

    /// Whether this error means the request's signature failed (a `401`).
    #[must_use]
    pub fn is_signature_error(&self) -> bool {
        self.status() == StatusCode::UNAUTHORIZED
    }
}

/// Equality of kinds and details; for the two errors with a cause, of the context
/// and the cause's text (an [`io::Error`] has no equality of its own).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Error::SecretTooShort { len: a }, Error::SecretTooShort { len: b }) => a == b,
            (Error::BodyTooLarge { limit: a }, Error::BodyTooLarge { limit: b }) => a == b,
            (
                Error::InvalidEvent {
                    path: a,
                    message: m,
                },
                Error::InvalidEvent {
                    path: b,
                    message: n,
                },
            ) => a == b && m == n,
            (
                Error::Storage {
                    context: a,
                    source: s,
                },
                Error::Storage {
                    context: b,
                    source: t,
                },
            ) => a == b && s.kind() == t.kind() && same_text(s, t),
            (
                Error::StoreUnavailable {
                    context: a,
                    source: s,
                },
                Error::StoreUnavailable {
                    context: b,
                    source: t,
                },
            ) => a == b && same_text(s, t),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

impl Eq for Error {}

fn same_text(a: &dyn fmt::Display, b: &dyn fmt::Display) -> bool {
    a.to_string() == b.to_string()
}

/// [`Error::report`]: the error, then each `source()` in turn, joined by `: `.
struct Report<'e>(&'e Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut shown = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            // A cause whose text its error already showed (a `redis::RedisError` shows
            // its I/O error and also returns it from `source()`) is not repeated.
            let text = error.to_string();
            if !shown.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::Error;

    #[test]
    fn a_report_shows_each_cause_once() {
        let error = Error::storage(
            "cannot write the spool",
            io::Error::other(Error::store_unavailable("inner", io::Error::other("disk"))),
        );
        assert_eq!(
            error.report().to_string(),
            "storage failed: cannot write the spool: store unavailable: inner: disk"
        );
    }

    #[cfg(feature = "redis")]
    #[test]
    fn a_redis_error_that_shows_its_cause_has_it_shown_once() {
        let broken = io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe");
        let error = Error::store_unavailable(
            "cannot add the events to the Redis stream",
            redis::RedisError::from(broken),
        );
        let report = error.report().to_string();
        assert_eq!(report.matches("broken pipe").count(), 1, "{report}");
        assert!(
            report.starts_with("store unavailable: cannot add the events to the Redis stream: "),
            "{report}"
        );
    }
}
