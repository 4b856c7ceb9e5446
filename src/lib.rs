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
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, http::{Request, StatusCode}, routing::post, Router};
//! use tower::ServiceExt;
//! use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = MemoryStore::default();
//! let payments = IdempotencyLayer::new(store)
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .require_key()
//!     .in_flight(InFlight::Wait(Duration::from_secs(10)))
//!     .global_scope(); // or .tenant(..) once an auth layer outside sets the caller
//!
//! let app = Router::new().route(
//!     "/payments",
//!     post(|| async { (StatusCode::CREATED, "payment 1") }).layer(payments),
//! );
//!
//! let pay = || Request::post("/payments").header("Idempotency-Key", "8e03978e").body(Body::empty());
//! let first = app.clone().oneshot(pay()?).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let retry = app.oneshot(pay()?).await?;
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # Ok(()) }
//! ```
//!
//! # Where to attach it
//!
//! Per route (`post(h).layer(layer)`) or with `Router::route_layer`, so each route has
//! its own policy; `Router::layer` works too but also wraps fallbacks and 405s. Auth goes
//! *outside* (so the tenant is known) and so does compression (so what is stored is the
//! uncompressed response).
//!
//! # Status codes
//!
//! | case | response |
//! | --- | --- |
//! | key missing, policy requires one | 400 `idempotency-key-missing` |
//! | key malformed / too long / two fields | 400 `idempotency-key-invalid` |
//! | request body unreadable | 400 `request-body-unreadable` |
//! | request body over the limit | 413 `request-body-too-large`, body drained, `Connection: close` |
//! | same key, different payload | 422 `idempotency-key-reused` |
//! | same key, in flight, `InFlight::Conflict` | 409 `request-in-flight` with `Retry-After` |
//! | same key, in flight, `InFlight::Wait(bound)` | the replay, or a run after a release; 409 past the bound |
//! | same key, completed | the stored response plus `Idempotent-Replayed: true` |
//! | store unreachable or full | 503 `store-unavailable` with `Retry-After` (or pass-through with `.fail_open()`) |
//! | response over the stored-size limit | streamed once; retries get 409 `response-not-replayable` |
//!
//! Every error the layer produces is `application/problem+json` (RFC 9457) with a stable
//! `type` URI; see [`Problem`].
//!
//! # Choosing a store
//!
//! - [`MemoryStore`] (feature `memory`, default): one process, tests, development.
//! - `RedisStore` (feature `redis`): shared by every app server, on a `fred` client, pool,
//!   Sentinel or Cluster client.
//! - Your own: implement [`Store`].
//!
//! # What is guaranteed
//!
//! At most one execution per scope while the lease holder is alive and can reach the
//! store. After a lost lease (process frozen, store unreachable past the lease) a second
//! execution is possible; the stale owner's result goes to its caller but is never stored
//! (fencing tokens).
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

pub use tower_idempotency_core::*;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use tower_idempotency_redis as redis;
