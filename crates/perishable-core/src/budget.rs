//! Token budgets and the concurrent-stream cap (see "Budgets" in `docs/protocol.md`).
//!
//! Rate limits count requests, but the bill counts tokens. A budget is a token bucket: it holds
//! at most `tokens_per_window` tokens and refills continuously, that many per `window_secs`, so
//! no client can spend twice its budget across a window boundary. Three scopes, each optional,
//! are checked and reserved together, atomically, in the [`Store`]:
//!
//! | scope | key | capacity |
//! |---|---|---|
//! | the client | its DPoP key when bound, else its fingerprint (`budget.scope = "session"`: each session) | `budget.tokens_per_window` |
//! | the client IP | the IP limits count against ([`crate::client_ip`]) | `budget.per_ip_tokens_per_window` |
//! | the deployment | one bucket for everyone | `budget.global_tokens_per_window` |
//!
//! A fingerprint or a DPoP key is whatever the client says it is; the IP and global buckets bound
//! what any number of invented clients can spend.
//!
//! 1. **Reserve** before forwarding what the call can cost at most (the request model of
//!    [`crate::upstream`] computes it: the completion ceiling times the choices, plus the
//!    prompt). The call passes when every bucket holds that much; otherwise nothing is taken and
//!    it gets `429 budget_exhausted` with `Retry-After` (when the short bucket will hold enough),
//!    before anything reaches the upstream. A call that could cost more than a bucket's whole
//!    capacity is refused the same way: it could never be covered.
//! 2. **Settle** when the response ends, on the usage the upstream reported: the unused part of
//!    the reservation goes back to every bucket; usage beyond it (the prompt estimate was low) is
//!    taken too, and may leave a bucket in debt. However many run at once, each call therefore
//!    overshoots a budget by at most its own difference between real usage and reservation
//!    (`tests/it/budgets.rs` checks 40 at once at every scope, and with a low prompt estimate).
//!    - A response whose usage could not be read keeps its whole reservation.
//!    - An upstream error (status 400 and up, no usage), or no answer at all, is refunded.
//!
//! `budget.max_concurrent_streams` caps the streamed responses one session may have open at once
//! (`429 rate_limited`). The slot is freed when the stream ends or the client goes away.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{BudgetConfig, BudgetScope, OnUnavailable};
use crate::dpop::DeferredReplay;
use crate::error::{Error, ErrorCode, RateLimitInfo};
use crate::rate_limit::Deferred;
use crate::store::{Bucket, CallAdmission, CallDecision, Settling, Store, log_failure};
use crate::token::VerifiedSession;
use crate::usage::Usage;

/// Budget and stream-cap policy, over the shared [`Store`].
#[derive(Debug, Clone)]
pub(crate) struct Budget {
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
    /// The buckets the tokens were reserved in.
    buckets: Vec<Bucket>,
    /// Tokens reserved in each of them (0: none).
    reserved: u64,
    /// The session whose stream slot was taken.
    stream: Option<String>,
}

impl Admitted {
    /// Tokens reserved for the call (0 when no budget applied).
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved
    }
}

/// The name of a scope, in messages and in the `RateLimit-Policy` header.
const SCOPE_NAMES: [&str; 3] = ["tokens", "tokens_ip", "tokens_global"];

impl Budget {
    /// The `[budget]` policy, keeping its state in `store`.
    pub(crate) fn new(
        config: BudgetConfig,
        store: Arc<dyn Store>,
        on_unavailable: OnUnavailable,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                fail_open: on_unavailable == OnUnavailable::Open,
            }),
        }
    }

    /// Whether any budget applies (so calls must be metered).
    pub(crate) fn meters(&self) -> bool {
        let c = &self.inner.config;
        c.tokens_per_window > 0
            || c.tiers
                .values()
                .any(|t| t.tokens_per_window.is_some_and(|n| n > 0))
            || c.per_ip_tokens_per_window > 0
            || c.global_tokens_per_window > 0
            || c.max_completion_tokens > 0
            || c.tiers
                .values()
                .any(|t| t.max_completion_tokens.is_some_and(|n| n > 0))
            || c.max_concurrent_streams > 0
    }

    /// The buckets a call of `session` from `ip` draws on, with the scope of each.
    fn buckets(
        &self,
        session: Option<&VerifiedSession>,
        ip: Option<IpAddr>,
    ) -> (Vec<Bucket>, Vec<&'static str>) {
        let c = &self.inner.config;
        let mut buckets = Vec::with_capacity(3);
        let mut scopes = Vec::with_capacity(3);
        if let Some(session) = session {
            let claims = &session.claims;
            // A user's tier (`budget.tiers.NAME`) sets its own budget; else the default one.
            let capacity = claims
                .tier
                .as_ref()
                .and_then(|tier| c.tiers.get(tier))
                .and_then(|tier| tier.tokens_per_window)
                .unwrap_or(c.tokens_per_window);
            if capacity > 0 {
                // The client: the user when an identity gate named one, else the DPoP key, else
                // the fingerprint (`budget.scope = "client"`).
                let key = match (c.scope, &claims.usr, &claims.cnf) {
                    (BudgetScope::Session, _, _) => format!("sid:{}", claims.jti),
                    (BudgetScope::Client, Some(user), _) => format!("usr:{user}"),
                    (BudgetScope::Client, None, Some(cnf)) => format!("jkt:{}", cnf.jkt),
                    (BudgetScope::Client, None, None) => format!("fp:{}", claims.fp),
                };
                buckets.push(Bucket::new(key, capacity, c.window_secs));
                scopes.push(SCOPE_NAMES[0]);
            }
        }
        if c.per_ip_tokens_per_window > 0 {
            // A request with no known peer shares one bucket with every other such request.
            let key = match ip {
                Some(ip) => format!("ip:{ip}"),
                None => "ip:unknown".to_owned(),
            };
            buckets.push(Bucket::new(key, c.per_ip_tokens_per_window, c.window_secs));
            scopes.push(SCOPE_NAMES[1]);
        }
        if c.global_tokens_per_window > 0 {
            buckets.push(Bucket::new(
                "global".to_owned(),
                c.global_tokens_per_window,
                c.window_secs,
            ));
            scopes.push(SCOPE_NAMES[2]);
        }
        (buckets, scopes)
    }

    /// Nothing reserved, but the buckets `session` and `ip` draw on, so that settling on a
    /// usage charges all of it: for a response that ran without a reservation (a Realtime
    /// response the server started and the proxy cancelled, which still bills what it used).
    pub(crate) fn unreserved(
        &self,
        session: Option<&VerifiedSession>,
        ip: Option<IpAddr>,
    ) -> Admitted {
        Admitted {
            buckets: self.buckets(session, ip).0,
            reserved: 0,
            stream: None,
        }
    }

    /// Takes the stream slot and reserves `reserve` tokens at every scope, or refuses.
    pub(crate) async fn admit(
        &self,
        session: Option<&VerifiedSession>,
        ip: Option<IpAddr>,
        streaming: bool,
        reserve: u64,
    ) -> Result<Admitted, Error> {
        self.admit_counted(session, ip, streaming, reserve, None, None)
            .await
    }

    /// [`admit`](Self::admit), also recording a DPoP proof ([`DeferredReplay`]) and counting
    /// the request with a rate limiter ([`Deferred`]) left to this call, in the same store
    /// call: one round trip for all.
    pub(crate) async fn admit_counted(
        &self,
        session: Option<&VerifiedSession>,
        ip: Option<IpAddr>,
        streaming: bool,
        reserve: u64,
        rate: Option<Deferred>,
        replay: Option<DeferredReplay>,
    ) -> Result<Admitted, Error> {
        let c = &self.inner.config;
        let store = &self.inner.store;
        let stream = match session {
            Some(session) if streaming && c.max_concurrent_streams > 0 => Some((
                session.claims.jti.clone(),
                c.max_concurrent_streams,
                session.claims.exp,
            )),
            _ => None,
        };
        let (buckets, scopes) = if reserve > 0 {
            self.buckets(session, ip)
        } else {
            (Vec::new(), Vec::new())
        };
        let mut call = CallAdmission::new();
        call.rate = rate.as_ref().map(|r| (&*r.limiter, r.key.as_str()));
        call.replay = replay.as_ref().map(|r| (r.id.as_str(), r.until));
        // A call that could cost more than a whole bucket can never be covered: refused without
        // asking for a slot or tokens (the request is still counted).
        let too_large = buckets
            .iter()
            .enumerate()
            .find(|(_, b)| reserve > b.capacity)
            .map(|(i, bucket)| {
                exhausted(
                    scopes[i],
                    bucket,
                    format!(
                        "this call can cost up to {reserve} tokens, more than the whole {} budget of {} tokens: lower max_tokens or n",
                        scopes[i], bucket.capacity
                    ),
                    // Not asked: the store is not consulted for a call that can never fit.
                    0,
                    bucket.window_secs,
                )
            });
        if too_large.is_none() {
            call.stream = stream
                .as_ref()
                .map(|(jti, max, exp)| (jti.as_str(), *max, *exp));
            call.buckets = &buckets;
            call.amount = if buckets.is_empty() { 0 } else { reserve };
        }
        if call.rate.is_none() && call.stream.is_none() && call.amount == 0 && call.replay.is_none()
        {
            return too_large.map_or_else(|| Ok(Admitted::default()), Err);
        }
        let amount = call.amount;
        let took_stream = call.stream.is_some();
        match store.admit_call(call).await {
            Ok(CallDecision::Admitted) => match too_large {
                Some(error) => Err(error),
                None => Ok(Admitted {
                    reserved: amount,
                    buckets: if amount > 0 { buckets } else { Vec::new() },
                    stream: stream.filter(|_| took_stream).map(|(jti, ..)| jti),
                }),
            },
            Ok(CallDecision::Replayed) => Err(DeferredReplay::refusal()),
            Ok(CallDecision::RateLimited(decision)) => Err(rate
                .as_ref()
                .map(|r| r.refusal(decision))
                .unwrap_or_else(|| Error::new(ErrorCode::RateLimited, "rate limited"))),
            Ok(CallDecision::StreamsFull) => Err(Error::new(
                ErrorCode::RateLimited,
                format!(
                    "at most {} concurrent streams per session: wait for one to end, or, if \
                     the instance serving it stopped, refresh the session",
                    c.max_concurrent_streams
                ),
            )
            .with_rate_limit(RateLimitInfo {
                policy: "streams",
                quota: c.max_concurrent_streams,
                window_secs: 1,
                remaining: 0,
                retry_after: Duration::from_secs(1),
            })),
            Ok(CallDecision::Exhausted {
                bucket,
                available,
                retry_after_secs,
            }) => {
                let i = bucket.min(buckets.len().saturating_sub(1));
                Err(match buckets.get(i) {
                    Some(short) => exhausted(
                        scopes[i],
                        short,
                        format!(
                            "token budget exhausted ({}): {available} of {} tokens left, and this call can cost up to {reserve}",
                            scopes[i], short.capacity
                        ),
                        available,
                        retry_after_secs,
                    ),
                    None => Error::new(ErrorCode::BudgetExhausted, "token budget exhausted"),
                })
            }
            // `open` is for rate limits only: a call that needs tokens, a stream slot or a
            // replay check fails closed (docs/scaling.md, "Choose the failure policy").
            Err(e) if self.inner.fail_open && amount == 0 && !took_stream && replay.is_none() => {
                log_failure("admit_call", &e, "skipped the rate limit (fail open)");
                too_large.map_or_else(|| Ok(Admitted::default()), Err)
            }
            Err(e) => Err(crate::store::refuse("admit_call", &e)),
        }
    }

    /// Settles a finished request: the real usage when known, a refund when the upstream
    /// failed, the whole reservation otherwise; and frees the stream slot.
    pub(crate) fn settle(&self, admitted: Admitted, usage: Option<Usage>, upstream_failed: bool) {
        let Admitted {
            buckets,
            reserved,
            stream,
        } = admitted;
        let reserved = i64::try_from(reserved).unwrap_or(i64::MAX);
        // What goes back to the buckets: the unused part, or (negative) what was used beyond.
        let refund = match (usage, upstream_failed) {
            _ if buckets.is_empty() => None,
            (Some(u), _) => Some(reserved - i64::try_from(u.total_tokens).unwrap_or(i64::MAX)),
            (None, true) => Some(reserved),
            (None, false) => None,
        }
        .filter(|delta| *delta != 0);
        if refund.is_none() && stream.is_none() {
            return;
        }
        let this = self.clone();
        // Counted from now until it is in the store: `store::settled` waits for it.
        let settling = Settling::begin();
        let work = async move {
            let _settling = settling;
            let store = &this.inner.store;
            if let Some(delta) = refund
                && let Err(e) = store.settle_tokens(&buckets, delta).await
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

/// `429 budget_exhausted` for the bucket of `scope`.
/// `remaining` is what the bucket holds (`r` of the `RateLimit` header): not enough for this
/// call, but maybe for a smaller one.
fn exhausted(
    scope: &'static str,
    bucket: &Bucket,
    message: String,
    remaining: u64,
    retry_after_secs: u64,
) -> Error {
    Error::new(ErrorCode::BudgetExhausted, message).with_rate_limit(RateLimitInfo {
        policy: scope,
        quota: u32::try_from(bucket.capacity).unwrap_or(u32::MAX),
        window_secs: bucket.window_secs,
        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        retry_after: Duration::from_secs(retry_after_secs.max(1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn budget(config: BudgetConfig) -> Budget {
        Budget::new(config, Arc::new(MemoryStore::new()), OnUnavailable::Closed)
    }

    fn session(fp: &str) -> VerifiedSession {
        VerifiedSession {
            claims: std::sync::Arc::new(crate::token::Claims {
                iss: "i".into(),
                aud: "a".into(),
                jti: format!("jti-{fp}"),
                iat: 0,
                nbf: 0,
                exp: u64::MAX / 2,
                auth_time: 0,
                fp: fp.into(),
                ua: None,
                cnf: None,
                usr: None,
                tier: None,
            }),
        }
    }

    fn usage(total: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: total / 2,
            completion_tokens: total - total / 2,
            total_tokens: total,
        })
    }

    async fn settled() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn reservations_block_once_spent_and_settle() {
        let b = budget(BudgetConfig {
            tokens_per_window: 100,
            window_secs: 86_400,
            ..BudgetConfig::default()
        });
        let s = session("fp");
        let first = b.admit(Some(&s), None, false, 60).await.unwrap();
        let refused = b.admit(Some(&s), None, false, 60).await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::BudgetExhausted);
        // What is left is told, though too little for this call.
        let response = refused.into_response::<bytes::Bytes>();
        let header = response.headers()["ratelimit"].to_str().unwrap();
        assert!(header.starts_with("\"tokens\";r=40;"), "{header}");
        // Settling to the real usage (10) gives back the rest.
        b.settle(first, usage(10), false);
        settled().await;
        assert!(b.admit(Some(&s), None, false, 60).await.is_ok());
    }

    #[tokio::test]
    async fn a_call_larger_than_the_budget_is_refused_outright() {
        let b = budget(BudgetConfig {
            tokens_per_window: 100,
            ..BudgetConfig::default()
        });
        let refused = b
            .admit(Some(&session("fp")), None, false, 101)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::BudgetExhausted);
    }

    #[tokio::test]
    async fn the_ip_and_global_scopes_bound_invented_clients() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let b = budget(BudgetConfig {
            tokens_per_window: 1_000,
            per_ip_tokens_per_window: 150,
            window_secs: 86_400,
            ..BudgetConfig::default()
        });
        // Each new fingerprint has a fresh client budget, but the IP's is shared.
        assert!(
            b.admit(Some(&session("a")), Some(ip), false, 100)
                .await
                .is_ok()
        );
        let refused = b
            .admit(Some(&session("b")), Some(ip), false, 100)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::BudgetExhausted);
        // Another IP is not affected.
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(
            b.admit(Some(&session("b")), Some(other), false, 100)
                .await
                .is_ok()
        );

        let b = budget(BudgetConfig {
            global_tokens_per_window: 250,
            window_secs: 86_400,
            ..BudgetConfig::default()
        });
        for i in 0..2 {
            let ip: IpAddr = format!("192.0.2.{i}").parse().unwrap();
            assert!(
                b.admit(Some(&session(&format!("c{i}"))), Some(ip), false, 100)
                    .await
                    .is_ok()
            );
        }
        assert!(
            b.admit(None, None, false, 100).await.is_err(),
            "global bucket spent"
        );
    }

    #[tokio::test]
    async fn a_refusal_at_one_scope_takes_nothing_at_the_others() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let b = budget(BudgetConfig {
            tokens_per_window: 100,
            per_ip_tokens_per_window: 1_000,
            window_secs: 86_400,
            ..BudgetConfig::default()
        });
        let s = session("a");
        assert!(b.admit(Some(&s), Some(ip), false, 100).await.is_ok());
        // The client bucket is empty: refused, and the IP bucket keeps its 900.
        for _ in 0..5 {
            assert!(b.admit(Some(&s), Some(ip), false, 100).await.is_err());
        }
        for i in 0..9 {
            let fresh = session(&format!("f{i}"));
            assert!(
                b.admit(Some(&fresh), Some(ip), false, 100).await.is_ok(),
                "{i}"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_call_is_refunded_and_an_unread_one_stands() {
        let b = budget(BudgetConfig {
            tokens_per_window: 100,
            window_secs: 86_400,
            ..BudgetConfig::default()
        });
        let s = session("fp");
        let a = b.admit(Some(&s), None, false, 100).await.unwrap();
        b.release(a);
        settled().await;
        let a = b.admit(Some(&s), None, false, 100).await.unwrap();
        b.settle(a, None, false);
        settled().await;
        assert!(b.admit(Some(&s), None, false, 1).await.is_err());
    }
}
