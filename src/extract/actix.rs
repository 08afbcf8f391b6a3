//! `VerifiedEvents` as an actix-web 4 extractor.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use futures_core::Stream;

use super::{Rejection, VerifiedEvents, WebhookConfig};
use crate::SIGNATURE_HEADER;

/// Reads the body up to the limit from the app's [`WebhookConfig`] (registered with
/// `App::app_data(web::Data::new(config))` or `app_data(config)`), verifies and
/// parses it.
///
/// ```
/// use actix_web::{App, HttpResponse, web};
/// use comapi_webhook::{Verifier, VerifiedEvents, WebhookConfig};
///
/// async fn webhook(events: VerifiedEvents) -> HttpResponse {
///     HttpResponse::Ok().body(format!("{} events", events.events().len()))
/// }
///
/// let config = WebhookConfig::new(Verifier::new("the-secret-from-the-portal")?);
/// let app = App::new().app_data(web::Data::new(config)).route("/", web::post().to(webhook));
/// # drop(app);
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
impl FromRequest for VerifiedEvents {
    type Error = Rejection;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Rejection>>>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let config = request
            .app_data::<web::Data<WebhookConfig>>()
            .map(|data| data.get_ref().clone())
            .or_else(|| request.app_data::<WebhookConfig>().cloned());
        let signatures: Vec<Vec<u8>> = request
            .headers()
            .get_all(SIGNATURE_HEADER.as_str())
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let content_length = request
            .headers()
            .get("content-length")
            .map(|v| v.as_bytes().to_vec());
        let mut payload = payload.take();
        Box::pin(async move {
            let config = config.ok_or_else(Rejection::missing_config)?;
            if config.over_limit(content_length.as_deref()) {
                return Err(config.too_large());
            }
            let mut body = Vec::new();
            while let Some(chunk) =
                std::future::poll_fn(|cx| Pin::new(&mut payload).poll_next(cx)).await
            {
                let chunk = chunk.map_err(|_| Rejection::unreadable_body())?;
                if body.len() + chunk.len() > config.max_body_bytes {
                    return Err(config.too_large());
                }
                body.extend_from_slice(&chunk);
            }
            config.check(signatures.iter().map(Vec::as_slice), &body)
        })
    }
}

impl ResponseError for Rejection {
    fn status_code(&self) -> actix_web::http::StatusCode {
        actix_web::http::StatusCode::from_u16(self.status.as_u16())
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .content_type("text/plain; charset=utf-8")
            .body(format!("{}\n", self.message))
    }
}
