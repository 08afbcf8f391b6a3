//! Helpers shared by the integration tests.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use comapi_webhook::Event;
use comapi_webhook::dangerous::parse_unverified;

/// The Redis the tests may use, from `COMAPI_TEST_REDIS_URL` (scripts/check.sh starts
/// a throwaway `redis-server` and sets it). Without it the Redis tests are skipped,
/// loudly; under `CI=true` a missing Redis fails them instead.
pub fn redis_url(test: &str) -> Option<String> {
    match std::env::var("COMAPI_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "{test}: CI=true but COMAPI_TEST_REDIS_URL is not set; the Redis tests must run in CI"
            )
        }
        _ => {
            eprintln!(
                "\n!!! SKIPPED {test}: no Redis. Set COMAPI_TEST_REDIS_URL, or run scripts/check.sh \
                 with redis-server installed (apt-get install redis-server).\n"
            );
            None
        }
    }
}

/// Says loudly that `test` is skipped for `why`; under `CI=true`, fails it instead.
pub fn missing(test: &str, why: &str) {
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "{test}: CI=true but {why}"
    );
    eprintln!("\n!!! SKIPPED {test}: {why}\n");
}

/// SIGKILL to every process of the group `group`. Through the shell's own `kill`
/// with `--`: procps' `kill -KILL -<pgid>` can read the group as another option
/// and signal every process the user may signal, the test runner's shell among them.
pub fn kill_group(group: u32) {
    let _ = std::process::Command::new("bash")
        .args(["-c", &format!("kill -s KILL -- -{group}")])
        .status();
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The CSRF token in a console page's first form.
pub fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token in {page}"))
        .to_owned()
}

/// A unique key prefix, so tests sharing one Redis never see each other's keys.
pub fn unique_prefix(test: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test:{test}:{}:{nanos}:{}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Now, as Comapi writes an event's `timestamp`: `2026-11-29T11:31:04.123Z`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// An owned event with the given id, name, `payload.id` and revision, raised now.
pub fn event(
    event_id: &str,
    name: &str,
    entity: Option<&str>,
    revision: Option<u64>,
) -> Event<'static> {
    let payload = match entity {
        Some(id) => serde_json::json!({ "id": id }),
        None => serde_json::json!({}),
    };
    let mut envelope = serde_json::json!({
        "eventId": event_id, "accountId": 1, "apiSpaceId": "space", "name": name, "payload": payload,
        "timestamp": now_rfc3339(),
    });
    if let Some(revision) = revision {
        envelope["revision"] = revision.into();
    }
    let body = serde_json::to_vec(&envelope).unwrap();
    parse_unverified(&body).unwrap().pop().unwrap().into_owned()
}

/// The built binary `name`, a bin or an example: `cargo test` builds both beside
/// the test binaries (target/<profile>/deps/<test>-<hash> -> target/<profile>/ and
/// target/<profile>/examples).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    // The reference binaries are bins (feature `binaries`), the benchmark tools examples.
    let bin = profile_dir.join(name);
    if bin.exists() {
        return bin;
    }
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the bins and the examples",
        path.display()
    );
    path
}

/// A worker handler that records each event's id in `seen` and succeeds.
pub fn recorder(
    seen: &std::sync::Mutex<Vec<String>>,
) -> impl Fn(Event<'static>) -> std::future::Ready<Result<(), std::io::Error>> + Send + Sync + '_ {
    move |event| {
        seen.lock().unwrap().push(event.event_id().to_owned());
        std::future::ready(Ok(()))
    }
}

/// A fresh folder under the OS temp folder, removed with what it holds when the
/// guard is dropped, a failing test's too (its panic unwinds through the drop).
/// Derefs to its path.
pub fn temp_dir(label: &str) -> TempDir {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Tests run on parallel threads and may read the same nanosecond: the counter
    // keeps their folders apart (a shared one was removed under another test).
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "comapi-webhook-test-{label}-{}-{nanos}-{made}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// See [`temp_dir`].
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::PathBuf;

    fn deref(&self) -> &std::path::PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A two-thread runtime, like the receivers' on this two-core machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One spool line holding `event` (raw JSON) as the receive step writes it:
/// received at the event's own `timestamp` (as if it came at once), or at a fixed
/// time for an event without one, so that the same event gives the same line.
pub fn spool_line(event: &str) -> Vec<u8> {
    let value: serde_json::Value = serde_json::from_str(event).unwrap_or_default();
    let received = value["timestamp"]
        .as_str()
        .unwrap_or("2026-01-01T00:00:00.000Z")
        .to_owned();
    format!("{{\"receivedAt\":\"{received}\",\"secretIndex\":0,\"event\":{event}}}\n").into_bytes()
}

/// A connection of the test's own to the Redis at `url`.
#[cfg(feature = "redis")]
pub async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Runs a worker with a fresh in-memory gate over everything a closed `spool`
/// holds, recording each event id in `seen`.
#[cfg(feature = "receiver")]
pub async fn record_all(
    spool: &comapi_webhook::store::spool::Spool,
    seen: &std::sync::Mutex<Vec<String>>,
) {
    comapi_webhook::worker::run_worker(
        spool.reader().unwrap(),
        &comapi_webhook::Gate::in_memory(),
        recorder(seen),
        worker_config(comapi_webhook::worker::RetryPolicy::default()),
    )
    .await
    .unwrap();
}

/// The worker settings for `retry` at the concurrency in `COMAPI_CONCURRENCY` (the
/// variable the binaries read too), the default without it: `scripts/check.sh`
/// runs the delivery tests at the default and again at 1.
#[cfg(feature = "receiver")]
pub fn worker_config(
    retry: impl Into<comapi_webhook::worker::WorkerConfig>,
) -> comapi_webhook::worker::WorkerConfig {
    let config = retry.into();
    match std::env::var("COMAPI_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
    {
        Some(concurrency) => config.with_concurrency(concurrency),
        None => config,
    }
}

/// The secret the in-process stores' tests sign with.
pub const SECRET: &str = "a-comapi-webhook-secret-of-36-chars!";

/// A batch of `message.sent` events with these ids, raised now.
pub fn body(ids: &[&str]) -> Vec<u8> {
    let events: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({"eventId": id, "name": "message.sent", "payload": {"id": format!("m-{id}")},
                "timestamp": now_rfc3339()})
        })
        .collect();
    serde_json::to_vec(&events).unwrap()
}

/// Posts `body(ids)`, signed with [`SECRET`], to `inbox`; returns the status.
#[cfg(feature = "receiver")]
pub async fn post<S: comapi_webhook::store::EventStore>(
    inbox: &comapi_webhook::Inbox<S>,
    ids: &[&str],
) -> u16 {
    let body = body(ids);
    let verifier = comapi_webhook::Verifier::new(SECRET).unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        comapi_webhook::SIGNATURE_HEADER,
        verifier.sign(&body).to_string().parse().unwrap(),
    );
    inbox.receive(&headers, &body).await.status().as_u16()
}

/// One proxied connection's halves: the client's read and write, the server's.
type Halves = (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
);

/// A TCP proxy to `target` (`host:port`) that hands each connection's halves to
/// `serve`; returns its own `host:port`.
async fn proxy(target: String, serve: impl Fn(Halves) + Send + 'static) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            serve((client_read, client_write, server_read, server_write));
        }
    });
    addr.to_string()
}

/// A TCP proxy to `target` (`host:port`) that holds every byte while `stalled` is
/// set; returns its own `host:port`.
pub async fn stalling_proxy(
    target: String,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> String {
    proxy(
        target,
        move |(client_read, client_write, server_read, server_write)| {
            let up = pump(
                client_read,
                server_write,
                std::sync::Arc::clone(&stalled),
                |_| {},
            );
            tokio::spawn(up);
            let down = pump(
                server_read,
                client_write,
                std::sync::Arc::clone(&stalled),
                |_| {},
            );
            tokio::spawn(down);
        },
    )
    .await
}

/// A TCP proxy to `target` (`host:port`) whose connections all end when `cut` is
/// told (a network fault: the broker closed the channel, or a router dropped it);
/// new connections go through again. Returns its own `host:port`.
pub async fn cutting_proxy(target: String, cut: std::sync::Arc<tokio::sync::Notify>) -> String {
    let never = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    proxy(target, move |(client_read, client_write, server_read, server_write)| {
        let (cut, never) = (std::sync::Arc::clone(&cut), std::sync::Arc::clone(&never));
        tokio::spawn(async move {
            tokio::select! {
                () = pump(client_read, server_write, std::sync::Arc::clone(&never), |_| {}) => {}
                () = pump(server_read, client_write, never, |_| {}) => {}
                () = cut.notified() => {} // both halves dropped: the connection ends
            }
        });
    })
    .await
}

/// A TCP proxy to `target` (`host:port`) that, on each connection, holds every
/// byte from the broker once the client sent an AMQP `basic.consume`: the broker
/// takes the consumer, the client never hears so. Returns its own `host:port`.
pub async fn consume_stalling_proxy(target: String) -> String {
    proxy(
        target,
        |(client_read, client_write, server_read, server_write)| {
            let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (watching, never) = (std::sync::Arc::clone(&stalled), std::sync::Arc::default());
            tokio::spawn(pump(client_read, server_write, never, move |bytes| {
                if has_basic_consume(bytes) {
                    watching.store(true, std::sync::atomic::Ordering::Release);
                }
            }));
            tokio::spawn(pump(server_read, client_write, stalled, |_| {}));
        },
    )
    .await
}

/// Whether `bytes`, whole AMQP 0-9-1 frames, hold a `basic.consume` method (class
/// 60, method 20).
fn has_basic_consume(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 11 {
        let size = u32::from_be_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]) as usize;
        if bytes[0] == 1 && bytes[7..11] == [0, 60, 0, 20] {
            return true;
        }
        let Some(rest) = bytes.get(7 + size + 1..) else {
            return false;
        };
        bytes = rest;
    }
    false
}

/// Copies `from` to `to`, holding the bytes while `stalled` is set; `watch` sees
/// each chunk first.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut watch: impl FnMut(&[u8]),
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        watch(&buf[..n]);
        while stalled.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Runs a worker on `source` until `expected` events were handled (recorded in
/// `seen`), then calls `stop` and waits for the worker to finish.
#[cfg(feature = "receiver")]
pub async fn process_until<Src, S>(
    source: Src,
    stop: impl FnOnce(),
    store: &S,
    seen: &std::sync::Mutex<Vec<String>>,
    expected: usize,
    retry: comapi_webhook::worker::RetryPolicy,
) where
    Src: comapi_webhook::store::EventSource,
    S: comapi_webhook::gate::DecisionStore,
{
    let worker =
        comapi_webhook::worker::run_worker(source, store, recorder(seen), worker_config(retry));
    let watch = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while seen.lock().unwrap().len() < expected {
            assert!(
                std::time::Instant::now() < deadline,
                "only {:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop();
    };
    let (done, ()) = tokio::join!(worker, watch);
    done.unwrap();
}
