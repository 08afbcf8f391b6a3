//! The claim lifecycle (claim, complete, release, lease, busy, crash), one suite run
//! against the in-memory gate and a real Redis; a property test holding both to one
//! model; and a reply lost between Redis and the worker, for real, through a proxy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::future::Future;
use std::time::Duration;

use comapi_webhook::gate::{DecisionStore, GateConfig};
#[cfg(feature = "redis")]
use comapi_webhook::gate::{RedisGate, RedisGateConfig};
use comapi_webhook::{Decision, Event, Gate};
use proptest::prelude::*;
use support::{event, runtime};
#[cfg(feature = "redis")]
use support::{redis_url, unique_prefix};

/// The lease every store in this file is given: short, so tests can outlive it.
const LEASE: Duration = Duration::from_millis(400);

fn memory_gate() -> Gate {
    Gate::with_config(GateConfig::default().with_lease(LEASE))
}

#[cfg(feature = "redis")]
async fn redis_gate(url: &str, prefix: &str) -> RedisGate {
    let config = RedisGateConfig::default()
        .with_key_prefix(prefix)
        .with_lease(LEASE);
    RedisGate::connect(url, config).await.unwrap()
}

fn past_the_lease() {
    std::thread::sleep(LEASE + Duration::from_millis(150));
}

/// Every step of the lifecycle on stores from `open`, which gives a handle on the
/// same store each time it is called with the same name (a restarted worker
/// reconnects to the same Redis; a worker thread restarted in the same process keeps
/// the same in-memory gate).
async fn lifecycle<S, F, Fut>(mut open: F)
where
    S: DecisionStore,
    F: FnMut(&'static str) -> Fut,
    Fut: Future<Output = S>,
{
    use Decision::{Busy, Duplicate, Fresh, Stale};
    let store = open("lifecycle").await;
    let sent = event("c-1", "message.sent", Some("m-1"), Some(1));

    // Claim, and the same delivery again (the retry after a lost reply): Fresh.
    assert_eq!(store.claim(&sent, "d-1").await.unwrap(), Fresh);
    assert_eq!(store.claim(&sent, "d-1").await.unwrap(), Fresh);
    // Another copy while the claim holds: Busy.
    assert_eq!(store.claim(&sent, "d-2").await.unwrap(), Busy);
    // Completed: final for every delivery, even the one that claimed it.
    store.complete(&sent, "d-1").await.unwrap();
    assert_eq!(store.claim(&sent, "d-2").await.unwrap(), Duplicate);
    assert_eq!(store.claim(&sent, "d-1").await.unwrap(), Duplicate);

    // Released after a failed attempt: the next claim, by any delivery, is Fresh.
    let read = event("c-2", "message.read", Some("m-2"), Some(3));
    assert_eq!(store.claim(&read, "d-1").await.unwrap(), Fresh);
    store.release(&read, "d-2").await.unwrap(); // not its claim: nothing happens
    assert_eq!(store.claim(&read, "d-3").await.unwrap(), Busy);
    store.release(&read, "d-1").await.unwrap();
    assert_eq!(store.claim(&read, "d-3").await.unwrap(), Fresh);
    // The claimed revision orders: an older state is stale, whoever claims it.
    let delivered = event("c-3", "message.delivered", Some("m-2"), Some(2));
    assert_eq!(
        store.claim(&delivered, "d-4").await.unwrap(),
        Stale { current: 3 }
    );
    store.complete(&read, "d-3").await.unwrap();

    // A claim nobody completes expires with its lease.
    let failed = event("c-4", "message.failed", Some("m-3"), Some(4));
    assert_eq!(store.claim(&failed, "d-1").await.unwrap(), Fresh);
    assert_eq!(store.claim(&failed, "d-2").await.unwrap(), Busy);
    past_the_lease();
    assert_eq!(store.claim(&failed, "d-2").await.unwrap(), Fresh);
    // Its equal revision is still its own: not stale for itself.
    store.complete(&failed, "d-2").await.unwrap();
    assert_eq!(store.claim(&failed, "d-1").await.unwrap(), Duplicate);

    // A crash between claim and complete: everything dropped, then reopened. The
    // event is Fresh again once the lease has passed, never lost.
    let crashing = event("c-5", "profile.update", Some("p-1"), Some(7));
    assert_eq!(store.claim(&crashing, "d-9").await.unwrap(), Fresh);
    drop(store);
    let store = open("lifecycle").await;
    assert_eq!(store.claim(&crashing, "d-10").await.unwrap(), Busy);
    past_the_lease();
    assert_eq!(store.claim(&crashing, "d-10").await.unwrap(), Fresh);
    store.complete(&crashing, "d-10").await.unwrap();
    drop(store);
    let store = open("lifecycle").await;
    assert_eq!(
        store.claim(&crashing, "d-11").await.unwrap(),
        Duplicate,
        "a completion survives the crash"
    );
}

#[test]
fn lifecycle_in_memory() {
    // One gate for the process: a restarted worker thread finds it again.
    let gate = memory_gate();
    runtime().block_on(lifecycle(|_| {
        let gate = gate.clone();
        async move { gate }
    }));
}

#[cfg(feature = "redis")]
#[test]
fn lifecycle_redis() {
    let Some(url) = redis_url("lifecycle_redis") else {
        return;
    };
    let prefix = unique_prefix("lifecycle");
    runtime().block_on(lifecycle(|_| redis_gate(&url, &prefix)));
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    /// Claim event `.0` (by its revision) for delivery `.1`.
    Claim(u64, u8),
    Complete(u64, u8),
    Release(u64, u8),
    /// Wait out the lease.
    Expire,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => (1u64..=4, 0u8..3).prop_map(|(e, d)| Step::Claim(e, d)),
        3 => (1u64..=4, 0u8..3).prop_map(|(e, d)| Step::Complete(e, d)),
        2 => (1u64..=4, 0u8..3).prop_map(|(e, d)| Step::Release(e, d)),
        1 => Just(Step::Expire),
    ];
    proptest::collection::vec(step, 1..14)
}

/// The model of one entity's events: which are completed, which claimed by whom,
/// and the highest revision claimed so far (revision `r` is event `e-r`).
#[derive(Default)]
struct Model {
    completed: std::collections::HashSet<u64>,
    claims: std::collections::HashMap<u64, u8>,
    max: Option<u64>,
}

impl Model {
    fn claim(&mut self, rev: u64, delivery: u8) -> Decision {
        if self.completed.contains(&rev) {
            return Decision::Duplicate;
        }
        if self
            .claims
            .get(&rev)
            .is_some_and(|&holder| holder != delivery)
        {
            return Decision::Busy;
        }
        if let Some(current) = self.max.filter(|&m| m > rev) {
            return Decision::Stale { current };
        }
        self.max = Some(rev);
        self.claims.insert(rev, delivery);
        Decision::Fresh
    }

    fn apply(&mut self, step: &Step) -> Option<Decision> {
        match *step {
            Step::Claim(rev, d) => return Some(self.claim(rev, d)),
            Step::Complete(rev, _) => {
                self.claims.remove(&rev);
                self.completed.insert(rev);
            }
            Step::Release(rev, d) => {
                if self.claims.get(&rev) == Some(&d) {
                    self.claims.remove(&rev);
                }
            }
            Step::Expire => self.claims.clear(),
        }
        None
    }
}

fn step_event(rev: u64) -> Event<'static> {
    event(&format!("e-{rev}"), "message.read", Some("m-1"), Some(rev))
}

/// Runs `steps` on `store`, and returns each claim's decision.
async fn run_steps<S: DecisionStore>(store: &S, steps: &[Step]) -> Vec<Decision> {
    let mut out = Vec::new();
    for step in steps {
        match *step {
            Step::Claim(rev, d) => {
                out.push(
                    store
                        .claim(&step_event(rev), &format!("d{d}"))
                        .await
                        .unwrap(),
                );
            }
            Step::Complete(rev, d) => store
                .complete(&step_event(rev), &format!("d{d}"))
                .await
                .unwrap(),
            Step::Release(rev, d) => store
                .release(&step_event(rev), &format!("d{d}"))
                .await
                .unwrap(),
            Step::Expire => past_the_lease(),
        }
    }
    out
}

fn model_of(steps: &[Step]) -> Vec<Decision> {
    let mut model = Model::default();
    steps.iter().filter_map(|step| model.apply(step)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Both stores make the model's decisions for any history: no completed event
    /// is ever Fresh again, and no claim outlives its lease.
    #[test]
    fn stores_follow_the_model(steps in steps()) {
        let want = model_of(&steps);
        let got = runtime().block_on(run_steps(&memory_gate(), &steps));
        prop_assert_eq!(&got, &want, "in memory");
        #[cfg(feature = "redis")]
        if let Ok(url) = std::env::var("COMAPI_TEST_REDIS_URL") {
            let got = runtime().block_on(async {
                let gate = redis_gate(&url, &unique_prefix("model")).await;
                run_steps(&gate, &steps).await
            });
            prop_assert_eq!(&got, &want, "Redis");
        }
    }
}

#[cfg(feature = "redis")]
mod lost_reply {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A TCP proxy to Redis that, once, forwards a request holding `marker` and then
    /// cuts the connection without passing the reply on: Redis ran the command, the
    /// client never hears it. Every other byte passes both ways.
    async fn proxy(
        redis: std::net::SocketAddr,
        marker: &'static [u8],
    ) -> (String, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&dropped);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(redis).await.unwrap();
                tokio::spawn(pipe(client, server, Arc::clone(&flag), marker));
            }
        });
        (url, dropped)
    }

    async fn pipe(client: TcpStream, server: TcpStream, dropped: Arc<AtomicBool>, marker: &[u8]) {
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_up = Arc::clone(&cut);
        let upstream = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let hit = buf[..n].windows(marker.len()).any(|w| w == marker);
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                if hit && !dropped.swap(true, Ordering::SeqCst) {
                    // Let Redis run it, then cut: the reply is never passed on.
                    cut_up.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return;
                }
            }
        };
        let downstream = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if cut.load(Ordering::SeqCst) || client_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        // Whichever side ends first ends the connection.
        tokio::select! {
            () = upstream => {}
            () = downstream => {}
        }
    }

    #[test]
    fn a_lost_reply_to_a_claim_neither_loses_nor_repeats_the_event() {
        let Some(url) = redis_url("a_lost_reply_to_a_claim_neither_loses_nor_repeats_the_event")
        else {
            return;
        };
        let redis: std::net::SocketAddr = url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        runtime().block_on(async {
            let (proxied, dropped) = proxy(redis, b"delivery-lost-reply").await;
            let prefix = unique_prefix("lost-reply");
            let gate = redis_gate(&proxied, &prefix).await;
            // Load the script first, so the cut call is one Redis runs.
            let warm = event("warm", "message.sent", Some("m-w"), Some(1));
            assert!(gate.claim(&warm, "warm-up").await.unwrap().is_fresh());

            let sent = event("lost-1", "message.sent", Some("m-lost"), Some(1));
            let first = gate.claim(&sent, "delivery-lost-reply").await;
            assert!(dropped.load(Ordering::SeqCst), "the proxy cut no reply");
            assert!(
                first.is_err(),
                "the reply was lost, yet the claim answered {first:?}"
            );

            // Redis did record the claim: another copy is Busy, not Fresh...
            let direct = redis_gate(&url, &prefix).await;
            assert_eq!(
                direct.claim(&sent, "another-copy").await.unwrap(),
                Decision::Busy
            );
            // ...and the worker's retry, with the same delivery, gets it back.
            let mut processed = 0;
            let decision = loop {
                match gate.claim(&sent, "delivery-lost-reply").await {
                    Ok(decision) => break decision,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            if decision.is_fresh() {
                processed += 1;
                gate.complete(&sent, "delivery-lost-reply").await.unwrap();
            }
            assert_eq!(
                direct.claim(&sent, "another-copy").await.unwrap(),
                Decision::Duplicate
            );
            assert_eq!(processed, 1, "processed exactly once");
        });
    }
}
