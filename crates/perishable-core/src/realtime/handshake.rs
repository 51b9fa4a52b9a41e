//! The WebSocket opening handshake of the Realtime route (RFC 6455 §4), both sides, and the
//! credentials a browser sends as subprotocols.
//!
//! hyper does the HTTP part and hands over the connection ([`hyper::upgrade`]); this module
//! checks the client's handshake, answers it, builds the upstream's and checks the upstream's
//! answer. tungstenite then speaks frames on the upgraded connections.

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};

use crate::dpop::DPOP_HEADER;
use crate::error::{Error, ErrorCode};
use crate::fingerprint::FINGERPRINT_HEADER;

/// The GUID RFC 6455 §1.3 appends to `Sec-WebSocket-Key`.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The subprotocol the proxy answers with (what the OpenAI SDKs offer).
pub(crate) const REALTIME_PROTOCOL: &str = "realtime";
/// The subprotocol the official JS SDK carries the API key in: here, the session token.
const TOKEN_PREFIX: &str = "openai-insecure-api-key.";
/// The fingerprint, base64url without padding (a subprotocol is a token: no spaces, no `=`).
const FINGERPRINT_PREFIX: &str = "perishable-fingerprint.";
/// A DPoP proof for a key-bound session.
const DPOP_PREFIX: &str = "perishable-dpop.";
/// What the beta JS SDK offers in place of the `OpenAI-Beta: realtime=v1` header.
const BETA_PROTOCOL: &str = "openai-beta.realtime-v1";

/// Whether `req` asks to become a WebSocket: a `GET` with `Upgrade: websocket`.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET && header_lists(req.headers(), &header::UPGRADE, "websocket")
}

/// Whether a comma-separated header lists `token` (case-insensitively).
fn header_lists(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(token))
}

/// The subprotocols a request offers, in order.
fn offered(headers: &HeaderMap) -> Result<Vec<&str>, Error> {
    let mut out = Vec::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value.to_str().map_err(|_| malformed_protocols())?;
        for protocol in value.split(',') {
            let protocol = protocol.trim();
            if protocol.is_empty() {
                continue;
            }
            out.push(protocol);
        }
    }
    Ok(out)
}

fn malformed_protocols() -> Error {
    Error::new(
        ErrorCode::InvalidToken,
        "the Sec-WebSocket-Protocol header is malformed",
    )
}

/// Moves the credentials a browser sends as subprotocols into the headers every other client
/// sends, so one verification reads both (`docs/protocol.md`, "Realtime"):
///
/// - `openai-insecure-api-key.<token>` becomes `Authorization: Bearer <token>`, or
///   `Authorization: DPoP <token>` when a proof comes too;
/// - `perishable-fingerprint.<base64url>` becomes `X-Perishable-Fingerprint`;
/// - `perishable-dpop.<proof>` becomes `DPoP`.
///
/// They are removed from `Sec-WebSocket-Protocol`, which keeps the rest. A credential sent
/// twice, or both ways, is refused rather than one of them picked. Requests that are not
/// WebSocket upgrades are left alone.
pub(crate) fn lift_credentials<B>(req: &mut Request<B>) -> Result<(), Error> {
    if !is_upgrade(req) || !req.headers().contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
        return Ok(());
    }
    let headers = req.headers();
    let mut token = None;
    let mut fingerprint = None;
    let mut proof = None;
    let mut rest = Vec::new();
    for protocol in offered(headers)? {
        let slot = if let Some(value) = protocol.strip_prefix(TOKEN_PREFIX) {
            (&mut token, value, ErrorCode::InvalidToken)
        } else if let Some(value) = protocol.strip_prefix(FINGERPRINT_PREFIX) {
            (&mut fingerprint, value, ErrorCode::FingerprintMismatch)
        } else if let Some(value) = protocol.strip_prefix(DPOP_PREFIX) {
            (&mut proof, value, ErrorCode::InvalidDpopProof)
        } else {
            rest.push(protocol.to_owned());
            continue;
        };
        let (slot, value, code) = slot;
        if slot.replace(value.to_owned()).is_some() {
            return Err(Error::new(
                code,
                "a credential subprotocol is offered twice",
            ));
        }
    }
    let twice = |name: &HeaderName, code: ErrorCode, what: &str| {
        if headers.contains_key(name) {
            Err(Error::new(
                code,
                format!("the {what} came both as a header and as a subprotocol: send it once"),
            ))
        } else {
            Ok(())
        }
    };
    if token.is_some() {
        twice(&header::AUTHORIZATION, ErrorCode::InvalidToken, "token")?;
    }
    if fingerprint.is_some() {
        twice(
            &FINGERPRINT_HEADER,
            ErrorCode::FingerprintMismatch,
            "fingerprint",
        )?;
    }
    if proof.is_some() {
        twice(&DPOP_HEADER, ErrorCode::InvalidDpopProof, "DPoP proof")?;
    }
    let fingerprint = fingerprint
        .map(|encoded| {
            URL_SAFE_NO_PAD
                .decode(encoded)
                .ok()
                .and_then(|raw| HeaderValue::from_bytes(&raw).ok())
                .ok_or_else(|| {
                    Error::new(
                        ErrorCode::FingerprintMismatch,
                        "the perishable-fingerprint subprotocol is not base64url (no padding) of \
                         a valid fingerprint",
                    )
                })
        })
        .transpose()?;
    let authorization = token
        .map(|token| {
            let scheme = if proof.is_some() { "DPoP" } else { "Bearer" };
            HeaderValue::try_from(format!("{scheme} {token}"))
                .map_err(|_| Error::new(ErrorCode::InvalidToken, "the session token is malformed"))
        })
        .transpose()?;
    let proof = proof
        .map(|proof| {
            HeaderValue::try_from(proof)
                .map_err(|_| Error::new(ErrorCode::InvalidDpopProof, "the DPoP proof is malformed"))
        })
        .transpose()?;

    let headers = req.headers_mut();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if !rest.is_empty() {
        // Each was a valid header value, so their join is one too.
        if let Ok(value) = HeaderValue::try_from(rest.join(", ")) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
    }
    if let Some(mut value) = authorization {
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    if let Some(value) = fingerprint {
        headers.insert(FINGERPRINT_HEADER, value);
    }
    if let Some(mut value) = proof {
        value.set_sensitive(true);
        headers.insert(DPOP_HEADER, value);
    }
    Ok(())
}

/// What the client's handshake asked for, once checked.
#[derive(Debug)]
pub(crate) struct ClientHandshake {
    /// `Sec-WebSocket-Accept` for the answer.
    pub(crate) accept: HeaderValue,
    /// Whether the client offered the `realtime` subprotocol (then the answer names it).
    pub(crate) realtime_protocol: bool,
    /// Whether the client offered the beta subprotocol (then the upstream gets
    /// `OpenAI-Beta: realtime=v1`).
    pub(crate) beta: bool,
}

/// Checks the client's opening handshake (RFC 6455 §4.2.1): `Connection: Upgrade`, version 13
/// and a key of 16 bytes. Credentials were lifted already ([`lift_credentials`]).
pub(crate) fn check_client(headers: &HeaderMap) -> Result<ClientHandshake, Error> {
    let bad = |message: &'static str| Error::new(ErrorCode::InvalidParameter, message);
    if !header_lists(headers, &header::CONNECTION, "upgrade") {
        return Err(bad("a WebSocket handshake needs Connection: Upgrade"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(bad(
            "only WebSocket version 13 is spoken (Sec-WebSocket-Version: 13)",
        ));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key,
        _ => return Err(bad("a WebSocket handshake needs one Sec-WebSocket-Key")),
    };
    let decoded = STANDARD
        .decode(key.as_bytes())
        .map_err(|_| bad("Sec-WebSocket-Key is not base64"))?;
    if decoded.len() != 16 {
        return Err(bad("Sec-WebSocket-Key must be 16 bytes, base64"));
    }
    let protocols = offered(headers)?;
    Ok(ClientHandshake {
        accept: accept_key(key.as_bytes()),
        realtime_protocol: protocols.contains(&REALTIME_PROTOCOL),
        beta: protocols.contains(&BETA_PROTOCOL),
    })
}

/// `Sec-WebSocket-Accept` for `key`: base64 of SHA-1 of the key and the GUID.
pub(crate) fn accept_key(key: &[u8]) -> HeaderValue {
    let mut context = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key);
    context.update(ACCEPT_GUID);
    let encoded = STANDARD.encode(context.finish().as_ref());
    // base64 is always a valid header value.
    HeaderValue::try_from(encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A fresh `Sec-WebSocket-Key` for the upstream handshake, from the OS RNG.
pub(crate) fn new_key() -> Result<HeaderValue, Error> {
    let mut raw = [0u8; 16];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| {
        Error::new(
            ErrorCode::UpstreamUnavailable,
            "could not draw a WebSocket key",
        )
    })?;
    HeaderValue::try_from(STANDARD.encode(raw))
        .map_err(|_| Error::new(ErrorCode::UpstreamUnavailable, "could not encode a key"))
}

/// The model of `?model=M` (exactly one, not empty), and the query rebuilt from what was read,
/// so the upstream reads the same parameters the allow-list checked.
pub(crate) fn model_query(query: Option<&str>) -> Result<(String, String), Error> {
    let mut model = None;
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if name == "model" {
            if model.is_some() {
                return Err(Error::new(
                    ErrorCode::InvalidParameter,
                    "name the model once (?model=...)",
                ));
            }
            model = Some(value.clone().into_owned());
        }
        out.append_pair(&name, &value);
    }
    match model {
        Some(model) if !model.is_empty() => Ok((model, out.finish())),
        _ => Err(Error::new(
            ErrorCode::InvalidParameter,
            "the Realtime route needs the model: /openai/realtime?model=...",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(protocols: &[&str]) -> Request<()> {
        let mut builder = Request::get("/openai/realtime?model=m")
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
        if !protocols.is_empty() {
            builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, protocols.join(", "));
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn browser_credentials_become_headers_and_leave_the_subprotocols() {
        let fp = URL_SAFE_NO_PAD.encode("device-1234");
        let mut req = upgrade(&[
            "realtime",
            "openai-insecure-api-key.tok.en.x",
            &format!("perishable-fingerprint.{fp}"),
        ]);
        lift_credentials(&mut req).unwrap();
        let h = req.headers();
        assert_eq!(h[header::AUTHORIZATION], "Bearer tok.en.x");
        assert_eq!(h[FINGERPRINT_HEADER], "device-1234");
        assert_eq!(h[header::SEC_WEBSOCKET_PROTOCOL], "realtime");
        assert!(!h.contains_key(DPOP_HEADER));
        let handshake = check_client(h).unwrap();
        assert!(handshake.realtime_protocol && !handshake.beta);

        let mut req = upgrade(&["openai-insecure-api-key.t", "perishable-dpop.p.r.f"]);
        lift_credentials(&mut req).unwrap();
        assert_eq!(req.headers()[header::AUTHORIZATION], "DPoP t");
        assert_eq!(req.headers()[DPOP_HEADER], "p.r.f");
        assert!(!req.headers().contains_key(header::SEC_WEBSOCKET_PROTOCOL));
    }

    #[test]
    fn a_credential_twice_or_both_ways_is_refused() {
        let mut req = upgrade(&["openai-insecure-api-key.a", "openai-insecure-api-key.b"]);
        assert_eq!(
            lift_credentials(&mut req).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
        let mut req = upgrade(&["openai-insecure-api-key.a"]);
        req.headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(
            lift_credentials(&mut req).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
        let mut req = upgrade(&["perishable-fingerprint.!!"]);
        assert_eq!(
            lift_credentials(&mut req).unwrap_err().code(),
            ErrorCode::FingerprintMismatch
        );
    }

    #[test]
    fn plain_requests_are_left_alone() {
        let mut req = Request::get("/openai/models")
            .header(header::SEC_WEBSOCKET_PROTOCOL, "openai-insecure-api-key.a")
            .body(())
            .unwrap();
        lift_credentials(&mut req).unwrap();
        assert!(!req.headers().contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn a_bad_handshake_is_refused() {
        let mut req = upgrade(&[]);
        req.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert!(check_client(req.headers()).is_err());
        let mut req = upgrade(&[]);
        req.headers_mut().insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        assert!(check_client(req.headers()).is_err());
        let mut req = upgrade(&[]);
        req.headers_mut().remove(header::CONNECTION);
        assert!(check_client(req.headers()).is_err());
    }

    #[test]
    fn the_model_is_read_once_and_the_query_rebuilt() {
        assert_eq!(
            model_query(Some("model=gpt-realtime")).unwrap(),
            ("gpt-realtime".to_owned(), "model=gpt-realtime".to_owned())
        );
        assert_eq!(model_query(Some("model=a%2Db&x=1")).unwrap().0, "a-b");
        for bad in [None, Some(""), Some("model="), Some("model=a&model=b")] {
            assert_eq!(
                model_query(bad).unwrap_err().code(),
                ErrorCode::InvalidParameter
            );
        }
    }
}
