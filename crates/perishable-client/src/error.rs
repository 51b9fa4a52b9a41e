//! [`Error`]: everything that can go wrong, with the server's refusals typed.

use std::time::Duration;

use serde::Deserialize;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong.
///
/// A refusal by the server is [`Error::Refused`], with the status and the `code` and `message`
/// of the OpenAI error shape. No variant ever holds the session token or the DPoP key, and
/// neither does the `Display` or `Debug` output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder was given something unusable (base URL, fingerprint, User-Agent, key).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A URL passed to [`Client::headers`](crate::Client::headers) or
    /// [`Client::request`](crate::Client::request) that does not parse.
    #[error("invalid URL: {0}")]
    Url(String),
    /// The server answered with an error in the OpenAI shape (or at least an error status).
    #[error("the server refused {what}: HTTP {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Refused {
        /// What was refused, such as `POST /session`.
        what: &'static str,
        /// The HTTP status.
        status: u16,
        /// The PROTOCOL error code (`insufficient_entropy`, `session_revoked`, ...), when the
        /// body had one.
        code: Option<String>,
        /// The error `type` (`invalid_request_error`, `authentication_error`, ...), when given.
        kind: Option<String>,
        /// The server's message (or `HTTP <status>` when the body had none).
        message: String,
        /// `Retry-After`, when the server sent one (429 and some 503).
        retry_after: Option<Duration>,
    },
    /// The proof-of-work challenge expired before a nonce was found (the difficulty is too
    /// high for this device, or the clock is far off).
    #[error("the proof-of-work challenge expired before it was solved (difficulty {difficulty})")]
    PowExpired {
        /// The challenge's difficulty in leading zero bits.
        difficulty: u8,
    },
    /// The server answered something that does not follow the protocol.
    #[error("unexpected response from the server: {0}")]
    Protocol(String),
    /// Key generation, parsing or signing failed.
    #[error("DPoP key: {0}")]
    Key(&'static str),
    /// A transport error (connection, TLS, timeout, body).
    #[error("HTTP transport: {0}")]
    Http(#[from] reqwest::Error),
}

impl Error {
    /// The PROTOCOL error code of a refusal (`session_revoked`, `pow_invalid`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Reads an error response into [`Error::Refused`].
    pub(crate) async fn refused(what: &'static str, response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await.unwrap_or_default();
        Self::refused_from(what, status, retry_after, &body)
    }

    pub(crate) fn refused_from(
        what: &'static str,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Self {
        #[derive(Deserialize)]
        struct Shape {
            error: Body,
            #[serde(default)]
            error_description: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Body {
            /// The OpenAI shape: `{"error": {"message", "type", "code"}}`.
            OpenAi {
                #[serde(default)]
                message: Option<String>,
                #[serde(default, rename = "type")]
                kind: Option<String>,
                #[serde(default)]
                code: Option<serde_json::Value>,
            },
            /// The OAuth shape (RFC 6749 §5.2, as RFC 9449 uses it): `{"error": "code"}`.
            OAuth(String),
        }
        let (message, kind, code) = match serde_json::from_slice::<Shape>(body) {
            Ok(Shape {
                error:
                    Body::OpenAi {
                        message,
                        kind,
                        code,
                    },
                ..
            }) => (
                message,
                kind,
                code.and_then(|c| match c {
                    serde_json::Value::String(s) => Some(s),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }),
            ),
            Ok(Shape {
                error: Body::OAuth(code),
                error_description,
            }) => (error_description, None, Some(code)),
            Err(_) => (None, None, None),
        };
        Self::Refused {
            what,
            status,
            code,
            kind,
            message: message.unwrap_or_else(|| format!("HTTP {status}")),
            retry_after,
        }
    }
}

/// Returns `response` when its status is a success, else reads it into [`Error::Refused`]:
/// handy after [`Client::send`](crate::Client::send), which hands back error responses as they
/// are (like `fetch`).
///
/// ```no_run
/// # async fn f(client: perishable_client::Client) -> perishable_client::Result<()> {
/// let response = client
///     .send(client.request(reqwest::Method::GET, "models").await?)
///     .await?;
/// let models = perishable_client::check(response).await?.text().await?;
/// # Ok(()) }
/// ```
pub async fn check(response: reqwest::Response) -> Result<reqwest::Response> {
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(Error::refused("the request", response).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_the_openai_shape() {
        let body = br#"{"error":{"message":"nope","type":"authentication_error","code":"session_revoked"}}"#;
        let e = Error::refused_from("POST /session", 401, None, body);
        assert_eq!(e.code(), Some("session_revoked"));
        assert_eq!(e.status(), Some(401));
        assert_eq!(
            e.to_string(),
            "the server refused POST /session: HTTP 401 session_revoked: nope"
        );
        let e = Error::refused_from(
            "POST /session",
            400,
            None,
            br#"{"error":"use_dpop_nonce","error_description":"send a nonce"}"#,
        );
        assert_eq!(e.code(), Some("use_dpop_nonce"));
        assert_eq!(
            e.to_string(),
            "the server refused POST /session: HTTP 400 use_dpop_nonce: send a nonce"
        );
        let e = Error::refused_from("GET /challenge", 502, None, b"<html>");
        assert_eq!(e.code(), None);
        assert_eq!(
            e.to_string(),
            "the server refused GET /challenge: HTTP 502: HTTP 502"
        );
    }
}
