//! The Realtime route: `GET /openai/realtime?model=M` upgraded to a WebSocket and relayed to
//! the upstream's `/realtime?model=M` with the server key (`docs/protocol.md`, "Realtime";
//! `docs/realtime.md`).
//!
//! The request goes through the same stack as every proxied call: a browser's subprotocol
//! credentials are moved into the usual headers (by [`Verify`](crate::verify::Verify)), then the
//! session, its fingerprint and DPoP proof are verified and the rate limit counts the
//! connection. [`RealtimeLayer`], in front of the [`UpstreamService`], takes the WebSocket
//! upgrades of the Realtime path (everything else passes through to the upstream Service):
//!
//! 1. checks the handshake, the model (`?model=`, against `upstream.allowed_models`) and takes
//!    one of the session's `realtime.max_connections_per_session` connection slots;
//! 2. opens the upstream WebSocket on an HTTP/1.1 connection of its own, with the server key
//!    and the client's forwardable headers (never its subprotocols or token), and answers the
//!    client `101` only once the upstream has (an upstream refusal reaches the client as is);
//! 3. relays frames both ways (`relay.rs`), metering each response.
//!
//! With `realtime.enabled = false` (the default) the layer passes every request on.
//!
//! ```
//! use perishable_core::{Body, Config, Perishable};
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builder()
//!     .upstream_api_key("sk-...")
//!     .realtime_enabled(true)
//!     .build()?;
//! let perishable = Perishable::new(config)?;
//! // The proxy stack of `/openai/*`, as `perishable_axum::router` builds it.
//! let proxy = ServiceBuilder::new()
//!     .layer(perishable.verify_layer())
//!     .layer(perishable.rate_limit_layer())
//!     .layer(perishable.realtime_layer())
//!     .service(perishable.upstream_service());
//! # let _ = proxy; Ok(()) }
//! ```
//!
//! [`UpstreamService`]: crate::upstream::UpstreamService

mod events;
mod handshake;
mod layer;
mod relay;
mod service;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;

pub(crate) use handshake::lift_credentials;
pub use layer::RealtimeLayer;
pub use service::{RealtimeFuture, RealtimeService};

use crate::body::{Body, BoxError, KeyMask};
use crate::budget::Budget;
use crate::client_ip::ClientIpResolver;
use crate::config::Config;
use crate::error::{Chain, Error, ErrorCode, RateLimitInfo};
use crate::store::{Store, log_failure};
use crate::token::VerifiedSession;
use crate::upstream::headers::{UpstreamHeaders, strip_response_headers};
use crate::upstream::{UpstreamClient, UpstreamService};

/// The path the route forwards to, under `upstream.base_url`.
pub(crate) const PATH: &str = "realtime";

/// Most bytes of an upstream's refusal (a non-101 answer) passed back to the client.
const MAX_REFUSAL_BYTES: usize = 64 * 1024;

/// The Realtime route's settings and what it shares with the upstream Service.
#[derive(Debug)]
pub(crate) struct Realtime {
    client: UpstreamClient,
    base_url: String,
    headers: UpstreamHeaders,
    budget: Budget,
    store: Arc<dyn Store>,
    client_ip: ClientIpResolver,
    allowed_models: Vec<String>,
    /// `budget.max_completion_tokens` (0: none).
    cap: u64,
    /// `[budget.tiers.NAME] max_completion_tokens`, replacing `cap` for a tier's sessions.
    tier_caps: Vec<(String, u64)>,
    /// `budget.default_reserve_tokens`.
    default_reserve: u64,
    max_connections: u32,
    max_duration: Duration,
    /// Most bytes of one client message (`upstream.max_body_bytes`).
    max_client_message: usize,
    connect_timeout: Duration,
    /// The server's key, masked in whatever the upstream sends back.
    key_mask: Option<KeyMask>,
}

impl Realtime {
    /// The route for `config`, sharing `upstream`'s connections, headers and budget; `None`
    /// when `realtime.enabled` is off.
    pub(crate) fn new(
        config: &Config,
        upstream: &UpstreamService,
        store: Arc<dyn Store>,
    ) -> Option<Self> {
        let r = config.realtime();
        if !r.enabled {
            return None;
        }
        let u = config.upstream();
        let (client, headers, budget, key_mask) = upstream.realtime_parts();
        Some(Self {
            client,
            base_url: config.upstream_base_url().to_owned(),
            headers,
            budget,
            store,
            client_ip: ClientIpResolver::new(config.server().trusted_proxies.clone()),
            allowed_models: u.allowed_models.clone(),
            cap: config.budget().max_completion_tokens,
            tier_caps: config
                .budget()
                .tiers
                .iter()
                .filter_map(|(name, tier)| Some((name.clone(), tier.max_completion_tokens?)))
                .collect(),
            default_reserve: config.budget().default_reserve_tokens,
            max_connections: r.max_connections_per_session,
            max_duration: Duration::from_secs(r.max_duration_secs),
            max_client_message: u.max_body_bytes,
            connect_timeout: Duration::from_millis(
                u.connect_timeout_ms.saturating_add(u.first_byte_timeout_ms),
            ),
            key_mask,
        })
    }

    /// The completion cap of a session of `tier` (0: none).
    fn cap_for(&self, tier: Option<&str>) -> u64 {
        tier.and_then(|tier| self.tier_caps.iter().find(|(name, _)| name == tier))
            .map_or(self.cap, |(_, cap)| *cap)
    }

    /// Whether `req` is the route's: a WebSocket upgrade of `/openai/realtime`.
    pub(crate) fn serves<B>(req: &Request<B>) -> bool {
        handshake::is_upgrade(req) && crate::upstream::upstream_path(req) == PATH
    }

    /// Opens a Realtime connection for `req`, a WebSocket upgrade of the route; see the
    /// [module docs](self).
    pub(crate) async fn open<B>(
        self: Arc<Self>,
        mut req: Request<B>,
    ) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let session = req
            .extensions()
            .get::<VerifiedSession>()
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::MissingToken,
                    "the Realtime route needs a verified session",
                )
            })?;
        let handshake = handshake::check_client(req.headers())?;
        let (model, query) = handshake::model_query(req.uri().query())?;
        if !self.allowed_models.is_empty() && !self.allowed_models.contains(&model) {
            return Err(Error::new(
                ErrorCode::ModelNotAllowed,
                format!("the model {model:?} is not allowed"),
            ));
        }
        let on_upgrade = req
            .extensions_mut()
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| {
                tracing::error!(
                    "a Realtime upgrade reached a server without HTTP upgrades \
                     (serve with perishable::serve, axum::serve or hyper's with_upgrades)"
                );
                Error::new(
                    ErrorCode::UpstreamUnavailable,
                    "this server cannot open WebSocket connections",
                )
            })?;
        let ip = self.client_ip.resolve(&req);

        let slot = format!("rt:{}", session.claims.jti);
        self.take_slot(&slot, session.claims.exp).await?;
        let opened = self.connect(&mut req, &query, handshake.beta).await;
        let upstream = match opened {
            Ok(Opened::Upgraded(upstream)) => upstream,
            Ok(Opened::Refused(response)) => {
                self.free_slot(slot);
                return Ok(*response);
            }
            Err(error) => {
                self.free_slot(slot);
                return Err(error);
            }
        };

        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, handshake.accept);
        if handshake.realtime_protocol {
            h.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(handshake::REALTIME_PROTOCOL),
            );
        }
        tracing::info!(
            session_id = session.session_id(),
            model = %model,
            "realtime connection opened"
        );
        let relay = relay::Relay {
            realtime: self.clone(),
            session,
            ip,
            beta: handshake.beta,
            slot,
        };
        tokio::spawn(relay.run(on_upgrade, upstream));
        Ok(response)
    }

    /// Takes one of the session's connection slots.
    async fn take_slot(&self, slot: &str, exp: u64) -> Result<(), Error> {
        match self
            .store
            .acquire_stream(slot, self.max_connections, exp)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::new(
                ErrorCode::RateLimited,
                format!(
                    "at most {} Realtime connections per session: close one, or, if the \
                     instance that held it stopped, refresh the session and connect with the new \
                     token",
                    self.max_connections
                ),
            )
            .with_rate_limit(RateLimitInfo {
                policy: "realtime",
                quota: self.max_connections,
                window_secs: 1,
                remaining: 0,
                retry_after: Duration::from_secs(1),
            })),
            // A cap, not a rate limit: it fails closed whatever `store.on_unavailable` says.
            Err(e) => Err(crate::store::refuse("acquire_stream", &e)),
        }
    }

    /// Gives a connection slot back (in the background).
    fn free_slot(&self, slot: String) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.release_stream(&slot).await {
                log_failure("release_stream", &e, "the slot frees when the session ends");
            }
        });
    }

    /// The upstream handshake.
    async fn connect<B>(
        &self,
        req: &mut Request<B>,
        query: &str,
        beta: bool,
    ) -> Result<Opened, Error> {
        let uri = format!("{}/{PATH}?{query}", self.base_url);
        let uri = http::Uri::try_from(uri).map_err(|_| {
            Error::new(
                ErrorCode::InvalidParameter,
                "the model is not valid in a URL",
            )
        })?;
        let key = handshake::new_key()?;
        let mut headers = self.headers.prepare(req.headers_mut(), 0);
        headers.remove(header::ACCEPT_ENCODING);
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
        if beta && !headers.contains_key("openai-beta") {
            headers.insert("openai-beta", HeaderValue::from_static("realtime=v1"));
        }
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        let response =
            match tokio::time::timeout(self.connect_timeout, self.client.upgrade(request)).await {
                Err(_) => {
                    tracing::warn!("the upstream did not answer the Realtime handshake in time");
                    return Err(Error::new(
                        ErrorCode::UpstreamTimeout,
                        "the upstream did not answer in time",
                    ));
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %Chain(&e), "the upstream could not be reached");
                    return Err(Error::new(
                        ErrorCode::UpstreamUnavailable,
                        "the upstream could not be reached",
                    ));
                }
                Ok(Ok(response)) => response,
            };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The upstream's refusal (a 401 for a bad key, a 404 for an unknown model...),
            // passed back as it is.
            let (mut parts, body) = response.into_parts();
            strip_response_headers(&mut parts.headers);
            parts.headers.remove(header::CONTENT_LENGTH);
            let mut body = crate::body::read_limited(
                body,
                MAX_REFUSAL_BYTES,
                self.connect_timeout,
                "the upstream's answer",
            )
            .await
            .unwrap_or_default();
            if let Some(mask) = &self.key_mask {
                mask.mask_headers(&mut parts.headers);
                body = mask.mask(body);
            }
            tracing::info!(
                status = parts.status.as_u16(),
                "the upstream refused the Realtime handshake"
            );
            let response = Response::from_parts(parts, Body::full(body));
            return Ok(Opened::Refused(Box::new(response)));
        }
        let expected = handshake::accept_key(key.as_bytes());
        if response.headers().get(header::SEC_WEBSOCKET_ACCEPT) != Some(&expected) {
            tracing::warn!("the upstream answered the Realtime handshake with a wrong key");
            return Err(Error::new(
                ErrorCode::UpstreamUnavailable,
                "the upstream's WebSocket handshake is invalid",
            ));
        }
        Ok(Opened::Upgraded(hyper::upgrade::on(response)))
    }
}

/// The upstream's answer to the handshake.
enum Opened {
    /// `101`: its connection, once hyper hands it over.
    Upgraded(hyper::upgrade::OnUpgrade),
    /// Anything else, for the client.
    Refused(Box<Response<Body>>),
}
