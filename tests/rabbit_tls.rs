//! `amqps://` and an `https://` management API (feature `rabbitmq-tls`) with the
//! real binaries and a node of the test's own that takes TLS with a certificate
//! signed by the test's CA: trusted through `SSL_CERT_FILE`, a receiver stores over
//! TLS, a worker processes, and the status page reads the unacknowledged count over
//! https; not trusted, the receiver refuses to start and says why, and a management
//! API it cannot trust leaves the AMQP figures and says why on the page.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
#[path = "support/rabbit.rs"]
mod rabbit;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use process::{Receiver, SECRET, client, event_json, output_within, post_signed, status_page};
use rabbit::OwnRabbit;
use support::{example_binary, runtime, unique_prefix};

#[test]
fn events_travel_over_tls_to_a_broker_whose_ca_is_trusted_and_never_to_one_whose_is_not() {
    let Some(broker) = OwnRabbit::start_tls("events_travel_over_tls") else {
        return;
    };
    let queue = unique_prefix("tls").replace(':', ".");
    let start = |name: &str| {
        let mut command = Command::new(example_binary(name));
        command
            .env("COMAPI_AMQP_URL", broker.tls_url())
            .env("COMAPI_AMQP_QUEUE", &queue)
            .env("COMAPI_AMQP_MANAGEMENT_URL", broker.management_https_url())
            .env("SSL_CERT_FILE", broker.ca_file())
            .env("METRICS_PORT", "0");
        Receiver::start_command(name, command, SECRET)
    };
    let receiver = start("hyper_receiver");
    let worker = start("worker");
    runtime().block_on(async {
        let status = post_signed(
            &client(),
            &format!("{}/", receiver.url),
            SECRET,
            event_json("tls-1"),
        )
        .await;
        assert_eq!(status, Ok(200));
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !worker.processed().contains("tls-1") {
        assert!(
            Instant::now() < deadline,
            "never processed:\n{}",
            worker.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The unacknowledged count, read over https.
    runtime().block_on(page_until(
        &receiver,
        "Waiting to be processed: <strong>0</strong> (0 of them handed to a worker",
    ));

    // The management API's CA not trusted, AMQP without TLS: the receiver stores,
    // and its page keeps the AMQP figures and says why the count is missing.
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .env("COMAPI_AMQP_URL", broker.url())
        .env("COMAPI_AMQP_QUEUE", &queue)
        .env("COMAPI_AMQP_MANAGEMENT_URL", broker.management_https_url())
        .env("SSL_CERT_FILE", broker.other_ca_file())
        .env_remove("SSL_CERT_DIR");
    let untrusting = Receiver::start_command("hyper_receiver", command, SECRET);
    runtime().block_on(async {
        let url = format!("{}/", untrusting.url);
        let status = post_signed(&client(), &url, SECRET, event_json("tls-2")).await;
        assert_eq!(status, Ok(200));
        page_until(&untrusting, "certificate").await;
        let page = status_page(&untrusting).await;
        assert!(page.contains("Waiting to be processed: <strong>"), "{page}");
        assert!(!page.contains("processed: <strong>unknown"), "{page}");
        assert!(!page.contains("handed to a worker"), "{page}");
        let said = page.lines().find(|l| l.contains("certificate"));
        eprintln!("the page says: {}", said.unwrap_or_default());
    });
    drop(untrusting);

    // The same broker, its CA not trusted: no connection, a clear refusal.
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .env("COMAPI_WEBHOOK_SECRET", SECRET)
        .env("COMAPI_AMQP_URL", broker.tls_url())
        .env("COMAPI_AMQP_QUEUE", &queue)
        .env("PORT", "0")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    let refused = output_within(command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot connect to RabbitMQ") && stderr.contains("certificate"),
        "{stderr}"
    );
}

/// Polls the receiver's status page until it holds `wanted`.
async fn page_until(receiver: &Receiver, wanted: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page = status_page(receiver).await;
        if page.contains(wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "no {wanted:?} in\n{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
