//! A small payments API behind `tower-idempotency`: retry a POST with the same
//! `Idempotency-Key` and the first response comes back, the handler having run once.
//!
//! # Run it
//!
//! ```text
//! cargo run --example payments                        # in-memory store, 127.0.0.1:3000
//! docker compose up -d redis
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example payments
//! docker compose up -d postgres
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example payments
//! ```
//!
//! With `DATABASE_URL`, the idempotency store is a transactional `PostgresStore`: payments,
//! orders and cancellations are rows in Postgres tables (`example_payments`,
//! `example_orders`, `example_cancellations`, created at start-up), written in the
//! idempotency transaction, so a response is stored if and only if its rows committed,
//! and they survive a restart. Webhook counts stay in memory.
//!
//! Environment (a bad value stops it at start-up with a message on stderr, exit code 2):
//!
//! | variable | default | meaning |
//! | --- | --- | --- |
//! | `BIND` | `127.0.0.1:3000` | socket address to listen on |
//! | `PAYMENTS_TTL_SECS` | `86400` | how long a `POST /payments` response is replayed |
//! | `PAYMENTS_LEASE_MS` | unset: the layer's default (30 s) | the lease of `POST /payments` (renewed every third of it); at most the TTL |
//! | `REDIS_URL` | unset: in-memory store | use the Redis store |
//! | `DATABASE_URL` | unset | use Postgres (transactional store, rows in tables); not together with `REDIS_URL` |
//! | `SHUTDOWN_GRACE_SECS` | `30` | on SIGTERM / Ctrl-C, how long to wait for work that hung-up clients left running |
//! | `EXECUTION_LOG` | unset | a file `POST /payments` appends one line to per execution (see below) |
//! | `PAYMENTS_UNCERTAIN` | `refuse` | what a `POST /payments` retry gets after the first request's server died mid-payment: `refuse` (409 `operation-uncertain` until an operator resolves or forgets the key) or `run-again` |
//! | `ADMIN_TOKEN` | unset: no admin routes | mounts the admin routes under `/admin/idempotency`, for `Authorization: Bearer <ADMIN_TOKEN>`; set but empty (or not a bearer token) is an error |
//! | `RUST_LOG` | `info` | log filter (`tracing-subscriber` env filter) |
//!
//! `EXECUTION_LOG` is for fault tests (`tests/it/nemesis.rs`), which count executions
//! from something that survives a SIGKILL: each run of the payments handler appends, in
//! one `write` to a file opened with `O_APPEND` and before it answers, the line
//! `tenant TAB idempotency-key TAB payment-id TAB pid TAB started-ms TAB finished-ms`
//! (Unix milliseconds; the key as the header carried it). Processes may share one file.
//! In Postgres mode a line is written before the transaction commits, so a run that was
//! rolled back has a line too: there the rows of `example_payments` (which record the
//! key in `idempotency_key`) are the executions.
//!
//! # Routes
//!
//! Every route needs `Authorization: Bearer <token>`; the token *is* the tenant here (a
//! real app would verify it), else 401 problem+json. The idempotency layer sits inside auth,
//! so one tenant's key never replays another tenant's response.
//!
//! | route | idempotency policy | answer |
//! | --- | --- | --- |
//! | `POST /payments` `{"amount", "currency", "delay_ms"?}` | key required, TTL 24 h (`PAYMENTS_TTL_SECS`), in flight: wait up to 10 s, uncertain: refuse (`PAYMENTS_UNCERTAIN`) | 201 payment |
//! | `GET /payments` | none | the tenant's payments, oldest first |
//! | `POST /orders` `{"item", "quantity"?, "delay_ms"?}` | key required, TTL 12 h, in flight: 409 | 201 order |
//! | `POST /orders/{id}/cancel` | as orders | 200 `{"order_id", "cancelled": true}` |
//! | `GET /orders` | none | `{"orders": [..], "cancelled": [..]}` |
//! | `POST /webhooks/{source}` (any body) | key optional, TTL 30 min | 202 `{"received": true, "source"}` |
//! | `GET /webhooks` | none | `{"total", "by_source": {..}}` deliveries |
//! | `GET /metrics` (no auth) | none | Prometheus text: the metrics of `tower_idempotency::metrics` |
//! | `GET /openapi.json` (no auth) | none | the OpenAPI 3.1 document of these routes, with what each idempotency policy does ([`openapi_document`]) |
//! | `GET`, `DELETE`, `PUT /admin/idempotency/key?..` (admin auth, only with `ADMIN_TOKEN`) | none | one key's state; forget it; resolve it (`tower_idempotency::admin`) |
//!
//! `POST /payments` refuses uncertain keys: a payment whose server died (or lost the store
//! for longer than the lease) before it recorded an answer may or may not have happened,
//! and its retries get 409 `operation-uncertain` rather than a second payment. An operator
//! finds out what happened and resolves the key with the real answer (`PUT`: the retries
//! get it), or forgets it (`DELETE`: the next retry pays). In Postgres mode a dead owner's
//! transaction rolls back with it, so no key is ever uncertain there.
//!
//! The admin routes sit outside the tenant auth, behind their own: `Authorization: Bearer
//! <ADMIN_TOKEN>` (compared in constant time), else 401. The operator the audit log names
//! is `admin-token`, the one credential there is; a real app puts the name its admin
//! login established in the `Operator` extension.
//!
//! `/metrics` is served when the Prometheus recorder could be installed at start-up (it is
//! the process's one `metrics` recorder); a real app would keep it off the public port or
//! behind its own auth. `ops/` in the repository has a Grafana dashboard and alert rules
//! for it.
//!
//! A body the handler cannot parse is a 400 problem (and releases the key, so a corrected
//! retry with the same key runs); a 422 therefore always means a reused key.
//!
//! # Try it
//!
//! ```text
//! # Pay; retry with the same key: same id, and `Idempotent-Replayed: true` on the retry.
//! curl -i localhost:3000/payments -H 'Authorization: Bearer alice' \
//!   -H 'Idempotency-Key: 7f3a9c' -H 'Content-Type: application/json' \
//!   -d '{"amount": 1000, "currency": "EUR"}'
//! # (run it again)
//!
//! # Same key, another amount: 422 idempotency-key-reused.
//! curl -i localhost:3000/payments -H 'Authorization: Bearer alice' \
//!   -H 'Idempotency-Key: 7f3a9c' -H 'Content-Type: application/json' \
//!   -d '{"amount": 2000, "currency": "EUR"}'
//!
//! # A slow payment and a concurrent retry: the retry waits, then gets the same payment.
//! for i in 1 2; do curl -s localhost:3000/payments -H 'Authorization: Bearer alice' \
//!   -H 'Idempotency-Key: slow-1' -H 'Content-Type: application/json' \
//!   -d '{"amount": 500, "currency": "EUR", "delay_ms": 3000}' & done; wait
//!
//! # One execution each: two payments.
//! curl -s localhost:3000/payments -H 'Authorization: Bearer alice'
//!
//! # Orders answer 409 request-in-flight (with Retry-After) instead of waiting.
//! curl -i localhost:3000/orders -H 'Authorization: Bearer alice' \
//!   -H 'Idempotency-Key: o-1' -H 'Content-Type: application/json' \
//!   -d '{"item": "book", "delay_ms": 3000}' & sleep 0.5
//! curl -i localhost:3000/orders -H 'Authorization: Bearer alice' \
//!   -H 'Idempotency-Key: o-1' -H 'Content-Type: application/json' \
//!   -d '{"item": "book", "delay_ms": 3000}'
//!
//! # With ADMIN_TOKEN=secret: what the store holds for alice's key, then forget it
//! # (`--url-query` needs curl 7.87; it URL-encodes each value).
//! Q='--url-query tenant=alice --url-query path=/payments --url-query key=7f3a9c'
//! curl -s localhost:3000/admin/idempotency/key $Q -H 'Authorization: Bearer secret'
//! curl -s -X DELETE localhost:3000/admin/idempotency/key $Q -H 'Authorization: Bearer secret'
//! ```
//!
//! `tests/it/example.rs` runs all of this in-process, and `tests/it/admin.rs` the admin
//! routes (the README's "Inspect, forget, resolve" walks through an uncertain payment).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path as FilePath, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{OriginalUri, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tower_idempotency::openapi::utoipa::openapi::OpenApi;
use tower_idempotency::{
    BoxStore, DetachedWork, DisplayChain, IdempotencyLayer, InFlight, MemoryStore, Policy, Store,
    Uncertain,
};
// The admin router through core, as the stores below are used directly: the example
// mounts it whatever the facade's features (an application enables the facade's `admin`
// feature and uses `tower_idempotency::admin`).
use tower_idempotency_core::admin::AdminRouter;
use tower_idempotency_postgres::sqlx::{self, postgres::PgPool, Row};
use tower_idempotency_postgres::{PostgresStore, Tx, TxGuard};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// TTL of `POST /payments` responses unless `PAYMENTS_TTL_SECS` says otherwise.
pub const PAYMENTS_TTL: Duration = Duration::from_secs(24 * 3600);
/// TTL of the order routes.
pub const ORDERS_TTL: Duration = Duration::from_secs(12 * 3600);
/// TTL of webhook deliveries.
pub const WEBHOOKS_TTL: Duration = Duration::from_secs(30 * 60);
/// How long a payment retry waits for the same key in flight before a 409.
pub const PAYMENTS_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown waits for detached work unless `SHUTDOWN_GRACE_SECS` says otherwise.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The longest `delay_ms` accepted.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// The longest `PAYMENTS_TTL_SECS` accepted (a year).
const MAX_TTL_SECS: u64 = 366 * 24 * 3600;

/// The prefix of this app's own problem `type` URIs (the layer has its own).
pub const APP_PROBLEM_BASE: &str = "https://payments.example/problems/";
/// Where the admin routes are mounted when `ADMIN_TOKEN` is set.
pub const ADMIN_MOUNT: &str = "/admin/idempotency";

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// Start-up configuration, read from the environment by [`Config::from_env`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `BIND`.
    pub bind: SocketAddr,
    /// `PAYMENTS_TTL_SECS`.
    pub payments_ttl: Duration,
    /// `PAYMENTS_LEASE_MS`: `None` is the layer's default lease.
    pub payments_lease: Option<Duration>,
    /// `REDIS_URL`: `None` is the in-memory store.
    pub redis_url: Option<String>,
    /// `DATABASE_URL`: Postgres, transactional (payments and orders are rows).
    pub database_url: Option<String>,
    /// `SHUTDOWN_GRACE_SECS`: how long shutdown waits for work that hung-up clients left
    /// running (their handlers finish and their records are stored).
    pub shutdown_grace: Duration,
    /// `EXECUTION_LOG`: the file each payment execution appends a line to.
    pub execution_log: Option<PathBuf>,
    /// `PAYMENTS_UNCERTAIN`: what `POST /payments` does with a key whose first request's
    /// lease lapsed before it recorded an answer.
    pub payments_uncertain: Uncertain,
    /// `ADMIN_TOKEN`: `Some` mounts the admin routes under [`ADMIN_MOUNT`].
    pub admin_token: Option<AdminToken>,
}

/// The bearer token of the admin routes (`ADMIN_TOKEN`). Its `Debug` does not show it, so
/// a logged `Config` never carries the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// `token`, if it is a bearer token (RFC 6750 `b64token`): anything else could never
    /// be sent in an `Authorization` header, so it is a configuration error.
    pub fn new(token: &str) -> Result<Self, String> {
        if token.trim().is_empty() {
            return Err(
                "ADMIN_TOKEN is set but empty: unset it to leave the admin routes unmounted"
                    .to_string(),
            );
        }
        if !is_b64token(token) {
            return Err(
                "ADMIN_TOKEN is not a bearer token: use letters, digits and -._~+/ \
                        (optionally ending in =)"
                    .to_string(),
            );
        }
        Ok(AdminToken(token.to_owned()))
    }

    /// Whether `given` is the token, comparing every byte whatever the first difference,
    /// so the time taken does not tell a guesser how much of a guess was right (the
    /// length is not hidden; it is not the secret).
    fn matches(&self, given: &str) -> bool {
        let (want, given) = (self.0.as_bytes(), given.as_bytes());
        let mut diff = want.len() ^ given.len();
        for (i, byte) in want.iter().enumerate() {
            diff |= usize::from(byte ^ given.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 3000)),
            payments_ttl: PAYMENTS_TTL,
            payments_lease: None,
            redis_url: None,
            database_url: None,
            shutdown_grace: SHUTDOWN_GRACE,
            execution_log: None,
            payments_uncertain: Uncertain::Refuse,
            admin_token: None,
        }
    }
}

impl Config {
    /// Reads `BIND`, `PAYMENTS_TTL_SECS`, `PAYMENTS_LEASE_MS`, `REDIS_URL`,
    /// `DATABASE_URL`, `SHUTDOWN_GRACE_SECS`, `EXECUTION_LOG`, `PAYMENTS_UNCERTAIN` and
    /// `ADMIN_TOKEN`. A bad value is an error, never a silent default.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// [`Config::from_env`] over any source of variables (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Self, String> {
        let text = |name: &str| -> Result<Option<String>, String> {
            var(name)
                .map(|v| {
                    v.into_string()
                        .map_err(|_| format!("{name} is not valid UTF-8"))
                })
                .transpose()
        };
        let mut config = Config::default();
        if let Some(bind) = text("BIND")? {
            config.bind = bind.parse().map_err(|_| {
                format!("BIND={bind:?} is not a socket address (expected e.g. 127.0.0.1:3000)")
            })?;
        }
        if let Some(ttl) = text("PAYMENTS_TTL_SECS")? {
            let secs = ttl.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
                format!("PAYMENTS_TTL_SECS={ttl:?} is not a positive integer number of seconds")
            })?;
            if secs > MAX_TTL_SECS {
                return Err(format!(
                    "PAYMENTS_TTL_SECS={secs} is more than a year ({MAX_TTL_SECS} seconds)"
                ));
            }
            config.payments_ttl = Duration::from_secs(secs);
        }
        if let Some(lease) = text("PAYMENTS_LEASE_MS")? {
            let ms = lease.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
                format!("PAYMENTS_LEASE_MS={lease:?} is not a positive integer number of milliseconds")
            })?;
            let lease = Duration::from_millis(ms);
            if lease > config.payments_ttl {
                return Err(format!(
                    "PAYMENTS_LEASE_MS={ms} is longer than the payments TTL ({} s)",
                    config.payments_ttl.as_secs()
                ));
            }
            config.payments_lease = Some(lease);
        }
        if let Some(grace) = text("SHUTDOWN_GRACE_SECS")? {
            let secs = grace
                .parse::<u64>()
                .ok()
                .filter(|s| *s <= 3600)
                .ok_or_else(|| {
                    format!(
                        "SHUTDOWN_GRACE_SECS={grace:?} is not a number of seconds from 0 to 3600"
                    )
                })?;
            config.shutdown_grace = Duration::from_secs(secs);
        }
        if let Some(path) = text("EXECUTION_LOG")? {
            if path.trim().is_empty() {
                return Err("EXECUTION_LOG is set but empty: unset it for no log".to_string());
            }
            config.execution_log = Some(PathBuf::from(path));
        }
        if let Some(uncertain) = text("PAYMENTS_UNCERTAIN")? {
            config.payments_uncertain = match uncertain.as_str() {
                "refuse" => Uncertain::Refuse,
                "run-again" => Uncertain::RunAgain,
                _ => {
                    return Err(format!(
                        "PAYMENTS_UNCERTAIN={uncertain:?} is neither `refuse` nor `run-again`"
                    ))
                }
            };
        }
        if let Some(token) = text("ADMIN_TOKEN")? {
            config.admin_token = Some(AdminToken::new(&token)?);
        }
        if let Some(url) = text("REDIS_URL")? {
            if url.trim().is_empty() {
                return Err(
                    "REDIS_URL is set but empty: unset it to use the in-memory store".to_string(),
                );
            }
            config.redis_url = Some(url);
        }
        if let Some(url) = text("DATABASE_URL")? {
            if url.trim().is_empty() {
                return Err(
                    "DATABASE_URL is set but empty: unset it to use another store".to_string(),
                );
            }
            if config.redis_url.is_some() {
                return Err("REDIS_URL and DATABASE_URL are both set: choose one store".to_string());
            }
            config.database_url = Some(url);
        }
        Ok(config)
    }
}

// ---------------------------------------------------------------------------------------
// The app
// ---------------------------------------------------------------------------------------

/// The whole API on `store`: auth outside, one idempotency policy per route inside.
pub fn app<St: Store>(store: St, config: &Config) -> Router {
    tracked_app(store, config, &DetachedWork::new())
}

/// [`app`], with the work its idempotency layers detach from hung-up requests tracked in
/// `detached` (what [`serve_until`] waits for at shutdown).
pub fn tracked_app<St: Store>(store: St, config: &Config, detached: &DetachedWork) -> Router {
    tracked_app_on(store, AppState::default(), config, detached)
}

/// [`tracked_app`] on `state`: in memory ([`AppState::default`]) or in Postgres
/// ([`AppState::postgres`], with a transactional [`PostgresStore`]).
pub fn tracked_app_on<St: Store>(
    store: St,
    state: AppState,
    config: &Config,
    detached: &DetachedWork,
) -> Router {
    // Every policy resolves the tenant from the extension the auth layer sets. Each is
    // a `route_layer`, so a PATCH to a POST-only route still gets axum's 405.
    let policy = |ttl: Duration| {
        IdempotencyLayer::new(store.clone())
            .tenant_from_extension::<Tenant>()
            .ttl(ttl)
            .track_detached_in(detached.clone())
    };
    let mut payments = policy(config.payments_ttl)
        .require_key()
        .in_flight(InFlight::Wait(PAYMENTS_WAIT))
        .uncertain(config.payments_uncertain);
    if let Some(lease) = config.payments_lease {
        payments = payments.lease(lease);
    }
    let orders = policy(ORDERS_TTL)
        .require_key()
        .in_flight(InFlight::Conflict);
    let webhooks = policy(WEBHOOKS_TTL);
    let document = openapi_document(payments.policy(), orders.policy(), webhooks.policy());

    let api = Router::new()
        .route(
            "/payments",
            post(create_payment)
                .route_layer(payments)
                .get(list_payments),
        )
        .route(
            "/orders",
            post(create_order)
                .route_layer(orders.clone())
                .get(list_orders),
        )
        .route(
            "/orders/{id}/cancel",
            post(cancel_order).route_layer(orders),
        )
        .route(
            "/webhooks/{source}",
            post(receive_webhook).route_layer(webhooks),
        )
        .route("/webhooks", get(webhook_counts))
        .layer(middleware::from_fn(auth))
        // Added after `.layer(auth)`, so outside it: the document is public.
        .route("/openapi.json", get(move || async move { Json(document) }));
    // Nested after the tenant auth was layered, so it is outside it, behind its own.
    let api = match &config.admin_token {
        None => api,
        Some(token) => {
            let admin = AdminRouter::new(store)
                .actor_from_extension::<Operator>()
                .into_router()
                .layer(middleware::from_fn_with_state(token.clone(), admin_auth));
            api.nest(ADMIN_MOUNT, admin)
        }
    };
    api.with_state(state)
}

/// Who acts on the admin routes, set by [`admin_auth`] and named in the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator(pub String);

impl AsRef<str> for Operator {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The admin routes' auth: `Authorization: Bearer <ADMIN_TOKEN>` → [`Operator`], else
/// 401 (and an audit event: a refused attempt belongs in the trail too).
async fn admin_auth(State(token): State<AdminToken>, mut request: Request, next: Next) -> Response {
    let why = match bearer_token(request.headers()) {
        Ok(given) if token.matches(given) => {
            // One shared credential: the operator it names is the credential itself.
            request
                .extensions_mut()
                .insert(Operator("admin-token".to_owned()));
            return next.run(request).await;
        }
        Ok(_) => "wrong admin token",
        Err(why) => why,
    };
    // The path as the client sent it: the nested router stripped its prefix from the URI.
    let path = match request.extensions().get::<OriginalUri>() {
        Some(original) => original.path(),
        None => request.uri().path(),
    };
    tracing::info!(
        target: "tower_idempotency::audit",
        method = %request.method(),
        path,
        reason = why,
        result = %"unauthorized",
        status = 401,
        "idempotency admin request refused"
    );
    unauthorized(why)
}

/// 401 problem+json with `WWW-Authenticate: Bearer`.
fn unauthorized(why: &str) -> Response {
    let mut response = AppError::new(StatusCode::UNAUTHORIZED, "unauthorized", why).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The caller, set by [`auth`] and read by the idempotency layer
/// (`.tenant_from_extension::<Tenant>()`) and the handlers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tenant(pub String);

impl AsRef<[u8]> for Tenant {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The outer layer: `Authorization: Bearer <token>` → [`Tenant`], else 401.
async fn auth(mut request: Request, next: Next) -> Response {
    match bearer_token(request.headers()).map(str::to_owned) {
        Ok(token) => {
            request.extensions_mut().insert(Tenant(token));
            next.run(request).await
        }
        Err(why) => unauthorized(why),
    }
}

/// The token of a single `Authorization: Bearer <token>` field (RFC 6750 `b64token`).
fn bearer_token(headers: &HeaderMap) -> Result<&str, &'static str> {
    const MALFORMED: &str = "malformed Authorization header: expected `Bearer <token>`";
    let mut fields = headers.get_all(header::AUTHORIZATION).iter();
    let value = fields
        .next()
        .ok_or("missing Authorization header: send `Authorization: Bearer <token>`")?;
    if fields.next().is_some() {
        return Err("more than one Authorization header");
    }
    let value = value.to_str().map_err(|_| MALFORMED)?;
    let (scheme, token) = value.split_once(' ').ok_or(MALFORMED)?;
    let token = token.trim_start_matches(' ');
    if scheme.eq_ignore_ascii_case("bearer") && is_b64token(token) {
        Ok(token)
    } else {
        Err(MALFORMED)
    }
}

/// RFC 6750 `b64token`: `[A-Za-z0-9-._~+/]+ *"="`.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

/// Everything the handlers did, per tenant: each entry is one execution. In memory, or
/// with [`AppState::postgres`] payments, orders and cancellations are rows in Postgres.
#[derive(Clone, Debug, Default)]
pub struct AppState {
    tenants: Arc<Mutex<HashMap<String, TenantData>>>,
    /// `Some` in Postgres mode: the pool the listing routes read from (the creating routes
    /// write through the idempotency transaction, [`Tx`]).
    db: Option<PgPool>,
    /// `EXECUTION_LOG`: each payment execution appends a line.
    execution_log: Option<ExecutionLog>,
}

/// The file behind `EXECUTION_LOG`: one line per payment execution (see the module docs),
/// each appended with a single `write` to a file opened with `O_APPEND`, so lines of
/// concurrent handlers and of several processes never interleave, and a line once
/// written survives a SIGKILL of the process (it is in the kernel's page cache; no
/// `fsync`, so not a crash of the machine).
#[derive(Clone, Debug)]
pub struct ExecutionLog(Arc<File>);

impl ExecutionLog {
    /// Opens (creates) `path` for appending.
    pub fn open(path: &FilePath) -> Result<Self, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|file| ExecutionLog(Arc::new(file)))
            .map_err(|e| format!("EXECUTION_LOG={}: cannot open it: {e}", path.display()))
    }

    /// Appends `tenant TAB key TAB id TAB pid TAB started-ms TAB finished-ms`. A small
    /// blocking write, as a log line is.
    fn append(
        &self,
        tenant: &str,
        key: &str,
        id: &str,
        started: SystemTime,
    ) -> Result<(), AppError> {
        let ms = |at: SystemTime| at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let line = format!(
            "{tenant}\t{key}\t{id}\t{}\t{}\t{}\n",
            std::process::id(),
            ms(started),
            ms(SystemTime::now())
        );
        (&*self.0).write_all(line.as_bytes()).map_err(|e| {
            tracing::error!(error = %e, "cannot append to EXECUTION_LOG");
            AppError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the execution log failed; retry with the same key",
            )
        })
    }
}

#[derive(Debug, Default)]
struct TenantData {
    payments: Vec<Payment>,
    orders: Vec<Order>,
    cancelled: Vec<String>,
    webhooks: BTreeMap<String, u64>,
}

/// The example's own tables, next to the idempotency table (`CREATE ... IF NOT EXISTS`, so
/// a restart keeps the rows). `seq` orders the listings, oldest first. A payment row
/// keeps the `Idempotency-Key` it was created with, so executions per key can be counted
/// from rows; a table from before that column gets it, and only then (an `ALTER TABLE`
/// waits for every open transaction that wrote to the table, which a restart under load
/// must not do).
const SCHEMA: &str = "\
    CREATE TABLE IF NOT EXISTS example_payments (seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE, \
        tenant text NOT NULL, amount bigint NOT NULL, currency text NOT NULL, created_at text NOT NULL, \
        idempotency_key text); \
    DO $$ BEGIN \
        IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() \
            AND table_name = 'example_payments' AND column_name = 'idempotency_key') THEN \
            ALTER TABLE example_payments ADD COLUMN IF NOT EXISTS idempotency_key text; \
        END IF; \
    END $$; \
    CREATE TABLE IF NOT EXISTS example_orders (seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE, \
        tenant text NOT NULL, item text NOT NULL, quantity bigint NOT NULL, created_at text NOT NULL); \
    CREATE TABLE IF NOT EXISTS example_cancellations (seq bigserial PRIMARY KEY, \
        tenant text NOT NULL, order_id text NOT NULL)";

impl AppState {
    /// Postgres mode on `pool`: creates the example's tables if they are missing.
    pub async fn postgres(pool: PgPool) -> Result<Self, String> {
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| format!("cannot create the example's tables: {}", DisplayChain(&e)))?;
        Ok(AppState {
            db: Some(pool),
            ..AppState::default()
        })
    }

    /// The same state, appending each payment execution to `log`.
    pub fn execution_log(mut self, log: ExecutionLog) -> Self {
        self.execution_log = Some(log);
        self
    }

    fn with<T>(&self, tenant: &Tenant, f: impl FnOnce(&mut TenantData) -> T) -> T {
        // A handler never panics while holding the lock; recover the data if one did.
        let mut tenants = self
            .tenants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(tenants.entry(tenant.0.clone()).or_default())
    }
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

/// `POST /payments` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    amount: u64,
    currency: String,
    #[serde(default)]
    delay_ms: u64,
}

/// A created payment.
#[derive(Clone, Debug, Serialize)]
pub struct Payment {
    id: String,
    amount: u64,
    currency: String,
    created_at: String,
}

async fn create_payment(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    tx: Option<Tx>,
    headers: HeaderMap,
    body: Result<Json<NewPayment>, JsonRejection>,
) -> Result<(StatusCode, Json<Payment>), AppError> {
    let started = SystemTime::now();
    // The layer requires a valid key on this route; kept as the header carried it.
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Json(new) = body?;
    if new.amount == 0 {
        return Err(AppError::invalid("`amount` must be a positive integer"));
    }
    if new.currency.len() != 3 || !new.currency.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(AppError::invalid(
            "`currency` must be a three-letter code such as EUR",
        ));
    }
    delay(new.delay_ms).await?;
    let payment = Payment {
        id: random_id("pay_")?,
        amount: new.amount,
        currency: new.currency,
        created_at: now_rfc3339(),
    };
    match &state.db {
        None => state.with(&tenant, |t| t.payments.push(payment.clone())),
        Some(_) => {
            let amount = i64::try_from(payment.amount)
                .map_err(|_| AppError::invalid("`amount` is too large"))?;
            // In the idempotency transaction: the row commits with the stored response.
            let mut conn = transaction(tx).await?;
            sqlx::query(
                "INSERT INTO example_payments (id, tenant, amount, currency, created_at, \
                 idempotency_key) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&payment.id)
            .bind(&tenant.0)
            .bind(amount)
            .bind(&payment.currency)
            .bind(&payment.created_at)
            .bind(key)
            .execute(&mut *conn)
            .await
            .map_err(AppError::database)?;
        }
    }
    if let Some(log) = &state.execution_log {
        log.append(&tenant.0, key, &payment.id, started)?;
    }
    tracing::info!(id = %payment.id, amount = payment.amount, "payment created");
    Ok((StatusCode::CREATED, Json(payment)))
}

async fn list_payments(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
) -> Result<Json<Vec<Payment>>, AppError> {
    let Some(pool) = &state.db else {
        return Ok(Json(state.with(&tenant, |t| t.payments.clone())));
    };
    let rows = sqlx::query(
        "SELECT id, amount, currency, created_at FROM example_payments \
         WHERE tenant = $1 ORDER BY seq",
    )
    .bind(&tenant.0)
    .fetch_all(pool)
    .await
    .map_err(AppError::database)?;
    let payments = rows
        .iter()
        .map(|row| {
            Ok(Payment {
                id: row.try_get("id")?,
                amount: u64::try_from(row.try_get::<i64, _>("amount")?).unwrap_or_default(),
                currency: row.try_get("currency")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(AppError::database)?;
    Ok(Json(payments))
}

/// `POST /orders` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    item: String,
    #[serde(default = "one")]
    quantity: u32,
    #[serde(default)]
    delay_ms: u64,
}

fn one() -> u32 {
    1
}

/// A created order.
#[derive(Clone, Debug, Serialize)]
pub struct Order {
    id: String,
    item: String,
    quantity: u32,
    created_at: String,
}

async fn create_order(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    tx: Option<Tx>,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<(StatusCode, Json<Order>), AppError> {
    let Json(new) = body?;
    if new.item.trim().is_empty() || new.quantity == 0 {
        return Err(AppError::invalid(
            "`item` must not be empty and `quantity` must be positive",
        ));
    }
    delay(new.delay_ms).await?;
    let order = Order {
        id: random_id("ord_")?,
        item: new.item,
        quantity: new.quantity,
        created_at: now_rfc3339(),
    };
    match &state.db {
        None => state.with(&tenant, |t| t.orders.push(order.clone())),
        Some(_) => {
            let mut conn = transaction(tx).await?;
            sqlx::query(
                "INSERT INTO example_orders (id, tenant, item, quantity, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&order.id)
            .bind(&tenant.0)
            .bind(&order.item)
            .bind(i64::from(order.quantity))
            .bind(&order.created_at)
            .execute(&mut *conn)
            .await
            .map_err(AppError::database)?;
        }
    }
    tracing::info!(id = %order.id, "order created");
    Ok((StatusCode::CREATED, Json(order)))
}

/// Records the cancellation; to keep the example about idempotency it does not look the
/// order up.
async fn cancel_order(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    tx: Option<Tx>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    match &state.db {
        None => state.with(&tenant, |t| t.cancelled.push(id.clone())),
        Some(_) => {
            let mut conn = transaction(tx).await?;
            sqlx::query("INSERT INTO example_cancellations (tenant, order_id) VALUES ($1, $2)")
                .bind(&tenant.0)
                .bind(&id)
                .execute(&mut *conn)
                .await
                .map_err(AppError::database)?;
        }
    }
    tracing::info!(order_id = %id, "order cancelled");
    Ok(Json(
        serde_json::json!({ "order_id": id, "cancelled": true }),
    ))
}

async fn list_orders(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
) -> Result<Json<serde_json::Value>, AppError> {
    let Some(pool) = &state.db else {
        return Ok(state.with(&tenant, |t| {
            Json(serde_json::json!({ "orders": t.orders, "cancelled": t.cancelled }))
        }));
    };
    let rows = sqlx::query(
        "SELECT id, item, quantity, created_at FROM example_orders WHERE tenant = $1 ORDER BY seq",
    )
    .bind(&tenant.0)
    .fetch_all(pool)
    .await
    .map_err(AppError::database)?;
    let orders = rows
        .iter()
        .map(|row| {
            Ok(Order {
                id: row.try_get("id")?,
                item: row.try_get("item")?,
                quantity: u32::try_from(row.try_get::<i64, _>("quantity")?).unwrap_or_default(),
                created_at: row.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(AppError::database)?;
    let cancelled: Vec<String> = sqlx::query_scalar(
        "SELECT order_id FROM example_cancellations WHERE tenant = $1 ORDER BY seq",
    )
    .bind(&tenant.0)
    .fetch_all(pool)
    .await
    .map_err(AppError::database)?;
    Ok(Json(
        serde_json::json!({ "orders": orders, "cancelled": cancelled }),
    ))
}

/// The request's idempotency transaction, locked for the handler's writes. Every route
/// that writes rows requires a key, so in Postgres mode it is always there.
async fn transaction(tx: Option<Tx>) -> Result<TxGuard, AppError> {
    let tx = tx.ok_or_else(|| {
        tracing::error!("Postgres mode without an idempotency transaction");
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no idempotency transaction",
        )
    })?;
    tx.lock().await.map_err(|e| {
        tracing::error!(error = %DisplayChain(&e), "idempotency transaction unusable");
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "transaction finished",
        )
    })
}

async fn receive_webhook(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    Path(source): Path<String>,
) -> (StatusCode, Json<serde_json::Value>) {
    state.with(&tenant, |t| {
        *t.webhooks.entry(source.clone()).or_default() += 1
    });
    tracing::info!(%source, "webhook received");
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "received": true, "source": source })),
    )
}

async fn webhook_counts(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
) -> Json<serde_json::Value> {
    state.with(&tenant, |t| {
        let total: u64 = t.webhooks.values().sum();
        Json(serde_json::json!({ "total": total, "by_source": t.webhooks }))
    })
}

/// Sleeps `delay_ms`, to show what a retry does while the first request runs.
async fn delay(ms: u64) -> Result<(), AppError> {
    let delay = Duration::from_millis(ms);
    if delay > MAX_DELAY {
        return Err(AppError::invalid("`delay_ms` must be at most 60000"));
    }
    tokio::time::sleep(delay).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Errors: application/problem+json
// ---------------------------------------------------------------------------------------

/// An error of the app itself, answered as RFC 9457 problem+json.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    slug: &'static str,
    detail: String,
}

impl AppError {
    fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        AppError {
            status,
            slug,
            detail: detail.into(),
        }
    }

    fn invalid(detail: impl Into<String>) -> Self {
        AppError::new(StatusCode::BAD_REQUEST, "invalid-request", detail)
    }

    /// A database error: logged, answered 500 (the idempotency layer then rolls the
    /// request's transaction back and releases the key).
    fn database(err: sqlx::Error) -> Self {
        tracing::error!(error = %DisplayChain(&err), "database error");
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the database failed; retry with the same key",
        )
    }
}

/// Any JSON rejection (syntax, shape, content type) is a 400, so a 422 from this API
/// always means a reused idempotency key.
impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        AppError::invalid(rejection.body_text())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("{APP_PROBLEM_BASE}{}", self.slug),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body.to_string(),
        )
            .into_response()
    }
}

// ---------------------------------------------------------------------------------------
// OpenAPI
// ---------------------------------------------------------------------------------------

/// The API's OpenAPI 3.1 document, served at `GET /openapi.json` (no auth): every route,
/// described minimally, and on each route behind an idempotency layer what that layer
/// does, from its policy, in one `tower_idempotency::openapi::document` call per route.
///
/// # Panics
///
/// If a covered route below has no operation in the document: a bug in this function,
/// found at start-up (and by `tests/it/openapi.rs`), never a document served without it.
pub fn openapi_document(payments: &Policy, orders: &Policy, webhooks: &Policy) -> OpenApi {
    use tower_idempotency::openapi::utoipa::openapi::{
        path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItemBuilder},
        request_body::RequestBodyBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
        ComponentsBuilder, ContentBuilder, Info, ObjectBuilder, OpenApiBuilder, PathsBuilder, Ref,
        Required, Response, Type,
    };

    let string = || ObjectBuilder::new().schema_type(Type::String);
    let integer = || {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
    };
    let json = |schema: ObjectBuilder| ContentBuilder::new().schema(Some(schema)).build();
    let object = || ObjectBuilder::new().schema_type(Type::Object);
    let app_problem = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("AppProblem")))
        .build();
    // Every route behind auth answers 401; the JSON routes answer 400 for a body they
    // cannot parse (the layer's own 400s join it).
    let operation = |summary: &str, status: &str, ok: Response| {
        OperationBuilder::new()
            .summary(Some(summary))
            .response(status, ok)
            .response(
                "401",
                Response::builder()
                    .description("No valid `Authorization: Bearer <token>`.")
                    .content("application/problem+json", app_problem.clone()),
            )
    };
    let invalid = Response::builder()
        .description("The body is not the JSON this route takes (`invalid-request`).")
        .content("application/problem+json", app_problem.clone())
        .build();
    let body = |schema: ObjectBuilder| {
        RequestBodyBuilder::new()
            .content("application/json", json(schema))
            .build()
    };
    let path_parameter = |name: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .schema(Some(string()))
            .build()
    };
    let created = |what: &str, fields: &[&str]| {
        let schema = fields
            .iter()
            .fold(object(), |o, f| o.property(*f, string()).required(*f));
        Response::builder()
            .description(format!("The {what}."))
            .content("application/json", json(schema))
            .build()
    };
    let listing = |what: &str| {
        Response::builder()
            .description(format!("The caller's {what}, oldest first."))
            .content("application/json", json(object()))
            .build()
    };
    let public = |summary: &str, media_type: &str| {
        OperationBuilder::new()
            .summary(Some(summary))
            .security(SecurityRequirement::default())
            .response(
                "200",
                Response::builder()
                    .description(summary)
                    .content(media_type, ContentBuilder::new().build()),
            )
    };

    let new_payment = object()
        .property("amount", integer())
        .property("currency", string())
        .property("delay_ms", integer().maximum(Some(60_000)))
        .required("amount")
        .required("currency");
    let new_order = object()
        .property("item", string().min_length(Some(1)))
        .property("quantity", integer().minimum(Some(1)))
        .property("delay_ms", integer().maximum(Some(60_000)))
        .required("item");
    let paths = PathsBuilder::new()
        .path(
            "/payments",
            PathItemBuilder::new()
                .operation(
                    HttpMethod::Post,
                    operation(
                        "Create a payment",
                        "201",
                        created("payment", &["id", "currency", "created_at"]),
                    )
                    .request_body(Some(body(new_payment)))
                    .response("400", invalid.clone()),
                )
                .operation(
                    HttpMethod::Get,
                    operation("List payments", "200", listing("payments")),
                )
                .build(),
        )
        .path(
            "/orders",
            PathItemBuilder::new()
                .operation(
                    HttpMethod::Post,
                    operation(
                        "Create an order",
                        "201",
                        created("order", &["id", "item", "created_at"]),
                    )
                    .request_body(Some(body(new_order)))
                    .response("400", invalid),
                )
                .operation(
                    HttpMethod::Get,
                    operation("List orders and cancellations", "200", listing("orders")),
                )
                .build(),
        )
        .path(
            "/orders/{id}/cancel",
            PathItemBuilder::new()
                .operation(
                    HttpMethod::Post,
                    operation(
                        "Cancel an order",
                        "200",
                        created("cancellation", &["order_id"]),
                    )
                    .parameter(path_parameter("id")),
                )
                .build(),
        )
        .path(
            "/webhooks/{source}",
            PathItemBuilder::new()
                .operation(
                    HttpMethod::Post,
                    operation(
                        "Receive a webhook delivery (any body)",
                        "202",
                        created("receipt", &["source"]),
                    )
                    .parameter(path_parameter("source")),
                )
                .build(),
        )
        .path(
            "/webhooks",
            PathItemBuilder::new()
                .operation(
                    HttpMethod::Get,
                    operation(
                        "Count webhook deliveries",
                        "200",
                        listing("deliveries by source"),
                    ),
                )
                .build(),
        )
        .path(
            "/metrics",
            PathItemBuilder::new()
                .operation(
                    HttpMethod::Get,
                    public(
                        "Prometheus metrics (when the recorder could be installed)",
                        "text/plain",
                    ),
                )
                .build(),
        )
        .path(
            "/openapi.json",
            PathItemBuilder::new()
                .operation(HttpMethod::Get, public("This document", "application/json"))
                .build(),
        );
    let bearer = SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "The token is the tenant (the example verifies nothing).",
            ))
            .build(),
    );
    let mut api = OpenApiBuilder::new()
        .info(Info::new(
            "tower-idempotency payments example",
            env!("CARGO_PKG_VERSION"),
        ))
        .paths(paths)
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme("bearer", bearer)
                .schema(
                    "AppProblem",
                    object()
                        .description(Some("The example's own RFC 9457 problems."))
                        .property("type", string())
                        .property("title", string())
                        .property("status", integer())
                        .property("detail", string()),
                )
                .build(),
        ))
        .security(Some([SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]))
        .build();
    let covered = [
        ("/payments", payments),
        ("/orders", orders),
        ("/orders/{id}/cancel", orders),
        ("/webhooks/{source}", webhooks),
    ];
    for (path, policy) in covered {
        if let Err(e) = tower_idempotency::openapi::document(&mut api, path, &Method::POST, policy)
        {
            panic!("payments example: cannot document POST {path}: {e}");
        }
    }
    api
}

// ---------------------------------------------------------------------------------------
// Ids and time
// ---------------------------------------------------------------------------------------

/// `prefix` + 24 random hex digits: unique across restarts, which matters once the Redis
/// store replays responses from an earlier run.
fn random_id(prefix: &str) -> Result<String, AppError> {
    let mut bytes = [0u8; 12];
    getrandom::getrandom(&mut bytes).map_err(|e| {
        tracing::error!(error = %DisplayChain(&e), "no randomness for an id");
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not generate an id",
        )
    })?;
    Ok(bytes
        .iter()
        .fold(prefix.to_owned(), |id, b| id + &format!("{b:02x}")))
}

/// Now as RFC 3339 UTC with milliseconds, e.g. `2025-05-01T12:00:00.123Z`.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `at` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

// ---------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------

/// Why the server could not start: a bad setting (exit 2) or a failure (exit 1).
#[derive(Debug)]
enum StartError {
    Config(String),
    Runtime(String),
}

#[tokio::main]
async fn main() -> ExitCode {
    match start().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(message)) => {
            eprintln!("payments: configuration error: {message}");
            ExitCode::from(2)
        }
        Err(StartError::Runtime(message)) => {
            eprintln!("payments: error: {message}");
            ExitCode::from(1)
        }
    }
}

async fn start() -> Result<(), StartError> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .map_err(|e| StartError::Config(format!("RUST_LOG is not a valid filter: {e}")))?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let metrics = install_prometheus();

    let config = Config::from_env().map_err(StartError::Config)?;
    let log = match &config.execution_log {
        Some(path) => Some(ExecutionLog::open(path).map_err(StartError::Config)?),
        None => None,
    };
    let with_log = |state: AppState| match &log {
        Some(log) => state.execution_log(log.clone()),
        None => state,
    };
    // The store is picked from the environment at run time, so it is a `BoxStore`: one
    // `IdempotencyLayer<BoxStore>` type whatever the backend, as an application that
    // reads its store from configuration would have it.
    let (store, state, kind) = if let Some(url) = &config.database_url {
        let (store, state) = postgres_store(url).await.map_err(StartError::Config)?;
        (BoxStore::new(store), state, "postgres")
    } else if let Some(url) = &config.redis_url {
        let store = redis_store(url).await.map_err(StartError::Config)?;
        (BoxStore::new(store), AppState::default(), "redis")
    } else {
        (
            BoxStore::new(MemoryStore::default()),
            AppState::default(),
            "memory",
        )
    };
    serve(store, with_log(state), kind, &config, metrics).await
}

/// For `DATABASE_URL`: a pool, the idempotency table (created if missing) behind a
/// transactional store with its default settings, and the example's own tables. An
/// invalid or unreachable URL is an error, never a silent fallback to memory.
///
/// A payment with a `delay_ms` longer than the lease (30 s) still commits: the lease
/// renewals keep its transaction alive (the handler sleeps without holding the
/// transaction's guard), and the lease does not bound a transactional completion.
pub async fn postgres_store(url: &str) -> Result<(PostgresStore, AppState), String> {
    use tower_idempotency_postgres::sqlx::postgres::PgPoolOptions;

    let pool = PgPoolOptions::new()
        .max_connections(32)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to DATABASE_URL: {}", DisplayChain(&e)))?;
    let store = PostgresStore::new(pool.clone()).transactional();
    store
        .migrate()
        .await
        .map_err(|e| format!("cannot create the idempotency table: {}", DisplayChain(&e)))?;
    let store = store.init().await.map_err(|e| {
        format!(
            "Postgres at DATABASE_URL is not usable: {}",
            DisplayChain(&e)
        )
    })?;
    if let Some(report) = store.check_report() {
        tracing::info!(%report, "postgres store ready");
    }
    let state = AppState::postgres(pool).await?;
    Ok((store, state))
}

/// The Redis store for `REDIS_URL`: connected, scripts loaded on every primary, and its
/// start-up check logged (a warning unless `maxmemory-policy` is `noeviction`). An invalid
/// or unreachable URL is an error, never a silent fallback to memory.
///
/// The example uses `tower-idempotency-redis` directly (a dev-dependency), so the one
/// command `cargo run --example payments` serves either store; an application enables
/// the facade's `redis` feature instead.
async fn redis_store(url: &str) -> Result<impl Store, String> {
    use tower_idempotency_redis::RedisStore;

    // Connects (within 5 s), loads the scripts on every primary, checks the server and
    // logs its warnings; the report is kept, so it is logged here without a second check.
    let store = RedisStore::from_url(url)
        .map_err(|e| format!("REDIS_URL={url:?} is not a Redis URL: {}", DisplayChain(&e)))?
        .prefix("payments:idem:")
        .init()
        .await
        .map_err(|e| {
            format!(
                "Redis at REDIS_URL={url:?} is not usable: {}",
                DisplayChain(&e)
            )
        })?;
    if let Some(report) = store.check_report() {
        tracing::info!(%report, "redis store ready");
    }
    Ok(store)
}

async fn serve(
    store: BoxStore,
    state: AppState,
    kind: &str,
    config: &Config,
    metrics: Option<PrometheusHandle>,
) -> Result<(), StartError> {
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|e| StartError::Runtime(format!("cannot listen on {}: {e}", config.bind)))?;
    let addr = listener.local_addr().unwrap_or(config.bind);
    tracing::info!(
        store = kind,
        payments_ttl_secs = config.payments_ttl.as_secs(),
        payments_lease_ms = config.payments_lease.map(|l| l.as_millis() as u64),
        payments_uncertain = ?config.payments_uncertain,
        admin = config.admin_token.as_ref().map(|_| ADMIN_MOUNT),
        "payments example listening on http://{addr}"
    );
    let serving = serve_until_with(
        listener,
        store,
        state,
        config.clone(),
        metrics,
        shutdown_signal(),
    );
    serving.await.map_err(StartError::Runtime)?;
    tracing::info!("shut down");
    Ok(())
}

/// Serves the API on `listener` until `shutdown` resolves, then shuts down gracefully:
/// axum finishes the requests of open connections, then the work that hung-up clients
/// left running gets up to `config.shutdown_grace` to finish (so no lease is orphaned
/// and every handler that ran has its record stored) before this returns.
pub async fn serve_until<St: Store>(
    listener: tokio::net::TcpListener,
    store: St,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    serve_until_on(listener, store, AppState::default(), config, shutdown).await
}

/// [`serve_until`] on `state` (in memory, or [`AppState::postgres`]).
pub async fn serve_until_on<St: Store>(
    listener: tokio::net::TcpListener,
    store: St,
    state: AppState,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    serve_until_with(listener, store, state, config, None, shutdown).await
}

/// [`serve_until_on`], with `GET /metrics` when `metrics` is given ([`with_metrics`]).
pub async fn serve_until_with<St: Store>(
    listener: tokio::net::TcpListener,
    store: St,
    state: AppState,
    config: Config,
    metrics: Option<PrometheusHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let detached = DetachedWork::new();
    let mut app = tracked_app_on(store, state, &config, &detached);
    if let Some(handle) = metrics {
        app = with_metrics(app, handle);
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    if !detached.is_empty() {
        tracing::info!(
            running = detached.len(),
            grace = ?config.shutdown_grace,
            "waiting for detached idempotency work"
        );
    }
    if let Err(unfinished) = detached.wait(config.shutdown_grace).await {
        tracing::warn!("{unfinished}");
    }
    Ok(())
}

/// How often the Prometheus recorder's upkeep runs (it drains histogram samples into
/// their buckets, so memory stays bounded between scrapes).
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's `metrics` recorder, with the
/// buckets the layer's histograms are meant for, and describes every metric. `None`
/// (logged) when it cannot be installed: the API then runs without `/metrics`.
fn install_prometheus() -> Option<PrometheusHandle> {
    let installed = PrometheusBuilder::new()
        .set_buckets(tower_idempotency::metrics::DURATION_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder);
    match installed {
        Ok(handle) => {
            tower_idempotency::metrics::describe();
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(METRICS_UPKEEP).await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %DisplayChain(&e), "no /metrics: the Prometheus recorder could not be installed");
            None
        }
    }
}

/// `app` plus `GET /metrics`, outside its auth layer: the Prometheus text of `handle`.
pub fn with_metrics(app: Router, handle: PrometheusHandle) -> Router {
    let metrics = Router::new().route(
        "/metrics",
        get(move || {
            let text = handle.render();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    )],
                    text,
                )
            }
        }),
    );
    app.merge(metrics)
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %DisplayChain(&e), "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %DisplayChain(&e), "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
