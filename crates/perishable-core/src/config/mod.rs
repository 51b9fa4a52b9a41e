//! Configuration: the file shape of [`docs/protocol.md`][configuration], a builder with a
//! method per key, and validation.
//!
//! [configuration]: https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md#configuration
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
//! // The same from the protocol file shape.
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

mod budget;
mod builder;
mod cors;
mod mint;
mod pow;
mod rate_limit;
mod realtime;
mod server;
mod session;
mod store;
mod upstream;

use std::fmt;
use std::time::Duration;

pub use ipnet::IpNet;
use serde::Deserialize;

pub use budget::{BudgetConfig, BudgetScope, TierConfig};
pub use builder::ConfigBuilder;
pub use cors::CorsConfig;
pub use mint::{AppAttestConfig, CaptchaConfig, MintConfig, OidcConfig, PlayIntegrityConfig};
pub use pow::PowConfig;
pub use rate_limit::RateLimitConfig;
pub use realtime::RealtimeConfig;
pub use server::ServerConfig;
pub use session::{Algorithm, DpopMode, SessionConfig};
pub(crate) use session::{SigningKeyConfig, ed25519_pkcs8_der, kid_for};
pub use store::{OnUnavailable, StoreConfig};
pub use upstream::{DEFAULT_ALLOWED_PATHS, UpstreamConfig};

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

/// Checks a URL of the configuration (`upstream.base_url`, `server.public_url`): http or https
/// with a host, no query or fragment (a path is appended to it), no user name or password
/// (nothing sends them, and the URL is logged).
fn plain_http_url(key: &'static str, url: &url::Url) -> Result<(), ConfigError> {
    let reason = if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        "must be an http or https URL with a host"
    } else if url.query().is_some() || url.fragment().is_some() {
        "must not have a query or fragment: paths are appended to it"
    } else if !url.username().is_empty() || url.password().is_some() {
        "must not hold a user name or password: credentials for the upstream go in \
         upstream.api_key or upstream.headers"
    } else {
        return Ok(());
    };
    Err(ConfigError::invalid(key, reason))
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
    pub(crate) fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            reason: reason.into(),
        }
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

    /// Parses and validates the protocol file shape in TOML.
    #[cfg(feature = "toml")]
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        ConfigBuilder::from_toml_str(toml)?.build()
    }

    /// Parses and validates the protocol file shape in JSON.
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
            invalid_key(base().cors_allowed_origins(["*", "https://a.example"])),
            "cors.allowed_origins"
        );
        assert_eq!(
            invalid_key(base().upstream_base_url("https://user:pw@api.example.com/v1")),
            "upstream.base_url"
        );
        assert_eq!(
            invalid_key(base().upstream_allowed_paths(["get models"])),
            "upstream.allowed_paths"
        );
        assert_eq!(
            invalid_key(base().budget_default_reserve_tokens(0)),
            "budget.default_reserve_tokens"
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

    /// A file that does not parse gets an error that says where and which key, and never shows
    /// the text of the file: the line at fault may hold a secret.
    #[test]
    fn parse_errors_never_show_the_file() {
        const S: &str = "sk-proj-NEVER-SHOWN";
        let parse = |text: &str, toml: bool| {
            let result = if toml {
                ConfigBuilder::from_toml_str(text)
            } else {
                ConfigBuilder::from_json_str(text)
            };
            match result {
                Err(ConfigError::Parse(message)) => message,
                other => panic!("{text}: {other:?}"),
            }
        };
        for (text, toml, wants) in [
            // A key misspelled on the line of a secret.
            (
                format!("[upstream]\napikey = \"{S}\"\n"),
                true,
                &["line 2, column 1", "upstream", "unknown field `apikey`"][..],
            ),
            (
                format!("[session]\njwt-secret = \"{S}\"\n"),
                true,
                &["line 2"][..],
            ),
            // The wrong type.
            (
                format!("[upstream]\napi_key = [\"{S}\"]\n"),
                true,
                &["upstream.api_key", "invalid type"][..],
            ),
            (
                format!("[session]\nttl_secs = \"{S}\"\n"),
                true,
                &["session.ttl_secs", "invalid type: a string"][..],
            ),
            // Not TOML at all.
            (
                format!("[upstream]\napi_key = \"{S}\" x\n"),
                true,
                &["line 2"][..],
            ),
            (
                format!("{{\"session\": {{\"ttl_secs\": \"{S}\\\" \"}}}}"),
                false,
                &["session.ttl_secs", "invalid type: a string", "line 1"][..],
            ),
            (
                format!("{{\"upstream\": {{\"apikey\": \"{S}\"}}}}"),
                false,
                &["upstream", "unknown field `apikey`"][..],
            ),
            (
                format!("{{\"upstream\": {{\"api_key\": \"{S}\" x"),
                false,
                &["line 1"][..],
            ),
            // A value of an enum, or a number, where a secret was meant.
            (
                format!("[session]\ndpop = \"{S}\"\n"),
                true,
                &["session.dpop", "unknown variant"][..],
            ),
            (
                "[session]\njwt_secret = 0x4E45564552\n".to_owned(),
                true,
                &["session.jwt_secret", "an integer"][..],
            ),
            (
                "{\"upstream\": {\"api_key\": 33654365.5}}".to_owned(),
                false,
                &["upstream.api_key", "a number"][..],
            ),
            // Text after the object.
            (
                format!("{{\"upstream\": {{}}}} {S}"),
                false,
                &["line 1", "trailing"][..],
            ),
        ] {
            let message = parse(&text, toml);
            assert!(!message.contains("NEVER"), "{text}: {message}");
            for number in ["33654365", "4E45564552", "336170730834"] {
                assert!(!message.contains(number), "{text}: {message}");
            }
            for want in wants {
                assert!(message.contains(want), "{text}: {message} (wants {want:?})");
            }
        }
    }

    proptest::proptest! {
        /// Whatever string a value holds, a type error never shows it.
        #[test]
        fn a_string_of_the_wrong_type_is_never_shown(value in "\\PC{8,40}") {
            let toml = format!("[session]\nttl_secs = {}\n", toml_string(&value));
            let json = format!("{{\"session\":{{\"ttl_secs\":{}}}}}", serde_json::Value::from(value.clone()));
            for result in [ConfigBuilder::from_toml_str(&toml), ConfigBuilder::from_json_str(&json)] {
                let Err(ConfigError::Parse(message)) = result else {
                    panic!("{value:?} parsed as a number");
                };
                proptest::prop_assert!(!message.contains(&value), "{}", message);
                proptest::prop_assert!(message.contains("session.ttl_secs"), "{}", message);
            }
        }

        /// Nor any value of an enum key (`session.dpop`), nor any number where a secret goes.
        #[test]
        fn a_wrong_variant_or_number_is_never_shown(
            value in "[a-zA-Z0-9_-]{8,40}",
            number in 10_000_000u64..u64::MAX,
        ) {
            let variant = format!("[session]\ndpop = {}\n", toml_string(&value));
            let json = format!("{{\"session\":{{\"dpop\":{}}}}}", serde_json::Value::from(value.clone()));
            let integer = format!("[session]\njwt_secret = {number}\n");
            let json_integer = format!("{{\"upstream\":{{\"api_key\":{number}}}}}");
            for (result, shown) in [
                (ConfigBuilder::from_toml_str(&variant), value.clone()),
                (ConfigBuilder::from_json_str(&json), value.clone()),
                (ConfigBuilder::from_toml_str(&integer), number.to_string()),
                (ConfigBuilder::from_json_str(&json_integer), number.to_string()),
            ] {
                let Err(ConfigError::Parse(message)) = result else {
                    panic!("{shown:?} was accepted");
                };
                proptest::prop_assert!(!message.contains(&shown), "{}", message);
            }
        }
    }

    /// `value` as a TOML basic string.
    fn toml_string(value: &str) -> String {
        let mut out = String::from("\"");
        for c in value.chars() {
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
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
