//! [`Perishable`]: the runtime state built once from a [`Config`], and the factory of every
//! Layer and Service.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::{Audit, AuditAlreadySet, AuditEvent};
use crate::client_ip::ClientIpResolver;
use crate::config::{Config, ConfigError};
use crate::gate::{Gate, Policies};
use crate::observe::ObserveLayer;
use crate::origin::{OriginLayer, OriginPolicy};
use crate::rate_limit::{ClientIpKey, FingerprintKey, RateLimitLayer};
use crate::realtime::{Realtime, RealtimeLayer};
use crate::session::{SessionService, Sessions};
use crate::store::{RateLimiter, RatePolicy, Store};
use crate::token::KeySet;
use crate::upstream::{UpstreamClient, UpstreamService};
use crate::verify::VerifyLayer;

/// Everything a Perishable deployment shares: keys, revocations, limiters, the upstream pool.
///
/// Cheap to clone. Build it once and take the Layers and Services you need; they all share state.
///
/// ```
/// use perishable_core::{Body, Config, Perishable};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), perishable_core::ConfigError> {
/// let perishable = Perishable::new(Config::builder().upstream_api_key("sk-test").build()?)?;
/// // The proxied route: origin check, session check, per-client limit, then the upstream.
/// let proxy = ServiceBuilder::new()
///     .layer(perishable.origin_layer())
///     .layer(perishable.verify_layer())
///     .layer(perishable.rate_limit_layer())
///     .service(perishable.upstream_service());
/// # let _ = proxy; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Perishable {
    config: Arc<Config>,
    sessions: Sessions,
    upstream: UpstreamService,
    realtime: Option<Arc<Realtime>>,
    store: Arc<dyn Store>,
    session_limiter: Arc<dyn RateLimiter>,
    /// `[budget.tiers.NAME] points`: each tier's own session limiter.
    tier_limiters: Vec<(String, Arc<dyn RateLimiter>)>,
    mint_limiter: Arc<dyn RateLimiter>,
    client_ip: ClientIpResolver,
    origins: OriginPolicy,
    audit: Audit,
}

impl Perishable {
    /// Builds the runtime state, with the store `store.url` names: `memory`, or a Redis URL
    /// (cargo feature `redis`). Fails if the HTTP client or the store client cannot be built.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        Self::builder(config).build()
    }

    /// Builds the runtime state on your own [`Store`].
    pub fn with_store(config: Config, store: Arc<dyn Store>) -> Result<Self, ConfigError> {
        Self::builder(config).store(store).build()
    }

    /// A builder, to add a [`Store`], an [`UpstreamClient`] or mint [`Gate`]s of your own.
    pub fn builder(config: Config) -> PerishableBuilder {
        PerishableBuilder {
            config,
            store: None,
            client: None,
            gates: Vec::new(),
        }
    }

    /// Builds the runtime state on your own [`Store`] and upstream client (to trust a private
    /// CA, or share one connection pool; see [`UpstreamClient`]).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use perishable_core::upstream::{UpstreamClient, rustls};
    /// use perishable_core::{Config, Perishable, store::MemoryStore};
    ///
    /// # fn run(tls: rustls::ClientConfig) -> Result<(), perishable_core::ConfigError> {
    /// let config = Config::builder()
    ///     .upstream_base_url("https://llm.internal:8443/v1")
    ///     .upstream_api_key("sk-...")
    ///     .build()?;
    /// let client = UpstreamClient::with_tls_config(&config, tls);
    /// let perishable = Perishable::with_client(config, Arc::new(MemoryStore::new()), client)?;
    /// # Ok(()) }
    /// ```
    pub fn with_client(
        config: Config,
        store: Arc<dyn Store>,
        client: UpstreamClient,
    ) -> Result<Self, ConfigError> {
        Self::builder(config).store(store).client(client).build()
    }

    fn assemble(
        config: Config,
        store: Arc<dyn Store>,
        client: UpstreamClient,
        gates: &[Arc<dyn Gate>],
    ) -> Result<Self, ConfigError> {
        let policies = Policies::new(&config, gates)?;
        let upstream = UpstreamService::with_client(&config, client, store.clone())?;
        let realtime = Realtime::new(&config, &upstream, store.clone()).map(Arc::new);
        let audit = Audit::default();
        // The keys are decoded here, once per runtime; the config holds them as validated data.
        let keys = KeySet::from_config(config.session())?;
        if keys.is_generated() {
            tracing::warn!(
                "no signing key configured (session.jwt_secret / PERISHABLE_JWT_SECRET): using a \
                 random one; tokens will not survive a restart or verify on other instances"
            );
        }
        let sessions = Sessions::new(&config, keys, store.clone(), audit.clone(), policies);
        let r = config.rate_limit();
        let session_policy = |points| RatePolicy {
            name: "session",
            points,
            window: Duration::from_secs(r.duration_secs),
            block: Duration::from_secs(r.block_duration_secs),
        };
        let session_limiter = store.rate_limiter(session_policy(r.points));
        // A tier with `points` gets a limiter of its own, over the same window and block.
        let tier_limiters = config
            .budget()
            .tiers
            .iter()
            .filter_map(|(name, tier)| {
                let points = tier.points?;
                Some((name.clone(), store.rate_limiter(session_policy(points))))
            })
            .collect();
        let mint_limiter = store.rate_limiter(RatePolicy {
            name: "mint",
            points: r.mint_per_ip,
            window: Duration::from_secs(60),
            block: Duration::ZERO,
        });
        let client_ip = ClientIpResolver::new(config.server().trusted_proxies.clone());
        let origins = OriginPolicy::new(
            config.cors().allowed_origins.iter().cloned(),
            config.public_origin(),
        );
        Ok(Self {
            config: Arc::new(config),
            sessions,
            upstream,
            realtime,
            store,
            session_limiter,
            tier_limiters,
            mint_limiter,
            client_ip,
            origins,
            audit,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The session engine.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The shared state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The client IP resolver (`server.trusted_proxies`).
    pub fn client_ip(&self) -> &ClientIpResolver {
        &self.client_ip
    }

    /// The origin policy (`cors.allowed_origins` and `server.public_url`).
    pub fn origin_policy(&self) -> &OriginPolicy {
        &self.origins
    }

    /// Registers the audit hook: session mints, refreshes, revocations and refusals (once; see
    /// [`crate::audit`]).
    pub fn on_audit(
        &self,
        hook: impl Fn(&AuditEvent) + Send + Sync + 'static,
    ) -> Result<(), AuditAlreadySet> {
        self.audit.set(hook)
    }

    /// The request span, request and refusal metrics, and refusals to the audit hook; put it
    /// outermost (see [`crate::observe`]).
    pub fn observe_layer(&self) -> ObserveLayer {
        ObserveLayer::new(self.audit.clone())
    }

    /// Refuses disallowed `Origin`s (`403 origin_not_allowed`).
    pub fn origin_layer(&self) -> OriginLayer {
        OriginLayer::new(self.origins.clone())
    }

    /// Verifies the session of every request (401s), and puts it in the extensions.
    pub fn verify_layer(&self) -> VerifyLayer {
        VerifyLayer::new(self.sessions.clone())
    }

    /// `[rate_limit]` per client (the user when the session has one, else the fingerprint),
    /// with `[budget.tiers.NAME] points` for the sessions of a tier that sets it; put it after
    /// [`verify_layer`](Self::verify_layer).
    pub fn rate_limit_layer(&self) -> RateLimitLayer<FingerprintKey> {
        self.tier_limiters.iter().fold(
            RateLimitLayer::new(self.session_limiter.clone(), FingerprintKey)
                .on_unavailable(self.config.store().on_unavailable),
            |layer, (tier, limiter)| layer.tier(tier.clone(), limiter.clone()),
        )
    }

    /// [`verify_layer`](Self::verify_layer) for the proxy stack (see
    /// [`proxy_rate_limit_layer`](Self::proxy_rate_limit_layer)): with a store across a network,
    /// a DPoP proof's replay record is left to the upstream Service's one store call, made
    /// before anything is forwarded. Revocation is still checked here (from the Redis store's
    /// local copy: no round trip).
    pub fn proxy_verify_layer(&self) -> VerifyLayer {
        self.verify_layer().deferring()
    }

    /// [`rate_limit_layer`](Self::rate_limit_layer) for a stack whose inner service is the
    /// [`upstream_service`](Self::upstream_service) (through the
    /// [`realtime_layer`](Self::realtime_layer) at most), as `perishable_axum::router` builds
    /// it: with a store across a network, each call's count is left to the upstream Service,
    /// which asks the store once for the count, the stream slot and the token reservation
    /// (`docs/scaling.md`). Put nothing else between the two: a request that skipped the
    /// upstream Service would not be counted.
    pub fn proxy_rate_limit_layer(&self) -> RateLimitLayer<FingerprintKey> {
        self.rate_limit_layer().deferring()
    }

    /// `rate_limit.mint_per_ip` session mints per client IP per minute.
    pub fn mint_limit_layer(&self) -> RateLimitLayer<ClientIpKey> {
        RateLimitLayer::new(
            self.mint_limiter.clone(),
            ClientIpKey::new(self.client_ip.clone()),
        )
        .on_unavailable(self.config.store().on_unavailable)
    }

    /// The Realtime route's middleware (`docs/realtime.md`), in front of the
    /// [`upstream_service`](Self::upstream_service): it serves the WebSocket upgrades of
    /// `/openai/realtime` when `realtime.enabled` is on, and passes every other request on.
    pub fn realtime_layer(&self) -> RealtimeLayer {
        RealtimeLayer::new(self.realtime.clone())
    }

    /// The upstream Service for `/openai/{path}`.
    pub fn upstream_service(&self) -> UpstreamService {
        self.upstream.clone()
    }

    /// The session routes as one Service.
    pub fn session_service(&self) -> SessionService {
        SessionService::new(self.sessions.clone())
    }
}

/// Builds a [`Perishable`] with parts of your own: a [`Store`], an [`UpstreamClient`], mint
/// [`Gate`]s. See [`Perishable::builder`].
#[derive(Debug)]
#[must_use]
pub struct PerishableBuilder {
    config: Config,
    store: Option<Arc<dyn Store>>,
    client: Option<UpstreamClient>,
    gates: Vec<Arc<dyn Gate>>,
}

impl PerishableBuilder {
    /// Keeps shared state in `store` instead of the one `store.url` names.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Calls the upstream with `client` (a private CA, a shared connection pool).
    pub fn client(mut self, client: UpstreamClient) -> Self {
        self.client = Some(client);
        self
    }

    /// Registers a mint gate of your own, for the policies that name it
    /// ([`Gate::name`]; see [`crate::gate`]).
    pub fn gate(mut self, gate: impl Gate) -> Self {
        self.gates.push(Arc::new(gate));
        self
    }

    /// Builds the runtime state. Fails when a policy names a gate that is neither built in
    /// nor registered, when a registered gate takes a built-in name, or when the store or the
    /// HTTP clients cannot be built.
    pub fn build(self) -> Result<Perishable, ConfigError> {
        for gate in &self.gates {
            if crate::gate::BUILT_IN.contains(&gate.name()) {
                return Err(ConfigError::invalid(
                    "mint.policies",
                    format!(
                        "a registered gate cannot take the built-in name {:?}",
                        gate.name()
                    ),
                ));
            }
        }
        let store = match self.store {
            Some(store) => store,
            None => crate::store::from_config(&self.config)?,
        };
        let client = match self.client {
            Some(client) => client,
            None => UpstreamClient::new(&self.config)?,
        };
        Perishable::assemble(self.config, store, client, &self.gates)
    }
}
