//! [`RedisStore`]: the [`Store`] on Redis, one Lua script per operation.
//!
//! # Data model
//!
//! One Redis key per scope, `{prefix}{<scope hex>}`: the scope's 64-hex blake3 inside
//! `{}` is the Redis Cluster hash tag. The key is a hash:
//!
//! | field | value |
//! | --- | --- |
//! | `st` | `p` (pending lease) or `c` (completed) |
//! | `tok` | the 16 raw bytes of the owner's [`FencingToken`] |
//! | `fp` | the 32 raw bytes of the request's [`Fingerprint`] |
//! | `rec` | the completed [`Record`], as [`Record::encode`] writes it (Lua never parses it) |
//! | `w` | `1` once a reserve answered "in flight" for this lease: someone may be waiting |
//!
//! Leases and TTLs are `PEXPIRE`s on that key, so Redis's clock decides when they end.
//!
//! A reserve with the token that already holds the pending lease answers "reserved" again
//! (and counts the lease from then): fred sends a command again after a reconnect when
//! its reply was lost, and a reserve that timed out on the client may still have run, so
//! the same reserve can reach Redis twice. Another token still gets "in flight".
//!
//! Completion and release publish (`SPUBLISH`) on `{prefix}done:{<scope hex>}`, which
//! carries the same hash tag, and only when `w` is set: a request that nobody waited for
//! costs Redis no pub/sub work. Publishing is best effort (`redis.pcall`, its error
//! ignored): a refused `SPUBLISH` (an ACL user without channel permissions) never turns
//! a complete or release that already wrote into an error; waiters then poll, and
//! [`check`](RedisStore::check) warns. See the [`subscriber`](crate::subscriber) module.
//!
//! # Round trips
//!
//! Each operation is one `EVALSHA`. If the server answers `NOSCRIPT` (its script cache
//! was flushed, or it is a new or failed-over node), the store sends the script's source
//! with `EVAL`, which runs it on the node that owns the key and caches it there: a second
//! command, counted. See [`RoundTrips`].
//!
//! # Replication
//!
//! Off by default. With [`wait_replicas`](RedisStore::wait_replicas), each complete that
//! stores a record is followed by a `WAIT` for replicas on the same dedicated connection:
//! one more round trip per new request at most. See the
//! [`replication`](crate::replication) module.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::{ClientLike, ConfigInterface, LuaInterface};
use fred::types::Value;
use tower_idempotency_core::{
    Completion, FencingToken, Fingerprint, Record, Reservation, ScopeHash, Store, StoreError,
};

use crate::check::{self, CheckReport};
use crate::error::{within, DisplayChain, RedisStoreError};
use crate::replication::{Replication, DEFAULT_WAIT_CONNECTIONS};
use crate::round_trip::{Counters, Op, RoundTrips};
use crate::scripts::{Lua, SCRIPTS};
use crate::subscriber::{Hub, RedisSubscription};

/// The default key prefix, `idem:`.
pub const DEFAULT_PREFIX: &str = "idem:";

/// The default [`command_timeout`](RedisStore::command_timeout), 2 seconds.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A [`Store`] on Redis (standalone, Sentinel or Cluster) through a `fred` client.
///
/// `C` is whatever fred client the application already has: a
/// [`Client`](fred::clients::Client) (also for Sentinel and Cluster configurations) or a
/// [`Pool`](fred::clients::Pool). Cheap to clone: clones share the client, the
/// counters and the subscriber connection.
///
/// See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct RedisStore<C> {
    client: C,
    prefix: Arc<str>,
    command_timeout: Duration,
    shared: Arc<Shared>,
    /// `Some` with [`wait_replicas`](RedisStore::wait_replicas); shared by clones.
    replication: Option<Arc<Replication>>,
    wait_connections: usize,
}

/// State shared by every clone of a store.
#[derive(Debug)]
struct Shared {
    counters: Arc<Counters>,
    hub: Hub,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("round_trips", &self.shared.counters.snapshot())
            .field("subscriber", &self.shared.hub)
            .field("wait_replicas", &self.replication)
            .finish_non_exhaustive()
    }
}

impl<C> RedisStore<C>
where
    C: LuaInterface + ConfigInterface + ClientLike + Clone + Send + Sync + 'static,
{
    /// A store on `client`, with the prefix [`DEFAULT_PREFIX`] and the command timeout
    /// [`DEFAULT_COMMAND_TIMEOUT`]. Does no I/O: connect the client first
    /// (`client.init().await?`), then call [`init`](Self::init) to load the scripts and
    /// check the server, or use [`connect`](Self::connect) for both steps.
    pub fn new(client: C) -> Self {
        let counters = Arc::new(Counters::default());
        RedisStore {
            client,
            prefix: Arc::from(DEFAULT_PREFIX),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            shared: Arc::new(Shared {
                hub: Hub::new(counters.clone()),
                counters,
            }),
            replication: None,
            wait_connections: DEFAULT_WAIT_CONNECTIONS,
        }
    }

    /// [`new`](Self::new) then [`init`](Self::init): the store with default settings on
    /// an already connected (or connecting) client.
    pub async fn connect(client: C) -> Result<Self, RedisStoreError> {
        Self::new(client).init().await
    }

    /// The prefix of every key and channel the store uses; default [`DEFAULT_PREFIX`]
    /// (`idem:`). Give each application (or environment) sharing one Redis its own.
    ///
    /// # Panics
    ///
    /// If `prefix` contains `{` or `}`: the scope part of each key is a Redis Cluster hash
    /// tag, and braces in the prefix would change which part Redis hashes. Use
    /// [`try_prefix`](Self::try_prefix) for a prefix that is not a literal.
    pub fn prefix(self, prefix: impl Into<String>) -> Self {
        match self.try_prefix(prefix) {
            Ok(store) => store,
            Err(err) => panic!("{err}"),
        }
    }

    /// Like [`prefix`](Self::prefix), but a prefix containing `{` or `}` is an
    /// [`RedisStoreError::InvalidPrefix`] instead of a panic.
    pub fn try_prefix(mut self, prefix: impl Into<String>) -> Result<Self, RedisStoreError> {
        let prefix = prefix.into();
        if prefix.contains(['{', '}']) {
            return Err(RedisStoreError::InvalidPrefix(prefix));
        }
        self.prefix = Arc::from(prefix);
        Ok(self)
    }

    /// How long one store operation may wait for Redis before it fails with
    /// [`RedisStoreError::Timeout`] (a [`StoreError::Backend`] for the layer, so 503 or
    /// fail-open): default [`DEFAULT_COMMAND_TIMEOUT`] (2 s). Without it a black-holed
    /// connection would hang the request until TCP gives up.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// After each complete that stores a record, waits until `replicas` replicas
    /// acknowledged it, or `timeout` passed (Redis `WAIT replicas timeout`). Off by
    /// default; `replicas == 0` turns it off again. A `timeout` of zero waits 1 ms (Redis's
    /// `WAIT n 0` would wait forever).
    ///
    /// Redis replicates asynchronously, so a failover can lose a record the primary had
    /// already acknowledged; a lost record means the client's retry runs the handler
    /// again. `WAIT` narrows that window to the replicas' acknowledgement, at the cost of
    /// one more round trip and the replicas' acknowledgement latency on each new request
    /// (replays and renewals are unaffected). It is not a guarantee — `WAIT` does not make
    /// Redis strongly consistent: a failover may still promote a replica that had not
    /// acknowledged yet.
    ///
    /// If fewer than `replicas` acknowledge within `timeout` (or the `WAIT` fails), the
    /// complete still answers [`Completion::Stored`] — the record is on the primary — after
    /// logging `warn!` and counting `idempotency_store_wait_replicas_short_total` (and
    /// [`wait_replicas_short`](Self::wait_replicas_short)). So with no replica attached,
    /// every new request takes `timeout` longer.
    ///
    /// `WAIT` covers only writes made on its own connection and holds up everything queued
    /// behind it there, so the store opens dedicated connections for complete + `WAIT`
    /// (built from the client's configuration, like the subscriber connection; see
    /// [`wait_replicas_connections`](Self::wait_replicas_connections)), in
    /// [`init`](Self::init) or on the first complete (a complete that cannot open them
    /// fails like any store error, and the layer retries it). Works on standalone,
    /// Sentinel and Cluster configurations (on a cluster the `WAIT` goes to the key's
    /// primary). See the [`replication`](crate::replication) module for the design and
    /// its limits.
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

    /// Completions whose `WAIT` came back with fewer replicas than
    /// [`wait_replicas`](Self::wait_replicas) asked for (or failed), by this store and
    /// its clones; also counted as the metric `idempotency_store_wait_replicas_short_total`.
    /// Always 0 without `wait_replicas`.
    pub fn wait_replicas_short(&self) -> u64 {
        self.replication.as_ref().map_or(0, |r| r.short())
    }

    /// Waits (within the [`command_timeout`](Self::command_timeout)) for the client to be
    /// connected, loads the scripts on every primary ([`load_scripts`](Self::load_scripts)),
    /// runs [`check`](Self::check) and logs each of its warnings with `tracing::warn!`.
    /// With [`wait_replicas`](Self::wait_replicas), also opens the dedicated connections
    /// and warns if the primary has fewer replicas attached than asked for.
    ///
    /// Connect the client before (`client.init().await?`): a client that was never told
    /// to connect fails here with [`RedisStoreError::Timeout`].
    pub async fn init(self) -> Result<Self, RedisStoreError> {
        if !self.client.is_connected() {
            within(self.command_timeout, self.client.wait_for_connect()).await?;
        }
        self.load_scripts().await?;
        let report = self.check().await?;
        for warning in report.warnings() {
            tracing::warn!(
                version = report.server_version().unwrap_or("unknown"),
                "idempotency store: {warning}"
            );
        }
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

    /// The commands this store and its clones sent so far, per operation.
    pub fn round_trips(&self) -> RoundTrips {
        self.shared.counters.snapshot()
    }

    /// The fred client the store uses.
    pub fn client(&self) -> &C {
        &self.client
    }

    /// The key of a scope: `{prefix}{<scope hex>}`.
    pub fn key(&self, scope: &ScopeHash) -> String {
        format!("{}{{{}}}", self.prefix, scope.to_hex())
    }

    /// The wake-up channel of a scope: `{prefix}done:{<scope hex>}` (same hash tag as
    /// [`key`](Self::key)).
    pub fn channel(&self, scope: &ScopeHash) -> String {
        format!("{}done:{{{}}}", self.prefix, scope.to_hex())
    }

    /// Runs `lua` on `key` on the store's client; see [`eval_on`].
    async fn eval(
        &self,
        op: Op,
        lua: &'static Lua,
        key: String,
        args: Vec<Value>,
    ) -> Result<Value, RedisStoreError> {
        eval_on(
            &self.client,
            &self.shared.counters,
            op,
            lua,
            key,
            args,
            self.command_timeout,
        )
        .await
    }
}

/// Runs `lua` on `key` with `EVALSHA` on `client`, falling back to `EVAL` on `NOSCRIPT`;
/// each command counts as one round trip of `op`. The whole call is bounded by `timeout`.
pub(crate) async fn eval_on<L: LuaInterface>(
    client: &L,
    counters: &Counters,
    op: Op,
    lua: &'static Lua,
    key: String,
    args: Vec<Value>,
    timeout: Duration,
) -> Result<Value, RedisStoreError> {
    let run = async {
        counters.count(op);
        let sha = lua.script.sha1().clone();
        match client
            .evalsha::<Value, _, _, _>(sha, key.clone(), args.clone())
            .await
        {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                tracing::debug!(script = lua.name, "NOSCRIPT: sending the script with EVAL");
                counters.count(op);
                client.eval(lua.source, key, args).await
            }
            other => other,
        }
    };
    // fred's command futures are large (about 11 KB for one EVALSHA with its fallback):
    // boxed, so the store's futures, and the layer's task that holds them, stay small
    // and cheap to move. One allocation instead of kilobytes of memcpy per request.
    within(timeout, Box::pin(run)).await
}

fn millis(duration: Duration) -> Value {
    // At least 1 ms: PEXPIRE 0 would delete the key at once. Saturates far beyond any TTL.
    Value::Integer(
        i64::try_from(duration.as_millis())
            .unwrap_or(i64::MAX)
            .max(1),
    )
}

fn bytes(slice: &[u8]) -> Value {
    Value::Bytes(Bytes::copy_from_slice(slice))
}

/// A script's 0/1 answer.
fn flag(value: Value, script: &str) -> Result<bool, RedisStoreError> {
    match value {
        Value::Integer(0) => Ok(false),
        Value::Integer(1) => Ok(true),
        other => Err(unexpected(script, &other)),
    }
}

fn unexpected(script: &str, value: &Value) -> RedisStoreError {
    RedisStoreError::UnexpectedReply(format!("{script} script answered {value:?}"))
}

impl<C> Store for RedisStore<C>
where
    C: LuaInterface + ConfigInterface + ClientLike + Clone + Send + Sync + 'static,
{
    type Subscription = RedisSubscription;

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let args = vec![
            bytes(fingerprint.as_bytes()),
            bytes(&token.to_bytes()),
            millis(lease),
        ];
        let reply = self
            .eval(Op::Reserve, &SCRIPTS.reserve, self.key(scope), args)
            .await?;
        match reply {
            Value::Integer(1) => Ok(Reservation::Reserved),
            Value::Integer(2) => Ok(Reservation::InFlight),
            Value::Integer(3) => Ok(Reservation::Mismatch),
            Value::Bytes(blob) => Ok(Reservation::Completed(Record::decode(&blob)?)),
            Value::String(blob) => Ok(Reservation::Completed(Record::decode(blob.inner())?)),
            other => Err(unexpected("reserve", &other).into()),
        }
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let args = vec![bytes(&token.to_bytes()), millis(lease)];
        let reply = self
            .eval(Op::Renew, &SCRIPTS.renew, self.key(scope), args)
            .await?;
        Ok(flag(reply, "renew")?)
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let args = vec![
            bytes(&token.to_bytes()),
            Value::Bytes(record.encode()),
            millis(ttl),
            Value::from(self.channel(scope)),
        ];
        let key = self.key(scope);
        let reply = match &self.replication {
            None => {
                self.eval(Op::Complete, &SCRIPTS.complete, key, args)
                    .await?
            }
            Some(replication) => {
                Box::pin(replication.complete(
                    &self.client,
                    &self.shared.counters,
                    self.command_timeout,
                    key,
                    args,
                ))
                .await?
            }
        };
        Ok(if flag(reply, "complete")? {
            Completion::Stored
        } else {
            Completion::Fenced
        })
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        let args = vec![bytes(&token.to_bytes()), Value::from(self.channel(scope))];
        let reply = self
            .eval(Op::Release, &SCRIPTS.release, self.key(scope), args)
            .await?;
        Ok(flag(reply, "release")?)
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<RedisSubscription, StoreError> {
        // Connecting the subscriber and the SSUBSCRIBE are each bounded by the timeout.
        // Boxed for the same reason as `eval_on`: fred's futures are large.
        let subscribe = Box::pin(self.shared.hub.subscribe(
            &self.client,
            self.channel(scope),
            self.command_timeout,
        ));
        match subscribe.await {
            Ok(subscription) => Ok(subscription),
            Err(err) => {
                tracing::debug!(error = %DisplayChain(&err), "idempotency subscribe failed");
                Err(err.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::clients::Client;

    #[test]
    fn keys_and_channels_share_the_scope_hash_tag() {
        let store = RedisStore::new(Client::default()).prefix("app:");
        let scope = ScopeHash::from_bytes([0xab; 32]);
        let hex = "ab".repeat(32);
        assert_eq!(store.key(&scope), format!("app:{{{hex}}}"));
        assert_eq!(store.channel(&scope), format!("app:done:{{{hex}}}"));
        let slot = |s: &str| fred::util::redis_keyslot(s.as_bytes());
        assert_eq!(slot(&store.key(&scope)), slot(&store.channel(&scope)));
        assert_eq!(
            RedisStore::new(Client::default()).key(&scope),
            format!("idem:{{{hex}}}")
        );
    }

    #[test]
    fn braces_in_the_prefix_are_rejected() {
        for bad in ["a{b", "a}b", "{x}:"] {
            let err = RedisStore::new(Client::default())
                .try_prefix(bad)
                .unwrap_err();
            assert!(
                matches!(err, RedisStoreError::InvalidPrefix(ref p) if p == bad),
                "{err}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "invalid key prefix")]
    fn prefix_panics_on_braces() {
        let _ = RedisStore::new(Client::default()).prefix("tenant{1}:");
    }

    #[test]
    fn durations_become_at_least_one_millisecond() {
        assert_eq!(millis(Duration::from_secs(30)), Value::Integer(30_000));
        assert_eq!(millis(Duration::ZERO), Value::Integer(1));
        assert_eq!(millis(Duration::MAX), Value::Integer(i64::MAX));
    }
}
