//! [`DpopKey`]: an ES256 (P-256) key that signs RFC 9449 DPoP proofs.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// An ES256 (ECDSA P-256) key that signs DPoP proofs (RFC 9449).
///
/// [`generate`](Self::generate) makes a fresh one from the OS random number generator.
/// To keep one across launches, store [`pkcs8_der`](Self::pkcs8_der) where the platform keeps
/// secrets (the Keychain on Apple platforms, an encrypted file under an Android Keystore key,
/// the OS credential store on a desktop) and load it with [`from_pkcs8`](Self::from_pkcs8).
///
/// `Debug` shows only the thumbprint, never the private key.
///
/// ```
/// use perishable_client::DpopKey;
///
/// let key = DpopKey::generate()?;
/// let stored = key.pkcs8_der().to_vec(); // to the Keychain / Keystore
/// let again = DpopKey::from_pkcs8(&stored)?;
/// assert_eq!(key.thumbprint(), again.thumbprint());
/// let proof = key.proof("POST", "https://api.example.com/ai/session", None)?;
/// assert_eq!(proof.split('.').count(), 3);
/// # Ok::<(), perishable_client::Error>(())
/// ```
pub struct DpopKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    /// The JWS header, base64url, ready to be joined to the claims.
    header_b64: String,
    jwk: Value,
    thumbprint: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("alg", &"ES256")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    /// A fresh P-256 key from the OS random number generator.
    pub fn generate() -> Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| Error::Key("P-256 key generation failed"))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// Loads a P-256 private key from its PKCS#8 DER encoding (what
    /// [`pkcs8_der`](Self::pkcs8_der) gives).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| Error::Key("not a PKCS#8 DER P-256 private key"))?;
        // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err(Error::Key("unexpected P-256 public key encoding"));
        }
        let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        let jwk = json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y });
        let header = json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": jwk });
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        Ok(Self {
            pair,
            pkcs8: der.to_vec(),
            header_b64,
            jwk,
            thumbprint,
        })
    }

    /// The private key as PKCS#8 DER, to store in the platform's secret store. Treat it as a
    /// secret: whoever holds it can use sessions bound to this key.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The RFC 7638 thumbprint of the public key: the `cnf.jkt` of sessions bound to it.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The public key as a JWK (`kty`, `crv`, `x`, `y`).
    pub fn public_jwk(&self) -> &Value {
        &self.jwk
    }

    /// A proof for `htm` (the method) and `htu` (the URL without query or fragment), with
    /// `ath` when `access_token` is given, `iat` from the local clock and a random `jti`.
    pub fn proof(&self, htm: &str, htu: &str, access_token: Option<&str>) -> Result<String> {
        self.proof_at(htm, htu, crate::time::unix_now() as u64, access_token, None)
    }

    /// A proof with `iat` given (the server's clock) and an optional server `nonce`.
    pub(crate) fn proof_at(
        &self,
        htm: &str,
        htu: &str,
        iat: u64,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<String> {
        let mut claims = json!({
            "jti": random_id()?,
            "htm": htm,
            "htu": htu,
            "iat": iat,
        });
        if let Some(token) = access_token {
            claims["ath"] = Value::String(URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes())));
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = Value::String(nonce.to_owned());
        }
        let input = format!(
            "{}.{}",
            self.header_b64,
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // FIXED signing: r || s, 64 bytes, exactly the JWS ES256 signature format.
        let signature = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| Error::Key("signing failed"))?;
        Ok(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// 128 random bits, base64url.
fn random_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| Error::Key("the OS RNG failed"))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn a_proof_verifies_and_has_the_claims() {
        let key = DpopKey::generate().unwrap();
        let proof = key
            .proof_at(
                "GET",
                "https://a.example/x",
                1_700_000_000,
                Some("tok"),
                Some("n1"),
            )
            .unwrap();
        let parts: Vec<&str> = proof.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(&header["jwk"], key.public_jwk());
        assert!(header["jwk"].get("d").is_none(), "no private member");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://a.example/x");
        assert_eq!(claims["iat"], 1_700_000_000);
        assert_eq!(claims["nonce"], "n1");
        assert_eq!(
            claims["ath"],
            URL_SAFE_NO_PAD.encode(Sha256::digest(b"tok"))
        );
        assert_eq!(claims["jti"].as_str().unwrap().len(), 22);
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.pair.public_key());
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(
                signed.as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn keys_round_trip_and_debug_hides_them() {
        let key = DpopKey::generate().unwrap();
        let again = DpopKey::from_pkcs8(key.pkcs8_der()).unwrap();
        assert_eq!(key.thumbprint(), again.thumbprint());
        assert_eq!(key.thumbprint().len(), 43);
        let debug = format!("{key:?}");
        assert!(debug.contains(key.thumbprint()));
        assert!(!debug.contains(&URL_SAFE_NO_PAD.encode(key.pkcs8_der())));
        assert!(DpopKey::from_pkcs8(b"not a key").is_err());
    }

    #[test]
    fn the_thumbprint_follows_rfc_7638() {
        // RFC 7638 has no P-256 vector; check against the canonical JSON by hand.
        let key = DpopKey::generate().unwrap();
        let jwk = key.public_jwk();
        let canonical = format!(
            r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
            jwk["crv"].as_str().unwrap(),
            jwk["kty"].as_str().unwrap(),
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        assert_eq!(
            key.thumbprint(),
            URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
        );
    }
}
