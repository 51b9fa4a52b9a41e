//! [`Limiter`]: governor's keyed GCRA plus a block list and pruning.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::error::RateLimitInfo;
use crate::store::RatePolicy;

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// A keyed limiter: `points` per `window`, and a block after going over.
pub(crate) struct Limiter<K: Hash + Eq + Clone> {
    policy: RatePolicy,
    limiter: Keyed<K>,
    clock: DefaultClock,
    /// Keys refused until an instant. Written only when a client goes over, so it is usually
    /// empty and `blocked_len` lets the hot path skip the lock.
    blocked: Mutex<HashMap<K, Instant>>,
    blocked_len: AtomicUsize,
    pruner_started: AtomicBool,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("policy", &self.policy)
            .field("keys", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Limiter<K> {
    /// A limiter for `policy`: `points` requests per `window` (at least 1 each), and `block` of
    /// refusal after going over (`Duration::ZERO`: refused only until a request is free again).
    /// On a tokio runtime, a pruning task starts with it and ends when it is dropped.
    pub(crate) fn new(policy: RatePolicy) -> Arc<Self> {
        let points = policy.points.max(1);
        let window = policy.window.max(Duration::from_millis(1));
        let burst = NonZeroU32::new(points).unwrap_or(NonZeroU32::MIN);
        let period = (window / points).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        let limiter = Arc::new(Self {
            policy: RatePolicy {
                points,
                window,
                ..policy
            },
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            clock: DefaultClock::default(),
            blocked: Mutex::new(HashMap::new()),
            blocked_len: AtomicUsize::new(0),
            pruner_started: AtomicBool::new(false),
        });
        limiter.ensure_pruner();
        limiter
    }

    /// The policy.
    pub(crate) fn policy(&self) -> &RatePolicy {
        &self.policy
    }

    fn info(&self, remaining: u32, retry_after: Duration) -> RateLimitInfo {
        RateLimitInfo {
            policy: self.policy.name,
            quota: self.policy.points,
            window_secs: self.policy.window.as_secs().max(1),
            remaining,
            retry_after,
        }
    }

    /// Counts one request for `key`: `Ok` with the requests left, or the refusal's details.
    pub(crate) fn check(&self, key: &K) -> Result<u32, RateLimitInfo> {
        if self.blocked_len.load(Ordering::Relaxed) > 0 {
            let now = Instant::now();
            let blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(until) = blocked.get(key).filter(|until| **until > now) {
                return Err(self.info(0, *until - now));
            }
        }
        match self.limiter.check_key(key) {
            Ok(snapshot) => Ok(snapshot.remaining_burst_capacity()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                if self.policy.block.is_zero() {
                    return Err(self.info(0, wait));
                }
                let retry = wait.max(self.policy.block);
                let mut blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
                blocked.insert(key.clone(), Instant::now() + retry);
                self.blocked_len.store(blocked.len(), Ordering::Relaxed);
                Err(self.info(0, retry))
            }
        }
    }

    /// Drops the state of keys that are back to a full quota, and expired blocks.
    pub(crate) fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        metrics::gauge!("perishable_rate_limiter_keys", "policy" => self.policy.name)
            .set(self.limiter.len() as f64);
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
        self.blocked_len.store(blocked.len(), Ordering::Relaxed);
    }

    /// Keys currently tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Starts the pruning task once, on the current tokio runtime. It holds only a weak
    /// reference and ends when the limiter is dropped.
    fn ensure_pruner(self: &Arc<Self>) {
        if self.pruner_started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.pruner_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = self
            .policy
            .window
            .max(self.policy.block)
            .max(Duration::from_secs(1));
        handle.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(limiter) => limiter.prune(),
                    None => break,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(points: u32, window: Duration, block: Duration) -> Arc<Limiter<i32>> {
        Limiter::new(RatePolicy {
            name: "t",
            points,
            window,
            block,
        })
    }

    #[test]
    fn burst_then_refusal_then_block() {
        let l = limiter(3, Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(l.check(&1), Ok(2));
        assert_eq!(l.check(&1), Ok(1));
        assert_eq!(l.check(&1), Ok(0));
        let refused = l.check(&1).unwrap_err();
        assert!(refused.retry_after >= Duration::from_secs(29));
        assert_eq!(refused.quota, 3);
        assert_eq!(refused.window_secs, 60);
        // Another key is unaffected.
        assert_eq!(l.check(&2), Ok(2));
    }

    #[test]
    fn without_block_retry_is_the_replenish_time() {
        let l = limiter(2, Duration::from_secs(60), Duration::ZERO);
        l.check(&1).unwrap();
        l.check(&1).unwrap();
        let refused = l.check(&1).unwrap_err();
        assert!(refused.retry_after <= Duration::from_secs(30));
        assert!(refused.retry_after >= Duration::from_secs(29));
    }

    #[test]
    fn prune_forgets_idle_keys() {
        let l = limiter(1000, Duration::from_millis(1), Duration::ZERO);
        for k in 0..100 {
            l.check(&k).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        l.prune();
        assert_eq!(l.len(), 0);
    }
}
