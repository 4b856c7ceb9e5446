//! [`RedisStoreError`]: what can go wrong talking to Redis.

use std::time::Duration;

use tower_idempotency_core::StoreError;

/// An error from [`RedisStore`](crate::RedisStore).
///
/// When it crosses the [`Store`](tower_idempotency_core::Store) trait, an unexpected reply
/// becomes [`StoreError::Unexpected`] (503, never a pass-through), every other variant
/// [`StoreError::Backend`] (503 `store-unavailable`, or a pass-through under a fail-open
/// policy on the first reserve).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisStoreError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis command failed")]
    Redis(#[from] fred::error::Error),
    /// Redis did not answer within the store's
    /// [`command_timeout`](crate::RedisStore::command_timeout).
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The key prefix contains `{` or `}`, which would break the Redis Cluster hash tag
    /// that keeps a scope's key and its wake-up channel in one slot.
    #[error("invalid key prefix {0:?}: it must not contain `{{` or `}}`")]
    InvalidPrefix(String),
    /// A script answered with something it never returns: the server is not running this
    /// crate's scripts, or a proxy in between rewrote the reply.
    #[error("unexpected reply from redis: {0}")]
    UnexpectedReply(String),
}

impl From<RedisStoreError> for StoreError {
    fn from(err: RedisStoreError) -> Self {
        match err {
            err @ RedisStoreError::UnexpectedReply(_) => StoreError::Unexpected(Box::new(err)),
            err => StoreError::backend(err),
        }
    }
}

/// Runs one Redis command, failing with [`RedisStoreError::Timeout`] after `timeout`, so a
/// black-holed connection cannot hang a request.
pub(crate) async fn within<T, E>(
    timeout: Duration,
    command: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, RedisStoreError>
where
    RedisStoreError: From<E>,
{
    match tokio::time::timeout(timeout, command).await {
        Ok(result) => result.map_err(RedisStoreError::from),
        Err(_) => Err(RedisStoreError::Timeout(timeout)),
    }
}

/// Displays an error with its sources, `a: b: c`, for log fields and report lines: the
/// core's, so the layer's logs and the store's read alike.
pub(crate) use tower_idempotency_core::DisplayChain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unexpected_reply_is_never_a_pass_through() {
        let err: StoreError = RedisStoreError::UnexpectedReply("reserve answered 7".into()).into();
        assert!(matches!(err, StoreError::Unexpected(_)), "{err:?}");
        let err: StoreError = RedisStoreError::Timeout(Duration::from_secs(1)).into();
        assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    }
}
