//! A receiver on axum 0.8, served with `axum::serve`: the README's snippet as a
//! program that runs. `GET /` the status page, `POST /` the receive step, `GET
//! /metrics` the metrics; settings from the environment (`ReceiverConfig`, the same
//! as the reference receivers'). Try it with `send_event`:
//!
//! ```sh
//! COMAPI_WEBHOOK_SECRET=the-secret-from-the-comapi-portal \
//!   cargo run --release --features receiver,axum --example axum_receiver
//! COMAPI_WEBHOOK_SECRET=the-secret-from-the-comapi-portal \
//!   cargo run --release --features binaries --bin send_event
//! ```

#[path = "common/mod.rs"]
mod common;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::routing::get;
use comapi_webhook::receiver::{ConfigError, ReceiverConfig, shutdown_signal};
use comapi_webhook::store::Store;
use comapi_webhook::{Inbox, Reply};

type Shared = State<Inbox<Store>>;

async fn status(State(inbox): Shared) -> Reply {
    inbox.status_page().await
}

async fn receive(State(inbox): Shared, request: Request) -> Reply {
    inbox.receive_request(request).await // 200 only once stored durably
}

async fn metrics(State(inbox): Shared, headers: HeaderMap) -> Reply {
    let token = headers.get(axum::http::header::AUTHORIZATION);
    inbox.metrics(token.map(|t| t.as_bytes())).await
}

#[tokio::main]
async fn main() {
    common::help_if_asked(
        "axum_receiver: receives Comapi webhooks on axum (GET / status, POST / events, GET /metrics)",
        ReceiverConfig::HELP,
    );
    let config = common::config();
    let addr = config.addr;
    // axum has no header deadline or connection limit of its own: the reference
    // receivers (hyper_receiver, actix_receiver) are the ones to expose as they are.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| common::exit(&ConfigError::cannot_listen(addr, &e), 1));
    let receiver = config
        .start(common::process)
        .await
        .unwrap_or_else(|e| common::exit(&e, e.exit_code().into()));
    let app = Router::new()
        .route("/", get(status).post(receive))
        .route("/metrics", get(metrics))
        .with_state(receiver.inbox().clone());
    println!(
        "listening on http://{}",
        listener.local_addr().unwrap_or(addr)
    );
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        tracing::error!(%error, "the server failed");
    }
    receiver.shutdown().await;
}
