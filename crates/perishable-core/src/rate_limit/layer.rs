use std::sync::Arc;

use tower::Layer;

use super::{KeyExtractor, RateLimit};
use crate::config::OnUnavailable;
use crate::store::RateLimiter;

/// Applies [`RateLimit`]; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct RateLimitLayer<X> {
    limiter: Arc<dyn RateLimiter>,
    extractor: X,
    on_unavailable: OnUnavailable,
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
        }
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
    }
}
