//! The retry schedule through crashes, with the real binaries on every store: a
//! worker SIGKILLed while events wait in the schedule and while others are being
//! moved loses nothing answered 200, and the attempts go on from the stored count;
//! a RabbitMQ worker stopped gracefully eight times with a backlog behind a failing
//! event processes every healthy event and dead-letters the failing one only after
//! every attempt of the policy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
#[cfg(feature = "rabbitmq")]
#[path = "support/rabbit.rs"]
mod rabbit;
mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use process::{Receiver, SECRET, client, event_json, post_signed, processed_ids, status_page};
use support::{example_binary, runtime, temp_dir};

/// A `message.failed` event, which the binaries fail with `DEMO_FAIL=message.failed`.
fn failing_json(id: &str) -> String {
    event_json(id).replace("\"message.sent\"", "\"message.failed\"")
}

/// POSTs `ids` (those starting with `f` failing, the others healthy) to `url` in
/// signed batches of 10; every answer must be 200.
fn post_ids(url: &str, ids: &[String]) {
    runtime().block_on(async {
        let client = client();
        for batch in ids.chunks(10) {
            let events: Vec<String> = batch
                .iter()
                .map(|id| {
                    if id.starts_with('f') {
                        failing_json(id)
                    } else {
                        event_json(id)
                    }
                })
                .collect();
            let body = format!("[{}]", events.join(","));
            let url = format!("{url}/");
            assert_eq!(post_signed(&client, &url, SECRET, body).await, Ok(200));
        }
    });
}

/// `failing` and `healthy` ids with `tag`, interleaved: a failing one every tenth.
fn ids(tag: &str, failing: usize) -> Vec<String> {
    (0..failing * 10)
        .map(|n| {
            if n % 10 == 0 {
                format!("f{tag}-{}", n / 10)
            } else {
                format!("h{tag}-{n}")
            }
        })
        .collect()
}

/// The attempt numbers `log` shows `id` moved into the retry schedule after.
fn moves(log: &str, id: &str) -> Vec<u32> {
    let field = format!("event_id={id} ");
    log.lines()
        .filter(|l| l.contains("moved to the retry schedule") && l.contains(&field))
        .filter_map(|l| {
            l.split(" attempt=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The attempts `log` shows `id` dead-lettered after, if it was.
fn dead_after(log: &str, id: &str) -> Option<u32> {
    let field = format!("event_id={id} ");
    log.lines()
        .filter(|l| l.contains("kept in the dead letter") && l.contains(&field))
        .find_map(|l| {
            l.split(" attempts=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// Waits (`within`) until `done` holds for the logs of `processes`.
fn wait_logs(processes: &[&Receiver], within: Duration, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let logs: String = processes
            .iter()
            .map(|p| p.log.lock().unwrap().clone())
            .collect();
        if done(&logs) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}; the logs:\n{logs}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The retry settings of a worker: 4 attempts, `delay` between them.
fn retry_settings(delay: &str) -> [(&'static str, String); 4] {
    [
        ("DEMO_FAIL", "message.failed".to_owned()),
        ("COMAPI_RETRY_ATTEMPTS", "4".to_owned()),
        ("COMAPI_RETRY_FIRST_DELAY", delay.to_owned()),
        ("COMAPI_RETRY_MAX_DELAY", delay.to_owned()),
    ]
}

/// The crash test on one store. `start(delay)` starts the process that runs the
/// worker (with [`retry_settings`]); `intake` is the receiver events are posted
/// to, `None` for the worker's own.
///
/// Batch A's failing events are moved and stored (their second attempt is 10 s
/// away); batch B is posted and the worker SIGKILLed while B's are being moved. A
/// new worker (100 ms between attempts) processes every healthy event, and
/// dead-letters every failing one after 4 attempts; A's go on from their stored
/// attempt: attempts 2 and 3 move them again, never 1.
fn crash_and_resume(start: &dyn Fn(&str) -> Receiver, intake: Option<&Receiver>) {
    let (a, b) = (ids("a", 20), ids("b", 20));
    let mut first = start("10s");
    let url = intake.map_or_else(|| first.url.clone(), |r| r.url.clone());
    post_ids(&url, &a);
    let failing_a: Vec<&String> = a.iter().filter(|id| id.starts_with('f')).collect();
    wait_logs(&[&first], Duration::from_secs(30), "A moved", |log| {
        failing_a.iter().all(|id| moves(log, id) == [1])
    });
    // The spool writes its schedule with the next acknowledgement, within a second.
    std::thread::sleep(Duration::from_millis(1500));
    // The receiver's status page counts them.
    let page = runtime().block_on(status_page(intake.unwrap_or(&first)));
    assert!(
        page.contains("Waiting for a retry: <strong>20</strong>"),
        "{page}"
    );
    post_ids(&url, &b);
    wait_logs(&[&first], Duration::from_secs(30), "B moving", |log| {
        (0..20)
            .filter(|n| !moves(log, &format!("fb-{n}")).is_empty())
            .count()
            >= 3
    });
    first.signal("-KILL");
    first.wait(Duration::from_secs(10));

    let second = start("100ms");
    let all: Vec<&String> = a.iter().chain(&b).collect();
    wait_logs(
        &[&second],
        Duration::from_secs(60),
        "every failing one dead",
        |log| {
            all.iter()
                .filter(|id| id.starts_with('f'))
                .all(|id| dead_after(log, id).is_some())
        },
    );
    let (first_log, second_log) = (
        first.log.lock().unwrap().clone(),
        second.log.lock().unwrap().clone(),
    );
    let mut processed: HashSet<String> = processed_ids(&first_log);
    processed.extend(processed_ids(&second_log));
    let lost: Vec<&&String> = all
        .iter()
        .filter(|id| id.starts_with('h') && !processed.contains(id.as_str()))
        .collect();
    assert!(lost.is_empty(), "answered 200, never processed: {lost:?}");
    for id in &failing_a {
        assert_eq!(
            moves(&second_log, id),
            [2, 3],
            "{id} from its stored attempt"
        );
        assert_eq!(dead_after(&second_log, id), Some(4), "{id}");
    }
    for id in all.iter().filter(|id| id.starts_with("fb")) {
        assert_eq!(dead_after(&second_log, id), Some(4), "{id}");
    }
}

#[test]
fn a_spool_receiver_killed_with_retries_waiting_and_moving_loses_nothing() {
    let dir = temp_dir("retry-crash-spool");
    let start = |delay: &str| {
        let mut command = Command::new(example_binary("hyper_receiver"));
        command
            .env("COMAPI_SPOOL_DIR", &*dir)
            .envs(retry_settings(delay));
        Receiver::start_command("hyper_receiver", command, SECRET)
    };
    crash_and_resume(&start, None);
}

#[cfg(feature = "redis")]
#[test]
fn a_redis_worker_killed_with_retries_waiting_and_moving_loses_nothing() {
    let Some(url) = support::redis_url("a_redis_worker_killed_with_retries_waiting") else {
        return;
    };
    let prefix = support::unique_prefix("retry-crash");
    let intake = {
        let mut command = Command::new(example_binary("hyper_receiver"));
        command
            .env("COMAPI_REDIS_URL", &url)
            .env("COMAPI_REDIS_PREFIX", &prefix)
            .env("COMAPI_WORKER", "false");
        Receiver::start_command("hyper_receiver", command, SECRET)
    };
    let start = |delay: &str| {
        let mut command = Command::new(example_binary("worker"));
        command
            .env("COMAPI_REDIS_URL", &url)
            .env("COMAPI_REDIS_PREFIX", &prefix)
            .env("COMAPI_LEASE", "2s")
            .env("METRICS_PORT", "0")
            .envs(retry_settings(delay));
        Receiver::start_command("worker", command, SECRET)
    };
    crash_and_resume(&start, Some(&intake));
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use super::*;

    fn queue(test: &str) -> String {
        support::unique_prefix(test).replace(':', ".")
    }

    fn process(name: &str, url: &str, queue: &str, settings: &[(&str, String)]) -> Receiver {
        let mut command = Command::new(example_binary(name));
        command
            .env("COMAPI_AMQP_URL", url)
            .env("COMAPI_AMQP_QUEUE", queue)
            .env("METRICS_PORT", "0")
            .envs(settings.iter().map(|(k, v)| (*k, v.as_str())));
        Receiver::start_command(name, command, SECRET)
    }

    #[test]
    fn a_rabbitmq_worker_killed_with_retries_waiting_and_moving_loses_nothing() {
        let Some(url) = rabbit::amqp_url("a_rabbitmq_worker_killed_with_retries_waiting") else {
            return;
        };
        let queue = queue("retry-crash");
        let intake = process(
            "hyper_receiver",
            &url,
            &queue,
            &[("COMAPI_WORKER", "false".to_owned())],
        );
        let start = |delay: &str| process("worker", &url, &queue, &retry_settings(delay));
        crash_and_resume(&start, Some(&intake));
    }

    /// Eight graceful stops (SIGTERM) of the worker while a backlog of 3,000 waits
    /// behind a failing event: hand-backs cost no attempt, so every healthy event is
    /// processed and the failing one goes to the dead letter after 4 handler calls.
    #[test]
    fn eight_graceful_restarts_cost_no_attempt() {
        let Some(url) = rabbit::amqp_url("eight_graceful_restarts_cost_no_attempt") else {
            return;
        };
        let queue = queue("hand-backs");
        let intake = process(
            "hyper_receiver",
            &url,
            &queue,
            &[("COMAPI_WORKER", "false".to_owned())],
        );
        let mut ids = vec!["f-0".to_owned()];
        ids.extend((0..3000).map(|n| format!("h-{n}")));
        post_ids(&intake.url, &ids);
        let mut logs = String::new();
        for _ in 0..8 {
            let mut worker = process("worker", &url, &queue, &retry_settings("300ms"));
            let before = processed_ids(&logs).len();
            wait_logs(
                &[&worker],
                Duration::from_secs(30),
                "some processed",
                |log| processed_ids(log).len() >= 50 || before + processed_ids(log).len() >= 3000,
            );
            worker.signal("-TERM");
            assert!(worker.wait(Duration::from_secs(30)).success());
            logs.push_str(&worker.log.lock().unwrap());
        }
        let last = process("worker", &url, &queue, &retry_settings("300ms"));
        wait_logs(
            &[&last],
            Duration::from_secs(60),
            "all processed, f-0 dead",
            |log| {
                let all = format!("{logs}{log}");
                processed_ids(&all).len() >= 3000 && dead_after(&all, "f-0").is_some()
            },
        );
        logs.push_str(&last.log.lock().unwrap());
        let processed = processed_ids(&logs);
        assert_eq!(processed.len(), 3000, "every healthy event");
        assert!(!processed.contains("f-0"));
        // A stop between a call and its move repeats the call: never fewer.
        let calls = moves(&logs, "f-0").len() + 1;
        assert!(
            calls >= 4,
            "f-0: {:?}, then the dead letter",
            moves(&logs, "f-0")
        );
        assert!(dead_after(&logs, "f-0") >= Some(4));
        assert!(
            !logs.contains("without being finished"),
            "a hand-back counted as an attempt"
        );
    }
}
