//! [`MemoryStore`]: the default store, in this process's memory.
//!
//! Its parts: [`Limiter`] (governor's keyed GCRA, for rate limits), [`SessionCaps`] (live
//! sessions per fingerprint and key), [`ExpiringSet`] (ids that expire: revocations and
//! replay caches) and [`AppAttestKeys`] (registered App Attest keys and their counters).

mod app_attest;
mod caps;
mod expiring;
mod limiter;

pub(crate) use app_attest::AppAttestKeys;
pub(crate) use caps::SessionCaps;
pub(crate) use expiring::ExpiringSet;
pub(crate) use limiter::Limiter;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use super::{
    Admission, AppAttestKey, Bucket, RateDecision, RateLimiter, RatePolicy, Reservation, Set,
    Store, StoreFuture,
};
use crate::clock::unix_now;

/// State in memory: governor for rate limits, `ExpiringSet`s for ids, `SessionCaps` for
/// live sessions. Every operation completes at once.
#[derive(Debug, Default)]
pub struct MemoryStore {
    revoked: ExpiringSet,
    pow: ExpiringSet,
    dpop: ExpiringSet,
    caps: SessionCaps,
    /// Token buckets: every bucket of a call is checked and taken under this one lock.
    budgets: Mutex<Buckets>,
    /// Session → (open streams, session exp).
    streams: Mutex<HashMap<String, (u32, u64)>>,
    /// Registered App Attest keys.
    app_attest: AppAttestKeys,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn set(&self, set: Set) -> &ExpiringSet {
        match set {
            Set::Revoked => &self.revoked,
            Set::PowUsed => &self.pow,
            Set::DpopSeen => &self.dpop,
        }
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl Store for MemoryStore {
    fn rate_limiter(&self, policy: RatePolicy) -> Arc<dyn RateLimiter> {
        Limiter::<String>::new(policy)
    }

    fn insert_once<'a>(&'a self, set: Set, id: &'a str, expires_at: u64) -> StoreFuture<'a, bool> {
        ready(self.set(set).insert(id, expires_at, unix_now()))
    }

    fn contains<'a>(&'a self, set: Set, id: &'a str) -> StoreFuture<'a, bool> {
        ready(self.set(set).contains(id, unix_now()))
    }

    fn contains_now(&self, set: Set, id: &str) -> Option<bool> {
        Some(self.set(set).contains(id, unix_now()))
    }

    fn insert_once_now(&self, set: Set, id: &str, expires_at: u64) -> Option<bool> {
        Some(self.set(set).insert(id, expires_at, unix_now()))
    }

    fn admit_session<'a>(
        &'a self,
        keys: &'a [String],
        jti: &'a str,
        exp: u64,
        max: u32,
    ) -> StoreFuture<'a, Admission> {
        ready(match self.caps.admit(keys, jti, exp, max, unix_now()) {
            Ok(()) => Admission::Admitted,
            Err(retry_after_secs) => Admission::Full { retry_after_secs },
        })
    }

    fn release_session<'a>(&'a self, keys: &'a [String], jti: &'a str) -> StoreFuture<'a, ()> {
        self.caps.release(keys, jti);
        ready(())
    }

    fn replace_session<'a>(
        &'a self,
        keys: &'a [String],
        old: &'a str,
        new: &'a str,
        exp: u64,
    ) -> StoreFuture<'a, ()> {
        self.caps.replace(keys, old, new, exp);
        ready(())
    }

    fn reserve_tokens<'a>(
        &'a self,
        buckets: &'a [Bucket],
        amount: u64,
    ) -> StoreFuture<'a, Reservation> {
        ready(self.budgets().reserve_at(monotonic_ms(), buckets, amount))
    }

    fn settle_tokens<'a>(&'a self, buckets: &'a [Bucket], delta: i64) -> StoreFuture<'a, ()> {
        self.budgets().settle_at(monotonic_ms(), buckets, delta);
        ready(())
    }

    fn acquire_stream<'a>(&'a self, session: &'a str, max: u32, exp: u64) -> StoreFuture<'a, bool> {
        let now = unix_now();
        let mut streams = self.streams();
        if streams.len() > 4096 {
            streams.retain(|_, (open, exp)| *open > 0 && *exp > now);
        }
        let entry = streams.entry(session.to_owned()).or_insert((0, exp));
        ready(if entry.0 >= max {
            false
        } else {
            entry.0 += 1;
            entry.1 = exp;
            true
        })
    }

    fn release_stream<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        let mut streams = self.streams();
        if let Some(entry) = streams.get_mut(session) {
            entry.0 = entry.0.saturating_sub(1);
            if entry.0 == 0 {
                streams.remove(session);
            }
        }
        ready(())
    }

    fn register_app_attest_key<'a>(
        &'a self,
        key_id: &'a str,
        key: &'a AppAttestKey,
        expires_at: u64,
    ) -> StoreFuture<'a, bool> {
        ready(
            self.app_attest
                .register(key_id, key, expires_at, unix_now()),
        )
    }

    fn app_attest_key<'a>(&'a self, key_id: &'a str) -> StoreFuture<'a, Option<AppAttestKey>> {
        ready(self.app_attest.get(key_id, unix_now()))
    }

    fn advance_app_attest_counter<'a>(
        &'a self,
        key_id: &'a str,
        counter: u32,
        expires_at: u64,
    ) -> StoreFuture<'a, bool> {
        ready(
            self.app_attest
                .advance(key_id, counter, expires_at, unix_now()),
        )
    }
}

impl MemoryStore {
    fn budgets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.budgets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, u64)>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn decide(limiter: &Limiter<String>, key: &str) -> RateDecision {
    thread_local! {
        /// The key as the limiter's `String`, in a buffer each thread reuses: no allocation
        /// per decision (the limiter copies a key only the first time it sees it).
        static KEY: RefCell<String> = const { RefCell::new(String::new()) };
    }
    let checked = KEY.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buffer) => {
            buffer.clear();
            buffer.push_str(key);
            Limiter::check(limiter, &buffer)
        }
        // Not reached (a decision makes no other), but never a panic.
        Err(_) => Limiter::check(limiter, &key.to_owned()),
    });
    match checked {
        Ok(remaining) => RateDecision {
            allowed: true,
            remaining,
            retry_after: std::time::Duration::ZERO,
        },
        Err(info) => RateDecision {
            allowed: false,
            remaining: 0,
            retry_after: info.retry_after,
        },
    }
}

impl RateLimiter for Limiter<String> {
    fn check<'a>(&'a self, key: &'a str) -> StoreFuture<'a, RateDecision> {
        ready(decide(self, key))
    }

    fn check_now(&self, key: &str) -> Option<RateDecision> {
        Some(decide(self, key))
    }

    fn policy(&self) -> &RatePolicy {
        Limiter::policy(self)
    }
}

/// Milliseconds on a monotonic clock (since this process first asked): bucket levels do not
/// jump when the wall clock is set.
fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Past this many buckets, a reservation first drops the full ones (a full bucket is the same
/// as a missing one).
const MAX_BUCKETS: usize = 4096;

/// The longest `retry_after_secs` reported (about 136 years): a deep debt has a finite answer.
pub(super) const MAX_RETRY_SECS: u64 = 1 << 32;

/// Token-bucket levels by bucket key, at explicit times (ms on one clock): the logic of
/// [`Store::reserve_tokens`] and [`Store::settle_tokens`] for [`MemoryStore`], the same
/// arithmetic as the Redis scripts.
///
/// A level is an `f64` count of tokens (the number Lua has): fractional, as refill is
/// continuous; negative, a debt. Up to 10^12 (< 2^40) the spacing of `f64`s is at most 2^-13
/// token, so whole tokens taken and given back are exact, a level is off by at most 1.2e-4
/// token after each write, and one millisecond's refill (`capacity / window_ms`) is at least
/// 2^52 / 2.6e9 ≈ 1.7e6 spacings even over 30 days: it is never rounded away, however often a
/// bucket is touched. Refill is computed as `elapsed_ms * capacity / window_ms` (exact when the
/// numbers are), and the store keeps no rounding of its own.
#[derive(Debug, Default)]
pub(crate) struct Buckets {
    levels: HashMap<String, Level>,
}

/// A bucket that is not full.
#[derive(Debug, Clone, Copy)]
struct Level {
    /// Tokens held at `at_ms` (negative: a debt).
    tokens: f64,
    /// When `tokens` was measured.
    at_ms: u64,
    /// When it is full again (an entry past it is the same as none).
    full_ms: u64,
}

/// A bucket's capacity and refill time in ms, raised to at least 1 s and 1 token.
fn params(bucket: &Bucket) -> (f64, f64) {
    (
        bucket.capacity.max(1) as f64,
        bucket.window_secs.max(1) as f64 * 1000.0,
    )
}

/// Whole seconds until a bucket at `tokens` holds `amount` (or is full, when `amount` is above
/// its capacity): rounded up, in [1, `MAX_RETRY_SECS`].
pub(super) fn retry_after_secs(tokens: f64, amount: u64, bucket: &Bucket) -> u64 {
    let capacity = bucket.capacity.max(1) as f64;
    let target = (amount as f64).min(capacity);
    let secs = ((target - tokens) * bucket.window_secs.max(1) as f64 / capacity).ceil();
    if secs >= MAX_RETRY_SECS as f64 {
        MAX_RETRY_SECS
    } else if secs >= 1.0 {
        secs as u64
    } else {
        1
    }
}

/// Tokens a bucket at `tokens` holds (`tokens`, rounded down; 0 when in debt).
pub(super) fn available(tokens: f64) -> u64 {
    if tokens > 0.0 { tokens as u64 } else { 0 }
}

impl Buckets {
    /// The tokens `bucket` holds at `now_ms`.
    fn level_at(&self, now_ms: u64, bucket: &Bucket) -> f64 {
        let (capacity, window_ms) = params(bucket);
        match self.levels.get(&bucket.key) {
            None => capacity,
            Some(level) => {
                let elapsed = now_ms.saturating_sub(level.at_ms) as f64;
                (level.tokens + elapsed * capacity / window_ms).min(capacity)
            }
        }
    }

    /// Records `bucket` at `tokens` at `now_ms`: removed when full.
    fn put(&mut self, now_ms: u64, bucket: &Bucket, tokens: f64) {
        let (capacity, window_ms) = params(bucket);
        if tokens >= capacity {
            self.levels.remove(&bucket.key);
            return;
        }
        let to_full = ((capacity - tokens) * window_ms / capacity).ceil();
        let full_ms = if to_full < u64::MAX as f64 {
            now_ms.saturating_add(to_full as u64)
        } else {
            u64::MAX
        };
        let level = Level {
            tokens,
            at_ms: now_ms,
            full_ms,
        };
        match self.levels.get_mut(&bucket.key) {
            Some(entry) => *entry = level,
            None => {
                self.levels.insert(bucket.key.clone(), level);
            }
        }
    }

    /// Each bucket's level at `now_ms` after adding `change(level)` to it, in order, a bucket
    /// named twice seeing its first change.
    fn levels_after(
        &self,
        now_ms: u64,
        buckets: &[Bucket],
        mut change: impl FnMut(usize, f64) -> f64,
    ) -> Vec<f64> {
        let mut after: Vec<f64> = Vec::with_capacity(buckets.len());
        for (i, bucket) in buckets.iter().enumerate() {
            let tokens = match buckets[..i].iter().rposition(|b| b.key == bucket.key) {
                Some(earlier) => after[earlier],
                None => self.level_at(now_ms, bucket),
            };
            after.push(change(i, tokens));
        }
        after
    }

    /// Writes the levels `after` (the last one of a bucket named twice).
    fn put_all(&mut self, now_ms: u64, buckets: &[Bucket], after: &[f64]) {
        for (i, (bucket, tokens)) in buckets.iter().zip(after).enumerate() {
            if !buckets[i + 1..].iter().any(|b| b.key == bucket.key) {
                self.put(now_ms, bucket, *tokens);
            }
        }
    }

    /// [`Store::reserve_tokens`] at `now_ms`.
    pub(crate) fn reserve_at(
        &mut self,
        now_ms: u64,
        buckets: &[Bucket],
        amount: u64,
    ) -> Reservation {
        if self.levels.len() > MAX_BUCKETS {
            self.levels.retain(|_, level| level.full_ms > now_ms);
        }
        let wanted = amount as f64;
        // The short bucket that takes longest to hold `amount`.
        let mut short: Option<Reservation> = None;
        let after = self.levels_after(now_ms, buckets, |i, tokens| {
            if tokens >= wanted {
                return tokens - wanted;
            }
            let retry = retry_after_secs(tokens, amount, &buckets[i]);
            if !matches!(short, Some(Reservation::Exhausted { retry_after_secs, .. }) if retry_after_secs >= retry)
            {
                short = Some(Reservation::Exhausted {
                    bucket: i,
                    available: available(tokens),
                    retry_after_secs: retry,
                });
            }
            tokens
        });
        if let Some(refused) = short {
            return refused;
        }
        self.put_all(now_ms, buckets, &after);
        Reservation::Reserved
    }

    /// [`Store::settle_tokens`] at `now_ms`.
    pub(crate) fn settle_at(&mut self, now_ms: u64, buckets: &[Bucket], delta: i64) {
        let delta = delta as f64;
        let after = self.levels_after(now_ms, buckets, |i, tokens| {
            (tokens + delta).min(params(&buckets[i]).0)
        });
        self.put_all(now_ms, buckets, &after);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    /// Unix ms of a boundary of 10 s fixed windows aligned to the epoch.
    const T0: u64 = 1_700_000_000_000;

    /// 1000 tokens per 10 s: 100 a second, one every 10 ms.
    fn bucket(key: &str) -> Bucket {
        Bucket::new(key, 1000, 10)
    }

    fn reserve(b: &mut Buckets, now: u64, buckets: &[Bucket], amount: u64) -> Reservation {
        b.reserve_at(now, buckets, amount)
    }

    fn exhausted(bucket: usize, available: u64, retry_after_secs: u64) -> Reservation {
        Reservation::Exhausted {
            bucket,
            available,
            retry_after_secs,
        }
    }

    #[test]
    fn bucket_new_clamps_to_one() {
        let b = Bucket::new("k", 0, 0);
        assert_eq!((b.capacity, b.window_secs), (1, 1));
    }

    #[test]
    fn fresh_bucket_admits_up_to_capacity_then_refuses() {
        let mut s = Buckets::default();
        let a = [bucket("a")];
        assert_eq!(reserve(&mut s, T0, &a, 400), Reservation::Reserved);
        assert_eq!(reserve(&mut s, T0, &a, 400), Reservation::Reserved);
        assert_eq!(reserve(&mut s, T0, &a, 201), exhausted(0, 200, 1));
        assert_eq!(reserve(&mut s, T0, &a, 200), Reservation::Reserved);
        assert_eq!(reserve(&mut s, T0, &a, 1), exhausted(0, 0, 1));
        // Another key is another bucket.
        assert_eq!(
            reserve(&mut s, T0, &[bucket("b")], 1000),
            Reservation::Reserved
        );
    }

    #[test]
    fn half_the_window_refills_half() {
        let mut s = Buckets::default();
        let a = [bucket("a")];
        assert_eq!(reserve(&mut s, T0, &a, 1000), Reservation::Reserved);
        let half = T0 + 5_000;
        assert_eq!(reserve(&mut s, half, &a, 501), exhausted(0, 500, 1));
        assert_eq!(reserve(&mut s, half, &a, 500), Reservation::Reserved);
        assert_eq!(reserve(&mut s, half, &a, 1), exhausted(0, 0, 1));
        // Never above capacity, however long it rests.
        assert_eq!(
            reserve(&mut s, half + 86_400_000, &a, 1001),
            exhausted(0, 1000, 1)
        );
    }

    #[test]
    fn no_double_spend_across_a_fixed_window_boundary() {
        let mut s = Buckets::default();
        let a = [bucket("a")];
        // The whole budget 1 ms before a 10 s fixed window would end...
        assert_eq!(reserve(&mut s, T0 - 1, &a, 1000), Reservation::Reserved);
        // ...and again 1 ms after it: refused, only 0.2 tokens came back.
        assert_eq!(reserve(&mut s, T0 + 1, &a, 1000), exhausted(0, 0, 10));
        assert_eq!(reserve(&mut s, T0 + 1, &a, 1), exhausted(0, 0, 1));
        // What refilled passes, and no more: 1 token per 10 ms.
        assert_eq!(reserve(&mut s, T0 + 9, &a, 1), Reservation::Reserved);
        assert_eq!(reserve(&mut s, T0 + 9, &a, 1), exhausted(0, 0, 1));
        assert_eq!(reserve(&mut s, T0 + 999, &a, 100), exhausted(0, 99, 1));
        assert_eq!(reserve(&mut s, T0 + 999, &a, 99), Reservation::Reserved);
    }

    #[test]
    fn all_or_nothing_across_buckets() {
        let mut s = Buckets::default();
        let (a, b) = (bucket("a"), Bucket::new("b", 100, 10));
        assert_eq!(
            reserve(&mut s, T0, std::slice::from_ref(&b), 80),
            Reservation::Reserved
        );
        let both = [a.clone(), b.clone()];
        // b holds 20 of the 50 asked: refused, and a keeps all of its 1000.
        assert_eq!(reserve(&mut s, T0, &both, 50), exhausted(1, 20, 3));
        assert_eq!(
            reserve(&mut s, T0, std::slice::from_ref(&a), 1000),
            Reservation::Reserved
        );
        // When both pass, both are taken from.
        let mut s = Buckets::default();
        assert_eq!(reserve(&mut s, T0, &both, 60), Reservation::Reserved);
        assert_eq!(
            reserve(&mut s, T0, std::slice::from_ref(&b), 41),
            exhausted(0, 40, 1)
        );
        assert_eq!(
            reserve(&mut s, T0, std::slice::from_ref(&a), 941),
            exhausted(0, 940, 1)
        );
        // Several short: the one that takes longest. a holds 940 of 950 (0.1 s away); b's
        // capacity is below 950, so it will not pass at all: its retry is the time to full, 6 s.
        assert_eq!(reserve(&mut s, T0, &both, 950), exhausted(1, 40, 6));
        assert_eq!(reserve(&mut s, T0, &both, 41), exhausted(1, 40, 1));
        // A bucket named twice is taken from twice.
        let mut s = Buckets::default();
        assert_eq!(
            reserve(&mut s, T0, &[b.clone(), b.clone()], 51),
            exhausted(1, 49, 1)
        );
        assert_eq!(
            reserve(&mut s, T0, &[b.clone(), b.clone()], 50),
            Reservation::Reserved
        );
        assert_eq!(reserve(&mut s, T0, &[b], 1), exhausted(0, 0, 1));
    }

    #[test]
    fn retry_after_is_rounded_up() {
        let mut s = Buckets::default();
        let a = [bucket("a")];
        assert_eq!(reserve(&mut s, T0, &a, 1000), Reservation::Reserved);
        // 100 tokens a second: 150 in 1.5 s, said 2.
        assert_eq!(reserve(&mut s, T0, &a, 150), exhausted(0, 0, 2));
        // 40 back after 0.4 s: 110 more in 1.1 s, said 2; 50 back: 100 more in exactly 1 s.
        assert_eq!(reserve(&mut s, T0 + 400, &a, 150), exhausted(0, 40, 2));
        assert_eq!(reserve(&mut s, T0 + 500, &a, 150), exhausted(0, 50, 1));
        // The whole capacity from empty: exactly the window.
        assert_eq!(reserve(&mut s, T0, &a, 1000), exhausted(0, 0, 10));
        // 1 token: 10 ms, said 1 (at least 1).
        assert_eq!(reserve(&mut s, T0, &a, 1), exhausted(0, 0, 1));
    }

    #[test]
    fn settle_gives_back_up_to_capacity() {
        let mut s = Buckets::default();
        let a = [bucket("a")];
        assert_eq!(reserve(&mut s, T0, &a, 600), Reservation::Reserved);
        s.settle_at(T0, &a, 200);
        assert_eq!(reserve(&mut s, T0, &a, 601), exhausted(0, 600, 1));
        // Far more than was taken: full, not above.
        s.settle_at(T0, &a, 10_000);
        assert!(s.levels.is_empty(), "a full bucket is dropped");
        assert_eq!(reserve(&mut s, T0, &a, 1001), exhausted(0, 1000, 1));
        assert_eq!(reserve(&mut s, T0, &a, 1000), Reservation::Reserved);
        assert_eq!(reserve(&mut s, T0, &a, 1), exhausted(0, 0, 1));
    }

    #[test]
    fn settle_below_zero_is_a_debt_that_refills() {
        let mut s = Buckets::default();
        let a = [bucket("a")];
        assert_eq!(reserve(&mut s, T0, &a, 1000), Reservation::Reserved);
        // 500 used beyond the reservation: -500.
        s.settle_at(T0, &a, -500);
        assert_eq!(reserve(&mut s, T0, &a, 100), exhausted(0, 0, 6));
        // Beyond the window while in debt: 1500 more at 100/s.
        assert_eq!(reserve(&mut s, T0, &a, 1000), exhausted(0, 0, 15));
        // 5 s later the debt is paid, nothing more.
        assert_eq!(reserve(&mut s, T0 + 5_000, &a, 1), exhausted(0, 0, 1));
        assert_eq!(reserve(&mut s, T0 + 10_000, &a, 501), exhausted(0, 500, 1));
        assert_eq!(reserve(&mut s, T0 + 10_000, &a, 500), Reservation::Reserved);
        // A debt on a bucket never seen starts from full.
        s.settle_at(T0, &[bucket("b")], -1500);
        assert_eq!(reserve(&mut s, T0, &[bucket("b")], 1), exhausted(0, 0, 6));
    }

    #[test]
    fn amount_above_capacity_is_always_exhausted() {
        let mut s = Buckets::default();
        let a = [Bucket::new("a", 100, 60)];
        assert_eq!(reserve(&mut s, T0, &a, 101), exhausted(0, 100, 1));
        assert_eq!(
            reserve(&mut s, T0 + 10u64.pow(10), &a, 101),
            exhausted(0, 100, 1)
        );
        assert_eq!(reserve(&mut s, T0, &a, u64::MAX), exhausted(0, 100, 1));
        // Half empty: the retry is the time to full (30 s), never infinite.
        assert_eq!(reserve(&mut s, T0, &a, 50), Reservation::Reserved);
        assert_eq!(reserve(&mut s, T0, &a, 101), exhausted(0, 50, 30));
        // A huge debt: still a finite answer.
        s.settle_at(T0, &a, i64::MIN);
        assert_eq!(
            reserve(&mut s, T0, &a, u64::MAX),
            exhausted(0, 0, MAX_RETRY_SECS)
        );
    }

    #[test]
    fn large_capacities_and_long_windows_keep_whole_tokens() {
        let mut s = Buckets::default();
        // 10^12 tokens per 30 days: 385.8 tokens per ms.
        let a = [Bucket::new("a", 1_000_000_000_000, 30 * 86_400)];
        assert_eq!(
            reserve(&mut s, T0, &a, 999_999_999_999),
            Reservation::Reserved
        );
        assert_eq!(reserve(&mut s, T0, &a, 2), exhausted(0, 1, 1));
        assert_eq!(reserve(&mut s, T0 + 1, &a, 387), exhausted(0, 386, 1));
        assert_eq!(reserve(&mut s, T0 + 1, &a, 386), Reservation::Reserved);
        // Many takes and returns of whole tokens leave the level where it was.
        let mut s = Buckets::default();
        assert_eq!(reserve(&mut s, T0, &a, 123_456_789), Reservation::Reserved);
        for i in 0..10_000u64 {
            assert_eq!(reserve(&mut s, T0, &a, 1_000 + i), Reservation::Reserved);
            s.settle_at(T0, &a, 1_000 + i as i64);
        }
        assert_eq!(
            reserve(&mut s, T0, &a, 1_000_000_000_000 - 123_456_788),
            exhausted(0, 1_000_000_000_000 - 123_456_789, 1)
        );
        // 1 token per 30 days: after 15 days, half a token, not one.
        let mut s = Buckets::default();
        let slow = [Bucket::new("slow", 1, 30 * 86_400)];
        assert_eq!(reserve(&mut s, T0, &slow, 1), Reservation::Reserved);
        let half = T0 + 15 * 86_400_000;
        assert_eq!(
            reserve(&mut s, half, &slow, 1),
            exhausted(0, 0, 15 * 86_400)
        );
        assert_eq!(
            reserve(&mut s, half * 2 - T0, &slow, 1),
            Reservation::Reserved
        );
    }

    #[test]
    fn full_buckets_are_dropped_when_the_map_grows() {
        let mut s = Buckets::default();
        let one = |i: usize| [Bucket::new(format!("k{i}"), 10, 1)];
        for i in 0..MAX_BUCKETS + 10 {
            assert_eq!(reserve(&mut s, T0, &one(i), 1), Reservation::Reserved);
        }
        assert_eq!(s.levels.len(), MAX_BUCKETS + 10);
        // 100 ms later each holds 9 + 1: full again, dropped at the next reservation.
        assert_eq!(
            reserve(&mut s, T0 + 100, &one(0), 10),
            Reservation::Reserved
        );
        assert_eq!(s.levels.len(), 1);
    }

    #[test]
    fn concurrent_reservations_take_exactly_the_capacity() {
        let store = MemoryStore::new();
        let buckets = [Bucket::new("shared", 10, 86_400)];
        let barrier = std::sync::Barrier::new(40);
        let passed = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..40)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        store
                            .reserve_tokens(&buckets, 1)
                            .now_or_never()
                            .unwrap()
                            .unwrap()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|r| *r == Reservation::Reserved)
                .count()
        });
        assert_eq!(passed, 10);
    }
}
