//! The proof of work of `POST /session`, solved as a client does: the benches' own solver
//! (`perishable-client` has one too, but it is not a dependency of this package).

use aws_lc_rs::digest::{Context, SHA256};

/// The first decimal nonce such that `SHA-256(challenge + nonce)` has at least `difficulty`
/// leading zero bits.
pub(crate) fn solve(challenge: &str, difficulty: u8) -> String {
    let mut prefix = Context::new(&SHA256);
    prefix.update(challenge.as_bytes());
    let mut n: u64 = 0;
    loop {
        let nonce = n.to_string();
        let mut context = prefix.clone();
        context.update(nonce.as_bytes());
        if leading_zero_bits(context.finish().as_ref()) >= u32::from(difficulty) {
            return nonce;
        }
        n += 1;
    }
}

fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in digest {
        if *byte != 0 {
            return bits + byte.leading_zeros();
        }
        bits += 8;
    }
    bits
}
