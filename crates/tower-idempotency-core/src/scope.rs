//! What a request's scope is made of: the tenant (from the policy's resolver), the full
//! path the client sent, and the route template for metric labels.

use std::borrow::Cow;

use http::request::Parts;

use crate::policy::{Policy, Tenant};

/// The tenant part of the scope: `Ok(None)` is the global scope, `Err(())` a resolver
/// that found no tenant for this request.
pub(crate) fn tenant<'a>(policy: &Policy, parts: &'a Parts) -> Result<Option<Cow<'a, [u8]>>, ()> {
    match &policy.tenant {
        Tenant::Global => Ok(None),
        Tenant::Resolver(resolve) => resolve(parts).map(Some).ok_or(()),
        // A layer without a tenant source is refused when it is applied.
        Tenant::Unset => Err(()),
    }
}

/// The full path the client sent: nested routers strip their prefix from the URI, so
/// axum's `OriginalUri` wins when present. Read whatever the crate's features: the scope
/// hash of a request must never depend on them (SPEC section 4).
pub(crate) fn scope_path(parts: &Parts) -> &str {
    if let Some(original) = parts.extensions.get::<axum::extract::OriginalUri>() {
        return original.0.path();
    }
    parts.uri.path()
}

/// The route template for metric labels, never the raw path (unbounded cardinality).
pub(crate) fn route_label(parts: &Parts) -> &str {
    #[cfg(feature = "axum")]
    if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
        return matched.as_str();
    }
    let _ = parts;
    "unmatched"
}
