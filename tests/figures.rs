//! The figures a receiver shows agree between its status page and `/metrics`: a
//! figure the store cannot tell is "unknown" on the page and absent from the
//! metrics, never 0; a receiver without a worker exports no worker figures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
#[path = "support/rabbit.rs"]
mod rabbit;
mod support;

use std::process::Command;

use process::{Receiver, SECRET, status_page};
use support::{example_binary, redis_url, runtime, temp_dir, unique_prefix};

/// The receiver's status page and its `/metrics` text.
fn page_and_metrics(receiver: &Receiver) -> (String, String) {
    runtime().block_on(async {
        let page = status_page(receiver).await;
        (
            page,
            process::get(&format!("{}/metrics", receiver.url)).await,
        )
    })
}

#[test]
fn a_rabbitmq_receiver_leaves_out_what_the_queue_cannot_tell() {
    let Some(url) = rabbit::amqp_url("a_rabbitmq_receiver_leaves_out_what_the_queue_cannot_tell")
    else {
        return;
    };
    let queue = unique_prefix("figures").replace(':', ".");
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .env("COMAPI_AMQP_URL", &url)
        .env("COMAPI_AMQP_QUEUE", &queue);
    let receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    let (page, metrics) = page_and_metrics(&receiver);
    assert!(
        page.contains("Events stored: <strong>unknown</strong>"),
        "{page}"
    );
    assert!(
        !metrics.contains("comapi_webhook_stored_events"),
        "{metrics}"
    );
    // What the queue tells is in both.
    assert!(
        page.contains("In the dead letter: <strong>0</strong>"),
        "{page}"
    );
    assert!(
        metrics.contains("comapi_webhook_dead_letter_events 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("comapi_webhook_handler_seconds"),
        "{metrics}"
    );
}

#[test]
fn a_redis_receiver_without_a_worker_exports_no_worker_figures() {
    let Some(url) = redis_url("a_redis_receiver_without_a_worker_exports_no_worker_figures") else {
        return;
    };
    let dir = temp_dir("figures-redis");
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .env("COMAPI_REDIS_URL", &url)
        .env("COMAPI_REDIS_PREFIX", unique_prefix("figures"))
        .env("COMAPI_SPOOL_DIR", &dir);
    let receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    let (_, metrics) = page_and_metrics(&receiver);
    assert!(
        metrics.contains("comapi_webhook_requests_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("comapi_webhook_stored_events 0"),
        "{metrics}"
    );
    for absent in ["handler_seconds", "decisions_total", "handler_total"] {
        assert!(!metrics.contains(absent), "{absent} in:\n{metrics}");
    }
    // With a worker in the process, the worker's figures are there.
    let spool = Receiver::start("hyper_receiver", &dir, SECRET);
    let (_, metrics) = page_and_metrics(&spool);
    assert!(
        metrics.contains("comapi_webhook_handler_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("comapi_webhook_stored_events 0"),
        "{metrics}"
    );
}
