//! Session tokens: JWT claims, signing keys with rotation, signing and verification.
//!
//! Tokens are JWS with header `typ: at+jwt`, the configured algorithm (HS256 by default, EdDSA
//! supported) and a `kid`. The algorithm is pinned: a token whose header names another algorithm
//! (including `none`) is refused before any signature work. `exp`, `nbf`, `iss` and `aud` are
//! required and checked with a small leeway (`session.leeway_secs`, 5 s by default).
//!
//! Rotation: the key set signs with one key (the newest) and verifies with all of them, picked by
//! `kid`.
//!
//! Verified tokens are cached (`session.verified_cache_size` entries, 10,000 by default; 0 turns
//! the cache off): a token seen before skips the signature and JSON work, which matters for EdDSA
//! (tens of microseconds per verification). The cache key is the whole token, a hit is checked
//! against `exp` again, entries leave with their tokens, and revocation is never cached (the
//! session engine checks it on every request). When no key is configured, a random one is made from the OS RNG and a warning is logged:
//! such tokens do not survive a restart and do not verify on another instance.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use aws_lc_rs::rand::SecureRandom;
use aws_lc_rs::signature::KeyPair;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Algorithm, ConfigError, SessionConfig, ed25519_pkcs8_der, kid_for};
use crate::error::{Error, ErrorCode};

/// The token's `typ` header.
pub(crate) const TOKEN_TYPE: &str = "at+jwt";

/// The `cnf` claim of a key-bound session (RFC 7800).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Confirmation {
    /// RFC 7638 thumbprint of the client's public key.
    pub jkt: String,
}

/// The claims of a session token. They hold no personal data: the fingerprint and User-Agent are
/// hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Session id: 128 random bits, base64url.
    pub jti: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before (Unix seconds).
    pub nbf: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// When the session was first minted (Unix seconds); refresh keeps it.
    pub auth_time: u64,
    /// base64url SHA-256 of the fingerprint.
    pub fp: String,
    /// base64url SHA-256 of the User-Agent, when user-agent binding is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ua: Option<String>,
    /// The bound key, for DPoP sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// The user, when an identity gate passed (`oidc`): base64url SHA-256 of the ID token's
    /// `iss`, a zero byte and its `sub`. No personal data; limits, caps and budgets key on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usr: Option<String>,
    /// The user's tier (`mint.oidc.tier_claim`), which selects `[budget.tiers.NAME]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// The claims of a request's verified session, which [`VerifyLayer`](crate::verify::VerifyLayer)
/// puts in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedSession {
    /// The token's claims (shared with the verified-token cache).
    pub claims: Arc<Claims>,
}

impl VerifiedSession {
    /// The session id (`jti`).
    pub fn session_id(&self) -> &str {
        &self.claims.jti
    }

    /// The fingerprint hash (`fp`), the default rate-limit key.
    pub fn fingerprint_hash(&self) -> &str {
        &self.claims.fp
    }
}

/// base64url (no padding) SHA-256 of `data`: how fingerprints and User-Agents are put in claims.
///
/// On the hot path (every request hashes its fingerprint and User-Agent): aws-lc's SHA-256
/// uses the CPU's SHA extensions where there are some.
pub(crate) fn hash_b64(data: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Fresh random bytes from the OS RNG.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The OS RNG failing is not something a server can recover from; aws-lc aborts in that case.
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut out).is_err() {
        panic!("the operating system's random number generator failed");
    }
    out
}

/// A fresh session id: 128 random bits, base64url.
pub(crate) fn new_jti() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<16>())
}

/// The signing key and every verification key, with the `Validation` built once.
#[derive(Clone)]
pub(crate) struct KeySet {
    inner: Arc<KeySetInner>,
}

struct KeySetInner {
    algorithm: Algorithm,
    signing_kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    /// Secret material derived from the signing key, for other HMACs (proof-of-work challenges).
    derived: [u8; 32],
    generated: bool,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<_> = self.inner.verifying.keys().collect();
        kids.sort();
        f.debug_struct("KeySet")
            .field("algorithm", &self.inner.algorithm)
            .field("signing_kid", &self.inner.signing_kid)
            .field("kids", &kids)
            .field("generated", &self.inner.generated)
            .finish()
    }
}

struct Loaded {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    material: Vec<u8>,
}

fn hmac_key(kid: String, secret: &[u8]) -> Loaded {
    Loaded {
        kid,
        encoding: EncodingKey::from_secret(secret),
        decoding: DecodingKey::from_secret(secret),
        material: secret.to_vec(),
    }
}

fn ed25519_from_pkcs8(kid: String, der: &[u8], key: &'static str) -> Result<Loaded, ConfigError> {
    let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(der).map_err(|_| {
        ConfigError::Invalid {
            key,
            reason: "is not an Ed25519 PKCS#8 private key".to_owned(),
        }
    })?;
    Ok(Loaded {
        kid,
        encoding: EncodingKey::from_ed_der(der),
        decoding: DecodingKey::from_ed_der(pair.public_key().as_ref()),
        material: der.to_vec(),
    })
}

impl KeySet {
    /// Decodes the keys of a validated `[session]`, or makes a random one when none is given
    /// (the runtime warns about it; see [`is_generated`](Self::is_generated)).
    pub(crate) fn from_config(session: &SessionConfig) -> Result<Self, ConfigError> {
        let mut loaded = Vec::new();
        for entry in &session.keys {
            // `[session]` was validated: each entry has the material its algorithm takes.
            let key = match (session.algorithm, &entry.secret, &entry.private_key_pem) {
                (Algorithm::HS256, Some(secret), _) => {
                    hmac_key(entry.kid.clone(), secret.expose().as_bytes())
                }
                (_, _, Some(pem)) => {
                    let der = ed25519_pkcs8_der(pem.expose(), "session.keys")?;
                    ed25519_from_pkcs8(entry.kid.clone(), &der, "session.keys")?
                }
                (_, _, None) => {
                    return Err(ConfigError::Invalid {
                        key: "session.keys",
                        reason: format!("key {:?} has no key material", entry.kid),
                    });
                }
            };
            loaded.push(key);
        }
        if let Some(secret) = &session.jwt_secret {
            let bytes = secret.expose().as_bytes();
            loaded.push(hmac_key(kid_for(bytes), bytes));
        }
        let mut generated = false;
        if loaded.is_empty() {
            generated = true;
            let key = match session.algorithm {
                Algorithm::HS256 => {
                    let secret = random_bytes::<32>();
                    hmac_key(kid_for(&secret), &secret)
                }
                Algorithm::EdDSA => {
                    let rng = aws_lc_rs::rand::SystemRandom::new();
                    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(
                        |_| ConfigError::Invalid {
                            key: "session.keys",
                            reason: "could not generate an Ed25519 key".to_owned(),
                        },
                    )?;
                    let der = doc.as_ref();
                    ed25519_from_pkcs8(kid_for(der), der, "session.keys")?
                }
            };
            loaded.push(key);
        }

        let mut verifying = HashMap::new();
        for key in &loaded {
            if verifying
                .insert(key.kid.clone(), key.decoding.clone())
                .is_some()
            {
                return Err(ConfigError::Invalid {
                    key: "session.keys",
                    reason: format!("kid {:?} is used twice", key.kid),
                });
            }
        }
        // The newest key signs: `jwt_secret` when set (it was pushed last), else the last entry.
        let Some(newest) = loaded.pop() else {
            unreachable!("a key was generated when none was configured")
        };
        let derived = {
            let mut hasher = Sha256::new();
            hasher.update(b"perishable derived key v1\0");
            hasher.update(&newest.material);
            hasher.finalize().into()
        };
        Ok(Self {
            inner: Arc::new(KeySetInner {
                algorithm: session.algorithm,
                signing_kid: newest.kid,
                signing: newest.encoding,
                verifying,
                derived,
                generated,
            }),
        })
    }

    /// Whether the signing key was generated at start-up rather than configured.
    pub(crate) fn is_generated(&self) -> bool {
        self.inner.generated
    }

    /// The `kid` tokens are signed with.
    #[cfg(test)]
    pub(crate) fn signing_kid(&self) -> &str {
        &self.inner.signing_kid
    }

    /// 32 bytes derived from the signing key: shared by every instance with the same keys.
    pub(crate) fn derived_secret(&self) -> &[u8; 32] {
        &self.inner.derived
    }
}

fn jwt_algorithm(algorithm: Algorithm) -> jsonwebtoken::Algorithm {
    match algorithm {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
    }
}

/// Signs and verifies session tokens with the configured keys and the `[session]` rules.
#[derive(Clone)]
pub(crate) struct TokenCodec {
    keys: KeySet,
    validation: Arc<Validation>,
    cache: Arc<VerifiedCache>,
}

/// Tokens already verified, until their `exp`; bounded.
#[derive(Default)]
struct VerifiedCache {
    capacity: usize,
    /// Read on every request, written on a miss: an `RwLock` keeps hits parallel. Hashed by
    /// foldhash (randomly seeded; a token is a few hundred bytes, which SipHash spends a
    /// microsecond on); only tokens that verified are ever inserted.
    entries: std::sync::RwLock<HashMap<Box<[u8]>, Verified, foldhash::fast::RandomState>>,
    leeway: u64,
}

impl VerifiedCache {
    fn get(&self, token: &[u8], now: u64) -> Option<Verified> {
        if self.capacity == 0 {
            return None;
        }
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries
            .get(token)
            .filter(|v| now < v.claims.exp.saturating_add(self.leeway))
            .cloned()
    }

    fn put(&self, token: &str, verified: &Verified, now: u64) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= self.capacity {
            entries.retain(|_, v| now < v.claims.exp.saturating_add(self.leeway));
            if entries.len() >= self.capacity {
                // Still full of live tokens: start over rather than grow.
                entries.clear();
            }
        }
        entries.insert(token.as_bytes().into(), verified.clone());
    }
}

/// The raw fingerprint and User-Agent (empty when not bound) that matched a token's hashes.
pub(crate) type Matched = (Box<[u8]>, Box<[u8]>);

/// A verified token's claims and what the caller checked them against before.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) claims: Arc<Claims>,
    /// The raw header values (fingerprint, User-Agent) that matched the claims' hashes the first
    /// time: later requests with the same token compare with them (in constant time) instead of
    /// hashing again. Shared by every copy of this cache entry.
    pub(crate) matched: Arc<std::sync::OnceLock<Matched>>,
}

impl fmt::Debug for TokenCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCodec")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl TokenCodec {
    /// A codec for these keys, issuer, audience and leeway, caching up to 10,000 verified
    /// tokens.
    #[cfg(test)]
    pub(crate) fn new(keys: KeySet, issuer: &str, audience: &str, leeway_secs: u64) -> Self {
        Self::with_cache(keys, issuer, audience, leeway_secs, 10_000)
    }

    /// Like [`new`](Self::new), caching up to `cache_size` verified tokens (0: no cache).
    pub(crate) fn with_cache(
        keys: KeySet,
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
        cache_size: usize,
    ) -> Self {
        let mut validation = Validation::new(jwt_algorithm(keys.inner.algorithm));
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "iat", "jti"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = leeway_secs;
        Self {
            keys,
            validation: Arc::new(validation),
            cache: Arc::new(VerifiedCache {
                capacity: cache_size,
                entries: Default::default(),
                leeway: leeway_secs,
            }),
        }
    }

    /// Signs `claims` with the newest key.
    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, Error> {
        let mut header = Header::new(jwt_algorithm(self.keys.inner.algorithm));
        header.typ = Some(TOKEN_TYPE.to_owned());
        header.kid = Some(self.keys.inner.signing_kid.clone());
        jsonwebtoken::encode(&header, claims, &self.keys.inner.signing).map_err(|e| {
            tracing::error!(error = %e, "signing a session token failed");
            Error::new(
                ErrorCode::InvalidToken,
                "the session token could not be signed",
            )
        })
    }

    /// Verifies signature, algorithm, `typ`, `kid`, `iss`, `aud`, `exp` and `nbf`.
    ///
    /// Revocation, fingerprint and User-Agent are checked by the caller. The claims are shared
    /// with the cache (a hit copies nothing).
    #[cfg(test)]
    pub(crate) fn verify(&self, token: &str) -> Result<Arc<Claims>, Error> {
        self.verify_cached(token.as_bytes()).map(|v| v.claims)
    }

    /// [`verify`](Self::verify), with the cache entry's memo of matched header values.
    /// The token is looked up in the cache as bytes; only a miss checks it is text.
    pub(crate) fn verify_cached(&self, token: &[u8]) -> Result<Verified, Error> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(verified) = self.cache.get(token, now) {
            return Ok(verified);
        }
        let token = std::str::from_utf8(token)
            .ok()
            .filter(|t| t.is_ascii())
            .ok_or_else(|| Error::new(ErrorCode::InvalidToken, "the session token is malformed"))?;
        let verified = Verified {
            claims: Arc::new(self.verify_uncached(token)?),
            matched: Arc::default(),
        };
        self.cache.put(token, &verified, now);
        Ok(verified)
    }

    /// [`verify`](Self::verify) without the cache: every check, every time.
    pub(crate) fn verify_uncached(&self, token: &str) -> Result<Claims, Error> {
        let invalid = |why: &'static str| Error::new(ErrorCode::InvalidToken, why);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("the session token is malformed"))?;
        if header.alg != jwt_algorithm(self.keys.inner.algorithm) {
            return Err(invalid(
                "the session token uses an algorithm that is not accepted",
            ));
        }
        if header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(invalid("the session token has the wrong typ"));
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.inner.verifying.get(kid))
            .ok_or_else(|| invalid("the session token was signed with an unknown key"))?;
        match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => {
                    Error::new(ErrorCode::TokenExpired, "the session token has expired")
                }
                ErrorKind::ImmatureSignature => invalid("the session token is not valid yet"),
                ErrorKind::InvalidAudience => invalid("the session token is for another audience"),
                ErrorKind::InvalidIssuer => invalid("the session token is from another issuer"),
                ErrorKind::InvalidSignature => invalid("the session token's signature is invalid"),
                _ => invalid("the session token is invalid"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn session(secret: &str) -> SessionConfig {
        SessionConfig {
            jwt_secret: Some(Secret::new(secret)),
            ..SessionConfig::default()
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: "perishable".into(),
            aud: "perishable".into(),
            jti: new_jti(),
            iat: now(),
            nbf: now(),
            exp,
            auth_time: now(),
            fp: hash_b64(b"fingerprint"),
            ua: None,
            cnf: None,
            usr: None,
            tier: None,
        }
    }

    fn codec(session: &SessionConfig) -> TokenCodec {
        TokenCodec::new(
            KeySet::from_config(session).unwrap(),
            "perishable",
            "perishable",
            0,
        )
    }

    #[test]
    fn the_cache_gives_the_same_answers() {
        let codec = codec(&session("0123456789abcdef0123456789abcdef"));
        let c = claims(now() + 60);
        let token = codec.sign(&c).unwrap();
        assert_eq!(*codec.verify(&token).unwrap(), c, "miss");
        assert_eq!(*codec.verify(&token).unwrap(), c, "hit");
        // A tampered token is not a cache hit.
        let mut tampered = token.clone();
        tampered.push('x');
        assert!(codec.verify(&tampered).is_err());
        // An expired cached entry is refused, as verification would.
        let short = claims(now() + 1);
        let token = codec.sign(&short).unwrap();
        assert!(codec.verify(&token).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(
            codec.verify(&token).unwrap_err().code(),
            ErrorCode::TokenExpired
        );
    }

    #[test]
    fn round_trip_and_header() {
        let codec = codec(&session("0123456789abcdef0123456789abcdef"));
        let c = claims(now() + 60);
        let token = codec.sign(&c).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.kid.as_deref(), Some(codec.keys.signing_kid()));
        assert_eq!(*codec.verify(&token).unwrap(), c);
    }

    #[test]
    fn expired_and_foreign_tokens_are_refused() {
        let codec1 = codec(&session("0123456789abcdef0123456789abcdef"));
        let expired = codec1.sign(&claims(now() - 10)).unwrap();
        assert_eq!(
            codec1.verify(&expired).unwrap_err().code(),
            ErrorCode::TokenExpired
        );
        let codec2 = codec(&session("fedcba9876543210fedcba9876543210"));
        let other = codec2.sign(&claims(now() + 60)).unwrap();
        assert_eq!(
            codec1.verify(&other).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn rotation_signs_with_the_newest_and_accepts_all() {
        let old = SessionConfig {
            keys: vec![crate::config::SigningKeyConfig {
                kid: "2026-10".into(),
                secret: Some(Secret::new("old-secret-old-secret-old-secret-!!")),
                private_key_pem: None,
            }],
            ..SessionConfig::default()
        };
        let old_codec = codec(&old);
        let old_token = old_codec.sign(&claims(now() + 60)).unwrap();
        let mut rotated = old.clone();
        rotated.jwt_secret = Some(Secret::new("new-secret-new-secret-new-secret-!!"));
        let rotated_codec = codec(&rotated);
        assert!(rotated_codec.verify(&old_token).is_ok());
        let new_token = rotated_codec.sign(&claims(now() + 60)).unwrap();
        let kid = jsonwebtoken::decode_header(&new_token)
            .unwrap()
            .kid
            .unwrap();
        assert_ne!(kid, "2026-10");
        assert!(old_codec.verify(&new_token).is_err());
    }

    #[test]
    fn eddsa_generated_and_pinned() {
        let ed = SessionConfig {
            algorithm: Algorithm::EdDSA,
            ..SessionConfig::default()
        };
        let ed_codec = codec(&ed);
        assert!(ed_codec.keys.is_generated());
        let token = ed_codec.sign(&claims(now() + 60)).unwrap();
        assert!(ed_codec.verify(&token).is_ok());
        // An HS256 codec refuses EdDSA tokens before looking at keys.
        let hs = codec(&session("0123456789abcdef0123456789abcdef"));
        assert_eq!(
            hs.verify(&token).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let codec = codec(&session("0123456789abcdef0123456789abcdef"));
        let token = codec.sign(&claims(now() + 60)).unwrap();
        let mut parts = token.split('.');
        let _header = parts.next();
        let payload = parts.next().unwrap();
        let none_header = URL_SAFE_NO_PAD.encode(
            format!(
                r#"{{"alg":"none","typ":"at+jwt","kid":"{}"}}"#,
                codec.keys.signing_kid()
            )
            .as_bytes(),
        );
        let forged = format!("{none_header}.{payload}.");
        assert_eq!(
            codec.verify(&forged).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
    }
}
