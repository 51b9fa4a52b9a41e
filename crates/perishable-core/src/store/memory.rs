//! [`MemoryStore`]: the default store, in this process's memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::{
    Admission, RateDecision, RateLimiter, RatePolicy, Reservation, Set, Store, StoreFuture,
};
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
    /// Budget key → (window, tokens used and reserved). Entries of past windows are dropped as
    /// they are met, and all of them when the map grows (see `reserve_tokens`).
    budgets: Mutex<HashMap<String, (u64, u64)>>,
    /// Session → (open streams, session exp).
    streams: Mutex<HashMap<String, (u32, u64)>>,
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
        key: &'a str,
        amount: u64,
        limit: u64,
        window_secs: u64,
    ) -> StoreFuture<'a, Reservation> {
        let (window, left) = window_of(unix_now(), window_secs);
        let mut budgets = self.budgets();
        if budgets.len() > 4096 {
            budgets.retain(|_, (w, _)| *w == window);
        }
        let entry = budgets.entry(key.to_owned()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        ready(if entry.1 >= limit {
            Reservation::Exhausted {
                retry_after_secs: left.max(1),
                used: entry.1,
            }
        } else {
            entry.1 = entry.1.saturating_add(amount);
            Reservation::Reserved { window }
        })
    }

    fn settle_tokens<'a>(
        &'a self,
        key: &'a str,
        window: u64,
        _window_secs: u64,
        delta: i64,
    ) -> StoreFuture<'a, ()> {
        if let Some(entry) = self.budgets().get_mut(key)
            && entry.0 == window
        {
            entry.1 = entry.1.saturating_add_signed(delta);
        }
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
}

impl MemoryStore {
    fn budgets(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u64)>> {
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

/// The current fixed window and the seconds left in it.
pub(crate) fn window_of(now: u64, window_secs: u64) -> (u64, u64) {
    let len = window_secs.max(1);
    (now / len, len - now % len)
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
