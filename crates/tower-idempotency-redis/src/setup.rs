//! Building a [`RedisStore`] and starting it up: its settings, connecting, loading the
//! scripts, checking the server. The operations are in [`store`](crate::store).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, ConfigInterface, LuaInterface};
use fred::types::config::{Config, ReconnectPolicy};
use fred::types::Builder;

use crate::check::{self, CheckReport};
use crate::error::{within, RedisStoreError};
use crate::replication::{Replication, DEFAULT_WAIT_CONNECTIONS};
use crate::round_trip::{Counters, RoundTrips};
use crate::scripts::SCRIPTS;
use crate::store::{RedisStore, Shared};
use crate::subscriber::Hub;
use tower_idempotency_core::local::{LocalReplays, LocalTier};

/// The default key prefix, `idem:`.
pub const DEFAULT_PREFIX: &str = "idem:";

/// The default [`command_timeout`](RedisStore::command_timeout), 2 seconds.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`RedisStore::connect`] and [`init`](RedisStore::init) wait for the first
/// connection to a client they started: 5 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl RedisStore<Client> {
    /// A store on a new fred [`Client`] for `url` (`redis://`, `rediss://` with a TLS
    /// feature, `redis-cluster://`, `redis-sentinel://`), with a reconnect policy
    /// (exponential, 100 ms to 2 s), not yet connected: configure it, then
    /// [`init`](Self::init), which connects. Or [`connect`](Self::connect) for all at once.
    ///
    /// ```no_run
    /// # use tower_idempotency_redis::RedisStore;
    /// # async fn f() -> Result<(), tower_idempotency_redis::RedisStoreError> {
    /// let store = RedisStore::from_url("redis://127.0.0.1:6379")?
    ///     .prefix("payments:idem:")
    ///     .init()
    ///     .await?;
    /// if let Some(report) = store.check_report() {
    ///     println!("{report}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn from_url(url: &str) -> Result<Self, RedisStoreError> {
        let config = Config::from_url(url)?;
        let client = Builder::from_config(config)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build()?;
        let mut store = Self::new(client);
        store.starts_client = true;
        Ok(store)
    }

    /// Connects to `url`, loads the scripts on every primary, checks the server (its
    /// warnings are logged; the report is kept, see [`check_report`](Self::check_report))
    /// and returns the store with default settings: [`from_url`](Self::from_url) then
    /// [`init`](Self::init).
    ///
    /// ```no_run
    /// # use tower_idempotency_redis::RedisStore;
    /// # async fn f() -> Result<(), tower_idempotency_redis::RedisStoreError> {
    /// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, RedisStoreError> {
        Self::from_url(url)?.init().await
    }
}

impl<C> RedisStore<C>
where
    C: LuaInterface + ConfigInterface + ClientLike + Clone + Send + Sync + 'static,
{
    /// A store on the application's own fred client (a [`Client`], also for Sentinel and
    /// Cluster configurations, or a [`Pool`](fred::clients::Pool)), with the prefix
    /// [`DEFAULT_PREFIX`], the command timeout [`DEFAULT_COMMAND_TIMEOUT`] and the local
    /// replay tier on. Does no I/O: connect the client (`client.init().await?`), then
    /// call [`init`](Self::init) to load the scripts and check the server.
    pub fn new(client: C) -> Self {
        let counters = Arc::new(Counters::default());
        RedisStore {
            client,
            prefix: Arc::from(DEFAULT_PREFIX),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            shared: Arc::new(Shared {
                hub: Hub::new(counters.clone()),
                counters,
                report: OnceLock::new(),
            }),
            replication: None,
            wait_connections: DEFAULT_WAIT_CONNECTIONS,
            local: Some(Arc::new(LocalTier::new(LocalReplays::default()))),
            starts_client: false,
            prefix_valid: true,
        }
    }

    /// The prefix of every key and channel the store uses; default [`DEFAULT_PREFIX`]
    /// (`idem:`). Give each application (or environment) sharing one Redis its own.
    ///
    /// It must not contain `{` or `}`: the scope part of each key is a Redis Cluster hash
    /// tag, and braces in the prefix would change which part Redis hashes. Like every
    /// setter here it never panics: an invalid prefix is reported by [`init`](Self::init)
    /// ([`RedisStoreError::InvalidPrefix`]), and every operation fails with that error
    /// until it is fixed (so nothing is ever written under it).
    ///
    /// A store given another prefix than it had gets a local replay tier of its own (empty,
    /// with the same settings): a clone under another prefix is another namespace, and
    /// never replays, or refuses with 422, what it kept for the other one.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        if *self.prefix != *prefix {
            // The tier is keyed by scope hash alone: shared with a store under another
            // prefix, it would replay that namespace's records here, or answer 422 for
            // its keys. Clones that keep the prefix keep sharing it.
            self.local = self
                .local
                .map(|tier| Arc::new(LocalTier::new(tier.settings())));
        }
        self.prefix_valid = !prefix.contains(['{', '}']);
        self.prefix = Arc::from(prefix);
        self
    }

    /// [`RedisStoreError::InvalidPrefix`] if the prefix is not one the store can use.
    pub(crate) fn check_prefix(&self) -> Result<(), RedisStoreError> {
        if self.prefix_valid {
            Ok(())
        } else {
            Err(RedisStoreError::InvalidPrefix(self.prefix.to_string()))
        }
    }

    /// How long one store operation may wait for Redis before it fails with
    /// [`RedisStoreError::Timeout`] (a `StoreError::Backend` for the layer, so 503 or
    /// fail-open): default [`DEFAULT_COMMAND_TIMEOUT`] (2 s). Without it a black-holed
    /// connection would hang the request until TCP gives up.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sizes the local replay tier, or turns it off with `None`: completed records this
    /// process has seen are replayed from memory, with no command to Redis (see the
    /// [crate docs](crate#local-replay-tier)). On by default with
    /// [`LocalReplays::default`] (64 MiB, entries at most 60 s old).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use tower_idempotency_redis::{LocalReplays, RedisStore};
    /// # async fn f() -> Result<(), tower_idempotency_redis::RedisStoreError> {
    /// let store = RedisStore::from_url("redis://127.0.0.1:6379")?
    ///     .local_replays(Some(LocalReplays::default().max_bytes(256 << 20)))
    ///     .init()
    ///     .await?;
    /// let every_replay_asks_redis = RedisStore::from_url("redis://127.0.0.1:6379")?
    ///     .local_replays(None);
    /// # Ok(()) }
    /// ```
    pub fn local_replays(mut self, settings: Option<LocalReplays>) -> Self {
        self.local = settings.map(|settings| Arc::new(LocalTier::new(settings)));
        self
    }

    /// After each complete that stores a record, waits until `replicas` replicas
    /// acknowledged it, or `timeout` passed (Redis `WAIT replicas timeout`). Off by
    /// default; `replicas == 0` turns it off again. A `timeout` of zero waits 1 ms (Redis's
    /// `WAIT n 0` would wait forever). What it buys and what it does not: see
    /// [Replication and failover](crate#replication-and-failover).
    ///
    /// If fewer than `replicas` acknowledge within `timeout` (or the `WAIT` fails), the
    /// complete still counts as stored — the record is on the primary — after logging
    /// `warn!` and counting `idempotency_store_wait_replicas_short_total` (and
    /// [`wait_replicas_short`](Self::wait_replicas_short)). So with no replica attached,
    /// every new request takes `timeout` longer. The dedicated connections it needs are
    /// opened in [`init`](Self::init) or by the first complete.
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replication = (replicas > 0)
            .then(|| Arc::new(Replication::new(replicas, timeout, self.wait_connections)));
        self
    }

    /// How many dedicated connections [`wait_replicas`](Self::wait_replicas) opens; default
    /// [`DEFAULT_WAIT_CONNECTIONS`] (2), at least 1. Completes take them in turn, and
    /// completes that finish while a `WAIT` is under way on their connection share the
    /// next `WAIT`, so a few connections serve any request rate; more connections mean
    /// fewer completes queued behind a `WAIT` in Redis.
    pub fn wait_replicas_connections(mut self, connections: usize) -> Self {
        self.wait_connections = connections.max(1);
        if let Some(replication) = &self.replication {
            self.replication = Some(Arc::new(Replication::new(
                replication.replicas(),
                replication.timeout(),
                self.wait_connections,
            )));
        }
        self
    }

    /// Connects the client if the store started it ([`from_url`](RedisStore::from_url);
    /// otherwise waits, within [`DEFAULT_CONNECT_TIMEOUT`], for the application's client to
    /// be connected), loads the scripts on every primary
    /// ([`load_scripts`](Self::load_scripts)), runs [`check`](Self::check), logs each of
    /// its warnings with `tracing::warn!` and keeps the report
    /// ([`check_report`](Self::check_report)). With
    /// [`wait_replicas`](Self::wait_replicas), also opens the dedicated connections.
    pub async fn init(self) -> Result<Self, RedisStoreError> {
        self.check_prefix()?;
        if self.starts_client && !self.client.is_connected() {
            // `init` connects and resolves with the first connection's outcome.
            within(DEFAULT_CONNECT_TIMEOUT, self.client.init()).await?;
        } else if !self.client.is_connected() {
            within(DEFAULT_CONNECT_TIMEOUT, self.client.wait_for_connect()).await?;
        }
        self.load_scripts().await?;
        let report = self.check().await?;
        for warning in report.warnings() {
            tracing::warn!(
                version = report.server_version().unwrap_or("unknown"),
                "idempotency store: {warning}"
            );
        }
        let _ = self.shared.report.set(report);
        if let Some(replication) = &self.replication {
            replication
                .init(&self.client, &self.shared.counters, self.command_timeout)
                .await?;
        }
        Ok(self)
    }

    /// Loads every script into the script cache of every primary (`SCRIPT LOAD` on each
    /// cluster primary, or on the one server), so the first `EVALSHA`s do not need the
    /// `NOSCRIPT` fallback. Called by [`init`](Self::init); call it again after a failover
    /// if you like (the store recovers on its own anyway).
    pub async fn load_scripts(&self) -> Result<(), RedisStoreError> {
        for lua in SCRIPTS.all() {
            let sha: String = within(
                self.command_timeout,
                self.client.script_load_cluster(lua.source),
            )
            .await?;
            if !sha.eq_ignore_ascii_case(lua.script.sha1()) {
                return Err(RedisStoreError::UnexpectedReply(format!(
                    "SCRIPT LOAD of {} returned sha1 {sha}, expected {}",
                    lua.name,
                    lua.script.sha1()
                )));
            }
        }
        Ok(())
    }

    /// Checks the server: version, `maxmemory-policy` (warns unless `noeviction`; says
    /// so where `CONFIG` is disabled), and whether the store's user may publish on its
    /// channels (warns on an ACL `NOPERM`: waiters then fall back to polling). Sends
    /// `PING`, `INFO server`, `CONFIG GET` and one `SPUBLISH` on a probe channel under
    /// the prefix, `{prefix}done:{check}`, that no waiter listens to. An error only when
    /// Redis does not answer. See [`CheckReport`].
    pub async fn check(&self) -> Result<CheckReport, RedisStoreError> {
        let probe = format!("{}done:{{check}}", self.prefix);
        check::run(&self.client, self.command_timeout, &self.prefix, probe).await
    }

    /// The report of the [`check`](Self::check) that [`init`](Self::init) ran; `None`
    /// before `init`.
    pub fn check_report(&self) -> Option<&CheckReport> {
        self.shared.report.get()
    }

    /// The commands this store and its clones sent so far, per operation, and the
    /// replays answered from the local tier.
    pub fn round_trips(&self) -> RoundTrips {
        self.shared.counters.snapshot()
    }

    /// Completions whose `WAIT` came back with fewer replicas than
    /// [`wait_replicas`](Self::wait_replicas) asked for (or failed), by this store and
    /// its clones; also counted as the metric `idempotency_store_wait_replicas_short_total`.
    /// Always 0 without `wait_replicas`.
    pub fn wait_replicas_short(&self) -> u64 {
        self.replication.as_ref().map_or(0, |r| r.short())
    }

    /// The bytes the local replay tier of this store's prefix holds (0 when it is off):
    /// its entries' bodies, headers and bookkeeping, the bytes its byte bound counts. An
    /// entry owns its bytes, so this is the heap it keeps alive.
    pub fn local_replay_bytes(&self) -> u64 {
        self.local.as_ref().map_or(0, |local| local.bytes())
    }

    /// The fred client the store uses.
    pub fn client(&self) -> &C {
        &self.client
    }
}
