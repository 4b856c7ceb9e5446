#![cfg(feature = "postgres")]
//! Postgres for integration tests (feature `postgres`): [`database_url`] finds the server
//! (`DATABASE_URL`, the shared one at 127.0.0.1:5432, or a throwaway cluster: see
//! [`pg_server`](super::pg_server)), [`TestSchema`] is a schema of one test's own, dropped
//! when the test is done, and [`TestStore`] is a `PostgresStore` on a table in it that
//! keeps the schema alive.
//!
//! The server may be shared (and is never reset): every test works in its own schema
//! `tidem_<pid>_<nanos>_<n>` and drops only that.

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tower_idempotency::postgres::sqlx::postgres::{PgPool, PgPoolOptions};
use tower_idempotency::postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use tower_idempotency::postgres::PostgresStore;
use tower_idempotency::store::{
    Completion, FencingToken, Fingerprint, Record, Reservation, ScopeHash, StoreError,
};
use tower_idempotency::Store;

use super::pg_server::{self, NO_POSTGRES};

/// The test server's URL, found once per process: `DATABASE_URL` if it answers, else
/// `postgres://postgres@127.0.0.1:5432/test` if that does, else a throwaway cluster of
/// this process; panics with the `docker compose up -d postgres` hint otherwise. The
/// first call may block a few seconds. See [`pg_server`](super::pg_server).
pub fn database_url() -> String {
    pg_server::database_url()
}

/// Waits (at most 5 s) until every connection of `pool` (at least one) is idle in it
/// again: sqlx gives a connection back on a task of its own, after a ping and the pool's
/// `after_release` hook.
pub async fn until_idle(pool: &PgPool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pool.size() == 0 || pool.num_idle() != pool.size() as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool's connections did not come back within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Terminates the one connection of `pool` while it sits idle in the pool, as a server
/// restart or a proxy's idle cut would, from a session of `admin`; returns once its
/// backend is gone. The pool does not know yet: its next user finds out.
pub async fn kill_idle_connection(pool: &PgPool, admin: &PgPool) {
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .expect("the pool's backend");
    until_idle(pool).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(admin)
        .await
        .expect("pg_terminate_backend");
    assert!(killed, "backend {pid} did not end within 5 s");
}

/// The server's address, for a proxy in front of it.
pub fn server_addr() -> SocketAddr {
    let url = database_url();
    let (host, port) = pg_server::host_port(&url).unwrap_or_else(|| panic!("not a URL: {url}"));
    (host.trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve the host of {url}"))
}

/// [`database_url`] with its host and port replaced by `addr` (e.g. a fault proxy's).
pub fn database_url_via(addr: SocketAddr) -> String {
    let url = database_url();
    pg_server::with_host_port(&url, addr).unwrap_or_else(|| panic!("not a URL: {url}"))
}

/// A pool of at most `max` connections on the test database; panics, naming
/// `docker compose up -d postgres`, if none answers within 5 s.
pub async fn pool(max: u32) -> PgPool {
    let url = database_url();
    // A few connections kept open: opening one costs a backend fork, ~100 ms on a loaded
    // 2-core machine, which a test's timing would otherwise absorb.
    let connect = PgPoolOptions::new()
        .max_connections(max)
        .min_connections(max.min(4))
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(pool)) => pool,
        Ok(Err(e)) => panic!("{NO_POSTGRES}: cannot connect to {url}: {e}"),
        Err(_) => panic!("{NO_POSTGRES}: {url} did not answer within 5 s"),
    }
}

/// A schema of one test's own, created on [`TestSchema::create`] and dropped (with
/// everything in it) when the last clone of its `Arc` goes.
#[derive(Debug)]
pub struct TestSchema {
    pub name: String,
}

impl TestSchema {
    pub async fn create() -> Arc<TestSchema> {
        let name = format!(
            "tidem_{}",
            super::unique_suffix().replace('-', "_").to_lowercase()
        );
        let pool = pool(1).await;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&pool)
            .await
            .expect("create the test schema");
        pool.close().await;
        Arc::new(TestSchema { name })
    }

    /// `schema.table`.
    pub fn table(&self, table: &str) -> String {
        format!("{}.{table}", self.name)
    }

    /// A transaction on `pool` holding `table` of this schema in SHARE mode: reads go on,
    /// a reserve's `INSERT` waits.
    pub async fn lock_table(
        &self,
        pool: &PgPool,
        table: &str,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = pool.begin().await.expect("begin");
        let sql = format!("LOCK TABLE {} IN SHARE MODE", self.table(table));
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .expect("LOCK TABLE");
        tx
    }

    /// How many lock requests on `table` of this schema wait now, asked on `conn`.
    pub async fn lock_waiters(&self, conn: &mut PgConnection, table: &str) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM pg_locks WHERE relation = '{}'::regclass AND NOT granted",
            self.table(table)
        );
        sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(conn)
            .await
            .expect("pg_locks")
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // On a thread with its own runtime: Drop may run inside (or after) the test's.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&database_url()).await.ok()?;
                // Sessions of the test that held locks in the schema are going away with
                // its runtime; give them a moment rather than failing at once.
                let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE");
                let done = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await;
                let _ = conn.close().await;
                done.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("warning: could not drop test schema {}", self.name);
        }
    }
}

/// A migrated `PostgresStore` on table `idem` in a fresh schema, on a pool of 16; the
/// schema lives as long as any clone.
pub async fn store() -> TestStore {
    let schema = TestSchema::create().await;
    let store = PostgresStore::new(pool(16).await).table(&schema.table("idem"));
    store.migrate().await.expect("migrate");
    TestStore::new(store, schema)
}

/// As [`store`], in transactional mode.
pub async fn transactional_store() -> TestStore {
    let s = store().await;
    s.map(|store| store.transactional())
}

/// A store that keeps its test schema alive; derefs to the `PostgresStore`.
#[derive(Clone, Debug)]
pub struct TestStore {
    // Dropped first: the store's pool goes before its schema is dropped.
    store: PostgresStore,
    pub schema: Arc<TestSchema>,
}

impl TestStore {
    pub fn new(store: PostgresStore, schema: Arc<TestSchema>) -> Self {
        TestStore { store, schema }
    }

    /// The same schema, with the store changed by `f` (e.g. another mode or setting).
    pub fn map(self, f: impl FnOnce(PostgresStore) -> PostgresStore) -> Self {
        TestStore {
            store: f(self.store),
            schema: self.schema,
        }
    }

    pub fn store(&self) -> &PostgresStore {
        &self.store
    }

    /// Runs `sql` (no result) on the store's pool.
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(self.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// `SELECT count(*)` of `table` in the test schema.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {}", self.schema.table(table));
        sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(self.store.pool())
            .await
            .expect("count")
    }

    /// A transaction on the store's pool that holds `table` of the test schema `IN SHARE
    /// MODE` (as DDL or `LOCK TABLE` would: every insert waits), until it ends.
    pub async fn lock_table(&self, table: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        self.schema.lock_table(self.store.pool(), table).await
    }

    /// How many lock requests on `table` of the test schema wait now, asked on `conn`.
    pub async fn lock_waiters(&self, conn: &mut PgConnection, table: &str) -> i64 {
        self.schema.lock_waiters(conn, table).await
    }
}

impl Deref for TestStore {
    type Target = PostgresStore;

    fn deref(&self) -> &PostgresStore {
        &self.store
    }
}

impl Store for TestStore {
    type Subscription = <PostgresStore as Store>::Subscription;

    fn name(&self) -> &'static str {
        self.store.name()
    }

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: tower_idempotency::store::LeaseTerms,
    ) -> Result<Reservation, StoreError> {
        self.store.reserve(scope, fingerprint, token, lease).await
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.store.renew(scope, token, lease).await
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        self.store.complete(scope, token, record, ttl).await
    }

    fn owner_extensions(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        extensions: &mut axum::http::Extensions,
    ) {
        self.store.owner_extensions(scope, token, extensions);
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        self.store.release(scope, token).await
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<Self::Subscription, StoreError> {
        self.store.subscribe(scope).await
    }

    async fn inspect(
        &self,
        scope: &ScopeHash,
    ) -> Result<tower_idempotency::store::KeyState, StoreError> {
        self.store.inspect(scope).await
    }

    async fn forget(&self, scope: &ScopeHash) -> Result<bool, StoreError> {
        self.store.forget(scope).await
    }

    async fn resolve(
        &self,
        scope: &ScopeHash,
        record: &Record,
        ttl: Duration,
    ) -> Result<tower_idempotency::store::Resolved, StoreError> {
        self.store.resolve(scope, record, ttl).await
    }
}
