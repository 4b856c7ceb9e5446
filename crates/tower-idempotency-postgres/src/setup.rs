//! Building a [`PostgresStore`] and starting it up: its settings, connecting, applying
//! the schema, checking the server. The operations are in [`store`](crate::store).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

use tower_idempotency_core::local::{LocalReplays, LocalTier};

use crate::check::{self, CheckReport};
use crate::error::{within, PostgresStoreError};
use crate::round_trip::Counters;
use crate::sql::{channel_name, Statements, TableName, DEFAULT_TABLE};
use crate::store::{IdleLimit, PostgresStore, Shared};
use crate::subscriber::Hub;

/// The default [`command_timeout`](PostgresStore::command_timeout) of each database call: 5 seconds.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The default [`lock_timeout`](PostgresStore::lock_timeout) of a transactional
/// reservation: 250 ms.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_millis(250);

/// The key of the advisory lock that serialises concurrent [`migrate`](PostgresStore::migrate)
/// calls (`CREATE TABLE IF NOT EXISTS` is not safe against itself).
const MIGRATE_LOCK: i64 = 0x7469_6465_6d5f_7067; // "tidem_pg"

/// The most [`migrate`](PostgresStore::migrate) waits for a lock (its advisory lock, or
/// the table's for `CREATE INDEX`), as the server's `lock_timeout`: while DDL waits for
/// the table, every new reservation queues behind it, so the wait must stay short.
pub const MIGRATE_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

impl PostgresStore {
    /// A store on the application's pool, plain mode, with the table [`DEFAULT_TABLE`]
    /// (`tower_idempotency`, in the connections' `search_path`), the timeout
    /// [`DEFAULT_COMMAND_TIMEOUT`] and the table name as its channel. Does no I/O: call
    /// [`migrate`](Self::migrate) to create the table and [`init`](Self::init) to check
    /// the server.
    #[must_use = "a store does nothing until a layer uses it"]
    pub fn new(pool: PgPool) -> Self {
        let table = match TableName::parse(DEFAULT_TABLE) {
            Ok(table) => table,
            // The constant is a valid name (a unit test says so).
            Err(err) => unreachable!("{err}"),
        };
        PostgresStore {
            pool,
            channel: Arc::from(table.plain()),
            sql: Arc::new(Statements::new(table)),
            timeout: DEFAULT_COMMAND_TIMEOUT,
            transactional: false,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            idle_limit: IdleLimit::Lease,
            pool_checks: false,
            reserve_first: false,
            invalid_table: None,
            invalid_channel: None,
            local: None,
            shared: Arc::new(Shared {
                counters: Counters::default(),
                hub: Hub::new(),
                registry: Arc::default(),
                report: OnceLock::new(),
            }),
        }
    }

    /// Connects a pool to `url` (`postgres://user@host/db`), creates the table if it is
    /// missing ([`migrate`](Self::migrate)), checks the server ([`init`](Self::init): its
    /// warnings are logged) and returns a plain store with default settings. For other
    /// settings, build with [`new`](Self::new).
    ///
    /// ```no_run
    /// # use tower_idempotency_postgres::PostgresStore;
    /// # async fn f() -> Result<(), tower_idempotency_postgres::PostgresStoreError> {
    /// let store = PostgresStore::connect("postgres://postgres@127.0.0.1/app").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, PostgresStoreError> {
        let pool = within(
            DEFAULT_COMMAND_TIMEOUT,
            PgPoolOptions::new()
                .acquire_timeout(DEFAULT_COMMAND_TIMEOUT)
                .connect(url),
        )
        .await?;
        let store = Self::new(pool);
        store.migrate().await?;
        store.init().await
    }

    /// The table: `name` or `schema.name`, each part a lowercase identifier
    /// (`[a-z_][a-z0-9_]*`), the whole at most 63 bytes; default [`DEFAULT_TABLE`]. Also
    /// sets the channel to the same name unless [`channel`](Self::channel) set one.
    ///
    /// Like every setter here it never panics: an invalid name is reported by
    /// [`migrate`](Self::migrate), [`init`](Self::init) and [`check`](Self::check)
    /// ([`PostgresStoreError::InvalidName`]); it never reaches SQL, and until it is fixed
    /// every operation fails (the store's statements then name a table that does not
    /// exist, so nothing is written anywhere).
    pub fn table(mut self, name: &str) -> Self {
        match TableName::parse(name) {
            Ok(table) => {
                if *self.channel == *self.sql.table.plain() {
                    self.channel = Arc::from(table.plain());
                }
                if table != self.sql.table {
                    // The tier is keyed by scope hash alone: shared with a store on
                    // another table, it would replay that table's records here.
                    self.local = self
                        .local
                        .map(|tier| Arc::new(LocalTier::new(tier.settings())));
                }
                self.sql = Arc::new(Statements::new(table));
                self.invalid_table = None;
            }
            Err(err) => {
                self.sql = Arc::new(Statements::new(TableName::unusable()));
                self.invalid_table = Some(Arc::new(err));
            }
        }
        self
    }

    /// The local replay tier: completed records this process read are kept in memory
    /// (bounded by bytes, each no longer than its row's remaining TTL nor than
    /// [`LocalReplays::max_age`]) and replayed with no statement at all, in either mode.
    /// Off by default (`Some(LocalReplays::default())`: 64 MiB, 60 s); `None` turns it
    /// off again.
    ///
    /// A completed record never changes until it expires, so replaying it from memory is
    /// exact, with one inconsistency, the reason it is opt-in here (SPEC section 11:
    /// `forget` lets the next request run): a row deleted by hand, or through
    /// [`forget`](tower_idempotency_core::Store::forget) on *another* process, may still
    /// be replayed by this one until its entry lapses (at most `max_age`); `forget` and
    /// `resolve` on this process drop its entry. The tier is the core's, the same as
    /// `RedisStore`'s ([`tower_idempotency_core::local`]). A store given another
    /// [`table`](Self::table) gets a tier of its own.
    ///
    /// ```
    /// # use tower_idempotency_postgres::{LocalReplays, PostgresStore};
    /// # fn f(pool: tower_idempotency_postgres::sqlx::PgPool) {
    /// let store = PostgresStore::new(pool)
    ///     .local_replays(Some(LocalReplays::default().max_bytes(16 << 20)));
    /// # }
    /// ```
    pub fn local_replays(mut self, settings: Option<LocalReplays>) -> Self {
        self.local = settings.map(|settings| Arc::new(LocalTier::new(settings)));
        self
    }

    /// The bytes the local replay tier holds now, as counted against its bound (0 when
    /// it is off).
    pub fn local_replay_bytes(&self) -> u64 {
        self.local.as_ref().map_or(0, |tier| tier.bytes())
    }

    /// The `LISTEN`/`NOTIFY` channel of wake-ups; default: the table name. Every process
    /// sharing the table must use the same one. One or two dot-separated lowercase
    /// identifiers of at most 63 bytes; an invalid name is reported by
    /// [`init`](Self::init) and [`check`](Self::check) (waiters then poll), never a panic.
    pub fn channel(mut self, name: &str) -> Self {
        self.invalid_channel = channel_name(name).err().map(Arc::new);
        self.channel = Arc::from(name);
        self
    }

    /// The first setting a setter could not accept, if any.
    pub(crate) fn invalid_setting(&self) -> Result<(), PostgresStoreError> {
        match self
            .invalid_table
            .as_deref()
            .or(self.invalid_channel.as_deref())
        {
            Some(PostgresStoreError::InvalidName { what, name, why }) => {
                Err(PostgresStoreError::InvalidName {
                    what,
                    name: name.clone(),
                    why,
                })
            }
            _ => Ok(()),
        }
    }

    /// How long one database call may take (acquiring a connection included) before it
    /// fails with [`PostgresStoreError::Timeout`] (for the layer a backend error: 503, or
    /// a pass-through under a fail-open policy): default [`DEFAULT_COMMAND_TIMEOUT`] (5 s),
    /// the same name and meaning as the Redis store's. Keep
    /// it below the pool's own `acquire_timeout` (sqlx's default is 30 s).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Transactional mode: each reservation is the `INSERT` of the pending row in a
    /// transaction the handler receives as a [`Tx`](crate::Tx), and completing writes the
    /// record in it and `COMMIT`s before the response is sent. A release is a `ROLLBACK`.
    /// See the [crate docs](crate#transactional-mode) for what it guarantees and costs.
    pub fn transactional(mut self) -> Self {
        self.transactional = true;
        self
    }

    /// In transactional mode, how long a reservation waits on another session's
    /// uncommitted row for the same key: `SET LOCAL lock_timeout` on the reserving
    /// transaction, restored for the handler's own queries once the row is held. Default
    /// [`DEFAULT_LOCK_TIMEOUT`] (250 ms): short, because the waiting reservation holds a
    /// pool connection.
    ///
    /// A live reservation is found without waiting (its owner holds the scope's advisory
    /// lock): the wait is for the rare rest — an owner caught between its insert and its
    /// lock, or a lock that is not a reservation (a purge deleting the key's expired row,
    /// DDL on the table). After it, the reservation is "in flight" only if an owner holds
    /// the key; otherwise it is tried again, up to the store's [`command_timeout`](Self::command_timeout),
    /// and then fails ([`PostgresStoreError::Locked`]: 503, never 409 for a key that nobody
    /// holds). `Duration::ZERO` waits 1 ms (to Postgres, 0 would mean "for ever"); a value
    /// above half the [`command_timeout`](Self::command_timeout) is that half, so that a
    /// wait always ends in the server before the store stops waiting for its answer.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// In transactional mode, the most a reserving transaction may sit idle before
    /// Postgres ends its session and rolls it back: `SET LOCAL
    /// idle_in_transaction_session_timeout`. The safety net for a frozen owner (a process
    /// stopped, not dead), which otherwise holds its key and a connection until its
    /// connection dies. Default: the layer's lease (30 s unless the policy says otherwise).
    ///
    /// A live owner is not idle: each lease renewal (every third of the lease) is a
    /// statement on its transaction, so a handler that waits longer than the lease on
    /// another service keeps its transaction — unless it holds the transaction's
    /// [`TxGuard`](crate::TxGuard) meanwhile (the renewal cannot use the connection then):
    /// lock [`Tx`](crate::Tx) per query, not across a slow call. A limit below the
    /// renewal interval cuts live owners too (a renewal then reports the lost lease, and
    /// the caller gets 503).
    ///
    /// `Duration::ZERO` means what 0 means to Postgres: no limit. Values above Postgres's
    /// limit (2^31 - 1 ms, ~24.8 days) are clamped to it; so is a lease that long when the
    /// limit derives from it.
    pub fn idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_limit = IdleLimit::Fixed(timeout);
        self
    }

    /// Whether each request's first statement (the reserve; in transactional mode the
    /// pre-read) takes its connection through the pool's `acquire()`, with the pool's own
    /// checks: the `test_before_acquire` ping, a round trip per request (on by default in
    /// sqlx), the `before_acquire` hook, the `max_lifetime` check. Default `false`: it
    /// takes an idle connection as the pool holds it (sqlx's `try_acquire`) and is itself
    /// the test; a connection that died while idle fails that statement, which is then
    /// sent again on a connection `acquire()` tested (the pre-read changes nothing, and a
    /// reserve sent again with its token answers what it answered). Turn it on when the
    /// pool's `before_acquire` hook must see every connection this store takes (a
    /// connection-age policy, a session reset done there rather than in `after_release`).
    ///
    /// ```
    /// # use tower_idempotency_postgres::{sqlx::PgPool, PostgresStore};
    /// # fn store(pool: PgPool) -> PostgresStore {
    /// PostgresStore::new(pool).transactional().pool_acquire_checks(true)
    /// # }
    /// ```
    pub fn pool_acquire_checks(mut self, on: bool) -> Self {
        self.pool_checks = on;
        self
    }

    /// In transactional mode, reserve a new key without reading it first: one round trip
    /// fewer per new key, more for a retry. Default `false`.
    ///
    /// By default a request's first statement is a read of its key outside any
    /// transaction (the pre-read): a replay, a `422` or a `409` is that one statement, and
    /// a new key is the pre-read and then one batch that begins the transaction and
    /// reserves. With `reserve_first(true)` every request sends that batch at once:
    ///
    /// - a new key costs one round trip fewer (and the server about 70 k instructions
    ///   fewer: 363 k instead of 434 k per new key under callgrind), for APIs whose
    ///   traffic is mostly new keys (payments created once, retried rarely);
    /// - a retry costs more: the batch fails (the key's row is there, or its owner's lock
    ///   is held), then the store rolls back and reads the key as without this option.
    ///   Each such failure is an `ERROR` in the server's log (`duplicate key value
    ///   violates unique constraint`, or `division by zero` for a key in flight), with
    ///   the batch's text if `log_min_error_statement` says so;
    /// - the handler's statements run with `lock_timeout` at the session's default (`SET
    ///   LOCAL lock_timeout TO DEFAULT`: the server's, database's, role's or connection
    ///   options' value), not at a value a plain `SET lock_timeout` gave the pooled
    ///   session (the pre-read reads that one; without it the store cannot know it);
    /// - a session's first reserve finds the statement unprepared and is sent again with
    ///   its `PREPARE`: one more round trip and one `ERROR` in the log per pooled session.
    ///
    /// What is guaranteed does not change: the batch is the same, and it alone decides
    /// whether this request owns the key (the pre-read only spares the batch).
    ///
    /// ```
    /// # use tower_idempotency_postgres::{sqlx::PgPool, PostgresStore};
    /// # fn store(pool: PgPool) -> PostgresStore {
    /// PostgresStore::new(pool).transactional().reserve_first(true)
    /// # }
    /// ```
    pub fn reserve_first(mut self, on: bool) -> Self {
        self.reserve_first = on;
        self
    }

    /// Turns off the [idle-in-transaction timeout](Self::idle_in_transaction_timeout):
    /// the server's own `idle_in_transaction_session_timeout` applies (0, none, unless
    /// configured).
    pub fn no_idle_in_transaction_timeout(mut self) -> Self {
        self.idle_limit = IdleLimit::Off;
        self
    }

    /// Creates the table and its index if they do not exist (`sql/schema.sql`, shipped
    /// with the crate). Safe to run from every process at start-up, also while others
    /// serve requests:
    ///
    /// - When the table and its index exist, it only reads the catalog: no DDL, no lock
    ///   on the table, so a server starting beside a long transactional request never
    ///   queues behind it (nor makes new reservations queue behind its DDL).
    /// - Otherwise it runs the schema in one transaction under an advisory lock (so
    ///   concurrent calls are safe), with the server's `lock_timeout` at
    ///   [`MIGRATE_LOCK_TIMEOUT`] (or half the store's [`command_timeout`](Self::command_timeout), if
    ///   shorter): a lock it cannot get in that time fails with
    ///   [`PostgresStoreError::Locked`], and the server gives up waiting as well.
    ///
    /// Needs `CREATE` on the schema when it creates; the schema itself must exist.
    pub async fn migrate(&self) -> Result<(), PostgresStoreError> {
        self.invalid_setting()?;
        if self.schema_is_current().await? {
            return Ok(());
        }
        let lock_timeout = MIGRATE_LOCK_TIMEOUT.min(self.timeout / 2);
        let schema = self.sql.schema.clone();
        let started = tokio::time::Instant::now();
        let migrated = within(self.timeout, async {
            let mut tx = self.pool.begin().await?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = '{}ms'",
                lock_timeout.as_millis().max(1)
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATE_LOCK)
                .execute(&mut *tx)
                .await?;
            sqlx::raw_sql(AssertSqlSafe(schema))
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        })
        .await;
        match migrated {
            Err(err) if err.sqlstate().as_deref() == Some("55P03") => {
                Err(PostgresStoreError::Locked {
                    what: "migrate",
                    waited: started.elapsed(),
                    source: Box::new(err),
                })
            }
            other => other,
        }
    }

    /// Whether the table and its index exist, from the catalog alone.
    async fn schema_is_current(&self) -> Result<bool, PostgresStoreError> {
        let query = sqlx::query_scalar(AssertSqlSafe(self.sql.schema_current.clone()));
        within(self.timeout, query.fetch_one(&self.pool)).await
    }

    /// Runs [`check`](Self::check), logs each of its warnings with `tracing::warn!`, keeps
    /// the report ([`check_report`](Self::check_report)) and returns the store. Fails only
    /// if the server is unreachable.
    pub async fn init(self) -> Result<Self, PostgresStoreError> {
        self.invalid_setting()?;
        let report = self.check().await?;
        for warning in report.warnings() {
            tracing::warn!(table = self.table_name(), "{warning}");
        }
        let _ = self.shared.report.set(report);
        Ok(self)
    }

    /// What [`init`](Self::init)'s check found, if it ran.
    pub fn check_report(&self) -> Option<&CheckReport> {
        self.shared.report.get()
    }

    /// Asks the server what matters to this store: its version, whether the table exists
    /// with the expected columns, whether the store's user may select, insert, update and
    /// delete in it, and whether `NOTIFY` works on the store's channel. Everything but an
    /// unreachable server is a warning in the report, never an error.
    pub async fn check(&self) -> Result<CheckReport, PostgresStoreError> {
        self.invalid_setting()?;
        check::run(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy_pool() -> PgPool {
        PgPoolOptions::new().connect_lazy_with(sqlx::postgres::PgConnectOptions::new())
    }

    #[tokio::test]
    async fn table_sets_the_channel_unless_one_was_chosen() {
        let store = PostgresStore::new(lazy_pool());
        assert_eq!(store.table_name(), DEFAULT_TABLE);
        assert_eq!(store.channel_name(), DEFAULT_TABLE);
        let store = store.table("app.idem");
        assert_eq!(store.channel_name(), "app.idem");
        let store = PostgresStore::new(lazy_pool())
            .channel("idem_done")
            .table("app.idem");
        assert_eq!(store.channel_name(), "idem_done");
    }

    /// Invalid names never panic and never reach SQL: they are reported by `migrate`,
    /// `init` and `check` (before any I/O), and a later valid name clears them.
    #[tokio::test]
    async fn invalid_names_are_reported_not_panicked() {
        let store = PostgresStore::new(lazy_pool()).table("idem; DROP TABLE x");
        assert!(!store.sql.reserve.contains("DROP TABLE"));
        for err in [
            store.migrate().await.unwrap_err(),
            store.check().await.unwrap_err(),
            store.clone().init().await.unwrap_err(),
        ] {
            assert!(
                matches!(
                    err,
                    PostgresStoreError::InvalidName {
                        what: "table name",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(store.table("idem").invalid_setting().is_ok());
        let err = PostgresStore::new(lazy_pool())
            .channel("a b")
            .invalid_setting()
            .unwrap_err();
        assert!(
            matches!(
                err,
                PostgresStoreError::InvalidName {
                    what: "channel name",
                    ..
                }
            ),
            "{err}"
        );
    }
}
