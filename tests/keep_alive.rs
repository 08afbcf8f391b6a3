//! Stream workers on a real Redis, each on a thread and runtime of its own as
//! separate processes would be, with leases short enough to run out: an event is
//! handled exactly as often as its retry policy allows, whether its handler blocks
//! its thread, a copy of it waits for a claim another worker holds, or it was
//! dead-lettered while the worker was on a slow next one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::gate::{DecisionStore, RedisGate, RedisGateConfig};
use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig, StreamConsumer};
use comapi_webhook::store::{Delivery, EventSource};
use comapi_webhook::worker::{RetryPolicy, run_worker};
use comapi_webhook::{Event, Inbox, SIGNATURE_HEADER, Verifier};
use support::{redis_connection, redis_url, runtime, unique_prefix};

const SECRET: &str = "a-comapi-webhook-secret-of-36-chars!";

/// Each handler call: which worker, which event, when it started and ended.
type Calls = Arc<Mutex<Vec<(&'static str, String, Instant, Instant)>>>;

/// Stores one request holding events with these ids (a copy per repeated id).
fn store(url: &str, config: &RedisStreamConfig, ids: &[&str]) {
    let events: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({"eventId": id, "name": "message.sent", "payload": {"id": format!("m-{id}")},
                "timestamp": support::now_rfc3339()})
        })
        .collect();
    let body = serde_json::to_vec(&events).unwrap();
    runtime().block_on(async {
        let stream = RedisStream::connect(url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream);
        let mut headers = http::HeaderMap::new();
        let signature = Verifier::new(SECRET).unwrap().sign(&body).to_string();
        headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
        assert_eq!(inbox.receive(&headers, &body).await.status(), 200);
    });
}

/// How the handler treats an event: how long it takes, whether it blocks its
/// thread doing so, and whether it fails.
#[derive(Clone, Copy)]
struct Behaviour {
    takes: Duration,
    blocking: bool,
    fails: bool,
}

/// A worker named `name` on a thread and runtime of its own, until `stop_after`.
fn worker(
    url: &str,
    (config, gate): (&RedisStreamConfig, &RedisGateConfig),
    name: &'static str,
    behaviour: impl Fn(&str) -> Behaviour + Send + Sync + 'static,
    calls: &Calls,
    retry: RetryPolicy,
    stop_after: Duration,
) -> std::thread::JoinHandle<()> {
    let (url, config, gate, calls) = (url.to_owned(), config.clone(), gate.clone(), calls.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let consumer = StreamConsumer::connect(&url, config, name).await.unwrap();
            let stop = consumer.stop_handle();
            let gate = RedisGate::connect(&url, gate).await.unwrap();
            let handler = move |event: Event<'static>| {
                let id = event.event_id().to_owned();
                let how = behaviour(&id);
                let calls = calls.clone();
                let started = Instant::now();
                if how.blocking {
                    std::thread::sleep(how.takes);
                }
                async move {
                    if !how.blocking {
                        tokio::time::sleep(how.takes).await;
                    }
                    calls
                        .lock()
                        .unwrap()
                        .push((name, id, started, Instant::now()));
                    if how.fails {
                        Err(std::io::Error::other("the database is down"))
                    } else {
                        Ok(())
                    }
                }
            };
            tokio::spawn(async move {
                tokio::time::sleep(stop_after).await;
                stop.stop();
            });
            run_worker(consumer, &gate, handler, support::worker_config(retry))
                .await
                .unwrap();
        });
    })
}

fn quick(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(
        Duration::from_millis(10),
        Duration::from_millis(10),
        attempts,
    )
}

fn calls_of(calls: &Calls, id: &str) -> Vec<(&'static str, Instant, Instant)> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, i, _, _)| i == id)
        .map(|(w, _, s, e)| (*w, *s, *e))
        .collect()
}

/// Settings for a test: the stream's and the gate's, both with `lease`.
fn settings(test: &str, lease: Duration) -> (RedisStreamConfig, RedisGateConfig) {
    let prefix = unique_prefix(test);
    let stream = RedisStreamConfig::default()
        .with_key_prefix(&prefix)
        .with_lease(lease);
    let gate = RedisGateConfig::default()
        .with_key_prefix(&prefix)
        .with_lease(lease);
    (stream, gate)
}

const FAST: Behaviour = Behaviour {
    takes: Duration::ZERO,
    blocking: false,
    fails: false,
};

#[test]
fn a_handler_that_blocks_its_thread_keeps_its_event() {
    let Some(url) = redis_url("a_handler_that_blocks_its_thread_keeps_its_event") else {
        return;
    };
    let lease = Duration::from_millis(500);
    let (config, gate) = settings("blocking", lease);
    store(&url, &config, &["blocking"]);
    let calls = Calls::default();
    let slow = |_: &str| Behaviour {
        takes: Duration::from_secs(3),
        blocking: true,
        fails: false,
    };
    let run = Duration::from_secs(5);
    let first = worker(&url, (&config, &gate), "first", slow, &calls, quick(3), run);
    std::thread::sleep(Duration::from_millis(300));
    let second = worker(
        &url,
        (&config, &gate),
        "second",
        slow,
        &calls,
        quick(3),
        run,
    );
    first.join().unwrap();
    second.join().unwrap();
    let handled = calls_of(&calls, "blocking");
    assert_eq!(handled.len(), 1, "handled once: {handled:?}");
}

#[test]
fn a_copy_waits_while_a_slow_handler_holds_the_claim() {
    let Some(url) = redis_url("a_copy_waits_while_a_slow_handler_holds_the_claim") else {
        return;
    };
    let lease = Duration::from_millis(300);
    let (config, gate) = settings("renewal", lease);
    let calls = Calls::default();
    let slow = move |_: &str| Behaviour {
        takes: lease * 8,
        ..FAST
    };
    let run = lease * 12;
    store(&url, &config, &["twice"]);
    let first = worker(&url, (&config, &gate), "first", slow, &calls, quick(3), run);
    std::thread::sleep(Duration::from_millis(200));
    // A Comapi retry while the first copy is being handled: the same eventId
    // stored again, as another entry, which the other worker reads.
    store(&url, &config, &["twice"]);
    let second = worker(
        &url,
        (&config, &gate),
        "second",
        slow,
        &calls,
        quick(3),
        run,
    );
    first.join().unwrap();
    second.join().unwrap();
    let handled = calls_of(&calls, "twice");
    assert_eq!(
        handled.len(),
        1,
        "the copy is busy, then a duplicate: {handled:?}"
    );
}

#[test]
fn a_copy_waiting_for_a_busy_claim_is_not_taken_over() {
    let Some(url) = redis_url("a_copy_waiting_for_a_busy_claim_is_not_taken_over") else {
        return;
    };
    let lease = Duration::from_millis(300);
    let (config, _) = settings("busy", lease);
    // A crashed worker's claim on the event, under another delivery: it holds for
    // two seconds, much longer than the stream's lease.
    let gate = RedisGateConfig::default()
        .with_key_prefix(&config.key_prefix)
        .with_lease(Duration::from_secs(2));
    runtime().block_on(async {
        let crashed = RedisGate::connect(&url, gate.clone()).await.unwrap();
        let event = support::event("busy", "message.sent", None, None);
        let claimed = crashed.claim(&event, "crashed-delivery").await.unwrap();
        assert!(claimed.is_fresh());
    });
    store(&url, &config, &["busy"]);
    let calls = Calls::default();
    let run = Duration::from_secs(5);
    let slow = |_: &str| Behaviour {
        takes: Duration::from_secs(1),
        ..FAST
    };
    let first = worker(&url, (&config, &gate), "first", slow, &calls, quick(3), run);
    std::thread::sleep(Duration::from_millis(100));
    let second = worker(
        &url,
        (&config, &gate),
        "second",
        slow,
        &calls,
        quick(3),
        run,
    );
    first.join().unwrap();
    second.join().unwrap();
    let handled = calls_of(&calls, "busy");
    assert_eq!(
        handled.len(),
        1,
        "handled once the claim expired: {handled:?}"
    );
}

#[test]
fn a_dead_letter_awaiting_its_acknowledgement_is_not_taken_over() {
    let Some(url) = redis_url("a_dead_letter_awaiting_its_acknowledgement_is_not_taken_over")
    else {
        return;
    };
    let lease = Duration::from_millis(300);
    let (config, gate) = settings("dead-kept", lease);
    store(&url, &config, &["fails", "slow"]);
    let calls = Calls::default();
    let behaviour = move |id: &str| match id {
        "fails" => Behaviour {
            fails: true,
            ..FAST
        },
        _ => Behaviour {
            takes: lease * 5,
            ..FAST
        },
    };
    let run = lease * 9;
    let first = worker(
        &url,
        (&config, &gate),
        "first",
        behaviour,
        &calls,
        quick(2),
        run,
    );
    std::thread::sleep(Duration::from_millis(100));
    let second = worker(
        &url,
        (&config, &gate),
        "second",
        behaviour,
        &calls,
        quick(2),
        run,
    );
    first.join().unwrap();
    second.join().unwrap();
    let attempts = calls_of(&calls, "fails");
    assert_eq!(
        attempts.len(),
        2,
        "two attempts, as the policy allows: {attempts:?}"
    );
    let dead: u64 = runtime().block_on(async {
        let mut conn = redis_connection(&url).await;
        redis::cmd("XLEN")
            .arg(config.dead_key())
            .query_async(&mut conn)
            .await
            .unwrap()
    });
    assert_eq!(dead, 1, "dead-lettered once");
    assert_eq!(calls_of(&calls, "slow").len(), 1);
}

#[test]
fn entries_handed_back_on_stop_do_not_count_as_attempts() {
    let Some(url) = redis_url("entries_handed_back_on_stop_do_not_count_as_attempts") else {
        return;
    };
    let lease = Duration::from_millis(300);
    let (config, gate) = settings("handed-back", lease);
    store(&url, &config, &["handed-back"]);
    runtime().block_on(async {
        // Three workers in a row read the entry and stop before starting it.
        for round in 0..3 {
            let name = format!("stopped-{round}");
            let mut consumer = StreamConsumer::connect(&url, config.clone(), name)
                .await
                .unwrap();
            let batch = consumer.next_batch().await.unwrap().unwrap();
            assert_eq!(batch.len(), 1, "round {round}");
            assert_eq!(batch[0].times_delivered(), 1, "round {round}");
            consumer.flush().await.unwrap(); // hands it back
        }
    });
    // With two attempts allowed, the event is attempted, not dead-lettered.
    let calls = Calls::default();
    let run = Duration::from_secs(2);
    let last = worker(
        &url,
        (&config, &gate),
        "last",
        |_| FAST,
        &calls,
        quick(2),
        run,
    );
    last.join().unwrap();
    assert_eq!(calls_of(&calls, "handed-back").len(), 1);
}
