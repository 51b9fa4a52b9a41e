//! [`ConfigBuilder`]: the file shape, one setter per key, and [`build`](ConfigBuilder::build),
//! which validates each section.

use serde::Deserialize;

use super::{
    Algorithm, BudgetConfig, BudgetScope, Config, ConfigError, CorsConfig, DpopMode, IpNet,
    MintConfig, OnUnavailable, PowConfig, RateLimitConfig, RealtimeConfig, Secret, ServerConfig,
    SessionConfig, SigningKeyConfig, StoreConfig, UpstreamConfig,
};

/// The configuration file shape, and a builder with one method per key.
///
/// Deserialize it from a file (TOML or JSON), change keys with the setters, apply the
/// environment variables of [`docs/protocol.md`][env] with [`ConfigBuilder::apply_env`], then
/// [`build`](Self::build).
///
/// [env]: https://github.com/perishable-rs/perishable/blob/main/docs/protocol.md#environment-variables-and-precedence
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[must_use]
pub struct ConfigBuilder {
    pub(super) upstream: UpstreamConfig,
    pub(super) session: SessionConfig,
    pub(super) rate_limit: RateLimitConfig,
    pub(super) pow: PowConfig,
    pub(super) cors: CorsConfig,
    pub(super) server: ServerConfig,
    pub(super) budget: BudgetConfig,
    pub(super) store: StoreConfig,
    pub(super) mint: MintConfig,
    pub(super) realtime: RealtimeConfig,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident => $section:ident . $field:ident : $ty:ty $(=> $conv:expr)?;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$section.$field = setters!(@conv value $(, $conv)?);
                self
            }
        )*
    };
    (@conv $v:ident) => { $v };
    (@conv $v:ident, $conv:expr) => { ($conv)($v) };
}

impl ConfigBuilder {
    setters! {
        /// `upstream.base_url`.
        upstream_base_url => upstream.base_url: impl Into<String> => Into::into;
        /// `upstream.api_key`.
        upstream_api_key => upstream.api_key: impl Into<Secret> => |v: _| Some(Into::into(v));
        /// `upstream.max_body_bytes`.
        upstream_max_body_bytes => upstream.max_body_bytes: usize;
        /// `upstream.connect_timeout_ms`.
        upstream_connect_timeout_ms => upstream.connect_timeout_ms: u64;
        /// `upstream.first_byte_timeout_ms`.
        upstream_first_byte_timeout_ms => upstream.first_byte_timeout_ms: u64;
        /// `upstream.idle_timeout_ms`.
        upstream_idle_timeout_ms => upstream.idle_timeout_ms: u64;
        /// `session.ttl_secs`.
        session_ttl_secs => session.ttl_secs: u64;
        /// `session.max_lifetime_secs`.
        session_max_lifetime_secs => session.max_lifetime_secs: u64;
        /// `session.jwt_secret`: the HS256 signing secret, at least 32 bytes.
        session_jwt_secret => session.jwt_secret: impl Into<Secret> => |v: _| Some(Into::into(v));
        /// `session.algorithm`.
        session_algorithm => session.algorithm: Algorithm;
        /// `session.issuer`.
        session_issuer => session.issuer: impl Into<String> => Into::into;
        /// `session.audience`.
        session_audience => session.audience: impl Into<String> => Into::into;
        /// `session.bind_user_agent`.
        session_bind_user_agent => session.bind_user_agent: bool;
        /// `session.min_entropy_score` (0 to 100; 0 switches the gate off).
        session_min_entropy_score => session.min_entropy_score: u8;
        /// `session.max_per_fingerprint`.
        session_max_per_fingerprint => session.max_per_fingerprint: u32;
        /// `session.dpop`.
        session_dpop => session.dpop: DpopMode;
        /// `session.dpop_max_age_secs`.
        session_dpop_max_age_secs => session.dpop_max_age_secs: u64;
        /// `session.leeway_secs`.
        session_leeway_secs => session.leeway_secs: u64;
        /// `session.verified_cache_size` (0: no cache of verified tokens).
        session_verified_cache_size => session.verified_cache_size: usize;
        /// `rate_limit.points`.
        rate_limit_points => rate_limit.points: u32;
        /// `rate_limit.duration_secs`.
        rate_limit_duration_secs => rate_limit.duration_secs: u64;
        /// `rate_limit.block_duration_secs`.
        rate_limit_block_duration_secs => rate_limit.block_duration_secs: u64;
        /// `rate_limit.mint_per_ip`.
        rate_limit_mint_per_ip => rate_limit.mint_per_ip: u32;
        /// `pow.difficulty` (leading zero bits; 0 switches proof of work off).
        pow_difficulty => pow.difficulty: u8;
        /// `pow.challenge_ttl_secs`.
        pow_challenge_ttl_secs => pow.challenge_ttl_secs: u64;
        /// `server.public_url`.
        server_public_url => server.public_url: impl Into<String> => |v: _| Some(Into::into(v));
        /// `budget.tokens_per_window`.
        budget_tokens_per_window => budget.tokens_per_window: u64;
        /// `budget.window_secs`.
        budget_window_secs => budget.window_secs: u64;
        /// `budget.max_completion_tokens`.
        budget_max_completion_tokens => budget.max_completion_tokens: u64;
        /// `budget.include_usage`.
        budget_include_usage => budget.include_usage: bool;
        /// `budget.max_concurrent_streams`.
        budget_max_concurrent_streams => budget.max_concurrent_streams: u32;
        /// `budget.scope`.
        budget_scope => budget.scope: BudgetScope;
        /// `budget.default_reserve_tokens`.
        budget_default_reserve_tokens => budget.default_reserve_tokens: u64;
        /// `budget.per_ip_tokens_per_window` (0: no per-IP budget).
        budget_per_ip_tokens_per_window => budget.per_ip_tokens_per_window: u64;
        /// `budget.global_tokens_per_window` (0: no global budget).
        budget_global_tokens_per_window => budget.global_tokens_per_window: u64;
        /// `server.body_timeout_ms`.
        server_body_timeout_ms => server.body_timeout_ms: u64;
        /// `store.url`.
        store_url => store.url: impl Into<String> => Into::into;
        /// `store.on_unavailable`.
        store_on_unavailable => store.on_unavailable: OnUnavailable;
        /// `store.key_prefix`.
        store_key_prefix => store.key_prefix: impl Into<String> => Into::into;
        /// `store.timeout_ms`.
        store_timeout_ms => store.timeout_ms: u64;
        /// `realtime.enabled`: serve `GET /openai/realtime` (`docs/realtime.md`).
        realtime_enabled => realtime.enabled: bool;
        /// `realtime.max_connections_per_session` (at least 1).
        realtime_max_connections_per_session => realtime.max_connections_per_session: u32;
        /// `realtime.max_duration_secs` (at least 1).
        realtime_max_duration_secs => realtime.max_duration_secs: u64;
    }

    /// `upstream.allowed_paths`.
    pub fn upstream_allowed_paths<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        paths: I,
    ) -> Self {
        self.upstream.allowed_paths = paths.into_iter().map(Into::into).collect();
        self
    }

    /// `upstream.allowed_models` (empty: any model).
    pub fn upstream_allowed_models<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        models: I,
    ) -> Self {
        self.upstream.allowed_models = models.into_iter().map(Into::into).collect();
        self
    }

    /// Appends a `[[session.keys]]` entry: an HS256 secret with its `kid`.
    pub fn session_hmac_key(mut self, kid: impl Into<String>, secret: impl Into<Secret>) -> Self {
        self.session.keys.push(SigningKeyConfig {
            kid: kid.into(),
            secret: Some(secret.into()),
            private_key_pem: None,
        });
        self
    }

    /// Appends a `[[session.keys]]` entry: an Ed25519 PKCS#8 PEM private key with its `kid`.
    pub fn session_ed25519_key(
        mut self,
        kid: impl Into<String>,
        private_key_pem: impl Into<Secret>,
    ) -> Self {
        self.session.keys.push(SigningKeyConfig {
            kid: kid.into(),
            secret: None,
            private_key_pem: Some(private_key_pem.into()),
        });
        self
    }

    /// `mint.policies`: alternatives, each a set of gates that must all pass.
    pub fn mint_policies<P, G, S>(mut self, policies: P) -> Self
    where
        P: IntoIterator<Item = G>,
        G: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.mint.policies = policies
            .into_iter()
            .map(|gates| gates.into_iter().map(Into::into).collect())
            .collect();
        self
    }

    /// `mint.captcha.provider`: `"turnstile"`, `"hcaptcha"` or `"recaptcha"`.
    pub fn mint_captcha_provider(mut self, provider: impl Into<String>) -> Self {
        self.mint.captcha.provider = provider.into();
        self
    }

    /// `mint.captcha.secret` (better: `PERISHABLE_CAPTCHA_SECRET`).
    pub fn mint_captcha_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.mint.captcha.secret = Some(secret.into());
        self
    }

    /// `mint.captcha.verify_url`: the siteverify URL (default: the provider's).
    pub fn mint_captcha_verify_url(mut self, url: impl Into<String>) -> Self {
        self.mint.captcha.verify_url = url.into();
        self
    }

    /// `mint.captcha.hostnames`: the hostnames a captcha may be solved on (empty: any).
    pub fn mint_captcha_hostnames<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        hostnames: I,
    ) -> Self {
        self.mint.captcha.hostnames = hostnames.into_iter().map(Into::into).collect();
        self
    }

    /// `mint.captcha.min_score`: the lowest reCAPTCHA v3 score accepted.
    pub fn mint_captcha_min_score(mut self, score: f64) -> Self {
        self.mint.captcha.min_score = Some(score);
        self
    }

    /// `mint.oidc.issuer`: the ID tokens' `iss`; the JWKS is discovered from it.
    pub fn mint_oidc_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.mint.oidc.issuer = issuer.into();
        self
    }

    /// `mint.oidc.jwks_url`: the issuer's keys, skipping discovery.
    pub fn mint_oidc_jwks_url(mut self, url: impl Into<String>) -> Self {
        self.mint.oidc.jwks_url = url.into();
        self
    }

    /// `mint.oidc.audience`: the `aud` ID tokens must name (the app's client id).
    pub fn mint_oidc_audience(mut self, audience: impl Into<String>) -> Self {
        self.mint.oidc.audience = audience.into();
        self
    }

    /// `mint.oidc.algorithms`: the signature algorithms accepted (default RS256, ES256, EdDSA).
    pub fn mint_oidc_algorithms<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        algorithms: I,
    ) -> Self {
        self.mint.oidc.algorithms = algorithms.into_iter().map(Into::into).collect();
        self
    }

    /// `mint.oidc.tier_claim`: the claim (a dot-separated path) naming the user's tier.
    pub fn mint_oidc_tier_claim(mut self, claim: impl Into<String>) -> Self {
        self.mint.oidc.tier_claim = claim.into();
        self
    }

    /// `mint.app_attest.app_ids`: the App IDs (`TEAMID.bundle.id`) whose App Attest keys are
    /// accepted.
    pub fn mint_app_attest_app_ids<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        app_ids: I,
    ) -> Self {
        self.mint.app_attest.app_ids = app_ids.into_iter().map(Into::into).collect();
        self
    }

    /// `mint.app_attest.development`: accept keys from Apple's development environment too.
    pub fn mint_app_attest_development(mut self, development: bool) -> Self {
        self.mint.app_attest.development = development;
        self
    }

    /// `mint.app_attest.root_ca_pem`: the trust root(s) of attestations, PEM (default: Apple's
    /// App Attestation Root CA). For tests; production keeps Apple's.
    pub fn mint_app_attest_root_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.mint.app_attest.root_ca_pem = pem.into();
        self
    }

    /// `mint.app_attest.key_retention_secs`: how long a registered key is remembered after its
    /// latest mint (default 365 days).
    pub fn mint_app_attest_key_retention_secs(mut self, secs: u64) -> Self {
        self.mint.app_attest.key_retention_secs = secs;
        self
    }

    /// `mint.play_integrity.package_names`: the Android packages whose verdicts are accepted.
    pub fn mint_play_integrity_package_names<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        names: I,
    ) -> Self {
        self.mint.play_integrity.package_names = names.into_iter().map(Into::into).collect();
        self
    }

    /// `mint.play_integrity.decryption_key`: the base64 AES key from the Play Console.
    pub fn mint_play_integrity_decryption_key(mut self, key: impl Into<Secret>) -> Self {
        self.mint.play_integrity.decryption_key = Some(key.into());
        self
    }

    /// `mint.play_integrity.verification_key`: the base64 DER public key from the Play Console.
    pub fn mint_play_integrity_verification_key(mut self, key: impl Into<Secret>) -> Self {
        self.mint.play_integrity.verification_key = Some(key.into());
        self
    }

    /// `mint.play_integrity.certificate_sha256`: the app signing certificates accepted (empty:
    /// any).
    pub fn mint_play_integrity_certificate_sha256<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        digests: I,
    ) -> Self {
        self.mint.play_integrity.certificate_sha256 = digests.into_iter().map(Into::into).collect();
        self
    }

    /// `mint.play_integrity.device_verdict`: the device label required (default
    /// `MEETS_DEVICE_INTEGRITY`).
    pub fn mint_play_integrity_device_verdict(mut self, verdict: impl Into<String>) -> Self {
        self.mint.play_integrity.device_verdict = verdict.into();
        self
    }

    /// `budget.tiers.NAME.tokens_per_window`: the budget of users of tier `name`.
    pub fn budget_tier_tokens_per_window(mut self, name: impl Into<String>, tokens: u64) -> Self {
        self.budget
            .tiers
            .entry(name.into())
            .or_default()
            .tokens_per_window = Some(tokens);
        self
    }

    /// `budget.tiers.NAME.points`: the rate limit (requests per `rate_limit.duration_secs`) of
    /// users of tier `name`.
    pub fn budget_tier_points(mut self, name: impl Into<String>, points: u32) -> Self {
        self.budget.tiers.entry(name.into()).or_default().points = Some(points);
        self
    }

    /// `budget.tiers.NAME.max_completion_tokens`: the completion cap of users of tier `name`
    /// (0: none). Refused by [`build`](Self::build) in this version, which does not apply it
    /// per tier yet.
    pub fn budget_tier_max_completion_tokens(mut self, name: impl Into<String>, cap: u64) -> Self {
        self.budget
            .tiers
            .entry(name.into())
            .or_default()
            .max_completion_tokens = Some(cap);
        self
    }

    /// `upstream.forward_headers`: extra client headers to forward upstream.
    pub fn upstream_forward_headers<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        names: I,
    ) -> Self {
        self.upstream.forward_headers = names.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one `upstream.headers` entry: a static header sent upstream on every call.
    pub fn upstream_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.upstream.headers.insert(name.into(), value.into());
        self
    }

    /// `cors.allowed_origins`.
    pub fn cors_allowed_origins<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        origins: I,
    ) -> Self {
        self.cors.allowed_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// `server.trusted_proxies`.
    pub fn server_trusted_proxies<I: IntoIterator<Item = IpNet>>(mut self, cidrs: I) -> Self {
        self.server.trusted_proxies = cidrs.into_iter().collect();
        self
    }

    /// Applies the protocol environment variables: `OPENAI_API_KEY`, `OPENAI_BASE_URL`,
    /// `PERISHABLE_JWT_SECRET`, `PERISHABLE_STORE_URL`, `PERISHABLE_CAPTCHA_SECRET` (`PORT`
    /// belongs to the server, not here).
    ///
    /// Empty values are ignored. `lookup` is usually `|k| std::env::var(k).ok()`.
    pub fn apply_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        if let Some(v) = get("OPENAI_API_KEY") {
            self.upstream.api_key = Some(Secret(v));
        }
        if let Some(v) = get("OPENAI_BASE_URL") {
            self.upstream.base_url = v;
        }
        if let Some(v) = get("PERISHABLE_JWT_SECRET") {
            self.session.jwt_secret = Some(Secret(v));
        }
        if let Some(v) = get("PERISHABLE_CAPTCHA_SECRET") {
            self.mint.captcha.secret = Some(Secret(v));
        }
        if let Some(v) = get("PERISHABLE_STORE_URL") {
            self.store.url = v;
        }
        self
    }

    /// Whether an upstream API key is set.
    pub fn has_upstream_api_key(&self) -> bool {
        self.upstream
            .api_key
            .as_ref()
            .is_some_and(|k| !k.0.is_empty())
    }

    /// Whether `upstream.base_url` is something other than the default (OpenAI's). Setting it
    /// to OpenAI's URL is not told apart from leaving it out.
    pub fn has_upstream_base_url(&self) -> bool {
        self.upstream.base_url != UpstreamConfig::default().base_url
    }

    /// `session.jwt_secret`: the old name of [`session_jwt_secret`](Self::session_jwt_secret).
    #[deprecated(
        since = "0.2.0",
        note = "use `session_jwt_secret`, named like every other setter"
    )]
    pub fn jwt_secret(self, secret: impl Into<Secret>) -> Self {
        self.session_jwt_secret(secret)
    }

    /// Whether `cors.allowed_origins` lists any origin so far.
    pub fn has_cors_allowed_origins(&self) -> bool {
        !self.cors.allowed_origins.is_empty()
    }

    /// Whether `server.public_url` is set so far.
    pub fn has_server_public_url(&self) -> bool {
        self.server.public_url.is_some()
    }

    /// `cors.allowed_origins` as set so far.
    #[deprecated(since = "0.2.0", note = "use `has_cors_allowed_origins`")]
    pub fn allowed_origins(&self) -> &[String] {
        &self.cors.allowed_origins
    }

    /// `server.public_url` as set so far.
    #[deprecated(since = "0.2.0", note = "use `has_server_public_url`")]
    pub fn public_url(&self) -> Option<&str> {
        self.server.public_url.as_deref()
    }

    /// Validates every key, section by section, and builds the [`Config`].
    pub fn build(mut self) -> Result<Config, ConfigError> {
        let gates = self.mint.validate()?;
        if !gates.pow {
            self.pow.difficulty = 0;
        }
        if !gates.entropy {
            self.session.min_entropy_score = 0;
        }
        self.realtime.validate()?;
        let base_url = self.upstream.validate()?;
        self.session.validate()?;
        self.rate_limit.validate()?;
        self.pow.validate()?;
        self.cors.validate()?;
        let public_origin = self.server.validate()?;
        self.budget.validate()?;
        self.store.validate()?;
        Ok(Config {
            base_url,
            public_origin,
            inner: self,
        })
    }
}

impl ConfigBuilder {
    /// Parses the protocol file shape in TOML, without validating it yet.
    ///
    /// An error names the line and column and the dotted key, never the text of the file: the
    /// line at fault may hold a secret.
    #[cfg(feature = "toml")]
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        let at = |e: &toml::de::Error| e.span().map(|span| line_column(toml, span.start));
        let document = toml::Deserializer::parse(toml).map_err(|mut e| {
            let at = at(&e);
            e.set_input(None);
            parse_error(at, None, &e.to_string())
        })?;
        serde_path_to_error::deserialize(document).map_err(|e| {
            let key = e.path().to_string();
            let mut e = e.into_inner();
            let at = at(&e);
            e.set_input(None);
            parse_error(at, Some(key), e.message())
        })
    }

    /// Parses the protocol file shape in JSON, without validating it yet. An error names the
    /// line and column and the dotted key, never a string of the file.
    pub fn from_json_str(json: &str) -> Result<Self, ConfigError> {
        let mut document = serde_json::Deserializer::from_str(json);
        let json_error = |e: serde_json::Error, key: Option<String>| {
            let at = (e.line() > 0).then(|| (e.line(), e.column()));
            let message = e.to_string();
            // serde_json appends the position, which is given first instead.
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(message, _)| message);
            parse_error(at, key.filter(|_| !e.is_syntax()), message)
        };
        let parsed: Self = serde_path_to_error::deserialize(&mut document).map_err(|e| {
            let key = e.path().to_string();
            json_error(e.into_inner(), Some(key))
        })?;
        // Nothing after the object: a file that goes on is not the file that was meant.
        document.end().map_err(|e| json_error(e, None))?;
        Ok(parsed)
    }

    /// Reads a configuration file: JSON when its name ends in `.json` or its text starts with
    /// `{` (which no TOML document can), TOML otherwise.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{') {
            return Self::from_json_str(&text);
        }
        #[cfg(feature = "toml")]
        {
            Self::from_toml_str(&text)
        }
        #[cfg(not(feature = "toml"))]
        {
            Err(ConfigError::Parse(
                "TOML files need the `toml` feature of perishable-core".to_owned(),
            ))
        }
    }
}

/// The 1-based line and column of byte `offset` of `text`.
#[cfg(feature = "toml")]
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// A parse error: where, which key (`.` is the document itself), and what, with every string
/// value taken out of the message (serde quotes the value it did not expect, and that value can
/// be a secret on the wrong line).
fn parse_error(at: Option<(usize, usize)>, key: Option<String>, message: &str) -> ConfigError {
    let mut out = String::new();
    if let Some((line, column)) = at {
        out.push_str(&format!("line {line}, column {column}: "));
    }
    if let Some(key) = key.filter(|key| key != ".") {
        out.push_str(&format!("{key}: "));
    }
    out.push_str(redact_values(message.trim()).trim_end_matches('\n'));
    ConfigError::Parse(out)
}

/// `message` with every value serde quotes taken out: `string "..."`, ``integer `...` ``,
/// ``floating point `...` ``, ``character `...` `` and ``unknown variant `...` `` become
/// `a string`, `an integer`, `a number`, `a character` and `unknown variant`. Key names (in
/// ``unknown field `...` ``) stay: they are what the reader must fix.
fn redact_values(message: &str) -> String {
    const QUOTED: [(&str, char, &str); 5] = [
        ("string \"", '"', "a string"),
        ("integer `", '`', "an integer"),
        ("floating point `", '`', "a number"),
        ("character `", '`', "a character"),
        ("unknown variant `", '`', "unknown variant"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some((start, (opening, closing, replacement))) = QUOTED
        .iter()
        .filter_map(|q| rest.find(q.0).map(|at| (at, q)))
        .min_by_key(|(at, _)| *at)
    {
        out.push_str(&rest[..start]);
        out.push_str(replacement);
        let quoted = &rest[start + opening.len()..];
        // The closing quote: the first one no backslash escapes.
        let mut escaped = false;
        let end = quoted.char_indices().find_map(|(i, c)| match c {
            _ if escaped => {
                escaped = false;
                None
            }
            '\\' => {
                escaped = true;
                None
            }
            c if c == *closing => Some(i + 1),
            _ => None,
        });
        rest = &quoted[end.unwrap_or(quoted.len())..];
    }
    out.push_str(rest);
    out
}
