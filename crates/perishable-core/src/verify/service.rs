use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use super::VerifyLayer;
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
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready goes into the future (tower's "be careful when
        // cloning inner services").
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verify = self.sessions.verify(&req);
        Box::pin(async move {
            match verify.await {
                Ok(session) => {
                    tracing::Span::current().record("session_id", session.session_id());
                    req.extensions_mut().insert(session);
                    inner.call(req).await
                }
                Err(error) => {
                    tracing::debug!(code = %error.code(), "session refused");
                    Ok(error.into_response())
                }
            }
        })
    }
}
