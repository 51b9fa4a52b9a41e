//! The upstream Service: forwards `/openai/{path}` to the OpenAI-compatible API with the
//! server's key, and streams the answer back chunk by chunk.
//!
//! What it does, in order ("Forwarding rules" in [`docs/protocol.md`][forwarding]):
//!
//! 1. Takes `{path}` from whatever follows the first `/openai/` in the request path, or the whole
//!    path when there is none (a router that strips its mount point, as axum's
//!    `nest_service("/openai", ..)`, leaves `/{path}`).
//! 2. Refuses paths off the allow-list (`403 path_not_allowed`: `*` matches one segment; empty,
//!    `.`, `..` and percent-encoded separators never match) before anything else: they never
//!    reach the upstream.
//! 3. Reads the body up to `upstream.max_body_bytes` (`413 body_too_large`) within
//!    `server.body_timeout_ms` (`408 body_timeout`).
//! 4. When a cost gate applies (a budget, the completion or stream cap, a model allow-list), the
//!    call is metered: its body is parsed once, strictly, into the request model that every
//!    check reads (`upstream/request.rs`: `415`, `400 invalid_json`, `400 invalid_parameter`,
//!    `403 model_not_allowed`), the completion cap and `include_usage` are applied as edits in
//!    place, and the call's worst-case cost is reserved at every budget scope
//!    ("Budgets" in `docs/protocol.md`: `429 budget_exhausted`, `429 rate_limited` for the stream cap).
//! 5. Sends method, path, query and body upstream on one pooled connection pool, with the
//!    client's headers by allow-list (`upstream/headers.rs`), plus the server's own
//!    `Authorization: Bearer <key>` (none for a keyless upstream), `upstream.headers` and
//!    `Accept-Encoding: identity`. Redirects are never followed (the key must not go anywhere
//!    else).
//! 6. Returns the upstream's status, headers (minus hop-by-hop and `Set-Cookie`) and body, each
//!    chunk passed on as it arrives (`upstream/response.rs`); event streams get
//!    `X-Accel-Buffering: no`. A usage tap (`usage/tap.rs`) reads the response's `usage` as it
//!    passes, to settle the reservation and count tokens, and hides the usage chunk the proxy
//!    asked for on the client's behalf.
//!
//! Timeouts: `connect_timeout_ms` for the connection (then `502 upstream_unavailable`),
//! `first_byte_timeout_ms` for the response headers (then `504 upstream_timeout`), and
//! `idle_timeout_ms` between two chunks of the body (then the body ends). The upstream request
//! lives inside the response future and body: when the client goes away, they are dropped and
//! the upstream request is cancelled. Nothing is spawned.
//!
//! ```no_run
//! use perishable_core::{Config, Perishable};
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builder().upstream_api_key("sk-...").build()?;
//! let perishable = Perishable::new(config)?;
//! let upstream = perishable.upstream_service();
//! let request = http::Request::get("/openai/models").body(perishable_core::Body::empty())?;
//! let response = upstream.oneshot(request).await?;
//! println!("{}", response.status());
//! # Ok(()) }
//! ```
//!
//! [forwarding]: https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md#forwarding-rules

mod client;
mod connect;
pub(crate) mod headers;
mod request;
mod response;
mod service;

pub use client::{UpstreamClient, rustls};
pub(crate) use service::upstream_path;
pub use service::{UpstreamFuture, UpstreamService};
