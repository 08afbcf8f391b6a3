//! `verify` never touches the heap, on good input or bad: counted through a global
//! allocator. This file is its own test binary so the allocator sees nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(unsafe_code)] // a counting global allocator needs it; the library forbids it

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use comapi_webhook::{SIGNATURE_HEADER, Verifier};
use http::{HeaderMap, HeaderValue};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is
// a const-initialised thread local, which itself never allocates.

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn verify_never_allocates() {
    let verifier = Verifier::with_secrets([
        "the-current-secret-0123456789",
        "the-previous-secret-0123456789",
    ])
    .expect("valid secrets");
    let previous = Verifier::new("the-previous-secret-0123456789").expect("valid");
    let bodies: Vec<Vec<u8>> = [0usize, 1, 55, 56, 64, 65, 760, 100_000]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 7) as u8).collect())
        .collect();

    let mut cases: Vec<(HeaderMap, &[u8])> = Vec::new();
    for body in &bodies {
        for value in [
            verifier.sign(body).to_string(),
            previous.sign(body).to_string(),
            format!(" {} ", verifier.sign(body)),
            "0".repeat(40),
            "not hex at all".to_string(),
            "x".repeat(4096),
            String::new(),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(
                SIGNATURE_HEADER,
                HeaderValue::from_str(&value).expect("valid header"),
            );
            cases.push((headers, body));
        }
        cases.push((HeaderMap::new(), body));
        let mut twice = HeaderMap::new();
        twice.append(SIGNATURE_HEADER, HeaderValue::from_static("a"));
        twice.append(SIGNATURE_HEADER, HeaderValue::from_static("b"));
        cases.push((twice, body));
    }

    // Sanity check that the counter works at all.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 10]))) > 0);

    let mut outcomes = [0usize; 2];
    for (headers, body) in &cases {
        let n = allocations_during(|| {
            let ok = verifier
                .verify(std::hint::black_box(headers), std::hint::black_box(body))
                .is_ok();
            outcomes[usize::from(ok)] += 1;
        });
        assert_eq!(
            n,
            0,
            "verify allocated for body of {} bytes, headers {headers:?}",
            body.len()
        );
    }
    assert_eq!(
        outcomes[1],
        3 * bodies.len(),
        "the good signatures verified"
    );
}
