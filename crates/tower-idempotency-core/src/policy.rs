//! Per-route policy: which requests are covered, how long records live, what is stored.
//!
//! A [`Policy`] is built through the builder methods of
//! [`IdempotencyLayer`](crate::IdempotencyLayer); each method documents its default.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_idempotency_core::{IdempotencyLayer, InFlight, MemoryStore, StorePolicy};
//!
//! let layer = IdempotencyLayer::new(MemoryStore::default())
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .require_key()
//!     .in_flight(InFlight::Wait(Duration::from_secs(10)))
//!     .store_when(StorePolicy::SuccessesAndServerErrors)
//!     .global_scope();
//! assert_eq!(layer.policy().ttl(), Duration::from_secs(24 * 3600));
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};

use crate::key::IDEMPOTENCY_KEY;

/// The longest TTL (and lease) a policy accepts: ten years. Far beyond any retry window,
/// and small enough that every store can add it to its clock without overflow.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a request does when its key is in flight elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InFlight {
    /// Answer 409 `request-in-flight` with `Retry-After` at once (the default).
    Conflict,
    /// Wait up to the bound for the first request: replay its result, or after a release
    /// try to reserve again (one waiter becomes the owner); 409 when the bound passes.
    Wait(Duration),
}

/// Which completed responses are stored and replayed. Responses not stored release the key,
/// so the client may retry with the same key and run the handler again.
#[derive(Clone)]
#[non_exhaustive]
pub enum StorePolicy {
    /// 2xx and 3xx are stored; 4xx and 5xx release the key (the default).
    Successes,
    /// 2xx, 3xx and 5xx are stored (Stripe-like: a 5xx may have partly happened);
    /// 4xx releases the key.
    SuccessesAndServerErrors,
    /// Every response is stored.
    All,
    /// A predicate on the status: `true` stores.
    Custom(Arc<dyn Fn(StatusCode) -> bool + Send + Sync>),
}

impl StorePolicy {
    /// A custom predicate: `true` stores the response, `false` releases the key.
    pub fn custom(predicate: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        StorePolicy::Custom(Arc::new(predicate))
    }

    /// Whether a response with `status` is stored.
    pub fn stores(&self, status: StatusCode) -> bool {
        match self {
            StorePolicy::Successes => status.is_success() || status.is_redirection(),
            StorePolicy::SuccessesAndServerErrors => !status.is_client_error(),
            StorePolicy::All => true,
            StorePolicy::Custom(predicate) => predicate(status),
        }
    }
}

impl fmt::Debug for StorePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorePolicy::Successes => f.write_str("Successes"),
            StorePolicy::SuccessesAndServerErrors => f.write_str("SuccessesAndServerErrors"),
            StorePolicy::All => f.write_str("All"),
            StorePolicy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Resolves the tenant of a request from its parts (headers, extensions set by auth).
pub(crate) type TenantResolver = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Where the tenant part of the scope comes from.
#[derive(Clone)]
pub(crate) enum Tenant {
    /// Nothing configured: requests with `Authorization` or `Cookie` are refused (500
    /// `scope-not-configured`), so one user's response is never replayed to another.
    Unset,
    /// `.global_scope()`: one scope for every caller, chosen explicitly.
    Global,
    /// A resolver; `None` from it is refused like `Unset`.
    Resolver(TenantResolver),
}

/// The methods a policy may cover.
pub(crate) const COVERABLE: [Method; 4] =
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];

/// The configuration of one [`IdempotencyLayer`](crate::IdempotencyLayer). Read it with
/// [`IdempotencyLayer::policy`](crate::IdempotencyLayer::policy); see the
/// [module docs](crate::policy) for an example.
#[derive(Clone)]
pub struct Policy {
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) renew_every: Option<Duration>,
    /// Bit `i` set: `COVERABLE[i]` is covered.
    pub(crate) methods: u8,
    pub(crate) require_key: bool,
    pub(crate) max_body: usize,
    pub(crate) drain_bytes: usize,
    pub(crate) drain_time: Duration,
    pub(crate) max_stored_response: usize,
    pub(crate) fingerprint_headers: Arc<[HeaderName]>,
    pub(crate) store_when: StorePolicy,
    pub(crate) in_flight: InFlight,
    pub(crate) fail_open: bool,
    pub(crate) header: HeaderName,
    pub(crate) tenant: Tenant,
    pub(crate) deny_replay_headers: Arc<[HeaderName]>,
    pub(crate) complete_retry: Duration,
    pub(crate) retry_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            renew_every: Some(Duration::from_secs(10)),
            methods: 0b0101, // POST, PATCH
            require_key: false,
            max_body: 1024 * 1024,
            drain_bytes: 64 * 1024 * 1024,
            drain_time: Duration::from_secs(5),
            max_stored_response: 4 * 1024 * 1024,
            fingerprint_headers: Arc::new([http::header::CONTENT_TYPE]),
            store_when: StorePolicy::Successes,
            in_flight: InFlight::Conflict,
            fail_open: false,
            header: IDEMPOTENCY_KEY,
            tenant: Tenant::Unset,
            deny_replay_headers: Arc::new([]),
            complete_retry: Duration::from_secs(60),
            retry_after: Duration::from_secs(1),
        }
    }
}

impl Policy {
    /// How long a completed record is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long one reservation lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How often the lease is renewed while the handler runs; `None` when renewal is off.
    pub fn renew_every(&self) -> Option<Duration> {
        self.renew_every
    }

    /// Whether requests with `method` are covered.
    pub fn covers(&self, method: &Method) -> bool {
        COVERABLE
            .iter()
            .position(|m| m == method)
            .is_some_and(|i| self.methods & (1 << i) != 0)
    }

    /// Whether a request without a key is refused.
    pub fn key_required(&self) -> bool {
        self.require_key
    }

    /// The largest request body buffered, in bytes.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// The largest response body stored for replay, in bytes.
    pub fn max_stored_response(&self) -> usize {
        self.max_stored_response
    }

    /// What happens to a request whose key is in flight.
    pub fn in_flight_mode(&self) -> InFlight {
        self.in_flight
    }

    /// Which responses are stored.
    pub fn store_policy(&self) -> &StorePolicy {
        &self.store_when
    }

    /// Whether requests pass through when the store is unavailable.
    pub fn is_fail_open(&self) -> bool {
        self.fail_open
    }

    /// The header carrying the key.
    pub fn header_name(&self) -> &HeaderName {
        &self.header
    }

    pub(crate) fn check_ttl_and_lease(&self) {
        assert!(
            self.ttl >= self.lease,
            "tower-idempotency: the TTL ({:?}) must not be shorter than the lease ({:?})",
            self.ttl,
            self.lease
        );
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let methods: Vec<&str> = COVERABLE
            .iter()
            .filter(|m| self.covers(m))
            .map(Method::as_str)
            .collect();
        let tenant = match self.tenant {
            Tenant::Unset => "unset",
            Tenant::Global => "global",
            Tenant::Resolver(_) => "resolver",
        };
        f.debug_struct("Policy")
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("renew_every", &self.renew_every)
            .field("methods", &methods)
            .field("require_key", &self.require_key)
            .field("max_body", &self.max_body)
            .field("max_stored_response", &self.max_stored_response)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("store_when", &self.store_when)
            .field("in_flight", &self.in_flight)
            .field("fail_open", &self.fail_open)
            .field("header", &self.header)
            .field("tenant", &tenant)
            .field("deny_replay_headers", &self.deny_replay_headers)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let s = StatusCode::from_u16;
        let ok = |p: &StorePolicy, code| p.stores(s(code).unwrap());
        assert!(ok(&StorePolicy::Successes, 201) && ok(&StorePolicy::Successes, 303));
        assert!(!ok(&StorePolicy::Successes, 400) && !ok(&StorePolicy::Successes, 500));
        assert!(ok(&StorePolicy::SuccessesAndServerErrors, 500));
        assert!(!ok(&StorePolicy::SuccessesAndServerErrors, 422));
        assert!(ok(&StorePolicy::All, 404));
        assert!(ok(&StorePolicy::custom(|s| s == StatusCode::CONFLICT), 409));
    }

    #[test]
    fn default_covers_post_and_patch_only() {
        let p = Policy::default();
        assert!(p.covers(&Method::POST) && p.covers(&Method::PATCH));
        assert!(!p.covers(&Method::PUT) && !p.covers(&Method::DELETE) && !p.covers(&Method::GET));
    }
}
