//! A local three-node Redis Cluster, started by the tests (`support::RedisCluster`): the whole
//! `Store` contract on it, two proxies sharing it (rate limits, revocations pushed, budgets),
//! one URL that leads to a cluster node, keys spread over the nodes by their hash tags, and a
//! split admission that takes all or nothing.
//!
//! Without `redis-server` (and the `redis-cli` it comes with) the tests are ignored, with the
//! reason in cargo's output, and fail when `CI` is set (`tests/build.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use perishable::store::{
    Bucket, CallAdmission, CallDecision, RedisStore, Reservation, Store, conformance,
};
use perishable::{ConfigBuilder, SessionObject};
use serde_json::json;

/// A prefix no other test uses.
fn prefix() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("cl{}", N.fetch_add(1, Ordering::Relaxed))
}

fn store(url: &str) -> RedisStore {
    RedisStore::new(url, &prefix(), Duration::from_secs(2)).unwrap()
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
async fn the_store_contract_holds_on_a_cluster() {
    let cluster = RedisCluster::start();
    conformance::run(&store(&cluster.url())).await;
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
async fn one_url_that_leads_to_a_cluster_node_is_a_cluster() {
    let cluster = RedisCluster::start();
    // One node named: the store finds it is a cluster node and learns the others from it.
    let one = format!("redis://127.0.0.1:{}/", cluster.ports[0]);
    conformance::run(&store(&one)).await;
}

/// Keys carry their identity as a hash tag: a client's rate-limit keys share a slot, and
/// different identities spread over the nodes.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
async fn keys_are_tagged_and_spread_over_the_nodes() {
    let cluster = RedisCluster::start();
    let store = RedisStore::new(&cluster.url(), "spread", Duration::from_secs(2)).unwrap();
    let ids: Vec<String> = (0..24).map(|i| format!("client-{i}")).collect();
    for id in &ids {
        let bucket = [Bucket::new(id.as_str(), 100, 60)];
        assert_eq!(
            store.reserve_tokens(&bucket, 10).await.unwrap(),
            Reservation::Reserved
        );
    }
    let mut owners = std::collections::HashSet::new();
    for id in &ids {
        let key = format!("spread:budget:{{{id}}}");
        let owner = cluster
            .owner_of(&key)
            .unwrap_or_else(|| panic!("{key} is on no node"));
        owners.insert(owner);
    }
    assert_eq!(owners.len(), 3, "24 identities should reach every node");
}

/// A call whose buckets fall in several slots: one bucket short refuses the call, and the
/// buckets of the other slots get back what they gave, as one script would have taken none.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
async fn a_split_admission_takes_all_or_nothing() {
    let cluster = RedisCluster::start();
    let store = store(&cluster.url());
    let limiter = store.rate_limiter(perishable::store::RatePolicy {
        name: "proxy",
        points: 1000,
        window: Duration::from_secs(60),
        block: Duration::ZERO,
    });
    let buckets = [
        Bucket::new("fp:device-a", 1000, 3600),
        Bucket::new("ip:10.0.0.1", 1000, 3600),
        Bucket::new("global", 150, 3600),
    ];
    let session_end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let admit = |amount: u64, stream: bool| {
        let mut call = CallAdmission::new();
        call.rate = Some((&*limiter, "fp:device-a"));
        call.buckets = &buckets;
        call.amount = amount;
        if stream {
            call.stream = Some(("session-1", 1, session_end));
        }
        store.admit_call(call)
    };
    assert_eq!(admit(100, true).await.unwrap(), CallDecision::Admitted);
    // The global bucket holds 50: refused, and neither the other buckets nor a stream slot
    // keep anything.
    match admit(100, false).await.unwrap() {
        CallDecision::Exhausted {
            bucket, available, ..
        } => assert_eq!((bucket, available), (2, 50)),
        other => panic!("{other:?}"),
    }
    for (bucket, left) in [(&buckets[0], 900), (&buckets[1], 900)] {
        assert_eq!(
            store
                .reserve_tokens(std::slice::from_ref(bucket), left)
                .await
                .unwrap(),
            Reservation::Reserved,
            "{} kept a refused call's tokens",
            bucket.key
        );
        store
            .settle_tokens(std::slice::from_ref(bucket), left as i64)
            .await
            .unwrap();
    }
    // The one stream slot is the first call's: a second is refused, and gives its tokens back.
    store.settle_tokens(&buckets[2..], 100).await.unwrap();
    assert_eq!(admit(10, true).await.unwrap(), CallDecision::StreamsFull);
    store.release_stream("session-1").await.unwrap();
    assert_eq!(admit(10, true).await.unwrap(), CallDecision::Admitted);
}

/// Two proxies in front of one mock, sharing the cluster.
async fn pair(cluster: &RedisCluster, tweak: impl Fn(ConfigBuilder) -> ConfigBuilder) -> Pair {
    pair_on(cluster.url(), prefix(), 1000, tweak).await
}

async fn chat(proxy: &Proxy, session: &SessionObject, fp: &str) -> reqwest::Response {
    proxy
        .openai(
            reqwest::Method::POST,
            "chat/completions",
            &session.token,
            fp,
        )
        .json(&json!({
            "model": "gpt-4o-mini",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .unwrap()
}

/// Limits, budgets and revocations hold across two instances on a cluster, as on one primary.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
async fn two_instances_share_limits_budgets_and_revocations_on_a_cluster() {
    let cluster = RedisCluster::start();
    let Pair { a, b } = pair(&cluster, |c| {
        c.pow_difficulty(0)
            .rate_limit_points(4)
            .rate_limit_duration_secs(60)
            .budget_tokens_per_window(100_000)
    })
    .await;
    let s = a.mint("device-cluster-01").await;
    // Four calls per minute, whichever instance takes them.
    for proxy in [&a, &b, &a, &b] {
        assert_eq!(chat(proxy, &s, "device-cluster-01").await.status(), 200);
    }
    let limited = chat(&b, &s, "device-cluster-01").await;
    assert_eq!(limited.status(), 429);
    assert_eq!(error_code(limited).await, "rate_limited");

    // Revoked on a, refused on b: pushed over the cluster's pub/sub.
    let t = a.mint("device-cluster-02").await;
    revoke(&a, &t, "device-cluster-02").await;
    refused_within(&b, &t, "device-cluster-02", Duration::from_secs(2)).await;
}

/// A small global budget on a cluster: spent across both instances, then refused with the
/// PROTOCOL error, and every call reserves in one round trip of scripts sent together.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
async fn a_budget_is_shared_across_instances_on_a_cluster() {
    let cluster = RedisCluster::start();
    let Pair { a, b } = pair(&cluster, |c| {
        c.pow_difficulty(0).budget_global_tokens_per_window(400)
    })
    .await;
    let s = a.mint("device-cluster-03").await;
    let mut refused = None;
    for i in 0..20 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let response = chat(proxy, &s, "device-cluster-03").await;
        if response.status() != 200 {
            refused = Some(response);
            break;
        }
    }
    let refused = refused.expect("a 400-token global budget never ran out");
    assert_eq!(refused.status(), 429);
    assert_eq!(error_code(refused).await, "budget_exhausted");
}

/// The whole cluster down: calls and mints are refused (`store.on_unavailable = "closed"`, the
/// default) within the store timeout, `/health` says so; the nodes back, service resumes with
/// no restart.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
async fn a_cluster_outage_fails_closed_then_recovers() {
    let mut cluster = RedisCluster::start();
    let Pair { a, b } = pair(&cluster, |c| {
        c.pow_difficulty(0).budget_tokens_per_window(100_000)
    })
    .await;
    let s = a.mint("device-cluster-04").await;
    assert_eq!(chat(&a, &s, "device-cluster-04").await.status(), 200);

    cluster.stop();
    let refused = chat(&a, &s, "device-cluster-04").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(error_code(refused).await, "store_unavailable");
    assert_eq!(b.mint_response("device-cluster-05").await.status(), 503);
    let health = a.http.get(a.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "unavailable", "store": "unreachable"})
    );

    cluster.spawn_nodes();
    let mut recovered = false;
    for _ in 0..100 {
        if chat(&a, &s, "device-cluster-04").await.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "service did not resume after the cluster came back"
    );
    assert_eq!(b.mint_response("device-cluster-06").await.status(), 200);
}
