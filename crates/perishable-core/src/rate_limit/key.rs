//! What a request is limited by.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};

use http::Request;

use crate::client_ip::ClientIpResolver;
use crate::error::{Error, ErrorCode};
use crate::token::VerifiedSession;

/// Picks the rate-limit key of a request. Returning an error refuses the request with it.
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// The key of `req`. Keep it short and free of secrets: it may be a store key.
    fn extract<B>(&self, req: &Request<B>) -> Result<String, Error>;
}

/// Keys on the verified session's client: its user (`usr`) when an identity gate named one,
/// else its fingerprint hash. Needs a
/// [`crate::verify::VerifyLayer`] in front; without one, requests are refused as `missing_token`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FingerprintKey;

impl KeyExtractor for FingerprintKey {
    fn extract<B>(&self, req: &Request<B>) -> Result<String, Error> {
        let session = req.extensions().get::<VerifiedSession>().ok_or_else(|| {
            Error::new(
                ErrorCode::MissingToken,
                "a session token is required: Authorization: Bearer <token>",
            )
        })?;
        // The user, when an identity gate named one: all of a user's sessions share a limit.
        Ok(match &session.claims.usr {
            Some(user) => format!("usr:{user}"),
            None => session.fingerprint_hash().to_owned(),
        })
    }
}

/// Keys on the client IP (see [`crate::client_ip`]). Without a
/// [`crate::client_ip::PeerAddr`] every request shares one key, and a warning is logged once.
#[derive(Debug, Clone, Default)]
pub struct ClientIpKey {
    resolver: ClientIpResolver,
}

impl ClientIpKey {
    /// Keys on what `resolver` finds.
    pub fn new(resolver: ClientIpResolver) -> Self {
        Self { resolver }
    }
}

static WARNED: AtomicBool = AtomicBool::new(false);

impl KeyExtractor for ClientIpKey {
    fn extract<B>(&self, req: &Request<B>) -> Result<String, Error> {
        let ip = self.resolver.resolve(req).unwrap_or_else(|| {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "no PeerAddr in the request extensions: per-IP limits are shared by every \
                     client (serve with into_make_service_with_connect_info::<SocketAddr>())"
                );
            }
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        });
        Ok(ip.to_string())
    }
}
