//! Known answers, the negative matrix, rotation and properties of `Verifier`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use comapi_webhook::signature::{MIN_SECRET_LEN, Signature};
use comapi_webhook::{Error, SIGNATURE_HEADER, Verifier};
use hmac::{KeyInit, Mac};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

const SECRET: &str = "a-comapi-webhook-secret-of-36-chars!";
const BODY: &[u8] = br#"{"eventId":"0dceaf0d","name":"message.sent"}"#;

fn headers_with(values: &[&[u8]]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for value in values {
        headers.append(
            SIGNATURE_HEADER,
            HeaderValue::from_bytes(value).expect("valid header bytes"),
        );
    }
    headers
}

fn hmac_crate(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// RFC 2202, section 3: HMAC-SHA1 test cases 1 to 7 as (key, data, digest).
fn rfc2202() -> Vec<(Vec<u8>, Vec<u8>, &'static str)> {
    vec![
        (
            vec![0x0b; 20],
            b"Hi There".to_vec(),
            "b617318655057264e28bc0b6fb378c8ef146be00",
        ),
        (
            b"Jefe".to_vec(),
            b"what do ya want for nothing?".to_vec(),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79",
        ),
        (
            vec![0xaa; 20],
            vec![0xdd; 50],
            "125d7342b9ac11cd91a39af48aa17b4f63f175d3",
        ),
        (
            (1..=25).collect(),
            vec![0xcd; 50],
            "4c9007f4026250c6bc8414f9bf50c86c2d7235da",
        ),
        (
            vec![0x0c; 20],
            b"Test With Truncation".to_vec(),
            "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04",
        ),
        (
            vec![0xaa; 80],
            b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
            "aa4ae5e15272d00e95705637ce8a3b55ed402112",
        ),
        (
            vec![0xaa; 80],
            b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data".to_vec(),
            "e8e99d0f45237d786d6bbaa7965c7808bbff1a91",
        ),
    ]
}

#[test]
fn rfc2202_test_cases_1_to_7() {
    for (case, (key, data, digest)) in rfc2202().into_iter().enumerate() {
        let verifier = Verifier::new_allowing_short_secret(&key).expect("non-empty key");
        assert_eq!(
            verifier.sign(&data).to_string(),
            digest,
            "RFC 2202 case {}",
            case + 1
        );
        let verified = verifier.verify(&headers_with(&[digest.as_bytes()]), &data);
        assert!(verified.is_ok(), "RFC 2202 case {} verifies", case + 1);
    }
}

#[test]
fn python_hmac_vectors() {
    let fixture = include_str!("fixtures/hmac_sha1_vectors.txt");
    let mut checked = 0;
    for line in fixture.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(' ').collect();
        let [secret, body, expected] = fields[..] else {
            panic!("bad fixture line {line:?}");
        };
        let secret = hex::decode(secret).expect("hex secret");
        let body = if body == "-" {
            Vec::new()
        } else {
            hex::decode(body).expect("hex body")
        };
        let verifier = Verifier::new(&secret).expect("fixture secrets are long enough");
        assert_eq!(
            verifier.sign(&body).to_string(),
            expected,
            "secret {} bytes, body {} bytes",
            secret.len(),
            body.len()
        );
        assert!(
            verifier
                .verify(&headers_with(&[expected.as_bytes()]), &body)
                .is_ok()
        );
        checked += 1;
    }
    assert_eq!(checked, 61, "every vector of the fixture was checked");
}

#[test]
fn secrets_are_validated() {
    assert_eq!(Verifier::new("").unwrap_err(), Error::EmptySecret);
    assert_eq!(
        Verifier::new("Jefe").unwrap_err(),
        Error::SecretTooShort { len: 4 }
    );
    assert_eq!(
        Verifier::new("x".repeat(MIN_SECRET_LEN - 1)).unwrap_err(),
        Error::SecretTooShort { len: 15 }
    );
    assert!(Verifier::new("x".repeat(MIN_SECRET_LEN)).is_ok());
    assert!(Verifier::new("x".repeat(1000)).is_ok());
    assert_eq!(
        Verifier::new_allowing_short_secret("").unwrap_err(),
        Error::EmptySecret
    );
    assert!(Verifier::new_allowing_short_secret("J").is_ok());
    assert_eq!(
        Verifier::with_secrets(Vec::<String>::new()).unwrap_err(),
        Error::NoSecrets
    );
    assert_eq!(
        Verifier::with_secrets([SECRET, ""]).unwrap_err(),
        Error::EmptySecret
    );
    assert_eq!(
        Verifier::with_secrets([SECRET, "short"]).unwrap_err(),
        Error::SecretTooShort { len: 5 }
    );
    assert_eq!(
        Error::SecretTooShort { len: 4 }.to_string(),
        "secret too short: 4 bytes, Comapi requires at least 16 bytes"
    );
}

#[test]
fn negative_matrix() {
    let verifier = Verifier::new(SECRET).expect("valid secret");
    let good = verifier.sign(BODY).to_string();
    assert!(
        verifier
            .verify(&headers_with(&[good.as_bytes()]), BODY)
            .is_ok()
    );

    let upper = good.to_uppercase();
    let padded = format!(" \t{good}\t ");
    for accepted in [upper.as_str(), padded.as_str()] {
        assert!(
            verifier
                .verify(&headers_with(&[accepted.as_bytes()]), BODY)
                .is_ok(),
            "{accepted:?} is accepted"
        );
    }

    let junk = vec![b'a'; 4096];
    let inner_space = format!("{} {}", &good[..20], &good[20..]);
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("only whitespace", b"  \t ".to_vec()),
        ("39 digits", good.as_bytes()[..39].to_vec()),
        ("41 digits", format!("{good}0").into_bytes()),
        ("non-hex", format!("{}g", &good[..39]).into_bytes()),
        ("sha1= prefix", format!("sha1={good}").into_bytes()),
        ("v1, prefix", format!("v1,{good}").into_bytes()),
        ("inner space", inner_space.into_bytes()),
        ("non-ASCII", format!("{}\u{e9}", &good[..38]).into_bytes()),
        ("4 KiB of junk", junk),
        ("0x prefix", format!("0x{}", &good[..38]).into_bytes()),
    ];
    for (what, value) in &malformed {
        let got = verifier.verify(&headers_with(&[value]), BODY);
        assert_eq!(got, Err(Error::MalformedSignature), "{what}");
        assert_eq!(
            verifier.verify_values([value.as_slice()], BODY),
            Err(Error::MalformedSignature),
            "{what}"
        );
    }

    assert_eq!(
        verifier.verify(&HeaderMap::new(), BODY),
        Err(Error::MissingSignature)
    );
    assert_eq!(
        verifier.verify(&headers_with(&[good.as_bytes(), good.as_bytes()]), BODY),
        Err(Error::DuplicateSignature),
        "a repeated header is ambiguous even when both copies are right"
    );

    let wrong_secret = Verifier::new("another-secret-of-enough-length").expect("valid secret");
    let forged = wrong_secret.sign(BODY).to_string();
    assert_eq!(
        verifier.verify(&headers_with(&[forged.as_bytes()]), BODY),
        Err(Error::SignatureMismatch)
    );

    let mut flipped = BODY.to_vec();
    flipped[10] ^= 0x01;
    assert_eq!(
        verifier.verify(&headers_with(&[good.as_bytes()]), &flipped),
        Err(Error::SignatureMismatch)
    );
    assert_eq!(
        verifier.verify(&headers_with(&[good.as_bytes()]), b""),
        Err(Error::SignatureMismatch)
    );

    for error in [
        Error::MissingSignature,
        Error::DuplicateSignature,
        Error::MalformedSignature,
        Error::SignatureMismatch,
    ] {
        assert_eq!(error.status(), http::StatusCode::UNAUTHORIZED, "{error}");
        assert!(error.is_signature_error());
    }
}

#[test]
fn rotation_reports_the_matching_secret() {
    let old = "the-previous-secret-0123456789";
    let new = "the-current-secret-0123456789";
    let signed_old = Verifier::new(old).expect("valid").sign(BODY).to_string();
    let signed_new = Verifier::new(new).expect("valid").sign(BODY).to_string();

    let rotating = Verifier::with_secrets([new, old]).expect("valid");
    assert!(format!("{rotating:?}").contains("secrets: 2"));
    assert_eq!(
        rotating.sign(BODY).to_string(),
        signed_new,
        "the primary secret signs"
    );
    let by_new = rotating
        .verify(&headers_with(&[signed_new.as_bytes()]), BODY)
        .expect("new secret verifies");
    assert_eq!((by_new.secret_index(), by_new.is_primary()), (0, true));
    let by_old = rotating
        .verify(&headers_with(&[signed_old.as_bytes()]), BODY)
        .expect("old secret still listed");
    assert_eq!((by_old.secret_index(), by_old.is_primary()), (1, false));

    let rotated = Verifier::new(new).expect("valid");
    assert_eq!(
        rotated.verify(&headers_with(&[signed_old.as_bytes()]), BODY),
        Err(Error::SignatureMismatch)
    );
    assert!(
        rotated
            .verify(&headers_with(&[signed_new.as_bytes()]), BODY)
            .is_ok()
    );
}

#[test]
fn verifier_is_send_sync_clone_and_redacted() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<Verifier>();

    let verifier =
        Verifier::with_secrets([SECRET, "another-secret-of-enough-length"]).expect("valid");
    let debug = format!("{verifier:?} {:?}", verifier.clone());
    assert!(debug.contains("[redacted]"), "{debug}");
    assert!(
        !debug.contains(SECRET) && !debug.contains("another"),
        "{debug}"
    );

    let shared = verifier.clone();
    let signature = verifier.sign(BODY);
    let handle = std::thread::spawn(move || {
        let value = signature.to_string();
        shared.verify_values([value.as_bytes()], BODY).is_ok()
    });
    assert!(handle.join().expect("thread ran"));
}

#[test]
fn signature_parses_displays_and_compares() {
    let text = "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79";
    let parsed = Signature::parse(text.as_bytes()).expect("valid");
    assert_eq!(parsed.to_string(), text);
    assert_eq!(hex::encode(parsed.as_bytes()), text);
    assert_eq!(
        Signature::parse(text.to_uppercase().as_bytes()).expect("valid"),
        parsed
    );
    assert_ne!(Signature::parse(&[b'0'; 40]).expect("valid"), parsed);
    assert_eq!(format!("{parsed:?}"), format!("Signature({text})"));
}

#[test]
fn non_utf8_body_is_hashed_as_bytes() {
    let verifier = Verifier::new(SECRET).expect("valid");
    let body = [0xff, 0xfe, 0x00, 0xc3, 0x28];
    let signature = verifier.sign(&body).to_string();
    assert_eq!(signature, hmac_crate(SECRET.as_bytes(), &body));
    assert!(
        verifier
            .verify(&headers_with(&[signature.as_bytes()]), &body)
            .is_ok()
    );
}

proptest! {
    #[test]
    fn agrees_with_the_hmac_crate(secret in proptest::collection::vec(any::<u8>(), 1..200),
                                  body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let verifier = Verifier::new_allowing_short_secret(&secret).expect("non-empty");
        prop_assert_eq!(verifier.sign(&body).to_string(), hmac_crate(&secret, &body));
    }

    #[test]
    fn sign_then_verify_holds(secret in proptest::collection::vec(any::<u8>(), MIN_SECRET_LEN..120),
                              body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let verifier = Verifier::new(&secret).expect("long enough");
        let signature = verifier.sign(&body).to_string();
        prop_assert!(verifier.verify(&headers_with(&[signature.as_bytes()]), &body).is_ok());
    }

    #[test]
    fn any_flipped_bit_fails(body in proptest::collection::vec(any::<u8>(), 1..300),
                             index in any::<prop::sample::Index>(), bit in 0u8..8, in_signature in any::<bool>()) {
        let verifier = Verifier::new(SECRET).expect("valid");
        let mut signature = *verifier.sign(&body).as_bytes();
        let mut body = body;
        if in_signature {
            signature[index.index(signature.len())] ^= 1 << bit;
        } else {
            let i = index.index(body.len());
            body[i] ^= 1 << bit;
        }
        let header = hex::encode(signature);
        prop_assert_eq!(verifier.verify(&headers_with(&[header.as_bytes()]), &body), Err(Error::SignatureMismatch));
    }

    #[test]
    fn signature_parser_agrees_with_the_hex_crate(digits in "[0-9a-fA-F]{40}", at in 0usize..40,
                                                   byte in any::<u8>(), replace in any::<bool>()) {
        let mut value = digits.into_bytes();
        if replace {
            value[at] = byte;
        }
        let ours = Signature::parse(&value).ok().map(|s| s.as_bytes().to_vec());
        let reference = hex::decode(&value).ok();
        prop_assert_eq!(ours, reference, "{:?}", String::from_utf8_lossy(&value));
    }

    #[test]
    fn arbitrary_header_values_never_panic(value in proptest::collection::vec(any::<u8>(), 0..100)) {
        let verifier = Verifier::new(SECRET).expect("valid");
        let result = verifier.verify_values([value.as_slice()], BODY);
        prop_assert!(matches!(result, Err(Error::MalformedSignature | Error::SignatureMismatch)));
    }
}

/// Minor page faults the calling thread has taken so far: field 10 of
/// `/proc/thread-self/stat`, counted from the `)` that ends the command name.
#[cfg(target_os = "linux")]
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("procfs is mounted");
    let after_name = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    after_name
        .split(' ')
        .nth(7)
        .and_then(|field| field.parse().ok())
        .expect("minflt is a number")
}

/// Page faults taken while verifying a fresh 64 MiB zeroed body: its pages are
/// mapped but never touched, so every page the verifier reads faults once (one per
/// 4 KiB page, or one per 2 MiB where the kernel maps its huge zero page).
#[cfg(target_os = "linux")]
fn faults_reading_a_fresh_body(verifier: &Verifier, headers: &HeaderMap) -> (u64, Error) {
    let body = vec![0u8; 64 << 20];
    let before = minor_faults();
    let error = verifier
        .verify(headers, &body)
        .expect_err("no header here matches");
    let faults = minor_faults() - before;
    drop(body);
    (faults, error)
}

#[cfg(target_os = "linux")]
#[test]
fn a_bad_header_is_refused_without_reading_the_body() {
    let verifier = Verifier::new(SECRET).unwrap();
    let digits = "0123456789abcdef0123456789abcdef01234567";
    let empty_body_faults = {
        let before = minor_faults();
        let _ = verifier.verify(&headers_with(&[]), b"");
        minor_faults() - before
    };

    // The control: a well-formed wrong signature is checked by hashing the body,
    // which reads every page of it. If this stops faulting, the test below proves
    // nothing, so it fails here.
    let (faults, error) =
        faults_reading_a_fresh_body(&verifier, &headers_with(&[digits.as_bytes()]));
    assert_eq!(error, Error::SignatureMismatch);
    assert!(
        faults >= 16,
        "hashing 64 MiB took only {faults} page faults"
    );

    let bad: [(&[&[u8]], Error); 5] = [
        (&[], Error::MissingSignature),
        (
            &[digits.as_bytes(), digits.as_bytes()],
            Error::DuplicateSignature,
        ),
        (
            &[b"sha1=0123456789abcdef0123456789abcdef01234567"],
            Error::MalformedSignature,
        ),
        (&[&digits.as_bytes()[..39]], Error::MalformedSignature),
        (
            &[b"zz23456789abcdef0123456789abcdef01234567"],
            Error::MalformedSignature,
        ),
    ];
    for (values, expected) in bad {
        let (faults, error) = faults_reading_a_fresh_body(&verifier, &headers_with(values));
        assert_eq!(error, expected);
        assert!(
            faults <= empty_body_faults + 2,
            "{expected:?}: {faults} page faults over a 64 MiB body, {empty_body_faults} over an empty one"
        );
    }
}
