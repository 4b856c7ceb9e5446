//! The example's `GET /openapi.json` (feature `utoipa`, `tower_idempotency::openapi`): a
//! valid OpenAPI 3.1 document by a real validator, with the idempotency parts on exactly
//! the covered operations, saying what the layer really does.
//!
//! The validator is Python's `openapi-spec-validator` (`tests/it/openapi_check.py`, which
//! also checks every example against its schema). A `python3` that can import it is used
//! as it is; otherwise it is installed once into a venv under `target/tmp/`; if neither
//! works the tests fail with the command to run. Never a silent skip.

use crate::payments;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyKey, MemoryStore};

/// The version installed when no `python3` on PATH has the validator.
const VALIDATOR_REQUIREMENT: &str = "openapi-spec-validator==0.9.0";

/// The operations behind an idempotency layer in `examples/payments.rs`.
const COVERED: [(&str, &str); 4] = [
    ("post", "/payments"),
    ("post", "/orders"),
    ("post", "/orders/{id}/cancel"),
    ("post", "/webhooks/{source}"),
];

/// The layer's statuses, each documented with the `IdempotencyProblem` schema.
const LAYER_STATUSES: [&str; 5] = ["400", "409", "413", "422", "503"];

const KEY_HEADER: &str = "Idempotency-Key";
const REPLAYED: &str = "Idempotent-Replayed";
const PROBLEM_REF: &str = "#/components/schemas/IdempotencyProblem";

fn app() -> Router {
    payments::app(MemoryStore::default(), &payments::Config::default())
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: Value,
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// `GET /openapi.json`, without credentials: it is outside the example's auth.
async fn fetch_document(app: &Router) -> Value {
    let reply = send(
        app,
        Request::get("/openapi.json").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    assert_eq!(reply.headers["content-type"], "application/json");
    reply.json
}

// ---------------------------------------------------------------------------------------
// The validator
// ---------------------------------------------------------------------------------------

/// A Python that can import `openapi_spec_validator` (and its `jsonschema`).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(find_or_install_validator)
}

fn can_import(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            "import openapi_spec_validator, jsonschema, referencing",
        ])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn find_or_install_validator() -> PathBuf {
    let system = PathBuf::from("python3");
    if can_import(&system) {
        return system;
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openapi-validator-venv");
    let venv_python = venv.join("bin").join("python");
    if can_import(&venv_python) {
        return venv_python;
    }
    let fail = |why: String| -> ! {
        panic!(
            "tests/it/openapi.rs needs Python's openapi-spec-validator, and could not install \
             it ({why}); install it for `python3` with `python3 -m pip install \
             '{VALIDATOR_REQUIREMENT}'` (Debian: `apt-get install python3-venv` lets this test \
             install it itself)"
        )
    };
    // Built beside its final place and renamed into it, so a concurrent run never uses a
    // half-made venv.
    let building = venv.with_extension(format!("building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    let run = |what: &str, command: &mut Command| match command.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => fail(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => fail(format!("{what} could not start: {e}")),
    };
    run(
        "python3 -m venv",
        Command::new(&system).args(["-m", "venv"]).arg(&building),
    );
    run(
        "pip install",
        Command::new(building.join("bin").join("python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            VALIDATOR_REQUIREMENT,
        ]),
    );
    // A venv's scripts name its directory; the interpreter link does not care, and only
    // `python -m ..` is used here, so renaming the directory is safe.
    if std::fs::rename(&building, &venv).is_err() {
        // Another run finished first: use its venv.
        let _ = std::fs::remove_dir_all(&building);
    }
    if !can_import(&venv_python) {
        fail(format!(
            "{} cannot import it after the install",
            venv_python.display()
        ));
    }
    venv_python
}

/// What `openapi_check.py` found.
#[derive(Debug, serde::Deserialize)]
struct Checked {
    validator: String,
    errors: Vec<String>,
    examples_checked: usize,
    matches: Vec<bool>,
}

fn check(document: &Value, pattern: Option<&str>, cases: &[Vec<u8>]) -> Checked {
    use std::io::Write;
    use std::process::Stdio;

    let python = python();
    let request = json!({ "document": document, "pattern": pattern, "cases": cases });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/openapi_check.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openapi_check.py");
    // The script reads all of its input before it writes anything: no deadlock.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request.to_string().as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().expect("openapi_check.py output");
    assert!(
        out.status.success(),
        "openapi_check.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "openapi_check.py printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

// ---------------------------------------------------------------------------------------
// Reading the document
// ---------------------------------------------------------------------------------------

/// Every operation of the document: (method, path, operation).
fn operations(document: &Value) -> Vec<(String, String, &Value)> {
    let methods = [
        "get", "put", "post", "delete", "patch", "options", "head", "trace",
    ];
    let paths = document["paths"].as_object().expect("paths");
    let mut all = Vec::new();
    for (path, item) in paths {
        for method in methods {
            if let Some(operation) = item.get(method) {
                all.push((method.to_owned(), path.clone(), operation));
            }
        }
    }
    all
}

/// The operation's key header parameter, if it has one.
fn key_parameter(operation: &Value) -> Option<&Value> {
    operation["parameters"].as_array()?.iter().find(|p| {
        p["in"] == "header"
            && p["name"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(KEY_HEADER))
    })
}

/// Whether `schema` refers to the problem component anywhere inside.
fn refers_to_problem(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => {
            map.get("$ref").is_some_and(|r| r == PROBLEM_REF) || map.values().any(refers_to_problem)
        }
        Value::Array(items) => items.iter().any(refers_to_problem),
        _ => false,
    }
}

/// The statuses whose `application/problem+json` body has the layer's problem schema.
fn problem_statuses(operation: &Value) -> BTreeSet<String> {
    let Some(responses) = operation["responses"].as_object() else {
        return BTreeSet::new();
    };
    responses
        .iter()
        .filter(|(_, r)| refers_to_problem(&r["content"]["application/problem+json"]["schema"]))
        .map(|(status, _)| status.clone())
        .collect()
}

/// The statuses that document `Idempotent-Replayed`.
fn replayed_statuses(operation: &Value) -> BTreeSet<String> {
    let Some(responses) = operation["responses"].as_object() else {
        return BTreeSet::new();
    };
    responses
        .iter()
        .filter(|(_, r)| r["headers"].get(REPLAYED).is_some())
        .map(|(status, _)| status.clone())
        .collect()
}

/// The `type` URIs the document allows for `status` of `operation`.
fn documented_types(operation: &Value, status: StatusCode) -> Vec<String> {
    fn collect(schema: &Value, out: &mut Vec<String>) {
        match schema {
            Value::Object(map) => {
                if let Some(types) = map
                    .get("properties")
                    .and_then(|p| p.get("type"))
                    .and_then(|t| t["enum"].as_array())
                {
                    out.extend(types.iter().filter_map(|t| t.as_str().map(str::to_owned)));
                }
                map.values().for_each(|v| collect(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let body = &operation["responses"][status.as_str()]["content"]["application/problem+json"];
    collect(&body["schema"], &mut out);
    out
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// The document passes openapi-spec-validator's OpenAPI 3.1 validation, and each example
/// matches its schema; the same checks reject a broken copy, so they are not a no-op.
#[tokio::test]
async fn the_document_is_valid_openapi_3_1() {
    let document = fetch_document(&app()).await;
    assert_eq!(document["openapi"], "3.1.0");
    let checked = check(&document, None, &[]);
    assert!(checked.validator.starts_with("openapi-spec-validator "));
    assert!(checked.errors.is_empty(), "{:#?}", checked.errors);
    // An example per problem type each covered route can answer: 8 on the three routes
    // that require a key, 7 on webhooks (no `idempotency-key-missing`).
    assert!(checked.examples_checked >= 3 * 8 + 7, "{checked:?}");

    let mut broken = document.clone();
    let cancel = &mut broken["paths"]["/orders/{id}/cancel"]["post"];
    cancel["parameters"][0]["required"] = json!(false); // a path parameter must be required
    let checked = check(&broken, None, &[]);
    assert!(
        !checked.errors.is_empty(),
        "the validator took a broken document"
    );

    let mut broken = document;
    let conflict = &mut broken["paths"]["/orders"]["post"]["responses"]["409"];
    conflict["content"]["application/problem+json"]["examples"]["request-in-flight"]["value"]
        ["status"] = json!(410);
    let checked = check(&broken, None, &[]);
    assert!(
        checked.errors.iter().any(|e| e.contains("410")),
        "an example against its schema was not checked: {:?}",
        checked.errors
    );
}

/// The key parameter, the layer's problem responses and `Idempotent-Replayed` are on the
/// covered operations and on no other.
#[tokio::test]
async fn idempotency_parts_are_on_exactly_the_covered_operations() {
    let document = fetch_document(&app()).await;
    let all = operations(&document);
    let covered: BTreeSet<(String, String)> = COVERED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let present: BTreeSet<_> = all.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    assert!(
        covered.is_subset(&present),
        "covered routes missing from {present:?}"
    );
    assert!(
        all.len() > covered.len(),
        "the GET routes are documented too"
    );

    for (method, path, operation) in &all {
        let is_covered = covered.contains(&(method.clone(), path.clone()));
        let key = key_parameter(operation);
        let problems = problem_statuses(operation);
        let replayed = replayed_statuses(operation);
        if !is_covered {
            assert!(key.is_none(), "{method} {path} has a key parameter");
            assert!(
                problems.is_empty(),
                "{method} {path} has layer problems {problems:?}"
            );
            assert!(
                replayed.is_empty(),
                "{method} {path} has {REPLAYED} on {replayed:?}"
            );
            continue;
        }
        let key = key.unwrap_or_else(|| panic!("{method} {path} has no key parameter"));
        assert_eq!(key["name"], KEY_HEADER);
        assert_eq!(key["schema"]["type"], "string");
        assert!(key["schema"]["pattern"].is_string(), "{key}");
        assert!(key["required"].is_boolean(), "{key}");
        let expected: BTreeSet<String> = LAYER_STATUSES.iter().map(|s| s.to_string()).collect();
        assert_eq!(problems, expected, "{method} {path}");
        // The 2xx the route answers, and nothing else: the layer's own answers and the
        // route's 4xx are never stored under the example's `successes` policy.
        let successes: BTreeSet<String> = operation["responses"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|s| s.starts_with('2'))
            .cloned()
            .collect();
        assert!(!successes.is_empty(), "{method} {path}");
        assert_eq!(replayed, successes, "{method} {path}");
        let conflict = &operation["responses"]["409"];
        assert!(conflict["headers"]["Retry-After"].is_object(), "{conflict}");
        assert_eq!(
            operation["responses"]["413"]["headers"]["Connection"]["schema"]["enum"][0],
            "close"
        );
        assert!(operation["responses"]["503"]["headers"]["Retry-After"].is_object());
    }
    let schema = &document["components"]["schemas"]["IdempotencyProblem"];
    for member in ["type", "title", "status", "detail"] {
        assert!(
            schema["properties"][member].is_object(),
            "{member}: {schema}"
        );
        assert!(schema["required"]
            .as_array()
            .unwrap()
            .contains(&json!(member)));
    }
}

/// What the document says is what the layer does: `required` is true exactly where a
/// request without a key gets 400 `idempotency-key-missing`; the problems the routes
/// answer carry a `type` the document lists for that status; a replay carries
/// `Idempotent-Replayed` on a status that documents it.
#[tokio::test]
async fn the_document_says_what_the_layer_does() {
    let app = app();
    let document = fetch_document(&app).await;
    let operation = |path: &str| document["paths"][path]["post"].clone();
    let post = |path: &str, key: Option<&str>, body: Value| {
        let mut request = Request::post(path)
            .header("authorization", "Bearer openapi")
            .header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.body(Body::from(body.to_string())).unwrap()
    };
    let pay = json!({ "amount": 100, "currency": "EUR" });
    let order = json!({ "item": "book" });
    let bodies = [
        ("/payments", "/payments", pay.clone()),
        ("/orders", "/orders", order.clone()),
        ("/orders/{id}/cancel", "/orders/o-1/cancel", json!({})),
        (
            "/webhooks/{source}",
            "/webhooks/stripe",
            json!({ "event": "x" }),
        ),
    ];
    let mut required_routes = 0;
    for (template, path, body) in &bodies {
        let op = operation(template);
        let required = key_parameter(&op).unwrap()["required"] == true;
        let reply = send(&app, post(path, None, body.clone())).await;
        let missing = reply.status == StatusCode::BAD_REQUEST
            && reply.json["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("idempotency-key-missing"));
        assert_eq!(
            required, missing,
            "{template}: required={required}, got {}",
            reply.status
        );
        required_routes += usize::from(required);
        if missing {
            let types = documented_types(&op, reply.status);
            assert!(
                types.contains(&reply.json["type"].as_str().unwrap().to_owned()),
                "{types:?}"
            );
        }

        // An invalid key (a space is not a key character): 400 idempotency-key-invalid.
        let reply = send(&app, post(path, Some("a b"), body.clone())).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{template}");
        let types = documented_types(&op, reply.status);
        assert!(
            types.contains(&reply.json["type"].as_str().unwrap().to_owned()),
            "{template}: {types:?}"
        );

        // First and replay: the replay's status documents the header.
        let key = format!("openapi-{}", template.len());
        let first = send(&app, post(path, Some(&key), body.clone())).await;
        assert!(first.status.is_success(), "{template}: {}", first.status);
        assert!(first.headers.get("idempotent-replayed").is_none());
        let replay = send(&app, post(path, Some(&key), body.clone())).await;
        assert_eq!(replay.headers["idempotent-replayed"], "true", "{template}");
        assert!(
            replayed_statuses(&op).contains(replay.status.as_str()),
            "{template}: {} is replayed but does not document {REPLAYED}",
            replay.status
        );
    }
    assert_eq!(
        required_routes, 3,
        "payments, orders and cancellations require a key"
    );

    // 422: the same key with another payload.
    let op = operation("/payments");
    let reused = send(
        &app,
        post(
            "/payments",
            Some("openapi-reused"),
            json!({ "amount": 1, "currency": "EUR" }),
        ),
    )
    .await;
    assert!(reused.status.is_success());
    let reused = send(
        &app,
        post(
            "/payments",
            Some("openapi-reused"),
            json!({ "amount": 2, "currency": "EUR" }),
        ),
    )
    .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let types = documented_types(&op, reused.status);
    assert!(
        types.contains(&reused.json["type"].as_str().unwrap().to_owned()),
        "{types:?}"
    );

    // 413 with `Connection: close`: a body over the webhooks route's limit (1 MiB).
    let op = operation("/webhooks/{source}");
    let huge = Request::post("/webhooks/big")
        .header("authorization", "Bearer openapi")
        .header("idempotency-key", "openapi-big")
        .body(Body::from(vec![b'x'; 1024 * 1024 + 1]))
        .unwrap();
    let too_large = send(&app, huge).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.headers["connection"], "close");
    let types = documented_types(&op, too_large.status);
    assert!(
        types.contains(&too_large.json["type"].as_str().unwrap().to_owned()),
        "{types:?}"
    );
}

/// The key parameter's `pattern` accepts exactly what the key parser accepts, by the
/// validator's own regex engine, on boundary lengths, quoting and escapes.
#[tokio::test]
async fn the_key_pattern_is_the_key_parser() {
    let document = fetch_document(&app()).await;
    let pattern = key_parameter(&document["paths"]["/payments"]["post"]).unwrap()["schema"]
        ["pattern"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases = key_cases();
    let checked = check(&document, Some(&pattern), &cases);
    assert_eq!(checked.matches.len(), cases.len());
    let mut wrong = Vec::new();
    for (case, matched) in cases.iter().zip(&checked.matches) {
        let accepted = IdempotencyKey::parse(case).is_ok();
        if accepted != *matched {
            wrong.push(format!(
                "{:?}: parser {accepted}, pattern {matched}",
                String::from_utf8_lossy(case)
            ));
        }
    }
    let valid = cases
        .iter()
        .filter(|c| IdempotencyKey::parse(c).is_ok())
        .count();
    assert!(
        valid > cases.len() / 5 && valid < cases.len() * 4 / 5,
        "{valid} of {}",
        cases.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} disagree: {wrong:#?}",
        wrong.len(),
        cases.len()
    );
}

/// Hand-picked keys, and deterministic pseudo-random ones (valid keys, bare and quoted,
/// with lengths around the limit, half of them spoiled by one byte from an alphabet rich
/// in what the rules are about: quotes, backslashes, spaces, bytes outside 0x21–0x7E).
fn key_cases() -> Vec<Vec<u8>> {
    let mut cases: Vec<Vec<u8>> = [
        &b""[..],
        b"a",
        b"\"\"",
        b"\"a\"",
        b"\"a",
        b"a\"",
        b"\"a\"b",
        b"\"a\\\"b\"",
        b"\"a\\\\b\"",
        b"\"a\\nb\"",
        b"\"a b\"",
        b"a b",
        b"\"\\\"\"",
        b"8e03978e-40d5-43e8-bc93-6894a57f9324",
        b"!~",
        b"\x7f",
        b"\xff",
        b"\t",
    ]
    .iter()
    .map(|c| c.to_vec())
    .collect();
    for n in [254, 255, 256] {
        cases.push(vec![b'k'; n]);
        let mut quoted = vec![b'"'];
        quoted.extend(vec![b'k'; n]);
        quoted.push(b'"');
        cases.push(quoted);
        // n escapes: 2n characters that unescape to n bytes.
        let mut escaped = vec![b'"'];
        for _ in 0..n {
            escaped.extend(b"\\\\");
        }
        escaped.push(b'"');
        cases.push(escaped);
    }
    const ALPHABET: &[u8] = b"aZ09~!#-_.\"\"\\\\  \x7f\xff\x1f[]{}";
    let mut state: u64 = 0x5eed_0f0a_e1d5;
    let mut next = move |bound: usize| {
        // xorshift64*: deterministic, so a failure names a case that comes back.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % bound
    };
    for i in 0..3000 {
        let len = match i % 3 {
            0 => next(6),
            1 => 250 + next(12),
            _ => next(300),
        };
        // A key of `len` visible ASCII bytes, bare or quoted (escaping `"` and `\`) ...
        let quoted = i % 2 == 0;
        let mut case = Vec::new();
        for _ in 0..len {
            let c = b'!' + next(94) as u8;
            if quoted && (c == b'"' || c == b'\\') {
                case.push(b'\\');
            }
            case.push(c);
        }
        if !quoted && case.first() == Some(&b'"') {
            case[0] = b'q';
        }
        if quoted {
            case.insert(0, b'"');
            case.push(b'"');
        }
        // ... and half of them with one byte from the alphabet inserted anywhere.
        if next(2) == 0 {
            let at = next(case.len() + 1);
            case.insert(at, ALPHABET[next(ALPHABET.len())]);
        }
        cases.push(case);
    }
    cases
}
