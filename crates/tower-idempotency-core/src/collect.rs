//! Reading the inner service's response body, up to the stored-response limit, so it can
//! be stored and sent.
//!
//! The request side of the same job is [`buffer`](crate::buffer).

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body;
use http_body_util::BodyExt;

use crate::body::BoxError;

/// What reading a response body gave.
pub(crate) enum Collected<B> {
    /// The whole body, and its trailers (not stored: a replay has none).
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Over `max`: what was read, and the rest of the body still to send.
    TooLarge { read: Bytes, rest: Pin<Box<B>> },
    /// The body failed after `read`.
    Failed { read: Bytes, error: BoxError },
}

/// Reads a response body up to `max` bytes; past that, hands back what was read and the
/// rest. Most bodies are one chunk, which is kept without copying.
pub(crate) async fn collect<B>(body: B, max: usize) -> Collected<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut read = Read::default();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                return Collected::Failed {
                    read: read.into_bytes(),
                    error: error.into(),
                }
            }
        };
        match frame.into_data() {
            Ok(data) => {
                read.push(data);
                if read.len > max {
                    return Collected::TooLarge {
                        read: read.into_bytes(),
                        rest: body,
                    };
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    Collected::Whole {
        data: read.into_bytes(),
        trailers,
    }
}

/// Chunks read so far: the first one kept as it came, later ones copied after it.
#[derive(Default)]
struct Read {
    first: Option<Bytes>,
    rest: BytesMut,
    len: usize,
}

impl Read {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        if data.is_empty() {
            return;
        }
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(data),
            first => {
                if let Some(first) = first {
                    self.rest.extend_from_slice(&first);
                }
                self.rest.extend_from_slice(&data);
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.first {
            Some(first) => first,
            // A body of several chunks grew a buffer by doubling; a stored record would
            // keep all of that capacity alive (up to twice what a store counts). Copy it
            // to its exact size when the slack is large: one copy, multi-chunk bodies only.
            None if self.rest.capacity() > self.rest.len() + self.rest.len() / 4 => {
                Bytes::copy_from_slice(&self.rest)
            }
            None => self.rest.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::StreamBody;

    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn body(frames: Vec<Item>) -> StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Item>>> {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn whole_with_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let b = body(vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"c"))),
            Ok(Frame::trailers(trailers.clone())),
        ]);
        match collect(b, 10).await {
            Collected::Whole { data, trailers: t } => {
                assert_eq!(data, Bytes::from_static(b"abc"));
                assert_eq!(t, Some(trailers));
            }
            _ => panic!("expected the whole body"),
        }
    }

    #[tokio::test]
    async fn too_large_keeps_what_was_read() {
        let b = body(vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"de"))),
            Ok(Frame::data(Bytes::from_static(b"f"))),
        ]);
        match collect(b, 4).await {
            Collected::TooLarge { read, rest } => {
                assert_eq!(read, Bytes::from_static(b"abcde"));
                let tail = rest.collect().await.unwrap().to_bytes();
                assert_eq!(tail, Bytes::from_static(b"f"));
            }
            _ => panic!("expected too large"),
        }
    }

    #[tokio::test]
    async fn failure_keeps_what_was_read() {
        let b = body(vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("broken")),
        ]);
        match collect(b, 10).await {
            Collected::Failed { read, error } => {
                assert_eq!(read, Bytes::from_static(b"ab"));
                assert_eq!(error.to_string(), "broken");
            }
            _ => panic!("expected a failure"),
        }
    }
}
