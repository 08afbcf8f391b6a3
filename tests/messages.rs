//! What the real binaries say when a setting or the other side is wrong: each
//! message names the cause and what to do, with the exit status the binaries
//! document (2 a wrong setting, 1 a store or peer that failed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/process.rs"]
mod process;
#[path = "support/rabbit.rs"]
mod rabbit;
mod support;

use std::process::{Command, Output};
use std::time::Duration;

use process::{OwnRedis, Receiver, SECRET, output_within};
use support::{example_binary, runtime, temp_dir};

/// Runs the binary `name` with `env` on top of a clean environment for this
/// crate's variables, and returns its exit status and standard error.
fn run(name: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut command = Command::new(example_binary(name));
    for variable in [
        "COMAPI_SPOOL_DIR",
        "COMAPI_REDIS_URL",
        "COMAPI_AMQP_URL",
        "COMAPI_GATE_REDIS_URL",
        "PORT",
        "RUST_LOG",
    ] {
        command.env_remove(variable);
    }
    command
        .env("COMAPI_WEBHOOK_SECRET", SECRET)
        .envs(env.iter().copied())
        .args(args);
    let Output { status, stderr, .. } = output_within(command, Duration::from_secs(30));
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn says(output: &(i32, String), code: i32, text: &str) {
    assert_eq!(output.0, code, "exit status; it said:\n{}", output.1);
    assert!(
        output.1.contains(text),
        "expected {text:?} in:\n{}",
        output.1
    );
}

#[test]
fn requeue_names_every_store_and_refuses_a_folder_without_a_spool() {
    let none = run("requeue", &[], &[]);
    says(
        &none,
        2,
        "COMAPI_SPOOL_DIR (a receiver without it spools to ",
    );
    says(
        &none,
        2,
        "comapi-webhook-spool), COMAPI_REDIS_URL or COMAPI_AMQP_URL",
    );
    let dir = temp_dir("requeue-messages");
    let typo = dir.join("comapi-spoool");
    let mistyped = run(
        "requeue",
        &[("COMAPI_SPOOL_DIR", typo.to_str().unwrap())],
        &[],
    );
    says(
        &mistyped,
        2,
        "no such folder; give the receiver's spool folder",
    );
    assert!(!typo.exists(), "requeue created the mistyped folder");
    let empty = run(
        "requeue",
        &[("COMAPI_SPOOL_DIR", dir.to_str().unwrap())],
        &[],
    );
    says(&empty, 2, "this folder holds no spool (no spool.lock)");
    let help = Command::new(example_binary("requeue"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for named in [
        "COMAPI_SPOOL_DIR",
        "COMAPI_REDIS_URL",
        "COMAPI_AMQP_URL",
        "Stop the receiver first",
        "Exit status",
    ] {
        assert!(help.contains(named), "--help lacks {named}:\n{help}");
    }
    let arg = run("requeue", &[], &["--dir"]);
    says(&arg, 2, "requeue takes its settings from the environment");
}

#[test]
fn requeue_says_to_stop_the_receiver_that_holds_the_spool() {
    let dir = temp_dir("requeue-busy");
    let receiver = Receiver::start("hyper_receiver", &dir, SECRET);
    let busy = run(
        "requeue",
        &[("COMAPI_SPOOL_DIR", dir.to_str().unwrap())],
        &[],
    );
    says(
        &busy,
        1,
        "is open in another process, most likely the receiver: stop it",
    );
    drop(receiver);
    let done = run(
        "requeue",
        &[("COMAPI_SPOOL_DIR", dir.to_str().unwrap())],
        &[],
    );
    assert_eq!(done.0, 0, "{}", done.1);
}

#[test]
fn send_event_names_the_likely_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let refused = run("send_event", &[("PORT", &port)], &[]);
    says(
        &refused,
        1,
        &format!("cannot connect to http://127.0.0.1:{port}/"),
    );
    says(&refused, 1, "is a receiver running there?");
    let no_scheme = run("send_event", &[], &["--url", "127.0.0.1:8080/"]);
    says(
        &no_scheme,
        2,
        "has no scheme; write it as http://127.0.0.1:8080/",
    );
    let bad_port = run("send_event", &[("PORT", "eighty")], &[]);
    says(&bad_port, 2, "PORT=\"eighty\" is not a port");
    // A receiver on a port of its own, reached through PORT alone; then a 401.
    let dir = temp_dir("sender-messages");
    let receiver = Receiver::start("hyper_receiver", &dir, SECRET);
    let port = receiver.url.rsplit(':').next().unwrap().to_owned();
    let sent = run("send_event", &[("PORT", &port)], &[]);
    assert_eq!(sent.0, 0, "{}", sent.1);
    let wrong = run(
        "send_event",
        &[
            ("PORT", &port),
            ("COMAPI_WEBHOOK_SECRET", "not-the-receivers-secret-0123"),
        ],
        &[],
    );
    says(&wrong, 1, "hint: the receiver refused the signature");
    says(&wrong, 1, "compare the two");
}

#[test]
fn wrong_redis_urls_say_what_to_write() {
    let Some(redis) = OwnRedis::start("wrong_redis_urls_say_what_to_write") else {
        return;
    };
    let dir = temp_dir("redis-messages");
    let spool = dir.to_str().unwrap();
    let receiver = |url: &str| {
        run(
            "hyper_receiver",
            &[("COMAPI_REDIS_URL", url), ("COMAPI_SPOOL_DIR", spool)],
            &[],
        )
    };
    says(
        &receiver("127.0.0.1:6379"),
        2,
        "COMAPI_REDIS_URL must be a Redis URL: redis://[[user]:password@]host:port/[db]",
    );
    let with_password = redis.url().replace("redis://", "redis://:sekret@");
    says(
        &receiver(&with_password),
        2,
        "this Redis needs no password: remove it from the URL",
    );
    runtime().block_on(redis.config_set("requirepass", "sekret"));
    says(
        &receiver(&redis.url()),
        2,
        "this Redis needs a password: give it in the URL",
    );
    let wrong = redis.url().replace("redis://", "redis://:wrong@");
    says(
        &receiver(&wrong),
        2,
        "the user or password in the URL is wrong",
    );
    let worker = run("worker", &[("COMAPI_REDIS_URL", &wrong)], &[]);
    says(&worker, 2, "the user or password in the URL is wrong");
}

#[test]
fn wrong_amqp_urls_say_what_to_write_in_one_line() {
    let Some(url) = rabbit::amqp_url("wrong_amqp_urls_say_what_to_write_in_one_line") else {
        return;
    };
    let dir = temp_dir("amqp-messages");
    let spool = dir.to_str().unwrap();
    let wrong_password = url.replacen("guest:guest@", "guest:wrong@", 1);
    assert_ne!(
        wrong_password, url,
        "the suite's broker URL has guest:guest"
    );
    for binary in ["hyper_receiver", "worker", "requeue"] {
        let refused = run(
            binary,
            &[
                ("COMAPI_AMQP_URL", &wrong_password),
                ("COMAPI_SPOOL_DIR", spool),
            ],
            &[],
        );
        says(
            &refused,
            2,
            "RabbitMQ refused the user or password in the URL",
        );
        assert!(
            !refused.1.contains("lapin") && refused.1.lines().count() == 1,
            "{binary}: one line, without the AMQP client's own:\n{}",
            refused.1
        );
    }
    let (base, _vhost) = url.rsplit_once('/').unwrap();
    let slash = run(
        "hyper_receiver",
        &[
            ("COMAPI_AMQP_URL", &format!("{base}/")),
            ("COMAPI_SPOOL_DIR", spool),
        ],
        &[],
    );
    says(&slash, 2, "ends in `/`: that names an empty vhost");
    says(&slash, 2, "written %2f");
    let no_vhost = run(
        "worker",
        &[("COMAPI_AMQP_URL", &format!("{base}/no-such-vhost"))],
        &[],
    );
    says(&no_vhost, 2, "RabbitMQ has no such vhost");
}

/// Wrong settings, and what every binary says of each.
const WRONG_SETTINGS: [(&str, &str, &str); 4] = [
    (
        "COMAPI_LEASE",
        "abc",
        "COMAPI_LEASE must be a duration such as 1m, not \"abc\"",
    ),
    ("COMAPI_LEASE", "1ms", "COMAPI_LEASE must be at least 1s"),
    (
        "COMAPI_CONCURRENCY",
        "0",
        "COMAPI_CONCURRENCY must be from 1 to 65536",
    ),
    (
        "COMAPI_RETRY_ATTEMPTS",
        "5000",
        "COMAPI_RETRY_ATTEMPTS must be from 1",
    ),
];

#[test]
fn every_binary_checks_every_setting_alike() {
    let dir = temp_dir("settings-messages");
    let spool = ("COMAPI_SPOOL_DIR", dir.to_str().unwrap());
    let redis = ("COMAPI_REDIS_URL", "redis://127.0.0.1:1/");
    for (binary, store) in [
        ("hyper_receiver", spool),
        ("actix_receiver", spool),
        ("worker", redis),
    ] {
        for (variable, value, said) in WRONG_SETTINGS {
            says(&run(binary, &[(variable, value), store], &[]), 2, said);
        }
    }
}

#[test]
fn logs_count_every_skip_and_show_values_not_debug_structs() {
    let dir = temp_dir("log-messages");
    let mut command = Command::new(example_binary("hyper_receiver"));
    command.env("COMAPI_SPOOL_DIR", &dir); // the default body limit: 500 events fit
    let mut receiver = Receiver::start_command("hyper_receiver", command, SECRET);
    let port = receiver.url.rsplit(':').next().unwrap().to_owned();
    // 500 events of a few messages: the older revisions are skipped as stale.
    let sent = run(
        "send_event",
        &[("PORT", &port)],
        &["--file", "tests/fixtures/events/batch_500.json"],
    );
    assert_eq!(sent.0, 0, "{}", sent.1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = receiver.log.lock().unwrap().clone();
        let processed = log.matches("event processed").count();
        let skipped = log.matches("event skipped event_id=").count();
        let counted: usize = log
            .lines()
            .filter_map(|l| l.split("left_out=").nth(1)?.trim().parse::<usize>().ok())
            .sum();
        if processed + skipped + counted == 500 {
            assert!(skipped <= 20, "{skipped} skip lines logged one by one");
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{processed} processed, {skipped} skips logged and {counted} counted of 500:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        log.contains("more in the last second, not logged one by one"),
        "{log}"
    );
    for debug in ["=Some(", "=None", "decision=\""] {
        assert!(!log.contains(debug), "{debug:?} in the log:\n{log}");
    }
    assert!(
        log.contains("decision=fresh") && log.contains("decision=stale"),
        "{log}"
    );
    receiver.signal("-TERM");
    assert!(receiver.wait(Duration::from_secs(30)).success());
    let log = receiver.log.lock().unwrap().clone();
    assert!(
        log.contains("shutting down: finishing what is in hand signal=SIGTERM"),
        "{log}"
    );
    assert!(!log.contains("requests in flight"), "{log}");
}
