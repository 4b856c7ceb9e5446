//! The scope hashes of a fixed set of requests, pinned: a stored record is found by its
//! scope hash, so a hash that changed between versions, or with a cargo feature (a deploy
//! that turns `axum` off), would turn every stored record into a stranger and run retries
//! again. CI runs this file with the default features and with `--no-default-features
//! --features memory`: the same hashes both times, nested routers included.
#![cfg(feature = "memory")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use tower::ServiceExt;
use tower_idempotency_core::{
    Completion, FencingToken, Fingerprint, IdempotencyLayer, MemoryStore, Record, Reservation,
    ScopeHash, Store, StoreError,
};

/// A memory store that remembers the scope of every reserve.
#[derive(Clone, Default)]
struct Recording {
    inner: MemoryStore,
    scopes: Arc<Mutex<Vec<ScopeHash>>>,
}

impl Store for Recording {
    type Subscription = <MemoryStore as Store>::Subscription;

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: tower_idempotency_core::LeaseTerms,
    ) -> Result<Reservation, StoreError> {
        self.scopes.lock().unwrap().push(*scope);
        self.inner.reserve(scope, fingerprint, token, lease).await
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(scope, token, lease).await
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        self.inner.complete(scope, token, record, ttl).await
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        self.inner.release(scope, token).await
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<Self::Subscription, StoreError> {
        self.inner.subscribe(scope).await
    }
}

/// The app: global and per-tenant routes, at the top and nested two levels down.
fn app(store: Recording) -> Router {
    let global = IdempotencyLayer::new(store.clone())
        .methods([Method::POST, Method::PATCH])
        .global_scope();
    let tenant = IdempotencyLayer::new(store)
        .tenant(|parts| Some(parts.headers.get("x-tenant")?.to_str().ok()?.to_owned()));
    let ok = || async { StatusCode::CREATED };
    let accounts = Router::new().route(
        "/accounts/{id}/payments",
        post(ok).patch(ok).route_layer(tenant.clone()),
    );
    Router::new()
        .route("/payments", post(ok).patch(ok).route_layer(global))
        .route("/tenant/payments", post(ok).route_layer(tenant))
        .nest("/api", Router::new().nest("/v1", accounts))
}

async fn scope_of(method: Method, uri: &str, key: &str, tenant: Option<&str>) -> String {
    let store = Recording::default();
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("idempotency-key", key);
    if let Some(tenant) = tenant {
        request = request.header("x-tenant", tenant);
    }
    let response = app(store.clone())
        .oneshot(request.body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "{uri}");
    let scopes = store.scopes.lock().unwrap();
    assert_eq!(scopes.len(), 1, "{uri}");
    scopes[0].to_hex()
}

#[tokio::test]
async fn scope_hashes_are_pinned() {
    let cases: [(Method, &str, &str, Option<&str>, &str); 7] = [
        (
            Method::POST,
            "/payments",
            "k1",
            None,
            "d3e722e02cbd20d06243fb99e14caf789827ff0685dfe1473cd9f88492972d75",
        ),
        (
            Method::PATCH,
            "/payments",
            "k1",
            None,
            "249ab32c4d8b7a206045f321c7888bba6ef234675de6cd7697f2e0d9a1b1bbfd",
        ),
        (
            Method::POST,
            "/tenant/payments",
            "k1",
            Some("alice"),
            "197f8dd5d09ea455ac15bc607cad94ee08cf5010c899280ebc056e80a758b400",
        ),
        (
            Method::POST,
            "/tenant/payments",
            "k1",
            Some("bob"),
            "cebb0408c654f1a2ec27aaebfecbad8d259fddde5fd17654a5d5708676dcad7f",
        ),
        (
            Method::POST,
            "/api/v1/accounts/7/payments",
            "k1",
            Some("alice"),
            "f05164da1e87bf30e8aa7d5be30ba9ec86588ba3ece7f743e878d964e6728d75",
        ),
        (
            Method::PATCH,
            "/api/v1/accounts/7/payments",
            "~odd!key#with:punctuation",
            Some("alice"),
            "a3c59aeca0fdca9f7230130db212ef774c1e042f8c0c674a7c18661e52449728",
        ),
        (
            Method::POST,
            "/api/v1/accounts/8/payments",
            "k1",
            Some("alice"),
            "16f0dd9afd33404b23515a92fa7ecf31166bb464f94b817d5804b46f0bb28bd3",
        ),
    ];
    for (method, uri, key, tenant, pinned) in cases {
        let hex = scope_of(method.clone(), uri, key, tenant).await;
        assert_eq!(hex, pinned, "{method} {uri} {key} {tenant:?}");
    }
}

/// The scope is the path the client sent, whatever the nesting, and nothing else of
/// the URI: a query string is part of the fingerprint, not of the scope. A key sent as an
/// RFC 8941 sf-string is the same key as its bare form.
#[tokio::test]
async fn the_scope_is_the_full_path_and_the_unescaped_key() {
    let nested = "/api/v1/accounts/7/payments";
    let base = scope_of(Method::POST, nested, "k1", Some("alice")).await;
    assert_eq!(
        base,
        scope_of(Method::POST, &format!("{nested}?x=1"), "k1", Some("alice")).await
    );
    assert_eq!(
        base,
        scope_of(Method::POST, nested, "\"k1\"", Some("alice")).await
    );
    assert_eq!(
        base,
        ScopeHash::new(Some(b"alice"), &Method::POST, nested, b"k1").to_hex(),
        "the nested route hashes its full path, as ScopeHash::new does"
    );
}

/// An operator's [`ScopeHash::for_key`] names exactly the scope the layer used, for nested
/// routes, query strings, quoted keys and keys full of punctuation.
#[tokio::test]
async fn an_operators_scope_is_the_layers() {
    let cases: [(Method, &str, &str, Option<&str>, &str); 5] = [
        (Method::POST, "/payments", "k1", None, "/payments"),
        (
            Method::PATCH,
            "/payments?dry=1",
            "\"k1\"",
            None,
            "/payments",
        ),
        (
            Method::POST,
            "/tenant/payments",
            "k\\\"1",
            Some("alice"),
            "/tenant/payments",
        ),
        (
            Method::POST,
            "/api/v1/accounts/7/payments?x=1&y=2",
            "~odd!key#with:punctuation",
            Some("bob"),
            "/api/v1/accounts/7/payments",
        ),
        (
            Method::PATCH,
            "/api/v1/accounts/8/payments",
            "\"quoted-\\\\-and-\\\"-escaped\"",
            Some("alice"),
            "/api/v1/accounts/8/payments",
        ),
    ];
    for (method, uri, key, tenant, path) in cases {
        let layer = scope_of(method.clone(), uri, key, tenant).await;
        let operator = ScopeHash::for_key(tenant.map(str::as_bytes), &method, uri, key)
            .unwrap()
            .to_hex();
        assert_eq!(layer, operator, "{method} {uri} {key}");
        let without_query = ScopeHash::for_key(tenant.map(str::as_bytes), &method, path, key)
            .unwrap()
            .to_hex();
        assert_eq!(layer, without_query, "{method} {path} {key}");
    }
}
