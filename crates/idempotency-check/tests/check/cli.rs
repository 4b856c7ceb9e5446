//! The `idempotency-check` binary (cargo builds it for this test): help, exit codes 0, 1
//! and 2, `--json` and `--junit`.

use std::time::Duration;

use tower_idempotency::MemoryStore;

use crate::payments;
use crate::support::{slow_body, Server, BODY};

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn checker(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_idempotency-check"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the checker finishes within 60 s")
        .expect("the checker runs");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn help_describes_every_option_and_the_exit_codes() {
    let out = checker(&["--help"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for text in [
        "--url",
        "--body",
        "--slow-body",
        "--bad-body",
        "--other-tenant-header",
        "--executions-url",
        "--executions-pointer",
        "--in-flight",
        "--concurrency",
        "--ttl-secs",
        "--json",
        "--junit",
        "Exit codes",
    ] {
        assert!(
            out.stdout.contains(text),
            "--help lacks {text}:\n{}",
            out.stdout
        );
    }
}

#[tokio::test]
async fn bad_usage_exits_with_2() {
    let cases: &[&[&str]] = &[
        &[],
        &["--url", "http://127.0.0.1:9/p"],
        &["--url", "https://127.0.0.1/p", "--body", "{}"],
        &[
            "--url",
            "http://127.0.0.1:9/p",
            "--body",
            "{}",
            "-H",
            "no colon",
        ],
        &[
            "--url",
            "http://127.0.0.1:9/p",
            "--body",
            "{}",
            "--concurrency",
            "1",
        ],
        &[
            "--url",
            "http://127.0.0.1:9/p",
            "--body",
            "{}",
            "--in-flight",
            "sometimes",
        ],
        &[
            "--url",
            "http://127.0.0.1:9/p",
            "--body",
            "@/nonexistent/body.json",
        ],
        &[
            "--url",
            "http://127.0.0.1:9/p",
            "--body",
            "{}",
            "--executions-pointer",
            "/n",
        ],
    ];
    for args in cases {
        let out = checker(args).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}{}", out.stdout, out.stderr);
        assert!(!out.stderr.is_empty(), "{args:?} says why");
        assert!(out.stdout.is_empty(), "{args:?} prints no report");
    }
    let https = checker(cases[2]).await;
    assert!(
        https.stderr.contains("https is not supported"),
        "{}",
        https.stderr
    );
}

/// A URL nobody answers: the baseline fails, the rest is skipped, exit 1.
#[tokio::test]
async fn an_unreachable_api_fails_the_baseline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/payments", listener.local_addr().unwrap());
    drop(listener);
    let out = checker(&["--url", &url, "--body", BODY, "--json"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let baseline = &report["checks"][1];
    assert_eq!(baseline["id"], "baseline");
    assert_eq!(baseline["verdict"], "fail");
    assert!(
        baseline["got"].as_str().unwrap().contains("cannot connect"),
        "{baseline}"
    );
    assert_eq!(report["summary"]["skipped"], 18);
}

/// Against the example: exit 0, the JSON report on stdout, the JUnit file written; then
/// the same command with `--in-flight conflict` (the example's `/payments` waits): exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_passes_with_json_and_junit_and_fails_with_exit_1() {
    let server = Server::example(
        MemoryStore::default(),
        payments::AppState::default(),
        Duration::from_secs(3600),
    )
    .await;
    let url = server.url("/payments");
    let slow = slow_body(600);
    let junit = std::env::temp_dir().join(format!(
        "idempotency-check-{}.xml",
        crate::support::unique()
    ));
    let junit_path = junit.to_str().unwrap().to_string();
    let mut args = vec![
        "--url",
        &url,
        "--body",
        BODY,
        "--slow-body",
        &slow,
        "-H",
        "Authorization: Bearer alice",
        "--other-tenant-header",
        "Authorization: Bearer bob",
        "--executions-url",
        &url,
    ];
    let mut passing = args.clone();
    passing.extend(["--in-flight", "wait", "--json", "--junit", &junit_path]);
    let out = checker(&passing).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["summary"]["passed"], 18, "{report}");
    assert_eq!(
        report["summary"]["skipped"], 1,
        "expiry, without --ttl-secs"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    let _ = std::fs::remove_file(&junit);
    assert!(xml.starts_with("<?xml"), "{xml}");
    assert_eq!(xml.matches("<testcase ").count(), 19, "{xml}");
    assert!(xml.contains("failures=\"0\""), "{xml}");

    args.push("--no-progress");
    let out = checker(&args).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let in_flight = out
        .stdout
        .lines()
        .find(|l| l.starts_with("in-flight"))
        .unwrap_or_default();
    assert!(in_flight.contains("FAIL"), "{}", out.stdout);
    assert!(out.stdout.contains("CHECK") && out.stdout.contains("REFERENCE"));
    assert!(out.stdout.trim_end().ends_with("0 skipped") || out.stdout.contains("FAILED"));
    server.stop().await;
}
