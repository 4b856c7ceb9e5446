//! Counting the statements the store sends: [`RoundTrips`].
//!
//! A round trip is one statement (or one simple-query batch) sent to Postgres and
//! answered. Plain mode: a new request costs 2 (reserve, complete), a replay 1, a renewal
//! 1, a release 1 (a reserve that raced a concurrent insert runs its statement once more,
//! counted). Transactional mode: a new request costs 4 (the pre-read; the batch that
//! begins the transaction and reserves; the record's `UPDATE`; the `COMMIT`), a replay, a
//! mismatch or a conflict 1 (the pre-read), a release 2 (`ROLLBACK`, and a `NOTIFY` only
//! when a waiter was seen), a renewal 1 (a statement on the owner's transaction, or a look
//! at `pg_stat_activity` while the handler holds it). A reserve batch that finds its
//! session without the prepared reserve adds 1 (see `prepared.rs`); one that did not
//! reserve adds the long way (a batch that begins, the reserving statement that returns
//! the row, a `ROLLBACK`). A reserve that waited past the lock timeout adds 1 (is the
//! scope held by an owner?) and, when it was not, runs again.
//!
//! Every statement is also counted through the `metrics` facade as
//! `idempotency_store_commands_total{store="postgres", op="reserve"|"renew"|"complete"|"release"|"notify"|"purge"|"admin"}`
//! (the core's [`metrics`](tower_idempotency_core::metrics) page lists every metric).

use std::sync::atomic::{AtomicU64, Ordering};

use tower_idempotency_core::metrics::{STORE_COMMANDS_TOTAL, STORE_LOCAL_REPLAYS_TOTAL};

/// The statements a [`PostgresStore`](crate::PostgresStore) (and all its clones) sent so
/// far, per operation, from [`PostgresStore::round_trips`](crate::PostgresStore::round_trips).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundTrips {
    /// Reserving statements, with transactional mode's `BEGIN` and the `ROLLBACK` of a
    /// reserve that did not reserve.
    pub reserve: u64,
    /// Lease renewals (transactional mode: keep-alives of the owner's transaction).
    pub renew: u64,
    /// Completing statements, with transactional mode's `COMMIT`.
    pub complete: u64,
    /// Releasing statements (transactional mode: the `ROLLBACK`).
    pub release: u64,
    /// `pg_notify` sent on its own: a waiter's "I am waiting" in transactional mode, and
    /// the wake-up after a rolled-back release.
    pub notify: u64,
    /// Purge batches.
    pub purge: u64,
    /// An operator's [`inspect`](tower_idempotency_core::Store::inspect),
    /// [`forget`](tower_idempotency_core::Store::forget) or
    /// [`resolve`](tower_idempotency_core::Store::resolve).
    pub admin: u64,
    /// The sum of all of the above.
    pub total: u64,
    /// Reserves answered from the local replay tier: no statement sent (not in `total`).
    pub local_replays: u64,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Reserve,
    Renew,
    Complete,
    Release,
    Notify,
    Purge,
    Admin,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Reserve,
        Op::Renew,
        Op::Complete,
        Op::Release,
        Op::Notify,
        Op::Purge,
        Op::Admin,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Op::Reserve => "reserve",
            Op::Renew => "renew",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::Notify => "notify",
            Op::Purge => "purge",
            Op::Admin => "admin",
        }
    }
}

/// Per-operation counters shared by every clone of a store.
#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; Op::ALL.len()], AtomicU64);

impl Counters {
    /// Counts one statement sent for `op`, here and through `metrics`.
    pub(crate) fn count(&self, op: Op) {
        self.0[op as usize].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(STORE_COMMANDS_TOTAL, "store" => "postgres", "op" => op.as_str())
            .increment(1);
    }

    /// Counts one reserve answered from the local replay tier (no statement sent), here
    /// and as `idempotency_store_local_replays_total{store="postgres"}`.
    pub(crate) fn local_replay(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(STORE_LOCAL_REPLAYS_TOTAL, "store" => "postgres").increment(1);
    }

    pub(crate) fn snapshot(&self) -> RoundTrips {
        let get = |op: Op| self.0[op as usize].load(Ordering::Relaxed);
        RoundTrips {
            reserve: get(Op::Reserve),
            renew: get(Op::Renew),
            complete: get(Op::Complete),
            release: get(Op::Release),
            notify: get(Op::Notify),
            purge: get(Op::Purge),
            admin: get(Op::Admin),
            total: Op::ALL.iter().map(|&op| get(op)).sum(),
            local_replays: self.1.load(Ordering::Relaxed),
        }
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
        counters.count(Op::Notify);
        let rt = counters.snapshot();
        assert_eq!((rt.reserve, rt.complete, rt.notify, rt.renew), (2, 1, 1, 0));
        assert_eq!(rt.total, 4);
    }
}
