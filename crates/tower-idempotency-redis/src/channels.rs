//! The subscriber's table of pub/sub channels: for each channel the local waiters hold, a
//! wake-up counter, a reference count, and whether the server has our `SSUBSCRIBE`.
//!
//! Pure bookkeeping, no I/O: the [`subscriber`](crate::subscriber) decides when to send
//! `SSUBSCRIBE`/`SUNSUBSCRIBE` from what the table answers, and the rules below are unit
//! tested without Redis.
//!
//! - [`acquire`](ChannelTable::acquire) adds a waiter (creating the channel's entry);
//!   [`release`](ChannelTable::release) takes it away and says whether that was the last
//!   one, so the caller can schedule an `SUNSUBSCRIBE`.
//! - A channel's `subscribed` flag sits behind an async lock that orders its
//!   `SSUBSCRIBE` and `SUNSUBSCRIBE`. An entry is idle when no waiter holds it *and* it is
//!   still the same entry the unsubscriber looked at ([`is_idle`](ChannelTable::is_idle)):
//!   a waiter that came meanwhile keeps the channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Whether the server has our `SSUBSCRIBE` for a channel; its lock orders the channel's
/// (un)subscriptions.
pub(crate) type Subscribed = Arc<tokio::sync::Mutex<bool>>;

/// The local state of one channel.
struct Channel {
    /// Bumped on every message (and on reconnects); waiters hold receivers.
    wake: watch::Sender<u64>,
    /// Live subscriptions of this channel.
    refs: usize,
    subscribed: Subscribed,
}

impl Channel {
    fn new() -> Self {
        Channel {
            wake: watch::channel(0).0,
            refs: 0,
            subscribed: Arc::default(),
        }
    }

    fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Every channel a store's local waiters hold.
#[derive(Default)]
pub(crate) struct ChannelTable {
    channels: Mutex<HashMap<String, Channel>>,
}

impl std::fmt::Debug for ChannelTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelTable")
            .field("channels", &self.lock().len())
            .finish()
    }
}

impl ChannelTable {
    /// A poisoned lock only means a panic happened while it was held; every mutation below
    /// leaves the map consistent at each step.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a waiter of `name`: its wake-up receiver, and the channel's subscribed flag.
    pub(crate) fn acquire(&self, name: &str) -> (watch::Receiver<u64>, Subscribed) {
        let mut channels = self.lock();
        let channel = match channels.get_mut(name) {
            Some(channel) => channel,
            None => channels.entry(name.to_owned()).or_insert_with(Channel::new),
        };
        channel.refs += 1;
        (channel.wake.subscribe(), channel.subscribed.clone())
    }

    /// Takes a waiter of `name` away; `true` when it was the last one (the caller then
    /// schedules an `SUNSUBSCRIBE`).
    pub(crate) fn release(&self, name: &str) -> bool {
        match self.lock().get_mut(name) {
            Some(channel) => {
                channel.refs = channel.refs.saturating_sub(1);
                channel.refs == 0
            }
            None => false,
        }
    }

    /// The subscribed flag of `name` if no waiter holds it now.
    pub(crate) fn idle_state(&self, name: &str) -> Option<Subscribed> {
        match self.lock().get(name) {
            Some(channel) if channel.refs == 0 => Some(channel.subscribed.clone()),
            _ => None,
        }
    }

    /// Whether `name` is still the idle entry whose flag is `state`: no waiter came since
    /// the unsubscriber looked (a new waiter keeps the channel).
    pub(crate) fn is_idle(&self, name: &str, state: &Subscribed) -> bool {
        matches!(self.lock().get(name), Some(c) if c.refs == 0 && Arc::ptr_eq(&c.subscribed, state))
    }

    /// Forgets `name` if it is still the idle entry whose flag is `state`.
    pub(crate) fn remove_if_idle(&self, name: &str, state: &Subscribed) {
        let mut channels = self.lock();
        if matches!(channels.get(name), Some(c) if c.refs == 0 && Arc::ptr_eq(&c.subscribed, state))
        {
            channels.remove(name);
        }
    }

    /// Wakes the waiters of `name`.
    pub(crate) fn wake(&self, name: &str) {
        if let Some(channel) = self.lock().get(name) {
            channel.wake();
        }
    }

    /// Wakes every waiter (after a reconnect, or when messages were dropped): they re-read
    /// their scope, so a lost message is never a lost wake-up.
    pub(crate) fn wake_all(&self) {
        for channel in self.lock().values() {
            channel.wake();
        }
    }

    /// Every channel with its subscribed flag, to resubscribe after a reconnect.
    pub(crate) fn states(&self) -> Vec<(String, Subscribed)> {
        self.lock()
            .iter()
            .map(|(name, channel)| (name.clone(), channel.subscribed.clone()))
            .collect()
    }

    /// How many channels the table holds.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_release_makes_a_channel_idle() {
        let table = ChannelTable::default();
        let (_a, state) = table.acquire("c");
        let (_b, same) = table.acquire("c");
        assert!(Arc::ptr_eq(&state, &same), "one flag per channel");
        assert!(!table.release("c"), "a waiter is left");
        assert!(table.idle_state("c").is_none());
        assert!(table.release("c"), "the last waiter left");
        assert!(table.is_idle("c", &state));
        assert!(!table.release("unknown"));
    }

    #[test]
    fn a_waiter_that_comes_back_keeps_the_channel() {
        let table = ChannelTable::default();
        let (_a, state) = table.acquire("c");
        table.release("c");
        let idle = table.idle_state("c").expect("idle");
        // A new waiter arrives before the unsubscriber removes the entry.
        let (_b, again) = table.acquire("c");
        assert!(Arc::ptr_eq(&idle, &again));
        assert!(!table.is_idle("c", &idle));
        table.remove_if_idle("c", &idle);
        assert_eq!(table.len(), 1, "kept for the new waiter");
        table.release("c");
        table.remove_if_idle("c", &state);
        assert_eq!(table.len(), 0);
        // A fresh entry under the same name is not the old idle one.
        let (_c, fresh) = table.acquire("c");
        table.release("c");
        assert!(!table.is_idle("c", &state));
        assert!(table.is_idle("c", &fresh));
    }

    #[test]
    fn wake_reaches_the_channels_waiters_and_wake_all_everyone() {
        let table = ChannelTable::default();
        let (mut a, _) = table.acquire("a");
        let (b, _) = table.acquire("b");
        table.wake("a");
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap());
        a.mark_unchanged();
        table.wake_all();
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        assert_eq!(table.states().len(), 2);
    }
}
