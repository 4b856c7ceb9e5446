//! A Redis store for [`tower-idempotency`](tower_idempotency_core): [`RedisStore`], on
//! the [`fred`] client the application already has.
//!
//! Every operation of the [`Store`](tower_idempotency_core::Store) trait is one atomic Lua
//! script on one key, so:
//!
//! - of any number of concurrent first requests with one key, on any number of app
//!   servers, exactly one is told to run the handler;
//! - a new request costs 2 round trips (reserve, complete; 3 with
//!   [`wait_replicas`](RedisStore::wait_replicas)), a replay 1 (the completed record comes
//!   back with the reservation attempt), a lease renewal 1;
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
//! # ACL users
//!
//! The store's user needs its keys (`~{prefix}*`), the scripts and the commands they run
//! (Redis checks those too), `PING`, `INFO` and `CONFIG GET` for
//! [`check`](RedisStore::check), `CLIENT ID` (fred asks on connect), `WAIT` with
//! [`wait_replicas`](RedisStore::wait_replicas), and, for waiters to be woken rather than
//! poll, its channels (`&{prefix}*`, `SPUBLISH`, `SSUBSCRIBE`, `SUNSUBSCRIBE`). With the
//! default prefix (a test runs exactly this line):
//!
//! ```text
//! ACL SETUSER app on >secret ~idem:* &idem:* +@scripting +hmget +hset +pexpire +del
//!     +spublish +ssubscribe +sunsubscribe +ping +info +config|get +client|id
//! ```
//!
//! A Redis 7 user created without channel rules (`acl-pubsub-default resetchannels`, the
//! default) may not publish or subscribe. Everything still works: publishing is best
//! effort, waiters ([`InFlight::Wait`]) poll (20 ms → 250 ms), `check()` warns, and the
//! subscriber logs one warning per store.
//!
//! [`InFlight::Wait`]: tower_idempotency_core::InFlight::Wait
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_idempotency_core::{FencingToken, Fingerprint, Reservation, ScopeHash, Store};
//! use tower_idempotency_redis::fred::prelude::*;
//! use tower_idempotency_redis::RedisStore;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // The application's own client (or a `Pool`; a `redis-cluster://` or
//! // `redis-sentinel://` URL works the same way).
//! let client = Builder::from_config(Config::from_url("redis://127.0.0.1:6379")?).build()?;
//! client.init().await?;
//!
//! // Loads the scripts on every primary and logs what `check()` warns about.
//! let store = RedisStore::new(client)
//!     .prefix("payments:")
//!     .command_timeout(Duration::from_secs(1))
//!     .init()
//!     .await?;
//! println!("{}", store.check().await?);
//!
//! // The layer drives the store; this is what it does for a new request.
//! let scope = ScopeHash::from_bytes([7; 32]);
//! let fingerprint = Fingerprint::from_bytes([1; 32]);
//! let token = FencingToken::generate();
//! let reservation = store
//!     .reserve(&scope, &fingerprint, token, Duration::from_secs(30))
//!     .await?;
//! assert_eq!(reservation, Reservation::Reserved);
//! assert_eq!(store.round_trips().reserve, 1);
//! # Ok(()) }
//! ```
//!
//! # Replication and failover
//!
//! Redis replicates asynchronously: a record the primary has stored can be lost if the
//! primary fails before a replica received it, and after the failover the client's retry
//! finds no record and runs the handler again. [`RedisStore::wait_replicas`] (off by
//! default) sends `WAIT n timeout` after each complete, on the same dedicated connection,
//! so the request's response waits until `n` replicas acknowledged the record. That
//! narrows the window for a lost record to the replicas' acknowledgement, at the cost of
//! one more round trip and the acknowledgement latency per new request (replays are
//! unaffected). It is not a guarantee: `WAIT` does not make Redis strongly consistent,
//! and a failover may still promote a replica that had not acknowledged. If fewer than
//! `n` replicas answer within the timeout, the record still counts as stored (it is on
//! the primary); the store logs `warn!` and counts
//! `idempotency_store_wait_replicas_short_total`.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use tower_idempotency_redis::fred::prelude::*;
//! # use tower_idempotency_redis::RedisStore;
//! # async fn f(client: Client) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = RedisStore::new(client)
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

pub mod check;
mod connection;
mod error;
pub mod replication;
pub mod round_trip;
mod scripts;
pub mod store;
pub mod subscriber;

pub use check::CheckReport;
pub use error::RedisStoreError;
pub use fred;
pub use replication::DEFAULT_WAIT_CONNECTIONS;
pub use round_trip::RoundTrips;
pub use store::{RedisStore, DEFAULT_COMMAND_TIMEOUT, DEFAULT_PREFIX};
pub use subscriber::RedisSubscription;
