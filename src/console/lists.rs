//! The console's lists: the dead letter and the retry schedule, their filter
//! (event name, error text, received-time window), rows and paging.

use std::fmt::Write;

use http::{Response, StatusCode};

use super::html::{button_form, csrf_field, escape, url_encode};
use super::model::{Filter, Index, Page, Summary};
use super::pages::{Context, Signed, frame};
use super::{Asked, html};
use crate::Error;

/// The filter a list's form (or an action's hidden fields) gives.
pub(super) fn filter_of(asked: &Asked<'_>) -> Filter {
    let text = |name| {
        asked
            .get(name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Filter {
        name: text("name"),
        error: text("error"),
        from_ms: text("from").and_then(|t| parse_time(&t)),
        to_ms: text("to").and_then(|t| parse_time(&t)),
    }
}

/// A `datetime-local` value (UTC), or RFC 3339, as ms since the Unix epoch.
fn parse_time(text: &str) -> Option<u64> {
    let full = match text.len() {
        16 => format!("{text}:00Z"),
        19 => format!("{text}Z"),
        _ => text.to_owned(),
    };
    humantime::parse_rfc3339_weak(&full).ok().map(super::millis)
}

/// The filter's fields, as they were typed, for links and hidden fields.
pub(super) fn filter_fields<'a>(asked: &'a Asked<'_>) -> Vec<(&'static str, &'a str)> {
    ["name", "error", "from", "to"]
        .into_iter()
        .filter_map(|n| {
            asked
                .get(n)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (n, v))
        })
        .collect()
}

fn filter_form(cx: &Context<'_>, asked: &Asked<'_>, list: &str, names: &Index) -> String {
    let value = |n| escape(asked.get(n).unwrap_or(""));
    let chosen = asked.get("name").unwrap_or("");
    let mut options = String::from("<option value=\"\">any</option>");
    for (name, n) in names.by_name() {
        let selected = if name == chosen { " selected" } else { "" };
        let _ = write!(
            options,
            "<option value=\"{}\"{selected}>{} ({n})</option>",
            escape(&name),
            escape(&name)
        );
    }
    format!(
        "<form class=\"filter\" method=\"get\" action=\"{b}/{list}\">\
         <label for=\"f-name\">Event name<select id=\"f-name\" name=\"name\">{options}</select></label>\
         <label for=\"f-error\">Error contains<input type=\"text\" id=\"f-error\" name=\"error\" value=\"{}\"></label>\
         <label for=\"f-from\">Received from (UTC)<input type=\"datetime-local\" id=\"f-from\" name=\"from\" value=\"{}\"></label>\
         <label for=\"f-to\">Received before (UTC)<input type=\"datetime-local\" id=\"f-to\" name=\"to\" value=\"{}\"></label>\
         <button type=\"submit\">Filter</button> <a href=\"{b}/{list}\">Clear</a></form>",
        value("error"),
        value("from"),
        value("to"),
        b = cx.base,
    )
}

fn rows(cx: &Context<'_>, items: &[Summary], list: &str, select: bool, at: &str) -> String {
    let mut out = format!(
        "<table><thead><tr>{}<th scope=\"col\">Event name</th><th scope=\"col\" class=\"wide\">Event id</th><th scope=\"col\">Attempts</th><th scope=\"col\">Last error</th><th scope=\"col\" class=\"wide\">{at}</th><th scope=\"col\" class=\"wide\">Received</th></tr></thead><tbody>",
        if select {
            "<th scope=\"col\">Select</th>"
        } else {
            ""
        }
    );
    for s in items {
        let id = escape(&s.id);
        let check = if select {
            format!(
                "<td><input type=\"checkbox\" name=\"id\" value=\"{id}\" aria-label=\"select {}\"></td>",
                escape(&s.event_id)
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr>{check}<td><a href=\"{}/{list}/{}\">{}</a></td><td class=\"wide\">{}</td><td>{}</td><td class=\"text\">{}</td><td class=\"wide\">{}</td><td class=\"wide\">{}</td></tr>",
            cx.base,
            url_encode(&s.id),
            escape(&s.name),
            escape(&s.event_id),
            s.attempts,
            escape(&s.error),
            escape(&s.at),
            escape(&s.received())
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn older_link(cx: &Context<'_>, asked: &Asked<'_>, list: &str, next: Option<u128>) -> String {
    let Some(next) = next else {
        return String::new();
    };
    let mut query = String::new();
    for (name, value) in filter_fields(asked) {
        let _ = write!(query, "{name}={}&", url_encode(value));
    }
    format!(
        "<p><a href=\"{}/{list}?{query}before={next}\" rel=\"next\">Older →</a></p>",
        cx.base
    )
}

/// The page of `index` the request asks for (its filter and cursor), and the
/// filter's form above it.
fn list_head(cx: &Context<'_>, asked: &Asked<'_>, list: &str, index: &Index) -> (Page, String) {
    let before = asked.get("before").and_then(|b| b.parse().ok());
    let page = index.page(&filter_of(asked), before);
    (page, filter_form(cx, asked, list, index))
}

pub(super) async fn dead_list(
    cx: &Context<'_>,
    signed: &Signed<'_>,
    asked: &Asked<'_>,
) -> Result<Response<String>, Error> {
    let (page_of, mut body) = {
        let cache = cx.ops.dead_letters().await?;
        list_head(cx, asked, "dead", &cache.index)
    };
    let _ = write!(
        body,
        "<p id=\"matching\">{} dead letter(s) match.</p>",
        page_of.matching
    );
    let operator = signed.operator() && !page_of.items.is_empty();
    if operator {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"{}/requeue\">{}",
            cx.base,
            csrf_field(&signed.csrf)
        );
    }
    body.push_str(&rows(cx, &page_of.items, "dead", operator, "Dead at"));
    if operator {
        let _ = write!(
            body,
            "<div class=\"actions\"><button type=\"submit\" class=\"primary\">Requeue selected</button>\
             <button type=\"submit\" class=\"danger\" formaction=\"{}/discard\">Discard selected…</button></div></form>",
            cx.base
        );
    }
    body.push_str(&older_link(cx, asked, "dead", page_of.next));
    if operator {
        let mut fields = filter_fields(asked);
        fields.push(("scope", "filter"));
        let n = page_of.matching;
        body.push_str("<div class=\"actions\">");
        body.push_str(&button_form(
            &format!("{}/requeue", cx.base),
            &signed.csrf,
            &fields,
            &format!("Requeue all {n} matching"),
            "",
        ));
        body.push_str(&button_form(
            &format!("{}/discard", cx.base),
            &signed.csrf,
            &fields,
            &format!("Discard all {n} matching…"),
            "danger",
        ));
        body.push_str("</div>");
    }
    Ok(html(
        StatusCode::OK,
        frame(cx, signed, "Dead letters", &body),
    ))
}

pub(super) async fn retry_list(
    cx: &Context<'_>,
    signed: &Signed<'_>,
    asked: &Asked<'_>,
) -> Result<Response<String>, Error> {
    let (index, _) = cx.ops.retries().await?;
    let (page_of, mut body) = list_head(cx, asked, "retries", &index);
    let _ = write!(
        body,
        "<p id=\"matching\">{} retry(ies) match, first due first.</p>",
        page_of.matching
    );
    body.push_str(&rows(
        cx,
        &page_of.items,
        "retries",
        false,
        "Next attempt due",
    ));
    body.push_str(&older_link(cx, asked, "retries", page_of.next));
    Ok(html(
        StatusCode::OK,
        frame(cx, signed, "Waiting for a retry", &body),
    ))
}
