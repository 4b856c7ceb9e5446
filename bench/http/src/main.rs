//! `bench-http`: one HTTP server, several idempotency set-ups, for `run.py` to drive with
//! wrk over loopback.
//!
//! ```text
//! bench-http --variant <bare|memory|mem-floor|redis|redis-nolocal|peer|floor|postgres|postgres-local|postgres-rf|pg-floor> --port <p>
//!            [--redis-url <url>] [--database-url <url>] [--workers <n>] [--pg-pool <n>]
//! ```
//!
//! Every variant serves `POST /payments` with the same handler (it counts its runs and
//! answers 201 with a small JSON body naming the run, so a replay can be told from a
//! fresh run) and `GET /stats` (JSON counters, outside every idempotency layer). Only
//! what sits in front of the handler differs:
//!
//! | variant | in front of the handler |
//! | --- | --- |
//! | `bare` | nothing |
//! | `memory` | `IdempotencyLayer` on a `MemoryStore` (budgets 4 times the defaults) |
//! | `mem-floor` | hand-written: one `HashMap` behind one `Mutex`; claim the key, run the handler, store status and body |
//! | `redis` | `IdempotencyLayer` on a `RedisStore` (local replay tier on) |
//! | `redis-nolocal` | the same with the local replay tier off |
//! | `peer` | axum-idempotent 0.6 in direct-key mode, in a ruts 0.13 Redis session (plus `POST /login`) |
//! | `floor` | hand-written: reserve = 1 `EVALSHA`, complete = 1 `EVALSHA`, replay = 1 `EVALSHA` |
//! | `postgres` | `IdempotencyLayer` on a transactional `PostgresStore`; the handler also `INSERT`s one row through its `Tx` |
//! | `postgres-local` | the same with the store's opt-in local replay tier on |
//! | `postgres-rf` | `postgres` with the store's opt-in `reserve_first(true)`: a new key's reserve without the pre-read |
//! | `pg-floor` | hand-written, zero2prod's pattern: in the handler's transaction `INSERT ... ON CONFLICT DO NOTHING`, the same `INSERT` as `postgres`, `UPDATE` with the response, `COMMIT`; a conflict reads the saved response with one `SELECT` |
//!
//! All layers are attached per route (`post(h).route_layer(..)`, or `.layer(..)` for
//! the peer, as its README and `bench/peer` do), keys are required, responses are kept
//! for [`TTL_SECS`]. The postgres variant works in a schema of its own, `bench_<pid>_<secs>`,
//! created at start and dropped (`CASCADE`) when the server stops. The server listens on 127.0.0.1 only and stops on SIGTERM or
//! Ctrl-C, printing its counters as one JSON line on stderr.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use fred::prelude::{Builder, Client, ClientLike, Config, LuaInterface};
use fred::types::{CustomCommand, Value};
use ruts::store::redis::RedisStore as PeerStore;
use ruts::store::Ttl;
use ruts::{CookieOptions, Session, SessionLayer};
use tower_cookies::CookieManagerLayer;
use tower_idempotency::postgres::sqlx::postgres::PgPoolOptions;
use tower_idempotency::postgres::sqlx::{self, AssertSqlSafe, PgPool};
use tower_idempotency::postgres::{LocalReplays, PostgresStore, Tx};
use tower_idempotency::redis::RedisStore;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// How long every variant keeps a response (and the peer's session cookie lives).
const TTL_SECS: u64 = 600;
/// The memory variant's budgets: 4 times the defaults, see `serve`.
const MEMORY_MAX_ENTRIES: usize = 4 * tower_idempotency::DEFAULT_MAX_ENTRIES;
const MEMORY_MAX_BYTES: usize = 4 * tower_idempotency::DEFAULT_MAX_BYTES;
/// The peer's session cookie.
const SESSION_COOKIE: &str = "session";
/// The floor's replay marker (the same header our layer sets).
const REPLAYED: &str = "idempotent-replayed";
/// Largest response the floor stores; the handler's is about 30 bytes.
const FLOOR_MAX_RESPONSE: usize = 64 * 1024;
/// The postgres variant's pool: every request in flight holds one connection from
/// reserve to commit, and wrk keeps 32 requests in flight; 8 to spare so that a burst
/// never waits for a connection (the store's `LISTEN` connection is detached from the
/// pool and not counted here).
const PG_POOL_SIZE: u32 = 40;
/// Where the postgres variant connects unless `--database-url` or `$DATABASE_URL` says.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

const USAGE: &str =
    "usage: bench-http --variant <bare|memory|mem-floor|redis|redis-nolocal|peer|floor|postgres|postgres-local|postgres-rf|pg-floor> \
--port <port> [--redis-url <url>] [--database-url <url>] [--workers <n>] [--pg-pool <n>]";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Bare,
    Memory,
    Redis,
    RedisNoLocal,
    Peer,
    Floor,
    Postgres,
    PostgresLocal,
    PostgresRf,
    PgFloor,
    MemFloor,
}

impl Variant {
    const ALL: [(&'static str, Variant); 11] = [
        ("bare", Variant::Bare),
        ("memory", Variant::Memory),
        ("redis", Variant::Redis),
        ("redis-nolocal", Variant::RedisNoLocal),
        ("peer", Variant::Peer),
        ("floor", Variant::Floor),
        ("postgres", Variant::Postgres),
        ("postgres-local", Variant::PostgresLocal),
        ("postgres-rf", Variant::PostgresRf),
        ("pg-floor", Variant::PgFloor),
        ("mem-floor", Variant::MemFloor),
    ];

    fn parse(name: &str) -> Option<Variant> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, v)| *v == self)
            .map_or("?", |(n, _)| n)
    }

    fn uses_postgres(self) -> bool {
        matches!(
            self,
            Variant::Postgres | Variant::PostgresLocal | Variant::PostgresRf | Variant::PgFloor
        )
    }

    fn uses_redis(self) -> bool {
        matches!(
            self,
            Variant::Redis | Variant::RedisNoLocal | Variant::Peer | Variant::Floor
        )
    }
}

struct Args {
    variant: Variant,
    port: u16,
    redis_url: String,
    database_url: String,
    workers: usize,
    /// The Postgres pool's size (`PG_POOL_SIZE` unless `--pg-pool` says).
    pg_pool: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut variant = None;
    let mut port = None;
    let mut redis_url = "redis://127.0.0.1:6379".to_string();
    let mut database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string());
    let mut workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut pg_pool = PG_POOL_SIZE;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--variant" => {
                let name = value()?;
                variant =
                    Some(Variant::parse(&name).ok_or_else(|| format!("unknown variant {name}"))?);
            }
            "--port" => port = Some(value()?.parse().map_err(|e| format!("--port: {e}"))?),
            "--redis-url" => redis_url = value()?,
            "--database-url" => database_url = value()?,
            "--workers" => {
                workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?;
                if workers == 0 {
                    return Err("--workers must be at least 1".into());
                }
            }
            // `pg_server_instructions.py` runs one request at a time on a pool of one: each
            // run then opens the same connections, whose setup (catalog caches, plans, the
            // prepared reserve) cancels out between its two runs. With the default pool,
            // a connection returned to the pool a moment late made the next request open
            // another, and the count per request moved by tens of thousands.
            "--pg-pool" => {
                pg_pool = value()?.parse().map_err(|e| format!("--pg-pool: {e}"))?;
                if pg_pool == 0 {
                    return Err("--pg-pool must be at least 1".into());
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        variant: variant.ok_or("--variant is required")?,
        port: port.ok_or("--port is required")?,
        redis_url,
        database_url,
        workers,
        pg_pool,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bench-http: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // A multi-thread runtime as an ordinary `#[tokio::main]` server has, one worker per
    // core unless told otherwise: on a 2-core machine wrk and Redis compete for the same
    // cores, which is why BENCHMARKS.md records `--workers` and the machine.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-http: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-http: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Counters behind `GET /stats`.
#[derive(Default)]
struct Stats {
    /// Handler runs: a replay case must not move it.
    handler_runs: AtomicU64,
    /// Commands the floor sent (its own count, to check against `INFO commandstats`).
    floor_commands: AtomicU64,
    /// Rows the postgres (or pg-floor) variant's handler inserted in its transaction:
    /// one statement each, on top of the store's own round trips.
    pg_inserts: AtomicU64,
    /// Statements the pg-floor sent besides the handler's `INSERT` (its own count).
    pg_floor_statements: AtomicU64,
    /// The pg-floor's statements per operation: a new key's (`BEGIN`, `INSERT`,
    /// `UPDATE`, `COMMIT`) and a conflict's (`BEGIN`, `INSERT`, `SELECT`, and the dropped
    /// transaction's `ROLLBACK`, which goes out when the connection returns to the pool).
    pg_floor_reserve: AtomicU64,
    pg_floor_complete: AtomicU64,
}

/// Where `GET /stats` finds the store's own round-trip counter, if there is one.
#[derive(Clone)]
struct StatsState {
    variant: Variant,
    stats: Arc<Stats>,
    store: Option<RedisStore<Client>>,
    memory: Option<MemoryStore>,
    postgres: Option<PostgresStore>,
    /// The server's version, for the pg-floor (which has no store to ask).
    pg_version: Option<String>,
}

impl StatsState {
    fn json(&self) -> String {
        let redis = self.store.as_ref().map(|s| s.round_trips());
        let pg = self.postgres.as_ref().map(|s| s.round_trips());
        // One set of keys for either store, so run.py reads them the same way.
        let floor =
            |n: &AtomicU64| (self.variant == Variant::PgFloor).then(|| n.load(Ordering::Relaxed));
        let total = redis
            .map(|r| r.total)
            .or(pg.map(|r| r.total))
            .or(floor(&self.stats.pg_floor_statements));
        let reserve = redis
            .map(|r| r.reserve)
            .or(pg.map(|r| r.reserve))
            .or(floor(&self.stats.pg_floor_reserve));
        let complete = redis
            .map(|r| r.complete)
            .or(pg.map(|r| r.complete))
            .or(floor(&self.stats.pg_floor_complete));
        serde_json::json!({
            "variant": self.variant.name(),
            "handler_runs": self.stats.handler_runs.load(Ordering::Relaxed),
            "store_round_trips": total,
            "store_reserve": reserve,
            "store_complete": complete,
            "store_release": pg.map(|r| r.release),
            "store_notify": pg.map(|r| r.notify),
            "store_renew": pg.map(|r| r.renew),
            "pg_inserts": self.variant.uses_postgres()
                .then(|| self.stats.pg_inserts.load(Ordering::Relaxed)),
            "pg_open_transactions": self.postgres.as_ref().map(|s| s.open_transactions()),
            "pg_server_version": self.postgres.as_ref()
                .and_then(|s| s.check_report())
                .map(|r| r.server_version().to_string())
                .or_else(|| self.pg_version.clone()),
            "memory_entries": self.memory.as_ref().map(|m| m.len()),
            "memory_bytes": self.memory.as_ref().map(|m| m.bytes()),
            "floor_commands": (self.variant == Variant::Floor)
                .then(|| self.stats.floor_commands.load(Ordering::Relaxed)),
        })
        .to_string()
    }
}

async fn stats_handler(State(state): State<StatsState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], state.json()).into_response()
}

/// `POST /payments`: the same work in every variant.
fn payments(stats: Arc<Stats>) -> MethodRouter {
    post(move |body: Bytes| {
        let stats = stats.clone();
        async move {
            let run = stats.handler_runs.fetch_add(1, Ordering::Relaxed) + 1;
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                format!(r#"{{"id":"pay_{run}","len":{}}}"#, body.len()),
            )
        }
    })
}

/// `POST /payments` for the postgres variant: the same run counter and the same 201 body
/// as [`payments`], plus what a handler behind a transactional store is for: one
/// `INSERT` into the run's `payments` table through the request's [`Tx`], which commits
/// together with the idempotency record. `insert` is that statement, schema-qualified.
fn payments_in_tx(stats: Arc<Stats>, insert: Arc<str>) -> MethodRouter {
    post(move |tx: Tx, body: Bytes| {
        let stats = stats.clone();
        let insert = insert.clone();
        async move {
            let run = stats.handler_runs.fetch_add(1, Ordering::Relaxed) + 1;
            let Ok(mut conn) = tx.lock().await else {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            };
            let inserted = insert_payment(&stats, &insert, run, body.len(), &mut conn).await;
            // Completing waits for the guard: let it go before answering.
            drop(conn);
            payment_answer(inserted, run, body.len())
        }
    })
}

/// The handler's work in both Postgres variants (`postgres`, `pg-floor`): one INSERT on
/// the request's transaction, counted.
async fn insert_payment(
    stats: &Stats,
    insert: &str,
    run: u64,
    len: usize,
    conn: &mut sqlx::PgConnection,
) -> Result<(), sqlx::Error> {
    stats.pg_inserts.fetch_add(1, Ordering::Relaxed);
    sqlx::query(AssertSqlSafe(insert))
        .bind(i64::try_from(run).unwrap_or(i64::MAX))
        .bind(i32::try_from(len).unwrap_or(i32::MAX))
        .execute(conn)
        .await
        .map(drop)
}

/// The answer of both Postgres variants once the handler's INSERT ran.
fn payment_answer(inserted: Result<(), sqlx::Error>, run: u64, len: usize) -> Response {
    if inserted.is_err() {
        // The transaction is aborted now: the commit would fail anyway (503).
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"id":"pay_{run}","len":{len}}}"#),
    )
        .into_response()
}

/// A prefix no other run uses, so several runs can share one Redis; every key the
/// server writes expires after [`TTL_SECS`].
fn run_prefix(variant: Variant) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "bench-http:{}:{}-{nanos}:",
        variant.name(),
        std::process::id()
    )
}

async fn redis_client(url: &str) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| format!("{url}: {e}"))?;
    let client = Builder::from_config(config)
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), client.init()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(format!("cannot connect to {url}: {e}")),
        Err(_) => Err(format!("cannot connect to {url} within 5 s")),
    }
}

/// The postgres variant's pool and the schema of its run: `bench_<pid>_<unix secs>`,
/// created by [`PgSchema::create`] (with a small `payments` table for the handler's rows)
/// and dropped by [`PgSchema::drop`], so runs sharing a database never meet and leave
/// nothing behind.
struct PgSchema {
    pool: PgPool,
    name: String,
}

/// `url` with its password, if any, as `***`: error messages end up in run logs.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

impl PgSchema {
    async fn create(url: &str, pool_size: u32) -> Result<PgSchema, String> {
        let connect = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url);
        let pool = match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(pool)) => pool,
            Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", redact(url))),
            Err(_) => return Err(format!("cannot connect to {} within 10 s", redact(url))),
        };
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Only digits and underscores after a fixed prefix: a valid, unquoted identifier,
        // which is what makes the `AssertSqlSafe` below true.
        let name = format!("bench_{}_{secs}", std::process::id());
        // Plain `CREATE SCHEMA`, not `IF NOT EXISTS`: a name that exists belongs to
        // someone else, and `drop` must never drop it.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA {name}; \
             CREATE TABLE {name}.payments (id bigserial PRIMARY KEY, run bigint NOT NULL, \
             len integer NOT NULL)"
        )))
        .execute(&pool)
        .await
        .map_err(|e| format!("CREATE SCHEMA {name}: {e}"))?;
        Ok(PgSchema { pool, name })
    }

    /// The handler's statement.
    fn insert(&self) -> Arc<str> {
        format!(
            "INSERT INTO {}.payments (run, len) VALUES ($1, $2)",
            self.name
        )
        .into()
    }

    async fn drop(self) -> Result<(), String> {
        let dropped = sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {} CASCADE", self.name)))
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| format!("DROP SCHEMA {}: {e}", self.name));
        self.pool.close().await;
        dropped
    }
}

async fn serve(args: Args) -> Result<(), String> {
    // The schema goes whatever happens after it exists: a failed start drops it too.
    let schema = if args.variant.uses_postgres() {
        Some(PgSchema::create(&args.database_url, args.pg_pool).await?)
    } else {
        None
    };
    let served = serve_with(args, schema.as_ref()).await;
    let Some(schema) = schema else {
        return served;
    };
    let name = schema.name.clone();
    match (served, schema.drop().await) {
        (Ok(()), Ok(())) => {
            eprintln!("bench-http: dropped schema {name}");
            Ok(())
        }
        (Ok(()), Err(e)) => Err(e),
        (Err(e), dropped) => {
            if let Err(d) = dropped {
                eprintln!("bench-http: {d}");
            }
            Err(e)
        }
    }
}

async fn serve_with(args: Args, schema: Option<&PgSchema>) -> Result<(), String> {
    let stats = Arc::new(Stats::default());
    let client = if args.variant.uses_redis() {
        Some(redis_client(&args.redis_url).await?)
    } else {
        None
    };
    let prefix = run_prefix(args.variant);
    let ttl = Duration::from_secs(TTL_SECS);
    let mut store_for_stats = None;
    let mut memory_for_stats = None;
    let mut postgres_for_stats = None;
    let mut pg_version = None;

    let app: Router = match (args.variant, client) {
        (Variant::Bare, _) => Router::new().route("/payments", payments(stats.clone())),
        (Variant::Memory, _) => {
            // The default budgets (1M entries, 256 MiB) hold about 450k of these records:
            // a 10 s new-key run at 40k req/s plus its warm-up can reach that, and the
            // layer would then answer 503 fast. Refusals are not what this measures.
            let store = MemoryStore::builder()
                .max_entries(MEMORY_MAX_ENTRIES)
                .max_bytes(MEMORY_MAX_BYTES)
                .build();
            memory_for_stats = Some(store.clone());
            let layer = IdempotencyLayer::new(store)
                .global_scope()
                .require_key()
                .ttl(ttl);
            Router::new().route("/payments", payments(stats.clone()).route_layer(layer))
        }
        (Variant::Redis | Variant::RedisNoLocal, Some(client)) => {
            let store = RedisStore::new(client).prefix(prefix);
            let store = if args.variant == Variant::RedisNoLocal {
                store.local_replays(None)
            } else {
                store
            };
            let store = store
                .init()
                .await
                .map_err(|e| format!("RedisStore::init: {e}"))?;
            store_for_stats = Some(store.clone());
            let layer = IdempotencyLayer::new(store)
                .global_scope()
                .require_key()
                .ttl(ttl);
            Router::new().route("/payments", payments(stats.clone()).route_layer(layer))
        }
        (Variant::Peer, Some(client)) => peer(stats.clone(), client).await?,
        (Variant::MemFloor, _) => Router::new().route(
            "/payments",
            payments(stats.clone()).route_layer(middleware::from_fn_with_state(
                MemFloor::default(),
                mem_floor_layer,
            )),
        ),
        (Variant::Floor, Some(client)) => {
            let floor = Floor::new(client, prefix, stats.clone()).await?;
            Router::new().route(
                "/payments",
                payments(stats.clone())
                    .route_layer(middleware::from_fn_with_state(floor, floor_layer)),
            )
        }
        (Variant::Postgres | Variant::PostgresLocal | Variant::PostgresRf, _) => {
            let schema = schema.ok_or("the postgres variant needs its schema")?;
            // The default transactional settings: lock timeout 250 ms, idle-in-transaction
            // limit = the layer's lease, store timeout 5 s; `postgres-local` turns on the
            // opt-in local replay tier (the default for Redis), `postgres-rf` the opt-in
            // reserve without a pre-read.
            let local = (args.variant == Variant::PostgresLocal).then(LocalReplays::default);
            let store = PostgresStore::new(schema.pool.clone())
                .table(&format!("{}.idempotency", schema.name))
                .transactional()
                .local_replays(local)
                .reserve_first(args.variant == Variant::PostgresRf);
            store
                .migrate()
                .await
                .map_err(|e| format!("PostgresStore::migrate: {e}"))?;
            let store = store
                .init()
                .await
                .map_err(|e| format!("PostgresStore::init: {e}"))?;
            // `init` logs its warnings through tracing, which this binary does not
            // install: print them, since they would change what is measured.
            for warning in store.check_report().map_or(&[][..], |r| r.warnings()) {
                eprintln!("bench-http: postgres check: {warning}");
            }
            postgres_for_stats = Some(store.clone());
            let layer = IdempotencyLayer::new(store)
                .global_scope()
                .require_key()
                .ttl(ttl);
            Router::new().route(
                "/payments",
                payments_in_tx(stats.clone(), schema.insert()).route_layer(layer),
            )
        }
        (Variant::PgFloor, _) => {
            let schema = schema.ok_or("the pg-floor variant needs its schema")?;
            pg_version = Some(
                sqlx::query_scalar::<_, String>("SHOW server_version")
                    .fetch_one(&schema.pool)
                    .await
                    .map_err(|e| format!("SHOW server_version: {e}"))?,
            );
            let floor = PgFloor::new(schema, stats.clone()).await?;
            Router::new().route(
                "/payments",
                payments_pg_floor(stats.clone(), schema.insert())
                    .route_layer(middleware::from_fn_with_state(floor, pg_floor_layer)),
            )
        }
        (variant, None) => return Err(format!("{} needs Redis", variant.name())),
    };

    let state = StatsState {
        variant: args.variant,
        stats,
        store: store_for_stats,
        memory: memory_for_stats,
        postgres: postgres_for_stats,
        pg_version,
    };
    // Added after the variant's layers, so no idempotency (or session) layer sees it.
    let app = app.route("/stats", get(stats_handler).with_state(state.clone()));

    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    println!(
        "bench-http: {} listening on http://{addr} ({} workers)",
        args.variant.name(),
        args.workers
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| format!("serve: {e}"))?;
    eprintln!("{}", state.json());
    Ok(())
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

// ---------------------------------------------------------------------------------------
// The peer: axum-idempotent 0.6 as its README sets it up, on a ruts 0.13 Redis session.

/// The peer's routes: `POST /payments` behind `IdempotentLayer` (direct-key mode, key
/// required), and `POST /login`, which writes a session field so that the response
/// carries a session cookie. The peer caches only for a request that carries a session.
async fn peer(stats: Arc<Stats>, client: Client) -> Result<Router, String> {
    // ruts 0.13 sets a TTL per hash field with HEXPIRE (Redis 7.4+, Valkey 9+); without it
    // every write fails and the peer silently stops caching, so refuse to start instead.
    let hexpire = client
        .custom::<Value, Value>(
            CustomCommand::new_static("COMMAND", None, false),
            vec!["INFO".into(), "HEXPIRE".into()],
        )
        .await
        .map_err(|e| format!("COMMAND INFO HEXPIRE: {e}"))?;
    let known =
        matches!(&hexpire, Value::Array(items) if items.first().is_some_and(|v| !v.is_null()));
    if !known {
        return Err(
            "the peer's Redis store (ruts 0.13) needs HEXPIRE: Redis >= 7.4 or Valkey >= 9".into(),
        );
    }
    let store = Arc::new(
        PeerStore::new(Arc::new(client))
            .await
            .map_err(|e| format!("ruts RedisStore: {e}"))?,
    );
    let options = IdempotentOptions::default()
        .use_idempotency_key_header(Some("Idempotency-Key"), true)
        .expire_after(TTL_SECS as i64);
    let cookies = CookieOptions::build()
        .name(SESSION_COOKIE)
        .max_age(TTL_SECS)
        .path("/");
    Ok(Router::new()
        .route(
            "/payments",
            payments(stats).layer(IdempotentLayer::<PeerStore<Client>>::new(options)),
        )
        .route("/login", post(login))
        .layer(SessionLayer::new(store).with_cookie_options(cookies))
        .layer(CookieManagerLayer::new()))
}

async fn login(session: Session<PeerStore<Client>>) -> StatusCode {
    let Ok(ttl) = Ttl::new(TTL_SECS as i64) else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    match session.set("user", &String::from("bench"), ttl, None).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

// ---------------------------------------------------------------------------------------
// The floor: the least a Redis-backed Idempotency-Key design must send. A new key costs
// 2 round trips (reserve, complete), a replay 1 (reserve answers the stored response). No
// fingerprint, no scope beyond the key, no lease renewal, no fencing, no wake-ups: both
// scripts are awaited inline in the request, with no spawned task.

/// Reserve: answer what the key holds (empty = still running, else the stored response),
/// or claim it with an empty value. A replay runs one `GET` inside Redis, a new key a `GET`
/// and a `SET`; the script runs atomically, so no `NX` is needed.
const FLOOR_RESERVE: &str = "local v = redis.call('GET', KEYS[1]) if v then return v end \
redis.call('SET', KEYS[1], '', 'PX', ARGV[1]) return false";
/// Complete: store the response (3 status digits, then the body).
const FLOOR_COMPLETE: &str = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1";

#[derive(Clone)]
struct Floor {
    client: Client,
    prefix: Arc<str>,
    reserve: Arc<str>,
    complete: Arc<str>,
    ttl_ms: u64,
    stats: Arc<Stats>,
}

impl Floor {
    async fn new(client: Client, prefix: String, stats: Arc<Stats>) -> Result<Floor, String> {
        let reserve: String = client
            .script_load(FLOOR_RESERVE)
            .await
            .map_err(|e| format!("SCRIPT LOAD: {e}"))?;
        let complete: String = client
            .script_load(FLOOR_COMPLETE)
            .await
            .map_err(|e| format!("SCRIPT LOAD: {e}"))?;
        Ok(Floor {
            client,
            prefix: prefix.into(),
            reserve: reserve.into(),
            complete: complete.into(),
            ttl_ms: TTL_SECS * 1000,
            stats,
        })
    }

    async fn eval(&self, sha: &str, key: &str, args: Vec<Value>) -> Result<Option<Bytes>, ()> {
        self.stats.floor_commands.fetch_add(1, Ordering::Relaxed);
        self.client.evalsha(sha, key, args).await.map_err(|_| ())
    }
}

fn plain(status: StatusCode) -> Response {
    status.into_response()
}

/// The `Idempotency-Key` of a floor's request, as the floors accept it.
fn floor_key(request: &Request) -> Option<&str> {
    request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255)
}

/// Runs the handler and reads its response for a floor to store: the response to send,
/// and what `replay` reads back (the status's three digits, then the body).
async fn floor_run(request: Request, next: Next) -> Result<(Response, Vec<u8>), Response> {
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, FLOOR_MAX_RESPONSE).await else {
        return Err(plain(StatusCode::INTERNAL_SERVER_ERROR));
    };
    let mut stored = Vec::with_capacity(3 + body.len());
    stored.extend_from_slice(parts.status.as_str().as_bytes());
    stored.extend_from_slice(&body);
    Ok((Response::from_parts(parts, Body::from(body)), stored))
}

async fn floor_layer(State(floor): State<Floor>, request: Request, next: Next) -> Response {
    let Some(key) = floor_key(&request) else {
        return plain(StatusCode::BAD_REQUEST);
    };
    let key = format!("{}{key}", floor.prefix);
    let ttl = Value::from(floor.ttl_ms as i64);
    match floor.eval(&floor.reserve, &key, vec![ttl.clone()]).await {
        Err(()) => return plain(StatusCode::SERVICE_UNAVAILABLE),
        Ok(None) => {}
        Ok(Some(stored)) if stored.is_empty() => return plain(StatusCode::CONFLICT),
        Ok(Some(stored)) => return replay(stored),
    }
    let (response, stored) = match floor_run(request, next).await {
        Ok(ran) => ran,
        Err(failed) => return failed,
    };
    let args = vec![Value::Bytes(stored.into()), ttl];
    if floor.eval(&floor.complete, &key, args).await.is_err() {
        return plain(StatusCode::SERVICE_UNAVAILABLE);
    }
    response
}

/// The mem-floor: what a hand-written in-memory idempotency middleware does at the least:
/// one map behind one lock, the key claimed before the handler runs (409 while it has no
/// response) and the response stored after; no fingerprint, no scope beyond the key, no
/// TTL, no bound, no lease, no wake-ups.
#[derive(Clone, Default)]
struct MemFloor(Arc<std::sync::Mutex<HashMap<String, Option<Bytes>>>>);

async fn mem_floor_layer(State(floor): State<MemFloor>, request: Request, next: Next) -> Response {
    let Some(key) = floor_key(&request).map(str::to_owned) else {
        return plain(StatusCode::BAD_REQUEST);
    };
    // A poisoned lock only means a panic while it was held; the map is still whole.
    let lock = || {
        floor
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    match lock().entry(key.clone()) {
        Entry::Occupied(e) => {
            return match e.get() {
                None => plain(StatusCode::CONFLICT),
                Some(stored) => replay(stored.clone()),
            };
        }
        Entry::Vacant(v) => {
            v.insert(None);
        }
    }
    match floor_run(request, next).await {
        Ok((response, stored)) => {
            lock().insert(key, Some(Bytes::from(stored)));
            response
        }
        Err(failed) => {
            lock().remove(&key);
            failed
        }
    }
}

/// The stored response: every handler answer here is JSON, so only the status and the
/// body are kept.
fn replay(stored: Bytes) -> Response {
    let status = std::str::from_utf8(&stored[..3.min(stored.len())])
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok());
    let Some(status) = status else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let mut response = Response::new(Body::from(stored.slice(3..)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

// ---------------------------------------------------------------------------------------
// The pg-floor: what a Rust team writes by hand for Postgres (zero2prod's idempotency
// chapter), inline in the request. In the handler's transaction: `INSERT` the key `ON
// CONFLICT DO NOTHING`, run the handler (the same `INSERT` into `payments` as the
// postgres variant's, through that transaction), `UPDATE` the row with the response,
// `COMMIT`. A key that conflicts reads the saved response with one `SELECT` on the pool
// (409 while it has none); its transaction is dropped, and sqlx sends the `ROLLBACK` when
// the connection goes back to the pool. Same table shape as the store's (the floor's
// table is made by `PostgresStore::migrate`), no fingerprint, no scope beyond the key, no
// lease, no fencing, no wake-ups, no spawned task.

/// The transaction a pg-floor request holds, for its handler (a request extension).
#[derive(Clone)]
struct FloorTx(Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>>);

#[derive(Clone)]
struct PgFloor {
    pool: PgPool,
    reserve: Arc<str>,
    replay: Arc<str>,
    complete: Arc<str>,
    stats: Arc<Stats>,
}

impl PgFloor {
    async fn new(schema: &PgSchema, stats: Arc<Stats>) -> Result<PgFloor, String> {
        let table = format!("{}.floor_idempotency", schema.name);
        PostgresStore::new(schema.pool.clone())
            .table(&table)
            .migrate()
            .await
            .map_err(|e| format!("migrate {table}: {e}"))?;
        Ok(PgFloor {
            pool: schema.pool.clone(),
            reserve: format!(
                "INSERT INTO {table} (scope, fingerprint, state, token, expires_at) \
                 VALUES ($1, '\\x', 'pending', '\\x', now() + $2 * interval '1 second') \
                 ON CONFLICT (scope) DO NOTHING"
            )
            .into(),
            replay: format!("SELECT record FROM {table} WHERE scope = $1 AND state = 'completed'")
                .into(),
            complete: format!(
                "UPDATE {table} SET state = 'completed', record = $2, \
                 expires_at = now() + $3 * interval '1 second' WHERE scope = $1"
            )
            .into(),
            stats,
        })
    }

    fn count(&self, n: u64) {
        self.stats
            .pg_floor_statements
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// `POST /payments` behind the pg-floor: the postgres variant's handler, with the
/// floor's transaction instead of `Tx`.
fn payments_pg_floor(stats: Arc<Stats>, insert: Arc<str>) -> MethodRouter {
    post(
        move |axum::Extension(tx): axum::Extension<FloorTx>, body: Bytes| {
            let stats = stats.clone();
            let insert = insert.clone();
            async move {
                let run = stats.handler_runs.fetch_add(1, Ordering::Relaxed) + 1;
                let mut guard = tx.0.lock().await;
                let Some(conn) = guard.as_mut() else {
                    return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                };
                let inserted = insert_payment(&stats, &insert, run, body.len(), conn).await;
                drop(guard);
                payment_answer(inserted, run, body.len())
            }
        },
    )
}

async fn pg_floor_layer(
    State(floor): State<PgFloor>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(key) = request
        .headers()
        .get("idempotency-key")
        .map(|v| v.as_bytes().to_vec())
        .filter(|k| !k.is_empty() && k.len() <= 255)
    else {
        return plain(StatusCode::BAD_REQUEST);
    };
    let ttl = TTL_SECS as f64;
    floor.count(2);
    floor.stats.pg_floor_reserve.fetch_add(2, Ordering::Relaxed);
    let Ok(mut tx) = floor.pool.begin().await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE);
    };
    let inserted = sqlx::query(AssertSqlSafe(floor.reserve.clone()))
        .bind(key.as_slice())
        .bind(ttl)
        .execute(&mut *tx)
        .await;
    match inserted {
        Err(_) => return plain(StatusCode::SERVICE_UNAVAILABLE),
        Ok(done) if done.rows_affected() == 0 => {
            // zero2prod: the saved response, read on the pool; the transaction is dropped.
            // Its `ROLLBACK` goes out when the connection returns to the pool, off the
            // request's path, but it is a statement sent all the same: counted.
            drop(tx);
            // The request's body is read here too, as zero2prod's handler reads its form
            // before it looks at the key. Left unread, hyper may close the keep-alive
            // connection after the response when the body's bytes are not in its buffer
            // yet (a pool of one connection under callgrind, on a loaded machine: the
            // replay runs of `pg_server_instructions.py` failed with a broken pipe).
            let _ = axum::body::to_bytes(request.into_body(), FLOOR_MAX_RESPONSE).await;
            floor.count(2);
            floor.stats.pg_floor_reserve.fetch_add(2, Ordering::Relaxed);
            let saved =
                sqlx::query_scalar::<_, Option<Vec<u8>>>(AssertSqlSafe(floor.replay.clone()))
                    .bind(key.as_slice())
                    .fetch_optional(&floor.pool)
                    .await;
            return match saved {
                Ok(Some(Some(stored))) => replay(Bytes::from(stored)),
                Ok(_) => plain(StatusCode::CONFLICT),
                Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE),
            };
        }
        Ok(_) => {}
    }
    let shared = FloorTx(Arc::new(tokio::sync::Mutex::new(Some(tx))));
    request.extensions_mut().insert(shared.clone());
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, FLOOR_MAX_RESPONSE).await else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let Some(mut tx) = shared.0.lock().await.take() else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR);
    };
    if !parts.status.is_success() {
        // Nothing stored: the key is free again (and the handler's writes undone).
        floor.count(1);
        let _ = tx.rollback().await;
        return Response::from_parts(parts, Body::from(body));
    }
    let mut stored = Vec::with_capacity(3 + body.len());
    stored.extend_from_slice(parts.status.as_str().as_bytes());
    stored.extend_from_slice(&body);
    floor.count(2);
    floor
        .stats
        .pg_floor_complete
        .fetch_add(2, Ordering::Relaxed);
    let updated = sqlx::query(AssertSqlSafe(floor.complete.clone()))
        .bind(key.as_slice())
        .bind(stored.as_slice())
        .bind(ttl)
        .execute(&mut *tx)
        .await;
    if updated.is_err() || tx.commit().await.is_err() {
        return plain(StatusCode::SERVICE_UNAVAILABLE);
    }
    Response::from_parts(parts, Body::from(body))
}
