//! [`Client`] and its [`ClientBuilder`].

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, DATE, HeaderName, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method};
use serde::Deserialize;
use url::Url;

use crate::attestation::{Attestation, AttestationChallenge, AttestationSource};
use crate::dpop::DpopKey;
use crate::error::{Error, Result};
use crate::interaction::Interaction;
use crate::pow;
use crate::session::{Session, TokenType};
use crate::time::{parse_http_date, unix_now};

/// The `X-Perishable-Fingerprint` header.
pub const FINGERPRINT_HEADER: HeaderName = HeaderName::from_static("x-perishable-fingerprint");
/// The `DPoP` header.
pub const DPOP_HEADER: HeaderName = HeaderName::from_static("dpop");
/// The `DPoP-Nonce` header (RFC 9449 §8), followed when a server sends one.
const DPOP_NONCE_HEADER: HeaderName = HeaderName::from_static("dpop-nonce");
/// `WWW-Authenticate`.
const WWW_AUTHENTICATE: HeaderName = http::header::WWW_AUTHENTICATE;

/// The default refresh margin: refresh this long before `expires_at`.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The default `User-Agent`.
pub const DEFAULT_USER_AGENT: &str = concat!("perishable-client/", env!("CARGO_PKG_VERSION"));

/// 401 codes after which the session is replaced and the request sent once more.
const REMINT_CODES: [&str; 3] = ["token_expired", "session_revoked", "invalid_token"];
/// How long the mint, refresh and revoke calls may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Clock differences smaller than this are not corrected (Date has a one-second resolution).
const MIN_OFFSET_MS: i64 = 2_000;

type InteractionSource = Box<dyn Fn() -> Interaction + Send + Sync>;
/// A source of mint evidence: a field of the mint body, and what to put there.
type EvidenceSource = (&'static str, Box<dyn Fn() -> Option<String> + Send + Sync>);

enum DpopChoice {
    Generate,
    Pkcs8(Vec<u8>),
    Key(DpopKey),
    Off,
}

/// Configures a [`Client`]; made by [`Client::builder`].
pub struct ClientBuilder {
    base_url: String,
    fingerprint: Option<String>,
    user_agent: Option<String>,
    dpop: DpopChoice,
    interaction: Interaction,
    source: Option<InteractionSource>,
    evidence: Vec<EvidenceSource>,
    attestation: Option<AttestationSource>,
    refresh_margin: Duration,
    http: Option<reqwest::Client>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dpop = match &self.dpop {
            DpopChoice::Generate => "generate",
            DpopChoice::Pkcs8(_) => "pkcs8",
            DpopChoice::Key(_) => "key",
            DpopChoice::Off => "off",
        };
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("fingerprint", &self.fingerprint)
            .field("user_agent", &self.user_agent)
            .field("dpop", &dpop)
            .field("refresh_margin", &self.refresh_margin)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// The device's stable identifier, 8 to 512 printable ASCII characters (required). Make it
    /// once per install (a random UUID, say) and keep it with the app's data; every request
    /// of a session must send the same one. It is not a secret (it travels in a header), and
    /// the server stores only its hash.
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprint = Some(fingerprint.into());
        self
    }

    /// The `User-Agent` sent on every call (default `perishable-client/<version>`). The server
    /// binds the session to the User-Agent that minted it, so it must not change while the
    /// client lives.
    #[must_use]
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// Loads the DPoP key from its PKCS#8 DER encoding (as stored from
    /// [`DpopKey::pkcs8_der`]); checked by [`build`](Self::build). Without this, the client
    /// makes a fresh ES256 key from the OS random number generator.
    #[must_use]
    pub fn dpop_key(mut self, pkcs8_der: impl AsRef<[u8]>) -> Self {
        self.dpop = DpopChoice::Pkcs8(pkcs8_der.as_ref().to_vec());
        self
    }

    /// Uses this DPoP key.
    #[must_use]
    pub fn dpop_key_pair(mut self, key: DpopKey) -> Self {
        self.dpop = DpopChoice::Key(key);
        self
    }

    /// No DPoP: bearer sessions, which a stolen token (with the fingerprint) can use. Servers
    /// with `session.dpop = "required"` refuse them.
    #[must_use]
    pub fn no_dpop(mut self) -> Self {
        self.dpop = DpopChoice::Off;
        self
    }

    /// The interaction samples to send with the next mint; see
    /// [`Client::set_interaction`] to change them later.
    #[must_use]
    pub fn interaction(mut self, samples: Interaction) -> Self {
        self.interaction = samples;
        self
    }

    /// A function asked for the latest samples at every mint (instead of the stored ones).
    #[must_use]
    pub fn interaction_source(
        mut self,
        source: impl Fn() -> Interaction + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The signed-in user's OpenID Connect ID token, for the `oidc` mint gate (`docs/gates.md`):
    /// asked at every mint (ID tokens expire: return the current one), sent as `id_token`;
    /// `None` leaves it out.
    #[must_use]
    pub fn id_token_source(
        mut self,
        source: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.evidence.retain(|(field, _)| *field != "id_token");
        self.evidence.push(("id_token", Box::new(source)));
        self
    }

    /// A captcha token (Turnstile, hCaptcha, reCAPTCHA) for the `captcha` mint gate: asked at
    /// every mint (tokens are single use), sent as `captcha`; `None` leaves it out.
    #[must_use]
    pub fn captcha_source(
        mut self,
        source: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.evidence.retain(|(field, _)| *field != "captcha");
        self.evidence.push(("captcha", Box::new(source)));
        self
    }

    /// A platform attestation for the `app_attest` or `play_integrity` mint gate
    /// (`docs/native.md`): asked at every mint with that mint's challenge, and awaited (an App
    /// Attest registration asks Apple's servers); the [`Attestation`] it returns must be bound
    /// to that challenge. Sent as `attestation`; `None` leaves it out.
    ///
    /// The source decides what to send: an App Attest key's registration on its first mint
    /// ([`Attestation::app_attest_key`]), an assertion afterwards
    /// ([`Attestation::app_attest_assertion`]), or a Play Integrity token. After a mint refused
    /// with `attestation_invalid` because the key is unknown (`Error::code`), make a new key
    /// and register it.
    #[must_use]
    pub fn attestation_source<F, Fut>(mut self, source: F) -> Self
    where
        F: Fn(AttestationChallenge) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<Attestation>> + Send + 'static,
    {
        self.attestation = Some(Box::new(move |challenge| Box::pin(source(challenge))));
        self
    }

    /// Refresh the session this long before it expires (default 60 s; at most half the
    /// session's lifetime).
    #[must_use]
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = margin;
        self
    }

    /// The `reqwest::Client` to send with (proxies, timeouts, TLS roots). Its default
    /// `User-Agent` is overridden by [`user_agent`](Self::user_agent) on every call.
    #[must_use]
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// Checks the configuration and makes the client (and its key, unless given or off).
    pub fn build(self) -> Result<Client> {
        let base_url = parse_base(&self.base_url)?;
        let base = base_url.as_str().trim_end_matches('/').to_owned();
        let fingerprint = self
            .fingerprint
            .ok_or_else(|| Error::Config("a fingerprint is required".to_owned()))?;
        if !(8..=512).contains(&fingerprint.len())
            || !fingerprint.bytes().all(|b| (0x20..=0x7e).contains(&b))
        {
            return Err(Error::Config(
                "the fingerprint must be 8 to 512 printable ASCII characters".to_owned(),
            ));
        }
        let fingerprint_header = HeaderValue::from_str(&fingerprint)
            .map_err(|_| Error::Config("the fingerprint is not a header value".to_owned()))?;
        let user_agent = self.user_agent.as_deref().unwrap_or(DEFAULT_USER_AGENT);
        let user_agent = HeaderValue::from_str(user_agent)
            .ok()
            .filter(|_| !user_agent.is_empty())
            .ok_or_else(|| Error::Config("the User-Agent is not a header value".to_owned()))?;
        let key = match self.dpop {
            DpopChoice::Generate => Some(DpopKey::generate()?),
            DpopChoice::Pkcs8(der) => Some(DpopKey::from_pkcs8(&der)?),
            DpopChoice::Key(key) => Some(key),
            DpopChoice::Off => None,
        };
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                base,
                base_url,
                fingerprint,
                fingerprint_header,
                user_agent,
                key,
                samples: std::sync::Mutex::new(self.interaction),
                source: self.source,
                evidence: self.evidence,
                attestation: self.attestation,
                refresh_margin: self.refresh_margin,
                http,
                state: tokio::sync::Mutex::new(None),
                offset_ms: AtomicI64::new(0),
                nonce: std::sync::Mutex::new(None),
            }),
        })
    }
}

fn parse_base(raw: &str) -> Result<Url> {
    let mut url = Url::parse(raw.trim())
        .map_err(|e| Error::Config(format!("the base URL does not parse: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(Error::Config(
            "the base URL must be an http or https URL with a host".to_owned(),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::Config(
            "the base URL must not carry credentials".to_owned(),
        ));
    }
    url.set_query(None);
    url.set_fragment(None);
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(url)
}

/// A Perishable client: mints, refreshes and revokes the session, and authenticates calls to
/// `/openai/...`. Cheap to clone (one shared state); see the [crate docs](crate).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// The base URL as a string, without a trailing slash.
    base: String,
    base_url: Url,
    fingerprint: String,
    fingerprint_header: HeaderValue,
    user_agent: HeaderValue,
    key: Option<DpopKey>,
    samples: std::sync::Mutex<Interaction>,
    source: Option<InteractionSource>,
    evidence: Vec<EvidenceSource>,
    attestation: Option<AttestationSource>,
    refresh_margin: Duration,
    http: reqwest::Client,
    /// The current session; held across a mint or refresh, so concurrent callers share one.
    state: tokio::sync::Mutex<Option<Session>>,
    /// The server's clock minus ours, in milliseconds.
    offset_ms: AtomicI64,
    /// The latest `DPoP-Nonce` the server sent.
    nonce: std::sync::Mutex<Option<String>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.base)
            .field("fingerprint", &self.inner.fingerprint)
            .field("user_agent", &self.inner.user_agent)
            .field("dpop", &self.inner.key.as_ref().map(DpopKey::thumbprint))
            .field("refresh_margin", &self.inner.refresh_margin)
            .finish_non_exhaustive()
    }
}

/// A request [`Client::send`] takes: a `reqwest::RequestBuilder` (sent with its own
/// `reqwest::Client`) or a `reqwest::Request` (sent with the client's).
pub trait IntoRequest: sealed::Sealed {
    #[doc(hidden)]
    fn into_parts(self) -> (Option<reqwest::Client>, reqwest::Result<reqwest::Request>);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for reqwest::RequestBuilder {}
    impl Sealed for reqwest::Request {}
}

impl IntoRequest for reqwest::RequestBuilder {
    fn into_parts(self) -> (Option<reqwest::Client>, reqwest::Result<reqwest::Request>) {
        let (client, request) = self.build_split();
        (Some(client), request)
    }
}

impl IntoRequest for reqwest::Request {
    fn into_parts(self) -> (Option<reqwest::Client>, reqwest::Result<reqwest::Request>) {
        (None, Ok(self))
    }
}

#[derive(Deserialize)]
struct Challenge {
    challenge: String,
    difficulty: u8,
    #[serde(default)]
    algorithm: Option<String>,
    expires_at: u64,
}

impl Client {
    /// A builder for the router mounted at `base_url` (for example
    /// `https://api.example.com/ai`).
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            fingerprint: None,
            user_agent: None,
            dpop: DpopChoice::Generate,
            interaction: Interaction::default(),
            source: None,
            evidence: Vec::new(),
            attestation: None,
            refresh_margin: DEFAULT_REFRESH_MARGIN,
            http: None,
        }
    }

    /// The router's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// `{base}/openai`: the base URL for OpenAI-compatible SDKs.
    pub fn openai_base_url(&self) -> String {
        format!("{}/openai", self.inner.base)
    }

    /// The fingerprint sent with every call.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    /// The DPoP key (to store its [`pkcs8_der`](DpopKey::pkcs8_der)), unless DPoP is off.
    pub fn dpop_key(&self) -> Option<&DpopKey> {
        self.inner.key.as_ref()
    }

    /// The `reqwest::Client` the client sends with.
    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// Replaces the interaction samples sent with the next mint.
    pub fn set_interaction(&self, samples: Interaction) {
        *self.samples() = samples;
    }

    /// Changes the stored interaction samples in place, for recording events as they come:
    /// `client.record_interaction(|i| i.push_pointer(t, x, y))`.
    pub fn record_interaction(&self, record: impl FnOnce(&mut Interaction)) {
        record(&mut self.samples());
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, Interaction> {
        self.inner
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The current session: minted if there is none (`GET /challenge`, the proof of work on a
    /// blocking thread, `POST /session` with a DPoP proof), refreshed when it is within the
    /// refresh margin of its expiry (`POST /session/refresh`), minted again when refresh is
    /// refused (past the session's absolute lifetime, revoked). Concurrent callers share one
    /// mint or refresh.
    pub async fn session(&self) -> Result<Session> {
        let mut state = self.inner.state.lock().await;
        if let Some(current) = state.as_ref()
            && self.remaining(current) > self.threshold(current)
        {
            return Ok(current.clone());
        }
        self.renew(&mut state).await
    }

    /// The headers for one call to `url` with `method`: `Authorization` (`Bearer` or `DPoP`),
    /// `X-Perishable-Fingerprint`, `User-Agent` and, for a key-bound session, a fresh `DPoP`
    /// proof for this method and URL. Use them with any HTTP client, once: a proof cannot be
    /// replayed. The token and proof values are marked sensitive (hidden from `Debug`).
    ///
    /// `url` must be under the base URL, so that the token never goes anywhere else.
    pub async fn headers(&self, method: &Method, url: &str) -> Result<HeaderMap> {
        let url = Url::parse(url).map_err(|e| Error::Url(format!("{url:?}: {e}")))?;
        if self.route_of(&url).is_none() {
            return Err(Error::Url(format!(
                "{url} is not under the base URL {}",
                self.inner.base
            )));
        }
        let session = self.session().await?;
        self.auth_headers(&session, method.as_str(), &url)
    }

    /// A `reqwest::RequestBuilder` for `{base}/openai/{path}` (`path` such as
    /// `chat/completions`), with the headers of [`headers`](Self::headers) set. Send it with
    /// [`send`](Self::send) for a fresh proof and the retry on a stale one, or with its own
    /// `send()`.
    pub async fn request(&self, method: Method, path: &str) -> Result<reqwest::RequestBuilder> {
        let raw = format!(
            "{}/openai/{}",
            self.inner.base,
            path.trim_start_matches('/')
        );
        let url = Url::parse(&raw).map_err(|e| Error::Url(format!("{raw:?}: {e}")))?;
        let session = self.session().await?;
        let headers = self.auth_headers(&session, method.as_str(), &url)?;
        Ok(self.inner.http.request(method, url).headers(headers))
    }

    /// Sends a request. One under the base URL gets fresh authentication headers (so a builder
    /// from [`request`](Self::request) may wait before being sent); any other is sent as it
    /// is, with no token. The response comes back whatever its status, like `fetch`; see
    /// [`check`](crate::check).
    ///
    /// Sent once more, when the request body can be cloned (not a stream), after:
    ///
    /// - a refused DPoP proof (`WWW-Authenticate: DPoP error="invalid_dpop_proof"`): with a
    ///   fresh proof, after following the server's clock from its `Date` header;
    /// - `use_dpop_nonce` with a `DPoP-Nonce` header: with a proof carrying that nonce;
    /// - `401` `token_expired`, `session_revoked` or `invalid_token`: with a new session.
    pub async fn send(&self, request: impl IntoRequest) -> Result<reqwest::Response> {
        let (client, request) = request.into_parts();
        let http = client.unwrap_or_else(|| self.inner.http.clone());
        let mut request = request?;
        if !self.is_ours(request.url(), request.method()) {
            return Ok(http.execute(request).await?);
        }
        let session = self.session().await?;
        self.authorize(&mut request, &session)?;
        let retry = request.try_clone();
        let response = http.execute(request).await?;
        self.observe(&response);
        if let Some(mut again) = retry
            && let Some(session) = self.retry_session(&response, &session).await?
        {
            drop(response);
            self.authorize(&mut again, &session)?;
            let response = http.execute(again).await?;
            self.observe(&response);
            return Ok(response);
        }
        Ok(response)
    }

    /// Revokes the session (`DELETE /session`) and forgets it; the next call mints a new one.
    /// Does nothing when there is no session.
    pub async fn revoke(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let Some(current) = state.take() else {
            return Ok(());
        };
        let url = self.route("/session")?;
        let headers = self.auth_headers(&current, "DELETE", &url)?;
        let response = self
            .inner
            .http
            .delete(url)
            .headers(headers)
            .timeout(CALL_TIMEOUT)
            .send()
            .await?;
        self.observe(&response);
        // 401: the token was no longer valid anyway.
        if response.status().is_success() || response.status() == reqwest::StatusCode::UNAUTHORIZED
        {
            Ok(())
        } else {
            Err(Error::refused("DELETE /session", response).await)
        }
    }

    // -----------------------------------------------------------------------------------------
    // Sessions

    async fn renew(&self, state: &mut Option<Session>) -> Result<Session> {
        if let Some(current) = state.clone()
            && self.remaining(&current) > 0.0
        {
            match self.refresh_with(&current).await {
                Ok(fresh) => {
                    *state = Some(fresh.clone());
                    return Ok(fresh);
                }
                // Expired (absolute lifetime), revoked or invalid: mint.
                Err(e) if e.status() == Some(401) => {}
                // Rate limited, network: keep the session while it lasts, refresh next time.
                Err(_) if self.remaining(&current) > 1.0 => return Ok(current),
                Err(_) => {}
            }
        }
        *state = None;
        let fresh = self.mint().await?;
        *state = Some(fresh.clone());
        Ok(fresh)
    }

    /// After a 401 with `failed`: the newer session if another caller replaced it, else a new
    /// one.
    async fn recover(&self, failed: &Session) -> Result<Session> {
        let mut state = self.inner.state.lock().await;
        if let Some(current) = state.as_ref()
            && current.token() != failed.token()
            && self.remaining(current) > 0.0
        {
            return Ok(current.clone());
        }
        *state = None;
        let fresh = self.mint().await?;
        *state = Some(fresh.clone());
        Ok(fresh)
    }

    async fn mint(&self) -> Result<Session> {
        match self.mint_once().await {
            // A stale clock or a server nonce: one more try with what the refusal taught.
            Err(e)
                if self.inner.key.is_some()
                    && matches!(e.code(), Some("invalid_dpop_proof" | "use_dpop_nonce")) =>
            {
                self.mint_once().await
            }
            other => other,
        }
    }

    async fn mint_once(&self) -> Result<Session> {
        let response = self
            .inner
            .http
            .get(self.route("/challenge")?)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, self.inner.user_agent.clone())
            .timeout(CALL_TIMEOUT)
            .send()
            .await?;
        self.observe(&response);
        self.adopt_date(&response);
        if !response.status().is_success() {
            return Err(Error::refused("GET /challenge", response).await);
        }
        let challenge: Challenge = serde_json::from_slice(&response.bytes().await?)
            .map_err(|_| Error::Protocol("the challenge does not parse".to_owned()))?;
        if challenge
            .algorithm
            .as_deref()
            .is_some_and(|a| !a.eq_ignore_ascii_case("SHA-256"))
        {
            return Err(Error::Protocol(
                "the challenge's algorithm is not SHA-256".to_owned(),
            ));
        }
        let pow = if challenge.difficulty > 0 {
            // Stop a second before the challenge expires (on the server's clock).
            let left = challenge.expires_at as f64 - self.server_now() - 1.0;
            let deadline = Instant::now() + Duration::from_secs_f64(left.clamp(0.0, 3600.0));
            let (text, difficulty) = (challenge.challenge.clone(), challenge.difficulty);
            let nonce =
                tokio::task::spawn_blocking(move || pow::solve_until(&text, difficulty, deadline))
                    .await
                    .map_err(|_| Error::Protocol("the proof-of-work task failed".to_owned()))?
                    .ok_or(Error::PowExpired { difficulty })?;
            Some(serde_json::json!({ "challenge": challenge.challenge, "nonce": nonce }))
        } else {
            None
        };
        let entropy = match &self.inner.source {
            Some(source) => source(),
            None => self.samples().clone(),
        };
        let mut body = serde_json::json!({
            "fingerprint": self.inner.fingerprint,
            "entropy": entropy,
        });
        if let Some(pow) = pow {
            body["pow"] = pow;
        }
        for (field, source) in &self.inner.evidence {
            if let Some(value) = source().filter(|v| !v.is_empty()) {
                body[*field] = serde_json::Value::String(value);
            }
        }
        if let Some(source) = &self.inner.attestation {
            let bound_to = AttestationChallenge::new(challenge.challenge.clone());
            if let Some(attestation) = source(bound_to).await {
                body["attestation"] = attestation.to_json(&challenge.challenge);
            }
        }
        let url = self.route("/session")?;
        let mut request = self
            .inner
            .http
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, self.inner.user_agent.clone())
            .timeout(CALL_TIMEOUT)
            .body(body.to_string());
        if let Some(key) = &self.inner.key {
            let proof = key.proof_at(
                "POST",
                url.as_str(),
                self.iat(),
                None,
                self.nonce().as_deref(),
            )?;
            request = request.header(DPOP_HEADER, sensitive(&proof)?);
        }
        let response = request.send().await?;
        self.observe(&response);
        if !response.status().is_success() {
            self.adopt_date(&response);
            return Err(Error::refused("POST /session", response).await);
        }
        self.adopt_session(&response.bytes().await?)
    }

    async fn refresh_with(&self, current: &Session) -> Result<Session> {
        let url = self.route("/session/refresh")?;
        let headers = self.auth_headers(current, "POST", &url)?;
        let response = self
            .inner
            .http
            .post(url)
            .headers(headers)
            .header(ACCEPT, "application/json")
            .timeout(CALL_TIMEOUT)
            .send()
            .await?;
        self.observe(&response);
        if !response.status().is_success() {
            self.adopt_date(&response);
            return Err(Error::refused("POST /session/refresh", response).await);
        }
        self.adopt_session(&response.bytes().await?)
    }

    fn adopt_session(&self, body: &[u8]) -> Result<Session> {
        let session = Session::parse(body)?;
        if session.is_dpop_bound() && self.inner.key.is_none() {
            return Err(Error::Protocol(
                "the server bound the session to a key this client does not have".to_owned(),
            ));
        }
        // The server's "now" was expires_at - expires_in when it answered.
        let server_now = session.expires_at().saturating_sub(session.lifetime()) as f64;
        self.adopt_offset(((server_now - unix_now()) * 1000.0) as i64);
        Ok(session)
    }

    /// Seconds left on `session`, on the server's clock.
    fn remaining(&self, session: &Session) -> f64 {
        session.expires_at() as f64 - self.server_now()
    }

    /// Refresh when fewer seconds than this are left.
    fn threshold(&self, session: &Session) -> f64 {
        self.inner
            .refresh_margin
            .as_secs_f64()
            .min(session.lifetime() as f64 / 2.0)
    }

    // -----------------------------------------------------------------------------------------
    // Requests

    /// `{base}{route}` as a URL.
    fn route(&self, route: &str) -> Result<Url> {
        let raw = format!("{}{route}", self.inner.base);
        Url::parse(&raw).map_err(|e| Error::Url(format!("{raw:?}: {e}")))
    }

    /// The path below the base URL (starting with `/`), when `url` is under it.
    fn route_of<'u>(&self, url: &'u Url) -> Option<&'u str> {
        let base = &self.inner.base_url;
        if url.scheme() != base.scheme()
            || url.host_str() != base.host_str()
            || url.port_or_known_default() != base.port_or_known_default()
        {
            return None;
        }
        let prefix = base.path().trim_end_matches('/');
        url.path()
            .strip_prefix(prefix)
            .filter(|rest| rest.starts_with('/'))
    }

    /// Whether a request needs the session: under the base URL, except the public routes.
    pub(crate) fn is_ours(&self, url: &Url, method: &Method) -> bool {
        match self.route_of(url) {
            None | Some("/health" | "/challenge" | "/client.js") => false,
            Some("/session") => method != Method::POST,
            Some(_) => true,
        }
    }

    fn auth_headers(&self, session: &Session, method: &str, url: &Url) -> Result<HeaderMap> {
        let mut headers = HeaderMap::with_capacity(4);
        let authorization = format!("{} {}", session.token_type().as_str(), session.token());
        headers.insert(AUTHORIZATION, sensitive(&authorization)?);
        headers.insert(FINGERPRINT_HEADER, self.inner.fingerprint_header.clone());
        headers.insert(USER_AGENT, self.inner.user_agent.clone());
        if session.token_type() == TokenType::Dpop {
            let key = self.inner.key.as_ref().ok_or(Error::Key(
                "the session is key-bound but the client has no key",
            ))?;
            let mut htu = url.clone();
            htu.set_query(None);
            htu.set_fragment(None);
            let proof = key.proof_at(
                method,
                htu.as_str(),
                self.iat(),
                Some(session.token()),
                self.nonce().as_deref(),
            )?;
            headers.insert(DPOP_HEADER, sensitive(&proof)?);
        }
        Ok(headers)
    }

    /// Sets the authentication headers of `request`, replacing any it had.
    pub(crate) fn authorize(
        &self,
        request: &mut reqwest::Request,
        session: &Session,
    ) -> Result<()> {
        let headers = self.auth_headers(session, request.method().as_str(), request.url())?;
        let target = request.headers_mut();
        target.remove(DPOP_HEADER);
        for (name, value) in headers {
            if let Some(name) = name {
                target.insert(name, value);
            }
        }
        Ok(())
    }

    /// The session to send a refused request again with, if the refusal calls for it.
    pub(crate) async fn retry_session(
        &self,
        response: &reqwest::Response,
        session: &Session,
    ) -> Result<Option<Session>> {
        let status = response.status().as_u16();
        if status != 401 && status != 400 {
            return Ok(None);
        }
        let Some(challenge) = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| auth_param(v, "error").is_some())
        else {
            return Ok(None);
        };
        match auth_param(challenge, "error") {
            Some("invalid_dpop_proof") if session.is_dpop_bound() => {
                self.adopt_date(response);
                Ok(Some(session.clone()))
            }
            Some("use_dpop_nonce")
                if session.is_dpop_bound()
                    && response.headers().contains_key(DPOP_NONCE_HEADER) =>
            {
                Ok(Some(session.clone()))
            }
            Some("invalid_token")
                if status == 401
                    && auth_param(challenge, "error_description")
                        .is_some_and(|code| REMINT_CODES.contains(&code)) =>
            {
                Ok(Some(self.recover(session).await?))
            }
            _ => Ok(None),
        }
    }

    /// Keeps the server's `DPoP-Nonce`, when it sends one.
    pub(crate) fn observe(&self, response: &reqwest::Response) {
        if let Some(nonce) = response
            .headers()
            .get(DPOP_NONCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 512)
        {
            *self
                .inner
                .nonce
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(nonce.to_owned());
        }
    }

    fn nonce(&self) -> Option<String> {
        self.inner
            .nonce
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    // -----------------------------------------------------------------------------------------
    // Clock

    /// Unix seconds on the server's clock (as far as we know it).
    fn server_now(&self) -> f64 {
        unix_now() + self.inner.offset_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// The `iat` of a proof.
    fn iat(&self) -> u64 {
        self.server_now().max(0.0) as u64
    }

    /// Follows the server's clock from a response's `Date` header.
    fn adopt_date(&self, response: &reqwest::Response) {
        if let Some(date) = response
            .headers()
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date)
        {
            // Date is truncated to the second: compare with the middle of that second.
            let offset = ((date as f64 + 0.5 - unix_now()) * 1000.0) as i64;
            self.adopt_offset(offset);
        }
    }

    fn adopt_offset(&self, offset_ms: i64) {
        let offset = if offset_ms.abs() >= MIN_OFFSET_MS {
            offset_ms
        } else {
            0
        };
        self.inner.offset_ms.store(offset, Ordering::Relaxed);
    }
}

/// A header value marked sensitive (hidden from `Debug`, not indexed by HTTP/2 HPACK).
fn sensitive(value: &str) -> Result<HeaderValue> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| Error::Protocol("a credential is not a header value".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The value of auth-param `name` in a `WWW-Authenticate` challenge (quoted or not).
fn auth_param<'a>(challenge: &'a str, name: &str) -> Option<&'a str> {
    challenge.split(',').find_map(|part| {
        let part = part.trim();
        // The first parameter follows the scheme: `DPoP error="..."`.
        let part = match part.split_once(' ') {
            Some((scheme, rest)) if !scheme.contains('=') => rest.trim(),
            _ => part,
        };
        let (key, value) = part.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::builder(base)
            .fingerprint("device-1234")
            .no_dpop()
            .build()
            .unwrap()
    }

    #[test]
    fn reads_auth_params() {
        let c = r#"DPoP realm="perishable", error="invalid_dpop_proof", algs="ES256 EdDSA""#;
        assert_eq!(auth_param(c, "error"), Some("invalid_dpop_proof"));
        assert_eq!(auth_param(c, "realm"), Some("perishable"));
        let c = r#"Bearer realm="perishable", error="invalid_token", error_description="session_revoked""#;
        assert_eq!(auth_param(c, "error_description"), Some("session_revoked"));
        assert_eq!(
            auth_param(r#"DPoP error="use_dpop_nonce""#, "error"),
            Some("use_dpop_nonce")
        );
        assert_eq!(auth_param(r#"Bearer realm="perishable""#, "error"), None);
    }

    #[test]
    fn the_builder_checks_its_input() {
        let base = "http://127.0.0.1:1/ai/";
        assert!(matches!(
            Client::builder(base).no_dpop().build(),
            Err(Error::Config(_))
        ));
        for bad in ["short", "caf\u{e9}-device", "tab\tdevice-12"] {
            assert!(
                Client::builder(base)
                    .fingerprint(bad)
                    .no_dpop()
                    .build()
                    .is_err(),
                "{bad}"
            );
        }
        assert!(
            Client::builder(base)
                .fingerprint("x".repeat(513))
                .no_dpop()
                .build()
                .is_err()
        );
        for bad in ["ftp://h/ai", "not a url", "http://user:pw@h/ai"] {
            assert!(
                Client::builder(bad)
                    .fingerprint("device-1234")
                    .no_dpop()
                    .build()
                    .is_err(),
                "{bad}"
            );
        }
        assert!(
            Client::builder(base)
                .fingerprint("device-1234")
                .dpop_key(b"junk")
                .build()
                .is_err()
        );
        assert!(
            Client::builder(base)
                .fingerprint("device-1234")
                .user_agent("bad\nagent")
                .build()
                .is_err()
        );
        let c = client(base);
        assert_eq!(c.base_url(), "http://127.0.0.1:1/ai");
        assert_eq!(c.openai_base_url(), "http://127.0.0.1:1/ai/openai");
    }

    #[test]
    fn knows_which_requests_are_its_own() {
        let c = client("https://api.example.com/ai");
        let ours = |u: &str, m: Method| c.is_ours(&Url::parse(u).unwrap(), &m);
        assert!(ours(
            "https://api.example.com/ai/openai/models",
            Method::GET
        ));
        assert!(ours(
            "https://api.example.com:443/ai/openai/models?x=1",
            Method::GET
        ));
        assert!(ours("https://api.example.com/ai/session", Method::DELETE));
        assert!(ours(
            "https://api.example.com/ai/session/refresh",
            Method::POST
        ));
        assert!(!ours("https://api.example.com/ai/session", Method::POST));
        assert!(!ours("https://api.example.com/ai/challenge", Method::GET));
        assert!(!ours("https://api.example.com/ai/health", Method::GET));
        assert!(!ours(
            "https://api.example.com/aix/openai/models",
            Method::GET
        ));
        assert!(!ours(
            "http://api.example.com/ai/openai/models",
            Method::GET
        ));
        assert!(!ours(
            "https://evil.example.com/ai/openai/models",
            Method::GET
        ));
        assert!(!ours(
            "https://api.example.com:8443/ai/openai/models",
            Method::GET
        ));
    }

    #[test]
    fn debug_shows_no_key() {
        let c = Client::builder("http://127.0.0.1:1")
            .fingerprint("device-1234")
            .build()
            .unwrap();
        let debug = format!("{c:?}");
        let key = c.dpop_key().unwrap();
        assert!(debug.contains(key.thumbprint()), "{debug}");
        use base64::Engine;
        let pkcs8 = base64::engine::general_purpose::STANDARD.encode(key.pkcs8_der());
        assert!(!debug.contains(&pkcs8));
    }
}
