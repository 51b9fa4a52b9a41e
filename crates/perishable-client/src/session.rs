//! [`Session`]: a minted session token and when it expires.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::error::{Error, Result};

/// How a session's token is presented: `Authorization: Bearer <token>`, or
/// `Authorization: DPoP <token>` with a proof on every request for a key-bound session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenType {
    /// A bearer session (DPoP switched off on either side).
    Bearer,
    /// A session bound to the client's DPoP key (`cnf.jkt` in the token).
    Dpop,
}

impl TokenType {
    /// The `Authorization` scheme: `Bearer` or `DPoP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bearer => "Bearer",
            Self::Dpop => "DPoP",
        }
    }
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session from `POST /session` or `POST /session/refresh`.
///
/// Cheap to clone. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    token: Arc<str>,
    token_type: TokenType,
    session_id: String,
    expires_at: u64,
    lifetime: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("session_id", &self.session_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Session {
    /// The session token (a JWT). Keep it in memory only: it is short-lived and
    /// [`Client`](crate::Client) renews it as needed.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// `Bearer` or `DPoP`.
    pub fn token_type(&self) -> TokenType {
        self.token_type
    }

    /// The session id (the token's `jti`), safe to log.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// When the token expires, Unix seconds (the server's clock).
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// How long the token was valid for when it was issued (`expires_in`), in seconds.
    pub fn lifetime(&self) -> u64 {
        self.lifetime
    }

    /// Whether the session is bound to the client's DPoP key.
    pub fn is_dpop_bound(&self) -> bool {
        self.token_type == TokenType::Dpop
    }
}

/// The wire shape of the session object.
#[derive(Deserialize)]
struct Wire {
    token: String,
    token_type: String,
    session_id: String,
    expires_at: u64,
    expires_in: u64,
}

impl Session {
    /// Parses a session object.
    pub(crate) fn parse(body: &[u8]) -> Result<Self> {
        let wire: Wire = serde_json::from_slice(body)
            .map_err(|_| Error::Protocol("the session object does not parse".to_owned()))?;
        let token_type = if wire.token_type.eq_ignore_ascii_case("DPoP") {
            TokenType::Dpop
        } else if wire.token_type.eq_ignore_ascii_case("Bearer") {
            TokenType::Bearer
        } else {
            return Err(Error::Protocol(format!(
                "unknown token_type {:?}",
                wire.token_type
            )));
        };
        if wire.token.is_empty() || !wire.token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Protocol(
                "the session token is not printable ASCII".to_owned(),
            ));
        }
        Ok(Self {
            token: wire.token.into(),
            token_type,
            session_id: wire.session_id,
            expires_at: wire.expires_at,
            lifetime: wire.expires_in,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hides_the_token() {
        let s = Session::parse(
            br#"{"token":"eyJ.secret.sig","token_type":"DPoP","session_id":"j1","expires_at":10,"expires_in":5}"#,
        )
        .unwrap();
        assert_eq!(s.token(), "eyJ.secret.sig");
        assert!(s.is_dpop_bound());
        assert_eq!(s.lifetime(), 5);
        let debug = format!("{s:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("j1"));
        assert!(
            Session::parse(
                br#"{"token":"t","token_type":"Mac","session_id":"j","expires_at":1,"expires_in":1}"#
            )
            .is_err()
        );
    }
}
