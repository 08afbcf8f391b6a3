//! `Verifier::verify` with arbitrary header values and body: never panics, and
//! succeeds only for exactly one header carrying the body's true signature.
#![no_main]

use std::sync::LazyLock;

use comapi_webhook::{SIGNATURE_HEADER, Verifier};
use comapi_webhook::signature::Signature;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    Verifier::with_secrets(["fuzz-secret-0123456789", "fuzz-previous-0123456789"]).expect("valid")
});

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    values: Vec<Vec<u8>>,
    body: Vec<u8>,
    sign_first: bool,
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    let mut values = input.values;
    if input.sign_first {
        values.insert(0, VERIFIER.sign(&input.body).to_string().into_bytes());
    }
    for value in &values {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(SIGNATURE_HEADER, value);
        }
    }
    let result = VERIFIER.verify(&headers, &input.body);
    if result.is_ok() {
        let mut all = headers.get_all(SIGNATURE_HEADER).iter();
        let only = all.next().expect("a header was there");
        assert!(all.next().is_none(), "verified with a duplicate header");
        let parsed = Signature::parse(only.as_bytes()).expect("a verified header parses");
        let primary = VERIFIER.sign(&input.body);
        let previous = Verifier::new("fuzz-previous-0123456789")
            .expect("valid")
            .sign(&input.body);
        assert!(
            parsed == primary || parsed == previous,
            "verified a wrong signature"
        );
    }
});
