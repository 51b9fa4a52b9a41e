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
    /// CIDRs of reverse proxies whose `X-Forwarded-For` is believed. In a file, an address
    /// without a prefix length is that one address (`10.0.0.1` is `10.0.0.1/32`).
    #[serde(deserialize_with = "cidrs")]
    pub trusted_proxies: Vec<IpNet>,
    /// The whole request body must arrive within this many milliseconds (else
    /// `408 body_timeout`), on every route that reads one.
    pub body_timeout_ms: u64,
}

/// A list of CIDRs, each with a prefix length or a single address.
fn cidrs<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{text:?} is neither an address nor a CIDR (10.0.0.0/8, fd00::/8)"
                    ))
                })
        })
        .collect()
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
                super::plain_http_url("server.public_url", &parsed)?;
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
        for bad in [
            "ftp://example.com",
            "not a url",
            "file:///tmp",
            "https://api.example.com/ai?x=1",
            "https://api.example.com/ai#f",
            "https://user:pw@api.example.com/ai",
        ] {
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

    #[test]
    fn a_trusted_proxy_is_a_cidr_or_one_address() {
        let parse = |list: &str| {
            serde_json::from_str::<ServerConfig>(&format!(r#"{{"trusted_proxies": {list}}}"#))
                .map(|c| c.trusted_proxies)
        };
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            parse(r#"["10.0.0.0/8", "10.1.2.3", "fd00::/8", "::1"]"#).unwrap(),
            [
                net("10.0.0.0/8"),
                net("10.1.2.3/32"),
                net("fd00::/8"),
                net("::1/128")
            ]
        );
        for bad in [r#"["10.0.0.0/33"]"#, r#"["proxy.local"]"#, r#"[""]"#, "[1]"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
