//! The lifecycle of a verified session: refresh (a fresh token, the old one revoked, never past
//! `session.max_lifetime_secs`) and revocation (until the token's own `exp`, its cap slots
//! freed).

use super::{SessionObject, Sessions, cap_keys};
use crate::audit::AuditEvent;
use crate::clock::unix_now;
use crate::error::{Error, ErrorCode};
use crate::store::{self, Set};
use crate::token::{Claims, VerifiedSession, new_jti};

impl Sessions {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::{config, mint, request, sessions};
    use super::*;

    #[tokio::test]
    async fn refresh_issues_a_new_token_and_revokes_the_old_one() {
        let sessions = sessions(config());
        let first = mint(&sessions).await;
        let verified = sessions.verify(&request(&first.token)).await.unwrap();
        let second = sessions.refresh(&verified).await.unwrap();
        assert_ne!(second.session_id, first.session_id);
        assert!(second.expires_at >= first.expires_at);
        // The new token verifies, and keeps the claims that bind it.
        let renewed = sessions.verify(&request(&second.token)).await.unwrap();
        assert_eq!(renewed.claims.fp, verified.claims.fp);
        assert_eq!(renewed.claims.ua, verified.claims.ua);
        assert_eq!(renewed.claims.auth_time, verified.claims.auth_time);
        // The old one is revoked: it neither verifies nor refreshes a second time.
        let refused = sessions.verify(&request(&first.token)).await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::SessionRevoked);
        let again = sessions.refresh(&verified).await.unwrap_err();
        assert_eq!(again.code(), ErrorCode::SessionRevoked);
    }

    #[tokio::test]
    async fn refresh_never_passes_the_maximum_lifetime() {
        let sessions = sessions(
            config()
                .session_ttl_secs(600)
                .session_max_lifetime_secs(900),
        );
        let minted = mint(&sessions).await;
        let verified = sessions.verify(&request(&minted.token)).await.unwrap();
        // Minted 800 s ago: the new token ends with the session, 100 s from now.
        let old = VerifiedSession {
            claims: Arc::new(Claims {
                auth_time: verified.claims.auth_time - 800,
                ..Claims::clone(&verified.claims)
            }),
        };
        let renewed = sessions.refresh(&old).await.unwrap();
        assert_eq!(renewed.expires_at, old.claims.auth_time + 900);
        // Minted 900 s ago: the session is over.
        let over = VerifiedSession {
            claims: Arc::new(Claims {
                jti: "another".to_owned(),
                auth_time: verified.claims.auth_time - 900,
                ..Claims::clone(&verified.claims)
            }),
        };
        let refused = sessions.refresh(&over).await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::TokenExpired);
    }

    #[tokio::test]
    async fn a_revoked_session_is_refused_and_frees_its_cap_slot() {
        let sessions = sessions(config().session_max_per_fingerprint(1));
        let minted = mint(&sessions).await;
        let verified = sessions.verify(&request(&minted.token)).await.unwrap();
        sessions.revoke(&verified).await.unwrap();
        let refused = sessions.verify(&request(&minted.token)).await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::SessionRevoked);
        // The one slot of the device is free again.
        mint(&sessions).await;
    }
}
