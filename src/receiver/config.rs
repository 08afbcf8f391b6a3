//! `ReceiverConfig`: a receiver's settings from the environment, with errors that
//! name the variable to change.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::Verifier;
use crate::inbox::DEFAULT_MAX_BODY_BYTES;
use crate::signature::MIN_SECRET_LEN;
use crate::store::spool::SpoolConfig;
use crate::worker::WorkerConfig;

/// The port a receiver listens on unless `PORT` says otherwise.
pub const DEFAULT_PORT: u16 = 8080;
/// The Redis keys' prefix unless `COMAPI_REDIS_PREFIX` says otherwise.
pub const DEFAULT_KEY_PREFIX: &str = "comapi-webhook:";

/// A receiver's settings, as the reference receivers read them from the
/// environment ([`ReceiverConfig::from_env`]):
///
/// | variable | meaning |
/// |---|---|
/// | `COMAPI_WEBHOOK_SECRET` | required; comma-separated for rotation, primary first; each entry at least 16 bytes |
/// | `PORT` | default 8080; `0` picks a free port |
/// | `BIND` | the address to listen on, default `127.0.0.1` |
/// | `COMAPI_SPOOL_DIR` | the spool folder, default `comapi-webhook-spool` in the OS temp folder |
/// | `COMAPI_SPOOL_KEEP` | `true` keeps processed segments; default `false` |
/// | `COMAPI_MAX_BODY_BYTES` | the body limit, default 4194304 (4 MiB) |
/// | `COMAPI_REDIS_URL` | store into a Redis stream instead of the spool (feature `redis`) |
/// | `COMAPI_REDIS_PREFIX` | the Redis keys' prefix, default `comapi-webhook:` |
/// | `COMAPI_LEASE` | how long a worker may hold an event before another takes it over, default `60s` |
/// | `COMAPI_WORKER` | run a worker in this process: default `true` without Redis, `false` with it |
/// | `COMAPI_HEADER_TIMEOUT` | how long a connection may take to send a request's headers, or stay idle, default `5s` |
/// | `COMAPI_BODY_TIMEOUT` | how long a request's body may take to arrive (then 408), default `10s` |
/// | `COMAPI_MAX_CONNECTIONS` | connections open at once; at the limit the longest-idle one makes room, default 512 |
/// | `COMAPI_SHUTDOWN_GRACE` | how long a shutdown may take, default `25s` |
/// | `COMAPI_CONCURRENCY` | handler calls a worker keeps in flight (one entity at a time each), default 32 |
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReceiverConfig {
    /// Checks the signatures.
    pub verifier: Verifier,
    /// Where to listen.
    pub addr: SocketAddr,
    /// The spool, when there is no Redis.
    pub spool: SpoolConfig,
    /// The body limit.
    pub max_body_bytes: usize,
    /// The Redis to store into, if any.
    pub redis: Option<RedisSettings>,
    /// Whether this process runs a worker.
    pub worker: bool,
    /// How long a connection may take to send a request's headers, or stay idle.
    pub header_deadline: Duration,
    /// How long a request's body may take to arrive.
    pub body_deadline: Duration,
    /// How many connections may be open at once.
    pub max_connections: usize,
    /// How long a shutdown may take ([`Worker::shutdown_within`](crate::Worker::shutdown_within)).
    pub shutdown_grace: Duration,
    /// How the worker runs: its retries and its concurrency.
    pub worker_config: WorkerConfig,
}

/// Where and how a receiver and its workers use Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://[:password@]host:port/[db]`.
    pub url: String,
    /// Prepended to every key, the stream's and the gate's.
    pub key_prefix: String,
    /// How long a worker may hold an event before another takes it over.
    pub lease: Duration,
}

impl RedisSettings {
    /// The Redis settings alone (`COMAPI_REDIS_URL`, `COMAPI_REDIS_PREFIX`,
    /// `COMAPI_LEASE`), for a worker process: `None` without `COMAPI_REDIS_URL`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when a value is wrong.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        redis_from(&env)
    }
}

#[cfg(feature = "redis")]
impl RedisSettings {
    /// The stream's settings: this prefix and lease, the rest the defaults.
    #[must_use]
    pub fn stream_config(&self) -> crate::store::redis_stream::RedisStreamConfig {
        crate::store::redis_stream::RedisStreamConfig::default()
            .with_key_prefix(self.key_prefix.clone())
            .with_lease(self.lease)
    }

    /// Asks Redis whether `url` lets this process in: a password that is missing
    /// (`NOAUTH`) or wrong, or a user without access, is a wrong setting, said once
    /// at start-up rather than as a 503 to every request.
    ///
    /// # Errors
    /// [`ConfigError`] naming `COMAPI_REDIS_URL`: with exit status 2 when Redis
    /// refused the credentials, 1 when it cannot be reached.
    pub async fn check_credentials(&self) -> Result<(), ConfigError> {
        let refused = |e: &redis::RedisError| {
            e.kind() == redis::ErrorKind::AuthenticationFailed
                || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        };
        let said = |e: redis::RedisError| {
            let message = format!("COMAPI_REDIS_URL: Redis refused this process: {e}");
            if refused(&e) {
                ConfigError::setting(format!(
                    "{message} (give the password in the URL: redis://:PASSWORD@host:port/)"
                ))
            } else {
                ConfigError::new(message)
            }
        };
        let client = redis::Client::open(self.url.as_str()).map_err(|e| {
            ConfigError::setting(format!("COMAPI_REDIS_URL is not a Redis URL: {e}"))
        })?;
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        match tokio::time::timeout(Duration::from_secs(5), ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(said(e)),
            Err(_) => Err(ConfigError::new(
                "COMAPI_REDIS_URL: Redis did not answer within 5 s",
            )),
        }
    }
}

/// A setting that is missing or wrong, or a store that cannot be opened: says which
/// variable to change, never a secret's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
    exit_code: u8,
}

impl ConfigError {
    /// A store or address that cannot be opened now (exit status 1).
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
            exit_code: 1,
        }
    }

    /// A setting that is wrong, and stays wrong until it is changed (exit status 2).
    pub(crate) fn setting(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
            exit_code: 2,
        }
    }

    /// The exit status the reference binaries use for it: 2 for a wrong setting,
    /// 1 for a store or address that cannot be opened now.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        self.exit_code
    }

    /// The address cannot be bound: names `PORT` and `BIND`.
    #[must_use]
    pub fn cannot_listen(addr: SocketAddr, error: &std::io::Error) -> Self {
        ConfigError::new(format!("cannot listen on {addr} (PORT, BIND): {error}"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl ReceiverConfig {
    /// Reads the settings from the environment (see the table above).
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when a value is missing or wrong: a
    /// secret's entry by its place in the list (`entry 2 of 3 is empty`), never its
    /// value.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&env)
    }

    /// The worker's settings alone (`COMAPI_CONCURRENCY`), for a worker process.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when a value is wrong.
    pub fn worker_config_from_env() -> Result<WorkerConfig, ConfigError> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        worker_config(&var)
    }

    /// `COMAPI_SHUTDOWN_GRACE` alone (default 25 s), for a worker process.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when it is not a duration.
    pub fn shutdown_grace_from_env() -> Result<Duration, ConfigError> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        duration(
            &var,
            "COMAPI_SHUTDOWN_GRACE",
            crate::worker::DEFAULT_SHUTDOWN_GRACE,
        )
    }

    /// [`ReceiverConfig::from_env`] with another source of variables.
    pub(crate) fn from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        // Wiped when dropped; the process environment keeps its own copy.
        let secrets = zeroize::Zeroizing::new(var("COMAPI_WEBHOOK_SECRET").ok_or_else(|| {
            ConfigError::setting(
                "COMAPI_WEBHOOK_SECRET is required: the secret entered for this webhook in the \
                 Comapi portal (comma-separated for rotation, primary first)",
            )
        })?);
        let entries: Vec<&str> = secrets.split(',').map(str::trim).collect();
        for (i, entry) in entries.iter().enumerate() {
            let which = format!(
                "COMAPI_WEBHOOK_SECRET: entry {} of {}",
                i + 1,
                entries.len()
            );
            if entry.is_empty() {
                return Err(ConfigError::setting(format!("{which} is empty")));
            }
            if entry.len() < MIN_SECRET_LEN {
                return Err(ConfigError::setting(format!(
                    "{which} is {} bytes; Comapi requires at least {MIN_SECRET_LEN} bytes (36 or more recommended)",
                    entry.len()
                )));
            }
        }
        let verifier = Verifier::with_secrets(entries)
            .map_err(|e| ConfigError::setting(format!("COMAPI_WEBHOOK_SECRET: {e}")))?;
        let port = parsed(&var, "PORT", "a port number", DEFAULT_PORT)?;
        let ip = parsed(&var, "BIND", "an IP address", IpAddr::from([127, 0, 0, 1]))?;
        let spool = var("COMAPI_SPOOL_DIR").map_or_else(SpoolConfig::in_temp_dir, |dir| {
            SpoolConfig::new(PathBuf::from(dir))
        });
        // The spool is the worker's queue: processed segments go, unless asked to keep them.
        let keep = flag(&var, "COMAPI_SPOOL_KEEP")?.unwrap_or(false);
        let max_body_bytes = parsed(
            &var,
            "COMAPI_MAX_BODY_BYTES",
            "a positive number of bytes",
            DEFAULT_MAX_BODY_BYTES,
        )?;
        if max_body_bytes == 0 {
            return Err(ConfigError::setting(
                "COMAPI_MAX_BODY_BYTES must be a positive number of bytes, not \"0\"",
            ));
        }
        let redis = redis_from(lookup)?;
        let worker = flag(&var, "COMAPI_WORKER")?.unwrap_or(redis.is_none());
        let max_connections = parsed(
            &var,
            "COMAPI_MAX_CONNECTIONS",
            "a positive number",
            super::DEFAULT_MAX_CONNECTIONS,
        )?;
        if max_connections == 0 {
            return Err(ConfigError::setting(
                "COMAPI_MAX_CONNECTIONS must be a positive number, not \"0\"",
            ));
        }
        Ok(ReceiverConfig {
            verifier,
            addr: SocketAddr::new(ip, port),
            spool: spool.with_remove_processed(!keep),
            max_body_bytes,
            redis,
            worker,
            header_deadline: duration(
                &var,
                "COMAPI_HEADER_TIMEOUT",
                super::DEFAULT_HEADER_DEADLINE,
            )?,
            body_deadline: duration(
                &var,
                "COMAPI_BODY_TIMEOUT",
                crate::inbox::DEFAULT_BODY_DEADLINE,
            )?,
            max_connections,
            shutdown_grace: duration(
                &var,
                "COMAPI_SHUTDOWN_GRACE",
                crate::worker::DEFAULT_SHUTDOWN_GRACE,
            )?,
            worker_config: worker_config(&var)?,
        })
    }
}

fn redis_from(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<RedisSettings>, ConfigError> {
    let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    let Some(url) = var("COMAPI_REDIS_URL") else {
        return Ok(None);
    };
    if !cfg!(feature = "redis") {
        return Err(ConfigError::setting(
            "COMAPI_REDIS_URL is set, but this binary was built without Redis: build it with \
             --features receiver,redis",
        ));
    }
    let lease = duration(&var, "COMAPI_LEASE", crate::gate::DEFAULT_LEASE)?;
    Ok(Some(RedisSettings {
        url: url.trim().to_owned(),
        key_prefix: var("COMAPI_REDIS_PREFIX").unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned()),
        lease,
    }))
}

/// The worker's settings from `COMAPI_CONCURRENCY`.
fn worker_config(var: &dyn Fn(&str) -> Option<String>) -> Result<WorkerConfig, ConfigError> {
    let concurrency = parsed(
        var,
        "COMAPI_CONCURRENCY",
        "a positive number",
        WorkerConfig::DEFAULT_CONCURRENCY,
    )?;
    if concurrency == 0 {
        return Err(ConfigError::setting(
            "COMAPI_CONCURRENCY must be a positive number, not \"0\"",
        ));
    }
    Ok(WorkerConfig::default().with_concurrency(concurrency))
}

/// `name` as a positive duration (`60s`, `500ms`), or `default` when unset.
fn duration(
    var: &dyn Fn(&str) -> Option<String>,
    name: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match var(name) {
        Some(value) => humantime::parse_duration(value.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError::setting(format!(
                    "{name} must be a duration such as {}, not {value:?}",
                    humantime::format_duration(default)
                ))
            }),
        None => Ok(default),
    }
}

/// `name` parsed, or `default` when unset.
fn parsed<T: std::str::FromStr>(
    var: &dyn Fn(&str) -> Option<String>,
    name: &str,
    what: &str,
    default: T,
) -> Result<T, ConfigError> {
    match var(name) {
        Some(value) => value
            .trim()
            .parse()
            .map_err(|_| ConfigError::setting(format!("{name} must be {what}, not {value:?}"))),
        None => Ok(default),
    }
}

/// `name` as a boolean, `None` when unset.
fn flag(var: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<bool>, ConfigError> {
    match var(name).as_deref().map(str::trim) {
        None => Ok(None),
        Some("1" | "true" | "yes" | "on") => Ok(Some(true)),
        Some("0" | "false" | "no" | "off") => Ok(Some(false)),
        Some(other) => Err(ConfigError::setting(format!(
            "{name} must be true or false, not {other:?}"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    const SECRET: &str = "the-current-secret-0123456789";

    fn config(vars: &[(&str, &str)]) -> Result<ReceiverConfig, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ReceiverConfig::from_lookup(&|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_each_variable() {
        let defaults =
            config(&[("COMAPI_WEBHOOK_SECRET", SECRET)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(defaults.addr, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(defaults.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert!(defaults.worker && defaults.redis.is_none() && defaults.spool.remove_processed);
        let set = config(&[
            (
                "COMAPI_WEBHOOK_SECRET",
                &format!("{SECRET}, the-previous-secret-0123"),
            ),
            ("PORT", "0"),
            ("BIND", "0.0.0.0"),
            ("COMAPI_SPOOL_DIR", "/var/spool/comapi"),
            ("COMAPI_SPOOL_KEEP", "yes"),
            ("COMAPI_MAX_BODY_BYTES", "1000"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.addr, SocketAddr::from(([0, 0, 0, 0], 0)));
        assert_eq!(set.spool.dir, PathBuf::from("/var/spool/comapi"));
        assert!(!set.spool.remove_processed);
        assert_eq!(set.max_body_bytes, 1000);
    }

    #[test]
    fn each_error_names_the_variable_and_never_the_secret() {
        let cases: [(&[(&str, &str)], &str); 8] = [
            (&[], "COMAPI_WEBHOOK_SECRET is required"),
            (
                &[("COMAPI_WEBHOOK_SECRET", "short")],
                "COMAPI_WEBHOOK_SECRET: entry 1 of 1 is 5 bytes; Comapi requires at least 16 bytes",
            ),
            (
                &[("COMAPI_WEBHOOK_SECRET", "the-current-secret-0123456789, ,x")],
                "COMAPI_WEBHOOK_SECRET: entry 2 of 3 is empty",
            ),
            (
                &[("COMAPI_WEBHOOK_SECRET", SECRET), ("PORT", "http")],
                "PORT must be a port number",
            ),
            (
                &[("COMAPI_WEBHOOK_SECRET", SECRET), ("BIND", "localhost")],
                "BIND must be an IP address",
            ),
            (
                &[
                    ("COMAPI_WEBHOOK_SECRET", SECRET),
                    ("COMAPI_SPOOL_KEEP", "sometimes"),
                ],
                "COMAPI_SPOOL_KEEP must be true or false",
            ),
            (
                &[
                    ("COMAPI_WEBHOOK_SECRET", SECRET),
                    ("COMAPI_MAX_BODY_BYTES", "0"),
                ],
                "COMAPI_MAX_BODY_BYTES must be a positive number",
            ),
            (
                &[
                    ("COMAPI_WEBHOOK_SECRET", SECRET),
                    ("COMAPI_WORKER", "maybe"),
                ],
                "COMAPI_WORKER must be true or false",
            ),
        ];
        for (vars, message) in cases {
            let error = config(vars).err().unwrap_or_default();
            assert!(error.starts_with(message), "{vars:?}: {error}");
            assert!(!error.contains("0123456789"), "{error}");
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_turns_the_worker_off_unless_asked() {
        let redis = config(&[
            ("COMAPI_WEBHOOK_SECRET", SECRET),
            ("COMAPI_REDIS_URL", "redis://127.0.0.1:6379/"),
            ("COMAPI_LEASE", "2s"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!redis.worker);
        let settings = redis.redis.unwrap_or_else(|| panic!("no Redis"));
        assert_eq!(
            (settings.key_prefix.as_str(), settings.lease),
            (DEFAULT_KEY_PREFIX, Duration::from_secs(2))
        );
        let error = config(&[
            ("COMAPI_WEBHOOK_SECRET", SECRET),
            ("COMAPI_REDIS_URL", "redis://x/"),
            ("COMAPI_LEASE", "soon"),
        ]);
        assert!(
            error
                .err()
                .unwrap_or_default()
                .starts_with("COMAPI_LEASE must be a duration")
        );
    }
}
