//! `[realtime]`: the Realtime WebSocket route (not served by this version).

use serde::Deserialize;

use super::ConfigError;

/// `[realtime]`: the Realtime WebSocket route (`docs/protocol.md`, "Realtime"). This version does
/// not serve it: `enabled = true` is refused at build time.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
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

impl RealtimeConfig {
    /// Checks the section: this version refuses `enabled = true`.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled {
            return Err(ConfigError::invalid(
                "realtime.enabled",
                "the Realtime route is not available in this version",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_realtime_route_is_refused_in_this_version() {
        assert!(RealtimeConfig::default().validate().is_ok());
        let enabled = RealtimeConfig {
            enabled: true,
            ..RealtimeConfig::default()
        };
        assert!(matches!(
            enabled.validate(),
            Err(ConfigError::Invalid {
                key: "realtime.enabled",
                ..
            })
        ));
        #[cfg(feature = "toml")]
        assert!(
            crate::Config::from_toml_str(
                "[upstream]\napi_key = \"sk\"\n[realtime]\nenabled = true\n"
            )
            .is_err()
        );
    }
}
