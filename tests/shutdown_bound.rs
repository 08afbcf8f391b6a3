//! One shutdown bound, on the real reference receivers: SIGTERM to exit within
//! `COMAPI_SHUTDOWN_GRACE` in total, with a body that stalls, a store that stalls
//! (Redis behind a proxy that holds every byte) and a handler that outlasts the
//! grace, all at once; and nothing answered 200 is lost: a receiver started again
//! processes it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use process::{Receiver, SECRET, client, event_json, post_signed};
use support::{example_binary, redis_url, runtime, stalling_proxy, unique_prefix};

const GRACE: Duration = Duration::from_secs(6);

fn receiver(name: &str, redis: &str, prefix: &str, slow: bool) -> Receiver {
    let mut command = Command::new(example_binary(name));
    command
        .env("COMAPI_REDIS_URL", redis)
        .env("COMAPI_REDIS_PREFIX", prefix)
        .env("COMAPI_WORKER", "true")
        // What the stopped worker held is taken over once idle this long.
        .env("COMAPI_LEASE", "3s")
        .env("COMAPI_SHUTDOWN_GRACE", format!("{}s", GRACE.as_secs()))
        .env("COMAPI_BODY_TIMEOUT", "30s");
    if slow {
        command.env("DEMO_SLOW", "60s");
    }
    Receiver::start_command(name, command, SECRET)
}

fn post(url: &str, id: &str) -> Result<u16, String> {
    runtime().block_on(async {
        let client = client();
        let answer = post_signed(&client, url, SECRET, event_json(id));
        match tokio::time::timeout(Duration::from_secs(15), answer).await {
            Ok(answer) => answer,
            Err(_) => Err("no answer in 15 s".to_owned()),
        }
    })
}

fn exits_within_the_grace(name: &str) {
    let test = format!("{name}_exits_within_the_grace");
    let Some(url) = redis_url(&test) else {
        return;
    };
    let prefix = unique_prefix(&test);
    let rt = runtime();
    let stalled = Arc::new(AtomicBool::new(false));
    let target = url.trim_start_matches("redis://").trim_end_matches('/');
    let proxy = rt.block_on(stalling_proxy(target.to_owned(), Arc::clone(&stalled)));
    let mut slow = receiver(name, &format!("redis://{proxy}/"), &prefix, true);

    // An event in the handler (which takes a minute) …
    assert_eq!(post(&slow.url, "in-the-handler"), Ok(200), "{name}");
    std::thread::sleep(Duration::from_millis(1_500));
    // … a body that stalls (its deadline is 30 s) …
    let addr = slow.url.trim_start_matches("http://").to_owned();
    let mut body = TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Comapi-Signature: {}\r\nContent-Length: 1000\r\n\r\n{{\"eventId\"",
        "0".repeat(40)
    );
    body.write_all(head.as_bytes()).unwrap();
    // … and a request whose store stalls.
    stalled.store(true, Ordering::Release);
    let stalled_url = slow.url.clone();
    let while_stalled = std::thread::spawn(move || post(&stalled_url, "while-stalled"));
    std::thread::sleep(Duration::from_millis(300));

    let asked = Instant::now();
    slow.signal("-TERM");
    let status = slow.wait(Duration::from_secs(45));
    let took = asked.elapsed();
    let log = slow.log.lock().unwrap().clone();
    stalled.store(false, Ordering::Release);
    let while_stalled = while_stalled.join().unwrap();
    eprintln!(
        "{name}: exited {status} {took:?} after SIGTERM (grace {GRACE:?}); the stalled request: {while_stalled:?}"
    );
    assert!(
        took <= GRACE + Duration::from_millis(800),
        "{name}: exited {took:?} after SIGTERM, grace {GRACE:?}:\n{log}"
    );
    assert_eq!(status.code(), Some(0), "{name}:\n{log}");
    drop(body);

    // Nothing answered 200 is lost: started again, it processes what it stored
    // (taking over, after the lease, what the stopped worker held).
    let mut expected = vec!["in-the-handler"];
    if while_stalled == Ok(200) {
        expected.push("while-stalled");
    }
    let again = receiver(name, &url, &prefix, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let processed = again.processed();
        if expected.iter().all(|id| processed.contains(*id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {expected:?} not all processed: {processed:?}\n{}",
            again.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(again);
    drop(rt);
}

#[test]
fn the_hyper_receiver_exits_within_its_grace_whatever_holds_it() {
    exits_within_the_grace("hyper_receiver");
}

#[test]
fn the_actix_receiver_exits_within_its_grace_whatever_holds_it() {
    exits_within_the_grace("actix_receiver");
}
