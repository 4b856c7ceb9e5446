//! Which server sessions hold transactional mode's prepared reserve: [`Prepared`].
//!
//! The batch that begins a new key's transaction `EXECUTE`s a reserve the session
//! prepared (SQL `PREPARE`), so the server plans it once per connection instead of once
//! per request. (The complete is a statement with bound parameters, which sqlx prepares
//! and caches per connection by itself.) Which connection a reserve gets from the pool is
//! sqlx's business, so the store tells sessions apart by their server process id (the
//! pre-read returns it) and prepares in the same batch the first time it meets one (a
//! `DO` block that prepares the reserve unless the session holds it): no extra round trip
//! and no error in the server's log. What this set says is a belief, never trusted for
//! correctness: a reused process id, or a session whose reserve was deallocated, makes
//! the `EXECUTE` fail before anything happened and the store prepares again. A server
//! that refuses the `DO` block turns this off for the store: it reserves with plain
//! statements, one round trip more.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// More process ids than any server runs at once (`max_connections` is in the hundreds):
/// past it, the set starts over (each session's next batch then carries the `DO` block
/// once more, which finds both statements and prepares nothing).
const MAX_SESSIONS: usize = 65_536;

/// The server process ids whose sessions hold the reserve (shared by a store's clones).
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    pids: Mutex<HashSet<i32>>,
    /// The server refused the `DO` block once (no plpgsql for this role): the store
    /// reserves with plain statements from then on.
    refused: AtomicBool,
}

impl Prepared {
    /// A poisoned lock only means a panic happened while it was held; each operation is
    /// one set call.
    fn lock(&self) -> MutexGuard<'_, HashSet<i32>> {
        self.pids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the store uses the prepared statements at all.
    pub(crate) fn enabled(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// The server refused to prepare them.
    pub(crate) fn disable(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }

    /// Whether the session of `pid` is believed to hold the statements.
    pub(crate) fn has(&self, pid: i32) -> bool {
        self.lock().contains(&pid)
    }

    /// The session of `pid` holds the statements.
    pub(crate) fn insert(&self, pid: i32) {
        let mut pids = self.lock();
        if pids.len() >= MAX_SESSIONS {
            pids.clear();
        }
        pids.insert(pid);
    }

    /// The session of `pid` turned out not to hold it.
    pub(crate) fn remove(&self, pid: i32) {
        self.lock().remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_forgets_and_stays_bounded() {
        let prepared = Prepared::default();
        assert!(!prepared.has(7));
        prepared.insert(7);
        assert!(prepared.has(7));
        prepared.remove(7);
        assert!(!prepared.has(7));
        for pid in 0..=i32::try_from(MAX_SESSIONS).unwrap() {
            prepared.insert(pid);
        }
        assert!(prepared.lock().len() <= MAX_SESSIONS);
    }
}
