//! Connected `fred` clients and `RedisStore`s for tests (feature `redis`).

use tower_idempotency::redis::fred::prelude::*;
use tower_idempotency::redis::RedisStore;
use tower_idempotency::store::{FencingToken, ScopeHash};

/// A fred client on `url` that reconnects every 100 ms, connected.
pub async fn client(url: &str) -> Client {
    let config = Config::from_url(url).unwrap_or_else(|e| panic!("bad redis url {url}: {e}"));
    let client = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .build()
        .expect("fred client");
    client
        .init()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    client
}

/// A store on its own client, with `prefix`, scripts loaded.
pub async fn store(url: &str, prefix: &str) -> RedisStore<Client> {
    RedisStore::new(client(url).await)
        .prefix(prefix)
        .init()
        .await
        .expect("redis store init")
}

/// A store on the test Redis (`super::redis::redis_url`) with a prefix unique to `test`.
pub async fn test_store(test: &str) -> RedisStore<Client> {
    store(
        &super::redis::redis_url().await,
        &super::unique_prefix(test),
    )
    .await
}

/// A fresh random scope, so keys spread over a cluster's masters and never collide.
pub fn random_scope() -> ScopeHash {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(&FencingToken::generate().to_bytes());
    bytes[16..].copy_from_slice(&FencingToken::generate().to_bytes());
    ScopeHash::from_bytes(bytes)
}
