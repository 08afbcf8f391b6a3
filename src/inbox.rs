//! The framework-agnostic receive step: verify, parse, store durably, then answer.

use std::borrow::Cow;

use http::{HeaderMap, StatusCode};

use crate::event::split_already_verified;
use crate::store::spool::{Spool, encode_lines};
use crate::store::{EventStore, Records};
use crate::{DEFAULT_MAX_BODY_BYTES, Error, Metrics, SIGNATURE_HEADER, Verifier};
use std::sync::Arc;

/// What a receiver answers Comapi: a status and a short text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    status: StatusCode,
    body: Cow<'static, str>,
    /// Set for errors; otherwise the body says it all.
    reason: Option<String>,
    events: usize,
}

impl Reply {
    fn new(status: StatusCode, body: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            status,
            body: body.into(),
            reason: None,
            events: 0,
        }
    }

    fn from_error(error: &Error) -> Self {
        let body = match error.status() {
            StatusCode::UNAUTHORIZED => Cow::Borrowed("invalid or missing X-Comapi-Signature\n"),
            StatusCode::BAD_REQUEST => Cow::Owned(format!("{error}\n")),
            _ => Cow::Borrowed("cannot store events now, retry later\n"),
        };
        Reply {
            reason: Some(error.report().to_string()),
            ..Reply::new(error.status(), body)
        }
    }

    /// The HTTP status: 200, 400, 401, 413 or 503.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// A short `text/plain` body saying why.
    #[must_use]
    pub fn body(&self) -> &str {
        &self.body
    }

    /// Why, for your logs, in more detail than [`Reply::body`] tells the sender: which
    /// signature error it was (`signature mismatch` when the secret differs from the
    /// portal's), where a body failed, and the cause of a storage failure. It never
    /// holds the signature or the body.
    #[must_use]
    pub fn reason(&self) -> &str {
        self.reason
            .as_deref()
            .unwrap_or_else(|| self.body.trim_end())
    }

    /// How many events were stored (0 unless the status is 200).
    #[must_use]
    pub fn events(&self) -> usize {
        self.events
    }
}

/// The receive step of a webhook endpoint, independent of the HTTP framework:
/// given a request's headers and raw body, it verifies, parses, stores every event
/// durably in its [`EventStore`] (a local [`Spool`] by default, or a Redis stream),
/// and says what to answer.
///
/// | answer | when |
/// |---|---|
/// | 401 | the signature is missing, malformed or wrong; nothing is stored |
/// | 400 | the body is not an envelope or a batch of them; nothing is stored (Comapi does not retry) |
/// | 413 | the body is over the limit ([`DEFAULT_MAX_BODY_BYTES`] unless set) |
/// | 503 | storing failed; Comapi retries later |
/// | 200 | every event of the body is durably stored |
///
/// Cap the body while you read it: check [`Inbox::check_content_length`] first, stop
/// reading past [`Inbox::max_body_bytes`], and answer [`Inbox::too_large`] then.
#[derive(Debug, Clone)]
pub struct Inbox<S = Spool> {
    verifier: Verifier,
    store: S,
    max_body_bytes: usize,
    metrics: Option<Arc<Metrics>>,
}

impl<S: EventStore> Inbox<S> {
    /// An inbox that verifies with `verifier` and stores into `store`.
    #[must_use]
    pub fn new(verifier: Verifier, store: S) -> Self {
        Inbox {
            verifier,
            store,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            metrics: None,
        }
    }

    /// The same inbox, counting every answer, the events stored and how long storing
    /// took into `metrics` (see [`Metrics`]).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The same inbox with another body limit.
    #[must_use]
    pub fn with_max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self
    }

    /// The largest body accepted, in bytes.
    #[must_use]
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The store events go to.
    #[must_use]
    pub fn store(&self) -> &S {
        &self.store
    }

    /// A 413 before reading the body, when its `Content-Length` is over the limit.
    #[must_use]
    pub fn check_content_length(&self, headers: &HeaderMap) -> Option<Reply> {
        let length = headers
            .get(http::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse::<u64>()
            .ok()?;
        (length > self.max_body_bytes as u64).then(|| self.too_large())
    }

    /// The 413 to answer when the body turned out to be over the limit.
    #[must_use]
    pub fn too_large(&self) -> Reply {
        self.counted(self.over_the_limit(), None)
    }

    fn over_the_limit(&self) -> Reply {
        Reply::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over the limit of {} bytes\n", self.max_body_bytes),
        )
    }

    /// `reply`, counted into the metrics if there are any.
    fn counted(&self, reply: Reply, stored_in: Option<std::time::Duration>) -> Reply {
        if let Some(metrics) = &self.metrics {
            metrics.answered(reply.status, reply.events, stored_in);
        }
        reply
    }

    /// Runs the receive step on a request with `http` 1.x headers.
    pub async fn receive(&self, headers: &HeaderMap, body: &[u8]) -> Reply {
        let signatures = headers
            .get_all(SIGNATURE_HEADER)
            .iter()
            .map(http::HeaderValue::as_bytes);
        self.receive_with_signatures(signatures, body).await
    }

    /// Runs the receive step given every `X-Comapi-Signature` value of the request,
    /// for frameworks whose headers are not `http` 1.x (actix-web 4).
    pub async fn receive_with_signatures<'v>(
        &self,
        signatures: impl IntoIterator<Item = &'v [u8]>,
        body: &[u8],
    ) -> Reply {
        let started = self.metrics.is_some().then(std::time::Instant::now);
        let reply = self.receive_uncounted(signatures, body).await;
        let stored_in = started.filter(|_| reply.events > 0).map(|t| t.elapsed());
        self.counted(reply, stored_in)
    }

    async fn receive_uncounted<'v>(
        &self,
        signatures: impl IntoIterator<Item = &'v [u8]>,
        body: &[u8],
    ) -> Reply {
        if body.len() > self.max_body_bytes {
            return self.over_the_limit();
        }
        let verified = match self.verifier.verify_header_values(signatures, body) {
            Ok(verified) => verified,
            Err(error) => return Reply::from_error(&error),
        };
        let events = match split_already_verified(body) {
            Ok(events) => events,
            Err(error) => return Reply::from_error(&error),
        };
        let count = events.len();
        if count == 0 {
            return Reply::new(StatusCode::OK, "ok: no events\n");
        }
        let lines = encode_lines(&events, verified.secret_index());
        match self.store.store(Records::new(lines, count as u64)).await {
            Ok(()) => Reply {
                events: count,
                ..Reply::new(StatusCode::OK, "ok\n")
            },
            Err(error) => Reply::from_error(&error),
        }
    }

    /// A small HTML page for `GET`: the receiver is up, which store it uses, how many
    /// events are stored, how many of them wait to be processed (the backlog) and how
    /// many are in the dead letter.
    pub async fn status_page(&self) -> String {
        let status = self.store.status().await;
        let figure = |n: Option<u64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        let pending = status.pending.map_or_else(String::new, |n| {
            format!(" ({n} of them handed to a worker, not yet acknowledged)")
        });
        let error = status.error.as_deref().map_or_else(String::new, |e| {
            format!("<p>The store cannot be asked now: {}</p>\n", html_text(e))
        });
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>Comapi webhook receiver</title></head>\n<body><h1>Comapi webhook receiver is up</h1>\n\
             <p>Store: {}</p>\n{error}\
             <p>Events stored: <strong>{}</strong></p>\n\
             <p>Waiting to be processed: <strong>{}</strong>{pending}</p>\n\
             <p>In the dead letter: <strong>{}</strong></p>\n\
             <p>POST Comapi webhooks here, signed with <code>X-Comapi-Signature</code>.</p></body></html>\n",
            html_text(&status.store),
            figure(status.stored),
            figure(status.backlog),
            figure(status.dead_letters),
        )
    }

    /// The metrics given to [`Inbox::with_metrics`], with the backlog and dead-letter
    /// gauges read from the store now, in the OpenMetrics text format (answer it with
    /// [`METRICS_CONTENT_TYPE`](crate::METRICS_CONTENT_TYPE)); `None` without metrics.
    pub async fn metrics_text(&self) -> Option<String> {
        let metrics = self.metrics.as_ref()?;
        metrics.set_store_status(&self.store.status().await);
        Some(metrics.encode())
    }
}

/// `text` with the characters HTML gives a meaning escaped.
fn html_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
