//! The work of one covered request, start to end: buffer the body, claim the scope, then
//! replay, refuse, or run as the owner. Every path returns its [`Outcome`] with the
//! response, and [`Job::run`] records it in one place.
//!
//! The whole of it runs on the request's future inside a
//! [`DetachOnDrop`](crate::detach): if the client hangs up, the rest is spawned and
//! finishes anyway (SPEC section 6).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower::Service;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::buffer::{buffer, AxumLimit, BufferError, Limits};
use crate::claim::{claim, Claim, Claimant};
use crate::detach::DetachedWork;
use crate::fingerprint::{Fingerprint, ScopeHash};
use crate::observe::{record_outcome, DisplayChain, Meters, Observer, Outcome};
use crate::owner;
use crate::policy::Policy;
use crate::problems::{Problem, Rejection};
use crate::record::Record;
use crate::replay::replay;
use crate::scope::scope_path;

/// What the layer's future resolves to.
pub(crate) type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

/// What [`Job::respond`] resolves to: the output and its outcome, to record.
type Responded<B, E> = (Outcome, Output<B, E>);

/// The bounds on the inner service, written once for the layer's own code (the public
/// `Service` impl of [`Idempotency`](crate::Idempotency) states them for users).
pub(crate) trait Inner<ReqB>:
    Service<
        Request<RequestBody<ReqB>>,
        Response = Response<Self::ResBody>,
        Future: Send + 'static,
        Error: Send + 'static,
    > + Send
    + 'static
{
    /// The inner service's response body.
    type ResBody: Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + 'static;
}

impl<S, ReqB, ResB> Inner<ReqB> for S
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: Body<Data = bytes::Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type ResBody = ResB;
}

/// What every service made by one layer shares, behind one `Arc`: a request clones it
/// once.
#[derive(Debug)]
pub(crate) struct Shared<St> {
    pub(crate) store: St,
    pub(crate) policy: Policy,
    pub(crate) meters: Arc<Meters>,
    pub(crate) detached: DetachedWork,
    /// Whether the layer already warned that `max_body` refused a body axum's
    /// `DefaultBodyLimit` allows (once per layer and its clones; later ones at DEBUG).
    pub(crate) warned_body_limit: Arc<AtomicBool>,
}

impl<St> Shared<St> {
    /// A keyed request was refused at the route's `max_body`: if axum's
    /// `DefaultBodyLimit` (set outside the layer) would have let it through, say so, once
    /// per layer, so a limit raised for axum alone is not overridden silently.
    pub(crate) fn refused_over_max_body(&self, axum: AxumLimit) {
        if !axum.allows_more_than(self.policy.max_body) {
            return;
        }
        let max_body = self.policy.max_body;
        if !self.warned_body_limit.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_body,
                axum_limit = ?axum,
                "a keyed request body is over this route's idempotency limit (`.max_body({max_body})`) \
                 although axum's DefaultBodyLimit allows it: the layer holds keyed bodies in \
                 memory and keeps its own limit; raise `.max_body(..)` on this route to accept \
                 them (logged once per layer)"
            );
        } else {
            tracing::debug!(max_body, axum_limit = ?axum, "keyed request body over `.max_body`");
        }
    }

    /// The layer's own answer `problem` under this policy: its `Retry-After`, its `type`
    /// base, and the application's rendering if it has one.
    pub(crate) fn problem<B>(
        &self,
        problem: Problem,
        detail: impl Into<String>,
    ) -> Response<ResponseBody<B>> {
        let policy = &self.policy;
        let rejection = Rejection::new(
            problem,
            detail.into(),
            policy.retry_after.as_secs(),
            policy.problem_type_base.clone(),
        );
        let response = match &policy.render_rejection {
            None => rejection.problem_json(),
            Some(render) => {
                let mut response = render(&rejection);
                rejection.add_protocol_headers(&mut response);
                response
            }
        };
        response.map(ResponseBody::full)
    }
}

/// Everything one covered request needs once its key and scope are known.
pub(crate) struct Job<S, St> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared<St>>,
    pub(crate) parts: Parts,
    pub(crate) scope: ScopeHash,
    pub(crate) observer: Observer,
    /// This request's body limit: the policy's, or axum's if set outside and smaller.
    pub(crate) max_body: usize,
    /// axum's `DefaultBodyLimit` as the request carried it.
    pub(crate) axum_limit: AxumLimit,
}

impl<S, St: crate::Store> Job<S, St> {
    /// Does the work and records its outcome.
    ///
    /// Neither this nor [`respond`](Self::respond) is an `async fn`: an `async fn` keeps
    /// its arguments twice in its future (as arguments, and moved into its body), and
    /// this future is boxed and copied once per request. Written this way it is half the
    /// size (about 1.1 KiB instead of 2.2 on `MemoryStore`; callgrind: about 400
    /// instructions fewer per replay). The outcome is recorded by [`Recorded`], which
    /// holds `respond`'s future in place.
    pub(crate) fn run<ReqB>(
        self,
        body: ReqB,
    ) -> Recorded<impl Future<Output = Responded<S::ResBody, S::Error>> + Send>
    where
        S: Inner<ReqB>,
        St: 'static,
        ReqB: Body + Send + 'static,
        ReqB::Data: Send,
        ReqB::Error: Into<BoxError> + Send,
    {
        Recorded {
            observer: self.observer.clone(),
            respond: self.respond(body),
        }
    }

    /// Buffers the body, claims the scope, then replays, refuses, or runs as the owner.
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold `self` twice (see `run`)
    fn respond<ReqB>(
        self,
        body: ReqB,
    ) -> impl Future<Output = Responded<S::ResBody, S::Error>> + Send
    where
        S: Inner<ReqB>,
        St: 'static,
        ReqB: Body + Send + 'static,
        ReqB::Data: Send,
        ReqB::Error: Into<BoxError> + Send,
    {
        // `self` and `body` are used where they are captured, never moved into locals.
        async move {
            let shared = &*self.shared;
            let policy = &shared.policy;
            let bytes = {
                let limits = Limits {
                    max: self.max_body,
                    drain_bytes: policy.drain_bytes,
                    drain_time: policy.drain_time,
                };
                match buffer(std::pin::pin!(body), &limits).await {
                    Ok(bytes) => bytes,
                    Err(BufferError::TooLarge) => {
                        shared.refused_over_max_body(self.axum_limit);
                        let detail =
                            format!("the request body is larger than {} bytes", self.max_body);
                        return (
                            Outcome::TooLarge,
                            Ok(shared.problem(Problem::BodyTooLarge, detail)),
                        );
                    }
                    Err(BufferError::OverOuterLimit) => {
                        let detail = "the request body is larger than the server accepts";
                        return (
                            Outcome::TooLarge,
                            Ok(shared.problem(Problem::BodyTooLarge, detail)),
                        );
                    }
                    Err(BufferError::Unreadable(err)) => {
                        tracing::debug!(error = %DisplayChain(&*err), "request body unreadable");
                        let detail = format!("the request body could not be read: {err}");
                        return (
                            Outcome::Unreadable,
                            Ok(shared.problem(Problem::BodyUnreadable, detail)),
                        );
                    }
                }
            };
            let normalised = policy
                .fingerprint_body
                .as_ref()
                .and_then(|normalise| normalise(&self.parts, &bytes));
            let fingerprint = match normalised {
                Some(payload) => Fingerprint::normalised(
                    &self.parts.method,
                    scope_path(&self.parts),
                    self.parts.uri.query(),
                    &payload,
                ),
                None => Fingerprint::new(
                    &self.parts.method,
                    scope_path(&self.parts),
                    self.parts.uri.query(),
                    &self.parts.headers,
                    &policy.fingerprint_headers,
                    &bytes,
                ),
            };
            let claimed = claim(Claimant {
                store: &shared.store,
                scope: &self.scope,
                fingerprint: &fingerprint,
                policy,
                observer: &self.observer,
                detached: &shared.detached,
            })
            .await;
            self.observer.wait_ended(claimed.wait_end());
            match claimed {
                // The owner's path holds the inner service's future, the body collection and
                // the lease: boxed, so the future every request moves around (a replay's, a
                // conflict's) stays small.
                Claim::Owner { token, reserved_at } => {
                    Box::pin(owner::own(self, bytes, token, reserved_at)).await
                }
                Claim::Completed(Record::Response(stored)) => {
                    (Outcome::Replayed, Ok(replay(stored)))
                }
                Claim::Completed(Record::NotReplayable) => {
                    let detail =
                        "the first request with this key ran, but its response could not be \
                              stored (too large, or it failed mid-stream); it cannot be replayed";
                    (
                        Outcome::NotReplayable,
                        Ok(shared.problem(Problem::NotReplayable, detail)),
                    )
                }
                Claim::Mismatch => {
                    let detail =
                        "this idempotency key was already used with a different request payload";
                    (
                        Outcome::Mismatch,
                        Ok(shared.problem(Problem::KeyReused, detail)),
                    )
                }
                Claim::Uncertain => {
                    let detail = "the first request with this key stopped before it recorded an \
                              answer, so it may or may not have happened; this endpoint will \
                              not run it again until the operators have resolved the key";
                    (
                        Outcome::Uncertain,
                        Ok(shared.problem(Problem::OperationUncertain, detail)),
                    )
                }
                Claim::InFlight => {
                    let detail = "a request with this idempotency key is still being processed";
                    (
                        Outcome::Conflict,
                        Ok(shared.problem(Problem::InFlight, detail)),
                    )
                }
                Claim::Unavailable { error, may_pass } if may_pass && policy.fail_open => {
                    record_outcome(Outcome::FailOpen);
                    tracing::warn!(error = %DisplayChain(&error), "idempotency store unavailable; passing the request through (fail open)");
                    let Job {
                        mut inner, parts, ..
                    } = self;
                    let request = Request::from_parts(parts, RequestBody::buffered(bytes));
                    let output = Box::pin(inner.call(request))
                        .await
                        .map(|response| response.map(ResponseBody::stream));
                    (Outcome::FailOpen, output)
                }
                Claim::Unavailable { error, .. } => {
                    record_outcome(Outcome::StoreError);
                    tracing::error!(error = %DisplayChain(&error), "idempotency store unavailable; refusing the request");
                    let detail =
                        "the idempotency store is unavailable; retry with the same key later";
                    (
                        Outcome::StoreError,
                        Ok(shared.problem(Problem::StoreUnavailable, detail)),
                    )
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Job::run`]'s future: `respond`'s, then its outcome recorded, in one place.
    pub(crate) struct Recorded<F> {
        #[pin]
        respond: F,
        observer: Observer,
    }
}

impl<F, T> Future for Recorded<F>
where
    F: Future<Output = (Outcome, T)>,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        let (outcome, output) = std::task::ready!(this.respond.poll(cx));
        record_outcome(outcome);
        this.observer.outcome(outcome);
        Poll::Ready(output)
    }
}
