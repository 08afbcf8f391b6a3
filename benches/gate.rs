//! Revision-gate decisions per second: in memory on one and two threads, and
//! through Redis over loopback, one round trip per event and one per batch of 100.
//! Before the timings it prints the gate's memory per tracked event id and entity,
//! measured with a counting allocator.
//!
//! Redis: `COMAPI_TEST_REDIS_URL`, or a `redis-server` on PATH that the bench starts
//! on a free loopback port (and stops); without either the Redis benches are skipped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use comapi_webhook::dangerous::parse_unverified;
use comapi_webhook::gate::{GateConfig, RedisGate, RedisGateConfig};
use comapi_webhook::{Event, Gate};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

struct Counting;
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged, only counting bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn uuid(n: u64) -> String {
    let x = 0x5eed_0000_0000_4000_8000_0000_0000_0000u128 + u128::from(n);
    let h = format!("{x:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// An event raised now, as Comapi's are: the gate reads its timestamp for the
/// replay window before it looks anything up.
fn event(event_id: &str, entity: &str, revision: u64) -> Event<'static> {
    static NOW: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
    });
    let now = &*NOW;
    let body = format!(
        r#"{{"eventId":"{event_id}","name":"message.read","payload":{{"id":"{entity}"}},"revision":{revision},"timestamp":"{now}"}}"#
    );
    parse_unverified(body.as_bytes())
        .unwrap()
        .pop()
        .unwrap()
        .into_owned()
}

/// 10,000 decisions' worth: 2,000 messages, 4 states each out of order, and every
/// tenth event retried.
fn workload(salt: u64) -> Vec<Event<'static>> {
    let mut events = Vec::new();
    for m in 0..2_000u64 {
        let message = uuid(salt * 1_000_000 + m);
        for rev in [2u64, 1, 4, 3] {
            let e = event(
                &uuid(salt * 1_000_000 + 500_000 + m * 4 + rev),
                &message,
                rev,
            );
            if events.len() % 10 == 0 {
                events.push(e.clone());
            }
            events.push(e);
        }
    }
    events.truncate(10_000);
    events
}

fn print_memory() {
    const N: u64 = 200_000;
    let ids: Vec<Event<'static>> = (0..N).map(|i| event(&uuid(i), "x", 0)).collect();
    let unordered: Vec<Event<'static>> = ids
        .iter()
        .map(|e| {
            parse_unverified(
                format!(
                    r#"{{"eventId":"{}","name":"x.y","payload":{{}}}}"#,
                    e.event_id()
                )
                .as_bytes(),
            )
            .unwrap()
            .pop()
            .unwrap()
            .into_owned()
        })
        .collect();
    let entities: Vec<Event<'static>> = (0..N).map(|i| event(&uuid(i), &uuid(N + i), 1)).collect();
    let emails: Vec<Event<'static>> = (0..N)
        .map(|i| {
            let body = format!(r#"{{"eventId":"{}","name":"profile.update","payload":{{"id":"user{i}@example.com"}},"revision":1}}"#, uuid(i));
            parse_unverified(body.as_bytes()).unwrap().pop().unwrap().into_owned()
        })
        .collect();
    let measure = |events: &[Event<'static>]| {
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let gate = Gate::with_config(GateConfig::new(2 * N as usize, 2 * N as usize));
        for e in events {
            gate.check(e);
        }
        let bytes = LIVE_BYTES.load(Ordering::Relaxed) - before;
        drop(black_box(gate));
        bytes as f64 / N as f64
    };
    let per_id = measure(&unordered);
    let per_id_and_entity = measure(&entities);
    let per_id_and_email_entity = measure(&emails);
    println!("gate memory, {N} of each (uuid ids):");
    println!("  per tracked event id:                 {per_id:6.1} bytes");
    println!(
        "  per tracked entity (uuid message id): {:6.1} bytes",
        per_id_and_entity - per_id
    );
    println!(
        "  per tracked entity (e-mail profile):  {:6.1} bytes",
        per_id_and_email_entity - per_id
    );
}

struct RedisServer(Option<std::process::Child>, String);

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn redis() -> Option<RedisServer> {
    if let Ok(url) = std::env::var("COMAPI_TEST_REDIS_URL") {
        return Some(RedisServer(None, url));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let server = RedisServer(Some(child), format!("redis://127.0.0.1:{port}/"));
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn bench(c: &mut Criterion) {
    print_memory();
    let events = workload(1);
    let mut group = c.benchmark_group("gate");
    group.throughput(Throughput::Elements(events.len() as u64));
    let config = GateConfig::new(1 << 20, 1 << 20);
    group.bench_function(BenchmarkId::new("memory", "1-thread"), |b| {
        b.iter_batched(
            || Gate::with_config(config),
            |gate| events.iter().filter(|e| gate.check(e).is_fresh()).count(),
            BatchSize::PerIteration,
        )
    });
    group.bench_function(BenchmarkId::new("memory", "2-threads"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let gate = Gate::with_config(config);
                let (left, right) = events.split_at(events.len() / 2);
                let start = Instant::now();
                std::thread::scope(|s| {
                    for half in [left, right] {
                        let gate = &gate;
                        s.spawn(move || half.iter().filter(|e| gate.check(e).is_fresh()).count());
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });

    let Some(server) = redis() else {
        println!(
            "!!! gate/redis benches SKIPPED: set COMAPI_TEST_REDIS_URL or install redis-server"
        );
        group.finish();
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let small: Vec<Event<'static>> = events[..1_000].to_vec();
    group.throughput(Throughput::Elements(small.len() as u64));
    let mut run = 0u64;
    let mut connect = || {
        run += 1;
        let prefix = format!("bench:{}:{run}:", std::process::id());
        rt.block_on(RedisGate::connect(
            &server.1,
            RedisGateConfig::default().with_key_prefix(prefix),
        ))
        .unwrap()
    };
    let gates: Vec<RedisGate> = (0..2).map(|_| connect()).collect();
    group.bench_function(BenchmarkId::new("redis", "one-at-a-time"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut fresh = 0;
                for e in &small {
                    fresh += usize::from(gates[0].check(e).await.unwrap().is_fresh());
                }
                fresh
            })
        })
    });
    group.bench_function(BenchmarkId::new("redis", "batches-of-100"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut fresh = 0;
                for chunk in small.chunks(100) {
                    fresh += gates[1]
                        .check_batch(chunk)
                        .await
                        .unwrap()
                        .iter()
                        .filter(|d| d.is_fresh())
                        .count();
                }
                fresh
            })
        })
    });
    group.finish();
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
