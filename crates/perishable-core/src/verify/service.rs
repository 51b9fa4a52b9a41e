use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use tower::Service;

use super::VerifyLayer;
use crate::session::Sessions;

/// Middleware that verifies the session of every request; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct Verify<S> {
    inner: S,
    sessions: Sessions,
    /// Leave DPoP replay records to the upstream Service's admission
    /// ([`crate::session::DeferredReplay`]).
    defer: bool,
}

impl<S> Verify<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, sessions: Sessions) -> Self {
        Self {
            inner,
            sessions,
            defer: false,
        }
    }

    /// Leaves DPoP replay records to the upstream Service's admission.
    pub(crate) fn deferring(mut self, defer: bool) -> Self {
        self.defer = defer;
        self
    }

    /// A [`VerifyLayer`].
    pub fn layer(sessions: Sessions) -> VerifyLayer {
        VerifyLayer::new(sessions)
    }

    crate::macros::define_inner_service_accessors!();
}

/// What [`VerifyFuture`] holds: a refusal, the inner service's future (the session was checked
/// at once), or, when the store must be waited for, a boxed future doing the rest.
type Checked<F, ResBody, E> = Either<
    Either<Ready<Result<Response<ResBody>, E>>, F>,
    Pin<Box<dyn Future<Output = Result<Response<ResBody>, E>> + Send>>,
>;

crate::macros::opaque_future! {
    /// The response future of [`Verify`]: a refusal, or the inner service's answer.
    pub type VerifyFuture<F, ResBody, E> = Checked<F, ResBody, E>;
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
    type Future = VerifyFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // A browser's Realtime WebSocket carries its credentials as subprotocols.
        if let Err(error) = crate::realtime::lift_credentials(&mut req) {
            tracing::debug!(code = %error.code(), "session refused");
            return VerifyFuture::new(Either::Left(Either::Left(ready(Ok(error
                .authenticating()
                .into_response())))));
        }
        // In the proxy stack, a replay record the store cannot make at once joins the upstream
        // Service's admission (one store call). Upgrades are served before it: not deferred.
        if self.defer && !req.headers().contains_key(http::header::UPGRADE) {
            match self.sessions.verify_deferring(&req) {
                Ok(Ok((session, replay))) => {
                    tracing::Span::current().record("session_id", session.session_id());
                    req.extensions_mut().insert(session);
                    if let Some(replay) = replay {
                        req.extensions_mut().insert(replay);
                    }
                    return VerifyFuture::new(Either::Left(Either::Right(self.inner.call(req))));
                }
                Ok(Err(error)) => {
                    tracing::debug!(code = %error.code(), "session refused");
                    return VerifyFuture::new(Either::Left(Either::Left(ready(Ok(
                        error.into_response()
                    )))));
                }
                Err(pending) => return self.finish(req, pending),
            }
        }
        match self.sessions.verify_now(&req) {
            // Checked at once (a memory store): call the inner service, which was polled ready.
            Ok(Ok(session)) => {
                tracing::Span::current().record("session_id", session.session_id());
                req.extensions_mut().insert(session);
                VerifyFuture::new(Either::Left(Either::Right(self.inner.call(req))))
            }
            Ok(Err(error)) => {
                tracing::debug!(code = %error.code(), "session refused");
                VerifyFuture::new(Either::Left(Either::Left(ready(Ok(error.into_response())))))
            }
            Err(pending) => self.finish(req, pending),
        }
    }
}

impl<S> Verify<S> {
    /// The rest of a verification that waits for the store, then the inner service.
    fn finish<ReqBody, ResBody>(
        &mut self,
        mut req: Request<ReqBody>,
        pending: crate::session::PendingVerify,
    ) -> VerifyFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send,
        ReqBody: Send + 'static,
        ResBody: From<Bytes>,
    {
        // The clone that was polled ready goes into the future (tower's "be careful when
        // cloning inner services").
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        VerifyFuture::new(Either::Right(Box::pin(async move {
            match pending.await {
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
        })))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
    use http::{Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::fingerprint::FINGERPRINT_HEADER;
    use crate::session::SessionObject;
    use crate::{Body, Config, Perishable, VerifiedSession};

    const FINGERPRINT: &str = "device-unit-1";

    fn perishable() -> Perishable {
        let config = Config::builder()
            .upstream_api_key("sk-test")
            .pow_difficulty(0)
            .session_min_entropy_score(0)
            .build()
            .unwrap();
        Perishable::new(config).unwrap()
    }

    async fn mint(perishable: &Perishable) -> SessionObject {
        let head = Request::post("/session").body(()).unwrap();
        perishable
            .sessions()
            .mint(&head, br#"{"fingerprint":"device-unit-1"}"#)
            .await
            .unwrap()
    }

    /// The inner service: counts its calls and answers with the verified session id.
    fn app(
        sessions: Sessions,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
        ServiceBuilder::new()
            .layer(VerifyLayer::new(sessions))
            .service(service_fn(move |req: Request<Body>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let id = req
                    .extensions()
                    .get::<VerifiedSession>()
                    .map_or_else(|| "none".to_owned(), |s| s.session_id().to_owned());
                async move { Ok::<_, Infallible>(Response::new(Body::from(id))) }
            }))
    }

    fn authed(token: &str, fingerprint: &str) -> Request<Body> {
        Request::post("/openai/chat/completions")
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(FINGERPRINT_HEADER, fingerprint)
            .body(Body::empty())
            .unwrap()
    }

    async fn body_string(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Asserts a 401 of the protocol with `code` and a `WWW-Authenticate` header.
    async fn assert_unauthorized(response: Response<Body>, code: &str) {
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(
            response.headers().contains_key(WWW_AUTHENTICATE),
            "a 401 carries WWW-Authenticate"
        );
        let body: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
        assert_eq!(body["error"]["code"], code);
        assert_eq!(body["error"]["type"], "authentication_error");
    }

    #[tokio::test]
    async fn no_token_is_refused_before_the_inner_service() {
        let perishable = perishable();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(perishable.sessions().clone(), calls.clone());
        let req = Request::get("/openai/models")
            .header(FINGERPRINT_HEADER, FINGERPRINT)
            .body(Body::empty())
            .unwrap();
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"perishable\""
        );
        assert_unauthorized(response, "missing_token").await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_garbage_token_is_invalid() {
        let perishable = perishable();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(perishable.sessions().clone(), calls.clone());
        let response = svc.oneshot(authed("not.a.jwt", FINGERPRINT)).await.unwrap();
        assert_unauthorized(response, "invalid_token").await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_token_that_is_not_ascii_is_invalid_even_after_a_cached_one() {
        let perishable = perishable();
        let session = mint(&perishable).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(perishable.sessions().clone(), calls.clone());
        // The real token first: it is in the verified cache now.
        let response = svc
            .clone()
            .oneshot(authed(&session.token, FINGERPRINT))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // A lone obs-text byte, and the same letter as UTF-8.
        for tail in [&b"\xe9"[..], "\u{e9}".as_bytes()] {
            let mut value = format!("Bearer {}", session.token).into_bytes();
            value.extend_from_slice(tail);
            let req = Request::post("/openai/chat/completions")
                .header(AUTHORIZATION, HeaderValue::from_bytes(&value).unwrap())
                .header(FINGERPRINT_HEADER, FINGERPRINT)
                .body(Body::empty())
                .unwrap();
            let response = svc.clone().oneshot(req).await.unwrap();
            assert_unauthorized(response, "invalid_token").await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_valid_token_reaches_the_inner_service_with_its_session() {
        let perishable = perishable();
        let session = mint(&perishable).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(perishable.sessions().clone(), calls.clone());
        let response = svc
            .oneshot(authed(&session.token, FINGERPRINT))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_string(response).await, session.session_id);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn one_service_serves_many_requests_after_ready() {
        let perishable = perishable();
        let session = mint(&perishable).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = app(perishable.sessions().clone(), calls.clone());
        for _ in 0..3 {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(authed(&session.token, FINGERPRINT))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        let refused = svc
            .ready()
            .await
            .unwrap()
            .call(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_wrong_or_missing_fingerprint_is_refused() {
        let perishable = perishable();
        let session = mint(&perishable).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(perishable.sessions().clone(), calls.clone());

        let response = svc
            .clone()
            .oneshot(authed(&session.token, "device-unit-2"))
            .await
            .unwrap();
        assert_unauthorized(response, "fingerprint_mismatch").await;

        let no_fingerprint = Request::get("/openai/models")
            .header(AUTHORIZATION, format!("Bearer {}", session.token))
            .body(Body::empty())
            .unwrap();
        let response = svc.oneshot(no_fingerprint).await.unwrap();
        assert_unauthorized(response, "fingerprint_mismatch").await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn after_a_match_other_fingerprints_and_user_agents_are_still_refused() {
        // The verified-token cache remembers the values that matched; it must not let others in.
        let perishable = perishable();
        let head = Request::post("/session")
            .header(http::header::USER_AGENT, "agent-one")
            .body(())
            .unwrap();
        let session = perishable
            .sessions()
            .mint(&head, br#"{"fingerprint":"device-unit-1"}"#)
            .await
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(perishable.sessions().clone(), calls.clone());
        let with = |fingerprint: &str, agent: &str| {
            let mut req = authed(&session.token, fingerprint);
            req.headers_mut()
                .insert(http::header::USER_AGENT, agent.parse().unwrap());
            req
        };
        for _ in 0..2 {
            let ok = svc
                .clone()
                .oneshot(with(FINGERPRINT, "agent-one"))
                .await
                .unwrap();
            assert_eq!(ok.status(), StatusCode::OK);
        }
        let response = svc
            .clone()
            .oneshot(with("device-unit-2", "agent-one"))
            .await
            .unwrap();
        assert_unauthorized(response, "fingerprint_mismatch").await;
        let response = svc
            .clone()
            .oneshot(with(FINGERPRINT, "agent-two"))
            .await
            .unwrap();
        assert_unauthorized(response, "fingerprint_mismatch").await;
        let ok = svc.oneshot(with(FINGERPRINT, "agent-one")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_revoked_session_is_refused() {
        let perishable = perishable();
        let session = mint(&perishable).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(perishable.sessions().clone(), calls.clone());

        let ok = svc
            .clone()
            .oneshot(authed(&session.token, FINGERPRINT))
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);

        let verified = perishable
            .sessions()
            .verify(&authed(&session.token, FINGERPRINT))
            .await
            .unwrap();
        assert_eq!(verified.session_id(), session.session_id);
        perishable.sessions().revoke(&verified).await.unwrap();

        let response = svc
            .oneshot(authed(&session.token, FINGERPRINT))
            .await
            .unwrap();
        assert_unauthorized(response, "session_revoked").await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_token_from_another_deployment_is_refused() {
        let minted_by = perishable();
        let session = mint(&minted_by).await;
        // A second Perishable with its own random signing secret.
        let checked_by = perishable();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = app(checked_by.sessions().clone(), calls.clone());
        let response = svc
            .oneshot(authed(&session.token, FINGERPRINT))
            .await
            .unwrap();
        assert_unauthorized(response, "invalid_token").await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn accessors_reach_the_inner_service() {
        let perishable = perishable();
        let mut svc = VerifyLayer::new(perishable.sessions().clone()).layer(7_u8);
        assert_eq!(*svc.get_ref(), 7);
        *svc.get_mut() = 8;
        assert_eq!(svc.into_inner(), 8);
    }
}
