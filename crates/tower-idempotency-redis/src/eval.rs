//! Running the store's scripts: `EVALSHA` with the `NOSCRIPT` fallback, and the values
//! passed to and read from them.

use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::LuaInterface;
use fred::types::Value;
use tower_idempotency_core::policy::MAX_TTL;

use crate::error::{within, RedisStoreError};
use crate::round_trip::{Counters, Op};
use crate::scripts::Lua;

/// A script call's key and arguments, built when the command is sent: once, and once
/// more only for the `EVAL` after a `NOSCRIPT`. fred takes both by value; cloning them
/// up front for that rare second send cost about 1.8 k instructions per request
/// (callgrind), a vector and a string allocated, copied and dropped for nothing.
pub(crate) type Command<'a> = &'a (dyn Fn() -> (String, Vec<Value>) + Sync);

/// Runs `lua` with `EVALSHA` on `client`, falling back to `EVAL` on `NOSCRIPT`; each
/// command counts as one round trip of `op`. The whole call is bounded by `timeout`.
pub(crate) async fn eval_on<L: LuaInterface>(
    client: &L,
    counters: &Counters,
    op: Op,
    lua: &'static Lua,
    command: Command<'_>,
    timeout: Duration,
) -> Result<Value, RedisStoreError> {
    let run = async {
        counters.count(op);
        let sha = lua.script.sha1().clone();
        let (key, args) = command();
        match client.evalsha::<Value, _, _, _>(sha, key, args).await {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                tracing::debug!(script = lua.name, "NOSCRIPT: sending the script with EVAL");
                counters.count(op);
                let (key, args) = command();
                client.eval(lua.source, key, args).await
            }
            other => other,
        }
    };
    // fred's command futures are large (about 11 KB for one EVALSHA with its fallback):
    // boxed, so the store's futures, and the layer's future that holds them, stay small
    // and cheap to move. One allocation instead of kilobytes of memcpy per request.
    within(timeout, Box::pin(run)).await
}

/// A duration for `PEXPIRE`, in milliseconds: at least 1 (`PEXPIRE 0` would delete the
/// key at once), at most [`MAX_TTL`], the layer's own bound. Redis refuses an expiry
/// whose end overflows its clock ("invalid expire time"), and a script stops there with
/// what it wrote before kept: a complete given `Duration::MAX` through the `Store` API
/// would leave its record completed under the lease's expiry, and answer an error.
pub(crate) fn millis(duration: Duration) -> Value {
    let max = MAX_TTL.as_millis();
    Value::Integer(
        i64::try_from(duration.as_millis().min(max))
            .unwrap_or(i64::MAX)
            .max(1),
    )
}

/// Raw bytes (a token, a fingerprint) as a script argument.
pub(crate) fn bytes(slice: &[u8]) -> Value {
    Value::Bytes(Bytes::copy_from_slice(slice))
}

/// A script's 0/1 answer.
pub(crate) fn flag(value: Value, script: &str) -> Result<bool, RedisStoreError> {
    match value {
        Value::Integer(0) => Ok(false),
        Value::Integer(1) => Ok(true),
        other => Err(unexpected(script, &other)),
    }
}

/// A reply a script never gives.
pub(crate) fn unexpected(script: &str, value: &Value) -> RedisStoreError {
    RedisStoreError::UnexpectedReply(format!("{script} script answered {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_at_least_one_millisecond() {
        assert_eq!(millis(Duration::from_secs(30)), Value::Integer(30_000));
        assert_eq!(millis(Duration::ZERO), Value::Integer(1));
        let max = i64::try_from(MAX_TTL.as_millis()).unwrap();
        assert_eq!(millis(Duration::MAX), Value::Integer(max));
        assert_eq!(millis(MAX_TTL), Value::Integer(max));
    }
}
