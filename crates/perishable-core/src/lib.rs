#![cfg_attr(docsrs, feature(doc_cfg))]
//! Tower layers and services for Perishable: let browser and mobile apps call an
//! OpenAI-compatible API without ever holding the API key.
//!
//! The service that embeds this keeps the key. Clients mint short-lived session tokens (JWT)
//! bound to their device fingerprint after showing human interaction (and solving a proof of
//! work); every proxied call is checked, rate limited per client, and streamed through byte for
//! byte. The wire contract is the Perishable protocol, [`docs/protocol.md`][protocol];
//! `perishable-axum` wires these pieces into its routes, and the `perishable` crate re-exports
//! both.
//!
//! [protocol]: https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md
//!
//! # Layout
//!
//! The modules form a one-way graph (`.ci/module-graph.py` checks it), listed here bottom-up:
//! each uses only modules above it in this list.
//!
//! 1. Leaves, which use no other module: `clock` (Unix time), [`error`] (the one error type,
//!    rendered in the OpenAI error shape), `json` (the strict parser of metered bodies and the
//!    incremental search of a response for its `usage`), `path` (path patterns and the
//!    allow-list), `header_rules` (which headers may never cross), [`client_ip`] (which IP a
//!    request counts against), `entropy` (the server-side interaction score), [`Route`] (the
//!    route table), `future` (the shared refusal-or-inner future), `macros` (`opaque_future!`
//!    for named futures, `define_inner_service_accessors!`).
//! 2. `usage` (the `Usage` of a response, the tap that reads it, the event-stream parser) and
//!    [`audit`] (the audit hook).
//! 3. [`config`]: the configuration as validated data, one file per section.
//! 4. [`token`]: claims, the keys decoded from the config, signing and verification.
//! 5. [`store`]: shared state (rate limits, revocations, caps, replay caches, budgets, App
//!    Attest keys) in memory (`store/memory/`: the limiter, the session caps, the expiring sets,
//!    the App Attest keys) or on Redis (feature `redis`).
//! 6. [`fingerprint`], [`pow`], [`dpop`]: the device binding, the proof of work, and DPoP (RFC
//!    9449) key binding.
//! 7. [`gate`]: the mint gates and `mint.policies` (the proof of work and the samples, a
//!    captcha redeemed at its provider, an OpenID Connect ID token checked against the issuer's
//!    keys, Play Integrity verdicts and Apple App Attest keys bound to a challenge, and gates of
//!    the app's own).
//! 8. `budget`: token budgets at three scopes (reserve the worst case, settle on the real
//!    usage) and the concurrent-stream cap.
//! 9. [`Body`]: a whole buffer or a streamed upstream body, with its end-of-body settlement
//!    and the server's key masked wherever the upstream quotes it back.
//! 10. The middleware, each a Layer, a Service and a named future: [`origin`] (the `Origin`
//!     check), [`observe`] (the request span and metrics), [`session`] (the engine: minting,
//!     verification, refresh, revocation; and its Service), [`verify`] (the session check in
//!     front of a service: the one middleware that uses another, the session engine),
//!     [`rate_limit`] (per client, on the store's limiter), [`upstream`]
//!     (the streaming forwarding Service: one strict parse of a metered body, headers by
//!     allow-list, the usage tap), [`realtime`] (the Realtime WebSocket route, in front of the
//!     upstream Service).
//! 11. [`Perishable`]: the runtime state built from a config ([`PerishableBuilder`] for a store,
//!     a client or gates of your own); decodes the keys and hands out every layer.
//!
//! # Public API
//!
//! The whole public surface, by module (what a module defines and the root re-exports is listed
//! at the root):
//!
//! - root: [`Perishable`], [`PerishableBuilder`], [`Config`], [`ConfigBuilder`],
//!   [`ConfigError`], [`Secret`], [`Error`], [`ErrorCode`], [`Body`], [`BoxError`], [`Route`],
//!   [`Sessions`], [`SessionObject`], [`VerifiedSession`].
//! - [`config`] module: the sections [`UpstreamConfig`](config::UpstreamConfig),
//!   [`SessionConfig`](config::SessionConfig) (with [`Algorithm`](config::Algorithm),
//!   [`DpopMode`](config::DpopMode)), [`RateLimitConfig`](config::RateLimitConfig),
//!   [`PowConfig`](config::PowConfig), [`CorsConfig`](config::CorsConfig),
//!   [`ServerConfig`](config::ServerConfig), [`BudgetConfig`](config::BudgetConfig) (with
//!   [`BudgetScope`](config::BudgetScope), [`TierConfig`](config::TierConfig)),
//!   [`StoreConfig`](config::StoreConfig) (with [`OnUnavailable`](config::OnUnavailable)),
//!   [`MintConfig`](config::MintConfig) (with [`CaptchaConfig`](config::CaptchaConfig),
//!   [`OidcConfig`](config::OidcConfig), [`AppAttestConfig`](config::AppAttestConfig),
//!   [`PlayIntegrityConfig`](config::PlayIntegrityConfig)),
//!   [`RealtimeConfig`](config::RealtimeConfig);
//!   [`DEFAULT_ALLOWED_PATHS`](config::DEFAULT_ALLOWED_PATHS), [`IpNet`](config::IpNet)
//!   (re-exported from `ipnet`).
//! - [`error`] module: [`Error`] and [`ErrorCode`] (at the root).
//! - [`audit`] module: [`Audit`](audit::Audit), [`AuditEvent`](audit::AuditEvent),
//!   [`AuditAlreadySet`](audit::AuditAlreadySet).
//! - [`client_ip`] module: [`PeerAddr`](client_ip::PeerAddr),
//!   [`ClientIpResolver`](client_ip::ClientIpResolver).
//! - [`token`] module: [`Claims`](token::Claims), [`Confirmation`](token::Confirmation) (and
//!   [`VerifiedSession`], at the root).
//! - [`store`] module: the [`Store`](store::Store) trait and its types ([`Set`](store::Set),
//!   [`Admission`](store::Admission), [`Bucket`](store::Bucket),
//!   [`Reservation`](store::Reservation), [`CallAdmission`](store::CallAdmission),
//!   [`CallDecision`](store::CallDecision), [`AppAttestKey`](store::AppAttestKey),
//!   [`StoreError`](store::StoreError), [`StoreFuture`](store::StoreFuture)), the
//!   [`RateLimiter`](store::RateLimiter) trait ([`RatePolicy`](store::RatePolicy),
//!   [`RateDecision`](store::RateDecision)), [`MemoryStore`](store::MemoryStore), `RedisStore`
//!   (feature `redis`), [`settled`](store::settled) (waits for the settlements in flight, at
//!   shutdown), `conformance::run` (feature `test-util`: the `Store` contract as a test
//!   suite).
//! - [`fingerprint`] module: [`FINGERPRINT_HEADER`](fingerprint::FINGERPRINT_HEADER),
//!   [`hash`](fingerprint::hash).
//! - [`pow`] module: [`Challenge`](pow::Challenge).
//! - [`dpop`] module: [`DpopSigner`](dpop::DpopSigner), [`OriginalUri`](dpop::OriginalUri),
//!   [`DPOP_HEADER`](dpop::DPOP_HEADER).
//! - [`gate`] module: the [`Gate`](gate::Gate) trait for mint gates of your own,
//!   [`Evidence`](gate::Evidence), [`Facts`](gate::Facts), [`GateFuture`](gate::GateFuture).
//! - [`origin`] module: [`OriginLayer`](origin::OriginLayer), [`OriginCheck`](origin::OriginCheck),
//!   [`ResponseFuture`](origin::ResponseFuture), [`OriginPolicy`](origin::OriginPolicy).
//! - [`observe`] module: [`ObserveLayer`](observe::ObserveLayer), [`Observe`](observe::Observe),
//!   [`ObserveFuture`](observe::ObserveFuture), [`SENSITIVE_HEADERS`](observe::SENSITIVE_HEADERS).
//! - [`session`] module: [`SessionService`](session::SessionService),
//!   [`SessionFuture`](session::SessionFuture) (and [`Sessions`], [`SessionObject`], at the
//!   root).
//! - [`verify`] module: [`VerifyLayer`](verify::VerifyLayer), [`Verify`](verify::Verify),
//!   [`VerifyFuture`](verify::VerifyFuture).
//! - [`rate_limit`] module: [`RateLimitLayer`](rate_limit::RateLimitLayer),
//!   [`RateLimit`](rate_limit::RateLimit), [`RateLimitFuture`](rate_limit::RateLimitFuture), the
//!   [`KeyExtractor`](rate_limit::KeyExtractor) trait,
//!   [`FingerprintKey`](rate_limit::FingerprintKey), [`ClientIpKey`](rate_limit::ClientIpKey).
//! - [`realtime`] module: [`RealtimeLayer`](realtime::RealtimeLayer),
//!   [`RealtimeService`](realtime::RealtimeService),
//!   [`RealtimeFuture`](realtime::RealtimeFuture).
//! - [`upstream`] module: [`UpstreamService`](upstream::UpstreamService),
//!   [`UpstreamFuture`](upstream::UpstreamFuture),
//!   [`UpstreamClient`](upstream::UpstreamClient), [`rustls`](mod@upstream::rustls) (re-exported).
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
mod body;
pub(crate) mod budget;
pub mod client_ip;
mod clock;
pub mod config;
pub mod dpop;
mod entropy;
pub mod error;
pub mod fingerprint;
mod future;
pub mod gate;
mod header_rules;
pub(crate) mod json;
mod macros;
pub mod observe;
pub mod origin;
pub(crate) mod path;
mod perishable;
pub mod pow;
pub mod rate_limit;
pub mod realtime;
mod route;
pub mod session;
pub mod store;
pub mod token;
pub mod upstream;
pub(crate) mod usage;
pub mod verify;

pub use body::{Body, BoxError};
pub use config::{Config, ConfigBuilder, ConfigError, Secret};
pub use error::{Error, ErrorCode};
pub use perishable::{Perishable, PerishableBuilder};
pub use route::Route;
pub use session::{SessionObject, Sessions};
pub use token::VerifiedSession;
