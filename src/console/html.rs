//! The console's HTML: escaping, the page frame, forms, and the per-minute chart
//! as inline SVG. No script, no outside asset: every page is plain HTML forms.

use std::fmt::Write;

use crate::metrics::Minute;

/// `text` with `& < > " '` escaped, for an element's text or an attribute value.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// `text` percent-encoded for a URL's query or path part.
pub(crate) fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

const STYLE: &str = "
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header{background:#23395d;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:.4rem 1.2rem;align-items:center}
header a{color:#fff}
header form{margin-left:auto}
main{padding:1rem;max-width:70rem}
h1{font-size:1.35rem;margin:.2rem 0 1rem}
h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #ddd;vertical-align:top;overflow-wrap:break-word}
td.text{overflow-wrap:anywhere;min-width:8rem}
.counts td:last-child,.counts th:last-child{text-align:right}
form.filter{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:end;margin:.5rem 0 1rem}
label{display:flex;flex-direction:column;font-size:.85rem}
input[type=text],input[type=password],input[type=datetime-local]{font:inherit;padding:.3rem;min-width:11rem}
button{font:inherit;padding:.35rem .8rem;border:1px solid #23395d;background:#fff;color:#23395d;border-radius:3px;cursor:pointer}
button.primary{background:#23395d;color:#fff}
button.danger{border-color:#a4262c;color:#a4262c}
:focus-visible{outline:3px solid #f0a000;outline-offset:2px}
.note{padding:.6rem .8rem;border-left:4px solid #23395d;background:#eef2f8;margin:0 0 1rem}
.note.bad{border-color:#a4262c;background:#fbeeee}
.paused{display:inline-block;padding:.1rem .5rem;background:#a4262c;color:#fff;border-radius:3px}
pre{background:#fff;border:1px solid #ddd;padding:.6rem;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
.actions{display:flex;flex-wrap:wrap;gap:.5rem;margin:.6rem 0}
.chart{max-width:40rem;width:100%;height:auto;background:#fff;border:1px solid #ddd}
.legend span{margin-right:1rem}
@media (max-width:40rem){th.wide,td.wide{display:none}main{padding:.6rem}}
";

/// A whole page: `title`, the navigation (when signed in, with the sign-out
/// form carrying `csrf`), then `body`.
pub(crate) fn page(base: &str, title: &str, signed_in: Option<(&str, &str)>, body: &str) -> String {
    let mut nav = String::new();
    if let Some((label, csrf)) = signed_in {
        let _ = write!(
            nav,
            "<nav aria-label=\"console\"><a href=\"{base}\">Overview</a> · <a href=\"{base}/dead\">Dead letters</a> · \
             <a href=\"{base}/retries\">Retries</a> · <a href=\"{base}/audit\">Audit log</a></nav>\
             <form method=\"post\" action=\"{base}/sign-out\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <span>{}</span> <button type=\"submit\">Sign out</button></form>",
            escape(label)
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · comapi-webhook console</title><style>{STYLE}</style></head>\
         <body><header><strong>comapi-webhook console</strong>{nav}</header><main><h1>{}</h1>{body}</main></body></html>",
        escape(title),
        escape(title)
    )
}

/// A hidden CSRF field.
pub(crate) fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    )
}

/// A form of one button that posts `fields` to `action`.
pub(crate) fn button_form(
    action: &str,
    csrf: &str,
    fields: &[(&str, &str)],
    label: &str,
    class: &str,
) -> String {
    let mut hidden = csrf_field(csrf);
    for (name, value) in fields {
        let _ = write!(
            hidden,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            escape(name),
            escape(value)
        );
    }
    format!(
        "<form method=\"post\" action=\"{action}\">{hidden}<button type=\"submit\" class=\"{class}\">{}</button></form>",
        escape(label)
    )
}

/// Processed, failed and dead-lettered per minute as a line chart, with a text
/// alternative.
pub(crate) fn chart(minutes: &[Minute]) -> String {
    const W: usize = 600;
    const H: usize = 160;
    const PAD: usize = 24;
    let top = minutes
        .iter()
        .map(|m| m.processed.max(m.failed).max(m.dead_lettered))
        .max()
        .unwrap_or(0)
        .max(1);
    let steps = minutes.len().saturating_sub(1).max(1);
    let line = |pick: fn(&Minute) -> u64| -> String {
        let mut points = String::new();
        for (i, minute) in minutes.iter().enumerate() {
            let x = PAD + i * (W - 2 * PAD) / steps;
            #[allow(clippy::cast_possible_truncation)]
            let y = H - PAD - (pick(minute).min(top) * (H - 2 * PAD) as u64 / top) as usize;
            let _ = write!(points, "{x},{y} ");
        }
        points
    };
    let sum = |pick: fn(&Minute) -> u64| minutes.iter().map(pick).sum::<u64>();
    let (processed, failed, dead) = (
        sum(|m| m.processed),
        sum(|m| m.failed),
        sum(|m| m.dead_lettered),
    );
    format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-labelledby=\"chart-title\">\
         <title id=\"chart-title\">Last hour, per minute: {processed} processed, {failed} failed, {dead} dead-lettered</title>\
         <line x1=\"{PAD}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#999\"/>\
         <text x=\"2\" y=\"{ty}\" font-size=\"11\">{top}</text><text x=\"2\" y=\"{y0}\" font-size=\"11\">0</text>\
         <text x=\"{PAD}\" y=\"{H}\" font-size=\"11\" dy=\"-4\">60 min ago</text>\
         <text x=\"{x1}\" y=\"{H}\" font-size=\"11\" dy=\"-4\" text-anchor=\"end\">now</text>\
         <polyline fill=\"none\" stroke=\"#2a7a2a\" stroke-width=\"2\" points=\"{}\"/>\
         <polyline fill=\"none\" stroke=\"#d08000\" stroke-width=\"2\" points=\"{}\"/>\
         <polyline fill=\"none\" stroke=\"#a4262c\" stroke-width=\"2\" points=\"{}\"/></svg>\
         <p class=\"legend\"><span style=\"color:#2a7a2a\">■ processed {processed}</span>\
         <span style=\"color:#d08000\">■ failed {failed}</span><span style=\"color:#a4262c\">■ dead-lettered {dead}</span></p>",
        line(|m| m.processed),
        line(|m| m.failed),
        line(|m| m.dead_lettered),
        y0 = H - PAD,
        x1 = W - PAD,
        ty = PAD,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_urls_are_escaped() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(url_encode("message.sent a/é"), "message.sent%20a%2F%C3%A9");
    }

    #[test]
    fn the_chart_is_svg_with_its_totals_in_words() {
        let minutes: Vec<Minute> = (0..60)
            .map(|i| Minute {
                minute: i,
                processed: i,
                failed: 1,
                dead_lettered: 0,
            })
            .collect();
        let svg = chart(&minutes);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("1770 processed, 60 failed, 0 dead-lettered"));
        assert_eq!(svg.matches("<polyline").count(), 3);
    }
}
