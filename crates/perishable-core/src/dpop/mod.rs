//! DPoP (RFC 9449): sessions bound to a key the client holds.
//!
//! A client that sends a `DPoP` proof with `POST /session` gets a key-bound session: the token
//! carries `cnf.jkt`, the RFC 7638 thumbprint of the client's public key, and `token_type` is
//! `DPoP`. Every later request with that token must then say `Authorization: DPoP <token>` and
//! carry a fresh proof signed by the same key. A stolen token (with its fingerprint) is useless
//! without the private key, which a browser can keep non-extractable in WebCrypto.
//!
//! The session engine checks a proof, in order:
//!
//! 1. the proof is a compact JWS of at most 8 KiB;
//! 2. header `typ` is `dpop+jwt`, `alg` is asymmetric (`ES256` or `EdDSA`), `jwk` is a public
//!    key of the matching type (EC P-256, or OKP Ed25519) with no private or symmetric members;
//! 3. the signature verifies with that `jwk` (jsonwebtoken on aws-lc);
//! 4. `htm` equals the request method and `htu` the request URL without query or fragment: with
//!    `server.public_url` set, that URL plus the path below the mount point; otherwise the `Host`
//!    header and the request path (any scheme);
//! 5. `iat` is at most `session.dpop_max_age_secs` old and at most `session.leeway_secs` ahead;
//! 6. `ath` is the base64url SHA-256 of the access token, when a token is presented;
//! 7. the key's thumbprint equals the token's `cnf.jkt`, when the token is bound;
//! 8. the `jti` was never seen before for this key: the session engine records the key's
//!    thumbprint and the `jti` in the [`Store`](crate::store::Store) past the `iat` window, so a
//!    proof can never come back, on any instance sharing the store.
//!
//! A failed proof gets `invalid_dpop_proof` with `WWW-Authenticate: DPoP
//! error="invalid_dpop_proof"`: `401` on an authenticated request (RFC 9449 section 7.1), `400`
//! on the mint; a bound token without a proof, or sent with the `Bearer`
//! scheme, gets `401 dpop_required`.
//!
//! [`DpopSigner`] is the client side (what the browser client does with WebCrypto), for native
//! Rust clients and tests:
//!
//! ```
//! use perishable_core::dpop::DpopSigner;
//!
//! let key = DpopSigner::generate_es256();
//! // A proof for one request: its method, its URL, and the access token it comes with.
//! let proof = key.proof("POST", "https://api.example.com/ai/session", None);
//! assert_eq!(proof.split('.').count(), 3, "a compact JWS");
//! // A session minted with such a proof is bound to this thumbprint (`cnf.jkt`).
//! assert_eq!(key.thumbprint().len(), 43);
//! ```

mod signer;
mod verifier;

pub use signer::DpopSigner;
pub(crate) use verifier::{DpopVerifier, Expected, Htu, thumbprint};

/// A DPoP proof's replay record left to the upstream Service's admission (the session check's
/// deferring mode, `Perishable::proxy_verify_layer`): made in the same store call as the
/// rate-limit count and the reservation, before anything is forwarded. A replay found there is
/// `401 invalid_dpop_proof`.
#[derive(Debug, Clone)]
pub(crate) struct DeferredReplay {
    /// The proof's replay id (in [`Set::DpopSeen`](crate::store::Set::DpopSeen)).
    pub(crate) id: String,
    /// Until when it must stay recorded (Unix seconds).
    pub(crate) until: u64,
}

impl DeferredReplay {
    /// The refusal of a replayed proof.
    pub(crate) fn refusal() -> crate::error::Error {
        crate::error::Error::new(
            crate::error::ErrorCode::InvalidDpopProof,
            "the DPoP proof was already used (jti)",
        )
        .authenticating()
    }
}

/// The `DPoP` request header.
pub const DPOP_HEADER: http::HeaderName = http::HeaderName::from_static("dpop");

/// The URI the client asked for, before a router stripped a mount prefix. The axum router puts
/// it in the request extensions; DPoP uses it for `htu` when `server.public_url` is unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalUri(pub http::Uri);
