//! The framework-agnostic receive step: verify, parse, store durably, then answer.

use std::time::Duration;

use http::HeaderMap;

use crate::body_budget::{BodyBudget, BodyBuffer, DEFAULT_BODY_BUDGET_BYTES, Refused};
use crate::event::split_already_verified;
use crate::log_budget::LogBudget;
use crate::metrics::{Metrics, MetricsToken, StatusCache};
use crate::signature::single_signature;
use crate::store::spool::{Spool, encode_lines};
use crate::store::{EventStore, Records};
use crate::{Error, Reply, SIGNATURE_HEADER, Verifier};

/// The default body limit of the receive step: 1 MiB, two and a half times a full
/// batch of 500 Comapi events (about 400 KB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long the receive step waits for a request's whole body, by default: 10 s,
/// Comapi's own limit for the whole answer.
pub const DEFAULT_BODY_DEADLINE: Duration = Duration::from_secs(10);
use std::sync::Arc;

/// The receive step of a webhook endpoint, independent of the HTTP framework:
/// given a request's headers and raw body, it verifies, parses, stores every event
/// durably in its [`EventStore`] (a local [`Spool`] by default, or a Redis stream),
/// and says what to answer.
///
/// The answers are [`Reply`]'s table; the body limit is [`DEFAULT_MAX_BODY_BYTES`]
/// unless set. [`Inbox::receive_request`] (and `receive_actix`) reads a request's
/// body itself: it refuses a missing or malformed signature before reading, stops
/// at the limit, and reads only while the [`BodyBudget`] shared by every clone of
/// the inbox has room (else `503` with `Retry-After`). With another body type,
/// check [`Inbox::check_content_length`] first, stop reading past
/// [`Inbox::max_body_bytes`], and answer [`Inbox::too_large`] then.
#[derive(Debug, Clone)]
pub struct Inbox<S = Spool> {
    verifier: Verifier,
    store: S,
    max_body_bytes: usize,
    body_deadline: Duration,
    metrics: Option<Arc<Metrics>>,
    /// The metrics token, which also hides the status page's figures.
    metrics_token: Option<MetricsToken>,
    /// Where the console is, when it has a token: the status page then names it
    /// and shows no figure.
    console_at: Option<String>,
    /// The store's status, asked at most once a second for the page and `/metrics`.
    status: StatusCache,
    body_budget: Arc<BodyBudget>,
}

impl<S: EventStore> Inbox<S> {
    /// An inbox that verifies with `verifier` and stores into `store`.
    #[must_use]
    pub fn new(verifier: Verifier, store: S) -> Self {
        Inbox {
            verifier,
            store,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_deadline: DEFAULT_BODY_DEADLINE,
            metrics: None,
            metrics_token: None,
            console_at: None,
            status: StatusCache::default(),
            body_budget: BodyBudget::new(DEFAULT_BODY_BUDGET_BYTES),
        }
    }

    /// The same inbox, reading bodies within `budget` (shared with whatever else
    /// holds it) instead of its own of [`DEFAULT_BODY_BUDGET_BYTES`].
    #[must_use]
    pub fn with_body_budget(mut self, budget: Arc<BodyBudget>) -> Self {
        self.body_budget = budget;
        self
    }

    /// The budget of body bytes this inbox (and its clones) reads within.
    #[must_use]
    pub fn body_budget(&self) -> &Arc<BodyBudget> {
        &self.body_budget
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

    /// The same inbox with another body deadline: a body that has not arrived
    /// whole this long after its headers is answered `408` (default
    /// [`DEFAULT_BODY_DEADLINE`]).
    #[must_use]
    pub fn with_body_deadline(mut self, deadline: Duration) -> Self {
        self.body_deadline = deadline;
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
        let length = content_length(headers)?;
        (length > self.max_body_bytes as u64).then(|| self.too_large())
    }

    /// The 413 to answer when the body turned out to be over the limit.
    #[must_use]
    pub fn too_large(&self) -> Reply {
        self.counted(self.over_the_limit(), None)
    }

    fn over_the_limit(&self) -> Reply {
        Reply::from(Error::BodyTooLarge {
            limit: Some(self.max_body_bytes),
        })
    }

    /// `reply`, counted into the metrics if there are any, and logged unless a 200.
    fn counted(&self, reply: Reply, stored_in: Option<std::time::Duration>) -> Reply {
        log_refusal(&reply);
        if let Some(metrics) = &self.metrics {
            metrics.answered(reply.status(), reply.events(), stored_in);
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
        let stored_in = started.filter(|_| reply.events() > 0).map(|t| t.elapsed());
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
        let verified = match self.verifier.verify_values(signatures, body) {
            Ok(verified) => verified,
            Err(error) => return Reply::from(error),
        };
        let events = match split_already_verified(body) {
            Ok(events) => events,
            Err(error) => return Reply::from(error),
        };
        let count = events.len();
        if count == 0 {
            return Reply::stored(0);
        }
        let lines = encode_lines(&events, verified.secret_index());
        match self.store.store(Records::new(lines, count as u64)).await {
            Ok(()) => Reply::stored(count),
            Err(error) => Reply::from(error),
        }
    }

    /// A small HTML page for `GET`: the receiver is up, which store it uses, how many
    /// events are stored, how many of them wait to be processed (the backlog), how
    /// many wait for a retry (and when the next is due) and how many are in the
    /// dead letter. The store is asked at most once a second ([`StatusCache`]).
    ///
    /// With a metrics token ([`Inbox::with_metrics_token`]) or a console
    /// ([`Inbox::with_console_at`]) the page is public no more than that the
    /// receiver is up, its version and where the figures are: they (and the store's
    /// errors, which can name its hosts) are behind a token, and the page asks
    /// the store nothing.
    pub async fn status_page(&self) -> Reply {
        if self.metrics_token.is_some() || self.console_at.is_some() {
            let figures = match (&self.metrics_token, &self.console_at) {
                (Some(_), Some(at)) => format!(
                    "Its figures are in the operator's console at <a href=\"{0}\">{0}</a> and at \
                     <code>/metrics</code>, each behind its token.",
                    html_text(at)
                ),
                (None, Some(at)) => format!(
                    "Its figures are in the operator's console at <a href=\"{0}\">{0}</a>, behind its token.",
                    html_text(at)
                ),
                _ => "Its figures are at <code>/metrics</code>, with the metrics token \
                      (<code>Authorization: Bearer</code>)."
                    .to_owned(),
            };
            return Reply::html(format!(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
                 <title>Comapi webhook receiver</title></head>\n<body><h1>Comapi webhook receiver is up</h1>\n\
                 <p>comapi-webhook {}. {figures}</p>\n\
                 <p>POST Comapi webhooks here, signed with <code>X-Comapi-Signature</code>.</p></body></html>\n",
                env!("CARGO_PKG_VERSION")
            ));
        }
        Reply::html(self.status_html().await)
    }

    /// Names the operator's console at `path` on the status page, which then
    /// shows no figure: they are behind the console's token.
    #[must_use]
    pub fn with_console_at(mut self, path: &str) -> Self {
        self.console_at = Some(path.to_owned());
        self
    }

    async fn status_html(&self) -> String {
        let status = self.status.status(&self.store).await;
        let figure = |n: Option<u64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        let pending = status.pending.map_or_else(String::new, |n| {
            format!(" ({n} of them handed to a worker, not yet acknowledged)")
        });
        let consumers = status.consumers.map_or_else(String::new, |n| {
            format!("<p>Workers consuming: <strong>{n}</strong></p>\n")
        });
        let next = status.next_retry_at.map_or_else(String::new, |at| {
            let at = humantime::format_rfc3339_seconds(at);
            format!(", the next due at {at}")
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
             <p>Waiting for a retry: <strong>{}</strong>{next}</p>\n\
             <p>In the dead letter: <strong>{}</strong></p>\n{consumers}\
             <p>POST Comapi webhooks here, signed with <code>X-Comapi-Signature</code>.</p></body></html>\n",
            html_text(&status.store),
            figure(status.stored),
            figure(status.backlog),
            figure(status.retries),
            figure(status.dead_letters),
        )
    }

    /// The same inbox, its [`Inbox::metrics`] only for requests that bring
    /// `Authorization: Bearer <token>`.
    #[must_use]
    pub fn with_metrics_token(mut self, token: impl AsRef<[u8]>) -> Self {
        self.metrics_token = Some(MetricsToken::new(token));
        self
    }

    /// Whether [`Inbox::metrics`] asks for a token ([`Inbox::with_metrics_token`]).
    #[must_use]
    pub fn metrics_protected(&self) -> bool {
        self.metrics_token.is_some()
    }

    /// The metrics given to [`Inbox::with_metrics`], with the store's gauges read
    /// now, in the OpenMetrics text format; 404 without metrics. `authorization`
    /// is the request's `Authorization` header: with a token set, anything but
    /// `Bearer <token>` (the scheme in any case, the token compared in constant
    /// time) gets a 401.
    ///
    /// ```
    /// # async fn demo(inbox: comapi_webhook::Inbox) {
    /// let reply = inbox.metrics(Some(b"Bearer the-metrics-token")).await;
    /// # }
    /// ```
    pub async fn metrics(&self, authorization: Option<&[u8]>) -> Reply {
        let Some(metrics) = self.metrics.as_ref() else {
            return Reply::not_found();
        };
        if let Some(token) = &self.metrics_token
            && !token.admits(authorization)
        {
            return Reply::metrics_token_required();
        }
        metrics.set_store_status(&self.status.status(&self.store).await);
        let budget = &self.body_budget;
        metrics.set_body_bytes(budget.held(), budget.limit());
        metrics.reply()
    }

    /// Runs the receive step on an actix-web request and its body stream: answers
    /// 413 from its `Content-Length`, or once reading passes
    /// [`Inbox::max_body_bytes`], and 408 when the body has not arrived whole
    /// within the body deadline ([`Inbox::with_body_deadline`]).
    #[cfg(feature = "actix")]
    pub async fn receive_actix(
        &self,
        request: &actix_web::HttpRequest,
        payload: actix_web::web::Payload,
    ) -> Reply {
        use futures_util::StreamExt;
        let headers = request.headers();
        let signatures = || {
            headers
                .get_all(SIGNATURE_HEADER.as_str())
                .map(actix_web::http::header::HeaderValue::as_bytes)
        };
        if let Err(error) = single_signature(signatures()) {
            return self.counted(Reply::from(error).body_unread(), None);
        }
        let promised = parse_length(headers.get("content-length").map(|v| v.as_bytes()));
        let mut buffer = match BodyBuffer::new(&self.body_budget, self.max_body_bytes, promised) {
            Ok(buffer) => buffer,
            Err(refused) => return self.refused(&refused),
        };
        let mut payload = payload;
        let read = async {
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| self.counted(Reply::unreadable_body(e), None))?;
                buffer
                    .push(&chunk)
                    .map_err(|refused| self.refused(&refused))?;
            }
            Ok(())
        };
        match tokio::time::timeout(self.body_deadline, read).await {
            Ok(Ok(())) => {
                self.receive_with_signatures(signatures(), buffer.bytes())
                    .await
            }
            Ok(Err(reply)) => reply,
            Err(_) => self.counted(Reply::body_timeout(self.body_deadline), None),
        }
    }

    /// Runs the receive step on an `http` request (hyper's, axum's): answers 413
    /// from its `Content-Length`, or once reading its body passes the limit, without
    /// reading the rest; otherwise reads the body and calls [`Inbox::receive`].
    pub async fn receive_request<B>(&self, request: http::Request<B>) -> Reply
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use http_body_util::BodyExt;
        if let Some(reply) = self.check_content_length(request.headers()) {
            return reply;
        }
        let (parts, body) = request.into_parts();
        let signatures = parts.headers.get_all(SIGNATURE_HEADER);
        if let Err(error) = single_signature(signatures.iter().map(http::HeaderValue::as_bytes)) {
            return self.counted(Reply::from(error).body_unread(), None);
        }
        let promised = content_length(&parts.headers);
        let mut buffer = match BodyBuffer::new(&self.body_budget, self.max_body_bytes, promised) {
            Ok(buffer) => buffer,
            Err(refused) => return self.refused(&refused),
        };
        let read = async {
            let mut body = std::pin::pin!(body);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    let error: Box<dyn std::error::Error + Send + Sync> = e.into();
                    self.counted(Reply::unreadable_body(error), None)
                })?;
                if let Ok(mut data) = frame.into_data() {
                    use bytes::Buf;
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        let n = chunk.len();
                        buffer
                            .push(chunk)
                            .map_err(|refused| self.refused(&refused))?;
                        data.advance(n);
                    }
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.body_deadline, read).await {
            Ok(Ok(())) => self.receive(&parts.headers, buffer.bytes()).await,
            Ok(Err(reply)) => reply,
            Err(_) => self.counted(Reply::body_timeout(self.body_deadline), None),
        }
    }

    /// The answer to a body that could not be read whole.
    fn refused(&self, refused: &Refused) -> Reply {
        match refused {
            Refused::TooLarge => self.too_large(),
            Refused::NoRoom => {
                let limit = self.body_budget.limit();
                self.counted(Reply::no_room_for_body(limit), None)
            }
        }
    }
}

/// A request's `Content-Length`, if it gives a number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    parse_length(
        headers
            .get(http::header::CONTENT_LENGTH)
            .map(|v| v.as_bytes()),
    )
}

/// A `Content-Length` value as a number, whatever the framework's header type.
fn parse_length(value: Option<&[u8]>) -> Option<u64> {
    std::str::from_utf8(value?).ok()?.trim().parse::<u64>().ok()
}

/// At most this many refused requests are logged a second; the rest are counted.
const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

/// Logs an answer other than 200 at `warn`: its status and reason (a wrong secret
/// shows as `signature mismatch`), never the signature or the body. At most
/// [`REFUSALS_LOGGED_PER_SECOND`] lines a second, so a flood cannot fill a disk; a
/// line at the end of the second says how many were left out.
fn log_refusal(reply: &Reply) {
    static BUDGET: LogBudget = LogBudget::new(REFUSALS_LOGGED_PER_SECOND, "request refused");
    if reply.status().is_success() {
        return;
    }
    let Some(suppressed) = BUDGET.admit() else {
        return;
    };
    tracing::warn!(
        status = reply.status().as_u16(),
        reason = %reply.reason(),
        suppressed_before = suppressed,
        "request refused"
    );
}

/// `text` with the characters HTML gives a meaning escaped.
fn html_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
