//! The actix-web and axum extractors through each framework's own request
//! machinery: good requests reach the handler, bad ones never do, and the body
//! limit is the framework's own (actix-web's `PayloadConfig`, axum's
//! `DefaultBodyLimit`), set to 1,024 bytes here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use comapi_webhook::Verifier;
use comapi_webhook::extract::{VerifiedEvents, WebhookConfig};

const SECRET: &str = "the-current-secret-0123456789";
/// The frameworks' body limit in these tests.
const LIMIT: usize = 1024;
const EVENT: &str =
    r#"{"eventId":"e-1","name":"message.read","payload":{"id":"m-1"},"revision":3}"#;

fn config() -> WebhookConfig {
    WebhookConfig::new(Verifier::new(SECRET).unwrap())
}

fn sign(body: &str) -> String {
    Verifier::new(SECRET)
        .unwrap()
        .sign(body.as_bytes())
        .to_string()
}

/// (signature headers, body, expected status, expected start of the answer)
fn cases() -> Vec<(Vec<String>, String, u16, &'static str)> {
    let batch = format!("[{EVENT},{EVENT}]");
    let wrong = Verifier::new("a-wrong-secret-0123456789")
        .unwrap()
        .sign(EVENT.as_bytes())
        .to_string();
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    vec![
        (vec![sign(EVENT)], EVENT.to_owned(), 200, "1 events e-1 m-1"),
        (vec![sign(&batch)], batch.clone(), 200, "2 events"),
        (
            vec![],
            EVENT.to_owned(),
            401,
            "invalid or missing X-Comapi-Signature",
        ),
        (vec![wrong], EVENT.to_owned(), 401, "invalid or missing"),
        (
            vec![sign(EVENT), sign(EVENT)],
            EVENT.to_owned(),
            401,
            "invalid or missing",
        ),
        (
            vec!["sha1=abc".to_owned()],
            EVENT.to_owned(),
            401,
            "invalid or missing",
        ),
        (
            vec![sign("not json")],
            "not json".to_owned(),
            400,
            "invalid event body at $",
        ),
        (vec![sign(&huge)], huge, 413, "body over the limit"),
    ]
}

fn describe(events: &VerifiedEvents) -> String {
    let first = &events.events()[0];
    format!(
        "{} events {} {}",
        events.events().len(),
        first.event_id(),
        first.message_id().unwrap_or("-")
    )
}

mod with_actix {
    use ::actix_web::{App, HttpResponse, test, web};

    use super::*;

    async fn handler(events: VerifiedEvents) -> HttpResponse {
        assert!(events.verified().is_primary());
        HttpResponse::Ok().body(describe(&events))
    }

    #[actix_web::test]
    async fn good_and_bad_requests() {
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(config()))
                .app_data(web::PayloadConfig::new(LIMIT))
                .route("/", web::post().to(handler)),
        )
        .await;
        for (signatures, body, status, answer) in cases() {
            let mut request = test::TestRequest::post().uri("/").set_payload(body.clone());
            for signature in &signatures {
                request = request.append_header(("X-Comapi-Signature", signature.as_str()));
            }
            let response = test::call_service(&app, request.to_request()).await;
            assert_eq!(response.status().as_u16(), status, "{body:.40}");
            let text = String::from_utf8(test::read_body(response).await.to_vec()).unwrap();
            assert!(text.starts_with(answer), "{text}");
        }
    }

    #[actix_web::test]
    async fn a_missing_config_is_a_500_not_a_panic() {
        let app = test::init_service(App::new().route("/", web::post().to(handler))).await;
        let request = test::TestRequest::post()
            .uri("/")
            .set_payload(EVENT)
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_eq!(response.status().as_u16(), 500);
        let text = test::read_body(response).await;
        assert_eq!(&text[..], b"server misconfigured\n");
    }
}

mod with_axum {
    use ::axum::Router;
    use ::axum::body::Body;
    use ::axum::extract::DefaultBodyLimit;
    use ::axum::routing::post;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn handler(events: VerifiedEvents) -> String {
        describe(&events)
    }

    #[tokio::test]
    async fn good_and_bad_requests() {
        let app: Router = Router::new()
            .route("/", post(handler))
            .layer(DefaultBodyLimit::max(LIMIT))
            .with_state(config());
        for (signatures, body, status, answer) in cases() {
            let mut request = http::Request::post("/");
            for signature in &signatures {
                request = request.header("x-comapi-signature", signature.as_str());
            }
            let response = app
                .clone()
                .oneshot(request.body(Body::from(body.clone())).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), status, "{body:.40}");
            let text = response.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8(text.to_vec()).unwrap();
            assert!(text.starts_with(answer), "{text}");
        }
        // A body over the limit without Content-Length is cut off while streaming.
        let chunks = chunked(vec![Ok(vec![b'x'; 800]), Ok(vec![b'x'; 800])]);
        let request = http::Request::post("/")
            .header("x-comapi-signature", sign(EVENT))
            .body(chunks)
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status().as_u16(), 413);
        // A body cut short on the connection may have been a signed batch: Comapi is
        // asked to send it again (503), never told to give up on it (400).
        let broken = chunked(vec![
            Ok(EVENT.as_bytes()[..10].to_vec()),
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ]);
        let request = http::Request::post("/")
            .header("x-comapi-signature", sign(EVENT))
            .body(broken)
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status().as_u16(), 503);
    }

    /// A streamed body with no Content-Length.
    fn chunked(chunks: Vec<Result<Vec<u8>, std::io::Error>>) -> Body {
        struct Chunks(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
        impl futures_core::Stream for Chunks {
            type Item = Result<Vec<u8>, std::io::Error>;
            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Self::Item>> {
                std::task::Poll::Ready(self.0.next())
            }
        }
        Body::from_stream(Chunks(chunks.into_iter()))
    }
}
