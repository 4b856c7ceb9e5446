//! Where tower-http's layers go relative to the idempotency layer (README, "Layer order"):
//! each placement the README names, inside and outside, with a real handler that counts
//! its runs.
//!
//! "Inside" is `post(handler).layer(other).layer(idempotency)` (the other layer wraps the
//! handler, ours wraps both); "outside" is `post(handler).layer(idempotency).layer(other)`.

use crate::common;
use crate::support::logs::Captured;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::routing::{post, MethodRouter};
use axum::Router;
use common::app::{assert_problem, send, spawn_send, Reply};
use tokio::sync::Notify;
use tower::layer::util::Stack;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tower_idempotency::store::StorePolicy;
use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore, X_REQUEST_ID};

/// A payment handler with side effects to count: `charged` when it has called the
/// payment provider, `booked` when it has also written its own record and answered.
/// Its first run can be held between the two (a slow ledger) or made to panic.
#[derive(Default)]
struct Payments {
    runs: AtomicUsize,
    charged: AtomicUsize,
    booked: AtomicUsize,
    hold_first: AtomicBool,
    panic_first: AtomicBool,
    /// Notified when a run starts.
    started: Notify,
    /// Lets a held first run go on.
    gate: Notify,
}

impl Payments {
    fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The first run charges, then waits for [`gate`](Self::gate) before booking.
    fn holding_first() -> Arc<Self> {
        let p = Self::new();
        p.hold_first.store(true, Ordering::SeqCst);
        p
    }

    fn panicking_first() -> Arc<Self> {
        let p = Self::new();
        p.panic_first.store(true, Ordering::SeqCst);
        p
    }

    /// (runs, charged, booked)
    fn counts(&self) -> (usize, usize, usize) {
        let get = |n: &AtomicUsize| n.load(Ordering::SeqCst);
        (get(&self.runs), get(&self.charged), get(&self.booked))
    }

    fn route(self: &Arc<Self>) -> MethodRouter {
        let p = self.clone();
        post(move || {
            let p = p.clone();
            async move { p.pay().await }
        })
    }

    async fn pay(&self) -> Response<Body> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        self.started.notify_one();
        if run == 1 && self.panic_first.load(Ordering::SeqCst) {
            panic!("payment handler panicked on purpose");
        }
        self.charged.fetch_add(1, Ordering::SeqCst);
        if run == 1 && self.hold_first.load(Ordering::SeqCst) {
            self.gate.notified().await;
        }
        self.booked.fetch_add(1, Ordering::SeqCst);
        // Over 32 bytes, so `CompressionLayer` compresses it.
        let body =
            format!(r#"{{"payment":{run},"status":"succeeded","amount":1000,"currency":"EUR"}}"#);
        Response::builder()
            .status(StatusCode::CREATED)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    }
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default()).global_scope()
}

fn pay(key: &str) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"amount":1000}"#))
        .unwrap()
}

fn with(mut req: Request<Body>, name: &'static str, value: &str) -> Request<Body> {
    req.headers_mut()
        .insert(name, HeaderValue::from_str(value).unwrap());
    req
}

fn routed(route: MethodRouter) -> Router {
    Router::new().route("/pay", route)
}

fn timeout() -> TimeoutLayer {
    TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(5))
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|v| v.to_str().unwrap())
}

fn payment(reply: &Reply) -> u64 {
    reply.json()["payment"].as_u64().expect("a payment body")
}

// ---- Timeout ----

/// Inside, the timeout cancels the handler half way (charged, not booked) and its 408
/// releases the key (a 4xx), so the retry runs the handler again: a second charge.
#[tokio::test(start_paused = true)]
async fn timeout_inside_cancels_the_handler_and_the_retry_runs_it_again() {
    let p = Payments::holding_first();
    let idem = layer();
    let app = routed(
        p.route()
            .layer::<_, Infallible>(timeout())
            .layer(idem.clone()),
    );

    let first = send(&app, pay("k")).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    assert!(first.body.is_empty() && !first.replayed());
    assert_eq!(
        p.counts(),
        (1, 1, 0),
        "cancelled between charge and booking"
    );
    assert!(idem.detached_work().is_empty(), "nothing left running");

    let retry = send(&app, pay("k")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "the key was released: the retry ran");
    assert_eq!(payment(&retry), 2);
    assert_eq!(p.counts(), (2, 2, 1), "charged twice");

    let again = send(&app, pay("k")).await;
    assert!(again.replayed() && again.body == retry.body);
    assert_eq!(p.counts().0, 2);
}

/// Outside, the client gets 408 while the work goes on detached; a retry meanwhile gets
/// 409, and once the work is done the stored answer of the one run.
#[tokio::test(start_paused = true)]
async fn timeout_outside_finishes_the_work_detached_and_the_retry_gets_its_answer() {
    let p = Payments::holding_first();
    let idem = layer();
    let app = routed(
        p.route()
            .layer::<_, Infallible>(idem.clone())
            .layer(timeout()),
    );

    let first = send(&app, pay("k")).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    assert!(first.body.is_empty() && !first.replayed());
    assert_eq!(idem.detached_work().len(), 1, "the rest runs detached");
    assert_eq!(p.counts(), (1, 1, 0));

    let meanwhile = send(&app, pay("k")).await;
    assert_problem(&meanwhile, StatusCode::CONFLICT, "request-in-flight");
    assert!(meanwhile.headers.contains_key(header::RETRY_AFTER));

    p.gate.notify_one();
    idem.detached_work()
        .wait(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(p.counts(), (1, 1, 1), "the first run finished, once");

    let retry = send(&app, pay("k")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(payment(&retry), 1, "the first run's answer");
    assert_eq!(p.counts(), (1, 1, 1));
}

/// Outside, with `InFlight::Wait`: a retry sent while the detached work runs waits for
/// it and gets its answer (within the retry's own timeout).
#[tokio::test(start_paused = true)]
async fn timeout_outside_with_wait_the_retry_waits_for_the_detached_work() {
    let p = Payments::holding_first();
    let idem = layer().in_flight(InFlight::Wait(Duration::from_secs(60)));
    let app = routed(
        p.route()
            .layer::<_, Infallible>(idem.clone())
            .layer(timeout()),
    );

    let first = send(&app, pay("k")).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    let retry = spawn_send(&app, pay("k"));
    tokio::time::sleep(Duration::from_secs(1)).await; // the retry is waiting
    assert!(!retry.is_finished());
    p.gate.notify_one();
    let retry = retry.await.unwrap();
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(payment(&retry), 1);
    assert_eq!(p.counts(), (1, 1, 1));
}

/// The timeout-outside case on Redis: the detached work stores the record in Redis.
/// Real clock (Redis I/O), with the handler held by a gate rather than by time.
#[cfg(feature = "redis")]
#[tokio::test]
async fn timeout_outside_on_redis_finishes_the_work_detached() {
    // No local replay tier: the replay below is read from Redis.
    let store = crate::support::store::test_store("timeout-outside")
        .await
        .local_replays(None);
    let p = Payments::holding_first();
    let idem = IdempotencyLayer::new(store.clone()).global_scope();
    let short = TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(1));
    let app = routed(p.route().layer::<_, Infallible>(idem.clone()).layer(short));

    let first = send(&app, pay("k")).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    // On a loaded machine the reserve may outlast the timeout: wait for the run to start.
    tokio::time::timeout(Duration::from_secs(30), async {
        while p.counts().0 == 0 {
            p.started.notified().await;
        }
    })
    .await
    .expect("the detached work started the handler");

    let meanwhile = send(&app, pay("k")).await;
    assert_problem(&meanwhile, StatusCode::CONFLICT, "request-in-flight");

    p.gate.notify_one();
    idem.detached_work()
        .wait(Duration::from_secs(30))
        .await
        .unwrap();
    let retry = send(&app, pay("k")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(payment(&retry), 1);
    assert_eq!(p.counts(), (1, 1, 1));
}

// ---- Compression ----

fn gzipped(reply: &Reply) -> bool {
    header(reply, "content-encoding") == Some("gzip") && reply.body.starts_with(&[0x1f, 0x8b])
}

/// Outside, the stored response is the uncompressed one, and each reply is compressed
/// (or not) for the `Accept-Encoding` of the request it answers.
#[tokio::test]
async fn compression_outside_stores_plain_and_compresses_each_reply() {
    let p = Payments::new();
    let app = routed(
        p.route()
            .layer::<_, Infallible>(layer())
            .layer(CompressionLayer::new()),
    );

    let first = send(&app, with(pay("k"), "accept-encoding", "gzip")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(gzipped(&first));

    let plain = send(&app, pay("k")).await;
    assert!(plain.replayed());
    assert_eq!(header(&plain, "content-encoding"), None);
    assert_eq!(payment(&plain), 1);

    let again = send(&app, with(pay("k"), "accept-encoding", "gzip")).await;
    assert!(again.replayed() && gzipped(&again));
    assert_eq!(p.counts().0, 1);
}

/// Inside, the gzip bytes are what is stored: a retry that does not accept gzip gets
/// them anyway.
#[tokio::test]
async fn compression_inside_replays_gzip_to_a_client_that_did_not_ask() {
    let p = Payments::new();
    let app = routed(
        p.route()
            .layer::<_, Infallible>(CompressionLayer::new())
            .layer(layer()),
    );

    let first = send(&app, with(pay("k"), "accept-encoding", "gzip")).await;
    assert!(gzipped(&first));
    let plain = send(&app, pay("k")).await;
    assert!(plain.replayed());
    assert!(gzipped(&plain), "gzip for a client without Accept-Encoding");
    assert_eq!(p.counts().0, 1);
}

// ---- Request bodies: RequestBodyLimit and DefaultBodyLimit ----

fn body_of(len: usize, chunked: bool) -> Body {
    let bytes = Bytes::from(vec![b' '; len]);
    if chunked {
        // No length known up front, as a chunked upload.
        let chunks = bytes
            .chunks(16)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>();
        Body::from_stream(futures_util::stream::iter(chunks))
    } else {
        Body::from(bytes)
    }
}

fn upload(key: &str, len: usize, chunked: bool) -> Request<Body> {
    let mut req = pay(key);
    if !chunked {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    *req.body_mut() = body_of(len, chunked);
    req
}

/// `RequestBodyLimitLayer` outside: a declared length over its limit gets its plain 413
/// before the key is looked at; a chunked body over it ends the layer's buffering with
/// 413 `request-body-too-large` (its length-limit error, recognised as such). Either
/// way the handler never runs and nothing is reserved.
#[tokio::test]
async fn request_body_limit_outside_answers_413_before_anything_runs() {
    let p = Payments::new();
    let app = routed(
        p.route()
            .layer::<_, Infallible>(layer())
            .layer(RequestBodyLimitLayer::new(64)),
    );
    let declared = send(&app, upload("k", 100, false)).await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_ne!(
        header(&declared, "content-type"),
        Some("application/problem+json"),
        "tower-http's own answer"
    );
    let chunked = send(&app, upload("k", 100, true)).await;
    assert_problem(
        &chunked,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request-body-too-large",
    );
    assert_eq!(p.counts().0, 0);
    // Nothing was reserved: the same key with a body under the limit runs.
    let ok = send(&app, upload("k", 32, true)).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert!(!ok.replayed());
}

/// A handler that reads the body with axum's `Bytes` extractor (so axum's
/// `DefaultBodyLimit` applies to it) and counts its runs.
fn echo_bytes(runs: &Arc<AtomicUsize>) -> MethodRouter {
    let r = runs.clone();
    post(move |body: Bytes| {
        r.fetch_add(1, Ordering::SeqCst);
        async move { (StatusCode::CREATED, body) }
    })
}

fn keyless(mut req: Request<Body>) -> Request<Body> {
    req.headers_mut().remove("idempotency-key");
    req
}

/// `.max_body(n)` caps keyed requests only: one byte over gets the layer's 413 problem
/// before anything is reserved; a keyless request passes through to axum's own limit
/// (2 MB by default).
#[tokio::test]
async fn max_body_caps_keyed_requests_and_keyless_ones_get_axums_limit() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = routed(echo_bytes(&runs).layer::<_, Infallible>(layer().max_body(64)));
    for chunked in [false, true] {
        let over = send(&app, upload("k", 65, chunked)).await;
        assert_problem(
            &over,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request-body-too-large",
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }
    let at = send(&app, upload("k", 64, false)).await;
    assert_eq!(at.status, StatusCode::CREATED);
    let keyless = send(&app, keyless(upload("", 100_000, false))).await;
    assert_eq!(keyless.status, StatusCode::CREATED);
    assert_eq!(keyless.body.len(), 100_000);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// axum's `DefaultBodyLimit::max(n)` outside the layer, below `.max_body(..)`: the layer
/// applies it to keyed requests itself (its 413 problem, nothing reserved), so a body the
/// handler's extractor would refuse is never reserved. Inside (between the layer and the
/// handler) the layer cannot see it: the extractor refuses the body with its plain 413,
/// which releases the key. Either way the same key with a smaller body runs.
#[tokio::test]
async fn default_body_limit_outside_caps_keyed_bodies_inside_the_extractor_does() {
    let runs = Arc::new(AtomicUsize::new(0));
    let limit = || DefaultBodyLimit::max(64);
    let outside = routed(
        echo_bytes(&runs)
            .layer::<_, Infallible>(layer())
            .layer(limit()),
    );
    let inside = routed(
        echo_bytes(&runs)
            .layer::<_, Infallible>(limit())
            .layer(layer()),
    );
    for (app, by_the_layer) in [(outside, true), (inside, false)] {
        runs.store(0, Ordering::SeqCst);
        let over = send(&app, upload("k", 65, false)).await;
        if by_the_layer {
            assert_problem(
                &over,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-body-too-large",
            );
        } else {
            assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
            assert_ne!(
                header(&over, "content-type"),
                Some("application/problem+json"),
                "axum's own answer"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        // Nothing stored: the same key with a smaller body runs instead of a 422.
        let ok = send(&app, upload("k", 64, false)).await;
        assert_eq!(ok.status, StatusCode::CREATED);
        assert!(!ok.replayed());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// `DefaultBodyLimit::disable()` (or a limit above `.max_body(..)`) outside does not lift
/// the layer's limit: it holds a keyed body in memory, so `.max_body(..)` still refuses
/// it (and logs a warning once, naming the setting to raise). Keyless requests get
/// axum's limit, here none.
#[tokio::test]
async fn default_body_limit_disabled_outside_keeps_max_body_for_keyed_requests() {
    let runs = Arc::new(AtomicUsize::new(0));
    for limit in [DefaultBodyLimit::disable(), DefaultBodyLimit::max(1 << 20)] {
        runs.store(0, Ordering::SeqCst);
        let app = routed(
            echo_bytes(&runs)
                .layer::<_, Infallible>(layer().max_body(64))
                .layer(limit),
        );
        let over = send(&app, upload("k", 65, false)).await;
        assert_problem(
            &over,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request-body-too-large",
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        let keyless = send(&app, keyless(upload("", 65, false))).await;
        assert_eq!(keyless.status, StatusCode::CREATED);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// When `.max_body(..)` refuses a keyed body that axum's `DefaultBodyLimit` (outside)
/// allows, the layer says so once per layer, naming the setting to raise; a smaller axum
/// limit, which the layer applies, logs nothing.
#[tokio::test]
async fn max_body_under_axums_limit_warns_once_per_layer() {
    let captured = Captured::default();
    let _installed = captured.install(tracing::Level::WARN);

    let runs = Arc::new(AtomicUsize::new(0));
    for (limit, warnings) in [
        (DefaultBodyLimit::disable(), 1),
        (DefaultBodyLimit::max(64), 0),
    ] {
        captured.clear();
        let app = routed(
            echo_bytes(&runs)
                .layer::<_, Infallible>(layer().max_body(64))
                .layer(limit),
        );
        for _ in 0..2 {
            let over = send(&app, upload("k", 65, false)).await;
            assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
        }
        let logs = captured.text();
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(lines.len(), warnings, "{logs}");
        for line in lines {
            assert!(line.contains("`.max_body(64)`"), "{line}");
            assert!(line.contains("DefaultBodyLimit"), "{line}");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

// ---- Request ids ----

/// `SetRequestIdLayer` (outer) then `PropagateRequestIdLayer`, as one layer.
fn request_ids() -> Stack<PropagateRequestIdLayer, SetRequestIdLayer<MakeRequestUuid>> {
    Stack::new(
        PropagateRequestIdLayer::x_request_id(),
        SetRequestIdLayer::x_request_id(MakeRequestUuid),
    )
}

/// Outside, the id is added after the layer, so it is not stored: every reply carries
/// the id of its own request (the one in the client's header, or a fresh one).
#[tokio::test]
async fn request_ids_outside_each_reply_carries_its_own() {
    let p = Payments::new();
    let app = routed(
        p.route()
            .layer::<_, Infallible>(layer())
            .layer(request_ids()),
    );

    let first = send(&app, pay("k")).await;
    let retry = send(&app, pay("k")).await;
    assert!(retry.replayed());
    let (a, b) = (
        header(&first, "x-request-id"),
        header(&retry, "x-request-id"),
    );
    assert!(a.is_some() && b.is_some() && a != b, "{a:?} / {b:?}");
    let named = send(&app, with(pay("k"), "x-request-id", "retry-3")).await;
    assert!(named.replayed());
    assert_eq!(header(&named, "x-request-id"), Some("retry-3"));
    assert_eq!(p.counts().0, 1);
}

/// Inside, the id reaches the response before the layer sees it; by default the layer
/// does not store `x-request-id` (it names the HTTP request, not the operation), so a
/// replay carries no id of its own making. `.allow_replay_headers([X_REQUEST_ID])` stores
/// it, and every replay then carries the first request's id.
#[tokio::test]
async fn request_ids_inside_are_not_replayed_unless_allowed() {
    for (idem, replayed_id) in [
        (layer(), None),
        (layer().allow_replay_headers([X_REQUEST_ID]), Some("first")),
    ] {
        let p = Payments::new();
        let app = routed(p.route().layer::<_, Infallible>(request_ids()).layer(idem));
        let first = send(&app, with(pay("k"), "x-request-id", "first")).await;
        assert_eq!(header(&first, "x-request-id"), Some("first"));
        let retry = send(&app, with(pay("k"), "x-request-id", "retry")).await;
        assert!(retry.replayed());
        assert_eq!(header(&retry, "x-request-id"), replayed_id);
        assert_eq!(p.counts().0, 1);
    }
}

/// Request ids around the layer, inside and outside (a stack that sets the id outside
/// and also propagates it inside, next to the handler): by default the replay carries
/// the retry's own id, never the original one; with `.allow_replay_headers(..)` it
/// carries the original one (`PropagateRequestId` keeps a response's own id).
#[tokio::test]
async fn request_ids_around_the_layer_a_replay_carries_the_retrys_id() {
    for (idem, replayed_id) in [
        (layer(), "retry"),
        (layer().allow_replay_headers([X_REQUEST_ID]), "first"),
    ] {
        let p = Payments::new();
        let app = routed(
            p.route()
                .layer::<_, Infallible>(PropagateRequestIdLayer::x_request_id())
                .layer::<_, Infallible>(idem)
                .layer(request_ids()),
        );
        let first = send(&app, with(pay("k"), "x-request-id", "first")).await;
        assert_eq!(header(&first, "x-request-id"), Some("first"));
        let retry = send(&app, with(pay("k"), "x-request-id", "retry")).await;
        assert!(retry.replayed());
        assert_eq!(header(&retry, "x-request-id"), Some(replayed_id));
        // A retry without an id gets a fresh one from `SetRequestId`, not the first's.
        let fresh = send(&app, pay("k")).await;
        assert!(fresh.replayed());
        let id = header(&fresh, "x-request-id").expect("an id");
        assert_eq!(id == "first", replayed_id == "first", "{id}");
        assert_eq!(p.counts().0, 1);
    }
}

/// A handler that sets `x-request-id` itself is not replayed by default: with
/// `PropagateRequestId` outside, a replay carries the retry's id. Other per-request
/// headers can be denied the same way, and the default can be lifted.
#[tokio::test]
async fn a_request_id_the_handler_sets_is_not_replayed_unless_allowed() {
    let echo = post(|headers: axum::http::HeaderMap| async move {
        let id = headers["x-request-id"].clone();
        let ids = [("x-request-id", id.clone()), ("x-correlation-id", id)];
        (StatusCode::CREATED, ids, "paid")
    });
    let correlation = axum::http::HeaderName::from_static("x-correlation-id");
    for (idem, replayed_id, correlation_id) in [
        (layer(), "retry", Some("first")),
        (
            layer().deny_replay_headers([correlation.clone()]),
            "retry",
            None,
        ),
        (
            layer().allow_replay_headers([X_REQUEST_ID]),
            "first",
            Some("first"),
        ),
    ] {
        let app = routed(
            echo.clone()
                .layer::<_, Infallible>(idem)
                .layer(request_ids()),
        );
        send(&app, with(pay("k"), "x-request-id", "first")).await;
        let retry = send(&app, with(pay("k"), "x-request-id", "retry")).await;
        assert!(retry.replayed());
        assert_eq!(header(&retry, "x-request-id"), Some(replayed_id));
        assert_eq!(header(&retry, "x-correlation-id"), correlation_id);
    }
}

// ---- Server-sent events ----

/// A `text/event-stream` response is passed through as it comes, never buffered: the
/// client reads the first event while the handler still holds the stream open. The
/// operation counts as done (a not-replayable marker is stored before the first byte),
/// so a retry gets 409 `response-not-replayable`, never a second run.
#[tokio::test]
async fn event_streams_pass_through_unbuffered_and_retries_get_409() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let (r, g) = (runs.clone(), gate.clone());
    let events = post(move || {
        r.fetch_add(1, Ordering::SeqCst);
        let gate = g.clone();
        async move {
            let first = futures_util::stream::once(async {
                Ok::<_, Infallible>(Bytes::from_static(b"data: one\n\n"))
            });
            let last = futures_util::stream::once(async move {
                gate.notified().await;
                Ok(Bytes::from_static(b"data: two\n\n"))
            });
            let body = Body::from_stream(futures_util::StreamExt::chain(first, last));
            ([(header::CONTENT_TYPE, "text/event-stream")], body)
        }
    });
    let app = routed(events.layer::<_, Infallible>(layer()));

    let response = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(pay("k")))
        .await
        .expect("the head before the stream ends")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event before the handler ends its stream")
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "data: one\n\n");

    let retry = send(&app, pay("k")).await;
    assert_problem(&retry, StatusCode::CONFLICT, "response-not-replayable");
    gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: two\n\n");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `.stream_when(|_| false)` buffers event streams like any response: a short one is
/// stored and replayed.
#[tokio::test]
async fn stream_when_false_stores_and_replays_a_short_event_stream() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let events = post(move || {
        r.fetch_add(1, Ordering::SeqCst);
        async {
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                "data: one\n\n",
            )
        }
    });
    let app = routed(events.layer::<_, Infallible>(layer().stream_when(|_| false)));
    let first = send(&app, pay("k")).await;
    assert_eq!(first.body, "data: one\n\n");
    let retry = send(&app, pay("k")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "data: one\n\n");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// ---- Multipart ----

fn multipart(key: &str, boundary: &str) -> Request<Body> {
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"amount\"\r\n\r\n1000\r\n--{boundary}--\r\n"
    );
    let content_type = format!("multipart/form-data; boundary={boundary}");
    Request::post("/pay")
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap()
}

/// The fingerprint covers the body byte for byte (README, "Policy", "Multipart
/// uploads"): a retry that resends the same multipart bytes is replayed; one rebuilt with
/// a new boundary, same fields, is another payload (422), with or without `Content-Type`
/// among the fingerprinted headers.
#[tokio::test]
async fn a_multipart_retry_with_a_new_boundary_is_another_payload() {
    for idem in [layer(), layer().fingerprint_headers([])] {
        let p = Payments::new();
        let app = routed(p.route().layer::<_, Infallible>(idem));
        let first = send(&app, multipart("k", "b1")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let same = send(&app, multipart("k", "b1")).await;
        assert!(same.replayed());
        let rebuilt = send(&app, multipart("k", "b2")).await;
        assert_problem(
            &rebuilt,
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
        );
        assert_eq!(p.counts().0, 1);
    }
}

/// The multipart body without its boundary, or `None` for any other body.
fn without_boundary(head: &axum::http::request::Parts, body: &[u8]) -> Option<Vec<u8>> {
    let content_type = head.headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let boundary = content_type.strip_prefix("multipart/form-data; boundary=")?;
    let body = std::str::from_utf8(body).ok()?;
    Some(body.replace(&format!("--{boundary}"), "--").into_bytes())
}

/// `.fingerprint_body_with(..)` fingerprints a normalised payload: a form rebuilt with a
/// new boundary, same fields, is replayed; other fields still get 422, and bodies the
/// hook leaves alone (`None`) keep the usual fingerprint.
#[tokio::test]
async fn fingerprint_body_with_replays_a_multipart_retry_with_a_new_boundary() {
    let p = Payments::new();
    let idem = layer().fingerprint_body_with(without_boundary);
    let app = routed(p.route().layer::<_, Infallible>(idem));
    let first = send(&app, multipart("k", "b1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let rebuilt = send(&app, multipart("k", "b2")).await;
    assert!(rebuilt.replayed());
    assert_eq!(payment(&rebuilt), payment(&first));
    let mut other = multipart("k", "b3");
    *other.body_mut() = Body::from(
        "--b3\r\ncontent-disposition: form-data; name=\"amount\"\r\n\r\n9999\r\n--b3--\r\n",
    );
    let other = send(&app, other).await;
    assert_problem(
        &other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    // A JSON body: the usual fingerprint, which a normalised one never equals.
    let json = send(&app, pay("k")).await;
    assert_problem(
        &json,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert!(send(&app, pay("j")).await.status == StatusCode::CREATED);
    assert!(send(&app, pay("j")).await.replayed());
    assert_eq!(p.counts().0, 2);
}

// ---- CatchPanic ----

/// Outside, CatchPanic never sees a covered request's panic: the layer answers its 500
/// problem and releases the key, whatever the store policy (here one that stores 5xx),
/// so the retry runs. It still catches panics on requests the layer passes through.
#[tokio::test]
async fn catch_panic_outside_sees_only_what_the_layer_passes_through() {
    let p = Payments::panicking_first();
    let idem = layer().store_when(StorePolicy::SuccessesAndServerErrors);
    let app = routed(
        p.route()
            .layer::<_, Infallible>(idem)
            .layer(CatchPanicLayer::new()),
    );

    let first = send(&app, pay("k")).await;
    assert_problem(&first, StatusCode::INTERNAL_SERVER_ERROR, "handler-failed");
    let retry = send(&app, pay("k")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "a panic released the key");
    assert_eq!(p.counts().0, 2);

    let p = Payments::panicking_first();
    let app = routed(
        p.route()
            .layer::<_, Infallible>(layer())
            .layer(CatchPanicLayer::new()),
    );
    let mut no_key = pay("unused");
    no_key.headers_mut().remove("idempotency-key");
    let passed = send(&app, no_key).await;
    assert_eq!(passed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(&passed.body[..], b"Service panicked", "CatchPanic's answer");
}

/// Inside, a panic reaches the layer as an ordinary 500: under a policy that stores 5xx
/// it is stored and replayed to every retry, and the handler never runs again.
#[tokio::test]
async fn catch_panic_inside_turns_a_panic_into_a_storable_500() {
    let p = Payments::panicking_first();
    let idem = layer().store_when(StorePolicy::SuccessesAndServerErrors);
    let app = routed(
        p.route()
            .layer::<_, Infallible>(CatchPanicLayer::new())
            .layer(idem),
    );

    let first = send(&app, pay("k")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(&first.body[..], b"Service panicked");
    let retry = send(&app, pay("k")).await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(retry.replayed(), "the panic's 500 was stored");
    assert_eq!(p.counts().0, 1);
}

// ---- CORS ----

fn cors() -> CorsLayer {
    CorsLayer::new().allow_origin(AllowOrigin::mirror_request())
}

fn from(origin: &str, req: Request<Body>) -> Request<Body> {
    with(req, "origin", origin)
}

/// Outside, every reply gets the CORS headers for its own request's origin, the layer's
/// own problems included (a browser cannot read a 409 or 422 without them).
#[tokio::test]
async fn cors_outside_answers_each_origin_and_covers_the_layers_problems() {
    let p = Payments::new();
    let app = routed(p.route().layer::<_, Infallible>(layer()).layer(cors()));

    let first = send(&app, from("https://a.example", pay("k"))).await;
    assert_eq!(
        header(&first, "access-control-allow-origin"),
        Some("https://a.example")
    );
    let retry = send(&app, from("https://b.example", pay("k"))).await;
    assert!(retry.replayed());
    assert_eq!(
        header(&retry, "access-control-allow-origin"),
        Some("https://b.example")
    );
    let mut reused = from("https://b.example", pay("k"));
    *reused.body_mut() = Body::from(r#"{"amount":2000}"#);
    let reused = send(&app, reused).await;
    assert_problem(
        &reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert_eq!(
        header(&reused, "access-control-allow-origin"),
        Some("https://b.example")
    );
}

/// Inside, the first origin's CORS headers are stored and replayed to another origin,
/// and the layer's own problems carry none.
#[tokio::test]
async fn cors_inside_replays_the_first_origin_and_leaves_problems_bare() {
    let p = Payments::new();
    let app = routed(p.route().layer::<_, Infallible>(cors()).layer(layer()));

    send(&app, from("https://a.example", pay("k"))).await;
    let retry = send(&app, from("https://b.example", pay("k"))).await;
    assert!(retry.replayed());
    assert_eq!(
        header(&retry, "access-control-allow-origin"),
        Some("https://a.example")
    );
    let mut reused = from("https://b.example", pay("k"));
    *reused.body_mut() = Body::from(r#"{"amount":2000}"#);
    let reused = send(&app, reused).await;
    assert_problem(
        &reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert_eq!(header(&reused, "access-control-allow-origin"), None);
}

// ---- Trace ----

type Seen = Arc<Mutex<Vec<(StatusCode, bool)>>>;

type HttpTrace<OnResponse> = TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    tower_http::trace::DefaultMakeSpan,
    tower_http::trace::DefaultOnRequest,
    OnResponse,
>;

/// A `TraceLayer` that records the status of every response it sees, and whether it was
/// a replay.
fn trace(seen: &Seen) -> HttpTrace<impl Fn(&Response<Body>, Duration, &tracing::Span) + Clone> {
    let seen = seen.clone();
    TraceLayer::new_for_http().on_response(
        move |res: &Response<Body>, _: Duration, _: &tracing::Span| {
            let replayed = res.headers().contains_key("idempotent-replayed");
            seen.lock().unwrap().push((res.status(), replayed));
        },
    )
}

/// Outside, the trace sees every answer: the run, the replay and the layer's own
/// problems. Inside, it sees only the handler's runs.
#[tokio::test]
async fn trace_outside_sees_replays_and_problems_inside_only_runs() {
    let mismatch = || {
        let mut req = pay("k");
        *req.body_mut() = Body::from(r#"{"amount":2000}"#);
        req
    };
    let outside = Seen::default();
    let app = routed(
        Payments::new()
            .route()
            .layer::<_, Infallible>(layer())
            .layer(trace(&outside)),
    );
    for req in [pay("k"), pay("k"), mismatch()] {
        send(&app, req).await;
    }
    assert_eq!(
        *outside.lock().unwrap(),
        [
            (StatusCode::CREATED, false),
            (StatusCode::CREATED, true),
            (StatusCode::UNPROCESSABLE_ENTITY, false)
        ]
    );

    let inside = Seen::default();
    let app = routed(
        Payments::new()
            .route()
            .layer::<_, Infallible>(trace(&inside))
            .layer(layer()),
    );
    for req in [pay("k"), pay("k"), mismatch()] {
        send(&app, req).await;
    }
    assert_eq!(*inside.lock().unwrap(), [(StatusCode::CREATED, false)]);
}

// ---- The README's stack ----

/// The stack the README's "Layer order" shows, as written there: every tower-http layer
/// outside the route's idempotency layer. A retry gets the stored answer, compressed for
/// its own `Accept-Encoding`, with its own request id and its own origin's CORS headers.
#[tokio::test]
async fn the_readme_stack_replays_with_each_requests_own_headers() {
    use tower::ServiceBuilder;
    let p = Payments::new();
    let idempotency = layer();
    let app = Router::new()
        .route("/pay", p.route().route_layer(idempotency))
        .layer(
            ServiceBuilder::new() // the first layer is the outermost
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http())
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(CatchPanicLayer::new())
                .layer(cors())
                .layer(CompressionLayer::new())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_secs(10),
                )),
        );
    let request = |origin: &str, id: &str, gzip: bool| {
        let mut req = with(from(origin, pay("k")), "x-request-id", id);
        if gzip {
            req = with(req, "accept-encoding", "gzip");
        }
        req
    };
    let first = send(&app, request("https://a.example", "one", false)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, request("https://b.example", "two", true)).await;
    assert!(retry.replayed() && gzipped(&retry));
    assert_eq!(header(&retry, "x-request-id"), Some("two"));
    assert_eq!(
        header(&retry, "access-control-allow-origin"),
        Some("https://b.example")
    );
    assert_eq!(p.counts().0, 1);
}
