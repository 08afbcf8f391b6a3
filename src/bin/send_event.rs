//! Signs a Comapi event and POSTs it to a receiver, as Comapi would: test a receiver
//! without the Comapi portal.
//!
//! ```sh
//! COMAPI_WEBHOOK_SECRET=your-secret cargo run --release --features binaries --bin send_event -- [--url URL] [--file EVENT.json] [--as-is] [--curl]
//! ```
//!
//! Without `--file` it sends Comapi's documented `message.sent` example as a new
//! message: a fresh `eventId` and message id, raised now. `--file` sends a file's
//! event or batch as new events too: each gets a fresh `eventId` and the current
//! time as its `timestamp` (the repository's fixtures are dated 2017, which a
//! receiver's replay window would skip); `--as-is` sends the file byte for byte.
//! `--curl` also prints the equivalent `curl` command (use that for `https://` URLs,
//! which this small sender does not speak).

use std::process::ExitCode;

use comapi_webhook::{SIGNATURE_HEADER, Verifier};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SAMPLE: &str = include_str!("../../tests/fixtures/events/message_sent_sms.json");
const USAGE: &str =
    "usage: send_event [--url URL] [--secret SECRET] [--file EVENT.json] [--as-is] [--curl]
  --url     where to POST (default http://127.0.0.1:$PORT/, port 8080 without PORT)
  --secret  the shared secret (default: $COMAPI_WEBHOOK_SECRET; the primary if comma-separated)
  --file    a JSON event or batch to send, each event with a fresh eventId and
            timestamp (default: a sample message.sent event)
  --as-is   send the --file exactly as it is: its ids and its dates
  --curl    also print the equivalent curl command";

struct Args {
    url: String,
    secret: String,
    body: Vec<u8>,
    curl: bool,
}

/// The arguments, or `None` when asked for help.
fn parse_args() -> Result<Option<Args>, String> {
    let mut url = default_url()?;
    let mut secret = std::env::var("COMAPI_WEBHOOK_SECRET").ok();
    let mut file = None;
    let mut curl = false;
    let mut as_is = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => url = value()?,
            "--secret" => secret = Some(value()?),
            "--file" => file = Some(value()?),
            "--curl" => curl = true,
            "--as-is" => as_is = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let secret = secret
        .and_then(|s| s.split(',').next().map(|s| s.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .ok_or("no secret: pass --secret or set COMAPI_WEBHOOK_SECRET")?;
    let body = match file {
        Some(path) => {
            let body = std::fs::read(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
            if as_is {
                body
            } else {
                fresh(&body).map_err(|e| {
                    format!("{path}: {e} (send it with --as-is to keep it byte for byte)")
                })?
            }
        }
        None => sample_event().into_bytes(),
    };
    Ok(Some(Args {
        url,
        secret,
        body,
        curl,
    }))
}

/// `http://127.0.0.1:$PORT/`, the receivers' own default, on port 8080 without `PORT`.
fn default_url() -> Result<String, String> {
    match std::env::var("PORT") {
        Ok(port) if !port.trim().is_empty() => match port.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(format!("http://127.0.0.1:{port}/")),
            _ => Err(format!(
                "PORT={port:?} is not a port (1-65535); unset it or pass --url"
            )),
        },
        _ => Ok("http://127.0.0.1:8080/".to_owned()),
    }
}

/// Checks the URL before sending, so that a missing scheme or host gets a message
/// that says what to write rather than hyper's `UserAbsoluteUriRequired`.
fn check_url(url: &str) -> Result<http::Uri, String> {
    if !url.contains("://") {
        return Err(format!(
            "--url {url:?} has no scheme; write it as http://{}",
            url.trim_start_matches('/')
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--url {url:?} is not a URL ({e}); write it as http://host:port/"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(uri),
        Some("http") => Err(format!(
            "--url {url:?} has no host; write it as http://host:port/"
        )),
        Some(_) => Err(format!(
            "--url {url:?}: this sender speaks plain http:// only"
        )),
        None => Err(format!(
            "--url {url:?} has no scheme; write it as http://host:port/"
        )),
    }
}

/// What a refusal most likely means, said after the receiver's own answer.
fn hint(status: http::StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        401 => Some(
            "the receiver refused the signature: the secret used here (--secret, or \
             COMAPI_WEBHOOK_SECRET in this shell) is not the receiver's COMAPI_WEBHOOK_SECRET; \
             compare the two",
        ),
        400 => Some(
            "the receiver could not read an event id from the body; --file must hold a \
             Comapi event or an array of them",
        ),
        413 => Some("the body is larger than the receiver's COMAPI_MAX_BODY_BYTES"),
        503 => Some("the receiver could not store the event now; its log says why"),
        _ => None,
    }
}

/// Why a POST got no answer, in terms of what to check.
fn cause(error: &hyper_util::client::legacy::Error, url: &str) -> String {
    if error.is_connect() {
        let mut detail = String::new();
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            detail = inner.to_string();
            source = inner.source();
        }
        format!(
            "cannot connect to {url} ({detail}): is a receiver running there? \
             Start one, or pass the right --url (or PORT)"
        )
    } else {
        format!("{url} gave no HTTP answer: {error}")
    }
}

/// A uuid-shaped id unique to this run: `salt` tells apart two ids of one run.
fn unique_id(salt: u128) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let unique = (nanos ^ (u128::from(std::process::id()) << 64)).wrapping_add(salt << 100);
    let hex = format!("{unique:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The documented sample as a new message: a fresh `eventId` and message id, raised
/// now, so a receiver's gate takes every run as a new event rather than a retry or
/// an older state of the last run's message.
fn sample_event() -> String {
    let id = unique_id(0);
    let message_id = unique_id(1);
    // Raised now, so the receiver's replay window takes it as a new delivery.
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    SAMPLE
        .replacen("0dceaf0d-93ea-4314-a6f8-b0cffe69799a", &id, 1)
        .replace("e9f154c8-4011-493f-bb73-09cfcf8a1411", &message_id)
        .replacen(
            "\"timestamp\":\"2017-08-31T09:26:14.604Z\"",
            &format!("\"timestamp\":\"{now}\""),
            1,
        )
}

/// A file's event or batch as new events: each with a fresh `eventId` and raised
/// now, everything else as it is.
fn fresh(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let events = match &mut json {
        serde_json::Value::Array(events) => events.iter_mut().collect(),
        event => vec![event],
    };
    for (salt, event) in (0u128..).zip(events) {
        let serde_json::Value::Object(event) = event else {
            return Err("an event is not a JSON object".to_owned());
        };
        event.insert("eventId".to_owned(), unique_id(salt).into());
        event.insert("timestamp".to_owned(), now.clone().into());
    }
    serde_json::to_vec(&json).map_err(|e| e.to_string())
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            if !message.is_empty() {
                eprintln!("error: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let verifier = match Verifier::new(&args.secret) {
        Ok(verifier) => verifier,
        Err(error) => {
            eprintln!("error: secret: {error}");
            return ExitCode::from(2);
        }
    };
    let signature = verifier.sign(&args.body).to_string();
    if args.curl {
        println!(
            "curl -sS -X POST {} -H 'Content-Type: application/json' -H 'X-Comapi-Signature: {signature}' --data-binary {}",
            shell_quote(&args.url),
            shell_quote(&String::from_utf8_lossy(&args.body))
        );
    }
    if args.url.starts_with("https://") {
        if args.curl {
            eprintln!("error: this sender speaks plain http only; run the curl command above");
        } else {
            eprintln!(
                "error: this sender speaks plain http only; add --curl to print the equivalent curl command"
            );
        }
        return ExitCode::from(2);
    }
    let uri = match check_url(&args.url) {
        Ok(uri) => uri,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let request = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, &signature)
        .body(Full::new(Bytes::from(args.body)));
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            eprintln!("error: bad URL {:?}: {error}", args.url);
            return ExitCode::from(2);
        }
    };
    let client = Client::builder(TokioExecutor::new()).build_http();
    match client.request(request).await {
        Ok(response) => {
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            println!(
                "{} {}",
                status.as_u16(),
                String::from_utf8_lossy(&body).trim_end()
            );
            if status.is_success() {
                return ExitCode::SUCCESS;
            }
            if let Some(hint) = hint(status) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {}", cause(&error, &args.url));
            ExitCode::FAILURE
        }
    }
}
