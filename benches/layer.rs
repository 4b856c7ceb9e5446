//! The layer's cost next to bare axum, measured side by side in one run.
//!
//! Every case drives the same `Router` in-process with `oneshot`, so the numbers are the
//! middleware's own work (no sockets): bare handler, the layer on a new key (reserve +
//! handler + complete), and the layer replaying a stored response. Run with
//! `cargo bench --bench layer`. The same cases run on the Redis store at `REDIS_URL`
//! (default `redis://127.0.0.1:6379`) when one answers; there a new request is 2 Redis
//! round trips and a replay 1, so those numbers are mostly Redis latency.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{BoxStore, IdempotencyLayer, MemoryStore, Store};
use tower_idempotency_redis::fred;

const BODY: &str = r#"{"amount":1250,"currency":"EUR","reference":"order-8e03978e"}"#;

async fn handler(
    body: axum::body::Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        format!(r#"{{"id":"pay_1","len":{}}}"#, body.len()),
    )
}

fn router<St: Store>(layer: Option<IdempotencyLayer<St>>) -> Router {
    match layer {
        Some(layer) => Router::new().route("/payments", post(handler).layer(layer)),
        None => Router::new().route("/payments", post(handler)),
    }
}

fn request(key: &str) -> Request<Body> {
    Request::post("/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(BODY))
        .expect("valid request")
}

async fn call(app: &Router, key: &str) {
    let response = app.clone().oneshot(request(key)).await.expect("infallible");
    assert!(response.status().is_success());
    let _ = response.into_body().collect().await.expect("body");
}

fn bench_store<St: Store>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, store: St) {
    let mut group = c.benchmark_group("layer");
    group.throughput(Throughput::Elements(1));
    let bare = router::<St>(None);
    group.bench_function(BenchmarkId::new("bare-axum", name), |b| {
        b.to_async(rt).iter(|| call(&bare, "unused"))
    });
    // A short TTL for new keys: the case writes one record per iteration (millions), which
    // must expire and be swept before the memory store's entry bound refuses them (and a
    // shared Redis should not keep them for a day). Replays get a TTL longer than the run.
    let layer = IdempotencyLayer::new(store.clone())
        .global_scope()
        .ttl(std::time::Duration::from_secs(2));
    let app = router(Some(layer));
    let replays = router(Some(
        IdempotencyLayer::new(store)
            .global_scope()
            .ttl(std::time::Duration::from_secs(600)),
    ));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let run = std::process::id();
    group.bench_function(BenchmarkId::new("new-key", name), |b| {
        b.to_async(rt).iter(|| {
            let key = format!("bench-{run}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
            let app = app.clone();
            async move { call(&app, &key).await }
        })
    });
    let replay_key = format!("bench-replay-{run}");
    rt.block_on(call(&replays, &replay_key));
    group.bench_function(BenchmarkId::new("replay", name), |b| {
        b.to_async(rt).iter(|| call(&replays, &replay_key))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    // One thread: what is measured is CPU work, not cross-thread wake-ups (in a server the
    // spawned task lands on the connection's worker first).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    bench_store(c, &rt, "memory", MemoryStore::default());
    // The same store chosen at run time: a boxed future and a dynamic call per store call.
    bench_store(
        c,
        &rt,
        "memory-boxed",
        BoxStore::new(MemoryStore::default()),
    );

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    match rt.block_on(redis_store(&url)) {
        Ok(store) => bench_store(c, &rt, "redis", store),
        Err(e) => eprintln!("skipping the Redis cases: {e}"),
    }
}

async fn redis_store(
    url: &str,
) -> Result<tower_idempotency_redis::RedisStore<fred::clients::Client>, Box<dyn std::error::Error>>
{
    use tower_idempotency_redis::fred::prelude::*;
    let client = Builder::from_config(Config::from_url(url)?).build()?;
    tokio::time::timeout(std::time::Duration::from_secs(2), client.init()).await??;
    let prefix = format!("bench:{}:", std::process::id());
    Ok(tower_idempotency_redis::RedisStore::new(client)
        .prefix(prefix)
        .init()
        .await?)
}

criterion_group!(layer, benches);
criterion_main!(layer);
