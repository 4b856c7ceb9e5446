//! Turning a response into a stored record, and a stored record back into a response.
//!
//! On store, hop-by-hop headers (and any named in `Connection`), `Content-Length`,
//! `Set-Cookie`, `Date` and the headers the policy denies are dropped; the rest keep their
//! order, count and bytes. On replay the body is a full buffer whose size hint is exact
//! (the server writes `Content-Length` from it), and `Idempotent-Replayed: true` is
//! added.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::record::StoredResponse;

/// `Idempotent-Replayed`, set to `true` on every replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The headers of `headers` that are kept in a stored record, in order.
pub(crate) fn stored_headers(
    headers: &HeaderMap,
    denied: &[HeaderName],
) -> Vec<(HeaderName, HeaderValue)> {
    // Headers named in `Connection` are hop-by-hop too (RFC 9110 section 7.6.1). Most
    // responses have no `Connection` header: no scan then.
    let connection_named: Vec<HeaderName> = if headers.contains_key(header::CONNECTION) {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let dropped = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || name == header::UPGRADE
            || name == header::CONTENT_LENGTH
            || name == header::SET_COOKIE
            || name == header::DATE
            || name == IDEMPOTENT_REPLAYED
            || denied.contains(name)
            || connection_named.contains(name)
    };
    // `HeaderMap::iter` yields each value of a repeated name in insertion order.
    headers
        .iter()
        .filter(|(name, _)| !dropped(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// The replay of a stored response.
pub(crate) fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let StoredResponse {
        status,
        headers,
        body,
    } = stored;
    let bodiless = status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let body = if bodiless { Bytes::new() } else { body };
    // The body is one full buffer whose size hint is exact, so the server (hyper, and
    // axum's router before it) writes the exact `Content-Length`: no header to format
    // and allocate here.
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    let map = response.headers_mut();
    map.reserve(headers.len() + 1);
    for (name, value) in headers {
        map.append(name, value);
    }
    map.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_hop_by_hop_and_keeps_repeats_in_order() {
        let mut h = HeaderMap::new();
        h.append(header::LINK, HeaderValue::from_static("<a>"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("x-hop, keep-alive"),
        );
        h.append("x-hop", HeaderValue::from_static("1"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.append(header::DATE, HeaderValue::from_static("today"));
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append("x-secret", HeaderValue::from_static("s"));
        h.append(header::LINK, HeaderValue::from_static("<b>"));
        h.append("x-bin", HeaderValue::from_bytes(&[0xfe, b'z']).unwrap());
        let kept = stored_headers(&h, &[HeaderName::from_static("x-secret")]);
        let names: Vec<_> = kept
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("link", &b"<a>"[..]),
                ("link", &b"<b>"[..]),
                ("x-bin", &[0xfe, b'z'][..])
            ]
        );
    }

    #[test]
    fn no_content_replays_empty() {
        let r: Response<ResponseBody<http_body_util::Empty<Bytes>>> = replay(StoredResponse {
            status: StatusCode::NO_CONTENT,
            headers: vec![],
            body: Bytes::from_static(b"x"),
        });
        assert!(r.headers().get(header::CONTENT_LENGTH).is_none());
        assert_eq!(r.headers()[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(http_body::Body::size_hint(r.body()).exact(), Some(0));
    }

    #[test]
    fn a_replayed_body_has_an_exact_size_hint() {
        let r: Response<ResponseBody<http_body_util::Empty<Bytes>>> = replay(StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![],
            body: Bytes::from_static(b"paid"),
        });
        assert_eq!(http_body::Body::size_hint(r.body()).exact(), Some(4));
    }
}
