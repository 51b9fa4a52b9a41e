//! `[budget]`: token budgets, the completion cap and the stream cap.

use serde::Deserialize;

use super::ConfigError;

/// Whose tokens a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BudgetScope {
    /// The client: its DPoP key when bound, else its fingerprint (across its sessions).
    #[default]
    Client,
    /// Each session on its own.
    Session,
}

/// `[budget]`: token budgets, the completion cap and the stream cap; see "Budgets" in
/// [`docs/protocol.md`](https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md#budgets).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BudgetConfig {
    /// Tokens per client per window; 0: no budget.
    pub tokens_per_window: u64,
    /// The budget window, in seconds.
    pub window_secs: u64,
    /// Cap on a request's `max_tokens` / `max_completion_tokens`; 0: none.
    pub max_completion_tokens: u64,
    /// Ask streamed chat completions for usage.
    pub include_usage: bool,
    /// Concurrent streams per session; 0: no cap.
    pub max_concurrent_streams: u32,
    /// Whose tokens the budget counts.
    pub scope: BudgetScope,
    /// Completion tokens reserved for a request that names no ceiling.
    pub default_reserve_tokens: u64,
    /// Tokens per client IP per window, whatever sessions the IP holds; 0: no per-IP budget.
    pub per_ip_tokens_per_window: u64,
    /// Tokens per window for the whole deployment; 0: no global budget.
    pub global_tokens_per_window: u64,
    /// `[budget.tiers.NAME]`: per-tier budgets, for an identity gate's tier claim.
    pub tiers: std::collections::BTreeMap<String, TierConfig>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            tokens_per_window: 0,
            window_secs: 3600,
            max_completion_tokens: 0,
            include_usage: true,
            max_concurrent_streams: 0,
            scope: BudgetScope::Client,
            default_reserve_tokens: 4096,
            per_ip_tokens_per_window: 0,
            global_tokens_per_window: 0,
            tiers: std::collections::BTreeMap::new(),
        }
    }
}

/// `[budget.tiers.NAME]`: the budget and limits of one tier of users, selected by the tier the
/// identity gate read (`mint.oidc.tier_claim`; the session carries it as `tier`). A session
/// without a tier, or with one not listed here, gets the defaults; a key a tier leaves out keeps
/// its default too.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TierConfig {
    /// Tokens per client per window for this tier (instead of `budget.tokens_per_window`).
    pub tokens_per_window: Option<u64>,
    /// The completion cap for this tier (instead of `budget.max_completion_tokens`; 0: none).
    pub max_completion_tokens: Option<u64>,
    /// Requests per `rate_limit.duration_secs` per client for this tier (instead of
    /// `rate_limit.points`; above 0).
    pub points: Option<u32>,
}

impl BudgetConfig {
    /// Checks every key of the section.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.window_secs == 0 {
            return Err(ConfigError::invalid(
                "budget.window_secs",
                "must be above 0",
            ));
        }
        if self.default_reserve_tokens == 0 {
            return Err(ConfigError::invalid(
                "budget.default_reserve_tokens",
                "must be above 0: a call that names no ceiling would reserve only its prompt",
            ));
        }
        for (name, tier) in &self.tiers {
            if tier.points == Some(0) {
                return Err(ConfigError::Invalid {
                    key: "budget.tiers",
                    reason: format!("[budget.tiers.{name}] points must be above 0"),
                });
            }
        }
        Ok(())
    }
}
