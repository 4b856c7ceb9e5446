//! A throwaway 3-master Redis Cluster on loopback, for the cluster-mode store tests.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{redis_cli, redis_cli_available, redis_server_available, RedisServer};

/// Three `redis-server` children in cluster mode (no replicas, no persistence), slots
/// spread by `redis-cli --cluster create`. Each node has its own dir (and `nodes.conf`),
/// so a node can be stopped and restarted through [`node_mut`](Self::node_mut).
/// Dropping it kills all nodes and removes their dirs.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster, and waits (up to 20 s) until every node
    /// reports `cluster_state:ok` and SET/GET through `redis-cli -c` works on keys owned
    /// by each of the three masters. Blocks the thread for a few seconds; panics on failure.
    pub fn start() -> Self {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ];
        let nodes: Vec<RedisServer> = (0..3)
            .map(|i| {
                RedisServer::try_start(&args, true)
                    .unwrap_or_else(|e| panic!("RedisCluster: cluster node {i} did not start: {e}"))
            })
            .collect();
        let cluster = RedisCluster { nodes };

        let addrs: Vec<String> = cluster
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("RedisCluster: cannot run redis-cli --cluster create: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("[ERR]"),
            "RedisCluster: redis-cli --cluster create {addrs:?} failed ({}):\n{text}",
            out.status
        );

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let states_ok = cluster
                .ports()
                .iter()
                .all(|&p| redis_cli(p, &["cluster", "info"]).contains("cluster_state:ok"));
            if states_ok && cluster.set_get_works() {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "RedisCluster: not ready 20 s after create (ports {:?}); cluster info of first node:\n{}",
                cluster.ports(),
                redis_cli(cluster.ports()[0], &["cluster", "info"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`start`](Self::start), or `None` (with the reason on stderr) when `redis-server` or
    /// `redis-cli` is not on PATH, so cluster tests can skip on machines without Redis.
    /// Any other failure still panics.
    pub fn start_or_skip() -> Option<RedisCluster> {
        for (bin, present) in [
            ("redis-server", redis_server_available()),
            ("redis-cli", redis_cli_available()),
        ] {
            if !present {
                eprintln!("skipping Redis Cluster test: `{bin}` is not on PATH");
                return None;
            }
        }
        Some(Self::start())
    }

    /// The three nodes' ports (cluster bus ports are these + 10000).
    pub fn ports(&self) -> [u16; 3] {
        [
            self.nodes[0].port(),
            self.nodes[1].port(),
            self.nodes[2].port(),
        ]
    }

    /// fred's cluster URL: `redis-cluster://127.0.0.1:A?node=127.0.0.1:B&node=127.0.0.1:C`.
    pub fn url(&self) -> String {
        let [a, b, c] = self.ports();
        format!("redis-cluster://127.0.0.1:{a}?node=127.0.0.1:{b}&node=127.0.0.1:{c}")
    }

    /// Node `i` (0..3), e.g. to `stop()`/`restart()` one master (it rejoins from its
    /// `nodes.conf`; its data is lost since persistence is off).
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// SET then GET through `redis-cli -c` on keys hashing to slots 15495, 3300 and 7365
    /// (the slots of `a`, `b`, `c`), which `--cluster create` gives to three different masters.
    fn set_get_works(&self) -> bool {
        let port = self.ports()[0];
        ["a", "b", "c"].iter().all(|tag| {
            let key = format!("tidem-cluster-probe:{{{tag}}}");
            redis_cli(port, &["-c", "set", &key, "ok"]).trim() == "OK"
                && redis_cli(port, &["-c", "get", &key]).trim() == "ok"
        })
    }
}
