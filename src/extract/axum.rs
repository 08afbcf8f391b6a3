//! `VerifiedEvents` as an axum 0.8 extractor.

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, Request};

use super::{VerifiedEvents, WebhookConfig, refused};
use crate::{Reply, SIGNATURE_HEADER};

/// Reads the body with axum's `Bytes` extractor (under `DefaultBodyLimit`), then
/// verifies and parses it with the state's [`WebhookConfig`] (your state
/// implements `FromRef` for it, or is it).
///
/// ```
/// use axum::{Router, routing::post};
/// use comapi_webhook::Verifier;
/// use comapi_webhook::extract::{VerifiedEvents, WebhookConfig};
///
/// async fn webhook(events: VerifiedEvents) -> String {
///     format!("{} events", events.events().len())
/// }
///
/// let config = WebhookConfig::new(Verifier::new("the-secret-from-the-portal")?);
/// let app: Router = Router::new().route("/", post(webhook)).with_state(config);
/// # drop(app);
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
impl<S> FromRequest<S> for VerifiedEvents
where
    S: Send + Sync,
    WebhookConfig: FromRef<S>,
{
    type Rejection = Reply;

    async fn from_request(request: Request, state: &S) -> Result<Self, Reply> {
        let config = WebhookConfig::from_ref(state);
        let signatures: Vec<Vec<u8>> = request
            .headers()
            .get_all(SIGNATURE_HEADER)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                let status = rejection.status().as_u16();
                refused(status, rejection.body_text())
            })?;
        config.check(signatures.iter().map(Vec::as_slice), &body)
    }
}
