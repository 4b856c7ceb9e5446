//! Fencing tokens: the proof that a caller holds a scope's lease.

use std::fmt;

use std::cell::RefCell;

/// A random 128-bit value made by the reserver, compared for equality by the store.
///
/// A token is generated for every reservation attempt from the operating system's CSPRNG
/// (`getrandom`), read 32 tokens at a time per thread so that a request does not pay a
/// system call, so tokens are unpredictable and, at 128 bits, never repeat in practice —
/// within a process or across processes. The owner's token reaches the handler as a request extension, so the
/// handler can fence its own downstream writes.
///
/// ```
/// use tower_idempotency_core::FencingToken;
///
/// let a = FencingToken::generate();
/// let b = FencingToken::generate();
/// assert_ne!(a, b);
/// assert_eq!(FencingToken::from_bytes(a.to_bytes()), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FencingToken(u128);

impl FencingToken {
    /// A fresh random token.
    ///
    /// # Panics
    ///
    /// If the operating system's random source fails, which `getrandom` reports only on
    /// platforms without one: a token that is not random could be guessed, so there is no
    /// safe fallback.
    pub fn generate() -> Self {
        BATCH.with(|batch| batch.borrow_mut().next())
    }

    /// The token's 16 bytes, big-endian.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// A token from its 16 bytes, as stored by a store.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        FencingToken(u128::from_be_bytes(bytes))
    }

    /// The token as 32 lowercase hex digits.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// Tokens read from the OS in one call, handed out one by one on this thread.
const BATCH_LEN: usize = 32;

struct Batch {
    bytes: [u8; 16 * BATCH_LEN],
    next: usize,
}

impl Batch {
    fn next(&mut self) -> FencingToken {
        if self.next == BATCH_LEN {
            // Each token is used once: refill rather than reuse any byte.
            #[allow(clippy::expect_used)] // see `FencingToken::generate`: no safe fallback
            getrandom::getrandom(&mut self.bytes).expect("the OS random source failed");
            self.next = 0;
        }
        let mut token = [0u8; 16];
        token.copy_from_slice(&self.bytes[self.next * 16..(self.next + 1) * 16]);
        // Not kept: a token handed out must not stay readable in this buffer.
        self.bytes[self.next * 16..(self.next + 1) * 16].fill(0);
        self.next += 1;
        FencingToken::from_bytes(token)
    }
}

thread_local! {
    static BATCH: RefCell<Batch> = const {
        RefCell::new(Batch {
            bytes: [0; 16 * BATCH_LEN],
            next: BATCH_LEN,
        })
    };
}

impl fmt::Debug for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FencingToken({:032x})", self.0)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Across several refills of the batch, on two threads: every token differs.
    #[test]
    fn tokens_never_repeat() {
        let make = || {
            (0..10 * BATCH_LEN)
                .map(|_| FencingToken::generate())
                .collect::<Vec<_>>()
        };
        let other = std::thread::spawn(make);
        let mut seen: HashSet<FencingToken> = make().into_iter().collect();
        for token in other.join().unwrap() {
            assert!(seen.insert(token), "repeated {token}");
        }
        assert_eq!(seen.len(), 20 * BATCH_LEN);
    }
}
