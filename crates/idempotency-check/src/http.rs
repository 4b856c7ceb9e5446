//! A small HTTP/1.1 client on hyper: one connection per request, so the concurrency
//! check can open its connections first and then send every request at once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Target;

/// The largest response body read; a larger one is an error.
pub(crate) const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// What went wrong talking to the API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum HttpError {
    /// The TCP connection failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke or the answer was not HTTP/1.1.
    #[error("HTTP exchange failed")]
    Http(#[from] hyper::Error),
    /// The request could not be built (a header the `http` crate refuses).
    #[error("request could not be built")]
    Request(#[from] http::Error),
    /// The response body could not be read, or was over 16 MiB.
    #[error("response body unreadable (or over 16 MiB)")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One request as the checks describe it.
#[derive(Clone, Debug)]
pub(crate) struct Outgoing {
    pub(crate) method: Method,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) body: Bytes,
}

/// A whole response.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// When the last byte arrived.
    pub(crate) at: Instant,
}

impl Reply {
    /// The first value of `name`, as text (empty when not UTF-8).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default())
    }

    /// For the report: `status problem <type>` for a problem+json answer (the last
    /// segment of its `type` URI), else `status` and up to 80 characters of the body.
    pub(crate) fn summary(&self) -> String {
        if let Some(kind) = self.problem_type() {
            return format!("{} problem {kind}", self.status.as_u16());
        }
        let body = snippet(&self.body, 80);
        if body.is_empty() {
            self.status.as_u16().to_string()
        } else {
            format!("{} {body}", self.status.as_u16())
        }
    }
}

impl Reply {
    /// The last segment of a problem+json answer's `type` URI (`idempotency-key-reused`).
    fn problem_type(&self) -> Option<String> {
        let content_type = self.header("content-type")?.trim().to_ascii_lowercase();
        if !content_type.starts_with("application/problem+json") {
            return None;
        }
        let problem: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        let kind = problem.get("type")?.as_str()?;
        let short = kind
            .rsplit(['#', '/'])
            .find(|s| !s.is_empty())
            .unwrap_or(kind);
        Some(snippet(short.as_bytes(), 60))
    }
}

/// Up to `max` characters of `bytes` on one line, `…` when cut.
pub(crate) fn snippet(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one_line = one_line.trim();
    if one_line.chars().count() > max {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    } else {
        one_line.to_string()
    }
}

/// An open HTTP/1.1 connection, ready for one request.
pub(crate) struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

/// Opens a connection to `target` within `timeout`.
pub(crate) async fn connect(target: &Target, timeout: Duration) -> Result<Connection, HttpError> {
    let addr = format!("{}:{}", target.host, target.port);
    let open = async {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| HttpError::Connect {
                addr: addr.clone(),
                source,
            })?;
        // Latency matters more than packets here: the race check sends small requests.
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection task ends when the sender is dropped or the peer closes.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender })
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

impl Connection {
    /// Sends `request` to `target` and reads the whole answer within `timeout`.
    pub(crate) async fn send(
        mut self,
        target: &Target,
        request: &Outgoing,
        timeout: Duration,
    ) -> Result<Reply, HttpError> {
        let exchange = async {
            let mut builder = Request::builder()
                .method(request.method.clone())
                .uri(target.path.as_str())
                .header(HOST, target.authority.as_str());
            for (name, value) in &request.headers {
                builder = builder.header(name, value);
            }
            let http_request = builder.body(Full::new(request.body.clone()))?;
            self.sender.ready().await?;
            let response = self.sender.send_request(http_request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(HttpError::Body)?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
                at: Instant::now(),
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }
}

/// Connects and sends: one request on a connection of its own.
pub(crate) async fn send(
    target: &Target,
    request: &Outgoing,
    timeout: Duration,
) -> Result<Reply, HttpError> {
    let started = Instant::now();
    let connection = connect(target, timeout).await?;
    let left = timeout.saturating_sub(started.elapsed());
    connection.send(target, request, left).await
}

/// An error with its causes, `a: b: c`.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(content_type: &str, body: &str) -> Reply {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_str(content_type).unwrap());
        Reply {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            headers,
            body: Bytes::from(body.to_string()),
            at: Instant::now(),
        }
    }

    #[test]
    fn summaries() {
        let problem = reply(
            "application/problem+json",
            r#"{"type":"https://x.example/problems/index.html#idempotency-key-reused"}"#,
        );
        assert_eq!(problem.summary(), "422 problem idempotency-key-reused");
        let slash = reply(
            "application/problem+json",
            r#"{"type":"https://x/p/reused/"}"#,
        );
        assert_eq!(slash.summary(), "422 problem reused");
        let untyped = reply("application/problem+json", r#"{"title":"t"}"#);
        assert_eq!(untyped.summary(), r#"422 {"title":"t"}"#);
        let plain = reply("text/plain", "no\nway");
        assert_eq!(plain.summary(), "422 no way");
        let long = reply("text/plain", &"x".repeat(100));
        assert_eq!(long.summary().chars().count(), 4 + 80 + 1);
        assert_eq!(reply("text/plain", "").summary(), "422");
    }
}
