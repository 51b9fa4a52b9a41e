//! What a request is limited by.

use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};

use http::Request;

use crate::client_ip::ClientIpResolver;
use crate::error::{Error, ErrorCode};
use crate::verify::VerifiedSession;

/// Picks the rate-limit key of a request. Returning an error refuses the request with it.
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// The key type.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The key of `req`.
    fn extract<B>(&self, req: &Request<B>) -> Result<Self::Key, Error>;
}

/// A compact fingerprint-hash key: the first 22 base64url characters (132 bits) of `fp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FpKey([u8; 22]);

/// Keys on the verified session's fingerprint hash. Needs a
/// [`crate::verify::VerifyLayer`] in front; without one, requests are refused as `missing_token`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FingerprintKey;

impl KeyExtractor for FingerprintKey {
    type Key = FpKey;

    fn extract<B>(&self, req: &Request<B>) -> Result<FpKey, Error> {
        let session = req.extensions().get::<VerifiedSession>().ok_or_else(|| {
            Error::new(
                ErrorCode::MissingToken,
                "a session token is required: Authorization: Bearer <token>",
            )
        })?;
        let mut key = [0u8; 22];
        let fp = session.fingerprint_hash().as_bytes();
        let n = fp.len().min(22);
        key[..n].copy_from_slice(&fp[..n]);
        Ok(FpKey(key))
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
    type Key = IpAddr;

    fn extract<B>(&self, req: &Request<B>) -> Result<IpAddr, Error> {
        Ok(self.resolver.resolve(req).unwrap_or_else(|| {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "no PeerAddr in the request extensions: per-IP limits are shared by every \
                     client (serve with into_make_service_with_connect_info::<SocketAddr>())"
                );
            }
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }))
    }
}
