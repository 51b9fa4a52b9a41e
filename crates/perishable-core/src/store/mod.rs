//! Shared state: the [`Store`] behind rate limits, revocations, session caps and replay caches.
//!
//! One instance keeps its state in memory ([`MemoryStore`], the default: governor for rate
//! limits, no setup). Several instances behind a load balancer share a Redis ([`RedisStore`],
//! cargo feature `redis`, `store.url = "redis://..."`), so that a client spread over them gets
//! one rate limit, a token revoked on one is refused by all, and a proof-of-work solution or DPoP
//! proof works once across all of them.
//!
//! What lives in the store:
//!
//! | state | operation | expires |
//! |---|---|---|
//! | rate limits | [`RateLimiter::check`]: GCRA, burst `points` per `window`, then `block` | with the limit's state |
//! | revoked sessions | [`Store::insert_once`] / [`Store::contains`] on [`Set::Revoked`] | at the token's `exp` |
//! | used proof-of-work challenges, attestation challenges, captcha tokens | [`Store::insert_once`] on [`Set::PowUsed`] | at the challenge's expiry (a captcha token: after 10 minutes) |
//! | seen DPoP proofs | [`Store::insert_once`] on [`Set::DpopSeen`] | past the proof's `iat` window |
//! | live sessions per fingerprint / key | [`Store::admit_session`], release, replace | at each session's `exp` |
//! | token budgets | [`Store::reserve_tokens`], [`Store::settle_tokens`] on [`Bucket`]s: token buckets refilled continuously, several taken from at once or none | when the bucket is full again (a missing bucket is a full one) |
//! | concurrent streams per session | [`Store::acquire_stream`], [`Store::release_stream`] | with the session |
//! | App Attest keys (the `app_attest` mint gate) | [`Store::register_app_attest_key`], [`Store::app_attest_key`], [`Store::advance_app_attest_counter`] | `mint.app_attest.key_retention_secs` after the key's last mint |
//!
//! When the store fails (Redis down, or slower than `store.timeout_ms`), the policy
//! `store.on_unavailable` decides: `closed` (default) refuses with `503 store_unavailable`;
//! `open` skips the limits (rate limits and session caps, logged) while revocation and replay
//! checks still fail closed. Since every authenticated request checks revocation, those still get
//! `503` under `open`; what `open` keeps going is what needs no revocation or replay record
//! (mints without proof of work or DPoP, `GET /challenge`, `GET /health`). Nothing panics and
//! nothing hangs; service resumes by itself when the store returns.
//!
//! Implement [`Store`] to keep this state elsewhere, and pass it to
//! [`Perishable::with_store`](crate::Perishable::with_store).

#[cfg(feature = "test-util")]
pub mod conformance;
mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

/// A boxed store operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store operation that did not complete. Never holds a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within `store.timeout_ms`.
    #[error("the store did not answer in time")]
    Timeout,
    /// The store could not be reached or refused the operation.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// A rate limit: `points` requests per `window` as a burst, then `block` of refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatePolicy {
    /// The name in the `RateLimit` headers and in store keys (`session`, `mint`).
    pub name: &'static str,
    /// Requests per window (the burst).
    pub points: u32,
    /// The window over which `points` are replenished.
    pub window: Duration,
    /// How long a client that went over stays refused (zero: until a request is free).
    pub block: Duration,
}

/// The answer to one rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may pass.
    pub allowed: bool,
    /// Requests left right now.
    pub remaining: u32,
    /// When refused: how long until a request is allowed.
    pub retry_after: Duration,
}

/// A keyed rate limiter for one [`RatePolicy`].
pub trait RateLimiter: Send + Sync + fmt::Debug {
    /// Counts one request for `key`.
    fn check<'a>(&'a self, key: &'a str) -> StoreFuture<'a, RateDecision>;

    /// [`check`](Self::check) without waiting, for a limiter that answers from memory: `None`
    /// (the default) sends the caller to `check`. The layers use it to skip a boxed future per
    /// request.
    fn check_now(&self, key: &str) -> Option<RateDecision> {
        let _ = key;
        None
    }

    /// The policy.
    fn policy(&self) -> &RatePolicy;
}

/// The sets of ids that must be seen at most once, or looked up. More may come: a store keeps
/// them apart by [`name`](Self::name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Set {
    /// Revoked session ids (`jti`).
    Revoked,
    /// Used one-time evidence: proof-of-work challenges, the challenges attestations were bound
    /// to (`attest:<challenge>`), captcha tokens that minted (`captcha:<hash>`).
    PowUsed,
    /// Seen DPoP proofs (`jkt.jti`).
    DpopSeen,
}

impl Set {
    /// The set's name in store keys.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::PowUsed => "pow",
            Self::DpopSeen => "dpop",
        }
    }
}

/// The answer to [`Store::admit_session`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A slot was taken under every key.
    Admitted,
    /// A key is full; a slot frees up in this many seconds.
    Full {
        /// Seconds until the soonest of the full key's sessions expires (at least 1).
        retry_after_secs: u64,
    },
}

/// One token budget a call draws on: a token bucket of `capacity` tokens that refills
/// continuously, `capacity` tokens per `window_secs`.
///
/// A bucket is named by its `key` alone: calls that name the same key share one level (pass the
/// same `capacity` and `window_secs` each time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Bucket {
    /// The bucket's name in store keys (the store adds its own prefix), e.g.
    /// `client:fp:<hash>`, `ip:203.0.113.7`, `global`.
    pub key: String,
    /// Tokens the bucket holds when full (`budget.tokens_per_window` and friends). At least 1.
    pub capacity: u64,
    /// Seconds to refill from empty to full. At least 1.
    pub window_secs: u64,
}

impl Bucket {
    /// A bucket named `key` of `capacity` tokens refilled over `window_secs`, both raised to at
    /// least 1.
    pub fn new(key: impl Into<String>, capacity: u64, window_secs: u64) -> Self {
        Self {
            key: key.into(),
            capacity: capacity.max(1),
            window_secs: window_secs.max(1),
        }
    }
}

/// The answer to [`Store::reserve_tokens`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reservation {
    /// `amount` was taken from every bucket.
    Reserved,
    /// Nothing was taken: bucket `bucket` (an index into the slice) holds less than `amount`.
    /// When several do, the one that takes longest to hold it.
    Exhausted {
        /// The index in the slice passed to [`Store::reserve_tokens`] of the bucket that is
        /// short.
        bucket: usize,
        /// Tokens that bucket holds now, rounded down (0 when in debt).
        available: u64,
        /// Whole seconds until it will hold `amount`, rounded up: at least 1, and at most
        /// `window_secs` when `amount <= capacity` and the bucket is not in debt. A bucket never
        /// holds more than its capacity: when `amount > capacity`, the seconds until it is full.
        retry_after_secs: u64,
    },
}

/// An Apple App Attest key that a client registered with an attestation (the `app_attest` mint
/// gate, `docs/gates.md`): what its later assertions are checked against.
///
/// The store keeps it under the key's id (see [`Store::register_app_attest_key`]); nothing in it
/// is secret or personal: a public key, the app it belongs to and a counter.
///
/// ```
/// use perishable_core::store::AppAttestKey;
///
/// let key = AppAttestKey::new(vec![4; 65], "ABCDE12345.com.example.app", false, 0, 1_767_225_600);
/// assert_eq!(key.counter, 0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppAttestKey {
    /// The attested P-256 public key: an uncompressed SEC1 point (65 bytes, `04 || x || y`).
    pub public_key: Vec<u8>,
    /// The App ID it was attested for (`TEAMID.bundle.id`).
    pub app_id: String,
    /// Whether Apple's development environment attested it (else production).
    pub development: bool,
    /// The highest sign counter accepted so far: 0 at registration, then each assertion's.
    pub counter: u32,
    /// When it was registered (Unix seconds).
    pub created_at: u64,
}

impl AppAttestKey {
    /// A record of these values (a store of your own rebuilds what it kept with this).
    pub fn new(
        public_key: impl Into<Vec<u8>>,
        app_id: impl Into<String>,
        development: bool,
        counter: u32,
        created_at: u64,
    ) -> Self {
        Self {
            public_key: public_key.into(),
            app_id: app_id.into(),
            development,
            counter,
            created_at,
        }
    }
}

/// What a proxied call asks of the store before it is forwarded, in one step
/// ([`Store::admit_call`]): one request counted by a rate limiter, a concurrent-stream slot,
/// and a token reservation. Each part is optional.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct CallAdmission<'a> {
    /// Count one request for `key` with this limiter.
    pub rate: Option<(&'a dyn RateLimiter, &'a str)>,
    /// Take one of `max` stream slots of session `jti` (held until `exp` at most):
    /// `(jti, max, exp)`, as [`Store::acquire_stream`].
    pub stream: Option<(&'a str, u32, u64)>,
    /// Reserve `amount` tokens in every bucket, as [`Store::reserve_tokens`] (no buckets, or
    /// an amount of 0: nothing to reserve).
    pub buckets: &'a [Bucket],
    /// Tokens to reserve.
    pub amount: u64,
    /// Record a DPoP proof's replay id in [`Set::DpopSeen`] until this time (Unix seconds),
    /// first: `(id, expires_at)`, as [`Store::insert_once`].
    pub replay: Option<(&'a str, u64)>,
}

impl<'a> CallAdmission<'a> {
    /// An admission of nothing yet; add the parts with the fields.
    pub fn new() -> Self {
        Self {
            rate: None,
            stream: None,
            buckets: &[],
            amount: 0,
            replay: None,
        }
    }
}

impl Default for CallAdmission<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// The answer to [`Store::admit_call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallDecision {
    /// Every part passed and was taken.
    Admitted,
    /// The DPoP proof's replay id was recorded already: a replay (nothing else was taken).
    Replayed,
    /// The rate limiter refused (nothing else was taken).
    RateLimited(RateDecision),
    /// The request was counted; the session's stream slots are all taken (no tokens taken).
    StreamsFull,
    /// The request was counted; a bucket is short (no slot and no tokens taken), as
    /// [`Reservation::Exhausted`].
    Exhausted {
        /// Index into [`CallAdmission::buckets`] of the short bucket.
        bucket: usize,
        /// Tokens it holds now.
        available: u64,
        /// Whole seconds until it holds the amount.
        retry_after_secs: u64,
    },
}

/// Where shared state lives; see the [module docs](self).
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// A rate limiter for `policy`, made once at start-up.
    fn rate_limiter(&self, policy: RatePolicy) -> Arc<dyn RateLimiter>;

    /// Adds `id` to `set` until `expires_at` (Unix seconds). `false` when it was already there:
    /// the caller has seen a replay.
    fn insert_once<'a>(&'a self, set: Set, id: &'a str, expires_at: u64) -> StoreFuture<'a, bool>;

    /// Whether `id` is in `set` and unexpired.
    fn contains<'a>(&'a self, set: Set, id: &'a str) -> StoreFuture<'a, bool>;

    /// [`contains`](Self::contains) without waiting, for a store that answers from memory:
    /// `None` (the default) sends the caller to `contains`.
    fn contains_now(&self, set: Set, id: &str) -> Option<bool> {
        let _ = (set, id);
        None
    }

    /// [`insert_once`](Self::insert_once) without waiting, for a store that answers from
    /// memory: `None` (the default) sends the caller to `insert_once`.
    fn insert_once_now(&self, set: Set, id: &str, expires_at: u64) -> Option<bool> {
        let _ = (set, id, expires_at);
        None
    }

    /// Whether the store can be reached now, for `GET /health`. The default (a store in this
    /// process) always can.
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Takes a slot for session `jti` (until `exp`) under every key, unless one already holds
    /// `max` live sessions.
    fn admit_session<'a>(
        &'a self,
        keys: &'a [String],
        jti: &'a str,
        exp: u64,
        max: u32,
    ) -> StoreFuture<'a, Admission>;

    /// Frees the slots of session `jti`.
    fn release_session<'a>(&'a self, keys: &'a [String], jti: &'a str) -> StoreFuture<'a, ()>;

    /// Moves the slots of session `old` to `new`, valid until `exp`.
    fn replace_session<'a>(
        &'a self,
        keys: &'a [String],
        old: &'a str,
        new: &'a str,
        exp: u64,
    ) -> StoreFuture<'a, ()>;

    /// Takes `amount` tokens from every bucket in `buckets` at once, or from none.
    ///
    /// A bucket refills continuously at `capacity / window_secs` tokens per second up to
    /// `capacity` (a bucket never seen is full). The reservation passes when every bucket holds
    /// at least `amount` tokens, so an `amount` above a bucket's capacity never passes. Atomic:
    /// concurrent reservations never both take tokens that only one could have. No buckets: the
    /// reservation passes.
    ///
    /// **Breaking change** (intended, before 1.0): this replaced a fixed-window counter,
    /// `reserve_tokens(key, amount, limit, window_secs) -> Reservation::{Reserved { window },
    /// Exhausted { retry_after_secs, used }}`, which let a client spend its budget twice around a
    /// window boundary. Implementations of [`Store`] outside this crate must move to buckets.
    fn reserve_tokens<'a>(
        &'a self,
        buckets: &'a [Bucket],
        amount: u64,
    ) -> StoreFuture<'a, Reservation>;

    /// Settles a reservation made with [`reserve_tokens`](Self::reserve_tokens) on the same
    /// buckets: adds `delta` tokens to every bucket. Positive: the unused part of the
    /// reservation given back, never above capacity. Negative: usage beyond the reservation,
    /// which may take a bucket below zero — a debt that refills like anything else.
    ///
    /// **Breaking change** (intended, before 1.0), with [`reserve_tokens`](Self::reserve_tokens):
    /// this was `settle_tokens(key, window, window_secs, delta)`, whose `delta` counted tokens
    /// *used*: the opposite sign of today's.
    fn settle_tokens<'a>(&'a self, buckets: &'a [Bucket], delta: i64) -> StoreFuture<'a, ()>;

    /// Takes one of `max` concurrent-stream slots of `session` (held at most until `exp`).
    /// `false` when all are taken.
    fn acquire_stream<'a>(&'a self, session: &'a str, max: u32, exp: u64) -> StoreFuture<'a, bool>;

    /// Gives back a slot taken with [`acquire_stream`](Self::acquire_stream).
    fn release_stream<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()>;

    /// Everything a proxied call asks before it is forwarded, in one step: records the DPoP
    /// proof (refusing a replay), counts the request with the rate limiter, then takes the
    /// stream slot and reserves the tokens, or neither (see [`CallDecision`] for what a refusal
    /// leaves taken).
    ///
    /// The default runs [`RateLimiter::check`], [`acquire_stream`](Self::acquire_stream) and
    /// [`reserve_tokens`](Self::reserve_tokens) in turn (giving the slot back when the tokens
    /// are short): right for a store in this process. A store across a network should answer
    /// in one round trip: the Redis store runs one script.
    fn admit_call<'a>(&'a self, call: CallAdmission<'a>) -> StoreFuture<'a, CallDecision> {
        Box::pin(async move {
            if let Some((id, expires_at)) = call.replay
                && !self.insert_once(Set::DpopSeen, id, expires_at).await?
            {
                return Ok(CallDecision::Replayed);
            }
            if let Some((limiter, key)) = call.rate {
                let decision = match limiter.check_now(key) {
                    Some(decision) => decision,
                    None => limiter.check(key).await?,
                };
                if !decision.allowed {
                    return Ok(CallDecision::RateLimited(decision));
                }
            }
            let mut slot = None;
            if let Some((jti, max, exp)) = call.stream {
                if !self.acquire_stream(jti, max, exp).await? {
                    return Ok(CallDecision::StreamsFull);
                }
                slot = Some(jti);
            }
            if call.amount > 0 && !call.buckets.is_empty() {
                let reserved = self.reserve_tokens(call.buckets, call.amount).await;
                let refusal = match reserved {
                    Ok(Reservation::Reserved) => None,
                    Ok(Reservation::Exhausted {
                        bucket,
                        available,
                        retry_after_secs,
                    }) => Some(Ok(CallDecision::Exhausted {
                        bucket,
                        available,
                        retry_after_secs,
                    })),
                    Err(e) => Some(Err(e)),
                };
                if let Some(refusal) = refusal {
                    if let Some(jti) = slot {
                        // Best effort: the slot frees with the session otherwise.
                        let _ = self.release_stream(jti).await;
                    }
                    return refusal;
                }
            }
            Ok(CallDecision::Admitted)
        })
    }

    /// Registers the App Attest key `key_id` (an opaque id: base64url, no padding, of Apple's
    /// 32-byte key identifier) with its record, kept until `expires_at` (Unix seconds).
    ///
    /// First writer wins: `false`, and the stored record unchanged, when `key_id` is already
    /// registered and unexpired. Atomic: of concurrent registrations of one id, exactly one gets
    /// `true`. (A second registration must never pass: it would reset the counter, and with it
    /// the replay protection of the key's assertions.)
    ///
    /// **Breaking change** (intended, before 1.0): a required method, with
    /// [`app_attest_key`](Self::app_attest_key) and
    /// [`advance_app_attest_counter`](Self::advance_app_attest_counter). No default could be
    /// correct (a store that cannot keep keys cannot serve the `app_attest` gate), so
    /// implementations of [`Store`] outside this crate must add them;
    /// `conformance::run` (feature `test-util`) checks them.
    fn register_app_attest_key<'a>(
        &'a self,
        key_id: &'a str,
        key: &'a AppAttestKey,
        expires_at: u64,
    ) -> StoreFuture<'a, bool>;

    /// The App Attest key registered as `key_id`, as last written; `None` when unknown or
    /// expired.
    fn app_attest_key<'a>(&'a self, key_id: &'a str) -> StoreFuture<'a, Option<AppAttestKey>>;

    /// Raises the counter of the App Attest key `key_id` to `counter` when that is strictly
    /// above the stored one, and then keeps the record until `expires_at` (Unix seconds).
    ///
    /// Compare and set, atomically: `false`, and nothing changed, when the key is unknown or
    /// expired or its counter is already `counter` or above. Of concurrent calls with the same
    /// `counter`, exactly one gets `true`: an assertion replayed in parallel mints once.
    fn advance_app_attest_counter<'a>(
        &'a self,
        key_id: &'a str,
        counter: u32,
        expires_at: u64,
    ) -> StoreFuture<'a, bool>;
}

/// The store `store.url` names.
pub(crate) fn from_config(config: &crate::Config) -> Result<Arc<dyn Store>, crate::ConfigError> {
    let url = config.store().url.as_str();
    if url == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    #[cfg(feature = "redis")]
    {
        Ok(Arc::new(RedisStore::from_config(config.store())?))
    }
    #[cfg(not(feature = "redis"))]
    {
        Err(crate::ConfigError::Invalid {
            key: "store.url",
            reason: "Redis needs the `redis` cargo feature of perishable".to_owned(),
        })
    }
}

/// A store failure refused (fail closed): logged, and `503 store_unavailable`.
pub(crate) fn refuse(op: &'static str, error: &StoreError) -> crate::Error {
    log_failure(op, error, "refused (fail closed)");
    crate::Error::new(
        crate::ErrorCode::StoreUnavailable,
        "the shared state store is unavailable: try again shortly",
    )
}

/// Settlements begun in this process and not yet in their store: see [`settled`].
static SETTLING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SETTLED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// A settlement in flight, counted by [`settled`] until dropped.
#[derive(Debug)]
pub(crate) struct Settling(());

impl Settling {
    pub(crate) fn begin() -> Self {
        SETTLING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(())
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        if SETTLING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            SETTLED.notify_waiters();
        }
    }
}

/// Resolves once every settlement begun in this process has reached its store: the real usage
/// of each finished call, and each stream slot given back. Settlements run after their
/// response, in the background (on Redis, batched); await this after the server has stopped
/// and before the process exits, so that none is lost. `perishable_axum::serve` does.
///
/// ```
/// # async fn after_shutdown() {
/// // ... the server has drained its connections ...
/// let _ = tokio::time::timeout(std::time::Duration::from_secs(5), perishable_core::store::settled()).await;
/// # }
/// ```
pub async fn settled() {
    loop {
        let notified = SETTLED.notified();
        if SETTLING.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

/// Logs a store failure (at most once a second per operation kind, so an outage does not flood
/// the logs). Fields: `op`, `error`; never a key, token or fingerprint.
pub(crate) fn log_failure(op: &'static str, error: &StoreError, action: &'static str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    metrics::counter!("perishable_store_errors_total", "op" => op).increment(1);
    let now = crate::clock::unix_now();
    if LAST.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(target: "perishable::store", op, %error, action, "store operation failed");
    }
}
