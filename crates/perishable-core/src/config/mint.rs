//! `[mint]`: which evidence a mint must show, and the sections of the gates.

use serde::Deserialize;

use super::{ConfigError, Secret};

/// `[mint]`: which evidence a mint must show (see "Mint policies and gates" in
/// `docs/protocol.md`).
///
/// `policies` lists alternatives, each a set of gates that must all pass. This version verifies
/// the `pow` and `entropy` gates; a policy naming another gate (`captcha`, `oidc`, `app_attest`,
/// `play_integrity`) is refused at build time rather than silently not checked. Their sections
/// are parsed, so a configuration file written for them loads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MintConfig {
    /// Alternatives, each a set of gates that must all pass. Default `[["pow", "entropy"]]`.
    pub policies: Vec<Vec<String>>,
    /// `[mint.captcha]`.
    pub captcha: CaptchaConfig,
    /// `[mint.oidc]`.
    pub oidc: OidcConfig,
    /// `[mint.app_attest]`.
    pub app_attest: AppAttestConfig,
    /// `[mint.play_integrity]`.
    pub play_integrity: PlayIntegrityConfig,
}

impl Default for MintConfig {
    fn default() -> Self {
        Self {
            policies: vec![vec!["pow".to_owned(), "entropy".to_owned()]],
            captcha: CaptchaConfig::default(),
            oidc: OidcConfig::default(),
            app_attest: AppAttestConfig::default(),
            play_integrity: PlayIntegrityConfig::default(),
        }
    }
}

/// The mint gates this version knows, and those it verifies.
const GATES: [&str; 6] = [
    "pow",
    "entropy",
    "captcha",
    "oidc",
    "app_attest",
    "play_integrity",
];
const VERIFIED_GATES: [&str; 2] = ["pow", "entropy"];

/// `[mint.captcha]` (the `captcha` gate of a later version).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CaptchaConfig {
    /// `turnstile`, `hcaptcha` or `recaptcha`.
    pub provider: String,
    /// The siteverify secret; better: `PERISHABLE_CAPTCHA_SECRET`.
    pub secret: Option<Secret>,
    /// The siteverify URL; empty: the provider's.
    pub verify_url: String,
    /// Accepted hostnames; empty: any.
    pub hostnames: Vec<String>,
    /// Lowest reCAPTCHA v3 score.
    pub min_score: Option<f64>,
}

/// `[mint.oidc]` (the `oidc` gate of a later version).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OidcConfig {
    /// The issuer (`iss`).
    pub issuer: String,
    /// The JWKS URL; empty: from discovery.
    pub jwks_url: String,
    /// The audience (`aud`).
    pub audience: String,
    /// Accepted algorithms.
    pub algorithms: Vec<String>,
    /// The claim that names the user's tier.
    pub tier_claim: String,
}

/// `[mint.app_attest]` (the `app_attest` gate of a later version).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AppAttestConfig {
    /// `TEAMID.bundle.id` values.
    pub app_ids: Vec<String>,
    /// Accept development attestations.
    pub development: bool,
    /// The root CA; empty: Apple's App Attest root.
    pub root_ca_pem: String,
}

/// `[mint.play_integrity]` (the `play_integrity` gate of a later version).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PlayIntegrityConfig {
    /// Accepted package names.
    pub package_names: Vec<String>,
    /// The decryption key from the Play Console (base64).
    pub decryption_key: Option<Secret>,
    /// The verification key from the Play Console (base64 DER).
    pub verification_key: Option<Secret>,
    /// Accepted signing-certificate digests.
    pub certificate_sha256: Vec<String>,
    /// The device verdict required.
    pub device_verdict: String,
}

/// The verified gates a mint policy names.
pub(super) struct Gates {
    pub(super) pow: bool,
    pub(super) entropy: bool,
}

impl MintConfig {
    /// Checks `mint.policies`: this version verifies a single alternative of `pow` and
    /// `entropy` gates. Returns which of the two the policy names; the builder switches the other
    /// off (`pow.difficulty = 0`, `session.min_entropy_score = 0`), as the protocol's default
    /// `[["pow", "entropy"]]` is version 1's behaviour.
    pub(super) fn validate(&self) -> Result<Gates, ConfigError> {
        const KEY: &str = "mint.policies";
        let policies = &self.policies;
        if policies.is_empty() || policies.iter().any(Vec::is_empty) {
            return Err(ConfigError::invalid(
                KEY,
                "list at least one policy, each with at least one gate",
            ));
        }
        for gate in policies.iter().flatten() {
            if !GATES.contains(&gate.as_str()) {
                return Err(ConfigError::invalid(
                    KEY,
                    format!("{gate:?} is not a gate (one of {GATES:?})"),
                ));
            }
            if !VERIFIED_GATES.contains(&gate.as_str()) {
                return Err(ConfigError::invalid(
                    KEY,
                    format!(
                        "the {gate:?} gate is not available in this version: only \"pow\" and \"entropy\" are verified"
                    ),
                ));
            }
        }
        let [policy] = policies.as_slice() else {
            return Err(ConfigError::invalid(
                KEY,
                "alternatives of the pow and entropy gates are not available in this version: list one policy",
            ));
        };
        Ok(Gates {
            pow: policy.iter().any(|g| g == "pow"),
            entropy: policy.iter().any(|g| g == "entropy"),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    #[test]
    fn mint_policies_of_the_verified_gates_apply_and_others_are_refused() {
        let base = || Config::builder().upstream_api_key("sk-test");
        let c = base().build().unwrap();
        assert_eq!(c.mint().policies, [["pow", "entropy"]]);
        assert_eq!(c.pow().difficulty, 16);
        assert_eq!(c.session().min_entropy_score, 50);
        // A policy without a gate switches it off.
        let c = base().mint_policies([["pow"]]).build().unwrap();
        assert_eq!(c.session().min_entropy_score, 0);
        assert_eq!(c.pow().difficulty, 16);
        let c = base().mint_policies([["entropy"]]).build().unwrap();
        assert_eq!(c.pow().difficulty, 0);
        // Gates this version does not verify are refused, never silently skipped.
        for policies in [
            vec![vec!["oidc"]],
            vec![vec!["captcha", "pow"]],
            vec![vec!["pow"], vec!["entropy"]],
            vec![vec!["nonsense"]],
            vec![vec![]],
            vec![],
        ] {
            let e = base().mint_policies(policies.clone()).build().unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        key: "mint.policies",
                        ..
                    }
                ),
                "{policies:?}: {e}"
            );
        }
    }
}
