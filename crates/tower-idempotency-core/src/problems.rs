//! The layer's own error responses: RFC 9457 `application/problem+json`, one stable
//! `type` per case.
//!
//! Every response the layer produces itself (rather than the handler) is a
//! [`Rejection`]: a [`Problem`] (status, slug, title) and a `detail` for this request.
//! By default it goes out as `application/problem+json` whose `type` is
//! [`PROBLEM_TYPE_BASE`] followed by the slug — the sections of this page — so clients
//! branch on the `type`, not on the status alone. An application with its own error
//! format sets its own base
//! ([`IdempotencyLayer::problem_type_base`](crate::IdempotencyLayer::problem_type_base))
//! or renders rejections itself
//! ([`IdempotencyLayer::render_rejections`](crate::IdempotencyLayer::render_rejections)).
//!
//! | `type` slug | status | when |
//! | --- | --- | --- |
//! | [`idempotency-key-missing`](#idempotency-key-missing) | 400 | the route requires a key and there is none |
//! | [`idempotency-key-invalid`](#idempotency-key-invalid) | 400 | malformed, empty, too long, or two header fields |
//! | [`request-body-unreadable`](#request-body-unreadable) | 400 | the request body failed while it was read |
//! | [`request-body-too-large`](#request-body-too-large) | 413 | the body is over the route's limit (`Connection: close`) |
//! | [`idempotency-key-reused`](#idempotency-key-reused) | 422 | same key, different payload |
//! | [`request-in-flight`](#request-in-flight) | 409 | same key still running (`Retry-After`) |
//! | [`response-not-replayable`](#response-not-replayable) | 409 | the first request ran, its response could not be stored |
//! | [`operation-uncertain`](#operation-uncertain) | 409 | the first request's lease lapsed before it finished: it may or may not have happened |
//! | [`store-unavailable`](#store-unavailable) | 503 | the store is unreachable or full (`Retry-After`) |
//! | [`scope-not-configured`](#scope-not-configured) | 500 | the server found no tenant for the request |
//! | [`handler-failed`](#handler-failed) | 500 | the handler panicked or failed; the key was released |
//!
//! # idempotency-key-missing
//!
//! Status 400. The endpoint requires an `Idempotency-Key` header and the request had none.
//! Nothing ran. **Client:** generate a unique key (a UUID) for the operation, send it,
//! and reuse the same key for every retry of that operation.
//!
//! # idempotency-key-invalid
//!
//! Status 400. The key is not 1–255 characters of visible ASCII (0x21–0x7E), is a malformed
//! quoted string, or the header appears twice. Nothing ran. **Client:** fix the key; a
//! UUID is always valid.
//!
//! # request-body-unreadable
//!
//! Status 400. The request body failed while it was read (a reset connection, bad chunking).
//! Nothing ran. **Client:** retry with the same key.
//!
//! # request-body-too-large
//!
//! Status 413, with `Connection: close`. The body is over the route's limit. Nothing ran.
//! **Client:** do not retry the same body; send a smaller one (a new operation, so a new
//! key).
//!
//! # idempotency-key-reused
//!
//! Status 422. The key was already used for a request with another payload (method, path,
//! query, fingerprinted headers or body), finished or still running. Nothing ran.
//! **Client:** a key names one operation: use a new key for a new operation, or resend
//! exactly the original request to get its answer.
//!
//! # request-in-flight
//!
//! Status 409, with `Retry-After`. The first request with this key is still running. Nothing
//! ran a second time. **Client:** retry with the same key and payload after
//! `Retry-After` seconds; you will get the first request's answer once it is done.
//!
//! # response-not-replayable
//!
//! Status 409. The first request with this key ran, but its response could not be stored: it
//! was larger than the server stores, it failed mid-stream, or it was a stream (such as
//! server-sent events) sent as it came. It will not run again.
//! **Client:** do not retry with this key; look the result up another way (e.g. `GET`
//! the resource).
//!
//! # operation-uncertain
//!
//! Status 409. The first request with this key started, but its server stopped renewing its
//! hold on the key (it crashed, froze, or lost the store) before it recorded an answer: the
//! operation may or may not have happened. The route refuses to run it again until an
//! operator decides (resolves the key with the real answer, or forgets it so the next
//! request runs). **Client:** do not retry blindly; look the result up another way (e.g.
//! `GET` the resource), or retry later: once an operator resolved the key, the retry
//! gets the recorded answer.
//!
//! # store-unavailable
//!
//! Status 503, with `Retry-After`. The server cannot reach its idempotency store, so it cannot
//! tell whether the operation already ran; it refuses rather than risk running it twice.
//! **Client:** retry with the same key after `Retry-After` seconds.
//!
//! # scope-not-configured
//!
//! Status 500. The server could not tell which caller the request belongs to (its tenant), so it
//! cannot scope the key. A server configuration problem; nothing ran. **Client:** check
//! your credentials; otherwise contact the API's operators.
//!
//! # handler-failed
//!
//! Status 500. The operation failed (the handler panicked or returned an error), and the key was
//! released. **Client:** retry with the same key; the operation runs again.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

/// The default prefix of every problem `type` URI: the sections of this module's page,
/// one per [`Problem::slug`].
pub const PROBLEM_TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/problems/index.html#";

/// `application/problem+json`.
pub const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// Every kind of response the layer produces itself. See the [module docs](self) for
/// what each one means to a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Problem {
    /// 400: the policy requires a key and there is none.
    KeyMissing,
    /// 400: malformed, empty, too long, or repeated key header.
    KeyInvalid,
    /// 400: the request body could not be read.
    BodyUnreadable,
    /// 413: the request body is over the limit.
    BodyTooLarge,
    /// 422: same key, different payload.
    KeyReused,
    /// 409: same key still in flight.
    InFlight,
    /// 409: the first request ran, but its response could not be stored.
    NotReplayable,
    /// 409: the first request's lease lapsed before it recorded an answer; the route
    /// refuses to run it again until an operator resolves or forgets the key.
    OperationUncertain,
    /// 503: the store is unavailable or full.
    StoreUnavailable,
    /// 500: the tenant could not be resolved.
    ScopeNotConfigured,
    /// 500: the handler panicked or failed.
    HandlerFailed,
}

impl Problem {
    /// The stable slug that ends the `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            Problem::KeyMissing => "idempotency-key-missing",
            Problem::KeyInvalid => "idempotency-key-invalid",
            Problem::BodyUnreadable => "request-body-unreadable",
            Problem::BodyTooLarge => "request-body-too-large",
            Problem::KeyReused => "idempotency-key-reused",
            Problem::InFlight => "request-in-flight",
            Problem::NotReplayable => "response-not-replayable",
            Problem::OperationUncertain => "operation-uncertain",
            Problem::StoreUnavailable => "store-unavailable",
            Problem::ScopeNotConfigured => "scope-not-configured",
            Problem::HandlerFailed => "handler-failed",
        }
    }

    /// The HTTP status of the response.
    pub fn status(self) -> StatusCode {
        match self {
            Problem::KeyMissing | Problem::KeyInvalid | Problem::BodyUnreadable => {
                StatusCode::BAD_REQUEST
            }
            Problem::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::InFlight | Problem::NotReplayable | Problem::OperationUncertain => {
                StatusCode::CONFLICT
            }
            Problem::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Problem::ScopeNotConfigured | Problem::HandlerFailed => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A short, fixed summary of the case.
    pub fn title(self) -> &'static str {
        match self {
            Problem::KeyMissing => "Idempotency key missing",
            Problem::KeyInvalid => "Idempotency key invalid",
            Problem::BodyUnreadable => "Request body unreadable",
            Problem::BodyTooLarge => "Request body too large",
            Problem::KeyReused => "Idempotency key reused with a different payload",
            Problem::InFlight => "Request with this idempotency key is in flight",
            Problem::NotReplayable => "Response cannot be replayed",
            Problem::OperationUncertain => "Outcome of the first request is uncertain",
            Problem::StoreUnavailable => "Idempotency store unavailable",
            Problem::ScopeNotConfigured => "Idempotency scope not configured",
            Problem::HandlerFailed => "Request failed",
        }
    }

    /// Whether the answer carries `Retry-After` (409 in flight, 503).
    pub fn retries_after(self) -> bool {
        matches!(self, Problem::InFlight | Problem::StoreUnavailable)
    }
}

/// One response the layer produces itself: a [`Problem`], this request's `detail`, and
/// what the layer adds to it (`Retry-After`, the `type` URI base).
///
/// Render it yourself with
/// [`IdempotencyLayer::render_rejections`](crate::IdempotencyLayer::render_rejections);
/// by default it becomes [`Rejection::problem_json`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    problem: Problem,
    detail: String,
    retry_after: Option<u64>,
    type_base: Arc<str>,
}

impl Rejection {
    pub(crate) fn new(
        problem: Problem,
        detail: String,
        retry_after_secs: u64,
        type_base: Arc<str>,
    ) -> Self {
        Rejection {
            problem,
            detail,
            retry_after: problem.retries_after().then_some(retry_after_secs.max(1)),
            type_base,
        }
    }

    /// The case.
    pub fn problem(&self) -> Problem {
        self.problem
    }

    /// The HTTP status ([`Problem::status`]).
    pub fn status(&self) -> StatusCode {
        self.problem.status()
    }

    /// The stable slug ([`Problem::slug`]).
    pub fn slug(&self) -> &'static str {
        self.problem.slug()
    }

    /// The fixed title ([`Problem::title`]).
    pub fn title(&self) -> &'static str {
        self.problem.title()
    }

    /// What happened to this request, in a sentence.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The `Retry-After` seconds, for 409 `request-in-flight` and 503.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// The `type` URI: the layer's base (default [`PROBLEM_TYPE_BASE`]) and the slug.
    pub fn type_uri(&self) -> String {
        format!("{}{}", self.type_base, self.slug())
    }

    /// The default rendering: `application/problem+json` with `type`, `title`, `status`
    /// and `detail`, plus `Retry-After` or `Connection: close` where the case calls for
    /// them.
    pub fn problem_json(&self) -> Response<Bytes> {
        let json = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": self.detail,
        });
        let mut response = Response::new(Bytes::from(json.to_string()));
        *response.status_mut() = self.status();
        response.headers_mut().insert(CONTENT_TYPE, PROBLEM_JSON);
        self.add_protocol_headers(&mut response);
        response
    }

    /// `Retry-After` and `Connection: close` belong to the protocol, not to the format:
    /// added to a custom rendering too when it lacks them.
    pub(crate) fn add_protocol_headers<B>(&self, response: &mut Response<B>) {
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            if !headers.contains_key(RETRY_AFTER) {
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        if self.problem == Problem::BodyTooLarge {
            // The rest of the body is not read: the connection cannot be reused.
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status().as_u16(),
            self.slug(),
            self.detail
        )
    }
}

/// An application's own rendering of rejections; see
/// [`IdempotencyLayer::render_rejections`](crate::IdempotencyLayer::render_rejections).
pub(crate) type Renderer = Arc<dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(problem: Problem) -> Rejection {
        Rejection::new(problem, "why".into(), 0, Arc::from(PROBLEM_TYPE_BASE))
    }

    #[test]
    fn body_is_rfc9457() {
        let response = rejection(Problem::KeyReused).problem_json();
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(
            json["type"],
            format!("{PROBLEM_TYPE_BASE}idempotency-key-reused")
        );
        assert_eq!(json["status"], 422);
        assert!(json["title"].is_string() && json["detail"] == "why");
    }

    #[test]
    fn retry_after_and_close() {
        let r = rejection(Problem::InFlight).problem_json();
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        let r = rejection(Problem::BodyTooLarge).problem_json();
        assert_eq!(r.headers()[CONNECTION], "close");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
    }

    #[test]
    fn every_slug_has_a_section_in_the_module_docs() {
        let docs = include_str!("problems.rs");
        for problem in [
            Problem::KeyMissing,
            Problem::KeyInvalid,
            Problem::BodyUnreadable,
            Problem::BodyTooLarge,
            Problem::KeyReused,
            Problem::InFlight,
            Problem::NotReplayable,
            Problem::OperationUncertain,
            Problem::StoreUnavailable,
            Problem::ScopeNotConfigured,
            Problem::HandlerFailed,
        ] {
            let heading = format!("//! # {}\n", problem.slug());
            assert!(docs.contains(&heading), "no section {heading:?}");
        }
    }
}
