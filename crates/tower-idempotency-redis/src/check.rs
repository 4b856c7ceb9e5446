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
//!
//! A third thing decides how fast waiters ([`InFlight::Wait`]) learn of a completion:
//! whether the store's user may publish on its channels. A Redis 7 ACL user created
//! without channel rules (`acl-pubsub-default resetchannels`, the default) gets `NOPERM`
//! on every `SPUBLISH`. The scripts publish best effort, so nothing fails, but waiters
//! then fall back to polling (20 ms → 250 ms); the report warns. It finds out with one
//! `SPUBLISH` on a probe channel under the store's prefix, which no waiter listens to.
//!
//! [`InFlight::Wait`]: tower_idempotency_core::InFlight::Wait

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use fred::interfaces::{ClientLike, ConfigInterface};
use fred::types::{ClusterHash, CustomCommand, InfoKind, Value};

use crate::error::{within, DisplayChain, RedisStoreError};

/// What [`RedisStore::check`](crate::RedisStore::check) found: the server version, the
/// `maxmemory-policy`, whether the store may publish on its channels, and warnings for
/// anything that weakens the store's guarantees or its waiters' wake-ups.
///
/// Its `Display` is a few human-readable lines, for a start-up log or a CLI. See the
/// [crate docs](crate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    server_version: Option<String>,
    maxmemory_policy: Policy,
    publish: Publish,
    warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Policy {
    Known(String),
    Unverified(String),
}

/// What the probe `SPUBLISH` answered.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Publish {
    Allowed,
    /// `NOPERM`; the store's key prefix, for the hint in the warning.
    Denied {
        prefix: String,
    },
    /// Any other error (its text): not known either way.
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

    /// Whether the store's user may publish on the store's channels: `Some(false)` when
    /// the probe `SPUBLISH` was refused with `NOPERM` (an ACL user without channel
    /// permissions; waiters then wake by polling), `None` when the probe failed otherwise
    /// (e.g. `SPUBLISH` renamed, or a server older than 7.0).
    pub fn can_publish(&self) -> Option<bool> {
        match self.publish {
            Publish::Allowed => Some(true),
            Publish::Denied { .. } => Some(false),
            Publish::Unverified(_) => None,
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

    fn new(server_version: Option<String>, maxmemory_policy: Policy, publish: Publish) -> Self {
        let mut warnings = Vec::new();
        let major = server_version.as_deref().map(major_version);
        match major {
            Some(Some(major)) if major >= 7 => {}
            Some(_) => warnings.push(format!(
                "redis {} is older than 7.0: the store needs sharded pub/sub (SPUBLISH, \
                 SSUBSCRIBE) to wake waiters and is not tested on older servers",
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
        match &publish {
            Publish::Allowed => {}
            Publish::Denied { prefix } => warnings.push(format!(
                "cannot publish on the store's channels (ACL): waiters fall back to polling; \
                 grant the store's user its channels, e.g. `ACL SETUSER <user> &{prefix}*`"
            )),
            // An old server fails the probe for want of SPUBLISH: the version warning
            // already says what matters.
            Publish::Unverified(_) if matches!(major, Some(Some(m)) if m < 7) => {}
            Publish::Unverified(reason) => warnings.push(format!(
                "cannot verify that the store may publish on its channels ({reason}); if it \
                 may not, waiters fall back to polling"
            )),
        }
        CheckReport {
            server_version,
            maxmemory_policy,
            publish,
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
            Policy::Known(policy) => writeln!(f, "maxmemory-policy: {policy}")?,
            Policy::Unverified(reason) => {
                writeln!(f, "maxmemory-policy: cannot verify ({reason})")?
            }
        }
        match &self.publish {
            Publish::Allowed => write!(f, "publish on channels: yes")?,
            Publish::Denied { .. } => write!(f, "publish on channels: no (NOPERM, ACL)")?,
            Publish::Unverified(reason) => {
                write!(f, "publish on channels: cannot verify ({reason})")?
            }
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

/// Whether `err` is Redis refusing a command for want of an ACL permission.
pub(crate) fn is_noperm(err: &RedisStoreError) -> bool {
    matches!(err, RedisStoreError::Redis(err) if err.details().starts_with("NOPERM"))
}

/// Runs the checks, each command bounded by `timeout`. Only an unreachable server (no
/// answer to `PING`) is an error. `probe_channel` is a channel under the store's
/// `prefix` that nobody listens to, for one `SPUBLISH`.
pub(crate) async fn run<C>(
    client: &C,
    timeout: Duration,
    prefix: &str,
    probe_channel: String,
) -> Result<CheckReport, RedisStoreError>
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
    // A custom command, so any `ClientLike` (a pool too) can send it; on a cluster it is
    // routed by the channel's slot, as SPUBLISH must be.
    let spublish = CustomCommand::new_static("SPUBLISH", ClusterHash::FirstKey, false);
    let args = vec![Value::from(probe_channel), Value::from("check")];
    let publish = match within(timeout, client.custom::<Value, _>(spublish, args)).await {
        Ok(_) => Publish::Allowed,
        Err(err) if is_noperm(&err) => Publish::Denied {
            prefix: prefix.to_string(),
        },
        Err(err) => Publish::Unverified(format!("SPUBLISH failed: {}", DisplayChain(&err))),
    };
    Ok(CheckReport::new(version, policy, publish))
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
        let ok = CheckReport::new(
            Some("7.2.4".into()),
            Policy::Known("noeviction".into()),
            Publish::Allowed,
        );
        assert!(ok.is_ok(), "{ok}");
        assert_eq!(ok.maxmemory_policy(), Some("noeviction"));

        for policy in ["allkeys-lru", "volatile-lru", "volatile-ttl"] {
            let report = CheckReport::new(
                Some("7.0.15".into()),
                Policy::Known(policy.into()),
                Publish::Allowed,
            );
            assert_eq!(report.warnings().len(), 1, "{report}");
            assert!(report.warnings()[0].contains(policy));
            assert!(report.to_string().contains("warning: maxmemory-policy"));
        }

        let managed = CheckReport::new(
            Some("7.0.15".into()),
            Policy::Unverified("CONFIG GET failed: ERR unknown command".into()),
            Publish::Allowed,
        );
        assert_eq!(managed.maxmemory_policy(), None);
        assert!(managed.to_string().contains("cannot verify"), "{managed}");

        let old = CheckReport::new(
            Some("6.2.14".into()),
            Policy::Known("noeviction".into()),
            Publish::Allowed,
        );
        assert!(old.warnings()[0].contains("older than 7.0"), "{old}");
    }

    #[test]
    fn warns_when_the_store_may_not_publish() {
        let ok = CheckReport::new(
            Some("7.0.15".into()),
            Policy::Known("noeviction".into()),
            Publish::Allowed,
        );
        assert_eq!(ok.can_publish(), Some(true));
        assert!(ok.to_string().contains("publish on channels: yes"), "{ok}");

        let denied = CheckReport::new(
            Some("7.0.15".into()),
            Policy::Known("noeviction".into()),
            Publish::Denied {
                prefix: "idem:".into(),
            },
        );
        assert_eq!(denied.can_publish(), Some(false));
        assert_eq!(denied.warnings().len(), 1, "{denied}");
        assert!(
            denied.warnings()[0].contains(
                "cannot publish on the store's channels (ACL): waiters fall back to polling"
            ),
            "{denied}"
        );
        assert!(denied.warnings()[0].contains("&idem:*"), "{denied}");

        let unknown = CheckReport::new(
            Some("7.0.15".into()),
            Policy::Known("noeviction".into()),
            Publish::Unverified("SPUBLISH failed: ERR unknown command".into()),
        );
        assert_eq!(unknown.can_publish(), None);
        assert!(unknown.warnings()[0].contains("cannot verify"), "{unknown}");

        // On a server too old for SPUBLISH the version warning is the one that matters.
        let old = CheckReport::new(
            Some("6.2.14".into()),
            Policy::Known("noeviction".into()),
            Publish::Unverified("SPUBLISH failed: ERR unknown command".into()),
        );
        assert_eq!(old.warnings().len(), 1, "{old}");
    }
}
