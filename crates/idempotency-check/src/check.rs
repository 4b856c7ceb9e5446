//! The checks themselves: [`run`] sends the requests, one fresh key per check, and
//! judges the answers.
//!
//! Every check uses keys of its own (`ic-<16 random hex digits>-<check>`), so a run
//! never collides with another run or with earlier data, and checks run one after the
//! other, so execution counts taken before and after a check belong to it alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::Method;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::config::{Config, ConfigError, InFlightMode};
use crate::http::{chain, connect, send, snippet, HttpError, Outgoing, Reply};
use crate::progress::Progress;
use crate::report::{Check, Outcome, Report, Verdict};

/// How long the in-flight check waits after sending the slow request before it sends
/// the duplicate: long enough for the first request to reach the handler.
pub const IN_FLIGHT_DELAY: Duration = Duration::from_millis(300);
/// How long past `--ttl-secs` (counted from the first answer) the expiry check waits.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(1);
/// The replay marker Stripe sends and this checker looks for.
pub const REPLAY_HEADER: &str = "idempotent-replayed";

/// Response headers that describe the result, so a replay must carry them as the first
/// answer did.
const MUST_REPLAY: [&str; 7] = [
    "content-type",
    "content-language",
    "content-location",
    "content-disposition",
    "location",
    "link",
    "etag",
];

/// Response headers that may legitimately differ or vanish on a replay: per-message
/// framing, time, cookies and tracing.
const MAY_VARY: [&str; 16] = [
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "set-cookie",
    "age",
    "server-timing",
    "x-request-id",
    "request-id",
    "x-correlation-id",
    "traceparent",
    "tracestate",
    "x-trace-id",
    "retry-after",
    REPLAY_HEADER,
];

/// Runs every check against the API `config` describes and reports the verdicts.
///
/// The only error is a bad configuration ([`Config::validate`]); everything the API
/// does, including not answering, is a verdict in the [`Report`]. A run against a good
/// API takes a few seconds, plus `--ttl-secs` when given.
///
/// # Example
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idempotency_check::ConfigError> {
/// use idempotency_check::{run, Config, InFlightMode};
///
/// let config = Config::new("http://127.0.0.1:3000/payments", r#"{"amount": 1000, "currency": "EUR"}"#)?
///     .header_line("Authorization: Bearer alice")?
///     .in_flight(InFlightMode::Wait);
/// let report = run(&config).await?;
/// println!("{report}");
/// std::process::exit(report.exit_code().into());
/// # }
/// ```
pub async fn run(config: &Config) -> Result<Report, ConfigError> {
    config.validate()?;
    let started = Instant::now();
    let mut runner = Runner::new(config);
    runner.all().await;
    let mut outcomes = runner.outcomes;
    outcomes.sort_by_key(|o| Check::ALL.iter().position(|c| *c == o.check));
    Ok(Report {
        url: config.target.url.clone(),
        method: config.method.to_string(),
        outcomes,
        duration: started.elapsed(),
    })
}

/// Whose request: the caller of `-H`, or the other tenant of `--other-tenant-header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tenant {
    First,
    Other,
}

/// The key header(s) of a request.
#[derive(Clone, Debug)]
enum Key {
    None,
    One(HeaderValue),
    Two(HeaderValue, HeaderValue),
}

struct Runner<'a> {
    config: &'a Config,
    run_id: String,
    progress: Progress,
    /// Execution counts are usable (an executions URL answered at the start).
    counting: bool,
    /// Counts that failed after the start, for the executions outcome.
    count_errors: Vec<String>,
    /// What the executions URL answered at the start, for the executions outcome.
    count_note: String,
    /// The idempotency error answers seen (label, reply), for the problem+json check.
    errors: Vec<(&'static str, Reply)>,
    outcomes: Vec<Outcome>,
}

impl<'a> Runner<'a> {
    fn new(config: &'a Config) -> Runner<'a> {
        Runner {
            config,
            run_id: run_id(),
            progress: Progress::new(config.progress),
            counting: false,
            count_errors: Vec::new(),
            count_note: String::new(),
            errors: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    fn record(
        &mut self,
        check: Check,
        verdict: Verdict,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) {
        self.outcomes.push(Outcome {
            check,
            verdict,
            expected: expected.into(),
            got: got.into(),
        });
    }

    fn skip(&mut self, check: Check, expected: impl Into<String>, why: impl Into<String>) {
        self.record(check, Verdict::Skip, expected, why);
    }

    async fn all(&mut self) {
        self.start_counting().await;
        let baseline = self.baseline().await;
        if let Some(baseline) = baseline {
            self.replay().await;
            self.payload_mismatch().await;
            self.concurrency().await;
            self.in_flight().await;
            self.tenant_scope().await;
            self.key_validation().await;
            self.error_releases_key().await;
            self.problem_json();
            self.expiry(&baseline).await;
        } else {
            for check in Check::ALL {
                if !matches!(check, Check::Executions | Check::Baseline) {
                    self.skip(check, "", "not run: the baseline request did not succeed");
                }
            }
        }
        self.finish_counting();
    }

    // -----------------------------------------------------------------------------------
    // Requests
    // -----------------------------------------------------------------------------------

    fn key(&self, label: &str) -> HeaderValue {
        key_value(&format!("ic-{}-{label}", self.run_id))
    }

    /// The headers of `tenant`: `-H`, with `--other-tenant-header` replacing its names
    /// for the other tenant, plus `Content-Type: application/json` (unless one is set)
    /// when `body` is, plus the key.
    fn headers(&self, tenant: Tenant, key: &Key, body: bool) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers: Vec<(HeaderName, HeaderValue)> = match tenant {
            Tenant::First => self.config.headers.clone(),
            Tenant::Other => {
                let replaced: Vec<&HeaderName> =
                    self.config.other_tenant.iter().map(|(n, _)| n).collect();
                self.config
                    .headers
                    .iter()
                    .filter(|(name, _)| !replaced.contains(&name))
                    .chain(self.config.other_tenant.iter())
                    .cloned()
                    .collect()
            }
        };
        if body && !headers.iter().any(|(name, _)| *name == CONTENT_TYPE) {
            headers.push((CONTENT_TYPE, HeaderValue::from_static("application/json")));
        }
        let name = &self.config.key_header;
        match key {
            Key::None => {}
            Key::One(v) => headers.push((name.clone(), v.clone())),
            Key::Two(a, b) => {
                headers.push((name.clone(), a.clone()));
                headers.push((name.clone(), b.clone()));
            }
        }
        headers
    }

    fn outgoing(&self, tenant: Tenant, key: &Key, body: &Bytes) -> Outgoing {
        Outgoing {
            method: self.config.method.clone(),
            headers: self.headers(tenant, key, true),
            body: body.clone(),
        }
    }

    async fn post(&self, tenant: Tenant, key: &Key, body: &Bytes) -> Result<Reply, HttpError> {
        let request = self.outgoing(tenant, key, body);
        send(&self.config.target, &request, self.config.timeout).await
    }

    // -----------------------------------------------------------------------------------
    // Execution counts
    // -----------------------------------------------------------------------------------

    async fn fetch_count(&self, tenant: Tenant) -> Result<u64, String> {
        let Some(executions) = &self.config.executions else {
            return Err("no --executions-url".into());
        };
        let request = Outgoing {
            method: Method::GET,
            headers: self.headers(tenant, &Key::None, false),
            body: Bytes::new(),
        };
        let reply = send(&executions.target, &request, self.config.timeout)
            .await
            .map_err(|e| format!("GET {}: {}", executions.target.url, chain(&e)))?;
        if !reply.status.is_success() {
            return Err(format!(
                "GET {} answered {}",
                executions.target.url,
                reply.summary()
            ));
        }
        let document: serde_json::Value = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("GET {} is not JSON: {e}", executions.target.url))?;
        let pointer = &executions.pointer;
        match document.pointer(pointer) {
            Some(serde_json::Value::Array(items)) => Ok(items.len() as u64),
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => {
                Ok(n.as_u64().unwrap_or_default())
            }
            Some(other) => Err(format!(
                "GET {} at {:?} is {}, neither an array nor a non-negative integer",
                executions.target.url,
                pointer,
                snippet(other.to_string().as_bytes(), 40)
            )),
            None => Err(format!(
                "GET {} has nothing at {pointer:?}",
                executions.target.url
            )),
        }
    }

    /// The count now, or `None` when counts are off (or this one failed).
    async fn count(&mut self, tenant: Tenant) -> Option<u64> {
        if !self.counting {
            return None;
        }
        match self.fetch_count(tenant).await {
            Ok(n) => Some(n),
            Err(e) => {
                self.count_errors.push(e);
                None
            }
        }
    }

    async fn start_counting(&mut self) {
        if self.config.executions.is_none() {
            return;
        }
        let first = self.fetch_count(Tenant::First).await;
        let other = if self.config.other_tenant.is_empty() {
            None
        } else {
            Some(self.fetch_count(Tenant::Other).await)
        };
        match (first, other) {
            (Ok(a), None) => {
                self.counting = true;
                self.count_note = format!("{a} for the caller at the start");
            }
            (Ok(a), Some(Ok(b))) => {
                self.counting = true;
                self.count_note =
                    format!("{a} for the caller, {b} for the other tenant at the start");
            }
            (Err(e), _) | (_, Some(Err(e))) => self.count_errors.push(e),
        }
    }

    fn finish_counting(&mut self) {
        let expected = "a JSON count of the caller's executions";
        if self.config.executions.is_none() {
            self.skip(
                Check::Executions,
                expected,
                "no --executions-url: execution counts are not checked",
            );
        } else if let Some(first) = self.count_errors.first().cloned() {
            let more = self.count_errors.len() - 1;
            let got = if self.counting {
                format!("{first} (and {more} more): some counts are missing")
            } else {
                format!("{first}: execution counts are not checked")
            };
            self.record(Check::Executions, Verdict::Fail, expected, got);
        } else {
            let got = self.count_note.clone();
            self.record(Check::Executions, Verdict::Pass, expected, got);
        }
    }

    // -----------------------------------------------------------------------------------
    // The checks
    // -----------------------------------------------------------------------------------

    /// A fresh key with `--body` must succeed; its key is the expiry check's.
    async fn baseline(&mut self) -> Option<(HeaderValue, Reply)> {
        let expected = "a fresh key with --body → 2xx";
        let key = self.key("expiry");
        match self
            .post(
                Tenant::First,
                &Key::One(key.clone()),
                &self.config.body.clone(),
            )
            .await
        {
            Ok(reply) if reply.status.is_success() => {
                let got = reply.summary();
                self.record(Check::Baseline, Verdict::Pass, expected, got);
                Some((key, reply))
            }
            Ok(reply) => {
                let got = format!("{} (check --url, -H and --body)", reply.summary());
                self.record(Check::Baseline, Verdict::Fail, expected, got);
                None
            }
            Err(e) => {
                self.record(Check::Baseline, Verdict::Fail, expected, chain(&e));
                None
            }
        }
    }

    /// Same key and body twice: the replay, its headers and marker, one execution.
    async fn replay(&mut self) {
        let key = Key::One(self.key("replay"));
        let body = self.config.body.clone();
        let before = self.count(Tenant::First).await;
        let first = self.post(Tenant::First, &key, &body).await;
        let retry = self.post(Tenant::First, &key, &body).await;
        let after = self.count(Tenant::First).await;
        let expected = "the retry: same status, byte-identical body";
        let (first, retry) = match (first, retry) {
            (Ok(first), Ok(retry)) if first.status.is_success() => (first, retry),
            (Ok(first), Ok(_)) => {
                let got = format!("the first request got {}", first.summary());
                self.record(Check::Replay, Verdict::Fail, expected, got);
                for check in [
                    Check::ReplayHeaders,
                    Check::ReplayMarker,
                    Check::FirstUnmarked,
                    Check::OneExecution,
                ] {
                    self.skip(check, "", "not run: the first request did not succeed");
                }
                return;
            }
            (Err(e), _) | (_, Err(e)) => {
                self.record(Check::Replay, Verdict::Fail, expected, chain(&e));
                for check in [
                    Check::ReplayHeaders,
                    Check::ReplayMarker,
                    Check::FirstUnmarked,
                    Check::OneExecution,
                ] {
                    self.skip(check, "", "not run: a request failed");
                }
                return;
            }
        };
        let same = retry.status == first.status && retry.body == first.body;
        if same {
            let got = format!(
                "{} twice, bodies byte-identical ({} bytes)",
                first.status.as_u16(),
                first.body.len()
            );
            self.record(Check::Replay, Verdict::Pass, expected, got);
        } else {
            let got = format!(
                "first {}; retry {}{}",
                first.summary(),
                retry.summary(),
                first_difference(&first.body, &retry.body)
            );
            self.record(Check::Replay, Verdict::Fail, expected, got);
        }

        // Headers.
        let expected_headers = "the result's headers (Content-Type, Location, ...) replayed";
        if same {
            let (verdict, got) = compare_headers(&first, &retry);
            self.record(Check::ReplayHeaders, verdict, expected_headers, got);
        } else {
            self.skip(
                Check::ReplayHeaders,
                expected_headers,
                "not judged: the retry was not a replay",
            );
        }

        // The marker, on the replay only.
        let expected_marker = "Idempotent-Replayed: true on the replay";
        if !same {
            self.skip(
                Check::ReplayMarker,
                expected_marker,
                "not judged: the retry was not a replay",
            );
        } else if is_marked(&retry) {
            self.record(
                Check::ReplayMarker,
                Verdict::Pass,
                expected_marker,
                "Idempotent-Replayed: true",
            );
        } else {
            let got = match other_marker(&retry) {
                Some(other) => format!(
                    "no Idempotent-Replayed; a marker of its own: {other} (the draft requires none)"
                ),
                None => "no replay marker (the draft requires none)".to_string(),
            };
            self.record(Check::ReplayMarker, Verdict::Warn, expected_marker, got);
        }
        let expected_unmarked = "no Idempotent-Replayed: true on the first answer";
        if is_marked(&first) {
            self.record(
                Check::FirstUnmarked,
                Verdict::Fail,
                expected_unmarked,
                "the first answer says Idempotent-Replayed: true",
            );
        } else {
            self.record(
                Check::FirstUnmarked,
                Verdict::Pass,
                expected_unmarked,
                "unmarked",
            );
        }

        // One execution for the two requests.
        let expected_once = "1 execution for the request and its retry";
        match ran(before, after) {
            Some(1) => self.record(
                Check::OneExecution,
                Verdict::Pass,
                expected_once,
                "1 execution",
            ),
            Some(n) => {
                let got = format!("{n} executions");
                self.record(Check::OneExecution, Verdict::Fail, expected_once, got);
            }
            None => self.skip(
                Check::OneExecution,
                expected_once,
                "not counted (no --executions-url)",
            ),
        }
    }

    /// Same key, another body: 422, and no execution.
    async fn payload_mismatch(&mut self) {
        let expected = "same key, different body → 422, nothing run";
        let key = Key::One(self.key("mismatch"));
        let body = self.config.body.clone();
        let other = self.config.other_body_or_derived();
        let first = match self.post(Tenant::First, &key, &body).await {
            Ok(first) if first.status.is_success() => first,
            Ok(first) => {
                let got = format!("not judged: the first request got {}", first.summary());
                return self.skip(Check::PayloadMismatch, expected, got);
            }
            Err(e) => {
                return self.record(Check::PayloadMismatch, Verdict::Fail, expected, chain(&e))
            }
        };
        let before = self.count(Tenant::First).await;
        let second = self.post(Tenant::First, &key, &other).await;
        let after = self.count(Tenant::First).await;
        let second = match second {
            Ok(second) => second,
            Err(e) => {
                return self.record(Check::PayloadMismatch, Verdict::Fail, expected, chain(&e))
            }
        };
        let status = second.status.as_u16();
        if second.status.is_client_error() {
            self.errors.push(("payload-mismatch", second.clone()));
        }
        let runs = ran(before, after);
        let (verdict, got) = match status {
            _ if runs.is_some_and(|n| n > 0) => (
                Verdict::Fail,
                format!(
                    "{}, and the different body ran ({} execution(s))",
                    second.summary(),
                    runs.unwrap_or(0)
                ),
            ),
            422 => (Verdict::Pass, second.summary()),
            400 => (
                Verdict::Fail,
                format!(
                    "{}: the draft asks 422 for a reused key (400 is for a missing one)",
                    second.summary()
                ),
            ),
            _ if second.status.is_success() && second.body == first.body => (
                Verdict::Fail,
                format!("{status}: replayed the first answer to a different payload"),
            ),
            _ if second.status.is_success() => (
                Verdict::Fail,
                format!(
                    "{}: ran the different payload as a new operation",
                    second.summary()
                ),
            ),
            _ => (Verdict::Fail, second.summary()),
        };
        self.record(Check::PayloadMismatch, verdict, expected, got);
    }

    /// `--concurrency` requests at once with one fresh key.
    async fn concurrency(&mut self) {
        let n = self.config.concurrency;
        let expected = format!("{n} at once with one key → 1 execution, every 2xx the same body");
        let key = Key::One(self.key("concurrency"));
        let request = self.outgoing(Tenant::First, &key, &self.config.body.clone());
        let before = self.count(Tenant::First).await;

        // Open every connection first, then send every request at once.
        let mut connections = Vec::with_capacity(n);
        for _ in 0..n {
            match connect(&self.config.target, self.config.timeout).await {
                Ok(c) => connections.push(c),
                Err(e) => {
                    let got = format!("could not open {n} connections: {}", chain(&e));
                    return self.record(Check::Concurrency, Verdict::Fail, expected, got);
                }
            }
        }
        let bar = self
            .progress
            .bar(n as u64, format!("concurrency: {n} requests, one key"));
        let barrier = Arc::new(Barrier::new(n));
        let mut tasks = JoinSet::new();
        for connection in connections {
            let barrier = barrier.clone();
            let request = request.clone();
            let target = self.config.target.clone();
            let timeout = self.config.timeout;
            let bar = bar.clone();
            tasks.spawn(async move {
                barrier.wait().await;
                let reply = connection.send(&target, &request, timeout).await;
                bar.inc(1);
                reply
            });
        }
        let mut replies = Vec::with_capacity(n);
        let mut failures = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(reply)) => replies.push(reply),
                Ok(Err(e)) => failures.push(chain(&e)),
                Err(e) => failures.push(format!("task failed: {e}")),
            }
        }
        bar.finish_and_clear();
        let after = self.count(Tenant::First).await;

        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for r in &replies {
            *statuses.entry(r.status.as_u16()).or_default() += 1;
        }
        let histogram = statuses
            .iter()
            .map(|(s, k)| format!("{k}×{s}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut bodies: Vec<&Bytes> = replies
            .iter()
            .filter(|r| r.status.is_success())
            .map(|r| &r.body)
            .collect();
        bodies.sort();
        bodies.dedup();
        if let Some(conflict) = replies.iter().find(|r| r.status.is_client_error()) {
            self.errors.push(("concurrency", conflict.clone()));
        }
        let runs = ran(before, after);
        let runs_text = match runs {
            Some(1) => "1 execution".to_string(),
            Some(k) => format!("{k} executions"),
            None => "executions not counted".to_string(),
        };
        let bodies_text = match bodies.len() {
            0 => "no 2xx".to_string(),
            1 => "one 2xx body".to_string(),
            k => format!("{k} different 2xx bodies"),
        };
        let mut problems = Vec::new();
        if !failures.is_empty() {
            problems.push(format!("{} failed: {}", failures.len(), failures[0]));
        }
        if statuses.keys().any(|s| *s >= 500) {
            problems.push("a 5xx under concurrency".to_string());
        }
        if let Some(other) = statuses
            .keys()
            .find(|s| !(200..300).contains(*s) && **s != 409 && **s < 500)
        {
            problems.push(format!("{other}: neither 2xx nor 409"));
        }
        let wrong = !problems.is_empty() || bodies.len() != 1 || runs.is_some_and(|k| k != 1);
        let mut got = format!(
            "{} answers: {histogram}; {bodies_text}; {runs_text}",
            replies.len()
        );
        if !problems.is_empty() {
            got = format!("{got} — {}", problems.join("; "));
        }
        let verdict = if wrong { Verdict::Fail } else { Verdict::Pass };
        self.record(Check::Concurrency, verdict, expected, got);
    }

    /// A duplicate sent while `--slow-body` runs.
    async fn in_flight(&mut self) {
        let mode = self.config.in_flight;
        let expected = match mode {
            InFlightMode::Conflict => "a duplicate while the first runs → 409, 1 execution",
            InFlightMode::Wait => {
                "a duplicate while the first runs → the first's answer, 1 execution"
            }
            InFlightMode::Any => {
                "a duplicate while the first runs → 409 or the first's answer, 1 execution"
            }
        };
        let Some(slow) = self.config.slow_body.clone() else {
            return self.skip(Check::InFlight, expected, "no --slow-body");
        };
        let key = Key::One(self.key("in-flight"));
        let request = self.outgoing(Tenant::First, &key, &slow);
        let before = self.count(Tenant::First).await;
        let target = self.config.target.clone();
        let timeout = self.config.timeout;
        let started = Instant::now();
        let spinner = self.progress.spinner(format!(
            "in flight: a duplicate while the slow request runs ({mode})"
        ));
        let first_task = {
            let request = request.clone();
            tokio::spawn(async move { send(&target, &request, timeout).await })
        };
        tokio::time::sleep(IN_FLIGHT_DELAY).await;
        let duplicate_sent = Instant::now();
        let duplicate = send(&self.config.target, &request, timeout).await;
        let first = match first_task.await {
            Ok(first) => first,
            Err(e) => {
                spinner.finish_and_clear();
                let got = format!("the slow request's task failed: {e}");
                return self.record(Check::InFlight, Verdict::Fail, expected, got);
            }
        };
        spinner.finish_and_clear();
        let after = self.count(Tenant::First).await;

        let first = match first {
            Ok(first) if first.status.is_success() => first,
            Ok(first) => {
                let got = format!(
                    "not judged: the slow request got {} (--slow-body must succeed)",
                    first.summary()
                );
                return self.skip(Check::InFlight, expected, got);
            }
            Err(e) => {
                let got = format!("the slow request failed: {}", chain(&e));
                return self.record(Check::InFlight, Verdict::Fail, expected, got);
            }
        };
        if first.at <= duplicate_sent {
            let got = format!(
                "not judged: the slow request answered after {} ms, before the duplicate went out \
                 ({} ms): make --slow-body slower",
                first.at.duration_since(started).as_millis(),
                IN_FLIGHT_DELAY.as_millis()
            );
            return self.skip(Check::InFlight, expected, got);
        }
        let duplicate = match duplicate {
            Ok(d) => d,
            Err(e) => {
                let got = format!("the duplicate failed: {}", chain(&e));
                return self.record(Check::InFlight, Verdict::Fail, expected, got);
            }
        };
        if duplicate.status.is_client_error() {
            self.errors.push(("in-flight", duplicate.clone()));
        }
        let waited = duplicate.at.duration_since(duplicate_sent).as_millis();
        let runs = ran(before, after);
        let replayed = duplicate.status == first.status && duplicate.body == first.body;
        let (verdict, mut got) = if duplicate.status.as_u16() == 409 {
            match mode {
                InFlightMode::Conflict | InFlightMode::Any => (
                    Verdict::Pass,
                    format!("409 after {waited} ms, while the first ran"),
                ),
                InFlightMode::Wait => (
                    Verdict::Fail,
                    format!(
                        "{} after {waited} ms; --in-flight wait expects the first's answer",
                        duplicate.summary()
                    ),
                ),
            }
        } else if replayed {
            match mode {
                InFlightMode::Wait | InFlightMode::Any => (
                    Verdict::Pass,
                    format!(
                        "waited {waited} ms, then the first's {} (same body)",
                        first.status.as_u16()
                    ),
                ),
                InFlightMode::Conflict => (
                    Verdict::Fail,
                    format!(
                        "waited {waited} ms and replayed the first's {}; the draft asks 409 \
                         (--in-flight wait if the API documents waiting)",
                        first.status.as_u16()
                    ),
                ),
            }
        } else if duplicate.status.is_success() {
            (
                Verdict::Fail,
                format!(
                    "{}: the duplicate ran as a second operation (its own body)",
                    duplicate.summary()
                ),
            )
        } else {
            (
                Verdict::Fail,
                format!("{} after {waited} ms", duplicate.summary()),
            )
        };
        let verdict = match runs {
            Some(1) | None => verdict,
            Some(k) => {
                got = format!("{got}; {k} executions");
                Verdict::Fail
            }
        };
        if runs == Some(1) {
            got.push_str("; 1 execution");
        }
        self.record(Check::InFlight, verdict, expected, got);
    }

    /// The same key from the other tenant.
    async fn tenant_scope(&mut self) {
        let expected = "the other tenant's same key → a new operation, never the first's answer";
        if self.config.other_tenant.is_empty() {
            return self.skip(Check::TenantScope, expected, "no --other-tenant-header");
        }
        let key = Key::One(self.key("scope"));
        let body = self.config.body.clone();
        let first = match self.post(Tenant::First, &key, &body).await {
            Ok(first) if first.status.is_success() => first,
            Ok(first) => {
                let got = format!(
                    "not judged: the first tenant's request got {}",
                    first.summary()
                );
                return self.skip(Check::TenantScope, expected, got);
            }
            Err(e) => return self.record(Check::TenantScope, Verdict::Fail, expected, chain(&e)),
        };
        let before = self.count(Tenant::Other).await;
        let other = self.post(Tenant::Other, &key, &body).await;
        let after = self.count(Tenant::Other).await;
        let other = match other {
            Ok(other) => other,
            Err(e) => return self.record(Check::TenantScope, Verdict::Fail, expected, chain(&e)),
        };
        let runs = ran(before, after);
        let status = other.status.as_u16();
        let (verdict, got) = if other.status.is_success() {
            // The count is the evidence when there is one; else the body and the marker.
            let identical = other.body == first.body;
            match runs {
                Some(1) if identical => (
                    Verdict::Pass,
                    format!("{status}, 1 execution for the other tenant (a body byte-identical to the first's)"),
                ),
                Some(1) => (
                    Verdict::Pass,
                    format!("{status} with its own body; 1 execution for the other tenant"),
                ),
                Some(0) if identical => (
                    Verdict::Fail,
                    format!("{status} with the first tenant's body, byte for byte, and nothing ran: a tenant leak"),
                ),
                Some(0) => (
                    Verdict::Fail,
                    format!("{}, but nothing ran for the other tenant", other.summary()),
                ),
                Some(k) => (
                    Verdict::Fail,
                    format!("{status}; {k} executions for the other tenant"),
                ),
                None if identical => (
                    Verdict::Fail,
                    format!("{status} with the first tenant's body, byte for byte: a tenant leak"),
                ),
                None if is_marked(&other) => (
                    Verdict::Fail,
                    format!("{status} marked Idempotent-Replayed: the other tenant got a replay"),
                ),
                None => (Verdict::Pass, format!("{status} with its own body")),
            }
        } else if status == 409 || status == 422 {
            (
                Verdict::Fail,
                format!("{}: the key collides across tenants", other.summary()),
            )
        } else if other.status.is_client_error() {
            return self.skip(
                Check::TenantScope,
                expected,
                format!(
                    "not judged: the other tenant's request got {} (check --other-tenant-header)",
                    other.summary()
                ),
            );
        } else {
            (Verdict::Fail, other.summary())
        };
        self.record(Check::TenantScope, verdict, expected, got);
    }

    /// Missing, empty, too long, control character, two fields.
    async fn key_validation(&mut self) {
        let long = {
            let mut k = format!("ic-{}-long-", self.run_id);
            while k.len() < 256 {
                k.push('x');
            }
            key_value(&k)
        };
        let control = HeaderValue::from_bytes(format!("ic-{}-ctl\tx", self.run_id).as_bytes())
            .unwrap_or_else(|_| HeaderValue::from_static("ic-ctl\tx"));
        let cases = [
            (Check::KeyMissing, "no key", Key::None),
            (
                Check::KeyEmpty,
                "an empty key",
                Key::One(HeaderValue::from_static("")),
            ),
            (Check::KeyTooLong, "a 256-byte key", Key::One(long)),
            (
                Check::KeyControlChar,
                "a key with a tab (0x09) inside",
                Key::One(control),
            ),
            (
                Check::KeyTwoFields,
                "two key fields",
                Key::Two(self.key("two-a"), self.key("two-b")),
            ),
        ];
        let body = self.config.body.clone();
        for (check, what, key) in cases {
            let pass_through = check == Check::KeyMissing && !self.config.key_required;
            let expected = if pass_through {
                format!("{what} → 2xx: it passes through (--key-optional)")
            } else {
                format!("{what} → 4xx, never 5xx, nothing run")
            };
            let before = self.count(Tenant::First).await;
            let reply = self.post(Tenant::First, &key, &body).await;
            let after = self.count(Tenant::First).await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    self.record(check, Verdict::Fail, expected, chain(&e));
                    continue;
                }
            };
            let runs = ran(before, after);
            let status = reply.status.as_u16();
            let (verdict, got) = if pass_through {
                if reply.status.is_success() {
                    (Verdict::Pass, format!("{status}: passed through"))
                } else {
                    (Verdict::Fail, reply.summary())
                }
            } else if reply.status.is_client_error() {
                self.errors.push((check.id(), reply.clone()));
                match runs {
                    Some(k) if k > 0 => (
                        Verdict::Fail,
                        format!(
                            "{}, but the operation ran ({k} execution(s))",
                            reply.summary()
                        ),
                    ),
                    _ => (Verdict::Pass, reply.summary()),
                }
            } else if reply.status.is_success() {
                let runs = match runs {
                    Some(k) => format!(" ({k} execution(s))"),
                    None => String::new(),
                };
                (Verdict::Fail, format!("{status}: accepted{runs}"))
            } else {
                (Verdict::Fail, reply.summary())
            };
            self.record(check, verdict, expected, got);
        }
    }

    /// A rejected body, then the corrected one with the same key.
    async fn error_releases_key(&mut self) {
        let expected = "--bad-body → 4xx; then --body with the same key → runs (2xx)";
        let key = Key::One(self.key("release"));
        let bad = self.config.bad_body_or_derived();
        let body = self.config.body.clone();
        let rejected = match self.post(Tenant::First, &key, &bad).await {
            Ok(r) if r.status.is_client_error() => r,
            Ok(r) => {
                let got = format!(
                    "not judged: --bad-body got {} (give one the API rejects with a 4xx)",
                    r.summary()
                );
                return self.skip(Check::ErrorReleasesKey, expected, got);
            }
            Err(e) => {
                return self.record(Check::ErrorReleasesKey, Verdict::Fail, expected, chain(&e))
            }
        };
        let before = self.count(Tenant::First).await;
        let corrected = self.post(Tenant::First, &key, &body).await;
        let after = self.count(Tenant::First).await;
        let corrected = match corrected {
            Ok(c) => c,
            Err(e) => {
                return self.record(Check::ErrorReleasesKey, Verdict::Fail, expected, chain(&e))
            }
        };
        let runs = ran(before, after);
        let first = rejected.status.as_u16();
        let status = corrected.status.as_u16();
        let (verdict, got) = if corrected.status.is_success() {
            match runs {
                Some(1) => (
                    Verdict::Pass,
                    format!("{first}, then {status}; 1 execution"),
                ),
                Some(0) => (
                    Verdict::Fail,
                    format!("{first}, then {status} but nothing ran"),
                ),
                Some(k) => (
                    Verdict::Fail,
                    format!("{first}, then {status}; {k} executions"),
                ),
                None if is_marked(&corrected) => (
                    Verdict::Fail,
                    format!("{first}, then {status} marked Idempotent-Replayed"),
                ),
                None => (Verdict::Pass, format!("{first}, then {status}")),
            }
        } else if corrected.status == rejected.status && corrected.body == rejected.body {
            (
                Verdict::Fail,
                format!("{first}, then the same {status} replayed: the 4xx used up the key"),
            )
        } else if status == 422 {
            (
                Verdict::Fail,
                format!("{first}, then 422: the rejected request's payload stayed with the key"),
            )
        } else if status == 409 {
            (
                Verdict::Fail,
                format!("{first}, then 409: the key is still held"),
            )
        } else {
            (
                Verdict::Fail,
                format!("{first}, then {}", corrected.summary()),
            )
        };
        self.record(Check::ErrorReleasesKey, verdict, expected, got);
    }

    /// The idempotency errors seen: `application/problem+json` of RFC 9457's shape.
    fn problem_json(&mut self) {
        let expected = "idempotency errors as application/problem+json (RFC 9457)";
        if self.errors.is_empty() {
            return self.skip(
                Check::ProblemJson,
                expected,
                "no idempotency error answer seen",
            );
        }
        let mut plain = Vec::new();
        let mut malformed = Vec::new();
        for (label, reply) in &self.errors {
            match problem_shape(reply) {
                Shape::Problem => {}
                Shape::NotProblem(content_type) => {
                    plain.push(format!(
                        "{label} {} ({content_type})",
                        reply.status.as_u16()
                    ));
                }
                Shape::Malformed(why) => {
                    malformed.push(format!("{label} {}: {why}", reply.status.as_u16()));
                }
            }
        }
        let n = self.errors.len();
        if !malformed.is_empty() {
            let got = format!("malformed problem+json: {}", malformed.join("; "));
            self.record(Check::ProblemJson, Verdict::Fail, expected, got);
        } else if !plain.is_empty() {
            let got = format!(
                "{} of {n} are not problem+json: {}",
                plain.len(),
                plain.join(", ")
            );
            self.record(Check::ProblemJson, Verdict::Warn, expected, got);
        } else {
            let labels: Vec<&str> = self.errors.iter().map(|(l, _)| *l).collect();
            let got = format!("{n} of {n}: {}", labels.join(", "));
            self.record(Check::ProblemJson, Verdict::Pass, expected, got);
        }
    }

    /// After `--ttl-secs` (from the baseline's answer, plus a margin), the baseline's key
    /// runs again.
    async fn expiry(&mut self, baseline: &(HeaderValue, Reply)) {
        let expected = "after the TTL, the same key and body → a new operation";
        let Some(ttl) = self.config.ttl else {
            return self.skip(Check::Expiry, expected, "no --ttl-secs");
        };
        let (key, first) = baseline;
        let due = first.at + ttl + EXPIRY_MARGIN;
        let now = Instant::now();
        if due > now {
            let wait = due - now;
            let secs = wait.as_secs() + 1;
            let bar = self.progress.countdown(
                secs,
                format!("expiry: waiting for the TTL ({} s)", ttl.as_secs()),
            );
            let end = tokio::time::Instant::now() + wait;
            while tokio::time::Instant::now() < end {
                let step = (end - tokio::time::Instant::now()).min(Duration::from_secs(1));
                tokio::time::sleep(step).await;
                bar.inc(1);
            }
            bar.finish_and_clear();
        }
        let before = self.count(Tenant::First).await;
        let again = self
            .post(
                Tenant::First,
                &Key::One(key.clone()),
                &self.config.body.clone(),
            )
            .await;
        let after = self.count(Tenant::First).await;
        let again = match again {
            Ok(a) => a,
            Err(e) => return self.record(Check::Expiry, Verdict::Fail, expected, chain(&e)),
        };
        let since = again.at.duration_since(first.at).as_secs_f64();
        let runs = ran(before, after);
        let status = again.status.as_u16();
        let replayed =
            is_marked(&again) || (again.status == first.status && again.body == first.body);
        let (verdict, got) = if again.status.is_success() {
            match (runs, replayed) {
                (Some(1), _) | (None, false) => (
                    Verdict::Pass,
                    format!("{status}, a new operation {since:.1} s after the first answer"),
                ),
                (Some(0), _) | (None, true) => (
                    Verdict::Fail,
                    format!(
                        "{status}: still replayed {since:.1} s after the first answer (TTL {} s)",
                        ttl.as_secs()
                    ),
                ),
                (Some(k), _) => (Verdict::Fail, format!("{status}; {k} executions")),
            }
        } else {
            (
                Verdict::Fail,
                format!("{} {since:.1} s after the first answer", again.summary()),
            )
        };
        self.record(Check::Expiry, verdict, expected, got);
    }
}

// ---------------------------------------------------------------------------------------
// Judging helpers
// ---------------------------------------------------------------------------------------

/// Executions between two counts; `None` when either is unknown.
fn ran(before: Option<u64>, after: Option<u64>) -> Option<i64> {
    match (before, after) {
        (Some(b), Some(a)) => {
            Some(i64::try_from(a).unwrap_or(i64::MAX) - i64::try_from(b).unwrap_or(i64::MAX))
        }
        _ => None,
    }
}

/// `Idempotent-Replayed: true` (case-insensitive value).
fn is_marked(reply: &Reply) -> bool {
    reply.headers.get_all(REPLAY_HEADER).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
    })
}

/// A header of the API's own that looks like a replay marker (`idempotency-replayed`,
/// `x-idempotent-replay`, ...), as `name: value`.
fn other_marker(reply: &Reply) -> Option<String> {
    reply
        .headers
        .iter()
        .find(|(name, _)| name.as_str() != REPLAY_HEADER && name.as_str().contains("replay"))
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("<not text>")))
}

/// Where two bodies first differ, as `; differ at byte N`.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a == b {
        return "; same body".to_string();
    }
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    format!("; bodies differ from byte {at}")
}

/// Compares the result's headers of the first answer and the replay.
fn compare_headers(first: &Reply, replay: &Reply) -> (Verdict, String) {
    let values = |r: &Reply, name: &str| -> Vec<Vec<u8>> {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    };
    let mut wrong = Vec::new();
    for name in MUST_REPLAY {
        let a = values(first, name);
        if a.is_empty() {
            continue;
        }
        let b = values(replay, name);
        if b.is_empty() {
            wrong.push(format!("{name} missing"));
        } else if a != b {
            wrong.push(format!(
                "{name} {:?} became {:?}",
                String::from_utf8_lossy(&a.concat()),
                String::from_utf8_lossy(&b.concat())
            ));
        }
    }
    let compared: Vec<&str> = MUST_REPLAY
        .iter()
        .copied()
        .filter(|n| first.headers.contains_key(*n))
        .collect();
    if !wrong.is_empty() {
        return (
            Verdict::Fail,
            format!("on the replay: {}", wrong.join("; ")),
        );
    }
    let mut dropped: Vec<String> = first
        .headers
        .keys()
        .filter(|n| !MUST_REPLAY.contains(&n.as_str()) && !MAY_VARY.contains(&n.as_str()))
        .filter(|n| !replay.headers.contains_key(*n))
        .map(|n| n.to_string())
        .collect();
    dropped.sort();
    dropped.dedup();
    let compared = if compared.is_empty() {
        "none of Content-Type, Location, Link, ETag, ... was sent".to_string()
    } else {
        format!("{} replayed", compared.join(", "))
    };
    if dropped.is_empty() {
        (Verdict::Pass, compared)
    } else {
        (
            Verdict::Warn,
            format!("{compared}; dropped on the replay: {}", dropped.join(", ")),
        )
    }
}

enum Shape {
    Problem,
    NotProblem(String),
    Malformed(String),
}

/// Whether `reply` is `application/problem+json` with RFC 9457's member types, and a
/// `status` member (if any) equal to the HTTP status.
fn problem_shape(reply: &Reply) -> Shape {
    let content_type = reply.header("content-type").unwrap_or("");
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media != "application/problem+json" {
        let shown = if content_type.is_empty() {
            "no Content-Type".to_string()
        } else {
            content_type.to_string()
        };
        return Shape::NotProblem(shown);
    }
    let object = match serde_json::from_slice::<serde_json::Value>(&reply.body) {
        Ok(serde_json::Value::Object(object)) => object,
        Ok(_) => return Shape::Malformed("the body is not a JSON object".into()),
        Err(e) => return Shape::Malformed(format!("the body is not JSON ({e})")),
    };
    for member in ["type", "title", "detail", "instance"] {
        if object.get(member).is_some_and(|v| !v.is_string()) {
            return Shape::Malformed(format!("`{member}` is not a string"));
        }
    }
    match object.get("status") {
        None => Shape::Problem,
        Some(status) if status.as_u64() == Some(u64::from(reply.status.as_u16())) => Shape::Problem,
        Some(status) => Shape::Malformed(format!(
            "`status` is {status}, the response is {}",
            reply.status.as_u16()
        )),
    }
}

/// 16 random hex digits; the clock and the process id if the OS has no randomness.
fn run_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
        bytes = mixed.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key header value; keys are ASCII made here, so the fallback never shows.
fn key_value(key: &str) -> HeaderValue {
    HeaderValue::from_str(key).unwrap_or_else(|_| HeaderValue::from_static("ic-invalid-key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, StatusCode};

    fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_string()),
            at: Instant::now(),
        }
    }

    #[test]
    fn problem_shapes() {
        let ok = reply(
            422,
            &[("content-type", "application/problem+json; charset=utf-8")],
            r#"{"type":"https://x/reused","title":"t","status":422,"detail":"d"}"#,
        );
        assert!(matches!(problem_shape(&ok), Shape::Problem));
        let minimal = reply(409, &[("content-type", "application/problem+json")], "{}");
        assert!(matches!(problem_shape(&minimal), Shape::Problem));
        let plain = reply(400, &[("content-type", "text/plain")], "bad");
        assert!(matches!(problem_shape(&plain), Shape::NotProblem(ct) if ct == "text/plain"));
        let none = reply(400, &[], "");
        assert!(matches!(problem_shape(&none), Shape::NotProblem(ct) if ct == "no Content-Type"));
        let wrong_status = reply(
            400,
            &[("content-type", "application/problem+json")],
            r#"{"status":500}"#,
        );
        assert!(matches!(problem_shape(&wrong_status), Shape::Malformed(_)));
        let not_object = reply(400, &[("content-type", "application/problem+json")], "[1]");
        assert!(matches!(problem_shape(&not_object), Shape::Malformed(_)));
        let bad_title = reply(
            400,
            &[("content-type", "application/problem+json")],
            r#"{"title":1}"#,
        );
        assert!(matches!(problem_shape(&bad_title), Shape::Malformed(_)));
    }

    #[test]
    fn markers() {
        assert!(is_marked(&reply(
            201,
            &[("Idempotent-Replayed", "TRUE")],
            ""
        )));
        assert!(!is_marked(&reply(
            201,
            &[("Idempotent-Replayed", "false")],
            ""
        )));
        let theirs = reply(201, &[("idempotency-replayed", "true")], "");
        assert!(!is_marked(&theirs));
        assert_eq!(
            other_marker(&theirs).as_deref(),
            Some("idempotency-replayed: true")
        );
    }

    #[test]
    fn headers_compared() {
        let first = reply(
            201,
            &[
                ("content-type", "application/json"),
                ("location", "/p/1"),
                ("x-custom", "1"),
                ("date", "x"),
            ],
            "{}",
        );
        let same = reply(
            201,
            &[
                ("content-type", "application/json"),
                ("location", "/p/1"),
                ("x-custom", "2"),
            ],
            "{}",
        );
        assert_eq!(compare_headers(&first, &same).0, Verdict::Pass);
        let dropped = reply(
            201,
            &[("content-type", "application/json"), ("location", "/p/1")],
            "{}",
        );
        let (verdict, got) = compare_headers(&first, &dropped);
        assert_eq!(verdict, Verdict::Warn);
        assert!(got.contains("x-custom"), "{got}");
        let lost = reply(201, &[("content-type", "application/json")], "{}");
        let (verdict, got) = compare_headers(&first, &lost);
        assert_eq!(verdict, Verdict::Fail);
        assert!(got.contains("location missing"), "{got}");
    }

    #[test]
    fn counts_and_ids() {
        assert_eq!(ran(Some(3), Some(4)), Some(1));
        assert_eq!(ran(Some(3), None), None);
        assert_eq!(ran(Some(3), Some(2)), Some(-1));
        let id = run_id();
        assert_eq!(id.len(), 16);
        assert_ne!(id, run_id());
        assert_eq!(
            first_difference(b"abc", b"abd"),
            "; bodies differ from byte 2"
        );
        assert_eq!(
            first_difference(b"ab", b"abc"),
            "; bodies differ from byte 2"
        );
    }
}
