//! The body types the layer hands to the inner service and back to the client.
//!
//! [`RequestBody`] is what the inner service receives: the buffered bytes of a covered
//! request, or the original body passed through untouched. [`ResponseBody`] is what the
//! layer returns: a full buffer (replays, stored responses, problems) or the inner body,
//! possibly after a prefix the layer already read (a response too large to store).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// Errors from the bodies of this crate.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// The request body the inner service receives: the buffered bytes of a covered
    /// request, or the original body of one the layer passes through.
    #[derive(Debug)]
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestBodyProj]
    #[derive(Debug)]
    enum RequestKind<B> {
        Buffered { data: Option<Bytes> },
        Passthrough { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    /// A buffered body.
    pub fn buffered(data: Bytes) -> Self {
        RequestBody {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// The original body, passed through.
    pub fn passthrough(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Passthrough { body },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestBodyProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            RequestBodyProj::Passthrough { body } => match body.poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(
                    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                ))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { data } => data.is_none(),
            RequestKind::Passthrough { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Passthrough { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// The response body the layer returns: a full buffer (a replay, a stored first
    /// response, a problem), the inner body untouched, or the inner body after the bytes
    /// the layer read before it found the response too large to store.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseBodyProj]
    #[derive(Debug)]
    enum ResponseKind<B> {
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Stream { #[pin] body: B },
        Rest { prefix: Option<Bytes>, body: Pin<Box<B>> },
        Failed { prefix: Option<Bytes>, error: Option<BoxError> },
    }
}

impl<B> ResponseBody<B> {
    /// A full body.
    pub fn full(data: Bytes) -> Self {
        Self::full_with_trailers(data, None)
    }

    /// A full body, then `trailers` (the first caller of a stored response gets the
    /// handler's trailers; a replay has none).
    pub fn full_with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ResponseBody {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full_with_trailers(Bytes::new(), None)
    }

    /// The bytes the inner body yielded, then the error it failed with: what the first
    /// caller of a response whose body broke after it was read gets, as it would without
    /// the layer.
    pub(crate) fn failed(prefix: Bytes, error: BoxError) -> Self {
        ResponseBody {
            kind: ResponseKind::Failed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                error: Some(error),
            },
        }
    }

    /// The inner body, untouched.
    pub fn stream(body: B) -> Self {
        ResponseBody {
            kind: ResponseKind::Stream { body },
        }
    }

    /// The inner body after bytes already read from it.
    pub fn prefixed(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        ResponseBody {
            kind: ResponseKind::Rest {
                prefix: (!prefix.is_empty()).then_some(prefix),
                body,
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseBodyProj::Full { data, trailers } => match data.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
            ResponseBodyProj::Stream { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseBodyProj::Rest { prefix, body } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                body.as_mut().poll_frame(cx).map_err(Into::into)
            }
            ResponseBodyProj::Failed { prefix, error } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => Poll::Ready(error.take().map(Err)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Stream { body } => body.is_end_stream(),
            ResponseKind::Rest { prefix, body } => prefix.is_none() && body.is_end_stream(),
            ResponseKind::Failed { prefix, error } => prefix.is_none() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Failed { prefix, .. } => {
                // At least the prefix; the error ends the stream.
                let mut hint = SizeHint::new();
                hint.set_lower(prefix.as_ref().map_or(0, |p| p.len() as u64));
                hint
            }
            ResponseKind::Stream { body } => body.size_hint(),
            ResponseKind::Rest { prefix, body } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}
