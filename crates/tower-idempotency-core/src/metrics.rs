//! Every metric the layer and the stores record: name, type, unit, labels, meaning, and a
//! PromQL query to start from.
//!
//! Metrics go through the [`metrics`](https://docs.rs/metrics) facade, so any recorder
//! works (Prometheus, StatsD, OpenTelemetry bridges); install it before serving. Labels
//! carry the outcome, the route *template* (axum's `MatchedPath`, e.g.
//! `/orders/{id}/cancel`) and the store, never a key, a tenant or a raw path. Each layer
//! calls [`describe`] when it first records, so exporters carry the help text and units
//! below; call it yourself to describe them before the first request.
//!
//! | name | type | unit | labels | meaning | example PromQL |
//! | --- | --- | --- | --- | --- | --- |
//! | `idempotency_requests_total` | counter | count | `outcome`, `route` | Covered requests (the policy's methods) by how they ended; see [Outcomes](#outcomes). | `sum by (route, outcome) (rate(idempotency_requests_total[5m]))` |
//! | `idempotency_request_duration_seconds` | histogram | seconds | `outcome`, `route` | From the layer receiving the request to its response head (for a new request: after the record is stored). | `histogram_quantile(0.99, sum by (le, route) (rate(idempotency_request_duration_seconds_bucket{outcome="replayed"}[5m])))` |
//! | `idempotency_lease_lost_total` | counter | count | `route` | An owner lost its lease while it worked (a renewal found it gone, or the completion was fenced): another request may run the operation again, and this result is not stored. | `sum by (route) (increase(idempotency_lease_lost_total[15m])) > 0` |
//! | `idempotency_complete_failed_total` | counter | count | `route` | Storing a finished response failed past the `complete_retry` bound (default 60 s): a retry after the lease expires runs the handler again. | `sum by (route) (increase(idempotency_complete_failed_total[15m]))` |
//! | `idempotency_wait_wakeups_total` | counter | count | `route`, `via` | A waiter (`InFlight::Wait`) woke to re-read its key, by the store's notification or by its back-off poll. Mostly `poll` means notifications do not arrive (e.g. a Redis user without channel permissions). | `sum by (via) (rate(idempotency_wait_wakeups_total[5m]))` |
//! | `idempotency_wait_duration_seconds` | histogram | seconds | `route`, `ended` | How long a waiter waited for a request in flight with its key, from the first "in flight" answer to the end of the wait. | `histogram_quantile(0.99, sum by (le, route) (rate(idempotency_wait_duration_seconds_bucket[5m])))` |
//! | `idempotency_store_duration_seconds` | histogram | seconds | `store`, `op` | One store call the layer made, answered or failed (a call cut short by a waiter's own deadline is not counted). | `histogram_quantile(0.99, sum by (le, store, op) (rate(idempotency_store_duration_seconds_bucket[5m])))` |
//! | `idempotency_store_errors_total` | counter | count | `store`, `op`, `error` | A store call the layer made that failed. | `sum by (store, op, error) (rate(idempotency_store_errors_total[5m]))` |
//! | `idempotency_store_commands_total` | counter | count | `store`, `op` | Commands (Redis) or statements (Postgres) the store sent: its round trips. | `sum by (store, op) (rate(idempotency_store_commands_total[5m]))` |
//! | `idempotency_store_local_replays_total` | counter | count | `store` | Redis: replays answered from the local replay tier, with no command sent. | `sum(rate(idempotency_store_local_replays_total[5m])) / sum(rate(idempotency_requests_total{outcome="replayed"}[5m]))` |
//! | `idempotency_store_wait_replicas_short_total` | counter | count | `store` | Redis with `wait_replicas`: a stored record that fewer replicas than asked acknowledged in time (a failover now may lose it). | `sum(increase(idempotency_store_wait_replicas_short_total[15m]))` |
//! | `idempotency_memory_store_entries` | gauge | count | `store` | Entries a `MemoryStore` holds (pending or completed, expired ones not yet swept). | `idempotency_memory_store_entries / idempotency_memory_store_max_entries` |
//! | `idempotency_memory_store_max_entries` | gauge | count | `store` | The `MemoryStore`'s entry capacity (`max_entries`); a full store answers 503. | `idempotency_memory_store_max_entries` |
//! | `idempotency_memory_store_bytes` | gauge | bytes | `store` | What a `MemoryStore`'s entries count against its byte budget. | `idempotency_memory_store_bytes / idempotency_memory_store_max_bytes` |
//! | `idempotency_memory_store_max_bytes` | gauge | bytes | `store` | The `MemoryStore`'s byte budget (`max_bytes`); a full store answers 503. | `idempotency_memory_store_max_bytes` |
//!
//! # Labels
//!
//! - `route`: the route template (axum's `MatchedPath`); `unmatched` where there is none
//!   (`nest_service`, fallbacks, or the `axum` feature off).
//! - `store`: [`Store::name`](crate::Store::name): `memory`, `redis`, `postgres` (a store of
//!   your own: `custom` unless it says otherwise).
//! - `op` of `idempotency_store_duration_seconds` and `idempotency_store_errors_total`: the
//!   [`Store`](crate::Store) method the layer called: `reserve`, `renew`, `complete`,
//!   `release`, `subscribe`.
//! - `op` of `idempotency_store_commands_total`: Redis `reserve`, `renew`, `complete`,
//!   `release`, `subscribe`, `unsubscribe`, `wait`; Postgres `reserve`, `renew`, `complete`,
//!   `release`, `notify`, `purge`.
//! - `error`: `backend` (unreachable, timed out, or an error answer), `full` (a bounded
//!   store refused a new reservation), `decode` (a record this version cannot read, e.g.
//!   written by a newer one during a rolling upgrade) or `unexpected` (an answer this
//!   version cannot act on safely: a row it never writes, a deadlock on the key).
//! - `via`: `notification` or `poll`.
//! - `ended`: how a wait ended: `completed` (the first request's response, replayed),
//!   `reserved` (the first request released its key, or its lease lapsed, and this waiter
//!   became the owner), `mismatch` (422), `timed_out` (the bound passed: 409),
//!   `uncertain` (409 `operation-uncertain`) or `store_error` (503).
//!
//! # Outcomes
//!
//! The `outcome` label of `idempotency_requests_total` and
//! `idempotency_request_duration_seconds` ([`OUTCOMES`] lists them):
//!
//! | outcome | answer | meaning |
//! | --- | --- | --- |
//! | `new` | the handler's | the handler ran and its response was stored |
//! | `replayed` | the stored response | a retry got the first response back |
//! | `released` | the handler's | the handler ran; the policy does not store its status (by default 4xx and 5xx), so the key was released |
//! | `conflict` | 409 `request-in-flight` | the key is in flight (conflict mode, or the wait bound passed) |
//! | `mismatch` | 422 `idempotency-key-reused` | the key was used with another payload |
//! | `not_replayable` | 409 `response-not-replayable` | the first response could not be stored (too large, or its body failed) |
//! | `uncertain` | 409 `operation-uncertain` | the first request's lease lapsed before it recorded an answer, and the route refuses to run it again until an operator resolves or forgets the key |
//! | `too_large_to_store` | the handler's | the response was over the stored-size limit: sent once, not replayable |
//! | `streamed` | the handler's, unbuffered | the response is a stream (`text/event-stream`, or the route's `stream_when`): passed through as it comes, not replayable |
//! | `body_failed` | the handler's, cut | the response body failed after a stored status: not replayable |
//! | `fenced` | the handler's | the lease was lost before completion: the response went to this caller and was not stored |
//! | `complete_failed` | the handler's | storing the response failed past `complete_retry` |
//! | `rolled_back` | 503 `store-unavailable` | transactional Postgres: the commit of the handler's writes and the record failed, so neither happened |
//! | `store_error` | 503 `store-unavailable` | the store was unreachable, full, could not decode the record, or answered unexpectedly (fail closed) |
//! | `fail_open` | the handler's | the store was unavailable and the policy fails open: the request ran without idempotency |
//! | `handler_failed` | 500 `handler-failed`, or the service's error | the handler panicked or failed; the key was released |
//! | `rejected` | 400 `idempotency-key-missing` / `-invalid`, 500 `scope-not-configured` | the key was missing (required) or malformed, or no tenant was found |
//! | `too_large` | 413 `request-body-too-large` | the request body was over the limit |
//! | `unreadable` | 400 `request-body-unreadable` | the request body could not be read |
//! | `no_key` | the handler's | no key, and the key is optional: passed through |
//!
//! # Prometheus
//!
//! Histograms are recorded in seconds. `metrics-exporter-prometheus` renders histograms as
//! summaries unless it is given buckets, and the queries above (and the dashboard in the
//! repository's `ops/` folder) need `_bucket` series: give it [`DURATION_BUCKETS`] (or
//! your own). Leave its recommended naming off: the names above already end in their
//! unit or `_total`.
//!
//! # Example
//!
//! ```
//! use tower_idempotency_core::metrics::{self, Kind};
//!
//! // After installing the recorder: help text and units for every metric below.
//! metrics::describe();
//!
//! let requests = metrics::ALL.iter().find(|m| m.name == metrics::REQUESTS_TOTAL);
//! assert_eq!(requests.map(|m| (m.kind, m.labels)), Some((Kind::Counter, &["outcome", "route"][..])));
//! assert!(metrics::OUTCOMES.iter().any(|(outcome, _)| *outcome == "replayed"));
//! ```

/// Covered requests by outcome and route (counter).
pub const REQUESTS_TOTAL: &str = "idempotency_requests_total";
/// Time to the response head by outcome and route (histogram, seconds).
pub const REQUEST_DURATION_SECONDS: &str = "idempotency_request_duration_seconds";
/// Leases lost while their owner worked, by route (counter).
pub const LEASE_LOST_TOTAL: &str = "idempotency_lease_lost_total";
/// Completions that gave up past `complete_retry`, by route (counter).
pub const COMPLETE_FAILED_TOTAL: &str = "idempotency_complete_failed_total";
/// Waiter wake-ups by route and cause (counter).
pub const WAIT_WAKEUPS_TOTAL: &str = "idempotency_wait_wakeups_total";
/// How long waiters waited, by route and how the wait ended (histogram, seconds).
pub const WAIT_DURATION_SECONDS: &str = "idempotency_wait_duration_seconds";
/// Store calls the layer made, by store and operation (histogram, seconds).
pub const STORE_DURATION_SECONDS: &str = "idempotency_store_duration_seconds";
/// Store calls the layer made that failed, by store, operation and error (counter).
pub const STORE_ERRORS_TOTAL: &str = "idempotency_store_errors_total";
/// Commands or statements a store sent, by store and operation (counter).
pub const STORE_COMMANDS_TOTAL: &str = "idempotency_store_commands_total";
/// Redis replays answered from the local replay tier (counter).
pub const STORE_LOCAL_REPLAYS_TOTAL: &str = "idempotency_store_local_replays_total";
/// Redis records fewer replicas than asked acknowledged in time (counter).
pub const STORE_WAIT_REPLICAS_SHORT_TOTAL: &str = "idempotency_store_wait_replicas_short_total";
/// Entries a `MemoryStore` holds (gauge).
pub const MEMORY_STORE_ENTRIES: &str = "idempotency_memory_store_entries";
/// A `MemoryStore`'s entry capacity (gauge).
pub const MEMORY_STORE_MAX_ENTRIES: &str = "idempotency_memory_store_max_entries";
/// What a `MemoryStore`'s entries count against its byte budget (gauge, bytes).
pub const MEMORY_STORE_BYTES: &str = "idempotency_memory_store_bytes";
/// A `MemoryStore`'s byte budget (gauge, bytes).
pub const MEMORY_STORE_MAX_BYTES: &str = "idempotency_memory_store_max_bytes";

/// The type of a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// Only goes up; query it with `rate` or `increase`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations (Prometheus: `_bucket`, `_sum`, `_count`).
    Histogram,
}

/// The unit of a metric's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unit {
    /// A plain count (events, entries).
    Count,
    /// Seconds.
    Seconds,
    /// Bytes.
    Bytes,
}

/// One row of the table in the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metric {
    /// The metric's name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The unit of its values.
    pub unit: Unit,
    /// Its label names, every one always present.
    pub labels: &'static [&'static str],
    /// What it means: the help text [`describe`] gives the recorder.
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    unit: Unit,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        unit,
        labels,
        help,
    }
}

/// Every metric, in the order of the table in the [module docs](self).
pub const ALL: &[Metric] = &[
    metric(
        REQUESTS_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["outcome", "route"],
        "Requests covered by an idempotency layer, by outcome and route template.",
    ),
    metric(
        REQUEST_DURATION_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        &["outcome", "route"],
        "Time from the idempotency layer receiving a request to its response head.",
    ),
    metric(
        LEASE_LOST_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["route"],
        "Leases lost while their owner worked: a second execution is possible and the \
         result is not stored.",
    ),
    metric(
        COMPLETE_FAILED_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["route"],
        "Responses whose record could not be stored within the complete-retry bound.",
    ),
    metric(
        WAIT_WAKEUPS_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["route", "via"],
        "Wake-ups of requests waiting for the same key in flight, by notification or poll.",
    ),
    metric(
        WAIT_DURATION_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        &["route", "ended"],
        "How long requests waited for the same key in flight, by how the wait ended.",
    ),
    metric(
        STORE_DURATION_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        &["store", "op"],
        "Duration of the idempotency store calls the layer made, answered or failed.",
    ),
    metric(
        STORE_ERRORS_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["store", "op", "error"],
        "Idempotency store calls that failed, by error: backend, full, decode or unexpected.",
    ),
    metric(
        STORE_COMMANDS_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["store", "op"],
        "Commands (Redis) or statements (Postgres) the idempotency store sent.",
    ),
    metric(
        STORE_LOCAL_REPLAYS_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["store"],
        "Replays the Redis store answered from its local replay tier, without a command.",
    ),
    metric(
        STORE_WAIT_REPLICAS_SHORT_TOTAL,
        Kind::Counter,
        Unit::Count,
        &["store"],
        "Records stored on the Redis primary that fewer replicas than asked acknowledged.",
    ),
    metric(
        MEMORY_STORE_ENTRIES,
        Kind::Gauge,
        Unit::Count,
        &["store"],
        "Entries the in-memory idempotency store holds.",
    ),
    metric(
        MEMORY_STORE_MAX_ENTRIES,
        Kind::Gauge,
        Unit::Count,
        &["store"],
        "Entry capacity of the in-memory idempotency store (503 when reached).",
    ),
    metric(
        MEMORY_STORE_BYTES,
        Kind::Gauge,
        Unit::Bytes,
        &["store"],
        "Bytes the in-memory idempotency store's entries count against its budget.",
    ),
    metric(
        MEMORY_STORE_MAX_BYTES,
        Kind::Gauge,
        Unit::Bytes,
        &["store"],
        "Byte budget of the in-memory idempotency store (503 when reached).",
    ),
];

/// Every value of the `outcome` label, with its meaning (the table under
/// [Outcomes](self#outcomes)).
pub const OUTCOMES: &[(&str, &str)] = &[
    ("new", "the handler ran and its response was stored"),
    ("replayed", "a retry got the first response back"),
    (
        "released",
        "the handler ran; its status is not stored, so the key was released",
    ),
    ("conflict", "409 request-in-flight"),
    ("mismatch", "422 idempotency-key-reused"),
    ("not_replayable", "409 response-not-replayable"),
    (
        "uncertain",
        "409 operation-uncertain: the first request's lease lapsed unanswered",
    ),
    (
        "too_large_to_store",
        "sent once, over the stored-size limit",
    ),
    (
        "streamed",
        "passed through unbuffered (an event stream): not replayable",
    ),
    (
        "body_failed",
        "the response body failed after a stored status",
    ),
    ("fenced", "the lease was lost before completion: not stored"),
    (
        "complete_failed",
        "storing the response failed past complete_retry",
    ),
    ("rolled_back", "503: the transactional commit failed"),
    ("store_error", "503 store-unavailable"),
    (
        "fail_open",
        "the store was unavailable: ran without idempotency",
    ),
    (
        "handler_failed",
        "the handler panicked or failed: key released",
    ),
    (
        "rejected",
        "400 key missing or invalid, 500 scope-not-configured",
    ),
    ("too_large", "413 request-body-too-large"),
    ("unreadable", "400 request-body-unreadable"),
    ("no_key", "no key, key optional: passed through"),
];

/// Histogram buckets (seconds) that fit the durations above, from a memory store call
/// (tens of microseconds) to a wait bound or a slow handler (a minute):
/// `PrometheusBuilder::set_buckets(DURATION_BUCKETS)`.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Gives the installed recorder the help text and unit of every metric in [`ALL`].
///
/// Each layer calls it when it first records, so with the recorder installed before
/// serving there is nothing to do; call it yourself to describe the metrics before the
/// first request (or after installing a recorder later).
pub fn describe() {
    for metric in ALL {
        let unit = match metric.unit {
            Unit::Count => ::metrics::Unit::Count,
            Unit::Seconds => ::metrics::Unit::Seconds,
            Unit::Bytes => ::metrics::Unit::Bytes,
        };
        match metric.kind {
            Kind::Counter => ::metrics::describe_counter!(metric.name, unit, metric.help),
            Kind::Gauge => ::metrics::describe_gauge!(metric.name, unit, metric.help),
            Kind::Histogram => ::metrics::describe_histogram!(metric.name, unit, metric.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of the module docs' metric table: name, type, unit, labels.
    fn documented() -> Vec<(String, String, String, Vec<String>)> {
        include_str!("metrics.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("//! | `idempotency_"))
            .map(|row| {
                let cells: Vec<&str> = row.split(" | ").collect();
                let name = format!("idempotency_{}", cells[0].trim_end_matches('`'));
                let labels = cells[3]
                    .split(", ")
                    .map(|label| label.trim_matches('`').to_owned())
                    .collect();
                (name, cells[1].to_owned(), cells[2].to_owned(), labels)
            })
            .collect()
    }

    #[test]
    fn the_docs_table_is_the_list_of_metrics() {
        let listed: Vec<_> = ALL
            .iter()
            .map(|m| {
                let kind = format!("{:?}", m.kind).to_lowercase();
                let unit = format!("{:?}", m.unit).to_lowercase();
                let labels = m.labels.iter().map(|l| l.to_string()).collect();
                (m.name.to_owned(), kind, unit, labels)
            })
            .collect();
        assert_eq!(documented(), listed);
    }

    #[test]
    fn the_outcomes_table_lists_every_outcome() {
        let documented: Vec<&str> = include_str!("metrics.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("//! | `"))
            .filter_map(|row| row.split_once("` | ").map(|(value, _)| value))
            .filter(|value| !value.starts_with("idempotency_"))
            .collect();
        let listed: Vec<&str> = OUTCOMES.iter().map(|(value, _)| *value).collect();
        assert_eq!(documented, listed);
    }

    #[test]
    fn names_are_prometheus_names_with_their_unit() {
        for m in ALL {
            assert!(
                m.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                m.name
            );
            match (m.kind, m.unit) {
                (Kind::Counter, _) => assert!(m.name.ends_with("_total"), "{}", m.name),
                (_, Unit::Seconds) => assert!(m.name.ends_with("_seconds"), "{}", m.name),
                (_, Unit::Bytes) => assert!(m.name.ends_with("_bytes"), "{}", m.name),
                _ => {}
            }
        }
    }
}
