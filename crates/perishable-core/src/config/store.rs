//! `[store]`: where shared state lives.

use std::fmt;

use serde::Deserialize;

use super::ConfigError;

/// What to do when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum OnUnavailable {
    /// Refuse with `503 store_unavailable`.
    #[default]
    Closed,
    /// Skip rate limits (`[rate_limit]`) only. Budgets, caps, revocation and replay checks
    /// still fail closed.
    Open,
}

/// `[store]`: where shared state lives.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreConfig {
    /// `memory` (the default, one instance), `redis://[:password@]host:port[/db]`, or
    /// `rediss://...` for TLS (cargo feature `redis`). Over TLS the server's certificate is
    /// checked against the platform's roots, or the PEM file `SSL_CERT_FILE` names. May hold a
    /// password: `Debug` shows only its scheme.
    pub url: String,
    /// Failure policy for rate limits; everything else fails closed.
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
            // `redis://a:6379,b:6379`: the seed nodes of a Redis Cluster. An item without a
            // scheme takes the first one's; none may be empty or a Unix socket.
            let mut others = st.url.split(',').skip(1).map(str::trim).peekable();
            if others.peek().is_some() && st.url.starts_with("redis+unix://") {
                return Err(ConfigError::invalid(
                    "store.url",
                    "lists several nodes (a Redis Cluster), which are reached over TCP, not a Unix socket",
                ));
            }
            for node in others {
                let scheme_ok = !node.contains("://")
                    || node.starts_with("redis://")
                    || node.starts_with("rediss://");
                if node.is_empty() || !scheme_ok {
                    return Err(ConfigError::invalid(
                        "store.url",
                        "a Redis Cluster's nodes are a comma-separated list of redis:// or \
                         rediss:// URLs, or host:port after the first URL",
                    ));
                }
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_cluster_is_a_list_of_nodes() {
        let store = |url: &str| super::StoreConfig {
            url: url.to_owned(),
            ..super::StoreConfig::default()
        };
        for good in [
            "redis://10.0.0.1:6379,10.0.0.2:6379",
            "rediss://:pw@a:7000, rediss://b:7001,c:7002",
        ] {
            assert!(store(good).validate().is_ok(), "{good}");
        }
        for bad in [
            "redis://10.0.0.1:6379,,10.0.0.2:6379",
            "redis+unix:///tmp/redis.sock,b:7000",
            "redis://a:7000,http://b:7001",
        ] {
            assert!(
                matches!(
                    store(bad).validate(),
                    Err(super::ConfigError::Invalid {
                        key: "store.url",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    use super::*;

    fn key(config: StoreConfig) -> Option<&'static str> {
        match config.validate() {
            Ok(()) => None,
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn the_store_url_prefix_and_timeout_are_checked() {
        assert_eq!(key(StoreConfig::default()), None);
        let url = |url: &str| StoreConfig {
            url: url.to_owned(),
            ..StoreConfig::default()
        };
        assert_eq!(key(url("postgres://db")), Some("store.url"));
        #[cfg(feature = "redis")]
        assert_eq!(key(url("redis://127.0.0.1:6379/0")), None);
        #[cfg(not(feature = "redis"))]
        assert_eq!(key(url("redis://127.0.0.1:6379/0")), Some("store.url"));
        let prefix = StoreConfig {
            key_prefix: "two words".to_owned(),
            ..StoreConfig::default()
        };
        assert_eq!(key(prefix), Some("store.key_prefix"));
        let timeout = StoreConfig {
            timeout_ms: 0,
            ..StoreConfig::default()
        };
        assert_eq!(key(timeout), Some("store.timeout_ms"));
    }

    #[test]
    fn a_password_in_the_url_stays_out_of_debug() {
        let config = url_config("redis://:hunter2@cache:6379");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    fn url_config(url: &str) -> StoreConfig {
        StoreConfig {
            url: url.to_owned(),
            ..StoreConfig::default()
        }
    }
}
