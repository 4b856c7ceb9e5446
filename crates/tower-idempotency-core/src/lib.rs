//! Core of [tower-idempotency]: the layer, the [`Store`] trait, records, and the
//! in-memory store.
//!
//! Most users depend on the `tower-idempotency` facade, which re-exports this crate and
//! the stores behind features. Implement [`Store`] here to add a backend.
//!
//! # Example
//!
//! ```
//! use axum::{body::Body, http::{Request, StatusCode}, routing::post, Router};
//! use tower::ServiceExt;
//! use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let layer = IdempotencyLayer::new(MemoryStore::default()).require_key().global_scope();
//! let app = Router::new().route("/payments", post(|| async { "paid" }).layer(layer));
//!
//! let request = || Request::post("/payments").header("idempotency-key", "k1").body(Body::empty());
//! let first = app.clone().oneshot(request()?).await?;
//! assert_eq!(first.status(), StatusCode::OK);
//! let retry = app.oneshot(request()?).await?;
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # Ok(()) }
//! ```
//!
//! [tower-idempotency]: https://docs.rs/tower-idempotency
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub mod admin;
pub mod body;
pub mod boxed;
mod buffer;
mod claim;
mod collect;
pub mod detach;
pub mod fingerprint;
mod future;
pub mod key;
mod layer;
mod lease;
#[cfg(feature = "local")]
#[cfg_attr(docsrs, doc(cfg(feature = "local")))]
pub mod local;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory;
pub mod metrics;
mod observe;
#[cfg(feature = "utoipa")]
#[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
pub mod openapi;
mod owner;
pub mod policy;
pub mod problems;
pub mod record;
mod replay;
mod scope;
mod service;
pub mod store;
mod token;
mod work;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use boxed::{BoxStore, BoxSubscription};
pub use detach::{DetachedWork, Unfinished};
pub use fingerprint::{Fingerprint, ScopeHash};
pub use future::ResponseFuture;
pub use key::{IdempotencyKey, KeyError, IDEMPOTENCY_KEY};
pub use layer::IdempotencyLayer;
#[cfg(feature = "memory")]
pub use memory::{MemoryStore, MemoryStoreBuilder, MemorySubscription};
pub use observe::DisplayChain;
pub use policy::{InFlight, Policy, PolicyError, StorePolicy, Uncertain};
pub use problems::{Problem, Rejection};
pub use record::{DecodeError, Record, StoredResponse};
pub use replay::IDEMPOTENT_REPLAYED;
pub use service::Idempotency;
pub use store::{
    Completion, KeyState, LeaseTerms, Reservation, Resolved, Store, StoreError, Subscription,
};
pub use token::FencingToken;
