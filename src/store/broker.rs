//! What the two brokers' backends (`redis_stream`, `rabbitmq`) share: the stop
//! handle of their consumers, the consumers' names, and the log of a store's
//! outage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use std::future::Future;

use crate::Error;
use crate::store::{EventSource, Sources};

/// A broker's settings, as far as its consumers go: how one connects. Implemented
/// by `RedisStreamConfig` and `RabbitConfig`; [`Consumers`] does the rest.
pub trait ConsumerConfig: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// One worker's consumer.
    type Consumer: EventSource;

    /// A consumer named `name` of the broker at `url`, stopped by `stop`.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`] when the broker cannot be reached.
    fn connect(
        &self,
        url: &str,
        name: &str,
        stop: &StopHandle,
    ) -> impl Future<Output = Result<Self::Consumer, Error>> + Send;
}

/// The consumers a supervised [`Worker`](crate::Worker) runs, one after the other
/// (a new one after a failure), all under one unique name (this host, process and
/// start time) and stopped by one [`StopHandle`]: `StreamConsumers` on Redis,
/// `RabbitConsumers` on RabbitMQ.
#[derive(Debug, Clone)]
pub struct Consumers<C> {
    url: String,
    config: C,
    name: String,
    stop: StopHandle,
}

impl<C: ConsumerConfig> Consumers<C> {
    /// Consumers of the broker at `url` with these settings.
    #[must_use]
    pub fn new(url: &str, config: C) -> Self {
        Consumers {
            url: url.to_owned(),
            config,
            name: consumer_name(),
            stop: StopHandle::default(),
        }
    }

    /// The consumers' name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<C: ConsumerConfig> Sources for Consumers<C> {
    type Source = C::Consumer;

    async fn open(&self) -> Result<C::Consumer, Error> {
        self.config.connect(&self.url, &self.name, &self.stop).await
    }

    async fn stop(&self) {
        self.stop.stop();
    }

    fn is_stopped(&self) -> bool {
        self.stop.is_stopped()
    }
}

/// Stops a broker's consumers from another task: the consumer finishes the event
/// in hand, acknowledges it and returns (within about a second when it is waiting
/// for events); what it received and did not start comes again to another worker.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    stopped: Arc<AtomicBool>,
}

impl StopHandle {
    /// Asks the consumer to stop.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Whether [`StopHandle::stop`] was called.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// A consumer's name: this host (`DYNO` on Heroku, else the OS's host name), the
/// process id and the start time, so that no two workers share one.
pub(crate) fn consumer_name() -> String {
    let host = std::env::var("DYNO")
        .ok()
        .or_else(host_name)
        .unwrap_or_else(|| "worker".to_owned());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{host}-{}-{started}", std::process::id())
}

/// The OS's host name (Linux's `/proc/sys/kernel/hostname`, else `/etc/hostname`,
/// else `HOSTNAME`, which shells set but seldom export).
fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// A store's outages, for its log: one line when storing starts to fail, one when
/// it stores again, with how long it was down; and, meanwhile, why, for the status
/// page.
#[derive(Debug, Clone)]
pub(crate) struct Outage {
    /// `Redis`, `RabbitMQ`: named in the lines.
    broker: &'static str,
    /// The stream's or queue's name.
    place: Arc<str>,
    failed: Arc<AtomicBool>,
    since: Arc<Mutex<Option<Instant>>>,
    /// The last failure's report, while storing fails.
    why: Arc<Mutex<Option<String>>>,
}

impl Outage {
    pub(crate) fn new(broker: &'static str, place: Arc<str>) -> Self {
        Outage {
            broker,
            place,
            failed: Arc::default(),
            since: Arc::default(),
            why: Arc::default(),
        }
    }

    /// Whether storing fails now (since the last store).
    #[cfg(feature = "rabbitmq")]
    pub(crate) fn failing(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why storing fails, while it does: the last failure's report.
    #[cfg(feature = "rabbitmq")]
    pub(crate) fn why(&self) -> Option<String> {
        self.why
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records how a store went: logs the first failure of an outage, and returns
    /// `true` for the first success after one (the caller may then look at the
    /// broker's settings again).
    pub(crate) fn record(&self, stored: &Result<(), Error>) -> bool {
        match stored {
            Err(error) => {
                *self.why.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(error.report().to_string());
                if !self.failed.swap(true, Ordering::AcqRel) {
                    *self.since.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(Instant::now());
                    tracing::warn!(
                        to = %self.place,
                        error = %error.report(),
                        "cannot store into {}: answering 503 until it is back",
                        self.broker
                    );
                }
                false
            }
            Ok(()) => {
                if !self.failed.load(Ordering::Acquire)
                    || !self.failed.swap(false, Ordering::AcqRel)
                {
                    return false;
                }
                self.why
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                let since = self
                    .since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                tracing::info!(
                    to = %self.place,
                    down_for = ?since.map(|s| s.elapsed()),
                    "storing into {} again",
                    self.broker
                );
                true
            }
        }
    }
}
