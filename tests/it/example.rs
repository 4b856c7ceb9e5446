//! Tests of `examples/payments.rs`, in-process: the example's `app` on a `MemoryStore`,
//! driven with `tower::ServiceExt::oneshot` and over a real TCP socket (`axum::serve` on
//! 127.0.0.1:0 and a minimal HTTP/1.1 client on `tokio::net::TcpStream`).

use crate::payments;

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;
use tower_idempotency::MemoryStore;

use payments::{app, Config};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn new_app() -> Router {
    app(MemoryStore::default(), &Config::default())
}

/// A request to send either way.
#[derive(Clone, Debug)]
struct Req {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn post(path: &str) -> Req {
    Req {
        method: Method::POST,
        path: path.to_owned(),
        headers: Vec::new(),
        body: Vec::new(),
    }
}

fn get(path: &str) -> Req {
    Req {
        method: Method::GET,
        ..post(path)
    }
}

impl Req {
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn token(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    fn key(self, key: &str) -> Self {
        self.header("idempotency-key", key)
    }

    fn json(self, body: Value) -> Self {
        self.raw("application/json", body.to_string().as_bytes())
    }

    fn raw(mut self, content_type: &str, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self.header("content-type", content_type)
    }
}

/// A response, whichever way it came.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The last path segment of a problem+json `type`.
    fn problem(&self) -> String {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "not a problem: {self:?}"
        );
        let json = self.json();
        assert_eq!(json["status"], self.status.as_u16(), "{json}");
        let uri = json["type"].as_str().expect("problem type").to_owned();
        uri.rsplit(['/', '#']).next().unwrap_or_default().to_owned()
    }

    fn replayed(&self) -> bool {
        match self.headers.get("idempotent-replayed") {
            None => false,
            Some(v) if v == "true" => true,
            Some(v) => panic!("Idempotent-Replayed: {v:?}"),
        }
    }

    fn id(&self) -> String {
        self.json()["id"].as_str().expect("id").to_owned()
    }

    #[track_caller]
    fn expect(self, status: StatusCode) -> Self {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }
}

/// Sends through the router in-process.
async fn oneshot(app: &Router, req: Req) -> Reply {
    let mut builder = Request::builder().method(req.method).uri(&req.path);
    for (name, value) in &req.headers {
        builder = builder.header(name, value);
    }
    let request = builder.body(Body::from(req.body)).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.to_vec(),
    }
}

/// Serves `app` on 127.0.0.1 on a free port, for the life of the test runtime.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A minimal HTTP/1.1 client: one request per connection, reads the head and a
/// `Content-Length` body (every response of this API has one, replays included).
async fn over_tcp(addr: SocketAddr, req: Req) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        req.method,
        req.path,
        req.body.len()
    );
    for (name, value) in &req.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&req.body).await.unwrap();

    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).expect("UTF-8 response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let code = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("header line");
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            HeaderValue::from_str(value.trim()).unwrap(),
        );
    }
    let length: usize = headers
        .get("content-length")
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), length, "more body than Content-Length");
    Reply {
        status: StatusCode::from_bytes(code.as_bytes()).unwrap(),
        headers,
        body,
    }
}

fn payment(amount: u64) -> Value {
    json!({ "amount": amount, "currency": "EUR" })
}

async fn payments_of(app: &Router, tenant: &str) -> Vec<Value> {
    let reply = oneshot(app, get("/payments").token(tenant))
        .await
        .expect(StatusCode::OK);
    reply.json().as_array().expect("array").clone()
}

// ---------------------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn no_or_malformed_token_is_401() {
    let app = new_app();
    let cases = [
        post("/payments").key("k").json(payment(100)),
        get("/payments"),
        post("/payments").header("authorization", "Basic YWxpY2U6cHc="),
        post("/payments").header("authorization", "Bearer"),
        post("/payments").header("authorization", "Bearer "),
        post("/payments").header("authorization", "Bearer a b"),
        post("/webhooks/stripe"),
        get("/nowhere"),
    ];
    for req in cases {
        let reply = oneshot(&app, req.clone()).await;
        let reply = reply.expect(StatusCode::UNAUTHORIZED);
        assert_eq!(reply.problem(), "unauthorized", "{req:?}");
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
    }
    // Nothing ran for anyone.
    assert!(payments_of(&app, "alice").await.is_empty());
    // The scheme is case-insensitive.
    let reply = oneshot(
        &app,
        get("/payments").header("authorization", "bearer alice"),
    )
    .await;
    reply.expect(StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Payments
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn retried_payment_is_replayed_over_tcp() {
    let app = new_app();
    let addr = serve(app.clone()).await;
    let pay_with = |key: &str| {
        post("/payments")
            .token("alice")
            .key(key)
            .json(payment(1000))
    };
    let pay = || pay_with("pay-1");

    let first = over_tcp(addr, pay()).await.expect(StatusCode::CREATED);
    assert!(!first.replayed(), "the first response is not a replay");
    let json = first.json();
    assert!(json["id"].as_str().unwrap().starts_with("pay_"), "{json}");
    assert_eq!(json["amount"], 1000);
    assert_eq!(json["currency"], "EUR");
    assert!(
        json["created_at"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );

    let retry = over_tcp(addr, pay()).await.expect(StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body, "byte-identical replay");
    assert_eq!(retry.headers["content-type"], "application/json");

    // `"pay-1"` (an RFC 8941 sf-string) is the same key.
    let quoted = over_tcp(addr, pay_with("\"pay-1\"")).await;
    assert_eq!(quoted.expect(StatusCode::CREATED).id(), first.id());

    let list = payments_of(&app, "alice").await;
    assert_eq!(list.len(), 1, "one execution: {list:?}");
    assert_eq!(list[0]["id"], json["id"]);
}

/// `EXECUTION_LOG`: one line per execution, none for a replay; the key as it was sent.
#[tokio::test]
async fn each_execution_appends_one_line_to_the_execution_log() {
    let path = std::env::temp_dir().join(format!(
        "tidem-execution-log-{}-{:?}.log",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    let log = payments::ExecutionLog::open(&path).unwrap();
    let state = payments::AppState::default().execution_log(log);
    let detached = tower_idempotency::DetachedWork::new();
    let app =
        payments::tracked_app_on(MemoryStore::default(), state, &Config::default(), &detached);
    let pay = |key: &str| post("/payments").token("alice").key(key).json(payment(10));
    let first = oneshot(&app, pay("log-1"))
        .await
        .expect(StatusCode::CREATED);
    oneshot(&app, pay("log-1"))
        .await
        .expect(StatusCode::CREATED);
    let second = oneshot(&app, pay("\"log-2\""))
        .await
        .expect(StatusCode::CREATED);
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "one line per execution: {text:?}");
    let pid = std::process::id().to_string();
    for (line, (key, id)) in lines
        .iter()
        .zip([("log-1", first.id()), ("\"log-2\"", second.id())])
    {
        assert_eq!(
            line[..4],
            ["alice", key, id.as_str(), pid.as_str()],
            "{text:?}"
        );
        let started: u128 = line[4].parse().unwrap();
        let finished: u128 = line[5].parse().unwrap();
        assert!(started <= finished, "{text:?}");
    }
}

#[tokio::test]
async fn same_key_other_amount_is_422() {
    let app = new_app();
    let pay = |amount| {
        post("/payments")
            .token("alice")
            .key("pay-2")
            .json(payment(amount))
    };
    let first = oneshot(&app, pay(1000)).await.expect(StatusCode::CREATED);

    let reused = oneshot(&app, pay(2000)).await;
    let reused = reused.expect(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.problem(), "idempotency-key-reused");
    assert!(!reused.replayed());

    // The original payload still replays.
    let retry = oneshot(&app, pay(1000)).await.expect(StatusCode::CREATED);
    assert_eq!(retry.id(), first.id());
    assert_eq!(payments_of(&app, "alice").await.len(), 1);
}

#[tokio::test]
async fn bad_json_is_400_and_a_corrected_retry_runs() {
    let app = new_app();
    let pay = || post("/payments").token("alice").key("pay-3");
    let bad = [
        pay().raw("application/json", b"{\"amount\": 10, "),
        pay().json(json!({ "amount": "ten", "currency": "EUR" })),
        pay().json(json!({ "amount": 10 })),
        pay().json(json!({ "amount": 10, "currency": "EUR", "extra": 1 })),
        pay().json(json!({ "amount": 0, "currency": "EUR" })),
        pay().raw("text/plain", br#"{"amount": 10, "currency": "EUR"}"#),
        pay(),
    ];
    for req in bad {
        let reply = oneshot(&app, req.clone()).await;
        let reply = reply.expect(StatusCode::BAD_REQUEST);
        assert_eq!(reply.problem(), "invalid-request", "{req:?}");
    }
    assert!(payments_of(&app, "alice").await.is_empty());

    // Each 400 released the key: the corrected request runs, and is then replayed.
    let fixed = oneshot(&app, pay().json(payment(10))).await;
    let fixed = fixed.expect(StatusCode::CREATED);
    assert!(!fixed.replayed());
    let retry = oneshot(&app, pay().json(payment(10))).await;
    assert!(retry.expect(StatusCode::CREATED).replayed());
    assert_eq!(payments_of(&app, "alice").await.len(), 1);
}

#[tokio::test]
async fn missing_or_invalid_key_is_400() {
    let app = new_app();
    let reply = oneshot(&app, post("/payments").token("alice").json(payment(5))).await;
    let reply = reply.expect(StatusCode::BAD_REQUEST);
    assert_eq!(reply.problem(), "idempotency-key-missing");

    let bad_key = post("/payments")
        .token("alice")
        .key("has space")
        .json(payment(5));
    let reply = oneshot(&app, bad_key).await.expect(StatusCode::BAD_REQUEST);
    assert_eq!(reply.problem(), "idempotency-key-invalid");

    assert!(payments_of(&app, "alice").await.is_empty());
}

#[tokio::test]
async fn two_tenants_with_one_key_get_two_payments() {
    let app = new_app();
    let pay = |tenant| {
        post("/payments")
            .token(tenant)
            .key("shared-key")
            .json(payment(700))
    };
    let alice = oneshot(&app, pay("alice"))
        .await
        .expect(StatusCode::CREATED);
    let bob = oneshot(&app, pay("bob")).await.expect(StatusCode::CREATED);
    assert!(!alice.replayed() && !bob.replayed());
    assert_ne!(alice.id(), bob.id());
    assert_eq!(payments_of(&app, "alice").await.len(), 1);
    assert_eq!(payments_of(&app, "bob").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_wait_and_run_once() {
    let app = new_app();
    let addr = serve(app.clone()).await;
    sixteen_concurrent_payments(addr, "pay-concurrent").await;
    let list = payments_of(&app, "alice").await;
    assert_eq!(list.len(), 1, "exactly one execution: {list:?}");
}

/// 16 concurrent `POST /payments` with one key over TCP (the handler takes 200 ms): all
/// get 201 with one payment id, and exactly one answer is the original.
async fn sixteen_concurrent_payments(addr: SocketAddr, key: &str) {
    let body = json!({ "amount": 1200, "currency": "EUR", "delay_ms": 200 });
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let req = post("/payments").token("alice").key(key).json(body.clone());
            tokio::spawn(over_tcp(addr, req))
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap().expect(StatusCode::CREATED));
    }
    let id = replies[0].id();
    assert!(replies.iter().all(|r| r.id() == id), "one payment id");
    let fresh = replies.iter().filter(|r| !r.replayed()).count();
    assert_eq!(fresh, 1, "exactly one response is the original");
}

#[tokio::test]
async fn patch_on_a_post_route_is_405_not_a_key_error() {
    let app = new_app();
    let reply = oneshot(
        &app,
        Req {
            method: Method::PATCH,
            ..post("/payments").token("alice")
        },
    )
    .await;
    reply.expect(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_short_payments_ttl_expires() {
    let config = Config {
        payments_ttl: Duration::from_secs(1),
        ..Config::default()
    };
    let app = app(MemoryStore::default(), &config);
    let pay = || {
        post("/payments")
            .token("alice")
            .key("pay-ttl")
            .json(payment(1))
    };
    let first = oneshot(&app, pay()).await.expect(StatusCode::CREATED);
    let retry = oneshot(&app, pay()).await.expect(StatusCode::CREATED);
    assert!(retry.replayed());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = oneshot(&app, pay()).await.expect(StatusCode::CREATED);
    assert!(!after.replayed(), "the record expired");
    assert_ne!(after.id(), first.id());
    assert_eq!(payments_of(&app, "alice").await.len(), 2);
}

// ---------------------------------------------------------------------------------------
// Orders
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_in_flight_is_409_with_retry_after() {
    let app = new_app();
    let addr = serve(app.clone()).await;
    let order = || {
        post("/orders")
            .token("alice")
            .key("order-1")
            .json(json!({ "item": "book", "delay_ms": 1500 }))
    };
    // Whichever of the two reserves the key first runs; the other finds it in flight.
    let first = tokio::spawn(over_tcp(addr, order()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = tokio::spawn(over_tcp(addr, order()));
    let mut replies = vec![first.await.unwrap(), second.await.unwrap()];
    replies.sort_by_key(|r| r.status);
    let [created, conflict] = <[Reply; 2]>::try_from(replies).unwrap();

    let created = created.expect(StatusCode::CREATED);
    assert!(!created.replayed());
    assert_eq!(created.json()["item"], "book");
    assert!(created.id().starts_with("ord_"));
    let conflict = conflict.expect(StatusCode::CONFLICT);
    assert_eq!(conflict.problem(), "request-in-flight");
    let retry_after: u64 = conflict.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);

    // Once done, the retry is a replay; one order exists.
    let retry = over_tcp(addr, order()).await.expect(StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.id(), created.id());
    let orders = oneshot(&app, get("/orders").token("alice")).await;
    let orders = orders.expect(StatusCode::OK).json();
    assert_eq!(orders["orders"].as_array().unwrap().len(), 1, "{orders}");
}

#[tokio::test]
async fn one_key_on_two_resources_runs_twice() {
    let app = new_app();
    let cancel = |id: &str| {
        post(&format!("/orders/{id}/cancel"))
            .token("alice")
            .key("cancel-key")
    };
    let one = oneshot(&app, cancel("1")).await.expect(StatusCode::OK);
    let two = oneshot(&app, cancel("2")).await.expect(StatusCode::OK);
    assert!(!one.replayed() && !two.replayed());
    assert_eq!(one.json(), json!({ "order_id": "1", "cancelled": true }));
    assert_eq!(two.json(), json!({ "order_id": "2", "cancelled": true }));

    let again = oneshot(&app, cancel("1")).await.expect(StatusCode::OK);
    assert!(again.replayed());

    let missing = oneshot(&app, post("/orders/3/cancel").token("alice")).await;
    let missing = missing.expect(StatusCode::BAD_REQUEST);
    assert_eq!(missing.problem(), "idempotency-key-missing");

    let orders = oneshot(&app, get("/orders").token("alice")).await;
    let orders = orders.expect(StatusCode::OK).json();
    assert_eq!(orders["cancelled"], json!(["1", "2"]), "two executions");
}

// ---------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn webhooks_without_a_key_pass_through() {
    let app = new_app();
    let hook = |source: &str| {
        post(&format!("/webhooks/{source}"))
            .token("alice")
            .json(json!({ "event": "charge.succeeded" }))
    };
    for _ in 0..3 {
        let reply = oneshot(&app, hook("stripe")).await;
        let reply = reply.expect(StatusCode::ACCEPTED);
        assert!(!reply.replayed());
        assert_eq!(
            reply.json(),
            json!({ "received": true, "source": "stripe" })
        );
    }
    // With a key, a redelivery is replayed, not counted.
    for _ in 0..2 {
        let reply = oneshot(&app, hook("github").key("delivery-42")).await;
        reply.expect(StatusCode::ACCEPTED);
    }
    let counts = oneshot(&app, get("/webhooks").token("alice")).await;
    let counts = counts.expect(StatusCode::OK).json();
    assert_eq!(
        counts,
        json!({ "total": 4, "by_source": { "github": 1, "stripe": 3 } })
    );
    // Per tenant.
    let bob = oneshot(&app, get("/webhooks").token("bob")).await;
    assert_eq!(bob.expect(StatusCode::OK).json()["total"], 0);
}

// ---------------------------------------------------------------------------------------
// Configuration and helpers of the example
// ---------------------------------------------------------------------------------------

fn config_from(vars: &[(&str, &str)]) -> Result<Config, String> {
    let vars: HashMap<String, OsString> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    Config::from_vars(|name| vars.get(name).cloned())
}

#[test]
fn config_from_env_rejects_bad_values() {
    assert_eq!(config_from(&[]).unwrap(), Config::default());
    assert_eq!(
        Config::default().bind,
        "127.0.0.1:3000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        Config::default().payments_ttl,
        Duration::from_secs(24 * 3600)
    );

    let ok = config_from(&[("BIND", "0.0.0.0:8080"), ("PAYMENTS_TTL_SECS", "60")]).unwrap();
    assert_eq!(ok.bind, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(ok.payments_ttl, Duration::from_secs(60));

    for bind in ["", "localhost", "127.0.0.1", "127.0.0.1:99999"] {
        let err = config_from(&[("BIND", bind)]).unwrap_err();
        assert!(err.starts_with("BIND="), "{err}");
    }
    for ttl in ["", "0", "-5", "1.5", "ten", "99999999999999999999"] {
        let err = config_from(&[("PAYMENTS_TTL_SECS", ttl)]).unwrap_err();
        assert!(err.contains("PAYMENTS_TTL_SECS"), "{err}");
    }

    assert_eq!(Config::default().payments_lease, None);
    let lease = config_from(&[("PAYMENTS_LEASE_MS", "2500")]).unwrap();
    assert_eq!(lease.payments_lease, Some(Duration::from_millis(2500)));
    for lease in ["", "0", "-1", "1.5", "2s", "99999999999999999999999"] {
        let err = config_from(&[("PAYMENTS_LEASE_MS", lease)]).unwrap_err();
        assert!(err.contains("PAYMENTS_LEASE_MS"), "{err}");
    }
    let longer = config_from(&[("PAYMENTS_TTL_SECS", "2"), ("PAYMENTS_LEASE_MS", "2001")]);
    assert!(longer.unwrap_err().contains("longer than the payments TTL"));
    let log = config_from(&[("EXECUTION_LOG", "/tmp/runs.log")]).unwrap();
    assert_eq!(
        log.execution_log.as_deref(),
        Some(std::path::Path::new("/tmp/runs.log"))
    );
    assert!(config_from(&[("EXECUTION_LOG", " ")]).is_err());

    let redis = config_from(&[("REDIS_URL", "redis://127.0.0.1:6379")]);
    assert_eq!(
        redis.unwrap().redis_url.as_deref(),
        Some("redis://127.0.0.1:6379")
    );
    assert!(config_from(&[("REDIS_URL", "")]).is_err());

    let pg = config_from(&[("DATABASE_URL", "postgres://postgres@127.0.0.1/test")]).unwrap();
    assert_eq!(
        pg.database_url.as_deref(),
        Some("postgres://postgres@127.0.0.1/test")
    );
    assert!(config_from(&[("DATABASE_URL", " ")]).is_err());
    let both = config_from(&[("REDIS_URL", "redis://x"), ("DATABASE_URL", "postgres://x")]);
    assert!(both.unwrap_err().contains("choose one store"));
}

#[test]
fn created_at_is_rfc3339() {
    let at = |secs: u64, millis: u64| {
        let since = Duration::from_secs(secs) + Duration::from_millis(millis);
        payments::rfc3339(std::time::UNIX_EPOCH + since)
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000Z");
    assert_eq!(at(1_700_000_000, 500), "2023-11-14T22:13:20.500Z");
    assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
}

// ---------------------------------------------------------------------------------------
// Shutdown (issue 8 item 3)
// ---------------------------------------------------------------------------------------

/// A client hangs up mid-request, then the process is told to stop: axum's graceful
/// shutdown sees no connection and returns at once, but the handler's work must still
/// finish and its record be stored before the process exits — else the lease is orphaned
/// and the client's retry on the next process gets 409, then runs the payment again.
///
/// The "process" is a runtime of its own: dropping it, as `main` returning does, cancels
/// whatever is still running on it. The store outlives it, as Redis would.
#[test]
fn shutdown_waits_for_the_work_of_a_hung_up_request() {
    let store = MemoryStore::default();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let pay = || {
        post("/payments")
            .token("alice")
            .key("shutdown-1")
            .json(json!({ "amount": 700, "currency": "EUR", "delay_ms": 600 }))
    };

    let first = runtime();
    first.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(payments::serve_until(
            listener,
            store.clone(),
            Config::default(),
            async {
                let _ = stopped.await;
            },
        ));
        // Send the request, then hang up while the handler runs.
        let req = pay();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /payments HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n{}\r\n",
            req.body.len(),
            req.headers
                .iter()
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect::<String>()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&req.body).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        drop(stream);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // SIGTERM: graceful shutdown, then the bounded wait for detached work.
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    });
    drop(first); // the process exits

    let second = runtime();
    second.block_on(async {
        let app = app(store.clone(), &Config::default());
        let retry = oneshot(&app, pay()).await;
        assert_eq!(
            retry.status,
            StatusCode::CREATED,
            "the retry on the next process replays: {:?}",
            String::from_utf8_lossy(&retry.body)
        );
        assert!(retry.replayed(), "stored before the first process exited");
    });
}

// ---------------------------------------------------------------------------------------
// Postgres mode (DATABASE_URL): a transactional store, payments and orders as rows
// ---------------------------------------------------------------------------------------

/// The example in Postgres mode, each test on a schema of its own (through the URL's
/// `search_path`), as `DATABASE_URL` would configure it.
#[cfg(feature = "postgres")]
mod postgres_mode {
    use super::*;
    use crate::support::postgres::{database_url, TestSchema};
    use std::sync::Arc;
    use tower_idempotency_postgres::sqlx::{self, AssertSqlSafe};

    fn url(schema: &TestSchema) -> String {
        format!(
            "{}?options=-c%20search_path%3D{}",
            database_url(),
            schema.name
        )
    }

    async fn pg_app(schema: &TestSchema) -> Router {
        let (store, state) = payments::postgres_store(&url(schema)).await.unwrap();
        let detached = tower_idempotency::DetachedWork::new();
        payments::tracked_app_on(store, state, &Config::default(), &detached)
    }

    /// Rows of the example's `table` in `schema`, counted on a connection of its own.
    async fn rows(schema: &TestSchema, table: &str) -> i64 {
        let pool = crate::support::postgres::pool(1).await;
        let sql = format!("SELECT count(*) FROM {}", schema.table(table));
        let n = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    }

    fn pay(key: &str, amount: u64) -> Req {
        post("/payments")
            .token("alice")
            .key(key)
            .json(payment(amount))
    }

    /// Same HTTP contract as on memory; the payments are rows, written in the idempotency
    /// transaction, read back by `GET /payments`, and still there after a restart (a new
    /// app on a new pool), where retries still replay.
    #[tokio::test]
    async fn payments_and_orders_are_rows_that_survive_a_restart() {
        let schema = TestSchema::create().await;
        let app = pg_app(&schema).await;
        let first = oneshot(&app, pay("pg-1", 1000))
            .await
            .expect(StatusCode::CREATED);
        assert!(!first.replayed());
        let retry = oneshot(&app, pay("pg-1", 1000))
            .await
            .expect(StatusCode::CREATED);
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body);
        let reused = oneshot(&app, pay("pg-1", 2000)).await;
        assert_eq!(
            reused.expect(StatusCode::UNPROCESSABLE_ENTITY).problem(),
            "idempotency-key-reused"
        );
        // A 400 writes nothing and releases the key.
        let bad = post("/payments")
            .token("alice")
            .key("pg-2")
            .json(json!({ "amount": 0, "currency": "EUR" }));
        oneshot(&app, bad).await.expect(StatusCode::BAD_REQUEST);
        oneshot(&app, pay("pg-2", 5))
            .await
            .expect(StatusCode::CREATED);
        let order = post("/orders")
            .token("alice")
            .key("o-1")
            .json(json!({ "item": "book" }));
        let order = oneshot(&app, order).await.expect(StatusCode::CREATED);
        oneshot(&app, post("/orders/1/cancel").token("alice").key("c-1"))
            .await
            .expect(StatusCode::OK);
        let list = payments_of(&app, "alice").await;
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!(list[0]["id"].as_str(), Some(first.id().as_str()));
        assert_eq!(rows(&schema, "example_payments").await, 2);
        assert!(payments_of(&app, "bob").await.is_empty());
        let pool = crate::support::postgres::pool(1).await;
        let sql = format!(
            "SELECT idempotency_key FROM {} ORDER BY seq",
            schema.table("example_payments")
        );
        let keys: Vec<Option<String>> = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        assert_eq!(
            keys,
            [Some("pg-1".to_owned()), Some("pg-2".to_owned())],
            "each row keeps its key"
        );

        // Restart: a new process would connect anew and find the same rows and records.
        let restarted = pg_app(&schema).await;
        let list = payments_of(&restarted, "alice").await;
        assert_eq!(list.len(), 2, "the payments survived the restart");
        assert_eq!(list[0]["amount"], 1000);
        assert_eq!(list[0]["created_at"], first.json()["created_at"]);
        let retry = oneshot(&restarted, pay("pg-1", 1000))
            .await
            .expect(StatusCode::CREATED);
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body, "byte-identical after the restart");
        let orders = oneshot(&restarted, get("/orders").token("alice")).await;
        let orders = orders.expect(StatusCode::OK).json();
        assert_eq!(
            orders["orders"][0]["id"].as_str(),
            Some(order.id().as_str())
        );
        assert_eq!(orders["cancelled"], json!(["1"]));
        assert_eq!(rows(&schema, "example_payments").await, 2);
    }

    /// A payment whose handler runs longer than the lease (33 s against 30 s), with a
    /// retry while it runs: 201 once, one payment row, and the retry gets the same
    /// payment (it waits, as `/payments` does, then replays).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payment_longer_than_the_lease_commits_once() {
        let schema = TestSchema::create().await;
        let app = pg_app(&schema).await;
        let slow = || {
            post("/payments")
                .token("alice")
                .key("pg-slow")
                .json(json!({ "amount": 900, "currency": "EUR", "delay_ms": 33000 }))
        };
        let first = tokio::spawn({
            let app = app.clone();
            async move { oneshot(&app, slow()).await }
        });
        // Past the 30 s lease, while the first still runs: the retry must neither run the
        // payment again nor give up. It waits (up to 10 s, so until 41 s) for the first,
        // which ends at 33 s, then replays it; 8 s of slack for a loaded machine.
        tokio::time::sleep(Duration::from_secs(31)).await;
        let retry = oneshot(&app, slow()).await.expect(StatusCode::CREATED);
        let first = first.await.unwrap().expect(StatusCode::CREATED);
        assert!(!first.replayed());
        assert!(retry.replayed());
        assert_eq!(retry.id(), first.id());
        assert_eq!(rows(&schema, "example_payments").await, 1);
    }

    /// A `example_payments` table from before `idempotency_key` gets the column at start-up
    /// (its rows kept), and new rows carry their key.
    #[tokio::test]
    async fn an_older_payments_table_gets_the_key_column() {
        let schema = TestSchema::create().await;
        let pool = crate::support::postgres::pool(1).await;
        let old = format!(
            "CREATE TABLE {} (seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE, \
             tenant text NOT NULL, amount bigint NOT NULL, currency text NOT NULL, \
             created_at text NOT NULL); INSERT INTO {0} (id, tenant, amount, currency, \
             created_at) VALUES ('pay_old', 'alice', 1, 'EUR', 'then')",
            schema.table("example_payments")
        );
        sqlx::raw_sql(AssertSqlSafe(old))
            .execute(&pool)
            .await
            .unwrap();
        let app = pg_app(&schema).await;
        oneshot(&app, pay("pg-new", 5))
            .await
            .expect(StatusCode::CREATED);
        let sql = format!(
            "SELECT id, idempotency_key FROM {} ORDER BY seq",
            schema.table("example_payments")
        );
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0], ("pay_old".to_owned(), None));
        assert_eq!(rows[1].1.as_deref(), Some("pg-new"));
    }

    /// 16 concurrent retries over TCP: one payment row, one original answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_retries_write_one_row() {
        let schema = TestSchema::create().await;
        let app = pg_app(&schema).await;
        let addr = serve(app.clone()).await;
        sixteen_concurrent_payments(addr, "pg-concurrent").await;
        assert_eq!(rows(&schema, "example_payments").await, 1);
    }

    /// The process dies mid-request, as with SIGKILL: no graceful shutdown, no detached
    /// work, its connections just close. Here the "process" is a runtime of its own that
    /// is dropped (in-process, like `shutdown_waits_for_the_work_of_a_hung_up_request`;
    /// a real child process would need the example binary built first, which
    /// `cargo test --test it` does not do). Postgres aborts the open transaction: no row,
    /// no record; the client's retry on the restarted process runs exactly once.
    #[test]
    fn killed_process_mid_request_then_the_retry_runs_once() {
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        };
        let setup = runtime();
        let schema: Arc<TestSchema> = setup.block_on(TestSchema::create());
        drop(setup);
        let body = json!({ "amount": 700, "currency": "EUR", "delay_ms": 900 });
        let pay = || {
            post("/payments")
                .token("alice")
                .key("pg-killed")
                .json(body.clone())
        };

        let first = runtime();
        first.block_on(async {
            let (store, state) = payments::postgres_store(&url(&schema)).await.unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(payments::serve_until_on(
                listener,
                store,
                state,
                Config::default(),
                std::future::pending(),
            ));
            let mut request = tokio::spawn(over_tcp(addr, pay()));
            // The handler is asleep in its 0.9 s delay, its transaction open.
            let early = tokio::time::timeout(Duration::from_millis(400), &mut request).await;
            assert!(early.is_err(), "the request was still running");
        });
        drop(first); // killed: every task and connection of the process goes at once

        let second = runtime();
        second.block_on(async {
            assert_eq!(
                rows(&schema, "example_payments").await,
                0,
                "nothing committed"
            );
            let app = pg_app(&schema).await;
            let retry = oneshot(&app, pay()).await.expect(StatusCode::CREATED);
            assert!(
                !retry.replayed(),
                "no record was left by the killed process"
            );
            let again = oneshot(&app, pay()).await.expect(StatusCode::CREATED);
            assert!(again.replayed());
            assert_eq!(again.id(), retry.id());
            assert_eq!(
                rows(&schema, "example_payments").await,
                1,
                "ran exactly once"
            );
        });
        drop(second);
        drop(schema);
    }
}
