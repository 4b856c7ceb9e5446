//! Shared support for the integration tests; include it with `mod support;` at the top of
//! a test file. [`redis`] finds or spawns Redis servers, [`cluster`] starts a 3-master
//! cluster, [`pg_server`] finds Postgres or starts a throwaway cluster, [`proxy`] is a
//! fault-injection TCP proxy for network failure tests.

// Each test binary compiles its own copy of this module and uses only part of it, so
// without this every binary would warn about the helpers it happens not to call.
#![allow(dead_code)]

pub mod cluster;
pub mod logs;
pub mod metrics;
pub mod pg_server;
pub mod postgres;
pub mod proxy;
pub mod redis;
#[cfg(feature = "redis")]
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A key prefix unique to this call, e.g. `tidem-test:replay:4242-1718000000123456789-7:`.
///
/// Tests share one Redis server (and never `FLUSHALL` it), so every test puts its keys
/// under its own prefix; the test name keeps leftovers readable in `redis-cli --scan`.
pub fn unique_prefix(test: &str) -> String {
    format!("tidem-test:{test}:{}:", unique_suffix())
}

/// `{pid}-{nanos}-{counter}`: unique across processes and across calls in one process.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// An error and its sources, `a: b: c`, for assertions on what a log or a caller sees.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
