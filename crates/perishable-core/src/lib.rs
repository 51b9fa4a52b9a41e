#![cfg_attr(docsrs, feature(doc_cfg))]
//! Tower layers and services for Perishable: let browser and mobile apps call an
//! OpenAI-compatible API without ever holding the API key.
//!
//! The service that embeds this keeps the key. Clients mint short-lived session tokens (JWT)
//! bound to their device fingerprint after showing human interaction (and solving a proof of
//! work); every proxied call is checked, rate limited per client, and streamed through byte for
//! byte. The wire contract is the Perishable PROTOCOL; `perishable-axum` wires these pieces into
//! its routes, and the `perishable` crate re-exports both.
//!
//! # Layout
//!
//! - [`config`]: the PROTOCOL configuration shape, its builder and validation.
//! - [`perishable`](Perishable): the runtime state built from a config; hands out every layer.
//! - [`session`]: minting, verification, refresh and revocation, and their tower Service.
//! - [`token`]: JWT claims, signing keys and rotation.
//! - [`fingerprint`], [`entropy`], [`pow`], [`dpop`], [`caps`]: the gates a mint must pass, and
//!   DPoP key binding for every request after it.
//! - [`verify`]: the Layer that checks token, fingerprint and User-Agent.
//! - [`rate_limit`]: the per-client Layer on governor.
//! - [`origin`]: the `Origin` check.
//! - [`upstream`]: the streaming forwarding Service: the request model of metered calls (one
//!   strict parse, edits in place), headers by allow-list, and the usage accounting.
//! - `json` (internal): the strict JSON parser of metered bodies, and the incremental search of
//!   a response for its `usage`.
//! - [`budget`]: token budgets as token buckets at three scopes (reserve the worst case, then
//!   settle on the real usage), the completion cap and
//!   the concurrent-stream cap.
//! - [`client_ip`]: which IP a request counts against.
//! - [`store`]: shared state (rate limits, revocations, caps, replay caches): in memory, or on
//!   Redis (feature `redis`) for several instances.
//! - [`error`]: the one error type, rendered in the OpenAI error shape.
//! - [`observe`]: the request span and metrics; [`audit`]: the audit hook.
//!
//! # Example
//!
//! ```
//! use perishable_core::{Body, Config, Perishable};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let perishable = Perishable::new(Config::builder().upstream_api_key("sk-...").build()?)?;
//! let proxy = ServiceBuilder::new()
//!     .layer(perishable.origin_layer())
//!     .layer(perishable.verify_layer())
//!     .layer(perishable.rate_limit_layer())
//!     .service(perishable.upstream_service());
//!
//! // No session token: refused before anything reaches the upstream.
//! let response = proxy
//!     .oneshot(http::Request::post("/openai/chat/completions").body(Body::empty())?)
//!     .await?;
//! assert_eq!(response.status(), 401);
//! # Ok(()) }
//! ```

pub mod audit;
pub mod body;
pub mod budget;
pub mod caps;
pub mod client_ip;
pub mod config;
pub mod dpop;
pub mod entropy;
pub mod error;
pub mod expiring;
pub mod fingerprint;
mod future;
#[allow(dead_code)] // The gates are not wired into minting yet (issue #16).
pub(crate) mod gate;
pub(crate) mod json;
pub mod observe;
pub mod origin;
mod perishable;
pub mod pow;
pub mod rate_limit;
pub mod session;
pub mod store;
pub mod token;
pub mod upstream;
pub mod verify;

pub use body::Body;
pub use config::{Config, ConfigBuilder, ConfigError, Secret};
pub use error::{Error, ErrorCode};
pub use future::ResponseFuture;
pub use perishable::Perishable;
pub use session::{SessionObject, Sessions};
pub use verify::VerifiedSession;
