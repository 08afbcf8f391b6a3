//! Late, racing and interrupted work on a real spool: an event received in time is
//! processed however late the worker gets to it (its record's `receivedAt` is the
//! clock the replay window is read against), a requeue racing the worker loses no
//! dead letter, and a supervised worker stops within its grace period in every
//! state, leaving what it did not finish to come again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use comapi_webhook::store::spool::{DEAD_LETTER_FILE, Spool, SpoolConfig, requeue_dead_letters};
use comapi_webhook::worker::{EventHandler, HandlerError, RetryPolicy, run_worker};
use comapi_webhook::{Decision, Event, Gate, Worker};
use support::{runtime, temp_dir};

const HOUR: Duration = Duration::from_secs(3600);

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// A spool line received at `received_at` for an event dated `timestamp`.
fn line_at(id: &str, received_at: SystemTime, timestamp: SystemTime) -> Vec<u8> {
    format!(
        r#"{{"receivedAt":"{}","secretIndex":0,"event":{{"eventId":"{id}","name":"message.sent","payload":{{"id":"m-{id}"}},"timestamp":"{}"}}}}"#,
        rfc3339(received_at),
        rfc3339(timestamp)
    )
    .into_bytes()
    .into_iter()
    .chain(*b"\n")
    .collect()
}

/// Records what it handled and what it was told was skipped.
#[derive(Default)]
struct Seen {
    handled: Mutex<Vec<String>>,
    skipped: Mutex<Vec<(String, Decision)>>,
}

impl EventHandler for &Seen {
    async fn handle(&self, event: Event<'static>) -> Result<(), HandlerError> {
        self.handled
            .lock()
            .unwrap()
            .push(event.event_id().to_owned());
        Ok(())
    }

    fn skipped(&self, event: &Event<'_>, decision: Decision) {
        let entry = (event.event_id().to_owned(), decision);
        self.skipped.lock().unwrap().push(entry);
    }
}

#[test]
fn an_event_received_in_time_is_processed_however_late_and_a_replay_is_not() {
    let dir = temp_dir("late");
    let now = SystemTime::now();
    let received = now - 26 * HOUR; // the worker was down for 26 hours
    let lines = [
        // Ten seconds old when it arrived: processed, 26 h later.
        line_at("late", received, received - Duration::from_secs(10)),
        // Already 26 h old when it arrived: a replay, expired.
        line_at("replayed", received, received - 26 * HOUR),
    ];
    // A dead letter from then, requeued now: processed too.
    let dead = format!(
        r#"{{"deadAt":"{}","attempts":8,"error":"down","delivery":"spool:1:0","record":{}}}"#,
        rfc3339(received + HOUR),
        String::from_utf8(line_at(
            "requeued",
            received,
            received - Duration::from_secs(5)
        ))
        .unwrap()
        .trim_end()
    );
    std::fs::write(dir.join(DEAD_LETTER_FILE), format!("{dead}\n")).unwrap();
    let seen = Seen::default();
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.append(lines.concat(), 2).await.unwrap();
        assert_eq!(requeue_dead_letters(&spool).await.unwrap(), 1);
        spool.close().await;
        let retry = RetryPolicy::default();
        run_worker(
            spool.reader().unwrap(),
            &Gate::in_memory(),
            &seen,
            support::worker_config(retry),
        )
        .await
        .unwrap();
    });
    assert_eq!(*seen.handled.lock().unwrap(), ["late", "requeued"]);
    let skipped = seen.skipped.lock().unwrap().clone();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, "replayed");
    assert!(
        matches!(skipped[0].1, Decision::Expired { age_secs } if age_secs >= 26 * 3600),
        "{skipped:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A handler that always fails.
async fn failing(_: Event<'static>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("the database is down"))
}

/// The event ids in the spool folder's dead letter.
fn dead_letter_ids(dir: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(DEAD_LETTER_FILE)).unwrap_or_default();
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["record"]["event"]["eventId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn a_requeue_racing_the_worker_loses_no_dead_letter() {
    let dir = temp_dir("requeue-race");
    let now = SystemTime::now();
    let lines: Vec<Vec<u8>> = (0..1_500)
        .map(|n| line_at(&format!("e-{n}"), now, now))
        .collect();
    let requeued = runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.append(lines.concat(), 1_500).await.unwrap();
        let once = RetryPolicy::new(Duration::ZERO, Duration::ZERO, 1);
        let reader = spool.reader().unwrap();
        let worker = tokio::spawn(async move {
            run_worker(
                reader,
                &Gate::in_memory(),
                failing,
                support::worker_config(once),
            )
            .await
        });
        // Requeues beside the running worker, as an operator's loop would.
        let mut requeued = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            requeued += requeue_dead_letters(&spool).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        spool.close().await;
        worker.await.unwrap().unwrap();
        assert_eq!(spool.backlog(), 0);
        requeued
    });
    assert!(requeued > 0, "the requeue never raced the worker");
    // Everything the worker read ends in the dead letter: nothing was lost.
    let ids: HashSet<String> = dead_letter_ids(&dir).into_iter().collect();
    let missing: Vec<usize> = (0..1_500)
        .filter(|n| !ids.contains(&format!("e-{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of 1500 events are in neither the spool nor the dead letter (requeued {requeued}): {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A supervised worker on a spool holding one event, handled by `handler`; stops it
/// within `grace` and returns whether it stopped in time and how long it took.
fn stop_within<H: EventHandler + 'static>(
    dir: &std::path::Path,
    handler: H,
    retry: RetryPolicy,
    started: &Arc<Mutex<bool>>,
    grace: Duration,
) -> (bool, Duration) {
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(dir)).unwrap();
        let now = SystemTime::now();
        spool.append(line_at("e-1", now, now), 1).await.unwrap();
        let worker = Worker::spawn(spool.clone(), Gate::in_memory(), handler, retry).unwrap();
        while !*started.lock().unwrap() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let asked = Instant::now();
        let in_time = worker.shutdown_within(grace).await;
        let took = asked.elapsed();
        spool.close().await;
        (in_time, took)
    })
}

/// After a stop, the event comes again to the next worker on the same spool.
fn comes_again(dir: &std::path::Path) {
    let seen = Seen::default();
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(dir)).unwrap();
        spool.close().await;
        let retry = RetryPolicy::default();
        run_worker(
            spool.reader().unwrap(),
            &Gate::in_memory(),
            &seen,
            support::worker_config(retry),
        )
        .await
        .unwrap();
    });
    assert_eq!(*seen.handled.lock().unwrap(), ["e-1"]);
}

#[test]
fn a_worker_backing_off_stops_within_its_grace_and_the_event_comes_again() {
    let dir = temp_dir("stop-backoff");
    let started = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&started);
    let handler = move |_: Event<'static>| {
        *flag.lock().unwrap() = true;
        async { Err::<(), _>(std::io::Error::other("down")) }
    };
    // A backoff after the first failure longer than the grace period, so the stop
    // comes while the worker waits; the retry it scheduled is due 4 s later, when
    // the next worker takes it.
    let retry = RetryPolicy::new(Duration::from_secs(4), Duration::from_secs(4), 5);
    let grace = Duration::from_secs(2);
    let (in_time, took) = stop_within(&dir, handler, retry, &started, grace);
    assert!(
        in_time && took <= grace + Duration::from_millis(500),
        "{took:?}"
    );
    comes_again(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_worker_in_a_long_handler_stops_within_its_grace_and_the_event_comes_again() {
    let dir = temp_dir("stop-long");
    let started = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&started);
    let handler = move |_: Event<'static>| {
        *flag.lock().unwrap() = true;
        async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<(), std::io::Error>(())
        }
    };
    let grace = Duration::from_secs(2);
    let (in_time, took) = stop_within(&dir, handler, RetryPolicy::default(), &started, grace);
    assert!(
        in_time && took <= grace + Duration::from_millis(500),
        "{took:?}"
    );
    comes_again(&dir);

    // A handler that blocks its thread cannot be let go of: the shutdown still
    // returns within the grace period, and says so.
    let dir2 = temp_dir("stop-blocking");
    let started = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&started);
    let handler = move |_: Event<'static>| {
        *flag.lock().unwrap() = true;
        std::thread::sleep(Duration::from_secs(5));
        async { Ok::<(), std::io::Error>(()) }
    };
    let (in_time, took) = stop_within(&dir2, handler, RetryPolicy::default(), &started, grace);
    assert!(
        !in_time && took <= grace + Duration::from_millis(500),
        "{took:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(dir2);
}
