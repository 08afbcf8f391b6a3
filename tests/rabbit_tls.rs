//! `amqps://` (feature `rabbitmq-tls`) with the real binaries and a node of the
//! test's own that takes TLS with a certificate signed by the test's CA: trusted
//! through `SSL_CERT_FILE`, a receiver stores over TLS and a worker processes; not
//! trusted, the receiver refuses to start and says why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
#[path = "support/rabbit.rs"]
mod rabbit;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use process::{Receiver, SECRET, client, event_json, output_within, post_signed};
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
