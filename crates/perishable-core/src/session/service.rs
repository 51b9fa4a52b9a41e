//! [`SessionService`]: the session routes as one tower Service.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};

use super::Sessions;
use crate::body::{Body, BoxError};
use crate::error::Error;
use crate::route::Route;
use crate::token::VerifiedSession;

/// Largest `POST /session` body: 512 pointer samples and 512 key times fit with room to spare.
pub(crate) const MAX_MINT_BODY_BYTES: usize = 64 * 1024;

/// Serves `GET /health`, `GET /challenge`, `POST /session`, `POST /session/refresh` and
/// `DELETE /session`: the session routes of the [`Route`] table, on the path below the mount
/// point (a router that nests it strips its prefix). Any other request gets `404 not_found`.
///
/// Refresh and revoke use the [`VerifiedSession`] a [`crate::verify::VerifyLayer`] put in the
/// request extensions, or verify the request themselves when there is none.
///
/// ```
/// use perishable_core::{Body, Config, Perishable};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let perishable = Perishable::new(Config::builder().upstream_api_key("sk-test").build()?)?;
/// let response = perishable
///     .session_service()
///     .oneshot(http::Request::get("/challenge").body(Body::empty())?)
///     .await?;
/// assert_eq!(response.status(), 200);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SessionService {
    sessions: Sessions,
}

impl SessionService {
    /// The routes of `sessions`.
    pub fn new(sessions: Sessions) -> Self {
        Self { sessions }
    }
}

crate::macros::opaque_future! {
    /// The response future of [`SessionService`].
    pub type SessionFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn not_found() -> Response<Body> {
    crate::error::other_error_response(StatusCode::NOT_FOUND, "not_found", "not found")
}

impl<B> tower::Service<Request<B>> for SessionService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = SessionFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let sessions = self.sessions.clone();
        SessionFuture::new(Box::pin(async move {
            let result = handle(&sessions, req).await;
            Ok(result.unwrap_or_else(Error::into_response))
        }))
    }
}

async fn handle<B>(sessions: &Sessions, req: Request<B>) -> Result<Response<Body>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match Route::of(req.method(), req.uri().path()) {
        Some(Route::Health) => Ok(if sessions.ready().await {
            json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "unavailable", "store": "unreachable"}),
            )
        }),
        Some(Route::Challenge) => Ok(json(StatusCode::OK, &sessions.challenge())),
        Some(Route::Refresh) => {
            let session = verified(sessions, &req).await?;
            Ok(json(StatusCode::OK, &sessions.refresh(&session).await?))
        }
        Some(Route::Revoke) => {
            let session = verified(sessions, &req).await?;
            sessions.revoke(&session).await?;
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
        Some(Route::Mint) => {
            crate::body::refuse_encoded(req.headers(), "the session request")?;
            let (parts, body) = req.into_parts();
            let head = Request::from_parts(parts, ());
            let body = crate::body::read_limited(
                body,
                MAX_MINT_BODY_BYTES,
                sessions.body_timeout(),
                "the session request",
            )
            .await?;
            Ok(json(StatusCode::OK, &sessions.mint(&head, &body).await?))
        }
        _ => Ok(not_found()),
    }
}

/// The request's verified session: from a [`crate::verify::VerifyLayer`] in front, or checked
/// here. The returned future holds no borrow of the request (whose body need not be `Sync`).
fn verified<B>(
    sessions: &Sessions,
    req: &Request<B>,
) -> impl Future<Output = Result<VerifiedSession, Error>> + Send + 'static {
    let already = req.extensions().get::<VerifiedSession>().cloned();
    let check = already.is_none().then(|| sessions.verify(req));
    async move {
        match (already, check) {
            (Some(session), _) => Ok(session),
            (None, Some(check)) => check.await,
            (None, None) => unreachable!("checked when there is no verified session"),
        }
    }
}
