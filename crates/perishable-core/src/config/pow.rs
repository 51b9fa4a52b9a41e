//! `[pow]`: proof of work on minting.

use serde::Deserialize;

use super::ConfigError;

/// `[pow]`: proof of work on minting.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
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

impl PowConfig {
    /// Checks every key of the section.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.difficulty > 32 {
            return Err(ConfigError::invalid(
                "pow.difficulty",
                "must be at most 32 bits",
            ));
        }
        if self.challenge_ttl_secs == 0 {
            return Err(ConfigError::invalid(
                "pow.challenge_ttl_secs",
                "must be above 0",
            ));
        }
        Ok(())
    }
}
