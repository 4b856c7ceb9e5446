//! A Redis store for [`tower-idempotency`](tower_idempotency_core): [`RedisStore`], on
//! the [`fred`] client the application already has, or one it makes for a URL.
//!
//! Every operation of the [`Store`](tower_idempotency_core::Store) trait is one atomic Lua
//! script on one key, so:
//!
//! - of any number of concurrent first requests with one key, on any number of app
//!   servers, exactly one is told to run the handler;
//! - a new request costs 2 round trips (reserve, complete), a replay 1 (the completed
//!   record comes back with the reservation attempt) or 0 (the [local replay
//!   tier](#local-replay-tier)), a lease renewal 1;
//! - leases and TTLs are `PEXPIRE`s, so Redis's clock decides, not the app servers';
//! - it runs unchanged on Redis Cluster: each script touches one key, and wake-ups for
//!   waiters use sharded pub/sub on a channel in the same slot;
//! - a reserve sent twice with one token (fred re-sends a command after a reconnect) is
//!   answered "reserved" both times;
//! - wake-ups are published only when a waiter was seen, and best effort: a refused
//!   publish never fails a complete or release.
//!
//! It needs Redis 7.0 or newer (sharded pub/sub, `SPUBLISH`) and should run with
//! `maxmemory-policy noeviction`: under any other policy a full Redis evicts records and
//! the next retry runs the handler again. [`RedisStore::check`] (also run by
//! [`RedisStore::init`]) reports both.
//!
//! # Example
//!
//! One call connects, loads the scripts on every primary and checks the server:
//!
//! ```no_run
//! use tower_idempotency_core::IdempotencyLayer;
//! use tower_idempotency_redis::RedisStore;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = RedisStore::from_url("redis://127.0.0.1:6379")?
//!     .prefix("payments:idem:")
//!     .init()
//!     .await?;
//! if let Some(report) = store.check_report() {
//!     tracing::info!(%report, "idempotency store ready");
//! }
//! let layer = IdempotencyLayer::new(store).global_scope();
//! # Ok(()) }
//! ```
//!
//! With the application's own client (a `Client`, `Pool`, Sentinel or Cluster
//! configuration), connect it, then `init` the store:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_idempotency_core::{FencingToken, Fingerprint, Reservation, ScopeHash, Store};
//! use tower_idempotency_redis::fred::prelude::*;
//! use tower_idempotency_redis::RedisStore;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = Builder::from_config(Config::from_url("redis://127.0.0.1:6379")?).build()?;
//! client.init().await?;
//! let store = RedisStore::new(client)
//!     .prefix("payments:")
//!     .command_timeout(Duration::from_secs(1))
//!     .init()
//!     .await?;
//!
//! // The layer drives the store; this is what it does for a new request.
//! let scope = ScopeHash::from_bytes([7; 32]);
//! let fingerprint = Fingerprint::from_bytes([1; 32]);
//! let token = FencingToken::generate();
//! let reservation = store
//!     .reserve(&scope, &fingerprint, token, Duration::from_secs(30).into())
//!     .await?;
//! assert_eq!(reservation, Reservation::Reserved);
//! assert_eq!(store.round_trips().reserve, 1);
//! # Ok(()) }
//! ```
//!
//! # Data model
//!
//! One Redis key per scope, `{prefix}{<scope hex>}`: the scope's 64-hex blake3 inside
//! `{}` is the Redis Cluster hash tag. The key is a hash:
//!
//! | field | value |
//! | --- | --- |
//! | `st` | `p` (pending lease) or `c` (completed) |
//! | `tok` | the 16 raw bytes of the owner's fencing token |
//! | `fp` | the 32 raw bytes of the request's fingerprint |
//! | `rec` | the completed record, as `Record::encode` writes it (Lua never parses it) |
//! | `w` | `1` once a reserve answered "in flight" for this lease: someone may be waiting |
//!
//! Leases and TTLs are `PEXPIRE`s on that key. A reserve with the token that already
//! holds the pending lease answers "reserved" again: fred sends a command again after a
//! reconnect when its reply was lost, and a reserve that timed out on the client may
//! still have run, so the same reserve can reach Redis twice.
//!
//! # Round trips
//!
//! A round trip is one command the client sends (commands a script runs inside Redis do
//! not count): a new request 2 (reserve, complete), a replay 1 or 0 from the local tier, a
//! mismatch 1 or 0 the same way, a conflict 1, a released 4xx 2, a renewal 1 per interval.
//! Each is one
//! `EVALSHA`; if the server answers `NOSCRIPT` (a flushed script cache, a new or
//! failed-over node) the store sends the source with `EVAL` once, a counted extra
//! command. [`RedisStore::round_trips`] counts them exactly, and so does the metric
//! `idempotency_store_commands_total{store="redis", op}`.
//!
//! # Waiting across processes
//!
//! With `InFlight::Wait`, completion and release publish (`SPUBLISH`) on
//! `{prefix}done:{<scope hex>}`, which carries the key's hash tag — only when the record
//! is marked `w` (a reserve answered "in flight", so someone may wait). One shared
//! subscriber connection per store fans out locally; a waiter subscribes, then re-reads
//! the key, so no wake-up is lost; the layer's back-off polling (20 ms → 250 ms) is the
//! safety net. After the subscriber reconnects every waiter is woken to re-read.
//!
//! # Local replay tier
//!
//! A completed record never changes until it expires, so each store keeps the completed
//! records it has read in a bytes-bounded local cache and replays them with no command at
//! all; a retry with another payload gets its 422 from it too. An entry lives no longer
//! than the record's remaining TTL in Redis (the reserve script returns it, and the entry
//! is dated from before the command was sent) and no longer than
//! [`LocalReplays::max_age`]; pending records are never kept. On by default (64 MiB,
//! 60 s); size it or turn it off with [`RedisStore::local_replays`].
//!
//! A tier belongs to one namespace: clones of a store share it only while they keep its
//! prefix, and a clone under another [`prefix`](RedisStore::prefix) (live and sandbox on
//! one Redis) gets one of its own, so neither replays, nor refuses with 422, the other's
//! keys. Its memory is what it counts ([`RedisStore::local_replay_bytes`]): an entry owns
//! a copy of its body and header values, never a slice of a reply that would pin the
//! connection's whole read buffer.
//!
//! Its one inconsistency: a record deleted in Redis by hand may still be replayed by a
//! process that kept it, until its entry lapses (at most `max_age`).
//!
//! # ACL users
//!
//! The store's user needs its keys (`~{prefix}*`), the scripts and the commands they run
//! (Redis checks those too; `TIME` and `HDEL` run only for a kept lease, on a route that
//! refuses uncertain keys, so a user without them fails there alone), `PING`, `INFO` and
//! `CONFIG GET` for [`check`](RedisStore::check), `CLIENT ID` (fred asks on connect),
//! `WAIT` with [`wait_replicas`](RedisStore::wait_replicas), and, for waiters to be woken
//! rather than poll, its channels (`&{prefix}*`, `SPUBLISH`, `SSUBSCRIBE`,
//! `SUNSUBSCRIBE`). With the default prefix (a test runs exactly this line):
//!
//! ```text
//! ACL SETUSER app on >secret ~idem:* &idem:* +@scripting +hmget +hset +hdel +pexpire +pttl
//!     +del +time +spublish +ssubscribe +sunsubscribe +ping +info +config|get +client|id
//! ```
//!
//! A Redis 7 user created without channel rules (`acl-pubsub-default resetchannels`, the
//! default) may not publish or subscribe. Everything still works: publishing is best
//! effort, waiters poll, `check()` warns, and the subscriber logs one warning per store
//! (and tries again after [`DENIED_RETRY`]).
//!
//! # Replication and failover
//!
//! Redis replicates asynchronously: a record the primary has stored can be lost if the
//! primary fails before a replica received it, and after the failover the client's retry
//! finds no record and runs the handler again. [`RedisStore::wait_replicas`] (off by
//! default) sends `WAIT n timeout` after each complete, on dedicated connections, so the
//! request's response waits until `n` replicas acknowledged the record. That narrows the
//! window for a lost record to the replicas' acknowledgement, at the cost of one more
//! round trip and the acknowledgement latency per new request (replays are unaffected).
//!
//! It is not a guarantee: `WAIT` does not make Redis strongly consistent. Sentinel or
//! Cluster may promote a replica that had not acknowledged yet, and a replica that did
//! can still lose the record (without AOF, a restart). If fewer than `n` replicas answer
//! within the timeout, the record still counts as stored (it is on the primary); the
//! store logs `warn!` and counts `idempotency_store_wait_replicas_short_total`. Further
//! limits: a complete retried after a lost reply writes nothing, so its `WAIT` confirms
//! nothing about the earlier write; waiters are woken when the record is stored, before
//! its `WAIT` returns; on a cluster, a slot that moves between the complete and its
//! `WAIT` leaves that request unprotected.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use tower_idempotency_redis::RedisStore;
//! # async fn f() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = RedisStore::from_url("redis://127.0.0.1:6379")?
//!     .wait_replicas(1, Duration::from_millis(100))
//!     .init()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! `enable-rustls` and `enable-native-tls` turn on fred's TLS support of the same names
//! (for `rediss://` URLs).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod channels;
mod check;
mod connection;
mod error;
mod eval;
mod replication;
mod round_trip;
mod scripts;
mod setup;
mod store;
mod subscriber;

pub use check::CheckReport;
pub use error::RedisStoreError;
pub use fred;
pub use replication::DEFAULT_WAIT_CONNECTIONS;
pub use round_trip::RoundTrips;
pub use setup::{DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PREFIX};
pub use store::RedisStore;
pub use subscriber::{RedisSubscription, DENIED_RETRY};
pub use tower_idempotency_core::local::{
    LocalReplays, DEFAULT_LOCAL_REPLAY_AGE, DEFAULT_LOCAL_REPLAY_BYTES,
};
