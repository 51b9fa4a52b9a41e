//! `[server]`: how the service is reached.

use serde::Deserialize;

use super::ConfigError;
use super::IpNet;

/// `[server]`: how the service is reached.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
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

impl ServerConfig {
    /// Checks every key of the section; returns the origin of `public_url`, when set.
    pub(super) fn validate(&self) -> Result<Option<String>, ConfigError> {
        if self.body_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "server.body_timeout_ms",
                "must be above 0",
            ));
        }
        match &self.public_url {
            None => Ok(None),
            Some(url) => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| ConfigError::invalid("server.public_url", e.to_string()))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return Err(ConfigError::invalid(
                        "server.public_url",
                        "must be an http or https URL with a host",
                    ));
                }
                Ok(Some(parsed.origin().ascii_serialization()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_origin_comes_from_public_url() {
        assert_eq!(ServerConfig::default().validate().unwrap(), None);
        let config = ServerConfig {
            public_url: Some("https://API.example.com:443/ai/".to_owned()),
            ..ServerConfig::default()
        };
        assert_eq!(
            config.validate().unwrap().as_deref(),
            Some("https://api.example.com")
        );
        for bad in ["ftp://example.com", "not a url", "file:///tmp"] {
            let config = ServerConfig {
                public_url: Some(bad.to_owned()),
                ..ServerConfig::default()
            };
            assert!(config.validate().is_err(), "{bad}");
        }
        let config = ServerConfig {
            body_timeout_ms: 0,
            ..ServerConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                key: "server.body_timeout_ms",
                ..
            })
        ));
    }
}
