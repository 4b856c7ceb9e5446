//! The memory store when it is full: what one refused reservation costs under a flood of
//! new keys, for several store sizes. A refusal should cost the same whatever the size
//! (no sweep of every shard per refusal), and the not-full path (reserve, then release)
//! is measured alongside so a cheaper refusal does not hide a dearer hot path.
//!
//! The store's futures never wait on anything, so each call is polled once in place
//! (`now_or_never`) and the numbers are the store's own work. Run with
//! `cargo bench --bench memory_full`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use tower_idempotency::store::{FencingToken, Fingerprint, Reservation, ScopeHash, StoreError};
use tower_idempotency::{MemoryStore, Store};
// The core crate's path, whichever memory items the facade re-exports at its root.
use tower_idempotency_core::memory::ENTRY_OVERHEAD_BYTES;

const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
/// Long enough that nothing expires during a run: the store stays full of live entries.
const LEASE: Duration = Duration::from_secs(3600);

/// A distinct scope per call, spread over the shards as blake3 output would be.
fn fresh_scope() -> ScopeHash {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    // Byte 8 picks the shard: mix the counter so consecutive keys land on different ones.
    bytes[8..16].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[..8]);
    ScopeHash::from_bytes(bytes)
}

fn reserve(
    store: &MemoryStore,
    scope: &ScopeHash,
    token: FencingToken,
) -> Result<Reservation, StoreError> {
    store
        .reserve(scope, &FP, token, LEASE.into())
        .now_or_never()
        .expect("the memory store answers without waiting")
}

/// A store of `entries` capacity, filled with pending reservations.
fn full_store(entries: usize) -> MemoryStore {
    let store = MemoryStore::builder().max_entries(entries).build();
    for _ in 0..entries {
        let answer = reserve(&store, &fresh_scope(), FencingToken::generate());
        assert_eq!(answer.expect("room while filling"), Reservation::Reserved);
    }
    store
}

/// A store whose byte budget holds exactly `entries` pending reservations, filled.
fn full_by_bytes(entries: usize) -> MemoryStore {
    let store = MemoryStore::builder()
        .max_entries(usize::MAX)
        .max_bytes(entries * ENTRY_OVERHEAD_BYTES)
        .build();
    for _ in 0..entries {
        let answer = reserve(&store, &fresh_scope(), FencingToken::generate());
        assert_eq!(answer.expect("room while filling"), Reservation::Reserved);
    }
    store
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_full");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    for entries in [1_000, 10_000, 100_000] {
        let store = full_store(entries);
        group.bench_function(BenchmarkId::new("refuse-new-key", entries), |b| {
            b.iter(|| {
                let answer = reserve(&store, &fresh_scope(), FencingToken::generate());
                assert!(matches!(answer, Err(StoreError::Full { .. })));
            })
        });
        assert_eq!(store.len(), entries, "no live entry was evicted");
    }
    // Full by bytes rather than by entries: the same refusal.
    for entries in [1_000, 100_000] {
        let store = full_by_bytes(entries);
        group.bench_function(BenchmarkId::new("refuse-new-key-by-bytes", entries), |b| {
            b.iter(|| {
                let answer = reserve(&store, &fresh_scope(), FencingToken::generate());
                assert!(matches!(answer, Err(StoreError::Full { .. })));
            })
        });
        assert_eq!(store.len(), entries, "no live entry was evicted");
    }
    // The not-full path, for comparison: reserve a new key, then release it.
    let store = MemoryStore::default();
    group.bench_function(BenchmarkId::new("reserve-release", "not-full"), |b| {
        b.iter(|| {
            let scope = fresh_scope();
            let token = FencingToken::generate();
            assert_eq!(
                reserve(&store, &scope, token).ok(),
                Some(Reservation::Reserved)
            );
            let released = store.release(&scope, token).now_or_never();
            assert!(matches!(released, Some(Ok(true))));
        })
    });
    group.finish();
}

criterion_group!(memory_full, benches);
criterion_main!(memory_full);
