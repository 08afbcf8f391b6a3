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

/// `GET path` on the receiver at `url` with `authorization`, over a connection of
/// its own: the status and the body.
fn get_with(url: &str, path: &str, authorization: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let authorization =
        authorization.map_or_else(String::new, |a| format!("Authorization: {a}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn with_a_token_the_status_page_shows_no_figures() {
    let dir = temp_dir("figures-token");
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .env("COMAPI_SPOOL_DIR", &dir)
        .env("COMAPI_METRICS_TOKEN", "the-metrics-token");
    let receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    let (status, page) = get_with(&receiver.url, "/", None);
    assert_eq!(status, 200);
    assert!(page.contains("Comapi webhook receiver is up"), "{page}");
    assert!(page.contains(env!("CARGO_PKG_VERSION")), "{page}");
    for figure in [
        "Events stored",
        "dead letter",
        "spool",
        dir.to_str().unwrap(),
    ] {
        assert!(
            !page.contains(figure),
            "{figure:?} on the public page:\n{page}"
        );
    }
    let (status, _) = get_with(&receiver.url, "/metrics", None);
    assert_eq!(status, 401);
    let (status, metrics) = get_with(&receiver.url, "/metrics", Some("Bearer the-metrics-token"));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("comapi_webhook_dead_letter_events 0"),
        "{metrics}"
    );
}

#[test]
fn the_worker_s_metrics_ask_for_the_token_and_warn_when_open_beyond_loopback() {
    let Some(url) = redis_url("the_worker_s_metrics_ask_for_the_token") else {
        return;
    };
    let worker = |settings: &[(&str, &str)]| {
        let mut command = Command::new(example_binary("worker"));
        command
            .env("COMAPI_REDIS_URL", &url)
            .env("COMAPI_REDIS_PREFIX", unique_prefix("figures-worker"))
            .env("METRICS_PORT", "0")
            .envs(settings.iter().copied());
        Receiver::start_command("worker", command, SECRET)
    };
    let protected = worker(&[("COMAPI_METRICS_TOKEN", "the-metrics-token")]);
    for wrong in [None, Some("Bearer not-the-token")] {
        assert_eq!(
            get_with(&protected.url, "/metrics", wrong).0,
            401,
            "{wrong:?}"
        );
    }
    let (status, metrics) = get_with(&protected.url, "/metrics", Some("Bearer the-metrics-token"));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("comapi_webhook_handler_seconds"),
        "{metrics}"
    );
    drop(protected);
    let open = worker(&[("BIND", "0.0.0.0")]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !open
        .log
        .lock()
        .unwrap()
        .contains("set COMAPI_METRICS_TOKEN")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = open.log.lock().unwrap().clone();
    assert_eq!(log.matches("set COMAPI_METRICS_TOKEN").count(), 1, "{log}");
}

/// The commands Redis has run in all, from `INFO commandstats`, less the `INFO`s.
async fn commands_run(url: &str) -> u64 {
    let mut connection = support::redis_connection(url).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn a_flood_of_status_pages_asks_the_store_at_most_once_a_second() {
    let Some(redis) = process::OwnRedis::start("a_flood_of_status_pages_asks_the_store") else {
        return;
    };
    let dir = temp_dir("figures-flood");
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .env("COMAPI_REDIS_URL", redis.url())
        .env("COMAPI_SPOOL_DIR", &dir);
    let receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    let page = format!("{}/", receiver.url);
    runtime().block_on(async {
        // What one status query costs, the cache empty.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let before = commands_run(&redis.url()).await;
        let one = process::get(&page).await;
        assert!(one.contains("Events stored: <strong>0</strong>"), "{one}");
        let per_query = commands_run(&redis.url()).await - before;
        assert!(per_query > 0, "the status page asked Redis nothing");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let before = commands_run(&redis.url()).await;
        let started = std::time::Instant::now();
        let mut gets = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let page = page.clone();
            gets.spawn(async move { process::get(&page).await });
        }
        while let Some(got) = gets.join_next().await {
            assert!(got.unwrap().contains("Events stored"));
        }
        let took = started.elapsed();
        let queries = (commands_run(&redis.url()).await - before) as f64 / per_query as f64;
        eprintln!("1,000 GETs of / in {took:?}: {queries} store queries of {per_query} commands");
        // One query a second at most, the first one included.
        let allowed = 1.0 + took.as_secs_f64().ceil();
        assert!(
            queries <= allowed.max(2.0),
            "{queries} store queries in {took:?}"
        );
    });
}
