//! A Postgres store for [`tower-idempotency`](tower_idempotency_core): [`PostgresStore`],
//! on the [`sqlx`] pool the application already has.
//!
//! Two modes:
//!
//! - **Plain** (the default): the Redis store's semantics in a table. A reservation is a
//!   lease with a fencing token in the scope's row, renewed while the handler runs; TTLs
//!   and leases follow the database clock; each operation is one atomic statement; waiters
//!   are woken by `LISTEN`/`NOTIFY`, with polling as the safety net. At most one execution
//!   while the owner is alive and can reach the database; after a lost lease a second
//!   execution is possible, and the stale owner's result is never stored.
//! - **Transactional** ([`PostgresStore::transactional`]): the reservation is the `INSERT`
//!   of the pending row inside a transaction that the handler receives ([`Tx`]), and the
//!   record commits in that same transaction, before the response is sent. Exactly once
//!   for everything the handler writes to this database through [`Tx`], with no lease
//!   window: see [below](#transactional-mode).
//!
//! Key columns are the 32-byte scope hash, never raw keys or tenant ids. The schema ships
//! with the crate (`sql/schema.sql`) and [`PostgresStore::migrate`] applies it
//! idempotently; the table name is configurable (`schema.table` too).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_idempotency_core::{FencingToken, Fingerprint, Reservation, ScopeHash, Store};
//! use tower_idempotency_postgres::sqlx::postgres::PgPoolOptions;
//! use tower_idempotency_postgres::PostgresStore;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // The application's own pool.
//! let pool = PgPoolOptions::new()
//!     .max_connections(20)
//!     .connect("postgres://postgres@127.0.0.1/app")
//!     .await?;
//! let store = PostgresStore::new(pool)
//!     .table("app.idempotency")
//!     .command_timeout(Duration::from_secs(2));
//! store.migrate().await?; // CREATE TABLE IF NOT EXISTS ...
//! let store = store.init().await?; // checks the server, logs its warnings
//! println!("{}", store.check().await?);
//!
//! // The layer drives the store; this is what it does for a new request.
//! let scope = ScopeHash::from_bytes([7; 32]);
//! let fingerprint = Fingerprint::from_bytes([1; 32]);
//! let token = FencingToken::generate();
//! let reservation = store
//!     .reserve(&scope, &fingerprint, token, Duration::from_secs(30).into())
//!     .await?;
//! assert_eq!(reservation, Reservation::Reserved);
//! # Ok(()) }
//! ```
//!
//! Or all at once, with default settings: `PostgresStore::connect(url).await?` connects a
//! pool, creates the table if it is missing, and checks the server.
//!
//! # Transactional mode
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # mod example {
//! use http::StatusCode;
//! use tower_idempotency_postgres::{sqlx, Tx};
//!
//! // Behind `IdempotencyLayer::new(PostgresStore::new(pool).transactional())`.
//! async fn create_payment(tx: Tx) -> Result<StatusCode, StatusCode> {
//!     let mut conn = tx.lock().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
//!     sqlx::query("INSERT INTO payments (amount) VALUES ($1)")
//!         .bind(1000_i64)
//!         .execute(&mut *conn)
//!         .await
//!         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
//!     Ok(StatusCode::CREATED)
//! }
//! # }
//! ```
//!
//! What happens, step by step:
//!
//! 1. **Reserve**: `BEGIN`, then the `INSERT` of the pending row. The row is invisible to
//!    other transactions until this one commits.
//! 2. A concurrent request with the same key finds the owner's advisory lock on the scope
//!    (taken with the insert, held until the transaction ends) and counts as **in
//!    flight** at once: 409 in conflict mode, or in wait mode it waits (notified at commit,
//!    polling anyway) and tries again within the wait bound. Its connection goes back to
//!    the pool meanwhile. *A different payload while the first is in flight gets 409, not
//!    422*: the pending row, with its fingerprint, cannot be read until it commits; once it
//!    has, a different payload gets 422. A reserving insert that waits on a lock that is
//!    not a reservation's (a purge deleting the key's expired row, DDL) is tried again
//!    after the store's [`lock_timeout`](PostgresStore::lock_timeout), up to its
//!    [`command_timeout`](PostgresStore::command_timeout), then answered 503: never 409 for a key that
//!    nobody holds. Every reserving transaction runs at READ COMMITTED, whatever the
//!    server's or role's default (at REPEATABLE READ a reserve that waited on a row
//!    would fail when it commits), so the handler's queries in [`Tx`] run at READ
//!    COMMITTED too (use `SELECT ... FOR UPDATE` for read-modify-write).
//! 3. **The handler** runs its queries on [`Tx`] (an extractor, or the request
//!    extension). **The lease does not apply to it**: the uncommitted row is the lock,
//!    nobody else can read or take it, so a handler that runs longer than the lease
//!    still commits its record. Each renewal (every third of the lease) is a statement on
//!    the transaction, which keeps a live owner from looking idle to Postgres and finds
//!    out if the session was ended (terminated, or cut for idleness): that is reported as
//!    a lost lease (`error!`, `idempotency_lease_lost_total`) while the handler still
//!    runs, and its caller gets 503.
//! 4. **Complete**: the record is written in the same transaction, then `COMMIT`, before
//!    the response is sent. The wake-up `NOTIFY` is part of the transaction: waiters
//!    learn of the commit when it happens.
//! 5. **A failed `COMMIT` means the operation did not happen** (e.g. a deferred
//!    constraint the handler's writes violate, a serialization failure, the connection
//!    lost): the caller gets 503 `store-unavailable`, never the handler's 2xx, and a retry
//!    with the same key runs again. The same when the handler's own query failed and
//!    aborted the transaction, even if the handler then answered 201. When the
//!    connection breaks *during* `COMMIT`, its outcome is unknown: 503 too, and the retry
//!    replays if it did commit.
//! 6. **Release is a `ROLLBACK`.** When the store policy does not keep the response (by
//!    default: any 4xx or 5xx), or the handler returns an error or panics, the
//!    transaction is rolled back: **the handler's writes are undone with the
//!    reservation**. A handler that wants to keep a write on failure must make it outside
//!    [`Tx`], or answer with a status the policy stores.
//! 7. **A crash, a killed process, a cut connection** aborts the transaction on the
//!    server: nothing happened, nothing is orphaned, the retry runs once.
//!
//! A frozen owner (process stopped, not dead) makes no renewals, and would hold its
//! transaction and key until its connection dies. Each reserving transaction sets
//! `idle_in_transaction_session_timeout` (default: the layer's lease, 30 s), so Postgres
//! ends it after that much idleness and the key frees. The one way a live owner looks
//! idle: holding the transaction's [`TxGuard`] across a slow call that is not a query
//! (the renewal cannot use the connection then) — lock [`Tx`] per query. Durations are
//! clamped to what Postgres accepts (2^31 - 1 ms); zero means no limit. See
//! [`idle_in_transaction_timeout`](PostgresStore::idle_in_transaction_timeout).
//!
//! Costs: each request in flight holds one pool connection from reserve to commit, so the
//! pool's size bounds the requests in flight (a reserve that cannot get a connection
//! within the store's [`command_timeout`](PostgresStore::command_timeout) is a 503). A new request costs 4
//! round trips (a pre-read `SELECT`; one batch that begins the transaction with its
//! settings and inserts the pending row, with a statement each connection prepares once;
//! the record's `UPDATE`; the `COMMIT`: as many as the hand-written `BEGIN`, `INSERT`,
//! `UPDATE`, `COMMIT`) plus one per renewal; a replay, a
//! 422 or a 409 for a key in flight 1 (the pre-read, outside any transaction), and 0
//! from the opt-in [local replay tier](PostgresStore::local_replays). The pre-read takes an
//! idle connection as the pool holds it (sqlx's `try_acquire`), without the pool's
//! `test_before_acquire` ping, a round trip of its own, its `before_acquire` hook or its
//! `max_lifetime` check (the pool still checks that one when the connection comes back):
//! the pre-read is the test. It changes nothing, so when that connection died while idle
//! (a restarted server, a proxy's idle cut) it is sent again on a connection that
//! `acquire` tested; only when the pool has no idle connection does the store wait in
//! `acquire`. Plain mode's reserve takes its connection the same way.
//! [`pool_acquire_checks(true)`](PostgresStore::pool_acquire_checks) takes every
//! connection through `acquire`. For traffic that is nearly all new keys,
//! [`reserve_first(true)`](PostgresStore::reserve_first) skips the pre-read: a new request
//! is 3 round trips, a retry 3 (the batch, refused, its `ROLLBACK`, the pre-read), and the
//! handler's `lock_timeout` is the session's default. The exactly-once guarantee covers what the
//! handler writes through [`Tx`] to this database only: a call to a payment provider from
//! the handler is not undone by a rollback. Use one mode per table.
//!
//! [`migrate`](PostgresStore::migrate) takes no lock when the schema is in place, so a
//! server can start (and migrate) beside long transactional requests of others.
//!
//! # Features
//!
//! - `axum` (default): [`Tx`] implements axum's `FromRequestParts` and
//!   `OptionalFromRequestParts`.
//! - `tls-rustls`: sqlx's rustls TLS, for `sslmode=require` URLs.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod check;
mod error;
mod prepared;
pub mod purge;
pub mod round_trip;
mod setup;
mod sql;
pub mod store;
pub mod subscriber;
pub mod tx;

pub use check::{CheckReport, Privileges};
pub use error::PostgresStoreError;
pub use purge::PurgeTask;
pub use round_trip::RoundTrips;
pub use setup::{DEFAULT_COMMAND_TIMEOUT, DEFAULT_LOCK_TIMEOUT, MIGRATE_LOCK_TIMEOUT};
pub use sql::DEFAULT_TABLE;
pub use sqlx;
pub use store::PostgresStore;
pub use subscriber::PgSubscription;
pub use tower_idempotency_core::local::{
    LocalReplays, DEFAULT_LOCAL_REPLAY_AGE, DEFAULT_LOCAL_REPLAY_BYTES,
};
#[cfg(feature = "axum")]
pub use tx::MissingTx;
pub use tx::{Tx, TxError, TxGuard};
