//! Apple App Attest: attestations and assertions, verified as in Apple's "Validating apps that
//! connect to your server".
//!
//! # What it proves
//!
//! [`verify_attestation`] proves that the key `key_id` was generated inside the Secure Enclave of
//! a genuine Apple device, by a build of one of the configured apps (`TEAMID.bundle.id`, signed by
//! that team), for this very challenge (the caller's `client_data_hash`, which must commit to a
//! fresh one-time challenge the server issued): Apple's App Attest CA certified the key and bound
//! the nonce `SHA-256(authData || clientDataHash)` into the certificate. The result is an
//! [`AttestedKey`] for the caller to store.
//!
//! [`verify_assertion`] then proves that a later request (through its `client_data_hash`) was
//! signed by that same attested key, with a sign counter higher than any seen before.
//!
//! # What it does not prove
//!
//! - Not that the device is uncompromised, nor that a human uses it: a jailbroken device or a
//!   device farm still attests. Apple's fraud metric (the `receipt`, exchanged with Apple's
//!   server) is returned but not checked here.
//! - Not freshness by itself: the caller must issue the challenge, hash it into
//!   `client_data_hash`, and refuse a challenge used twice. Likewise it must store the counter
//!   [`verify_assertion`] returns and pass it back as `previous_counter` next time.
//! - No revocation: Apple publishes none for App Attest certificates.
//!
//! # The gate
//!
//! [`AppAttestGate`] wires the two into minting (`docs/gates.md`). The mint's
//! `"attestation": {"format": "apple-app-attest", "key_id", "attestation_object" | "assertion",
//! "challenge"}` is bound to a `GET /challenge` challenge (HMAC-checked, unexpired, and used at
//! most once, like Play Integrity's: `attest:<challenge>` in the proof-of-work replay set), with
//! `clientDataHash = SHA-256(challenge's UTF-8 bytes)`. The first mint of a key registers it in
//! the [`Store`] (first writer wins); later mints show assertions whose counter the store raises
//! by compare-and-set, so a replayed assertion mints at most once. The gate only reads the
//! store: the writes ([`record`]) happen after the session cap admitted the mint.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{self, SHA256};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ciborium::Value;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use subtle::ConstantTimeEq;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, Oid};
use x509_parser::prelude::FromDer;

use crate::error::{Error, ErrorCode};
use crate::pow::ProofOfWork;
use crate::store::{AppAttestKey, Store, StoreError};

/// Apple App Attestation Root CA, as Apple publishes it
/// (`Apple_App_Attestation_Root_CA.pem`): subject `CN=Apple App Attestation Root CA, O=Apple Inc.,
/// ST=California`, ECDSA P-384, valid 2020-03-18 to 2045-03-15, SHA-256 of the DER
/// `1cb9823ba28ba6ad2d33a006941de2ae4f513ef1d4e831b9f7e0fa7b6242c932` (checked by a test).
pub(crate) const APPLE_APP_ATTEST_ROOT_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIICITCCAaegAwIBAgIQC/O+DvHN0uD7jG5yH2IXmDAKBggqhkjOPQQDAzBSMSYw
JAYDVQQDDB1BcHBsZSBBcHAgQXR0ZXN0YXRpb24gUm9vdCBDQTETMBEGA1UECgwK
QXBwbGUgSW5jLjETMBEGA1UECAwKQ2FsaWZvcm5pYTAeFw0yMDAzMTgxODMyNTNa
Fw00NTAzMTUwMDAwMDBaMFIxJjAkBgNVBAMMHUFwcGxlIEFwcCBBdHRlc3RhdGlv
biBSb290IENBMRMwEQYDVQQKDApBcHBsZSBJbmMuMRMwEQYDVQQIDApDYWxpZm9y
bmlhMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAERTHhmLW07ATaFQIEVwTtT4dyctdh
NbJhFs/Ii2FdCgAHGbpphY3+d8qjuDngIN3WVhQUBHAoMeQ/cLiP1sOUtgjqK9au
Yen1mMEvRq9Sk3Jm5X8U62H+xTD3FE9TgS41o0IwQDAPBgNVHRMBAf8EBTADAQH/
MB0GA1UdDgQWBBSskRBTM72+aEH/pwyp5frq5eWKoTAOBgNVHQ8BAf8EBAMCAQYw
CgYIKoZIzj0EAwMDaAAwZQIwQgFGnByvsiVbpTKwSga0kP0e8EeDS4+sQmTvb7vn
53O5+FRXgeLhpJ06ysC5PrOyAjEAp5U4xDgEgllF7En3VcE3iexZZtKeYnpqtijV
oyFraWVIyd/dganmrduC1bmTBGwD
-----END CERTIFICATE-----
";

/// The credential certificate's extension holding the nonce: a DER `SEQUENCE { [1] EXPLICIT
/// OCTET STRING }`.
const NONCE_EXTENSION_OID: &[u64] = &[1, 2, 840, 113_635, 100, 8, 2];
/// AAGUID of keys attested in Apple's production environment: `appattest` and seven zero bytes.
const AAGUID_PRODUCTION: &[u8; 16] = b"appattest\0\0\0\0\0\0\0";
/// AAGUID of keys attested in Apple's development (sandbox) environment.
const AAGUID_DEVELOPMENT: &[u8; 16] = b"appattestdevelop";
/// The authenticator data flag "attested credential data included".
const FLAG_ATTESTED_CREDENTIAL_DATA: u8 = 0x40;
/// Bounds on what is decoded at all. A real attestation is ~5.5 KiB (the receipt is most of it),
/// an assertion ~120 bytes.
const MAX_ATTESTATION_LEN: usize = 64 * 1024;
const MAX_ASSERTION_LEN: usize = 4 * 1024;
/// At most this many certificates in `x5c` (Apple sends the leaf and one intermediate).
const MAX_CHAIN_LEN: usize = 4;
/// Certificate signature algorithms accepted in the chain: ECDSA only, as Apple's CA uses
/// (P-384 root and intermediate; the leaf is signed ecdsa-with-SHA256 by the P-384 intermediate).
static CHAIN_SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
];

/// Why an attestation or assertion was refused. Messages name the failed check only: no key,
/// nonce or certificate content.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttestationError {
    /// The input is not the expected CBOR / authenticator data / certificate shape.
    #[error("malformed App Attest data: {0}")]
    Malformed(&'static str),
    /// `fmt` is not `apple-appattest`.
    #[error("unsupported attestation format")]
    UnsupportedFormat,
    /// The policy has no trust root, or one that is not a usable CA certificate.
    #[error("App Attest trust roots are not usable")]
    TrustRoots,
    /// The `x5c` chain does not verify to a configured root at this time.
    #[error("certificate chain rejected: {0}")]
    Chain(webpki::Error),
    /// The credential certificate does not carry the nonce of this authData and clientDataHash.
    #[error("attestation nonce mismatch")]
    NonceMismatch,
    /// The key identifier does not match the certified key (or the credential ID).
    #[error("key identifier mismatch")]
    KeyIdMismatch,
    /// The RP ID hash is not that of an allowed app.
    #[error("app identifier not allowed")]
    AppIdMismatch,
    /// An attestation's sign counter is not 0.
    #[error("attestation counter is not zero")]
    CounterNotZero,
    /// The AAGUID is neither environment's, or development while the policy refuses it.
    #[error("attestation environment not allowed")]
    Environment,
    /// The assertion's signature does not verify with the attested key.
    #[error("assertion signature invalid")]
    Signature,
    /// The assertion's counter is not above the last one seen: a replay.
    #[error("assertion counter did not increase")]
    CounterReplay,
    /// `now` is before the Unix epoch.
    #[error("clock before the Unix epoch")]
    Clock,
}

/// Which App Attest environment certified a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Environment {
    /// AAGUID `appattestdevelop`: builds signed for development.
    Development,
    /// AAGUID `appattest` followed by seven zero bytes: App Store, TestFlight, enterprise builds.
    Production,
}

/// What an attestation must satisfy.
#[derive(Clone, Debug)]
pub(crate) struct AppAttestPolicy {
    /// Allowed App IDs, `TEAMID.bundle.id`.
    pub(crate) app_ids: Vec<String>,
    /// Accept keys from the development environment too (off in production).
    pub(crate) development: bool,
    /// Trust roots (DER certificates); [`AppAttestPolicy::new`] sets Apple's. Empty: every
    /// attestation is refused.
    pub(crate) roots: Vec<CertificateDer<'static>>,
}

impl AppAttestPolicy {
    /// Production only, for these App IDs, trusting Apple's App Attestation Root CA.
    pub(crate) fn new(app_ids: Vec<String>) -> Self {
        Self {
            app_ids,
            development: false,
            roots: apple_root_ca().into_iter().collect(),
        }
    }
}

/// Apple's App Attestation Root CA as DER, parsed from [`APPLE_APP_ATTEST_ROOT_CA_PEM`].
pub(crate) fn apple_root_ca() -> Option<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(APPLE_APP_ATTEST_ROOT_CA_PEM.as_bytes()).ok()
}

/// A key that passed [`verify_attestation`]: what to store for its later assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AttestedKey {
    /// SHA-256 of `public_key` (what the app calls the key identifier).
    pub(crate) key_id: Vec<u8>,
    /// The attested P-256 public key, uncompressed SEC1 point (65 bytes).
    pub(crate) public_key: Vec<u8>,
    /// The sign counter at attestation: always 0.
    pub(crate) counter: u32,
    /// Apple's receipt, for the fraud-metric exchange with Apple (not verified here).
    pub(crate) receipt: Vec<u8>,
    /// The App ID the key was attested for.
    pub(crate) app_id: String,
    /// The environment that certified the key.
    pub(crate) environment: Environment,
}

/// Verifies an App Attest attestation object (`attestKey`'s result) for `key_id` (the raw 32
/// bytes, not base64) and `client_data_hash` (SHA-256 of the client data that embeds the
/// server's one-time challenge), following Apple's steps in order.
pub(crate) fn verify_attestation(
    attestation_object: &[u8],
    key_id: &[u8],
    client_data_hash: &[u8; 32],
    policy: &AppAttestPolicy,
    now: SystemTime,
) -> Result<AttestedKey, AttestationError> {
    if attestation_object.len() > MAX_ATTESTATION_LEN {
        return Err(AttestationError::Malformed("attestation object too large"));
    }
    let object = decode_cbor(attestation_object)?;
    let object = as_map(&object, "attestation object is not a map")?;
    let fmt = map_get(object, "fmt")?
        .as_text()
        .ok_or(AttestationError::Malformed("fmt is not text"))?;
    if fmt != "apple-appattest" {
        return Err(AttestationError::UnsupportedFormat);
    }
    let statement = as_map(map_get(object, "attStmt")?, "attStmt is not a map")?;
    let x5c = map_get(statement, "x5c")?
        .as_array()
        .ok_or(AttestationError::Malformed("x5c is not an array"))?;
    if x5c.is_empty() || x5c.len() > MAX_CHAIN_LEN {
        return Err(AttestationError::Malformed("x5c length"));
    }
    let chain = x5c
        .iter()
        .map(|cert| {
            cert.as_bytes()
                .map(|der| CertificateDer::from(der.as_slice()))
                .ok_or(AttestationError::Malformed("x5c entry is not bytes"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let receipt = as_bytes(map_get(statement, "receipt")?, "receipt is not bytes")?;
    let auth_data = as_bytes(map_get(object, "authData")?, "authData is not bytes")?;

    // 1. The chain: leaf and intermediates up to a configured root, at `now`.
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(AttestationError::Malformed("x5c length"))?;
    verify_chain(leaf, intermediates, &policy.roots, now)?;
    let (leaf_cert_rest, leaf_cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|_| AttestationError::Malformed("credential certificate"))?;
    if !leaf_cert_rest.is_empty() {
        return Err(AttestationError::Malformed("credential certificate"));
    }

    // 2-4. nonce = SHA-256(authData || clientDataHash), as certified in the leaf's extension.
    let nonce = sha256_concat(auth_data, client_data_hash);
    let certified_nonce = nonce_extension(&leaf_cert)?;
    if !bool::from(certified_nonce.ct_eq(nonce.as_slice())) {
        return Err(AttestationError::NonceMismatch);
    }

    // 5. The key identifier is SHA-256 of the certified public key (uncompressed point).
    let public_key = p256_public_key(&leaf_cert)?;
    let computed_key_id = sha256(public_key);
    if !bool::from(computed_key_id.as_slice().ct_eq(key_id)) {
        return Err(AttestationError::KeyIdMismatch);
    }

    // 6-9. The authenticator data.
    let parsed = AuthenticatorData::parse(auth_data)?;
    let app_id = match_app_id(&parsed.rp_id_hash, &policy.app_ids)?;
    if parsed.counter != 0 {
        return Err(AttestationError::CounterNotZero);
    }
    let credential = parsed.attested_credential()?;
    let environment = if credential.aaguid == AAGUID_PRODUCTION {
        Environment::Production
    } else if credential.aaguid == AAGUID_DEVELOPMENT && policy.development {
        Environment::Development
    } else {
        return Err(AttestationError::Environment);
    };
    if !bool::from(credential.credential_id.ct_eq(key_id)) {
        return Err(AttestationError::KeyIdMismatch);
    }
    // Beyond Apple's list: the COSE key in authData must be the certified key.
    check_cose_key(credential.public_key, public_key)?;

    Ok(AttestedKey {
        key_id: key_id.to_vec(),
        public_key: public_key.to_vec(),
        counter: 0,
        receipt: receipt.to_vec(),
        app_id: app_id.to_owned(),
        environment,
    })
}

/// Verifies an App Attest assertion (`generateAssertion`'s result) over `client_data_hash` with a
/// key from [`verify_attestation`] (its `public_key` and `app_id`), and returns its counter:
/// store it and pass it back as `previous_counter` next time. The key's App ID must still be in
/// `app_ids`.
///
/// The device signs `nonce = SHA-256(authenticatorData || clientDataHash)` with ECDSA P-256 and
/// SHA-256, so the signature is checked as ECDSA-SHA256 over the 32 bytes of `nonce` (which
/// hashes it once more), DER-encoded.
pub(crate) fn verify_assertion(
    assertion: &[u8],
    client_data_hash: &[u8; 32],
    public_key: &[u8],
    app_id: &str,
    previous_counter: u32,
    app_ids: &[String],
) -> Result<u32, AttestationError> {
    if assertion.len() > MAX_ASSERTION_LEN {
        return Err(AttestationError::Malformed("assertion too large"));
    }
    let object = decode_cbor(assertion)?;
    let object = as_map(&object, "assertion is not a map")?;
    let signature = as_bytes(map_get(object, "signature")?, "signature is not bytes")?;
    let auth_data = as_bytes(
        map_get(object, "authenticatorData")?,
        "authenticatorData is not bytes",
    )?;
    let parsed = AuthenticatorData::parse(auth_data)?;

    let nonce = sha256_concat(auth_data, client_data_hash);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public_key)
        .verify(&nonce, signature)
        .map_err(|_| AttestationError::Signature)?;

    if !app_ids.iter().any(|id| id == app_id) {
        return Err(AttestationError::AppIdMismatch);
    }
    if !bool::from(parsed.rp_id_hash.ct_eq(&sha256(app_id.as_bytes()))) {
        return Err(AttestationError::AppIdMismatch);
    }
    if parsed.counter <= previous_counter {
        return Err(AttestationError::CounterReplay);
    }
    Ok(parsed.counter)
}

/// Verifies `leaf` up to one of `roots` through `intermediates` at `now` with webpki: signatures,
/// validity periods, CA basic constraints and path length, unknown critical extensions. Extended
/// key usages are not required (Apple's certificates carry none).
fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(), AttestationError> {
    if roots.is_empty() {
        return Err(AttestationError::TrustRoots);
    }
    let anchors = roots
        .iter()
        .map(|root| {
            webpki::anchor_from_trusted_cert(root).map_err(|_| AttestationError::TrustRoots)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let since_epoch = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AttestationError::Clock)?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(AttestationError::Chain)?;
    leaf.verify_for_usage(
        CHAIN_SIGNATURE_ALGORITHMS,
        &anchors,
        intermediates,
        UnixTime::since_unix_epoch(since_epoch),
        AnyExtendedKeyUsage,
        None,
        None,
    )
    .map_err(AttestationError::Chain)?;
    Ok(())
}

/// App Attest certificates carry no extended key usage, and none is required of them; a
/// malformed EKU extension is still an error.
struct AnyExtendedKeyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyExtendedKeyUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for id in iter {
            id?;
        }
        Ok(())
    }
}

/// The 32-byte nonce in the leaf's extension 1.2.840.113635.100.8.2. Its DER is exactly
/// `30 24 A1 22 04 20 <32 bytes>` (DER has one encoding of `SEQUENCE { [1] EXPLICIT OCTET
/// STRING (SIZE 32) }`); anything else is refused.
fn nonce_extension<'a>(leaf: &'a X509Certificate<'_>) -> Result<&'a [u8], AttestationError> {
    let oid = Oid::from(NONCE_EXTENSION_OID)
        .map_err(|_| AttestationError::Malformed("nonce extension OID"))?;
    let extension = leaf
        .tbs_certificate
        .get_extension_unique(&oid)
        .map_err(|_| AttestationError::Malformed("duplicate nonce extension"))?
        .ok_or(AttestationError::Malformed("no nonce extension"))?;
    match extension.value {
        [0x30, 0x24, 0xA1, 0x22, 0x04, 0x20, nonce @ ..] if nonce.len() == 32 => Ok(nonce),
        _ => Err(AttestationError::Malformed("nonce extension")),
    }
}

/// The leaf's public key: an EC P-256 key, uncompressed point.
fn p256_public_key<'a>(leaf: &'a X509Certificate<'_>) -> Result<&'a [u8], AttestationError> {
    let spki = leaf.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|parameters| parameters.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(AttestationError::Malformed("credential key is not P-256"));
    }
    let point: &[u8] = &spki.subject_public_key.data;
    if point.len() != 65 || point[0] != 0x04 {
        return Err(AttestationError::Malformed(
            "credential key is not an uncompressed point",
        ));
    }
    Ok(point)
}

/// The COSE_Key after the credential ID must be the EC2 P-256 key `point` (kty 2, alg -7 (ES256),
/// crv 1, x, y), and end the authenticator data.
fn check_cose_key(cose: &[u8], point: &[u8]) -> Result<(), AttestationError> {
    let key = decode_cbor(cose)?;
    let key = as_map(&key, "credential public key is not a map")?;
    let field = |label: i64| -> Result<&Value, AttestationError> {
        let mut found = key.iter().filter(|(k, _)| {
            k.as_integer()
                .is_some_and(|k| i128::from(k) == i128::from(label))
        });
        match (found.next(), found.next()) {
            (Some((_, value)), None) => Ok(value),
            _ => Err(AttestationError::Malformed("credential public key fields")),
        }
    };
    let int = |value: &Value| value.as_integer().map(i128::from);
    if int(field(1)?) != Some(2) || int(field(3)?) != Some(-7) || int(field(-1)?) != Some(1) {
        return Err(AttestationError::Malformed(
            "credential public key is not ES256 P-256",
        ));
    }
    let x = as_bytes(field(-2)?, "credential public key x")?;
    let y = as_bytes(field(-3)?, "credential public key y")?;
    if x.len() != 32 || y.len() != 32 || point[1..33] != *x || point[33..] != *y {
        return Err(AttestationError::KeyIdMismatch);
    }
    Ok(())
}

/// Authenticator data: `rpIdHash (32) | flags (1) | counter (4, big-endian)`, then in an
/// attestation `aaguid (16) | credentialIdLength (2, big-endian) | credentialId | COSE key`.
struct AuthenticatorData<'a> {
    rp_id_hash: [u8; 32],
    flags: u8,
    counter: u32,
    rest: &'a [u8],
}

/// The attested credential data of an attestation's authenticator data.
struct AttestedCredential<'a> {
    aaguid: &'a [u8; 16],
    credential_id: &'a [u8],
    public_key: &'a [u8],
}

const TOO_SHORT: AttestationError = AttestationError::Malformed("authenticator data too short");

impl<'a> AuthenticatorData<'a> {
    /// The fixed 37-byte header; `rest` is whatever follows. Assertions need nothing more (what
    /// follows, if anything, is covered by the signature all the same).
    fn parse(data: &'a [u8]) -> Result<Self, AttestationError> {
        let (rp_id_hash, rest) = data.split_first_chunk::<32>().ok_or(TOO_SHORT)?;
        let (&flags, rest) = rest.split_first().ok_or(TOO_SHORT)?;
        let (counter, rest) = rest.split_first_chunk::<4>().ok_or(TOO_SHORT)?;
        Ok(Self {
            rp_id_hash: *rp_id_hash,
            flags,
            counter: u32::from_be_bytes(*counter),
            rest,
        })
    }

    /// The attested credential data, which an attestation must carry (flag AT set).
    fn attested_credential(&self) -> Result<AttestedCredential<'a>, AttestationError> {
        if self.flags & FLAG_ATTESTED_CREDENTIAL_DATA == 0 {
            return Err(AttestationError::Malformed("no attested credential data"));
        }
        let (aaguid, rest) = self.rest.split_first_chunk::<16>().ok_or(TOO_SHORT)?;
        let (length, rest) = rest.split_first_chunk::<2>().ok_or(TOO_SHORT)?;
        let length = usize::from(u16::from_be_bytes(*length));
        if rest.len() < length {
            return Err(TOO_SHORT);
        }
        let (credential_id, public_key) = rest.split_at(length);
        Ok(AttestedCredential {
            aaguid,
            credential_id,
            public_key,
        })
    }
}

/// The App ID of `app_ids` whose SHA-256 is `rp_id_hash`.
fn match_app_id<'a>(
    rp_id_hash: &[u8; 32],
    app_ids: &'a [String],
) -> Result<&'a str, AttestationError> {
    app_ids
        .iter()
        .find(|id| bool::from(sha256(id.as_bytes()).ct_eq(rp_id_hash)))
        .map(String::as_str)
        .ok_or(AttestationError::AppIdMismatch)
}

/// Decodes exactly one CBOR item that spans all of `bytes`.
fn decode_cbor(bytes: &[u8]) -> Result<Value, AttestationError> {
    let mut reader = bytes;
    let value: Value = ciborium::de::from_reader(&mut reader)
        .map_err(|_| AttestationError::Malformed("invalid CBOR"))?;
    if !reader.is_empty() {
        return Err(AttestationError::Malformed("trailing bytes after CBOR"));
    }
    Ok(value)
}

fn as_map<'a>(
    value: &'a Value,
    what: &'static str,
) -> Result<&'a [(Value, Value)], AttestationError> {
    value
        .as_map()
        .map(Vec::as_slice)
        .ok_or(AttestationError::Malformed(what))
}

fn as_bytes<'a>(value: &'a Value, what: &'static str) -> Result<&'a [u8], AttestationError> {
    value
        .as_bytes()
        .map(Vec::as_slice)
        .ok_or(AttestationError::Malformed(what))
}

/// The value of the one text key `key` in `map` (absent or repeated: malformed).
fn map_get<'a>(map: &'a [(Value, Value)], key: &str) -> Result<&'a Value, AttestationError> {
    let mut found = map.iter().filter(|(k, _)| k.as_text() == Some(key));
    match (found.next(), found.next()) {
        (Some((_, value)), None) => Ok(value),
        (None, _) => Err(AttestationError::Malformed("missing CBOR field")),
        (Some(_), Some(_)) => Err(AttestationError::Malformed("duplicate CBOR field")),
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&SHA256, data).as_ref());
    out
}

fn sha256_concat(a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut context = digest::Context::new(&SHA256);
    context.update(a);
    context.update(b);
    let mut out = [0; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

// ---------------------------------------------------------------------------------------------
// The `app_attest` mint gate: the evidence of a mint, the challenge it is bound to, the store.

/// The `format` of the mint's `attestation` object that this gate reads.
pub(crate) const FORMAT: &str = "apple-app-attest";

/// The members an `apple-app-attest` attestation may have.
const MEMBERS: [&str; 5] = [
    "format",
    "key_id",
    "attestation_object",
    "assertion",
    "challenge",
];

/// Why the `app_attest` gate refused a mint. Messages name the failed check only: no key, nonce
/// or certificate content.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GateError {
    /// No `attestation` of this format: `400 attestation_required`.
    #[error(
        "this service needs an App Attest attestation: send \"attestation\": {{\"format\": \
         \"apple-app-attest\", \"key_id\", \"attestation_object\" or \"assertion\", \"challenge\"}}"
    )]
    Required,
    /// The attestation object's members are not as the protocol says.
    #[error("invalid App Attest evidence: {0}")]
    Evidence(&'static str),
    /// The challenge is not one this server issued, or has expired.
    #[error("invalid App Attest challenge: {0}")]
    Challenge(&'static str),
    /// The attestation or assertion does not verify.
    #[error(transparent)]
    Verify(#[from] AttestationError),
    /// An assertion by a key that is not registered (never, or forgotten after the retention).
    #[error("unknown App Attest key: register it with an attestation_object first")]
    UnknownKey,
    /// A registration of a key that is already registered.
    #[error("this App Attest key is already registered: mint with an assertion")]
    AlreadyRegistered,
    /// An assertion whose counter was already accepted (a concurrent replay).
    #[error("the assertion's counter was already used")]
    CounterReplay,
    /// The store could not be asked for the key.
    #[error("the store failed: {0}")]
    Store(StoreError),
}

impl From<GateError> for Error {
    fn from(e: GateError) -> Self {
        match e {
            GateError::Required => Error::new(ErrorCode::AttestationRequired, e.to_string()),
            GateError::Store(store) => crate::store::refuse("app_attest_key", &store),
            other => Error::new(ErrorCode::AttestationInvalid, other.to_string()),
        }
    }
}

/// The `app_attest` gate: how attestations are verified, and how long a key's record lives.
#[derive(Debug)]
pub(crate) struct AppAttestGate {
    pub(crate) policy: AppAttestPolicy,
    /// A key's record is kept this long after its registration or latest assertion.
    pub(crate) retention_secs: u64,
}

/// What a mint that passed the gate writes to the store once the session cap admitted it (as
/// with the challenge it used), and the client it names.
#[derive(Debug, Clone)]
pub(crate) struct AppAttestPassed {
    /// The key's id in the store: base64url, no padding, of Apple's 32-byte key identifier.
    pub(crate) key_id: String,
    /// The store write.
    pub(crate) write: KeyWrite,
    /// Keep the record until then (Unix seconds).
    pub(crate) until: u64,
    /// The client the session keys on (`usr`) when no identity gate names a user: base64url,
    /// no padding, of SHA-256(`"apple-app-attest"` ‖ 0x00 ‖ key identifier).
    pub(crate) user: String,
    /// The challenge the evidence was bound to (to record as used) and its expiry.
    pub(crate) challenge: (String, u64),
}

/// The store write of a mint that passed the gate.
#[derive(Debug, Clone)]
pub(crate) enum KeyWrite {
    /// First mint: register the attested key (first writer wins).
    Register(AppAttestKey),
    /// Later mints: raise the key's counter to the assertion's (compare and set).
    Advance(u32),
}

/// The decoded evidence.
struct Presented<'a> {
    key_id: [u8; 32],
    proof: Proof,
    challenge: &'a str,
}

enum Proof {
    /// `attestation_object`: the key is being registered.
    Attestation(Vec<u8>),
    /// `assertion`: a registered key signs this mint.
    Assertion(Vec<u8>),
}

/// Standard base64 (RFC 4648 §4, `+/`, padded: what Swift's `base64EncodedString()` and
/// `DCAppAttestService`'s key identifiers are), strictly: canonical padding and trailing bits,
/// no whitespace, at most `max` bytes decoded.
fn decode_base64(text: &str, max: usize, what: &'static str) -> Result<Vec<u8>, GateError> {
    if text.len() > max.div_ceil(3) * 4 {
        return Err(GateError::Evidence(what));
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| GateError::Evidence(what))
}

impl<'a> Presented<'a> {
    /// The `attestation` member of a mint body, when its format is `apple-app-attest`.
    fn parse(value: Option<&'a serde_json::Value>) -> Result<Self, GateError> {
        let Some(serde_json::Value::Object(object)) = value else {
            return Err(GateError::Required);
        };
        if object.get("format").and_then(serde_json::Value::as_str) != Some(FORMAT) {
            return Err(GateError::Required);
        }
        if object.keys().any(|name| !MEMBERS.contains(&name.as_str())) {
            return Err(GateError::Evidence(
                "unknown member (allowed: format, key_id, attestation_object, assertion, \
                 challenge)",
            ));
        }
        let text = |name: &str, what: &'static str| {
            object
                .get(name)
                .map(|v| v.as_str().ok_or(GateError::Evidence(what)))
                .transpose()
        };
        let key_id = text("key_id", "key_id must be a string")?
            .ok_or(GateError::Evidence("key_id is required"))?;
        let key_id: [u8; 32] =
            decode_base64(key_id, 32, "key_id must be standard base64 of 32 bytes")?
                .try_into()
                .map_err(|_| GateError::Evidence("key_id must be standard base64 of 32 bytes"))?;
        let challenge = text("challenge", "challenge must be a string")?
            .ok_or(GateError::Evidence("challenge is required"))?;
        let attestation = text("attestation_object", "attestation_object must be a string")?;
        let assertion = text("assertion", "assertion must be a string")?;
        let proof = match (attestation, assertion) {
            (Some(object), None) => Proof::Attestation(decode_base64(
                object,
                MAX_ATTESTATION_LEN,
                "attestation_object must be standard base64, at most 64 KiB decoded",
            )?),
            (None, Some(assertion)) => Proof::Assertion(decode_base64(
                assertion,
                MAX_ASSERTION_LEN,
                "assertion must be standard base64, at most 4 KiB decoded",
            )?),
            _ => {
                return Err(GateError::Evidence(
                    "send exactly one of attestation_object (to register the key) and assertion",
                ));
            }
        };
        Ok(Self {
            key_id,
            proof,
            challenge,
        })
    }
}

impl AppAttestGate {
    /// Checks the mint's evidence: the challenge (issued by `pow`'s key, unexpired), then the
    /// attestation (its chain, nonce, app, environment and key) or the assertion (by a key the
    /// store holds, with a counter above the stored one). Reads the store, never writes it: the
    /// caller writes [`AppAttestPassed::write`] once the mint is admitted.
    pub(crate) async fn check(
        &self,
        evidence: Option<&serde_json::Value>,
        pow: &ProofOfWork,
        store: &dyn Store,
        now: u64,
    ) -> Result<AppAttestPassed, GateError> {
        let presented = Presented::parse(evidence)?;
        let (challenge_until, _) = pow
            .verify_challenge(presented.challenge, now)
            .map_err(GateError::Challenge)?;
        // clientDataHash: SHA-256 of the challenge's UTF-8 bytes (the same digest as Play
        // Integrity's requestHash, raw rather than base64url).
        let client_data_hash = sha256(presented.challenge.as_bytes());
        let key_id = URL_SAFE_NO_PAD.encode(presented.key_id);
        let write = match &presented.proof {
            Proof::Attestation(object) => {
                let attested = verify_attestation(
                    object,
                    &presented.key_id,
                    &client_data_hash,
                    &self.policy,
                    UNIX_EPOCH + Duration::from_secs(now),
                )?;
                KeyWrite::Register(AppAttestKey::new(
                    attested.public_key,
                    attested.app_id,
                    attested.environment == Environment::Development,
                    attested.counter,
                    now,
                ))
            }
            Proof::Assertion(assertion) => {
                let key = store
                    .app_attest_key(&key_id)
                    .await
                    .map_err(GateError::Store)?
                    .ok_or(GateError::UnknownKey)?;
                // A key from the development environment stops working when it is switched off.
                if key.development && !self.policy.development {
                    return Err(AttestationError::Environment.into());
                }
                KeyWrite::Advance(verify_assertion(
                    assertion,
                    &client_data_hash,
                    &key.public_key,
                    &key.app_id,
                    key.counter,
                    &self.policy.app_ids,
                )?)
            }
        };
        let mut user = digest::Context::new(&SHA256);
        user.update(FORMAT.as_bytes());
        user.update(&[0]);
        user.update(&presented.key_id);
        Ok(AppAttestPassed {
            key_id,
            write,
            until: now.saturating_add(self.retention_secs),
            user: URL_SAFE_NO_PAD.encode(user.finish()),
            challenge: (format!("attest:{}", presented.challenge), challenge_until),
        })
    }
}

/// Writes what a mint that passed the gate must: registers the key (first writer wins) or
/// raises its counter (compare and set). `Ok(Err(_))` is a refusal, `Err(_)` a store failure.
pub(crate) async fn record(
    store: &dyn Store,
    passed: &AppAttestPassed,
) -> Result<Result<(), GateError>, StoreError> {
    Ok(match &passed.write {
        KeyWrite::Register(key) => store
            .register_app_attest_key(&passed.key_id, key, passed.until)
            .await?
            .then_some(())
            .ok_or(GateError::AlreadyRegistered),
        KeyWrite::Advance(counter) => store
            .advance_app_attest_counter(&passed.key_id, *counter, passed.until)
            .await?
            .then_some(())
            .ok_or(GateError::CounterReplay),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DnType, IsCa,
        KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData,
        SigningKey, date_time_ymd,
    };

    use super::*;

    const APP_ID: &str = "ABCDE12345.com.example.app";
    const OTHER_APP_ID: &str = "ABCDE12345.com.example.other";

    /// 2025-06-01T00:00:00Z: inside the test leaf's validity (2025-01-01 to 2026-01-01).
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_748_736_000)
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Test Inc.");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2045, 1, 1);
        params
    }

    /// A stand-in for Apple's CA: a P-384 root and a P-384 intermediate, as Apple's.
    struct Ca {
        root: CertifiedIssuer<'static, KeyPair>,
        intermediate: CertifiedIssuer<'static, KeyPair>,
    }

    impl Ca {
        fn new(name: &str) -> Self {
            let root_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
            let root =
                CertifiedIssuer::self_signed(ca_params(&format!("{name} Root CA")), root_key)
                    .expect("root");
            let intermediate_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
            let intermediate = CertifiedIssuer::signed_by(
                ca_params(&format!("{name} CA 1")),
                intermediate_key,
                &root,
            )
            .expect("intermediate");
            Self { root, intermediate }
        }

        fn root_der(&self) -> CertificateDer<'static> {
            self.root.der().clone()
        }
    }

    /// A Secure Enclave key stand-in: P-256, signing ECDSA-SHA256 (DER), as the device does.
    struct Device {
        key: KeyPair,
        point: Vec<u8>,
        key_id: Vec<u8>,
    }

    impl Device {
        fn new() -> Self {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
            let point = key.der_bytes().to_vec();
            assert_eq!(point.len(), 65);
            let key_id = sha256(&point).to_vec();
            Self { key, point, key_id }
        }

        fn cose_key(&self) -> Vec<u8> {
            let key = Value::Map(vec![
                (Value::from(1), Value::from(2)),
                (Value::from(3), Value::from(-7)),
                (Value::from(-1), Value::from(1)),
                (Value::from(-2), Value::Bytes(self.point[1..33].to_vec())),
                (Value::from(-3), Value::Bytes(self.point[33..].to_vec())),
            ]);
            cbor(&key)
        }

        /// What `generateAssertion` returns: `{signature, authenticatorData}`, the signature
        /// ECDSA-SHA256 over `nonce = SHA-256(authenticatorData || clientDataHash)`.
        fn assertion(&self, app_id: &str, counter: u32, client_data_hash: &[u8; 32]) -> Vec<u8> {
            let mut auth_data = sha256(app_id.as_bytes()).to_vec();
            auth_data.push(FLAG_ATTESTED_CREDENTIAL_DATA);
            auth_data.extend_from_slice(&counter.to_be_bytes());
            let nonce = sha256_concat(&auth_data, client_data_hash);
            let signature = self.key.sign(&nonce).expect("sign");
            cbor(&Value::Map(vec![
                (Value::from("signature"), Value::Bytes(signature)),
                (Value::from("authenticatorData"), Value::Bytes(auth_data)),
            ]))
        }
    }

    fn cbor(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(value, &mut out).expect("cbor");
        out
    }

    /// Everything an attestation is built from; each test changes one thing.
    struct Attestation {
        fmt: &'static str,
        app_id: &'static str,
        counter: u32,
        aaguid: [u8; 16],
        credential_id: Option<Vec<u8>>,
        /// The clientDataHash the certified nonce is computed with.
        client_data_hash: [u8; 32],
        leaf_validity: (i32, i32),
        with_intermediate: bool,
        truncate_auth_data: Option<usize>,
    }

    impl Default for Attestation {
        fn default() -> Self {
            Self {
                fmt: "apple-appattest",
                app_id: APP_ID,
                counter: 0,
                aaguid: *AAGUID_PRODUCTION,
                credential_id: None,
                client_data_hash: CLIENT_DATA_HASH,
                leaf_validity: (2025, 2026),
                with_intermediate: true,
                truncate_auth_data: None,
            }
        }
    }

    const CLIENT_DATA_HASH: [u8; 32] = [7; 32];

    impl Attestation {
        /// The attestation object, in Apple's layout.
        fn build(&self, ca: &Ca, device: &Device) -> Vec<u8> {
            let credential_id = self.credential_id.clone().unwrap_or(device.key_id.clone());
            let mut auth_data = sha256(self.app_id.as_bytes()).to_vec();
            auth_data.push(FLAG_ATTESTED_CREDENTIAL_DATA);
            auth_data.extend_from_slice(&self.counter.to_be_bytes());
            auth_data.extend_from_slice(&self.aaguid);
            auth_data.extend_from_slice(
                &u16::try_from(credential_id.len())
                    .expect("len")
                    .to_be_bytes(),
            );
            auth_data.extend_from_slice(&credential_id);
            auth_data.extend_from_slice(&device.cose_key());
            if let Some(len) = self.truncate_auth_data {
                auth_data.truncate(len);
            }
            let nonce = sha256_concat(&auth_data, &self.client_data_hash);

            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, hex(&device.key_id));
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.not_before = date_time_ymd(self.leaf_validity.0, 1, 1);
            params.not_after = date_time_ymd(self.leaf_validity.1, 1, 1);
            let mut extension = vec![0x30, 0x24, 0xA1, 0x22, 0x04, 0x20];
            extension.extend_from_slice(&nonce);
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    NONCE_EXTENSION_OID,
                    extension,
                ));
            let leaf = params
                .signed_by(&device.key, &ca.intermediate)
                .expect("leaf");

            let mut x5c = vec![Value::Bytes(leaf.der().to_vec())];
            if self.with_intermediate {
                x5c.push(Value::Bytes(ca.intermediate.der().to_vec()));
            }
            cbor(&Value::Map(vec![
                (Value::from("fmt"), Value::from(self.fmt)),
                (
                    Value::from("attStmt"),
                    Value::Map(vec![
                        (Value::from("x5c"), Value::Array(x5c)),
                        (Value::from("receipt"), Value::Bytes(b"receipt".to_vec())),
                    ]),
                ),
                (Value::from("authData"), Value::Bytes(auth_data)),
            ]))
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn policy(ca: &Ca) -> AppAttestPolicy {
        AppAttestPolicy {
            app_ids: vec![APP_ID.to_owned()],
            development: false,
            roots: vec![ca.root_der()],
        }
    }

    fn verify(
        attestation: &[u8],
        device: &Device,
        policy: &AppAttestPolicy,
    ) -> Result<AttestedKey, AttestationError> {
        verify_attestation(
            attestation,
            &device.key_id,
            &CLIENT_DATA_HASH,
            policy,
            now(),
        )
    }

    #[test]
    fn production_attestation_verifies() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation::default().build(&ca, &device);
        let key = verify(&object, &device, &policy(&ca)).expect("valid");
        assert_eq!(key.key_id, device.key_id);
        assert_eq!(key.public_key, device.point);
        assert_eq!(key.counter, 0);
        assert_eq!(key.receipt, b"receipt");
        assert_eq!(key.app_id, APP_ID);
        assert_eq!(key.environment, Environment::Production);
    }

    #[test]
    fn development_attestation_verifies_only_when_allowed() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation {
            aaguid: *AAGUID_DEVELOPMENT,
            ..Attestation::default()
        }
        .build(&ca, &device);
        let mut policy = policy(&ca);
        assert!(matches!(
            verify(&object, &device, &policy),
            Err(AttestationError::Environment)
        ));
        policy.development = true;
        let key = verify(&object, &device, &policy).expect("valid");
        assert_eq!(key.environment, Environment::Development);
    }

    #[test]
    fn second_allowed_app_id_matches() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation {
            app_id: OTHER_APP_ID,
            ..Attestation::default()
        }
        .build(&ca, &device);
        let mut policy = policy(&ca);
        policy.app_ids.insert(0, OTHER_APP_ID.to_owned());
        let key = verify(&object, &device, &policy).expect("valid");
        assert_eq!(key.app_id, OTHER_APP_ID);
    }

    #[test]
    fn unknown_aaguid_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation {
            aaguid: *b"appattestXXXXXXX",
            ..Attestation::default()
        }
        .build(&ca, &device);
        let mut policy = policy(&ca);
        policy.development = true;
        assert!(matches!(
            verify(&object, &device, &policy),
            Err(AttestationError::Environment)
        ));
    }

    #[test]
    fn other_root_is_refused() {
        let (ca, other, device) = (Ca::new("Test"), Ca::new("Other"), Device::new());
        let object = Attestation::default().build(&ca, &device);
        assert!(matches!(
            verify(&object, &device, &policy(&other)),
            Err(AttestationError::Chain(_))
        ));
        // Apple's real root does not accept the test chain either.
        let apple = AppAttestPolicy::new(vec![APP_ID.to_owned()]);
        assert!(matches!(
            verify(&object, &device, &apple),
            Err(AttestationError::Chain(_))
        ));
        // No root at all: refused.
        let mut none = policy(&ca);
        none.roots.clear();
        assert!(matches!(
            verify(&object, &device, &none),
            Err(AttestationError::TrustRoots)
        ));
    }

    #[test]
    fn broken_chain_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        // Without its intermediate the leaf chains to nothing.
        let object = Attestation {
            with_intermediate: false,
            ..Attestation::default()
        }
        .build(&ca, &device);
        assert!(matches!(
            verify(&object, &device, &policy(&ca)),
            Err(AttestationError::Chain(_))
        ));
        // An intermediate of the same name from another root: the signature does not verify.
        let impostor = Ca::new("Test");
        let object = Attestation::default().build(&impostor, &device);
        assert!(matches!(
            verify(&object, &device, &policy(&ca)),
            Err(AttestationError::Chain(_))
        ));
    }

    #[test]
    fn expired_or_not_yet_valid_leaf_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        for validity in [(2023, 2024), (2026, 2027)] {
            let object = Attestation {
                leaf_validity: validity,
                ..Attestation::default()
            }
            .build(&ca, &device);
            assert!(matches!(
                verify(&object, &device, &policy(&ca)),
                Err(AttestationError::Chain(_))
            ));
        }
    }

    #[test]
    fn chain_of_any_length_up_to_a_root_verifies() {
        // Path building does not depend on Apple's exact chain: trust the intermediate itself.
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation {
            with_intermediate: false,
            ..Attestation::default()
        }
        .build(&ca, &device);
        let policy = AppAttestPolicy {
            roots: vec![ca.intermediate.der().clone()],
            ..policy(&ca)
        };
        verify(&object, &device, &policy).expect("valid");
    }

    #[test]
    fn nonce_mismatch_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation {
            client_data_hash: [8; 32],
            ..Attestation::default()
        }
        .build(&ca, &device);
        assert!(matches!(
            verify(&object, &device, &policy(&ca)),
            Err(AttestationError::NonceMismatch)
        ));
        // And the right object with another challenge.
        let object = Attestation::default().build(&ca, &device);
        assert!(matches!(
            verify_attestation(&object, &device.key_id, &[9; 32], &policy(&ca), now()),
            Err(AttestationError::NonceMismatch)
        ));
    }

    #[test]
    fn wrong_app_id_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation {
            app_id: OTHER_APP_ID,
            ..Attestation::default()
        }
        .build(&ca, &device);
        assert!(matches!(
            verify(&object, &device, &policy(&ca)),
            Err(AttestationError::AppIdMismatch)
        ));
    }

    #[test]
    fn nonzero_counter_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation {
            counter: 1,
            ..Attestation::default()
        }
        .build(&ca, &device);
        assert!(matches!(
            verify(&object, &device, &policy(&ca)),
            Err(AttestationError::CounterNotZero)
        ));
    }

    #[test]
    fn key_id_mismatch_is_refused() {
        let (ca, device, other) = (Ca::new("Test"), Device::new(), Device::new());
        let object = Attestation::default().build(&ca, &device);
        // The app claims another key.
        assert!(matches!(
            verify_attestation(
                &object,
                &other.key_id,
                &CLIENT_DATA_HASH,
                &policy(&ca),
                now()
            ),
            Err(AttestationError::KeyIdMismatch)
        ));
        // The credential ID in authData is not the certified key's.
        let object = Attestation {
            credential_id: Some(other.key_id.clone()),
            ..Attestation::default()
        }
        .build(&ca, &device);
        assert!(matches!(
            verify(&object, &device, &policy(&ca)),
            Err(AttestationError::KeyIdMismatch)
        ));
    }

    #[test]
    fn wrong_format_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        for fmt in ["packed", "none", "apple", ""] {
            let object = Attestation {
                fmt,
                ..Attestation::default()
            }
            .build(&ca, &device);
            assert!(matches!(
                verify(&object, &device, &policy(&ca)),
                Err(AttestationError::UnsupportedFormat)
            ));
        }
    }

    #[test]
    fn truncated_or_padded_input_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let object = Attestation::default().build(&ca, &device);
        for len in [0, 1, 10, object.len() / 2, object.len() - 1] {
            assert!(matches!(
                verify(&object[..len], &device, &policy(&ca)),
                Err(AttestationError::Malformed(_))
            ));
        }
        let mut padded = object.clone();
        padded.push(0);
        assert!(matches!(
            verify(&padded, &device, &policy(&ca)),
            Err(AttestationError::Malformed(_))
        ));
        // authData cut short (certified as such, so only its parsing can refuse it).
        for len in [0, 31, 36, 37, 54, 60, 86, 100] {
            let object = Attestation {
                truncate_auth_data: Some(len),
                ..Attestation::default()
            }
            .build(&ca, &device);
            let result = verify(&object, &device, &policy(&ca));
            assert!(
                matches!(result, Err(AttestationError::Malformed(_))),
                "{len}: {result:?}"
            );
        }
        // Not a map, or missing fields.
        for value in [
            Value::Array(vec![]),
            Value::Map(vec![(Value::from("fmt"), Value::from("apple-appattest"))]),
        ] {
            assert!(matches!(
                verify(&cbor(&value), &device, &policy(&ca)),
                Err(AttestationError::Malformed(_))
            ));
        }
    }

    #[test]
    fn apple_root_is_the_published_certificate() {
        let root = apple_root_ca().expect("PEM parses");
        assert_eq!(
            hex(&sha256(root.as_ref())),
            "1cb9823ba28ba6ad2d33a006941de2ae4f513ef1d4e831b9f7e0fa7b6242c932"
        );
        webpki::anchor_from_trusted_cert(&root).expect("usable trust anchor");
        assert_eq!(AppAttestPolicy::new(vec![]).roots, vec![root]);
    }

    fn attested(ca: &Ca, device: &Device) -> AttestedKey {
        let object = Attestation::default().build(ca, device);
        verify(&object, device, &policy(ca)).expect("valid")
    }

    #[test]
    fn assertion_verifies_and_returns_its_counter() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let key = attested(&ca, &device);
        let app_ids = [APP_ID.to_owned()];
        let assertion = device.assertion(APP_ID, 1, &[3; 32]);
        assert_eq!(
            verify_assertion(
                &assertion,
                &[3; 32],
                &key.public_key,
                &key.app_id,
                0,
                &app_ids
            )
            .expect("valid"),
            1
        );
        let assertion = device.assertion(APP_ID, 41, &[4; 32]);
        assert_eq!(
            verify_assertion(
                &assertion,
                &[4; 32],
                &key.public_key,
                &key.app_id,
                1,
                &app_ids
            )
            .expect("valid"),
            41
        );
    }

    #[test]
    fn assertion_signature_must_match() {
        let (ca, device, other) = (Ca::new("Test"), Device::new(), Device::new());
        let key = attested(&ca, &device);
        let app_ids = [APP_ID.to_owned()];
        // Another client data hash than the one signed.
        let assertion = device.assertion(APP_ID, 1, &[3; 32]);
        assert!(matches!(
            verify_assertion(
                &assertion,
                &[4; 32],
                &key.public_key,
                &key.app_id,
                0,
                &app_ids
            ),
            Err(AttestationError::Signature)
        ));
        // Signed by another key.
        let assertion = other.assertion(APP_ID, 1, &[3; 32]);
        assert!(matches!(
            verify_assertion(
                &assertion,
                &[3; 32],
                &key.public_key,
                &key.app_id,
                0,
                &app_ids
            ),
            Err(AttestationError::Signature)
        ));
        // Signed over authData || clientDataHash once-hashed (not the nonce): refused.
        let mut auth_data = sha256(APP_ID.as_bytes()).to_vec();
        auth_data.push(0);
        auth_data.extend_from_slice(&1u32.to_be_bytes());
        let mut message = auth_data.clone();
        message.extend_from_slice(&[3; 32]);
        let signature = device.key.sign(&message).expect("sign");
        let assertion = cbor(&Value::Map(vec![
            (Value::from("signature"), Value::Bytes(signature)),
            (
                Value::from("authenticatorData"),
                Value::Bytes(auth_data.clone()),
            ),
        ]));
        assert!(matches!(
            verify_assertion(
                &assertion,
                &[3; 32],
                &key.public_key,
                &key.app_id,
                0,
                &app_ids
            ),
            Err(AttestationError::Signature)
        ));
        // A counter raised after signing.
        let assertion = device.assertion(APP_ID, 1, &[3; 32]);
        let mut tampered = assertion.clone();
        let at = tampered.len() - 1;
        tampered[at] ^= 1;
        assert!(matches!(
            verify_assertion(
                &tampered,
                &[3; 32],
                &key.public_key,
                &key.app_id,
                0,
                &app_ids
            ),
            Err(AttestationError::Signature)
        ));
    }

    #[test]
    fn assertion_counter_must_increase() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let key = attested(&ca, &device);
        let app_ids = [APP_ID.to_owned()];
        let assertion = device.assertion(APP_ID, 5, &[3; 32]);
        for previous in [5, 6, u32::MAX] {
            assert!(matches!(
                verify_assertion(
                    &assertion,
                    &[3; 32],
                    &key.public_key,
                    &key.app_id,
                    previous,
                    &app_ids
                ),
                Err(AttestationError::CounterReplay)
            ));
        }
        assert_eq!(
            verify_assertion(
                &assertion,
                &[3; 32],
                &key.public_key,
                &key.app_id,
                4,
                &app_ids
            )
            .expect("valid"),
            5
        );
    }

    #[test]
    fn assertion_app_id_must_match() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let key = attested(&ca, &device);
        // Signed for another app.
        let assertion = device.assertion(OTHER_APP_ID, 1, &[3; 32]);
        let both = [APP_ID.to_owned(), OTHER_APP_ID.to_owned()];
        assert!(matches!(
            verify_assertion(&assertion, &[3; 32], &key.public_key, &key.app_id, 0, &both),
            Err(AttestationError::AppIdMismatch)
        ));
        // The key's app is no longer allowed.
        let assertion = device.assertion(APP_ID, 1, &[3; 32]);
        assert!(matches!(
            verify_assertion(
                &assertion,
                &[3; 32],
                &key.public_key,
                &key.app_id,
                0,
                &[OTHER_APP_ID.to_owned()]
            ),
            Err(AttestationError::AppIdMismatch)
        ));
    }

    #[test]
    fn malformed_assertion_is_refused() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let key = attested(&ca, &device);
        let app_ids = [APP_ID.to_owned()];
        let assertion = device.assertion(APP_ID, 1, &[3; 32]);
        for len in [0, 5, assertion.len() - 1] {
            assert!(matches!(
                verify_assertion(
                    &assertion[..len],
                    &[3; 32],
                    &key.public_key,
                    &key.app_id,
                    0,
                    &app_ids
                ),
                Err(AttestationError::Malformed(_))
            ));
        }
        let short = cbor(&Value::Map(vec![
            (Value::from("signature"), Value::Bytes(vec![0; 70])),
            (Value::from("authenticatorData"), Value::Bytes(vec![0; 36])),
        ]));
        assert!(matches!(
            verify_assertion(&short, &[3; 32], &key.public_key, &key.app_id, 0, &app_ids),
            Err(AttestationError::Malformed(_))
        ));
    }

    // -----------------------------------------------------------------------------------------
    // The gate

    use crate::store::MemoryStore;
    use serde_json::json;

    fn unix(time: SystemTime) -> u64 {
        time.duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    /// A century: the test clock is in 2025 (inside the test leaf's validity), the memory
    /// store's clock is the real one, and a record must outlive both.
    const RETENTION: u64 = 100 * 365 * 86_400;

    fn gate(ca: &Ca) -> AppAttestGate {
        AppAttestGate {
            policy: policy(ca),
            retention_secs: RETENTION,
        }
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn pow() -> ProofOfWork {
        ProofOfWork::new([5; 32], 0, Duration::from_secs(300))
    }

    /// A registration for `device` bound to a fresh challenge of `pow`.
    fn registration(ca: &Ca, device: &Device, pow: &ProofOfWork) -> serde_json::Value {
        let challenge = pow.challenge(unix(now())).challenge;
        let object = Attestation {
            client_data_hash: sha256(challenge.as_bytes()),
            ..Attestation::default()
        }
        .build(ca, device);
        json!({"format": FORMAT, "key_id": b64(&device.key_id),
               "attestation_object": b64(&object), "challenge": challenge})
    }

    fn assertion(device: &Device, counter: u32, pow: &ProofOfWork) -> serde_json::Value {
        let challenge = pow.challenge(unix(now())).challenge;
        let assertion = device.assertion(APP_ID, counter, &sha256(challenge.as_bytes()));
        json!({"format": FORMAT, "key_id": b64(&device.key_id),
               "assertion": b64(&assertion), "challenge": challenge})
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    fn check(
        gate: &AppAttestGate,
        evidence: &serde_json::Value,
        store: &MemoryStore,
    ) -> Result<AppAttestPassed, GateError> {
        block_on(gate.check(Some(evidence), &pow(), store, unix(now())))
    }

    #[test]
    fn a_key_registers_once_then_mints_with_rising_counters() {
        let (ca, device) = (Ca::new("Test"), Device::new());
        let (gate, store, pow) = (gate(&ca), MemoryStore::new(), pow());

        let passed = check(&gate, &registration(&ca, &device, &pow), &store).expect("valid");
        assert_eq!(passed.key_id, URL_SAFE_NO_PAD.encode(&device.key_id));
        assert_eq!(passed.until, unix(now()) + RETENTION);
        assert!(passed.challenge.0.starts_with("attest:v1."));
        let KeyWrite::Register(key) = &passed.write else {
            panic!("a registration")
        };
        assert_eq!(
            (key.public_key.as_slice(), key.app_id.as_str(), key.counter),
            (device.point.as_slice(), APP_ID, 0)
        );
        // The session's client: a hash of the key id, not the key id.
        assert_eq!(passed.user.len(), 43);
        assert_ne!(passed.user, passed.key_id);
        // No assertion before the key is registered.
        let first = assertion(&device, 1, &pow);
        assert!(matches!(
            check(&gate, &first, &store),
            Err(GateError::UnknownKey)
        ));
        block_on(record(&store, &passed))
            .expect("store")
            .expect("registered");
        // A second registration of the key (another attestation, another challenge).
        let again = check(&gate, &registration(&ca, &device, &pow), &store).expect("verifies");
        assert!(matches!(
            block_on(record(&store, &again)).expect("store"),
            Err(GateError::AlreadyRegistered)
        ));

        let asserted = check(&gate, &first, &store).expect("valid");
        assert!(matches!(asserted.write, KeyWrite::Advance(1)));
        assert_eq!(asserted.user, passed.user, "the same client");
        block_on(record(&store, &asserted))
            .expect("store")
            .expect("raised");
        // The same assertion again: refused by the stored counter; and a raise that lost a race.
        assert!(matches!(
            check(&gate, &first, &store),
            Err(GateError::Verify(AttestationError::CounterReplay))
        ));
        assert!(matches!(
            block_on(record(&store, &asserted)).expect("store"),
            Err(GateError::CounterReplay)
        ));
        let later = check(&gate, &assertion(&device, 7, &pow), &store).expect("valid");
        assert!(matches!(later.write, KeyWrite::Advance(7)));
    }

    #[test]
    fn a_development_key_stops_minting_when_development_is_switched_off() {
        let (ca, device, pow) = (Ca::new("Test"), Device::new(), pow());
        let store = MemoryStore::new();
        let mut gate = gate(&ca);
        gate.policy.development = true;
        let challenge = pow.challenge(unix(now())).challenge;
        let object = Attestation {
            aaguid: *AAGUID_DEVELOPMENT,
            client_data_hash: sha256(challenge.as_bytes()),
            ..Attestation::default()
        }
        .build(&ca, &device);
        let evidence = json!({"format": FORMAT, "key_id": b64(&device.key_id),
                              "attestation_object": b64(&object), "challenge": challenge});
        let passed = check(&gate, &evidence, &store).expect("valid");
        block_on(record(&store, &passed))
            .expect("store")
            .expect("registered");
        check(&gate, &assertion(&device, 1, &pow), &store).expect("valid");
        gate.policy.development = false;
        assert!(matches!(
            check(&gate, &assertion(&device, 2, &pow), &store),
            Err(GateError::Verify(AttestationError::Environment))
        ));
    }

    #[test]
    fn the_challenge_must_be_ours_unexpired_and_the_one_signed() {
        let (ca, device, store) = (Ca::new("Test"), Device::new(), MemoryStore::new());
        let gate = gate(&ca);
        let mut evidence = registration(&ca, &device, &pow());
        // Issued with another key.
        let other = ProofOfWork::new([6; 32], 0, Duration::from_secs(300));
        let foreign = registration(&ca, &device, &other);
        assert!(matches!(
            check(&gate, &foreign, &store),
            Err(GateError::Challenge(_))
        ));
        // Expired.
        let late = block_on(gate.check(Some(&evidence), &pow(), &store, unix(now()) + 301));
        assert!(matches!(late, Err(GateError::Challenge(_))));
        // Ours, but not the one the attestation's nonce commits to.
        evidence["challenge"] = json!(pow().challenge(unix(now())).challenge);
        assert!(matches!(
            check(&gate, &evidence, &store),
            Err(GateError::Verify(AttestationError::NonceMismatch))
        ));
    }

    #[test]
    fn the_evidence_is_parsed_strictly() {
        let (ca, device, store) = (Ca::new("Test"), Device::new(), MemoryStore::new());
        let gate = gate(&ca);
        let good = registration(&ca, &device, &pow());
        let with = |name: &str, value: serde_json::Value| {
            let mut evidence = good.clone();
            if value.is_null() {
                evidence.as_object_mut().expect("object").remove(name);
            } else {
                evidence[name] = value;
            }
            evidence
        };
        let padded_key_id = good["key_id"].as_str().expect("text").to_owned();
        let object = good["attestation_object"]
            .as_str()
            .expect("text")
            .to_owned();
        for missing in [
            json!(null),
            json!("apple-app-attest"),
            json!([]),
            with("format", json!("play-integrity")),
            with("format", json!(null)),
            with("format", json!("Apple-App-Attest")),
        ] {
            assert!(
                matches!(check(&gate, &missing, &store), Err(GateError::Required)),
                "{missing}"
            );
        }
        let url_safe = URL_SAFE_NO_PAD.encode(&device.key_id);
        for invalid in [
            with("key_id", json!(null)),
            with("key_id", json!(7)),
            with("key_id", json!(url_safe)),
            with("key_id", json!(padded_key_id.trim_end_matches('='))),
            with("key_id", json!(format!(" {padded_key_id}"))),
            with("key_id", json!(format!("{padded_key_id}AAAA"))),
            with("key_id", json!(b64(&[1; 31]))),
            with("challenge", json!(null)),
            with("challenge", json!(1)),
            with("attestation_object", json!(null)),
            with("attestation_object", json!(format!("{object}\n"))),
            with("attestation_object", json!(format!("{object}=="))),
            with("attestation_object", json!("A".repeat(100_000))),
            with("attestation_object", json!({"x5c": []})),
            with("assertion", json!("AAAA")),
            with("attestationObject", json!(object)),
        ] {
            let result = check(&gate, &invalid, &store);
            assert!(
                matches!(result, Err(GateError::Evidence(_))),
                "{invalid}: {result:?}"
            );
            // Every one of them is `400 attestation_invalid`.
            let error: Error = result.expect_err("refused").into();
            assert_eq!(error.code(), ErrorCode::AttestationInvalid);
        }
        let error: Error = GateError::Required.into();
        assert_eq!(error.code(), ErrorCode::AttestationRequired);
    }
}
