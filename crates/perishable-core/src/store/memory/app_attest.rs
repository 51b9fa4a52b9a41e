//! Registered App Attest keys, each with its counter and an expiry: the logic of
//! [`Store::register_app_attest_key`](crate::store::Store::register_app_attest_key) and friends
//! for [`MemoryStore`](super::MemoryStore).
//!
//! Every operation takes one lock, so a registration and a counter raise are atomic: of two
//! concurrent registrations (or raises to the same counter) exactly one wins. Expired records are
//! pruned on registration, at most once a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::store::AppAttestKey;

/// Key id → (record, expiry in Unix seconds).
#[derive(Debug, Default)]
pub(crate) struct AppAttestKeys {
    /// One lock for all: writes are one per mint, and the compare-and-set needs it.
    keys: Mutex<HashMap<String, (AppAttestKey, u64)>>,
    /// Unix second of the last prune, so pruning runs at most once a second.
    last_prune: AtomicU64,
}

impl AppAttestKeys {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (AppAttestKey, u64)>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `key` as `id` until `expires_at`, unless a live record holds `id`.
    pub(crate) fn register(&self, id: &str, key: &AppAttestKey, expires_at: u64, now: u64) -> bool {
        let mut keys = self.lock();
        if self.last_prune.swap(now, Ordering::Relaxed) != now {
            keys.retain(|_, (_, exp)| *exp > now);
        }
        match keys.get(id) {
            Some((_, exp)) if *exp > now => false,
            _ => {
                keys.insert(id.to_owned(), (key.clone(), expires_at));
                true
            }
        }
    }

    /// The live record of `id`.
    pub(crate) fn get(&self, id: &str, now: u64) -> Option<AppAttestKey> {
        self.lock()
            .get(id)
            .filter(|(_, exp)| *exp > now)
            .map(|(key, _)| key.clone())
    }

    /// Raises the counter of the live record `id` to `counter` when strictly above, and keeps
    /// the record until `expires_at`.
    pub(crate) fn advance(&self, id: &str, counter: u32, expires_at: u64, now: u64) -> bool {
        let mut keys = self.lock();
        match keys.get_mut(id) {
            Some((key, exp)) if *exp > now && counter > key.counter => {
                key.counter = counter;
                *exp = expires_at;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(counter: u32) -> AppAttestKey {
        AppAttestKey::new(vec![4; 65], "TEAM.app", false, counter, 100)
    }

    #[test]
    fn first_writer_wins_counters_only_rise_and_records_expire() {
        let keys = AppAttestKeys::default();
        assert!(keys.register("k", &key(0), 200, 100));
        assert!(
            !keys.register("k", &key(7), 200, 101),
            "a second registration"
        );
        assert_eq!(keys.get("k", 101), Some(key(0)));
        assert!(!keys.advance("k", 0, 300, 102));
        assert!(keys.advance("k", 3, 300, 102));
        assert!(!keys.advance("k", 3, 300, 103), "the same counter twice");
        assert!(!keys.advance("k", 2, 300, 103));
        assert!(!keys.advance("other", 9, 300, 103), "an unknown key");
        assert_eq!(keys.get("k", 299).map(|k| k.counter), Some(3));
        // The raise extended the record to 300; past it, the key is gone.
        assert_eq!(keys.get("k", 300), None);
        assert!(!keys.advance("k", 4, 400, 300));
        assert!(
            keys.register("k", &key(0), 500, 301),
            "an expired id is free again"
        );
    }
}
