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
//! - `idempotency_wait_wakeups_total{route, via}` (counter): a waiter (`InFlight::Wait`)
//!   woke to re-read its scope, `via="notification"` (the store's pub/sub or `Notify`) or
//!   `via="poll"` (the back-off timer). Mostly `poll` means notifications are not
//!   arriving (e.g. a Redis user without channel permissions).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use metrics::{Counter, Histogram};

use tokio::time::Instant;

/// What happened to one covered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// First request: the handler ran and its response was stored.
    New,
    /// First request: the handler ran, but its lease was lost first, so the response
    /// went to the caller and was not stored (fenced off by a newer owner).
    Fenced,
    /// First request: the handler ran, but storing the response failed past the
    /// `complete_retry` bound.
    CompleteFailed,
    /// First request: the handler returned a status the policy stores and its body then
    /// failed; the not-replayable marker was stored.
    BodyFailed,
    /// First request: the handler ran, but the commit of its writes with the record
    /// failed, so neither happened: 503.
    RolledBack,
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
    /// The first request's lease lapsed before it recorded an answer, and the route
    /// refuses to run it again: 409 `operation-uncertain`.
    Uncertain,
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
            Outcome::Fenced => "fenced",
            Outcome::CompleteFailed => "complete_failed",
            Outcome::BodyFailed => "body_failed",
            Outcome::RolledBack => "rolled_back",
            Outcome::Released => "released",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::NotReplayable => "not_replayable",
            Outcome::Uncertain => "uncertain",
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

const OUTCOMES: usize = 19;
// Every outcome has a slot in `RouteMeters::outcomes`.
const _: () = assert!(Outcome::NoKey as usize + 1 == OUTCOMES);

impl Outcome {
    fn index(self) -> usize {
        self as usize
    }
}

/// The metric handles of one layer, per route, registered on first use and reused: with
/// them a request costs two atomic updates, not a key lookup in the recorder.
///
/// Handles come from the recorder installed when a route first records an outcome, so
/// install the recorder before serving (as `metrics` recommends).
#[derive(Default)]
pub(crate) struct Meters {
    /// The first route this layer served: with `route_layer` usually its only one, found
    /// without a lock or a hash.
    first: OnceLock<Arc<RouteMeters>>,
    routes: RwLock<HashMap<Arc<str>, Arc<RouteMeters>>>,
}

impl fmt::Debug for Meters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meters").finish_non_exhaustive()
    }
}

struct RouteMeters {
    route: Arc<str>,
    outcomes: [OnceLock<(Counter, Histogram)>; OUTCOMES],
    lease_lost: OnceLock<Counter>,
    complete_failed: OnceLock<Counter>,
    wakeups: [OnceLock<Counter>; 2],
}

/// What woke a waiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wakeup {
    /// The store's notification (pub/sub, `Notify`).
    Notification,
    /// The back-off poll timer.
    Poll,
}

impl Wakeup {
    fn as_str(self) -> &'static str {
        match self {
            Wakeup::Notification => "notification",
            Wakeup::Poll => "poll",
        }
    }
}

impl Meters {
    fn route(&self, route: &str) -> Arc<RouteMeters> {
        if let Some(first) = self.first.get() {
            if *first.route == *route {
                return first.clone();
            }
        }
        let meters = self.lookup(route);
        let _ = self.first.set(meters.clone());
        meters
    }

    fn lookup(&self, route: &str) -> Arc<RouteMeters> {
        // A poisoned lock only means a panic elsewhere while it was held; the map is
        // still a valid cache.
        if let Some(found) = self
            .routes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(route)
        {
            return found.clone();
        }
        let mut routes = self
            .routes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        routes
            .entry(Arc::from(route))
            .or_insert_with_key(|route| {
                Arc::new(RouteMeters {
                    route: route.clone(),
                    outcomes: std::array::from_fn(|_| OnceLock::new()),
                    lease_lost: OnceLock::new(),
                    complete_failed: OnceLock::new(),
                    wakeups: [OnceLock::new(), OnceLock::new()],
                })
            })
            .clone()
    }
}

/// The route of one request, its meters, and when it started.
#[derive(Clone)]
pub(crate) struct Observer {
    meters: Arc<RouteMeters>,
    started: Instant,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("route", &self.meters.route)
            .finish()
    }
}

impl Observer {
    pub(crate) fn new(meters: &Meters, route: &str) -> Self {
        Observer {
            meters: meters.route(route),
            started: Instant::now(),
        }
    }

    pub(crate) fn route(&self) -> &str {
        &self.meters.route
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        let (counter, histogram) = self.meters.outcomes[outcome.index()].get_or_init(|| {
            let labels = [
                metrics::Label::from_static_parts("outcome", outcome.as_str()),
                metrics::Label::new("route", self.meters.route.clone()),
            ];
            (
                metrics::counter!("idempotency_requests_total", labels.iter()),
                metrics::histogram!("idempotency_request_duration_seconds", labels.iter()),
            )
        });
        counter.increment(1);
        histogram.record(self.started.elapsed().as_secs_f64());
        tracing::debug!(outcome = outcome.as_str(), route = %self.meters.route, "idempotency outcome");
    }

    pub(crate) fn lease_lost(&self) {
        self.meters
            .lease_lost
            .get_or_init(|| {
                metrics::counter!("idempotency_lease_lost_total", "route" => self.meters.route.clone())
            })
            .increment(1);
    }

    pub(crate) fn woken(&self, via: Wakeup) {
        self.meters.wakeups[via as usize]
            .get_or_init(|| {
                metrics::counter!(
                    "idempotency_wait_wakeups_total",
                    "route" => self.meters.route.clone(),
                    "via" => via.as_str()
                )
            })
            .increment(1);
    }

    pub(crate) fn complete_failed(&self) {
        self.meters
            .complete_failed
            .get_or_init(|| {
                metrics::counter!("idempotency_complete_failed_total", "route" => self.meters.route.clone())
            })
            .increment(1);
    }
}
