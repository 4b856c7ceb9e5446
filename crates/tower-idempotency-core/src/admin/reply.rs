//! The admin routes' answers: JSON, or RFC 9457 problems whose `type` links to a section
//! of the [module docs](super).

use axum::body::Body;
use axum::response::Response;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;

use crate::problems::PROBLEM_JSON;

/// The prefix of the admin routes' problem `type` URIs: the sections of the
/// [module docs](super), one per case.
pub const PROBLEM_TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/admin/index.html#";

/// Each case an admin route refuses, with its status and the result the audit log
/// records for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    ActorMissing,
    InvalidRequest,
    UnsupportedMediaType,
    RequestTooLarge,
    KeyAbsent,
    KeyInFlight,
    NotSupported,
    StoreUnavailable,
}

impl Refusal {
    #[cfg(test)]
    pub(super) const ALL: [Refusal; 8] = [
        Refusal::ActorMissing,
        Refusal::InvalidRequest,
        Refusal::UnsupportedMediaType,
        Refusal::RequestTooLarge,
        Refusal::KeyAbsent,
        Refusal::KeyInFlight,
        Refusal::NotSupported,
        Refusal::StoreUnavailable,
    ];

    pub(super) fn slug(self) -> &'static str {
        match self {
            Refusal::ActorMissing => "actor-missing",
            Refusal::InvalidRequest => "invalid-request",
            Refusal::UnsupportedMediaType => "unsupported-media-type",
            Refusal::RequestTooLarge => "request-too-large",
            Refusal::KeyAbsent => "key-absent",
            Refusal::KeyInFlight => "key-in-flight",
            Refusal::NotSupported => "not-supported",
            Refusal::StoreUnavailable => "store-unavailable",
        }
    }

    pub(super) fn status(self) -> StatusCode {
        match self {
            Refusal::ActorMissing => StatusCode::FORBIDDEN,
            Refusal::InvalidRequest => StatusCode::BAD_REQUEST,
            Refusal::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::KeyAbsent => StatusCode::NOT_FOUND,
            Refusal::KeyInFlight => StatusCode::CONFLICT,
            Refusal::NotSupported => StatusCode::NOT_IMPLEMENTED,
            Refusal::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Refusal::ActorMissing => "No operator on the request",
            Refusal::InvalidRequest => "Invalid admin request",
            Refusal::UnsupportedMediaType => "The answer must be application/json",
            Refusal::RequestTooLarge => "The answer is too large",
            Refusal::KeyAbsent => "No record for this key",
            Refusal::KeyInFlight => "A request holds this key",
            Refusal::NotSupported => "The store does not support this operation",
            Refusal::StoreUnavailable => "Idempotency store unavailable",
        }
    }

    /// The `result` field of the audit event.
    pub(super) fn result(self) -> &'static str {
        match self {
            Refusal::ActorMissing => "no_actor",
            Refusal::InvalidRequest => "invalid_request",
            Refusal::UnsupportedMediaType => "unsupported_media_type",
            Refusal::RequestTooLarge => "request_too_large",
            Refusal::KeyAbsent => "absent",
            Refusal::KeyInFlight => "in_flight",
            Refusal::NotSupported => "unsupported",
            Refusal::StoreUnavailable => "store_error",
        }
    }

    /// The problem+json response, with `detail`.
    pub(super) fn response(self, detail: &str) -> Response {
        let json = serde_json::json!({
            "type": format!("{PROBLEM_TYPE_BASE}{}", self.slug()),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": detail,
        });
        let mut response = Response::new(Body::from(json.to_string()));
        *response.status_mut() = self.status();
        response.headers_mut().insert(CONTENT_TYPE, PROBLEM_JSON);
        response
    }
}

/// A 200 with `json`.
pub(super) fn ok(json: &serde_json::Value) -> Response {
    let mut response = Response::new(Body::from(json.to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slug_has_a_section_in_the_module_docs() {
        let docs = include_str!("mod.rs");
        for refusal in Refusal::ALL {
            let heading = format!("//! # {}\n", refusal.slug());
            assert!(docs.contains(&heading), "no section {heading:?}");
            let row = format!("[`{}`](#{})", refusal.slug(), refusal.slug());
            assert!(docs.contains(&row), "no row {row:?} in the table of errors");
        }
    }
}
