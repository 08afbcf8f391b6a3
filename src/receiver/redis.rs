//! `RedisSettings`: where the receivers and workers use Redis (`COMAPI_REDIS_URL`,
//! `COMAPI_REDIS_PREFIX`, and `COMAPI_GATE_REDIS_URL` for a RabbitMQ worker's
//! gate), and the check of its credentials at start-up.

use std::time::Duration;

use super::ConfigError;
use super::config::{env, lease};

/// The Redis keys' prefix unless `COMAPI_REDIS_PREFIX` says otherwise.
pub const DEFAULT_KEY_PREFIX: &str = "comapi-webhook:";

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
    /// The variable `url` came from, for the errors.
    variable: &'static str,
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

    /// The variable the URL came from: `COMAPI_REDIS_URL`, or
    /// `COMAPI_GATE_REDIS_URL` for a RabbitMQ worker's gate.
    #[must_use]
    pub fn variable(&self) -> &'static str {
        self.variable
    }
}

#[cfg(feature = "redis")]
impl RedisSettings {
    /// The revision gate on this Redis, with this prefix and lease, shared by every
    /// worker that uses it. Checks the credentials first
    /// ([`check_credentials`](Self::check_credentials)).
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable ([`RedisSettings::variable`]): with exit
    /// status 2 when Redis refused the credentials, 1 when it cannot be reached.
    pub async fn gate(&self) -> Result<crate::gate::RedisGate, ConfigError> {
        self.check_credentials().await?;
        let config = crate::gate::RedisGateConfig::default()
            .with_key_prefix(self.key_prefix.clone())
            .with_lease(self.lease);
        crate::gate::RedisGate::connect(&self.url, config)
            .await
            .map_err(|e| ConfigError::new(format!("{}: {}", self.variable, e.report())))
    }

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
    /// [`ConfigError`] naming the variable ([`RedisSettings::variable`]): with exit status 2 when Redis
    /// refused the credentials, 1 when it cannot be reached.
    pub async fn check_credentials(&self) -> Result<(), ConfigError> {
        let refused = |e: &redis::RedisError| {
            e.kind() == redis::ErrorKind::AuthenticationFailed
                || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        };
        let client = redis::Client::open(self.url.as_str()).map_err(|e| {
            ConfigError::setting(format!(
                "{} is not a Redis URL ({e}): write it as {REDIS_URL_FORM}",
                self.variable
            ))
        })?;
        let ping = |client: redis::Client| async move {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), ping(client.clone())).await;
        match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if refused(&e) => {
                let sent_password = client
                    .get_connection_info()
                    .redis_settings()
                    .password()
                    .is_some();
                let needs_none = sent_password
                    && match redis::Client::open(without_credentials(&self.url)) {
                        Ok(bare) => matches!(
                            tokio::time::timeout(Duration::from_secs(5), ping(bare)).await,
                            Ok(Ok(_))
                        ),
                        Err(_) => false,
                    };
                let what = if needs_none {
                    "this Redis needs no password: remove it from the URL".to_owned()
                } else if sent_password {
                    "the user or password in the URL is wrong, or the user lacks access".to_owned()
                } else {
                    format!("this Redis needs a password: give it in the URL, {REDIS_URL_FORM}")
                };
                Err(ConfigError::setting(format!(
                    "{}: Redis refused this process ({e}): {what}",
                    self.variable
                )))
            }
            Ok(Err(e)) => Err(ConfigError::new(format!(
                "{}: cannot reach Redis: {e}",
                self.variable
            ))),
            Err(_) => Err(ConfigError::new(format!(
                "{}: Redis did not answer within 5 s",
                self.variable
            ))),
        }
    }
}

/// `url` without its `user:password@`.
#[cfg(feature = "redis")]
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}/{path}")
        }
        None => url.to_owned(),
    }
}

/// How a Redis URL is written, for the messages that refuse one.
const REDIS_URL_FORM: &str = "redis://[[user]:password@]host:port/[db] (rediss:// with TLS)";

pub(super) fn redis_from(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<RedisSettings>, ConfigError> {
    redis_at(lookup, "COMAPI_REDIS_URL")
}

/// The Redis whose URL is in `variable`, with `COMAPI_REDIS_PREFIX` and
/// `COMAPI_LEASE`: `None` when `variable` is not set.
pub(super) fn redis_at(
    lookup: &dyn Fn(&str) -> Option<String>,
    variable: &'static str,
) -> Result<Option<RedisSettings>, ConfigError> {
    let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    let Some(url) = var(variable) else {
        return Ok(None);
    };
    let scheme = url.trim().split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix")) {
        return Err(ConfigError::setting(format!(
            "{variable} must be a Redis URL: {REDIS_URL_FORM}"
        )));
    }
    if !cfg!(feature = "redis") {
        return Err(ConfigError::setting(format!(
            "{variable} is set, but this binary was built without Redis: build it with \
             --features binaries,redis"
        )));
    }
    let lease = lease(&var)?;
    Ok(Some(RedisSettings {
        url: url.trim().to_owned(),
        key_prefix: var("COMAPI_REDIS_PREFIX").unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned()),
        lease,
        variable,
    }))
}
