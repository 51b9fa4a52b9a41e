//! Settlements batched, and carried by the next admission: after its response, a call's
//! settlement (the unused reservation given back, or the overrun taken) waits in a queue.
//!
//! - On one primary, the next call's admission script takes everything queued and applies it
//!   first, in the same round trip (`admission.rs`): under steady traffic a call costs one
//!   script, not two, and no admission waits behind a settlement on the connection.
//! - When no admission comes within [`LINGER`], one task per store sends what is queued, up to
//!   [`MAX_BATCH`] at a time, as one `SETTLE_MANY` script. An admission that takes everything
//!   ends the task's wait early: no timer is left to wake an idle instance for nothing.
//! - On a cluster the task sends everything (an admission's slots are not the settlements'),
//!   grouped by slot: one `SETTLE_MANY` per slot, sent together.
//!
//! Either way the settlements apply in order (a bucket named twice sees both), and each caller
//! learns when its own is in Redis. A settlement reaches Redis at most [`LINGER`] plus one
//! round trip after its response.
//!
//! Nothing here is lost on shutdown if the server waits for
//! [`store::settled`](crate::store::settled) (as `perishable::serve` does): a settlement is
//! counted from its call's end until it is in Redis. One that never gets there (Redis down at
//! exit) leaves its reservation standing: the client is charged what it reserved, never less
//! than it used.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{Notify, oneshot};

use super::Inner;
use super::cluster::by_slot;
use crate::store::{Bucket, StoreError};

/// Most settlements in one script call (bounds the script's run time).
pub(super) const MAX_BATCH: usize = 128;

/// How long a settlement waits for an admission to carry it before the task sends it.
const LINGER: Duration = Duration::from_millis(1);

/// One settlement: `delta` to every bucket, and where to say it is done.
pub(super) struct Settlement {
    pub(super) buckets: Vec<Bucket>,
    pub(super) delta: i64,
    pub(super) done: oneshot::Sender<Result<(), StoreError>>,
}

impl Settlement {
    /// Tells the caller how it went.
    pub(super) fn finish(self, result: Result<(), StoreError>) {
        let _ = self.done.send(result);
    }
}

/// The settlements waiting, shared by the store, its admissions and the sending task.
#[derive(Default)]
pub(super) struct Queue {
    pending: Mutex<Vec<Settlement>>,
    /// Wakes the task: something was queued, or the store is gone.
    wake: Notify,
    /// Wakes the task from its [`LINGER`] wait: an admission took everything waiting.
    carried: Notify,
    started: AtomicBool,
    closed: AtomicBool,
}

impl Queue {
    /// Up to [`MAX_BATCH`] of the settlements waiting, oldest first.
    pub(super) fn take(&self) -> Vec<Settlement> {
        self.take_counting().0
    }

    /// [`take`](Self::take), for an admission to carry. When it leaves nothing behind, the task
    /// stops waiting: no timer is left to wake an idle thread for nothing.
    pub(super) fn carry(&self) -> Vec<Settlement> {
        let (batch, left) = self.take_counting();
        if !batch.is_empty() && left == 0 {
            self.carried.notify_waiters();
        }
        batch
    }

    /// The batch taken, and how many settlements are still waiting.
    fn take_counting(&self) -> (Vec<Settlement>, usize) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let n = pending.len().min(MAX_BATCH);
        let batch = pending.drain(..n).collect();
        (batch, pending.len())
    }

    fn is_empty(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Ends the task (the store is dropped).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// `SETTLE_MANY`: `ARGV[1]` settlements, each `n, delta` then `n` times `capacity, refill
/// seconds`, for the next `n` of `KEYS` (see `settle_many_lua` in `scripts.rs`).
pub(super) const SETTLE_MANY: &str = concat!(
    clock_lua!(),
    "local NB = 0\n",
    bucket_lua!(),
    settle_many_lua!(),
    r"
settle_many(1, 1)
flush()
return 1
"
);

/// The settlement arguments of `batch` for a script: `count`, then per settlement `n, delta`
/// and `n` times `capacity, refill seconds`; and its keys. What `settle_many(k, a)` reads.
pub(super) fn arguments(inner: &Inner, batch: &[Settlement]) -> (Vec<String>, Vec<i64>) {
    let mut keys = Vec::new();
    let mut args = vec![i64::try_from(batch.len()).unwrap_or(i64::MAX)];
    for settlement in batch {
        args.push(i64::try_from(settlement.buckets.len()).unwrap_or(i64::MAX));
        args.push(settlement.delta);
        for bucket in &settlement.buckets {
            keys.push(inner.key("budget", &bucket.key));
            args.push(i64::try_from(bucket.capacity.max(1)).unwrap_or(i64::MAX));
            args.push(i64::try_from(bucket.window_secs.max(1)).unwrap_or(i64::MAX));
        }
    }
    (keys, args)
}

/// Settles `delta` to `buckets`: queued (for the next admission, or the task), or on its own
/// outside a tokio runtime.
pub(super) async fn settle(
    inner: &Arc<Inner>,
    buckets: &[Bucket],
    delta: i64,
) -> Result<(), StoreError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        let queue = &inner.settlements;
        if !queue.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run(Arc::downgrade(inner), queue.clone()));
        }
        let (done, answer) = oneshot::channel();
        queue
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Settlement {
                buckets: buckets.to_vec(),
                delta,
                done,
            });
        queue.wake.notify_one();
        return answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("settlement dropped".to_owned())));
    }
    apply(inner, &[(buckets.to_vec(), delta)]).await
}

/// The task that sends the settlements no admission carried, holding the store weakly: it ends
/// with the store.
async fn run(store: Weak<Inner>, queue: Arc<Queue>) {
    loop {
        queue.wake.notified().await;
        if queue.closed.load(Ordering::Acquire) {
            return;
        }
        // An admission carried what woke the task before it ran.
        if queue.is_empty() {
            continue;
        }
        let carried = tokio::select! {
            () = tokio::time::sleep(LINGER) => false,
            () = queue.carried.notified() => true,
        };
        // Everything was carried: a settlement queued since gets a wait of its own (its
        // `wake` is still pending).
        if carried {
            continue;
        }
        loop {
            let batch = queue.take();
            if batch.is_empty() {
                break;
            }
            let Some(inner) = store.upgrade() else {
                for settlement in batch {
                    settlement.finish(Err(StoreError::Unavailable("store dropped".to_owned())));
                }
                return;
            };
            let work: Vec<(Vec<Bucket>, i64)> =
                batch.iter().map(|s| (s.buckets.clone(), s.delta)).collect();
            let result = apply(&inner, &work).await;
            drop(inner);
            for settlement in batch {
                settlement.finish(result.clone());
            }
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
