//! The references for `scripts/loadtest.sh`: bare hyper 1.x servers that read each
//! request body and answer 200, to show what this machine's HTTP stack can do.
//!
//! - By default (`CEILING=bare`) it stores, verifies and parses nothing: the HTTP
//!   ceiling the receivers are compared with.
//! - With `CEILING=verify` and `COMAPI_WEBHOOK_SECRET` set, it also verifies and
//!   parses each body as the receivers do (401 and 400 as they answer), and still
//!   stores nothing. Between it and the bare ceiling lies the cost of verifying and
//!   parsing; between it and the receivers, the cost of the durable spool.
//!
//! Not a receiver: never point Comapi at it. It acknowledges events it does not keep.

use std::convert::Infallible;

use comapi_webhook::Verifier;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == "--help" || a == "-h")
    {
        println!(
            "http_ceiling: a bare hyper server for the load test's reference (stores nothing)\n\n\
             Settings, from the environment:\n  \
             PORT                   where to listen on 127.0.0.1 (default 8080)\n  \
             CEILING                bare (default) or verify\n  \
             COMAPI_WEBHOOK_SECRET  the secret, for CEILING=verify"
        );
        return;
    }
    let verifier = match verifier_from_env() {
        Ok(verifier) => verifier,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on 127.0.0.1:{port}: {error}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("listening on http://{addr}"),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let verifier = verifier.clone();
        tokio::spawn(async move {
            let service = service_fn(|request| answer(verifier.as_ref(), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `None` for the bare ceiling; the verifier for `CEILING=verify`.
fn verifier_from_env() -> Result<Option<Verifier>, String> {
    match std::env::var("CEILING").as_deref() {
        Err(_) | Ok("" | "bare") => Ok(None),
        Ok("verify") => {
            let secret = std::env::var("COMAPI_WEBHOOK_SECRET")
                .map_err(|_| "CEILING=verify needs COMAPI_WEBHOOK_SECRET".to_owned())?;
            Verifier::new(secret.trim())
                .map(Some)
                .map_err(|e| format!("COMAPI_WEBHOOK_SECRET: {e}"))
        }
        Ok(other) => Err(format!("CEILING must be bare or verify, not {other:?}")),
    }
}

async fn answer(
    verifier: Option<&Verifier>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(verifier) = verifier else {
        let _ = request.into_body().collect().await;
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))));
    };
    let (parts, body) = request.into_parts();
    let (status, text): (_, &'static [u8]) = match body.collect().await {
        Err(_) => (StatusCode::BAD_REQUEST, b"cannot read the request body\n"),
        Ok(body) => match verifier.verify_events(&parts.headers, &body.to_bytes()) {
            Ok(_) => (StatusCode::OK, b"ok\n"),
            Err(error) => (error.status(), b"rejected\n"),
        },
    };
    let mut response = Response::new(Full::new(Bytes::from_static(text)));
    *response.status_mut() = status;
    Ok(response)
}
