//! Embedding Perishable in an existing axum app: your routes at `/`, Perishable under `/ai`,
//! with request tracing whose credentials are marked sensitive.
//!
//! ```text
//! cargo run --example embed
//! curl http://127.0.0.1:3000/            # your app
//! curl http://127.0.0.1:3000/ai/health   # Perishable
//! ```
//!
//! With no `OPENAI_API_KEY` it proxies to the built-in mock upstream.

use std::net::SocketAddr;

use axum::Router;
use axum::http::header::{AUTHORIZATION, COOKIE, HeaderName};
use axum::routing::get;
use perishable::Config;
use perishable_mock::{MockOptions, MockUpstream};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=debug".into()),
        )
        .init();

    let mut builder = Config::builder()
        .apply_env(|k| std::env::var(k).ok())
        // Your front end's origin: browsers on other origins are refused.
        .cors_allowed_origins(["http://localhost:5173"]);
    if !builder.has_upstream_api_key() {
        let mock = MockUpstream::start(MockOptions::new().api_key("sk-mock")).await?;
        builder = builder
            .upstream_base_url(mock.base_url())
            .upstream_api_key("sk-mock");
    }
    let config = builder.build()?;

    let app = Router::new()
        .route("/", get(|| async { "my app: Perishable is under /ai" }))
        .route("/api/hello", get(|| async { "hello from my own API" }))
        .nest("/ai", perishable::router(config))
        // Order matters: the sensitive marks must be set before the trace layer sees headers.
        .layer(TraceLayer::new_for_http())
        .layer(SetSensitiveRequestHeadersLayer::new([
            AUTHORIZATION,
            COOKIE,
            HeaderName::from_static("dpop"),
            perishable::fingerprint::FINGERPRINT_HEADER,
        ]));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    // ConnectInfo is what the per-IP mint limit keys on.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
