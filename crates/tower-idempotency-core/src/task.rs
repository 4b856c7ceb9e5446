//! The work of one covered request: buffer, then in a detached task reserve → run the
//! inner service → collect the body → complete or release.
//!
//! Only buffering runs on the connection's future. Everything after it runs in a spawned
//! task that the response future merely awaits, so a client that hangs up cancels nothing
//! and orphans no lease: the handler finishes, the result is stored, a retry replays it.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::Service;
use tracing::Instrument;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::buffer::{buffer, BufferError, Limits};
use crate::fingerprint::{Fingerprint, ScopeHash};
use crate::observe::{Observer, Outcome};
use crate::policy::{InFlight, Policy};
use crate::problem::Problem;
use crate::record::{Record, StoredResponse};
use crate::replay::{replay, stored_headers};
use crate::store::{Completion, Reservation, Store, StoreError, Subscription};
use crate::token::FencingToken;

/// What the layer's future resolves to.
pub(crate) type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

/// Back-off of a waiter polling a scope in flight (the pub/sub wake-up is the fast path).
const WAIT_POLL_MIN: Duration = Duration::from_millis(20);
const WAIT_POLL_MAX: Duration = Duration::from_millis(250);
/// Back-off between attempts to store a completed record while the store is down.
const COMPLETE_RETRY_MIN: Duration = Duration::from_millis(50);
const COMPLETE_RETRY_MAX: Duration = Duration::from_secs(2);

pub(crate) fn problem<B>(
    policy: &Policy,
    problem: Problem,
    detail: &str,
) -> Response<ResponseBody<B>> {
    problem.response(detail, policy.retry_after.as_secs(), ResponseBody::full)
}

/// Everything one covered request needs once its key and scope are known.
pub(crate) struct Job<S, St, ReqB> {
    pub(crate) inner: S,
    pub(crate) store: St,
    pub(crate) policy: Arc<Policy>,
    pub(crate) parts: Parts,
    pub(crate) scope: ScopeHash,
    pub(crate) path: String,
    pub(crate) observer: Observer,
    pub(crate) _body: PhantomData<fn() -> ReqB>,
}

/// The buffered request, ready to run.
struct Buffered<S, St> {
    inner: S,
    store: St,
    policy: Arc<Policy>,
    parts: Parts,
    body: Bytes,
    scope: ScopeHash,
    fingerprint: Fingerprint,
    observer: Observer,
}

impl<S, St, ReqB, ResBody> Job<S, St, ReqB>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqB: Body + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError> + Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    /// Buffers `body` on the caller's future, then runs the rest detached.
    pub(crate) async fn run(self, body: ReqB) -> Output<ResBody, S::Error> {
        let policy = self.policy;
        let limits = Limits {
            max: policy.max_body,
            drain_bytes: policy.drain_bytes,
            drain_time: policy.drain_time,
        };
        let bytes = match buffer(pin!(body), &limits).await {
            Ok(bytes) => bytes,
            Err(BufferError::TooLarge) => {
                self.observer.outcome(Outcome::TooLarge);
                let detail = format!("the request body is larger than {} bytes", policy.max_body);
                return Ok(problem(&policy, Problem::BodyTooLarge, &detail));
            }
            Err(BufferError::Unreadable(err)) => {
                self.observer.outcome(Outcome::Unreadable);
                tracing::debug!(error = %err, "request body unreadable");
                let detail = format!("the request body could not be read: {err}");
                return Ok(problem(&policy, Problem::BodyUnreadable, &detail));
            }
        };
        let query = self.parts.uri.query();
        let fingerprint = Fingerprint::new(
            &self.parts.method,
            &self.path,
            query,
            &self.parts.headers,
            &policy.fingerprint_headers,
            &bytes,
        );
        let span = tracing::debug_span!(
            "idempotency",
            route = self.observer.route(),
            scope = %self.scope.to_hex(),
        );
        let buffered = Buffered {
            inner: self.inner,
            store: self.store,
            policy: policy.clone(),
            parts: self.parts,
            body: bytes,
            scope: self.scope,
            fingerprint,
            observer: self.observer.clone(),
        };
        match tokio::spawn(buffered.run::<ReqB, ResBody>().instrument(span)).await {
            Ok(output) => output,
            Err(err) => {
                // The task catches the handler's panics itself: this is a bug of ours, or
                // the runtime shutting down.
                tracing::error!(error = %err, "idempotency task failed");
                self.observer.outcome(Outcome::HandlerFailed);
                Ok(problem(
                    &policy,
                    Problem::HandlerFailed,
                    "the request could not be completed",
                ))
            }
        }
    }
}

impl<S, St> Buffered<S, St>
where
    St: Store,
{
    async fn run<ReqB, ResBody>(self) -> Output<ResBody, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResBody>>,
        ResBody: Body<Data = Bytes>,
        ResBody::Error: Into<BoxError>,
    {
        let wait_until = match self.policy.in_flight {
            InFlight::Conflict => None,
            InFlight::Wait(bound) => Some(Instant::now() + bound),
        };
        // `None` until the first in-flight answer; `Some(None)` when subscribing failed and
        // the waiter falls back to polling alone.
        let mut subscription: Option<Option<St::Subscription>> = None;
        let mut backoff = WAIT_POLL_MIN;
        loop {
            let token = FencingToken::generate();
            let reserved = self
                .store
                .reserve(&self.scope, &self.fingerprint, token, self.policy.lease)
                .await;
            match reserved {
                Err(err) => return Box::pin(self.store_failed(err)).await,
                // The owner's state machine (lease renewal, body collection, complete retry)
                // and the fail-open path (the inner future) are large: boxed, so the task
                // that replays or conflicts stays small and cheap to move.
                Ok(Reservation::Reserved) => return Box::pin(self.own(token)).await,
                Ok(Reservation::Completed(Record::Response(stored))) => {
                    self.observer.outcome(Outcome::Replayed);
                    return Ok(replay(stored));
                }
                Ok(Reservation::Completed(Record::NotReplayable)) => {
                    self.observer.outcome(Outcome::NotReplayable);
                    let detail = "the first response to this key was too large to store; it cannot be replayed";
                    return Ok(problem(&self.policy, Problem::NotReplayable, detail));
                }
                Ok(Reservation::Mismatch) => {
                    self.observer.outcome(Outcome::Mismatch);
                    let detail =
                        "this idempotency key was already used with a different request payload";
                    return Ok(problem(&self.policy, Problem::KeyReused, detail));
                }
                Ok(Reservation::InFlight) => {}
            }
            let now = Instant::now();
            let Some(deadline) = wait_until.filter(|deadline| *deadline > now) else {
                self.observer.outcome(Outcome::Conflict);
                let detail = "a request with this idempotency key is still being processed";
                return Ok(problem(&self.policy, Problem::InFlight, detail));
            };
            let Some(subscription) = &mut subscription else {
                // Subscribe, then re-read at once: a completion between the first read and
                // the subscription is seen by the re-read, one after it wakes us.
                subscription = Some(match self.store.subscribe(&self.scope).await {
                    Ok(subscription) => Some(subscription),
                    Err(err) => {
                        tracing::warn!(error = %err, "subscribe failed; waiting by polling");
                        None
                    }
                });
                continue;
            };
            let pause = backoff.min(deadline - now);
            match subscription {
                Some(subscription) => {
                    tokio::select! {
                        () = subscription.changed() => {}
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                None => tokio::time::sleep(pause).await,
            }
            backoff = (backoff * 2).min(WAIT_POLL_MAX);
        }
    }

    async fn store_failed<ReqB, ResBody>(self, err: StoreError) -> Output<ResBody, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResBody>>,
    {
        if self.policy.fail_open {
            tracing::warn!(error = %err, "idempotency store unavailable; passing the request through (fail open)");
            self.observer.outcome(Outcome::FailOpen);
            let mut inner = self.inner;
            let request = Request::from_parts(self.parts, RequestBody::buffered(self.body));
            let response = inner.call(request).await?;
            return Ok(response.map(ResponseBody::stream));
        }
        tracing::error!(error = %err, "idempotency store unavailable; refusing the request (fail closed)");
        self.observer.outcome(Outcome::StoreError);
        let detail = "the idempotency store is unavailable; retry with the same key later";
        Ok(problem(&self.policy, Problem::StoreUnavailable, detail))
    }

    /// The owner's path: run the handler under a renewed lease, then complete or release.
    async fn own<ReqB, ResBody>(self, token: FencingToken) -> Output<ResBody, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResBody>>,
        ResBody: Body<Data = Bytes>,
        ResBody::Error: Into<BoxError>,
    {
        let Buffered {
            mut inner,
            store,
            policy,
            parts,
            body,
            scope,
            observer,
            ..
        } = self;
        let lease = Lease {
            store: &store,
            scope: &scope,
            token,
            policy: &policy,
            observer: &observer,
            lost: AtomicBool::new(false),
        };
        let mut request = Request::from_parts(parts, RequestBody::buffered(body));
        request.extensions_mut().insert(token);
        let called = lease
            .hold_while(AssertUnwindSafe(async move { inner.call(request).await }).catch_unwind())
            .await;
        let response = match called {
            Err(panic) => {
                tracing::error!(
                    panic = panic_message(&*panic),
                    "handler panicked; releasing the key"
                );
                return Ok(lease.fail().await);
            }
            Ok(Err(err)) => {
                tracing::debug!("handler returned an error; releasing the key");
                lease.release().await;
                observer.outcome(Outcome::HandlerFailed);
                return Err(err);
            }
            Ok(Ok(response)) => response,
        };
        if !policy.store_when.stores(response.status()) {
            // Released before the response is sent, so an immediate corrected retry runs.
            lease.release().await;
            observer.outcome(Outcome::Released);
            return Ok(response.map(ResponseBody::stream));
        }
        let (parts, body) = response.into_parts();
        let collected = lease
            .hold_while(AssertUnwindSafe(collect(body, policy.max_stored_response)).catch_unwind())
            .await;
        match collected {
            Ok(Collected::Whole(bytes)) => {
                let record = Record::Response(StoredResponse {
                    status: parts.status,
                    headers: stored_headers(&parts.headers, &policy.deny_replay_headers),
                    body: bytes.clone(),
                });
                lease.complete(&record).await;
                observer.outcome(Outcome::New);
                Ok(Response::from_parts(parts, ResponseBody::full(bytes)))
            }
            Ok(Collected::TooLarge(prefix, rest)) => {
                tracing::warn!(
                    limit = policy.max_stored_response,
                    "response too large to store; retries will get 409 response-not-replayable"
                );
                lease.complete(&Record::NotReplayable).await;
                observer.outcome(Outcome::TooLargeToStore);
                Ok(Response::from_parts(
                    parts,
                    ResponseBody::prefixed(prefix, rest),
                ))
            }
            Ok(Collected::Failed(err)) => {
                tracing::error!(error = %err, "response body failed; releasing the key");
                Ok(lease.fail().await)
            }
            Err(panic) => {
                tracing::error!(
                    panic = panic_message(&*panic),
                    "response body panicked; releasing the key"
                );
                Ok(lease.fail().await)
            }
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

/// The owner's hold on a scope: renews it while work runs, then completes or releases it.
struct Lease<'a, St> {
    store: &'a St,
    scope: &'a ScopeHash,
    token: FencingToken,
    policy: &'a Policy,
    observer: &'a Observer,
    lost: AtomicBool,
}

impl<St: Store> Lease<'_, St> {
    /// Runs `work`, renewing the lease every interval until it is done or the lease is lost.
    async fn hold_while<F: Future>(&self, work: F) -> F::Output {
        let mut work = pin!(work);
        let Some(every) = self
            .policy
            .renew_every
            .filter(|_| !self.lost.load(Ordering::Relaxed))
        else {
            return work.await;
        };
        let renewing = async {
            let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match self
                    .store
                    .renew(self.scope, self.token, self.policy.lease)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(
                            "idempotency lease lost while the handler runs: another request may run it \
                             again, and this result will not be stored"
                        );
                        self.observer.lease_lost();
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "idempotency lease renewal failed; retrying")
                    }
                }
            }
        };
        tokio::select! {
            output = &mut work => return output,
            () = renewing => self.lost.store(true, Ordering::Relaxed),
        }
        work.await
    }

    /// Stores `record`, retrying with back-off (still renewing) while the store fails, up to
    /// the policy's bound. Retries meanwhile get 409 (or wait): never a second execution.
    async fn complete(&self, record: &Record) {
        let retrying = async {
            let started = Instant::now();
            let mut backoff = COMPLETE_RETRY_MIN;
            loop {
                let result = self
                    .store
                    .complete(self.scope, self.token, record, self.policy.ttl)
                    .await;
                match result {
                    Ok(Completion::Stored) => return,
                    Ok(Completion::Fenced) => {
                        tracing::error!(
                            "idempotency lease was lost before completion: the response goes to this \
                             caller but is not stored (fenced)"
                        );
                        self.observer.lease_lost();
                        return;
                    }
                    Err(err) if started.elapsed() + backoff > self.policy.complete_retry => {
                        tracing::error!(
                            error = %err,
                            bound = ?self.policy.complete_retry,
                            "idempotency record could not be stored; giving up: a retry after the lease \
                             expires runs the handler again"
                        );
                        self.observer.complete_failed();
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "storing the idempotency record failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(COMPLETE_RETRY_MAX);
                    }
                }
            }
        };
        self.hold_while(retrying).await;
    }

    /// The handler or its body failed after the reservation: releases the key, so a retry
    /// may run, and answers 500 `handler-failed`.
    async fn fail<B>(&self) -> Response<ResponseBody<B>> {
        self.release().await;
        self.observer.outcome(Outcome::HandlerFailed);
        let detail = "the request failed; it may be retried with the same key";
        problem(self.policy, Problem::HandlerFailed, detail)
    }

    /// Deletes the lease so a retry may run; a failure leaves it to expire.
    async fn release(&self) {
        match self.store.release(self.scope, self.token).await {
            Ok(true) => {}
            Ok(false) => tracing::debug!("lease already gone at release"),
            Err(err) => tracing::warn!(
                error = %err,
                lease = ?self.policy.lease,
                "idempotency release failed; the key stays in flight until its lease expires"
            ),
        }
    }
}

enum Collected<B> {
    Whole(Bytes),
    TooLarge(Bytes, Pin<Box<B>>),
    Failed(BoxError),
}

/// Reads a response body up to `max` bytes; past that, hands back what was read and the rest.
async fn collect<B>(body: B, max: usize) -> Collected<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    let mut first: Option<Bytes> = None;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Err(err) => return Collected::Failed(err.into()),
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers are not stored
            },
        };
        let total = first.as_ref().map_or(0, Bytes::len) + buf.len() + data.remaining();
        if first.is_none() && buf.is_empty() {
            first = Some(data);
        } else {
            if let Some(first) = first.take() {
                buf.extend_from_slice(&first);
            }
            buf.extend_from_slice(&data);
        }
        if total > max {
            let read = first.take().unwrap_or_else(|| buf.split().freeze());
            return Collected::TooLarge(read, body);
        }
    }
    Collected::Whole(first.unwrap_or_else(|| buf.freeze()))
}
