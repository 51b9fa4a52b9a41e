//! The origin check: a request whose `Origin` is present and not allowed gets
//! `403 origin_not_allowed`, before anything else runs (CORS preflights included).
//!
//! Allowed: the origins of `cors.allowed_origins` (exact match), anything when it holds `"*"`,
//! and the origin of `server.public_url` (the service's own pages). Requests with no `Origin`
//! (native apps, servers, SDKs outside a browser) are not affected.
//!
//! ```
//! use perishable_core::origin::{OriginLayer, OriginPolicy};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = OriginPolicy::new(["https://app.example.com".to_owned()], None);
//! let app = ServiceBuilder::new().layer(OriginLayer::new(policy)).service(service_fn(
//!     |_req: http::Request<()>| async { Ok::<_, std::convert::Infallible>(http::Response::new(bytes::Bytes::new())) },
//! ));
//! let req = http::Request::post("/session").header("origin", "https://evil.example").body(())?;
//! assert_eq!(app.oneshot(req).await?.status(), 403);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::ORIGIN;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::error::{Error, ErrorCode};
use crate::future::ResponseFuture;

/// Which origins may call.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    any: bool,
    allowed: Arc<[String]>,
}

impl OriginPolicy {
    /// Allows `origins` (exact, or `"*"` for any) and the origin of `public_origin`.
    pub fn new(origins: impl IntoIterator<Item = String>, public_origin: Option<&str>) -> Self {
        let mut allowed: Vec<String> = origins
            .into_iter()
            .map(|o| o.trim_end_matches('/').to_owned())
            .collect();
        let any = allowed.iter().any(|o| o == "*");
        allowed.extend(public_origin.map(str::to_owned));
        Self {
            any,
            allowed: allowed.into(),
        }
    }

    /// Whether `origin` may call.
    pub fn allows(&self, origin: &[u8]) -> bool {
        self.any || self.allowed.iter().any(|o| o.as_bytes() == origin)
    }

    /// The configured origins (without `server.public_url`'s), for CORS.
    pub fn is_any(&self) -> bool {
        self.any
    }

    /// Every allowed origin.
    pub fn origins(&self) -> &[String] {
        &self.allowed
    }
}

/// Applies [`OriginCheck`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct OriginLayer {
    policy: OriginPolicy,
}

impl OriginLayer {
    /// A layer enforcing `policy`.
    pub fn new(policy: OriginPolicy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for OriginLayer {
    type Service = OriginCheck<S>;

    fn layer(&self, inner: S) -> OriginCheck<S> {
        OriginCheck {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Middleware refusing disallowed origins; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct OriginCheck<S> {
    inner: S,
    policy: OriginPolicy,
}

impl<S> OriginCheck<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for OriginCheck<S>
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

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match req.headers().get(ORIGIN) {
            Some(origin) if !self.policy.allows(origin.as_bytes()) => ResponseFuture::refused(
                Error::new(
                    ErrorCode::OriginNotAllowed,
                    "this origin is not allowed to call the service",
                )
                .into_response(),
            ),
            _ => ResponseFuture::inner(self.inner.call(req)),
        }
    }
}
