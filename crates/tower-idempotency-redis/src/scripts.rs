//! The Lua scripts behind the [`Store`](tower_idempotency_core::Store) operations.
//!
//! Each script touches only `KEYS[1]`, the scope's hash, and complete and release publish
//! (sharded) on a channel that carries the same hash tag, so every script runs unchanged
//! on Redis Cluster. They build the channel's name from `KEYS[1]` (no argument to send
//! on every complete) and publish only when reserve marked the record (a waiter was
//! seen), and best effort (`redis.pcall`), so a refused publish never fails a script
//! after it wrote. The sources live in `lua/` next to this crate's `Cargo.toml`.

use std::sync::LazyLock;

use fred::types::scripts::Script;

/// One script: its source (for `EVAL` after `NOSCRIPT`) and its SHA-1 (for `EVALSHA`).
#[derive(Debug)]
pub(crate) struct Lua {
    pub(crate) name: &'static str,
    pub(crate) source: &'static str,
    pub(crate) script: Script,
}

impl Lua {
    fn new(name: &'static str, source: &'static str) -> Self {
        Lua {
            name,
            source,
            script: Script::from_lua(source),
        }
    }
}

/// All scripts, hashed once per process.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) reserve: Lua,
    pub(crate) renew: Lua,
    pub(crate) complete: Lua,
    pub(crate) release: Lua,
    pub(crate) inspect: Lua,
    pub(crate) forget: Lua,
    pub(crate) resolve: Lua,
}

impl Scripts {
    pub(crate) fn all(&self) -> [&Lua; 7] {
        [
            &self.reserve,
            &self.renew,
            &self.complete,
            &self.release,
            &self.inspect,
            &self.forget,
            &self.resolve,
        ]
    }
}

pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    reserve: Lua::new("reserve", include_str!("../lua/reserve.lua")),
    renew: Lua::new("renew", include_str!("../lua/renew.lua")),
    complete: Lua::new("complete", include_str!("../lua/complete.lua")),
    release: Lua::new("release", include_str!("../lua/release.lua")),
    inspect: Lua::new("inspect", include_str!("../lua/inspect.lua")),
    forget: Lua::new("forget", include_str!("../lua/forget.lua")),
    resolve: Lua::new("resolve", include_str!("../lua/resolve.lua")),
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_touches_only_keys_1() {
        for lua in SCRIPTS.all() {
            assert!(!lua.source.contains("KEYS[2]"), "{} uses KEYS[2]", lua.name);
            assert!(
                lua.source.contains("KEYS[1]"),
                "{} does not use KEYS[1]",
                lua.name
            );
            assert_eq!(lua.script.sha1().len(), 40, "{}", lua.name);
        }
    }
}
