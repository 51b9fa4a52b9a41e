//! The header rules of the forwarding contract (see "Forwarding rules" in `docs/protocol.md`):
//! which headers are hop-by-hop, and which no configuration may forward or set (credentials,
//! what an upstream trusts about billing or the client, what the proxy sets itself).
//!
//! A leaf: the configuration validates `upstream.forward_headers` and `upstream.headers` with
//! these rules, and the upstream Service applies them to every request and response.

use http::header::{self, HeaderName, HeaderValue};

/// Headers that neither `upstream.forward_headers` nor `upstream.headers` may name: credentials,
/// what an upstream trusts about billing or the client, and what the proxy itself sets.
const NEVER_FORWARDED: [&str; 14] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "openai-organization",
    "openai-project",
    "forwarded",
    "x-real-ip",
    "api-key",
    "x-api-key",
    "dpop",
    "x-perishable-fingerprint",
    "host",
    "content-length",
    "accept-encoding",
];

/// Hop-by-hop headers (RFC 9110 section 7.6.1, and the legacy ones): they never cross the
/// proxy, either way.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Why `name` may never be forwarded, if it may not.
fn refused(name: &HeaderName) -> Option<&'static str> {
    let n = name.as_str();
    if NEVER_FORWARDED.contains(&n) || n.starts_with("x-forwarded-") {
        Some("is a credential or a header the upstream trusts, and is never forwarded")
    } else if is_hop_by_hop(name) || n == "content-encoding" {
        Some("is set by the proxy itself")
    } else {
        None
    }
}

/// Validates one `upstream.forward_headers` entry.
pub(crate) fn forwarded_header_name(name: &str) -> Result<HeaderName, String> {
    let parsed =
        HeaderName::try_from(name).map_err(|_| format!("{name:?} is not a header name"))?;
    match refused(&parsed) {
        Some(reason) => Err(format!("{name:?} {reason}")),
        None => Ok(parsed),
    }
}

/// Validates one `upstream.headers` entry.
pub(crate) fn static_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let parsed =
        HeaderName::try_from(name).map_err(|_| format!("{name:?} is not a header name"))?;
    // A static header is the server's own, so billing headers (`OpenAI-Project`) are what it is
    // for; credentials and what the proxy sets itself are still refused.
    let billing = matches!(parsed.as_str(), "openai-organization" | "openai-project");
    if !billing && let Some(reason) = refused(&parsed) {
        return Err(format!("{name:?} {reason}"));
    }
    let mut value = HeaderValue::try_from(value)
        .map_err(|_| format!("the value of {name:?} is not a valid header value"))?;
    value.set_sensitive(true);
    Ok((parsed, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_trusted_headers_cannot_be_listed() {
        for name in [
            "Authorization",
            "OpenAI-Organization",
            "openai-project",
            "X-Forwarded-For",
            "x-forwarded-proto",
            "Forwarded",
            "X-Real-IP",
            "api-key",
            "X-Api-Key",
            "cookie",
            "dpop",
            "x-perishable-fingerprint",
            "host",
            "connection",
            "transfer-encoding",
            "accept-encoding",
            "not a name",
        ] {
            assert!(forwarded_header_name(name).is_err(), "{name}");
        }
        assert!(forwarded_header_name("X-Trace-Id").is_ok());
        for name in ["authorization", "x-api-key", "host", "accept-encoding"] {
            assert!(static_header(name, "v").is_err(), "{name}");
        }
        assert!(static_header("OpenAI-Organization", "org-1").is_ok());
        assert!(static_header("x-tenant", "bad\nvalue").is_err());
    }
}
