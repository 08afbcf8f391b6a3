//! `AmqpSettings`: where the receivers and workers use RabbitMQ (`COMAPI_AMQP_URL`,
//! `COMAPI_AMQP_QUEUE`).

use super::ConfigError;

/// The queue's name unless `COMAPI_AMQP_QUEUE` says otherwise.
pub const DEFAULT_QUEUE: &str = "comapi-webhook.events";

/// Where and how a receiver and its workers use RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpSettings {
    /// `amqp://user:pass@host:port/vhost` (the vhost URL-encoded: `%2f` for `/`), or
    /// `amqps://…` with the feature `rabbitmq-tls`.
    pub url: String,
    /// The quorum queue (its dead-letter queue is `<queue>.dead`).
    pub queue: String,
    /// The broker's management API, for the unacknowledged count
    /// (`COMAPI_AMQP_MANAGEMENT_URL`, `http[s]://[user:pass@]host:15672`).
    pub management_url: Option<String>,
    /// A Redis for the workers' revision gate (`COMAPI_GATE_REDIS_URL`, with
    /// `COMAPI_REDIS_PREFIX` and `COMAPI_LEASE`), so that the workers of the queue
    /// share their decisions: a Comapi retry or an older revision that reaches
    /// another worker is still told apart. Without it each worker's gate is in its
    /// memory.
    pub gate: Option<super::RedisSettings>,
    /// How long a worker may hold an event (`COMAPI_LEASE`): the lease of the
    /// in-memory gate when there is no `gate`.
    pub lease: std::time::Duration,
}

impl AmqpSettings {
    /// The gate of a worker of the queue without `gate`: in its memory, with the
    /// lease of `COMAPI_LEASE`.
    #[must_use]
    pub fn memory_gate(&self) -> crate::Gate {
        crate::Gate::with_config(crate::gate::GateConfig::default().with_lease(self.lease))
    }

    /// The RabbitMQ settings alone (`COMAPI_AMQP_URL`, `COMAPI_AMQP_QUEUE`), for a
    /// worker process: `None` without `COMAPI_AMQP_URL`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when a value is wrong, or naming both
    /// `COMAPI_REDIS_URL` and `COMAPI_AMQP_URL` when both are set.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        amqp_from(&|name| std::env::var(name).ok())
    }

    /// Connects to the queue as the receivers, the worker and `requeue` do, and
    /// says what to change when the broker refuses.
    ///
    /// # Errors
    /// [`ConfigError`] naming `COMAPI_AMQP_URL`: with exit status 2 when the
    /// broker refused the user or password or does not have the vhost (a wrong
    /// setting), 1 when it cannot be reached.
    #[cfg(feature = "rabbitmq")]
    pub async fn connect(&self) -> Result<crate::store::rabbitmq::RabbitStore, ConfigError> {
        crate::store::rabbitmq::RabbitStore::connect(&self.url, self.rabbit_config())
            .await
            .map_err(|e| refusal(&e.report().to_string()))
    }

    /// The store's settings: this queue and management API, the rest the defaults.
    #[cfg(feature = "rabbitmq")]
    #[must_use]
    pub fn rabbit_config(&self) -> crate::store::rabbitmq::RabbitConfig {
        let config = crate::store::rabbitmq::RabbitConfig::default().with_queue(self.queue.clone());
        match &self.management_url {
            Some(url) => config.with_management_url(url.clone()),
            None => config,
        }
    }
}

/// A failed connection in terms of the setting to change.
#[cfg(feature = "rabbitmq")]
fn refusal(report: &str) -> ConfigError {
    if report.contains("ACCESS_REFUSED") {
        ConfigError::setting(format!(
            "COMAPI_AMQP_URL: RabbitMQ refused the user or password in the URL \
             (amqp://USER:PASSWORD@host:port/vhost; `rabbitmqctl list_users` shows the users): \
             {report}"
        ))
    } else if report.contains("vhost") && report.contains("not found") {
        ConfigError::setting(format!(
            "COMAPI_AMQP_URL: RabbitMQ has no such vhost; the default vhost `/` is written \
             %2f (amqp://user:pass@host:5672/%2f), and `rabbitmqctl list_vhosts` lists the \
             others: {report}"
        ))
    } else {
        ConfigError::new(format!("COMAPI_AMQP_URL: {report}"))
    }
}

/// Refuses a URL whose path is a lone `/`: an empty vhost, which RabbitMQ does
/// not have, where the default vhost `/` is meant.
fn check_vhost(url: &str) -> Result<(), ConfigError> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.split_once('/').map(|(_, path)| path);
    match path.map(|p| p.split(['?', '#']).next().unwrap_or("")) {
        Some("") => Err(ConfigError::setting(
            "COMAPI_AMQP_URL ends in `/`: that names an empty vhost. RabbitMQ's default vhost \
             `/` is written %2f: amqp://user:pass@host:5672/%2f (or leave the path out)",
        )),
        _ => Ok(()),
    }
}

pub(super) fn amqp_from(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<AmqpSettings>, ConfigError> {
    let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    let Some(url) = var("COMAPI_AMQP_URL") else {
        if var("COMAPI_GATE_REDIS_URL").is_some() {
            return Err(ConfigError::setting(
                "COMAPI_GATE_REDIS_URL is for the workers of a RabbitMQ queue (COMAPI_AMQP_URL); \
                 with COMAPI_REDIS_URL the gate is in that Redis already, and a spool has one \
                 worker",
            ));
        }
        return Ok(None);
    };
    if var("COMAPI_REDIS_URL").is_some() {
        return Err(ConfigError::setting(
            "COMAPI_REDIS_URL and COMAPI_AMQP_URL are both set: store into one broker, Redis or \
             RabbitMQ",
        ));
    }
    if !cfg!(feature = "rabbitmq") {
        return Err(ConfigError::setting(
            "COMAPI_AMQP_URL is set, but this binary was built without RabbitMQ: build it with \
             --features binaries,rabbitmq",
        ));
    }
    let url = url.trim().to_owned();
    if url.starts_with("amqps://") && !cfg!(feature = "rabbitmq-tls") {
        return Err(ConfigError::setting(
            "COMAPI_AMQP_URL is amqps://, but this binary was built without TLS: build it with \
             --features binaries,rabbitmq-tls",
        ));
    }
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        return Err(ConfigError::setting(
            "COMAPI_AMQP_URL must be amqp://user:pass@host:port/vhost (or amqps://, with TLS)",
        ));
    }
    check_vhost(&url)?;
    let management_url = var("COMAPI_AMQP_MANAGEMENT_URL").map(|m| m.trim().to_owned());
    let gate = super::redis::redis_at(lookup, "COMAPI_GATE_REDIS_URL")?;
    #[cfg(feature = "rabbitmq")]
    if let Some(management_url) = &management_url {
        crate::store::rabbitmq::check_management_url(management_url)
            .map_err(|why| ConfigError::setting(format!("COMAPI_AMQP_MANAGEMENT_URL: {why}")))?;
    }
    Ok(Some(AmqpSettings {
        url,
        queue: var("COMAPI_AMQP_QUEUE")
            .map_or_else(|| DEFAULT_QUEUE.to_owned(), |q| q.trim().to_owned()),
        management_url,
        gate,
        lease: super::config::lease(&var)?,
    }))
}
