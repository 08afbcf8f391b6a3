//! Typed event parsing beside `serde_json::Value` parsing of the same bytes.
//!
//! `scripts/bench-ratios.py parse` prints the ratios after a run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SINGLE: &[u8] = include_bytes!("../tests/fixtures/events/message_sent_sms.json");
const BATCH: &[u8] = include_bytes!("../tests/fixtures/events/batch_500.json");

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (label, body, events) in [("single", SINGLE, 1u64), ("batch500", BATCH, 500)] {
        assert_eq!(
            comapi_webhook::dangerous::parse_unverified(body)
                .unwrap()
                .len() as u64,
            events
        );
        group.throughput(Throughput::Elements(events));
        group.bench_with_input(BenchmarkId::new("typed", label), body, |b, body| {
            b.iter(|| comapi_webhook::dangerous::parse_unverified(black_box(body)).map(|e| e.len()))
        });
        group.bench_with_input(BenchmarkId::new("value", label), body, |b, body| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(body)).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
