//! The reference receiver on actix-web 4: `GET /` shows a status page, `POST /`
//! runs the receive step (verify, parse, store durably, answer). It behaves exactly
//! like `hyper_receiver`. See the README.
//!
//! ```sh
//! COMAPI_WEBHOOK_SECRET=your-secret-from-the-portal cargo run --release --example actix_receiver
//! ```

#[path = "common/mod.rs"]
mod common;

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use comapi_webhook::store::Store;
use comapi_webhook::{METRICS_CONTENT_TYPE, Reply, SIGNATURE_HEADER};

type Inbox = comapi_webhook::Inbox<Store>;

#[actix_web::main]
async fn main() {
    common::init_logging();
    let config = common::config_from_env();
    let running = common::start(&config).await;
    let inbox = running.inbox.clone();
    let app_inbox = web::Data::new(inbox.clone());
    let max_body_bytes = inbox.max_body_bytes();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_inbox.clone())
            // actix stops reading past the limit; `receive` answers the 413.
            .app_data(web::PayloadConfig::new(max_body_bytes))
            .route("/", web::get().to(status_page))
            .route("/metrics", web::get().to(metrics))
            .route("/", web::post().to(receive))
    })
    .disable_signals()
    .shutdown_timeout(30)
    .bind(config.addr);
    let server = match server {
        Ok(server) => server,
        Err(error) => {
            common::cannot_listen(config.addr, &error);
        }
    };
    let addr = server.addrs().first().copied().unwrap_or(config.addr);
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        common::shutdown_signal().await;
        // Graceful: stop accepting, finish the requests in flight.
        handle.stop(true).await;
    });
    common::announce(addr);
    if let Err(error) = server.await {
        tracing::error!(%error, "server failed");
    }
    common::finish(running).await;
}

async fn metrics(inbox: web::Data<Inbox>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(METRICS_CONTENT_TYPE)
        .body(inbox.metrics_text().await.unwrap_or_default())
}

async fn status_page(inbox: web::Data<Inbox>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(inbox.status_page().await)
}

async fn receive(
    inbox: web::Data<Inbox>,
    request: HttpRequest,
    body: Result<web::Bytes, actix_web::Error>,
) -> HttpResponse {
    let body = match body {
        Ok(body) => body,
        // actix stopped reading past the limit: answer (and log) the inbox's 413.
        Err(error) if error.as_response_error().status_code() == StatusCode::PAYLOAD_TOO_LARGE => {
            return from_reply(&inbox.too_large());
        }
        Err(error) => return error.error_response(),
    };
    let signatures = request
        .headers()
        .get_all(SIGNATURE_HEADER.as_str())
        .map(|v| v.as_bytes());
    from_reply(&inbox.receive_with_signatures(signatures, &body).await)
}

fn from_reply(reply: &Reply) -> HttpResponse {
    common::log_refusal(reply);
    let status =
        StatusCode::from_u16(reply.status().as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(reply.body().to_owned())
}
