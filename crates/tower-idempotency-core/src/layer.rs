//! [`IdempotencyLayer`]: applies [`Idempotency`] to a service, with the policy's builder.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use tower::Layer;

use crate::observe::Meters;
use crate::policy::{InFlight, Policy, StorePolicy, Tenant, COVERABLE};
use crate::service::Idempotency;
use crate::store::Store;

/// Layer that applies [`Idempotency`], which runs a request once per idempotency key and
/// replays its response to retries.
///
/// Each builder method documents its default. Config is shared by every clone in an
/// `Arc`, so a per-route clone is cheap. See the [crate docs](crate) for an example.
#[derive(Clone, Debug)]
pub struct IdempotencyLayer<St> {
    pub(crate) store: St,
    pub(crate) policy: Arc<Policy>,
    /// Metric handles, shared by every service this layer makes.
    pub(crate) meters: Arc<Meters>,
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer on `store` with the default policy (SPEC section 8): TTL 24 h, lease 30 s
    /// renewed every 10 s, POST and PATCH, key optional, request body limit 1 MiB, stored
    /// response limit 4 MiB, in-flight `Conflict`, store `Successes`, fail closed,
    /// fingerprinted headers `Content-Type`, no tenant configured.
    pub fn new(store: St) -> Self {
        IdempotencyLayer {
            store,
            policy: Arc::new(Policy::default()),
            meters: Arc::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// The policy built so far.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn with(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        change(Arc::make_mut(&mut self.policy));
        self
    }

    /// How long a completed record is kept, counted by the store's clock from completion.
    /// Default 24 h.
    ///
    /// # Panics
    ///
    /// If `ttl` is longer than [`MAX_TTL`](crate::policy::MAX_TTL). Applying the layer
    /// panics if the TTL is shorter than the [lease](Self::lease) (checked then, so the
    /// two may be set in either order).
    pub fn ttl(self, ttl: Duration) -> Self {
        assert!(
            ttl <= crate::policy::MAX_TTL,
            "tower-idempotency: the TTL {ttl:?} is longer than MAX_TTL"
        );
        self.with(|p| p.ttl = ttl)
    }

    /// How long a reservation lasts without renewal. Default 30 s. Renewal (if on) is
    /// moved to a third of the lease when its interval is not shorter than the lease.
    ///
    /// # Panics
    ///
    /// If `lease` is zero or longer than [`MAX_TTL`](crate::policy::MAX_TTL). Applying
    /// the layer panics if the lease is longer than the [TTL](Self::ttl).
    pub fn lease(self, lease: Duration) -> Self {
        assert!(
            !lease.is_zero() && lease <= crate::policy::MAX_TTL,
            "tower-idempotency: the lease {lease:?} must be positive and at most MAX_TTL"
        );
        self.with(|p| {
            p.lease = lease;
            if let Some(every) = p.renew_every {
                if every >= lease {
                    p.renew_every = Some(lease / 3);
                }
            }
        })
    }

    /// How often the lease is renewed while the handler runs. Default 10 s.
    ///
    /// # Panics
    ///
    /// If `every` is zero or not shorter than the lease.
    pub fn renew_every(self, every: Duration) -> Self {
        self.with(|p| {
            assert!(
                !every.is_zero() && every < p.lease,
                "tower-idempotency: renewal interval {every:?} must be shorter than the lease {:?}",
                p.lease
            );
            p.renew_every = Some(every);
        })
    }

    /// Turns lease renewal off: a handler running longer than the lease may then run
    /// twice. Meant for tests of lease expiry.
    pub fn no_renewal(self) -> Self {
        self.with(|p| p.renew_every = None)
    }

    /// The methods covered; others pass through untouched. Default POST and PATCH.
    ///
    /// # Panics
    ///
    /// If a method other than POST, PUT, PATCH or DELETE is given: safe methods need no
    /// idempotency key.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let mut bits = 0u8;
        for method in methods {
            let index = COVERABLE.iter().position(|m| *m == method).unwrap_or_else(|| {
                panic!("tower-idempotency: only POST, PUT, PATCH and DELETE can be covered, not {method}")
            });
            bits |= 1 << index;
        }
        self.with(|p| p.methods = bits)
    }

    /// Refuses covered requests without a key: 400 `idempotency-key-missing`. By default
    /// they pass through.
    pub fn require_key(self) -> Self {
        self.with(|p| p.require_key = true)
    }

    /// The largest request body buffered, in bytes; larger ones get 413. Default 1 MiB.
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|p| p.max_body = bytes)
    }

    /// How much of an over-limit body is read and discarded before the 413, so the client
    /// reads the answer instead of a reset. Default 64 MiB or 5 s, whichever comes first;
    /// past it the connection is closed.
    pub fn drain(self, bytes: usize, time: Duration) -> Self {
        self.with(|p| {
            p.drain_bytes = bytes;
            p.drain_time = time;
        })
    }

    /// The largest response body stored for replay, in bytes. A larger one is streamed to
    /// the first caller and retries get 409 `response-not-replayable`. Default 4 MiB.
    pub fn max_stored_response(self, bytes: usize) -> Self {
        self.with(|p| p.max_stored_response = bytes)
    }

    /// The request headers that are part of the fingerprint. Default `Content-Type`.
    pub fn fingerprint_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names: Arc<[HeaderName]> = names.into_iter().collect();
        self.with(|p| p.fingerprint_headers = names)
    }

    /// Which responses are stored; the others release the key. Default
    /// [`StorePolicy::Successes`].
    pub fn store_when(self, policy: StorePolicy) -> Self {
        self.with(|p| p.store_when = policy)
    }

    /// What a request does while its key is in flight. Default [`InFlight::Conflict`].
    pub fn in_flight(self, mode: InFlight) -> Self {
        self.with(|p| p.in_flight = mode)
    }

    /// When the store is unavailable, pass requests through (and log) instead of
    /// answering 503. Default: fail closed.
    pub fn fail_open(self) -> Self {
        self.with(|p| p.fail_open = true)
    }

    /// When the store is unavailable, answer 503 `store-unavailable` (the default).
    pub fn fail_closed(self) -> Self {
        self.with(|p| p.fail_open = false)
    }

    /// The header carrying the key. Default `Idempotency-Key`.
    pub fn header(self, name: HeaderName) -> Self {
        self.with(|p| p.header = name)
    }

    /// Resolves the tenant from the request parts (usually an extension the auth layer
    /// set). A request for which it returns `None` gets 500 `scope-not-configured`.
    pub fn tenant<F>(self, resolve: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|p| p.tenant = Tenant::Resolver(Arc::new(resolve)))
    }

    /// Takes the tenant from a request extension of type `T`, set by an auth layer outside
    /// this one.
    pub fn tenant_from_extension<T>(self) -> Self
    where
        T: AsRef<str> + Send + Sync + 'static,
    {
        self.tenant(|parts| parts.extensions.get::<T>().map(|t| t.as_ref().to_owned()))
    }

    /// One scope for every caller, chosen explicitly (public endpoints, webhooks with a
    /// per-source key). Without a tenant or this, requests carrying `Authorization` or
    /// `Cookie` are refused with 500 `scope-not-configured`.
    pub fn global_scope(self) -> Self {
        self.with(|p| p.tenant = Tenant::Global)
    }

    /// Response headers never stored or replayed, on top of hop-by-hop headers,
    /// `Content-Length`, `Set-Cookie` and `Date`. Default none.
    pub fn deny_replay_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names: Arc<[HeaderName]> = names.into_iter().collect();
        self.with(|p| p.deny_replay_headers = names)
    }

    /// How long storing a completed record is retried while the store fails (the lease is
    /// renewed meanwhile). Default 60 s.
    pub fn complete_retry(self, bound: Duration) -> Self {
        self.with(|p| p.complete_retry = bound)
    }

    /// The `Retry-After` sent with 409 `request-in-flight` and 503, rounded to whole
    /// seconds, at least 1. Default 1 s.
    pub fn retry_after(self, after: Duration) -> Self {
        self.with(|p| p.retry_after = after)
    }

    /// Convenience for `.in_flight(InFlight::Wait(bound))`.
    pub fn wait_in_flight(self, bound: Duration) -> Self {
        self.in_flight(InFlight::Wait(bound))
    }
}

impl<S, St: Store> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    /// # Panics
    ///
    /// If the policy's TTL is shorter than its lease: a record must outlive the
    /// reservation it completes.
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_layer(inner, self)
    }
}
