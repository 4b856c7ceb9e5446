//! Scope hashes and request fingerprints, both blake3.
//!
//! The scope names the entry in the store: tenant + method + path + key. The fingerprint
//! identifies the payload: method, path, query, the policy's fingerprinted headers and
//! the body. Every part is length-prefixed, so no two different inputs hash the same
//! bytes (`("ab", "c")` and `("a", "bc")` differ).

use std::fmt;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, Method};

/// The blake3 hash of a scope (tenant, method, path, key): the store's key for one
/// request. Raw client keys and tenant ids never reach the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScopeHash([u8; 32]);

/// The blake3 hash of what the request asks for: method, path, query string,
/// fingerprinted headers and body.
///
/// The body counts byte for byte, so two encodings of the same content differ. Above all
/// `multipart/form-data`: most clients (browsers' `FormData`, reqwest's `multipart::Form`)
/// pick a new random boundary each time a form is sent, and the boundary is both in the
/// `Content-Type` (a fingerprinted header by default) and in the body, so a retry of a
/// rebuilt form gets 422 `idempotency-key-reused`. Clients that retry multipart uploads
/// should send the same bytes again (build the body once, with its boundary, and resend
/// it); a server that cannot rely on that can fingerprint a normalised payload
/// ([`IdempotencyLayer::fingerprint_body_with`](crate::IdempotencyLayer::fingerprint_body_with)),
/// or rewrite the boundary in a middleware outside the layer (README, "Policy").
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

macro_rules! hash_type {
    ($name:ident) => {
        impl $name {
            /// Wraps 32 raw hash bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The 32 raw hash bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The hash as 64 lowercase hex digits.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        /// The 64 lowercase hex digits, written without an allocation (a log field is
        /// formatted only when a subscriber records it).
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for byte in self.0 {
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    };
}

hash_type!(ScopeHash);
hash_type!(Fingerprint);

/// A hasher that length-prefixes every field, keyed per use so scopes and fingerprints
/// can never collide with each other.
///
/// Short fields (u32 length prefix; header values, paths and keys are far below 4 GiB)
/// are gathered in a buffer and hashed in one call: blake3's cost per call dominates for
/// short inputs, and every 64 bytes saved is one compression less. The body (u64 length)
/// goes straight to the hasher, uncopied.
struct Fields {
    hasher: blake3::Hasher,
    /// Short fields not yet hashed: on the stack, flushed to the hasher when full (what
    /// is hashed is the same byte stream either way).
    small: [u8; SMALL],
    len: usize,
}

/// Room for the short fields of a typical request (method, path, query, content type,
/// key), so they take one hasher update.
const SMALL: usize = 256;

/// The key of each use, derived once from its context string (blake3's derive-key mode).
fn context_key(context: &'static str, cell: &'static OnceLock<[u8; 32]>) -> &'static [u8; 32] {
    cell.get_or_init(|| blake3::derive_key(context, b""))
}

impl Fields {
    fn new(key: &[u8; 32]) -> Self {
        Fields {
            hasher: blake3::Hasher::new_keyed(key),
            small: [0; SMALL],
            len: 0,
        }
    }

    /// Appends `bytes` to the buffer, flushing it to the hasher first if they do not fit
    /// (and hashing them directly if they never would).
    fn push(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > SMALL {
            self.flush();
            if bytes.len() > SMALL {
                self.hasher.update(bytes);
                return;
            }
        }
        self.small[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn flush(&mut self) {
        self.hasher.update(&self.small[..self.len]);
        self.len = 0;
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.push(&len.to_le_bytes());
        self.push(bytes);
        self
    }

    fn large_field(&mut self, bytes: &[u8]) -> &mut Self {
        self.push(&(bytes.len() as u64).to_le_bytes());
        if bytes.len() <= 128 {
            // Small bodies join the buffer: one update call for the whole input.
            self.push(bytes);
        } else {
            self.flush();
            self.hasher.update(bytes);
        }
        self
    }

    fn finish(&mut self) -> [u8; 32] {
        self.flush();
        *self.hasher.finalize().as_bytes()
    }
}

impl ScopeHash {
    /// The scope an operator names from what they know, hashed exactly as the layer
    /// hashes the request: the tenant (the bytes the layer's tenant source yields: the
    /// `String` of `.tenant(..)`, the `AsRef<[u8]>` of `.tenant_from_extension::<T>()` or
    /// of the field of `.tenant_from_extension_with(..)`; `None` for `.global_scope()`), the method, the
    /// full path the client sent (a query string is ignored: it is part of the
    /// fingerprint, not of the scope) and the key as the client sent it in the header
    /// (bare, or an RFC 8941 sf-string: `"abc"` and `abc` are one key).
    ///
    /// ```
    /// use http::Method;
    /// use tower_idempotency_core::ScopeHash;
    ///
    /// let scope = ScopeHash::for_key(Some(b"alice"), &Method::POST, "/v1/payments?x=1", "\"k-1\"")?;
    /// assert_eq!(scope, ScopeHash::new(Some(b"alice"), &Method::POST, "/v1/payments", b"k-1"));
    /// assert!(ScopeHash::for_key(None, &Method::POST, "/v1/payments", "").is_err());
    /// # Ok::<(), tower_idempotency_core::KeyError>(())
    /// ```
    pub fn for_key(
        tenant: Option<&[u8]>,
        method: &Method,
        path: &str,
        key: &str,
    ) -> Result<Self, crate::KeyError> {
        let key = crate::IdempotencyKey::parse(key.as_bytes())?;
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        Ok(ScopeHash::new(
            tenant,
            method,
            path,
            key.as_str().as_bytes(),
        ))
    }

    /// The scope of `key` for `tenant` (`None` = global scope) on `method` + `path`.
    pub fn new(tenant: Option<&[u8]>, method: &Method, path: &str, key: &[u8]) -> Self {
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        let mut fields = Fields::new(context_key("tower-idempotency 2026 scope v1", &KEY));
        match tenant {
            Some(tenant) => fields.field(b"t").field(tenant),
            None => fields.field(b"g"),
        };
        fields
            .field(method.as_str().as_bytes())
            .field(path.as_bytes())
            .field(key);
        ScopeHash(fields.finish())
    }
}

impl Fingerprint {
    /// The fingerprint of a buffered request.
    pub fn new(
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        fingerprinted: &[HeaderName],
        body: &[u8],
    ) -> Self {
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        let key = context_key("tower-idempotency 2026 fingerprint v1", &KEY);
        let mut fields = Fingerprint::request_line(key, method, path, query);
        for name in fingerprinted {
            fields.field(name.as_str().as_bytes());
            let values = headers.get_all(name);
            let count = u32::try_from(values.iter().count()).unwrap_or(u32::MAX);
            fields.field(&count.to_le_bytes());
            for value in values {
                fields.field(value.as_bytes());
            }
        }
        fields.large_field(body);
        Fingerprint(fields.finish())
    }

    /// The fingerprint of a request whose headers and body the policy normalised into
    /// `payload`: never equal to a raw one's (another context).
    pub(crate) fn normalised(
        method: &Method,
        path: &str,
        query: Option<&str>,
        payload: &[u8],
    ) -> Self {
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        let key = context_key("tower-idempotency 2026 normalised fingerprint v1", &KEY);
        let mut fields = Fingerprint::request_line(key, method, path, query);
        fields.large_field(payload);
        Fingerprint(fields.finish())
    }

    /// The fields every fingerprint starts with, under its context's `key`: the method,
    /// the path and the query (`?` then the query, or one empty field without one, so
    /// `/a?` and `/a` differ).
    fn request_line(key: &[u8; 32], method: &Method, path: &str, query: Option<&str>) -> Fields {
        let mut fields = Fields::new(key);
        fields
            .field(method.as_str().as_bytes())
            .field(path.as_bytes());
        match query {
            Some(query) => fields.field(b"?").field(query.as_bytes()),
            None => fields.field(b""),
        };
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_normalised_fingerprint_never_equals_a_raw_one() {
        let raw = Fingerprint::new(&Method::POST, "/p", None, &HeaderMap::new(), &[], b"x");
        let normalised = Fingerprint::normalised(&Method::POST, "/p", None, b"x");
        assert_ne!(raw, normalised);
        assert_ne!(
            normalised,
            Fingerprint::normalised(&Method::POST, "/p", Some(""), b"x")
        );
        assert_eq!(
            normalised,
            Fingerprint::normalised(&Method::POST, "/p", None, b"x")
        );
    }

    #[test]
    fn scope_separates_every_part() {
        let base = ScopeHash::new(Some(b"t1"), &Method::POST, "/a", b"k");
        assert_ne!(base, ScopeHash::new(Some(b"t2"), &Method::POST, "/a", b"k"));
        assert_ne!(base, ScopeHash::new(None, &Method::POST, "/a", b"k"));
        assert_ne!(
            base,
            ScopeHash::new(Some(b"t1"), &Method::PATCH, "/a", b"k")
        );
        assert_ne!(base, ScopeHash::new(Some(b"t1"), &Method::POST, "/b", b"k"));
        assert_ne!(
            base,
            ScopeHash::new(Some(b"t1"), &Method::POST, "/a", b"k2")
        );
        // Length prefixes: moving a byte between fields changes the hash.
        assert_ne!(
            ScopeHash::new(Some(b"ab"), &Method::POST, "/a", b"k"),
            ScopeHash::new(Some(b"a"), &Method::POST, "b/a", b"k")
        );
        assert_eq!(base, ScopeHash::new(Some(b"t1"), &Method::POST, "/a", b"k"));
    }

    #[test]
    fn fingerprint_covers_query_headers_and_body() {
        let ct = [http::header::CONTENT_TYPE];
        let mut json = HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let fp = |q: Option<&str>, h: &HeaderMap, b: &[u8]| {
            Fingerprint::new(&Method::POST, "/p", q, h, &ct, b)
        };
        let base = fp(None, &json, b"{}");
        assert_ne!(base, fp(Some(""), &json, b"{}"));
        assert_ne!(base, fp(Some("a=1"), &json, b"{}"));
        assert_ne!(base, fp(None, &HeaderMap::new(), b"{}"));
        assert_ne!(base, fp(None, &json, b"{ }"));
        assert_eq!(base, fp(None, &json, b"{}"));
    }

    /// Scope hashes name records already stored (in Redis, for a TTL of up to years):
    /// they must never change between versions. Pinned values, with short fields, fields
    /// longer than the buffer, and bodies over and under the inline limit.
    #[test]
    fn hashes_are_stable_across_versions() {
        let scope = ScopeHash::new(Some(b"tenant-1"), &Method::POST, "/payments", b"8e03978e");
        let long = ScopeHash::new(None, &Method::PATCH, &"/a".repeat(200), &[b'k'; 255]);
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let ct = [http::header::CONTENT_TYPE];
        let fp = Fingerprint::new(
            &Method::POST,
            "/payments",
            Some("x=1"),
            &h,
            &ct,
            br#"{"amount":1}"#,
        );
        let big = Fingerprint::new(
            &Method::POST,
            &"/p".repeat(100),
            Some(&"q".repeat(300)),
            &h,
            &ct,
            &[7u8; 1000],
        );
        assert_eq!(
            scope.to_hex(),
            "5682c67002a5b3cf601e3194dc1515d8c5038678ce5cbd8b472626ad782e6153"
        );
        assert_eq!(
            long.to_hex(),
            "6101e8931ed6961f14d8a3c8726adde4fcdc4131e5c0305eb9265bedf8102da7"
        );
        assert_eq!(
            fp.to_hex(),
            "d0b04f613017e08bd673a5289ab57465976a036fe6b48837e4ac713fd47d02c2"
        );
        assert_eq!(
            big.to_hex(),
            "9bd095bbbd15844e9e3e47189b44c1fe05f2a0d38bb40d6d750db323efa5407f"
        );
    }
}
