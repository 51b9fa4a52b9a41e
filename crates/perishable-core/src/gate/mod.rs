//! Mint gates backed by a real trust root: proofs checked with a third party the operator
//! trusts, before a session is minted.
//!
//! - [`oidc`]: an OpenID Connect ID token, verified against the issuer's published keys
//!   (discovery and a cached JWKS).
//! - [`captcha`]: a Turnstile, hCaptcha or reCAPTCHA token, redeemed at the provider's
//!   `siteverify` endpoint.
//!
//! Nothing calls them yet; each module says what its gate proves and what it does not.

pub(crate) mod captcha;
pub(crate) mod oidc;
