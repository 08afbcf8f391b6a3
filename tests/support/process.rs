//! Running the example binaries in tests: start one on a free port, read its log,
//! signal it; post signed events to it; read its metrics.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comapi_webhook::{SIGNATURE_HEADER, Verifier};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::support::{example_binary, temp_dir};

/// The secret the receivers under test are started with.
pub const SECRET: &str = "the-current-secret-0123456789";
/// The body limit they are started with.
pub const MAX_BODY: usize = 64 * 1024;

/// A running example binary (a receiver, or a worker with `METRICS_PORT`); killed on drop.
pub struct Receiver {
    pub child: Child,
    pub url: String,
    pub log: Arc<Mutex<String>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    pub fn start(name: &str, spool: &Path, secrets: &str) -> Receiver {
        let mut command = Command::new(example_binary(name));
        command
            .env("COMAPI_SPOOL_DIR", spool)
            .env("COMAPI_MAX_BODY_BYTES", MAX_BODY.to_string());
        Self::start_command(name, command, secrets)
    }

    /// Starts `command` (the binary `name`) on a free port with `secrets`, and waits
    /// for its address line.
    pub fn start_command(name: &str, mut command: Command, secrets: &str) -> Receiver {
        let mut child = command
            .env("COMAPI_WEBHOOK_SECRET", secrets)
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "{name} printed no address; its log:\n{}",
                    log.lock().unwrap()
                )
            });
        // A receiver says `listening on <url>`, a worker `metrics on <url>/metrics`.
        let url = ["listening on ", "metrics on "]
            .iter()
            .find_map(|ready| line.split_once(ready))
            .map(|(_, url)| url.trim().trim_end_matches("/metrics").to_owned())
            .unwrap_or_else(|| panic!("{name} printed {line:?}"))
            .replace("http://0.0.0.0:", "http://127.0.0.1:"); // BIND=0.0.0.0
        assert!(url.starts_with("http://127.0.0.1:"), "{line}");
        Receiver {
            child,
            url,
            log,
            log_reader: Some(log_reader),
        }
    }

    /// Event ids the worker reported having processed.
    pub fn processed(&self) -> HashSet<String> {
        processed_ids(&self.log.lock().unwrap())
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Read the log to its end before anyone looks at it.
                if let Some(reader) = self.log_reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn processed_ids(log: &str) -> HashSet<String> {
    log.lines()
        .filter(|l| l.contains("event processed"))
        .filter_map(|l| {
            l.split("event_id=")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .collect()
}

/// The value of the sample `name` (with its labels, as written) in OpenMetrics
/// text; every other line must be a comment or a sample too.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (sample, value) = line.rsplit_once(' ').expect("a sample line");
        let value: f64 = value.parse().expect("a number");
        if sample == name {
            found = Some(value);
        }
    }
    found
}

/// A `message.sent` event raised now (inside the gate's replay window).
pub fn event_json(id: &str) -> String {
    let now = super::support::now_rfc3339();
    format!(
        r#"{{"eventId":"{id}","accountId":1234,"apiSpaceId":"c924cf6e-4352-4b26-a71a-c2032bea7a01","name":"message.sent","payload":{{"id":"msg-{id}","metadata":{{"note":"café"}}}},"revision":1,"timestamp":"{now}"}}"#
    )
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn post(
    client: &HttpClient,
    url: &str,
    signature: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, String), String> {
    let mut request = http::Request::post(url).header("content-type", "application/json");
    if let Some(signature) = signature {
        request = request.header(SIGNATURE_HEADER, signature);
    }
    let asked = async {
        let response = client
            .request(request.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    // Comapi gives up after 10 s; a test waits three times that, then fails.
    tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .unwrap_or_else(|_| Err(format!("POST {url}: no answer within 30 s")))
}

pub async fn post_signed(
    client: &HttpClient,
    url: &str,
    secret: &str,
    body: String,
) -> Result<u16, String> {
    let signature = Verifier::new(secret)
        .unwrap()
        .sign(body.as_bytes())
        .to_string();
    post(client, url, Some(&signature), body.into_bytes())
        .await
        .map(|(status, _)| status)
}

/// The receiver's status page (`GET /`), within 10 s.
pub async fn status_page(receiver: &Receiver) -> String {
    get(&format!("{}/", receiver.url)).await
}

/// The body of `GET url`, within 10 s.
pub async fn get(url: &str) -> String {
    let asked = async {
        let answer = Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::Empty<Bytes>>()
            .get(url.parse().unwrap())
            .await
            .unwrap();
        answer.into_body().collect().await.unwrap().to_bytes()
    };
    let body = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .unwrap_or_else(|_| panic!("GET {url} within 10 s"));
    String::from_utf8(body.to_vec()).unwrap()
}

/// A `redis-server` of the test's own, with AOF fsynced before every reply, that
/// can be killed and restarted on the same port and folder.
pub struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: super::support::TempDir,
}

impl OwnRedis {
    /// `None` (loudly, and a failure under `CI=true`) without a `redis-server`.
    pub fn start(test: &str) -> Option<OwnRedis> {
        let found = Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            super::support::missing(
                test,
                "there is no redis-server on PATH (apt-get install redis-server)",
            );
            return None;
        }
        let port = super::support::free_port();
        let mut redis = OwnRedis {
            child: None,
            port,
            dir: temp_dir("redis"),
        };
        redis.restart();
        Some(redis)
    }

    /// `CONFIG SET name value` on the running server.
    #[cfg(feature = "redis")]
    pub async fn config_set(&self, name: &str, value: &str) {
        let mut connection = super::support::redis_connection(&self.url()).await;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut connection)
            .await
            .unwrap();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill(); // then the folder goes
    }
}

/// Every event id in the spool's segments, with how often it appears.
pub fn spooled(dir: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let segment = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("segment-"));
        if segment {
            let text = std::fs::read_to_string(&path).unwrap();
            // A live segment is preallocated: its data ends at the first zero byte.
            let data = text.split('\0').next().unwrap();
            for line in data.lines() {
                let line: serde_json::Value = serde_json::from_str(line).unwrap();
                assert!(
                    line["receivedAt"].is_string() && line["secretIndex"].is_u64(),
                    "{line}"
                );
                *counts
                    .entry(line["event"]["eventId"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
    }
    counts
}

/// Runs `command` to its end; a receiver that starts instead of refusing is killed,
/// and the test fails rather than hangs.
pub fn output_within(mut command: Command, timeout: Duration) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {timeout:?}: a bad configuration was accepted");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// How many times each event id was processed, from the logs.
pub fn processed_counts(logs: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in logs.iter().flat_map(|l| l.lines()) {
        if !line.contains("event processed") {
            continue;
        }
        if let Some(id) = line
            .split("event_id=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            *counts.entry(id.to_owned()).or_default() += 1;
        }
    }
    counts
}
