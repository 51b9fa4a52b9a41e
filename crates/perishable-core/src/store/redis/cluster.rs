//! Keys by hash slot, for Redis Cluster.
//!
//! A cluster runs a script only when all its keys are in one slot. Every key the store writes
//! carries a hash tag, the identity it is about (`<p>:budget:{fp:…}`, `<p>:streams:{<jti>}`),
//! so the keys of one identity always share a slot. An operation over several identities (a
//! session's caps by fingerprint and by key, a call's buckets for the client, its IP and
//! everyone) is split here into one script per slot, sent together; the caller gives back what
//! the parts that passed took when another part refused (all or none, as one script).
//!
//! On one primary nothing is split: one group holds every key.

use futures_util::future::join_all;
use redis::cluster_routing::Slot;
use redis::{FromRedisValue, RedisResult, Script, ScriptInvocation};

use super::connection::Conn;

/// `items` grouped by the hash slot of their key, each group in the items' order, the groups in
/// the order their slots first appear; on one primary, a single group.
pub(super) fn by_slot<T>(
    conn: &Conn,
    items: impl IntoIterator<Item = (String, T)>,
) -> Vec<Vec<(String, T)>> {
    let items = items.into_iter();
    if !conn.is_cluster() {
        let all: Vec<_> = items.collect();
        return if all.is_empty() {
            Vec::new()
        } else {
            vec![all]
        };
    }
    let mut groups: Vec<(Slot, Vec<(String, T)>)> = Vec::new();
    for (key, item) in items {
        let slot = Slot::for_key(&key);
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, group)) => group.push((key, item)),
            None => groups.push((slot, vec![(key, item)])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// Runs `script` over `keys` once per slot they fall in (once on one primary), all at once,
/// with `args` added after each group's keys. Returns each group's keys with its reply.
pub(super) async fn script_per_slot<T: FromRedisValue>(
    conn: &Conn,
    script: &Script,
    keys: impl IntoIterator<Item = String>,
    args: impl Fn(&mut ScriptInvocation<'_>),
) -> Vec<(Vec<String>, RedisResult<T>)> {
    let groups: Vec<Vec<String>> = by_slot(conn, keys.into_iter().map(|key| (key, ())))
        .into_iter()
        .map(|group| group.into_iter().map(|(key, ())| key).collect())
        .collect();
    let replies = join_all(groups.iter().map(|group| {
        let mut conn = conn.clone();
        let mut call = script.prepare_invoke();
        for key in group {
            call.key(key);
        }
        args(&mut call);
        async move { call.invoke_async::<T>(&mut conn).await }
    }))
    .await;
    groups.into_iter().zip(replies).collect()
}

/// `{id}`: `id` as a hash tag. Redis hashes what lies between the first `{` and the first `}`
/// after it, so an id holding a `}` is cut there: still the same slot for the same id.
pub(super) fn tag(id: &str) -> String {
    format!("{{{id}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_identity_share_a_slot() {
        let slot = |key: &str| Slot::for_key(key);
        assert_eq!(
            slot(&format!("p:rl:proxy:{}", tag("fp:abc"))),
            slot(&format!("p:caps:{}", tag("fp:abc")))
        );
        assert_eq!(
            slot(&format!("p:budget:{}", tag("usr:alice"))),
            slot(&format!("other:caps:{}", tag("usr:alice")))
        );
        assert_ne!(
            slot(&format!("p:budget:{}", tag("usr:alice"))),
            slot(&format!("p:budget:{}", tag("global")))
        );
    }
}
