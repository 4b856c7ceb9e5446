//! Metrics and log events, one place for their names.
//!
//! Metrics go through the `metrics` facade, labelled by outcome, route template (axum's
//! `MatchedPath`) and store, never by key or tenant. Their names, types, units and labels
//! are public documentation: the [`metrics`](crate::metrics) module. Handles are
//! registered on first use and kept, so a request costs atomic updates, not lookups in the
//! recorder.
//!
//! Logs: the request span (`idempotency`, at INFO) carries the route template and, once
//! known, the outcome; errors are logged with their whole cause chain ([`DisplayChain`]).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Histogram};

use tokio::time::Instant;

use crate::metrics as names;
use crate::store::{Store, StoreError};

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
    /// The response is a stream (`text/event-stream`, or the policy's `stream_when`):
    /// marker stored, then passed through unbuffered.
    Streamed,
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
            Outcome::Streamed => "streamed",
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

const OUTCOMES: usize = 20;
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
    /// Set once this layer gave the recorder its help texts ([`names::describe`]).
    described: OnceLock<()>,
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
    /// `idempotency_store_duration_seconds` per [`StoreOp`]: a layer has one store, so the
    /// `store` label is the same for every call of one operation.
    store_calls: [OnceLock<Histogram>; StoreOp::ALL.len()],
    /// `idempotency_wait_duration_seconds` per [`WaitEnd`].
    waits: [OnceLock<Histogram>; WaitEnd::ALL.len()],
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
        // A route seen for the first time: the recorder is in place by now.
        self.described.get_or_init(names::describe);
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
                    store_calls: std::array::from_fn(|_| OnceLock::new()),
                    waits: std::array::from_fn(|_| OnceLock::new()),
                })
            })
            .clone()
    }
}

/// The route of one request, its meters, when it started, and when it started waiting.
pub(crate) struct Observer {
    meters: Arc<RouteMeters>,
    started: Instant,
    /// When the request started waiting for the same key in flight: nanoseconds since
    /// `started` plus one, 0 while it does not wait. An atomic, not a field of the claim's
    /// future, so the future every request moves around stays the size it was.
    waiting: AtomicU64,
}

impl Clone for Observer {
    fn clone(&self) -> Self {
        Observer {
            meters: self.meters.clone(),
            started: self.started,
            waiting: AtomicU64::new(self.waiting.load(Ordering::Relaxed)),
        }
    }
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
            waiting: AtomicU64::new(0),
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
                metrics::counter!(names::REQUESTS_TOTAL, labels.iter()),
                metrics::histogram!(names::REQUEST_DURATION_SECONDS, labels.iter()),
            )
        });
        counter.increment(1);
        histogram.record(self.started.elapsed().as_secs_f64());
        tracing::debug!(outcome = outcome.as_str(), route = %self.meters.route, "idempotency outcome");
    }

    pub(crate) fn lease_lost(&self) {
        self.meters
            .lease_lost
            .get_or_init(
                || metrics::counter!(names::LEASE_LOST_TOTAL, "route" => self.meters.route.clone()),
            )
            .increment(1);
    }

    pub(crate) fn woken(&self, via: Wakeup) {
        self.meters.wakeups[via as usize]
            .get_or_init(|| {
                metrics::counter!(
                    names::WAIT_WAKEUPS_TOTAL,
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
                metrics::counter!(names::COMPLETE_FAILED_TOTAL, "route" => self.meters.route.clone())
            })
            .increment(1);
    }
}

impl Observer {
    /// One call of the layer to `store`, sent at `sent`, answered `answer`: records its
    /// duration and, if it failed, its error. (A call cut short by a waiter's deadline
    /// has no answer and is not recorded.)
    pub(crate) fn store_answered<St: Store, T>(
        &self,
        store: &St,
        op: StoreOp,
        sent: Instant,
        answer: &Result<T, StoreError>,
    ) {
        self.meters.store_calls[op as usize]
            .get_or_init(|| {
                metrics::histogram!(
                    names::STORE_DURATION_SECONDS,
                    "store" => store.name(),
                    "op" => op.as_str()
                )
            })
            .record(sent.elapsed().as_secs_f64());
        if let Err(error) = answer {
            // Rare: registered per error, not kept.
            metrics::counter!(
                names::STORE_ERRORS_TOTAL,
                "store" => store.name(),
                "op" => op.as_str(),
                "error" => error_label(error)
            )
            .increment(1);
        }
    }

    /// The store answered "in flight" at `now` and the request waits: the wait started
    /// then, unless it started before.
    pub(crate) fn waiting(&self, now: Instant) {
        // Nanoseconds since `started`, plus one: 0 is "not waiting".
        let since = now.saturating_duration_since(self.started).as_nanos();
        let since = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
        let _ = self
            .waiting
            .compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The claim is over: if it waited, record how long and how it ended.
    pub(crate) fn wait_ended(&self, ended: WaitEnd) {
        let since = self.waiting.swap(0, Ordering::Relaxed);
        if since == 0 {
            return;
        }
        let waited = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_nanos(since - 1));
        self.meters.waits[ended as usize]
            .get_or_init(|| {
                metrics::histogram!(
                    names::WAIT_DURATION_SECONDS,
                    "route" => self.meters.route.clone(),
                    "ended" => ended.as_str()
                )
            })
            .record(waited.as_secs_f64());
    }
}

/// Records `outcome` on the current span (the request's `idempotency` span, inside the
/// layer's work), so the events logged after it, and the span's close, show it.
pub(crate) fn record_outcome(outcome: Outcome) {
    // Without a subscriber at INFO there is no span: skip the look-up of the current one.
    if tracing::level_enabled!(tracing::Level::INFO) {
        tracing::Span::current().record("outcome", outcome.as_str());
    }
}

/// The `error` label of a store error.
fn error_label(error: &StoreError) -> &'static str {
    match error {
        StoreError::Full { .. } => "full",
        StoreError::Decode(_) => "decode",
        StoreError::Unexpected(_) => "unexpected",
        // `Backend`, and whatever a later version adds.
        _ => "backend",
    }
}

/// A [`Store`] method the layer calls: the `op` label of the store metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Reserve,
    Renew,
    Complete,
    Release,
    Subscribe,
}

impl StoreOp {
    const ALL: [StoreOp; 5] = [
        StoreOp::Reserve,
        StoreOp::Renew,
        StoreOp::Complete,
        StoreOp::Release,
        StoreOp::Subscribe,
    ];

    fn as_str(self) -> &'static str {
        match self {
            StoreOp::Reserve => "reserve",
            StoreOp::Renew => "renew",
            StoreOp::Complete => "complete",
            StoreOp::Release => "release",
            StoreOp::Subscribe => "subscribe",
        }
    }
}

/// How a wait for a request in flight ended: the `ended` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// The first request's response, to replay.
    Completed,
    /// The key came free (released, or the lease lapsed) and this waiter owns it.
    Reserved,
    /// Another payload holds the key: 422.
    Mismatch,
    /// The bound passed: 409.
    TimedOut,
    /// The first request's lease lapsed before it completed, and the route refuses such
    /// keys: 409 `operation-uncertain`.
    Uncertain,
    /// The store failed: 503.
    StoreError,
}

impl WaitEnd {
    const ALL: [WaitEnd; 6] = [
        WaitEnd::Completed,
        WaitEnd::Reserved,
        WaitEnd::Mismatch,
        WaitEnd::TimedOut,
        WaitEnd::Uncertain,
        WaitEnd::StoreError,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WaitEnd::Completed => "completed",
            WaitEnd::Reserved => "reserved",
            WaitEnd::Mismatch => "mismatch",
            WaitEnd::TimedOut => "timed_out",
            WaitEnd::Uncertain => "uncertain",
            WaitEnd::StoreError => "store_error",
        }
    }
}

/// The fullness gauges of a [`MemoryStore`](crate::MemoryStore), registered on first use.
///
/// Set from the store's own counters after each change, with no lock: under concurrent
/// changes a set may land after a newer one and leave the gauge a few entries off until
/// the next change. Several memory stores in one process share the gauges (the last
/// change wins).
#[cfg(feature = "memory")]
#[derive(Debug, Default)]
pub(crate) struct MemoryGauges {
    /// Entries and bytes.
    handles: OnceLock<[metrics::Gauge; 2]>,
}

#[cfg(feature = "memory")]
impl MemoryGauges {
    pub(crate) fn set(&self, entries: usize, bytes: usize, max_entries: usize, max_bytes: usize) {
        let [entries_gauge, bytes_gauge] = self.handles.get_or_init(|| {
            // The bounds never change: set once.
            metrics::gauge!(names::MEMORY_STORE_MAX_ENTRIES, "store" => "memory")
                .set(max_entries as f64);
            metrics::gauge!(names::MEMORY_STORE_MAX_BYTES, "store" => "memory")
                .set(max_bytes as f64);
            [
                metrics::gauge!(names::MEMORY_STORE_ENTRIES, "store" => "memory"),
                metrics::gauge!(names::MEMORY_STORE_BYTES, "store" => "memory"),
            ]
        });
        entries_gauge.set(entries as f64);
        bytes_gauge.set(bytes as f64);
    }
}

/// Displays an error with its sources, `a: b: c`, so a log line carries the whole cause
/// (the Redis or Postgres error, not only "store backend unavailable").
///
/// ```
/// use tower_idempotency_core::{DisplayChain, StoreError};
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let error = StoreError::backend(refused);
/// assert_eq!(DisplayChain(&error).to_string(), "store backend unavailable: connection refused");
/// // In a log event: tracing::error!(error = %DisplayChain(&error), "...");
/// ```
#[derive(Clone, Copy, Debug)]
pub struct DisplayChain<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_documented_in_order() {
        use Outcome::*;
        let all = [
            New,
            Fenced,
            CompleteFailed,
            BodyFailed,
            RolledBack,
            Released,
            Replayed,
            Conflict,
            Mismatch,
            NotReplayable,
            Uncertain,
            TooLargeToStore,
            Streamed,
            StoreError,
            FailOpen,
            HandlerFailed,
            Rejected,
            TooLarge,
            Unreadable,
            NoKey,
        ];
        assert_eq!(all.len(), OUTCOMES);
        let mut documented: Vec<&str> = names::OUTCOMES.iter().map(|(o, _)| *o).collect();
        let mut recorded: Vec<&str> = all.iter().map(|o| o.as_str()).collect();
        documented.sort_unstable();
        recorded.sort_unstable();
        assert_eq!(documented, recorded);
    }

    #[test]
    fn label_values_match_the_docs() {
        let docs = include_str!("metrics.rs");
        for op in StoreOp::ALL {
            assert!(docs.contains(&format!("`{}`", op.as_str())), "{op:?}");
        }
        for ended in WaitEnd::ALL {
            assert!(
                docs.contains(&format!("`{}` (", ended.as_str())),
                "{ended:?}"
            );
        }
        let errors = [
            StoreError::backend(std::io::Error::other("x")),
            StoreError::Decode(crate::record::DecodeError::UnknownVersion(9)),
            StoreError::Full {
                entries: 1,
                max_entries: 1,
                bytes: 0,
                max_bytes: 1,
            },
        ];
        for error in &errors {
            assert!(
                docs.contains(&format!("`{}` (", error_label(error))),
                "{error}"
            );
        }
        for via in [Wakeup::Notification, Wakeup::Poll] {
            assert!(docs.contains(&format!("`{}`", via.as_str())), "{via:?}");
        }
    }

    #[test]
    fn a_chain_shows_every_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = StoreError::backend(Outer(std::io::Error::other("inner")));
        assert_eq!(
            DisplayChain(&err).to_string(),
            "store backend unavailable: outer: inner"
        );
    }
}
