//! [`PostgresStore`]: the [`Store`] on Postgres, one statement per operation.
//!
//! # Data model
//!
//! One row per scope in the store's table (see [`migrate`](PostgresStore::migrate) and
//! `sql/schema.sql`):
//!
//! | column | value |
//! | --- | --- |
//! | `scope` | the 32-byte [`ScopeHash`] (primary key): never the raw key or tenant |
//! | `fingerprint` | the 32-byte [`Fingerprint`] of the request |
//! | `state` | `pending` (a lease) or `completed` |
//! | `token` | the 16 bytes of the owner's [`FencingToken`] |
//! | `record` | the completed [`Record`], as [`Record::encode`] writes it (never parsed in SQL) |
//! | `expires_at` | end of the lease or of the TTL, by the database clock |
//! | `waiter` | a reserve answered "in flight" for this lease: notify on completion |
//!
//! A row past its `expires_at` counts as absent: every statement compares with the
//! database's `statement_timestamp()`, never with the application servers' clocks, and
//! a reserve takes an expired row over. [`purge`](PostgresStore::purge) deletes expired
//! rows in bounded batches (or [`spawn_purge`](PostgresStore::spawn_purge) on a
//! schedule); they cost disk, never correctness.
//!
//! # Plain mode
//!
//! The default: the Redis store's semantics. A reserve is one `INSERT ... ON CONFLICT`,
//! the pending row holds a lease renewed by the layer, and complete and release compare
//! the fencing token. A reserve sent again with the token that holds the lease (a
//! reserve that timed out here but ran in the database) answers "reserved".
//!
//! # Transactional mode
//!
//! [`transactional`](PostgresStore::transactional): the reservation `INSERT` runs in a
//! transaction that the handler receives ([`Tx`]) and that the record commits
//! in. See the [crate docs](crate#transactional-mode).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgPool, Row};
use tower_idempotency_core::local::LocalTier;
use tower_idempotency_core::policy::MAX_TTL;
use tower_idempotency_core::{
    Completion, FencingToken, Fingerprint, KeyState, LeaseTerms, Record, Reservation, Resolved,
    ScopeHash, Store, StoreError,
};

use crate::check::CheckReport;
use crate::error::{within, DisplayChain, PostgresStoreError};
use crate::round_trip::{Counters, Op, RoundTrips};
use crate::sql::{PreRead, Statements, NOT_RESERVED, NO_SUCH_STATEMENT, UNIQUE_VIOLATION};
use crate::subscriber::{Hub, PgSubscription};
use crate::tx::{end_failed, OwnedTx, Registry, Slot, Tx};

/// SQLSTATE `lock_not_available`: the lock timeout passed while the reserving `INSERT`
/// waited on another transaction's uncommitted row for the same scope.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A store call's future on the heap (see [`within`]): the layer's future then holds a
/// pointer, not the kilobytes of sqlx's state.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// SQLSTATEs of a server that refuses the `DO` block that prepares transactional mode's
/// statements (see `crate::prepared`): no privilege on plpgsql, no plpgsql, no `DO`.
const INSUFFICIENT_PRIVILEGE: &str = "42501";
const UNDEFINED_OBJECT: &str = "42704";
const FEATURE_NOT_SUPPORTED: &str = "0A000";

/// How often a reserve runs its statement when a concurrent reserve of the same scope
/// committed between its snapshot and its insert (see [`crate::sql`]).
const RESERVE_ATTEMPTS: usize = 4;

/// How a transactional reservation bounds a frozen owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IdleLimit {
    /// `idle_in_transaction_session_timeout` = the policy's lease.
    Lease,
    /// A fixed timeout.
    Fixed(Duration),
    /// None (the server's setting applies).
    Off,
}

/// A [`Store`] on Postgres through a [`sqlx`] pool: plain (leases, as on Redis) or
/// [transactional](PostgresStore::transactional) (the record commits with the handler's
/// own writes).
///
/// Cheap to clone: clones share the pool, the counters, the listener connection and, in
/// transactional mode, the open transactions of owned scopes.
///
/// See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
    pub(crate) sql: Arc<Statements>,
    pub(crate) channel: Arc<str>,
    pub(crate) timeout: Duration,
    pub(crate) transactional: bool,
    pub(crate) lock_timeout: Duration,
    pub(crate) idle_limit: IdleLimit,
    /// A request's first statement (the plain reserve, transactional mode's pre-read)
    /// takes its connection through the pool's checks
    /// ([`pool_acquire_checks`](PostgresStore::pool_acquire_checks)).
    pub(crate) pool_checks: bool,
    /// Transactional mode reserves a new key without the pre-read
    /// ([`reserve_first`](PostgresStore::reserve_first)).
    pub(crate) reserve_first: bool,
    /// Why the last [`table`](PostgresStore::table) or
    /// [`channel`](PostgresStore::channel) name was refused, reported at `init`.
    pub(crate) invalid_table: Option<Arc<PostgresStoreError>>,
    pub(crate) invalid_channel: Option<Arc<PostgresStoreError>>,
    /// The local replay tier; `None` when turned off. Keyed by scope hash alone, so it
    /// is shared only by clones on the same table.
    pub(crate) local: Option<Arc<LocalTier>>,
    pub(crate) shared: Arc<Shared>,
}

/// What transactional mode's pre-read found ([`PostgresStore::pre_read`]).
enum PreReadOutcome {
    /// The request's answer, in one statement: a replay, a mismatch, in flight.
    Answered(Reservation),
    /// No live row (or one this crate did not write): reserve on `conn`, whose session
    /// is the backend `pid`, with this `lock_timeout` of its own.
    Free {
        conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
        pid: i32,
        lock_timeout: String,
    },
}

/// What transactional mode's reserve sends first.
enum Start {
    /// The pre-read, on a connection of the pool (the default).
    PreRead,
    /// The batch that begins the transaction and reserves ([`PostgresStore::reserve_first`]).
    Batch,
    /// The pre-read, on this connection: the one a refused `reserve_first` batch ran on,
    /// its transaction ended.
    PreReadOn(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

/// State shared by every clone of a store.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    pub(crate) hub: Hub,
    pub(crate) registry: Arc<Registry>,
    pub(crate) report: OnceLock<CheckReport>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table.plain())
            .field("channel", &self.channel)
            .field("timeout", &self.timeout)
            .field("transactional", &self.transactional)
            .field("lock_timeout", &self.lock_timeout)
            .field("pool_acquire_checks", &self.pool_checks)
            .field("reserve_first", &self.reserve_first)
            .field("round_trips", &self.shared.counters.snapshot())
            .field("open_transactions", &self.shared.registry.len())
            .field("local_replays", &self.local)
            .field("listener", &self.shared.hub)
            .finish_non_exhaustive()
    }
}

/// A reserve's answer as the row says it.
fn answer(row: &PgRow) -> Result<Reservation, PostgresStoreError> {
    let state: String = row.try_get("state")?;
    let mine: bool = row.try_get("mine")?;
    let same: bool = row.try_get("same")?;
    match (state.as_str(), mine, same) {
        ("pending", true, _) => Ok(Reservation::Reserved),
        ("pending", false, true) => Ok(Reservation::InFlight),
        (_, _, false) => Ok(Reservation::Mismatch),
        ("uncertain", _, true) => Ok(Reservation::Uncertain),
        ("completed", _, true) => {
            let blob: Option<Vec<u8>> = row.try_get("record")?;
            let blob = blob.ok_or_else(|| {
                PostgresStoreError::UnexpectedRow("a completed row without a record".into())
            })?;
            Ok(Reservation::Completed(Record::decode(&Bytes::from(blob))?))
        }
        (other, _, _) => Err(PostgresStoreError::UnexpectedRow(format!(
            "unknown state {other:?}"
        ))),
    }
}

/// SQLSTATE `serialization_failure` and `deadlock_detected`: a single statement that ran
/// in a transaction of its own at the server's default isolation (REPEATABLE READ or
/// SERIALIZABLE on some servers) lost a race; running it again is always safe, since each
/// of plain mode's statements decides from the row it finds.
const RETRY_STATES: [&str; 2] = ["40001", "40P01"];

/// Milliseconds for a bind parameter: at most [`MAX_TTL`], so that `now() + $n` stays
/// within Postgres's range whatever duration reaches the store.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_TTL).as_millis()).unwrap_or(i64::MAX)
}

/// The largest value Postgres accepts for a duration setting such as `lock_timeout` or
/// `idle_in_transaction_session_timeout`: 2^31 - 1 ms, about 24.8 days.
const MAX_SETTING_MS: u128 = i32::MAX as u128;

/// A duration setting for `SET LOCAL`, in ms, clamped to what Postgres accepts. `0` means
/// "no limit" to Postgres; callers decide whether a zero duration may mean that.
fn setting(d: Duration) -> String {
    format!("'{}ms'", d.as_millis().min(MAX_SETTING_MS))
}

/// Whether `err` ended the owner's session, and with it its transaction (the connection
/// is gone, or the server sent a fatal error: terminated, idle-in-transaction timeout,
/// shut down). Any other error leaves the transaction holding its row.
fn session_ended(err: &PostgresStoreError) -> bool {
    let PostgresStoreError::Sqlx(err) = err else {
        return false;
    };
    match err {
        sqlx::Error::Database(db) => {
            let fatal = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    matches!(
                        pg.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                });
            let code = db.code().unwrap_or_default();
            fatal || code.starts_with("08") || code.starts_with("57P") || code == "25P03"
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Runs one of plain mode's statements, again when the server's default isolation made
/// it fail with a serialization failure or a deadlock (see [`RETRY_STATES`]).
async fn at_read_committed<T, F, Fut>(mut run: F) -> Result<T, PostgresStoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PostgresStoreError>>,
{
    let mut attempt = 1;
    loop {
        match run().await {
            Err(err)
                if attempt < RESERVE_ATTEMPTS
                    && err
                        .sqlstate()
                        .is_some_and(|code| RETRY_STATES.contains(&code.as_str())) =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl PostgresStore {
    /// Keeps a completed record read from the table in the local replay tier, if on:
    /// `sent` is when the statement went out, `ttl_ms` the row's remaining life then.
    fn keep_local(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        record: &Record,
        sent: tokio::time::Instant,
        ttl_ms: Option<i64>,
    ) {
        if let (Some(local), Some(ttl)) = (&self.local, ttl_ms) {
            let ttl = Duration::from_millis(u64::try_from(ttl).unwrap_or(0));
            local.keep(scope, fingerprint, record, sent, ttl);
        }
    }

    /// Drops what the local replay tier keeps for `scope`.
    fn forget_local(&self, scope: &ScopeHash) {
        if let Some(local) = &self.local {
            local.forget(scope);
        }
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table, as configured (e.g. `app.idempotency`).
    pub fn table_name(&self) -> &str {
        self.sql.table.plain()
    }

    /// The `LISTEN`/`NOTIFY` channel of wake-ups.
    pub fn channel_name(&self) -> &str {
        &self.channel
    }

    /// Whether the store runs in [transactional mode](Self::transactional).
    pub fn is_transactional(&self) -> bool {
        self.transactional
    }

    /// The statements this store (and its clones) sent so far, per operation.
    pub fn round_trips(&self) -> RoundTrips {
        self.shared.counters.snapshot()
    }

    /// How many reservations hold an open transaction now (transactional mode).
    pub fn open_transactions(&self) -> usize {
        self.shared.registry.len()
    }

    fn count(&self, op: Op) {
        self.shared.counters.count(op);
    }

    fn start_listener(&self) {
        self.shared.hub.start(
            &self.pool,
            &self.channel,
            &self.shared.registry,
            self.timeout,
        );
    }

    /// Runs the reserving statement on `conn`, once more while a concurrent reserve's
    /// commit hides the row from its snapshot (see [`crate::sql`]), or while the server's
    /// default isolation turns that race into a serialization failure (plain mode's
    /// statement is a transaction of its own). In a transaction (`in_tx`) it starts with
    /// the statement that locks no existing row, and takes an expired row over with the
    /// locking one; a reservation there comes with the owner's backend.
    #[allow(clippy::too_many_arguments)] // one reserve's inputs, passed straight through
    async fn run_reserve(
        &self,
        conn: &mut sqlx::PgConnection,
        in_tx: bool,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> Result<Reservation, PostgresStoreError> {
        let mut locking = !in_tx;
        // A lapsed lease kept as uncertain: plain mode only (a transactional owner's
        // work rolls back with it).
        let keep = match lease.keep_lapsed {
            Some(keep) if !in_tx => millis(keep),
            _ => 0,
        };
        let lock_key = in_tx.then(|| self.sql.lock_key(scope));
        let token_lock = in_tx.then(|| self.sql.token_lock(token));
        for _ in 0..RESERVE_ATTEMPTS {
            self.count(Op::Reserve);
            let sql = if locking {
                &self.sql.reserve
            } else {
                &self.sql.reserve_tx
            };
            let query = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(scope.as_bytes().as_slice())
                .bind(fingerprint.as_bytes().as_slice())
                .bind(token.to_bytes().as_slice())
                .bind(millis(lease.duration))
                .bind(lock_key)
                .bind(keep)
                .bind(token_lock);
            let sent = tokio::time::Instant::now();
            match within(self.timeout, query.fetch_optional(&mut *conn)).await {
                Ok(Some(row)) if !locking && row.try_get::<bool, _>("expired")? => locking = true,
                Ok(Some(row)) => {
                    let answer = answer(&row)?;
                    if let Reservation::Completed(record) = &answer {
                        self.keep_local(scope, fingerprint, record, sent, row.try_get("ttl_ms")?);
                    }
                    return Ok(answer);
                }
                // The insert waited for a concurrent reserve that committed, and the
                // statement's snapshot predates that row: run it again.
                Ok(None) => {}
                Err(err)
                    if !in_tx
                        && err
                            .sqlstate()
                            .is_some_and(|code| RETRY_STATES.contains(&code.as_str())) => {}
                Err(err) => return Err(err),
            }
        }
        Err(PostgresStoreError::UnexpectedRow(
            "the scope's row kept changing under the reserve".into(),
        ))
    }

    async fn reserve_plain(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> Result<Reservation, PostgresStoreError> {
        let (mut conn, tested) = self.first_connection().await?;
        match self
            .run_reserve(&mut conn, false, scope, fingerprint, token, lease)
            .await
        {
            // The connection died while idle. The reserve may have run before it went: sent
            // again with the same token, it answers what the first did (SPEC section 6, a
            // re-sent reserve).
            Err(err) if !tested && session_ended(&err) => {
                let mut conn = self.replace_dead(conn, &err).await?;
                self.run_reserve(&mut conn, false, scope, fingerprint, token, lease)
                    .await
            }
            answer => answer,
        }
    }

    /// The connection for a request's first statement (the plain reserve, transactional
    /// mode's pre-read), and whether the pool tested it. An idle connection as the pool
    /// holds it, without the pool's test (a ping, a round trip of its own before every
    /// request: a third of a transactional replay's): that first statement tests it, and
    /// when it fails because the connection died while idle (a restarted server, a proxy's
    /// idle cut), the caller sends it again on a connection the pool tested. Through
    /// `acquire()` when the pool has no idle connection (waiters keep their turn), and
    /// always with [`pool_acquire_checks`](PostgresStore::pool_acquire_checks).
    async fn first_connection(
        &self,
    ) -> Result<(sqlx::pool::PoolConnection<sqlx::Postgres>, bool), PostgresStoreError> {
        let idle = if self.pool_checks {
            None
        } else {
            self.pool.try_acquire()
        };
        match idle {
            Some(conn) => Ok((conn, false)),
            None => Ok((within(self.timeout, self.pool.acquire()).await?, true)),
        }
    }

    /// A connection the pool tested, in place of `dead`, an untested one from
    /// [`first_connection`](Self::first_connection) whose first statement failed with
    /// `err`, an error that ended its session: `dead` is closed, not given back.
    async fn replace_dead(
        &self,
        mut dead: sqlx::pool::PoolConnection<sqlx::Postgres>,
        err: &PostgresStoreError,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, PostgresStoreError> {
        tracing::debug!(error = %DisplayChain(err), "idle connection gone; sent again on a tested one");
        dead.close_on_drop();
        drop(dead);
        within(self.timeout, self.pool.acquire()).await
    }

    /// Reserves in a transaction of its own, kept if it reserved. "In flight" only when a
    /// live reservation holds the scope: an `INSERT` that waited past the lock timeout on
    /// something else (a purge deleting the scope's expired row, DDL, `LOCK TABLE`) is
    /// tried again, up to the store's timeout, then fails (503, never 409 for a key that
    /// nobody holds).
    ///
    /// The common paths in as few statements as the hand-written pattern: a replay (or a
    /// 422, or a 409 for a key in flight) is one statement outside any transaction, the
    /// pre-read; a new key is the pre-read and one batch that begins the transaction and
    /// reserves (see [`Statements::reserve_batch`](crate::sql::Statements)). A key taken
    /// since the pre-read fails the batch's probe: in flight, after its `ROLLBACK`.
    /// Whatever else the batch did not settle (a key completed since the pre-read, an
    /// expired row, a lock timeout) goes the long way, with the statements that return the
    /// row.
    ///
    /// With [`reserve_first`](PostgresStore::reserve_first) the batch goes first
    /// ([`Start::Batch`]); when it finds a row or a held scope, the request starts over
    /// with the pre-read on the same connection ([`Start::PreReadOn`]), which reads a
    /// completed row without locking it: the long way's `DO UPDATE` would lock it, and
    /// concurrent retries of one key would queue on it.
    async fn reserve_in_transaction(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
        start: Start,
    ) -> Result<Reservation, PostgresStoreError> {
        if self.shared.registry.get(scope, token).is_some() {
            // A re-sent reserve: this token's transaction holds the scope.
            return Ok(Reservation::Reserved);
        }
        let started = tokio::time::Instant::now();
        let prepared = &self.sql.prepared;
        let (read_first, (mut conn, mut tested)) = match start {
            Start::PreRead => (true, self.first_connection().await?),
            Start::Batch => (false, self.first_connection().await?),
            // It has just answered the `ROLLBACK`: alive.
            Start::PreReadOn(conn) => (true, (conn, true)),
        };
        // Without the pre-read (`reserve_first`, while the server prepares statements):
        // the batch is the first statement, for a session this store does not know.
        let session = if !read_first && prepared.enabled() {
            None
        } else {
            match self.pre_read(conn, tested, scope, fingerprint).await? {
                PreReadOutcome::Answered(reservation) => return Ok(reservation),
                PreReadOutcome::Free {
                    conn: read_on,
                    pid,
                    lock_timeout,
                } => {
                    // The pre-read's success says the session is alive.
                    (conn, tested) = (read_on, true);
                    Some((pid, lock_timeout))
                }
            }
        };
        // A new key, most likely: begin and reserve in one round trip (preparing the
        // statements first on a session not known to hold them; see `crate::prepared`).
        // The long way when the server refused to prepare them.
        if !prepared.enabled() {
            drop(conn);
            return self
                .reserve_the_long_way(scope, fingerprint, token, lease, started, None, None)
                .await;
        }
        let pid = session.as_ref().map(|(pid, _)| *pid);
        let session_lock_timeout = session
            .as_ref()
            .map(|(_, lock_timeout)| lock_timeout.as_str());
        let lock_timeout = self.lock_timeout_setting();
        let idle = self.idle_setting(lease);
        // A session whose statements are not known is sent none: its first batch fails
        // (26000) and goes again with the `PREPARE`.
        let (mut prepare, mut failed) = (pid.is_some_and(|pid| !prepared.has(pid)), false);
        let (conn, err) = loop {
            let batch = self.sql.reserve_batch(
                failed,
                prepare,
                scope,
                fingerprint,
                token,
                millis(lease.duration),
                &lock_timeout,
                session_lock_timeout,
                idle.as_deref(),
            );
            self.count(Op::Reserve);
            let (back, err) = match OwnedTx::begin(conn, AssertSqlSafe(batch), self.timeout).await {
                Ok(tx) => {
                    if let (true, Some(pid)) = (prepare, pid) {
                        prepared.insert(pid);
                    }
                    self.keep_reservation(scope, token, tx);
                    return Ok(Reservation::Reserved);
                }
                Err((None, err)) => return Err(err),
                Err((Some(back), err)) => (back, err),
            };
            // Without a pre-read the batch is what finds an idle connection dead (as the
            // pre-read does otherwise): sent again on a tested one. Its transaction ended
            // with its session, so nothing of it stays.
            if !tested && session_ended(&err) {
                conn = self.replace_dead(back, &err).await?;
                (tested, prepare, failed) = (true, false, false);
                continue;
            }
            tested = true;
            match err.sqlstate().as_deref() {
                // The session lost the statements (a new session under a reused process
                // id, or they were deallocated): once more, preparing them, after the
                // failed transaction.
                Some(NO_SUCH_STATEMENT) if !prepare => {
                    if let Some(pid) = pid {
                        prepared.remove(pid);
                    }
                    (prepare, failed) = (true, true);
                    conn = back;
                }
                // Not reserved (an owner holds the scope: 1 / 0; a row is there: the
                // primary key refuses the insert): the `EXECUTE` ran, so the statement is
                // prepared (a rollback does not undo a `PREPARE`). A lock wait may have
                // ended the prepare itself (parsing the insert takes the table's lock):
                // this session is not counted as prepared, and its next batch prepares it.
                Some(NOT_RESERVED | UNIQUE_VIOLATION) => {
                    if let (true, Some(pid)) = (prepare, pid) {
                        prepared.insert(pid);
                    }
                    break (back, err);
                }
                Some(LOCK_NOT_AVAILABLE) => break (back, err),
                // The server refuses the prepare itself (no `USAGE` on plpgsql for this
                // role, no plpgsql at all): this store reserves with plain statements from
                // now on, the long way. Any other error is the request's, not the server's
                // for good (a missing table, a timeout): answered as before.
                Some(
                    state @ (INSUFFICIENT_PRIVILEGE | UNDEFINED_OBJECT | FEATURE_NOT_SUPPORTED),
                ) if prepare => {
                    tracing::warn!(
                        error = %DisplayChain(&err),
                        sqlstate = state,
                        "cannot prepare the reserve statement on this server; reserving \
                         with plain statements from now on (one round trip more per new key)"
                    );
                    prepared.disable();
                    break (back, err);
                }
                _ => break (back, err),
            }
        };
        match err.sqlstate().as_deref() {
            // Without a pre-read: a row is there (most likely a retry of a completed key), or
            // the scope's advisory lock is held, which another retry's batch also takes
            // for the moment before its insert fails on the row. Read the key as the
            // pre-read does, after the failed transaction: a completed row is a replay,
            // not locked and never 409, and only an owner without a row is in flight.
            // On the same connection: given back to the pool between the two, it could
            // go to a request queued for one, and this replay would queue behind it.
            Some(NOT_RESERVED | UNIQUE_VIOLATION) if session.is_none() => {
                let start = match self.end_failed_reserve(conn).await {
                    Some(conn) => Start::PreReadOn(conn),
                    None => Start::PreRead,
                };
                return Box::pin(self.reserve_in_transaction(
                    scope,
                    fingerprint,
                    token,
                    lease,
                    start,
                ))
                .await;
            }
            // An owner took the scope since the pre-read (the reserve's probe of its
            // advisory lock): in flight, as the long way would answer, once the failed
            // transaction ends.
            Some(NOT_RESERVED) => {
                self.end_failed_reserve(conn).await;
                return Ok(Reservation::InFlight);
            }
            // A row is there (or a session that does not keep its prepared statements, as
            // behind a transaction-mode connection pooler, or a server that refused to
            // prepare them): the long way, on the same connection (its first statement
            // ends the failed transaction).
            Some(UNIQUE_VIOLATION | NO_SUCH_STATEMENT) => {}
            _ if prepare && !prepared.enabled() => {}
            Some(LOCK_NOT_AVAILABLE) => {
                self.end_failed_reserve(conn).await;
                if self.held(scope).await? {
                    return Ok(Reservation::InFlight);
                }
                return self
                    .reserve_the_long_way(
                        scope,
                        fingerprint,
                        token,
                        lease,
                        started,
                        None,
                        Some(err),
                    )
                    .await;
            }
            _ => {
                if !session_ended(&err) {
                    self.end_failed_reserve(conn).await;
                }
                return Err(err);
            }
        }
        self.reserve_the_long_way(
            scope,
            fingerprint,
            token,
            lease,
            started,
            Some(conn),
            Some(err),
        )
        .await
    }

    /// Transactional mode's pre-read of `scope` on `conn` (untested if `tested` is false),
    /// outside any transaction: the answer when it is one (a replay, 422, in flight),
    /// otherwise what the reserve batch needs of the session.
    async fn pre_read(
        &self,
        mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
        tested: bool,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
    ) -> Result<PreReadOutcome, PostgresStoreError> {
        let lock_key = self.sql.lock_key(scope);
        let preread = || {
            sqlx::query(AssertSqlSafe(self.sql.preread.clone()))
                .bind(scope.as_bytes().as_slice())
                .bind(lock_key)
        };
        // The pre-read has no effect: when its untested connection turns out to have died
        // while idle, it goes again on one the pool tested.
        self.count(Op::Reserve);
        let mut sent = tokio::time::Instant::now();
        let row = match within(self.timeout, preread().fetch_one(&mut *conn)).await {
            Ok(row) => row,
            Err(err) if !tested && session_ended(&err) => {
                conn = self.replace_dead(conn, &err).await?;
                self.count(Op::Reserve);
                sent = tokio::time::Instant::now();
                within(self.timeout, preread().fetch_one(&mut *conn)).await?
            }
            Err(err) => return Err(err),
        };
        match PreRead::parse(row.try_get("found")?) {
            PreRead::Row(Some(found)) => {
                drop(conn);
                if found.fingerprint != *fingerprint.as_bytes() {
                    return Ok(PreReadOutcome::Answered(Reservation::Mismatch));
                }
                let record = Record::decode(&found.record)?;
                self.keep_local(scope, fingerprint, &record, sent, Some(found.ttl_ms));
                Ok(PreReadOutcome::Answered(Reservation::Completed(record)))
            }
            PreRead::Held => Ok(PreReadOutcome::Answered(Reservation::InFlight)),
            // A row too short to be this crate's: the batch fails on it (the primary key),
            // and the long way reads it and says what it is.
            PreRead::Row(None) | PreRead::Free => Ok(PreReadOutcome::Free {
                pid: row.try_get("pid")?,
                lock_timeout: row.try_get("lock_timeout")?,
                conn,
            }),
        }
    }

    /// Ends the failed transaction a reserve batch left on `conn` (its `ROLLBACK` is a
    /// round trip of the reserve, counted as one). The connection, idle again, unless the
    /// `ROLLBACK` failed (it is then closed); dropping it gives it back to the pool.
    async fn end_failed_reserve(
        &self,
        conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    ) -> Option<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.count(Op::Reserve);
        end_failed(conn, self.timeout).await
    }

    /// The reserve that returns the row, looping while the reserving insert waits past
    /// the lock timeout on a lock that is not a reservation's. `conn`, if any, is the
    /// connection of a failed batch (its transaction still to end); `blocked` the error
    /// that sent us here, if any.
    #[allow(clippy::too_many_arguments)] // one reserve's inputs, passed straight through
    async fn reserve_the_long_way(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
        started: tokio::time::Instant,
        mut conn: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
        mut blocked: Option<PostgresStoreError>,
    ) -> Result<Reservation, PostgresStoreError> {
        loop {
            let lock_wait = blocked
                .take()
                .filter(|err| err.sqlstate().as_deref() == Some(LOCK_NOT_AVAILABLE));
            if let (None, Some(blocked)) = (&conn, lock_wait) {
                let waited = started.elapsed();
                if waited >= self.timeout {
                    return Err(PostgresStoreError::Locked {
                        what: "reserve",
                        waited,
                        source: Box::new(blocked),
                    });
                }
                tracing::debug!(
                    waited = ?waited,
                    "the reserving insert waited past the lock timeout on a lock that is not a \
                     reservation (a purge, DDL); trying again"
                );
            }
            blocked = match self
                .try_reserve_in_transaction(scope, fingerprint, token, lease, conn.take())
                .await
            {
                Err(err) if err.sqlstate().as_deref() == Some(LOCK_NOT_AVAILABLE) => Some(err),
                other => return other,
            };
            if self.held(scope).await? {
                return Ok(Reservation::InFlight);
            }
        }
    }

    /// Whether a transactional owner holds `scope` now (its advisory lock), asked on a
    /// connection of the pool.
    async fn held(&self, scope: &ScopeHash) -> Result<bool, PostgresStoreError> {
        self.count(Op::Reserve);
        let query = sqlx::query_scalar(crate::sql::HELD).bind(self.sql.lock_key(scope));
        within(self.timeout, query.fetch_one(&self.pool)).await
    }

    /// `lock_timeout` for the reserving transaction: at least 1 ms (to Postgres 0 would
    /// mean "wait for ever"), and at most half the store's timeout, so that a lock wait
    /// always ends in the server before the store stops waiting for its answer (a statement
    /// the store gave up on would go on there, and could reserve the key after the caller
    /// was told to retry).
    fn lock_timeout_setting(&self) -> String {
        setting(
            self.lock_timeout
                .min(self.timeout / 2)
                .max(Duration::from_millis(1)),
        )
    }

    /// `idle_in_transaction_session_timeout` for the reserving transaction, if any.
    fn idle_setting(&self, lease: LeaseTerms) -> Option<String> {
        match self.idle_limit {
            IdleLimit::Lease => Some(setting(lease.duration)),
            IdleLimit::Fixed(d) => Some(setting(d)),
            IdleLimit::Off => None,
        }
    }

    /// Keeps the transaction that reserved `scope` for `token`, for the handler and the
    /// completion.
    fn keep_reservation(&self, scope: &ScopeHash, token: FencingToken, tx: OwnedTx) {
        let slot = Slot::new(token, tx, self.sql.token_lock(token));
        self.shared.registry.insert(*scope, slot);
        // The owner's process listens, so a waiter elsewhere can ask for a notification
        // at commit (see the subscriber module).
        self.start_listener();
    }

    /// `BEGIN`, the reserving statement in it; the transaction is kept if it reserved.
    /// `failed`: the connection of a failed reserve batch, whose transaction the `BEGIN`
    /// batch ends first.
    async fn try_reserve_in_transaction(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
        failed: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    ) -> Result<Reservation, PostgresStoreError> {
        // One simple-query batch: BEGIN at READ COMMITTED (at REPEATABLE READ, a reserve
        // that waited on the owner's row would fail when the owner commits, instead of
        // reading its record); stash the session's lock_timeout (the reserve statement
        // restores it once it holds the row, so the handler's own queries are not bounded
        // by ours); bound the wait on another session's uncommitted row; bound a frozen
        // owner's idle transaction.
        let mut begin = String::new();
        if failed.is_some() {
            begin.push_str("ROLLBACK; ");
        }
        begin.push_str(
            "BEGIN ISOLATION LEVEL READ COMMITTED; \
             SELECT set_config('tower_idempotency.lock_timeout', current_setting('lock_timeout'), true); \
             SET LOCAL lock_timeout = ",
        );
        begin.push_str(&self.lock_timeout_setting());
        if let Some(idle) = self.idle_setting(lease) {
            begin.push_str("; SET LOCAL idle_in_transaction_session_timeout = ");
            begin.push_str(&idle);
        }
        let conn = match failed {
            Some(conn) => conn,
            None => within(self.timeout, self.pool.acquire()).await?,
        };
        self.count(Op::Reserve);
        let mut tx = match OwnedTx::begin(conn, AssertSqlSafe(begin), self.timeout).await {
            Ok(tx) => tx,
            Err((Some(conn), err)) => {
                if !session_ended(&err) {
                    self.end_failed_reserve(conn).await;
                }
                return Err(err);
            }
            Err((None, err)) => return Err(err),
        };
        let answer = self
            .run_reserve(&mut tx, true, scope, fingerprint, token, lease)
            .await;
        match answer {
            Ok(Reservation::Reserved) => {
                self.keep_reservation(scope, token, tx);
                Ok(Reservation::Reserved)
            }
            other => {
                // Nothing to keep: end the transaction now, so it holds no lock on the
                // scope's row (dropping it would roll back only at the connection's next use).
                self.count(Op::Reserve);
                if let Err(err) = within(self.timeout, tx.rollback()).await {
                    tracing::debug!(error = %DisplayChain(&err), "rollback after a reserve failed");
                }
                other
            }
        }
    }

    async fn complete_plain(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, PostgresStoreError> {
        let encoded = record.encode();
        let row = at_read_committed(|| {
            self.count(Op::Complete);
            let query = sqlx::query(AssertSqlSafe(self.sql.complete.clone()))
                .bind(scope.as_bytes().as_slice())
                .bind(token.to_bytes().as_slice())
                .bind(encoded.as_ref())
                .bind(millis(ttl))
                .bind(&*self.channel)
                .bind(false);
            within(self.timeout, query.fetch_optional(&self.pool))
        })
        .await?;
        Ok(if row.is_some() {
            Completion::Stored
        } else {
            Completion::Fenced
        })
    }

    /// Writes the record in the owner's transaction and commits. Never an error: whatever
    /// fails, the operation's outcome is "rolled back" (or unknown, when the connection
    /// broke during `COMMIT` — a retry with the key then replays or runs, either is right),
    /// and the caller must not get the handler's answer.
    async fn complete_in_transaction(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Completion {
        let Some(slot) = self.shared.registry.get(scope, token) else {
            // Completed before (a retried call), or never reserved here.
            return self.completed_before(scope, token).await;
        };
        // Unregistered once the commit is over (or this future is dropped), not before:
        // until then a renewal still answers that the owner holds the scope.
        let _unregister = self.shared.registry.unregister_on_drop(*scope, token);
        let guard = match tokio::time::timeout(self.timeout, slot.tx.clone().lock_owned()).await {
            Ok(guard) => guard,
            Err(_) => {
                tracing::error!(
                    timeout = ?self.timeout,
                    "the handler still holds its idempotency transaction (a Tx guard kept \
                     past the response?); it is rolled back when released"
                );
                return Completion::RolledBack;
            }
        };
        let mut guard = guard;
        let Some(mut tx) = guard.take() else {
            return Completion::RolledBack;
        };
        drop(guard);
        let notify = slot.waiter_seen.load(std::sync::atomic::Ordering::Relaxed);
        let record = record.encode();
        self.count(Op::Complete);
        let query = sqlx::query(AssertSqlSafe(self.sql.complete_tx.clone()))
            .bind(scope.as_bytes().as_slice())
            .bind(token.to_bytes().as_slice())
            .bind(record.as_ref())
            .bind(millis(ttl))
            .bind(&*self.channel)
            .bind(notify);
        match within(self.timeout, query.execute(&mut *tx)).await {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => {
                tracing::error!(
                    "the reservation row is gone from the idempotency transaction (did the \
                     handler COMMIT or ROLLBACK it with SQL?); rolling back"
                );
                self.rollback(tx).await;
                return Completion::RolledBack;
            }
            Err(err) => {
                // E.g. 25P02: a query of the handler failed and aborted the transaction.
                tracing::warn!(
                    error = %DisplayChain(&err),
                    sqlstate = err.sqlstate(),
                    "writing the idempotency record failed; the transaction is rolled back"
                );
                self.rollback(tx).await;
                return Completion::RolledBack;
            }
        }
        self.count(Op::Complete);
        match within(self.timeout, tx.commit()).await {
            Ok(()) => Completion::Stored,
            // The `COMMIT` went out and did not answer: the caller gets 503 either way, and
            // its retry replays what committed or runs what did not.
            Err(PostgresStoreError::Timeout(timeout)) => {
                tracing::warn!(
                    ?timeout,
                    "the COMMIT of the idempotency transaction did not answer in time: the \
                     operation may have committed (a retry replays it) or not (a retry runs it)"
                );
                Completion::RolledBack
            }
            Err(err) => {
                tracing::warn!(
                    error = %DisplayChain(&err),
                    sqlstate = err.sqlstate(),
                    "COMMIT of the idempotency transaction failed: the operation did not happen"
                );
                Completion::RolledBack
            }
        }
    }

    /// `Stored` if `token` completed `scope` already, else `RolledBack`.
    async fn completed_before(&self, scope: &ScopeHash, token: FencingToken) -> Completion {
        self.count(Op::Complete);
        let query = sqlx::query(AssertSqlSafe(self.sql.completed_by.clone()))
            .bind(scope.as_bytes().as_slice())
            .bind(token.to_bytes().as_slice());
        match within(self.timeout, query.fetch_optional(&self.pool)).await {
            Ok(Some(_)) => Completion::Stored,
            Ok(None) => Completion::RolledBack,
            Err(err) => {
                tracing::warn!(error = %DisplayChain(&err), "cannot tell whether the record was committed; answering rolled back (a retry replays it if it was)");
                Completion::RolledBack
            }
        }
    }

    async fn rollback(&self, tx: OwnedTx) {
        self.count(Op::Release);
        if let Err(err) = within(self.timeout, tx.rollback()).await {
            // The connection is broken or stuck: the server rolls back when it goes.
            tracing::debug!(error = %DisplayChain(&err), "ROLLBACK failed");
        }
    }

    async fn release_plain(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
    ) -> Result<bool, PostgresStoreError> {
        let row = at_read_committed(|| {
            self.count(Op::Release);
            let query = sqlx::query(AssertSqlSafe(self.sql.release.clone()))
                .bind(scope.as_bytes().as_slice())
                .bind(token.to_bytes().as_slice())
                .bind(&*self.channel);
            within(self.timeout, query.fetch_optional(&self.pool))
        })
        .await?;
        Ok(row.is_some())
    }

    /// `ROLLBACK` of the owner's transaction: the reservation and the handler's writes go.
    async fn release_in_transaction(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
    ) -> Result<bool, PostgresStoreError> {
        let Some(slot) = self.shared.registry.get(scope, token) else {
            return Ok(false);
        };
        let _unregister = self.shared.registry.unregister_on_drop(*scope, token);
        let mut guard = within(self.timeout, async {
            Ok::<_, PostgresStoreError>(slot.tx.clone().lock_owned().await)
        })
        .await?;
        let Some(tx) = guard.take() else {
            return Ok(false);
        };
        drop(guard);
        self.rollback(tx).await;
        if slot.waiter_seen.load(std::sync::atomic::Ordering::Relaxed) {
            // A NOTIFY in the rolled-back transaction is never delivered: send it now, so
            // a sleeping waiter retries at once (one of them becomes the owner).
            self.notify(&format!("c{}", scope.to_hex())).await;
        }
        Ok(true)
    }

    /// `pg_notify` on the store's channel, best effort.
    pub(crate) async fn notify(&self, payload: &str) {
        self.count(Op::Notify);
        let query = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&*self.channel)
            .bind(payload);
        if let Err(err) = within(self.timeout, query.execute(&self.pool)).await {
            tracing::debug!(error = %DisplayChain(&err), "pg_notify failed; waiters poll");
        }
    }

    async fn renew_plain(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, PostgresStoreError> {
        let done = at_read_committed(|| {
            self.count(Op::Renew);
            let query = sqlx::query(AssertSqlSafe(self.sql.renew.clone()))
                .bind(scope.as_bytes().as_slice())
                .bind(token.to_bytes().as_slice())
                .bind(millis(lease));
            within(self.timeout, query.execute(&self.pool))
        })
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Transactional mode's renewal: there is no lease to extend (the transaction holds
    /// the scope until it ends), but the owner's transaction must stay alive and its loss
    /// must be noticed. A statement on the transaction keeps Postgres from counting a live
    /// owner as idle (the idle limit then cuts only a frozen one) and fails if the session
    /// was ended. While the handler holds the transaction, the server is asked about it
    /// from another connection instead. `false`: the transaction is gone.
    async fn renew_in_transaction(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
    ) -> Result<bool, PostgresStoreError> {
        let Some(slot) = self.shared.registry.get(scope, token) else {
            return Ok(false);
        };
        self.count(Op::Renew);
        let Ok(mut guard) = slot.tx.clone().try_lock_owned() else {
            let query = sqlx::query_scalar(crate::sql::ALIVE).bind(slot.token_lock);
            return within(self.timeout, query.fetch_one(&self.pool)).await;
        };
        let Some(tx) = guard.as_mut() else {
            // Taken by the owner's complete or release, which unregisters the slot only
            // once its `COMMIT` or `ROLLBACK` is over: until then the transaction still
            // holds the row, and a renewal that came due meanwhile (a slow commit) must
            // not report a lost lease.
            return Ok(true);
        };
        match within(
            self.timeout,
            sqlx::query(crate::sql::KEEPALIVE).execute(&mut **tx),
        )
        .await
        {
            Ok(_) => Ok(true),
            Err(err) if session_ended(&err) => {
                tracing::debug!(error = %DisplayChain(&err), "the idempotency transaction's session ended");
                Ok(false)
            }
            // Timed out: unknown, the layer retries soon.
            Err(err @ PostgresStoreError::Timeout(_)) => Err(err),
            // E.g. 25P02, the handler's own query failed: the transaction still holds its
            // row (and will not commit); the key stays held until it ends.
            Err(_) => Ok(true),
        }
    }
}

/// Milliseconds from the database as a duration; `None` for NULL, 0 for a negative value.
fn ms(value: Option<i64>) -> Option<Duration> {
    value.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

impl PostgresStore {
    async fn inspect_row(&self, scope: &ScopeHash) -> Result<KeyState, PostgresStoreError> {
        self.count(Op::Admin);
        let query =
            sqlx::query(AssertSqlSafe(self.sql.inspect.clone())).bind(scope.as_bytes().as_slice());
        let Some(row) = within(self.timeout, query.fetch_optional(&self.pool)).await? else {
            return Ok(KeyState::Absent);
        };
        let state: String = row.try_get("state")?;
        let token: Vec<u8> = row.try_get("token")?;
        let token = <[u8; 16]>::try_from(token.as_slice())
            .ok()
            .map(FencingToken::from_bytes);
        let expires_in = ms(row.try_get("expires_ms")?).unwrap_or_default();
        let lease_ms: Option<i64> = row.try_get("lease_ms")?;
        match (state.as_str(), lease_ms) {
            ("completed", _) => {
                let blob: Option<Vec<u8>> = row.try_get("record")?;
                let blob = blob.ok_or_else(|| {
                    PostgresStoreError::UnexpectedRow("a completed row without a record".into())
                })?;
                Ok(KeyState::Completed {
                    record: Record::decode(&Bytes::from(blob))?,
                    age: ms(row.try_get("age_ms")?),
                    expires_in,
                })
            }
            ("pending", Some(lease)) if lease <= 0 => Ok(KeyState::Uncertain {
                owner: token.ok_or_else(|| {
                    PostgresStoreError::UnexpectedRow("a pending row without a token".into())
                })?,
                lapsed_for: ms(Some(-lease)),
                expires_in,
            }),
            ("pending", lease) => Ok(KeyState::InFlight {
                owner: token,
                lease_remaining: ms(lease).or(Some(expires_in)),
            }),
            (other, _) => Err(PostgresStoreError::UnexpectedRow(format!(
                "unknown state {other:?}"
            ))),
        }
    }
}

impl Store for PostgresStore {
    type Subscription = PgSubscription;

    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> Result<Reservation, StoreError> {
        if let Some(answer) = self
            .local
            .as_ref()
            .and_then(|l| l.answer(scope, fingerprint))
        {
            self.shared.counters.local_replay();
            return Ok(answer);
        }
        // Each call's future boxed (see `within`): kept inline, the kilobytes of sqlx's
        // state would be copied with the layer's future every time it moves.
        let call: BoxFuture<'_, _> = if self.transactional {
            let start = if self.reserve_first {
                Start::Batch
            } else {
                Start::PreRead
            };
            Box::pin(self.reserve_in_transaction(scope, fingerprint, token, lease, start))
        } else {
            Box::pin(self.reserve_plain(scope, fingerprint, token, lease))
        };
        Ok(call.await?)
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let call: BoxFuture<'_, _> = if self.transactional {
            Box::pin(self.renew_in_transaction(scope, token))
        } else {
            Box::pin(self.renew_plain(scope, token, lease))
        };
        Ok(call.await?)
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let call: BoxFuture<'_, _> = if self.transactional {
            Box::pin(async move {
                Ok(self
                    .complete_in_transaction(scope, token, record, ttl)
                    .await)
            })
        } else {
            Box::pin(self.complete_plain(scope, token, record, ttl))
        };
        Ok(call.await?)
    }

    fn owner_extensions(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        extensions: &mut http::Extensions,
    ) {
        if let Some(slot) = self.shared.registry.get(scope, token) {
            extensions.insert(Tx::new(slot));
        }
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        let call: BoxFuture<'_, _> = if self.transactional {
            Box::pin(self.release_in_transaction(scope, token))
        } else {
            Box::pin(self.release_plain(scope, token))
        };
        let released = call.await;
        Ok(released?)
    }

    /// Transactional mode: a key in flight is an uncommitted row, invisible here; its
    /// owner's advisory lock tells (without the owner or the lease left).
    async fn inspect(&self, scope: &ScopeHash) -> Result<KeyState, StoreError> {
        if self.transactional && self.held(scope).await? {
            return Ok(KeyState::InFlight {
                owner: None,
                lease_remaining: None,
            });
        }
        Ok(self.inspect_row(scope).await?)
    }

    /// Transactional mode: a key in flight cannot be forgotten (its row is not committed
    /// yet): `false`, as for an absent key.
    async fn forget(&self, scope: &ScopeHash) -> Result<bool, StoreError> {
        self.forget_local(scope);
        self.count(Op::Admin);
        let query = sqlx::query_scalar::<_, bool>(AssertSqlSafe(self.sql.forget.clone()))
            .bind(scope.as_bytes().as_slice())
            .bind(&*self.channel);
        let live = within(self.timeout, query.fetch_optional(&self.pool)).await;
        // Again: a replay here may have kept the row while it was being deleted.
        self.forget_local(scope);
        Ok(live?.unwrap_or(false))
    }

    async fn resolve(
        &self,
        scope: &ScopeHash,
        record: &Record,
        ttl: Duration,
    ) -> Result<Resolved, StoreError> {
        self.forget_local(scope);
        self.count(Op::Admin);
        let query = sqlx::query(AssertSqlSafe(self.sql.resolve.clone()))
            .bind(scope.as_bytes().as_slice())
            .bind(record.encode().as_ref())
            .bind(millis(ttl))
            .bind(&*self.channel);
        let resolved = within(self.timeout, query.fetch_optional(&self.pool)).await;
        // Again: a replay here may have kept the old record while it was being replaced.
        self.forget_local(scope);
        if resolved?.is_some() {
            return Ok(Resolved::Stored);
        }
        // Not resolvable: say why (a live lease, or nothing there).
        Ok(match self.inspect(scope).await? {
            KeyState::Absent => Resolved::Absent,
            _ => Resolved::InFlight,
        })
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<PgSubscription, StoreError> {
        self.start_listener();
        let subscription = match self.shared.hub.subscribe(*scope, self.timeout).await {
            Ok(subscription) => subscription,
            Err(err) => {
                tracing::debug!(error = %DisplayChain(&err), "idempotency subscribe failed");
                return Err(err.into());
            }
        };
        if self.transactional {
            // The owner's pending row is invisible here: tell its process we wait.
            self.notify(&format!("w{}", scope.to_hex())).await;
        }
        Ok(subscription)
    }
}
