//! CORS: tower-http's [`CorsLayer`] for the configured origins, run only where a browser reads
//! its answer.
//!
//! A browser sends `Origin` on every cross-origin request and sends preflights as `OPTIONS`.
//! Those go through tower-http's [`Cors`] unchanged. Any other request (an SDK on a server, a
//! native app, a same-origin `GET`) has no CORS headers to receive: it skips the layer, whose
//! per-request cost is a header map built and merged into the response, and gets only the
//! `Vary` header tower-http would have added, so a shared cache keeps the two kinds of answer
//! apart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use perishable_core::Perishable;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

/// Request headers a browser may send cross-origin: the protocol's four, and those the official
/// OpenAI JavaScript SDK adds that the proxy forwards, so it works unchanged from a page. Never
/// `OpenAI-Organization` or `OpenAI-Project`: the proxy does not forward a client's choice of who
/// is billed. `upstream.forward_headers` are allowed too (see [`cors_layer`]).
pub const CORS_ALLOWED_HEADERS: [&str; 18] = [
    "authorization",
    "content-type",
    "dpop",
    "x-perishable-fingerprint",
    "accept",
    "openai-beta",
    "idempotency-key",
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-retry-count",
    "x-stainless-timeout",
    "x-stainless-async",
    "x-stainless-helper-method",
    "x-stainless-poll-helper",
];

/// Response headers a page may read: the refusal details and the upstream's request id.
pub const CORS_EXPOSED_HEADERS: [&str; 6] = [
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "www-authenticate",
    "x-request-id",
    "openai-processing-ms",
];

/// tower-http's `Vary` for a CORS layer with its default settings.
static VARY: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

/// tower-http's CORS layer for `cors.allowed_origins` (and `server.public_url`'s origin).
pub fn cors_layer(perishable: &Perishable) -> CorsLayer {
    let policy = perishable.origin_policy();
    let origins = if policy.is_any() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            policy
                .origins()
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers(
            CORS_ALLOWED_HEADERS
                .map(HeaderName::from_static)
                .into_iter()
                .chain(
                    perishable
                        .config()
                        .upstream()
                        .forward_headers
                        .iter()
                        .filter_map(|name| HeaderName::try_from(name.as_str()).ok()),
                )
                .collect::<Vec<_>>(),
        )
        .expose_headers(CORS_EXPOSED_HEADERS.map(HeaderName::from_static))
        // The same `Vary` on every answer, `"*"` included: tower-http leaves it out when the
        // origin does not change the answer, and the protocol has every preflight name it.
        .vary([
            header::ORIGIN,
            header::ACCESS_CONTROL_REQUEST_METHOD,
            header::ACCESS_CONTROL_REQUEST_HEADERS,
        ])
        .max_age(Duration::from_secs(600))
}

/// [`cors_layer`], applied only to requests with an `Origin` and to preflights; see the
/// [module docs](self).
#[derive(Clone, Debug)]
pub(crate) struct BrowserCorsLayer {
    /// Shared: axum clones the whole stack per request, and a `CorsLayer` clone allocates.
    cors: Arc<CorsLayer>,
}

impl BrowserCorsLayer {
    pub(crate) fn new(cors: CorsLayer) -> Self {
        Self {
            cors: Arc::new(cors),
        }
    }
}

impl<S> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> BrowserCors<S> {
        BrowserCors {
            inner,
            cors: self.cors.clone(),
        }
    }
}

/// The service of [`BrowserCorsLayer`].
#[derive(Clone, Debug)]
pub(crate) struct BrowserCors<S> {
    inner: S,
    cors: Arc<CorsLayer>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BrowserCors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BrowserCorsFuture<S::Future, <Cors<S> as Service<Request<ReqBody>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if req.method() == Method::OPTIONS || req.headers().contains_key(header::ORIGIN) {
            // The service made ready by `poll_ready` goes into the CORS layer; a clone stays.
            let clone = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, clone);
            BrowserCorsFuture::Cors {
                future: self.cors.layer(ready).call(req),
            }
        } else {
            BrowserCorsFuture::Plain {
                future: self.inner.call(req),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`BrowserCors`].
    #[project = BrowserCorsProj]
    pub(crate) enum BrowserCorsFuture<F, C> {
        Plain { #[pin] future: F },
        Cors { #[pin] future: C },
    }
}

impl<F, C, B, E> Future for BrowserCorsFuture<F, C>
where
    F: Future<Output = Result<Response<B>, E>>,
    C: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BrowserCorsProj::Plain { future } => {
                let mut response = ready!(future.poll(cx))?;
                response.headers_mut().append(header::VARY, VARY.clone());
                Poll::Ready(Ok(response))
            }
            BrowserCorsProj::Cors { future } => future.poll(cx),
        }
    }
}
