//! `Reply`: what a webhook endpoint answers, for the receive step and the
//! extractors alike, with the one table from errors to answers.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderValue, StatusCode, header};

use crate::Error;

/// The `Content-Type` of a text answer.
const TEXT: &str = "text/plain; charset=utf-8";
/// The `Content-Type` of the status page.
#[cfg(feature = "receiver")]
const HTML: &str = "text/html; charset=utf-8";

/// What a receiver answers: a status, a content type and a short body. It converts
/// to an `http::Response<String>` (hyper serves that as it is), and, behind their
/// features, to axum's and actix-web's responses.
///
/// | answer | when |
/// |---|---|
/// | 401 | the signature is missing, malformed or wrong; nothing is stored |
/// | 400 | the body is not an envelope or a batch of them; nothing is stored (Comapi does not retry) |
/// | 413 | the body is over the limit; the connection is closed, since the rest was not read |
/// | 503 | storing failed, or took longer than the store's deadline, or the body could not be read; Comapi retries later |
/// | 200 | every event of the body is durably stored |
///
/// ```
/// use comapi_webhook::{Error, Reply};
/// let reply = Reply::from(Error::SignatureMismatch);
/// assert_eq!(reply.status(), 401);
/// assert_eq!(reply.reason(), "signature mismatch");
/// let response: http::Response<String> = reply.into();
/// assert_eq!(response.body(), "invalid or missing X-Comapi-Signature\n");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Cow<'static, str>,
    /// Set for errors; otherwise the body says it all.
    reason: Option<String>,
    events: usize,
    /// A 401 that asks for a bearer token (`WWW-Authenticate: Bearer`).
    bearer: bool,
    /// The request's body was not read to its end: the connection must close.
    unread: bool,
    /// Seconds for `Retry-After`.
    retry_after: Option<u16>,
}

impl Reply {
    fn new(
        status: StatusCode,
        content_type: &'static str,
        body: impl Into<Cow<'static, str>>,
    ) -> Self {
        Reply {
            status,
            content_type,
            body: body.into(),
            reason: None,
            events: 0,
            bearer: false,
            unread: false,
            retry_after: None,
        }
    }

    /// The same answer, given before the body was read to its end: the connection
    /// closes after it.
    #[cfg(feature = "receiver")]
    pub(crate) fn body_unread(mut self) -> Self {
        self.unread = true;
        self
    }

    /// A `503` for a body the process has no room to read now: every byte of its
    /// body budget is held by other requests. `Retry-After: 1`; the connection
    /// closes, since the body was not read.
    #[cfg(feature = "receiver")]
    pub(crate) fn no_room_for_body(budget: usize) -> Self {
        Reply {
            reason: Some(format!(
                "no room for the body: the {budget}-byte body budget is held by other requests"
            )),
            unread: true,
            retry_after: Some(1),
            ..Reply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "too many requests in flight, retry later\n",
            )
        }
    }

    /// `401` for a `GET /metrics` without the right bearer token
    /// ([`MetricsToken`](crate::metrics::MetricsToken));
    /// `WWW-Authenticate: Bearer`.
    #[cfg(feature = "receiver")]
    #[must_use]
    pub fn metrics_token_required() -> Self {
        Reply {
            reason: Some("no or wrong metrics token".to_owned()),
            bearer: true,
            ..Reply::new(
                StatusCode::UNAUTHORIZED,
                TEXT,
                "the metrics need Authorization: Bearer <COMAPI_METRICS_TOKEN>\n",
            )
        }
    }

    /// `200 ok`: `events` events were stored.
    #[cfg(feature = "receiver")]
    pub(crate) fn stored(events: usize) -> Self {
        let body = if events == 0 {
            "ok: no events\n"
        } else {
            "ok\n"
        };
        Reply {
            events,
            ..Reply::new(StatusCode::OK, TEXT, body)
        }
    }

    /// A `200` HTML page.
    #[cfg(feature = "receiver")]
    pub(crate) fn html(page: String) -> Self {
        Reply::new(StatusCode::OK, HTML, page)
    }

    /// A `200` with `body` of `content_type`.
    #[cfg(feature = "receiver")]
    pub(crate) fn content(content_type: &'static str, body: String) -> Self {
        Reply::new(StatusCode::OK, content_type, body)
    }

    /// `404 not found`, for paths a receiver does not serve.
    #[must_use]
    pub fn not_found() -> Self {
        Reply::new(StatusCode::NOT_FOUND, TEXT, "not found\n")
    }

    /// `405`, for methods a receiver does not serve; `Allow: GET, POST`.
    #[must_use]
    pub fn method_not_allowed() -> Self {
        Reply::new(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET or POST\n")
    }

    /// A `503` for a body that could not be read off the connection (cut short,
    /// badly chunked): nothing shows it was not a signed batch, and Comapi never
    /// retries a 400, so it is asked to send it again.
    #[cfg(any(feature = "receiver", feature = "actix", feature = "axum"))]
    pub(crate) fn unreadable_body(why: impl fmt::Display) -> Self {
        Reply {
            reason: Some(format!("cannot read the request body: {why}")),
            ..Reply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "cannot read the request body, retry later\n",
            )
        }
    }

    /// A `408` for a body that did not arrive within the receive step's deadline:
    /// a stalled or hostile client, answered instead of holding a connection.
    #[cfg(feature = "receiver")]
    pub(crate) fn body_timeout(deadline: std::time::Duration) -> Self {
        Reply {
            reason: Some(format!("the body did not arrive within {deadline:?}")),
            ..Reply::new(
                StatusCode::REQUEST_TIMEOUT,
                TEXT,
                "the request body did not arrive in time\n",
            )
        }
    }

    /// A `500` for a server that is set up wrong (an extractor without its config).
    #[cfg(feature = "actix")]
    pub(crate) fn misconfigured(what: &'static str) -> Self {
        Reply {
            reason: Some(what.to_owned()),
            ..Reply::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                "server misconfigured\n",
            )
        }
    }

    /// The HTTP status.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body: a short text saying why, or a page.
    #[must_use]
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The `Content-Type` of [`Reply::body`].
    #[must_use]
    pub fn content_type(&self) -> &'static str {
        self.content_type
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

    /// Whether the connection must close after this answer: the body was not read
    /// to its end (a 413, a 401 for a missing or malformed signature, a 503 for no
    /// room), so the connection cannot carry another request.
    #[must_use]
    pub fn closes_connection(&self) -> bool {
        self.unread || self.status == StatusCode::PAYLOAD_TOO_LARGE
    }

    /// The seconds to wait before retrying, sent as `Retry-After`, if any.
    #[must_use]
    pub fn retry_after(&self) -> Option<u16> {
        self.retry_after
    }
}

impl From<Error> for Reply {
    fn from(error: Error) -> Self {
        Reply::from(&error)
    }
}

impl From<&Error> for Reply {
    fn from(error: &Error) -> Self {
        let body = match error.status() {
            StatusCode::UNAUTHORIZED => Cow::Borrowed("invalid or missing X-Comapi-Signature\n"),
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {
                Cow::Owned(format!("{error}\n"))
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                Cow::Borrowed("cannot store events now, retry later\n")
            }
            _ => Cow::Borrowed("server misconfigured\n"),
        };
        Reply {
            reason: Some(error.report().to_string()),
            ..Reply::new(error.status(), TEXT, body)
        }
    }
}

impl From<Reply> for http::Response<String> {
    fn from(reply: Reply) -> Self {
        let close = reply.closes_connection();
        let status = reply.status;
        let allow = status == StatusCode::METHOD_NOT_ALLOWED;
        let mut response = http::Response::new(reply.body.into_owned());
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(reply.content_type),
        );
        if close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if allow {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
        }
        if reply.bearer {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"metrics\""),
            );
        }
        if let Some(seconds) = reply.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.reason())
    }
}

impl std::error::Error for Reply {}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Reply {
    fn into_response(self) -> axum::response::Response {
        http::Response::<String>::from(self).into_response()
    }
}

#[cfg(feature = "actix")]
impl actix_web::ResponseError for Reply {
    fn status_code(&self) -> actix_web::http::StatusCode {
        actix_web::http::StatusCode::from_u16(self.status.as_u16())
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> actix_web::HttpResponse {
        self.clone().actix_response().map_into_boxed_body()
    }
}

#[cfg(feature = "actix")]
impl actix_web::Responder for Reply {
    type Body = String;

    fn respond_to(self, _: &actix_web::HttpRequest) -> actix_web::HttpResponse<String> {
        self.actix_response()
    }
}

#[cfg(feature = "actix")]
impl Reply {
    fn actix_response(self) -> actix_web::HttpResponse<String> {
        let status = actix_web::ResponseError::status_code(&self);
        let close = self.closes_connection();
        let mut response = actix_web::HttpResponse::with_body(status, self.body.into_owned());
        let headers = response.headers_mut();
        headers.insert(
            actix_web::http::header::CONTENT_TYPE,
            actix_web::http::header::HeaderValue::from_static(self.content_type),
        );
        if self.bearer {
            headers.insert(
                actix_web::http::header::WWW_AUTHENTICATE,
                actix_web::http::header::HeaderValue::from_static("Bearer realm=\"metrics\""),
            );
        }
        if close {
            headers.insert(
                actix_web::http::header::CONNECTION,
                actix_web::http::header::HeaderValue::from_static("close"),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from(seconds),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_answer() {
        let cases = [
            (
                Error::MissingSignature,
                401,
                "invalid or missing X-Comapi-Signature\n",
            ),
            (
                Error::SignatureMismatch,
                401,
                "invalid or missing X-Comapi-Signature\n",
            ),
            (
                Error::BodyTooLarge { limit: Some(10) },
                413,
                "body over the limit of 10 bytes\n",
            ),
            (
                Error::storage("cannot write the spool", std::io::Error::other("disk full")),
                503,
                "cannot store events now, retry later\n",
            ),
            (Error::EmptySecret, 500, "server misconfigured\n"),
        ];
        for (error, status, body) in cases {
            let reason = error.report().to_string();
            let reply = Reply::from(error);
            assert_eq!((reply.status().as_u16(), reply.body()), (status, body));
            assert_eq!(reply.reason(), reason);
        }
        let reply = Reply::from(Error::BodyTooLarge { limit: None });
        assert_eq!(reply.body(), "body over the limit\n");
        let response = http::Response::<String>::from(reply);
        assert_eq!(response.headers()[header::CONNECTION], "close");
        #[cfg(feature = "receiver")]
        {
            assert_eq!(Reply::stored(2).reason(), "ok");
            assert_eq!(Reply::stored(0).body(), "ok: no events\n");
        }
    }
}
