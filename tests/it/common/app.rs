//! The app the shared suite drives: one counting handler on several routes, steered by
//! request headers so each case can ask for a delay, a status, a panic or a large body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use axum::routing;
use axum::Router;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_idempotency::problems::PROBLEM_TYPE_BASE;
use tower_idempotency::store::FencingToken;
use tower_idempotency::{IdempotencyLayer, Store};

/// A router with the layer on every route, and what its handler saw.
pub struct Harness {
    pub router: Router,
    runs: Arc<AtomicUsize>,
    /// Notified when a handler run starts / finishes.
    pub started: Arc<Notify>,
    pub finished: Arc<Notify>,
}

impl Harness {
    pub fn new<St: Store>(layer: IdempotencyLayer<St>) -> Self {
        let counters = (Arc::default(), Arc::default(), Arc::default());
        Self::with_counters(layer, counters)
    }

    /// The handler on `path` only, so a test's metric labels (the route) are its own.
    pub fn on<St: Store>(layer: IdempotencyLayer<St>, path: &str) -> Self {
        let counters = (Arc::default(), Arc::default(), Arc::default());
        Self::with_counters(layer.clone(), counters).only_on(layer, path)
    }

    /// [`sharing_counters`](Self::sharing_counters), with the handler on `path` only.
    pub fn sharing_counters_on<St: Store>(&self, layer: IdempotencyLayer<St>, path: &str) -> Self {
        self.sharing_counters(layer.clone()).only_on(layer, path)
    }

    fn only_on<St: Store>(mut self, layer: IdempotencyLayer<St>, path: &str) -> Self {
        self.router = Router::new().route(path, routing::post(self.handler()).layer(layer));
        self
    }

    /// A second app server with its own layer (its own store client) whose handler counts
    /// into this one's counters.
    pub fn sharing_counters<St: Store>(&self, layer: IdempotencyLayer<St>) -> Self {
        let counters = (
            self.runs.clone(),
            self.started.clone(),
            self.finished.clone(),
        );
        Self::with_counters(layer, counters)
    }

    fn with_counters<St: Store>(
        layer: IdempotencyLayer<St>,
        (runs, started, finished): (Arc<AtomicUsize>, Arc<Notify>, Arc<Notify>),
    ) -> Self {
        let mut h = Harness {
            router: Router::new(),
            runs,
            started,
            finished,
        };
        let handler = h.handler();
        let route = || routing::post(handler.clone()).layer(layer.clone());
        h.router = Router::new()
            .route("/pay", route())
            .route("/orders/{id}/cancel", route())
            .nest("/nested", Router::new().route("/pay", route()));
        h
    }

    fn handler(
        &self,
    ) -> impl Fn(Request<Body>) -> futures_util::future::BoxFuture<'static, Response<Body>>
           + Clone
           + Send
           + Sync
           + 'static {
        let (runs, started, finished) = (
            self.runs.clone(),
            self.started.clone(),
            self.finished.clone(),
        );
        move |req: Request<Body>| {
            let (runs, started, finished) = (runs.clone(), started.clone(), finished.clone());
            Box::pin(async move { handle(req, runs, started, finished).await })
        }
    }

    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn handle(
    req: Request<Body>,
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
    finished: Arc<Notify>,
) -> Response<Body> {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    started.notify_one();
    let (parts, body) = req.into_parts();
    let h = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(ms) = h("x-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    finished.notify_one();
    if run == 1 && h("x-panic-first").is_some() {
        panic!("handler panicked on purpose");
    }
    let mut status = h("x-status").and_then(|s| s.parse().ok()).unwrap_or(201);
    if run == 1 {
        if let Some(first) = h("x-fail-first").and_then(|s| s.parse().ok()) {
            status = first;
        }
    }
    if !body.is_empty() && serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        status = 400;
    }
    let payload = match h("x-body-size").and_then(|s| s.parse::<usize>().ok()) {
        Some(n) => Bytes::from(vec![b'x'; n]),
        None => Bytes::from(format!("{{\"run\":{run},\"len\":{}}}", body.len())),
    };
    let mut response = Response::new(response_body(payload, &h));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.append(header::LINK, HeaderValue::from_static("</a>; rel=\"a\""));
    headers.append(header::LINK, HeaderValue::from_static("</b>; rel=\"b\""));
    headers.insert(
        "x-bin",
        HeaderValue::from_bytes(&[b'v', 0xff, 0xfe]).unwrap(),
    );
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_static("session=secret"),
    );
    headers.insert(
        header::DATE,
        HeaderValue::from_static("Mon, 23 Nov 2026 10:00:00 GMT"),
    );
    headers.insert("x-denied", HeaderValue::from_static("1"));
    if h("x-echo-token").is_some() {
        if let Some(token) = parts.extensions.get::<FencingToken>() {
            headers.insert("x-token", HeaderValue::from_str(&token.to_hex()).unwrap());
        }
    }
    response
}

/// The response body: whole, or streamed in the ways the headers ask for.
///
/// - `x-body-fail: error|panic`: one chunk, then the stream fails (or panics);
/// - `x-slow-body: CHUNKS,MS`: the payload in `CHUNKS` chunks, `MS` ms apart;
/// - `x-trailers: VALUE`: the payload, then a trailer `x-checksum: VALUE`.
fn response_body(payload: Bytes, h: &impl Fn(&str) -> Option<String>) -> Body {
    type Item = Result<Frame<Bytes>, std::io::Error>;
    if let Some(how) = h("x-body-fail") {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(Frame::data(payload))]);
        let failing = futures_util::stream::once(async move {
            tokio::task::yield_now().await;
            if how == "panic" {
                panic!("response body panicked on purpose");
            }
            Err::<Frame<Bytes>, _>(std::io::Error::other("response body failed on purpose"))
        });
        return Body::new(StreamBody::new(first.chain(failing)));
    }
    if let Some(spec) = h("x-slow-body") {
        let (chunks, ms) = spec.split_once(',').unwrap();
        let (chunks, ms): (usize, u64) = (chunks.parse().unwrap(), ms.parse().unwrap());
        let size = payload.len().div_ceil(chunks).max(1);
        let parts: Vec<Bytes> = payload.chunks(size).map(Bytes::copy_from_slice).collect();
        let stream = futures_util::stream::iter(parts).then(move |part| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::io::Error>(Frame::data(part))
        });
        return Body::new(StreamBody::new(stream));
    }
    if let Some(value) = h("x-trailers") {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_str(&value).unwrap());
        let frames: Vec<Item> = vec![Ok(Frame::data(payload)), Ok(Frame::trailers(trailers))];
        return Body::new(StreamBody::new(futures_util::stream::iter(frames)));
    }
    Body::from(payload)
}

/// A POST with an optional key and a JSON content type.
pub fn post(path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header(
            "idempotency-key",
            HeaderValue::from_bytes(key.as_bytes()).unwrap(),
        );
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

pub fn with_header(mut req: Request<Body>, name: &'static str, value: &str) -> Request<Body> {
    req.headers_mut()
        .insert(name, HeaderValue::from_str(value).unwrap());
    req
}

pub fn delayed(req: Request<Body>, ms: u64) -> Request<Body> {
    with_header(req, "x-delay-ms", &ms.to_string())
}

/// The tenant is the bearer token (what an auth layer outside would establish).
pub fn bearer_tenant(parts: &axum::http::request::Parts) -> Option<String> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The response's trailers, if its body carried any.
    pub trailers: Option<HeaderMap>,
    /// Why reading the response body failed (the body is then empty).
    pub body_error: Option<String>,
}

impl Reply {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends on a task of its own, as a separate client would.
pub fn spawn_send(router: &Router, req: Request<Body>) -> tokio::task::JoinHandle<Reply> {
    let router = router.clone();
    tokio::spawn(async move { send(&router, req).await })
}

pub async fn send(router: &Router, req: Request<Body>) -> Reply {
    let response = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let (body, trailers, body_error) = match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers, None)
        }
        Err(err) => (Bytes::new(), None, Some(err.to_string())),
    };
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
        trailers,
        body_error,
    }
}

/// Asserts an RFC 9457 problem with the stable `type` of `slug`.
#[track_caller]
pub fn assert_problem(reply: &Reply, status: StatusCode, slug: &str) {
    assert_eq!(reply.status, status, "body: {:?}", reply.body);
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let json = reply.json();
    assert_eq!(json["type"], format!("{PROBLEM_TYPE_BASE}{slug}"), "{json}");
    assert_eq!(json["status"], status.as_u16());
    assert!(json["title"].is_string() && json["detail"].is_string());
}
