//! [`PostgresStoreError`]: what can go wrong talking to Postgres.

use std::time::Duration;

use tower_idempotency_core::{DecodeError, StoreError};

/// An error from [`PostgresStore`](crate::PostgresStore).
///
/// When it crosses the [`Store`](tower_idempotency_core::Store) trait, a record that
/// cannot be decoded becomes [`StoreError::Decode`], a row this crate never writes or a
/// conflict with other transactions on the key (SQLSTATE class 40: a deadlock, a
/// serialization failure) [`StoreError::Unexpected`] (for both the layer answers 503 and
/// never passes the request through: the key may be in use), everything else
/// [`StoreError::Backend`] (503 `store-unavailable`, or a pass-through under a fail-open
/// policy on the first reserve).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresStoreError {
    /// Postgres answered with an error, or the connection failed.
    #[error("postgres query failed")]
    Sqlx(#[from] sqlx::Error),
    /// Postgres did not answer within the store's [`command_timeout`](crate::PostgresStore::command_timeout).
    #[error("postgres did not answer within {0:?}")]
    Timeout(Duration),
    /// A stored record could not be decoded (e.g. written by a newer version).
    #[error("stored record could not be decoded")]
    Decode(#[from] DecodeError),
    /// A table or channel name that is not a plain lowercase identifier.
    #[error("invalid {what} {name:?}: {why}")]
    InvalidName {
        /// `"table name"` or `"channel name"`.
        what: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A lock on the idempotency table was not granted in time, and it was not a
    /// reservation's: another session (a long transaction, a migration, DDL, a purge)
    /// holds the table or the scope's row. `what` is the operation that gave up.
    #[error(
        "{what}: a lock on the idempotency table was not granted within {waited:?}; another \
         session holds the table or the row (a long transaction, a migration, DDL, a purge)"
    )]
    Locked {
        /// `"reserve"` or `"migrate"`.
        what: &'static str,
        /// How long it waited.
        waited: Duration,
        /// The lock timeout error.
        #[source]
        source: Box<PostgresStoreError>,
    },
    /// A row that this crate never writes (an unknown state, a missing record): the
    /// table is not this crate's, or was edited by hand.
    #[error("unexpected row in the idempotency table: {0}")]
    UnexpectedRow(String),
}

impl From<PostgresStoreError> for StoreError {
    fn from(err: PostgresStoreError) -> Self {
        match err {
            PostgresStoreError::Decode(err) => StoreError::Decode(err),
            err @ PostgresStoreError::UnexpectedRow(_) => StoreError::Unexpected(Box::new(err)),
            err if err.sqlstate().is_some_and(|code| code.starts_with("40")) => {
                StoreError::Unexpected(Box::new(err))
            }
            other => StoreError::backend(other),
        }
    }
}

impl PostgresStoreError {
    /// The SQLSTATE of a database error, e.g. `55P03` for a lock timeout.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            PostgresStoreError::Sqlx(sqlx::Error::Database(db)) => {
                db.code().map(|code| code.into_owned())
            }
            _ => None,
        }
    }
}

/// Runs one database call, failing with [`PostgresStoreError::Timeout`] after `timeout`,
/// so a black-holed connection or an exhausted pool cannot hang a request.
///
/// Not an `async fn`: the call is boxed before anything else holds it. sqlx's futures are
/// kilobytes, and a future held by value is copied each time it is wrapped or moved into
/// the caller's own future; boxed at once, it is copied once (under callgrind, most of the
/// client's instructions per transactional request were such copies).
pub(crate) fn within<'a, T, E>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, E>> + Send + 'a,
) -> impl std::future::Future<Output = Result<T, PostgresStoreError>> + Send + 'a
where
    PostgresStoreError: From<E>,
    T: 'a,
    E: 'a,
{
    let call = Box::pin(call);
    async move {
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result.map_err(PostgresStoreError::from),
            Err(_) => Err(PostgresStoreError::Timeout(timeout)),
        }
    }
}

/// Displays an error with its sources, `a: b: c`, for log fields and report lines: the
/// core's, so the layer's logs and the store's read alike.
pub(crate) use tower_idempotency_core::DisplayChain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_stay_decode_errors_for_the_layer() {
        let err: StoreError = PostgresStoreError::Decode(DecodeError::UnknownVersion(9)).into();
        assert!(matches!(err, StoreError::Decode(_)), "{err:?}");
        let err: StoreError = PostgresStoreError::Timeout(Duration::from_secs(1)).into();
        assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
        let err: StoreError = PostgresStoreError::UnexpectedRow("state x".into()).into();
        assert!(matches!(err, StoreError::Unexpected(_)), "{err:?}");
    }
}
