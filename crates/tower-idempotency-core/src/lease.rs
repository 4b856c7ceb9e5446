//! The owner's hold on a scope: one renewal schedule across the whole ownership, then a
//! completion (retried while the store fails) or a release.
//!
//! SPEC section 6: the lease is renewed while the owner works — the handler, the body
//! collection and the retries of `complete` alike. One schedule spans them all: the next
//! renewal is due one interval after the last confirmation by the store (the reservation
//! counts as the first), whatever phase the owner is in, and a failed renewal is retried
//! quickly while the lease lasts. With an interval of at most a third of the lease (the
//! policy refuses more), one failed renewal never loses it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::fingerprint::ScopeHash;
use crate::observe::{DisplayChain, Observer, StoreOp};
use crate::policy::Policy;
use crate::record::Record;
use crate::store::{Completion, Store};
use crate::token::FencingToken;

/// First retry of a failed renewal (or half the interval, if that is shorter); doubled
/// per failure up to half the interval.
const RENEW_RETRY_MIN: Duration = Duration::from_millis(100);
/// Back-off between attempts to store a completed record while the store is down.
const COMPLETE_RETRY_MIN: Duration = Duration::from_millis(50);
const COMPLETE_RETRY_MAX: Duration = Duration::from_secs(2);

/// How a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completed {
    /// The record is stored: retries replay it.
    Stored,
    /// The lease was lost before: the record was not stored (fenced off).
    Fenced,
    /// The store kept failing past the policy's `complete_retry` bound.
    GaveUp,
    /// The record was to commit with the handler's own writes, and the commit failed:
    /// neither happened.
    RolledBack,
}

/// The lease of one owner.
pub(crate) struct Lease<'a, St> {
    store: &'a St,
    scope: &'a ScopeHash,
    token: FencingToken,
    policy: &'a Policy,
    observer: &'a Observer,
    /// When the next renewal is due (`None`: renewal is off or the lease is lost).
    due: Option<Instant>,
}

impl<'a, St: Store> Lease<'a, St> {
    /// The lease `token` took by a reserve sent at `reserved_at`.
    pub(crate) fn new(
        store: &'a St,
        scope: &'a ScopeHash,
        token: FencingToken,
        policy: &'a Policy,
        observer: &'a Observer,
        reserved_at: Instant,
    ) -> Self {
        let due = policy.renew_every().map(|every| reserved_at + every);
        Lease {
            store,
            scope,
            token,
            policy,
            observer,
            due,
        }
    }

    /// Runs `work`, renewing the lease on its schedule until `work` is done or the lease
    /// is lost. A quick `work` never arms a timer: the schedule is only polled while
    /// `work` is pending.
    pub(crate) fn hold_while<F: Future>(
        &mut self,
        work: F,
    ) -> HoldWhile<F, impl Future<Output = ()> + use<'_, 'a, St, F>> {
        let renewing = self.due.map(|_| self.renew_on_schedule());
        HoldWhile { work, renewing }
    }

    /// Renews whenever due; returns only when the lease is lost (the schedule then
    /// stops for good).
    async fn renew_on_schedule(&mut self) {
        let (Some(every), Some(_)) = (self.policy.renew_every(), self.due) else {
            return;
        };
        let lease = self.policy.lease();
        // A lease of a few hundred ms renews every few dozen: its first retry must come
        // within the interval too, or one failed renewal would lose it.
        let first_retry = RENEW_RETRY_MIN.min(every / 2).max(Duration::from_millis(1));
        let mut retry = first_retry;
        while let Some(due) = self.due {
            // Boxed, as the retry's sleep in `complete`: a timer is 112 bytes, and this
            // future sits inside the owner's (see `HoldWhile`).
            Box::pin(tokio::time::sleep_until(due)).await;
            let sent = Instant::now();
            let renewed = self.store.renew(self.scope, self.token, lease).await;
            self.observer
                .store_answered(self.store, StoreOp::Renew, sent, &renewed);
            match renewed {
                Ok(true) => {
                    // The store extended the lease to (at least) `sent + lease`.
                    self.due = Some(sent + every);
                    retry = first_retry;
                }
                Ok(false) => {
                    tracing::error!(
                        "idempotency lease lost while the request runs: another request may run \
                         it again, and this result will not be stored"
                    );
                    self.observer.lease_lost();
                    self.due = None;
                }
                Err(err) => {
                    // Retried quickly: the lease still lasts until its last confirmation
                    // plus the lease, and the store itself answers `false` once it is gone.
                    tracing::warn!(error = %DisplayChain(&err), retry_in = ?retry, "idempotency lease renewal failed; retrying");
                    self.due = Some(Instant::now() + retry);
                    retry = (retry * 2).min((every / 2).max(first_retry));
                }
            }
        }
    }

    /// Stores `record`, retrying with back-off (still renewing) while the store fails, up to
    /// the policy's bound. Retries meanwhile get 409 (or wait): never a second execution.
    ///
    /// Not an `async fn`: its future would hold this [`HoldWhile`] and its own arguments
    /// besides, in the owner's future.
    pub(crate) fn complete<'s>(
        &'s mut self,
        record: &'s Record,
    ) -> HoldWhile<
        impl Future<Output = Completed> + use<'s, 'a, St>,
        impl Future<Output = ()> + use<'s, 'a, St>,
    > {
        let (store, scope, token, policy, observer) = (
            self.store,
            self.scope,
            self.token,
            self.policy,
            self.observer,
        );
        let retrying = async move {
            let started = Instant::now();
            let mut backoff = COMPLETE_RETRY_MIN;
            loop {
                let sent = Instant::now();
                let completed = store.complete(scope, token, record, policy.ttl).await;
                observer.store_answered(store, StoreOp::Complete, sent, &completed);
                match completed {
                    Ok(Completion::Stored) => return Completed::Stored,
                    Ok(Completion::RolledBack) => {
                        tracing::error!(
                            "the idempotency record and the handler's writes were rolled back \
                             (the commit failed): the caller gets 503 and may retry"
                        );
                        return Completed::RolledBack;
                    }
                    Ok(Completion::Fenced) => {
                        tracing::error!(
                            "idempotency lease was lost before completion: the response goes to \
                             this caller but is not stored (fenced)"
                        );
                        observer.lease_lost();
                        return Completed::Fenced;
                    }
                    Err(err) if started.elapsed() + backoff > policy.complete_retry => {
                        tracing::error!(
                            error = %DisplayChain(&err),
                            bound = ?policy.complete_retry,
                            "idempotency record could not be stored; giving up: a retry after \
                             the lease expires runs the handler again"
                        );
                        observer.complete_failed();
                        return Completed::GaveUp;
                    }
                    Err(err) => {
                        tracing::warn!(error = %DisplayChain(&err), "storing the idempotency record failed; retrying");
                        // Boxed: only a failing store waits here, and inline the timer
                        // would take room in every owner's future.
                        Box::pin(tokio::time::sleep(backoff)).await;
                        backoff = (backoff * 2).min(COMPLETE_RETRY_MAX);
                    }
                }
            }
        };
        self.hold_while(retrying)
    }

    /// Deletes the lease so a retry may run. Returns once the store answered, so a
    /// corrected retry sent right after the response runs. While the store fails, the
    /// release is retried with back-off, the lease renewed meanwhile, up to the policy's
    /// `complete_retry` bound, as [`complete`] is: left to expire, a lease whose answer
    /// the layer knows would answer 409 until then, and on a route that keeps lapsed
    /// leases `operation-uncertain`, for a request that changed nothing. The first attempt
    /// runs without the schedule: a renewal sent beside it could reach the store after it
    /// and report a lost lease that was only released.
    ///
    /// [`complete`]: Lease::complete
    pub(crate) async fn release(&mut self) {
        let (store, scope, token, policy, observer) = (
            self.store,
            self.scope,
            self.token,
            self.policy,
            self.observer,
        );
        let once = || async move {
            let sent = Instant::now();
            let released = store.release(scope, token).await;
            observer.store_answered(store, StoreOp::Release, sent, &released);
            released
        };
        let started = Instant::now();
        let mut failed = match once().await {
            Ok(true) => return,
            Ok(false) => return tracing::debug!("lease already gone at release"),
            Err(err) => err,
        };
        let retrying = async move {
            let mut backoff = COMPLETE_RETRY_MIN;
            loop {
                if started.elapsed() + backoff > policy.complete_retry {
                    return tracing::error!(
                        error = %DisplayChain(&failed),
                        bound = ?policy.complete_retry,
                        lease = ?policy.lease(),
                        "idempotency release failed; giving up: the key stays in flight until \
                         its lease expires"
                    );
                }
                tracing::warn!(error = %DisplayChain(&failed), "idempotency release failed; retrying");
                Box::pin(tokio::time::sleep(backoff)).await;
                backoff = (backoff * 2).min(COMPLETE_RETRY_MAX);
                failed = match once().await {
                    Ok(true) => return,
                    Ok(false) => return tracing::debug!("lease already gone at release"),
                    Err(err) => err,
                };
            }
        };
        self.hold_while(retrying).await;
        self.due = None;
    }
}

pin_project_lite::pin_project! {
    /// [`Lease::hold_while`]'s future: the work, and the renewal schedule polled after it
    /// while it is pending. Written by hand rather than as an `async fn`, which would keep
    /// the work twice in its state (as its argument, and pinned in its body): the owner's
    /// future holds this one, and is allocated once per new key, so every byte here is
    /// copied and allocated per request (under about 1 KiB, glibc serves it from its
    /// thread cache).
    pub(crate) struct HoldWhile<F, R> {
        #[pin]
        work: F,
        // `None` once the lease is lost (or when renewal is off): the work goes on alone.
        #[pin]
        renewing: Option<R>,
    }
}

impl<F: Future, R: Future<Output = ()>> Future for HoldWhile<F, R> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(output);
        }
        if let Some(renewing) = this.renewing.as_mut().as_pin_mut() {
            if renewing.poll(cx).is_ready() {
                // The lease is lost: the schedule stopped for good.
                this.renewing.set(None);
            }
        }
        Poll::Pending
    }
}
