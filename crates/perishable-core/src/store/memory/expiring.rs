//! A set of ids that forget themselves: each entry expires at a Unix time.
//!
//! It backs the revocation list (a revoked `jti` is kept until the token's own `exp`, after which
//! the token is refused anyway) and the proof-of-work replay cache (a used challenge is kept until
//! the challenge expires). Expired entries are pruned on insert, at most once a second, so the set
//! never holds more than what is still live.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Ids with an expiry, safe to share between threads.
#[derive(Debug, Default)]
pub(crate) struct ExpiringSet {
    /// Read-mostly: every authenticated request reads, only revocations write.
    entries: RwLock<HashMap<String, u64>>,
    /// Lets the hot path skip the lock entirely while the set is empty.
    len: AtomicUsize,
    /// Unix second of the last prune, so pruning runs at most once a second.
    last_prune: AtomicU64,
}

impl ExpiringSet {
    /// An empty set.
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds `id` until `expires_at` (Unix seconds). Returns `false` when it was already present
    /// and unexpired: the caller has seen a replay.
    pub(crate) fn insert(&self, id: &str, expires_at: u64, now: u64) -> bool {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.last_prune.swap(now, Ordering::Relaxed) != now {
            entries.retain(|_, exp| *exp > now);
        }
        let fresh = match entries.get(id) {
            Some(exp) if *exp > now => false,
            _ => {
                entries.insert(id.to_owned(), expires_at);
                true
            }
        };
        self.len.store(entries.len(), Ordering::Relaxed);
        fresh
    }

    /// Whether `id` is present and unexpired.
    pub(crate) fn contains(&self, id: &str, now: u64) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.get(id).is_some_and(|exp| *exp > now)
    }

    /// Entries held, live or not yet pruned.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_are_pruned() {
        let set = ExpiringSet::new();
        assert!(set.insert("a", 110, 100));
        assert!(!set.insert("a", 110, 105), "a replay is reported");
        assert!(set.contains("a", 109));
        assert!(!set.contains("a", 110));
        assert!(set.insert("b", 200, 150));
        assert_eq!(set.len(), 1, "a was pruned");
        assert!(
            set.insert("a", 300, 150),
            "an expired id can be inserted again"
        );
    }
}
