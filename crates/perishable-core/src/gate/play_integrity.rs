//! Google Play Integrity: integrity verdicts decrypted and verified locally, as in Google's
//! "Decrypt and verify the integrity verdict locally", with the app's own response encryption
//! keys (Play Console, "Manage response encryption").
//!
//! A token is a compact JWE (`alg` A256KW, `enc` A256GCM) whose plaintext is a compact JWS (ES256)
//! whose payload is the verdict JSON. The decryption key unwraps the content key (RFC 3394), the
//! content key decrypts (AES-256-GCM, the protected header as AAD), the verification key checks
//! Google's signature; then the verdict is held to the [`PlayIntegrityPolicy`].
//!
//! # What it proves
//!
//! That Google Play, asked by one of our apps (package name) for this very request (the
//! `requestHash` of a standard request, or the `nonce` of a classic one, compared with what the
//! caller expects) within `max_age`, saw a binary that Play recognizes (`PLAY_RECOGNIZED`), signed
//! with an allowed certificate, on a device meeting the required integrity label.
//!
//! # What it does not prove
//!
//! - Not that a human uses the device, nor that the device is not a farm of genuine phones.
//! - Not single use: the caller must bind `expected_request_hash` to a one-time challenge (or the
//!   request itself) and refuse one seen twice.
//! - Not Google's server-side checks: keys rotated or revoked in the Play Console must be
//!   configured here by hand; the licensing and environment verdicts are returned, not enforced.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrap};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The verdict label Play gives a binary it distributed.
const PLAY_RECOGNIZED: &str = "PLAY_RECOGNIZED";
/// How far in the future a verdict's timestamp may be (clock skew between us and Google).
const MAX_FUTURE_SKEW: Duration = Duration::from_secs(30);
/// Bound on what is decoded at all; real tokens are a few KiB.
const MAX_TOKEN_LEN: usize = 32 * 1024;

/// Why a token or a key was refused. Messages name the failed check only: no key, token or
/// verdict content.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IntegrityError {
    /// A configured key is not what Google hands out.
    #[error("invalid Play Integrity key: {0}")]
    InvalidKey(&'static str),
    /// The token is not the expected JWE / JWS / JSON shape.
    #[error("malformed integrity token: {0}")]
    Malformed(&'static str),
    /// A JOSE header names another algorithm than A256KW, A256GCM and ES256.
    #[error("unsupported integrity token algorithm")]
    UnsupportedAlgorithm,
    /// Unwrapping or decryption failed: another key, or tampering.
    #[error("integrity token decryption failed")]
    Decryption,
    /// Google's signature does not verify.
    #[error("integrity token signature invalid")]
    Signature,
    /// The package names are not an allowed one, or disagree.
    #[error("package name not allowed")]
    PackageMismatch,
    /// The request hash (or nonce) is not the expected one.
    #[error("request hash mismatch")]
    RequestHashMismatch,
    /// The verdict is older than `max_age`, or from the future.
    #[error("integrity verdict outside its time window")]
    Stale,
    /// Play does not recognize the app binary.
    #[error("app not recognized by Play")]
    AppNotRecognized,
    /// The app is signed with a certificate the policy does not list.
    #[error("app signing certificate not allowed")]
    CertificateNotAllowed,
    /// The device lacks the required integrity label.
    #[error("device integrity verdict not met")]
    DeviceVerdict,
    /// `now` is before the Unix epoch.
    #[error("clock before the Unix epoch")]
    Clock,
}

/// The app's response encryption keys, from the Play Console.
#[derive(Clone)]
pub(crate) struct PlayIntegrityKeys {
    /// AES-256 key-encryption key.
    decryption: [u8; 32],
    /// Google's ES256 verification key, uncompressed P-256 point.
    verification: Vec<u8>,
}

impl fmt::Debug for PlayIntegrityKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlayIntegrityKeys").finish_non_exhaustive()
    }
}

impl PlayIntegrityKeys {
    /// `decryption_key_b64`: base64 of the 32-byte AES key; `verification_key_b64`: base64 of the
    /// DER SubjectPublicKeyInfo of an EC P-256 key. Surrounding whitespace is ignored.
    pub(crate) fn new(
        decryption_key_b64: &str,
        verification_key_b64: &str,
    ) -> Result<Self, IntegrityError> {
        let decryption = STANDARD
            .decode(decryption_key_b64.trim())
            .map_err(|_| IntegrityError::InvalidKey("decryption key is not base64"))?;
        let decryption: [u8; 32] = decryption
            .try_into()
            .map_err(|_| IntegrityError::InvalidKey("decryption key is not 32 bytes"))?;
        let spki = STANDARD
            .decode(verification_key_b64.trim())
            .map_err(|_| IntegrityError::InvalidKey("verification key is not base64"))?;
        let (rest, spki) = SubjectPublicKeyInfo::from_der(&spki)
            .map_err(|_| IntegrityError::InvalidKey("verification key is not SPKI DER"))?;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|parameters| parameters.as_oid().ok());
        if !rest.is_empty()
            || spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
            || curve != Some(OID_EC_P256)
        {
            return Err(IntegrityError::InvalidKey(
                "verification key is not EC P-256",
            ));
        }
        let point = spki.subject_public_key.data.to_vec();
        if point.len() != 65 || point[0] != 0x04 {
            return Err(IntegrityError::InvalidKey(
                "verification key is not an uncompressed point",
            ));
        }
        Ok(Self {
            decryption,
            verification: point,
        })
    }
}

/// What a verdict must satisfy.
#[derive(Clone, Debug)]
pub(crate) struct PlayIntegrityPolicy {
    /// Allowed package names.
    pub(crate) package_names: Vec<String>,
    /// Allowed signing certificate SHA-256 digests (base64url as in the token, or hex with or
    /// without colons as the Play Console shows them). Empty: any; otherwise every digest in the
    /// verdict must be listed.
    pub(crate) certificate_sha256: Vec<String>,
    /// The device label required in `deviceRecognitionVerdict`, e.g. `MEETS_DEVICE_INTEGRITY`.
    pub(crate) device_verdict: String,
    /// How old a verdict may be (from `requestDetails.timestampMillis`).
    pub(crate) max_age: Duration,
}

impl PlayIntegrityPolicy {
    /// These packages, any signing certificate, `MEETS_DEVICE_INTEGRITY`, five minutes.
    pub(crate) fn new(package_names: Vec<String>) -> Self {
        Self {
            package_names,
            certificate_sha256: Vec::new(),
            device_verdict: "MEETS_DEVICE_INTEGRITY".to_owned(),
            max_age: Duration::from_secs(5 * 60),
        }
    }
}

/// A verdict that passed [`verify_token`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The app's package name.
    pub(crate) package_name: String,
    /// When the app requested the verdict.
    pub(crate) timestamp: SystemTime,
    /// `deviceIntegrity.deviceRecognitionVerdict`, all labels.
    pub(crate) device_verdicts: Vec<String>,
    /// `appIntegrity.certificateSha256Digest`.
    pub(crate) certificate_sha256: Vec<String>,
    /// `appIntegrity.versionCode`, if present.
    pub(crate) version_code: Option<String>,
    /// `accountDetails.appLicensingVerdict`, if present (not enforced).
    pub(crate) app_licensing: Option<String>,
}

/// Decrypts and verifies an integrity token and holds its verdict to `policy`.
/// `expected_request_hash` is what the app was told to pass as `requestHash` (standard requests)
/// or `nonce` (classic requests), as the exact string; it is compared in constant time.
pub(crate) fn verify_token(
    token: &str,
    keys: &PlayIntegrityKeys,
    policy: &PlayIntegrityPolicy,
    expected_request_hash: &str,
    now: SystemTime,
) -> Result<Verdict, IntegrityError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(IntegrityError::Malformed("token too large"));
    }
    let jws = decrypt(token, &keys.decryption)?;
    let payload = verify_jws(&jws, &keys.verification)?;
    let payload: Payload = serde_json::from_slice(&payload)
        .map_err(|_| IntegrityError::Malformed("verdict payload"))?;
    check(payload, policy, expected_request_hash, now)
}

/// JWE compact serialization, A256KW + A256GCM: the plaintext.
fn decrypt(token: &str, key: &[u8; 32]) -> Result<Vec<u8>, IntegrityError> {
    let [header_b64, encrypted_key, iv, ciphertext, tag] = split::<5>(token)?;
    let header: JoseHeader = decode_json(header_b64)?;
    if header.alg != "A256KW" || header.enc.as_deref() != Some("A256GCM") {
        return Err(IntegrityError::UnsupportedAlgorithm);
    }
    if header.zip.is_some() || header.crit.is_some() {
        return Err(IntegrityError::UnsupportedAlgorithm);
    }
    let encrypted_key = b64url(encrypted_key)?;
    let iv: [u8; 12] = b64url(iv)?
        .try_into()
        .map_err(|_| IntegrityError::Malformed("JWE IV is not 96 bits"))?;
    let mut in_out = b64url(ciphertext)?;
    let tag = b64url(tag)?;
    if encrypted_key.len() != 40 || tag.len() != 16 {
        return Err(IntegrityError::Malformed("JWE key or tag length"));
    }

    let kek = AesKek::new(&AES_256, key).map_err(|_| IntegrityError::Decryption)?;
    let mut content_key = [0u8; 32];
    let unwrapped = kek
        .unwrap(&encrypted_key, &mut content_key)
        .map_err(|_| IntegrityError::Decryption)?;
    if unwrapped.len() != 32 {
        return Err(IntegrityError::Decryption);
    }
    let content_key = UnboundKey::new(&AES_256_GCM, &content_key)
        .map(LessSafeKey::new)
        .map_err(|_| IntegrityError::Decryption)?;
    in_out.extend_from_slice(&tag);
    let plaintext = content_key
        .open_in_place(
            Nonce::assume_unique_for_key(iv),
            Aad::from(header_b64.as_bytes()),
            &mut in_out,
        )
        .map_err(|_| IntegrityError::Decryption)?;
    let len = plaintext.len();
    in_out.truncate(len);
    Ok(in_out)
}

/// JWS compact serialization, ES256 (raw `r || s`): the payload.
fn verify_jws(jws: &[u8], point: &[u8]) -> Result<Vec<u8>, IntegrityError> {
    let jws = std::str::from_utf8(jws).map_err(|_| IntegrityError::Malformed("JWS is not text"))?;
    let [header_b64, payload_b64, signature] = split::<3>(jws)?;
    let header: JoseHeader = decode_json(header_b64)?;
    if header.alg != "ES256" || header.enc.is_some() || header.crit.is_some() {
        return Err(IntegrityError::UnsupportedAlgorithm);
    }
    let signature = b64url(signature)?;
    if signature.len() != 64 {
        return Err(IntegrityError::Signature);
    }
    // The signing input is the ASCII of `header.payload` as sent.
    let signing_input_len = header_b64.len() + 1 + payload_b64.len();
    let signing_input = &jws.as_bytes()[..signing_input_len];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(signing_input, &signature)
        .map_err(|_| IntegrityError::Signature)?;
    b64url(payload_b64)
}

/// The verdict against the policy, in Google's order: request, app, device.
fn check(
    payload: Payload,
    policy: &PlayIntegrityPolicy,
    expected_request_hash: &str,
    now: SystemTime,
) -> Result<Verdict, IntegrityError> {
    let request = payload.request_details;
    if !policy
        .package_names
        .iter()
        .any(|name| name == &request.request_package_name)
    {
        return Err(IntegrityError::PackageMismatch);
    }

    // Standard requests carry requestHash, classic ones nonce.
    let request_hash = request
        .request_hash
        .as_deref()
        .or(request.nonce.as_deref())
        .unwrap_or_default();
    if expected_request_hash.is_empty()
        || !bool::from(
            request_hash
                .as_bytes()
                .ct_eq(expected_request_hash.as_bytes()),
        )
    {
        return Err(IntegrityError::RequestHashMismatch);
    }

    let millis = match &request.timestamp_millis {
        serde_json::Value::String(text) => text.parse::<u64>().ok(),
        serde_json::Value::Number(number) => number.as_u64(),
        _ => None,
    }
    .ok_or(IntegrityError::Malformed("timestampMillis"))?;
    let timestamp = UNIX_EPOCH
        .checked_add(Duration::from_millis(millis))
        .ok_or(IntegrityError::Malformed("timestampMillis"))?;
    now.duration_since(UNIX_EPOCH)
        .map_err(|_| IntegrityError::Clock)?;
    match now.duration_since(timestamp) {
        Ok(age) if age > policy.max_age => return Err(IntegrityError::Stale),
        Ok(_) => {}
        Err(ahead) if ahead.duration() > MAX_FUTURE_SKEW => return Err(IntegrityError::Stale),
        Err(_) => {}
    }

    let app = payload.app_integrity;
    if app.app_recognition_verdict != PLAY_RECOGNIZED {
        return Err(IntegrityError::AppNotRecognized);
    }
    if app.package_name.as_deref() != Some(request.request_package_name.as_str()) {
        return Err(IntegrityError::PackageMismatch);
    }
    let certificates = app.certificate_sha256_digest.unwrap_or_default();
    if !policy.certificate_sha256.is_empty() {
        let allowed: Vec<[u8; 32]> = policy
            .certificate_sha256
            .iter()
            .filter_map(|digest| parse_digest(digest))
            .collect();
        let all_allowed = !certificates.is_empty()
            && certificates
                .iter()
                .all(|digest| parse_digest(digest).is_some_and(|digest| allowed.contains(&digest)));
        if !all_allowed {
            return Err(IntegrityError::CertificateNotAllowed);
        }
    }

    let device_verdicts = payload
        .device_integrity
        .device_recognition_verdict
        .unwrap_or_default();
    if !device_verdicts
        .iter()
        .any(|label| label == &policy.device_verdict)
    {
        return Err(IntegrityError::DeviceVerdict);
    }

    Ok(Verdict {
        package_name: request.request_package_name,
        timestamp,
        device_verdicts,
        certificate_sha256: certificates,
        version_code: app.version_code.and_then(|code| match code {
            serde_json::Value::String(text) => Some(text),
            serde_json::Value::Number(number) => Some(number.to_string()),
            _ => None,
        }),
        app_licensing: payload
            .account_details
            .and_then(|account| account.app_licensing_verdict),
    })
}

/// A SHA-256 digest written as base64url (padded or not), standard base64, or hex with or
/// without colons.
fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        URL_SAFE_NO_PAD
            .decode(text)
            .or_else(|_| URL_SAFE.decode(text))
            .or_else(|_| STANDARD.decode(text))
            .ok()?
    };
    bytes.try_into().ok()
}

/// Exactly `N` dot-separated parts.
fn split<const N: usize>(text: &str) -> Result<[&str; N], IntegrityError> {
    let parts: Vec<&str> = text.split('.').collect();
    parts
        .try_into()
        .map_err(|_| IntegrityError::Malformed("wrong number of JOSE parts"))
}

/// Unpadded base64url, as JOSE requires.
fn b64url(text: &str) -> Result<Vec<u8>, IntegrityError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| IntegrityError::Malformed("invalid base64url"))
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, IntegrityError> {
    serde_json::from_slice(&b64url(part)?).map_err(|_| IntegrityError::Malformed("JOSE header"))
}

/// The JOSE header fields that matter; `zip` and `crit` are refused when present.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    enc: Option<String>,
    zip: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    request_details: RequestDetails,
    app_integrity: AppIntegrity,
    device_integrity: DeviceIntegrity,
    account_details: Option<AccountDetails>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestDetails {
    request_package_name: String,
    request_hash: Option<String>,
    nonce: Option<String>,
    /// An int64 in proto3 JSON: a string, though a number is accepted too.
    timestamp_millis: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppIntegrity {
    app_recognition_verdict: String,
    package_name: Option<String>,
    certificate_sha256_digest: Option<Vec<String>>,
    version_code: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceIntegrity {
    device_recognition_verdict: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountDetails {
    app_licensing_verdict: Option<String>,
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING,
        ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    };
    use serde_json::{Value, json};

    use super::*;

    const PACKAGE: &str = "com.example.app";
    const REQUEST_HASH: &str = "2cp24z0e8OxMdvnJ5vQ6dJNBEr3Jq_I2jG5h3pb9i7E";
    const CERT_DIGEST: &str = "pJBkwS2T8l3fMmp_3NKfj4d8f5_3y1gDaCZlH9dkAwA";

    /// 2025-06-01T00:00:00Z.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_748_736_000)
    }

    fn now_millis() -> u64 {
        1_748_736_000_000
    }

    /// What the Play Console hands out, and what Google keeps.
    struct Google {
        decryption: [u8; 32],
        signing: EcdsaKeyPair,
    }

    impl Google {
        fn new() -> Self {
            let mut decryption = [0; 32];
            SystemRandom::new().fill(&mut decryption).expect("random");
            let signing = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
            Self {
                decryption,
                signing,
            }
        }

        fn keys(&self) -> PlayIntegrityKeys {
            let spki = self.signing.public_key().as_der().expect("spki");
            PlayIntegrityKeys::new(
                &STANDARD.encode(self.decryption),
                &STANDARD.encode(spki.as_ref()),
            )
            .expect("keys")
        }

        /// A token as Google builds it: JWS ES256, then JWE A256KW/A256GCM.
        fn token(&self, payload: &Value) -> String {
            let jws = jws(&self.signing, r#"{"alg":"ES256"}"#, payload);
            jwe(
                &self.decryption,
                r#"{"alg":"A256KW","enc":"A256GCM"}"#,
                jws.as_bytes(),
            )
        }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn jws(key: &EcdsaKeyPair, header: &str, payload: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            b64(header.as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let signature = key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .expect("sign");
        format!("{signing_input}.{}", b64(signature.as_ref()))
    }

    fn jwe(kek: &[u8; 32], header: &str, plaintext: &[u8]) -> String {
        let rng = SystemRandom::new();
        let mut content_key = [0; 32];
        rng.fill(&mut content_key).expect("random");
        let mut wrapped = [0; 40];
        AesKek::new(&AES_256, kek)
            .expect("kek")
            .wrap(&content_key, &mut wrapped)
            .expect("wrap");
        let mut iv = [0; 12];
        rng.fill(&mut iv).expect("random");
        let header = b64(header.as_bytes());
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &content_key).expect("key"));
        let mut ciphertext = plaintext.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(header.as_bytes()),
                &mut ciphertext,
            )
            .expect("seal");
        format!(
            "{header}.{}.{}.{}.{}",
            b64(&wrapped),
            b64(&iv),
            b64(&ciphertext),
            b64(tag.as_ref())
        )
    }

    /// A verdict as Google documents it (standard request).
    fn payload() -> Value {
        json!({
            "requestDetails": {
                "requestPackageName": PACKAGE,
                "requestHash": REQUEST_HASH,
                "timestampMillis": (now_millis() - 10_000).to_string(),
            },
            "appIntegrity": {
                "appRecognitionVerdict": "PLAY_RECOGNIZED",
                "packageName": PACKAGE,
                "certificateSha256Digest": [CERT_DIGEST],
                "versionCode": "42",
            },
            "deviceIntegrity": {
                "deviceRecognitionVerdict": ["MEETS_BASIC_INTEGRITY", "MEETS_DEVICE_INTEGRITY"],
            },
            "accountDetails": {
                "appLicensingVerdict": "LICENSED",
            },
        })
    }

    fn policy() -> PlayIntegrityPolicy {
        PlayIntegrityPolicy {
            certificate_sha256: vec![CERT_DIGEST.to_owned()],
            ..PlayIntegrityPolicy::new(vec![PACKAGE.to_owned()])
        }
    }

    fn verify(google: &Google, token: &str) -> Result<Verdict, IntegrityError> {
        verify_token(token, &google.keys(), &policy(), REQUEST_HASH, now())
    }

    /// The payload with one field set (`path` of object keys).
    fn with(path: &[&str], value: Value) -> Value {
        let mut payload = payload();
        let mut at = &mut payload;
        for key in &path[..path.len() - 1] {
            at = &mut at[*key];
        }
        let last = path[path.len() - 1];
        if value.is_null() {
            at.as_object_mut().expect("object").remove(last);
        } else {
            at[last] = value;
        }
        payload
    }

    #[test]
    fn valid_token_verifies() {
        let google = Google::new();
        let verdict = verify(&google, &google.token(&payload())).expect("valid");
        assert_eq!(
            verdict,
            Verdict {
                package_name: PACKAGE.to_owned(),
                timestamp: now() - Duration::from_secs(10),
                device_verdicts: vec![
                    "MEETS_BASIC_INTEGRITY".to_owned(),
                    "MEETS_DEVICE_INTEGRITY".to_owned()
                ],
                certificate_sha256: vec![CERT_DIGEST.to_owned()],
                version_code: Some("42".to_owned()),
                app_licensing: Some("LICENSED".to_owned()),
            }
        );
    }

    #[test]
    fn classic_nonce_and_numeric_timestamp_verify() {
        let google = Google::new();
        let mut payload = with(&["requestDetails", "requestHash"], Value::Null);
        payload["requestDetails"]["nonce"] = json!(REQUEST_HASH);
        payload["requestDetails"]["timestampMillis"] = json!(now_millis());
        verify(&google, &google.token(&payload)).expect("valid");
    }

    #[test]
    fn certificate_digest_in_hex_is_accepted() {
        let google = Google::new();
        let digest = URL_SAFE_NO_PAD.decode(CERT_DIGEST).expect("digest");
        let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
        let policy = PlayIntegrityPolicy {
            certificate_sha256: vec![hex.join(":")],
            ..policy()
        };
        let token = google.token(&payload());
        verify_token(&token, &google.keys(), &policy, REQUEST_HASH, now()).expect("valid");
    }

    #[test]
    fn wrong_decryption_key_is_refused() {
        let (google, other) = (Google::new(), Google::new());
        let token = other.token(&payload());
        assert!(matches!(
            verify(&google, &token),
            Err(IntegrityError::Decryption)
        ));
    }

    /// Flips one bit in the decoded part `index` of the JWE.
    fn tamper(token: &str, index: usize) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut bytes = URL_SAFE_NO_PAD.decode(&parts[index]).expect("b64");
        bytes[0] ^= 1;
        parts[index] = b64(&bytes);
        parts.join(".")
    }

    #[test]
    fn tampered_token_is_refused() {
        let google = Google::new();
        let token = google.token(&payload());
        // Encrypted key, IV, ciphertext, tag.
        for index in 1..5 {
            assert!(
                matches!(
                    verify(&google, &tamper(&token, index)),
                    Err(IntegrityError::Decryption)
                ),
                "part {index}"
            );
        }
        // The protected header is the AAD: an equivalent header is still refused.
        let mut parts: Vec<&str> = token.split('.').collect();
        let header = b64(br#"{"enc":"A256GCM","alg":"A256KW"}"#);
        parts[0] = &header;
        assert!(matches!(
            verify(&google, &parts.join(".")),
            Err(IntegrityError::Decryption)
        ));
        // Truncated, extra parts, padding, garbage.
        for bad in [
            &token[..token.len() - 3],
            &format!("{token}."),
            &format!("{token}=="),
            "",
            "a.b.c.d.e",
            &token.replacen('.', "", 1),
        ] {
            assert!(verify(&google, bad).is_err());
        }
    }

    #[test]
    fn wrong_signing_key_is_refused() {
        let google = Google::new();
        let forger = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
        let forged_jws = jws(&forger, r#"{"alg":"ES256"}"#, &payload());
        let token = jwe(
            &google.decryption,
            r#"{"alg":"A256KW","enc":"A256GCM"}"#,
            forged_jws.as_bytes(),
        );
        assert!(matches!(
            verify(&google, &token),
            Err(IntegrityError::Signature)
        ));
        // A DER signature where JOSE wants raw r || s.
        let der = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            google.signing.to_pkcs8v1().expect("pkcs8").as_ref(),
        )
        .expect("key");
        let der_jws = jws(&der, r#"{"alg":"ES256"}"#, &payload());
        let token = jwe(
            &google.decryption,
            r#"{"alg":"A256KW","enc":"A256GCM"}"#,
            der_jws.as_bytes(),
        );
        assert!(matches!(
            verify(&google, &token),
            Err(IntegrityError::Signature)
        ));
        // A payload changed after signing.
        let signed = jws_parts(&google, &payload());
        let forged = format!(
            "{}.{}.{}",
            signed[0],
            b64(with(&["appIntegrity", "packageName"], json!("evil"))
                .to_string()
                .as_bytes()),
            signed[2]
        );
        let token = jwe(
            &google.decryption,
            r#"{"alg":"A256KW","enc":"A256GCM"}"#,
            forged.as_bytes(),
        );
        assert!(matches!(
            verify(&google, &token),
            Err(IntegrityError::Signature)
        ));
    }

    fn jws_parts(google: &Google, payload: &Value) -> Vec<String> {
        jws(&google.signing, r#"{"alg":"ES256"}"#, payload)
            .split('.')
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn other_algorithms_are_refused() {
        let google = Google::new();
        let jws_es256 = jws(&google.signing, r#"{"alg":"ES256"}"#, &payload());
        for header in [
            r#"{"alg":"dir","enc":"A256GCM"}"#,
            r#"{"alg":"A128KW","enc":"A256GCM"}"#,
            r#"{"alg":"RSA-OAEP-256","enc":"A256GCM"}"#,
            r#"{"alg":"A256KW","enc":"A128GCM"}"#,
            r#"{"alg":"A256KW","enc":"A256CBC-HS512"}"#,
            r#"{"alg":"A256KW"}"#,
            r#"{"alg":"A256KW","enc":"A256GCM","zip":"DEF"}"#,
            r#"{"alg":"A256KW","enc":"A256GCM","crit":["exp"]}"#,
        ] {
            let token = jwe(&google.decryption, header, jws_es256.as_bytes());
            assert!(
                matches!(
                    verify(&google, &token),
                    Err(IntegrityError::UnsupportedAlgorithm)
                ),
                "{header}"
            );
        }
        // The inner JWS: `none` with an empty signature, HS256 keyed with the public key, ES384.
        let payload_b64 = b64(payload().to_string().as_bytes());
        let none = format!("{}.{payload_b64}.", b64(br#"{"alg":"none"}"#));
        let hs_input = format!("{}.{payload_b64}", b64(br#"{"alg":"HS256"}"#));
        let hmac_key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            google.signing.public_key().as_ref(),
        );
        let hs256 = format!(
            "{hs_input}.{}",
            b64(aws_lc_rs::hmac::sign(&hmac_key, hs_input.as_bytes()).as_ref())
        );
        let p384 = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("key");
        let es384 = jws(&p384, r#"{"alg":"ES384"}"#, &payload());
        let es256_crit = jws(
            &google.signing,
            r#"{"alg":"ES256","crit":["b64"]}"#,
            &payload(),
        );
        for inner in [none, hs256, es384, es256_crit] {
            let token = jwe(
                &google.decryption,
                r#"{"alg":"A256KW","enc":"A256GCM"}"#,
                inner.as_bytes(),
            );
            assert!(
                matches!(
                    verify(&google, &token),
                    Err(IntegrityError::UnsupportedAlgorithm)
                ),
                "{inner}"
            );
        }
    }

    #[test]
    fn wrong_package_is_refused() {
        let google = Google::new();
        for payload in [
            with(
                &["requestDetails", "requestPackageName"],
                json!("com.evil.app"),
            ),
            with(&["appIntegrity", "packageName"], json!("com.evil.app")),
            with(&["appIntegrity", "packageName"], Value::Null),
        ] {
            assert!(matches!(
                verify(&google, &google.token(&payload)),
                Err(IntegrityError::PackageMismatch)
            ));
        }
    }

    #[test]
    fn wrong_request_hash_is_refused() {
        let google = Google::new();
        let token = google.token(&payload());
        for expected in ["", "other", &REQUEST_HASH[1..], &format!("{REQUEST_HASH}x")] {
            assert!(matches!(
                verify_token(&token, &google.keys(), &policy(), expected, now()),
                Err(IntegrityError::RequestHashMismatch)
            ));
        }
        let no_hash = with(&["requestDetails", "requestHash"], Value::Null);
        assert!(matches!(
            verify(&google, &google.token(&no_hash)),
            Err(IntegrityError::RequestHashMismatch)
        ));
    }

    #[test]
    fn stale_or_future_timestamp_is_refused() {
        let google = Google::new();
        let at = |millis: u64| {
            with(
                &["requestDetails", "timestampMillis"],
                json!(millis.to_string()),
            )
        };
        for millis in [now_millis() - 301_000, now_millis() + 31_000, 0] {
            assert!(matches!(
                verify(&google, &google.token(&at(millis))),
                Err(IntegrityError::Stale)
            ));
        }
        for millis in [now_millis() - 299_000, now_millis() + 29_000] {
            verify(&google, &google.token(&at(millis))).expect("inside the window");
        }
        for bad in [json!("soon"), json!(-1), json!(null), json!(1.5)] {
            let payload = with(&["requestDetails", "timestampMillis"], bad);
            assert!(matches!(
                verify(&google, &google.token(&payload)),
                Err(IntegrityError::Malformed(_))
            ));
        }
    }

    #[test]
    fn unrecognized_app_is_refused() {
        let google = Google::new();
        for verdict in ["UNRECOGNIZED_VERSION", "UNEVALUATED", "play_recognized"] {
            let payload = with(&["appIntegrity", "appRecognitionVerdict"], json!(verdict));
            assert!(matches!(
                verify(&google, &google.token(&payload)),
                Err(IntegrityError::AppNotRecognized)
            ));
        }
    }

    #[test]
    fn unlisted_certificate_is_refused() {
        let google = Google::new();
        let other = b64(&[1; 32]);
        for digests in [
            json!([other]),
            json!([CERT_DIGEST, other]),
            json!([]),
            Value::Null,
        ] {
            let payload = with(&["appIntegrity", "certificateSha256Digest"], digests);
            assert!(matches!(
                verify(&google, &google.token(&payload)),
                Err(IntegrityError::CertificateNotAllowed)
            ));
        }
        // An empty allow-list accepts any.
        let payload = with(&["appIntegrity", "certificateSha256Digest"], json!([other]));
        let any = PlayIntegrityPolicy::new(vec![PACKAGE.to_owned()]);
        verify_token(
            &google.token(&payload),
            &google.keys(),
            &any,
            REQUEST_HASH,
            now(),
        )
        .expect("valid");
    }

    #[test]
    fn missing_device_verdict_is_refused() {
        let google = Google::new();
        for labels in [json!(["MEETS_BASIC_INTEGRITY"]), json!([]), Value::Null] {
            let payload = with(&["deviceIntegrity", "deviceRecognitionVerdict"], labels);
            assert!(matches!(
                verify(&google, &google.token(&payload)),
                Err(IntegrityError::DeviceVerdict)
            ));
        }
        // A stronger requirement than the device has.
        let strong = PlayIntegrityPolicy {
            device_verdict: "MEETS_STRONG_INTEGRITY".to_owned(),
            ..policy()
        };
        assert!(matches!(
            verify_token(
                &google.token(&payload()),
                &google.keys(),
                &strong,
                REQUEST_HASH,
                now()
            ),
            Err(IntegrityError::DeviceVerdict)
        ));
    }

    #[test]
    fn malformed_payload_is_refused() {
        let google = Google::new();
        for payload in [
            json!([]),
            with(&["appIntegrity"], Value::Null),
            with(&["requestDetails", "requestPackageName"], json!(7)),
        ] {
            assert!(matches!(
                verify(&google, &google.token(&payload)),
                Err(IntegrityError::Malformed(_))
            ));
        }
    }

    #[test]
    fn bad_keys_are_refused() {
        let google = Google::new();
        let spki = STANDARD.encode(google.signing.public_key().as_der().expect("spki").as_ref());
        let aes = STANDARD.encode(google.decryption);
        let p384 = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("key");
        let p384 = STANDARD.encode(p384.public_key().as_der().expect("spki").as_ref());
        let raw_point = STANDARD.encode(google.signing.public_key().as_ref());
        for (decryption, verification) in [
            ("not base64!", spki.as_str()),
            (&STANDARD.encode([0; 16]), &spki),
            (&aes, "not base64!"),
            (&aes, &p384),
            (&aes, &raw_point),
        ] {
            assert!(matches!(
                PlayIntegrityKeys::new(decryption, verification),
                Err(IntegrityError::InvalidKey(_))
            ));
        }
        // And nothing of the key in its Debug.
        assert_eq!(format!("{:?}", google.keys()), "PlayIntegrityKeys { .. }");
    }
}
