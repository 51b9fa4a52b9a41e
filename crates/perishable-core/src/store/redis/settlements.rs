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
//! On a cluster a batch's buckets are grouped by slot: one `SETTLE_MANY` per slot, sent
//! together.
//!
//! Nothing here is lost on shutdown if the server waits for
//! [`store::settled`](crate::store::settled) (as `perishable::serve` does): a settlement is
//! counted from its call's end until its batch is in Redis. One that never gets there (Redis
//! down at exit) leaves its reservation standing: the client is charged what it reserved, never
//! less than it used.

use std::sync::{Arc, Weak};

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::Inner;
use super::cluster::by_slot;
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

/// The queue of the task that sends settlements.
pub(super) type Queue = mpsc::UnboundedSender<Settlement>;

/// Settles `delta` to `buckets`: queued for the next batch, or on its own outside a tokio
/// runtime.
pub(super) async fn settle(
    inner: &Arc<Inner>,
    buckets: &[Bucket],
    delta: i64,
) -> Result<(), StoreError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        let queue = inner.settlements.get_or_init(|| {
            let (queue, settler) = mpsc::unbounded_channel();
            tokio::spawn(run(Arc::downgrade(inner), settler));
            queue
        });
        let (done, answer) = oneshot::channel();
        let settlement = Settlement {
            buckets: buckets.to_vec(),
            delta,
            done,
        };
        if queue.send(settlement).is_ok() {
            return answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("settlement dropped".to_owned())));
        }
    }
    apply(inner, &[(buckets.to_vec(), delta)]).await
}

/// The task that sends settlements, holding the store weakly: it ends with the store (its
/// queue closes).
async fn run(store: Weak<Inner>, mut queue: mpsc::UnboundedReceiver<Settlement>) {
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
        let work: Vec<(Vec<Bucket>, i64)> = batch
            .iter_mut()
            .map(|s| (std::mem::take(&mut s.buckets), s.delta))
            .collect();
        let result = apply(&inner, &work).await;
        drop(inner);
        for settlement in batch.drain(..) {
            let _ = settlement.done.send(result.clone());
        }
    }
}

/// `SETTLE_MANY` for `batch`: one call, or on a cluster one per slot, sent together.
async fn apply(inner: &Inner, batch: &[(Vec<Bucket>, i64)]) -> Result<(), StoreError> {
    inner
        .run(|conn| async move {
            // Every bucket of the batch, with the settlement it belongs to, grouped by slot.
            let groups = by_slot(
                &conn,
                batch.iter().enumerate().flat_map(|(n, (buckets, _))| {
                    buckets
                        .iter()
                        .map(move |b| (inner.key("budget", &b.key), (n, b)))
                }),
            );
            let replies = join_all(groups.iter().map(|group| {
                let mut conn = conn.clone();
                let mut call = inner.settle_many.prepare_invoke();
                // Within a group, a settlement's buckets are adjacent and in order: one run
                // of `(settlement, its buckets here)` each.
                let mut runs: Vec<(usize, Vec<(&String, &Bucket)>)> = Vec::new();
                for (key, (n, bucket)) in group {
                    match runs.last_mut() {
                        Some((last, items)) if last == n => items.push((key, bucket)),
                        _ => runs.push((*n, vec![(key, bucket)])),
                    }
                }
                call.arg(runs.len());
                for (n, items) in &runs {
                    call.arg(items.len()).arg(batch[*n].1);
                    for (key, bucket) in items {
                        call.key(*key)
                            .arg(bucket.capacity.max(1))
                            .arg(bucket.window_secs.max(1));
                    }
                }
                async move { call.invoke_async::<i64>(&mut conn).await.map(|_| ()) }
            }))
            .await;
            replies.into_iter().collect::<Result<(), _>>()
        })
        .await
}
