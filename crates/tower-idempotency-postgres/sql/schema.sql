-- The table of tower-idempotency-postgres, applied by `PostgresStore::migrate()`.
-- `{table}` and `{index}` are replaced by the store's (validated, quoted) names.
-- Every statement is idempotent: running it again changes nothing.
CREATE TABLE IF NOT EXISTS {table} (
    -- blake3 of tenant, method, path and key (32 bytes): raw keys and tenant ids never
    -- reach the database.
    scope bytea PRIMARY KEY,
    -- blake3 of the request payload (32 bytes).
    fingerprint bytea NOT NULL,
    -- 'pending': a lease held by `token`; 'completed': `record` is the response.
    state text NOT NULL CHECK (state IN ('pending', 'completed')),
    -- The owner's fencing token (16 random bytes).
    token bytea NOT NULL,
    -- The completed record, as the core's `Record::encode` writes it (never parsed here).
    record bytea,
    -- End of the lease (pending) or of the TTL (completed), by the database clock.
    expires_at timestamptz NOT NULL,
    -- A reserve answered "in flight" for this lease: notify on completion or release.
    waiter boolean NOT NULL DEFAULT false,
    -- A lease kept as "uncertain" past its lapse (a route that refuses uncertain keys):
    -- the end of the lease; `expires_at` is then the end of the time it is kept. NULL:
    -- the lease ends at `expires_at`.
    lease_until timestamptz,
    -- When the record was completed (or resolved by an operator): its age.
    completed_at timestamptz
);
-- Columns added after the first release (a no-op on a table created above).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS lease_until timestamptz,
    ADD COLUMN IF NOT EXISTS completed_at timestamptz;
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
