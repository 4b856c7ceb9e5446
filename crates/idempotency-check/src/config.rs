//! What to check and how: [`Config`], built with builder methods and validated once by
//! [`run`](crate::run).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use idempotency_check::{Config, InFlightMode};
//!
//! # fn main() -> Result<(), idempotency_check::ConfigError> {
//! let config = Config::new("http://127.0.0.1:3000/payments", r#"{"amount": 1000, "currency": "EUR"}"#)?
//!     .header_line("Authorization: Bearer alice")?
//!     .other_tenant_header_line("Authorization: Bearer bob")?
//!     .executions_url("http://127.0.0.1:3000/payments")?
//!     .slow_body(r#"{"amount": 1000, "currency": "EUR", "delay_ms": 1500}"#)
//!     .in_flight(InFlightMode::Wait)
//!     .ttl(Duration::from_secs(2));
//! assert!(config.validate().is_ok());
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Uri};

/// The default `--concurrency`: requests sent at once with one key.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// The largest `--concurrency` accepted.
pub const MAX_CONCURRENCY: usize = 256;
/// The default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `--ttl-secs` accepted (the run waits that long).
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// A bad setting: the run does not start (the binary exits with 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A URL that does not parse, or is not `http://host[:port]/path`.
    #[error("{what} {url:?} is not a usable URL: {why}")]
    Url {
        /// Which setting (`--url`, `--executions-url`).
        what: &'static str,
        /// The value given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// A header line that is not `Name: value`.
    #[error("header {line:?} is not `Name: value`: {why}")]
    Header {
        /// The line given.
        line: String,
        /// What is wrong with it.
        why: String,
    },
    /// `--key-header` is not a header name.
    #[error("{0:?} is not a header name")]
    KeyHeader(String),
    /// `--method` is not an HTTP method.
    #[error("{0:?} is not an HTTP method")]
    Method(String),
    /// `--executions-pointer` is not a JSON pointer (RFC 6901).
    #[error("{0:?} is not a JSON pointer: it must be empty or start with `/`")]
    Pointer(String),
    /// A number out of its range.
    #[error("{what} must be {range}, not {value}")]
    Range {
        /// Which setting.
        what: &'static str,
        /// The accepted range.
        range: &'static str,
        /// The value given.
        value: String,
    },
    /// Two settings that contradict each other.
    #[error("{0}")]
    Conflict(&'static str),
}

/// What a duplicate sent while the first request still runs must get
/// (`--in-flight`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlightMode {
    /// `409 Conflict` at once, as the draft's Error Handling section asks (the default).
    #[default]
    Conflict,
    /// The same answer as the first request, after waiting for it.
    Wait,
    /// Either of the two.
    Any,
}

impl InFlightMode {
    /// `conflict`, `wait` or `any`.
    pub fn as_str(self) -> &'static str {
        match self {
            InFlightMode::Conflict => "conflict",
            InFlightMode::Wait => "wait",
            InFlightMode::Any => "any",
        }
    }
}

impl fmt::Display for InFlightMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `http://` URL taken apart for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// As given, for the report.
    pub(crate) url: String,
    /// `host[:port]` for the `Host` header.
    pub(crate) authority: String,
    /// The host to connect to (IPv6 brackets removed).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query: the request target.
    pub(crate) path: String,
}

impl Target {
    pub(crate) fn parse(what: &'static str, url: &str) -> Result<Target, ConfigError> {
        let bad = |why: &str| ConfigError::Url {
            what,
            url: url.to_string(),
            why: why.to_string(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "https is not supported: point it at the service's plain-HTTP port \
                     (or a local TLS-terminating proxy)",
                ))
            }
            Some(other) => {
                return Err(bad(&format!("scheme {other:?}: only http:// is supported")))
            }
            None => return Err(bad("no scheme: write http://host:port/path")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info in the URL: send credentials with -H"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let path = uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        Ok(Target {
            url: url.to_string(),
            authority: authority.as_str().to_string(),
            host,
            port: authority.port_u16().unwrap_or(80),
            path,
        })
    }
}

/// Where execution counts come from (`--executions-url`, `--executions-pointer`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Executions {
    pub(crate) target: Target,
    /// RFC 6901 pointer to an array (its length) or a non-negative integer; empty is the
    /// whole document.
    pub(crate) pointer: String,
}

/// Everything a run needs: the endpoint, the request of one operation, and how the API
/// is expected to behave. See the [module docs](crate::config) for an example.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) target: Target,
    pub(crate) method: Method,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) other_tenant: Vec<(HeaderName, HeaderValue)>,
    pub(crate) body: Bytes,
    pub(crate) slow_body: Option<Bytes>,
    pub(crate) bad_body: Option<Bytes>,
    pub(crate) other_body: Option<Bytes>,
    pub(crate) executions: Option<Executions>,
    pub(crate) key_header: HeaderName,
    pub(crate) in_flight: InFlightMode,
    pub(crate) key_required: bool,
    pub(crate) concurrency: usize,
    pub(crate) ttl: Option<Duration>,
    pub(crate) timeout: Duration,
    pub(crate) progress: bool,
}

impl Config {
    /// The endpoint (`--url`, `http://` only) and the body of one operation (`--body`):
    /// with a fresh key it must succeed (2xx).
    ///
    /// Defaults: `POST`, `Idempotency-Key`, a key is required, in flight `conflict`,
    /// concurrency 16, 30 s per request, no TTL check, no progress bars, and
    /// `Content-Type: application/json` unless a header sets another.
    pub fn new(url: &str, body: impl Into<Bytes>) -> Result<Config, ConfigError> {
        Ok(Config {
            target: Target::parse("--url", url)?,
            method: Method::POST,
            headers: Vec::new(),
            other_tenant: Vec::new(),
            body: body.into(),
            slow_body: None,
            bad_body: None,
            other_body: None,
            executions: None,
            key_header: HeaderName::from_static("idempotency-key"),
            in_flight: InFlightMode::default(),
            key_required: true,
            concurrency: DEFAULT_CONCURRENCY,
            ttl: None,
            timeout: DEFAULT_TIMEOUT,
            progress: false,
        })
    }

    /// The method of the operation (default `POST`).
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// A header sent with every request (`-H`), e.g. the caller's credentials. Repeat
    /// for more; a name given twice is sent twice.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// [`Config::header`] from a `Name: value` line, as curl's `-H` takes it.
    pub fn header_line(self, line: &str) -> Result<Self, ConfigError> {
        let (name, value) = parse_header_line(line)?;
        Ok(self.header(name, value))
    }

    /// A header that makes the requests another tenant's (`--other-tenant-header`): it
    /// replaces every header of the same name. Without one, the scope check is skipped.
    pub fn other_tenant_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.other_tenant.push((name, value));
        self
    }

    /// [`Config::other_tenant_header`] from a `Name: value` line.
    pub fn other_tenant_header_line(self, line: &str) -> Result<Self, ConfigError> {
        let (name, value) = parse_header_line(line)?;
        Ok(self.other_tenant_header(name, value))
    }

    /// A body that keeps the handler busy (`--slow-body`), for the in-flight check; it
    /// must take well over 300 ms. Without one, that check is skipped.
    pub fn slow_body(mut self, body: impl Into<Bytes>) -> Self {
        self.slow_body = Some(body.into());
        self
    }

    /// A body the API rejects with a 4xx (`--bad-body`). Default: the body cut short by
    /// one byte, which a JSON API rejects.
    pub fn bad_body(mut self, body: impl Into<Bytes>) -> Self {
        self.bad_body = Some(body.into());
        self
    }

    /// A body that is a different operation (`--other-body`), for the payload-mismatch
    /// check. Default: the body with its first top-level JSON number increased by one
    /// (else its first string extended, else a newline appended).
    pub fn other_body(mut self, body: impl Into<Bytes>) -> Self {
        self.other_body = Some(body.into());
        self
    }

    /// A `GET` URL, sent with the same headers, whose JSON array length is how many
    /// times the operation ran for that caller (`--executions-url`). Without it,
    /// execution counts are skipped and reported as such.
    pub fn executions_url(mut self, url: &str) -> Result<Self, ConfigError> {
        let target = Target::parse("--executions-url", url)?;
        let pointer = self
            .executions
            .take()
            .map(|e| e.pointer)
            .unwrap_or_default();
        self.executions = Some(Executions { target, pointer });
        Ok(self)
    }

    /// Where in the executions document the count is (`--executions-pointer`, RFC 6901):
    /// an array (its length) or a non-negative integer. Default: the whole document is
    /// the array. Needs [`Config::executions_url`].
    pub fn executions_pointer(mut self, pointer: &str) -> Result<Self, ConfigError> {
        if !pointer.is_empty() && !pointer.starts_with('/') {
            return Err(ConfigError::Pointer(pointer.to_string()));
        }
        match &mut self.executions {
            Some(executions) => executions.pointer = pointer.to_string(),
            None => {
                return Err(ConfigError::Conflict(
                    "--executions-pointer needs --executions-url",
                ))
            }
        }
        Ok(self)
    }

    /// The key header's name (default `Idempotency-Key`).
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.key_header = name;
        self
    }

    /// What a duplicate in flight must get (default [`InFlightMode::Conflict`]).
    pub fn in_flight(mut self, mode: InFlightMode) -> Self {
        self.in_flight = mode;
        self
    }

    /// The API lets a request without a key through (`--key-optional`): the missing-key
    /// check then expects a 2xx instead of a 4xx. Default: a key is required.
    pub fn key_optional(mut self) -> Self {
        self.key_required = false;
        self
    }

    /// How many requests the concurrency check sends at once with one key (default 16,
    /// 2 to 256).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// The API's TTL for a stored response (`--ttl-secs`, up to an hour): the expiry
    /// check waits for it (plus 1 s) and expects the key to run as new. Default: no
    /// expiry check.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The longest wait for one answer (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Progress bars on stderr during the concurrency and waiting phases (default off;
    /// the binary turns them on, and they stay hidden when stderr is not a terminal).
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Checks the settings as a whole; [`run`](crate::run) calls it first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(2..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(ConfigError::Range {
                what: "--concurrency",
                range: "from 2 to 256",
                value: self.concurrency.to_string(),
            });
        }
        if let Some(ttl) = self.ttl {
            if ttl.is_zero() || ttl > MAX_TTL {
                return Err(ConfigError::Range {
                    what: "--ttl-secs",
                    range: "from 1 to 3600 seconds",
                    value: ttl.as_secs().to_string(),
                });
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(600) {
            return Err(ConfigError::Range {
                what: "--timeout-secs",
                range: "from 1 to 600 seconds",
                value: self.timeout.as_secs().to_string(),
            });
        }
        if self.body.is_empty() {
            return Err(ConfigError::Conflict(
                "--body is empty: give the body of one operation",
            ));
        }
        if self.bad_body.as_ref() == Some(&self.body) {
            return Err(ConfigError::Conflict(
                "--bad-body is the same as --body: give one the API rejects",
            ));
        }
        if self.other_body.as_ref() == Some(&self.body) {
            return Err(ConfigError::Conflict(
                "--other-body is the same as --body: give another operation's body",
            ));
        }
        if self.key_header == CONTENT_TYPE {
            return Err(ConfigError::KeyHeader(self.key_header.to_string()));
        }
        if self
            .headers
            .iter()
            .any(|(name, _)| *name == self.key_header)
            || self
                .other_tenant
                .iter()
                .any(|(name, _)| *name == self.key_header)
        {
            return Err(ConfigError::Conflict(
                "a -H header has the key header's name: the checker sends the keys itself",
            ));
        }
        Ok(())
    }

    /// The request body of the mismatch check: [`Config::other_body`] or one derived.
    pub(crate) fn other_body_or_derived(&self) -> Bytes {
        self.other_body
            .clone()
            .unwrap_or_else(|| derive_other_body(&self.body))
    }

    /// The rejected body: [`Config::bad_body`], or the body cut short by one byte.
    pub(crate) fn bad_body_or_derived(&self) -> Bytes {
        self.bad_body
            .clone()
            .unwrap_or_else(|| self.body.slice(..self.body.len().saturating_sub(1)))
    }
}

/// Parses `Name: value` (curl's `-H`); the value is trimmed of surrounding spaces.
pub fn parse_header_line(line: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let bad = |why: &str| ConfigError::Header {
        line: line.to_string(),
        why: why.to_string(),
    };
    let (name, value) = line.split_once(':').ok_or_else(|| bad("no `:`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| bad("not a header name before the `:`"))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad("not a valid header value"))?;
    Ok((name, value))
}

/// Parses a method name (`--method`).
pub fn parse_method(method: &str) -> Result<Method, ConfigError> {
    Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| ConfigError::Method(method.to_string()))
}

/// A body that is another operation: the first top-level JSON number + 1, else the first
/// top-level string with `-2` appended, else the body with a newline appended.
fn derive_other_body(body: &Bytes) -> Bytes {
    if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice(body) {
        let number = map.iter_mut().find(|(_, v)| v.is_number());
        if let Some((_, value)) = number {
            *value = match (value.as_u64(), value.as_i64(), value.as_f64()) {
                (Some(n), _, _) => n.saturating_add(1).into(),
                (None, Some(n), _) => n.saturating_add(1).into(),
                (None, None, Some(f)) => serde_json::json!(f + 1.0),
                _ => value.clone(),
            };
            return Bytes::from(serde_json::Value::Object(map).to_string());
        }
        let string = map.iter_mut().find(|(_, v)| v.is_string());
        if let Some((_, value)) = string {
            let s = value.as_str().unwrap_or_default().to_string();
            *value = serde_json::Value::String(s + "-2");
            return Bytes::from(serde_json::Value::Object(map).to_string());
        }
    }
    let mut other = body.to_vec();
    other.push(b'\n');
    Bytes::from(other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("--url", "http://127.0.0.1:3000/payments?x=1").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.path.as_str(),
                t.authority.as_str()
            ),
            ("127.0.0.1", 3000, "/payments?x=1", "127.0.0.1:3000")
        );
        let t = Target::parse("--url", "http://[::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 80, "/"));
        let t = Target::parse("--url", "http://localhost:8080").unwrap();
        assert_eq!(t.path, "/");
        for bad in [
            "https://x/",
            "ftp://x/",
            "127.0.0.1:3000/payments",
            "http://u:p@x/",
            "http:///x",
            "",
        ] {
            assert!(Target::parse("--url", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_lines() {
        let (n, v) = parse_header_line("Authorization:  Bearer alice ").unwrap();
        assert_eq!(
            (n.as_str(), v.to_str().unwrap()),
            ("authorization", "Bearer alice")
        );
        let (n, v) = parse_header_line("X-Empty:").unwrap();
        assert_eq!((n.as_str(), v.as_bytes()), ("x-empty", &b""[..]));
        assert!(parse_header_line("no colon").is_err());
        assert!(parse_header_line("bad name: x").is_err());
        assert!(parse_header_line(": x").is_err());
    }

    #[test]
    fn derived_bodies() {
        let body = Bytes::from_static(br#"{"currency": "EUR", "amount": 1000}"#);
        let other: serde_json::Value = serde_json::from_slice(&derive_other_body(&body)).unwrap();
        assert_eq!(other["amount"], 1001);
        assert_eq!(other["currency"], "EUR");
        let other = derive_other_body(&Bytes::from_static(br#"{"item": "book"}"#));
        assert_eq!(&other[..], br#"{"item":"book-2"}"#);
        assert_eq!(
            &derive_other_body(&Bytes::from_static(b"abc"))[..],
            b"abc\n"
        );
        let config = Config::new("http://x/", "{}").unwrap();
        assert_eq!(&config.bad_body_or_derived()[..], b"{");
    }

    #[test]
    fn validation() {
        let ok = || Config::new("http://x/", "{}").unwrap();
        assert!(ok().validate().is_ok());
        assert!(ok().concurrency(1).validate().is_err());
        assert!(ok().concurrency(257).validate().is_err());
        assert!(ok().ttl(Duration::ZERO).validate().is_err());
        assert!(ok().bad_body("{}").validate().is_err());
        assert!(ok().other_body("{}").validate().is_err());
        assert!(ok()
            .header_line("Idempotency-Key: x")
            .unwrap()
            .validate()
            .is_err());
        assert!(ok().executions_pointer("/n").is_err());
        assert!(ok()
            .executions_url("http://x/n")
            .unwrap()
            .executions_pointer("n")
            .is_err());
        assert!(Config::new("http://x/", "").unwrap().validate().is_err());
        assert_eq!(parse_method("patch").unwrap(), Method::PATCH);
        assert!(parse_method("BAD METHOD").is_err());
    }
}
