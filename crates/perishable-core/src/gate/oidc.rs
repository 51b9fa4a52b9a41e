//! The OIDC gate: an ID token from an OpenID Connect provider the operator trusts.
//!
//! [`OidcVerifier::verify`] checks an ID token (a JWS-signed JWT) against the provider's
//! published keys and returns the [`Identity`] it asserts.
//!
//! # What it proves
//!
//! - The token was signed by a key the configured issuer publishes in its JWKS (found through
//!   its discovery document, `{issuer}/.well-known/openid-configuration`, whose `issuer` must
//!   equal the configured one; or at a configured `jwks_url`), with an algorithm from the
//!   operator's allow-list that fits that key (RSA keys for `RS*`/`PS*`, P-256 for `ES256`,
//!   P-384 for `ES384`, Ed25519 for `EdDSA`; the JWK's own `alg` when it has one). Symmetric
//!   (`HS*`) tokens, `none`, `oct` keys from a JWKS, and keys embedded in the token (`jwk`,
//!   `jku`, `x5u`, `x5c`) are never used; a token with a `crit` header is refused.
//! - `iss` equals the configured issuer byte for byte, `aud` contains the configured audience
//!   (as a string or in an array), `exp` has not passed and `nbf`/`iat` are not in the future
//!   (each within the leeway), and `sub` is a non-empty string.
//!
//! So the holder of the token was, recently, signed in at that provider as `sub`, and the
//! provider issued the token for our audience (client ID).
//!
//! # What it does not prove
//!
//! - That the token is fresh for *this* mint, or used once: an ID token is a bearer token,
//!   valid until `exp` for whoever holds it. No `nonce` is checked (the mint has no login
//!   round-trip to bind one to). Callers bound the damage by minting short sessions per
//!   [`Identity::user_id`] and by rate limits; single use, if wanted, belongs in the Store.
//! - Anything about the device or the human: the provider vouches for an account, not for a
//!   browser. `email_verified`, `azp`, `acr`/`amr` are not looked at.
//! - Revocation: a token stays valid until `exp` even if the provider has since disabled the
//!   account (ID tokens have no introspection).
//!
//! # Keys and the network
//!
//! Keys are cached in memory for the JWKS response's `Cache-Control: max-age`, bounded to
//! [5 min, 24 h] (1 h without one). A token with an unknown `kid` triggers a refresh, but at
//! most one fetch attempt every 30 s, whatever the reason: random `kid`s cannot make us hammer
//! the issuer. Concurrent verifications that need a refresh share the one in flight. When a
//! refresh fails, the keys already cached stay in use (with a warning); with no keys at all,
//! verification fails with [`OidcError::Unavailable`], a server-side error, never "invalid
//! token". URLs must be `https`, except on loopback hosts (`localhost`, `127.0.0.0/8`, `::1`).
//!
//! The small HTTP client and fetch helper ([`http_client`], [`send`], [`endpoint`], in
//! `gate/fetch.rs`) are
//! shared with the captcha gate.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri, header};
use http_body_util::Full;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::fetch::{HttpClient, HttpReply, endpoint, http_client, send};
use crate::config::ConfigError;

/// The longest ID token looked at (bytes). Real ones are 1-2 KiB.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The largest discovery document or JWKS read (bytes).
const MAX_DOCUMENT_LEN: usize = 256 * 1024;
/// At most one discovery/JWKS fetch attempt per this interval.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// How long keys are kept without a `Cache-Control: max-age`.
const DEFAULT_KEYS_TTL: Duration = Duration::from_secs(3600);
/// The bounds put on a JWKS response's `max-age`.
const MIN_KEYS_TTL: Duration = Duration::from_secs(300);
const MAX_KEYS_TTL: Duration = Duration::from_secs(24 * 3600);
/// The algorithms an ID token may be signed with (those listed in the settings, among these).
const SUPPORTED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What an [`OidcVerifier`] checks against.
#[derive(Debug, Clone)]
pub(crate) struct OidcSettings {
    /// The issuer, exactly as the tokens' `iss` (an `https` URL; a trailing `/` is kept for the
    /// comparison and dropped to build the discovery URL).
    pub(crate) issuer: String,
    /// The JWKS URL, skipping discovery; `None`: discover it from the issuer.
    pub(crate) jwks_url: Option<String>,
    /// The audience the tokens must name in `aud`: our client ID at the provider.
    pub(crate) audience: String,
    /// The accepted `alg`s: any of RS256/384/512, PS256/384/512, ES256, ES384 and EdDSA.
    pub(crate) algorithms: Vec<Algorithm>,
    /// The claim holding the user's tier, as a dot-separated path into the claims
    /// (`app_metadata.tier`); only a string value counts.
    pub(crate) tier_claim: Option<String>,
    /// The clock skew allowed on `exp`, `nbf` and `iat` (whole seconds).
    pub(crate) leeway: Duration,
    /// The time allowed for each fetch (discovery or JWKS), connection included.
    pub(crate) timeout: Duration,
}

impl OidcSettings {
    /// Settings for `issuer` and `audience`, accepting RS256, ES256 and EdDSA, with a leeway of
    /// 60 s, a 5 s fetch timeout and no tier claim.
    pub(crate) fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            jwks_url: None,
            audience: audience.into(),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
            tier_claim: None,
            leeway: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Who an ID token says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// `iss`: the configured issuer.
    pub(crate) issuer: String,
    /// `sub`: the user at that issuer (non-empty).
    pub(crate) subject: String,
    /// The tier claim's string value, when configured and present.
    pub(crate) tier: Option<String>,
    /// `exp`, in seconds since the Unix epoch.
    pub(crate) expires_at: u64,
}

impl Identity {
    /// A stable, opaque user ID: base64url (no padding) of
    /// SHA-256(`iss` bytes ‖ 0x00 ‖ `sub` bytes).
    ///
    /// The issuer is the configured one and holds no NUL byte (it is a URL), so the separator
    /// makes the encoding injective: distinct (issuer, subject) pairs never share an ID.
    pub(crate) fn user_id(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.issuer.as_bytes());
        hash.update([0u8]);
        hash.update(self.subject.as_bytes());
        URL_SAFE_NO_PAD.encode(hash.finalize())
    }
}

/// Why an ID token was not accepted. All but [`OidcError::Unavailable`] are the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OidcError {
    /// Not a JWS compact token, empty, too long, or its parts or claims are not well formed.
    #[error("malformed ID token")]
    Malformed,
    /// The header has a `crit` extension list (none is supported).
    #[error("ID token has critical header extensions")]
    CriticalHeader,
    /// The `alg` is not one the operator accepts (`none` and `HS*` never are).
    #[error("ID token algorithm not accepted")]
    AlgorithmNotAllowed,
    /// The key the token names cannot be used with its `alg` (type, curve or the JWK's `alg`).
    #[error("ID token algorithm does not match the issuer's key")]
    AlgorithmKeyMismatch,
    /// No `kid`, and the issuer publishes more than one key.
    #[error("ID token has no key ID")]
    MissingKid,
    /// The `kid` is not in the issuer's key set (even after a refresh, when one was allowed).
    #[error("ID token signed by an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("ID token signature invalid")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("ID token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("ID token not yet valid")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("ID token issued in the future")]
    IssuedInFuture,
    /// `iss` is not the configured issuer.
    #[error("ID token from another issuer")]
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    #[error("ID token for another audience")]
    WrongAudience,
    /// A required claim (`exp`, `iss`, `aud` or `sub`) is absent, or `sub` is empty.
    #[error("ID token lacks the {0} claim")]
    MissingClaim(&'static str),
    /// The issuer's keys could not be fetched and none are cached: a server-side failure. The
    /// text says what failed (URLs and causes, nothing secret).
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
}

impl OidcError {
    /// Whether the failure is ours (the provider is unreachable), not the token's.
    pub(crate) fn is_server_side(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Verifies ID tokens from one issuer; cheap to share (`Arc`), safe to call concurrently.
pub(crate) struct OidcVerifier {
    issuer: String,
    /// The discovery document's URL, or `None` when the JWKS URL is configured.
    discovery: Option<Uri>,
    /// The configured JWKS URL.
    jwks_url: Option<Uri>,
    audience: String,
    algorithms: Vec<Algorithm>,
    tier_path: Option<Vec<String>>,
    leeway: u64,
    timeout: Duration,
    client: HttpClient,
    cache: Mutex<KeyCache>,
    /// Held by the one task fetching keys: others needing fresh keys wait for its result.
    refresh: tokio::sync::Mutex<()>,
    min_refresh: Duration,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The keys last fetched, and the bookkeeping of fetch attempts.
struct KeyCache {
    /// The usable keys of the last good JWKS; `None` before the first.
    keys: Option<Arc<[VerifyKey]>>,
    /// When `keys` should be refreshed.
    expires: Instant,
    /// The last fetch attempt's end, good or bad.
    last_attempt: Option<Instant>,
    /// Fetch attempts so far: a waiter that sees it move knows another task just fetched.
    attempts: u64,
    /// The JWKS URL found by discovery (forgotten when a fetch fails, to rediscover).
    discovered: Option<Uri>,
    /// Why the last attempt failed, for [`OidcError::Unavailable`].
    last_error: Option<String>,
}

/// One usable key of the issuer's JWKS.
struct VerifyKey {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one.
    alg: Option<Algorithm>,
    kind: KeyKind,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl VerifyKey {
    /// The key, if the JWK is a public signature-verification key of a supported kind.
    fn from_jwk(jwk: &Jwk) -> Option<Self> {
        if let Some(usage) = &jwk.common.public_key_use
            && *usage != PublicKeyUse::Signature
        {
            return None;
        }
        if let Some(ops) = &jwk.common.key_operations
            && !ops.contains(&KeyOperations::Verify)
        {
            return None;
        }
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyKind::P256,
                EllipticCurve::P384 => KeyKind::P384,
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => KeyKind::Ed25519,
                _ => return None,
            },
            // Never a symmetric key from a JWKS: an `oct` key would let anyone who reads the
            // JWKS sign tokens.
            _ => return None,
        };
        let alg = match jwk.common.key_algorithm {
            // An `alg` we do not know (an encryption algorithm...): not a key for us.
            Some(alg) => Some(Algorithm::try_from(alg).ok()?),
            None => None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(Self {
            kid: jwk.common.key_id.clone(),
            alg,
            kind,
            key,
        })
    }

    /// Whether a token signed with `alg` may be checked with this key.
    fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|own| own != alg) {
            return false;
        }
        use Algorithm::*;
        matches!(
            (self.kind, alg),
            (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::P256, ES256)
                | (KeyKind::P384, ES384)
                | (KeyKind::Ed25519, EdDSA)
        )
    }
}

/// The discovery document fields we read.
#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// A JWKS, each key parsed on its own so one odd key does not spoil the set.
#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<Value>,
}

impl OidcVerifier {
    /// A verifier for `settings`; no network until the first [`verify`](Self::verify).
    pub(crate) fn new(settings: OidcSettings) -> Result<Self, ConfigError> {
        let issuer_url = endpoint("mint.oidc.issuer", &settings.issuer)?;
        if issuer_url.query().is_some() || settings.issuer.contains('#') {
            return Err(ConfigError::invalid(
                "mint.oidc.issuer",
                "an issuer has no query or fragment",
            ));
        }
        let (discovery, jwks_url) = match &settings.jwks_url {
            Some(url) => (None, Some(endpoint("mint.oidc.jwks_url", url)?)),
            None => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    settings.issuer.trim_end_matches('/')
                );
                (Some(endpoint("mint.oidc.issuer", &url)?), None)
            }
        };
        if settings.audience.is_empty() {
            return Err(ConfigError::invalid(
                "mint.oidc.audience",
                "must not be empty",
            ));
        }
        if settings.algorithms.is_empty() {
            return Err(ConfigError::invalid(
                "mint.oidc.algorithms",
                "must not be empty",
            ));
        }
        if let Some(alg) = settings.algorithms.iter().find(|a| !SUPPORTED.contains(a)) {
            return Err(ConfigError::invalid(
                "mint.oidc.algorithms",
                format!(
                    "{alg:?} is not accepted (asymmetric algorithms only: RS*, PS*, ES256, ES384, EdDSA)"
                ),
            ));
        }
        let tier_path = match &settings.tier_claim {
            Some(path) => {
                let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
                if parts.iter().any(String::is_empty) {
                    return Err(ConfigError::invalid(
                        "mint.oidc.tier_claim",
                        "a dot-separated path of non-empty claim names",
                    ));
                }
                Some(parts)
            }
            None => None,
        };
        if settings.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "mint.oidc.timeout",
                "must be positive",
            ));
        }
        Ok(Self {
            issuer: settings.issuer,
            discovery,
            jwks_url,
            audience: settings.audience,
            algorithms: settings.algorithms,
            tier_path,
            leeway: settings.leeway.as_secs(),
            timeout: settings.timeout,
            client: http_client(settings.timeout)?,
            cache: Mutex::new(KeyCache {
                keys: None,
                expires: Instant::now(),
                last_attempt: None,
                attempts: 0,
                discovered: None,
                last_error: None,
            }),
            refresh: tokio::sync::Mutex::new(()),
            min_refresh: MIN_REFRESH_INTERVAL,
        })
    }

    /// Checks `id_token` and returns the identity it asserts. See the module documentation for
    /// what is checked; fails closed on anything unexpected.
    pub(crate) async fn verify(&self, id_token: &str) -> Result<Identity, OidcError> {
        if id_token.is_empty() || id_token.len() > MAX_TOKEN_LEN {
            return Err(OidcError::Malformed);
        }
        // Unknown `alg` values (`none`, ...) do not parse: Malformed.
        let header = jsonwebtoken::decode_header(id_token).map_err(|_| OidcError::Malformed)?;
        if header.crit.is_some() {
            return Err(OidcError::CriticalHeader);
        }
        if !self.algorithms.contains(&header.alg) {
            return Err(OidcError::AlgorithmNotAllowed);
        }
        let kid = header.kid.as_deref();
        let keys = self.keys_for(kid).await?;
        let key = select(&keys, kid, header.alg)?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(id_token, &key.key, &validation)
            .map_err(|e| jwt_error(e.kind()))?
            .claims;

        // Checked again here, strictly: a string equal to ours (the library also accepts an
        // array naming it).
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(OidcError::WrongIssuer);
        }
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            Some(Value::String(_)) | None => return Err(OidcError::MissingClaim("sub")),
            Some(_) => return Err(OidcError::Malformed),
        };
        let expires_at = claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or(OidcError::Malformed)?;
        if let Some(iat) = claims.get("iat") {
            let iat = numeric_date(iat).ok_or(OidcError::Malformed)?;
            if iat > jsonwebtoken::get_current_timestamp().saturating_add(self.leeway) {
                return Err(OidcError::IssuedInFuture);
            }
        }
        let tier = self.tier_path.as_ref().and_then(|path| {
            let mut value = claims.get(path.first()?)?;
            for name in &path[1..] {
                value = value.as_object()?.get(name)?;
            }
            value.as_str().map(str::to_owned)
        });
        Ok(Identity {
            issuer: self.issuer.clone(),
            subject,
            tier,
            expires_at,
        })
    }

    fn cache(&self) -> MutexGuard<'_, KeyCache> {
        // The cache is consistent after every statement: a panic elsewhere cannot corrupt it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key set to check a token naming `kid` against, refreshed when stale or when it lacks
    /// `kid` (within the refresh-rate bound).
    async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<[VerifyKey]>, OidcError> {
        let seen = {
            let cache = self.cache();
            if let Some(keys) = &cache.keys
                && Instant::now() < cache.expires
                && kid.is_none_or(|kid| keys.iter().any(|k| k.kid.as_deref() == Some(kid)))
            {
                return Ok(keys.clone());
            }
            cache.attempts
        };
        let _single_flight = self.refresh.lock().await;
        let due = {
            let cache = self.cache();
            // Someone else fetched while we waited: use what they got, whatever it holds.
            cache.attempts == seen
                && cache
                    .last_attempt
                    .is_none_or(|at| at.elapsed() >= self.min_refresh)
        };
        if due {
            self.refresh_keys().await;
        } else {
            tracing::debug!(issuer = %self.issuer, "JWKS refresh not due (rate bound or just fetched)");
        }
        let cache = self.cache();
        match &cache.keys {
            Some(keys) => Ok(keys.clone()),
            None => Err(OidcError::Unavailable(
                cache
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no keys fetched yet".into()),
            )),
        }
    }

    /// One fetch attempt; its outcome lands in the cache.
    async fn refresh_keys(&self) {
        let discovered = self.cache().discovered.clone();
        let result = self.fetch_keys(discovered).await;
        let mut cache = self.cache();
        cache.attempts += 1;
        let now = Instant::now();
        cache.last_attempt = Some(now);
        match result {
            Ok((keys, ttl, jwks_uri)) => {
                metrics::counter!("perishable_gate_jwks_fetches_total", "outcome" => "ok")
                    .increment(1);
                tracing::debug!(issuer = %self.issuer, keys = keys.len(), ttl_s = ttl.as_secs(), "JWKS fetched");
                cache.keys = Some(keys);
                cache.expires = now + ttl;
                cache.discovered = jwks_uri;
                cache.last_error = None;
            }
            Err(error) => {
                metrics::counter!("perishable_gate_jwks_fetches_total", "outcome" => "error")
                    .increment(1);
                if cache.keys.is_some() {
                    tracing::warn!(issuer = %self.issuer, %error, "JWKS refresh failed; keeping the cached keys");
                } else {
                    tracing::warn!(issuer = %self.issuer, %error, "JWKS fetch failed; no keys to verify ID tokens with");
                }
                cache.discovered = None;
                cache.last_error = Some(error);
            }
        }
    }

    /// Discovery (unless configured or already done), then the JWKS: the usable keys, how long
    /// to keep them, and the discovered JWKS URL to remember.
    async fn fetch_keys(
        &self,
        discovered: Option<Uri>,
    ) -> Result<(Arc<[VerifyKey]>, Duration, Option<Uri>), String> {
        let (jwks_uri, remember) = match (&self.jwks_url, discovered, &self.discovery) {
            (Some(configured), _, _) => (configured.clone(), None),
            (None, Some(known), _) => (known.clone(), Some(known)),
            (None, None, Some(discovery)) => {
                let uri = self.discover(discovery).await?;
                (uri.clone(), Some(uri))
            }
            (None, None, None) => return Err("no JWKS URL".into()),
        };
        let reply = self.get(&jwks_uri).await?;
        let set: RawKeySet = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("JWKS at {jwks_uri} is not a JSON key set: {e}"))?;
        let keys: Vec<VerifyKey> = set
            .keys
            .into_iter()
            .filter_map(|raw| {
                let key = serde_json::from_value::<Jwk>(raw)
                    .ok()
                    .and_then(|jwk| VerifyKey::from_jwk(&jwk));
                if key.is_none() {
                    tracing::debug!(issuer = %self.issuer, "JWKS entry skipped (not a supported public signing key)");
                }
                key
            })
            .collect();
        if keys.is_empty() {
            return Err(format!("JWKS at {jwks_uri} holds no usable signing key"));
        }
        Ok((keys.into(), keys_ttl(&reply.headers), remember))
    }

    async fn discover(&self, discovery: &Uri) -> Result<Uri, String> {
        let reply = self.get(discovery).await?;
        let doc: Discovery = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("discovery document at {discovery} unreadable: {e}"))?;
        if doc.issuer != self.issuer {
            return Err(format!(
                "discovery document at {discovery} names issuer {:?}, not {:?}",
                doc.issuer, self.issuer
            ));
        }
        endpoint("jwks_uri", &doc.jwks_uri)
            .map_err(|e| format!("discovery document at {discovery}: {e}"))
    }

    async fn get(&self, uri: &Uri) -> Result<HttpReply, String> {
        let request = Request::get(uri.clone())
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("GET {uri}: {e}"))?;
        let reply = send(&self.client, request, self.timeout, MAX_DOCUMENT_LEN)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))?;
        if reply.status != StatusCode::OK {
            return Err(format!("GET {uri}: status {}", reply.status));
        }
        Ok(reply)
    }
}

/// The key among `keys` for a token naming `kid` (if any) signed with `alg`.
fn select<'k>(
    keys: &'k [VerifyKey],
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<&'k VerifyKey, OidcError> {
    let key = match kid {
        Some(kid) => {
            let mut named = keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .peekable();
            if named.peek().is_none() {
                return Err(OidcError::UnknownKey);
            }
            // Several keys may share a kid (one per algorithm): take the one that fits.
            return named
                .find(|k| k.fits(alg))
                .ok_or(OidcError::AlgorithmKeyMismatch);
        }
        None => match keys {
            [only] => only,
            _ => return Err(OidcError::MissingKid),
        },
    };
    if key.fits(alg) {
        Ok(key)
    } else {
        Err(OidcError::AlgorithmKeyMismatch)
    }
}

/// A JSON NumericDate as whole seconds (fractions dropped; negative or absurd: `None`).
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e15)
            .map(|f| f as u64)
    })
}

fn jwt_error(kind: &ErrorKind) -> OidcError {
    match kind {
        ErrorKind::ExpiredSignature => OidcError::Expired,
        ErrorKind::ImmatureSignature => OidcError::NotYetValid,
        ErrorKind::InvalidIssuer => OidcError::WrongIssuer,
        ErrorKind::InvalidAudience => OidcError::WrongAudience,
        ErrorKind::InvalidSignature => OidcError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            OidcError::AlgorithmKeyMismatch
        }
        ErrorKind::MissingRequiredClaim(claim) => OidcError::MissingClaim(match claim.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            _ => "sub",
        }),
        // A JWKS key the crypto refuses: the token cannot be shown to be signed by the issuer.
        ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::UnsupportedAlgorithm => OidcError::BadSignature,
        _ => OidcError::Malformed,
    }
}

/// How long to keep a JWKS: its `Cache-Control: max-age`, bounded to [5 min, 24 h]; 1 h
/// without one; the minimum with `no-cache`/`no-store`.
fn keys_ttl(headers: &HeaderMap) -> Duration {
    let mut max_age = None;
    let mut no_cache = false;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(str::trim) {
            let (name, arg) = directive.split_once('=').unwrap_or((directive, ""));
            if name.eq_ignore_ascii_case("max-age") {
                max_age = arg.trim_matches('"').parse::<u64>().ok().or(max_age);
            } else if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store")
            {
                no_cache = true;
            }
        }
    }
    if no_cache {
        return MIN_KEYS_TTL;
    }
    max_age.map_or(DEFAULT_KEYS_TTL, |secs| {
        Duration::from_secs(secs).clamp(MIN_KEYS_TTL, MAX_KEYS_TTL)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, LazyLock, Mutex};
    use std::time::Duration;

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
        RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents,
    };
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use http::HeaderValue;
    use serde_json::{Value, json};

    use super::super::fetch::test_http::{Received, Reply, serve};
    use super::*;

    static RSA: LazyLock<RsaKeyPair> =
        LazyLock::new(|| RsaKeyPair::generate(KeySize::Rsa2048).unwrap());
    static RSA_2: LazyLock<RsaKeyPair> =
        LazyLock::new(|| RsaKeyPair::generate(KeySize::Rsa2048).unwrap());
    static EC: LazyLock<EcdsaKeyPair> =
        LazyLock::new(|| EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap());
    static ED: LazyLock<Ed25519KeyPair> = LazyLock::new(|| Ed25519KeyPair::generate().unwrap());

    const AUD: &str = "client-123";

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa_jwk(key: &RsaKeyPair, kid: &str) -> Value {
        let c = RsaPublicKeyComponents::<Vec<u8>>::from(key.public_key());
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(&c.n), "e": b64(&c.e)})
    }

    fn ec_jwk(kid: &str) -> Value {
        let point = EC.public_key().as_ref();
        json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
    }

    fn ed_jwk(kid: &str) -> Value {
        json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(ED.public_key().as_ref())})
    }

    /// A compact JWS of `header` and `claims`, signed by `sign` over the signing input.
    fn jws(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = sign(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }

    fn rsa_sign(key: &RsaKeyPair) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
        move |msg| {
            let mut sig = vec![0; key.public_modulus_len()];
            key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), msg, &mut sig)
                .unwrap();
            sig
        }
    }

    fn ec_sign(msg: &[u8]) -> Vec<u8> {
        EC.sign(&SystemRandom::new(), msg)
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn ed_sign(msg: &[u8]) -> Vec<u8> {
        ED.sign(msg).as_ref().to_vec()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// A local issuer: discovery at `/.well-known/openid-configuration`, keys at `/jwks`.
    struct Issuer {
        url: String,
        jwks: Arc<Mutex<Value>>,
        discovery_issuer: Arc<Mutex<Option<String>>>,
        down: Arc<Mutex<bool>>,
        cache_control: Arc<Mutex<Option<String>>>,
        discovery_hits: Arc<AtomicUsize>,
        jwks_hits: Arc<AtomicUsize>,
    }

    impl Issuer {
        async fn start(keys: Vec<Value>) -> Self {
            let jwks = Arc::new(Mutex::new(json!({ "keys": keys })));
            let discovery_issuer = Arc::new(Mutex::new(None::<String>));
            let down = Arc::new(Mutex::new(false));
            let cache_control = Arc::new(Mutex::new(None::<String>));
            let discovery_hits = Arc::new(AtomicUsize::new(0));
            let jwks_hits = Arc::new(AtomicUsize::new(0));
            let base = Arc::new(Mutex::new(String::new()));
            let addr = {
                let (jwks, discovery_issuer, down, cache_control, discovery_hits, jwks_hits, base) = (
                    jwks.clone(),
                    discovery_issuer.clone(),
                    down.clone(),
                    cache_control.clone(),
                    discovery_hits.clone(),
                    jwks_hits.clone(),
                    base.clone(),
                );
                serve(move |request: Received| {
                    if *down.lock().unwrap() {
                        return Reply::Send(503, vec![], b"down".to_vec());
                    }
                    let base = base.lock().unwrap().clone();
                    match (request.method.as_str(), request.path.as_str()) {
                        ("GET", "/.well-known/openid-configuration") => {
                            discovery_hits.fetch_add(1, Ordering::SeqCst);
                            let issuer = discovery_issuer
                                .lock()
                                .unwrap()
                                .clone()
                                .unwrap_or_else(|| base.clone());
                            Reply::json(
                                200,
                                &json!({"issuer": issuer, "jwks_uri": format!("{base}/jwks")}),
                            )
                        }
                        ("GET", "/jwks") => {
                            jwks_hits.fetch_add(1, Ordering::SeqCst);
                            let mut reply = Reply::json(200, &jwks.lock().unwrap());
                            if let (Reply::Send(_, headers, _), Some(cc)) =
                                (&mut reply, cache_control.lock().unwrap().clone())
                            {
                                headers.push(("cache-control".into(), cc));
                            }
                            reply
                        }
                        _ => Reply::Send(404, vec![], vec![]),
                    }
                })
                .await
            };
            let url = format!("http://{addr}");
            *base.lock().unwrap() = url.clone();
            Self {
                url,
                jwks,
                discovery_issuer,
                down,
                cache_control,
                discovery_hits,
                jwks_hits,
            }
        }

        fn verifier(&self) -> OidcVerifier {
            self.verifier_with(|_| {})
        }

        fn verifier_with(&self, edit: impl FnOnce(&mut OidcSettings)) -> OidcVerifier {
            let mut settings = OidcSettings::new(self.url.clone(), AUD);
            settings.timeout = Duration::from_secs(2);
            edit(&mut settings);
            OidcVerifier::new(settings).unwrap()
        }

        fn claims(&self) -> Value {
            json!({"iss": self.url, "sub": "user-1", "aud": AUD, "iat": now(), "exp": now() + 600})
        }

        fn rsa_token(&self, kid: &str, claims: &Value) -> String {
            jws(
                &json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
                claims,
                rsa_sign(&RSA),
            )
        }

        fn rotate(&self, keys: Vec<Value>) {
            *self.jwks.lock().unwrap() = json!({ "keys": keys });
        }

        fn hits(&self) -> (usize, usize) {
            (
                self.discovery_hits.load(Ordering::SeqCst),
                self.jwks_hits.load(Ordering::SeqCst),
            )
        }
    }

    /// Pretends the last fetch attempt was `by` earlier, and the keys expired.
    fn age_cache(verifier: &OidcVerifier, by: Duration, expire: bool) {
        let mut cache = verifier.cache();
        let now = Instant::now();
        cache.last_attempt = cache.last_attempt.and_then(|at| at.checked_sub(by));
        if expire {
            cache.expires = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        }
    }

    #[tokio::test]
    async fn valid_rs256_token_with_discovery() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = issuer.verifier();
        let claims = issuer.claims();
        let identity = verifier
            .verify(&issuer.rsa_token("r1", &claims))
            .await
            .unwrap();
        assert_eq!(identity.issuer, issuer.url);
        assert_eq!(identity.subject, "user-1");
        assert_eq!(identity.tier, None);
        assert_eq!(identity.expires_at, claims["exp"].as_u64().unwrap());
        // Cached: a second verification fetches nothing.
        verifier
            .verify(&issuer.rsa_token("r1", &claims))
            .await
            .unwrap();
        assert_eq!(issuer.hits(), (1, 1));
    }

    #[tokio::test]
    async fn valid_es256_and_eddsa_tokens() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1"), ec_jwk("e1"), ed_jwk("d1")]).await;
        let verifier = issuer.verifier();
        let claims = issuer.claims();
        let es = jws(&json!({"alg": "ES256", "kid": "e1"}), &claims, ec_sign);
        assert_eq!(verifier.verify(&es).await.unwrap().subject, "user-1");
        let ed = jws(&json!({"alg": "EdDSA", "kid": "d1"}), &claims, ed_sign);
        assert_eq!(verifier.verify(&ed).await.unwrap().subject, "user-1");
        // An ES256 token naming the RSA key: refused before any signature check.
        let crossed = jws(&json!({"alg": "ES256", "kid": "r1"}), &claims, ec_sign);
        assert_eq!(
            verifier.verify(&crossed).await,
            Err(OidcError::AlgorithmKeyMismatch)
        );
    }

    #[tokio::test]
    async fn audience_may_be_an_array() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = issuer.verifier();
        let mut claims = issuer.claims();
        claims["aud"] = json!(["other", AUD]);
        assert!(
            verifier
                .verify(&issuer.rsa_token("r1", &claims))
                .await
                .is_ok()
        );
        claims["aud"] = json!(["other", "another"]);
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::WrongAudience)
        );
    }

    #[tokio::test]
    async fn time_claims_are_checked_with_leeway() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = issuer.verifier();
        let base = issuer.claims();

        let mut claims = base.clone();
        claims["exp"] = json!(now() - 120);
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::Expired)
        );
        // Within the 60 s leeway: accepted.
        claims["exp"] = json!(now() - 30);
        assert!(
            verifier
                .verify(&issuer.rsa_token("r1", &claims))
                .await
                .is_ok()
        );

        let mut claims = base.clone();
        claims["nbf"] = json!(now() + 300);
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::NotYetValid)
        );

        let mut claims = base.clone();
        claims["iat"] = json!(now() + 300);
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::IssuedInFuture)
        );

        let mut claims = base;
        claims.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::MissingClaim("exp"))
        );
    }

    #[tokio::test]
    async fn wrong_audience_issuer_and_subject() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = issuer.verifier();

        let mut claims = issuer.claims();
        claims["aud"] = json!("someone-else");
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::WrongAudience)
        );

        let mut claims = issuer.claims();
        claims["iss"] = json!(format!("{}/", issuer.url));
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::WrongIssuer)
        );
        claims["iss"] = json!([issuer.url]);
        assert!(
            verifier
                .verify(&issuer.rsa_token("r1", &claims))
                .await
                .is_err()
        );

        let mut claims = issuer.claims();
        claims.as_object_mut().unwrap().remove("sub");
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::MissingClaim("sub"))
        );
        claims["sub"] = json!("");
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::MissingClaim("sub"))
        );
        claims["sub"] = json!(42);
        assert!(
            verifier
                .verify(&issuer.rsa_token("r1", &claims))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn algorithm_confusion_is_refused() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let claims = issuer.claims();
        // HS256 keyed with the RSA public key's bytes (DER and the JWK's `n`).
        let public_der = RSA.public_key().as_ref().to_vec();
        for secret in [public_der.clone(), b64(&public_der).into_bytes()] {
            let hs = jws(&json!({"alg": "HS256", "kid": "r1"}), &claims, |msg| {
                let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
                aws_lc_rs::hmac::sign(&key, msg).as_ref().to_vec()
            });
            // Refused by the allow-list...
            let verifier = issuer.verifier();
            assert_eq!(
                verifier.verify(&hs).await,
                Err(OidcError::AlgorithmNotAllowed)
            );
        }
        // ... and HS256 cannot even be configured.
        let mut settings = OidcSettings::new(issuer.url.clone(), AUD);
        settings.algorithms = vec![Algorithm::HS256];
        assert!(OidcVerifier::new(settings).is_err());

        let verifier = issuer.verifier();
        // `none`, unsigned.
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "kid": "r1"}).to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        assert_eq!(verifier.verify(&none).await, Err(OidcError::Malformed));
        // A symmetric key slipped into the JWKS is never used.
        issuer.rotate(vec![
            json!({"kty": "oct", "kid": "h1", "k": b64(b"secret")}),
        ]);
        let verifier_oct = issuer.verifier_with(|s| s.algorithms.push(Algorithm::RS384));
        let hs = jws(&json!({"alg": "RS384", "kid": "h1"}), &claims, |_| {
            vec![0; 256]
        });
        assert!(matches!(
            verifier_oct.verify(&hs).await,
            Err(OidcError::Unavailable(_))
        ));
        // A forged signature under the right alg and kid.
        issuer.rotate(vec![rsa_jwk(&RSA, "r1")]);
        let forged = jws(
            &json!({"alg": "RS256", "kid": "r1"}),
            &claims,
            rsa_sign(&RSA_2),
        );
        assert_eq!(verifier.verify(&forged).await, Err(OidcError::BadSignature));
        // A `crit` header.
        let crit = jws(
            &json!({"alg": "RS256", "kid": "r1", "crit": ["exp"]}),
            &claims,
            rsa_sign(&RSA),
        );
        assert_eq!(verifier.verify(&crit).await, Err(OidcError::CriticalHeader));
    }

    #[tokio::test]
    async fn algorithm_outside_the_allow_list_is_refused() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1"), ec_jwk("e1")]).await;
        let verifier = issuer.verifier_with(|s| s.algorithms = vec![Algorithm::RS256]);
        let es = jws(
            &json!({"alg": "ES256", "kid": "e1"}),
            &issuer.claims(),
            ec_sign,
        );
        assert_eq!(
            verifier.verify(&es).await,
            Err(OidcError::AlgorithmNotAllowed)
        );
        // Refused before any fetch.
        assert_eq!(issuer.hits(), (0, 0));
        // The JWK's own `alg` binds the key: RS384 with an RS256 key is a mismatch.
        let verifier = issuer.verifier_with(|s| s.algorithms = vec![Algorithm::RS384]);
        let rs384 = jws(
            &json!({"alg": "RS384", "kid": "r1"}),
            &issuer.claims(),
            |_| vec![0; 256],
        );
        assert_eq!(
            verifier.verify(&rs384).await,
            Err(OidcError::AlgorithmKeyMismatch)
        );
    }

    #[tokio::test]
    async fn kid_is_required_with_several_keys() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = issuer.verifier();
        let claims = issuer.claims();
        let no_kid = jws(&json!({"alg": "RS256"}), &claims, rsa_sign(&RSA));
        assert!(verifier.verify(&no_kid).await.is_ok());

        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1"), rsa_jwk(&RSA_2, "r2")]).await;
        let verifier = issuer.verifier();
        let claims = issuer.claims();
        let no_kid = jws(&json!({"alg": "RS256"}), &claims, rsa_sign(&RSA));
        assert_eq!(verifier.verify(&no_kid).await, Err(OidcError::MissingKid));
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_at_most_once_per_interval() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = issuer.verifier();
        let claims = issuer.claims();
        verifier
            .verify(&issuer.rsa_token("r1", &claims))
            .await
            .unwrap();
        assert_eq!(issuer.hits(), (1, 1));

        // Rotation: r2 replaces r1. Within 30 s of the last fetch, r2 is not fetched for.
        issuer.rotate(vec![rsa_jwk(&RSA_2, "r2")]);
        let r2 = jws(
            &json!({"alg": "RS256", "kid": "r2"}),
            &claims,
            rsa_sign(&RSA_2),
        );
        assert_eq!(verifier.verify(&r2).await, Err(OidcError::UnknownKey));
        assert_eq!(issuer.hits(), (1, 1));

        // 30 s later: one refresh (the JWKS only; the discovered URL is remembered).
        age_cache(&verifier, Duration::from_secs(31), false);
        assert_eq!(verifier.verify(&r2).await.unwrap().subject, "user-1");
        assert_eq!(issuer.hits(), (1, 2));

        // Another unknown kid right after: no refetch, invalid.
        let r3 = jws(
            &json!({"alg": "RS256", "kid": "r3"}),
            &claims,
            rsa_sign(&RSA),
        );
        assert_eq!(verifier.verify(&r3).await, Err(OidcError::UnknownKey));
        assert_eq!(verifier.verify(&r3).await, Err(OidcError::UnknownKey));
        // And the retired key is gone.
        assert_eq!(
            verifier.verify(&issuer.rsa_token("r1", &claims)).await,
            Err(OidcError::UnknownKey)
        );
        assert_eq!(issuer.hits(), (1, 2));

        // Later still, a kid the issuer does not have: one refetch, still invalid.
        age_cache(&verifier, Duration::from_secs(31), false);
        assert_eq!(verifier.verify(&r3).await, Err(OidcError::UnknownKey));
        assert_eq!(issuer.hits(), (1, 3));
    }

    #[tokio::test]
    async fn concurrent_verifications_share_one_fetch() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = Arc::new(issuer.verifier());
        let token = issuer.rsa_token("r1", &issuer.claims());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (verifier, token) = (verifier.clone(), token.clone());
                tokio::spawn(async move { verifier.verify(&token).await })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
        assert_eq!(issuer.hits(), (1, 1));
    }

    #[tokio::test]
    async fn expired_cache_is_refreshed_and_kept_when_the_issuer_is_down() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        *issuer.cache_control.lock().unwrap() = Some("public, max-age=120".into());
        let verifier = issuer.verifier();
        let token = issuer.rsa_token("r1", &issuer.claims());
        verifier.verify(&token).await.unwrap();
        {
            // max-age=120, raised to the 5 min floor.
            let cache = verifier.cache();
            let ttl = cache.expires - cache.last_attempt.unwrap();
            assert_eq!(ttl, MIN_KEYS_TTL);
        }
        // Expired: refetched.
        age_cache(&verifier, Duration::from_secs(400), true);
        verifier.verify(&token).await.unwrap();
        assert_eq!(issuer.hits(), (1, 2));
        // Expired and the issuer down: the cached keys still verify (one failed attempt).
        *issuer.down.lock().unwrap() = true;
        age_cache(&verifier, Duration::from_secs(400), true);
        verifier.verify(&token).await.unwrap();
        verifier.verify(&token).await.unwrap();
        assert_eq!(verifier.cache().attempts, 3);
        // The failure forgot the discovered URL: the next attempt rediscovers.
        *issuer.down.lock().unwrap() = false;
        age_cache(&verifier, Duration::from_secs(31), false);
        verifier.verify(&token).await.unwrap();
        assert_eq!(issuer.hits(), (2, 3));
    }

    #[tokio::test]
    async fn issuer_down_without_keys_is_a_server_error() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        *issuer.down.lock().unwrap() = true;
        let verifier = issuer.verifier();
        let token = issuer.rsa_token("r1", &issuer.claims());
        let error = verifier.verify(&token).await.unwrap_err();
        assert!(matches!(error, OidcError::Unavailable(_)), "{error:?}");
        assert!(error.is_server_side());
        assert!(!error.to_string().contains(&token));

        // Nothing listening at all.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let mut settings = OidcSettings::new(url, AUD);
        settings.timeout = Duration::from_secs(2);
        let verifier = OidcVerifier::new(settings).unwrap();
        let error = verifier.verify(&token).await.unwrap_err();
        assert!(error.is_server_side(), "{error:?}");
    }

    #[tokio::test]
    async fn discovery_issuer_mismatch_is_refused() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        *issuer.discovery_issuer.lock().unwrap() = Some("https://evil.example".into());
        let verifier = issuer.verifier();
        let error = verifier
            .verify(&issuer.rsa_token("r1", &issuer.claims()))
            .await
            .unwrap_err();
        match error {
            OidcError::Unavailable(reason) => assert!(reason.contains("names issuer"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(issuer.hits(), (1, 0));
    }

    #[tokio::test]
    async fn configured_jwks_url_skips_discovery() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        // Discovery would fail: it is never asked.
        *issuer.discovery_issuer.lock().unwrap() = Some("https://evil.example".into());
        let jwks = format!("{}/jwks", issuer.url);
        let verifier = issuer.verifier_with(|s| s.jwks_url = Some(jwks));
        verifier
            .verify(&issuer.rsa_token("r1", &issuer.claims()))
            .await
            .unwrap();
        assert_eq!(issuer.hits(), (0, 1));
    }

    #[tokio::test]
    async fn tier_claim_is_read_by_path() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let mut claims = issuer.claims();
        claims["app_metadata"] = json!({"tier": "pro", "n": 3});
        claims["plan"] = json!("free");
        let token = issuer.rsa_token("r1", &claims);

        let nested = issuer.verifier_with(|s| s.tier_claim = Some("app_metadata.tier".into()));
        assert_eq!(
            nested.verify(&token).await.unwrap().tier.as_deref(),
            Some("pro")
        );
        let flat = issuer.verifier_with(|s| s.tier_claim = Some("plan".into()));
        assert_eq!(
            flat.verify(&token).await.unwrap().tier.as_deref(),
            Some("free")
        );
        let number = issuer.verifier_with(|s| s.tier_claim = Some("app_metadata.n".into()));
        assert_eq!(number.verify(&token).await.unwrap().tier, None);
        let absent = issuer.verifier_with(|s| s.tier_claim = Some("nope.tier".into()));
        assert_eq!(absent.verify(&token).await.unwrap().tier, None);
    }

    #[tokio::test]
    async fn malformed_tokens() {
        let issuer = Issuer::start(vec![rsa_jwk(&RSA, "r1")]).await;
        let verifier = issuer.verifier();
        for token in ["", "a.b", "a.b.c", "....", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(
                verifier.verify(token).await,
                Err(OidcError::Malformed),
                "{token:.20}"
            );
        }
        assert_eq!(issuer.hits(), (0, 0));
    }

    #[test]
    fn keys_fit_only_their_own_algorithms() {
        let key = |jwk: Value| VerifyKey::from_jwk(&serde_json::from_value(jwk).unwrap());
        let mut rsa = rsa_jwk(&RSA, "r");
        rsa.as_object_mut().unwrap().remove("alg");
        let rsa = key(rsa).unwrap();
        let ec = key(ec_jwk("e")).unwrap();
        let ed = key(ed_jwk("d")).unwrap();
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert!(!rsa.fits(alg) && !ec.fits(alg) && !ed.fits(alg), "{alg:?}");
        }
        assert!(rsa.fits(Algorithm::RS256) && rsa.fits(Algorithm::PS256));
        assert!(!rsa.fits(Algorithm::ES256) && !rsa.fits(Algorithm::EdDSA));
        assert!(ec.fits(Algorithm::ES256) && !ec.fits(Algorithm::ES384));
        assert!(ed.fits(Algorithm::EdDSA) && !ed.fits(Algorithm::ES256));
        // Symmetric keys, encryption keys and unknown algorithms are not keys for us.
        assert!(key(json!({"kty": "oct", "k": "c2VjcmV0"})).is_none());
        let mut enc = rsa_jwk(&RSA, "r");
        enc["use"] = json!("enc");
        assert!(key(enc).is_none());
        let mut oaep = rsa_jwk(&RSA, "r");
        oaep["alg"] = json!("RSA-OAEP");
        assert!(key(oaep).is_none());
    }

    #[test]
    fn user_id_hashes_issuer_nul_subject() {
        let identity = Identity {
            issuer: "https://accounts.example".into(),
            subject: "42".into(),
            tier: None,
            expires_at: 0,
        };
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(b"https://accounts.example\x0042"));
        assert_eq!(identity.user_id(), expected);
        assert_eq!(identity.user_id().len(), 43);
        let other = Identity {
            subject: "43".into(),
            ..identity.clone()
        };
        assert_ne!(identity.user_id(), other.user_id());
    }

    #[test]
    fn keys_ttl_is_bounded() {
        let ttl = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
            }
            keys_ttl(&headers)
        };
        assert_eq!(ttl(None), Duration::from_secs(3600));
        assert_eq!(ttl(Some("public, max-age=7200")), Duration::from_secs(7200));
        assert_eq!(ttl(Some("max-age=10")), Duration::from_secs(300));
        assert_eq!(ttl(Some("max-age=9999999")), Duration::from_secs(86400));
        assert_eq!(ttl(Some("no-store")), Duration::from_secs(300));
        assert_eq!(ttl(Some("max-age=abc")), Duration::from_secs(3600));
    }

    #[test]
    fn endpoints_must_be_https_except_loopback() {
        for ok in [
            "https://accounts.example",
            "http://127.0.0.1:8080/x",
            "http://[::1]:1/",
            "http://localhost/",
        ] {
            assert!(endpoint("k", ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://accounts.example",
            "http://10.0.0.1/",
            "ftp://x",
            "https://user:pw@accounts.example",
            "not a url",
        ] {
            assert!(endpoint("k", bad).is_err(), "{bad}");
        }
        let settings = OidcSettings::new("http://accounts.example", AUD);
        assert!(OidcVerifier::new(settings).is_err());
        let mut settings = OidcSettings::new("https://accounts.example", AUD);
        settings.tier_claim = Some("a..b".into());
        assert!(OidcVerifier::new(settings).is_err());
    }
}
