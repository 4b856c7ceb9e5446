//! Memory stays bounded: replaying a large stored response does not copy it per replay,
//! what a request allocates is given back, and the memory store's byte budget bounds the
//! heap it really takes. Measured with a counting allocator, so the tests read live bytes,
//! not timing; they run one at a time, since the counter sees the whole binary.

#[path = "it/common/mod.rs"]
mod common;
#[path = "it/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use bytes::Bytes;
use common::app::{post, send, with_header, Harness};
use tower_idempotency::store::{
    Completion, FencingToken, Fingerprint, Record, Reservation, ScopeHash, StoreError,
    StoredResponse,
};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Store};
// The core crate's path, whichever memory items the facade re-exports at its root.
use tower_idempotency_core::memory::ENTRY_OVERHEAD_BYTES;

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

/// The counter sees every thread of the binary: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A 4 MiB response replayed 50 times, every replay kept alive at once: the stored body is
/// shared by all of them, never copied, so live memory grows by less than 1 MiB (one copy
/// per replay would be 200 MiB).
#[tokio::test(flavor = "current_thread")]
async fn replaying_a_large_response_keeps_memory_bounded() {
    let _serial = SERIAL.lock().await;
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

const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
const LEASE: Duration = Duration::from_secs(60);

/// Distinct scopes spread over the shards, as blake3 output would be.
fn scope(n: u64) -> ScopeHash {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    bytes[8..16].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    ScopeHash::from_bytes(bytes)
}

/// Pending entries: at every step the heap the store took stays within what it counts
/// (so [`ENTRY_OVERHEAD_BYTES`] is not an underestimate, even right after a table grew),
/// and once they expire and are swept, the tables give the memory back.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn counted_bytes_cover_the_heap_of_pending_entries() {
    let _serial = SERIAL.lock().await;
    FencingToken::generate(); // the thread's RNG, allocated on first use
    let base = live();
    let store = MemoryStore::builder().max_entries(usize::MAX).build();
    let empty = live() - base;
    // The first few entries of each of the 64 shards share a table of minimum size.
    let small_tables = 64 * 1024;
    let mut worst = 0.0f64;
    for n in 0..200_000u64 {
        let r = store
            .reserve(&scope(n), &FP, FencingToken::generate(), LEASE.into())
            .await;
        assert_eq!(r.unwrap(), Reservation::Reserved);
        if n % 997 == 0 {
            let grown = live() - base - empty;
            let counted = store.bytes() as isize;
            assert!(
                grown <= counted + small_tables,
                "{n}: {grown} bytes taken, {counted} counted"
            );
            if n > 10_000 {
                worst = worst.max(grown as f64 / counted as f64);
            }
        }
    }
    assert_eq!(store.bytes(), 200_000 * ENTRY_OVERHEAD_BYTES);
    // Past the small tables, the estimate is an upper bound, but not a wild one.
    assert!(
        worst > 0.4,
        "at worst {worst:.2} of the counted bytes were taken"
    );

    tokio::time::advance(LEASE + Duration::from_millis(1)).await;
    store.sweep();
    assert_eq!((store.len(), store.bytes()), (0, 0));
    let left = live() - base;
    println!("worst taken/counted {worst:.2}; {left} bytes left after the sweep");
    assert!(left < 2 * MIB, "{left} bytes left after the sweep");
}

/// Completed records of 10 kB until the budget refuses: the heap the store took stays
/// within what it counts, and that is the budget plus at most one record (the completion
/// of the last reservation granted, which is never refused).
#[tokio::test(flavor = "current_thread")]
async fn a_byte_budget_bounds_the_heap_of_completed_records() {
    let _serial = SERIAL.lock().await;
    let budget = 8 * MIB as usize;
    let base = live();
    let store = MemoryStore::builder().max_bytes(budget).build();
    let empty = live() - base;
    let ttl = Duration::from_secs(60);
    let mut stored = 0u64;
    loop {
        let token = FencingToken::generate();
        match store
            .reserve(&scope(stored), &FP, token, LEASE.into())
            .await
        {
            Ok(Reservation::Reserved) => {}
            Err(StoreError::Full { .. }) => break,
            other => panic!("{other:?}"),
        }
        let record = Record::Response(StoredResponse::new(
            StatusCode::CREATED,
            vec![(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Bytes::from(vec![b'x'; 10_000]),
        ));
        let done = store.complete(&scope(stored), token, &record, ttl).await;
        assert_eq!(done.unwrap(), Completion::Stored);
        stored += 1;
    }
    let grown = live() - base - empty;
    let counted = store.bytes() as isize;
    println!("{stored} records stored; {grown} bytes taken, {counted} counted");
    assert!(stored > 700, "{stored} records stored");
    assert!(grown <= counted, "{grown} bytes taken, {counted} counted");
    assert!(counted <= budget as isize + 10_100, "{counted} counted");
    assert!(grown > budget as isize * 9 / 10, "{grown} bytes taken");
}

/// The Redis store's local replay tier holds what it counts. A record decoded from a
/// reply is a slice of the connection's read buffer, and a reply that arrives right
/// behind a large one on the same connection lands in that large buffer: here 64 small
/// records come back pipelined behind a 1 MiB `GET`, eight times over. Kept as slices,
/// they would pin eight read buffers of megabytes; the tier copies what it keeps, so once
/// the connection is closed the heap still taken is within what `local_replay_bytes()`
/// counts.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "current_thread")]
async fn the_redis_local_tier_holds_what_it_counts() {
    use futures_util::future::join_all;
    use tower_idempotency::redis::fred::prelude::*;
    use tower_idempotency::redis::fred::types::Expiration;

    const ROUNDS: u64 = 8;
    const PER_ROUND: u64 = 64;
    const BIG: usize = 1024 * 1024;
    const TTL: Duration = Duration::from_secs(600);
    let _serial = SERIAL.lock().await;
    let record = |n: u64| {
        Record::Response(StoredResponse::new(
            StatusCode::CREATED,
            vec![
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    header::HeaderName::from_static("x-request-id"),
                    HeaderValue::from_str(&format!("req-{n:08}")).unwrap(),
                ),
            ],
            Bytes::from(format!("{{\"payment\":{n},\"amount\":1000}}")),
        ))
    };
    let url = support::redis::redis_url().await;
    let prefix = support::unique_prefix("local-owned");
    let writer = support::store::store(&url, &prefix).await;
    for n in 0..ROUNDS * PER_ROUND {
        let token = FencingToken::generate();
        let r = writer.reserve(&scope(n), &FP, token, LEASE.into()).await;
        assert_eq!(r.unwrap(), Reservation::Reserved);
        let done = writer.complete(&scope(n), token, &record(n), TTL).await;
        assert_eq!(done.unwrap(), Completion::Stored);
    }
    let big_key = format!("{prefix}big");
    let _: () = writer
        .client()
        .set(
            &big_key,
            vec![b'x'; BIG],
            Some(Expiration::EX(600)),
            None,
            false,
        )
        .await
        .unwrap();

    let reader = support::store::store(&url, &prefix).await;
    let base = live();
    for round in 0..ROUNDS {
        let first = round * PER_ROUND;
        let scopes: Vec<ScopeHash> = (first..first + PER_ROUND).map(scope).collect();
        let reads = scopes
            .iter()
            .map(|s| reader.reserve(s, &FP, FencingToken::generate(), LEASE.into()));
        // The GET is sent first, so the reserves' replies arrive right behind its 1 MiB.
        let (big, answers) =
            tokio::join!(reader.client().get::<Bytes, _>(&big_key), join_all(reads));
        assert_eq!(big.unwrap().len(), BIG);
        for (n, answer) in (first..).zip(answers) {
            assert_eq!(answer.unwrap(), Reservation::Completed(record(n)));
        }
    }
    // Every record is kept: each is now answered from the tier, with no command.
    let from_tier = reader.round_trips().local_replays;
    for n in 0..ROUNDS * PER_ROUND {
        let r = reader
            .reserve(&scope(n), &FP, FencingToken::generate(), LEASE.into())
            .await;
        assert_eq!(r.unwrap(), Reservation::Completed(record(n)));
    }
    assert_eq!(
        reader.round_trips().local_replays - from_tier,
        ROUNDS * PER_ROUND
    );
    // The read buffer is the connection's: closing it leaves only what the tier keeps.
    reader.client().quit().await.unwrap();
    let counted = reader.local_replay_bytes() as isize;
    // What the run leaves besides the tier (fred's and tokio's own state).
    let slack = 64 * 1024;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut grown = live() - base;
    // The connection's tasks end after `quit` returns; give them time to drop the buffer.
    while grown > counted + slack && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        grown = live() - base;
    }
    println!(
        "{} records kept: {grown} bytes taken, {counted} counted",
        ROUNDS * PER_ROUND
    );
    assert!(
        grown <= counted + slack,
        "{} records kept: {grown} bytes taken, {counted} counted",
        ROUNDS * PER_ROUND
    );
    // An upper bound, but not a wild one: the byte bound is not spent on nothing.
    assert!(
        grown > counted / 3,
        "{grown} bytes taken, {counted} counted"
    );
}
