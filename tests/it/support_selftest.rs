//! Tests of the test support itself (tests/support/): Redis discovery, throwaway servers,
//! the cluster and the fault proxy. Run with `-- --test-threads=1` for tidy timings.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::cluster::RedisCluster;
use support::proxy::FaultProxy;
use support::redis::{redis_cli, redis_server_available, redis_url, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

#[derive(Debug, PartialEq)]
enum Reply {
    /// Exactly these bytes, then the connection was closed or reset.
    ClosedAfter(Vec<u8>),
    /// `+PONG\r\n`.
    Pong,
    /// Nothing complete within the timeout.
    Timeout,
}

/// Sends a raw RESP PING on `s` and reads the reply for up to `within`.
async fn ping(s: &mut TcpStream, within: Duration) -> Reply {
    if s.write_all(PING).await.is_err() {
        return Reply::ClosedAfter(Vec::new());
    }
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Reply::ClosedAfter(got.clone()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got == b"+PONG\r\n" {
                return Reply::Pong;
            }
        }
    });
    read.await.unwrap_or(Reply::Timeout)
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr)
        .await
        .expect("connect to the proxy")
}

#[test]
fn unique_prefixes_differ() {
    let a = support::unique_prefix("t");
    let b = support::unique_prefix("t");
    assert_ne!(a, b);
    assert!(a.starts_with("tidem-test:t:") && a.ends_with(':'), "{a}");
}

#[tokio::test]
async fn redis_url_answers_ping() {
    let url = redis_url().await;
    eprintln!("redis_url() = {url}");
    let hostport = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or_default();
    let mut s = TcpStream::connect(hostport)
        .await
        .expect("connect to redis_url()");
    assert_eq!(
        ping(&mut s, Duration::from_secs(2)).await,
        Reply::Pong,
        "{url}"
    );
}

#[test]
fn server_restart_keeps_data_only_with_aof() {
    if !redis_server_available() {
        eprintln!("skipping: redis-server is not on PATH");
        return;
    }
    let mut aof = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = aof.dir().to_path_buf();
    let port = aof.port();
    assert_eq!(redis_cli(port, &["set", "k", "v"]).trim(), "OK");
    aof.restart();
    assert_eq!(aof.port(), port);
    assert_eq!(
        redis_cli(port, &["get", "k"]).trim(),
        "v",
        "AOF data lost on restart"
    );
    assert_eq!(redis_cli(port, &["debug", "sleep", "0"]).trim(), "OK");

    let mut plain = RedisServer::start();
    assert_eq!(redis_cli(plain.port(), &["set", "k", "v"]).trim(), "OK");
    plain.restart();
    assert_eq!(
        redis_cli(plain.port(), &["get", "k"]).trim(),
        "",
        "no persistence expected"
    );

    drop(aof);
    assert!(!dir.exists(), "dir not removed on drop");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server still up after drop"
    );
}

#[test]
fn cluster_starts() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    let [a, b, c] = cluster.ports();
    for p in [a, b, c] {
        assert!(redis_cli(p, &["cluster", "info"]).contains("cluster_state:ok"));
    }
    assert_eq!(
        cluster.url(),
        format!("redis-cluster://127.0.0.1:{a}?node=127.0.0.1:{b}&node=127.0.0.1:{c}")
    );
}

#[tokio::test]
async fn proxy_faults() {
    if !redis_server_available() {
        eprintln!("skipping: redis-server is not on PATH");
        return;
    }
    let server = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let addr = proxy.addr();
    assert_eq!(proxy.url(), format!("redis://{addr}"));
    let short = Duration::from_millis(300); // for hangs we expect
    let ok = Duration::from_secs(3); // for replies and cuts we expect (slack for a busy CI)

    // pass
    let mut c1 = connect(addr).await;
    assert_eq!(ping(&mut c1, ok).await, Reply::Pong);

    // delay: both directions, so a round trip takes at least 2 * 150 ms
    proxy.delay(Duration::from_millis(150));
    let t = Instant::now();
    assert_eq!(ping(&mut c1, ok).await, Reply::Pong);
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "delay too short: {:?}",
        t.elapsed()
    );
    proxy.pass();

    // delay_replies: the PING runs on the server at once; only its reply is held back
    proxy.delay_replies(Duration::from_secs(30));
    let pings_before = ping_calls(server.port());
    let mut held = connect(addr).await;
    assert_eq!(ping(&mut held, short).await, Reply::Timeout);
    let deadline = Instant::now() + ok;
    while ping_calls(server.port()) == pings_before {
        assert!(
            Instant::now() < deadline,
            "the PING did not reach the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    proxy.pass();
    assert_eq!(
        ping(&mut c1, ok).await,
        Reply::Pong,
        "other connections pass"
    );

    // blackhole: live and new connections hang; after pass both work again
    proxy.blackhole();
    assert_eq!(ping(&mut c1, short).await, Reply::Timeout);
    let mut c2 = connect(addr).await;
    assert_eq!(ping(&mut c2, short).await, Reply::Timeout);
    proxy.pass();
    assert_eq!(ping(&mut c1, ok).await, Reply::Pong);
    assert_eq!(ping(&mut c2, ok).await, Reply::Pong);

    // reset: live connections die, new ones are reset after accept, until pass
    proxy.reset();
    assert_eq!(ping(&mut c1, ok).await, Reply::ClosedAfter(vec![]));
    let mut c3 = connect(addr).await;
    assert_eq!(ping(&mut c3, ok).await, Reply::ClosedAfter(vec![]));
    proxy.pass();
    let mut c4 = connect(addr).await;
    assert_eq!(ping(&mut c4, ok).await, Reply::Pong);

    // cut_after: the PING (14 bytes) and 3 bytes of the reply get through, then a cut
    let pings_before = ping_calls(server.port());
    proxy.cut_after(PING.len() as u64 + 3);
    assert_eq!(ping(&mut c4, ok).await, Reply::ClosedAfter(b"+PO".to_vec()));
    assert_eq!(
        ping_calls(server.port()),
        pings_before + 1,
        "the PING reached the server"
    );
    let mut c5 = connect(addr).await;
    assert_eq!(
        ping(&mut c5, ok).await,
        Reply::ClosedAfter(vec![]),
        "reset until pass"
    );
    proxy.pass();
    let mut c6 = connect(addr).await;
    assert_eq!(ping(&mut c6, ok).await, Reply::Pong);

    // refuse: live connections die, the port is closed; pass re-opens the same port
    proxy.refuse();
    assert_eq!(ping(&mut c6, ok).await, Reply::ClosedAfter(vec![]));
    let err = TcpStream::connect(addr)
        .await
        .expect_err("connect while refusing");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    proxy.pass();
    let mut c7 = connect(addr).await;
    assert_eq!(ping(&mut c7, ok).await, Reply::Pong);

    // cut_next_reply: the PING runs on the server, its reply is lost with the connection,
    // and the proxy is back to pass on its own
    let pings_before = ping_calls(server.port());
    proxy.cut_next_reply();
    assert_eq!(ping(&mut c7, ok).await, Reply::ClosedAfter(vec![]));
    assert_eq!(
        ping_calls(server.port()),
        pings_before + 1,
        "the PING reached the server"
    );
    let mut c8 = connect(addr).await;
    assert_eq!(ping(&mut c8, ok).await, Reply::Pong, "passing again");
    assert_eq!(
        ping(&mut c8, ok).await,
        Reply::Pong,
        "only one reply is lost"
    );
    assert_eq!(proxy.connections_accepted(), 9);

    // drop: live connections die and the port is closed
    drop(proxy);
    assert_eq!(ping(&mut c8, ok).await, Reply::ClosedAfter(vec![]));
    assert!(TcpStream::connect(addr).await.is_err());
}

/// `stall` loses nothing: a PING sent during it is answered once it ends, on live and on
/// new connections, and the stream keeps its framing.
#[tokio::test]
async fn proxy_stall_holds_bytes_until_it_ends() {
    if !redis_server_available() {
        eprintln!("skipping: redis-server is not on PATH");
        return;
    }
    let server = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let short = Duration::from_millis(300);
    let ok = Duration::from_secs(3);
    let mut c1 = connect(proxy.addr()).await;
    assert_eq!(ping(&mut c1, ok).await, Reply::Pong);

    proxy.stall();
    assert_eq!(ping(&mut c1, short).await, Reply::Timeout);
    let mut c2 = connect(proxy.addr()).await;
    assert_eq!(ping(&mut c2, short).await, Reply::Timeout);
    let pings_during = ping_calls(server.port());
    proxy.pass();
    for c in [&mut c1, &mut c2] {
        let mut reply = [0u8; 7];
        tokio::time::timeout(ok, c.read_exact(&mut reply))
            .await
            .expect("the held PING is answered")
            .expect("read");
        assert_eq!(&reply, b"+PONG\r\n");
        assert_eq!(ping(c, ok).await, Reply::Pong, "framing kept");
    }
    assert_eq!(
        ping_calls(server.port()),
        pings_during + 4,
        "the held PINGs reached the server once each"
    );
}

fn ping_calls(port: u16) -> u64 {
    let stats = redis_cli(port, &["info", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Where the tests' Postgres is (`support::pg_server`): the decision apart from the world,
/// the search for the server binaries, and a throwaway cluster started and stopped.
mod postgres_discovery {
    use std::path::{Path, PathBuf};

    use crate::support::pg_server::{
        discover, find_bin_dir, host_port, probe, with_host_port, Cluster, Probe, Settings,
        NO_POSTGRES, SHARED_URL,
    };

    const STALE: &str = "postgres://postgres@127.0.0.1:1/test";
    const THROWAWAY: &str = "postgres://postgres@127.0.0.1:4242/test";

    /// Runs [`discover`] with canned probe answers; returns its result and what it probed
    /// and started, in order.
    fn run(
        settings: &Settings,
        answers: &[(&str, Probe)],
    ) -> (Result<String, String>, Vec<String>) {
        let mut calls = Vec::new();
        let result = {
            let calls = std::cell::RefCell::new(&mut calls);
            let mut probe = |url: &str| {
                calls.borrow_mut().push(format!("probe {url}"));
                answers
                    .iter()
                    .find(|(u, _)| *u == url)
                    .map_or(Probe::Nobody("refused".into()), |(_, p)| p.clone())
            };
            let mut start = |bin: &Path| {
                calls.borrow_mut().push(format!("start {}", bin.display()));
                Ok(THROWAWAY.to_string())
            };
            discover(settings, &mut probe, &mut start)
        };
        (result.map(|(url, _)| url), calls)
    }

    fn settings(database_url: Option<&str>, bin: bool) -> Settings {
        Settings {
            database_url: database_url.map(str::to_owned),
            skip_shared: false,
            no_throwaway: false,
            bin_dir: bin.then(|| PathBuf::from("/pg/bin")),
        }
    }

    #[test]
    fn database_url_that_answers_is_used_alone() {
        let (url, calls) = run(
            &settings(Some("postgres://x@h/db"), true),
            &[("postgres://x@h/db", Probe::Answers)],
        );
        assert_eq!(url.unwrap(), "postgres://x@h/db");
        assert_eq!(calls, ["probe postgres://x@h/db"]);
    }

    #[test]
    fn database_url_that_refuses_is_an_error_not_a_fallback() {
        let answers = [
            (
                "postgres://x@h/db",
                Probe::Refuses("password authentication failed".into()),
            ),
            (SHARED_URL, Probe::Answers),
        ];
        let (url, calls) = run(&settings(Some("postgres://x@h/db"), true), &answers);
        let err = url.unwrap_err();
        assert!(err.contains("password authentication failed"), "{err}");
        assert_eq!(calls.len(), 1, "{calls:?}");
    }

    #[test]
    fn stale_database_url_falls_back_to_the_shared_server_then_a_throwaway() {
        let (url, calls) = run(
            &settings(Some(STALE), true),
            &[(SHARED_URL, Probe::Answers)],
        );
        assert_eq!(url.unwrap(), SHARED_URL);
        assert_eq!(
            calls,
            [format!("probe {STALE}"), format!("probe {SHARED_URL}")]
        );

        // A shared server that refuses us is someone else's: on to the throwaway.
        let refusing = [(
            SHARED_URL,
            Probe::Refuses("database \"test\" does not exist".into()),
        )];
        let (url, calls) = run(&settings(Some(STALE), true), &refusing);
        assert_eq!(url.unwrap(), THROWAWAY);
        assert_eq!(calls.last().unwrap(), "start /pg/bin");

        let (url, _) = run(&settings(None, true), &[]);
        assert_eq!(url.unwrap(), THROWAWAY);
    }

    #[test]
    fn skipping_the_shared_server_never_probes_it() {
        let mut s = settings(Some(STALE), true);
        s.skip_shared = true;
        let (url, calls) = run(&s, &[(SHARED_URL, Probe::Answers)]);
        assert_eq!(url.unwrap(), THROWAWAY);
        assert_eq!(
            calls,
            [format!("probe {STALE}"), "start /pg/bin".to_string()]
        );
    }

    #[test]
    fn without_server_binaries_it_fails_with_the_hint() {
        let (url, calls) = run(&settings(Some(STALE), false), &[]);
        let err = url.unwrap_err();
        assert!(err.starts_with(NO_POSTGRES), "{err}");
        assert!(err.contains("docker compose up -d postgres"), "{err}");
        assert!(
            err.contains(STALE) && err.contains(SHARED_URL),
            "says what it tried: {err}"
        );
        assert!(err.contains("no `initdb` and `postgres`"), "{err}");
        assert!(!calls.iter().any(|c| c.starts_with("start")), "{calls:?}");

        let mut s = settings(None, true);
        s.no_throwaway = true;
        let (url, calls) = run(&s, &[]);
        let err = url.unwrap_err();
        assert!(err.contains("TIDEM_TEST_NO_THROWAWAY_POSTGRES"), "{err}");
        assert!(!calls.iter().any(|c| c.starts_with("start")), "{calls:?}");
    }

    #[test]
    fn a_failed_start_is_reported_with_the_hint() {
        let mut probe = |_: &str| Probe::Nobody("refused".into());
        let mut start = |_: &Path| Err("initdb failed: exit status: 1".to_string());
        let err = discover(&settings(None, true), &mut probe, &mut start).unwrap_err();
        assert!(
            err.starts_with(NO_POSTGRES) && err.contains("initdb failed"),
            "{err}"
        );
    }

    #[test]
    fn server_binaries_are_found_on_path_else_the_newest_debian_dir() {
        let root = std::env::temp_dir().join(format!("tidem-pgbin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let exe = |dir: &Path, names: &[&str]| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(dir).unwrap();
            for n in names {
                let f = dir.join(n);
                std::fs::write(&f, "#!/bin/sh\n").unwrap();
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        };
        let lib = root.join("lib");
        exe(&lib.join("9.6/bin"), &["initdb", "postgres"]);
        exe(&lib.join("15/bin"), &["initdb", "postgres"]);
        exe(&lib.join("16/bin"), &["initdb"]); // incomplete: not a candidate
        exe(&lib.join("10/bin"), &["initdb", "postgres"]);
        let only_initdb = root.join("path1");
        exe(&only_initdb, &["initdb"]);
        let both = root.join("path2");
        exe(&both, &["initdb", "postgres"]);

        let path = std::env::join_paths([&only_initdb]).unwrap();
        assert_eq!(find_bin_dir(Some(&path), &lib), Some(lib.join("15/bin")));
        let path = std::env::join_paths([&only_initdb, &both]).unwrap();
        assert_eq!(find_bin_dir(Some(&path), &lib), Some(both.clone()));
        assert_eq!(find_bin_dir(None, &root.join("missing")), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn urls_are_split_and_rerouted() {
        let url = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable";
        assert_eq!(host_port(url), Some(("127.0.0.1".into(), 5432)));
        assert_eq!(
            host_port("postgres://u:p@localhost/db"),
            Some(("localhost".into(), 5432))
        );
        assert_eq!(
            host_port("postgres://[::1]:6000/db"),
            Some(("[::1]".into(), 6000))
        );
        assert_eq!(
            with_host_port(url, "127.0.0.1:7".parse().unwrap()).unwrap(),
            "postgres://postgres@127.0.0.1:7/test?sslmode=disable"
        );
        assert_eq!(
            with_host_port("postgres://u:p@h", "127.0.0.1:7".parse().unwrap()).unwrap(),
            "postgres://u:p@127.0.0.1:7"
        );
    }

    /// A cluster of its own (not the one the suite may be using): it takes connections,
    /// has `test`, and stopping it (what this process's exit does too: the guard's stdin
    /// closes) ends the server and removes its dir.
    #[test]
    fn throwaway_cluster_starts_and_is_gone_after_stop() {
        let Some(bin) = find_bin_dir(
            std::env::var_os("PATH").as_deref(),
            Path::new("/usr/lib/postgresql"),
        ) else {
            eprintln!("skipping: no initdb and postgres on PATH or under /usr/lib/postgresql");
            return;
        };
        let mut cluster = Cluster::start(&bin).unwrap_or_else(|e| panic!("{e}"));
        let (url, dir, port) = (
            cluster.url().to_string(),
            cluster.dir().to_path_buf(),
            cluster.port(),
        );
        assert_eq!(url, format!("postgres://postgres@127.0.0.1:{port}/test"));
        assert_eq!(probe(&url), Probe::Answers);
        assert!(dir.join("data/PG_VERSION").exists());
        cluster.stop();
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(
            matches!(probe(&url), Probe::Nobody(_)),
            "server still up after stop"
        );
    }
}
