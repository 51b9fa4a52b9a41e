//! Proof of work on minting: stateless, HMAC-signed, expiring, single-use challenges.
//!
//! `GET /challenge` hands out `v1.<payload>.<mac>`, where the payload (base64url) is 16 random
//! bytes, the expiry (Unix seconds) and the difficulty, and the MAC is HMAC-SHA256 under a key
//! derived from the signing key, so every instance with the same keys accepts the same challenges
//! and none can be forged. `POST /session` must then carry a `nonce` such that
//! `SHA-256(challenge + nonce)` (UTF-8 strings concatenated) has at least `difficulty` leading zero
//! bits. A challenge is accepted once (the session engine records it in the
//! [`Store`](crate::store::Store) until it expires) and never after `expires_at`. At the default 16 bits a client does about 65,000 hashes (milliseconds in native
//! code, well under a second in a browser worker); the server does one.
//!
//! The session engine issues and checks them ([`Sessions::challenge`](crate::Sessions::challenge)
//! is `GET /challenge`); the browser client and `perishable-client` solve them.
//!
//! ```
//! use perishable_core::{Config, Perishable};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let perishable = Perishable::new(Config::builder().upstream_api_key("sk-test").build()?)?;
//! let challenge = perishable.sessions().challenge();
//! assert!(challenge.challenge.starts_with("v1."));
//! assert_eq!((challenge.difficulty, challenge.algorithm.as_str()), (16, "SHA-256"));
//! # Ok(()) }
//! ```

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorCode};

/// The `GET /challenge` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Challenge {
    /// The challenge string to hash with a nonce.
    pub challenge: String,
    /// Leading zero bits required; 0 means proof of work is off.
    pub difficulty: u8,
    /// Always `SHA-256`.
    pub algorithm: String,
    /// Unix seconds after which the challenge is refused.
    pub expires_at: u64,
}

/// The `pow` object of `POST /session`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) struct PowSolution {
    /// The challenge from `GET /challenge`.
    pub(crate) challenge: String,
    /// The client's nonce.
    pub(crate) nonce: String,
}

/// Longest nonce accepted.
pub(crate) const MAX_NONCE_LEN: usize = 128;
const PAYLOAD_LEN: usize = 16 + 8 + 1;

/// Issues and checks challenges; see the [module docs](self). Stateless: replays are the
/// caller's to record.
#[derive(Debug)]
pub(crate) struct ProofOfWork {
    key: hmac::Key,
    difficulty: u8,
    ttl: Duration,
}

impl ProofOfWork {
    /// Challenges signed with `key`, requiring `difficulty` bits, valid for `ttl`.
    pub(crate) fn new(key: [u8; 32], difficulty: u8, ttl: Duration) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            difficulty,
            ttl,
        }
    }

    /// Whether proof of work is on.
    pub(crate) fn enabled(&self) -> bool {
        self.difficulty > 0
    }

    /// A fresh challenge.
    pub(crate) fn challenge(&self, now: u64) -> Challenge {
        let expires_at = now + self.ttl.as_secs();
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[..16].copy_from_slice(&crate::token::random_bytes::<16>());
        payload[16..24].copy_from_slice(&expires_at.to_be_bytes());
        payload[24] = self.difficulty;
        let tag = hmac::sign(&self.key, &payload);
        Challenge {
            challenge: format!(
                "v1.{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(tag.as_ref())
            ),
            difficulty: self.difficulty,
            algorithm: "SHA-256".to_owned(),
            expires_at,
        }
    }

    /// Checks a solution (signature, expiry, difficulty): returns when the challenge expires, the
    /// time until which it must be remembered as used.
    pub(crate) fn check(&self, solution: Option<&PowSolution>, now: u64) -> Result<u64, Error> {
        let invalid = |why: &'static str| Error::new(ErrorCode::PowInvalid, why);
        let Some(solution) = solution else {
            return Err(Error::new(
                ErrorCode::PowRequired,
                "proof of work is required: solve a challenge from GET /challenge",
            ));
        };
        if solution.nonce.len() > MAX_NONCE_LEN {
            return Err(invalid("the proof-of-work nonce is too long"));
        }
        let (expires_at, challenge_difficulty) = self
            .verify_challenge(&solution.challenge, now)
            .map_err(invalid)?;
        let required = challenge_difficulty.max(self.difficulty);
        let digest = Sha256::new()
            .chain_update(solution.challenge.as_bytes())
            .chain_update(solution.nonce.as_bytes())
            .finalize();
        if leading_zero_bits(&digest) < u32::from(required) {
            return Err(invalid(
                "the proof of work does not have enough leading zero bits",
            ));
        }
        Ok(expires_at)
    }
}

impl ProofOfWork {
    /// Checks that `challenge` is one this server issued (its HMAC) and unexpired: returns when
    /// it expires and the difficulty it was issued with. Also the nonce source of the
    /// attestation gates, whose evidence is bound to a challenge.
    pub(crate) fn verify_challenge(
        &self,
        challenge: &str,
        now: u64,
    ) -> Result<(u64, u8), &'static str> {
        let mut parts = challenge.split('.');
        let (Some("v1"), Some(payload), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the challenge is malformed");
        };
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .filter(|p| p.len() == PAYLOAD_LEN)
            .ok_or("the challenge is malformed")?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| "the challenge is malformed")?;
        hmac::verify(&self.key, &payload, &tag)
            .map_err(|_| "the challenge was not issued by this server")?;
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&payload[16..24]);
        let expires_at = u64::from_be_bytes(exp);
        if expires_at <= now {
            return Err("the challenge has expired: fetch a new one");
        }
        Ok((expires_at, payload[24]))
    }
}

/// Leading zero bits of a digest.
pub(crate) fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in digest {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// Finds a nonce for `challenge` (what a client does).
#[cfg(test)]
pub(crate) fn solve(challenge: &str, difficulty: u8) -> String {
    let prefix = Sha256::new().chain_update(challenge.as_bytes());
    let mut n: u64 = 0;
    loop {
        let nonce = n.to_string();
        let digest = prefix.clone().chain_update(nonce.as_bytes()).finalize();
        if leading_zero_bits(&digest) >= u32::from(difficulty) {
            return nonce;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn pow() -> ProofOfWork {
        ProofOfWork::new([1u8; 32], 12, Duration::from_secs(60))
    }

    fn solved(pow: &ProofOfWork) -> PowSolution {
        let c = pow.challenge(NOW);
        PowSolution {
            nonce: solve(&c.challenge, c.difficulty),
            challenge: c.challenge,
        }
    }

    fn code(r: Result<u64, Error>) -> ErrorCode {
        r.unwrap_err().code()
    }

    #[test]
    fn zero_bits() {
        assert_eq!(leading_zero_bits(&[0, 0x10]), 11);
        assert_eq!(leading_zero_bits(&[0x80]), 0);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
    }

    #[test]
    fn missing_is_required() {
        assert_eq!(code(pow().check(None, NOW)), ErrorCode::PowRequired);
    }

    #[test]
    fn correct_solution_is_accepted_until_expiry() {
        let pow = pow();
        let s = solved(&pow);
        assert_eq!(pow.check(Some(&s), NOW).unwrap(), NOW + 60);
        assert!(pow.check(Some(&s), NOW + 59).is_ok());
    }

    #[test]
    fn wrong_nonce_is_refused() {
        let pow = pow();
        let mut s = solved(&pow);
        // Find a nonce that fails.
        let mut n = 0u64;
        loop {
            s.nonce = format!("bad{n}");
            if pow.check(Some(&s), NOW).is_err() {
                break;
            }
            n += 1;
        }
        assert_eq!(code(pow.check(Some(&s), NOW)), ErrorCode::PowInvalid);
    }

    #[test]
    fn expired_is_refused() {
        let pow = pow();
        let s = solved(&pow);
        assert_eq!(code(pow.check(Some(&s), NOW + 61)), ErrorCode::PowInvalid);
    }

    #[test]
    fn forged_challenge_is_refused() {
        let pow = pow();
        let other = ProofOfWork::new([2u8; 32], 12, Duration::from_secs(60));
        let s = solved(&other);
        assert_eq!(code(pow.check(Some(&s), NOW)), ErrorCode::PowInvalid);
        // A payload edited to a lower difficulty breaks the MAC.
        let c = pow.challenge(NOW);
        let mut parts: Vec<String> = c.challenge.split('.').map(str::to_owned).collect();
        let mut payload = URL_SAFE_NO_PAD.decode(&parts[1]).unwrap();
        payload[24] = 0;
        parts[1] = URL_SAFE_NO_PAD.encode(payload);
        let forged = PowSolution {
            challenge: parts.join("."),
            nonce: "0".into(),
        };
        assert_eq!(code(pow.check(Some(&forged), NOW)), ErrorCode::PowInvalid);
    }

    #[test]
    fn too_few_bits_for_the_configured_difficulty() {
        let easy = ProofOfWork::new([1u8; 32], 1, Duration::from_secs(60));
        let c = easy.challenge(NOW);
        // Same key, but the server now asks 20 bits: a 1-bit solution that has < 20 bits fails.
        let hard = ProofOfWork::new([1u8; 32], 20, Duration::from_secs(60));
        let mut n = 0u64;
        let nonce = loop {
            let d = Sha256::new()
                .chain_update(c.challenge.as_bytes())
                .chain_update(n.to_string().as_bytes())
                .finalize();
            let z = leading_zero_bits(&d);
            if (1..20).contains(&z) {
                break n.to_string();
            }
            n += 1;
        };
        let s = PowSolution {
            challenge: c.challenge,
            nonce,
        };
        assert_eq!(code(hard.check(Some(&s), NOW)), ErrorCode::PowInvalid);
    }
}
