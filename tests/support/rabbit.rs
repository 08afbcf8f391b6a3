//! A RabbitMQ node of the test's own (Debian's `rabbitmq-server`) as a throwaway
//! process: its own HOME, cookie, ports and folders, killed and restarted on the
//! same ports and folder, and stopped with its `epmd`.

#![allow(dead_code, unreachable_pub)] // each test binary uses its part

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::support::{TempDir, free_port, missing, temp_dir};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The suite's broker (`COMAPI_TEST_AMQP_URL`, which `scripts/check.sh` starts),
/// else `None`, loudly, and a failure under `CI=true`.
pub fn amqp_url(test: &str) -> Option<String> {
    if let Ok(url) = std::env::var("COMAPI_TEST_AMQP_URL") {
        return Some(url);
    }
    missing(
        test,
        "COMAPI_TEST_AMQP_URL is not set (scripts/check.sh starts a broker)",
    );
    None
}

/// The suite's broker's management API (`COMAPI_TEST_AMQP_MANAGEMENT_URL`, which
/// `scripts/check.sh` starts), else `None`, loudly, and a failure under `CI=true`.
pub fn amqp_management_url(test: &str) -> Option<String> {
    if let Ok(url) = std::env::var("COMAPI_TEST_AMQP_MANAGEMENT_URL") {
        return Some(url);
    }
    missing(
        test,
        "COMAPI_TEST_AMQP_MANAGEMENT_URL is not set (scripts/check.sh starts a broker with its \
         management API)",
    );
    None
}

/// A node of the test's own.
pub struct OwnRabbit {
    child: Option<Child>,
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    /// The `amqps://` port of a node started by [`OwnRabbit::start_tls`].
    pub tls_port: Option<u16>,
    /// Its management API's https port.
    management_tls_port: Option<u16>,
    dir: TempDir,
}

impl OwnRabbit {
    /// `None` (loudly, and a failure under `CI=true`) without `rabbitmq-server`.
    pub fn start(test: &str) -> Option<OwnRabbit> {
        Self::start_with(test, false)
    }

    /// A node that also takes `amqps://` ([`OwnRabbit::tls_url`]) and serves its
    /// management API over https only ([`OwnRabbit::management_https_url`]), with a
    /// certificate for 127.0.0.1 signed by a CA of the test's own
    /// ([`OwnRabbit::ca_file`]), made by `openssl`.
    pub fn start_tls(test: &str) -> Option<OwnRabbit> {
        Self::start_with(test, true)
    }

    fn start_with(test: &str, tls: bool) -> Option<OwnRabbit> {
        if !std::path::Path::new(SERVER).exists() {
            missing(
                test,
                "there is no rabbitmq-server (apt-get install rabbitmq-server)",
            );
            return None;
        }
        let dir = temp_dir("rabbit");
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, format!("COOKIE{}", std::process::id())).unwrap();
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .unwrap();
        let plugins = if tls { "[rabbitmq_management]" } else { "[]" };
        std::fs::write(dir.join("enabled_plugins"), format!("{plugins}.\n")).unwrap();
        let mut conf = "log.console = false\n".to_owned();
        let tls_port = tls.then(free_port);
        let management_tls_port = tls.then(free_port);
        if let (Some(tls_port), Some(management)) = (tls_port, management_tls_port) {
            certificates(&dir);
            let file = |name: &str| dir.join(name).display().to_string();
            let (ca, cert, key) = (file("ca.pem"), file("server.pem"), file("server.key"));
            conf += &format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n\
                 management.ssl.ip = 127.0.0.1\nmanagement.ssl.port = {management}\n\
                 management.ssl.cacertfile = {ca}\nmanagement.ssl.certfile = {cert}\n\
                 management.ssl.keyfile = {key}\ncollect_statistics_interval = 500\n",
            );
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        let mut rabbit = OwnRabbit {
            child: None,
            port: free_port(),
            dist_port: free_port(),
            epmd_port: free_port(),
            tls_port,
            management_tls_port,
            dir,
        };
        rabbit.restart();
        Some(rabbit)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The `amqps://` URL of a node started by [`OwnRabbit::start_tls`].
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("a node started with TLS");
        format!("amqps://guest:guest@127.0.0.1:{port}/%2f")
    }

    /// The https management API of a node started by [`OwnRabbit::start_tls`].
    pub fn management_https_url(&self) -> String {
        let port = self.management_tls_port.expect("a node started with TLS");
        format!("https://127.0.0.1:{port}")
    }

    /// The PEM file of the CA that signed the node's certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// The PEM file of another CA, which signed nothing of the node's.
    pub fn other_ca_file(&self) -> std::path::PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// Starts the node on the same ports and folder, and waits until it takes AMQP
    /// connections (about 15 s on two cores).
    pub fn restart(&mut self) {
        let dir = &*self.dir;
        let child = Command::new(SERVER)
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", format!("test{}@localhost", self.port))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "rabbitmq-server did not start; its log folder: {}",
                dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the node answers AMQP's protocol header with its `connection.start`.
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
        if socket.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
            return false;
        }
        let mut frame = [0u8; 8];
        socket.read_exact(&mut frame).is_ok() && frame[0] == 1
    }

    /// Runs `expression` (Erlang) on the node with `rabbitmqctl eval`; its output.
    pub fn eval(&self, expression: &str) -> String {
        let cookie = std::fs::read_to_string(self.dir.join(".erlang.cookie")).unwrap();
        let output = Command::new("rabbitmqctl")
            .env("HOME", &*self.dir)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .args(["--erlang-cookie", cookie.trim(), "-n"])
            .arg(format!("test{}@localhost", self.port))
            .args(["eval", expression])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "rabbitmqctl eval {expression}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    }

    /// Stops the Raft member of the quorum queue `queue` (in `/`): the queue is
    /// still declared, but has no leader and takes no publish.
    pub fn stop_queue_member(&self, queue: &str) {
        self.eval(&format!(
            "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
             ra:stop_server(quorum_queues, amqqueue:get_pid(Q))."
        ));
    }

    /// Starts the member [`OwnRabbit::stop_queue_member`] stopped.
    pub fn restart_queue_member(&self, queue: &str) {
        self.eval(&format!(
            "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
             ra:restart_server(quorum_queues, amqqueue:get_pid(Q))."
        ));
    }

    /// SIGKILL to the node and everything it started.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::support::kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        self.kill();
        // epmd refuses `-kill` while the node is still registered: until the killed
        // node's connection closed, which takes a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let killed = Command::new("epmd")
                .args(["-port", &self.epmd_port.to_string(), "-kill"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("Killed"));
            let gone = std::net::TcpStream::connect(("127.0.0.1", self.epmd_port)).is_err();
            if killed || gone || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A CA (`ca.pem`) and a certificate it signed for 127.0.0.1 (`server.pem`,
/// `server.key`), and another CA (`other-ca.pem`), in `dir`, by the `openssl` command.
fn certificates(dir: &std::path::Path) {
    std::fs::write(dir.join("server.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
    let ca = "req -x509 -newkey rsa:2048 -nodes -days 2";
    let steps = [
        format!("{ca} -keyout ca.key -out ca.pem -subj /CN=comapi-webhook-test-CA"),
        format!("{ca} -keyout other-ca.key -out other-ca.pem -subj /CN=comapi-webhook-other-CA"),
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1".into(),
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
         -days 2 -extfile server.ext"
            .into(),
    ];
    for step in steps {
        let args: Vec<&str> = step.split_whitespace().collect();
        let made = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("the openssl command");
        assert!(made.status.success(), "openssl {args:?}: {made:?}");
    }
}
