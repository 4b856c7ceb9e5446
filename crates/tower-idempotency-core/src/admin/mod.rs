//! An axum router for operators: see, forget and resolve one idempotency key (feature
//! `admin`; SPEC section 11).
//!
//! In an incident an operator needs to know what the store holds for one client's key and
//! to act on it, without reading Redis hashes or `bytea` columns: is it running, what did
//! it answer, did its server die half way? [`AdminRouter`] answers that over HTTP with
//! JSON, on the store's [`inspect`](crate::Store::inspect), [`forget`](crate::Store::forget)
//! and [`resolve`](crate::Store::resolve). Mount it under a path of your choice, behind
//! your own admin authentication, which puts who acts in the request's extensions; every
//! action, refused ones included, is logged as an audit event.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use axum::{body::Body, http::{Request, StatusCode}, Extension, Router};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_idempotency_core::admin::AdminRouter;
//! use tower_idempotency_core::MemoryStore;
//!
//! /// Who acts: what your admin auth layer puts in the request's extensions.
//! #[derive(Clone)]
//! struct Operator(String);
//! impl AsRef<str> for Operator {
//!     fn as_ref(&self) -> &str { &self.0 }
//! }
//!
//! let store = MemoryStore::default(); // the store your idempotency layers use
//! let admin = AdminRouter::new(store).actor_from_extension::<Operator>();
//! let app: Router = Router::new()
//!     .nest("/admin/idempotency", admin.into_router())
//!     // Stands for your admin auth, which checks credentials and sets `Operator`.
//!     .layer(Extension(Operator("alice@ops".into())));
//!
//! let uri = "/admin/idempotency/key?tenant=acme&path=/payments&key=k-1";
//! let response = app.oneshot(Request::get(uri).body(Body::empty())?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! let body = response.into_body().collect().await?.to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(json["state"], "absent");
//! # Ok(()) }
//! # #[cfg(not(feature = "memory"))] fn main() {}
//! ```
//!
//! # Routes
//!
//! Relative to where the router is mounted. Each names one key by its query string
//! (below) and answers JSON, or an `application/problem+json` error.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /key?..` | 200 what the store holds for the key |
//! | `DELETE /key?..` | 200 `{"scope", "forgotten": true}`, or `false` if there was nothing: the next request with the key runs |
//! | `PUT /key?..` with a JSON answer | 200 `{"scope", "resolved": true}`: from now on retries get that answer; 404 for a key with no record, 409 while a request holds it |
//!
//! ## Naming a key
//!
//! The scope is built with [`ScopeHash::for_key`](crate::ScopeHash::for_key), exactly as
//! the layer hashes a request:
//!
//! | parameter | meaning |
//! | --- | --- |
//! | `method` | the request's method: `POST` (the default), `PUT`, `PATCH` or `DELETE` |
//! | `path` | the full path the client sent, as it sent it (percent-encoding included), with any prefix of nested routers; a query string is ignored |
//! | `key` | the `Idempotency-Key` as the client sent it (bare, or a quoted sf-string) |
//! | `tenant` | the tenant as UTF-8: what the layer's tenant source yields (e.g. the extension of `.tenant_from_extension::<T>()`) |
//! | `tenant_hex` | the tenant's bytes in hex, for byte tenants (a UUID's 16 bytes from `.tenant_from_extension_with(..)`) |
//! | `scope` | instead of all the above: the 64 hex digits of the scope hash, as the layer's DEBUG logs show it |
//!
//! No tenant names a route with `.global_scope()`. Unknown or repeated parameters are
//! refused (400), so a misspelt `tennant=` never looks in the global scope. Values are
//! form-encoded, so a `+` in a key must be sent as `%2B` (it would arrive as a space):
//! with curl 7.87 or later, `--url-query key=...` encodes each value (`-G
//! --data-urlencode` does too, but turns a `PUT`'s JSON body into query parameters).
//!
//! ## `GET`: what the store holds
//!
//! Every answer has `scope` (hex) and `state`; durations are milliseconds, and `null`
//! where the store cannot tell (transactional Postgres does not see an uncommitted
//! owner):
//!
//! | `state` | fields | the next request with the key |
//! | --- | --- | --- |
//! | `absent` | — | runs |
//! | `in_flight` | `owner` (fencing token, hex), `lease_remaining_ms` | waits or gets 409 `request-in-flight` |
//! | `completed` | `status`, `headers` (names only, in order), `body_bytes`, `age_ms`, `expires_in_ms` | gets the stored response |
//! | `not_replayable` | `age_ms`, `expires_in_ms` | gets 409 `response-not-replayable` |
//! | `uncertain` | `owner`, `lapsed_for_ms`, `expires_in_ms` | gets 409 `operation-uncertain` |
//!
//! Header values and the body are not shown: they are the client's data (and may carry
//! its personal data into a ticket or a chat), and an operator deciding what to do with
//! a key needs the status and the size.
//!
//! ## `PUT`: the operator's answer
//!
//! `Content-Type: application/json`, at most [`MAX_ANSWER_BYTES`], either a response:
//!
//! ```json
//! {"status": 201, "headers": [["content-type", "application/json"]], "body": "{\"id\":\"pay_1\"}"}
//! ```
//!
//! (`body` as UTF-8 text, or `body_base64` for bytes; `headers` optional, repeated names
//! allowed, and those the layer never stores — hop-by-hop, `Content-Length`,
//! `Set-Cookie`, `Date` — refused), or `{"not_replayable": true}` (retries get 409
//! `response-not-replayable`: the operation happened and cannot be answered again). Both
//! take an optional `ttl_secs` (default [`AdminRouter::resolve_ttl`], 24 h). The record
//! keeps the fingerprint of the request that first used the key, so a retry with another
//! payload still gets 422. The store refuses a key with no record (404: nothing tells
//! what payload it belonged to; the next request simply runs) and one a live request
//! holds (409: wait for it; once its lease lapsed it can be resolved). A completed key
//! can be resolved too, to correct its answer. With the Redis store's local replay tier,
//! other processes may replay their cached copy of a corrected answer until it lapses.
//!
//! ## Errors
//!
//! | `type` slug | status | when |
//! | --- | --- | --- |
//! | [`actor-missing`](#actor-missing) | 403 | the request has no operator (see [`AdminRouter::actor_from_extension`]) |
//! | [`invalid-request`](#invalid-request) | 400 | a parameter or the answer is invalid |
//! | [`unsupported-media-type`](#unsupported-media-type) | 415 | a `PUT` body that is not `application/json` |
//! | [`request-too-large`](#request-too-large) | 413 | a `PUT` body over [`MAX_ANSWER_BYTES`] |
//! | [`key-absent`](#key-absent) | 404 | `PUT` of a key with no record |
//! | [`key-in-flight`](#key-in-flight) | 409 | `PUT` of a key a live request holds |
//! | [`not-supported`](#not-supported) | 501 | the store does not offer the operation ([`StoreError::Unsupported`]) |
//! | [`store-unavailable`](#store-unavailable) | 503 | the store failed (its cause chain is logged) |
//!
//! # Audit log
//!
//! Every request to the router, refused ones included, is one INFO event with target
//! [`AUDIT_TARGET`] (`tower_idempotency::audit`), so a subscriber can route the audit
//! trail on its own (`RUST_LOG=tower_idempotency::audit=info`). With
//! `tracing-subscriber`'s fmt layer:
//!
//! ```text
//! INFO tower_idempotency::audit: idempotency admin action actor="alice@ops" action=resolve
//!   scope=5c1e…9a0b method=POST path="/payments" answer=201 ttl_secs=86400
//!   result=resolved status=200
//! ```
//!
//! - `actor`: who acted (absent when refused for having none); `action`: `inspect`,
//!   `forget` or `resolve`;
//! - `scope`, and `method` and `path` when the key was named by them (absent when the
//!   request could not name a key);
//! - `answer` (the stored status, or `not_replayable`) and `ttl_secs`, for `resolve`;
//! - `result`: the state seen (`absent`, `in_flight`, `completed`, `not_replayable`,
//!   `uncertain`) for `inspect`; `forgotten` or `absent` for `forget`; `resolved`,
//!   `absent` or `in_flight` for `resolve`; else why it was refused: `no_actor`,
//!   `invalid_request`, `unsupported_media_type`, `request_too_large`, `unsupported`,
//!   `store_error`; and `status`, the HTTP status answered.
//!
//! The key and the tenant are never logged (as everywhere in this crate): the scope hash
//! pins them exactly — anyone who knows a tenant and a key can recompute it with
//! `ScopeHash::for_key` and find every action on that key — while the log does not become
//! a list of clients' keys and ids. `actor` and `path` are written escaped (Debug), so a
//! value with a line break cannot forge a second event.
//!
//! # actor-missing
//!
//! Status 403. The request reached the router without an operator: the extension that
//! [`AdminRouter::actor_from_extension`] (or the closure of [`AdminRouter::actor`]) reads
//! is missing or empty. Usually the router is mounted outside the auth layer that sets
//! it. An action nobody can be held to account for is what an audit trail exists to
//! prevent, so it is refused rather than logged as "unknown". Nothing was read or changed.
//!
//! # invalid-request
//!
//! Status 400. A query parameter (see [Naming a key](#naming-a-key)) or the `PUT` answer is
//! invalid; `detail` says which and why. Nothing was read or changed.
//!
//! # unsupported-media-type
//!
//! Status 415. A `PUT` body must be `Content-Type: application/json`. Nothing was changed.
//!
//! # request-too-large
//!
//! Status 413. A `PUT` body is larger than [`MAX_ANSWER_BYTES`]. Nothing was changed.
//!
//! # key-absent
//!
//! Status 404. `PUT` of a key with no record: never used, forgotten, or expired. Nothing
//! tells which payload it belonged to, so there is nothing to resolve; the next request
//! with the key runs.
//!
//! # key-in-flight
//!
//! Status 409. `PUT` of a key that a live request holds: its answer is on the way. Wait
//! for it (`GET` shows the lease left); once its lease lapsed without an answer the key is
//! `uncertain` and can be resolved.
//!
//! # not-supported
//!
//! Status 501. The store does not offer this operation (a custom [`Store`] that does not
//! implement [`inspect`](Store::inspect), [`forget`](Store::forget) or
//! [`resolve`](Store::resolve)).
//!
//! # store-unavailable
//!
//! Status 503. The store failed; the error, with its cause chain, is logged at ERROR.
//! Nothing is known to have changed: retry.

mod answer;
mod params;
mod reply;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use crate::fingerprint::ScopeHash;
use crate::observe::DisplayChain;
use crate::policy::MAX_TTL;
use crate::record::Record;
use crate::store::{KeyState, Resolved, Store, StoreError};

pub use reply::PROBLEM_TYPE_BASE;

/// How long a resolved answer is kept unless [`AdminRouter::resolve_ttl`] or the
/// request's `ttl_secs` says otherwise: 24 hours, the layer's default TTL.
pub const DEFAULT_RESOLVE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The largest `PUT` body: 16 MiB, room for the layer's default stored-response limit
/// (4 MiB) in base64 with its JSON around it.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// The `tracing` target of the audit events.
pub const AUDIT_TARGET: &str = "tower_idempotency::audit";

/// Who acts, from the request's parts.
type ActorSource = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// The admin router's configuration: the store, who acts, and how long resolved answers
/// are kept. [`into_router`](Self::into_router) makes the axum [`Router`] to mount.
///
/// See the [module docs](self) for the routes, the JSON and an example.
#[derive(Clone)]
pub struct AdminRouter<St> {
    store: St,
    resolve_ttl: Duration,
    actor: Option<ActorSource>,
}

/// Why an [`AdminRouter`] cannot be built; [`AdminRouter::into_router`] panics with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminConfigError {
    /// Neither `.actor_from_extension::<T>()` nor `.actor(..)` was called.
    #[error(
        "tower-idempotency admin: the router was not told who acts; call \
         `.actor_from_extension::<T>()` with the extension your admin auth sets (or \
         `.actor(|parts| ..)`), so that every action is audited with its operator"
    )]
    ActorNotConfigured,
    /// The resolve TTL is zero or longer than [`MAX_TTL`].
    #[error("tower-idempotency admin: `.resolve_ttl({0:?})` must be positive and at most MAX_TTL (ten years)")]
    ResolveTtlOutOfRange(Duration),
}

impl<St: Store> AdminRouter<St> {
    /// A router on `store`: the same store (or a clone) the idempotency layers use. Tell
    /// it who acts ([`actor_from_extension`](Self::actor_from_extension)) before
    /// [`into_router`](Self::into_router).
    pub fn new(store: St) -> Self {
        AdminRouter {
            store,
            resolve_ttl: DEFAULT_RESOLVE_TTL,
            actor: None,
        }
    }

    /// How long a resolved answer is kept when the `PUT` has no `ttl_secs`. Default
    /// [`DEFAULT_RESOLVE_TTL`] (24 h); at most [`MAX_TTL`].
    pub fn resolve_ttl(mut self, ttl: Duration) -> Self {
        self.resolve_ttl = ttl;
        self
    }

    /// Who acts is the request extension `T` that your admin auth layer sets (an operator's
    /// name or id, as it should appear in the audit log). A request without it, or with
    /// an empty one, is refused with 403 `actor-missing` (and the refusal is audited).
    ///
    /// ```
    /// use tower_idempotency_core::{admin::AdminRouter, Store};
    ///
    /// #[derive(Clone)]
    /// struct Operator(String);
    /// impl AsRef<str> for Operator {
    ///     fn as_ref(&self) -> &str { &self.0 }
    /// }
    ///
    /// fn admin<St: Store>(store: St) -> axum::Router {
    ///     AdminRouter::new(store).actor_from_extension::<Operator>().into_router()
    /// }
    /// ```
    pub fn actor_from_extension<T>(self) -> Self
    where
        T: AsRef<str> + Send + Sync + 'static,
    {
        self.actor(|parts| Some(parts.extensions.get::<T>()?.as_ref().to_owned()))
    }

    /// Who acts, from the request's parts (e.g. a header your gateway sets after it
    /// authenticated the operator). `None` or an empty name is refused with 403
    /// `actor-missing`.
    pub fn actor<F>(mut self, actor: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.actor = Some(Arc::new(actor));
        self
    }

    /// The router to mount, e.g. `Router::new().nest("/admin/idempotency",
    /// admin.into_router())` behind your admin auth. It fits a router of any state.
    ///
    /// # Panics
    ///
    /// With the message of [`AdminConfigError`] when who acts was not configured or the
    /// resolve TTL is out of range: at start-up, as the layer refuses an unscoped policy.
    /// [`try_into_router`](Self::try_into_router) returns the error instead.
    pub fn into_router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        match self.try_into_router() {
            Ok(router) => router,
            Err(err) => panic!("{err}"),
        }
    }

    /// [`into_router`](Self::into_router), with an error instead of a panic.
    pub fn try_into_router<S>(self) -> Result<Router<S>, AdminConfigError>
    where
        S: Clone + Send + Sync + 'static,
    {
        let actor = self.actor.ok_or(AdminConfigError::ActorNotConfigured)?;
        if self.resolve_ttl.is_zero() || self.resolve_ttl > MAX_TTL {
            return Err(AdminConfigError::ResolveTtlOutOfRange(self.resolve_ttl));
        }
        let shared = Arc::new(Shared {
            store: self.store,
            resolve_ttl: self.resolve_ttl,
            actor,
        });
        Ok(Router::new()
            .route(
                "/key",
                get(inspect::<St>).delete(forget::<St>).put(resolve::<St>),
            )
            .with_state(shared))
    }
}

impl<St: Store> From<AdminRouter<St>> for Router {
    /// [`AdminRouter::into_router`] (it panics the same way).
    fn from(admin: AdminRouter<St>) -> Router {
        admin.into_router()
    }
}

impl<St: fmt::Debug> fmt::Debug for AdminRouter<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminRouter")
            .field("store", &self.store)
            .field("resolve_ttl", &self.resolve_ttl)
            .field("actor", &self.actor.as_ref().map(|_| ".."))
            .finish()
    }
}

/// What every route's handler shares.
struct Shared<St> {
    store: St,
    resolve_ttl: Duration,
    actor: ActorSource,
}

async fn inspect<St: Store>(State(shared): State<Arc<Shared<St>>>, request: Request) -> Response {
    shared.act(Action::Inspect, request).await
}

async fn forget<St: Store>(State(shared): State<Arc<Shared<St>>>, request: Request) -> Response {
    shared.act(Action::Forget, request).await
}

async fn resolve<St: Store>(State(shared): State<Arc<Shared<St>>>, request: Request) -> Response {
    shared.act(Action::Resolve, request).await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Inspect,
    Forget,
    Resolve,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Inspect => "inspect",
            Action::Forget => "forget",
            Action::Resolve => "resolve",
        }
    }
}

/// A refusal and its `detail`.
type Refused = (reply::Refusal, String);

/// What the audit event of one request says; filled in as the request is understood.
struct Event {
    action: Action,
    actor: Option<String>,
    target: Option<params::Target>,
    answer: Option<String>,
    ttl: Option<Duration>,
}

impl Event {
    fn log(&self, result: &str, status: StatusCode) {
        let scope = self
            .target
            .as_ref()
            .map(|t| tracing::field::display(t.scope));
        let route = self.target.as_ref().and_then(|t| t.route.as_ref());
        tracing::info!(
            target: AUDIT_TARGET,
            actor = self.actor.as_deref(),
            action = %self.action.as_str(),
            scope,
            method = route.map(|(method, _)| tracing::field::display(method)),
            path = route.map(|(_, path)| path.as_str()),
            answer = self.answer.as_deref().map(tracing::field::display),
            ttl_secs = self.ttl.map(|ttl| ttl.as_secs()),
            result = %result,
            status = status.as_u16(),
            "idempotency admin action"
        );
    }
}

impl<St: Store> Shared<St> {
    /// Runs one action and audits it, whatever its result.
    async fn act(&self, action: Action, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let mut event = Event {
            action,
            actor: None,
            target: None,
            answer: None,
            ttl: None,
        };
        let (response, result) = match self.run(&parts, body, &mut event).await {
            Ok((json, result)) => (reply::ok(&json), result),
            Err((refusal, detail)) => (refusal.response(&detail), refusal.result()),
        };
        event.log(result, response.status());
        response
    }

    async fn run(
        &self,
        parts: &Parts,
        body: Body,
        event: &mut Event,
    ) -> Result<(serde_json::Value, &'static str), Refused> {
        use reply::Refusal;

        // The key is read first so that a refused request's event says what it aimed at.
        let target = params::target(&parts.uri);
        event.target = target.as_ref().ok().cloned();
        let actor = (self.actor)(parts).filter(|actor| !actor.is_empty());
        let Some(actor) = actor else {
            let detail = "no operator on the request: the admin router must sit behind the \
                          admin auth that names who acts";
            return Err((Refusal::ActorMissing, detail.to_owned()));
        };
        event.actor = Some(actor);
        let target = target.map_err(|detail| (Refusal::InvalidRequest, detail))?;
        let scope = target.scope;
        let action = event.action;
        let failed = |err: StoreError| store_failure(err, action);
        match action {
            Action::Inspect => {
                let state = self.store.inspect(&scope).await.map_err(failed)?;
                Ok(state_json(&scope, &state))
            }
            Action::Forget => {
                let forgotten = self.store.forget(&scope).await.map_err(failed)?;
                let json = json!({ "scope": scope.to_hex(), "forgotten": forgotten });
                Ok((json, if forgotten { "forgotten" } else { "absent" }))
            }
            Action::Resolve => {
                let answer = read_answer(parts, body, self.resolve_ttl).await?;
                event.answer = Some(answer.describe());
                event.ttl = Some(answer.ttl);
                let resolved = self.store.resolve(&scope, &answer.record, answer.ttl);
                match resolved.await.map_err(failed)? {
                    Resolved::Stored => {
                        let json = json!({ "scope": scope.to_hex(), "resolved": true });
                        Ok((json, "resolved"))
                    }
                    Resolved::Absent => Err((
                        Refusal::KeyAbsent,
                        "no record for this key (never used, forgotten, or expired): nothing \
                         to resolve; its next request runs"
                            .to_owned(),
                    )),
                    Resolved::InFlight => Err((
                        Refusal::KeyInFlight,
                        "a live request holds this key: wait for its answer, or resolve once \
                         its lease lapsed"
                            .to_owned(),
                    )),
                }
            }
        }
    }
}

/// The `PUT` body: JSON, at most [`MAX_ANSWER_BYTES`], parsed into an answer.
async fn read_answer(
    parts: &Parts,
    body: Body,
    default_ttl: Duration,
) -> Result<answer::Answer, Refused> {
    use reply::Refusal;

    let json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        let detail = "send the answer as JSON, with `Content-Type: application/json`";
        return Err((Refusal::UnsupportedMediaType, detail.to_owned()));
    }
    let bytes = match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => {
            let detail = format!("the answer is larger than {MAX_ANSWER_BYTES} bytes");
            return Err((Refusal::RequestTooLarge, detail));
        }
        Err(err) => {
            let detail = format!("the body could not be read: {err}");
            return Err((Refusal::InvalidRequest, detail));
        }
    };
    answer::parse(&bytes, default_ttl).map_err(|detail| (Refusal::InvalidRequest, detail))
}

/// `Unsupported` is the store's answer (501); any other error is logged with its cause
/// chain and answered 503.
fn store_failure(err: StoreError, action: Action) -> Refused {
    use reply::Refusal;

    match err {
        StoreError::Unsupported(operation) => (
            Refusal::NotSupported,
            format!("this store does not support {operation}"),
        ),
        err => {
            tracing::error!(
                action = action.as_str(),
                error = %DisplayChain(&err),
                "idempotency admin: the store failed"
            );
            let detail = "the idempotency store failed (its error is logged); nothing is known \
                          to have changed: retry";
            (Refusal::StoreUnavailable, detail.to_owned())
        }
    }
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The JSON of `GET /key`, and the state's name (the audit event's result).
fn state_json(scope: &ScopeHash, state: &KeyState) -> (serde_json::Value, &'static str) {
    let scope = scope.to_hex();
    match state {
        KeyState::Absent => (json!({ "scope": scope, "state": "absent" }), "absent"),
        KeyState::InFlight {
            owner,
            lease_remaining,
        } => (
            json!({
                "scope": scope,
                "state": "in_flight",
                "owner": owner.map(|token| token.to_hex()),
                "lease_remaining_ms": lease_remaining.map(millis),
            }),
            "in_flight",
        ),
        KeyState::Completed {
            record: Record::Response(response),
            age,
            expires_in,
        } => {
            let headers: Vec<&str> = response.headers.iter().map(|(n, _)| n.as_str()).collect();
            let json = json!({
                "scope": scope,
                "state": "completed",
                "status": response.status.as_u16(),
                "headers": headers,
                "body_bytes": response.body.len(),
                "age_ms": age.map(millis),
                "expires_in_ms": millis(*expires_in),
            });
            (json, "completed")
        }
        KeyState::Completed {
            record: Record::NotReplayable,
            age,
            expires_in,
        } => (
            json!({
                "scope": scope,
                "state": "not_replayable",
                "age_ms": age.map(millis),
                "expires_in_ms": millis(*expires_in),
            }),
            "not_replayable",
        ),
        KeyState::Uncertain {
            owner,
            lapsed_for,
            expires_in,
        } => (
            json!({
                "scope": scope,
                "state": "uncertain",
                "owner": owner.to_hex(),
                "lapsed_for_ms": lapsed_for.map(millis),
                "expires_in_ms": millis(*expires_in),
            }),
            "uncertain",
        ),
    }
}
