//! The revision gate: one shared suite run against the in-memory gate and against a
//! real Redis, a property test over interleavings, and races.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;
use support::runtime;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

#[cfg(feature = "redis")]
use comapi_webhook::Error;
use comapi_webhook::gate::{DecisionStore, GateConfig, ReplayWindow};
#[cfg(feature = "redis")]
use comapi_webhook::gate::{RedisGate, RedisGateConfig};
use comapi_webhook::{Decision, Event, Gate};
use proptest::prelude::*;
use support::event;
#[cfg(feature = "redis")]
use support::{redis_url, unique_prefix};

#[cfg(feature = "redis")]
async fn redis_gate(url: &str, test: &str) -> RedisGate {
    RedisGate::connect(
        url,
        RedisGateConfig::default().with_key_prefix(unique_prefix(test)),
    )
    .await
    .unwrap()
}

/// Each event as a new delivery, claimed and, when fresh, completed at once: what
/// `Gate::check` does in one step.
async fn decide_all<S: DecisionStore>(store: &S, events: &[Event<'static>]) -> Vec<Decision> {
    static ARRIVAL: AtomicU64 = AtomicU64::new(0);
    let mut out = Vec::new();
    for event in events {
        let delivery = format!("arrival-{}", ARRIVAL.fetch_add(1, Ordering::Relaxed));
        let decision = store.claim(event, &delivery).await.unwrap();
        if decision.is_fresh() {
            store.complete(event, &delivery).await.unwrap();
        }
        out.push(decision);
    }
    out
}

/// Every scenario on a fresh store from `new_store`.
async fn shared_suite<S, F, Fut>(mut new_store: F)
where
    S: DecisionStore,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    use Decision::{Duplicate, Fresh, Stale};
    let message = |id: &str, name: &str, rev: u64| event(id, name, Some("m-1"), Some(rev));

    // Retries of a processed event are duplicates.
    let store = new_store().await;
    let sent = message("e-1", "message.sent", 1);
    assert_eq!(
        decide_all(&store, &[sent.clone(), sent.clone(), sent]).await,
        [Fresh, Duplicate, Duplicate]
    );

    // Out of order: read (r3) before delivered (r2) and sent (r1); failed (r4) after.
    // Nothing is recorded for a stale event, so its retry is stale again.
    let store = new_store().await;
    let events = [
        message("e-3", "message.read", 3),
        message("e-2", "message.delivered", 2),
        message("e-1", "message.sent", 1),
        message("e-2", "message.delivered", 2),
        message("e-4", "message.failed", 4),
        message("e-3", "message.read", 3),
    ];
    let want = [
        Fresh,
        Stale { current: 3 },
        Stale { current: 3 },
        Stale { current: 3 },
        Fresh,
        Duplicate,
    ];
    assert_eq!(decide_all(&store, &events).await, want);

    // An equal revision under another eventId is stale: the first arrival wins.
    let store = new_store().await;
    let events = [
        message("e-a", "message.sent", 5),
        message("e-b", "message.sent", 5),
    ];
    assert_eq!(
        decide_all(&store, &events).await,
        [Fresh, Stale { current: 5 }]
    );

    // Without a revision, or without an entity, events are only deduplicated.
    let store = new_store().await;
    let events = [
        event("c-1", "conversation.create", Some("conv"), None),
        event("c-2", "conversation.delete", Some("conv"), None),
        event("c-1", "conversation.create", Some("conv"), None),
        event("u-1", "something.new", Some("x"), Some(9)),
        event("u-2", "something.new", Some("x"), Some(1)),
        event("u-2", "something.new", Some("x"), Some(1)),
    ];
    assert_eq!(
        decide_all(&store, &events).await,
        [Fresh, Fresh, Duplicate, Fresh, Fresh, Duplicate]
    );

    // Entities are told apart by family and id; messages by id.
    let store = new_store().await;
    let events = [
        event("p-1", "profile.update", Some("same-id"), Some(5)),
        event("k-1", "conversation.create", Some("same-id"), Some(1)),
        event("x-1", "message.sent", Some("m-a"), Some(7)),
        event("x-2", "message.sent", Some("m-b"), Some(1)),
    ];
    assert_eq!(
        decide_all(&store, &events).await,
        [Fresh, Fresh, Fresh, Fresh]
    );

    // Revisions compare exactly over the whole u64 range.
    let store = new_store().await;
    let big = 1u64 << 53;
    let events = [
        message("b-1", "message.sent", big + 1),
        message("b-2", "message.sent", big),
        message("b-3", "message.sent", u64::MAX),
        message("b-4", "message.sent", 99),
    ];
    let want = [
        Fresh,
        Stale { current: big + 1 },
        Fresh,
        Stale { current: u64::MAX },
    ];
    assert_eq!(decide_all(&store, &events).await, want);
}

/// An event raised at `timestamp` (`None`: without one), about a message of its own.
fn event_at(event_id: &str, timestamp: Option<&str>) -> Event<'static> {
    let mut envelope = serde_json::json!({
        "eventId": event_id, "name": "message.read", "payload": { "id": event_id }, "revision": 1,
    });
    if let Some(timestamp) = timestamp {
        envelope["timestamp"] = timestamp.into();
    }
    let body = serde_json::to_vec(&envelope).unwrap();
    comapi_webhook::dangerous::parse_unverified(&body)
        .unwrap()
        .pop()
        .unwrap()
        .into_owned()
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The replay window, on fresh stores from `new_store(max_age)` with the default
/// skew of five minutes.
async fn replay_window_suite<S, F, Fut>(mut new_store: F)
where
    S: DecisionStore,
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = S>,
{
    use Decision::{Duplicate, Expired, Fresh};
    let now = SystemTime::now();
    let store = new_store(ReplayWindow::DEFAULT_MAX_AGE).await;

    // Older than 25 hours: expired, every time, and nothing is recorded for it.
    let old = event_at("old", Some("2017-08-31T09:26:14.604Z"));
    let decisions = decide_all(&store, &[old.clone(), old]).await;
    for decision in &decisions {
        let Expired { age_secs } = decision else {
            panic!("{decisions:?}");
        };
        assert!(*age_secs > 9 * 365 * 86_400, "{age_secs}");
    }
    assert_eq!(decisions[0], decisions[1]);
    let just_inside = event_at(
        "inside",
        Some(&rfc3339(now - Duration::from_secs(24 * 3600))),
    );
    assert_eq!(decide_all(&store, &[just_inside]).await, [Fresh]);

    // Dated an hour ahead (beyond the skew): expired, with a negative age. A few
    // seconds ahead is clock skew, and fine.
    let ahead = event_at("ahead", Some(&rfc3339(now + Duration::from_secs(3600))));
    let [Expired { age_secs }] = decide_all(&store, &[ahead]).await[..] else {
        panic!("not expired");
    };
    assert!((-3600..-3500).contains(&age_secs), "{age_secs}");
    let skewed = event_at("skewed", Some(&rfc3339(now + Duration::from_secs(10))));
    assert_eq!(decide_all(&store, &[skewed]).await, [Fresh]);

    // No timestamp, or one that cannot be read: the normal decision.
    for (id, timestamp) in [("none", None), ("unreadable", Some("yesterday"))] {
        let event = event_at(id, timestamp);
        assert_eq!(
            decide_all(&store, &[event.clone(), event]).await,
            [Fresh, Duplicate],
            "{timestamp:?}"
        );
    }

    // A request captured and replayed once the gate has forgotten its eventId (a
    // new store here; the TTL or the memory bound in real life): expired.
    let captured = event_at("captured", Some(&rfc3339(SystemTime::now())));
    let store = new_store(Duration::from_secs(2)).await;
    assert_eq!(
        decide_all(&store, std::slice::from_ref(&captured)).await,
        [Fresh]
    );
    std::thread::sleep(Duration::from_millis(3_100));
    let forgetful = new_store(Duration::from_secs(2)).await;
    assert!(matches!(
        decide_all(&forgetful, &[captured]).await[..],
        [Expired { age_secs: 3.. }]
    ));
}

#[test]
fn replay_window_in_memory() {
    runtime().block_on(replay_window_suite(|max_age| async move {
        Gate::with_config(
            GateConfig::default().with_replay_window(ReplayWindow::default().with_max_age(max_age)),
        )
    }));
}

#[cfg(feature = "redis")]
#[test]
fn replay_window_redis() {
    let Some(url) = redis_url("replay_window_redis") else {
        return;
    };
    runtime().block_on(replay_window_suite(|max_age| {
        let url = url.clone();
        async move {
            let config = RedisGateConfig::default()
                .with_key_prefix(unique_prefix("replay"))
                .with_replay_window(ReplayWindow::default().with_max_age(max_age));
            RedisGate::connect(&url, config).await.unwrap()
        }
    }));
}

#[test]
fn suite_in_memory() {
    runtime().block_on(shared_suite(|| async { Gate::in_memory() }));
}

#[cfg(feature = "redis")]
#[test]
fn suite_redis() {
    let Some(url) = redis_url("suite_redis") else {
        return;
    };
    runtime().block_on(shared_suite(|| redis_gate(&url, "suite")));
}

#[cfg(feature = "redis")]
#[test]
fn redis_batches_decide_like_single_checks() {
    let Some(url) = redis_url("redis_batches_decide_like_single_checks") else {
        return;
    };
    runtime().block_on(async {
        let events: Vec<Event<'static>> = [3, 1, 3, 4, 2, 4, 5]
            .iter()
            .enumerate()
            .map(|(i, &rev)| {
                event(
                    &format!("e-{}", rev * 10 + (i % 2) as u64),
                    "message.read",
                    Some("m"),
                    Some(rev),
                )
            })
            .collect();
        let one_by_one = decide_all(&redis_gate(&url, "batch-a").await, &events).await;
        let batched = redis_gate(&url, "batch-b")
            .await
            .check_batch(&events)
            .await
            .unwrap();
        let in_memory = decide_all(&Gate::in_memory(), &events).await;
        assert_eq!(batched, one_by_one);
        assert_eq!(batched, in_memory);
        assert!(
            redis_gate(&url, "batch-c")
                .await
                .check_batch(&[])
                .await
                .unwrap()
                .is_empty()
        );
    });
}

#[cfg(feature = "redis")]
#[test]
fn lost_redis_is_an_error_never_fresh() {
    runtime().block_on(async {
        // Nothing listens on this port: bind it, then release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = RedisGate::connect(
            &format!("redis://127.0.0.1:{port}/"),
            RedisGateConfig::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, Error::StoreUnavailable { .. }), "{error:?}");
        assert_eq!(error.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            RedisGate::connect("not a url", RedisGateConfig::default())
                .await
                .is_err()
        );
    });
}

/// The model: an id processed before is a duplicate; otherwise fresh exactly when
/// its revision raises the maximum (and then it is processed), else stale.
fn model(arrivals: &[(String, u64)]) -> (Vec<Decision>, u64) {
    let mut processed = HashSet::new();
    let mut max: Option<u64> = None;
    let decisions = arrivals
        .iter()
        .map(|(id, rev)| {
            if processed.contains(id) {
                Decision::Duplicate
            } else if let Some(current) = max.filter(|m| m >= rev) {
                Decision::Stale { current }
            } else {
                processed.insert(id.clone());
                max = Some(*rev);
                Decision::Fresh
            }
        })
        .collect();
    (decisions, max.unwrap_or(0))
}

const STATES: [&str; 6] = ["sent", "delivered", "read", "failed", "expired", "read"];

fn arrivals() -> impl Strategy<Value = Vec<(String, u64)>> {
    // Revision r is the r-th state of one message; every arrival of it carries the
    // same eventId, so repeats are Comapi's retries.
    proptest::collection::vec(1u64..=6, 0..24)
        .prop_map(|revs| revs.into_iter().map(|r| (format!("evt-{r}"), r)).collect())
}

fn to_events(arrivals: &[(String, u64)]) -> Vec<Event<'static>> {
    arrivals
        .iter()
        .map(|(id, rev)| {
            event(
                id,
                &format!("message.{}", STATES[(*rev - 1) as usize]),
                Some("m-1"),
                Some(*rev),
            )
        })
        .collect()
}

fn check_against_model(got: &[Decision], arrivals: &[(String, u64)]) -> Result<(), TestCaseError> {
    let (want, max) = model(arrivals);
    prop_assert_eq!(got, &want[..]);
    if let Some(highest) = arrivals.iter().map(|(_, r)| *r).max() {
        prop_assert_eq!(max, highest, "the final max is the highest revision seen");
    }
    Ok(())
}

proptest! {
    #[test]
    fn in_memory_matches_the_model(arrivals in arrivals()) {
        let gate = Gate::in_memory();
        let got: Vec<Decision> = to_events(&arrivals).iter().map(|e| gate.check(e)).collect();
        check_against_model(&got, &arrivals)?;
        // After them all, a new event at the final max is stale against it.
        if let Some(&(_, highest)) = arrivals.iter().max_by_key(|(_, r)| *r) {
            prop_assert_eq!(gate.check(&event("probe", "message.read", Some("m-1"), Some(highest))),
                            Decision::Stale { current: highest });
        }
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_matches_the_model() {
    let Some(url) = redis_url("redis_matches_the_model") else {
        return;
    };
    let rt = runtime();
    let config = ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    };
    proptest!(config, |(arrivals in arrivals())| {
        let got = rt.block_on(async {
            let gate = redis_gate(&url, "model").await;
            decide_all(&gate, &to_events(&arrivals)).await
        });
        check_against_model(&got, &arrivals)?;
    });
}

/// Eight threads race every event of one message (revisions 1 to 40, each sent
/// three times). Checks: exactly one Fresh per eventId that was ever Fresh, the
/// highest revision is Fresh once, and afterwards the max is the highest.
fn race_checks(results: &[(u64, Decision)]) {
    let mut fresh: HashMap<u64, usize> = HashMap::new();
    for (rev, decision) in results {
        if decision.is_fresh() {
            *fresh.entry(*rev).or_default() += 1;
        }
        if let Decision::Stale { current } = decision {
            assert!(
                current >= rev,
                "stale {rev} reported a lower current {current}"
            );
        }
    }
    assert!(
        fresh.values().all(|&n| n == 1),
        "an eventId was Fresh twice: {fresh:?}"
    );
    assert_eq!(
        fresh.get(&40),
        Some(&1),
        "the highest revision wins exactly once"
    );
}

#[test]
fn threads_racing_the_in_memory_gate() {
    let gate = Gate::with_config(GateConfig::new(10_000, 10_000));
    // A later revision has already won: nothing older may be Fresh, however raced.
    assert!(
        gate.check(&event("won", "message.read", Some("m-old"), Some(50)))
            .is_fresh()
    );
    let events: Arc<Vec<Event<'static>>> = Arc::new(
        (0..3)
            .flat_map(|_| {
                (1..=40).map(|r| event(&format!("e-{r}"), "message.read", Some("m-1"), Some(r)))
            })
            .chain(
                (1..=50)
                    .map(|r| event(&format!("old-{r}"), "message.read", Some("m-old"), Some(r))),
            )
            .collect(),
    );
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (gate, events) = (gate.clone(), Arc::clone(&events));
            std::thread::spawn(move || {
                // Each thread walks the events from its own starting point.
                let n = events.len();
                (0..n)
                    .map(|i| &events[(i + t * 17) % n])
                    .map(|e| {
                        (
                            e.entity_id() == Some("m-old"),
                            e.revision().unwrap(),
                            gate.check(e),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let all: Vec<(bool, u64, Decision)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        all.iter()
            .filter(|(old, _, _)| *old)
            .all(|(_, _, d)| !d.is_fresh()),
        "an old revision got in"
    );
    let main: Vec<(u64, Decision)> = all
        .iter()
        .filter(|(old, _, _)| !old)
        .map(|(_, r, d)| (*r, *d))
        .collect();
    race_checks(&main);
    assert_eq!(
        gate.check(&event("after", "message.read", Some("m-1"), Some(40))),
        Decision::Stale { current: 40 }
    );
}

#[cfg(feature = "redis")]
#[test]
fn tasks_racing_the_redis_gate() {
    let Some(url) = redis_url("tasks_racing_the_redis_gate") else {
        return;
    };
    runtime().block_on(async {
        let prefix = unique_prefix("race");
        let connect = || {
            RedisGate::connect(
                &url,
                RedisGateConfig::default().with_key_prefix(prefix.clone()),
            )
        };
        let gate = connect().await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..8u64 {
            // A connection per task, so the calls truly interleave at the server.
            let gate = connect().await.unwrap();
            tasks.spawn(async move {
                let mut out = Vec::new();
                for i in 0..120u64 {
                    let rev = (i + t * 7) % 40 + 1;
                    let e = event(&format!("e-{rev}"), "message.read", Some("m-1"), Some(rev));
                    out.push((rev, gate.check(&e).await.unwrap()));
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(result) = tasks.join_next().await {
            all.extend(result.unwrap());
        }
        race_checks(&all);
        let probe = event("after", "message.read", Some("m-1"), Some(40));
        assert_eq!(
            gate.check(&probe).await.unwrap(),
            Decision::Stale { current: 40 }
        );
    });
}
