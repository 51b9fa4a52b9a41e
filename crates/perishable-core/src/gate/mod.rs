//! Mint gates with a real trust root: verifiers of platform attestations that a client presents
//! before it may mint a session (issue #16).
//!
//! Each verifier is a pure function of its input, its configured trust material and the time: no
//! network, no state. Whatever must be remembered between calls (App Attest keys and their
//! counters, spent challenges) is the caller's to store.
//!
//! - [`app_attest`]: Apple App Attest attestations (a key generated in the Secure Enclave of a
//!   genuine Apple device, for one of our apps) and the assertions signed with such a key.
//! - [`play_integrity`]: Google Play Integrity verdicts, decrypted and verified locally.

pub(crate) mod app_attest;
pub(crate) mod play_integrity;
