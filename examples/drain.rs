//! The drain benchmark's two halves, run by `scripts/drain.sh` (a benchmark tool,
//! not a receiver):
//!
//! - `drain store URL N` POSTs N distinct `message.sent` events (fresh ids, one
//!   message each, raised now) to a receiver at URL in signed batches of 100, eight
//!   requests at a time, and prints how fast the receiver stored them.
//! - `drain work N` runs a supervised worker over the store the environment names
//!   (`COMAPI_REDIS_URL`, `COMAPI_AMQP_URL`, else the spool in `COMAPI_SPOOL_DIR`,
//!   with `COMAPI_CONCURRENCY`) until it has handled N events, and prints how fast.
//!   Its handler does nothing, or awaits `DRAIN_HANDLER_MS` milliseconds, as a
//!   handler waiting on I/O would; with `RUST_LOG=info` it logs each event it
//!   handled. Several `drain work` processes share a Redis stream's events between
//!   them: each stops once the stream's backlog is empty.
//! - With `DRAIN_FAIL_EVERY=K`, `store` makes every K-th event one the handler
//!   always fails (its id ends in `-fail`), and `work` counts only the others: N is
//!   then the healthy events.
//!
//! ```sh
//! COMAPI_WEBHOOK_SECRET=… cargo run --release --features receiver,redis,rabbitmq --example drain -- store http://127.0.0.1:8080/ 20000
//! COMAPI_WEBHOOK_SECRET=… COMAPI_SPOOL_DIR=… cargo run --release --features receiver,redis,rabbitmq --example drain -- work 20000
//! ```

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use comapi_webhook::gate::{RedisGate, RedisGateConfig};
use comapi_webhook::receiver::ReceiverConfig;
use comapi_webhook::store::EventStore;
use comapi_webhook::store::redis_stream::{RedisStream, StreamConsumers};
use comapi_webhook::store::spool::Spool;
use comapi_webhook::{Event, Gate, SIGNATURE_HEADER, Verifier, Worker};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const USAGE: &str = "usage: drain store URL EVENTS | drain work EVENTS
  drain store URL N  POSTs N signed events to the receiver at URL, prints events/s
  drain work N       a worker over COMAPI_REDIS_URL (else COMAPI_AMQP_URL, else
                     COMAPI_SPOOL_DIR) until it handled N events, prints events/s;
                     DRAIN_HANDLER_MS: each handler waits that long;
                     COMAPI_CONCURRENCY: calls in flight
  DRAIN_FAIL_EVERY=K every K-th event stored always fails; work counts the others";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("-h" | "--help")) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let count = |at: usize| args.get(at).and_then(|n| n.parse::<u64>().ok());
    let outcome = match (args.first().map(String::as_str), args.len()) {
        (Some("store"), 3) => match count(2) {
            Some(events) => store(&args[1], events).await,
            None => Err(USAGE.to_owned()),
        },
        (Some("work"), 2) => match count(1) {
            Some(events) => work(events).await,
            None => Err(USAGE.to_owned()),
        },
        _ => Err(USAGE.to_owned()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

/// POSTs `events` distinct events to `url` and prints the rate.
async fn store(url: &str, events: u64) -> Result<(), String> {
    let secret = std::env::var("COMAPI_WEBHOOK_SECRET").map_err(|_| "COMAPI_WEBHOOK_SECRET")?;
    let secret = secret
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let verifier = Verifier::new(&secret).map_err(|e| e.to_string())?;
    let run = std::process::id();
    let fail_every = fail_every()?;
    let bodies: Vec<String> = (0..events.div_ceil(100))
        .map(|batch| {
            let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
            let batch: Vec<String> = (batch * 100..(batch * 100 + 100).min(events))
                .map(|n| {
                    let fail = if fail_every.is_some_and(|k| n % k == 0) { "-fail" } else { "" };
                    format!(
                        r#"{{"eventId":"d-{run}-{n}{fail}","name":"message.sent","payload":{{"id":"m-{run}-{n}"}},"revision":1,"timestamp":"{now}"}}"#
                    )
                })
                .collect();
            format!("[{}]", batch.join(","))
        })
        .collect();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let next = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(bodies);
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, next, bodies, verifier) = (
            client.clone(),
            next.clone(),
            bodies.clone(),
            verifier.clone(),
        );
        let url = url.to_owned();
        senders.spawn(async move {
            loop {
                let at = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(body) = bodies.get(at) else {
                    return Ok(());
                };
                let request = http::Request::post(&url)
                    .header(SIGNATURE_HEADER, verifier.sign(body.as_bytes()).to_string())
                    .body(Full::new(Bytes::from(body.clone())))
                    .map_err(|e| e.to_string())?;
                let response = client.request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let _ = response.into_body().collect().await;
                if !status.is_success() {
                    return Err(format!("the receiver answered {status}"));
                }
            }
        });
    }
    while let Some(sent) = senders.join_next().await {
        sent.map_err(|e| e.to_string())??;
    }
    let took = started.elapsed();
    println!(
        "stored {events} events in {took:.2?}: {:.0} events/s",
        events as f64 / took.as_secs_f64()
    );
    Ok(())
}

/// `DRAIN_FAIL_EVERY`, if set.
fn fail_every() -> Result<Option<u64>, String> {
    std::env::var("DRAIN_FAIL_EVERY")
        .ok()
        .map(|k| match k.trim().parse::<u64>() {
            Ok(k) if k > 0 => Ok(k),
            _ => Err("DRAIN_FAIL_EVERY must be a whole number above 0".to_owned()),
        })
        .transpose()
}

/// Runs a worker until `events` were handled (or a Redis stream's backlog is empty)
/// and prints the rate.
async fn work(events: u64) -> Result<(), String> {
    common::init_logging();
    let config = ReceiverConfig::from_env().map_err(|e| e.to_string())?;
    let delay = std::env::var("DRAIN_HANDLER_MS")
        .ok()
        .map(|ms| {
            ms.trim()
                .parse::<u64>()
                .map_err(|_| "DRAIN_HANDLER_MS must be milliseconds")
        })
        .transpose()?
        .filter(|&ms| ms > 0) // 0: no wait at all (a timer of 0 still waits for a tick)
        .map(Duration::from_millis);
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    let handler = move |event: Event<'static>| {
        let counter = Arc::clone(&counter);
        async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if event.event_id().ends_with("-fail") {
                return Err(std::io::Error::other("this event always fails"));
            }
            tracing::info!(event_id = %event.event_id(), "event processed");
            counter.fetch_add(1, Ordering::Relaxed);
            Ok::<(), std::io::Error>(())
        }
    };
    let started = Instant::now();
    let (worker, stream) = match (&config.redis, &config.amqp) {
        (None, Some(amqp)) => {
            use comapi_webhook::store::rabbitmq::RabbitConsumers;
            let consumers = RabbitConsumers::new(&amqp.url, amqp.rabbit_config());
            let worker = Worker::spawn(consumers, Gate::in_memory(), handler, config.worker_config);
            (worker, None)
        }
        (Some(redis), _) => {
            let stream = RedisStream::connect(&redis.url, redis.stream_config())
                .await
                .map_err(|e| e.report().to_string())?;
            let gate_config = RedisGateConfig::default()
                .with_key_prefix(redis.key_prefix.clone())
                .with_lease(redis.lease);
            let gate = RedisGate::connect(&redis.url, gate_config)
                .await
                .map_err(|e| e.report().to_string())?;
            let consumers = StreamConsumers::new(&redis.url, redis.stream_config());
            let worker = Worker::spawn(consumers, gate, handler, config.worker_config);
            (worker, Some(stream))
        }
        (None, None) => {
            let (spool, _) = Spool::open(&config.spool).map_err(|e| e.report().to_string())?;
            let worker = Worker::spawn(spool, Gate::in_memory(), handler, config.worker_config);
            (worker, None)
        }
    };
    let worker = worker.map_err(|e| e.report().to_string())?;
    let mut last = (0, started.elapsed());
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = handled.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, started.elapsed());
        }
        let empty = match &stream {
            Some(stream) => stream.status().await.backlog == Some(0),
            None => false,
        };
        if now >= events || empty {
            break;
        }
    }
    let (count, took) = last;
    worker.shutdown().await;
    println!(
        "handled {count} events in {took:.2?}: {:.0} events/s",
        count as f64 / took.as_secs_f64().max(1e-9)
    );
    Ok(())
}
