//! The app the shared suite drives: one counting handler on several routes, steered by
//! request headers so each case can ask for a delay, a status, a panic or a large body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use axum::routing;
use axum::Router;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_idempotency::problem::PROBLEM_TYPE_BASE;
use tower_idempotency::{FencingToken, IdempotencyLayer, Store};

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
        let handler = {
            let (runs, started, finished) = (runs.clone(), started.clone(), finished.clone());
            move |req: Request<Body>| {
                let (runs, started, finished) = (runs.clone(), started.clone(), finished.clone());
                async move { handle(req, runs, started, finished).await }
            }
        };
        let route = || routing::post(handler.clone()).layer(layer.clone());
        let router = Router::new()
            .route("/pay", route())
            .route("/orders/{id}/cancel", route())
            .nest("/nested", Router::new().route("/pay", route()));
        Harness {
            router,
            runs,
            started,
            finished,
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
    let mut response = Response::new(Body::from(payload));
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
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
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
