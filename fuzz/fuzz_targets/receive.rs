//! The whole receive step (headers and body in, answer out) into a real spool:
//! never panics, always answers 200, 400, 401, 413 or 503, and 200 only when the
//! signature is valid for a configured secret.
#![no_main]

use std::sync::LazyLock;

use comapi_webhook::{Inbox, SIGNATURE_HEADER, Verifier};
use comapi_webhook::signature::Signature;
use comapi_webhook::store::spool::{Spool, SpoolConfig};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-0123456789";

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

static INBOX: LazyLock<Inbox> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("comapi-webhook-fuzz-{}", std::process::id()));
    let (spool, _) = Spool::open(&SpoolConfig::new(dir)).expect("spool");
    Inbox::new(Verifier::new(SECRET).expect("valid"), spool).with_max_body_bytes(64 * 1024)
});

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    sign: bool,
}

fuzz_target!(|input: Input| {
    let verifier = Verifier::new(SECRET).expect("valid");
    let mut headers = HeaderMap::new();
    if input.sign {
        let value = verifier.sign(&input.body).to_string();
        headers.append(
            SIGNATURE_HEADER,
            HeaderValue::from_str(&value).expect("hex"),
        );
    }
    for (name, value) in &input.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let reply = RUNTIME.block_on(INBOX.receive(&headers, &input.body));
    let status = reply.status().as_u16();
    assert!(
        matches!(status, 200 | 400 | 401 | 413 | 503),
        "status {status}"
    );
    if status == 200 {
        let mut values = headers.get_all(SIGNATURE_HEADER).iter();
        let value = values.next().expect("signed");
        assert!(values.next().is_none());
        let signature = Signature::parse(value.as_bytes()).expect("parses");
        assert!(
            signature == verifier.sign(&input.body),
            "200 without a valid signature"
        );
    }
});
