//! The proof of work of `POST /session`: find a `nonce` such that `SHA-256(challenge + nonce)`
//! (the two UTF-8 strings concatenated) has at least `difficulty` leading zero bits.
//!
//! [`Client`](crate::Client) does this on a blocking thread (`tokio::task::spawn_blocking`);
//! these functions are public for other clients and tests. At 16 bits a phone does about
//! 65,000 hashes: milliseconds.
//!
//! ```
//! use perishable_client::pow::{leading_zero_bits, solve};
//! use sha2::{Digest, Sha256};
//!
//! let nonce = solve("v1.example-challenge", 8);
//! let digest = Sha256::digest(format!("v1.example-challenge{nonce}"));
//! assert!(leading_zero_bits(&digest) >= 8);
//! ```

use std::fmt::Write as _;
use std::time::Instant;

use sha2::{Digest, Sha256};

/// Leading zero bits of `digest`.
pub fn leading_zero_bits(digest: &[u8]) -> u32 {
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

/// The first decimal nonce that solves `challenge` at `difficulty`. Runs until it finds one: at
/// difficulties a server really uses (8 to 24) that is quick, but it blocks the thread, so call
/// it off an async runtime's worker threads.
pub fn solve(challenge: &str, difficulty: u8) -> String {
    let mut n = 0u64;
    loop {
        if let Some(nonce) = search(challenge, difficulty, n, 1 << 16) {
            return nonce;
        }
        n += 1 << 16;
    }
}

/// [`solve`], giving up (`None`) once `deadline` has passed.
pub(crate) fn solve_until(challenge: &str, difficulty: u8, deadline: Instant) -> Option<String> {
    let mut n = 0u64;
    loop {
        if let Some(nonce) = search(challenge, difficulty, n, 1 << 14) {
            return Some(nonce);
        }
        if Instant::now() >= deadline {
            return None;
        }
        n += 1 << 14;
    }
}

/// The first nonce in `[start, start + count)` that solves the challenge.
fn search(challenge: &str, difficulty: u8, start: u64, count: u64) -> Option<String> {
    let prefix = Sha256::new().chain_update(challenge.as_bytes());
    let mut nonce = String::with_capacity(20);
    for n in start..start.saturating_add(count) {
        nonce.clear();
        let _ = write!(nonce, "{n}");
        let digest = prefix.clone().chain_update(nonce.as_bytes()).finalize();
        if leading_zero_bits(&digest) >= u32::from(difficulty) {
            return Some(nonce);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_leading_zero_bits() {
        assert_eq!(leading_zero_bits(&[0, 0, 0x80]), 16);
        assert_eq!(leading_zero_bits(&[0, 0x01]), 15);
        assert_eq!(leading_zero_bits(&[0xff]), 0);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
    }

    #[test]
    fn solves_and_gives_up_at_the_deadline() {
        for difficulty in [0, 1, 8, 12] {
            let nonce = solve("v1.abc.def", difficulty);
            let digest = Sha256::digest(format!("v1.abc.def{nonce}"));
            assert!(leading_zero_bits(&digest) >= u32::from(difficulty));
        }
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(solve_until("v1.abc.def", 200, past), None);
    }
}
