//! [`Faults`]: a store that forwards to a real one and fails the calls a test picks, to
//! drive the layer down its error paths (a store that cannot decode a record, errors while
//! a waiter waits, a renewal that fails once) without waiting for a real outage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_idempotency::store::{
    Completion, DecodeError, FencingToken, Fingerprint, Record, Reservation, ScopeHash, StoreError,
};
use tower_idempotency::Store;

/// Which store operation a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Reserve,
    Renew,
    Complete,
    Release,
    Subscribe,
}

/// The error a rule injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `StoreError::Backend`: unreachable, timed out.
    Backend,
    /// `StoreError::Decode`: a record written by a newer version.
    Decode,
}

impl Fault {
    fn error(self) -> StoreError {
        match self {
            Fault::Backend => StoreError::backend(std::io::Error::other("injected fault")),
            Fault::Decode => StoreError::Decode(DecodeError::UnknownVersion(9)),
        }
    }
}

type Rule = Box<dyn Fn(usize, Option<&Reservation>) -> Option<Fault> + Send + Sync>;

/// Forwards to `inner`; each rule decides, from the call's index (0-based, per operation)
/// and for reserves the last answer this wrapper passed on, whether to fail the call
/// instead (the inner store is then not called).
#[derive(Clone)]
pub struct Faults<St> {
    inner: St,
    shared: Arc<Shared>,
}

type Hook = Box<dyn Fn(&Reservation) + Send + Sync>;

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<(Op, Arc<Rule>)>>,
    /// Called with each reserve answer, before it is passed on.
    on_reserve: Mutex<Option<Arc<Hook>>>,
    /// Answers the next completes with this instead of storing (a store whose commit
    /// failed answers `RolledBack`), then forwards again.
    complete_answers: Mutex<Vec<Completion>>,
    /// How long a reserve that reserved takes to answer (it has run in the store): a
    /// reply that arrives late.
    reserved_reply_delay: Mutex<Option<Duration>>,
    calls: [AtomicUsize; 5],
    /// When each renewal reached the wrapper (tokio time, so a paused clock is exact).
    renewals: Mutex<Vec<tokio::time::Instant>>,
    injected: AtomicUsize,
    last_reservation: Mutex<Option<Reservation>>,
}

impl<St: Store> Faults<St> {
    pub fn new(inner: St) -> Self {
        Faults {
            inner,
            shared: Arc::default(),
        }
    }

    /// Adds a rule for `op`.
    pub fn fail(
        self,
        op: Op,
        rule: impl Fn(usize, Option<&Reservation>) -> Option<Fault> + Send + Sync + 'static,
    ) -> Self {
        self.shared
            .rules
            .lock()
            .unwrap()
            .push((op, Arc::new(Box::new(rule))));
        self
    }

    /// Calls `hook` with every reserve answer before passing it on (e.g. to break the
    /// network at the moment a waiter heard "in flight").
    pub fn on_reserve(self, hook: impl Fn(&Reservation) + Send + Sync + 'static) -> Self {
        *self.shared.on_reserve.lock().unwrap() = Some(Arc::new(Box::new(hook)));
        self
    }

    /// Answers the next complete with `answer` without calling the inner store; the
    /// inner lease is released, as a rolled-back transaction would leave nothing behind.
    pub fn answer_next_complete(self, answer: Completion) -> Self {
        self.shared.complete_answers.lock().unwrap().push(answer);
        self
    }

    /// Every reserve that reserves answers `delay` late, after it ran in the inner store
    /// (a reply that took long on the way back).
    pub fn delay_reserved_replies(self, delay: Duration) -> Self {
        *self.shared.reserved_reply_delay.lock().unwrap() = Some(delay);
        self
    }

    /// How many calls of `op` reached this wrapper.
    pub fn calls(&self, op: Op) -> usize {
        self.shared.calls[op as usize].load(Ordering::SeqCst)
    }

    /// How many calls a rule failed.
    pub fn injected(&self) -> usize {
        self.shared.injected.load(Ordering::SeqCst)
    }

    /// When each renewal was asked for.
    pub fn renewals(&self) -> Vec<tokio::time::Instant> {
        self.shared.renewals.lock().unwrap().clone()
    }

    fn check(&self, op: Op) -> Result<(), StoreError> {
        if op == Op::Renew {
            self.shared
                .renewals
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
        }
        let n = self.shared.calls[op as usize].fetch_add(1, Ordering::SeqCst);
        let last = self.shared.last_reservation.lock().unwrap().clone();
        let rules: Vec<Arc<Rule>> = self
            .shared
            .rules
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, r)| r.clone())
            .collect();
        for rule in rules {
            if let Some(fault) = rule(n, last.as_ref()) {
                self.shared.injected.fetch_add(1, Ordering::SeqCst);
                return Err(fault.error());
            }
        }
        Ok(())
    }
}

impl<St: Store> Store for Faults<St> {
    type Subscription = St::Subscription;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: tower_idempotency::store::LeaseTerms,
    ) -> Result<Reservation, StoreError> {
        self.check(Op::Reserve)?;
        let answer = self.inner.reserve(scope, fingerprint, token, lease).await?;
        let delay = *self.shared.reserved_reply_delay.lock().unwrap();
        if let (Reservation::Reserved, Some(delay)) = (&answer, delay) {
            tokio::time::sleep(delay).await;
        }
        *self.shared.last_reservation.lock().unwrap() = Some(answer.clone());
        let hook = self.shared.on_reserve.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(&answer);
        }
        Ok(answer)
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.check(Op::Renew)?;
        self.inner.renew(scope, token, lease).await
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        self.check(Op::Complete)?;
        let answer = self.shared.complete_answers.lock().unwrap().pop();
        if let Some(answer) = answer {
            self.inner.release(scope, token).await?;
            return Ok(answer);
        }
        self.inner.complete(scope, token, record, ttl).await
    }

    fn owner_extensions(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        extensions: &mut http::Extensions,
    ) {
        self.inner.owner_extensions(scope, token, extensions);
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        self.check(Op::Release)?;
        self.inner.release(scope, token).await
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<St::Subscription, StoreError> {
        self.check(Op::Subscribe)?;
        self.inner.subscribe(scope).await
    }

    async fn inspect(
        &self,
        scope: &ScopeHash,
    ) -> Result<tower_idempotency::store::KeyState, StoreError> {
        self.inner.inspect(scope).await
    }

    async fn forget(&self, scope: &ScopeHash) -> Result<bool, StoreError> {
        self.inner.forget(scope).await
    }

    async fn resolve(
        &self,
        scope: &ScopeHash,
        record: &Record,
        ttl: Duration,
    ) -> Result<tower_idempotency::store::Resolved, StoreError> {
        self.inner.resolve(scope, record, ttl).await
    }
}
