//! The logs while Redis is down, on a Redis of the test's own that is killed and
//! restarted 10 s later: the `worker` binary logs a few lines, not one a second,
//! and one line when it runs again; the receiver logs the outage once and the
//! recovery once, and the event stored after it is processed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use process::{OwnRedis, Receiver, SECRET, client, event_json, post_signed};
use support::{example_binary, runtime};

fn start(name: &str, url: &str) -> Receiver {
    let mut command = Command::new(example_binary(name));
    command
        .env("COMAPI_REDIS_URL", url)
        .env("COMAPI_LEASE", "2s")
        .env("METRICS_PORT", "0");
    Receiver::start_command(name, command, SECRET)
}

fn wait_for(what: &str, receiver: &Receiver, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&receiver.log.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "{what}:\n{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

#[test]
fn redis_down_for_ten_seconds_is_a_few_log_lines_and_one_on_recovery() {
    const TEST: &str = "redis_down_for_ten_seconds_is_a_few_log_lines_and_one_on_recovery";
    let Some(mut redis) = OwnRedis::start(TEST) else {
        return;
    };
    let url = redis.url();
    let receiver = start("hyper_receiver", &url);
    let worker = start("worker", &url);
    let rt = runtime();
    let client = client();
    let post = |id: &str| {
        rt.block_on(post_signed(
            &client,
            &format!("{}/", receiver.url),
            SECRET,
            event_json(id),
        ))
        .unwrap()
    };
    assert_eq!(post("before"), 200);
    wait_for("processed before the outage", &worker, |log| {
        log.contains("event_id=before")
    });
    let before = worker.log.lock().unwrap().lines().count();

    redis.kill();
    for n in 0..3 {
        assert_eq!(post(&format!("during-{n}")), 503);
    }
    std::thread::sleep(Duration::from_secs(10));
    let during: Vec<String> = worker
        .log
        .lock()
        .unwrap()
        .lines()
        .skip(before)
        .map(str::to_owned)
        .collect();
    assert!(
        (1..=5).contains(&during.len()),
        "the worker's log while Redis was down 10 s: {during:#?}"
    );
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while post("after") != 200 {
        assert!(Instant::now() < deadline, "the receiver never stored again");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("processed after the outage", &worker, |log| {
        log.contains("event_id=after")
    });
    let worker_log = worker.log.lock().unwrap().clone();
    assert_eq!(
        lines(&worker_log, "worker running again"),
        1,
        "{worker_log}"
    );
    assert!(
        worker_log.contains("down_for="),
        "how long it was down: {worker_log}"
    );
    let receiver_log = receiver.log.lock().unwrap().clone();
    assert_eq!(
        lines(&receiver_log, "cannot store into Redis"),
        1,
        "{receiver_log}"
    );
    assert_eq!(
        lines(&receiver_log, "storing into Redis again"),
        1,
        "{receiver_log}"
    );
    // Each cause once: redis's own error repeats its I/O error's text.
    for line in receiver_log.lines().chain(worker_log.lines()) {
        for cause in ["broken pipe", "Connection refused", "connection reset"] {
            assert!(line.matches(cause).count() <= 1, "{line}");
        }
    }
}
