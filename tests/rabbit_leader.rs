//! A RabbitMQ queue that cannot take publishes, on the real receiver and a node of
//! the test's own: the queue's Raft member stopped, so the quorum queue is still
//! declared but has no leader (what a member restarted as a new Raft server looks
//! like, rabbitmq-server issues 15725 and 10070). The receiver answers 503, and
//! its log (once) and its status page say why and what to run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
#[path = "support/rabbit.rs"]
mod rabbit_support;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use process::{Receiver, SECRET, client, event_json, post_signed, status_page};
use rabbit_support::OwnRabbit;
use support::{example_binary, runtime, unique_prefix};

fn post(receiver: &Receiver, id: &str) -> u16 {
    runtime().block_on(async {
        let client = client();
        post_signed(&client, &receiver.url, SECRET, event_json(id))
            .await
            .unwrap()
    })
}

#[test]
fn a_queue_without_a_leader_is_named_in_the_log_once_and_on_the_status_page() {
    let test = "a_queue_without_a_leader_is_named_in_the_log_once_and_on_the_status_page";
    let Some(rabbit) = OwnRabbit::start(test) else {
        return;
    };
    let queue = unique_prefix(test).replace(':', ".");
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .env("COMAPI_AMQP_URL", rabbit.url())
        .env("COMAPI_AMQP_QUEUE", &queue);
    let receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    assert_eq!(post(&receiver, "before"), 200);

    rabbit.stop_queue_member(&queue);
    for n in 0..3 {
        assert_eq!(post(&receiver, &format!("without-a-leader-{n}")), 503);
    }
    // Said once (the look at the queue runs behind the 503s).
    let hint = format!("Run `rabbitmq-queues quorum_status {queue}`");
    let said = || receiver.log.lock().unwrap().matches(&hint).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while said() == 0 {
        assert!(
            Instant::now() < deadline,
            "{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(post(&receiver, "still-without-a-leader"), 503);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(said(), 1, "{}", receiver.log.lock().unwrap());
    let page = runtime().block_on(status_page(&receiver));
    assert!(page.contains("quorum queue without a leader"), "{page}");

    // Back with its member: stored again, and the page says so.
    rabbit.restart_queue_member(&queue);
    let deadline = Instant::now() + Duration::from_secs(30);
    while post(&receiver, "after") != 200 {
        assert!(
            Instant::now() < deadline,
            "{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The page's figures are cached for a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let page = runtime().block_on(status_page(&receiver));
        if !page.contains("without a leader") {
            break;
        }
        assert!(Instant::now() < deadline, "{page}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
