//! `[session]`: how sessions are minted and checked, and the signing keys as data.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ConfigError, Secret};

/// How strongly sessions are bound to a client-held key (RFC 9449 DPoP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DpopMode {
    /// DPoP headers are ignored; every session is a bearer session.
    Off,
    /// A DPoP proof on `POST /session` binds the session; without one the session is a bearer one.
    #[default]
    Optional,
    /// Every session must be key-bound.
    Required,
}

/// Signing algorithm for session tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[non_exhaustive]
pub enum Algorithm {
    /// HMAC-SHA256 with a shared secret (default).
    #[default]
    HS256,
    /// Ed25519 signatures: instances that only verify need only the public key.
    EdDSA,
}

/// One signing key in `[[session.keys]]`, for rotation.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct SigningKeyConfig {
    /// The key id put in the token header (`kid`).
    pub(crate) kid: String,
    /// An HS256 secret, at least 32 bytes.
    pub(crate) secret: Option<Secret>,
    /// An Ed25519 private key (PKCS#8 PEM), for `algorithm = "EdDSA"`.
    pub(crate) private_key_pem: Option<Secret>,
}

impl fmt::Debug for SigningKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyConfig")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// `[session]`: how sessions are minted and checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Lifetime of one token, in seconds.
    pub ttl_secs: u64,
    /// Absolute lifetime of a session across refreshes, counted from the first mint.
    pub max_lifetime_secs: u64,
    /// The HS256 signing secret (at least 32 bytes). When set it signs; `session.keys` still
    /// verify.
    pub jwt_secret: Option<Secret>,
    /// `[[session.keys]]`, further signing keys for rotation: the last one signs when
    /// `jwt_secret` is unset, all verify.
    pub(crate) keys: Vec<SigningKeyConfig>,
    /// `HS256` (default) or `EdDSA`.
    pub algorithm: Algorithm,
    /// The `iss` claim.
    pub issuer: String,
    /// The `aud` claim.
    pub audience: String,
    /// Bind tokens to a hash of the User-Agent.
    pub bind_user_agent: bool,
    /// Lowest interaction entropy score (0 to 100) that may mint; 0 switches the gate off.
    pub min_entropy_score: u8,
    /// Most live sessions per fingerprint.
    pub max_per_fingerprint: u32,
    /// DPoP key binding.
    pub dpop: DpopMode,
    /// How old a DPoP proof's `iat` may be, in seconds.
    pub dpop_max_age_secs: u64,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Verified tokens kept to skip repeated signature checks; 0: no cache.
    pub verified_cache_size: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 600,
            max_lifetime_secs: 86_400,
            jwt_secret: None,
            keys: Vec::new(),
            algorithm: Algorithm::HS256,
            issuer: "perishable".to_owned(),
            audience: "perishable".to_owned(),
            bind_user_agent: true,
            min_entropy_score: 50,
            max_per_fingerprint: 5,
            dpop: DpopMode::Optional,
            dpop_max_age_secs: 60,
            leeway_secs: 5,
            verified_cache_size: 10_000,
        }
    }
}

impl SessionConfig {
    /// Checks every key of the section, the signing keys included (they are decoded by the
    /// runtime).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        if s.ttl_secs == 0 {
            return Err(ConfigError::invalid("session.ttl_secs", "must be above 0"));
        }
        if s.max_lifetime_secs < s.ttl_secs {
            return Err(ConfigError::invalid(
                "session.max_lifetime_secs",
                "must be at least session.ttl_secs",
            ));
        }
        if s.issuer.is_empty() {
            return Err(ConfigError::invalid("session.issuer", "must not be empty"));
        }
        if s.audience.is_empty() {
            return Err(ConfigError::invalid(
                "session.audience",
                "must not be empty",
            ));
        }
        if s.min_entropy_score > 100 {
            return Err(ConfigError::invalid(
                "session.min_entropy_score",
                "must be between 0 and 100",
            ));
        }
        if s.max_per_fingerprint == 0 {
            return Err(ConfigError::invalid(
                "session.max_per_fingerprint",
                "must be above 0",
            ));
        }
        if s.dpop_max_age_secs == 0 {
            return Err(ConfigError::invalid(
                "session.dpop_max_age_secs",
                "must be above 0",
            ));
        }
        validate_keys(s)
    }
}

/// The shortest HS256 secret, in bytes.
const MIN_SECRET_BYTES: usize = 32;

/// Checks the keys of `[session]` as data (lengths, formats, kids): the runtime decodes them
/// ([`KeySet`](crate::token::KeySet)), and makes a random one when none is given.
fn validate_keys(session: &SessionConfig) -> Result<(), ConfigError> {
    let mut kids = Vec::new();
    for entry in &session.keys {
        if entry.kid.is_empty() || entry.kid.len() > 64 {
            return Err(ConfigError::invalid(
                "session.keys",
                "every key needs a kid of 1 to 64 characters",
            ));
        }
        match (session.algorithm, &entry.secret, &entry.private_key_pem) {
            (Algorithm::HS256, Some(secret), None) => {
                check_secret_length(secret.expose().as_bytes(), "session.keys")?;
            }
            (Algorithm::EdDSA, None, Some(pem)) => {
                ed25519_pkcs8_der(pem.expose(), "session.keys")?;
            }
            (Algorithm::HS256, _, _) => {
                return Err(ConfigError::invalid(
                    "session.keys",
                    format!("key {:?}: HS256 keys take `secret` only", entry.kid),
                ));
            }
            (Algorithm::EdDSA, _, _) => {
                return Err(ConfigError::invalid(
                    "session.keys",
                    format!(
                        "key {:?}: EdDSA keys take `private_key_pem` only",
                        entry.kid
                    ),
                ));
            }
        }
        kids.push(entry.kid.clone());
    }
    if let Some(secret) = &session.jwt_secret {
        if session.algorithm != Algorithm::HS256 {
            return Err(ConfigError::invalid(
                "session.jwt_secret",
                "is an HS256 secret; with algorithm = \"EdDSA\" use session.keys",
            ));
        }
        let bytes = secret.expose().as_bytes();
        check_secret_length(bytes, "session.jwt_secret")?;
        kids.push(kid_for(bytes));
    }
    let mut seen = std::collections::HashSet::new();
    for kid in kids {
        if !seen.insert(kid.clone()) {
            return Err(ConfigError::invalid(
                "session.keys",
                format!("kid {kid:?} is used twice"),
            ));
        }
    }
    Ok(())
}

fn check_secret_length(secret: &[u8], key: &'static str) -> Result<(), ConfigError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(ConfigError::invalid(
            key,
            format!(
                "must be at least {MIN_SECRET_BYTES} bytes (got {})",
                secret.len()
            ),
        ));
    }
    Ok(())
}

/// The `kid` of a secret configured without one (`session.jwt_secret`, a generated key): the
/// same secret gets the same `kid` on every instance.
pub(crate) fn kid_for(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"perishable kid v1\0");
    hasher.update(secret);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&hasher.finalize()[..9])
}

/// The DER of an Ed25519 PKCS#8 PEM private key, checked to be one.
pub(crate) fn ed25519_pkcs8_der(pem: &str, key: &'static str) -> Result<Vec<u8>, ConfigError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| ConfigError::invalid(key, "is not a PEM document"))?;
    aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|_| ConfigError::invalid(key, "is not an Ed25519 PKCS#8 private key"))?;
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(config: SessionConfig) -> Option<&'static str> {
        match config.validate() {
            Ok(()) => None,
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            Err(other) => panic!("{other}"),
        }
    }

    fn hmac(kid: &str, secret: &str) -> SigningKeyConfig {
        SigningKeyConfig {
            kid: kid.to_owned(),
            secret: Some(Secret::new(secret)),
            private_key_pem: None,
        }
    }

    const LONG: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn short_secrets_are_refused() {
        let config = SessionConfig {
            jwt_secret: Some(Secret::new("too-short")),
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.jwt_secret"));
        let config = SessionConfig {
            keys: vec![hmac("old", "too-short")],
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.keys"));
    }

    #[test]
    fn keys_are_checked_as_data() {
        // No key at all is valid: the runtime makes a random one.
        assert_eq!(key(SessionConfig::default()), None);
        // A kid used twice, including the one derived from jwt_secret.
        let config = SessionConfig {
            keys: vec![hmac("a", LONG), hmac("a", LONG)],
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.keys"));
        let config = SessionConfig {
            jwt_secret: Some(Secret::new(LONG)),
            keys: vec![hmac(&kid_for(LONG.as_bytes()), LONG)],
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.keys"));
        // The material must fit the algorithm.
        let config = SessionConfig {
            algorithm: Algorithm::EdDSA,
            keys: vec![hmac("a", LONG)],
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.keys"));
        let config = SessionConfig {
            algorithm: Algorithm::EdDSA,
            jwt_secret: Some(Secret::new(LONG)),
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.jwt_secret"));
        let config = SessionConfig {
            algorithm: Algorithm::EdDSA,
            keys: vec![SigningKeyConfig {
                kid: "ed".to_owned(),
                secret: None,
                private_key_pem: Some(Secret::new(
                    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
                )),
            }],
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.keys"));
        let config = SessionConfig {
            keys: vec![hmac("", LONG)],
            ..SessionConfig::default()
        };
        assert_eq!(key(config), Some("session.keys"));
    }

    #[test]
    fn the_kid_of_a_secret_is_stable_and_short() {
        assert_eq!(kid_for(b"secret"), kid_for(b"secret"));
        assert_ne!(kid_for(b"secret"), kid_for(b"other"));
        assert_eq!(kid_for(b"secret").len(), 12);
    }
}
