//! tower-idempotency next to axum-idempotent 0.6 and bare axum, measured in one run.
//!
//! Every case drives a `Router` in-process with `oneshot` (no sockets), with the same
//! handler and the same 61-byte JSON body (see `src/lib.rs`). Ids are `<case>/<backend>`:
//!
//! | case | what |
//! | --- | --- |
//! | `bare-axum` | no middleware |
//! | `bare+sessions` | `CookieManagerLayer` + `ruts::SessionLayer` only (the peer's prerequisite), cookie sent |
//! | `ours-new-key` / `ours-replay` | tower-idempotency: a new key per request / one stored key replayed |
//! | `peer-new-key` / `peer-replay` | axum-idempotent (direct key mode) inside the session layers, cookie sent |
//!
//! Backends: `memory` (our `MemoryStore`, the peer's ruts `MokaStore`) on a current-thread
//! runtime, as `benches/layer.rs` does: what is measured is CPU work, not cross-thread
//! wake-ups. `redis` (our `RedisStore`, ruts' `RedisStore`, both on fred 10.1, one
//! connection each) on `REDIS_URL` (default `redis://127.0.0.1:6379`), on the same
//! current-thread runtime (`PEER_BENCH_REDIS_RT=multi` uses a 2-worker runtime instead).
//! The peer's Redis store needs `HEXPIRE` (Redis >= 7.4 or Valkey >= 9); on an older
//! server its cases are skipped with a message. Our keys go under a per-run prefix and
//! the run deletes its keys and sessions afterwards; nothing is flushed.
//!
//! The peer keeps every cached response of a session in one map that it prunes (a full
//! scan) on each write, so `peer-new-key` opens a new session every 64 requests, outside
//! the timed part (`src/bin/roundtrips.rs` measures that scan on its own).
//!
//! `cargo bench` here, then `cargo run --release --bin table` for the README table.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use tokio::runtime::Runtime;
use tower_idempotency_peer_bench as bench;

use bench::{Case, Handler, Keys, MemoryStore, Sessions};

/// Our memory store is bounded (1M entries by default, then 503); a new-key run on a
/// fast machine can send more than that, so give it room.
const OUR_MEMORY_ENTRIES: usize = 16_000_000;
/// Requests per session in the peer's new-key cases.
const PEER_KEYS_PER_SESSION: u64 = 64;

/// Times `case` under `<name>/<backend>`, in chunks of at most 64 requests (the peer's
/// session rotation happens between chunks, untimed).
fn run(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    backend: &str,
    case: Case,
) -> Rc<Case> {
    let case = Rc::new(case);
    rt.block_on(case.prepare());
    let timed = case.clone();
    let mut measured = false;
    group.bench_function(BenchmarkId::new(name, backend), |b| {
        measured = true;
        b.to_async(rt).iter_custom(|iters| {
            let case = timed.clone();
            async move {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    case.between().await;
                    let n = case.chunk().min(iters - done);
                    let start = Instant::now();
                    for _ in 0..n {
                        case.one().await;
                    }
                    total += start.elapsed();
                    case.note_used(n);
                    done += n;
                }
                total
            }
        })
    });
    if measured {
        manifest(format!("ran {name}/{backend}"));
    }
    case
}

thread_local! {
    static MANIFEST: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Notes what this run measured, and on what, for `src/bin/table.rs`.
fn manifest(line: String) {
    MANIFEST.with(|m| m.borrow_mut().push(line));
}

/// `<target>/criterion/peer/run.txt`: the manifest of this run.
fn write_manifest() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("criterion").join("peer");
    let text = MANIFEST.with(|m| m.borrow().join("\n")) + "\n";
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("run.txt"), text);
    }
}

fn plain(app: axum::Router, keys: Keys, expect_replay: bool) -> Case {
    Case {
        app,
        keys,
        sessions: None,
        expect_replay,
    }
}

fn with_session(
    rt: &Runtime,
    app: axum::Router,
    keys: Keys,
    rotate: Option<u64>,
    expect_replay: bool,
) -> Case {
    let sessions = rt.block_on(Sessions::new(&app, rotate));
    Case {
        app,
        keys,
        sessions: Some(sessions),
        expect_replay,
    }
}

/// Each case gets its own store, so that what one case leaves (hundreds of thousands of
/// records, thousands of sessions) does not weigh on the next: with a shared MokaStore
/// the peer's replay case varied between 2.6 and 4.9 µs from run to run.
fn memory_cases(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, run_id: &str) {
    let handler = Handler::new();
    let our_store = || {
        MemoryStore::builder()
            .max_entries(OUR_MEMORY_ENTRIES)
            .max_bytes(OUR_MEMORY_ENTRIES * 1024)
            .build()
    };
    let moka = || Arc::new(bench::moka_store());

    let bare = bench::bare(&handler);
    run(
        group,
        rt,
        "bare-axum",
        "memory",
        plain(bare, Keys::fixed("unused"), false),
    );

    let sessions_app = bench::bare_sessions(&handler, moka());
    let case = with_session(rt, sessions_app, Keys::fixed("unused"), None, false);
    run(group, rt, "bare+sessions", "memory", case);

    let ours = bench::ours(&handler, bench::our_layer(our_store()));
    let case = plain(ours, Keys::fresh(format!("{run_id}new-")), false);
    run(group, rt, "ours-new-key", "memory", case);
    let ours = bench::ours(&handler, bench::our_layer(our_store()));
    let case = plain(ours, Keys::fixed(format!("{run_id}replay")), true);
    run(group, rt, "ours-replay", "memory", case);

    let peer = bench::peer(&handler, moka());
    let new_keys = Keys::fresh(format!("{run_id}new-"));
    let case = with_session(rt, peer, new_keys, Some(PEER_KEYS_PER_SESSION), false);
    run(group, rt, "peer-new-key", "memory", case);
    let peer = bench::peer(&handler, moka());
    let case = with_session(rt, peer, Keys::fixed(format!("{run_id}replay")), None, true);
    run(group, rt, "peer-replay", "memory", case);
}

fn redis_cases(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, run_id: &str) {
    let url = bench::redis_url();
    let setup = rt.block_on(async {
        let ctl = bench::redis_client(&url).await?;
        let version = bench::server_version(&ctl).await;
        let hexpire = bench::supports_hexpire(&ctl).await;
        let ours = bench::our_redis_store(bench::redis_client(&url).await?, run_id).await;
        let peer = match hexpire {
            true => Some(bench::peer_redis_store(bench::redis_client(&url).await?).await),
            false => None,
        };
        Ok::<_, String>((ctl, version, ours, peer))
    });
    let (ctl, version, ours_store, peer_store) = match setup {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("\nskipping the redis cases: {e} (set REDIS_URL)\n");
            return;
        }
    };
    eprintln!("\nredis cases on {url} ({version})\n");
    manifest(format!("redis {version}"));

    let handler = Handler::new();
    let bare = bench::bare(&handler);
    run(
        group,
        rt,
        "bare-axum",
        "redis",
        plain(bare, Keys::fixed("unused"), false),
    );

    // One store (one connection) per crate; the cases use different keys.
    let ours = bench::ours(&handler, bench::our_layer(ours_store));
    let case = plain(ours.clone(), Keys::fresh(format!("{run_id}new-")), false);
    run(group, rt, "ours-new-key", "redis", case);
    let case = plain(ours, Keys::fixed(format!("{run_id}replay")), true);
    run(group, rt, "ours-replay", "redis", case);

    let mut sessions = Vec::new();
    match peer_store {
        Some(store) => {
            let peer = bench::peer(&handler, Arc::new(store));
            let new_keys = Keys::fresh(format!("{run_id}new-"));
            let case = with_session(
                rt,
                peer.clone(),
                new_keys,
                Some(PEER_KEYS_PER_SESSION),
                false,
            );
            let case = run(group, rt, "peer-new-key", "redis", case);
            sessions.extend(
                case.sessions
                    .as_ref()
                    .map(Sessions::ids)
                    .unwrap_or_default(),
            );
            let replay_key = Keys::fixed(format!("{run_id}replay"));
            let case = with_session(rt, peer, replay_key, None, true);
            let case = run(group, rt, "peer-replay", "redis", case);
            sessions.extend(
                case.sessions
                    .as_ref()
                    .map(Sessions::ids)
                    .unwrap_or_default(),
            );
        }
        None => eprintln!(
            "\nskipping the peer's redis cases: {version} has no HEXPIRE, which ruts 0.13's \
             RedisStore needs (Redis >= 7.4 or Valkey >= 9); see README.md\n"
        ),
    }
    let removed = rt.block_on(bench::cleanup(&ctl, run_id, &sessions));
    eprintln!("\nredis: removed {removed} keys of this run\n");
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn benches(c: &mut Criterion) {
    let run_id = bench::run_prefix();
    let mut group = c.benchmark_group("peer");
    group.throughput(Throughput::Elements(1));

    // One thread: what is measured is CPU work, not cross-thread wake-ups (in a server
    // the spawned task lands on the connection's worker first).
    let rt = current_thread();
    memory_cases(&mut group, &rt, &run_id);

    match std::env::var("PEER_BENCH_REDIS_RT").as_deref() {
        Ok("multi") => {
            manifest("redis-runtime multi-thread, 2 workers".into());
            let multi = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            redis_cases(&mut group, &multi, &run_id);
        }
        _ => {
            manifest("redis-runtime current-thread".into());
            redis_cases(&mut group, &rt, &run_id)
        }
    }
    group.finish();
    write_manifest();
}

criterion_group! {
    name = peer;
    // Modest by default; `cargo bench -- --measurement-time 10` overrides.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(peer);
