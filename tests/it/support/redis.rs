//! Redis for integration tests: [`redis_url`] finds a shared server, [`RedisServer`] is a
//! throwaway `redis-server` child that one test owns and may crash, restart or reconfigure.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const NO_REDIS: &str = "no Redis found: set REDIS_URL, start one with \
    `docker compose up -d redis`, or install redis-server";

/// URL of a Redis server that tests may share (each test uses its own
/// [`unique_prefix`](super::unique_prefix); nobody flushes it).
///
/// Looks, in order, at: env `REDIS_URL`; `127.0.0.1:6379` if it answers `PING` within
/// ~500 ms; a `redis-server` spawned once per test process (it lives until the process
/// exits, when a watchdog kills it and removes its dir). Panics if none works.
pub async fn redis_url() -> String {
    if let Ok(url) = std::env::var("REDIS_URL") {
        if !url.trim().is_empty() {
            return url;
        }
    }
    static URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    URL.get_or_init(|| async {
        if ping_local(6379).await {
            return "redis://127.0.0.1:6379".to_string();
        }
        tokio::task::spawn_blocking(|| {
            static SHARED: OnceLock<RedisServer> = OnceLock::new();
            if let Some(server) = SHARED.get() {
                return server.url();
            }
            let server = RedisServer::try_start(&[], false)
                .unwrap_or_else(|e| panic!("{NO_REDIS} (spawning redis-server failed: {e})"));
            let url = server.url();
            let _ = SHARED.set(server);
            url
        })
        .await
        .unwrap_or_else(|e| panic!("{NO_REDIS} ({e})"))
    })
    .await
    .clone()
}

/// Whether `127.0.0.1:port` answers a raw RESP `PING` with `+PONG` within ~500 ms.
async fn ping_local(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n").await.ok()?;
        let mut reply = [0u8; 7];
        s.read_exact(&mut reply).await.ok()?;
        Some(reply.starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

/// Blocking twin of [`ping_local`], for the synchronous start-up waits.
fn ping_blocking(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let addr = ([127, 0, 0, 1], port).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut reply = [0u8; 7];
        s.read_exact(&mut reply)?;
        Ok(reply.starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}

/// Whether `redis-server` is on PATH (tests that need their own server skip without it).
pub fn redis_server_available() -> bool {
    runs("redis-server")
}

/// Whether `redis-cli` is on PATH (needed by [`redis_cli`] and the cluster support).
pub fn redis_cli_available() -> bool {
    runs("redis-cli")
}

fn runs(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Major version of the `redis-server` on PATH (0 if unknown).
fn server_major_version() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new("redis-server").arg("--version").output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        text.split("v=")
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    })
}

/// Runs `redis-cli -h 127.0.0.1 -p PORT ARGS...` and returns its stdout, for poking a
/// server from a test (`SCRIPT FLUSH`, `CONFIG SET`, `DEBUG SLEEP`, `INFO commandstats`,
/// `REPLICAOF NO ONE`). Redis error replies come back as text (e.g. `ERR ...`); only a
/// failure to run or connect panics. It blocks the thread: wrap long calls such as
/// `DEBUG SLEEP` in `tokio::task::spawn_blocking`.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run redis-cli (is it on PATH?): {e}"));
    assert!(
        out.status.success(),
        "redis-cli -p {port} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Client commands `name` (`evalsha`, `eval`, `wait`) the server on `port` has run, from
/// `INFO commandstats` (`calls` plus `rejected_calls`, so an error reply counts too).
pub fn client_commands(port: u16, name: &str) -> u64 {
    let stats = redis_cli(port, &["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{name}:");
    let Some(line) = stats.lines().find_map(|l| l.trim().strip_prefix(&prefix)) else {
        return 0;
    };
    line.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "calls" || *k == "rejected_calls")
        .map(|(_, v)| v.parse::<u64>().expect("commandstats count"))
        .sum()
}

/// A free loopback port (bind `127.0.0.1:0`, read it, release it). With `bus_too`, port +
/// 10000 (the cluster bus port) is free as well. Another process may still grab it before
/// we use it, so callers retry on start-up failure.
pub(super) fn free_port(bus_too: bool) -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0 for a free port");
        let port = l
            .local_addr()
            .expect("local_addr of a bound listener")
            .port();
        if !bus_too || (port <= 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()) {
            return port;
        }
    }
    panic!("found no free loopback port (with bus port: {bus_too}) in 200 tries")
}

/// A child process plus a watchdog `sh` that SIGKILLs it and removes its dir when this
/// test process dies without running `Drop` (panic=abort, SIGKILL on timeout, or a server
/// leaked in a `static`): the watchdog waits for EOF on a pipe only we hold open.
pub(crate) struct Guarded {
    pub(crate) child: Child,
    watchdog: Option<Child>,
}

impl Guarded {
    pub(crate) fn new(child: Child, dir: &Path) -> Self {
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(r#"while read -r _; do :; done; kill -9 "$1" 2>/dev/null; rm -rf "$2""#)
            .arg("tidem-watchdog")
            .arg(child.id().to_string())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok(); // best effort: without sh we only lose the crash-time cleanup
        Guarded { child, watchdog }
    }

    /// Kills the watchdog first (so it never signals a reused pid), then the child.
    pub(crate) fn kill(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway `redis-server` this test owns: own free port, own temp `--dir`, no
/// persistence unless asked for, `DEBUG` enabled for local clients (Redis 7+).
///
/// Use it for tests that crash, restart, reconfigure or slow down the server; the shared
/// one from [`redis_url`] must not be disturbed. Dropping it kills the process and
/// removes its dir. Starting and restarting block the thread briefly (well under 1 s).
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    proc: Option<Guarded>,
}

impl RedisServer {
    /// Starts a plain server (`--save '' --appendonly no`); panics if it cannot.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra arguments appended after the defaults (so they win),
    /// e.g. `&["--appendonly", "yes", "--appendfsync", "always"]` or
    /// `&["--replicaof", "127.0.0.1", "6380"]`. Panics with the server log if it fails.
    pub fn start_with(args: &[&str]) -> Self {
        Self::try_start(args, false).unwrap_or_else(|e| panic!("RedisServer::start_with: {e}"))
    }

    /// Starts on a fresh free port, retrying a few times in case another process took it.
    pub(super) fn try_start(args: &[&str], bus_port_free: bool) -> Result<Self, String> {
        if !redis_server_available() {
            return Err("redis-server is not on PATH".into());
        }
        let mut last_err = String::new();
        for _ in 0..5 {
            let dir = std::env::temp_dir().join(format!("tidem-redis-{}", super::unique_suffix()));
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let mut server = RedisServer {
                port: free_port(bus_port_free),
                dir,
                args: args.iter().map(|a| a.to_string()).collect(),
                proc: None,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = e, // `server` drops here and removes its dir
            }
        }
        Err(last_err)
    }

    /// Spawns `redis-server` on `self.port` with `self.dir` and waits up to 10 s for PING.
    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log);
        if server_major_version() >= 7 {
            cmd.args(["--enable-debug-command", "local"]);
        }
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot spawn redis-server: {e}"))?;
        self.proc = Some(Guarded::new(child, &self.dir));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping_blocking(self.port) {
                return Ok(());
            }
            let exited = self
                .proc
                .as_mut()
                .and_then(|p| p.child.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.stop();
                let what = exited.map_or("did not answer PING within 10 s".into(), |s| {
                    format!("exited ({s})")
                });
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "redis-server on port {} {what}; args {:?}; log tail:\n{}",
                    self.port,
                    self.args,
                    tail.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's `--dir` (AOF/RDB files, `nodes.conf`, `redis.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server with SIGKILL and reaps it: a crash. Without AOF its data is gone.
    /// Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// [`stop`](Self::stop), then starts again on the same port with the same args and
    /// dir and waits for PING (so with `--appendonly yes --appendfsync always` the data
    /// survives). Panics if the server does not come back within 10 s.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("RedisServer::restart: {e}");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
