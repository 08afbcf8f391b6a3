//! The console's routes: each page and each action.

use std::fmt::Write;
use std::time::SystemTime;

use http::{HeaderValue, Method, Response, StatusCode, header};

use super::access::{ConsoleAccess, Role, SESSION_COOKIE, SESSION_LIFETIME, Session};
use super::html::{button_form, chart, escape, page, url_encode};
use super::lists::{self, filter_of};
use super::model::AuditEntry;
use super::ops::{Entry, Ops};
use super::{Asked, html};
use crate::Error;
use crate::metrics::Metrics;
use crate::store::EventStore;

/// What every page needs.
pub(crate) struct Context<'a> {
    pub(crate) access: &'a ConsoleAccess,
    pub(crate) ops: &'a Ops,
    pub(crate) metrics: Option<&'a Metrics>,
    pub(crate) base: &'a str,
    pub(crate) now: SystemTime,
}

/// A signed-in page: the session's label and CSRF token.
pub(super) struct Signed<'a> {
    pub(super) session: &'a Session,
    pub(super) csrf: String,
}

impl Signed<'_> {
    pub(super) fn operator(&self) -> bool {
        self.session.role == Role::Operator
    }
}

pub(crate) async fn answer(cx: &Context<'_>, asked: &Asked<'_>) -> Response<String> {
    let method = asked.method;
    if *method == Method::POST && asked.path == "/sign-in" {
        return sign_in(cx, asked);
    }
    let Some(session) = &asked.session else {
        if *method == Method::GET && matches!(asked.path, "" | "/") {
            return html(StatusCode::OK, sign_in_page(cx.base, None));
        }
        return html(
            StatusCode::UNAUTHORIZED,
            sign_in_page(cx.base, Some("Sign in to see this page.")),
        );
    };
    let signed = Signed {
        session,
        csrf: cx.access.csrf(session),
    };
    if *method == Method::POST {
        if !asked
            .get("csrf")
            .is_some_and(|c| cx.access.csrf_holds(session, c))
        {
            return message(
                cx,
                &signed,
                StatusCode::FORBIDDEN,
                "Refused",
                "The form's CSRF token is missing or wrong. Reload the page and try again.",
                true,
            );
        }
        if asked.path == "/sign-out" {
            return redirect(
                cx.base,
                &format!(
                    "{SESSION_COOKIE}=; Path={}; HttpOnly; SameSite=Strict; Max-Age=0",
                    cx.base
                ),
            );
        }
        if !signed.operator() {
            return message(
                cx,
                &signed,
                StatusCode::FORBIDDEN,
                "Read-only",
                "This token can look but not act: sign in with an operator's token to change anything.",
                true,
            );
        }
    }
    if !cx.ops.lists_retries() && (asked.path.starts_with("/retries") || asked.path == "/retry-now")
    {
        return message(
            cx,
            &signed,
            StatusCode::NOT_IMPLEMENTED,
            "Not on RabbitMQ",
            "RabbitMQ's retry schedule is a set of delay queues, which cannot be read without taking their messages and raising their delivery count: the overview counts them, and each comes back by itself when it is due.",
            true,
        );
    }
    let result = match (method, asked.path) {
        (&Method::GET, "" | "/") => overview(cx, &signed).await,
        (&Method::GET, "/dead") => lists::dead_list(cx, &signed, asked).await,
        (&Method::GET, "/retries") => lists::retry_list(cx, &signed, asked).await,
        (&Method::GET, "/audit") => audit(cx, &signed).await,
        (&Method::GET, path) if path.starts_with("/dead/") => {
            event_page(cx, &signed, &path[6..], false).await
        }
        (&Method::GET, path) if path.starts_with("/retries/") => {
            event_page(cx, &signed, &path[9..], true).await
        }
        (&Method::POST, "/requeue") => take(cx, &signed, asked, true).await,
        (&Method::POST, "/discard") => take(cx, &signed, asked, false).await,
        (&Method::POST, "/retry-now") => retry_now(cx, &signed, asked).await,
        (&Method::POST, "/pause") => pause(cx, &signed, true).await,
        (&Method::POST, "/resume") => pause(cx, &signed, false).await,
        _ => Ok(message(
            cx,
            &signed,
            StatusCode::NOT_FOUND,
            "Not found",
            "The console has no such page.",
            true,
        )),
    };
    result.unwrap_or_else(|error| {
        let text = format!("The store did not answer: {}", error.report());
        message(
            cx,
            &signed,
            StatusCode::SERVICE_UNAVAILABLE,
            "Store unavailable",
            &text,
            true,
        )
    })
}

fn sign_in_page(base: &str, note: Option<&str>) -> String {
    let note = note.map_or_else(String::new, |n| {
        format!("<p class=\"note bad\" role=\"alert\">{}</p>", escape(n))
    });
    page(
        base,
        "Sign in",
        None,
        &format!(
            "{note}<form method=\"post\" action=\"{base}/sign-in\"><label for=\"token\">Console token\
             <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" required autofocus></label>\
             <p><button type=\"submit\" class=\"primary\">Sign in</button></p></form>"
        ),
    )
}

fn sign_in(cx: &Context<'_>, asked: &Asked<'_>) -> Response<String> {
    let given = asked.get("token").unwrap_or("");
    let Some((_, cookie)) = cx.access.sign_in(given.as_bytes(), cx.now) else {
        return html(
            StatusCode::UNAUTHORIZED,
            sign_in_page(cx.base, Some("That token is not one of the console's.")),
        );
    };
    let secure = if asked.secure { "; Secure" } else { "" };
    redirect(
        cx.base,
        &format!(
            "{SESSION_COOKIE}={cookie}; Path={}; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            cx.base,
            SESSION_LIFETIME.as_secs()
        ),
    )
}

fn redirect(to: &str, set_cookie: &str) -> Response<String> {
    let mut response = html(StatusCode::SEE_OTHER, String::new());
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(to) {
        headers.insert(header::LOCATION, location);
    }
    if let Ok(cookie) = HeaderValue::from_str(set_cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

pub(super) fn frame(cx: &Context<'_>, signed: &Signed<'_>, title: &str, body: &str) -> String {
    page(
        cx.base,
        title,
        Some((&signed.session.label, &signed.csrf)),
        body,
    )
}

fn message(
    cx: &Context<'_>,
    signed: &Signed<'_>,
    status: StatusCode,
    title: &str,
    text: &str,
    bad: bool,
) -> Response<String> {
    let class = if bad { "note bad" } else { "note" };
    let body = format!(
        "<p class=\"{class}\" role=\"status\">{}</p><p><a href=\"{}\">Back to the overview</a></p>",
        escape(text),
        cx.base
    );
    html(status, frame(cx, signed, title, &body))
}

fn count(figure: Option<u64>) -> String {
    figure.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
}

async fn overview(cx: &Context<'_>, signed: &Signed<'_>) -> Result<Response<String>, Error> {
    let status = cx.ops.store.status().await;
    let paused = cx.ops.paused().await;
    let mut body = String::new();
    match &paused {
        Ok(true) => body.push_str("<p class=\"note bad\"><span class=\"paused\">Paused</span> No worker takes a new event until processing is resumed.</p>"),
        Ok(false) => body.push_str("<p class=\"note\">Processing is running.</p>"),
        Err(e) => { let _ = write!(body, "<p class=\"note bad\">Whether processing is paused is unknown: {}</p>", escape(&e.report().to_string())); }
    }
    if signed.operator() {
        let (action, label) = if paused.as_ref().is_ok_and(|p| *p) {
            ("resume", "Resume processing")
        } else {
            ("pause", "Pause processing")
        };
        body.push_str(&button_form(
            &format!("{}/{action}", cx.base),
            &signed.csrf,
            &[],
            label,
            "primary",
        ));
    }
    if let Some(error) = &status.error {
        let _ = write!(
            body,
            "<p class=\"note bad\">The store could not tell its figures: {}</p>",
            escape(error)
        );
    }
    let waiting = status
        .backlog
        .zip(status.pending)
        .map(|(b, p)| b.saturating_sub(p))
        .or(status.backlog);
    let next = status.next_retry_at.map_or_else(String::new, |at| {
        format!(" (next due {})", humantime::format_rfc3339_seconds(at))
    });
    let _ = write!(
        body,
        "<h2>Events by state</h2><p>{}</p><table class=\"counts\"><thead><tr><th scope=\"col\">State</th><th scope=\"col\">Events</th></tr></thead><tbody>\
         <tr><th scope=\"row\">Stored and waiting</th><td id=\"count-waiting\">{}</td></tr>\
         <tr><th scope=\"row\">In a handler</th><td id=\"count-in-handler\">{}</td></tr>\
         <tr><th scope=\"row\"><a href=\"{b}/retries\">Waiting for a retry</a>{}</th><td id=\"count-retries\">{}</td></tr>\
         <tr><th scope=\"row\"><a href=\"{b}/dead\">Dead</a></th><td id=\"count-dead\">{}</td></tr>\
         <tr><th scope=\"row\">Stored in all</th><td id=\"count-stored\">{}</td></tr></tbody></table>",
        escape(&status.store),
        count(waiting),
        count(status.pending),
        escape(&next),
        count(status.retries),
        count(status.dead_letters),
        count(status.stored),
        b = cx.base,
    );
    {
        let dead = cx.ops.dead_letters().await?.index.by_name();
        // RabbitMQ's delay queues are counted, not read: no names.
        let retries = if cx.ops.lists_retries() {
            Some(cx.ops.retries().await?.0.by_name())
        } else {
            None
        };
        let no_names = std::collections::BTreeMap::new();
        let mut names: Vec<&String> = dead
            .keys()
            .chain(retries.as_ref().unwrap_or(&no_names).keys())
            .collect();
        names.sort();
        names.dedup();
        body.push_str("<h2>By event name</h2>");
        if names.is_empty() {
            body.push_str("<p>No event waits for a retry or is dead.</p>");
        } else {
            body.push_str("<table class=\"counts\"><thead><tr><th scope=\"col\">Event name</th><th scope=\"col\">Waiting for a retry</th><th scope=\"col\">Dead</th></tr></thead><tbody>");
            for name in names {
                let _ = write!(
                    body,
                    "<tr><th scope=\"row\"><a href=\"{}/dead?name={}\">{}</a></th><td>{}</td><td>{}</td></tr>",
                    cx.base,
                    url_encode(name),
                    escape(name),
                    retries.as_ref().map_or_else(
                        || "not told".to_owned(),
                        |r| r.get(name).unwrap_or(&0).to_string()
                    ),
                    dead.get(name).unwrap_or(&0)
                );
            }
            body.push_str("</tbody></table>");
        }
    }
    body.push_str("<h2>Handler outcomes per minute, last hour</h2>");
    match cx.metrics {
        Some(metrics) => {
            body.push_str(&chart(&metrics.last_hour()));
            body.push_str("<p>Counted by the workers of this process.</p>");
        }
        None => body.push_str(
            "<p>This process runs no worker: each worker's own console shows its figures.</p>",
        ),
    }
    Ok(html(StatusCode::OK, frame(cx, signed, "Overview", &body)))
}

async fn event_page(
    cx: &Context<'_>,
    signed: &Signed<'_>,
    id: &str,
    retry: bool,
) -> Result<Response<String>, Error> {
    let id = super::parse_form(format!("id={id}").as_bytes())
        .pop()
        .map(|(_, v)| v)
        .unwrap_or_default();
    let entry: Option<Entry> = if retry {
        let (_, entries) = cx.ops.retries().await?;
        entries.into_iter().find(|e| e.summary.id == id)
    } else {
        cx.ops.dead_letter(&id).await?
    };
    let Some(entry) = entry else {
        return Ok(message(
            cx,
            signed,
            StatusCode::NOT_FOUND,
            "Not found",
            "No such event here now: it may have been requeued, discarded or retried.",
            true,
        ));
    };
    let s = &entry.summary;
    let record: serde_json::Value =
        serde_json::from_slice(&entry.record).unwrap_or(serde_json::Value::Null);
    let event = &record["event"];
    let field = |name: &str| match &event[name] {
        serde_json::Value::Null => "—".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let when = if retry {
        "Next attempt due"
    } else {
        "Dead-lettered at"
    };
    let mut body = format!(
        "<table><tbody><tr><th scope=\"row\">Event name</th><td id=\"event-name\">{}</td></tr>\
         <tr><th scope=\"row\">Event id</th><td id=\"event-id\">{}</td></tr>\
         <tr><th scope=\"row\">Revision</th><td>{}</td></tr><tr><th scope=\"row\">Event time</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Account, API space</th><td>{} · {}</td></tr>\
         <tr><th scope=\"row\">Received</th><td>{}</td></tr><tr><th scope=\"row\">{when}</th><td>{}</td></tr></tbody></table>\
         <h2>Attempts</h2><p id=\"attempts\">{} attempt(s) made; the last failed with:</p><pre id=\"last-error\">{}</pre>",
        escape(&field("name")),
        escape(&field("eventId")),
        escape(&field("revision")),
        escape(&field("timestamp")),
        escape(&field("accountId")),
        escape(&field("apiSpaceId")),
        escape(&s.received()),
        escape(&s.at),
        s.attempts,
        escape(&entry.error),
    );
    body.push_str(&attempts_table(&entry));
    if signed.operator() {
        body.push_str("<div class=\"actions\">");
        if retry {
            body.push_str(&button_form(
                &format!("{}/retry-now", cx.base),
                &signed.csrf,
                &[("id", &s.id)],
                "Retry now",
                "primary",
            ));
        } else {
            body.push_str(&button_form(
                &format!("{}/requeue", cx.base),
                &signed.csrf,
                &[("id", &s.id)],
                "Requeue",
                "primary",
            ));
            body.push_str(&button_form(
                &format!("{}/discard", cx.base),
                &signed.csrf,
                &[("id", &s.id)],
                "Discard…",
                "danger",
            ));
        }
        body.push_str("</div>");
    }
    let pretty = serde_json::to_string_pretty(&record)
        .unwrap_or_else(|_| String::from_utf8_lossy(&entry.record).into_owned());
    let _ = write!(
        body,
        "<h2>The record as stored</h2><pre>{}</pre>",
        escape(&pretty)
    );
    let title = if retry {
        "Waiting for a retry"
    } else {
        "Dead letter"
    };
    Ok(html(StatusCode::OK, frame(cx, signed, title, &body)))
}

/// Each kept attempt with its time and error; older ones beyond those kept are
/// counted.
fn attempts_table(entry: &Entry) -> String {
    if entry.history.is_empty() {
        return String::new();
    }
    let kept = entry.history.len() as u32;
    let mut out = String::from(
        "<table id=\"attempt-list\"><thead><tr><th scope=\"col\">Attempt</th><th scope=\"col\">Failed at</th><th scope=\"col\">Error</th></tr></thead><tbody>",
    );
    let first = entry.summary.attempts.saturating_sub(kept).max(1);
    for (n, attempt) in entry.history.iter().enumerate() {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            first + n as u32,
            escape(&attempt.at),
            escape(&attempt.error)
        );
    }
    out.push_str("</tbody></table>");
    if entry.summary.attempts > kept {
        let _ = write!(
            out,
            "<p>The {} earlier attempt(s) are counted, not kept.</p>",
            entry.summary.attempts.saturating_sub(kept)
        );
    }
    out
}

async fn take(
    cx: &Context<'_>,
    signed: &Signed<'_>,
    asked: &Asked<'_>,
    requeue: bool,
) -> Result<Response<String>, Error> {
    let by_filter = asked.get("scope") == Some("filter");
    let filter = filter_of(asked);
    let ids = if by_filter {
        cx.ops.dead_letters().await?.index.matching_ids(&filter)
    } else {
        asked.all("id")
    };
    let what = if requeue { "requeue" } else { "discard" };
    if ids.is_empty() {
        return Ok(message(
            cx,
            signed,
            StatusCode::BAD_REQUEST,
            "Nothing chosen",
            "Select at least one event, or use the buttons for everything that matches.",
            true,
        ));
    }
    if !requeue && asked.get("confirm") != Some("yes") {
        let mut fields: Vec<(&str, &str)> = asked
            .form
            .iter()
            .filter(|(n, _)| n != "csrf")
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        fields.push(("confirm", "yes"));
        let body = format!(
            "<p class=\"note bad\" role=\"alert\">Discard {} event(s) for good? They will not be processed, and this cannot be undone.</p><div class=\"actions\">{}<a href=\"{}/dead\">Cancel</a></div>",
            ids.len(),
            button_form(
                &format!("{}/discard", cx.base),
                &signed.csrf,
                &fields,
                &format!("Discard {} event(s)", ids.len()),
                "danger"
            ),
            cx.base
        );
        return Ok(html(StatusCode::OK, frame(cx, signed, "Discard?", &body)));
    }
    let detail = if by_filter {
        format!("filter {filter:?}")
    } else {
        format!("ids {}", ids.join(" "))
    };
    let taken = cx.ops.take_dead(ids, requeue).await?;
    cx.ops
        .audit(&AuditEntry::now(&signed.session.label, what, taken, detail))
        .await?;
    let done = if requeue {
        format!("Requeued {taken} event(s): the workers process them again.")
    } else {
        format!("Discarded {taken} event(s).")
    };
    Ok(message(cx, signed, StatusCode::OK, "Done", &done, false))
}

async fn retry_now(
    cx: &Context<'_>,
    signed: &Signed<'_>,
    asked: &Asked<'_>,
) -> Result<Response<String>, Error> {
    let id = asked.get("id").unwrap_or("");
    if !cx.ops.retry_now(id).await? {
        return Ok(message(
            cx,
            signed,
            StatusCode::NOT_FOUND,
            "Not waiting",
            "That event no longer waits for a retry.",
            true,
        ));
    }
    cx.ops
        .audit(&AuditEntry::now(
            &signed.session.label,
            "retry now",
            1,
            format!("id {id}"),
        ))
        .await?;
    Ok(message(
        cx,
        signed,
        StatusCode::OK,
        "Done",
        "Its next attempt is due now.",
        false,
    ))
}

async fn pause(
    cx: &Context<'_>,
    signed: &Signed<'_>,
    paused: bool,
) -> Result<Response<String>, Error> {
    cx.ops.set_paused(paused).await?;
    let what = if paused { "pause" } else { "resume" };
    cx.ops
        .audit(&AuditEntry::now(
            &signed.session.label,
            what,
            0,
            String::new(),
        ))
        .await?;
    let text = if paused {
        "Processing is paused: no worker takes a new event until it is resumed."
    } else {
        "Processing is resumed."
    };
    Ok(message(cx, signed, StatusCode::OK, "Done", text, false))
}

async fn audit(cx: &Context<'_>, signed: &Signed<'_>) -> Result<Response<String>, Error> {
    let entries = cx.ops.audit_log(200).await?;
    let mut body = String::from(
        "<table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">Who</th><th scope=\"col\">What</th><th scope=\"col\">Events</th><th scope=\"col\" class=\"wide\">Asked for</th></tr></thead><tbody>",
    );
    for e in &entries {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"wide\">{}</td></tr>",
            escape(&e.at),
            escape(&e.who),
            escape(&e.what),
            e.count,
            escape(&e.detail)
        );
    }
    body.push_str("</tbody></table>");
    if entries.is_empty() {
        body.push_str("<p>No action yet.</p>");
    }
    Ok(html(StatusCode::OK, frame(cx, signed, "Audit log", &body)))
}
