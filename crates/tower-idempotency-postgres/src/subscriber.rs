//! Wait mode across processes: one `LISTEN` connection per store, fanned out locally to
//! every waiter.
//!
//! Completion and release send `pg_notify(channel, 'c' || <scope hex>)` on the store's
//! channel ([`channel`](crate::PostgresStore::channel), by default the table name), in the
//! same statement (or transaction) that writes, so a waiter is notified exactly when the
//! change is visible — and, in transactional mode, not at all if the transaction rolls
//! back. One channel serves every scope: the payload says which.
//!
//! A store opens its listener connection (outside the application's pool, with the same
//! connection options, so it never takes a pool slot) on the first
//! [`subscribe`](tower_idempotency_core::Store::subscribe), or in transactional mode on
//! the first reservation (see below). Locally each scope has a [`watch`] counter and a
//! reference count; a message for a scope nobody here waits on is dropped.
//!
//! After the listener reconnects, every local waiter is woken: a notification sent while
//! it was disconnected is lost, and waking everyone makes them re-read their scope (a
//! spurious wake-up, never a lost one). Polling (the layer's 20 ms → 250 ms back-off)
//! always runs as the safety net.
//!
//! Only a lease that a reserve answered "in flight" for is notified on (plain mode marks
//! the row's `waiter` column), so a waiter subscribes and then re-reads its scope, as the
//! layer does. In transactional mode the pending row is invisible to others until it
//! commits, so a waiter cannot mark it: it announces itself with `pg_notify(channel,
//! 'w' || <scope hex>)` when it subscribes, and the process that holds the scope's
//! transaction (its listener started with its first reservation) notifies at commit or
//! release. An announcement that arrives after the owner committed is harmless: the
//! waiter's next reserve finds the record (its `INSERT` also waits on the uncommitted row,
//! up to the lock timeout, and returns the moment the owner commits).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_idempotency_core::{ScopeHash, Subscription};

use crate::error::{within, DisplayChain, PostgresStoreError};
use crate::tx::Registry;

/// Back-off between attempts to (re)connect the listener.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The local state of one scope.
struct Scope {
    wake: watch::Sender<u64>,
    refs: usize,
}

/// What the listener task and the subscriptions share.
struct Table {
    scopes: Mutex<HashMap<ScopeHash, Scope>>,
    /// `true` while the listener holds its `LISTEN`.
    listening: watch::Sender<bool>,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<ScopeHash, Scope>> {
        // A panic while holding it leaves the map consistent: each change is one call.
        self.scopes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn acquire(&self, scope: ScopeHash) -> watch::Receiver<u64> {
        let mut scopes = self.lock();
        let entry = scopes.entry(scope).or_insert_with(|| Scope {
            wake: watch::channel(0).0,
            refs: 0,
        });
        entry.refs += 1;
        entry.wake.subscribe()
    }

    fn release(&self, scope: &ScopeHash) {
        let mut scopes = self.lock();
        if let Some(entry) = scopes.get_mut(scope) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                scopes.remove(scope);
            }
        }
    }

    fn wake(&self, scope: &ScopeHash) {
        if let Some(entry) = self.lock().get(scope) {
            entry.wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        for entry in self.lock().values() {
            entry.wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// The shared listener of one store (and its clones).
pub(crate) struct Hub {
    table: Arc<Table>,
    task: OnceLock<JoinHandle<()>>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("scopes", &self.table.lock().len())
            .field("started", &self.task.get().is_some())
            .field("listening", &*self.table.listening.borrow())
            .finish()
    }
}

impl Hub {
    pub(crate) fn new() -> Self {
        Hub {
            table: Arc::new(Table {
                scopes: Mutex::default(),
                listening: watch::channel(false).0,
            }),
            task: OnceLock::new(),
        }
    }

    /// Starts the listener task if it is not running yet (needs a tokio runtime).
    pub(crate) fn start(
        &self,
        pool: &PgPool,
        channel: &Arc<str>,
        registry: &Arc<Registry>,
        timeout: Duration,
    ) {
        self.task.get_or_init(|| {
            // Its own one-connection pool on the application's connection options: the
            // listener never holds one of the application's connections.
            let options = (*pool.connect_options()).clone();
            let listen_pool = PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .max_lifetime(None)
                .idle_timeout(None)
                .acquire_timeout(timeout)
                .connect_lazy_with(options);
            tokio::spawn(listen(
                listen_pool,
                channel.clone(),
                self.table.clone(),
                registry.clone(),
                timeout,
            ))
        });
    }

    /// Registers interest in `scope` and returns once the listener holds its `LISTEN`
    /// (at once if it already does), bounded by `timeout`. Cancelling it leaves no
    /// waiter behind.
    pub(crate) async fn subscribe(
        &self,
        scope: ScopeHash,
        timeout: Duration,
    ) -> Result<PgSubscription, PostgresStoreError> {
        let subscription = PgSubscription {
            scope,
            wake: self.table.acquire(scope),
            table: self.table.clone(),
        };
        let mut listening = self.table.listening.subscribe();
        let listening = tokio::time::timeout(timeout, async {
            listening.wait_for(|on| *on).await.is_ok()
        })
        .await;
        match listening {
            Ok(true) => Ok(subscription),
            // The sender lives in the table, which the subscription holds.
            Ok(false) | Err(_) => Err(PostgresStoreError::Timeout(timeout)),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropping the task drops its listener, which closes the connection.
            task.abort();
        }
    }
}

/// The listener task: (re)connects, `LISTEN`s, and dispatches every notification.
async fn listen(
    pool: PgPool,
    channel: Arc<str>,
    table: Arc<Table>,
    registry: Arc<Registry>,
    timeout: Duration,
) {
    let mut backoff = RECONNECT_MIN;
    let mut connected_before = false;
    loop {
        let mut listener = match connect(&pool, &channel, timeout).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::debug!(error = %DisplayChain(&err), retry_in = ?backoff, "idempotency listener could not connect");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        backoff = RECONNECT_MIN;
        table.listening.send_replace(true);
        if connected_before {
            tracing::info!("idempotency listener reconnected; waking every waiter to re-read");
            // Notifications sent while disconnected are lost: everyone re-reads.
            table.wake_all();
        }
        connected_before = true;
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => dispatch(notification.payload(), &table, &registry),
                // The connection was lost (sqlx already dropped it).
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %DisplayChain(&err), "idempotency listener failed; reconnecting");
                    break;
                }
            }
        }
        table.listening.send_replace(false);
        table.wake_all();
    }
}

async fn connect(
    pool: &PgPool,
    channel: &str,
    timeout: Duration,
) -> Result<PgListener, PostgresStoreError> {
    let mut listener = within(timeout, PgListener::connect_with(pool)).await?;
    // The store's own loop reconnects, with back-off, and wakes waiters when it does.
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    within(timeout, listener.listen(channel)).await?;
    Ok(listener)
}

/// `c<hex>`: the scope completed or was released; `w<hex>`: someone waits for it (see
/// the module docs). Anything else (the `check()` probe) is ignored.
fn dispatch(payload: &str, table: &Table, registry: &Registry) {
    let (kind, hex) = payload.split_at(payload.len().min(1));
    let Some(scope) = parse_scope(hex) else {
        return;
    };
    match kind {
        "c" => table.wake(&scope),
        "w" => registry.waiter_seen(&scope),
        _ => {}
    }
}

/// 64 hex digits → the scope hash.
fn parse_scope(hex: &str) -> Option<ScopeHash> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        bytes[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(ScopeHash::from_bytes(bytes))
}

/// A live interest in one scope of a [`PostgresStore`](crate::PostgresStore), from
/// [`Store::subscribe`](tower_idempotency_core::Store::subscribe).
///
/// [`changed`](Subscription::changed) resolves when the scope was completed or released
/// (by any process) since the subscription started or since the previous call returned,
/// and also after the listener reconnected (a spurious wake-up, so a notification lost
/// while disconnected is never a lost wake-up).
pub struct PgSubscription {
    scope: ScopeHash,
    wake: watch::Receiver<u64>,
    table: Arc<Table>,
}

impl fmt::Debug for PgSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSubscription")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Subscription for PgSubscription {
    async fn changed(&mut self) {
        if self.wake.changed().await.is_err() {
            // The sender lives while this subscription holds its reference; never
            // resolving keeps a caller's loop from spinning.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for PgSubscription {
    fn drop(&mut self) {
        self.table.release(&self.scope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_a_scope_in_hex() {
        let scope = ScopeHash::from_bytes([0xab; 32]);
        assert_eq!(parse_scope(&scope.to_hex()), Some(scope));
        assert_eq!(parse_scope("ab"), None);
        assert_eq!(parse_scope(&"g".repeat(64)), None);
        assert_eq!(parse_scope(&"AB".repeat(32)), None);
    }

    #[test]
    fn messages_wake_only_their_scope_and_the_last_waiter_cleans_up() {
        let table = Table {
            scopes: Mutex::default(),
            listening: watch::channel(false).0,
        };
        let registry = Registry::default();
        let (a, b) = (
            ScopeHash::from_bytes([1; 32]),
            ScopeHash::from_bytes([2; 32]),
        );
        let mut wa = table.acquire(a);
        let wb = table.acquire(b);
        let _wa2 = table.acquire(a);
        dispatch(&format!("c{}", a.to_hex()), &table, &registry);
        assert!(wa.has_changed().unwrap());
        assert!(!wb.has_changed().unwrap());
        wa.mark_unchanged();
        dispatch("check", &table, &registry);
        dispatch(&format!("w{}", b.to_hex()), &table, &registry);
        assert!(!wb.has_changed().unwrap());
        table.wake_all();
        assert!(wa.has_changed().unwrap() && wb.has_changed().unwrap());
        table.release(&a);
        assert_eq!(table.lock().len(), 2, "a still has a waiter");
        table.release(&a);
        table.release(&b);
        assert_eq!(table.lock().len(), 0);
    }
}
