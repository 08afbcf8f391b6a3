//! Clock jumps through libfaketime against the real binaries: an event a reference
//! receiver stored while no worker ran is processed by a worker started with the
//! clock 26 hours later, on the spool and on Redis; an event that was already 26
//! hours old when it arrived is still expired.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use process::{Receiver, SECRET, client, event_json, post_signed};
use support::{example_binary, redis_url, runtime, temp_dir, unique_prefix};

/// libfaketime, or `None` (loudly, and a failure under `CI=true`) without it.
fn faketime(test: &str) -> Option<std::path::PathBuf> {
    let found = ["x86_64-linux-gnu", "aarch64-linux-gnu", ""]
        .iter()
        .map(|arch| {
            std::path::Path::new("/usr/lib")
                .join(arch)
                .join("faketime/libfaketime.so.1")
        })
        .find(|lib| lib.exists());
    if found.is_some() {
        return found;
    }
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "{test}: CI=true but there is no libfaketime (apt-get install faketime)"
    );
    eprintln!("\n!!! SKIPPED {test}: no libfaketime (apt-get install faketime)\n");
    None
}

/// The binary `name`, run with the clock 26 hours ahead: libfaketime preloaded
/// into the binary itself, not through the `faketime` wrapper, which forks and
/// would leave the binary running when the test kills the wrapper.
fn a_day_later(name: &str, lib: &std::path::Path) -> Command {
    let mut command = Command::new(example_binary(name));
    command
        .env("LD_PRELOAD", lib)
        .env("FAKETIME", "+26h")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    command
}

/// An event dated 26 hours ago: a replay when it arrives now.
fn old_event_json(id: &str) -> String {
    let then = SystemTime::now() - Duration::from_secs(26 * 3600);
    let then = humantime::format_rfc3339_millis(then);
    format!(
        r#"{{"eventId":"{id}","name":"message.sent","payload":{{"id":"m-{id}"}},"timestamp":"{then}"}}"#
    )
}

/// Posts a fresh event and a 26-hour-old one to `receiver`; both are stored.
fn post_both(receiver: &Receiver, fresh: &str, old: &str) {
    runtime().block_on(async {
        let client = client();
        let url = format!("{}/", receiver.url);
        let sent = post_signed(&client, &url, SECRET, event_json(fresh)).await;
        assert_eq!(sent, Ok(200));
        let sent = post_signed(&client, &url, SECRET, old_event_json(old)).await;
        assert_eq!(sent, Ok(200), "a replay is stored all the same");
    });
}

/// Waits until `worker` processed `fresh` and skipped `old` as expired.
fn processed_late(worker: &Receiver, fresh: &str, old: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = worker.log.lock().unwrap().clone();
        let expired = log.lines().any(|line| {
            line.contains("dated outside the replay window")
                && line.contains(&format!("event_id={old}"))
        });
        if worker.processed().contains(fresh) && expired {
            assert!(!worker.processed().contains(old), "{log}");
            // The worker's clock was a day ahead: its log lines are dated so.
            let later = SystemTime::now() + Duration::from_secs(26 * 3600);
            let day = humantime::format_rfc3339(later).to_string()[..13].to_owned();
            assert!(
                log.contains(&day),
                "the clock did not jump to {day}:\n{log}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{fresh} not processed 26 h later:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_spool_receivers_process_an_event_a_day_after_it_arrived() {
    let Some(lib) = faketime("the_spool_receivers_process_an_event_a_day_after_it_arrived") else {
        return;
    };
    for name in ["hyper_receiver", "actix_receiver"] {
        let dir = temp_dir(&format!("{name}-clock"));
        let mut storing = Command::new(example_binary(name));
        storing
            .env("COMAPI_SPOOL_DIR", &dir)
            .env("COMAPI_WORKER", "false");
        let receiver = Receiver::start_command(name, storing, SECRET);
        let (fresh, old) = (format!("fresh-{name}"), format!("old-{name}"));
        post_both(&receiver, &fresh, &old);
        drop(receiver);
        let mut later = a_day_later(name, &lib);
        later.env("COMAPI_SPOOL_DIR", &dir);
        let worker = Receiver::start_command(name, later, SECRET);
        processed_late(&worker, &fresh, &old);
        drop(worker);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_redis_worker_processes_an_event_a_day_after_it_arrived() {
    let test = "a_redis_worker_processes_an_event_a_day_after_it_arrived";
    let Some(url) = redis_url(test) else {
        return;
    };
    let Some(lib) = faketime(test) else {
        return;
    };
    let prefix = unique_prefix("clock");
    let mut storing = Command::new(example_binary("hyper_receiver"));
    storing
        .env("COMAPI_REDIS_URL", &url)
        .env("COMAPI_REDIS_PREFIX", &prefix);
    let receiver = Receiver::start_command("hyper_receiver", storing, SECRET);
    post_both(&receiver, "fresh-redis", "old-redis");
    drop(receiver);
    let mut later = a_day_later("worker", &lib);
    later
        .env("COMAPI_REDIS_URL", &url)
        .env("COMAPI_REDIS_PREFIX", &prefix)
        .env("METRICS_PORT", "0");
    let worker = Receiver::start_command("worker", later, SECRET);
    processed_late(&worker, "fresh-redis", "old-redis");
}
