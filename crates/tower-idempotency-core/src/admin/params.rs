//! Naming one key from the query string: what the operator knows (method, path, key,
//! tenant) or the scope hash itself.

use http::{Method, Uri};
use serde::Deserialize;

use crate::fingerprint::ScopeHash;

/// The query parameters of every admin route. Unknown names are refused, so a typo
/// (`tennant=`) is a 400 rather than a silent lookup in the global scope.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyParams {
    method: Option<String>,
    path: Option<String>,
    key: Option<String>,
    tenant: Option<String>,
    tenant_hex: Option<String>,
    scope: Option<String>,
}

/// One key, as the admin routes name it: its scope hash, and what the operator gave to
/// build it (for the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) scope: ScopeHash,
    /// The method and path the operator named; `None` when they gave `scope=` directly.
    pub(super) route: Option<(Method, String)>,
}

/// Reads the key named by `uri`'s query string. The error is the `detail` of a 400.
pub(super) fn target(uri: &Uri) -> Result<Target, String> {
    // axum's `Query` parses with serde_urlencoded; its rejection text names the field.
    let params: KeyParams = axum::extract::Query::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| e.body_text())?;
    if let Some(scope) = &params.scope {
        let named = [
            ("method", params.method.is_some()),
            ("path", params.path.is_some()),
            ("key", params.key.is_some()),
            ("tenant", params.tenant.is_some()),
            ("tenant_hex", params.tenant_hex.is_some()),
        ];
        if let Some((name, _)) = named.iter().find(|(_, given)| *given) {
            return Err(format!(
                "`scope` names the key by itself: drop `{name}`, or drop `scope` and name the \
                 key by `path` and `key`"
            ));
        }
        let bytes = hex(scope)
            .filter(|b| b.len() == 32)
            .ok_or("`scope` must be 64 hex digits (the scope hash of the layer's DEBUG logs)")?;
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&bytes);
        return Ok(Target {
            scope: ScopeHash::from_bytes(raw),
            route: None,
        });
    }
    let (Some(path), Some(key)) = (&params.path, &params.key) else {
        return Err(
            "name the key by `path` and `key` (with `method`, default POST, and \
                    `tenant` or `tenant_hex` unless the route has a global scope), or by \
                    `scope`"
                .to_owned(),
        );
    };
    let method = match &params.method {
        None => Method::POST,
        Some(method) => coverable(method)?,
    };
    if !path.starts_with('/') {
        return Err(format!(
            "`path` must be the path the client sent, starting with `/` (got {path:?})"
        ));
    }
    let tenant = match (&params.tenant, &params.tenant_hex) {
        (Some(_), Some(_)) => return Err("give `tenant` or `tenant_hex`, not both".to_owned()),
        (Some(tenant), None) if tenant.is_empty() => {
            return Err("`tenant` is empty: omit it for a route with a global scope".to_owned())
        }
        (Some(tenant), None) => Some(tenant.clone().into_bytes()),
        (None, Some(raw)) => Some(hex(raw).filter(|b| !b.is_empty()).ok_or(
            "`tenant_hex` must be the tenant's bytes as an even number of hex digits (at least 2)",
        )?),
        (None, None) => None,
    };
    let scope = ScopeHash::for_key(tenant.as_deref(), &method, path, key)
        .map_err(|e| format!("`key` is not a valid idempotency key: {e}"))?;
    // The query part of a path is not part of the scope (`for_key` drops it): the audit
    // log names the path the scope was built from.
    let path = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
    Ok(Target {
        scope,
        route: Some((method, path.to_owned())),
    })
}

/// The methods a layer can cover (any case): a scope for another method never exists, so
/// naming one is a mistake worth a 400 rather than an "absent".
fn coverable(method: &str) -> Result<Method, String> {
    let upper = method.to_ascii_uppercase();
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE]
        .into_iter()
        .find(|m| m.as_str() == upper)
        .ok_or_else(|| {
            format!("`method` must be POST, PUT, PATCH or DELETE (got {method:?}): only those carry keys")
        })
}

/// Lowercase or uppercase hex digits to bytes; `None` for anything else.
pub(super) fn hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(query: &str) -> Result<Target, String> {
        target(&format!("/key?{query}").parse().unwrap())
    }

    #[test]
    fn builds_the_scope_the_layer_hashes() {
        let t = named("path=/v1/payments&key=k-1&tenant=alice").unwrap();
        let want = ScopeHash::new(Some(b"alice"), &Method::POST, "/v1/payments", b"k-1");
        assert_eq!(t.scope, want);
        assert_eq!(t.route, Some((Method::POST, "/v1/payments".to_owned())));
        // `tenant_hex` is the same bytes; a quoted key is the same key; the method's case
        // does not matter; a query on the path is ignored.
        let hexed =
            named("method=post&path=/v1/payments%3Fx%3D1&key=%22k-1%22&tenant_hex=616C696365");
        assert_eq!(hexed.unwrap().scope, want);
        let global = named("method=PATCH&path=/a&key=k").unwrap();
        assert_eq!(
            global.scope,
            ScopeHash::new(None, &Method::PATCH, "/a", b"k")
        );
    }

    #[test]
    fn takes_a_scope_hash_alone() {
        let scope = ScopeHash::new(None, &Method::POST, "/a", b"k");
        let t = named(&format!("scope={}", scope.to_hex())).unwrap();
        assert_eq!(t, Target { scope, route: None });
        let upper = named(&format!("scope={}", scope.to_hex().to_uppercase())).unwrap();
        assert_eq!(upper.scope, scope);
    }

    #[test]
    fn refuses_what_would_name_the_wrong_key() {
        for (query, says) in [
            ("", "name the key"),
            ("path=/a", "name the key"),
            ("key=k", "name the key"),
            ("path=/a&key=k&tennant=x", "unknown field"),
            ("path=/a&key=k&key=j", "duplicate field"),
            ("path=a&key=k", "starting with `/`"),
            ("path=/a&key=a+b", "not a valid idempotency key"),
            ("path=/a&key=", "not a valid idempotency key"),
            ("path=/a&key=k&method=GET", "POST, PUT, PATCH or DELETE"),
            ("path=/a&key=k&tenant=", "`tenant` is empty"),
            ("path=/a&key=k&tenant=a&tenant_hex=61", "not both"),
            ("path=/a&key=k&tenant_hex=6", "`tenant_hex`"),
            ("path=/a&key=k&tenant_hex=zz", "`tenant_hex`"),
            ("scope=abc", "64 hex digits"),
            (
                &format!("scope={}", "0".repeat(64) + "&key=k"),
                "drop `key`",
            ),
        ] {
            let err = named(query).expect_err(query);
            assert!(err.contains(says), "{query}: {err}");
        }
    }
}
