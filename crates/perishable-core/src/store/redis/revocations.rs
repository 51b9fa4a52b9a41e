//! Revocations pushed to every instance: a local copy of the revoked set, fed by Redis pub/sub,
//! so that checking a token costs no round trip.
//!
//! - Revoking is one script: `SET <p>:revoked:<jti> NX` with the token's expiry, and, when it
//!   was not there, `PUBLISH <p>:revocations "<jti> <expiry ms>"`, atomically.
//! - Each instance subscribes to `<p>:revocations` (lazily, on the first check), then reads
//!   the revoked keys already in Redis (`SCAN`, with their expiry): subscribing first, no
//!   revocation falls between the two. From then on a check is a lookup in memory.
//! - Until that copy is complete, and from the moment the subscription drops (Redis restarted,
//!   the connection cut) until it is complete again, the copy is not trusted: every check asks
//!   Redis (`EXISTS`), as without the copy. So an instance fails closed, never open.
//!
//! Staleness: an instance learns of a revocation made elsewhere when the message arrives, the
//! time Redis takes to deliver a published message (the network's one-way delay, well under a
//! millisecond on a LAN). A request that reaches another instance within that time still
//! passes. The instance that revokes records it in its own copy at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 4096;
/// The longest wait between two attempts to subscribe again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The local copy: revoked ids and their expiry (Unix ms).
#[derive(Debug, Default)]
pub(super) struct Revocations {
    /// Whether the copy is complete: subscribed, and the existing keys read.
    synced: AtomicBool,
    /// Whether the subscriber task was started.
    started: AtomicBool,
    revoked: Mutex<HashMap<String, u64>>,
}

impl Revocations {
    /// Whether `jti` is revoked, from the copy; `None` when the copy is not complete (ask
    /// Redis).
    pub(super) fn contains(&self, jti: &str, now_ms: u64) -> Option<bool> {
        if !self.synced.load(Ordering::Acquire) {
            return None;
        }
        let revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        Some(revoked.get(jti).is_some_and(|&until| until > now_ms))
    }

    /// Records a revocation (from this instance, or a message).
    pub(super) fn insert(&self, jti: &str, until_ms: u64, now_ms: u64) {
        let mut revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        if revoked.len() >= SWEEP_AT {
            revoked.retain(|_, until| *until > now_ms);
        }
        revoked.insert(jti.to_owned(), until_ms);
    }

    /// Whether the copy is complete.
    pub(super) fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Starts the subscriber once (in the current tokio runtime, if any).
    pub(super) fn start(self: &Arc<Self>, client: redis::Client, prefix: String) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.started.store(false, Ordering::Release);
            return;
        };
        // The task holds the copy weakly: it ends when the store is dropped.
        let this = Arc::downgrade(self);
        handle.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let Some(copy) = this.upgrade() else { return };
                match copy.follow(&client, &prefix).await {
                    Ok(()) => backoff = Duration::from_millis(50),
                    Err(e) => {
                        tracing::warn!(
                            target: "perishable::store",
                            error = %e,
                            "the revocation subscription failed: checking revocations in Redis until it is back"
                        );
                    }
                }
                copy.synced.store(false, Ordering::Release);
                drop(copy);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }

    /// Subscribes, reads the existing revocations, then applies messages until the
    /// subscription ends.
    async fn follow(&self, client: &redis::Client, prefix: &str) -> redis::RedisResult<()> {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel(prefix)).await?;
        // Subscribed first: what is revoked from now on arrives as a message.
        let mut conn = client.get_multiplexed_async_connection().await?;
        let pattern = format!("{}:revoked:*", escape_glob(prefix));
        let strip = format!("{prefix}:revoked:");
        let mut cursor: u64 = 0;
        let mut found: Vec<(String, u64)> = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("PTTL").arg(key);
                }
                let ttls: Vec<i64> = pipe.query_async(&mut conn).await?;
                let now = super::now_ms();
                for (key, ttl) in keys.into_iter().zip(ttls) {
                    // -2: gone since; -1: no expiry (not one of ours): kept an hour.
                    let until = match ttl {
                        -2 => continue,
                        -1 => now + 3_600_000,
                        ttl => now + u64::try_from(ttl).unwrap_or(0),
                    };
                    if let Some(jti) = key.strip_prefix(&strip) {
                        found.push((jti.to_owned(), until));
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let now = super::now_ms();
        for (jti, until) in found {
            self.insert(&jti, until, now);
        }
        self.synced.store(true, Ordering::Release);
        tracing::debug!(target: "perishable::store", "revocations synchronised");
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            if let Some((jti, until)) = payload.split_once(' ')
                && let Ok(until) = until.parse::<u64>()
            {
                self.insert(jti, until, super::now_ms());
            }
        }
        Ok(())
    }
}

/// The channel revocations are published on.
pub(super) fn channel(prefix: &str) -> String {
    format!("{prefix}:revocations")
}

/// `prefix` with the glob characters of `SCAN MATCH` escaped.
fn escape_glob(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `SET KEYS[1] 1 PXAT ARGV[1] NX`, and when set, `PUBLISH ARGV[2] ARGV[3]`. Returns 1 when
/// set, 0 when it was there already.
pub(super) const REVOKE: &str = r"
if redis.call('SET', KEYS[1], 1, 'PXAT', ARGV[1], 'NX') then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_is_trusted_only_once_synchronised() {
        let copy = Revocations::default();
        copy.insert("a", 2_000, 1_000);
        assert_eq!(copy.contains("a", 1_000), None);
        copy.synced.store(true, Ordering::Release);
        assert_eq!(copy.contains("a", 1_000), Some(true));
        assert_eq!(copy.contains("a", 2_000), Some(false), "expired");
        assert_eq!(copy.contains("b", 1_000), Some(false));
    }

    #[test]
    fn expired_entries_are_swept() {
        let copy = Revocations::default();
        for i in 0..SWEEP_AT {
            copy.insert(&i.to_string(), 10, 0);
        }
        copy.insert("fresh", 1_000, 100);
        assert_eq!(copy.revoked.lock().unwrap().len(), 1);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
