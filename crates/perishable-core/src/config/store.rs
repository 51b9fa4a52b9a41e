//! `[store]`: where shared state lives.

use std::fmt;

use serde::Deserialize;

use super::ConfigError;

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
    /// `memory` (the default, one instance), `redis://[:password@]host:port[/db]`, or
    /// `rediss://...` for TLS (cargo feature `redis`). Over TLS the server's certificate is
    /// checked against the platform's roots, or the PEM file `SSL_CERT_FILE` names. May hold a
    /// password: `Debug` shows only its scheme.
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

impl StoreConfig {
    /// Checks every key of the section.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let st = self;
        if st.url != "memory" {
            if !["redis://", "rediss://", "redis+unix://"]
                .iter()
                .any(|scheme| st.url.starts_with(scheme))
            {
                return Err(ConfigError::invalid(
                    "store.url",
                    "must be \"memory\", a redis:// URL, or rediss:// for TLS",
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
        Ok(())
    }
}
