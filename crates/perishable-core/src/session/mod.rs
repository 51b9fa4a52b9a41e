//! Sessions: minting, verification, refresh and revocation.
//!
//! [`Sessions`] is the engine; [`SessionService`] serves its routes (`GET /challenge`,
//! `POST /session`, `POST /session/refresh`, `DELETE /session`, `GET /health`) as one tower
//! Service, for stacks built without the axum router.
//!
//! Minting (`POST /session`) checks, in order: the JSON shape (`400 invalid_json`), the
//! fingerprint (`missing_fingerprint`, `invalid_fingerprint`), the interaction entropy scored on
//! the server (`insufficient_entropy`), and the proof of work
//! ([`crate::pow`]; `pow_required`, `pow_invalid`). Only when all pass is the challenge used up
//! and a token signed, so a refused mint changes no state.
//!
//! With a `DPoP` header (and `session.dpop` not `off`) the proof is verified ([`crate::dpop`])
//! and the session is bound to its key (`cnf.jkt`, `token_type` `DPoP`); with
//! `session.dpop = "required"` a mint without one gets `401 dpop_required`. Last, the session cap
//! (in the [`Store`]; `429 too_many_sessions`) must have room for the fingerprint (and key).
//!
//! Verification (used by [`crate::verify::VerifyLayer`]) checks the token (signature,
//! algorithm, `typ`, `kid`, `iss`, `aud`, `exp`, `nbf`: see [`crate::token`]), then that its
//! `jti` is not revoked, that the SHA-256 of the `X-Perishable-Fingerprint` header equals `fp`,
//! and that the User-Agent hash equals `ua` when the token carries one. A key-bound token must come as `Authorization: DPoP <token>` with
//! a valid proof from its key (`401 dpop_required` without one, `401 invalid_dpop_proof` for a bad
//! one, as RFC 9449 section 7.1 says; a bad proof on the mint is `400`); a bearer token must come as `Bearer`, and is refused when `session.dpop = "required"`.
//!
//! Revocation keeps the `jti` in memory until the token's own `exp`, after which the token is
//! refused as expired anyway, so the list holds only live entries. It also frees the session's
//! slots in the cap.

mod lifecycle;
mod mint;
mod request;
mod service;
mod verify;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use self::service::{SessionFuture, SessionService};
pub(crate) use self::verify::PendingVerify;
use crate::audit::Audit;
use crate::client_ip::ClientIpResolver;
use crate::clock::unix_now;
use crate::config::{Config, DpopMode};
use crate::dpop::DpopVerifier;
use crate::error::Error;
use crate::gate::Policies;
use crate::pow::{Challenge, ProofOfWork};
use crate::store::{self, Store};
use crate::token::{Claims, KeySet, TokenCodec};

/// The session object of `POST /session` and `POST /session/refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionObject {
    /// The signed token.
    pub token: String,
    /// `Bearer` (or `DPoP` for a key-bound session).
    pub token_type: String,
    /// The token's `jti`.
    pub session_id: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// Seconds from now.
    pub expires_in: u64,
}

/// The session engine; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    codec: TokenCodec,
    store: Arc<dyn Store>,
    audit: Audit,
    pow: ProofOfWork,
    issuer: String,
    audience: String,
    ttl_secs: u64,
    max_lifetime_secs: u64,
    bind_user_agent: bool,
    min_entropy_score: u8,
    dpop_mode: DpopMode,
    dpop: DpopVerifier,
    max_per_fingerprint: u32,
    /// `store.on_unavailable`: `open` skips the session cap when the store fails.
    fail_open: bool,
    /// `server.public_url` without a trailing slash: DPoP `htu` is this plus the request path.
    public_url: Option<String>,
    /// `server.body_timeout_ms`: the mint body must arrive within it.
    body_timeout: std::time::Duration,
    /// `mint.policies`, with the verifier of each gate.
    policies: Policies,
    /// Who the client is, for the gates that send it on (captcha `remoteip`).
    client_ip: ClientIpResolver,
}

impl Sessions {
    /// The engine for this configuration, signing with `keys` (decoded from it by the runtime),
    /// keeping its state in `store`, and reporting to `audit`.
    pub(crate) fn new(
        config: &Config,
        keys: KeySet,
        store: Arc<dyn Store>,
        audit: Audit,
        policies: Policies,
    ) -> Self {
        let s = config.session();
        let pow = ProofOfWork::new(
            *keys.derived_secret(),
            config.pow().difficulty,
            std::time::Duration::from_secs(config.pow().challenge_ttl_secs),
        );
        Self {
            inner: Arc::new(Inner {
                codec: TokenCodec::with_cache(
                    keys,
                    &s.issuer,
                    &s.audience,
                    s.leeway_secs,
                    s.verified_cache_size,
                ),
                store,
                audit,
                pow,
                issuer: s.issuer.clone(),
                audience: s.audience.clone(),
                ttl_secs: config.ttl().as_secs(),
                max_lifetime_secs: s.max_lifetime_secs,
                bind_user_agent: s.bind_user_agent,
                min_entropy_score: s.min_entropy_score,
                dpop_mode: s.dpop,
                dpop: DpopVerifier::new(s.dpop_max_age_secs, s.leeway_secs),
                max_per_fingerprint: s.max_per_fingerprint,
                fail_open: config.store().on_unavailable == crate::config::OnUnavailable::Open,
                public_url: config
                    .server()
                    .public_url
                    .as_deref()
                    .map(|u| u.trim_end_matches('/').to_owned()),
                body_timeout: std::time::Duration::from_millis(config.server().body_timeout_ms),
                policies,
                client_ip: ClientIpResolver::new(config.server().trusted_proxies.clone()),
            }),
        }
    }

    /// How long a request body may take to arrive (`server.body_timeout_ms`).
    pub(crate) fn body_timeout(&self) -> std::time::Duration {
        self.inner.body_timeout
    }

    /// Readiness, for `GET /health`: `false` while the shared store cannot be reached and the
    /// failure policy is to refuse (`store.on_unavailable = "closed"`), since every mint and
    /// every authenticated call would then get `503 store_unavailable`.
    pub async fn ready(&self) -> bool {
        if self.inner.fail_open {
            return true;
        }
        match self.inner.store.ping().await {
            Ok(()) => true,
            Err(e) => {
                store::log_failure("ping", &e, "reported unavailable by /health");
                false
            }
        }
    }

    /// The token codec.
    #[cfg(test)]
    pub(crate) fn codec(&self) -> &TokenCodec {
        &self.inner.codec
    }

    /// A fresh proof-of-work challenge (`GET /challenge`).
    pub fn challenge(&self) -> Challenge {
        self.inner.pow.challenge(unix_now())
    }

    fn issue(&self, claims: &Claims, now: u64) -> Result<SessionObject, Error> {
        let token = self.inner.codec.sign(claims)?;
        Ok(SessionObject {
            token,
            token_type: if claims.cnf.is_some() {
                "DPoP"
            } else {
                "Bearer"
            }
            .to_owned(),
            session_id: claims.jti.clone(),
            expires_at: claims.exp,
            expires_in: claims.exp.saturating_sub(now),
        })
    }
}

/// The slots a session takes in the cap: its fingerprint, its user when an identity gate named
/// one, and its key when bound.
fn cap_keys(claims: &Claims) -> Vec<String> {
    let mut keys = vec![format!("fp:{}", claims.fp)];
    if let Some(user) = &claims.usr {
        keys.push(format!("usr:{user}"));
    }
    if let Some(cnf) = &claims.cnf {
        keys.push(format!("jkt:{}", cnf.jkt));
    }
    keys
}

/// What the unit tests of the session files share: an engine on a memory store, with the
/// interaction and proof-of-work gates off, and requests that carry a token.
#[cfg(test)]
mod testing {
    use std::sync::Arc;

    use http::Request;
    use http::header::{AUTHORIZATION, USER_AGENT};

    use super::{SessionObject, Sessions};
    use crate::audit::Audit;
    use crate::config::{Config, ConfigBuilder};
    use crate::fingerprint::FINGERPRINT_HEADER;
    use crate::store::MemoryStore;
    use crate::token::KeySet;

    pub(super) const FP: &str = "unit-test-device-1";
    pub(super) const UA: &str = "unit-tests/1.0";

    /// A configuration with a known key and the mint gates off.
    pub(super) fn config() -> ConfigBuilder {
        Config::builder()
            .upstream_api_key("sk-test")
            .session_jwt_secret("unit-test-secret-unit-test-secret!!")
            .session_min_entropy_score(0)
            .pow_difficulty(0)
    }

    pub(super) fn sessions(builder: ConfigBuilder) -> Sessions {
        let config = builder.build().unwrap();
        let keys = KeySet::from_config(config.session()).unwrap();
        let policies = crate::gate::Policies::new(&config, &[]).unwrap();
        Sessions::new(
            &config,
            keys,
            Arc::new(MemoryStore::new()),
            Audit::default(),
            policies,
        )
    }

    /// Mints a session for [`FP`] from [`UA`].
    pub(super) async fn mint(sessions: &Sessions) -> SessionObject {
        let head = Request::post("/session")
            .header(USER_AGENT, UA)
            .body(())
            .unwrap();
        let body = format!(r#"{{"fingerprint":"{FP}"}}"#);
        sessions.mint(&head, body.as_bytes()).await.unwrap()
    }

    /// An authenticated request with `Authorization: Bearer <token>`, [`FP`] and [`UA`].
    pub(super) fn request(token: &str) -> Request<()> {
        Request::get("/openai/models")
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(FINGERPRINT_HEADER, FP)
            .header(USER_AGENT, UA)
            .body(())
            .unwrap()
    }
}
