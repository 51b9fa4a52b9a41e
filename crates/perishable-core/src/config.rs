//! Configuration: the PROTOCOL file shape, a builder with a method per key, and validation.
//!
//! [`ConfigBuilder`] *is* the file shape: it deserializes from TOML or JSON, every setter changes
//! one key, and [`ConfigBuilder::build`] validates everything at once into a [`Config`]. Invalid
//! configuration fails there, with a [`ConfigError`] naming the key; nothing is checked later.
//!
//! ```
//! use perishable_core::Config;
//!
//! let config = Config::builder()
//!     .upstream_api_key("sk-test")
//!     .session_jwt_secret("an-example-secret-of-at-least-32-bytes!")
//!     .rate_limit_points(20)
//!     .cors_allowed_origins(["https://app.example.com"])
//!     .build()?;
//! assert_eq!(config.rate_limit().points, 20);
//!
//! // The same from the PROTOCOL file shape.
//! let config = Config::from_toml_str(r#"
//!     [upstream]
//!     api_key = "sk-test"
//!     [session]
//!     jwt_secret = "an-example-secret-of-at-least-32-bytes!"
//! "#)?;
//! assert_eq!(config.session().ttl_secs, 600);
//! # Ok::<(), perishable_core::ConfigError>(())
//! ```
//!
//! Secrets ([`Secret`]) never appear in `Debug` output.

use std::fmt;
use std::time::Duration;

pub use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// A secret string: the upstream key or a signing secret. `Debug` shows `Secret(**redacted**)`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself. Handle with care: never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(**redacted**)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// A configuration that could not be built. Each variant names the offending key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required key is missing.
    #[error("{key} is required{}", env_hint(key))]
    Missing {
        /// The key, as in the file (`upstream.api_key`).
        key: &'static str,
    },
    /// A key has a value it cannot take.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key, as in the file.
        key: &'static str,
        /// Why the value is refused (never the value itself when it is a secret).
        reason: String,
    },
    /// The file could not be parsed.
    #[error("cannot parse the configuration: {0}")]
    Parse(String),
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// The environment variable that sets `key`, for the message of a missing key.
fn env_hint(key: &str) -> &'static str {
    match key {
        "upstream.api_key" => {
            " (set OPENAI_API_KEY, or point upstream.base_url / OPENAI_BASE_URL at a keyless upstream such as a local Ollama or vLLM)"
        }
        "session.jwt_secret" => " (set PERISHABLE_JWT_SECRET)",
        _ => "",
    }
}

impl ConfigError {
    fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

/// `[upstream]`: where requests go and what may pass.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the OpenAI-compatible API, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The server's API key, sent upstream as `Authorization: Bearer <key>`. Required for
    /// OpenAI itself; without one, calls go to a keyless upstream (a local Ollama or vLLM)
    /// without `Authorization`.
    pub api_key: Option<Secret>,
    /// Paths under `/openai/` that may pass. `*` matches exactly one path segment.
    pub allowed_paths: Vec<String>,
    /// Models a request body may name; empty means any.
    pub allowed_models: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest wait for the TCP (and TLS) connection to the upstream.
    pub connect_timeout_ms: u64,
    /// Longest wait for the upstream's response headers.
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two chunks of a response body; the stream then ends.
    pub idle_timeout_ms: u64,
    /// Client headers forwarded upstream beyond the built-in list (`Content-Type`, `Accept`,
    /// `User-Agent`, `OpenAI-Beta`, `Idempotency-Key`, `X-Stainless-*`). Credentials and the
    /// headers an upstream trusts for billing or client identity can never be listed.
    pub forward_headers: Vec<String>,
    /// Static headers the server sends upstream on every call, e.g. `OpenAI-Project`.
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The default `upstream.allowed_paths`: inference endpoints only, no admin-grade ones.
pub const DEFAULT_ALLOWED_PATHS: [&str; 7] = [
    "chat/completions",
    "completions",
    "embeddings",
    "models",
    "models/*",
    "responses",
    "moderations",
];

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".to_owned(),
            api_key: None,
            allowed_paths: DEFAULT_ALLOWED_PATHS.map(str::to_owned).to_vec(),
            allowed_models: Vec::new(),
            max_body_bytes: 1024 * 1024,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            forward_headers: Vec::new(),
            headers: std::collections::BTreeMap::new(),
        }
    }
}

/// How strongly sessions are bound to a client-held key (RFC 9449 DPoP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpopMode {
    /// DPoP headers are ignored; every session is a bearer session.
    Off,
    /// A DPoP proof on `POST /session` binds the session; without one the session is a bearer one.
    #[default]
    Optional,
    /// Every session must be key-bound.
    Required,
}

/// Signing algorithm for session tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum Algorithm {
    /// HMAC-SHA256 with a shared secret (default).
    #[default]
    HS256,
    /// Ed25519 signatures: instances that only verify need only the public key.
    EdDSA,
}

/// One signing key in `[[session.keys]]`, for rotation.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SigningKeyConfig {
    /// The key id put in the token header (`kid`).
    pub kid: String,
    /// An HS256 secret, at least 32 bytes.
    pub secret: Option<Secret>,
    /// An Ed25519 private key (PKCS#8 PEM), for `algorithm = "EdDSA"`.
    pub private_key_pem: Option<Secret>,
}

impl fmt::Debug for SigningKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyConfig")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// `[session]`: how sessions are minted and checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Lifetime of one token, in seconds.
    pub ttl_secs: u64,
    /// Absolute lifetime of a session across refreshes, counted from the first mint.
    pub max_lifetime_secs: u64,
    /// The HS256 signing secret (at least 32 bytes). When set it signs; `keys` still verify.
    pub jwt_secret: Option<Secret>,
    /// Further signing keys for rotation: the last one signs when `jwt_secret` is unset, all verify.
    pub keys: Vec<SigningKeyConfig>,
    /// `HS256` (default) or `EdDSA`.
    pub algorithm: Algorithm,
    /// The `iss` claim.
    pub issuer: String,
    /// The `aud` claim.
    pub audience: String,
    /// Bind tokens to a hash of the User-Agent.
    pub bind_user_agent: bool,
    /// Lowest interaction entropy score (0 to 100) that may mint; 0 switches the gate off.
    pub min_entropy_score: u8,
    /// Most live sessions per fingerprint.
    pub max_per_fingerprint: u32,
    /// DPoP key binding.
    pub dpop: DpopMode,
    /// How old a DPoP proof's `iat` may be, in seconds.
    pub dpop_max_age_secs: u64,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Verified tokens kept to skip repeated signature checks; 0: no cache.
    pub verified_cache_size: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 600,
            max_lifetime_secs: 86_400,
            jwt_secret: None,
            keys: Vec::new(),
            algorithm: Algorithm::HS256,
            issuer: "perishable".to_owned(),
            audience: "perishable".to_owned(),
            bind_user_agent: true,
            min_entropy_score: 50,
            max_per_fingerprint: 5,
            dpop: DpopMode::Optional,
            dpop_max_age_secs: 60,
            leeway_secs: 5,
            verified_cache_size: 10_000,
        }
    }
}

/// `[rate_limit]`: per-client request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per window per client (the burst).
    pub points: u32,
    /// The window, in seconds: `points` requests are replenished over it.
    pub duration_secs: u64,
    /// How long a client that went over the limit stays refused; 0: only until a request is free.
    pub block_duration_secs: u64,
    /// Session mints per client IP per minute.
    pub mint_per_ip: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            points: 100,
            duration_secs: 60,
            block_duration_secs: 60,
            mint_per_ip: 10,
        }
    }
}

/// `[pow]`: proof of work on minting.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PowConfig {
    /// Leading zero bits of `SHA-256(challenge + nonce)`; 0 switches proof of work off.
    pub difficulty: u8,
    /// How long a challenge stays valid, in seconds.
    pub challenge_ttl_secs: u64,
}

impl Default for PowConfig {
    fn default() -> Self {
        Self {
            difficulty: 16,
            challenge_ttl_secs: 300,
        }
    }
}

/// `[cors]`: which browser origins may call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), or `["*"]` for any (then no credentials).
    pub allowed_origins: Vec<String>,
}

/// `[server]`: how the service is reached.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The URL clients see for the router's mount point; used for DPoP `htu` and same-origin checks.
    pub public_url: Option<String>,
    /// CIDRs of reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The whole request body must arrive within this many milliseconds (else
    /// `408 body_timeout`), on every route that reads one.
    pub body_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            public_url: None,
            trusted_proxies: Vec::new(),
            body_timeout_ms: 30_000,
        }
    }
}

/// Whose tokens a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// The client: its DPoP key when bound, else its fingerprint (across its sessions).
    #[default]
    Client,
    /// Each session on its own.
    Session,
}

/// `[budget]`: token budgets, the completion cap and the stream cap; see [`crate::budget`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Tokens per client per window; 0: no budget.
    pub tokens_per_window: u64,
    /// The budget window, in seconds.
    pub window_secs: u64,
    /// Cap on a request's `max_tokens` / `max_completion_tokens`; 0: none.
    pub max_completion_tokens: u64,
    /// Ask streamed chat completions for usage.
    pub include_usage: bool,
    /// Concurrent streams per session; 0: no cap.
    pub max_concurrent_streams: u32,
    /// Whose tokens the budget counts.
    pub scope: BudgetScope,
    /// Completion tokens reserved for a request that names no ceiling.
    pub default_reserve_tokens: u64,
    /// Tokens per client IP per window, whatever sessions the IP holds; 0: no per-IP budget.
    pub per_ip_tokens_per_window: u64,
    /// Tokens per window for the whole deployment; 0: no global budget.
    pub global_tokens_per_window: u64,
    /// `[budget.tiers.NAME]`: per-tier budgets, for an identity gate's tier claim.
    pub tiers: std::collections::BTreeMap<String, TierConfig>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            tokens_per_window: 0,
            window_secs: 3600,
            max_completion_tokens: 0,
            include_usage: true,
            max_concurrent_streams: 0,
            scope: BudgetScope::Client,
            default_reserve_tokens: 4096,
            per_ip_tokens_per_window: 0,
            global_tokens_per_window: 0,
            tiers: std::collections::BTreeMap::new(),
        }
    }
}

/// What to do when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Refuse with `503 store_unavailable`.
    #[default]
    Closed,
    /// Skip rate limits (revocation and replay checks still fail closed).
    Open,
}

/// `[store]`: where shared state lives.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `memory` (the default, one instance) or `redis://[:password@]host:port[/db]` (cargo
    /// feature `redis`). May hold a password: `Debug` shows only its scheme.
    pub url: String,
    /// Failure policy.
    pub on_unavailable: OnUnavailable,
    /// Prefix of every Redis key, so several apps can share one Redis.
    pub key_prefix: String,
    /// Longest wait for one store call, in milliseconds.
    pub timeout_ms: u64,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(s, _)| s);
        f.debug_struct("StoreConfig")
            .field("url", &format_args!("{scheme}://…"))
            .field("on_unavailable", &self.on_unavailable)
            .field("key_prefix", &self.key_prefix)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "memory".to_owned(),
            on_unavailable: OnUnavailable::Closed,
            key_prefix: "perishable".to_owned(),
            timeout_ms: 500,
        }
    }
}

/// `[budget.tiers.NAME]`: the budget of one tier of users (selected by the identity gate's
/// `mint.oidc.tier_claim`, a later version's gate). Parsed and kept; no gate selects a tier yet.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    /// Tokens per client per window for this tier.
    pub tokens_per_window: Option<u64>,
    /// The completion cap for this tier.
    pub max_completion_tokens: Option<u64>,
    /// Requests per window per client for this tier.
    pub points: Option<u32>,
}

/// `[mint]`: which evidence a mint must show (see "Mint policies and gates" in
/// `docs/protocol.md`).
///
/// `policies` lists alternatives, each a set of gates that must all pass. This version verifies
/// the `pow` and `entropy` gates; a policy naming another gate (`captcha`, `oidc`, `app_attest`,
/// `play_integrity`) is refused at build time rather than silently not checked. Their sections
/// are parsed, so a configuration file written for them loads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

/// `[realtime]`: the Realtime WebSocket route (`docs/protocol.md`, "Realtime"). This version does
/// not serve it: `enabled = true` is refused at build time.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RealtimeConfig {
    /// Serve `GET /openai/realtime`.
    pub enabled: bool,
    /// Most Realtime connections per session.
    pub max_connections_per_session: u32,
    /// Longest Realtime connection, in seconds.
    pub max_duration_secs: u64,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_connections_per_session: 1,
            max_duration_secs: 1800,
        }
    }
}

/// The configuration file shape, and a builder with one method per key.
///
/// Deserialize it from a file (TOML or JSON), change keys with the setters, apply the
/// PROTOCOL environment variables with [`ConfigBuilder::apply_env`], then [`build`](Self::build).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[must_use]
pub struct ConfigBuilder {
    upstream: UpstreamConfig,
    session: SessionConfig,
    rate_limit: RateLimitConfig,
    pow: PowConfig,
    cors: CorsConfig,
    server: ServerConfig,
    budget: BudgetConfig,
    store: StoreConfig,
    mint: MintConfig,
    realtime: RealtimeConfig,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident => $section:ident . $field:ident : $ty:ty $(=> $conv:expr)?;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$section.$field = setters!(@conv value $(, $conv)?);
                self
            }
        )*
    };
    (@conv $v:ident) => { $v };
    (@conv $v:ident, $conv:expr) => { ($conv)($v) };
}

impl ConfigBuilder {
    setters! {
        /// `upstream.base_url`.
        upstream_base_url => upstream.base_url: impl Into<String> => Into::into;
        /// `upstream.api_key`.
        upstream_api_key => upstream.api_key: impl Into<Secret> => |v: _| Some(Into::into(v));
        /// `upstream.max_body_bytes`.
        upstream_max_body_bytes => upstream.max_body_bytes: usize;
        /// `upstream.connect_timeout_ms`.
        upstream_connect_timeout_ms => upstream.connect_timeout_ms: u64;
        /// `upstream.first_byte_timeout_ms`.
        upstream_first_byte_timeout_ms => upstream.first_byte_timeout_ms: u64;
        /// `upstream.idle_timeout_ms`.
        upstream_idle_timeout_ms => upstream.idle_timeout_ms: u64;
        /// `session.ttl_secs`.
        session_ttl_secs => session.ttl_secs: u64;
        /// `session.max_lifetime_secs`.
        session_max_lifetime_secs => session.max_lifetime_secs: u64;
        /// `session.jwt_secret`: the HS256 signing secret, at least 32 bytes.
        session_jwt_secret => session.jwt_secret: impl Into<Secret> => |v: _| Some(Into::into(v));
        /// `session.algorithm`.
        session_algorithm => session.algorithm: Algorithm;
        /// `session.issuer`.
        session_issuer => session.issuer: impl Into<String> => Into::into;
        /// `session.audience`.
        session_audience => session.audience: impl Into<String> => Into::into;
        /// `session.bind_user_agent`.
        session_bind_user_agent => session.bind_user_agent: bool;
        /// `session.min_entropy_score` (0 to 100; 0 switches the gate off).
        session_min_entropy_score => session.min_entropy_score: u8;
        /// `session.max_per_fingerprint`.
        session_max_per_fingerprint => session.max_per_fingerprint: u32;
        /// `session.dpop`.
        session_dpop => session.dpop: DpopMode;
        /// `session.dpop_max_age_secs`.
        session_dpop_max_age_secs => session.dpop_max_age_secs: u64;
        /// `session.leeway_secs`.
        session_leeway_secs => session.leeway_secs: u64;
        /// `session.verified_cache_size` (0: no cache of verified tokens).
        session_verified_cache_size => session.verified_cache_size: usize;
        /// `rate_limit.points`.
        rate_limit_points => rate_limit.points: u32;
        /// `rate_limit.duration_secs`.
        rate_limit_duration_secs => rate_limit.duration_secs: u64;
        /// `rate_limit.block_duration_secs`.
        rate_limit_block_duration_secs => rate_limit.block_duration_secs: u64;
        /// `rate_limit.mint_per_ip`.
        rate_limit_mint_per_ip => rate_limit.mint_per_ip: u32;
        /// `pow.difficulty` (leading zero bits; 0 switches proof of work off).
        pow_difficulty => pow.difficulty: u8;
        /// `pow.challenge_ttl_secs`.
        pow_challenge_ttl_secs => pow.challenge_ttl_secs: u64;
        /// `server.public_url`.
        server_public_url => server.public_url: impl Into<String> => |v: _| Some(Into::into(v));
        /// `budget.tokens_per_window`.
        budget_tokens_per_window => budget.tokens_per_window: u64;
        /// `budget.window_secs`.
        budget_window_secs => budget.window_secs: u64;
        /// `budget.max_completion_tokens`.
        budget_max_completion_tokens => budget.max_completion_tokens: u64;
        /// `budget.include_usage`.
        budget_include_usage => budget.include_usage: bool;
        /// `budget.max_concurrent_streams`.
        budget_max_concurrent_streams => budget.max_concurrent_streams: u32;
        /// `budget.scope`.
        budget_scope => budget.scope: BudgetScope;
        /// `budget.default_reserve_tokens`.
        budget_default_reserve_tokens => budget.default_reserve_tokens: u64;
        /// `budget.per_ip_tokens_per_window` (0: no per-IP budget).
        budget_per_ip_tokens_per_window => budget.per_ip_tokens_per_window: u64;
        /// `budget.global_tokens_per_window` (0: no global budget).
        budget_global_tokens_per_window => budget.global_tokens_per_window: u64;
        /// `server.body_timeout_ms`.
        server_body_timeout_ms => server.body_timeout_ms: u64;
        /// `store.url`.
        store_url => store.url: impl Into<String> => Into::into;
        /// `store.on_unavailable`.
        store_on_unavailable => store.on_unavailable: OnUnavailable;
        /// `store.key_prefix`.
        store_key_prefix => store.key_prefix: impl Into<String> => Into::into;
        /// `store.timeout_ms`.
        store_timeout_ms => store.timeout_ms: u64;
    }

    /// `upstream.allowed_paths`.
    pub fn upstream_allowed_paths<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        paths: I,
    ) -> Self {
        self.upstream.allowed_paths = paths.into_iter().map(Into::into).collect();
        self
    }

    /// `upstream.allowed_models` (empty: any model).
    pub fn upstream_allowed_models<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        models: I,
    ) -> Self {
        self.upstream.allowed_models = models.into_iter().map(Into::into).collect();
        self
    }

    /// Appends a `[[session.keys]]` entry: an HS256 secret with its `kid`.
    pub fn session_hmac_key(mut self, kid: impl Into<String>, secret: impl Into<Secret>) -> Self {
        self.session.keys.push(SigningKeyConfig {
            kid: kid.into(),
            secret: Some(secret.into()),
            private_key_pem: None,
        });
        self
    }

    /// Appends a `[[session.keys]]` entry: an Ed25519 PKCS#8 PEM private key with its `kid`.
    pub fn session_ed25519_key(
        mut self,
        kid: impl Into<String>,
        private_key_pem: impl Into<Secret>,
    ) -> Self {
        self.session.keys.push(SigningKeyConfig {
            kid: kid.into(),
            secret: None,
            private_key_pem: Some(private_key_pem.into()),
        });
        self
    }

    /// `mint.policies`: alternatives, each a set of gates that must all pass.
    pub fn mint_policies<P, G, S>(mut self, policies: P) -> Self
    where
        P: IntoIterator<Item = G>,
        G: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.mint.policies = policies
            .into_iter()
            .map(|gates| gates.into_iter().map(Into::into).collect())
            .collect();
        self
    }

    /// `upstream.forward_headers`: extra client headers to forward upstream.
    pub fn upstream_forward_headers<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        names: I,
    ) -> Self {
        self.upstream.forward_headers = names.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one `upstream.headers` entry: a static header sent upstream on every call.
    pub fn upstream_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.upstream.headers.insert(name.into(), value.into());
        self
    }

    /// `cors.allowed_origins`.
    pub fn cors_allowed_origins<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        origins: I,
    ) -> Self {
        self.cors.allowed_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// `server.trusted_proxies`.
    pub fn server_trusted_proxies<I: IntoIterator<Item = IpNet>>(mut self, cidrs: I) -> Self {
        self.server.trusted_proxies = cidrs.into_iter().collect();
        self
    }

    /// Applies the PROTOCOL environment variables: `OPENAI_API_KEY`, `OPENAI_BASE_URL`,
    /// `PERISHABLE_JWT_SECRET`, `PERISHABLE_STORE_URL`, `PERISHABLE_CAPTCHA_SECRET` (`PORT`
    /// belongs to the server, not here).
    ///
    /// Empty values are ignored. `lookup` is usually `|k| std::env::var(k).ok()`.
    pub fn apply_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        if let Some(v) = get("OPENAI_API_KEY") {
            self.upstream.api_key = Some(Secret(v));
        }
        if let Some(v) = get("OPENAI_BASE_URL") {
            self.upstream.base_url = v;
        }
        if let Some(v) = get("PERISHABLE_JWT_SECRET") {
            self.session.jwt_secret = Some(Secret(v));
        }
        if let Some(v) = get("PERISHABLE_CAPTCHA_SECRET") {
            self.mint.captcha.secret = Some(Secret(v));
        }
        if let Some(v) = get("PERISHABLE_STORE_URL") {
            self.store.url = v;
        }
        self
    }

    /// Whether an upstream API key is set.
    pub fn has_upstream_api_key(&self) -> bool {
        self.upstream
            .api_key
            .as_ref()
            .is_some_and(|k| !k.0.is_empty())
    }

    /// Whether `upstream.base_url` was set to something other than the default (OpenAI's). The
    /// example proxy serves its mock only when neither this nor a key is set.
    pub fn has_upstream_base_url(&self) -> bool {
        self.upstream.base_url != UpstreamConfig::default().base_url
    }

    /// `session.jwt_secret`: the old name of [`session_jwt_secret`](Self::session_jwt_secret).
    #[deprecated(
        since = "0.2.0",
        note = "use `session_jwt_secret`, named like every other setter"
    )]
    pub fn jwt_secret(self, secret: impl Into<Secret>) -> Self {
        self.session_jwt_secret(secret)
    }

    /// Whether `cors.allowed_origins` lists any origin so far.
    pub fn has_cors_allowed_origins(&self) -> bool {
        !self.cors.allowed_origins.is_empty()
    }

    /// Whether `server.public_url` is set so far.
    pub fn has_server_public_url(&self) -> bool {
        self.server.public_url.is_some()
    }

    /// `cors.allowed_origins` as set so far.
    #[deprecated(since = "0.2.0", note = "use `has_cors_allowed_origins`")]
    pub fn allowed_origins(&self) -> &[String] {
        &self.cors.allowed_origins
    }

    /// `server.public_url` as set so far.
    #[deprecated(since = "0.2.0", note = "use `has_server_public_url`")]
    pub fn public_url(&self) -> Option<&str> {
        self.server.public_url.as_deref()
    }

    /// Checks `mint.policies` and applies them to the gates this version verifies: a single
    /// alternative of `pow` and `entropy` gates. A gate the policy leaves out is switched off
    /// (`pow.difficulty = 0`, `session.min_entropy_score = 0`), as the protocol's default
    /// `[["pow", "entropy"]]` is version 1's behaviour.
    fn apply_mint_policies(&mut self) -> Result<(), ConfigError> {
        const KEY: &str = "mint.policies";
        let policies = &self.mint.policies;
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
        if !policy.iter().any(|g| g == "pow") {
            self.pow.difficulty = 0;
        }
        if !policy.iter().any(|g| g == "entropy") {
            self.session.min_entropy_score = 0;
        }
        Ok(())
    }

    /// Validates every key and builds the [`Config`].
    pub fn build(mut self) -> Result<Config, ConfigError> {
        self.apply_mint_policies()?;
        if self.realtime.enabled {
            return Err(ConfigError::invalid(
                "realtime.enabled",
                "the Realtime route is not available in this version",
            ));
        }
        let u = &self.upstream;
        let parsed = url::Url::parse(u.base_url.trim_end_matches('/')).map_err(|e| {
            ConfigError::invalid(
                "upstream.base_url",
                format!(
                    "{:?} is not an absolute http or https URL ({e}), e.g. https://api.openai.com/v1",
                    u.base_url
                ),
            )
        })?;
        // Normalized (lower-case scheme and host, IDNA, default port dropped, path encoded), so
        // that a request URI is this and the client's already-valid path, joined.
        let base_url = parsed.as_str().trim_end_matches('/').to_owned();
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must be an http or https URL with a host",
            ));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must not have a query or fragment",
            ));
        }
        // A keyless upstream (a local Ollama or vLLM) is forwarded to without `Authorization`;
        // OpenAI itself never is, so a missing key there is a mistake to report now.
        let key_missing = u.api_key.as_ref().is_none_or(|k| k.0.is_empty());
        if key_missing && parsed.host_str() == Some("api.openai.com") {
            return Err(ConfigError::Missing {
                key: "upstream.api_key",
            });
        }
        if let Some(k) = &u.api_key
            && !k.0.is_empty()
            && http::HeaderValue::try_from(format!("Bearer {}", k.0)).is_err()
        {
            return Err(ConfigError::invalid(
                "upstream.api_key",
                "contains characters not allowed in a header",
            ));
        }
        for p in &u.allowed_paths {
            crate::path::PathPattern::parse(p)
                .map_err(|reason| ConfigError::invalid("upstream.allowed_paths", reason))?;
        }
        if u.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "upstream.max_body_bytes",
                "must be above 0",
            ));
        }
        for name in &u.forward_headers {
            crate::header_rules::forwarded_header_name(name)
                .map_err(|reason| ConfigError::invalid("upstream.forward_headers", reason))?;
        }
        for (name, value) in &u.headers {
            crate::header_rules::static_header(name, value)
                .map_err(|reason| ConfigError::invalid("upstream.headers", reason))?;
        }
        for (key, v) in [
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("upstream.connect_timeout_ms", u.connect_timeout_ms),
            ("upstream.first_byte_timeout_ms", u.first_byte_timeout_ms),
            ("upstream.idle_timeout_ms", u.idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be above 0"));
            }
        }

        let s = &self.session;
        if s.ttl_secs == 0 {
            return Err(ConfigError::invalid("session.ttl_secs", "must be above 0"));
        }
        if s.max_lifetime_secs < s.ttl_secs {
            return Err(ConfigError::invalid(
                "session.max_lifetime_secs",
                "must be at least session.ttl_secs",
            ));
        }
        if s.issuer.is_empty() {
            return Err(ConfigError::invalid("session.issuer", "must not be empty"));
        }
        if s.audience.is_empty() {
            return Err(ConfigError::invalid(
                "session.audience",
                "must not be empty",
            ));
        }
        if s.min_entropy_score > 100 {
            return Err(ConfigError::invalid(
                "session.min_entropy_score",
                "must be between 0 and 100",
            ));
        }
        if s.max_per_fingerprint == 0 {
            return Err(ConfigError::invalid(
                "session.max_per_fingerprint",
                "must be above 0",
            ));
        }
        if s.dpop_max_age_secs == 0 {
            return Err(ConfigError::invalid(
                "session.dpop_max_age_secs",
                "must be above 0",
            ));
        }
        validate_keys(s)?;

        let r = &self.rate_limit;
        if r.points == 0 {
            return Err(ConfigError::invalid("rate_limit.points", "must be above 0"));
        }
        if r.duration_secs == 0 {
            return Err(ConfigError::invalid(
                "rate_limit.duration_secs",
                "must be above 0",
            ));
        }
        if r.mint_per_ip == 0 {
            return Err(ConfigError::invalid(
                "rate_limit.mint_per_ip",
                "must be above 0",
            ));
        }

        if self.pow.difficulty > 32 {
            return Err(ConfigError::invalid(
                "pow.difficulty",
                "must be at most 32 bits",
            ));
        }
        if self.pow.challenge_ttl_secs == 0 {
            return Err(ConfigError::invalid(
                "pow.challenge_ttl_secs",
                "must be above 0",
            ));
        }

        for origin in &self.cors.allowed_origins {
            if origin != "*" && !is_origin(origin) {
                return Err(ConfigError::invalid(
                    "cors.allowed_origins",
                    format!("{origin:?} is not an origin (scheme://host[:port]) or \"*\""),
                ));
            }
        }
        let public_origin = match &self.server.public_url {
            None => None,
            Some(url) => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| ConfigError::invalid("server.public_url", e.to_string()))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return Err(ConfigError::invalid(
                        "server.public_url",
                        "must be an http or https URL with a host",
                    ));
                }
                Some(parsed.origin().ascii_serialization())
            }
        };

        if self.budget.window_secs == 0 {
            return Err(ConfigError::invalid(
                "budget.window_secs",
                "must be above 0",
            ));
        }
        let st = &self.store;
        if st.url != "memory" {
            if !(st.url.starts_with("redis://") || st.url.starts_with("redis+unix://")) {
                return Err(ConfigError::invalid(
                    "store.url",
                    "must be \"memory\" or a redis:// URL",
                ));
            }
            if !cfg!(feature = "redis") {
                return Err(ConfigError::invalid(
                    "store.url",
                    "a Redis store needs the `redis` cargo feature of perishable",
                ));
            }
        }
        if st.key_prefix.is_empty() || st.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "store.key_prefix",
                "must be non-empty, without spaces",
            ));
        }
        if st.timeout_ms == 0 {
            return Err(ConfigError::invalid("store.timeout_ms", "must be above 0"));
        }

        Ok(Config {
            base_url,
            public_origin,
            inner: self,
        })
    }
}

/// The shortest HS256 secret, in bytes.
const MIN_SECRET_BYTES: usize = 32;

/// Checks the keys of `[session]` as data (lengths, formats, kids): the runtime decodes them
/// ([`KeySet`](crate::token::KeySet)), and makes a random one when none is given.
fn validate_keys(session: &SessionConfig) -> Result<(), ConfigError> {
    let mut kids = Vec::new();
    for entry in &session.keys {
        if entry.kid.is_empty() || entry.kid.len() > 64 {
            return Err(ConfigError::invalid(
                "session.keys",
                "every key needs a kid of 1 to 64 characters",
            ));
        }
        match (session.algorithm, &entry.secret, &entry.private_key_pem) {
            (Algorithm::HS256, Some(secret), None) => {
                check_secret_length(secret.expose().as_bytes(), "session.keys")?;
            }
            (Algorithm::EdDSA, None, Some(pem)) => {
                ed25519_pkcs8_der(pem.expose(), "session.keys")?;
            }
            (Algorithm::HS256, _, _) => {
                return Err(ConfigError::invalid(
                    "session.keys",
                    format!("key {:?}: HS256 keys take `secret` only", entry.kid),
                ));
            }
            (Algorithm::EdDSA, _, _) => {
                return Err(ConfigError::invalid(
                    "session.keys",
                    format!(
                        "key {:?}: EdDSA keys take `private_key_pem` only",
                        entry.kid
                    ),
                ));
            }
        }
        kids.push(entry.kid.clone());
    }
    if let Some(secret) = &session.jwt_secret {
        if session.algorithm != Algorithm::HS256 {
            return Err(ConfigError::invalid(
                "session.jwt_secret",
                "is an HS256 secret; with algorithm = \"EdDSA\" use session.keys",
            ));
        }
        let bytes = secret.expose().as_bytes();
        check_secret_length(bytes, "session.jwt_secret")?;
        kids.push(kid_for(bytes));
    }
    let mut seen = std::collections::HashSet::new();
    for kid in kids {
        if !seen.insert(kid.clone()) {
            return Err(ConfigError::invalid(
                "session.keys",
                format!("kid {kid:?} is used twice"),
            ));
        }
    }
    Ok(())
}

fn check_secret_length(secret: &[u8], key: &'static str) -> Result<(), ConfigError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(ConfigError::invalid(
            key,
            format!(
                "must be at least {MIN_SECRET_BYTES} bytes (got {})",
                secret.len()
            ),
        ));
    }
    Ok(())
}

/// The `kid` of a secret configured without one (`session.jwt_secret`, a generated key): the
/// same secret gets the same `kid` on every instance.
pub(crate) fn kid_for(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"perishable kid v1\0");
    hasher.update(secret);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&hasher.finalize()[..9])
}

/// The DER of an Ed25519 PKCS#8 PEM private key, checked to be one.
pub(crate) fn ed25519_pkcs8_der(pem: &str, key: &'static str) -> Result<Vec<u8>, ConfigError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| ConfigError::invalid(key, "is not a PEM document"))?;
    aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|_| ConfigError::invalid(key, "is not an Ed25519 PKCS#8 private key"))?;
    Ok(der)
}

fn is_origin(s: &str) -> bool {
    match url::Url::parse(s) {
        Ok(url) => {
            url.host().is_some() && url.origin().ascii_serialization() == s.trim_end_matches('/')
        }
        Err(_) => false,
    }
}

/// A validated configuration. Build it with [`Config::builder`] or from a file.
#[derive(Debug, Clone)]
pub struct Config {
    inner: ConfigBuilder,
    /// `upstream.base_url`, normalized, without a trailing slash.
    base_url: String,
    /// The origin of `server.public_url`, when set.
    public_origin: Option<String>,
}

impl Config {
    /// A builder with every key at its default.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Parses and validates the PROTOCOL file shape in TOML.
    #[cfg(feature = "toml")]
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        ConfigBuilder::from_toml_str(toml)?.build()
    }

    /// Parses and validates the PROTOCOL file shape in JSON.
    pub fn from_json_str(json: &str) -> Result<Self, ConfigError> {
        ConfigBuilder::from_json_str(json)?.build()
    }

    /// `[upstream]`.
    pub fn upstream(&self) -> &UpstreamConfig {
        &self.inner.upstream
    }

    /// `upstream.base_url`, normalized as a URL, without a trailing slash.
    pub fn upstream_base_url(&self) -> &str {
        &self.base_url
    }

    /// `[session]`.
    pub fn session(&self) -> &SessionConfig {
        &self.inner.session
    }

    /// `[rate_limit]`.
    pub fn rate_limit(&self) -> &RateLimitConfig {
        &self.inner.rate_limit
    }

    /// `[pow]`.
    pub fn pow(&self) -> &PowConfig {
        &self.inner.pow
    }

    /// `[cors]`.
    pub fn cors(&self) -> &CorsConfig {
        &self.inner.cors
    }

    /// `[server]`.
    pub fn server(&self) -> &ServerConfig {
        &self.inner.server
    }

    /// `[budget]`.
    pub fn budget(&self) -> &BudgetConfig {
        &self.inner.budget
    }

    /// `[store]`.
    pub fn store(&self) -> &StoreConfig {
        &self.inner.store
    }

    /// Whether no signing key was configured, so the runtime ([`Perishable`](crate::Perishable))
    /// signs with a random one: tokens then do not survive a restart or verify on another
    /// instance. The runtime logs a warning too; this is for an app that installs no `tracing`
    /// subscriber, or wants to refuse to start.
    ///
    /// ```
    /// let config = perishable_core::Config::builder().upstream_api_key("sk-test").build()?;
    /// assert!(config.has_random_signing_key());
    /// # Ok::<(), perishable_core::ConfigError>(())
    /// ```
    pub fn has_random_signing_key(&self) -> bool {
        let s = &self.inner.session;
        s.jwt_secret.is_none() && s.keys.is_empty()
    }

    /// `[mint]`.
    pub fn mint(&self) -> &MintConfig {
        &self.inner.mint
    }

    /// `[realtime]`.
    pub fn realtime(&self) -> &RealtimeConfig {
        &self.inner.realtime
    }

    /// The origin (`scheme://host[:port]`) of `server.public_url`, when set.
    pub fn public_origin(&self) -> Option<&str> {
        self.public_origin.as_deref()
    }

    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_secs(self.inner.session.ttl_secs)
    }
}

impl ConfigBuilder {
    /// Parses the PROTOCOL file shape in TOML, without validating it yet.
    #[cfg(feature = "toml")]
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        toml::from_str(toml).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Parses the PROTOCOL file shape in JSON, without validating it yet.
    pub fn from_json_str(json: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(json).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Reads a configuration file: JSON when its name ends in `.json`, TOML otherwise.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if path.extension().is_some_and(|e| e == "json") {
            return Self::from_json_str(&text);
        }
        #[cfg(feature = "toml")]
        {
            Self::from_toml_str(&text)
        }
        #[cfg(not(feature = "toml"))]
        {
            Err(ConfigError::Parse(
                "TOML files need the `toml` feature of perishable-core".to_owned(),
            ))
        }
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ConfigBuilder::deserialize(deserializer)?
            .build()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn short_secrets_are_refused() {
        let built = Config::builder()
            .upstream_api_key("sk-test")
            .session_jwt_secret("too-short")
            .build();
        assert!(matches!(
            built,
            Err(ConfigError::Invalid {
                key: "session.jwt_secret",
                ..
            })
        ));
    }

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
        let e = Config::from_toml_str("[upstream]\napi_key = \"sk\"\n[realtime]\nenabled = true\n")
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "realtime.enabled",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_captcha_secret_comes_from_the_environment() {
        let b = Config::builder()
            .apply_env(|k| (k == "PERISHABLE_CAPTCHA_SECRET").then(|| "0x-secret".to_owned()));
        let c = b.upstream_api_key("sk").build().unwrap();
        assert_eq!(
            c.mint().captcha.secret.as_ref().map(Secret::expose),
            Some("0x-secret")
        );
        assert!(
            !format!("{c:?}").contains("0x-secret"),
            "secrets stay out of Debug"
        );
    }
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn base() -> ConfigBuilder {
        Config::builder()
            .upstream_api_key("sk-test")
            .session_jwt_secret(SECRET)
    }

    fn invalid_key(builder: ConfigBuilder) -> &'static str {
        match builder.build() {
            Err(ConfigError::Invalid { key, .. } | ConfigError::Missing { key }) => key,
            other => panic!("expected a key error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_build_with_a_key() {
        let config = base().build().unwrap();
        assert_eq!(config.upstream_base_url(), "https://api.openai.com/v1");
        assert_eq!(config.session().ttl_secs, 600);
        assert_eq!(config.rate_limit().points, 100);
        assert_eq!(config.upstream().max_body_bytes, 1_048_576);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(invalid_key(Config::builder()), "upstream.api_key");
        assert_eq!(
            invalid_key(base().session_jwt_secret("short")),
            "session.jwt_secret"
        );
        assert_eq!(
            invalid_key(base().upstream_base_url("ftp://x")),
            "upstream.base_url"
        );
        assert_eq!(
            invalid_key(base().rate_limit_points(0)),
            "rate_limit.points"
        );
        assert_eq!(
            invalid_key(base().upstream_allowed_paths(["files/../x"])),
            "upstream.allowed_paths"
        );
        assert_eq!(
            invalid_key(base().cors_allowed_origins(["https://a.example/path"])),
            "cors.allowed_origins"
        );
        assert_eq!(
            invalid_key(base().session_ttl_secs(100).session_max_lifetime_secs(50)),
            "session.max_lifetime_secs"
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let builder = base().session_hmac_key("old", "another-secret-of-at-least-32-bytes!!");
        let config = builder.clone().build().unwrap();
        for text in [format!("{builder:?}"), format!("{config:?}")] {
            assert!(!text.contains(SECRET), "{text}");
            assert!(!text.contains("sk-test"), "{text}");
            assert!(!text.contains("another-secret"), "{text}");
        }
    }

    #[cfg(feature = "toml")]
    #[test]
    fn parses_the_protocol_file_shape() {
        let toml = r#"
[upstream]
base_url = "http://127.0.0.1:9/v1/"
api_key = "sk-file"
allowed_paths = ["chat/completions", "completions", "embeddings", "models", "models/*", "responses", "moderations"]
allowed_models = []
max_body_bytes = 1048576
connect_timeout_ms = 5000
first_byte_timeout_ms = 60000
idle_timeout_ms = 60000

[session]
ttl_secs = 600
max_lifetime_secs = 86400
jwt_secret = "0123456789abcdef0123456789abcdef"
issuer = "perishable"
audience = "perishable"
bind_user_agent = true
min_entropy_score = 50
max_per_fingerprint = 5
dpop = "optional"

[rate_limit]
points = 100
duration_secs = 60
block_duration_secs = 60
mint_per_ip = 10

[pow]
difficulty = 16

[cors]
allowed_origins = []

[server]
public_url = "https://api.example.com/ai"
trusted_proxies = ["10.0.0.0/8"]

[budget]
tokens_per_window = 0
window_secs = 3600
max_completion_tokens = 0
include_usage = true
max_concurrent_streams = 0

[store]
url = "memory"
on_unavailable = "closed"
"#;
        let config = Config::from_toml_str(toml).unwrap();
        assert_eq!(config.upstream_base_url(), "http://127.0.0.1:9/v1");
        assert_eq!(config.public_origin(), Some("https://api.example.com"));
        assert_eq!(config.server().trusted_proxies.len(), 1);

        let typo = "[session]\nttl_sec = 5\n";
        assert!(matches!(
            ConfigBuilder::from_toml_str(typo),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn env_overrides_the_file() {
        let builder = ConfigBuilder::from_json_str(r#"{"upstream":{"api_key":"sk-file"}}"#)
            .unwrap()
            .apply_env(|k| match k {
                "OPENAI_API_KEY" => Some("sk-env".to_owned()),
                "OPENAI_BASE_URL" => Some("http://127.0.0.1:1/v1".to_owned()),
                "PERISHABLE_JWT_SECRET" => Some(SECRET.to_owned()),
                _ => None,
            });
        let config = builder.build().unwrap();
        assert_eq!(
            config.upstream().api_key.as_ref().unwrap().expose(),
            "sk-env"
        );
        assert_eq!(config.upstream_base_url(), "http://127.0.0.1:1/v1");
    }
}
