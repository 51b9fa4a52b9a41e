//! Token budgets, the completion-token cap, and the concurrent-stream cap.
//!
//! Rate limits count requests, but the bill counts tokens. With `budget.tokens_per_window` set,
//! each client (its DPoP key when bound, else its fingerprint; or each session, with
//! `budget.scope = "session"`) may spend that many tokens per fixed window of
//! `budget.window_secs`:
//!
//! 1. **Reserve** before forwarding. The request's token ceiling is reserved atomically in the
//!    [`Store`]: its prompt (estimated at one token per 4 bytes of body) plus its completion
//!    ceiling (`max_completion_tokens` / `max_tokens` / `max_output_tokens` after the cap below,
//!    else `budget.default_reserve_tokens`).
//!    - A client whose window is spent (tokens used and reserved at or over the limit) gets
//!      `429 budget_exhausted` with `Retry-After` (the end of the window), before anything
//!      reaches the upstream.
//!    - Reservations count at once, so concurrent requests cannot all slip under the limit. At
//!      most one request's usage can go past it.
//! 2. **Settle** against the real usage when the response ends: the proxy reads `usage` from
//!    the response as it streams past ([`crate::upstream`]'s usage tap).
//!    - A stream cut before its usage arrives is charged the whole reservation.
//!    - An upstream error (no usage, status 400 and up), or no answer at all, is refunded.
//!
//! Streamed chat completions only report usage when asked. With `budget.include_usage` (the
//! default), the proxy adds `stream_options.include_usage` to streamed chat and text completions
//! that lack it. It then removes the extra usage chunk (and the `"usage":null` members) before
//! they reach the client, which gets the same bytes it would have got without it.
//!
//! `budget.max_completion_tokens` caps each request's output. A larger `max_completion_tokens` /
//! `max_tokens` / `max_output_tokens` is lowered to the cap, and a request without one gets one
//! (`max_completion_tokens` for chat completions, `max_tokens` for completions,
//! `max_output_tokens` for responses).
//!
//! `budget.max_concurrent_streams` caps the streamed responses one session may have open at once
//! (`429 rate_limited`). The slot is freed when the stream ends or the client goes away.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::config::{BudgetConfig, BudgetScope, OnUnavailable};
use crate::error::{Error, ErrorCode, RateLimitInfo};
use crate::store::{Reservation, Store, log_failure};
use crate::upstream::Usage;
use crate::verify::VerifiedSession;

/// What the proxy learnt from (and did to) a request body.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inspected {
    /// The body to send upstream (rewritten when a cap or `include_usage` was applied).
    pub(crate) body: Bytes,
    /// `"stream": true`.
    pub(crate) streaming: bool,
    /// The proxy added `include_usage`: the usage chunk must be hidden from the client.
    pub(crate) hide_usage: bool,
    /// The completion ceiling after the cap, if the body names one.
    pub(crate) ceiling: Option<u64>,
    /// Whether the body parsed as a JSON object.
    pub(crate) json: bool,
}

/// The field that caps output tokens, per endpoint.
fn cap_field(path: &str) -> Option<&'static str> {
    match path {
        "chat/completions" => Some("max_completion_tokens"),
        "completions" => Some("max_tokens"),
        "responses" => Some("max_output_tokens"),
        _ => None,
    }
}

const CEILING_FIELDS: [&str; 3] = ["max_completion_tokens", "max_tokens", "max_output_tokens"];

/// Budget, cap and stream-cap policy, over the shared [`Store`].
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    config: BudgetConfig,
    fail_open: bool,
}

/// What [`Budget::admit`] took, to give back or settle when the response ends.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    /// (budget key, window, tokens reserved).
    reservation: Option<(String, u64, u64)>,
    /// The session whose stream slot was taken.
    stream: Option<String>,
}

impl Budget {
    /// The `[budget]` policy, keeping its state in `store`.
    pub fn new(config: BudgetConfig, store: Arc<dyn Store>, on_unavailable: OnUnavailable) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                fail_open: on_unavailable == OnUnavailable::Open,
            }),
        }
    }

    /// Whether the body of a request to `path` must be parsed: a budget or cap applies, or a
    /// stream may need `include_usage`.
    pub(crate) fn wants_body(&self, path: &str, mentions_stream: bool) -> bool {
        let c = &self.inner.config;
        cap_field(path).is_some()
            && (c.tokens_per_window > 0
                || c.max_completion_tokens > 0
                || (mentions_stream && (c.include_usage || c.max_concurrent_streams > 0)))
    }

    /// Parses a JSON body and applies the completion cap and `include_usage`.
    pub(crate) fn inspect(&self, path: &str, body: Bytes) -> Inspected {
        let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(&body) else {
            return Inspected {
                body,
                ..Inspected::default()
            };
        };
        let c = &self.inner.config;
        let streaming = object.get("stream").and_then(Value::as_bool) == Some(true);
        let mut changed = false;

        if c.max_completion_tokens > 0
            && let Some(field) = cap_field(path)
        {
            let mut present = false;
            for name in CEILING_FIELDS {
                if let Some(v) = object.get_mut(name) {
                    present = true;
                    if v.as_u64().is_none_or(|n| n > c.max_completion_tokens) {
                        *v = Value::from(c.max_completion_tokens);
                        changed = true;
                    }
                }
            }
            if !present {
                object.insert(field.to_owned(), Value::from(c.max_completion_tokens));
                changed = true;
            }
        }
        let ceiling = CEILING_FIELDS
            .iter()
            .filter_map(|name| object.get(*name).and_then(Value::as_u64))
            .max();

        let mut hide_usage = false;
        if streaming && c.include_usage && matches!(path, "chat/completions" | "completions") {
            let asked = object
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                == Some(true);
            if !asked {
                match object.get_mut("stream_options") {
                    Some(Value::Object(options)) => {
                        options.insert("include_usage".to_owned(), Value::Bool(true));
                    }
                    _ => {
                        object.insert(
                            "stream_options".to_owned(),
                            serde_json::json!({ "include_usage": true }),
                        );
                    }
                }
                hide_usage = true;
                changed = true;
            }
        }
        let body = if changed {
            Bytes::from(
                serde_json::to_vec(&Value::Object(object)).unwrap_or_else(|_| body.to_vec()),
            )
        } else {
            body
        };
        Inspected {
            body,
            streaming,
            hide_usage,
            ceiling,
            json: true,
        }
    }

    fn key(&self, session: &VerifiedSession) -> String {
        let claims = &session.claims;
        match (self.inner.config.scope, &claims.cnf) {
            (BudgetScope::Session, _) => format!("sid:{}", claims.jti),
            (BudgetScope::Client, Some(cnf)) => format!("jkt:{}", cnf.jkt),
            (BudgetScope::Client, None) => format!("fp:{}", claims.fp),
        }
    }

    /// Whether [`admit`](Self::admit) has anything to take for this request (a stream slot or a
    /// token reservation); when not, the caller skips it.
    pub(crate) fn admits(&self, session: Option<&VerifiedSession>, inspected: &Inspected) -> bool {
        let c = &self.inner.config;
        session.is_some()
            && ((inspected.streaming && c.max_concurrent_streams > 0)
                || (c.tokens_per_window > 0 && inspected.json))
    }

    /// Takes the stream slot and reserves the tokens of a request, or refuses it.
    pub(crate) async fn admit(
        &self,
        session: Option<&VerifiedSession>,
        inspected: &Inspected,
    ) -> Result<Admitted, Error> {
        let Some(session) = session else {
            return Ok(Admitted::default());
        };
        let c = &self.inner.config;
        let store = &self.inner.store;
        let mut admitted = Admitted::default();

        if inspected.streaming && c.max_concurrent_streams > 0 {
            let jti = &session.claims.jti;
            match store
                .acquire_stream(jti, c.max_concurrent_streams, session.claims.exp)
                .await
            {
                Ok(true) => admitted.stream = Some(jti.clone()),
                Ok(false) => {
                    return Err(Error::new(
                        ErrorCode::RateLimited,
                        format!(
                            "at most {} concurrent streams per session",
                            c.max_concurrent_streams
                        ),
                    )
                    .with_rate_limit(RateLimitInfo {
                        policy: "streams",
                        quota: c.max_concurrent_streams,
                        window_secs: 1,
                        remaining: 0,
                        retry_after: Duration::from_secs(1),
                    }));
                }
                Err(e) if self.inner.fail_open => {
                    log_failure("acquire_stream", &e, "skipped the stream cap (fail open)");
                }
                Err(e) => return Err(crate::store::refuse("acquire_stream", &e)),
            }
        }

        if c.tokens_per_window > 0 && inspected.json {
            let key = self.key(session);
            let prompt_estimate = (inspected.body.len() as u64).div_ceil(4);
            let amount = prompt_estimate + inspected.ceiling.unwrap_or(c.default_reserve_tokens);
            match store
                .reserve_tokens(&key, amount, c.tokens_per_window, c.window_secs)
                .await
            {
                Ok(Reservation::Reserved { window }) => {
                    admitted.reservation = Some((key, window, amount));
                }
                Ok(Reservation::Exhausted {
                    retry_after_secs,
                    used,
                }) => {
                    self.release(admitted);
                    return Err(Error::new(
                        ErrorCode::BudgetExhausted,
                        format!(
                            "token budget exhausted: {used} of {} tokens used in this {} s window",
                            c.tokens_per_window, c.window_secs
                        ),
                    )
                    .with_rate_limit(RateLimitInfo {
                        policy: "tokens",
                        quota: u32::try_from(c.tokens_per_window).unwrap_or(u32::MAX),
                        window_secs: c.window_secs,
                        remaining: 0,
                        retry_after: Duration::from_secs(retry_after_secs),
                    }));
                }
                Err(e) if self.inner.fail_open => {
                    log_failure("reserve_tokens", &e, "skipped the token budget (fail open)");
                }
                Err(e) => {
                    self.release(admitted);
                    return Err(crate::store::refuse("reserve_tokens", &e));
                }
            }
        }
        Ok(admitted)
    }

    /// Settles a finished request: the real usage when known, a refund when the upstream
    /// failed, the whole reservation otherwise; and frees the stream slot.
    pub(crate) fn settle(&self, admitted: Admitted, usage: Option<Usage>, upstream_failed: bool) {
        let Admitted {
            reservation,
            stream,
        } = admitted;
        let delta = reservation.as_ref().and_then(|(_, _, reserved)| {
            let reserved = i64::try_from(*reserved).unwrap_or(i64::MAX);
            match (usage, upstream_failed) {
                (Some(u), _) => Some(i64::try_from(u.total_tokens).unwrap_or(i64::MAX) - reserved),
                (None, true) => Some(-reserved),
                (None, false) => None,
            }
        });
        if delta.is_none() && stream.is_none() {
            return;
        }
        let this = self.clone();
        let work = async move {
            let store = &this.inner.store;
            if let (Some((key, window, _)), Some(delta)) = (&reservation, delta)
                && delta != 0
                && let Err(e) = store
                    .settle_tokens(key, *window, this.inner.config.window_secs, delta)
                    .await
            {
                log_failure("settle_tokens", &e, "the reservation stands");
            }
            if let Some(jti) = &stream
                && let Err(e) = store.release_stream(jti).await
            {
                log_failure("release_stream", &e, "the slot frees when the session ends");
            }
        };
        // Settling happens after the response; it must not hold the response up.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(work);
        }
    }

    /// Gives back what was taken, for a request refused before it was sent.
    pub(crate) fn release(&self, admitted: Admitted) {
        self.settle(admitted, None, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn budget(config: BudgetConfig) -> Budget {
        Budget::new(config, Arc::new(MemoryStore::new()), OnUnavailable::Closed)
    }

    fn json(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn cap_lowers_or_adds_the_ceiling() {
        let b = budget(BudgetConfig {
            max_completion_tokens: 100,
            ..BudgetConfig::default()
        });
        let i = b.inspect(
            "chat/completions",
            Bytes::from_static(br#"{"model":"m","max_tokens":5000}"#),
        );
        assert_eq!(json(&i.body)["max_tokens"], 100);
        assert_eq!(i.ceiling, Some(100));
        let i = b.inspect("chat/completions", Bytes::from_static(br#"{"model":"m"}"#));
        assert_eq!(json(&i.body)["max_completion_tokens"], 100);
        let i = b.inspect("responses", Bytes::from_static(br#"{"model":"m"}"#));
        assert_eq!(json(&i.body)["max_output_tokens"], 100);
        let small = br#"{"model":"m","max_tokens":5}"#;
        let i = b.inspect("completions", Bytes::from_static(small));
        assert_eq!(&i.body[..], small, "an untouched body keeps its bytes");
    }

    #[test]
    fn include_usage_is_added_only_when_missing() {
        let b = budget(BudgetConfig::default());
        let i = b.inspect(
            "chat/completions",
            Bytes::from_static(br#"{"model":"m","stream":true}"#),
        );
        assert!(i.hide_usage && i.streaming);
        assert_eq!(json(&i.body)["stream_options"]["include_usage"], true);
        let asked = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        let i = b.inspect("chat/completions", Bytes::from_static(asked));
        assert!(!i.hide_usage);
        assert_eq!(&i.body[..], asked);
        let i = b.inspect(
            "embeddings",
            Bytes::from_static(br#"{"model":"m","stream":true}"#),
        );
        assert!(!i.hide_usage);
    }

    #[tokio::test]
    async fn reservations_block_once_spent_and_settle() {
        let b = budget(BudgetConfig {
            tokens_per_window: 100,
            default_reserve_tokens: 60,
            ..BudgetConfig::default()
        });
        let session = VerifiedSession {
            claims: std::sync::Arc::new(crate::token::Claims {
                iss: "i".into(),
                aud: "a".into(),
                jti: "j".into(),
                iat: 0,
                nbf: 0,
                exp: u64::MAX / 2,
                auth_time: 0,
                fp: "fp".into(),
                ua: None,
                cnf: None,
            }),
        };
        let i = b.inspect("chat/completions", Bytes::from_static(br#"{"model":"m"}"#));
        let first = b.admit(Some(&session), &i).await.unwrap();
        let second = b.admit(Some(&session), &i).await.unwrap();
        // 2 x (4 + 60) = 128 reserved: spent.
        let refused = b.admit(Some(&session), &i).await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::BudgetExhausted);
        // Settling to the real usage (10 each) frees the rest.
        b.settle(
            first,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 5,
                total_tokens: 10,
            }),
            false,
        );
        b.settle(
            second,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 5,
                total_tokens: 10,
            }),
            false,
        );
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(b.admit(Some(&session), &i).await.is_ok());
    }
}
