//! Proof that each check can fail: a small idempotent payments API written here by hand
//! (a `Mutex<HashMap>`, no layer), with one knob per rule. With every knob off it passes
//! every check; each test turns one knob and sees exactly that rule's check fail (or
//! warn, for the rules the draft does not require).
//!
//! Its API is the example's: `POST /payments` `{"amount", "currency", "delay_ms"?}` with
//! `Authorization: Bearer <tenant>` and a required `Idempotency-Key`, 201 with a
//! `Location`; `GET /payments` lists the tenant's payments; 409 in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotency_check::{run, Check, InFlightMode, Report, Verdict};
use serde_json::{json, Value};

use crate::support::{assert_all_pass, assert_fails_exactly, payments_config, Server};

/// The handler's own work, on top of `delay_ms`: long enough that requests sent at once
/// overlap it.
const WORK: Duration = Duration::from_millis(20);
/// How long a stored response lives.
const TTL: Duration = Duration::from_secs(1);
/// The slow body's `delay_ms`.
const SLOW_MS: u64 = 600;

/// What the server gets wrong; `Breaks::default()` gets nothing wrong.
#[derive(Clone, Copy, Debug, Default)]
struct Breaks {
    /// Check-then-set: nothing marks a key while its first request runs.
    race: bool,
    /// What a reused key with another body gets.
    mismatch: Mismatch,
    /// Replays carry no `Idempotent-Replayed`.
    no_marker: bool,
    /// The first answer says `Idempotent-Replayed: true` too.
    marks_first: bool,
    /// Replays lose the `Location` header.
    drops_location: bool,
    /// Keys are not scoped by tenant.
    tenant_leak: bool,
    /// A key over 255 bytes overflows the store's column: 500.
    long_key_500: bool,
    /// Two key fields: the first one is used.
    accepts_two_keys: bool,
    /// A 4xx is stored like a success, so the key is used up.
    stores_4xx: bool,
    /// Stored responses never expire.
    never_expires: bool,
    /// How its own errors look.
    errors: Errors,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mismatch {
    #[default]
    Unprocessable,
    BadRequest,
    Replay,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Errors {
    #[default]
    Problem,
    Plain,
    /// problem+json whose `status` member disagrees with the response.
    WrongStatus,
}

enum Entry {
    Pending {
        body: Bytes,
    },
    Done {
        body: Bytes,
        status: StatusCode,
        location: Option<HeaderValue>,
        response: Bytes,
        at: Instant,
    },
}

#[derive(Default)]
struct Api {
    breaks: Breaks,
    entries: Mutex<HashMap<(String, String), Entry>>,
    payments: Mutex<HashMap<String, Vec<Value>>>,
    next: AtomicU64,
}

fn app(breaks: Breaks) -> Router {
    let api = Arc::new(Api {
        breaks,
        ..Api::default()
    });
    Router::new()
        .route("/payments", post(create).get(list))
        .with_state(api)
}

/// A bare handler, no idempotency at all.
fn bare() -> Router {
    let next = Arc::new(AtomicU64::new(0));
    Router::new().route(
        "/payments",
        post(move |body: Bytes| {
            let next = next.clone();
            async move {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => {
                        let delay = v.get("delay_ms").and_then(Value::as_u64).unwrap_or(0);
                        tokio::time::sleep(WORK + Duration::from_millis(delay.min(5_000))).await;
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        (
                            StatusCode::CREATED,
                            Json(json!({ "id": format!("pay_{n}") })),
                        )
                            .into_response()
                    }
                    Err(_) => StatusCode::BAD_REQUEST.into_response(),
                }
            }
        }),
    )
}

fn tenant(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

fn problem(api: &Api, status: StatusCode, slug: &str) -> Response {
    let body = json!({
        "type": format!("https://broken.example/problems/{slug}"),
        "title": slug,
        "status": match api.breaks.errors {
            Errors::WrongStatus => 500,
            _ => status.as_u16(),
        },
        "detail": slug,
    });
    let content_type = match api.breaks.errors {
        Errors::Plain => "text/plain",
        _ => "application/problem+json",
    };
    let body = match api.breaks.errors {
        Errors::Plain => slug.to_string(),
        _ => body.to_string(),
    };
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn replay(api: &Api, entry: &Entry) -> Response {
    let Entry::Done {
        status,
        location,
        response,
        ..
    } = entry
    else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut reply = (*status, response.clone()).into_response();
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let (Some(location), false) = (location, api.breaks.drops_location) {
        headers.insert(header::LOCATION, location.clone());
    }
    if !api.breaks.no_marker {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    reply
}

async fn create(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(tenant) = tenant(&headers) else {
        return problem(&api, StatusCode::UNAUTHORIZED, "unauthorized");
    };
    let keys: Vec<&HeaderValue> = headers.get_all("idempotency-key").iter().collect();
    let key = match keys.as_slice() {
        [] => return problem(&api, StatusCode::BAD_REQUEST, "idempotency-key-missing"),
        [key] => *key,
        [key, ..] if api.breaks.accepts_two_keys => *key,
        _ => return problem(&api, StatusCode::BAD_REQUEST, "idempotency-key-invalid"),
    };
    let key = key.as_bytes();
    if key.len() > 255 && api.breaks.long_key_500 {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "value too long for type character varying(255)",
        )
            .into_response();
    }
    if key.is_empty() || key.len() > 255 || !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return problem(&api, StatusCode::BAD_REQUEST, "idempotency-key-invalid");
    }
    let key = String::from_utf8_lossy(key).into_owned();
    let scope = if api.breaks.tenant_leak {
        (String::new(), key)
    } else {
        (tenant.clone(), key)
    };

    {
        let mut entries = api.entries.lock().unwrap();
        let expired = matches!(
            entries.get(&scope),
            Some(Entry::Done { at, .. }) if at.elapsed() >= TTL && !api.breaks.never_expires
        );
        if expired {
            entries.remove(&scope);
        }
        match entries.get(&scope) {
            Some(entry @ Entry::Done { body: first, .. }) => {
                if *first == body || api.breaks.mismatch == Mismatch::Replay {
                    return replay(&api, entry);
                }
                return match api.breaks.mismatch {
                    Mismatch::BadRequest => {
                        problem(&api, StatusCode::BAD_REQUEST, "idempotency-key-reused")
                    }
                    _ => problem(
                        &api,
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency-key-reused",
                    ),
                };
            }
            Some(Entry::Pending { body: first }) if *first != body => {
                return problem(
                    &api,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency-key-reused",
                );
            }
            Some(Entry::Pending { .. }) => {
                return problem(&api, StatusCode::CONFLICT, "request-in-flight");
            }
            None if api.breaks.race => {}
            None => {
                entries.insert(scope.clone(), Entry::Pending { body: body.clone() });
            }
        }
    }

    let (status, location, response) = operate(&api, &tenant, &body).await;
    {
        let mut entries = api.entries.lock().unwrap();
        if status.is_success() || (status.is_client_error() && api.breaks.stores_4xx) {
            let entry = Entry::Done {
                body,
                status,
                location: location.clone(),
                response: response.clone(),
                at: Instant::now(),
            };
            entries.insert(scope, entry);
        } else {
            entries.remove(&scope);
        }
    }
    let mut reply = (status, response).into_response();
    let headers = reply.headers_mut();
    let content_type = if status.is_success() {
        "application/json"
    } else {
        "application/problem+json"
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(location) = location {
        headers.insert(header::LOCATION, location);
    }
    if api.breaks.marks_first {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    reply
}

/// The payment itself: 400 for a body it cannot read, else one payment for the tenant.
async fn operate(
    api: &Api,
    tenant: &str,
    body: &Bytes,
) -> (StatusCode, Option<HeaderValue>, Bytes) {
    let parsed: Option<(u64, String, u64)> =
        serde_json::from_slice::<Value>(body).ok().and_then(|v| {
            Some((
                v.get("amount")?.as_u64()?,
                v.get("currency")?.as_str()?.to_owned(),
                v.get("delay_ms").and_then(Value::as_u64).unwrap_or(0),
            ))
        });
    let Some((amount, currency, delay_ms)) = parsed else {
        let problem = json!({ "type": "about:blank", "title": "Bad Request", "status": 400 });
        return (
            StatusCode::BAD_REQUEST,
            None,
            Bytes::from(problem.to_string()),
        );
    };
    tokio::time::sleep(WORK + Duration::from_millis(delay_ms.min(5_000))).await;
    let id = format!("pay_{}", api.next.fetch_add(1, Ordering::Relaxed));
    let payment = json!({ "id": id, "amount": amount, "currency": currency });
    api.payments
        .lock()
        .unwrap()
        .entry(tenant.to_owned())
        .or_default()
        .push(payment.clone());
    let location = HeaderValue::from_str(&format!("/payments/{id}")).ok();
    (
        StatusCode::CREATED,
        location,
        Bytes::from(payment.to_string()),
    )
}

async fn list(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    let Some(tenant) = tenant(&headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let payments = api
        .payments
        .lock()
        .unwrap()
        .get(&tenant)
        .cloned()
        .unwrap_or_default();
    Json(payments).into_response()
}

/// Runs the checker (in-flight `conflict`: this server answers 409) against a server
/// with `breaks`.
async fn check(breaks: Breaks) -> Report {
    check_router(app(breaks), None).await
}

async fn check_router(router: Router, ttl: Option<Duration>) -> Report {
    let server = Server::router(router).await;
    let mut config = payments_config(&server, SLOW_MS).in_flight(InFlightMode::Conflict);
    if let Some(ttl) = ttl {
        config = config.ttl(ttl);
    }
    let report = run(&config).await.unwrap();
    server.stop().await;
    report
}

fn got(report: &Report, check: Check) -> String {
    report.outcome(check).unwrap().got.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_broken_every_check_passes() {
    let report = check_router(app(Breaks::default()), Some(TTL)).await;
    assert_all_pass(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_then_set_race_fails_concurrency_and_in_flight() {
    let report = check(Breaks {
        race: true,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::Concurrency, Check::InFlight]);
    let concurrency = got(&report, Check::Concurrency);
    assert!(
        concurrency.contains("different 2xx bodies"),
        "{concurrency}"
    );
    assert!(got(&report, Check::InFlight).contains("second operation"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_for_another_payload_fails_payload_mismatch() {
    let report = check(Breaks {
        mismatch: Mismatch::Replay,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::PayloadMismatch]);
    assert!(got(&report, Check::PayloadMismatch).contains("replayed the first answer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_for_another_payload_fails_payload_mismatch() {
    let report = check(Breaks {
        mismatch: Mismatch::BadRequest,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::PayloadMismatch]);
    assert!(got(&report, Check::PayloadMismatch).contains("the draft asks 422"));
}

/// The draft requires no marker: a warning, and the run passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_without_the_marker_warns() {
    let report = check(Breaks {
        no_marker: true,
        ..Breaks::default()
    })
    .await;
    assert_eq!(
        report.with(Verdict::Warn),
        vec![Check::ReplayMarker],
        "{report}"
    );
    assert!(report.passed(), "{report}");
    assert_eq!(report.exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_first_answer_fails_first_unmarked() {
    let report = check(Breaks {
        marks_first: true,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::FirstUnmarked]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_without_location_fails_replay_headers() {
    let report = check(Breaks {
        drops_location: true,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::ReplayHeaders]);
    assert!(got(&report, Check::ReplayHeaders).contains("location missing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_leak_fails_tenant_scope() {
    let report = check(Breaks {
        tenant_leak: true,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::TenantScope]);
    let scope = got(&report, Check::TenantScope);
    assert!(
        scope.contains("replay") || scope.contains("leak"),
        "{scope}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_on_a_long_key_fails_key_too_long() {
    let report = check(Breaks {
        long_key_500: true,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::KeyTooLong]);
    assert!(got(&report, Check::KeyTooLong).starts_with("500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accepted_key_fields_fail_key_two_fields() {
    let report = check(Breaks {
        accepts_two_keys: true,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::KeyTwoFields]);
    assert!(got(&report, Check::KeyTwoFields).contains("accepted (1 execution(s))"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_that_burns_the_key_fails_error_releases_key() {
    let report = check(Breaks {
        stores_4xx: true,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&report, &[Check::ErrorReleasesKey]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_never_expires_fails_expiry() {
    let broken = Breaks {
        never_expires: true,
        ..Breaks::default()
    };
    let report = check_router(app(broken), Some(TTL)).await;
    assert_fails_exactly(&report, &[Check::Expiry]);
    assert!(got(&report, Check::Expiry).contains("still replayed"));
}

/// Errors in the API's own format: a warning (the draft shows problem+json, it does not
/// require it); problem+json that contradicts its response: a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_that_are_not_problem_json_warn_and_malformed_ones_fail() {
    let plain = check(Breaks {
        errors: Errors::Plain,
        ..Breaks::default()
    })
    .await;
    assert_eq!(
        plain.with(Verdict::Warn),
        vec![Check::ProblemJson],
        "{plain}"
    );
    assert!(plain.passed(), "{plain}");
    let malformed = check(Breaks {
        errors: Errors::WrongStatus,
        ..Breaks::default()
    })
    .await;
    assert_fails_exactly(&malformed, &[Check::ProblemJson]);
}

/// A handler with no idempotency at all fails nearly everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_handler_fails_the_idempotency_checks() {
    let report = check_router(bare(), None).await;
    let failed = report.with(Verdict::Fail);
    for check in [
        Check::Replay,
        Check::PayloadMismatch,
        Check::Concurrency,
        Check::InFlight,
        Check::KeyMissing,
        Check::KeyEmpty,
        Check::KeyTooLong,
        Check::KeyControlChar,
        Check::KeyTwoFields,
    ] {
        assert!(failed.contains(&check), "{check} did not fail\n{report}");
    }
}
