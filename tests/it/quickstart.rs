//! Tests of `examples/quickstart.rs`, in-process.

use crate::quickstart_app as quickstart;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::DetachedWork;

async fn send(
    app: &axum::Router,
    method: Method,
    who: Option<&str>,
    key: Option<&str>,
) -> (StatusCode, bool, String) {
    let mut request = Request::builder().method(method).uri("/payments");
    if let Some(who) = who {
        request = request.header("authorization", format!("Bearer {who}"));
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn the_quickstart_replays_per_tenant_and_keeps_its_405() {
    let app = quickstart::app(&DetachedWork::new());
    let first = send(&app, Method::POST, Some("alice"), Some("k1")).await;
    assert_eq!(
        first,
        (StatusCode::CREATED, false, "payment for alice".into())
    );
    let retry = send(&app, Method::POST, Some("alice"), Some("k1")).await;
    assert_eq!(
        retry,
        (StatusCode::CREATED, true, "payment for alice".into())
    );
    // Same key, another tenant: its own scope, its own run.
    let bob = send(&app, Method::POST, Some("bob"), Some("k1")).await;
    assert_eq!(bob, (StatusCode::CREATED, false, "payment for bob".into()));
    // The key is required; auth runs first; route_layer leaves the 405 alone.
    assert_eq!(
        send(&app, Method::POST, Some("alice"), None).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(&app, Method::POST, None, Some("k1")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, Method::PATCH, Some("alice"), None).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
}
