//! The one error type every Perishable refusal goes through.
//!
//! [`Error`] carries an [`ErrorCode`] of [`docs/protocol.md`][errors], a human-readable message
//! and the extra headers some codes need (`Retry-After` and the rate-limit headers on 429,
//! `WWW-Authenticate` on 401). It renders as the OpenAI error shape, so the official SDKs raise their usual exception types:
//!
//! ```json
//! { "error": { "message": "human readable", "type": "authentication_error", "code": "token_expired" } }
//! ```
//!
//! Middleware never returns an `Error` through the service stack: they turn it into a response
//! with [`Error::into_response`], keeping `type Error = S::Error` as tower-http does.
//!
//! ```
//! use perishable_core::{Error, ErrorCode};
//!
//! let response: http::Response<bytes::Bytes> =
//!     Error::new(ErrorCode::PathNotAllowed, "files is not an allowed path").into_response();
//! assert_eq!(response.status(), 403);
//! ```
//!
//! [errors]: https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md#errors

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

/// Every error code of the protocol, with its status and OpenAI error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: the body is not the JSON the route expects (or not JSON that the strict parser of
    /// metered calls accepts).
    InvalidJson,
    /// 400: a member of a metered call has a value the proxy cannot meter (a ceiling that is not
    /// a non-negative integer, a `stream` that is not a boolean, ...).
    InvalidParameter,
    /// 400: `POST /session` without a fingerprint.
    MissingFingerprint,
    /// 400: a fingerprint that is not 8 to 512 printable ASCII characters.
    InvalidFingerprint,
    /// 400: the interaction samples score below the configured threshold.
    InsufficientEntropy,
    /// 400: proof of work is on and the mint request has none.
    PowRequired,
    /// 400: the proof of work is wrong, expired, forged or replayed.
    PowInvalid,
    /// 400: the DPoP proof is malformed or does not verify.
    InvalidDpopProof,
    /// 400: a mint policy needs a captcha and the mint request has none (`"captcha"`).
    CaptchaRequired,
    /// 400: the captcha provider refused the token (failed, expired, replayed, wrong hostname,
    /// low score).
    CaptchaInvalid,
    /// 400: a mint policy needs a platform attestation and the request has none
    /// (`"attestation"`).
    AttestationRequired,
    /// 400: the attestation or assertion does not verify.
    AttestationInvalid,
    /// 401: no session token.
    MissingToken,
    /// 401: the token does not verify (signature, algorithm, claims, format).
    InvalidToken,
    /// 401: the token is past `exp` (or past the session's absolute lifetime).
    TokenExpired,
    /// 401: the fingerprint header (or User-Agent) does not match the token.
    FingerprintMismatch,
    /// 401: the session was revoked.
    SessionRevoked,
    /// 401: the token is key-bound and the request carries no DPoP proof.
    DpopRequired,
    /// 401: a mint policy needs the user's OpenID Connect ID token and the request has none
    /// (`"id_token"`).
    IdTokenRequired,
    /// 401: the ID token does not verify (signature, algorithm, `iss`, `aud`, `exp`, `nbf`).
    InvalidIdToken,
    /// 403: the request's `Origin` is not allowed.
    OriginNotAllowed,
    /// 403: the upstream path is not on the allow-list.
    PathNotAllowed,
    /// 403: the requested model is not on the allow-list.
    ModelNotAllowed,
    /// 408: the request body did not arrive within `server.body_timeout_ms`.
    BodyTimeout,
    /// 413: the request body is over the limit.
    BodyTooLarge,
    /// 415: a metered call's body is not `application/json`, or comes with `Content-Encoding`.
    UnsupportedMediaType,
    /// 429: the client is over its rate limit.
    RateLimited,
    /// 429: the fingerprint (or key) has too many live sessions.
    TooManySessions,
    /// 429: the client's token budget is spent.
    BudgetExhausted,
    /// 502: the upstream could not be reached or broke the connection.
    UpstreamUnavailable,
    /// 503: the shared state store cannot be reached and the policy is to fail closed.
    StoreUnavailable,
    /// 504: the upstream did not answer in time.
    UpstreamTimeout,
}

impl ErrorCode {
    /// The protocol `code` string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidParameter => "invalid_parameter",
            Self::MissingFingerprint => "missing_fingerprint",
            Self::InvalidFingerprint => "invalid_fingerprint",
            Self::InsufficientEntropy => "insufficient_entropy",
            Self::PowRequired => "pow_required",
            Self::PowInvalid => "pow_invalid",
            Self::InvalidDpopProof => "invalid_dpop_proof",
            Self::CaptchaRequired => "captcha_required",
            Self::CaptchaInvalid => "captcha_invalid",
            Self::AttestationRequired => "attestation_required",
            Self::AttestationInvalid => "attestation_invalid",
            Self::IdTokenRequired => "id_token_required",
            Self::InvalidIdToken => "invalid_id_token",
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::TokenExpired => "token_expired",
            Self::FingerprintMismatch => "fingerprint_mismatch",
            Self::SessionRevoked => "session_revoked",
            Self::DpopRequired => "dpop_required",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::PathNotAllowed => "path_not_allowed",
            Self::ModelNotAllowed => "model_not_allowed",
            Self::BodyTimeout => "body_timeout",
            Self::BodyTooLarge => "body_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited => "rate_limited",
            Self::TooManySessions => "too_many_sessions",
            Self::BudgetExhausted => "budget_exhausted",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::StoreUnavailable => "store_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The HTTP status the protocol gives this code.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson
            | Self::InvalidParameter
            | Self::MissingFingerprint
            | Self::InvalidFingerprint
            | Self::InsufficientEntropy
            | Self::PowRequired
            | Self::PowInvalid
            | Self::InvalidDpopProof
            | Self::CaptchaRequired
            | Self::CaptchaInvalid
            | Self::AttestationRequired
            | Self::AttestationInvalid => StatusCode::BAD_REQUEST,
            Self::MissingToken
            | Self::InvalidToken
            | Self::TokenExpired
            | Self::FingerprintMismatch
            | Self::SessionRevoked
            | Self::DpopRequired
            | Self::IdTokenRequired
            | Self::InvalidIdToken => StatusCode::UNAUTHORIZED,
            Self::OriginNotAllowed | Self::PathNotAllowed | Self::ModelNotAllowed => {
                StatusCode::FORBIDDEN
            }
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited | Self::TooManySessions | Self::BudgetExhausted => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The OpenAI error `type` the protocol gives this code.
    pub const fn error_type(self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "api_error",
            _ => "upstream_error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a 429 tells the client about the limit it hit.
///
/// Rendered as `Retry-After` (whole seconds, rounded up) and the IETF httpapi draft headers
/// `RateLimit-Policy: "<name>";q=<quota>;w=<window>` and `RateLimit: "<name>";r=<remaining>;t=<reset>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RateLimitInfo {
    /// The policy's name in the headers (`"session"`, `"mint"`, ...).
    pub(crate) policy: &'static str,
    /// Requests allowed per window.
    pub(crate) quota: u32,
    /// The window, in seconds.
    pub(crate) window_secs: u64,
    /// Requests left in the current window.
    pub(crate) remaining: u32,
    /// How long until a request is allowed again.
    pub(crate) retry_after: Duration,
}

impl RateLimitInfo {
    /// `Retry-After` in whole seconds, rounded up and at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// A refusal: an [`ErrorCode`] of the protocol with a message and the headers it needs.
///
/// The message is for humans and never holds a secret, a token or a fingerprint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    code: ErrorCode,
    message: Cow<'static, str>,
    rate_limit: Option<RateLimitInfo>,
    retry_after: Option<Duration>,
    session_id: Option<String>,
    /// The refusal concerns an authenticated request (not a mint): a bad DPoP proof is then
    /// `401`, as RFC 9449 section 7.1 says, instead of the mint's `400`.
    authenticating: bool,
    /// The refused request presented its token with the `DPoP` scheme: the challenge uses that
    /// scheme too (RFC 9449 section 7.1).
    dpop_scheme: bool,
}

/// Put in the extensions of every response Perishable refuses with: lets
/// [`ObserveLayer`](crate::observe::ObserveLayer) count refusals and send them to the audit hook
/// (upstream errors passed through carry none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The protocol code.
    pub(crate) code: ErrorCode,
    /// The session, when the refusal came after it was verified.
    pub(crate) session_id: Option<String>,
}

/// The OpenAI error shape: `{"error":{"message":…,"type":…,"code":…}}`.
pub(crate) fn error_body(message: &str, error_type: &str, code: &str) -> Bytes {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        error: Inner<'a>,
    }
    #[derive(serde::Serialize)]
    struct Inner<'a> {
        message: &'a str,
        r#type: &'a str,
        code: &'a str,
    }
    let body = Envelope {
        error: Inner {
            message,
            r#type: error_type,
            code,
        },
    };
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// A response in the OpenAI error shape for what is not a refusal of the protocol (an unknown route,
/// a method a route does not take), with type `invalid_request_error`.
pub(crate) fn other_error_response<B: From<Bytes>>(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<B> {
    let mut response = Response::new(B::from(error_body(message, "invalid_request_error", code)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

impl Error {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            rate_limit: None,
            retry_after: None,
            session_id: None,
            authenticating: false,
            dpop_scheme: false,
        }
    }

    /// Marks a refusal of an authenticated request (a token presented on a proxied call,
    /// refresh or revoke): `invalid_dpop_proof` then answers `401` with
    /// `WWW-Authenticate: DPoP error="invalid_dpop_proof"` (RFC 9449 section 7.1), so clients
    /// treat it as an authentication failure and retry with a fresh proof.
    #[must_use]
    pub(crate) fn authenticating(mut self) -> Self {
        self.authenticating = true;
        self
    }

    /// Marks a refusal of a request that presented its token with the `DPoP` scheme: its
    /// `WWW-Authenticate` challenge is a `DPoP` one (RFC 9449 section 7.1), not `Bearer`.
    #[must_use]
    pub(crate) fn in_dpop_scheme(mut self) -> Self {
        self.dpop_scheme = true;
        self
    }

    /// Names the session the refusal concerns (for the audit hook; never rendered).
    #[must_use]
    pub fn with_session(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into());
        self
    }

    /// A 429 `rate_limited` carrying the limit's headers.
    pub(crate) fn rate_limited(info: RateLimitInfo) -> Self {
        Self::new(
            ErrorCode::RateLimited,
            format!(
                "rate limit exceeded: {} requests per {} s; retry in {} s",
                info.quota,
                info.window_secs,
                info.retry_after_secs()
            ),
        )
        .with_rate_limit(info)
    }

    /// Adds the rate-limit headers (and `Retry-After`) to the rendered response.
    #[must_use]
    pub(crate) fn with_rate_limit(mut self, info: RateLimitInfo) -> Self {
        self.rate_limit = Some(info);
        self
    }

    /// Adds `Retry-After` to the rendered response.
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The protocol code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        if self.authenticating && self.code == ErrorCode::InvalidDpopProof {
            StatusCode::UNAUTHORIZED
        } else {
            self.code.status()
        }
    }

    /// The JSON body: `{"error":{"message":…,"type":…,"code":…}}`.
    pub fn body(&self) -> Bytes {
        let error_type = if self.status() == StatusCode::UNAUTHORIZED {
            "authentication_error"
        } else {
            self.code.error_type()
        };
        error_body(&self.message, error_type, self.code.as_str())
    }

    /// Renders the protocol response: status, JSON body and headers.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status();
        response.extensions_mut().insert(Refusal {
            code: self.code,
            session_id: self.session_id.clone(),
        });
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status() == StatusCode::UNAUTHORIZED || self.code == ErrorCode::InvalidDpopProof {
            headers.insert(WWW_AUTHENTICATE, self.www_authenticate());
        }
        if let Some(info) = &self.rate_limit {
            let reset = info.retry_after_secs();
            headers.insert(RETRY_AFTER, HeaderValue::from(reset));
            if let Ok(v) = HeaderValue::try_from(format!(
                "\"{}\";q={};w={}",
                info.policy, info.quota, info.window_secs
            )) {
                headers.insert(RATELIMIT_POLICY.clone(), v);
            }
            if let Ok(v) = HeaderValue::try_from(format!(
                "\"{}\";r={};t={}",
                info.policy, info.remaining, reset
            )) {
                headers.insert(RATELIMIT.clone(), v);
            }
        } else if let Some(after) = self.retry_after {
            let info = RateLimitInfo {
                policy: "",
                quota: 0,
                window_secs: 0,
                remaining: 0,
                retry_after: after,
            };
            headers.insert(RETRY_AFTER, HeaderValue::from(info.retry_after_secs()));
        }
        response
    }

    fn www_authenticate(&self) -> HeaderValue {
        // RFC 6750 section 3: no error attribute when the request had no credentials at all.
        match self.code {
            ErrorCode::MissingToken => HeaderValue::from_static("Bearer realm=\"perishable\""),
            // RFC 9449 section 7.1: the DPoP scheme, with the algorithms proofs may use.
            ErrorCode::DpopRequired => {
                HeaderValue::from_static("DPoP realm=\"perishable\", algs=\"ES256 EdDSA\"")
            }
            ErrorCode::InvalidDpopProof => HeaderValue::from_static(
                "DPoP realm=\"perishable\", error=\"invalid_dpop_proof\", algs=\"ES256 EdDSA\"",
            ),
            // The credential a mint lacks is the user's ID token, not a session token.
            ErrorCode::IdTokenRequired => HeaderValue::from_static("Bearer realm=\"perishable\""),
            code if self.dpop_scheme => HeaderValue::try_from(format!(
                "DPoP realm=\"perishable\", error=\"invalid_token\", error_description=\"{code}\", \
                 algs=\"ES256 EdDSA\""
            ))
            .unwrap_or_else(|_| HeaderValue::from_static("DPoP realm=\"perishable\"")),
            code => HeaderValue::try_from(format!(
                "Bearer realm=\"perishable\", error=\"invalid_token\", error_description=\"{code}\""
            ))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"perishable\"")),
        }
    }
}

/// An error with its sources, for logs (hyper's top-level errors say little on their own).
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_the_protocol_status_and_type() {
        let cases = [
            (ErrorCode::InvalidJson, 400, "invalid_request_error"),
            (ErrorCode::InvalidDpopProof, 400, "invalid_request_error"),
            (ErrorCode::CaptchaRequired, 400, "invalid_request_error"),
            (ErrorCode::CaptchaInvalid, 400, "invalid_request_error"),
            (ErrorCode::AttestationRequired, 400, "invalid_request_error"),
            (ErrorCode::AttestationInvalid, 400, "invalid_request_error"),
            (ErrorCode::MissingToken, 401, "authentication_error"),
            (ErrorCode::IdTokenRequired, 401, "authentication_error"),
            (ErrorCode::InvalidIdToken, 401, "authentication_error"),
            (ErrorCode::DpopRequired, 401, "authentication_error"),
            (ErrorCode::OriginNotAllowed, 403, "permission_error"),
            (ErrorCode::ModelNotAllowed, 403, "permission_error"),
            (ErrorCode::BodyTooLarge, 413, "invalid_request_error"),
            (ErrorCode::BudgetExhausted, 429, "rate_limit_error"),
            (ErrorCode::UpstreamUnavailable, 502, "upstream_error"),
            (ErrorCode::StoreUnavailable, 503, "api_error"),
            (ErrorCode::UpstreamTimeout, 504, "upstream_error"),
        ];
        for (code, status, kind) in cases {
            assert_eq!(code.status().as_u16(), status, "{code}");
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
            assert_eq!(code.error_type(), kind, "{code}");
        }
    }

    #[test]
    fn renders_the_openai_shape() {
        let response: Response<Bytes> =
            Error::new(ErrorCode::TokenExpired, "the session token has expired").into_response();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert!(
            response.headers()[WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["error"]["code"], "token_expired");
        assert_eq!(json["error"]["type"], "authentication_error");
        assert_eq!(json["error"]["message"], "the session token has expired");
    }

    #[test]
    fn rate_limited_carries_retry_after_and_draft_headers() {
        let response: Response<Bytes> = Error::rate_limited(RateLimitInfo {
            policy: "session",
            quota: 100,
            window_secs: 60,
            remaining: 0,
            retry_after: Duration::from_millis(1500),
        })
        .into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"session\";q=100;w=60"
        );
        assert_eq!(response.headers()["ratelimit"], "\"session\";r=0;t=2");
    }
}
