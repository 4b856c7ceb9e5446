//! Transactional `PostgresStore` at its edges: a handler longer than the lease, a
//! transaction cut under a live owner, settings past what Postgres accepts, a server whose
//! default isolation is not READ COMMITTED, locks held by something other than a
//! reservation (a purge, DDL), and `migrate()` while a long transaction runs.
//!
//! Every test works in a schema (and, where it needs one, a role) of its own.
#![cfg(feature = "postgres")]

use crate::common;
use crate::postgres::{
    an_idle_connection_that_died_is_replaced, request, scope, show_setting, TxApp, FP, LEASE,
};
use crate::support;

use std::time::Duration;

use axum::http::StatusCode;
use common::app::{assert_problem, send, spawn_send, Harness, Reply};
use futures_util::future::join_all;
use support::postgres::{TestSchema, TestStore};
use tokio::time::Instant;
use tower_idempotency::postgres::sqlx::{self, AssertSqlSafe};
use tower_idempotency::postgres::PostgresStore;
use tower_idempotency::store::{Completion, FencingToken, Record, Reservation};
use tower_idempotency::{IdempotencyLayer, InFlight, Store};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A transactional store on `pool`, on the table `idem` of `schema`, migrated.
async fn tx_store_on(pool: &sqlx::PgPool, schema: &TestSchema) -> PostgresStore {
    let store = PostgresStore::new(pool.clone())
        .table(&schema.table("idem"))
        .transactional();
    store.migrate().await.unwrap();
    store
}

fn lease_lost(route: &str) -> u64 {
    support::metrics::counter("idempotency_lease_lost_total", &[("route", route)])
}

// ---------------------------------------------------------------------------------------
// Past the lease
// ---------------------------------------------------------------------------------------

/// The uncommitted row is the lock: a handler that runs longer than the lease still
/// commits its record (with the idle limit off, nothing else can end the transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_handler_longer_than_the_lease_commits() {
    let store = support::postgres::transactional_store()
        .await
        .map(PostgresStore::no_idle_in_transaction_timeout);
    let (app, router) = TxApp::new(store, |l| l.lease(Duration::from_secs(1))).await;
    let first = send(&router, request("long", r#"{"hold_ms": 1500}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(app.rows().await, 1);
    let retry = send(&router, request("long", r#"{"hold_ms": 1500}"#)).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(app.runs(), 1);
}

/// With the default idle limit (the lease), a live owner that idles in its transaction
/// longer than the lease is not cut: each renewal is a statement on the transaction, so
/// Postgres never sees it idle that long. Only a frozen owner (no renewals) is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_renewals_keep_a_live_owner_past_the_idle_limit() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store, |l| l.lease(Duration::from_secs(1))).await;
    let first = send(&router, request("idle", r#"{"hold_ms": 2500}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(app.rows().await, 1);
    assert!(send(&router, request("idle", r#"{"hold_ms": 2500}"#))
        .await
        .replayed());
}

/// A frozen owner (reserved, then no renewals: here the store is driven by hand) is cut
/// by the default idle limit, which is the lease: the key frees for the next owner, and
/// the frozen one can no longer complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_default_idle_limit_is_the_lease() {
    let store = support::postgres::transactional_store()
        .await
        .map(|s| s.lock_timeout(Duration::from_millis(100)));
    let s = scope("/frozen");
    let frozen = FencingToken::generate();
    let lease = Duration::from_millis(400);
    assert_eq!(
        store.reserve(&s, &FP, frozen, lease.into()).await.unwrap(),
        Reservation::Reserved
    );
    let other = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, other, lease.into()).await.unwrap(),
        Reservation::InFlight,
        "held while the owner's transaction lives"
    );
    // Idle for well over the lease: Postgres ends the frozen owner's session.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let token = FencingToken::generate();
        match store.reserve(&s, &FP, token, LEASE.into()).await.unwrap() {
            Reservation::InFlight if Instant::now() < deadline => continue,
            answer => break (answer, token),
        }
    };
    assert_eq!(
        answer.0,
        Reservation::Reserved,
        "the idle limit freed the key"
    );
    assert_eq!(
        store
            .complete(&s, frozen, &Record::NotReplayable, LEASE)
            .await
            .unwrap(),
        Completion::RolledBack,
        "the frozen owner's transaction is gone"
    );
    assert!(store.release(&s, answer.1).await.unwrap());
}

// ---------------------------------------------------------------------------------------
// A cut is noticed while the handler still runs
// ---------------------------------------------------------------------------------------

/// Postgres ends the owner's transaction for idleness (an explicit idle limit far below
/// the renewal interval): the next renewal finds the transaction gone and reports a lost
/// lease (`error!`, `idempotency_lease_lost_total`) while the handler still runs — not
/// only when the commit fails. The caller then gets 503 and nothing was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_an_idle_cut_is_noticed_by_the_next_renewal() {
    support::metrics::install();
    for (route, body) in [
        ("/idle-cut", r#"{"hold_ms": 2500}"#),
        // The handler keeps the transaction's guard while it idles: the renewal cannot
        // use the connection and asks the server about it instead.
        ("/idle-cut-locked", r#"{"hold_locked_ms": 2500}"#),
    ] {
        let store = support::postgres::transactional_store()
            .await
            .map(|s| s.idle_in_transaction_timeout(Duration::from_millis(300)));
        let (app, router) = TxApp::on(route, store, |l| l.lease(Duration::from_secs(3))).await;
        let first = spawn_send(&router, common::app::post(route, Some("k"), body));
        app.inserted.notified().await;
        // Renewals every second: the one at 1 s finds the session ended at 0.3 s.
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(
            lease_lost(route),
            1,
            "{route}: noticed before the handler ended"
        );
        let first = first.await.unwrap();
        assert_problem(&first, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
        assert_eq!(app.rows().await, 0);
        assert_eq!(lease_lost(route), 1, "{route}: counted once");
    }
}

/// The owner's connection is terminated (`pg_terminate_backend`, as an operator or a
/// failover would): the next renewal notices, long before the handler returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_terminated_connection_is_noticed_by_the_next_renewal() {
    support::metrics::install();
    let route = "/terminated";
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::on(route, store, |l| l.lease(Duration::from_secs(3))).await;
    let first = spawn_send(
        &router,
        common::app::post(route, Some("k"), r#"{"hold_ms": 3000}"#),
    );
    app.inserted.notified().await;
    let pid = app.pid.lock().unwrap().expect("pid");
    let admin = support::postgres::pool(1).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(killed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        lease_lost(route),
        1,
        "noticed at the renewal after the kill"
    );
    let first = first.await.unwrap();
    assert_problem(&first, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(app.rows().await, 0);
}

// ---------------------------------------------------------------------------------------
// Settings past what Postgres accepts
// ---------------------------------------------------------------------------------------

/// Postgres's `lock_timeout` and `idle_in_transaction_session_timeout` take at most
/// 2^31 - 1 ms (~24.8 days): a longer lease (from which the idle limit derives), idle
/// limit or lock timeout is clamped, never a failed reserve (503 on every request, or a
/// pass-through to the handler without its transaction under `fail_open`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_durations_past_postgres_limits_are_clamped() {
    let lease = 30 * DAY;
    for fail_open in [false, true] {
        let store = support::postgres::transactional_store().await;
        let (app, router) = TxApp::new(store, |l| {
            let l = l.lease(lease).ttl(60 * DAY);
            if fail_open {
                l.fail_open()
            } else {
                l
            }
        })
        .await;
        let first = send(&router, request("long-lease", "{}")).await;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "fail_open {fail_open}: {first:?}"
        );
        assert!(send(&router, request("long-lease", "{}")).await.replayed());
        assert_eq!(app.rows().await, 1);
    }
    let store = support::postgres::transactional_store().await.map(|s| {
        s.idle_in_transaction_timeout(Duration::MAX)
            .lock_timeout(Duration::MAX)
    });
    let (app, router) = TxApp::new(store, |l| l).await;
    assert_eq!(
        send(&router, request("max", "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.rows().await, 1);
}

/// A lock timeout longer than the store's own timeout is cut to half of it: a reserve
/// waiting on a table lock gives up in the server before the store gives up on it (503),
/// so nothing is left waiting there to reserve the key once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_lock_timeout_past_the_store_timeout_ends_in_the_server_first() {
    let store = support::postgres::transactional_store().await.map(|s| {
        s.lock_timeout(Duration::MAX)
            .command_timeout(Duration::from_secs(1))
    });
    let (app, router) = TxApp::new(store.clone(), |l| l).await;
    locked_past_the_timeout(&store, &app, &router, "locked").await;
}

/// A table lock held past the store's timeout, around a request of `key` on `router`: 503
/// and the handler does not run; every attempt gave up in the server before the 503, so
/// none still waits on the table to reserve the key once the lock goes and hold it after
/// the caller was told to retry (a statement the store stopped waiting for goes on in the
/// server); once the lock has gone, the key runs.
async fn locked_past_the_timeout(store: &TestStore, app: &TxApp, router: &axum::Router, key: &str) {
    let mut ddl = store.lock_table("idem").await;
    let runs = app.runs();
    let r = send(router, request(key, "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(app.runs(), runs);
    let waiting = store.lock_waiters(&mut ddl, "idem").await;
    assert_eq!(waiting, 0, "a reserve still waits on the table lock");
    ddl.rollback().await.unwrap();
    assert_eq!(
        send(router, request(key, "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.runs(), runs + 1);
}

/// A completed row without a record is not this crate's (edited by hand, another writer):
/// 503 with the reason in the log, never a run of the handler over it nor a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_completed_row_without_a_record_is_503() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store.clone(), |l| l).await;
    let first = send(&router, request("hand-edited", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let table = store.schema.table("idem");
    store
        .exec(&format!("UPDATE {table} SET record = NULL"))
        .await;
    let r = send(&router, request("hand-edited", "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(app.runs(), 1);
}

/// A renewal that comes due while the owner commits (the transaction is out of its slot,
/// in the `COMMIT`) answers that the owner holds the scope: a slow commit (here a
/// deferred constraint trigger that sleeps) is not a lost lease, so no `error!` and no
/// `idempotency_lease_lost_total` for a record that commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_renewal_during_a_slow_commit_is_not_a_lost_lease() {
    let store = support::postgres::transactional_store().await;
    let (schema, table) = (&store.schema.name, store.schema.table("idem"));
    store
        .exec(&format!(
            "CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow AFTER INSERT OR UPDATE ON {table} \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.slow()"
        ))
        .await;
    let (s, token) = (scope("/slow-commit"), FencingToken::generate());
    let reserved = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    let completing = {
        let (store, s) = (store.clone(), s);
        tokio::spawn(async move {
            let record = Record::NotReplayable;
            store.complete(&s, token, &record, LEASE).await
        })
    };
    // The commit runs the trigger twice (the reserve's insert, the record's update).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!completing.is_finished(), "the commit was not slow");
    let renewed = store.renew(&s, token, LEASE).await.unwrap();
    assert!(renewed, "a renewal during the commit reported a lost lease");
    assert_eq!(completing.await.unwrap().unwrap(), Completion::Stored);
    assert!(
        !store.renew(&s, token, LEASE).await.unwrap(),
        "after it, the slot is gone"
    );
}

/// The same row under a fail-open policy: still 503, never a pass-through (SPEC section
/// 6: only an unavailable store may let a request through; this one answered, with a
/// row this crate never writes, and the key may be in use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_completed_row_without_a_record_is_503_even_when_failing_open() {
    let store = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(store.clone(), |l| l.fail_open()).await;
    let first = send(&router, request("hand-edited", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let table = store.schema.table("idem");
    store
        .exec(&format!("UPDATE {table} SET record = NULL"))
        .await;
    let r = send(&router, request("hand-edited", "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(app.runs(), 1, "passed through to the handler");
}

/// `idle_in_transaction_timeout(Duration::ZERO)` means what 0 means to Postgres: no
/// limit (not "cut at once", which would fail every request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_zero_idle_limit_is_no_limit() {
    let store = support::postgres::transactional_store()
        .await
        .map(|s| s.idle_in_transaction_timeout(Duration::ZERO));
    let (app, router) = TxApp::new(store.clone(), |l| l.no_renewal()).await;
    let r = send(&router, request("zero", r#"{"hold_ms": 300}"#)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(app.rows().await, 1);
    // And it reaches the session as 0 (the server's "off"), not 1 ms.
    let router = show_setting(store, "idle_in_transaction_session_timeout");
    let r = send(&router, common::app::post("/show", Some("k"), "{}")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body, "0");
}

// ---------------------------------------------------------------------------------------
// Isolation
// ---------------------------------------------------------------------------------------

/// A role of the test's own whose sessions default to REPEATABLE READ (a server or role
/// setting some teams use), with a pool of 16 on it; dropped by [`RrRole::drop_role`].
struct RrRole {
    name: String,
    pool: tower_idempotency::postgres::sqlx::PgPool,
}

impl RrRole {
    async fn create(schema: &TestSchema) -> RrRole {
        let name = format!("{}_rr", schema.name);
        let admin = support::postgres::pool(1).await;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE ROLE {name} LOGIN; \
             ALTER ROLE {name} SET default_transaction_isolation = 'repeatable read'; \
             GRANT ALL ON SCHEMA {s} TO {name}",
            s = schema.name
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
        let url = support::postgres::database_url().replacen("postgres@", &format!("{name}@"), 1);
        let pool = tower_idempotency::postgres::sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .unwrap();
        let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(isolation, "repeatable read");
        RrRole { name, pool }
    }

    async fn drop_role(self) {
        self.pool.close().await;
        let admin = support::postgres::pool(1).await;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP OWNED BY {n}; DROP ROLE {n}",
            n = self.name
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    }
}

/// On a role whose default isolation is REPEATABLE READ, a waiter whose reserve blocks on
/// the owner's row gets the replay when the owner commits (not a serialization failure,
/// 503): every reserve transaction runs at READ COMMITTED. Plain mode too, and many
/// concurrent first requests there get 201 or 409, never 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeatable_read_default_does_not_break_waiters() {
    let schema = TestSchema::create().await;
    let role = RrRole::create(&schema).await;
    let table = schema.table("idem");
    let plain = PostgresStore::new(role.pool.clone()).table(&table);
    plain.migrate().await.unwrap();

    // Store level: a reserve that blocks on another session's uncommitted row (an owner
    // caught between its insert and its advisory lock, or one of an older version) for
    // as long as it takes answers with the record that session commits.
    let tx = plain
        .clone()
        .transactional()
        .lock_timeout(Duration::from_secs(5));
    let s = scope("/rr");
    let mut other = role.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (scope, fingerprint, state, token, record, expires_at) \
         VALUES ($1, $2, 'completed', '\\x00', $3, now() + interval '1 hour')"
    )))
    .bind(s.as_bytes().as_slice())
    .bind(FP.as_bytes().as_slice())
    .bind(Record::NotReplayable.encode().to_vec())
    .execute(&mut *other)
    .await
    .unwrap();
    let blocked = tokio::spawn({
        let tx = tx.clone();
        async move {
            tx.reserve(&s, &FP, FencingToken::generate(), LEASE.into())
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.commit().await.unwrap();
    assert_eq!(
        blocked.await.unwrap().expect("not a serialization failure"),
        Reservation::Completed(Record::NotReplayable)
    );

    // Transactional: the owner holds 600 ms, the waiter waits and replays.
    let tx = TestStore::new(plain.clone().transactional(), schema.clone());
    let (app, router) =
        TxApp::new(tx, |l| l.in_flight(InFlight::Wait(Duration::from_secs(10)))).await;
    let first = spawn_send(&router, request("rr", r#"{"hold_ms": 600}"#));
    app.inserted.notified().await;
    let waiter = send(&router, request("rr", r#"{"hold_ms": 600}"#)).await;
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(waiter.status, StatusCode::CREATED, "{waiter:?}");
    assert!(waiter.replayed());
    assert_eq!(app.runs(), 1);

    // Plain: 16 concurrent first requests, conflict mode, then wait mode.
    let plain = TestStore::new(plain, schema.clone());
    for (round, mode) in [InFlight::Conflict, InFlight::Wait(Duration::from_secs(10))]
        .into_iter()
        .enumerate()
    {
        let h = Harness::new(
            IdempotencyLayer::new(plain.clone())
                .global_scope()
                .in_flight(mode),
        );
        let key = format!("rr-plain-{round}");
        let replies: Vec<Reply> = join_all((0..16).map(|_| {
            let router = h.router.clone();
            let req = common::app::delayed(request(&key, "{}"), 200);
            tokio::spawn(async move { send(&router, req).await })
        }))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        assert_eq!(h.runs(), 1, "{mode:?}");
        for r in &replies {
            assert!(
                r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT,
                "{mode:?}: {r:?}"
            );
        }
    }
    drop(app);
    drop(plain);
    role.drop_role().await;
}

// ---------------------------------------------------------------------------------------
// Locks that are not reservations
// ---------------------------------------------------------------------------------------

/// Another session holds a lock that blocks the reserving `INSERT` past the lock timeout
/// — a table lock (DDL, `LOCK TABLE`), or the row of an expired record that a slow purge
/// is deleting — while nobody holds the key: the reserve is tried again, and the request
/// runs once the lock goes (never 409 for a key nobody holds). Held longer than the
/// store's timeout, it is 503 (retry later), still not 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_foreign_lock_is_not_in_flight() {
    let store = support::postgres::transactional_store().await.map(|s| {
        s.lock_timeout(Duration::from_millis(100))
            .command_timeout(Duration::from_secs(2))
    });
    let (app, router) = TxApp::new(store.clone(), |l| l.in_flight(InFlight::Conflict)).await;
    let table = store.schema.table("idem");

    // A live reservation is in flight (the positive case), answered without waiting.
    let first = spawn_send(&router, request("live", r#"{"hold_ms": 800}"#));
    app.inserted.notified().await;
    let r = send(&router, request("live", "{}")).await;
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);

    // A table lock held for 800 ms.
    let ddl = store.lock_table("idem").await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        ddl.rollback().await.unwrap();
    });
    let r = send(&router, request("table-lock", "{}")).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "a table lock is not in flight: {r:?}"
    );
    release.await.unwrap();

    // An expired record of the key, deleted by a purge that holds it for 800 ms.
    let key = "purged";
    let probe = request(key, "{}");
    let scope =
        tower_idempotency::store::ScopeHash::new(None, probe.method(), "/pay", key.as_bytes());
    store
        .exec(&format!(
            "INSERT INTO {table} (scope, fingerprint, state, token, record, expires_at) \
             VALUES ('\\x{}', '\\x00', 'completed', '\\x00', '\\x0101', now() - interval '1 s')",
            scope.to_hex()
        ))
        .await;
    let mut purge = store.store().pool().begin().await.unwrap();
    let deleted = sqlx::raw_sql(AssertSqlSafe(format!(
        "DELETE FROM {table} WHERE expires_at <= now()"
    )))
    .execute(&mut *purge)
    .await
    .unwrap();
    assert_eq!(deleted.rows_affected(), 1);
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        purge.commit().await.unwrap();
    });
    let r = send(&router, request(key, "{}")).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "a purge is not in flight: {r:?}"
    );
    release.await.unwrap();

    // A table lock held past the store's timeout: 503, and the handler did not run.
    locked_past_the_timeout(&store, &app, &router, "locked-long").await;
}

/// A `COMMIT` that does not answer within the store's timeout (here a deferred trigger
/// that sleeps at commit; in life a slow disk or a lock the commit waits for): the caller
/// gets 503 within the timeout, not when the server is done. The commit then goes through
/// in the server, and the key is never run twice: while it is still committing, a retry
/// is in flight (the owner's transaction holds its advisory lock); after, it replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_commit_past_the_timeout_is_503_and_the_retry_never_runs_again() {
    let store = support::postgres::transactional_store()
        .await
        .map(|s| s.command_timeout(Duration::from_millis(300)));
    let (app, router) = TxApp::new(store.clone(), |l| l.in_flight(InFlight::Conflict)).await;
    let (payments, slow) = (
        store.schema.table("payments"),
        store.schema.table("slow_commit"),
    );
    store
        .exec(&format!(
            "CREATE FUNCTION {slow}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {payments} \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {slow}()"
        ))
        .await;
    let started = Instant::now();
    let r = send(&router, request("slow", "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "answered when the commit ended, not at the timeout: {:?}",
        started.elapsed()
    );
    let during = send(&router, request("slow", "{}")).await;
    assert_problem(&during, StatusCode::CONFLICT, "request-in-flight");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let after = send(&router, request("slow", "{}")).await;
    assert_eq!(after.status, StatusCode::CREATED, "{after:?}");
    assert!(after.replayed(), "the commit went through: {after:?}");
    assert_eq!(app.runs(), 1);
    assert_eq!(app.rows().await, 1);
}

// ---------------------------------------------------------------------------------------
// migrate() next to a long transaction
// ---------------------------------------------------------------------------------------

/// A second server starts (`migrate()`, `init()`) while the first holds a long
/// transactional request: with the schema current, `migrate()` takes no lock and returns
/// at once, and a brand-new key on the first server is answered at once (not queued
/// behind DDL, not 409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_a_current_schema_stalls_nobody() {
    let a = support::postgres::transactional_store().await;
    let (app, router) = TxApp::new(a.clone(), |l| l.in_flight(InFlight::Conflict)).await;
    let long = spawn_send(&router, request("long", r#"{"wait_for_proceed": true}"#));
    app.inserted.notified().await;

    let b = PostgresStore::new(support::postgres::pool(2).await)
        .table(a.table_name())
        .transactional();
    let started = Instant::now();
    let migrated = tokio::time::timeout(Duration::from_secs(10), async {
        b.migrate().await?;
        b.clone().init().await
    })
    .await
    .expect("migrate and init return");
    assert!(migrated.is_ok(), "{migrated:?}");
    eprintln!(
        "migrate + init beside a long transaction: {:?}",
        started.elapsed()
    );
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        send(&router, request("brand-new", "{}")),
    )
    .await
    .expect("answered");
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    app.proceed.notify_one();
    assert_eq!(long.await.unwrap().status, StatusCode::CREATED);
    b.pool().close().await;
}

/// When the schema is not current (here its index is missing) and a long transaction
/// holds the table, `migrate()` gives up within its own bound with an error that says
/// why, instead of queueing forever behind it (and every reserve behind itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_that_cannot_lock_the_table_fails_clearly() {
    let a = support::postgres::transactional_store().await;
    a.exec(&format!(
        "DROP INDEX {}",
        a.schema.table("idem_expires_at_idx")
    ))
    .await;
    let (app, router) = TxApp::new(a.clone(), |l| l.in_flight(InFlight::Conflict)).await;
    let long = spawn_send(&router, request("long", r#"{"wait_for_proceed": true}"#));
    app.inserted.notified().await;
    let b = PostgresStore::new(support::postgres::pool(2).await)
        .table(a.table_name())
        .transactional();
    let err = tokio::time::timeout(Duration::from_secs(15), b.migrate())
        .await
        .expect("migrate gives up by itself")
        .expect_err("it cannot lock the table");
    let message = support::error_chain(&err);
    assert!(message.contains("lock"), "{message}");
    // Meanwhile, and after, the first server answers new keys.
    let r = send(&router, request("brand-new", "{}")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    app.proceed.notify_one();
    assert_eq!(long.await.unwrap().status, StatusCode::CREATED);
    b.migrate()
        .await
        .expect("once the table is free, it migrates");
    b.pool().close().await;
}

// ---------------------------------------------------------------------------------------
// Wake-ups and fencing
// ---------------------------------------------------------------------------------------

/// A waiter in another process announced itself; the owner's release (a ROLLBACK, whose
/// own NOTIFY is never delivered) still wakes it, with a NOTIFY sent after the rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_release_notifies_a_waiter_that_announced_itself() {
    let owner = support::postgres::transactional_store().await;
    let waiter = TestStore::new(
        PostgresStore::new(support::postgres::pool(4).await)
            .table(owner.table_name())
            .transactional(),
        owner.schema.clone(),
    );
    let s = scope("/notify-release");
    let token = FencingToken::generate();
    assert_eq!(
        owner.reserve(&s, &FP, token, LEASE.into()).await.unwrap(),
        Reservation::Reserved
    );
    let _owner_listening = owner.subscribe(&scope("/other")).await.unwrap();
    let mut subscription = waiter.subscribe(&s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(owner.release(&s, token).await.unwrap());
    tokio::time::timeout(
        Duration::from_secs(5),
        tower_idempotency::store::Subscription::changed(&mut subscription),
    )
    .await
    .expect("the release's NOTIFY woke the waiter");
}

/// Plain mode's complete and release compare the fencing token: another token can
/// neither complete nor release a live lease, nor claim a completed record as its own;
/// the holder still can.
#[tokio::test]
async fn plain_complete_and_release_check_the_token() {
    let store = support::postgres::store().await;
    let s = scope("/fenced");
    let holder = FencingToken::generate();
    let stranger = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, holder, LEASE.into()).await.unwrap(),
        Reservation::Reserved
    );
    assert_eq!(
        store
            .complete(&s, stranger, &Record::NotReplayable, LEASE)
            .await
            .unwrap(),
        Completion::Fenced
    );
    assert!(!store.release(&s, stranger).await.unwrap());
    assert_eq!(
        store
            .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap(),
        Reservation::InFlight,
        "the stranger changed nothing"
    );
    assert_eq!(
        store
            .complete(&s, holder, &Record::NotReplayable, LEASE)
            .await
            .unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store
            .complete(&s, stranger, &Record::NotReplayable, LEASE)
            .await
            .unwrap(),
        Completion::Fenced,
        "a completed record is stored again only for its own token"
    );
    assert!(
        !store.release(&s, holder).await.unwrap(),
        "completed: no release"
    );
    assert_eq!(
        store
            .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap(),
        Reservation::Completed(Record::NotReplayable)
    );
}

/// A lock wait can end the prepare itself (parsing the reserve takes the table's lock, and
/// a fresh session's first batch prepares): that session holds no statements and is not
/// counted as holding them, so its next new key prepares them in its batch (the pre-read
/// and one batch), never an `EXECUTE` that fails for want of them and a batch more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_lock_wait_in_the_prepare_does_not_count_the_session_as_prepared() {
    let schema = TestSchema::create().await;
    // One connection: the batches below meet the same, fresh session.
    let pool = support::postgres::pool(1).await;
    let store = tx_store_on(&pool, &schema)
        .await
        .lock_timeout(Duration::from_millis(100))
        .command_timeout(Duration::from_secs(1));
    let admin = support::postgres::pool(1).await;
    let ddl = schema.lock_table(&admin, "idem").await;
    let locked = scope("/locked");
    let answer = store.reserve(&locked, &FP, FencingToken::generate(), LEASE.into());
    assert!(answer.await.is_err(), "reserved past a table lock");
    ddl.rollback().await.unwrap();
    let prepared: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'tower_idempotency_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(prepared, 0, "the lock wait ended the prepare");
    let (s, token) = (scope("/after"), FencingToken::generate());
    let before = store.round_trips().reserve;
    let reserved = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    assert_eq!(
        store.round_trips().reserve - before,
        2,
        "pre-read, prepare+reserve"
    );
    let stored = store
        .complete(&s, token, &Record::NotReplayable, LEASE)
        .await;
    assert_eq!(stored.unwrap(), Completion::Stored);
    admin.close().await;
    pool.close().await;
}

/// A reserve whose caller stops waiting while its batch waits in the server (a waiter's
/// deadline, any `timeout` around the store) does not give its connection back to the
/// pool: the batch goes on once the lock goes, and would leave that session inside its
/// transaction, holding the key for nobody, with the next borrower's statements run in
/// it. sqlx's own guard does nothing for a `BEGIN` that has not answered yet. The
/// connection is closed instead, and the server rolls the batch back: the pool's next
/// session is in no transaction, and the key is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_a_reserve_dropped_mid_batch_leaves_no_transaction_in_the_pool() {
    let schema = TestSchema::create().await;
    // One connection: whatever the cut reserve's session became, the pool hands it on.
    let pool = support::postgres::pool(1).await;
    let store = tx_store_on(&pool, &schema)
        .await
        .lock_timeout(Duration::from_secs(5))
        .command_timeout(Duration::from_secs(10));
    let admin = support::postgres::pool(1).await;
    let mut ddl = schema.lock_table(&admin, "idem").await;
    let s = scope("/cut");
    let reserve = store.reserve(&s, &FP, FencingToken::generate(), LEASE.into());
    let cut = tokio::time::timeout(Duration::from_millis(500), reserve).await;
    assert!(cut.is_err(), "answered while the table was locked: {cut:?}");
    let waiting = schema.lock_waiters(&mut ddl, "idem").await;
    assert_eq!(waiting, 1, "the cut batch waits in the server");
    ddl.rollback().await.unwrap();
    let xid: Option<String> = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        xid, None,
        "the pool's session is inside the cut batch's transaction"
    );
    let token = FencingToken::generate();
    let again = store.reserve(&s, &FP, token, LEASE.into()).await;
    assert_eq!(again.unwrap(), Reservation::Reserved);
    assert!(store.release(&s, token).await.unwrap());
    admin.close().await;
    pool.close().await;
}

/// The reserve each session prepares once (see the store's `prepared` module) is a belief
/// the store checks, never trusts: a session that lost it (deallocated) gets it prepared
/// again; a second store on the same table prepares nothing twice. A new key costs 2
/// statements to reserve and 2 to complete (`UPDATE`, `COMMIT`).
#[tokio::test]
async fn tx_lost_or_shared_prepared_statements_still_work() {
    let schema = TestSchema::create().await;
    // One connection: every batch below meets the same session.
    let pool = support::postgres::pool(1).await;
    let first = tx_store_on(&pool, &schema).await;
    let names = || async {
        let sql = "SELECT name FROM pg_prepared_statements \
                   WHERE name LIKE 'tower_idempotency_%' ORDER BY name";
        sqlx::query_scalar::<_, String>(sql)
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let deallocate = |name: String| {
        let pool = pool.clone();
        async move {
            let sql = format!("DEALLOCATE {name}");
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Reserves, completes (or not) and replays one new key; the reserve's statements.
    let new_key = |store: PostgresStore, name: &'static str, completes: Completion| async move {
        let s = scope(name);
        let token = FencingToken::generate();
        let before = store.round_trips();
        let reserved = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
        let trips = store.round_trips().reserve - before.reserve;
        assert_eq!(reserved, Reservation::Reserved, "{name}");
        let record = Record::NotReplayable;
        let stored = store.complete(&s, token, &record, LEASE).await.unwrap();
        assert_eq!(stored, completes, "{name}");
        if completes == Completion::Stored {
            assert_eq!(store.round_trips().complete - before.complete, 2, "{name}");
            let replay = store.reserve(&s, &FP, FencingToken::generate(), LEASE.into());
            assert_eq!(
                replay.await.unwrap(),
                Reservation::Completed(record),
                "{name}"
            );
        }
        trips
    };
    let stored = Completion::Stored;
    assert_eq!(
        new_key(first.clone(), "/fresh", stored).await,
        2,
        "pre-read, prepare+reserve"
    );
    let prepared = names().await;
    assert_eq!(prepared.len(), 1, "the reserve: {prepared:?}");
    assert!(
        prepared[0].starts_with("tower_idempotency_reserve_"),
        "{prepared:?}"
    );
    assert_eq!(
        new_key(first.clone(), "/known", stored).await,
        2,
        "pre-read, reserve"
    );

    // The reserve deallocated behind the store's back: its `EXECUTE` fails, the store
    // prepares it again.
    deallocate(prepared[0].clone()).await;
    assert_eq!(
        new_key(first.clone(), "/lost", stored).await,
        3,
        "one failed EXECUTE more"
    );
    assert_eq!(new_key(first.clone(), "/healed", stored).await, 2);

    // A second store on the same table: its first batch prepares nothing the session holds.
    let second = PostgresStore::new(pool.clone())
        .table(&schema.table("idem"))
        .transactional();
    assert_eq!(new_key(second.clone(), "/shared", stored).await, 2);
    assert_eq!(new_key(second, "/shared-known", stored).await, 2);
    assert_eq!(names().await, prepared);
    drop(first);
    pool.close().await;
}

/// A row the pre-read does not see (an expired record, not purged yet) makes the new key's
/// insert fail on the primary key: the store ends that transaction and goes the long way,
/// which takes the row over. The key is reserved, the handler's work commits with the new
/// record, and the retry replays it. Each case costs what it did with the insert that
/// divided by zero instead (pre-read, batch, then the long way's three statements). A
/// row of another owner that holds the scope still answers "in flight" (1 / 0 first).
#[tokio::test]
async fn tx_an_expired_record_not_yet_purged_is_taken_over() {
    let schema = TestSchema::create().await;
    let pool = support::postgres::pool(2).await;
    let store = tx_store_on(&pool, &schema).await;
    let table = schema.table("idem");
    let s = scope("/expired");
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (scope, fingerprint, state, token, record, expires_at) \
         VALUES ($1, $2, 'completed', '\\x00', $3, now() - interval '1 second')"
    )))
    .bind(s.as_bytes().as_slice())
    .bind(FP.as_bytes().as_slice())
    .bind(Record::NotReplayable.encode().to_vec())
    .execute(&pool)
    .await
    .unwrap();
    let token = FencingToken::generate();
    let before = store.round_trips();
    let reserved = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    assert_eq!(
        store.round_trips().reserve - before.reserve,
        5,
        "pre-read, batch (23505), long way: ROLLBACK+BEGIN, reserve"
    );
    // Held: another request is in flight, not a second owner.
    let other = store.reserve(&s, &FP, FencingToken::generate(), LEASE.into());
    assert_eq!(other.await.unwrap(), Reservation::InFlight);
    let record = Record::Response(tower_idempotency::store::StoredResponse::new(
        StatusCode::CREATED,
        Vec::new(),
        bytes::Bytes::from_static(b"{\"id\":1}"),
    ));
    let stored = store.complete(&s, token, &record, LEASE).await.unwrap();
    assert_eq!(stored, Completion::Stored);
    let replay = store.reserve(&s, &FP, FencingToken::generate(), LEASE.into());
    assert_eq!(replay.await.unwrap(), Reservation::Completed(record));
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "taken over in place");
    pool.close().await;
}

/// The pre-read takes an idle connection without the pool's test (its ping would be a
/// round trip of its own before every request). A connection that died while idle (here
/// terminated, as a server restart or a proxy's idle cut would) fails that read; the
/// read has no effect, so it goes again on a connection the pool tested: a replay and a
/// new key answer as usual, never 503.
#[tokio::test]
async fn tx_an_idle_connection_that_died_is_replaced_for_the_pre_read() {
    let schema = TestSchema::create().await;
    let pool = support::postgres::pool(1).await;
    let store = tx_store_on(&pool, &schema).await;
    an_idle_connection_that_died_is_replaced(&store, &pool, 2, 3).await;
    pool.close().await;
}

/// The same without the pre-read (`reserve_first`): the batch is the first statement, and
/// the one that finds the connection dead; it goes again on a tested connection (the dead
/// session's transaction went with it). On the new session the batch finds its statement
/// unprepared and goes once more with the `PREPARE`. The replay: the batch three times,
/// its `ROLLBACK`, the pre-read (5); the new key: the batch three times (3).
#[tokio::test]
async fn tx_an_idle_connection_that_died_is_replaced_for_the_first_batch() {
    let schema = TestSchema::create().await;
    let pool = support::postgres::pool(1).await;
    let store = tx_store_on(&pool, &schema).await.reserve_first(true);
    an_idle_connection_that_died_is_replaced(&store, &pool, 5, 3).await;
    pool.close().await;
}

/// `pool_acquire_checks(true)`: the pre-read takes its connection through `acquire()`,
/// so the pool's `before_acquire` hook sees it; by default it does not (an idle connection
/// as it is, the pre-read being the test).
#[tokio::test]
async fn tx_pool_acquire_checks_run_the_pools_hook_for_the_pre_read() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let schema = TestSchema::create().await;
    let hooks = Arc::new(AtomicUsize::new(0));
    let counted = hooks.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .before_acquire(move |_, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(true) })
        })
        .connect(&support::postgres::database_url())
        .await
        .unwrap();
    let store = tx_store_on(&pool, &schema).await;
    for (checks, expected) in [(false, 0), (true, 1)] {
        let store = store.clone().pool_acquire_checks(checks);
        // The pool's one connection idle, so that only the store's reserve takes it.
        support::postgres::until_idle(&pool).await;
        let before = hooks.load(Ordering::SeqCst);
        let (s, token) = (
            scope(&format!("/checks-{checks}")),
            FencingToken::generate(),
        );
        let reserved = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
        assert_eq!(reserved, Reservation::Reserved, "{checks}");
        assert_eq!(
            hooks.load(Ordering::SeqCst) - before,
            expected,
            "checks {checks}: the hook ran for the pre-read's connection"
        );
        assert!(store.release(&s, token).await.unwrap());
    }
    pool.close().await;
}

/// A server that refuses the `DO` block that prepares the reserve and the complete (here: a
/// database where the role has no `USAGE` on plpgsql) still reserves and commits, with
/// plain statements: the store turns its prepared path off after the first refusal (one
/// round trip more per new key from then on, two more for the first).
#[tokio::test]
async fn tx_a_server_that_refuses_to_prepare_still_reserves() {
    let suffix = TestSchema::create().await; // only for a unique name (and its cleanup)
    let db = format!("{}_noplpgsql", suffix.name);
    let role = format!("{}_noplpgsql", suffix.name);
    let admin = support::postgres::pool(1).await;
    // One statement per call: CREATE and DROP DATABASE refuse a multi-statement batch.
    let each = |statements: [String; 2]| async {
        for sql in statements {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .unwrap();
        }
    };
    each([
        format!("CREATE DATABASE {db}"),
        format!("CREATE ROLE {role} LOGIN"),
    ])
    .await;
    let url = support::postgres::database_url();
    let (base, rest) = url.rsplit_once('/').expect("a database URL");
    let query = rest
        .split_once('?')
        .map_or(String::new(), |(_, q)| format!("?{q}"));
    let in_db = format!("{base}/{db}{query}");
    let as_role = in_db.replacen("postgres@", &format!("{role}@"), 1);
    {
        let owner = sqlx::PgPool::connect(&in_db).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC; \
             CREATE SCHEMA app AUTHORIZATION {role}"
        )))
        .execute(&owner)
        .await
        .unwrap();
        owner.close().await;
    }
    let pool = sqlx::PgPool::connect(&as_role).await.unwrap();
    let refused = sqlx::raw_sql("DO $$ BEGIN END $$").execute(&pool).await;
    assert!(refused.is_err(), "the role must not be able to run DO here");
    // With and without the pre-read: without it the first batch finds the statement
    // unprepared (26000) and the second is refused its `DO`; the same round trips.
    for reserve_first in [false, true] {
        let store = PostgresStore::new(pool.clone())
            .table("app.idem")
            .transactional()
            .reserve_first(reserve_first);
        store.migrate().await.unwrap();
        refusing_server_reserves(&store, reserve_first).await;
    }
    pool.close().await;
    each([
        format!("DROP DATABASE {db} WITH (FORCE)"),
        format!("DROP ROLE {role}"),
    ])
    .await;
    admin.close().await;
}

/// The store part of [`tx_a_server_that_refuses_to_prepare_still_reserves`], on a store
/// that has not yet tried to prepare.
async fn refusing_server_reserves(store: &PostgresStore, reserve_first: bool) {
    for (name, reserve_trips) in [("/first", 4), ("/second", 3)] {
        let name = &format!("{name}-{reserve_first}");
        let (s, token) = (scope(name), FencingToken::generate());
        let before = store.round_trips();
        let reserved = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
        assert_eq!(reserved, Reservation::Reserved, "{name}");
        assert_eq!(
            store.round_trips().reserve - before.reserve,
            reserve_trips,
            "{name}"
        );
        let record = Record::NotReplayable;
        let stored = store.complete(&s, token, &record, LEASE).await.unwrap();
        assert_eq!(stored, Completion::Stored, "{name}");
        assert_eq!(
            store.round_trips().complete - before.complete,
            2,
            "UPDATE, COMMIT"
        );
        let replay = store.reserve(&s, &FP, FencingToken::generate(), LEASE.into());
        assert_eq!(
            replay.await.unwrap(),
            Reservation::Completed(record),
            "{name}"
        );
    }
}

/// A handler that ends the idempotency transaction with its own SQL (`ROLLBACK`, which the
/// docs forbid) never gets a record committed without its writes: the complete's `UPDATE`
/// finds no pending row, the store rolls back instead of sending its `COMMIT`, and answers
/// "rolled back"; the key runs again. The connection goes back to the pool usable.
#[tokio::test]
async fn tx_a_transaction_ended_by_the_handler_is_rolled_back_not_committed() {
    let store = support::postgres::transactional_store().await;
    let (s, token) = (scope("/ended"), FencingToken::generate());
    let reserved = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
    assert_eq!(reserved, Reservation::Reserved);
    let mut extensions = axum::http::Extensions::new();
    store.owner_extensions(&s, token, &mut extensions);
    let tx = extensions
        .get::<tower_idempotency::postgres::Tx>()
        .expect("the owner's transaction")
        .clone();
    {
        let mut conn = tx.lock().await.unwrap();
        let sql = format!(
            "INSERT INTO {} (scope, fingerprint, state, token, expires_at) \
             VALUES ('\\x01', '\\x', 'completed', '\\x', now() + interval '1 hour'); ROLLBACK",
            store.table_name()
        );
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    drop(tx);
    let completed = store
        .complete(&s, token, &Record::NotReplayable, LEASE)
        .await;
    assert_eq!(completed.unwrap(), Completion::RolledBack);
    assert_eq!(store.open_transactions(), 0);
    let again = FencingToken::generate();
    let reserved = store.reserve(&s, &FP, again, LEASE.into()).await.unwrap();
    assert_eq!(
        reserved,
        Reservation::Reserved,
        "nothing of the first run was committed"
    );
    assert!(store.release(&s, again).await.unwrap());
    let rows = format!("SELECT count(*) FROM {}", store.table_name());
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(rows))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(count, 0, "neither the handler's row nor a record");
}
