//! [`CheckReport`]: what [`RedisStore::check`](crate::RedisStore::check) found out about
//! the server.
//!
//! Two things decide whether Redis can keep the promise "a retry never runs the handler
//! twice": the server version (the scripts use sharded pub/sub, Redis 7.0+) and the
//! eviction policy. Under any policy but `noeviction` Redis deletes keys when memory is
//! full — the `volatile-*` policies included, because every key of this store has a TTL —
//! and an evicted record means the next retry runs the handler again: a duplicate charge.
//! With `noeviction` a full Redis refuses writes instead, and the layer answers 503.
//!
//! Managed services often disable or rename `CONFIG`; the report then says the policy
//! could not be verified (a warning, not an error).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use fred::interfaces::{ClientLike, ConfigInterface};
use fred::types::{InfoKind, Value};

use crate::error::{within, DisplayChain, RedisStoreError};

/// What [`RedisStore::check`](crate::RedisStore::check) found: the server version, the
/// `maxmemory-policy`, and warnings for anything that weakens the store's guarantees.
///
/// Its `Display` is a few human-readable lines, for a start-up log or a CLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    server_version: Option<String>,
    maxmemory_policy: Policy,
    warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Policy {
    Known(String),
    Unverified(String),
}

impl CheckReport {
    /// The server's `redis_version` from `INFO server`, if `INFO` answered.
    pub fn server_version(&self) -> Option<&str> {
        self.server_version.as_deref()
    }

    /// The `maxmemory-policy` from `CONFIG GET`, or `None` where it could not be read
    /// (`CONFIG` disabled or renamed, as on many managed services).
    pub fn maxmemory_policy(&self) -> Option<&str> {
        match &self.maxmemory_policy {
            Policy::Known(policy) => Some(policy),
            Policy::Unverified(_) => None,
        }
    }

    /// Everything that weakens the store's guarantees, one sentence each. Empty when the
    /// server is fit for use.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// `true` when there are no [`warnings`](Self::warnings).
    pub fn is_ok(&self) -> bool {
        self.warnings.is_empty()
    }

    fn new(server_version: Option<String>, maxmemory_policy: Policy) -> Self {
        let mut warnings = Vec::new();
        match server_version.as_deref().map(major_version) {
            Some(Some(major)) if major >= 7 => {}
            Some(_) => warnings.push(format!(
                "redis {} is older than 7.0: the store's scripts use SPUBLISH (sharded pub/sub) \
                 and fail on it",
                server_version.as_deref().unwrap_or("?")
            )),
            None => warnings.push(
                "cannot verify the redis version (INFO failed): the store needs redis 7.0 or newer"
                    .to_string(),
            ),
        }
        match &maxmemory_policy {
            Policy::Known(policy) if policy == "noeviction" => {}
            Policy::Known(policy) => warnings.push(format!(
                "maxmemory-policy is {policy}, not noeviction: when memory is full redis evicts \
                 keys (the volatile-* policies too, since every idempotency key has a TTL), and \
                 an evicted record lets a retry run the handler again (a duplicate charge); \
                 set `maxmemory-policy noeviction` so a full redis refuses writes (503) instead"
            )),
            Policy::Unverified(reason) => warnings.push(format!(
                "cannot verify maxmemory-policy ({reason}); make sure it is noeviction: any \
                 other policy can evict idempotency records, and an evicted record lets a \
                 retry run the handler again"
            )),
        }
        CheckReport {
            server_version,
            maxmemory_policy,
            warnings,
        }
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.server_version {
            Some(version) => writeln!(f, "redis version: {version}")?,
            None => writeln!(f, "redis version: unknown")?,
        }
        match &self.maxmemory_policy {
            Policy::Known(policy) => write!(f, "maxmemory-policy: {policy}")?,
            Policy::Unverified(reason) => write!(f, "maxmemory-policy: cannot verify ({reason})")?,
        }
        for warning in &self.warnings {
            write!(f, "\nwarning: {warning}")?;
        }
        Ok(())
    }
}

fn major_version(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

/// `redis_version` from the text of `INFO server`.
fn parse_version(info: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_string())
}

/// Runs the checks, each command bounded by `timeout`. Only an unreachable server (no
/// answer to `PING`) is an error.
pub(crate) async fn run<C>(client: &C, timeout: Duration) -> Result<CheckReport, RedisStoreError>
where
    C: ClientLike + ConfigInterface,
{
    within(timeout, client.ping::<Value>(None)).await?;
    let version = match within(timeout, client.info::<String>(Some(InfoKind::Server))).await {
        Ok(info) => parse_version(&info),
        Err(err) => {
            tracing::debug!(error = %DisplayChain(&err), "INFO server failed");
            None
        }
    };
    let policy = match within(
        timeout,
        client.config_get::<HashMap<String, String>, _>("maxmemory-policy"),
    )
    .await
    {
        Ok(map) => match map.get("maxmemory-policy") {
            Some(policy) => Policy::Known(policy.clone()),
            None => Policy::Unverified("CONFIG GET returned no value".to_string()),
        },
        Err(err) => Policy::Unverified(format!("CONFIG GET failed: {}", DisplayChain(&err))),
    };
    Ok(CheckReport::new(version, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_version_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(parse_version(info).as_deref(), Some("7.0.15"));
        assert_eq!(parse_version("# Server\r\n"), None);
        assert_eq!(major_version("7.0.15"), Some(7));
        assert_eq!(major_version("x"), None);
    }

    #[test]
    fn warns_unless_noeviction_on_redis_7() {
        let ok = CheckReport::new(Some("7.2.4".into()), Policy::Known("noeviction".into()));
        assert!(ok.is_ok(), "{ok}");
        assert_eq!(ok.maxmemory_policy(), Some("noeviction"));

        for policy in ["allkeys-lru", "volatile-lru", "volatile-ttl"] {
            let report = CheckReport::new(Some("7.0.15".into()), Policy::Known(policy.into()));
            assert_eq!(report.warnings().len(), 1, "{report}");
            assert!(report.warnings()[0].contains(policy));
            assert!(report.to_string().contains("warning: maxmemory-policy"));
        }

        let managed = CheckReport::new(
            Some("7.0.15".into()),
            Policy::Unverified("CONFIG GET failed: ERR unknown command".into()),
        );
        assert_eq!(managed.maxmemory_policy(), None);
        assert!(managed.to_string().contains("cannot verify"), "{managed}");

        let old = CheckReport::new(Some("6.2.14".into()), Policy::Known("noeviction".into()));
        assert!(old.warnings()[0].contains("older than 7.0"), "{old}");
    }
}
