//! `[rate_limit]`: per-client request limits.

use serde::Deserialize;

use super::ConfigError;

/// `[rate_limit]`: per-client request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
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

impl RateLimitConfig {
    /// Checks every key of the section.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
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
        Ok(())
    }
}
