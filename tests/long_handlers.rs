//! A handler that outlasts the gate's lease, on a real spool with the in-memory
//! gate: the worker renews every claim it holds, so a copy of the event (a Comapi
//! retry stored twice) waits while the first runs, even for an event without an
//! entity, whose copies run in lanes of their own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use comapi_webhook::gate::GateConfig;
use comapi_webhook::store::spool::{Spool, SpoolConfig};
use comapi_webhook::worker::{EventHandler, HandlerError, RetryPolicy, run_worker};
use comapi_webhook::{Event, Gate};
use support::{runtime, spool_line, temp_dir};

const LEASE: Duration = Duration::from_millis(900);
const HANDLER: Duration = Duration::from_millis(2_500);

/// Sleeps past the lease; records how many calls for each event id ran at once
/// (the most) and how many calls there were.
#[derive(Default)]
struct Slow {
    running: Mutex<HashMap<String, usize>>,
    most_at_once: Mutex<HashMap<String, usize>>,
    calls: Mutex<HashMap<String, usize>>,
}

impl EventHandler for &Slow {
    async fn handle(&self, event: Event<'static>) -> Result<(), HandlerError> {
        let id = event.event_id().to_owned();
        {
            let mut running = self.running.lock().unwrap();
            let now = running.entry(id.clone()).or_default();
            *now += 1;
            let mut most = self.most_at_once.lock().unwrap();
            let most = most.entry(id.clone()).or_default();
            *most = (*most).max(*now);
            *self.calls.lock().unwrap().entry(id.clone()).or_default() += 1;
        }
        tokio::time::sleep(HANDLER).await;
        *self.running.lock().unwrap().get_mut(&id).unwrap() -= 1;
        Ok(())
    }
}

fn copies_never_overlap(name: &str, payload: &str) {
    let dir = temp_dir(&format!("long-handler-{name}"));
    let now = support::now_rfc3339();
    let record = |id: &str| {
        spool_line(&format!(
            r#"{{"eventId":"{id}","name":"{name}","payload":{payload},"revision":1,"timestamp":"{now}"}}"#
        ))
    };
    // The event, another one, then the event's copy (Comapi retried it).
    let lines = [record("e-1"), record("e-2"), record("e-1")];
    let slow = Slow::default();
    let gate = Gate::with_config(GateConfig::default().with_lease(LEASE));
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.append(lines.concat(), 3).await.unwrap();
        spool.close().await;
        let retry = RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(40), 3);
        run_worker(
            spool.reader().unwrap(),
            &gate,
            &slow,
            support::worker_config(retry),
        )
        .await
        .unwrap();
    });
    let most = slow.most_at_once.lock().unwrap().clone();
    let calls = slow.calls.lock().unwrap().clone();
    assert_eq!(
        most.get("e-1"),
        Some(&1),
        "{name}: copies of e-1 ran at once"
    );
    assert_eq!(calls.get("e-1"), Some(&1), "{name}: {calls:?}");
    // e-2 is a later event of the same entity when there is one: stale then.
    assert!(
        calls.get("e-2").is_none_or(|n| *n == 1),
        "{name}: {calls:?}"
    );
}

#[test]
fn copies_of_an_event_without_an_entity_never_run_at_once() {
    // A name the crate does not know: no entity, so each copy gets a lane of its own.
    copies_never_overlap("account.renamed", r#"{"name":"x"}"#);
}

#[test]
fn copies_of_an_event_of_an_entity_never_run_at_once() {
    copies_never_overlap("message.sent", r#"{"id":"m-1"}"#);
}

/// The same on the real receiver, on its spool: `COMAPI_LEASE=1s`, a handler of 3 s
/// (`DEMO_SLOW`), and Comapi's retry of an event without an entity stored while the
/// first copy runs: processed once.
#[cfg(feature = "binaries")]
#[test]
fn the_receiver_runs_a_retried_event_without_an_entity_once_whatever_its_lease() {
    #[path = "support/process.rs"]
    mod process;
    use process::{Receiver, SECRET, client, post_signed};

    let dir = temp_dir("long-handler-receiver");
    let mut command = std::process::Command::new(support::example_binary("hyper_receiver"));
    command
        .env("COMAPI_SPOOL_DIR", &dir)
        .env("COMAPI_LEASE", "1s")
        .env("DEMO_SLOW", "3s");
    let receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    let now = support::now_rfc3339();
    let body = format!(
        r#"{{"eventId":"retried","name":"account.renamed","payload":{{"name":"x"}},"timestamp":"{now}"}}"#
    );
    runtime().block_on(async {
        let client = client();
        let first = post_signed(&client, &receiver.url, SECRET, body.clone());
        assert_eq!(first.await, Ok(200));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let retried = post_signed(&client, &receiver.url, SECRET, body);
        assert_eq!(retried.await, Ok(200));
        tokio::time::sleep(Duration::from_secs(6)).await;
    });
    let log = receiver.log.lock().unwrap().clone();
    let processed = log
        .lines()
        .filter(|l| l.contains("event processed") && l.contains("event_id=retried"))
        .count();
    assert_eq!(processed, 1, "{log}");
    assert!(
        log.contains("decision=duplicate") || log.contains("decision=\"duplicate\""),
        "{log}"
    );
}
