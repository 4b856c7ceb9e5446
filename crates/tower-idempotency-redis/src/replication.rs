//! Waiting for replicas after a completion: how
//! [`RedisStore::wait_replicas`](crate::RedisStore::wait_replicas) works. What it buys and
//! its limits, for users, are in the [crate docs](crate#replication-and-failover); this is
//! the mechanism.
//!
//! `WAIT` covers only the writes made on the connection it is sent on, and it holds back
//! every command queued behind it on that connection. So the complete and its `WAIT` go
//! over a few dedicated connections (fred [`Client`]s built from the application's client
//! configuration), never over the application's client: reserves, renewals and the
//! application's own commands never queue behind a `WAIT`.
//!
//! Each complete sends its `EVALSHA` on one of them (round robin) and, once it has the
//! reply, asks that connection's `WAIT` task for a `WAIT`. The task keeps at most one
//! `WAIT` under way per server, and each `WAIT` answers every complete whose reply came
//! before it was sent (their writes precede it on the connection). Completes that finish
//! while a `WAIT` is under way share the next one, like a group commit. So with a replica
//! down, a new request waits about one to three timeouts, whatever the request rate:
//! requests never queue behind each other's timeouts one by one. Redis checks `WAIT`
//! timeouts at its `hz` (10 by default), so a timeout may end up to 100 ms late.
//!
//! On Redis Cluster the `WAIT` goes to the primary the dedicated client's routing table
//! names for the key's slot, over that client's connection to it.
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, ClusterInterface, ServerInterface};
use fred::types::config::{Blocking, Options, Server};
use fred::types::{ClusterHash, InfoKind, Value};
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::task::{Id, JoinHandle, JoinSet};
use tower_idempotency_core::metrics::STORE_WAIT_REPLICAS_SHORT_TOTAL;

use crate::connection;
use crate::error::{within, DisplayChain, RedisStoreError};
use crate::eval::eval_on;
use crate::round_trip::{Counters, Op};
use crate::scripts::SCRIPTS;

/// The default number of dedicated `complete` + `WAIT` connections, 2. See
/// [`RedisStore::wait_replicas_connections`](crate::RedisStore::wait_replicas_connections).
pub const DEFAULT_WAIT_CONNECTIONS: usize = 2;

/// What one `WAIT` answered: the number of replicas that acknowledged.
type Acked = Result<i64, Arc<RedisStoreError>>;

/// The `wait_replicas` policy of one store (and its clones) and its connections.
pub(crate) struct Replication {
    replicas: u32,
    timeout: Duration,
    connections: usize,
    set: OnceCell<Vec<Connection>>,
    next: AtomicUsize,
    short: AtomicU64,
}

impl fmt::Debug for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replication")
            .field("replicas", &self.replicas)
            .field("timeout", &self.timeout)
            .field("connections", &self.connections)
            .field("connected", &self.set.initialized())
            .field("short", &self.short())
            .finish()
    }
}

/// One dedicated connection and the task that sends its `WAIT`s.
struct Connection {
    client: Client,
    requests: mpsc::UnboundedSender<Request>,
    task: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

/// Which server a `WAIT` must reach: the one the complete's `EVALSHA` went to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Route {
    /// Standalone or Sentinel: the client's one primary.
    Primary,
    /// Cluster: the primary the routing table names for the key's slot.
    Node(Server),
    /// Cluster without a routing table at hand: let fred route by the slot.
    Slot(u16),
}

impl Route {
    fn of(client: &Client, key: &str) -> Route {
        if !client.is_clustered() {
            return Route::Primary;
        }
        let slot = fred::util::redis_keyslot(key.as_bytes());
        client
            .cached_cluster_state()
            .and_then(|state| state.get_server(slot).cloned())
            .map_or(Route::Slot(slot), Route::Node)
    }
}

/// A complete that got its reply and waits for the next `WAIT` on its route.
struct Request {
    route: Route,
    reply: oneshot::Sender<Acked>,
}

/// The arguments of every `WAIT` of one store.
#[derive(Clone, Copy)]
struct Wait {
    replicas: i64,
    timeout_ms: i64,
    /// Bound of one `WAIT` on our side: its timeout plus the command timeout.
    bound: Duration,
}

impl Replication {
    /// `replicas` > 0; `connections` > 0.
    pub(crate) fn new(replicas: u32, timeout: Duration, connections: usize) -> Self {
        Replication {
            replicas,
            timeout,
            connections: connections.max(1),
            set: OnceCell::new(),
            next: AtomicUsize::new(0),
            short: AtomicU64::new(0),
        }
    }

    pub(crate) fn replicas(&self) -> u32 {
        self.replicas
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn short(&self) -> u64 {
        self.short.load(Ordering::Relaxed)
    }

    /// The dedicated connections, opened on first use (within `timeout` in all).
    async fn connections<C: ClientLike>(
        &self,
        user: &C,
        counters: &Arc<Counters>,
        timeout: Duration,
    ) -> Result<&[Connection], RedisStoreError> {
        let open = self
            .set
            .get_or_try_init(|| self.open(user, counters, timeout));
        within(timeout, open).await.map(Vec::as_slice)
    }

    async fn open<C: ClientLike>(
        &self,
        user: &C,
        counters: &Arc<Counters>,
        timeout: Duration,
    ) -> Result<Vec<Connection>, RedisStoreError> {
        let mut config = user.client_config();
        // Under fred's `Blocking::Error` or `Interrupt`, a complete queued behind a `WAIT`
        // would fail, or cut the `WAIT` short; `Block` lets Redis run it after the `WAIT`.
        config.blocking = Blocking::Block;
        let perf = user.perf_config();
        let wait = Wait {
            replicas: i64::from(self.replicas),
            timeout_ms: millis(self.timeout),
            bound: self.timeout.saturating_add(timeout),
        };
        let mut opened = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            let client = connection::dedicated(user, config.clone(), perf.clone());
            // On an error, the connections opened so far close as `opened` drops.
            connection::connect(&client, timeout).await?;
            let (requests, queue) = mpsc::unbounded_channel();
            let task = tokio::spawn(send_waits(client.clone(), queue, wait, counters.clone()));
            opened.push(Connection {
                client,
                requests,
                task,
            });
        }
        tracing::debug!(
            connections = opened.len(),
            replicas = self.replicas,
            "idempotency store opened its complete + WAIT connections"
        );
        Ok(opened)
    }

    /// Opens the connections and warns if the primary has fewer replicas attached than
    /// asked for (standalone and Sentinel; on a cluster each primary would need asking).
    pub(crate) async fn init<C: ClientLike>(
        &self,
        user: &C,
        counters: &Arc<Counters>,
        timeout: Duration,
    ) -> Result<(), RedisStoreError> {
        let connections = self.connections(user, counters, timeout).await?;
        let Some(first) = connections.first() else {
            return Ok(());
        };
        if first.client.is_clustered() {
            return Ok(());
        }
        match within(
            timeout,
            first.client.info::<String>(Some(InfoKind::Replication)),
        )
        .await
        {
            Ok(info) => match connected_replicas(&info) {
                Some(attached) if attached < u64::from(self.replicas) => tracing::warn!(
                    attached,
                    replicas = self.replicas,
                    "idempotency store: wait_replicas({}) but the primary has {attached} \
                     replica(s) attached: every new request will wait the full {:?} and be \
                     counted as short",
                    self.replicas,
                    self.timeout
                ),
                Some(_) => {}
                None => tracing::debug!("INFO replication has no connected_slaves line"),
            },
            Err(err) => tracing::debug!(error = %DisplayChain(&err), "INFO replication failed"),
        }
        Ok(())
    }

    /// The complete script on a dedicated connection, then (if it stored) a `WAIT` on that
    /// same connection. Only the complete's failure is an error: the record is on the
    /// primary once it answered, whatever the `WAIT` says.
    pub(crate) async fn complete<C: ClientLike>(
        &self,
        user: &C,
        counters: &Arc<Counters>,
        timeout: Duration,
        key: String,
        args: Vec<Value>,
    ) -> Result<Value, RedisStoreError> {
        let connections = self.connections(user, counters, timeout).await?;
        let connection =
            &connections[self.next.fetch_add(1, Ordering::Relaxed) % connections.len()];
        let route = Route::of(&connection.client, &key);
        let reply = eval_on(
            &connection.client,
            counters,
            Op::Complete,
            &SCRIPTS.complete,
            &|| (key.clone(), args.clone()),
            timeout,
        )
        .await?;
        if reply == Value::Integer(1) {
            self.wait(connection, route, timeout).await;
        }
        Ok(reply)
    }

    /// Waits for the next `WAIT` on `route` of `connection` and reports a shortfall.
    async fn wait(&self, connection: &Connection, route: Route, timeout: Duration) {
        let (reply, acked) = oneshot::channel();
        // The `WAIT` under way on our route (if any) must end before ours is sent: each
        // takes at most the WAIT timeout plus the command timeout.
        let bound = self
            .timeout
            .saturating_add(timeout)
            .saturating_mul(2)
            .saturating_add(timeout);
        let acked = match connection.requests.send(Request { route, reply }) {
            Ok(()) => tokio::time::timeout(bound, acked)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        let replicas = self.replicas;
        match acked {
            Some(Ok(acked)) if acked >= i64::from(replicas) => return,
            Some(Ok(acked)) => tracing::warn!(
                acked,
                replicas,
                timeout = ?self.timeout,
                "idempotency record stored on the primary, but only {acked} of {replicas} \
                 replica(s) acknowledged it in time: a failover now may lose it, and a \
                 retry would then run the handler again"
            ),
            Some(Err(err)) => tracing::warn!(
                replicas,
                error = %DisplayChain(&*err),
                "idempotency record stored on the primary, but WAIT for replicas failed: \
                 replication not confirmed"
            ),
            None => tracing::warn!(
                replicas,
                "idempotency record stored on the primary, but WAIT for replicas did not \
                 answer within {bound:?}: replication not confirmed"
            ),
        }
        self.short.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(STORE_WAIT_REPLICAS_SHORT_TOTAL, "store" => "redis").increment(1);
    }
}

/// `connected_slaves` from the text of `INFO replication`.
fn connected_replicas(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|line| line.strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
}

/// A duration in whole milliseconds for `WAIT`, at least 1: `WAIT n 0` blocks forever.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The `WAIT` task of one dedicated connection: at most one `WAIT` under way per route;
/// each one answers every request queued on its route before it was sent.
async fn send_waits(
    client: Client,
    mut requests: mpsc::UnboundedReceiver<Request>,
    wait: Wait,
    counters: Arc<Counters>,
) {
    let mut queued: HashMap<Route, Vec<oneshot::Sender<Acked>>> = HashMap::new();
    let mut under_way: HashMap<Id, (Route, Vec<oneshot::Sender<Acked>>)> = HashMap::new();
    let mut waits: JoinSet<Acked> = JoinSet::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                // All senders gone: the store is gone, and with it everyone waiting.
                let Some(request) = request else { return };
                queued.entry(request.route).or_default().push(request.reply);
                while let Ok(request) = requests.try_recv() {
                    queued.entry(request.route).or_default().push(request.reply);
                }
            }
            Some(done) = waits.join_next_with_id() => match done {
                Ok((id, acked)) => {
                    if let Some((_, replies)) = under_way.remove(&id) {
                        for reply in replies {
                            let _ = reply.send(acked.clone());
                        }
                    }
                }
                // A panicked `WAIT`: dropping the replies tells its requests.
                Err(err) => {
                    under_way.remove(&err.id());
                }
            },
        }
        // Every queued request got its complete's reply before it was queued, so a `WAIT`
        // sent now covers its write.
        let busy: HashSet<&Route> = under_way.values().map(|(route, _)| route).collect();
        let ready: Vec<Route> = queued
            .keys()
            .filter(|route| !busy.contains(route))
            .cloned()
            .collect();
        for route in ready {
            let replies = queued.remove(&route).unwrap_or_default();
            counters.count(Op::Wait);
            let task = waits.spawn(send_wait(client.clone(), route.clone(), wait));
            under_way.insert(task.id(), (route, replies));
        }
    }
}

/// One `WAIT`, sent once (a retry on a new connection would answer at once and prove
/// nothing) to the server of `route`.
async fn send_wait(client: Client, route: Route, wait: Wait) -> Acked {
    let mut options = Options {
        max_attempts: Some(1),
        timeout: Some(wait.bound),
        ..Options::default()
    };
    match route {
        Route::Primary => {}
        Route::Node(server) => options.cluster_node = Some(server),
        Route::Slot(slot) => options.cluster_hash = Some(ClusterHash::Custom(slot)),
    }
    let client = client.with_options(&options);
    let command = client.wait::<i64>(wait.replicas, wait.timeout_ms);
    within(wait.bound, command).await.map_err(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connected_replicas() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=...\r\n";
        assert_eq!(connected_replicas(info), Some(2));
        assert_eq!(connected_replicas("# Replication\r\nrole:master\r\n"), None);
    }

    #[test]
    fn wait_timeouts_are_at_least_one_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_millis(250)), 250);
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }
}
