//! A proxied call's admission ([`Store::admit_call`](crate::store::Store::admit_call)) on
//! Redis: one `ADMIT_CALL` script on one primary; on a cluster, one per slot the call's keys
//! fall in, sent together, with the parts that took something given back when another refused.
//!
//! Either way the call waits for one round trip before the upstream: the scripts of a split
//! admission go out at once, to the nodes that own their slots, and are awaited together.
//!
//! A split admission keeps the single script's answer, with two differences, both on a
//! refusal and both documented in `docs/scaling.md`:
//! - the parts that passed took their tokens and stream slot for one round trip before they
//!   are given back (another call may see those buckets lower for that long);
//! - a replayed proof or a refused rate limit in one part does not stop the others from
//!   counting the request (the rate limiter counts it; a refusal is still a request).

use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster_routing::Slot;

use super::connection::Conn;
use super::{Gcra, Inner, expiry_ms, settlements};
use crate::store::{Bucket, CallAdmission, CallDecision, RateDecision, Set, StoreError};

/// The Redis keys and arguments of one admission.
pub(super) struct CallKeys {
    /// Each bucket's key, capacity and refill seconds, in the caller's order.
    buckets: Vec<(String, u64, u64)>,
    amount: u64,
    /// The DPoP replay key and its expiry (Unix ms).
    replay: Option<(String, u64)>,
    /// The limiter's key (arrival time and block), and its parameters.
    rate: Option<(String, Gcra)>,
    /// The stream counter, its max and expiry (Unix s).
    stream: Option<(String, u32, u64)>,
}

/// The share of an admission that one script runs: which buckets (indices into
/// [`CallKeys::buckets`]) and which of the other parts.
#[derive(Debug, Default, Clone)]
struct Part {
    buckets: Vec<usize>,
    replay: bool,
    rate: bool,
    stream: bool,
}

impl CallKeys {
    pub(super) fn new(inner: &Inner, call: &CallAdmission<'_>) -> Self {
        let reserving = call.amount > 0 && !call.buckets.is_empty();
        let buckets: &[Bucket] = if reserving { call.buckets } else { &[] };
        Self {
            buckets: buckets
                .iter()
                .map(|b| {
                    (
                        inner.key("budget", &b.key),
                        b.capacity.max(1),
                        b.window_secs.max(1),
                    )
                })
                .collect(),
            amount: if reserving { call.amount } else { 0 },
            replay: call.replay.map(|(id, expires_at)| {
                (inner.key(Set::DpopSeen.name(), id), expiry_ms(expires_at))
            }),
            rate: call.rate.map(|(limiter, key)| {
                let name = limiter.policy().name;
                (
                    inner.key(&format!("rl:{name}"), key),
                    Gcra::of(limiter.policy()),
                )
            }),
            stream: call
                .stream
                .map(|(jti, max, exp)| (inner.key("streams", jti), max, exp)),
        }
    }

    /// The whole admission as one part.
    fn whole(&self) -> Part {
        Part {
            buckets: (0..self.buckets.len()).collect(),
            replay: self.replay.is_some(),
            rate: self.rate.is_some(),
            stream: self.stream.is_some(),
        }
    }

    /// The admission split by hash slot, in the order the slots first appear.
    fn by_slot(&self) -> Vec<Part> {
        fn part_of<'p>(parts: &'p mut Vec<(Slot, Part)>, key: &str) -> &'p mut Part {
            let slot = Slot::for_key(key);
            let at = match parts.iter().position(|(s, _)| *s == slot) {
                Some(at) => at,
                None => {
                    parts.push((slot, Part::default()));
                    parts.len() - 1
                }
            };
            &mut parts[at].1
        }
        let mut parts: Vec<(Slot, Part)> = Vec::new();
        if let Some((key, _)) = &self.replay {
            part_of(&mut parts, key).replay = true;
        }
        if let Some((tat, _)) = &self.rate {
            part_of(&mut parts, tat).rate = true;
        }
        if let Some((key, _, _)) = &self.stream {
            part_of(&mut parts, key).stream = true;
        }
        for (i, (key, _, _)) in self.buckets.iter().enumerate() {
            part_of(&mut parts, key).buckets.push(i);
        }
        parts.into_iter().map(|(_, part)| part).collect()
    }

    /// Runs the admission: one script, or on a cluster one per slot.
    pub(super) async fn admit(&self, inner: &Inner, conn: Conn) -> redis::RedisResult<Reply> {
        let parts = if conn.is_cluster() {
            self.by_slot()
        } else {
            vec![self.whole()]
        };
        // On one primary the admission carries the settlements waiting (`settlements.rs`): one
        // script instead of two. On a cluster their slots are not the admission's.
        let carried = if conn.is_cluster() {
            Vec::new()
        } else {
            inner.settlements.carry()
        };
        let settling = (!carried.is_empty()).then(|| settlements::arguments(inner, &carried));
        let replies = join_all(parts.iter().enumerate().map(|(i, part)| {
            let mut conn = conn.clone();
            let settling = settling.as_ref().filter(|_| i == 0);
            let invocation = self.invocation(inner, part, settling);
            async move { invocation.invoke_async::<Vec<i64>>(&mut conn).await }
        }))
        .await;
        if !carried.is_empty() {
            let result = match &replies[0] {
                Ok(_) => Ok(()),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            };
            for settlement in carried {
                settlement.finish(result.clone());
            }
        }
        let mut decisions = Vec::with_capacity(parts.len());
        let mut failure = None;
        for (part, reply) in parts.iter().zip(replies) {
            match reply.map(|reply| decision(&reply, &part.buckets)) {
                Ok(Some(decision)) => decisions.push((part, decision)),
                Ok(None) => failure = Some(Reply::Malformed),
                Err(e) => {
                    failure.get_or_insert(Reply::Failed(e));
                }
            }
        }
        let overall = match failure {
            Some(failure) => failure,
            None => Reply::Decided(combine(decisions.iter().map(|(_, d)| *d))),
        };
        if !matches!(overall, Reply::Decided(CallDecision::Admitted)) {
            // Give back what the parts that passed took: a split admission takes all or none.
            let taken = decisions
                .iter()
                .filter(|(_, d)| *d == CallDecision::Admitted)
                .map(|(part, _)| *part);
            self.give_back(inner, &conn, taken).await;
        }
        Ok(overall)
    }

    /// `ADMIT_CALL` for `part`, carrying `settling` (the keys and arguments of settlements)
    /// when given. The argument layout is documented with the script.
    fn invocation<'s>(
        &self,
        inner: &'s Inner,
        part: &Part,
        settling: Option<&(Vec<String>, Vec<i64>)>,
    ) -> redis::ScriptInvocation<'s> {
        let mut invocation = inner.admit_call.prepare_invoke();
        let amount = if part.buckets.is_empty() {
            0
        } else {
            self.amount
        };
        invocation.arg(amount);
        for &i in &part.buckets {
            let (key, capacity, secs) = &self.buckets[i];
            invocation.key(key).arg(capacity).arg(secs);
        }
        if part.replay
            && let Some((key, at_ms)) = &self.replay
        {
            invocation.key(key).arg(at_ms);
        }
        if part.rate
            && let Some((tat, gcra)) = &self.rate
        {
            invocation
                .key(tat)
                .arg(gcra.interval_us)
                .arg(gcra.points)
                .arg(gcra.block_us);
        }
        if part.stream
            && let Some((key, max, exp)) = &self.stream
        {
            invocation.key(key).arg(max).arg(exp);
        }
        let (mut sk, mut sa) = (0, 0);
        if let Some((keys, args)) = settling {
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            (sk, sa) = (keys.len(), args.len());
        }
        invocation
            .arg(part.buckets.len())
            .arg(u8::from(part.rate))
            .arg(u8::from(part.stream))
            .arg(u8::from(part.replay))
            .arg(sk)
            .arg(sa);
        invocation
    }

    /// Gives back the tokens and stream slots that `parts` took (best effort: a failure leaves
    /// the reservation standing, in the operator's favour, and the slot to its expiry).
    async fn give_back<'p>(
        &self,
        inner: &Inner,
        conn: &Conn,
        parts: impl Iterator<Item = &'p Part>,
    ) {
        let mut work = Vec::new();
        for part in parts {
            if !part.buckets.is_empty() && self.amount > 0 {
                let mut call = inner.settle.prepare_invoke();
                call.arg(self.amount);
                for &i in &part.buckets {
                    let (key, capacity, secs) = &self.buckets[i];
                    call.key(key).arg(capacity).arg(secs);
                }
                work.push(call);
            }
            if part.stream
                && let Some((key, _, _)) = &self.stream
            {
                let mut call = inner.release.prepare_invoke();
                call.key(key);
                work.push(call);
            }
        }
        let results = join_all(work.iter().map(|call| {
            let mut conn = conn.clone();
            async move { call.invoke_async::<i64>(&mut conn).await }
        }))
        .await;
        for result in results {
            if let Err(e) = result {
                tracing::warn!(
                    target: "perishable::store",
                    error = %e,
                    "could not give back a refused admission's share: it stands until it expires"
                );
            }
        }
    }
}

/// What [`CallKeys::admit`] found.
pub(super) enum Reply {
    Decided(CallDecision),
    Malformed,
    Failed(redis::RedisError),
}

impl Reply {
    pub(super) fn into_result(self) -> Result<CallDecision, StoreError> {
        match self {
            Self::Decided(decision) => Ok(decision),
            Self::Malformed => Err(StoreError::Unavailable(
                "malformed admission reply".to_owned(),
            )),
            Self::Failed(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }
}

/// One script's reply as a decision, its bucket index mapped back through `buckets`; `None`
/// when malformed.
fn decision(reply: &[i64], buckets: &[usize]) -> Option<CallDecision> {
    let field = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
    Some(match reply.first()? {
        0 => CallDecision::Admitted,
        1 => CallDecision::RateLimited(RateDecision {
            allowed: false,
            remaining: u32::try_from(field(1)).unwrap_or(u32::MAX),
            retry_after: Duration::from_micros(field(2)),
        }),
        2 => CallDecision::StreamsFull,
        3 => CallDecision::Exhausted {
            bucket: *buckets.get(usize::try_from(field(1)).ok()?)?,
            available: field(2),
            retry_after_secs: field(3),
        },
        4 => CallDecision::Replayed,
        _ => return None,
    })
}

/// The decision of a split admission: admitted when every part was; else the refusal the
/// single script would have given first (a replay, the rate limit, the stream slots, then the
/// short bucket that takes longest to refill).
fn combine(decisions: impl Iterator<Item = CallDecision>) -> CallDecision {
    let rank = |d: &CallDecision| match d {
        CallDecision::Replayed => 0,
        CallDecision::RateLimited(_) => 1,
        CallDecision::StreamsFull => 2,
        CallDecision::Exhausted { .. } => 3,
        _ => 4,
    };
    decisions
        .min_by(|a, b| {
            rank(a).cmp(&rank(b)).then_with(|| match (a, b) {
                (
                    CallDecision::Exhausted {
                        retry_after_secs: x,
                        ..
                    },
                    CallDecision::Exhausted {
                        retry_after_secs: y,
                        ..
                    },
                ) => y.cmp(x),
                _ => std::cmp::Ordering::Equal,
            })
        })
        .unwrap_or(CallDecision::Admitted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_index_maps_back_to_the_caller_s() {
        assert_eq!(
            decision(&[3, 1, 7, 9], &[0, 2]),
            Some(CallDecision::Exhausted {
                bucket: 2,
                available: 7,
                retry_after_secs: 9
            })
        );
        assert_eq!(decision(&[3, 5, 7, 9], &[0, 2]), None, "out of range");
        assert_eq!(decision(&[], &[]), None);
        assert_eq!(decision(&[9], &[]), None);
    }

    #[test]
    fn a_split_admission_answers_as_the_single_script_would() {
        let short = |bucket, retry_after_secs| CallDecision::Exhausted {
            bucket,
            available: 0,
            retry_after_secs,
        };
        let limited = CallDecision::RateLimited(RateDecision {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_secs(1),
        });
        use CallDecision::{Admitted, Replayed, StreamsFull};
        assert_eq!(combine([Admitted, Admitted].into_iter()), Admitted);
        assert_eq!(combine([Admitted, short(1, 5)].into_iter()), short(1, 5));
        assert_eq!(
            combine([short(0, 5), short(2, 9), Admitted].into_iter()),
            short(2, 9)
        );
        assert_eq!(combine([short(0, 5), StreamsFull].into_iter()), StreamsFull);
        assert_eq!(combine([StreamsFull, limited].into_iter()), limited);
        assert_eq!(combine([limited, Replayed, Admitted].into_iter()), Replayed);
    }
}
