use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};

use super::Realtime;
use crate::body::{Body, BoxError};

/// Middleware that serves the Realtime route's WebSocket upgrades and passes every other
/// request to `inner`; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct RealtimeService<S> {
    inner: S,
    realtime: Option<Arc<Realtime>>,
}

impl<S> RealtimeService<S> {
    pub(crate) fn new(inner: S, realtime: Option<Arc<Realtime>>) -> Self {
        Self { inner, realtime }
    }

    crate::macros::define_inner_service_accessors!();
}

type Opening = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

crate::macros::opaque_future! {
    /// The response future of [`RealtimeService`]: the `101` (or a refusal) of a Realtime
    /// upgrade, or the inner service's answer.
    pub type RealtimeFuture<F> = Either<Opening, F>;
}

impl<S, B> tower::Service<Request<B>> for RealtimeService<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RealtimeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match &self.realtime {
            Some(realtime) if Realtime::serves(&req) => {
                let realtime = realtime.clone();
                let session = req
                    .extensions()
                    .get::<crate::VerifiedSession>()
                    .map(|s| s.session_id().to_owned());
                RealtimeFuture::new(Either::Left(Box::pin(async move {
                    Ok(match realtime.open(req).await {
                        Ok(response) => response,
                        Err(error) => match session {
                            Some(id) => error.with_session(id),
                            None => error,
                        }
                        .into_response(),
                    })
                })))
            }
            _ => RealtimeFuture::new(Either::Right(self.inner.call(req))),
        }
    }
}
