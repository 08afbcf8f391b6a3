//! The Redis stream backend on a real Redis: the receive step stores into the
//! stream, workers on a consumer group process each event once, take over what a
//! dropped consumer held, dead-letter and requeue, trim only what was
//! acknowledged, and a store that gets no answer gives up at its deadline (a TCP
//! proxy of the test's own stalls the connection) and recovers after.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::gate::{RedisGate, RedisGateConfig};
use comapi_webhook::store::redis_stream::{
    Durability, RedisStream, RedisStreamConfig, StreamConsumer, StreamConsumers,
};
use comapi_webhook::store::{Delivery, EventSource, EventStore};
use comapi_webhook::worker::{RetryPolicy, run_worker};
use comapi_webhook::{Event, Inbox, Verifier};
use support::{SECRET, post, recorder, redis_connection, redis_url, runtime, unique_prefix};

fn config(prefix: &str) -> RedisStreamConfig {
    RedisStreamConfig::default().with_key_prefix(prefix)
}

async fn gate(url: &str, prefix: &str) -> RedisGate {
    RedisGate::connect(url, RedisGateConfig::default().with_key_prefix(prefix))
        .await
        .unwrap()
}

/// The length of the stream at `key`.
async fn xlen(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

/// Runs a worker named `name` until it handled `expected` events; returns them.
async fn drain(
    url: &str,
    prefix: &str,
    gate: &RedisGate,
    name: &str,
    expected: usize,
) -> Vec<String> {
    let seen = Mutex::new(Vec::new());
    let consumer = StreamConsumer::connect(url, config(prefix), name)
        .await
        .unwrap();
    process_until(consumer, gate, &seen, expected).await;
    seen.into_inner().unwrap()
}

/// Runs a worker on `consumer` until `expected` events were handled, then stops it.
async fn process_until(
    consumer: StreamConsumer,
    gate: &RedisGate,
    seen: &Mutex<Vec<String>>,
    expected: usize,
) {
    let stop = consumer.stop_handle();
    let retry = RetryPolicy::default();
    support::process_until(consumer, move || stop.stop(), gate, seen, expected, retry).await;
}

#[test]
fn stored_events_are_processed_once_acknowledged_and_trimmed() {
    let Some(url) = redis_url("stored_events_are_processed_once_acknowledged_and_trimmed") else {
        return;
    };
    runtime().block_on(async {
        let prefix = unique_prefix("stream");
        let stream = RedisStream::connect(&url, config(&prefix)).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        assert_eq!(post(&inbox, &["a", "b"]).await, 200);
        assert_eq!(post(&inbox, &["c"]).await, 200);
        // A retried delivery: a second copy of "a".
        assert_eq!(post(&inbox, &["a"]).await, 200);
        let status = stream.status().await;
        assert_eq!((status.stored, status.backlog), (Some(4), Some(4)));
        assert!(
            inbox
                .status_page()
                .await
                .body()
                .contains("the Redis stream")
        );

        let gate = gate(&url, &prefix).await;
        let seen = drain(&url, &prefix, &gate, "w1", 3).await;
        assert_eq!(seen, ["a", "b", "c"], "the copy is a duplicate");
        let status = stream.status().await;
        assert_eq!(
            (status.backlog, status.pending, status.dead_letters),
            (Some(0), Some(0), Some(0))
        );
        // A second group that has read nothing keeps every entry from being trimmed.
        let mut conn = redis_connection(&url).await;
        let key = config(&prefix).stream_key();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("audit")
            .arg("0")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(post(&inbox, &["d"]).await, 200);
        drain(&url, &prefix, &gate, "w2", 1).await;
        assert_eq!(
            xlen(&mut conn, &key).await,
            5,
            "nothing trimmed that the audit group has not read"
        );
        // Once it has read and acknowledged everything, a trim leaves at most the last entry.
        let _: () = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&key)
            .arg("audit")
            .query_async(&mut conn)
            .await
            .map(|_: i64| ())
            .unwrap();
        assert_eq!(post(&inbox, &["e"]).await, 200);
        drain(&url, &prefix, &gate, "w3", 1).await;
        let length = xlen(&mut conn, &key).await;
        assert!(length <= 2, "acknowledged entries trimmed, {length} left");
    });
}

#[test]
fn a_dropped_consumers_entries_are_taken_over_after_the_lease() {
    let Some(url) = redis_url("a_dropped_consumers_entries_are_taken_over_after_the_lease") else {
        return;
    };
    runtime().block_on(async {
        let prefix = unique_prefix("takeover");
        let config = config(&prefix).with_lease(Duration::from_millis(300));
        let stream = RedisStream::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        assert_eq!(post(&inbox, &["x", "y"]).await, 200);
        // The first consumer reads both and crashes before finishing either.
        let mut crashed = StreamConsumer::connect(&url, config.clone(), "crashed")
            .await
            .unwrap();
        let read = crashed.next_batch().await.unwrap().unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].times_delivered(), 1);
        drop(crashed);
        assert_eq!(stream.status().await.pending, Some(2));

        let mut heir = StreamConsumer::connect(&url, config.clone(), "heir")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let taken = heir.next_batch().await.unwrap().unwrap();
        let ids: Vec<String> = taken
            .iter()
            .map(|d| d.event().unwrap().event_id().to_owned())
            .collect();
        assert_eq!(ids, ["x", "y"]);
        assert!(taken.iter().all(|d| d.times_delivered() == 2));
        assert_eq!(
            taken[0].id(),
            read[0].id(),
            "the same entry, the same delivery"
        );
        for delivery in &taken {
            heir.finished(delivery).await.unwrap();
        }
        heir.flush().await.unwrap();
        assert_eq!(stream.status().await.pending, Some(0));
    });
}

#[test]
fn failures_go_to_the_dead_stream_and_requeue_brings_them_back() {
    let Some(url) = redis_url("failures_go_to_the_dead_stream_and_requeue_brings_them_back") else {
        return;
    };
    runtime().block_on(async {
        let prefix = unique_prefix("dead");
        let config = config(&prefix).with_lease(Duration::from_millis(200));
        let stream = RedisStream::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        assert_eq!(post(&inbox, &["bad", "good"]).await, 200);
        // A record that is not an event, written by someone else.
        let mut conn = redis_connection(&url).await;
        let _: String = redis::cmd("XADD")
            .arg(config.stream_key())
            .arg("*")
            .arg("record")
            .arg("not json")
            .query_async(&mut conn)
            .await
            .unwrap();
        let gate = gate(&url, &prefix).await;
        let seen = Mutex::new(Vec::new());
        let failing = |event: Event<'static>| {
            let fails = event.event_id() == "bad";
            seen.lock().unwrap().push(event.event_id().to_owned());
            async move {
                if fails {
                    Err(std::io::Error::other("the database is down"))
                } else {
                    Ok(())
                }
            }
        };
        let consumer = StreamConsumer::connect(&url, config.clone(), "w")
            .await
            .unwrap();
        let stop = consumer.stop_handle();
        let quick = RetryPolicy::new(Duration::from_millis(5), Duration::from_millis(5), 2);
        let worker = run_worker(consumer, &gate, failing, support::worker_config(quick));
        let watch = async {
            while stream.status().await.dead_letters != Some(2) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.stop();
        };
        let (done, ()) = tokio::join!(worker, watch);
        done.unwrap();
        // Two attempts at "bad"; "good", another entity, never waited for its retry.
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, ["bad", "bad", "good"]);
        let dead: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(config.dead_key())
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        // The damaged record is set aside as it is read; "bad" after its last attempt.
        assert_eq!(dead.len(), 2, "{dead:?}");
        let failed = dead.iter().find(|(_, f)| f["attempts"] == "2").unwrap();
        assert_eq!(failed.1["error"], "the database is down");
        assert!(
            dead.iter()
                .any(|(_, f)| f["error"].contains("corrupt record")),
            "{dead:?}"
        );
        assert_eq!(
            stream.status().await.pending,
            Some(0),
            "dead letters are acknowledged"
        );

        // An entry this crate did not write (no `record`) is set aside, never dropped.
        let _: String = redis::cmd("XADD")
            .arg(config.dead_key())
            .arg("*")
            .arg("note")
            .arg("written by hand")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(stream.requeue_dead_letters().await.unwrap(), 2);
        assert_eq!(stream.status().await.dead_letters, Some(0));
        let aside: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(format!("{}:unreadable", config.dead_key()))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(aside.len(), 1);
        assert_eq!(aside[0].1["note"], "written by hand");
        let seen = Mutex::new(Vec::new());
        let consumer = StreamConsumer::connect(&url, config.clone(), "w")
            .await
            .unwrap();
        process_until(consumer, &gate, &seen, 1).await;
        assert_eq!(
            *seen.lock().unwrap(),
            ["bad"],
            "the requeued event is fresh again"
        );
    });
}

#[test]
fn a_copy_handed_out_twenty_times_unfinished_goes_to_the_dead_letter() {
    let Some(url) = redis_url("a_copy_handed_out_twenty_times_unfinished") else {
        return;
    };
    runtime().block_on(async {
        let prefix = unique_prefix("poison");
        let config = config(&prefix).with_lease(Duration::from_millis(100));
        let stream = RedisStream::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        assert_eq!(post(&inbox, &["poison"]).await, 200);
        // Twenty workers crash holding it (the backstop is twice the attempts, and
        // at least 20): it is now handed out a 21st time.
        for n in 0..20 {
            let name = format!("c{n}");
            let mut crashed = StreamConsumer::connect(&url, config.clone(), name)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(crashed.next_batch().await.unwrap().unwrap().len(), 1);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let gate = gate(&url, &prefix).await;
        let seen = Mutex::new(Vec::new());
        let consumer = StreamConsumer::connect(&url, config.clone(), "w")
            .await
            .unwrap();
        let stop = consumer.stop_handle();
        let worker = run_worker(
            consumer,
            &gate,
            recorder(&seen),
            support::worker_config(RetryPolicy::new(Duration::ZERO, Duration::ZERO, 2)),
        );
        let watch = async {
            let deadline = Instant::now() + Duration::from_secs(20);
            while stream.status().await.dead_letters != Some(1) {
                assert!(Instant::now() < deadline, "never dead-lettered");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.stop();
        };
        let (done, ()) = tokio::join!(worker, watch);
        done.unwrap();
        assert!(seen.lock().unwrap().is_empty(), "not attempted again");
    });
}

/// Redis behind a proxy that holds every byte while stalled: the store answers at
/// its deadline, then works again once the stall ends.
#[test]
fn a_store_without_an_answer_gives_up_at_its_deadline_and_recovers() {
    let Some(url) = redis_url("a_store_without_an_answer_gives_up_at_its_deadline") else {
        return;
    };
    runtime().block_on(async {
        let target = url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let stalled = Arc::new(AtomicBool::new(false));
        let proxied = format!(
            "redis://{}/",
            support::stalling_proxy(target, Arc::clone(&stalled)).await
        );
        let prefix = unique_prefix("deadline");
        let deadline = Duration::from_millis(500);
        let config = config(&prefix).with_deadline(deadline);
        let stream = RedisStream::connect(&proxied, config).await.unwrap();
        assert!(
            matches!(
                stream.durability(),
                Durability::Always | Durability::Weaker { .. }
            ),
            "{:?}",
            stream.durability()
        );
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        assert_eq!(post(&inbox, &["before"]).await, 200);

        stalled.store(true, Ordering::Release);
        let started = Instant::now();
        assert_eq!(post(&inbox, &["stalled"]).await, 503);
        let took = started.elapsed();
        assert!(
            took >= deadline && took < deadline + Duration::from_millis(500),
            "{took:?}"
        );
        assert!(stream.status().await.error.is_some());

        stalled.store(false, Ordering::Release);
        let started = Instant::now();
        loop {
            if post(&inbox, &["after"]).await == 200 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Not a 200, but it may still have been stored: Comapi's retry is a copy the gate tells apart.
        let stored = stream.status().await.stored.unwrap();
        assert!((2..=3).contains(&stored), "{stored}");
    });
}

#[test]
fn a_store_waiting_for_replicas_that_are_not_there_never_answers_200() {
    let Some(url) = redis_url("a_store_waiting_for_replicas_that_are_not_there") else {
        return;
    };
    runtime().block_on(async {
        let prefix = unique_prefix("replicas");
        let deadline = Duration::from_millis(300);
        let config = config(&prefix).with_deadline(deadline).with_replicas(1);
        let stream = RedisStream::connect(&url, config).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        let started = Instant::now();
        assert_eq!(
            post(&inbox, &["unreplicated"]).await,
            503,
            "the test Redis has no replica"
        );
        assert!(started.elapsed() < deadline + Duration::from_millis(500));
        // Without the replica requirement the same Redis stores at once.
        let plain = RedisStream::connect(&url, self::config(&prefix))
            .await
            .unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), plain);
        assert_eq!(post(&inbox, &["replicated-enough"]).await, 200);
    });
}

#[test]
fn an_event_worked_on_longer_than_the_lease_is_not_taken_over() {
    let Some(url) = redis_url("an_event_worked_on_longer_than_the_lease_is_not_taken_over") else {
        return;
    };
    runtime().block_on(async {
        let prefix = unique_prefix("keepalive");
        let lease = Duration::from_millis(300);
        let config = config(&prefix).with_lease(lease);
        let stream = RedisStream::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream);
        assert_eq!(post(&inbox, &["slow", "after"]).await, 200);
        let gate_config = RedisGateConfig::default()
            .with_key_prefix(&prefix)
            .with_lease(lease);
        let gate = RedisGate::connect(&url, gate_config).await.unwrap();
        let attempts = Mutex::new(Vec::new());
        // Four leases on one event: without keep-alives the other worker would take
        // it over, claim it with the same delivery and process it alongside.
        let handler = |worker: &'static str| {
            let attempts = &attempts;
            move |event: Event<'static>| async move {
                attempts
                    .lock()
                    .unwrap()
                    .push((worker, event.event_id().to_owned()));
                if event.event_id() == "slow" {
                    tokio::time::sleep(lease * 4).await;
                }
                Ok::<(), std::io::Error>(())
            }
        };
        let first = StreamConsumer::connect(&url, config.clone(), "first")
            .await
            .unwrap();
        let second = StreamConsumer::connect(&url, config.clone(), "second")
            .await
            .unwrap();
        let stops = [first.stop_handle(), second.stop_handle()];
        let retry = RetryPolicy::default();
        let watch = async {
            while attempts.lock().unwrap().len() < 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Give a take-over every chance to happen.
            tokio::time::sleep(lease * 3).await;
            stops.iter().for_each(|stop| stop.stop());
        };
        let (a, b, ()) = tokio::join!(
            run_worker(
                first,
                &gate,
                handler("first"),
                support::worker_config(retry)
            ),
            run_worker(
                second,
                &gate,
                handler("second"),
                support::worker_config(retry)
            ),
            watch
        );
        a.unwrap();
        b.unwrap();
        let attempts = attempts.into_inner().unwrap();
        let slow = attempts.iter().filter(|(_, id)| id == "slow").count();
        assert_eq!(slow, 1, "processed once: {attempts:?}");
        assert_eq!(attempts.len(), 2, "{attempts:?}");
    });
}

#[test]
fn consumers_are_named_after_the_os_host_name_without_hostname_exported() {
    if std::env::var_os("DYNO").is_some() {
        return; // named after the dyno
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let consumers = StreamConsumers::new("redis://127.0.0.1:1/", RedisStreamConfig::default());
    assert!(
        consumers.name().starts_with(&format!("{}-", host.trim())),
        "{} is not named after {host:?}",
        consumers.name()
    );
}
