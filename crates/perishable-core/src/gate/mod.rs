//! Mint gates: the evidence `POST /session` must show, combined by policy (`mint.policies`; see
//! "Mint policies and gates" in `docs/protocol.md` and `docs/gates.md`).
//!
//! A mint passes when every gate of at least one policy passes. The built-in gates:
//!
//! | gate | evidence in the mint body | what it proves |
//! |---|---|---|
//! | `pow` | `pow` | the client spent CPU on this mint ([`crate::pow`]) |
//! | `entropy` | `entropy` | the samples look like a hand, scored on the server ("Interaction entropy" in [`docs/security.md`][security]) |
//! | `captcha` | `captcha` | a Turnstile, hCaptcha or reCAPTCHA token the provider accepted, once |
//! | `oidc` | `id_token` | a user signed in at the configured OpenID Connect issuer; the session carries `usr` |
//! | `play_integrity` | `attestation` (`play-integrity`) | your Android app, from Google Play, on a device meeting device integrity, bound to a challenge |
//! | `app_attest` | `attestation` (`apple-app-attest`) | your iOS app, signed by your team, on a genuine Apple device: a Secure Enclave key Apple attested once, then assertions by that key, each bound to a challenge |
//!
//! [security]: https://github.com/perishable-rs/perishable/blob/main/docs/security.md#interaction-entropy
//!
//! A gate may establish [`Facts`]: the user (`usr` in the token, base64url SHA-256 of the ID
//! token's `iss` and `sub`; rate limits, session caps and client budgets then key on it) and the
//! user's tier (`budget.tiers.NAME`). Without a user, a session minted through `app_attest` keys
//! on its attested key the same way (`usr` is then a hash of the key identifier).
//!
//! An app adds a gate of its own by implementing [`Gate`] and registering it with
//! [`PerishableBuilder::gate`](crate::PerishableBuilder::gate); a policy names it by
//! [`Gate::name`].
//!
//! ```
//! use perishable_core::gate::{Evidence, Facts, Gate, GateFuture};
//! use perishable_core::{Config, Error, ErrorCode, Perishable};
//!
//! /// Admits mints that carry the invitation code of a closed beta.
//! #[derive(Debug)]
//! struct Invitation;
//!
//! impl Gate for Invitation {
//!     fn name(&self) -> &str {
//!         "invitation"
//!     }
//!
//!     fn check<'a>(&'a self, evidence: &'a Evidence<'a>) -> GateFuture<'a> {
//!         let code = evidence.field("invitation").and_then(|v| v.as_str());
//!         let outcome = match code {
//!             Some("BETA-2026") => Ok(Facts::default()),
//!             _ => Err(Error::new(ErrorCode::InvalidJson, "an invitation code is required")),
//!         };
//!         Box::pin(std::future::ready(outcome))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builder()
//!     .upstream_api_key("sk-...")
//!     .mint_policies([["invitation", "pow"]])
//!     .build()?;
//! let perishable = Perishable::builder(config).gate(Invitation).build()?;
//! # let _ = perishable; Ok(()) }
//! ```

pub(crate) mod app_attest;
pub(crate) mod captcha;
mod fetch;
pub(crate) mod oidc;
// Some fields of a verdict are read only by the tests (the licensing verdict, the version).
#[allow(dead_code)]
pub(crate) mod play_integrity;
mod policy;

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use http::HeaderMap;
use serde_json::{Map, Value};

pub(crate) use self::policy::{BUILT_IN, Builtins, Policies};
use crate::error::Error;

/// What a mint request shows the gates: its body, its headers and the client's IP.
#[derive(Debug)]
pub struct Evidence<'a> {
    pub(crate) fingerprint: &'a str,
    pub(crate) body: &'a Map<String, Value>,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) client_ip: Option<IpAddr>,
}

impl<'a> Evidence<'a> {
    /// The client's fingerprint, as sent (validated: 8 to 512 printable ASCII characters).
    pub fn fingerprint(&self) -> &'a str {
        self.fingerprint
    }

    /// A member of the `POST /session` body, by name (`"id_token"`, `"captcha"`, or a member
    /// of your own).
    pub fn field(&self, name: &str) -> Option<&'a Value> {
        self.body.get(name)
    }

    /// The request's headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The client's IP, as the per-IP limits see it (`server.trusted_proxies`).
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }
}

/// What a gate established about the client, beyond passing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Facts {
    /// A stable, opaque user id (no personal data: hash it). The session carries it as `usr`,
    /// and limits, caps and client budgets key on it.
    pub user: Option<String>,
    /// The user's tier, selecting `[budget.tiers.NAME]`.
    pub tier: Option<String>,
}

impl Facts {
    /// Facts naming a user.
    pub fn user(id: impl Into<String>) -> Self {
        Self {
            user: Some(id.into()),
            tier: None,
        }
    }

    /// These facts with a tier.
    #[must_use]
    pub fn with_tier(mut self, tier: impl Into<String>) -> Self {
        self.tier = Some(tier.into());
        self
    }
}

/// The future of [`Gate::check`].
pub type GateFuture<'a> = Pin<Box<dyn Future<Output = Result<Facts, Error>> + Send + 'a>>;

/// A mint gate: checks the evidence of a `POST /session` request.
///
/// Refuse with an [`Error`] whose code says what is wrong (its status and message reach the
/// client). A gate's result is computed once per mint, even when several policies name it.
pub trait Gate: Send + Sync + fmt::Debug + 'static {
    /// The name policies use (`mint.policies`). Not one of the built-in names.
    fn name(&self) -> &str;

    /// Checks the evidence.
    fn check<'a>(&'a self, evidence: &'a Evidence<'a>) -> GateFuture<'a>;
}
