//! Settlements batched: the settlements that wait while one batch is in Redis go together in
//! the next, as one script.
//!
//! A settlement happens after its response, off the critical path, but under load each one is
//! still a script call: as many as the admissions. One task per store sends them. It takes
//! every settlement queued when it is free, up to [`MAX_BATCH`], and applies them in one
//! `SETTLE_MANY` call, in order (a bucket named twice sees both). At one call at a time a
//! batch is one settlement, as before. At many calls at once the scripts per call fall towards
//! one (the admission).
//!
//! A settlement still queued when the process exits is lost. Its reservation then stands: the
//! client is charged what it reserved, never less than it used.

use std::sync::Weak;

use tokio::sync::{mpsc, oneshot};

use super::Inner;
use crate::store::{Bucket, StoreError};

/// Most settlements in one script call (bounds the script's run time).
const MAX_BATCH: usize = 128;

/// One settlement: `delta` to every bucket, and where to say it is done.
pub(super) struct Settlement {
    pub(super) buckets: Vec<Bucket>,
    pub(super) delta: i64,
    pub(super) done: oneshot::Sender<Result<(), StoreError>>,
}

/// `SETTLE_MANY`: `ARGV[1]` settlements, each `n, delta` then `n` times `capacity, refill
/// seconds`, for the next `n` of `KEYS`. Each bucket as `SETTLE` does it: refilled to now,
/// `delta` added (never above capacity), deleted when full, else kept until 1 s after it is
/// full again.
pub(super) const SETTLE_MANY: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a, k = 2, 1
for _ = 1, tonumber(ARGV[1]) do
  local n, delta = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    local key = KEYS[k]
    local cap, secs = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    if cap < 1 then cap = 1 end
    if secs < 1 then secs = 1 end
    a, k = a + 2, k + 1
    local tokens = cap
    local v = redis.call('HMGET', key, 'tokens', 'ms')
    if v[1] and v[2] then
      local elapsed = now - tonumber(v[2])
      if elapsed < 0 then elapsed = 0 end
      tokens = tonumber(v[1]) + elapsed * cap / (secs * 1000)
      if tokens > cap then tokens = cap end
    end
    tokens = tokens + delta
    if tokens >= cap then
      redis.call('DEL', key)
    else
      redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'ms', string.format('%d', now))
      local ttl = math.ceil((cap - tokens) * (secs * 1000) / cap) + 1000
      if ttl > 1099511627776 then ttl = 1099511627776 end
      redis.call('PEXPIRE', key, string.format('%d', ttl))
    end
  end
end
return 1
";

/// The task that sends settlements, holding the store weakly: it ends with the store (its
/// queue closes).
pub(super) async fn run(store: Weak<Inner>, mut queue: mpsc::UnboundedReceiver<Settlement>) {
    let mut batch: Vec<Settlement> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else { return };
        let result = apply(&inner, &batch).await;
        drop(inner);
        for settlement in batch.drain(..) {
            let _ = settlement.done.send(result.clone());
        }
    }
}

/// One `SETTLE_MANY` call for `batch`.
async fn apply(inner: &Inner, batch: &[Settlement]) -> Result<(), StoreError> {
    inner
        .run(|mut conn| async move {
            let mut call = inner.settle_many.prepare_invoke();
            call.arg(batch.len());
            for settlement in batch {
                call.arg(settlement.buckets.len()).arg(settlement.delta);
                for bucket in &settlement.buckets {
                    call.key(inner.key("budget", &bucket.key))
                        .arg(bucket.capacity.max(1))
                        .arg(bucket.window_secs.max(1));
                }
            }
            call.invoke_async::<i64>(&mut conn).await.map(|_| ())
        })
        .await
}
