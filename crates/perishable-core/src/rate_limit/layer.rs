use std::sync::Arc;

use tower::Layer;

use super::service::Tiers;
use super::{KeyExtractor, RateLimit};
use crate::config::OnUnavailable;
use crate::store::RateLimiter;

/// Applies [`RateLimit`]; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct RateLimitLayer<X> {
    limiter: Arc<dyn RateLimiter>,
    extractor: X,
    on_unavailable: OnUnavailable,
    tiers: Tiers,
    defer: bool,
}

impl<X: KeyExtractor> RateLimitLayer<X> {
    /// Limits requests by the key `extractor` picks, with `limiter`. When the limiter's store
    /// fails, requests are refused (`503 store_unavailable`); see
    /// [`on_unavailable`](Self::on_unavailable).
    pub fn new(limiter: Arc<dyn RateLimiter>, extractor: X) -> Self {
        Self {
            limiter,
            extractor,
            on_unavailable: OnUnavailable::Closed,
            tiers: Arc::new([]),
            defer: false,
        }
    }

    /// Leaves the count of each call to the upstream Service behind, which asks the store once
    /// for the count, the stream slot and the reservation. Only for a stack whose inner service
    /// is the [`UpstreamService`](crate::upstream::UpstreamService) (as in
    /// [`Perishable::proxy_rate_limit_layer`](crate::Perishable::proxy_rate_limit_layer)).
    pub(crate) fn deferring(mut self) -> Self {
        self.defer = true;
        self
    }

    /// Limits the sessions of tier `tier` (the token's `tier` claim, from
    /// `mint.oidc.tier_claim` or a gate's [`Facts`](crate::gate::Facts)) with `limiter` instead
    /// of the default one, under keys of their own. Sessions of other tiers, and without one,
    /// keep the default. [`Perishable::rate_limit_layer`](crate::Perishable::rate_limit_layer)
    /// adds one per `[budget.tiers.NAME]` that sets `points`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use perishable_core::rate_limit::{FingerprintKey, RateLimitLayer};
    /// use perishable_core::store::{MemoryStore, RatePolicy, Store};
    ///
    /// let policy = |points| RatePolicy {
    ///     name: "session",
    ///     points,
    ///     window: Duration::from_secs(60),
    ///     block: Duration::ZERO,
    /// };
    /// let store = MemoryStore::new();
    /// let layer = RateLimitLayer::new(store.rate_limiter(policy(100)), FingerprintKey)
    ///     .tier("pro", store.rate_limiter(policy(1_000)));
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn tier(mut self, tier: impl Into<String>, limiter: Arc<dyn RateLimiter>) -> Self {
        let tier = tier.into();
        let mut tiers: Vec<_> = self
            .tiers
            .iter()
            .filter(|(name, _)| *name != tier)
            .cloned()
            .collect();
        tiers.push((tier, limiter));
        self.tiers = tiers.into();
        self
    }

    /// What to do when the store fails: refuse (`Closed`) or let the request through (`Open`).
    #[must_use]
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.on_unavailable = policy;
        self
    }

    /// The limiter (shared by every service this layer makes).
    pub fn limiter(&self) -> &Arc<dyn RateLimiter> {
        &self.limiter
    }
}

impl<S, X: KeyExtractor> Layer<S> for RateLimitLayer<X> {
    type Service = RateLimit<S, X>;

    fn layer(&self, inner: S) -> RateLimit<S, X> {
        RateLimit::new(
            inner,
            self.limiter.clone(),
            self.extractor.clone(),
            self.on_unavailable,
        )
        .with_tiers(self.tiers.clone())
        .deferring(self.defer)
    }
}
