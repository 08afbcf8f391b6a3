//! Hostile bodies against the real reference receivers at their default settings:
//! many stalled bodies cannot buy the process's memory, and Comapi's signed
//! request still gets through.
//!
//! - 300 connections, each with a wrong signature and a 4 MiB body that stalls one
//!   byte short: refused from their `Content-Length` (413), the process stays
//!   small, and a signed POST sent meanwhile is answered 200.
//! - 300 bodies just under the 1 MiB limit, each one byte short: at most the body
//!   budget (64 MiB) is held; the rest are answered 503 with `Retry-After` at once,
//!   and once the held ones meet their deadline the signed POST is stored.
//! - 300 bodies without a signature: 401 before a byte of them is read.
//!
//! A receiver this busy may read some requests' headers after its header deadline
//! (1 s): those are answered 408, unread too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use process::{Receiver, SECRET, client, event_json, metric, post_signed};
use support::{example_binary, runtime, temp_dir};

const HOSTILE: usize = 300;
const MIB: usize = 1024 * 1024;
/// The largest peak resident size allowed under the hostile bodies.
const PEAK_RSS_LIMIT: usize = 256 * MIB;

/// `name` at its default body settings (limit, budget), with a body deadline of
/// `body_timeout`.
fn start(name: &str, spool: &std::path::Path, body_timeout: &str) -> Receiver {
    let mut command = Command::new("bash");
    command
        .args(["-c", "ulimit -n 4096 && exec \"$0\""])
        .arg(example_binary(name))
        .env("COMAPI_SPOOL_DIR", spool)
        .env("COMAPI_BODY_TIMEOUT", body_timeout)
        .env("RUST_LOG", "warn");
    Receiver::start_command(name, command, SECRET)
}

/// The receiver's peak resident size, in bytes, checked against the limit.
fn assert_peak_within_limit(name: &str, receiver: &Receiver) -> usize {
    let peak = peak_rss(receiver.child.id());
    assert!(
        peak <= PEAK_RSS_LIMIT,
        "{name}: peak RSS {} MiB",
        peak / MIB
    );
    peak
}

/// The process's peak resident size, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// A connection that sent a POST's headers (`signature`, if any, and a
/// `Content-Length` of `length`) and then all but the last byte of the body, from
/// a thread of its own (the write blocks once the receiver stops reading); the
/// thread ends when the connection does.
fn stalled_body(addr: &str, signature: Option<&str>, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    let signature = signature
        .map(|s| format!("X-Comapi-Signature: {s}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{signature}\
         Content-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![b' '; 64 * 1024];
        let mut left = length - 1;
        while left > 0 {
            let n = left.min(chunk.len());
            if writer.write_all(&chunk[..n]).is_err() {
                return; // answered and closed
            }
            left -= n;
        }
    });
    stream
}

/// The status line's code of the answer on `stream`, if one comes within `limit`.
fn answer(stream: &mut TcpStream, limit: Duration) -> Option<(u16, String)> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head))
}

/// A signed POST of one event, with its status.
fn signed_post(url: &str, id: &str) -> u16 {
    runtime().block_on(async {
        let client = client();
        let answer = post_signed(&client, url, SECRET, event_json(id));
        tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered within Comapi's 10 s")
            .unwrap()
    })
}

fn metrics_text(url: &str) -> String {
    runtime().block_on(async {
        let response = client()
            .get(format!("{url}/metrics").parse().unwrap())
            .await
            .unwrap();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        String::from_utf8(body.to_bytes().to_vec()).unwrap()
    })
}

fn over_the_limit(name: &str) {
    let dir = temp_dir(&format!("{name}-over-the-limit"));
    let receiver = start(name, &dir, "10s");
    let addr = receiver.url.trim_start_matches("http://").to_owned();
    let wrong = "0".repeat(40);
    let mut bodies: Vec<TcpStream> = (0..HOSTILE)
        .map(|_| stalled_body(&addr, Some(&wrong), 4 * MIB - 1))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let posted = Instant::now();
    assert_eq!(signed_post(&receiver.url, "while-hostile"), 200, "{name}");
    let answered_in = posted.elapsed();
    let statuses: Vec<Option<u16>> = bodies
        .iter_mut()
        .map(|s| answer(s, Duration::from_secs(5)).map(|(code, _)| code))
        .collect();
    let peak = assert_peak_within_limit(name, &receiver);
    eprintln!(
        "{name}: {HOSTILE} stalled 4 MiB bodies: peak RSS {} MiB; the signed POST answered 200 \
         in {answered_in:?}",
        peak / MIB
    );
    // Refused unread: 413 from the `Content-Length`, or 408 for headers that a
    // receiver this busy read after its header deadline (1 s on actix).
    assert!(
        statuses.iter().all(|s| matches!(s, Some(413 | 408))),
        "{name}: {statuses:?}"
    );
    assert!(statuses.contains(&Some(413)), "{name}: {statuses:?}");
    drop(receiver);
}

fn within_the_limit(name: &str) {
    let dir = temp_dir(&format!("{name}-within-the-limit"));
    let receiver = start(name, &dir, "3s");
    let addr = receiver.url.trim_start_matches("http://").to_owned();
    let wrong = "0".repeat(40);
    let opened = Instant::now();
    let mut bodies: Vec<TcpStream> = (0..HOSTILE)
        .map(|_| stalled_body(&addr, Some(&wrong), MIB - 1))
        .collect();
    // Those with no room are answered at once; the others hold their bytes.
    std::thread::sleep(Duration::from_millis(1_500));
    let held = metric(&metrics_text(&receiver.url), "comapi_webhook_body_bytes").unwrap();
    let budget = metric(
        &metrics_text(&receiver.url),
        "comapi_webhook_body_budget_bytes",
    )
    .unwrap();
    assert!(held > 0.0 && held <= budget, "{name}: {held} of {budget}");
    assert_peak_within_limit(name, &receiver);
    let answers: Vec<(Option<(u16, String)>, Duration)> = bodies
        .iter_mut()
        .map(|s| (answer(s, Duration::from_secs(10)), opened.elapsed()))
        .collect();
    let no_room = answers
        .iter()
        .filter(|(a, _)| a.as_ref().is_some_and(|(code, _)| *code == 503))
        .count();
    let timed_out = answers
        .iter()
        .filter(|(a, _)| a.as_ref().is_some_and(|(code, _)| *code == 408))
        .count();
    assert_eq!(no_room + timed_out, HOSTILE, "{name}: {answers:?}");
    assert!(
        no_room > 0 && timed_out > 0,
        "{name}: {no_room} 503, {timed_out} 408"
    );
    for (answer, _) in &answers {
        let (code, head) = answer.as_ref().unwrap();
        if *code == 503 {
            assert!(
                head.contains("retry-after: 1") || head.contains("Retry-After: 1"),
                "{head}"
            );
        }
    }
    // Every held body was let go at its deadline: the budget is free again.
    let slowest = answers.iter().map(|(_, t)| *t).max().unwrap();
    assert!(
        slowest <= Duration::from_secs(6),
        "{name}: held {slowest:?}"
    );
    assert_eq!(signed_post(&receiver.url, "after-hostile"), 200, "{name}");
    let held = metric(&metrics_text(&receiver.url), "comapi_webhook_body_bytes").unwrap();
    assert_eq!(held, 0.0, "{name}");
    let peak = assert_peak_within_limit(name, &receiver);
    eprintln!(
        "{name}: {HOSTILE} stalled bodies of 1 MiB: {no_room} answered 503 at once, \
         {timed_out} held to their deadline; peak RSS {} MiB",
        peak / MIB
    );
    drop(receiver);
}

fn unsigned(name: &str) {
    let dir = temp_dir(&format!("{name}-unsigned"));
    let receiver = start(name, &dir, "10s");
    let addr = receiver.url.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    let mut bodies: Vec<TcpStream> = (0..HOSTILE)
        .map(|_| stalled_body(&addr, None, MIB - 1))
        .collect();
    let mut unauthorized = 0;
    for body in &mut bodies {
        let (code, _) = answer(body, Duration::from_secs(5)).expect("answered");
        // 401 unread, or 408 for headers read after the header deadline (1 s).
        assert!(matches!(code, 401 | 408), "{name}: {code}");
        unauthorized += usize::from(code == 401);
    }
    assert!(unauthorized > 0, "{name}");
    let spent = started.elapsed();
    // None of them waited for its body's deadline.
    assert!(spent < Duration::from_secs(5), "{name}: {spent:?}");
    let peak = assert_peak_within_limit(name, &receiver);
    eprintln!(
        "{name}: {HOSTILE} unsigned bodies answered 401 in {spent:?}; peak RSS {} MiB",
        peak / MIB
    );
    drop(receiver);
}

#[test]
fn the_hyper_receiver_refuses_bodies_over_the_limit_and_stays_small() {
    over_the_limit("hyper_receiver");
}

#[test]
fn the_actix_receiver_refuses_bodies_over_the_limit_and_stays_small() {
    over_the_limit("actix_receiver");
}

#[test]
fn the_hyper_receiver_holds_no_more_than_its_body_budget() {
    within_the_limit("hyper_receiver");
}

#[test]
fn the_actix_receiver_holds_no_more_than_its_body_budget() {
    within_the_limit("actix_receiver");
}

#[test]
fn the_hyper_receiver_reads_no_unsigned_body() {
    unsigned("hyper_receiver");
}

#[test]
fn the_actix_receiver_reads_no_unsigned_body() {
    unsigned("actix_receiver");
}
