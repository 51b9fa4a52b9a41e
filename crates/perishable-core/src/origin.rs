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
pub use crate::future::ResponseFuture;

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
    crate::macros::define_inner_service_accessors!();
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
            Some(origin) if !self.policy.allows(origin.as_bytes()) => {
                let mut refusal = Error::new(
                    ErrorCode::OriginNotAllowed,
                    "this origin is not allowed to call the service",
                )
                .into_response();
                // The answer depends on `Origin`: a shared cache must not give it to another.
                refusal
                    .headers_mut()
                    .append(http::header::VARY, http::HeaderValue::from_static("origin"));
                ResponseFuture::refused(refusal)
            }
            _ => ResponseFuture::inner(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::Body;

    const APP: &str = "https://app.example.com";
    const PUBLIC: &str = "https://api.example.com";

    fn app(
        policy: OriginPolicy,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
        ServiceBuilder::new()
            .layer(OriginLayer::new(policy))
            .service(service_fn(move |_req: Request<Body>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Body::from("inner"))) }
            }))
    }

    fn policy() -> OriginPolicy {
        OriginPolicy::new([APP.to_owned()], Some(PUBLIC))
    }

    fn with_origin(origin: Option<&str>) -> Request<Body> {
        let mut builder = Request::post("/session");
        if let Some(origin) = origin {
            builder = builder.header(ORIGIN, origin);
        }
        builder.body(Body::empty()).unwrap()
    }

    async fn status_of(policy: OriginPolicy, origin: Option<&str>) -> (StatusCode, usize) {
        let calls = Arc::new(AtomicUsize::new(0));
        let response = app(policy, calls.clone())
            .oneshot(with_origin(origin))
            .await
            .unwrap();
        (response.status(), calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn no_origin_passes() {
        assert_eq!(status_of(policy(), None).await, (StatusCode::OK, 1));
        assert_eq!(
            status_of(OriginPolicy::default(), None).await,
            (StatusCode::OK, 1)
        );
    }

    #[tokio::test]
    async fn an_allowed_origin_passes() {
        assert_eq!(status_of(policy(), Some(APP)).await, (StatusCode::OK, 1));
    }

    #[tokio::test]
    async fn the_public_origin_passes() {
        assert_eq!(status_of(policy(), Some(PUBLIC)).await, (StatusCode::OK, 1));
        // Only as the second argument: without it the same origin is refused.
        let without = OriginPolicy::new([APP.to_owned()], None);
        assert_eq!(
            status_of(without, Some(PUBLIC)).await,
            (StatusCode::FORBIDDEN, 0)
        );
    }

    #[tokio::test]
    async fn another_origin_is_refused_before_the_inner_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let response = app(policy(), calls.clone())
            .oneshot(with_origin(Some("https://evil.example")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["code"], "origin_not_allowed");
        assert_eq!(body["error"]["type"], "permission_error");
    }

    #[tokio::test]
    async fn matching_is_exact() {
        for origin in [
            "https://app.example.com.evil.example",
            "https://evil.app.example.com",
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://APP.example.com",
            "null",
            "",
        ] {
            assert_eq!(
                status_of(policy(), Some(origin)).await,
                (StatusCode::FORBIDDEN, 0),
                "{origin:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_trailing_slash_in_the_configuration_is_ignored() {
        let policy = OriginPolicy::new(["https://app.example.com/".to_owned()], None);
        assert_eq!(status_of(policy, Some(APP)).await, (StatusCode::OK, 1));
    }

    #[tokio::test]
    async fn a_wildcard_allows_any_origin() {
        let any = OriginPolicy::new(["*".to_owned()], None);
        assert!(any.is_any());
        for origin in ["https://evil.example", "null", APP] {
            assert_eq!(
                status_of(any.clone(), Some(origin)).await,
                (StatusCode::OK, 1),
                "{origin:?}"
            );
        }
        assert!(!policy().is_any());
    }

    #[tokio::test]
    async fn one_service_checks_every_request() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = app(policy(), calls.clone());
        let cases = [
            (Some(APP), StatusCode::OK),
            (Some("https://evil.example"), StatusCode::FORBIDDEN),
            (None, StatusCode::OK),
        ];
        for (origin, status) in cases {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(with_origin(origin))
                .await
                .unwrap();
            assert_eq!(response.status(), status, "{origin:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn accessors_reach_the_inner_service() {
        let svc = OriginLayer::new(policy()).layer(7_u8);
        assert_eq!(*svc.get_ref(), 7);
        assert_eq!(svc.into_inner(), 7);
    }
}
