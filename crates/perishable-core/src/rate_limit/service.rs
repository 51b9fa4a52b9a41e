use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use super::{KeyExtractor, Limiter};
use crate::error::Error;
use crate::future::ResponseFuture;

/// Middleware that limits requests per key; see the [module docs](super).
#[derive(Debug)]
pub struct RateLimit<S, X: KeyExtractor> {
    inner: S,
    limiter: Arc<Limiter<X::Key>>,
    extractor: X,
}

impl<S: Clone, X: KeyExtractor> Clone for RateLimit<S, X> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S, X: KeyExtractor> RateLimit<S, X> {
    /// Wraps `inner`.
    pub fn new(inner: S, limiter: Arc<Limiter<X::Key>>, extractor: X) -> Self {
        Self {
            inner,
            limiter,
            extractor,
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
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    X: KeyExtractor,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        self.limiter.ensure_pruner();
        let key = match self.extractor.extract(&req) {
            Ok(key) => key,
            Err(error) => return ResponseFuture::refused(error.into_response()),
        };
        match self.limiter.check(&key) {
            Ok(_) => ResponseFuture::inner(self.inner.call(req)),
            Err(info) => ResponseFuture::refused(Error::rate_limited(info).into_response()),
        }
    }
}
