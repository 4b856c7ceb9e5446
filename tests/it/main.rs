//! The integration tests: one binary with a module per suite.
//!
//! One binary because each test binary links the whole crate graph (axum, hyper, fred,
//! tokio); on a 2-core machine ten of them cost minutes of linking. Only
//! `tests/memory_bounds.rs` stays apart: its counting global allocator measures heap
//! deltas, which other tests running in the same process would disturb.
//!
//! | module | what |
//! | --- | --- |
//! | `common` | the one shared store suite (`store_suite!`), the test app and the fault-injecting store wrapper |
//! | `support` | Redis servers and clusters for tests, Postgres discovery and a throwaway cluster, the TCP fault proxy, the counting metrics recorder |
//! | `memory`, `redis` | the suite on `MemoryStore` and on `RedisStore`, plus store-specific cases |
//! | `redis_store` | the Redis store alone: Lua semantics, NOSCRIPT, commandstats, check(), pub/sub, ACL, cluster |
//! | `faults` | through the fault proxy: unreachable, cut, restart, latency, lost replies, hang-ups |
//! | `replication` | `wait_replicas` with a primary and a replica |
//! | `postgres`, `postgres_tx` | the suite on `PostgresStore` (plain and transactional) and its own cases; `postgres_tx`: transactional mode past the lease, cuts, clamped settings, isolation, foreign locks, `migrate()` beside a long transaction |
//! | `layer` | attachment, policy validation, sockets, hostile input, renewal schedule, shutdown of detached work |
//! | `example`, `quickstart` | the examples, in-process and over TCP |
//! | `admin` | the admin router (inspect, forget, resolve) through the example's `ADMIN_TOKEN` mount on every store, uncertain payments resolved by an operator, 400/403/404/409/413/415/501/503, the audit log |
//! | `openapi` | the example's `GET /openapi.json`: valid OpenAPI 3.1 (Python's openapi-spec-validator, examples against their schemas), the idempotency parts on exactly the covered operations, the document against what the layer does, the key pattern against the key parser |
//! | `observability` | the example's `/metrics` against the documented metrics, an outage's error log, `ops/` against the documented metrics |
//! | `tower_http` | tower-http's layers inside and outside ours (timeout, compression, body limits, request ids, catch-panic, CORS, trace), and the README's stack |
//! | `soak` | the example app on its own AOF Redis, restarted mid-run |
//! | `nemesis` | two example processes on one store (Redis, transactional Postgres), a seeded fault schedule, retrying clients, the guarantees checked from what survives a SIGKILL |
//! | `tls` | `rediss://` and `sslmode=require` through the facade's TLS features |
//! | `support_selftest` | the test support itself |

#[macro_use]
mod common;
mod support;

// The examples' code, driven by their tests (their `main`s are not called).
#[path = "../../examples/payments.rs"]
#[allow(dead_code)]
mod payments;
#[path = "../../examples/quickstart.rs"]
#[allow(dead_code)]
mod quickstart_app;

mod admin;
mod example;
mod faults;
mod layer;
mod memory;
mod nemesis;
mod observability;
mod openapi;
mod postgres;
mod postgres_tx;
mod quickstart;
mod redis;
mod redis_store;
mod replication;
mod soak;
mod support_selftest;
mod tls;
mod tower_http;
