//! Memory stays bounded: replaying a large stored response does not copy it per replay,
//! and what a request allocates is given back. Measured with a counting allocator, so the
//! test reads live bytes, not timing.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use axum::http::StatusCode;
use common::app::{post, send, with_header, Harness};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// Counts live heap bytes across the whole test binary.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: isize = 1024 * 1024;

/// A 4 MiB response replayed 50 times, every replay kept alive at once: the stored body is
/// shared by all of them, never copied, so live memory grows by less than 1 MiB (one copy
/// per replay would be 200 MiB).
#[tokio::test(flavor = "current_thread")]
async fn replaying_a_large_response_keeps_memory_bounded() {
    let store = MemoryStore::default();
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .max_stored_response(4 * MIB as usize),
    );
    let req = || {
        with_header(
            post("/pay", Some("big"), "{}"),
            "x-body-size",
            &(4 * MIB).to_string(),
        )
    };
    let first = send(&h.router, req()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), 4 * MIB as usize);
    drop(first);
    let baseline = LIVE.load(Ordering::Relaxed);
    let mut replays = Vec::with_capacity(50);
    for _ in 0..50 {
        let replay = send(&h.router, req()).await;
        assert!(replay.replayed());
        assert_eq!(replay.body.len(), 4 * MIB as usize);
        replays.push(replay);
    }
    let grown = LIVE.load(Ordering::Relaxed) - baseline;
    assert_eq!(h.runs(), 1);
    assert!(
        grown < MIB,
        "50 live replays hold {grown} bytes beyond the stored body"
    );
    drop(replays);
}
