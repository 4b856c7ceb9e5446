//! Instructions per request, for callgrind: one case, a fixed number of in-process
//! requests, the measured loop in its own function so callgrind counts nothing else.
//!
//! ```text
//! cargo bench --bench profile --no-run
//! valgrind --tool=callgrind --toggle-collect='*profile::measured*' \
//!     target/release/deps/profile-<hash> <case> 20000
//! ```
//!
//! Then `callgrind_annotate` the output, and divide the total by the request count.
//! Cases: `bare` (axum alone), `new` and `replay` (the layer on `MemoryStore`),
//! `boxed-new` and `boxed-replay` (the same `MemoryStore` behind a `BoxStore`),
//! `redis-new`, `redis-replay`, `redis-replay-nolocal` (the layer on `RedisStore`, local
//! replay tier on or off), `floor-new`, `floor-replay` (the least a Redis-backed
//! idempotency middleware does: one `EVALSHA` to claim and one to store a new key, one
//! to read a replay; no fingerprint, no lease, no fencing), all against `REDIS_URL`
//! (default `redis://127.0.0.1:6379`); `pg-tx-new`, `pg-tx-replay` (the layer on a
//! transactional `PostgresStore`, local replay tier off, its default) against
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`), in a table of its
//! own that it drops at the end. Callgrind counts instructions, not seconds, so
//! the numbers repeat run to run whatever else the machine does.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{BoxStore, IdempotencyLayer, MemoryStore, Store};
use tower_idempotency_redis::fred::clients::Client;
use tower_idempotency_redis::fred::interfaces::{ClientLike, LuaInterface};
use tower_idempotency_redis::fred::prelude::{Builder, Config};
use tower_idempotency_redis::fred::types::Value;
use tower_idempotency_redis::RedisStore;

const BODY: &str =
    r#"{"amount":1250,"currency":"EUR","reference":"order-8e03978e","customer":"cus_123"}"#;

async fn handler(body: Bytes) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        format!(r#"{{"id":"pay_1","len":{}}}"#, body.len()),
    )
}

fn request(key: &str) -> Request<Body> {
    Request::post("/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(BODY))
        .expect("valid request")
}

async fn call(app: &Router, key: &str) {
    let response = app.clone().oneshot(request(key)).await.expect("infallible");
    assert!(response.status().is_success(), "{}", response.status());
    let _ = response.into_body().collect().await.expect("body");
}

fn layered<St: Store>(store: St) -> Router {
    let layer = IdempotencyLayer::new(store)
        .global_scope()
        .ttl(std::time::Duration::from_secs(60));
    Router::new().route("/payments", post(handler).route_layer(layer))
}

/// The measured loop: new keys (`fresh`) or one key replayed. A plain function around
/// `block_on`, so callgrind's `--toggle-collect` sees all of it.
#[inline(never)]
fn measured(rt: &tokio::runtime::Runtime, app: &Router, n: u64, fresh: bool) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let run = std::process::id();
    rt.block_on(async {
        for _ in 0..n {
            if fresh {
                let key = format!("p-{run}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
                call(app, &key).await;
            } else {
                call(app, "replayed").await;
            }
        }
    });
}

async fn redis_client() -> Client {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = Builder::from_config(Config::from_url(&url).expect("REDIS_URL"))
        .build()
        .expect("client");
    client.init().await.expect("connect to Redis");
    client
}

/// Claims the key, or returns its stored response: one script for both, as a reserve is.
const FLOOR_CLAIM: &str = "local r = redis.call('HGET', KEYS[1], 'r') \
    if r then return r end \
    if redis.call('HSETNX', KEYS[1], 'p', '1') == 1 then return 1 end \
    return 0";
const FLOOR_STORE: &str =
    "redis.call('HSET', KEYS[1], 'r', ARGV[1]) redis.call('PEXPIRE', KEYS[1], 60000) return 1";

/// The floor's two scripts' SHA-1s, hashed once per process as bench-http's floor does
/// (`SCRIPT LOAD` once): hashed per request, they cost the floor about 8 k instructions
/// that no real middleware pays, and the store's gap to it read that much too small.
static FLOOR_SHAS: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(|| {
    let sha = tower_idempotency_redis::fred::util::sha1_hash;
    (sha(FLOOR_CLAIM), sha(FLOOR_STORE))
});

/// The floor: one inline `EVALSHA` to claim (or read and replay), one to store.
async fn floor(client: Client, request: Request, next: Next) -> Response {
    let Some(key) = request.headers().get("idempotency-key").cloned() else {
        return next.run(request).await;
    };
    let key = format!(
        "floor:{}:{}",
        std::process::id(),
        key.to_str().unwrap_or("")
    );
    let (claim, store) = &*FLOOR_SHAS;
    let claimed: Value = client
        .evalsha(claim.as_str(), key.clone(), ())
        .await
        .expect("claim");
    match claimed {
        Value::Integer(1) => {}
        Value::Integer(_) => return StatusCode::CONFLICT.into_response(),
        stored => {
            let stored = stored.into_bytes().unwrap_or_default();
            return (StatusCode::CREATED, stored).into_response();
        }
    }
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let _: i64 = client
        .evalsha(store.as_str(), key, body.clone())
        .await
        .expect("store");
    Response::from_parts(parts, Body::from(body))
}

/// A transactional store on a table of this run (`profile_<pid>`), created here.
async fn pg_store() -> (tower_idempotency_postgres::PostgresStore, String) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = tower_idempotency_postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .expect("connect to Postgres");
    let table = format!("profile_{}", std::process::id());
    let store = tower_idempotency_postgres::PostgresStore::new(pool).table(&table);
    store.migrate().await.expect("migrate");
    (store.transactional(), table)
}

thread_local! {
    /// The Postgres cases' pool and table, dropped at the end.
    static PG_TABLE: std::cell::RefCell<Option<(tower_idempotency_postgres::sqlx::PgPool, String)>> =
        const { std::cell::RefCell::new(None) };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let case = args.get(1).map(String::as_str).unwrap_or("new");
    let n: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (app, fresh) =
        rt.block_on(async {
            let (app, fresh) =
                match case {
                    "bare" => (Router::new().route("/payments", post(handler)), true),
                    "new" => (layered(MemoryStore::default()), true),
                    "replay" => (layered(MemoryStore::default()), false),
                    "boxed-new" => (layered(BoxStore::new(MemoryStore::default())), true),
                    "boxed-replay" => (layered(BoxStore::new(MemoryStore::default())), false),
                    "redis-new" | "redis-replay" | "redis-replay-nolocal" => {
                        let store = RedisStore::new(redis_client().await)
                            .prefix(format!("profile:{}:", std::process::id()));
                        let store = if case == "redis-replay-nolocal" {
                            store.local_replays(None)
                        } else {
                            store
                        };
                        (
                            layered(store.init().await.expect("init")),
                            case == "redis-new",
                        )
                    }
                    "floor-new" | "floor-replay" => {
                        let client = redis_client().await;
                        for src in [FLOOR_CLAIM, FLOOR_STORE] {
                            let _: String = client.script_load(src).await.expect("load");
                        }
                        let app = Router::new().route("/payments", post(handler)).layer(
                            middleware::from_fn(move |req, next| floor(client.clone(), req, next)),
                        );
                        (app, case == "floor-new")
                    }
                    "pg-tx-new" | "pg-tx-replay" => {
                        let (store, table) = pg_store().await;
                        PG_TABLE.with(|t| *t.borrow_mut() = Some((store.pool().clone(), table)));
                        (layered(store), case == "pg-tx-new")
                    }
                    other => panic!("unknown case {other}"),
                };
            // What `axum::serve` does: handlers become routes once, layers applied once.
            let app = app.with_state(());
            // Warm up (and store the replayed key).
            for i in 0..200 {
                call(&app, &format!("warm-{}-{i}", std::process::id())).await;
            }
            call(&app, "replayed").await;
            (app, fresh)
        });
    measured(&rt, &app, n, fresh);
    if let Some((pool, table)) = PG_TABLE.with(|t| t.borrow_mut().take()) {
        rt.block_on(async {
            let drop = format!("DROP TABLE {table}");
            tower_idempotency_postgres::sqlx::raw_sql(
                tower_idempotency_postgres::sqlx::AssertSqlSafe(drop),
            )
            .execute(&pool)
            .await
            .expect("drop the table");
        });
    }
    println!("{case}: {n} requests");
}
