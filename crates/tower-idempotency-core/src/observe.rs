//! Metrics and log events, one place for their names.
//!
//! Metrics go through the `metrics` facade, labelled by outcome and route template
//! (axum's `MatchedPath`), never by key or tenant:
//!
//! - `idempotency_requests_total{outcome, route}` (counter)
//! - `idempotency_request_duration_seconds{outcome, route}` (histogram)
//! - `idempotency_lease_lost_total{route}` (counter)
//! - `idempotency_complete_failed_total{route}` (counter): `complete` gave up after its
//!   retry bound; the record was not stored.

use std::sync::Arc;

use tokio::time::Instant;

/// What happened to one covered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// First request: the handler ran and its response was stored.
    New,
    /// First request: the handler ran and the key was released (response not stored).
    Released,
    /// A stored response was replayed.
    Replayed,
    /// In flight elsewhere: 409.
    Conflict,
    /// Same key, other payload: 422.
    Mismatch,
    /// The stored record is a not-replayable marker: 409.
    NotReplayable,
    /// The response was too large to store: streamed, marker stored.
    TooLargeToStore,
    /// The store failed and the policy fails closed: 503.
    StoreError,
    /// The store failed and the policy fails open: passed through.
    FailOpen,
    /// The handler panicked, failed, or its body failed: key released, 500 or the error.
    HandlerFailed,
    /// Key missing (required), invalid, or scope not configured.
    Rejected,
    /// Request body over the limit: 413.
    TooLarge,
    /// Request body unreadable: 400.
    Unreadable,
    /// No key and the key is optional.
    NoKey,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Released => "released",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::NotReplayable => "not_replayable",
            Outcome::TooLargeToStore => "too_large_to_store",
            Outcome::StoreError => "store_error",
            Outcome::FailOpen => "fail_open",
            Outcome::HandlerFailed => "handler_failed",
            Outcome::Rejected => "rejected",
            Outcome::TooLarge => "too_large",
            Outcome::Unreadable => "unreadable",
            Outcome::NoKey => "no_key",
        }
    }
}

/// The route label of one request, and when it started.
#[derive(Clone, Debug)]
pub(crate) struct Observer {
    route: Arc<str>,
    started: Instant,
}

impl Observer {
    pub(crate) fn new(route: Arc<str>) -> Self {
        Observer {
            route,
            started: Instant::now(),
        }
    }

    pub(crate) fn route(&self) -> &str {
        &self.route
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        // Static outcome and shared route: labels cost no allocation of their own.
        let labels = [
            metrics::Label::from_static_parts("outcome", outcome.as_str()),
            metrics::Label::new("route", self.route.clone()),
        ];
        metrics::counter!("idempotency_requests_total", labels.iter()).increment(1);
        metrics::histogram!("idempotency_request_duration_seconds", labels.iter())
            .record(self.started.elapsed().as_secs_f64());
        tracing::debug!(outcome = outcome.as_str(), route = %self.route, "idempotency outcome");
    }

    pub(crate) fn lease_lost(&self) {
        metrics::counter!("idempotency_lease_lost_total", "route" => self.route.clone())
            .increment(1);
    }

    pub(crate) fn complete_failed(&self) {
        metrics::counter!("idempotency_complete_failed_total", "route" => self.route.clone())
            .increment(1);
    }
}
