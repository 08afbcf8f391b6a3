//! The concurrent worker on real stores: up to `concurrency` handlers in flight,
//! never two events of one entity at once nor a lower revision after a higher one,
//! every entity's last revision processed; a failing entity holds only itself,
//! and the spool's offset never passes it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use comapi_webhook::store::spool::{RETRY_FILE, Spool, SpoolConfig};
use comapi_webhook::worker::{RetryPolicy, WorkerConfig, run_worker};
use comapi_webhook::{Event, Gate};
use support::{runtime, spool_line, temp_dir};

const ENTITIES: usize = 50;
const REVISIONS: u64 = 20;

/// Every (entity, revision) as an event, shuffled by a fixed seed.
fn shuffled_events() -> Vec<String> {
    let mut events: Vec<(usize, u64)> = (0..ENTITIES)
        .flat_map(|e| (1..=REVISIONS).map(move |r| (e, r)))
        .collect();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..events.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        events.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    events
        .into_iter()
        .map(|(entity, revision)| {
            format!(
                r#"{{"eventId":"e-{entity}-{revision}","name":"message.delivered","payload":{{"id":"m-{entity}"}},"revision":{revision},"timestamp":"{}"}}"#,
                support::now_rfc3339()
            )
        })
        .collect()
}

/// What the handler saw: per entity, the revisions in order, and any overlap. One
/// event in ten fails its first attempt (every tenth of the shuffled order), so the
/// order holds across retries too: a later revision may overtake an event waiting
/// for its retry, which then comes back stale and is skipped.
#[derive(Default)]
struct Order {
    /// Events whose first attempt fails, and those that failed it.
    fail_first: HashSet<String>,
    failed: Mutex<HashSet<String>>,
    running: Mutex<HashSet<String>>,
    seen: Mutex<HashMap<String, Vec<u64>>>,
    overlaps: Mutex<Vec<String>>,
    most_at_once: Mutex<(usize, usize)>,
}

impl Order {
    fn failing_one_in_ten(events: &[String]) -> Order {
        let fail_first = events
            .iter()
            .step_by(10)
            .map(|event| {
                let value: serde_json::Value = serde_json::from_str(event).unwrap();
                value["eventId"].as_str().unwrap().to_owned()
            })
            .collect();
        Order {
            fail_first,
            ..Order::default()
        }
    }

    async fn handle(&self, event: Event<'static>) -> Result<(), std::io::Error> {
        let entity = event.entity_id().unwrap().to_owned();
        {
            let mut running = self.running.lock().unwrap();
            if !running.insert(entity.clone()) {
                self.overlaps.lock().unwrap().push(entity.clone());
            }
            let mut most = self.most_at_once.lock().unwrap();
            most.0 = running.len();
            most.1 = most.1.max(running.len());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let id = event.event_id();
        if self.fail_first.contains(id) && self.failed.lock().unwrap().insert(id.to_owned()) {
            self.running.lock().unwrap().remove(&entity);
            return Err(std::io::Error::other("the first attempt fails"));
        }
        self.seen
            .lock()
            .unwrap()
            .entry(entity.clone())
            .or_default()
            .push(event.revision().unwrap());
        self.running.lock().unwrap().remove(&entity);
        Ok(())
    }

    fn check(&self) {
        assert!(
            self.overlaps.lock().unwrap().is_empty(),
            "two events of one entity at once"
        );
        let seen = self.seen.lock().unwrap();
        assert_eq!(seen.len(), ENTITIES, "every entity processed");
        for (entity, revisions) in seen.iter() {
            assert!(
                revisions.windows(2).all(|w| w[0] < w[1]),
                "{entity}: a lower revision after a higher one: {revisions:?}"
            );
            assert_eq!(
                revisions.last(),
                Some(&REVISIONS),
                "{entity}: {revisions:?}"
            );
        }
        let most = self.most_at_once.lock().unwrap().1;
        assert!(most > 1, "never more than one handler at once");
        let failed = self.failed.lock().unwrap().len();
        assert!(failed >= 10, "only {failed} first attempts failed");
        eprintln!("at most {most} handlers at once; {failed} first attempts failed");
    }
}

/// Sixteen in flight, retries after 20 ms doubling to 100 ms.
fn sixteen() -> WorkerConfig {
    let retry = RetryPolicy::new(Duration::from_millis(20), Duration::from_millis(100), 5);
    WorkerConfig::from(retry).with_concurrency(16)
}

#[test]
fn the_spool_worker_keeps_each_entitys_order_with_sixteen_in_flight_and_failures() {
    let dir = temp_dir("order-spool");
    let events = shuffled_events();
    let order = Order::failing_one_in_ten(&events);
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        for batch in events.chunks(37) {
            let lines: Vec<u8> = batch.iter().flat_map(|e| spool_line(e)).collect();
            spool.append(lines, batch.len() as u64).await.unwrap();
        }
        spool.close().await;
        let handler = |event| order.handle(event);
        run_worker(
            spool.reader().unwrap(),
            &Gate::in_memory(),
            handler,
            sixteen(),
        )
        .await
        .unwrap();
        assert_eq!(spool.backlog(), 0);
    });
    order.check();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failing_event_holds_nothing_and_waits_in_the_retry_schedule() {
    let dir = temp_dir("stuck-entity");
    let stuck = spool_line(&format!(
        r#"{{"eventId":"stuck","name":"message.sent","payload":{{"id":"m-stuck"}},"timestamp":"{}"}}"#,
        support::now_rfc3339()
    ));
    let others: Vec<Vec<u8>> = (0..500)
        .map(|n| {
            spool_line(&format!(
                r#"{{"eventId":"o-{n}","name":"message.sent","payload":{{"id":"m-{n}"}},"timestamp":"{}"}}"#,
                support::now_rfc3339()
            ))
        })
        .collect();
    let processed = Mutex::new(Vec::new());
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.append(stuck.clone(), 1).await.unwrap();
        spool.append(others.concat(), 500).await.unwrap();
        let handler = |event: Event<'static>| {
            let failing = event.event_id() == "stuck";
            if !failing {
                processed.lock().unwrap().push(event.event_id().to_owned());
            }
            async move {
                if failing {
                    Err(std::io::Error::other("the database is down"))
                } else {
                    Ok(())
                }
            }
        };
        let retry = RetryPolicy::new(Duration::from_millis(200), Duration::from_millis(200), 1000);
        let gate = Gate::in_memory();
        let worker = run_worker(spool.reader().unwrap(), &gate, handler, retry);
        let started = Instant::now();
        let watch = async {
            // Acknowledged within about a second of being processed.
            while processed.lock().unwrap().len() < 500 || spool.backlog() > 0 {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the others waited for the failing entity"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = worker => panic!("the worker gave up on the failing entity"),
            () = watch => {}
        }
        // The line moved on past the failing event: it waits in the retry schedule,
        // with its attempts and its error.
        assert_eq!(
            spool.backlog(),
            0,
            "the offset waited for the failing event"
        );
        assert_eq!(spool.retries(), 1);
    });
    let schedule = std::fs::read_to_string(dir.join(RETRY_FILE)).unwrap_or_default();
    let waiting: Vec<serde_json::Value> = schedule
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|entry: &serde_json::Value| entry.get("retry").is_some())
        .collect();
    let last = waiting
        .last()
        .expect("the failing event in the retry schedule");
    assert_eq!(last["record"]["event"]["eventId"], "stuck");
    assert_eq!(last["error"], "the database is down");
    assert!(last["attempts"].as_u64().unwrap_or(0) >= 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "redis")]
#[test]
fn the_stream_worker_keeps_each_entitys_order_with_sixteen_in_flight_and_failures() {
    use comapi_webhook::gate::{RedisGate, RedisGateConfig};
    use comapi_webhook::store::EventStore;
    use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig, StreamConsumer};
    use comapi_webhook::{Inbox, SIGNATURE_HEADER, Verifier};

    let Some(url) = support::redis_url("the_stream_worker_keeps_each_entitys_order_with_failures")
    else {
        return;
    };
    const SECRET: &str = "a-comapi-webhook-secret-of-36-chars!";
    let prefix = support::unique_prefix("order-stream");
    let config = RedisStreamConfig::default().with_key_prefix(&prefix);
    let events = shuffled_events();
    let order = Order::failing_one_in_ten(&events);
    runtime().block_on(async {
        let stream = RedisStream::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream.clone());
        let verifier = Verifier::new(SECRET).unwrap();
        for batch in events.chunks(37) {
            let body = format!("[{}]", batch.join(","));
            let mut headers = http::HeaderMap::new();
            let signature = verifier.sign(body.as_bytes()).to_string();
            headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
            assert_eq!(inbox.receive(&headers, body.as_bytes()).await.status(), 200);
        }
        let gate = RedisGate::connect(&url, RedisGateConfig::default().with_key_prefix(&prefix))
            .await
            .unwrap();
        let consumer = StreamConsumer::connect(&url, config, "w").await.unwrap();
        let stop = consumer.stop_handle();
        let handler = |event| order.handle(event);
        let worker = run_worker(consumer, &gate, handler, sixteen());
        let watch = async {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let status = stream.status().await;
                if status.backlog == Some(0) && status.retries == Some(0) {
                    break;
                }
                assert!(Instant::now() < deadline, "not drained: {status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stop.stop();
        };
        let (done, ()) = tokio::join!(worker, watch);
        done.unwrap();
    });
    order.check();
}

/// SIGKILL a `drain work` process with sixteen handlers in flight on a Redis
/// stream: another worker processes everything unfinished, and nothing it had
/// finished comes again beyond the events in flight.
#[cfg(feature = "redis")]
#[test]
fn a_worker_killed_with_sixteen_in_flight_loses_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig};
    use comapi_webhook::{Inbox, SIGNATURE_HEADER, Verifier};

    let test = "a_worker_killed_with_sixteen_in_flight_loses_nothing";
    let Some(url) = support::redis_url(test) else {
        return;
    };
    const SECRET: &str = "a-comapi-webhook-secret-of-36-chars!";
    const EVENTS: usize = 200;
    let prefix = support::unique_prefix("killed");
    let ids: Vec<String> = (0..EVENTS).map(|n| format!("k-{n}")).collect();
    runtime().block_on(async {
        let config = RedisStreamConfig::default().with_key_prefix(&prefix);
        let stream = RedisStream::connect(&url, config).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream);
        for batch in ids.chunks(50) {
            let events: Vec<String> = batch
                .iter()
                .map(|id| {
                    format!(
                        r#"{{"eventId":"{id}","name":"message.sent","payload":{{"id":"m-{id}"}},"timestamp":"{}"}}"#,
                        support::now_rfc3339()
                    )
                })
                .collect();
            let body = format!("[{}]", events.join(","));
            let mut headers = http::HeaderMap::new();
            let signature = Verifier::new(SECRET).unwrap().sign(body.as_bytes());
            headers.insert(SIGNATURE_HEADER, signature.to_string().parse().unwrap());
            assert_eq!(inbox.receive(&headers, body.as_bytes()).await.status(), 200);
        }
    });
    // A worker process whose log lines are gathered as they come.
    let spawn = |handler_ms: &str| {
        let mut child = Command::new(support::example_binary("drain"))
            .args(["work", &EVENTS.to_string()])
            .env("COMAPI_WEBHOOK_SECRET", SECRET)
            .env("COMAPI_REDIS_URL", &url)
            .env("COMAPI_REDIS_PREFIX", &prefix)
            .env("COMAPI_LEASE", "1s")
            .env("COMAPI_CONCURRENCY", "16")
            .env("DRAIN_HANDLER_MS", handler_ms)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !line.contains("event processed") {
                    continue;
                }
                if let Some(id) = line.split("event_id=").nth(1) {
                    let id = id.split_whitespace().next().unwrap_or_default().to_owned();
                    sink.lock().unwrap().push(id);
                }
            }
        });
        (child, log)
    };
    let (mut first, first_log) = spawn("300");
    let deadline = Instant::now() + Duration::from_secs(30);
    while first_log.lock().unwrap().len() < 48 {
        assert!(
            Instant::now() < deadline,
            "the first worker processed too little"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    first.kill().unwrap(); // SIGKILL, with sixteen handlers in flight
    first.wait().unwrap();
    let before: HashSet<String> = first_log.lock().unwrap().iter().cloned().collect();
    let (mut second, second_log) = spawn("0");
    let status = second.wait().unwrap();
    assert!(status.success());
    let after: Vec<String> = second_log.lock().unwrap().clone();
    let all: HashSet<&String> = before.iter().chain(&after).collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !all.contains(id)).collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
    let again = after.iter().filter(|id| before.contains(*id)).count();
    eprintln!(
        "{} processed before the kill, {} after; {again} of them again",
        before.len(),
        after.len()
    );
    assert!(
        again <= 16,
        "{again} events finished before the kill came again"
    );
}
