//! Shared set-up for the side-by-side benchmark (`benches/peer.rs`) and the round-trip /
//! semantics counter (`src/bin/roundtrips.rs`): the same handler and the same requests,
//! behind bare axum, behind tower-idempotency, and behind axum-idempotent 0.6 (which needs
//! `ruts::SessionLayer` and `tower_cookies::CookieManagerLayer` outside it).
//!
//! Both crates are configured as close to each other as the peer allows: the
//! `Idempotency-Key` header is required, responses are kept for [`TTL_SECS`], the layer is
//! attached per route. Ours uses `global_scope()` (the peer has no tenant notion; its
//! records live inside the caller's session instead).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::routing::{post, MethodRouter};
use axum::Router;
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use fred::prelude::{Builder, Client, ClientLike, Config};
use fred::types::{CustomCommand, Value};
use http_body_util::BodyExt;
use ruts::store::{SessionStore, Ttl};
use ruts::{CookieOptions, Session, SessionLayer};
use tower::ServiceExt;
use tower_cookies::CookieManagerLayer;
use tower_idempotency::{IdempotencyLayer, Store};

pub use tower_idempotency::redis::RedisStore as OurRedisStore;
pub use tower_idempotency::{InFlight, MemoryStore};
pub type PeerRedisStore = ruts::store::redis::RedisStore<Client>;
pub use ruts::store::moka::MokaStore;

/// The request body of every case (61 bytes), as in `benches/layer.rs`.
pub const BODY: &str = r#"{"amount":1250,"currency":"EUR","reference":"order-8e03978e"}"#;
/// How long both crates keep a response (and the peer's session cookie lives).
pub const TTL_SECS: u64 = 600;
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "session";
/// Our replay marker and the peer's.
pub const OUR_REPLAY_HEADER: &str = "idempotent-replayed";
pub const PEER_REPLAY_HEADER: &str = "idempotency-replayed";

/// The handler behind every case: counts its runs, optionally sleeps, answers 201 with a
/// small JSON body naming the run (so a replay can be told from a fresh run).
#[derive(Clone, Default)]
pub struct Handler {
    runs: Arc<AtomicU64>,
    delay: Duration,
}

impl Handler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_delay(delay: Duration) -> Self {
        Handler {
            runs: Arc::default(),
            delay,
        }
    }

    /// How many times the handler ran.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    fn route(&self) -> MethodRouter {
        let handler = self.clone();
        post(move |body: Bytes| {
            let handler = handler.clone();
            async move {
                let run = handler.runs.fetch_add(1, Ordering::SeqCst) + 1;
                if !handler.delay.is_zero() {
                    tokio::time::sleep(handler.delay).await;
                }
                (
                    StatusCode::CREATED,
                    [(header::CONTENT_TYPE, "application/json")],
                    format!(r#"{{"id":"pay_{run}","len":{}}}"#, body.len()),
                )
            }
        })
    }
}

/// `POST /payments` and `POST /orders`, no middleware.
pub fn bare(handler: &Handler) -> Router {
    Router::new()
        .route("/payments", handler.route())
        .route("/orders", handler.route())
}

/// Our layer as the benchmark configures it: key required, TTL [`TTL_SECS`], one global
/// scope, everything else default (in flight: 409).
pub fn our_layer<St: Store>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store)
        .ttl(Duration::from_secs(TTL_SECS))
        .require_key()
        .global_scope()
}

/// The routes with our layer on each (one policy per route, as the README advises).
pub fn ours<St: Store + Clone>(handler: &Handler, layer: IdempotencyLayer<St>) -> Router
where
    IdempotencyLayer<St>: Clone,
{
    Router::new()
        .route("/payments", handler.route().layer(layer.clone()))
        .route("/orders", handler.route().layer(layer))
}

/// The peer in "direct key" mode: the `Idempotency-Key` header is the cache key and is
/// required; responses kept for [`TTL_SECS`].
pub fn peer_options() -> IdempotentOptions {
    IdempotentOptions::default()
        .use_idempotency_key_header(Some("Idempotency-Key"), true)
        .expire_after(TTL_SECS as i64)
}

/// The routes with the peer's layer on each, plus `POST /login` (which writes a session
/// field, so the response carries a session cookie), inside the session and cookie layers.
pub fn peer<S: SessionStore>(handler: &Handler, store: Arc<S>) -> Router {
    let layer = IdempotentLayer::<S>::new(peer_options());
    let routes = Router::new()
        .route("/payments", handler.route().layer(layer.clone()))
        .route("/orders", handler.route().layer(layer));
    with_sessions(routes, store)
}

/// Bare routes inside the session and cookie layers only: what the peer's prerequisite
/// costs by itself (the handler never touches the session).
pub fn bare_sessions<S: SessionStore>(handler: &Handler, store: Arc<S>) -> Router {
    with_sessions(bare(handler), store)
}

fn with_sessions<S: SessionStore>(routes: Router, store: Arc<S>) -> Router {
    let cookies = CookieOptions::build()
        .name(SESSION_COOKIE)
        .max_age(TTL_SECS)
        .path("/");
    routes
        .route("/login", post(login::<S>))
        .layer(SessionLayer::new(store).with_cookie_options(cookies))
        .layer(CookieManagerLayer::new())
}

async fn login<S: SessionStore>(session: Session<S>) -> StatusCode {
    let ttl = Ttl::new(TTL_SECS as i64).expect("valid ttl");
    match session.set("user", &String::from("bench"), ttl, None).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `POST /login` on a session app; returns the `Cookie` header value (`session=<id>`).
pub async fn establish_session(app: &Router) -> HeaderValue {
    let request = Request::post("/login")
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::NO_CONTENT, "login failed");
    let prefix = format!("{SESSION_COOKIE}=");
    let set_cookie = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&prefix))
        .expect("session cookie");
    let pair = set_cookie.split(';').next().expect("cookie pair");
    HeaderValue::from_str(pair).expect("cookie header")
}

/// The session id inside a `session=<id>` cookie (ruts derives its Redis key from it).
pub fn session_id(cookie: &HeaderValue) -> String {
    let cookie = cookie.to_str().expect("ascii cookie");
    cookie[SESSION_COOKIE.len() + 1..].to_string()
}

/// `POST path` with the JSON body, and optionally a key and a cookie.
pub fn request(
    path: &str,
    key: Option<&str>,
    cookie: Option<&HeaderValue>,
    body: &'static str,
) -> Request<Body> {
    let mut builder = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(cookie) = cookie {
        builder = builder.header(header::COOKIE, cookie.clone());
    }
    builder.body(Body::from(body)).expect("valid request")
}

/// What came back, body read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub replayed: bool,
    pub body: Bytes,
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let replayed = [OUR_REPLAY_HEADER, PEER_REPLAY_HEADER]
        .iter()
        .any(|h| response.headers().get(*h).is_some_and(|v| v == "true"));
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        replayed,
        body,
    }
}

/// The keys one benchmark case sends.
pub enum Keys {
    /// The same key every time (replay).
    Fixed(String),
    /// A new key per request.
    Fresh { prefix: String, next: Cell<u64> },
}

impl Keys {
    pub fn fixed(key: impl Into<String>) -> Self {
        Keys::Fixed(key.into())
    }

    pub fn fresh(prefix: impl Into<String>) -> Self {
        Keys::Fresh {
            prefix: prefix.into(),
            next: Cell::new(0),
        }
    }

    fn next(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Keys::Fixed(key) => key.as_str().into(),
            Keys::Fresh { prefix, next } => {
                let n = next.get();
                next.set(n + 1);
                format!("{prefix}{n}").into()
            }
        }
    }
}

/// The session a peer case sends its cookie for. With `rotate_every`, a new session is
/// opened (outside the timed part) after that many requests: the peer keeps every
/// cached response of a session in one map that it scans on each write, so one session
/// that collects every key of the run would measure that scan, not the middleware.
pub struct Sessions {
    cookie: RefCell<HeaderValue>,
    rotate_every: Option<u64>,
    used: Cell<u64>,
    ids: RefCell<Vec<String>>,
}

impl Sessions {
    pub async fn new(app: &Router, rotate_every: Option<u64>) -> Self {
        let cookie = establish_session(app).await;
        Sessions {
            ids: RefCell::new(vec![session_id(&cookie)]),
            cookie: RefCell::new(cookie),
            rotate_every,
            used: Cell::new(0),
        }
    }

    /// Every session id opened so far (to delete them from Redis afterwards).
    pub fn ids(&self) -> Vec<String> {
        self.ids.borrow().clone()
    }
}

/// One benchmark case: an app, its keys, and (for the session apps) a session.
pub struct Case {
    pub app: Router,
    pub keys: Keys,
    pub sessions: Option<Sessions>,
    /// Replay header expected on each response (checked once before timing).
    pub expect_replay: bool,
}

impl Case {
    /// One request, body read; panics unless 2xx.
    pub async fn one(&self) {
        let key = self.keys.next();
        let cookie = self.sessions.as_ref().map(|s| s.cookie.borrow().clone());
        let response = self
            .app
            .clone()
            .oneshot(request("/payments", Some(&key), cookie.as_ref(), BODY))
            .await
            .expect("infallible");
        assert!(
            response.status().is_success(),
            "status {}",
            response.status()
        );
        let _ = response.into_body().collect().await.expect("body");
    }

    /// Untimed work between two chunks: a new session when the current one is used up.
    pub async fn between(&self) {
        if let Some(sessions) = &self.sessions {
            if let Some(every) = sessions.rotate_every {
                if sessions.used.get() >= every {
                    let cookie = establish_session(&self.app).await;
                    sessions.ids.borrow_mut().push(session_id(&cookie));
                    *sessions.cookie.borrow_mut() = cookie;
                    sessions.used.set(0);
                }
            }
        }
    }

    /// How many requests may run before the next [`between`](Self::between).
    pub fn chunk(&self) -> u64 {
        self.sessions
            .as_ref()
            .and_then(|s| s.rotate_every.map(|every| every - s.used.get().min(every)))
            .unwrap_or(CHUNK)
            .clamp(1, CHUNK)
    }

    pub fn note_used(&self, n: u64) {
        if let Some(sessions) = &self.sessions {
            sessions.used.set(sessions.used.get() + n);
        }
    }

    /// One `POST /payments` with this case's next key and its session cookie, if any.
    async fn send_one(&self) -> Reply {
        let key = self.keys.next();
        let cookie = self.sessions.as_ref().map(|s| s.cookie.borrow().clone());
        send(
            &self.app,
            request("/payments", Some(&key), cookie.as_ref(), BODY),
        )
        .await
    }

    /// Before timing: for a replay case, stores the key's response (one handler run);
    /// then sends one request and checks that it is (or is not) a replay.
    pub async fn prepare(&self) {
        if self.expect_replay {
            let reply = self.send_one().await;
            assert!(
                reply.status.is_success() && !reply.replayed,
                "seed: {reply:?}"
            );
            self.note_used(1);
        }
        self.check().await;
    }

    /// Sends one request and checks that it is (or is not) a replay.
    pub async fn check(&self) {
        let reply = self.send_one().await;
        assert!(reply.status.is_success(), "status {}", reply.status);
        assert_eq!(
            reply.replayed, self.expect_replay,
            "replay header: expected {}",
            self.expect_replay
        );
        self.note_used(1);
    }
}

/// Requests timed between two `Instant::now()` calls (and between two session rotations).
pub const CHUNK: u64 = 64;

/// A prefix no other run uses: `peer-bench:<pid>-<unix nanos>:`.
pub fn run_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("peer-bench:{}-{nanos}:", std::process::id())
}

/// `REDIS_URL`, or the local default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A connected fred client (one connection), or why not within 3 s.
pub async fn redis_client(url: &str) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| format!("{url}: {e}"))?;
    let client = Builder::from_config(config)
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(3), client.init()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(format!("cannot connect to {url}: {e}")),
        Err(_) => {
            let _ = client.quit().await;
            Err(format!("cannot connect to {url} within 3 s"))
        }
    }
}

/// Runs one command by name.
pub async fn command(client: &Client, name: &'static str, args: Vec<Value>) -> Value {
    client
        .custom(CustomCommand::new_static(name, None, false), args)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `server name version` from `INFO server` (Valkey reports `valkey_version` too).
pub async fn server_version(client: &Client) -> String {
    let info = command(client, "INFO", vec!["server".into()]).await;
    let info = info.as_string().unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    match field("valkey_version:") {
        Some(v) => format!("Valkey {v}"),
        None => format!("Redis {}", field("redis_version:").unwrap_or_default()),
    }
}

/// Whether the server knows `HEXPIRE` (Redis 7.4+, Valkey 9+), which the peer's Redis
/// store (ruts 0.13) needs for every write.
pub async fn supports_hexpire(client: &Client) -> bool {
    match command(client, "COMMAND", vec!["INFO".into(), "HEXPIRE".into()]).await {
        Value::Array(items) => items.first().is_some_and(|v| !v.is_null()),
        _ => false,
    }
}

/// Our Redis store on `client`, scripts loaded, keys under `prefix`.
pub async fn our_redis_store(client: Client, prefix: &str) -> OurRedisStore<Client> {
    OurRedisStore::new(client)
        .prefix(prefix)
        .init()
        .await
        .expect("our redis store")
}

/// The peer's Redis session store (ruts 0.13) on `client`, scripts loaded.
pub async fn peer_redis_store(client: Client) -> PeerRedisStore {
    PeerRedisStore::new(Arc::new(client))
        .await
        .expect("ruts redis store")
}

/// The peer's in-memory session store, large enough never to evict during a run.
pub fn moka_store() -> MokaStore {
    MokaStore::builder().max_capacity(1_000_000).build()
}

/// Deletes what a run left: our keys under `prefix` (SCAN + UNLINK) and the peer's
/// session hashes (ruts keys a session `{abcd}efgh…`, from its id). Never flushes
/// anything. Returns how many keys were removed.
pub async fn cleanup(client: &Client, prefix: &str, session_ids: &[String]) -> usize {
    let mut removed = 0;
    let mut cursor = "0".to_string();
    let pattern = format!("{prefix}*");
    loop {
        let reply = command(
            client,
            "SCAN",
            vec![
                cursor.as_str().into(),
                "MATCH".into(),
                pattern.as_str().into(),
                "COUNT".into(),
                1000_i64.into(),
            ],
        )
        .await;
        let Value::Array(mut parts) = reply else {
            break;
        };
        let keys = match parts.pop() {
            Some(Value::Array(keys)) => keys,
            _ => Vec::new(),
        };
        cursor = parts
            .pop()
            .and_then(|c| c.as_string())
            .unwrap_or_else(|| "0".into());
        if !keys.is_empty() {
            if let Value::Integer(n) = command(client, "UNLINK", keys).await {
                removed += n as usize;
            }
        }
        if cursor == "0" {
            break;
        }
    }
    for chunk in session_ids.chunks(500) {
        let keys = chunk
            .iter()
            .filter_map(|id| id.parse::<ruts::Id>().ok())
            .map(|id| Value::from(fred::types::Key::from(&id)))
            .collect();
        if let Value::Integer(n) = command(client, "UNLINK", keys).await {
            removed += n as usize;
        }
    }
    removed
}
