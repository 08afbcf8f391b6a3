//! The reference receiver on hyper 1.x: `GET /` a status page, `POST /` the receive
//! step, `GET /metrics` the metrics, `/console` the operator's console (with
//! `COMAPI_CONSOLE_TOKEN`); settings from the environment (see
//! `ReceiverConfig`). `COMAPI_WEBHOOK_SECRET=… cargo run --release --features binaries --bin hyper_receiver`

#[path = "common/mod.rs"]
mod common;

use std::convert::Infallible;

use comapi_webhook::console::Console;
use comapi_webhook::receiver::{Busy, ReceiverConfig, shutdown_signal};
use comapi_webhook::store::Store;
use comapi_webhook::{Inbox, Reply};
use hyper::{Method, Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};

#[tokio::main]
async fn main() {
    common::help_if_asked(
        "hyper_receiver: receives Comapi webhooks on hyper (GET / status, POST / events, GET /metrics, /console)",
        ReceiverConfig::HELP,
    );
    let config = common::config();
    let addr = config.addr;
    let listener = config
        .listen()
        .await
        .unwrap_or_else(|e| common::exit(&e, 1));
    let receiver = config
        .start(common::process)
        .await
        .unwrap_or_else(|e| common::exit(&e, e.exit_code().into()));
    println!(
        "listening on http://{}",
        listener.local_addr().unwrap_or(addr)
    );
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        // Backs off when out of file descriptors; at the connection limit the
        // longest-idle connection makes room.
        let (stream, connection) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (inbox, requests) = (receiver.inbox().clone(), connection.requests());
        let console = receiver.console().clone();
        let service = service_fn(move |request| {
            let busy = requests.busy(); // a request in progress is never cut for idling
            let (inbox, console) = (inbox.clone(), console.clone());
            async move { route(inbox, console, request, busy).await }
        });
        let serving =
            graceful.watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            tokio::select! {
                _ = serving => {}
                () = connection.closed() => {} // no request within the header deadline
            }
        });
    }
    // One bound for all of it: connections, then the worker, within the grace.
    let deadline = tokio::time::Instant::now() + receiver.shutdown_grace();
    let _ = tokio::time::timeout_at(deadline, graceful.shutdown()).await;
    receiver.shutdown_by(deadline).await;
}

async fn route(
    inbox: Inbox<Store>,
    console: Console,
    request: Request<Incoming>,
    _busy: Busy,
) -> Result<Response<String>, Infallible> {
    if console.serves(request.uri().path()) {
        return Ok(console.handle_body(request).await);
    }
    let reply = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => inbox.status_page().await,
        (&Method::GET, "/metrics") => {
            let token = request.headers().get(http::header::AUTHORIZATION);
            inbox.metrics(token.map(|t| t.as_bytes())).await
        }
        (&Method::POST, "/") => inbox.receive_request(request).await,
        (_, "/") => Reply::method_not_allowed(),
        _ => Reply::not_found(),
    };
    Ok(reply.into())
}
