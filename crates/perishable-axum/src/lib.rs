#![cfg_attr(docsrs, feature(doc_cfg))]
//! The Perishable routes for axum: one [`Router`] to nest anywhere.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use axum::Router;
//! use perishable_core::Config;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builder()
//!     .apply_env(|k| std::env::var(k).ok()) // OPENAI_API_KEY, PERISHABLE_JWT_SECRET, ...
//!     .cors_allowed_origins(["https://app.example.com"])
//!     .build()?;
//! let app = Router::new().nest("/ai", perishable_axum::router(config));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // ConnectInfo gives the per-IP mint limit the client's address.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! # Routes and middleware
//!
//! Outermost first, every request goes through:
//!
//! 0. observability: `Authorization`, `Cookie`, `DPoP` and `X-Perishable-Fingerprint` marked
//!    sensitive, then one `perishable.request` span with request and refusal metrics, and
//!    refusals sent to the audit hook ([`perishable_core::observe`]);
//! 1. the peer address and original URI: axum's `ConnectInfo<SocketAddr>` copied into
//!    [`PeerAddr`] for the per-IP limit (unless the server put a `PeerAddr` there itself), and,
//!    on requests with a DPoP proof, axum's `OriginalUri` (the path before `nest` stripped its
//!    prefix) into [`OriginalUri`] for the proof's `htu`;
//! 2. the origin check: a present, disallowed `Origin` gets `403 origin_not_allowed`;
//! 3. CORS (tower-http's, [`cors_layer`]): preflights answered here, before any
//!    authentication, for allowed origins only; requests without `Origin` (not from a browser)
//!    skip it and get only its `Vary` header;
//! 4. the route, from the one route table [`Route`]: `/openai` and
//!    everything under it straight to the proxy stack, every other path through an inner router
//!    of the session routes (these layers wrap one service, the router's fallback, so axum sets
//!    no `MatchedPath`):
//!
//! | route | layers | service |
//! |---|---|---|
//! | `GET /health` | | health |
//! | `GET /challenge` | | proof-of-work challenge |
//! | `GET /client.js` | | the browser client module ([`CLIENT_JS`]), cacheable |
//! | `POST /session` | mint limit per client IP | mint |
//! | `POST /session/refresh`, `DELETE /session` | verify, rate limit per fingerprint | refresh, revoke |
//! | any method, `/openai` and `/openai/{path}` | verify, rate limit per fingerprint | upstream (streamed) |

use std::net::SocketAddr;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::{get_service, post_service};
use http::Request;
use http::header;
use perishable_core::client_ip::PeerAddr;
use perishable_core::dpop::OriginalUri;
use perishable_core::{ConfigError, Perishable, Route};
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;

mod cors;
mod dispatch;
mod serve;

pub use cors::{CORS_ALLOWED_HEADERS, CORS_EXPOSED_HEADERS, cors_layer};
pub use perishable_core::Config;
pub use serve::serve;

/// The browser client: a dependency-free ES module, served at `GET /client.js`.
pub const CLIENT_JS: &str = include_str!("../client/perishable.js");

/// `GET /client.js`: the module, cacheable for an hour, revalidated by its ETag.
async fn client_js(headers: http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    static ETAG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in CLIENT_JS.bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("\"{hash:016x}\"")
    });
    let etag = ETAG.as_str();
    let cache = [
        (header::CACHE_CONTROL, "public, max-age=3600"),
        (header::ETAG, etag),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return (http::StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        cache,
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CLIENT_JS,
    )
        .into_response()
}

/// The routes of [`docs/protocol.md`][routes] for `config`, ready to nest.
///
/// [routes]: https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md#routes
///
/// # Panics
///
/// When the upstream HTTP client cannot be built (the TLS backend fails to initialise).
/// [`try_router`] returns that as an error instead.
pub fn router<S>(config: Config) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    match try_router(config) {
        Ok(router) => router,
        Err(e) => panic!("perishable: cannot build the router: {e}"),
    }
}

/// [`router`], returning an error instead of panicking.
pub fn try_router<S>(config: Config) -> Result<Router<S>, ConfigError>
where
    S: Clone + Send + Sync + 'static,
{
    Ok(router_from(&Perishable::new(config)?))
}

/// The protocol routes over an existing [`Perishable`] (to share its state with your own
/// routes or layers).
pub fn router_from<S>(perishable: &Perishable) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let sessions = perishable.session_service();
    let authenticated = || {
        ServiceBuilder::new()
            .layer(perishable.verify_layer())
            .layer(perishable.rate_limit_layer())
    };
    // The session routes of the route table; the proxy route is the dispatch's. Mint and revoke
    // share a path, so one method router serves both.
    let routes = Router::new()
        .route(Route::Health.path(), get_service(sessions.clone()))
        .route(Route::Challenge.path(), get_service(sessions.clone()))
        .route(Route::ClientJs.path(), axum::routing::get(client_js))
        .route(
            Route::Mint.path(),
            post_service(
                ServiceBuilder::new()
                    .layer(perishable.mint_limit_layer())
                    .service(sessions.clone()),
            )
            .delete_service(authenticated().service(sessions.clone())),
        )
        .route(
            Route::Refresh.path(),
            post_service(authenticated().service(sessions)),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // The proxy's DPoP replay record and rate-limit count join the upstream Service's one
    // store call.
    let proxy = ServiceBuilder::new()
        .layer(perishable.proxy_verify_layer())
        .layer(perishable.proxy_rate_limit_layer())
        .layer(perishable.realtime_layer())
        .service(perishable.upstream_service());

    // The outer layers wrap one service, built once, that every path reaches: axum clones a
    // route's whole stack per request, and the proxy path skips a second routing step.
    let app = ServiceBuilder::new()
        .layer(perishable.observe_layer())
        .layer(MapRequestLayer::new(peer_addr::<axum::body::Body>))
        .layer(perishable.origin_layer())
        .layer(cors::BrowserCorsLayer::new(cors_layer(perishable)))
        .service(dispatch::Dispatch::new(proxy, routes));
    Router::new().fallback_service(app)
}

async fn not_found() -> http::Response<axum::body::Body> {
    other_error(
        http::StatusCode::NOT_FOUND,
        r#"{"error":{"message":"no such route: see the Perishable protocol for the routes","type":"invalid_request_error","code":"not_found"}}"#,
    )
}

async fn method_not_allowed() -> http::Response<axum::body::Body> {
    other_error(
        http::StatusCode::METHOD_NOT_ALLOWED,
        r#"{"error":{"message":"this route does not take that method","type":"invalid_request_error","code":"method_not_allowed"}}"#,
    )
}

/// A response in the OpenAI error shape (`body`) for what is not a refusal of the protocol: an
/// unknown route, a method a route does not take.
fn other_error(status: http::StatusCode, body: &'static str) -> http::Response<axum::body::Body> {
    let mut response = http::Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Copies axum's `ConnectInfo<SocketAddr>` into [`PeerAddr`] and, on requests with a DPoP proof,
/// axum's `OriginalUri` into Perishable's (for the proof's `htu`), unless they are already there.
fn peer_addr<B>(mut req: Request<B>) -> Request<B> {
    if req.extensions().get::<PeerAddr>().is_none()
        && let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>()
    {
        let addr = *addr;
        req.extensions_mut().insert(PeerAddr(addr));
    }
    // Only a DPoP proof's `htu` needs the path before `nest`: skip the copy otherwise.
    if req
        .headers()
        .contains_key(perishable_core::dpop::DPOP_HEADER)
        && req.extensions().get::<OriginalUri>().is_none()
    {
        let uri = match req.extensions().get::<axum::extract::OriginalUri>() {
            Some(axum::extract::OriginalUri(uri)) => uri.clone(),
            None => req.uri().clone(),
        };
        req.extensions_mut().insert(OriginalUri(uri));
    }
    req
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    /// Every route of the table reaches a service: none answers the router's own 404 or 405.
    #[tokio::test]
    async fn the_router_serves_every_route_of_the_table() {
        let config = Config::builder()
            .upstream_api_key("sk-test")
            .build()
            .unwrap();
        let app: Router = router(config);
        for route in Route::ALL {
            let method = route.method().cloned().unwrap_or(http::Method::PATCH);
            let path = match route {
                Route::Proxy => "/openai/models",
                _ => route.path(),
            };
            let request = Request::builder()
                .method(method.clone())
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            assert!(
                status != 404 && status != 405,
                "{route:?}: {method} {path} answered {status}"
            );
        }
        let request = Request::get("/session")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 405);
        assert_error(response, "method_not_allowed").await;
        let request = Request::get("/nowhere")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 404);
        assert_error(response, "not_found").await;
    }

    /// `response` is JSON in the OpenAI error shape, with `code`.
    async fn assert_error(response: http::Response<axum::body::Body>, code: &str) {
        use http_body_util::BodyExt;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
}
