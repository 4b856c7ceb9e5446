//! The local replay tier: completed records this process has seen, replayed with no
//! round trip (SPEC section 7). One tier for every store that has one (Redis, Postgres):
//! a completed record never changes until it expires, whatever the store.
//!
//! A process may keep the completed records it read and answer a retry from memory: a
//! replay costs 0 commands, and so does a 422 for a retry with another payload. Bounded by
//! bytes (a [`quick_cache`] weighed by each record's size); an entry lives no longer than
//! the record's remaining TTL in its store (the store reads it with the record, and the
//! local entry is dated from *before* the command was sent, so it always lapses first) and
//! no longer than [`max_age`](LocalReplays::max_age). Pending records are never kept: only
//! a completed record is final.
//!
//! A tier belongs to one namespace. It is keyed by scope hash alone, so a store shares it
//! only with clones that keep its namespace; a clone under another Redis prefix or
//! Postgres table gets a tier of its own and never replays, or refuses with 422, the
//! other's keys.
//!
//! Its memory is what it counts. A record decoded from a reply is a slice of the
//! connection's read buffer, and a reply that arrived right behind a large one is a slice
//! of that large buffer; a kept entry therefore owns a copy of its body and header values
//! (made only when an entry is kept, not for replays read from Redis), and weighs them,
//! its headers' bookkeeping and its slot in the cache.
//!
//! Its one inconsistency: a record deleted in the store by hand (`DEL`, a flush, a
//! `DELETE`), or forgotten through another process, may still be replayed by a process
//! that kept it, until its local entry lapses — at most [`max_age`](LocalReplays::max_age).
//! A store's own `forget` drops the entry of its process.

use std::fmt;
use std::time::Duration;

use crate::{Fingerprint, Record, Reservation, ScopeHash, StoredResponse};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tokio::time::Instant;

/// The default byte bound of the local replay tier: 64 MiB.
pub const DEFAULT_LOCAL_REPLAY_BYTES: u64 = 64 * 1024 * 1024;
/// The default longest life of a local entry: 60 seconds.
pub const DEFAULT_LOCAL_REPLAY_AGE: Duration = Duration::from_secs(60);

/// What `bytes` allocates when a buffer made from a `Vec` is first shared (every answer
/// clones the kept record): its pointer, capacity and reference count.
const SHARED_HEADER: usize = 3 * size_of::<usize>();

/// What each kept record costs beyond its body and header bytes: its slot in the cache's
/// slab (key, [`Kept`], and 24 bytes of the cache's links and state) twice over, since
/// the slab doubles as it grows; its index in the cache's table (a 4-byte token and a
/// control byte per bucket, at most 16/7 buckets per entry); and the body's
/// [`SHARED_HEADER`]. Measured against the heap by `tests/memory_bounds.rs`.
const ENTRY_OVERHEAD: u64 = (2 * (size_of::<(ScopeHash, Kept)>() + 24) + 12 + SHARED_HEADER) as u64;

/// What each kept header costs beyond its name and value bytes: its place in the
/// record's `Vec` and the [`SHARED_HEADER`]s of its name and value.
const HEADER_OVERHEAD: usize = size_of::<(HeaderName, HeaderValue)>() + 2 * SHARED_HEADER;

/// Settings of a store's local replay tier (`RedisStore::local_replays`,
/// `PostgresStore::local_replays`): on by default with [`DEFAULT_LOCAL_REPLAY_BYTES`] and
/// [`DEFAULT_LOCAL_REPLAY_AGE`].
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency_core::local::LocalReplays;
///
/// let tier = LocalReplays::default()
///     .max_bytes(16 * 1024 * 1024)
///     .max_age(Duration::from_secs(30));
/// assert_eq!(tier.bytes(), 16 * 1024 * 1024);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct LocalReplays {
    max_bytes: u64,
    max_age: Duration,
}

impl Default for LocalReplays {
    fn default() -> Self {
        LocalReplays {
            max_bytes: DEFAULT_LOCAL_REPLAY_BYTES,
            max_age: DEFAULT_LOCAL_REPLAY_AGE,
        }
    }
}

impl LocalReplays {
    /// The most bytes the kept records (bodies, headers and a fixed overhead each) take;
    /// past it the least recently used give way. Default [`DEFAULT_LOCAL_REPLAY_BYTES`].
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The longest a record is replayed from memory, however long it lives in its store;
    /// it bounds how long a record deleted there by hand may still be replayed. Default
    /// [`DEFAULT_LOCAL_REPLAY_AGE`].
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The byte bound.
    pub fn bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The longest life of an entry.
    pub fn age(&self) -> Duration {
        self.max_age
    }
}

/// One kept record.
#[derive(Clone)]
struct Kept {
    fingerprint: Fingerprint,
    record: Record,
    /// No later than the record's expiry in its store.
    expires: Instant,
    weight: u64,
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<ScopeHash, Kept> for Weight {
    fn weight(&self, _: &ScopeHash, kept: &Kept) -> u64 {
        kept.weight
    }
}

/// The tier itself, shared by a store's clones: for store implementations, which ask it
/// before a reserve ([`answer`](LocalTier::answer)), fill it with completed records they
/// read ([`keep`](LocalTier::keep)), and drop an entry when an operator forgets or
/// resolves its key ([`forget`](LocalTier::forget)).
pub struct LocalTier {
    cache: quick_cache::sync::Cache<ScopeHash, Kept, Weight>,
    settings: LocalReplays,
}

impl fmt::Debug for LocalTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalTier")
            .field("settings", &self.settings)
            .field("records", &self.cache.len())
            .field("bytes", &self.cache.weight())
            .finish()
    }
}

impl LocalTier {
    /// An empty tier with `settings`.
    pub fn new(settings: LocalReplays) -> Self {
        // quick_cache sizes its table from an estimate of the item count.
        let estimated = usize::try_from(settings.max_bytes / 2048)
            .unwrap_or(usize::MAX)
            .clamp(16, 1 << 20);
        LocalTier {
            cache: quick_cache::sync::Cache::with_weighter(estimated, settings.max_bytes, Weight),
            settings,
        }
    }

    /// The answer for `scope` from memory: the record (same fingerprint) or a mismatch
    /// (another fingerprint), or `None` to ask the store.
    pub fn answer(&self, scope: &ScopeHash, fingerprint: &Fingerprint) -> Option<Reservation> {
        let kept = self.cache.get(scope)?;
        if kept.expires <= Instant::now() {
            self.cache.remove(scope);
            return None;
        }
        Some(if kept.fingerprint == *fingerprint {
            Reservation::Completed(kept.record)
        } else {
            Reservation::Mismatch
        })
    }

    /// Keeps `record`, completed with `fingerprint`, which its store said (in a reply to
    /// a command sent at `sent`) lives `remaining` longer.
    pub fn keep(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        record: &Record,
        sent: Instant,
        remaining: Duration,
    ) {
        let life = remaining.min(self.settings.max_age);
        let Some(expires) = sent.checked_add(life) else {
            return;
        };
        if expires <= Instant::now() {
            return;
        }
        let Some(record) = owned(record) else {
            return;
        };
        let kept = Kept {
            fingerprint: *fingerprint,
            weight: weight(&record),
            record,
            expires,
        };
        self.cache.insert(*scope, kept);
    }

    /// Drops what the tier keeps for `scope` (an operator forgot or resolved it here).
    pub fn forget(&self, scope: &ScopeHash) {
        self.cache.remove(scope);
    }

    /// The settings the tier was made with.
    pub fn settings(&self) -> LocalReplays {
        self.settings
    }

    /// The bytes the kept records take, as counted against the bound.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether no record is kept.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// A copy of `record` that owns its bytes. A record decoded from a reply shares the
/// connection's read buffer (its body and header values are slices of it), and a reply
/// that arrived behind a large one is a slice of that large buffer: kept as it is, a
/// small entry would pin all of it, unseen by the byte bound. `None` only if a header
/// value fails to copy, which a value that was valid cannot.
fn owned(record: &Record) -> Option<Record> {
    let Record::Response(response) = record else {
        return Some(record.clone());
    };
    let mut headers = Vec::with_capacity(response.headers.len());
    for (name, value) in &response.headers {
        // `from_bytes` copies; `HeaderName`s are copied when decoded already.
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).ok()?;
        copy.set_sensitive(value.is_sensitive());
        headers.push((name.clone(), copy));
    }
    Some(Record::Response(StoredResponse::new(
        response.status,
        headers,
        Bytes::copy_from_slice(&response.body),
    )))
}

/// What a record costs the tier.
fn weight(record: &Record) -> u64 {
    let payload = match record {
        Record::Response(response) => {
            let headers: usize = response
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + HEADER_OVERHEAD)
                .sum();
            response.body.len() + headers
        }
        _ => 0,
    };
    ENTRY_OVERHEAD + payload as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn record(body: usize) -> Record {
        Record::Response(StoredResponse::new(
            StatusCode::CREATED,
            vec![],
            Bytes::from(vec![b'x'; body]),
        ))
    }

    const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);

    fn scope(n: u32) -> ScopeHash {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        ScopeHash::from_bytes(bytes)
    }

    #[tokio::test(start_paused = true)]
    async fn answers_until_the_earlier_of_the_ttl_and_the_age() {
        let tier = LocalTier::new(LocalReplays::default().max_age(Duration::from_secs(5)));
        let sent = Instant::now();
        tier.keep(&scope(1), &FP, &record(3), sent, Duration::from_secs(2));
        tier.keep(&scope(2), &FP, &record(3), sent, Duration::from_secs(60));
        assert_eq!(
            tier.answer(&scope(1), &FP),
            Some(Reservation::Completed(record(3)))
        );
        let other = Fingerprint::from_bytes([2; 32]);
        assert_eq!(tier.answer(&scope(1), &other), Some(Reservation::Mismatch));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(tier.answer(&scope(1), &FP), None, "the store's TTL passed");
        assert!(tier.answer(&scope(2), &FP).is_some());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(tier.answer(&scope(2), &FP), None, "max_age passed");
        assert_eq!(tier.len(), 0, "lapsed entries are dropped when met");
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_copies_that_share_nothing_with_the_reply() {
        let record = Record::Response(StoredResponse::new(
            StatusCode::CREATED,
            vec![(
                HeaderName::from_static("x-request-id"),
                HeaderValue::from_static("req-1"),
            )],
            Bytes::from_static(b"paid"),
        ));
        // A reply buffer with the record in the middle of much else, as a read buffer is.
        let mut buffer = vec![0u8; 64 * 1024];
        let encoded = record.encode();
        buffer[1024..1024 + encoded.len()].copy_from_slice(&encoded);
        let buffer = Bytes::from(buffer);
        let decoded = Record::decode(&buffer.slice(1024..1024 + encoded.len())).unwrap();
        let tier = LocalTier::new(LocalReplays::default());
        tier.keep(
            &scope(1),
            &FP,
            &decoded,
            Instant::now(),
            Duration::from_secs(60),
        );
        drop(decoded);
        let Some(Reservation::Completed(Record::Response(kept))) = tier.answer(&scope(1), &FP)
        else {
            panic!("kept");
        };
        let within = |bytes: &[u8]| buffer.as_ptr_range().contains(&bytes.as_ptr());
        assert!(!within(&kept.body), "the body is a copy");
        assert!(
            !within(kept.headers[0].1.as_bytes()),
            "header values are copies"
        );
        assert_eq!(Record::Response(kept), record);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_within_its_byte_bound() {
        let bound = 256 * 1024;
        let tier = LocalTier::new(LocalReplays::default().max_bytes(bound));
        for n in 0..1000 {
            tier.keep(
                &scope(n),
                &FP,
                &record(4096),
                Instant::now(),
                Duration::from_secs(60),
            );
            assert!(tier.bytes() <= bound, "{} > {bound}", tier.bytes());
        }
        assert!(tier.len() < 1000, "older records gave way");
        assert!(tier.bytes() > bound / 2, "and the bound is used");
    }
}
