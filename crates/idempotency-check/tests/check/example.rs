//! The repository's example API on each store: every check passes, expiry included. And
//! the one thing the example does differently from the draft's default: `/payments`
//! waits for a duplicate in flight, so `--in-flight conflict` fails there and passes on
//! `/orders`, which answers 409.

use std::time::Duration;

use idempotency_check::{run, Check, Config, InFlightMode, Verdict};
use tower_idempotency::MemoryStore;

use crate::payments;
use crate::support::{assert_all_pass, payments_config, redis_url, Schema, Server};

/// The TTL the example keeps payments for in these tests, and the checker waits for.
/// Longer than the slow body's 1 s: a transactional Postgres store lowers its lease to
/// the TTL, and a handler that outlives the lease is rolled back (503).
const TTL: Duration = Duration::from_secs(2);
const SLOW_MS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_on_the_memory_store() {
    let server = Server::example(MemoryStore::default(), payments::AppState::default(), TTL).await;
    let report = run(&payments_config(&server, SLOW_MS).ttl(TTL))
        .await
        .unwrap();
    assert_all_pass(&report);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_on_the_redis_store() {
    let store = tower_idempotency_redis::RedisStore::from_url(&redis_url().await)
        .unwrap()
        .prefix(format!(
            "idempotency-check-test:{}:",
            crate::support::unique()
        ))
        .init()
        .await
        .expect("Redis is usable");
    let server = Server::example(store, payments::AppState::default(), TTL).await;
    let report = run(&payments_config(&server, SLOW_MS).ttl(TTL))
        .await
        .unwrap();
    assert_all_pass(&report);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_on_the_transactional_postgres_store() {
    let schema = Schema::create().await;
    let (store, state) = payments::postgres_store(&schema.url())
        .await
        .unwrap_or_else(|e| panic!("the example in Postgres mode: {e}"));
    let server = Server::example(store, state, TTL).await;
    let report = run(&payments_config(&server, SLOW_MS).ttl(TTL))
        .await
        .unwrap();
    assert_all_pass(&report);
    server.stop().await;
    drop(schema);
}

/// `/payments` waits for a duplicate in flight: the draft's 409 is what `conflict`
/// (the default) expects, so only that check fails, with the reason in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_route_fails_the_conflict_expectation() {
    let server = Server::example(MemoryStore::default(), payments::AppState::default(), TTL).await;
    let config = payments_config(&server, 600).in_flight(InFlightMode::Conflict);
    let report = run(&config).await.unwrap();
    crate::support::assert_fails_exactly(&report, &[Check::InFlight]);
    let got = &report.outcome(Check::InFlight).unwrap().got;
    assert!(got.contains("the draft asks 409"), "{got}");
    // `any` accepts the wait.
    let report = run(&config.in_flight(InFlightMode::Any)).await.unwrap();
    assert_eq!(
        report.verdict(Check::InFlight),
        Some(Verdict::Pass),
        "{report}"
    );
    server.stop().await;
}

/// `/orders` answers 409 at once; its executions are `{"orders": [..]}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_route_passes_with_an_executions_pointer() {
    let server = Server::example(MemoryStore::default(), payments::AppState::default(), TTL).await;
    let url = server.url("/orders");
    let config = Config::new(&url, r#"{"item": "book"}"#)
        .unwrap()
        .slow_body(r#"{"item": "book", "delay_ms": 600}"#)
        .header_line("Authorization: Bearer alice")
        .unwrap()
        .other_tenant_header_line("Authorization: Bearer bob")
        .unwrap()
        .executions_url(&url)
        .unwrap()
        .executions_pointer("/orders")
        .unwrap();
    let report = run(&config).await.unwrap();
    assert_eq!(report.with(Verdict::Fail), vec![], "{report}");
    assert_eq!(report.with(Verdict::Skip), vec![Check::Expiry], "{report}");
    let got = &report.outcome(Check::InFlight).unwrap().got;
    assert!(got.starts_with("409"), "{got}");
    server.stop().await;
}
