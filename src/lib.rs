//! Idempotency-Key middleware for [tower] and [axum]: POST and PATCH endpoints that are
//! safe to retry.
//!
//! A request with an `Idempotency-Key` header has its body buffered and fingerprinted
//! (blake3); its scope (tenant, method, path, key) is reserved in the store in one call;
//! the handler runs once; its status, headers and body are stored for the route's TTL;
//! retries get that response replayed with `Idempotent-Replayed: true`. Same key with
//! another payload → 422; same key while the first is still running → 409, or wait for
//! the result.
//!
//! # Quick start
//!
//! Auth runs outside and puts the caller in the request's extensions; the layer scopes
//! every key by that caller, so one tenant's key never replays another tenant's
//! response. `route_layer` wraps the route's handlers only, so a `PATCH` to this POST-only
//! route still gets its 405.
//!
//! ```
//! use std::time::Duration;
//! use axum::{extract::Request, http::StatusCode, middleware::{self, Next}};
//! use axum::{response::Response, routing::post, Router};
//! use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore};
//!
//! /// What your auth layer knows about the caller.
//! #[derive(Clone)]
//! struct Claims { sub: String }
//!
//! async fn auth(mut request: Request, next: Next) -> Result<Response, StatusCode> {
//!     let sub = request.headers().get("authorization")
//!         .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer ").map(str::to_owned))
//!         .ok_or(StatusCode::UNAUTHORIZED)?; // a real app verifies a token here
//!     request.extensions_mut().insert(Claims { sub });
//!     Ok(next.run(request).await)
//! }
//!
//! let payments = IdempotencyLayer::new(MemoryStore::default())
//!     .tenant_from_extension_with(|claims: &Claims| &claims.sub)
//!     .require_key()
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .in_flight(InFlight::Wait(Duration::from_secs(10)));
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { (StatusCode::CREATED, "payment 1") }).route_layer(payments))
//!     .layer(middleware::from_fn(auth));
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! # use axum::body::Body;
//! # use tower::ServiceExt;
//! # let pay = |who: &str| Request::post("/payments")
//! #     .header("authorization", format!("Bearer {who}"))
//! #     .header("idempotency-key", "8e03978e")
//! #     .body(Body::empty()).unwrap();
//! let first = app.clone().oneshot(pay("alice")).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let retry = app.clone().oneshot(pay("alice")).await?;
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! let bob = app.clone().oneshot(pay("bob")).await?; // same key, another tenant
//! assert!(bob.headers().get("idempotent-replayed").is_none());
//! # let patch = Request::patch("/payments").header("authorization", "Bearer alice").body(Body::empty())?;
//! # assert_eq!(app.oneshot(patch).await?.status(), StatusCode::METHOD_NOT_ALLOWED);
//! # Ok::<_, Box<dyn std::error::Error + Send + Sync>>(()) })?;
//! # Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//! ```
//!
//! The layer must be told where the tenant comes from —
//! [`tenant_from_extension_with`](IdempotencyLayer::tenant_from_extension_with),
//! [`tenant_from_extension`](IdempotencyLayer::tenant_from_extension),
//! [`tenant`](IdempotencyLayer::tenant) — or that there is none
//! ([`global_scope`](IdempotencyLayer::global_scope), for public endpoints): a layer
//! with neither panics when it is applied, at start-up, rather than guess.
//!
//! # Where to attach it
//!
//! Per route, with `post(h).route_layer(layer)` or `Router::route_layer`, so each route has
//! its own policy. (`.layer(..)` works too, but also wraps the 405 answer for other
//! methods and, on a `Router`, the fallback.) Auth goes *outside* (so the tenant is known)
//! and so does compression (so what is stored is the uncompressed response).
//!
//! # Status codes
//!
//! | case | response |
//! | --- | --- |
//! | key missing, policy requires one | 400 `idempotency-key-missing` |
//! | key malformed / too long / two fields | 400 `idempotency-key-invalid` |
//! | request body unreadable | 400 `request-body-unreadable` |
//! | request body over the limit | 413 `request-body-too-large`, `Connection: close` (at once with `Expect: 100-continue`, else after draining the body) |
//! | same key, different payload | 422 `idempotency-key-reused` |
//! | same key, in flight, `InFlight::Conflict` | 409 `request-in-flight` with `Retry-After` |
//! | same key, in flight, `InFlight::Wait(bound)` | the replay, or a run after a release; 409 past the bound |
//! | same key, completed | the stored response plus `Idempotent-Replayed: true` |
//! | store unreachable or full | 503 `store-unavailable` with `Retry-After` (or pass-through with `.fail_open()`) |
//! | response not storable (too large, or its body failed after the status) | sent once; retries get 409 `response-not-replayable` |
//!
//! Every answer the layer produces itself is `application/problem+json` (RFC 9457) whose
//! `type` links to its section of the [`problems`] page, with what the client should do.
//! Render them in your own format with
//! [`render_rejections`](IdempotencyLayer::render_rejections).
//!
//! # Choosing a store
//!
//! - [`MemoryStore`] (feature `memory`, default): one process, tests, development.
//! - `RedisStore` (feature `redis`): shared by every app server, on a `fred` client, pool,
//!   Sentinel or Cluster client; replays answered from a local tier with no round trip.
//! - `PostgresStore` (feature `postgres`): shared by every app server on one database. In
//!   its transactional mode the record commits in the handler's own transaction: exactly
//!   once for what the handler writes to that database, with no lease window.
//! - Your own: implement [`Store`].
//!
//! # What is guaranteed
//!
//! At most one execution per scope while the lease holder is alive and can reach the
//! store. After a lost lease (process frozen, or store unreachable for more than two
//! thirds of the lease: renewals are due every third of it) a second execution is
//! possible, unless the route refuses uncertain keys ([`Uncertain::Refuse`]); the stale owner's result goes to its caller but is never stored
//! (fencing tokens). A client that hangs up cancels nothing: the rest of the work runs
//! detached, tracked in the layer's [`DetachedWork`] — wait for it at shutdown, after
//! `axum::serve(..).with_graceful_shutdown(..)` returns (see [`DetachedWork::wait`]).
//!
//! # Features
//!
//! - `memory` (default): [`MemoryStore`].
//! - `axum` (default): the scope uses axum's `OriginalUri` (nested routers) and metrics
//!   are labelled by `MatchedPath`. Without it the layer is plain tower + http.
//! - `redis`: the [`redis`] module, `RedisStore` on fred (needs Rust 1.88).
//! - `postgres`: the [`postgres`] module, `PostgresStore` on sqlx 0.9 (needs Rust 1.94).
//! - `redis-rustls`, `redis-native-tls`: `redis` with TLS for `rediss://` URLs (rustls
//!   with ring, or the platform's native TLS); `postgres-rustls`: `postgres` with TLS for
//!   `sslmode=require` (rustls with ring).
//! - `admin`: the [`admin`] module, an axum router for operators to inspect, forget and
//!   resolve one key (mounted behind your admin auth; every action audited).
//! - `utoipa`: the [`openapi`] module, which documents a covered route in a utoipa 6
//!   `OpenApi` (needs Rust 1.88).
//!
//! [tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// What an application uses sits at the top; what only a store implementer (or an
// operator's tool talking to a store directly) needs lives in `store`, as
// tower-sessions keeps its store traits apart from the session layer.
#[doc(inline)]
pub use tower_idempotency_core::{
    BoxError, BoxStore, DetachedWork, DisplayChain, Idempotency, IdempotencyKey, IdempotencyLayer,
    InFlight, KeyError, Policy, PolicyError, Problem, Rejection, RequestBody, ResponseBody,
    ResponseFuture, Store, Uncertain, Unfinished, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED,
};

pub mod store {
    //! What a store implementer needs: the [`Store`] trait's arguments and answers, and
    //! the scope an operator's tool builds to [`inspect`](Store::inspect),
    //! [`forget`](Store::forget) or [`resolve`](Store::resolve) one key.
    //!
    //! An application picks a store and hands it to
    //! [`IdempotencyLayer::new`](crate::IdempotencyLayer::new); it needs nothing from here
    //! unless it implements [`Store`] itself or calls a store's methods directly.
    //!
    //! ```
    //! # #[cfg(feature = "memory")]
    //! # #[tokio::main(flavor = "current_thread")]
    //! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    //! use axum::http::Method;
    //! use tower_idempotency::store::{KeyState, ScopeHash};
    //! use tower_idempotency::{MemoryStore, Store};
    //!
    //! let store = MemoryStore::default();
    //! // The scope the layer would use for alice's key on `POST /payments`.
    //! let scope = ScopeHash::for_key(Some(b"alice"), &Method::POST, "/payments", "8e03978e")?;
    //! assert_eq!(store.inspect(&scope).await?, KeyState::Absent);
    //! # Ok(()) }
    //! # #[cfg(not(feature = "memory"))] fn main() {}
    //! ```

    #[doc(inline)]
    pub use tower_idempotency_core::record::MAX_BODY_LEN;
    #[doc(inline)]
    pub use tower_idempotency_core::{
        BoxSubscription, Completion, DecodeError, FencingToken, Fingerprint, KeyState, LeaseTerms,
        Record, Reservation, Resolved, ScopeHash, Store, StoreError, StorePolicy, StoredResponse,
        Subscription,
    };

    #[cfg(feature = "memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
    #[doc(inline)]
    pub use tower_idempotency_core::memory::MemorySubscription;
}

#[doc(inline)]
pub use tower_idempotency_core::policy::{DEFAULT_LEASE, MAX_TTL};

/// What each problem `type` means and what the client should do; the layer's `type`
/// URIs link to the sections of this page.
#[doc(inline)]
pub use tower_idempotency_core::problems;

/// Every metric the layer and the stores record: name, type, unit, labels, meaning and a
/// PromQL query for each, and [`describe`](metrics::describe) for exporters' help text.
#[doc(inline)]
pub use tower_idempotency_core::metrics;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
#[doc(inline)]
pub use tower_idempotency_core::memory::{
    MemoryStore, MemoryStoreBuilder, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, ENTRY_OVERHEAD_BYTES,
};

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
#[doc(inline)]
pub use tower_idempotency_core::admin;
/// OpenAPI documentation of a covered route in one call: the key parameter, the layer's
/// problem responses and `Idempotent-Replayed`, read from the layer's policy.
#[cfg(feature = "utoipa")]
#[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
#[doc(inline)]
pub use tower_idempotency_core::openapi;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use tower_idempotency_postgres as postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use tower_idempotency_redis as redis;
