//! The broker's own ceiling for `scripts/loadtest.sh` (a benchmark tool): the
//! receivers' records published to a quorum queue with publisher confirms from one
//! process, with no HTTP. CONNECTIONS tasks each publish one record and wait for its
//! confirm, again and again, on one shared confirm-mode channel (as concurrent
//! requests do in `RabbitStore`), for DURATION seconds; it prints the rate and the
//! confirm latency in the load test's `RESULT` line.
//!
//! ```sh
//! cargo run --release --features rabbitmq --example rabbit_ceiling -- amqp://guest:guest@127.0.0.1:5672/%2f QUEUE 64 5
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comapi_webhook::store::EventStore;
use comapi_webhook::store::rabbitmq::{RabbitConfig, RabbitStore};
use comapi_webhook::{Inbox, Verifier};

const SECRET: &str = "rabbit-ceiling-secret-0123456789";
const USAGE: &str = "usage: rabbit_ceiling AMQP_URL QUEUE CONNECTIONS SECONDS";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--help" || a == "-h") {
        println!("rabbit_ceiling: the broker's ceiling for the load test\n{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let (Some(url), Some(queue), Some(tasks), Some(seconds)) = (
        args.first(),
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
        args.get(3).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("error: {USAGE}");
        return std::process::ExitCode::from(2);
    };
    let store = match RabbitStore::connect(url, RabbitConfig::default().with_queue(queue)).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("error: {}", error.report());
            return std::process::ExitCode::FAILURE;
        }
    };
    // The records the receivers store: an inbox over the same store makes them,
    // without HTTP; its verification costs about a microsecond an event.
    let inbox = Arc::new(Inbox::new(
        Verifier::new(SECRET).unwrap_or_else(|_| unreachable!()),
        store,
    ));
    let body = include_str!("../tests/fixtures/events/message_sent_sms.json").as_bytes();
    let mut headers = http::HeaderMap::new();
    let signature = Verifier::new(SECRET)
        .map(|v| v.sign(body).to_string())
        .unwrap_or_default();
    if let Ok(value) = signature.parse() {
        headers.insert(comapi_webhook::SIGNATURE_HEADER, value);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (inbox, headers, stop) = (Arc::clone(&inbox), headers.clone(), Arc::clone(&stop));
        workers.spawn(async move {
            let (mut latencies, mut failed) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                if inbox.receive(&headers, body).await.status().is_success() {
                    latencies.push(at.elapsed());
                } else {
                    failed += 1;
                }
            }
            (latencies, failed)
        });
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut failed) = (Vec::new(), 0);
    while let Some(Ok((mut each, f))) = workers.join_next().await {
        latencies.append(&mut each);
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let stored = inbox.store().status().await.backlog.unwrap_or(0);
    eprintln!("{stored} messages in the queue");
    println!(
        "RESULT {} {failed} 0 {:.1} {:.3} {:.3}",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        at(0.5),
        at(0.99)
    );
    std::process::ExitCode::SUCCESS
}
