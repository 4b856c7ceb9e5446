//! The stored outcome of a request and its binary, versioned encoding.
//!
//! Every store keeps a completed request as a [`Record`]. Stores that keep bytes (Redis)
//! use [`Record::encode`] and [`Record::decode`]; the format lives here so that all stores
//! agree on it and Lua scripts never need to parse it:
//!
//! ```text
//! version: u8 (= 1)
//! kind:    u8 (0 = response, 1 = not replayable)
//! -- kind 0 only --
//! status:  u16 BE
//! headers: u32 BE count, then per header: u32 BE name length, name, u32 BE value length, value
//! body:    u32 BE length, body bytes
//! ```
//!
//! An unknown version or a truncated blob is a [`DecodeError`] (the layer answers 503),
//! never a panic.
//!
//! # Example
//!
//! ```
//! use tower_idempotency_core::{Record, StoredResponse};
//! use http::{HeaderName, HeaderValue, StatusCode};
//! use bytes::Bytes;
//!
//! let record = Record::Response(StoredResponse::new(
//!     StatusCode::CREATED,
//!     vec![(HeaderName::from_static("location"), HeaderValue::from_static("/payments/1"))],
//!     Bytes::from_static(b"{\"id\":1}"),
//! ));
//! let bytes = record.encode();
//! assert_eq!(Record::decode(&bytes).unwrap(), record);
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};

/// The version byte written by [`Record::encode`].
pub const RECORD_VERSION: u8 = 1;

/// The largest body (and header name or value) a record can hold: lengths are encoded as
/// `u32`. [`Policy::validate`](crate::Policy::validate) refuses a `max_stored_response`
/// above it.
pub const MAX_BODY_LEN: usize = u32::MAX as usize;

const KIND_RESPONSE: u8 = 0;
const KIND_NOT_REPLAYABLE: u8 = 1;

/// What a store keeps for a completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// A response to replay.
    Response(StoredResponse),
    /// The operation ran but its response cannot be replayed: it was larger than the
    /// policy's stored-response limit (streamed to the first caller), or its body failed
    /// or panicked mid-stream. Retries get 409 `response-not-replayable`, never a second
    /// run.
    NotReplayable,
}

/// A response as it is stored and replayed: status, the headers kept (in order, repeated
/// names kept) and the whole body. Build one with [`StoredResponse::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The response status.
    pub status: StatusCode,
    /// Headers in the order the handler set them; repeated names appear once per value.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The full response body.
    pub body: Bytes,
}

impl StoredResponse {
    /// A response to store or replay.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{header, HeaderValue, StatusCode};
    /// use tower_idempotency_core::StoredResponse;
    ///
    /// let response = StoredResponse::new(
    ///     StatusCode::CREATED,
    ///     vec![(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
    ///     Bytes::from_static(b"{\"id\":1}"),
    /// );
    /// assert_eq!(response.status, StatusCode::CREATED);
    /// ```
    pub fn new(status: StatusCode, headers: Vec<(HeaderName, HeaderValue)>, body: Bytes) -> Self {
        StoredResponse {
            status,
            headers,
            body,
        }
    }
}

/// A stored record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The blob was written by a version of this crate that this one does not know.
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    /// The kind byte is not one this version writes.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// The blob ends before the encoding says it should.
    #[error("record is truncated")]
    Truncated,
    /// Bytes are left over after the body.
    #[error("record has trailing bytes")]
    TrailingBytes,
    /// The status code is not a valid HTTP status.
    #[error("record has an invalid status code {0}")]
    InvalidStatus(u16),
    /// A header name or value is not valid HTTP.
    #[error("record has an invalid header")]
    InvalidHeader,
}

impl Record {
    /// Encodes the record in the versioned binary format described in the
    /// [module docs](crate::record).
    pub fn encode(&self) -> Bytes {
        match self {
            Record::NotReplayable => Bytes::from_static(&[RECORD_VERSION, KIND_NOT_REPLAYABLE]),
            Record::Response(response) => {
                let headers_len: usize = response
                    .headers
                    .iter()
                    .map(|(n, v)| 8 + n.as_str().len() + v.as_bytes().len())
                    .sum();
                let mut out = BytesMut::with_capacity(12 + headers_len + response.body.len());
                out.put_u8(RECORD_VERSION);
                out.put_u8(KIND_RESPONSE);
                out.put_u16(response.status.as_u16());
                out.put_u32(len_u32(response.headers.len()));
                for (name, value) in &response.headers {
                    put_bytes(&mut out, name.as_str().as_bytes());
                    put_bytes(&mut out, value.as_bytes());
                }
                put_bytes(&mut out, &response.body);
                out.freeze()
            }
        }
    }

    /// Decodes a record written by [`Record::encode`]. The body shares `bytes`' buffer.
    pub fn decode(bytes: &Bytes) -> Result<Record, DecodeError> {
        let mut reader = Reader { bytes, pos: 0 };
        let version = reader.u8()?;
        if version != RECORD_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let record = match reader.u8()? {
            KIND_NOT_REPLAYABLE => Record::NotReplayable,
            KIND_RESPONSE => {
                let raw_status = reader.u16()?;
                let status = StatusCode::from_u16(raw_status)
                    .map_err(|_| DecodeError::InvalidStatus(raw_status))?;
                let count = reader.u32()? as usize;
                // Each header takes at least 8 bytes, which bounds the allocation by the
                // blob's size rather than by a count that could be corrupt.
                let mut headers = Vec::with_capacity(count.min(reader.remaining() / 8));
                for _ in 0..count {
                    let name = HeaderName::from_bytes(&reader.chunk()?)
                        .map_err(|_| DecodeError::InvalidHeader)?;
                    let value = HeaderValue::from_maybe_shared(reader.chunk()?)
                        .map_err(|_| DecodeError::InvalidHeader)?;
                    headers.push((name, value));
                }
                let len = reader.u32()? as usize;
                let body = reader.take(len)?;
                Record::Response(StoredResponse {
                    status,
                    headers,
                    body,
                })
            }
            kind => return Err(DecodeError::UnknownKind(kind)),
        };
        if reader.remaining() != 0 {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(record)
    }
}

fn len_u32(len: usize) -> u32 {
    // Bodies and headers are bounded by the policy's limits (far below 4 GiB); saturating
    // keeps this total, and decode then rejects the record instead of misreading it.
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(len_u32(bytes.len()));
    out.put_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if self.remaining() < len {
            return Err(DecodeError::Truncated);
        }
        let out = self.bytes.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let slice = self
            .bytes
            .get(self.pos..self.pos + N)
            .ok_or(DecodeError::Truncated)?;
        self.pos += N;
        let mut out = [0; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn chunk(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        Record::Response(StoredResponse::new(
            StatusCode::CREATED,
            vec![
                (
                    HeaderName::from_static("link"),
                    HeaderValue::from_static("<a>"),
                ),
                (
                    HeaderName::from_static("link"),
                    HeaderValue::from_static("<b>"),
                ),
                (
                    HeaderName::from_static("x-bin"),
                    HeaderValue::from_bytes(&[0xff, 0xfe, b'a']).unwrap(),
                ),
            ],
            Bytes::from_static(&[0, 1, 2, 255, b'\n']),
        ))
    }

    #[test]
    fn round_trips_repeated_and_binary_headers() {
        let record = sample();
        assert_eq!(Record::decode(&record.encode()), Ok(record));
        let marker = Record::NotReplayable;
        assert_eq!(Record::decode(&marker.encode()), Ok(marker));
    }

    #[test]
    fn unknown_version_is_an_error() {
        let mut bytes = sample().encode().to_vec();
        bytes[0] = 9;
        assert_eq!(
            Record::decode(&Bytes::from(bytes)),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(Record::decode(&bytes.slice(..len)).is_err(), "len {len}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(
            Record::decode(&Bytes::from(longer)),
            Err(DecodeError::TrailingBytes)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Record::decode(&Bytes::from(bytes));
        }

        #[test]
        fn any_body_round_trips(body in proptest::collection::vec(any::<u8>(), 0..4096), status in 100u16..600) {
            let record = Record::Response(StoredResponse::new(StatusCode::from_u16(status).unwrap(), vec![], Bytes::from(body)));
            prop_assert_eq!(Record::decode(&record.encode()), Ok(record));
        }
    }
}
