//! The store's SQL: the table name (validated, quoted), the schema that
//! [`migrate`](crate::PostgresStore::migrate) applies, and one statement per operation.
//!
//! Every operation is one statement, atomic on the scope's row:
//!
//! - **reserve**: `INSERT ... ON CONFLICT (scope) DO UPDATE ... WHERE` — the conflict
//!   branch writes only when it must (take over an expired row, answer a re-sent reserve
//!   with the same token, mark a live lease as waited on), and `RETURNING` reports the row.
//!   When the conflict branch does not write, a `SELECT` in the same statement reads the
//!   row. That `SELECT` sees the statement's snapshot, which misses a row committed by a
//!   concurrent reserve that the `INSERT` waited for; the statement then returns no row
//!   and the store runs it again (a new statement, a new snapshot).
//! - **complete**: `UPDATE ... WHERE token = $ AND state = 'pending' AND expires_at >
//!   now`, and `pg_notify` when a waiter was seen; a completed row of the same token
//!   answers "stored" again.
//! - **release**: `DELETE ... WHERE token = $ AND state = 'pending' AND expires_at > now`,
//!   `pg_notify` when a waiter was seen.
//! - **renew**: `UPDATE ... SET expires_at = now + lease WHERE token = $ ...`.
//! - **purge**: `DELETE` of at most `batch` expired rows, `SKIP LOCKED`.
//!
//! Transactional mode's own:
//!
//! - **reserve** (`reserve_tx`): a probe of the scope's advisory lock (an owner holds it
//!   for its whole transaction: "in flight" at once), then `INSERT ... ON CONFLICT DO
//!   NOTHING`, which locks no existing row, and the owner's advisory lock. An expired row
//!   is taken over with the locking `reserve` above. A new key's reserve runs as a
//!   statement each session prepares once, in the batch that begins the transaction
//!   ([`Statements::reserve_batch`]): a plain `INSERT` of one row, which fails when it
//!   does not reserve.
//! - **complete** (`complete_tx`): the same `UPDATE` without the lease check, in the
//!   owner's transaction: the uncommitted row is the lock, so a handler longer than the
//!   lease still commits. The `COMMIT` follows as a statement of its own.
//! - **renew**: `SELECT 1` on the owner's transaction (a live owner is never idle), or,
//!   while the handler holds it, a look at `pg_stat_activity` from another connection.
//!
//! Time is always `statement_timestamp()`, the database's clock: `now()` is the start of
//! the *transaction*, and in transactional mode the record's TTL must count from the
//! completion, not from the reservation.

use std::sync::Arc;

use crate::error::PostgresStoreError;
use crate::prepared::Prepared;

/// The default table, `tower_idempotency` (in the connection's `search_path`).
pub const DEFAULT_TABLE: &str = "tower_idempotency";

/// The longest table name: the index is named `{table}_expires_at_idx`, and Postgres
/// identifiers have at most 63 bytes.
const MAX_TABLE: usize = 63 - "_expires_at_idx".len();
/// Postgres identifiers (and `NOTIFY` channel names) have at most 63 bytes.
const MAX_IDENT: usize = 63;

/// A validated table name, `table` or `schema.table`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableName {
    /// As given, e.g. `app.idempotency` (also the default channel name).
    plain: String,
    /// Quoted for SQL, e.g. `"app"."idempotency"`.
    quoted: String,
    /// The quoted index name (unqualified: an index lives in its table's schema).
    index: String,
    /// The index name as `to_regclass` finds it: qualified by the table's schema, if any.
    qualified_index: String,
}

impl TableName {
    /// Accepts `name` or `schema.name`, each part a lowercase identifier (`[a-z_][a-z0-9_]*`),
    /// the whole at most 63 bytes so that it can also be the `NOTIFY` channel.
    pub(crate) fn parse(name: &str) -> Result<Self, PostgresStoreError> {
        let invalid = |why| PostgresStoreError::InvalidName {
            what: "table name",
            name: name.to_owned(),
            why,
        };
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, name),
        };
        if let Some(schema) = schema {
            identifier(schema).map_err(invalid)?;
        }
        identifier(table).map_err(invalid)?;
        if table.len() > MAX_TABLE {
            return Err(invalid("the table part must be at most 48 bytes"));
        }
        if name.len() > MAX_IDENT {
            return Err(invalid("the whole name must be at most 63 bytes"));
        }
        let quoted = match schema {
            Some(schema) => format!("\"{schema}\".\"{table}\""),
            None => format!("\"{table}\""),
        };
        let index = format!("\"{table}_expires_at_idx\"");
        let qualified_index = match schema {
            Some(schema) => format!("\"{schema}\".{index}"),
            None => index.clone(),
        };
        Ok(TableName {
            plain: name.to_owned(),
            quoted,
            index,
            qualified_index,
        })
    }

    /// A table that does not exist, for a store whose name was refused: its statements
    /// then fail at the server ("relation does not exist"), and the refused name itself
    /// never reaches SQL. `migrate()` refuses to create it.
    pub(crate) fn unusable() -> Self {
        let name = "tower_idempotency_invalid_table_name";
        TableName {
            plain: name.to_owned(),
            quoted: format!("\"{name}\""),
            index: format!("\"{name}_idx\""),
            qualified_index: format!("\"{name}_idx\""),
        }
    }

    /// As given, e.g. `app.idempotency`.
    pub(crate) fn plain(&self) -> &str {
        &self.plain
    }

    /// Quoted for SQL, e.g. `"app"."idempotency"`.
    pub(crate) fn quoted(&self) -> &str {
        &self.quoted
    }
}

/// Checks a channel name (the store quotes it for `LISTEN`; `pg_notify` takes it as text).
pub(crate) fn channel_name(name: &str) -> Result<(), PostgresStoreError> {
    let invalid = |why| PostgresStoreError::InvalidName {
        what: "channel name",
        name: name.to_owned(),
        why,
    };
    // A table name (with its dot) is the default channel, so the same rule applies.
    match name.split_once('.') {
        Some((a, b)) => {
            identifier(a).map_err(invalid)?;
            identifier(b).map_err(invalid)?;
        }
        None => identifier(name).map_err(invalid)?,
    }
    if name.len() > MAX_IDENT {
        return Err(invalid("it must be at most 63 bytes"));
    }
    Ok(())
}

/// `[a-z_][a-z0-9_]*`, not empty: safe to quote, and the same name unquoted.
fn identifier(part: &str) -> Result<(), &'static str> {
    let mut bytes = part.bytes();
    match bytes.next() {
        None => return Err("a part is empty"),
        Some(b'a'..=b'z' | b'_') => {}
        Some(_) => return Err("each part must start with a lowercase letter or `_`"),
    }
    if bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_')) {
        Ok(())
    } else {
        Err("each part may contain only lowercase letters, digits and `_`")
    }
}

/// The statements of one table, built once per store and shared by its clones.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) table: TableName,
    pub(crate) schema: Arc<str>,
    /// Whether the schema is in place: no DDL, no lock on the table.
    pub(crate) schema_current: Arc<str>,
    pub(crate) reserve: Arc<str>,
    pub(crate) reserve_tx: Arc<str>,
    /// Transactional mode's reserve as each connection's session prepares it (SQL
    /// `PREPARE`, once per session), for [`Statements::reserve_batch`] to `EXECUTE`: a `DO`
    /// block that prepares it unless the session holds it already (so it never fails on
    /// one it holds).
    pub(crate) prepare: Arc<str>,
    /// `tower_idempotency_reserve_` and a hash of the statement's text (which names the
    /// table): two stores on two tables, or two versions of this crate, never share a
    /// name for two different statements.
    pub(crate) reserve_name: Arc<str>,
    /// The sessions believed to hold the prepared reserve.
    pub(crate) prepared: Prepared,
    /// Transactional mode's first statement, outside any transaction: a completed record
    /// (replayed with no transaction), else whether an owner holds the scope.
    pub(crate) preread: Arc<str>,
    pub(crate) complete: Arc<str>,
    pub(crate) complete_tx: Arc<str>,
    pub(crate) completed_by: Arc<str>,
    pub(crate) release: Arc<str>,
    pub(crate) renew: Arc<str>,
    pub(crate) purge: Arc<str>,
    pub(crate) inspect: Arc<str>,
    pub(crate) forget: Arc<str>,
    pub(crate) resolve: Arc<str>,
    /// Mixed into every scope's advisory lock key, so stores on two tables never share
    /// one (see [`Statements::lock_key`]).
    lock_salt: i64,
}

/// Whether a transactional owner holds the scope whose advisory lock key is `$1`: a shared
/// try-lock, released at once, that fails only while an owner holds the exclusive one.
/// Shared, so that concurrent probes never see each other.
pub(crate) const HELD: &str = "SELECT NOT (CASE WHEN pg_try_advisory_lock_shared($1) \
     THEN pg_advisory_unlock_shared($1) ELSE false END)";

/// Whether the owner's transaction is still open, asked from another connection (for a
/// renewal that finds the transaction's connection busy with the handler): [`HELD`] of
/// its token's advisory lock key ([`Statements::token_lock`]), which only that
/// transaction takes, and holds until it ends.
pub(crate) const ALIVE: &str = HELD;

/// The renewal of a transactional reservation: a statement on the owner's transaction, so
/// that Postgres does not count a live owner as idle (and a cut shows as an error).
pub(crate) const KEEPALIVE: &str = "SELECT 1";

/// The row's remaining life in ms (for the local replay tier: a kept record lapses no
/// later than its row).
const TTL_MS: &str = "(extract(epoch FROM expires_at - statement_timestamp()) * 1000)::int8";
/// [`TTL_MS`] of the aliased row.
const TTL_MS_R: &str = "(extract(epoch FROM r.expires_at - statement_timestamp()) * 1000)::int8";

/// The pending row both transactional reserves (the long way's `reserve_tx` and the
/// prepared one) insert: $1 scope, $2 fingerprint, $3 token, $4 lease in ms. One text, so
/// the two paths cannot write different rows.
const PENDING_ROW: &str = "(scope, fingerprint, state, token, record, expires_at, waiter) \
    SELECT $1, $2, 'pending', $3, NULL, statement_timestamp() + $4 * interval '1 millisecond', false";

/// Whether the conflicting row is a pending lease that lapsed while kept as uncertain.
const LAPSED: &str =
    "(r.state = 'pending' AND coalesce(r.lease_until <= statement_timestamp(), false))";

/// [`LAPSED`] for the table's own row, unaliased.
const LAPSED_ROW: &str =
    "(state = 'pending' AND coalesce(lease_until <= statement_timestamp(), false))";

/// Whether the conflicting row is taken over by this reserve: an expired row, a pending
/// lease of the same token (a re-sent reserve), or a lapsed lease when this reserve does
/// not keep lapsed leases (`$6` is 0).
const TAKE: &str = "(r.expires_at <= statement_timestamp() \
    OR (r.state = 'pending' AND r.token = excluded.token) \
    OR ($6 = 0 AND (r.state = 'pending' AND coalesce(r.lease_until <= statement_timestamp(), false))))";

impl Statements {
    pub(crate) fn new(table: TableName) -> Self {
        let t = table.quoted.as_str();
        let schema = include_str!("../sql/schema.sql")
            .replace("{table}", t)
            .replace("{index}", &table.index);
        // The table, its index, and the columns added since the first release.
        let schema_current = format!(
            "SELECT to_regclass('{t}') IS NOT NULL AND to_regclass('{i}') IS NOT NULL \
               AND (SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('{t}') \
                    AND attname IN ('lease_until', 'completed_at') AND NOT attisdropped) = 2",
            t = table.quoted,
            i = table.qualified_index
        );
        // $1 scope, $2 fingerprint, $3 token, $4 lease in ms, $5 the scope's advisory lock
        // key in transactional mode (NULL in plain mode), $6 how long to keep a lapsed
        // lease as "uncertain", in ms (0: not kept). A kept lease's row lives $6 and
        // `lease_until` holds the end of its lease; a reserve that does not keep lapsed
        // leases takes a lapsed one over, one that does answers 'uncertain' for it.
        // `restored` restores the `lock_timeout` that transactional mode's BEGIN stashed
        // (see `tx.rs`; in plain mode the stash is empty), `locked` takes the owner's
        // advisory lock.
        let reserve = format!(
            "WITH up AS (\
               INSERT INTO {t} AS r (scope, fingerprint, state, token, record, expires_at, waiter, lease_until) \
               VALUES ($1, $2, 'pending', $3, NULL, \
                 statement_timestamp() + greatest($4, $6) * interval '1 millisecond', false, \
                 CASE WHEN $6 > $4 THEN statement_timestamp() + $4 * interval '1 millisecond' END) \
               ON CONFLICT (scope) DO UPDATE SET \
                 fingerprint = CASE WHEN {TAKE} THEN excluded.fingerprint ELSE r.fingerprint END, \
                 state = CASE WHEN {TAKE} THEN 'pending' ELSE r.state END, \
                 token = CASE WHEN {TAKE} THEN excluded.token ELSE r.token END, \
                 record = CASE WHEN {TAKE} THEN NULL ELSE r.record END, \
                 expires_at = CASE WHEN {TAKE} THEN excluded.expires_at ELSE r.expires_at END, \
                 lease_until = CASE WHEN {TAKE} THEN excluded.lease_until ELSE r.lease_until END, \
                 completed_at = CASE WHEN {TAKE} THEN NULL ELSE r.completed_at END, \
                 waiter = CASE WHEN r.expires_at <= statement_timestamp() THEN false \
                   WHEN r.token = excluded.token THEN r.waiter WHEN {LAPSED} THEN false ELSE true END \
               WHERE {TAKE} \
                  OR (r.state = 'pending' AND r.fingerprint = excluded.fingerprint AND NOT r.waiter \
                      AND NOT {LAPSED}) \
               RETURNING r.state, r.token = $3 AS mine, r.fingerprint = $2 AS same, r.record, \
                 {TTL_MS_R} AS ttl_ms\
             ) \
             SELECT state, mine, same, record, ttl_ms, \
               CASE WHEN mine AND state = 'pending' THEN {RESTORE} END AS restored, \
               CASE WHEN $5::int8 IS NOT NULL AND mine AND state = 'pending' THEN \
                 pg_advisory_xact_lock($5::int8)::text || pg_advisory_xact_lock($7::int8)::text END AS locked \
             FROM up \
             UNION ALL \
             SELECT CASE WHEN {LAPSED_ROW} THEN 'uncertain' ELSE state END, \
               token = $3, fingerprint = $2, record, {TTL_MS}, NULL, NULL FROM {t} \
             WHERE scope = $1 AND expires_at > statement_timestamp() AND NOT EXISTS (SELECT 1 FROM up)"
        );
        // Transactional mode's reserve. First the probe: an owner holds the scope's
        // advisory lock for its whole transaction, so a held lock answers "in flight" at
        // once, without waiting on the owner's row (nor holding a connection meanwhile).
        // Then `ON CONFLICT DO NOTHING`, which (unlike `DO UPDATE`) locks no existing row:
        // a completed row is read without a lock, so concurrent replays of one key do not
        // queue behind each other's transactions. An uncommitted row can still make the
        // insert wait (bounded by `lock_timeout`): an owner between its insert and its lock,
        // or another session's lock on the row or table; the store then asks again
        // (`HELD`). An expired row is reported (`expired`) and taken over with `reserve`,
        // the rare path. $5 is the scope's advisory lock key.
        let insert_pending = format!(
            "INSERT INTO {t} AS r {PENDING_ROW} FROM probe WHERE free ON CONFLICT (scope) DO NOTHING"
        );
        let reserve_tx = format!(
            "WITH probe AS (\
               SELECT CASE WHEN pg_try_advisory_lock_shared($5) \
                 THEN pg_advisory_unlock_shared($5) ELSE false END AS free\
             ), ins AS (\
               {insert_pending} \
               RETURNING r.state\
             ) \
             SELECT state, true AS mine, true AS same, NULL::bytea AS record, NULL::int8 AS ttl_ms, \
               false AS expired, {RESTORE} AS restored, \
               pg_advisory_xact_lock($5)::text || pg_advisory_xact_lock($7)::text AS locked \
             FROM ins \
             UNION ALL \
             SELECT 'pending', false, true, NULL, NULL, false, NULL, NULL \
             FROM probe WHERE NOT free \
             UNION ALL \
             SELECT state, token = $3, fingerprint = $2, record, {TTL_MS}, \
               expires_at <= statement_timestamp(), NULL, NULL FROM {t} \
             WHERE scope = $1 AND (SELECT free FROM probe) AND NOT EXISTS (SELECT 1 FROM ins)"
        );
        // Transactional mode's new key, prepared once per session (see `reserve_batch`):
        // $1 scope, $2 fingerprint, $3 token, $4 lease in ms, $5
        // idle_in_transaction_session_timeout (NULL: the session's), $6 the scope's advisory
        // lock key, $7 the token's. The batch bounds the transaction's lock waits before it
        // sends this, and gives the handler the session's `lock_timeout` back after it (see
        // `reserve_batch`: set in here, the bound would come too late for the table lock).
        // One plain `INSERT` of one row, no CTE, no aggregate, no `RETURNING`: the server
        // starts its executor for every `EXECUTE`, and the CTEs and the `count(*)` this had
        // before cost it about 40 k instructions per new key (callgrind); a `RETURNING`
        // costs it a projection, and, as the result of an `EXECUTE` in a simple query, a
        // copy of its whole target list for the row description (together about 30 k). What
        // the batch learns is whether it failed:
        // - an owner holds the scope (the probe of its advisory lock): 1 / 0
        //   ([`NOT_RESERVED`]), without waiting on the owner's row;
        // - a row is there (completed, or expired and not purged yet): the primary key
        //   refuses it ([`UNIQUE_VIOLATION`]); an uncommitted one (an owner of the long way
        //   between its insert and its lock, or another session's write) is waited for, up
        //   to the batch's `lock_timeout`.
        // The probe passed, the `CASE` (evaluated before the row is inserted, one branch
        // after the other) takes the owner's two advisory locks, held to the end of the
        // transaction (the scope's, then the token's), and bounds a frozen owner's idle
        // transaction. Each `set_config` costs the server a few µs per new key (set, then
        // undone at the end of the transaction), so there are as few as the bounds need.
        let reserve_body = format!(
            "(bytea, bytea, bytea, int8, text, int8, int8) AS \
             INSERT INTO {t} {PENDING_ROW} \
             WHERE CASE WHEN 1 / (CASE WHEN pg_try_advisory_lock_shared($6) \
                 THEN pg_advisory_unlock_shared($6)::int4 ELSE 0 END) = 1 \
               THEN (pg_advisory_xact_lock($6)::text || pg_advisory_xact_lock($7)::text \
                 || CASE WHEN $5 IS NOT NULL \
                   THEN set_config('idle_in_transaction_session_timeout', $5, true) ELSE '' END) \
                 IS NOT NULL END"
        );
        let reserve_name = format!(
            "tower_idempotency_reserve_{:016x}",
            fnv1a(reserve_body.as_bytes()) as u64
        );
        // Dollar-quoted: the statement's text holds quotes, and no `$`-tag of these.
        let prepare = format!(
            "DO $tower_idempotency_do$ BEGIN \
               IF NOT EXISTS (SELECT FROM pg_prepared_statements WHERE name = '{reserve_name}') THEN \
                 EXECUTE $tower_idempotency_stmt$PREPARE {reserve_name}{reserve_body}$tower_idempotency_stmt$; \
               END IF; \
             END $tower_idempotency_do$"
        );
        // $1 scope, $2 the scope's advisory lock key. A committed row of transactional mode
        // is a completed one (the pending row commits only with its record), and a
        // completed record never changes: read outside any transaction, it is the answer
        // (a replay, or 422 for another payload) in one statement. `found` packs what the
        // store needs of it: the fingerprint (32 bytes, compared by the store), the row's
        // remaining life in ms (8 bytes, big endian: `int8send`) and the record (split by
        // [`Found::split`]). Only a completed row has a record: a pending one (committed by a
        // handler that ended the transaction with SQL, or a plain-mode lease) packs to NULL,
        // so `found` needs no filter on `state` (one qual less to build and run).
        // Without a row, the probe of the owner's advisory lock answers in its place (one
        // byte, [`PreRead::parse`]): "in flight" stays one statement, and a quiet one (the
        // reserve's own probe would say so by failing, an `ERROR` in the server's log for
        // every 409 and every poll of a waiter). `coalesce` runs the probe only when there
        // is no row, so a replay does not pay for its two lock calls (about 1.5 k
        // instructions per replay). The session's `lock_timeout` is what a new key's reserve
        // restores for the handler, the backend's pid which session it is (see
        // `crate::prepared`). One scalar subquery and no join: under callgrind (pgbench, a
        // miss) this cost the server about 72 k instructions per execution, the `LEFT JOIN`
        // form it replaced 82.5 k, the same without the probe 57–62 k.
        let preread = format!(
            "SELECT pg_backend_pid() AS pid, current_setting('lock_timeout') AS lock_timeout, \
               coalesce((SELECT fingerprint || int8send({TTL_MS}) || record FROM {t} \
                 WHERE scope = $1 AND expires_at > statement_timestamp()), \
               CASE WHEN pg_try_advisory_lock_shared($2) THEN \
                 CASE WHEN pg_advisory_unlock_shared($2) THEN E'\\\\x01'::bytea END \
               ELSE E'\\\\x00'::bytea END) AS found"
        );
        // $1 scope, $2 token, $3 record, $4 ttl in ms, $5 channel, $6 notify regardless of
        // the row's flag (transactional mode: a waiter in another process told us).
        let complete = format!(
            "WITH u AS (\
               UPDATE {t} SET state = 'completed', record = $3, lease_until = NULL, \
                 completed_at = statement_timestamp(), \
                 expires_at = statement_timestamp() + $4 * interval '1 millisecond' \
               WHERE scope = $1 AND token = $2 AND state = 'pending' \
                 AND expires_at > statement_timestamp() \
               RETURNING waiter\
             ) \
             SELECT CASE WHEN waiter OR $6 THEN pg_notify($5, 'c' || encode($1, 'hex')) IS NULL END FROM u \
             UNION ALL \
             SELECT NULL FROM {t} WHERE scope = $1 AND token = $2 AND state = 'completed' \
               AND expires_at > statement_timestamp() AND NOT EXISTS (SELECT 1 FROM u)"
        );
        // Transactional mode's complete, in the owner's transaction; the `COMMIT` follows.
        // No lease check: the uncommitted row is the lock, nobody else can read or take it,
        // so a handler that ran longer than the lease still commits (SPEC section 10). $1
        // scope, $2 token, $3 record, $4 TTL in ms, $5 channel, $6 notify whatever the row
        // says. No row (the handler ended the transaction with SQL): the store rolls back.
        // Bound parameters and sqlx's cached statement, one `UPDATE` with no CTE: writing
        // the record as literals in one batch with the `COMMIT` saved a round trip but
        // cost the server about 75 k instructions more per new key (parsing, the
        // parameters' coercion, the CTE and the `count(*)` that stopped the batch before its
        // `COMMIT`, and the empty transaction it left for the pool to end).
        // No `RETURNING` (a projection and a row to send, about 10 k instructions): the wake-up
        // rides in the `SET` ([`NOTIFY_COMPLETED`]), the row count says whether it matched.
        let complete_tx = format!(
            "UPDATE {t} SET state = 'completed', record = $3, \
               completed_at = {NOTIFY_COMPLETED}, \
               expires_at = statement_timestamp() + $4 * interval '1 millisecond' \
             WHERE scope = $1 AND token = $2 AND state = 'pending'"
        );
        // $1 scope, $2 token.
        let completed_by = format!(
            "SELECT 1 FROM {t} WHERE scope = $1 AND token = $2 AND state = 'completed' \
             AND expires_at > statement_timestamp()"
        );
        // $1 scope, $2 token, $3 channel.
        let release = format!(
            "WITH d AS (\
               DELETE FROM {t} WHERE scope = $1 AND token = $2 AND state = 'pending' \
                 AND expires_at > statement_timestamp() \
               RETURNING waiter\
             ) \
             SELECT CASE WHEN waiter THEN pg_notify($3, 'c' || encode($1, 'hex')) IS NULL END FROM d"
        );
        // $1 scope, $2 token, $3 lease in ms. A completed row of the same token answers
        // `true` and keeps its TTL. A kept lease moves its end, and its row lives at
        // least as long; it may have lapsed already (nobody else took it: the token still
        // holds it).
        let renew = format!(
            "UPDATE {t} SET \
               expires_at = CASE WHEN state <> 'pending' THEN expires_at \
                 WHEN lease_until IS NULL THEN statement_timestamp() + $3 * interval '1 millisecond' \
                 ELSE greatest(expires_at, statement_timestamp() + $3 * interval '1 millisecond') END, \
               lease_until = CASE WHEN state = 'pending' AND lease_until IS NOT NULL \
                 THEN statement_timestamp() + $3 * interval '1 millisecond' ELSE lease_until END \
             WHERE scope = $1 AND token = $2 AND expires_at > statement_timestamp()"
        );
        // Operators. $1 scope.
        let inspect = format!(
            "SELECT state, token, record, \
               (extract(epoch FROM expires_at - statement_timestamp()) * 1000)::int8 AS expires_ms, \
               (extract(epoch FROM lease_until - statement_timestamp()) * 1000)::int8 AS lease_ms, \
               (extract(epoch FROM statement_timestamp() - completed_at) * 1000)::int8 AS age_ms \
             FROM {t} WHERE scope = $1 AND expires_at > statement_timestamp()"
        );
        // $1 scope, $2 channel. Answers whether a live row went.
        let forget = format!(
            "WITH d AS (DELETE FROM {t} WHERE scope = $1 \
               RETURNING expires_at > statement_timestamp() AS live) \
             SELECT live, pg_notify($2, 'c' || encode($1, 'hex')) IS NULL FROM d"
        );
        // $1 scope, $2 record, $3 ttl in ms, $4 channel. Only a completed row or a lapsed
        // kept lease; the token is cleared, so a lapsed owner alive after all cannot
        // overwrite the operator's answer.
        let resolve = format!(
            "WITH u AS (\
               UPDATE {t} SET state = 'completed', record = $2, token = '\\x'::bytea, \
                 waiter = false, lease_until = NULL, completed_at = statement_timestamp(), \
                 expires_at = statement_timestamp() + $3 * interval '1 millisecond' \
               WHERE scope = $1 AND expires_at > statement_timestamp() \
                 AND (state = 'completed' OR {LAPSED_ROW}) \
               RETURNING 1\
             ) \
             SELECT pg_notify($4, 'c' || encode($1, 'hex')) IS NULL FROM u"
        );
        // $1 batch.
        let purge = format!(
            "DELETE FROM {t} WHERE ctid IN (\
               SELECT ctid FROM {t} WHERE expires_at <= statement_timestamp() \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED\
             ) AND expires_at <= statement_timestamp()"
        );
        Statements {
            lock_salt: fnv1a(table.plain.as_bytes()),
            table,
            schema: schema.into(),
            schema_current: schema_current.into(),
            reserve: reserve.into(),
            reserve_tx: reserve_tx.into(),
            prepare: prepare.into(),
            reserve_name: reserve_name.into(),
            prepared: Prepared::default(),
            preread: preread.into(),
            complete: complete.into(),
            complete_tx: complete_tx.into(),
            completed_by: completed_by.into(),
            release: release.into(),
            renew: renew.into(),
            purge: purge.into(),
            inspect: inspect.into(),
            forget: forget.into(),
            resolve: resolve.into(),
        }
    }

    /// Transactional mode's reserve in one round trip: a simple-query batch that begins
    /// the transaction (READ COMMITTED whatever the server's default), bounds its lock
    /// waits, and `EXECUTE`s the session's prepared reserve: probe the owner's advisory
    /// lock, take the scope's and the token's advisory locks, bound the idle transaction,
    /// insert the pending row. Its last statement gives the handler the session's
    /// `lock_timeout` back; it runs only when the `EXECUTE` reserved (a failed statement
    /// ends the batch).
    /// The server parses and plans that statement once per connection, not per request
    /// (as text it cost about 190 µs of server CPU per new key here; as `EXECUTE`, about
    /// 40). A simple query takes no parameters, so the `EXECUTE` arguments are literals:
    /// hex of bytes the store made (scope hash, fingerprint, token) in `E''` strings (read
    /// the same whatever `standard_conforming_strings` says), integers, and durations the
    /// store formatted itself — nothing from a client reaches this text unencoded.
    ///
    /// `prepare`: the session is not known to hold the statements (see
    /// [`crate::prepared`]): the batch prepares the missing ones first
    /// ([`prepare`](Self::prepare)). `failed`: the connection is in the failed
    /// transaction of a batch that found no such statement ([`NO_SUCH_STATEMENT`]): the
    /// batch ends it first.
    ///
    /// A batch answers with no rows (sqlx begins a transaction with it), so it says
    /// whether it reserved by failing: when an owner holds the scope, the insert divides
    /// by zero ([`NOT_RESERVED`]); when a row is there (completed, expired, or taken since
    /// the pre-read), the primary key refuses it ([`UNIQUE_VIOLATION`]). The store then
    /// ends the failed transaction and asks with the statements that return the row.
    /// `lock_timeout` and `idle` are settings as [`crate::store`] formats them (`'250ms'`);
    /// `session_lock_timeout` the session's own, as the pre-read read it, restored by a
    /// `SET LOCAL` once the row is held (a utility statement: cheaper for the server than
    /// a `set_config` in a `RETURNING`, see [`Statements::new`]); `None` without a
    /// pre-read ([`reserve_first`](crate::PostgresStore::reserve_first)): `SET LOCAL
    /// lock_timeout TO DEFAULT`, the session's default. Saving the session's value in the
    /// batch instead (`set_config` from `current_setting`, and back) takes two `SELECT`s,
    /// which cost the server more than the pre-read they would spare (465 k instructions
    /// per new key under callgrind, against 434 k with the pre-read and 363 k this way).
    ///
    /// The transaction's `lock_timeout` is set by a statement of its own, before the
    /// `PREPARE` and the `EXECUTE`: both take the table's lock before any of the reserve's
    /// expressions runs (parse analysis, and the check of the cached plan), so a bound set
    /// inside the statement does not bound a wait on a table lock (DDL, `LOCK TABLE`). That
    /// wait would last until the store's timeout, and the statement would go on in the
    /// server after it: once the lock went, it would reserve the key and hold it until its
    /// session noticed the store had closed the connection (409 to a retry meanwhile).
    #[allow(clippy::too_many_arguments)] // one reserve's inputs, as literals
    pub(crate) fn reserve_batch(
        &self,
        failed: bool,
        prepare: bool,
        scope: &tower_idempotency_core::ScopeHash,
        fingerprint: &tower_idempotency_core::Fingerprint,
        token: tower_idempotency_core::FencingToken,
        lease_ms: i64,
        lock_timeout: &str,
        session_lock_timeout: Option<&str>,
        idle: Option<&str>,
    ) -> String {
        use std::fmt::Write;
        let mut sql = String::with_capacity(if prepare { 4000 } else { 400 });
        if failed {
            sql.push_str("ROLLBACK; ");
        }
        // The prepare inside the transaction: before the `BEGIN` it would open the
        // implicit transaction of the batch, and `BEGIN ISOLATION LEVEL` then fails
        // (25001) on a server whose default isolation is not READ COMMITTED. A `ROLLBACK`
        // does not undo a `PREPARE`.
        sql.push_str("BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = ");
        sql.push_str(lock_timeout);
        sql.push_str("; ");
        if prepare {
            sql.push_str(&self.prepare);
            sql.push_str("; ");
        }
        // Writing to a String cannot fail.
        let _ = write!(
            sql,
            "EXECUTE {name}(E'\\\\x{scope}', E'\\\\x{fingerprint}', E'\\\\x{token}', \
               {lease_ms}, {idle}, {key}, {token_key}); SET LOCAL lock_timeout ",
            name = self.reserve_name,
            scope = scope.to_hex(),
            fingerprint = hex(fingerprint.as_bytes()),
            token = hex(&token.to_bytes()),
            idle = idle.unwrap_or("NULL"),
            key = self.lock_key(scope),
            token_key = self.token_lock(token),
        );
        match session_lock_timeout {
            Some(session) => {
                sql.push_str("= ");
                push_text_literal(&mut sql, session);
            }
            None => sql.push_str("TO DEFAULT"),
        }
        sql
    }

    /// The advisory lock key that only the transaction of `token` takes: 64 bits of the
    /// token (random, never reused) mixed with the table's salt. Held while that
    /// transaction is open, so another connection can tell whether it still is.
    pub(crate) fn token_lock(&self, token: tower_idempotency_core::FencingToken) -> i64 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&token.to_bytes()[..8]);
        // Not the scope keys' space as is: flip the salt, so the two families differ.
        i64::from_be_bytes(head) ^ !self.lock_salt
    }

    /// The advisory lock key of `scope` on this table: 64 bits of the scope hash mixed
    /// with the table's salt. Every process must compute the same key, so the salt is a
    /// fixed function of the table name (FNV-1a), not a seeded hasher.
    pub(crate) fn lock_key(&self, scope: &tower_idempotency_core::ScopeHash) -> i64 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&scope.as_bytes()[..8]);
        i64::from_be_bytes(head) ^ self.lock_salt
    }
}

/// Transactional mode's wake-up at completion, as the value of the completed row's
/// `completed_at`: when a waiter said it waits (`waiter`, the row's value before the
/// `UPDATE`) or one was seen (`$6`), `pg_notify` on the channel `$5` (delivered at the
/// `COMMIT`). A `CASE` runs its branches in order, so the notify runs only when one is
/// due; `pg_notify` returns `void`, never NULL, and the value is
/// `statement_timestamp()` either way.
const NOTIFY_COMPLETED: &str = "CASE WHEN NOT (waiter OR $6) THEN statement_timestamp() \
    WHEN pg_notify($5, 'c' || encode($1, 'hex')) IS NULL THEN NULL \
    ELSE statement_timestamp() END";

/// Restores the session's `lock_timeout`, stashed by transactional mode's `BEGIN`.
const RESTORE: &str = "set_config('lock_timeout', coalesce(nullif(current_setting(\
    'tower_idempotency.lock_timeout', true), ''), current_setting('lock_timeout')), true)";

/// What transactional mode's pre-read found, from its one `found` column.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PreRead {
    /// A row of the scope with a record (8 bytes and more: a row's pack always holds
    /// `int8send`'s 8), already split; `None` when too short to be this crate's (the long
    /// way reads it and says what it is).
    Row(Option<Found>),
    /// No row, and an owner holds the scope's advisory lock (`\x00`).
    Held,
    /// No row, and no owner (`\x01`; anything else unexpected, too: the reserve probes
    /// again).
    Free,
}

impl PreRead {
    /// Reads the pre-read's `found`: a row's pack, or the probe's one byte.
    pub(crate) fn parse(found: Option<Vec<u8>>) -> Self {
        match found {
            Some(packed) if packed.len() >= 8 => PreRead::Row(Found::split(packed)),
            Some(flag) if flag == [0] => PreRead::Held,
            _ => PreRead::Free,
        }
    }
}

/// A completed row as the pre-read packs it: fingerprint, remaining life, record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// The request fingerprint the record was stored for.
    pub(crate) fingerprint: [u8; 32],
    /// The row's remaining life in ms when the pre-read ran.
    pub(crate) ttl_ms: i64,
    /// The record's bytes (`Record::encode`).
    pub(crate) record: bytes::Bytes,
}

impl Found {
    /// Splits the pre-read's `found`: 32 bytes of fingerprint, 8 of remaining life (big
    /// endian, as `int8send` writes it), then the record. `None` for anything shorter (a
    /// row this crate did not write).
    pub(crate) fn split(found: Vec<u8>) -> Option<Self> {
        let head = found.get(..40)?;
        let (fingerprint, ttl) = head.split_at(32);
        let fingerprint: [u8; 32] = fingerprint.try_into().ok()?;
        let ttl_ms = i64::from_be_bytes(ttl.try_into().ok()?);
        Some(Found {
            fingerprint,
            ttl_ms,
            record: bytes::Bytes::from(found).slice(40..),
        })
    }
}

/// SQLSTATE `division_by_zero`: how [`Statements::reserve_batch`] says it did not reserve.
pub(crate) const NOT_RESERVED: &str = "22012";

/// SQLSTATE `unique_violation`: the other way [`Statements::reserve_batch`] says it did not
/// reserve (a row of the scope is there).
pub(crate) const UNIQUE_VIOLATION: &str = "23505";

/// SQLSTATE `invalid_sql_statement_name`: the session has no prepared statement of that
/// name (see [`crate::prepared`]).
pub(crate) const NO_SUCH_STATEMENT: &str = "26000";

/// Appends `text` as an `E''` string literal (read the same whatever
/// `standard_conforming_strings` says): backslashes and quotes doubled.
fn push_text_literal(out: &mut String, text: &str) {
    out.reserve(text.len() + 3);
    out.push_str("E'");
    for c in text.chars() {
        if c == '\\' || c == '\'' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends `bytes` to `out` in lowercase hex.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

/// 64-bit FNV-1a: stable across processes, platforms and Rust versions.
fn fnv1a(bytes: &[u8]) -> i64 {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_lowercase_identifiers() {
        let t = TableName::parse("idem").unwrap();
        assert_eq!(t.quoted, "\"idem\"");
        assert_eq!(t.index, "\"idem_expires_at_idx\"");
        let t = TableName::parse("app_1.idem_records").unwrap();
        assert_eq!(t.quoted, "\"app_1\".\"idem_records\"");
        assert_eq!(t.plain(), "app_1.idem_records");
        assert_eq!(t.index, "\"idem_records_expires_at_idx\"");
        // Reserved words are fine: the store quotes every name.
        assert!(TableName::parse("order").is_ok());
        let long = "t".repeat(48);
        assert!(TableName::parse(&long).is_ok());
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "Idem",
            "1idem",
            "idem-records",
            "idem\"; DROP TABLE x; --",
            "idem records",
            "é",
            &"t".repeat(49),
            &format!("{}.{}", "s".repeat(40), "t".repeat(30)),
        ] {
            let err = TableName::parse(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    PostgresStoreError::InvalidName {
                        what: "table name",
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn channel_names_follow_the_same_rule() {
        assert!(channel_name("idem_done").is_ok());
        assert!(channel_name("app.idem").is_ok());
        for bad in ["", "Done", "a b", "a\"b", &"c".repeat(64)] {
            assert!(channel_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_preread_packing_splits_into_fingerprint_ttl_and_record() {
        let mut packed = vec![7u8; 32];
        packed.extend_from_slice(&(-5i64).to_be_bytes());
        packed.extend_from_slice(b"record");
        let found = Found::split(packed).unwrap();
        assert_eq!(found.fingerprint, [7; 32]);
        assert_eq!(found.ttl_ms, -5);
        assert_eq!(&found.record[..], b"record");
        // An empty record still splits (the decoder then says what is wrong with it);
        // anything shorter than the head is not this crate's row.
        assert_eq!(&Found::split(vec![0; 40]).unwrap().record[..], b"");
        assert_eq!(Found::split(vec![0; 39]), None);
        assert_eq!(Found::split(Vec::new()), None);
    }

    #[test]
    fn the_preread_tells_a_row_from_the_probes_answer() {
        let mut packed = vec![7u8; 32];
        packed.extend_from_slice(&9i64.to_be_bytes());
        assert!(matches!(
            PreRead::parse(Some(packed)),
            PreRead::Row(Some(Found { ttl_ms: 9, .. }))
        ));
        // A row's pack is never shorter than `int8send`'s 8 bytes; one of 8 to 39 is a row
        // this crate did not write.
        assert_eq!(PreRead::parse(Some(vec![0; 8])), PreRead::Row(None));
        assert_eq!(PreRead::parse(Some(vec![0])), PreRead::Held);
        assert_eq!(PreRead::parse(Some(vec![1])), PreRead::Free);
        assert_eq!(PreRead::parse(None), PreRead::Free);
    }

    #[test]
    fn the_reserve_batch_quotes_the_setting_and_hexes_the_bytes() {
        let s = Statements::new(TableName::parse("idem").unwrap());
        let scope = tower_idempotency_core::ScopeHash::from_bytes([0xab; 32]);
        let fingerprint = tower_idempotency_core::Fingerprint::from_bytes([0xcd; 32]);
        let token = tower_idempotency_core::FencingToken::from_bytes([0x01; 16]);
        // Every batch here: lease 1500 ms, no idle limit.
        let batch_with = |failed, prepare, lock_timeout, session| {
            s.reserve_batch(
                failed,
                prepare,
                &scope,
                &fingerprint,
                token,
                1500,
                lock_timeout,
                session,
                None,
            )
        };
        let batch = batch_with(false, false, "'250ms'", Some("a'b\\c"));
        assert!(
            batch.starts_with(
                "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = '250ms'; "
            ),
            "{batch}"
        );
        assert!(
            batch.contains(&format!("EXECUTE {}(", s.reserve_name)),
            "{batch}"
        );
        for bytes in ["ab".repeat(32), "cd".repeat(32), "01".repeat(16)] {
            assert!(batch.contains(&format!("E'\\\\x{bytes}'")), "{batch}");
        }
        assert!(batch.contains(", 1500, NULL, "), "{batch}");
        // The session's own lock_timeout comes back last, once the `EXECUTE` reserved.
        assert!(
            batch.ends_with("); SET LOCAL lock_timeout = E'a''b\\\\c'"),
            "{batch}"
        );
        assert!(!batch.contains("DO $"), "{batch}");
        // Its only quotes are the literals' own: no value can end one early.
        assert_eq!(batch.matches('\'').count(), 2 + 2 * 4 + 2, "{batch}");
        let prepared = batch_with(true, true, "'1ms'", Some("0"));
        assert!(prepared.starts_with("ROLLBACK; BEGIN "), "{prepared}");
        assert!(prepared.contains(&*s.prepare), "{prepared}");
        // Without a pre-read (`reserve_first`), the session's default comes back.
        let first = batch_with(false, false, "'250ms'", None);
        assert!(
            first.ends_with("); SET LOCAL lock_timeout TO DEFAULT"),
            "{first}"
        );
        assert_eq!(first.matches('\'').count(), 2 + 2 * 3, "{first}");
    }

    #[test]
    fn statements_name_the_quoted_table_only() {
        let s = Statements::new(TableName::parse("app.idem").unwrap());
        for sql in [&s.reserve, &s.complete, &s.release, &s.renew, &s.purge] {
            assert!(sql.contains("\"app\".\"idem\""), "{sql}");
            assert!(!sql.contains("{t}"), "{sql}");
        }
        assert!(s
            .schema
            .contains("CREATE TABLE IF NOT EXISTS \"app\".\"idem\""));
        assert!(s
            .schema
            .contains("CREATE INDEX IF NOT EXISTS \"idem_expires_at_idx\" ON \"app\".\"idem\""));
    }
}
