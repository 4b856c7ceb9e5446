//! The shared suite on the in-memory store, plus what only the memory store has.

use crate::common;

use std::time::Duration;

use axum::http::StatusCode;
use common::app::{assert_problem, delayed, post, send, spawn_send, with_header, Harness};
use tokio::time::Instant;
use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore};

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

/// The byte budget refuses a new key with 503 `store-unavailable`; the live entries (a
/// completed large response, a pending request) answer as before.
#[tokio::test]
async fn byte_budget_answers_503_and_keeps_live_entries() {
    let budget = 1 << 20;
    let store = MemoryStore::builder().max_bytes(budget).build();
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    let big = |key| with_header(post("/pay", Some(key), "{}"), "x-body-size", "600000");
    assert_eq!(send(&h.router, big("a")).await.status, StatusCode::CREATED);
    // A pending request: its handler takes a minute.
    let pending = spawn_send(&h.router, delayed(post("/pay", Some("p"), "{}"), 60_000));
    while h.runs() < 2 {
        tokio::task::yield_now().await;
    }
    // Its reservation fits; its completion takes the store over the budget (never refused).
    assert_eq!(send(&h.router, big("b")).await.status, StatusCode::CREATED);

    let r = send(&h.router, post("/pay", Some("c"), "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert!(store.bytes() > budget, "{} bytes", store.bytes());
    // Live entries were not evicted to make room.
    for key in ["a", "b"] {
        let replay = send(&h.router, big(key)).await;
        assert!(replay.replayed(), "{key} replayed");
        assert_eq!(replay.body.len(), 600_000);
    }
    let r = send(&h.router, post("/pay", Some("p"), "{}")).await;
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    assert_eq!(h.runs(), 3);
    pending.abort();
}

/// The first request is released (400 after 1 s) while two others wait on its key. One
/// of them becomes the owner and takes 1.1 s; the other must be woken by that owner's
/// completion and answer at the same virtual instant, not at its next poll (up to 250 ms
/// later). With the paused clock the instants are exact.
#[tokio::test(start_paused = true)]
async fn a_waiter_is_woken_by_the_owner_that_follows_a_release() {
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .global_scope()
        .in_flight(InFlight::Wait(Duration::from_secs(10)));
    let h = Harness::new(layer);
    let start = Instant::now();
    let timed = |req| {
        let router = h.router.clone();
        tokio::spawn(async move {
            let reply = send(&router, req).await;
            (reply, Instant::now() - start)
        })
    };
    let first = with_header(post("/pay", Some("k"), "{}"), "x-fail-first", "400");
    let first = timed(delayed(first, 1000));
    h.started.notified().await;
    // 1.1 s: not a multiple of the 250 ms poll interval, so a poll cannot land on the
    // owner's finish by chance.
    let waiters = [
        timed(delayed(post("/pay", Some("k"), "{}"), 1100)),
        timed(delayed(post("/pay", Some("k"), "{}"), 1100)),
    ];
    let (first, released_at) = first.await.unwrap();
    assert_eq!(first.status, StatusCode::BAD_REQUEST, "released");
    let mut owner = None;
    let mut other = None;
    for waiter in waiters {
        let (reply, at) = waiter.await.unwrap();
        assert_eq!(reply.status, StatusCode::CREATED);
        if reply.replayed() {
            other = Some(at);
        } else {
            owner = Some(at);
        }
    }
    let (owner, other) = (owner.expect("one owner"), other.expect("one replay"));
    assert_eq!(h.runs(), 2);
    let ms = |d: Duration| d.as_millis();
    assert!(
        (1000..=1001).contains(&ms(released_at)),
        "released at {released_at:?}"
    );
    assert!(
        (2100..=2102).contains(&ms(owner)),
        "new owner finished at {owner:?}"
    );
    assert!(
        other.abs_diff(owner) <= Duration::from_millis(1),
        "the other waiter answered at {other:?}, the new owner finished at {owner:?}"
    );
}

/// A waiter's reserve that reaches the store after the owner released, reserves there,
/// and answers only after the wait bound (a slow reply): the waiter gives up with 409,
/// and the fenced release that follows frees the key at once — a fresh request runs
/// instead of getting 409 for the whole lease.
#[tokio::test(start_paused = true)]
async fn a_waiters_reserve_cut_by_its_deadline_is_released() {
    use common::faults::Faults;
    use tower_idempotency::store::{FencingToken, Fingerprint, Reservation, ScopeHash};
    use tower_idempotency::Store;

    let memory = MemoryStore::default();
    let store = Faults::new(memory.clone()).delay_reserved_replies(Duration::from_secs(5));
    let waiting = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .in_flight(InFlight::Wait(Duration::from_secs(1))),
    );
    // The owner: a lease held straight in the store, released half-way through the wait.
    let probe = post("/pay", Some("k"), "{}");
    let scope = ScopeHash::new(None, probe.method(), "/pay", b"k");
    let owner = FencingToken::generate();
    let lease = Duration::from_secs(30);
    let fp = Fingerprint::new(
        probe.method(),
        "/pay",
        None,
        probe.headers(),
        &[axum::http::header::CONTENT_TYPE],
        b"{}",
    );
    assert_eq!(
        memory
            .reserve(&scope, &fp, owner, lease.into())
            .await
            .unwrap(),
        Reservation::Reserved
    );
    let waiter = spawn_send(&waiting.router, post("/pay", Some("k"), "{}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(memory.release(&scope, owner).await.unwrap());
    let waiter = waiter.await.unwrap();
    assert_problem(&waiter, StatusCode::CONFLICT, "request-in-flight");
    assert_eq!(waiting.runs(), 0);
    // Let the detached release finish, then a fresh request (no delays) runs.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let fresh = waiting.sharing_counters(IdempotencyLayer::new(memory.clone()).global_scope());
    let r = send(&fresh.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "the cut reserve left no lease: {r:?}"
    );
}

/// A release gives its bytes back: many requests whose responses are not stored (4xx)
/// pass through a store whose byte budget holds only a few entries at once, and the
/// store ends empty.
#[tokio::test]
async fn released_keys_give_their_bytes_back() {
    let overhead = tower_idempotency_core::memory::ENTRY_OVERHEAD_BYTES;
    let store = MemoryStore::builder().max_bytes(4 * overhead).build();
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    for i in 0..20 {
        let bad = with_header(
            post("/pay", Some(&format!("k{i}")), "{}"),
            "x-status",
            "400",
        );
        let r = send(&h.router, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "request {i}: {r:?}");
    }
    assert_eq!(h.runs(), 20);
    assert_eq!((store.len(), store.bytes()), (0, 0));
    let r = send(&h.router, post("/pay", Some("after"), "{}")).await;
    assert_eq!(r.status, StatusCode::CREATED);
}

/// The whole suite through a [`BoxStore`](tower_idempotency::BoxStore): a store chosen at
/// run time behaves exactly like the one it boxes.
mod boxed {
    use tower_idempotency::{BoxStore, MemoryStore};
    store_suite!(|| async { BoxStore::new(MemoryStore::default()) });
}
