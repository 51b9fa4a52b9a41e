//! The request side of a metered call: its body read once, strictly, into the one request model
//! every check reads, and edited in place (see "Metered calls" in `docs/protocol.md`).
//!
//! An upstream that parses JSON differently from the proxy is a way past every check: a body
//! whose `"str\u0065am": true` the proxy misses streams anyway, a `max_tokens` of `"100000"` that
//! the proxy reads as absent is read as 100000 by a Python server's lax validation, a lone
//! surrogate that made the old budget parse give up sent the call through unreserved. So:
//!
//! - The body must be `application/json` (UTF-8) without `Content-Encoding`
//!   (`415 unsupported_media_type`), and is parsed once by the strict parser of
//!   [`crate::json`]: no BOM, no lone surrogate, no number out of range, nesting at most 64,
//!   no duplicate top-level key (`400 invalid_json`).
//! - Every member the proxy acts on must have the one type it can meter: `stream` a boolean,
//!   ceilings and `n` / `best_of` non-negative (positive) integers spelt as integers, `model` a
//!   string, `stream_options` an object (`400 invalid_parameter`). A top-level key that differs
//!   from one of those only in case (`"Stream"`, `"MAX_TOKENS"`) is refused too: Go's
//!   `encoding/json` (Ollama, among others) matches keys case-insensitively.
//! - Edits ([`crate::json::Edit`]) change one member and forward every other byte unchanged.
//!
//! The reservation bounds what the call can cost: the completion ceiling (the request's, after
//! the cap; else the cap; else `budget.default_reserve_tokens`) times the number of choices
//! (`max(n, best_of)`), plus the prompt estimated as one token per 4 bytes of body. Embeddings
//! and moderations cost their prompt; listing models costs nothing.

use bytes::Bytes;
use http::header::{self, HeaderMap};

use crate::config::BudgetConfig;
use crate::error::{Error, ErrorCode};
use crate::json::{self, Edit, Kind, Member, Mode, Object};

/// What an endpoint bills, by its path under `/openai/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// Generates: billed for its prompt and up to its ceiling per choice.
    Generation {
        /// The member that caps this endpoint's output, inserted when the cap applies and the
        /// request names none.
        cap_field: &'static str,
        /// The members this endpoint reads as its ceiling.
        ceilings: &'static [&'static str],
        /// Streams report usage only when asked (`stream_options.include_usage`).
        usage_on_request: bool,
    },
    /// Billed for its input only (embeddings, moderations).
    Prompt {
        /// Its answer carries `usage` (embeddings do, moderations do not).
        reports_usage: bool,
    },
    /// Costs nothing (listing and reading models).
    Free,
    /// `realtime/client_secrets`: a key for a WebRTC session whose responses the proxy never
    /// sees. Always read (even when nothing else is metered): its `expires_after` is capped to
    /// the session's remaining life, its `session.model` checked against the allow-list, its
    /// `session.max_output_tokens` capped. Billed by reservation only: its ceiling.
    ClientSecrets,
    /// An endpoint the proxy has no model of (allowed by the operator): billed like a
    /// generation with the default ceiling.
    Unknown,
}

impl Endpoint {
    /// The endpoint of `path` (the `{path}` of `/openai/{path}`).
    pub(crate) fn of(path: &str) -> Self {
        match path {
            "chat/completions" => Self::Generation {
                cap_field: "max_completion_tokens",
                ceilings: &["max_completion_tokens", "max_tokens"],
                usage_on_request: true,
            },
            "completions" => Self::Generation {
                cap_field: "max_tokens",
                ceilings: &["max_tokens"],
                usage_on_request: true,
            },
            "responses" => Self::Generation {
                cap_field: "max_output_tokens",
                ceilings: &["max_output_tokens"],
                usage_on_request: false,
            },
            "embeddings" => Self::Prompt {
                reports_usage: true,
            },
            "moderations" => Self::Prompt {
                reports_usage: false,
            },
            "models" => Self::Free,
            "realtime/client_secrets" => Self::ClientSecrets,
            _ if path.starts_with("models/") => Self::Free,
            _ => Self::Unknown,
        }
    }
}

impl Endpoint {
    /// Whether a successful answer carries `usage` (moderations do not; listing models costs
    /// nothing).
    pub(crate) fn reports_usage(self) -> bool {
        !matches!(
            self,
            Self::Free
                | Self::ClientSecrets
                | Self::Prompt {
                    reports_usage: false
                }
        )
    }

    /// The endpoint's label in metrics: one of a fixed set, whatever the path.
    pub(crate) fn label(self, path: &str) -> &'static str {
        match path {
            "chat/completions" => "chat/completions",
            "completions" => "completions",
            "responses" => "responses",
            "embeddings" => "embeddings",
            "moderations" => "moderations",
            "realtime/client_secrets" => "realtime/client_secrets",
            _ if self == Self::Free => "models",
            _ => "other",
        }
    }
}

/// Every member name that sets a completion ceiling, on any endpoint.
const CEILING_FIELDS: [&str; 3] = ["max_completion_tokens", "max_tokens", "max_output_tokens"];

/// The top-level members the proxy reads: a key that differs from one of these only in case is
/// refused, since a case-insensitive upstream would read it as this one.
const METERED_FIELDS: [&str; 8] = [
    "model",
    "stream",
    "stream_options",
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
    "n",
    "best_of",
];

/// A metered call, read and admitted for forwarding.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metered {
    /// The body to send upstream: the client's, edited in place when a cap or
    /// `include_usage` was applied.
    pub(crate) body: Bytes,
    /// `"stream": true`.
    pub(crate) streaming: bool,
    /// The proxy added `include_usage`: what it caused must be hidden from the client.
    pub(crate) hide_usage: bool,
    /// Tokens to reserve: the most this call can cost.
    pub(crate) reserve: u64,
}

/// The request policy: the model allow-list and the `[budget]` rules that read a body.
#[derive(Debug, Clone)]
pub(crate) struct RequestPolicy {
    pub(crate) allowed_models: Vec<String>,
    pub(crate) max_completion_tokens: u64,
    /// `[budget.tiers.NAME] max_completion_tokens`: the cap of a tier's sessions, instead of
    /// `max_completion_tokens` (0: none).
    pub(crate) tier_caps: Vec<(String, u64)>,
    pub(crate) default_reserve_tokens: u64,
    pub(crate) include_usage: bool,
}

impl RequestPolicy {
    pub(crate) fn new(allowed_models: Vec<String>, budget: &BudgetConfig) -> Self {
        Self {
            allowed_models,
            max_completion_tokens: budget.max_completion_tokens,
            tier_caps: budget
                .tiers
                .iter()
                .filter_map(|(name, tier)| Some((name.clone(), tier.max_completion_tokens?)))
                .collect(),
            default_reserve_tokens: budget.default_reserve_tokens,
            include_usage: budget.include_usage,
        }
    }

    /// The completion cap of a session of `tier`: its tier's, when the tier sets one, else
    /// `budget.max_completion_tokens` (0: none).
    fn cap(&self, tier: Option<&str>) -> u64 {
        tier.and_then(|tier| self.tier_caps.iter().find(|(name, _)| name == tier))
            .map_or(self.max_completion_tokens, |(_, cap)| *cap)
    }

    /// Checks the request head of a metered call before its body is read: `415` for a body
    /// that is not JSON or that is encoded. A request with no body to come (a `GET`) passes.
    pub(crate) fn check_head(
        &self,
        method: &http::Method,
        headers: &HeaderMap,
    ) -> Result<(), Error> {
        crate::body::refuse_encoded(headers, "a metered call's body")?;
        if reads_only(method, headers) || is_json(headers) {
            Ok(())
        } else {
            Err(not_json())
        }
    }

    /// Reads a metered call's body: the model allow-list, the stream flag, the ceiling and the
    /// choices, then the cap (of the session's `tier`) and `include_usage` as edits in place.
    /// `endpoint` is where it goes; `remaining_secs` the life left to the caller's session (for
    /// `realtime/client_secrets`).
    pub(crate) fn meter_for(
        &self,
        tier: Option<&str>,
        endpoint: Endpoint,
        method: &http::Method,
        headers: &HeaderMap,
        body: Bytes,
        remaining_secs: Option<u64>,
    ) -> Result<Metered, Error> {
        if body.is_empty() && reads_only(method, headers) {
            // Reading (a model, a list): nothing is generated without a body.
            return Ok(Metered {
                body,
                ..Metered::default()
            });
        }
        if !is_json(headers) {
            return Err(not_json());
        }
        let object = json::parse_object(&body, Mode::Strict).map_err(|e| {
            Error::new(
                ErrorCode::InvalidJson,
                format!("the request body is not JSON the proxy can meter: {e}"),
            )
        })?;
        let view = View::read(&body, &object)?;
        if endpoint == Endpoint::ClientSecrets {
            return self.client_secrets(self.cap(tier), body, &object, remaining_secs);
        }

        if !self.allowed_models.is_empty() {
            let allowed = view
                .model
                .as_deref()
                .is_some_and(|m| self.allowed_models.iter().any(|a| a == m));
            if !allowed {
                return Err(Error::new(
                    ErrorCode::ModelNotAllowed,
                    match view.model {
                        Some(m) => format!("the model {m:?} is not allowed"),
                        None => "the request must name an allowed model".into(),
                    },
                ));
            }
        }

        let prompt = (body.len() as u64).div_ceil(4);
        let mut edits = Vec::new();
        let mut hide_usage = false;
        let reserve = match endpoint {
            Endpoint::Free | Endpoint::ClientSecrets => 0,
            Endpoint::Prompt { .. } => prompt,
            Endpoint::Unknown => {
                let ceiling = view.max_ceiling(&CEILING_FIELDS)?;
                let ceiling = ceiling.unwrap_or(self.default_reserve_tokens);
                prompt.saturating_add(ceiling.saturating_mul(view.choices))
            }
            Endpoint::Generation {
                cap_field,
                ceilings,
                usage_on_request,
            } => {
                // Every ceiling-named member must be an integer, whichever endpoint reads it.
                view.max_ceiling(&CEILING_FIELDS)?;
                let mut ceiling = view.max_ceiling(ceilings)?;
                let cap = self.cap(tier);
                if cap > 0 {
                    let mut named = false;
                    for member in ceilings.iter().filter_map(|name| object.get(name)) {
                        named = true;
                        if integer(&body, member)?.is_none_or(|n| n > cap) {
                            edits.push(json::replace_value(
                                member,
                                itoa::Buffer::new().format(cap).as_bytes(),
                            ));
                        }
                    }
                    if !named {
                        edits.push(json::insert_member(
                            &object,
                            cap_field,
                            itoa::Buffer::new().format(cap).as_bytes(),
                        ));
                    }
                    ceiling = Some(ceiling.map_or(cap, |c| c.min(cap)));
                }
                if view.streaming && usage_on_request && self.include_usage {
                    hide_usage = include_usage(&body, &object, &mut edits)?;
                }
                let ceiling = ceiling.unwrap_or(self.default_reserve_tokens);
                prompt.saturating_add(ceiling.saturating_mul(view.choices))
            }
        };
        Ok(Metered {
            body: json::apply(&body, edits),
            streaming: view.streaming,
            hide_usage,
            reserve,
        })
    }
}

impl RequestPolicy {
    /// `realtime/client_secrets` (`docs/realtime.md`, "WebRTC"): the secret may not outlive the
    /// session that asks for it, nor name a model outside the allow-list, nor let responses
    /// exceed the cap; what it can cost is reserved now, since the proxy never sees the
    /// responses.
    fn client_secrets(
        &self,
        cap: u64,
        body: Bytes,
        object: &Object,
        remaining_secs: Option<u64>,
    ) -> Result<Metered, Error> {
        /// The shortest life the API accepts for a client secret.
        const MIN_SECS: u64 = 10;
        let mut edits = Vec::new();
        let Some(session) = object.get("session").filter(|m| m.kind == Kind::Object) else {
            return Err(invalid_parameter("a client secret needs a session object"));
        };
        let (start, slice, inner) = nested_object(&body, session, "session")?;
        let model = match inner.get("model") {
            None => None,
            Some(m) if m.kind == Kind::Null => None,
            Some(m) if m.kind == Kind::String => Some(json::string(slice, m)),
            Some(_) => return Err(invalid_parameter("session.model must be a string")),
        };
        if !self.allowed_models.is_empty()
            && !model
                .as_ref()
                .is_some_and(|m| self.allowed_models.contains(m))
        {
            return Err(Error::new(
                ErrorCode::ModelNotAllowed,
                match model {
                    Some(m) => format!("the model {m:?} is not allowed"),
                    None => "session.model must name an allowed model".into(),
                },
            ));
        }
        // The session's ceiling ("inf" is none), capped in place.
        let mut ceiling = None;
        let mut named = false;
        for name in REALTIME_CEILINGS {
            let Some(member) = inner.get(name) else {
                continue;
            };
            named = true;
            let value = match member.kind {
                Kind::String if json::string(slice, member) == "inf" => None,
                _ => integer(slice, member)?,
            };
            ceiling = ceiling.max(value);
            if cap > 0 && value.is_none_or(|n| n > cap) {
                edits.push(
                    json::replace_value(member, itoa::Buffer::new().format(cap).as_bytes())
                        .shifted(start),
                );
            }
        }
        if cap > 0 {
            if !named {
                edits.push(
                    json::insert_member(
                        &inner,
                        REALTIME_CEILINGS[0],
                        itoa::Buffer::new().format(cap).as_bytes(),
                    )
                    .shifted(start),
                );
            }
            ceiling = Some(ceiling.map_or(cap, |c| c.min(cap)));
        }
        // The secret's life, at most the session's.
        if let Some(remaining) = remaining_secs {
            if remaining < MIN_SECS {
                return Err(Error::new(
                    ErrorCode::TokenExpired,
                    "the session ends in less than 10 s: refresh it before asking for a client secret",
                ));
            }
            let seconds = itoa::Buffer::new().format(remaining).to_owned();
            match object.get("expires_after") {
                None => edits.push(json::insert_member(
                    object,
                    "expires_after",
                    format!(r#"{{"anchor":"created_at","seconds":{seconds}}}"#).as_bytes(),
                )),
                Some(m) if m.kind == Kind::Null => edits.push(json::replace_value(
                    m,
                    format!(r#"{{"anchor":"created_at","seconds":{seconds}}}"#).as_bytes(),
                )),
                Some(m) => {
                    let (start, slice, expires) = nested_object(&body, m, "expires_after")?;
                    match expires.get("anchor") {
                        None => {}
                        Some(a)
                            if a.kind == Kind::String && json::string(slice, a) == "created_at" => {
                        }
                        Some(_) => {
                            return Err(invalid_parameter(
                                "expires_after.anchor must be \"created_at\"",
                            ));
                        }
                    }
                    match expires.get("seconds") {
                        None => edits.push(
                            json::insert_member(&expires, "seconds", seconds.as_bytes())
                                .shifted(start),
                        ),
                        Some(member) => {
                            if integer(slice, member)?.is_none_or(|n| n > remaining) {
                                edits.push(
                                    json::replace_value(member, seconds.as_bytes()).shifted(start),
                                );
                            }
                        }
                    }
                }
            }
        }
        let prompt = (body.len() as u64).div_ceil(4);
        let reserve = prompt.saturating_add(ceiling.unwrap_or(self.default_reserve_tokens));
        Ok(Metered {
            body: json::apply(&body, edits),
            streaming: false,
            hide_usage: false,
            reserve,
        })
    }
}

/// The ceiling members of a Realtime session: the GA name, then the beta one.
const REALTIME_CEILINGS: [&str; 2] = ["max_output_tokens", "max_response_output_tokens"];

/// The object value of `member`, parsed strictly on its own ([`json::nested_object`]); a nested
/// key that differs from a metered one only in case is refused.
fn nested_object<'a>(
    body: &'a [u8],
    member: &Member,
    name: &str,
) -> Result<(usize, &'a [u8], Object), Error> {
    let (start, slice, inner) = json::nested_object(body, member)
        .ok_or_else(|| invalid_parameter(format!("{name} must be an object")))?;
    const NESTED: [&str; 5] = [
        "model",
        "seconds",
        "anchor",
        REALTIME_CEILINGS[0],
        REALTIME_CEILINGS[1],
    ];
    for m in &inner.members {
        if json::folds_to(&m.key, &NESTED).is_some() {
            return Err(invalid_parameter(format!(
                "the member {:?} of {name} differs from a metered one only in case",
                m.key
            )));
        }
    }
    Ok((start, slice, inner))
}

/// A `GET`, `HEAD` or `DELETE` that declares no body type: it reads, and has no body to meter
/// (one it sends anyway must still be JSON).
fn reads_only(method: &http::Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::DELETE
    ) && !headers.contains_key(header::CONTENT_TYPE)
}

fn not_json() -> Error {
    Error::new(
        ErrorCode::UnsupportedMediaType,
        "a metered call's body must be application/json (UTF-8), declared by one Content-Type",
    )
}

/// Whether the body is declared `application/json`, in UTF-8 when a charset is named, by one
/// `Content-Type`: with two, the upstream may read the body by the other.
fn is_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next().and_then(|v| v.to_str().ok()), values.next()) else {
        return false;
    };
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return false;
    }
    parts.all(|param| match param.split_once('=') {
        Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
            let value = value.trim().trim_matches('"');
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    })
}

/// The members of a request body the proxy acts on, each of the one type it can meter.
struct View<'a> {
    body: &'a [u8],
    object: &'a Object,
    model: Option<String>,
    streaming: bool,
    /// `max(n, best_of)`, at least 1.
    choices: u64,
}

impl<'a> View<'a> {
    fn read(body: &'a [u8], object: &'a Object) -> Result<Self, Error> {
        for member in &object.members {
            if let Some(field) = folds_to_metered(&member.key) {
                return Err(invalid_parameter(format!(
                    "the member {:?} differs from {field:?} only in case; send {field:?}",
                    member.key
                )));
            }
        }
        let model = match object.get("model") {
            None => None,
            Some(m) if m.kind == Kind::Null => None,
            Some(m) if m.kind == Kind::String => Some(json::string(body, m)),
            Some(_) => return Err(invalid_parameter("model must be a string")),
        };
        let streaming = boolean(body, object.get("stream"), "stream")?.unwrap_or(false);
        let mut choices = 1;
        for name in ["n", "best_of"] {
            if let Some(member) = object.get(name) {
                match integer(body, member)? {
                    None => {}
                    Some(0) => return Err(invalid_parameter(format!("{name} must be at least 1"))),
                    Some(n) => choices = choices.max(n),
                }
            }
        }
        Ok(Self {
            body,
            object,
            model,
            streaming,
            choices,
        })
    }

    /// The largest of the ceilings `names` the body sets (`null` sets none).
    fn max_ceiling(&self, names: &[&str]) -> Result<Option<u64>, Error> {
        let mut max = None;
        for member in names.iter().filter_map(|name| self.object.get(name)) {
            if let Some(n) = integer(self.body, member)? {
                max = Some(max.map_or(n, |m: u64| m.max(n)));
            }
        }
        Ok(max)
    }
}

/// Adds `stream_options.include_usage: true` unless the client asked for it; `true` when added.
fn include_usage(body: &[u8], object: &Object, edits: &mut Vec<Edit>) -> Result<bool, Error> {
    const OPTIONS: &[u8] = br#"{"include_usage":true}"#;
    let Some(options) = object.get("stream_options") else {
        edits.push(json::insert_member(object, "stream_options", OPTIONS));
        return Ok(true);
    };
    match options.kind {
        Kind::Null => {
            edits.push(json::replace_value(options, OPTIONS));
            Ok(true)
        }
        Kind::Object => {
            let start = options.value.start;
            let slice = body.get(options.value.clone()).unwrap_or_default();
            let inner = json::parse_object(slice, Mode::Strict)
                .map_err(|_| invalid_parameter("stream_options must be an object"))?;
            for member in &inner.members {
                if member.key != "include_usage" && member.key.eq_ignore_ascii_case("include_usage")
                {
                    return Err(invalid_parameter(format!(
                        "the member {:?} differs from \"include_usage\" only in case",
                        member.key
                    )));
                }
            }
            let asked = boolean(
                slice,
                inner.get("include_usage"),
                "stream_options.include_usage",
            )?;
            if asked == Some(true) {
                return Ok(false);
            }
            let edit = match inner.get("include_usage") {
                Some(member) => json::replace_value(member, b"true"),
                None => json::insert_member(&inner, "include_usage", b"true"),
            };
            edits.push(edit.shifted(start));
            Ok(true)
        }
        _ => Err(invalid_parameter("stream_options must be an object")),
    }
}

/// The metered field `key` differs from only in case (Go's `encoding/json` folding), if any.
fn folds_to_metered(key: &str) -> Option<&'static str> {
    json::folds_to(key, &METERED_FIELDS)
}

fn invalid_parameter(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorCode::InvalidParameter, message)
}

/// A boolean member: `true`, `false`, or `null` / absent (`None`); anything else is refused,
/// since a lax upstream reads `"true"`, `1` or `"yes"` as true.
fn boolean(body: &[u8], member: Option<&Member>, name: &str) -> Result<Option<bool>, Error> {
    let Some(member) = member else {
        return Ok(None);
    };
    match (member.kind, body.get(member.value.clone())) {
        (Kind::Null, _) => Ok(None),
        (Kind::Bool, Some(raw)) => Ok(Some(raw == b"true")),
        _ => Err(invalid_parameter(format!("{name} must be true or false"))),
    }
}

/// A non-negative integer member, spelt as one (`100`, not `100.0`, `1e2` or `"100"`, which lax
/// upstreams read as 100 too); `null` is `None`.
fn integer(body: &[u8], member: &Member) -> Result<Option<u64>, Error> {
    let refuse = || invalid_parameter(format!("{} must be a non-negative integer", member.key));
    match member.kind {
        Kind::Null => Ok(None),
        Kind::Number => {
            let raw = body.get(member.value.clone()).ok_or_else(refuse)?;
            if !raw.iter().all(u8::is_ascii_digit) {
                return Err(refuse());
            }
            std::str::from_utf8(raw)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .map(Some)
                .ok_or_else(refuse)
        }
        _ => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(cap: u64) -> RequestPolicy {
        RequestPolicy {
            allowed_models: Vec::new(),
            max_completion_tokens: cap,
            tier_caps: Vec::new(),
            default_reserve_tokens: 100,
            include_usage: true,
        }
    }

    #[test]
    fn a_tier_cap_replaces_the_default_for_that_tier_only() {
        let policy = RequestPolicy {
            tier_caps: vec![("pro".to_owned(), 500), ("unlimited".to_owned(), 0)],
            ..policy(64)
        };
        let body = r#"{"model":"m","max_tokens":1000,"messages":[]}"#;
        let capped = |tier: Option<&str>| {
            let metered = policy
                .meter_for(
                    tier,
                    Endpoint::of("chat/completions"),
                    &http::Method::POST,
                    &json_headers(),
                    Bytes::copy_from_slice(body.as_bytes()),
                    None,
                )
                .unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&metered.body).unwrap();
            sent["max_tokens"].as_u64().unwrap()
        };
        assert_eq!(capped(None), 64);
        assert_eq!(capped(Some("free")), 64, "a tier without a cap of its own");
        assert_eq!(capped(Some("pro")), 500);
        assert_eq!(capped(Some("unlimited")), 1000, "0: no cap for the tier");
        assert_eq!(meter(&policy, "chat/completions", body).unwrap().body, {
            let m = policy
                .meter_for(
                    None,
                    Endpoint::of("chat/completions"),
                    &http::Method::POST,
                    &json_headers(),
                    Bytes::copy_from_slice(body.as_bytes()),
                    None,
                )
                .unwrap();
            m.body
        });
    }

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h
    }

    fn meter(policy: &RequestPolicy, path: &str, body: &str) -> Result<Metered, Error> {
        policy.meter_for(
            None,
            Endpoint::of(path),
            &http::Method::POST,
            &json_headers(),
            Bytes::copy_from_slice(body.as_bytes()),
            None,
        )
    }

    fn secret(policy: &RequestPolicy, body: &str, remaining: u64) -> Result<Metered, Error> {
        policy.meter_for(
            None,
            Endpoint::ClientSecrets,
            &http::Method::POST,
            &json_headers(),
            Bytes::copy_from_slice(body.as_bytes()),
            Some(remaining),
        )
    }

    fn text(metered: Metered) -> String {
        String::from_utf8(metered.body.to_vec()).unwrap()
    }

    #[test]
    fn a_client_secret_lives_no_longer_than_the_session() {
        let p = policy(0);
        let body = r#"{"session": {"type": "realtime", "model": "gpt-realtime"}}"#;
        assert_eq!(
            text(secret(&p, body, 300).unwrap()),
            r#"{"session": {"type": "realtime", "model": "gpt-realtime"},"expires_after":{"anchor":"created_at","seconds":300}}"#
        );
        let body = r#"{"expires_after": {"anchor": "created_at", "seconds": 7200}, "session": {}}"#;
        assert_eq!(
            text(secret(&p, body, 300).unwrap()),
            r#"{"expires_after": {"anchor": "created_at", "seconds": 300}, "session": {}}"#
        );
        // A shorter life is kept as written.
        let body = r#"{"expires_after": {"seconds": 60}, "session": {}}"#;
        assert_eq!(text(secret(&p, body, 300).unwrap()), body);
        let body = r#"{"expires_after": {"anchor": "created_at"}, "session": {}}"#;
        assert_eq!(
            text(secret(&p, body, 300).unwrap()),
            r#"{"expires_after": {"anchor": "created_at","seconds":300}, "session": {}}"#
        );
        for bad in [
            r#"{"expires_after": {"seconds": "7200"}, "session": {}}"#,
            r#"{"expires_after": {"seconds": 1e9}, "session": {}}"#,
            r#"{"expires_after": {"anchor": "other", "seconds": 5}, "session": {}}"#,
            r#"{"expires_after": {"Seconds": 7200}, "session": {}}"#,
            r#"{"expires_after": 7200, "session": {}}"#,
            r#"{"expires_after": null}"#,
        ] {
            assert_eq!(
                code(secret(&p, bad, 300)),
                ErrorCode::InvalidParameter,
                "{bad}"
            );
        }
        assert_eq!(
            code(secret(&p, r#"{"session": {}}"#, 5)),
            ErrorCode::TokenExpired
        );
    }

    #[test]
    fn a_client_secret_keeps_to_the_allow_list_and_the_cap() {
        let mut p = policy(100);
        p.allowed_models = vec!["gpt-realtime".to_owned()];
        let body = r#"{"session": {"model": "gpt-realtime", "max_output_tokens": "inf"}, "expires_after": {"seconds": 60}}"#;
        let ok = secret(&p, body, 300).unwrap();
        // The cap, and the prompt estimate.
        assert_eq!(ok.reserve, 100 + (body.len() as u64).div_ceil(4));
        assert_eq!(
            text(ok),
            r#"{"session": {"model": "gpt-realtime", "max_output_tokens": 100}, "expires_after": {"seconds": 60}}"#
        );
        for (bad, expected) in [
            (
                r#"{"session": {"model": "gpt-5-pro"}}"#,
                ErrorCode::ModelNotAllowed,
            ),
            (r#"{"session": {}}"#, ErrorCode::ModelNotAllowed),
            (
                r#"{"session": {"Model": "gpt-5-pro", "model": "gpt-realtime"}}"#,
                ErrorCode::InvalidParameter,
            ),
            (r#"{"session": {"model": 1}}"#, ErrorCode::InvalidParameter),
            (r#"{"model": "gpt-realtime"}"#, ErrorCode::InvalidParameter),
        ] {
            assert_eq!(code(secret(&p, bad, 300)), expected, "{bad}");
        }
    }

    fn code(result: Result<Metered, Error>) -> ErrorCode {
        result
            .err()
            .map(|e| e.code())
            .unwrap_or(ErrorCode::RateLimited)
    }

    #[test]
    fn bodies_the_strict_parser_refuses_are_invalid_json() {
        let p = policy(0);
        for body in [
            "{\"model\":\"m\",\"messages\":[{\"content\":\"hi \\ud800\"}]}",
            "{\"model\":\"m\",\"temperature\":1e400}",
            "\u{feff}{\"model\":\"m\"}",
            "{\"model\":\"m\",\"model\":\"n\"}",
            "[\"m\"]",
            "",
            "{\"model\":\"m\"",
        ] {
            assert_eq!(
                code(meter(&p, "chat/completions", body)),
                ErrorCode::InvalidJson,
                "{body}"
            );
        }
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(70), "]".repeat(70));
        assert_eq!(
            code(meter(&p, "chat/completions", &deep)),
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn members_of_the_wrong_type_are_invalid_parameters() {
        let p = policy(0);
        for body in [
            r#"{"max_tokens":100000.0}"#,
            r#"{"max_tokens":"100000"}"#,
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":1e5}"#,
            r#"{"max_completion_tokens":true}"#,
            r#"{"max_tokens":18446744073709551616}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":1}"#,
            r#"{"n":0}"#,
            r#"{"n":"4"}"#,
            r#"{"best_of":2.0}"#,
            r#"{"stream":true,"stream_options":"yes"}"#,
            r#"{"stream":true,"stream_options":{"include_usage":"no"}}"#,
            r#"{"model":["m"]}"#,
            r#"{"Stream":true}"#,
            r#"{"MAX_TOKENS":100000}"#,
            "{\"\u{017f}tream\":true}",
            r#"{"stream":true,"stream_options":{"Include_Usage":false}}"#,
        ] {
            assert_eq!(
                code(meter(&p, "chat/completions", body)),
                ErrorCode::InvalidParameter,
                "{body}"
            );
        }
    }

    #[test]
    fn an_escaped_key_is_the_key() {
        let p = policy(0);
        let m = meter(&p, "chat/completions", r#"{"str\u0065am":true}"#).unwrap();
        assert!(m.streaming);
        assert!(m.hide_usage);
    }

    #[test]
    fn the_reservation_is_ceiling_times_choices_plus_prompt() {
        let p = policy(0);
        let body = r#"{"model":"m","max_tokens":50,"n":4}"#;
        let m = meter(&p, "chat/completions", body).unwrap();
        assert_eq!(m.reserve, (body.len() as u64).div_ceil(4) + 200);
        let body = r#"{"model":"m","max_tokens":50,"n":2,"best_of":5}"#;
        let m = meter(&p, "completions", body).unwrap();
        assert_eq!(m.reserve, (body.len() as u64).div_ceil(4) + 250);
        // No ceiling: the default.
        let body = r#"{"model":"m","n":3}"#;
        let m = meter(&p, "chat/completions", body).unwrap();
        assert_eq!(m.reserve, (body.len() as u64).div_ceil(4) + 300);
        // Embeddings: the prompt only.
        let body = r#"{"model":"e","input":"hello there"}"#;
        let m = meter(&p, "embeddings", body).unwrap();
        assert_eq!(m.reserve, (body.len() as u64).div_ceil(4));
        // A ceiling another endpoint reads does not lower this one's reservation.
        let body = r#"{"model":"m","max_output_tokens":1}"#;
        let m = meter(&p, "chat/completions", body).unwrap();
        assert_eq!(m.reserve, (body.len() as u64).div_ceil(4) + 100);
    }

    #[test]
    fn the_cap_edits_in_place() {
        let p = policy(64);
        let body = r#"{ "model" : "m",  "max_tokens" : 100000, "x": 12345678901234567890123 }"#;
        let m = meter(&p, "chat/completions", body).unwrap();
        assert_eq!(
            &m.body[..],
            br#"{ "model" : "m",  "max_tokens" : 64, "x": 12345678901234567890123 }"#
        );
        assert_eq!(m.reserve, (body.len() as u64).div_ceil(4) + 64);
        // None named: the endpoint's field is added, the rest untouched.
        let body = r#"{"b":1,"a":2,"max_output_tokens":9}"#;
        let m = meter(&p, "chat/completions", body).unwrap();
        assert_eq!(
            &m.body[..],
            br#"{"b":1,"a":2,"max_output_tokens":9,"max_completion_tokens":64}"#
        );
        // A smaller ceiling stays as sent.
        let body = r#"{"max_tokens":5}"#;
        let m = meter(&p, "completions", body).unwrap();
        assert_eq!(&m.body[..], body.as_bytes());
    }

    #[test]
    fn include_usage_is_inserted_in_place() {
        let p = policy(0);
        for (body, want) in [
            (
                r#"{"stream":true}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":null}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{ }}"#,
                r#"{"stream":true,"stream_options":{ "include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"continuous_usage_stats":true}}"#,
                r#"{"stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage": false}}"#,
                r#"{"stream":true,"stream_options":{"include_usage": true}}"#,
            ),
        ] {
            let m = meter(&p, "chat/completions", body).unwrap();
            assert_eq!(std::str::from_utf8(&m.body).unwrap(), want, "{body}");
            assert!(m.hide_usage, "{body}");
        }
        let asked = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        let m = meter(&p, "chat/completions", asked).unwrap();
        assert!(!m.hide_usage);
        assert_eq!(&m.body[..], asked.as_bytes());
        // The Responses API always reports usage: nothing to add.
        let m = meter(&p, "responses", r#"{"stream":true}"#).unwrap();
        assert!(!m.hide_usage);
    }

    #[test]
    fn the_head_of_a_metered_call_must_announce_plain_json() {
        let p = policy(0);
        let mut h = json_headers();
        assert!(p.check_head(&http::Method::POST, &h).is_ok());
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=UTF-8".parse().unwrap(),
        );
        assert!(p.check_head(&http::Method::POST, &h).is_ok());
        for ct in [
            "text/plain",
            "application/json; charset=utf-16",
            "multipart/form-data",
        ] {
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            let e = p.check_head(&http::Method::POST, &h).unwrap_err();
            assert_eq!(e.code(), ErrorCode::UnsupportedMediaType, "{ct}");
        }
        // Two types, in either order: the upstream might read the body by the other one.
        for second in ["text/plain", "application/json"] {
            let mut h = json_headers();
            h.append(header::CONTENT_TYPE, second.parse().unwrap());
            let e = p.check_head(&http::Method::POST, &h).unwrap_err();
            assert_eq!(e.code(), ErrorCode::UnsupportedMediaType, "{second}");
        }
        let mut h = json_headers();
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let e = p.check_head(&http::Method::POST, &h).unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnsupportedMediaType);
        assert!(p.check_head(&http::Method::GET, &HeaderMap::new()).is_ok());
        assert!(
            p.check_head(&http::Method::POST, &HeaderMap::new())
                .is_err()
        );
    }

    #[test]
    fn the_model_allow_list_reads_the_one_parse() {
        let mut p = policy(0);
        p.allowed_models = vec!["gpt-4o-mini".to_owned()];
        assert!(meter(&p, "chat/completions", r#"{"model":"gpt\u002d4o-mini"}"#).is_ok());
        for body in [r#"{"model":"gpt-4o"}"#, r#"{}"#, r#"{"model":null}"#] {
            assert_eq!(
                code(meter(&p, "chat/completions", body)),
                ErrorCode::ModelNotAllowed,
                "{body}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever life a client asks for its secret, in whatever spelling the strict parser
        /// accepts, the forwarded body asks for at most the session's remaining life, as any
        /// JSON reader sees it.
        #[test]
        fn a_client_secret_never_outlives_its_session(
            seconds in proptest::option::of(0u64..1_000_000),
            anchor in proptest::bool::ANY,
            spaced in proptest::bool::ANY,
            remaining in 10u64..100_000,
        ) {
            let mut expires = serde_json::Map::new();
            if anchor {
                expires.insert("anchor".into(), "created_at".into());
            }
            if let Some(seconds) = seconds {
                expires.insert("seconds".into(), seconds.into());
            }
            let body = serde_json::json!({"expires_after": expires,
                "session": {"type": "realtime", "model": "gpt-realtime"}});
            let body = if spaced {
                serde_json::to_string_pretty(&body).unwrap()
            } else {
                body.to_string()
            };
            let sent = secret(&policy(0), &body, remaining).unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
            let life = sent["expires_after"]["seconds"].as_u64().unwrap();
            proptest::prop_assert!(life <= remaining);
            proptest::prop_assert_eq!(life, seconds.map_or(remaining, |s| s.min(remaining)));
        }
    }

    mod byte_preservation {
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        use super::*;

        /// Arbitrary JSON values: unicode strings (escaped when serialized), big and small
        /// numbers, nesting.
        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::vec(("[a-z_]{1,8}", inner), 0..5)
                        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
                ]
            })
        }

        /// A request body: unmetered members (any names but the metered ones), spelt compact
        /// or pretty.
        fn body() -> impl Strategy<Value = (Map<String, Value>, bool)> {
            (
                prop::collection::vec(("x_[a-z]{1,8}", value()), 0..6),
                any::<bool>(),
            )
                .prop_map(|(m, pretty)| (m.into_iter().collect(), pretty))
        }

        fn spell(object: &Map<String, Value>, pretty: bool) -> String {
            let v = Value::Object(object.clone());
            if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            }
        }

        /// `before` and `after` differ in one place only: returns the two middles.
        fn middles<'a>(before: &'a str, after: &'a str) -> (&'a str, &'a str) {
            let prefix = before
                .bytes()
                .zip(after.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            let max_suffix = before.len().min(after.len()) - prefix;
            let suffix = before
                .bytes()
                .rev()
                .zip(after.bytes().rev())
                .take(max_suffix)
                .take_while(|(a, b)| a == b)
                .count();
            (
                &before[prefix..before.len() - suffix],
                &after[prefix..after.len() - suffix],
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Adding `include_usage` inserts exactly one member; every other byte stays.
            #[test]
            fn include_usage_changes_only_its_member((mut object, pretty) in body()) {
                object.insert("stream".to_owned(), Value::Bool(true));
                let sent = spell(&object, pretty);
                let m = meter(&policy(0), "chat/completions", &sent).unwrap();
                let got = std::str::from_utf8(&m.body).unwrap();
                let (removed, added) = middles(&sent, got);
                prop_assert_eq!(removed, "");
                prop_assert!(
                    added.ends_with(r#""stream_options":{"include_usage":true}"#),
                    "{}", added
                );
                prop_assert!(added.trim_start_matches(',').trim() == r#""stream_options":{"include_usage":true}"#, "{}", added);
            }

            /// Lowering a ceiling replaces exactly its value; every other byte stays.
            #[test]
            fn the_cap_changes_only_the_ceiling((mut object, pretty) in body(), ceiling in 65u64..u64::MAX) {
                object.insert("max_tokens".to_owned(), Value::from(ceiling));
                let sent = spell(&object, pretty);
                let m = meter(&policy(64), "chat/completions", &sent).unwrap();
                let got = std::str::from_utf8(&m.body).unwrap();
                let sep = if pretty { " " } else { "" };
                let expected = sent.replacen(
                    &format!("\"max_tokens\":{sep}{ceiling}"),
                    &format!("\"max_tokens\":{sep}64"),
                    1,
                );
                prop_assert_ne!(&expected, &sent);
                prop_assert_eq!(got, expected);
            }

            /// A cap with no ceiling in the body appends the endpoint's member.
            #[test]
            fn the_cap_appends_its_member((object, pretty) in body()) {
                let sent = spell(&object, pretty);
                let m = meter(&policy(64), "chat/completions", &sent).unwrap();
                let got = std::str::from_utf8(&m.body).unwrap();
                let (removed, added) = middles(&sent, got);
                prop_assert_eq!(removed, "");
                prop_assert!(
                    added.trim_start_matches(',').trim() == r#""max_completion_tokens":64"#,
                    "{}", added
                );
                let parsed: Value = serde_json::from_str(got).unwrap();
                prop_assert_eq!(&parsed["max_completion_tokens"], &Value::from(64));
            }
        }
    }
}
