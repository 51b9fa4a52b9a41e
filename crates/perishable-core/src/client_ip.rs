//! The client IP used for limits: the socket peer, or the right-most untrusted `X-Forwarded-For`.
//!
//! The server (axum's `ConnectInfo`, or your own accept loop) puts the socket peer in the request
//! extensions as [`PeerAddr`]. With no trusted proxies configured, that peer is the client and
//! `X-Forwarded-For` is ignored: anyone can write it. With `server.trusted_proxies`, and only when
//! the peer is one of them, the header is walked right to left, skipping trusted proxies, and the
//! first address that is not trusted is the client. IPv6 clients are grouped by /64, since one
//! host usually holds a whole /64.
//!
//! ```
//! use std::net::SocketAddr;
//! use perishable_core::client_ip::{ClientIpResolver, PeerAddr};
//!
//! let resolver = ClientIpResolver::new(vec!["10.0.0.0/8".parse().unwrap()]);
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(PeerAddr("10.1.2.3:5000".parse::<SocketAddr>().unwrap()));
//! req.headers_mut().insert("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.7".parse().unwrap());
//! assert_eq!(resolver.resolve(&req).unwrap().to_string(), "203.0.113.9");
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use http::Request;
use ipnet::IpNet;

/// The TCP peer of the connection a request came on. Insert it in the request extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Resolves the client IP of a request; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct ClientIpResolver {
    trusted: Arc<[IpNet]>,
}

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

impl ClientIpResolver {
    /// A resolver that believes `X-Forwarded-For` from these CIDRs only.
    pub fn new(trusted_proxies: Vec<IpNet>) -> Self {
        Self {
            trusted: trusted_proxies.into(),
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client IP, grouped (IPv6 by /64); `None` when the request has no [`PeerAddr`].
    pub fn resolve<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let peer = canonical(req.extensions().get::<PeerAddr>()?.0.ip());
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return Some(group(peer));
        }
        let mut client = peer;
        // Every X-Forwarded-For header, in order, forms one list; walk it from the right.
        let hops: Vec<&str> = req
            .headers()
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.is_trusted(ip) {
                        break;
                    }
                }
                // A malformed entry ends the chain we can believe: keep the last good address.
                None => break,
            }
        }
        Some(group(client))
    }
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // Some proxies write "ip:port" or "[v6]:port".
    hop.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

/// IPv4-mapped IPv6 addresses count as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// IPv6 addresses are grouped by /64.
fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, xff: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(PeerAddr(peer.parse().expect("test address")));
        if let Some(xff) = xff {
            req.headers_mut()
                .insert("x-forwarded-for", xff.parse().expect("test header"));
        }
        req
    }

    #[test]
    fn untrusted_peer_ignores_forwarded_for() {
        let r = ClientIpResolver::new(vec![]);
        let ip = r.resolve(&req("198.51.100.1:1", Some("1.2.3.4"))).unwrap();
        assert_eq!(ip.to_string(), "198.51.100.1");
        let r = ClientIpResolver::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let ip = r.resolve(&req("198.51.100.1:1", Some("1.2.3.4"))).unwrap();
        assert_eq!(
            ip.to_string(),
            "198.51.100.1",
            "spoofed header from an untrusted peer"
        );
    }

    #[test]
    fn trusted_peer_uses_rightmost_untrusted_hop() {
        let r = ClientIpResolver::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let ip = r
            .resolve(&req("10.0.0.1:1", Some("9.9.9.9, 203.0.113.5, 10.0.0.2")))
            .unwrap();
        assert_eq!(ip.to_string(), "203.0.113.5");
        // All hops trusted: the left-most one is the best we know.
        let ip = r.resolve(&req("10.0.0.1:1", Some("10.0.0.3"))).unwrap();
        assert_eq!(ip.to_string(), "10.0.0.3");
        // No header: the proxy itself.
        let ip = r.resolve(&req("10.0.0.1:1", None)).unwrap();
        assert_eq!(ip.to_string(), "10.0.0.1");
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        let r = ClientIpResolver::default();
        let a = r.resolve(&req("[2001:db8:1:2:aaaa::1]:1", None)).unwrap();
        let b = r.resolve(&req("[2001:db8:1:2:bbbb::9]:1", None)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "2001:db8:1:2::");
        let mapped = r.resolve(&req("[::ffff:192.0.2.1]:1", None)).unwrap();
        assert_eq!(mapped.to_string(), "192.0.2.1");
    }

    #[test]
    fn no_peer_no_ip() {
        assert!(
            ClientIpResolver::default()
                .resolve(&Request::new(()))
                .is_none()
        );
    }
}
