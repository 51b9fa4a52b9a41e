//! The split between the proxy and the other routes, behind the router's outer layers.
//!
//! `/openai` and everything under `/openai/` ([`Route::Proxy`]) go straight to the authenticated
//! upstream stack
//! (verify, rate limit, upstream): the hot path pays for one prefix test instead of a second
//! trip through axum's routing, boxing and response mapping. Every other path goes to an axum
//! [`Router`] of the session routes, which answers unknown paths and methods itself.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::Request;
use perishable_core::Route;
use tower::Service;

/// Sends proxy paths to `proxy`, the rest to `routes`; see the [module docs](self).
#[derive(Clone, Debug)]
pub(crate) struct Dispatch<P> {
    proxy: P,
    routes: Router,
}

impl<P> Dispatch<P> {
    pub(crate) fn new(proxy: P, routes: Router) -> Self {
        Self { proxy, routes }
    }
}

impl<P, B> Service<Request<Body>> for Dispatch<P>
where
    P: Service<Request<Body>, Response = http::Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = DispatchFuture<P::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready!(self.proxy.poll_ready(cx))?;
        <Router as Service<Request<Body>>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if Route::is_proxied(req.uri().path()) {
            DispatchFuture::Proxy {
                future: self.proxy.call(req),
            }
        } else {
            DispatchFuture::Routes {
                future: self.routes.call(req),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Dispatch`].
    #[project = DispatchProj]
    pub(crate) enum DispatchFuture<F> {
        Proxy { #[pin] future: F },
        Routes { #[pin] future: axum::routing::future::RouteFuture<Infallible> },
    }
}

impl<F, B> Future for DispatchFuture<F>
where
    F: Future<Output = Result<http::Response<B>, Infallible>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            DispatchProj::Proxy { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(Body::new)))
            }
            DispatchProj::Routes { future } => future.poll(cx),
        }
    }
}
