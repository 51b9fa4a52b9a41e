//! `[realtime]`: the Realtime WebSocket route.

use serde::Deserialize;

use super::ConfigError;

/// `[realtime]`: the Realtime WebSocket route (`docs/protocol.md`, "Realtime";
/// `docs/realtime.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RealtimeConfig {
    /// Serve `GET /openai/realtime` (default `false`).
    pub enabled: bool,
    /// Most Realtime connections open at once per session (default 1).
    pub max_connections_per_session: u32,
    /// Longest Realtime connection, in seconds (default 1800). A connection also ends when the
    /// token that opened it expires or is revoked.
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

impl RealtimeConfig {
    /// Checks the section: at least one connection per session, and a duration.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections_per_session == 0 {
            return Err(ConfigError::invalid(
                "realtime.max_connections_per_session",
                "must be at least 1 (switch the route off with realtime.enabled = false)",
            ));
        }
        if self.max_duration_secs == 0 {
            return Err(ConfigError::invalid(
                "realtime.max_duration_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_connections_or_duration_are_refused() {
        assert!(RealtimeConfig::default().validate().is_ok());
        let enabled = RealtimeConfig {
            enabled: true,
            ..RealtimeConfig::default()
        };
        assert!(enabled.validate().is_ok());
        for (bad, key) in [
            (
                RealtimeConfig {
                    max_connections_per_session: 0,
                    ..enabled.clone()
                },
                "realtime.max_connections_per_session",
            ),
            (
                RealtimeConfig {
                    max_duration_secs: 0,
                    ..enabled.clone()
                },
                "realtime.max_duration_secs",
            ),
        ] {
            assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: k, .. }) if k == key));
        }
        #[cfg(feature = "toml")]
        {
            let config = crate::Config::from_toml_str(
                "[upstream]\napi_key = \"sk\"\n[realtime]\nenabled = true\nmax_duration_secs = 60\n",
            )
            .unwrap();
            assert!(config.realtime().enabled);
            assert_eq!(config.realtime().max_duration_secs, 60);
        }
    }
}
