//! The operator's answer to `PUT /key`: the response retries get from now on.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;

use crate::policy::MAX_TTL;
use crate::record::{Record, StoredResponse};
use crate::replay::stored_headers;

/// The JSON body of `PUT /key`. Unknown fields are refused: a misspelt `"stauts"` must
/// not turn into a stored answer the operator did not mean.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    status: Option<u16>,
    headers: Option<Vec<(String, String)>>,
    body: Option<String>,
    body_base64: Option<String>,
    #[serde(default)]
    not_replayable: bool,
    ttl_secs: Option<u64>,
}

/// What `PUT /key` asks the store to keep, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Answer {
    pub(super) record: Record,
    pub(super) ttl: Duration,
}

impl Answer {
    /// The status the audit log names: the response's, or `not_replayable`.
    pub(super) fn describe(&self) -> String {
        match &self.record {
            Record::Response(response) => response.status.as_u16().to_string(),
            Record::NotReplayable => "not_replayable".to_owned(),
        }
    }
}

/// Parses `json` into an answer kept for `ttl_secs`, else `default_ttl`. The error is the
/// `detail` of a 400.
pub(super) fn parse(json: &[u8], default_ttl: Duration) -> Result<Answer, String> {
    let body: Body =
        serde_json::from_slice(json).map_err(|e| format!("the body is not a valid answer: {e}"))?;
    let ttl = match body.ttl_secs {
        None => default_ttl,
        Some(secs) => Some(Duration::from_secs(secs))
            .filter(|ttl| !ttl.is_zero() && *ttl <= MAX_TTL)
            .ok_or_else(|| {
                format!(
                    "`ttl_secs` must be from 1 to {} (ten years)",
                    MAX_TTL.as_secs()
                )
            })?,
    };
    if body.not_replayable {
        let extra = [
            ("status", body.status.is_some()),
            ("headers", body.headers.is_some()),
            ("body", body.body.is_some()),
            ("body_base64", body.body_base64.is_some()),
        ];
        if let Some((name, _)) = extra.iter().find(|(_, given)| *given) {
            return Err(format!(
                "`not_replayable` stores no response: drop `{name}`"
            ));
        }
        return Ok(Answer {
            record: Record::NotReplayable,
            ttl,
        });
    }
    let status = body
        .status
        .ok_or("give the response's `status` (or `\"not_replayable\": true`)")?;
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("`status` must be a final status from 200 to 599 (got {status})"))?;
    let response_body = match (body.body, body.body_base64) {
        (Some(_), Some(_)) => return Err("give `body` or `body_base64`, not both".to_owned()),
        (Some(text), None) => Bytes::from(text),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map(Bytes::from)
            .map_err(|e| format!("`body_base64` is not standard base64: {e}"))?,
        (None, None) => Bytes::new(),
    };
    let headers = headers(body.headers.unwrap_or_default())?;
    Ok(Answer {
        record: Record::Response(StoredResponse {
            status,
            headers,
            body: response_body,
        }),
        ttl,
    })
}

/// The operator's headers, as the layer would store them. A header the layer never
/// stores (hop-by-hop, `Content-Length`, `Set-Cookie`, `Date`, `Idempotent-Replayed`) is
/// refused rather than dropped, so the answer replayed is the answer given.
fn headers(pairs: Vec<(String, String)>) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a valid header name"))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("the value of `{name}` is not a valid header value"))?;
        map.append(name, value);
    }
    let kept = stored_headers(&map, &[]);
    if kept.len() != map.len() {
        let dropped = map
            .keys()
            .find(|name| !kept.iter().any(|(kept, _)| kept == *name))
            .map_or_else(String::new, |name| name.to_string());
        return Err(format!(
            "`{dropped}` is never stored or replayed (hop-by-hop headers and those named in \
             `Connection`, `Content-Length`, `Set-Cookie`, `Date`, `Idempotent-Replayed`): \
             drop it"
        ));
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn response(answer: &Answer) -> &StoredResponse {
        match &answer.record {
            Record::Response(response) => response,
            Record::NotReplayable => panic!("not a response"),
        }
    }

    #[test]
    fn a_response_with_headers_and_a_text_body() {
        let json = br#"{"status": 201, "headers": [["content-type", "application/json"],
            ["link", "</a>"], ["link", "</b>"]], "body": "{\"id\":1}", "ttl_secs": 60}"#;
        let answer = parse(json, DAY).unwrap();
        assert_eq!(answer.ttl, Duration::from_secs(60));
        let r = response(&answer);
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.body, Bytes::from_static(b"{\"id\":1}"));
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "link", "link"]);
        assert_eq!(answer.describe(), "201");
    }

    #[test]
    fn a_base64_body_and_the_default_ttl() {
        let answer = parse(br#"{"status": 200, "body_base64": "AP8="}"#, DAY).unwrap();
        assert_eq!(answer.ttl, DAY);
        assert_eq!(response(&answer).body, Bytes::from_static(&[0, 255]));
        let empty = parse(br#"{"status": 204}"#, DAY).unwrap();
        assert!(response(&empty).body.is_empty() && response(&empty).headers.is_empty());
    }

    #[test]
    fn not_replayable() {
        let answer = parse(br#"{"not_replayable": true, "ttl_secs": 5}"#, DAY).unwrap();
        assert_eq!(answer.record, Record::NotReplayable);
        assert_eq!(answer.ttl, Duration::from_secs(5));
        assert_eq!(answer.describe(), "not_replayable");
    }

    #[test]
    fn refuses_what_would_store_another_answer_than_the_one_given() {
        for (json, says) in [
            (r#"{}"#, "`status`"),
            (r#"{"status": "201"}"#, "not a valid answer"),
            (r#"{"stauts": 201}"#, "unknown field"),
            (r#"{"status": 101}"#, "from 200 to 599"),
            (r#"{"status": 600}"#, "from 200 to 599"),
            (r#"{"status": 1000}"#, "from 200 to 599"),
            (
                r#"{"status": 200, "body": "a", "body_base64": "YQ=="}"#,
                "not both",
            ),
            (r#"{"status": 200, "body_base64": "**"}"#, "base64"),
            (
                r#"{"status": 200, "headers": [["bad name", "x"]]}"#,
                "header name",
            ),
            (
                r#"{"status": 200, "headers": [["x-a", "line\nbreak"]]}"#,
                "header value",
            ),
            (
                r#"{"status": 200, "headers": [["set-cookie", "s=1"]]}"#,
                "`set-cookie`",
            ),
            (
                r#"{"status": 200, "headers": [["content-length", "1"]]}"#,
                "`content-length`",
            ),
            (
                r#"{"status": 200, "headers": [["connection", "x-hop"], ["x-hop", "1"]]}"#,
                "never stored",
            ),
            (
                r#"{"status": 200, "headers": [["x-a"]]}"#,
                "not a valid answer",
            ),
            (
                r#"{"not_replayable": true, "status": 200}"#,
                "drop `status`",
            ),
            (r#"{"status": 200, "ttl_secs": 0}"#, "`ttl_secs`"),
            (r#"{"status": 200, "ttl_secs": 999999999999}"#, "`ttl_secs`"),
            ("not json", "not a valid answer"),
        ] {
            let err = parse(json.as_bytes(), DAY).expect_err(json);
            assert!(err.contains(says), "{json}: {err}");
        }
    }
}
