//! [`Idempotency`]: the service that makes a covered request retry-safe.

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::Body;
use tower::Service;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::fingerprint::ScopeHash;
use crate::future::ResponseFuture;
use crate::key::{IdempotencyKey, KeyError};
use crate::layer::IdempotencyLayer;
use crate::observe::{Meters, Observer, Outcome};
use crate::policy::{Policy, Tenant};
use crate::problem::Problem;
use crate::store::Store;
use crate::task::{problem, Job};

/// Middleware that runs a request once per idempotency key and replays its response to
/// retries.
///
/// Built by [`IdempotencyLayer`]; see the [crate docs](crate) for an example.
#[derive(Clone, Debug)]
pub struct Idempotency<S, St> {
    inner: S,
    store: St,
    policy: Arc<Policy>,
    meters: Arc<Meters>,
}

impl<S, St: Store> Idempotency<S, St> {
    /// Wraps `inner` with the default policy. Prefer [`IdempotencyLayer`], which has the
    /// builder methods.
    pub fn new(inner: S, store: St) -> Self {
        Self::from_layer(inner, &IdempotencyLayer::new(store))
    }

    /// A layer with the default policy, to configure with its builder methods.
    pub fn layer(store: St) -> IdempotencyLayer<St> {
        IdempotencyLayer::new(store)
    }

    pub(crate) fn from_layer(inner: S, layer: &IdempotencyLayer<St>) -> Self {
        layer.policy.check_ttl_and_lease();
        Idempotency {
            inner,
            store: layer.store.clone(),
            policy: layer.policy.clone(),
            meters: layer.meters.clone(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError> + Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The ready service handles this request; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = &self.policy;
        if !policy.covers(request.method()) {
            return ResponseFuture::passthrough(inner.call(request.map(RequestBody::passthrough)));
        }
        let (parts, body) = request.into_parts();
        let observer = Observer::new(&self.meters, route_label(&parts));
        let reject = |problem_kind: Problem, detail: &str| {
            observer.outcome(Outcome::Rejected);
            ResponseFuture::ready(problem(policy, problem_kind, detail))
        };
        let key = match IdempotencyKey::from_headers(&parts.headers, &policy.header) {
            Ok(Some(key)) => key,
            Ok(None) if policy.require_key => {
                let detail = format!("this endpoint requires an `{}` header", policy.header);
                return reject(Problem::KeyMissing, &detail);
            }
            Ok(None) => {
                observer.outcome(Outcome::NoKey);
                let request = Request::from_parts(parts, RequestBody::passthrough(body));
                return ResponseFuture::passthrough(inner.call(request));
            }
            Err(err) => return reject(Problem::KeyInvalid, &key_detail(err)),
        };
        let tenant = match resolve_tenant(policy, &parts) {
            Ok(tenant) => tenant,
            Err(why) => {
                tracing::error!(
                    route = observer.route(),
                    "{why}: configure the layer with `.tenant(..)` (or `.tenant_from_extension::<T>()`) \
                     to scope keys per caller, or `.global_scope()` to share one scope explicitly"
                );
                let detail = "the server cannot scope this idempotency key to a caller";
                return reject(Problem::ScopeNotConfigured, detail);
            }
        };
        let path = scope_path(&parts).to_owned();
        let scope = ScopeHash::new(
            tenant.as_deref().map(str::as_bytes),
            &parts.method,
            &path,
            key.as_str().as_bytes(),
        );
        let job = Job {
            inner,
            store: self.store.clone(),
            policy: policy.clone(),
            parts,
            scope,
            path,
            observer,
            _body: PhantomData,
        };
        ResponseFuture::detached(Box::pin(job.run(body)))
    }
}

fn key_detail(err: KeyError) -> String {
    format!("the idempotency key is invalid: {err}")
}

/// The tenant part of the scope: `Ok(None)` is the global scope.
fn resolve_tenant(
    policy: &Policy,
    parts: &http::request::Parts,
) -> Result<Option<String>, &'static str> {
    match &policy.tenant {
        Tenant::Global => Ok(None),
        Tenant::Resolver(resolve) => resolve(parts)
            .map(Some)
            .ok_or("the idempotency tenant resolver found no tenant for this request"),
        Tenant::Unset => {
            let authenticated = parts.headers.contains_key(header::AUTHORIZATION)
                || parts.headers.contains_key(header::COOKIE);
            if authenticated {
                Err("an authenticated request reached an idempotency layer with no tenant configured")
            } else {
                Ok(None)
            }
        }
    }
}

/// The full path the client sent: nested routers strip their prefix from the URI, so
/// axum's `OriginalUri` wins when present.
fn scope_path(parts: &http::request::Parts) -> &str {
    #[cfg(feature = "axum")]
    if let Some(original) = parts.extensions.get::<axum::extract::OriginalUri>() {
        return original.0.path();
    }
    parts.uri.path()
}

/// The route template for metric labels, never the raw path (unbounded cardinality).
fn route_label(parts: &http::request::Parts) -> &str {
    #[cfg(feature = "axum")]
    if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
        return matched.as_str();
    }
    let _ = parts;
    "unmatched"
}
