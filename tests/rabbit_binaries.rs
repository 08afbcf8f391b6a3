//! RabbitMQ with the real binaries: two receivers (hyper and actix) and two workers
//! on one quorum queue process every acknowledged event once; a worker killed with
//! SIGKILL hands its deliveries to another; the broker killed with SIGKILL under
//! load and restarted on the same ports and folder: answers are 200 or 503 in time,
//! the same receivers store again, and every event answered 200 is processed; with
//! `COMAPI_GATE_REDIS_URL` two workers tell Comapi's retries apart however the
//! copies are shared out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
#[path = "support/rabbit.rs"]
mod rabbit;
mod support;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::store::EventStore;
use comapi_webhook::store::rabbitmq::{RabbitConfig, RabbitStore};
use process::{Receiver, SECRET, client, event_json, post_signed, processed_counts, status_page};
use rabbit::{OwnRabbit, amqp_management_url, amqp_url};
use support::{example_binary, runtime, unique_prefix};

/// A receiver or `worker` on the broker at `url`, storing into `queue`.
fn start(name: &str, url: &str, queue: &str) -> Receiver {
    start_with(name, url, queue, &[])
}

/// [`start`] with more settings.
fn start_with(name: &str, url: &str, queue: &str, settings: &[(&str, &str)]) -> Receiver {
    let mut command = Command::new(example_binary(name));
    command
        .env("COMAPI_AMQP_URL", url)
        .env("COMAPI_AMQP_QUEUE", queue)
        .env("METRICS_PORT", "0")
        .envs(settings.iter().copied());
    Receiver::start_command(name, command, SECRET)
}

fn queue_name(test: &str) -> String {
    unique_prefix(test).replace(':', ".")
}

/// POSTs `per_task` events from each of `tasks` tasks, round robin over `urls`;
/// every answer must be 200. Returns the ids.
async fn post_all(urls: &[String], tasks: usize, per_task: usize, tag: &str) -> HashSet<String> {
    let client = client();
    let mut posting = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let (client, urls, tag) = (client.clone(), urls.to_vec(), tag.to_owned());
        posting.spawn(async move {
            let mut acked = Vec::new();
            for n in 0..per_task {
                let id = format!("{tag}-{task}-{n}");
                let status = post_signed(
                    &client,
                    &urls[(task + n) % urls.len()],
                    SECRET,
                    event_json(&id),
                )
                .await;
                assert_eq!(status, Ok(200), "{id}");
                acked.push(id);
            }
            acked
        });
    }
    let mut acked = HashSet::new();
    while let Some(ids) = posting.join_next().await {
        acked.extend(ids.unwrap());
    }
    acked
}

/// Waits until every id in `acked` shows in the workers' logs.
fn wait_processed(workers: &[&Receiver], acked: &HashSet<String>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let logs: Vec<String> = workers
            .iter()
            .map(|w| w.log.lock().unwrap().clone())
            .collect();
        let counts = processed_counts(&logs);
        let missing = acked.iter().filter(|id| !counts.contains_key(*id)).count();
        if missing == 0 {
            return;
        }
        if Instant::now() >= deadline {
            for (n, log) in logs.iter().enumerate() {
                let (processed, other): (Vec<&str>, Vec<&str>) =
                    log.lines().partition(|l| l.contains("event processed"));
                eprintln!(
                    "worker {n} processed {}; its other lines:\n{}",
                    processed.len(),
                    other.join("\n")
                );
            }
            panic!("never processed: {missing}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the queue and its dead-letter queue are empty: every delivery was
/// acknowledged.
async fn wait_drained(url: &str, queue: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while backlog_and_dead(url, queue).await != (Some(0), Some(0)) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            backlog_and_dead(url, queue).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts the workers processed `expected` distinct events, each once, and both
/// took a share.
fn assert_each_once(workers: &[&Receiver; 2], expected: usize) {
    let logs: Vec<String> = workers
        .iter()
        .map(|w| w.log.lock().unwrap().clone())
        .collect();
    let counts = processed_counts(&logs);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "processed twice: {twice:?}");
    assert_eq!(counts.len(), expected, "nothing but what was sent");
    assert!(
        !processed_counts(&logs[..1]).is_empty() && !processed_counts(&logs[1..]).is_empty(),
        "both workers took a share"
    );
}

async fn backlog_and_dead(url: &str, queue: &str) -> (Option<u64>, Option<u64>) {
    let store = RabbitStore::connect(url, RabbitConfig::default().with_queue(queue))
        .await
        .unwrap();
    let status = store.status().await;
    (status.backlog, status.dead_letters)
}

#[test]
fn two_receivers_and_two_workers_process_every_event_once() {
    let test = "two_receivers_and_two_workers_process_every_event_once";
    let (Some(url), Some(management)) = (amqp_url(test), amqp_management_url(test)) else {
        return;
    };
    let queue = queue_name("scale");
    let receivers = [
        // The hyper receiver reads the unacknowledged count from the management API.
        start_with(
            "hyper_receiver",
            &url,
            &queue,
            &[("COMAPI_AMQP_MANAGEMENT_URL", &management)],
        ),
        start("actix_receiver", &url, &queue),
    ];
    let workers = [start("worker", &url, &queue), start("worker", &url, &queue)];
    let urls: Vec<String> = receivers.iter().map(|r| format!("{}/", r.url)).collect();
    runtime().block_on(async {
        let started = Instant::now();
        let acked = post_all(&urls, 16, 125, "rq").await;
        assert_eq!(acked.len(), 2000);
        eprintln!("2,000 events stored in {:?}", started.elapsed());
        wait_processed(&[&workers[0], &workers[1]], &acked, Duration::from_secs(60));
        assert_each_once(&[&workers[0], &workers[1]], 2000);
        wait_drained(&url, &queue, Duration::from_secs(10)).await;
        // The status page tells the unacknowledged count only with the management API.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let page = status_page(&receivers[0]).await;
            if page.contains(
                "Waiting to be processed: <strong>0</strong> (0 of them handed to a worker",
            ) {
                break;
            }
            assert!(Instant::now() < deadline, "{page}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let page = status_page(&receivers[1]).await;
        assert!(
            page.contains("Waiting to be processed: <strong>0</strong></p>"),
            "{page}"
        );
    });
}

#[test]
fn a_worker_killed_mid_stream_hands_its_deliveries_to_another() {
    let Some(url) = amqp_url("a_worker_killed_mid_stream") else {
        return;
    };
    let queue = queue_name("kill-worker");
    let receiver = start("hyper_receiver", &url, &queue);
    runtime().block_on(async {
        // Stored before any worker runs: the first worker takes a prefetch of them.
        let acked = post_all(&[format!("{}/", receiver.url)], 8, 100, "kw").await;
        let mut first = start("worker", &url, &queue);
        let deadline = Instant::now() + Duration::from_secs(30);
        while first.processed().len() < 50 {
            assert!(
                Instant::now() < deadline,
                "the first worker processed nothing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        first.signal("-KILL");
        first.wait(Duration::from_secs(5));
        let second = start("worker", &url, &queue);
        wait_processed(&[&first, &second], &acked, Duration::from_secs(60));
        eprintln!(
            "the killed worker processed {}, the other {}",
            first.processed().len(),
            second.processed().len()
        );
        wait_drained(&url, &queue, Duration::from_secs(10)).await;
    });
}

#[test]
fn the_broker_killed_under_load_gets_503s_in_time_and_loses_nothing_answered_200() {
    const TEST: &str = "the_broker_killed_under_load";
    let Some(mut broker) = OwnRabbit::start(TEST) else {
        return;
    };
    let url = broker.url();
    let queue = queue_name("kill-broker");
    let receivers = [
        start("hyper_receiver", &url, &queue),
        start("actix_receiver", &url, &queue),
    ];
    let urls: Vec<String> = receivers.iter().map(|r| format!("{}/", r.url)).collect();
    let answers = Arc::new(Mutex::new(Vec::<(String, u16, Duration, bool)>::new()));
    let (down, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let rt = runtime();
    let mut posting = Vec::new();
    for task in 0..8 {
        let (urls, answers, down, stop) = (
            urls.clone(),
            Arc::clone(&answers),
            Arc::clone(&down),
            Arc::clone(&stop),
        );
        posting.push(rt.spawn(async move {
            let client = client();
            for n in 0.. {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let id = format!("kb-{task}-{n}");
                let was_down = down.load(Ordering::Acquire);
                let started = Instant::now();
                let status = post_signed(&client, &urls[(task + n) % 2], SECRET, event_json(&id))
                    .await
                    .unwrap();
                answers
                    .lock()
                    .unwrap()
                    .push((id, status, started.elapsed(), was_down));
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    broker.kill();
    down.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    let restarted = Instant::now();
    // The same receivers store again, without a restart.
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
            restarted.elapsed() < Duration::from_secs(60),
            "no 200 after the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "200 again {:?} after the broker was back",
        restarted.elapsed()
    );
    stop.store(true, Ordering::Release);
    for task in posting {
        rt.block_on(task).unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    // The receivers' deadline is 5 s: no answer takes longer than that and a second.
    for (id, status, took, _) in &answers {
        assert!(matches!(status, 200 | 503), "{id}: {status}");
        assert!(
            *took < Duration::from_secs(6),
            "{id}: {status} after {took:?}"
        );
    }
    let refused = answers.iter().filter(|(_, s, _, _)| *s == 503).count();
    assert!(refused > 0, "the broker's death was never noticed");
    let acked: HashSet<String> = answers
        .iter()
        .filter(|(_, s, _, _)| *s == 200)
        .map(|(id, _, _, _)| id.clone())
        .collect();
    eprintln!("{} answered 200, {refused} answered 503", acked.len());
    let worker = start("worker", &url, &queue);
    wait_processed(&[&worker], &acked, Duration::from_secs(60));
}

#[cfg(feature = "redis")]
#[test]
fn workers_sharing_a_gate_in_redis_process_a_comapi_retry_once_whichever_worker_gets_it() {
    let test = "workers_sharing_a_gate_in_redis";
    let (Some(url), Some(redis)) = (amqp_url(test), support::redis_url(test)) else {
        return;
    };
    let queue = queue_name("shared-gate");
    let prefix = format!("{queue}:");
    let shared = [
        ("COMAPI_GATE_REDIS_URL", redis.as_str()),
        ("COMAPI_REDIS_PREFIX", prefix.as_str()),
    ];
    // One worker in the hyper receiver's process, one `worker` process.
    let in_process = [shared[0], shared[1], ("COMAPI_WORKER", "true")];
    let receivers = [
        start_with("hyper_receiver", &url, &queue, &in_process),
        start("actix_receiver", &url, &queue),
    ];
    let worker = start_with("worker", &url, &queue, &shared);
    let workers = [&receivers[0], &worker];
    let mut acked = HashSet::new();
    runtime().block_on(async {
        let client = client();
        // Each event, then Comapi's retry of it (the same body) through the other
        // receiver: the two copies sit side by side in the queue, and the workers
        // take turns.
        for n in 0..300 {
            let id = format!("copy-{n}");
            let body = event_json(&id);
            for receiver in &receivers {
                let status =
                    post_signed(&client, &format!("{}/", receiver.url), SECRET, body.clone()).await;
                assert_eq!(status, Ok(200), "{id}");
            }
            acked.insert(id);
        }
    });
    wait_processed(&workers, &acked, Duration::from_secs(60));
    // Both copies of every event acknowledged: the queue is empty.
    runtime().block_on(wait_drained(&url, &queue, Duration::from_secs(20)));
    assert_each_once(&workers, 300);
}

/// A gate Redis that refuses this process, or cannot be reached, stops the `worker`
/// and a receiver with its own worker at start-up, with one line naming
/// `COMAPI_GATE_REDIS_URL`: exit status 2 for the missing password, 1 for no answer.
#[cfg(feature = "redis")]
#[test]
fn a_gate_redis_that_refuses_or_is_gone_stops_the_workers_naming_the_variable() {
    let test = "a_gate_redis_that_refuses_or_is_gone";
    let (Some(url), Some(redis)) = (amqp_url(test), process::OwnRedis::start(test)) else {
        return;
    };
    runtime().block_on(redis.config_set("requirepass", "the-password"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("redis://{}/", closed.local_addr().unwrap());
    drop(closed);
    let queue = queue_name("refusing-gate");
    for (gate, code, said) in [(redis.url(), 2, "NOAUTH"), (gone, 1, "cannot reach Redis")] {
        for name in ["worker", "hyper_receiver"] {
            let mut command = Command::new(example_binary(name));
            command
                .env("COMAPI_AMQP_URL", &url)
                .env("COMAPI_AMQP_QUEUE", &queue)
                .env("COMAPI_GATE_REDIS_URL", &gate)
                .env("COMAPI_WEBHOOK_SECRET", SECRET)
                .env("PORT", "0");
            if name != "worker" {
                command.env("COMAPI_WORKER", "true");
            }
            let output = process::output_within(command, Duration::from_secs(30));
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(code), "{name}: {stderr}");
            let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
            assert_eq!(errors.len(), 1, "{name}: {stderr}");
            assert!(
                errors[0].contains("COMAPI_GATE_REDIS_URL"),
                "{name}: {stderr}"
            );
            assert!(errors[0].contains(said), "{name}: {stderr}");
        }
    }
}
