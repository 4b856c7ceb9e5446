//! [`Idempotency`]: the service that makes a covered request retry-safe.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::Service;
use tracing::Instrument;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::buffer::{expects_continue_over, AxumLimit};
use crate::detach::DetachOnDrop;
use crate::fingerprint::ScopeHash;
use crate::future::ResponseFuture;
use crate::key::key_bytes;
use crate::layer::IdempotencyLayer;
use crate::observe::{Observer, Outcome};
use crate::policy::Policy;
use crate::problems::Problem;
use crate::scope::{route_label, scope_path, tenant};
use crate::store::Store;
use crate::work::{Job, Shared};

/// Middleware that runs a request once per idempotency key and replays its response to
/// retries.
///
/// Built by [`IdempotencyLayer`]; see the [crate docs](crate) for an example.
#[derive(Debug)]
pub struct Idempotency<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, St: Store> Idempotency<S, St> {
    /// A layer with the default policy, to configure with its builder methods.
    pub fn layer(store: St) -> IdempotencyLayer<St> {
        IdempotencyLayer::new(store)
    }

    pub(crate) fn from_layer(inner: S, layer: &IdempotencyLayer<St>) -> Self {
        if let Err(err) = layer.policy.validate() {
            panic!("{err}");
        }
        Idempotency {
            inner,
            shared: Arc::new(Shared {
                store: layer.store.clone(),
                policy: (*layer.policy).clone(),
                meters: layer.meters.clone(),
                detached: layer.detached.clone(),
                warned_body_limit: layer.warned_body_limit.clone(),
            }),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
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
        let shared = &self.shared;
        let policy = &shared.policy;
        if !policy.covers(request.method()) {
            return ResponseFuture::passthrough(inner.call(request.map(RequestBody::passthrough)));
        }
        let (mut parts, body) = request.into_parts();
        let observer = Observer::new(&shared.meters, route_label(&parts));
        let reject = |outcome: Outcome, problem: Problem, detail: String| {
            observer.outcome(outcome);
            ResponseFuture::ready(shared.problem(problem, detail))
        };
        let key = match key_bytes(&parts.headers, &policy.header) {
            Ok(Some(key)) => key,
            Ok(None) if policy.require_key => {
                let detail = format!("this endpoint requires an `{}` header", policy.header);
                return reject(Outcome::Rejected, Problem::KeyMissing, detail);
            }
            Ok(None) => {
                observer.outcome(Outcome::NoKey);
                let request = Request::from_parts(parts, RequestBody::passthrough(body));
                return ResponseFuture::passthrough(inner.call(request));
            }
            Err(err) => {
                let detail = format!("the idempotency key is invalid: {err}");
                return reject(Outcome::Rejected, Problem::KeyInvalid, detail);
            }
        };
        // The route's limit, or axum's `DefaultBodyLimit::max(n)` set outside if smaller.
        let axum_limit = AxumLimit::of(&mut parts.extensions, policy.max_body);
        let max_body = axum_limit.keyed_limit(policy.max_body);
        let Ok(tenant) = tenant(policy, &parts) else {
            tracing::error!(
                route = observer.route(),
                "the idempotency tenant resolver found no tenant for this request; check that \
                 the auth layer runs outside the idempotency layer"
            );
            let detail = "the server cannot scope this idempotency key to a caller";
            return reject(
                Outcome::Rejected,
                Problem::ScopeNotConfigured,
                detail.to_owned(),
            );
        };
        // The client waits for `100 Continue` before sending a body the layer would only
        // discard: answer 413 now, without reading it (the connection then closes).
        if expects_continue_over(&parts.headers, body.size_hint().lower(), max_body) {
            shared.refused_over_max_body(axum_limit);
            let detail = format!("the request body is larger than {max_body} bytes");
            return reject(Outcome::TooLarge, Problem::BodyTooLarge, detail);
        }
        let scope = ScopeHash::new(tenant.as_deref(), &parts.method, scope_path(&parts), &key);
        // At INFO, so a warning logged at INFO shows its route (and, once known, the
        // outcome). Never the key or the tenant; the scope hash only at DEBUG.
        let span = tracing::info_span!(
            "idempotency",
            route = observer.route(),
            outcome = tracing::field::Empty,
            scope = tracing::field::Empty,
        );
        if tracing::enabled!(tracing::Level::DEBUG) {
            span.record("scope", tracing::field::display(&scope));
        }
        let job = Job {
            inner,
            shared: shared.clone(),
            parts,
            scope,
            observer,
            max_body,
            axum_limit,
        };
        let work = DetachOnDrop::new(
            shared.detached.clone(),
            Box::pin(job.run(body).instrument(span)),
        );
        ResponseFuture::work(work)
    }
}
