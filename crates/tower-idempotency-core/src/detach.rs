//! [`DetachOnDrop`]: runs a future in place, and hands it to the runtime if it is dropped
//! before it finishes.
//!
//! SPEC section 6 asks that a client hanging up cancels nothing: the handler finishes, its
//! result is stored or its key released. Spawning every request's work as a task gives
//! that, at the price of a task, a `JoinHandle` and two extra wake-ups per request. This
//! gives the same guarantee without them: the work runs inside the response future, and
//! only when that future is dropped unfinished (the client left) is the rest spawned,
//! from exactly where it stopped.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;

type Work<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A boxed future that keeps running after its owner drops it.
pub(crate) struct DetachOnDrop<T: Send + 'static> {
    work: Option<Work<T>>,
}

impl<T: Send + 'static> DetachOnDrop<T> {
    pub(crate) fn new(work: impl Future<Output = T> + Send + 'static) -> Self {
        DetachOnDrop {
            work: Some(Box::pin(work)),
        }
    }
}

/// What the work ended with: its output, or the panic it raised (a bug of ours: handler
/// panics are caught further in and answered as 500s).
pub(crate) type Finished<T> = Result<T, Box<dyn std::any::Any + Send>>;

impl<T: Send + 'static> Future for DetachOnDrop<T> {
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

impl<T: Send + 'static> Drop for DetachOnDrop<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // The output has no one to go to; the work's own effects (the handler's
                // run, the stored record, the released key) are what must happen.
                runtime.spawn(AssertUnwindSafe(work).catch_unwind().map(drop));
            }
            Err(_) => tracing::error!(
                "a request was dropped outside a tokio runtime before its idempotency work \
                 finished; its lease expires on its own"
            ),
        }
    }
}

impl<T: Send + 'static> std::fmt::Debug for DetachOnDrop<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
    use std::time::Duration;

    #[tokio::test]
    async fn finishes_in_place() {
        assert_eq!(DetachOnDrop::new(async { 7 }).await.ok(), Some(7));
    }

    #[tokio::test]
    async fn dropped_work_still_finishes() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let mut work = Box::pin(DetachOnDrop::new(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        }));
        // Start it, then drop it half way, as hyper does when the client hangs up.
        let polled = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
        drop(work);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(done.load(Ordering::SeqCst), "the rest ran on its own task");
    }

    #[tokio::test]
    async fn a_panic_is_returned_not_raised() {
        let out = DetachOnDrop::new(async { panic!("bug") }).await;
        assert!(out.is_err());
    }
}
