//! Reading the request body into one buffer, up to the policy's limit.
//!
//! Over the limit, the rest of the body is read and discarded up to a drain cap before the
//! 413 goes out: a server that answers while the client is still sending, then closes,
//! makes the client's TCP stack see a reset instead of the 413.
//!
//! The limit of a keyed request is the policy's `max_body`, lowered to axum's
//! `DefaultBodyLimit::max(n)` when a layer outside this one set a smaller one
//! ([`AxumLimit`]): the layer holds the whole body in memory, so neither axum's default
//! nor `DefaultBodyLimit::disable()` raises it.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::RequestExt;
use bytes::{Buf, Bytes, BytesMut};
use http::header::EXPECT;
use http::{Extensions, HeaderMap};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError};

/// axum's `DefaultBodyLimit` as the request carries it when it reaches the layer: set by
/// a `DefaultBodyLimit` layer outside this one. One inside it (between the layer and the
/// handler) is not seen yet, and applies to the extractors only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AxumLimit {
    /// None on the request (axum's extractors then use axum's default, 2 MB); also
    /// axum's default set explicitly where the route's own limit is lower, so that
    /// telling the two apart would change nothing.
    Unset,
    /// `DefaultBodyLimit::disable()`.
    Disabled,
    /// `DefaultBodyLimit::max(n)`.
    Max(u64),
}

impl AxumLimit {
    /// Reads the limit from `extensions`. axum keeps it in a private type, so it is
    /// read the way axum's own extractors apply it (`RequestExt::with_limited_body`),
    /// on an empty probe body whose size bound then is the limit. The extensions are
    /// moved into the probe and back, never copied. `max_body` is the route's own limit:
    /// whether a limit equal to axum's default was set or not matters only above it.
    pub(crate) fn of(extensions: &mut Extensions, max_body: usize) -> AxumLimit {
        let limit = probe(extensions);
        match limit {
            None => AxumLimit::Disabled,
            Some(n) if Some(n) != axum_default() => AxumLimit::Max(n),
            Some(n) if n >= max_body as u64 => AxumLimit::Unset, // no difference either way
            Some(n) => {
                // axum's default, set explicitly or not at all: set it again and see
                // whether that added an extension. If it did, the request now says
                // `DefaultBodyLimit::max(default)`, which every axum extractor reads
                // exactly as it reads no limit at all.
                let before = extensions.len();
                let mut marker = http::Request::new(());
                DefaultBodyLimit::max(usize::try_from(n).unwrap_or(usize::MAX)).apply(&mut marker);
                extensions.extend(marker.into_parts().0.extensions);
                if extensions.len() == before {
                    AxumLimit::Max(n)
                } else {
                    AxumLimit::Unset
                }
            }
        }
    }

    /// The limit of a keyed request under a route whose own limit is `max_body`: the
    /// smaller of the two when axum's is set.
    pub(crate) fn keyed_limit(self, max_body: usize) -> usize {
        match self {
            AxumLimit::Max(n) if n < max_body as u64 => usize::try_from(n).unwrap_or(max_body),
            _ => max_body,
        }
    }

    /// Whether axum's limit lets through a body the route's `max_body` refuses.
    pub(crate) fn allows_more_than(self, max_body: usize) -> bool {
        match self {
            AxumLimit::Unset => false,
            AxumLimit::Disabled => true,
            AxumLimit::Max(n) => n > max_body as u64,
        }
    }
}

/// The size bound axum's extractors put on a body with these extensions (`None`:
/// disabled).
fn probe(extensions: &mut Extensions) -> Option<u64> {
    let empty = futures_util::stream::empty::<Result<Bytes, Infallible>>();
    let mut request = http::Request::new(axum::body::Body::from_stream(empty));
    *request.extensions_mut() = std::mem::take(extensions);
    let limited = request.with_limited_body();
    let bound = limited.body().size_hint().upper();
    *extensions = limited.into_parts().0.extensions;
    bound
}

/// axum's default limit, where no `DefaultBodyLimit` is set (2 MB in axum 0.8).
fn axum_default() -> Option<u64> {
    static DEFAULT: OnceLock<Option<u64>> = OnceLock::new();
    *DEFAULT.get_or_init(|| probe(&mut Extensions::new()))
}

/// Why a body could not be buffered.
#[derive(Debug)]
pub(crate) enum BufferError {
    /// Over the limit; the rest was drained (or the drain cap was hit).
    TooLarge,
    /// Over a limit set outside the layer (a `LengthLimitError` from the body).
    OverOuterLimit,
    /// The body failed while it was read.
    Unreadable(crate::body::BoxError),
}

pub(crate) struct Limits {
    pub(crate) max: usize,
    pub(crate) drain_bytes: usize,
    pub(crate) drain_time: Duration,
}

/// Whether the client asked for `100 Continue` (`Expect: 100-continue`) before sending a
/// body whose declared length is over `max`. Nothing has been sent yet, so the layer
/// answers 413 at once instead of reading (and discarding) what it would then upload.
pub(crate) fn expects_continue_over(headers: &HeaderMap, declared: u64, max: usize) -> bool {
    declared > max as u64
        && headers
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Buffers `body` whole, or drains it and reports [`BufferError::TooLarge`].
pub(crate) async fn buffer<B>(body: B, limits: &Limits) -> Result<Bytes, BufferError>
where
    B: Body + Unpin,
    B::Error: Into<crate::body::BoxError>,
{
    let mut body = body;
    // A declared length over the limit is rejected before reading anything.
    if body.size_hint().lower() > limits.max as u64 {
        // Boxed (its timer is 112 bytes): only a refused body is drained, and every
        // request's future holds this one.
        Box::pin(drain(&mut body, limits)).await;
        return Err(BufferError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| read_error(e.into()))?;
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers are not part of the payload
        };
        len = len.saturating_add(data.remaining());
        if len > limits.max {
            Box::pin(drain(&mut body, limits)).await;
            return Err(BufferError::TooLarge);
        }
        // Most bodies arrive as one chunk: keep it without copying.
        if first.is_none() && buf.is_empty() {
            first = Some(data.copy_to_bytes(data.remaining()));
        } else {
            if let Some(first) = first.take() {
                buf.extend_from_slice(&first);
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                buf.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// A body that an outer layer limited (tower-http's `RequestBodyLimitLayer`, anything
/// built on `http_body_util::Limited`) fails with `LengthLimitError`, wrapped or not
/// (axum's `Body` wraps its errors): that body is over a limit, so 413, not 400. The
/// limiting layer yields nothing more, so there is nothing to drain.
fn read_error(err: crate::body::BoxError) -> BufferError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    while let Some(e) = cause {
        if e.is::<LengthLimitError>() {
            return BufferError::OverOuterLimit;
        }
        cause = e.source();
    }
    BufferError::Unreadable(err)
}

/// Reads and discards up to the drain cap, in bytes and time. Errors end the drain.
async fn drain<B>(body: &mut B, limits: &Limits)
where
    B: Body + Unpin,
{
    let drained = async {
        let mut total = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                total = total.saturating_add(data.remaining());
                if total > limits.drain_bytes {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(limits.drain_time, drained).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};

    fn limits(max: usize) -> Limits {
        Limits {
            max,
            drain_bytes: 1 << 20,
            drain_time: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn joins_chunks_and_skips_empty_ones() {
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ];
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        assert_eq!(
            buffer(body, &limits(10)).await.unwrap(),
            Bytes::from_static(b"abcd")
        );
    }

    #[tokio::test]
    async fn over_limit_by_length_or_by_reading() {
        let body = Full::new(Bytes::from_static(b"hello"));
        assert!(matches!(
            buffer(body, &limits(4)).await,
            Err(BufferError::TooLarge)
        ));
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"de"))),
        ];
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        assert!(matches!(
            buffer(body, &limits(4)).await,
            Err(BufferError::TooLarge)
        ));
    }

    #[test]
    fn only_an_oversized_expect_continue_is_refused_early() {
        let mut h = HeaderMap::new();
        assert!(!expects_continue_over(&h, 10, 4));
        h.insert(EXPECT, "100-Continue".parse().unwrap());
        assert!(expects_continue_over(&h, 10, 4));
        assert!(!expects_continue_over(&h, 4, 4));
    }

    /// A body an outer layer limited (tower-http's `RequestBodyLimitLayer`, axum's
    /// `Limited`) fails with `LengthLimitError`, also when wrapped (axum's `Body` wraps
    /// its error): that is a body over a limit, not an unreadable one.
    #[tokio::test]
    async fn a_length_limit_error_is_over_the_outer_limit() {
        let body = http_body_util::Limited::new(Full::new(Bytes::from_static(b"hello")), 4);
        assert!(matches!(
            buffer(body, &limits(10)).await,
            Err(BufferError::OverOuterLimit)
        ));
        let wrapped = axum::body::Body::new(http_body_util::Limited::new(
            Full::new(Bytes::from_static(b"hello")),
            4,
        ));
        assert!(matches!(
            buffer(wrapped, &limits(10)).await,
            Err(BufferError::OverOuterLimit)
        ));
    }

    fn limited(limit: Option<DefaultBodyLimit>) -> Extensions {
        let mut request = http::Request::new(());
        request.extensions_mut().insert(7u32); // another extension, kept
        if let Some(limit) = limit {
            limit.apply(&mut request);
        }
        request.into_parts().0.extensions
    }

    #[test]
    fn reads_axums_default_body_limit() {
        let of = |limit, max_body| {
            let mut extensions = limited(limit);
            let read = AxumLimit::of(&mut extensions, max_body);
            assert_eq!(extensions.get::<u32>(), Some(&7), "extensions kept");
            read
        };
        let mib = 1 << 20;
        assert_eq!(of(None, mib), AxumLimit::Unset);
        assert_eq!(of(None, 8 * mib), AxumLimit::Unset);
        let disabled = Some(DefaultBodyLimit::disable());
        assert_eq!(of(disabled, mib), AxumLimit::Disabled);
        assert_eq!(of(Some(DefaultBodyLimit::max(64)), mib), AxumLimit::Max(64));
        let big = Some(DefaultBodyLimit::max(8 * mib));
        assert_eq!(of(big, mib), AxumLimit::Max(8 << 20));
        // axum's default set explicitly: told apart from none only where it matters.
        let default = axum_default().unwrap();
        let explicit = || Some(DefaultBodyLimit::max(default as usize));
        assert_eq!(of(explicit(), 8 * mib), AxumLimit::Max(default));
        assert_eq!(of(explicit(), mib), AxumLimit::Unset);

        assert_eq!(AxumLimit::Max(64).keyed_limit(mib), 64);
        assert_eq!(AxumLimit::Max(8 << 20).keyed_limit(mib), mib);
        assert_eq!(AxumLimit::Disabled.keyed_limit(mib), mib);
        assert_eq!(AxumLimit::Unset.keyed_limit(mib), mib);
        assert!(AxumLimit::Disabled.allows_more_than(mib));
        assert!(AxumLimit::Max(8 << 20).allows_more_than(mib));
        assert!(!AxumLimit::Max(64).allows_more_than(mib));
        assert!(!AxumLimit::Unset.allows_more_than(mib));
    }

    #[tokio::test]
    async fn body_error_is_unreadable() {
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err(std::io::Error::other("reset")),
        ];
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        assert!(matches!(
            buffer(body, &limits(4)).await,
            Err(BufferError::Unreadable(_))
        ));
    }
}
