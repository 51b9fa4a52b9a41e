use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use tower::Service;

use super::KeyExtractor;
use crate::config::OnUnavailable;
use crate::error::{Error, RateLimitInfo};
use crate::store::{RateLimiter, log_failure};

/// Middleware that limits requests per key; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct RateLimit<S, X> {
    inner: S,
    limiter: Arc<dyn RateLimiter>,
    extractor: X,
    on_unavailable: OnUnavailable,
    tiers: Tiers,
    /// Leave the count of a call to the upstream Service behind (see [`Deferred`]).
    defer: bool,
}

/// A rate-limit count left to the upstream Service, so that the store is asked once per call
/// (the count, the stream slot and the reservation in one [`Store::admit_call`]).
///
/// Only `Perishable`'s proxy stack defers, where the inner service is known to be the
/// [`UpstreamService`](crate::upstream::UpstreamService), which takes this extension and counts
/// the request whatever happens to it. A limiter that answers from memory, and WebSocket
/// upgrades (served before the upstream Service), are never deferred.
///
/// [`Store::admit_call`]: crate::store::Store::admit_call
#[derive(Debug, Clone)]
pub(crate) struct Deferred {
    pub(crate) limiter: Arc<dyn RateLimiter>,
    pub(crate) key: String,
}

impl Deferred {
    /// Counts the request on its own, in the background: for a call refused before its
    /// admission, so that refused requests are still counted.
    pub(crate) fn count_anyway(self) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = self.limiter.check(&self.key).await {
                    log_failure("rate_limit", &e, "a refused request was not counted");
                }
            });
        }
    }

    /// The `429 rate_limited` error for `decision`.
    pub(crate) fn refusal(&self, decision: crate::store::RateDecision) -> Error {
        refusal_error(&*self.limiter, decision)
    }
}

/// The limiters of sessions of a tier (`budget.tiers.NAME.points`), by tier name; empty unless
/// tiers set their own limits.
pub(crate) type Tiers = Arc<[(String, Arc<dyn RateLimiter>)]>;

/// The limiter for `req` and the key to count it under: its session's tier's, when that tier
/// has one (under a key of the tier's own, so a client whose tier changes starts afresh), else
/// the default.
fn select<'t, B>(
    default: &'t Arc<dyn RateLimiter>,
    tiers: &'t Tiers,
    req: &Request<B>,
    key: String,
) -> (&'t Arc<dyn RateLimiter>, String) {
    if tiers.is_empty() {
        return (default, key);
    }
    let tier = req
        .extensions()
        .get::<crate::token::VerifiedSession>()
        .and_then(|session| session.claims.tier.as_deref());
    match tier.and_then(|tier| tiers.iter().find(|(name, _)| name == tier)) {
        // The tier's length first: distinct (tier, key) pairs never share a store key.
        Some((name, limiter)) => (limiter, format!("{}:{name}:{key}", name.len())),
        None => (default, key),
    }
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
            tiers: Arc::new([]),
            defer: false,
        }
    }

    /// Defers the count of calls to the upstream Service behind ([`Deferred`]).
    pub(crate) fn deferring(mut self, defer: bool) -> Self {
        self.defer = defer;
        self
    }

    /// These limiters for sessions of their tiers.
    pub(crate) fn with_tiers(mut self, tiers: Tiers) -> Self {
        self.tiers = tiers;
        self
    }

    crate::macros::define_inner_service_accessors!();
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
    type Future = RateLimitFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let key = match self.extractor.extract(&req) {
            Ok(key) => key,
            Err(error) => {
                return RateLimitFuture::new(Either::Left(Either::Left(ready(Ok(
                    error.into_response()
                )))));
            }
        };
        let (limiter, key) = select(&self.limiter, &self.tiers, &req, key);
        // A limiter in memory decides at once: call the inner service, which was polled ready.
        if let Some(decision) = limiter.check_now(&key) {
            return if decision.allowed {
                RateLimitFuture::new(Either::Left(Either::Right(self.inner.call(req))))
            } else {
                RateLimitFuture::new(Either::Left(Either::Left(ready(Ok(refusal(
                    &**limiter, &req, decision,
                ))))))
            };
        }
        let limiter = limiter.clone();
        // An upgrade (a Realtime WebSocket) is served before the upstream Service: counted here.
        if self.defer && !req.headers().contains_key(http::header::UPGRADE) {
            req.extensions_mut().insert(Deferred { limiter, key });
            return RateLimitFuture::new(Either::Left(Either::Right(self.inner.call(req))));
        }
        // The clone that was polled ready goes into the future (tower's "be careful when
        // cloning inner services").
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let on_unavailable = self.on_unavailable;
        RateLimitFuture::new(Either::Right(Box::pin(async move {
            match limiter.check(&key).await {
                Ok(decision) if decision.allowed => inner.call(req).await,
                Ok(decision) => Ok(refusal(&*limiter, &req, decision)),
                Err(e) if on_unavailable == OnUnavailable::Open => {
                    log_failure("rate_limit", &e, "skipped the rate limit (fail open)");
                    inner.call(req).await
                }
                Err(e) => Ok(crate::store::refuse("rate_limit", &e).into_response()),
            }
        })))
    }
}

/// What [`RateLimitFuture`] holds: a refusal, the inner service's future (a limiter in memory
/// decided at once), or, when the store must be waited for, a boxed future doing the rest.
type Decided<F, ResBody, E> = Either<
    Either<Ready<Result<Response<ResBody>, E>>, F>,
    Pin<Box<dyn Future<Output = Result<Response<ResBody>, E>> + Send>>,
>;

crate::macros::opaque_future! {
    /// The response future of [`RateLimit`]: a refusal, or the inner service's answer.
    pub type RateLimitFuture<F, ResBody, E> = Decided<F, ResBody, E>;
}

/// The `429 rate_limited` error for `decision`.
fn refusal_error(limiter: &dyn RateLimiter, decision: crate::store::RateDecision) -> Error {
    let policy = limiter.policy();
    Error::rate_limited(RateLimitInfo {
        policy: policy.name,
        quota: policy.points,
        window_secs: policy.window.as_secs().max(1),
        remaining: decision.remaining,
        retry_after: decision.retry_after,
    })
}

/// The `429 rate_limited` answer for `decision`.
fn refusal<B, ResBody: From<Bytes>>(
    limiter: &dyn RateLimiter,
    req: &Request<B>,
    decision: crate::store::RateDecision,
) -> Response<ResBody> {
    let session = req
        .extensions()
        .get::<crate::token::VerifiedSession>()
        .map(|s| s.session_id().to_owned());
    let refusal = refusal_error(limiter, decision);
    match session {
        Some(id) => refusal.with_session(id),
        None => refusal,
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::StatusCode;
    use http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
    use http_body_util::BodyExt;
    use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::Body;
    use crate::error::ErrorCode;
    use crate::error::Refusal;
    use crate::rate_limit::{FingerprintKey, RateLimitLayer};
    use crate::store::{MemoryStore, RateDecision, RatePolicy, Store, StoreError, StoreFuture};
    use crate::token::Claims;
    use crate::token::VerifiedSession;

    /// Keys on the `x-client` header; refuses requests without one as `missing_token`.
    #[derive(Debug, Clone)]
    struct HeaderKey;

    impl KeyExtractor for HeaderKey {
        fn extract<B>(&self, req: &Request<B>) -> Result<String, Error> {
            req.headers()
                .get("x-client")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| Error::new(ErrorCode::MissingToken, "no x-client header"))
        }
    }

    /// A limiter whose store never answers in time.
    #[derive(Debug)]
    struct FailingLimiter {
        policy: RatePolicy,
        checks: AtomicUsize,
    }

    impl RateLimiter for FailingLimiter {
        fn check<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, RateDecision> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(StoreError::Timeout) })
        }

        fn policy(&self) -> &RatePolicy {
            &self.policy
        }
    }

    fn policy(points: u32) -> RatePolicy {
        RatePolicy {
            name: "unit",
            points,
            window: Duration::from_secs(60),
            block: Duration::ZERO,
        }
    }

    fn app<X: KeyExtractor>(
        layer: RateLimitLayer<X>,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |_req: Request<Body>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Body::from("inner"))) }
            }))
    }

    fn from(client: &str) -> Request<Body> {
        Request::get("/openai/models")
            .header("x-client", client)
            .body(Body::empty())
            .unwrap()
    }

    async fn error_body(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn over_the_limit_gets_429_with_the_protocol_headers() {
        let limiter = MemoryStore::new().rate_limiter(policy(3));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = app(RateLimitLayer::new(limiter, HeaderKey), calls.clone());

        for _ in 0..3 {
            let response = svc.ready().await.unwrap().call(from("a")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let refused = svc.ready().await.unwrap().call(from("a")).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "the inner service is not called"
        );
        let headers = refused.headers();
        let retry_after: u64 = headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        assert_eq!(headers["ratelimit-policy"], "\"unit\";q=3;w=60");
        assert_eq!(
            headers["ratelimit"].to_str().unwrap(),
            format!("\"unit\";r=0;t={retry_after}")
        );
        let refusal = refused.extensions().get::<Refusal>().unwrap();
        assert_eq!(refusal.code, ErrorCode::RateLimited);
        assert_eq!(refusal.session_id, None);
        let body = error_body(refused).await;
        assert_eq!(body["error"]["code"], "rate_limited");
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }

    #[tokio::test]
    async fn keys_are_limited_separately() {
        let limiter = MemoryStore::new().rate_limiter(policy(1));
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(RateLimitLayer::new(limiter, HeaderKey), calls.clone());

        assert_eq!(svc.clone().oneshot(from("a")).await.unwrap().status(), 200);
        assert_eq!(svc.clone().oneshot(from("a")).await.unwrap().status(), 429);
        assert_eq!(svc.clone().oneshot(from("b")).await.unwrap().status(), 200);
        assert_eq!(svc.oneshot(from("b")).await.unwrap().status(), 429);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn services_from_one_layer_share_the_limit() {
        let layer = RateLimitLayer::new(MemoryStore::new().rate_limiter(policy(1)), HeaderKey);
        let calls = Arc::new(AtomicUsize::new(0));
        let first = app(layer.clone(), calls.clone());
        let second = app(layer, calls.clone());
        assert_eq!(first.oneshot(from("a")).await.unwrap().status(), 200);
        assert_eq!(second.oneshot(from("a")).await.unwrap().status(), 429);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_extractor_error_refuses_with_its_code() {
        let limiter = MemoryStore::new().rate_limiter(policy(10));
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(RateLimitLayer::new(limiter, HeaderKey), calls.clone());
        let response = svc
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(WWW_AUTHENTICATE));
        assert_eq!(error_body(response).await["error"]["code"], "missing_token");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    fn verified(jti: &str, fp: &str) -> VerifiedSession {
        VerifiedSession {
            claims: std::sync::Arc::new(Claims {
                iss: "perishable".to_owned(),
                aud: "perishable".to_owned(),
                jti: jti.to_owned(),
                iat: 0,
                nbf: 0,
                exp: u64::MAX,
                auth_time: 0,
                fp: fp.to_owned(),
                ua: None,
                cnf: None,
                usr: None,
                tier: None,
            }),
        }
    }

    fn with_session(session: VerifiedSession) -> Request<Body> {
        let mut req = Request::get("/openai/models").body(Body::empty()).unwrap();
        req.extensions_mut().insert(session);
        req
    }

    #[tokio::test]
    async fn fingerprint_key_limits_the_device_across_sessions() {
        let limiter = MemoryStore::new().rate_limiter(policy(1));
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(RateLimitLayer::new(limiter, FingerprintKey), calls.clone());

        let ok = svc
            .clone()
            .oneshot(with_session(verified("s1", "fp-a")))
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        // A fresh session of the same device shares its limit.
        let refused = svc
            .clone()
            .oneshot(with_session(verified("s2", "fp-a")))
            .await
            .unwrap();
        assert_eq!(refused.status(), 429);
        let refusal = refused.extensions().get::<Refusal>().unwrap();
        assert_eq!(refusal.session_id.as_deref(), Some("s2"));
        // Another device does not.
        let other = svc
            .clone()
            .oneshot(with_session(verified("s3", "fp-b")))
            .await
            .unwrap();
        assert_eq!(other.status(), 200);
        // No verified session: refused as unauthenticated.
        let anonymous = svc
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(anonymous.status(), 401);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    fn of_tier(jti: &str, fp: &str, tier: Option<&str>) -> Request<Body> {
        let mut claims = (*verified(jti, fp).claims).clone();
        claims.tier = tier.map(str::to_owned);
        with_session(VerifiedSession {
            claims: Arc::new(claims),
        })
    }

    #[tokio::test]
    async fn a_tier_with_a_limiter_of_its_own_uses_it() {
        let store = MemoryStore::new();
        let layer = RateLimitLayer::new(store.rate_limiter(policy(1)), FingerprintKey)
            .tier("pro", store.rate_limiter(policy(3)))
            // Named twice: the last limiter wins.
            .tier("team", store.rate_limiter(policy(5)))
            .tier("team", store.rate_limiter(policy(2)));
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(layer, calls.clone());
        let status = |req| {
            let svc = svc.clone();
            async move { svc.oneshot(req).await.unwrap().status().as_u16() }
        };
        // Default: 1; a tier not listed gets the default too.
        assert_eq!(status(of_tier("s1", "fp-a", None)).await, 200);
        assert_eq!(status(of_tier("s1", "fp-a", None)).await, 429);
        assert_eq!(status(of_tier("s2", "fp-b", Some("free"))).await, 200);
        assert_eq!(status(of_tier("s2", "fp-b", Some("free"))).await, 429);
        // Pro: 3, under a key of its own (the same device, already limited by default, starts
        // afresh when its tier changes).
        for _ in 0..3 {
            assert_eq!(status(of_tier("s3", "fp-a", Some("pro"))).await, 200);
        }
        let refused = svc
            .clone()
            .oneshot(of_tier("s3", "fp-a", Some("pro")))
            .await
            .unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.headers()["ratelimit-policy"], "\"unit\";q=3;w=60");
        for _ in 0..2 {
            assert_eq!(status(of_tier("s4", "fp-c", Some("team"))).await, 200);
        }
        assert_eq!(status(of_tier("s4", "fp-c", Some("team"))).await, 429);
        assert_eq!(calls.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn tier_keys_never_collide() {
        let default: Arc<dyn RateLimiter> = MemoryStore::new().rate_limiter(policy(1));
        let tiers: Tiers = vec![
            ("a".to_owned(), default.clone()),
            ("a:1".to_owned(), default.clone()),
        ]
        .into();
        let key = |tier: &str, key: &str| {
            select(
                &default,
                &tiers,
                &of_tier("s", "fp", Some(tier)),
                key.to_owned(),
            )
            .1
        };
        assert_eq!(key("a", "usr:x"), "1:a:usr:x");
        assert_ne!(key("a", "1:usr:x"), key("a:1", "usr:x"));
    }

    #[tokio::test]
    async fn a_failing_store_fails_closed_by_default() {
        let limiter = Arc::new(FailingLimiter {
            policy: policy(10),
            checks: AtomicUsize::new(0),
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(
            RateLimitLayer::new(limiter.clone(), HeaderKey),
            calls.clone(),
        );
        let response = svc.oneshot(from("a")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = error_body(response).await;
        assert_eq!(body["error"]["code"], "store_unavailable");
        assert_eq!(body["error"]["type"], "api_error");
        assert_eq!(limiter.checks.load(Ordering::SeqCst), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_failing_store_can_fail_open() {
        let limiter = Arc::new(FailingLimiter {
            policy: policy(10),
            checks: AtomicUsize::new(0),
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let layer =
            RateLimitLayer::new(limiter.clone(), HeaderKey).on_unavailable(OnUnavailable::Open);
        let svc = app(layer, calls.clone());
        let response = svc.oneshot(from("a")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"inner");
        assert_eq!(limiter.checks.load(Ordering::SeqCst), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn fail_open_still_honours_extractor_refusals() {
        let limiter = Arc::new(FailingLimiter {
            policy: policy(10),
            checks: AtomicUsize::new(0),
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let layer =
            RateLimitLayer::new(limiter.clone(), HeaderKey).on_unavailable(OnUnavailable::Open);
        let svc = app(layer, calls.clone());
        let response = svc
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(limiter.checks.load(Ordering::SeqCst), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn accessors_reach_the_inner_service() {
        let layer = RateLimitLayer::new(MemoryStore::new().rate_limiter(policy(1)), HeaderKey);
        let mut svc = layer.layer(7_u8);
        assert_eq!(*svc.get_ref(), 7);
        *svc.get_mut() = 8;
        assert_eq!(svc.into_inner(), 8);
    }
}
