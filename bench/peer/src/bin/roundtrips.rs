//! Redis commands per request, concurrent duplicates, and a few semantic checks, for
//! tower-idempotency and axum-idempotent 0.6 side by side. Prints Markdown tables.
//!
//! ```sh
//! cargo run --release --bin roundtrips
//! REDIS_SERVER=/path/to/valkey-server cargo run --release --bin roundtrips
//! ```
//!
//! It starts its own throwaway server (`$REDIS_SERVER`, default `redis-server`) on a free
//! port with `--save '' --appendonly no --daemonize yes`, so no other traffic pollutes
//! the counts, and stops it with `$REDIS_CLI -p P shutdown nosave` (default `redis-cli`).
//! The peer's Redis store needs `HEXPIRE` (Redis >= 7.4, Valkey >= 9); on an older server
//! its rows say so.
//!
//! Counting: `N` requests per case (default 1000, `$N`), twice. The first pass reads
//! `INFO commandstats` before and after: every command the server ran, including the
//! ones Lua scripts ran inside it, and the server time of the client's commands. The
//! second pass runs under `MONITOR`, which shows script commands as `[0 lua]`, to count
//! the client's own commands (the round trips) apart; a monitor slows the server down,
//! hence the clean first pass. The `INFO` and the `ECHO` markers that delimit each pass
//! are left out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use fred::prelude::Client;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tower_idempotency_peer_bench as bench;

use bench::{command, request, send, Handler, InFlight, MemoryStore, BODY};

/// A throwaway server on a free port; shut down (nosave) on drop.
struct Server {
    port: u16,
    cli: String,
    pidfile: PathBuf,
}

impl Server {
    fn start() -> Server {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let cli = std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir();
        let pidfile = dir.join(format!("peer-bench-redis-{port}.pid"));
        let status = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--dir")
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e} (set REDIS_SERVER)"));
        assert!(status.success(), "{bin} exited with {status}");
        let server = Server { port, cli, pidfile };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{bin} did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let port = self.port.to_string();
        let stopped = Command::new(&self.cli)
            .args(["-p", &port, "shutdown", "nosave"])
            .output()
            .is_ok_and(|o| o.status.success() || o.stdout.is_empty());
        if !stopped {
            eprintln!(
                "could not stop the server on port {port}; its pid is in {}",
                self.pidfile.display()
            );
        }
    }
}

/// A `MONITOR` connection; [`Monitor::sync`] returns what it saw since the last sync.
struct Monitor {
    lines: mpsc::UnboundedReceiver<String>,
    ctl: Client,
    marker: u64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // Closes the connection, so the server stops feeding it (a monitor slows every
        // command down).
        self.reader.abort();
    }
}

impl Monitor {
    async fn start(port: u16, ctl: Client) -> Monitor {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("monitor");
        let (read, mut write) = stream.into_split();
        write.write_all(b"MONITOR\r\n").await.expect("MONITOR");
        let mut reader = BufReader::new(read).lines();
        let ok = reader.next_line().await.expect("monitor reply");
        assert_eq!(ok.as_deref(), Some("+OK"), "MONITOR refused");
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let _write = write;
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Monitor {
            lines: rx,
            ctl,
            marker: 0,
            reader,
        }
    }

    async fn sync(&mut self) -> Vec<String> {
        self.marker += 1;
        let marker = format!("peer-bench-marker-{}", self.marker);
        let _ = command(&self.ctl, "ECHO", vec![marker.as_str().into()]).await;
        let mut seen = Vec::new();
        while let Some(line) = self.lines.recv().await {
            if line.contains(&marker) {
                return seen;
            }
            seen.push(line);
        }
        panic!("monitor connection closed");
    }
}

/// Commands the measurement itself sends.
const OWN: [&str; 2] = ["info", "echo"];

/// `(lua?, command)` of one MONITOR line: `+<ts> [<db> <addr>|lua] "cmd" ...`.
fn parse_monitor(line: &str) -> Option<(bool, String)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let lua = line[open + 1..close].ends_with("lua");
    let rest = line[close + 1..].trim_start().strip_prefix('"')?;
    let name = rest.split('"').next()?.to_ascii_lowercase();
    Some((lua, name))
}

/// `command -> (calls, usec)` from `INFO commandstats`.
async fn commandstats(ctl: &Client) -> BTreeMap<String, (u64, u64)> {
    let info = command(ctl, "INFO", vec!["commandstats".into()]).await;
    let info = info.as_string().unwrap_or_default();
    let mut stats = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        stats.insert(name.to_string(), (field("calls="), field("usec=")));
    }
    stats
}

#[derive(Default)]
struct Counts {
    /// Commands the client sent, per name (MONITOR, not from Lua).
    client: BTreeMap<String, u64>,
    /// Commands scripts ran inside the server, per name (MONITOR, from Lua).
    lua: BTreeMap<String, u64>,
    /// Every call `INFO commandstats` counted, per name.
    stats: BTreeMap<String, u64>,
    /// Server time, µs, of the client's commands (a script's includes what it ran).
    usec: u64,
}

impl Counts {
    fn client_total(&self) -> u64 {
        self.client.values().sum()
    }
    fn stats_total(&self) -> u64 {
        self.stats.values().sum()
    }
}

/// Runs `work` twice: pass 0 with nothing else attached, for `INFO commandstats` (calls
/// and server time); pass 1 under `MONITOR`, to tell the client's commands from the ones
/// scripts ran. Each pass sends the same number of requests.
async fn measure<F, Fut>(ctl: &Client, port: u16, work: F) -> Counts
where
    F: Fn(u32) -> Fut,
    Fut: Future<Output = ()>,
{
    let before = commandstats(ctl).await;
    work(0).await;
    let after = commandstats(ctl).await;

    let mut mon = Monitor::start(port, ctl.clone()).await;
    mon.sync().await;
    work(1).await;
    let lines = mon.sync().await;
    drop(mon);

    let mut counts = Counts::default();
    for (name, (calls, _)) in &after {
        if OWN.contains(&name.as_str()) {
            continue;
        }
        let (calls0, _) = before.get(name).copied().unwrap_or((0, 0));
        if calls > &calls0 {
            counts.stats.insert(name.clone(), calls - calls0);
        }
    }
    for (lua, name) in lines.iter().filter_map(|l| parse_monitor(l)) {
        if OWN.contains(&name.as_str()) || name == "monitor" {
            continue;
        }
        let map = if lua {
            &mut counts.lua
        } else {
            &mut counts.client
        };
        *map.entry(name).or_default() += 1;
    }
    // A script's usec already includes the commands it ran, which commandstats also
    // lists on their own: sum the client's commands only.
    for name in counts.client.keys() {
        let usec = |stats: &BTreeMap<String, (u64, u64)>| stats.get(name).map_or(0, |s| s.1);
        counts.usec += usec(&after) - usec(&before);
    }
    counts
}

fn per_request(map: &BTreeMap<String, u64>, n: u64) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(name, count)| format!("{name} {}", ratio(*count, n)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ratio(count: u64, n: u64) -> String {
    let r = count as f64 / n as f64;
    if (r - r.round()).abs() < 0.005 {
        format!("{}", r.round())
    } else {
        format!("{r:.2}")
    }
}

/// `n` requests to `/payments`, each with `key(i)` and `cookie`; all must succeed.
async fn drive(
    app: &Router,
    n: u64,
    cookie: Option<&axum::http::HeaderValue>,
    key: impl Fn(u64) -> String,
) {
    for i in 0..n {
        let reply = send(app, request("/payments", Some(&key(i)), cookie, BODY)).await;
        assert!(reply.status.is_success(), "{reply:?}");
    }
}

async fn redis_counts(server: &Server, n: u64, out: &mut String) {
    let url = server.url();
    let ctl = bench::redis_client(&url).await.expect("ctl client");
    let version = bench::server_version(&ctl).await;
    let hexpire = bench::supports_hexpire(&ctl).await;
    let port = server.port;
    let prefix = bench::run_prefix();
    let ours_store =
        bench::our_redis_store(bench::redis_client(&url).await.unwrap(), &prefix).await;
    let ours_handler = Handler::new();
    let ours = &bench::ours(&ours_handler, bench::our_layer(ours_store.clone()));

    // (label, counts, the store's own count of its commands over both passes)
    let mut rows: Vec<(String, Counts, Option<u64>)> = Vec::new();

    let before = ours_store.round_trips().total;
    let c = measure(&ctl, port, |pass| {
        drive(ours, n, None, move |i| format!("rt-new-{pass}-{i}"))
    })
    .await;
    let own = ours_store.round_trips().total - before;
    rows.push(("tower-idempotency, new key".into(), c, Some(own)));
    send(ours, request("/payments", Some("rt-replay"), None, BODY)).await;
    let before = ours_store.round_trips().total;
    let c = measure(&ctl, port, |_| drive(ours, n, None, |_| "rt-replay".into())).await;
    let own = ours_store.round_trips().total - before;
    rows.push(("tower-idempotency, replay".into(), c, Some(own)));
    assert_eq!(
        ours_handler.runs(),
        2 * n + 1,
        "ours ran the handler on a replay"
    );

    if hexpire {
        let store =
            Arc::new(bench::peer_redis_store(bench::redis_client(&url).await.unwrap()).await);
        let handler = Handler::new();
        let sessions_only = &bench::bare_sessions(&handler, store.clone());
        let cookie = &bench::establish_session(sessions_only).await;
        let c = measure(&ctl, port, |_| {
            drive(sessions_only, n, Some(cookie), |_| "x".into())
        })
        .await;
        rows.push(("session + cookie layers only".into(), c, None));

        let handler = Handler::new();
        let peer = &bench::peer(&handler, store);
        let cookie = &bench::establish_session(peer).await;
        let c = measure(&ctl, port, |pass| {
            drive(peer, n, Some(cookie), move |i| format!("rt-new-{pass}-{i}"))
        })
        .await;
        rows.push(("axum-idempotent, new key".into(), c, None));
        let cookie = &bench::establish_session(peer).await;
        send(
            peer,
            request("/payments", Some("rt-replay"), Some(cookie), BODY),
        )
        .await;
        let c = measure(&ctl, port, |_| {
            drive(peer, n, Some(cookie), |_| "rt-replay".into())
        })
        .await;
        rows.push(("axum-idempotent, replay".into(), c, None));
        assert_eq!(
            handler.runs(),
            2 * n + 1,
            "the peer ran the handler on a replay"
        );
    }

    writeln!(out, "### Redis commands per request\n").unwrap();
    writeln!(
        out,
        "{version}, throwaway server, N = {n} requests per row and pass.\n"
    )
    .unwrap();
    writeln!(
        out,
        "| case | client commands / req | of which | total commandstats calls / req | of which (incl. inside Lua) | server µs / req |"
    )
    .unwrap();
    writeln!(out, "| --- | --- | --- | --- | --- | --- |").unwrap();
    for (label, c, ours_count) in &rows {
        let check = match ours_count {
            Some(own) => format!(" (store's own count: {})", ratio(*own, 2 * n)),
            None => String::new(),
        };
        writeln!(
            out,
            "| {label} | {}{check} | {} | {} | {} | {:.1} |",
            ratio(c.client_total(), n),
            per_request(&c.client, n),
            ratio(c.stats_total(), n),
            per_request(&c.stats, n),
            c.usec as f64 / n as f64,
        )
        .unwrap();
    }
    if !hexpire {
        writeln!(
            out,
            "| axum-idempotent | n/a: {version} has no HEXPIRE, which ruts 0.13's RedisStore needs (Redis >= 7.4, Valkey >= 9) | | | | |"
        )
        .unwrap();
    }
    let lua_note = rows
        .iter()
        .map(|(label, c, _)| format!("{label}: {}", per_request(&c.lua, n)))
        .collect::<Vec<_>>()
        .join("; ");
    writeln!(
        out,
        "\nRun inside scripts (MONITOR `[lua]`), per request: {lua_note}.\n"
    )
    .unwrap();
}

/// 16 concurrent requests with one key to a handler that takes 50 ms.
async fn concurrent(
    app: Router,
    handler: &Handler,
    cookie: Option<axum::http::HeaderValue>,
) -> String {
    const N: usize = 16;
    let key = format!("{}concurrent", bench::run_prefix());
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let app = app.clone();
            let key = key.clone();
            let cookie = cookie.clone();
            tokio::spawn(async move {
                send(
                    &app,
                    request("/payments", Some(&key), cookie.as_ref(), BODY),
                )
                .await
            })
        })
        .collect();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut bodies = std::collections::BTreeSet::new();
    for task in tasks {
        let reply = task.await.expect("task");
        *statuses.entry(reply.status.as_u16()).or_default() += 1;
        if reply.status.is_success() {
            bodies.insert(reply.body);
        }
    }
    let runs = handler.runs();
    let later = send(
        &app,
        request("/payments", Some(&key), cookie.as_ref(), BODY),
    )
    .await;
    let statuses = statuses
        .iter()
        .map(|(s, n)| format!("{n}× {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    let later_id = id_of(&later.body);
    format!(
        "| {runs} | {statuses} | {} | {} {}{} |",
        bodies.len(),
        later.status.as_u16(),
        later_id,
        if later.replayed { " (replayed)" } else { "" }
    )
}

fn id_of(body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    body.split('"')
        .find(|s| s.starts_with("pay_"))
        .map(str::to_string)
        .unwrap_or_else(|| "-".into())
}

async fn concurrency(server: &Server, out: &mut String) {
    let delay = Duration::from_millis(50);
    writeln!(out, "### 16 concurrent requests, one key, 50 ms handler\n").unwrap();
    writeln!(
        out,
        "| stack | handler runs | answers | distinct 2xx bodies | a retry afterwards gets |"
    )
    .unwrap();
    writeln!(out, "| --- | --- | --- | --- | --- |").unwrap();

    let h = Handler::with_delay(delay);
    let app = bench::ours(&h, bench::our_layer(MemoryStore::default()));
    let row = concurrent(app, &h, None).await;
    writeln!(
        out,
        "| tower-idempotency, MemoryStore (default: 409 in flight) {row}"
    )
    .unwrap();
    let h = Handler::with_delay(delay);
    let layer =
        bench::our_layer(MemoryStore::default()).in_flight(InFlight::Wait(Duration::from_secs(5)));
    let row = concurrent(bench::ours(&h, layer), &h, None).await;
    writeln!(
        out,
        "| tower-idempotency, MemoryStore, `InFlight::Wait(5 s)` {row}"
    )
    .unwrap();
    let h = Handler::with_delay(delay);
    let app = bench::peer(&h, Arc::new(bench::moka_store()));
    let cookie = bench::establish_session(&app).await;
    let row = concurrent(app, &h, Some(cookie)).await;
    writeln!(out, "| axum-idempotent, MokaStore (one session) {row}").unwrap();

    let url = server.url();
    let ctl = bench::redis_client(&url).await.expect("client");
    let prefix = bench::run_prefix();
    let store = bench::our_redis_store(bench::redis_client(&url).await.unwrap(), &prefix).await;
    let h = Handler::with_delay(delay);
    let row = concurrent(bench::ours(&h, bench::our_layer(store.clone())), &h, None).await;
    writeln!(
        out,
        "| tower-idempotency, RedisStore (default: 409 in flight) {row}"
    )
    .unwrap();
    let h = Handler::with_delay(delay);
    let layer = bench::our_layer(store).in_flight(InFlight::Wait(Duration::from_secs(5)));
    let row = concurrent(bench::ours(&h, layer), &h, None).await;
    writeln!(
        out,
        "| tower-idempotency, RedisStore, `InFlight::Wait(5 s)` {row}"
    )
    .unwrap();
    if bench::supports_hexpire(&ctl).await {
        let store = bench::peer_redis_store(bench::redis_client(&url).await.unwrap()).await;
        let h = Handler::with_delay(delay);
        let app = bench::peer(&h, Arc::new(store));
        let cookie = bench::establish_session(&app).await;
        let row = concurrent(app, &h, Some(cookie)).await;
        writeln!(
            out,
            "| axum-idempotent, ruts RedisStore (one session) {row}"
        )
        .unwrap();
    }
    writeln!(out).unwrap();
}

/// A few retries that the two crates answer differently (in-memory stores).
async fn semantics(out: &mut String) {
    const OTHER_BODY: &str = r#"{"amount":9999,"currency":"EUR","reference":"order-8e03978e"}"#;
    let ours_h = Handler::new();
    let ours = bench::ours(&ours_h, bench::our_layer(MemoryStore::default()));
    let peer_h = Handler::new();
    let peer = bench::peer(&peer_h, Arc::new(bench::moka_store()));
    let cookie = bench::establish_session(&peer).await;
    let other_session = bench::establish_session(&peer).await;

    let describe = |reply: &bench::Reply, runs_before: u64, runs_after: u64| {
        let ran = if runs_after > runs_before {
            "handler ran"
        } else {
            "handler did not run"
        };
        let replay = if reply.replayed { ", replayed" } else { "" };
        let id = id_of(&reply.body);
        let id = if id == "-" {
            String::new()
        } else {
            format!(" {id}")
        };
        format!("{}{id}{replay}; {ran}", reply.status.as_u16())
    };

    writeln!(
        out,
        "### Same key, something else different (after a completed first request)\n"
    )
    .unwrap();
    writeln!(out, "| retry | tower-idempotency | axum-idempotent |").unwrap();
    writeln!(out, "| --- | --- | --- |").unwrap();

    // (retry, path, body, cookie of the retry: 0 same session, 1 none, 2 another session)
    let variants = [
        ("identical", "/payments", BODY, 0),
        ("another body", "/payments", OTHER_BODY, 0),
        ("another route (`/orders`)", "/orders", BODY, 0),
        ("no session cookie", "/payments", BODY, 1),
        ("another session's cookie", "/payments", BODY, 2),
    ];
    for (i, (label, path, body, cookie_mode)) in variants.into_iter().enumerate() {
        let key = format!("semantics-{i}");
        send(&ours, request("/payments", Some(&key), None, BODY)).await;
        let before = ours_h.runs();
        let reply = send(&ours, request(path, Some(&key), None, body)).await;
        let ours_cell = describe(&reply, before, ours_h.runs());

        send(&peer, request("/payments", Some(&key), Some(&cookie), BODY)).await;
        let retry_cookie = match cookie_mode {
            0 => Some(&cookie),
            1 => None,
            _ => Some(&other_session),
        };
        let before = peer_h.runs();
        let reply = send(&peer, request(path, Some(&key), retry_cookie, body)).await;
        let peer_cell = describe(&reply, before, peer_h.runs());
        writeln!(out, "| {label} | {ours_cell} | {peer_cell} |").unwrap();
    }
    // The peer without any session at all: is anything stored?
    let key = "semantics-no-session";
    let before = peer_h.runs();
    send(&peer, request("/payments", Some(key), None, BODY)).await;
    let reply = send(&peer, request("/payments", Some(key), None, BODY)).await;
    let peer_cell = describe(&reply, before + 1, peer_h.runs());
    send(&ours, request("/payments", Some(key), None, BODY)).await;
    let before = ours_h.runs();
    let reply = send(&ours, request("/payments", Some(key), None, BODY)).await;
    let ours_cell = describe(&reply, before, ours_h.runs());
    writeln!(
        out,
        "| first request and retry both without a cookie | {ours_cell} | {peer_cell} |"
    )
    .unwrap();
    writeln!(out).unwrap();
}

/// The peer's MokaStore prunes the whole session map on each write: time per new-key
/// request in one session that already holds `size` cached responses, next to ours with
/// as many records in its store.
async fn growth(out: &mut String) {
    const BATCH: u64 = 1000;
    writeln!(
        out,
        "### New key per request, with `size` responses already cached (in memory, one session)\n"
    )
    .unwrap();
    writeln!(
        out,
        "| size | tower-idempotency, µs / req | axum-idempotent, µs / req |"
    )
    .unwrap();
    writeln!(out, "| --- | --- | --- |").unwrap();
    let ours_h = Handler::new();
    let ours = bench::ours(&ours_h, bench::our_layer(MemoryStore::default()));
    let peer_h = Handler::new();
    let peer = bench::peer(&peer_h, Arc::new(bench::moka_store()));
    let cookie = bench::establish_session(&peer).await;
    let mut filled = 0;
    for size in [0u64, 1_000, 10_000, 40_000] {
        let fill = |p: &'static str| move |i| format!("{p}{}", filled + i);
        drive(&ours, size - filled, None, fill("fill-")).await;
        drive(&peer, size - filled, Some(&cookie), fill("fill-")).await;
        filled = size;
        let start = Instant::now();
        drive(&ours, BATCH, None, |i| format!("timed-{size}-{i}")).await;
        let ours_us = start.elapsed().as_secs_f64() * 1e6 / BATCH as f64;
        let start = Instant::now();
        drive(&peer, BATCH, Some(&cookie), |i| format!("timed-{size}-{i}")).await;
        let peer_us = start.elapsed().as_secs_f64() * 1e6 / BATCH as f64;
        filled += BATCH;
        writeln!(out, "| {size} | {ours_us:.1} | {peer_us:.1} |").unwrap();
    }
    writeln!(out).unwrap();
}

/// Per-request latency on Redis, the four cases interleaved in rounds of 100 requests,
/// so that load from outside shifts all of them alike (criterion runs cases one after
/// another). Current-thread runtime.
async fn interleaved(server: &Server, rounds: u64, out: &mut String) {
    const BATCH: u64 = 100;
    let url = server.url();
    let ctl = bench::redis_client(&url).await.expect("client");
    if !bench::supports_hexpire(&ctl).await {
        return;
    }
    let prefix = bench::run_prefix();
    let h = Handler::new();
    let ours = bench::ours(
        &h,
        bench::our_layer(
            bench::our_redis_store(bench::redis_client(&url).await.unwrap(), &prefix).await,
        ),
    );
    let peer = bench::peer(
        &h,
        Arc::new(bench::peer_redis_store(bench::redis_client(&url).await.unwrap()).await),
    );
    let bare = bench::bare(&h);
    let replay_cookie = bench::establish_session(&peer).await;
    send(&ours, request("/payments", Some("il-replay"), None, BODY)).await;
    send(
        &peer,
        request("/payments", Some("il-replay"), Some(&replay_cookie), BODY),
    )
    .await;
    let labels = [
        "bare axum",
        "tower-idempotency, new key",
        "axum-idempotent, new key",
        "tower-idempotency, replay",
        "axum-idempotent, replay",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); labels.len()];
    for round in 0..rounds {
        let new_cookie = bench::establish_session(&peer).await;
        for (case, samples) in samples.iter_mut().enumerate() {
            for i in 0..BATCH {
                let key = format!("il-{round}-{i}");
                let req = match case {
                    0 => request("/payments", Some(&key), None, BODY),
                    1 => request("/payments", Some(&key), None, BODY),
                    2 => request("/payments", Some(&key), Some(&new_cookie), BODY),
                    3 => request("/payments", Some("il-replay"), None, BODY),
                    _ => request("/payments", Some("il-replay"), Some(&replay_cookie), BODY),
                };
                let app = match case {
                    0 => &bare,
                    1 | 3 => &ours,
                    _ => &peer,
                };
                let start = Instant::now();
                let reply = send(app, req).await;
                samples.push(start.elapsed().as_secs_f64() * 1e6);
                assert!(reply.status.is_success());
            }
        }
    }
    writeln!(
        out,
        "### Redis latency per request, cases interleaved ({rounds} rounds of {BATCH} each)\n"
    )
    .unwrap();
    writeln!(out, "| case | p10 µs | p50 µs | p90 µs | mean µs |").unwrap();
    writeln!(out, "| --- | --- | --- | --- | --- |").unwrap();
    for (label, mut s) in labels.iter().zip(samples) {
        s.sort_by(f64::total_cmp);
        let q = |p: f64| s[((s.len() - 1) as f64 * p) as usize];
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        writeln!(
            out,
            "| {label} | {:.1} | {:.1} | {:.1} | {mean:.1} |",
            q(0.1),
            q(0.5),
            q(0.9)
        )
        .unwrap();
    }
    writeln!(out).unwrap();
}

fn main() {
    let n: u64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let current: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let server = Server::start();
    eprintln!("throwaway server on port {}", server.port);
    let mut out = String::new();
    multi.block_on(redis_counts(&server, n, &mut out));
    multi.block_on(concurrency(&server, &mut out));
    let rounds = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    current.block_on(interleaved(&server, rounds, &mut out));
    drop(server);
    multi.block_on(semantics(&mut out));
    current.block_on(growth(&mut out));
    print!("{out}");
}
