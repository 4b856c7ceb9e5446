//! Tests of the checker, in one binary (each test binary links the example's whole crate
//! graph — axum, fred, sqlx — and on a 2-core machine every extra one costs a link).
//!
//! | module | what |
//! | --- | --- |
//! | `example` | the repository's example API (`examples/payments.rs`, compiled in with `#[path]`) on the memory, Redis and transactional Postgres stores: every check passes |
//! | `broken` | a small in-test server with one knob per rule: each broken rule is seen failing exactly its check |
//! | `cli` | the `idempotency-check` binary: `--help`, exit codes, `--json`, `--junit` |
//! | `support` | servers on free loopback ports, Redis and Postgres for the example |
//! | `pg_server` | `tests/it/support/pg_server.rs`, included: where Postgres is, or a throwaway cluster |
//!
//! The example runs in-process rather than as a spawned `target/debug/examples/payments`:
//! `cargo test -p idempotency-check` does not build examples of another package, and a
//! test that builds one itself would run cargo inside cargo. Compiled in, it is always the
//! example of this checkout.

// The example's code, driven by the tests (its `main` is not called).
#[path = "../../../../examples/payments.rs"]
#[allow(dead_code, unreachable_pub)]
mod payments;

// Where Postgres is: `tests/it`'s own file, so both test binaries follow one rule
// (`DATABASE_URL`, the shared server, or a throwaway cluster; see its docs).
#[path = "../../../../tests/it/support/pg_server.rs"]
mod pg_server;

mod broken;
mod cli;
mod example;
mod support;
