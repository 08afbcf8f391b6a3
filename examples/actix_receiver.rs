//! The reference receiver on actix-web 4, behaving exactly like `hyper_receiver`:
//! `GET /` a status page, `POST /` the receive step, `GET /metrics` the metrics,
//! `/console` the operator's console (with `COMAPI_CONSOLE_TOKEN`).
//! `COMAPI_WEBHOOK_SECRET=… cargo run --release --features binaries,actix --bin actix_receiver`

#[path = "common/mod.rs"]
mod common;

use actix_web::web;
use actix_web::{App, HttpRequest, HttpServer};
use comapi_webhook::console::Console;
use comapi_webhook::receiver::{ConfigError, ReceiverConfig, shutdown_signal};
use comapi_webhook::store::Store;
use comapi_webhook::{Inbox, Reply};

type Shared = web::Data<Inbox<Store>>;

/// actix_receiver's header deadline without `COMAPI_HEADER_TIMEOUT`: 1 s, so that
/// a signed POST behind a full house of stalled connections is answered in about
/// a second. The price: a burst of more new connections than it reads the headers
/// of within a second sees some closed (Comapi sends those again).
const ACTIX_HEADER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

#[actix_web::main]
async fn main() {
    common::help_if_asked(
        "actix_receiver: receives Comapi webhooks on actix-web (GET / status, POST / events, GET /metrics, /console)",
        ReceiverConfig::HELP,
    );
    let config = common::config();
    let addr = config.addr;
    // actix-web cannot make room at its connection limit as the library's listener
    // does: its header deadline is what bounds a slow-loris, so it is short unless
    // COMAPI_HEADER_TIMEOUT says otherwise.
    let header_deadline = match std::env::var_os("COMAPI_HEADER_TIMEOUT") {
        Some(_) => config.header_deadline,
        None => ACTIX_HEADER_DEADLINE,
    };
    let idle_deadline = config.idle_deadline;
    let max_connections = config.max_connections;
    let receiver = config
        .start(common::process)
        .await
        .unwrap_or_else(|e| common::exit(&e, e.exit_code().into()));
    let inbox = web::Data::new(receiver.inbox().clone());
    let console = web::Data::new(receiver.console().clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(inbox.clone())
            .app_data(console.clone())
            // The console's forms; the receive step streams its body under its own limit.
            .app_data(web::PayloadConfig::new(
                comapi_webhook::console::MAX_FORM_BYTES,
            ))
            .route(
                "/",
                web::get().to(async |inbox: Shared| inbox.status_page().await),
            )
            .route(
                "/metrics",
                web::get().to(async |inbox: Shared, request: HttpRequest| {
                    let token = request.headers().get("authorization");
                    inbox.metrics(token.map(|t| t.as_bytes())).await
                }),
            )
            .route("/", web::post().to(receive))
            .default_service(web::to(console_or_not_found))
    });
    // actix-web closes a connection whose headers are late (and backs off when out
    // of file descriptors) itself; the receive step puts the body under its deadline.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server = server
        .workers(workers)
        .client_request_timeout(header_deadline)
        .keep_alive(idle_deadline)
        .max_connections(max_connections.div_ceil(workers)); // a limit per worker
    // One bound for all of it: connections (actix-web's shutdown timeout, whole
    // seconds), then the worker, within the grace.
    let grace = receiver.shutdown_grace();
    let server = server.disable_signals().shutdown_timeout(grace.as_secs());
    let server = match server.bind(addr) {
        Ok(server) => server,
        Err(error) => common::exit(&ConfigError::cannot_listen(addr, &error), 1),
    };
    println!(
        "listening on http://{}",
        server.addrs().first().copied().unwrap_or(addr)
    );
    let server = server.run();
    let handle = server.handle();
    let (signalled, mut deadline) = tokio::sync::oneshot::channel();
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        let _ = signalled.send(tokio::time::Instant::now() + grace);
        handle.stop(true).await;
    });
    let _ = server.await;
    let deadline = deadline
        .try_recv()
        .unwrap_or_else(|_| tokio::time::Instant::now() + grace);
    receiver.shutdown_by(deadline).await;
}

/// The console's paths go to it; any other is not found.
async fn console_or_not_found(
    console: web::Data<Console>,
    request: HttpRequest,
    body: web::Bytes,
) -> actix_web::HttpResponse {
    if !console.serves(request.path()) {
        return actix_web::HttpResponse::NotFound().body("not found\n");
    }
    console.handle_actix(&request, body).await
}

async fn receive(inbox: Shared, request: HttpRequest, body: web::Payload) -> Reply {
    inbox.receive_actix(&request, body).await
}
