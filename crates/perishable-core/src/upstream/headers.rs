//! Which headers cross the proxy, both ways.
//!
//! Upstream: the client's headers minus `Authorization`, `Cookie`, `DPoP`,
//! `X-Perishable-Fingerprint`, `Host`, `Content-Length` (unless the body kept its length) and every
//! hop-by-hop header
//! (`Connection`, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and
//! each header `Connection` names), plus `Authorization: Bearer <server key>` and the upstream's
//! `Host`.
//! Back to the client: the upstream's headers minus hop-by-hop ones and `Set-Cookie`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::UPGRADE
}

/// Whether `name` is listed in a `Connection` header (then it is hop-by-hop too).
fn listed_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Removes every header whose name `goes`, every header `Connection` lists, and `Connection`
/// itself last (until then its list can be read). Names are compared while scanning, not
/// hashed, and nothing is collected: each pass finds the next name to remove (a handful at
/// most). Without a `Connection` header, the usual case, no list is read.
fn remove_where(headers: &mut HeaderMap, goes: impl Fn(&HeaderName) -> bool) {
    let listing = headers.keys().any(|name| name == header::CONNECTION);
    while let Some(name) = headers
        .keys()
        .find(|name| {
            *name != header::CONNECTION
                && (goes(name) || (listing && listed_in_connection(headers, name)))
        })
        .cloned()
    {
        headers.remove(name);
    }
    if listing {
        headers.remove(header::CONNECTION);
    }
}

/// Whether the client's `Content-Length` is one value, `len` exactly (then it can stay).
fn declares(headers: &HeaderMap, len: usize) -> bool {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.as_bytes() == itoa::Buffer::new().format(len).as_bytes(),
        _ => false,
    }
}

/// Turns the client's headers into the ones to send upstream, in place (no copy of what stays).
/// `host` replaces the client's `Host` when given (otherwise the HTTP client sets it);
/// `Content-Length` stays when it is `body_len` already (otherwise the HTTP client sets it).
pub(crate) fn prepare_request_headers(
    headers: &mut HeaderMap,
    authorization: &HeaderValue,
    host: Option<&HeaderValue>,
    body_len: usize,
) {
    let keep_length = declares(headers, body_len);
    remove_where(headers, |name| {
        is_hop_by_hop(name)
            || name == header::COOKIE
            || name == crate::dpop::DPOP_HEADER
            || name == crate::fingerprint::FINGERPRINT_HEADER
            || (name == header::HOST && host.is_none())
            || (name == header::CONTENT_LENGTH && !keep_length)
    });
    // `insert` replaces every value in place: no removal first.
    headers.insert(header::AUTHORIZATION, authorization.clone());
    if let Some(host) = host {
        headers.insert(header::HOST, host.clone());
    }
}

/// Strips the upstream response's headers in place.
pub(crate) fn strip_response_headers(headers: &mut HeaderMap) {
    remove_where(headers, |name| {
        is_hop_by_hop(name) || name == header::SET_COOKIE
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_secrets_never_go_upstream() {
        let mut client = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer session-token"),
            ("cookie", "a=b"),
            ("dpop", "proof"),
            ("x-perishable-fingerprint", "device-1234"),
            ("host", "proxy.example"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "10"),
            ("content-type", "application/json"),
            ("x-stainless-lang", "python"),
        ] {
            client.append(k, v.parse().unwrap());
        }
        let mut out = client;
        // The body was rewritten (12 bytes now): its old length goes.
        prepare_request_headers(
            &mut out,
            &HeaderValue::from_static("Bearer sk-server"),
            None,
            12,
        );
        assert_eq!(out["authorization"], "Bearer sk-server");
        assert_eq!(out.get_all("authorization").iter().count(), 1);
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["x-stainless-lang"], "python");
        for gone in [
            "cookie",
            "dpop",
            "x-perishable-fingerprint",
            "host",
            "connection",
            "x-hop",
            "keep-alive",
            "transfer-encoding",
            "content-length",
        ] {
            assert!(!out.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn a_length_that_still_holds_stays() {
        let auth = HeaderValue::from_static("Bearer k");
        let mut headers = HeaderMap::new();
        headers.insert("content-length", "10".parse().unwrap());
        prepare_request_headers(&mut headers, &auth, None, 10);
        assert_eq!(headers["content-length"], "10");
        // Two values, even equal ones, or another length: the client recomputes it.
        for (values, len) in [
            (&["10", "10"][..], 10),
            (&["010"][..], 10),
            (&["9"][..], 10),
        ] {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append("content-length", v.parse().unwrap());
            }
            prepare_request_headers(&mut headers, &auth, None, len);
            assert!(!headers.contains_key("content-length"), "{values:?}");
        }
    }

    #[test]
    fn the_upstream_host_replaces_the_clients() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "proxy.example".parse().unwrap());
        let host = HeaderValue::from_static("127.0.0.1:11434");
        prepare_request_headers(
            &mut headers,
            &HeaderValue::from_static("Bearer k"),
            Some(&host),
            0,
        );
        assert_eq!(headers.get_all("host").iter().collect::<Vec<_>>(), [&host]);
    }

    #[test]
    fn response_loses_hop_by_hop_and_cookies() {
        let mut h = HeaderMap::new();
        h.insert("set-cookie", "__cf=1".parse().unwrap());
        h.append("set-cookie", "__cf=2".parse().unwrap());
        h.insert("connection", "close, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-request-id", "req_1".parse().unwrap());
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-request-id"], "req_1");
    }
}
