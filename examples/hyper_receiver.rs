//! The reference receiver on hyper 1.x: `GET /` a status page, `POST /` the receive
//! step, `GET /metrics` the metrics; settings from the environment (see
//! `ReceiverConfig`). `COMAPI_WEBHOOK_SECRET=… cargo run --release --features receiver --example hyper_receiver`

#[path = "common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::time::Duration;

use comapi_webhook::receiver::{ConfigError, shutdown_signal};
use comapi_webhook::store::Store;
use comapi_webhook::{Inbox, Reply};
use hyper::{Method, Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};

#[tokio::main]
async fn main() {
    let config = common::config();
    let addr = config.addr;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => common::exit(&ConfigError::cannot_listen(addr, &error), 1),
    };
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
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted { Ok((stream, _)) => stream, Err(_) => continue },
            () = &mut stop => break,
        };
        let inbox = receiver.inbox().clone();
        let service = service_fn(move |request| route(inbox.clone(), request));
        let connection =
            graceful.watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        tokio::spawn(connection);
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    receiver.shutdown().await;
}

async fn route(
    inbox: Inbox<Store>,
    request: Request<Incoming>,
) -> Result<Response<String>, Infallible> {
    let reply = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => inbox.status_page().await,
        (&Method::GET, "/metrics") => inbox.metrics().await,
        (&Method::POST, "/") => inbox.receive_request(request).await,
        (_, "/") => Reply::method_not_allowed(),
        _ => Reply::not_found(),
    };
    Ok(reply.into())
}
