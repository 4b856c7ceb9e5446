//! Per-route policy: which requests are covered, how long records live, what is stored.
//!
//! A [`Policy`] is built through the builder methods of
//! [`IdempotencyLayer`](crate::IdempotencyLayer); each method documents its default.
//! Setters never panic: the whole policy is checked once, when the layer is applied to a
//! service ([`Policy::validate`]), and a policy that cannot keep its promises stops the
//! application at start-up with a message that names the fix.
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
//! assert!(layer.policy().validate().is_ok());
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};

use crate::key::IDEMPOTENCY_KEY;
use crate::problems::{Renderer, PROBLEM_TYPE_BASE};
use crate::record::MAX_BODY_LEN;

/// The longest TTL (and lease) a policy accepts: ten years. Far beyond any retry window,
/// and small enough that every store can add it to its clock without overflow.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The lease when none is set (and the TTL is not shorter).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// `x-request-id`: names one HTTP request, not the operation a key names, so by default
/// it is never stored and a replay carries the retry's own id (set by tower-http's
/// `PropagateRequestIdLayer` outside the idempotency layer).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The response headers a policy denies unless told otherwise
/// ([`IdempotencyLayer::allow_replay_headers`](crate::IdempotencyLayer::allow_replay_headers)):
/// [`X_REQUEST_ID`]. They are never stored; a replay takes them from the live response
/// path (the layers outside this one), as a fresh request would.
pub const DEFAULT_DENIED_REPLAY_HEADERS: [HeaderName; 1] = [X_REQUEST_ID];

/// What a request does when its key is in flight elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlight {
    /// Answer 409 `request-in-flight` with `Retry-After` at once (the default).
    Conflict,
    /// Wait up to the bound for the first request: replay its result, or after a release
    /// try to reserve again (one waiter becomes the owner); 409 when the bound passes.
    /// Any bound is accepted (`Duration::MAX` waits as long as a clock can count).
    Wait(Duration),
}

/// What the next request with a key gets when the key's first request lost its lease
/// before it recorded an answer (its server crashed, froze, or could not reach the store
/// for most of the lease), so that the operation may or may not have happened (SPEC
/// section 11). A store whose record commits with the handler's own writes
/// (transactional Postgres) has no such case: a lost owner's work is rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Uncertain {
    /// Run the handler again (the default): right when running twice is harmless, or
    /// when the handler itself can tell it already ran (e.g. it passes the key on to a
    /// payment provider that deduplicates).
    #[default]
    RunAgain,
    /// Answer 409 `operation-uncertain` until an operator resolves the key (with the
    /// answer that really happened) or forgets it (so the next request runs): for money
    /// movements and other external effects that must not happen twice. The lapsed
    /// record is kept for the route's TTL.
    Refuse,
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

/// Whether `headers` say the response is a server-sent event stream: its `Content-Type`
/// is `text/event-stream` (any case, any parameters). The default of
/// [`IdempotencyLayer::stream_when`](crate::IdempotencyLayer::stream_when), for predicates
/// that add to it.
///
/// ```
/// use http::{header, HeaderMap, HeaderValue};
/// use tower_idempotency_core::policy::is_event_stream;
///
/// let mut headers = HeaderMap::new();
/// assert!(!is_event_stream(&headers));
/// headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("Text/Event-Stream; charset=utf-8"));
/// assert!(is_event_stream(&headers));
/// headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-streams"));
/// assert!(!is_event_stream(&headers));
/// ```
pub fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .map(|value| {
            let value = value.as_bytes();
            let essence = value
                .iter()
                .position(|&b| b == b';')
                .map_or(value, |end| &value[..end]);
            essence
                .trim_ascii()
                .eq_ignore_ascii_case(b"text/event-stream")
        })
        .unwrap_or(false)
}

/// Decides from the response head whether a response is streamed instead of stored
/// ([`IdempotencyLayer::stream_when`](crate::IdempotencyLayer::stream_when)).
pub(crate) type StreamPredicate = Arc<dyn Fn(&http::response::Parts) -> bool + Send + Sync>;

/// Gives the payload that stands for a request's fingerprinted headers and body
/// ([`IdempotencyLayer::fingerprint_body_with`](crate::IdempotencyLayer::fingerprint_body_with)).
pub(crate) type FingerprintBody = Arc<dyn Fn(&Parts, &[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// Resolves the tenant of a request from its parts (headers, extensions set by auth), as
/// the bytes that go into the scope hash: borrowed from the request where possible.
pub(crate) type TenantResolver =
    Arc<dyn for<'a> Fn(&'a Parts) -> Option<Cow<'a, [u8]>> + Send + Sync>;

/// Where the tenant part of the scope comes from.
#[derive(Clone)]
pub(crate) enum Tenant {
    /// Nothing configured: the layer refuses to be applied (SPEC section 4).
    Unset,
    /// `.global_scope()`: one scope for every caller, chosen explicitly.
    Global,
    /// A resolver; a request for which it finds none gets 500 `scope-not-configured`.
    Resolver(TenantResolver),
}

/// How the lease is renewed while the owner works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Every third of the lease (the default).
    Derived,
    /// Every given interval, set with `.renew_every(..)`.
    Every(Duration),
    /// Never (`.no_renewal()`).
    Off,
}

/// The methods a policy may cover.
pub(crate) const COVERABLE: [Method; 4] =
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];

/// Why a [`Policy`] cannot be applied. Each message names the fix; applying a layer with
/// an invalid policy panics with it, at start-up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Neither a tenant source nor `.global_scope()` was configured.
    #[error(
        "tower-idempotency: this layer was not told where the tenant comes from; call \
         `.tenant(|parts| ..)`, `.tenant_from_extension::<T>()` (or \
         `.tenant_from_extension_with(|ext: &T| ..)`) to scope keys per caller, or \
         `.global_scope()` if every caller shares one scope (SPEC section 4: the layer \
         refuses to guess, e.g. from `Authorization`, which misses `X-Api-Key` APIs)"
    )]
    TenantNotConfigured,
    /// The TTL is shorter than an explicitly set lease.
    #[error(
        "tower-idempotency: the TTL ({ttl:?}) is shorter than the lease ({lease:?}): a \
         record must outlive the reservation it completes; raise `.ttl(..)` or lower \
         `.lease(..)`"
    )]
    TtlShorterThanLease {
        /// The TTL set.
        ttl: Duration,
        /// The lease set.
        lease: Duration,
    },
    /// A duration is zero or longer than [`MAX_TTL`].
    #[error("tower-idempotency: `.{setting}({value:?})` must be positive and at most MAX_TTL (ten years)")]
    DurationOutOfRange {
        /// The builder method.
        setting: &'static str,
        /// The value given.
        value: Duration,
    },
    /// The renewal interval is longer than a third of the lease.
    #[error(
        "tower-idempotency: `.renew_every({every:?})` must be positive and at most a third of \
         the lease ({lease:?}), so one failed renewal never loses the lease; lower it, raise \
         `.lease(..)`, or leave it unset (a third of the lease)"
    )]
    RenewalTooSlow {
        /// The interval set.
        every: Duration,
        /// The lease.
        lease: Duration,
    },
    /// A method that cannot be covered was given to `.methods(..)`.
    #[error(
        "tower-idempotency: `.methods(..)` can cover only POST, PUT, PATCH and DELETE, not \
         {0}: safe methods need no idempotency key"
    )]
    UncoverableMethod(Method),
    /// `.max_stored_response(..)` is larger than a record can hold.
    #[error(
        "tower-idempotency: `.max_stored_response({0})` is larger than a stored record can \
         hold ({MAX_BODY_LEN} bytes); lower it"
    )]
    StoredResponseTooLarge(usize),
}

/// The configuration of one [`IdempotencyLayer`](crate::IdempotencyLayer). Read it with
/// [`IdempotencyLayer::policy`](crate::IdempotencyLayer::policy); see the
/// [module docs](crate::policy) for an example.
#[derive(Clone)]
pub struct Policy {
    pub(crate) ttl: Duration,
    /// `None`: the default lease, lowered to the TTL if that is shorter.
    pub(crate) lease: Option<Duration>,
    pub(crate) renewal: Renewal,
    /// Bit `i` set: `COVERABLE[i]` is covered.
    pub(crate) methods: u8,
    /// A method `.methods(..)` could not cover, reported by [`Policy::validate`].
    pub(crate) uncoverable: Option<Method>,
    pub(crate) require_key: bool,
    pub(crate) max_body: usize,
    pub(crate) drain_bytes: usize,
    pub(crate) drain_time: Duration,
    pub(crate) max_stored_response: usize,
    pub(crate) fingerprint_headers: Arc<[HeaderName]>,
    pub(crate) fingerprint_body: Option<FingerprintBody>,
    pub(crate) store_when: StorePolicy,
    pub(crate) in_flight: InFlight,
    pub(crate) uncertain: Uncertain,
    pub(crate) fail_open: bool,
    pub(crate) header: HeaderName,
    pub(crate) tenant: Tenant,
    pub(crate) deny_replay_headers: Arc<[HeaderName]>,
    /// `None`: [`is_event_stream`].
    pub(crate) stream_when: Option<StreamPredicate>,
    pub(crate) complete_retry: Duration,
    pub(crate) retry_after: Duration,
    pub(crate) problem_type_base: Arc<str>,
    pub(crate) render_rejection: Option<Renderer>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            ttl: Duration::from_secs(24 * 3600),
            lease: None,
            renewal: Renewal::Derived,
            methods: 0b0101, // POST, PATCH
            uncoverable: None,
            require_key: false,
            max_body: 1024 * 1024,
            drain_bytes: 64 * 1024 * 1024,
            drain_time: Duration::from_secs(5),
            max_stored_response: 4 * 1024 * 1024,
            fingerprint_headers: Arc::new([http::header::CONTENT_TYPE]),
            fingerprint_body: None,
            store_when: StorePolicy::Successes,
            in_flight: InFlight::Conflict,
            uncertain: Uncertain::RunAgain,
            fail_open: false,
            header: IDEMPOTENCY_KEY,
            tenant: Tenant::Unset,
            deny_replay_headers: Arc::new(DEFAULT_DENIED_REPLAY_HEADERS),
            stream_when: None,
            complete_retry: Duration::from_secs(60),
            retry_after: Duration::from_secs(1),
            problem_type_base: Arc::from(PROBLEM_TYPE_BASE),
            render_rejection: None,
        }
    }
}

impl Policy {
    /// How long a completed record is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long one reservation lasts without renewal: the lease set, else
    /// [`DEFAULT_LEASE`] or the TTL, whichever is shorter.
    pub fn lease(&self) -> Duration {
        self.lease.unwrap_or(DEFAULT_LEASE.min(self.ttl))
    }

    /// How often the lease is renewed while the owner works (a third of the lease unless
    /// set); `None` when renewal is off.
    pub fn renew_every(&self) -> Option<Duration> {
        match self.renewal {
            Renewal::Derived => Some(self.lease() / 3),
            Renewal::Every(every) => Some(every),
            Renewal::Off => None,
        }
    }

    /// Whether requests with `method` are covered.
    pub fn covers(&self, method: &Method) -> bool {
        COVERABLE
            .iter()
            .position(|m| m == method)
            .is_some_and(|i| self.methods & (1 << i) != 0)
    }

    /// Whether a request without a key is refused.
    pub fn require_key(&self) -> bool {
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
    pub fn in_flight(&self) -> InFlight {
        self.in_flight
    }

    /// What the next request gets when a key's lease lapsed before it completed.
    pub fn uncertain(&self) -> Uncertain {
        self.uncertain
    }

    /// The terms of each reservation: the lease, and, when the route refuses uncertain
    /// keys, a lapsed lease kept for the TTL.
    pub(crate) fn lease_terms(&self) -> crate::store::LeaseTerms {
        let terms = crate::store::LeaseTerms::new(self.lease());
        match self.uncertain {
            Uncertain::RunAgain => terms,
            Uncertain::Refuse => terms.keep_lapsed(self.ttl),
        }
    }

    /// Which responses are stored.
    pub fn store_when(&self) -> &StorePolicy {
        &self.store_when
    }

    /// Whether requests pass through when the store is unavailable.
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// The header carrying the key.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The response headers this policy never stores or replays, on top of those always
    /// dropped (hop-by-hop, `Content-Length`, `Set-Cookie`, `Date`). Default
    /// [`DEFAULT_DENIED_REPLAY_HEADERS`] (`x-request-id`).
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// use tower_idempotency_core::policy::X_REQUEST_ID;
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).global_scope();
    /// assert_eq!(layer.policy().denied_replay_headers(), [X_REQUEST_ID]);
    /// let trace = HeaderName::from_static("x-trace-id");
    /// let layer = layer.deny_replay_headers([trace.clone()]).allow_replay_headers([X_REQUEST_ID]);
    /// assert_eq!(layer.policy().denied_replay_headers(), [trace]);
    /// ```
    pub fn denied_replay_headers(&self) -> &[HeaderName] {
        &self.deny_replay_headers
    }

    /// Whether a response with this head is streamed to the first caller unbuffered and
    /// never stored (retries get 409 `response-not-replayable`): by default, a
    /// `text/event-stream` ([`is_event_stream`]); else what
    /// [`IdempotencyLayer::stream_when`](crate::IdempotencyLayer::stream_when) set.
    ///
    /// ```
    /// use http::{header, Response};
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).global_scope();
    /// let sse = Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(())?;
    /// assert!(layer.policy().streams(&sse.into_parts().0));
    /// # Ok::<(), http::Error>(())
    /// ```
    pub fn streams(&self, head: &http::response::Parts) -> bool {
        match &self.stream_when {
            None => is_event_stream(&head.headers),
            Some(predicate) => predicate(head),
        }
    }

    /// How long storing a completed record is retried while the store fails.
    pub fn complete_retry(&self) -> Duration {
        self.complete_retry
    }

    /// Checks that the policy can keep its promises. Applying a layer runs this and
    /// panics with the error, whose message names the fix.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore, PolicyError};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default());
    /// assert_eq!(layer.policy().validate(), Err(PolicyError::TenantNotConfigured));
    /// let layer = layer.global_scope().renew_every(Duration::from_secs(20));
    /// assert!(matches!(layer.policy().validate(), Err(PolicyError::RenewalTooSlow { .. })));
    /// ```
    pub fn validate(&self) -> Result<(), PolicyError> {
        if matches!(self.tenant, Tenant::Unset) {
            return Err(PolicyError::TenantNotConfigured);
        }
        if let Some(method) = &self.uncoverable {
            return Err(PolicyError::UncoverableMethod(method.clone()));
        }
        let in_range = |d: Duration| !d.is_zero() && d <= MAX_TTL;
        let lease = self.lease();
        for (setting, value) in [("ttl", self.ttl), ("lease", lease)] {
            if !in_range(value) {
                return Err(PolicyError::DurationOutOfRange { setting, value });
            }
        }
        if self.ttl < lease {
            return Err(PolicyError::TtlShorterThanLease {
                ttl: self.ttl,
                lease,
            });
        }
        if let Renewal::Every(every) = self.renewal {
            if every.is_zero() || every > lease / 3 {
                return Err(PolicyError::RenewalTooSlow { every, lease });
            }
        }
        if self.max_stored_response > MAX_BODY_LEN {
            return Err(PolicyError::StoredResponseTooLarge(
                self.max_stored_response,
            ));
        }
        Ok(())
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
            .field("lease", &self.lease())
            .field("renew_every", &self.renew_every())
            .field("methods", &methods)
            .field("require_key", &self.require_key)
            .field("max_body", &self.max_body)
            .field("max_stored_response", &self.max_stored_response)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("fingerprint_body", &self.fingerprint_body.is_some())
            .field("store_when", &self.store_when)
            .field("in_flight", &self.in_flight)
            .field("uncertain", &self.uncertain)
            .field("fail_open", &self.fail_open)
            .field("header", &self.header)
            .field("tenant", &tenant)
            .field("deny_replay_headers", &self.deny_replay_headers)
            .field(
                "stream_when",
                &if self.stream_when.is_some() {
                    "custom"
                } else {
                    "event streams"
                },
            )
            .field("problem_type_base", &self.problem_type_base)
            .field("render_rejection", &self.render_rejection.is_some())
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

    #[test]
    fn lease_and_renewal_are_derived_until_set() {
        let mut p = Policy {
            tenant: Tenant::Global,
            ..Policy::default()
        };
        assert_eq!(p.lease(), DEFAULT_LEASE);
        assert_eq!(p.renew_every(), Some(Duration::from_secs(10)));
        // A TTL shorter than the default lease lowers it (and its renewal).
        p.ttl = Duration::from_secs(6);
        assert_eq!(p.lease(), Duration::from_secs(6));
        assert_eq!(p.renew_every(), Some(Duration::from_secs(2)));
        assert_eq!(p.validate(), Ok(()));
        // An explicit lease longer than the TTL is refused.
        p.lease = Some(Duration::from_secs(7));
        assert!(matches!(
            p.validate(),
            Err(PolicyError::TtlShorterThanLease { .. })
        ));
    }

    #[test]
    fn every_error_names_its_fix() {
        let base = Policy {
            tenant: Tenant::Global,
            ..Policy::default()
        };
        let cases = [
            (
                Policy {
                    tenant: Tenant::Unset,
                    ..base.clone()
                },
                ".global_scope()",
            ),
            (
                Policy {
                    renewal: Renewal::Every(Duration::from_secs(11)),
                    ..base.clone()
                },
                "at most a third of the lease",
            ),
            (
                Policy {
                    lease: Some(Duration::ZERO),
                    ..base.clone()
                },
                "`.lease(0ns)` must be positive",
            ),
            (
                Policy {
                    uncoverable: Some(Method::GET),
                    ..base.clone()
                },
                "not GET",
            ),
            (
                Policy {
                    max_stored_response: usize::MAX,
                    ..base.clone()
                },
                "max_stored_response",
            ),
        ];
        for (policy, fix) in cases {
            let err = policy.validate().unwrap_err().to_string();
            assert!(err.contains(fix), "{err}");
        }
    }
}
