//! A worker as a process of its own: reads the Redis stream the receivers store
//! into, as one consumer of the group, decides through the Redis gate and runs
//! the processing in `common/mod.rs`. Run as many as you need, on any machine.
//!
//! ```sh
//! COMAPI_REDIS_URL=redis://127.0.0.1:6379/ METRICS_PORT=9090 \
//!   cargo run --release --features receiver,redis --example worker
//! ```
//!
//! SIGTERM (or Ctrl-C) finishes the event in hand, acknowledges it and exits 0.
//! With `METRICS_PORT` set, `GET /metrics` on 127.0.0.1 (or `BIND`) serves its
//! metrics in the Prometheus text format.

#[path = "common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use comapi_webhook::store::EventStore;
use comapi_webhook::store::redis_stream::{RedisStream, StopHandle};
use comapi_webhook::{METRICS_CONTENT_TYPE, Metrics};
use http::{HeaderValue, Response, header};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> ExitCode {
    common::init_logging();
    let redis = match common::redis_from_env() {
        Ok(redis) => redis,
        Err(message) => return usage_error(&message),
    };
    let Some(url) = redis.url.clone() else {
        return usage_error("COMAPI_REDIS_URL is required: the Redis the receivers store into");
    };
    let metrics = Arc::new(Metrics::new());
    if let Some(port) = std::env::var("METRICS_PORT").ok().filter(|p| !p.is_empty()) {
        let Ok(port) = port.trim().parse::<u16>() else {
            return usage_error(&format!("METRICS_PORT must be a port number, not {port:?}"));
        };
        let ip: IpAddr = match std::env::var("BIND").ok().filter(|b| !b.is_empty()) {
            Some(bind) => match bind.trim().parse() {
                Ok(ip) => ip,
                Err(_) => return usage_error(&format!("BIND must be an IP address, not {bind:?}")),
            },
            None => IpAddr::from([127, 0, 0, 1]),
        };
        let stream = common::connect_stream(&url, &redis).await;
        let addr = SocketAddr::new(ip, port);
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("error: cannot listen on {addr} (METRICS_PORT, BIND): {error}");
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().unwrap_or(addr);
        println!("metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(listener, stream, Arc::clone(&metrics)));
    }
    let stop = StopHandle::default();
    let signalled = stop.clone();
    tokio::spawn(async move {
        common::shutdown_signal().await;
        signalled.stop();
    });
    common::supervise(&redis, &common::Stop::Redis(stop), &metrics).await;
    tracing::info!("worker stopped");
    ExitCode::SUCCESS
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// Answers every request on `listener` with the metrics, gauges read from `stream` now.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    stream: RedisStream,
    metrics: Arc<Metrics>,
) {
    loop {
        let Ok((connection, _)) = listener.accept().await else {
            continue;
        };
        let (stream, metrics) = (stream.clone(), Arc::clone(&metrics));
        let service = service_fn(move |_request| {
            let (stream, metrics) = (stream.clone(), Arc::clone(&metrics));
            async move {
                metrics.set_store_status(&stream.status().await);
                let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(METRICS_CONTENT_TYPE),
                );
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(connection), service));
    }
}
