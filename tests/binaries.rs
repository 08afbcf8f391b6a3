//! The other binaries and the receivers' options, as built by `cargo test`: the
//! sender signs and posts (a fixture as a fresh event), the verifying ceiling
//! answers as the receivers do, every binary's `--help`, and `/metrics` behind
//! `COMAPI_METRICS_TOKEN`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;
use process::{Receiver, SECRET, client, event_json, output_within, post, post_signed, spooled};
use support::{example_binary, runtime, temp_dir};

use std::process::Command;
use std::time::{Duration, Instant};

const PREVIOUS: &str = "the-previous-secret-0123456789";

#[test]
fn the_sender_signs_and_posts() {
    let dir = temp_dir("sender");
    let receiver = Receiver::start("hyper_receiver", &dir, SECRET);
    let send = |secret: &str, extra: &[&str]| {
        Command::new(example_binary("send_event"))
            .args(["--url", &format!("{}/", receiver.url), "--secret", secret])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = send(SECRET, &["--curl"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .starts_with("curl -sS -X POST"),
        "{stdout}"
    );
    assert!(
        stdout.lines().nth(1).unwrap().starts_with("200"),
        "{stdout}"
    );
    // A second run is a new message, not a retry or an older state of the first.
    assert!(send(SECRET, &[]).status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.processed().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "both samples were not processed as fresh:\n{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!receiver.log.lock().unwrap().contains("decision=stale"));
    let help = send(SECRET, &["--help"]);
    assert!(help.status.success(), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: send_event"));
    let file = dir.join("batch.json");
    std::fs::write(
        &file,
        format!("[{},{}]", event_json("file-1"), event_json("file-2")),
    )
    .unwrap();
    assert!(
        send(SECRET, &["--file", file.to_str().unwrap(), "--as-is"])
            .status
            .success()
    );
    // A fixture dated 2017 goes out as a new event, processed rather than skipped
    // as outside the replay window.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/events/message_delivered.json"
    );
    let sent = send(SECRET, &["--file", fixture]);
    assert!(sent.status.success(), "{sent:?}");
    let wrong = send("a-wrong-secret-0123456789", &[]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stdout).starts_with("401"));
    let stored = spooled(&dir);
    assert_eq!(
        stored.len(),
        5,
        "the two samples, the two from the file, the fixture: {stored:?}"
    );
    assert!(stored.contains_key("file-1") && stored.contains_key("file-2"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.processed().len() < 5 {
        assert!(
            Instant::now() < deadline,
            "not all processed:\n{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!receiver.log.lock().unwrap().contains("event skipped"));
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

/// The load benchmark's reference that verifies and parses without storing must
/// answer as the receivers do, or the gap it shows would mean nothing.
#[test]
fn the_verifying_ceiling_verifies_and_parses() {
    let mut command = Command::new(example_binary("http_ceiling"));
    command.env("CEILING", "verify");
    let ceiling = Receiver::start_command("http_ceiling", command, SECRET);
    let url = format!("{}/", ceiling.url);
    let event = event_json("ceiling-1");
    runtime().block_on(async {
        let client = client();
        assert_eq!(
            post_signed(&client, &url, SECRET, event.clone()).await,
            Ok(200)
        );
        let answer = post(&client, &url, None, event.clone().into_bytes()).await;
        assert_eq!(answer.map(|(status, _)| status), Ok(401));
        let answer = post_signed(&client, &url, PREVIOUS, event).await;
        assert_eq!(answer, Ok(401));
        let answer = post_signed(&client, &url, SECRET, "not json".to_owned()).await;
        assert_eq!(answer, Ok(400));
    });
    drop(ceiling);

    let mut command = Command::new(example_binary("http_ceiling"));
    command.env("CEILING", "sometimes").env("PORT", "0");
    let output = output_within(command, Duration::from_secs(30));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CEILING must be bare or verify"),
        "{stderr}"
    );
}

#[test]
fn every_binary_prints_its_usage_on_help_and_exits_0() {
    let mut binaries = vec![
        "hyper_receiver",
        "actix_receiver",
        "send_event",
        "requeue",
        "http_ceiling",
    ];
    binaries.push("worker");
    if cfg!(feature = "redis") {
        binaries.push("drain");
    }
    if cfg!(feature = "axum") {
        binaries.push("axum_receiver");
    }
    for name in binaries {
        let mut command = Command::new(example_binary(name));
        command.arg("--help").env("COMAPI_WEBHOOK_SECRET", SECRET);
        let output = output_within(command, Duration::from_secs(10));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{name} --help: {output:?}");
        assert!(stdout.contains(name), "{name} --help names it: {stdout}");
        assert!(stdout.lines().count() >= 2, "{name} --help: {stdout}");
    }
    // Anything else is refused with the usage, rather than ignored.
    let mut command = Command::new(example_binary("hyper_receiver"));
    command
        .arg("--port=9000")
        .env("COMAPI_WEBHOOK_SECRET", SECRET);
    let output = output_within(command, Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("COMAPI_WEBHOOK_SECRET"));
}

/// `GET /metrics` with a body and `WWW-Authenticate`, as a client sees them.
async fn get_metrics(url: &str, token: Option<&str>) -> (u16, Option<String>, String) {
    get_metrics_as(url, token.map(|token| format!("Bearer {token}"))).await
}

/// [`get_metrics`] with the whole `Authorization` value.
async fn get_metrics_with(url: &str, authorization: &str) -> (u16, Option<String>, String) {
    get_metrics_as(url, Some(authorization.to_owned())).await
}

async fn get_metrics_as(url: &str, authorization: Option<String>) -> (u16, Option<String>, String) {
    let mut request = http::Request::get(format!("{url}/metrics"));
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let request = request
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (
        status,
        challenge,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[test]
fn a_metrics_token_protects_the_metrics_of_both_receivers() {
    for name in ["hyper_receiver", "actix_receiver"] {
        let dir = temp_dir("metrics-token");
        let mut command = Command::new(example_binary(name));
        command
            .env("COMAPI_SPOOL_DIR", &dir)
            .env("COMAPI_METRICS_TOKEN", "the-metrics-token");
        let receiver = Receiver::start_command(name, command, SECRET);
        runtime().block_on(async {
            for wrong in [
                None,
                Some("a-wrong-token"),
                Some("the-metrics-token-and-more"),
            ] {
                let (status, challenge, _) = get_metrics(&receiver.url, wrong).await;
                assert_eq!(status, 401, "{name} {wrong:?}");
                assert_eq!(challenge.as_deref(), Some("Bearer realm=\"metrics\""));
            }
            let (status, _, body) = get_metrics(&receiver.url, Some("the-metrics-token")).await;
            assert_eq!(status, 200, "{name}");
            assert!(body.contains("comapi_webhook_requests"), "{body}");
            // The scheme is case-insensitive (RFC 9110).
            let lowercase = get_metrics_with(&receiver.url, "bearer the-metrics-token").await;
            assert_eq!(lowercase.0, 200, "{name}");
        });
        drop(receiver);
        let _ = std::fs::remove_dir_all(dir);
    }
    // Open metrics on an address beyond loopback: one warning at start.
    let dir = temp_dir("metrics-open");
    let mut command = Command::new(example_binary("hyper_receiver"));
    command.env("COMAPI_SPOOL_DIR", &dir).env("BIND", "0.0.0.0");
    let receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    // Logged before `listening on`; its reader thread may not have it yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !receiver
        .log
        .lock()
        .unwrap()
        .contains("COMAPI_METRICS_TOKEN")
    {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = receiver.log.lock().unwrap().clone();
    assert_eq!(log.matches("set COMAPI_METRICS_TOKEN").count(), 1, "{log}");
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

/// The axum example serves what the README's snippet builds: `send_event` gets a
/// 200, and the event is processed.
#[cfg(feature = "axum")]
#[test]
fn the_axum_example_serves_and_processes_what_send_event_sends() {
    let dir = temp_dir("axum");
    let mut command = Command::new(example_binary("axum_receiver"));
    command.env("COMAPI_SPOOL_DIR", &dir);
    let receiver = Receiver::start_command("axum_receiver", command, SECRET);
    let sent = Command::new(example_binary("send_event"))
        .args(["--url", &format!("{}/", receiver.url), "--secret", SECRET])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert!(String::from_utf8_lossy(&sent.stdout).starts_with("200"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.processed().is_empty() {
        assert!(
            Instant::now() < deadline,
            "not processed:\n{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    runtime().block_on(async {
        let (status, _, body) = get_metrics(&receiver.url, None).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("comapi_webhook_events_stored_total 1"),
            "{body}"
        );
    });
}

/// The dead letter in seconds, with no code edit: `DEMO_FAIL` fails the sample,
/// the retry variables make three quick attempts, `requeue` brings it back and the
/// receiver, restarted without the switch, processes it.
#[test]
fn the_dead_letter_demo_takes_seconds_and_the_requeue_brings_it_back() {
    let dir = temp_dir("dead-letter-demo");
    let start = |demo: bool| {
        let mut command = Command::new(example_binary("hyper_receiver"));
        command
            .env("COMAPI_SPOOL_DIR", &dir)
            .env("COMAPI_RETRY_ATTEMPTS", "3")
            .env("COMAPI_RETRY_FIRST_DELAY", "100ms");
        if demo {
            command.env("DEMO_FAIL", "message.sent");
        }
        Receiver::start_command("hyper_receiver", command, SECRET)
    };
    let mut receiver = start(true);
    let sent = Command::new(example_binary("send_event"))
        .args(["--url", &format!("{}/", receiver.url), "--secret", SECRET])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&sent.stdout).starts_with("200"),
        "{sent:?}"
    );
    let sent_at = Instant::now();
    while !receiver
        .log
        .lock()
        .unwrap()
        .contains("kept in the dead letter")
    {
        assert!(
            sent_at.elapsed() < Duration::from_secs(10),
            "not dead-lettered:\n{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("dead-lettered {:?} after the 200", sent_at.elapsed());
    let log = receiver.log.lock().unwrap().clone();
    assert_eq!(
        log.matches("processing failed; moved to the retry schedule")
            .count(),
        2,
        "{log}"
    );
    let dead = std::fs::read_to_string(dir.join("dead-letter.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(dead.contains("DEMO_FAIL names message.sent"), "{dead}");
    receiver.signal("-TERM");
    assert!(receiver.wait(Duration::from_secs(30)).success());

    let requeued = Command::new(example_binary("requeue"))
        .env("COMAPI_SPOOL_DIR", &*dir)
        .output()
        .unwrap();
    assert!(requeued.status.success(), "{requeued:?}");
    let receiver = start(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.processed().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the requeued event was not processed:\n{}",
            receiver.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
