use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use super::KeyExtractor;
use crate::config::OnUnavailable;
use crate::error::{Error, ErrorCode, RateLimitInfo};
use crate::store::{RateLimiter, log_failure};

/// Middleware that limits requests per key; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct RateLimit<S, X> {
    inner: S,
    limiter: Arc<dyn RateLimiter>,
    extractor: X,
    on_unavailable: OnUnavailable,
}

impl<S, X: KeyExtractor> RateLimit<S, X> {
    /// Wraps `inner`.
    pub fn new(
        inner: S,
        limiter: Arc<dyn RateLimiter>,
        extractor: X,
        on_unavailable: OnUnavailable,
    ) -> Self {
        Self {
            inner,
            limiter,
            extractor,
            on_unavailable,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, X, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, X>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    X: KeyExtractor,
    ReqBody: Send + 'static,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready goes into the future (tower's "be careful when
        // cloning inner services").
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let key = self.extractor.extract(&req);
        let limiter = self.limiter.clone();
        let on_unavailable = self.on_unavailable;
        Box::pin(async move {
            let key = match key {
                Ok(key) => key,
                Err(error) => return Ok(error.into_response()),
            };
            match limiter.check(&key).await {
                Ok(decision) if decision.allowed => inner.call(req).await,
                Ok(decision) => {
                    let policy = limiter.policy();
                    let session = req
                        .extensions()
                        .get::<crate::verify::VerifiedSession>()
                        .map(|s| s.session_id().to_owned());
                    let refusal = Error::rate_limited(RateLimitInfo {
                        policy: policy.name,
                        quota: policy.points,
                        window_secs: policy.window.as_secs().max(1),
                        remaining: decision.remaining,
                        retry_after: decision.retry_after,
                    });
                    Ok(match session {
                        Some(id) => refusal.with_session(id),
                        None => refusal,
                    }
                    .into_response())
                }
                Err(e) if on_unavailable == OnUnavailable::Open => {
                    log_failure("rate_limit", &e, "skipped the rate limit (fail open)");
                    inner.call(req).await
                }
                Err(e) => {
                    log_failure("rate_limit", &e, "refused (fail closed)");
                    Ok(Error::new(
                        ErrorCode::StoreUnavailable,
                        "the rate limiter's store is unavailable: try again shortly",
                    )
                    .into_response())
                }
            }
        })
    }
}
