//! The worker's contract with a fallible handler: retries with backoff, the offset
//! held until an event is processed or dead-lettered, panics caught, the dead letter
//! and its requeue (through the library and the real `requeue` binary).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comapi_webhook::metrics::Metrics;
use comapi_webhook::store::spool::{
    DEAD_LETTER_FILE, RETRY_FILE, Spool, SpoolConfig, requeue_dead_letters,
};
use comapi_webhook::worker::{EventHandler, HandlerError, RetryPolicy, run_worker};
use comapi_webhook::{Decision, Event, Gate, Worker};
use support::{runtime, spool_line, temp_dir};

fn line(id: &str) -> Vec<u8> {
    spool_line(&format!(
        r#"{{"eventId":"{id}","name":"message.sent","payload":{{"id":"m-{id}"}},"timestamp":"{}"}}"#,
        support::now_rfc3339()
    ))
}

/// Fast retries for tests: 10 ms doubling to 40 ms, `attempts` in all.
fn quick(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(
        Duration::from_millis(10),
        Duration::from_millis(40),
        attempts,
    )
}

/// A handler that fails (or panics) on the events it is told to, a number of times
/// each, and records every attempt and callback.
#[derive(Default)]
struct Flaky {
    /// Event id -> how many more attempts fail.
    failures: Mutex<HashMap<String, u32>>,
    /// Fail by panicking rather than by an error.
    panics: bool,
    /// Every attempt, in order, with whether it succeeded.
    attempts: Mutex<Vec<(String, bool)>>,
    dead: Mutex<Vec<(String, String, u32)>>,
    skipped: Mutex<Vec<(String, Decision)>>,
}

impl Flaky {
    fn new(failures: &[(&str, u32)]) -> Flaky {
        Flaky {
            failures: Mutex::new(
                failures
                    .iter()
                    .map(|(id, n)| ((*id).to_owned(), *n))
                    .collect(),
            ),
            ..Flaky::default()
        }
    }

    fn succeeded(&self) -> Vec<String> {
        let attempts = self.attempts.lock().unwrap();
        attempts
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn attempts_at(&self, id: &str) -> usize {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| i == id)
            .count()
    }
}

impl EventHandler for &Flaky {
    async fn handle(&self, event: Event<'static>) -> Result<(), HandlerError> {
        let id = event.event_id().to_owned();
        let fail = {
            let mut failures = self.failures.lock().unwrap();
            match failures.get_mut(&id) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        self.attempts.lock().unwrap().push((id.clone(), !fail));
        if !fail {
            return Ok(());
        }
        tokio::task::yield_now().await;
        if self.panics {
            panic!("the handler broke on {id}");
        }
        Err(format!("the database is down ({id})").into())
    }

    fn dead_lettered(&self, event: &Event<'_>, error: &str, attempts: u32) {
        let entry = (event.event_id().to_owned(), error.to_owned(), attempts);
        self.dead.lock().unwrap().push(entry);
    }

    fn skipped(&self, event: &Event<'_>, decision: Decision) {
        let entry = (event.event_id().to_owned(), decision);
        self.skipped.lock().unwrap().push(entry);
    }
}

/// Stores `lines` in a new spool in `dir`, closes it, and runs the worker over it
/// with `handler` to the end.
fn work(dir: &Path, lines: &[Vec<u8>], handler: &Flaky, retry: RetryPolicy) {
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(dir)).unwrap();
        let count = lines.len() as u64;
        spool.append(lines.concat(), count).await.unwrap();
        spool.close().await;
        run_worker(
            spool.reader().unwrap(),
            &Gate::in_memory(),
            handler,
            support::worker_config(retry),
        )
        .await
        .unwrap();
    });
}

/// The spool position just after the first `n` of `lines`.
fn offset_after(lines: &[Vec<u8>], n: usize) -> String {
    let bytes: usize = lines[..n].iter().map(Vec::len).sum();
    format!("1 {bytes}\n")
}

#[test]
fn a_handler_that_fails_twice_then_succeeds_processes_the_event_once() {
    let dir = temp_dir("worker-retry");
    let lines = [line("r-1"), line("r-2"), line("r-3")];
    let flaky = Flaky::new(&[("r-2", 2)]);
    work(&dir, &lines, &flaky, quick(5));
    // Each once; r-3, another entity, did not wait for r-2's retries.
    let mut succeeded = flaky.succeeded();
    succeeded.sort();
    assert_eq!(succeeded, ["r-1", "r-2", "r-3"], "each once");
    assert_eq!(flaky.attempts_at("r-2"), 3);
    // r-2 waited in the retry schedule, and nothing is left there.
    let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
    assert_eq!(spool.retries(), 0);
    drop(spool);
    assert_eq!(
        std::fs::read_to_string(dir.join("offset")).unwrap(),
        offset_after(&lines, 3)
    );
    assert!(!dir.join(DEAD_LETTER_FILE).exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// The attempts of the last schedule line for `id` in the spool's retry schedule.
fn stored_attempts(dir: &Path, id: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(RETRY_FILE)).ok()?;
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["record"]["event"]["eventId"] == id)
        .find_map(|entry| entry["attempts"].as_u64())
}

/// A worker stopped (a crash, here its future dropped) while an event keeps failing
/// left the line behind it acknowledged, and the event in the retry schedule with
/// its attempts: after a restart (the spool opened again, its schedule read back
/// from the file) the attempts go on from the stored count.
#[test]
fn a_worker_stopped_mid_retry_resumes_from_the_stored_attempts() {
    let dir = temp_dir("worker-held");
    let lines = [line("h-1"), line("h-2"), line("h-3")];
    let failing = Flaky::new(&[("h-2", u32::MAX)]);
    let gate = Gate::in_memory();
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.append(lines.concat(), 3).await.unwrap();
        spool.close().await;
        let slow = RetryPolicy::new(Duration::from_millis(50), Duration::from_millis(50), 1000);
        let worker = run_worker(
            spool.reader().unwrap(),
            &gate,
            &failing,
            support::worker_config(slow),
        );
        // Long enough for failed attempts and for an acknowledgement to be due.
        let stopped = tokio::time::timeout(Duration::from_millis(2500), worker).await;
        assert!(stopped.is_err(), "the worker gave up on h-2");
        drop(spool);
    });
    assert!(failing.attempts_at("h-2") >= 2);
    let mut succeeded = failing.succeeded();
    succeeded.sort();
    assert_eq!(succeeded, ["h-1", "h-3"]);
    // The line moved on past h-2: the offset is at the end.
    assert_eq!(
        std::fs::read_to_string(dir.join("offset")).unwrap(),
        offset_after(&lines, 3)
    );
    let stored = stored_attempts(&dir, "h-2").expect("h-2 in the retry schedule");
    assert!(stored >= 1);

    // Opened again: two attempts more than were stored, then the dead letter.
    let still = Flaky::new(&[("h-2", u32::MAX)]);
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        assert_eq!(spool.retries(), 1);
        spool.close().await;
        let attempts = u32::try_from(stored).unwrap() + 2;
        let policy = RetryPolicy::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
            attempts,
        );
        run_worker(
            spool.reader().unwrap(),
            &gate,
            &still,
            support::worker_config(policy),
        )
        .await
        .unwrap();
        assert_eq!(spool.retries(), 0);
    });
    assert_eq!(
        still.attempts_at("h-2"),
        2,
        "attempts went on from the stored count"
    );
    let dead = still.dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(u64::from(dead[0].2), stored + 2);
    assert!(dead[0].1.contains("the database is down (h-2)"), "{dead:?}");
    assert_eq!(
        still.succeeded(),
        Vec::<String>::new(),
        "h-1 and h-3 not again"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_panicking_handler_is_retried_and_the_worker_survives() {
    let dir = temp_dir("worker-panic");
    let flaky = Flaky {
        panics: true,
        ..Flaky::new(&[("p-1", 1)])
    };
    work(&dir, &[line("p-1"), line("p-2")], &flaky, quick(3));
    let mut succeeded = flaky.succeeded();
    succeeded.sort();
    assert_eq!(succeeded, ["p-1", "p-2"]);
    assert_eq!(flaky.attempts_at("p-1"), 2);
    let _ = std::fs::remove_dir_all(dir);
}

/// Always failing: dead-lettered after the configured attempts, and the worker goes
/// on; once the cause is fixed, `requeue_dead_letters` brings it back and the
/// running worker processes it.
#[test]
fn a_handler_that_always_fails_dead_letters_and_requeue_brings_it_back() {
    let dir = temp_dir("worker-dead");
    let flaky = Flaky::new(&[("d-1", 3)]);
    let gate = Gate::in_memory();
    let metrics = Arc::new(Metrics::new());
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool
            .append([line("d-1"), line("d-2")].concat(), 2)
            .await
            .unwrap();
        let worker = run_worker(
            spool.reader().unwrap(),
            &gate,
            metrics.meter(&flaky),
            support::worker_config(quick(3)),
        );
        let operator = async {
            // d-2, another entity, is processed beside d-1's retries.
            while spool.dead_letters() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(flaky.succeeded(), ["d-2"]);
            assert_eq!(flaky.attempts_at("d-1"), 3);
            assert_eq!(spool.dead_letters(), 1);
            // Fixed: the failures are used up. Bring the dead letter back.
            assert_eq!(requeue_dead_letters(&spool).await.unwrap(), 1);
            assert!(!dir.join(DEAD_LETTER_FILE).exists());
            assert_eq!(spool.dead_letters(), 0);
            assert_eq!(
                requeue_dead_letters(&spool).await.unwrap(),
                0,
                "nothing twice"
            );
            while flaky.succeeded().len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            spool.close().await;
        };
        let (worked, ()) = tokio::join!(worker, operator);
        worked.unwrap();
        assert_eq!((spool.stored(), spool.backlog()), (3, 0));
    });
    assert_eq!(flaky.succeeded(), ["d-2", "d-1"]);
    // d-1: three failed attempts (two retries, then the dead letter); d-2; d-1 again.
    let text = metrics.encode();
    for sample in [
        "comapi_webhook_decisions_total{decision=\"fresh\"} 5",
        "comapi_webhook_handler_total{outcome=\"failure\"} 3",
        "comapi_webhook_handler_total{outcome=\"retry\"} 2",
        "comapi_webhook_handler_total{outcome=\"dead_letter\"} 1",
        "comapi_webhook_handler_total{outcome=\"success\"} 2",
        "comapi_webhook_handler_seconds_count 5",
    ] {
        assert!(
            text.lines().any(|l| l == sample),
            "no {sample:?} in:\n{text}"
        );
    }
    let dead = flaky.dead.lock().unwrap().clone();
    assert_eq!(
        dead,
        [("d-1".to_owned(), "the database is down (d-1)".to_owned(), 3)]
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The dead letter as the worker writes it, and the `requeue` example binary
/// bringing it back into the spool.
#[cfg(feature = "binaries")]
#[test]
fn the_requeue_command_brings_dead_letters_back() {
    let dir = temp_dir("worker-requeue-cmd");
    let flaky = Flaky::new(&[("q-1", 2)]);
    work(&dir, &[line("q-1"), line("q-2")], &flaky, quick(2));
    let dead = std::fs::read_to_string(dir.join(DEAD_LETTER_FILE)).unwrap();
    let entry: serde_json::Value = serde_json::from_str(dead.trim_end()).unwrap();
    assert_eq!(entry["attempts"], 2);
    assert_eq!(entry["error"], "the database is down (q-1)");
    assert_eq!(entry["record"]["event"]["eventId"], "q-1");
    assert!(entry["deadAt"].as_str().is_some_and(|t| t.ends_with('Z')));

    let requeue = support::example_binary("requeue");
    let output = std::process::Command::new(&requeue)
        .env("COMAPI_SPOOL_DIR", &dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("requeued 1 event(s)"));
    assert!(!dir.join(DEAD_LETTER_FILE).exists());

    // The next worker (a restart: a new gate) processes the requeued event.
    let fixed = Flaky::new(&[]);
    runtime().block_on(async {
        let (spool, recovery) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        assert_eq!(recovery.events, 3);
        spool.close().await;
        run_worker(
            spool.reader().unwrap(),
            &Gate::in_memory(),
            &fixed,
            support::worker_config(quick(2)),
        )
        .await
        .unwrap();
    });
    assert_eq!(fixed.succeeded(), ["q-1"]);

    let missing = std::process::Command::new(&requeue)
        .env_remove("COMAPI_SPOOL_DIR")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no store named: set the receiver's own store setting, COMAPI_SPOOL_DIR")
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Everything logged through `tracing` in this test binary, from every thread.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Writer(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    }))
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_supervised_worker_resumes_after_a_failure_and_drains_on_shutdown() {
    let logs = captured_logs();
    let log = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let dir = temp_dir("supervised");
    // A folder where the offset's temporary file goes: acknowledging fails.
    let blocker = dir.join("offset.tmp");
    std::fs::create_dir(&blocker).unwrap();
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let handler = move |event: Event<'static>| {
            record.lock().unwrap().push(event.event_id().to_owned());
            std::future::ready(Ok::<(), std::io::Error>(()))
        };
        let worker = Worker::spawn(spool.clone(), Gate::in_memory(), handler, quick(3)).unwrap();
        spool.append(line("w-1"), 1).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Failing again and again (the run reads, then cannot acknowledge): one
        // line, not one a run, and no "running again" in between.
        while log().matches("worker failed; retrying").count() < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "no failure and resumption:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(log().contains("cannot write the offset file"), "{}", log());
        tokio::time::sleep(Duration::from_millis(3500)).await; // runs at 1 s and 3 s
        assert_eq!(
            log().matches("worker failed; retrying").count(),
            1,
            "{}",
            log()
        );
        assert!(!log().contains("worker running again"), "{}", log());
        std::fs::remove_dir(&blocker).unwrap();
        spool.append(line("w-2"), 1).await.unwrap();
        while !dir.join("offset").exists() || !seen.lock().unwrap().contains(&"w-2".to_owned()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker did not carry on:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while !log().contains("worker running again") {
            assert!(
                std::time::Instant::now() < deadline,
                "no recovery line:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Each restart resumed from the last acknowledged position: w-1 came again,
        // and the gate, kept across restarts, called it a duplicate.
        assert_eq!(
            seen.lock()
                .unwrap()
                .iter()
                .filter(|id| *id == "w-1")
                .count(),
            1
        );
        spool.append(line("w-3"), 1).await.unwrap();
        worker.shutdown().await;
        assert!(spool.is_closed(), "shutdown closes the spool");
        assert!(
            seen.lock().unwrap().contains(&"w-3".to_owned()),
            "and drains it first"
        );
    });
    let _ = std::fs::remove_dir_all(dir);
}
