//! The reference receiver on hyper 1.x: `GET /` shows a status page, `POST /` runs
//! the receive step (verify, parse, store durably, answer). See the README.
//!
//! ```sh
//! COMAPI_WEBHOOK_SECRET=your-secret-from-the-portal cargo run --release --example hyper_receiver
//! ```

#[path = "common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::pin::pin;
use std::time::Duration;

use comapi_webhook::store::Store;
use comapi_webhook::{METRICS_CONTENT_TYPE, Reply};

type Inbox = comapi_webhook::Inbox<Store>;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    common::init_logging();
    let config = common::config_from_env();
    let listener = match TcpListener::bind(config.addr).await {
        Ok(listener) => listener,
        Err(error) => {
            common::cannot_listen(config.addr, &error);
        }
    };
    let running = common::start(&config).await;
    let inbox = running.inbox.clone();
    let addr = listener.local_addr().unwrap_or(config.addr);
    common::announce(addr);

    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(common::shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                };
                let inbox = inbox.clone();
                let service = service_fn(move |request| handle(inbox.clone(), request));
                let connection = graceful.watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after 30 s; stopping anyway");
    }
    common::finish(running).await;
}

async fn handle(
    inbox: Inbox,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() == "/metrics" && request.method() == Method::GET {
        let metrics = inbox.metrics_text().await.unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(metrics)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        );
        return Ok(response);
    }
    if request.uri().path() != "/" {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    Ok(match *request.method() {
        Method::GET => {
            let mut response = Response::new(Full::new(Bytes::from(inbox.status_page().await)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        Method::POST => {
            if let Some(reply) = inbox.check_content_length(request.headers()) {
                return Ok(from_reply(&reply));
            }
            let (parts, body) = request.into_parts();
            // Stop reading past the limit: never buffer an unbounded body.
            match Limited::new(body, inbox.max_body_bytes()).collect().await {
                Ok(body) => from_reply(&inbox.receive(&parts.headers, &body.to_bytes()).await),
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    from_reply(&inbox.too_large())
                }
                Err(_) => text(StatusCode::BAD_REQUEST, "cannot read the request body\n"),
            }
        }
        _ => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            response
        }
    })
}

fn from_reply(reply: &Reply) -> Response<Full<Bytes>> {
    common::log_refusal(reply);
    let mut response = text(reply.status(), reply.body());
    if reply.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was never read, so this connection cannot carry
        // another request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
