//! The verdicts of a run: [`Report`], one [`Outcome`] per [`Check`], as a table
//! ([`Display`](std::fmt::Display)), JSON ([`Report::json`]) or JUnit XML
//! ([`Report::junit`]).
//!
//! References name the IETF draft `draft-ietf-httpapi-idempotency-key-header-07`
//! ("draft", by section number and title) or Stripe's documented behaviour ("Stripe").

use std::fmt::{self, Write as _};
use std::time::Duration;

/// Every check a run can report, in the order a run reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Check {
    /// `--executions-url` answers a count (or is absent: counts are skipped).
    Executions,
    /// A fresh key with `--body` succeeds: the other checks build on it.
    Baseline,
    /// Same key and body: same status, byte-identical body.
    Replay,
    /// The response headers that describe the result replay too.
    ReplayHeaders,
    /// The replay carries `Idempotent-Replayed: true`.
    ReplayMarker,
    /// The first answer carries no replay marker.
    FirstUnmarked,
    /// The retry did not run the operation again.
    OneExecution,
    /// Same key, different body: 422.
    PayloadMismatch,
    /// N requests at once with one key: one execution, one answer.
    Concurrency,
    /// A duplicate while the first runs: 409, or the same answer after waiting.
    InFlight,
    /// The same key from another tenant runs as a new operation.
    TenantScope,
    /// No key where one is required: 4xx.
    KeyMissing,
    /// An empty key: 4xx.
    KeyEmpty,
    /// A 256-byte key: 4xx.
    KeyTooLong,
    /// A key with a control character: 4xx.
    KeyControlChar,
    /// Two key header fields: 4xx.
    KeyTwoFields,
    /// The idempotency errors are `application/problem+json`.
    ProblemJson,
    /// A rejected request (4xx) does not use up its key.
    ErrorReleasesKey,
    /// After the TTL the key runs as new.
    Expiry,
}

impl Check {
    /// Every check, in report order.
    pub const ALL: [Check; 19] = [
        Check::Executions,
        Check::Baseline,
        Check::Replay,
        Check::ReplayHeaders,
        Check::ReplayMarker,
        Check::FirstUnmarked,
        Check::OneExecution,
        Check::PayloadMismatch,
        Check::Concurrency,
        Check::InFlight,
        Check::TenantScope,
        Check::KeyMissing,
        Check::KeyEmpty,
        Check::KeyTooLong,
        Check::KeyControlChar,
        Check::KeyTwoFields,
        Check::ProblemJson,
        Check::ErrorReleasesKey,
        Check::Expiry,
    ];

    /// The stable id used in the table, JSON and JUnit (`replay`, `key-too-long`, ...).
    pub fn id(self) -> &'static str {
        match self {
            Check::Executions => "executions",
            Check::Baseline => "baseline",
            Check::Replay => "replay",
            Check::ReplayHeaders => "replay-headers",
            Check::ReplayMarker => "replay-marker",
            Check::FirstUnmarked => "first-unmarked",
            Check::OneExecution => "one-execution",
            Check::PayloadMismatch => "payload-mismatch",
            Check::Concurrency => "concurrency",
            Check::InFlight => "in-flight",
            Check::TenantScope => "tenant-scope",
            Check::KeyMissing => "key-missing",
            Check::KeyEmpty => "key-empty",
            Check::KeyTooLong => "key-too-long",
            Check::KeyControlChar => "key-control-char",
            Check::KeyTwoFields => "key-two-fields",
            Check::ProblemJson => "problem-json",
            Check::ErrorReleasesKey => "error-releases-key",
            Check::Expiry => "expiry",
        }
    }

    /// Where the rule comes from.
    pub fn reference(self) -> &'static str {
        match self {
            Check::Executions => "setup (--executions-url)",
            Check::Baseline => "draft §2.6 (first request)",
            Check::Replay => "draft §2.6 (retry); Stripe: status and body saved",
            Check::ReplayHeaders => "draft §2.6: the result of the completed operation",
            Check::ReplayMarker | Check::FirstUnmarked => "Stripe: Idempotent-Replayed",
            Check::OneExecution => "draft §1, §2.6; Stripe",
            Check::PayloadMismatch => "draft §2.2, §2.7: 422; Stripe: parameters compared",
            Check::Concurrency => "draft §2.6 (concurrent request)",
            Check::InFlight => "draft §2.6, §2.7: 409",
            Check::TenantScope => "draft §5: composite key per client",
            Check::KeyMissing => "draft §2.7: 400",
            Check::KeyEmpty | Check::KeyControlChar => "draft §2.1 (sf-string), §5: validate",
            Check::KeyTooLong => "Stripe: keys up to 255 characters; draft §5",
            Check::KeyTwoFields => "draft §2.1: one Item (RFC 8941 §4.2)",
            Check::ProblemJson => "draft §2.7; RFC 9457",
            Check::ErrorReleasesKey => "Stripe: saved only once the endpoint runs",
            Check::Expiry => "draft §2.3; Stripe: pruned after 24 h",
        }
    }

    /// Looks a check up by its [`id`](Check::id).
    pub fn from_id(id: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.id() == id)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Verdict {
    /// The API did what the rule asks.
    Pass,
    /// Not required by the rule, but worth knowing (no replay marker, errors not in
    /// problem+json): the run still passes.
    Warn,
    /// Not judged: a setting was missing (no `--executions-url`, no `--slow-body`) or the
    /// input did not allow it; the reason is in `got`.
    Skip,
    /// The API broke the rule: the run fails (exit code 1).
    Fail,
}

impl Verdict {
    /// `PASS`, `WARN`, `SKIP` or `FAIL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Skip => "SKIP",
            Verdict::Fail => "FAIL",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one check: what was expected and what came back, each in one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Which check.
    pub check: Check,
    /// How it came out.
    pub verdict: Verdict,
    /// What the rule asks.
    pub expected: String,
    /// What the API did.
    pub got: String,
}

/// Every outcome of a run. See the [module docs](crate::report).
#[derive(Clone, Debug)]
pub struct Report {
    /// The endpoint checked.
    pub url: String,
    /// Its method.
    pub method: String,
    /// One per check, in [`Check::ALL`] order.
    pub outcomes: Vec<Outcome>,
    /// How long the run took.
    pub duration: Duration,
}

impl Report {
    /// The outcome of `check`, if the run reported it.
    pub fn outcome(&self, check: Check) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.check == check)
    }

    /// The verdict of `check`, if the run reported it.
    pub fn verdict(&self, check: Check) -> Option<Verdict> {
        self.outcome(check).map(|o| o.verdict)
    }

    /// The checks with this verdict.
    pub fn with(&self, verdict: Verdict) -> Vec<Check> {
        self.outcomes
            .iter()
            .filter(|o| o.verdict == verdict)
            .map(|o| o.check)
            .collect()
    }

    /// No check failed (warnings and skips allowed).
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.verdict != Verdict::Fail)
    }

    /// 0 when every check passed (or warned, or was skipped), else 1.
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.passed())
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.verdict == verdict)
            .count()
    }

    /// `N passed, N failed, N warnings, N skipped`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} warnings, {} skipped",
            self.count(Verdict::Pass),
            self.count(Verdict::Fail),
            self.count(Verdict::Warn),
            self.count(Verdict::Skip),
        )
    }

    /// The report as one JSON document:
    /// `{"url", "method", "passed", "duration_ms", "summary": {..}, "checks": [{"id",
    /// "verdict", "expected", "got", "reference"}]}`, verdicts in lower case.
    pub fn json(&self) -> String {
        let checks: Vec<serde_json::Value> = self
            .outcomes
            .iter()
            .map(|o| {
                serde_json::json!({
                    "id": o.check.id(),
                    "verdict": o.verdict.as_str().to_ascii_lowercase(),
                    "expected": o.expected,
                    "got": o.got,
                    "reference": o.check.reference(),
                })
            })
            .collect();
        serde_json::json!({
            "url": self.url,
            "method": self.method,
            "passed": self.passed(),
            "duration_ms": u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            "summary": {
                "passed": self.count(Verdict::Pass),
                "failed": self.count(Verdict::Fail),
                "warnings": self.count(Verdict::Warn),
                "skipped": self.count(Verdict::Skip),
            },
            "checks": checks,
        })
        .to_string()
    }

    /// The report as JUnit XML: one `<testsuite>`, one `<testcase>` per check; a failure
    /// is `<failure>`, a skip `<skipped>`, a warning passes with the text in
    /// `<system-out>`.
    pub fn junit(&self) -> String {
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let secs = self.duration.as_secs_f64();
        let _ = writeln!(
            xml,
            "<testsuites name=\"idempotency-check\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{secs:.3}\">",
            self.outcomes.len(),
            self.count(Verdict::Fail),
            self.count(Verdict::Skip),
        );
        let _ = writeln!(
            xml,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{secs:.3}\">",
            escape(&format!("{} {}", self.method, self.url)),
            self.outcomes.len(),
            self.count(Verdict::Fail),
            self.count(Verdict::Skip),
        );
        for o in &self.outcomes {
            let _ = write!(
                xml,
                "    <testcase classname=\"idempotency-check\" name=\"{}\"",
                escape(o.check.id())
            );
            let text = format!(
                "expected: {}\ngot: {}\nreference: {}",
                o.expected,
                o.got,
                o.check.reference()
            );
            match o.verdict {
                Verdict::Pass => xml.push_str("/>\n"),
                Verdict::Fail => {
                    let _ = writeln!(
                        xml,
                        ">\n      <failure message=\"{}\" type=\"{}\">{}</failure>\n    </testcase>",
                        escape(&o.got),
                        escape(o.check.id()),
                        escape(&text)
                    );
                }
                Verdict::Skip => {
                    let _ = writeln!(
                        xml,
                        ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                        escape(&o.got)
                    );
                }
                Verdict::Warn => {
                    let _ = writeln!(
                        xml,
                        ">\n      <system-out>WARN {}</system-out>\n    </testcase>",
                        escape(&text)
                    );
                }
            }
        }
        xml.push_str("  </testsuite>\n</testsuites>\n");
        xml
    }
}

/// XML text and attribute escaping; characters XML 1.0 cannot carry become `?`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// Column caps of the table; long cells wrap onto more lines.
const WIDTHS: [usize; 5] = [18, 7, 32, 42, 26];

impl fmt::Display for Report {
    /// The table a person reads: check, verdict, expected, got, reference; then the
    /// summary line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "idempotency-check: {} {}", self.method, self.url)?;
        writeln!(f)?;
        let header = ["CHECK", "VERDICT", "EXPECTED", "GOT", "REFERENCE"];
        let rows: Vec<[String; 5]> = self
            .outcomes
            .iter()
            .map(|o| {
                [
                    o.check.id().to_string(),
                    o.verdict.as_str().to_string(),
                    o.expected.clone(),
                    o.got.clone(),
                    o.check.reference().to_string(),
                ]
            })
            .collect();
        // Each column as wide as its widest content, up to its cap.
        let mut widths = [0usize; 5];
        for (i, cap) in WIDTHS.iter().enumerate() {
            let widest = rows
                .iter()
                .flat_map(|r| r[i].split(' ').map(|w| w.chars().count()))
                .chain(rows.iter().map(|r| r[i].chars().count().min(*cap)))
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0);
            widths[i] = widest.min(*cap).max(header[i].chars().count());
        }
        write_row(f, &header.map(str::to_string), &widths)?;
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        writeln!(f, "{}", rule.join("  "))?;
        for row in &rows {
            write_row(f, row, &widths)?;
        }
        writeln!(f)?;
        write!(
            f,
            "{} ({:.1} s): {}",
            if self.passed() { "PASSED" } else { "FAILED" },
            self.duration.as_secs_f64(),
            self.summary()
        )
    }
}

fn write_row(f: &mut fmt::Formatter<'_>, cells: &[String; 5], widths: &[usize; 5]) -> fmt::Result {
    let wrapped: Vec<Vec<String>> = cells
        .iter()
        .zip(widths)
        .map(|(cell, width)| wrap(cell, *width))
        .collect();
    let lines = wrapped.iter().map(Vec::len).max().unwrap_or(1);
    for line in 0..lines {
        let mut out = String::new();
        for (i, column) in wrapped.iter().enumerate() {
            let text = column.get(line).map_or("", String::as_str);
            if i + 1 == wrapped.len() {
                out.push_str(text);
            } else {
                let pad = widths[i].saturating_sub(text.chars().count());
                out.push_str(text);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        writeln!(f, "{}", out.trim_end())?;
    }
    Ok(())
}

/// Word-wraps `text` to `width` characters; a word longer than that is cut.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let len = line.chars().count();
            let room = if len == 0 {
                width
            } else {
                width.saturating_sub(len + 1)
            };
            if word.len() <= room {
                if len > 0 {
                    line.push(' ');
                }
                line.extend(word.iter());
                break;
            }
            if len > 0 {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            // A word wider than the column: cut it.
            let rest = word.split_off(width.max(1));
            lines.push(word.iter().collect());
            word = rest;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            url: "http://x/p".into(),
            method: "POST".into(),
            outcomes: vec![
                Outcome {
                    check: Check::Replay,
                    verdict: Verdict::Pass,
                    expected: "same".into(),
                    got: "same".into(),
                },
                Outcome {
                    check: Check::Concurrency,
                    verdict: Verdict::Fail,
                    expected: "1 execution".into(),
                    got: "16 executions <&\"'>".into(),
                },
                Outcome {
                    check: Check::ReplayMarker,
                    verdict: Verdict::Warn,
                    expected: "marker".into(),
                    got: "none".into(),
                },
                Outcome {
                    check: Check::Expiry,
                    verdict: Verdict::Skip,
                    expected: "new".into(),
                    got: "no --ttl-secs".into(),
                },
            ],
            duration: Duration::from_millis(1500),
        }
    }

    #[test]
    fn ids_round_trip() {
        for c in Check::ALL {
            assert_eq!(Check::from_id(c.id()), Some(c));
            assert!(!c.reference().is_empty());
        }
    }

    #[test]
    fn verdicts_and_exit_code() {
        let r = report();
        assert!(!r.passed());
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.with(Verdict::Fail), vec![Check::Concurrency]);
        assert_eq!(r.summary(), "1 passed, 1 failed, 1 warnings, 1 skipped");
        let mut ok = r.clone();
        ok.outcomes.remove(1);
        assert_eq!(ok.exit_code(), 0);
    }

    #[test]
    fn json_shape() {
        let v: serde_json::Value = serde_json::from_str(&report().json()).unwrap();
        assert_eq!(v["passed"], false);
        assert_eq!(v["summary"]["failed"], 1);
        assert_eq!(v["checks"][1]["id"], "concurrency");
        assert_eq!(v["checks"][1]["verdict"], "fail");
        assert_eq!(v["checks"][1]["reference"], Check::Concurrency.reference());
    }

    #[test]
    fn junit_is_escaped_and_counts() {
        let xml = report().junit();
        assert!(xml.contains("tests=\"4\" failures=\"1\" errors=\"0\" skipped=\"1\""));
        assert!(xml.contains("16 executions &lt;&amp;&quot;&apos;&gt;"));
        assert!(xml.contains("<skipped message=\"no --ttl-secs\"/>"));
        assert!(xml.contains("<system-out>WARN"));
        assert_eq!(xml.matches("<testcase ").count(), 4);
        assert_eq!(escape("a\u{1}b"), "a?b");
    }

    #[test]
    fn table_wraps_long_cells() {
        let mut r = report();
        r.outcomes[1].got = "word ".repeat(30) + &"x".repeat(100);
        let table = r.to_string();
        assert!(table.contains("CHECK"));
        assert!(table.ends_with("FAILED (1.5 s): 1 passed, 1 failed, 1 warnings, 1 skipped"));
        let widest = WIDTHS.iter().sum::<usize>() + 2 * 4;
        for line in table.lines() {
            assert!(line.chars().count() <= widest, "{line}");
        }
        assert_eq!(wrap("", 5), vec![String::new()]);
        assert_eq!(wrap("abcdefg hi", 3), vec!["abc", "def", "g", "hi"]);
    }
}
