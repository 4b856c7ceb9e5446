//! Claiming a scope: the reserve call, and in wait mode the loop that waits for the
//! owner's result.
//!
//! [`claim`] asks the store to reserve the scope and reports what it found: the caller
//! owns it now, a completed record to replay, a payload mismatch, still in flight (the
//! wait bound passed, or conflict mode), or a store that could not answer. It needs no
//! inner service, so it is tested on its own against a store and a paused clock.
//!
//! Its rules for store errors (SPEC section 6, "fail open is narrow"):
//!
//! - Only an error on the first reserve attempt may let a `fail_open` policy pass the
//!   request through, and only an error that says the store is unavailable (unreachable,
//!   timed out, full). A record the store cannot decode is never a pass-through: the key
//!   may have completed already.
//! - Once the store said "in flight", an error keeps the waiter waiting within its bound;
//!   when the bound passes on an error, the answer is 503, never a pass-through while the
//!   owner runs.
//! - A reserve that failed with a backend error may still have run in the store (a reply
//!   lost on the way back, a local timeout): a best-effort fenced release of its token
//!   follows, as detached work, so a lease nobody holds does not make retries wait.
//!
//! Waiting: subscribe to the scope, then re-read (so no wake-up between the read and the
//! subscription is lost), then sleep until the store's notification or a back-off poll
//! (20 ms → 250 ms), whichever comes first. Every store call made while waiting is
//! bounded by the wait's deadline, so a black-holed store cannot stretch the bound.

use std::time::Duration;

use tokio::time::Instant;

use crate::detach::DetachedWork;
use crate::fingerprint::{Fingerprint, ScopeHash};
use crate::observe::{DisplayChain, Observer, StoreOp, WaitEnd, Wakeup};
use crate::policy::{InFlight, Policy};
use crate::record::Record;
use crate::store::{Reservation, Store, StoreError, Subscription};
use crate::token::FencingToken;

/// Back-off of a waiter polling a scope in flight (the store's notification is the fast
/// path).
const WAIT_POLL_MIN: Duration = Duration::from_millis(20);
const WAIT_POLL_MAX: Duration = Duration::from_millis(250);

/// What claiming a scope gave.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The caller's token holds the lease, taken by a reserve sent at `reserved_at`.
    Owner {
        token: FencingToken,
        reserved_at: Instant,
    },
    /// Completed with the same fingerprint.
    Completed(Record),
    /// Pending or completed with another fingerprint.
    Mismatch,
    /// A lease with the same fingerprint lapsed before completion, and the route refuses
    /// to run it again.
    Uncertain,
    /// Still in flight: conflict mode, or the wait bound passed.
    InFlight,
    /// The store could not answer. `may_pass` is `true` only for an unavailable store on
    /// the first attempt (the only case a `fail_open` policy passes through).
    Unavailable { error: StoreError, may_pass: bool },
}

impl Claim {
    /// How a wait ended in this claim, for [`Observer::wait_ended`].
    pub(crate) fn wait_end(&self) -> WaitEnd {
        match self {
            Claim::Owner { .. } => WaitEnd::Reserved,
            Claim::Completed(_) => WaitEnd::Completed,
            Claim::Mismatch => WaitEnd::Mismatch,
            Claim::InFlight => WaitEnd::TimedOut,
            Claim::Uncertain => WaitEnd::Uncertain,
            Claim::Unavailable { .. } => WaitEnd::StoreError,
        }
    }
}

/// Everything [`claim`] needs to know about the request.
pub(crate) struct Claimant<'a, St> {
    pub(crate) store: &'a St,
    pub(crate) scope: &'a ScopeHash,
    pub(crate) fingerprint: &'a Fingerprint,
    pub(crate) policy: &'a Policy,
    pub(crate) observer: &'a Observer,
    pub(crate) detached: &'a DetachedWork,
}

/// Reserves the scope, or waits for it as the policy says. A wait is timed from
/// [`Observer::waiting`]; the caller ends it with [`Claim::wait_end`].
///
/// Not an `async fn`, which would keep `c` twice in its future (as its argument, and moved
/// into its body): every request's future holds this one.
#[allow(clippy::manual_async_fn)] // an `async fn` would hold `c` twice (see above)
pub(crate) fn claim<'a, St: Store>(
    c: Claimant<'a, St>,
) -> impl std::future::Future<Output = Claim> + use<'a, St> {
    async move {
        let deadline = match c.policy.in_flight {
            InFlight::Conflict => None,
            InFlight::Wait(bound) => Some(saturating_deadline(Instant::now(), bound)),
        };
        // `None` until the first in-flight answer; `Some(None)` when subscribing failed and
        // the waiter falls back to polling alone.
        let mut subscription: Option<Option<St::Subscription>> = None;
        let mut backoff = WAIT_POLL_MIN;
        let mut first = true;
        // The store's last answer while waiting: `None` is "in flight".
        let mut error: Option<StoreError> = None;
        loop {
            let token = FencingToken::generate();
            let reserved_at = Instant::now();
            let reserve = c
                .store
                .reserve(c.scope, c.fingerprint, token, c.policy.lease_terms());
            // The first attempt is bounded by the store's own timeouts; later ones by the
            // wait's deadline as well. The timers of a wait are boxed: inline, they would
            // take room in every request's future (it holds this one), for a path few take.
            let answer = match deadline.filter(|_| !first) {
                None => reserve.await,
                Some(deadline) => {
                    match Box::pin(tokio::time::timeout_at(deadline, reserve)).await {
                        Ok(answer) => answer,
                        Err(_) => {
                            // The bound passed mid-call: the reserve may still run in the store.
                            release_in_case_it_ran(&c, token);
                            return give_up(error);
                        }
                    }
                }
            };
            c.observer
                .store_answered(c.store, StoreOp::Reserve, reserved_at, &answer);
            error = match answer {
                Ok(Reservation::Reserved) => return Claim::Owner { token, reserved_at },
                Ok(Reservation::Completed(record)) => return Claim::Completed(record),
                Ok(Reservation::Mismatch) => return Claim::Mismatch,
                // Waiting cannot settle it: only an operator (or its owner) can.
                Ok(Reservation::Uncertain) => return Claim::Uncertain,
                Ok(Reservation::InFlight) => None,
                Err(error) => {
                    // An unexpected answer may be a reserve that ran and whose reply was
                    // rewritten on the way (a proxy): released too, fenced by the token.
                    if matches!(error, StoreError::Backend(_) | StoreError::Unexpected(_)) {
                        release_in_case_it_ran(&c, token);
                    }
                    match error {
                        // Waiting cannot make a record readable, nor an answer this
                        // version does not know a safe one; and a store that answered is
                        // not unavailable (SPEC section 6: fail open is narrow).
                        StoreError::Decode(_) | StoreError::Unexpected(_) => {
                            return Claim::Unavailable {
                                error,
                                may_pass: false,
                            }
                        }
                        _ if first => {
                            return Claim::Unavailable {
                                error,
                                may_pass: true,
                            }
                        }
                        _ => Some(error),
                    }
                }
            };
            first = false;
            let now = Instant::now();
            let Some(deadline) = deadline.filter(|deadline| *deadline > now) else {
                return give_up(error);
            };
            c.observer.waiting(now);
            if let Some(error) = &error {
                tracing::warn!(error = %DisplayChain(error), "idempotency store failed while waiting for a request in flight; still waiting");
            }
            let Some(subscription) = &mut subscription else {
                // Subscribe, then re-read at once: a completion between the first read and the
                // subscription is seen by the re-read, one after it wakes us.
                let subscribed = Box::pin(tokio::time::timeout_at(
                    deadline,
                    c.store.subscribe(c.scope),
                ))
                .await;
                if let Ok(answer) = &subscribed {
                    c.observer
                        .store_answered(c.store, StoreOp::Subscribe, now, answer);
                }
                subscription = Some(match subscribed {
                    Ok(Ok(subscription)) => Some(subscription),
                    Ok(Err(err)) => {
                        tracing::debug!(error = %DisplayChain(&err), "subscribe failed; waiting by polling");
                        None
                    }
                    Err(_) => None,
                });
                continue;
            };
            let pause = backoff.min(deadline - now);
            let woken = match subscription {
                Some(subscription) => {
                    let sleep = Box::pin(tokio::time::sleep(pause));
                    tokio::select! {
                        () = subscription.changed() => Wakeup::Notification,
                        () = sleep => Wakeup::Poll,
                    }
                }
                None => {
                    Box::pin(tokio::time::sleep(pause)).await;
                    Wakeup::Poll
                }
            };
            c.observer.woken(woken);
            backoff = (backoff * 2).min(WAIT_POLL_MAX);
        }
    }
}

/// The answer when the wait ends: in flight, or the store's error if its last answer
/// was one (never a pass-through: the store said "in flight" before).
fn give_up(error: Option<StoreError>) -> Claim {
    match error {
        None => Claim::InFlight,
        Some(error) => Claim::Unavailable {
            error,
            may_pass: false,
        },
    }
}

/// A reserve that failed with a backend error may have run in the store (its reply was
/// lost, or it timed out here after it was sent), and so may one answered unexpectedly:
/// release `token`'s lease, if it took one, as tracked detached work. Fenced, so it never
/// touches anyone else's lease.
fn release_in_case_it_ran<St: Store>(c: &Claimant<'_, St>, token: FencingToken) {
    let (store, scope, observer) = (c.store.clone(), *c.scope, c.observer.clone());
    c.detached.spawn(async move {
        let sent = Instant::now();
        let released = store.release(&scope, token).await;
        observer.store_answered(&store, StoreOp::Release, sent, &released);
        match released {
            Ok(true) => tracing::info!("released the lease of a reserve whose answer was lost"),
            Ok(false) => {}
            Err(err) => tracing::debug!(error = %DisplayChain(&err), "fenced release after a failed reserve failed; the lease, if any, expires on its own"),
        }
    });
}

/// `now + bound`, saturating far in the future: `InFlight::Wait(Duration::MAX)` must not
/// overflow the clock.
fn saturating_deadline(now: Instant, bound: Duration) -> Instant {
    now.checked_add(bound)
        .or_else(|| now.checked_add(crate::policy::MAX_TTL))
        .unwrap_or(now)
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::observe::Meters;
    use crate::policy::Tenant;
    use crate::store::Completion;

    fn policy(in_flight: InFlight) -> Policy {
        Policy {
            in_flight,
            tenant: Tenant::Global,
            ..Policy::default()
        }
    }

    const SCOPE: ScopeHash = ScopeHash::from_bytes([3; 32]);
    const FP: Fingerprint = Fingerprint::from_bytes([4; 32]);

    async fn claim_with(store: &MemoryStore, policy: &Policy) -> Claim {
        let meters = Meters::default();
        let observer = Observer::new(&meters, "test");
        claim(Claimant {
            store,
            scope: &SCOPE,
            fingerprint: &FP,
            policy,
            observer: &observer,
            detached: &DetachedWork::new(),
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_record_the_moment_it_is_stored() {
        let store = MemoryStore::default();
        let owner = FencingToken::generate();
        store
            .reserve(&SCOPE, &FP, owner, Duration::from_secs(30).into())
            .await
            .unwrap();
        let completer = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1234)).await;
            let done = completer
                .complete(
                    &SCOPE,
                    owner,
                    &Record::NotReplayable,
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
            assert_eq!(done, Completion::Stored);
        });
        let start = Instant::now();
        let p = policy(InFlight::Wait(Duration::from_secs(10)));
        let claimed = claim_with(&store, &p).await;
        assert!(matches!(claimed, Claim::Completed(Record::NotReplayable)));
        // Woken by the store's notification, not by the next poll.
        assert_eq!(start.elapsed(), Duration::from_millis(1234));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bound_ends_the_wait_even_when_it_is_huge_or_tiny() {
        let store = MemoryStore::default();
        store
            .reserve(
                &SCOPE,
                &FP,
                FencingToken::generate(),
                Duration::from_secs(30).into(),
            )
            .await
            .unwrap();
        let start = Instant::now();
        let p = policy(InFlight::Wait(Duration::from_millis(700)));
        assert!(matches!(claim_with(&store, &p).await, Claim::InFlight));
        assert_eq!(start.elapsed(), Duration::from_millis(700));
        let p = policy(InFlight::Conflict);
        assert!(matches!(claim_with(&store, &p).await, Claim::InFlight));
        // Duration::MAX saturates; the lease expires after 30 s and the waiter owns it.
        let p = policy(InFlight::Wait(Duration::MAX));
        assert!(matches!(claim_with(&store, &p).await, Claim::Owner { .. }));
    }
}
