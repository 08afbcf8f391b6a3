//! A real headless Chromium for the console's tests: Debian's `chromium` driven
//! through its `chromedriver` by fantoccini.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fantoccini::wd::TimeoutConfiguration;
use fantoccini::{Client, ClientBuilder, Locator};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long a session may last: past it, its chromedriver and Chromium are
/// killed, and every later WebDriver call fails the test instead of hanging it.
const SESSION_LIMIT: Duration = Duration::from_secs(240);

/// One browser at a time in a test binary: a Chromium each for tests running in
/// parallel would only make each slower on a small machine, and any limit on time
/// unfair to the one that waited.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A browser session; its chromedriver (and so its Chromium) is killed on drop,
/// or when it passes [`SESSION_LIMIT`].
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
    temp: PathBuf,
    /// Ends the watchdog when dropped.
    _watchdog: mpsc::Sender<()>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// Kills the process group `group` unless `stop` hears from its sender (or loses
/// it) within `limit`.
fn watchdog(group: u32, limit: Duration) -> mpsc::Sender<()> {
    let (sender, stop) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if stop.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            eprintln!(
                "the browser session passed {limit:?}: its chromedriver and Chromium are killed"
            );
            super::support::kill_group(group);
        }
    });
    sender
}

/// Where the screenshots go: `target/tmp/console-screenshots`.
pub fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

impl Browser {
    /// A new headless Chromium; `None` (said loudly) without Debian's chromium
    /// and chromium-driver, which fails the test under `CI=true`.
    pub async fn start(test: &str) -> Option<Browser> {
        if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists()
        {
            super::support::missing(
                test,
                &format!(
                    "{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
                ),
            );
            return None;
        }
        let turn = ONE_AT_A_TIME.lock().await;
        let port = super::support::free_port();
        let profile = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("chromium-{test}-{}-{port}", std::process::id()));
        // Its own process group, which Chromium's processes join: killed together.
        // Their temp files go in a folder of their own, removed with the profile; a
        // short path, since Chromium puts a Unix socket in it (at most 107 bytes).
        let temp = std::env::temp_dir().join(format!("chromium-{port}"));
        std::fs::create_dir_all(&temp).unwrap();
        let driver = Command::new(CHROMEDRIVER)
            .process_group(0)
            .env("TMPDIR", &temp)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let watchdog = watchdog(driver.id(), SESSION_LIMIT);
        let mut options = serde_json::Map::new();
        options.insert("binary".into(), CHROMIUM.into());
        options.insert(
            "args".into(),
            serde_json::json!([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1200,1000",
                format!("--user-data-dir={}", profile.display()),
            ]),
        );
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options.into());
        let webdriver = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => break client,
                Err(error) if started.elapsed() < Duration::from_secs(30) => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    panic!("chromedriver on {webdriver} gave no session within 30 s: {error}")
                }
            }
        };
        // WebDriver's own limits, under the session's.
        client
            .update_timeouts(TimeoutConfiguration::new(
                Some(Duration::from_secs(30)),
                Some(Duration::from_secs(30)),
                Some(Duration::ZERO),
            ))
            .await
            .unwrap();
        Some(Browser {
            client,
            driver,
            profile,
            temp,
            _watchdog: watchdog,
            _turn: turn,
        })
    }

    /// Saves the page as `target/tmp/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// The text of the element `css`, asked again for up to 5 s while the page
    /// is loading.
    pub async fn text(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.text().await,
                Err(error) => Err(error),
            };
            match found {
                Ok(text) => return text,
                Err(error) if started.elapsed() > Duration::from_secs(5) => {
                    panic!("no {css}: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The page's text.
    pub async fn page_text(&self) -> String {
        self.text("body").await
    }

    /// Clicks the button whose text is `label`, and waits for the page it
    /// submits to (the button's page is gone: the button is stale).
    pub async fn click_button(&self, label: &str) {
        let xpath = format!("//button[normalize-space(.)='{label}']");
        let button = self
            .client
            .find(Locator::XPath(&xpath))
            .await
            .unwrap_or_else(|e| panic!("no button {label:?}: {e}"));
        button.click().await.unwrap();
        self.until_gone(&button).await;
    }

    /// Clicks the link `css`, and waits for the page it leads to.
    pub async fn click_link(&self, css: &str) {
        let link = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        link.click().await.unwrap();
        self.until_gone(&link).await;
    }

    async fn until_gone(&self, element: &fantoccini::elements::Element) {
        let started = Instant::now();
        while element.is_enabled().await.is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the page did not change within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The value of the session cookie, read through WebDriver (the page's
    /// script cannot: it is HttpOnly).
    pub async fn cookie(&self, name: &str) -> String {
        let cookie = self.client.get_named_cookie(name).await.unwrap();
        format!("{}={}", cookie.name(), cookie.value())
    }

    /// Ends the session (Chromium quits), then the driver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver and every Chromium process it started, even after a panic.
        super::support::kill_group(self.driver.id());
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
        let _ = std::fs::remove_dir_all(&self.temp);
    }
}
