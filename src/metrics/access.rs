//! What guards and paces the figures: the bearer token `/metrics` asks for, and
//! the store status cached for a second, so that a flood of `GET /` or
//! `GET /metrics` costs the store at most one query a second.

use std::sync::Arc;
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::store::{EventStore, StoreStatus};

/// How long a store status is served from the cache.
pub const STATUS_CACHE_TTL: Duration = Duration::from_secs(1);

/// The token `/metrics` (and the status page's figures) ask for, kept as its
/// SHA-1 digest: compared in constant time, neither the token nor its length
/// shows in the time.
///
/// ```
/// use comapi_webhook::metrics::MetricsToken;
/// let token = MetricsToken::new("a-long-random-token");
/// assert!(token.admits(Some(b"Bearer a-long-random-token")));
/// assert!(token.admits(Some(b"bearer a-long-random-token"))); // the scheme in any case
/// assert!(!token.admits(Some(b"Bearer a-long-random-token-not")));
/// assert!(!token.admits(None));
/// ```
#[derive(Clone)]
pub struct MetricsToken([u8; 20]);

impl MetricsToken {
    /// The token `token`, as `COMAPI_METRICS_TOKEN` gives it.
    #[must_use]
    pub fn new(token: impl AsRef<[u8]>) -> Self {
        MetricsToken(digest(token.as_ref()))
    }

    /// Whether `authorization`, a request's `Authorization` header, is
    /// `Bearer <token>` (the scheme in any case).
    #[must_use]
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let given = authorization.and_then(bearer_token);
        given.is_some_and(|given| bool::from(digest(given).ct_eq(&self.0)))
    }
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(..)")
    }
}

fn digest(token: &[u8]) -> [u8; 20] {
    use sha1::Digest;
    sha1::Sha1::digest(token).into()
}

/// The token of an `Authorization: Bearer <token>` value; the scheme's case does not
/// matter (RFC 9110, 11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, token) = value.split_at_checked(6)?;
    let token = token.strip_prefix(b" ")?.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// A store's status, asked at most once per [`STATUS_CACHE_TTL`] however many
/// ask at once: the callers of one moment wait for the one query in flight.
/// Cheap to clone; the clones share the cache.
#[derive(Debug, Clone, Default)]
pub struct StatusCache {
    last: Arc<tokio::sync::Mutex<Option<(Instant, StoreStatus)>>>,
}

impl StatusCache {
    /// The status of `store`, from the cache while it is younger than
    /// [`STATUS_CACHE_TTL`].
    pub async fn status<E: EventStore>(&self, store: &E) -> StoreStatus {
        let mut last = self.last.lock().await;
        if let Some((at, status)) = last.as_ref()
            && at.elapsed() < STATUS_CACHE_TTL
        {
            return status.clone();
        }
        let status = store.status().await;
        *last = Some((Instant::now(), status.clone()));
        status
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn a_bearer_token_is_read_whatever_the_scheme_s_case() {
        for value in ["Bearer tok", "bearer tok", "BEARER tok", " Bearer   tok "] {
            assert_eq!(
                bearer_token(value.as_bytes()),
                Some(&b"tok"[..]),
                "{value:?}"
            );
        }
        for value in [
            "Bearer",
            "Bearer ",
            "Bearertok",
            "Basic tok",
            "",
            "Bear tok",
        ] {
            assert_eq!(bearer_token(value.as_bytes()), None, "{value:?}");
        }
    }
}
