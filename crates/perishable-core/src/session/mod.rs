//! Sessions: minting, verification, refresh and revocation.
//!
//! [`Sessions`] is the engine; [`SessionService`] serves its routes (`GET /challenge`,
//! `POST /session`, `POST /session/refresh`, `DELETE /session`, `GET /health`) as one tower
//! Service, for stacks built without the axum router.
//!
//! Minting (`POST /session`) checks, in order: the JSON shape (`400 invalid_json`), the
//! fingerprint (`missing_fingerprint`, `invalid_fingerprint`), the interaction entropy scored on
//! the server ([`crate::entropy`]; `insufficient_entropy`), and the proof of work
//! ([`crate::pow`]; `pow_required`, `pow_invalid`). Only when all pass is the challenge used up
//! and a token signed, so a refused mint changes no state.
//!
//! With a `DPoP` header (and `session.dpop` not `off`) the proof is verified ([`crate::dpop`])
//! and the session is bound to its key (`cnf.jkt`, `token_type` `DPoP`); with
//! `session.dpop = "required"` a mint without one gets `401 dpop_required`. Last, the session cap
//! (in the [`Store`]; `429 too_many_sessions`) must have room for the fingerprint (and key).
//!
//! Verification (used by [`crate::verify::VerifyLayer`]) checks the token
//! ([`crate::token::TokenCodec::verify`]), then that its `jti` is not revoked, that the SHA-256
//! of the `X-Perishable-Fingerprint` header equals `fp`, and that the User-Agent hash equals `ua`
//! when the token carries one. A key-bound token must come as `Authorization: DPoP <token>` with
//! a valid proof from its key (`401 dpop_required` without one, `401 invalid_dpop_proof` for a bad
//! one, as RFC 9449 section 7.1 says; a bad proof on the mint is `400`); a bearer token must come as `Bearer`, and is refused when `session.dpop = "required"`.
//!
//! Revocation keeps the `jti` in memory until the token's own `exp`, after which the token is
//! refused as expired anyway, so the list holds only live entries. It also frees the session's
//! slots in the cap.

mod mint;
mod service;

use std::sync::Arc;

use http::header::{AUTHORIZATION, HOST, USER_AGENT};
use http::{HeaderMap, Request};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub use self::mint::MintRequest;
pub use self::service::{MAX_MINT_BODY_BYTES, SessionService};
use crate::audit::{Audit, AuditEvent};
use crate::clock::unix_now;
use futures_util::TryFutureExt;

use crate::config::{Config, DpopMode};
use crate::dpop::{DPOP_HEADER, DpopVerifier, Expected, Htu, OriginalUri};
use crate::error::{Error, ErrorCode, RateLimitInfo};
use crate::fingerprint::{self, FINGERPRINT_HEADER};
use crate::pow::{Challenge, ProofOfWork};
use crate::store::{self, Admission, Set, Store, StoreError, log_failure};
use crate::token::{Claims, Confirmation, KeySet, TokenCodec, VerifiedSession, hash_b64, new_jti};

/// The rest of a verification that waits for the store: the revocation lookup and the DPoP
/// replay record.
pub(crate) type PendingVerify =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<VerifiedSession, Error>> + Send>>;

async fn finish_verify(
    store: Arc<dyn Store>,
    claims: Arc<Claims>,
    dpop_seen: Option<ReplayRecord>,
) -> Result<VerifiedSession, Error> {
    let revoked_now = store
        .contains(Set::Revoked, &claims.jti)
        .await
        .map_err(|e| store::refuse("contains", &e))?;
    if revoked_now {
        return Err(revoked());
    }
    if let Some((id, until)) = dpop_seen {
        let fresh = store
            .insert_once(Set::DpopSeen, &id, until)
            .await
            .map_err(|e| store::refuse("insert_once", &e))?;
        if !fresh {
            return Err(replayed());
        }
    }
    Ok(VerifiedSession { claims })
}

fn revoked() -> Error {
    Error::new(ErrorCode::SessionRevoked, "the session was revoked")
}

fn replayed() -> Error {
    Error::new(
        ErrorCode::InvalidDpopProof,
        "the DPoP proof was already used (jti)",
    )
}

/// A DPoP proof's replay id and until when it must stay recorded.
type ReplayRecord = (String, u64);

/// The session object of `POST /session` and `POST /session/refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// How the token was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bearer,
    Dpop,
}

impl Sessions {
    /// The engine for this configuration, signing with `keys` (decoded from it by the runtime),
    /// keeping its state in `store`, and reporting to `audit`.
    pub(crate) fn new(config: &Config, keys: KeySet, store: Arc<dyn Store>, audit: Audit) -> Self {
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

    /// The token codec (to sign or inspect tokens yourself).
    pub fn codec(&self) -> &TokenCodec {
        &self.inner.codec
    }

    /// A fresh proof-of-work challenge (`GET /challenge`).
    pub fn challenge(&self) -> Challenge {
        self.inner.pow.challenge(unix_now())
    }

    /// Mints a session from a `POST /session` request (its head, and its body already read).
    pub async fn mint(&self, req: &Request<()>, body: &[u8]) -> Result<SessionObject, Error> {
        let pending = self.check_mint(req, body)?;
        self.finish_mint(pending).await
    }

    /// The synchronous checks of a mint: body, entropy, proof of work, DPoP proof.
    fn check_mint(&self, req: &Request<()>, body: &[u8]) -> Result<PendingMint, Error> {
        let request = MintRequest::parse(body)?;
        let score = crate::entropy::score(&request.entropy);
        if score < self.inner.min_entropy_score {
            return Err(Error::new(
                ErrorCode::InsufficientEntropy,
                format!(
                    "not enough interaction to mint a session (score {score}, needs {})",
                    self.inner.min_entropy_score
                ),
            ));
        }
        let now = unix_now();
        let pow = &self.inner.pow;
        let pow_used = match (pow.enabled(), request.pow) {
            (false, _) => None,
            (true, solution) => {
                let until = pow.check(solution.as_ref(), now)?;
                solution.map(|s| (s.challenge, until))
            }
        };
        // With DPoP off, DPoP headers are not even parsed.
        let presented = match self.inner.dpop_mode {
            DpopMode::Off => None,
            _ => single_dpop_header(req.headers())?,
        };
        let (cnf, dpop_seen) = match (self.inner.dpop_mode, presented) {
            (DpopMode::Off, _) | (DpopMode::Optional, None) => (None, None),
            (_, Some(proof)) => {
                let htu = self.expected_htu(req)?;
                let expected = Expected {
                    htm: req.method().as_str(),
                    htu: htu.as_htu(),
                    access_token: None,
                    jkt: None,
                };
                let verified = self.inner.dpop.verify(proof, &expected, now)?;
                let seen = (
                    verified.replay_id(),
                    self.inner.dpop.replay_until(&verified),
                );
                (Some(Confirmation { jkt: verified.jkt }), Some(seen))
            }
            (DpopMode::Required, None) => {
                return Err(Error::new(
                    ErrorCode::DpopRequired,
                    "this service requires key-bound sessions: send a DPoP proof",
                ));
            }
        };
        let claims = Claims {
            iss: self.inner.issuer.clone(),
            aud: self.inner.audience.clone(),
            jti: new_jti(),
            iat: now,
            nbf: now,
            exp: now + self.inner.ttl_secs,
            auth_time: now,
            fp: fingerprint::hash(&request.fingerprint),
            ua: self.inner.bind_user_agent.then(|| {
                hash_b64(
                    req.headers()
                        .get(USER_AGENT)
                        .map_or(&[][..], |v| v.as_bytes()),
                )
            }),
            cnf,
        };
        Ok(PendingMint {
            claims,
            pow_used,
            dpop_seen,
        })
    }

    /// The stateful steps of a mint: the cap, then the replay records, then the token.
    async fn finish_mint(&self, pending: PendingMint) -> Result<SessionObject, Error> {
        let PendingMint {
            claims,
            pow_used,
            dpop_seen,
        } = pending;
        let store = &self.inner.store;
        let slots = cap_keys(&claims);
        let admission = match store
            .admit_session(
                &slots,
                &claims.jti,
                claims.exp,
                self.inner.max_per_fingerprint,
            )
            .await
        {
            Ok(admission) => admission,
            // The cap is a limit, like rate limits: `open` skips it.
            Err(e) if self.inner.fail_open => {
                log_failure("admit_session", &e, "skipped the session cap (fail open)");
                Admission::Admitted
            }
            Err(e) => return Err(store::refuse("admit_session", &e)),
        };
        if let Admission::Full { retry_after_secs } = admission {
            return Err(Error::new(
                ErrorCode::TooManySessions,
                format!(
                    "at most {} live sessions per device: revoke one or wait for it to expire",
                    self.inner.max_per_fingerprint
                ),
            )
            .with_rate_limit(RateLimitInfo {
                policy: "sessions",
                quota: self.inner.max_per_fingerprint,
                window_secs: self.inner.ttl_secs,
                remaining: 0,
                retry_after: std::time::Duration::from_secs(retry_after_secs),
            }));
        }
        // The cap had room: only now use up the challenge and the proof.
        let recorded = async {
            if let Some((challenge, until)) = &pow_used
                && !store.insert_once(Set::PowUsed, challenge, *until).await?
            {
                return Ok(Some(Error::new(
                    ErrorCode::PowInvalid,
                    "the challenge was already used",
                )));
            }
            if let Some((id, until)) = &dpop_seen
                && !store.insert_once(Set::DpopSeen, id, *until).await?
            {
                return Ok(Some(Error::new(
                    ErrorCode::InvalidDpopProof,
                    "the DPoP proof was already used (jti)",
                )));
            }
            Ok::<_, StoreError>(None)
        }
        .await;
        let refusal = match recorded {
            Ok(None) => None,
            Ok(Some(refusal)) => Some(refusal),
            Err(e) => Some(store::refuse("insert_once", &e)),
        };
        let signed = match refusal {
            Some(refusal) => Err(refusal),
            None => self.issue(&claims, claims.iat),
        };
        match &signed {
            Ok(session) => {
                tracing::Span::current().record("session_id", session.session_id.as_str());
                metrics::counter!("perishable_sessions_total", "event" => "minted").increment(1);
                self.inner.audit.emit(|| AuditEvent::Minted {
                    session_id: session.session_id.clone(),
                    key_bound: claims.cnf.is_some(),
                    expires_at: session.expires_at,
                });
            }
            Err(_) => {
                // Give the slot back; a failure here only delays its release until `exp`.
                let _ = store.release_session(&slots, &claims.jti).await;
            }
        }
        signed
    }

    /// The URL a DPoP proof for `req` must name; see [`crate::dpop`].
    fn expected_htu<B>(&self, req: &Request<B>) -> Result<ExpectedHtu, Error> {
        if let Some(base) = &self.inner.public_url {
            return Ok(ExpectedHtu::Exact(format!("{base}{}", req.uri().path())));
        }
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidDpopProof,
                    "the request has no Host header to check the DPoP proof's htu against",
                )
            })?;
        let path = match req.extensions().get::<OriginalUri>() {
            Some(OriginalUri(uri)) => uri.path().to_owned(),
            None => req.uri().path().to_owned(),
        };
        Ok(ExpectedHtu::HostAndPath { host, path })
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

    /// Verifies an authenticated request; see the [module docs](self).
    ///
    /// The request is read at once (its headers, method and URL); only owned data crosses the
    /// store calls, so the returned future is `Send` whatever the body type.
    pub fn verify<B>(
        &self,
        req: &Request<B>,
    ) -> impl std::future::Future<Output = Result<VerifiedSession, Error>> + Send + 'static {
        match self.verify_now(req) {
            Ok(done) => futures_util::future::Either::Left(std::future::ready(done)),
            Err(pending) => futures_util::future::Either::Right(pending),
        }
    }

    /// [`verify`](Self::verify), answered at once when the store answers from memory (`Ok`), or
    /// the rest of the work as a future (`Err`) when it must wait for the store.
    pub(crate) fn verify_now<B>(
        &self,
        req: &Request<B>,
    ) -> Result<Result<VerifiedSession, Error>, PendingVerify> {
        let (claims, dpop_seen) = match self.check_request(req) {
            Ok(checked) => checked,
            Err(e) => return Ok(Err(e.authenticating())),
        };
        // A store that answers from memory decides here; any other gets the rest as a future.
        let store = &self.inner.store;
        let now = match store.contains_now(Set::Revoked, &claims.jti) {
            Some(true) => Some(Err(revoked())),
            Some(false) => match &dpop_seen {
                None => Some(Ok(())),
                Some((id, until)) => store
                    .insert_once_now(Set::DpopSeen, id, *until)
                    .map(|fresh| if fresh { Ok(()) } else { Err(replayed()) }),
            },
            None => None,
        };
        match now {
            Some(decided) => Ok(decided
                .map(|()| VerifiedSession { claims })
                .map_err(Error::authenticating)),
            None => Err(Box::pin(
                finish_verify(store.clone(), claims, dpop_seen).map_err(Error::authenticating),
            )),
        }
    }

    /// The synchronous checks of [`verify`](Self::verify): token, fingerprint, User-Agent, and
    /// the DPoP proof (whose replay id is returned for the store).
    fn check_request<B>(
        &self,
        req: &Request<B>,
    ) -> Result<(Arc<Claims>, Option<ReplayRecord>), Error> {
        let headers = req.headers();
        let (scheme, token) = presented_token(headers)?;
        let verified = self.inner.codec.verify_cached(token)?;
        let claims = verified.claims;
        let now = unix_now();
        let presented = headers.get(FINGERPRINT_HEADER).ok_or_else(|| {
            Error::new(
                ErrorCode::FingerprintMismatch,
                "the X-Perishable-Fingerprint header is missing",
            )
        })?;
        let presented_ua = match claims.ua {
            Some(_) => headers.get(USER_AGENT).map_or(&[][..], |v| v.as_bytes()),
            None => &[][..],
        };
        // The same values as last time with this token: no need to hash them again.
        let seen_before = verified.matched.get().is_some_and(|(fp, ua)| {
            bool::from(fp.ct_eq(presented.as_bytes()) & ua.ct_eq(presented_ua))
        });
        if !seen_before {
            if !fingerprint::matches(presented.as_bytes(), &claims.fp) {
                return Err(Error::new(
                    ErrorCode::FingerprintMismatch,
                    "the fingerprint does not match the session",
                ));
            }
            if let Some(ua) = &claims.ua
                && !fingerprint::matches(presented_ua, ua)
            {
                return Err(Error::new(
                    ErrorCode::FingerprintMismatch,
                    "the User-Agent does not match the session",
                ));
            }
            let _ = verified
                .matched
                .set((presented.as_bytes().into(), presented_ua.into()));
        }
        match (&claims.cnf, scheme) {
            (Some(_), Scheme::Bearer) => {
                return Err(Error::new(
                    ErrorCode::DpopRequired,
                    "this session is bound to a key: send Authorization: DPoP <token> and a DPoP proof",
                ));
            }
            (Some(cnf), Scheme::Dpop) => {
                let proof = single_dpop_header(headers)?.ok_or_else(|| {
                    Error::new(
                        ErrorCode::DpopRequired,
                        "this session is bound to a key: every request needs a DPoP proof",
                    )
                })?;
                let htu = self.expected_htu(req)?;
                // Verified above, so text; were it not, refuse rather than skip the `ath` check.
                let token = std::str::from_utf8(token).map_err(|_| {
                    Error::new(ErrorCode::InvalidToken, "the session token is malformed")
                })?;
                let expected = Expected {
                    htm: req.method().as_str(),
                    htu: htu.as_htu(),
                    access_token: Some(token),
                    jkt: Some(&cnf.jkt),
                };
                let verified = self.inner.dpop.verify(proof, &expected, now)?;
                let seen = (
                    verified.replay_id(),
                    self.inner.dpop.replay_until(&verified),
                );
                return Ok((claims, Some(seen)));
            }
            (None, Scheme::Dpop) => {
                return Err(Error::new(
                    ErrorCode::InvalidToken,
                    "this session is not bound to a key: send Authorization: Bearer <token>",
                ));
            }
            (None, Scheme::Bearer) if self.inner.dpop_mode == DpopMode::Required => {
                return Err(Error::new(
                    ErrorCode::DpopRequired,
                    "this service requires key-bound sessions",
                ));
            }
            (None, Scheme::Bearer) => {}
        }
        Ok((claims, None))
    }

    /// Trades a verified session for a fresh token and revokes the old one.
    ///
    /// Refresh keeps `auth_time`, so it cannot extend a session past `session.max_lifetime_secs`.
    pub async fn refresh(&self, session: &VerifiedSession) -> Result<SessionObject, Error> {
        let now = unix_now();
        let old = &session.claims;
        let end_of_life = old.auth_time.saturating_add(self.inner.max_lifetime_secs);
        if now >= end_of_life {
            return Err(Error::new(
                ErrorCode::TokenExpired,
                "the session reached its maximum lifetime: mint a new one",
            ));
        }
        let store = &self.inner.store;
        // Revoking first makes a concurrent second refresh of the same token fail.
        let fresh = store
            .insert_once(Set::Revoked, &old.jti, old.exp)
            .await
            .map_err(|e| store::refuse("insert_once", &e))?;
        if !fresh {
            return Err(Error::new(
                ErrorCode::SessionRevoked,
                "the session was revoked",
            ));
        }
        let claims = Claims {
            jti: new_jti(),
            iat: now,
            nbf: now,
            exp: (now + self.inner.ttl_secs).min(end_of_life),
            ..Claims::clone(old)
        };
        store
            .replace_session(&cap_keys(old), &old.jti, &claims.jti, claims.exp)
            .await
            .map_err(|e| store::refuse("replace_session", &e))?;
        let issued = self.issue(&claims, now)?;
        metrics::counter!("perishable_sessions_total", "event" => "refreshed").increment(1);
        self.inner.audit.emit(|| AuditEvent::Refreshed {
            old_session_id: old.jti.clone(),
            session_id: issued.session_id.clone(),
            expires_at: issued.expires_at,
        });
        Ok(issued)
    }

    /// Revokes a verified session until its token expires, and frees its cap slots.
    pub async fn revoke(&self, session: &VerifiedSession) -> Result<(), Error> {
        let claims = &session.claims;
        let store = &self.inner.store;
        store
            .insert_once(Set::Revoked, &claims.jti, claims.exp)
            .await
            .map_err(|e| store::refuse("insert_once", &e))?;
        store
            .release_session(&cap_keys(claims), &claims.jti)
            .await
            .map_err(|e| store::refuse("release_session", &e))?;
        metrics::counter!("perishable_sessions_total", "event" => "revoked").increment(1);
        self.inner.audit.emit(|| AuditEvent::Revoked {
            session_id: claims.jti.clone(),
        });
        Ok(())
    }
}

/// A mint that passed its synchronous checks.
struct PendingMint {
    claims: Claims,
    /// The challenge to record as used, and until when.
    pow_used: Option<(String, u64)>,
    /// The DPoP proof to record as seen, and until when.
    dpop_seen: Option<(String, u64)>,
}

/// The slots a session takes in the cap: its fingerprint, and its key when bound.
fn cap_keys(claims: &Claims) -> Vec<String> {
    let mut keys = vec![format!("fp:{}", claims.fp)];
    if let Some(cnf) = &claims.cnf {
        keys.push(format!("jkt:{}", cnf.jkt));
    }
    keys
}

/// An owned expected `htu`, borrowed as [`Htu`].
enum ExpectedHtu {
    Exact(String),
    HostAndPath { host: String, path: String },
}

impl ExpectedHtu {
    fn as_htu(&self) -> Htu<'_> {
        match self {
            Self::Exact(url) => Htu::Exact(url),
            Self::HostAndPath { host, path } => Htu::HostAndPath { host, path },
        }
    }
}

/// The one `DPoP` header, if any (several are refused).
fn single_dpop_header(headers: &HeaderMap) -> Result<Option<&str>, Error> {
    let mut values = headers.get_all(DPOP_HEADER).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Error::new(
            ErrorCode::InvalidDpopProof,
            "send exactly one DPoP header",
        ));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| Error::new(ErrorCode::InvalidDpopProof, "the DPoP header is malformed"))
}

/// The token of `Authorization: Bearer <token>` or `Authorization: DPoP <token>`.
/// The scheme and token of `Authorization`. The token stays bytes: the verified-token cache is
/// looked up with them, and only a token not seen before is checked as text (by
/// [`TokenCodec`](crate::token::TokenCodec)).
fn presented_token(headers: &HeaderMap) -> Result<(Scheme, &[u8]), Error> {
    let missing = || {
        Error::new(
            ErrorCode::MissingToken,
            "a session token is required: Authorization: Bearer <token>",
        )
    };
    let malformed = || {
        Error::new(
            ErrorCode::InvalidToken,
            "the Authorization header is malformed",
        )
    };
    let value = headers.get(AUTHORIZATION).ok_or_else(missing)?.as_bytes();
    // Split at the first space; only the token must be text (the scheme is compared as bytes).
    let space = memchr::memchr(b' ', value).ok_or_else(malformed)?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    let scheme = if scheme.eq_ignore_ascii_case(b"bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case(b"dpop") {
        Scheme::Dpop
    } else {
        return Err(Error::new(
            ErrorCode::InvalidToken,
            "the Authorization scheme must be Bearer or DPoP",
        ));
    };
    let token = token.trim_ascii();
    if token.is_empty() {
        return Err(missing());
    }
    Ok((scheme, token))
}
