//! Which headers cross the proxy, both ways (see "Forwarding rules" in `docs/protocol.md`).
//!
//! Upstream, by allow-list: of the client's headers only `Content-Type`, `Accept`, `User-Agent`,
//! `OpenAI-Beta`, `Idempotency-Key`, `X-Stainless-*` and the names in
//! `upstream.forward_headers` pass, plus `Content-Length` when the body kept its length. An
//! upstream trusts more than the body: `OpenAI-Organization` and `OpenAI-Project` pick who is
//! billed, `X-Forwarded-For` and `Forwarded` who the end user is, `api-key` and `x-api-key` are
//! credentials to some providers. None of those can be forwarded, not even by listing them.
//! Then the server's own: `Authorization: Bearer <server key>` (none for a keyless upstream),
//! the static `upstream.headers`, `Accept-Encoding: identity` (so every response can be
//! metered) and, for a cleartext upstream, its `Host`.
//!
//! Back to the client: the upstream's headers minus hop-by-hop ones (and each header
//! `Connection` names) and `Set-Cookie`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::header_rules::is_hop_by_hop;

/// Client headers always forwarded (besides `X-Stainless-*`): what the official SDKs send that
/// an upstream may need.
static FORWARDED: [HeaderName; 5] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static("openai-beta"),
    HeaderName::from_static("idempotency-key"),
];

/// The prefix of the SDKs' telemetry headers (`X-Stainless-Lang`, `X-Stainless-Retry-Count`, ...).
const STAINLESS: &str = "x-stainless-";

/// What the proxy sends upstream besides the client's body: built once from the config.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamHeaders {
    /// `Authorization: Bearer <server key>`; `None` for a keyless upstream.
    pub(crate) authorization: Option<HeaderValue>,
    /// The `Host` header for a cleartext upstream (always HTTP/1.1), made once instead of by
    /// the client on every request. `None` for `https`, where HTTP/2 may carry the authority
    /// in `:authority` instead.
    pub(crate) host: Option<HeaderValue>,
    /// `upstream.forward_headers`.
    pub(crate) forward: Vec<HeaderName>,
    /// `upstream.headers`.
    pub(crate) fixed: Vec<(HeaderName, HeaderValue)>,
}

impl UpstreamHeaders {
    fn forwards(&self, name: &HeaderName) -> bool {
        FORWARDED.contains(name)
            || name.as_str().starts_with(STAINLESS)
            || self.forward.contains(name)
    }

    /// The headers to send upstream, from the client's: the allowed ones moved over (no copy
    /// of their values), then the server's own. `Content-Length` stays when it is `body_len`
    /// already (otherwise the HTTP client sets it).
    pub(crate) fn prepare(&self, client: &mut HeaderMap, body_len: usize) -> HeaderMap {
        let keep_length = declares(client, body_len);
        let mut out = HeaderMap::with_capacity(client.len() + 4 + self.fixed.len());
        let mut current: Option<HeaderName> = None;
        for (name, value) in client.drain() {
            // `drain` names a header once, then yields its further values with `None`.
            if let Some(name) = name {
                current = Some(name);
            }
            let Some(name) = current.as_ref() else {
                continue;
            };
            let listed = (keep_length && name == header::CONTENT_LENGTH) || self.forwards(name);
            if listed && !is_hop_by_hop(name) {
                out.append(name.clone(), value);
            }
        }
        if let Some(authorization) = &self.authorization {
            out.insert(header::AUTHORIZATION, authorization.clone());
        }
        for (name, value) in &self.fixed {
            out.insert(name.clone(), value.clone());
        }
        out.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(host) = &self.host {
            out.insert(header::HOST, host.clone());
        }
        out
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

/// Whether `name` is listed in a `Connection` header (then it is hop-by-hop too).
fn listed_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Strips the upstream response's headers in place: hop-by-hop ones, every header `Connection`
/// lists, `Set-Cookie`, and the upstream's `Access-Control-*` (CORS is the proxy's: an
/// upstream's `Access-Control-Allow-Credentials` must not join the proxy's allowed origin). Names are compared while scanning, and nothing is collected: each
/// pass finds the next name to remove (a handful at most). Without a `Connection` header, the
/// usual case, no list is read.
pub(crate) fn strip_response_headers(headers: &mut HeaderMap) {
    let listing = headers.contains_key(header::CONNECTION);
    while let Some(name) = headers
        .keys()
        .find(|name| {
            *name != header::CONNECTION
                && (is_hop_by_hop(name)
                    || *name == header::SET_COOKIE
                    || name.as_str().starts_with("access-control-")
                    || (listing && listed_in_connection(headers, name)))
        })
        .cloned()
    {
        headers.remove(name);
    }
    if listing {
        headers.remove(header::CONNECTION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header_rules::{forwarded_header_name, static_header};

    fn upstream(forward: &[&str], fixed: &[(&str, &str)]) -> UpstreamHeaders {
        UpstreamHeaders {
            authorization: Some(HeaderValue::from_static("Bearer sk-server")),
            host: None,
            forward: forward
                .iter()
                .map(|n| forwarded_header_name(n).unwrap())
                .collect(),
            fixed: fixed
                .iter()
                .map(|(n, v)| static_header(n, v).unwrap())
                .collect(),
        }
    }

    fn client(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
        }
        headers
    }

    #[test]
    fn only_listed_client_headers_go_upstream() {
        let mut headers = client(&[
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
            ("openai-organization", "org-victim"),
            ("openai-project", "proj_victim"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("api-key", "sk-other"),
            ("x-api-key", "sk-other"),
            ("accept-encoding", "gzip, deflate"),
            ("origin", "https://app.example"),
            ("referer", "https://app.example/page"),
            ("content-type", "application/json"),
            ("accept", "application/json"),
            ("user-agent", "OpenAI/Python 1.0"),
            ("openai-beta", "assistants=v2"),
            ("idempotency-key", "stainless-python-retry-1"),
            ("x-stainless-lang", "python"),
            ("x-stainless-retry-count", "0"),
        ]);
        // The body was rewritten (12 bytes now): its old length goes.
        let out = upstream(&[], &[]).prepare(&mut headers, 12);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "accept-encoding",
                "authorization",
                "content-type",
                "idempotency-key",
                "openai-beta",
                "user-agent",
                "x-stainless-lang",
                "x-stainless-retry-count",
            ]
        );
        assert_eq!(out["authorization"], "Bearer sk-server");
        assert_eq!(out.get_all("authorization").iter().count(), 1);
        assert_eq!(out["accept-encoding"], "identity");
    }

    #[test]
    fn forward_headers_and_static_headers_are_added() {
        let mut headers = client(&[("x-trace-id", "t1"), ("x-other", "o")]);
        let out = upstream(&["x-trace-id"], &[("OpenAI-Project", "proj_server")])
            .prepare(&mut headers, 0);
        assert_eq!(out["x-trace-id"], "t1");
        assert!(!out.contains_key("x-other"));
        assert_eq!(out["openai-project"], "proj_server");

        // A client's own OpenAI-Project never replaces or joins the server's.
        let mut headers = client(&[("openai-project", "proj_client")]);
        let out = upstream(&[], &[("OpenAI-Project", "proj_server")]).prepare(&mut headers, 0);
        let values: Vec<_> = out.get_all("openai-project").iter().collect();
        assert_eq!(values, ["proj_server"]);
    }

    #[test]
    fn a_keyless_upstream_gets_no_authorization() {
        let mut upstream = upstream(&[], &[]);
        upstream.authorization = None;
        let mut headers = client(&[("authorization", "Bearer session-token")]);
        let out = upstream.prepare(&mut headers, 0);
        assert!(!out.contains_key("authorization"));
    }

    #[test]
    fn a_length_that_still_holds_stays() {
        let mut headers = client(&[("content-length", "10")]);
        let out = upstream(&[], &[]).prepare(&mut headers, 10);
        assert_eq!(out["content-length"], "10");
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
            let out = upstream(&[], &[]).prepare(&mut headers, len);
            assert!(!out.contains_key("content-length"), "{values:?}");
        }
    }

    #[test]
    fn the_upstream_host_replaces_the_clients() {
        let mut headers = client(&[("host", "proxy.example")]);
        let mut upstream = upstream(&[], &[]);
        let host = HeaderValue::from_static("127.0.0.1:11434");
        upstream.host = Some(host.clone());
        let out = upstream.prepare(&mut headers, 0);
        assert_eq!(out.get_all("host").iter().collect::<Vec<_>>(), [&host]);
    }

    #[test]
    fn response_loses_hop_by_hop_cookies_and_cors() {
        let mut h = HeaderMap::new();
        h.insert("set-cookie", "__cf=1".parse().unwrap());
        h.append("set-cookie", "__cf=2".parse().unwrap());
        h.insert("connection", "close, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-request-id", "req_1".parse().unwrap());
        h.insert("access-control-allow-origin", "*".parse().unwrap());
        h.insert("access-control-allow-credentials", "true".parse().unwrap());
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-request-id"], "req_1");
    }
}
