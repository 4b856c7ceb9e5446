//! A nemesis run: two real processes of the example payments API sharing one store, a
//! seeded schedule of faults, clients that retry as real clients do, and the guarantees
//! of SPEC section 6 checked at the end from what survives a SIGKILL.
//!
//! ```text
//! cargo test --all-features --test it nemesis -- --nocapture          # 25 s per store
//! NEMESIS_SECS=600 cargo test --all-features --test it nemesis -- --nocapture
//! NEMESIS_SEED=0x5eed NEMESIS_SECS=25 cargo test --all-features --test it nemesis::redis
//! ```
//!
//! # The rig
//!
//! - **Processes**: `target/<profile>/examples/payments` (what `cargo test` builds; found
//!   next to this test's executable, and built with `cargo build --all-features --example
//!   payments` first if it is missing or older than the sources), started twice, `a` and
//!   `b`, each on its own loopback port, with `PAYMENTS_LEASE_MS` = [`LEASE`],
//!   `PAYMENTS_UNCERTAIN=run-again`, `SHUTDOWN_GRACE_SECS` and `EXECUTION_LOG` set. Their output goes to files in a run
//!   directory that is kept (and named) when the run fails.
//! - **Store**, shared by both: a `redis-server` of the run's own (`--appendonly yes
//!   --appendfsync always`, so a restart keeps every acknowledged write), or Postgres in
//!   a schema of the run's own (`search_path` in the URL, dropped at the end), with the
//!   example in its transactional mode. Each process reaches the store through its own
//!   [`FaultProxy`], so a network fault hits one process; its Postgres sessions carry an
//!   `application_name` of their own, so `pg_terminate_backend` hits only them.
//!
//! # Faults
//!
//! A schedule drawn from the seed before the run: one lane of faults per process and one
//! for the store, each a sequence with random gaps; the lanes run concurrently. Within
//! what the docs promise (README "What is guaranteed": at most one execution while the
//! lease holder is alive and can reach the store):
//!
//! | fault | what | bound |
//! | --- | --- | --- |
//! | `kill` | SIGKILL of one process, restart after 0–1 s | — |
//! | `term` | SIGTERM (graceful shutdown, detached work waited for), restart | exit within 60 s |
//! | `blackhole` | its store link forwards nothing, then everything it held ([`FaultProxy::stall`]) | 0.2–1.8 s (`NEMESIS_BLACKHOLE_MAX_MS`) |
//! | `cut` | every connection of its store link reset, new ones refused | 0–0.4 s |
//! | `slow` | every chunk on its store link delayed 5–60 ms | 1–3 s |
//! | `redis-restart` | SIGKILL of `redis-server`, restarted on its AOF | down 0–0.5 s |
//! | `pg-terminate` | `pg_terminate_backend` of one or both processes' sessions | — |
//!
//! The black-hole is lossless because that is what a partition is to TCP: segments are
//! retransmitted when it heals. (The proxy's lossy `blackhole` eats bytes of a live
//! stream, which no TCP path does; on Postgres it leaves a query of the handler waiting
//! for an answer that never comes, until `idle_in_transaction_session_timeout`.)
//! Black-holes stay under a third of the lease and under the Redis store's 2 s command
//! timeout. The docs allow a second execution only once the store was unreachable "for
//! longer than the lease", but a renewal is due every third of the lease, so an outage
//! that begins just before one loses the lease after two thirds of it (and a renewal that
//! is answered only after the command timeout fails and is retried). Black-holes up to
//! the lease (`NEMESIS_BLACKHOLE_MAX_MS=5800`) show keys executed twice within seconds,
//! e.g. `NEMESIS_SEED=0xb7d3b6a4b6074876 NEMESIS_SECS=12 NEMESIS_BLACKHOLE_MAX_MS=5800`
//! (a 5.6 s black-hole of `b` from 3.2 s: its renewal due at about 4 s arrives after the
//! lease ended at about 8 s, when a retry on `a` has run the payment again).
//!
//! Link faults never overlap the store lane's faults, and a process is started only
//! while the store is reachable (a start-up that cannot reach its store exits by design).
//! Kills do overlap store outages: a SIGKILL after a handler ran and before its record
//! was stored (one round trip, or the retries of `complete` while Redis restarts) is
//! outside the guarantee on Redis, as the README says ("the process dies while the store
//! is down"): the retry after the lease runs again. Such a second execution is counted
//! apart (see below), never silently.
//!
//! # Clients
//!
//! [`CLIENTS`] tasks, each paying with a new key after the last one resolved (4 tenants;
//! 90 % of handlers take 0–40 ms, 10 % 0.3–1.5 s), and [`SLOW_CLIENTS`] whose handlers all
//! run 0.5–1.5 s longer than the lease: apart, so that keys which never resolve (a
//! store that cannot complete them) cannot starve the others and pass for silence. Each
//! attempt goes to either process at random, with a timeout of 1–4 s (so long handlers are
//! abandoned mid-flight); connection errors, timeouts, 409, 5xx are retried with the same
//! key and body after an exponential, jittered back-off (50 ms to 2 s, at least the
//! `Retry-After`), for up to [`KEY_BUDGET`]; then the client moves on. Some first
//! attempts go to both processes at once; some resolved keys are replayed once, or sent
//! with another amount (must never be a 2xx). When the faults have healed, every key not
//! resolved is retried once more for up to [`RECONCILE`] (a client's reconciliation job),
//! and a sample of resolved keys is replayed.
//!
//! # Executions
//!
//! Counted from what survives a SIGKILL: on Redis the `EXECUTION_LOG` both processes
//! append to (one line per run of the handler, written before it answers: tenant, key,
//! payment id, pid, start and end); on Postgres the committed rows of `example_payments`,
//! which carry their key (the log's lines there also count runs that rolled back).
//!
//! # Invariants, checked at the end
//!
//! 1. No key executed twice. On Redis a second execution is allowed, and counted apart,
//!    only when the process of the one before was SIGKILLed after that run ended and
//!    before the next began, and no client got its payment id.
//! 2. Every 2xx answer for a key carries the same payment id, and it was executed.
//! 3. At least 95 % of keys resolved once the faults healed, overall and per handler class.
//! 4. Every (re)start of a process listens at its first attempt; every SIGTERM exits 0.
//! 5. No silence (no 2xx anywhere) longer than the longest fault plus [`SILENCE_SLACK`].
//! 6. A key's own payload never gets 422; another payload never gets a 2xx.
//!
//! A summary is printed (keys, executions, retries, faults by kind, answers by status,
//! seed); a failing run names each violation with its keys and how to replay the
//! schedule (`NEMESIS_SEED`). The schedule replays exactly; the interleaving of real
//! processes does not, so a rare violation may need a few runs of its seed.
#![cfg(all(feature = "redis", feature = "postgres"))]

use crate::support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_idempotency::postgres::sqlx::{self, postgres::PgPool, AssertSqlSafe};

use support::postgres::{database_url, TestSchema};
use support::proxy::FaultProxy;
use support::redis::{Guarded, RedisServer};

/// The lease of `POST /payments` in both processes (`PAYMENTS_LEASE_MS`).
const LEASE: Duration = Duration::from_secs(6);
/// Concurrent clients.
const CLIENTS: u64 = 8;
/// Concurrent clients whose handlers all run longer than the lease.
const SLOW_CLIENTS: u64 = 2;
const TENANTS: u64 = 4;
/// `NEMESIS_SECS` unless set: how long faults are injected and new keys created.
const DEFAULT_SECS: u64 = 25;
/// No fault in the first seconds: both processes warm up.
const WARMUP: Duration = Duration::from_secs(2);
/// How long a client retries one key before it moves on.
const KEY_BUDGET: Duration = Duration::from_secs(30);
/// How long the reconciliation after the faults retries the keys not resolved.
const RECONCILE: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// `SHUTDOWN_GRACE_SECS` of the processes (the example's default): longer than detached
/// work can take here (a wait of up to 10 s, then a handler of the lease plus 1.5 s, then
/// complete retries through a short outage), so a SIGTERM never leaves a lease behind.
/// (With 10 s a long run saw "1 idempotency task(s) still running at the end of the
/// shutdown grace period": an owner gone, as after a SIGKILL.)
const SHUTDOWN_GRACE_SECS: u64 = 30;
/// How long a SIGTERMed process may take to exit: in-flight requests (waits of up to
/// 10 s) and the grace for detached work, plus slack for a loaded machine.
const TERM_BOUND: Duration = Duration::from_secs(60);
/// How long a process may take to listen after it was spawned.
const START_BOUND: Duration = Duration::from_secs(60);
/// The longest silence allowed is the longest fault plus this (client back-off and
/// timeouts, a debug build on a loaded machine). Generous on purpose: never a speed test.
const SILENCE_SLACK: Duration = Duration::from_secs(10);
const MIN_RESOLVED: f64 = 0.95;
/// Resolved keys replayed once more after the faults healed.
const VERIFY_REPLAYS: usize = 200;

type Http = Client<HttpConnector, Full<Bytes>>;
/// A process's store variable and value, given the address of its proxy.
type AppUrl = Box<dyn Fn(usize, SocketAddr) -> (&'static str, String)>;

// ---------------------------------------------------------------------------------------
// The two tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    run(StoreKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    run(StoreKind::Postgres).await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    Redis,
    Postgres,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Settings and randomness
// ---------------------------------------------------------------------------------------

struct Settings {
    secs: u64,
    seed: u64,
    /// The longest black-hole (`NEMESIS_BLACKHOLE_MAX_MS`, default [`BLACKHOLE_MAX`]).
    blackhole_max: Duration,
    /// The variables that replay this run's schedule.
    replay: String,
}

/// The longest black-hole by default: under a third of the lease (renewals are due every
/// third, so an outage from just before one to past the lease's end loses it), and under
/// the Redis store's 2 s command timeout.
const BLACKHOLE_MAX: Duration = Duration::from_millis(1800);

fn settings() -> Settings {
    let secs = match std::env::var("NEMESIS_SECS") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| (5..=24 * 3600).contains(s))
            .unwrap_or_else(|| panic!("NEMESIS_SECS={s:?}: expected 5 to 86400 seconds")),
        Err(_) => DEFAULT_SECS,
    };
    let seed = match std::env::var("NEMESIS_SEED") {
        Ok(s) => {
            let t = s.trim();
            let parsed = match t.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => t.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("NEMESIS_SEED={s:?}: expected 0x<hex> or decimal"))
        }
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            Rng::new(nanos, u64::from(std::process::id())).next()
        }
    };
    let blackhole_max = match std::env::var("NEMESIS_BLACKHOLE_MAX_MS") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_millis)
            .filter(|d| (Duration::from_millis(200)..LEASE).contains(d))
            .unwrap_or_else(|| {
                panic!("NEMESIS_BLACKHOLE_MAX_MS={s:?}: expected 200 ms up to the {LEASE:?} lease")
            }),
        Err(_) => BLACKHOLE_MAX,
    };
    let mut replay = format!("NEMESIS_SEED={seed:#x} NEMESIS_SECS={secs}");
    if blackhole_max != BLACKHOLE_MAX {
        replay.push_str(&format!(
            " NEMESIS_BLACKHOLE_MAX_MS={}",
            blackhole_max.as_millis()
        ));
    }
    Settings {
        secs,
        seed,
        blackhole_max,
        replay,
    }
}

/// splitmix64: one stream per lane or client, derived from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Rng(seed ^ stream.wrapping_mul(0xD134_2543_DE82_EF95))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

// ---------------------------------------------------------------------------------------
// The fault schedule
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Fault {
    Kill {
        app: usize,
        down: Duration,
    },
    Term {
        app: usize,
    },
    Blackhole {
        app: usize,
        length: Duration,
    },
    Cut {
        app: usize,
        length: Duration,
    },
    Slow {
        app: usize,
        delay: Duration,
        length: Duration,
    },
    RedisRestart {
        down: Duration,
    },
    PgTerminate {
        apps: Vec<usize>,
    },
}

const APP_NAMES: [&str; 2] = ["a", "b"];

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill",
            Fault::Term { .. } => "term",
            Fault::Blackhole { .. } => "blackhole",
            Fault::Cut { .. } => "cut",
            Fault::Slow { .. } => "slow",
            Fault::RedisRestart { .. } => "redis-restart",
            Fault::PgTerminate { .. } => "pg-terminate",
        }
    }

    fn describe(&self) -> String {
        match self {
            Fault::Kill { app, down } => {
                format!("SIGKILL {}, restart after {down:?}", APP_NAMES[*app])
            }
            Fault::Term { app } => format!("SIGTERM {}, restart", APP_NAMES[*app]),
            Fault::Blackhole { app, length } => {
                format!("black-hole {}'s store link for {length:?}", APP_NAMES[*app])
            }
            Fault::Cut { app, length } => {
                format!("cut {}'s store link for {length:?}", APP_NAMES[*app])
            }
            Fault::Slow { app, delay, length } => {
                format!(
                    "slow {}'s store link by {delay:?} per chunk for {length:?}",
                    APP_NAMES[*app]
                )
            }
            Fault::RedisRestart { down } => {
                format!("SIGKILL redis-server, down {down:?}, restart on its AOF")
            }
            Fault::PgTerminate { apps } => {
                let names: Vec<&str> = apps.iter().map(|a| APP_NAMES[*a]).collect();
                format!("pg_terminate_backend of {}'s sessions", names.join("+"))
            }
        }
    }

    /// Roughly how long it lasts, to space the schedule.
    fn nominal(&self) -> Duration {
        match self {
            Fault::Kill { down, .. } => *down + Duration::from_secs(2),
            Fault::Term { .. } => Duration::from_secs(4),
            Fault::Blackhole { length, .. }
            | Fault::Cut { length, .. }
            | Fault::Slow { length, .. } => *length,
            Fault::RedisRestart { down } => *down + Duration::from_millis(300),
            Fault::PgTerminate { .. } => Duration::ZERO,
        }
    }
}

/// Per lane (process `a`, process `b`, the store): `(start offset, fault)`. Depends only
/// on the store, the seed and the length, so `NEMESIS_SEED` replays it.
fn schedule(
    kind: StoreKind,
    seed: u64,
    secs: u64,
    blackhole_max: Duration,
) -> Vec<Vec<(Duration, Fault)>> {
    let end = Duration::from_secs(secs);
    let mut lanes = Vec::new();
    for app in 0..2 {
        let mut rng = Rng::new(seed, 0xA11 + app as u64);
        let mut at = WARMUP;
        let mut lane = Vec::new();
        loop {
            at += rng.ms(1000, 4000);
            if at >= end {
                break;
            }
            let fault = match rng.below(100) {
                0..=19 => Fault::Kill {
                    app,
                    down: rng.ms(0, 1000),
                },
                20..=34 => Fault::Term { app },
                35..=59 => Fault::Blackhole {
                    app,
                    length: rng.ms(200, blackhole_max.as_millis() as u64),
                },
                60..=79 => Fault::Cut {
                    app,
                    length: rng.ms(0, 400),
                },
                _ => Fault::Slow {
                    app,
                    delay: rng.ms(5, 60),
                    length: rng.ms(1000, 3000),
                },
            };
            let nominal = fault.nominal();
            lane.push((at, fault));
            at += nominal;
        }
        lanes.push(lane);
    }
    let mut rng = Rng::new(seed, 0x5707E);
    let mut at = WARMUP;
    let mut lane = Vec::new();
    loop {
        at += match kind {
            StoreKind::Redis => rng.ms(3000, 8000),
            StoreKind::Postgres => rng.ms(2000, 6000),
        };
        if at >= end {
            break;
        }
        let fault = match kind {
            StoreKind::Redis => Fault::RedisRestart {
                down: rng.ms(0, 500),
            },
            StoreKind::Postgres => Fault::PgTerminate {
                apps: match rng.below(3) {
                    0 => vec![0],
                    1 => vec![1],
                    _ => vec![0, 1],
                },
            },
        };
        let nominal = fault.nominal();
        lane.push((at, fault));
        at += nominal;
    }
    lanes.push(lane);
    lanes
}

// ---------------------------------------------------------------------------------------
// The example's processes
// ---------------------------------------------------------------------------------------

/// `target/<profile>/examples/payments`, built first if missing or older than a source.
fn example_binary() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = &*built {
        return bin.clone();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("payments{}", std::env::consts::EXE_SUFFIX));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = newest_source(root);
    let fresh = |bin: &Path| {
        std::fs::metadata(bin)
            .and_then(|m| m.modified())
            .is_ok_and(|built| built >= sources)
    };
    if !fresh(&bin) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut args = vec!["build", "--all-features", "--example", "payments"];
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            args.push("--release");
        }
        eprintln!(
            "nemesis: {} is missing or older than its sources: cargo {}",
            bin.display(),
            args.join(" ")
        );
        let mut child = Command::new(cargo)
            .args(&args)
            .current_dir(root)
            .stdin(Stdio::null())
            .spawn()
            .expect("run cargo to build the example");
        let deadline = std::time::Instant::now() + Duration::from_secs(20 * 60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for cargo") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nemesis: building the example took more than 20 minutes");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            status.success(),
            "nemesis: building the example failed ({status})"
        );
        assert!(
            fresh(&bin),
            "nemesis: cargo built the example, but not at {} (another --target-dir?)",
            bin.display()
        );
    }
    *built = Some(bin.clone());
    bin
}

/// The newest modification time of what the example is built from.
fn newest_source(root: &Path) -> SystemTime {
    fn walk(path: &Path, newest: &mut SystemTime) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(modified) = meta.modified() {
            *newest = (*newest).max(modified);
        }
    }
    let mut newest = UNIX_EPOCH;
    for path in ["examples/payments.rs", "src", "Cargo.toml", "Cargo.lock"] {
        walk(&root.join(path), &mut newest);
    }
    for krate in std::fs::read_dir(root.join("crates"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for part in ["src", "lua", "sql", "Cargo.toml"] {
            walk(&krate.path().join(part), &mut newest);
        }
    }
    newest
}

/// A free loopback port below the ephemeral range, so no outgoing connection of any
/// process takes it while a process of ours is down between a kill and its restart.
fn app_port(taken: &[u16]) -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(nanos, u64::from(std::process::id()));
    if low > 12_000 {
        for _ in 0..200 {
            let port = rng.range(10_000, u64::from(low) - 1) as u16;
            if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One of the two example processes, started and stopped by its lane.
struct App {
    index: usize,
    port: u16,
    bin: PathBuf,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    /// For the watchdog: removed if this test process dies without cleaning up.
    dir: PathBuf,
    /// The running process, if any; shared with the rig, which kills it when dropped.
    proc: Arc<Mutex<Option<Guarded>>>,
    starts: u32,
}

/// Variables of the test's own environment the example must not see.
const EXAMPLE_VARS: [&str; 10] = [
    "BIND",
    "PAYMENTS_TTL_SECS",
    "PAYMENTS_LEASE_MS",
    "PAYMENTS_UNCERTAIN",
    "ADMIN_TOKEN",
    "REDIS_URL",
    "DATABASE_URL",
    "SHUTDOWN_GRACE_SECS",
    "EXECUTION_LOG",
    "RUST_LOG",
];

enum Stopped {
    /// SIGTERM: exited by itself with this status, after this long.
    Exited(ExitStatus, Duration),
    /// SIGTERM: still running after [`TERM_BOUND`], then SIGKILLed.
    TimedOut,
}

impl App {
    fn name(&self) -> &'static str {
        APP_NAMES[self.index]
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Guarded>> {
        self.proc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns the process and waits until it listens. `Ok((pid, how long))`.
    async fn start(&mut self) -> Result<(u32, Duration), String> {
        self.starts += 1;
        let started = Instant::now();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let _ = writeln!(
            log,
            "=== nemesis: start {} of {} ===",
            self.starts,
            self.name()
        );
        let mut command = Command::new(&self.bin);
        for var in EXAMPLE_VARS {
            command.env_remove(var);
        }
        let stderr = log.try_clone().map_err(|e| e.to_string())?;
        let child = command
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", self.bin.display()))?;
        let pid = child.id();
        *self.slot() = Some(Guarded::new(child, &self.dir));
        loop {
            let exited = self
                .slot()
                .as_mut()
                .and_then(|g| g.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.kill();
                return Err(format!(
                    "exited ({status}) before listening; log tail:\n{}",
                    tail(&self.log, 8)
                ));
            }
            let probe = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
            )
            .await;
            if matches!(probe, Ok(Ok(_))) {
                return Ok((pid, started.elapsed()));
            }
            if started.elapsed() > START_BOUND {
                self.kill();
                return Err(format!(
                    "not listening after {START_BOUND:?}; log tail:\n{}",
                    tail(&self.log, 8)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL; `(pid, unix ms just before, unix ms once reaped)`.
    fn kill(&mut self) -> Option<(u32, u128, u128)> {
        let mut guard = self.slot().take()?;
        let pid = guard.child.id();
        let before = unix_ms();
        guard.kill();
        Some((pid, before, unix_ms()))
    }

    /// SIGTERM, then waits for the exit; SIGKILL after [`TERM_BOUND`].
    async fn term(&mut self) -> Option<(u32, Stopped)> {
        let pid = self.slot().as_ref()?.child.id();
        let sent = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .status();
        loop {
            let exited = self
                .slot()
                .as_mut()
                .and_then(|g| g.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                // Reaped: this only stops the watchdog.
                if let Some(mut guard) = self.slot().take() {
                    guard.kill();
                }
                return Some((pid, Stopped::Exited(status, sent.elapsed())));
            }
            if sent.elapsed() > TERM_BOUND {
                self.kill();
                return Some((pid, Stopped::TimedOut));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A directory for the run's logs: removed at the end, kept (and named) if the test
/// fails.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("nemesis: logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The store side
// ---------------------------------------------------------------------------------------

enum StoreSide {
    Redis(Arc<Mutex<RedisServer>>),
    Postgres {
        schema: Arc<TestSchema>,
        /// The rig's own connections (not through a proxy): counting and terminating.
        pool: PgPool,
    },
}

/// `(host:port of the server, URL for a process through the proxy at `via`)`.
fn postgres_urls(schema: &str, app: &str) -> (SocketAddr, impl Fn(SocketAddr) -> String) {
    let base = database_url();
    let (scheme, rest) = base
        .split_once("://")
        .unwrap_or_else(|| panic!("DATABASE_URL={base:?} is not a URL"));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), authority),
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().expect("DATABASE_URL port")),
        None => (host_port, 5432),
    };
    let ip = match host {
        "localhost" | "127.0.0.1" | "" => [127, 0, 0, 1],
        other => panic!("the nemesis proxies loopback only; DATABASE_URL host is {other:?}"),
    };
    let (db, query) = path.split_once('?').unwrap_or((path, ""));
    let mut params = String::new();
    if !query.is_empty() {
        params.push_str(query);
        params.push('&');
    }
    params.push_str(&format!(
        "application_name={app}&options=-c%20search_path%3D{schema}"
    ));
    let (scheme, db) = (scheme.to_owned(), db.to_owned());
    let url = move |via: SocketAddr| format!("{scheme}://{userinfo}{via}/{db}?{params}");
    ((ip, port).into(), url)
}

// ---------------------------------------------------------------------------------------
// The rig: processes, proxies, store, and what happened
// ---------------------------------------------------------------------------------------

struct FaultRecord {
    kind: &'static str,
    what: String,
    at: Duration,
    took: Duration,
    note: String,
}

struct StartRecord {
    app: &'static str,
    first_try: bool,
    error: Option<String>,
}

#[derive(Default)]
struct Events {
    faults: Vec<FaultRecord>,
    /// `(pid, unix ms before the SIGKILL, unix ms once reaped)`.
    kills: Vec<(u32, u128, u128)>,
    starts: Vec<StartRecord>,
    /// What a SIGTERM came to: `(app, outcome)`.
    terms: Vec<(&'static str, String, bool)>,
    /// Failures of the rig itself (a store that did not come back).
    rig: Vec<String>,
}

struct Rig {
    kind: StoreKind,
    seed: u64,
    started: Instant,
    running: AtomicBool,
    apps: [tokio::sync::Mutex<App>; 2],
    procs: [Arc<Mutex<Option<Guarded>>>; 2],
    ports: [u16; 2],
    proxies: [FaultProxy; 2],
    /// Store-wide faults take it for writing, link faults and starts for reading: at most
    /// one outage between a process and its store at a time, and no start during one.
    store_path: tokio::sync::RwLock<()>,
    app_names: [String; 2],
    store: StoreSide,
    http: Http,
    ledger: Mutex<Ledger>,
    events: Mutex<Events>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for proc in &self.procs {
            if let Some(mut guard) = proc.lock().unwrap_or_else(|p| p.into_inner()).take() {
                guard.kill();
            }
        }
    }
}

impl Rig {
    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `app` (the store reachable meanwhile); a failed first try is recorded and
    /// tried again, up to 4 times, so the run goes on.
    async fn start(&self, app: &mut App) -> String {
        let _store = self.store_path.read().await;
        for attempt in 1..=4 {
            match app.start().await {
                Ok((pid, took)) => {
                    self.events().starts.push(StartRecord {
                        app: app.name(),
                        first_try: attempt == 1,
                        error: None,
                    });
                    return format!("pid {pid} listening after {took:.1?}");
                }
                Err(error) => {
                    println!(
                        "nemesis[{}] {:.1?} start {attempt} of {} failed: {error}",
                        self.kind.name(),
                        self.elapsed(),
                        app.name()
                    );
                    self.events().starts.push(StartRecord {
                        app: app.name(),
                        first_try: attempt == 1,
                        error: Some(error),
                    });
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.events()
            .rig
            .push(format!("{} could not be started in 4 tries", app.name()));
        "not started".to_owned()
    }

    async fn apply(&self, fault: &Fault) {
        // Link faults exclude store-wide ones and the other way round (see `store_path`);
        // a fault's time counts from when it could begin.
        let (_link, _store) = match fault {
            Fault::Blackhole { .. } | Fault::Cut { .. } | Fault::Slow { .. } => {
                (Some(self.store_path.read().await), None)
            }
            Fault::RedisRestart { .. } | Fault::PgTerminate { .. } => {
                (None, Some(self.store_path.write().await))
            }
            Fault::Kill { .. } | Fault::Term { .. } => (None, None),
        };
        let at = self.elapsed();
        let began = Instant::now();
        let note = match fault {
            Fault::Kill { app, down } => {
                let mut app = self.apps[*app].lock().await;
                let killed = app.kill();
                if let Some(kill) = killed {
                    self.events().kills.push(kill);
                }
                tokio::time::sleep(*down).await;
                self.start(&mut app).await
            }
            Fault::Term { app } => {
                let mut app = self.apps[*app].lock().await;
                let outcome = match app.term().await {
                    Some((pid, Stopped::Exited(status, took))) => {
                        let clean = status.success();
                        let what = format!("pid {pid} exited ({status}) after {took:.1?}");
                        self.events().terms.push((app.name(), what.clone(), clean));
                        what
                    }
                    Some((pid, Stopped::TimedOut)) => {
                        let now = unix_ms();
                        self.events().kills.push((pid, now, now));
                        let what =
                            format!("pid {pid} still running after {TERM_BOUND:?}: SIGKILLed");
                        self.events().terms.push((app.name(), what.clone(), false));
                        what
                    }
                    None => "not running".to_owned(),
                };
                let started = self.start(&mut app).await;
                format!("{outcome}; {started}")
            }
            Fault::Blackhole { app, length } => {
                self.proxies[*app].stall();
                tokio::time::sleep(*length).await;
                self.proxies[*app].pass();
                String::new()
            }
            Fault::Cut { app, length } => {
                self.proxies[*app].reset();
                tokio::time::sleep(*length).await;
                self.proxies[*app].pass();
                String::new()
            }
            Fault::Slow { app, delay, length } => {
                self.proxies[*app].delay(*delay);
                tokio::time::sleep(*length).await;
                self.proxies[*app].pass();
                String::new()
            }
            Fault::RedisRestart { down } => {
                let StoreSide::Redis(server) = &self.store else {
                    unreachable!("a Redis fault on Postgres")
                };
                let stopping = server.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    stopping.lock().unwrap_or_else(|p| p.into_inner()).stop();
                })
                .await;
                tokio::time::sleep(*down).await;
                let mut note = String::new();
                for attempt in 1..=3 {
                    let restarting = server.clone();
                    let restarted = tokio::task::spawn_blocking(move || {
                        restarting
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .restart();
                    })
                    .await;
                    if restarted.is_ok() {
                        break;
                    }
                    note = format!("restart {attempt} failed");
                    self.events().rig.push(format!("redis-server: {note}"));
                }
                note
            }
            Fault::PgTerminate { apps } => {
                let StoreSide::Postgres { pool, .. } = &self.store else {
                    unreachable!("a Postgres fault on Redis")
                };
                let names: Vec<String> = apps.iter().map(|a| self.app_names[*a].clone()).collect();
                let terminated = sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = ANY($1)) AS t",
                )
                .bind(&names)
                .fetch_one(pool)
                .await;
                match terminated {
                    Ok(n) => format!("{n} sessions"),
                    Err(e) => {
                        self.events()
                            .rig
                            .push(format!("pg_terminate_backend failed: {e}"));
                        format!("failed: {e}")
                    }
                }
            }
        };
        let took = began.elapsed();
        println!(
            "nemesis[{}] {at:>6.1?} {} ({took:.1?}){}{note}",
            self.kind.name(),
            fault.describe(),
            if note.is_empty() { "" } else { ": " }
        );
        self.events().faults.push(FaultRecord {
            kind: fault.kind(),
            what: fault.describe(),
            at,
            took,
            note,
        });
    }
}

async fn run_lane(rig: Arc<Rig>, lane: Vec<(Duration, Fault)>) {
    for (at, fault) in lane {
        tokio::time::sleep_until(rig.started + at).await;
        if !rig.running() {
            break;
        }
        rig.apply(&fault).await;
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Short,
    Medium,
    Long,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Short => "short",
            Class::Medium => "medium",
            Class::Long => "long",
        }
    }
}

#[derive(Clone, Debug)]
struct KeySpec {
    tenant: u64,
    key: String,
    amount: u64,
    delay_ms: u64,
    class: Class,
}

#[derive(Default)]
struct KeyLog {
    ids: Vec<String>,
    answers: BTreeMap<String, u32>,
    attempts: u32,
    resolved: bool,
    /// A non-retryable answer to the key's own payload.
    failed: Option<String>,
    own_422: u32,
    other_payload_2xx: u32,
}

#[derive(Default)]
struct Ledger {
    specs: Vec<KeySpec>,
    keys: HashMap<String, KeyLog>,
    answers: BTreeMap<String, u64>,
    /// When each 2xx answer to a key's own payload arrived.
    ok_times: Vec<Duration>,
    requests: u64,
    firsts: u64,
    doubled: u64,
    retries: u64,
    replays: u64,
    other_payloads: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    First,
    Retry,
    Replay,
}

enum Answer {
    Http {
        status: u16,
        replayed: bool,
        id: Option<String>,
        problem: Option<String>,
        retry_after: Option<Duration>,
    },
    Timeout,
    Refused,
    Broken,
}

impl Answer {
    fn label(&self) -> String {
        match self {
            Answer::Http {
                status,
                replayed,
                problem,
                ..
            } => match (problem, replayed) {
                (Some(p), _) => format!("{status} {p}"),
                (None, true) => format!("{status} replayed"),
                (None, false) => status.to_string(),
            },
            Answer::Timeout => "timeout".into(),
            Answer::Refused => "connect error".into(),
            Answer::Broken => "connection lost".into(),
        }
    }
}

enum Verdict {
    Resolved,
    Retry(Option<Duration>),
    Fail,
}

async fn send(rig: &Rig, app: usize, spec: &KeySpec, amount: u64, timeout: Duration) -> Answer {
    let body = json!({ "amount": amount, "currency": "EUR", "delay_ms": spec.delay_ms });
    let request = Request::post(format!("http://127.0.0.1:{}/payments", rig.ports[app]))
        .header("authorization", format!("Bearer nemesis-{}", spec.tenant))
        .header("idempotency-key", &spec.key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let exchange = async {
        let response = rig.http.request(request).await.map_err(|e| {
            if e.is_connect() {
                Answer::Refused
            } else {
                Answer::Broken
            }
        })?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.map_err(|_| Answer::Broken)?.to_bytes();
        Ok::<_, Answer>((parts, bytes))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Answer::Timeout,
        Ok(Err(answer)) => answer,
        Ok(Ok((parts, bytes))) => {
            let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let problem = json["type"]
                .as_str()
                .and_then(|t| t.rsplit(['/', '#']).next())
                .map(str::to_owned);
            Answer::Http {
                status: parts.status.as_u16(),
                replayed: parts
                    .headers
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true"),
                id: json["id"].as_str().map(str::to_owned),
                problem,
                retry_after: parts
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map(Duration::from_secs),
            }
        }
    }
}

impl Rig {
    fn register(&self, spec: &KeySpec) {
        let mut ledger = self.ledger();
        ledger.specs.push(spec.clone());
        ledger.keys.insert(spec.key.clone(), KeyLog::default());
    }

    /// Records an answer to the key's own payload.
    fn record(&self, spec: &KeySpec, answer: &Answer, attempt: Attempt) -> Verdict {
        let now = self.elapsed();
        let mut ledger = self.ledger();
        ledger.requests += 1;
        match attempt {
            Attempt::First => ledger.firsts += 1,
            Attempt::Retry => ledger.retries += 1,
            Attempt::Replay => ledger.replays += 1,
        }
        let label = answer.label();
        *ledger.answers.entry(label.clone()).or_default() += 1;
        let ok = matches!(answer, Answer::Http { status, .. } if (200..300).contains(status));
        if ok {
            ledger.ok_times.push(now);
        }
        let log = ledger.keys.get_mut(&spec.key).expect("a registered key");
        log.attempts += 1;
        *log.answers.entry(label.clone()).or_default() += 1;
        match answer {
            Answer::Http { status, id, .. } if (200..300).contains(status) => {
                log.ids.push(id.clone().unwrap_or_default());
                log.resolved = true;
                Verdict::Resolved
            }
            Answer::Http {
                status: 409 | 500 | 502 | 503 | 504,
                retry_after,
                ..
            } => Verdict::Retry(*retry_after),
            Answer::Http { status: 422, .. } => {
                log.own_422 += 1;
                log.failed.get_or_insert(label);
                Verdict::Fail
            }
            Answer::Http { .. } => {
                log.failed.get_or_insert(label);
                Verdict::Fail
            }
            Answer::Timeout | Answer::Refused | Answer::Broken => Verdict::Retry(None),
        }
    }

    fn record_other_payload(&self, spec: &KeySpec, answer: &Answer) {
        let mut ledger = self.ledger();
        ledger.requests += 1;
        ledger.other_payloads += 1;
        *ledger
            .answers
            .entry(format!("other payload: {}", answer.label()))
            .or_default() += 1;
        if matches!(answer, Answer::Http { status, .. } if (200..300).contains(status)) {
            if let Some(log) = ledger.keys.get_mut(&spec.key) {
                log.other_payload_2xx += 1;
            }
        }
    }
}

fn attempt_timeout(rng: &mut Rng) -> Duration {
    rng.ms(1000, 4000)
}

/// Sends `spec` until a 2xx, a non-retryable answer, or `until`.
async fn pursue(rig: &Rig, rng: &mut Rng, spec: &KeySpec, until: Instant, double: bool) -> bool {
    let mut attempt = 0u32;
    loop {
        let kind = if attempt == 0 {
            Attempt::First
        } else {
            Attempt::Retry
        };
        let answers = if attempt == 0 && double {
            rig.ledger().doubled += 1;
            let (ta, tb) = (attempt_timeout(rng), attempt_timeout(rng));
            let (a, b) = tokio::join!(
                send(rig, 0, spec, spec.amount, ta),
                send(rig, 1, spec, spec.amount, tb)
            );
            vec![a, b]
        } else {
            let app = rng.below(2) as usize;
            let timeout = attempt_timeout(rng);
            vec![send(rig, app, spec, spec.amount, timeout).await]
        };
        let (mut resolved, mut failed, mut retry_after) = (false, false, None);
        for answer in &answers {
            match rig.record(spec, answer, kind) {
                Verdict::Resolved => resolved = true,
                Verdict::Fail => failed = true,
                Verdict::Retry(after) => retry_after = retry_after.max(after),
            }
        }
        if resolved {
            return true;
        }
        if failed || Instant::now() >= until {
            return false;
        }
        let cap = (BACKOFF_MIN * 2u32.pow(attempt.min(6))).min(BACKOFF_MAX);
        let jittered =
            Duration::from_millis(rng.range(cap.as_millis() as u64 / 2, cap.as_millis() as u64));
        let pause = jittered.max(retry_after.unwrap_or_default().min(BACKOFF_MAX));
        tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now()))).await;
        attempt += 1;
    }
}

fn new_key(rng: &mut Rng, client: u64, n: u64) -> KeySpec {
    let lease = LEASE.as_millis() as u64;
    let (class, delay_ms) = match rng.below(100) {
        _ if client >= CLIENTS => (Class::Long, lease + rng.range(500, 1500)),
        0..=89 => (Class::Short, rng.range(0, 40)),
        _ => (Class::Medium, rng.range(300, 1500)),
    };
    KeySpec {
        tenant: rng.below(TENANTS),
        key: format!("nk-{client}-{n}"),
        amount: rng.range(1, 10_000),
        delay_ms,
        class,
    }
}

async fn client(rig: Arc<Rig>, id: u64) {
    let mut rng = Rng::new(rig.seed, 0xC11E_0000 + id);
    let mut n = 0;
    while rig.running() {
        let spec = new_key(&mut rng, id, n);
        n += 1;
        rig.register(&spec);
        let double = rng.percent(15);
        let until = Instant::now() + KEY_BUDGET;
        if pursue(&rig, &mut rng, &spec, until, double).await {
            if rng.percent(20) {
                let app = rng.below(2) as usize;
                let answer = send(&rig, app, &spec, spec.amount, attempt_timeout(&mut rng)).await;
                rig.record(&spec, &answer, Attempt::Replay);
            }
            if rng.percent(5) {
                let app = rng.below(2) as usize;
                let answer =
                    send(&rig, app, &spec, spec.amount + 1, attempt_timeout(&mut rng)).await;
                rig.record_other_payload(&spec, &answer);
            }
        }
        tokio::time::sleep(rng.ms(0, 20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// Aborts its tasks when dropped (a failing run leaves nothing running).
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Waits for `tasks` up to `bound`; `false` if some were still running (then aborted).
async fn join_within(tasks: &mut Tasks, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    let mut all = true;
    for task in tasks.0.iter_mut() {
        if tokio::time::timeout_at(deadline, &mut *task).await.is_err() {
            task.abort();
            all = false;
        }
    }
    all
}

async fn run(kind: StoreKind) {
    let Settings {
        secs,
        seed,
        blackhole_max,
        replay,
    } = settings();
    let name = kind.name();
    println!("nemesis[{name}] seed {seed:#x}, {secs} s (replay: {replay})");
    if blackhole_max > LEASE / 3 {
        println!(
            "nemesis[{name}] black-holes up to {blackhole_max:?}: beyond a third of the {LEASE:?} \
             lease, a renewal due during one may be lost"
        );
    }
    let bin = tokio::task::spawn_blocking(example_binary)
        .await
        .expect("locate the example");

    let dir = std::env::temp_dir().join(format!(
        "tidem-nemesis-{name}-{}-{}",
        std::process::id(),
        unix_ms()
    ));
    std::fs::create_dir_all(&dir).expect("create the run directory");
    let run_dir = RunDir(dir.clone());
    let execution_log = dir.join("executions.log");
    File::create(&execution_log).expect("create the execution log");

    // The store, and one proxy per process in front of it.
    let (store, upstream, urls): (StoreSide, SocketAddr, AppUrl) = match kind {
        StoreKind::Redis => {
            let server =
                RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
            let upstream = ([127, 0, 0, 1], server.port()).into();
            let urls =
                Box::new(|_: usize, via: SocketAddr| ("REDIS_URL", format!("redis://{via}")));
            (
                StoreSide::Redis(Arc::new(Mutex::new(server))),
                upstream,
                urls,
            )
        }
        StoreKind::Postgres => {
            let schema = TestSchema::create().await;
            let pool = support::postgres::pool(2).await;
            let schema_name = schema.name.clone();
            let (upstream, _) = postgres_urls(&schema_name, "x");
            let urls = Box::new(move |app: usize, via: SocketAddr| {
                let (_, url) =
                    postgres_urls(&schema_name, &format!("{schema_name}_{}", APP_NAMES[app]));
                ("DATABASE_URL", url(via))
            });
            (StoreSide::Postgres { schema, pool }, upstream, urls)
        }
    };
    let app_names = match &store {
        StoreSide::Postgres { schema, .. } => APP_NAMES.map(|a| format!("{}_{a}", schema.name)),
        StoreSide::Redis(_) => APP_NAMES.map(str::to_owned),
    };
    let proxies = [
        FaultProxy::start(upstream).await,
        FaultProxy::start(upstream).await,
    ];
    let port_a = app_port(&[]);
    let ports = [port_a, app_port(&[port_a])];
    let procs = [Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None))];
    let apps = [0, 1].map(|index| {
        let (var, url) = urls(index, proxies[index].addr());
        tokio::sync::Mutex::new(App {
            index,
            port: ports[index],
            bin: bin.clone(),
            env: vec![
                ("BIND", format!("127.0.0.1:{}", ports[index])),
                ("PAYMENTS_LEASE_MS", LEASE.as_millis().to_string()),
                // The guarantees checked here are those of a route that runs a key again
                // after its owner died (README "What is guaranteed"); the example's
                // default refuses such keys until an operator decides, which no client
                // here can wait for (tests/it/admin.rs covers that).
                ("PAYMENTS_UNCERTAIN", "run-again".to_owned()),
                ("SHUTDOWN_GRACE_SECS", SHUTDOWN_GRACE_SECS.to_string()),
                ("EXECUTION_LOG", execution_log.display().to_string()),
                ("RUST_LOG", "warn,payments=info".to_owned()),
                (var, url),
            ],
            log: dir.join(format!("{}.log", APP_NAMES[index])),
            dir: dir.clone(),
            proc: procs[index].clone(),
            starts: 0,
        })
    });
    let rig = Arc::new(Rig {
        kind,
        seed,
        started: Instant::now(),
        running: AtomicBool::new(true),
        apps,
        procs,
        ports,
        proxies,
        store_path: tokio::sync::RwLock::new(()),
        app_names,
        store,
        http: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .build_http(),
        ledger: Mutex::new(Ledger::default()),
        events: Mutex::new(Events::default()),
    });

    // One after the other: the first creates the tables.
    for app in &rig.apps {
        let mut app = app.lock().await;
        let note = rig.start(&mut app).await;
        println!("nemesis[{name}] {} {note}", app.name());
    }
    let started = Instant::now();
    // The rig's clock starts with the load.
    let rig = {
        let mut rig = rig;
        Arc::get_mut(&mut rig).expect("not shared yet").started = started;
        rig
    };

    let mut lanes = Tasks(
        schedule(kind, seed, secs, blackhole_max)
            .into_iter()
            .map(|lane| tokio::spawn(run_lane(rig.clone(), lane)))
            .collect(),
    );
    let mut clients = Tasks(
        (0..CLIENTS + SLOW_CLIENTS)
            .map(|id| tokio::spawn(client(rig.clone(), id)))
            .collect(),
    );
    tokio::time::sleep_until(started + Duration::from_secs(secs)).await;
    rig.running.store(false, Ordering::SeqCst);
    let load_end = rig.elapsed();

    // Heal: every lane ends its fault (a restart included), and stays quiet.
    if !join_within(
        &mut lanes,
        TERM_BOUND + START_BOUND * 4 + Duration::from_secs(30),
    )
    .await
    {
        rig.events().rig.push("a fault lane did not finish".into());
    }
    let healed = rig.elapsed();
    if !join_within(&mut clients, KEY_BUDGET + Duration::from_secs(15)).await {
        rig.events()
            .rig
            .push("a client did not finish its key".into());
    }

    // Reconciliation: every key not resolved, retried again with the same body.
    let pending: Vec<KeySpec> = {
        let ledger = rig.ledger();
        ledger
            .specs
            .iter()
            .filter(|s| {
                let log = &ledger.keys[&s.key];
                !log.resolved && log.failed.is_none()
            })
            .cloned()
            .collect()
    };
    let reconciled = pending.len();
    let until = Instant::now() + RECONCILE;
    stream::iter(pending.into_iter().enumerate())
        .for_each_concurrent(16, |(i, spec)| {
            let rig = rig.clone();
            async move {
                let mut rng = Rng::new(seed, 0x7EC0_0000 + i as u64);
                pursue(&rig, &mut rng, &spec, until, false).await;
            }
        })
        .await;

    // Replays of resolved keys, now that nothing is faulty: the executed id, every time.
    let sample: Vec<KeySpec> = {
        let ledger = rig.ledger();
        let mut rng = Rng::new(seed, 0x5A4F1E);
        let resolved: Vec<&KeySpec> = ledger
            .specs
            .iter()
            .filter(|s| ledger.keys[&s.key].resolved)
            .collect();
        (0..VERIFY_REPLAYS.min(resolved.len()))
            .map(|_| resolved[rng.below(resolved.len() as u64) as usize].clone())
            .collect()
    };
    stream::iter(sample.into_iter().enumerate())
        .for_each_concurrent(16, |(i, spec)| {
            let rig = rig.clone();
            async move {
                let app = i % 2;
                let answer = send(&rig, app, &spec, spec.amount, Duration::from_secs(15)).await;
                rig.record(&spec, &answer, Attempt::Replay);
            }
        })
        .await;

    // Executions, from what survives a SIGKILL.
    let (runs, malformed) = read_execution_log(&execution_log);
    let executions = match &rig.store {
        StoreSide::Redis(_) => runs.clone(),
        StoreSide::Postgres { schema, pool } => {
            let sql = format!(
                "SELECT tenant, idempotency_key, id FROM {}",
                schema.table("example_payments")
            );
            let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(pool)
                .await
                .expect("read example_payments");
            let by_id: HashMap<&str, &Execution> =
                runs.iter().map(|r| (r.id.as_str(), r)).collect();
            rows.into_iter()
                .map(|(tenant, key, id)| match by_id.get(id.as_str()) {
                    Some(run) => (*run).clone(),
                    None => Execution {
                        tenant,
                        key: key.unwrap_or_default(),
                        id,
                        pid: 0,
                        started_ms: 0,
                        finished_ms: 0,
                    },
                })
                .collect()
        }
    };
    // Stop the processes before reading their logs (and before the schema goes).
    for proc in &rig.procs {
        if let Some(mut guard) = proc.lock().unwrap_or_else(|p| p.into_inner()).take() {
            guard.kill();
        }
    }
    let report = check(
        &rig,
        &Outcome {
            secs,
            replay: replay.clone(),
            blackhole_max,
            load_end,
            healed,
            reconciled,
            runs: runs.clone(),
            malformed,
            executions,
            logs: APP_NAMES.map(|a| dir.join(format!("{a}.log"))),
        },
    );
    println!("{}", report.summary);
    assert!(
        report.violations.is_empty(),
        "nemesis {name}: {} invariant(s) violated (details above); replay the schedule with \
         {replay} cargo test --all-features --test it nemesis::{name} -- --nocapture\n{}",
        report.violations.len(),
        report.violations.join("\n")
    );
    drop(lanes);
    drop(clients);
    drop(rig);
    drop(run_dir);
}

// ---------------------------------------------------------------------------------------
// Executions and the checks
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Execution {
    tenant: String,
    key: String,
    id: String,
    pid: u32,
    started_ms: u128,
    finished_ms: u128,
}

/// The lines of `EXECUTION_LOG`, and how many were malformed.
fn read_execution_log(path: &Path) -> (Vec<Execution>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut runs = Vec::new();
    let mut malformed = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let parsed = (f.len() == 6)
            .then(|| {
                Some(Execution {
                    tenant: f[0].to_owned(),
                    key: f[1].to_owned(),
                    id: f[2].to_owned(),
                    pid: f[3].parse().ok()?,
                    started_ms: f[4].parse().ok()?,
                    finished_ms: f[5].parse().ok()?,
                })
            })
            .flatten();
        match parsed {
            Some(run) => runs.push(run),
            None => malformed += 1,
        }
    }
    (runs, malformed)
}

struct Outcome {
    secs: u64,
    replay: String,
    blackhole_max: Duration,
    load_end: Duration,
    healed: Duration,
    reconciled: usize,
    /// The lines of the execution log: every run of the handler.
    runs: Vec<Execution>,
    malformed: usize,
    executions: Vec<Execution>,
    logs: [PathBuf; 2],
}

struct Report {
    summary: String,
    violations: Vec<String>,
}

fn check(rig: &Rig, out: &Outcome) -> Report {
    let ledger = rig.ledger();
    let events = rig.events();
    let name = rig.kind.name();
    let mut violations = Vec::new();
    let mut details = String::new();
    let mut violate = |invariant: &str, lines: Vec<String>| {
        if lines.is_empty() {
            return;
        }
        violations.push(format!("{invariant}: {} case(s)", lines.len()));
        let _ = writeln!(details, "  VIOLATED {invariant} ({} case(s)):", lines.len());
        for line in lines.iter().take(12) {
            let _ = writeln!(details, "    {line}");
        }
        if lines.len() > 12 {
            let _ = writeln!(details, "    ... and {} more", lines.len() - 12);
        }
    };

    let mut by_key: HashMap<&str, Vec<&Execution>> = HashMap::new();
    for e in &out.executions {
        by_key.entry(e.key.as_str()).or_default().push(e);
    }
    let mut runs_of: HashMap<&str, usize> = HashMap::new();
    for run in &out.runs {
        *runs_of.entry(run.key.as_str()).or_default() += 1;
    }
    let spec_of: HashMap<&str, &KeySpec> =
        ledger.specs.iter().map(|s| (s.key.as_str(), s)).collect();
    let history = |key: &str| -> String {
        let log = &ledger.keys[key];
        let spec = spec_of[key];
        let runs: Vec<String> = by_key
            .get(key)
            .map(|v| {
                v.iter()
                    .map(|e| {
                        format!(
                            "{} by pid {} ({}..{} ms)",
                            e.id, e.pid, e.started_ms, e.finished_ms
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rolled_back = match rig.kind {
            StoreKind::Redis => String::new(),
            StoreKind::Postgres => {
                let committed = by_key.get(key).map_or(0, Vec::len);
                let ran = runs_of.get(key).copied().unwrap_or(0);
                format!(
                    "; handler runs rolled back {}",
                    ran.saturating_sub(committed)
                )
            }
        };
        format!(
            "key {key} (tenant {}, {} handler {} ms): {} attempts {:?}; executions [{}]{rolled_back}",
            spec.tenant,
            spec.class.name(),
            spec.delay_ms,
            log.attempts,
            log.answers,
            runs.join(", ")
        )
    };

    // 1. No key executed twice (a SIGKILLed owner's run on Redis is counted apart).
    let mut twice = Vec::new();
    let mut killed_owner = Vec::new();
    let mut strangers = Vec::new();
    for (key, runs) in &by_key {
        let Some(spec) = spec_of.get(key) else {
            strangers.push(format!(
                "{} executions of key {key:?}, never sent",
                runs.len()
            ));
            continue;
        };
        if runs
            .iter()
            .any(|e| e.tenant != format!("nemesis-{}", spec.tenant))
        {
            strangers.push(format!("key {key} executed for another tenant"));
        }
        if runs.len() < 2 {
            continue;
        }
        let mut runs = runs.clone();
        runs.sort_by_key(|e| e.finished_ms);
        let answered: HashSet<&str> = ledger.keys[*key].ids.iter().map(String::as_str).collect();
        let excused = rig.kind == StoreKind::Redis
            && runs.windows(2).all(|w| {
                let (before, after) = (w[0], w[1]);
                !answered.contains(before.id.as_str())
                    && events.kills.iter().any(|(pid, sent, dead)| {
                        *pid == before.pid
                            && before.finished_ms <= *dead
                            && *sent <= after.started_ms
                    })
            });
        if excused {
            killed_owner.push(history(key));
        } else {
            twice.push(history(key));
        }
    }
    twice.sort();
    let twice_count = twice.len();
    violate("no key executed twice", twice);
    violate("executions are of keys the clients sent", strangers);

    // 2. Every 2xx for a key carries one payment id, the executed one.
    let mut ids_wrong = Vec::new();
    for spec in &ledger.specs {
        let log = &ledger.keys[&spec.key];
        let distinct: HashSet<&str> = log.ids.iter().map(String::as_str).collect();
        if distinct.len() > 1 {
            ids_wrong.push(format!(
                "{} payment ids {distinct:?}: {}",
                distinct.len(),
                history(&spec.key)
            ));
            continue;
        }
        if let Some(id) = distinct.into_iter().next() {
            let executed = by_key
                .get(spec.key.as_str())
                .is_some_and(|runs| runs.iter().any(|e| e.id == id));
            if !executed {
                ids_wrong.push(format!(
                    "answered {id}, never executed: {}",
                    history(&spec.key)
                ));
            }
        }
    }
    violate(
        "every 2xx for a key carries the executed payment id",
        ids_wrong,
    );

    // 3. Resolution, overall and per class.
    let mut per_class: BTreeMap<Class, (usize, usize)> = BTreeMap::new();
    for spec in &ledger.specs {
        let entry = per_class.entry(spec.class).or_default();
        entry.0 += 1;
        entry.1 += usize::from(ledger.keys[&spec.key].resolved);
    }
    let total = ledger.specs.len();
    let resolved: usize = per_class.values().map(|c| c.1).sum();
    let share = |(n, ok): (usize, usize)| if n == 0 { 1.0 } else { ok as f64 / n as f64 };
    let mut resolution = Vec::new();
    for (class, counts) in &per_class {
        if share(*counts) < MIN_RESOLVED {
            let mut answers: BTreeMap<&str, u32> = BTreeMap::new();
            let (mut ran, mut committed) = (0, 0);
            for spec in ledger.specs.iter().filter(|s| s.class == *class) {
                let log = &ledger.keys[&spec.key];
                if !log.resolved {
                    for (label, n) in &log.answers {
                        *answers.entry(label).or_default() += n;
                    }
                    ran += runs_of.get(spec.key.as_str()).copied().unwrap_or(0);
                    committed += by_key.get(spec.key.as_str()).map_or(0, Vec::len);
                }
            }
            let runs = match rig.kind {
                StoreKind::Redis => String::new(),
                StoreKind::Postgres => format!(
                    "; their handler ran {ran} times, {committed} committed, {} rolled back",
                    ran.saturating_sub(committed)
                ),
            };
            resolution.push(format!(
                "{} keys (handler {}): {} of {} resolved ({:.1} %){runs}; the others' answers: {answers:?}",
                class.name(),
                match class {
                    Class::Short => "0-40 ms".to_owned(),
                    Class::Medium => "0.3-1.5 s".to_owned(),
                    Class::Long => format!("longer than the {LEASE:?} lease"),
                },
                counts.1,
                counts.0,
                100.0 * share(*counts)
            ));
        }
    }
    if total == 0 || share((total, resolved)) < MIN_RESOLVED {
        resolution.push(format!("{resolved} of {total} keys resolved"));
    }
    if !resolution.is_empty() {
        for spec in ledger
            .specs
            .iter()
            .filter(|s| !ledger.keys[&s.key].resolved)
            .take(6)
        {
            resolution.push(format!("unresolved: {}", history(&spec.key)));
        }
    }
    violate(
        "at least 95 % of keys resolved after the faults healed",
        resolution,
    );

    // 4. Starts at the first attempt; SIGTERM exits cleanly.
    let failed_starts: Vec<String> = events
        .starts
        .iter()
        .filter_map(|s| {
            s.error
                .as_ref()
                .map(|e| format!("{} (first try: {}): {e}", s.app, s.first_try))
        })
        .collect();
    violate(
        "every (re)start listens at its first attempt",
        failed_starts,
    );
    let bad_terms: Vec<String> = events
        .terms
        .iter()
        .filter(|t| !t.2)
        .map(|(app, what, _)| format!("{app}: {what}"))
        .collect();
    violate("SIGTERM: a graceful exit with status 0", bad_terms);
    violate("the rig itself", events.rig.clone());

    // 5. No long silence while the load ran.
    let longest = events
        .faults
        .iter()
        .max_by_key(|f| f.took)
        .map(|f| (f.took, format!("{} at {:.1?}; {}", f.what, f.at, f.note)));
    let (longest_took, longest_what) = longest.clone().unwrap_or_default();
    let mut times: Vec<Duration> = ledger
        .ok_times
        .iter()
        .copied()
        .filter(|t| *t >= WARMUP && *t <= out.load_end)
        .collect();
    times.push(WARMUP);
    times.push(out.load_end);
    times.sort();
    let (silence, silence_at) = times
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .unwrap_or_default();
    let silence_bound = longest_took + SILENCE_SLACK;
    if silence > silence_bound {
        violate(
            "no silence much longer than the longest fault",
            vec![format!(
                "no 2xx for {silence:.1?} from {silence_at:.1?}; longest fault {longest_took:.1?} ({longest_what})"
            )],
        );
    }

    // 6. Payload checks.
    let mut payloads = Vec::new();
    for spec in &ledger.specs {
        let log = &ledger.keys[&spec.key];
        if log.own_422 > 0 || log.other_payload_2xx > 0 {
            payloads.push(format!(
                "{} x 422 to its own payload, {} x 2xx to another: {}",
                log.own_422,
                log.other_payload_2xx,
                history(&spec.key)
            ));
        }
    }
    violate("422 only for another payload, never a 2xx for it", payloads);
    let mut other_failures = Vec::new();
    for spec in &ledger.specs {
        let log = &ledger.keys[&spec.key];
        if let Some(failed) = &log.failed {
            if log.own_422 == 0 {
                other_failures.push(format!("answered {failed}: {}", history(&spec.key)));
            }
        }
    }
    violate("no answer a client cannot retry", other_failures);

    // The summary.
    let mut s = String::new();
    let class_line: Vec<String> = per_class
        .iter()
        .map(|(c, n)| format!("{} {}/{}", c.name(), n.1, n.0))
        .collect();
    let _ = writeln!(
        s,
        "nemesis {name}: seed={:#x} secs={} lease={LEASE:?} black-holes<={:?} clients={CLIENTS}+{SLOW_CLIENTS} slow processes=2 store={}",
        rig.seed,
        out.secs,
        out.blackhole_max,
        match rig.kind {
            StoreKind::Redis => "own redis-server (AOF, appendfsync always)",
            StoreKind::Postgres => "Postgres, transactional, own schema",
        }
    );
    let _ = writeln!(
        s,
        "  keys {total}: resolved {resolved} ({:.1} %; {}), {} still open after the load were reconciled",
        100.0 * share((total, resolved)),
        class_line.join(", "),
        out.reconciled
    );
    let executed_keys = by_key.len();
    let _ = writeln!(
        s,
        "  executions {} for {executed_keys} keys ({}{}), keys executed twice {} (+{} after a SIGKILLed owner, allowed)",
        out.executions.len(),
        match rig.kind {
            StoreKind::Redis => format!("execution log, {} lines", out.runs.len()),
            StoreKind::Postgres => format!("committed rows; {} handler runs in the execution log", out.runs.len()),
        },
        if out.malformed > 0 { format!(", {} malformed lines", out.malformed) } else { String::new() },
        twice_count,
        killed_owner.len()
    );
    let _ = writeln!(
        s,
        "  requests {}: first {} ({} sent to both processes), retries {}, replays {}, other payloads {}",
        ledger.requests, ledger.firsts, ledger.doubled, ledger.retries, ledger.replays, ledger.other_payloads
    );
    let answers: Vec<String> = ledger
        .answers
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    let _ = writeln!(s, "  answers: {}", answers.join(", "));
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &events.faults {
        *kinds.entry(f.kind).or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        s,
        "  faults {}: {}; longest {longest_took:.1?} ({longest_what}); healed at {:.1?}",
        events.faults.len(),
        kinds.join(", "),
        out.healed
    );
    let restarts = events
        .starts
        .iter()
        .filter(|s| s.first_try)
        .count()
        .saturating_sub(2);
    let failed = events.starts.iter().filter(|s| s.error.is_some()).count();
    let _ = writeln!(
        s,
        "  starts: 2 + {restarts} restarts, {failed} failed; SIGTERM exits: {} ({} not clean)",
        events.terms.len(),
        events.terms.iter().filter(|t| !t.2).count()
    );
    let _ = writeln!(
        s,
        "  longest silence (no 2xx anywhere) {silence:.1?} from {silence_at:.1?}; allowed {silence_bound:.1?}"
    );
    for (i, log) in out.logs.iter().enumerate() {
        let _ = writeln!(s, "  log of {}: {}", APP_NAMES[i], log_summary(log));
    }
    if !killed_owner.is_empty() {
        let _ = writeln!(
            s,
            "  executed twice after a SIGKILLed owner (allowed by the docs):"
        );
        for k in killed_owner.iter().take(5) {
            let _ = writeln!(s, "    {k}");
        }
    }
    if violations.is_empty() {
        let _ = writeln!(s, "  violations: none");
    } else {
        s.push_str(&details);
        let _ = writeln!(
            s,
            "  replay: {} cargo test --all-features --test it nemesis::{name} -- --nocapture",
            out.replay
        );
    }
    Report {
        summary: s,
        violations,
    }
}

/// WARN and ERROR lines of a process log, counted by message (fields left out).
fn log_summary(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let (mut warns, mut errors) = (0, 0);
    for line in text.lines() {
        let level = if line.contains(" WARN ") {
            warns += 1;
            "WARN"
        } else if line.contains(" ERROR ") {
            errors += 1;
            "ERROR"
        } else {
            continue;
        };
        let rest = line
            .split_once(&format!(" {level} "))
            .map_or("", |(_, r)| r);
        let words: Vec<&str> = rest.split_whitespace().collect();
        let target = words
            .iter()
            .position(|w| w.ends_with(':') && !w.contains(['{', '}', '=']))
            .map_or(0, |i| i + 1);
        let message: Vec<&str> = words[target..]
            .iter()
            .take_while(|w| !w.contains('='))
            .copied()
            .collect();
        let message: String = message.join(" ").chars().take(90).collect();
        *counts.entry(format!("{level} {message}")).or_default() += 1;
    }
    let mut top: Vec<(String, usize)> = counts.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    let top: Vec<String> = top
        .iter()
        .take(4)
        .map(|(m, n)| format!("{n} x {m}"))
        .collect();
    format!(
        "{warns} WARN, {errors} ERROR{}{}",
        if top.is_empty() { "" } else { "; " },
        top.join("; ")
    )
}
