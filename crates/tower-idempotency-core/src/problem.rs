//! The layer's own error responses: RFC 9457 `application/problem+json`.
//!
//! Every case has a stable `type` URI, [`PROBLEM_TYPE_BASE`] followed by the case's slug
//! ([`Problem::slug`]), so clients can branch on it rather than on the status alone.
//!
//! | problem | status | when |
//! | --- | --- | --- |
//! | `idempotency-key-missing` | 400 | the policy requires a key and there is none |
//! | `idempotency-key-invalid` | 400 | malformed, empty, too long, or two header fields |
//! | `request-body-unreadable` | 400 | the request body failed while it was read |
//! | `request-body-too-large` | 413 | the body is over the policy's limit (`Connection: close`) |
//! | `idempotency-key-reused` | 422 | same key, different payload |
//! | `request-in-flight` | 409 | same key still running (`Retry-After`) |
//! | `response-not-replayable` | 409 | the first response was too large to store |
//! | `store-unavailable` | 503 | the store is unreachable or full (`Retry-After`) |
//! | `scope-not-configured` | 500 | no tenant could be resolved for an authenticated request |
//! | `handler-failed` | 500 | the handler panicked or failed; the key was released |

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

/// The prefix of every problem `type` URI.
pub const PROBLEM_TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/problems/";

/// `application/problem+json`.
pub const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// Every error response the layer produces itself.
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
    /// 409: the first response was too large to store.
    NotReplayable,
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
            Problem::InFlight | Problem::NotReplayable => StatusCode::CONFLICT,
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
            Problem::StoreUnavailable => "Idempotency store unavailable",
            Problem::ScopeNotConfigured => "Idempotency scope not configured",
            Problem::HandlerFailed => "Request failed",
        }
    }

    /// The full `type` URI.
    pub fn type_uri(self) -> String {
        format!("{PROBLEM_TYPE_BASE}{}", self.slug())
    }

    /// The problem+json body, with `detail`.
    pub fn body(self, detail: &str) -> Bytes {
        let json = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": detail,
        });
        Bytes::from(json.to_string())
    }

    /// The whole response, with `Retry-After` (409 in flight, 503) or `Connection: close`
    /// (413) where the case calls for it.
    pub(crate) fn response<B>(
        self,
        detail: &str,
        retry_after_secs: u64,
        body: impl FnOnce(Bytes) -> B,
    ) -> Response<B> {
        let mut response = Response::new(body(self.body(detail)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, PROBLEM_JSON);
        match self {
            Problem::InFlight | Problem::StoreUnavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
            }
            Problem::BodyTooLarge => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_rfc9457() {
        let body = Problem::KeyReused.body("the key was used with another payload");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["type"],
            format!("{PROBLEM_TYPE_BASE}idempotency-key-reused")
        );
        assert_eq!(json["status"], 422);
        assert!(json["title"].is_string() && json["detail"].is_string());
    }

    #[test]
    fn retry_after_and_close() {
        let r = Problem::InFlight.response("x", 0, |b| b);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        let r = Problem::BodyTooLarge.response("x", 1, |b| b);
        assert_eq!(r.headers()[CONNECTION], "close");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
    }
}
