//! Deleting expired rows: [`PostgresStore::purge`] and the background
//! [`PurgeTask`].
//!
//! An expired row already counts as absent (every statement compares `expires_at` with
//! the database clock, and a reserve takes an expired row over), so purging is about
//! disk space and index size, never correctness. Each batch is one `DELETE` of at most
//! `batch` rows, oldest first, that skips rows another transaction holds (`SKIP
//! LOCKED`), so it never waits on a request and never locks the table.
//!
//! # Example
//!
//! ```no_run
//! # use std::time::Duration;
//! # use tower_idempotency_postgres::PostgresStore;
//! # async fn f(store: PostgresStore) -> Result<(), tower_idempotency_postgres::PostgresStoreError> {
//! // Once, e.g. from a cron job: up to 10 000 rows.
//! let deleted = store.purge(10_000).await?;
//! // Or every minute, in batches of 1 000, until stopped.
//! let task = store.spawn_purge(Duration::from_secs(60), 1_000);
//! // ... at shutdown:
//! task.stop().await;
//! # Ok(()) }
//! ```

use std::time::Duration;

use sqlx::AssertSqlSafe;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{within, DisplayChain, PostgresStoreError};
use crate::round_trip::Op;
use crate::store::PostgresStore;

/// The most batches one round of [`PostgresStore::spawn_purge`] deletes before it
/// sleeps again, so a huge backlog is worked off over several rounds.
const MAX_BATCHES_PER_ROUND: usize = 100;

impl PostgresStore {
    /// Deletes at most `batch` expired rows (one statement) and returns how many it
    /// deleted. Call it again while it returns `batch` to work off a backlog.
    pub async fn purge(&self, batch: u32) -> Result<u64, PostgresStoreError> {
        self.shared.counters.count(Op::Purge);
        let query = sqlx::query(AssertSqlSafe(self.sql.purge.clone())).bind(i64::from(batch));
        let done = within(self.timeout, query.execute(&self.pool)).await?;
        Ok(done.rows_affected())
    }

    /// Starts a task that purges expired rows every `every`, in batches of `batch` rows
    /// (again at once while a batch comes back full, up to 100 batches a round). Errors
    /// are logged with `warn!` and the next round tries again. Needs a tokio runtime.
    ///
    /// The task runs until [`PurgeTask::stop`] or until the returned handle is dropped:
    /// keep it for as long as purging should go on.
    pub fn spawn_purge(&self, every: Duration, batch: u32) -> PurgeTask {
        let (stop, mut stopped) = watch::channel(false);
        let store = self.clone();
        let task = tokio::spawn(async move {
            loop {
                for _ in 0..MAX_BATCHES_PER_ROUND {
                    let deleted = tokio::select! {
                        biased;
                        _ = stopped.wait_for(|stop| *stop) => return,
                        deleted = store.purge(batch) => deleted,
                    };
                    match deleted {
                        Ok(n) if n >= u64::from(batch) && batch > 0 => continue,
                        Ok(n) => {
                            tracing::debug!(deleted = n, "purged expired idempotency rows");
                            break;
                        }
                        Err(err) => {
                            tracing::warn!(error = %DisplayChain(&err), "purging expired idempotency rows failed");
                            break;
                        }
                    }
                }
                tokio::select! {
                    _ = stopped.wait_for(|stop| *stop) => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
        PurgeTask {
            stop,
            task: Some(task),
        }
    }
}

/// The background purge of [`PostgresStore::spawn_purge`]. Dropping it stops the task
/// too, without waiting.
#[derive(Debug)]
#[must_use = "dropping the PurgeTask stops purging: keep it for as long as purging should go on"]
pub struct PurgeTask {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl PurgeTask {
    /// Stops the task and waits until it has (a batch under way is cut short: its
    /// statement is cancelled with it, and rolls back).
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for PurgeTask {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
