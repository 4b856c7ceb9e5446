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
//! A pending record whose lease lapsed counts as absent, unless its reserve asked to keep
//! lapsed leases ([`LeaseTerms::keep_lapsed`], a route that refuses uncertain keys): then
//! it stays, with its token and fingerprint, until `keep_lapsed` passed. A reserve with the
//! same fingerprint and another token is answered [`Reservation::Uncertain`] (another
//! fingerprint: `Mismatch`), or, if it does not keep lapsed leases itself, takes the
//! record over. The token whose lease lapsed still holds it: its renew, complete and
//! release work as in the table (nobody else took it).
//!
//! Operators: [`inspect`](Store::inspect), [`forget`](Store::forget) and
//! [`resolve`](Store::resolve), with defaults that answer
//! [`StoreError::Unsupported`] for a store that does not offer them.
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
//! assert_eq!(store.reserve(&scope, &fp, token, lease.into()).await?, Reservation::Reserved);
//! let again = store.reserve(&scope, &fp, FencingToken::generate(), lease.into()).await?;
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
#[non_exhaustive]
pub enum Reservation {
    /// The caller's token now holds a lease on the scope: run the handler.
    Reserved,
    /// Another owner holds a live lease with the same fingerprint.
    InFlight,
    /// The scope is completed with the same fingerprint: replay this record.
    Completed(Record),
    /// The scope (pending or completed) belongs to a request with another fingerprint.
    Mismatch,
    /// A lease with the same fingerprint lapsed before it completed, and the reserve asked
    /// to keep lapsed leases ([`LeaseTerms::keep_lapsed`]): the operation may or may not
    /// have happened, and the scope stays so until an operator resolves or forgets it
    /// (or its owner, alive after all, completes it).
    Uncertain,
}

/// The terms of one reservation: how long its lease lasts, and what a lease that lapses
/// without completing leaves behind (SPEC section 11).
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency_core::store::LeaseTerms;
///
/// let terms = LeaseTerms::new(Duration::from_secs(30));
/// assert_eq!(terms.keep_lapsed, None);
/// let refusing = terms.keep_lapsed(Duration::from_secs(24 * 3600));
/// assert_eq!(refusing.keep_lapsed, Some(Duration::from_secs(24 * 3600)));
/// let same: LeaseTerms = Duration::from_secs(30).into();
/// assert_eq!(same, terms);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseTerms {
    /// How long the lease lasts without renewal.
    pub duration: Duration,
    /// `None`: a lease that lapses is gone, and the next request with the key runs (the
    /// default). `Some(keep)`: the store keeps the lapsed pending record for `keep` from
    /// the reservation and answers [`Reservation::Uncertain`] for it meanwhile.
    pub keep_lapsed: Option<Duration>,
}

impl LeaseTerms {
    /// A lease of `duration`; a lapsed one is not kept.
    pub const fn new(duration: Duration) -> Self {
        LeaseTerms {
            duration,
            keep_lapsed: None,
        }
    }

    /// Keeps a lapsed lease as "uncertain" for `keep` from the reservation (at least the
    /// lease itself).
    pub const fn keep_lapsed(mut self, keep: Duration) -> Self {
        self.keep_lapsed = Some(keep);
        self
    }

    /// How long the pending record lives in the store: the lease, or `keep_lapsed` if that
    /// is longer.
    pub fn record_life(&self) -> Duration {
        match self.keep_lapsed {
            Some(keep) => keep.max(self.duration),
            None => self.duration,
        }
    }
}

impl From<Duration> for LeaseTerms {
    fn from(duration: Duration) -> Self {
        LeaseTerms::new(duration)
    }
}

/// What an operator sees of one scope: the answer to [`Store::inspect`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// No record: the next request with the key runs.
    Absent,
    /// A request holds the key now. A store that cannot tell the owner or the lease left
    /// (transactional Postgres: the row is not visible until it commits) says `None`.
    InFlight {
        /// The owner's fencing token.
        owner: Option<FencingToken>,
        /// How long the lease lasts unless renewed.
        lease_remaining: Option<Duration>,
    },
    /// Completed: retries get `record` replayed (or 409 `response-not-replayable` for
    /// [`Record::NotReplayable`]).
    Completed {
        /// What retries get.
        record: Record,
        /// How long ago it was completed (or resolved), where the store knows.
        age: Option<Duration>,
        /// How long it is kept from now.
        expires_in: Duration,
    },
    /// The lease lapsed before completion and the route keeps lapsed leases: the
    /// operation may or may not have happened; the route answers 409
    /// `operation-uncertain` until the key is resolved or forgotten.
    Uncertain {
        /// The token of the owner whose lease lapsed.
        owner: FencingToken,
        /// How long ago the lease lapsed, where the store knows.
        lapsed_for: Option<Duration>,
        /// How long the uncertain record is kept from now.
        expires_in: Duration,
    },
}

/// The answer to [`Store::resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolved {
    /// The record now replays the operator's answer (for the TTL given).
    Stored,
    /// Nothing to resolve: no record for the scope (its fingerprint would be unknown).
    Absent,
    /// A live request holds the key: wait for it, or resolve after its lease lapsed.
    InFlight,
}

/// The answer to [`Store::complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The store answered, but with something this version cannot act on safely: a row
    /// or reply it never writes (a table edited by hand, another writer), or a conflict
    /// with other transactions on the key (a deadlock, the row changing under every
    /// retry). Like [`Decode`](StoreError::Decode), never a pass-through under a fail-open
    /// policy: the key may be in use. The layer answers 503.
    #[error("store answered unexpectedly")]
    Unexpected(#[source] Box<dyn StdError + Send + Sync>),
    /// The store does not offer this operation (an operator's
    /// [`inspect`](Store::inspect), [`forget`](Store::forget) or
    /// [`resolve`](Store::resolve) on a store that does not implement them).
    #[error("this store does not support {0}")]
    Unsupported(&'static str),
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
        lease: LeaseTerms,
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

    /// What the store holds for `scope`, for an operator (SPEC section 11). The default
    /// says the store does not support it ([`StoreError::Unsupported`]).
    fn inspect(
        &self,
        scope: &ScopeHash,
    ) -> impl Future<Output = Result<KeyState, StoreError>> + Send {
        let _ = scope;
        std::future::ready(Err(StoreError::Unsupported("inspect")))
    }

    /// Deletes whatever the store holds for `scope` (a completed, uncertain or pending
    /// record), so the next request with the key runs; wakes the scope's waiters. `false`:
    /// there was nothing. An owner whose pending record is forgotten can no longer
    /// complete (its result is fenced off). The default says the store does not support
    /// it.
    fn forget(&self, scope: &ScopeHash) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = scope;
        std::future::ready(Err(StoreError::Unsupported("forget")))
    }

    /// Makes `scope` replay `record` for `ttl` from now, keeping the fingerprint of the
    /// request that first used the key: an operator's decision for an uncertain key (or a
    /// correction of a completed one). Refused for an absent key and for a live lease.
    /// The default says the store does not support it.
    fn resolve(
        &self,
        scope: &ScopeHash,
        record: &Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<Resolved, StoreError>> + Send {
        let _ = (scope, record, ttl);
        std::future::ready(Err(StoreError::Unsupported("resolve")))
    }
}

/// A live interest in one scope, from [`Store::subscribe`].
pub trait Subscription: Send + 'static {
    /// Resolves when the scope was completed or released since the subscription started
    /// or since the previous call returned. Spurious wake-ups are allowed: callers re-read
    /// the scope and poll with back-off anyway.
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
}
