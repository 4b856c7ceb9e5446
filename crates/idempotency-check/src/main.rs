//! `idempotency-check`: the command line over [`idempotency_check::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::HeaderName;
use idempotency_check::{parse_method, run, Config, ConfigError, InFlightMode};

/// Exit code of a bad command line or setting (clap uses it too).
const USAGE: u8 = 2;

const AFTER_HELP: &str = "\
A body argument that starts with @ names a file to read it from (@- is stdin).

Exit codes: 0 every check passed (warnings and skips allowed), 1 a check failed,
2 bad usage (or a --junit file that cannot be written).

Example, against the repository's example API (cargo run --example payments):

  idempotency-check --url http://127.0.0.1:3000/payments \\
    --body '{\"amount\": 1000, \"currency\": \"EUR\"}' \\
    --slow-body '{\"amount\": 1000, \"currency\": \"EUR\", \"delay_ms\": 1500}' \\
    -H 'Authorization: Bearer alice' --other-tenant-header 'Authorization: Bearer bob' \\
    --executions-url http://127.0.0.1:3000/payments --in-flight wait";

/// Checks a running Idempotency-Key API from the outside: replay, one execution,
/// concurrency, payload mismatch, in-flight duplicates, tenant scope, key validation,
/// problem+json errors, released keys after a 4xx, and expiry.
#[derive(Debug, Parser)]
#[command(name = "idempotency-check", version, after_help = AFTER_HELP)]
struct Args {
    /// The endpoint to check (http:// only), e.g. http://127.0.0.1:3000/payments
    #[arg(long, value_name = "URL")]
    url: String,

    /// The body of one operation: with a fresh key it must succeed (2xx)
    #[arg(long, value_name = "BODY")]
    body: String,

    /// A body that keeps the handler busy well over 300 ms, for the in-flight check
    /// (skipped without it)
    #[arg(long, value_name = "BODY")]
    slow_body: Option<String>,

    /// A body the API rejects with a 4xx [default: --body cut short by one byte]
    #[arg(long, value_name = "BODY")]
    bad_body: Option<String>,

    /// A body that is another operation, for the payload-mismatch check [default:
    /// --body with its first top-level JSON number + 1]
    #[arg(long, value_name = "BODY")]
    other_body: Option<String>,

    /// A header sent with every request, e.g. the caller's credentials (repeatable)
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,

    /// A header that makes requests another tenant's; it replaces -H headers of the same
    /// name (repeatable; the scope check is skipped without it)
    #[arg(long = "other-tenant-header", value_name = "NAME: VALUE")]
    other_tenant_headers: Vec<String>,

    /// A GET URL (sent with the same headers) whose JSON array length is how many times
    /// the operation ran for the caller; without it, execution counts are skipped
    #[arg(long, value_name = "URL")]
    executions_url: Option<String>,

    /// Where the count is in that JSON (RFC 6901 pointer to an array or a non-negative
    /// integer), e.g. /handler_runs [default: the whole document is the array]
    #[arg(long, value_name = "POINTER", requires = "executions_url")]
    executions_pointer: Option<String>,

    /// The method of the operation
    #[arg(long, default_value = "POST")]
    method: String,

    /// The name of the key header
    #[arg(long, value_name = "NAME", default_value = "Idempotency-Key")]
    key_header: String,

    /// What a duplicate sent while the first request runs must get: 409 (conflict), the
    /// first's answer after waiting (wait), or either (any)
    #[arg(long, value_enum, default_value_t = InFlight::Conflict)]
    in_flight: InFlight,

    /// The API lets requests without a key through (the missing-key check then expects
    /// a 2xx)
    #[arg(long)]
    key_optional: bool,

    /// How many requests the concurrency check sends at once with one key (2 to 256)
    #[arg(long, value_name = "N", default_value_t = 16)]
    concurrency: usize,

    /// The API's TTL for stored responses: the expiry check waits that long (plus 1 s)
    /// and expects the key to run as new (1 to 3600; skipped without it)
    #[arg(long, value_name = "N")]
    ttl_secs: Option<u64>,

    /// The longest wait for one answer, in seconds (1 to 600)
    #[arg(long, value_name = "N", default_value_t = 30)]
    timeout_secs: u64,

    /// Print the report as JSON on stdout instead of the table
    #[arg(long)]
    json: bool,

    /// Also write the report as JUnit XML to FILE
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,

    /// No progress bars on stderr (they are hidden anyway when stderr is not a terminal)
    #[arg(long)]
    no_progress: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum InFlight {
    /// 409 Conflict at once (the draft's rule)
    Conflict,
    /// The first request's answer, after waiting for it
    Wait,
    /// Either
    Any,
}

/// A body argument: text, `@file`, or `@-` for stdin.
fn body(arg: &str) -> Result<Bytes, String> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .map_err(|e| format!("cannot read a body from stdin: {e}"))?;
            Ok(Bytes::from(buf))
        }
        Some(path) => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| format!("cannot read body file {path:?}: {e}")),
        None => Ok(Bytes::from(arg.to_string())),
    }
}

fn config(args: &Args) -> Result<Config, String> {
    let text = |e: ConfigError| e.to_string();
    let mut config = Config::new(&args.url, body(&args.body)?)
        .map_err(text)?
        .method(parse_method(&args.method).map_err(text)?)
        .key_header(
            HeaderName::from_bytes(args.key_header.trim().as_bytes())
                .map_err(|_| text(ConfigError::KeyHeader(args.key_header.clone())))?,
        )
        .in_flight(match args.in_flight {
            InFlight::Conflict => InFlightMode::Conflict,
            InFlight::Wait => InFlightMode::Wait,
            InFlight::Any => InFlightMode::Any,
        })
        .concurrency(args.concurrency)
        .timeout(Duration::from_secs(args.timeout_secs))
        .progress(!args.no_progress && !args.json);
    for line in &args.headers {
        config = config.header_line(line).map_err(text)?;
    }
    for line in &args.other_tenant_headers {
        config = config.other_tenant_header_line(line).map_err(text)?;
    }
    if let Some(slow) = &args.slow_body {
        config = config.slow_body(body(slow)?);
    }
    if let Some(bad) = &args.bad_body {
        config = config.bad_body(body(bad)?);
    }
    if let Some(other) = &args.other_body {
        config = config.other_body(body(other)?);
    }
    if let Some(url) = &args.executions_url {
        config = config.executions_url(url).map_err(text)?;
    }
    if let Some(pointer) = &args.executions_pointer {
        config = config.executions_pointer(pointer).map_err(text)?;
    }
    if args.key_optional {
        config = config.key_optional();
    }
    if let Some(secs) = args.ttl_secs {
        config = config.ttl(Duration::from_secs(secs));
    }
    config.validate().map_err(text)?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match config(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("idempotency-check: {message}");
            return ExitCode::from(USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("idempotency-check: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(&config)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("idempotency-check: {e}");
            return ExitCode::from(USAGE);
        }
    };
    if args.json {
        println!("{}", report.json());
    } else {
        println!("{report}");
    }
    if let Some(path) = &args.junit {
        if let Err(e) = std::fs::write(path, report.junit()) {
            eprintln!("idempotency-check: cannot write {}: {e}", path.display());
            return ExitCode::from(USAGE);
        }
    }
    ExitCode::from(report.exit_code())
}
