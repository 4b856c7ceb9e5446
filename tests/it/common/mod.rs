//! The one shared suite: every case is a plain generic `async fn` over a [`Store`], and
//! [`store_suite!`] stamps them as tests for one store (`tests/memory.rs`, `tests/redis.rs`).
#![allow(dead_code)] // each test binary stamps the suite with its own subset of helpers

pub mod app;
pub mod faults;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use futures_util::future::join_all;
use tower_idempotency::store::{
    FencingToken, Fingerprint, KeyState, LeaseTerms, Record, Reservation, Resolved, ScopeHash,
    StorePolicy,
};
use tower_idempotency::{IdempotencyLayer, InFlight, Store, Uncertain};

use app::{assert_problem, post, send, Harness, Reply};

/// Stamps every case below as a `#[tokio::test]` for the store `$make().await` builds.
#[macro_export]
macro_rules! store_suite {
    ($make:expr) => {
        $crate::store_suite!(@cases $make;
            key_missing_when_required_is_400,
            key_invalid_is_400,
            body_unreadable_is_400,
            body_over_limit_is_413,
            completed_is_replayed_byte_for_byte,
            replay_keeps_headers_as_spec_says,
            no_content_replays_empty,
            different_payload_is_422,
            different_payload_while_in_flight_is_422,
            changed_query_is_422,
            in_flight_conflict_is_409,
            in_flight_wait_replays,
            in_flight_wait_times_out_with_409,
            waiter_runs_after_release,
            concurrent_first_requests_run_once,
            client_error_releases_and_corrected_retry_runs,
            server_error_is_released_by_default,
            successes_and_server_errors_replays_500,
            oversized_response_is_streamed_then_not_replayable,
            handler_panic_releases_key,
            tenants_do_not_share_scopes,
            routes_and_resources_do_not_share_scopes,
            resolver_without_tenant_is_500,
            ttl_expiry_runs_again,
            hang_up_mid_handler_still_stores,
            fencing_token_reaches_handler,
            renewal_keeps_lease_past_its_length,
            lost_lease_lets_second_owner_run_and_fences_stale_one,
            store_level_fencing_and_fresh_tokens,
            fail_open_never_passes_an_undecodable_record,
            store_errors_while_waiting_never_pass_through,
            body_error_after_a_stored_status_is_not_replayable,
            body_panic_after_a_stored_status_is_not_replayable,
            huge_wait_bound_does_not_panic,
            response_trailers_reach_the_first_caller,
            reserve_is_atomic_over_many_rounds,
            a_resent_reserve_is_answered_reserved,
            waiter_is_woken_by_the_store_not_by_polling,
            uncertain_keys_are_refused_until_resolved_or_forgotten,
            uncertain_keys_run_again_by_default,
            a_lapsed_owner_alive_after_all_completes,
            operators_inspect_forget_and_resolve,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::common::$case(($make)().await).await
            }
        )*
    };
}

// ---- SPEC section 3: the key ----

pub async fn key_missing_when_required_is_400<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).require_key().global_scope());
    let r = send(&h.router, post("/pay", None, "{}")).await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "idempotency-key-missing");
    assert_eq!(h.runs(), 0);
}

pub async fn key_invalid_is_400<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let long = "k".repeat(256);
    for bad in [
        "",
        "\"unterminated",
        "\"a\"b",
        "has space",
        "\"\"",
        long.as_str(),
    ] {
        let r = send(&h.router, post("/pay", Some(bad), "{}")).await;
        assert_problem(&r, StatusCode::BAD_REQUEST, "idempotency-key-invalid");
    }
    // Two header fields.
    let mut req = post("/pay", Some("a"), "{}");
    req.headers_mut()
        .append("idempotency-key", "b".parse().unwrap());
    assert_problem(
        &send(&h.router, req).await,
        StatusCode::BAD_REQUEST,
        "idempotency-key-invalid",
    );
    // Non-UTF-8 bytes.
    let mut req = post("/pay", None, "{}");
    req.headers_mut().insert(
        "idempotency-key",
        header::HeaderValue::from_bytes(&[b'k', 0xff]).unwrap(),
    );
    assert_problem(
        &send(&h.router, req).await,
        StatusCode::BAD_REQUEST,
        "idempotency-key-invalid",
    );
    assert_eq!(h.runs(), 0);
    // The quoted and bare forms are one key.
    let a = send(&h.router, post("/pay", Some("\"same\""), "{}")).await;
    let b = send(&h.router, post("/pay", Some("same"), "{}")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert!(b.replayed());
    assert_eq!(h.runs(), 1);
}

// ---- SPEC section 5: outcomes ----

pub async fn body_unreadable_is_400<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let chunks: Vec<Result<&'static str, std::io::Error>> = vec![
        Ok("{\"a\":"),
        Err(std::io::Error::other("connection reset")),
    ];
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let req = Request::post("/pay")
        .header("idempotency-key", "k")
        .body(body)
        .unwrap();
    let r = send(&h.router, req).await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "request-body-unreadable");
    assert_eq!(h.runs(), 0);
}

pub async fn body_over_limit_is_413<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope().max_body(16));
    // Declared length over the limit.
    let r = send(&h.router, post("/pay", Some("k1"), &"x".repeat(17))).await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "request-body-too-large");
    assert_eq!(r.headers[header::CONNECTION], "close");
    // Chunked, no length: over the limit while reading.
    let chunks: Vec<Result<&'static str, std::io::Error>> =
        vec![Ok("0123456789"), Ok(""), Ok("0123456789")];
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let req = Request::post("/pay")
        .header("idempotency-key", "k2")
        .body(body)
        .unwrap();
    let r = send(&h.router, req).await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "request-body-too-large");
    // Exactly at the limit is fine.
    let r = send(
        &h.router,
        post("/pay", Some("k3"), &format!("\"{}\"", "x".repeat(14))),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(h.runs(), 1);
}

pub async fn completed_is_replayed_byte_for_byte<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let first = send(&h.router, post("/pay", Some("k"), "{\"amount\":1}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        first.headers.get("idempotent-replayed").is_none(),
        "first response is not a replay"
    );
    for _ in 0..3 {
        let retry = send(&h.router, post("/pay", Some("k"), "{\"amount\":1}")).await;
        assert_eq!(retry.status, first.status);
        assert_eq!(retry.body, first.body);
        assert!(retry.replayed());
        assert_eq!(
            retry.headers[header::CONTENT_LENGTH],
            first.body.len().to_string()
        );
    }
    assert_eq!(h.runs(), 1);
}

pub async fn replay_keeps_headers_as_spec_says<St: Store>(store: St) {
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .deny_replay_headers([header::HeaderName::from_static("x-denied")]),
    );
    let first = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(first.headers.get_all(header::LINK).iter().count(), 2);
    assert!(first.headers.get(header::SET_COOKIE).is_some());
    let retry = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert!(retry.replayed());
    let links: Vec<_> = retry.headers.get_all(header::LINK).iter().collect();
    assert_eq!(
        links,
        vec!["</a>; rel=\"a\"", "</b>; rel=\"b\""],
        "order and count kept"
    );
    assert_eq!(
        retry.headers["x-bin"].as_bytes(),
        &[b'v', 0xff, 0xfe],
        "non-UTF-8 kept byte for byte"
    );
    assert!(
        retry.headers.get(header::SET_COOKIE).is_none(),
        "Set-Cookie is never replayed"
    );
    assert!(
        retry.headers.get(header::DATE).is_none(),
        "Date is not stored"
    );
    assert!(
        retry.headers.get("x-denied").is_none(),
        "denied header not replayed"
    );
    assert_eq!(retry.headers[header::CONTENT_TYPE], "application/json");
}

pub async fn no_content_replays_empty<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let req = || app::with_header(post("/pay", Some("k"), "{}"), "x-status", "204");
    let first = send(&h.router, req()).await;
    assert_eq!(first.status, StatusCode::NO_CONTENT);
    let retry = send(&h.router, req()).await;
    assert_eq!(retry.status, StatusCode::NO_CONTENT);
    assert!(retry.replayed());
    assert!(retry.body.is_empty());
    assert_eq!(h.runs(), 1);
}

pub async fn different_payload_is_422<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    assert_eq!(
        send(&h.router, post("/pay", Some("k"), "{\"amount\":1}"))
            .await
            .status,
        StatusCode::CREATED
    );
    let r = send(&h.router, post("/pay", Some("k"), "{\"amount\":2}")).await;
    assert_problem(
        &r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    // A fingerprinted header (Content-Type) counts as payload too.
    let mut req = post("/pay", Some("k"), "{\"amount\":1}");
    req.headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    assert_problem(
        &send(&h.router, req).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert_eq!(h.runs(), 1);
}

pub async fn different_payload_while_in_flight_is_422<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let slow = app::spawn_send(
        &h.router,
        app::delayed(post("/pay", Some("k"), "{\"v\":\"a\"}"), 400),
    );
    h.started.notified().await;
    let r = send(&h.router, post("/pay", Some("k"), "{\"v\":\"b\"}")).await;
    assert_problem(
        &r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(h.runs(), 1);
}

pub async fn changed_query_is_422<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    assert_eq!(
        send(&h.router, post("/pay?x=1", Some("k"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    let r = send(&h.router, post("/pay?x=2", Some("k"), "{}")).await;
    assert_problem(
        &r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    assert!(send(&h.router, post("/pay?x=1", Some("k"), "{}"))
        .await
        .replayed());
    assert_eq!(h.runs(), 1);
}

pub async fn in_flight_conflict_is_409<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let slow = app::spawn_send(&h.router, app::delayed(post("/pay", Some("k"), "{}"), 400));
    h.started.notified().await;
    let r = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    let first = slow.await.unwrap();
    // After completion, the retry replays.
    let again = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    assert_eq!(h.runs(), 1);
}

pub async fn in_flight_wait_replays<St: Store>(store: St) {
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .in_flight(InFlight::Wait(Duration::from_secs(5))),
    );
    let slow = app::spawn_send(&h.router, app::delayed(post("/pay", Some("k"), "{}"), 300));
    h.started.notified().await;
    let waiter = send(&h.router, post("/pay", Some("k"), "{}")).await;
    let first = slow.await.unwrap();
    assert_eq!(waiter.status, StatusCode::CREATED);
    assert_eq!(waiter.body, first.body);
    assert!(waiter.replayed());
    assert_eq!(h.runs(), 1);
}

pub async fn in_flight_wait_times_out_with_409<St: Store>(store: St) {
    let layer = IdempotencyLayer::new(store)
        .global_scope()
        .in_flight(InFlight::Wait(Duration::from_millis(150)));
    let h = Harness::new(layer);
    let slow = app::spawn_send(&h.router, app::delayed(post("/pay", Some("k"), "{}"), 1200));
    h.started.notified().await;
    let started = tokio::time::Instant::now();
    let r = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "waited the bound"
    );
    slow.await.unwrap();
    assert_eq!(h.runs(), 1);
}

pub async fn waiter_runs_after_release<St: Store>(store: St) {
    // The first run answers 400 (released); of the waiters, exactly one becomes the owner
    // and runs; the others replay its stored 201.
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .in_flight(InFlight::Wait(Duration::from_secs(5))),
    );
    let first = app::spawn_send(
        &h.router,
        app::with_header(
            app::delayed(post("/pay", Some("k"), "{}"), 300),
            "x-fail-first",
            "400",
        ),
    );
    h.started.notified().await;
    let waiters = join_all((0..8).map(|_| send(&h.router, post("/pay", Some("k"), "{}")))).await;
    assert_eq!(first.await.unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.runs(), 2, "the failed first run and exactly one waiter");
    let bodies: Vec<_> = waiters.iter().map(|r| (r.status, r.body.clone())).collect();
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "all waiters got one answer: {bodies:?}"
    );
    assert_eq!(bodies[0].0, StatusCode::CREATED);
    assert_eq!(
        waiters.iter().filter(|r| !r.replayed()).count(),
        1,
        "one waiter ran, the rest replayed"
    );
}

pub async fn concurrent_first_requests_run_once<St: Store>(store: St) {
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .in_flight(InFlight::Wait(Duration::from_secs(10))),
    );
    let requests = (0..64).map(|_| {
        let router = h.router.clone();
        tokio::spawn(async move {
            send(&router, app::delayed(post("/pay", Some("k"), "{}"), 100)).await
        })
    });
    let replies: Vec<Reply> = join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(h.runs(), 1, "exactly one execution");
    assert!(replies
        .iter()
        .all(|r| r.status == StatusCode::CREATED && r.body == replies[0].body));
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 63);
}

pub async fn client_error_releases_and_corrected_retry_runs<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    // Invalid JSON: the handler answers 400, the key is released before the response.
    let bad = send(&h.router, post("/pay", Some("k"), "{not json")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let fixed = send(&h.router, post("/pay", Some("k"), "{\"amount\":1}")).await;
    assert_eq!(fixed.status, StatusCode::CREATED);
    assert!(!fixed.replayed());
    assert_eq!(h.runs(), 2);
}

pub async fn server_error_is_released_by_default<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let req = || app::with_header(post("/pay", Some("k"), "{}"), "x-fail-first", "500");
    assert_eq!(
        send(&h.router, req()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(send(&h.router, req()).await.status, StatusCode::CREATED);
    assert_eq!(h.runs(), 2);
}

pub async fn successes_and_server_errors_replays_500<St: Store>(store: St) {
    let layer = IdempotencyLayer::new(store)
        .global_scope()
        .store_when(StorePolicy::SuccessesAndServerErrors);
    let h = Harness::new(layer);
    let req = || app::with_header(post("/pay", Some("k"), "{}"), "x-fail-first", "500");
    let first = send(&h.router, req()).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&h.router, req()).await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(h.runs(), 1);
}

pub async fn oversized_response_is_streamed_then_not_replayable<St: Store>(store: St) {
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .max_stored_response(1024),
    );
    let req = || app::with_header(post("/pay", Some("k"), "{}"), "x-body-size", "100000");
    let first = send(&h.router, req()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body.len(),
        100_000,
        "streamed whole to the first caller"
    );
    let retry = send(&h.router, req()).await;
    assert_problem(&retry, StatusCode::CONFLICT, "response-not-replayable");
    assert_eq!(h.runs(), 1, "never a second execution");
}

pub async fn handler_panic_releases_key<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let req = || app::with_header(post("/pay", Some("k"), "{}"), "x-panic-first", "1");
    let r = send(&h.router, req()).await;
    assert_problem(&r, StatusCode::INTERNAL_SERVER_ERROR, "handler-failed");
    let retry = send(&h.router, req()).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "released: the retry runs"
    );
    assert_eq!(h.runs(), 2);
}

// ---- SPEC section 4: scope ----

pub async fn tenants_do_not_share_scopes<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).tenant(app::bearer_tenant));
    let as_tenant = |t: &str| {
        app::with_header(
            post("/pay", Some("k"), "{}"),
            "authorization",
            &format!("Bearer {t}"),
        )
    };
    let a = send(&h.router, as_tenant("alice")).await;
    let b = send(&h.router, as_tenant("bob")).await;
    assert!(!a.replayed() && !b.replayed());
    assert_ne!(a.body, b.body);
    assert!(send(&h.router, as_tenant("alice")).await.replayed());
    assert_eq!(h.runs(), 2);
}

pub async fn routes_and_resources_do_not_share_scopes<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    for path in [
        "/pay",
        "/orders/1/cancel",
        "/orders/2/cancel",
        "/nested/pay",
    ] {
        let r = send(&h.router, post(path, Some("same-key"), "{}")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{path}");
        assert!(!r.replayed(), "{path} ran");
    }
    assert_eq!(h.runs(), 4);
    assert!(
        send(&h.router, post("/orders/2/cancel", Some("same-key"), "{}"))
            .await
            .replayed()
    );
}

pub async fn resolver_without_tenant_is_500<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).tenant(app::bearer_tenant));
    let r = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(
        &r,
        StatusCode::INTERNAL_SERVER_ERROR,
        "scope-not-configured",
    );
    assert_eq!(h.runs(), 0);
}

// ---- SPEC section 6: TTL, detached work, leases ----

pub async fn ttl_expiry_runs_again<St: Store>(store: St) {
    let layer = IdempotencyLayer::new(store)
        .global_scope()
        .lease(Duration::from_millis(300))
        .ttl(Duration::from_millis(400));
    let h = Harness::new(layer);
    send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert!(send(&h.router, post("/pay", Some("k"), "{}"))
        .await
        .replayed());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert!(!after.replayed(), "expired record: the handler runs again");
    assert_eq!(h.runs(), 2);
}

pub async fn hang_up_mid_handler_still_stores<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let router = h.router.clone();
    let call = tokio::spawn(async move {
        send(&router, app::delayed(post("/pay", Some("k"), "{}"), 300)).await
    });
    h.started.notified().await;
    call.abort(); // the client hangs up while the handler runs
    assert!(call.await.unwrap_err().is_cancelled());
    // Bounded: if the hang-up cancelled the work, this fails instead of hanging.
    tokio::time::timeout(Duration::from_secs(5), h.finished.notified())
        .await
        .expect("the handler finished although the client hung up");
    // The record lands right after the handler: retry until it does (a 409 meanwhile),
    // bounded, never a second run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let retry = loop {
        let retry = send(&h.router, post("/pay", Some("k"), "{}")).await;
        if retry.replayed() || tokio::time::Instant::now() > deadline {
            break retry;
        }
        assert_problem(&retry, StatusCode::CONFLICT, "request-in-flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        retry.replayed(),
        "the result was stored although the caller left: {retry:?}"
    );
    assert_eq!(h.runs(), 1);
}

pub async fn fencing_token_reaches_handler<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let r = send(
        &h.router,
        app::with_header(post("/pay", Some("k"), "{}"), "x-echo-token", "1"),
    )
    .await;
    let token = r
        .headers
        .get("x-token")
        .expect("handler saw a FencingToken extension");
    assert_eq!(token.len(), 32);
}

pub async fn renewal_keeps_lease_past_its_length<St: Store>(store: St) {
    let layer = IdempotencyLayer::new(store)
        .global_scope()
        .lease(Duration::from_millis(600))
        .renew_every(Duration::from_millis(150));
    let h = Harness::new(layer);
    // The handler runs three leases long; a renewal has 450 ms of slack to land.
    let slow = app::spawn_send(&h.router, app::delayed(post("/pay", Some("k"), "{}"), 1800));
    h.started.notified().await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = send(&h.router, post("/pay", Some("k"), "{}")).await;
        assert_problem(&r, StatusCode::CONFLICT, "request-in-flight");
    }
    slow.await.unwrap();
    assert!(send(&h.router, post("/pay", Some("k"), "{}"))
        .await
        .replayed());
    assert_eq!(h.runs(), 1);
}

pub async fn lost_lease_lets_second_owner_run_and_fences_stale_one<St: Store>(store: St) {
    let layer = IdempotencyLayer::new(store)
        .global_scope()
        .lease(Duration::from_millis(200))
        .no_renewal();
    let h = Harness::new(layer);
    let stale = app::spawn_send(&h.router, app::delayed(post("/pay", Some("k"), "{}"), 700));
    h.started.notified().await;
    tokio::time::sleep(Duration::from_millis(350)).await; // the lease lapses
    let second = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert!(!second.replayed(), "the second owner ran");
    let stale = stale.await.unwrap();
    assert_eq!(
        stale.status,
        StatusCode::CREATED,
        "the stale owner's caller still gets its answer"
    );
    assert_ne!(stale.body, second.body);
    let retry = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_eq!(
        retry.body, second.body,
        "the stale owner could not overwrite the newer record"
    );
    assert_eq!(h.runs(), 2);
}

pub async fn store_level_fencing_and_fresh_tokens<St: Store>(store: St) {
    // A key unique to this run, so a shared Redis never sees a leftover.
    let key = FencingToken::generate().to_hex();
    let scope = ScopeHash::new(
        None,
        &axum::http::Method::POST,
        "/store-level",
        key.as_bytes(),
    );
    let fp = Fingerprint::from_bytes([3; 32]);
    let lease = Duration::from_millis(150);
    let t1 = FencingToken::generate();
    assert_eq!(
        store.reserve(&scope, &fp, t1, lease.into()).await.unwrap(),
        Reservation::Reserved
    );
    assert!(store.release(&scope, t1).await.unwrap());
    let t2 = FencingToken::generate();
    assert_ne!(t1, t2, "a released and re-reserved key gets a fresh token");
    assert_eq!(
        store.reserve(&scope, &fp, t2, lease.into()).await.unwrap(),
        Reservation::Reserved
    );
    assert!(
        !store.release(&scope, t1).await.unwrap(),
        "stale token cannot release"
    );
    assert!(
        !store.renew(&scope, t1, lease).await.unwrap(),
        "stale token cannot renew"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let t3 = FencingToken::generate();
    // t2's lease lapsed; t3's must not before it completes below, however slow the
    // machine (a 150 ms lease here made the test flaky under load).
    assert_eq!(
        store
            .reserve(&scope, &fp, t3, Duration::from_secs(30).into())
            .await
            .unwrap(),
        Reservation::Reserved
    );
    let rec = Record::NotReplayable;
    let ttl = Duration::from_secs(5);
    assert_eq!(
        store.complete(&scope, t2, &rec, ttl).await.unwrap(),
        tower_idempotency::store::Completion::Fenced
    );
    assert_eq!(
        store.complete(&scope, t3, &rec, ttl).await.unwrap(),
        tower_idempotency::store::Completion::Stored
    );
    assert_eq!(
        store.complete(&scope, t3, &rec, ttl).await.unwrap(),
        tower_idempotency::store::Completion::Stored
    );
    let again = store
        .reserve(&scope, &fp, FencingToken::generate(), lease.into())
        .await
        .unwrap();
    assert_eq!(again, Reservation::Completed(Record::NotReplayable));
}

// ---- SPEC section 6 (amended 2026-12-01): hardening ----

/// A record the store cannot decode (e.g. written by a newer version during a rolling
/// upgrade) is a 503 even under `fail_open`: passing it through would run the handler a
/// second time for a key that already completed.
pub async fn fail_open_never_passes_an_undecodable_record<St: Store>(store: St) {
    use faults::{Fault, Faults, Op};
    let store = Faults::new(store).fail(Op::Reserve, |_, _| Some(Fault::Decode));
    let h = Harness::new(
        IdempotencyLayer::new(store.clone())
            .global_scope()
            .fail_open(),
    );
    let r = send(&h.router, post("/pay", Some("k"), "{}")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(
        h.runs(),
        0,
        "never a pass-through for an undecodable record"
    );
    assert_eq!(store.injected(), 1);
}

/// Once the store said "in flight", store errors while waiting keep the waiter waiting
/// (or end in 503): never a pass-through while the owner runs, even under `fail_open`.
pub async fn store_errors_while_waiting_never_pass_through<St: Store>(store: St) {
    use faults::{Fault, Faults, Op};
    let owner = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    // The waiter's store fails every reserve after the first in-flight answer, three times.
    let flaky = Faults::new(store).fail(Op::Reserve, |n, last| {
        (matches!(last, Some(Reservation::InFlight)) && (1..=3).contains(&n))
            .then_some(Fault::Backend)
    });
    let waiter = owner.sharing_counters(
        IdempotencyLayer::new(flaky.clone())
            .global_scope()
            .fail_open()
            .in_flight(InFlight::Wait(Duration::from_secs(10))),
    );
    let slow = app::spawn_send(
        &owner.router,
        app::delayed(post("/pay", Some("k"), "{}"), 600),
    );
    owner.started.notified().await;
    let r = send(&waiter.router, post("/pay", Some("k"), "{}")).await;
    let first = slow.await.unwrap();
    assert_eq!(owner.runs(), 1, "the waiter never ran the handler itself");
    assert!(flaky.injected() >= 1, "the waiter saw store errors");
    assert!(r.replayed(), "the waiter got the owner's answer: {r:?}");
    assert_eq!(r.body, first.body);
}

/// The handler returned a status the policy stores and its body then failed: the
/// operation happened, so the key is not released; retries get 409
/// `response-not-replayable`, never a second run.
pub async fn body_error_after_a_stored_status_is_not_replayable<St: Store>(store: St) {
    body_failure_is_not_replayable(store, "error").await
}

/// As above, with a body that panics mid-stream.
pub async fn body_panic_after_a_stored_status_is_not_replayable<St: Store>(store: St) {
    body_failure_is_not_replayable(store, "panic").await
}

async fn body_failure_is_not_replayable<St: Store>(store: St, how: &str) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let req = || app::with_header(post("/pay", Some("k"), "{}"), "x-body-fail", how);
    let first = send(&h.router, req()).await;
    assert!(
        first.body_error.is_some() || first.status.is_server_error(),
        "the first caller learns that the response broke: {first:?}"
    );
    for _ in 0..2 {
        let retry = send(&h.router, req()).await;
        assert_problem(&retry, StatusCode::CONFLICT, "response-not-replayable");
    }
    assert_eq!(h.runs(), 1, "the operation ran once and is never run again");
}

/// `InFlight::Wait(Duration::MAX)` is a valid (if unwise) policy: the deadline saturates
/// instead of overflowing `Instant + bound`.
pub async fn huge_wait_bound_does_not_panic<St: Store>(store: St) {
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .in_flight(InFlight::Wait(Duration::MAX)),
    );
    let slow = app::spawn_send(&h.router, app::delayed(post("/pay", Some("k"), "{}"), 300));
    let started = tokio::time::timeout(Duration::from_secs(5), h.started.notified()).await;
    if started.is_err() {
        panic!("the handler never started: {:?}", slow.await.unwrap());
    }
    let waiter = send(&h.router, post("/pay", Some("k"), "{}")).await;
    let first = slow.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(waiter.replayed(), "{waiter:?}");
    assert_eq!(h.runs(), 1);
}

/// Trailers are not stored (a replay has none), but the first caller gets them.
pub async fn response_trailers_reach_the_first_caller<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store).global_scope());
    let req = || app::with_header(post("/pay", Some("k"), "{}"), "x-trailers", "abc123");
    let first = send(&h.router, req()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let trailers = first.trailers.expect("the first caller gets the trailers");
    assert_eq!(trailers["x-checksum"], "abc123");
    let retry = send(&h.router, req()).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
}

/// Of many concurrent reserves of one scope, exactly one is `Reserved` — in every one of
/// many rounds, so a check-then-write reserve cannot slip through by luck.
pub async fn reserve_is_atomic_over_many_rounds<St: Store>(store: St) {
    let fp = Fingerprint::from_bytes([5; 32]);
    let lease = Duration::from_secs(30);
    for round in 0..100 {
        let key = FencingToken::generate().to_hex();
        let scope = ScopeHash::new(None, &axum::http::Method::POST, "/atomic", key.as_bytes());
        let answers = join_all((0..16).map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .reserve(&scope, &fp, FencingToken::generate(), lease.into())
                    .await
                    .unwrap()
            })
        }))
        .await;
        let reserved = answers
            .into_iter()
            .map(Result::unwrap)
            .filter(|a| *a == Reservation::Reserved)
            .count();
        assert_eq!(reserved, 1, "round {round}: {reserved} owners");
    }
}

/// A waiter is woken by the store's notification (pub/sub, `Notify`) when the owner
/// completes, not found later by its back-off polling: counted by the layer's
/// `idempotency_wait_wakeups_total{via}` metric, on a route of this test's own.
pub async fn waiter_is_woken_by_the_store_not_by_polling<St: Store>(store: St) {
    crate::support::metrics::install();
    let route = format!("/wake-{}", FencingToken::generate().to_hex());
    let h = Harness::on(
        IdempotencyLayer::new(store)
            .global_scope()
            .in_flight(InFlight::Wait(Duration::from_secs(10))),
        &route,
    );
    // Long enough that a poll-only waiter has backed off to its 250 ms poll interval.
    let slow = app::spawn_send(&h.router, app::delayed(post(&route, Some("k"), "{}"), 1500));
    h.started.notified().await;
    let waiter = send(&h.router, post(&route, Some("k"), "{}")).await;
    slow.await.unwrap();
    assert!(waiter.replayed(), "{waiter:?}");
    let notified = crate::support::metrics::counter(
        "idempotency_wait_wakeups_total",
        &[("route", &route), ("via", "notification")],
    );
    assert!(
        notified >= 1,
        "the waiter was woken by the store's notification"
    );
    assert_eq!(h.runs(), 1);
}

/// A reserve sent again with the same token (a client library's re-send after a
/// reconnect, or a reserve that timed out here but ran in the store) is answered
/// `Reserved`: its lease is its own. Another token still sees it in flight.
pub async fn a_resent_reserve_is_answered_reserved<St: Store>(store: St) {
    let key = FencingToken::generate().to_hex();
    let scope = ScopeHash::new(None, &axum::http::Method::POST, "/resent", key.as_bytes());
    let fp = Fingerprint::from_bytes([6; 32]);
    let lease = Duration::from_secs(30);
    let token = FencingToken::generate();
    for _ in 0..2 {
        let answer = store
            .reserve(&scope, &fp, token, lease.into())
            .await
            .unwrap();
        assert_eq!(answer, Reservation::Reserved);
    }
    let other = store
        .reserve(&scope, &fp, FencingToken::generate(), lease.into())
        .await
        .unwrap();
    assert_eq!(other, Reservation::InFlight);
    assert!(store.release(&scope, token).await.unwrap());
}

// ---- SPEC section 11: operators and uncertainty ----

/// The scope and fingerprint the layer computes for `post(path, Some(key), body)` on a
/// global-scope route: what an operator (or a dead owner) uses straight on the store.
pub fn scope_and_fingerprint(path: &str, key: &str, body: &str) -> (ScopeHash, Fingerprint) {
    let probe = post(path, Some(key), body);
    let scope = ScopeHash::new(None, probe.method(), path, key.as_bytes());
    let fingerprint = Fingerprint::new(
        probe.method(),
        path,
        None,
        probe.headers(),
        &[header::CONTENT_TYPE],
        body.as_bytes(),
    );
    (scope, fingerprint)
}

/// A unique key per call: stores shared between tests (Redis) never see a leftover.
fn fresh_key(name: &str) -> String {
    format!("{name}-{}", FencingToken::generate().to_hex())
}

/// A dead owner: reserved straight in the store with a short lease, as a route that
/// refuses uncertain keys would (`keep_lapsed`), then gone without a complete or a
/// release. Returns its token once the lease has lapsed.
async fn dead_owner<St: Store>(
    store: &St,
    scope: &ScopeHash,
    fingerprint: &Fingerprint,
    keep: bool,
) -> FencingToken {
    let token = FencingToken::generate();
    let lease = Duration::from_millis(200);
    let terms = if keep {
        LeaseTerms::new(lease).keep_lapsed(Duration::from_secs(60))
    } else {
        LeaseTerms::new(lease)
    };
    assert_eq!(
        store
            .reserve(scope, fingerprint, token, terms)
            .await
            .unwrap(),
        Reservation::Reserved
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    token
}

/// A route that refuses uncertain keys: after its owner died mid-request, the key answers
/// 409 `operation-uncertain` (at once, also in wait mode; 422 for another payload) and
/// `inspect` says uncertain, until an operator resolves it (the retry then replays the
/// operator's answer) or forgets it (the retry runs). The handler never runs meanwhile.
pub async fn uncertain_keys_are_refused_until_resolved_or_forgotten<St: Store>(store: St) {
    let refuse = |store: St| {
        IdempotencyLayer::new(store)
            .global_scope()
            .uncertain(Uncertain::Refuse)
            .in_flight(InFlight::Wait(Duration::from_secs(10)))
    };
    let h = Harness::new(refuse(store.clone()));
    for decision in ["resolve", "forget"] {
        let key = fresh_key(decision);
        let (scope, fp) = scope_and_fingerprint("/pay", &key, "{}");
        let owner = dead_owner(&store, &scope, &fp, true).await;
        let started = tokio::time::Instant::now();
        let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
        assert_problem(&r, StatusCode::CONFLICT, "operation-uncertain");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered without waiting out the wait bound"
        );
        let other = send(&h.router, post("/pay", Some(&key), "{\"x\":1}")).await;
        assert_problem(
            &other,
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
        );
        match store.inspect(&scope).await.unwrap() {
            KeyState::Uncertain { owner: o, .. } => assert_eq!(o, owner),
            other => panic!("{decision}: {other:?}"),
        }
        assert_eq!(h.runs(), 0);
        if decision == "resolve" {
            let answer = Record::Response(tower_idempotency::store::StoredResponse::new(
                StatusCode::CREATED,
                vec![(header::CONTENT_TYPE, "application/json".parse().unwrap())],
                bytes::Bytes::from_static(b"{\"resolved\":true}"),
            ));
            let ttl = Duration::from_secs(60);
            assert_eq!(
                store.resolve(&scope, &answer, ttl).await.unwrap(),
                Resolved::Stored
            );
            let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
            assert!(r.replayed(), "{r:?}");
            assert_eq!(r.body, "{\"resolved\":true}");
            // The dead owner, alive after all, cannot overwrite the operator's answer.
            let late = store.complete(&scope, owner, &Record::NotReplayable, ttl);
            assert_eq!(
                late.await.unwrap(),
                tower_idempotency::store::Completion::Fenced
            );
            let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
            assert_eq!(r.body, "{\"resolved\":true}");
        } else {
            assert!(store.forget(&scope).await.unwrap());
            let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
            assert_eq!(r.status, StatusCode::CREATED);
            assert!(!r.replayed());
            assert_eq!(h.runs(), 1);
        }
    }
}

/// The default policy runs an uncertain key again: a dead owner's lapsed lease is taken
/// over, whether or not its reserve kept it.
pub async fn uncertain_keys_run_again_by_default<St: Store>(store: St) {
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    for keep in [false, true] {
        let key = fresh_key("run-again");
        let (scope, fp) = scope_and_fingerprint("/pay", &key, "{}");
        dead_owner(&store, &scope, &fp, keep).await;
        let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
        assert_eq!(r.status, StatusCode::CREATED, "keep {keep}: {r:?}");
        assert!(!r.replayed());
    }
    assert_eq!(h.runs(), 2);
}

/// An owner whose kept lease lapsed, but which is alive after all (it was slow, not
/// dead): nobody took the key, so its renewal and its completion still work, and the
/// retries replay what really happened.
pub async fn a_lapsed_owner_alive_after_all_completes<St: Store>(store: St) {
    let key = fresh_key("late");
    let (scope, fp) = scope_and_fingerprint("/pay", &key, "{}");
    let owner = dead_owner(&store, &scope, &fp, true).await;
    assert!(matches!(
        store.inspect(&scope).await.unwrap(),
        KeyState::Uncertain { .. }
    ));
    assert!(store
        .renew(&scope, owner, Duration::from_secs(5))
        .await
        .unwrap());
    assert!(matches!(
        store.inspect(&scope).await.unwrap(),
        KeyState::InFlight { owner: Some(o), .. } if o == owner
    ));
    let ttl = Duration::from_secs(60);
    let done = store.complete(&scope, owner, &Record::NotReplayable, ttl);
    assert_eq!(
        done.await.unwrap(),
        tower_idempotency::store::Completion::Stored
    );
    let h = Harness::new(
        IdempotencyLayer::new(store)
            .global_scope()
            .uncertain(Uncertain::Refuse),
    );
    let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
    assert_problem(&r, StatusCode::CONFLICT, "response-not-replayable");
}

/// `inspect`, `forget` and `resolve` through every state of a key: absent, in flight
/// (with its owner and lease, where the store can tell), completed (status, size, age,
/// expiry), forgotten; `resolve` refuses an absent key and a live lease.
pub async fn operators_inspect_forget_and_resolve<St: Store>(store: St) {
    let key = fresh_key("ops");
    let (scope, _) = scope_and_fingerprint("/pay", &key, "{}");
    assert_eq!(store.inspect(&scope).await.unwrap(), KeyState::Absent);
    assert!(!store.forget(&scope).await.unwrap());
    let ttl = Duration::from_secs(60);
    let answer = Record::NotReplayable;
    assert_eq!(
        store.resolve(&scope, &answer, ttl).await.unwrap(),
        Resolved::Absent
    );
    let h = Harness::new(IdempotencyLayer::new(store.clone()).global_scope());
    let first = app::spawn_send(&h.router, app::delayed(post("/pay", Some(&key), "{}"), 600));
    h.started.notified().await;
    match store.inspect(&scope).await.unwrap() {
        KeyState::InFlight {
            owner,
            lease_remaining,
        } => {
            // Stores that see the owner's row say who holds it and for how long.
            if let Some(lease) = lease_remaining {
                assert!(lease <= Duration::from_secs(30), "{lease:?}");
            }
            let _ = owner;
        }
        other => panic!("in flight: {other:?}"),
    }
    assert_eq!(
        store.resolve(&scope, &answer, ttl).await.unwrap(),
        Resolved::InFlight,
        "a live lease is not overridden"
    );
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    match store.inspect(&scope).await.unwrap() {
        KeyState::Completed {
            record: Record::Response(response),
            age,
            expires_in,
        } => {
            assert_eq!(response.status, StatusCode::CREATED);
            assert_eq!(response.body, first.body);
            assert!(
                age.is_none_or(|age| age < Duration::from_secs(30)),
                "{age:?}"
            );
            assert!(expires_in > Duration::from_secs(3600), "{expires_in:?}");
        }
        other => panic!("completed: {other:?}"),
    }
    // An operator corrects the answer; the retry replays it.
    assert_eq!(
        store.resolve(&scope, &answer, ttl).await.unwrap(),
        Resolved::Stored
    );
    let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
    assert_problem(&r, StatusCode::CONFLICT, "response-not-replayable");
    assert!(store.forget(&scope).await.unwrap());
    assert_eq!(store.inspect(&scope).await.unwrap(), KeyState::Absent);
    let r = send(&h.router, post("/pay", Some(&key), "{}")).await;
    assert!(!r.replayed(), "forgotten: the next request runs");
    assert_eq!(h.runs(), 2);
}
