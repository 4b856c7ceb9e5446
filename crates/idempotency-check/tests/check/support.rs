//! Servers on free loopback ports, the checker's settings for them, and the shared Redis
//! and Postgres the example's store modes need.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use idempotency_check::{Check, Config, InFlightMode, Report, Verdict};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_idempotency::Store;

use crate::payments;

/// The body of one payment.
pub const BODY: &str = r#"{"amount": 1000, "currency": "EUR"}"#;

/// A payment that takes `ms` milliseconds.
pub fn slow_body(ms: u64) -> String {
    format!(r#"{{"amount": 1000, "currency": "EUR", "delay_ms": {ms}}}"#)
}

/// A name no other test or run uses: `<pid>_<nanos>_<n>`.
pub fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A server on `127.0.0.1:<free port>`, shut down (gracefully) by [`Server::stop`] or,
/// without waiting, on drop.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `app`.
    pub async fn router(app: Router) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Server {
            addr,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Serves the example API on `store` and `state`, with `POST /payments` responses
    /// kept for `ttl`, as `cargo run --example payments` does (graceful shutdown
    /// included).
    pub async fn example<St: Store>(store: St, state: payments::AppState, ttl: Duration) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = payments::Config {
            bind: addr,
            payments_ttl: ttl,
            shutdown_grace: Duration::from_secs(10),
            ..payments::Config::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            payments::serve_until_on(listener, store, state, config, shutdown)
                .await
                .unwrap();
        });
        Server {
            addr,
            stop: Some(stop),
            done: Some(done),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and waits (bounded) until it has shut down.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(20), done)
                .await
                .expect("the server shuts down within 20 s")
                .unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The checker's settings for the example's `POST /payments` on `server` (or a server
/// with the same API): alice and bob, counts from `GET /payments`, in flight `wait`.
pub fn payments_config(server: &Server, slow_ms: u64) -> Config {
    let url = server.url("/payments");
    Config::new(&url, BODY)
        .unwrap()
        .slow_body(slow_body(slow_ms))
        .header_line("Authorization: Bearer alice")
        .unwrap()
        .other_tenant_header_line("Authorization: Bearer bob")
        .unwrap()
        .executions_url(&url)
        .unwrap()
        .in_flight(InFlightMode::Wait)
}

/// Panics, showing the report, unless every check passed (no warning, no skip).
pub fn assert_all_pass(report: &Report) {
    let not_passed: Vec<Check> = report
        .outcomes
        .iter()
        .filter(|o| o.verdict != Verdict::Pass)
        .map(|o| o.check)
        .collect();
    assert!(
        not_passed.is_empty() && report.outcomes.len() == Check::ALL.len(),
        "not passed: {not_passed:?}\n{report}"
    );
}

/// Panics, showing the report, unless exactly `failed` failed.
pub fn assert_fails_exactly(report: &Report, failed: &[Check]) {
    let mut got = report.with(Verdict::Fail);
    got.sort_by_key(|c| c.id());
    let mut want = failed.to_vec();
    want.sort_by_key(|c| c.id());
    assert_eq!(got, want, "failed checks\n{report}");
    assert_eq!(report.exit_code(), 1);
}

/// `REDIS_URL`, else `redis://127.0.0.1:6379`, which must answer (never a silent skip).
pub async fn redis_url() -> String {
    let url = match std::env::var("REDIS_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => "redis://127.0.0.1:6379".to_string(),
    };
    let reachable = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect("127.0.0.1:6379"),
    )
    .await;
    if std::env::var("REDIS_URL").is_err() {
        assert!(
            matches!(reachable, Ok(Ok(_))),
            "no Redis at 127.0.0.1:6379: set REDIS_URL or `docker compose up -d redis`"
        );
    }
    url
}

/// Where Postgres is, found once per process by the rule of `tests/it` (the same file,
/// [`crate::pg_server`]): `DATABASE_URL` if it answers, else the shared server at
/// 127.0.0.1:5432, else a throwaway cluster; panics with the hint otherwise.
pub fn database_url() -> String {
    crate::pg_server::database_url()
}

/// A Postgres schema of one test's own, dropped with everything in it on drop (also when
/// the test panics).
pub struct Schema {
    pub name: String,
}

impl Schema {
    pub async fn create() -> Schema {
        use tower_idempotency_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
        let name = format!("ic_{}", unique());
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            PgConnection::connect(&database_url()),
        )
        .await
        .expect("Postgres answers within 5 s (DATABASE_URL, or `docker compose up -d postgres`)")
        .expect("connect to Postgres");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        Schema { name }
    }

    /// [`database_url`] with this schema as the connection's `search_path`.
    pub fn url(&self) -> String {
        let base = database_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-c%20search_path%3D{}", self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own, on a thread of its own: Drop may run inside the test's.
        let dropped = std::thread::spawn(move || {
            use tower_idempotency_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&database_url()).await.ok()?;
                let drop = format!("DROP SCHEMA IF EXISTS {name} CASCADE");
                let done = tokio::time::timeout(
                    Duration::from_secs(10),
                    sqlx::raw_sql(AssertSqlSafe(drop)).execute(&mut conn),
                )
                .await;
                let _ = conn.close().await;
                matches!(done, Ok(Ok(_))).then_some(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!(
                "could not drop the test schema {}: drop it by hand",
                self.name
            );
        }
    }
}
