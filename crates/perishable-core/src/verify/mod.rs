//! Token, fingerprint and User-Agent checks in front of a service.
//!
//! [`VerifyLayer`] refuses a request unless every check of [`docs/protocol.md`][protocol] on its
//! session holds (see [`crate::session`] for the list), with the protocol's 401 and
//! `WWW-Authenticate`. A request that passes carries a [`VerifiedSession`](crate::VerifiedSession)
//! in its extensions, for later layers (the rate limiter keys on it) and handlers.
//!
//! ```
//! use perishable_core::{Body, Config, Perishable, VerifiedSession};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let perishable = Perishable::new(Config::builder().upstream_api_key("sk-test").build()?)?;
//! let app = ServiceBuilder::new()
//!     .layer(perishable.verify_layer())
//!     .service(service_fn(|req: http::Request<Body>| async move {
//!         let session = req.extensions().get::<VerifiedSession>().expect("verified");
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Body::from(session.session_id().to_owned())))
//!     }));
//! let refused = app.oneshot(http::Request::get("/").body(Body::empty())?).await?;
//! assert_eq!(refused.status(), 401);
//! # Ok(()) }
//! ```
//!
//! [protocol]: https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md

mod layer;
mod service;

pub use layer::VerifyLayer;
pub use service::{Verify, VerifyFuture};
