//! `mint.policies`: alternatives of gates, evaluated lazily, each gate at most once per mint.

use std::sync::Arc;

use super::app_attest::{AppAttestGate, AppAttestPassed, AppAttestPolicy};
use super::captcha::{CaptchaError, CaptchaSettings, CaptchaVerifier, Provider};
use super::oidc::{OidcSettings, OidcVerifier};
use super::play_integrity::{PlayIntegrityKeys, PlayIntegrityPolicy, verify_token};
use super::{Evidence, Facts, Gate};
use crate::config::{Config, ConfigError};
use crate::error::{Error, ErrorCode};
use crate::pow::{PowSolution, ProofOfWork};
use crate::store::Store;

/// The built-in gate names.
pub(crate) const BUILT_IN: [&str; 6] = [
    "pow",
    "entropy",
    "captcha",
    "oidc",
    "app_attest",
    "play_integrity",
];

/// One gate of the policies.
enum Kind {
    Entropy,
    Pow,
    Custom(Arc<dyn Gate>),
    Captcha(Box<CaptchaVerifier>),
    Oidc(Box<OidcVerifier>),
    PlayIntegrity(Box<(PlayIntegrityKeys, PlayIntegrityPolicy)>),
    AppAttest(Box<AppAttestGate>),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Entropy => "Entropy",
            Self::Pow => "Pow",
            Self::Custom(_) => "Custom",
            Self::Captcha(_) => "Captcha",
            Self::Oidc(_) => "Oidc",
            Self::PlayIntegrity(_) => "PlayIntegrity",
            Self::AppAttest(_) => "AppAttest",
        })
    }
}

impl Kind {
    /// Cheap gates first: a mint refused by the interaction samples or the proof of work costs
    /// no call to a provider, nor a read of the store.
    fn rank(&self) -> u8 {
        match self {
            Self::Entropy => 0,
            Self::Pow => 1,
            Self::Custom(_) => 2,
            // Local checks (an assertion also reads the store once).
            Self::PlayIntegrity(_) | Self::AppAttest(_) => 3,
            Self::Captcha(_) => 4,
            Self::Oidc(_) => 5,
        }
    }
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: Kind,
}

/// The mint policies of a configuration, with the verifier of each gate they name.
#[derive(Debug)]
pub(crate) struct Policies {
    gates: Vec<Entry>,
    /// Each alternative: indices into `gates`, cheapest first.
    alternatives: Vec<Vec<usize>>,
    /// Each alternative's name: its gates as configured, joined with `+`.
    labels: Vec<String>,
}

/// What the built-in `pow` and `entropy` gates read, from the mint.
pub(crate) struct Builtins<'a> {
    pub(crate) pow: &'a ProofOfWork,
    pub(crate) solution: Option<&'a PowSolution>,
    pub(crate) entropy_score: u8,
    pub(crate) min_entropy_score: u8,
    pub(crate) now: u64,
    /// The store, which the `app_attest` gate reads (registered keys).
    pub(crate) store: &'a dyn Store,
}

/// How long a captcha token that minted is remembered: longer than any provider keeps one
/// valid (Turnstile 300 s, reCAPTCHA and hCaptcha 120 s).
const CAPTCHA_TOKEN_MEMORY_SECS: u64 = 600;

/// What the gates that ran leave for the mint to record, should their policy pass.
#[derive(Default)]
struct Effects {
    pow_used: Option<(String, u64)>,
    attestation_used: Option<(String, u64)>,
    captcha_used: Option<(String, u64)>,
    app_attest: Option<AppAttestPassed>,
}

/// A mint that passed a policy.
#[derive(Debug)]
pub(crate) struct Passed {
    /// The policy that passed: its gates as configured, joined with `+` (`"pow+entropy"`).
    pub(crate) policy: String,
    /// What its gates established.
    pub(crate) facts: Facts,
    /// The proof-of-work challenge to record as used, and until when (when `pow` passed).
    pub(crate) pow_used: Option<(String, u64)>,
    /// The challenge an attestation was bound to, to record as used, and until when.
    pub(crate) attestation_used: Option<(String, u64)>,
    /// The captcha token (its hash) to record as used, and until when (when `captcha` passed).
    pub(crate) captcha_used: Option<(String, u64)>,
    /// The App Attest key to register, or whose counter to raise (when `app_attest` passed).
    pub(crate) app_attest: Option<AppAttestPassed>,
}

impl Policies {
    /// The policies of `config`, with `custom` gates for names that are not built in.
    pub(crate) fn new(config: &Config, custom: &[Arc<dyn Gate>]) -> Result<Self, ConfigError> {
        const KEY: &str = "mint.policies";
        let mint = config.mint();
        let mut gates: Vec<Entry> = Vec::new();
        let mut alternatives = Vec::new();
        let mut labels = Vec::new();
        for policy in &mint.policies {
            labels.push(policy.join("+"));
            let mut indices = Vec::new();
            for name in policy {
                let index = match gates.iter().position(|g| &g.name == name) {
                    Some(index) => index,
                    None => {
                        let kind = match name.as_str() {
                            "pow" => Kind::Pow,
                            "entropy" => Kind::Entropy,
                            "captcha" => Kind::Captcha(Box::new(captcha(config)?)),
                            "oidc" => Kind::Oidc(Box::new(oidc(config)?)),
                            "play_integrity" => {
                                Kind::PlayIntegrity(Box::new(play_integrity(config)?))
                            }
                            "app_attest" => Kind::AppAttest(Box::new(app_attest(config)?)),
                            other => match custom.iter().find(|g| g.name() == other) {
                                Some(gate) => Kind::Custom(gate.clone()),
                                None => {
                                    return Err(ConfigError::invalid(
                                        KEY,
                                        format!(
                                            "{other:?} is neither a built-in gate ({BUILT_IN:?}) \
                                             nor one registered with PerishableBuilder::gate"
                                        ),
                                    ));
                                }
                            },
                        };
                        gates.push(Entry {
                            name: name.clone(),
                            kind,
                        });
                        gates.len() - 1
                    }
                };
                if !indices.contains(&index) {
                    indices.push(index);
                }
            }
            indices.sort_by_key(|&i| gates[i].kind.rank());
            alternatives.push(indices);
        }
        Ok(Self {
            gates,
            alternatives,
            labels,
        })
    }

    /// Checks the policies in order, each gate at most once, until one passes.
    ///
    /// When none does, the refusal is the first failure about evidence the client sent (an
    /// invalid proof, a refused captcha, a provider that cannot be reached); else the first
    /// `insufficient_entropy` (a trace is never missing, but a low score says less than a
    /// refused captcha); else the first policy's missing evidence.
    pub(crate) async fn check(
        &self,
        evidence: &Evidence<'_>,
        builtins: &Builtins<'_>,
    ) -> Result<Passed, Error> {
        // Each gate's outcome, by index: computed once per mint.
        let mut outcomes: Vec<Option<Result<Facts, Error>>> = vec![None; self.gates.len()];
        let mut effects = Effects::default();
        let mut refusals: Vec<Error> = Vec::new();
        for (alternative, label) in self.alternatives.iter().zip(&self.labels) {
            let mut facts = Facts::default();
            let mut failed = None;
            for &index in alternative {
                if outcomes[index].is_none() {
                    let entry = &self.gates[index];
                    let outcome = self.run(entry, evidence, builtins, &mut effects).await;
                    metrics::counter!(
                        "perishable_mint_gates_total",
                        "gate" => gate_label(&entry.name),
                        "outcome" => if outcome.is_ok() { "passed" } else { "refused" }
                    )
                    .increment(1);
                    outcomes[index] = Some(outcome);
                }
                match outcomes[index].as_ref().expect("computed above") {
                    Ok(found) => {
                        facts.user = facts.user.or_else(|| found.user.clone());
                        facts.tier = facts.tier.or_else(|| found.tier.clone());
                    }
                    Err(refusal) => {
                        failed = Some(refusal.clone());
                        break;
                    }
                }
            }
            match failed {
                None => {
                    let policy = label.clone();
                    let has = |kind: fn(&Kind) -> bool| {
                        alternative.iter().any(|&i| kind(&self.gates[i].kind))
                    };
                    let pow_used = has(|k| matches!(k, Kind::Pow))
                        .then_some(effects.pow_used)
                        .flatten();
                    let attestation_used =
                        has(|k| matches!(k, Kind::PlayIntegrity(_) | Kind::AppAttest(_)))
                            .then_some(effects.attestation_used)
                            .flatten();
                    let captcha_used = has(|k| matches!(k, Kind::Captcha(_)))
                        .then_some(effects.captcha_used)
                        .flatten();
                    let app_attest = has(|k| matches!(k, Kind::AppAttest(_)))
                        .then_some(effects.app_attest)
                        .flatten();
                    // An identity gate's user comes first; else the session keys on the
                    // attested key, which a client cannot invent like a fingerprint.
                    if let Some(passed) = &app_attest {
                        facts.user = facts.user.or_else(|| Some(passed.user.clone()));
                    }
                    return Ok(Passed {
                        policy,
                        facts,
                        pow_used,
                        attestation_used,
                        captcha_used,
                        app_attest,
                    });
                }
                Some(refusal) => refusals.push(refusal),
            }
        }
        let missing = |e: &Error| {
            matches!(
                e.code(),
                ErrorCode::PowRequired
                    | ErrorCode::CaptchaRequired
                    | ErrorCode::IdTokenRequired
                    | ErrorCode::AttestationRequired
            )
        };
        let low_score = |e: &Error| e.code() == ErrorCode::InsufficientEntropy;
        let shown = refusals.iter().position(|e| !missing(e) && !low_score(e));
        match shown.or_else(|| refusals.iter().position(low_score)) {
            Some(i) => Err(refusals.swap_remove(i)),
            None => Err(refusals.into_iter().next().unwrap_or_else(|| {
                Error::new(ErrorCode::InvalidJson, "no mint policy is configured")
            })),
        }
    }

    async fn run(
        &self,
        entry: &Entry,
        evidence: &Evidence<'_>,
        builtins: &Builtins<'_>,
        effects: &mut Effects,
    ) -> Result<Facts, Error> {
        match &entry.kind {
            Kind::Entropy => {
                let score = builtins.entropy_score;
                if score < builtins.min_entropy_score {
                    return Err(Error::new(
                        ErrorCode::InsufficientEntropy,
                        format!(
                            "not enough interaction to mint a session (score {score}, needs {})",
                            builtins.min_entropy_score
                        ),
                    ));
                }
                Ok(Facts::default())
            }
            Kind::Pow => {
                if builtins.pow.enabled() {
                    let until = builtins.pow.check(builtins.solution, builtins.now)?;
                    effects.pow_used = builtins.solution.map(|s| (s.challenge.clone(), until));
                }
                Ok(Facts::default())
            }
            Kind::Custom(gate) => gate.check(evidence).await,
            Kind::PlayIntegrity(gate) => {
                let (keys, policy) = &**gate;
                let (token, challenge) = attestation(evidence, "play-integrity")?;
                let (until, _) = builtins
                    .pow
                    .verify_challenge(challenge, builtins.now)
                    .map_err(|why| Error::new(ErrorCode::AttestationInvalid, why))?;
                // The app asks Play Integrity for a verdict with this request hash.
                let request_hash = crate::fingerprint::hash(challenge);
                verify_token(
                    token,
                    keys,
                    policy,
                    &request_hash,
                    std::time::SystemTime::now(),
                )
                .map_err(|e| Error::new(ErrorCode::AttestationInvalid, e.to_string()))?;
                effects.attestation_used = Some((format!("attest:{challenge}"), until));
                Ok(Facts::default())
            }
            Kind::AppAttest(gate) => {
                let passed = gate
                    .check(
                        evidence.field("attestation"),
                        builtins.pow,
                        builtins.store,
                        builtins.now,
                    )
                    .await?;
                effects.attestation_used = Some(passed.challenge.clone());
                effects.app_attest = Some(passed);
                Ok(Facts::default())
            }
            Kind::Captcha(verifier) => {
                let token = match evidence.field("captcha") {
                    None | Some(serde_json::Value::Null) => {
                        return Err(Error::new(
                            ErrorCode::CaptchaRequired,
                            "this service needs a captcha: send \"captcha\": \"<token>\"",
                        ));
                    }
                    Some(serde_json::Value::String(token)) => token,
                    Some(_) => {
                        return Err(Error::new(
                            ErrorCode::CaptchaInvalid,
                            "captcha must be the provider's token, a string",
                        ));
                    }
                };
                match verifier.verify(token, evidence.client_ip()).await {
                    Ok(_) => {
                        // Single use here too, whatever the provider says of a token seen
                        // twice: recorded (hashed) by the mint, for longer than any provider
                        // keeps a token valid.
                        effects.captcha_used = Some((
                            format!("captcha:{}", crate::fingerprint::hash(token)),
                            builtins.now + CAPTCHA_TOKEN_MEMORY_SECS,
                        ));
                        Ok(Facts::default())
                    }
                    Err(CaptchaError::Empty) => Err(Error::new(
                        ErrorCode::CaptchaRequired,
                        "this service needs a captcha: send \"captcha\": \"<token>\"",
                    )),
                    Err(e) if e.is_server_side() => {
                        tracing::warn!(target: "perishable::gate", error = %e, "captcha gate: provider unavailable");
                        Err(Error::new(
                            ErrorCode::UpstreamUnavailable,
                            "the captcha provider could not be reached: try again shortly",
                        ))
                    }
                    Err(e) => Err(Error::new(ErrorCode::CaptchaInvalid, e.to_string())),
                }
            }
            Kind::Oidc(verifier) => {
                let token = match evidence.field("id_token") {
                    None | Some(serde_json::Value::Null) => {
                        return Err(Error::new(
                            ErrorCode::IdTokenRequired,
                            "this service needs the signed-in user's ID token: send \"id_token\"",
                        ));
                    }
                    Some(serde_json::Value::String(token)) => token,
                    Some(_) => {
                        return Err(Error::new(
                            ErrorCode::InvalidIdToken,
                            "id_token must be a JWT, a string",
                        ));
                    }
                };
                match verifier.verify(token).await {
                    Ok(identity) => Ok(Facts {
                        user: Some(identity.user_id()),
                        tier: identity.tier,
                    }),
                    Err(e) if e.is_server_side() => {
                        tracing::warn!(target: "perishable::gate", error = %e, "oidc gate: issuer unavailable");
                        Err(Error::new(
                            ErrorCode::UpstreamUnavailable,
                            "the identity provider could not be reached: try again shortly",
                        ))
                    }
                    Err(e) => Err(Error::new(ErrorCode::InvalidIdToken, e.to_string())),
                }
            }
        }
    }
}

/// The metric label of a gate: the built-in names as they are, every custom gate as `custom`
/// (names are the app's, and labels must stay few).
fn gate_label(name: &str) -> &'static str {
    BUILT_IN
        .iter()
        .find(|b| **b == name)
        .copied()
        .unwrap_or("custom")
}

fn captcha(config: &Config) -> Result<CaptchaVerifier, ConfigError> {
    let c = &config.mint().captcha;
    let provider = match c.provider.as_str() {
        "turnstile" => Provider::Turnstile,
        "hcaptcha" => Provider::Hcaptcha,
        "recaptcha" => Provider::Recaptcha,
        other => {
            return Err(ConfigError::invalid(
                "mint.captcha.provider",
                format!(
                    "{other:?} is not a provider: \"turnstile\", \"hcaptcha\" or \"recaptcha\""
                ),
            ));
        }
    };
    let secret = c.secret.clone().ok_or(ConfigError::Missing {
        key: "mint.captcha.secret",
    })?;
    let mut settings = CaptchaSettings::new(provider, secret);
    if !c.verify_url.is_empty() {
        settings.verify_url = Some(c.verify_url.clone());
    }
    settings.hostnames = c.hostnames.clone();
    if let Some(min) = c.min_score {
        settings.min_score = min;
    }
    CaptchaVerifier::new(settings)
}

fn oidc(config: &Config) -> Result<OidcVerifier, ConfigError> {
    // `MintConfig::validate` made sure the issuer and the audience are set.
    let o = &config.mint().oidc;
    let mut settings = OidcSettings::new(o.issuer.clone(), o.audience.clone());
    if !o.jwks_url.is_empty() {
        settings.jwks_url = Some(o.jwks_url.clone());
    }
    // Empty is refused by the verifier, not taken for the default.
    settings.algorithms = o
        .algorithms
        .iter()
        .map(|a| {
            a.parse::<jsonwebtoken::Algorithm>().map_err(|_| {
                ConfigError::invalid("mint.oidc.algorithms", format!("{a:?} is not an algorithm"))
            })
        })
        .collect::<Result<_, _>>()?;
    if !o.tier_claim.is_empty() {
        settings.tier_claim = Some(o.tier_claim.clone());
    }
    OidcVerifier::new(settings)
}

/// The `token` and `challenge` of a mint's `attestation` of `format`.
fn attestation<'a>(evidence: &Evidence<'a>, format: &str) -> Result<(&'a str, &'a str), Error> {
    let required = || {
        Error::new(
            ErrorCode::AttestationRequired,
            format!(
                "this service needs a platform attestation: send \"attestation\": \
                 {{\"format\": \"{format}\", \"token\": ..., \"challenge\": ...}}"
            ),
        )
    };
    let Some(serde_json::Value::Object(object)) = evidence.field("attestation") else {
        return Err(required());
    };
    if object.get("format").and_then(serde_json::Value::as_str) != Some(format) {
        return Err(required());
    }
    let field = |name: &str| {
        object
            .get(name)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::AttestationInvalid,
                    format!("attestation.{name} must be a string"),
                )
            })
    };
    Ok((field("token")?, field("challenge")?))
}

fn app_attest(config: &Config) -> Result<AppAttestGate, ConfigError> {
    // `MintConfig::validate` made sure the App IDs are listed and the retention is above 0.
    let a = &config.mint().app_attest;
    let mut policy = AppAttestPolicy::new(a.app_ids.clone());
    policy.development = a.development;
    if !a.root_ca_pem.trim().is_empty() {
        policy.roots = root_certificates(&a.root_ca_pem)?;
    }
    if policy.roots.is_empty() {
        // Apple's root is compiled in and tested; never reached.
        return Err(ConfigError::invalid(
            "mint.app_attest.root_ca_pem",
            "Apple's App Attest root CA does not parse",
        ));
    }
    Ok(AppAttestGate {
        policy,
        retention_secs: a.key_retention_secs,
    })
}

/// The certificates of `mint.app_attest.root_ca_pem`: at least one, each a usable trust anchor.
fn root_certificates(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    const KEY: &str = "mint.app_attest.root_ca_pem";
    let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ConfigError::invalid(KEY, "is not PEM"))?;
    if roots.is_empty() {
        return Err(ConfigError::invalid(
            KEY,
            "holds no \"-----BEGIN CERTIFICATE-----\" section",
        ));
    }
    for root in &roots {
        webpki::anchor_from_trusted_cert(root)
            .map_err(|_| ConfigError::invalid(KEY, "holds a certificate that is not X.509 DER"))?;
    }
    Ok(roots)
}

fn play_integrity(
    config: &Config,
) -> Result<(PlayIntegrityKeys, PlayIntegrityPolicy), ConfigError> {
    let p = &config.mint().play_integrity;
    let key = |key: &'static str, value: &Option<crate::config::Secret>| {
        value
            .as_ref()
            .map(|s| s.expose().to_owned())
            .ok_or(ConfigError::Missing { key })
    };
    let keys = PlayIntegrityKeys::new(
        &key("mint.play_integrity.decryption_key", &p.decryption_key)?,
        &key("mint.play_integrity.verification_key", &p.verification_key)?,
    )
    .map_err(|e| ConfigError::invalid("mint.play_integrity", e.to_string()))?;
    let mut policy = PlayIntegrityPolicy::new(p.package_names.clone());
    policy.certificate_sha256 = p.certificate_sha256.clone();
    if !p.device_verdict.is_empty() {
        policy.device_verdict = p.device_verdict.clone();
    }
    Ok((keys, policy))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use http::HeaderMap;
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    fn play_integrity_config() -> Config {
        let signing = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let spki = signing.public_key().as_der().unwrap();
        Config::builder()
            .upstream_api_key("sk-test")
            .mint_policies([["play_integrity"]])
            .mint_play_integrity_package_names(["com.example.app"])
            .mint_play_integrity_decryption_key(STANDARD.encode([7u8; 32]))
            .mint_play_integrity_verification_key(STANDARD.encode(spki.as_ref()))
            .build()
            .unwrap()
    }

    /// Any JSON value, a few levels deep.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,40}".prop_map(Value::String),
            Just(Value::String("play-integrity".to_owned())),
            Just(Value::String("apple-app-attest".to_owned())),
            Just(Value::String("v1.AAAA.AAAA".to_owned())),
            Just(Value::String(STANDARD.encode([0u8; 32]))),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("format".to_owned()),
                        Just("token".to_owned()),
                        Just("challenge".to_owned()),
                        Just("key_id".to_owned()),
                        Just("attestation_object".to_owned()),
                        Just("assertion".to_owned()),
                        "[a-z]{1,8}",
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn check(policies: &Policies, body: &Map<String, Value>) -> Result<Passed, Error> {
        let headers = HeaderMap::new();
        let evidence = Evidence {
            fingerprint: "device-0001",
            body,
            headers: &headers,
            client_ip: None,
        };
        let pow = ProofOfWork::new([1u8; 32], 0, Duration::from_secs(300));
        let store = crate::store::MemoryStore::new();
        let builtins = Builtins {
            pow: &pow,
            solution: None,
            entropy_score: 0,
            min_entropy_score: 0,
            now: 1_700_000_000,
            store: &store,
        };
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(policies.check(&evidence, &builtins))
    }

    proptest! {
        /// Whatever a client sends as its attestation, a mint that needs one is refused with an
        /// attestation code, and never passes without a verdict that verifies.
        #[test]
        fn any_attestation_shape_is_refused_with_an_attestation_code(value in json()) {
            let app_attest = Config::builder()
                .upstream_api_key("sk-test")
                .mint_policies([["app_attest"]])
                .mint_app_attest_app_ids(["ABCDE12345.com.example.app"])
                .build()
                .unwrap();
            for config in [play_integrity_config(), app_attest] {
                let policies = Policies::new(&config, &[]).unwrap();
                let mut body = Map::new();
                body.insert("attestation".to_owned(), value.clone());
                let code = check(&policies, &body).unwrap_err().code();
                prop_assert!(
                    matches!(code, ErrorCode::AttestationRequired | ErrorCode::AttestationInvalid),
                    "{code}"
                );
            }
        }
    }

    #[test]
    fn evidence_of_the_wrong_type_names_its_gate() {
        let base = || {
            Config::builder()
                .upstream_api_key("sk-test")
                .mint_oidc_issuer("https://issuer.example")
                .mint_oidc_audience("app")
                .mint_captcha_provider("turnstile")
                .mint_captcha_secret("secret")
        };
        let cases = [
            ("id_token", "oidc", Value::Null, ErrorCode::IdTokenRequired),
            (
                "id_token",
                "oidc",
                Value::from(42),
                ErrorCode::InvalidIdToken,
            ),
            (
                "id_token",
                "oidc",
                Value::Array(vec![]),
                ErrorCode::InvalidIdToken,
            ),
            (
                "captcha",
                "captcha",
                Value::Null,
                ErrorCode::CaptchaRequired,
            ),
            (
                "captcha",
                "captcha",
                Value::Bool(true),
                ErrorCode::CaptchaInvalid,
            ),
            (
                "captcha",
                "captcha",
                Value::Object(Map::new()),
                ErrorCode::CaptchaInvalid,
            ),
        ];
        for (field, gate, value, expected) in cases {
            let config = base().mint_policies([[gate]]).build().unwrap();
            let policies = Policies::new(&config, &[]).unwrap();
            let mut body = Map::new();
            body.insert(field.to_owned(), value.clone());
            let code = check(&policies, &body).unwrap_err().code();
            assert_eq!(code, expected, "{field} = {value}");
        }
    }

    #[test]
    fn an_attestation_missing_a_member_is_invalid_and_another_format_is_missing() {
        let policies = Policies::new(&play_integrity_config(), &[]).unwrap();
        let code = |attestation: Value| {
            let mut body = Map::new();
            body.insert("attestation".to_owned(), attestation);
            check(&policies, &body).unwrap_err().code()
        };
        assert_eq!(
            code(serde_json::json!({"format": "apple-app-attest", "token": "t", "challenge": "c"})),
            ErrorCode::AttestationRequired
        );
        assert_eq!(
            code(serde_json::json!({"format": "play-integrity", "challenge": "c"})),
            ErrorCode::AttestationInvalid
        );
        assert_eq!(
            code(serde_json::json!({"format": "play-integrity", "token": 1, "challenge": "c"})),
            ErrorCode::AttestationInvalid
        );
        // A challenge this server did not sign.
        assert_eq!(
            code(
                serde_json::json!({"format": "play-integrity", "token": "t", "challenge": "v1.AA.AA"})
            ),
            ErrorCode::AttestationInvalid
        );
    }

    #[test]
    fn app_attest_roots_come_from_the_configuration() {
        let base = || {
            Config::builder()
                .upstream_api_key("sk-test")
                .mint_policies([["app_attest"]])
                .mint_app_attest_app_ids(["ABCDE12345.com.example.app"])
        };
        // Apple's by default.
        Policies::new(&base().build().unwrap(), &[]).unwrap();
        // A PEM of one's own; and what is not one.
        let ca = rcgen::CertifiedIssuer::self_signed(
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap(),
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap();
        let config = base()
            .mint_app_attest_root_ca_pem(ca.pem())
            .build()
            .unwrap();
        let Kind::AppAttest(gate) = &Policies::new(&config, &[]).unwrap().gates[0].kind else {
            panic!("the app_attest gate")
        };
        assert_eq!(gate.policy.roots, vec![ca.der().clone()]);
        for bad in [
            "not pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        ] {
            let config = base().mint_app_attest_root_ca_pem(bad).build().unwrap();
            let error = Policies::new(&config, &[]).unwrap_err();
            assert!(
                matches!(
                    error,
                    ConfigError::Invalid {
                        key: "mint.app_attest.root_ca_pem",
                        ..
                    }
                ),
                "{bad}: {error}"
            );
        }
    }

    #[derive(Debug)]
    struct Impostor;

    impl Gate for Impostor {
        fn name(&self) -> &str {
            "pow"
        }

        fn check<'a>(&'a self, _: &'a Evidence<'a>) -> super::super::GateFuture<'a> {
            Box::pin(std::future::ready(Ok(Facts::default())))
        }
    }

    #[test]
    fn a_registered_gate_cannot_take_a_built_in_name() {
        let config = Config::builder()
            .upstream_api_key("sk-test")
            .build()
            .unwrap();
        let error = crate::Perishable::builder(config)
            .gate(Impostor)
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("built-in name"), "{error}");
    }
}
