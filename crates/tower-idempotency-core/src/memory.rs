//! [`MemoryStore`]: an in-process store for one server, tests and development.
//!
//! Entries live in shards, each behind its own lock, so requests for different keys do not
//! wait on one another. Expiry uses [`tokio::time::Instant`], so tests can drive it with
//! `tokio::time::pause()`.
//!
//! # Bounds
//!
//! The store never evicts a live entry (pending or completed). It is bounded twice: by
//! entries ([`max_entries`](MemoryStoreBuilder::max_entries)) and by bytes
//! ([`max_bytes`](MemoryStoreBuilder::max_bytes), default 256 MiB). When either bound is
//! reached, a new reservation fails with [`StoreError::Full`] and the layer answers 503;
//! a completion is never refused, because the operation it records already happened.
//!
//! What the default budget absorbs: an entry counts about 400 bytes
//! ([`ENTRY_OVERHEAD_BYTES`]) plus its stored response (body and kept headers), and lives
//! for the route's TTL, so the store holds TTL × (new keys per second) entries. With the
//! default 24 h TTL and 256 MiB ([`DEFAULT_MAX_BYTES`]), that is about **7 new keys per
//! second** sustained for ~50-byte JSON responses (≈ 450 bytes an entry, ≈ 600,000
//! entries), about **2 per second** for 1 KiB responses, and about 0.3 per second for
//! 10 KiB ones; past that, within a day the store is full and new keys get 503 until
//! entries expire. Size `max_bytes` (and the TTL) for the traffic: budget ≈ TTL in
//! seconds × new keys per second × (400 + response bytes). For more, or for several app
//! servers, use the Redis or Postgres store.
//!
//! Expired entries are swept a shard at a time: every 1024 insertions into a shard, and
//! when the store is full. Each shard, and the store as a whole, keeps a lower bound of
//! the earliest expiry of its entries, and only a shard whose bound has passed is swept,
//! by one caller at a time. So a flood of new keys on a store full of live entries is
//! refused at a constant cost instead of a sweep per refusal, and the sweeps a full store
//! makes are bounded by the entries that expire.
//!
//! # Waiting
//!
//! Waiters on a scope share one [`Notify`] that outlives the scope's entries: a release
//! followed by a new owner's completion wakes everyone who subscribed before the
//! release. Completion, release and expiry notify it; nothing is looked up when no one
//! waits in the shard.
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
//! let store = MemoryStore::builder()
//!     .max_entries(100_000)
//!     .max_bytes(64 * 1024 * 1024)
//!     .build();
//! let app: Router = Router::new().route(
//!     "/payments",
//!     post(|| async { "paid" }).layer(IdempotencyLayer::new(store).global_scope()),
//! );
//! ```

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::mem::size_of;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::fingerprint::{Fingerprint, ScopeHash};
use crate::observe::MemoryGauges;
use crate::record::Record;
use crate::store::{
    Completion, KeyState, LeaseTerms, Reservation, Resolved, Store, StoreError, Subscription,
};
use crate::token::FencingToken;

/// Default entry capacity of a [`MemoryStore`].
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

/// Default byte budget of a [`MemoryStore`]: 256 MiB, enough for a small service (about
/// 600,000 small records, or 64 at the default 4 MiB stored-response limit).
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;

/// What every entry counts against the byte budget before its record: its slot in the
/// hash table (the key; the entry's fingerprint, token, expiry and inline record fields;
/// one control byte) times 16/7, the most slots per entry a growing table holds (it
/// doubles when 7/8 full, so it is at least 7/16 full after growing). A sweep that leaves
/// a table less than a quarter full shrinks it. About 400 bytes on 64-bit targets; the
/// figure may change between versions.
pub const ENTRY_OVERHEAD_BYTES: usize = (size_of::<(ScopeHash, Entry)>() + 1) * 16 / 7 + 1;

const SHARDS: usize = 64;
/// Every this many insertions into a shard, its expired entries are swept (if its
/// earliest expiry says there can be any).
const SWEEP_EVERY: usize = 1024;
/// A sweep shrinks a shard's table only above this capacity (small tables are not worth
/// the rehash).
const SHRINK_ABOVE: usize = 128;

/// An in-memory [`Store`], sharded and bounded by entries and bytes. Cheap to clone:
/// clones share the entries.
///
/// See the [module docs](crate::memory) for the bounds and an example.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

/// Builds a [`MemoryStore`].
///
/// ```
/// use tower_idempotency_core::MemoryStore;
///
/// let store = MemoryStore::builder().max_entries(10_000).max_bytes(32 << 20).build();
/// assert_eq!((store.max_entries(), store.max_bytes()), (10_000, 32 << 20));
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `.build()`"]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    /// Entries held, live or expired but not yet swept.
    len: AtomicUsize,
    /// What the held entries count against `max_bytes` (see [`ENTRY_OVERHEAD_BYTES`]).
    bytes: AtomicUsize,
    max_entries: usize,
    max_bytes: usize,
    /// A lower bound of every entry's expiry, in nanoseconds since `epoch`; `u64::MAX`
    /// when there is no entry. Lowered on every write of an expiry, reset and rebuilt by
    /// [`Inner::sweep_due`]. While it has not passed, no entry can have expired, so a full
    /// store refuses without sweeping.
    earliest: AtomicU64,
    epoch: Instant,
    /// Set while one caller sweeps on behalf of a refused reservation; others refuse at
    /// once instead of queueing on the shard locks behind it.
    sweeping: AtomicBool,
    /// `len`, `bytes` and the bounds as metrics (`idempotency_memory_store_*`).
    gauges: MemoryGauges,
    /// Shard sweeps run and passes over all shards made, for the tests that show a full
    /// store does not sweep per refusal.
    #[cfg(test)]
    shard_sweeps: AtomicUsize,
    #[cfg(test)]
    sweep_passes: AtomicUsize,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<ScopeHash, Entry, ScopeHasher>,
    /// A lower bound of the expiries in `entries`, exact after a sweep; `None` when the
    /// shard held no entry at its last sweep and none was inserted since.
    earliest: Option<Tick>,
    /// One `Notify` per scope someone waits on, shared by its subscriptions and outliving
    /// the scope's entries; the last subscription to drop removes it.
    waiters: HashMap<ScopeHash, Weak<Notify>, ScopeHasher>,
    inserts: usize,
}

/// An instant as nanoseconds since the store's epoch ([`Inner::ticks`]): 8 bytes where an
/// [`Instant`] takes 16, in every entry of the table.
type Tick = u64;

/// A table entry. Its slot is what every key costs whatever its record (the part of
/// [`ENTRY_OVERHEAD_BYTES`] the byte budget counts, and the memory a growing table
/// touches and copies), so it is kept small: instants as [`Tick`]s, and the token as its
/// bytes (a `u128` would align the slot to 16 bytes). 168 bytes with its key on 64-bit
/// targets, where `Instant`s and the `u128` made it 192.
#[derive(Debug)]
struct Entry {
    fingerprint: Fingerprint,
    token: [u8; 16],
    state: State,
    /// When the entry goes: the end of the lease (or of the time a lapsed lease is kept),
    /// or of the record's TTL.
    expires: Tick,
    /// When the entry took its state: the reservation, or the completion.
    since: Tick,
    /// What this entry counts against the byte budget; given back when it goes.
    bytes: usize,
}

#[derive(Debug)]
enum State {
    /// A lease. `lease_until` is set when a lapsed lease is kept as uncertain (it then
    /// ends before `expires`); otherwise the lease ends with the entry.
    Pending {
        lease_until: Option<Tick>,
    },
    Completed(Record),
}

impl Entry {
    /// Whether this is a pending entry whose lease lapsed (kept as uncertain).
    fn lapsed(&self, now: Tick) -> bool {
        matches!(self.state, State::Pending { lease_until: Some(until) } if until <= now)
    }

    /// Whether `token` holds this entry.
    fn held_by(&self, token: FencingToken) -> bool {
        self.token == token.to_bytes()
    }
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
    /// A store bounded by [`DEFAULT_MAX_ENTRIES`] and [`DEFAULT_MAX_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Configure capacity.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
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

    /// What the entries count against [`max_bytes`](Self::max_bytes) now, live or expired
    /// but not yet swept. May exceed it by the records of reservations granted before the
    /// budget was reached (see [`MemoryStoreBuilder::max_bytes`]).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// The configured entry capacity.
    pub fn max_entries(&self) -> usize {
        self.inner.max_entries
    }

    /// The configured byte budget.
    pub fn max_bytes(&self) -> usize {
        self.inner.max_bytes
    }

    /// Removes every expired entry now. Also done automatically, shard by shard, every
    /// 1024 insertions into a shard and when the store is full.
    pub fn sweep(&self) {
        self.inner.sweep_due(self.inner.now());
    }

    fn shard(&self, scope: &ScopeHash) -> MutexGuard<'_, Shard> {
        self.inner.shard(scope)
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

    /// The most bytes the entries may count; default [`DEFAULT_MAX_BYTES`] (256 MiB).
    ///
    /// Each entry counts [`ENTRY_OVERHEAD_BYTES`]; a completed one adds its record's body
    /// length and, per stored header, the name and value lengths and the size of its slot
    /// in the header list. A new reservation that would go past the budget fails with
    /// [`StoreError::Full`] (the layer answers 503); live entries are never evicted.
    ///
    /// A completion is never refused, since the operation it records already happened:
    /// the budget may be exceeded by at most the records of the reservations granted
    /// before it was reached (at most, per pending reservation, the layer's stored-response
    /// limit, 4 MiB by default). Until entries expire, new reservations are then refused.
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                len: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_entries: self.max_entries,
                max_bytes: self.max_bytes,
                earliest: AtomicU64::new(u64::MAX),
                epoch: Instant::now(),
                sweeping: AtomicBool::new(false),
                gauges: MemoryGauges::default(),
                #[cfg(test)]
                shard_sweeps: AtomicUsize::new(0),
                #[cfg(test)]
                sweep_passes: AtomicUsize::new(0),
            }),
        }
    }
}

// By hand: the derived form would print every entry of every shard.
impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("len", &self.len)
            .field("bytes", &self.bytes)
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// `now + d`, saturating far in the future instead of overflowing: the trait accepts
/// any `Duration`, and a store must not panic on one.
fn deadline(now: Tick, d: Duration) -> Tick {
    now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The time from `from` to `to`, zero if `to` is earlier.
fn span(from: Tick, to: Tick) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

/// A poisoned shard only means a panic happened while it was locked; every mutation
/// below leaves the map and the counters consistent at each step, so the data is sound.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a record counts against the byte budget beyond [`ENTRY_OVERHEAD_BYTES`] (whose
/// entry size already holds the status and the inline parts of the header list and body).
fn record_bytes(record: &Record) -> usize {
    match record {
        Record::Response(response) => {
            response
                .headers
                .iter()
                .fold(response.body.len(), |sum, (name, value)| {
                    sum.saturating_add(size_of::<(HeaderName, HeaderValue)>())
                        .saturating_add(name.as_str().len())
                        .saturating_add(value.as_bytes().len())
                })
        }
        Record::NotReplayable => 0,
    }
}

/// Wakes the subscribers of `scope`, if any. The emptiness check keeps the common case
/// (nobody waits on any key of the shard) free of a second map lookup.
fn wake(waiters: &HashMap<ScopeHash, Weak<Notify>, ScopeHasher>, scope: &ScopeHash) {
    if waiters.is_empty() {
        return;
    }
    if let Some(notify) = waiters.get(scope).and_then(Weak::upgrade) {
        notify.notify_waiters();
    }
}

impl Shard {
    /// Whether an entry of this shard may have expired by `now`.
    fn due(&self, now: Tick) -> bool {
        self.earliest.is_some_and(|earliest| earliest <= now)
    }

    fn note_expiry(&mut self, expires: Tick) {
        self.earliest = Some(self.earliest.map_or(expires, |e| e.min(expires)));
    }
}

/// Clears [`Inner::sweeping`] when the sweep ends, even by a panic.
struct SweepGuard<'a>(&'a AtomicBool);

impl Drop for SweepGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Inner {
    fn shard(&self, scope: &ScopeHash) -> MutexGuard<'_, Shard> {
        // Bytes 8.. pick the shard; bytes ..8 feed the map's hasher.
        let index = usize::from(scope.as_bytes()[8]) % self.shards.len();
        lock(&self.shards[index])
    }

    /// `t` as nanoseconds since `epoch`. Monotonic, so comparing ticks never says
    /// "not expired" where comparing instants would say "expired"; an instant before the
    /// epoch (a store built on another clock) counts as 0, which only sweeps sooner.
    fn ticks(&self, t: Instant) -> Tick {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The current instant as a [`Tick`].
    fn now(&self) -> Tick {
        self.ticks(Instant::now())
    }

    /// Keeps `earliest` a lower bound after an entry's expiry was set to `expires`. Called
    /// under the entry's shard lock, which orders it against a sweep's reset (see
    /// [`Inner::sweep_due`]). Most expiries are later than the bound: a load, no write.
    fn note_expiry(&self, expires: Tick) {
        if expires < self.earliest.load(Ordering::Relaxed) {
            self.earliest.fetch_min(expires, Ordering::Relaxed);
        }
    }

    /// Whether any entry may have expired by `now`.
    fn may_have_expired(&self, now: Tick) -> bool {
        self.earliest.load(Ordering::Relaxed) <= now
    }

    /// Sweeps every shard whose earliest expiry has passed and rebuilds `earliest`.
    ///
    /// The bound is reset first, then each shard's (exact after its sweep) is folded in
    /// under that shard's lock. A writer that set an expiry before this sweep locked its
    /// shard is in that shard's bound; one after it lowers the reset value itself. So once
    /// every shard is folded in, the bound is valid again; while a sweep runs it may be too
    /// high, which only makes a concurrent full store refuse instead of sweeping too.
    fn sweep_due(&self, now: Tick) {
        #[cfg(test)]
        self.sweep_passes.fetch_add(1, Ordering::Relaxed);
        self.earliest.store(u64::MAX, Ordering::Relaxed);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            if shard.due(now) {
                self.sweep_shard(&mut shard, now);
            }
            if let Some(earliest) = shard.earliest {
                self.note_expiry(earliest);
            }
        }
    }

    /// Removes the shard's expired entries, waking their waiters, and makes its bound exact.
    fn sweep_shard(&self, shard: &mut Shard, now: Tick) {
        #[cfg(test)]
        self.shard_sweeps.fetch_add(1, Ordering::Relaxed);
        let Shard {
            entries,
            earliest,
            waiters,
            ..
        } = shard;
        let (mut freed, mut freed_bytes) = (0, 0);
        let mut next: Option<Tick> = None;
        entries.retain(|scope, entry| {
            if entry.expires > now {
                next = Some(next.map_or(entry.expires, |n| n.min(entry.expires)));
                return true;
            }
            freed += 1;
            freed_bytes += entry.bytes;
            wake(waiters, scope);
            false
        });
        *earliest = next;
        // A table keeps its peak capacity; give most of it back once it is mostly empty,
        // so the memory left follows the entries the byte budget counts.
        if entries.capacity() > SHRINK_ABOVE && entries.len() < entries.capacity() / 4 {
            entries.shrink_to(entries.len() * 2);
        }
        // The last subscription to drop removes its Notify; this is only a backstop.
        waiters.retain(|_, notify| notify.strong_count() > 0);
        self.len.fetch_sub(freed, Ordering::Relaxed);
        self.bytes.fetch_sub(freed_bytes, Ordering::Relaxed);
        self.publish();
    }

    /// Claims room for one more pending entry, or `false` when a bound is reached.
    fn try_claim(&self) -> bool {
        let claimed_entry = self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |len| {
                (len < self.max_entries).then_some(len + 1)
            })
            .is_ok();
        if !claimed_entry {
            return false;
        }
        let claimed_bytes = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |bytes| {
                let after = bytes.saturating_add(ENTRY_OVERHEAD_BYTES);
                (after <= self.max_bytes).then_some(after)
            })
            .is_ok();
        if !claimed_bytes {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        self.publish();
        true
    }

    /// Gives back what a removed entry counted.
    fn give_back(&self, entry: &Entry) {
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(entry.bytes, Ordering::Relaxed);
        self.publish();
    }

    /// Sets the fullness gauges to the counters' values.
    fn publish(&self) {
        let (len, bytes) = (
            self.len.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        );
        self.gauges
            .set(len, bytes, self.max_entries, self.max_bytes);
    }

    fn full(&self) -> StoreError {
        StoreError::Full {
            entries: self.len.load(Ordering::Relaxed),
            max_entries: self.max_entries,
            bytes: self.bytes.load(Ordering::Relaxed),
            max_bytes: self.max_bytes,
        }
    }
}

impl MemoryStore {
    /// One attempt; `None` when the store is full (after sweeping this shard, if its
    /// bound says it holds expired entries).
    fn reserve_now(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
        now: Tick,
    ) -> Option<Reservation> {
        let mut shard = self.shard(scope);
        if let Some(entry) = shard.entries.get(scope) {
            // A lapsed lease kept as uncertain is taken over by a reserve that does not
            // keep lapsed leases itself (its route runs such keys again).
            let take_over = entry.lapsed(now) && lease.keep_lapsed.is_none();
            if entry.expires > now && !take_over {
                let pending = matches!(entry.state, State::Pending { .. });
                // The same token again: a re-sent reserve (SPEC section 6). The lease it
                // took is its own, and it keeps its expiry.
                if pending && entry.held_by(token) && entry.fingerprint == *fingerprint {
                    return Some(Reservation::Reserved);
                }
                if entry.fingerprint != *fingerprint {
                    return Some(Reservation::Mismatch);
                }
                return Some(match &entry.state {
                    State::Pending { .. } if entry.lapsed(now) => Reservation::Uncertain,
                    State::Pending { .. } => Reservation::InFlight,
                    State::Completed(record) => Reservation::Completed(record.clone()),
                });
            }
            // Expired (or taken over): the slot is reused in place, waking anyone waiting
            // on the old one.
            if let Some(old) = shard.entries.remove(scope) {
                self.inner.give_back(&old);
                wake(&shard.waiters, scope);
            }
        }
        if !self.inner.try_claim() {
            // Only this shard can be swept here: other shards' locks must not be taken
            // while this one is held (lock order), so the caller sweeps them.
            if !shard.due(now) {
                return None;
            }
            self.inner.sweep_shard(&mut shard, now);
            if !self.inner.try_claim() {
                return None;
            }
        }
        shard.inserts = shard.inserts.wrapping_add(1);
        if shard.inserts % SWEEP_EVERY == 0 && shard.due(now) {
            self.inner.sweep_shard(&mut shard, now);
        }
        let expires = deadline(now, lease.record_life());
        let lease_until = lease.keep_lapsed.map(|_| deadline(now, lease.duration));
        shard.entries.insert(
            *scope,
            Entry {
                fingerprint: *fingerprint,
                token: token.to_bytes(),
                state: State::Pending { lease_until },
                expires,
                since: now,
                bytes: ENTRY_OVERHEAD_BYTES,
            },
        );
        shard.note_expiry(expires);
        self.inner.note_expiry(expires);
        Some(Reservation::Reserved)
    }
}

impl Store for MemoryStore {
    type Subscription = MemorySubscription;

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> Result<Reservation, StoreError> {
        let now = self.inner.now();
        if let Some(answer) = self.reserve_now(scope, fingerprint, token, lease, now) {
            return Ok(answer);
        }
        // Full. Sweeping helps only if some entry may have expired, and one sweeper at a
        // time is enough: the others refuse at once rather than wait on its shard locks.
        if self.inner.may_have_expired(now)
            && self
                .inner
                .sweeping
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            let _guard = SweepGuard(&self.inner.sweeping);
            self.inner.sweep_due(now);
            if let Some(answer) = self.reserve_now(scope, fingerprint, token, lease, now) {
                return Ok(answer);
            }
        }
        Err(self.inner.full())
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = self.inner.now();
        let mut shard = self.shard(scope);
        let Shard { entries, .. } = &mut *shard;
        let renewed = match entries.get_mut(scope) {
            Some(entry) if entry.held_by(token) && entry.expires > now => match &mut entry.state {
                // A kept lease: its end moves, and the entry lives at least as long.
                State::Pending {
                    lease_until: Some(until),
                } => {
                    *until = deadline(now, lease);
                    entry.expires = entry.expires.max(*until);
                    Some(entry.expires)
                }
                State::Pending { lease_until: None } => {
                    entry.expires = deadline(now, lease);
                    Some(entry.expires)
                }
                State::Completed(_) => None,
            },
            _ => return Ok(false),
        };
        // A shorter lease than before moves the expiry earlier: keep the bounds valid.
        if let Some(expires) = renewed {
            shard.note_expiry(expires);
            self.inner.note_expiry(expires);
        }
        Ok(true)
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let now = self.inner.now();
        let mut shard = self.shard(scope);
        let Shard {
            entries, waiters, ..
        } = &mut *shard;
        let stored = match entries.get_mut(scope) {
            Some(entry) if entry.held_by(token) && entry.expires > now => {
                if !matches!(entry.state, State::Pending { .. }) {
                    // Already stored by this token: a retry after a lost reply.
                    return Ok(Completion::Stored);
                }
                // Never refused, even past the byte budget: the operation happened. (Also
                // after a kept lease lapsed: nobody else took the key, and this is what
                // really happened.)
                let extra = record_bytes(record);
                entry.state = State::Completed(record.clone());
                entry.since = now;
                entry.expires = deadline(now, ttl);
                entry.bytes = entry.bytes.saturating_add(extra);
                self.inner.bytes.fetch_add(extra, Ordering::Relaxed);
                self.inner.publish();
                wake(waiters, scope);
                entry.expires
            }
            _ => return Ok(Completion::Fenced),
        };
        // A TTL shorter than the lease left moves the expiry earlier: keep the bounds valid.
        shard.note_expiry(stored);
        self.inner.note_expiry(stored);
        Ok(Completion::Stored)
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        let now = self.inner.now();
        let mut shard = self.shard(scope);
        let held = matches!(
            shard.entries.get(scope),
            Some(entry) if entry.held_by(token)
                && entry.expires > now
                && matches!(entry.state, State::Pending { .. })
        );
        if held {
            if let Some(entry) = shard.entries.remove(scope) {
                self.inner.give_back(&entry);
                wake(&shard.waiters, scope);
            }
        }
        Ok(held)
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<MemorySubscription, StoreError> {
        let notify = {
            let mut shard = self.shard(scope);
            match shard.waiters.get(scope).and_then(Weak::upgrade) {
                Some(notify) => notify,
                None => {
                    // Also when the scope has no entry yet: the next owner's completion
                    // or release fires it.
                    let notify = Arc::new(Notify::new());
                    shard.waiters.insert(*scope, Arc::downgrade(&notify));
                    notify
                }
            }
        };
        Ok(MemorySubscription::new(self.inner.clone(), *scope, notify))
    }

    async fn inspect(&self, scope: &ScopeHash) -> Result<KeyState, StoreError> {
        let now = self.inner.now();
        let shard = self.shard(scope);
        let Some(entry) = shard.entries.get(scope).filter(|e| e.expires > now) else {
            return Ok(KeyState::Absent);
        };
        let expires_in = span(now, entry.expires);
        let owner = FencingToken::from_bytes(entry.token);
        Ok(match &entry.state {
            State::Pending {
                lease_until: Some(lapsed),
            } if *lapsed <= now => KeyState::Uncertain {
                owner,
                lapsed_for: Some(span(*lapsed, now)),
                expires_in,
            },
            State::Pending { lease_until } => KeyState::InFlight {
                owner: Some(owner),
                lease_remaining: Some(span(now, lease_until.unwrap_or(entry.expires))),
            },
            State::Completed(record) => KeyState::Completed {
                record: record.clone(),
                age: Some(span(entry.since, now)),
                expires_in,
            },
        })
    }

    async fn forget(&self, scope: &ScopeHash) -> Result<bool, StoreError> {
        let now = self.inner.now();
        let mut shard = self.shard(scope);
        let Some(entry) = shard.entries.remove(scope) else {
            return Ok(false);
        };
        self.inner.give_back(&entry);
        wake(&shard.waiters, scope);
        Ok(entry.expires > now)
    }

    async fn resolve(
        &self,
        scope: &ScopeHash,
        record: &Record,
        ttl: Duration,
    ) -> Result<Resolved, StoreError> {
        let now = self.inner.now();
        let mut shard = self.shard(scope);
        let Shard {
            entries, waiters, ..
        } = &mut *shard;
        let expires = match entries.get_mut(scope) {
            Some(entry) if entry.expires > now => {
                if matches!(entry.state, State::Pending { .. }) && !entry.lapsed(now) {
                    return Ok(Resolved::InFlight);
                }
                // Never refused for the byte budget: an operator's decision.
                let before = match &entry.state {
                    State::Completed(old) => record_bytes(old),
                    State::Pending { .. } => 0,
                };
                let after = record_bytes(record);
                entry.state = State::Completed(record.clone());
                // A token nobody holds: the owner of a lapsed lease, alive after all,
                // cannot overwrite the operator's answer.
                entry.token = FencingToken::generate().to_bytes();
                entry.since = now;
                entry.expires = deadline(now, ttl);
                entry.bytes = entry.bytes.saturating_sub(before).saturating_add(after);
                self.inner.bytes.fetch_sub(before, Ordering::Relaxed);
                self.inner.bytes.fetch_add(after, Ordering::Relaxed);
                wake(waiters, scope);
                entry.expires
            }
            _ => return Ok(Resolved::Absent),
        };
        shard.note_expiry(expires);
        self.inner.note_expiry(expires);
        Ok(Resolved::Stored)
    }
}

/// A [`Subscription`] on a [`MemoryStore`] scope: the scope's [`Notify`], shared by all
/// its subscriptions and fired on every completion, release and expiry of the scope,
/// whichever entry (owner) it belongs to.
pub struct MemorySubscription {
    inner: Arc<Inner>,
    scope: ScopeHash,
    notify: Arc<Notify>,
    notified: Pin<Box<OwnedNotified>>,
}

/// The handles on its `Notify` one subscription holds: its own and its pending
/// `notified` future's.
const HANDLES_PER_SUBSCRIPTION: usize = 2;

impl MemorySubscription {
    fn new(inner: Arc<Inner>, scope: ScopeHash, notify: Arc<Notify>) -> Self {
        let mut notified = Box::pin(notify.clone().notified_owned());
        // Registered now, so a notify_waiters() before the first poll is not lost.
        notified.as_mut().enable();
        MemorySubscription {
            inner,
            scope,
            notify,
            notified,
        }
    }
}

impl fmt::Debug for MemorySubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscription")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
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

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        let mut shard = self.inner.shard(&self.scope);
        // Handles are only taken (subscribe) and briefly held (wake) under this lock, so
        // if ours are the only ones, no other subscription shares this Notify: remove
        // it. Shard sweeps also drop any dead one, should one ever be left.
        if Arc::strong_count(&self.notify) > HANDLES_PER_SUBSCRIPTION {
            return;
        }
        let ours = shard
            .waiters
            .get(&self.scope)
            .is_some_and(|notify| std::ptr::eq(notify.as_ptr(), Arc::as_ptr(&self.notify)));
        if ours {
            shard.waiters.remove(&self.scope);
        }
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
            store
                .reserve(&scope(1), &FP, t1, LEASE.into())
                .await
                .unwrap(),
            Reservation::Reserved
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        // The lease expired: a new owner gets it and the stale one is fenced.
        let t2 = FencingToken::generate();
        assert_eq!(
            store
                .reserve(&scope(1), &FP, t2, LEASE.into())
                .await
                .unwrap(),
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
                .reserve(&scope(1), &FP, FencingToken::generate(), LEASE.into())
                .await
                .unwrap(),
            Reservation::Completed(rec)
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            store
                .reserve(&scope(1), &FP, FencingToken::generate(), LEASE.into())
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
                .reserve(&scope(n), &FP, FencingToken::generate(), LEASE.into())
                .await;
            assert_eq!(r.unwrap(), Reservation::Reserved);
        }
        let r = store
            .reserve(&scope(9), &FP, FencingToken::generate(), LEASE.into())
            .await;
        assert!(matches!(r, Err(StoreError::Full { max_entries: 2, .. })));
        // The live entries are still there.
        let r = store
            .reserve(&scope(0), &FP, FencingToken::generate(), LEASE.into())
            .await;
        assert_eq!(r.unwrap(), Reservation::InFlight);
        assert_eq!(store.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_reuses_expired_slots() {
        let store = MemoryStore::builder().max_entries(2).build();
        for n in 0..2 {
            store
                .reserve(&scope(n), &FP, FencingToken::generate(), LEASE.into())
                .await
                .unwrap();
        }
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let r = store
            .reserve(&scope(7), &FP, FencingToken::generate(), LEASE.into())
            .await;
        assert_eq!(r.unwrap(), Reservation::Reserved);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn release_wakes_a_subscriber_registered_before() {
        let store = MemoryStore::default();
        let t = FencingToken::generate();
        store
            .reserve(&scope(3), &FP, t, LEASE.into())
            .await
            .unwrap();
        let mut sub = store.subscribe(&scope(3)).await.unwrap();
        // Released before the subscriber polls: the wake-up must not be lost.
        assert!(store.release(&scope(3), t).await.unwrap());
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .expect("subscriber woken");
    }

    /// A scope on shard `shard` (byte 8), distinct by `n` within it (bytes 0..4).
    fn scope_in(shard: u8, n: u32) -> ScopeHash {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        bytes[8] = shard;
        ScopeHash::from_bytes(bytes)
    }

    fn response(body_len: usize) -> Record {
        Record::Response(crate::record::StoredResponse {
            status: http::StatusCode::CREATED,
            headers: vec![(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            )],
            body: bytes::Bytes::from(vec![b'x'; body_len]),
        })
    }

    /// (passes over all shards, shards swept)
    fn sweeps(store: &MemoryStore) -> (usize, usize) {
        let inner = &store.inner;
        (
            inner.sweep_passes.load(Ordering::Relaxed),
            inner.shard_sweeps.load(Ordering::Relaxed),
        )
    }

    /// A full store of live entries refuses a flood of new keys without sweeping any shard:
    /// nothing can have expired before the earliest expiry it knows of. Once that passes,
    /// one caller sweeps once, and the refusals that follow are cheap again.
    #[tokio::test(start_paused = true)]
    async fn full_store_refuses_without_sweeping_on_every_refusal() {
        let store = MemoryStore::builder().max_entries(4).build();
        for (n, lease) in [(1, 10), (2, 100), (3, 100), (4, 100)] {
            let lease = Duration::from_secs(lease);
            let scope = scope_in(n, n.into());
            let r = store.reserve(&scope, &FP, FencingToken::generate(), lease.into());
            assert_eq!(r.await.unwrap(), Reservation::Reserved);
        }
        let flood = |from: u32| {
            let store = store.clone();
            async move {
                for n in from..from + 1000 {
                    let scope = scope_in(n as u8, n);
                    let r = store
                        .reserve(&scope, &FP, FencingToken::generate(), LEASE.into())
                        .await;
                    assert!(
                        matches!(r, Err(StoreError::Full { max_entries: 4, .. })),
                        "{r:?}"
                    );
                }
            }
        };
        flood(100).await;
        assert_eq!(sweeps(&store), (0, 0), "1000 refusals swept nothing");

        // The 10 s lease has passed: the next new key sweeps once and takes its slot.
        tokio::time::advance(Duration::from_secs(11)).await;
        let r = store
            .reserve(&scope_in(9, 9), &FP, FencingToken::generate(), LEASE.into())
            .await;
        assert_eq!(r.unwrap(), Reservation::Reserved);
        // One pass over the shards, one of which held the expired entry.
        assert_eq!(sweeps(&store), (1, 1));

        flood(2000).await;
        assert_eq!(
            sweeps(&store),
            (1, 1),
            "refusals are cheap again after the sweep"
        );
        assert_eq!(store.len(), 4);
    }

    /// Owner 1 releases; waiter A becomes the new owner and completes. Waiter B, still
    /// subscribed since before the release, must be woken by A's completion (not left to
    /// find out by polling).
    #[tokio::test(start_paused = true)]
    async fn a_new_owners_completion_wakes_waiters_subscribed_before_a_release() {
        let store = MemoryStore::default();
        let s = scope(5);
        let owner1 = FencingToken::generate();
        assert_eq!(
            store.reserve(&s, &FP, owner1, LEASE.into()).await.unwrap(),
            Reservation::Reserved
        );
        let mut a = store.subscribe(&s).await.unwrap();
        let mut b = store.subscribe(&s).await.unwrap();
        assert!(store.release(&s, owner1).await.unwrap());
        let second = Duration::from_secs(1);
        tokio::time::timeout(second, a.changed())
            .await
            .expect("A woken by the release");
        tokio::time::timeout(second, b.changed())
            .await
            .expect("B woken by the release");

        let owner2 = FencingToken::generate(); // A
        assert_eq!(
            store.reserve(&s, &FP, owner2, LEASE.into()).await.unwrap(),
            Reservation::Reserved
        );
        let again = store
            .reserve(&s, &FP, FencingToken::generate(), LEASE.into())
            .await; // B
        assert_eq!(again.unwrap(), Reservation::InFlight);
        let rec = Record::NotReplayable;
        let done = store
            .complete(&s, owner2, &rec, Duration::from_secs(60))
            .await;
        assert_eq!(done.unwrap(), Completion::Stored);
        tokio::time::timeout(second, b.changed())
            .await
            .expect("B woken by the new owner's completion");
    }

    /// The byte budget refuses a new reservation; the live entries (a completed large
    /// record, a pending reservation) answer as before, and a completion is never refused.
    #[tokio::test]
    async fn byte_budget_refuses_new_reservations_and_keeps_live_entries() {
        let budget = 1 << 20;
        let store = MemoryStore::builder().max_bytes(budget).build();
        let big = response(600_000);
        let ttl = Duration::from_secs(60);
        let reserve = |s: ScopeHash, t: FencingToken| {
            let store = store.clone();
            async move { store.reserve(&s, &FP, t, LEASE.into()).await }
        };
        let (t1, t2, t3) = (
            FencingToken::generate(),
            FencingToken::generate(),
            FencingToken::generate(),
        );
        assert_eq!(
            reserve(scope_in(3, 1), t1).await.unwrap(),
            Reservation::Reserved
        );
        assert_eq!(
            store
                .complete(&scope_in(3, 1), t1, &big, ttl)
                .await
                .unwrap(),
            Completion::Stored
        );
        assert_eq!(
            reserve(scope_in(3, 2), t2).await.unwrap(),
            Reservation::Reserved
        );
        // The reservation fits; its completion goes over the budget and is not refused.
        assert_eq!(
            reserve(scope_in(4, 3), t3).await.unwrap(),
            Reservation::Reserved
        );
        assert_eq!(
            store
                .complete(&scope_in(4, 3), t3, &big, ttl)
                .await
                .unwrap(),
            Completion::Stored
        );

        let r = reserve(scope_in(3, 4), FencingToken::generate()).await;
        assert!(matches!(r, Err(StoreError::Full { .. })), "{r:?}");
        let r = reserve(scope_in(5, 5), FencingToken::generate()).await;
        assert!(matches!(r, Err(StoreError::Full { .. })), "{r:?}");
        assert!(store.bytes() > budget, "{} bytes", store.bytes());
        // Live entries answer as before.
        let again = |s| reserve(s, FencingToken::generate());
        assert_eq!(
            again(scope_in(3, 1)).await.unwrap(),
            Reservation::Completed(big.clone())
        );
        assert_eq!(again(scope_in(3, 2)).await.unwrap(), Reservation::InFlight);
        assert_eq!(
            again(scope_in(4, 3)).await.unwrap(),
            Reservation::Completed(big.clone())
        );
        assert_eq!(store.len(), 3);
        // The pending owner still completes, over the budget.
        assert_eq!(
            store
                .complete(&scope_in(3, 2), t2, &big, ttl)
                .await
                .unwrap(),
            Completion::Stored
        );
        assert_eq!(
            again(scope_in(3, 2)).await.unwrap(),
            Reservation::Completed(big)
        );
    }

    /// Every key maps to one shard: when the store is full, a new key of that shard is
    /// refused, and no entry of the shard (pending or completed) was evicted for it.
    #[tokio::test]
    async fn full_store_never_evicts_an_entry_of_the_same_shard() {
        const MAX: u32 = 100;
        let store = MemoryStore::builder().max_entries(MAX as usize).build();
        let ttl = Duration::from_secs(60);
        let record = |n: u32| response(n as usize);
        for n in 0..MAX {
            let token = FencingToken::generate();
            let r = store
                .reserve(&scope_in(7, n), &FP, token, LEASE.into())
                .await;
            assert_eq!(r.unwrap(), Reservation::Reserved);
            if n % 2 == 0 {
                let done = store
                    .complete(&scope_in(7, n), token, &record(n), ttl)
                    .await;
                assert_eq!(done.unwrap(), Completion::Stored);
            }
        }
        for n in MAX..MAX + 10 {
            let r = store
                .reserve(&scope_in(7, n), &FP, FencingToken::generate(), LEASE.into())
                .await;
            assert!(matches!(r, Err(StoreError::Full { .. })), "{r:?}");
        }
        assert_eq!(store.len(), MAX as usize);
        for n in 0..MAX {
            let r = store
                .reserve(&scope_in(7, n), &FP, FencingToken::generate(), LEASE.into())
                .await;
            let expected = if n % 2 == 0 {
                Reservation::Completed(record(n))
            } else {
                Reservation::InFlight
            };
            assert_eq!(r.unwrap(), expected, "entry {n}");
        }
    }

    /// Bytes are counted on reserve and complete and given back on release and sweep,
    /// exactly, and a repeated completion does not count twice.
    #[tokio::test(start_paused = true)]
    async fn bytes_are_counted_and_given_back() {
        let store = MemoryStore::default();
        let rec = response(1000);
        let header = size_of::<(HeaderName, HeaderValue)>() + "content-type".len() + 16;
        assert_eq!(record_bytes(&rec), 1000 + header);
        assert_eq!(record_bytes(&Record::NotReplayable), 0);
        let ttl = Duration::from_secs(60);

        let t1 = FencingToken::generate();
        store
            .reserve(&scope(1), &FP, t1, LEASE.into())
            .await
            .unwrap();
        assert_eq!(store.bytes(), ENTRY_OVERHEAD_BYTES);
        for _ in 0..2 {
            let done = store.complete(&scope(1), t1, &rec, ttl).await.unwrap();
            assert_eq!(done, Completion::Stored);
            assert_eq!(store.bytes(), ENTRY_OVERHEAD_BYTES + record_bytes(&rec));
        }
        let t2 = FencingToken::generate();
        store
            .reserve(&scope(2), &FP, t2, LEASE.into())
            .await
            .unwrap();
        assert_eq!(store.bytes(), 2 * ENTRY_OVERHEAD_BYTES + record_bytes(&rec));
        assert!(store.release(&scope(2), t2).await.unwrap());
        assert_eq!(store.bytes(), ENTRY_OVERHEAD_BYTES + record_bytes(&rec));
        // A fenced completion stores nothing and counts nothing.
        let stale = store.complete(&scope(2), t2, &rec, ttl).await.unwrap();
        assert_eq!(stale, Completion::Fenced);
        assert_eq!(store.bytes(), ENTRY_OVERHEAD_BYTES + record_bytes(&rec));

        tokio::time::advance(ttl + Duration::from_millis(1)).await;
        store.sweep();
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[test]
    fn entry_overhead_covers_a_table_slot() {
        let slot = size_of::<(ScopeHash, Entry)>() + 1;
        assert!(
            ENTRY_OVERHEAD_BYTES * 7 >= slot * 16,
            "{ENTRY_OVERHEAD_BYTES} for {slot}"
        );
        println!("slot {slot} bytes, overhead {ENTRY_OVERHEAD_BYTES} bytes");
    }

    #[tokio::test]
    async fn full_is_reported_with_both_bounds() {
        let store = MemoryStore::builder()
            .max_entries(1)
            .max_bytes(ENTRY_OVERHEAD_BYTES * 10)
            .build();
        store
            .reserve(&scope(1), &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap();
        let err = store
            .reserve(&scope(2), &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "store is full (1 of 1 entries, {} of {} bytes)",
                ENTRY_OVERHEAD_BYTES,
                ENTRY_OVERHEAD_BYTES * 10
            )
        );
        // A budget smaller than one entry refuses everything.
        let tiny = MemoryStore::builder()
            .max_bytes(ENTRY_OVERHEAD_BYTES - 1)
            .build();
        let r = tiny
            .reserve(&scope(1), &FP, FencingToken::generate(), LEASE.into())
            .await;
        assert!(
            matches!(
                r,
                Err(StoreError::Full {
                    entries: 0,
                    bytes: 0,
                    ..
                })
            ),
            "{r:?}"
        );
        assert_eq!(tiny.len(), 0);
    }

    /// A completion with a TTL shorter than the lease it replaces moves the expiry
    /// earlier; the full store must still sweep it once that TTL has passed.
    #[tokio::test(start_paused = true)]
    async fn an_earlier_expiry_from_complete_or_renew_is_swept_in_time() {
        let store = MemoryStore::builder().max_entries(2).build();
        let (t1, t2) = (FencingToken::generate(), FencingToken::generate());
        store
            .reserve(&scope_in(1, 1), &FP, t1, LEASE.into())
            .await
            .unwrap();
        store
            .reserve(&scope_in(2, 2), &FP, t2, LEASE.into())
            .await
            .unwrap();
        let short = Duration::from_secs(5);
        let rec = Record::NotReplayable;
        store
            .complete(&scope_in(1, 1), t1, &rec, short)
            .await
            .unwrap();
        assert!(store.renew(&scope_in(2, 2), t2, short).await.unwrap());
        let fresh = |n: u32| {
            let store = store.clone();
            async move {
                let scope = scope_in(3, n);
                store
                    .reserve(&scope, &FP, FencingToken::generate(), LEASE.into())
                    .await
            }
        };
        assert!(matches!(fresh(1).await, Err(StoreError::Full { .. })));
        tokio::time::advance(short + Duration::from_millis(1)).await;
        assert_eq!(fresh(2).await.unwrap(), Reservation::Reserved);
        assert_eq!(fresh(3).await.unwrap(), Reservation::Reserved);
    }

    /// Waiters on a scope with no entry yet are woken by the owner that comes next, and
    /// an expiry swept by the store wakes the expired owner's waiters.
    #[tokio::test(start_paused = true)]
    async fn waiters_are_woken_by_any_owner_and_by_expiry() {
        let store = MemoryStore::default();
        let second = Duration::from_secs(1);
        let mut early = store.subscribe(&scope(6)).await.unwrap();
        let t = FencingToken::generate();
        store
            .reserve(&scope(6), &FP, t, LEASE.into())
            .await
            .unwrap();
        let rec = Record::NotReplayable;
        store.complete(&scope(6), t, &rec, LEASE).await.unwrap();
        tokio::time::timeout(second, early.changed())
            .await
            .expect("woken by the first owner's completion");

        store
            .reserve(&scope(7), &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap();
        let mut sub = store.subscribe(&scope(7)).await.unwrap();
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        store.sweep();
        tokio::time::timeout(second, sub.changed())
            .await
            .expect("woken by the expiry");
    }

    /// The scope's Notify lives as long as a subscription holds it, and no longer.
    #[tokio::test]
    async fn the_last_subscription_removes_the_scopes_notify() {
        let store = MemoryStore::default();
        let waiters = |store: &MemoryStore| store.shard(&scope(8)).waiters.len();
        let a = store.subscribe(&scope(8)).await.unwrap();
        let b = store.subscribe(&scope(8)).await.unwrap();
        assert!(Arc::ptr_eq(&a.notify, &b.notify), "one Notify per scope");
        assert_eq!(waiters(&store), 1);
        drop(a);
        assert_eq!(waiters(&store), 1, "b still holds it");
        drop(b);
        assert_eq!(waiters(&store), 0);
        // A new subscription after that gets a fresh one and is woken as before.
        let t = FencingToken::generate();
        store
            .reserve(&scope(8), &FP, t, LEASE.into())
            .await
            .unwrap();
        let mut c = store.subscribe(&scope(8)).await.unwrap();
        assert!(store.release(&scope(8), t).await.unwrap());
        tokio::time::timeout(Duration::from_secs(1), c.changed())
            .await
            .expect("woken");
    }

    /// Many tasks on two threads reserve, complete, release and let leases expire on a
    /// small store: the bounds always hold, and once everything is swept the counters
    /// are back to zero (every byte counted was given back once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counters_stay_exact_under_concurrency() {
        let store = MemoryStore::builder()
            .max_entries(50)
            .max_bytes(50 * ENTRY_OVERHEAD_BYTES + 20_000)
            .build();
        let tasks: Vec<_> = (0..8u32)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut full = 0;
                    for i in 0..2000u32 {
                        let n = task * 10_000 + i;
                        let scope = scope_in((n % 7) as u8, n % 300);
                        let token = FencingToken::generate();
                        let lease = Duration::from_millis(u64::from(n % 3));
                        match store.reserve(&scope, &FP, token, lease.into()).await {
                            Ok(Reservation::Reserved) => match n % 3 {
                                0 => {
                                    let rec = response((n % 500) as usize);
                                    let ttl = Duration::from_millis(1);
                                    store.complete(&scope, token, &rec, ttl).await.unwrap();
                                }
                                1 => {
                                    store.release(&scope, token).await.unwrap();
                                }
                                _ => {} // left to expire
                            },
                            Ok(_) => {}
                            Err(StoreError::Full { .. }) => full += 1,
                            Err(other) => panic!("{other}"),
                        }
                        assert!(store.len() <= 50);
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    full
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.sweep();
        assert_eq!((store.len(), store.bytes()), (0, 0));
        assert_eq!(store.inner.earliest.load(Ordering::Relaxed), u64::MAX);
    }

    /// Every key costs its table slot whatever its record: an `Instant` (16 bytes) or a
    /// `u128` field (which aligns the slot to 16) would grow it back to 192 bytes, and the
    /// default budget would hold 12 % fewer keys.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn an_entry_slot_stays_168_bytes() {
        let (slot, overhead) = (size_of::<(ScopeHash, Entry)>(), ENTRY_OVERHEAD_BYTES);
        assert!(slot <= 168, "{slot}");
        assert!(overhead <= 387, "{overhead}");
    }

    /// A TTL or lease as long as `Duration` allows: no panic, the entry lives (it is not
    /// swept), and `inspect` reports a remaining time, not an overflow.
    #[tokio::test]
    async fn the_longest_durations_saturate() {
        let store = MemoryStore::default();
        let token = FencingToken::generate();
        let lease = LeaseTerms::from(Duration::MAX);
        assert_eq!(
            store.reserve(&scope(9), &FP, token, lease).await.unwrap(),
            Reservation::Reserved
        );
        assert!(store.renew(&scope(9), token, Duration::MAX).await.unwrap());
        let rec = Record::NotReplayable;
        assert_eq!(
            store
                .complete(&scope(9), token, &rec, Duration::MAX)
                .await
                .unwrap(),
            Completion::Stored
        );
        store.sweep();
        match store.inspect(&scope(9)).await.unwrap() {
            KeyState::Completed { expires_in, .. } => {
                assert!(expires_in > Duration::from_secs(100 * 365 * 24 * 3600));
            }
            other => panic!("{other:?}"),
        }
        let replay = store
            .reserve(&scope(9), &FP, FencingToken::generate(), lease)
            .await
            .unwrap();
        assert_eq!(replay, Reservation::Completed(rec));
    }

    #[tokio::test]
    async fn mismatch_while_in_flight() {
        let store = MemoryStore::default();
        store
            .reserve(&scope(4), &FP, FencingToken::generate(), LEASE.into())
            .await
            .unwrap();
        let other = Fingerprint::from_bytes([2; 32]);
        let r = store
            .reserve(&scope(4), &other, FencingToken::generate(), LEASE.into())
            .await;
        assert_eq!(r.unwrap(), Reservation::Mismatch);
    }
}
