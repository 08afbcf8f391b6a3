//! The verify hot path beside (a) the bare `hmac` crate it wraps, keyed once, with
//! the tag already decoded (clone, update, `verify_slice`): the floor, (b) a naive
//! per-request-keyed HMAC with hex string comparison, the way Comapi's samples do
//! it, and (c) raw SHA-1 of the same bytes.
//!
//! `scripts/bench-ratios.py verify` prints the ratios after a run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use comapi_webhook::signature::Signature;
use comapi_webhook::{SIGNATURE_HEADER, Verifier};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hmac::{KeyInit, Mac};
use sha1::{Digest, Sha1};

const SECRET: &str = "a-comapi-webhook-secret-of-36-chars!";
/// 760 B is the size of a real `message.sent` envelope.
const SIZES: [usize; 4] = [64, 760, 16 * 1024, 1024 * 1024];

/// What the official samples do: key HMAC per request, hex-encode, compare strings.
fn naive_verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let Ok(mut mac) = hmac::Hmac::<Sha1>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes()) == header
}

fn bench(c: &mut Criterion) {
    let verifier = Verifier::new(SECRET).expect("valid secret");
    let mut group = c.benchmark_group("verify");
    for size in SIZES {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let signature = verifier.sign(&body).to_string();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            SIGNATURE_HEADER,
            signature.parse().expect("hex is a valid header"),
        );
        assert!(naive_verify(SECRET, &signature, &body));

        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("verify", size), &body, |b, body| {
            b.iter(|| {
                verifier
                    .verify(black_box(&headers), black_box(body))
                    .is_ok()
            })
        });
        let keyed = hmac::Hmac::<Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
        let tag = hex::decode(&signature).unwrap();
        group.bench_with_input(BenchmarkId::new("bare", size), &body, |b, body| {
            b.iter(|| {
                let mut mac = keyed.clone();
                mac.update(black_box(body));
                mac.verify_slice(black_box(&tag)).is_ok()
            })
        });
        // The two fixed costs verify adds to the bare crate: the header's lookup
        // and the signature's parsing.
        group.bench_with_input(BenchmarkId::new("lookup", size), &headers, |b, headers| {
            b.iter(|| black_box(headers).get_all(SIGNATURE_HEADER).iter().count())
        });
        group.bench_with_input(
            BenchmarkId::new("parse", size),
            &signature,
            |b, signature| b.iter(|| Signature::parse(black_box(signature.as_bytes())).is_ok()),
        );
        group.bench_with_input(BenchmarkId::new("naive", size), &body, |b, body| {
            b.iter(|| naive_verify(black_box(SECRET), black_box(&signature), black_box(body)))
        });
        group.bench_with_input(BenchmarkId::new("sha1", size), &body, |b, body| {
            b.iter(|| Sha1::digest(black_box(body)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
