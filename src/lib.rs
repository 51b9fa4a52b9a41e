#![cfg_attr(docsrs, feature(doc_cfg))]
//! Perishable lets browser and mobile apps call OpenAI-compatible LLM APIs (OpenAI, OpenRouter,
//! Ollama, vLLM, ...) without ever holding the real API key.
//!
//! The service that embeds it keeps the key. Clients get short-lived session tokens (JWT) bound
//! to their device fingerprint, minted only after they show human interaction and solve a proof
//! of work. Every proxied call is checked, rate limited per client, and streamed through byte for
//! byte, so tokens appear as the model writes them. The official OpenAI SDKs work unchanged.
//!
//! This crate re-exports [`perishable_core`] (tower Layers and Services, no axum) and
//! [`perishable_axum`] (the routes as one axum `Router`), item by item and module by module: the
//! core's root items and public modules (its whole surface is listed under "Public API" in
//! [`perishable_core`]), and the router functions and CORS constants of the axum crate:
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use axum::{Router, routing::get};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = perishable::Config::builder()
//!     .apply_env(|k| std::env::var(k).ok()) // OPENAI_API_KEY, PERISHABLE_JWT_SECRET, ...
//!     .build()?;
//! let app = Router::new()
//!     .route("/", get(|| async { "my app" }))
//!     .nest("/ai", perishable::router(config));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `redis` (default): shared state on Redis (`store.url = "redis://..."`), for several
//!   instances behind a load balancer.
//!
//! The mock OpenAI-compatible upstream that the example proxy serves when no API key is set is
//! the separate crate [`perishable-mock`](https://docs.rs/perishable-mock).

pub use perishable_axum::{
    CORS_ALLOWED_HEADERS, CORS_EXPOSED_HEADERS, cors_layer, router, router_from, serve, try_router,
};
pub use perishable_core::{
    Body, BoxError, Config, ConfigBuilder, ConfigError, Error, ErrorCode, Perishable,
    PerishableBuilder, Route, Secret, SessionObject, Sessions, VerifiedSession,
};
pub use perishable_core::{
    audit, client_ip, config, dpop, error, fingerprint, gate, observe, origin, pow, rate_limit,
    realtime, session, store, token, upstream, verify,
};
pub use {perishable_axum, perishable_core};
