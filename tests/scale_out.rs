//! Scale-out on Redis with the real binaries: two receivers (hyper and actix) and
//! workers on one Redis stream, a worker killed with SIGKILL mid-stream; Redis
//! itself killed under load and restarted; SIGTERM on a worker.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig};
use comapi_webhook::{Inbox, SIGNATURE_HEADER, Verifier};
use process::{
    OwnRedis, Receiver, SECRET, client, event_json, metric, post_signed, processed_counts,
};
use support::{example_binary, redis_connection, redis_url, runtime, unique_prefix};

/// A receiver (`hyper_receiver`, `actix_receiver`) or `worker` on Redis at `url`,
/// keys under `prefix`, with a short lease so a killed worker's events are taken
/// over quickly.
fn start(name: &str, url: &str, prefix: &str) -> Receiver {
    let mut command = Command::new(example_binary(name));
    command
        .env("COMAPI_REDIS_URL", url)
        .env("COMAPI_REDIS_PREFIX", prefix)
        .env("COMAPI_LEASE", "2s")
        .env("METRICS_PORT", "0");
    Receiver::start_command(name, command, SECRET)
}

/// The group's pending entries and the dead stream's length.
async fn pending_and_dead(url: &str, prefix: &str) -> (u64, u64) {
    let config = RedisStreamConfig::default().with_key_prefix(prefix);
    let mut conn = redis_connection(url).await;
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(config.stream_key())
        .arg(&config.group)
        .query_async(&mut conn)
        .await
        .unwrap();
    let pending = match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let dead: u64 = redis::cmd("XLEN")
        .arg(config.dead_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    (pending, dead)
}

/// Every event id in the stream.
async fn stream_event_ids(url: &str, prefix: &str) -> HashSet<String> {
    let config = RedisStreamConfig::default().with_key_prefix(prefix);
    let mut conn = redis_connection(url).await;
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(config.stream_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .iter()
        .map(|(_, fields)| {
            let record: serde_json::Value = serde_json::from_str(&fields["record"]).unwrap();
            record["event"]["eventId"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn metrics_of(url: &str) -> String {
    let client = client();
    let response = client
        .get(format!("{url}/metrics").parse().unwrap())
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[test]
fn two_receivers_and_workers_lose_nothing_when_a_worker_is_killed() {
    let Some(url) = redis_url("two_receivers_and_workers_lose_nothing_when_a_worker_is_killed")
    else {
        return;
    };
    let prefix = unique_prefix("scale");
    let receivers = [
        start("hyper_receiver", &url, &prefix),
        start("actix_receiver", &url, &prefix),
    ];
    let mut first = start("worker", &url, &prefix);
    let second = start("worker", &url, &prefix);
    let urls: Vec<String> = receivers.iter().map(|r| format!("{}/", r.url)).collect();
    runtime().block_on(async {
        let client = client();
        let mut posting = tokio::task::JoinSet::new();
        for task in 0..16 {
            let (client, urls) = (client.clone(), urls.clone());
            posting.spawn(async move {
                let mut acked = Vec::new();
                for n in 0..125 {
                    let id = format!("so-{task}-{n}");
                    let url = &urls[(task + n) % 2];
                    let status = post_signed(&client, url, SECRET, event_json(&id)).await;
                    assert_eq!(status, Ok(200), "{id}");
                    acked.push(id);
                }
                acked
            });
        }
        // Mid-stream: the first worker dies with SIGKILL, a third one starts.
        let deadline = Instant::now() + Duration::from_secs(60);
        while first.processed().len() < 100 {
            assert!(
                Instant::now() < deadline,
                "the first worker processed nothing"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        first.signal("-KILL");
        first.wait(Duration::from_secs(5));
        let third = start("worker", &url, &prefix);
        let mut acked = HashSet::new();
        while let Some(ids) = posting.join_next().await {
            acked.extend(ids.unwrap());
        }
        assert_eq!(acked.len(), 2000);

        let logs = || {
            [&first, &second, &third]
                .iter()
                .map(|w| w.log.lock().unwrap().clone())
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let counts = processed_counts(&logs());
            let missing: Vec<&String> = acked
                .iter()
                .filter(|id| !counts.contains_key(*id))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never processed: {} e.g. {:?}",
                missing.len(),
                missing.first()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Exactly once, but for the events the killed worker had in hand: processed
        // by it, their claims not yet completed when it died. Each of those runs
        // once more, on a surviving worker, and never twice there.
        let counts = processed_counts(&logs());
        let by_first = processed_counts(&logs()[..1]);
        let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
        for (id, n) in &twice {
            assert_eq!(**n, 2, "{id} processed {n} times");
            assert_eq!(
                by_first.get(*id),
                Some(&1),
                "{id} processed twice, not once by the killed worker"
            );
        }
        // (How many: the handlers running and those that finished while the
        // completing round trip was on the wire, 0 to about 30 here.)
        eprintln!("processed twice after the kill: {}", twice.len());
        assert_eq!(counts.len(), 2000, "nothing but what was sent");
        // Everything acknowledged: the killed worker's entries were taken over.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (pending, dead) = pending_and_dead(&url, &prefix).await;
            assert_eq!(dead, 0, "nothing dead-lettered");
            if pending == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{pending} entries still pending");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The killed worker's consumer, nothing pending and idle past the lease
        // (2 s), is removed from the group; the two alive stay.
        let config = RedisStreamConfig::default().with_key_prefix(&prefix);
        let mut conn = redis_connection(&url).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let consumers: Vec<redis::Value> = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(config.stream_key())
                .arg(&config.group)
                .query_async(&mut conn)
                .await
                .unwrap();
            if consumers.len() == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} consumers in the group: {consumers:?}",
                consumers.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The metrics agree with what was sent and processed.
        let mut answered = 0.0;
        let mut stored = 0.0;
        for receiver in &receivers {
            let text = metrics_of(&receiver.url).await;
            answered += metric(&text, "comapi_webhook_requests_total{status=\"200\"}").unwrap();
            stored += metric(&text, "comapi_webhook_events_stored_total").unwrap();
        }
        assert_eq!((answered, stored), (2000.0, 2000.0));
        eprintln!(
            "processed by the killed worker {}, the others {} and {}",
            processed_counts(&logs()[..1]).len(),
            processed_counts(&logs()[1..2]).len(),
            processed_counts(&logs()[2..]).len()
        );
        for worker in [&second, &third] {
            let text = metrics_of(&worker.url).await;
            let processed = processed_counts(&[worker.log.lock().unwrap().clone()])
                .values()
                .sum::<usize>();
            let success =
                metric(&text, "comapi_webhook_handler_total{outcome=\"success\"}").unwrap_or(0.0);
            assert_eq!(success, processed as f64);
            assert_eq!(metric(&text, "comapi_webhook_pending_events"), Some(0.0));
            // Only what a worker counts: no receiver counters stuck at 0.
            assert!(!text.contains("comapi_webhook_requests"), "{text}");
            assert!(!text.contains("comapi_webhook_events_stored"), "{text}");
        }
    });
}

#[test]
fn redis_killed_under_load_gets_503s_in_time_and_loses_nothing_answered_200() {
    const TEST: &str = "redis_killed_under_load_gets_503s_in_time_and_loses_nothing_answered_200";
    let Some(mut redis) = OwnRedis::start(TEST) else {
        return;
    };
    let url = redis.url();
    let prefix = "comapi-webhook:";
    let receivers = [
        start("hyper_receiver", &url, prefix),
        start("actix_receiver", &url, prefix),
    ];
    let urls: Vec<String> = receivers.iter().map(|r| format!("{}/", r.url)).collect();
    let down = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<(String, u16, Duration, bool)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime();
    let mut posting = Vec::new();
    for task in 0..8 {
        let (urls, down, answers, stop) = (
            urls.clone(),
            Arc::clone(&down),
            Arc::clone(&answers),
            Arc::clone(&stop),
        );
        posting.push(rt.spawn(async move {
            let client = client();
            for n in 0.. {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let id = format!("rk-{task}-{n}");
                let was_down = down.load(Ordering::Acquire);
                let started = Instant::now();
                let status = post_signed(&client, &urls[(task + n) % 2], SECRET, event_json(&id))
                    .await
                    .unwrap();
                answers
                    .lock()
                    .unwrap()
                    .push((id, status, started.elapsed(), was_down));
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    redis.kill();
    down.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_secs(2));
    redis.restart();
    let restarted = Instant::now();
    // The same receivers answer 200 again, without a restart.
    loop {
        let recovered = answers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, status, _, was_down)| *was_down && *status == 200)
            .count();
        if recovered >= 16 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "no 200 after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Release);
    rt.block_on(async {
        for task in posting {
            task.await.unwrap();
        }
    });
    let answers = answers.lock().unwrap().clone();
    let refused = answers.iter().filter(|a| a.1 == 503).count();
    assert!(refused > 0, "Redis was down for 2 s: some answers are 503");
    for (id, status, took, _) in &answers {
        assert!(matches!(status, 200 | 503), "{id}: {status}");
        assert!(
            *took < Duration::from_secs(6),
            "{id}: {status} after {took:?}"
        );
    }
    // Nothing answered 200 is missing after the restart (AOF, fsynced before each reply).
    let stored = rt.block_on(stream_event_ids(&url, prefix));
    let missing: Vec<&String> = answers
        .iter()
        .filter(|a| a.1 == 200 && !stored.contains(&a.0))
        .map(|a| &a.0)
        .collect();
    assert!(missing.is_empty(), "answered 200 but lost: {missing:?}");
    let ok_before = answers.iter().filter(|a| a.1 == 200 && !a.3).count();
    eprintln!(
        "{} answers: {ok_before} 200 before the kill, {refused} 503, the slowest {:?}",
        answers.len(),
        answers.iter().map(|a| a.2).max()
    );
    assert!(ok_before > 10, "the load ran before the kill: {ok_before}");
}

#[test]
fn sigterm_on_a_worker_finishes_its_event_acknowledges_and_exits_0() {
    let Some(url) = redis_url("sigterm_on_a_worker_finishes_its_event_acknowledges_and_exits_0")
    else {
        return;
    };
    let prefix = unique_prefix("sigterm");
    let rt = runtime();
    rt.block_on(async {
        let config = RedisStreamConfig::default().with_key_prefix(&prefix);
        let stream = RedisStream::connect(&url, config).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), stream);
        for batch in 0..20 {
            let events: Vec<String> = (0..100)
                .map(|n| event_json(&format!("st-{batch}-{n}")))
                .collect();
            let body = format!("[{}]", events.join(","));
            let mut headers = http::HeaderMap::new();
            let signature = Verifier::new(SECRET)
                .unwrap()
                .sign(body.as_bytes())
                .to_string();
            headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
            assert_eq!(inbox.receive(&headers, body.as_bytes()).await.status(), 200);
        }
    });
    let mut worker = start("worker", &url, &prefix);
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.processed().len() < 20 {
        assert!(Instant::now() < deadline, "the worker processed nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    worker.signal("-TERM");
    let status = worker.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", worker.log.lock().unwrap());
    let log = worker.log.lock().unwrap().clone();
    assert!(log.contains("worker stopped"), "{log}");
    let processed = processed_counts(&[log]);
    // Whatever it processed is acknowledged: none of its pending entries is one of them.
    let config = RedisStreamConfig::default().with_key_prefix(&prefix);
    let pending_events: Vec<String> = rt.block_on(async {
        let mut conn = redis_connection(&url).await;
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(config.stream_key())
            .arg(&config.group)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut ids = Vec::new();
        for (entry, _, idle, _) in pending {
            assert!(
                idle >= 2000,
                "{entry} handed back: idle for a whole lease, not {idle} ms"
            );
            let found: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
                .arg(config.stream_key())
                .arg(&entry)
                .arg(&entry)
                .query_async(&mut conn)
                .await
                .unwrap();
            let record: serde_json::Value = serde_json::from_str(&found[0].1["record"]).unwrap();
            ids.push(record["event"]["eventId"].as_str().unwrap().to_owned());
        }
        ids
    });
    let acked_not: Vec<&String> = pending_events
        .iter()
        .filter(|id| processed.contains_key(*id))
        .collect();
    assert!(
        acked_not.is_empty(),
        "processed but not acknowledged: {acked_not:?}"
    );
    eprintln!(
        "processed {} before SIGTERM took effect; {} read and handed back to the next worker",
        processed.len(),
        pending_events.len()
    );
}

#[test]
fn a_redis_url_without_the_password_exits_2_naming_the_variable() {
    let test = "a_redis_url_without_the_password_exits_2_naming_the_variable";
    let Some(redis) = OwnRedis::start(test) else {
        return;
    };
    runtime().block_on(redis.config_set("requirepass", "the-password"));
    for name in ["worker", "hyper_receiver", "actix_receiver"] {
        let mut child = Command::new(example_binary(name))
            .env("COMAPI_REDIS_URL", redis.url())
            .env("COMAPI_WEBHOOK_SECRET", SECRET)
            .env("PORT", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name} kept running without the Redis password");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{name}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{name}: {stderr}");
        assert!(errors[0].contains("COMAPI_REDIS_URL"), "{name}: {stderr}");
        assert!(errors[0].contains("NOAUTH"), "{name}: {stderr}");
    }
}
