//! The shared suite on the in-memory store, plus what only the memory store has.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::app::{assert_problem, post, send, Harness};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

store_suite!(|| async { MemoryStore::default() });

#[tokio::test]
async fn full_store_answers_503_and_fail_open_passes_through() {
    let store = MemoryStore::builder().max_entries(2).build();
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    for key in ["a", "b"] {
        assert_eq!(
            send(&h.router, post("/pay", Some(key), "{}")).await.status,
            StatusCode::CREATED
        );
    }
    let r = send(&h.router, post("/pay", Some("c"), "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert!(r.headers.contains_key("retry-after"));
    // Live entries were not evicted to make room.
    assert!(send(&h.router, post("/pay", Some("a"), "{}"))
        .await
        .replayed());
    assert_eq!(h.runs(), 2);

    let open = Harness::new(IdempotencyLayer::new(store).global_scope().fail_open());
    let r = send(&open.router, post("/pay", Some("c"), "{}")).await;
    assert_eq!(r.status, StatusCode::CREATED, "fail open: passed through");
    assert_eq!(open.runs(), 1);
}

// Paused clock: expiry is driven by `advance`, not by how fast the requests run.
#[tokio::test(start_paused = true)]
async fn ten_thousand_keys_stay_within_the_entry_cap() {
    let store = MemoryStore::builder().max_entries(1000).build();
    let layer = IdempotencyLayer::new(store.clone())
        .global_scope()
        .lease(Duration::from_secs(1))
        .ttl(Duration::from_secs(1));
    let h = Harness::new(layer);
    let mut refused = 0;
    for i in 0..10_000 {
        let r = send(&h.router, post("/pay", Some(&format!("key-{i}")), "{}")).await;
        match r.status {
            StatusCode::CREATED => {}
            StatusCode::SERVICE_UNAVAILABLE => refused += 1,
            other => panic!("unexpected {other}"),
        }
        assert!(store.len() <= 1000, "cap honoured");
        if i % 1500 == 1499 {
            tokio::time::advance(Duration::from_millis(1100)).await; // let entries expire
        }
    }
    // Six rounds of 1500 keys each fill the 1000 slots and refuse 500; the last 1000 fit.
    assert_eq!(
        refused,
        6 * 500,
        "the cap was reached and refused the overflow"
    );
    assert!(store.len() <= 1000);
}
