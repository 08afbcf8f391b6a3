//! A whole receiver from its settings: [`ReceiverConfig`] from the environment,
//! [`ReceiverConfig::start`] opens the store and starts the worker, and
//! [`Receiver::shutdown`] drains it. What the reference receivers are made of;
//! your own binary gets the same variables, messages and behaviour.

use std::sync::Arc;

use crate::Inbox;
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::spool::Spool;
use crate::worker::{EventHandler, Worker};

mod amqp;
mod config;
mod listener;
mod redis;

pub use amqp::{AmqpSettings, DEFAULT_QUEUE};
pub use config::{ConfigError, DEFAULT_PORT, ReceiverConfig};
pub use listener::{
    Busy, Connection, DEFAULT_HEADER_DEADLINE, DEFAULT_IDLE_DEADLINE, DEFAULT_MAX_CONNECTIONS,
    Listener, Requests, default_max_connections,
};
pub use redis::{DEFAULT_KEY_PREFIX, RedisSettings};

/// A running receiver: its [`Inbox`] (route `GET /`, `POST /` and `GET /metrics`
/// to it) and, if it has one, its [`Worker`].
#[derive(Debug)]
pub struct Receiver {
    inbox: Inbox<Store>,
    console: crate::console::Console,
    worker: Option<Worker>,
    shutdown_grace: std::time::Duration,
}

impl ReceiverConfig {
    /// The gate of a worker on the spool: in its memory, with the lease of
    /// `COMAPI_LEASE`.
    #[must_use]
    pub fn memory_gate(&self) -> Gate {
        Gate::with_config(crate::gate::GateConfig::default().with_lease(self.lease))
    }

    /// Listens on [`ReceiverConfig::addr`] with this configuration's header
    /// deadline and connection limit (see [`Listener`]).
    ///
    /// # Errors
    /// [`ConfigError`] naming `PORT` and `BIND` when the address cannot be bound.
    pub async fn listen(&self) -> Result<Listener, ConfigError> {
        let listener = Listener::bind(self.addr)
            .await
            .map_err(|e| ConfigError::cannot_listen(self.addr, &e))?;
        Ok(listener
            .with_header_deadline(self.header_deadline)
            .with_idle_deadline(self.idle_deadline)
            .with_max_connections(self.max_connections))
    }

    /// Opens the store (the spool, repairing a torn last line, or the Redis
    /// stream, warning once if Redis's persistence is weaker than
    /// fsync-before-reply), and, if [`ReceiverConfig::worker`], starts a [`Worker`]
    /// running `handler` (metered, logged): on the
    /// spool it decides with an in-memory [`Gate`], on Redis with the Redis gate.
    /// The worker runs as [`ReceiverConfig::worker_config`] says.
    ///
    /// # Errors
    /// [`ConfigError`] naming `COMAPI_SPOOL_DIR` or `COMAPI_REDIS_URL` when the
    /// store cannot be opened, with the cause.
    pub async fn start<H: EventHandler + 'static>(
        self,
        handler: H,
    ) -> Result<Receiver, ConfigError> {
        // A receiver whose events workers elsewhere process counts no decision.
        let metrics = Arc::new(if self.worker {
            Metrics::new()
        } else {
            Metrics::for_receiver()
        });
        let handler = metrics.meter(handler);
        let retry = self.worker_config;
        let (store, worker) = match (&self.redis, &self.amqp) {
            #[cfg(feature = "rabbitmq")]
            (_, Some(amqp)) => rabbit_store(amqp, self.worker, handler, retry).await?,
            #[cfg(not(feature = "rabbitmq"))]
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    "COMAPI_AMQP_URL needs the rabbitmq feature",
                ));
            }
            (None, None) => {
                let dir = self.spool.dir.display().to_string();
                let (spool, recovery) = Spool::open(&self.spool).map_err(|e| {
                    ConfigError::new(format!("COMAPI_SPOOL_DIR={dir}: {}", e.report()))
                })?;
                tracing::info!(
                    %dir,
                    events = recovery.events,
                    segments = recovery.segments,
                    torn_bytes = recovery.torn_bytes,
                    "spool opened"
                );
                let worker = self
                    .worker
                    .then(|| Worker::spawn(spool.clone(), self.memory_gate(), handler, retry))
                    .transpose()
                    .map_err(|e| ConfigError::new(e.report().to_string()))?;
                (Store::Spool(spool), worker)
            }
            #[cfg(feature = "redis")]
            (Some(redis), None) => redis_store(redis, self.worker, handler, retry).await?,
            #[cfg(not(feature = "redis"))]
            (Some(_), None) => {
                return Err(ConfigError::new("COMAPI_REDIS_URL needs the redis feature"));
            }
        };
        let mut console = crate::console::Console::new(store.clone(), self.console);
        if self.worker {
            console = console.with_metrics(Arc::clone(&metrics));
        }
        let mut inbox = Inbox::new(self.verifier, store)
            .with_max_body_bytes(self.max_body_bytes)
            .with_body_budget(crate::BodyBudget::new(self.body_budget_bytes))
            .with_body_deadline(self.body_deadline)
            .with_metrics(metrics);
        if console.is_enabled() {
            inbox = inbox.with_console_at(console.base());
            let warming = console.clone();
            tokio::spawn(async move {
                if let Err(error) = warming.warm_up().await {
                    tracing::warn!(error = %error.report(), "the console could not read the dead letter yet");
                }
            });
        }
        match &self.metrics_token {
            Some(token) => inbox = inbox.with_metrics_token(token),
            None if !self.addr.ip().is_loopback() => tracing::warn!(
                addr = %self.addr,
                "GET /metrics answers anyone who can reach this address (event volumes, the \
                 backlog, the dead letter): set COMAPI_METRICS_TOKEN to ask for a bearer token"
            ),
            None => {}
        }
        Ok(Receiver {
            inbox,
            console,
            worker,
            shutdown_grace: self.shutdown_grace,
        })
    }
}

/// The RabbitMQ store and, if asked, a worker consuming its queue, with its gate
/// in Redis when `COMAPI_GATE_REDIS_URL` says so.
#[cfg(feature = "rabbitmq")]
async fn rabbit_store<H: EventHandler + 'static>(
    amqp: &AmqpSettings,
    worker: bool,
    handler: H,
    retry: crate::worker::WorkerConfig,
) -> Result<(Store, Option<Worker>), ConfigError> {
    use crate::store::rabbitmq::RabbitConsumers;
    let failed = |e: crate::Error| ConfigError::new(format!("COMAPI_AMQP_URL: {}", e.report()));
    let config = amqp.rabbit_config();
    let queue = amqp.connect().await?;
    tracing::info!(queue = %queue.queue(), "storing into RabbitMQ");
    if !worker {
        return Ok((Store::Rabbit(queue), None));
    }
    let consumers = RabbitConsumers::new(&amqp.url, config);
    let worker = match &amqp.gate {
        None => Worker::spawn(consumers, amqp.memory_gate(), handler, retry),
        #[cfg(feature = "redis")]
        Some(redis) => Worker::spawn(consumers, redis.gate().await?, handler, retry),
        // Without Redis the settings refuse COMAPI_GATE_REDIS_URL.
        #[cfg(not(feature = "redis"))]
        Some(_) => Worker::spawn(consumers, amqp.memory_gate(), handler, retry),
    };
    Ok((Store::Rabbit(queue), Some(worker.map_err(failed)?)))
}

#[cfg(feature = "redis")]
async fn redis_store<H: EventHandler + 'static>(
    redis: &RedisSettings,
    worker: bool,
    handler: H,
    retry: crate::worker::WorkerConfig,
) -> Result<(Store, Option<Worker>), ConfigError> {
    use crate::store::redis_stream::{RedisStream, StreamConsumers};
    let failed = |e: crate::Error| ConfigError::new(format!("COMAPI_REDIS_URL: {}", e.report()));
    // The gate checks the credentials first; without a worker they are checked alone.
    let gate = if worker {
        Some(redis.gate().await?)
    } else {
        redis.check_credentials().await?;
        None
    };
    let config = redis.stream_config();
    let stream = RedisStream::connect(&redis.url, config.clone())
        .await
        .map_err(failed)?;
    if let Some(warning) = stream.durability().warning() {
        tracing::warn!("{warning}");
    }
    tracing::info!(stream = %stream.key(), "storing into Redis");
    let worker = match gate {
        Some(gate) => {
            let consumers = StreamConsumers::new(&redis.url, config);
            Some(Worker::spawn(consumers, gate, handler, retry).map_err(failed)?)
        }
        None => None,
    };
    Ok((Store::Redis(stream), worker))
}

impl Receiver {
    /// The receive step, to route requests to.
    #[must_use]
    pub fn inbox(&self) -> &Inbox<Store> {
        &self.inbox
    }

    /// The operator's console, to route its paths to ([`Console::serves`](crate::console::Console::serves));
    /// it answers 404 unless `COMAPI_CONSOLE_TOKEN` is set.
    #[must_use]
    pub fn console(&self) -> &crate::console::Console {
        &self.console
    }

    /// How long a whole shutdown may take (`COMAPI_SHUTDOWN_GRACE`, default 25 s):
    /// a server takes its time to finish requests in flight from it, and gives
    /// the rest to [`Receiver::shutdown_by`].
    #[must_use]
    pub fn shutdown_grace(&self) -> std::time::Duration {
        self.shutdown_grace
    }

    /// [`Receiver::shutdown_by`] the shutdown grace from now.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.shutdown_grace;
        self.shutdown_by(deadline).await;
    }

    /// Stops the worker, if any, and waits for it until `deadline` (it drains a
    /// spool meanwhile; at the deadline it lets go of the events in hand, which
    /// stay stored, unacknowledged, and come again); closes the spool; logs the
    /// store's counts if the store answers by then. Call it once the server
    /// stopped taking requests: the reference receivers give their connections
    /// until the same deadline first, so that SIGTERM to exit takes at most the
    /// shutdown grace, whatever a client, the store or a handler does.
    pub async fn shutdown_by(self, deadline: tokio::time::Instant) {
        // The worker's own timer lets go at four fifths of what it is given: a
        // little is always left for the rest.
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Some(worker) = self.worker {
            let grace = left().max(std::time::Duration::from_millis(10));
            worker.shutdown_within(grace).await;
        }
        #[allow(irrefutable_let_patterns)] // without the redis feature
        if let Store::Spool(spool) = self.inbox.store() {
            spool.close().await;
        }
        let asked = crate::store::EventStore::status(self.inbox.store());
        let count = |n: Option<u64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        match tokio::time::timeout_at(deadline, asked).await {
            Ok(status) => tracing::info!(
                stored = %count(status.stored),
                backlog = %count(status.backlog),
                "stopped"
            ),
            Err(_) => tracing::info!("stopped (the store did not answer for its counts in time)"),
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C), saying so in the log.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = terminate => "SIGTERM",
    };
    tracing::info!(signal = %signal, "shutting down: finishing what is in hand");
}
