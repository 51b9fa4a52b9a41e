//! [`MemoryStore`]: the default store, in this process's memory.

use std::sync::Arc;

use super::{Admission, RateDecision, RateLimiter, RatePolicy, Set, Store, StoreFuture};
use crate::caps::SessionCaps;
use crate::expiring::ExpiringSet;
use crate::rate_limit::Limiter;
use crate::session::unix_now;

/// State in memory: governor for rate limits, [`ExpiringSet`]s for ids, [`SessionCaps`] for
/// live sessions. Every operation completes at once.
#[derive(Debug, Default)]
pub struct MemoryStore {
    revoked: ExpiringSet,
    pow: ExpiringSet,
    dpop: ExpiringSet,
    caps: SessionCaps,
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
}

impl RateLimiter for Limiter<String> {
    fn check<'a>(&'a self, key: &'a str) -> StoreFuture<'a, RateDecision> {
        let key = key.to_owned();
        ready(match Limiter::check(self, &key) {
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
        })
    }

    fn policy(&self) -> &RatePolicy {
        Limiter::policy(self)
    }
}
