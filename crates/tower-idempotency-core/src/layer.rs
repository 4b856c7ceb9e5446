//! [`IdempotencyLayer`]: applies [`Idempotency`] to a service, with the policy's builder.

use std::borrow::Cow;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use tower::Layer;

use crate::detach::DetachedWork;
use crate::observe::Meters;
use crate::policy::{
    FingerprintBody, InFlight, Policy, Renewal, StorePolicy, StreamPredicate, Tenant,
    TenantResolver, Uncertain, COVERABLE,
};
use crate::problems::{Rejection, Renderer};
use crate::service::Idempotency;
use crate::store::Store;

/// Layer that applies [`Idempotency`], which runs a request once per idempotency key and
/// replays its response to retries.
///
/// Each builder method documents its default. Setters never panic: the policy is
/// checked once, when the layer is applied ([`Policy::validate`]), and an invalid one
/// panics there with a message that names the fix. Config is shared by every clone in an
/// `Arc`, so a per-route clone is cheap. See the [crate docs](crate) for an example.
#[derive(Clone, Debug)]
#[must_use = "a layer does nothing until it is applied to a service (`.route_layer(..)`, `.layer(..)`)"]
pub struct IdempotencyLayer<St> {
    pub(crate) store: St,
    pub(crate) policy: Arc<Policy>,
    /// Metric handles, shared by every service this layer makes.
    pub(crate) meters: Arc<Meters>,
    pub(crate) detached: DetachedWork,
    /// Whether a service this layer made already warned that `max_body` refused a body
    /// axum's `DefaultBodyLimit` allows: shared, as axum may apply a layer once per
    /// request (a handler's layers are applied when the state is known).
    pub(crate) warned_body_limit: Arc<AtomicBool>,
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer on `store` with the default policy (SPEC section 8): TTL 24 h, lease 30 s
    /// renewed every 10 s, POST and PATCH, key optional, request body limit 1 MiB, stored
    /// response limit 4 MiB, in-flight `Conflict`, store `Successes`, fail closed,
    /// fingerprinted headers `Content-Type`. The tenant must be configured
    /// (`.tenant(..)`, `.tenant_from_extension::<T>()`) or `.global_scope()` chosen.
    pub fn new(store: St) -> Self {
        IdempotencyLayer {
            store,
            policy: Arc::new(Policy::default()),
            meters: Arc::default(),
            detached: DetachedWork::new(),
            warned_body_limit: Arc::default(),
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

    /// The work this layer's services detached from requests whose clients hung up
    /// (shared by every clone of the layer): wait for it at shutdown, after the server
    /// stopped. See the [`detach`](crate::detach) module.
    pub fn detached_work(&self) -> DetachedWork {
        self.detached.clone()
    }

    /// Tracks this layer's detached work in `detached`, so one handle covers layers that
    /// were built separately. By default each `IdempotencyLayer::new` has its own, shared
    /// by its clones.
    pub fn track_detached_in(mut self, detached: DetachedWork) -> Self {
        self.detached = detached;
        self
    }

    fn with(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        change(Arc::make_mut(&mut self.policy));
        self
    }

    /// How long a completed record is kept, counted by the store's clock from completion.
    /// Default 24 h; at most [`MAX_TTL`](crate::policy::MAX_TTL). A TTL shorter than the
    /// default lease lowers the lease with it; one shorter than a lease set with
    /// [`lease`](Self::lease) is refused when the layer is applied.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|p| p.ttl = ttl)
    }

    /// How long a reservation lasts without renewal. Default 30 s (or the TTL, if
    /// shorter). Renewal, unless set with [`renew_every`](Self::renew_every), runs every
    /// third of it.
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|p| p.lease = Some(lease))
    }

    /// How often the lease is renewed while the owner works. Default a third of the
    /// lease; at most a third of it, so one failed renewal never loses the lease.
    pub fn renew_every(self, every: Duration) -> Self {
        self.with(|p| p.renewal = Renewal::Every(every))
    }

    /// Turns lease renewal off: a handler running longer than the lease may then run
    /// twice. Meant for tests of lease expiry.
    pub fn no_renewal(self) -> Self {
        self.with(|p| p.renewal = Renewal::Off)
    }

    /// The methods covered; others pass through untouched. Default POST and PATCH. Only
    /// POST, PUT, PATCH and DELETE can be covered (safe methods need no key); another
    /// method is refused when the layer is applied.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.with(|p| {
            p.methods = 0;
            p.uncoverable = None;
            for method in methods {
                match COVERABLE.iter().position(|m| *m == method) {
                    Some(index) => p.methods |= 1 << index,
                    None => p.uncoverable = Some(method),
                }
            }
        })
    }

    /// Refuses covered requests without a key: 400 `idempotency-key-missing`. By default
    /// they pass through.
    pub fn require_key(self) -> Self {
        self.with(|p| p.require_key = true)
    }

    /// The largest body of a keyed request, in bytes: the layer holds it in memory to
    /// fingerprint it, and answers a larger one with 413 `request-body-too-large` before
    /// anything is reserved. Default 1 MiB. Keyless requests pass through untouched, under
    /// axum's own limit (2 MB unless `DefaultBodyLimit` says otherwise).
    ///
    /// axum's `DefaultBodyLimit::max(n)` on a layer outside this one, if smaller, lowers
    /// the limit of keyed requests to `n` (the layer's 413 problem, so a body the
    /// handler's extractor would refuse is never reserved). A larger one, or
    /// `DefaultBodyLimit::disable()`, does not raise it: the body is still held in memory,
    /// so raise `max_body` itself for large keyed uploads (the layer logs a warning, once,
    /// when it refuses a body axum's limit allows). A `DefaultBodyLimit` inside this layer
    /// is not seen: it applies to the handler's extractors only.
    ///
    /// ```
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    ///
    /// // Keyed uploads of up to 8 MiB on this route.
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .max_body(8 << 20);
    /// assert_eq!(layer.policy().max_body(), 8 << 20);
    /// ```
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|p| p.max_body = bytes)
    }

    /// How much of an over-limit body is read and discarded before the 413, so the client
    /// reads the answer instead of a reset. Default 64 MiB or 5 s, whichever comes first;
    /// past it the connection is closed. (With `Expect: 100-continue` nothing is read:
    /// the 413 goes out at once.)
    pub fn drain(self, bytes: usize, time: Duration) -> Self {
        self.with(|p| {
            p.drain_bytes = bytes;
            p.drain_time = time;
        })
    }

    /// The largest response body stored for replay, in bytes. A larger one is streamed to
    /// the first caller and retries get 409 `response-not-replayable`. Default 4 MiB; at
    /// most [`MAX_BODY_LEN`](crate::record::MAX_BODY_LEN).
    pub fn max_stored_response(self, bytes: usize) -> Self {
        self.with(|p| p.max_stored_response = bytes)
    }

    /// The request headers that are part of the fingerprint. Default `Content-Type`.
    ///
    /// The fingerprint also covers the body byte for byte: a multipart upload whose retry
    /// has a new boundary gets 422 even with `Content-Type` left out (see
    /// [`Fingerprint`](crate::Fingerprint)); [`fingerprint_body_with`](Self::fingerprint_body_with)
    /// is the way out.
    pub fn fingerprint_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names: Arc<[HeaderName]> = names.into_iter().collect();
        self.with(|p| p.fingerprint_headers = names)
    }

    /// Fingerprints a normalised payload instead of the raw one, for bodies whose bytes
    /// change between two sends of the same content: above all `multipart/form-data`,
    /// whose boundary most clients pick anew each time (README, "Policy", "Multipart
    /// uploads"). `normalise` gets the request head and the buffered body; what it
    /// returns replaces both the fingerprinted headers and the body in the fingerprint
    /// (method, path and query still count), so put in it whatever of the headers
    /// matters. `None` keeps the usual fingerprint for that request. The handler always
    /// gets the raw body. It runs on every keyed request: keep it cheap and never panic.
    /// Two payloads it maps to the same bytes count as one: the retry of either gets the
    /// other's answer, so drop only what carries no meaning (the boundary, not a field).
    /// Off by default: the fingerprint is then exactly SPEC section 4's.
    ///
    /// ```
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    ///
    /// // Multipart bodies without their boundary (a sketch: a real app would parse the
    /// // parts and fingerprint their names, file names, types and bytes).
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .fingerprint_body_with(|head, body| {
    ///         let content_type = head.headers.get("content-type")?.to_str().ok()?;
    ///         let boundary = content_type
    ///             .strip_prefix("multipart/form-data; boundary=")?
    ///             .trim_matches('"');
    ///         let body = std::str::from_utf8(body).ok()?;
    ///         Some(body.replace(&format!("--{boundary}"), "--").into_bytes())
    ///     });
    /// ```
    pub fn fingerprint_body_with<F>(self, normalise: F) -> Self
    where
        F: Fn(&http::request::Parts, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        let normalise: FingerprintBody = Arc::new(normalise);
        self.with(|p| p.fingerprint_body = Some(normalise))
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

    /// What the next request with a key gets when the key's first request lost its lease
    /// before it recorded an answer (it may or may not have happened). Default
    /// [`Uncertain::RunAgain`]; [`Uncertain::Refuse`] answers 409 `operation-uncertain`
    /// until an operator resolves or forgets the key ([`Store::inspect`],
    /// [`Store::resolve`], [`Store::forget`]).
    ///
    /// ```
    /// # use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// use tower_idempotency_core::policy::Uncertain;
    ///
    /// let payments = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .uncertain(Uncertain::Refuse);
    /// assert_eq!(payments.policy().uncertain(), Uncertain::Refuse);
    /// ```
    pub fn uncertain(self, when: Uncertain) -> Self {
        self.with(|p| p.uncertain = when)
    }

    /// When the store is unavailable on the first reserve attempt (unreachable, timed
    /// out, full), pass the request through (and log) instead of answering 503. A record
    /// the store cannot decode, or an error after the store said "in flight", is never a
    /// pass-through. Default: fail closed.
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

    /// Resolves the tenant from the request parts, for tenants that are not a request
    /// extension (e.g. a header an API gateway sets). A request for which it returns
    /// `None` gets 500 `scope-not-configured`. Prefer
    /// [`tenant_from_extension`](Self::tenant_from_extension) or
    /// [`tenant_from_extension_with`](Self::tenant_from_extension_with), which allocate
    /// nothing per request.
    ///
    /// ```
    /// # use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).tenant(|parts| {
    ///     let key = parts.headers.get("x-api-key")?.to_str().ok()?;
    ///     Some(key.to_owned())
    /// });
    /// ```
    pub fn tenant<F>(self, resolve: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.resolve_tenant(move |parts| resolve(parts).map(|t| Cow::Owned(t.into_bytes())))
    }

    /// Takes the tenant from the request extension of type `T` that an auth layer outside
    /// this one set (a request without it gets 500 `scope-not-configured`): anything that
    /// is `AsRef<[u8]>`, as for
    /// [`tenant_from_extension_with`](Self::tenant_from_extension_with) — a `String`
    /// newtype, a `uuid::Uuid` (its 16 bytes), a byte array. Nothing is allocated per
    /// request.
    ///
    /// ```
    /// # use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// #[derive(Clone)]
    /// struct TenantId([u8; 16]); // e.g. a UUID's bytes
    /// impl AsRef<[u8]> for TenantId {
    ///     fn as_ref(&self) -> &[u8] { &self.0 }
    /// }
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).tenant_from_extension::<TenantId>();
    /// ```
    pub fn tenant_from_extension<T>(self) -> Self
    where
        T: AsRef<[u8]> + Send + Sync + 'static,
    {
        self.resolve_tenant(|parts| {
            let tenant = parts.extensions.get::<T>()?;
            Some(Cow::Borrowed(tenant.as_ref()))
        })
    }

    /// Takes the tenant from a field of the request extension `T` that an auth layer
    /// outside this one set: `|claims: &Claims| &claims.sub`, or `|user: &User| &user.id`
    /// for a `uuid::Uuid` (anything that is `AsRef<[u8]>`: `String`, `str`, byte arrays).
    /// Nothing is allocated per request. A request without the extension gets 500
    /// `scope-not-configured`.
    ///
    /// ```
    /// # use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// #[derive(Clone)]
    /// struct Claims { sub: String, scope: Vec<String> }
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .tenant_from_extension_with(|claims: &Claims| &claims.sub);
    /// ```
    pub fn tenant_from_extension_with<T, V, F>(self, field: F) -> Self
    where
        T: Send + Sync + 'static,
        V: AsRef<[u8]> + ?Sized + 'static,
        F: Fn(&T) -> &V + Send + Sync + 'static,
    {
        self.resolve_tenant(move |parts| {
            let extension = parts.extensions.get::<T>()?;
            Some(Cow::Borrowed(field(extension).as_ref()))
        })
    }

    fn resolve_tenant<F>(self, resolve: F) -> Self
    where
        F: for<'a> Fn(&'a http::request::Parts) -> Option<Cow<'a, [u8]>> + Send + Sync + 'static,
    {
        let resolve: TenantResolver = Arc::new(resolve);
        self.with(|p| p.tenant = Tenant::Resolver(resolve))
    }

    /// One scope for every caller, chosen explicitly (public endpoints, webhooks with a
    /// per-source key). A layer must be given a tenant source or this: one with neither
    /// is refused when it is applied.
    pub fn global_scope(self) -> Self {
        self.with(|p| p.tenant = Tenant::Global)
    }

    /// Adds response headers that are never stored, so a replay never carries the first
    /// response's value: the layers outside this one set them afresh for the retry, as
    /// for any request. Always dropped besides: hop-by-hop headers, `Content-Length`,
    /// `Set-Cookie` and `Date`. Default: `x-request-id`
    /// ([`DEFAULT_DENIED_REPLAY_HEADERS`](crate::policy::DEFAULT_DENIED_REPLAY_HEADERS)),
    /// because a request id names one HTTP request, not the operation: with tower-http's
    /// `PropagateRequestIdLayer` outside this layer, a replay carries the retry's own id.
    /// Name here any other per-request header a handler (or a layer inside this one)
    /// sets, e.g. a `x-correlation-id` or a server-timing header.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .deny_replay_headers([HeaderName::from_static("x-correlation-id")]);
    /// let denied = layer.policy().denied_replay_headers();
    /// assert_eq!(denied, ["x-request-id", "x-correlation-id"]);
    /// ```
    pub fn deny_replay_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names: Vec<HeaderName> = names.into_iter().collect();
        self.with(|p| {
            let mut denied = p.deny_replay_headers.to_vec();
            for name in names {
                if !denied.contains(&name) {
                    denied.push(name);
                }
            }
            p.deny_replay_headers = denied.into();
        })
    }

    /// Stores and replays response headers this policy would otherwise deny (see
    /// [`deny_replay_headers`](Self::deny_replay_headers)): e.g. `x-request-id`, for an
    /// API whose clients expect the first request's id on every replay. The headers the
    /// layer always drops (hop-by-hop, `Content-Length`, `Set-Cookie`, `Date`) stay
    /// dropped.
    ///
    /// ```
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// use tower_idempotency_core::policy::X_REQUEST_ID;
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .allow_replay_headers([X_REQUEST_ID]);
    /// assert!(layer.policy().denied_replay_headers().is_empty());
    /// ```
    pub fn allow_replay_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names: Vec<HeaderName> = names.into_iter().collect();
        self.with(|p| {
            let denied: Arc<[HeaderName]> = p
                .deny_replay_headers
                .iter()
                .filter(|name| !names.contains(name))
                .cloned()
                .collect();
            p.deny_replay_headers = denied;
        })
    }

    /// Which responses are streamed instead of stored: a response whose status the
    /// policy stores ([`store_when`](Self::store_when)) and whose head matches is passed
    /// to the client as it comes, without buffering, right after the not-replayable
    /// marker is stored (one store call: the operation counts as done, SPEC section 5).
    /// Retries with the key get 409 `response-not-replayable`, never a second run. A
    /// response that does not match is buffered up to
    /// [`max_stored_response`](Self::max_stored_response) before its first byte is sent.
    ///
    /// Default: `text/event-stream` responses ([`is_event_stream`](crate::policy::is_event_stream)),
    /// so server-sent events reach the client at once. The predicate replaces the
    /// default; call `is_event_stream` in it to keep that. `|_| false` buffers every
    /// response (an event stream then gets the marker only once it outgrows the
    /// stored-response limit, or ends and is stored).
    ///
    /// ```
    /// use http::header;
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// use tower_idempotency_core::policy::is_event_stream;
    ///
    /// // Event streams, and any response the handler marks as a download stream.
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .stream_when(|head| {
    ///         is_event_stream(&head.headers) || head.headers.contains_key("x-stream")
    ///     });
    /// let head = http::Response::builder().header("x-stream", "1").body(())?.into_parts().0;
    /// assert!(layer.policy().streams(&head));
    /// # Ok::<(), http::Error>(())
    /// ```
    pub fn stream_when<F>(self, predicate: F) -> Self
    where
        F: Fn(&http::response::Parts) -> bool + Send + Sync + 'static,
    {
        let predicate: StreamPredicate = Arc::new(predicate);
        self.with(|p| p.stream_when = Some(predicate))
    }

    /// How long storing a completed record, or releasing the key (a response the store
    /// policy does not keep, a handler that failed), is retried while the store fails
    /// (the lease is renewed meanwhile; the response waits for it). Default 60 s.
    pub fn complete_retry(self, bound: Duration) -> Self {
        self.with(|p| p.complete_retry = bound)
    }

    /// The `Retry-After` sent with 409 `request-in-flight` and 503, rounded to whole
    /// seconds, at least 1. Default 1 s.
    pub fn retry_after(self, after: Duration) -> Self {
        self.with(|p| p.retry_after = after)
    }

    /// The prefix of the problem `type` URIs; the slug follows it. Default
    /// [`PROBLEM_TYPE_BASE`](crate::problems::PROBLEM_TYPE_BASE), the sections of the
    /// [`problems`](crate::problems) module's documentation.
    ///
    /// ```
    /// # use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .problem_type_base("https://api.example.com/problems/");
    /// ```
    pub fn problem_type_base(self, base: impl Into<String>) -> Self {
        let base: Arc<str> = Arc::from(base.into());
        self.with(|p| p.problem_type_base = base)
    }

    /// Renders the layer's own answers (400, 409, 413, 422, 500, 503) in the
    /// application's error format instead of `application/problem+json`. The layer still
    /// adds `Retry-After` (409 in flight, 503) and `Connection: close` (413) when the
    /// rendering lacks them.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{header, Response};
    /// use tower_idempotency_core::{IdempotencyLayer, MemoryStore, Rejection};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .global_scope()
    ///     .render_rejections(|rejection: &Rejection| {
    ///         let body = serde_json::json!({
    ///             "error": { "code": rejection.slug(), "message": rejection.detail() }
    ///         });
    ///         let mut response = Response::new(Bytes::from(body.to_string()));
    ///         *response.status_mut() = rejection.status();
    ///         response.headers_mut().insert(
    ///             header::CONTENT_TYPE,
    ///             header::HeaderValue::from_static("application/json"),
    ///         );
    ///         response
    ///     });
    /// ```
    pub fn render_rejections<F>(self, render: F) -> Self
    where
        F: Fn(&Rejection) -> http::Response<bytes::Bytes> + Send + Sync + 'static,
    {
        let render: Renderer = Arc::new(render);
        self.with(|p| p.render_rejection = Some(render))
    }
}

impl<S, St: Store> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    /// # Panics
    ///
    /// If the policy is invalid ([`Policy::validate`]): no tenant source and no
    /// `.global_scope()`, a TTL shorter than the lease, a renewal slower than a third of
    /// the lease, and the like. The message names the fix.
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_layer(inner, self)
    }
}
