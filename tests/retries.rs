//! Retries off the line, on every store (the spool here; Redis and RabbitMQ on the
//! real servers `scripts/check.sh` starts): one failing event holds nothing behind
//! it, past the read-ahead window; the retry schedule keeps each due time and ends
//! in the dead letter with the attempts and the last error; `requeue` beside a
//! worker that still fails moves each dead letter once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

#[cfg(feature = "rabbitmq")]
#[path = "support/rabbit.rs"]
mod rabbit_support;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use comapi_webhook::gate::DecisionStore;
use comapi_webhook::store::spool::{Spool, SpoolConfig, requeue_dead_letters};
use comapi_webhook::store::{EventSource, EventStore, StoreStatus};
use comapi_webhook::worker::{EventHandler, HandlerError, RetryPolicy, WorkerConfig, run_worker};
use comapi_webhook::{Event, Gate, Inbox, Verifier};
use support::{SECRET, post, runtime, temp_dir};

/// A handler that fails every event whose id starts with `fail`, and records
/// each attempt's time and each dead letter.
#[derive(Default)]
struct Failing {
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
    processed: Mutex<Vec<String>>,
    dead: Mutex<Vec<(String, String, u32)>>,
}

impl Failing {
    fn attempts_at(&self, id: &str) -> Vec<Instant> {
        self.attempts
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn processed(&self) -> usize {
        self.processed.lock().unwrap().len()
    }
}

impl EventHandler for &Failing {
    async fn handle(&self, event: Event<'static>) -> Result<(), HandlerError> {
        let id = event.event_id().to_owned();
        let attempts = &self.attempts;
        attempts
            .lock()
            .unwrap()
            .entry(id.clone())
            .or_default()
            .push(Instant::now());
        if id.starts_with("fail") {
            return Err(format!("{id} cannot be processed").into());
        }
        self.processed.lock().unwrap().push(id);
        Ok(())
    }

    fn dead_lettered(&self, event: &Event<'_>, error: &str, attempts: u32) {
        let entry = (event.event_id().to_owned(), error.to_owned(), attempts);
        self.dead.lock().unwrap().push(entry);
    }
}

/// Stores `ids` through an inbox on `store`, in signed batches of 100.
async fn store_ids<S: EventStore>(store: &S, ids: &[String]) {
    let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
    for batch in ids.chunks(100) {
        let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
        assert_eq!(post(&inbox, &batch).await, 200);
    }
}

/// Waits (20 s at most) until `done` holds for the store's status.
async fn until_status<S: EventStore>(store: &S, what: &str, done: impl Fn(&StoreStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = store.status().await;
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a worker on `source` while `watch` runs, then drops it.
async fn work_while<Src, G>(
    source: Src,
    gate: &G,
    handler: &Failing,
    config: WorkerConfig,
    watch: impl Future<Output = ()>,
) where
    Src: EventSource,
    G: DecisionStore,
{
    let worker = run_worker(source, gate, handler, config);
    tokio::select! {
        done = worker => panic!("the worker ended: {done:?}"),
        () = watch => {}
    }
}

const HEALTHY: usize = 600;

/// One event that keeps failing, then `HEALTHY` of other entities, with a window
/// (and prefetch) of 64: every healthy event is processed while the failing one
/// waits for its second attempt, a minute away, in the retry schedule.
async fn one_failing_event_holds_nothing<Src, G, S>(store: &S, source: Src, gate: &G)
where
    Src: EventSource,
    G: DecisionStore,
    S: EventStore,
{
    let handler = Failing::default();
    let mut ids = vec!["fail-1".to_owned()];
    ids.extend((0..HEALTHY).map(|n| format!("ok-{n}")));
    {
        store_ids(store, &ids).await;
        let retry = RetryPolicy::new(Duration::from_secs(60), Duration::from_secs(60), 3);
        let config = support::worker_config(WorkerConfig::from(retry).with_window(64));
        let watch = async {
            let deadline = Instant::now() + Duration::from_secs(30);
            while handler.processed() < HEALTHY {
                assert!(
                    Instant::now() < deadline,
                    "{} of {HEALTHY} processed behind the failing event",
                    handler.processed()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            until_status(store, "in the retry schedule", |s| s.retries == Some(1)).await;
        };
        work_while(source, gate, &handler, config, watch).await;
    }
    assert_eq!(handler.attempts_at("fail-1").len(), 1, "not retried yet");
}

/// One event that always fails, with 300 ms doubling to 1.2 s over 4 attempts: each
/// attempt comes after its delay and within a second of it being due, and the
/// event ends in the dead letter with 4 attempts and the last error.
async fn the_schedule_is_kept<Src, G, S>(store: &S, source: Src, gate: &G)
where
    Src: EventSource,
    G: DecisionStore,
    S: EventStore,
{
    let handler = Failing::default();
    {
        store_ids(store, &["fail-kept".to_owned()]).await;
        let retry = RetryPolicy::new(Duration::from_millis(300), Duration::from_millis(1200), 4);
        let watch = until_status(store, "dead-lettered", |s| s.dead_letters == Some(1));
        work_while(source, gate, &handler, support::worker_config(retry), watch).await;
        until_status(store, "out of the schedule", |s| s.retries == Some(0)).await;
    }
    let times = handler.attempts_at("fail-kept");
    assert_eq!(times.len(), 4, "every attempt of the policy");
    for (n, (pair, delay)) in times.windows(2).zip([300, 600, 1200]).enumerate() {
        let gap = pair[1].duration_since(pair[0]);
        let delay = Duration::from_millis(delay);
        eprintln!(
            "attempt {}: {gap:?} after the one before, {delay:?} due",
            n + 2
        );
        assert!(
            gap + Duration::from_millis(20) >= delay,
            "early: {gap:?} < {delay:?}"
        );
        assert!(
            gap <= delay + Duration::from_secs(1),
            "late: {gap:?} > {delay:?} + 1 s"
        );
    }
    let dead = handler.dead.lock().unwrap().clone();
    assert_eq!(
        dead,
        [(
            "fail-kept".to_owned(),
            "fail-kept cannot be processed".to_owned(),
            4
        )]
    );
}

#[test]
fn one_failing_event_holds_nothing_behind_it_on_the_spool() {
    let dir = temp_dir("retries-hold");
    let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
    let gate = Gate::in_memory();
    runtime().block_on(one_failing_event_holds_nothing(
        &spool,
        spool.reader().unwrap(),
        &gate,
    ));
    assert_eq!(spool.retries(), 1);
    assert!(spool.next_retry_at().is_some());
}

#[test]
fn the_schedule_is_kept_on_the_spool() {
    let dir = temp_dir("retries-kept");
    let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
    let gate = Gate::in_memory();
    runtime().block_on(the_schedule_is_kept(&spool, spool.reader().unwrap(), &gate));
}

/// With a worker whose handler still fails (1 attempt: straight to the dead
/// letter), `requeue` moves each of the 20 dead letters once, not round and round.
async fn requeue_moves_each_dead_letter_once<Src, G, S, R>(
    store: &S,
    source: Src,
    gate: &G,
    requeue: impl FnOnce() -> R,
) where
    Src: EventSource,
    G: DecisionStore,
    S: EventStore,
    R: Future<Output = u64>,
{
    let ids: Vec<String> = (0..20).map(|n| format!("fail-{n}")).collect();
    let handler = Failing::default();
    store_ids(store, &ids).await;
    let config = support::worker_config(RetryPolicy::new(Duration::ZERO, Duration::ZERO, 1));
    let watch = async {
        until_status(store, "dead-lettered", |s| s.dead_letters == Some(20)).await;
        assert_eq!(requeue().await, 20);
        until_status(store, "dead-lettered again", |s| s.dead_letters == Some(20)).await;
    };
    work_while(source, gate, &handler, config, watch).await;
    assert_eq!(handler.attempts_at("fail-0").len(), 2);
}

#[test]
fn requeue_beside_a_failing_worker_moves_each_dead_letter_once_on_the_spool() {
    let dir = temp_dir("retries-requeue");
    let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
    let requeue = || async { requeue_dead_letters(&spool).await.unwrap() as u64 };
    let gate = Gate::in_memory();
    runtime().block_on(requeue_moves_each_dead_letter_once(
        &spool,
        spool.reader().unwrap(),
        &gate,
        requeue,
    ));
}

#[cfg(feature = "redis")]
mod redis {
    use comapi_webhook::gate::{RedisGate, RedisGateConfig};
    use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig, StreamConsumer};

    use super::*;

    async fn setup(url: &str, test: &str) -> (RedisStream, StreamConsumer, RedisGate) {
        let prefix = support::unique_prefix(test);
        let config = RedisStreamConfig::default().with_key_prefix(&prefix);
        let stream = RedisStream::connect(url, config.clone()).await.unwrap();
        let mut config = config;
        config.batch = 64;
        let consumer = StreamConsumer::connect(url, config, "w").await.unwrap();
        let gate = RedisGate::connect(url, RedisGateConfig::default().with_key_prefix(&prefix))
            .await
            .unwrap();
        (stream, consumer, gate)
    }

    #[test]
    fn one_failing_event_holds_nothing_behind_it_on_redis() {
        let Some(url) = support::redis_url("one_failing_event_holds_nothing_on_redis") else {
            return;
        };
        runtime().block_on(async {
            let (stream, consumer, gate) = setup(&url, "retries-hold").await;
            one_failing_event_holds_nothing(&stream, consumer, &gate).await;
        });
    }

    #[test]
    fn the_schedule_is_kept_on_redis() {
        let Some(url) = support::redis_url("the_schedule_is_kept_on_redis") else {
            return;
        };
        runtime().block_on(async {
            let (stream, consumer, gate) = setup(&url, "retries-kept").await;
            the_schedule_is_kept(&stream, consumer, &gate).await;
        });
    }

    #[test]
    fn requeue_beside_a_failing_worker_moves_each_dead_letter_once_on_redis() {
        let Some(url) = support::redis_url("requeue_beside_a_failing_worker_on_redis") else {
            return;
        };
        runtime().block_on(async {
            let (stream, consumer, gate) = setup(&url, "retries-requeue").await;
            let requeue = || async { stream.requeue_dead_letters().await.unwrap() };
            requeue_moves_each_dead_letter_once(&stream, consumer, &gate, requeue).await;
        });
    }
}

#[cfg(feature = "rabbitmq")]
mod rabbit {
    use comapi_webhook::store::rabbitmq::{RabbitConfig, RabbitConsumer, RabbitStore};

    use super::*;
    use crate::rabbit_support;

    async fn setup(url: &str, test: &str) -> (RabbitStore, RabbitConsumer) {
        let queue = support::unique_prefix(test).replace(':', ".");
        let config = RabbitConfig::default().with_queue(queue).with_prefetch(64);
        let store = RabbitStore::connect(url, config.clone()).await.unwrap();
        let consumer = RabbitConsumer::connect(url, config, "w").await.unwrap();
        (store, consumer)
    }

    #[test]
    fn one_failing_event_holds_nothing_behind_it_on_rabbitmq() {
        let Some(url) = rabbit_support::amqp_url("one_failing_event_holds_nothing_on_rabbitmq")
        else {
            return;
        };
        runtime().block_on(async {
            let (store, consumer) = setup(&url, "retries-hold").await;
            one_failing_event_holds_nothing(&store, consumer, &Gate::in_memory()).await;
        });
    }

    #[test]
    fn the_schedule_is_kept_on_rabbitmq() {
        let Some(url) = rabbit_support::amqp_url("the_schedule_is_kept_on_rabbitmq") else {
            return;
        };
        runtime().block_on(async {
            let (store, consumer) = setup(&url, "retries-kept").await;
            the_schedule_is_kept(&store, consumer, &Gate::in_memory()).await;
        });
    }

    #[test]
    fn requeue_beside_a_failing_worker_moves_each_dead_letter_once_on_rabbitmq() {
        let Some(url) = rabbit_support::amqp_url("requeue_beside_a_failing_worker_on_rabbitmq")
        else {
            return;
        };
        runtime().block_on(async {
            let (store, consumer) = setup(&url, "retries-requeue").await;
            let requeue = || async { store.requeue_dead_letters().await.unwrap() };
            let gate = Gate::in_memory();
            requeue_moves_each_dead_letter_once(&store, consumer, &gate, requeue).await;
        });
    }
}
