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
//! Verification (used by [`crate::verify::VerifyLayer`]) checks the token
//! ([`crate::token::TokenCodec::verify`]), then that its `jti` is not revoked, that the SHA-256
//! of the `X-Perishable-Fingerprint` header equals `fp`, and that the User-Agent hash equals `ua`
//! when the token carries one.
//!
//! Revocation keeps the `jti` in memory until the token's own `exp`, after which the token is
//! refused as expired anyway, so the list holds only live entries.

mod mint;
mod service;

use std::sync::Arc;

use http::HeaderMap;
use http::header::{AUTHORIZATION, USER_AGENT};
use serde::{Deserialize, Serialize};

pub use self::mint::MintRequest;
pub use self::service::{MAX_MINT_BODY_BYTES, SessionService};
use crate::config::Config;
use crate::error::{Error, ErrorCode};
use crate::expiring::ExpiringSet;
use crate::fingerprint::{self, FINGERPRINT_HEADER};
use crate::pow::{Challenge, ProofOfWork};
use crate::token::{Claims, TokenCodec, hash_b64, new_jti};
use crate::verify::VerifiedSession;

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
    revoked: ExpiringSet,
    pow: ProofOfWork,
    issuer: String,
    audience: String,
    ttl_secs: u64,
    max_lifetime_secs: u64,
    bind_user_agent: bool,
    min_entropy_score: u8,
}

/// Now, in Unix seconds.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Sessions {
    /// The engine for this configuration.
    pub fn new(config: &Config) -> Self {
        let s = config.session();
        let keys = config.keys().clone();
        let pow = ProofOfWork::new(
            *keys.derived_secret(),
            config.pow().difficulty,
            std::time::Duration::from_secs(config.pow().challenge_ttl_secs),
        );
        Self {
            inner: Arc::new(Inner {
                codec: TokenCodec::new(keys, &s.issuer, &s.audience, s.leeway_secs),
                revoked: ExpiringSet::new(),
                pow,
                issuer: s.issuer.clone(),
                audience: s.audience.clone(),
                ttl_secs: config.ttl().as_secs(),
                max_lifetime_secs: s.max_lifetime_secs,
                bind_user_agent: s.bind_user_agent,
                min_entropy_score: s.min_entropy_score,
            }),
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

    /// Mints a session from a `POST /session` request's headers and body.
    pub fn mint(&self, headers: &HeaderMap, body: &[u8]) -> Result<SessionObject, Error> {
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
        let pow_until = if pow.enabled() {
            Some(pow.check(request.pow.as_ref(), now)?)
        } else {
            None
        };
        // Every check passed: only now use up the challenge.
        if let (Some(until), Some(solution)) = (pow_until, request.pow.as_ref())
            && !pow.consume(solution, until, now)
        {
            return Err(Error::new(
                ErrorCode::PowInvalid,
                "the challenge was already used",
            ));
        }
        let claims = Claims {
            iss: self.inner.issuer.clone(),
            aud: self.inner.audience.clone(),
            jti: new_jti(),
            iat: now,
            nbf: now,
            exp: now + self.inner.ttl_secs,
            auth_time: now,
            fp: fingerprint::hash(&request.fingerprint),
            ua: self
                .inner
                .bind_user_agent
                .then(|| hash_b64(headers.get(USER_AGENT).map_or(&[][..], |v| v.as_bytes()))),
            cnf: None,
        };
        self.issue(&claims, now)
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

    /// Verifies an authenticated request's headers; see the [module docs](self).
    pub fn verify(&self, headers: &HeaderMap) -> Result<VerifiedSession, Error> {
        let token = bearer_token(headers)?;
        let claims = self.inner.codec.verify(token)?;
        let now = unix_now();
        if self.inner.revoked.contains(&claims.jti, now) {
            return Err(Error::new(
                ErrorCode::SessionRevoked,
                "the session was revoked",
            ));
        }
        let presented = headers.get(FINGERPRINT_HEADER).ok_or_else(|| {
            Error::new(
                ErrorCode::FingerprintMismatch,
                "the X-Perishable-Fingerprint header is missing",
            )
        })?;
        if !fingerprint::matches(presented.as_bytes(), &claims.fp) {
            return Err(Error::new(
                ErrorCode::FingerprintMismatch,
                "the fingerprint does not match the session",
            ));
        }
        if let Some(ua) = &claims.ua {
            let presented = headers.get(USER_AGENT).map_or(&[][..], |v| v.as_bytes());
            if !fingerprint::matches(presented, ua) {
                return Err(Error::new(
                    ErrorCode::FingerprintMismatch,
                    "the User-Agent does not match the session",
                ));
            }
        }
        Ok(VerifiedSession { claims })
    }

    /// Trades a verified session for a fresh token and revokes the old one.
    ///
    /// Refresh keeps `auth_time`, so it cannot extend a session past `session.max_lifetime_secs`.
    pub fn refresh(&self, session: &VerifiedSession) -> Result<SessionObject, Error> {
        let now = unix_now();
        let old = &session.claims;
        let end_of_life = old.auth_time.saturating_add(self.inner.max_lifetime_secs);
        if now >= end_of_life {
            return Err(Error::new(
                ErrorCode::TokenExpired,
                "the session reached its maximum lifetime: mint a new one",
            ));
        }
        if !self.inner.revoked.insert(&old.jti, old.exp, now) {
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
            ..old.clone()
        };
        self.issue(&claims, now)
    }

    /// Revokes a verified session until its token expires.
    pub fn revoke(&self, session: &VerifiedSession) {
        self.inner
            .revoked
            .insert(&session.claims.jti, session.claims.exp, unix_now());
    }

    /// Revoked sessions held in memory (each until its token expires).
    pub fn revoked_count(&self) -> usize {
        self.inner.revoked.len()
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, Error> {
    let value = headers.get(AUTHORIZATION).ok_or_else(|| {
        Error::new(
            ErrorCode::MissingToken,
            "a session token is required: Authorization: Bearer <token>",
        )
    })?;
    let value = value.to_str().map_err(|_| {
        Error::new(
            ErrorCode::InvalidToken,
            "the Authorization header is malformed",
        )
    })?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidToken,
            "the Authorization header is malformed",
        )
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::new(
            ErrorCode::InvalidToken,
            "the Authorization scheme must be Bearer",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Error::new(
            ErrorCode::MissingToken,
            "a session token is required: Authorization: Bearer <token>",
        ));
    }
    Ok(token)
}
