//! Work that outlives the request: [`DetachedWork`], and the future that hands itself to
//! it when the caller goes away.
//!
//! SPEC section 6: a client that hangs up cancels nothing. The work of a covered request
//! (reserve → inner service → collect the body → complete or release) runs on the
//! request's own future, so a replay costs no task. If hyper drops that future before the
//! work ends (the client hung up), the rest is spawned from exactly where it stopped and
//! runs to completion. Spawned work is tracked in a [`DetachedWork`], which the
//! application waits for at shutdown, so a deploy does not orphan a lease.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let layer = IdempotencyLayer::new(MemoryStore::default()).global_scope();
//! let detached = layer.detached_work(); // clones of the layer share it
//! let app: Router = Router::new().route("/payments", post(|| async { "paid" }).layer(layer));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! // Connections are closed; finish what hung-up clients left running.
//! if let Err(unfinished) = detached.wait(Duration::from_secs(30)).await {
//!     eprintln!("{unfinished}");
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::task::TaskTracker;

/// The work that covered requests left running when their clients hung up, and the
/// best-effort clean-ups the layer starts on its own: wait for it at shutdown.
///
/// Every [`IdempotencyLayer`](crate::IdempotencyLayer) has one, shared by its clones and
/// by the services it makes ([`IdempotencyLayer::detached_work`]); give separately built
/// layers one handle with
/// [`IdempotencyLayer::track_detached_in`](crate::IdempotencyLayer::track_detached_in).
/// Cheap to clone. See the [module docs](crate::detach) for where to call
/// [`wait`](Self::wait).
///
/// [`IdempotencyLayer::detached_work`]: crate::IdempotencyLayer::detached_work
#[derive(Clone, Default)]
pub struct DetachedWork {
    tracker: TaskTracker,
}

/// [`DetachedWork::wait`] ran out of time: this many pieces of work were still running.
/// Their leases expire on their own, and a retry after that runs the handler again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error(
    "{running} idempotency task(s) still running at the end of the shutdown grace period; \
     their leases expire on their own"
)]
pub struct Unfinished {
    /// Work still running when the grace period ended.
    pub running: usize,
}

impl DetachedWork {
    /// A new, empty handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many pieces of detached work are running now.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// `true` when no detached work is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Waits, at most `grace`, until every piece of detached work has finished. Call it
    /// once the server stopped accepting requests: after `axum::serve(..)
    /// .with_graceful_shutdown(..)` returns, before the process exits (the runtime drops
    /// whatever is still running when `main` returns).
    ///
    /// Work detached after this call (a request still in flight elsewhere that is
    /// dropped later) is waited for too, within the same grace period.
    pub async fn wait(&self, grace: Duration) -> Result<(), Unfinished> {
        self.tracker.close();
        let waited = tokio::time::timeout(grace, self.tracker.wait()).await;
        // Reopen, so a handle waited on in a test (or a server restarted in-process)
        // keeps working as before.
        self.tracker.reopen();
        match waited {
            Ok(()) => Ok(()),
            Err(_) => Err(Unfinished {
                running: self.tracker.len(),
            }),
        }
    }

    /// Runs `work` on the current runtime as tracked detached work. Outside a runtime
    /// (a future dropped by a runtime that is shutting down its threads) the work cannot
    /// run: logged, and its lease expires on its own.
    pub(crate) fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(self.tracker.spawn_on(work, &runtime)),
            Err(_) => tracing::error!(
                "idempotency work was dropped outside a tokio runtime before it finished; \
                 its lease expires on its own"
            ),
        }
    }
}

impl fmt::Debug for DetachedWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetachedWork")
            .field("running", &self.tracker.len())
            .finish()
    }
}

type Work<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the work ended with: its output, or the panic it raised (a bug of ours: handler
/// panics are caught further in and answered as 500s).
pub(crate) type Finished<T> = Result<T, Box<dyn std::any::Any + Send>>;

/// A boxed future that runs in place and, if dropped before it finishes, hands the rest
/// of itself to a [`DetachedWork`].
pub(crate) struct DetachOnDrop<T> {
    work: Option<Work<T>>,
    detached: DetachedWork,
    /// How to spawn the rest: chosen in `new`, where `T: 'static` is known, so that
    /// neither this type nor the layer's `ResponseFuture` need that bound.
    detach: fn(&DetachedWork, Work<T>),
}

impl<T: 'static> DetachOnDrop<T> {
    pub(crate) fn new(detached: DetachedWork, work: Work<T>) -> Self {
        DetachOnDrop {
            work: Some(work),
            detached,
            detach: detach::<T>,
        }
    }
}

/// Spawns the rest of `work` as tracked detached work. The output has no one to go to;
/// the work's effects (the handler's run, the stored record, the released key) are what
/// must happen. A panic that escapes it is logged: no caller is left to get a 500.
fn detach<T: 'static>(detached: &DetachedWork, work: Work<T>) {
    detached.spawn(AssertUnwindSafe(work).catch_unwind().map(|done| {
        if let Err(panic) = done {
            tracing::error!(
                panic = crate::owner::panic_message(&*panic),
                "detached idempotency work panicked"
            );
        }
    }));
}

impl<T> Future for DetachOnDrop<T> {
    type Output = Finished<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Finished<T>> {
        let Some(work) = self.work.as_mut() else {
            // Polled after it finished; stay pending rather than panic.
            return Poll::Pending;
        };
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                self.work = None;
                Poll::Ready(Ok(output))
            }
            Err(panic) => {
                self.work = None;
                Poll::Ready(Err(panic))
            }
        }
    }
}

impl<T> Drop for DetachOnDrop<T> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            (self.detach)(&self.detached, work);
        }
    }
}

impl<T> fmt::Debug for DetachOnDrop<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetachOnDrop")
            .field("running", &self.work.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn finishes_in_place_without_a_task() {
        let detached = DetachedWork::new();
        let out = DetachOnDrop::new(detached.clone(), Box::pin(async { 7 })).await;
        assert_eq!(out.ok(), Some(7));
        assert!(detached.is_empty());
    }

    #[tokio::test]
    async fn dropped_work_finishes_tracked() {
        let detached = DetachedWork::new();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let mut work = Box::pin(DetachOnDrop::new(
            detached.clone(),
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                flag.store(true, Ordering::SeqCst);
            }),
        ));
        // Start it, then drop it half way, as hyper does when the client hangs up.
        let polled = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
        drop(work);
        assert_eq!(detached.len(), 1, "the rest runs as tracked work");
        detached.wait(Duration::from_secs(5)).await.unwrap();
        assert!(done.load(Ordering::SeqCst), "the rest ran to the end");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_is_bounded() {
        let detached = DetachedWork::new();
        detached.spawn(std::future::pending());
        let err = detached.wait(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err, Unfinished { running: 1 });
    }

    #[tokio::test]
    async fn a_panic_is_returned_not_raised() {
        let out = DetachOnDrop::new(DetachedWork::new(), Box::pin(async { panic!("bug") })).await;
        assert!(out.is_err());
    }
}
