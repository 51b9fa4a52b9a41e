//! `[upstream]`: where requests go and what may pass.

use serde::Deserialize;

use super::{ConfigError, Secret};

/// `[upstream]`: where requests go and what may pass.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct UpstreamConfig {
    /// Base URL of the OpenAI-compatible API, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The server's API key, sent upstream as `Authorization: Bearer <key>`. Required for
    /// OpenAI itself; without one, calls go to a keyless upstream (a local Ollama or vLLM)
    /// without `Authorization`.
    pub api_key: Option<Secret>,
    /// Paths under `/openai/` that may pass. `*` matches exactly one path segment; a pattern
    /// may start with the one method it lets through (`"GET models/*"`).
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

/// The default `upstream.allowed_paths`: inference endpoints only, no admin-grade ones, each
/// with its method (`DELETE models/{id}` deletes a fine-tuned model; `GET chat/completions`
/// lists the organization's stored completions).
pub const DEFAULT_ALLOWED_PATHS: [&str; 7] = [
    "POST chat/completions",
    "POST completions",
    "POST embeddings",
    "GET models",
    "GET models/*",
    "POST responses",
    "POST moderations",
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

impl UpstreamConfig {
    /// Checks every key of the section; returns `base_url` normalized (lower-case scheme and
    /// host, IDNA, default port dropped, path encoded), without a trailing slash.
    pub(super) fn validate(&self) -> Result<String, ConfigError> {
        let u = self;
        let parsed = url::Url::parse(u.base_url.trim_end_matches('/')).map_err(|e| {
            // The value is shown, unless it may hold a password.
            let shown = if u.base_url.contains('@') {
                "the value".to_owned()
            } else {
                format!("{:?}", u.base_url)
            };
            ConfigError::invalid(
                "upstream.base_url",
                format!(
                    "{shown} is not an absolute http or https URL ({e}), e.g. https://api.openai.com/v1"
                ),
            )
        })?;
        // Normalized (lower-case scheme and host, IDNA, default port dropped, path encoded), so
        // that a request URI is this and the client's already-valid path, joined.
        let base_url = parsed.as_str().trim_end_matches('/').to_owned();
        super::plain_http_url("upstream.base_url", &parsed)?;
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
            ("upstream.connect_timeout_ms", u.connect_timeout_ms),
            ("upstream.first_byte_timeout_ms", u.first_byte_timeout_ms),
            ("upstream.idle_timeout_ms", u.idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be above 0"));
            }
        }
        Ok(base_url)
    }
}
