//! A bounded soak of the example payments API on Redis, restarted once mid-run.
//!
//! Its own `redis-server` (AOF on, `appendfsync always`, so a restart keeps every
//! acknowledged record), the example app served over TCP, and concurrent HTTP clients
//! sending a mix of new keys, retries of known keys (often while the first is still in
//! flight) and conflicting payloads. At the end every key is retried until it has an
//! answer; then executions must equal the distinct (tenant, key) pairs and every retry
//! must have got the first answer. Prints one summary line.
//!
//! Redis is killed halfway and kept down for 2.5 s. Default 30 s; `SOAK_SECS=600 cargo test --all-features --test soak -- --nocapture` for
//! a longer run.
#![cfg(feature = "redis")]

use crate::payments;
use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;

const TENANTS: usize = 4;
const CLIENTS: usize = 16;

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// (tenant, key) and what it was first sent with, plus the id of its first 201.
type KeyState = ((usize, String), (Payload, Option<String>));

#[derive(Default)]
struct Ledger {
    /// (tenant, key) → (payload, the id of the first 201 seen).
    keys: HashMap<(usize, String), (Payload, Option<String>)>,
    requests: u64,
    mismatched_answers: u64,
    errors: BTreeMap<String, u64>,
}

/// What a key was first sent with; retries send exactly this again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Payload {
    amount: u64,
    delay_ms: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic per client, no dependency.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

async fn pay(
    http: &Http,
    addr: SocketAddr,
    tenant: usize,
    key: &str,
    payload: Payload,
) -> Result<(StatusCode, Value), String> {
    let body = json!({"amount": payload.amount, "currency": "EUR", "delay_ms": payload.delay_ms})
        .to_string();
    let request = Request::post(format!("http://{addr}/payments"))
        .header("authorization", format!("Bearer soak-tenant-{tenant}"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(20), http.request(request))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|_| "connection".to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|_| "body".to_string())?
        .to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Records one answer to the key's own payload; counts an answer that contradicts the
/// first (another id, or a 422 for the very payload the key was first sent with).
fn record(
    ledger: &Mutex<Ledger>,
    tenant: usize,
    key: &str,
    sent: Payload,
    answer: Result<(StatusCode, Value), String>,
) {
    let mut ledger = ledger.lock().unwrap();
    ledger.requests += 1;
    let kind = match &answer {
        Err(kind) => kind.clone(),
        Ok((status, body)) => match *status {
            StatusCode::CREATED => {
                let id = body["id"].as_str().unwrap_or_default().to_owned();
                let entry = ledger
                    .keys
                    .get_mut(&(tenant, key.to_owned()))
                    .expect("known key");
                assert_eq!(entry.0, sent, "a 201 only answers the first payload");
                match &entry.1 {
                    Some(first) if *first != id => ledger.mismatched_answers += 1,
                    Some(_) => {}
                    None => entry.1 = Some(id),
                }
                return;
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                ledger.mismatched_answers += 1;
                "422 for the first payload (wrong)".to_owned()
            }
            other => format!(
                "{} {}",
                other.as_u16(),
                body["type"]
                    .as_str()
                    .and_then(|t| t.rsplit('/').next())
                    .unwrap_or("")
            ),
        },
    };
    *ledger.errors.entry(kind).or_default() += 1;
}

async fn client(
    id: usize,
    http: Http,
    addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    until: Instant,
    next_key: Arc<AtomicU64>,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    while Instant::now() < until {
        let roll = rng.next() % 100;
        let known: Vec<KeyState> = {
            let ledger = ledger.lock().unwrap();
            ledger
                .keys
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .take(64)
                .collect()
        };
        if roll < 55 || known.is_empty() {
            let tenant = (rng.next() as usize) % TENANTS;
            let key = format!("soak-{}", next_key.fetch_add(1, Ordering::Relaxed));
            let payload = Payload {
                amount: 1 + rng.next() % 10_000,
                delay_ms: rng.next() % 30,
            };
            ledger
                .lock()
                .unwrap()
                .keys
                .insert((tenant, key.clone()), (payload, None));
            let answer = pay(&http, addr, tenant, &key, payload).await;
            record(&ledger, tenant, &key, payload, answer);
        } else {
            let ((tenant, key), (payload, id)) = known[(rng.next() as usize) % known.len()].clone();
            if roll < 90 || id.is_none() {
                let answer = pay(&http, addr, tenant, &key, payload).await;
                record(&ledger, tenant, &key, payload, answer);
            } else {
                // A conflicting payload on a completed key: must be 422, never a run.
                let other = Payload {
                    amount: payload.amount + 1,
                    ..payload
                };
                let answer = pay(&http, addr, tenant, &key, other).await;
                let mut l = ledger.lock().unwrap();
                l.requests += 1;
                // 422 is the answer; a 503 or 409 while Redis is down is a defined refusal.
                // Only a success (a run, or someone else's replay) would be wrong.
                let kind = match &answer {
                    Ok((s, _)) if *s == StatusCode::UNPROCESSABLE_ENTITY => {
                        "422 conflicting payload (expected)".to_owned()
                    }
                    Ok((s, _)) if s.is_success() => {
                        l.mismatched_answers += 1;
                        format!("conflicting payload answered {s} (wrong)")
                    }
                    Ok((s, body)) => format!(
                        "{} {} (conflicting payload)",
                        s.as_u16(),
                        body["type"]
                            .as_str()
                            .and_then(|t| t.rsplit('/').next())
                            .unwrap_or("")
                    ),
                    Err(kind) => kind.clone(),
                };
                *l.errors.entry(kind).or_default() += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_a_redis_restart() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let server = RedisServerHandle::start();
    let store = support::store::store(&server.url, &support::unique_prefix("soak")).await;
    let state_app = payments::app(store, &payments::Config::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app_task = tokio::spawn(async move { axum::serve(listener, state_app).await });

    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next_key = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                id,
                http.clone(),
                addr,
                ledger.clone(),
                until,
                next_key.clone(),
            ))
        })
        .collect();

    // Restart Redis once, halfway.
    tokio::time::sleep_until(started + Duration::from_secs(secs / 2)).await;
    let requests_before = ledger.lock().unwrap().requests;
    // Down for longer than the store's command timeout (2 s): some callers get 503.
    server.restart(Duration::from_millis(2500)).await;
    println!(
        "soak: redis restarted after {requests_before} requests, at {:?}",
        started.elapsed()
    );
    for c in clients {
        c.await.expect("client task");
    }

    println!("soak: clients done at {:?}", started.elapsed());
    // Drain: every key without an answer yet is retried until it has one.
    let pending: Vec<((usize, String), Payload)> = {
        let l = ledger.lock().unwrap();
        l.keys
            .iter()
            .filter(|(_, v)| v.1.is_none())
            .map(|(k, v)| (k.clone(), v.0))
            .collect()
    };
    let drain_until = Instant::now() + Duration::from_secs(30);
    for ((tenant, key), payload) in pending {
        loop {
            let answer = pay(&http, addr, tenant, &key, payload).await;
            let done = matches!(&answer, Ok((s, _)) if *s == StatusCode::CREATED);
            record(&ledger, tenant, &key, payload, answer);
            if done {
                break;
            }
            assert!(
                Instant::now() < drain_until,
                "key {key} never got an answer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    println!("soak: drained at {:?}", started.elapsed());
    // Executions, as the app recorded them.
    let mut executions: HashMap<String, usize> = HashMap::new();
    let mut total_executions = 0;
    for tenant in 0..TENANTS {
        let request = Request::get(format!("http://{addr}/payments"))
            .header("authorization", format!("Bearer soak-tenant-{tenant}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let body = http
            .request(request)
            .await
            .expect("list")
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let list: Vec<Value> = serde_json::from_slice(&body).expect("json list");
        total_executions += list.len();
        for payment in list {
            *executions
                .entry(payment["id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    let l = ledger.lock().unwrap();
    let distinct = l.keys.len();
    let duplicates = total_executions.saturating_sub(distinct);
    println!(
        "soak: secs={secs} requests={} executions={total_executions} distinct_keys={distinct} duplicates={duplicates} \
         mismatched_answers={} outcomes={:?}",
        l.requests, l.mismatched_answers, l.errors
    );
    assert_eq!(
        total_executions, distinct,
        "executions == distinct (tenant, key)"
    );
    assert_eq!(l.mismatched_answers, 0, "every retry got the first answer");
    for (_, (_, id)) in l.keys.iter() {
        let id = id.as_ref().expect("answered");
        assert_eq!(
            executions.get(id),
            Some(&1),
            "the answered id is the one execution"
        );
    }
    assert!(l.requests > distinct as u64, "retries happened");
    app_task.abort();
}

/// The soak's own Redis, restartable from async code.
struct RedisServerHandle {
    url: String,
    server: Arc<Mutex<support::redis::RedisServer>>,
}

impl RedisServerHandle {
    fn start() -> Self {
        let server = support::redis::RedisServer::start_with(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]);
        RedisServerHandle {
            url: server.url(),
            server: Arc::new(Mutex::new(server)),
        }
    }

    /// Kills the server (as a crash would), keeps it down for `down`, starts it again on
    /// the same port and data directory.
    async fn restart(&self, down: Duration) {
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || server.lock().unwrap().stop())
            .await
            .expect("stop");
        tokio::time::sleep(down).await;
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || server.lock().unwrap().restart())
            .await
            .expect("restart");
    }
}
