//! `Metrics`: what the receive step and the worker count, served in the OpenMetrics
//! text format (which Prometheus scrapes) through `prometheus-client`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::StoreStatus;
use store_gauges::StoreGauges;

mod access;
mod minutes;
mod store_gauges;

use crate::worker::{EventHandler, HandlerError};
use crate::{Decision, Error, Event};
pub use access::{MetricsToken, STATUS_CACHE_TTL, StatusCache};
pub use minutes::{MINUTES, Minute};
use minutes::{Minutes, Tally};

/// The content type of [`Metrics::encode`]'s text, for the `/metrics` answer.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The counters, histograms and gauges of one receiver and its worker, each named
/// `comapi_webhook_…`:
///
/// | metric | what |
/// |---|---|
/// | `requests_total{status}` | answers by HTTP status ([`Inbox::with_metrics`](crate::Inbox::with_metrics)) |
/// | `events_stored_total` | events stored durably |
/// | `store_seconds` | how long storing a request's events took |
/// | `decisions_total{decision}` | gate decisions, one per claim (a retried event is claimed again) |
/// | `handler_total{outcome}` | handler `success`, `failure` (an error or a panic), `retry` and `dead_letter` |
/// | `handler_seconds` | how long each handler attempt took |
/// | `stored_events` | events in the store, processed or not (a spool's events, a stream's length) |
/// | `backlog_events` | events stored but not yet processed (on the spool, not yet past the offset the worker persists about once a second: it trails processing by a second or two) |
/// | `pending_events` | of the backlog, events handed to a worker and not yet acknowledged (Redis; RabbitMQ with its management API) |
/// | `dead_letter_events` | events in the dead letter |
/// | `consumers` | workers consuming from the store (RabbitMQ) |
/// | `retry_events` | events in the retry schedule, waiting for their next attempt off the line |
/// | `next_retry_due_seconds` | when the first of them is due, in Unix time; 0 when none waits (the spool and Redis; RabbitMQ cannot tell) |
///
/// The gauges are read from a store's [`StoreStatus`] ([`Metrics::set_store_status`]); a
/// figure the store cannot tell (the status page's "unknown") is left out rather
/// than shown as 0. A receiver without a worker in its process
/// ([`Metrics::for_receiver`]) has no `decisions`, `handler` or `handler_seconds`.
///
/// The worker's figures come from wrapping its handler: [`Metrics::meter`].
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use comapi_webhook::metrics::Metrics;
/// use comapi_webhook::store::StoreStatus;
/// let metrics = Metrics::new();
/// let mut status = StoreStatus::default();
/// status.backlog = Some(3);
/// status.retries = Some(2);
/// status.next_retry_at = Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
/// metrics.set_store_status(&status);
/// let text = metrics.encode();
/// assert!(text.contains("comapi_webhook_backlog_events 3"));
/// assert!(text.contains("comapi_webhook_retry_events 2"));
/// assert!(text.contains("comapi_webhook_next_retry_due_seconds 1800000000"));
/// assert!(text.ends_with("# EOF\n"));
/// ```
pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    /// The counters of the statuses the receive step answers, looked up once.
    answers: [(StatusCode, Counter); 5],
    events_stored: Counter,
    store_seconds: Histogram,
    decisions: Family<DecisionLabel, Counter>,
    handler: Family<OutcomeLabel, Counter>,
    handler_seconds: Histogram,
    body_bytes: Gauge,
    body_budget: Gauge,
    store: Arc<StoreGauges>,
    minutes: Minutes,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: DecisionKind,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values as Prometheus shows them
enum DecisionKind {
    fresh,
    duplicate,
    stale,
    busy,
    expired,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values as Prometheus shows them
enum Outcome {
    success,
    failure,
    retry,
    dead_letter,
}

impl Metrics {
    /// Every metric at zero, registered under the prefix `comapi_webhook`: a
    /// receiver's (requests, events stored, store time), a worker's (decisions,
    /// handler outcomes and time) and the store's gauges.
    #[must_use]
    pub fn new() -> Self {
        Self::with_parts(true, true)
    }

    /// A receiver's metrics without a worker in its process (one that stores into
    /// Redis or RabbitMQ for `worker` processes): [`Metrics::new`] without the
    /// worker's (`decisions`, `handler`, `handler_seconds`), which it never counts.
    ///
    /// ```
    /// let text = comapi_webhook::metrics::Metrics::for_receiver().encode();
    /// assert!(text.contains("comapi_webhook_requests_total"));
    /// assert!(!text.contains("comapi_webhook_handler_seconds"));
    /// ```
    #[must_use]
    pub fn for_receiver() -> Self {
        Self::with_parts(true, false)
    }

    /// A worker process's metrics: [`Metrics::new`] without the receiver's
    /// (`requests`, `events_stored`, `store_seconds`), which it never counts.
    ///
    /// ```
    /// let text = comapi_webhook::metrics::Metrics::for_worker().encode();
    /// assert!(text.contains("comapi_webhook_handler_seconds"));
    /// assert!(!text.contains("comapi_webhook_requests"));
    /// ```
    #[must_use]
    pub fn for_worker() -> Self {
        Self::with_parts(false, true)
    }

    fn with_parts(receiver: bool, worker: bool) -> Self {
        let mut registry = Registry::with_prefix("comapi_webhook");
        // 0.5 ms to about 8 s, doubling.
        let seconds = || Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        let requests = Family::<StatusLabel, Counter>::default();
        let answers = [
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::SERVICE_UNAVAILABLE,
        ]
        .map(|status| {
            let label = StatusLabel {
                status: status.as_u16(),
            };
            (status, requests.get_or_create(&label).clone())
        });
        let metrics = Metrics {
            requests,
            answers,
            events_stored: Counter::default(),
            store_seconds: seconds(),
            decisions: Family::default(),
            handler: Family::default(),
            handler_seconds: seconds(),
            body_bytes: Gauge::default(),
            body_budget: Gauge::default(),
            store: Arc::default(),
            minutes: Minutes::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        if receiver {
            registry.register("requests", "Answers by HTTP status", m.requests.clone());
            registry.register(
                "events_stored",
                "Events stored durably",
                m.events_stored.clone(),
            );
            registry.register(
                "store_seconds",
                "Time to store a request",
                m.store_seconds.clone(),
            );
            registry.register(
                "body_bytes",
                "Request body bytes held now, across every connection",
                m.body_bytes.clone(),
            );
            registry.register(
                "body_budget_bytes",
                "The most request body bytes held at once; past it, 503",
                m.body_budget.clone(),
            );
        }
        if worker {
            registry.register(
                "decisions",
                "Gate decisions, one per claim",
                m.decisions.clone(),
            );
            registry.register("handler", "Handler outcomes", m.handler.clone());
            registry.register(
                "handler_seconds",
                "Time of a handler attempt",
                m.handler_seconds.clone(),
            );
        }
        registry.register_collector(Box::new(Arc::clone(&m.store)));
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Every metric as a `200` in the OpenMetrics text format.
    #[must_use]
    pub fn reply(&self) -> crate::Reply {
        crate::Reply::content(METRICS_CONTENT_TYPE, self.encode())
    }

    /// Every metric, in the OpenMetrics text format ([`METRICS_CONTENT_TYPE`]).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Sets the store's gauges from `status`; a figure it lacks keeps its last value.
    pub fn set_store_status(&self, status: &StoreStatus) {
        self.store.set(status);
    }

    /// Sets the body gauges: the bytes held now, and the budget's limit.
    pub fn set_body_bytes(&self, held: usize, limit: usize) {
        self.body_bytes.set(i64::try_from(held).unwrap_or(i64::MAX));
        self.body_budget
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// Counts an answer, and the events it stored and how long that took.
    pub(crate) fn answered(&self, status: StatusCode, events: usize, stored_in: Option<Duration>) {
        match self.answers.iter().find(|(known, _)| *known == status) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let label = StatusLabel {
                    status: status.as_u16(),
                };
                self.requests.get_or_create(&label).inc();
            }
        }
        self.events_stored.inc_by(events as u64);
        if let Some(took) = stored_in {
            self.store_seconds.observe(took.as_secs_f64());
        }
    }

    fn decided(&self, decision: Decision) {
        let decision = match decision {
            Decision::Fresh => DecisionKind::fresh,
            Decision::Duplicate => DecisionKind::duplicate,
            Decision::Stale { .. } => DecisionKind::stale,
            Decision::Busy => DecisionKind::busy,
            Decision::Expired { .. } => DecisionKind::expired,
        };
        self.decisions
            .get_or_create(&DecisionLabel { decision })
            .inc();
    }

    fn outcome(&self, outcome: Outcome) {
        self.handler.get_or_create(&OutcomeLabel { outcome }).inc();
        match outcome {
            Outcome::success => self.minutes.count(Tally::Processed),
            Outcome::failure => self.minutes.count(Tally::Failed),
            Outcome::dead_letter => self.minutes.count(Tally::DeadLettered),
            Outcome::retry => {}
        }
    }

    /// This process's handler outcomes per minute over the last hour, oldest
    /// first ([`MINUTES`] entries): what the console's chart draws.
    #[must_use]
    pub fn last_hour(&self) -> Vec<Minute> {
        self.minutes.last_hour(std::time::SystemTime::now())
    }

    /// `handler`, counted: decisions, outcomes and attempt times go to these
    /// metrics, and every call goes on to `handler`.
    pub fn meter<H: EventHandler>(self: &std::sync::Arc<Self>, handler: H) -> Metered<H> {
        Metered {
            metrics: std::sync::Arc::clone(self),
            handler,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// An [`EventHandler`] that counts into [`Metrics`] what it passes on to the handler
/// it wraps: made by [`Metrics::meter`].
#[derive(Debug)]
pub struct Metered<H> {
    metrics: std::sync::Arc<Metrics>,
    handler: H,
}

impl<H: EventHandler> EventHandler for Metered<H> {
    fn handle(
        &self,
        event: Event<'static>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let metrics = std::sync::Arc::clone(&self.metrics);
        metrics.decided(Decision::Fresh);
        let attempt = self.handler.handle(event);
        async move {
            let started = Instant::now();
            let result = attempt.await;
            metrics
                .handler_seconds
                .observe(started.elapsed().as_secs_f64());
            // A failure (an error or a panic) is counted where the worker reports it.
            if result.is_ok() {
                metrics.outcome(Outcome::success);
            }
            result
        }
    }

    fn skipped(&self, event: &Event<'_>, decision: Decision) {
        self.metrics.decided(decision);
        self.handler.skipped(event, decision);
    }

    fn attempt_failed(&self, event: &Event<'_>, error: &str, attempt: u32, retry_in: Duration) {
        self.metrics.outcome(Outcome::failure);
        self.metrics.outcome(Outcome::retry);
        self.handler.attempt_failed(event, error, attempt, retry_in);
    }

    fn dead_lettered(&self, event: &Event<'_>, error: &str, attempts: u32) {
        self.metrics.outcome(Outcome::failure);
        self.metrics.outcome(Outcome::dead_letter);
        self.handler.dead_lettered(event, error, attempts);
    }

    fn set_aside(&self, line: &[u8], error: &Error) {
        self.handler.set_aside(line, error);
    }
}
