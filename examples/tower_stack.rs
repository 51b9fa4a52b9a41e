//! Perishable without the axum router: the core Layers stacked with `ServiceBuilder` in front of
//! the upstream Service, served by plain hyper.
//!
//! ```text
//! cargo run --example tower_stack
//! curl http://127.0.0.1:3001/challenge
//! ```
//!
//! Session routes go to the session Service (mints limited per IP); `/openai/...` goes through
//! origin check → session verification → per-fingerprint rate limit → upstream.
//! With no `OPENAI_API_KEY` it proxies to the built-in mock upstream.

use std::convert::Infallible;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use perishable::client_ip::PeerAddr;
use perishable::{Body, Config, Perishable};
use perishable_mock::{MockOptions, MockUpstream};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt, service_fn};

type Svc = BoxCloneSyncService<http::Request<Incoming>, http::Response<Body>, Infallible>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();

    let mut builder = Config::builder().apply_env(|k| std::env::var(k).ok());
    if !builder.has_upstream_api_key() {
        let mock = MockUpstream::start(MockOptions::new().api_key("sk-mock")).await?;
        builder = builder
            .upstream_base_url(mock.base_url())
            .upstream_api_key("sk-mock");
    }
    let perishable = Perishable::new(builder.build()?)?;

    // The proxied route: every check, then the streaming upstream Service.
    let proxy: Svc = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(perishable.origin_layer())
            .layer(perishable.verify_layer())
            .layer(perishable.rate_limit_layer())
            .service(perishable.upstream_service()),
    );
    // Minting, limited per client IP.
    let mint: Svc = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(perishable.origin_layer())
            .layer(perishable.mint_limit_layer())
            .service(perishable.session_service()),
    );
    // Challenge, health, refresh and revoke (the session Service verifies refresh and revoke).
    let sessions: Svc = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(perishable.origin_layer())
            .service(perishable.session_service()),
    );

    let app = service_fn(move |req: http::Request<Incoming>| {
        let target = if req.uri().path().starts_with("/openai/") {
            proxy.clone()
        } else if req.uri().path() == "/session" && req.method() == http::Method::POST {
            mint.clone()
        } else {
            sessions.clone()
        };
        target.oneshot(req)
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        // The per-IP limit reads the peer from the request extensions.
        let app = app
            .clone()
            .map_request(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req
            });
        tokio::spawn(async move {
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app))
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}
