//! The reference receiver on actix-web 4, behaving exactly like `hyper_receiver`:
//! `GET /` a status page, `POST /` the receive step, `GET /metrics` the metrics.
//! `COMAPI_WEBHOOK_SECRET=… cargo run --release --features receiver,actix --example actix_receiver`

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use actix_web::{App, HttpRequest, HttpServer, web};
use comapi_webhook::receiver::{ConfigError, ReceiverConfig, shutdown_signal};
use comapi_webhook::store::Store;
use comapi_webhook::{Inbox, Reply, SIGNATURE_HEADER};

type Shared = web::Data<Inbox<Store>>;

#[actix_web::main]
async fn main() -> ExitCode {
    common::init_logging();
    let config = match ReceiverConfig::from_env() {
        Ok(config) => config,
        Err(error) => return fail(&error, 2),
    };
    let addr = config.addr;
    let receiver = match config.start(common::process).await {
        Ok(receiver) => receiver,
        Err(error) => return fail(&error, 1),
    };
    let (inbox, limit) = (
        web::Data::new(receiver.inbox().clone()),
        receiver.inbox().max_body_bytes(),
    );
    let server = HttpServer::new(move || {
        App::new()
            .app_data(inbox.clone())
            .app_data(web::PayloadConfig::new(limit)) // actix stops reading past it
            .route(
                "/",
                web::get().to(|inbox: Shared| async move { inbox.status_page().await }),
            )
            .route(
                "/metrics",
                web::get().to(|inbox: Shared| async move { inbox.metrics().await }),
            )
            .route("/", web::post().to(receive))
    });
    let server = match server.disable_signals().shutdown_timeout(30).bind(addr) {
        Ok(server) => server,
        Err(error) => return fail(&ConfigError::cannot_listen(addr, &error), 1),
    };
    println!(
        "listening on http://{}",
        server.addrs().first().copied().unwrap_or(addr)
    );
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        handle.stop(true).await
    });
    let _ = server.await;
    receiver.shutdown().await;
    ExitCode::SUCCESS
}

async fn receive(
    inbox: Shared,
    request: HttpRequest,
    body: Result<web::Bytes, actix_web::Error>,
) -> Reply {
    let body = match body {
        Ok(body) => body,
        Err(error) if error.as_response_error().status_code() == 413 => return inbox.too_large(),
        Err(error) => return Reply::unreadable_body(error),
    };
    let signatures = request
        .headers()
        .get_all(SIGNATURE_HEADER.as_str())
        .map(|v| v.as_bytes());
    inbox.receive_with_signatures(signatures, &body).await
}

fn fail(error: &ConfigError, code: u8) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(code)
}
