//! A worker as a process of its own: one consumer of the Redis stream the receivers
//! store into, deciding through the Redis gate, running `process` in
//! `common/mod.rs`. Run as many as you need, on any machine. SIGTERM (or Ctrl-C)
//! finishes the event in hand, acknowledges it and exits 0, within
//! `COMAPI_SHUTDOWN_GRACE` (25 s) whatever the worker was doing. With `METRICS_PORT`,
//! `GET /metrics` on 127.0.0.1 (or `BIND`) serves its metrics.
//!
//! ```sh
//! COMAPI_REDIS_URL=redis://127.0.0.1:6379/ METRICS_PORT=9090 \
//!   cargo run --release --features binaries,redis --bin worker
//! ```

#[path = "common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use comapi_webhook::Worker;
use comapi_webhook::gate::{RedisGate, RedisGateConfig};
use comapi_webhook::metrics::Metrics;
use comapi_webhook::receiver::{ReceiverConfig, RedisSettings, shutdown_signal};
use comapi_webhook::store::EventStore;
use comapi_webhook::store::redis_stream::{RedisStream, StreamConsumers};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

const WORKER_HELP: &str = "\
  COMAPI_REDIS_URL          required: the Redis the receivers store into
  COMAPI_REDIS_PREFIX       the Redis keys' prefix (default comapi-webhook:)
  COMAPI_LEASE              how long a worker may hold an event (default 60s)
  COMAPI_CONCURRENCY        handler calls in flight (default 32)
  COMAPI_RETRY_ATTEMPTS     attempts before the dead letter (default 8)
  COMAPI_RETRY_FIRST_DELAY  the wait after the first failure, then doubling (default 1s)
  COMAPI_RETRY_MAX_DELAY    the longest wait between attempts (default 60s)
  COMAPI_SHUTDOWN_GRACE     how long a shutdown may take (default 25s)
  METRICS_PORT, BIND        serve GET /metrics there (default: no metrics; BIND 127.0.0.1)
  RUST_LOG                  the log filter (default info)";

#[tokio::main]
async fn main() -> ExitCode {
    common::help_if_asked(
        "worker: processes the events the receivers store in a Redis stream",
        WORKER_HELP,
    );
    common::init_logging();
    let redis = match RedisSettings::from_env() {
        Ok(Some(redis)) => redis,
        Ok(None) => {
            return fail(
                "COMAPI_REDIS_URL is required: the Redis the receivers store into",
                2,
            );
        }
        Err(error) => return fail(&error.to_string(), 2),
    };
    let grace = match ReceiverConfig::shutdown_grace_from_env() {
        Ok(grace) => grace,
        Err(error) => return fail(&error.to_string(), 2),
    };
    let worker_config = match ReceiverConfig::worker_config_from_env() {
        Ok(config) => config,
        Err(error) => return fail(&error.to_string(), 2),
    };
    let port = std::env::var("METRICS_PORT").ok().filter(|p| !p.is_empty());
    let port = match port
        .map(|p| p.trim().parse::<u16>().map_err(|_| p))
        .transpose()
    {
        Ok(port) => port,
        Err(p) => return fail(&format!("METRICS_PORT must be a port number, not {p:?}"), 2),
    };
    let ip: IpAddr = match std::env::var("BIND")
        .ok()
        .filter(|b| !b.is_empty())
        .map(|b| b.trim().parse())
    {
        None => IpAddr::from([127, 0, 0, 1]),
        Some(Ok(ip)) => ip,
        Some(Err(_)) => return fail("BIND must be an IP address", 2),
    };
    if let Err(error) = redis.check_credentials().await {
        return fail(&error.to_string(), error.exit_code());
    }
    let connected = async {
        let stream = RedisStream::connect(&redis.url, redis.stream_config()).await?;
        let gate_config = RedisGateConfig::default()
            .with_key_prefix(redis.key_prefix.clone())
            .with_lease(redis.lease);
        Ok::<_, comapi_webhook::Error>((stream, RedisGate::connect(&redis.url, gate_config).await?))
    };
    let (stream, gate) = match connected.await {
        Ok(connected) => connected,
        Err(error) => return fail(&format!("COMAPI_REDIS_URL: {}", error.report()), 1),
    };
    let metrics = Arc::new(Metrics::for_worker());
    if let Some(port) = port {
        let addr = SocketAddr::new(ip, port);
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(error) => {
                return fail(
                    &format!("cannot listen on {addr} (METRICS_PORT, BIND): {error}"),
                    1,
                );
            }
        };
        println!(
            "metrics on http://{}/metrics",
            listener.local_addr().unwrap_or(addr)
        );
        tokio::spawn(serve_metrics(listener, stream, Arc::clone(&metrics)));
    }
    let consumers = StreamConsumers::new(&redis.url, redis.stream_config());
    let worker = match Worker::spawn(
        consumers,
        gate,
        metrics.meter(common::process),
        worker_config,
    ) {
        Ok(worker) => worker,
        Err(error) => return fail(&error.report().to_string(), 1),
    };
    shutdown_signal().await;
    worker.shutdown_within(grace).await;
    tracing::info!("worker stopped");
    ExitCode::SUCCESS
}

/// Answers every request on `listener` with the metrics, gauges read from `stream` now.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    stream: RedisStream,
    metrics: Arc<Metrics>,
) {
    while let Ok((connection, _)) = listener.accept().await {
        let (stream, metrics) = (stream.clone(), Arc::clone(&metrics));
        let service = service_fn(move |_| {
            let (stream, metrics) = (stream.clone(), Arc::clone(&metrics));
            async move {
                metrics.set_store_status(&stream.status().await);
                Ok::<_, std::convert::Infallible>(http::Response::<String>::from(metrics.reply()))
            }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(connection), service));
    }
}

fn fail(message: &str, code: u8) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}
