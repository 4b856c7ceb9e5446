//! Dedicated connections: fred [`Client`]s the store opens next to the application's
//! client, built from that client's configuration (same servers, Sentinel or Cluster
//! setup, TLS, credentials, timeouts). The subscriber uses one for pub/sub, and
//! [`wait_replicas`](crate::RedisStore::wait_replicas) a few for `complete` + `WAIT`.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::ClientLike;
use fred::types::config::{Config, PerformanceConfig, ReconnectPolicy};
use tokio::task::JoinHandle;

use crate::error::{within, RedisStoreError};

/// A new, not yet connected client with `config` and `perf`, the user's connection
/// settings, and the user's reconnect policy or, if it has none, an exponential one: a
/// dedicated connection must come back after a disconnect on its own.
pub(crate) fn dedicated<C: ClientLike>(
    user: &C,
    config: Config,
    perf: PerformanceConfig,
) -> Client {
    let policy = user
        .client_reconnect_policy()
        .unwrap_or_else(|| ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
    Client::new(
        config,
        Some(perf),
        Some(user.connection_config().clone()),
        Some(policy),
    )
}

/// Connects `client` and waits (within `timeout`) for the first connection. On failure,
/// or if this future is dropped before the client connected, the connection task is
/// stopped (it would otherwise retry forever under the reconnect policy).
pub(crate) async fn connect(client: &Client, timeout: Duration) -> Result<(), RedisStoreError> {
    // Register for the first connection's outcome before starting to connect, so it
    // cannot be missed (what `ClientLike::init` does, but keeping the task handle).
    let connected = client.wait_for_connect();
    tokio::pin!(connected);
    let registered = std::future::poll_fn(|cx| Poll::Ready(connected.as_mut().poll(cx))).await;
    let mut router = AbortOnDrop(Some(client.connect()));
    let outcome = match registered {
        Poll::Ready(result) => result.map_err(RedisStoreError::from),
        Poll::Pending => within(timeout, connected).await,
    };
    if outcome.is_ok() {
        // Connected: the task keeps running (and reconnecting) on its own.
        router.0 = None;
    }
    outcome
}

/// Aborts the task it holds when dropped.
struct AbortOnDrop<T>(Option<JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
