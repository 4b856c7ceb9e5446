//! `RedisStore` at the store level, against real Redis: the semantics table of
//! `Store`, fencing, TTLs, binary records, round trips, NOSCRIPT recovery, wake-ups across
//! processes, `check()`, and the same core cases on a 3-master Redis Cluster.
//!
//! The shared server (`support::redis::redis_url`) is only ever touched under a
//! per-test prefix; tests that flush scripts, read `INFO commandstats`, restart or
//! reconfigure Redis use a throwaway `RedisServer`. Run with
//! `cargo test --features redis --test redis_store`.
#![cfg(feature = "redis")]

use crate::support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::redis::fred::prelude::*;
use tower_idempotency::redis::fred::types::{ClusterHash, CustomCommand};
use tower_idempotency::redis::{RedisStore, RedisStoreError};
use tower_idempotency::store::{
    Completion, DecodeError, FencingToken, Fingerprint, KeyState, LeaseTerms, Record, Reservation,
    Resolved, ScopeHash, StoreError, StoredResponse, Subscription,
};
use tower_idempotency::{IdempotencyLayer, InFlight, Store, Uncertain};

use support::cluster::RedisCluster;
use support::redis::{client_commands, redis_cli, redis_url, RedisServer};
use support::store::{random_scope as scope, store};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);
/// How long a wake-up may take before the test fails (it takes about a millisecond).
const WAKE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

const FP: Fingerprint = Fingerprint::from_bytes([0x5a; 32]);
const OTHER_FP: Fingerprint = Fingerprint::from_bytes([0xa5; 32]);

fn response(body: impl Into<Bytes>) -> Record {
    Record::Response(StoredResponse::new(
        StatusCode::CREATED,
        vec![
            (
                HeaderName::from_static("link"),
                HeaderValue::from_static("</a>"),
            ),
            (
                HeaderName::from_static("link"),
                HeaderValue::from_static("</b>"),
            ),
            (
                HeaderName::from_static("x-bin"),
                HeaderValue::from_bytes(&[0x80, 0xff, b'a', 0xfe]).unwrap(),
            ),
        ],
        body.into(),
    ))
}

/// Every byte value, twice, so any text decoding or escaping would show.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

/// Two stores with the same prefix on two independent clients: two "app servers".
async fn two_stores(url: &str, test: &str) -> (RedisStore<Client>, RedisStore<Client>) {
    let prefix = support::unique_prefix(test);
    (store(url, &prefix).await, store(url, &prefix).await)
}

async fn standalone_pair(test: &str) -> Option<(RedisStore<Client>, RedisStore<Client>)> {
    Some(two_stores(&redis_url().await, test).await)
}

/// One cluster for the whole test process (a few seconds to start); each test keeps to
/// its own prefix. `None` (reason printed once) where redis-server/redis-cli are missing.
fn shared_cluster() -> Option<&'static RedisCluster> {
    static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start_or_skip).as_ref()
}

async fn cluster_url() -> Option<String> {
    tokio::task::spawn_blocking(|| shared_cluster().map(RedisCluster::url))
        .await
        .unwrap()
}

async fn cluster_pair(test: &str) -> Option<(RedisStore<Client>, RedisStore<Client>)> {
    let Some(url) = cluster_url().await else {
        eprintln!("skipping cluster::{test}: no Redis Cluster could be started");
        return None;
    };
    Some(two_stores(&url, test).await)
}

async fn reserve(store: &impl Store, scope: &ScopeHash, token: FencingToken) -> Reservation {
    store
        .reserve(scope, &FP, token, LEASE.into())
        .await
        .unwrap()
}

/// A waiter as the layer makes one: subscribe, then re-read the scope and be told it is in
/// flight. That answer marks the record, so its complete or release publishes (the store
/// publishes only when a waiter was seen, SPEC section 7).
async fn waiter<St: Store>(store: &St, scope: &ScopeHash) -> St::Subscription {
    let subscription = store.subscribe(scope).await.unwrap();
    assert_eq!(
        reserve(store, scope, FencingToken::generate()).await,
        Reservation::InFlight
    );
    subscription
}

// ---------------------------------------------------------------------------------------
// The shared cases: plain generic functions, stamped below for standalone and cluster
// ---------------------------------------------------------------------------------------

/// Every row of the table in core's `store.rs`.
async fn semantics_table(store: impl Store) {
    let s = scope();
    let owner = FencingToken::generate();
    let stranger = FencingToken::generate();

    // absent
    assert!(
        !store.renew(&s, owner, LEASE).await.unwrap(),
        "renew on absent"
    );
    assert!(
        !store.release(&s, owner).await.unwrap(),
        "release on absent"
    );
    let rec = response(Bytes::from_static(b"{\"id\":1}"));
    let done = store.complete(&s, owner, &rec, TTL).await.unwrap();
    assert_eq!(done, Completion::Fenced, "complete on absent");
    assert_eq!(reserve(&store, &s, owner).await, Reservation::Reserved);

    // pending, other token
    assert_eq!(reserve(&store, &s, stranger).await, Reservation::InFlight);
    let mismatch = store
        .reserve(&s, &OTHER_FP, stranger, LEASE.into())
        .await
        .unwrap();
    assert_eq!(
        mismatch,
        Reservation::Mismatch,
        "other payload while in flight"
    );
    assert!(!store.renew(&s, stranger, LEASE).await.unwrap());
    let fenced = store.complete(&s, stranger, &rec, TTL).await.unwrap();
    assert_eq!(fenced, Completion::Fenced);
    assert!(!store.release(&s, stranger).await.unwrap());

    // pending, same token
    assert!(store.renew(&s, owner, LEASE).await.unwrap());
    let stored = store.complete(&s, owner, &rec, TTL).await.unwrap();
    assert_eq!(stored, Completion::Stored);

    // completed
    let again = store
        .complete(&s, owner, &response("other"), TTL)
        .await
        .unwrap();
    assert_eq!(
        again,
        Completion::Stored,
        "a retried complete is idempotent"
    );
    assert!(
        store.renew(&s, owner, LEASE).await.unwrap(),
        "renew after complete"
    );
    assert!(!store.renew(&s, stranger, LEASE).await.unwrap());
    assert!(
        !store.release(&s, owner).await.unwrap(),
        "completed is never released"
    );
    let fenced = store.complete(&s, stranger, &rec, TTL).await.unwrap();
    assert_eq!(fenced, Completion::Fenced);
    assert_eq!(
        reserve(&store, &s, stranger).await,
        Reservation::Completed(rec.clone()),
        "the first record is replayed, not the retried one"
    );
    let mismatch = store
        .reserve(&s, &OTHER_FP, stranger, LEASE.into())
        .await
        .unwrap();
    assert_eq!(
        mismatch,
        Reservation::Mismatch,
        "other payload when completed"
    );

    // release: deletes the lease and the fingerprint
    let s = scope();
    assert_eq!(reserve(&store, &s, owner).await, Reservation::Reserved);
    assert!(store.release(&s, owner).await.unwrap());
    assert!(!store.release(&s, owner).await.unwrap(), "released once");
    let next = FencingToken::generate();
    let fresh = store
        .reserve(&s, &OTHER_FP, next, LEASE.into())
        .await
        .unwrap();
    assert_eq!(
        fresh,
        Reservation::Reserved,
        "released key: any payload may reserve"
    );
    let fenced = store.complete(&s, owner, &rec, TTL).await.unwrap();
    assert_eq!(fenced, Completion::Fenced, "the released token is dead");
    let stored = store
        .complete(&s, next, &Record::NotReplayable, TTL)
        .await
        .unwrap();
    assert_eq!(stored, Completion::Stored);
    let replay = store
        .reserve(&s, &OTHER_FP, owner, LEASE.into())
        .await
        .unwrap();
    assert_eq!(replay, Reservation::Completed(Record::NotReplayable));
}

/// A reserve sent again with the same token (fred re-sends a command after a reconnect;
/// a reserve that timed out locally may have run) finds its own pending record and is
/// answered `Reserved`, not `InFlight` for a lease nobody else holds. Another token still
/// gets `InFlight`, and once the owner completed, its token gets the replay.
async fn reserve_again_with_the_same_token(store: impl Store) {
    let s = scope();
    let owner = FencingToken::generate();
    assert_eq!(reserve(&store, &s, owner).await, Reservation::Reserved);
    assert_eq!(
        reserve(&store, &s, owner).await,
        Reservation::Reserved,
        "the same token re-sent: still its own lease"
    );
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::InFlight,
        "another token is still in flight"
    );
    assert_eq!(
        reserve(&store, &s, owner).await,
        Reservation::Reserved,
        "a waiter's mark on the record changes nothing for the owner"
    );
    let other_payload = store
        .reserve(&s, &OTHER_FP, owner, LEASE.into())
        .await
        .unwrap();
    assert_eq!(other_payload, Reservation::Mismatch);
    // The lease is still the owner's: it renews, completes, and is replayed.
    assert!(store.renew(&s, owner, LEASE).await.unwrap());
    let rec = response("once");
    assert_eq!(
        store.complete(&s, owner, &rec, TTL).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        reserve(&store, &s, owner).await,
        Reservation::Completed(rec),
        "after completion the same token gets the replay"
    );
}

/// Records come back byte for byte: every byte value in body and headers, and 4 MiB.
async fn binary_records(store: impl Store) {
    let big: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    for body in [Vec::new(), all_bytes(), big] {
        let s = scope();
        let token = FencingToken::generate();
        assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
        let rec = response(body.clone());
        let stored = store.complete(&s, token, &rec, TTL).await.unwrap();
        assert_eq!(stored, Completion::Stored);
        match reserve(&store, &s, FencingToken::generate()).await {
            Reservation::Completed(Record::Response(got)) => {
                assert_eq!(got.body.len(), body.len());
                assert!(got.body == body, "body of {} bytes changed", body.len());
                assert_eq!(Record::Response(got), rec);
            }
            other => panic!("expected the stored record, got {other:?}"),
        }
    }
}

/// A lease taken over after expiry: the stale owner can neither store nor delete.
async fn fencing_after_lease_expiry(store: impl Store) {
    let short = Duration::from_millis(150);
    let s = scope();
    let stale = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, stale, short.into()).await.unwrap(),
        Reservation::Reserved
    );
    tokio::time::sleep(Duration::from_millis(400)).await;

    let newer = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, newer, LEASE.into()).await.unwrap(),
        Reservation::Reserved
    );
    assert!(
        !store.renew(&s, stale, LEASE).await.unwrap(),
        "the stale lease is lost"
    );
    let stale_rec = response("stale");
    let fenced = store.complete(&s, stale, &stale_rec, TTL).await.unwrap();
    assert_eq!(fenced, Completion::Fenced);
    assert!(
        !store.release(&s, stale).await.unwrap(),
        "the stale owner cannot delete"
    );
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::InFlight
    );

    let rec = response("newer");
    assert_eq!(
        store.complete(&s, newer, &rec, TTL).await.unwrap(),
        Completion::Stored
    );
    let fenced = store.complete(&s, stale, &stale_rec, TTL).await.unwrap();
    assert_eq!(
        fenced,
        Completion::Fenced,
        "not even over a completed record"
    );
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::Completed(rec)
    );
}

/// Leases and TTLs end on Redis's clock; renewals extend a lease.
async fn ttl_expiry(store: impl Store) {
    // A completed record lives its TTL, then the key is free again.
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    let rec = response("short-lived");
    let stored = store
        .complete(&s, token, &rec, Duration::from_millis(300))
        .await;
    assert_eq!(stored.unwrap(), Completion::Stored);
    let replay = reserve(&store, &s, FencingToken::generate()).await;
    assert_eq!(replay, Reservation::Completed(rec));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::Reserved
    );

    // A renewed lease outlives its first length; an unrenewed one does not.
    let s = scope();
    let token = FencingToken::generate();
    let lease = Duration::from_millis(300);
    assert_eq!(
        store.reserve(&s, &FP, token, lease.into()).await.unwrap(),
        Reservation::Reserved
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(store.renew(&s, token, lease).await.unwrap());
    }
    // 450 ms after the reservation, with a 300 ms lease: still held thanks to renewals.
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::InFlight
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !store.renew(&s, token, lease).await.unwrap(),
        "lease ran out"
    );
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::Reserved
    );
}

/// 64 concurrent first requests for one scope from two app servers: one owner.
async fn concurrent_reserves_one_winner(a: impl Store, b: impl Store) {
    let s = scope();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (a, b) = (a.clone(), b.clone());
            tokio::spawn(async move {
                let token = FencingToken::generate();
                if i % 2 == 0 {
                    a.reserve(&s, &FP, token, LEASE.into()).await
                } else {
                    b.reserve(&s, &FP, token, LEASE.into()).await
                }
            })
        })
        .collect();
    let mut reserved = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            Reservation::Reserved => reserved += 1,
            Reservation::InFlight => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        reserved, 1,
        "exactly one of 64 concurrent reserves owns the scope"
    );
}

/// A waiter on app server B is woken by A's complete and by A's release; two waiters on
/// one scope share the subscription; unsubscribing and subscribing again works.
async fn wake_across_processes<A: Store, B: Store>(a: A, b: B) {
    // complete
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    let mut first = b.subscribe(&s).await.unwrap();
    let mut second = b.subscribe(&s).await.unwrap();
    assert_eq!(
        reserve(&b, &s, FencingToken::generate()).await,
        Reservation::InFlight
    );
    // Spurious wake-ups are allowed, but this store has none while nothing happens: so
    // the wake-ups below come from the published messages, not from a timer or a
    // reconnect.
    let quiet = tokio::time::timeout(Duration::from_millis(200), first.changed()).await;
    assert!(quiet.is_err(), "woken before anything happened");
    let rec = response("done");
    assert_eq!(
        a.complete(&s, token, &rec, TTL).await.unwrap(),
        Completion::Stored
    );
    tokio::time::timeout(WAKE, first.changed())
        .await
        .expect("B's waiter woken by A's complete");
    tokio::time::timeout(WAKE, second.changed())
        .await
        .expect("B's second waiter woken by the same message");
    assert_eq!(
        reserve(&b, &s, FencingToken::generate()).await,
        Reservation::Completed(rec)
    );
    drop((first, second));

    // release
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    let mut waiter = self::waiter(&b, &s).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), waiter.changed()).await;
    assert!(quiet.is_err(), "woken before anything happened");
    assert!(a.release(&s, token).await.unwrap());
    tokio::time::timeout(WAKE, waiter.changed())
        .await
        .expect("B's waiter woken by A's release");
    drop(waiter);

    // The last waiter's drop unsubscribes in the background; a new waiter subscribes
    // again and is woken as before.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = FencingToken::generate();
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    let mut waiter = self::waiter(&b, &s).await;
    assert_eq!(
        a.complete(&s, token, &response("x"), TTL).await.unwrap(),
        Completion::Stored
    );
    tokio::time::timeout(WAKE, waiter.changed())
        .await
        .expect("woken after unsubscribe and subscribe again");
}

macro_rules! store_cases {
    ($pair:path) => {
        use super::*;

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn semantics_table() {
            if let Some((a, _)) = $pair("semantics_table").await {
                super::semantics_table(a).await
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn reserve_again_with_the_same_token() {
            if let Some((a, _)) = $pair("reserve_again_with_the_same_token").await {
                super::reserve_again_with_the_same_token(a).await
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn binary_records() {
            if let Some((a, _)) = $pair("binary_records").await {
                super::binary_records(a).await
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn fencing_after_lease_expiry() {
            if let Some((a, _)) = $pair("fencing_after_lease_expiry").await {
                super::fencing_after_lease_expiry(a).await
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn ttl_expiry() {
            if let Some((a, _)) = $pair("ttl_expiry").await {
                super::ttl_expiry(a).await
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_reserves_one_winner() {
            if let Some((a, b)) = $pair("concurrent_reserves_one_winner").await {
                super::concurrent_reserves_one_winner(a, b).await
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn wake_across_processes() {
            if let Some((a, b)) = $pair("wake_across_processes").await {
                super::wake_across_processes(a, b).await
            }
        }
    };
}

mod standalone {
    store_cases!(standalone_pair);
}

mod cluster {
    store_cases!(cluster_pair);

    /// `check()` on a cluster: its SPUBLISH probe is routed by the channel's slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_can_publish() {
        let Some((store, _)) = cluster_pair("check_can_publish").await else {
            return;
        };
        let report = store.check().await.unwrap();
        assert_eq!(report.can_publish(), Some(true), "{report}");
    }

    /// After `SCRIPT FLUSH` on every primary each reserve still works, through the
    /// `EVAL` fallback (2 commands) that caches the script on its node again (then 1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn noscript_recovery_and_round_trips() {
        let Some((store, _)) = cluster_pair("noscript_recovery_and_round_trips").await else {
            return;
        };
        // Round trips per operation (store counters; commandstats are shared by tests).
        let before = store.round_trips();
        let s = scope();
        let token = FencingToken::generate();
        assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
        let stored = store
            .complete(&s, token, &response("r"), TTL)
            .await
            .unwrap();
        assert_eq!(stored, Completion::Stored);
        assert_eq!(
            store.round_trips().total - before.total,
            2,
            "new request = 2"
        );
        let before = store.round_trips();
        let replay = reserve(&store, &s, FencingToken::generate()).await;
        assert!(matches!(replay, Reservation::Completed(_)));
        assert_eq!(store.round_trips().total - before.total, 1, "replay = 1");

        store.client().script_flush_cluster(false).await.unwrap();
        let scopes: Vec<ScopeHash> = (0..12).map(|_| scope()).collect();
        let before = store.round_trips();
        for s in &scopes {
            assert_eq!(
                reserve(&store, s, FencingToken::generate()).await,
                Reservation::Reserved
            );
        }
        let spent = store.round_trips().reserve - before.reserve;
        // One fallback per master at least (12 random scopes cover the 3 masters with
        // overwhelming probability; at least one certainly needed it).
        assert!(
            (13..=24).contains(&spent),
            "{spent} commands for 12 reserves after flush"
        );
        let before = store.round_trips();
        for s in &scopes {
            assert_eq!(
                reserve(&store, s, FencingToken::generate()).await,
                Reservation::InFlight
            );
        }
        assert_eq!(
            store.round_trips().reserve - before.reserve,
            12,
            "scripts cached again"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Standalone only: commandstats, NOSCRIPT, check(), decode errors, faults, Pool
// ---------------------------------------------------------------------------------------

fn scripts_run(port: u16) -> u64 {
    client_commands(port, "evalsha") + client_commands(port, "eval")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_match_commandstats() {
    let server = RedisServer::start();
    let store = store(&server.url(), "rt:").await;
    let port = server.port();
    let measure = |server_before: u64, store_before: u64| {
        (
            scripts_run(port) - server_before,
            store.round_trips().total - store_before,
        )
    };

    // New request: reserve + complete.
    let (server_before, store_before) = (scripts_run(port), store.round_trips().total);
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    let rec = response(all_bytes());
    assert_eq!(
        store.complete(&s, token, &rec, TTL).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        measure(server_before, store_before),
        (2, 2),
        "new request = 2 commands"
    );
    assert_eq!(
        client_commands(port, "eval"),
        0,
        "no EVAL fallback after init"
    );

    // Replay.
    let (server_before, store_before) = (scripts_run(port), store.round_trips().total);
    let replay = reserve(&store, &s, FencingToken::generate()).await;
    assert_eq!(replay, Reservation::Completed(rec));
    assert_eq!(
        measure(server_before, store_before),
        (1, 1),
        "replay = 1 command"
    );

    // Renewal and release: 1 each.
    let s = scope();
    let token = FencingToken::generate();
    reserve(&store, &s, token).await;
    let (server_before, store_before) = (scripts_run(port), store.round_trips().total);
    assert!(store.renew(&s, token, LEASE).await.unwrap());
    assert_eq!(
        measure(server_before, store_before),
        (1, 1),
        "renewal = 1 command"
    );
    let (server_before, store_before) = (scripts_run(port), store.round_trips().total);
    assert!(store.release(&s, token).await.unwrap());
    assert_eq!(
        measure(server_before, store_before),
        (1, 1),
        "release = 1 command"
    );

    let rt = store.round_trips();
    assert_eq!(
        (rt.reserve, rt.complete, rt.renew, rt.release),
        (3, 1, 1, 1)
    );
    assert_eq!(rt.total, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noscript_falls_back_to_eval_and_recaches() {
    let server = RedisServer::start();
    let port = server.port();
    let store = store(&server.url(), "noscript:").await;
    assert_eq!(
        reserve(&store, &scope(), FencingToken::generate()).await,
        Reservation::Reserved
    );

    assert_eq!(redis_cli(port, &["SCRIPT", "FLUSH"]).trim(), "OK");
    let (server_before, store_before) = (scripts_run(port), store.round_trips());
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    assert_eq!(
        scripts_run(port) - server_before,
        2,
        "EVALSHA (NOSCRIPT) + EVAL"
    );
    assert_eq!(store.round_trips().reserve - store_before.reserve, 2);
    assert_eq!(client_commands(port, "eval"), 1);

    // EVAL cached the reserve script: the next reserve is one EVALSHA again.
    let before = scripts_run(port);
    assert_eq!(
        reserve(&store, &scope(), FencingToken::generate()).await,
        Reservation::Reserved
    );
    assert_eq!(scripts_run(port) - before, 1);

    // The other scripts recover the same way, and the data they act on is intact.
    let rec = response("after flush");
    assert_eq!(
        store.complete(&s, token, &rec, TTL).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::Completed(rec)
    );

    // load_scripts() puts them all back.
    redis_cli(port, &["SCRIPT", "FLUSH"]);
    store.load_scripts().await.unwrap();
    let before = scripts_run(port);
    let s = scope();
    let token = FencingToken::generate();
    reserve(&store, &s, token).await;
    assert!(store.renew(&s, token, LEASE).await.unwrap());
    assert!(store.release(&s, token).await.unwrap());
    assert_eq!(scripts_run(port) - before, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_record_version_is_a_decode_error() {
    let store = store(&redis_url().await, &support::unique_prefix("decode")).await;
    let hset = CustomCommand::new_static("HSET", ClusterHash::FirstKey, false);
    for (blob, expected) in [
        (vec![9u8, 0, 0, 201], DecodeError::UnknownVersion(9)),
        (vec![1u8, 0, 0], DecodeError::Truncated),
        (Vec::new(), DecodeError::Truncated),
    ] {
        let s = scope();
        let key = store.key(&s);
        let args: Vec<Value> = vec![
            key.clone().into(),
            "st".into(),
            "c".into(),
            "tok".into(),
            Value::Bytes(Bytes::copy_from_slice(&FencingToken::generate().to_bytes())),
            "fp".into(),
            Value::Bytes(Bytes::copy_from_slice(FP.as_bytes())),
            "rec".into(),
            Value::Bytes(Bytes::from(blob)),
        ];
        let _: Value = store.client().custom(hset.clone(), args).await.unwrap();
        let _: Value = store
            .client()
            .custom(
                CustomCommand::new_static("PEXPIRE", ClusterHash::FirstKey, false),
                vec![Value::from(key), Value::Integer(60_000)],
            )
            .await
            .unwrap();
        match store
            .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
            .await
        {
            Err(StoreError::Decode(err)) => assert_eq!(err, expected),
            other => panic!("expected a decode error, got {other:?}"),
        }
    }
}

/// A new key's pending hash, as the reserve script writes it on its fast path (a lapsed
/// lease is not kept: the default) and on its general path (a kept one): the same fields
/// but `le`, and the life the lease terms give it. The fast path repeats what the general
/// one does so that the common call builds nothing it does not use; this holds the two
/// together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_keys_pending_hash_is_the_same_on_both_reserve_paths() {
    let store = store(&redis_url().await, &support::unique_prefix("pending-hash")).await;
    let keep = Duration::from_secs(120);
    for terms in [LEASE.into(), LeaseTerms::new(LEASE).keep_lapsed(keep)] {
        let s = scope();
        let token = FencingToken::generate();
        let reserved = store.reserve(&s, &FP, token, terms).await.unwrap();
        assert_eq!(reserved, Reservation::Reserved);
        let hgetall = CustomCommand::new_static("HGETALL", ClusterHash::FirstKey, true);
        let fields: HashMap<String, Bytes> = store
            .client()
            .custom(hgetall, vec![store.key(&s)])
            .await
            .unwrap();
        let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        let life: i64 = store.client().pttl(store.key(&s)).await.unwrap();
        let life = Duration::from_millis(u64::try_from(life).unwrap());
        assert_eq!(fields["st"].as_ref(), b"p");
        assert_eq!(fields["tok"].as_ref(), token.to_bytes().as_slice());
        assert_eq!(fields["fp"].as_ref(), FP.as_bytes().as_slice());
        if terms.keep_lapsed.is_some() {
            assert_eq!(names, ["fp", "le", "st", "tok"]);
            assert!(life > LEASE && life <= keep, "{life:?}");
        } else {
            assert_eq!(names, ["fp", "st", "tok"]);
            assert!(
                life > LEASE - Duration::from_secs(5) && life <= LEASE,
                "{life:?}"
            );
        }
        // And both answer as a lease: in flight for another token, reserved for this one.
        let other = store
            .reserve(&s, &FP, FencingToken::generate(), terms)
            .await;
        assert_eq!(other.unwrap(), Reservation::InFlight);
        assert_eq!(
            store.reserve(&s, &FP, token, terms).await.unwrap(),
            Reservation::Reserved
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_eviction_policies() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let store = store(&server.url(), "check:").await;
    let report = store.check().await.unwrap();
    assert_eq!(report.maxmemory_policy(), Some("allkeys-lru"));
    assert!(!report.is_ok());
    assert!(
        report.warnings().iter().any(|w| w.contains("allkeys-lru")),
        "{report}"
    );
    assert!(
        report.to_string().contains("warning: maxmemory-policy"),
        "{report}"
    );

    redis_cli(
        server.port(),
        &["CONFIG", "SET", "maxmemory-policy", "volatile-lru"],
    );
    let report = store.check().await.unwrap();
    assert!(
        report.warnings().iter().any(|w| w.contains("volatile-lru")),
        "{report}"
    );

    redis_cli(
        server.port(),
        &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
    );
    let report = store.check().await.unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.maxmemory_policy(), Some("noeviction"));
    assert_eq!(report.can_publish(), Some(true), "{report}");
    assert!(
        report.to_string().contains("publish on channels: yes"),
        "{report}"
    );
    let version = report.server_version().expect("INFO answered");
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "{version}"
    );
    assert!(report.to_string().contains(version), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_cannot_verify_without_config_and_is_not_an_error() {
    // As on managed Redis: CONFIG renamed away.
    let server = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let store = store(&server.url(), "check:").await;
    let report = store
        .check()
        .await
        .expect("an unverifiable policy is not an error");
    assert_eq!(report.maxmemory_policy(), None);
    assert!(
        report
            .warnings()
            .iter()
            .any(|w| w.contains("cannot verify")),
        "{report}"
    );
    assert!(report.to_string().contains("cannot verify"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_unreachable_redis_is_an_error() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = Config::from_url(&format!("redis://127.0.0.1:{port}")).unwrap();
    let client = Builder::from_config(config).build().unwrap();
    assert!(client.init().await.is_err(), "nothing listens on {port}");
    let store = RedisStore::new(client).command_timeout(Duration::from_millis(500));
    let started = Instant::now();
    assert!(store.check().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(store.clone().init().await.is_err());
    let err = store
        .reserve(&scope(), &FP, FencingToken::generate(), LEASE.into())
        .await;
    assert!(matches!(err, Err(StoreError::Backend(_))), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_connection_times_out_as_backend_error() {
    let server = RedisServer::start();
    let upstream = ([127, 0, 0, 1], server.port()).into();
    let proxy = support::proxy::FaultProxy::start(upstream).await;
    let store = store(&proxy.url(), "blackhole:")
        .await
        .command_timeout(Duration::from_millis(300));
    assert_eq!(
        reserve(&store, &scope(), FencingToken::generate()).await,
        Reservation::Reserved
    );

    proxy.blackhole();
    let started = Instant::now();
    let result = store
        .reserve(&scope(), &FP, FencingToken::generate(), LEASE.into())
        .await;
    let elapsed = started.elapsed();
    match result {
        Err(StoreError::Backend(source)) => {
            let source = source.downcast_ref::<RedisStoreError>();
            assert!(
                matches!(source, Some(RedisStoreError::Timeout(_))),
                "{source:?}"
            );
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    let subscribe = store.subscribe(&scope()).await;
    assert!(
        matches!(subscribe, Err(StoreError::Backend(_))),
        "{subscribe:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_resubscribes_after_a_reconnect() {
    let mut server = RedisServer::start();
    let (a, b) = two_stores(&server.url(), "reconnect").await;
    let s = scope();
    let mut waiter = b.subscribe(&s).await.unwrap();
    let subscribes = b.round_trips().subscribe;

    tokio::task::block_in_place(|| server.restart());
    // The reconnect wakes every waiter (a message may have been lost meanwhile)...
    tokio::time::timeout(Duration::from_secs(15), waiter.changed())
        .await
        .expect("waiters are woken after the subscriber reconnects");
    assert!(
        b.round_trips().subscribe > subscribes,
        "SSUBSCRIBE sent again"
    );

    // ...and the subscription is live again: A's complete reaches B.
    let token = FencingToken::generate();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match a.reserve(&s, &FP, token, LEASE.into()).await {
            Ok(r) => {
                assert_eq!(r, Reservation::Reserved);
                break;
            }
            Err(err) if Instant::now() < deadline => {
                eprintln!("A not reconnected yet: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("A did not reconnect: {err}"),
        }
    }
    // B re-reads and is told "in flight", as a waiting layer would be.
    assert_eq!(
        reserve(&b, &s, FencingToken::generate()).await,
        Reservation::InFlight
    );
    assert_eq!(
        a.complete(&s, token, &response("y"), TTL).await.unwrap(),
        Completion::Stored
    );
    tokio::time::timeout(WAKE, waiter.changed())
        .await
        .expect("woken through the resubscribed channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_pool() {
    let url = redis_url().await;
    let pool = Builder::from_config(Config::from_url(&url).unwrap())
        .build_pool(3)
        .unwrap();
    pool.init().await.unwrap();
    let prefix = support::unique_prefix("pool");
    let on_pool = RedisStore::new(pool).prefix(&prefix).init().await.unwrap();
    semantics_table(on_pool.clone()).await;
    // The pool's subscriber (built from the pool's config) is woken by a plain client's
    // store, and the other way round.
    let on_client = store(&url, &prefix).await;
    wake_across_processes(on_client.clone(), on_pool.clone()).await;
    wake_across_processes(on_pool, on_client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_share_one_subscription_and_the_last_one_unsubscribes() {
    let server = RedisServer::start();
    let store = store(&server.url(), "refs:").await;
    let s = scope();
    let channel = store.channel(&s);
    let server_subscribers = || {
        redis_cli(server.port(), &["PUBSUB", "SHARDNUMSUB", &channel])
            .lines()
            .nth(1)
            .map(str::to_owned)
    };

    let first = store.subscribe(&s).await.unwrap();
    let second = store.subscribe(&s).await.unwrap();
    assert_eq!(
        server_subscribers().as_deref(),
        Some("1"),
        "one SSUBSCRIBE on the server"
    );
    assert_eq!(
        store.round_trips().subscribe,
        1,
        "the second waiter shares it"
    );

    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server_subscribers().as_deref(),
        Some("1"),
        "a waiter is left"
    );
    assert_eq!(store.round_trips().unsubscribe, 0);

    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server_subscribers().as_deref() != Some("0") {
        assert!(
            Instant::now() < deadline,
            "the last waiter's drop did not unsubscribe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.round_trips().unsubscribe, 1);

    // Subscribing again after that works and costs one SSUBSCRIBE more.
    let mut again = store.subscribe(&s).await.unwrap();
    assert_eq!(server_subscribers().as_deref(), Some("1"));
    assert_eq!(store.round_trips().subscribe, 2);
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    assert_eq!(
        reserve(&store, &s, FencingToken::generate()).await,
        Reservation::InFlight,
        "the waiter re-reads"
    );
    assert!(store.release(&s, token).await.unwrap());
    tokio::time::timeout(WAKE, again.changed())
        .await
        .expect("woken");
}

// ---------------------------------------------------------------------------------------
// Publishing only when a waiter was seen (SPEC section 7)
// ---------------------------------------------------------------------------------------

/// `SPUBLISH`es the server on `port` has run; the ones run inside scripts count too.
fn publishes(port: u16) -> u64 {
    client_commands(port, "spublish")
}

/// Completions and releases that no waiter asked about publish nothing; with a waiter on
/// another app server (another client, so another connection to Redis) exactly one
/// `SPUBLISH` goes out, and it is what wakes the waiter: store-level subscriptions never
/// poll, and the waiter stays quiet until the complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_only_when_a_waiter_was_seen() {
    let server = RedisServer::start();
    let port = server.port();
    let (a, b) = two_stores(&server.url(), "publish").await;
    let before = publishes(port);

    // No waiter: a new request (reserve, complete) and a released one publish nothing.
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    let stored = a
        .complete(&s, token, &response("alone"), TTL)
        .await
        .unwrap();
    assert_eq!(stored, Completion::Stored);
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    assert!(a.release(&s, token).await.unwrap());
    // A replay, a mismatch and a renewal do not publish either.
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    assert!(a.renew(&s, token, LEASE).await.unwrap());
    let other = a
        .reserve(&s, &OTHER_FP, FencingToken::generate(), LEASE.into())
        .await;
    assert_eq!(other.unwrap(), Reservation::Mismatch);
    assert_eq!(
        publishes(port) - before,
        0,
        "nobody waited: no SPUBLISH run"
    );

    // A waiter on B: A's complete publishes once and wakes it.
    let mut woken = waiter(&b, &s).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), woken.changed()).await;
    assert!(quiet.is_err(), "woken before anything happened");
    let before = publishes(port);
    let sent = Instant::now();
    let rec = response("waited");
    let complete = a.complete(&s, token, &rec, TTL);
    let (stored, wake) = tokio::join!(complete, async {
        tokio::time::timeout(Duration::from_secs(2), woken.changed())
            .await
            .expect("B's waiter woken by the publish within 2 s");
        sent.elapsed()
    });
    let round_trip = sent.elapsed();
    assert_eq!(stored.unwrap(), Completion::Stored);
    eprintln!(
        "wake-up latency across processes: {wake:?} from sending the complete \
         (complete's own round trip: {round_trip:?})"
    );
    assert_eq!(publishes(port) - before, 1, "exactly one SPUBLISH");

    // The same for a release, and the mark does not outlive its record: the next owner
    // of the scope, with nobody waiting, publishes nothing.
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    let mut woken = waiter(&b, &s).await;
    let before = publishes(port);
    assert!(a.release(&s, token).await.unwrap());
    tokio::time::timeout(Duration::from_secs(2), woken.changed())
        .await
        .expect("B's waiter woken by A's release");
    assert_eq!(publishes(port) - before, 1, "exactly one SPUBLISH");
    drop(woken);
    let next = FencingToken::generate();
    assert_eq!(reserve(&a, &s, next).await, Reservation::Reserved);
    let stored = a.complete(&s, next, &response("next"), TTL).await.unwrap();
    assert_eq!(stored, Completion::Stored);
    assert_eq!(
        publishes(port) - before,
        1,
        "the new lease had no waiter: no SPUBLISH"
    );
}

/// An operator's forget and resolve wake the scope's waiters on another app server, once
/// each. The scripts build the channel's name from the key; the waiter listens on
/// `RedisStore::channel`, and a store-level subscription never polls, so only a publish on
/// that very channel wakes it within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_and_resolve_wake_waiters_on_another_app_server() {
    let server = RedisServer::start();
    let port = server.port();
    let (a, b) = two_stores(&server.url(), "operator-wake").await;

    // forget: a live lease on A, a waiter on B.
    let s = scope();
    let owner = FencingToken::generate();
    assert_eq!(reserve(&a, &s, owner).await, Reservation::Reserved);
    let mut woken = waiter(&b, &s).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), woken.changed()).await;
    assert!(quiet.is_err(), "woken before anything happened");
    let before = publishes(port);
    assert!(a.forget(&s).await.unwrap());
    tokio::time::timeout(WAKE, woken.changed())
        .await
        .expect("B's waiter woken by A's forget");
    assert_eq!(publishes(port) - before, 1, "exactly one SPUBLISH");
    drop(woken);

    // resolve: a kept lease that lapsed (waited on while it was live), resolved by an
    // operator on A. The lease leaves the waiter's subscribe and reserve a second and a
    // half, so a slow machine still finds it live (a lapsed one would be taken over).
    let s = scope();
    let lease = Duration::from_millis(1500);
    let terms = LeaseTerms::new(lease).keep_lapsed(Duration::from_secs(60));
    let owner = FencingToken::generate();
    let reserved = a.reserve(&s, &FP, owner, terms).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    let mut woken = waiter(&b, &s).await;
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let lapsed = b.reserve(&s, &FP, FencingToken::generate(), terms).await;
    assert_eq!(lapsed.unwrap(), Reservation::Uncertain);
    let before = publishes(port);
    let answer = response("resolved by an operator");
    assert_eq!(a.resolve(&s, &answer, TTL).await.unwrap(), Resolved::Stored);
    tokio::time::timeout(WAKE, woken.changed())
        .await
        .expect("B's waiter woken by A's resolve");
    assert_eq!(publishes(port) - before, 1, "exactly one SPUBLISH");
    assert_eq!(
        reserve(&b, &s, FencingToken::generate()).await,
        Reservation::Completed(answer)
    );
}

// ---------------------------------------------------------------------------------------
// An ACL user without channel permissions (the Redis 7 default for new users)
// ---------------------------------------------------------------------------------------

/// A tiny app for the layer-level cases: `POST /pay` runs a handler that counts its runs
/// and answers 201 `{"run":n}`, after `x-delay-ms` milliseconds if the header is there.
fn app<St: Store>(layer: IdempotencyLayer<St>) -> (axum::Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = move |headers: http::HeaderMap| {
        let runs = counted.clone();
        async move {
            let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = headers
                .get("x-delay-ms")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            if let Some(ms) = delay {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            (StatusCode::CREATED, format!("{{\"run\":{run}}}"))
        }
    };
    let router = axum::Router::new().route("/pay", axum::routing::post(handler).layer(layer));
    (router, runs)
}

/// Sends `POST /pay` with `key`; answers the status, whether it was a replay, the body.
async fn pay(router: &axum::Router, key: &str, delay_ms: u64) -> (StatusCode, bool, Bytes) {
    let request = http::Request::post("/pay")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .header("x-delay-ms", delay_ms.to_string())
        .body(axum::body::Body::from("{}"))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, body)
}

/// `warn!` and `error!` events, captured by a thread-local subscriber: with a
/// current-thread runtime every task of the test (the layer's, fred's, the store's) runs
/// on the thread that installed it.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() <= tracing::Level::WARN {
            let mut line = format!("{} {}:", meta.level(), meta.target());
            event.record(
                &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                    line.push_str(&format!(" {}={value:?}", field.name()));
                },
            );
            self.0.lock().unwrap().push(line);
        }
    }
}

/// `name`'s `failed_calls` in `INFO commandstats` (errors while the command ran).
fn failed_calls(port: u16, name: &str) -> u64 {
    let stats = redis_cli(port, &["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{name}:");
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|line| {
            line.split(',')
                .find_map(|kv| kv.strip_prefix("failed_calls="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// A user made with `ACL SETUSER` and no channel rule gets NOPERM on every `SPUBLISH`
/// (`acl-pubsub-default resetchannels`, the Redis 7 default). Publishing is best effort
/// (`redis.pcall`): a new request still costs exactly 2 commands, none of them fails and
/// nothing is logged; a release still reports that it deleted; `check()` says waiters
/// fall back to polling; and a waiter gets the replay by polling, with one warning per
/// store for the refused subscription, not one per request.
#[tokio::test] // current-thread: see `Warnings`
async fn acl_user_without_channel_permissions() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let server = RedisServer::start();
    let port = server.port();
    let ok = redis_cli(
        port,
        &[
            "ACL",
            "SETUSER",
            "limited",
            "on",
            ">pw",
            "~*",
            "+@all",
            "resetchannels",
        ],
    );
    assert_eq!(ok.trim(), "OK");
    let url = format!("redis://limited:pw@127.0.0.1:{port}");
    let store = store(&url, "acl:").await;
    let (owner, waiter_store) = (store.clone(), support::store::store(&url, "acl:").await);

    // check(): the ACL shows, as a warning (init logged it too).
    let report = store.check().await.unwrap();
    assert_eq!(report.can_publish(), Some(false), "{report}");
    assert!(
        report.warnings().iter().any(|w| w.contains(
            "cannot publish on the store's channels (ACL): waiters fall back to polling"
        )),
        "{report}"
    );
    warnings.take();

    // A new request: 2 commands, no failed script, no warning, no retried complete.
    let (router, runs) = app(IdempotencyLayer::new(owner.clone()).global_scope());
    redis_cli(port, &["CONFIG", "RESETSTAT"]);
    let sent = owner.round_trips();
    let (status, replayed, body) = pay(&router, "new", 0).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{body:?}");
    assert_eq!(owner.round_trips().total - sent.total, 2, "store commands");
    assert_eq!(client_commands(port, "evalsha"), 2, "commandstats evalsha");
    assert_eq!(failed_calls(port, "evalsha"), 0, "no script failed");
    assert_eq!(warnings.take(), Vec::<String>::new(), "nothing logged");
    let sent = owner.round_trips();
    let (status, replayed, replay) = pay(&router, "new", 0).await;
    assert_eq!(
        (status, replayed, replay),
        (StatusCode::CREATED, true, body)
    );
    assert_eq!(
        owner.round_trips().total - sent.total,
        1,
        "replay = 1 command"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // With a waiter seen, complete and release try to publish, are refused, and still
    // report what they wrote.
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    let other = FencingToken::generate();
    assert_eq!(reserve(&store, &s, other).await, Reservation::InFlight);
    assert!(
        store.release(&s, token).await.unwrap(),
        "release deleted the lease and says so"
    );
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    assert_eq!(reserve(&store, &s, other).await, Reservation::InFlight);
    let rec = response("refused publish");
    assert_eq!(
        store.complete(&s, token, &rec, TTL).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        reserve(&store, &s, other).await,
        Reservation::Completed(rec)
    );

    // Wait mode on another app server: the owner runs 300 ms; two waiters get the replay
    // by polling. The refused SSUBSCRIBE is sent once and warned about once.
    let (waiting, _) = app(IdempotencyLayer::new(waiter_store.clone())
        .global_scope()
        .in_flight(InFlight::Wait(Duration::from_secs(10))));
    warnings.take();
    let (first, second, third) = tokio::join!(
        pay(&router, "waited", 300),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            pay(&waiting, "waited", 0).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            pay(&waiting, "waited", 0).await
        },
    );
    assert_eq!((first.0, first.1), (StatusCode::CREATED, false));
    assert_eq!(second, (StatusCode::CREATED, true, first.2.clone()));
    assert_eq!(third, (StatusCode::CREATED, true, first.2.clone()));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        waiter_store.round_trips().subscribe,
        1,
        "SSUBSCRIBE sent once"
    );
    let logged = warnings.take();
    assert_eq!(
        logged.len(),
        1,
        "one warning for the refused subscription: {logged:?}"
    );
    assert!(logged[0].contains("polling"), "{logged:?}");
}

/// Durations past what Redis accepts, given through the `Store` API (the layer caps its
/// own at `MAX_TTL`): a lease and a TTL of `Duration::MAX` are cut to `MAX_TTL`, never an
/// expiry Redis refuses after the script wrote (a completed record left under the lease's
/// expiry, and an error for a record that was stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_past_redis_are_cut_to_the_longest_ttl() {
    let store = store(&redis_url().await, &support::unique_prefix("huge")).await;
    let s = scope();
    let token = FencingToken::generate();
    let huge = LeaseTerms::new(Duration::MAX).keep_lapsed(Duration::MAX);
    let reserved = store.reserve(&s, &FP, token, huge).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    assert!(store.renew(&s, token, Duration::MAX).await.unwrap());
    let done = store
        .complete(&s, token, &response("paid"), Duration::MAX)
        .await;
    assert_eq!(done.unwrap(), Completion::Stored);
    let life: i64 = store.client().pttl(store.key(&s)).await.unwrap();
    let longest = i64::try_from(tower_idempotency::MAX_TTL.as_millis()).unwrap();
    assert!(life > longest - 60_000 && life <= longest, "{life}");
    let replay = reserve(&store, &s, FencingToken::generate()).await;
    assert_eq!(replay, Reservation::Completed(response("paid")));
}

/// The least-privilege user the crate docs show (`lib.rs`, "ACL users") is enough for
/// everything: the check passes, requests run and replay on a route that runs a lapsed
/// key again and on one that refuses it (a kept lease: `TIME` in the reserve, `HDEL` in
/// the complete), waiters are woken by the publish, and the operator's calls (inspect,
/// resolve, forget) and a kept lease's renewal run. Every command any script runs is
/// reached, so a rule missing from the docs fails here: Redis checks a script's
/// commands against the user too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_acl_user_from_the_docs() {
    let server = RedisServer::start();
    let port = server.port();
    let rules = "on >secret ~idem:* &idem:* +@scripting +hmget +hset +hdel +pexpire +pttl \
                 +del +time +spublish +ssubscribe +sunsubscribe +ping +info +config|get \
                 +client|id";
    let mut args = vec!["ACL", "SETUSER", "app"];
    args.extend(rules.split(' '));
    assert_eq!(redis_cli(port, &args).trim(), "OK");
    let url = format!("redis://app:secret@127.0.0.1:{port}");
    let (a, b) = (store(&url, "idem:").await, store(&url, "idem:").await);

    let report = a.check().await.unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.can_publish(), Some(true));

    let (router, runs) = app(IdempotencyLayer::new(a.clone()).global_scope());
    let (status, replayed, body) = pay(&router, "k", 0).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{body:?}");
    let replay = pay(&router, "k", 0).await;
    assert_eq!(replay, (StatusCode::CREATED, true, body));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&a, &s, token).await, Reservation::Reserved);
    let mut woken = waiter(&b, &s).await;
    assert!(a.release(&s, token).await.unwrap());
    tokio::time::timeout(WAKE, woken.changed())
        .await
        .expect("woken by the publish");
    assert_eq!(b.round_trips().subscribe, 1);

    // A route that refuses uncertain keys keeps every lease past its lapse.
    let refusing = IdempotencyLayer::new(a.clone())
        .global_scope()
        .uncertain(Uncertain::Refuse);
    let (router, runs) = app(refusing);
    let (status, replayed, body) = pay(&router, "refusing", 0).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{body:?}");
    let replay = pay(&router, "refusing", 0).await;
    assert_eq!(replay, (StatusCode::CREATED, true, body));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A kept lease: renewed, inspected, completed; the record corrected and forgotten.
    let s = scope();
    let owner = FencingToken::generate();
    let kept = LeaseTerms::new(LEASE).keep_lapsed(TTL);
    let reserved = a.reserve(&s, &FP, owner, kept).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    assert!(a.renew(&s, owner, LEASE).await.unwrap());
    let state = a.inspect(&s).await.unwrap();
    assert!(matches!(state, KeyState::InFlight { .. }), "{state:?}");
    let done = a.complete(&s, owner, &response("paid"), TTL).await;
    assert_eq!(done.unwrap(), Completion::Stored);
    let state = a.inspect(&s).await.unwrap();
    assert!(matches!(state, KeyState::Completed { .. }), "{state:?}");
    let answer = response("corrected by an operator");
    assert_eq!(a.resolve(&s, &answer, TTL).await.unwrap(), Resolved::Stored);
    assert!(a.forget(&s).await.unwrap());
    assert_eq!(a.inspect(&s).await.unwrap(), KeyState::Absent);
    // A kept lease that lapsed: uncertain, then resolved by an operator.
    let s = scope();
    let lease = Duration::from_millis(300);
    let kept = LeaseTerms::new(lease).keep_lapsed(TTL);
    let reserved = a.reserve(&s, &FP, owner, kept).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let state = a.inspect(&s).await.unwrap();
    assert!(matches!(state, KeyState::Uncertain { .. }), "{state:?}");
    assert_eq!(a.resolve(&s, &answer, TTL).await.unwrap(), Resolved::Stored);
    assert_eq!(
        reserve(&b, &s, FencingToken::generate()).await,
        Reservation::Completed(answer)
    );

    let errors = redis_cli(port, &["INFO", "errorstats"]);
    let log = redis_cli(port, &["ACL", "LOG"]);
    assert!(!errors.contains("errorstat_"), "{errors}\n{log}");
}

// ---------------------------------------------------------------------------------------
// The local replay tier (SPEC section 7)
// ---------------------------------------------------------------------------------------

/// A completed record this process has read is replayed, and a retry with another payload
/// refused (422), with no command at all: the server's `INFO commandstats` does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replays_send_no_commands() {
    let server = RedisServer::start();
    let port = server.port();
    let store = store(&server.url(), "local:").await;
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    let done = store.complete(&s, token, &response("paid"), TTL).await;
    assert_eq!(done.unwrap(), Completion::Stored);
    // The first replay reads the record from Redis and keeps it.
    let read = reserve(&store, &s, FencingToken::generate()).await;
    assert_eq!(read, Reservation::Completed(response("paid")));
    let evalsha = client_commands(port, "evalsha");
    for _ in 0..10 {
        let again = reserve(&store, &s, FencingToken::generate()).await;
        assert_eq!(again, Reservation::Completed(response("paid")));
    }
    let other = store
        .reserve(&s, &OTHER_FP, FencingToken::generate(), LEASE.into())
        .await
        .unwrap();
    assert_eq!(other, Reservation::Mismatch);
    assert_eq!(client_commands(port, "evalsha"), evalsha, "no command sent");
    assert_eq!(store.round_trips().local_replays, 11);
}

/// A local entry lives no longer than the record's remaining TTL in Redis: a record
/// whose TTL was cut to 300 ms by hand is asked for again once that passed, and is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_entry_never_outlives_the_record_in_redis() {
    let url = redis_url().await;
    let (writer, reader) = two_stores(&url, "local-ttl").await;
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&writer, &s, token).await, Reservation::Reserved);
    let done = writer.complete(&s, token, &response("paid"), TTL).await;
    assert_eq!(done.unwrap(), Completion::Stored);
    // The record has 10 minutes left; cut them to 300 ms before the reader sees it.
    let _: i64 = writer
        .client()
        .pexpire(writer.key(&s), 300, None)
        .await
        .unwrap();
    let seen = reserve(&reader, &s, FencingToken::generate()).await;
    assert_eq!(seen, Reservation::Completed(response("paid")));
    let sent = reader.round_trips().total;
    assert!(reserve(&reader, &s, FencingToken::generate()).await != Reservation::Reserved);
    assert_eq!(
        reader.round_trips().total,
        sent,
        "replayed locally meanwhile"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = reserve(&reader, &s, FencingToken::generate()).await;
    assert_eq!(
        after,
        Reservation::Reserved,
        "Redis's TTL passed: the key is new again"
    );
    assert_eq!(
        reader.round_trips().total,
        sent + 1,
        "asked Redis, not the local tier"
    );
}

/// However long the record lives in Redis, a local entry is replayed for at most
/// `max_age`, then read from Redis again; with the tier off, every replay asks Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_entry_lives_at_most_max_age_and_the_tier_can_be_turned_off() {
    use tower_idempotency::redis::LocalReplays;
    let url = redis_url().await;
    let prefix = support::unique_prefix("local-age");
    let store = store(&url, &prefix).await.local_replays(Some(
        LocalReplays::default().max_age(Duration::from_millis(200)),
    ));
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    let done = store.complete(&s, token, &response("paid"), TTL).await;
    assert_eq!(done.unwrap(), Completion::Stored);
    async fn replays(store: &RedisStore<Client>, s: &ScopeHash, n: u64) -> u64 {
        let before = store.round_trips().total;
        for _ in 0..n {
            let r = reserve(store, s, FencingToken::generate()).await;
            assert_eq!(r, Reservation::Completed(response("paid")));
        }
        store.round_trips().total - before
    }
    assert_eq!(replays(&store, &s, 3).await, 1, "read once, then kept");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        replays(&store, &s, 3).await,
        1,
        "max_age passed: read again, then kept"
    );

    let off = support::store::store(&url, &prefix)
        .await
        .local_replays(None);
    let before = off.round_trips().total;
    for _ in 0..3 {
        let r = reserve(&off, &s, FencingToken::generate()).await;
        assert_eq!(r, Reservation::Completed(response("paid")));
    }
    assert_eq!(
        off.round_trips().total - before,
        3,
        "no local tier: one command each"
    );
    assert_eq!(off.local_replay_bytes(), 0);
}

/// The tier keeps to its byte bound however many records pass through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_tier_keeps_to_its_byte_bound() {
    use tower_idempotency::redis::LocalReplays;
    let bound = 64 * 1024;
    let store = store(&redis_url().await, &support::unique_prefix("local-bound"))
        .await
        .local_replays(Some(LocalReplays::default().max_bytes(bound)));
    let body = Bytes::from(vec![b'x'; 2048]);
    for _ in 0..200 {
        let s = scope();
        let token = FencingToken::generate();
        assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
        let done = store
            .complete(&s, token, &response(body.clone()), TTL)
            .await;
        assert_eq!(done.unwrap(), Completion::Stored);
        let read = reserve(&store, &s, FencingToken::generate()).await;
        assert!(matches!(read, Reservation::Completed(_)));
        assert!(
            store.local_replay_bytes() <= bound,
            "{}",
            store.local_replay_bytes()
        );
    }
    assert!(store.local_replay_bytes() > bound / 2, "the bound is used");
}

/// The tier weighs a record's headers, not only its body: reading a record with 16 KiB of
/// header values and a 2-byte body adds at least those 16 KiB to `local_replay_bytes()`,
/// so large headers cannot slip past the byte bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_tier_weighs_headers() {
    let store = store(&redis_url().await, &support::unique_prefix("local-headers")).await;
    let headers: Vec<(HeaderName, HeaderValue)> = (0..16)
        .map(|i| {
            let name = HeaderName::try_from(format!("x-large-{i}")).unwrap();
            (name, HeaderValue::from_str(&"v".repeat(1024)).unwrap())
        })
        .collect();
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let record = Record::Response(StoredResponse::new(
        StatusCode::CREATED,
        headers,
        Bytes::from_static(b"{}"),
    ));
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(reserve(&store, &s, token).await, Reservation::Reserved);
    let done = store.complete(&s, token, &record, TTL).await;
    assert_eq!(done.unwrap(), Completion::Stored);
    let before = store.local_replay_bytes();
    let read = reserve(&store, &s, FencingToken::generate()).await;
    assert_eq!(read, Reservation::Completed(record.clone()));
    let sent = store.round_trips().total;
    let kept = reserve(&store, &s, FencingToken::generate()).await;
    assert_eq!(kept, Reservation::Completed(record));
    assert_eq!(store.round_trips().total, sent, "answered from the tier");
    let weighed = store.local_replay_bytes() - before;
    assert!(
        weighed >= header_bytes as u64 + 2,
        "a record with {header_bytes} header bytes weighs {weighed}"
    );
}
