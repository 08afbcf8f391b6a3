//! The console's pages over a dead letter of 100,000 events (`cargo bench`; 2,000
//! under `cargo test --benches`): the first page, a page filtered by name and
//! error, and a page deep in the list, each rendered whole by `Console::handle`.
//! Before the timings it prints the first render after start (the console reads
//! the dead letter once, then only what was added). On the spool, on Redis with
//! `COMAPI_TEST_REDIS_URL` (and the feature `redis`), and on RabbitMQ with
//! `COMAPI_TEST_AMQP_URL` (and the feature `rabbitmq`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use comapi_webhook::console::{Console, ConsoleAccess, Role};
use comapi_webhook::store::spool::{Spool, SpoolConfig};
use criterion::{Criterion, criterion_group, criterion_main};

const TOKEN: &str = "a-console-token-for-the-benchmark";
const NAMES: [&str; 4] = [
    "message.sent",
    "message.delivered",
    "message.read",
    "message.failed",
];
const ERRORS: [&str; 3] = [
    "timeout after 30s",
    "database down: connection refused",
    "HTTP 500 from the CRM",
];

fn events() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        100_000
    } else {
        2_000
    }
}

/// The record and error of dead letter `n`.
fn dead(n: u64) -> (String, &'static str, &'static str) {
    let name = NAMES[(n % 4) as usize];
    let received = humantime::format_rfc3339_millis(
        SystemTime::now() - Duration::from_secs(100_000 - n % 100_000),
    );
    let record = format!(
        r#"{{"receivedAt":"{received}","secretIndex":0,"event":{{"eventId":"e-{n:08}","accountId":1234,"apiSpaceId":"c924cf6e-4352-4b26-a71a-c2032bea7a01","name":"{name}","payload":{{"id":"msg-{n}","channel":"sms","to":"+447700900123","metadata":{{"campaign":"winter"}}}},"revision":1,"timestamp":"{received}"}}}}"#
    );
    (record, name, ERRORS[(n % 3) as usize])
}

async fn signed_in(console: &Console) -> String {
    let request = http::Request::post("/console/sign-in")
        .body(format!("token={TOKEN}").into_bytes())
        .unwrap();
    let response = console.handle(&request).await;
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

fn get(path: &str, cookie: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .header("cookie", cookie)
        .body(Vec::new())
        .unwrap()
}

/// Times the pages of `console` (over `what`) in `c`.
fn pages(c: &mut Criterion, runtime: &tokio::runtime::Runtime, console: &Console, what: &str) {
    let cookie = runtime.block_on(signed_in(console));
    let started = Instant::now();
    let first = runtime.block_on(console.handle(&get("/console/dead", &cookie)));
    let cold = started.elapsed();
    assert_eq!(first.status(), 200, "{}", first.body());
    let next = first
        .body()
        .split("before=")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap()
        .to_owned();
    let filtered = "/console/dead?name=message.read&error=database";
    let deep = format!("/console/dead?before={}", next.parse::<u128>().unwrap() / 2);
    println!(
        "{what}: the first page, read cold, in {:.1} ms ({} dead letters)",
        cold.as_secs_f64() * 1000.0,
        events()
    );
    let mut group = c.benchmark_group(format!("console_{what}"));
    group.sample_size(20);
    for (id, path) in [
        ("first_page", "/console/dead"),
        ("filtered_page", filtered),
        ("deep_page", deep.as_str()),
    ] {
        let request = get(path, &cookie);
        let page = runtime.block_on(console.handle(&request));
        assert!(
            page.body().contains("dead letter(s) match"),
            "{path}: {}",
            page.body()
        );
        group.bench_function(id, |b| {
            b.iter(|| black_box(runtime.block_on(console.handle(&request))))
        });
    }
    group.finish();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The URL in `var`, or `None`, said, for the benchmark group `group`.
#[allow(dead_code)] // without the redis and rabbitmq features
fn server(var: &str, group: &str) -> Option<String> {
    let url = std::env::var(var).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        println!("{group}: SKIPPED, no {var}");
    }
    url
}

fn access() -> ConsoleAccess {
    ConsoleAccess::new()
        .with_token("bench", Role::Operator, TOKEN)
        .unwrap()
}

fn spool(c: &mut Criterion) {
    let runtime = runtime();
    let dir = std::env::temp_dir().join(format!("comapi-console-bench-{}", std::process::id()));
    let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
    let mut lines = String::new();
    for n in 0..events() {
        let (record, _, error) = dead(n);
        lines.push_str(&format!(
            "{{\"deadAt\":\"2026-12-05T00:00:00.000Z\",\"attempts\":8,\"error\":\"{error}\",\"delivery\":\"spool:1:{n}\",\"record\":{record}}}\n"
        ));
    }
    std::fs::write(dir.join("dead-letter.jsonl"), lines).unwrap();
    let console = Console::new(spool.clone(), access());
    pages(c, &runtime, &console, "spool");
    runtime.block_on(spool.close());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    use comapi_webhook::store::redis_stream::{RedisStream, RedisStreamConfig};
    let Some(url) = server("COMAPI_TEST_REDIS_URL", "console_redis") else {
        return;
    };
    let runtime = runtime();
    let prefix = format!("bench:console:{}:", std::process::id());
    let dead_key = format!("{prefix}events:dead");
    runtime.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        for chunk in (0..events()).collect::<Vec<_>>().chunks(1000) {
            let mut pipe = redis::pipe();
            for &n in chunk {
                let (record, _, error) = dead(n);
                pipe.cmd("XADD")
                    .arg(&dead_key)
                    .arg("*")
                    .arg("record")
                    .arg(record)
                    .arg("error")
                    .arg(error)
                    .arg("attempts")
                    .arg(8)
                    .arg("delivery")
                    .arg(format!("1-{n}"))
                    .arg("deadAt")
                    .arg("2026-12-05T00:00:00.000Z")
                    .ignore();
            }
            let () = pipe.query_async(&mut connection).await.unwrap();
        }
    });
    let mut config = RedisStreamConfig::default();
    config.key_prefix = prefix.clone();
    let stream = runtime
        .block_on(RedisStream::connect(&url, config))
        .unwrap();
    pages(c, &runtime, &Console::new(stream, access()), "redis");
    runtime.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("DEL")
            .arg(&dead_key)
            .query_async(&mut connection)
            .await
            .unwrap();
    });
}

#[cfg(not(feature = "redis"))]
fn redis(_: &mut Criterion) {}

/// On RabbitMQ the dead letter is a stream, read by offset: the same pages.
#[cfg(feature = "rabbitmq")]
fn rabbitmq(c: &mut Criterion) {
    use comapi_webhook::store::rabbitmq::{RabbitConfig, RabbitStore};
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let Some(url) = server("COMAPI_TEST_AMQP_URL", "console_rabbitmq") else {
        return;
    };
    let runtime = runtime();
    let config =
        RabbitConfig::default().with_queue(format!("bench.console.{}", std::process::id()));
    let store = runtime
        .block_on(RabbitStore::connect(&url, config.clone()))
        .unwrap();
    let connection = runtime.block_on(async {
        let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let text = |t: &str| AMQPValue::LongString(t.into());
        for chunk in (0..events()).collect::<Vec<_>>().chunks(1000) {
            let mut confirms = Vec::new();
            for &n in chunk {
                let (record, _, error) = dead(n);
                let mut headers = FieldTable::default();
                headers.insert("x-comapi-error".into(), text(error));
                headers.insert("x-comapi-attempts".into(), AMQPValue::LongInt(8));
                headers.insert("x-comapi-dead-at".into(), text("2026-12-05T00:00:00.000Z"));
                let properties = lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers);
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        config.dead_queue().as_str().into(),
                        BasicPublishOptions::default(),
                        record.as_bytes(),
                        properties,
                    )
                    .await
                    .unwrap();
                confirms.push(confirm);
            }
            for confirm in confirms {
                confirm.await.unwrap();
            }
        }
        connection
    });
    pages(c, &runtime, &Console::new(store, access()), "rabbitmq");
    runtime.block_on(async {
        let channel = connection.create_channel().await.unwrap();
        let mut queues = vec![
            config.queue.clone(),
            config.dead_queue(),
            config.console_stream(),
        ];
        queues.extend(
            comapi_webhook::store::rabbitmq::RETRY_TIERS_MS
                .iter()
                .map(|tier| format!("{}.retry.{tier}", config.queue)),
        );
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
    });
}

#[cfg(not(feature = "rabbitmq"))]
fn rabbitmq(_: &mut Criterion) {}

criterion_group!(benches, spool, redis, rabbitmq);
criterion_main!(benches);
