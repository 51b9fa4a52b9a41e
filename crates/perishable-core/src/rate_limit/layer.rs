use std::sync::Arc;

use tower::Layer;

use super::{KeyExtractor, Limiter, RateLimit};

/// Applies [`RateLimit`]; see the [module docs](super).
#[derive(Debug)]
pub struct RateLimitLayer<X: KeyExtractor> {
    limiter: Arc<Limiter<X::Key>>,
    extractor: X,
}

impl<X: KeyExtractor> Clone for RateLimitLayer<X> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<X: KeyExtractor> RateLimitLayer<X> {
    /// Limits requests by the key `extractor` picks, with `limiter`.
    pub fn new(limiter: Arc<Limiter<X::Key>>, extractor: X) -> Self {
        Self { limiter, extractor }
    }

    /// The limiter (shared by every service this layer makes).
    pub fn limiter(&self) -> &Arc<Limiter<X::Key>> {
        &self.limiter
    }
}

impl<S, X: KeyExtractor> Layer<S> for RateLimitLayer<X> {
    type Service = RateLimit<S, X>;

    fn layer(&self, inner: S) -> RateLimit<S, X> {
        RateLimit::new(inner, self.limiter.clone(), self.extractor.clone())
    }
}
