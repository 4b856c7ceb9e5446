//! Prints the README's results table from the last `cargo bench` run: criterion's
//! estimates under `target/criterion/peer/<case>/<backend>/new/estimates.json` (the slope
//! of the linear fit where criterion has one, otherwise the mean).
//!
//! ```sh
//! cargo bench && cargo run --release --bin table
//! ```

use std::path::PathBuf;

const BACKENDS: [&str; 2] = ["memory", "redis"];
const CASES: [(&str, &str); 6] = [
    ("bare-axum", "bare axum"),
    ("bare+sessions", "bare axum + cookie + session layers"),
    ("ours-new-key", "tower-idempotency, new key"),
    ("peer-new-key", "axum-idempotent, new key"),
    ("ours-replay", "tower-idempotency, replay"),
    ("peer-replay", "axum-idempotent, replay"),
];

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion").join("peer")
}

fn estimates_path(case: &str, backend: &str) -> PathBuf {
    criterion_dir()
        .join(case)
        .join(backend)
        .join("new")
        .join("estimates.json")
}

/// Nanoseconds per request, and the bounds of its 95 % interval.
fn estimate(case: &str, backend: &str) -> Option<(f64, f64, f64)> {
    let path = estimates_path(case, backend);
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let est = json
        .get("slope")
        .filter(|s| !s.is_null())
        .or_else(|| json.get("mean"))?;
    let point = est.get("point_estimate")?.as_f64()?;
    let ci = est.get("confidence_interval")?;
    Some((
        point,
        ci.get("lower_bound")?.as_f64()?,
        ci.get("upper_bound")?.as_f64()?,
    ))
}

fn time(ns: f64) -> String {
    let us = ns / 1000.0;
    match us {
        us if us < 1.0 => format!("{us:.3} µs"),
        us if us < 10.0 => format!("{us:.2} µs"),
        us if us < 100.0 => format!("{us:.1} µs"),
        us => format!("{us:.0} µs"),
    }
}

fn main() {
    // The bench writes what it measured to run.txt; a case the last run skipped (the
    // peer's Redis cases on a server without HEXPIRE, or a filtered run) keeps its old
    // estimate, flagged here.
    let manifest = std::fs::read_to_string(criterion_dir().join("run.txt")).unwrap_or_default();
    let stale = |case: &str, backend: &str| {
        !manifest
            .lines()
            .any(|l| l == format!("ran {case}/{backend}"))
    };
    for line in manifest.lines().filter(|l| !l.starts_with("ran ")) {
        println!("<!-- {line} -->");
    }
    let bare: Vec<Option<f64>> = BACKENDS
        .iter()
        .map(|b| estimate("bare-axum", b).map(|e| e.0))
        .collect();
    println!("| case | memory: time / req | × bare axum | redis: time / req | × bare axum |");
    println!("| --- | --- | --- | --- | --- |");
    for (case, label) in CASES {
        let mut row = format!("| {label} |");
        for (i, backend) in BACKENDS.iter().enumerate() {
            match (estimate(case, backend), bare[i]) {
                (Some((ns, lo, hi)), Some(base)) => row.push_str(&format!(
                    " {} ({}–{}){} | {:.1}× |",
                    time(ns),
                    time(lo).trim_end_matches(" µs"),
                    time(hi).trim_end_matches(" µs"),
                    if stale(case, backend) {
                        " (older run)"
                    } else {
                        ""
                    },
                    ns / base
                )),
                (Some((ns, ..)), None) => row.push_str(&format!(" {} | – |", time(ns))),
                _ => row.push_str(" – | – |"),
            }
        }
        println!("{row}");
    }
    println!();
    println!("| peer ÷ ours (time per request) | memory | redis |");
    println!("| --- | --- | --- |");
    for (what, ours, peer) in [
        ("new key", "ours-new-key", "peer-new-key"),
        ("replay", "ours-replay", "peer-replay"),
    ] {
        let mut row = format!("| {what} |");
        for backend in BACKENDS {
            match (estimate(ours, backend), estimate(peer, backend)) {
                (Some(o), Some(p)) => row.push_str(&format!(" {:.2} |", p.0 / o.0)),
                _ => row.push_str(" – |"),
            }
        }
        println!("{row}");
    }
}
