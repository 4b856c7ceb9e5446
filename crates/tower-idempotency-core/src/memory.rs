//! [`MemoryStore`]: an in-process store for one server, tests and development.
//!
//! Entries live in shards, each behind its own lock, so requests for different keys do not
//! wait on one another. Expiry uses [`tokio::time::Instant`], so tests can drive it with
//! `tokio::time::pause()`. The store never evicts a live entry (pending or completed):
//! it holds at most `max_entries`, sweeps expired ones, and when it is still full a new
//! reservation fails with [`StoreError::Full`] (the layer answers 503).
//!
//! It is not shared between processes: run several app servers against
//! [`RedisStore`](https://docs.rs/tower-idempotency-redis) instead.
//!
//! # Example
//!
//! ```
//! use axum::{routing::post, Router};
//! use tower_idempotency_core::{IdempotencyLayer, MemoryStore};
//!
//! let store = MemoryStore::builder().max_entries(100_000).build();
//! let app: Router = Router::new().route(
//!     "/payments",
//!     post(|| async { "paid" }).layer(IdempotencyLayer::new(store).global_scope()),
//! );
//! ```

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::fingerprint::{Fingerprint, ScopeHash};
use crate::record::Record;
use crate::store::{Completion, Reservation, Store, StoreError, Subscription};
use crate::token::FencingToken;

/// Default capacity of a [`MemoryStore`].
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

const SHARDS: usize = 64;
/// Every this many insertions into a shard, expired entries of that shard are swept.
const SWEEP_EVERY: usize = 1024;

/// An in-memory [`Store`], sharded and bounded. Cheap to clone: clones share the entries.
///
/// See the [module docs](crate::memory) for an example.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

/// Builds a [`MemoryStore`].
#[derive(Clone, Debug)]
pub struct MemoryStoreBuilder {
    max_entries: usize,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    len: AtomicUsize,
    max_entries: usize,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<ScopeHash, Entry, ScopeHasher>,
    inserts: usize,
}

#[derive(Debug)]
struct Entry {
    fingerprint: Fingerprint,
    token: FencingToken,
    state: State,
    expires: Instant,
    /// Created on the first subscription, fired on completion or release.
    notify: Option<Arc<Notify>>,
}

#[derive(Debug)]
enum State {
    Pending,
    Completed(Record),
}

/// Scope hashes are already uniform blake3 output: use their first 8 bytes as the hash.
#[derive(Clone, Copy, Debug, Default)]
struct ScopeHasher;

impl BuildHasher for ScopeHasher {
    type Hasher = ScopeHashHasher;
    fn build_hasher(&self) -> ScopeHashHasher {
        ScopeHashHasher(0)
    }
}

#[derive(Debug)]
struct ScopeHashHasher(u64);

impl Hasher for ScopeHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(buf);
            if chunk.len() == 8 {
                // Only the first word matters for distribution; stop early.
                return;
            }
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl MemoryStore {
    /// A store holding at most [`DEFAULT_MAX_ENTRIES`] entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// Configure capacity.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }

    /// Number of entries, live or expired but not yet swept.
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// `true` when the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured capacity.
    pub fn max_entries(&self) -> usize {
        self.inner.max_entries
    }

    /// Removes every expired entry now. Also done automatically when the store is full and
    /// every few thousand insertions.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.inner.shards.iter() {
            self.inner.sweep_shard(&mut lock(shard), now);
        }
    }

    fn shard(&self, scope: &ScopeHash) -> MutexGuard<'_, Shard> {
        // Bytes 8.. pick the shard; bytes ..8 feed the map's hasher.
        let index = usize::from(scope.as_bytes()[8]) % self.inner.shards.len();
        lock(&self.inner.shards[index])
    }
}

impl MemoryStoreBuilder {
    /// The most entries (pending or completed) the store holds; default
    /// [`DEFAULT_MAX_ENTRIES`]. When full, new reservations fail with
    /// [`StoreError::Full`]; live entries are never evicted.
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                len: AtomicUsize::new(0),
                max_entries: self.max_entries,
            }),
        }
    }
}

/// `now + d`, saturating far in the future instead of overflowing: the trait accepts
/// any `Duration`, and a store must not panic on one.
fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(crate::policy::MAX_TTL))
        .unwrap_or(now)
}

/// A poisoned shard only means a panic happened while it was locked; every mutation
/// below leaves the map consistent at each step, so the data is still sound.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn sweep_shard(&self, shard: &mut Shard, now: Instant) {
        let before = shard.entries.len();
        shard.entries.retain(|_, entry| {
            let live = entry.expires > now;
            if !live {
                wake(entry);
            }
            live
        });
        self.len
            .fetch_sub(before - shard.entries.len(), Ordering::Relaxed);
    }

    /// Claims room for one more entry, sweeping first when the store is full.
    fn claim_slot(&self, shard: &mut Shard, now: Instant) -> bool {
        if self.try_claim() {
            return true;
        }
        self.sweep_shard(shard, now);
        if self.try_claim() {
            return true;
        }
        // Other shards may hold expired entries; sweeping them needs their locks, which
        // must not be taken while this one is held (lock order), so the caller retries.
        false
    }

    fn try_claim(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |len| {
                (len < self.max_entries).then_some(len + 1)
            })
            .is_ok()
    }
}

fn wake(entry: &Entry) {
    if let Some(notify) = &entry.notify {
        notify.notify_waiters();
    }
}

impl MemoryStore {
    fn reserve_now(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Option<Reservation>, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(scope);
        if let Some(entry) = shard.entries.get(scope) {
            if entry.expires > now {
                if entry.fingerprint != *fingerprint {
                    return Ok(Some(Reservation::Mismatch));
                }
                return Ok(Some(match &entry.state {
                    State::Pending => Reservation::InFlight,
                    State::Completed(record) => Reservation::Completed(record.clone()),
                }));
            }
            // Expired: the slot is reused in place, waking anyone waiting on the old one.
            if let Some(old) = shard.entries.remove(scope) {
                wake(&old);
            }
            self.inner.len.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.inner.claim_slot(&mut shard, now) {
            return Ok(None);
        }
        shard.inserts += 1;
        if shard.inserts % SWEEP_EVERY == 0 {
            self.inner.sweep_shard(&mut shard, now);
        }
        shard.entries.insert(
            *scope,
            Entry {
                fingerprint: *fingerprint,
                token,
                state: State::Pending,
                expires: deadline(now, lease),
                notify: None,
            },
        );
        Ok(Some(Reservation::Reserved))
    }
}

impl Store for MemoryStore {
    type Subscription = MemorySubscription;

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        if let Some(answer) = self.reserve_now(scope, fingerprint, token, lease)? {
            return Ok(answer);
        }
        // Full: sweep every shard once and try again before refusing.
        self.sweep();
        self.reserve_now(scope, fingerprint, token, lease)?
            .ok_or(StoreError::Full {
                max_entries: self.inner.max_entries,
            })
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(scope);
        Ok(match shard.entries.get_mut(scope) {
            Some(entry) if entry.token == token && entry.expires > now => {
                if matches!(entry.state, State::Pending) {
                    entry.expires = deadline(now, lease);
                }
                true
            }
            _ => false,
        })
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(scope);
        Ok(match shard.entries.get_mut(scope) {
            Some(entry) if entry.token == token && entry.expires > now => {
                if matches!(entry.state, State::Pending) {
                    entry.state = State::Completed(record.clone());
                    entry.expires = deadline(now, ttl);
                    wake(entry);
                }
                Completion::Stored
            }
            _ => Completion::Fenced,
        })
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(scope);
        let held = matches!(
            shard.entries.get(scope),
            Some(entry) if entry.token == token
                && entry.expires > now
                && matches!(entry.state, State::Pending)
        );
        if held {
            if let Some(entry) = shard.entries.remove(scope) {
                self.inner.len.fetch_sub(1, Ordering::Relaxed);
                wake(&entry);
            }
        }
        Ok(held)
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<MemorySubscription, StoreError> {
        let mut shard = self.shard(scope);
        let notify = match shard.entries.get_mut(scope) {
            Some(entry) => entry.notify.get_or_insert_with(Default::default).clone(),
            // Nothing to wait for: a fresh Notify that nobody fires; the caller's re-read
            // sees the absent entry and reserves it.
            None => Arc::new(Notify::new()),
        };
        Ok(MemorySubscription::new(notify))
    }
}

/// A [`Subscription`] on a [`MemoryStore`] scope: a per-key [`Notify`].
#[derive(Debug)]
pub struct MemorySubscription {
    notify: Arc<Notify>,
    notified: std::pin::Pin<Box<OwnedNotified>>,
}

impl MemorySubscription {
    fn new(notify: Arc<Notify>) -> Self {
        let mut notified = Box::pin(notify.clone().notified_owned());
        // Registered now, so a notify_waiters() before the first poll is not lost.
        notified.as_mut().enable();
        MemorySubscription { notify, notified }
    }
}

impl Subscription for MemorySubscription {
    async fn changed(&mut self) {
        self.notified.as_mut().await;
        let mut next = Box::pin(self.notify.clone().notified_owned());
        next.as_mut().enable();
        self.notified = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(n: u8) -> ScopeHash {
        let mut bytes = [0u8; 32];
        bytes[0] = n;
        bytes[8] = n;
        ScopeHash::from_bytes(bytes)
    }
    const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn lease_and_ttl_expire_on_the_store_clock() {
        let store = MemoryStore::default();
        let t1 = FencingToken::generate();
        assert_eq!(
            store.reserve(&scope(1), &FP, t1, LEASE).await.unwrap(),
            Reservation::Reserved
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        // The lease expired: a new owner gets it and the stale one is fenced.
        let t2 = FencingToken::generate();
        assert_eq!(
            store.reserve(&scope(1), &FP, t2, LEASE).await.unwrap(),
            Reservation::Reserved
        );
        let rec = Record::NotReplayable;
        let ttl = Duration::from_secs(60);
        assert_eq!(
            store.complete(&scope(1), t1, &rec, ttl).await.unwrap(),
            Completion::Fenced
        );
        assert!(!store.release(&scope(1), t1).await.unwrap());
        assert_eq!(
            store.complete(&scope(1), t2, &rec, ttl).await.unwrap(),
            Completion::Stored
        );
        // Same token again: idempotent.
        assert_eq!(
            store.complete(&scope(1), t2, &rec, ttl).await.unwrap(),
            Completion::Stored
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            store
                .reserve(&scope(1), &FP, FencingToken::generate(), LEASE)
                .await
                .unwrap(),
            Reservation::Completed(rec)
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            store
                .reserve(&scope(1), &FP, FencingToken::generate(), LEASE)
                .await
                .unwrap(),
            Reservation::Reserved
        );
    }

    #[tokio::test]
    async fn full_store_refuses_and_never_evicts_live_entries() {
        let store = MemoryStore::builder().max_entries(2).build();
        for n in 0..2 {
            let r = store
                .reserve(&scope(n), &FP, FencingToken::generate(), LEASE)
                .await;
            assert_eq!(r.unwrap(), Reservation::Reserved);
        }
        let r = store
            .reserve(&scope(9), &FP, FencingToken::generate(), LEASE)
            .await;
        assert!(matches!(r, Err(StoreError::Full { max_entries: 2 })));
        // The live entries are still there.
        let r = store
            .reserve(&scope(0), &FP, FencingToken::generate(), LEASE)
            .await;
        assert_eq!(r.unwrap(), Reservation::InFlight);
        assert_eq!(store.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_reuses_expired_slots() {
        let store = MemoryStore::builder().max_entries(2).build();
        for n in 0..2 {
            store
                .reserve(&scope(n), &FP, FencingToken::generate(), LEASE)
                .await
                .unwrap();
        }
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let r = store
            .reserve(&scope(7), &FP, FencingToken::generate(), LEASE)
            .await;
        assert_eq!(r.unwrap(), Reservation::Reserved);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn release_wakes_a_subscriber_registered_before() {
        let store = MemoryStore::default();
        let t = FencingToken::generate();
        store.reserve(&scope(3), &FP, t, LEASE).await.unwrap();
        let mut sub = store.subscribe(&scope(3)).await.unwrap();
        // Released before the subscriber polls: the wake-up must not be lost.
        assert!(store.release(&scope(3), t).await.unwrap());
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .expect("subscriber woken");
    }

    #[tokio::test]
    async fn mismatch_while_in_flight() {
        let store = MemoryStore::default();
        store
            .reserve(&scope(4), &FP, FencingToken::generate(), LEASE)
            .await
            .unwrap();
        let other = Fingerprint::from_bytes([2; 32]);
        let r = store
            .reserve(&scope(4), &other, FencingToken::generate(), LEASE)
            .await;
        assert_eq!(r.unwrap(), Reservation::Mismatch);
    }
}
