//! The captcha gate: a Cloudflare Turnstile, hCaptcha or Google reCAPTCHA token, redeemed at
//! the provider's `siteverify` endpoint with our secret.
//!
//! [`CaptchaVerifier::verify`] POSTs the token (`secret`, `response`, `remoteip` when known, and
//! for Turnstile an `idempotency_key`) and reads the verdict.
//!
//! # What it proves
//!
//! - The provider issued the token for our site key (the secret is the site's), it has not
//!   expired, and the provider had not redeemed it before (`success`). The providers redeem a
//!   token once: a second `siteverify` answers `timeout-or-duplicate` (hCaptcha:
//!   `already-seen-response`), reported as [`CaptchaError::Replayed`].
//! - The challenge was solved on one of the accepted hostnames (when the list is not empty;
//!   compared ASCII case-insensitively, exact names, no wildcards). For reCAPTCHA on Android,
//!   the `apk_package_name` stands in for the hostname.
//! - For reCAPTCHA v3, the score is at least `min_score` (v2 returns no score and passes).
//!
//! # What it does not prove
//!
//! - That a human is behind the *session*: a solved challenge can be farmed out and relayed
//!   (captcha-solving services). It raises the cost per mint; rate limits do the rest.
//! - That the token is used once *by us*: the providers enforce single use, and the caller also
//!   records each redeemed token in the Store (a replay cache keyed by its hash) so a replay
//!   across instances or a provider lapse is still refused. That is not done here.
//! - The reCAPTCHA v3 `action` is returned, not checked: the caller compares it with the
//!   action its page declared. hCaptcha Enterprise's `score` is a *risk* score (higher is more
//!   likely a bot): it is returned as is and not compared with `min_score`.
//! - Where the client is: `remoteip` is passed for the provider's own risk analysis only.
//!
//! Errors the provider blames on our request (a wrong secret, a malformed request) and any
//! network, status or parse failure are server-side ([`CaptchaError::is_server_side`]), so a
//! misconfiguration or an outage never reads as "bad captcha". The secret never appears in an
//! error, a log line or `Debug` output.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::Full;
use serde::Deserialize;

use super::fetch::{HttpClient, endpoint, http_client, send};
use crate::config::{ConfigError, Secret};

/// The longest token sent (bytes): Turnstile documents 2048 as its maximum.
const MAX_TOKEN_LEN: usize = 2048;
/// The largest `siteverify` answer read (bytes).
const MAX_REPLY_LEN: usize = 64 * 1024;
/// At most this many error codes are kept from an answer, each at most `MAX_CODE_LEN` bytes.
const MAX_CODES: usize = 8;
const MAX_CODE_LEN: usize = 64;

/// The captcha service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Provider {
    /// Cloudflare Turnstile.
    Turnstile,
    /// hCaptcha.
    Hcaptcha,
    /// Google reCAPTCHA (v2 or v3).
    Recaptcha,
}

impl Provider {
    /// The provider's `siteverify` endpoint.
    pub(crate) fn default_verify_url(self) -> &'static str {
        match self {
            Self::Turnstile => "https://challenges.cloudflare.com/turnstile/v0/siteverify",
            Self::Hcaptcha => "https://api.hcaptcha.com/siteverify",
            Self::Recaptcha => "https://www.google.com/recaptcha/api/siteverify",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Turnstile => "turnstile",
            Self::Hcaptcha => "hcaptcha",
            Self::Recaptcha => "recaptcha",
        }
    }
}

/// What a [`CaptchaVerifier`] checks against.
#[derive(Debug, Clone)]
pub(crate) struct CaptchaSettings {
    /// The captcha service.
    pub(crate) provider: Provider,
    /// The site's secret key at the provider.
    pub(crate) secret: Secret,
    /// The `siteverify` URL; `None`: the provider's ([`Provider::default_verify_url`]). `https`,
    /// or `http` to a loopback host.
    pub(crate) verify_url: Option<String>,
    /// The hostnames (reCAPTCHA Android: package names) a challenge may be solved on; empty:
    /// any.
    pub(crate) hostnames: Vec<String>,
    /// The lowest reCAPTCHA v3 score accepted, in [0, 1].
    pub(crate) min_score: f64,
    /// The time allowed for the whole `siteverify` exchange.
    pub(crate) timeout: Duration,
}

impl CaptchaSettings {
    /// Settings for `provider` with `secret`: the default URL, any hostname, a minimum score of
    /// 0.5 and a 5 s timeout.
    pub(crate) fn new(provider: Provider, secret: impl Into<Secret>) -> Self {
        Self {
            provider,
            secret: secret.into(),
            verify_url: None,
            hostnames: Vec::new(),
            min_score: 0.5,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A token the provider accepted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CaptchaPass {
    /// Where the challenge was solved (reCAPTCHA Android: the package name), if the provider
    /// says.
    pub(crate) hostname: Option<String>,
    /// The score, when the provider gives one (reCAPTCHA v3: 1.0 is very likely a human;
    /// hCaptcha Enterprise: a risk score, higher is riskier).
    pub(crate) score: Option<f64>,
    /// The reCAPTCHA v3 action (or Turnstile's `action`), for the caller to compare.
    pub(crate) action: Option<String>,
    /// When the challenge was solved, as the provider wrote it (ISO 8601).
    pub(crate) challenge_ts: Option<String>,
}

/// Why a captcha token was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum CaptchaError {
    /// No token.
    #[error("captcha token missing")]
    Empty,
    /// Longer than any provider issues: refused without asking.
    #[error("captcha token too long")]
    TooLong,
    /// Already redeemed, or expired (`timeout-or-duplicate`, `already-seen-response`,
    /// `expired-input-response`).
    #[error("captcha token already used or expired")]
    Replayed,
    /// The provider refused the token; its error codes.
    #[error("captcha token refused ({})", codes.join(", "))]
    Rejected {
        /// The provider's `error-codes` (at most 8, each cut to 64 bytes).
        codes: Vec<String>,
    },
    /// Solved on a hostname not accepted (or the provider named none).
    #[error("captcha solved on a host not accepted ({})", hostname.as_deref().unwrap_or("none given"))]
    Hostname {
        /// The hostname the provider reported.
        hostname: Option<String>,
    },
    /// A reCAPTCHA v3 score below the minimum.
    #[error("captcha score {score} below the minimum")]
    LowScore {
        /// The score.
        score: f64,
    },
    /// The provider blames our request: a missing or wrong secret, a malformed request, a
    /// site key that does not match the secret. Server-side: the configuration needs fixing.
    #[error("captcha provider refuses our request ({}): check the secret", codes.join(", "))]
    Misconfigured {
        /// The provider's `error-codes`.
        codes: Vec<String>,
    },
    /// No usable answer: network error, timeout, a status other than 200, or a body that is
    /// not the expected JSON, or the provider's internal error. Server-side.
    #[error("captcha provider unavailable: {0}")]
    Unavailable(String),
}

impl CaptchaError {
    /// Whether the failure is ours or the provider's, not the token's.
    pub(crate) fn is_server_side(&self) -> bool {
        matches!(self, Self::Misconfigured { .. } | Self::Unavailable(_))
    }
}

/// The `siteverify` answer fields we read (all three providers share the shape).
#[derive(Deserialize)]
struct SiteVerify {
    success: bool,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    apk_package_name: Option<String>,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    challenge_ts: Option<String>,
    #[serde(rename = "error-codes", default)]
    error_codes: Option<Vec<String>>,
}

/// Redeems captcha tokens at one provider; cheap to share (`Arc`), safe to call concurrently.
pub(crate) struct CaptchaVerifier {
    provider: Provider,
    secret: Secret,
    url: Uri,
    hostnames: Vec<String>,
    min_score: f64,
    timeout: Duration,
    client: HttpClient,
}

impl std::fmt::Debug for CaptchaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptchaVerifier")
            .field("provider", &self.provider)
            .field("url", &self.url)
            .field("hostnames", &self.hostnames)
            .field("min_score", &self.min_score)
            .finish_non_exhaustive()
    }
}

impl CaptchaVerifier {
    /// A verifier for `settings`; no network until the first [`verify`](Self::verify).
    pub(crate) fn new(settings: CaptchaSettings) -> Result<Self, ConfigError> {
        if settings.secret.expose().is_empty() {
            return Err(ConfigError::Missing {
                key: "mint.captcha.secret",
            });
        }
        let url = endpoint(
            "mint.captcha.verify_url",
            settings
                .verify_url
                .as_deref()
                .unwrap_or(settings.provider.default_verify_url()),
        )?;
        if !(0.0..=1.0).contains(&settings.min_score) {
            return Err(ConfigError::Invalid {
                key: "mint.captcha.min_score",
                reason: "must be between 0 and 1".into(),
            });
        }
        if settings.timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "mint.captcha.timeout",
                reason: "must be positive".into(),
            });
        }
        let mut hostnames = Vec::with_capacity(settings.hostnames.len());
        for name in settings.hostnames {
            let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "mint.captcha.hostnames",
                    reason: "a hostname must not be empty".into(),
                });
            }
            hostnames.push(name);
        }
        Ok(Self {
            provider: settings.provider,
            secret: settings.secret,
            url,
            hostnames,
            min_score: settings.min_score,
            timeout: settings.timeout,
            client: http_client(settings.timeout)?,
        })
    }

    /// Redeems `token` (from the client's widget) at the provider, passing `client_ip` along
    /// when known. Empty or over-long tokens are refused before any network call.
    pub(crate) async fn verify(
        &self,
        token: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<CaptchaPass, CaptchaError> {
        let result = self.redeem(token, client_ip).await;
        let outcome = match &result {
            Ok(_) => "pass",
            Err(CaptchaError::Empty | CaptchaError::TooLong) => "malformed",
            Err(CaptchaError::Replayed) => "replayed",
            Err(CaptchaError::Rejected { .. }) => "rejected",
            Err(CaptchaError::Hostname { .. }) => "hostname",
            Err(CaptchaError::LowScore { .. }) => "low_score",
            Err(CaptchaError::Misconfigured { .. }) => "misconfigured",
            Err(CaptchaError::Unavailable(_)) => "unavailable",
        };
        metrics::counter!(
            "perishable_gate_captcha_total",
            "provider" => self.provider.name(),
            "outcome" => outcome
        )
        .increment(1);
        match &result {
            Err(error) if error.is_server_side() => {
                tracing::warn!(provider = self.provider.name(), %error, "captcha verification failed on our side");
            }
            Err(error) => {
                tracing::debug!(provider = self.provider.name(), %error, "captcha refused");
            }
            Ok(_) => {}
        }
        result
    }

    async fn redeem(
        &self,
        token: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<CaptchaPass, CaptchaError> {
        if token.is_empty() {
            return Err(CaptchaError::Empty);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(CaptchaError::TooLong);
        }
        // The serializer is not `Send`: done with before the first await.
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("secret", self.secret.expose());
            form.append_pair("response", token);
            if let Some(ip) = client_ip {
                form.append_pair("remoteip", &ip.to_string());
            }
            if self.provider == Provider::Turnstile {
                // Lets a retried siteverify of the same token succeed at Cloudflare; we do not
                // retry, but it costs nothing and keeps the request as Cloudflare documents it.
                form.append_pair("idempotency_key", &idempotency_key()?);
            }
            form.finish()
        };
        let request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| CaptchaError::Unavailable(format!("cannot build the request: {e}")))?;

        let started = Instant::now();
        let reply = send(&self.client, request, self.timeout, MAX_REPLY_LEN)
            .await
            .map_err(|e| CaptchaError::Unavailable(format!("POST {}: {e}", self.url)))?;
        metrics::histogram!("perishable_gate_captcha_seconds", "provider" => self.provider.name())
            .record(started.elapsed().as_secs_f64());
        if reply.status != StatusCode::OK {
            return Err(CaptchaError::Unavailable(format!(
                "POST {}: status {}",
                self.url, reply.status
            )));
        }
        let answer: SiteVerify = serde_json::from_slice(&reply.body).map_err(|e| {
            CaptchaError::Unavailable(format!("POST {}: unreadable answer: {e}", self.url))
        })?;
        let codes = sanitize(answer.error_codes.unwrap_or_default());
        if !answer.success {
            return Err(classify(codes));
        }

        let hostname = answer.hostname.or(answer.apk_package_name);
        if !self.hostnames.is_empty() {
            let accepted = hostname.as_deref().is_some_and(|name| {
                let name = name.trim_end_matches('.');
                self.hostnames.iter().any(|h| h.eq_ignore_ascii_case(name))
            });
            if !accepted {
                return Err(CaptchaError::Hostname { hostname });
            }
        }
        if self.provider == Provider::Recaptcha
            && let Some(score) = answer.score
            // A NaN score fails too.
            && score.partial_cmp(&self.min_score).is_none_or(|o| o.is_lt())
        {
            return Err(CaptchaError::LowScore { score });
        }
        Ok(CaptchaPass {
            hostname,
            score: answer.score,
            action: answer.action,
            challenge_ts: answer.challenge_ts,
        })
    }
}

/// The error for a `success: false` answer, from its error codes.
fn classify(codes: Vec<String>) -> CaptchaError {
    let has = |wanted: &[&str]| codes.iter().any(|c| wanted.contains(&c.as_str()));
    if has(&["internal-error"]) {
        return CaptchaError::Unavailable(format!(
            "the provider reports an internal error ({})",
            codes.join(", ")
        ));
    }
    if has(&[
        "missing-input-secret",
        "invalid-input-secret",
        "bad-request",
        "sitekey-secret-mismatch",
        "invalid-remoteip",
    ]) {
        return CaptchaError::Misconfigured { codes };
    }
    if has(&[
        "timeout-or-duplicate",
        "already-seen-response",
        "expired-input-response",
    ]) {
        return CaptchaError::Replayed;
    }
    CaptchaError::Rejected { codes }
}

/// Error codes fit for errors and logs: a few, short, printable ASCII.
fn sanitize(codes: Vec<String>) -> Vec<String> {
    codes
        .into_iter()
        .take(MAX_CODES)
        .map(|code| {
            code.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(MAX_CODE_LEN)
                .collect()
        })
        .collect()
}

/// A random UUID (version 4) from the OS RNG.
fn idempotency_key() -> Result<String, CaptchaError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| CaptchaError::Unavailable("no randomness for the idempotency key".into()))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};

    use super::super::fetch::test_http::{Received, Reply, serve};
    use super::*;

    const SECRET: &str = "0x4AAAA-secret-key";
    const TOKEN: &str = "XXXX.DUMMY.TOKEN.XXXX";

    /// A local `siteverify` answering `answer`, recording what it receives.
    struct SiteVerifyServer {
        url: String,
        received: Arc<Mutex<Vec<Received>>>,
    }

    impl SiteVerifyServer {
        async fn start(answer: impl Fn() -> Reply + Send + Sync + 'static) -> Self {
            let received = Arc::new(Mutex::new(Vec::new()));
            let log = received.clone();
            let addr = serve(move |request| {
                log.lock().unwrap().push(request);
                answer()
            })
            .await;
            Self {
                url: format!("http://{addr}/siteverify"),
                received,
            }
        }

        async fn json(answer: Value) -> Self {
            Self::start(move || Reply::json(200, &answer)).await
        }

        fn verifier(&self, provider: Provider) -> CaptchaVerifier {
            self.verifier_with(provider, |_| {})
        }

        fn verifier_with(
            &self,
            provider: Provider,
            edit: impl FnOnce(&mut CaptchaSettings),
        ) -> CaptchaVerifier {
            let mut settings = CaptchaSettings::new(provider, SECRET);
            settings.verify_url = Some(self.url.clone());
            settings.timeout = Duration::from_secs(2);
            edit(&mut settings);
            CaptchaVerifier::new(settings).unwrap()
        }

        fn requests(&self) -> Vec<Received> {
            self.received.lock().unwrap().clone()
        }

        /// The form fields of the only request received.
        fn form(&self) -> HashMap<String, String> {
            let requests = self.requests();
            assert_eq!(requests.len(), 1);
            let request = &requests[0];
            assert_eq!(request.method, "POST");
            assert_eq!(request.path, "/siteverify");
            assert_eq!(
                request.header("content-type"),
                Some("application/x-www-form-urlencoded")
            );
            url::form_urlencoded::parse(&request.body)
                .into_owned()
                .collect()
        }
    }

    fn ip() -> Option<IpAddr> {
        Some("203.0.113.7".parse().unwrap())
    }

    #[tokio::test]
    async fn turnstile_success_sends_the_documented_form() {
        let server = SiteVerifyServer::json(json!({
            "success": true,
            "challenge_ts": "2025-01-01T00:00:00.000Z",
            "hostname": "app.example.com",
            "error-codes": [],
            "action": "mint",
            "cdata": "",
            "metadata": {"ephemeral_id": "x"}
        }))
        .await;
        let verifier = server.verifier_with(Provider::Turnstile, |s| {
            s.hostnames = vec!["App.Example.com".into()];
        });
        let pass = verifier.verify(TOKEN, ip()).await.unwrap();
        assert_eq!(
            pass,
            CaptchaPass {
                hostname: Some("app.example.com".into()),
                score: None,
                action: Some("mint".into()),
                challenge_ts: Some("2025-01-01T00:00:00.000Z".into()),
            }
        );
        let form = server.form();
        assert_eq!(form["secret"], SECRET);
        assert_eq!(form["response"], TOKEN);
        assert_eq!(form["remoteip"], "203.0.113.7");
        let key = &form["idempotency_key"];
        assert_eq!(key.len(), 36, "{key}");
        assert_eq!(key.as_bytes()[14], b'4', "{key}");
        assert!(key.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_eq!(form.len(), 4);

        // A fresh key each time.
        verifier.verify(TOKEN, None).await.unwrap();
        let requests = server.requests();
        let second: HashMap<String, String> = url::form_urlencoded::parse(&requests[1].body)
            .into_owned()
            .collect();
        assert_ne!(second["idempotency_key"], *key);
        assert!(!second.contains_key("remoteip"));
    }

    #[tokio::test]
    async fn hcaptcha_success_has_no_idempotency_key() {
        let server = SiteVerifyServer::json(json!({
            "success": true,
            "challenge_ts": "2025-01-01T00:00:00Z",
            "hostname": "app.example.com",
            "credit": false,
            "score": null,
            "score_reason": []
        }))
        .await;
        let pass = server
            .verifier(Provider::Hcaptcha)
            .verify(TOKEN, ip())
            .await
            .unwrap();
        assert_eq!(pass.hostname.as_deref(), Some("app.example.com"));
        assert_eq!(pass.score, None);
        let form = server.form();
        assert_eq!(form["secret"], SECRET);
        assert_eq!(form["response"], TOKEN);
        assert_eq!(form["remoteip"], "203.0.113.7");
        assert!(!form.contains_key("idempotency_key"));
    }

    #[tokio::test]
    async fn hcaptcha_risk_score_is_not_compared() {
        let server =
            SiteVerifyServer::json(json!({"success": true, "hostname": "a", "score": 0.9})).await;
        let verifier = server.verifier_with(Provider::Hcaptcha, |s| s.min_score = 0.95);
        assert_eq!(verifier.verify(TOKEN, None).await.unwrap().score, Some(0.9));
    }

    #[tokio::test]
    async fn recaptcha_v3_score_is_checked() {
        let server = SiteVerifyServer::json(json!({
            "success": true, "score": 0.3, "action": "mint",
            "challenge_ts": "2025-01-01T00:00:00Z", "hostname": "app.example.com"
        }))
        .await;
        let strict = server.verifier_with(Provider::Recaptcha, |s| s.min_score = 0.5);
        assert_eq!(
            strict.verify(TOKEN, ip()).await,
            Err(CaptchaError::LowScore { score: 0.3 })
        );
        let lenient = server.verifier_with(Provider::Recaptcha, |s| s.min_score = 0.3);
        let pass = lenient.verify(TOKEN, ip()).await.unwrap();
        assert_eq!(pass.score, Some(0.3));
        assert_eq!(pass.action.as_deref(), Some("mint"));
        let form: HashMap<String, String> = url::form_urlencoded::parse(&server.requests()[0].body)
            .into_owned()
            .collect();
        assert!(!form.contains_key("idempotency_key"));
    }

    #[tokio::test]
    async fn recaptcha_v2_without_score_is_accepted() {
        let server = SiteVerifyServer::json(json!({
            "success": true, "challenge_ts": "2025-01-01T00:00:00Z", "hostname": "app.example.com"
        }))
        .await;
        let verifier = server.verifier_with(Provider::Recaptcha, |s| s.min_score = 0.9);
        assert_eq!(verifier.verify(TOKEN, None).await.unwrap().score, None);
    }

    #[tokio::test]
    async fn recaptcha_android_package_name_stands_for_the_hostname() {
        let server = SiteVerifyServer::json(json!({
            "success": true, "apk_package_name": "com.example.app"
        }))
        .await;
        let verifier = server.verifier_with(Provider::Recaptcha, |s| {
            s.hostnames = vec!["com.example.app".into()];
        });
        assert_eq!(
            verifier
                .verify(TOKEN, None)
                .await
                .unwrap()
                .hostname
                .as_deref(),
            Some("com.example.app")
        );
    }

    #[tokio::test]
    async fn refusals_by_the_provider() {
        let server = SiteVerifyServer::json(
            json!({"success": false, "error-codes": ["invalid-input-response"]}),
        )
        .await;
        let error = server
            .verifier(Provider::Turnstile)
            .verify(TOKEN, ip())
            .await
            .unwrap_err();
        assert_eq!(
            error,
            CaptchaError::Rejected {
                codes: vec!["invalid-input-response".into()]
            }
        );
        assert!(!error.is_server_side());

        // No error codes at all: still refused.
        let server = SiteVerifyServer::json(json!({"success": false})).await;
        assert_eq!(
            server
                .verifier(Provider::Hcaptcha)
                .verify(TOKEN, None)
                .await,
            Err(CaptchaError::Rejected { codes: vec![] })
        );
    }

    #[tokio::test]
    async fn replays_are_reported_as_such() {
        for (provider, code) in [
            (Provider::Turnstile, "timeout-or-duplicate"),
            (Provider::Recaptcha, "timeout-or-duplicate"),
            (Provider::Hcaptcha, "already-seen-response"),
        ] {
            let server =
                SiteVerifyServer::json(json!({"success": false, "error-codes": [code]})).await;
            let error = server.verifier(provider).verify(TOKEN, ip()).await;
            assert_eq!(error, Err(CaptchaError::Replayed), "{provider:?}");
        }
    }

    #[tokio::test]
    async fn a_wrong_secret_is_our_fault() {
        let server = SiteVerifyServer::json(
            json!({"success": false, "error-codes": ["invalid-input-secret"]}),
        )
        .await;
        let error = server
            .verifier(Provider::Turnstile)
            .verify(TOKEN, None)
            .await
            .unwrap_err();
        assert!(
            matches!(error, CaptchaError::Misconfigured { .. }),
            "{error:?}"
        );
        assert!(error.is_server_side());
        assert!(!error.to_string().contains(SECRET));
    }

    #[tokio::test]
    async fn hostnames_are_checked() {
        let server =
            SiteVerifyServer::json(json!({"success": true, "hostname": "evil.example"})).await;
        let verifier = server.verifier_with(Provider::Turnstile, |s| {
            s.hostnames = vec!["app.example.com".into(), "www.example.com".into()];
        });
        assert_eq!(
            verifier.verify(TOKEN, None).await,
            Err(CaptchaError::Hostname {
                hostname: Some("evil.example".into())
            })
        );
        // Any hostname when the list is empty.
        assert!(
            server
                .verifier(Provider::Turnstile)
                .verify(TOKEN, None)
                .await
                .is_ok()
        );

        // No hostname in the answer, with a list: refused.
        let server = SiteVerifyServer::json(json!({"success": true})).await;
        let verifier = server.verifier_with(Provider::Hcaptcha, |s| {
            s.hostnames = vec!["app.example.com".into()];
        });
        assert_eq!(
            verifier.verify(TOKEN, None).await,
            Err(CaptchaError::Hostname { hostname: None })
        );
    }

    #[tokio::test]
    async fn empty_and_overlong_tokens_never_reach_the_provider() {
        let server = SiteVerifyServer::json(json!({"success": true})).await;
        let verifier = server.verifier(Provider::Turnstile);
        assert_eq!(verifier.verify("", ip()).await, Err(CaptchaError::Empty));
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            verifier.verify(&long, ip()).await,
            Err(CaptchaError::TooLong)
        );
        assert!(server.requests().is_empty());
        // 2048 bytes exactly is sent.
        let longest = "a".repeat(MAX_TOKEN_LEN);
        assert!(verifier.verify(&longest, ip()).await.is_ok());
        assert_eq!(server.form()["response"], longest);
    }

    #[tokio::test]
    async fn a_provider_that_never_answers_times_out() {
        let server = SiteVerifyServer::start(|| Reply::Hang).await;
        let verifier = server.verifier_with(Provider::Turnstile, |s| {
            s.timeout = Duration::from_millis(300);
        });
        let started = std::time::Instant::now();
        let error = verifier.verify(TOKEN, ip()).await.unwrap_err();
        let elapsed = started.elapsed();
        assert!(matches!(error, CaptchaError::Unavailable(_)), "{error:?}");
        assert!(error.is_server_side());
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn unusable_answers_are_server_side() {
        let html = SiteVerifyServer::start(|| {
            Reply::Send(200, vec![], b"<html>maintenance</html>".to_vec())
        })
        .await;
        let error = html
            .verifier(Provider::Recaptcha)
            .verify(TOKEN, None)
            .await
            .unwrap_err();
        assert!(matches!(error, CaptchaError::Unavailable(_)), "{error:?}");

        let status = SiteVerifyServer::start(|| Reply::json(500, &json!({"success": true}))).await;
        let error = status
            .verifier(Provider::Hcaptcha)
            .verify(TOKEN, None)
            .await
            .unwrap_err();
        assert!(matches!(error, CaptchaError::Unavailable(_)), "{error:?}");

        let internal =
            SiteVerifyServer::json(json!({"success": false, "error-codes": ["internal-error"]}))
                .await;
        let error = internal
            .verifier(Provider::Turnstile)
            .verify(TOKEN, None)
            .await
            .unwrap_err();
        assert!(matches!(error, CaptchaError::Unavailable(_)), "{error:?}");

        // `success` missing: not the expected shape.
        let shapeless = SiteVerifyServer::json(json!({"hostname": "a"})).await;
        let error = shapeless
            .verifier(Provider::Turnstile)
            .verify(TOKEN, None)
            .await
            .unwrap_err();
        assert!(error.is_server_side(), "{error:?}");
    }

    #[test]
    fn settings_are_validated_and_the_secret_stays_hidden() {
        for provider in [Provider::Turnstile, Provider::Hcaptcha, Provider::Recaptcha] {
            let verifier = CaptchaVerifier::new(CaptchaSettings::new(provider, SECRET)).unwrap();
            assert_eq!(verifier.url.to_string(), provider.default_verify_url());
            assert!(!format!("{verifier:?}").contains(SECRET));
        }
        let settings = CaptchaSettings::new(Provider::Turnstile, SECRET);
        assert!(!format!("{settings:?}").contains(SECRET));

        let mut plain = CaptchaSettings::new(Provider::Turnstile, SECRET);
        plain.verify_url = Some("http://captcha.example/siteverify".into());
        assert!(CaptchaVerifier::new(plain).is_err());
        assert!(CaptchaVerifier::new(CaptchaSettings::new(Provider::Hcaptcha, "")).is_err());
        let mut score = CaptchaSettings::new(Provider::Recaptcha, SECRET);
        score.min_score = 1.5;
        assert!(CaptchaVerifier::new(score).is_err());
    }

    #[test]
    fn error_codes_are_sanitized() {
        let codes = sanitize(vec!["a b\nc".into(), "x".repeat(100)]);
        assert_eq!(codes[0], "abc");
        assert_eq!(codes[1].len(), MAX_CODE_LEN);
        assert_eq!(sanitize(vec!["c".into(); 20]).len(), MAX_CODES);
    }
}
