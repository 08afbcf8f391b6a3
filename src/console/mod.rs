//! The operator's console: counts per state, the dead letter and the retry
//! schedule as lists filtered by name, error and time, each event's page, and the
//! actions (requeue, discard, retry now, pause and resume), each written to an
//! audit log in the store. Behind tokens ([`ConsoleAccess`]); plain HTML forms,
//! no script, no outside asset.
//!
//! [`Console`] is framework-agnostic, like [`Inbox`](crate::Inbox): give it each
//! request under its path (`/console` by default) with the body read (at most
//! [`MAX_FORM_BYTES`]), and send back the `http::Response` it gives. The reference
//! receivers and the `worker` serve it when `COMAPI_CONSOLE_TOKEN` is set.
//!
//! ```
//! use comapi_webhook::console::{Console, ConsoleAccess, Role};
//! use comapi_webhook::store::spool::{Spool, SpoolConfig};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("console-doc-{}", std::process::id()));
//! let (spool, _) = Spool::open(&SpoolConfig::new(&dir))?;
//! let access = ConsoleAccess::new().with_token("operator", Role::Operator, "an-operator-token-0001")?;
//! let console = Console::new(spool.clone(), access);
//! // Not signed in: the sign-in page.
//! let request = http::Request::get("/console").body(Vec::new())?;
//! let response = console.handle(&request).await;
//! assert_eq!(response.status(), 200);
//! assert!(response.body().contains("Sign in"));
//! // A path outside the console is not its business.
//! assert!(!console.serves("/metrics"));
//! # spool.close().await;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! On RabbitMQ the dead letter is a stream, read by offset without taking a
//! delivery (see [`store::rabbitmq`](crate::store::rabbitmq)); the retry
//! schedule's delay queues are counted, not listed.

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderValue, Method, Response, StatusCode, header};

mod access;
mod html;
mod lists;
mod model;
mod ops;
mod pages;

pub use access::{
    AccessError, ConsoleAccess, MIN_TOKEN_CHARS, Role, SESSION_COOKIE, SESSION_LIFETIME,
};
pub use model::{AuditEntry, Filter, PAGE_SIZE, Page, Summary};
pub(crate) use model::{RecordHead, cut, millis};
pub(crate) use ops::Entry;
#[cfg(feature = "redis")]
pub(crate) use ops::Failure;
pub use ops::RETRIES_LISTED;

use crate::metrics::Metrics;
use crate::store::Store;
use access::Session;
use ops::Ops;

/// The largest form body the console takes; the caller reads at most this much.
/// Its largest form, a page of 50 ticked rows, is about 1.5 KiB; the limit is
/// what a client without a token can make a connection hold.
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// Where the console is served unless [`Console::with_base`] says otherwise.
pub const DEFAULT_BASE: &str = "/console";

/// The operator's console over one store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Console {
    access: Arc<ConsoleAccess>,
    ops: Arc<Ops>,
    metrics: Option<Arc<Metrics>>,
    base: Arc<str>,
}

/// One request as the console reads it.
pub(crate) struct Asked<'a> {
    pub(crate) method: &'a Method,
    /// The path under the base: `""`, `"/dead"`, `"/dead/<id>"`.
    pub(crate) path: &'a str,
    pub(crate) query: Vec<(String, String)>,
    pub(crate) form: Vec<(String, String)>,
    pub(crate) secure: bool,
    pub(crate) session: Option<Session>,
}

impl Asked<'_> {
    /// The first value of `name` in the form, then in the query.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .chain(&self.query)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` in the form.
    pub(crate) fn all(&self, name: &str) -> Vec<String> {
        self.form
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl Console {
    /// A console over `store`, open to the holders of `access`'s tokens (with
    /// none, it answers 404 to everything).
    pub fn new(store: impl Into<Store>, access: ConsoleAccess) -> Self {
        Console {
            access: Arc::new(access),
            ops: Arc::new(Ops::new(store.into())),
            metrics: None,
            base: Arc::from(DEFAULT_BASE),
        }
    }

    /// Draws this process's handler outcomes per minute from `metrics`
    /// ([`Metrics::last_hour`]) on the overview.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Serves the console under `base` (`/ops/console`, say) rather than
    /// [`DEFAULT_BASE`].
    #[must_use]
    pub fn with_base(mut self, base: &str) -> Self {
        self.base = Arc::from(format!("/{}", base.trim_matches('/')));
        self
    }

    /// Reads the dead letter into the console's index now, so that the first
    /// page an operator opens is as fast as the next (the index is kept and read
    /// anew only where the store changed). The reference receivers and the
    /// `worker` call it when they start; without it the first page pays for the
    /// read (390 ms for 100,000 dead letters on the spool, 2.1 s on Redis, as
    /// `cargo bench --bench console` measures).
    ///
    /// # Errors
    /// When the store cannot be read; the next page tries again.
    pub async fn warm_up(&self) -> Result<(), crate::Error> {
        if self.is_enabled() {
            drop(self.ops.dead_letters().await?);
        }
        Ok(())
    }

    /// The path it is served under.
    #[must_use]
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether it has a token (without one it answers 404).
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        !self.access.is_empty()
    }

    /// Whether `path` is the console's: its base or under it.
    #[must_use]
    pub fn serves(&self, path: &str) -> bool {
        path.strip_prefix(self.base())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Answers one request under [`Console::base`]; its body is the form (read by
    /// the caller, at most [`MAX_FORM_BYTES`]). Never fails: a store's error is a
    /// page that says so.
    pub async fn handle<B: AsRef<[u8]>>(&self, request: &http::Request<B>) -> Response<String> {
        let path = request.uri().path();
        if self.access.is_empty() || !self.serves(path) {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        let body = request.body().as_ref();
        if body.len() > MAX_FORM_BYTES {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large\n");
        }
        let now = SystemTime::now();
        let session = cookie(request.headers(), SESSION_COOKIE)
            .and_then(|value| self.access.session(&value, now));
        let asked = Asked {
            method: request.method(),
            path: &path[self.base().len()..],
            query: parse_form(request.uri().query().unwrap_or("").as_bytes()),
            form: parse_form(body),
            secure: request.uri().scheme_str() == Some("https")
                || request
                    .headers()
                    .get("x-forwarded-proto")
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https")),
            session,
        };
        let context = pages::Context {
            access: &self.access,
            ops: &self.ops,
            metrics: self.metrics.as_deref(),
            base: self.base(),
            now,
        };
        pages::answer(&context, &asked).await
    }
}

/// How long [`Console::handle_body`] waits for a form's body.
pub const FORM_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

impl Console {
    /// [`Console::handle`] for a request whose body is still to be read (hyper's
    /// `Incoming`, axum's `Body`): reads at most [`MAX_FORM_BYTES`] of it within
    /// [`FORM_DEADLINE`] (413 or 408 otherwise).
    pub async fn handle_body<B>(&self, request: http::Request<B>) -> Response<String>
    where
        B: http_body::Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        use http_body_util::BodyExt;
        if !self.is_enabled() || !self.serves(request.uri().path()) {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        let (parts, body) = request.into_parts();
        let limited = http_body_util::Limited::new(body, MAX_FORM_BYTES);
        let bytes = match tokio::time::timeout(FORM_DEADLINE, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the form is too large or cut short\n",
                );
            }
            Err(_) => {
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "the form took too long to arrive\n",
                );
            }
        };
        self.handle(&http::Request::from_parts(parts, bytes)).await
    }

    /// [`Console::handle`] for actix-web: the body as actix-web's `Bytes`
    /// extractor read it: give that extractor `web::PayloadConfig::new(MAX_FORM_BYTES)`
    /// (its default is 256 KiB), as actix_receiver does.
    #[cfg(feature = "actix")]
    pub async fn handle_actix(
        &self,
        request: &actix_web::HttpRequest,
        body: actix_web::web::Bytes,
    ) -> actix_web::HttpResponse {
        // actix-web 4 is on http 0.2: its parts cross over as bytes.
        let mut asked = http::Request::new(body);
        *asked.method_mut() =
            Method::from_bytes(request.method().as_str().as_bytes()).unwrap_or(Method::GET);
        *asked.uri_mut() = request.uri().to_string().parse().unwrap_or_default();
        for (name, value) in request.headers() {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                asked.headers_mut().append(name, value);
            }
        }
        if request.connection_info().scheme() == "https" {
            asked
                .headers_mut()
                .insert("x-forwarded-proto", HeaderValue::from_static("https"));
        }
        let response = self.handle(&asked).await;
        let status = actix_web::http::StatusCode::from_u16(response.status().as_u16())
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut reply = actix_web::HttpResponse::build(status);
        for (name, value) in response.headers() {
            reply.append_header((name.as_str(), value.as_bytes()));
        }
        reply.body(response.into_body())
    }
}

/// A plain-text answer.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<String> {
    let mut response = Response::new(text.to_owned());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An HTML answer with the console's headers: no caching, no framing, no
/// script, nothing from elsewhere.
pub(crate) fn html(status: StatusCode, page: String) -> Response<String> {
    let mut response = Response::new(page);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let fixed = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The value of cookie `name`.
fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// `application/x-www-form-urlencoded` (a form, or a query) as name-value pairs.
pub(crate) fn parse_form(bytes: &[u8]) -> Vec<(String, String)> {
    fn decode(part: &[u8]) -> String {
        let mut out = Vec::with_capacity(part.len());
        let mut i = 0;
        while i < part.len() {
            match part[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < part.len() => {
                    let hex = std::str::from_utf8(&part[i + 1..i + 3]).ok();
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(byte) => {
                            out.push(byte);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    bytes
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(at) => (decode(&pair[..at]), decode(&pair[at + 1..])),
            None => (decode(pair), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_as_browsers_encode_them() {
        let form = parse_form(b"name=message.sent&error=db+down%21&id=a&id=b&bad=%zz&end=%4");
        assert_eq!(form[0], ("name".into(), "message.sent".into()));
        assert_eq!(form[1].1, "db down!");
        assert_eq!(form.iter().filter(|(n, _)| n == "id").count(), 2);
        assert_eq!(form[4].1, "%zz");
        assert_eq!(form[5].1, "%4");
        assert!(parse_form(b"").is_empty());
    }
}
