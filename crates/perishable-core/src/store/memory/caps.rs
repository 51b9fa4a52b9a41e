//! Session caps: at most `session.max_per_fingerprint` live sessions per fingerprint, and per
//! DPoP key when the session is bound to one.
//!
//! A mint takes a slot under each of its keys (`fp:<hash>`, and `jkt:<thumbprint>` when bound);
//! when any key is full the mint gets `429 too_many_sessions`, with `Retry-After` set to when the
//! oldest of those sessions expires. Revoking a session frees its slots at once; expiry frees them
//! at the token's `exp`; a refresh moves the slot to the new token. Expired entries are pruned
//! as they are met, and all of them at most once a second, so memory follows live sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live sessions per key; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct SessionCaps {
    /// key → live sessions as (jti, exp). Short critical sections only: never held across await.
    live: Mutex<HashMap<String, Vec<(String, u64)>>>,
    last_prune: AtomicU64,
}

impl SessionCaps {
    /// Empty caps.
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(String, u64)>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn prune_all(&self, live: &mut HashMap<String, Vec<(String, u64)>>, now: u64) {
        if self.last_prune.swap(now, Ordering::Relaxed) != now {
            live.retain(|_, sessions| {
                sessions.retain(|(_, exp)| *exp > now);
                !sessions.is_empty()
            });
        }
    }

    /// Takes a slot under every key for session `jti` until `exp`, unless a key already holds
    /// `max` live sessions: then returns in how many seconds a slot frees up.
    pub(crate) fn admit(
        &self,
        keys: &[String],
        jti: &str,
        exp: u64,
        max: u32,
        now: u64,
    ) -> Result<(), u64> {
        let max = max.max(1) as usize;
        let mut live = self.lock();
        self.prune_all(&mut live, now);
        let mut wait = None;
        for key in keys {
            if let Some(sessions) = live.get_mut(key) {
                sessions.retain(|(_, e)| *e > now);
                if sessions.len() >= max {
                    let soonest = sessions.iter().map(|(_, e)| *e).min().unwrap_or(now);
                    wait = Some(wait.unwrap_or(0).max(soonest.saturating_sub(now)));
                }
            }
        }
        if let Some(wait) = wait {
            return Err(wait.max(1));
        }
        for key in keys {
            live.entry(key.clone())
                .or_default()
                .push((jti.to_owned(), exp));
        }
        Ok(())
    }

    /// Frees the slots of session `jti`.
    pub(crate) fn release(&self, keys: &[String], jti: &str) {
        let mut live = self.lock();
        for key in keys {
            if let Some(sessions) = live.get_mut(key) {
                sessions.retain(|(j, _)| j != jti);
                if sessions.is_empty() {
                    live.remove(key);
                }
            }
        }
    }

    /// Moves the slots of session `old` to `new`, valid until `exp`.
    pub(crate) fn replace(&self, keys: &[String], old: &str, new: &str, exp: u64) {
        let mut live = self.lock();
        for key in keys {
            let sessions = live.entry(key.clone()).or_default();
            sessions.retain(|(j, _)| j != old);
            sessions.push((new.to_owned(), exp));
        }
    }

    /// Keys with live sessions.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 2;

    fn keys(k: &str) -> Vec<String> {
        vec![k.to_owned()]
    }

    #[test]
    fn cap_release_expiry_and_replace() {
        let caps = SessionCaps::new();
        assert!(caps.admit(&keys("a"), "1", 100, MAX, 10).is_ok());
        assert!(caps.admit(&keys("a"), "2", 150, MAX, 10).is_ok());
        assert_eq!(caps.admit(&keys("a"), "3", 200, MAX, 10), Err(90));
        assert!(
            caps.admit(&keys("b"), "4", 200, MAX, 10).is_ok(),
            "other keys are separate"
        );
        caps.release(&keys("a"), "1");
        assert!(
            caps.admit(&keys("a"), "3", 200, MAX, 10).is_ok(),
            "revoking frees a slot"
        );
        assert!(caps.admit(&keys("a"), "5", 200, MAX, 10).is_err());
        assert!(
            caps.admit(&keys("a"), "5", 300, MAX, 151).is_ok(),
            "expiry frees a slot"
        );
        caps.replace(&keys("a"), "5", "6", 400);
        assert!(
            caps.admit(&keys("a"), "7", 400, MAX, 160).is_err(),
            "refresh keeps the count"
        );
    }

    #[test]
    fn every_key_must_have_room() {
        const MAX: u32 = 1;
        let caps = SessionCaps::new();
        assert!(caps.admit(&keys("fp:a"), "1", 100, MAX, 10).is_ok());
        let both = vec!["fp:b".to_owned(), "jkt:a".to_owned()];
        assert!(caps.admit(&both, "2", 100, MAX, 10).is_ok());
        let again = vec!["fp:c".to_owned(), "jkt:a".to_owned()];
        assert!(
            caps.admit(&again, "3", 100, MAX, 10).is_err(),
            "the key is full"
        );
        assert_eq!(caps.len(), 3, "a refused mint took no slot");
    }
}
