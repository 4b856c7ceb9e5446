//! [`ResponseFuture`]: the future returned by [`Idempotency`](crate::Idempotency).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::detach::DetachOnDrop;
use crate::owner::panic_message;
use crate::problems::{Problem, Rejection, PROBLEM_TYPE_BASE};

type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

pin_project! {
    /// Response future of [`Idempotency`](crate::Idempotency).
    ///
    /// For a covered request it runs the layer's work (buffer, reserve, run or replay,
    /// store) in place; if it is dropped before that work ends (the client hung up), the
    /// rest is spawned and finishes anyway, tracked by the layer's
    /// [`DetachedWork`](crate::DetachedWork).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Work { work: DetachOnDrop<Output<B, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn work(work: DetachOnDrop<Output<B, E>>) -> Self {
        ResponseFuture {
            kind: Kind::Work { work },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Output<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(ResponseBody::stream))),
            KindProj::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled after completion: stay pending, as `futures::future::Fuse` would,
                // rather than panic.
                None => Poll::Pending,
            },
            KindProj::Work { work } => Pin::new(work).poll(cx).map(|finished| {
                finished.unwrap_or_else(|panic| {
                    // The handler's panics are caught inside; this is a bug of ours.
                    tracing::error!(panic = panic_message(&*panic), "idempotency work panicked");
                    let detail = "the request could not be completed".to_owned();
                    let base = PROBLEM_TYPE_BASE.into();
                    let rejection = Rejection::new(Problem::HandlerFailed, detail, 1, base);
                    Ok(rejection.problem_json().map(ResponseBody::full))
                })
            }),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Work { .. } => "Work",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
