//! Device fingerprints: the header that carries them, and their hash.
//!
//! A fingerprint is the client's stable device identifier: 8 to 512 printable ASCII characters
//! (`0x20` to `0x7E`). The server never stores it raw: tokens carry its base64url SHA-256 (`fp`),
//! and every authenticated request must send the same fingerprint in
//! [`FINGERPRINT_HEADER`], compared by hash in constant time.
//!
//! [`hash`] computes the `fp` claim of a fingerprint (what
//! [`VerifiedSession::fingerprint_hash`](crate::VerifiedSession::fingerprint_hash) returns), to
//! key the app's own records on a client without keeping its fingerprint:
//!
//! ```
//! use perishable_core::fingerprint;
//!
//! assert_eq!(fingerprint::hash("browser-7f3a9c").len(), 43);
//! ```

use http::HeaderName;
use subtle::ConstantTimeEq;

use crate::error::{Error, ErrorCode};

/// `X-Perishable-Fingerprint`: the fingerprint on authenticated requests.
pub const FINGERPRINT_HEADER: HeaderName = HeaderName::from_static("x-perishable-fingerprint");

/// Shortest fingerprint.
pub(crate) const MIN_LEN: usize = 8;
/// Longest fingerprint.
pub(crate) const MAX_LEN: usize = 512;

/// Checks the protocol shape: 8 to 512 printable ASCII characters.
pub(crate) fn validate(fingerprint: &str) -> Result<(), Error> {
    let len = fingerprint.len();
    if !(MIN_LEN..=MAX_LEN).contains(&len) {
        return Err(Error::new(
            ErrorCode::InvalidFingerprint,
            format!("the fingerprint must be {MIN_LEN} to {MAX_LEN} characters long"),
        ));
    }
    if !fingerprint.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(Error::new(
            ErrorCode::InvalidFingerprint,
            "the fingerprint must be printable ASCII",
        ));
    }
    Ok(())
}

/// base64url (no padding) SHA-256 of the fingerprint: the `fp` claim.
pub fn hash(fingerprint: &str) -> String {
    crate::token::hash_b64(fingerprint.as_bytes())
}

/// Whether `presented` hashes to the `fp` claim, compared in constant time.
///
/// Runs on every request (fingerprint and User-Agent): the digest is encoded on the stack.
pub(crate) fn matches(presented: &[u8], fp_claim: &str) -> bool {
    use base64::Engine;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, presented);
    let mut encoded = [0u8; 43];
    match base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode_slice(digest.as_ref(), &mut encoded)
    {
        Ok(43) => encoded.ct_eq(fp_claim.as_bytes()).into(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_enforced() {
        assert_eq!(
            validate("1234567").unwrap_err().code(),
            ErrorCode::InvalidFingerprint
        );
        assert!(validate("12345678").is_ok());
        assert!(validate(&"x".repeat(512)).is_ok());
        assert!(validate(&"x".repeat(513)).is_err());
        assert!(validate("tab\there!").is_err());
        assert!(validate("héllo-wörld").is_err());
    }

    #[test]
    fn matches_by_hash() {
        let fp = hash("device-123456");
        assert!(matches(b"device-123456", &fp));
        assert!(!matches(b"device-123457", &fp));
    }
}
