//! Fencing tokens: the proof that a caller holds a scope's lease.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A random 128-bit value made by the reserver, compared for equality by the store.
///
/// A token is generated for every reservation attempt and never reused: within a process
/// a counter makes each one distinct, and a per-process random key (from the OS) makes
/// them unpredictable and distinct across processes. The owner's token reaches the
/// handler as a request extension, so the handler can fence its own downstream writes.
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
    /// A fresh token, never returned before by this process.
    pub fn generate() -> Self {
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let key = KEY.get_or_init(|| {
            let mut key = [0u8; 32];
            if getrandom::getrandom(&mut key).is_err() {
                // No OS randomness: fall back to the time and the process id, which still
                // differ between processes; the counter keeps tokens distinct in this one.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default();
                key = *blake3::hash(
                    &[
                        nanos.to_le_bytes(),
                        u128::from(std::process::id()).to_le_bytes(),
                    ]
                    .concat(),
                )
                .as_bytes();
            }
            key
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let hash = blake3::keyed_hash(key, &n.to_le_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash.as_bytes()[..16]);
        FencingToken(u128::from_be_bytes(bytes))
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
