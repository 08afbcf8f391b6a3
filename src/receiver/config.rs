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
use crate::worker::{RetryPolicy, WorkerConfig};

use super::redis::{RedisSettings, redis_from};

/// The port a receiver listens on unless `PORT` says otherwise.
pub const DEFAULT_PORT: u16 = 8080;

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
/// | `COMAPI_MAX_BODY_BYTES` | the body limit, default 1048576 (1 MiB) |
/// | `COMAPI_BODY_BUDGET_BYTES` | the body bytes held at once across every connection, default 67108864 (64 MiB); past it, `503` with `Retry-After` |
/// | `COMAPI_REDIS_URL` | store into a Redis stream instead of the spool (feature `redis`) |
/// | `COMAPI_REDIS_PREFIX` | the Redis keys' prefix, default `comapi-webhook:` |
/// | `COMAPI_AMQP_URL` | store into a RabbitMQ quorum queue instead (feature `rabbitmq`): `amqp://user:pass@host:port/vhost`; not with `COMAPI_REDIS_URL` |
/// | `COMAPI_AMQP_QUEUE` | the queue, default `comapi-webhook.events` (its dead letters in `<queue>.dead`) |
/// | `COMAPI_AMQP_MANAGEMENT_URL` | RabbitMQ's management API, `http://[user:pass@]host:15672` (`https://` with `rabbitmq-tls`), for the unacknowledged count on the status page and `/metrics`; default none |
/// | `COMAPI_GATE_REDIS_URL` | with RabbitMQ: a Redis (`redis://…`) where the workers share their revision gate, so that a Comapi retry or an older revision reaching another worker is still told apart; default none, each worker's gate in its memory |
/// | `COMAPI_LEASE` | how long a worker may hold an event before another takes it over (the lease of every gate, in memory or in Redis), default `60s`, at least `1s` |
/// | `COMAPI_WORKER` | run a worker in this process: default `true` without Redis, `false` with it |
/// | `COMAPI_HEADER_TIMEOUT` | how long a new connection may take to send its first request's headers, default `5s` (`1s` for actix_receiver, which cannot make room at its connection limit) |
/// | `COMAPI_IDLE_TIMEOUT` | how long a connection may stay idle between requests, default `5s` |
/// | `COMAPI_BODY_TIMEOUT` | how long a request's body may take to arrive (then 408), default `10s` |
/// | `COMAPI_MAX_CONNECTIONS` | connections open at once; at the limit the longest-idle one makes room, default the open-file limit less 64, at most 4096 ([`default_max_connections`](super::default_max_connections)) |
/// | `COMAPI_SHUTDOWN_GRACE` | how long SIGTERM may take to exit in total (requests in flight, then the worker), default `25s` |
/// | `COMAPI_CONCURRENCY` | handler calls a worker keeps in flight (one entity at a time each), default 32 |
/// | `COMAPI_RETRY_ATTEMPTS` | attempts at an event before it goes to the dead letter, the first included, default 8 |
/// | `COMAPI_RETRY_FIRST_DELAY` | the wait after the first failed attempt, doubling after each next one, default `1s` |
/// | `COMAPI_RETRY_MAX_DELAY` | the longest wait between attempts, default `60s` |
/// | `COMAPI_METRICS_TOKEN` | when set, `GET /metrics` needs `Authorization: Bearer <token>`; otherwise it answers anyone |
/// | `COMAPI_CONSOLE_TOKEN` | when set (16 characters or more), the operator's console at `/console` takes it to sign in; otherwise the console answers 404 ([`console`](crate::console)) |
/// | `COMAPI_CONSOLE_READ_TOKEN` | a second token for the console that can look but not act |
///
/// [`ReceiverConfig::HELP`] lists them as the binaries' `--help` prints them.
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
    /// The body bytes held at once across every connection ([`BodyBudget`](crate::BodyBudget)).
    pub body_budget_bytes: usize,
    /// The Redis to store into, if any.
    pub redis: Option<RedisSettings>,
    /// The RabbitMQ to store into, if any.
    pub amqp: Option<super::AmqpSettings>,
    /// Whether this process runs a worker.
    pub worker: bool,
    /// How long a worker may hold an event before another takes it over
    /// (`COMAPI_LEASE`): the lease of every gate, in memory or in Redis.
    pub lease: Duration,
    /// How long a new connection may take to send its first request's headers.
    pub header_deadline: Duration,
    /// How long a connection may stay idle between requests.
    pub idle_deadline: Duration,
    /// How long a request's body may take to arrive.
    pub body_deadline: Duration,
    /// How many connections may be open at once.
    pub max_connections: usize,
    /// How long a shutdown may take in total ([`Receiver::shutdown_by`](super::Receiver::shutdown_by)).
    pub shutdown_grace: Duration,
    /// How the worker runs: its retries and its concurrency.
    pub worker_config: WorkerConfig,
    /// The bearer token `GET /metrics` asks for, if any.
    pub metrics_token: Option<String>,
    /// The console's tokens (none: the console answers 404).
    pub console: crate::console::ConsoleAccess,
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

pub(super) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl ReceiverConfig {
    /// The variables, one per line with its default, as the reference binaries'
    /// `--help` prints them.
    pub const HELP: &'static str = "\
  COMAPI_WEBHOOK_SECRET     required: the webhook's secret from the Comapi portal
                            (comma-separated for rotation, primary first; >= 16 bytes)
  PORT, BIND                where to listen (default 8080 on 127.0.0.1; PORT=0: any free port)
  COMAPI_SPOOL_DIR          the spool folder (default comapi-webhook-spool in the temp folder)
  COMAPI_SPOOL_KEEP         true keeps processed spool segments (default false)
  COMAPI_MAX_BODY_BYTES     the body limit (default 1048576)
  COMAPI_BODY_BUDGET_BYTES  body bytes held at once, all connections (default 67108864)
  COMAPI_REDIS_URL          store into a Redis stream: redis://[:password@]host:port/[db]
  COMAPI_REDIS_PREFIX       the Redis keys' prefix (default comapi-webhook:)
  COMAPI_AMQP_URL           store into a RabbitMQ quorum queue: amqp://user:pass@host:port/vhost
  COMAPI_AMQP_QUEUE         the queue (default comapi-webhook.events)
  COMAPI_AMQP_MANAGEMENT_URL  RabbitMQ's management API for the unacknowledged count:
                            http[s]://[user:pass@]host:15672 (default none)
  COMAPI_GATE_REDIS_URL     with RabbitMQ: a Redis the workers share their gate in
                            (default: each worker's gate in its memory)
  COMAPI_LEASE              how long a worker may hold an event (default 60s, >= 1s)
  COMAPI_WORKER             run a worker in this process (default: true without a broker)
  COMAPI_HEADER_TIMEOUT     time for a new connection's request headers (default 5s;
                            1s for actix_receiver)
  COMAPI_IDLE_TIMEOUT       time a connection may idle between requests (default 5s)
  COMAPI_BODY_TIMEOUT       time for a request's body, then 408 (default 10s)
  COMAPI_MAX_CONNECTIONS    connections at once (default: ulimit -n less 64, <= 4096)
  COMAPI_SHUTDOWN_GRACE     how long SIGTERM may take to exit, all in (default 25s)
  COMAPI_CONCURRENCY        handler calls in flight (default 32)
  COMAPI_RETRY_ATTEMPTS     attempts before the dead letter (default 8)
  COMAPI_RETRY_FIRST_DELAY  the wait after the first failure, then doubling (default 1s)
  COMAPI_RETRY_MAX_DELAY    the longest wait between attempts (default 60s)
  COMAPI_METRICS_TOKEN      GET /metrics needs Authorization: Bearer <token> (default: open)
  COMAPI_CONSOLE_TOKEN      the operator's console at /console signs in with it
                            (16+ characters; default: no console, 404)
  COMAPI_CONSOLE_READ_TOKEN a console token that can look but not act
  RUST_LOG                  the log filter (default info,lapin=off)";

    /// Reads the settings from the environment (see the table above).
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when a value is missing or wrong: a
    /// secret's entry by its place in the list (`entry 2 of 3 is empty`), never its
    /// value.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&env)
    }

    /// The worker's settings alone (`COMAPI_CONCURRENCY`, `COMAPI_RETRY_ATTEMPTS`,
    /// `COMAPI_RETRY_FIRST_DELAY`, `COMAPI_RETRY_MAX_DELAY`), for a worker process.
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
        let body_budget_bytes = parsed(
            &var,
            "COMAPI_BODY_BUDGET_BYTES",
            "a number of bytes",
            crate::DEFAULT_BODY_BUDGET_BYTES,
        )?;
        if body_budget_bytes < max_body_bytes {
            return Err(ConfigError::setting(format!(
                "COMAPI_BODY_BUDGET_BYTES ({body_budget_bytes}) must be at least \
                 COMAPI_MAX_BODY_BYTES ({max_body_bytes}), or no full-size body could ever be read"
            )));
        }
        let amqp = super::amqp::amqp_from(lookup)?;
        let redis = redis_from(lookup)?;
        let worker = flag(&var, "COMAPI_WORKER")?.unwrap_or(redis.is_none() && amqp.is_none());
        let max_connections = parsed(
            &var,
            "COMAPI_MAX_CONNECTIONS",
            "a positive number",
            super::default_max_connections(),
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
            body_budget_bytes,
            redis,
            amqp,
            worker,
            lease: lease(&var)?,
            header_deadline: duration(
                &var,
                "COMAPI_HEADER_TIMEOUT",
                super::DEFAULT_HEADER_DEADLINE,
            )?,
            idle_deadline: duration(&var, "COMAPI_IDLE_TIMEOUT", super::DEFAULT_IDLE_DEADLINE)?,
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
            metrics_token: var("COMAPI_METRICS_TOKEN").map(|t| t.trim().to_owned()),
            console: crate::console::ConsoleAccess::from_lookup(&var)
                .map_err(ConfigError::setting)?,
        })
    }
}

/// The worker's settings from `COMAPI_CONCURRENCY` and the `COMAPI_RETRY_…`
/// variables.
fn worker_config(var: &dyn Fn(&str) -> Option<String>) -> Result<WorkerConfig, ConfigError> {
    let defaults = RetryPolicy::default();
    let attempts = parsed(
        var,
        "COMAPI_RETRY_ATTEMPTS",
        "a positive number",
        defaults.attempts,
    )?;
    if attempts == 0 || attempts > MAX_ATTEMPTS {
        return Err(ConfigError::setting(format!(
            "COMAPI_RETRY_ATTEMPTS must be from 1 (no retry) to {MAX_ATTEMPTS}, not \"{attempts}\""
        )));
    }
    let first_delay = duration(var, "COMAPI_RETRY_FIRST_DELAY", defaults.first_delay)?;
    let max_delay = duration(
        var,
        "COMAPI_RETRY_MAX_DELAY",
        defaults.max_delay.max(first_delay),
    )?;
    if max_delay < first_delay {
        return Err(ConfigError::setting(format!(
            "COMAPI_RETRY_MAX_DELAY ({}) must not be shorter than COMAPI_RETRY_FIRST_DELAY ({})",
            humantime::format_duration(max_delay),
            humantime::format_duration(first_delay)
        )));
    }
    let retry = RetryPolicy::new(first_delay, max_delay, attempts);
    let concurrency = parsed(
        var,
        "COMAPI_CONCURRENCY",
        "a positive number",
        WorkerConfig::DEFAULT_CONCURRENCY,
    )?;
    if concurrency == 0 || concurrency > MAX_CONCURRENCY {
        return Err(ConfigError::setting(format!(
            "COMAPI_CONCURRENCY must be from 1 to {MAX_CONCURRENCY}, not \"{concurrency}\""
        )));
    }
    Ok(WorkerConfig::from(retry).with_concurrency(concurrency))
}

/// The most attempts `COMAPI_RETRY_ATTEMPTS` takes: more is a typo, not a policy.
const MAX_ATTEMPTS: u32 = 1_000;

/// The most handler calls in flight `COMAPI_CONCURRENCY` takes.
const MAX_CONCURRENCY: usize = 65_536;

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

/// The shortest lease accepted: a worker renews what it holds every third of it.
const MIN_LEASE: Duration = Duration::from_secs(1);

/// `COMAPI_LEASE`, at least [`MIN_LEASE`]; the default lease when unset.
pub(super) fn lease(var: &dyn Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    let lease = duration(var, "COMAPI_LEASE", crate::gate::DEFAULT_LEASE)?;
    if lease < MIN_LEASE {
        return Err(ConfigError::setting(format!(
            "COMAPI_LEASE must be at least 1s (a worker renews what it holds every third of \
             it), not {}",
            humantime::format_duration(lease)
        )));
    }
    Ok(lease)
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
#[path = "config_tests.rs"]
mod tests;
