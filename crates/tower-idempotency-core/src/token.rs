//! Fencing tokens: the proof that a caller holds a scope's lease.

use std::fmt;

use rand::Rng;

/// A random 128-bit value made by the reserver, compared for equality by the store.
///
/// A token is generated for every reservation attempt from the thread's CSPRNG (`rand`'s
/// `ThreadRng`: ChaCha seeded from the OS, reseeded periodically), so tokens are
/// unpredictable and, at 128 bits, never repeat in practice — within a process or across
/// processes. The owner's token reaches the handler as a request extension, so the
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
    pub fn generate() -> Self {
        FencingToken(rand::thread_rng().gen())
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
