//! The shared suite on `RedisStore` against real Redis, plus layer-level checks that only
//! make sense with a store shared between processes: two app servers on two clients, and
//! the round trips one request costs.
#![cfg(feature = "redis")]

use crate::common;
use crate::support;

use std::time::Duration;

use axum::http::StatusCode;
use common::app::{assert_problem, post, send, Harness, Reply};
use futures_util::future::join_all;
use tower_idempotency::{IdempotencyLayer, InFlight};

store_suite!(|| async { support::store::test_store("suite").await });

/// 64 concurrent first requests with one key, split over two app servers with their own
/// fred clients, execute the handler exactly once; all 64 get the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_servers_run_one_key_once() {
    let url = support::redis::redis_url().await;
    let prefix = support::unique_prefix("two-servers");
    let wait = InFlight::Wait(Duration::from_secs(10));
    let a = support::store::store(&url, &prefix).await;
    let b = support::store::store(&url, &prefix).await;
    let server_a = Harness::new(IdempotencyLayer::new(a).global_scope().in_flight(wait));
    let server_b =
        server_a.sharing_counters(IdempotencyLayer::new(b).global_scope().in_flight(wait));
    let requests = (0..64).map(|i| {
        let router = if i % 2 == 0 {
            server_a.router.clone()
        } else {
            server_b.router.clone()
        };
        tokio::spawn(async move {
            send(
                &router,
                common::app::delayed(post("/pay", Some("k"), "{}"), 100),
            )
            .await
        })
    });
    let replies: Vec<Reply> = join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        server_a.runs(),
        1,
        "exactly one execution across both servers"
    );
    assert!(replies
        .iter()
        .all(|r| r.status == StatusCode::CREATED && r.body == replies[0].body));
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
}

/// A new request costs exactly 2 Redis commands (reserve, complete), a replay 1 — or 0
/// once this process has seen the record (the local replay tier), a mismatch 1 or 0 the
/// same way, a release 2 (reserve, release), counted by the store itself.
#[tokio::test]
async fn round_trips_per_request() {
    let store = support::store::test_store("round-trips").await;
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    let mut last = store.round_trips().total;
    let mut step = |reply: Reply, expected: u64, what: &str| {
        let now = store.round_trips().total;
        assert_eq!(now - last, expected, "{what}: {reply:?}");
        last = now;
    };
    step(
        send(&h.router, post("/pay", Some("k"), "{}")).await,
        2,
        "new request",
    );
    step(
        send(&h.router, post("/pay", Some("k"), "{}")).await,
        1,
        "first replay: read from Redis, then kept",
    );
    step(
        send(&h.router, post("/pay", Some("k"), "{}")).await,
        0,
        "replay from the local tier",
    );
    step(
        send(&h.router, post("/pay", Some("k"), "{\"x\":1}")).await,
        0,
        "mismatch from the local tier",
    );
    let bad = common::app::with_header(post("/pay", Some("k2"), "{}"), "x-status", "400");
    step(send(&h.router, bad).await, 2, "released 4xx");
    assert_eq!(store.round_trips().local_replays, 2);

    // Without the local tier every replay and mismatch asks Redis.
    let url = support::redis::redis_url().await;
    let remote = support::store::store(&url, &support::unique_prefix("round-trips-nolocal"))
        .await
        .local_replays(None);
    let h = Harness::new(IdempotencyLayer::new(remote.clone()).global_scope());
    let mut last = remote.round_trips().total;
    for (body, expected, what) in [
        ("{}", 2, "new request"),
        ("{}", 1, "replay"),
        ("{}", 1, "replay again"),
        ("{\"x\":1}", 1, "mismatch"),
    ] {
        let reply = send(&h.router, post("/pay", Some("k"), body)).await;
        let now = remote.round_trips().total;
        assert_eq!(now - last, expected, "{what}: {reply:?}");
        last = now;
    }
    assert_eq!(remote.round_trips().local_replays, 0);
}

/// An unreachable Redis answers 503 `store-unavailable` (fail closed), or passes the
/// request through (fail open); the handler never runs in the first case.
#[tokio::test]
async fn unreachable_redis_is_503_or_pass_through() {
    let mut server = support::redis::RedisServer::start();
    let store = support::store::store(&server.url(), &support::unique_prefix("down")).await;
    server.stop();
    let closed = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    let r = send(&closed.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(closed.runs(), 0);
    let open = Harness::new(IdempotencyLayer::new(store).global_scope().fail_open());
    let r = send(&open.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(open.runs(), 1);
}

/// Tenants and keys made of separators and Cluster hash-tag braces: never a cross-tenant
/// replay, and every Redis key is `{prefix}{<64 hex>}`: raw client keys and tenant ids
/// never reach Redis key names.
#[tokio::test]
async fn hostile_tenants_never_share_scopes_or_reach_key_names() {
    use tower_idempotency::redis::fred::prelude::*;
    let url = support::redis::redis_url().await;
    let prefix = support::unique_prefix("hostile");
    let store = support::store::store(&url, &prefix).await;
    let layer = IdempotencyLayer::new(store).tenant(|parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let h = Harness::new(layer);
    let tenants = ["a", "a:", ":a", "{a}", "}{", "{", "a:b", "a}:{b", ""];
    let keys = ["b", ":b", "{b}", "b}{", "x:y:z"];
    let mut bodies = std::collections::HashSet::new();
    for tenant in tenants {
        for key in keys {
            let req = common::app::with_header(post("/pay", Some(key), "{}"), "x-tenant", tenant);
            let r = send(&h.router, req).await;
            assert_eq!(r.status, StatusCode::CREATED, "{tenant:?} {key:?}");
            assert!(!r.replayed(), "{tenant:?} {key:?} replayed another scope");
            assert!(bodies.insert(r.body.clone()));
        }
    }
    assert_eq!(h.runs(), tenants.len() * keys.len());
    let client = support::store::client(&url).await;
    let found: Vec<String> = client
        .custom(
            tower_idempotency::redis::fred::types::CustomCommand::new_static(
                "KEYS",
                None::<u16>,
                false,
            ),
            vec![format!("{prefix}*")],
        )
        .await
        .expect("KEYS");
    assert_eq!(found.len(), tenants.len() * keys.len());
    for key in found {
        let rest = key.strip_prefix(&prefix).expect("prefixed");
        let hex = rest
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .expect("hash tag");
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key}"
        );
    }
}

/// A record written by a newer version (unknown version byte) during a rolling upgrade:
/// 503 even under `fail_open`, and the handler never runs — passing the request through
/// would run it a second time for a key that already completed.
#[tokio::test]
async fn an_undecodable_record_is_503_even_when_failing_open() {
    use tower_idempotency::redis::fred::prelude::*;
    use tower_idempotency::store::{Fingerprint, ScopeHash};
    let store = support::store::test_store("undecodable").await;
    let h = Harness::new(
        IdempotencyLayer::new(store.clone())
            .global_scope()
            .fail_open(),
    );
    // What the layer will compute for the request below.
    let req = || post("/pay", Some("k"), "{}");
    let probe = req();
    let scope = ScopeHash::new(None, probe.method(), "/pay", b"k");
    let fingerprint = Fingerprint::new(
        probe.method(),
        "/pay",
        None,
        probe.headers(),
        &[axum::http::header::CONTENT_TYPE],
        b"{}",
    );
    // A completed hash as the scripts write it, but with record version 9.
    let _: Value = store
        .client()
        .eval(
            "redis.call('HSET', KEYS[1], 'st', 'c', 'tok', ARGV[1], 'fp', ARGV[2], 'rec', ARGV[3]) \
             redis.call('PEXPIRE', KEYS[1], 60000)",
            vec![store.key(&scope)],
            vec![
                Value::Bytes(vec![0u8; 16].into()),
                Value::Bytes(fingerprint.as_bytes().to_vec().into()),
                Value::Bytes(vec![9u8, 0, 0, 201].into()),
            ],
        )
        .await
        .expect("write an undecodable record");
    let r = send(&h.router, req()).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(h.runs(), 0);
}

/// `Wait(1 s)` answers within about its bound even when the network to Redis turns into
/// a black hole right after the store said "in flight": the subscriber's connect and
/// `SSUBSCRIBE`, and the re-reads, are each bounded by the wait's deadline, not only by
/// the store's (longer) command timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_bound_holds_when_the_subscriber_is_black_holed() {
    use common::faults::Faults;
    use std::sync::Arc;
    use tower_idempotency::store::Reservation;
    let server = support::redis::RedisServer::start();
    let upstream = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let proxy = Arc::new(support::proxy::FaultProxy::start(upstream).await);
    let prefix = support::unique_prefix("wait-black-hole");
    let direct = support::store::store(&server.url(), &prefix).await;
    // The default command timeout (2 s) is longer than the wait.
    let proxied = support::store::store(&proxy.url(), &prefix).await;
    let hole = proxy.clone();
    let waiter_store = Faults::new(proxied).on_reserve(move |answer| {
        if *answer == Reservation::InFlight {
            hole.blackhole();
        }
    });
    let owner = Harness::new(IdempotencyLayer::new(direct).global_scope());
    let waiter = owner.sharing_counters(
        IdempotencyLayer::new(waiter_store)
            .global_scope()
            .in_flight(InFlight::Wait(Duration::from_secs(1))),
    );
    let slow = common::app::spawn_send(
        &owner.router,
        common::app::delayed(post("/pay", Some("k"), "{}"), 4000),
    );
    owner.started.notified().await;
    let started = tokio::time::Instant::now();
    let r = send(&waiter.router, post("/pay", Some("k"), "{}")).await;
    let waited = started.elapsed();
    eprintln!("black-holed waiter answered {} after {waited:?}", r.status);
    assert!(
        r.status == StatusCode::CONFLICT || r.status == StatusCode::SERVICE_UNAVAILABLE,
        "{r:?}"
    );
    assert!(
        waited >= Duration::from_millis(950),
        "waited the bound: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1300),
        "bound overrun: {waited:?}"
    );
    proxy.pass();
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(owner.runs(), 1);
}

/// Two clones of one store under two prefixes (live and sandbox on one Redis) are two
/// namespaces: the same key with the same payload runs once in each, and with another
/// payload it is not a 422 in the other, however many replays one of them answered from
/// its local tier before (SPEC section 7: a tier belongs to one namespace).
#[tokio::test]
async fn prefixed_clones_never_answer_for_each_other() {
    let store = support::store::test_store("namespaces").await;
    let base = support::unique_prefix("namespaces");
    let live = store.clone().prefix(format!("{base}live:"));
    let sandbox = store.clone().prefix(format!("{base}sandbox:"));
    let live_app = Harness::new(IdempotencyLayer::new(live.clone()).global_scope());
    let sandbox_app = Harness::new(IdempotencyLayer::new(sandbox.clone()).global_scope());
    // Key "same": one payload in both; key "other": the sandbox sends another payload.
    for (key, sandbox_body) in [("other", "{\"x\":1}"), ("same", "{}")] {
        let first = send(&live_app.router, post("/pay", Some(key), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{key}: {first:?}");
        let from_tier = store.round_trips().local_replays;
        for _ in 0..2 {
            // The first replay reads the record from Redis and keeps it, the second is
            // answered from the live tier.
            let replay = send(&live_app.router, post("/pay", Some(key), "{}")).await;
            assert!(replay.replayed(), "{key}: {replay:?}");
            assert_eq!(replay.body, first.body);
        }
        assert_eq!(
            store.round_trips().local_replays,
            from_tier + 1,
            "{key}: the live tier keeps the record"
        );
        let there = send(&sandbox_app.router, post("/pay", Some(key), sandbox_body)).await;
        assert_eq!(
            there.status,
            StatusCode::CREATED,
            "{key}: the sandbox runs its own request; body {:?}",
            there.body
        );
        assert!(!there.replayed(), "{key}: replayed the live record");
        let again = send(&sandbox_app.router, post("/pay", Some(key), sandbox_body)).await;
        assert!(again.replayed(), "{key}: {again:?}");
        assert_eq!(again.body, there.body);
        let live_again = send(&live_app.router, post("/pay", Some(key), "{}")).await;
        assert_eq!(
            live_again.body, first.body,
            "{key}: live keeps its own record"
        );
    }
    assert_eq!(live_app.runs(), 2, "one run per key in live");
    assert_eq!(sandbox_app.runs(), 2, "one run per key in the sandbox");
}

/// One tenant's record kept in the local replay tier is never another tenant's answer:
/// alice's replay is answered from memory, then bob sends the same key and body, and his
/// request runs (the tier is keyed by the scope, which holds the tenant).
#[tokio::test]
async fn a_locally_kept_replay_is_never_another_tenants() {
    let store = support::store::test_store("tenant-local").await;
    let h = Harness::new(IdempotencyLayer::new(store.clone()).tenant(common::app::bearer_tenant));
    let from = |tenant: &str| {
        common::app::with_header(
            post("/pay", Some("k"), "{}"),
            "authorization",
            &format!("Bearer {tenant}"),
        )
    };
    let alice = send(&h.router, from("alice")).await;
    assert_eq!(alice.status, StatusCode::CREATED, "{alice:?}");
    let from_tier = store.round_trips().local_replays;
    for _ in 0..2 {
        let replay = send(&h.router, from("alice")).await;
        assert!(replay.replayed(), "{replay:?}");
        assert_eq!(replay.body, alice.body);
    }
    assert_eq!(
        store.round_trips().local_replays,
        from_tier + 1,
        "alice's record is kept in the tier"
    );
    let bob = send(&h.router, from("bob")).await;
    assert_eq!(bob.status, StatusCode::CREATED, "{bob:?}");
    assert!(!bob.replayed(), "bob got alice's response: {bob:?}");
    assert_ne!(bob.body, alice.body);
    assert_eq!(h.runs(), 2, "one run per tenant");
    let bob_again = send(&h.router, from("bob")).await;
    assert_eq!(bob_again.body, bob.body);
    let alice_again = send(&h.router, from("alice")).await;
    assert_eq!(alice_again.body, alice.body);
    assert_eq!(h.runs(), 2);
}
