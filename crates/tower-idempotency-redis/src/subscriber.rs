//! Wait mode across processes: one shared subscriber connection per store, fanned out
//! locally to every waiter.
//!
//! The complete and release scripts `SPUBLISH` on the scope's channel,
//! `{prefix}done:{<scope hex>}`, which carries the data key's hash tag: on Redis Cluster
//! the message is published on the node that owns the key, and the subscriber's
//! `SSUBSCRIBE` is routed there too. A store opens its subscriber connection (a fred
//! [`Client`] built from the user's client configuration) on the first
//! [`subscribe`](tower_idempotency_core::Store::subscribe), so stores that never wait
//! never open it.
//!
//! Locally, each channel has a [`watch`] counter and a reference count: the first waiter
//! of a channel sends `SSUBSCRIBE` and every later one shares it; when the last
//! [`RedisSubscription`] of a channel is dropped, a background task sends `SUNSUBSCRIBE`.
//! A per-channel async lock orders a channel's `SSUBSCRIBE` and `SUNSUBSCRIBE`, so a
//! late unsubscription never cancels a newer waiter's subscription.
//!
//! After the subscriber reconnects, every channel is subscribed again and every waiter is
//! woken: a message published while the connection was down is lost, and waking all
//! waiters makes them re-read their scope instead (a spurious wake-up, never a lost one).
//!
//! Only a record that a reserve answered "in flight" for is published on (the scripts
//! mark it), so a waiter must subscribe and then re-read its scope, as the layer does.
//!
//! A store's user without channel permissions (a Redis 7 ACL user made without channel
//! rules) gets `NOPERM` on `SSUBSCRIBE`. Waiters then get a subscription that no message
//! wakes, and fall back to the layer's polling, quietly: the store logs one `warn!` (per
//! store and its clones, not per request) and sends no further `SSUBSCRIBE` for
//! [`DENIED_RETRY`], then tries again, so a permission granted later is picked up.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch, OnceCell};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_idempotency_core::Subscription;

use crate::channels::ChannelTable;
use crate::check::is_noperm;
use crate::connection;
use crate::error::{within, DisplayChain, RedisStoreError};
use crate::round_trip::{Counters, Op};

/// Messages fred keeps for a slow reader of the subscriber's message stream; past that
/// the reader lags and every waiter is woken (the layer re-reads, nothing is lost).
const MESSAGE_BUFFER: usize = 1024;

/// How long after an `SSUBSCRIBE` refused with `NOPERM` waiters skip subscribing (and
/// poll) before one of them asks again: 60 seconds.
pub const DENIED_RETRY: Duration = Duration::from_secs(60);

/// The shared subscriber of one store (and its clones).
pub(crate) struct Hub {
    channels: Arc<ChannelTable>,
    connection: OnceCell<Connection>,
    counters: Arc<Counters>,
    denied: Arc<Denied>,
}

/// Whether the server refused our `SSUBSCRIBE`s for want of channel permissions.
#[derive(Debug, Default)]
struct Denied {
    /// When the last `NOPERM` came; `None` if none did, or a subscription succeeded since.
    since: Mutex<Option<Instant>>,
    /// Whether the one `warn!` of this store was logged.
    warned: AtomicBool,
}

impl Denied {
    fn since(&self) -> MutexGuard<'_, Option<Instant>> {
        self.since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a `NOPERM` came less than [`DENIED_RETRY`] ago.
    fn recently(&self) -> bool {
        self.since()
            .is_some_and(|since| since.elapsed() < DENIED_RETRY)
    }

    fn refused(&self, channel: &str, err: &RedisStoreError) {
        *self.since() = Some(Instant::now());
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                channel,
                error = %DisplayChain(err),
                "idempotency subscriber may not subscribe to the store's channels (ACL); \
                 waiters fall back to polling (logged once per store)"
            );
        } else {
            tracing::debug!(channel, error = %DisplayChain(err), "SSUBSCRIBE refused");
        }
    }

    fn allowed(&self) {
        *self.since() = None;
    }
}

/// The subscriber connection and the tasks that serve it.
struct Connection {
    client: Client,
    unsubscribe: mpsc::UnboundedSender<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("channels", &self.channels.len())
            .field("connected", &self.connection.initialized())
            .field("denied", &self.denied.since().is_some())
            .finish()
    }
}

impl Hub {
    pub(crate) fn new(counters: Arc<Counters>) -> Self {
        Hub {
            channels: Arc::default(),
            connection: OnceCell::new(),
            counters,
            denied: Arc::default(),
        }
    }

    /// Registers interest in `channel` and returns once the server acknowledged the
    /// subscription (at once if another local waiter already holds it). If the server
    /// refuses it with `NOPERM` (now, or less than [`DENIED_RETRY`] ago), returns a
    /// subscription that only reconnects wake: the caller polls anyway.
    ///
    /// `config` is the user's client, whose configuration the subscriber connection
    /// copies the first time. Cancelling this future (e.g. by a timeout) leaves no
    /// waiter behind.
    pub(crate) async fn subscribe<C: ClientLike>(
        &self,
        config: &C,
        channel: String,
        timeout: Duration,
    ) -> Result<RedisSubscription, RedisStoreError> {
        let connection = self
            .connection
            .get_or_try_init(|| self.connect(config, timeout))
            .await?;
        let (wake, subscribed) = self.channels.acquire(&channel);
        // From here on, dropping `subscription` (on an error or a cancellation) gives the
        // reference back.
        let subscription = RedisSubscription {
            channel,
            wake,
            channels: self.channels.clone(),
            unsubscribe: connection.unsubscribe.clone(),
        };
        let mut subscribed = subscribed.lock().await;
        if !*subscribed && !self.denied.recently() {
            self.counters.count(Op::Subscribe);
            let channel = subscription.channel.clone();
            match within(timeout, connection.client.ssubscribe(channel)).await {
                Ok(()) => {
                    *subscribed = true;
                    self.denied.allowed();
                }
                Err(err) if is_noperm(&err) => {
                    self.denied.refused(&subscription.channel, &err);
                }
                Err(err) => return Err(err),
            }
        }
        Ok(subscription)
    }

    /// Opens the subscriber connection and starts its tasks.
    async fn connect<C: ClientLike>(
        &self,
        config: &C,
        timeout: Duration,
    ) -> Result<Connection, RedisStoreError> {
        let mut perf = config.perf_config();
        perf.broadcast_channel_capacity = perf.broadcast_channel_capacity.max(MESSAGE_BUFFER);
        // The subscriber must come back after a disconnect even if the user's client was
        // built without a reconnect policy: waiters depend on it for their wake-ups.
        let client = connection::dedicated(config, config.client_config(), perf);
        let messages = client.message_rx();
        // On failure the next subscribe starts afresh.
        connection::connect(&client, timeout).await?;
        let reconnects = client.reconnect_rx();
        let (unsubscribe, unsubscribe_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(dispatch(messages, self.channels.clone())),
            tokio::spawn(resubscribe(
                reconnects,
                client.clone(),
                self.channels.clone(),
                self.counters.clone(),
                self.denied.clone(),
                timeout,
            )),
            tokio::spawn(unsubscribe_idle(
                unsubscribe_rx,
                client.clone(),
                self.channels.clone(),
                self.counters.clone(),
                timeout,
            )),
        ];
        tracing::debug!(id = client.id(), "idempotency subscriber connected");
        Ok(Connection {
            client,
            unsubscribe,
            tasks,
        })
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            for task in &connection.tasks {
                task.abort();
            }
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let client = connection.client;
                runtime.spawn(async move {
                    let _ = client.quit().await;
                });
            }
        }
    }
}

/// Wakes the waiters of each message's channel.
async fn dispatch(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    channels: Arc<ChannelTable>,
) {
    loop {
        match messages.recv().await {
            Ok(message) => channels.wake(&message.channel),
            // Some messages were dropped: wake everyone so they re-read their scope.
            Err(RecvError::Lagged(_)) => channels.wake_all(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// After every reconnect: `SSUBSCRIBE` again to every channel that was subscribed, then
/// wake every waiter (messages sent while disconnected are gone).
async fn resubscribe(
    mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    client: Client,
    channels: Arc<ChannelTable>,
    counters: Arc<Counters>,
    denied: Arc<Denied>,
    timeout: Duration,
) {
    loop {
        match reconnects.recv().await {
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
        for (name, subscribed) in channels.states() {
            let mut subscribed = subscribed.lock().await;
            if !*subscribed {
                continue;
            }
            counters.count(Op::Subscribe);
            if let Err(err) = within(timeout, client.ssubscribe(name.clone())).await {
                // The next waiter of this channel subscribes again.
                *subscribed = false;
                if is_noperm(&err) {
                    // Permissions taken away meanwhile: warned about once per store.
                    denied.refused(&name, &err);
                    continue;
                }
                tracing::warn!(
                    channel = %name,
                    error = %DisplayChain(&err),
                    "idempotency subscriber could not resubscribe after a reconnect; waiters fall back to polling"
                );
            }
        }
        channels.wake_all();
    }
}

/// Unsubscribes channels whose last local waiter went away.
async fn unsubscribe_idle(
    mut idle: mpsc::UnboundedReceiver<String>,
    client: Client,
    channels: Arc<ChannelTable>,
    counters: Arc<Counters>,
    timeout: Duration,
) {
    while let Some(name) = idle.recv().await {
        let Some(state) = channels.idle_state(&name) else {
            continue;
        };
        let mut subscribed = state.lock().await;
        // A new waiter may have come while we waited for the lock: it keeps the channel.
        if !channels.is_idle(&name, &state) {
            continue;
        }
        if *subscribed {
            counters.count(Op::Unsubscribe);
            if let Err(err) = within(timeout, client.sunsubscribe(name.clone())).await {
                // Harmless: messages for a channel nobody waits on are ignored.
                tracing::debug!(channel = %name, error = %DisplayChain(&err), "SUNSUBSCRIBE failed");
            }
            *subscribed = false;
        }
        // Still holding the channel's lock: a waiter that arrived meanwhile keeps the
        // entry and subscribes again once we release it.
        channels.remove_if_idle(&name, &state);
    }
}

/// A live interest in one scope of a [`RedisStore`](crate::RedisStore), from
/// [`Store::subscribe`](tower_idempotency_core::Store::subscribe).
///
/// [`changed`](Subscription::changed) resolves when the scope was completed or released
/// (by any process) since the subscription started or since the previous call returned,
/// and also after the subscriber connection reconnected (a spurious wake-up, so that a
/// message lost while disconnected is never a lost wake-up). Dropping the last
/// subscription of a scope unsubscribes in the background.
///
/// Wake-ups are published only for a record that a reserve answered "in flight" for:
/// subscribe, then re-read the scope. Where the server refused the subscription
/// (`NOPERM`, see [ACL users](crate#acl-users)), only reconnects wake it, and the
/// caller's polling finds the result.
pub struct RedisSubscription {
    channel: String,
    wake: watch::Receiver<u64>,
    channels: Arc<ChannelTable>,
    unsubscribe: mpsc::UnboundedSender<String>,
}

impl fmt::Debug for RedisSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscription")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Subscription for RedisSubscription {
    async fn changed(&mut self) {
        if self.wake.changed().await.is_err() {
            // The sender lives as long as this subscription holds a reference, so this
            // does not happen; never resolving keeps a caller's loop from spinning.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        if self.channels.release(&self.channel) {
            // If the store (and its worker) is gone, the connection is closing anyway.
            let _ = self.unsubscribe.send(self.channel.clone());
        }
    }
}
