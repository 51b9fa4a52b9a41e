//! Per-client rate limiting on governor (GCRA), with block duration and the headers of
//! [`docs/protocol.md`](https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md).
//!
//! [`RateLimitLayer`] asks a [`KeyExtractor`] for the request's key, then its
//! [`RateLimiter`](crate::store::RateLimiter) (from the [`Store`](crate::store::Store):
//! governor in memory, a GCRA script on Redis):
//! `points` requests are allowed per `duration_secs` window (as a burst, replenished evenly),
//! and a client that goes over is refused for `block_duration_secs` with `429 rate_limited`,
//! `Retry-After` and the IETF draft `RateLimit-Policy` / `RateLimit` headers.
//!
//! Keys: [`FingerprintKey`] (the default for authenticated routes) keys on the verified session's
//! user when it has one, else its fingerprint hash, so a client cannot reset its limit by minting
//! new sessions, and many clients behind one NAT do not share one; [`ClientIpKey`] keys on the
//! client IP (session mints). Write your own [`KeyExtractor`] to key on anything else in the
//! request.
//!
//! Tiers: [`RateLimitLayer::tier`] gives the sessions of a tier (the token's `tier` claim) a
//! limiter of their own, such as more `points` for paying users (`[budget.tiers.NAME] points`).
//!
//! In memory, the state stays bounded: a task (spawned with the limiter on a tokio runtime, and
//! ending when it is dropped) prunes keys whose state is back to full once per window. When the
//! store fails, the layer refuses with `503 store_unavailable`, or lets requests through with
//! [`RateLimitLayer::on_unavailable`]`(OnUnavailable::Open)`.
//!
//! ```
//! use std::time::Duration;
//! use perishable_core::rate_limit::{ClientIpKey, RateLimitLayer};
//! use perishable_core::client_ip::{ClientIpResolver, PeerAddr};
//! use perishable_core::store::{MemoryStore, RatePolicy, Store};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = RatePolicy { name: "mint", points: 1, window: Duration::from_secs(60), block: Duration::ZERO };
//! let limiter = MemoryStore::new().rate_limiter(policy);
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(limiter, ClientIpKey::new(ClientIpResolver::default())))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(bytes::Bytes::new()))
//!     }));
//! let request = || {
//!     let mut req = http::Request::new(());
//!     req.extensions_mut().insert(PeerAddr("192.0.2.1:4000".parse().unwrap()));
//!     req
//! };
//! assert_eq!(svc.clone().oneshot(request()).await?.status(), 200);
//! let refused = svc.oneshot(request()).await?;
//! assert_eq!(refused.status(), 429);
//! assert!(refused.headers().contains_key("retry-after"));
//! # Ok(()) }
//! ```

mod key;
mod layer;
mod service;

pub use key::{ClientIpKey, FingerprintKey, KeyExtractor};
pub use layer::RateLimitLayer;
pub(crate) use service::Deferred;
pub use service::{RateLimit, RateLimitFuture};
