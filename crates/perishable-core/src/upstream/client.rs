//! [`UpstreamClient`]: the one pooled HTTP client every upstream request goes through.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connect::Connector;
use crate::config::{Config, ConfigError};

/// The rustls crate this client is built on, for [`UpstreamClient::with_tls_config`].
pub use rustls;

/// How long an idle upstream connection stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The pooled upstream HTTP client.
///
/// hyper-util's pooled client with rustls (through hyper-rustls), kept lean for a proxy's hot
/// path: the request is already an [`http::Request`] with its final URI and headers, so nothing
/// is parsed or copied again on the way out, and nothing sits between the proxy and the
/// connection pool (no redirect, retry or decompression layers: the proxy must never follow a
/// redirect with the server key, and passes bodies through byte for byte).
///
/// - HTTP/1.1, and HTTP/2 when an `https` upstream offers it (ALPN). Realtime WebSockets go on
///   HTTP/1.1 connections of their own (an upgrade cannot ride HTTP/2).
/// - TLS by rustls on aws-lc-rs, certificates checked by the platform's verifier
///   (`rustls-platform-verifier`: the system trust store), or by the rustls `ClientConfig` you
///   pass to [`UpstreamClient::with_tls_config`] (a private CA, client certificates).
/// - A pooled cleartext connection is the TCP stream alone (hyper-rustls's stream type would
///   carry a rustls connection's 1.1 KiB inline even without TLS).
/// - `TCP_NODELAY` on every connection, `upstream.connect_timeout_ms` for each connect, idle
///   connections kept 90 s. Proxy environment variables (`HTTPS_PROXY`, ...) are not read.
///
/// Clones share the pool: build one and hand it to [`Perishable::with_client`], or to every
/// [`UpstreamService`] with [`UpstreamService::with_client`].
///
/// ```no_run
/// use perishable_core::upstream::{UpstreamClient, UpstreamService};
/// use perishable_core::{Config, store::MemoryStore};
/// use std::sync::Arc;
///
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::builder().upstream_api_key("sk-...").build()?;
/// let client = UpstreamClient::new(&config)?;
/// let a = UpstreamService::with_client(&config, client.clone(), Arc::new(MemoryStore::new()))?;
/// let b = UpstreamService::with_client(&config, client, Arc::new(MemoryStore::new()))?;
/// # Ok(()) }
/// ```
///
/// [`Perishable::with_client`]: crate::Perishable::with_client
/// [`UpstreamService`]: super::UpstreamService
/// [`UpstreamService::with_client`]: super::UpstreamService::with_client
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, Full<Bytes>>,
    /// HTTP/1.1 only (a WebSocket upgrade cannot ride HTTP/2), for the Realtime route.
    upgrades: Client<Connector, Full<Bytes>>,
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// A client for `config`'s `[upstream]` section, trusting the platform's certificates.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .and_then(|builder| {
                rustls_platform_verifier::BuilderVerifierExt::with_platform_verifier(builder)
            })
            .map_err(|e| ConfigError::Invalid {
                key: "upstream",
                reason: format!("cannot set up TLS: {e}"),
            })?
            .with_no_client_auth();
        Ok(Self::with_tls_config(config, tls))
    }

    /// A client for `config`'s `[upstream]` section, with your own rustls configuration. Its
    /// ALPN protocols are replaced: the client offers `h2` and `http/1.1` itself.
    ///
    /// ```no_run
    /// use perishable_core::upstream::{UpstreamClient, rustls};
    ///
    /// # fn run(config: &perishable_core::Config, ca: rustls::pki_types::CertificateDer<'static>)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// let mut roots = rustls::RootCertStore::empty();
    /// roots.add(ca)?;
    /// let provider = rustls::crypto::aws_lc_rs::default_provider();
    /// let tls = rustls::ClientConfig::builder_with_provider(provider.into())
    ///     .with_safe_default_protocol_versions()?
    ///     .with_root_certificates(roots)
    ///     .with_no_client_auth();
    /// let client = UpstreamClient::with_tls_config(config, tls);
    /// # Ok(()) }
    /// ```
    pub fn with_tls_config(config: &Config, mut tls: rustls::ClientConfig) -> Self {
        tls.alpn_protocols.clear();
        let u = config.upstream();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(u.connect_timeout_ms)));
        http.enforce_http(false);
        let http1 = HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http.clone());
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(Connector(https));
        // An upgraded connection leaves the pool; one answered otherwise is not worth keeping.
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .timer(TokioTimer::new())
            .build(Connector(http1));
        Self { client, upgrades }
    }

    /// Sends `request` (its URI absolute) on a pooled connection.
    pub(crate) fn request(
        &self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>>
    + Send
    + 'static {
        self.client.request(request)
    }

    /// Sends a WebSocket upgrade `request` on a fresh HTTP/1.1 connection.
    pub(crate) fn upgrade(
        &self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>>
    + Send
    + 'static {
        self.upgrades.request(request)
    }
}
