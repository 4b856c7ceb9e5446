//! The admin router (`tower_idempotency::admin`, SPEC section 11) and honest uncertainty,
//! through the example app (`ADMIN_TOKEN`, `/payments` refusing uncertain keys) on the
//! memory, Redis and Postgres stores (plain, and the example's transactional mode), plus
//! a small app for what the example cannot show: a store without the operator methods
//! (501), a store that fails (503), a router without an operator (403), the audit log.

use crate::common::app::{assert_problem, send, spawn_send, Reply};
use crate::payments::{self, AdminToken, Config};
use crate::support::logs::Captured;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::{Extension, Router};
use serde_json::{json, Value};
use tower_idempotency::store::{FencingToken, Fingerprint, LeaseTerms, Reservation, ScopeHash};
use tower_idempotency::{MemoryStore, Store, Uncertain};
use tower_idempotency_core::admin::{AdminRouter, AUDIT_TARGET, PROBLEM_TYPE_BASE};

const TOKEN: &str = "s3cret-Admin_token";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn config() -> Config {
    Config {
        admin_token: Some(AdminToken::new(TOKEN).unwrap()),
        ..Config::default()
    }
}

/// A name unique to this call: stores shared between tests (Redis) never see a leftover.
fn fresh(name: &str) -> String {
    format!("{name}-{}", FencingToken::generate().to_hex())
}

/// Percent-encodes every byte but the unreserved ones, as `curl --data-urlencode` does.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(params: &[(&str, &str)]) -> String {
    params
        .iter()
        .map(|(name, value)| format!("{name}={}", encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// An admin request on `/admin/idempotency/key`, with the admin token.
fn admin(method: Method, params: &[(&str, &str)], answer: Option<Value>) -> Request<Body> {
    admin_as(Some(TOKEN), method, params, answer)
}

fn admin_as(
    token: Option<&str>,
    method: Method,
    params: &[(&str, &str)],
    answer: Option<Value>,
) -> Request<Body> {
    let uri = format!("/admin/idempotency/key?{}", query(params));
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match answer {
        Some(answer) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Body::from(answer.to_string())
        }
        None => Body::empty(),
    };
    builder.body(body).unwrap()
}

/// `POST /payments` as tenant `tenant` with `key` and the JSON `body`.
fn pay(tenant: &str, key: &str, body: &str) -> Request<Body> {
    Request::post("/payments")
        .header(header::AUTHORIZATION, format!("Bearer {tenant}"))
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// The tenant's payments: one per execution of the handler.
async fn payments_of(app: &Router, tenant: &str) -> usize {
    let request = Request::get("/payments")
        .header(header::AUTHORIZATION, format!("Bearer {tenant}"))
        .body(Body::empty())
        .unwrap();
    let reply = send(app, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json().as_array().expect("a list").len()
}

/// Asserts an admin problem with the `type` of `slug`.
#[track_caller]
fn assert_admin_problem(reply: &Reply, status: StatusCode, slug: &str) {
    assert_eq!(
        reply.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let json = reply.json();
    assert_eq!(json["type"], format!("{PROBLEM_TYPE_BASE}{slug}"), "{json}");
    assert_eq!(json["status"], status.as_u16());
    assert!(
        json["title"].is_string() && json["detail"].is_string(),
        "{json}"
    );
}

/// A 200 JSON answer.
#[track_caller]
fn ok_json(reply: &Reply) -> Value {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "body: {}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    reply.json()
}

/// The owner of a payment whose process died mid-request: reserved straight in the
/// store for the scope and fingerprint the layer computes for `pay(tenant, key, body)`,
/// with a short lease kept once lapsed (as a refusing route reserves), and gone without a
/// complete or a release. Returns its token once the lease has lapsed.
async fn dead_payment<St: Store>(store: &St, tenant: &str, key: &str, body: &str) -> FencingToken {
    let probe = pay(tenant, key, body);
    let scope =
        ScopeHash::for_key(Some(tenant.as_bytes()), &Method::POST, "/payments", key).unwrap();
    let fingerprint = Fingerprint::new(
        probe.method(),
        "/payments",
        None,
        probe.headers(),
        &[header::CONTENT_TYPE],
        body.as_bytes(),
    );
    let token = FencingToken::generate();
    let terms = LeaseTerms::new(Duration::from_millis(200)).keep_lapsed(Duration::from_secs(60));
    let reserved = store.reserve(&scope, &fingerprint, token, terms).await;
    assert_eq!(reserved.unwrap(), Reservation::Reserved);
    tokio::time::sleep(Duration::from_millis(400)).await;
    token
}

// ---------------------------------------------------------------------------------------
// The walk-through, on every store
// ---------------------------------------------------------------------------------------

/// The README's walk-through on `app` (the example with `ADMIN_TOKEN`, on `store`): a key
/// absent, in flight (PUT refused 409), completed (status, header names, size, expiry),
/// corrected to not-replayable, forgotten (the retry runs again); a PUT of an absent key
/// is 404. With `uncertainty` (a store with leases), a payment whose owner died: the
/// retry gets 409 `operation-uncertain` and never pays, `GET` says uncertain with the dead
/// owner's token, and after the operator's PUT the retry replays the operator's answer.
async fn walk_through<St: Store>(app: Router, store: St, uncertainty: bool) {
    let tenant = fresh("tenant");
    let key = fresh("key");
    let who = [
        ("tenant", tenant.as_str()),
        ("path", "/payments"),
        ("key", key.as_str()),
    ];
    let scope = ScopeHash::for_key(Some(tenant.as_bytes()), &Method::POST, "/payments", &key)
        .unwrap()
        .to_hex();

    let absent = ok_json(&send(&app, admin(Method::GET, &who, None)).await);
    assert_eq!(absent, json!({ "scope": scope, "state": "absent" }));
    let answer = json!({ "status": 201, "body": "{}" });
    let r = send(&app, admin(Method::PUT, &who, Some(answer.clone()))).await;
    assert_admin_problem(&r, StatusCode::NOT_FOUND, "key-absent");

    // In flight: a slow payment holds the key.
    let body = r#"{"amount": 1000, "currency": "EUR", "delay_ms": 1500}"#;
    let first = spawn_send(&app, pay(&tenant, &key, body));
    let in_flight = loop {
        let state = ok_json(&send(&app, admin(Method::GET, &who, None)).await);
        if state["state"] == "in_flight" {
            break state;
        }
        assert_eq!(state["state"], "absent", "{state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(in_flight["scope"], scope);
    // A store that sees the owner's row names it and its lease (transactional Postgres
    // cannot: null).
    if let Some(owner) = in_flight["owner"].as_str() {
        assert_eq!(owner.len(), 32, "{in_flight}");
    }
    if let Some(ms) = in_flight["lease_remaining_ms"].as_u64() {
        assert!(ms <= 30_000, "{in_flight}");
    }
    let r = send(&app, admin(Method::PUT, &who, Some(answer.clone()))).await;
    assert_admin_problem(&r, StatusCode::CONFLICT, "key-in-flight");
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);

    let completed = ok_json(&send(&app, admin(Method::GET, &who, None)).await);
    assert_eq!(completed["state"], "completed", "{completed}");
    assert_eq!(completed["status"], 201);
    assert_eq!(completed["headers"], json!(["content-type"]), "names only");
    assert_eq!(completed["body_bytes"], first.body.len());
    let expires = completed["expires_in_ms"].as_u64().unwrap();
    assert!(
        expires > 23 * 3600 * 1000 && expires <= 24 * 3600 * 1000,
        "{completed}"
    );
    if let Some(age) = completed["age_ms"].as_u64() {
        assert!(age < 60_000, "{completed}");
    }

    // An operator corrects the answer: retries get 409 response-not-replayable.
    let correction = json!({ "not_replayable": true, "ttl_secs": 600 });
    let resolved = ok_json(&send(&app, admin(Method::PUT, &who, Some(correction))).await);
    assert_eq!(resolved, json!({ "scope": scope, "resolved": true }));
    let r = send(&app, pay(&tenant, &key, body)).await;
    assert_problem(&r, StatusCode::CONFLICT, "response-not-replayable");
    let state = ok_json(&send(&app, admin(Method::GET, &who, None)).await);
    assert_eq!(state["state"], "not_replayable", "{state}");
    assert!(
        state["expires_in_ms"].as_u64().unwrap() <= 600_000,
        "{state}"
    );

    // Forget it: the next request runs again.
    let forgotten = ok_json(&send(&app, admin(Method::DELETE, &who, None)).await);
    assert_eq!(forgotten, json!({ "scope": scope, "forgotten": true }));
    let state = ok_json(&send(&app, admin(Method::GET, &who, None)).await);
    assert_eq!(state["state"], "absent");
    let again = ok_json(&send(&app, admin(Method::DELETE, &who, None)).await);
    assert_eq!(again["forgotten"], false);
    let rerun = send(&app, pay(&tenant, &key, body)).await;
    assert_eq!(rerun.status, StatusCode::CREATED);
    assert!(!rerun.replayed());
    assert_ne!(rerun.json()["id"], first.json()["id"]);
    assert_eq!(payments_of(&app, &tenant).await, 2);

    if !uncertainty {
        return;
    }
    let key = fresh("dead");
    let who = [
        ("tenant", tenant.as_str()),
        ("path", "/payments"),
        ("key", key.as_str()),
    ];
    let body = r#"{"amount": 500, "currency": "EUR"}"#;
    let owner = dead_payment(&store, &tenant, &key, body).await;
    for _ in 0..2 {
        let r = send(&app, pay(&tenant, &key, body)).await;
        assert_problem(&r, StatusCode::CONFLICT, "operation-uncertain");
    }
    let uncertain = ok_json(&send(&app, admin(Method::GET, &who, None)).await);
    assert_eq!(uncertain["state"], "uncertain", "{uncertain}");
    assert_eq!(uncertain["owner"], owner.to_hex());
    assert!(
        uncertain["expires_in_ms"].as_u64().unwrap() > 0,
        "{uncertain}"
    );
    if let Some(lapsed) = uncertain["lapsed_for_ms"].as_u64() {
        assert!(lapsed < 60_000, "{uncertain}");
    }
    // The operator found the payment at the provider, and records it.
    let paid = r#"{"id":"pay_found_by_ops","amount":500,"currency":"EUR"}"#;
    let answer = json!({
        "status": 201,
        "headers": [["content-type", "application/json"]],
        "body": paid,
    });
    let resolved = ok_json(&send(&app, admin(Method::PUT, &who, Some(answer))).await);
    assert_eq!(resolved["resolved"], true);
    let retry = send(&app, pay(&tenant, &key, body)).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, paid.as_bytes());
    assert_eq!(retry.headers[header::CONTENT_TYPE], "application/json");
    // Another payload with the key is still a reused key: the fingerprint was kept.
    let other = send(
        &app,
        pay(&tenant, &key, r#"{"amount": 1, "currency": "EUR"}"#),
    )
    .await;
    assert_problem(
        &other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert_eq!(
        payments_of(&app, &tenant).await,
        2,
        "the dead payment never ran again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_through_on_memory() {
    let store = MemoryStore::default();
    walk_through(payments::app(store.clone(), &config()), store, true).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_through_on_redis() {
    let store = crate::support::store::test_store("admin").await;
    walk_through(payments::app(store.clone(), &config()), store, true).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_through_on_postgres() {
    let store = crate::support::postgres::store().await;
    walk_through(payments::app(store.clone(), &config()), store, true).await;
}

/// The example in Postgres mode (`DATABASE_URL`: transactional, payments as rows). No key
/// is ever uncertain there (a dead owner's transaction rolls back), and an owner in flight
/// is not visible: `owner` and `lease_remaining_ms` are null.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_through_on_the_examples_postgres_mode() {
    use crate::support::postgres::{database_url, TestSchema};

    let schema = TestSchema::create().await;
    let url = format!(
        "{}?options=-c%20search_path%3D{}",
        database_url(),
        schema.name
    );
    let (store, state) = payments::postgres_store(&url).await.unwrap();
    let detached = tower_idempotency::DetachedWork::new();
    let app = payments::tracked_app_on(store.clone(), state, &config(), &detached);
    walk_through(app, store, false).await;
}

// ---------------------------------------------------------------------------------------
// The example's mount, config and uncertainty policy
// ---------------------------------------------------------------------------------------

/// Without `ADMIN_TOKEN` nothing is mounted (a tenant's request gets 404); with it, the
/// routes answer only the admin token: none, a wrong one, a tenant's or a longer one is
/// 401 with `WWW-Authenticate: Bearer`.
#[tokio::test]
async fn the_example_mounts_the_routes_only_with_admin_token_and_behind_it() {
    let params = [("path", "/payments"), ("key", "k-1"), ("tenant", "alice")];
    let without = payments::app(MemoryStore::default(), &Config::default());
    let r = send(&without, admin(Method::GET, &params, None)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");

    let app = payments::app(MemoryStore::default(), &config());
    let longer = format!("{TOKEN}x");
    let shorter = &TOKEN[..TOKEN.len() - 1];
    for token in [None, Some("alice"), Some(longer.as_str()), Some(shorter)] {
        for method in [Method::GET, Method::DELETE, Method::PUT] {
            let answer = (method == Method::PUT).then(|| json!({ "status": 201 }));
            let r = send(&app, admin_as(token, method.clone(), &params, answer)).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token:?} {method}");
            assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
        }
    }
    let r = send(&app, admin(Method::GET, &params, None)).await;
    assert_eq!(ok_json(&r)["state"], "absent");
    // The tenant routes keep their own auth: the admin token is just another tenant there.
    let r = send(
        &app,
        pay("alice", "k-1", r#"{"amount": 1, "currency": "EUR"}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

fn config_from(vars: &[(&str, &str)]) -> Result<Config, String> {
    let vars: std::collections::HashMap<String, std::ffi::OsString> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    Config::from_vars(|name| vars.get(name).cloned())
}

/// `ADMIN_TOKEN` absent: not mounted; set: a bearer token, else a configuration error (the
/// example exits 2). `PAYMENTS_UNCERTAIN`: `refuse` (the default) or `run-again`. A
/// `Config` printed for a log never shows the token.
#[test]
fn admin_token_and_payments_uncertain_from_the_environment() {
    let config = config_from(&[]).unwrap();
    assert_eq!(config.admin_token, None);
    assert_eq!(config.payments_uncertain, Uncertain::Refuse);
    let config = config_from(&[("ADMIN_TOKEN", TOKEN), ("PAYMENTS_UNCERTAIN", "run-again")]);
    let config = config.unwrap();
    assert_eq!(config.admin_token, Some(AdminToken::new(TOKEN).unwrap()));
    assert_eq!(config.payments_uncertain, Uncertain::RunAgain);
    assert!(!format!("{config:?}").contains(TOKEN), "{config:?}");
    for (name, value, says) in [
        ("ADMIN_TOKEN", "", "ADMIN_TOKEN is set but empty"),
        ("ADMIN_TOKEN", "  ", "ADMIN_TOKEN is set but empty"),
        ("ADMIN_TOKEN", "two words", "not a bearer token"),
        ("ADMIN_TOKEN", "=", "not a bearer token"),
        (
            "PAYMENTS_UNCERTAIN",
            "Refuse",
            "PAYMENTS_UNCERTAIN=\"Refuse\"",
        ),
        ("PAYMENTS_UNCERTAIN", "", "PAYMENTS_UNCERTAIN"),
    ] {
        let err = config_from(&[(name, value)]).expect_err(value);
        assert!(err.contains(says), "{name}={value:?}: {err}");
    }
}

/// `PAYMENTS_UNCERTAIN=run-again`: a payment whose owner died runs again on the retry
/// (the layer's default), where the example's default refuses it (`walk_through`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_run_again_when_configured() {
    let store = MemoryStore::default();
    let config = Config {
        payments_uncertain: Uncertain::RunAgain,
        ..config()
    };
    let app = payments::app(store.clone(), &config);
    let (tenant, key) = (fresh("tenant"), fresh("key"));
    let body = r#"{"amount": 500, "currency": "EUR"}"#;
    dead_payment(&store, &tenant, &key, body).await;
    let r = send(&app, pay(&tenant, &key, body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert!(!r.replayed());
    assert_eq!(payments_of(&app, &tenant).await, 1);
}

// ---------------------------------------------------------------------------------------
// Naming keys, bad requests
// ---------------------------------------------------------------------------------------

/// `tenant_hex` (byte tenants), `scope=` (the hash of the DEBUG logs), `method` and a
/// quoted key name the same record as the layer's; a bad parameter or answer is a 400
/// (415 without JSON, 413 over the limit), and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_named_as_the_layer_scopes_them_and_bad_requests_are_400() {
    let store = MemoryStore::default();
    let app = payments::app(store.clone(), &config());
    let (tenant, key) = (fresh("tenant"), fresh("key"));
    let first = send(
        &app,
        pay(&tenant, &key, r#"{"amount": 7, "currency": "EUR"}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let scope = ScopeHash::for_key(Some(tenant.as_bytes()), &Method::POST, "/payments", &key)
        .unwrap()
        .to_hex();
    let tenant_hex: String = tenant.bytes().map(|b| format!("{b:02x}")).collect();
    let quoted = format!("\"{key}\"");
    for params in [
        vec![
            ("tenant", tenant.as_str()),
            ("path", "/payments"),
            ("key", key.as_str()),
        ],
        vec![
            ("method", "post"),
            ("tenant_hex", tenant_hex.as_str()),
            ("path", "/payments?ignored=1"),
            ("key", quoted.as_str()),
        ],
        vec![("scope", scope.as_str())],
    ] {
        let state = ok_json(&send(&app, admin(Method::GET, &params, None)).await);
        assert_eq!(state["state"], "completed", "{params:?}: {state}");
        assert_eq!(state["scope"], scope);
    }
    // Another method, path or tenant, or no tenant, is another key.
    for params in [
        vec![
            ("method", "PATCH"),
            ("tenant", tenant.as_str()),
            ("path", "/payments"),
            ("key", key.as_str()),
        ],
        vec![
            ("tenant", tenant.as_str()),
            ("path", "/payments/"),
            ("key", key.as_str()),
        ],
        vec![
            ("tenant", "bob"),
            ("path", "/payments"),
            ("key", key.as_str()),
        ],
        vec![("path", "/payments"), ("key", key.as_str())],
    ] {
        let state = ok_json(&send(&app, admin(Method::GET, &params, None)).await);
        assert_eq!(state["state"], "absent", "{params:?}");
    }

    let who = [
        ("tenant", tenant.as_str()),
        ("path", "/payments"),
        ("key", key.as_str()),
    ];
    for (params, says) in [
        (
            vec![("tennant", "x"), ("path", "/payments"), ("key", "k")],
            "tennant",
        ),
        (vec![("path", "/payments")], "name the key"),
        (
            vec![("path", "/payments"), ("key", "a b")],
            "not a valid idempotency key",
        ),
        (
            vec![("method", "GET"), ("path", "/payments"), ("key", "k")],
            "POST, PUT",
        ),
        (vec![("scope", "00")], "64 hex digits"),
        (vec![("scope", scope.as_str()), ("key", "k")], "drop `key`"),
    ] {
        for method in [Method::GET, Method::DELETE, Method::PUT] {
            let answer = (method == Method::PUT).then(|| json!({ "status": 201 }));
            let r = send(&app, admin(method.clone(), &params, answer)).await;
            assert_admin_problem(&r, StatusCode::BAD_REQUEST, "invalid-request");
            let detail = r.json()["detail"].as_str().unwrap().to_owned();
            assert!(detail.contains(says), "{method} {params:?}: {detail}");
        }
    }
    for answer in [
        json!({ "stauts": 201 }),
        json!({ "status": 201, "headers": [["set-cookie", "s=1"]] }),
        json!({ "status": 99 }),
        json!({ "status": 201, "body": "a", "body_base64": "YQ==" }),
        json!({ "not_replayable": true, "status": 201 }),
    ] {
        let r = send(&app, admin(Method::PUT, &who, Some(answer.clone()))).await;
        assert_admin_problem(&r, StatusCode::BAD_REQUEST, "invalid-request");
    }
    let mut plain = admin(Method::PUT, &who, None);
    *plain.body_mut() = Body::from(r#"{"status": 201}"#);
    let r = send(&app, plain).await;
    assert_admin_problem(
        &r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    );
    let huge = "x".repeat(tower_idempotency_core::admin::MAX_ANSWER_BYTES);
    let r = send(
        &app,
        admin(
            Method::PUT,
            &who,
            Some(json!({ "status": 201, "body": huge })),
        ),
    )
    .await;
    assert_admin_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "request-too-large");
    // None of it changed the record.
    let state = ok_json(&send(&app, admin(Method::GET, &who, None)).await);
    assert_eq!(state["state"], "completed");
    assert_eq!(state["status"], 201);
    let retry = send(
        &app,
        pay(&tenant, &key, r#"{"amount": 7, "currency": "EUR"}"#),
    )
    .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
}

// ---------------------------------------------------------------------------------------
// A small app: stores without the operator methods, failing stores, no operator
// ---------------------------------------------------------------------------------------

/// Who acts in the small apps below.
#[derive(Clone)]
struct Operator(&'static str);

impl AsRef<str> for Operator {
    fn as_ref(&self) -> &str {
        self.0
    }
}

/// `store`'s admin router under `/admin/idempotency`, with `operator` set (as an admin auth
/// layer would) unless `None`.
fn small_app<St: Store>(store: St, operator: Option<&'static str>) -> Router {
    let admin = AdminRouter::new(store)
        .actor_from_extension::<Operator>()
        .into_router();
    let app = Router::new().nest("/admin/idempotency", admin);
    match operator {
        Some(name) => app.layer(Extension(Operator(name))),
        None => app,
    }
}

/// A custom store that implements only what the layer needs, not `inspect`, `forget` or
/// `resolve`: the trait's defaults answer `Unsupported`.
#[derive(Clone, Debug, Default)]
struct LayerOnly(MemoryStore);

impl Store for LayerOnly {
    type Subscription = <MemoryStore as Store>::Subscription;

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> Result<Reservation, tower_idempotency::store::StoreError> {
        self.0.reserve(scope, fingerprint, token, lease).await
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.0.renew(scope, token, lease).await
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &tower_idempotency::store::Record,
        ttl: Duration,
    ) -> Result<tower_idempotency::store::Completion, tower_idempotency::store::StoreError> {
        self.0.complete(scope, token, record, ttl).await
    }

    async fn release(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.0.release(scope, token).await
    }

    async fn subscribe(
        &self,
        scope: &ScopeHash,
    ) -> Result<Self::Subscription, tower_idempotency::store::StoreError> {
        self.0.subscribe(scope).await
    }
}

/// A store without the operator methods: every action is 501 `not-supported`, naming the
/// operation.
#[tokio::test]
async fn a_store_without_operator_methods_is_501() {
    let app = small_app(LayerOnly::default(), Some("alice@ops"));
    let who = [("path", "/payments"), ("key", "k-1")];
    for (method, operation) in [
        (Method::GET, "inspect"),
        (Method::DELETE, "forget"),
        (Method::PUT, "resolve"),
    ] {
        let answer = (method == Method::PUT).then(|| json!({ "status": 201 }));
        let r = send(&app, admin(method.clone(), &who, answer)).await;
        assert_admin_problem(&r, StatusCode::NOT_IMPLEMENTED, "not-supported");
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(operation), "{method}: {detail}");
    }
}

/// A request that reaches the router without an operator is refused 403 (nothing read or
/// changed), whatever it asks; the router is told who acts or refuses to be built.
#[tokio::test]
async fn no_operator_is_403_and_a_router_must_be_told_who_acts() {
    let store = MemoryStore::default();
    let app = small_app(store.clone(), None);
    let scope = ScopeHash::for_key(None, &Method::POST, "/payments", "k-1").unwrap();
    let token = FencingToken::generate();
    let fp = Fingerprint::from_bytes([1; 32]);
    store
        .reserve(&scope, &fp, token, Duration::from_secs(30).into())
        .await
        .unwrap();
    let who = [("path", "/payments"), ("key", "k-1")];
    for method in [Method::GET, Method::DELETE, Method::PUT] {
        let answer = (method == Method::PUT).then(|| json!({ "status": 201 }));
        let r = send(&app, admin(method.clone(), &who, answer)).await;
        assert_admin_problem(&r, StatusCode::FORBIDDEN, "actor-missing");
    }
    // Even a bad request is refused for its missing operator first.
    let r = send(&app, admin(Method::GET, &[("tennant", "x")], None)).await;
    assert_admin_problem(&r, StatusCode::FORBIDDEN, "actor-missing");
    assert!(matches!(
        store.inspect(&scope).await.unwrap(),
        tower_idempotency::store::KeyState::InFlight { .. }
    ));
    // An empty operator is no operator.
    let empty = small_app(store.clone(), Some(""));
    let r = send(&empty, admin(Method::DELETE, &who, None)).await;
    assert_admin_problem(&r, StatusCode::FORBIDDEN, "actor-missing");

    let unconfigured = AdminRouter::new(store.clone()).try_into_router::<()>();
    let err = unconfigured.expect_err("refused without an actor source");
    assert!(err.to_string().contains("actor_from_extension"), "{err}");
    let zero = AdminRouter::new(store)
        .actor_from_extension::<Operator>()
        .resolve_ttl(Duration::ZERO)
        .try_into_router::<()>();
    assert!(zero.is_err());
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

/// The one audit line with every one of `parts`.
#[track_caller]
fn audit_line(captured: &Captured, parts: &[&str]) -> String {
    let logs = captured.text();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .collect();
    assert_eq!(lines.len(), 1, "{parts:?} in:\n{logs}");
    let line = lines[0];
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains(&format!(" {AUDIT_TARGET}: ")), "{line}");
    line.to_owned()
}

/// Every action is one INFO event on `tower_idempotency::audit` with the operator, the
/// action, the scope, the method and path, the answer stored, the result and the status
/// — refused ones too (no operator, bad parameters, the example's 401) — and no line
/// ever carries the key or the tenant.
#[tokio::test]
async fn every_action_is_audited_without_the_key_or_the_tenant() {
    let captured = Captured::default();
    let _installed = captured.install(tracing::Level::INFO);
    let store = MemoryStore::default();
    let app = payments::app(store.clone(), &config());
    let (tenant, key) = ("tenant-secret-93", "key-secret-41");
    let who = [("tenant", tenant), ("path", "/payments"), ("key", key)];
    let scope = ScopeHash::for_key(Some(tenant.as_bytes()), &Method::POST, "/payments", key)
        .unwrap()
        .to_hex();
    let actor = "actor=\"admin-token\"";
    let scope_field = format!("scope={scope}");
    let named = [
        actor,
        scope_field.as_str(),
        "method=POST",
        "path=\"/payments\"",
    ];

    let r = send(&app, admin(Method::GET, &who, None)).await;
    assert_eq!(r.status, StatusCode::OK);
    let mut parts = named.to_vec();
    parts.extend(["action=inspect", "result=absent", "status=200"]);
    audit_line(&captured, &parts);

    let answer = json!({ "status": 201, "body": "{}" });
    let r = send(&app, admin(Method::PUT, &who, Some(answer.clone()))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let mut parts = named.to_vec();
    parts.extend([
        "action=resolve",
        "answer=201",
        "ttl_secs=86400",
        "result=absent",
        "status=404",
    ]);
    audit_line(&captured, &parts);

    let body = r#"{"amount": 3, "currency": "EUR"}"#;
    assert_eq!(
        send(&app, pay(tenant, key, body)).await.status,
        StatusCode::CREATED
    );
    let r = send(&app, admin(Method::GET, &who, None)).await;
    assert_eq!(r.status, StatusCode::OK);
    let mut parts = named.to_vec();
    parts.extend(["action=inspect", "result=completed", "status=200"]);
    audit_line(&captured, &parts);
    let not_replayable = json!({ "not_replayable": true, "ttl_secs": 60 });
    send(&app, admin(Method::PUT, &who, Some(not_replayable))).await;
    let mut parts = named.to_vec();
    parts.extend([
        "action=resolve",
        "answer=not_replayable",
        "ttl_secs=60",
        "result=resolved",
        "status=200",
    ]);
    audit_line(&captured, &parts);
    send(&app, admin(Method::DELETE, &who, None)).await;
    let mut parts = named.to_vec();
    parts.extend(["action=forget", "result=forgotten", "status=200"]);
    audit_line(&captured, &parts);

    // Refused: a bad parameter (no scope to name), the example's 401, no operator.
    let r = send(&app, admin(Method::DELETE, &[("path", "/payments")], None)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let line = audit_line(
        &captured,
        &[
            actor,
            "action=forget",
            "result=invalid_request",
            "status=400",
        ],
    );
    assert!(!line.contains("scope="), "{line}");
    let r = send(
        &app,
        admin_as(Some("wrong-token-77"), Method::DELETE, &who, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    audit_line(
        &captured,
        &[
            "admin request refused",
            "method=DELETE",
            "path=\"/admin/idempotency/key\"",
            "result=unauthorized",
            "status=401",
        ],
    );
    let bare = small_app(store, None);
    let r = send(&bare, admin(Method::GET, &who, None)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let line = audit_line(
        &captured,
        &[
            "action=inspect",
            "result=no_actor",
            "status=403",
            &scope_field,
        ],
    );
    assert!(!line.contains("actor="), "{line}");

    let logs = captured.text();
    for secret in [tenant, key, TOKEN, "wrong-token-77"] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}

/// A store that fails (Redis unreachable): 503 `store-unavailable`, the store's own error
/// logged with its cause chain, and the action audited as a store error.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_failing_store_is_503_with_its_cause_logged() {
    use crate::support::proxy::FaultProxy;
    use crate::support::redis::RedisServer;

    let captured = Captured::default();
    let _installed = captured.install(tracing::Level::INFO);
    let server = RedisServer::start();
    let upstream = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let store =
        crate::support::store::store(&proxy.url(), &crate::support::unique_prefix("admin-503"))
            .await
            .command_timeout(Duration::from_millis(300));
    let app = small_app(store, Some("alice@ops"));
    proxy.refuse();
    let who = [("path", "/payments"), ("key", "k-1")];
    for method in [Method::GET, Method::DELETE, Method::PUT] {
        let answer = (method == Method::PUT).then(|| json!({ "status": 201 }));
        let r = send(&app, admin(method.clone(), &who, answer)).await;
        assert_admin_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    }
    audit_line(
        &captured,
        &[
            "action=inspect",
            "result=store_error",
            "status=503",
            "actor=\"alice@ops\"",
        ],
    );
    let logs = captured.text();
    let line = logs
        .lines()
        .find(|l| {
            l.contains("idempotency admin: the store failed") && l.contains("action=\"inspect\"")
        })
        .unwrap_or_else(|| panic!("no error log:\n{logs}"));
    assert!(line.contains(" ERROR "), "{line}");
    let cause = line.split("error=").nth(1).unwrap_or_default();
    assert!(
        cause.starts_with("store backend unavailable: redis"),
        "the Redis store's error follows: {line}"
    );
}
