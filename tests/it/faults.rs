//! SPEC section 6 under faults: Redis down, cut, slow, restarted; clients hanging up.
//!
//! Every test owns its `redis-server` and puts a [`FaultProxy`] between the layer's fred
//! client and it, so faults hit only that test. Each asserts: no second execution (except
//! where SPEC section 6 says one is possible, and then that it is the documented one), no
//! lost completed record, and a defined answer for every caller.
#![cfg(feature = "redis")]

use crate::common;
use crate::support;

use std::time::Duration;

use axum::http::StatusCode;
use common::app::{assert_problem, delayed, post, send, spawn_send, Harness};
use futures_util::future::join_all;
use support::proxy::FaultProxy;
use support::redis::{client_commands, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tower_idempotency::redis::fred::clients::Client;
use tower_idempotency::redis::fred::interfaces::ClientLike;
use tower_idempotency::redis::RedisStore;
use tower_idempotency::{IdempotencyLayer, InFlight};

/// A server of this test's own, a proxy in front of it, and two stores: `proxied` (the app
/// server under fault) and `direct` (a second app server whose link stays up).
struct Rig {
    server: RedisServer,
    proxy: FaultProxy,
    proxied: RedisStore<Client>,
    direct: RedisStore<Client>,
}

impl Rig {
    async fn start(test: &str) -> Rig {
        let server = RedisServer::start();
        let upstream = format!("127.0.0.1:{}", server.port())
            .parse()
            .expect("addr");
        let proxy = FaultProxy::start(upstream).await;
        let prefix = support::unique_prefix(test);
        let proxied = support::store::store(&proxy.url(), &prefix)
            .await
            .command_timeout(Duration::from_millis(500));
        let direct = support::store::store(&server.url(), &prefix).await;
        Rig {
            server,
            proxy,
            proxied,
            direct,
        }
    }
}

/// Redis unreachable before reserve: 503 with Retry-After (fail closed, the default) and
/// the handler never runs; with `fail_open`, the request passes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_before_reserve_fails_closed_or_open() {
    support::metrics::install();
    // Routes of this test's own: other tests in this binary count outcomes too.
    let (closed_route, open_route) = ("/unreachable-closed", "/unreachable-open");
    let counted = |route: &str, outcome: &str| {
        support::metrics::counter(
            "idempotency_requests_total",
            &[("outcome", outcome), ("route", route)],
        )
    };
    let rig = Rig::start("unreachable").await;
    rig.proxy.refuse();
    let closed = Harness::on(
        IdempotencyLayer::new(rig.proxied.clone()).global_scope(),
        closed_route,
    );
    let r = send(&closed.router, post(closed_route, Some("k"), "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(closed.runs(), 0);
    let open = Harness::on(
        IdempotencyLayer::new(rig.proxied.clone())
            .global_scope()
            .fail_open(),
        open_route,
    );
    assert_eq!(
        send(&open.router, post(open_route, Some("k"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(open.runs(), 1);
    assert_eq!(
        counted(closed_route, "store_error"),
        1,
        "the 503 was counted"
    );
    assert_eq!(
        counted(open_route, "fail_open"),
        1,
        "the pass-through was counted"
    );
    // Back up: the same layer works again without a restart.
    rig.proxy.pass();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        send(&closed.router, post(closed_route, Some("k2"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
}

/// The link drops after reserve, while the handler runs, and comes back within the
/// complete-retry bound: the caller gets its response, a retry on another app server
/// meanwhile gets 409, and the record lands: exactly one execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_between_reserve_and_complete_then_restored() {
    let rig = Rig::start("cut-restored").await;
    let server_a = Harness::new(IdempotencyLayer::new(rig.proxied.clone()).global_scope());
    let server_b =
        server_a.sharing_counters(IdempotencyLayer::new(rig.direct.clone()).global_scope());
    let first = spawn_send(
        &server_a.router,
        delayed(post("/pay", Some("k"), "{}"), 300),
    );
    server_a.started.notified().await;
    rig.proxy.refuse(); // reserve went through; renewals and complete will fail
    let during = send(&server_b.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(&during, StatusCode::CONFLICT, "request-in-flight");
    tokio::time::sleep(Duration::from_millis(1500)).await; // complete is retrying now
    let still = send(&server_b.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(&still, StatusCode::CONFLICT, "request-in-flight");
    rig.proxy.pass();
    let first = first.await.expect("caller");
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the caller gets its response"
    );
    let retry = send(&server_b.router, post("/pay", Some("k"), "{}")).await;
    assert!(retry.replayed(), "the record landed once the link was back");
    assert_eq!(retry.body, first.body);
    assert_eq!(server_a.runs(), 1);
}

/// The link stays down past the complete-retry bound: the caller still gets its response;
/// the record is not stored, and once the lease lapses a retry runs again. This is the
/// documented open window of SPEC section 6 (an `error!` is logged and counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_longer_than_complete_bound_is_the_documented_window() {
    support::metrics::install();
    let route = "/cut-long";
    let gave_up =
        || support::metrics::counter("idempotency_complete_failed_total", &[("route", route)]);
    let rig = Rig::start("cut-long").await;
    let layer = |store: RedisStore<Client>| {
        IdempotencyLayer::new(store)
            .global_scope()
            .lease(Duration::from_secs(4))
            .complete_retry(Duration::from_millis(600))
    };
    let server_a = Harness::on(layer(rig.proxied.clone()), route);
    let server_b = server_a.sharing_counters_on(layer(rig.direct.clone()), route);
    let first = spawn_send(&server_a.router, delayed(post(route, Some("k"), "{}"), 200));
    server_a.started.notified().await;
    rig.proxy.refuse();
    let started = Instant::now(); // about when the lease was taken
    let first = first.await.expect("caller");
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the caller still gets its response"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "complete gave up at its bound"
    );
    assert_eq!(gave_up(), 1, "giving up was counted");
    // Within the lease, retries still see the reservation: 409, no second run.
    let r = send(&server_b.router, post(route, Some("k"), "{}")).await;
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    tokio::time::sleep_until(started + Duration::from_millis(4300)).await; // the lease lapses
    let after = send(&server_b.router, post(route, Some("k"), "{}")).await;
    assert_eq!(after.status, StatusCode::CREATED);
    assert!(
        !after.replayed(),
        "no record was stored: the retry ran again"
    );
    assert_eq!(
        server_a.runs(),
        2,
        "the one second execution SPEC section 6 allows"
    );
    rig.proxy.pass();
}

/// Redis restarts and loses everything (no persistence), scripts included: the next
/// requests reload the scripts (NOSCRIPT → EVAL) and work without restarting the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_data_loss_recovers() {
    let mut rig = Rig::start("restart").await;
    let h = Harness::new(IdempotencyLayer::new(rig.direct.clone()).global_scope());
    assert_eq!(
        send(&h.router, post("/pay", Some("before"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    rig.server.restart();
    // fred reconnects on its own; allow it a moment, then every request must work.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = send(&h.router, post("/pay", Some("after"), "{}")).await;
        if r.status == StatusCode::CREATED {
            break;
        }
        assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
        assert!(Instant::now() < deadline, "recovered within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(send(&h.router, post("/pay", Some("after"), "{}"))
        .await
        .replayed());
    let before = rig.direct.round_trips();
    assert!(before.total > 0);
}

/// The reply to a reserve is lost with its connection; fred reconnects and sends the
/// same `EVALSHA` again, so the script runs twice with one token. The second run must
/// answer "reserved" (its own lease), not "in flight": the request runs the handler once
/// and gets 201, and a retry replays (SPEC section 6, reserve is idempotent under re-send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reserve_reply_is_sent_again_and_still_reserves() {
    let rig = Rig::start("resent-reserve").await;
    // The premise: the test client re-sends a command that was in flight on a connection
    // that closed (fred's default is 3 attempts; the support client reconnects every
    // 100 ms).
    let attempts = rig
        .proxied
        .client()
        .connection_config()
        .max_command_attempts;
    assert!(attempts >= 2, "fred max_command_attempts is {attempts}");
    let port = rig.server.port();
    let h = Harness::new(IdempotencyLayer::new(rig.proxied.clone()).global_scope());
    let accepted = rig.proxy.connections_accepted();
    let (evalsha, sent) = (
        client_commands(port, "evalsha"),
        rig.proxied.round_trips().reserve,
    );

    rig.proxy.cut_next_reply(); // the reserve's reply
    let first = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED, "body: {:?}", first.body);
    assert!(!first.replayed());
    assert_eq!(h.runs(), 1);
    assert!(
        rig.proxy.connections_accepted() > accepted,
        "fred reconnected after the cut"
    );
    assert_eq!(
        rig.proxied.round_trips().reserve - sent,
        1,
        "the store asked once"
    );
    assert_eq!(
        client_commands(port, "evalsha") - evalsha,
        3,
        "Redis ran the reserve twice (sent, then re-sent by fred) and the complete once"
    );

    let retry = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert!(
        retry.replayed(),
        "status {}: {:?}",
        retry.status,
        retry.body
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(h.runs(), 1);
}

/// A reserve that ran in Redis but whose reply came after the store's `command_timeout`:
/// the caller gets 503, and the lease it created must not linger (the layer releases the
/// token it tried to reserve, best effort), so an immediate retry runs instead of
/// getting 409 for 30 s for a lease nobody holds (SPEC section 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_reserve_leaves_no_lease_behind() {
    let rig = Rig::start("timed-out-reserve").await; // command_timeout 500 ms
    let port = rig.server.port();
    let h = Harness::new(IdempotencyLayer::new(rig.proxied.clone()).global_scope());
    let evalsha = client_commands(port, "evalsha");

    // The reserve reaches Redis after 300 ms and runs; its reply would arrive after
    // 600 ms, past the 500 ms timeout.
    rig.proxy.delay(Duration::from_millis(300));
    let first = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(&first, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(h.runs(), 0);
    assert!(
        client_commands(port, "evalsha") > evalsha,
        "the timed-out reserve ran in Redis"
    );

    rig.proxy.pass();
    let retry = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "an immediate retry runs; body: {:?}",
        retry.body
    );
    assert_eq!(h.runs(), 1);
}

/// 200 ms of added round-trip latency: still exactly one execution for concurrent
/// requests, and a `Wait` bound is respected (409 once it passes, not much later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_latency_keeps_correctness_and_wait_bound() {
    let rig = Rig::start("latency").await;
    rig.proxy.delay(Duration::from_millis(100)); // each way: 200 ms per round trip
    let wait = |bound| {
        IdempotencyLayer::new(rig.proxied.clone().command_timeout(Duration::from_secs(2)))
            .global_scope()
            .in_flight(InFlight::Wait(bound))
    };
    let h = Harness::new(wait(Duration::from_secs(10)));
    let replies =
        join_all((0..8).map(|_| spawn_send(&h.router, post("/pay", Some("k"), "{}")))).await;
    assert_eq!(h.runs(), 1, "one execution under latency");
    assert!(replies
        .iter()
        .all(|r| r.as_ref().unwrap().status == StatusCode::CREATED));

    let bounded = Harness::new(wait(Duration::from_millis(500)));
    let slow = spawn_send(
        &bounded.router,
        delayed(post("/pay", Some("slow"), "{}"), 3000),
    );
    bounded.started.notified().await;
    let started = Instant::now();
    let r = send(&bounded.router, post("/pay", Some("slow"), "{}")).await;
    let waited = started.elapsed();
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    assert!(
        waited >= Duration::from_millis(500),
        "waited the bound: {waited:?}"
    );
    // The bound, plus at most one in-flight reserve round trip (200 ms) and slack.
    assert!(
        waited < Duration::from_millis(500 + 200 + 800),
        "bound respected: {waited:?}"
    );
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);
}

/// A client that drops its TCP connection while the handler runs: the handler finishes,
/// its result is stored, and a retry on a new connection replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_over_tcp_still_stores() {
    let rig = Rig::start("disconnect").await;
    let h = Harness::new(IdempotencyLayer::new(rig.direct.clone()).global_scope());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = h.router.clone();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let request =
        "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ncontent-type: application/json\r\n\
                   x-delay-ms: 300\r\ncontent-length: 2\r\n\r\n{}";
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    h.started.notified().await;
    drop(stream); // hang up mid-handler
                  // Bounded: if the hang-up cancelled the work, this fails instead of hanging.
    tokio::time::timeout(Duration::from_secs(5), h.finished.notified())
        .await
        .expect("the handler finished although the client hung up");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answer")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 201"), "{text}");
    assert!(text.contains("idempotent-replayed: true"), "{text}");
    assert_eq!(h.runs(), 1);
    server.abort();
}

/// A local replay entry is dated from when the reserve was sent, not from when its reply
/// arrived: a reply held back by the network must not let the entry outlive the record in
/// Redis (SPEC section 7). The record lives 5 s; a second app server reads it through a
/// proxy that delays only replies, by 2 s (the command runs at once, so the TTL Redis
/// reports is exact and 2 s old on arrival), replays it from memory while it lives, and
/// once Redis has dropped it runs the request anew. An entry dated from the reply would
/// replay it for 2 s more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reply_does_not_stretch_a_local_entry() {
    let rig = Rig::start("slow-reply-entry").await;
    let (ttl, delay) = (Duration::from_secs(5), Duration::from_secs(2));
    let layer = |store: RedisStore<Client>| IdempotencyLayer::new(store).global_scope().ttl(ttl);
    let writer = Harness::new(layer(rig.direct.clone()));
    // A clone with the same prefix shares the proxied store's tier and counters.
    let slow_store = rig.proxied.clone().command_timeout(Duration::from_secs(10));
    let reader = writer.sharing_counters(layer(slow_store));

    let before = Instant::now();
    let first = send(&writer.router, post("/pay", Some("k"), "{}")).await;
    let completed = Instant::now(); // Redis drops the record by `completed + ttl`
    assert_eq!(first.status, StatusCode::CREATED);

    rig.proxy.delay_replies(delay);
    let slow = send(&reader.router, post("/pay", Some("k"), "{}")).await;
    rig.proxy.pass();
    assert!(slow.replayed(), "{slow:?}");
    assert_eq!(slow.body, first.body);
    let sent = rig.proxied.round_trips().total;
    let kept = send(&reader.router, post("/pay", Some("k"), "{}")).await;
    assert!(kept.replayed(), "{kept:?}");
    assert_eq!(
        rig.proxied.round_trips().total,
        sent,
        "replayed from the local tier while the record lives"
    );

    tokio::time::sleep_until(completed + ttl + Duration::from_millis(300)).await;
    if Instant::now() >= before + ttl + delay {
        // Correct code passes either way; only the bug's window was missed.
        eprintln!("the machine was too slow to open the window this test looks into");
    }
    let after = send(&reader.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(after.status, StatusCode::CREATED, "{after:?}");
    assert!(
        !after.replayed(),
        "replayed from a local entry that outlived the record in Redis: {after:?}"
    );
    assert_eq!(writer.runs(), 2, "the expired key ran anew");
}
