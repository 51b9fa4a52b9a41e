//! Verification of an authenticated request: the token, the fingerprint and User-Agent
//! hashes, the DPoP proof of a key-bound session; then, in the store, the revocation list and
//! the proof's replay record. See the [module docs](super).

use std::sync::Arc;

use futures_util::TryFutureExt;
use http::header::USER_AGENT;
use http::{HeaderName, Request};
use subtle::ConstantTimeEq;

use super::Sessions;
use super::request::{
    Scheme, at_most_one, expected_htu, presented_token, presents_dpop_scheme, single_dpop_header,
};
use crate::clock::unix_now;
use crate::config::DpopMode;
use crate::dpop::{DeferredReplay, Expected};
use crate::error::{Error, ErrorCode};
use crate::fingerprint::{self, FINGERPRINT_HEADER};
use crate::store::{self, Set, Store};
use crate::token::{Claims, VerifiedSession};

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

impl Sessions {
    /// Verifies an authenticated request; see the [module docs](crate::session).
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
        self.verify_checked(req, false)
            .map(|decided| decided.map(|(session, _)| session))
    }

    /// [`verify_now`](Self::verify_now) for a request the upstream Service admits: a DPoP
    /// proof's replay record that the store cannot make at once is handed back
    /// ([`DeferredReplay`]) for the admission to make, in the same store call, instead of a
    /// round trip of its own. The revocation check is still made here.
    pub(crate) fn verify_deferring<B>(
        &self,
        req: &Request<B>,
    ) -> Result<Result<(VerifiedSession, Option<DeferredReplay>), Error>, PendingVerify> {
        self.verify_checked(req, true)
    }

    /// The checks, then the store's answers when it has them at once; with `defer`, a replay
    /// record it cannot make at once is handed back instead of waited for.
    fn verify_checked<B>(
        &self,
        req: &Request<B>,
        defer: bool,
    ) -> Result<Result<(VerifiedSession, Option<DeferredReplay>), Error>, PendingVerify> {
        // Every refusal here is of an authenticated request, in the scheme it presented.
        let dpop = presents_dpop_scheme(req.headers());
        let refuse = move |e: Error| {
            let e = e.authenticating();
            if dpop { e.in_dpop_scheme() } else { e }
        };
        let (claims, dpop_seen) = match self.check_request(req) {
            Ok(checked) => checked,
            Err(e) => return Ok(Err(refuse(e))),
        };
        // A store that answers from memory decides here; any other gets the rest as a future.
        let store = &self.inner.store;
        let pending = |claims, dpop_seen| -> PendingVerify {
            Box::pin(finish_verify(store.clone(), claims, dpop_seen).map_err(refuse))
        };
        match store.contains_now(Set::Revoked, &claims.jti) {
            Some(true) => Ok(Err(refuse(revoked()))),
            Some(false) => {
                let deferred = match dpop_seen {
                    None => None,
                    Some((id, until)) => match store.insert_once_now(Set::DpopSeen, &id, until) {
                        Some(true) => None,
                        Some(false) => return Ok(Err(refuse(replayed()))),
                        None if defer => Some(DeferredReplay { id, until }),
                        None => return Err(pending(claims, Some((id, until)))),
                    },
                };
                Ok(Ok((VerifiedSession { claims }, deferred)))
            }
            None => Err(pending(claims, dpop_seen)),
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
        let one = |name: &HeaderName, shown: &str| {
            at_most_one(headers, name).map_err(|()| {
                Error::new(
                    ErrorCode::FingerprintMismatch,
                    format!("send one {shown} header, not several"),
                )
            })
        };
        let presented = one(&FINGERPRINT_HEADER, "X-Perishable-Fingerprint")?.ok_or_else(|| {
            Error::new(
                ErrorCode::FingerprintMismatch,
                "the X-Perishable-Fingerprint header is missing",
            )
        })?;
        let presented_ua = match claims.ua {
            Some(_) => one(&USER_AGENT, "User-Agent")?.map_or(&[][..], |v| v.as_bytes()),
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
                let htu = expected_htu(self.inner.public_url.as_deref(), req)?;
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
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::super::testing::{FP, config, mint, request, sessions};
    use super::*;

    async fn code(sessions: &Sessions, req: &Request<()>) -> ErrorCode {
        sessions.verify(req).await.unwrap_err().code()
    }

    #[tokio::test]
    async fn a_minted_token_verifies_with_its_fingerprint_and_user_agent() {
        let sessions = sessions(config());
        let minted = mint(&sessions).await;
        let verified = sessions.verify(&request(&minted.token)).await.unwrap();
        assert_eq!(verified.session_id(), minted.session_id);
        assert_eq!(verified.fingerprint_hash(), fingerprint::hash(FP));
        // The synchronous path answers the same, from memory.
        let now = sessions.verify_now(&request(&minted.token));
        assert!(matches!(now, Ok(Ok(_))));
    }

    #[tokio::test]
    async fn an_expired_token_is_refused() {
        let sessions = sessions(config());
        let now = unix_now();
        let claims = Claims {
            iss: "perishable".to_owned(),
            aud: "perishable".to_owned(),
            jti: "expired".to_owned(),
            iat: now - 700,
            nbf: now - 700,
            exp: now - 100,
            auth_time: now - 700,
            fp: fingerprint::hash(FP),
            ua: None,
            cnf: None,
            usr: None,
            tier: None,
        };
        let token = sessions.codec().sign(&claims).unwrap();
        assert_eq!(
            code(&sessions, &request(&token)).await,
            ErrorCode::TokenExpired
        );
        // The challenge is in the scheme the token came with (RFC 9449 section 7.1).
        for scheme in ["DPoP", "Bearer"] {
            let mut req = request(&token);
            req.headers_mut().insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("{scheme} {token}")).unwrap(),
            );
            let refused = sessions.verify(&req).await.unwrap_err();
            let response = refused.into_response::<bytes::Bytes>();
            let challenge = response.headers()[http::header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap();
            assert!(
                challenge.starts_with(&format!(
                    "{scheme} realm=\"perishable\", error=\"invalid_token\""
                )),
                "{challenge}"
            );
            assert!(challenge.contains("token_expired"), "{challenge}");
        }
    }

    #[tokio::test]
    async fn another_fingerprint_or_user_agent_is_refused() {
        let sessions = sessions(config());
        let token = mint(&sessions).await.token;
        let mut req = request(&token);
        req.headers_mut().insert(
            FINGERPRINT_HEADER,
            HeaderValue::from_static("another-device-2"),
        );
        assert_eq!(code(&sessions, &req).await, ErrorCode::FingerprintMismatch);
        let mut req = request(&token);
        req.headers_mut().remove(FINGERPRINT_HEADER);
        assert_eq!(code(&sessions, &req).await, ErrorCode::FingerprintMismatch);
        // The right one, and another: refused, in either order. The same for a User-Agent
        // the session is bound to.
        for other in ["another-device-2", FP] {
            let mut req = request(&token);
            req.headers_mut()
                .append(FINGERPRINT_HEADER, HeaderValue::from_static(other));
            assert_eq!(code(&sessions, &req).await, ErrorCode::FingerprintMismatch);
            let mut req = request(&token);
            req.headers_mut()
                .append(USER_AGENT, HeaderValue::from_static("another/2.0"));
            assert_eq!(code(&sessions, &req).await, ErrorCode::FingerprintMismatch);
        }
        let mut req = request(&token);
        req.headers_mut()
            .insert(USER_AGENT, HeaderValue::from_static("another/2.0"));
        assert_eq!(code(&sessions, &req).await, ErrorCode::FingerprintMismatch);
        // Once a mismatch is refused, the right values still pass (nothing was cached wrongly).
        assert!(sessions.verify(&request(&token)).await.is_ok());
    }

    #[tokio::test]
    async fn a_bearer_token_must_come_as_bearer() {
        let sessions = sessions(config());
        let token = mint(&sessions).await.token;
        let mut req = request(&token);
        req.headers_mut().insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("DPoP {token}")).unwrap(),
        );
        assert_eq!(code(&sessions, &req).await, ErrorCode::InvalidToken);
    }

    #[tokio::test]
    async fn a_token_of_another_key_is_refused() {
        let ours = sessions(config());
        let theirs =
            sessions(config().session_jwt_secret("another-secret-another-secret-another!"));
        let token = mint(&theirs).await.token;
        assert_eq!(code(&ours, &request(&token)).await, ErrorCode::InvalidToken);
    }

    #[tokio::test]
    async fn with_dpop_required_a_bearer_session_is_refused() {
        let lenient = sessions(config());
        let token = mint(&lenient).await.token;
        let strict = sessions(config().session_dpop(DpopMode::Required));
        assert_eq!(
            code(&strict, &request(&token)).await,
            ErrorCode::DpopRequired
        );
    }
}
