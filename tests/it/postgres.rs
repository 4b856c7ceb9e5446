//! The shared suite on `PostgresStore` against the real Postgres (plain mode, and
//! transactional mode where its semantics hold), plus what only this store does: the
//! handler's writes in the idempotency transaction, a killed connection, a failed
//! `COMMIT`, lock timeouts, purging, `check()`, and faults through the TCP proxy.
//!
//! Every test works in a schema of its own (`support::postgres::TestSchema`), dropped
//! at the end.
#![cfg(feature = "postgres")]

use crate::common;
use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use common::app::{assert_problem, send, Harness, Reply};
use futures_util::future::join_all;
use support::postgres::{TestSchema, TestStore};
use tokio::sync::Notify;
use tower_idempotency::postgres::sqlx::{self, AssertSqlSafe, Row};
use tower_idempotency::postgres::{LocalReplays, PostgresStore, Tx};
use tower_idempotency::store::{
    Completion, FencingToken, Fingerprint, Record, Reservation, ScopeHash, StorePolicy,
};
use tower_idempotency::{IdempotencyLayer, InFlight, Store};

/// The shared suite, every case, in plain mode.
mod plain {
    use crate::support;
    store_suite!(|| async { support::postgres::store().await });
}

/// The shared suite in transactional mode, less the cases whose premise this mode
/// replaces (each has a transactional counterpart below):
///
/// - `different_payload_while_in_flight_is_422`: the pending row is invisible until it
///   commits, so a different payload in flight gets 409
///   (`tx_different_payload_in_flight_is_409_then_422`);
/// - `renewal_keeps_lease_past_its_length`, `lost_lease_lets_second_owner_run_and_fences_stale_one`,
///   `store_level_fencing_and_fresh_tokens`: there is no lease to renew or lose; the
///   transaction holds the key until it ends, and a frozen owner is cut by the idle
///   timeout (`tx_frozen_owner_is_cut_by_the_idle_timeout`, `tx_store_level_semantics`);
/// - `reserve_is_atomic_over_many_rounds`: it never releases its 100 winners, which here
///   are 100 open transactions (`tx_reserve_is_atomic_over_rounds` releases them);
/// - the uncertainty cases: a transactional owner that dies or freezes rolls back with
///   its transaction, so no key is ever uncertain;
/// - `waiter_is_woken_by_the_store_not_by_polling`: a waiter here mostly waits inside its
///   reserving `INSERT`, which returns at the commit — counted as a re-read, not as a
///   notification — so the metric it counts is not deterministic
///   (`tx_commit_notifies_a_waiter_that_announced_itself` checks the notification).
mod transactional {
    use crate::support;
    store_suite!(@cases || async { support::postgres::transactional_store().await };
        key_missing_when_required_is_400,
        key_invalid_is_400,
        body_unreadable_is_400,
        body_over_limit_is_413,
        completed_is_replayed_byte_for_byte,
        replay_keeps_headers_as_spec_says,
        no_content_replays_empty,
        different_payload_is_422,
        changed_query_is_422,
        in_flight_conflict_is_409,
        in_flight_wait_replays,
        in_flight_wait_times_out_with_409,
        waiter_runs_after_release,
        concurrent_first_requests_run_once,
        client_error_releases_and_corrected_retry_runs,
        server_error_is_released_by_default,
        successes_and_server_errors_replays_500,
        oversized_response_is_streamed_then_not_replayable,
        handler_panic_releases_key,
        tenants_do_not_share_scopes,
        routes_and_resources_do_not_share_scopes,
        resolver_without_tenant_is_500,
        ttl_expiry_runs_again,
        hang_up_mid_handler_still_stores,
        fencing_token_reaches_handler,
        fail_open_never_passes_an_undecodable_record,
        store_errors_while_waiting_never_pass_through,
        body_error_after_a_stored_status_is_not_replayable,
        body_panic_after_a_stored_status_is_not_replayable,
        huge_wait_bound_does_not_panic,
        response_trailers_reach_the_first_caller,
        a_resent_reserve_is_answered_reserved,
        operators_inspect_forget_and_resolve,
    );
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

pub(crate) fn scope(path: &str) -> ScopeHash {
    let key = FencingToken::generate().to_hex();
    ScopeHash::new(None, &axum::http::Method::POST, path, key.as_bytes())
}

pub(crate) const FP: Fingerprint = Fingerprint::from_bytes([9; 32]);
pub(crate) const LEASE: Duration = Duration::from_secs(30);

pub(crate) fn request(key: &str, body: &str) -> Request<Body> {
    common::app::post("/pay", Some(key), body)
}

/// A router whose transactional handler answers 201 with the value of the setting `name`
/// (`SHOW name`) as its transaction sees it.
pub(crate) fn show_setting<St: Store>(store: St, name: &'static str) -> Router {
    Router::new().route(
        "/show",
        post(move |tx: Tx| async move {
            let mut conn = tx.lock().await.unwrap();
            let sql = format!("SHOW {name}");
            let value: String = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            (StatusCode::CREATED, value)
        })
        .layer(IdempotencyLayer::new(store).global_scope()),
    )
}

/// What the transactional test handler does, steered by the JSON body:
/// `{"rows": n, "dup": bool, "status": s, "hold_ms": ms, "hold_locked_ms": ms,
/// "fail_query": bool, "panic": bool, "wait_for_proceed": bool}` (`hold_locked_ms` sleeps
/// with the transaction's guard held, `hold_ms` after letting it go).
#[derive(Clone)]
pub(crate) struct TxApp {
    pub(crate) store: TestStore,
    runs: Arc<AtomicUsize>,
    /// The backend pid of the latest run's transaction, once it has inserted.
    pub(crate) pid: Arc<Mutex<Option<i32>>>,
    pub(crate) inserted: Arc<Notify>,
    pub(crate) proceed: Arc<Notify>,
}

impl TxApp {
    /// A `payments` table (with a deferred unique constraint on `ref`) next to the
    /// store's table, and the router with the layer on `/pay`.
    pub(crate) async fn new(
        store: TestStore,
        layer: impl FnOnce(IdempotencyLayer<TestStore>) -> IdempotencyLayer<TestStore>,
    ) -> (Self, Router) {
        Self::on("/pay", store, layer).await
    }

    /// [`TxApp::new`] with the route at `path` (its own metric labels).
    pub(crate) async fn on(
        path: &str,
        store: TestStore,
        layer: impl FnOnce(IdempotencyLayer<TestStore>) -> IdempotencyLayer<TestStore>,
    ) -> (Self, Router) {
        let table = store.schema.table("payments");
        store
            .exec(&format!(
                "CREATE TABLE {table} (id bigserial PRIMARY KEY, ref text NOT NULL, \
                 CONSTRAINT payments_ref_key UNIQUE (ref) DEFERRABLE INITIALLY DEFERRED)"
            ))
            .await;
        let app = TxApp {
            store: store.clone(),
            runs: Arc::default(),
            pid: Arc::default(),
            inserted: Arc::default(),
            proceed: Arc::default(),
        };
        let handler_app = app.clone();
        let handler = move |tx: Tx, body: String| {
            let app = handler_app.clone();
            async move { app.handle(tx, body).await }
        };
        let layer = layer(IdempotencyLayer::new(store).global_scope());
        let router = Router::new().route(path, post(handler).layer(layer));
        (app, router)
    }

    async fn handle(&self, tx: Tx, body: String) -> (StatusCode, String) {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let spec: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let table = self.store.schema.table("payments");
        {
            let mut conn = tx.lock().await.expect("the transaction");
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
                .expect("pid");
            let rows = spec["rows"].as_u64().unwrap_or(1);
            for i in 0..rows {
                let reference = if spec["dup"].as_bool() == Some(true) {
                    "dup".to_string()
                } else {
                    format!("run{run}-{i}-{}", FencingToken::generate().to_hex())
                };
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {table} (ref) VALUES ($1)"
                )))
                .bind(reference)
                .execute(&mut *conn)
                .await
                .expect("insert a payment");
            }
            if spec["fail_query"].as_bool() == Some(true) {
                let failed = sqlx::query("SELECT 1/0").execute(&mut *conn).await;
                assert!(failed.is_err());
            }
            *self.pid.lock().unwrap() = Some(pid);
            self.inserted.notify_one();
            if let Some(ms) = spec["hold_locked_ms"].as_u64() {
                // Idle in the transaction while holding its guard (a slow call made
                // with the connection locked).
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        if spec["wait_for_proceed"].as_bool() == Some(true) {
            self.proceed.notified().await;
        }
        if let Some(ms) = spec["hold_ms"].as_u64() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if spec["panic"].as_bool() == Some(true) {
            panic!("handler panicked on purpose");
        }
        let status = spec["status"]
            .as_u64()
            .and_then(|s| StatusCode::from_u16(s as u16).ok())
            .unwrap_or(StatusCode::CREATED);
        (status, format!("{{\"run\":{run}}}"))
    }

    pub(crate) fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    pub(crate) async fn rows(&self) -> i64 {
        self.store.count("payments").await
    }
}

// ---------------------------------------------------------------------------------------
// Plain mode
// ---------------------------------------------------------------------------------------

/// A new request costs exactly 2 statements (reserve, complete), a replay 1, a mismatch
/// 1, a released 4xx 2 (reserve, release), counted by the store itself (local replay tier
/// off; see `pg_local_tier_replays_with_no_statement`).
#[tokio::test]
async fn pg_round_trips_per_request() {
    let store = support::postgres::store()
        .await
        .map(|s| s.local_replays(None));
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    let mut last = store.round_trips().total;
    let mut step = |reply: Reply, expected: u64, what: &str| {
        let now = store.round_trips().total;
        assert_eq!(now - last, expected, "{what}: {reply:?}");
        last = now;
    };
    step(send(&h.router, request("k", "{}")).await, 2, "new request");
    step(send(&h.router, request("k", "{}")).await, 1, "replay");
    step(
        send(&h.router, request("k", "{\"x\":1}")).await,
        1,
        "mismatch",
    );
    let bad = common::app::with_header(request("k2", "{}"), "x-status", "400");
    step(send(&h.router, bad).await, 2, "released 4xx");
}

/// Plain mode next to a table lock held past the store's timeout (DDL, `LOCK TABLE`): 503,
/// and the handler does not run. The reserve the store stopped waiting for stays queued on
/// the lock in the server, and the layer's fenced release of its token behind it: once the
/// lock goes, a retry runs (a 409 only for the moment the two take), and never waits out
/// the 30 s lease of a token nobody holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_table_lock_past_the_timeout_is_503_and_the_retry_runs() {
    let store = support::postgres::store()
        .await
        .map(|s| s.command_timeout(Duration::from_millis(500)));
    let h = Harness::new(
        IdempotencyLayer::new(store.store().clone())
            .global_scope()
            .in_flight(InFlight::Conflict)
            .lease(Duration::from_secs(30)),
    );
    let ddl = store.lock_table("idem").await;
    let r = send(&h.router, request("locked", "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(h.runs(), 0);
    // Long enough for the layer's release to queue behind the reserve, on the lock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ddl.rollback().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = send(&h.router, request("locked", "{}")).await;
        if r.status != StatusCode::CONFLICT || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(h.runs(), 1);
}

/// Plain mode's reserve takes an idle connection without the pool's ping, as the
/// transactional pre-read does: when that connection died while idle (terminated here),
/// the reserve is sent again, with the same token, on a connection the pool tested. A
/// replay and a new key answer as usual, each with one reserve statement more.
#[tokio::test]
async fn pg_an_idle_connection_that_died_is_replaced_for_the_reserve() {
    let schema = TestSchema::create().await;
    let pool = support::postgres::pool(1).await;
    let store = PostgresStore::new(pool.clone())
        .table(&schema.table("idem"))
        .local_replays(None);
    store.migrate().await.unwrap();
    an_idle_connection_that_died_is_replaced(&store, &pool, 2, 2).await;
    pool.close().await;
}

/// The run of both modes' idle-connection tests, on `store` over `pool` (one connection):
/// a completed key, then that connection terminated before a replay and again before a new
/// key. Each answers as usual; the replay sends its first statement twice (2 reserve
/// statements, or `replay_trips`), the new key `new_key_trips` (plain 2, the reserve
/// twice; transactional 3, the pre-read twice and the batch).
pub(crate) async fn an_idle_connection_that_died_is_replaced(
    store: &PostgresStore,
    pool: &sqlx::PgPool,
    replay_trips: u64,
    new_key_trips: u64,
) {
    let (done, token) = (scope("/done"), FencingToken::generate());
    let reserved = store.reserve(&done, &FP, token, LEASE.into()).await;
    assert_eq!(reserved.unwrap(), Reservation::Reserved);
    let record = Record::NotReplayable;
    let stored = store.complete(&done, token, &record, LEASE).await.unwrap();
    assert_eq!(stored, Completion::Stored);
    let admin = support::postgres::pool(1).await;
    let (new, owner) = (scope("/new"), FencingToken::generate());
    for (case, expected, trips) in [
        ("replay", Reservation::Completed(record), replay_trips),
        ("new key", Reservation::Reserved, new_key_trips),
    ] {
        support::postgres::kill_idle_connection(pool, &admin).await;
        let before = store.round_trips().reserve;
        let answer = match case {
            "replay" => store.reserve(&done, &FP, FencingToken::generate(), LEASE.into()),
            _ => store.reserve(&new, &FP, owner, LEASE.into()),
        };
        assert_eq!(answer.await.unwrap(), expected, "{case}");
        assert_eq!(
            store.round_trips().reserve - before,
            trips,
            "{case}: the first statement sent twice"
        );
    }
    assert!(store.release(&new, owner).await.unwrap());
    admin.close().await;
}

/// Transactional mode (local replay tier off): a new request costs 4 (the pre-read, the
/// batch that begins and reserves, the record's UPDATE, the COMMIT: as many as the
/// hand-written pattern's BEGIN, INSERT, UPDATE, COMMIT, whatever the record's size), a
/// replay or a mismatch 1 (the pre-read, no transaction), a key in flight 1 (the
/// pre-read's probe), a released 4xx 3 (pre-read, batch, ROLLBACK). Before issue 18: 4,
/// 3, 3, 3.
#[tokio::test]
async fn tx_round_trips_per_request() {
    let store = support::postgres::transactional_store()
        .await
        .map(|s| s.local_replays(None));
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    let mut last = store.round_trips().total;
    let mut step = |reply: Reply, expected: u64, what: &str| {
        let now = store.round_trips().total;
        assert_eq!(now - last, expected, "{what}: {reply:?}");
        last = now;
    };
    step(send(&h.router, request("k", "{}")).await, 4, "new request");
    step(send(&h.router, request("k", "{}")).await, 1, "replay");
    step(send(&h.router, request("k", "{}")).await, 1, "replay again");
    step(
        send(&h.router, request("k", "{\"x\":1}")).await,
        1,
        "mismatch",
    );
    // Large records: the same statements. Both sizes replay byte for byte (the record
    // holds a header value that is not UTF-8).
    for (key, size, trips) in [("near", "60000", 4), ("big", "100000", 4)] {
        let big = || common::app::with_header(request(key, "{}"), "x-body-size", size);
        let first = send(&h.router, big()).await;
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        step(first.clone(), trips, size);
        let replay = send(&h.router, big()).await;
        assert!(replay.replayed(), "{size}");
        assert_eq!(replay.body, first.body, "{size}");
        assert_eq!(replay.headers.get("x-bin"), first.headers.get("x-bin"));
        step(replay, 1, size);
    }
    let bad = common::app::with_header(request("k2", "{}"), "x-status", "400");
    step(send(&h.router, bad).await, 3, "released 4xx");
    assert_eq!(store.open_transactions(), 0);
    // A key in flight: its owner's transaction holds the scope.
    let s = ScopeHash::from_bytes([42; 32]);
    let owner = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, owner, LEASE.into()).await.unwrap(),
        Reservation::Reserved
    );
    let before = store.round_trips().total;
    assert_eq!(
        store
            .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap(),
        Reservation::InFlight
    );
    assert_eq!(
        store.round_trips().total - before,
        1,
        "in flight: the pre-read"
    );
    assert!(store.release(&s, owner).await.unwrap());
}

/// The local replay tier (off by default, turned on here) in both modes: a completed record read once is
/// replayed with no statement, a mismatch refused with none; `forget` on this process
/// drops it, so the next request runs.
#[tokio::test]
async fn pg_local_tier_replays_with_no_statement() {
    for transactional in [false, true] {
        let store = support::postgres::store()
            .await
            .map(|s| s.local_replays(Some(LocalReplays::default())));
        let store = if transactional {
            store.map(PostgresStore::transactional)
        } else {
            store
        };
        let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
        let mut last = store.round_trips().total;
        let mut step = |reply: Reply, expected: u64, what: &str| {
            let now = store.round_trips().total;
            assert_eq!(now - last, expected, "{transactional} {what}: {reply:?}");
            last = now;
        };
        let first = send(&h.router, request("k", "{}")).await;
        assert_eq!(first.status, 201);
        step(
            first.clone(),
            if transactional { 4 } else { 2 },
            "new request",
        );
        let replay = send(&h.router, request("k", "{}")).await;
        assert_eq!(replay.body, first.body);
        step(replay, 1, "first replay: read from the table");
        let local = store.round_trips().local_replays;
        let replay = send(&h.router, request("k", "{}")).await;
        assert_eq!(replay.body, first.body);
        assert!(replay.replayed());
        step(replay, 0, "replay from the local tier");
        let mismatch = send(&h.router, request("k", "{\"x\":1}")).await;
        assert_eq!(mismatch.status, 422);
        step(mismatch, 0, "mismatch from the local tier");
        assert_eq!(store.round_trips().local_replays - local, 2);
        assert!(store.local_replay_bytes() > 0);
        let scope = ScopeHash::new(None, &axum::http::Method::POST, "/pay", b"k");
        assert!(store.forget(&scope).await.unwrap());
        let again = send(&h.router, request("k", "{}")).await;
        assert_eq!(again.status, 201);
        assert_ne!(again.body, first.body, "forgotten: the handler ran again");
    }
}

/// Two app servers with their own pools and stores on one table: 64 concurrent first
/// requests run the handler once, in either mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_servers_run_one_key_once() {
    for transactional in [false, true] {
        let a = support::postgres::store().await;
        let b = TestStore::new(
            PostgresStore::new(support::postgres::pool(16).await).table(a.table_name()),
            a.schema.clone(),
        );
        let (a, b) = if transactional {
            (
                a.map(PostgresStore::transactional),
                b.map(PostgresStore::transactional),
            )
        } else {
            (a, b)
        };
        let wait = InFlight::Wait(Duration::from_secs(10));
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
                send(&router, common::app::delayed(request("k", "{}"), 100)).await
            })
        });
        let replies: Vec<Reply> = join_all(requests)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(server_a.runs(), 1, "transactional {transactional}");
        assert!(replies
            .iter()
            .all(|r| r.status == StatusCode::CREATED && r.body == replies[0].body));
        assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
    }
}

/// Postgres unreachable (connection refused through the fault proxy): 503
/// `store-unavailable`, the handler never runs; under `fail_open` it passes through. Back
/// up: the next request runs normally. Both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_503_or_pass_through() {
    use support::proxy::FaultProxy;
    let direct = support::postgres::store().await;
    let proxy = FaultProxy::start(support::postgres::server_addr()).await;
    let url = support::postgres::database_url_via(proxy.addr());
    let pool = tower_idempotency::postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&url)
        .unwrap();
    for transactional in [false, true] {
        let mut store = PostgresStore::new(pool.clone())
            .table(direct.table_name())
            .command_timeout(Duration::from_millis(300));
        if transactional {
            store = store.transactional();
        }
        let store = TestStore::new(store, direct.schema.clone());
        proxy.refuse();
        let closed = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
        let r = send(&closed.router, request("down", "{}")).await;
        assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
        assert!(r.headers.contains_key("retry-after"));
        assert_eq!(closed.runs(), 0);
        let open = Harness::new(
            IdempotencyLayer::new(store.clone())
                .global_scope()
                .fail_open(),
        );
        let r = send(&open.router, request("down", "{}")).await;
        assert_eq!(r.status, StatusCode::CREATED, "fail open passes through");
        assert_eq!(open.runs(), 1);
        proxy.pass();
        let key = format!("up-{transactional}");
        let r = send(&closed.router, request(&key, "{}")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert!(send(&closed.router, request(&key, "{}")).await.replayed());
    }
}

/// A record written by a newer version (unknown version byte): 503 even under
/// `fail_open`, and the handler never runs.
#[tokio::test]
async fn an_undecodable_record_is_503_even_when_failing_open() {
    let store = support::postgres::store().await;
    let h = Harness::new(
        IdempotencyLayer::new(store.clone())
            .global_scope()
            .fail_open(),
    );
    let probe = request("k", "{}");
    let scope = ScopeHash::new(None, probe.method(), "/pay", b"k");
    let fingerprint = Fingerprint::new(
        probe.method(),
        "/pay",
        None,
        probe.headers(),
        &[axum::http::header::CONTENT_TYPE],
        b"{}",
    );
    let sql = format!(
        "INSERT INTO {} (scope, fingerprint, state, token, record, expires_at) \
         VALUES ($1, $2, 'completed', $3, $4, now() + interval '1 minute')",
        store.schema.table("idem")
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(scope.as_bytes().as_slice())
        .bind(fingerprint.as_bytes().as_slice())
        .bind(vec![0u8; 16])
        .bind(vec![9u8, 0, 0, 201])
        .execute(store.pool())
        .await
        .unwrap();
    let r = send(&h.router, request("k", "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(h.runs(), 0);
}

/// Tenants and keys never reach the table: its key column is the 32-byte scope hash, and
/// no column holds the raw key or tenant.
#[tokio::test]
async fn raw_keys_and_tenants_never_reach_the_table() {
    let store = support::postgres::store().await;
    let layer = IdempotencyLayer::new(store.clone()).tenant(common::app::bearer_tenant);
    let h = Harness::new(layer);
    let req = common::app::with_header(
        request("secret-key-123", "{}"),
        "authorization",
        "Bearer tenant-zzz",
    );
    assert_eq!(send(&h.router, req).await.status, StatusCode::CREATED);
    let sql = format!(
        "SELECT octet_length(scope) AS n, \
         position('secret-key-123'::bytea in scope || fingerprint || token || record) AS k, \
         position('tenant-zzz'::bytea in scope || fingerprint || token || record) AS t FROM {}",
        store.schema.table("idem")
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<i32, _>("n"), 32);
    assert_eq!(row.get::<i32, _>("k"), 0);
    assert_eq!(row.get::<i32, _>("t"), 0);
}

/// `purge(batch)` deletes expired rows only, at most `batch` per call; the background
/// task empties the rest and stops when told.
#[tokio::test]
async fn purge_deletes_expired_rows_in_bounded_batches() {
    let store = support::postgres::store().await;
    let table = store.schema.table("idem");
    store
        .exec(&format!(
            "INSERT INTO {table} (scope, fingerprint, state, token, record, expires_at) \
             SELECT sha256(i::text::bytea), '\\x00', 'completed', '\\x00', '\\x00', \
               now() - interval '1 second' FROM generate_series(1, 25) i"
        ))
        .await;
    let live = scope("/live");
    let token = FencingToken::generate();
    assert_eq!(
        store
            .reserve(&live, &FP, token, LEASE.into())
            .await
            .unwrap(),
        Reservation::Reserved
    );
    assert_eq!(store.purge(10).await.unwrap(), 10);
    assert_eq!(store.count("idem").await, 16);
    let task = store.spawn_purge(Duration::from_millis(20), 4);
    for _ in 0..100 {
        if store.count("idem").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.stop().await;
    assert_eq!(store.count("idem").await, 1, "the live lease stays");
    assert!(store.release(&live, token).await.unwrap());
    assert_eq!(store.purge(10).await.unwrap(), 0);
}

/// `migrate()` is idempotent and safe to run concurrently; `check()` reports a missing
/// table, then a fit one, and a user without write privileges.
#[tokio::test]
async fn migrate_and_check() {
    let schema = TestSchema::create().await;
    let pool = support::postgres::pool(8).await;
    let store = PostgresStore::new(pool.clone()).table(&schema.table("idem"));
    let before = store.check().await.unwrap();
    assert!(!before.table_exists());
    assert!(
        before
            .warnings()
            .iter()
            .any(|w| w.contains("does not exist")),
        "{before}"
    );
    let runs = join_all((0..4).map(|_| {
        let store = store.clone();
        async move { store.migrate().await }
    }))
    .await;
    assert!(runs.iter().all(Result::is_ok), "{runs:?}");
    store.migrate().await.unwrap();
    let after = store.clone().init().await.unwrap();
    let report = after.check_report().unwrap();
    assert!(report.is_ok(), "{report}");
    assert!(report.can_notify() && report.can_listen());
    assert!(
        report.server_version().starts_with(char::is_numeric),
        "{report}"
    );

    // A user that may only read the table.
    let role = format!("{}_ro", schema.name);
    let admin = |sql: String| {
        let pool = pool.clone();
        async move {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    admin(format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {s} TO {role}; \
         GRANT SELECT ON {t} TO {role}",
        s = schema.name,
        t = schema.table("idem")
    ))
    .await;
    let url = support::postgres::database_url().replacen("postgres@", &format!("{role}@"), 1);
    let ro_pool = tower_idempotency::postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let ro = PostgresStore::new(ro_pool.clone())
        .table(&schema.table("idem"))
        .check()
        .await
        .unwrap();
    ro_pool.close().await;
    admin(format!("DROP OWNED BY {role}; DROP ROLE {role}")).await;
    let privileges = ro.privileges().unwrap();
    assert!(privileges.select && !privileges.insert && !privileges.update && !privileges.delete);
    assert!(
        ro.warnings()
            .iter()
            .any(|w| w.contains("lacks INSERT, UPDATE, DELETE")),
        "{ro}"
    );
    // An unreachable server is the one error.
    let nowhere = tower_idempotency::postgres::sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    assert!(PostgresStore::new(nowhere)
        .command_timeout(Duration::from_millis(500))
        .check()
        .await
        .is_err());
}

/// `PostgresStore::connect(url)`: one call connects, creates the (default) table if
/// missing and checks. Run on a schema of its own through the URL's search_path.
#[tokio::test]
async fn connect_creates_the_table_and_checks() {
    let schema = TestSchema::create().await;
    let url = format!(
        "{}?options=-c%20search_path%3D{}",
        support::postgres::database_url(),
        schema.name
    );
    let store = PostgresStore::connect(&url).await.unwrap();
    assert!(
        store.check_report().unwrap().is_ok(),
        "{:?}",
        store.check_report()
    );
    let s = scope("/connect");
    assert_eq!(
        store
            .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap(),
        Reservation::Reserved
    );
    store.pool().close().await;
}

// ---------------------------------------------------------------------------------------
// Transactional mode
// ---------------------------------------------------------------------------------------

/// 64 concurrent requests with one key whose handler inserts a row in the idempotency
/// transaction: 1 row, 64 identical answers, one of them the original. With and without
/// the pre-read ([`PostgresStore::reserve_first`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_64_concurrent_requests_write_one_row() {
    for reserve_first in [false, true] {
        let store = support::postgres::transactional_store()
            .await
            .map(|s| s.reserve_first(reserve_first));
        sixty_four_concurrent_requests_write_one_row(store).await;
    }
}

async fn sixty_four_concurrent_requests_write_one_row(store: TestStore) {
    let (app, router) = TxApp::new(store, |l| {
        l.in_flight(InFlight::Wait(Duration::from_secs(20)))
    })
    .await;
    let body = r#"{"rows": 1, "hold_ms": 100}"#;
    let replies: Vec<Reply> = join_all((0..64).map(|_| {
        let router = router.clone();
        tokio::spawn(async move { send(&router, request("k", body)).await })
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    assert_eq!(app.runs(), 1, "one execution");
    assert_eq!(app.rows().await, 1, "one row");
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::CREATED && r.body == replies[0].body),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
}

/// The transaction's connection is killed (`pg_terminate_backend`) while the handler
/// runs: the caller gets 503, nothing was written, and the retry runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_killed_connection_mid_handler_is_503_and_the_retry_runs_once() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store.clone(), |l| l).await;
    let body = r#"{"rows": 2, "wait_for_proceed": true}"#;
    let first = common::app::spawn_send(&router, request("k", body));
    app.inserted.notified().await;
    let pid = app.pid.lock().unwrap().expect("pid");
    let admin = support::postgres::pool(1).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(killed);
    app.proceed.notify_one();
    let first = first.await.unwrap();
    assert_problem(&first, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(app.rows().await, 0, "the killed transaction left nothing");
    let retry = send(&router, request("k", r#"{"rows": 2}"#)).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.replayed());
    assert_eq!(app.rows().await, 2);
    assert!(send(&router, request("k", r#"{"rows": 2}"#))
        .await
        .replayed());
    assert_eq!(app.runs(), 2);
    assert_eq!(store.open_transactions(), 0);
}

/// A `COMMIT` that fails (the handler violates a deferred unique constraint): 503, never
/// the handler's 201; no record and no rows; a corrected retry with the same key runs.
#[tokio::test]
async fn tx_failed_commit_is_503_and_a_corrected_retry_runs() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store, |l| l).await;
    let r = send(&router, request("k", r#"{"rows": 2, "dup": true}"#)).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(app.rows().await, 0);
    let fixed = send(&router, request("k", r#"{"rows": 1, "dup": true}"#)).await;
    assert_eq!(fixed.status, StatusCode::CREATED, "{fixed:?}");
    assert!(
        !fixed.replayed(),
        "no record was stored by the failed commit"
    );
    assert_eq!(app.rows().await, 1);
    assert_eq!(app.runs(), 2);
}

/// A query of the handler fails and aborts the transaction, and the handler answers 201
/// anyway: the record cannot be written, the caller gets 503, nothing remains.
#[tokio::test]
async fn tx_a_failed_query_in_the_handler_is_503() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store, |l| l).await;
    let r = send(&router, request("k", r#"{"rows": 1, "fail_query": true}"#)).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(app.rows().await, 0);
    let retry = send(&router, request("k", r#"{"rows": 1, "fail_query": true}"#)).await;
    assert!(!retry.replayed(), "{retry:?}");
}

/// A released response (4xx) and a panicking handler roll the handler's writes back with
/// the reservation; the corrected retry runs and its row stays.
#[tokio::test]
async fn tx_release_rolls_back_the_handlers_writes() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store.clone(), |l| l).await;
    let bad = send(&router, request("k", r#"{"rows": 3, "status": 400}"#)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.rows().await, 0, "the 400's writes were rolled back");
    let panicked = send(&router, request("p", r#"{"rows": 3, "panic": true}"#)).await;
    assert_problem(
        &panicked,
        StatusCode::INTERNAL_SERVER_ERROR,
        "handler-failed",
    );
    assert_eq!(
        app.rows().await,
        0,
        "the panicking run's writes were rolled back"
    );
    let fixed = send(&router, request("k", r#"{"rows": 1}"#)).await;
    assert_eq!(fixed.status, StatusCode::CREATED);
    assert_eq!(app.rows().await, 1);
    assert_eq!(store.open_transactions(), 0);
}

/// Conflict mode: a second request while the first is in flight gets 409 with
/// Retry-After — from the owner's advisory lock, without waiting for the commit (nor for
/// the lock timeout on the uncommitted row); afterwards it replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_in_flight_is_409_in_conflict_mode() {
    let store = support::postgres::transactional_store()
        .await
        .map(|s| s.lock_timeout(Duration::from_millis(100)));
    let (app, router) = TxApp::new(store, |l| l.in_flight(InFlight::Conflict)).await;
    let first = common::app::spawn_send(&router, request("k", r#"{"hold_ms": 800}"#));
    app.inserted.notified().await;
    let started = tokio::time::Instant::now();
    let r = send(&router, request("k", r#"{"hold_ms": 800}"#)).await;
    let waited = started.elapsed();
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    assert!(r.headers.contains_key("retry-after"));
    assert!(
        waited < Duration::from_millis(700),
        "not until the commit: {waited:?}"
    );
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let again = send(&router, request("k", r#"{"hold_ms": 800}"#)).await;
    assert!(again.replayed());
    assert_eq!(app.runs(), 1);
    assert_eq!(app.rows().await, 1);
}

/// Transactional mode cannot see the fingerprint of an uncommitted row: a different
/// payload while the first is in flight gets 409; once committed, 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_different_payload_in_flight_is_409_then_422() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store, |l| l).await;
    let first = common::app::spawn_send(&router, request("k", r#"{"hold_ms": 600}"#));
    app.inserted.notified().await;
    let r = send(&router, request("k", r#"{"rows": 5}"#)).await;
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let r = send(&router, request("k", r#"{"rows": 5}"#)).await;
    assert_problem(
        &r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert_eq!(app.runs(), 1);
}

/// The store's short lock timeout bounds only the reservation: the handler's own
/// queries run with the session's setting (restored once the row is held).
#[tokio::test]
async fn tx_the_handlers_queries_keep_the_sessions_lock_timeout() {
    let store = support::postgres::transactional_store().await;
    let router = Router::new().route(
        "/pay",
        post(|tx: Tx| async move {
            let mut conn = tx.lock().await.unwrap();
            let row = sqlx::query("SHOW lock_timeout")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            let value: String = row.get(0);
            (StatusCode::CREATED, value)
        })
        .layer(IdempotencyLayer::new(store).global_scope()),
    );
    let r = send(&router, request("k", "{}")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body, "0", "the server default, not the store's 250ms");
}

/// A pool of one connection whose session sets its own `lock_timeout` (7s) when it
/// connects, as a team would for its API.
async fn pool_with_a_session_lock_timeout(
    options: sqlx::postgres::PgConnectOptions,
) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql("SET lock_timeout = '7s'")
                    .execute(&mut *conn)
                    .await
                    .map(drop)
            })
        })
        .connect_with(options)
        .await
        .unwrap()
}

/// `lock_timeout` as the pool's (one) session has it now, outside any transaction.
async fn pooled_lock_timeout(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The same for a session whose own `lock_timeout` is not the server's default (set when
/// the pool connects, as a team would for its API): the handler gets that value back, not
/// the store's and not the default, on a session's first new key (which prepares the
/// store's statements) and on its next ones (which only execute them).
#[tokio::test]
async fn tx_the_handlers_queries_keep_a_sessions_own_lock_timeout() {
    let schema = TestSchema::create().await;
    let options = support::postgres::database_url().parse().unwrap();
    let pool = pool_with_a_session_lock_timeout(options).await;
    let store = PostgresStore::new(pool.clone())
        .table(&schema.table("idem"))
        .transactional();
    store.migrate().await.unwrap();
    let router = show_setting(store, "lock_timeout");
    for key in ["first", "second", "third"] {
        let r = send(&router, common::app::post("/show", Some(key), "{}")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{key}");
        assert_eq!(
            r.body, "7s",
            "{key}: the session's own, not the store's 250ms"
        );
    }
    assert_eq!(
        pooled_lock_timeout(&pool).await,
        "7s",
        "and the session keeps it after the commit"
    );
    pool.close().await;
}

/// A transactional store on `pool` with `reserve_first(true)` and no local tier (every
/// replay reaches the database), its table made.
async fn reserve_first_store(pool: &sqlx::PgPool, schema: &TestSchema) -> PostgresStore {
    let store = PostgresStore::new(pool.clone())
        .table(&schema.table("idem"))
        .transactional()
        .local_replays(None)
        .reserve_first(true);
    store.migrate().await.unwrap();
    store
}

/// `reserve_first(true)`: a new key is the batch alone, no pre-read: 3 round trips with
/// the record's `UPDATE` and the `COMMIT`, 4 on a session's first (its batch finds the
/// statement unprepared and goes again with the `PREPARE`). A replay or a mismatch is
/// the batch (refused by the key's row), its `ROLLBACK` and then the pre-read: 3. The
/// handler's `lock_timeout` is the session's default (here the connection's start-up
/// option, 3s), not what a `SET` gave the session (7s), which the session keeps.
#[tokio::test]
async fn tx_reserve_first_skips_the_pre_read_of_a_new_key() {
    let schema = TestSchema::create().await;
    let options = support::postgres::database_url()
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .options([("lock_timeout", "3s")]);
    let pool = pool_with_a_session_lock_timeout(options).await;
    let store = reserve_first_store(&pool, &schema).await;
    let router = show_setting(store.clone(), "lock_timeout");
    let mut last = store.round_trips().total;
    let mut step = |reply: &Reply, expected: u64, what: &str| {
        let now = store.round_trips().total;
        assert_eq!(now - last, expected, "{what}: {reply:?}");
        last = now;
    };
    let first = send(&router, common::app::post("/show", Some("a"), "{}")).await;
    assert_eq!(
        (first.status, &*first.body),
        (StatusCode::CREATED, &b"3s"[..])
    );
    step(&first, 4, "a session's first new key");
    let second = send(&router, common::app::post("/show", Some("b"), "{}")).await;
    assert_eq!(
        (second.status, &*second.body),
        (StatusCode::CREATED, &b"3s"[..])
    );
    assert!(!second.replayed());
    step(&second, 3, "a new key");
    let replay = send(&router, common::app::post("/show", Some("a"), "{}")).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, first.body);
    step(&replay, 3, "a replay");
    let mismatch = send(&router, common::app::post("/show", Some("a"), "{\"x\":1}")).await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    step(&mismatch, 3, "a mismatch");
    assert_eq!(
        pooled_lock_timeout(&pool).await,
        "7s",
        "the session keeps its own after the commit"
    );
    pool.close().await;
}

/// A `reserve_first` batch refused by the key's row ends its transaction and reads the key
/// on the same connection: one connection taken from the pool and given back once per
/// replay or mismatch. Given back in between, it could go to a request queued for one (a
/// new key holds its connection for the handler's whole transaction), and the replay would
/// queue behind that request. Counted with the pool's `after_release` hook.
#[tokio::test]
async fn tx_reserve_first_reads_a_refused_key_on_the_same_connection() {
    let schema = TestSchema::create().await;
    let released = Arc::new(AtomicUsize::new(0));
    let counter = released.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .after_release(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(true) })
        })
        .connect(&support::postgres::database_url())
        .await
        .unwrap();
    let router = show_setting(reserve_first_store(&pool, &schema).await, "lock_timeout");
    // A connection goes back to the pool after the response: read the count once every
    // connection is idle again.
    let settled = || async {
        support::postgres::until_idle(&pool).await;
        released.load(Ordering::SeqCst)
    };
    let first = send(&router, common::app::post("/show", Some("a"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let before = settled().await;
    let replay = send(&router, common::app::post("/show", Some("a"), "{}")).await;
    assert!(replay.replayed(), "{replay:?}");
    let after_replay = settled().await;
    assert_eq!(
        after_replay - before,
        1,
        "a replay: one connection, given back once"
    );
    let mismatch = send(&router, common::app::post("/show", Some("a"), "{\"x\":1}")).await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(settled().await - after_replay, 1, "a mismatch: the same");
    pool.close().await;
}

/// A refused `reserve_first` batch whose `ROLLBACK` fails: the server ended the session
/// while it sat in the failed transaction. That connection is closed, not used for the
/// re-read, and the key is read on a new one: a replay like any other. The session's own
/// `idle_in_transaction_session_timeout` (150 ms, set once the session has prepared its
/// statement; the store's own idle limit is a `SET LOCAL` of the batch, undone when the
/// batch fails) ends it while the fault proxy holds the batch's error reply for 600 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_reserve_first_rereads_on_a_new_connection_when_the_rollback_fails() {
    use support::proxy::FaultProxy;
    let schema = TestSchema::create().await;
    let proxy = FaultProxy::start(support::postgres::server_addr()).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&support::postgres::database_url_via(proxy.addr()))
        .await
        .unwrap();
    // Every reply through the proxy is late below: room for the new connection's.
    let store = reserve_first_store(&pool, &schema)
        .await
        .command_timeout(Duration::from_secs(20));
    let router = show_setting(store, "lock_timeout");
    let first = send(&router, common::app::post("/show", Some("a"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    sqlx::raw_sql("SET idle_in_transaction_session_timeout = '150ms'")
        .execute(&pool)
        .await
        .unwrap();
    support::postgres::until_idle(&pool).await;
    let accepted = proxy.connections_accepted();
    proxy.delay_replies(Duration::from_millis(600));
    let replay = send(&router, common::app::post("/show", Some("a"), "{}")).await;
    proxy.pass();
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, first.body);
    assert_eq!(
        proxy.connections_accepted(),
        accepted + 1,
        "the session that failed its ROLLBACK was closed; the re-read opened another"
    );
    pool.close().await;
}

/// A frozen owner (its handler idle in the transaction past the idle timeout) loses its
/// transaction: Postgres ends the session; a waiting retry becomes the owner and runs;
/// the frozen owner's caller gets 503, and only the retry's row exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_frozen_owner_is_cut_by_the_idle_timeout() {
    let store = support::postgres::transactional_store()
        .await
        .map(|s| s.idle_in_transaction_timeout(Duration::from_millis(300)));
    let (app, router) = TxApp::new(store, |l| {
        l.in_flight(InFlight::Wait(Duration::from_secs(10)))
    })
    .await;
    let frozen = common::app::spawn_send(&router, request("k", r#"{"hold_ms": 900}"#));
    app.inserted.notified().await;
    let retry = send(&router, request("k", r#"{"hold_ms": 900}"#)).await;
    // The retry became the owner after the cut, and was itself idle for 0.9 s: the
    // same idle timeout cut it too. Its caller gets 503 — and nothing was written.
    let frozen = frozen.await.unwrap();
    assert_problem(
        &frozen,
        StatusCode::SERVICE_UNAVAILABLE,
        "store-unavailable",
    );
    assert_problem(&retry, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(
        app.runs(),
        2,
        "the retry ran after the frozen owner was cut"
    );
    assert_eq!(app.rows().await, 0);
    // A handler that is not idle that long completes.
    let ok = send(&router, request("k", r#"{"hold_ms": 50}"#)).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(app.rows().await, 1);
}

/// The store-level table of transactional mode: a re-sent reserve answers Reserved; a
/// second token sees the scope in flight (no lease to expire: with the idle timeout off,
/// the transaction holds the key however long it idles); renew keeps the holder's
/// transaction alive and answers for the holder only; stale tokens can neither release nor complete; a
/// completion is stored once, and a second complete of the same token says so.
#[tokio::test]
async fn tx_store_level_semantics() {
    let store = support::postgres::transactional_store().await.map(|s| {
        s.lock_timeout(Duration::from_millis(50))
            .no_idle_in_transaction_timeout()
    });
    let s = scope("/store-level");
    let lease = Duration::from_millis(100);
    let t1 = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, t1, lease.into()).await.unwrap(),
        Reservation::Reserved
    );
    assert_eq!(
        store.reserve(&s, &FP, t1, lease.into()).await.unwrap(),
        Reservation::Reserved
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // longer than the "lease"
    let t2 = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, t2, lease.into()).await.unwrap(),
        Reservation::InFlight
    );
    let before = store.round_trips().total;
    assert!(store.renew(&s, t1, lease).await.unwrap());
    assert!(!store.renew(&s, t2, lease).await.unwrap());
    assert_eq!(
        store.round_trips().total,
        before + 1,
        "the holder's renewal is one statement on its transaction; another token's none"
    );
    assert!(!store.release(&s, t2).await.unwrap());
    assert_eq!(
        store
            .complete(&s, t2, &Record::NotReplayable, LEASE)
            .await
            .unwrap(),
        Completion::RolledBack,
        "a token without a transaction cannot complete"
    );
    assert!(store.release(&s, t1).await.unwrap());
    assert!(!store.release(&s, t1).await.unwrap());
    let t3 = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, t3, lease.into()).await.unwrap(),
        Reservation::Reserved
    );
    assert_eq!(
        store
            .complete(&s, t3, &Record::NotReplayable, LEASE)
            .await
            .unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store
            .complete(&s, t3, &Record::NotReplayable, LEASE)
            .await
            .unwrap(),
        Completion::Stored,
        "a retried complete finds its committed record"
    );
    let other = Fingerprint::from_bytes([1; 32]);
    assert_eq!(
        store
            .reserve(&s, &FP, FencingToken::generate(), lease.into())
            .await
            .unwrap(),
        Reservation::Completed(Record::NotReplayable)
    );
    assert_eq!(
        store
            .reserve(&s, &other, FencingToken::generate(), lease.into())
            .await
            .unwrap(),
        Reservation::Mismatch
    );
    assert_eq!(store.open_transactions(), 0);
}

/// Of many concurrent transactional reserves of one scope, exactly one holds it — in
/// every round; the winner releases before the next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_reserve_is_atomic_over_rounds() {
    let store = support::postgres::transactional_store()
        .await
        .map(|s| s.lock_timeout(Duration::from_millis(50)));
    for round in 0..10 {
        let s = scope("/atomic");
        let answers = join_all((0..8).map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let token = FencingToken::generate();
                (
                    token,
                    store.reserve(&s, &FP, token, LEASE.into()).await.unwrap(),
                )
            })
        }))
        .await;
        let winners: Vec<FencingToken> = answers
            .into_iter()
            .map(Result::unwrap)
            .filter(|(_, a)| *a == Reservation::Reserved)
            .map(|(t, _)| t)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}");
        assert!(store.release(&s, winners[0]).await.unwrap());
    }
    assert_eq!(store.open_transactions(), 0);
}

/// A handler that ends the store's transaction with SQL (`ROLLBACK`, then `BEGIN` and a
/// write of its own): the record's `UPDATE` finds no reservation row, so the store rolls
/// back instead of committing; the handler's write after its own `BEGIN` never commits
/// without a record, the caller gets 503, and the key is free for a retry. One that
/// `COMMIT`s instead leaves the reservation row committed, and its record is stored.
#[tokio::test]
async fn tx_a_handler_that_ends_the_transaction_with_sql() {
    let store = support::postgres::transactional_store().await;
    let side = store.schema.table("side");
    store
        .exec(&format!("CREATE TABLE {side} (run int8 NOT NULL)"))
        .await;
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (runs, side) = (runs.clone(), side.clone());
        move |tx: Tx, body: String| {
            let (runs, side) = (runs.clone(), side.clone());
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let mut conn = tx.lock().await.unwrap();
                let end = if body == "commit" {
                    "COMMIT"
                } else {
                    "ROLLBACK; BEGIN"
                };
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "{end}; INSERT INTO {side} (run) VALUES ({run})"
                )))
                .execute(&mut *conn)
                .await
                .unwrap();
                StatusCode::CREATED
            }
        }
    };
    let router = Router::new().route(
        "/pay",
        post(handler).layer(IdempotencyLayer::new(store.clone()).global_scope()),
    );
    let r = send(&router, request("k", "rollback")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(store.count("side").await, 0, "rolled back, never committed");
    assert_eq!(store.count("idem").await, 0);
    let r = send(&router, request("k", "rollback")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the key was free again");
    let r = send(&router, request("c", "commit")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = send(&router, request("c", "commit")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 3, "stored, then replayed");
    assert_eq!(store.count("side").await, 1);
    assert_eq!(store.open_transactions(), 0);
}

/// A waiter in another process announces itself when it subscribes; the owner's commit
/// then carries a NOTIFY, which wakes the waiter's subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_notifies_a_waiter_that_announced_itself() {
    let owner = support::postgres::transactional_store().await;
    let waiter = TestStore::new(
        PostgresStore::new(support::postgres::pool(4).await)
            .table(owner.table_name())
            .transactional(),
        owner.schema.clone(),
    );
    let s = scope("/notify");
    let token = FencingToken::generate();
    assert_eq!(
        owner.reserve(&s, &FP, token, LEASE.into()).await.unwrap(),
        Reservation::Reserved
    );
    // The owner's listener (started by its reservation) must be up to hear the waiter.
    let _owner_listening = owner.subscribe(&scope("/other")).await.unwrap();
    let mut subscription = waiter.subscribe(&s).await.unwrap();
    // Give the announcement time to reach the owner's process.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let completed = owner.complete(&s, token, &Record::NotReplayable, LEASE);
    assert_eq!(completed.await.unwrap(), Completion::Stored);
    tokio::time::timeout(
        Duration::from_secs(5),
        tower_idempotency::store::Subscription::changed(&mut subscription),
    )
    .await
    .expect("the commit's NOTIFY woke the waiter");
    assert_eq!(
        waiter
            .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap(),
        Reservation::Completed(Record::NotReplayable)
    );
}

/// The `Tx` extractor outside transactional mode (or without a key) is a 500 naming the
/// wiring mistake; `Option<Tx>` is `None` there.
#[tokio::test]
async fn tx_extractor_without_a_transaction() {
    let store = support::postgres::store().await;
    let layer = IdempotencyLayer::new(store).global_scope();
    let router = Router::new()
        .route(
            "/pay",
            post(|_tx: Tx| async { StatusCode::CREATED }).layer(layer.clone()),
        )
        .route(
            "/maybe",
            post(|tx: Option<Tx>| async move {
                if tx.is_none() {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::CREATED
                }
            })
            .layer(layer.store_when(StorePolicy::All)),
        );
    let r = send(&router, request("k", "{}")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&r.body).contains("transactional PostgresStore"));
    let r = send(&router, common::app::post("/maybe", Some("k"), "{}")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
}

/// Replays of one key do not queue behind each other: the transactional reserve reads a
/// completed row without locking it (`ON CONFLICT DO NOTHING`). Here another transaction
/// holds a lock on the completed row (as a concurrent replay's `DO UPDATE` used to, until
/// its rollback): the replay still answers from the row at once, never 409 after the
/// lock timeout. Also with [`PostgresStore::reserve_first`], where each replay's batch
/// fails on the row first, and takes the scope's advisory lock for a moment before: the
/// other replays' batches then see it held, and still replay, never 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_replay_never_waits_on_a_lock_of_the_completed_row() {
    for reserve_first in [false, true] {
        let store = support::postgres::transactional_store().await.map(|s| {
            s.lock_timeout(Duration::from_millis(100))
                .reserve_first(reserve_first)
        });
        a_replay_never_waits_on_a_lock_of_the_completed_row(store).await;
    }
}

async fn a_replay_never_waits_on_a_lock_of_the_completed_row(store: TestStore) {
    let (app, router) = TxApp::new(store.clone(), |l| l.in_flight(InFlight::Conflict)).await;
    let first = send(&router, request("hot", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Another session locks the completed row and keeps its transaction open.
    let table = store.schema.table("idem");
    let mut holder = store.store().pool().begin().await.expect("begin");
    let locked: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM (SELECT 1 FROM {table} WHERE state = 'completed' FOR UPDATE) x"
    )))
    .fetch_one(&mut *holder)
    .await
    .expect("lock the completed row");
    assert_eq!(locked, 1);
    let started = tokio::time::Instant::now();
    let replays = join_all((0..8).map(|_| send(&router, request("hot", "{}")))).await;
    let took = started.elapsed();
    for r in &replays {
        assert!(r.replayed(), "{r:?}");
        assert_eq!(r.body, first.body);
    }
    holder.rollback().await.expect("rollback");
    eprintln!("8 replays of a locked completed row took {took:?}");
    assert_eq!(app.runs(), 1);
}
