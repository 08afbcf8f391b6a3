//! `VerifiedEvents` as an actix-web 4 extractor.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};

use super::{VerifiedEvents, WebhookConfig, refused};
use crate::{Reply, SIGNATURE_HEADER};

/// Reads the body with actix-web's `Bytes` extractor (under its `PayloadConfig`),
/// then verifies and parses it with the app's [`WebhookConfig`] (registered with
/// `App::app_data(web::Data::new(config))` or `app_data(config)`).
///
/// ```
/// use actix_web::{App, HttpResponse, web};
/// use comapi_webhook::Verifier;
/// use comapi_webhook::extract::{VerifiedEvents, WebhookConfig};
///
/// async fn webhook(events: VerifiedEvents) -> HttpResponse {
///     HttpResponse::Ok().body(format!("{} events", events.events().len()))
/// }
///
/// let config = WebhookConfig::new(Verifier::new("the-secret-from-the-portal")?);
/// let app = App::new()
///     .app_data(web::Data::new(config))
///     // actix-web reads at most 256 KiB unless told: a full batch is about 400 KB.
///     .app_data(web::PayloadConfig::new(4 << 20))
///     .route("/", web::post().to(webhook));
/// # drop(app);
/// # Ok::<(), comapi_webhook::Error>(())
/// ```
impl FromRequest for VerifiedEvents {
    type Error = Reply;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Reply>>>>;

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
        let body = web::Bytes::from_request(request, payload);
        Box::pin(async move {
            let config = config.ok_or_else(|| {
                Reply::misconfigured("no WebhookConfig in the actix-web app data")
            })?;
            let body = body.await.map_err(|error| {
                let status = error.as_response_error().status_code().as_u16();
                refused(status, error)
            })?;
            config.check(signatures.iter().map(Vec::as_slice), &body)
        })
    }
}
