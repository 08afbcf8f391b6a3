//! A source that fails mid-run (the stream's connection cut by a proxy of the
//! test's own, as when a broker closes a channel or a router drops it) while the
//! worker has processed events whose claims are still being completed in the gate
//! (a Redis behind a proxy that holds every byte for a moment): the run completes
//! those claims before its lanes go, so that when the source hands the events out
//! again the gate calls them duplicates and no handler runs twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::gate::{RedisGate, RedisGateConfig};
use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig, StreamConsumers};
use comapi_webhook::{Event, Inbox, Verifier, Worker};
use support::{SECRET, cutting_proxy, post, redis_url, runtime, stalling_proxy, unique_prefix};

const EVENTS: usize = 40;

#[test]
fn a_source_error_completes_what_was_processed_before_the_lanes_go() {
    let test = "a_source_error_completes_what_was_processed_before_the_lanes_go";
    let Some(redis) = redis_url(test) else {
        return;
    };
    let rt = runtime();
    let prefix = unique_prefix(test);
    let config = RedisStreamConfig::default()
        .with_key_prefix(&prefix)
        .with_lease(Duration::from_secs(2));
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let gate_stalled = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(tokio::sync::Notify::new());
    let (worker, stream) = rt.block_on(async {
        // The events, stored before the worker starts: it reads them in one batch
        // and claims them in one call.
        let store = RedisStream::connect(&redis, config.clone()).await.unwrap();
        let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), store.clone());
        let ids: Vec<String> = (0..EVENTS).map(|n| format!("e-{n}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(post(&inbox, &ids).await, 200);

        let target = redis.trim_start_matches("redis://").trim_end_matches('/');
        let gate_proxy = stalling_proxy(target.to_owned(), Arc::clone(&gate_stalled)).await;
        let gate_config = RedisGateConfig::default().with_key_prefix(&prefix);
        let gate = RedisGate::connect(&format!("redis://{gate_proxy}/"), gate_config)
            .await
            .unwrap();
        let stream_proxy = cutting_proxy(target.to_owned(), Arc::clone(&cut)).await;

        // The fifth handler call stalls the gate: the completion in flight then
        // waits, and the later calls' completions queue up behind it.
        let (counted, stall) = (Arc::clone(&calls), Arc::clone(&gate_stalled));
        let handler = move |event: Event<'static>| {
            let id = event.event_id().to_owned();
            let mut calls = counted.lock().unwrap();
            *calls.entry(id).or_default() += 1;
            let nth = calls.values().sum::<usize>();
            if nth == 5 {
                stall.store(true, Ordering::Release);
            }
            async move {
                if nth > 5 {
                    // Finished after the completer took the stalled batch.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok::<(), std::io::Error>(())
            }
        };
        let consumers = StreamConsumers::new(&format!("redis://{stream_proxy}/"), config.clone());
        let retry = comapi_webhook::worker::RetryPolicy::default();
        let worker = Worker::spawn(consumers, gate, handler, support::worker_config(retry));
        (worker.unwrap(), store)
    });
    // Every event handled (all in one batch, claimed before the stall), the gate
    // stalled with completions pending.
    let handled = || calls.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while handled() < EVENTS {
        assert!(Instant::now() < deadline, "{:?}", calls.lock().unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(gate_stalled.load(Ordering::Acquire));
    // The stream's connection goes; a moment later (well within the gate's
    // timeout) the gate answers again.
    cut.notify_waiters();
    std::thread::sleep(Duration::from_millis(300));
    gate_stalled.store(false, Ordering::Release);
    // The worker's next run gets every unacknowledged event again, each a
    // duplicate now, and acknowledges it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = rt.block_on(comapi_webhook::store::EventStore::status(&stream));
        if status.backlog == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let twice: Vec<(String, usize)> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id.clone(), *n))
        .collect();
    rt.block_on(worker.shutdown_within(Duration::from_secs(5)));
    assert_eq!(calls.lock().unwrap().len(), EVENTS);
    assert!(twice.is_empty(), "handled twice: {twice:?}");
}
