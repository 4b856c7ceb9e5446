//! OpenAPI documentation of a covered route, in one call (feature `utoipa`).
//!
//! [`document`] adds to one operation of a [utoipa] [`OpenApi`] what the layer in front of
//! it does, read from the layer's [`Policy`]:
//!
//! - the key header parameter (`Idempotency-Key`, or the policy's
//!   [`header`](crate::IdempotencyLayer::header)): `required` as the policy says, a schema
//!   whose `pattern` is exactly what the layer accepts (1–255 visible ASCII, bare or as an
//!   RFC 8941 quoted string), and a description with the TTL;
//! - the layer's own answers — 400, 409, 413, 422 and 503 — as `application/problem+json`
//!   (RFC 9457): each response's schema is the [`IdempotencyProblem`](PROBLEM_SCHEMA)
//!   component narrowed to the `type` URIs that status can carry on this route (with the
//!   policy's [`problem_type_base`](crate::IdempotencyLayer::problem_type_base)), an
//!   example per `type`, `Retry-After` on 409 and 503 and `Connection: close` on 413;
//! - `Idempotent-Replayed: true` on each of the route's own responses whose status the
//!   policy [stores](crate::StorePolicy) (so replays it).
//!
//! Only what the policy can produce is listed: 400 `idempotency-key-missing` only where a
//! key is required, 409 `operation-uncertain` only with
//! [`Uncertain::Refuse`]. The 500s (`scope-not-configured`,
//! `handler-failed`) are server faults, not part of the client contract, and are left
//! to the application's own 500. With
//! [`render_rejections`](crate::IdempotencyLayer::render_rejections) the body is the
//! application's own format, which this module cannot know: the responses are then listed
//! with their descriptions and headers, without a body schema.
//!
//! # A status the route documents itself
//!
//! A route that already documents, say, its own 400 keeps it: the layer's answer is
//! added beside it — the descriptions are joined, the route's headers and examples stay,
//! and where both have an `application/problem+json` body the schema becomes `anyOf`
//! the route's and the layer's. `anyOf`, not `oneOf`: an application's own problem
//! schema usually matches the layer's problems too (both are RFC 9457), and `oneOf`
//! would then call every such response invalid. A response given as a `$ref` to
//! `#/components/responses/..` is copied into the operation before it is changed, so
//! other operations sharing it are untouched.
//!
//! Calling [`document`] twice for one operation changes nothing the second time.
//!
//! # Example
//!
//! ```
//! use http::Method;
//! use tower_idempotency_core::{openapi, IdempotencyLayer, MemoryStore};
//! use openapi::utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
//! use openapi::utoipa::openapi::{OpenApiBuilder, PathsBuilder, Response};
//!
//! let layer = IdempotencyLayer::new(MemoryStore::default()).global_scope().require_key();
//! let create = OperationBuilder::new().response("201", Response::new("Payment created"));
//! let mut api = OpenApiBuilder::new()
//!     .paths(PathsBuilder::new().path("/payments", PathItem::new(HttpMethod::Post, create)))
//!     .build();
//!
//! openapi::document(&mut api, "/payments", &Method::POST, layer.policy())?;
//!
//! let json = serde_json::to_value(&api)?;
//! let post = &json["paths"]["/payments"]["post"];
//! assert_eq!(post["parameters"][0]["name"], "Idempotency-Key");
//! assert_eq!(post["parameters"][0]["in"], "header");
//! assert_eq!(post["parameters"][0]["required"], true);
//! assert_eq!(post["responses"]["201"]["headers"]["Idempotent-Replayed"]["schema"]["enum"][0], "true");
//! let conflict = &post["responses"]["409"]["content"]["application/problem+json"];
//! assert!(conflict["examples"]["request-in-flight"]["value"]["type"]
//!     .as_str()
//!     .is_some_and(|uri| uri.ends_with("#request-in-flight")));
//! assert!(json["components"]["schemas"]["IdempotencyProblem"].is_object());
//!
//! // GET is not covered: the layer passes it through, so there is nothing to document.
//! assert!(openapi::document(&mut api, "/payments", &Method::GET, layer.policy()).is_err());
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{AllOfBuilder, AnyOf, SchemaFormat};
use utoipa::openapi::{
    Components, Content, ContentBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Required, Response,
    Schema, Type,
};

/// The utoipa this module builds with (6.x): use its types for the [`OpenApi`] you pass
/// to [`document`], so that they are the same types.
pub use utoipa;

use crate::key::MAX_KEY_LEN;
use crate::policy::{InFlight, Policy, Uncertain};
use crate::problems::Problem;

/// The name of the RFC 9457 problem schema in `#/components/schemas`.
pub const PROBLEM_SCHEMA: &str = "IdempotencyProblem";

/// The media type of the layer's own answers.
const PROBLEM_JSON: &str = "application/problem+json";

/// The response header that marks a replay, as documentation spells it.
const REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// What the layer accepts as a key header value (see [`crate::key`]), as an ECMA-262
/// pattern: a bare value of 1–255 bytes 0x21–0x7E that does not start with `"`, or an
/// RFC 8941 sf-string whose unescaped content is 1–255 such bytes (`\"` and `\\` are the
/// only escapes, and count as one byte each). `tests/it/openapi.rs` checks it against the
/// key parser.
pub const KEY_PATTERN: &str = r#"^(?:[!#-~][!-~]{0,254}|"(?:[!#-\[\]-~]|\\["\\]){1,255}")$"#;

/// Why [`document`] could not document an operation. Each message names the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The document has no operation at that path and method.
    #[error(
        "the OpenAPI document has no `{method} {path}` operation; add the route's own \
         operation first, with the path as the document spells it (`/orders/{{id}}`)"
    )]
    NoOperation {
        /// The path given.
        path: String,
        /// The method given.
        method: Method,
    },
    /// The policy does not cover the method: the layer passes such requests through
    /// untouched, so documenting it would be false.
    #[error(
        "the idempotency policy does not cover {method} (it passes through untouched); \
         cover it with `.methods(..)` or document the method the layer covers"
    )]
    NotCovered {
        /// The method given.
        method: Method,
    },
    /// The operation's response refers to something this call cannot follow.
    #[error(
        "the `{status}` response of `{method} {path}` refers to `{reference}`, which this \
         call cannot follow (only `#/components/responses/..` that exist); inline it"
    )]
    UnresolvedReference {
        /// The path.
        path: String,
        /// The method.
        method: Method,
        /// The response's status key.
        status: String,
        /// The `$ref`.
        reference: String,
    },
    /// `#/components/schemas/IdempotencyProblem` exists and is something else.
    #[error(
        "the document's components already have a schema named `{PROBLEM_SCHEMA}` that is \
         not the idempotency problem schema; rename yours"
    )]
    SchemaNameTaken,
}

/// Documents the idempotency layer with `policy` in front of the `method` operation of
/// `path` in `openapi`: the key parameter, the layer's problem responses, and
/// `Idempotent-Replayed` on the route's stored responses. See the [module docs](self).
///
/// `path` is spelled as in the document (`/orders/{id}/cancel`, which is also axum 0.8's
/// route syntax). Errors leave `openapi` unchanged.
pub fn document(
    openapi: &mut OpenApi,
    path: &str,
    method: &Method,
    policy: &Policy,
) -> Result<(), DocumentError> {
    if !policy.covers(method) {
        return Err(DocumentError::NotCovered {
            method: method.clone(),
        });
    }
    let problem_schema = problem_schema();
    // Taken out for the call (the operation borrows the document mutably) and put back
    // as it was, whatever happens.
    let mut components = openapi.components.take();
    let empty = Components::new();
    let result = document_in(
        openapi,
        path,
        method,
        policy,
        components.as_ref().unwrap_or(&empty),
        &problem_schema,
    );
    if result.is_ok() && policy.render_rejection.is_none() {
        components
            .get_or_insert_with(Components::new)
            .schemas
            .insert(PROBLEM_SCHEMA.to_owned(), problem_schema);
    }
    openapi.components = components;
    result
}

fn document_in(
    openapi: &mut OpenApi,
    path: &str,
    method: &Method,
    policy: &Policy,
    components: &Components,
    problem_schema: &RefOr<Schema>,
) -> Result<(), DocumentError> {
    if components
        .schemas
        .get(PROBLEM_SCHEMA)
        .is_some_and(|existing| existing != problem_schema)
    {
        return Err(DocumentError::SchemaNameTaken);
    }
    let Some(operation) = operation_mut(openapi, path, method) else {
        return Err(DocumentError::NoOperation {
            path: path.to_owned(),
            method: method.clone(),
        });
    };
    document_operation(operation, policy, components).map_err(|(status, reference)| {
        DocumentError::UnresolvedReference {
            path: path.to_owned(),
            method: method.clone(),
            status,
            reference,
        }
    })
}

/// The operation of `method` at `path`, for the methods a policy can cover.
fn operation_mut<'a>(
    openapi: &'a mut OpenApi,
    path: &str,
    method: &Method,
) -> Option<&'a mut Operation> {
    let item = openapi.paths.paths.get_mut(path)?;
    let slot = match *method {
        Method::POST => &mut item.post,
        Method::PUT => &mut item.put,
        Method::PATCH => &mut item.patch,
        Method::DELETE => &mut item.delete,
        _ => return None,
    };
    slot.as_mut()
}

/// Changes a copy of the operation and stores it only when every step worked, so an
/// error leaves the document as it was. `Err((status, reference))` names a response
/// reference that could not be followed.
fn document_operation(
    operation: &mut Operation,
    policy: &Policy,
    components: &Components,
) -> Result<(), (String, String)> {
    let mut changed = operation.clone();
    add_key_parameter(&mut changed, policy);

    let ours = layer_responses(policy);
    // Replays first, on the route's own responses only: the layer's answers are never
    // stored, so a status the layer adds does not get the header (unless the route
    // documents that status too and the policy stores it).
    let statuses: Vec<String> = changed.responses.responses.keys().cloned().collect();
    for status in statuses {
        if !stores_any(policy, &status) {
            continue;
        }
        let mut response = inline_response(&changed, &status, components)?;
        if ours.get(&status).map(|(r, _)| &r.description) == Some(&response.description) {
            // Added by an earlier call: the layer's own answer, never replayed.
            continue;
        }
        response
            .headers
            .entry(REPLAYED_HEADER.to_owned())
            .or_insert_with(replayed_header);
        changed
            .responses
            .responses
            .insert(status, RefOr::T(response));
    }

    for (status, (response, schema)) in ours {
        let merged = if changed.responses.responses.contains_key(&status) {
            let existing = inline_response(&changed, &status, components)?;
            merge_response(existing, response, schema).map_err(|r| (status.clone(), r))?
        } else {
            response
        };
        changed.responses.responses.insert(status, RefOr::T(merged));
    }
    *operation = changed;
    Ok(())
}

/// The key parameter, replacing one of the same name the route documented itself (a
/// header name is case-insensitive): the policy knows the rules.
fn add_key_parameter(operation: &mut Operation, policy: &Policy) {
    let name = display_header_name(policy.header().as_str());
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    parameters.retain(|parameter| match parameter {
        RefOr::T(p) => {
            !(p.parameter_in == ParameterIn::Header && p.name.eq_ignore_ascii_case(&name))
        }
        RefOr::Ref(_) => true,
    });
    parameters.push(RefOr::T(key_parameter(&name, policy)));
}

fn key_parameter(name: &str, policy: &Policy) -> Parameter {
    let ttl = human_duration(policy.ttl());
    let presence = if policy.require_key() {
        "Required: a request without it gets 400 `idempotency-key-missing` and nothing runs."
    } else {
        "Optional: a request without it runs as if there were no idempotency layer, and a \
         retry of it may run again."
    };
    let description = format!(
        "Names one operation so that it runs once: send a unique value (a UUID) and reuse \
         it for every retry of that operation. 1–{MAX_KEY_LEN} visible ASCII characters \
         (0x21–0x7E), bare or as an RFC 8941 quoted string (`\"abc\"` and `abc` are one \
         key); anything else gets 400 `idempotency-key-invalid`. {presence} A retry with the \
         same key and payload within {ttl} gets the first response again, with \
         `{REPLAYED_HEADER}: true`; the same key with another payload gets 422 \
         `idempotency-key-reused`."
    );
    let schema = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .pattern(Some(KEY_PATTERN));
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(if policy.require_key() {
            Required::True
        } else {
            Required::False
        })
        .description(Some(description))
        .schema(Some(schema))
        .example(Some(json!("8e03978e-40d5-43e8-bc93-6894a57f9324")))
        .build()
}

/// `idempotency-key` → `Idempotency-Key`: how headers are usually written in API
/// documentation (names are case-insensitive, so both mean the same header).
fn display_header_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// `24 h`, `30 min`, `90 s`, `1500 ms`: the TTL as a reader of the document wants it.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        format!("{} ms", d.as_millis())
    } else if secs % 3600 == 0 {
        format!("{} h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// Whether the policy stores a response documented under `status` (`201`, `2XX`): for a
/// range, whether it stores any status in it. `default` is left alone: it stands for
/// statuses the route did not list, which may or may not be stored.
fn stores_any(policy: &Policy, status: &str) -> bool {
    let codes = match status.as_bytes() {
        [d @ b'1'..=b'5', b'X' | b'x', b'X' | b'x'] => {
            let hundred = u16::from(d - b'0') * 100;
            hundred..hundred + 100
        }
        _ => match status.parse::<u16>() {
            Ok(code) => code..code + 1,
            Err(_) => return false,
        },
    };
    codes
        .filter_map(|code| StatusCode::from_u16(code).ok())
        .any(|code| policy.store_when().stores(code))
}

fn replayed_header() -> RefOr<Header> {
    RefOr::T(
        HeaderBuilder::new()
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["true"])),
            ))
            .description(Some(
                "`true` when this response is the stored answer to an earlier request with \
                 the same idempotency key (the operation did not run again). Absent on the \
                 first response.",
            ))
            .build(),
    )
}

/// The route's response at `status`, inline: a `$ref` to `#/components/responses/..` is
/// copied (so other operations sharing that component are untouched).
fn inline_response(
    operation: &Operation,
    status: &str,
    components: &Components,
) -> Result<Response, (String, String)> {
    let unresolved = |reference: &str| (status.to_owned(), reference.to_owned());
    let mut current = operation.responses.responses.get(status);
    // A component may itself be a `$ref` to another; a few hops is plenty, and the bound
    // keeps a cycle from looping.
    for _ in 0..8 {
        match current {
            Some(RefOr::T(response)) => return Ok(response.clone()),
            Some(RefOr::Ref(reference)) => {
                let location = &reference.ref_location;
                let name = location
                    .strip_prefix("#/components/responses/")
                    .ok_or_else(|| unresolved(location))?;
                current = Some(
                    components
                        .responses
                        .get(name)
                        .ok_or_else(|| unresolved(location))?,
                );
            }
            None => return Ok(Response::default()),
        }
    }
    Err(unresolved("a chain of response references"))
}

/// The route's `existing` response with the layer's answer added beside it. `Err` names a
/// media type given as a `$ref`, which this call does not follow.
fn merge_response(
    mut existing: Response,
    ours: Response,
    schema: Option<RefOr<Schema>>,
) -> Result<Response, String> {
    if existing.description.is_empty() {
        existing.description = ours.description;
    } else if !existing.description.contains(&ours.description) {
        existing.description = format!("{}\n\n{}", existing.description, ours.description);
    }
    for (name, header) in ours.headers {
        // The route's own description of a header it sends stays.
        existing.headers.entry(name).or_insert(header);
    }
    for (media_type, content) in ours.content {
        let theirs = match existing.content.get_mut(&media_type) {
            None => {
                existing.content.insert(media_type, content);
                continue;
            }
            Some(RefOr::Ref(reference)) => return Err(reference.ref_location.clone()),
            Some(RefOr::T(theirs)) => theirs,
        };
        let (Some(ours_schema), RefOr::T(ours_content)) = (&schema, content) else {
            continue;
        };
        theirs.schema = Some(match theirs.schema.take() {
            None => ours_schema.clone(),
            Some(s) if s == *ours_schema => s,
            Some(RefOr::T(Schema::AnyOf(mut any))) => {
                if !any.items.contains(ours_schema) {
                    any.items.push(ours_schema.clone());
                }
                RefOr::T(Schema::AnyOf(any))
            }
            Some(s) => {
                let mut any = AnyOf::new();
                any.items = vec![s, ours_schema.clone()];
                RefOr::T(Schema::AnyOf(any))
            }
        });
        // `example` and `examples` exclude each other: the route's single example joins
        // the named ones.
        if let Some(example) = theirs.example.take() {
            theirs.examples.insert(
                "route".to_owned(),
                RefOr::T(ExampleBuilder::new().value(Some(example)).build()),
            );
        }
        for (name, example) in ours_content.examples {
            theirs.examples.entry(name).or_insert(example);
        }
    }
    Ok(existing)
}

/// The layer's answers for `policy`, by status: the response, and the body schema it
/// carries (`None` with a custom rendering).
fn layer_responses(policy: &Policy) -> BTreeMap<String, (Response, Option<RefOr<Schema>>)> {
    let mut bad_request = vec![Problem::KeyInvalid, Problem::BodyUnreadable];
    if policy.require_key() {
        bad_request.insert(0, Problem::KeyMissing);
    }
    let mut conflict = vec![Problem::InFlight, Problem::NotReplayable];
    if policy.uncertain() == Uncertain::Refuse {
        conflict.push(Problem::OperationUncertain);
    }
    let groups = [
        bad_request,
        conflict,
        vec![Problem::BodyTooLarge],
        vec![Problem::KeyReused],
        vec![Problem::StoreUnavailable],
    ];
    groups
        .into_iter()
        .map(|problems| {
            let status = problems[0].status();
            let (response, schema) = layer_response(policy, status, &problems);
            (status.as_u16().to_string(), (response, schema))
        })
        .collect()
}

fn layer_response(
    policy: &Policy,
    status: StatusCode,
    problems: &[Problem],
) -> (Response, Option<RefOr<Schema>>) {
    let format = if policy.render_rejection.is_some() {
        "in the application's error format"
    } else {
        "`application/problem+json` (RFC 9457); branch on its `type`"
    };
    let mut description = format!("From the idempotency layer, {format}:\n");
    for problem in problems {
        description.push_str(&format!(
            "\n- `{}`: {}",
            problem.slug(),
            guidance(*problem, policy)
        ));
    }
    let mut response = Response::new(description);
    if problems.iter().any(|p| p.retries_after()) {
        let with = problems
            .iter()
            .filter(|p| p.retries_after())
            .map(|p| format!("`{}`", p.slug()))
            .collect::<Vec<_>>()
            .join(", ");
        response.headers.insert(
            "Retry-After".to_owned(),
            RefOr::T(
                HeaderBuilder::new()
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::Integer)
                            .minimum(Some(1)),
                    ))
                    .description(Some(format!(
                        "With {with}: seconds to wait before retrying with the same key."
                    )))
                    .build(),
            ),
        );
    }
    if problems.contains(&Problem::BodyTooLarge) {
        response.headers.insert(
            "Connection".to_owned(),
            RefOr::T(
                HeaderBuilder::new()
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(["close"])),
                    ))
                    .description(Some(
                        "`close`: the rest of the body is not read, so the connection is not \
                         reused.",
                    ))
                    .build(),
            ),
        );
    }
    if policy.render_rejection.is_some() {
        return (response, None);
    }
    let base = &policy.problem_type_base;
    let type_uris: Vec<String> = problems
        .iter()
        .map(|p| format!("{base}{}", p.slug()))
        .collect();
    let narrowed = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(type_uris)),
        )
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .enum_values(Some([status.as_u16()])),
        );
    let schema: RefOr<Schema> = AllOfBuilder::new()
        .item(Ref::from_schema_name(PROBLEM_SCHEMA))
        .item(narrowed)
        .into();
    let mut content: Content = ContentBuilder::new().schema(Some(schema.clone())).build();
    for problem in problems {
        let value = json!({
            "type": format!("{base}{}", problem.slug()),
            "title": problem.title(),
            "status": status.as_u16(),
            "detail": example_detail(*problem, policy),
        });
        content.examples.insert(
            problem.slug().to_owned(),
            RefOr::T(
                ExampleBuilder::new()
                    .summary(problem.title())
                    .value(Some(value))
                    .build(),
            ),
        );
    }
    response
        .content
        .insert(PROBLEM_JSON.to_owned(), RefOr::T(content));
    (response, Some(schema))
}

/// What the client should do, in one line (the [`problems`](crate::problems) page says
/// more).
fn guidance(problem: Problem, policy: &Policy) -> String {
    match problem {
        Problem::KeyMissing => "this route requires the key header; nothing ran.".into(),
        Problem::KeyInvalid => {
            "the key is not 1–255 visible ASCII characters, is a malformed quoted string, or \
             the header appears twice; nothing ran."
                .into()
        }
        Problem::BodyUnreadable => {
            "the request body failed while it was read; nothing ran. Retry with the same key."
                .into()
        }
        Problem::BodyTooLarge => format!(
            "the body is over this route's limit ({} bytes); nothing ran. Send a smaller body \
             as a new operation, with a new key.",
            policy.max_body()
        ),
        Problem::KeyReused => {
            "the key was used with another payload (method, path, query, fingerprinted \
             headers or body); nothing ran. Use a new key for a new operation."
                .into()
        }
        Problem::InFlight => match policy.in_flight() {
            InFlight::Conflict => {
                "the first request with this key is still running. Retry with the same key \
                 after `Retry-After` seconds to get its answer."
                    .into()
            }
            InFlight::Wait(bound) => format!(
                "the first request with this key was still running after this route waited \
                 {} for it. Retry with the same key after `Retry-After` seconds.",
                human_duration(bound)
            ),
        },
        Problem::NotReplayable => {
            "the first request with this key ran, but its response could not be stored; it \
             will not run again. Look the result up another way."
                .into()
        }
        Problem::OperationUncertain => {
            "the first request with this key stopped before it recorded an answer: it may or \
             may not have happened, and will not run again until an operator resolves the \
             key. Look the result up another way, or retry later."
                .into()
        }
        Problem::StoreUnavailable => {
            "the server cannot reach its idempotency store, so it cannot tell whether the \
             operation already ran; nothing ran. Retry with the same key after `Retry-After` \
             seconds."
                .into()
        }
        // Not documented by this module (see the module docs).
        Problem::ScopeNotConfigured | Problem::HandlerFailed => problem.title().into(),
    }
}

/// A `detail` as the layer writes it, for the examples.
fn example_detail(problem: Problem, policy: &Policy) -> String {
    match problem {
        Problem::KeyMissing => format!(
            "this endpoint requires an `{}` header",
            policy.header().as_str()
        ),
        Problem::KeyInvalid => {
            "the idempotency key is invalid: the idempotency key is longer than 255 bytes".into()
        }
        Problem::BodyUnreadable => "the request body could not be read: connection reset".into(),
        Problem::BodyTooLarge => format!(
            "the request body is larger than {} bytes",
            policy.max_body()
        ),
        Problem::KeyReused => {
            "this idempotency key was already used with a different request payload".into()
        }
        Problem::InFlight => "a request with this idempotency key is still being processed".into(),
        Problem::NotReplayable => "the first request with this key ran, but its response could \
                                   not be stored (too large, or it failed mid-stream); it cannot \
                                   be replayed"
            .into(),
        Problem::OperationUncertain => "the first request with this key stopped before it \
                                        recorded an answer, so it may or may not have happened"
            .into(),
        Problem::StoreUnavailable => {
            "the idempotency store is unavailable; retry with the same key later".into()
        }
        Problem::ScopeNotConfigured | Problem::HandlerFailed => problem.title().into(),
    }
}

/// The RFC 9457 problem object the layer answers with: all four members, always.
/// Extension members are allowed (RFC 9457 section 3.2), so no `additionalProperties`.
fn problem_schema() -> RefOr<Schema> {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .title(Some("IdempotencyProblem"))
        .description(Some(
            "An RFC 9457 problem details object, as the idempotency layer answers \
             (`application/problem+json`). Branch on `type`: each URI names one case and \
             links to what it means and what to do.",
        ))
        .property(
            "type",
            string()
                .format(Some(SchemaFormat::Custom("uri-reference".into())))
                .description(Some("The case: the layer's problem type base and a slug.")),
        )
        .property(
            "title",
            string().description(Some("A fixed summary of the case.")),
        )
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(100))
                .maximum(Some(599))
                .description(Some("The HTTP status of the response.")),
        )
        .property(
            "detail",
            string().description(Some("What happened to this request, in a sentence.")),
        )
        .required("type")
        .required("title")
        .required("status")
        .required("detail")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::StorePolicy;
    use crate::problems::PROBLEM_TYPE_BASE;
    use serde_json::Value;
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
    use utoipa::openapi::{ComponentsBuilder, OpenApiBuilder, PathsBuilder};

    fn policy(change: impl FnOnce(&mut Policy)) -> Policy {
        let mut policy = Policy::default();
        change(&mut policy);
        policy
    }

    fn doc_with(method: HttpMethod, operation: OperationBuilder) -> OpenApi {
        OpenApiBuilder::new()
            .paths(PathsBuilder::new().path("/things/{id}", PathItem::new(method, operation)))
            .build()
    }

    fn json(api: &OpenApi) -> Value {
        serde_json::to_value(api).unwrap()
    }

    #[test]
    fn documents_the_parameter_responses_and_replays() {
        let op = OperationBuilder::new()
            .response("201", Response::new("Created"))
            .response("404", Response::new("No such thing"));
        let mut api = doc_with(HttpMethod::Post, op);
        document(&mut api, "/things/{id}", &Method::POST, &Policy::default()).unwrap();
        let doc = json(&api);
        let op = &doc["paths"]["/things/{id}"]["post"];
        let key = &op["parameters"][0];
        assert_eq!(key["name"], "Idempotency-Key");
        assert_eq!(key["required"], false);
        assert_eq!(key["schema"]["pattern"], KEY_PATTERN);
        assert!(key["description"].as_str().unwrap().contains("within 24 h"));
        assert!(op["responses"]["201"]["headers"][REPLAYED_HEADER].is_object());
        assert!(op["responses"]["404"]["headers"][REPLAYED_HEADER].is_null());
        for status in ["400", "409", "413", "422", "503"] {
            let body = &op["responses"][status]["content"][PROBLEM_JSON];
            assert_eq!(
                body["schema"]["allOf"][0]["$ref"],
                "#/components/schemas/IdempotencyProblem"
            );
            assert!(op["responses"][status]["headers"][REPLAYED_HEADER].is_null());
        }
        let types = &op["responses"]["400"]["content"][PROBLEM_JSON]["schema"]["allOf"][1]
            ["properties"]["type"]["enum"];
        assert_eq!(
            *types,
            json!([
                format!("{PROBLEM_TYPE_BASE}idempotency-key-invalid"),
                format!("{PROBLEM_TYPE_BASE}request-body-unreadable"),
            ]),
            "no key-missing where the key is optional"
        );
        let conflict = &op["responses"]["409"];
        assert!(conflict["headers"]["Retry-After"].is_object());
        assert!(conflict["content"][PROBLEM_JSON]["examples"]["operation-uncertain"].is_null());
        assert_eq!(
            op["responses"]["413"]["headers"]["Connection"]["schema"]["enum"][0],
            "close"
        );
        assert!(op["responses"]["503"]["headers"]["Retry-After"].is_object());
        assert!(doc["components"]["schemas"][PROBLEM_SCHEMA]["required"]
            .as_array()
            .is_some_and(|r| r.len() == 4));
    }

    #[test]
    fn follows_the_policy() {
        let policy = policy(|p| {
            p.require_key = true;
            p.uncertain = Uncertain::Refuse;
            p.header = http::HeaderName::from_static("x-request-key");
            p.store_when = StorePolicy::SuccessesAndServerErrors;
            p.problem_type_base = "https://api.example/problems/".into();
            p.methods = 0b1111;
        });
        let op = OperationBuilder::new()
            .response("2XX", Response::new("Done"))
            .response("500", Response::new("Failed"))
            .response("default", Response::new("Other"));
        let mut api = doc_with(HttpMethod::Delete, op);
        document(&mut api, "/things/{id}", &Method::DELETE, &policy).unwrap();
        let doc = json(&api);
        let op = &doc["paths"]["/things/{id}"]["delete"];
        assert_eq!(op["parameters"][0]["name"], "X-Request-Key");
        assert_eq!(op["parameters"][0]["required"], true);
        for (status, replayed) in [("2XX", true), ("500", true), ("default", false)] {
            assert_eq!(
                op["responses"][status]["headers"][REPLAYED_HEADER].is_object(),
                replayed,
                "{status}"
            );
        }
        let examples = &op["responses"]["409"]["content"][PROBLEM_JSON]["examples"];
        assert_eq!(
            examples["operation-uncertain"]["value"]["type"],
            "https://api.example/problems/operation-uncertain"
        );
        assert_eq!(
            op["responses"]["400"]["content"][PROBLEM_JSON]["examples"]["idempotency-key-missing"]
                ["value"]["detail"],
            "this endpoint requires an `x-request-key` header"
        );
    }

    #[test]
    fn keeps_the_routes_own_responses_and_is_idempotent() {
        let own_problem = ObjectBuilder::new()
            .schema_type(Type::Object)
            .title(Some("AppProblem"));
        let own_400 = Response::builder()
            .description("Invalid payment")
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(own_problem))
                    .example(Some(json!({"type": "x"})))
                    .build(),
            )
            .build();
        let op = OperationBuilder::new()
            .response("201", Response::new("Created"))
            .response("400", RefOr::Ref(Ref::from_response_name("BadRequest")))
            .parameter(
                ParameterBuilder::new()
                    .name("idempotency-key")
                    .parameter_in(ParameterIn::Header)
                    .build(),
            );
        let mut api = doc_with(HttpMethod::Post, op);
        api.components = Some(
            ComponentsBuilder::new()
                .response("BadRequest", own_400)
                .build(),
        );
        document(&mut api, "/things/{id}", &Method::POST, &Policy::default()).unwrap();
        let once = json(&api);
        document(&mut api, "/things/{id}", &Method::POST, &Policy::default()).unwrap();
        assert_eq!(once, json(&api), "a second call changes nothing");

        let op = &once["paths"]["/things/{id}"]["post"];
        assert_eq!(
            op["parameters"].as_array().unwrap().len(),
            1,
            "replaced, not added"
        );
        let bad = &op["responses"]["400"];
        let description = bad["description"].as_str().unwrap();
        assert!(description.starts_with("Invalid payment\n\nFrom the idempotency layer"));
        let body = &bad["content"][PROBLEM_JSON];
        assert_eq!(body["schema"]["anyOf"][0]["title"], "AppProblem");
        assert_eq!(
            body["schema"]["anyOf"][1]["allOf"][0]["$ref"],
            "#/components/schemas/IdempotencyProblem"
        );
        assert_eq!(body["examples"]["route"]["value"]["type"], "x");
        assert!(body["examples"]["idempotency-key-invalid"].is_object());
        assert!(body.get("example").is_none());
        // The shared component is untouched.
        assert_eq!(
            once["components"]["responses"]["BadRequest"]["description"],
            "Invalid payment"
        );
    }

    #[test]
    fn refuses_what_it_cannot_document_and_leaves_the_document_alone() {
        let op = OperationBuilder::new().response("200", Response::new("Ok"));
        let mut api = doc_with(HttpMethod::Get, op);
        let before = json(&api);
        assert!(matches!(
            document(&mut api, "/things/{id}", &Method::GET, &Policy::default()),
            Err(DocumentError::NotCovered { .. })
        ));
        assert!(matches!(
            document(&mut api, "/things/{id}", &Method::POST, &Policy::default()),
            Err(DocumentError::NoOperation { .. })
        ));
        assert!(matches!(
            document(&mut api, "/other", &Method::POST, &Policy::default()),
            Err(DocumentError::NoOperation { .. })
        ));
        let dangling =
            OperationBuilder::new().response("400", RefOr::Ref(Ref::from_response_name("Nope")));
        let mut dangling_api = doc_with(HttpMethod::Post, dangling);
        let dangling_before = json(&dangling_api);
        let err = document(
            &mut dangling_api,
            "/things/{id}",
            &Method::POST,
            &Policy::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("#/components/responses/Nope"),
            "{err}"
        );
        assert_eq!(json(&dangling_api)["paths"], dangling_before["paths"]);
        assert_eq!(json(&api)["paths"], before["paths"]);
    }

    #[test]
    fn a_custom_rendering_has_no_problem_schema() {
        let policy = policy(|p| {
            p.render_rejection = Some(std::sync::Arc::new(|r: &crate::Rejection| r.problem_json()))
        });
        let mut api = doc_with(HttpMethod::Post, OperationBuilder::new());
        document(&mut api, "/things/{id}", &Method::POST, &policy).unwrap();
        let doc = json(&api);
        let conflict = &doc["paths"]["/things/{id}"]["post"]["responses"]["409"];
        assert!(conflict["content"].is_null());
        assert!(conflict["headers"]["Retry-After"].is_object());
        assert!(doc["components"]["schemas"][PROBLEM_SCHEMA].is_null());
    }

    #[test]
    fn names_and_durations() {
        assert_eq!(display_header_name("idempotency-key"), "Idempotency-Key");
        assert_eq!(display_header_name("x-request-key"), "X-Request-Key");
        assert_eq!(human_duration(Duration::from_secs(30 * 60)), "30 min");
        assert_eq!(human_duration(Duration::from_secs(12 * 3600)), "12 h");
        assert_eq!(human_duration(Duration::from_secs(90)), "90 s");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1500 ms");
    }
}
