//! [`DpopSigner`]: the client side of DPoP, for native Rust clients and tests.

use std::fmt;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::token::hash_b64;

/// A client key that signs DPoP proofs (ES256 or EdDSA).
pub struct DpopSigner {
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
    thumbprint: String,
}

impl fmt::Debug for DpopSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopSigner")
            .field("alg", &self.alg)
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl DpopSigner {
    /// A fresh P-256 key from the OS RNG.
    pub fn generate_es256() -> Self {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let Ok(pkcs8) = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng) else {
            panic!("P-256 key generation failed");
        };
        let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        else {
            panic!("a generated P-256 key did not parse");
        };
        // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        Self::new(
            Algorithm::ES256,
            EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
        )
    }

    /// A fresh Ed25519 key from the OS RNG.
    pub fn generate_ed25519() -> Self {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let Ok(pkcs8) = Ed25519KeyPair::generate_pkcs8(&rng) else {
            panic!("Ed25519 key generation failed");
        };
        let Ok(pair) = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()) else {
            panic!("a generated Ed25519 key did not parse");
        };
        let jwk = json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        });
        Self::new(
            Algorithm::EdDSA,
            EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk,
        )
    }

    fn new(alg: Algorithm, key: EncodingKey, jwk: Value) -> Self {
        let thumbprint = super::thumbprint(&jwk).unwrap_or_default();
        Self {
            alg,
            key,
            jwk,
            thumbprint,
        }
    }

    /// RFC 7638 thumbprint of the public key: the `cnf.jkt` of sessions bound to it.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The public key as a JWK.
    pub fn public_jwk(&self) -> &Value {
        &self.jwk
    }

    /// A proof for `htm` and `htu`, with `ath` when `access_token` is given, `iat` now and a
    /// random `jti`.
    pub fn proof(&self, htm: &str, htu: &str, access_token: Option<&str>) -> String {
        let iat = crate::clock::unix_now();
        let mut claims = json!({
            "jti": crate::token::new_jti(),
            "htm": htm,
            "htu": htu,
            "iat": iat,
        });
        if let Some(token) = access_token {
            claims["ath"] = Value::String(hash_b64(token.as_bytes()));
        }
        self.sign(&claims)
    }

    /// A proof with exactly these claims (to test what a server does with odd ones).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.typ = Some("dpop+jwt".to_owned());
        header.jwk = serde_json::from_value::<Jwk>(self.jwk.clone()).ok();
        jsonwebtoken::encode(&header, claims, &self.key).unwrap_or_default()
    }
}
