//! `VerifiedEvents` as an axum 0.8 extractor.

use axum::extract::{FromRef, FromRequest, Request};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::{Rejection, VerifiedEvents, WebhookConfig};

/// Reads the body up to the limit from the state's [`WebhookConfig`] (your state
/// implements `FromRef` for it, or is it), verifies and parses it.
///
/// ```
/// use axum::{Router, routing::post};
/// use comapi_webhook::{Verifier, VerifiedEvents, WebhookConfig};
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
    type Rejection = Rejection;

    async fn from_request(request: Request, state: &S) -> Result<Self, Rejection> {
        let config = WebhookConfig::from_ref(state);
        let (parts, body) = request.into_parts();
        if config.over_limit(
            parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .map(|v| v.as_bytes()),
        ) {
            return Err(config.too_large());
        }
        let body = match Limited::new(body, config.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<LengthLimitError>() => return Err(config.too_large()),
            Err(_) => return Err(Rejection::unreadable_body()),
        };
        let signatures = parts
            .headers
            .get_all(crate::SIGNATURE_HEADER)
            .iter()
            .map(http::HeaderValue::as_bytes);
        config.check(signatures, &body)
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.status, format!("{}\n", self.message)).into_response()
    }
}
