//! The console through `Console::handle` on a real spool, without a browser:
//! who gets in, what a form needs, and what the actions do to the spool's files.
//! (`tests/console.rs` drives the same pages in a real Chromium.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/mod.rs"]
mod support;

use comapi_webhook::console::{Console, ConsoleAccess, MAX_FORM_BYTES, Role};
use comapi_webhook::store::spool::{Spool, SpoolConfig};
use http::{Request, Response};

const OPERATOR: &str = "operator-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789";

fn access() -> ConsoleAccess {
    ConsoleAccess::new()
        .with_token("ops", Role::Operator, OPERATOR)
        .unwrap()
        .with_token("viewer", Role::Viewer, VIEWER)
        .unwrap()
}

async fn get(console: &Console, path: &str, cookie: &str) -> Response<String> {
    let request = Request::get(path)
        .header("cookie", cookie)
        .body(Vec::new())
        .unwrap();
    console.handle(&request).await
}

async fn post(console: &Console, path: &str, cookie: &str, form: &str) -> Response<String> {
    let request = Request::post(path)
        .header("cookie", cookie)
        .body(form.as_bytes().to_vec())
        .unwrap();
    console.handle(&request).await
}

/// Signs in with `token`: the cookie to send, and the CSRF token of its forms.
async fn sign_in(console: &Console, token: &str) -> (String, String) {
    let response = post(console, "/console/sign-in", "", &format!("token={token}")).await;
    assert_eq!(response.status(), 303);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = get(console, "/console", &cookie).await.into_body();
    (cookie, support::csrf_of(&page))
}

/// A dead letter as the worker writes it, for event `id`.
fn dead_line(id: &str, name: &str) -> String {
    format!(
        r#"{{"deadAt":"2026-12-05T00:00:00.000Z","attempts":3,"error":"db down","delivery":"spool:1:0","history":[],"record":{{"receivedAt":"2026-12-05T00:00:00.000Z","secretIndex":0,"event":{{"eventId":"{id}","name":"{name}","payload":{{}},"timestamp":"2026-12-05T00:00:00.000Z"}}}}}}"#
    ) + "\n"
}

fn dead_ids(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("dead-letter.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            l.split("\"eventId\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn without_a_token_the_console_is_not_there() {
    let dir = support::temp_dir("console-off");
    let (spool, _) = Spool::open(&SpoolConfig::new(&*dir)).unwrap();
    let console = Console::new(spool.clone(), ConsoleAccess::new());
    assert!(!console.is_enabled());
    for path in ["/console", "/console/dead", "/console/sign-in"] {
        assert_eq!(get(&console, path, "").await.status(), 404, "{path}");
    }
    assert_eq!(
        post(&console, "/console/sign-in", "", "token=x")
            .await
            .status(),
        404
    );
    spool.close().await;
}

#[tokio::test]
async fn sign_in_cookies_csrf_and_roles() {
    let dir = support::temp_dir("console-access");
    let (spool, _) = Spool::open(&SpoolConfig::new(&*dir)).unwrap();
    let console = Console::new(spool.clone(), access());

    // Not signed in: the sign-in page, and 401 for any other page.
    let page = get(&console, "/console", "").await;
    assert_eq!(page.status(), 200);
    assert!(page.body().contains("Sign in"));
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    assert_eq!(get(&console, "/console/dead", "").await.status(), 401);
    assert_eq!(
        get(&console, "/console/dead", "comapi_console=0.99999999999.00")
            .await
            .status(),
        401
    );
    let wrong = post(
        &console,
        "/console/sign-in",
        "",
        "token=operator-token-012345678",
    )
    .await;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    // The cookie's flags; Secure behind a proxy that says HTTPS.
    let right = post(
        &console,
        "/console/sign-in",
        "",
        &format!("token={OPERATOR}"),
    )
    .await;
    let flags = right.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        flags.contains("; HttpOnly")
            && flags.contains("; SameSite=Strict")
            && flags.contains("; Path=/console")
    );
    assert!(!flags.contains("Secure"));
    let request = Request::post("/console/sign-in")
        .header("x-forwarded-proto", "https")
        .body(format!("token={OPERATOR}").into_bytes())
        .unwrap();
    assert!(
        console.handle(&request).await.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .ends_with("; Secure")
    );

    // A form without its CSRF token, or with another session's, changes nothing.
    let (cookie, csrf) = sign_in(&console, OPERATOR).await;
    let (viewer_cookie, viewer_csrf) = sign_in(&console, VIEWER).await;
    assert_eq!(
        post(&console, "/console/pause", &cookie, "").await.status(),
        403
    );
    assert_eq!(
        post(
            &console,
            "/console/pause",
            &cookie,
            &format!("csrf={viewer_csrf}")
        )
        .await
        .status(),
        403
    );
    assert!(!spool.paused());

    // The viewer sees, and cannot act even with its own CSRF token.
    assert_eq!(
        get(&console, "/console/dead", &viewer_cookie)
            .await
            .status(),
        200
    );
    let refused = post(
        &console,
        "/console/pause",
        &viewer_cookie,
        &format!("csrf={viewer_csrf}"),
    )
    .await;
    assert_eq!(refused.status(), 403);
    assert!(refused.body().contains("can look but not act"));
    assert!(!spool.paused());

    // The operator pauses: kept in the folder, written to the audit log.
    let paused = post(&console, "/console/pause", &cookie, &format!("csrf={csrf}")).await;
    assert_eq!(paused.status(), 200, "{}", paused.body());
    assert!(spool.paused() && dir.join("paused").exists());
    assert!(
        get(&console, "/console/audit", &cookie)
            .await
            .body()
            .contains("<td>ops</td><td>pause</td>")
    );
    post(
        &console,
        "/console/resume",
        &cookie,
        &format!("csrf={csrf}"),
    )
    .await;
    assert!(!spool.paused() && !dir.join("paused").exists());

    // Too large a form.
    let big = "a".repeat(MAX_FORM_BYTES + 1);
    assert_eq!(
        post(&console, "/console/pause", &cookie, &big)
            .await
            .status(),
        413
    );
    spool.close().await;
}

#[tokio::test]
async fn requeue_and_discard_change_the_spool_as_asked() {
    let dir = support::temp_dir("console-actions");
    let (spool, _) = Spool::open(&SpoolConfig::new(&*dir)).unwrap();
    let lines: String = [
        ("a", "message.sent"),
        ("b", "message.read"),
        ("c", "message.read"),
        ("d", "message.sent"),
    ]
    .iter()
    .map(|(id, name)| dead_line(id, name))
    .collect();
    std::fs::write(dir.join("dead-letter.jsonl"), lines).unwrap();
    let console = Console::new(spool.clone(), access());
    let (cookie, csrf) = sign_in(&console, OPERATOR).await;

    // The list, filtered; each row's id is what the forms send.
    let list = get(&console, "/console/dead?name=message.read", &cookie)
        .await
        .into_body();
    assert!(list.contains("2 dead letter(s) match."), "{list}");
    let ids: Vec<String> = list
        .split("name=\"id\" value=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2);

    // Requeue one: appended to the spool as a new event, gone from the dead letter.
    let before = spool.stored();
    let done = post(
        &console,
        "/console/requeue",
        &cookie,
        &format!("csrf={csrf}&id={}", ids[0]),
    )
    .await;
    assert!(
        done.body().contains("Requeued 1 event(s)"),
        "{}",
        done.body()
    );
    assert_eq!(spool.stored(), before + 1);
    // The list goes newest first: "c" was the first row.
    assert_eq!(dead_ids(&dir), ["a", "b", "d"]);

    // Discard by filter: a confirmation first, which changes nothing.
    let form = format!("csrf={csrf}&scope=filter&name=message.sent");
    let confirm = post(&console, "/console/discard", &cookie, &form).await;
    assert!(
        confirm.body().contains("Discard 2 event(s) for good?"),
        "{}",
        confirm.body()
    );
    assert_eq!(dead_ids(&dir), ["a", "b", "d"]);
    let done = post(
        &console,
        "/console/discard",
        &cookie,
        &format!("{form}&confirm=yes"),
    )
    .await;
    assert!(
        done.body().contains("Discarded 2 event(s)."),
        "{}",
        done.body()
    );
    assert_eq!(dead_ids(&dir), ["b"]);
    assert_eq!(spool.stored(), before + 1);

    // The audit log has both, newest first.
    let audit = get(&console, "/console/audit", &cookie).await.into_body();
    let discard = audit.find("<td>discard</td><td>2</td>").unwrap();
    let requeue = audit.find("<td>requeue</td><td>1</td>").unwrap();
    assert!(discard < requeue, "{audit}");
    spool.close().await;
}
