//! `DpopVerifier`: every RFC 9449 check on a proof; see the [module docs](super).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::error::{Error, ErrorCode};
use crate::token::hash_b64;

/// Longest proof accepted.
pub(crate) const MAX_PROOF_BYTES: usize = 8 * 1024;
const MAX_JTI_LEN: usize = 256;

/// Where the proof's `htu` must point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Htu<'a> {
    /// This exact URL (scheme, host, port and path), from `server.public_url`.
    Exact(&'a str),
    /// This host (with port, as in the `Host` header) and path, with any scheme.
    HostAndPath {
        /// The `Host` header.
        host: &'a str,
        /// The request path.
        path: &'a str,
    },
}

/// What the proof must match.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected<'a> {
    /// The request method.
    pub(crate) htm: &'a str,
    /// The request URL.
    pub(crate) htu: Htu<'a>,
    /// The access token presented with the proof (checked against `ath`).
    pub(crate) access_token: Option<&'a str>,
    /// The token's `cnf.jkt`, when it is key-bound.
    pub(crate) jkt: Option<&'a str>,
}

/// A verified proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DpopProof {
    /// RFC 7638 thumbprint of the proof's key.
    pub(crate) jkt: String,
    /// The proof's `jti`.
    pub(crate) jti: String,
    /// The proof's `iat`.
    pub(crate) iat: u64,
}

impl DpopProof {
    /// The id to record as seen ([`Set::DpopSeen`](crate::store::Set::DpopSeen)): `jkt.jti`.
    pub(crate) fn replay_id(&self) -> String {
        format!("{}.{}", self.jkt, self.jti)
    }
}

#[derive(Deserialize)]
struct Claims {
    jti: String,
    htm: String,
    htu: String,
    iat: u64,
    #[serde(default)]
    ath: Option<String>,
}

/// Verifies DPoP proofs; see the [module docs](super). Stateless: the caller records each
/// proof's [`replay_id`](DpopProof::replay_id) until [`replay_until`](Self::replay_until).
#[derive(Debug)]
pub(crate) struct DpopVerifier {
    max_age_secs: u64,
    leeway_secs: u64,
    es256: Validation,
    eddsa: Validation,
}

fn invalid(why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorCode::InvalidDpopProof, why)
}

fn validation(alg: jsonwebtoken::Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v
}

/// RFC 7638 thumbprint (SHA-256, base64url) of a public EC P-256 or OKP Ed25519 JWK.
pub(crate) fn thumbprint(jwk: &Value) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    let q = |v: &str| serde_json::to_string(v).ok();
    let canonical = match (s("kty")?, s("crv")?) {
        ("EC", crv) => format!(
            r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
            q(crv)?,
            q(s("x")?)?,
            q(s("y")?)?
        ),
        ("OKP", crv) => format!(r#"{{"crv":{},"kty":"OKP","x":{}}}"#, q(crv)?, q(s("x")?)?),
        _ => return None,
    };
    Some(hash_b64(canonical.as_bytes()))
}

/// Private or symmetric JWK members: a proof's key must have none.
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

fn htu_matches(claimed: &str, expected: Htu<'_>) -> bool {
    let Ok(claimed) = url::Url::parse(claimed) else {
        return false;
    };
    if !matches!(claimed.scheme(), "http" | "https") {
        return false;
    }
    match expected {
        Htu::Exact(url) => {
            let Ok(url) = url::Url::parse(url) else {
                return false;
            };
            claimed.scheme() == url.scheme()
                && claimed.host_str() == url.host_str()
                && claimed.port_or_known_default() == url.port_or_known_default()
                && claimed.path() == url.path()
        }
        Htu::HostAndPath { host, path } => {
            let authority = match (claimed.host_str(), claimed.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_owned(),
                (None, _) => return false,
            };
            authority.eq_ignore_ascii_case(host) && claimed.path() == path
        }
    }
}

impl DpopVerifier {
    /// Proofs may be `max_age_secs` old and `leeway_secs` in the future.
    pub(crate) fn new(max_age_secs: u64, leeway_secs: u64) -> Self {
        Self {
            max_age_secs,
            leeway_secs,
            es256: validation(jsonwebtoken::Algorithm::ES256),
            eddsa: validation(jsonwebtoken::Algorithm::EdDSA),
        }
    }

    /// Until when a proof must be remembered: past the end of its `iat` window, after which it
    /// is refused as too old anyway.
    pub(crate) fn replay_until(&self, proof: &DpopProof) -> u64 {
        proof.iat + self.max_age_secs + self.leeway_secs + 1
    }

    /// Verifies `proof` against `expected` (everything but replay).
    pub(crate) fn verify(
        &self,
        proof: &str,
        expected: &Expected<'_>,
        now: u64,
    ) -> Result<DpopProof, Error> {
        if proof.len() > MAX_PROOF_BYTES {
            return Err(invalid("the DPoP proof is too large"));
        }
        let header_b64 = proof
            .split('.')
            .next()
            .ok_or_else(|| invalid("the DPoP proof is malformed"))?;
        let header: Value = URL_SAFE_NO_PAD
            .decode(header_b64)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or_else(|| invalid("the DPoP proof is malformed"))?;
        if header.get("typ").and_then(Value::as_str) != Some("dpop+jwt") {
            return Err(invalid("the DPoP proof's typ must be dpop+jwt"));
        }
        let jwk = header
            .get("jwk")
            .filter(|j| j.is_object())
            .ok_or_else(|| invalid("the DPoP proof must carry its public key as jwk"))?;
        if PRIVATE_MEMBERS.iter().any(|m| jwk.get(m).is_some()) {
            return Err(invalid("the DPoP proof's jwk must be a public key"));
        }
        let kty = jwk.get("kty").and_then(Value::as_str);
        let crv = jwk.get("crv").and_then(Value::as_str);
        let validation = match (header.get("alg").and_then(Value::as_str), kty, crv) {
            (Some("ES256"), Some("EC"), Some("P-256")) => &self.es256,
            (Some("EdDSA"), Some("OKP"), Some("Ed25519")) => &self.eddsa,
            (Some("ES256" | "EdDSA"), _, _) => {
                return Err(invalid("the DPoP proof's jwk does not match its alg"));
            }
            _ => return Err(invalid("the DPoP proof's alg must be ES256 or EdDSA")),
        };
        let key = serde_json::from_value::<Jwk>(jwk.clone())
            .ok()
            .and_then(|jwk| DecodingKey::from_jwk(&jwk).ok())
            .ok_or_else(|| invalid("the DPoP proof's jwk is not a valid key"))?;
        let claims = jsonwebtoken::decode::<Claims>(proof, &key, validation)
            .map_err(|_| invalid("the DPoP proof's signature or claims are invalid"))?
            .claims;

        if claims.jti.is_empty() || claims.jti.len() > MAX_JTI_LEN {
            return Err(invalid("the DPoP proof's jti is missing or too long"));
        }
        if claims.htm != expected.htm {
            return Err(invalid("the DPoP proof is for another method (htm)"));
        }
        if !htu_matches(&claims.htu, expected.htu) {
            return Err(invalid("the DPoP proof is for another URL (htu)"));
        }
        if claims.iat + self.max_age_secs < now {
            return Err(invalid("the DPoP proof is too old (iat)"));
        }
        if claims.iat > now + self.leeway_secs {
            return Err(invalid("the DPoP proof is from the future (iat)"));
        }
        if let Some(token) = expected.access_token {
            let want = hash_b64(token.as_bytes());
            let ok = claims
                .ath
                .as_deref()
                .is_some_and(|ath| bool::from(ath.as_bytes().ct_eq(want.as_bytes())));
            if !ok {
                return Err(invalid("the DPoP proof is not for this token (ath)"));
            }
        }
        let jkt =
            thumbprint(jwk).ok_or_else(|| invalid("the DPoP proof's jwk is not a valid key"))?;
        if let Some(bound) = expected.jkt
            && !bool::from(bound.as_bytes().ct_eq(jkt.as_bytes()))
        {
            return Err(invalid("the DPoP proof is signed by another key"));
        }
        Ok(DpopProof {
            jkt,
            jti: claims.jti,
            iat: claims.iat,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::dpop::DpopSigner;

    const URL: &str = "https://api.example.com/ai/openai/models";

    fn now() -> u64 {
        crate::clock::unix_now()
    }

    fn expected<'a>(token: Option<&'a str>, jkt: Option<&'a str>) -> Expected<'a> {
        Expected {
            htm: "GET",
            htu: Htu::Exact(URL),
            access_token: token,
            jkt,
        }
    }

    fn refused(v: &DpopVerifier, proof: &str, e: &Expected<'_>) -> String {
        let err = v.verify(proof, e, now()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidDpopProof);
        err.message().to_owned()
    }

    #[test]
    fn es256_and_eddsa_proofs_verify() {
        let v = DpopVerifier::new(60, 5);
        for key in [DpopSigner::generate_es256(), DpopSigner::generate_ed25519()] {
            let proof = key.proof("GET", URL, Some("tok"));
            let ok = v
                .verify(
                    &proof,
                    &expected(Some("tok"), Some(key.thumbprint())),
                    now(),
                )
                .unwrap();
            assert_eq!(ok.jkt, key.thumbprint());
        }
    }

    #[test]
    fn each_binding_is_checked() {
        let v = DpopVerifier::new(60, 5);
        let key = DpopSigner::generate_es256();
        let other = DpopSigner::generate_es256();
        let jkt = Some(key.thumbprint());
        // Another method, another URL, a query-only difference is fine.
        assert!(
            refused(
                &v,
                &key.proof("POST", URL, Some("t")),
                &expected(Some("t"), jkt)
            )
            .contains("htm")
        );
        let other_url = "https://api.example.com/ai/openai/files";
        assert!(
            refused(
                &v,
                &key.proof("GET", other_url, Some("t")),
                &expected(Some("t"), jkt)
            )
            .contains("htu")
        );
        let with_query = format!("{URL}?x=1");
        assert!(
            v.verify(
                &key.proof("GET", &with_query, Some("t")),
                &expected(Some("t"), jkt),
                now()
            )
            .is_ok()
        );
        // ath for another token, and no ath at all.
        assert!(
            refused(
                &v,
                &key.proof("GET", URL, Some("other")),
                &expected(Some("t"), jkt)
            )
            .contains("ath")
        );
        assert!(
            refused(&v, &key.proof("GET", URL, None), &expected(Some("t"), jkt)).contains("ath")
        );
        // Another key.
        assert!(
            refused(
                &v,
                &other.proof("GET", URL, Some("t")),
                &expected(Some("t"), jkt)
            )
            .contains("another key")
        );
        // The replay id is per key and proof.
        let a = v
            .verify(
                &key.proof("GET", URL, Some("t")),
                &expected(Some("t"), jkt),
                now(),
            )
            .unwrap();
        let b = v
            .verify(
                &key.proof("GET", URL, Some("t")),
                &expected(Some("t"), jkt),
                now(),
            )
            .unwrap();
        assert_ne!(a.replay_id(), b.replay_id());
        assert!(a.replay_id().starts_with(key.thumbprint()));
        assert!(v.replay_until(&a) > a.iat + 60);
    }

    #[test]
    fn stale_and_future_iat_are_refused() {
        let v = DpopVerifier::new(60, 5);
        let key = DpopSigner::generate_es256();
        for iat in [now() - 61, now() + 30] {
            let proof = key.sign(&json!({"jti": "j", "htm": "GET", "htu": URL, "iat": iat}));
            assert!(refused(&v, &proof, &expected(None, None)).contains("iat"));
        }
    }

    #[test]
    fn header_rules() {
        let v = DpopVerifier::new(60, 5);
        let key = DpopSigner::generate_es256();
        let claims = json!({"jti": "j1", "htm": "GET", "htu": URL, "iat": now()});
        let proof = key.sign(&claims);
        let (h, rest) = proof.split_once('.').unwrap();
        let mut header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
        let reencode = |header: &Value| {
            format!(
                "{}.{rest}",
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap())
            )
        };
        let mut typ = header.clone();
        typ["typ"] = json!("JWT");
        assert!(refused(&v, &reencode(&typ), &expected(None, None)).contains("typ"));
        let mut hs = header.clone();
        hs["alg"] = json!("HS256");
        assert!(refused(&v, &reencode(&hs), &expected(None, None)).contains("alg"));
        header["jwk"]["d"] = json!("AAAA");
        assert!(refused(&v, &reencode(&header), &expected(None, None)).contains("public"));
        assert!(refused(&v, "garbage", &expected(None, None)).contains("malformed"));
    }

    #[test]
    fn host_and_path_ignores_scheme_but_not_host() {
        let e = |htu| Expected {
            htm: "GET",
            htu,
            access_token: None,
            jkt: None,
        };
        assert!(htu_matches(
            "http://proxy.local:8080/session",
            e(Htu::HostAndPath {
                host: "proxy.local:8080",
                path: "/session"
            })
            .htu
        ));
        assert!(!htu_matches(
            "http://evil.local:8080/session",
            e(Htu::HostAndPath {
                host: "proxy.local:8080",
                path: "/session"
            })
            .htu
        ));
        assert!(!htu_matches(
            "https://api.example.com/ai/x",
            Htu::Exact("http://api.example.com/ai/x")
        ));
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 section 3.1 uses RSA; check the EC canonical form on a known key instead:
        // the same members in another order give the same thumbprint.
        let a = json!({"kty":"EC","crv":"P-256","x":"abc","y":"def"});
        let b = json!({"y":"def","x":"abc","crv":"P-256","kty":"EC","use":"sig"});
        assert_eq!(thumbprint(&a), thumbprint(&b));
        assert_eq!(
            thumbprint(&a).unwrap(),
            hash_b64(br#"{"crv":"P-256","kty":"EC","x":"abc","y":"def"}"#)
        );
    }
}
