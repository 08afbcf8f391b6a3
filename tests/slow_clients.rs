//! Slow and hostile clients against the real reference receivers, each started
//! with `ulimit -n 1024`: 1,100 connections that send half a request line and
//! stall cost neither Comapi's requests (answered within 2 s, at the receivers'
//! defaults) nor the CPU, and each is closed within the header deadline; a body
//! that stalls is answered or closed within the body deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use process::{Receiver, SECRET, client, event_json, post_signed};
use support::{example_binary, runtime, temp_dir};

const STALLED: usize = 1_100;

/// `name` started under `ulimit -n 1024` with the extra settings `env`.
fn start(name: &str, spool: &std::path::Path, env: &[(&str, &str)]) -> Receiver {
    let mut command = Command::new("bash");
    command
        .args(["-c", "ulimit -n 1024 && exec \"$0\""])
        .arg(example_binary(name))
        .env("COMAPI_SPOOL_DIR", spool);
    for (key, value) in env {
        command.env(key, value);
    }
    Receiver::start_command(name, command, SECRET)
}

/// The CPU time (user and system) the process `pid` has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// Connections that sent `prefix` and stall; returns them with when each opened.
fn stall(addr: &str, count: usize, prefix: &[u8]) -> Vec<(TcpStream, Instant)> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(prefix).unwrap();
            stream.set_nonblocking(true).unwrap();
            (stream, Instant::now())
        })
        .collect()
}

/// Waits until every connection was answered or closed, or `limit` passed; returns
/// for each how long after it opened that happened (`None`: still open).
fn ends(mut open: Vec<(TcpStream, Instant)>, limit: Duration) -> Vec<Option<Duration>> {
    let mut ended = vec![None; open.len()];
    let until = Instant::now() + limit;
    let mut buf = [0u8; 512];
    while Instant::now() < until && ended.iter().any(Option::is_none) {
        for (i, (stream, opened)) in open.iter_mut().enumerate() {
            if ended[i].is_some() {
                continue;
            }
            match stream.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // An answer (a 408), an end of file or a reset: it is not held.
                _ => ended[i] = Some(opened.elapsed()),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ended
}

/// 1,100 stalled connections against `name` started with `env`; each must be
/// closed within `held_at_most` of its opening (the client's connects and the
/// kernel's queue included), and Comapi's request answered 200 within 2 s.
fn slow_loris(name: &str, env: &[(&str, &str)], held_at_most: Duration) {
    let dir = temp_dir(&format!("{name}-slow-loris"));
    let receiver = start(name, &dir, env);
    let addr = receiver.url.trim_start_matches("http://").to_owned();
    let pid = receiver.child.id();
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let stalled = stall(
        &addr,
        STALLED,
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
    );
    // Comapi's request, behind 1,100 stalled ones.
    let posted = Instant::now();
    let status = runtime().block_on(async {
        let client = client();
        let answer = post_signed(&client, &receiver.url, SECRET, event_json("comapi"));
        tokio::time::timeout(Duration::from_secs(10), answer).await
    });
    let answered_in = posted.elapsed();
    assert_eq!(status, Ok(Ok(200)), "{name}");
    assert!(
        answered_in <= Duration::from_secs(2),
        "{name}: answered after {answered_in:?}"
    );
    let ended = ends(stalled, held_at_most + Duration::from_secs(2));
    let spent = started.elapsed();
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    let open = ended.iter().filter(|e| e.is_none()).count();
    assert_eq!(open, 0, "{name}: {open} stalled connections still open");
    let slowest = ended.iter().flatten().max().copied().unwrap_or_default();
    eprintln!(
        "{name}: 200 in {answered_in:?} behind {STALLED} stalled connections; the slowest closed \
         after {slowest:?}; {cpu:?} CPU in {spent:?}"
    );
    assert!(
        slowest <= held_at_most,
        "{name}: a stalled connection was held {slowest:?}"
    );
    // Near idle: a small share of one core while the stalled connections wait.
    assert!(
        cpu.as_secs_f64() <= 0.25 * spent.as_secs_f64(),
        "{name}: {cpu:?} CPU in {spent:?}"
    );

    // A body that promises 100 bytes, sends 10 and stalls: answered or closed
    // within the body deadline (1 s here).
    let body_stalled = stall(
        &addr,
        1,
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"eventId\"",
    );
    let ended = ends(body_stalled, Duration::from_secs(5));
    let held = ended[0].expect("a stalled body is held for good");
    assert!(
        held <= Duration::from_millis(2_000),
        "{name}: a stalled body was held {held:?}"
    );
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

// Both at their defaults (a header deadline of 5 s for hyper_receiver, which also
// makes room at its connection limit, and 1 s for actix_receiver; connections up
// to the open-file limit less 64); the body deadline shortened only for the
// stalled body at the end.

#[test]
fn the_hyper_receiver_at_its_defaults_answers_behind_stalled_connections() {
    // Rounds of the header deadline while the client's connects wait in the
    // kernel's queue: each closed within a few seconds of opening.
    slow_loris(
        "hyper_receiver",
        &[("COMAPI_BODY_TIMEOUT", "1s")],
        Duration::from_secs(10),
    );
}

#[test]
fn the_actix_receiver_at_its_defaults_answers_behind_stalled_connections() {
    // actix-web closes late headers itself but never makes room early: Comapi's
    // request waits in the kernel's queue for at most one header deadline.
    slow_loris(
        "actix_receiver",
        &[("COMAPI_BODY_TIMEOUT", "1s")],
        Duration::from_secs(10),
    );
}

#[test]
fn the_hyper_receiver_sheds_stalled_connections_whatever_its_header_deadline() {
    // A header deadline of 5 s and 512 connections: at the limit, Comapi's request
    // takes the place of the longest-idle stalled connection at once.
    slow_loris(
        "hyper_receiver",
        &[
            ("COMAPI_BODY_TIMEOUT", "1s"),
            ("COMAPI_HEADER_TIMEOUT", "5s"),
            ("COMAPI_MAX_CONNECTIONS", "512"),
        ],
        Duration::from_secs(11),
    );
}

/// A signed POST of one event as raw HTTP/1.1 on `stream`, kept alive; the status.
fn post_on(stream: &mut TcpStream, id: &str) -> u16 {
    let body = event_json(id);
    let signature = comapi_webhook::Verifier::new(SECRET)
        .unwrap()
        .sign(body.as_bytes());
    let request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-Comapi-Signature: {signature}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    // The answer's head and its short body ("ok\n").
    while !answer.ends_with(b"ok\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&answer).into_owned();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn keeps_idle_connections(name: &str) {
    let dir = temp_dir(&format!("{name}-keep-alive"));
    let receiver = start(name, &dir, &[("COMAPI_HEADER_TIMEOUT", "1s")]);
    let addr = receiver.url.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr).unwrap();
    assert_eq!(post_on(&mut stream, "first"), 200, "{name}");
    // Idle past the header deadline (1 s), within the idle one (5 s).
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(post_on(&mut stream, "second"), 200, "{name}");
    drop(receiver);
}

#[test]
fn the_hyper_receiver_keeps_an_idle_connection_for_its_next_request() {
    keeps_idle_connections("hyper_receiver");
}

#[test]
fn the_actix_receiver_keeps_an_idle_connection_for_its_next_request() {
    keeps_idle_connections("actix_receiver");
}
