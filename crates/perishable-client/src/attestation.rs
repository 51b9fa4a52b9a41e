//! Platform attestations for the `app_attest` and `play_integrity` mint gates: what the app's
//! [`attestation_source`](crate::ClientBuilder::attestation_source) is given (the mint's
//! challenge) and what it returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

/// The `GET /challenge` challenge a mint's attestation must be bound to, with the digests the
/// platforms want.
///
/// ```
/// use perishable_client::AttestationChallenge;
///
/// let challenge = AttestationChallenge::new("v1.q0Fz.x9");
/// // App Attest: attestKey / generateAssertion(clientDataHash: ...)
/// let client_data_hash: [u8; 32] = challenge.client_data_hash();
/// // Play Integrity: a standard request with requestHash = ...
/// assert_eq!(challenge.request_hash().len(), 43);
/// # let _ = client_data_hash;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationChallenge {
    challenge: String,
}

impl AttestationChallenge {
    /// The challenge string, as `GET /challenge` returned it.
    pub fn new(challenge: impl Into<String>) -> Self {
        Self {
            challenge: challenge.into(),
        }
    }

    /// The challenge string.
    pub fn as_str(&self) -> &str {
        &self.challenge
    }

    /// SHA-256 of the challenge's UTF-8 bytes: App Attest's `clientDataHash`, for both
    /// `attestKey` and `generateAssertion`.
    pub fn client_data_hash(&self) -> [u8; 32] {
        Sha256::digest(self.challenge.as_bytes()).into()
    }

    /// The same digest as base64url without padding: Play Integrity's `requestHash`.
    pub fn request_hash(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.client_data_hash())
    }
}

/// A platform attestation for one mint, bound to its [`AttestationChallenge`]; the client adds
/// the `format` and the `challenge` and sends it as the mint's `attestation` member.
///
/// ```
/// use perishable_client::Attestation;
///
/// // iOS, first mint of a key: DCAppAttestService.attestKey's attestation object.
/// let key_id = "n2wKNmOS1JvGB9uZgUxNHOXvDv4Wh4E9UqyXW8JYQwA="; // generateKey's keyId
/// let first = Attestation::app_attest_key(key_id, &[0xa3, 0x63]);
/// // Later mints: generateAssertion's assertion.
/// let later = Attestation::app_attest_assertion(key_id, &[0xa2]);
/// // Android: a Play Integrity token.
/// let android = Attestation::play_integrity("eyJhbGciOiJBMjU2S1ciLCJlbmMiOiJBMjU2R0NNIn0...");
/// # let _ = (first, later, android);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Attestation {
    kind: Kind,
}

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    AppAttestKey { key_id: String, object: Vec<u8> },
    AppAttestAssertion { key_id: String, assertion: Vec<u8> },
    PlayIntegrity { token: String },
}

impl fmt::Debug for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (format, what) = match &self.kind {
            Kind::AppAttestKey { .. } => ("apple-app-attest", "attestation_object"),
            Kind::AppAttestAssertion { .. } => ("apple-app-attest", "assertion"),
            Kind::PlayIntegrity { .. } => ("play-integrity", "token"),
        };
        f.debug_struct("Attestation")
            .field("format", &format)
            .field("evidence", &what)
            .finish_non_exhaustive()
    }
}

impl Attestation {
    /// Registers an App Attest key (its first mint): `key_id` as `generateKey` returned it
    /// (standard base64 of the key's SHA-256), and `attestKey`'s attestation object for the
    /// challenge's [`client_data_hash`](AttestationChallenge::client_data_hash).
    pub fn app_attest_key(key_id: impl Into<String>, attestation_object: &[u8]) -> Self {
        Self {
            kind: Kind::AppAttestKey {
                key_id: key_id.into(),
                object: attestation_object.to_vec(),
            },
        }
    }

    /// Mints with a registered App Attest key: `generateAssertion`'s assertion for the
    /// challenge's [`client_data_hash`](AttestationChallenge::client_data_hash).
    pub fn app_attest_assertion(key_id: impl Into<String>, assertion: &[u8]) -> Self {
        Self {
            kind: Kind::AppAttestAssertion {
                key_id: key_id.into(),
                assertion: assertion.to_vec(),
            },
        }
    }

    /// A Play Integrity token requested with the challenge's
    /// [`request_hash`](AttestationChallenge::request_hash).
    pub fn play_integrity(token: impl Into<String>) -> Self {
        Self {
            kind: Kind::PlayIntegrity {
                token: token.into(),
            },
        }
    }

    /// The mint body's `attestation` member for `challenge`.
    pub(crate) fn to_json(&self, challenge: &str) -> serde_json::Value {
        match &self.kind {
            Kind::AppAttestKey { key_id, object } => serde_json::json!({
                "format": "apple-app-attest",
                "key_id": key_id,
                "attestation_object": STANDARD.encode(object),
                "challenge": challenge,
            }),
            Kind::AppAttestAssertion { key_id, assertion } => serde_json::json!({
                "format": "apple-app-attest",
                "key_id": key_id,
                "assertion": STANDARD.encode(assertion),
                "challenge": challenge,
            }),
            Kind::PlayIntegrity { token } => serde_json::json!({
                "format": "play-integrity",
                "token": token,
                "challenge": challenge,
            }),
        }
    }
}

/// What the client keeps of an attestation source.
pub(crate) type AttestationSource = Box<
    dyn Fn(AttestationChallenge) -> Pin<Box<dyn Future<Output = Option<Attestation>> + Send>>
        + Send
        + Sync,
>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_of_the_challenge_bytes() {
        let challenge = AttestationChallenge::new("v1.abc.def");
        let expected: [u8; 32] = Sha256::digest(b"v1.abc.def").into();
        assert_eq!(challenge.client_data_hash(), expected);
        assert_eq!(challenge.request_hash(), URL_SAFE_NO_PAD.encode(expected));
    }

    #[test]
    fn each_attestation_has_its_wire_shape() {
        let key = Attestation::app_attest_key("a2V5", &[1, 2, 3]);
        assert_eq!(
            key.to_json("v1.c"),
            serde_json::json!({"format": "apple-app-attest", "key_id": "a2V5",
                               "attestation_object": "AQID", "challenge": "v1.c"})
        );
        let assertion = Attestation::app_attest_assertion("a2V5", &[0xfb, 0xff]);
        assert_eq!(
            assertion.to_json("v1.c"),
            serde_json::json!({"format": "apple-app-attest", "key_id": "a2V5",
                               "assertion": "+/8=", "challenge": "v1.c"})
        );
        let play = Attestation::play_integrity("t0k3n");
        assert_eq!(
            play.to_json("v1.c"),
            serde_json::json!({"format": "play-integrity", "token": "t0k3n", "challenge": "v1.c"})
        );
        assert!(!format!("{play:?}").contains("t0k3n"));
    }
}
