//! The owner's path: call the inner service under the lease, read its response, then
//! complete (store the record) or release the key.
//!
//! The rules (SPEC sections 5 and 6):
//!
//! - A handler that panics or returns an error releases the key (the caller gets a 500
//!   problem, or the error).
//! - A status the store policy does not keep releases the key before the response goes
//!   out, so an immediate corrected retry runs.
//! - Once the handler returned a status the policy stores, the operation counts as done:
//!   the body is read (up to the stored-response limit) and stored. A body over the limit
//!   is streamed to the caller and the not-replayable marker stored; a body that fails or
//!   panics mid-stream stores the marker as well — never a release that would let a retry
//!   run the operation again.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::collect::{collect, Collected};
use crate::lease::{Completed, Lease};
use crate::observe::{DisplayChain, Outcome};
use crate::problems::Problem;
use crate::record::{Record, StoredResponse};
use crate::replay::stored_headers;
use crate::token::FencingToken;
use crate::work::{Inner, Job, Output, Shared};
use crate::Store;

/// Runs the request as the owner of `token`'s lease, taken at `reserved_at`.
///
/// Not an `async fn`, for the size of its future (allocated once per new key; under
/// about 1 KiB, glibc serves it from its thread cache): an `async fn` keeps its arguments
/// for its whole life, beside what its body moves them into. Here the request is built
/// and handed to the inner service before the future exists, and the future keeps only
/// what the rest needs.
pub(crate) fn own<S, St, ReqB>(
    job: Job<S, St>,
    body: Bytes,
    token: FencingToken,
    reserved_at: Instant,
) -> impl std::future::Future<Output = (Outcome, Output<S::ResBody, S::Error>)> + Send
where
    S: Inner<ReqB>,
    St: Store,
    ReqB: Body + Send + 'static,
{
    let Job {
        mut inner,
        shared,
        parts,
        scope,
        observer,
        ..
    } = job;
    let mut request = Request::from_parts(parts, RequestBody::buffered(body));
    request.extensions_mut().insert(token);
    shared
        .store
        .owner_extensions(&scope, token, request.extensions_mut());
    // Boxed: the inner service's future (axum's holds the request until its first poll)
    // would otherwise sit in this future for its whole life, copied on every move. A
    // service that panics in `call` itself (a `service_fn` or `map_request` closure runs
    // there) is a handler that panicked too: caught here, it releases the key like one,
    // where the panic would otherwise leave the lease to lapse (409s meanwhile, and an
    // uncertain key on a route that refuses them).
    let call = std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request)))
        .map(|future| Box::pin(AssertUnwindSafe(future).catch_unwind()));
    async move {
        let policy = &shared.policy;
        let mut lease = Lease::new(&shared.store, &scope, token, policy, &observer, reserved_at);
        // Whatever waits for an `.await` in this future takes room in it (allocated once
        // per new key) for good. So the handler's answer is settled by a plain function,
        // a release is boxed with its answer (a handler that failed is not the common
        // path), and what is kept is used in place, not destructured into locals that
        // would each take room of their own.
        let called = match call {
            Ok(call) => lease.hold_while(call).await,
            Err(panic) => Err(panic),
        };
        let kept = match settle(called, &shared) {
            Ok(kept) => kept,
            Err(answer) => return Box::pin(released(&mut lease, *answer)).await,
        };
        if policy.streams(&kept.parts) {
            // A stream (server-sent events): its first byte must not wait for the last. The
            // operation counts as done, so the marker is stored first; then the body passes
            // through as it comes.
            tracing::debug!(
                "streamed response: storing the not-replayable marker, then passing it through"
            );
            let completed = lease.complete(&Record::NotReplayable).await;
            if let Completed::RolledBack = completed {
                return (Outcome::RolledBack, Ok(rolled_back(&shared)));
            }
            let response = Response::from_parts(kept.parts, ResponseBody::stream(kept.body));
            return (Outcome::Streamed, Ok(response));
        }
        let collecting =
            AssertUnwindSafe(collect(kept.body, policy.max_stored_response)).catch_unwind();
        let (record, outcome, body) = match lease.hold_while(collecting).await {
            Ok(Collected::Whole { data, trailers }) => {
                let record = Record::Response(StoredResponse {
                    status: kept.parts.status,
                    headers: stored_headers(&kept.parts.headers, &policy.deny_replay_headers),
                    body: data.clone(),
                });
                let body = ResponseBody::full_with_trailers(data, trailers);
                (record, Outcome::New, body)
            }
            Ok(Collected::TooLarge { read, rest }) => {
                tracing::warn!(
                    limit = policy.max_stored_response,
                    "response too large to store; retries will get 409 response-not-replayable"
                );
                let body = ResponseBody::prefixed(read, rest);
                (Record::NotReplayable, Outcome::TooLargeToStore, body)
            }
            Ok(Collected::Failed { read, error }) => {
                tracing::error!(
                    error = %DisplayChain(&*error),
                    "response body failed after the handler ran; storing the not-replayable marker"
                );
                let body = ResponseBody::failed(read, error);
                (Record::NotReplayable, Outcome::BodyFailed, body)
            }
            Err(panic) => {
                let message = panic_message(&*panic).to_owned();
                tracing::error!(
                    panic = message,
                    "response body panicked after the handler ran; storing the not-replayable \
                     marker"
                );
                let error: BoxError = format!("response body panicked: {message}").into();
                let body = ResponseBody::failed(Bytes::new(), error);
                (Record::NotReplayable, Outcome::BodyFailed, body)
            }
        };
        let outcome = match (lease.complete(&record).await, outcome) {
            (Completed::RolledBack, _) => return (Outcome::RolledBack, Ok(rolled_back(&shared))),
            (Completed::Stored, outcome) => outcome,
            (Completed::Fenced, Outcome::New) => Outcome::Fenced,
            (Completed::GaveUp, Outcome::New) => Outcome::CompleteFailed,
            // Not stored either way; the lease-lost and complete-failed counters say why.
            (Completed::Fenced | Completed::GaveUp, outcome) => outcome,
        };
        (outcome, Ok(Response::from_parts(kept.parts, body)))
    }
}

/// A handler's response whose status the policy stores: it completes the key.
struct Kept<B> {
    parts: http::response::Parts,
    body: B,
}

/// Releases the key, then gives `answer`.
async fn released<St: Store, T>(lease: &mut Lease<'_, St>, answer: T) -> T {
    lease.release().await;
    answer
}

/// What the handler's answer means for the key: kept (a status the policy stores: the
/// response's parts and body, to complete with), or to be released, with the answer to
/// send once it is (boxed, see `own`).
#[allow(clippy::type_complexity)] // the handler's output, and the two ways on
fn settle<St, B, E>(
    called: Result<Result<Response<B>, E>, Box<dyn Any + Send>>,
    shared: &Shared<St>,
) -> Result<Kept<B>, Box<(Outcome, Output<B, E>)>> {
    match called {
        Ok(Ok(response)) => {
            let (parts, body) = response.into_parts();
            if shared.policy.store_when.stores(parts.status) {
                return Ok(Kept { parts, body });
            }
            // Released before the response is sent, so an immediate corrected retry runs.
            let response = Response::from_parts(parts, ResponseBody::stream(body));
            Err(Box::new((Outcome::Released, Ok(response))))
        }
        Ok(Err(err)) => {
            tracing::debug!("handler returned an error; releasing the key");
            Err(Box::new((Outcome::HandlerFailed, Err(err))))
        }
        Err(panic) => {
            tracing::error!(
                panic = panic_message(&*panic),
                "handler panicked; releasing the key"
            );
            let detail = "the request failed; it may be retried with the same key";
            let problem = shared.problem(Problem::HandlerFailed, detail);
            Err(Box::new((Outcome::HandlerFailed, Ok(problem))))
        }
    }
}

/// The answer when the commit of the handler's writes with the record failed.
fn rolled_back<St, B>(shared: &Shared<St>) -> Response<ResponseBody<B>> {
    let detail = "the operation was rolled back with its idempotency record (the commit \
                  failed); retry with the same key";
    shared.problem(Problem::StoreUnavailable, detail)
}

/// The message of a panic payload, for the log.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}
