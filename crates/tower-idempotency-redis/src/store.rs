//! [`RedisStore`]'s operations: each one `EVALSHA` of its script (see [`scripts`]), the
//! reserve answered from the local replay tier when it can. The data model and the round
//! trips are described in the [crate docs](crate#data-model).
//!
//! [`scripts`]: crate::scripts

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::interfaces::{ClientLike, ConfigInterface, LuaInterface};
use fred::types::Value;
use tokio::time::Instant;
use tower_idempotency_core::{
    Completion, FencingToken, Fingerprint, KeyState, LeaseTerms, Record, Reservation, Resolved,
    ScopeHash, Store, StoreError,
};

use crate::check::CheckReport;
use crate::error::{DisplayChain, RedisStoreError};
use crate::eval::{bytes, eval_on, flag, millis, unexpected};
use crate::replication::Replication;
use crate::round_trip::{Counters, Op};
use crate::scripts::{Lua, SCRIPTS};
use crate::subscriber::{Hub, RedisSubscription};
use tower_idempotency_core::local::LocalTier;

/// A [`Store`] on Redis (standalone, Sentinel or Cluster) through a `fred` client.
///
/// `C` is whatever fred client the application already has: a
/// [`Client`](fred::clients::Client) (also for Sentinel and Cluster configurations) or a
/// [`Pool`](fred::clients::Pool); [`RedisStore::connect`] makes one for a URL. Cheap to
/// clone: clones share the client, the counters, the local replay tier and the
/// subscriber connection — the tier only while they keep one prefix (a clone under
/// another [`prefix`](RedisStore::prefix) gets its own).
///
/// See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct RedisStore<C> {
    pub(crate) client: C,
    pub(crate) prefix: Arc<str>,
    pub(crate) command_timeout: Duration,
    pub(crate) shared: Arc<Shared>,
    /// `Some` with [`wait_replicas`](RedisStore::wait_replicas); shared by clones.
    pub(crate) replication: Option<Arc<Replication>>,
    pub(crate) wait_connections: usize,
    /// The local replay tier; `None` when turned off. Keyed by scope hash alone, so it
    /// belongs to one namespace: whatever changes [`key`](RedisStore::key) (the prefix)
    /// must give the store a tier of its own.
    pub(crate) local: Option<Arc<LocalTier>>,
    /// `false` when [`prefix`](RedisStore::prefix) was given braces: every operation then
    /// fails with [`RedisStoreError::InvalidPrefix`].
    pub(crate) prefix_valid: bool,
    /// Whether [`init`](RedisStore::init) connects the client (one made by
    /// [`from_url`](RedisStore::from_url)) rather than wait for the application to.
    pub(crate) starts_client: bool,
}

/// State shared by every clone of a store.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) counters: Arc<Counters>,
    pub(crate) hub: Hub,
    /// What `init`'s check found.
    pub(crate) report: OnceLock<CheckReport>,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("round_trips", &self.shared.counters.snapshot())
            .field("local_replays", &self.local)
            .field("subscriber", &self.shared.hub)
            .field("wait_replicas", &self.replication)
            .finish_non_exhaustive()
    }
}

impl<C> RedisStore<C> {
    /// The key of a scope: `{prefix}{<scope hex>}`.
    pub fn key(&self, scope: &ScopeHash) -> String {
        tagged(&self.prefix, "", scope)
    }

    /// The wake-up channel of a scope: `{prefix}done:{<scope hex>}` (same hash tag as
    /// [`key`](Self::key)). The scripts that publish build the same name from the key.
    pub fn channel(&self, scope: &ScopeHash) -> String {
        tagged(&self.prefix, "done:", scope)
    }

    /// Drops this process's local replay of `scope`, for an operator's forget or resolve:
    /// before the script, and again after it answered (or failed), because a reserve
    /// that Redis ran just before the script may bring the old record back into the tier
    /// while the script is under way.
    fn forget_locally(&self, scope: &ScopeHash) {
        if let Some(local) = &self.local {
            local.forget(scope);
        }
    }
}

/// `{prefix}{infix}{<scope hex>}`, built in one allocation of the exact size: every
/// command names its key, so this is on every request's path.
fn tagged(prefix: &str, infix: &str, scope: &ScopeHash) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // The hex in a byte buffer, pushed as one `str`: a `char` pushed at a time cost about
    // 920 instructions per key under callgrind, this about 390.
    let mut hex = [b'{'; 66];
    for (pair, byte) in hex[1..65].chunks_exact_mut(2).zip(scope.as_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    hex[65] = b'}';
    let mut out = String::with_capacity(prefix.len() + infix.len() + hex.len());
    out.push_str(prefix);
    out.push_str(infix);
    match std::str::from_utf8(&hex) {
        Ok(hex) => out.push_str(hex),
        // ASCII by construction.
        Err(err) => unreachable!("{err}"),
    }
    out
}

impl<C> RedisStore<C>
where
    C: LuaInterface + ConfigInterface + ClientLike + Clone + Send + Sync + 'static,
{
    /// Runs `lua` on the key of `scope` with the arguments `args` builds, on the store's
    /// client; see [`eval_on`].
    async fn eval(
        &self,
        op: Op,
        lua: &'static Lua,
        scope: &ScopeHash,
        args: &(dyn Fn() -> Vec<Value> + Sync),
    ) -> Result<Value, RedisStoreError> {
        self.check_prefix()?;
        eval_on(
            &self.client,
            &self.shared.counters,
            op,
            lua,
            &|| (self.key(scope), args()),
            self.command_timeout,
        )
        .await
    }
}

/// The inspect script's answer (see `lua/inspect.lua`) as a [`KeyState`].
fn key_state(reply: Value) -> Result<KeyState, StoreError> {
    let Value::Array(fields) = reply else {
        return Err(unexpected("inspect", &reply).into());
    };
    if fields.is_empty() {
        return Ok(KeyState::Absent);
    }
    let bytes_of = |value: &Value| -> Option<bytes::Bytes> {
        match value {
            Value::Bytes(b) => Some(b.clone()),
            Value::String(s) => Some(s.inner().clone()),
            _ => None,
        }
    };
    // An integer field, or `None` for '' (not set) or a key without expiry.
    let ms_of = |value: &Value| -> Option<u64> {
        match value {
            Value::Integer(n) => u64::try_from(*n).ok(),
            other => {
                bytes_of(other).and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u64>().ok())
            }
        }
    };
    let field = |i: usize| {
        fields
            .get(i)
            .ok_or_else(|| unexpected("inspect", &reply_of(&fields)))
    };
    let state = bytes_of(field(0)?).unwrap_or_default();
    let token = bytes_of(field(1)?)
        .and_then(|b| <[u8; 16]>::try_from(b.as_ref()).ok())
        .map(FencingToken::from_bytes);
    let pttl = ms_of(field(3)?).map(Duration::from_millis);
    let lease_end = ms_of(field(4)?);
    let now = ms_of(field(5)?);
    let ttl = ms_of(field(6)?).map(Duration::from_millis);
    let expires_in = pttl.unwrap_or(Duration::MAX);
    match state.as_ref() {
        b"c" => {
            let blob = bytes_of(field(2)?).unwrap_or_default();
            Ok(KeyState::Completed {
                record: Record::decode(&blob)?,
                age: ttl.zip(pttl).map(|(ttl, left)| ttl.saturating_sub(left)),
                expires_in,
            })
        }
        b"p" => match (lease_end, now) {
            (Some(end), Some(now)) if end <= now => Ok(KeyState::Uncertain {
                owner: token.ok_or_else(|| unexpected("inspect", &reply_of(&fields)))?,
                lapsed_for: Some(Duration::from_millis(now - end)),
                expires_in,
            }),
            (Some(end), Some(now)) => Ok(KeyState::InFlight {
                owner: token,
                lease_remaining: Some(Duration::from_millis(end - now)),
            }),
            _ => Ok(KeyState::InFlight {
                owner: token,
                lease_remaining: pttl,
            }),
        },
        _ => Err(unexpected("inspect", &reply_of(&fields)).into()),
    }
}

fn reply_of(fields: &[Value]) -> Value {
    Value::Array(fields.to_vec())
}

/// The reserve script's answer for a completed record: `{blob, pttl}`. The TTL is `None`
/// when Redis reports none (a key without expiry: never kept locally).
fn completed(reply: Vec<Value>) -> Result<(bytes::Bytes, Option<Duration>), RedisStoreError> {
    let mut reply = reply.into_iter();
    let blob = match reply.next() {
        Some(Value::Bytes(blob)) => blob,
        Some(Value::String(blob)) => blob.into_inner(),
        other => {
            return Err(unexpected(
                "reserve",
                &Value::Array(other.into_iter().collect()),
            ))
        }
    };
    let ttl = match reply.next() {
        Some(Value::Integer(ms)) => u64::try_from(ms).ok().map(Duration::from_millis),
        _ => None,
    };
    Ok((blob, ttl))
}

impl<C> Store for RedisStore<C>
where
    C: LuaInterface + ConfigInterface + ClientLike + Clone + Send + Sync + 'static,
{
    type Subscription = RedisSubscription;

    fn name(&self) -> &'static str {
        "redis"
    }

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> Result<Reservation, StoreError> {
        if let Some(answer) = self
            .local
            .as_ref()
            .and_then(|l| l.answer(scope, fingerprint))
        {
            self.shared.counters.local_replay();
            return Ok(answer);
        }
        let args = || {
            vec![
                bytes(fingerprint.as_bytes()),
                bytes(&token.to_bytes()),
                millis(lease.duration),
                // Only a store that keeps records locally needs their TTL. Constants as static
                // strings: Redis receives every argument as a string anyway, and a static one
                // is sent as it is, where an integer is formatted first.
                Value::from_static_str(if self.local.is_some() { "1" } else { "0" }),
                match lease.keep_lapsed {
                    Some(keep) => millis(keep),
                    None => Value::from_static_str("0"),
                },
            ]
        };
        let sent = Instant::now();
        let reply = self
            .eval(Op::Reserve, &SCRIPTS.reserve, scope, &args)
            .await?;
        match reply {
            Value::Integer(1) => Ok(Reservation::Reserved),
            Value::Integer(2) => Ok(Reservation::InFlight),
            Value::Integer(3) => Ok(Reservation::Mismatch),
            Value::Integer(4) => Ok(Reservation::Uncertain),
            // A completed record: its blob and its remaining TTL in milliseconds.
            Value::Array(reply) => {
                let (blob, ttl) = completed(reply)?;
                let record = Record::decode(&blob)?;
                if let (Some(local), Some(ttl)) = (&self.local, ttl) {
                    local.keep(scope, fingerprint, &record, sent, ttl);
                }
                Ok(Reservation::Completed(record))
            }
            other => Err(unexpected("reserve", &other).into()),
        }
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let args = || vec![bytes(&token.to_bytes()), millis(lease)];
        let reply = self.eval(Op::Renew, &SCRIPTS.renew, scope, &args).await?;
        Ok(flag(reply, "renew")?)
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let args = || {
            vec![
                bytes(&token.to_bytes()),
                Value::Bytes(record.encode()),
                millis(ttl),
            ]
        };
        let reply = match &self.replication {
            None => {
                self.eval(Op::Complete, &SCRIPTS.complete, scope, &args)
                    .await?
            }
            Some(replication) => {
                Box::pin(replication.complete(
                    &self.client,
                    &self.shared.counters,
                    self.command_timeout,
                    self.key(scope),
                    args(),
                ))
                .await?
            }
        };
        Ok(if flag(reply, "complete")? {
            Completion::Stored
        } else {
            Completion::Fenced
        })
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        let args = || vec![bytes(&token.to_bytes())];
        let reply = self
            .eval(Op::Release, &SCRIPTS.release, scope, &args)
            .await?;
        Ok(flag(reply, "release")?)
    }

    async fn inspect(&self, scope: &ScopeHash) -> Result<KeyState, StoreError> {
        let reply = self
            .eval(Op::Admin, &SCRIPTS.inspect, scope, &Vec::new)
            .await?;
        key_state(reply)
    }

    async fn forget(&self, scope: &ScopeHash) -> Result<bool, StoreError> {
        self.forget_locally(scope);
        let reply = self
            .eval(Op::Admin, &SCRIPTS.forget, scope, &Vec::new)
            .await;
        self.forget_locally(scope);
        Ok(flag(reply?, "forget")?)
    }

    async fn resolve(
        &self,
        scope: &ScopeHash,
        record: &Record,
        ttl: Duration,
    ) -> Result<Resolved, StoreError> {
        self.forget_locally(scope);
        let args = || vec![Value::Bytes(record.encode()), millis(ttl)];
        let reply = self.eval(Op::Admin, &SCRIPTS.resolve, scope, &args).await;
        self.forget_locally(scope);
        match reply? {
            Value::Integer(1) => Ok(Resolved::Stored),
            Value::Integer(0) => Ok(Resolved::Absent),
            Value::Integer(2) => Ok(Resolved::InFlight),
            other => Err(unexpected("resolve", &other).into()),
        }
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<RedisSubscription, StoreError> {
        // Connecting the subscriber and the SSUBSCRIBE are each bounded by the timeout.
        // Boxed for the same reason as `eval_on`: fred's futures are large.
        let subscribe = Box::pin(self.shared.hub.subscribe(
            &self.client,
            self.channel(scope),
            self.command_timeout,
        ));
        match subscribe.await {
            Ok(subscription) => Ok(subscription),
            Err(err) => {
                tracing::debug!(error = %DisplayChain(&err), "idempotency subscribe failed");
                Err(err.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::clients::Client;

    #[test]
    fn keys_and_channels_share_the_scope_hash_tag() {
        let store = RedisStore::new(Client::default()).prefix("app:");
        let scope = ScopeHash::from_bytes([0xab; 32]);
        let hex = "ab".repeat(32);
        assert_eq!(store.key(&scope), format!("app:{{{hex}}}"));
        assert_eq!(store.channel(&scope), format!("app:done:{{{hex}}}"));
        let slot = |s: &str| fred::util::redis_keyslot(s.as_bytes());
        assert_eq!(slot(&store.key(&scope)), slot(&store.channel(&scope)));
        assert_eq!(
            RedisStore::new(Client::default()).key(&scope),
            format!("idem:{{{hex}}}")
        );
        // Every byte in its place, each nibble in order (the scope's `Display` is the
        // reference: it formats each byte with `{:02x}`).
        let scope = ScopeHash::from_bytes(std::array::from_fn(|i| (i as u8) * 7 + 1));
        assert_eq!(store.key(&scope), format!("app:{{{scope}}}"));
    }

    /// The scripts that publish build the channel from their key (`lua/complete.lua`):
    /// the key's head, `done:`, then its last 66 bytes, the hash tag. That must be the
    /// name [`RedisStore::channel`] gives the subscriber, for every prefix.
    #[test]
    fn scripts_build_the_channel_the_subscriber_listens_on() {
        const CHANNEL: &str = "string.sub(KEYS[1], 1, -67) .. 'done:' .. string.sub(KEYS[1], -66)";
        for lua in [
            &SCRIPTS.complete,
            &SCRIPTS.release,
            &SCRIPTS.forget,
            &SCRIPTS.resolve,
        ] {
            let publishes = lua.source.matches("redis.pcall('SPUBLISH', ").count();
            let built = lua
                .source
                .matches(&format!("redis.pcall('SPUBLISH', {CHANNEL}, "))
                .count();
            assert!(publishes > 0, "{} publishes nothing", lua.name);
            assert_eq!(
                publishes, built,
                "{}: a channel not built from the key",
                lua.name
            );
        }
        for prefix in ["", "app:", "idem:", "a.b:c-d/", "zahlungen-ü:"] {
            let store = RedisStore::new(Client::default()).prefix(prefix);
            let scope =
                ScopeHash::from_bytes(std::array::from_fn(|i| (i as u8).wrapping_mul(13) ^ 5));
            let key = store.key(&scope);
            // string.sub(key, 1, -67) and string.sub(key, -66), in bytes as Lua counts.
            let (head, tag) = key.split_at(key.len() - 66);
            assert_eq!(
                format!("{head}done:{tag}"),
                store.channel(&scope),
                "{prefix:?}"
            );
        }
    }

    #[tokio::test]
    async fn braces_in_the_prefix_are_reported_never_panicked() {
        for bad in ["a{b", "a}b", "{x}:"] {
            let store = RedisStore::new(Client::default()).prefix(bad);
            let scope = ScopeHash::from_bytes([1; 32]);
            let fp = Fingerprint::from_bytes([2; 32]);
            let err = store
                .reserve(
                    &scope,
                    &fp,
                    FencingToken::generate(),
                    Duration::from_secs(1).into(),
                )
                .await
                .unwrap_err();
            assert!(err.to_string().contains("unavailable"), "{err}");
            let err = store.init().await.unwrap_err();
            assert!(
                matches!(err, RedisStoreError::InvalidPrefix(ref p) if p == bad),
                "{err}"
            );
        }
        assert!(RedisStore::new(Client::default())
            .prefix("a{b")
            .prefix("ok:")
            .check_prefix()
            .is_ok());
    }

    #[test]
    fn a_tier_is_shared_only_within_one_prefix() {
        use tower_idempotency_core::local::LocalReplays;
        let tier = |store: &RedisStore<Client>| store.local.clone().expect("tier on");
        let settings = LocalReplays::default().max_bytes(1 << 20);
        let store = RedisStore::new(Client::default())
            .local_replays(Some(settings))
            .prefix("app:");
        let same = store.clone().prefix("app:");
        let live = store.clone().prefix("live:");
        let sandbox = store.clone().prefix("sandbox:");
        assert!(Arc::ptr_eq(&tier(&store), &tier(&same)));
        assert!(!Arc::ptr_eq(&tier(&store), &tier(&live)));
        assert!(!Arc::ptr_eq(&tier(&live), &tier(&sandbox)));
        assert_eq!(tier(&live).settings(), settings, "settings carry over");
        let off = RedisStore::new(Client::default())
            .local_replays(None)
            .prefix("x:");
        assert!(off.local.is_none(), "an off tier stays off");
    }
}
