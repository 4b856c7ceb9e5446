//! Parsing the `Idempotency-Key` header.
//!
//! The value is an RFC 8941 sf-string (`"..."`, as the IETF draft asks) or, leniently, a
//! bare value as most clients send it (which must not start with `"`). After unescaping,
//! the key is 1–255 bytes, each 0x21–0x7E. `"abc"` and `abc` are the same key.
//!
//! # Example
//!
//! ```
//! use http::{HeaderMap, HeaderValue};
//! use tower_idempotency_core::key::{IdempotencyKey, KeyError, IDEMPOTENCY_KEY};
//!
//! let mut headers = HeaderMap::new();
//! assert_eq!(IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY), Ok(None));
//!
//! headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("\"8e03978e\""));
//! let key = IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY).unwrap().unwrap();
//! assert_eq!(key.as_str(), "8e03978e");
//!
//! headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("other"));
//! assert_eq!(
//!     IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY),
//!     Err(KeyError::Repeated)
//! );
//! ```

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};

/// The default header name, `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key accepted, in bytes after unescaping.
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1–255 bytes of visible ASCII.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why an `Idempotency-Key` header was rejected (the layer answers 400
/// `idempotency-key-invalid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The header appears more than once.
    #[error("the idempotency key header appears more than once")]
    Repeated,
    /// The key is empty.
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than 255 bytes.
    #[error("the idempotency key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    /// The key has a byte outside 0x21–0x7E.
    #[error("the idempotency key may only contain visible ASCII (0x21-0x7E)")]
    InvalidByte,
    /// A quoted value is not a valid RFC 8941 sf-string.
    #[error("the idempotency key is not a valid quoted string")]
    InvalidQuoting,
}

impl IdempotencyKey {
    /// Reads the key from `headers`: `Ok(None)` when the header is absent.
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Self>, KeyError> {
        Ok(key_bytes(headers, name)?.map(|key| Self::from_valid(&key)))
    }

    /// Parses one header value.
    pub fn parse(raw: &[u8]) -> Result<Self, KeyError> {
        parse(raw).map(|key| Self::from_valid(&key))
    }

    /// From bytes [`parse`] accepted: visible ASCII, so valid UTF-8.
    fn from_valid(key: &[u8]) -> Self {
        IdempotencyKey(String::from_utf8_lossy(key).into_owned())
    }

    /// The key as sent, unescaped.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The key of `headers`, unescaped and validated, borrowed from the header value when it
/// is a bare key (the common case: no allocation per request); `Ok(None)` when absent.
pub(crate) fn key_bytes<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<Cow<'a, [u8]>>, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse(value.as_bytes()).map(Some)
}

/// Unescapes and validates one header value.
fn parse(raw: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    let key = match raw.first() {
        Some(b'"') => Cow::Owned(unquote(raw)?),
        _ => Cow::Borrowed(raw),
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::InvalidByte);
    }
    Ok(key)
}

/// Unescapes an RFC 8941 sf-string: `"`, then chars 0x20–0x7E where `"` and `\` must be
/// escaped as `\"` and `\\`, then a closing `"` and nothing after it.
fn unquote(raw: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter().skip(1);
    loop {
        match bytes.next() {
            None => return Err(KeyError::InvalidQuoting),
            Some(b'"') => break,
            Some(b'\\') => match bytes.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(c),
                _ => return Err(KeyError::InvalidQuoting),
            },
            Some(&c) if (0x20..=0x7e).contains(&c) => out.push(c),
            Some(_) => return Err(KeyError::InvalidQuoting),
        }
    }
    if bytes.next().is_some() {
        return Err(KeyError::InvalidQuoting);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quoted_and_bare_are_one_key() {
        assert_eq!(
            IdempotencyKey::parse(b"\"abc\""),
            IdempotencyKey::parse(b"abc")
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"a\\\"b\"").unwrap().as_str(),
            "a\"b"
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"a\\\\b\"").unwrap().as_str(),
            "a\\b"
        );
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse(b"\"abc"),
            Err(KeyError::InvalidQuoting)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"abc\"x"),
            Err(KeyError::InvalidQuoting)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"a\\nb\""),
            Err(KeyError::InvalidQuoting)
        );
        assert_eq!(
            IdempotencyKey::parse(b"\"a\tb\""),
            Err(KeyError::InvalidQuoting)
        );
        // Space is a valid sf-string char but not a valid key byte.
        assert_eq!(
            IdempotencyKey::parse(b"\"a b\""),
            Err(KeyError::InvalidByte)
        );
        assert_eq!(IdempotencyKey::parse(b"a b"), Err(KeyError::InvalidByte));
        assert_eq!(IdempotencyKey::parse(&[0xff]), Err(KeyError::InvalidByte));
        assert!(IdempotencyKey::parse(&[b'a'; 255]).is_ok());
        assert_eq!(IdempotencyKey::parse(&[b'a'; 256]), Err(KeyError::TooLong));
    }

    proptest! {
        #[test]
        fn parse_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(key) = IdempotencyKey::parse(&raw) {
                prop_assert!((1..=MAX_KEY_LEN).contains(&key.as_str().len()));
            }
        }
    }
}
