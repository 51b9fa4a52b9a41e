//! `[mint]`: which evidence a mint must show, and the sections of the gates.

use serde::Deserialize;

use super::{ConfigError, Secret};

/// `[mint]`: which evidence a mint must show (see "Mint policies and gates" in
/// `docs/protocol.md`).
///
/// `policies` lists alternatives, each a set of gates that must all pass: the built-in `pow`,
/// `entropy`, `captcha`, `oidc`, `app_attest` and `play_integrity`, and gates the app registers.
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

/// `[mint.captcha]` (the `captcha` gate).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CaptchaConfig {
    /// `turnstile` (the default), `hcaptcha` or `recaptcha`.
    pub provider: String,
    /// The siteverify secret; better: `PERISHABLE_CAPTCHA_SECRET`.
    pub secret: Option<Secret>,
    /// The siteverify URL; empty: the provider's.
    pub verify_url: String,
    /// Accepted hostnames; empty: any.
    pub hostnames: Vec<String>,
    /// Lowest reCAPTCHA v3 score (default 0.5).
    pub min_score: Option<f64>,
}

impl Default for CaptchaConfig {
    fn default() -> Self {
        Self {
            provider: "turnstile".to_owned(),
            secret: None,
            verify_url: String::new(),
            hostnames: Vec::new(),
            min_score: None,
        }
    }
}

/// `[mint.oidc]` (the `oidc` gate).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OidcConfig {
    /// The issuer (`iss`).
    pub issuer: String,
    /// The JWKS URL; empty: from discovery.
    pub jwks_url: String,
    /// The audience (`aud`).
    pub audience: String,
    /// Accepted algorithms (default `RS256`, `ES256`, `EdDSA`); an empty list is refused.
    pub algorithms: Vec<String>,
    /// The claim that names the user's tier.
    pub tier_claim: String,
}

impl Default for OidcConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            jwks_url: String::new(),
            audience: String::new(),
            algorithms: ["RS256", "ES256", "EdDSA"].map(str::to_owned).to_vec(),
            tier_claim: String::new(),
        }
    }
}

/// `[mint.app_attest]` (the `app_attest` gate: Apple App Attest, `docs/gates.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AppAttestConfig {
    /// The App IDs accepted, `TEAMID.bundle.id` (required when a policy names the gate).
    pub app_ids: Vec<String>,
    /// Accept keys attested in Apple's development environment too (builds signed for
    /// development). Off in production.
    pub development: bool,
    /// The trust root(s) of the certificate chain, PEM; empty: Apple's App Attestation Root CA.
    pub root_ca_pem: String,
    /// How long a registered key is remembered after its latest mint (default 365 days). An
    /// assertion by a key forgotten is refused: the app registers a new key.
    pub key_retention_secs: u64,
}

impl Default for AppAttestConfig {
    fn default() -> Self {
        Self {
            app_ids: Vec::new(),
            development: false,
            root_ca_pem: String::new(),
            key_retention_secs: DEFAULT_KEY_RETENTION_SECS,
        }
    }
}

/// `mint.app_attest.key_retention_secs` by default: a year.
const DEFAULT_KEY_RETENTION_SECS: u64 = 365 * 86_400;

/// `[mint.play_integrity]` (the `play_integrity` gate).
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

/// Which of the built-in `pow` and `entropy` gates the policies name.
pub(super) struct Gates {
    pub(super) pow: bool,
    pub(super) entropy: bool,
}

impl MintConfig {
    /// Checks `mint.policies`: at least one policy, each naming at least one gate, and the
    /// sections of the built-in gates they name. Returns whether `pow` and `entropy` are named:
    /// the builder switches a gate no policy names off (`pow.difficulty = 0`,
    /// `session.min_entropy_score = 0`). A name that is not built in must be a gate the app
    /// registers ([`PerishableBuilder::gate`](crate::PerishableBuilder::gate)); that is checked
    /// when the runtime is built.
    pub(super) fn validate(&self) -> Result<Gates, ConfigError> {
        const KEY: &str = "mint.policies";
        let policies = &self.policies;
        if policies.is_empty() || policies.iter().any(Vec::is_empty) {
            return Err(ConfigError::invalid(
                KEY,
                "list at least one policy, each with at least one gate",
            ));
        }
        let named = |gate: &str| policies.iter().flatten().any(|g| g == gate);
        if let Some(bad) = policies.iter().flatten().find(|g| {
            g.is_empty()
                || !g
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }) {
            return Err(ConfigError::invalid(
                KEY,
                format!("{bad:?} is not a gate name (letters, digits, '_' and '-')"),
            ));
        }
        if named("app_attest") {
            let a = &self.app_attest;
            if a.app_ids.is_empty() {
                return Err(ConfigError::Missing {
                    key: "mint.app_attest.app_ids",
                });
            }
            if let Some(bad) = a.app_ids.iter().find(|id| !is_app_id(id)) {
                return Err(ConfigError::invalid(
                    "mint.app_attest.app_ids",
                    format!("{bad:?} is not an App ID: \"TEAMID.bundle.id\""),
                ));
            }
            if a.key_retention_secs == 0 {
                return Err(ConfigError::invalid(
                    "mint.app_attest.key_retention_secs",
                    "must be above 0",
                ));
            }
        }
        if named("play_integrity") {
            let p = &self.play_integrity;
            if p.package_names.is_empty() {
                return Err(ConfigError::Missing {
                    key: "mint.play_integrity.package_names",
                });
            }
            if p.decryption_key.is_none() {
                return Err(ConfigError::Missing {
                    key: "mint.play_integrity.decryption_key",
                });
            }
            if p.verification_key.is_none() {
                return Err(ConfigError::Missing {
                    key: "mint.play_integrity.verification_key",
                });
            }
        }
        if named("captcha") {
            let c = &self.captcha;
            if !["turnstile", "hcaptcha", "recaptcha"].contains(&c.provider.as_str()) {
                return Err(ConfigError::invalid(
                    "mint.captcha.provider",
                    "must be \"turnstile\", \"hcaptcha\" or \"recaptcha\" when a policy names the captcha gate",
                ));
            }
            if c.secret.is_none() {
                return Err(ConfigError::Missing {
                    key: "mint.captcha.secret",
                });
            }
            if let Some(score) = c.min_score
                && !(0.0..=1.0).contains(&score)
            {
                return Err(ConfigError::invalid(
                    "mint.captcha.min_score",
                    "must be between 0.0 and 1.0",
                ));
            }
        }
        if named("oidc") {
            let o = &self.oidc;
            if o.issuer.is_empty() {
                return Err(ConfigError::Missing {
                    key: "mint.oidc.issuer",
                });
            }
            if o.audience.is_empty() {
                return Err(ConfigError::Missing {
                    key: "mint.oidc.audience",
                });
            }
        }
        Ok(Gates {
            pow: named("pow"),
            entropy: named("entropy"),
        })
    }
}

/// `TEAMID.bundle.id`: Apple's ten-character team id (upper-case letters and digits), a dot,
/// and a bundle id (letters, digits, `-` and `.`). The App ID is compared byte for byte (as
/// SHA-256) with the RP ID hash Apple certifies, so a typo would refuse every device.
fn is_app_id(id: &str) -> bool {
    match id.split_once('.') {
        Some((team, bundle)) => {
            team.len() == 10
                && team
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                && !bundle.is_empty()
                && bundle
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    #[test]
    fn mint_policies_name_their_gates_and_need_their_sections() {
        let base = || Config::builder().upstream_api_key("sk-test");
        let c = base().build().unwrap();
        assert_eq!(c.mint().policies, [["pow", "entropy"]]);
        assert_eq!(c.pow().difficulty, 16);
        assert_eq!(c.session().min_entropy_score, 50);
        // A gate no policy names is switched off.
        let c = base().mint_policies([["pow"]]).build().unwrap();
        assert_eq!(c.session().min_entropy_score, 0);
        assert_eq!(c.pow().difficulty, 16);
        let c = base().mint_policies([["entropy"]]).build().unwrap();
        assert_eq!(c.pow().difficulty, 0);
        // Alternatives: a gate named by any of them stays on.
        let c = base()
            .mint_policies(vec![vec!["pow"], vec!["entropy"]])
            .build()
            .unwrap();
        assert_eq!(
            (c.pow().difficulty, c.session().min_entropy_score),
            (16, 50)
        );
        // A name that is not built in may be the app's own gate (checked by the runtime).
        base().mint_policies([["invitation"]]).build().unwrap();
        // Malformed policies are refused.
        for policies in [vec![vec!["not a name"]], vec![vec![]], vec![]] {
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
        // A policy naming a gate needs that gate's section.
        let e = base().mint_policies([["oidc"]]).build().unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Missing {
                    key: "mint.oidc.issuer"
                }
            ),
            "{e}"
        );
        // The provider defaults to Turnstile; the secret has no default.
        let e = base()
            .mint_policies([["captcha", "pow"]])
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Missing {
                    key: "mint.captcha.secret"
                }
            ),
            "{e}"
        );
        let e = base()
            .mint_policies([["captcha", "pow"]])
            .mint_captcha_provider("recaptchaX")
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "mint.captcha.provider",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_sections_of_the_named_gates_are_checked() {
        let base = || Config::builder().upstream_api_key("sk-test");
        let captcha = || {
            base()
                .mint_policies([["captcha"]])
                .mint_captcha_provider("recaptcha")
                .mint_captcha_secret("s")
        };
        captcha().build().unwrap();
        for score in [-0.1, 1.5, f64::NAN] {
            let e = captcha().mint_captcha_min_score(score).build().unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        key: "mint.captcha.min_score",
                        ..
                    }
                ),
                "{score}: {e}"
            );
        }
        let e = base()
            .mint_policies([["captcha"]])
            .mint_captcha_provider("recaptcha")
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Missing {
                    key: "mint.captcha.secret"
                }
            ),
            "{e}"
        );

        let play = || base().mint_policies([["play_integrity"]]);
        let e = play().build().unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Missing {
                    key: "mint.play_integrity.package_names"
                }
            ),
            "{e}"
        );
        let e = play()
            .mint_play_integrity_package_names(["com.example.app"])
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Missing {
                    key: "mint.play_integrity.decryption_key"
                }
            ),
            "{e}"
        );
        let e = play()
            .mint_play_integrity_package_names(["com.example.app"])
            .mint_play_integrity_decryption_key("a2V5")
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Missing {
                    key: "mint.play_integrity.verification_key"
                }
            ),
            "{e}"
        );
        // App Attest: the App IDs are required, and must look like ones; the retention too.
        let attest = || base().mint_policies([["app_attest"]]);
        let e = attest().build().unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Missing {
                    key: "mint.app_attest.app_ids"
                }
            ),
            "{e}"
        );
        attest()
            .mint_app_attest_app_ids(["ABCDE12345.com.example.app"])
            .build()
            .unwrap();
        for bad in [
            "com.example.app",
            "nodot",
            ".com.example",
            "abcde12345.com.example.app",
            "ABCDE12345.",
            "ABCDE12345.com example",
        ] {
            let e = attest().mint_app_attest_app_ids([bad]).build().unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        key: "mint.app_attest.app_ids",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        let e = attest()
            .mint_app_attest_app_ids(["ABCDE12345.com.example.app"])
            .mint_app_attest_key_retention_secs(0)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "mint.app_attest.key_retention_secs",
                    ..
                }
            ),
            "{e}"
        );
        let c = Config::from_toml_str(
            "[upstream]\napi_key = \"sk\"\n[mint]\npolicies = [[\"app_attest\"]]\n\
             [mint.app_attest]\napp_ids = [\"ABCDE12345.com.example.app\"]\ndevelopment = true\n",
        )
        .unwrap();
        assert!(c.mint().app_attest.development);
        assert_eq!(c.mint().app_attest.key_retention_secs, 365 * 86_400);

        // A gate no policy names needs nothing.
        base().mint_captcha_min_score(7.0).build().unwrap();
    }

    #[test]
    fn a_tier_sets_only_what_applies_per_tier() {
        let ok = Config::from_toml_str(
            "[upstream]\napi_key = \"sk\"\n[budget.tiers.pro]\ntokens_per_window = 10\npoints = 5\nmax_completion_tokens = 7\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let config = ok.unwrap();
        assert_eq!(config.budget().tiers["pro"].points, Some(5));
        assert_eq!(config.budget().tiers["pro"].max_completion_tokens, Some(7));
        let e =
            Config::from_toml_str("[upstream]\napi_key = \"sk\"\n[budget.tiers.pro]\npoints = 0\n")
                .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "budget.tiers",
                    ..
                }
            ),
            "{e}"
        );
    }
}
