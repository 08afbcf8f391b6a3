//! The operator's console in a real headless Chromium, served by the real
//! hyper_receiver on the spool, on Redis and on RabbitMQ: sign-in, counts that
//! match the store, filters, an event's page with its attempts, requeue, discard
//! with its confirmation, the audit log, pause and resume (across a restart), a
//! read-only token and CSRF. Two `worker` processes on Redis, and on RabbitMQ, obey
//! a pause asked on either one's console. Screenshots of each page go to
//! target/tmp/console-screenshots.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/browser.rs"]
mod browser;
#[path = "support/process.rs"]
mod process;
#[path = "support/rabbit.rs"]
mod rabbit;
#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use browser::Browser;
use fantoccini::Locator;
use process::{Receiver, client, post_signed};

const OPERATOR: &str = "operator-token-for-the-console-test";
const VIEWER: &str = "viewer-token-for-the-console-test";
const FAILING: &str = "message.sent,message.read";

/// The store under test.
enum Kind {
    Spool(PathBuf),
    Redis { url: String, prefix: String },
    Rabbit { url: String, queue: String },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Spool(_) => "spool",
            Kind::Redis { .. } => "redis",
            Kind::Rabbit { .. } => "rabbitmq",
        }
    }

    /// hyper_receiver on this store, with the console's tokens; failing every
    /// `message.sent` and `message.read` when `failing`.
    fn start(&self, failing: bool) -> Receiver {
        let mut command = Command::new(support::example_binary("hyper_receiver"));
        command
            .env("COMAPI_CONSOLE_TOKEN", OPERATOR)
            .env("COMAPI_CONSOLE_READ_TOKEN", VIEWER)
            .env("COMAPI_RETRY_ATTEMPTS", "2")
            .env("COMAPI_RETRY_FIRST_DELAY", "100ms")
            .env("COMAPI_SHUTDOWN_GRACE", "5s");
        if failing {
            command.env("DEMO_FAIL", FAILING);
        }
        match self {
            Kind::Spool(dir) => command.env("COMAPI_SPOOL_DIR", dir),
            Kind::Redis { url, prefix } => command
                .env("COMAPI_REDIS_URL", url)
                .env("COMAPI_REDIS_PREFIX", prefix)
                .env("COMAPI_WORKER", "true"),
            Kind::Rabbit { url, queue } => command
                .env("COMAPI_AMQP_URL", url)
                .env("COMAPI_AMQP_QUEUE", queue)
                .env("COMAPI_WORKER", "true"),
        };
        Receiver::start_command("hyper_receiver", command, process::SECRET)
    }

    /// Events in the dead letter, as the store itself tells.
    async fn dead(&self) -> usize {
        match self {
            Kind::Spool(dir) => std::fs::read_to_string(dir.join("dead-letter.jsonl"))
                .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
                .unwrap_or(0),
            Kind::Redis { url, prefix } => {
                let mut connection = support::redis_connection(url).await;
                redis::cmd("XLEN")
                    .arg(format!("{prefix}events:dead"))
                    .query_async(&mut connection)
                    .await
                    .unwrap()
            }
            // The stream keeps what was taken out: the store's own count leaves
            // out what its log says was.
            Kind::Rabbit { .. } => {
                use comapi_webhook::store::EventStore;
                let status = self.rabbit().await.status().await;
                usize::try_from(status.dead_letters.unwrap_or_else(|| panic!("{status:?}")))
                    .unwrap()
            }
        }
    }

    async fn rabbit(&self) -> comapi_webhook::store::rabbitmq::RabbitStore {
        use comapi_webhook::store::rabbitmq::{RabbitConfig, RabbitStore};
        let Kind::Rabbit { url, queue } = self else {
            panic!("not RabbitMQ")
        };
        RabbitStore::connect(url, RabbitConfig::default().with_queue(queue))
            .await
            .unwrap()
    }

    /// Whether the store holds the pause mark.
    async fn paused(&self) -> bool {
        match self {
            Kind::Spool(dir) => dir.join("paused").exists(),
            Kind::Redis { url, prefix } => {
                let mut connection = support::redis_connection(url).await;
                redis::cmd("EXISTS")
                    .arg(format!("{prefix}events:paused"))
                    .query_async(&mut connection)
                    .await
                    .unwrap()
            }
            Kind::Rabbit { .. } => self.rabbit().await.paused().await.unwrap(),
        }
    }
}

fn event(id: &str, name: &str) -> String {
    format!(
        r#"{{"eventId":"{id}","accountId":1234,"apiSpaceId":"c924cf6e-4352-4b26-a71a-c2032bea7a01","name":"{name}","payload":{{"id":"msg-{id}"}},"revision":1,"timestamp":"{}"}}"#,
        support::now_rfc3339()
    )
}

async fn send(receiver: &Receiver, ids: &[&str], name: &str) {
    let client = client();
    for id in ids {
        let status = post_signed(
            &client,
            &format!("{}/", receiver.url),
            process::SECRET,
            event(id, name),
        )
        .await;
        assert_eq!(status, Ok(200), "POST {id}");
    }
}

async fn until(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A form POST to the console with `cookie`, outside the browser: its status and body.
/// `request`'s status and body, within 30 s.
async fn exchange(
    request: http::Request<http_body_util::Full<hyper::body::Bytes>>,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let what = format!("{} {}", request.method(), request.uri());
    let asked = async {
        let response = client().request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .unwrap_or_else(|_| panic!("{what} within 30 s"))
}

async fn post_form(url: &str, cookie: &str, form: &str) -> (u16, String) {
    let request = http::Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", cookie)
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            form.to_owned(),
        )))
        .unwrap();
    exchange(request).await
}

async fn sign_in(b: &Browser, base: &str, token: &str) {
    b.client.goto(&format!("{base}/console")).await.unwrap();
    b.client
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    b.click_button("Sign in").await;
}

async fn drive(kind: &Kind) {
    let Some(b) = Browser::start("console").await else {
        return;
    };
    let shot = |page: &str| format!("{}-{page}", kind.name());
    let mut receiver = kind.start(true);
    let base = receiver.url.clone();
    send(&receiver, &["s-1", "s-2", "s-3"], "message.sent").await;
    send(&receiver, &["r-1", "r-2"], "message.read").await;
    until("five dead letters", Duration::from_secs(30), async || {
        kind.dead().await == 5
    })
    .await;

    // Sign-in: a wrong token is refused, the operator's lets in.
    b.client.goto(&format!("{base}/console")).await.unwrap();
    b.screenshot(&shot("sign-in")).await;
    sign_in(&b, &base, "not-the-console-token-at-all").await;
    assert!(b.page_text().await.contains("not one of the console's"));
    b.screenshot(&shot("sign-in-refused")).await;
    sign_in(&b, &base, OPERATOR).await;
    assert_eq!(b.text("#count-dead").await, kind.dead().await.to_string());
    assert_eq!(b.text("#count-retries").await, "0");
    b.screenshot(&shot("overview")).await;
    if let Kind::Rabbit { .. } = kind {
        b.client
            .goto(&format!("{base}/console/retries"))
            .await
            .unwrap();
        assert!(
            b.page_text()
                .await
                .contains("cannot be read without taking")
        );
    }

    // The dead letters, filtered by name, then by error.
    b.client
        .goto(&format!("{base}/console/dead"))
        .await
        .unwrap();
    assert_eq!(b.text("#matching").await, "5 dead letter(s) match.");
    b.client
        .find(Locator::Id("f-name"))
        .await
        .unwrap()
        .select_by_value("message.read")
        .await
        .unwrap();
    b.click_button("Filter").await;
    assert_eq!(b.text("#matching").await, "2 dead letter(s) match.");
    b.screenshot(&shot("dead-by-name")).await;
    b.client
        .goto(&format!("{base}/console/dead"))
        .await
        .unwrap();
    b.client
        .find(Locator::Id("f-error"))
        .await
        .unwrap()
        .send_keys("names message.sent")
        .await
        .unwrap();
    b.click_button("Filter").await;
    assert_eq!(b.text("#matching").await, "3 dead letter(s) match.");
    b.screenshot(&shot("dead-by-error")).await;

    // One event's page, with its attempts.
    b.click_link("tbody td a").await;
    let requeued = b.text("#event-id").await;
    assert!(requeued.starts_with("s-"), "{requeued}");
    assert_eq!(
        b.text("#attempts").await,
        "2 attempt(s) made; the last failed with:"
    );
    assert!(
        b.text("#last-error")
            .await
            .contains("DEMO_FAIL names message.sent")
    );
    // Each attempt, with its time and error.
    let attempts = b
        .client
        .find_all(Locator::Css("#attempt-list tbody tr"))
        .await
        .unwrap();
    assert_eq!(attempts.len(), 2);
    for (n, row) in attempts.into_iter().enumerate() {
        let text = row.text().await.unwrap();
        let day = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        assert!(
            text.starts_with(&format!("{} {}", n + 1, &day[..10])),
            "{text}"
        );
        assert!(
            text.ends_with("DEMO_FAIL names message.sent: this demo fails every such event"),
            "{text}"
        );
    }
    b.screenshot(&shot("event")).await;

    // The cause is fixed (no more DEMO_FAIL) and the receiver restarted: the
    // session still holds, and the requeued event is processed.
    receiver.signal("-TERM");
    assert!(receiver.wait(Duration::from_secs(15)).success());
    let mut receiver = kind.start(false);
    let base = receiver.url.clone();
    let page = b.client.current_url().await.unwrap();
    b.client
        .goto(&format!("{base}{}", page.path()))
        .await
        .unwrap();
    b.click_button("Requeue").await;
    assert!(b.page_text().await.contains("Requeued 1 event(s)"));
    b.screenshot(&shot("requeued")).await;
    until(
        "the requeued event processed",
        Duration::from_secs(15),
        async || receiver.processed().contains(&requeued),
    )
    .await;
    assert_eq!(kind.dead().await, 4);

    // Discard, through its confirmation step; then the audit log.
    b.client
        .goto(&format!("{base}/console/dead?name=message.read"))
        .await
        .unwrap();
    b.click_link("tbody td a").await;
    b.click_button("Discard…").await;
    assert!(b.page_text().await.contains("Discard 1 event(s) for good?"));
    b.screenshot(&shot("discard-confirm")).await;
    b.click_button("Discard 1 event(s)").await;
    assert!(b.page_text().await.contains("Discarded 1 event(s)."));
    assert_eq!(kind.dead().await, 3);
    b.client
        .goto(&format!("{base}/console/audit"))
        .await
        .unwrap();
    let audit = b.text("tbody").await;
    assert!(audit.contains("operator discard 1"), "{audit}");
    assert!(audit.contains("operator requeue 1"), "{audit}");
    b.screenshot(&shot("audit")).await;

    // Pause: stored events wait, across a restart; resume: all processed.
    b.client.goto(&format!("{base}/console")).await.unwrap();
    b.click_button("Pause processing").await;
    assert!(kind.paused().await);
    // A worker on Redis or RabbitMQ reads the mark once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = ["p-1", "p-2", "p-3"];
    send(&receiver, &held, "message.delivered").await;
    receiver.signal("-TERM");
    assert!(receiver.wait(Duration::from_secs(15)).success());
    let receiver = kind.start(false);
    let base = receiver.url.clone();
    b.client.goto(&format!("{base}/console")).await.unwrap();
    assert!(b.page_text().await.contains("Paused"));
    b.screenshot(&shot("paused")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let processed = receiver.processed();
    assert!(
        held.iter().all(|id| !processed.contains(*id)),
        "processed while paused: {processed:?}"
    );
    b.click_button("Resume processing").await;
    until(
        "the held events processed",
        Duration::from_secs(15),
        async || {
            let processed: HashSet<String> = receiver.processed();
            held.iter().all(|id| processed.contains(*id))
        },
    )
    .await;

    // A POST without the CSRF token is refused and changes nothing.
    let cookie = b.cookie("comapi_console").await;
    let (status, _) = post_form(&format!("{base}/console/pause"), &cookie, "").await;
    assert_eq!(status, 403);
    assert!(!kind.paused().await);

    // A read-only token sees, and cannot act even with its own CSRF token.
    b.client.goto(&format!("{base}/console")).await.unwrap();
    b.click_button("Sign out").await;
    sign_in(&b, &base, VIEWER).await;
    b.client
        .goto(&format!("{base}/console/dead"))
        .await
        .unwrap();
    assert_eq!(b.text("#matching").await, "3 dead letter(s) match.");
    assert!(
        b.client
            .find_all(Locator::Css(
                "input[type=checkbox], form[action$='/requeue']"
            ))
            .await
            .unwrap()
            .is_empty()
    );
    b.screenshot(&shot("read-only")).await;
    let csrf = b
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let cookie = b.cookie("comapi_console").await;
    let (status, body) = post_form(
        &format!("{base}/console/requeue"),
        &cookie,
        &format!("csrf={csrf}&scope=filter"),
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("can look but not act"));
    assert_eq!(kind.dead().await, 3);

    // At a phone's width.
    b.client.set_window_size(390, 844).await.unwrap();
    b.client.goto(&format!("{base}/console")).await.unwrap();
    b.screenshot(&shot("phone")).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_the_spool() {
    let dir = support::temp_dir("console");
    drive(&Kind::Spool(dir.join("spool"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_redis() {
    let Some(url) = support::redis_url("the_console_on_redis") else {
        return;
    };
    drive(&Kind::Redis {
        url,
        prefix: support::unique_prefix("console"),
    })
    .await;
}

/// A GET with `cookie`, outside the browser: its status and body.
async fn get_page(url: &str, cookie: &str) -> (u16, String) {
    let request = http::Request::get(url)
        .header("cookie", cookie)
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .unwrap();
    exchange(request).await
}

/// Signs in to the console at `base` over plain HTTP: the cookie and a CSRF token.
async fn http_sign_in(base: &str) -> (String, String) {
    use http_body_util::BodyExt;
    let request = http::Request::post(format!("{base}/console/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            format!("token={OPERATOR}"),
        )))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 303);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let _ = response.into_body().collect().await;
    let (_, page) = get_page(&format!("{base}/console"), &cookie).await;
    (cookie, support::csrf_of(&page))
}

/// Two `worker` processes on one Redis stream, each serving the console: a pause
/// asked on one holds both, a resume asked on the other frees both, and the
/// receiver's public page shows no figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_on_redis_obeys_the_pause() {
    let Some(url) = support::redis_url("every_worker_on_redis_obeys_the_pause") else {
        return;
    };
    let prefix = support::unique_prefix("console-workers");
    every_worker_obeys_the_pause(&[("COMAPI_REDIS_URL", url), ("COMAPI_REDIS_PREFIX", prefix)])
        .await;
}

/// The same with two `worker` processes on one RabbitMQ queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_on_rabbitmq_obeys_the_pause() {
    let Some(url) = rabbit::amqp_url("every_worker_on_rabbitmq_obeys_the_pause") else {
        return;
    };
    let queue = support::unique_prefix("console-workers").replace(':', ".");
    every_worker_obeys_the_pause(&[("COMAPI_AMQP_URL", url), ("COMAPI_AMQP_QUEUE", queue)]).await;
}

/// A receiver and two `worker` processes on the store that `store` names.
async fn every_worker_obeys_the_pause(store: &[(&str, String)]) {
    let start = |name: &str| {
        let mut command = Command::new(support::example_binary(name));
        command
            .envs(store.iter().map(|(k, v)| (k, v)))
            .env("COMAPI_CONSOLE_TOKEN", OPERATOR)
            .env("COMAPI_WORKER", "false")
            .env("METRICS_PORT", "0");
        Receiver::start_command(name, command, process::SECRET)
    };
    let receiver = start("hyper_receiver");
    let (first, second) = (start("worker"), start("worker"));

    let public = process::status_page(&receiver).await;
    assert!(
        public.contains("/console") && !public.contains("Events stored"),
        "{public}"
    );
    assert!(
        process::get(&format!("{}/metrics", first.url))
            .await
            .contains("comapi_webhook_handler")
    );

    let (cookie, csrf) = http_sign_in(&first.url).await;
    let (status, body) = post_form(
        &format!("{}/console/pause", first.url),
        &cookie,
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // each worker reads the mark once a second
    let held = ["w-1", "w-2", "w-3", "w-4"];
    send(&receiver, &held, "message.delivered").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let processed: HashSet<String> = first
        .processed()
        .union(&second.processed())
        .cloned()
        .collect();
    assert!(
        processed.is_empty(),
        "processed while paused: {processed:?}"
    );

    let (cookie, csrf) = http_sign_in(&second.url).await;
    let (_, overview) = get_page(&format!("{}/console", second.url), &cookie).await;
    assert!(
        overview.contains("Paused"),
        "the second worker's console shows the pause"
    );
    post_form(
        &format!("{}/console/resume", second.url),
        &cookie,
        &format!("csrf={csrf}"),
    )
    .await;
    until("both workers free", Duration::from_secs(15), async || {
        let processed: HashSet<String> = first
            .processed()
            .union(&second.processed())
            .cloned()
            .collect();
        held.iter().all(|id| processed.contains(*id))
    })
    .await;
    let (_, audit) = get_page(&format!("{}/console/audit", first.url), &cookie).await;
    assert!(
        audit.contains("<td>operator</td><td>resume</td>")
            && audit.contains("<td>operator</td><td>pause</td>"),
        "{audit}"
    );
}

/// On RabbitMQ, in the browser: the dead letter is a stream, read by offset;
/// all the same steps, and the retry schedule's delay queues are counted, not
/// listed (reading them would take their messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_rabbitmq() {
    let Some(url) = rabbit::amqp_url("the_console_on_rabbitmq") else {
        return;
    };
    let queue = support::unique_prefix("console").replace(':', ".");
    let kind = Kind::Rabbit { url, queue };
    drive(&kind).await;
    // Browsing took nothing and its reads left the count as it was.
    assert_eq!(kind.dead().await, 3);
}
