//! A worker as a process of its own: one consumer of the Redis stream or the
//! RabbitMQ queue the receivers store into, running `process` in `common/mod.rs`.
//! On Redis it decides through the Redis gate; on RabbitMQ through a gate in its own
//! memory. Run as many as you need, on any machine. SIGTERM (or Ctrl-C) finishes the
//! event in hand, acknowledges it and exits 0, within `COMAPI_SHUTDOWN_GRACE` (25 s)
//! whatever the worker was doing. With `METRICS_PORT`, `GET /metrics` on 127.0.0.1
//! (or `BIND`) serves its metrics, and `/console` the operator's console (with
//! `COMAPI_CONSOLE_TOKEN`).
//!
//! ```sh
//! COMAPI_REDIS_URL=redis://127.0.0.1:6379/ METRICS_PORT=9090 \
//!   cargo run --release --features binaries,redis --bin worker
//! COMAPI_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!   cargo run --release --features binaries,rabbitmq --bin worker
//! ```

// Built without a broker it only says it needs one.
#![cfg_attr(not(any(feature = "redis", feature = "rabbitmq")), allow(dead_code))]

#[path = "../../examples/common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use comapi_webhook::Worker;
use comapi_webhook::console::{Console, ConsoleAccess};
use comapi_webhook::gate::DecisionStore;
use comapi_webhook::metrics::{Metrics, MetricsToken, StatusCache};
use comapi_webhook::receiver::{AmqpSettings, ReceiverConfig, RedisSettings, shutdown_signal};
use comapi_webhook::store::{EventStore, Store};
use comapi_webhook::worker::{Sources, WorkerConfig};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

const WORKER_HELP: &str = "\
  COMAPI_REDIS_URL          the Redis the receivers store into, or
  COMAPI_AMQP_URL           the RabbitMQ they store into (one of the two is required)
  COMAPI_REDIS_PREFIX       the Redis keys' prefix (default comapi-webhook:)
  COMAPI_AMQP_QUEUE         the RabbitMQ queue (default comapi-webhook.events)
  COMAPI_AMQP_MANAGEMENT_URL  RabbitMQ's management API, for the unacknowledged count
  COMAPI_GATE_REDIS_URL     with RabbitMQ: a Redis the workers share their gate in
                            (default: each worker's gate in its memory)
  COMAPI_LEASE              how long a worker may hold an event (default 60s)
  COMAPI_CONCURRENCY        handler calls in flight (default 32)
  COMAPI_RETRY_ATTEMPTS     attempts before the dead letter (default 8)
  COMAPI_RETRY_FIRST_DELAY  the wait after the first failure, then doubling (default 1s)
  COMAPI_RETRY_MAX_DELAY    the longest wait between attempts (default 60s)
  COMAPI_SHUTDOWN_GRACE     how long a shutdown may take (default 25s)
  METRICS_PORT, BIND        serve GET /metrics there (default: no metrics; BIND 127.0.0.1)
  COMAPI_METRICS_TOKEN      when set, GET /metrics needs Authorization: Bearer <token>
  COMAPI_CONSOLE_TOKEN      with METRICS_PORT: the operator's console at /console
                            signs in with it (16+ characters; default: no console)
  COMAPI_CONSOLE_READ_TOKEN a console token that can look but not act
  RUST_LOG                  the log filter (default info)";

/// What every broker's worker needs besides its consumers and gate.
struct Settings {
    grace: Duration,
    worker: WorkerConfig,
    metrics_at: Option<SocketAddr>,
    metrics_token: Option<MetricsToken>,
    console: ConsoleAccess,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::help_if_asked(
        "worker: processes the events the receivers store in a Redis stream or a RabbitMQ queue",
        WORKER_HELP,
    );
    common::init_logging();
    let settings = match settings() {
        Ok(settings) => settings,
        Err(message) => return fail(&message, 2),
    };
    let amqp = match AmqpSettings::from_env() {
        Ok(amqp) => amqp,
        Err(error) => return fail(&error.to_string(), error.exit_code()),
    };
    if let Some(amqp) = amqp {
        return rabbit(&amqp, settings).await;
    }
    let redis = match RedisSettings::from_env() {
        Ok(Some(redis)) => redis,
        Ok(None) => {
            return fail(
                "COMAPI_REDIS_URL or COMAPI_AMQP_URL is required: the broker the receivers store into",
                2,
            );
        }
        Err(error) => return fail(&error.to_string(), 2),
    };
    redis_worker(&redis, settings).await
}

#[cfg(feature = "rabbitmq")]
async fn rabbit(amqp: &AmqpSettings, settings: Settings) -> ExitCode {
    use comapi_webhook::store::rabbitmq::RabbitConsumers;
    let config = amqp.rabbit_config();
    let queue = match amqp.connect().await {
        Ok(queue) => queue,
        Err(error) => return fail(&error.to_string(), error.exit_code()),
    };
    let consumers = RabbitConsumers::new(&amqp.url, config);
    match &amqp.gate {
        None => run(consumers, amqp.memory_gate(), queue, settings).await,
        #[cfg(feature = "redis")]
        Some(redis) => match redis.gate().await {
            Ok(gate) => run(consumers, gate, queue, settings).await,
            Err(error) => fail(&error.to_string(), error.exit_code()),
        },
        // Without Redis the settings refuse COMAPI_GATE_REDIS_URL.
        #[cfg(not(feature = "redis"))]
        Some(_) => run(consumers, amqp.memory_gate(), queue, settings).await,
    }
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbit(_: &AmqpSettings, _: Settings) -> ExitCode {
    fail(
        "COMAPI_AMQP_URL needs a build with --features binaries,rabbitmq",
        2,
    )
}

#[cfg(not(feature = "redis"))]
async fn redis_worker(_: &RedisSettings, _: Settings) -> ExitCode {
    fail(
        "COMAPI_REDIS_URL needs a build with --features binaries,redis",
        2,
    )
}

#[cfg(feature = "redis")]
async fn redis_worker(redis: &RedisSettings, settings: Settings) -> ExitCode {
    use comapi_webhook::store::redis_stream::{RedisStream, StreamConsumers};
    let gate = match redis.gate().await {
        Ok(gate) => gate,
        Err(error) => return fail(&error.to_string(), error.exit_code()),
    };
    let stream = match RedisStream::connect(&redis.url, redis.stream_config()).await {
        Ok(stream) => stream,
        Err(error) => return fail(&format!("COMAPI_REDIS_URL: {}", error.report()), 1),
    };
    let consumers = StreamConsumers::new(&redis.url, redis.stream_config());
    run(consumers, gate, stream, settings).await
}

/// The settings every broker's worker reads.
fn settings() -> Result<Settings, String> {
    let grace = ReceiverConfig::shutdown_grace_from_env().map_err(|e| e.to_string())?;
    let worker = ReceiverConfig::worker_config_from_env().map_err(|e| e.to_string())?;
    let port = std::env::var("METRICS_PORT").ok().filter(|p| !p.is_empty());
    let port = port
        .map(|p| p.trim().parse::<u16>().map_err(|_| p))
        .transpose()
        .map_err(|p| format!("METRICS_PORT must be a port number, not {p:?}"))?;
    let ip: IpAddr = match std::env::var("BIND").ok().filter(|b| !b.is_empty()) {
        None => IpAddr::from([127, 0, 0, 1]),
        Some(b) => b.trim().parse().map_err(|_| "BIND must be an IP address")?,
    };
    let metrics_token = std::env::var("COMAPI_METRICS_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(MetricsToken::new);
    let console = ConsoleAccess::from_lookup(&|name| std::env::var(name).ok())?;
    Ok(Settings {
        grace,
        worker,
        metrics_at: port.map(|port| SocketAddr::new(ip, port)),
        metrics_token,
        console,
    })
}

/// Serves the metrics (with `METRICS_PORT`), runs the worker until SIGTERM, stops it.
async fn run<T, S, E>(consumers: T, gate: S, store: E, settings: Settings) -> ExitCode
where
    T: Sources + std::fmt::Debug,
    S: DecisionStore + 'static,
    E: EventStore + Into<Store>,
{
    let metrics = Arc::new(Metrics::for_worker());
    let console =
        Console::new(store.clone(), settings.console.clone()).with_metrics(Arc::clone(&metrics));
    if let Some(addr) = settings.metrics_at {
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
        if settings.metrics_token.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "GET /metrics answers anyone who can reach this address (event volumes, the \
                 backlog, the dead letter): set COMAPI_METRICS_TOKEN to ask for a bearer token"
            );
        }
        if console.is_enabled() {
            println!(
                "console on http://{}/console",
                listener.local_addr().unwrap_or(addr)
            );
            let warming = console.clone();
            tokio::spawn(async move { warming.warm_up().await });
        }
        let token = settings.metrics_token.clone();
        tokio::spawn(serve_metrics(
            listener,
            store,
            Arc::clone(&metrics),
            token,
            console,
        ));
    } else if !settings.console.is_empty() {
        tracing::warn!(
            "COMAPI_CONSOLE_TOKEN is set but METRICS_PORT is not: the console is served only with METRICS_PORT"
        );
    }
    let worker = match Worker::spawn(
        consumers,
        gate,
        metrics.meter(common::process),
        settings.worker,
    ) {
        Ok(worker) => worker,
        Err(error) => return fail(&error.report().to_string(), 1),
    };
    shutdown_signal().await;
    worker.shutdown_within(settings.grace).await;
    tracing::info!("worker stopped");
    ExitCode::SUCCESS
}

/// Answers the console's paths with `console`, and every other request on
/// `listener` with the metrics, gauges read from `store` at most once a second;
/// with `token`, only requests that bring it.
async fn serve_metrics<E: EventStore>(
    listener: tokio::net::TcpListener,
    store: E,
    metrics: Arc<Metrics>,
    token: Option<MetricsToken>,
    console: Console,
) {
    let cache = StatusCache::default();
    while let Ok((connection, _)) = listener.accept().await {
        let (store, metrics, cache, token, console) = (
            store.clone(),
            Arc::clone(&metrics),
            cache.clone(),
            token.clone(),
            console.clone(),
        );
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let (store, metrics, cache, token, console) = (
                store.clone(),
                Arc::clone(&metrics),
                cache.clone(),
                token.clone(),
                console.clone(),
            );
            async move {
                if console.serves(request.uri().path()) {
                    return Ok(console.handle_body(request).await);
                }
                let authorization = request.headers().get(http::header::AUTHORIZATION);
                let reply = match &token {
                    Some(token) if !token.admits(authorization.map(|a| a.as_bytes())) => {
                        comapi_webhook::Reply::metrics_token_required()
                    }
                    _ => {
                        metrics.set_store_status(&cache.status(&store).await);
                        metrics.reply()
                    }
                };
                Ok::<_, std::convert::Infallible>(http::Response::<String>::from(reply))
            }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(connection), service));
    }
}

fn fail(message: &str, code: u8) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}
