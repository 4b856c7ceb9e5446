//! The smallest real setup: one route, one idempotency layer scoped per caller, auth
//! outside it, the in-memory store. `cargo run --example quickstart`, then:
//!
//! ```text
//! curl -i localhost:3000/payments -H 'Authorization: Bearer alice' -H 'Idempotency-Key: k1'
//! ```
//! (twice: the second answer carries `Idempotent-Replayed: true`).

use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use tower_idempotency::{DetachedWork, IdempotencyLayer, MemoryStore};

/// What the auth layer knows about the caller.
#[derive(Clone)]
pub struct Claims {
    pub sub: String,
}

/// Stands in for real token verification: the bearer token is the caller.
pub async fn auth(mut request: Request, next: Next) -> Result<Response, StatusCode> {
    let header = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let sub = header
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(StatusCode::UNAUTHORIZED)?;
    let claims = Claims {
        sub: sub.to_owned(),
    };
    request.extensions_mut().insert(claims);
    Ok(next.run(request).await)
}

pub async fn create_payment(Extension(claims): Extension<Claims>) -> (StatusCode, String) {
    (StatusCode::CREATED, format!("payment for {}", claims.sub))
}

pub fn app(detached: &DetachedWork) -> Router {
    let idempotency = IdempotencyLayer::new(MemoryStore::default())
        .tenant_from_extension_with(|claims: &Claims| &claims.sub)
        .require_key()
        .ttl(Duration::from_secs(24 * 3600))
        .track_detached_in(detached.clone());
    Router::new()
        .route("/payments", post(create_payment).route_layer(idempotency))
        .layer(middleware::from_fn(auth))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let detached = DetachedWork::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    let ctrl_c = async { tokio::signal::ctrl_c().await.unwrap_or(()) };
    axum::serve(listener, app(&detached))
        .with_graceful_shutdown(ctrl_c)
        .await?;
    // Requests whose clients hung up still run to the end and store their results.
    let _ = detached.wait(Duration::from_secs(30)).await;
    Ok(())
}
