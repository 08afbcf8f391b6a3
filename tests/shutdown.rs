//! Stopping while Redis is down, on a Redis of the test's own that is killed and
//! restarted: a supervised worker whose Redis died mid-event stops within its
//! grace period, and the event comes again once Redis is back; the `worker` binary
//! exits 0 on SIGTERM within its grace while Redis is down; a store reads Redis's
//! persistence settings again once Redis is back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::gate::{RedisGate, RedisGateConfig};
use comapi_webhook::store::redis_stream::{
    Durability, RedisStream, RedisStreamConfig, StreamConsumers,
};
use comapi_webhook::worker::RetryPolicy;
use comapi_webhook::{Event, Inbox, SIGNATURE_HEADER, Verifier, Worker};
use process::{OwnRedis, Receiver, SECRET, event_json};
use support::{example_binary, runtime, unique_prefix};

async fn store_one(url: &str, config: &RedisStreamConfig, id: &str) {
    let stream = RedisStream::connect(url, config.clone()).await.unwrap();
    let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream);
    let body = event_json(id);
    let mut headers = http::HeaderMap::new();
    let signature = Verifier::new(SECRET).unwrap().sign(body.as_bytes());
    headers.insert(SIGNATURE_HEADER, signature.to_string().parse().unwrap());
    assert_eq!(inbox.receive(&headers, body.as_bytes()).await.status(), 200);
}

/// A supervised worker on `redis` whose handler records each call and takes `takes`.
async fn spawn_worker(
    url: &str,
    config: &RedisStreamConfig,
    calls: &Arc<Mutex<Vec<String>>>,
    takes: Duration,
) -> Worker {
    let gate_config = RedisGateConfig::default()
        .with_key_prefix(&config.key_prefix)
        .with_lease(config.lease);
    let gate = RedisGate::connect(url, gate_config).await.unwrap();
    let calls = Arc::clone(calls);
    let handler = move |event: Event<'static>| {
        calls.lock().unwrap().push(event.event_id().to_owned());
        async move {
            tokio::time::sleep(takes).await;
            Ok::<(), std::io::Error>(())
        }
    };
    let consumers = StreamConsumers::new(url, config.clone());
    Worker::spawn(consumers, gate, handler, RetryPolicy::default()).unwrap()
}

#[test]
fn a_worker_whose_redis_died_mid_event_stops_in_time_and_the_event_comes_again() {
    let test = "a_worker_whose_redis_died_mid_event_stops_in_time_and_the_event_comes_again";
    let Some(mut redis) = OwnRedis::start(test) else {
        return;
    };
    let url = redis.url();
    let config = RedisStreamConfig::default()
        .with_key_prefix(unique_prefix("down"))
        .with_lease(Duration::from_secs(1));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime();
    let worker = rt.block_on(async {
        store_one(&url, &config, "mid-event").await;
        spawn_worker(&url, &config, &calls, Duration::from_millis(500)).await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the worker never started the event"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Redis dies while the handler runs: its completion cannot be stored.
    redis.kill();
    std::thread::sleep(Duration::from_millis(800));
    let grace = Duration::from_secs(3);
    let asked = Instant::now();
    let in_time = rt.block_on(worker.shutdown_within(grace));
    let took = asked.elapsed();
    assert!(in_time, "the worker did not stop within {grace:?}");
    assert!(took <= grace + Duration::from_millis(500), "{took:?}");

    // Redis comes back with what it had fsynced: the event comes again.
    redis.restart();
    let worker = rt.block_on(spawn_worker(&url, &config, &calls, Duration::ZERO));
    let deadline = Instant::now() + Duration::from_secs(15);
    while calls.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the unfinished event never came again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(rt.block_on(worker.shutdown_within(grace)));
    assert_eq!(*calls.lock().unwrap(), ["mid-event", "mid-event"]);
}

#[test]
fn the_worker_binary_exits_0_on_sigterm_within_its_grace_while_redis_is_down() {
    let test = "the_worker_binary_exits_0_on_sigterm_within_its_grace_while_redis_is_down";
    let Some(mut redis) = OwnRedis::start(test) else {
        return;
    };
    let mut command = Command::new(example_binary("worker"));
    command
        .env("COMAPI_REDIS_URL", redis.url())
        .env("COMAPI_REDIS_PREFIX", unique_prefix("down-bin"))
        .env("COMAPI_SHUTDOWN_GRACE", "3s")
        .env("METRICS_PORT", "0");
    let mut worker = Receiver::start_command("worker", command, SECRET);
    redis.kill();
    std::thread::sleep(Duration::from_millis(1500)); // failing, resuming, failing
    let asked = Instant::now();
    worker.signal("-TERM");
    let status = worker.wait(Duration::from_secs(10));
    let took = asked.elapsed();
    let log = worker.log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        took <= Duration::from_millis(3_500),
        "exit after {took:?}:\n{log}"
    );
}

#[test]
fn a_store_reads_the_persistence_again_once_redis_is_back() {
    let test = "a_store_reads_the_persistence_again_once_redis_is_back";
    let Some(mut redis) = OwnRedis::start(test) else {
        return;
    };
    let url = redis.url();
    let config = RedisStreamConfig::default()
        .with_key_prefix(unique_prefix("recheck"))
        .with_deadline(Duration::from_millis(500));
    runtime().block_on(async {
        let stream = RedisStream::connect(&url, config.clone()).await.unwrap();
        assert_eq!(stream.durability(), Durability::Always);
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        let body = event_json("while-down");
        let mut headers = http::HeaderMap::new();
        let signature = Verifier::new(SECRET).unwrap().sign(body.as_bytes());
        headers.insert(SIGNATURE_HEADER, signature.to_string().parse().unwrap());
        redis.kill();
        assert_eq!(inbox.receive(&headers, body.as_bytes()).await.status(), 503);
        // Back, but with weaker settings than before.
        redis.restart();
        redis.config_set("appendfsync", "everysec").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while inbox.receive(&headers, body.as_bytes()).await.status() != 200 {
            assert!(Instant::now() < deadline, "the store never recovered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while stream.durability() == Durability::Always {
            assert!(
                Instant::now() < deadline,
                "the persistence was not read again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            stream.durability().warning().is_some(),
            "{:?}",
            stream.durability()
        );
    });
}
