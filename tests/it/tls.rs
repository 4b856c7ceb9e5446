//! TLS through the facade's features alone (`redis-rustls`, `postgres-rustls`): a
//! `rediss://` URL really speaks TLS to a TLS-only Redis port, and `sslmode=require`
//! really encrypts the Postgres connection.
#![cfg(all(feature = "redis-rustls", feature = "postgres-rustls"))]

use crate::support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tower_idempotency::postgres::sqlx;
use tower_idempotency::postgres::PostgresStore;
use tower_idempotency::redis::fred::prelude::{ClientLike, Config};
use tower_idempotency::redis::fred::types::config::{TlsConfig, TlsConnector};
use tower_idempotency::redis::fred::types::Builder;
use tower_idempotency::redis::RedisStore;
use tower_idempotency::store::{FencingToken, Fingerprint, Reservation, ScopeHash};
use tower_idempotency::Store;

/// A test CA (`ca.pem`) and a server certificate it signed for 127.0.0.1 (as an IP
/// subject alternative name, which is what rustls checks): `cert.pem`, `key.pem` in `dir`.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the TLS tests need the `openssl` command (Debian: apt-get install openssl)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
    ]
    .iter()
    .copied()
    .chain([
        "-subj",
        "/CN=tidem test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    ])
    .collect::<Vec<_>>());
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
    ]
    .iter()
    .copied()
    .chain(["-keyout", "key.pem", "-out", "server.csr"])
    .collect::<Vec<_>>());
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("san.ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
    ]
    .iter()
    .copied()
    .chain([
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "cert.pem",
    ])
    .collect::<Vec<_>>());
}

/// A rustls client config that trusts only the test CA.
fn trusting(cert: &Path) -> rustls::ClientConfig {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert).expect("read cert.pem") {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a usable root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A Redis whose TLS port is the only way in for these tests: `rediss://` with the
/// default roots fails on the certificate (so TLS was spoken, not refused as plain
/// text), and with the test's CA the store connects, loads its scripts and reserves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_speaks_tls_through_the_facade() {
    let certs = tempdir("tls-redis");
    certificates(&certs);
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let path = |f: &str| certs.join(f).to_string_lossy().into_owned();
    let server = support::redis::RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &path("cert.pem"),
        "--tls-key-file",
        &path("key.pem"),
        "--tls-ca-cert-file",
        &path("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");

    let untrusted = RedisStore::from_url(&url).expect("a rediss URL parses");
    let err = tokio::time::timeout(Duration::from_secs(20), untrusted.init())
        .await
        .expect("init gives up by itself")
        .expect_err("the test CA is not trusted by default");
    let chain = support::error_chain(&err).to_lowercase();
    assert!(
        chain.contains("certif") || chain.contains("tls") || chain.contains("handshake"),
        "{chain}"
    );

    let mut config = Config::from_url(&url).expect("config");
    config.tls = Some(TlsConfig::from(TlsConnector::from(trusting(
        &certs.join("ca.pem"),
    ))));
    let client = Builder::from_config(config).build().expect("client");
    tokio::time::timeout(Duration::from_secs(10), client.init())
        .await
        .expect("connects")
        .expect("TLS handshake with the test CA");
    let store = RedisStore::new(client)
        .prefix(support::unique_prefix("tls"))
        .init()
        .await
        .expect("scripts and check over TLS");
    let scope = ScopeHash::from_bytes([7; 32]);
    let fp = Fingerprint::from_bytes([8; 32]);
    let answer = store
        .reserve(
            &scope,
            &fp,
            FencingToken::generate(),
            Duration::from_secs(5).into(),
        )
        .await
        .expect("reserve over TLS");
    assert_eq!(answer, Reservation::Reserved);
    drop(server);
    let _ = std::fs::remove_dir_all(&certs);
}

/// `sslmode=require` on the test Postgres (the shared server has `ssl = on`; a
/// throwaway cluster gets a self-signed certificate): the store's connections are
/// encrypted.
#[tokio::test]
async fn postgres_sslmode_require_encrypts() {
    let schema = support::postgres::TestSchema::create().await;
    let url = format!(
        "{}?sslmode=require&options=-c%20search_path%3D{}",
        support::postgres::database_url(),
        schema.name
    );
    let store = PostgresStore::connect(&url)
        .await
        .expect("connects with sslmode=require");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the connection is encrypted");
    store.pool().close().await;
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(support::unique_prefix(name).replace(':', "-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
