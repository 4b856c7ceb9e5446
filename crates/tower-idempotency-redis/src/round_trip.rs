//! Counting the commands the store sends: [`RoundTrips`].
//!
//! A round trip is one command the client sends to Redis; the commands a script runs
//! inside Redis do not count. A new request costs 2 (reserve, complete), a replay 1
//! (reserve), a renewal 1; the `EVAL` that follows a `NOSCRIPT` reply counts as one more.
//! With [`wait_replicas`](crate::RedisStore::wait_replicas), a new request costs at most
//! one more: a `WAIT` after its complete (completes that finish while a `WAIT` is under
//! way on their connection share the next one).
//! Every command is also counted through the `metrics` facade as
//! `idempotency_store_commands_total{store="redis", op="reserve"|"renew"|"complete"|"release"|"subscribe"|"unsubscribe"|"wait"|"admin"}`
//! (the core's [`metrics`](tower_idempotency_core::metrics) page lists every metric).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tower_idempotency_core::metrics::{STORE_COMMANDS_TOTAL, STORE_LOCAL_REPLAYS_TOTAL};

/// The commands a [`RedisStore`](crate::RedisStore) (and all its clones) sent so far, per
/// operation, from [`RedisStore::round_trips`](crate::RedisStore::round_trips).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundTrips {
    /// `EVALSHA`/`EVAL` of the reserve script.
    pub reserve: u64,
    /// `EVALSHA`/`EVAL` of the renew script.
    pub renew: u64,
    /// `EVALSHA`/`EVAL` of the complete script.
    pub complete: u64,
    /// `EVALSHA`/`EVAL` of the release script.
    pub release: u64,
    /// `SSUBSCRIBE` on the shared subscriber connection (first local waiter of a scope,
    /// and re-subscriptions after a reconnect).
    pub subscribe: u64,
    /// `SUNSUBSCRIBE` after the last local waiter of a scope went away.
    pub unsubscribe: u64,
    /// `WAIT` for replicas after a complete, with
    /// [`wait_replicas`](crate::RedisStore::wait_replicas) (0 without it).
    pub wait: u64,
    /// An operator's [`inspect`](tower_idempotency_core::Store::inspect),
    /// [`forget`](tower_idempotency_core::Store::forget) or
    /// [`resolve`](tower_idempotency_core::Store::resolve): one script each.
    pub admin: u64,
    /// The sum of all of the above: every command sent.
    pub total: u64,
    /// Reserves answered from the local replay tier: no command sent (not in `total`).
    pub local_replays: u64,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Reserve,
    Renew,
    Complete,
    Release,
    Subscribe,
    Unsubscribe,
    Wait,
    /// An operator's inspect, forget or resolve.
    Admin,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Reserve,
        Op::Renew,
        Op::Complete,
        Op::Release,
        Op::Subscribe,
        Op::Unsubscribe,
        Op::Wait,
        Op::Admin,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Reserve => "reserve",
            Op::Renew => "renew",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::Subscribe => "subscribe",
            Op::Unsubscribe => "unsubscribe",
            Op::Wait => "wait",
            Op::Admin => "admin",
        }
    }
}

/// Per-operation counters shared by every clone of a store.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    commands: [AtomicU64; Op::ALL.len()],
    local_replays: AtomicU64,
    /// The metric handles, registered with the recorder on first use and reused: a
    /// command then costs an atomic update, not a lookup in the recorder.
    metrics: [OnceLock<metrics::Counter>; Op::ALL.len()],
    local_metric: OnceLock<metrics::Counter>,
}

impl Counters {
    /// Counts one command sent for `op`, here and through `metrics`.
    pub(crate) fn count(&self, op: Op) {
        self.commands[op as usize].fetch_add(1, Ordering::Relaxed);
        self.metrics[op as usize]
            .get_or_init(
                || metrics::counter!(STORE_COMMANDS_TOTAL, "store" => "redis", "op" => op.as_str()),
            )
            .increment(1);
    }

    /// Counts one reserve answered from the local replay tier (no command sent), here and
    /// as `idempotency_store_local_replays_total{store="redis"}`.
    pub(crate) fn local_replay(&self) {
        self.local_replays.fetch_add(1, Ordering::Relaxed);
        self.local_metric
            .get_or_init(|| metrics::counter!(STORE_LOCAL_REPLAYS_TOTAL, "store" => "redis"))
            .increment(1);
    }

    pub(crate) fn snapshot(&self) -> RoundTrips {
        let get = |op: Op| self.commands[op as usize].load(Ordering::Relaxed);
        let mut out = RoundTrips {
            reserve: get(Op::Reserve),
            renew: get(Op::Renew),
            complete: get(Op::Complete),
            release: get(Op::Release),
            subscribe: get(Op::Subscribe),
            unsubscribe: get(Op::Unsubscribe),
            wait: get(Op::Wait),
            admin: get(Op::Admin),
            total: 0,
            local_replays: self.local_replays.load(Ordering::Relaxed),
        };
        out.total = Op::ALL.iter().map(|&op| get(op)).sum();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_operation_and_in_total() {
        let counters = Counters::default();
        counters.count(Op::Reserve);
        counters.count(Op::Reserve);
        counters.count(Op::Complete);
        counters.count(Op::Unsubscribe);
        let rt = counters.snapshot();
        assert_eq!(
            (rt.reserve, rt.complete, rt.unsubscribe, rt.renew),
            (2, 1, 1, 0)
        );
        assert_eq!(rt.total, 4);
    }
}
