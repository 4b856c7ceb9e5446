//! `bench-http`: one HTTP server, several idempotency set-ups, for `run.py` to drive with
//! wrk over loopback.
//!
//! ```text
//! bench-http --variant <bare|memory|redis|redis-nolocal|peer|floor> --port <p>
//!            [--redis-url <url>] [--workers <n>]
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
//! | `redis` | `IdempotencyLayer` on a `RedisStore` (local replay tier on) |
//! | `redis-nolocal` | the same with the local replay tier off |
//! | `peer` | axum-idempotent 0.6 in direct-key mode, in a ruts 0.13 Redis session (plus `POST /login`) |
//! | `floor` | hand-written: reserve = 1 `EVALSHA`, complete = 1 `EVALSHA`, replay = 1 `EVALSHA` |
//!
//! All layers are attached per route (`post(h).route_layer(..)`, or `.layer(..)` for
//! the peer, as its README and `bench/peer` do), keys are required, responses are kept
//! for [`TTL_SECS`]. The server listens on 127.0.0.1 only and stops on SIGTERM or
//! Ctrl-C, printing its counters as one JSON line on stderr.

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

const USAGE: &str = "usage: bench-http --variant <bare|memory|redis|redis-nolocal|peer|floor> \
--port <port> [--redis-url <url>] [--workers <n>]";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Bare,
    Memory,
    Redis,
    RedisNoLocal,
    Peer,
    Floor,
}

impl Variant {
    const ALL: [(&'static str, Variant); 6] = [
        ("bare", Variant::Bare),
        ("memory", Variant::Memory),
        ("redis", Variant::Redis),
        ("redis-nolocal", Variant::RedisNoLocal),
        ("peer", Variant::Peer),
        ("floor", Variant::Floor),
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
    workers: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut variant = None;
    let mut port = None;
    let mut redis_url = "redis://127.0.0.1:6379".to_string();
    let mut workers = std::thread::available_parallelism().map_or(2, |n| n.get());
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
            "--workers" => {
                workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?;
                if workers == 0 {
                    return Err("--workers must be at least 1".into());
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
        workers,
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
}

/// Where `GET /stats` finds the store's own round-trip counter, if there is one.
#[derive(Clone)]
struct StatsState {
    variant: Variant,
    stats: Arc<Stats>,
    store: Option<RedisStore<Client>>,
    memory: Option<MemoryStore>,
}

impl StatsState {
    fn json(&self) -> String {
        let round_trips = self.store.as_ref().map(|s| s.round_trips());
        serde_json::json!({
            "variant": self.variant.name(),
            "handler_runs": self.stats.handler_runs.load(Ordering::Relaxed),
            "store_round_trips": round_trips.map(|r| r.total),
            "store_reserve": round_trips.map(|r| r.reserve),
            "store_complete": round_trips.map(|r| r.complete),
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

async fn serve(args: Args) -> Result<(), String> {
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
        (Variant::Floor, Some(client)) => {
            let floor = Floor::new(client, prefix, stats.clone()).await?;
            Router::new().route(
                "/payments",
                payments(stats.clone())
                    .route_layer(middleware::from_fn_with_state(floor, floor_layer)),
            )
        }
        (variant, None) => return Err(format!("{} needs Redis", variant.name())),
    };

    let state = StatsState {
        variant: args.variant,
        stats,
        store: store_for_stats,
        memory: memory_for_stats,
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

async fn floor_layer(State(floor): State<Floor>, request: Request, next: Next) -> Response {
    let Some(key) = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255)
    else {
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
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, FLOOR_MAX_RESPONSE).await else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let mut stored = Vec::with_capacity(3 + body.len());
    stored.extend_from_slice(parts.status.as_str().as_bytes());
    stored.extend_from_slice(&body);
    let args = vec![Value::Bytes(stored.into()), ttl];
    if floor.eval(&floor.complete, &key, args).await.is_err() {
        return plain(StatusCode::SERVICE_UNAVAILABLE);
    }
    Response::from_parts(parts, Body::from(body))
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
