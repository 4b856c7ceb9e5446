//! HTTP-level tests of the layer that do not depend on the store: how it attaches to a
//! `Router`, what passes through, real sockets, and hostile input.

use crate::common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode};
use axum::routing::{get, post, put};
use axum::Router;
use common::app::{assert_problem, send};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{service_fn, Layer, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

fn counted() -> (
    Arc<AtomicUsize>,
    impl Fn() -> std::future::Ready<(StatusCode, String)> + Clone,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = move || {
        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
        std::future::ready((StatusCode::CREATED, format!("run {n}")))
    };
    (runs, handler)
}

fn req(method: Method, path: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::empty()).unwrap()
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default()).global_scope()
}

#[tokio::test]
async fn works_as_router_layer_and_passes_through_gets_fallbacks_and_405s() {
    let (runs, h) = counted();
    let app = Router::new()
        .route("/pay", post(h.clone()))
        .route("/items", get(|| async { "items" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "nope") })
        .layer(layer().require_key());
    let first = send(&app, req(Method::POST, "/pay", Some("k"))).await;
    let retry = send(&app, req(Method::POST, "/pay", Some("k"))).await;
    assert!(retry.replayed() && retry.body == first.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // GET is not covered: it passes through before any key check.
    assert_eq!(
        send(&app, req(Method::GET, "/items", None)).await.status,
        StatusCode::OK
    );
    // A POST to the fallback is covered too under Router::layer (the SPEC's caveat).
    let r = send(&app, req(Method::POST, "/nowhere", None)).await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "idempotency-key-missing");
    // 405 for a covered method on a GET-only route goes through the layer as well.
    let r = send(&app, req(Method::POST, "/items", Some("k2"))).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn works_as_route_layer() {
    let (runs, h) = counted();
    let app = Router::new()
        .route("/pay", post(h))
        .route_layer(layer().require_key())
        .fallback(|| async { (StatusCode::NOT_FOUND, "nope") });
    send(&app, req(Method::POST, "/pay", Some("k"))).await;
    assert!(send(&app, req(Method::POST, "/pay", Some("k")))
        .await
        .replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // route_layer does not wrap the fallback: no key needed there.
    assert_eq!(
        send(&app, req(Method::POST, "/nowhere", None)).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn nested_routers_scope_by_the_full_original_path() {
    let (runs, h) = counted();
    let inner = || Router::new().route("/pay", post(h.clone())).layer(layer());
    let app = Router::new().nest("/v1", inner()).nest("/v2", inner());
    let a = send(&app, req(Method::POST, "/v1/pay", Some("k"))).await;
    let b = send(&app, req(Method::POST, "/v2/pay", Some("k"))).await;
    assert!(!a.replayed() && !b.replayed(), "two prefixes, two scopes");
    assert!(send(&app, req(Method::POST, "/v2/pay", Some("k")))
        .await
        .replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn per_route_policies_and_configured_methods() {
    let (runs, h) = counted();
    let app = Router::new()
        .route("/a", put(h.clone()).layer(layer().methods([Method::PUT])))
        .route("/b", put(h.clone()).layer(layer()));
    send(&app, req(Method::PUT, "/a", Some("k"))).await;
    assert!(
        send(&app, req(Method::PUT, "/a", Some("k")))
            .await
            .replayed(),
        "PUT covered on /a"
    );
    send(&app, req(Method::PUT, "/b", Some("k"))).await;
    assert!(
        !send(&app, req(Method::PUT, "/b", Some("k")))
            .await
            .replayed(),
        "PUT not covered by default"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[test]
#[should_panic(expected = "can cover only POST, PUT, PATCH and DELETE, not GET")]
fn get_cannot_be_covered() {
    // The setter does not panic; applying the layer does.
    let layer = layer().methods([Method::GET]);
    let _: axum::routing::MethodRouter = post(|| async {}).layer(layer);
}

#[test]
#[should_panic(expected = "is shorter than the lease")]
fn ttl_shorter_than_an_explicit_lease_is_rejected() {
    let five = std::time::Duration::from_secs(5);
    let _: axum::routing::MethodRouter = post(|| async {}).layer(layer().lease(five * 2).ttl(five));
}

#[test]
fn a_ttl_shorter_than_the_default_lease_lowers_it() {
    let five = std::time::Duration::from_secs(5);
    let layer = layer().ttl(five);
    assert_eq!(layer.policy().lease(), five);
    let _: axum::routing::MethodRouter = post(|| async {}).layer(layer);
}

#[test]
fn ttl_and_lease_may_be_set_in_either_order() {
    let five = std::time::Duration::from_secs(5);
    let _: axum::routing::MethodRouter = post(|| async {}).layer(layer().ttl(five).lease(five));
    let _: axum::routing::MethodRouter = post(|| async {}).layer(layer().lease(five).ttl(five));
}

#[tokio::test]
async fn the_longest_ttl_does_not_overflow_the_memory_store() {
    let (runs, h) = counted();
    let max = tower_idempotency::MAX_TTL;
    let app = Router::new().route("/pay", post(h).layer(layer().ttl(max).lease(max)));
    assert_eq!(
        send(&app, req(Method::POST, "/pay", Some("k")))
            .await
            .status,
        StatusCode::CREATED
    );
    assert!(send(&app, req(Method::POST, "/pay", Some("k")))
        .await
        .replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn service_error_releases_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inner = service_fn(move |_req: Request<RequestBody<Body>>| {
        let n = r.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err::<axum::response::Response, _>("backend down")
            } else {
                Ok(axum::response::Response::new(Body::from("ok")))
            }
        }
    });
    let svc = layer().layer(inner);
    let err = svc
        .clone()
        .oneshot(req(Method::POST, "/x", Some("k")))
        .await;
    assert_eq!(err.unwrap_err(), "backend down");
    let ok = svc
        .oneshot(req(Method::POST, "/x", Some("k")))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK, "released: the retry ran");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A service that panics in `call` itself, before it returns a future (a `service_fn`
/// closure, a `map_request` closure of a layer inside this one), is a handler that
/// panicked: that caller gets the 500 problem and the key is released, so the retry runs
/// (not 409 for a lease nobody holds, or an uncertain key on a refusing route).
#[tokio::test]
async fn a_service_that_panics_in_call_releases_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inner = service_fn(move |_req: Request<RequestBody<Body>>| {
        if r.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("panicked in call, before any future");
        }
        async move { Ok::<_, Infallible>(axum::response::Response::new(Body::from("ok"))) }
    });
    let refusing = layer().uncertain(tower_idempotency::Uncertain::Refuse);
    let svc = refusing.layer(inner);
    let first = svc
        .clone()
        .oneshot(req(Method::POST, "/x", Some("k")))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = http_body_util::BodyExt::collect(first.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("#handler-failed\""), "{body}");
    let retry = svc
        .oneshot(req(Method::POST, "/x", Some("k")))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::OK, "released: the retry ran");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The layer's service fits axum's `Router::layer` bounds (Clone, Send, Sync, Infallible).
#[allow(dead_code)]
fn bounds_hold() {
    fn assert_layer<L: Clone + Send + Sync + 'static>(_: &L) {}
    assert_layer(&layer());
    let _: Router = Router::new().layer(layer());
    let _: Result<(), Infallible> = Ok(());
}

/// A 32 MiB body over a real TCP socket reads back a 413, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_body_over_tcp_reads_back_413() {
    let app = Router::new().route("/pay", post(|| async { "never" }).layer(layer()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    for chunked in [false, true] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let size = 32 * 1024 * 1024;
        let head = if chunked {
            "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ntransfer-encoding: chunked\r\n\r\n".to_string()
        } else {
            format!("POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ncontent-length: {size}\r\n\r\n")
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..size / chunk.len() {
                let sent = if chunked {
                    wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await
                        .and(wr.write_all(&chunk).await)
                        .and(wr.write_all(b"\r\n").await)
                } else {
                    wr.write_all(&chunk).await
                };
                if sent.is_err() {
                    return wr;
                }
            }
            if chunked {
                let _ = wr.write_all(b"0\r\n\r\n").await;
            }
            // Keep the write half open: hyper closes at once on a half-close by default.
            wr
        });
        let mut response = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            rd.read_to_end(&mut response),
        )
        .await;
        drop(writer.await);
        let text = String::from_utf8_lossy(&response);
        assert!(read.is_ok(), "response read in time");
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "chunked={chunked}: {text:.200}"
        );
        assert!(text.contains("request-body-too-large"));
        assert!(text.to_ascii_lowercase().contains("connection: close"));
    }
    server.abort();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// No header value, key, method, path or body makes the layer panic; every answer is a
    /// response (the handler's or a problem).
    #[test]
    fn hostile_input_never_panics(
        key in proptest::collection::vec(any::<u8>(), 0..300),
        second_key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        chunks in proptest::collection::vec(0usize..64, 0..8),
        content_type in proptest::collection::vec(any::<u8>(), 0..40),
        method in prop_oneof![Just(Method::POST), Just(Method::PATCH), Just(Method::PUT), Just(Method::GET), Just(Method::DELETE)],
        path in "/[a-z0-9%/]{0,20}",
        lie_length in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route("/{*rest}", post(|b: axum::body::Bytes| async move { (StatusCode::CREATED, b) }).patch(|| async { "p" }))
                .layer(layer().max_body(1024));
            let mut builder = Request::builder().method(method).uri(if path.is_empty() { "/".into() } else { path });
            if let Ok(v) = HeaderValue::from_bytes(&key) {
                builder = builder.header("idempotency-key", v);
            }
            if let Some(Ok(v)) = second_key.map(|k| HeaderValue::from_bytes(&k)) {
                builder = builder.header("idempotency-key", v);
            }
            if let Ok(v) = HeaderValue::from_bytes(&content_type) {
                builder = builder.header("content-type", v);
            }
            if lie_length {
                builder = builder.header("content-length", "7");
            }
            // Split the body into chunks (including empty ones), streamed without a length.
            let mut parts: Vec<Result<Vec<u8>, std::io::Error>> = Vec::new();
            let mut rest = &body[..];
            for c in chunks {
                let n = c.min(rest.len());
                parts.push(Ok(rest[..n].to_vec()));
                rest = &rest[n..];
            }
            parts.push(Ok(rest.to_vec()));
            let req = builder.body(Body::from_stream(futures_util::stream::iter(parts))).unwrap();
            let response = app.oneshot(req).await.unwrap();
            let status = response.status();
            assert!(status.as_u16() >= 200, "a final response");
            if status.is_client_error() && status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED {
                assert_eq!(response.headers()["content-type"], "application/problem+json");
            }
        });
    }
}

#[tokio::test]
async fn ten_kilobyte_and_control_byte_keys_are_400() {
    let app = Router::new().route("/pay", post(|| async { "ran" }).layer(layer()));
    let long = "k".repeat(10 * 1024);
    let r = send(&app, req(Method::POST, "/pay", Some(&long))).await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "idempotency-key-invalid");
    for bad in [&b"k\x01"[..], b"\x7fk", b"\"k\x00\""] {
        let mut request = req(Method::POST, "/pay", None);
        // Control bytes other than TAB are not valid header values at all, so build them
        // through the one route that allows arbitrary bytes and skip what http refuses.
        if let Ok(value) = HeaderValue::from_bytes(bad) {
            request.headers_mut().insert("idempotency-key", value);
            let r = send(&app, request).await;
            assert_problem(&r, StatusCode::BAD_REQUEST, "idempotency-key-invalid");
        }
    }
    let mut tab = req(Method::POST, "/pay", None);
    tab.headers_mut()
        .insert("idempotency-key", HeaderValue::from_bytes(b"a\tb").unwrap());
    assert_problem(
        &send(&app, tab).await,
        StatusCode::BAD_REQUEST,
        "idempotency-key-invalid",
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Tenant ids full of scope separators and hash-tag braces never make two tenants
    /// share a scope: the second tenant's request runs, it is never handed the first's
    /// response.
    #[test]
    fn no_cross_tenant_replay(
        t1 in "[{}: a-z/\\\\]{0,12}",
        t2 in "[{}: a-z/\\\\]{0,12}",
        key in "[!#-~][!-~]{0,39}", // a leading `\"` would make it a quoted string
    ) {
        prop_assume!(t1 != t2);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let layer = IdempotencyLayer::new(MemoryStore::default()).tenant(|parts| {
                parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()).map(str::to_owned)
            });
            let (runs, h) = counted();
            let app = Router::new().route("/pay", post(h).layer(layer));
            let as_tenant = |t: &str| {
                let mut r = req(Method::POST, "/pay", None);
                r.headers_mut().insert("idempotency-key", HeaderValue::from_str(&key).unwrap());
                r.headers_mut().insert("x-tenant", HeaderValue::from_str(t).unwrap());
                r
            };
            let a = send(&app, as_tenant(&t1)).await;
            let b = send(&app, as_tenant(&t2)).await;
            assert!(!a.replayed() && !b.replayed(), "{t1:?} / {t2:?}");
            assert_ne!(a.body, b.body);
            assert_eq!(runs.load(Ordering::SeqCst), 2);
        });
    }
}

// ---- Hardening (issue 8): each case below failed on ee1b87b ----

/// `Expect: 100-continue` with a `Content-Length` over the limit: nothing has been sent
/// yet, so the layer answers 413 at once without asking for the body (no `100 Continue`,
/// no upload of megabytes that would be discarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_with_an_oversized_length_is_413_at_once() {
    let (runs, h) = counted();
    let app = Router::new().route("/pay", post(h).layer(layer().max_body(1024)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\n\
                content-length: 67108864\r\nexpect: 100-continue\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    // The client sends no body: it waits for `100 Continue` (or a final answer).
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut response),
    )
    .await;
    let text = String::from_utf8_lossy(&response);
    assert!(
        read.is_ok(),
        "the server answered without the body: {text:.200}"
    );
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "first status line: {text:.200}"
    );
    assert!(text.contains("request-body-too-large"));
    assert!(text.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    server.abort();
}

/// A layer told neither where the tenant comes from nor `.global_scope()` refuses to
/// start: guessing from `Authorization`/`Cookie` at run time misses `X-Api-Key` APIs,
/// whose callers would then share one scope.
#[test]
#[should_panic(expected = ".global_scope()")]
fn a_layer_without_tenant_or_global_scope_panics_when_applied() {
    let _: axum::routing::MethodRouter =
        post(|| async {}).layer(IdempotencyLayer::new(MemoryStore::default()));
}

/// An `X-Api-Key` API without a tenant configured would share one scope across callers;
/// the panic above is what prevents it. With a tenant resolver each caller has its own.
#[tokio::test]
async fn api_key_callers_never_share_a_scope() {
    let (runs, h) = counted();
    let tenant = |parts: &axum::http::request::Parts| {
        parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let app = Router::new().route(
        "/pay",
        post(h).layer(IdempotencyLayer::new(MemoryStore::default()).tenant(tenant)),
    );
    let as_caller = |key: &str| {
        let mut r = req(Method::POST, "/pay", Some("same"));
        r.headers_mut()
            .insert("x-api-key", HeaderValue::from_str(key).unwrap());
        r
    };
    let a = send(&app, as_caller("alice-key")).await;
    let b = send(&app, as_caller("bob-key")).await;
    assert!(!a.replayed() && !b.replayed() && a.body != b.body);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The renewal interval is at most a third of the lease, so one failed renewal never
/// loses it; a lease set alone derives its interval.
#[test]
fn renewal_interval_is_at_most_a_third_of_the_lease() {
    let fifteen = std::time::Duration::from_secs(15);
    assert_eq!(
        layer().lease(fifteen).policy().renew_every(),
        Some(std::time::Duration::from_secs(5))
    );
    let too_slow = std::panic::catch_unwind(|| {
        let _: axum::routing::MethodRouter = post(|| async {}).layer(
            layer()
                .renew_every(std::time::Duration::from_secs(10))
                .lease(fifteen),
        );
    });
    assert!(too_slow.is_err(), "an interval over lease / 3 is refused");
}

/// `max_stored_response` cannot exceed what a record's encoding can hold (u32 lengths).
#[test]
#[should_panic(expected = "max_stored_response")]
fn max_stored_response_beyond_the_record_encoding_panics() {
    let _: axum::routing::MethodRouter =
        post(|| async {}).layer(layer().max_stored_response(usize::MAX));
}

/// A short lease (150 ms, renewed every 50 ms) survives one failed renewal: the retry
/// comes within the interval, not after the 100 ms floor longer leases use, which would
/// land after the lease had lapsed. The handler (600 ms) runs once and its answer is
/// stored.
#[tokio::test(start_paused = true)]
async fn a_short_lease_survives_one_failed_renewal() {
    use common::app::{delayed, post as post_json, Harness};
    use common::faults::{Fault, Faults, Op};
    use std::time::Duration;
    let store = Faults::new(MemoryStore::default())
        .fail(Op::Renew, |n, _| (n == 0).then_some(Fault::Backend));
    let h = Harness::new(
        IdempotencyLayer::new(store.clone())
            .global_scope()
            .lease(Duration::from_millis(150)),
    );
    let req = || delayed(post_json("/pay", Some("k"), "{}"), 600);
    let first = send(&h.router, req()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(store.calls(Op::Renew) > 10, "{}", store.calls(Op::Renew));
    let retry = send(&h.router, req()).await;
    assert!(retry.replayed(), "the lease lapsed: {retry:?}");
    assert_eq!(h.runs(), 1);
}

/// A release the store fails is retried (with back-off, the lease renewed meanwhile)
/// before the response goes: the corrected retry sent right after a 400 runs, even on a
/// route that keeps lapsed leases, where a release left to the lease would have made the
/// key `operation-uncertain` for a request that changed nothing.
#[tokio::test(start_paused = true)]
async fn a_failed_release_is_retried_before_the_response() {
    use common::app::{post as post_json, with_header, Harness};
    use common::faults::{Fault, Faults, Op};
    let store = Faults::new(MemoryStore::default())
        .fail(Op::Release, |n, _| (n < 3).then_some(Fault::Backend));
    let h = Harness::new(
        IdempotencyLayer::new(store.clone())
            .global_scope()
            .uncertain(tower_idempotency::Uncertain::Refuse),
    );
    let req = || with_header(post_json("/pay", Some("k"), "{}"), "x-fail-first", "400");
    let refused = send(&h.router, req()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(store.calls(Op::Release), 4, "three failures, then released");
    let corrected = send(&h.router, req()).await;
    assert_eq!(
        corrected.status,
        StatusCode::CREATED,
        "released: the retry ran"
    );
    assert_eq!(h.runs(), 2);
}

/// A release that fails past the `complete_retry` bound gives up (the key then waits for
/// its lease) rather than holding the response for good.
#[tokio::test(start_paused = true)]
async fn a_release_that_keeps_failing_gives_up_at_the_bound() {
    use common::app::{post as post_json, with_header, Harness};
    use common::faults::{Fault, Faults, Op};
    use std::time::Duration;
    let store = Faults::new(MemoryStore::default()).fail(Op::Release, |_, _| Some(Fault::Backend));
    let h = Harness::new(
        IdempotencyLayer::new(store.clone())
            .global_scope()
            .complete_retry(Duration::from_secs(5)),
    );
    let req = || with_header(post_json("/pay", Some("k"), "{}"), "x-fail-first", "400");
    let start = tokio::time::Instant::now();
    let refused = send(&h.router, req()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let took = start.elapsed();
    assert!(
        took <= Duration::from_secs(5),
        "held past the bound: {took:?}"
    );
    assert!(store.calls(Op::Release) > 3, "{}", store.calls(Op::Release));
    let meanwhile = send(&h.router, req()).await;
    assert_problem(&meanwhile, StatusCode::CONFLICT, "request-in-flight");
    assert_eq!(h.runs(), 1);
}

/// Lease 15 s, a handler of 19 s, then 12 s of body collection, and one failed renewal:
/// with one renewal schedule across the whole ownership (due one interval after the last
/// success, a failure retried quickly), the lease never lapses and the handler runs once.
/// Paused clock: every instant is exact.
#[tokio::test(start_paused = true)]
async fn one_renewal_schedule_across_the_whole_ownership() {
    use common::app::{delayed, post as post_json, spawn_send, with_header, Harness};
    use common::faults::{Fault, Faults, Op};
    use std::time::Duration;
    let store = Faults::new(MemoryStore::default())
        .fail(Op::Renew, |n, _| (n == 1).then_some(Fault::Backend));
    let h = Harness::new(
        IdempotencyLayer::new(store.clone())
            .global_scope()
            .lease(Duration::from_secs(15)),
    );
    let req = || {
        with_header(
            delayed(post_json("/pay", Some("k"), "{}"), 19_000),
            "x-slow-body",
            "3,4000",
        )
    };
    let first = spawn_send(&h.router, req());
    h.started.notified().await;
    // The reserve and the handler's start happen at the same (paused) instant.
    let start = tokio::time::Instant::now();
    let mut probes = 0;
    while !first.is_finished() {
        tokio::time::sleep(Duration::from_millis(900)).await;
        if first.is_finished() {
            break;
        }
        let r = send(&h.router, req()).await;
        let at = start.elapsed();
        assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
        assert!(at < Duration::from_secs(60), "still running at {at:?}");
        probes += 1;
    }
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(probes >= 30, "probed all along the 31 s: {probes}");
    assert!(store.injected() == 1, "one renewal failed");
    // One schedule: due one interval (5 s) after the last success, whatever the phase
    // (handler until 19 s, body until 31 s); the failed one at 10 s retried after 100 ms.
    let at: Vec<Duration> = store.renewals().iter().map(|t| *t - start).collect();
    let ms = |ms: u64| Duration::from_millis(ms);
    assert_eq!(
        at,
        [
            ms(5_000),
            ms(10_000),
            ms(10_100),
            ms(15_100),
            ms(20_100),
            ms(25_100),
            ms(30_100)
        ],
        "renewals at"
    );
    assert!(send(&h.router, req()).await.replayed());
    assert_eq!(h.runs(), 1, "the lease never lapsed");
}

/// `new` is counted only when the record was stored: a completion fenced off by a newer
/// owner counts as a lost lease, not as a new stored request.
#[tokio::test]
async fn new_is_counted_only_when_the_record_was_stored() {
    use common::app::{delayed, post as post_json, spawn_send, Harness};
    use std::time::Duration;
    crate::support::metrics::install();
    let route = format!(
        "/counted-{}",
        tower_idempotency::store::FencingToken::generate()
    );
    let h = Harness::on(
        layer().lease(Duration::from_millis(200)).no_renewal(),
        &route,
    );
    let count = |outcome: &str| {
        crate::support::metrics::counter(
            "idempotency_requests_total",
            &[("route", &route), ("outcome", outcome)],
        )
    };
    let stale = spawn_send(&h.router, delayed(post_json(&route, Some("k"), "{}"), 600));
    h.started.notified().await;
    tokio::time::sleep(Duration::from_millis(350)).await; // the lease lapses
    let second = send(&h.router, post_json(&route, Some("k"), "{}")).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(
        count("new"),
        1,
        "the second owner stored its record: {:?}",
        crate::support::metrics::dump()
    );
    let stale = stale.await.unwrap();
    assert_eq!(
        stale.status,
        StatusCode::CREATED,
        "its caller still gets the answer"
    );
    assert_eq!(
        count("new"),
        1,
        "the fenced completion is not a stored `new`"
    );
    assert_eq!(h.runs(), 2);
}

/// A store whose record commits with the handler's writes answers `RolledBack` when that
/// commit fails: the operation did not happen, so the caller gets 503 (retry with the
/// same key), never the handler's 201, and the retry runs.
#[tokio::test]
async fn a_rolled_back_completion_is_503_not_the_handlers_answer() {
    use common::app::{post as post_json, Harness};
    use common::faults::Faults;
    use tower_idempotency::store::Completion;
    let store = Faults::new(MemoryStore::default()).answer_next_complete(Completion::RolledBack);
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let first = send(&h.router, post_json("/pay", Some("k"), "{}")).await;
    assert_problem(&first, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    let retry = send(&h.router, post_json("/pay", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "nothing was stored: the retry ran");
    assert_eq!(h.runs(), 2);
}

/// The largest values every setter accepts never overflow a clock or a counter: the
/// requests they govern are answered, never a panic.
#[tokio::test]
async fn huge_config_values_do_not_panic() {
    use std::time::Duration;
    let (runs, h) = counted();
    let huge = layer()
        .drain(usize::MAX, Duration::MAX)
        .retry_after(Duration::MAX)
        .complete_retry(Duration::MAX)
        .max_body(16)
        .in_flight(tower_idempotency::InFlight::Wait(Duration::MAX));
    let app = Router::new()
        .route("/pay", post(h.clone()).route_layer(huge))
        .route(
            "/big",
            post(h).route_layer(layer().max_body(usize::MAX).ttl(tower_idempotency::MAX_TTL)),
        );
    let mut over = req(Method::POST, "/pay", Some("k"));
    *over.body_mut() = Body::from(vec![b'x'; 64]);
    let r = send(&app, over).await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "request-body-too-large");
    let ok = send(&app, req(Method::POST, "/pay", Some("k2"))).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    let mut big = req(Method::POST, "/big", Some("k"));
    *big.body_mut() = Body::from(vec![b'x'; 4096]);
    assert_eq!(send(&app, big).await.status, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
