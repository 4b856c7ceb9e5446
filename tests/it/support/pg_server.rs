//! Where the tests' Postgres is. One file for both test binaries, so both follow one rule:
//! `tests/it` has it as `support::pg_server`, and `crates/idempotency-check/tests/check`
//! includes this same file with `#[path]` (it uses nothing of `tests/it` but the
//! `tower-idempotency-postgres` dev-dependency both packages have).
//!
//! [`database_url`] looks, once per test process, in this order:
//!
//! 1. `DATABASE_URL`, if set and a server answers there. A server that answers but refuses
//!    (authentication, no such database) is an error: the variable was meant. If nothing
//!    answers (connection refused, timed out, unknown host) the search goes on: on a
//!    developer's machine a stale `DATABASE_URL` (another project, an old container) is
//!    far likelier than a wish to fail, and the fallbacks only ever touch the default test
//!    server or a cluster of the tests' own. A line on stderr says what was used instead.
//! 2. `postgres://postgres@127.0.0.1:5432/test`, the shared server of `docker compose up
//!    -d postgres`, if it answers. `TIDEM_TEST_NO_SHARED_POSTGRES=1` skips it: that is how
//!    step 3 is proved on a machine whose shared server others are using.
//! 3. A throwaway cluster for this test process ([`Cluster`]): `initdb` and `postgres`
//!    from `PATH`, else from the newest `/usr/lib/postgresql/*/bin`; a temp dir, a free
//!    loopback port, trust auth, `fsync=off`, database `test`. As root (where `initdb` and
//!    `postgres` refuse to run) both run as the `postgres` system user, through `runuser`
//!    or else `su`. `TIDEM_TEST_NO_THROWAWAY_POSTGRES=1` skips this step.
//! 4. Otherwise a panic naming `docker compose up -d postgres` and what each step found.
//!
//! The cluster stops when the test process exits, however it exits: it runs under a small
//! `sh` whose stdin is a pipe only this process holds; at EOF the shell sends the server
//! SIGINT (a fast shutdown, what `pg_ctl stop -m fast` sends), SIGKILL 15 s later if it is
//! still up, waits for it and removes the temp dir.

// Each binary uses a different part of this file.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tower_idempotency_postgres::sqlx::{self, Connection, PgConnection};

/// The default test server (step 2).
pub const SHARED_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The hint every failure to find Postgres carries.
pub const NO_POSTGRES: &str = "no Postgres answered: set DATABASE_URL, start one with \
    `docker compose up -d postgres` (postgres:15, trust auth, database `test`), or install \
    PostgreSQL's server binaries (`initdb`, `postgres`) for a throwaway cluster";

/// Env var that skips step 2 (the shared server at 127.0.0.1:5432).
pub const NO_SHARED_VAR: &str = "TIDEM_TEST_NO_SHARED_POSTGRES";
/// Env var that skips step 3 (the throwaway cluster).
pub const NO_THROWAWAY_VAR: &str = "TIDEM_TEST_NO_THROWAWAY_POSTGRES";

/// Where the test databases are, found once per process (see the module docs); panics
/// with [`NO_POSTGRES`] and what each step found if there is none. The first call may
/// block for a few seconds (probes, `initdb`); later calls return at once.
pub fn database_url() -> String {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        // A thread of its own: the probes run a runtime, and callers may be inside one.
        std::thread::spawn(find_from_env)
            .join()
            .unwrap_or_else(|_| Err("looking for Postgres panicked".to_string()))
    });
    match found {
        Ok(url) => url.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// What a connection attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Connected and authenticated.
    Answers,
    /// Nobody there: refused, timed out, unreachable, unknown host.
    Nobody(String),
    /// A server answered and refused us (authentication, no such database, TLS...).
    Refuses(String),
}

/// The inputs of the search, read from the environment by [`Settings::from_env`].
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub database_url: Option<String>,
    pub skip_shared: bool,
    pub no_throwaway: bool,
    /// The directory holding `initdb` and `postgres`, if any ([`find_bin_dir`]).
    pub bin_dir: Option<PathBuf>,
}

impl Settings {
    pub fn from_env() -> Settings {
        let flag = |name: &str| {
            std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
        };
        Settings {
            database_url: std::env::var("DATABASE_URL")
                .ok()
                .filter(|u| !u.trim().is_empty()),
            skip_shared: flag(NO_SHARED_VAR),
            no_throwaway: flag(NO_THROWAWAY_VAR),
            bin_dir: find_bin_dir(
                std::env::var_os("PATH").as_deref(),
                Path::new("/usr/lib/postgresql"),
            ),
        }
    }
}

/// The decision, apart from the world: `probe` tries a URL, `start` starts a throwaway
/// cluster from a bin dir and returns its URL. `Ok((url, notes))`, where `notes` says
/// why an earlier step was passed over (empty when `DATABASE_URL` answered).
pub fn discover(
    settings: &Settings,
    probe: &mut dyn FnMut(&str) -> Probe,
    start: &mut dyn FnMut(&Path) -> Result<String, String>,
) -> Result<(String, Vec<String>), String> {
    let mut notes = Vec::new();
    if let Some(url) = &settings.database_url {
        match probe(url) {
            Probe::Answers => return Ok((url.clone(), notes)),
            Probe::Refuses(e) => {
                return Err(format!(
                    "DATABASE_URL={url} answered but refused the tests: {e} (fix it, or unset it \
                     to use 127.0.0.1:5432 or a throwaway cluster)"
                ))
            }
            // A stale variable on a dev machine: look further (see the module docs).
            Probe::Nobody(e) => notes.push(format!("DATABASE_URL={url}: nothing answers ({e})")),
        }
    }
    if settings.skip_shared {
        notes.push(format!("{SHARED_URL}: skipped ({NO_SHARED_VAR})"));
    } else if settings.database_url.as_deref() != Some(SHARED_URL) {
        match probe(SHARED_URL) {
            Probe::Answers => return Ok((SHARED_URL.to_string(), notes)),
            // Nobody configured it: a server there that refuses us is someone else's.
            Probe::Nobody(e) | Probe::Refuses(e) => notes.push(format!("{SHARED_URL}: {e}")),
        }
    }
    if settings.no_throwaway {
        notes.push(format!("throwaway cluster: skipped ({NO_THROWAWAY_VAR})"));
    } else if let Some(bin) = &settings.bin_dir {
        match start(bin) {
            Ok(url) => return Ok((url, notes)),
            Err(e) => notes.push(format!("throwaway cluster from {}: {e}", bin.display())),
        }
    } else {
        notes.push(
            "throwaway cluster: no `initdb` and `postgres` on PATH or under \
             /usr/lib/postgresql/*/bin"
                .to_string(),
        );
    }
    Err(format!("{NO_POSTGRES}\n  - {}", notes.join("\n  - ")))
}

/// The first directory of `path` holding both `initdb` and `postgres`, else the
/// `<root>/<version>/bin` with the highest version that does (Debian's layout).
pub fn find_bin_dir(path: Option<&OsStr>, root: &Path) -> Option<PathBuf> {
    let has_both =
        |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"));
    if let Some(dir) = path
        .into_iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_both(dir))
    {
        return Some(dir);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.to_owned();
            let key: Vec<u32> = version
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((key, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// [`discover`] against the real environment: real probes, a real cluster (kept in a
/// static for the life of the process). Tells stderr (past the test harness's capture)
/// when it used anything but `DATABASE_URL`.
fn find_from_env() -> Result<String, String> {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    let settings = Settings::from_env();
    let mut start = |bin: &Path| {
        let cluster = Cluster::start(bin)?;
        let url = cluster.url().to_string();
        let _ = SHARED.set(cluster);
        Ok(url)
    };
    let (url, notes) = discover(&settings, &mut probe, &mut start)?;
    if !notes.is_empty() {
        let what = match SHARED.get() {
            Some(c) => format!("a throwaway cluster, {url} (in {})", c.dir().display()),
            None => url.clone(),
        };
        let _ = writeln!(
            std::io::stderr(),
            "tests: Postgres is {what}; passed over: {}",
            notes.join("; ")
        );
    }
    Ok(url)
}

/// Connects to `url` (bounded by 5 s) and closes again.
pub fn probe(url: &str) -> Probe {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Probe::Nobody(format!("no runtime to probe with: {e}")),
    };
    runtime.block_on(async {
        match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(url)).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                Probe::Answers
            }
            Ok(Err(sqlx::Error::Io(e))) => Probe::Nobody(e.to_string()),
            Ok(Err(e)) => Probe::Refuses(e.to_string()),
            Err(_) => Probe::Nobody("no answer within 5 s".to_string()),
        }
    })
}

/// Who runs `initdb` and `postgres`: this process's user, or (as root, which both refuse)
/// the `postgres` system user through `runuser`, else `su`.
#[derive(Clone, Debug)]
enum RunAs {
    Me,
    Postgres { uid: u32, gid: u32, runuser: bool },
}

impl RunAs {
    fn detect() -> Result<RunAs, String> {
        let id = |args: &[&str]| -> Option<u32> {
            let out = Command::new("id")
                .args(args)
                .stderr(Stdio::null())
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        match id(&["-u"]) {
            Some(0) => {}
            Some(_) => return Ok(RunAs::Me),
            None => return Err("cannot tell who this process runs as (`id -u` failed)".into()),
        }
        let (Some(uid), Some(gid)) = (id(&["-u", "postgres"]), id(&["-g", "postgres"])) else {
            return Err(
                "running as root, where initdb and postgres refuse to run, and there \
                 is no `postgres` user to run them as: create one (`useradd --system \
                 postgres`), run the tests as another user, or set DATABASE_URL"
                    .into(),
            );
        };
        let runuser = Command::new("runuser")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Ok(RunAs::Postgres { uid, gid, runuser })
    }

    /// `program args...`, as this user.
    fn command(&self, program: &Path) -> Command {
        match self {
            RunAs::Me => Command::new(program),
            RunAs::Postgres { runuser: true, .. } => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            }
            RunAs::Postgres { runuser: false, .. } => {
                // su hands the arguments after `-c CMD` to the shell as $0, $1...
                let mut c = Command::new("su");
                c.args(["-s", "/bin/sh", "postgres", "-c", r#"exec "$0" "$@""#])
                    .arg(program);
                c
            }
        }
    }
}

/// The guard script: runs the server (`$2...`) with its output in `$1/postgres.log`; at
/// EOF on stdin (this process gone, or [`Cluster::stop`]) marks `$1/.stopping`, sends
/// SIGINT (fast shutdown), SIGKILL if the server is still up 15 s later, and once it is
/// gone removes `$1`. A server that exits by itself leaves `$1` for [`Cluster::start`] to
/// read the log from (and remove).
const GUARD: &str = r#"
dir=$1; shift
exec 3<&0 </dev/null
"$@" >>"$dir/postgres.log" 2>&1 &
pg=$!
(
    while read -r _; do :; done
    : >"$dir/.stopping"
    kill -INT "$pg" 2>/dev/null
    i=0
    while kill -0 "$pg" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 150 ]; then kill -KILL "$pg" 2>/dev/null; break; fi
        sleep 0.1
    done
) <&3 3<&- >/dev/null 2>&1 &
guard=$!
exec 3<&-
wait "$pg"
if [ -e "$dir/.stopping" ]; then
    wait "$guard"
    rm -rf "$dir"
else
    kill "$guard" 2>/dev/null
fi
"#;

/// A throwaway Postgres cluster: its own temp dir, free loopback port, trust auth,
/// `fsync=off`, `max_connections=300`, database `test`. Dropping it (or [`stop`]) stops
/// the server and removes the dir; so does this process's exit (see the module docs).
///
/// [`stop`]: Cluster::stop
pub struct Cluster {
    url: String,
    port: u16,
    dir: PathBuf,
    guard: Option<Child>,
}

impl Cluster {
    /// `initdb`, then the server under the guard script, then `CREATE DATABASE test`.
    /// Retries twice on a fresh port if the server exits at start (a port taken meanwhile).
    /// Blocks for a few seconds; bounded throughout.
    pub fn start(bin: &Path) -> Result<Cluster, String> {
        let run_as = RunAs::detect()?;
        let mut last = String::new();
        for _ in 0..3 {
            match Cluster::try_start(bin, &run_as) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn try_start(bin: &Path, run_as: &RunAs) -> Result<Cluster, String> {
        let dir = std::env::temp_dir().join(format!("tidem-pg-{}", unique()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let remove = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        if let RunAs::Postgres { uid, gid, .. } = run_as {
            std::os::unix::fs::chown(&dir, Some(*uid), Some(*gid))
                .map_err(|e| remove(format!("cannot chown {} to postgres: {e}", dir.display())))?;
        }
        let data = dir.join("data");
        let log = dir.join("initdb.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| remove(format!("cannot create {}: {e}", log.display())))?;
        let mut initdb = run_as.command(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log_file.try_clone().map_err(|e| remove(e.to_string()))?,
            ))
            .stderr(Stdio::from(log_file));
        if let Err(e) = run_bounded(&mut initdb, Duration::from_secs(120)) {
            let tail = tail(&log);
            return Err(remove(format!("initdb failed: {e}; its output:\n{tail}")));
        }

        // TLS as on the shared server (`ssl = on`), so the sslmode=require test runs here
        // too: a self-signed certificate in the data directory, when `openssl` is there.
        let ssl = self_signed_certificate(run_as, &data);

        let port = free_port();
        let mut guard = run_as.command(Path::new("sh"));
        guard
            .args(["-c", GUARD, "tidem-pg-guard"])
            .arg(&dir)
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(["-c", if ssl { "ssl=on" } else { "ssl=off" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let guard = guard
            .spawn()
            .map_err(|e| remove(format!("cannot spawn the server's guard shell: {e}")))?;
        let mut cluster = Cluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/test"),
            port,
            dir,
            guard: Some(guard),
        };
        match cluster.wait_ready() {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.stop();
                Err(e)
            }
        }
    }

    /// Waits (up to 60 s) for the server to take connections, then creates `test`.
    fn wait_ready(&mut self) -> Result<(), String> {
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match probe(&admin) {
                Probe::Answers => break,
                Probe::Refuses(e) if !e.contains("starting up") => {
                    return Err(format!("the new server refuses us: {e}"))
                }
                _ => {}
            }
            let exited = self
                .guard
                .as_mut()
                .and_then(|g| g.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let what = exited.map_or("did not answer within 60 s".into(), |s| {
                    format!("exited ({s})")
                });
                return Err(format!(
                    "postgres on port {} {what}; log:\n{}",
                    self.port,
                    tail(&self.dir.join("postgres.log"))
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let create = async {
                let mut conn = PgConnection::connect(&admin).await?;
                sqlx::raw_sql("CREATE DATABASE test")
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            };
            match tokio::time::timeout(Duration::from_secs(30), create).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("CREATE DATABASE test: {e}")),
                Err(_) => Err("CREATE DATABASE test took over 30 s".to_string()),
            }
        })
    }

    /// `postgres://postgres@127.0.0.1:PORT/test`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir: `data/`, `postgres.log`, `initdb.log`, the Unix socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Closes the guard's stdin (so it stops the server and removes the dir) and waits up
    /// to 30 s for that; if the server had exited by itself, removes the dir here.
    /// Idempotent.
    pub fn stop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        drop(guard.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while guard.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if guard.try_wait().ok().flatten().is_none() {
            let _ = guard.kill();
            let _ = guard.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `cmd` to completion within `limit` (killed past it).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(), String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{s}")),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The last 20 lines of a log file.
fn tail(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A free loopback port (another process may take it before the server binds it: the
/// caller retries).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 for a free port")
}

/// `<pid>-<nanos>-<n>`.
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `(host, port)` of a `postgres://` URL (port 5432 if none), for proxies in front of it.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match host_port.rsplit_once(':') {
        Some((h, p)) if !host_port.ends_with(']') => Some((h.to_string(), p.parse().ok()?)),
        _ => Some((host_port.to_string(), 5432)),
    }
}

/// `url` with its `host[:port]` replaced by `addr` (e.g. a fault proxy's).
pub fn with_host_port(url: &str, addr: std::net::SocketAddr) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map_or(String::new(), |(u, _)| format!("{u}@"));
    Some(format!("{scheme}://{userinfo}{addr}{tail}"))
}

/// Writes `server.crt` and `server.key` (mode 0600, owned by the server's user) into
/// `data`, Postgres's default paths for them; `false` when `openssl` is missing or fails,
/// and the cluster then runs without TLS.
fn self_signed_certificate(run_as: &RunAs, data: &Path) -> bool {
    let mut openssl = run_as.command(Path::new("openssl"));
    openssl
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(data.join("server.key"))
        .arg("-out")
        .arg(data.join("server.crt"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut chmod = run_as.command(Path::new("chmod"));
    chmod
        .arg("600")
        .arg(data.join("server.key"))
        .stdin(Stdio::null());
    run_bounded(&mut openssl, Duration::from_secs(60)).is_ok()
        && run_bounded(&mut chmod, Duration::from_secs(10)).is_ok()
}
