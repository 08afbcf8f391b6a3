//! The reference receivers, as built by `cargo test`, over real sockets: the status
//! page, every answer of the receive step, rotation, 1,000 concurrent posts, a
//! SIGTERM under load, a `kill -9` under load followed by a restart, and a damaged
//! spool line set aside.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
mod support;
use process::{
    MAX_BODY, Receiver, SECRET, client, event_json, metric, output_within, post, post_signed,
    spooled,
};
use support::{example_binary, runtime, spool_line, temp_dir};

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comapi_webhook::Verifier;
use http_body_util::BodyExt;

const PREVIOUS: &str = "the-previous-secret-0123456789";

fn answers(name: &str) {
    let dir = temp_dir(&format!("{name}-answers"));
    let receiver = Receiver::start(name, &dir, &format!("{SECRET}, {PREVIOUS}"));
    let url = format!("{}/", receiver.url);
    runtime().block_on(async {
        let client = client();

        // 1. The status page.
        let response = client.get(url.parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let page = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&page).contains("Events stored: <strong>0</strong>"));

        // 2. A single event and a batch.
        assert_eq!(
            post_signed(&client, &url, SECRET, event_json("single-1")).await,
            Ok(200)
        );
        let batch = format!(
            "[\n{},\n{}\n]",
            event_json("batch-1"),
            event_json("batch-2")
        );
        assert_eq!(post_signed(&client, &url, SECRET, batch).await, Ok(200));
        assert_eq!(
            post_signed(&client, &url, SECRET, "[]".to_owned()).await,
            Ok(200)
        );

        // 3. Tampered body, wrong secret, missing header: 401.
        let body = event_json("bad-1");
        let good = Verifier::new(SECRET)
            .unwrap()
            .sign(body.as_bytes())
            .to_string();
        let tampered = body.replace("café", "cafe");
        assert_eq!(
            post(&client, &url, Some(&good), tampered.into_bytes())
                .await
                .unwrap()
                .0,
            401
        );
        assert_eq!(
            post_signed(
                &client,
                &url,
                "a-wrong-secret-0123456789",
                event_json("bad-2")
            )
            .await,
            Ok(401)
        );
        assert_eq!(
            post(&client, &url, None, event_json("bad-3").into_bytes())
                .await
                .unwrap()
                .0,
            401
        );

        // 4. A valid signature over something that is not an event: 400.
        assert_eq!(
            post_signed(&client, &url, SECRET, "not json".to_owned()).await,
            Ok(400)
        );
        let (status, text) = {
            let body = format!("[{}, {{\"eventId\":7}}]", event_json("bad-4"));
            let signature = Verifier::new(SECRET)
                .unwrap()
                .sign(body.as_bytes())
                .to_string();
            post(&client, &url, Some(&signature), body.into_bytes())
                .await
                .unwrap()
        };
        assert_eq!(status, 400);
        assert!(text.contains("[1].eventId"), "{text}");
        let lacks_id = format!("[{}, {{\"name\":\"message.sent\"}}]", event_json("bad-5"));
        assert_eq!(post_signed(&client, &url, SECRET, lacks_id).await, Ok(400));

        // 5. Signed batches whose fields drifted from the documented types (a
        // payload of the wrong shape, a fractional revision, a numeric apiSpaceId,
        // an object etag, a payload that is a string, no payload): stored whole.
        let drifted = std::fs::read_to_string("tests/fixtures/drifted/batch_drifted.json").unwrap();
        assert_eq!(post_signed(&client, &url, SECRET, drifted).await, Ok(200));
        let shapes = r#"[{"eventId":"drift-1","name":"conversation.create","payload":{"id":{"n":1}},"revision":[1]},
                         {"eventId":"drift-2","name":"message.failed","payload":{"id":null,"details":[]},"accountId":1.5}]"#;
        assert_eq!(post_signed(&client, &url, SECRET, shapes.to_owned()).await, Ok(200));

        // 6. Over the limit: 413, signed or not.
        let huge = format!(
            r#"{{"eventId":"big","name":"x","payload":{{"pad":"{}"}}}}"#,
            "x".repeat(MAX_BODY)
        );
        assert_eq!(post_signed(&client, &url, SECRET, huge).await, Ok(413));

        // 7. The previous secret during a rotation.
        assert_eq!(
            post_signed(&client, &url, PREVIOUS, event_json("rotated-1")).await,
            Ok(200)
        );

        // The page's figures are cached for a second: within it, the count before.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let response = client.get(url.parse().unwrap()).await.unwrap();
            let page = response.into_body().collect().await.unwrap().to_bytes();
            let page = String::from_utf8_lossy(&page);
            if page.contains("Events stored: <strong>12</strong>") {
                break;
            }
            assert!(Instant::now() < deadline, "{page}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // 8. Once the worker has processed them all, the status page says so, and
        // /metrics agrees with what was sent: 6 answers 200, 3 401, 3 400, 1 413;
        // 12 events stored, 6 fresh (the drifted fixtures are dated 2017: expired).
        let get = |path: &str| {
            let client = client.clone();
            let uri = format!("{}{path}", receiver.url);
            async move {
                let response = client.get(uri.parse().unwrap()).await.unwrap();
                let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (kind, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !get("/").await.1.contains("Waiting to be processed: <strong>0</strong>") {
            assert!(Instant::now() < deadline, "{}", get("/").await.1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let page = get("/").await.1;
        assert!(page.contains("In the dead letter: <strong>0</strong>"), "{page}");
        assert!(page.contains("Store: the local spool in"), "{page}");
        let (kind, metrics) = get("/metrics").await;
        assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
        assert!(metrics.ends_with("# EOF\n"), "{metrics}");
        for (name, want) in [
            ("comapi_webhook_requests_total{status=\"200\"}", 6.0),
            ("comapi_webhook_requests_total{status=\"401\"}", 3.0),
            ("comapi_webhook_requests_total{status=\"400\"}", 3.0),
            ("comapi_webhook_requests_total{status=\"413\"}", 1.0),
            ("comapi_webhook_events_stored_total", 12.0),
            ("comapi_webhook_store_seconds_count", 5.0),
            ("comapi_webhook_decisions_total{decision=\"fresh\"}", 6.0),
            ("comapi_webhook_decisions_total{decision=\"expired\"}", 6.0),
            ("comapi_webhook_handler_total{outcome=\"success\"}", 6.0),
            ("comapi_webhook_handler_seconds_count", 6.0),
            ("comapi_webhook_backlog_events", 0.0),
            ("comapi_webhook_dead_letter_events", 0.0),
        ] {
            assert_eq!(metric(&metrics, name), Some(want), "{name} in:\n{metrics}");
        }
    });
    let stored = spooled(&dir);
    let drifted_ids = (3000..3006).map(|n| format!("5eed0000-0000-4000-8000-{n:012x}"));
    let want: HashMap<String, usize> = [
        "single-1",
        "batch-1",
        "batch-2",
        "rotated-1",
        "drift-1",
        "drift-2",
    ]
    .iter()
    .map(|id| (*id).to_owned())
    .chain(drifted_ids)
    .map(|id| (id, 1))
    .collect();
    assert_eq!(stored, want, "every good event exactly once, nothing else");
    let lines = std::fs::read_to_string(dir.join("segment-0000000001.jsonl")).unwrap();
    let rotated = lines.lines().find(|l| l.contains("rotated-1")).unwrap();
    assert!(rotated.contains("\"secretIndex\":1"), "{rotated}");
    assert!(!lines.contains(SECRET) && !lines.contains(PREVIOUS));

    // Every refusal is logged at warn with its status and reason, never the
    // signature or the body; a wrong secret reads as such.
    let log = receiver.log.lock().unwrap().clone();
    // The drifted fixtures are dated 2017: skipped as expired, and said loudly.
    let expired = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("dated outside the replay window"))
        .count();
    assert_eq!(expired, 6, "{log}");
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    assert!(refusals.iter().all(|l| l.contains("WARN")), "{log}");
    for (status, reason) in [
        ("401", "signature mismatch"),
        ("401", "missing X-Comapi-Signature header"),
        ("400", "[1].eventId"),
        ("413", "over the limit"),
    ] {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains(&format!("status={status}")) && l.contains(reason)),
            "no {status} refusal saying {reason:?} in:\n{log}"
        );
    }
    let wrong = Verifier::new("a-wrong-secret-0123456789")
        .unwrap()
        .sign(event_json("bad-2").as_bytes())
        .to_string();
    assert!(
        !log.contains(&wrong[..20]) && !log.contains("café"),
        "{log}"
    );

    // A flood of refusals is logged at most ten lines a second, and the next line
    // says how many were left out.
    runtime().block_on(async {
        let client = client();
        for _ in 0..60 {
            let sent = post(&client, &url, None, b"{}".to_vec()).await.unwrap();
            assert_eq!(sent.0, 401);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            post(&client, &url, None, b"{}".to_vec()).await.unwrap().0,
            401
        );
    });
    std::thread::sleep(Duration::from_millis(200));
    let log = receiver.log.lock().unwrap().clone();
    let flood = log.matches("request refused").count() - refusals.len();
    assert!(flood <= 21, "{flood} lines for 61 refusals:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("request refused") && !l.contains("suppressed_before=0")),
        "no line said how many were left out:\n{log}"
    );
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

fn thousand_concurrent_posts(name: &str) {
    let dir = temp_dir(&format!("{name}-thousand"));
    // actix_receiver's default header deadline (1 s, its slow-loris bound) cuts a
    // burst of new connections it has not read within a second, a documented
    // price that two cores shared with this client and the other tests can reach;
    // the burst is what this test is about, so it gets hyper_receiver's 5 s.
    let mut command = Command::new(example_binary(name));
    command
        .env("COMAPI_SPOOL_DIR", &dir)
        .env("COMAPI_MAX_BODY_BYTES", process::MAX_BODY.to_string())
        .env("COMAPI_HEADER_TIMEOUT", "5s");
    let receiver = Receiver::start_command(name, command, SECRET);
    let url = format!("{}/", receiver.url);
    let statuses = runtime().block_on(async {
        let client = client();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000 {
            let (client, url) = (client.clone(), url.clone());
            tasks.spawn(async move {
                post_signed(&client, &url, SECRET, event_json(&format!("c-{i}"))).await
            });
        }
        let mut statuses = Vec::new();
        while let Some(result) = tasks.join_next().await {
            statuses.push(result.unwrap());
        }
        statuses
    });
    assert_eq!(statuses.len(), 1000);
    assert!(
        statuses.iter().all(|s| *s == Ok(200)),
        "{:?}",
        statuses.iter().find(|s| **s != Ok(200))
    );
    let stored = spooled(&dir);
    assert_eq!(stored.len(), 1000);
    assert!(stored.values().all(|&n| n == 1));
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

/// Posts unique events from 16 tasks until `stop` is set or the receiver goes away;
/// returns the ids answered 200.
async fn load(url: String, prefix: &str, stop: Arc<AtomicBool>) -> Vec<String> {
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let (client, url, stop, prefix) = (
            client.clone(),
            url.clone(),
            Arc::clone(&stop),
            prefix.to_owned(),
        );
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("{prefix}-{t}-{n}");
                match post_signed(&client, &url, SECRET, event_json(&id)).await {
                    Ok(200) => acked.push(id),
                    Ok(status) => panic!("unexpected status {status}"),
                    Err(_) => break, // the receiver is gone
                }
            }
            acked
        });
    }
    let mut acked = Vec::new();
    while let Some(result) = tasks.join_next().await {
        acked.extend(result.unwrap());
    }
    acked
}

/// Every acknowledged event is in the spool.
fn assert_all_stored(acked: &[String], stored: &HashMap<String, usize>, when: &str) {
    assert!(
        acked.len() > 50,
        "the load ran: {} acknowledged",
        acked.len()
    );
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost {when}: {missing:?}",
        missing.len()
    );
}

fn sigterm_under_load(name: &str) {
    let dir = temp_dir(&format!("{name}-sigterm"));
    let mut receiver = Receiver::start(name, &dir, SECRET);
    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime();
    let load = rt.spawn(load(
        format!("{}/", receiver.url),
        "term",
        Arc::clone(&stop),
    ));
    std::thread::sleep(Duration::from_millis(700));
    receiver.signal("-TERM");
    let status = receiver.wait(Duration::from_secs(40));
    stop.store(true, Ordering::Relaxed);
    let acked = rt.block_on(load).unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        receiver.log.lock().unwrap()
    );
    let stored = spooled(&dir);
    assert_all_stored(&acked, &stored, "by SIGTERM");
    // The worker drained the spool before the exit.
    let processed = receiver.processed();
    assert!(
        stored.keys().all(|id| processed.contains(id)),
        "the worker missed events before exiting"
    );
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

fn kill_9_under_load_then_restart(name: &str) {
    let dir = temp_dir(&format!("{name}-kill9"));
    let mut first = Receiver::start(name, &dir, SECRET);
    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime();
    let load = rt.spawn(load(format!("{}/", first.url), "kill", Arc::clone(&stop)));
    // Long enough for the worker to acknowledge a position (it does once a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("offset").exists() {
        assert!(
            Instant::now() < deadline,
            "the worker never acknowledged a position"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    first.signal("-KILL");
    first.wait(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let acked = rt.block_on(load).unwrap();
    let processed_before = first.processed();

    let second = Receiver::start(name, &dir, SECRET);
    let stored = spooled(&dir);
    assert_all_stored(&acked, &stored, "by kill -9");
    assert!(stored.values().all(|&n| n == 1));

    // The worker resumes from its offset: between the two runs every stored event
    // is processed, none skipped.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let processed: HashSet<String> = processed_before
            .union(&second.processed())
            .cloned()
            .collect();
        let unprocessed = stored.keys().filter(|id| !processed.contains(*id)).count();
        if unprocessed == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unprocessed} stored events never reached the worker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And it did resume rather than start over: the restart reprocessed at most the
    // events since the last acknowledged position, not everything.
    let again = processed_before.intersection(&second.processed()).count();
    assert!(
        again < stored.len(),
        "the worker started from the beginning again"
    );
    drop(second);
    let _ = std::fs::remove_dir_all(dir);
}

/// A damaged line in the spool (here, one whose `message.sent` id is a number) must
/// not stop the worker: it is kept in `rejected.jsonl`, logged, and the events after
/// it are processed, old and new.
fn sets_aside_a_damaged_line_and_goes_on(name: &str) {
    let dir = temp_dir(&format!("{name}-set-aside"));
    // No intake stores an envelope without an eventId: this line was damaged on disk.
    let damaged = spool_line(r#"{"eventld":"damaged","name":"message.sent","payload":{"id":"m"}}"#);
    let lines = [
        spool_line(&event_json("before")),
        damaged.clone(),
        spool_line(&event_json("after")),
    ];
    std::fs::write(dir.join("segment-0000000001.jsonl"), lines.concat()).unwrap();
    let receiver = Receiver::start(name, &dir, SECRET);
    let status = runtime()
        .block_on(post_signed(
            &client(),
            &format!("{}/", receiver.url),
            SECRET,
            event_json("posted"),
        ))
        .unwrap();
    assert_eq!(status, 200);
    let want: HashSet<String> = ["before", "after", "posted"].map(str::to_owned).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !receiver.processed().is_superset(&want) {
        assert!(
            Instant::now() < deadline,
            "the worker stopped at the damaged line; processed {:?}",
            receiver.processed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!receiver.processed().contains("damaged"));
    assert_eq!(std::fs::read(dir.join("rejected.jsonl")).unwrap(), damaged);
    let log = receiver.log.lock().unwrap().clone();
    assert!(log.contains("kept in rejected.jsonl"), "{log}");
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

fn refuses_bad_configuration(name: &str) {
    let dir = temp_dir(&format!("{name}-config"));
    let a_file = dir.join("not-a-folder");
    std::fs::write(&a_file, b"").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let spool = dir.join("spool").display().to_string();
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[], "COMAPI_WEBHOOK_SECRET is required"),
        (
            &[("COMAPI_WEBHOOK_SECRET", "short")],
            "COMAPI_WEBHOOK_SECRET: entry 1 of 1 is 5 bytes",
        ),
        (
            &[("COMAPI_WEBHOOK_SECRET", "the-current-secret-0123456789, ,x")],
            "COMAPI_WEBHOOK_SECRET: entry 2 of 3 is empty",
        ),
        (
            &[("COMAPI_SPOOL_KEEP", "sometimes")],
            "COMAPI_SPOOL_KEEP must be true or false",
        ),
        (
            &[("COMAPI_SPOOL_DIR", a_file.to_str().unwrap())],
            "COMAPI_SPOOL_DIR",
        ),
        (&[("PORT", taken_port.as_str())], "PORT"),
    ];
    for (env, message) in cases {
        let mut command = Command::new(example_binary(name));
        command
            .env("COMAPI_WEBHOOK_SECRET", SECRET)
            .env("PORT", "0")
            .env("COMAPI_SPOOL_DIR", &spool)
            .env("COMAPI_SPOOL_KEEP", "false");
        if message.contains("is required") {
            command.env_remove("COMAPI_WEBHOOK_SECRET");
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let output = output_within(command, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name} started with {env:?}");
        let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error.len(), 1, "one error line: {stderr}");
        assert!(error[0].contains(message), "{env:?}: {stderr}");
        assert!(!stderr.contains(SECRET), "{stderr}");
    }
    drop(taken);
    let _ = std::fs::remove_dir_all(dir);
}

/// The worker thread runs at idle CPU priority, so it only takes CPU time that
/// requests leave unused; the threads that answer requests keep the normal policy.
#[cfg(target_os = "linux")]
fn worker_yields_to_requests(name: &str) {
    const SCHED_OTHER: u32 = 0;
    const SCHED_IDLE: u32 = 5;
    let dir = temp_dir(&format!("{name}-priority"));
    let receiver = Receiver::start(name, &dir, SECRET);
    let tasks = Path::new("/proc")
        .join(receiver.child.id().to_string())
        .join("task");
    let policies = |wanted: &str| -> Vec<u32> {
        std::fs::read_dir(&tasks)
            .unwrap()
            .filter_map(|task| {
                let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
                // `pid (comm) state ...`: the fields after the name, policy is field 41.
                let (head, fields) = stat.rsplit_once(") ")?;
                let comm = head.split_once(" (")?.1;
                (comm == wanted).then(|| fields.split(' ').nth(41 - 3)?.parse().ok())?
            })
            .collect()
    };
    // A thread names itself as it starts, and the worker sets its own policy then,
    // which may be just after the address line on a busy machine: allow a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while policies("comapi-worker") != [SCHED_IDLE] || policies("comapi-spool-wr").is_empty() {
        assert!(
            Instant::now() < deadline,
            "worker policies {:?} (want SCHED_IDLE), spool writer policies {:?}",
            policies("comapi-worker"),
            policies("comapi-spool-wr")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(policies("comapi-spool-wr"), [SCHED_OTHER]);
    drop(receiver);
    let _ = std::fs::remove_dir_all(dir);
}

macro_rules! receiver_tests {
    ($($module:ident => $binary:literal),*) => {$(
        mod $module {
            #[test]
            fn answers() { super::answers($binary) }
            #[test]
            fn thousand_concurrent_posts() { super::thousand_concurrent_posts($binary) }
            #[test]
            fn sigterm_under_load() { super::sigterm_under_load($binary) }
            #[test]
            fn kill_9_under_load_then_restart() { super::kill_9_under_load_then_restart($binary) }
            #[test]
            fn refuses_bad_configuration() { super::refuses_bad_configuration($binary) }
            #[test]
            fn sets_aside_a_damaged_line_and_goes_on() { super::sets_aside_a_damaged_line_and_goes_on($binary) }
            #[cfg(target_os = "linux")]
            #[test]
            fn worker_yields_to_requests() { super::worker_yields_to_requests($binary) }
        }
    )*};
}

receiver_tests!(hyper_receiver => "hyper_receiver", actix_receiver => "actix_receiver");
