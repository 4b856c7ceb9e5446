//! A black-box conformance checker for any `Idempotency-Key` HTTP API.
//!
//! Point it at an endpoint — written with any framework, in any language — and it sends
//! the requests a retrying client would send, then judges the answers against the IETF
//! draft [draft-ietf-httpapi-idempotency-key-header-07] and Stripe's documented
//! behaviour: the retry replays the first answer byte for byte and does not run the
//! operation again; N requests at once with one key run it once; the same key with
//! another body gets 422; a duplicate in flight gets 409 (or waits); another tenant's
//! same key is a new operation; bad keys get a 4xx, never a 5xx; a rejected request does
//! not use up its key; after the TTL the key runs as new.
//!
//! The binary `idempotency-check` is a thin layer over [`run`]: it parses the command
//! line into a [`Config`], runs, and prints the [`Report`] as a table, JSON or JUnit.
//!
//! # Example
//!
//! ```no_run
//! use idempotency_check::{run, Check, Config, InFlightMode, Verdict};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::new("http://127.0.0.1:3000/payments", r#"{"amount": 1000, "currency": "EUR"}"#)?
//!     .slow_body(r#"{"amount": 1000, "currency": "EUR", "delay_ms": 1500}"#)
//!     .header_line("Authorization: Bearer alice")?
//!     .other_tenant_header_line("Authorization: Bearer bob")?
//!     .executions_url("http://127.0.0.1:3000/payments")?
//!     .in_flight(InFlightMode::Wait);
//! let report = run(&config).await?;
//! assert_eq!(report.verdict(Check::Concurrency), Some(Verdict::Pass));
//! println!("{report}");
//! # Ok(()) }
//! ```
//!
//! The checks, their references and what each needs are listed in the crate's README.
//!
//! [draft-ietf-httpapi-idempotency-key-header-07]: https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod check;
pub mod config;
mod http;
mod progress;
pub mod report;

pub use crate::check::{run, EXPIRY_MARGIN, IN_FLIGHT_DELAY, REPLAY_HEADER};
pub use crate::config::{parse_header_line, parse_method, Config, ConfigError, InFlightMode};
pub use crate::report::{Check, Outcome, Report, Verdict};
