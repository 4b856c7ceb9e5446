//! [`CheckReport`]: what [`PostgresStore::check`](crate::PostgresStore::check) found out
//! about the server.
//!
//! What decides whether the store can keep its promises: the table exists with this
//! crate's columns (else every reserve fails: 503), the store's user may `SELECT`,
//! `INSERT`, `UPDATE` and `DELETE` in it (else some operations fail), and `NOTIFY` and
//! `LISTEN` work on the store's channel (else waiters only poll). The server version is
//! reported; versions older than 13 are untested and warned about.
//!
//! Only an unreachable server is an error; everything else is a warning in the report.
//! A connection pooler in transaction mode (PgBouncer's `pool_mode = transaction`)
//! cannot be detected from here: `LISTEN` seems to work through it, but notifications
//! never arrive, and transactional mode needs one server connection per request anyway.
//! Give the store a direct connection, or a session-mode pool.

use std::fmt;

use sqlx::{AssertSqlSafe, Row};

use crate::error::{within, DisplayChain, PostgresStoreError};
use crate::store::PostgresStore;

/// The columns the store reads and writes.
const COLUMNS: [&str; 9] = [
    "scope",
    "fingerprint",
    "state",
    "token",
    "record",
    "expires_at",
    "waiter",
    "lease_until",
    "completed_at",
];

/// Whether the store's user may do each of the table operations it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Privileges {
    /// `SELECT` (every reserve reads the row).
    pub select: bool,
    /// `INSERT` (reserve).
    pub insert: bool,
    /// `UPDATE` (reserve of an expired row, complete, renew).
    pub update: bool,
    /// `DELETE` (release, purge).
    pub delete: bool,
}

/// What [`PostgresStore::check`](crate::PostgresStore::check) found; its
/// [`Display`](fmt::Display) is one line per finding, then one per warning.
#[derive(Clone, Debug)]
pub struct CheckReport {
    server_version: String,
    server_version_num: Option<u32>,
    table: String,
    table_exists: bool,
    missing_columns: Vec<String>,
    privileges: Option<Privileges>,
    notify: Result<(), String>,
    listen: Result<(), String>,
    warnings: Vec<String>,
}

impl CheckReport {
    /// The server's `server_version`, e.g. `15.20 (Debian 15.20-0+deb12u1)`.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// Whether the store's table exists.
    pub fn table_exists(&self) -> bool {
        self.table_exists
    }

    /// What the store's user may do in the table (`None` when it does not exist).
    pub fn privileges(&self) -> Option<Privileges> {
        self.privileges
    }

    /// Whether `pg_notify` on the store's channel worked.
    pub fn can_notify(&self) -> bool {
        self.notify.is_ok()
    }

    /// Whether `LISTEN` on the store's channel worked.
    pub fn can_listen(&self) -> bool {
        self.listen.is_ok()
    }

    /// Everything that weakens the store, one sentence each. Empty when all is well.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// `true` when there are no [`warnings`](Self::warnings).
    pub fn is_ok(&self) -> bool {
        self.warnings.is_empty()
    }

    fn finish(mut self) -> Self {
        let mut warnings = Vec::new();
        match self.server_version_num {
            Some(num) if num >= 130_000 => {}
            Some(_) => warnings.push(format!(
                "postgres {} is older than 13: the store is not tested on it",
                self.server_version
            )),
            None => warnings.push(format!(
                "cannot read server_version_num (server_version {}): the store is tested on \
                 postgres 13 and newer",
                self.server_version
            )),
        }
        let table = &self.table;
        if !self.table_exists {
            warnings.push(format!(
                "table {table} does not exist: every reserve fails (503); create it with \
                 PostgresStore::migrate() or the crate's sql/schema.sql"
            ));
        } else if !self.missing_columns.is_empty() {
            warnings.push(format!(
                "table {table} lacks the column(s) {}: it is not this crate's table",
                self.missing_columns.join(", ")
            ));
        }
        if let Some(p) = self.privileges {
            let missing: Vec<&str> = [
                (p.select, "SELECT"),
                (p.insert, "INSERT"),
                (p.update, "UPDATE"),
                (p.delete, "DELETE"),
            ]
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, name)| name)
            .collect();
            if !missing.is_empty() {
                warnings.push(format!(
                    "the store's user lacks {} on {table}: the operations that need it fail \
                     (503); GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO <user>",
                    missing.join(", ")
                ));
            }
        }
        if let Err(why) = &self.notify {
            warnings.push(format!(
                "pg_notify on the store's channel failed ({why}): waiters fall back to polling"
            ));
        }
        if let Err(why) = &self.listen {
            warnings.push(format!(
                "LISTEN on the store's channel failed ({why}): waiters fall back to polling"
            ));
        }
        self.warnings = warnings;
        self
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "postgres version: {}", self.server_version)?;
        let table = if !self.table_exists {
            "missing"
        } else if self.missing_columns.is_empty() {
            "ok"
        } else {
            "wrong columns"
        };
        writeln!(f, "table {}: {table}", self.table)?;
        if let Some(p) = self.privileges {
            let yes = |b: bool| if b { "yes" } else { "no" };
            writeln!(
                f,
                "privileges: select {}, insert {}, update {}, delete {}",
                yes(p.select),
                yes(p.insert),
                yes(p.update),
                yes(p.delete)
            )?;
        }
        let ok = |r: &Result<(), String>| match r {
            Ok(()) => "yes".to_string(),
            Err(why) => format!("no ({why})"),
        };
        write!(
            f,
            "notify: {}, listen: {}",
            ok(&self.notify),
            ok(&self.listen)
        )?;
        for warning in &self.warnings {
            write!(f, "\nwarning: {warning}")?;
        }
        Ok(())
    }
}

/// Runs the checks, each call bounded by the store's timeout.
pub(crate) async fn run(store: &PostgresStore) -> Result<CheckReport, PostgresStoreError> {
    let timeout = store.timeout;
    let pool = &store.pool;
    let row = within(
        timeout,
        sqlx::query(
            "SELECT current_setting('server_version') AS v, \
             current_setting('server_version_num') AS n",
        )
        .fetch_one(pool),
    )
    .await?;
    let server_version: String = row.try_get("v")?;
    let num: String = row.try_get("n")?;
    let table = store.sql.table.plain().to_owned();
    let quoted = store.sql.table.quoted().to_owned();
    let exists: bool = within(
        timeout,
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&quoted)
            .fetch_one(pool),
    )
    .await?;
    let (missing_columns, privileges) = if exists {
        let columns: Vec<String> = within(
            timeout,
            sqlx::query_scalar(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            )
            .bind(&quoted)
            .fetch_all(pool),
        )
        .await?;
        let missing = COLUMNS
            .iter()
            .filter(|c| !columns.iter().any(|have| have == *c))
            .map(|c| (*c).to_owned())
            .collect();
        let row = within(
            timeout,
            sqlx::query(
                "SELECT has_table_privilege($1, 'SELECT') AS s, \
                 has_table_privilege($1, 'INSERT') AS i, \
                 has_table_privilege($1, 'UPDATE') AS u, \
                 has_table_privilege($1, 'DELETE') AS d",
            )
            .bind(&quoted)
            .fetch_one(pool),
        )
        .await?;
        let privileges = Privileges {
            select: row.try_get("s")?,
            insert: row.try_get("i")?,
            update: row.try_get("u")?,
            delete: row.try_get("d")?,
        };
        (missing, Some(privileges))
    } else {
        (Vec::new(), None)
    };
    // A payload the listeners ignore (see the subscriber module).
    let notify = within(
        timeout,
        sqlx::query("SELECT pg_notify($1, 'check')")
            .bind(store.channel_name())
            .execute(pool),
    )
    .await
    .map(|_| ())
    .map_err(|err| DisplayChain(&err).to_string());
    let listen_sql = format!(
        "LISTEN \"{c}\"; UNLISTEN \"{c}\"",
        c = store.channel_name().replace('"', "\"\"")
    );
    let listen = within(
        timeout,
        sqlx::raw_sql(AssertSqlSafe(listen_sql)).execute(pool),
    )
    .await
    .map(|_| ())
    .map_err(|err| DisplayChain(&err).to_string());
    Ok(CheckReport {
        server_version,
        server_version_num: num.trim().parse().ok(),
        table,
        table_exists: exists,
        missing_columns,
        privileges,
        notify,
        listen,
        warnings: Vec::new(),
    }
    .finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> CheckReport {
        CheckReport {
            server_version: "15.20".into(),
            server_version_num: Some(150_020),
            table: "app.idem".into(),
            table_exists: true,
            missing_columns: Vec::new(),
            privileges: Some(Privileges {
                select: true,
                insert: true,
                update: true,
                delete: true,
            }),
            notify: Ok(()),
            listen: Ok(()),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn a_fit_server_has_no_warnings() {
        let ok = report().finish();
        assert!(ok.is_ok(), "{ok}");
        assert!(ok.to_string().contains("table app.idem: ok"), "{ok}");
    }

    #[test]
    fn each_problem_is_one_warning() {
        let old = CheckReport {
            server_version: "12.1".into(),
            server_version_num: Some(120_001),
            ..report()
        }
        .finish();
        assert!(old.warnings()[0].contains("older than 13"), "{old}");

        let missing = CheckReport {
            table_exists: false,
            privileges: None,
            ..report()
        }
        .finish();
        assert_eq!(missing.warnings().len(), 1, "{missing}");
        assert!(missing.warnings()[0].contains("migrate()"), "{missing}");

        let read_only = CheckReport {
            privileges: Some(Privileges {
                select: true,
                insert: false,
                update: false,
                delete: false,
            }),
            ..report()
        }
        .finish();
        assert!(
            read_only.warnings()[0].contains("lacks INSERT, UPDATE, DELETE on app.idem"),
            "{read_only}"
        );

        let deaf = CheckReport {
            notify: Err("permission denied".into()),
            listen: Err("nope".into()),
            missing_columns: vec!["waiter".into()],
            ..report()
        }
        .finish();
        assert_eq!(deaf.warnings().len(), 3, "{deaf}");
        assert!(!deaf.can_notify() && !deaf.can_listen());
    }
}
