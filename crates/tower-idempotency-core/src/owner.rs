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
pub(crate) async fn own<S, St, ReqB>(
    job: Job<S, St>,
    body: Bytes,
    token: FencingToken,
    reserved_at: Instant,
) -> (Outcome, Output<S::ResBody, S::Error>)
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
    let policy = &shared.policy;
    let mut lease = Lease::new(&shared.store, &scope, token, policy, &observer, reserved_at);
    let mut request = Request::from_parts(parts, RequestBody::buffered(body));
    request.extensions_mut().insert(token);
    shared
        .store
        .owner_extensions(&scope, token, request.extensions_mut());
    let called = lease
        .hold_while(AssertUnwindSafe(inner.call(request)).catch_unwind())
        .await;
    let response = match called {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            tracing::debug!("handler returned an error; releasing the key");
            lease.release().await;
            return (Outcome::HandlerFailed, Err(err));
        }
        Err(panic) => {
            tracing::error!(
                panic = panic_message(&*panic),
                "handler panicked; releasing the key"
            );
            lease.release().await;
            let detail = "the request failed; it may be retried with the same key";
            return (
                Outcome::HandlerFailed,
                Ok(shared.problem(Problem::HandlerFailed, detail)),
            );
        }
    };
    if !policy.store_when.stores(response.status()) {
        // Released before the response is sent, so an immediate corrected retry runs.
        lease.release().await;
        return (Outcome::Released, Ok(response.map(ResponseBody::stream)));
    }
    let (parts, body) = response.into_parts();
    if policy.streams(&parts) {
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
        let response = Response::from_parts(parts, ResponseBody::stream(body));
        return (Outcome::Streamed, Ok(response));
    }
    let collected = lease
        .hold_while(AssertUnwindSafe(collect(body, policy.max_stored_response)).catch_unwind())
        .await;
    let (record, outcome, body) = match collected {
        Ok(Collected::Whole { data, trailers }) => {
            let record = Record::Response(StoredResponse {
                status: parts.status,
                headers: stored_headers(&parts.headers, &policy.deny_replay_headers),
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
                "response body panicked after the handler ran; storing the not-replayable marker"
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
    (outcome, Ok(Response::from_parts(parts, body)))
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
