//! Revocations pushed to every instance: a local copy of the revoked set, fed by Redis pub/sub,
//! so that checking a token costs no round trip.
//!
//! - The revoked set is one sorted set, `<p>:revoked`: token ids scored by their expiry (Unix
//!   ms). One key is one slot, so it works alike on one primary and on a cluster.
//! - Revoking is one script: `ZADD NX` with the token's expiry and, when it was not there,
//!   `PUBLISH <p>:revocations "<jti> <expiry ms>"`, atomically.
//! - Each instance subscribes to `<p>:revocations` (lazily, on the first check), then reads
//!   the unexpired entries (`ZRANGE … BYSCORE`): subscribing first, no revocation falls
//!   between the two. From then on a check is a lookup in memory. On a cluster it subscribes
//!   on one node (published messages reach every node), the next one after a failure.
//! - Until that copy is complete, and from the moment the subscription drops (Redis restarted,
//!   the connection cut) until it is complete again, the copy is not trusted: every check asks
//!   Redis (`ZSCORE`), as without the copy. So an instance fails closed, never open.
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

use super::Inner;

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

    /// Replaces the copy with `entries` (id, expiry in Unix ms) read from Redis, keeping what
    /// arrived meanwhile.
    fn load(&self, entries: Vec<(String, u64)>, now_ms: u64) {
        for (jti, until) in entries {
            self.insert(&jti, until, now_ms);
        }
    }
}

/// Starts the subscriber of `inner`'s store once (in the current tokio runtime, if any).
pub(super) fn start(inner: &Arc<Inner>) {
    let copy = &inner.revocations;
    if copy.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        copy.started.store(false, Ordering::Release);
        return;
    };
    // The task holds the store weakly: it ends when the store is dropped.
    let store = Arc::downgrade(inner);
    handle.spawn(async move {
        let mut backoff = Duration::from_millis(50);
        // Which node to subscribe on: the next one after each failure (a cluster's seeds).
        let mut node = 0;
        loop {
            let Some(inner) = store.upgrade() else { return };
            match follow(&inner, node).await {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::warn!(
                        target: "perishable::store",
                        error = %e,
                        "the revocation subscription failed: checking revocations in Redis until it is back"
                    );
                    node += 1;
                }
            }
            inner.revocations.synced.store(false, Ordering::Release);
            drop(inner);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
}

/// Subscribes (on node `node` of the store's list, modulo its length), reads the existing
/// revocations, then applies messages until the subscription ends.
///
/// On a cluster any node will do: a message published on one node reaches the subscribers of
/// every node.
async fn follow(inner: &Inner, node: usize) -> Result<(), String> {
    let client = &inner.nodes[node % inner.nodes.len()];
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    pubsub
        .subscribe(channel(&inner.prefix))
        .await
        .map_err(|e| e.to_string())?;
    // Subscribed first: what is revoked from now on arrives as a message.
    let key = inner.revoked_key();
    let now = super::now_ms();
    let entries: Vec<(String, f64)> = inner
        .run(|mut conn| async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(now)
                .arg("+inf")
                .arg("BYSCORE")
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut found: Vec<(String, u64)> = entries
        .into_iter()
        .map(|(jti, until)| (jti, until as u64))
        .collect();
    let conn = inner.conn().await.map_err(|e| e.to_string())?;
    if !conn.is_cluster() {
        found.extend(legacy(inner).await.map_err(|e| e.to_string())?);
    }
    let copy = &inner.revocations;
    copy.load(found, super::now_ms());
    copy.synced.store(true, Ordering::Release);
    tracing::debug!(target: "perishable::store", "revocations synchronised");
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let Ok(payload) = message.get_payload::<String>() else {
            continue;
        };
        if let Some((jti, until)) = payload.split_once(' ')
            && let Ok(until) = until.parse::<u64>()
        {
            copy.insert(jti, until, super::now_ms());
        }
    }
    Ok(())
}

/// The revocations recorded by versions before 0.2, one key each (`<p>:revoked:<jti>`, with
/// the token's expiry), read by `SCAN` on one primary. They expire with their tokens; reading
/// them keeps a token revoked before an upgrade revoked after it.
async fn legacy(inner: &Inner) -> Result<Vec<(String, u64)>, super::StoreError> {
    let pattern = format!("{}:revoked:*", escape_glob(&inner.prefix));
    let strip = format!("{}:revoked:", inner.prefix);
    let mut cursor: u64 = 0;
    let mut found: Vec<(String, u64)> = Vec::new();
    loop {
        let pattern = &pattern;
        let (next, keys, ttls): (u64, Vec<String>, Vec<i64>) = inner
            .run(|mut conn| async move {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("PTTL").arg(key);
                }
                let ttls: Vec<i64> = if keys.is_empty() {
                    Vec::new()
                } else {
                    pipe.query_async(&mut conn).await?
                };
                Ok((next, keys, ttls))
            })
            .await?;
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
        cursor = next;
        if cursor == 0 {
            return Ok(found);
        }
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

/// Revokes `ARGV[2]` until `ARGV[1]` (Unix ms) in the sorted set `KEYS[1]`, and when it was not
/// there, `PUBLISH ARGV[3] ARGV[4]`. Expired entries are dropped first; the set expires with its
/// last entry. Returns 1 when added, 0 when it was there already.
pub(super) const REVOKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('PUBLISH', ARGV[3], ARGV[4])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(last[2])) + 1000)
return 1
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
