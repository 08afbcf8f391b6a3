//! The RabbitMQ store and consumers on a real broker (`COMAPI_TEST_AMQP_URL`, which
//! `scripts/check.sh` starts): a store-then-consume round trip, a copy called a
//! duplicate, the topology's arguments, the worker's dead letter and its requeue, a
//! poison message stopped by the delivery limit, a stalled broker answered 503
//! at the deadline, a consumer whose start ran out of time leaving no consumer on
//! the broker, and the unacknowledged count read from the management API.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::store::rabbitmq::{RabbitConfig, RabbitConsumer, RabbitStore};
use comapi_webhook::store::{EventSource, EventStore, StopHandle, StoreStatus};
use comapi_webhook::worker::{RetryPolicy, run_worker};
use comapi_webhook::{Event, Gate, Inbox, Verifier};
use rabbit_support::{amqp_management_url, amqp_url};
use support::{SECRET, post, runtime, unique_prefix};

#[path = "support/rabbit.rs"]
mod rabbit_support;

fn config(test: &str) -> RabbitConfig {
    RabbitConfig::default().with_queue(unique_prefix(test).replace(':', "."))
}

/// The broker's `host:port` in `url`.
fn broker_address(url: &str) -> String {
    let mut parts = url.trim_start_matches("amqp://guest:guest@").split('/');
    parts.next().unwrap().to_owned()
}

/// Runs a worker on `consumer` until `expected` events were handled, then stops it.
async fn process_until(
    consumer: RabbitConsumer,
    gate: &Gate,
    seen: &Mutex<Vec<String>>,
    expected: usize,
    retry: RetryPolicy,
) {
    let stop = StopHandle::default();
    let consumer = consumer.stopped_by(&stop);
    support::process_until(consumer, move || stop.stop(), gate, seen, expected, retry).await;
}

#[test]
fn stored_events_are_consumed_once_and_a_copy_is_a_duplicate() {
    let Some(url) = amqp_url("stored_events_are_consumed_once") else {
        return;
    };
    runtime().block_on(async {
        let config = config("round-trip");
        let store = RabbitStore::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
        assert_eq!(post(&inbox, &["r-1", "r-2"]).await, 200);
        assert_eq!(post(&inbox, &["r-3"]).await, 200);
        assert_eq!(post(&inbox, &["r-1"]).await, 200); // Comapi's retry: a copy
        let status = store.status().await;
        assert_eq!(status.backlog, Some(4), "{status:?}");
        assert_eq!(status.dead_letters, Some(0), "{status:?}");
        // Without the management API, AMQP does not tell the unacknowledged count.
        assert_eq!(status.pending, None, "{status:?}");
        assert_eq!(status.error, None, "{status:?}");

        let gate = Gate::in_memory();
        let seen = Mutex::new(Vec::new());
        let consumer = RabbitConsumer::connect(&url, config.clone(), "round-trip")
            .await
            .unwrap();
        process_until(consumer, &gate, &seen, 3, RetryPolicy::default()).await;
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, ["r-1", "r-2", "r-3"]);
        // Everything acknowledged, the copy included (the gate called it a duplicate).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = store.status().await;
            if status.backlog == Some(0) && status.consumers == Some(0) {
                break;
            }
            assert!(Instant::now() < deadline, "{status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn failures_go_to_the_dead_letter_queue_and_requeue_brings_them_back() {
    let Some(url) = amqp_url("failures_go_to_the_dead_letter_queue") else {
        return;
    };
    runtime().block_on(async {
        let config = config("dead");
        let store = RabbitStore::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
        assert_eq!(post(&inbox, &["d-1"]).await, 200);
        let consumer = RabbitConsumer::connect(&url, config.clone(), "dead")
            .await
            .unwrap();
        let stop = StopHandle::default();
        let failing =
            |_: Event<'static>| std::future::ready(Err::<(), _>(std::io::Error::other("down")));
        let quick = RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(10), 2);
        let gate = Gate::in_memory();
        let worker = run_worker(consumer.stopped_by(&stop), &gate, failing, quick);
        let watch = async {
            let deadline = Instant::now() + Duration::from_secs(20);
            while store.status().await.dead_letters != Some(1) {
                assert!(Instant::now() < deadline, "{:?}", store.status().await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stop.stop();
        };
        let (done, ()) = tokio::join!(worker, watch);
        done.unwrap();
        assert_eq!(store.status().await.backlog, Some(0));
        // The dead letter holds the record with the last error and the attempts.
        let (error, attempts, history) = peek_dead(&url, &config).await;
        assert_eq!(error, "down");
        assert_eq!(attempts, 2);
        assert_eq!(history, 2, "each attempt with its time and error");
        assert_eq!(store.status().await.dead_letters, Some(1));

        assert_eq!(store.requeue_dead_letters().await.unwrap(), 1);
        assert_eq!(store.status().await.dead_letters, Some(0));
        let seen = Mutex::new(Vec::new());
        let consumer = RabbitConsumer::connect(&url, config.clone(), "dead-2")
            .await
            .unwrap();
        process_until(
            consumer,
            &Gate::in_memory(),
            &seen,
            1,
            RetryPolicy::default(),
        )
        .await;
        assert_eq!(seen.into_inner().unwrap(), ["d-1"]);
    });
}

/// The first dead letter's `x-comapi-error`, `x-comapi-attempts` and attempts in
/// `x-comapi-history`, read from the dead letter's stream (which a read leaves as
/// it was).
async fn peek_dead(url: &str, config: &RabbitConfig) -> (String, i64, usize) {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(10, BasicQosOptions::default())
        .await
        .unwrap();
    let mut from_first = FieldTable::default();
    from_first.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut messages = channel
        .basic_consume(
            config.dead_queue().as_str().into(),
            "peek".into(),
            BasicConsumeOptions::default(),
            from_first,
        )
        .await
        .unwrap();
    let text = |value: Option<&AMQPValue>| match value {
        Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        other => panic!("not text: {other:?}"),
    };
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("a dead letter within 10 s")
            .unwrap()
            .unwrap();
        let headers = message.properties.headers().clone().unwrap_or_default();
        let headers = headers.inner();
        // The console's readers leave fences in the stream.
        if headers.contains_key("x-comapi-fence") {
            continue;
        }
        let error = text(headers.get("x-comapi-error"));
        let attempts = match headers.get("x-comapi-attempts") {
            Some(AMQPValue::LongInt(n)) => i64::from(*n),
            other => panic!("x-comapi-attempts: {other:?}"),
        };
        let history = comapi_webhook::store::history::parse(&text(headers.get("x-comapi-history")));
        connection.close(200, "peeked".into()).await.unwrap();
        return (error, attempts, history.len());
    }
}

#[test]
fn a_stalled_broker_gets_503_at_the_deadline_and_the_store_recovers() {
    let Some(url) = amqp_url("a_stalled_broker_gets_503") else {
        return;
    };
    runtime().block_on(async {
        let target = broker_address(&url);
        let stalled = Arc::new(AtomicBool::new(false));
        let proxied = support::stalling_proxy(target, Arc::clone(&stalled)).await;
        // The topology first, at the default deadline: a stream's first declaration
        // can take longer than the short one below on a busy machine.
        let config = config("stalled");
        RabbitStore::connect(&url, config.clone()).await.unwrap();
        let deadline = Duration::from_millis(800);
        let config = config.with_deadline(deadline);
        let store = RabbitStore::connect(&format!("amqp://guest:guest@{proxied}/%2f"), config)
            .await
            .unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
        assert_eq!(post(&inbox, &["before"]).await, 200);
        stalled.store(true, Ordering::Release);
        let started = Instant::now();
        assert_eq!(post(&inbox, &["stalled"]).await, 503);
        let took = started.elapsed();
        assert!(
            took >= deadline && took < deadline + Duration::from_millis(500),
            "{took:?}"
        );
        stalled.store(false, Ordering::Release);
        let started = Instant::now();
        while post(&inbox, &["after"]).await != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "never recovered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("200 again {:?} after the stall ended", started.elapsed());
    });
}

#[test]
fn a_consumer_whose_start_runs_out_of_time_leaves_no_consumer_behind() {
    let Some(url) = amqp_url("a_consumer_whose_start_runs_out_of_time") else {
        return;
    };
    runtime().block_on(async {
        let target = broker_address(&url);
        let proxied = support::consume_stalling_proxy(target).await;
        let config = config("consume-stalled");
        // The topology first, so that only the consume can run out of time.
        let store = RabbitStore::connect(&url, config.clone()).await.unwrap();
        let error = RabbitConsumer::connect(
            &format!("amqp://guest:guest@{proxied}/%2f"),
            config.with_deadline(Duration::from_secs(2)),
            "stalled",
        )
        .await
        .expect_err("a consume without an answer fails at the deadline");
        assert!(
            format!("{error:?}").contains("no answer within 2s"),
            "{error:?}"
        );
        // The broker took the consumer; the connection that holds it must go, or
        // its prefetch of events would wait for a reader that never comes.
        let started = Instant::now();
        loop {
            let consumers = store.status().await.consumers;
            if consumers == Some(0) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a consumer stayed behind: {consumers:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn a_poison_message_that_kills_its_consumers_is_dead_lettered_by_the_delivery_limit() {
    let Some(url) = amqp_url("a_poison_message") else {
        return;
    };
    runtime().block_on(async {
        let config = config("poison").with_delivery_limit(2);
        let store = RabbitStore::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
        assert_eq!(post(&inbox, &["poison"]).await, 200);
        // Each consumer takes it and dies without acknowledging it, as a worker
        // that crashes on it would: the broker counts each return.
        let mut deliveries = Vec::new();
        for n in 0..3 {
            let mut consumer = RabbitConsumer::connect(&url, config.clone(), &format!("crash-{n}"))
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let batch = loop {
                use comapi_webhook::store::EventSource;
                let batch = consumer.next_batch().await.unwrap().unwrap();
                if !batch.is_empty() || Instant::now() > deadline {
                    break batch;
                }
            };
            if batch.is_empty() {
                break;
            }
            use comapi_webhook::store::Delivery;
            deliveries.push(batch[0].times_delivered());
            drop(consumer); // the connection closes: the message returns to the queue
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // At-least-once dead-lettering keeps the message in the queue until the
            // dead-letter queue confirmed it: wait for both counts.
            let status = store.status().await;
            if status.dead_letters == Some(1) && status.backlog == Some(0) {
                break;
            }
            assert!(Instant::now() < deadline, "{status:?} {deliveries:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(deliveries[..2], [1, 2], "the broker's count of deliveries");
        // The requeue brings it back to be tried again once the cause is fixed.
        assert_eq!(store.requeue_dead_letters().await.unwrap(), 1);
        assert_eq!(store.status().await.backlog, Some(1));
    });
}

/// The worker dead-letters out of order: a later event's last attempt can fail while
/// an earlier one is still being processed. Its dead letter must not acknowledge the
/// earlier one (acknowledgements are cumulative): a crash then hands it out again.
#[test]
fn a_dead_letter_never_acknowledges_an_earlier_unfinished_delivery() {
    use comapi_webhook::store::{Delivery, EventSource};
    let Some(url) = amqp_url("a_dead_letter_never_acknowledges_an_earlier") else {
        return;
    };
    runtime().block_on(async {
        let config = config("out-of-order");
        let store = RabbitStore::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
        assert_eq!(post(&inbox, &["early", "late"]).await, 200);
        let mut consumer = RabbitConsumer::connect(&url, config.clone(), "out-of-order")
            .await
            .unwrap();
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while held.len() < 2 {
            assert!(Instant::now() < deadline, "only {} delivered", held.len());
            held.extend(consumer.next_batch().await.unwrap().unwrap());
        }
        // "late" fails for good while "early" is still in its handler.
        consumer.dead_letter(&held[1], "failed", 3).await.unwrap();
        // The next read acknowledges what is finished, then the worker crashes.
        let _ = tokio::time::timeout(Duration::from_millis(100), consumer.next_batch()).await;
        drop(consumer);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = store.status().await;
            if status.backlog == Some(2) && status.consumers == Some(0) {
                break; // both come again: "early" unfinished, "late" not yet finished
            }
            assert!(Instant::now() < deadline, "{status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(held[0].event().unwrap().event_id(), "early");
        assert_eq!(store.status().await.dead_letters, Some(1));
    });
}

/// Polls `store`'s status until `wanted` holds (the management API samples every
/// 500 ms on the suite's broker).
async fn status_until(store: &RabbitStore, wanted: impl Fn(&StoreStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = store.status().await;
        if wanted(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_status_counts_unacknowledged_deliveries_through_the_management_api() {
    let test = "the_status_counts_unacknowledged_deliveries";
    let (Some(url), Some(management)) = (amqp_url(test), amqp_management_url(test)) else {
        return;
    };
    runtime().block_on(async {
        let config = config("unacked").with_management_url(management.clone());
        let store = RabbitStore::connect(&url, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
        assert_eq!(post(&inbox, &["u-1", "u-2", "u-3"]).await, 200);
        status_until(&store, |s| s.backlog == Some(3) && s.pending == Some(0)).await;

        // A consumer holds the three, unacknowledged.
        let mut consumer = RabbitConsumer::connect(&url, config.clone(), "unacked")
            .await
            .unwrap();
        let mut held = Vec::new();
        while held.len() < 3 {
            held.extend(consumer.next_batch().await.unwrap().unwrap());
        }
        status_until(&store, |s| {
            s.pending == Some(3) && s.backlog == Some(3) && s.consumers == Some(1)
        })
        .await;
        assert_eq!(store.status().await.error, None);

        for delivery in &held {
            consumer.finished(delivery).await.unwrap();
        }
        consumer.flush().await.unwrap();
        status_until(&store, |s| s.pending == Some(0) && s.backlog == Some(0)).await;

        // Wrong credentials: the AMQP figures stay, the error says why the rest is missing.
        let refused = management.replacen("http://", "http://nobody:wrong@", 1);
        let wrong = RabbitStore::connect(&url, config.clone().with_management_url(refused))
            .await
            .unwrap();
        let status = wrong.status().await;
        assert_eq!(
            (status.backlog, status.pending),
            (Some(0), None),
            "{status:?}"
        );
        assert_eq!(status.dead_letters, Some(0), "{status:?}");
        let error = status.error.unwrap_or_default();
        assert!(error.contains("answered 401"), "{error}");
        assert!(
            !error.contains("wrong"),
            "the password stays out of it: {error}"
        );

        // A management URL that is not http fails at connect, saying so; https
        // needs rabbitmq-tls (tests/rabbit_tls.rs reads the count over https).
        let ftp = config.clone().with_management_url("ftp://127.0.0.1:21");
        let error = RabbitStore::connect(&url, ftp).await.unwrap_err();
        assert!(
            error.report().to_string().contains("is not http"),
            "{error}"
        );
        let https = config.with_management_url("https://127.0.0.1:15671");
        let connected = RabbitStore::connect(&url, https).await;
        if cfg!(feature = "rabbitmq-tls") {
            connected.unwrap();
        } else {
            let error = connected.unwrap_err().report().to_string();
            assert!(error.contains("needs the feature rabbitmq-tls"), "{error}");
        }
    });
}

/// A broker with the quorum queue an earlier version made for the dead letter:
/// both the store and a consumer say what to do, naming the queue.
#[test]
fn an_earlier_versions_dead_letter_queue_is_named_with_what_to_do() {
    let Some(url) = amqp_url("an_earlier_versions_dead_letter_queue") else {
        return;
    };
    runtime().block_on(async {
        use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let config = config("old-dead");
        let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(config.dead_queue().as_str().into(), durable, quorum)
            .await
            .unwrap();
        let store = RabbitStore::connect(&url, config.clone())
            .await
            .unwrap_err();
        let consumer = RabbitConsumer::connect(&url, config.clone(), "old")
            .await
            .unwrap_err();
        for error in [store, consumer] {
            let report = error.report().to_string();
            assert!(
                report.contains(&format!("rabbitmqctl delete_queue {}", config.dead_queue()))
                    && report.contains("earlier version"),
                "{report}"
            );
        }
        channel
            .queue_delete(
                config.dead_queue().as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
    });
}
