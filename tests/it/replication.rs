//! `RedisStore::wait_replicas` against real servers: a completed record survives a
//! failover when the complete waited for the replica (and is lost when it did not), the
//! `WAIT` is one counted round trip on the primary, a missing replica costs the timeout
//! and is counted short without failing the complete, concurrent completes share `WAIT`s,
//! a blocked `WAIT` does not hold up the application's client, and on Redis Cluster the
//! `WAIT` goes to the key's primary.
//!
//! The replica reaches its primary through a `FaultProxy` that delays the replication
//! link, so "the replica has not received the record yet" lasts long enough to fail over
//! in: without `WAIT` the record is then lost, with it the complete returns only after
//! the replica acknowledged. Every server is a throwaway `RedisServer` (killed on drop).
//! Run with `cargo test --features redis --test replication`.
#![cfg(feature = "redis")]

use crate::support;
use crate::support::logs::Captured;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tower_idempotency::redis::fred::prelude::*;
use tower_idempotency::redis::RedisStore;
use tower_idempotency::store::{
    Completion, FencingToken, Fingerprint, Record, Reservation, ScopeHash, StoredResponse,
};
use tower_idempotency::Store;

use support::cluster::RedisCluster;
use support::proxy::FaultProxy;
use support::redis::{client_commands, redis_cli, RedisServer};
use support::store::{client, random_scope as scope, store};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);
const FP: Fingerprint = Fingerprint::from_bytes([0x5a; 32]);
/// How long the proxy holds each chunk of the replication link, both ways.
const LINK_DELAY: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn record(body: &'static str) -> Record {
    Record::Response(StoredResponse::new(
        StatusCode::CREATED,
        Vec::new(),
        Bytes::from_static(body.as_bytes()),
    ))
}

/// A store on `url` with `prefix` and `wait_replicas(replicas, timeout)` (none if 0).
async fn waiting_store(
    url: &str,
    prefix: &str,
    replicas: u32,
    timeout: Duration,
) -> RedisStore<Client> {
    RedisStore::new(client(url).await)
        .prefix(prefix)
        .wait_replicas(replicas, timeout)
        .init()
        .await
        .expect("redis store init")
}

/// A primary, and a replica that replicates from it through a `FaultProxy`, with the
/// link up (full sync done). The proxy passes traffic untouched until told otherwise.
struct Pair {
    primary: RedisServer,
    proxy: FaultProxy,
    replica: RedisServer,
}

impl Pair {
    async fn start() -> Pair {
        // No 5 s wait for more replicas before the (diskless) full sync.
        let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
        let proxy = FaultProxy::start(([127, 0, 0, 1], primary.port()).into()).await;
        let proxy_port = proxy.addr().port().to_string();
        let replica = tokio::task::spawn_blocking(move || {
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &proxy_port])
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let info = redis_cli(replica.port(), &["INFO", "replication"]);
            if info.contains("master_link_status:up") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica link not up within 5 s:\n{info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Pair {
            primary,
            proxy,
            replica,
        }
    }

    /// Crash the primary (SIGKILL) and promote the replica, as Sentinel would.
    fn fail_over(&mut self) {
        self.primary.stop();
        let reply = redis_cli(self.replica.port(), &["REPLICAOF", "NO", "ONE"]);
        assert_eq!(reply.trim(), "OK", "REPLICAOF NO ONE: {reply}");
    }
}

/// What `fail_over` leaves of a scope: the promoted replica's answer to a retry.
async fn retry_on_promoted_replica(pair: &Pair, prefix: &str, scope: &ScopeHash) -> Reservation {
    let promoted = store(&pair.replica.url(), prefix).await;
    promoted
        .reserve(scope, &FP, FencingToken::generate(), LEASE.into())
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------------------

/// With `wait_replicas(1, ..)` the complete returns only once the (slow) replica has the
/// record, so crashing the primary right after it and promoting the replica keeps the
/// record: the retry is a replay, not a second run of the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waited_complete_survives_a_failover() {
    let mut pair = Pair::start().await;
    let prefix = support::unique_prefix("waited-failover");
    let store = waiting_store(&pair.primary.url(), &prefix, 1, Duration::from_secs(5)).await;
    pair.proxy.delay(LINK_DELAY);

    let before = store.round_trips();
    let s = scope();
    let token = FencingToken::generate();
    let reservation = store.reserve(&s, &FP, token, LEASE.into()).await.unwrap();
    assert_eq!(reservation, Reservation::Reserved);
    let started = Instant::now();
    let done = store.complete(&s, token, &record("paid"), TTL).await;
    let took = started.elapsed();
    assert_eq!(done.unwrap(), Completion::Stored);
    eprintln!("waited complete took {took:?} (link delay {LINK_DELAY:?})");

    let rt = store.round_trips();
    assert_eq!(
        (
            rt.reserve - before.reserve,
            rt.complete - before.complete,
            rt.wait - before.wait
        ),
        (1, 1, 1),
        "reserve, complete, wait: {rt:?}"
    );
    assert_eq!(rt.total - before.total, 3, "a new request = 3 round trips");
    assert_eq!(store.wait_replicas_short(), 0, "the replica acknowledged");
    assert!(
        took >= LINK_DELAY,
        "complete returned after {took:?}, before the replica could have acknowledged"
    );
    // Read before the crash: the primary ran exactly one WAIT.
    assert_eq!(client_commands(pair.primary.port(), "wait"), 1);

    pair.fail_over();
    assert_eq!(
        retry_on_promoted_replica(&pair, &prefix, &s).await,
        Reservation::Completed(record("paid"))
    );
}

/// The control: the same failover after a complete that did not wait loses the record
/// (the replica had not received it yet), so the retry would run the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwaited_complete_is_lost_in_a_failover() {
    let mut pair = Pair::start().await;
    let prefix = support::unique_prefix("unwaited-failover");
    let store = waiting_store(&pair.primary.url(), &prefix, 0, Duration::ZERO).await;
    pair.proxy.delay(LINK_DELAY);

    let before = store.round_trips();
    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, token, LEASE.into()).await.unwrap(),
        Reservation::Reserved
    );
    let started = Instant::now();
    let done = store.complete(&s, token, &record("paid"), TTL).await;
    let took = started.elapsed();
    assert_eq!(done.unwrap(), Completion::Stored);
    assert_eq!(store.round_trips().total - before.total, 2);
    assert_eq!(store.round_trips().wait, 0);

    pair.fail_over();
    assert!(
        took < LINK_DELAY,
        "the complete took {took:?}: the replica may have had time to receive it"
    );
    assert_eq!(
        retry_on_promoted_replica(&pair, &prefix, &s).await,
        Reservation::Reserved,
        "the record should be lost without WAIT"
    );
}

// ---------------------------------------------------------------------------------------
// Missing or slow replicas
// ---------------------------------------------------------------------------------------

/// No replica attached: each complete waits the WAIT timeout, is still `Stored` (the
/// record is on the primary and replays), is logged and counted as short — and the
/// application's client is not held up by the blocked `WAIT` meanwhile.
#[tokio::test]
async fn without_a_replica_complete_is_stored_after_the_timeout_and_counted_short() {
    let logs = Captured::default();
    let _installed = logs.install(tracing::Level::WARN);
    let server = RedisServer::start();
    let timeout = Duration::from_millis(200);
    let store = waiting_store(&server.url(), "no-replica:", 1, timeout).await;
    assert!(
        logs.text().contains("0 replica(s) attached"),
        "init warns about the missing replica:\n{}",
        logs.text()
    );

    let s = scope();
    let token = FencingToken::generate();
    assert_eq!(
        store.reserve(&s, &FP, token, LEASE.into()).await.unwrap(),
        Reservation::Reserved
    );
    let before = store.round_trips();
    let started = Instant::now();
    let complete = tokio::spawn({
        let store = store.clone();
        async move { store.complete(&s, token, &record("ok"), TTL).await }
    });

    // While that WAIT blocks its dedicated connection, the store's own client answers.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = Instant::now();
    let reservation = store
        .reserve(&scope(), &FP, FencingToken::generate(), LEASE.into())
        .await
        .unwrap();
    assert_eq!(reservation, Reservation::Reserved);
    assert!(
        other.elapsed() < Duration::from_millis(100),
        "a reserve waited {:?} behind a WAIT",
        other.elapsed()
    );

    assert_eq!(complete.await.unwrap().unwrap(), Completion::Stored);
    let took = started.elapsed();
    eprintln!("complete without a replica took {took:?} (WAIT timeout {timeout:?})");
    assert!(
        took >= timeout - Duration::from_millis(20) && took < Duration::from_secs(2),
        "complete took {took:?} with a {timeout:?} WAIT and no replica"
    );
    let rt = store.round_trips();
    assert_eq!(
        (rt.complete - before.complete, rt.wait - before.wait),
        (1, 1)
    );
    assert_eq!(store.wait_replicas_short(), 1);
    assert_eq!(client_commands(server.port(), "wait"), 1);
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("only 0 of 1 replica(s) acknowledged"),
        "the short acknowledgement is logged:\n{text}"
    );

    // The record is there all the same.
    let replay = store
        .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
        .await
        .unwrap();
    assert_eq!(replay, Reservation::Completed(record("ok")));
}

/// Completes that finish while a `WAIT` is under way share the next one, so a dead
/// replica costs every request about one or two timeouts instead of queueing them one
/// timeout after another on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_completes_share_waits() {
    const N: usize = 16;
    let server = RedisServer::start();
    let timeout = Duration::from_millis(200);
    let store = RedisStore::new(client(&server.url()).await)
        .prefix("share:")
        .wait_replicas(1, timeout)
        .wait_replicas_connections(1)
        .init()
        .await
        .unwrap();
    let mut reserved = Vec::new();
    for _ in 0..N {
        let (s, token) = (scope(), FencingToken::generate());
        assert_eq!(
            store.reserve(&s, &FP, token, LEASE.into()).await.unwrap(),
            Reservation::Reserved
        );
        reserved.push((s, token));
    }

    let started = Instant::now();
    let tasks: Vec<_> = reserved
        .into_iter()
        .map(|(s, token)| {
            let store = store.clone();
            tokio::spawn(async move { store.complete(&s, token, &record("x"), TTL).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Completion::Stored);
    }
    let took = started.elapsed();
    let waits = store.round_trips().wait;
    eprintln!("{N} concurrent completes: {took:?}, {waits} WAITs");

    assert!(
        (1..=4).contains(&waits),
        "{waits} WAITs for {N} concurrent completes"
    );
    assert_eq!(client_commands(server.port(), "wait"), waits);
    assert_eq!(store.wait_replicas_short(), N as u64);
    assert!(
        took < timeout * 8,
        "{N} completes took {took:?} (one after another would take {:?})",
        timeout * N as u32
    );
}

// ---------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------

fn shared_cluster() -> Option<&'static RedisCluster> {
    static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start_or_skip).as_ref()
}

/// On a 3-master cluster (no replicas, so each WAIT runs its 100 ms timeout), every
/// complete's `WAIT` reaches the master that holds the key, and only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_wait_goes_to_the_keys_primary() {
    let Some(ports) = tokio::task::spawn_blocking(|| shared_cluster().map(RedisCluster::ports))
        .await
        .unwrap()
    else {
        eprintln!("skipping: no Redis Cluster could be started");
        return;
    };
    let url = tokio::task::spawn_blocking(|| shared_cluster().unwrap().url())
        .await
        .unwrap();
    let prefix = support::unique_prefix("cluster-wait");
    let store = waiting_store(&url, &prefix, 1, Duration::from_millis(100)).await;

    let waits = || ports.map(|port| client_commands(port, "wait"));
    let mut nodes_hit = std::collections::HashSet::new();
    for _ in 0..6 {
        let (s, token) = (scope(), FencingToken::generate());
        assert_eq!(
            store.reserve(&s, &FP, token, LEASE.into()).await.unwrap(),
            Reservation::Reserved
        );
        let before = waits();
        let done = store.complete(&s, token, &record("c"), TTL).await.unwrap();
        assert_eq!(done, Completion::Stored);
        let after = waits();
        let key = store.key(&s);
        for (i, port) in ports.iter().enumerate() {
            let holds_key = redis_cli(*port, &["EXISTS", &key]).trim() == "1";
            let waited = after[i] - before[i];
            assert_eq!(
                waited,
                u64::from(holds_key),
                "node {port}: {waited} WAITs, holds {key}: {holds_key}"
            );
            if holds_key {
                nodes_hit.insert(*port);
            }
        }
    }
    assert_eq!(
        store.wait_replicas_short(),
        6,
        "the cluster has no replicas"
    );
    eprintln!("WAITs reached {} of 3 masters", nodes_hit.len());
}
