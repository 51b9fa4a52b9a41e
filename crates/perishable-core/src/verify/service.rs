use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use super::VerifyLayer;
use crate::future::ResponseFuture;
use crate::session::Sessions;

/// Middleware that verifies the session of every request; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct Verify<S> {
    inner: S,
    sessions: Sessions,
}

impl<S> Verify<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, sessions: Sessions) -> Self {
        Self { inner, sessions }
    }

    /// A [`VerifyLayer`].
    pub fn layer(sessions: Sessions) -> VerifyLayer {
        VerifyLayer::new(sessions)
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Verify<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.sessions.verify(&req) {
            Ok(session) => {
                req.extensions_mut().insert(session);
                ResponseFuture::inner(self.inner.call(req))
            }
            Err(error) => {
                tracing::debug!(code = %error.code(), "session refused");
                ResponseFuture::refused(error.into_response())
            }
        }
    }
}
