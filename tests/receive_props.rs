//! Property checks on the receive step: arbitrary header sets (duplicated, missing,
//! odd-cased signature headers) and arbitrary bodies never panic, always get 200,
//! 400, 401, 413 or 503, and get 200 only with a valid signature.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use comapi_webhook::signature::Signature;
use comapi_webhook::store::spool::{Spool, SpoolConfig};
use comapi_webhook::{Inbox, SIGNATURE_HEADER, Verifier};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use support::{runtime, temp_dir};

const SECRET: &str = "the-current-secret-0123456789";
const PREVIOUS: &str = "the-previous-secret-0123456789";

fn body() -> impl Strategy<Value = Vec<u8>> {
    let event = r#"{"eventId":"e-1","name":"message.sent","payload":{"id":"m"},"revision":1}"#;
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        Just(event.as_bytes().to_vec()),
        Just(format!("[{event},{event}]").into_bytes()),
        "[\\[\\]{}\",:a-z0-9 ]{0,200}".prop_map(String::into_bytes),
        Just(vec![b' '; 5000]),
    ]
}

/// What goes into the signature header: a right or wrong signature, junk, in any case.
#[derive(Debug, Clone)]
enum Value {
    Right(usize),
    Junk(Vec<u8>),
    Upper,
}

fn headers() -> impl Strategy<Value = Vec<(String, Value)>> {
    let name = prop_oneof![
        Just("x-comapi-signature".to_owned()),
        Just("X-Comapi-Signature".to_owned()),
        Just("X-COMAPI-SIGNATURE".to_owned()),
        Just("content-type".to_owned()),
        "x-[a-z]{1,8}",
    ];
    let value = prop_oneof![
        (0usize..3).prop_map(Value::Right),
        proptest::collection::vec(any::<u8>(), 0..60).prop_map(Value::Junk),
        Just(Value::Upper),
    ];
    proptest::collection::vec((name, value), 0..4)
}

#[test]
fn the_receive_step_answers_sensibly() {
    let dir = temp_dir("receive-props");
    let rt = runtime();
    let (spool, _) = Spool::open(&SpoolConfig::new(dir.to_path_buf())).unwrap();
    let inbox = Inbox::new(Verifier::with_secrets([SECRET, PREVIOUS]).unwrap(), spool)
        .with_max_body_bytes(4096);
    let mut runner = TestRunner::new(ProptestConfig::default());
    let outcome = runner.run(&(headers(), body()), |(headers, body)| {
        let secrets = [SECRET, PREVIOUS, "a-wrong-secret-0123456789"];
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            let bytes = match value {
                Value::Right(i) => Verifier::new(secrets[*i])
                    .unwrap()
                    .sign(&body)
                    .to_string()
                    .into_bytes(),
                Value::Upper => Verifier::new(SECRET)
                    .unwrap()
                    .sign(&body)
                    .to_string()
                    .to_uppercase()
                    .into_bytes(),
                Value::Junk(bytes) => bytes.clone(),
            };
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(&bytes),
            ) {
                map.append(name, value);
            }
        }
        let reply = rt.block_on(inbox.receive(&map, &body));
        let status = reply.status().as_u16();
        prop_assert!(
            matches!(status, 200 | 400 | 401 | 413 | 503),
            "status {}",
            status
        );
        if status == 200 {
            let values: Vec<&HeaderValue> = map.get_all(SIGNATURE_HEADER).iter().collect();
            prop_assert_eq!(values.len(), 1);
            let signature = Signature::parse(values[0].as_bytes()).unwrap();
            let valid = [SECRET, PREVIOUS]
                .iter()
                .any(|s| Verifier::new(s).unwrap().sign(&body) == signature);
            prop_assert!(valid, "200 without a valid signature");
        }
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

/// Valid JSON whose ignored payload string is not UTF-8: a 400, never a 200 that
/// stores a mangled or empty event.
#[test]
fn a_body_that_is_not_utf8_is_refused_single_or_batch() {
    let event = b"{\"eventId\":\"e-1\",\"name\":\"message.sent\",\"payload\":{\"id\":\"m\",\"note\":\"\xff\"},\"revision\":1}";
    let batch = [&b"["[..], event, b"]"].concat();
    let dir = temp_dir("not-utf8");
    let (spool, _) = Spool::open(&SpoolConfig::new(dir.to_path_buf())).unwrap();
    let inbox = Inbox::new(Verifier::new(SECRET).unwrap(), spool);
    let rt = runtime();
    for body in [event.to_vec(), batch] {
        let mut headers = HeaderMap::new();
        let signature = Verifier::new(SECRET).unwrap().sign(&body).to_string();
        headers.insert(SIGNATURE_HEADER, HeaderValue::from_str(&signature).unwrap());
        let reply = rt.block_on(inbox.receive(&headers, &body));
        assert_eq!(reply.status().as_u16(), 400, "{}", reply.body());
        assert!(
            reply.body().contains("UTF-8") || reply.body().contains("unicode"),
            "{}",
            reply.body()
        );
    }
    assert_eq!(inbox.store().stored(), 0, "nothing stored");
}
