//! Transactional mode's handle for the handler: [`Tx`], the database transaction that
//! holds the reservation and that the record commits in.
//!
//! In [transactional mode](crate::PostgresStore::transactional) the reservation is the
//! `INSERT` of the pending row inside a transaction on one of the pool's connections. The
//! store keeps that transaction while the request is owned, and hands the handler a
//! [`Tx`] as a request extension (through
//! [`Store::owner_extensions`](tower_idempotency_core::Store::owner_extensions)); with the
//! `axum` feature (on by default) `Tx` is an extractor. The handler runs its queries on
//! it; after the handler returns, the layer asks the store to complete, which writes the
//! record with the same transaction and `COMMIT`s, before the response is sent.
//!
//! - Lock it for the queries, and let the guard go before returning: [`Tx::lock`]
//!   returns a guard that dereferences to [`PgConnection`], so `&mut *guard` is an
//!   executor. Completing waits (up to the store's timeout) for a guard still held.
//! - Do not `COMMIT` or `ROLLBACK` it with SQL: the store does both. Nested
//!   transactions are savepoints: `guard.begin()` (sqlx's `Connection::begin`) gives one.
//! - A failed query aborts the transaction: the commit then fails, and the caller gets 503
//!   even if the handler answered 201. Use a savepoint around a query that may fail on
//!   purpose.
//! - **A release is a `ROLLBACK`**: when the handler's response is one the store policy
//!   does not keep (by default a 4xx or 5xx), or the handler fails or panics, everything
//!   it wrote in the transaction is undone with the reservation.
//! - Only writes to this database, through this transaction, are exactly once. A call to
//!   another service from the handler is not undone by a rollback.
//!
//! # Example
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # mod example {
//! use http::StatusCode;
//! use tower_idempotency_postgres::{sqlx, Tx};
//!
//! async fn create_payment(tx: Tx) -> Result<StatusCode, StatusCode> {
//!     let mut conn = tx.lock().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
//!     sqlx::query("INSERT INTO payments (amount) VALUES ($1)")
//!         .bind(1000_i64)
//!         .execute(&mut *conn)
//!         .await
//!         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
//!     // The payment row and the idempotency record commit together, after this returns.
//!     Ok(StatusCode::CREATED)
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgTransactionManager;
use sqlx::{PgConnection, Postgres, SqlSafeStr};
use sqlx_core::transaction::TransactionManager;
use tokio::sync::OwnedMappedMutexGuard;
use tower_idempotency_core::{FencingToken, ScopeHash};

use crate::error::PostgresStoreError;

/// An open transaction on a connection of the pool, begun with a statement of the store's
/// own that may do more than `BEGIN` (transactional mode's reserve begins the transaction
/// and reserves in one round trip). What sqlx's `Transaction` is, built on its public
/// [`TransactionManager`], so that sqlx counts the transaction (a handler's
/// `guard.begin()` is a savepoint) and a dropped one rolls back.
pub(crate) struct OwnedTx {
    conn: PoolConnection<Postgres>,
    open: bool,
}

impl OwnedTx {
    /// Runs `statement` (a simple-query batch that starts with `BEGIN`) on `conn`, within
    /// `timeout`. On an error the connection comes back: the batch may have left it in a
    /// failed transaction, which the caller ends ([`end_failed`]). A batch that did not
    /// answer in time, or whose future is dropped before it answered, may still run: its
    /// connection is closed, never returned to the pool in a transaction nobody owns (the
    /// server rolls back when it goes; [`CloseIfCut`]).
    pub(crate) async fn begin(
        conn: PoolConnection<Postgres>,
        statement: impl SqlSafeStr,
        timeout: Duration,
    ) -> Result<OwnedTx, (Option<PoolConnection<Postgres>>, PostgresStoreError)> {
        let mut conn = CloseIfCut::new(conn);
        let begin = PgTransactionManager::begin(&mut conn, Some(statement.into_sql_str()));
        match tokio::time::timeout(timeout, begin).await {
            Ok(Ok(())) => Ok(OwnedTx {
                conn: conn.keep(),
                open: true,
            }),
            Ok(Err(err)) => Err((Some(conn.keep()), err.into())),
            // Dropped: closed.
            Err(_) => Err((None, PostgresStoreError::Timeout(timeout))),
        }
    }

    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::commit(&mut self.conn).await?;
        self.open = false;
        Ok(())
    }

    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::rollback(&mut self.conn).await?;
        self.open = false;
        Ok(())
    }
}

/// Ends the transaction a failed [`OwnedTx::begin`] batch may have left open (failed) on
/// `conn`, and returns the connection, idle again, for the caller to use or drop (back to
/// the pool). One that cannot say so is closed instead, and `None` returned.
pub(crate) async fn end_failed(
    conn: PoolConnection<Postgres>,
    timeout: Duration,
) -> Option<PoolConnection<Postgres>> {
    let mut conn = CloseIfCut::new(conn);
    let rollback = sqlx::raw_sql("ROLLBACK").execute(&mut **conn);
    if matches!(tokio::time::timeout(timeout, rollback).await, Ok(Ok(_))) {
        Some(conn.keep())
    } else {
        None
    }
}

/// A connection whose batch may still be running in the server, closed if it is dropped
/// before [`keep`](CloseIfCut::keep): when the store gives up on the batch (its timeout),
/// and when its caller drops the future that waits for it (a waiter's deadline, a
/// `timeout` around the store). Given back to the pool instead, the session would go on
/// to finish the batch there: a `BEGIN` batch would leave it inside a transaction that
/// nobody owns, holding the key it reserved, with the next borrower's statements run in
/// it. sqlx's own guard ends only a transaction whose `BEGIN` has answered, and the pool
/// tests a returned connection with a ping, which waits for the batch but not for the
/// transaction to end. Closed, the session goes and the server rolls the batch back.
struct CloseIfCut(Option<PoolConnection<Postgres>>);

impl CloseIfCut {
    fn new(conn: PoolConnection<Postgres>) -> Self {
        CloseIfCut(Some(conn))
    }

    /// The connection, no longer closed on drop: its batch answered.
    fn keep(mut self) -> PoolConnection<Postgres> {
        match self.0.take() {
            Some(conn) => conn,
            None => unreachable!("kept once, by value"),
        }
    }
}

impl Deref for CloseIfCut {
    type Target = PoolConnection<Postgres>;

    fn deref(&self) -> &PoolConnection<Postgres> {
        match &self.0 {
            Some(conn) => conn,
            None => unreachable!("taken only by `keep`, which consumes the guard"),
        }
    }
}

impl DerefMut for CloseIfCut {
    fn deref_mut(&mut self) -> &mut PoolConnection<Postgres> {
        match &mut self.0 {
            Some(conn) => conn,
            None => unreachable!("taken only by `keep`, which consumes the guard"),
        }
    }
}

impl Drop for CloseIfCut {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.0 {
            conn.close_on_drop();
        }
    }
}

impl Drop for OwnedTx {
    fn drop(&mut self) {
        if self.open {
            // Queued, sent when the connection is next used (or tested on its way back to
            // the pool), as sqlx's `Transaction` does.
            PgTransactionManager::start_rollback(&mut self.conn);
        }
    }
}

impl Deref for OwnedTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for OwnedTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// The open transaction of one owned scope.
pub(crate) struct Slot {
    pub(crate) token: FencingToken,
    /// `None` once the store committed or rolled it back.
    pub(crate) tx: Arc<tokio::sync::Mutex<Option<OwnedTx>>>,
    /// The advisory lock key that only this transaction holds (made from the token):
    /// whether it is still open can be asked from another connection.
    pub(crate) token_lock: i64,
    /// A waiter (in any process) said it waits for this scope: notify on commit/release.
    pub(crate) waiter_seen: AtomicBool,
}

impl Slot {
    pub(crate) fn new(token: FencingToken, tx: OwnedTx, token_lock: i64) -> Self {
        Slot {
            token,
            tx: Arc::new(tokio::sync::Mutex::new(Some(tx))),
            token_lock,
            waiter_seen: AtomicBool::new(false),
        }
    }
}

/// The open transactions of a store's owned scopes (shared by its clones).
#[derive(Default)]
pub(crate) struct Registry {
    slots: Mutex<HashMap<ScopeHash, Arc<Slot>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("open", &self.lock().len())
            .finish()
    }
}

impl Registry {
    /// A poisoned lock only means a panic happened while it was held; each operation
    /// below is a single map call.
    fn lock(&self) -> MutexGuard<'_, HashMap<ScopeHash, Arc<Slot>>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn insert(&self, scope: ScopeHash, slot: Slot) {
        self.lock().insert(scope, Arc::new(slot));
    }

    /// The slot of `scope` if `token` holds it.
    pub(crate) fn get(&self, scope: &ScopeHash, token: FencingToken) -> Option<Arc<Slot>> {
        self.lock()
            .get(scope)
            .filter(|slot| slot.token == token)
            .cloned()
    }

    /// Takes the slot of `scope` out if `token` holds it.
    pub(crate) fn remove(&self, scope: &ScopeHash, token: FencingToken) -> Option<Arc<Slot>> {
        let mut slots = self.lock();
        match slots.get(scope) {
            Some(slot) if slot.token == token => slots.remove(scope),
            _ => None,
        }
    }

    /// Removes the slot of `scope` (if `token` holds it) when the returned guard drops:
    /// at the end of a commit or rollback, or when its future is cancelled.
    pub(crate) fn unregister_on_drop(
        &self,
        scope: ScopeHash,
        token: FencingToken,
    ) -> Unregister<'_> {
        Unregister {
            registry: self,
            scope,
            token,
        }
    }

    /// A waiter announced itself for `scope`: its owner here notifies when it is done.
    pub(crate) fn waiter_seen(&self, scope: &ScopeHash) {
        if let Some(slot) = self.lock().get(scope) {
            slot.waiter_seen.store(true, Ordering::Relaxed);
        }
    }

    /// How many transactions are open.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Removes a slot from its registry when dropped.
pub(crate) struct Unregister<'a> {
    registry: &'a Registry,
    scope: ScopeHash,
    token: FencingToken,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.registry.remove(&self.scope, self.token);
    }
}

/// The database transaction of the request that owns its idempotency key, in
/// [transactional mode](crate::PostgresStore::transactional). See the
/// [module docs](crate::tx).
///
/// A request extension, and with the `axum` feature an extractor (also as `Option<Tx>`,
/// which is `None` for a request that passed through without a key). Cheap to clone;
/// every clone is the same transaction.
#[derive(Clone)]
pub struct Tx {
    slot: Arc<Slot>,
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx")
            .field("token", &self.slot.token)
            .finish_non_exhaustive()
    }
}

impl Tx {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        Tx { slot }
    }

    /// Waits for the transaction and returns a guard that dereferences to its
    /// [`PgConnection`]: `sqlx::query(..).execute(&mut *guard)`. Queries of one request
    /// run one at a time; drop the guard before the handler returns, because completing
    /// waits for it.
    ///
    /// # Errors
    ///
    /// [`TxError::Finished`] once the store committed or rolled the transaction back (a
    /// clone kept past the request).
    pub async fn lock(&self) -> Result<TxGuard, TxError> {
        let guard = self.slot.tx.clone().lock_owned().await;
        tokio::sync::OwnedMutexGuard::try_map(guard, |tx| tx.as_mut().map(|tx| &mut **tx))
            .map(|guard| TxGuard { guard })
            .map_err(|_| TxError::Finished)
    }

    /// The fencing token of the reservation this transaction holds.
    pub fn token(&self) -> FencingToken {
        self.slot.token
    }
}

/// The locked transaction of a [`Tx`]: dereferences to its [`PgConnection`].
pub struct TxGuard {
    guard: OwnedMappedMutexGuard<Option<OwnedTx>, PgConnection>,
}

impl fmt::Debug for TxGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxGuard").finish_non_exhaustive()
    }
}

impl Deref for TxGuard {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.guard
    }
}

impl DerefMut for TxGuard {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.guard
    }
}

/// Why a [`Tx`] cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// The store already committed or rolled back the transaction: the request it
    /// belonged to is over.
    #[error("the idempotency transaction is finished (committed or rolled back)")]
    Finished,
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;
    use http::StatusCode;

    use super::Tx;

    /// The rejection of the [`Tx`] extractor: the request has no idempotency transaction.
    /// A 500, since it is a wiring mistake, not the client's.
    #[derive(Debug, Clone, Copy)]
    #[non_exhaustive]
    pub struct MissingTx;

    impl std::fmt::Display for MissingTx {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(
                "no idempotency transaction for this request: the route needs an \
                 IdempotencyLayer on a transactional PostgresStore, and the request an \
                 Idempotency-Key (use Option<Tx> where the key is optional)",
            )
        }
    }

    impl std::error::Error for MissingTx {}

    impl IntoResponse for MissingTx {
        fn into_response(self) -> Response {
            tracing::error!("{self}");
            (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Tx {
        type Rejection = MissingTx;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, MissingTx> {
            parts.extensions.get::<Tx>().cloned().ok_or(MissingTx)
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for Tx {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Tx>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extract::MissingTx;
