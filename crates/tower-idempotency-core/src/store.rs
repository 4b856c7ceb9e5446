//! The [`Store`] trait: the few atomic operations every idempotency store provides.
//!
//! A store keeps one entry per scope ([`ScopeHash`]): either a *pending* lease, held by
//! the owner of a [`FencingToken`], or a *completed* [`Record`]. Each method maps onto one
//! atomic operation (one Lua script on Redis), so that of N concurrent first requests
//! exactly one is told [`Reservation::Reserved`].
//!
//! | method | pending, same token | pending, other token | completed | absent |
//! | --- | --- | --- | --- | --- |
//! | [`reserve`](Store::reserve) | `Reserved` (a re-sent reserve) | `InFlight` / `Mismatch` | `Completed` / `Mismatch` | `Reserved` |
//! | [`renew`](Store::renew) | extend lease, `true` | `false` | `true` if same token | `false` |
//! | [`complete`](Store::complete) | store record, `Stored` | `Fenced` | `Stored` if same token | `Fenced` |
//! | [`release`](Store::release) | delete, `true` | `false` | `false` | `false` |
//!
//! Stores must enforce TTLs and leases with their own clock (Redis `PEXPIRE`), never with
//! the clocks of application servers. A reserve must be idempotent under re-send: a
//! client library may send it again after a reconnect, and a reserve that timed out on
//! the caller's side may still have run, so the token that holds a pending lease is
//! answered `Reserved` again (with the same fingerprint).
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_idempotency_core::StoreError> {
//! use std::time::Duration;
//! use tower_idempotency_core::{
//!     Completion, FencingToken, Fingerprint, MemoryStore, Record, Reservation, ScopeHash, Store,
//! };
//!
//! let store = MemoryStore::default();
//! let scope = ScopeHash::from_bytes([7; 32]);
//! let fp = Fingerprint::from_bytes([1; 32]);
//! let token = FencingToken::generate();
//! let lease = Duration::from_secs(30);
//!
//! assert_eq!(store.reserve(&scope, &fp, token, lease).await?, Reservation::Reserved);
//! let again = store.reserve(&scope, &fp, FencingToken::generate(), lease).await?;
//! assert_eq!(again, Reservation::InFlight);
//! let done = store
//!     .complete(&scope, token, &Record::NotReplayable, Duration::from_secs(60))
//!     .await?;
//! assert_eq!(done, Completion::Stored);
//! # Ok(()) }
//! # #[cfg(not(feature = "memory"))] fn main() {}
//! ```

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use crate::fingerprint::{Fingerprint, ScopeHash};
use crate::record::{DecodeError, Record};
use crate::token::FencingToken;

/// The answer to [`Store::reserve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The caller's token now holds a lease on the scope: run the handler.
    Reserved,
    /// Another owner holds a live lease with the same fingerprint.
    InFlight,
    /// The scope is completed with the same fingerprint: replay this record.
    Completed(Record),
    /// The scope (pending or completed) belongs to a request with another fingerprint.
    Mismatch,
}

/// The answer to [`Store::complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The record is stored (or was already stored by this same token).
    Stored,
    /// The token no longer holds the scope (the lease expired or was taken over):
    /// nothing was written.
    Fenced,
    /// For stores whose record commits with the handler's own writes (one database
    /// transaction): the commit failed, so neither the operation nor its record exists.
    /// The layer answers 503 `store-unavailable` instead of the handler's response, and a
    /// retry with the same key runs the handler again.
    RolledBack,
}

/// An error from a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or answered with an error.
    #[error("store backend unavailable")]
    Backend(#[source] Box<dyn StdError + Send + Sync>),
    /// The store is at capacity (by entries or by bytes) and will not evict a live entry.
    #[error("store is full ({entries} of {max_entries} entries, {bytes} of {max_bytes} bytes)")]
    Full {
        /// Entries held when the reservation was refused.
        entries: usize,
        /// The configured most entries.
        max_entries: usize,
        /// Bytes counted when the reservation was refused (may exceed `max_bytes`: a
        /// completion is never refused).
        bytes: usize,
        /// The configured byte budget.
        max_bytes: usize,
    },
    /// A stored record could not be decoded.
    #[error("stored record could not be decoded")]
    Decode(#[from] DecodeError),
}

impl StoreError {
    /// Wraps any backend error.
    pub fn backend(err: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        StoreError::Backend(err.into())
    }
}

/// A store of idempotency records.
///
/// Implementations must make each method one atomic operation on the entry of `scope`.
/// See the [module docs](crate::store) for the table of outcomes, and
/// [`MemoryStore`](crate::MemoryStore) for a complete implementation.
pub trait Store: Clone + Send + Sync + 'static {
    /// What [`subscribe`](Store::subscribe) hands out.
    type Subscription: Subscription;

    /// The value of the `store` label on the metrics of calls to this store (see
    /// [`metrics`](crate::metrics)): `"memory"`, `"redis"`, `"postgres"`. The default is
    /// `"custom"`; a wrapper around another store should answer its inner store's name.
    fn name(&self) -> &'static str {
        "custom"
    }

    /// Reserves `scope` for `token` for one `lease` if it is absent; otherwise reports what
    /// is there. A completed record with the same fingerprint comes back in the same call.
    fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + Send;

    /// Extends the lease of `token` to `lease` from now. `false` means the token no longer
    /// holds the scope (the lease was lost). A completed record of the same token
    /// answers `true` and keeps its TTL.
    fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Replaces the pending lease of `token` with `record`, kept for `ttl` from now, and
    /// wakes the scope's subscribers. Calling it again with the same token after success
    /// answers [`Completion::Stored`], so a retry after a lost reply is safe.
    fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<Completion, StoreError>> + Send;

    /// Adds to the owner's request what the handler needs from the store while `token`
    /// holds the scope: e.g. the database transaction that the handler's writes and the
    /// record commit in (a store whose [`complete`](Store::complete) is that commit).
    /// Called once, after [`reserve`](Store::reserve) answered
    /// [`Reservation::Reserved`], before the handler runs. The default adds nothing.
    fn owner_extensions(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        extensions: &mut http::Extensions,
    ) {
        let _ = (scope, token, extensions);
    }

    /// Deletes the pending lease of `token` (fingerprint included) and wakes the scope's
    /// subscribers. `false` means the token did not hold the scope.
    fn release(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Starts listening for the completion or release of `scope`. The subscription is
    /// live when the future resolves, so a caller subscribes *before* re-reading the
    /// scope and loses no wake-up.
    fn subscribe(
        &self,
        scope: &ScopeHash,
    ) -> impl Future<Output = Result<Self::Subscription, StoreError>> + Send;
}

/// A live interest in one scope, from [`Store::subscribe`].
pub trait Subscription: Send + 'static {
    /// Resolves when the scope was completed or released since the subscription started
    /// or since the previous call returned. Spurious wake-ups are allowed: callers re-read
    /// the scope and poll with back-off anyway.
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
}
