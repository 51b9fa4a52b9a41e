//! Two Perishable routers on two ports sharing one real `redis-server`: limits, revocations,
//! caps and replay caches hold across both; Redis stopping and coming back; GCRA on Redis agrees
//! with governor in memory; token buckets on `RedisStore` directly (refill, no double spend,
//! all or nothing, settling, atomicity, expiry); App Attest keys kept for their retention.
//!
//! Each test starts its own `redis-server` on a free port and stops it. Without the binary the
//! tests are ignored, with the reason in cargo's output, and fail when `CI` is set (`.ci/run`
//! installs it): see `tests/build.rs`.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use perishable::ConfigBuilder;
use perishable::config::OnUnavailable;
use perishable::dpop::DpopSigner;
use perishable::store::{
    AppAttestKey, Bucket, MemoryStore, RatePolicy, RedisStore, Reservation, Store,
};
use serde_json::{Value, json};

/// Two proxies sharing `redis`, under a prefix of their own.
async fn pair(redis: &Redis, tweak: impl Fn(ConfigBuilder) -> ConfigBuilder) -> Pair {
    // A fresh prefix per test: tests share nothing even on one server.
    let prefix = format!("t{}", perishable::fingerprint::hash(&redis.url()));
    pair_on(redis.url(), prefix, 300, tweak).await
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn rate_limit_holds_across_instances() {
    let redis = Redis::start();
    let p = pair(&redis, |c| {
        c.rate_limit_points(3)
            .rate_limit_duration_secs(60)
            .rate_limit_block_duration_secs(60)
    })
    .await;
    let s = p.a.mint("device-rl-0001").await;
    assert_eq!(models(&p.a, &s, "device-rl-0001").await.status(), 200);
    assert_eq!(models(&p.b, &s, "device-rl-0001").await.status(), 200);
    assert_eq!(models(&p.a, &s, "device-rl-0001").await.status(), 200);
    // The fourth request, on either instance, is over the shared limit of 3.
    let refused = models(&p.b, &s, "device-rl-0001").await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert!(refused.headers().contains_key("ratelimit-policy"));
    assert_eq!(error_code(refused).await, "rate_limited");
    // Blocked on the other instance too.
    assert_eq!(models(&p.a, &s, "device-rl-0001").await.status(), 429);
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn revocation_holds_across_instances() {
    let redis = Redis::start();
    let p = pair(&redis, |c| c).await;
    let s = p.a.mint("device-rv-0001").await;
    assert_eq!(models(&p.b, &s, "device-rv-0001").await.status(), 200);
    let revoked =
        p.a.http
            .delete(p.a.url("/session"))
            .bearer_auth(&s.token)
            .header("x-perishable-fingerprint", "device-rv-0001")
            .send()
            .await
            .unwrap();
    assert_eq!(revoked.status(), 204);
    let refused = models(&p.b, &s, "device-rv-0001").await;
    assert_eq!(refused.status(), 401);
    assert_eq!(error_code(refused).await, "session_revoked");
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn session_cap_counts_across_instances() {
    let redis = Redis::start();
    let p = pair(&redis, |c| c.session_max_per_fingerprint(2)).await;
    p.a.mint("device-cap-001").await;
    p.b.mint("device-cap-001").await;
    let refused = p.a.mint_response("device-cap-001").await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(error_code(refused).await, "too_many_sessions");
    // Another device is unaffected.
    p.b.mint("device-cap-002").await;
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn pow_solution_and_dpop_proof_work_once_across_instances() {
    let redis = Redis::start();
    // Both instances answer as one public URL, so a proof names the same htu for both.
    const PUBLIC: &str = "https://ai.perishable.test";
    let p = pair(&redis, |c| c.server_public_url(PUBLIC)).await;

    // Proof of work: solved once, used on A, replayed on B.
    let body = json!({
        "fingerprint": "device-pow-001",
        "entropy": human_entropy(),
        "pow": p.a.solved_pow().await,
    });
    let first =
        p.a.http
            .post(p.a.url("/session"))
            .json(&body)
            .send()
            .await
            .unwrap();
    assert_eq!(first.status(), 200);
    let replay =
        p.b.http
            .post(p.b.url("/session"))
            .json(&body)
            .send()
            .await
            .unwrap();
    assert_eq!(replay.status(), 400);
    assert_eq!(error_code(replay).await, "pow_invalid");

    // DPoP: a bound session; a proof used on A is refused on B.
    let key = DpopSigner::generate_es256();
    let body = json!({
        "fingerprint": "device-dpop-01",
        "entropy": human_entropy(),
        "pow": p.a.solved_pow().await,
    });
    let minted: Value =
        p.a.http
            .post(p.a.url("/session"))
            .header(
                "dpop",
                key.proof("POST", &format!("{PUBLIC}/session"), None),
            )
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(minted["token_type"], "DPoP", "{minted}");
    let token = minted["token"].as_str().unwrap();
    let proof = key.proof("GET", &format!("{PUBLIC}/openai/models"), Some(token));
    let send = |proxy: &Proxy| {
        proxy
            .http
            .get(proxy.url("/openai/models"))
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", proof.clone())
            .header("x-perishable-fingerprint", "device-dpop-01")
            .send()
    };
    assert_eq!(send(&p.a).await.unwrap().status(), 200);
    let replayed = send(&p.b).await.unwrap();
    assert_eq!(replayed.status(), 401, "RFC 9449 section 7.1");
    assert_eq!(error_code(replayed).await, "invalid_dpop_proof");
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_outage_fails_closed_then_recovers() {
    let mut redis = Redis::start();
    let p = pair(&redis, |c| c.pow_difficulty(0)).await;
    let s = p.a.mint("device-out-001").await;
    assert_eq!(models(&p.a, &s, "device-out-001").await.status(), 200);
    let health = p.a.http.get(p.a.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    redis.stop();
    let refused = models(&p.a, &s, "device-out-001").await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(body["error"]["type"], "api_error");
    let mint = p.b.mint_response("device-out-002").await;
    assert_eq!(mint.status(), 503, "closed: mints are refused too");
    // Readiness says so, for the load balancer.
    let health = p.a.http.get(p.a.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "unavailable", "store": "unreachable"})
    );

    redis.spawn();
    // The connection comes back by itself: no router restart.
    let mut recovered = false;
    for _ in 0..50 {
        if models(&p.a, &s, "device-out-001").await.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "service did not resume after Redis came back");
    assert_eq!(p.b.mint_response("device-out-003").await.status(), 200);
    let health = p.a.http.get(p.a.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_outage_fail_open_skips_rate_limits_only() {
    let mut redis = Redis::start();
    let p = pair(&redis, |c| {
        c.pow_difficulty(0)
            .store_on_unavailable(OnUnavailable::Open)
            .rate_limit_mint_per_ip(100)
            .budget_tokens_per_window(100_000)
    })
    .await;
    let s = p.a.mint("device-open-01").await;
    let chat =
        |proxy: &Proxy| {
            proxy
            .openai(reqwest::Method::POST, "chat/completions", &s.token, "device-open-01")
            .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
        };
    assert_eq!(chat(&p.a).await.unwrap().status(), 200);
    let calls = p.a.mock.requests().len();

    // Redis hangs: the revocation copy (pushed over a connection that still looks alive)
    // answers, and the rate limit is skipped; a budget is not a rate limit, so a budgeted call
    // is refused rather than forwarded unmetered.
    redis.pause();
    assert_eq!(models(&p.a, &s, "device-open-01").await.status(), 200);
    let refused = chat(&p.a).await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(error_code(refused).await, "store_unavailable");
    assert_eq!(
        p.a.mock.requests().len(),
        calls + 1,
        "only the models call went up"
    );
    redis.resume();

    // Redis is gone: the session cap fails closed like the budget, so a mint is refused.
    redis.stop();
    let minted = p.b.mint_response("device-open-02").await;
    assert_eq!(minted.status(), 503);
    assert_eq!(error_code(minted).await, "store_unavailable");
    // Not closed: readiness stays ok.
    let health = p.b.http.get(p.b.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Revocation checks fail closed too.
    let refused = models(&p.a, &s, "device-open-01").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(error_code(refused).await, "store_unavailable");
    redis.spawn();
    let mut recovered = false;
    for _ in 0..50 {
        if models(&p.a, &s, "device-open-01").await.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "service did not resume after Redis came back");
}

/// Runs `pattern` (true: send now; a number: sleep that many ms) against a limiter.
async fn run_pattern(store: Arc<dyn Store>, steps: &[Option<u64>]) -> Vec<bool> {
    let limiter = store.rate_limiter(RatePolicy {
        name: "agree",
        points: 4,
        window: Duration::from_secs(2),
        block: Duration::ZERO,
    });
    let mut out = Vec::new();
    for step in steps {
        match step {
            None => out.push(limiter.check("client").await.unwrap().allowed),
            Some(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
    }
    out
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_gcra_agrees_with_governor() {
    let redis = Redis::start();
    // 4 per 2 s: a burst of 4, then one every 500 ms. After 1.2 s, two are back (the third
    // would be at 1.5 s), with margins on both sides for a noisy machine.
    let steps = [
        None,
        None,
        None,
        None,
        None,
        None,
        Some(1200),
        None,
        None,
        None,
    ];
    let redis_store: Arc<dyn Store> =
        Arc::new(RedisStore::new(&redis.url(), "agree", Duration::from_secs(2)).unwrap());
    let (memory, on_redis) = tokio::join!(
        run_pattern(Arc::new(MemoryStore::new()), &steps),
        run_pattern(redis_store, &steps)
    );
    let expected = vec![true, true, true, true, false, false, true, true, false];
    assert_eq!(memory, expected, "governor");
    assert_eq!(on_redis, expected, "Redis GCRA");

    // And with a block: once over, refused for the block even when a request is free again.
    let blocked: Arc<dyn Store> =
        Arc::new(RedisStore::new(&redis.url(), "agree-block", Duration::from_secs(2)).unwrap());
    for store in [Arc::new(MemoryStore::new()) as Arc<dyn Store>, blocked] {
        let limiter = store.rate_limiter(RatePolicy {
            name: "blocked",
            points: 2,
            window: Duration::from_millis(200),
            block: Duration::from_secs(30),
        });
        assert!(limiter.check("k").await.unwrap().allowed);
        assert!(limiter.check("k").await.unwrap().allowed);
        let refused = limiter.check("k").await.unwrap();
        assert!(!refused.allowed);
        assert!(refused.retry_after >= Duration::from_secs(29), "{store:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !limiter.check("k").await.unwrap().allowed,
            "{store:?} still blocked"
        );
    }
}

// Token buckets on `RedisStore` directly. Exact answers come from buckets whose refill over a
// test's run is far below one token (1000 per day: one token per 86.4 s); where time matters,
// bounds have a second or more of slack, and sleeps only give lower bounds.

/// A store on `redis` under the prefix `tb`.
fn bucket_store(redis: &Redis) -> RedisStore {
    RedisStore::new(&redis.url(), "tb", Duration::from_secs(2)).unwrap()
}

async fn take(store: &RedisStore, buckets: &[Bucket], amount: u64) -> Reservation {
    store.reserve_tokens(buckets, amount).await.unwrap()
}

/// The `(bucket, available, retry_after_secs)` of a refusal.
async fn refused(store: &RedisStore, buckets: &[Bucket], amount: u64) -> (usize, u64, u64) {
    match take(store, buckets, amount).await {
        Reservation::Exhausted {
            bucket,
            available,
            retry_after_secs,
        } => (bucket, available, retry_after_secs),
        other => panic!("{amount} from {buckets:?}: {other:?}"),
    }
}

/// A bucket of 1000 tokens per day (one per 86.4 s).
fn daily(key: &str) -> Bucket {
    Bucket::new(key, 1000, 86_400)
}

/// Sends one command to `redis` over RESP and returns the first line of its reply.
fn redis_command(redis: &Redis, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    conn.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        conn.read_exact(&mut byte).unwrap();
        reply.push(byte[0]);
    }
    String::from_utf8(reply).unwrap().trim_end().to_owned()
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_bucket_admits_up_to_capacity_then_refuses() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    let a = [daily("a")];
    assert_eq!(take(&store, &a, 400).await, Reservation::Reserved);
    assert_eq!(take(&store, &a, 400).await, Reservation::Reserved);
    let (bucket, available, retry) = refused(&store, &a, 201).await;
    assert_eq!((bucket, available), (0, 200));
    // One token more: 86.4 s, rounded up (less what passed since).
    assert!((80..=87).contains(&retry), "{retry}");
    assert_eq!(take(&store, &a, 200).await, Reservation::Reserved);
    assert_eq!(refused(&store, &a, 1).await.1, 0);
    // Another key is another bucket.
    assert_eq!(
        take(&store, &[daily("b")], 1000).await,
        Reservation::Reserved
    );
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_bucket_refills_continuously() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    // 1000 per 4 s: 250 a second.
    let a = [Bucket::new("a", 1000, 4)];
    assert_eq!(take(&store, &a, 1000).await, Reservation::Reserved);
    let (_, _, retry) = refused(&store, &a, 1000).await;
    assert!((3..=4).contains(&retry), "{retry}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // Half the window: at least half back; not all of it, unless 4 s went by. More than the
    // capacity is never taken, so this only reads the level.
    let (_, available, _) = refused(&store, &a, 1001).await;
    assert!((500..1000).contains(&available), "{available}");
    assert_eq!(take(&store, &a, 500).await, Reservation::Reserved);
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_bucket_has_no_double_spend_across_a_window_boundary() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    // 1000 per 4 s. Wait for the last 300 ms of a 4 s fixed window (aligned to the epoch, as
    // the old counters were), spend it all there, and try again just after the boundary.
    let a = [Bucket::new("a", 1000, 4)];
    let ms_in_window = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 4000
    };
    while ms_in_window() < 3700 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(take(&store, &a, 1000).await, Reservation::Reserved);
    while ms_in_window() >= 3700 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A fixed window would start over here; the bucket only holds what refilled since.
    let (_, available, retry) = refused(&store, &a, 1000).await;
    assert!(available < 1000 && retry >= 1, "{available} {retry}");
    assert_eq!(take(&store, &a, available).await, Reservation::Reserved);
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_buckets_are_all_or_nothing() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    let (a, b) = (daily("a"), Bucket::new("b", 100, 86_400));
    assert_eq!(
        take(&store, std::slice::from_ref(&b), 80).await,
        Reservation::Reserved
    );
    let both = [a.clone(), b];
    // b holds 20 of the 50 asked: refused, with b named, and nothing taken from a.
    let (bucket, available, retry) = refused(&store, &both, 50).await;
    assert_eq!((bucket, available), (1, 20));
    // 30 tokens at 100 per day: 25 920 s.
    assert!((25_900..=25_920).contains(&retry), "{retry}");
    assert_eq!(take(&store, &[a], 1000).await, Reservation::Reserved);
    // When every bucket holds enough, each is taken from.
    let (c, d) = (daily("c"), daily("d"));
    assert_eq!(
        take(&store, &[c.clone(), d.clone()], 600).await,
        Reservation::Reserved
    );
    assert_eq!(refused(&store, &[c], 401).await.1, 400);
    assert_eq!(refused(&store, &[d], 401).await.1, 400);
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_bucket_retry_after_is_rounded_up() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    // 100 tokens per 199 s: one every 1.99 s. Emptied, one token is 1.99 s away: said 2
    // (1 were it rounded down), with 0.99 s of slack for the time between the two calls.
    let a = [Bucket::new("a", 100, 199)];
    assert_eq!(take(&store, &a, 100).await, Reservation::Reserved);
    assert_eq!(refused(&store, &a, 1).await, (0, 0, 2));
    // The whole capacity from empty: the window (less what passed since).
    let (_, _, retry) = refused(&store, &a, 100).await;
    assert!((197..=199).contains(&retry), "{retry}");
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_settle_gives_back_up_to_capacity() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    let a = [daily("a")];
    assert_eq!(take(&store, &a, 600).await, Reservation::Reserved);
    store.settle_tokens(&a, 200).await.unwrap();
    assert_eq!(refused(&store, &a, 601).await.1, 600);
    store.settle_tokens(&a, 10_000).await.unwrap();
    // Full again: the key is gone (a missing bucket is a full one), and no more than full.
    assert_eq!(redis_command(&redis, &["EXISTS", "tb:budget:{a}"]), ":0");
    assert_eq!(refused(&store, &a, 1001).await.1, 1000);
    assert_eq!(take(&store, &a, 1000).await, Reservation::Reserved);
    assert_eq!(refused(&store, &a, 1).await.1, 0);
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_settle_below_zero_is_a_debt_that_refills() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    let a = [daily("a")];
    assert_eq!(take(&store, &a, 1000).await, Reservation::Reserved);
    store.settle_tokens(&a, -500).await.unwrap();
    let (_, available, retry) = refused(&store, &a, 1).await;
    assert_eq!(available, 0);
    // 501 tokens at 86.4 s each: 43 286.4 s, said 43 287 (less what passed since).
    assert!((43_280..=43_287).contains(&retry), "{retry}");
    // A debt on a fast bucket: 1000 per 2 s, emptied and 1000 in debt: 2 s to pay it back.
    let fast = [Bucket::new("fast", 1000, 2)];
    assert_eq!(take(&store, &fast, 1000).await, Reservation::Reserved);
    store.settle_tokens(&fast, -1000).await.unwrap();
    let (_, available, retry) = refused(&store, &fast, 1).await;
    assert_eq!(available, 0);
    assert!((2..=3).contains(&retry), "{retry}");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(take(&store, &fast, 1).await, Reservation::Reserved);
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_amount_above_capacity_is_always_exhausted() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    let a = [Bucket::new("a", 100, 86_400)];
    assert_eq!(refused(&store, &a, 101).await, (0, 100, 1));
    assert_eq!(refused(&store, &a, u64::MAX).await, (0, 100, 1));
    assert_eq!(take(&store, &a, 50).await, Reservation::Reserved);
    // Half empty: the retry is the time to full (43 200 s), finite.
    let (_, available, retry) = refused(&store, &a, 101).await;
    assert_eq!(available, 50);
    assert!((43_190..=43_200).contains(&retry), "{retry}");
    store.settle_tokens(&a, i64::MIN).await.unwrap();
    let (_, available, retry) = refused(&store, &a, u64::MAX).await;
    assert_eq!(available, 0);
    assert_eq!(retry, 1 << 32, "a huge debt still has a finite answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_concurrent_reservations_never_overspend() {
    let redis = Redis::start();
    // Several stores (connections), as several instances would have.
    let stores: Vec<RedisStore> = (0..4).map(|_| bucket_store(&redis)).collect();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            tokio::spawn(async move {
                store
                    .reserve_tokens(&[Bucket::new("shared", 1000, 86_400)], 100)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        if task.await.unwrap() == Reservation::Reserved {
            passed += 1;
        }
    }
    assert_eq!(passed, 10);
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_bucket_keys_expire() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    // 1000 per 60 s, half taken: full again in 30 s; kept 1 s more.
    assert_eq!(
        take(&store, &[Bucket::new("a", 1000, 60)], 500).await,
        Reservation::Reserved
    );
    let pttl: i64 = redis_command(&redis, &["PTTL", "tb:budget:{a}"])[1..]
        .parse()
        .unwrap();
    assert!(pttl > 0 && pttl <= 31_000, "{pttl}");
    // A refusal writes nothing; an untouched bucket has no key.
    assert!(matches!(
        take(&store, &[Bucket::new("b", 10, 60)], 11).await,
        Reservation::Exhausted { .. }
    ));
    assert_eq!(redis_command(&redis, &["EXISTS", "tb:budget:{b}"]), ":0");
}

/// An App Attest key is kept until its retention, which each raise of its counter renews.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn redis_app_attest_keys_expire_after_their_retention() {
    let redis = Redis::start();
    let store = bucket_store(&redis);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = AppAttestKey::new(vec![4; 65], "ABCDE12345.com.example.app", false, 0, now);
    assert!(
        store
            .register_app_attest_key("k1", &key, now + 100)
            .await
            .unwrap()
    );
    let ttl = |redis: &Redis| -> i64 {
        redis_command(redis, &["TTL", "tb:appattest:{k1}"])[1..]
            .parse()
            .unwrap()
    };
    assert!((90..=101).contains(&ttl(&redis)), "{}", ttl(&redis));
    assert!(
        store
            .advance_app_attest_counter("k1", 1, now + 1_000)
            .await
            .unwrap()
    );
    assert!((990..=1_001).contains(&ttl(&redis)), "{}", ttl(&redis));
    // A refused raise renews nothing.
    assert!(
        !store
            .advance_app_attest_counter("k1", 1, now + 5_000)
            .await
            .unwrap()
    );
    assert!((990..=1_001).contains(&ttl(&redis)), "{}", ttl(&redis));
    // Gone when its time is up.
    assert!(
        store
            .advance_app_attest_counter("k1", 2, now)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(store.app_attest_key("k1").await.unwrap(), None);
    assert_eq!(
        redis_command(&redis, &["EXISTS", "tb:appattest:{k1}"]),
        ":0"
    );
}

/// `INFO commandstats`: calls per command (`cmdstat_<name>`).
fn command_calls(redis: &Redis) -> std::collections::HashMap<String, u64> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    conn.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .unwrap();
    let mut reader = BufReader::new(conn);
    let mut header = String::new();
    reader.read_line(&mut header).unwrap();
    let len: usize = header.trim_start_matches('$').trim().parse().unwrap();
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn calls(redis: &Redis, command: &str) -> u64 {
    command_calls(redis).get(command).copied().unwrap_or(0)
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn revocations_are_pushed_and_checked_without_a_round_trip() {
    let redis = Redis::start();
    let p = pair(&redis, |c| c.pow_difficulty(0)).await;
    let s = p.a.mint("device-push-001").await;
    // The first check subscribes; once the copy is synchronised, checks stay in memory.
    assert_eq!(models(&p.a, &s, "device-push-001").await.status(), 200);
    assert_eq!(models(&p.b, &s, "device-push-001").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = calls(&redis, "zscore");
    for _ in 0..10 {
        assert_eq!(models(&p.b, &s, "device-push-001").await.status(), 200);
    }
    assert_eq!(
        calls(&redis, "zscore"),
        before,
        "a revocation round trip per call"
    );

    // A revocation on a reaches b's copy: pushed, not polled.
    revoke(&p.a, &s, "device-push-001").await;
    refused_within(&p.b, &s, "device-push-001", Duration::from_secs(1)).await;
    assert_eq!(calls(&redis, "zscore"), before);

    // Cut b's subscription: until it is back, b asks Redis; nothing revoked meanwhile passes.
    let t = p.a.mint("device-push-002").await;
    assert_eq!(models(&p.b, &t, "device-push-002").await.status(), 200);
    redis_command(&redis, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    revoke(&p.a, &t, "device-push-002").await;
    refused_within(&p.b, &t, "device-push-002", Duration::from_millis(200)).await;
    refused_within(&p.b, &s, "device-push-001", Duration::from_millis(200)).await;
    // Resynchronised: the revocations made before are in the copy, and checks are local again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = calls(&redis, "zscore");
    refused_within(&p.b, &t, "device-push-002", Duration::from_millis(200)).await;
    refused_within(&p.b, &s, "device-push-001", Duration::from_millis(200)).await;
    assert_eq!(calls(&redis, "zscore"), before);
}

/// A proxied call asks Redis once before the upstream: one script (the rate-limit count, the
/// stream slot, the reservation), then one after (the settlement), and nothing else.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn one_round_trip_before_the_upstream() {
    let redis = Redis::start();
    let p = pair(&redis, |c| {
        c.pow_difficulty(0)
            .budget_tokens_per_window(1_000_000)
            .budget_max_concurrent_streams(4)
    })
    .await;
    let s = p.a.mint("device-one-rt-01").await;
    let chat = |proxy: &Proxy| {
        proxy
            .openai(
                reqwest::Method::POST,
                "chat/completions",
                &s.token,
                "device-one-rt-01",
            )
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 20,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(chat(&p.a).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = command_calls(&redis);
    const CALLS: u64 = 10;
    for _ in 0..CALLS {
        let response = chat(&p.a).await.unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    // Settlements are made after the response: wait for them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = command_calls(&redis);
    let delta =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    // One admission per call; each settlement rides on the next admission or goes on its own
    // (the last one always does).
    let scripts = delta("evalsha");
    assert!(
        (CALLS + 1..=2 * CALLS).contains(&scripts),
        "{scripts} scripts for {CALLS} calls: one admission per call, and at most one settlement"
    );
    assert_eq!(delta("exists"), 0, "revocations are checked in memory");
    assert_eq!(delta("zscore"), 0, "revocations are checked in memory");
    // The rate limit still counts: its key was written by the admission script.
    assert!(
        delta("set") >= CALLS,
        "the rate limit's state is written per call"
    );
}

/// With the count left to the admission, a call refused before it (a body the proxy refuses,
/// a path not allowed) is still counted.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn calls_refused_before_their_admission_are_still_counted() {
    let redis = Redis::start();
    let p = pair(&redis, |c| {
        c.pow_difficulty(0)
            .rate_limit_points(3)
            .rate_limit_duration_secs(3600)
            .budget_tokens_per_window(1_000_000)
    })
    .await;
    let s = p.a.mint("device-counted-1").await;
    let bad =
        p.a.openai(
            reqwest::Method::POST,
            "chat/completions",
            &s.token,
            "device-counted-1",
        )
        .header("content-type", "application/json")
        .body(r#"{"model": "m", "max_tokens": "many"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let path =
        p.a.openai(reqwest::Method::GET, "files", &s.token, "device-counted-1")
            .send()
            .await
            .unwrap();
    assert_eq!(path.status(), 403);
    // Counted in the background: give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(models(&p.b, &s, "device-counted-1").await.status(), 200);
    let refused = models(&p.a, &s, "device-counted-1").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(error_code(refused).await, "rate_limited");
}

/// Settlements made at once are batched into fewer script calls, and every one applies: 200
/// concurrent settlements of +2 after reservations of 2 leave the buckets as they started.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn concurrent_settlements_are_batched_and_all_applied() {
    let redis = Redis::start();
    let store = Arc::new(bucket_store(&redis));
    let shared = Bucket::new("batched-shared", 1_000_000, 10_000_000);
    let own: Vec<Bucket> = (0..200)
        .map(|i| Bucket::new(format!("batched-{i}"), 1_000, 10_000_000))
        .collect();
    for bucket in &own {
        let pair = [bucket.clone(), shared.clone()];
        assert!(matches!(
            take(&store, &pair, 2).await,
            Reservation::Reserved
        ));
    }
    let before = command_calls(&redis).get("evalsha").copied().unwrap_or(0);
    let mut settling = tokio::task::JoinSet::new();
    for bucket in &own {
        let store = store.clone();
        let pair = [bucket.clone(), shared.clone()];
        settling.spawn(async move { store.settle_tokens(&pair, 2).await.unwrap() });
    }
    while settling.join_next().await.is_some() {}
    let scripts = command_calls(&redis).get("evalsha").copied().unwrap_or(0) - before;
    assert!(scripts < 200, "200 settlements took {scripts} script calls");
    // Every bucket is full again: deleted, as a full bucket is.
    for bucket in own.iter().chain([&shared]) {
        assert_eq!(
            redis_command(
                &redis,
                &["EXISTS", &format!("tb:budget:{{{}}}", bucket.key)]
            ),
            ":0",
            "{} is not full again",
            bucket.key
        );
    }
}

/// A revocation recorded by an earlier version (one key per token, `<p>:revoked:<jti>`) still
/// holds once the local copy is synchronised: upgrading does not revive a revoked token.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn revocations_recorded_before_the_upgrade_still_hold() {
    use perishable::store::Set;
    let redis = Redis::start();
    redis_command(&redis, &["SET", "lg:revoked:old-jti", "1", "PX", "60000"]);
    let store = RedisStore::new(&redis.url(), "lg", Duration::from_secs(2)).unwrap();
    // Before the copy is synchronised, the check asks Redis, which reads the old key too.
    assert!(store.contains(Set::Revoked, "old-jti").await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    // The first check starts the subscription; from the synchronised copy on, it is local.
    while store.contains_now(Set::Revoked, "old-jti").is_none() {
        assert!(store.contains(Set::Revoked, "x").await.is_ok());
        assert!(tokio::time::Instant::now() < deadline, "never synchronised");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.contains_now(Set::Revoked, "old-jti"), Some(true));
    assert_eq!(store.contains_now(Set::Revoked, "other-jti"), Some(false));
}

/// On one primary the next admission carries the settlements waiting: they apply first, in the
/// same script, so the call sees the tokens given back, and no second script runs.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn an_admission_carries_the_settlements_waiting() {
    use perishable::store::{CallAdmission, CallDecision};
    let redis = Redis::start();
    let store = RedisStore::new(&redis.url(), "carry", Duration::from_secs(2)).unwrap();
    let buckets = [Bucket::new("fp:carried", 1000, 10_000_000)];
    let admit = |amount: u64| {
        let mut call = CallAdmission::new();
        call.buckets = &buckets;
        call.amount = amount;
        store.admit_call(call)
    };
    assert_eq!(admit(100).await.unwrap(), CallDecision::Admitted);
    let before = calls(&redis, "evalsha");
    // The call's 100 tokens come back; the settlement waits in the queue.
    let settling = tokio::spawn({
        let store = store.clone();
        let buckets = buckets.clone();
        async move { store.settle_tokens(&buckets, 100).await }
    });
    tokio::task::yield_now().await;
    // The whole bucket: only there if the settlement applied first.
    assert_eq!(admit(1000).await.unwrap(), CallDecision::Admitted);
    settling.await.unwrap().unwrap();
    assert_eq!(
        calls(&redis, "evalsha"),
        before + 1,
        "the settlement took a script of its own"
    );
}

/// What the property tests that compare the two stores share: a `redis-server`, a
/// current-thread runtime to run each case on, and a fresh pair of stores per case.
struct BothStores {
    redis: Redis,
    rt: tokio::runtime::Runtime,
    cases: std::sync::atomic::AtomicU64,
}

impl BothStores {
    /// The stores, and a runner of 32 cases that keeps no failure files.
    fn start() -> (Self, proptest::test_runner::TestRunner) {
        let both = Self {
            redis: Redis::start(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            cases: std::sync::atomic::AtomicU64::new(0),
        };
        let runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 32,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        });
        (both, runner)
    }

    /// A memory store and a Redis store under a prefix of its own, connected.
    ///
    /// Connected first: while the connection is made, the settlement task may take a queued
    /// settlement and send it after an admission that was queued later. That is allowed (a
    /// settlement is only ordered before what its caller awaited), but not what a step that
    /// settles then admits checks. Connected, both go out in queue order.
    async fn pair(&self) -> (Arc<dyn Store>, Arc<dyn Store>) {
        let case = self
            .cases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let on_redis: Arc<dyn Store> = Arc::new(
            RedisStore::new(
                &self.redis.url(),
                &format!("agree{case}"),
                Duration::from_secs(2),
            )
            .unwrap(),
        );
        on_redis.ping().await.unwrap();
        (Arc::new(MemoryStore::new()), on_redis)
    }
}

/// One step of [`redis_buckets_agree_with_memory`], on buckets chosen by index from [`POOL`].
#[derive(Clone, Debug)]
enum BucketStep {
    Reserve(Vec<usize>, u64),
    Settle(Vec<usize>, i64),
    /// A settlement queued, then an admission that carries it on Redis.
    SettleThenAdmit((Vec<usize>, i64), (Vec<usize>, u64)),
}

/// Buckets whose refill over a test case stays far below one token, with `window / capacity`
/// a whole number, so both stores round the same (see the test).
const POOL: [(&str, u64); 3] = [("fp:p", 1000), ("ip:p", 500), ("global", 2000)];

fn pool(indexes: &[usize]) -> Vec<Bucket> {
    indexes
        .iter()
        .map(|&i| Bucket::new(POOL[i].0, POOL[i].1, POOL[i].1 * 1000))
        .collect()
}

/// A reservation's or an admission's answer, the same shape on both stores.
async fn bucket_step(store: &Arc<dyn Store>, step: &BucketStep) -> Option<(usize, u64, u64)> {
    use perishable::store::{CallAdmission, CallDecision};
    match step {
        BucketStep::Reserve(indexes, amount) => {
            match store.reserve_tokens(&pool(indexes), *amount).await.unwrap() {
                Reservation::Reserved => None,
                Reservation::Exhausted {
                    bucket,
                    available,
                    retry_after_secs,
                } => Some((bucket, available, retry_after_secs)),
                other => panic!("{other:?}"),
            }
        }
        BucketStep::Settle(indexes, delta) => {
            store.settle_tokens(&pool(indexes), *delta).await.unwrap();
            None
        }
        BucketStep::SettleThenAdmit((settled, delta), (admitted, amount)) => {
            let settling = tokio::spawn({
                let store = store.clone();
                let (buckets, delta) = (pool(settled), *delta);
                async move { store.settle_tokens(&buckets, delta).await }
            });
            // Queued before the admission is sent (this is a current-thread runtime).
            tokio::task::yield_now().await;
            let buckets = pool(admitted);
            let mut call = CallAdmission::new();
            call.buckets = &buckets;
            call.amount = *amount;
            let decision = store.admit_call(call).await.unwrap();
            settling.await.unwrap().unwrap();
            match decision {
                CallDecision::Admitted => None,
                CallDecision::Exhausted {
                    bucket,
                    available,
                    retry_after_secs,
                } => Some((bucket, available, retry_after_secs)),
                other => panic!("{other:?}"),
            }
        }
    }
}

/// The token buckets on Redis (`bucket_lua` and `settle_many_lua` in `store/redis/scripts.rs`:
/// reservations, settlements, and settlements carried by an admission, on buckets named once
/// or twice in a call) answer as the memory store does, step by step, over generated
/// sequences; and both hold the same tokens at the end.
///
/// Refill stays below one token per case and `window / capacity` is 1000 s per token, so a
/// case's elapsed time (under a second) changes no rounded answer: both stores must agree
/// exactly.
#[test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
fn redis_buckets_agree_with_memory() {
    use proptest::prelude::*;
    let (both, mut runner) = BothStores::start();
    let indexes = || proptest::collection::vec(0..POOL.len(), 1..=3);
    let step = prop_oneof![
        (indexes(), 0..2500u64).prop_map(|(b, n)| BucketStep::Reserve(b, n)),
        (indexes(), -800..800i64).prop_map(|(b, d)| BucketStep::Settle(b, d)),
        ((indexes(), -800..800i64), (indexes(), 0..2500u64))
            .prop_map(|(s, a)| BucketStep::SettleThenAdmit(s, a)),
    ];
    runner
        .run(&proptest::collection::vec(step, 1..12), |steps| {
            both.rt.block_on(async {
                let (memory, on_redis) = both.pair().await;
                for (n, step) in steps.iter().enumerate() {
                    let expected = bucket_step(&memory, step).await;
                    let got = bucket_step(&on_redis, step).await;
                    prop_assert_eq!(got, expected, "step {} of {:?}", n, steps);
                }
                // What each bucket holds now: asked for more than its capacity, it says.
                for (i, (_, capacity)) in POOL.iter().enumerate() {
                    let probe = BucketStep::Reserve(vec![i], capacity + 1);
                    let expected = bucket_step(&memory, &probe).await;
                    prop_assert_eq!(
                        bucket_step(&on_redis, &probe).await,
                        expected,
                        "bucket {}",
                        i
                    );
                }
                Ok(())
            })
        })
        .unwrap();
}

/// Rate-limit checks on generated policies and sequences of clients: on Redis (`gcra_lua`,
/// through the limiter's own script and through a call's admission, interleaved) they answer as
/// governor does in memory: allowed or not, the requests remaining, and the wait to within a
/// second, with and without a block. Windows of 1000 s leave nothing replenished during a case;
/// that a block outlasts a replenished request is `redis_gcra_agrees_with_governor`'s.
#[test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
fn redis_rate_limits_agree_with_memory() {
    use perishable::store::{CallAdmission, CallDecision};
    use proptest::prelude::*;
    let (both, mut runner) = BothStores::start();
    // (points, block?, checks: (client, through an admission?))
    let strategy = (
        1..5u32,
        any::<bool>(),
        proptest::collection::vec((0..3usize, any::<bool>()), 1..14),
    );
    runner
        .run(&strategy, |(points, blocking, checks)| {
            both.rt.block_on(async {
                let policy = RatePolicy {
                    name: "generated",
                    points,
                    window: Duration::from_secs(1000),
                    block: if blocking {
                        Duration::from_secs(600)
                    } else {
                        Duration::ZERO
                    },
                };
                let (memory, on_redis) = both.pair().await;
                let limiters = [
                    memory.rate_limiter(policy.clone()),
                    on_redis.rate_limiter(policy),
                ];
                for (n, &(client, admitted)) in checks.iter().enumerate() {
                    let key = format!("client-{client}");
                    let mut answers = Vec::new();
                    for (store, limiter) in [&memory, &on_redis].into_iter().zip(&limiters) {
                        let decision = if admitted {
                            let mut call = CallAdmission::new();
                            call.rate = Some((&**limiter, &key));
                            match store.admit_call(call).await.unwrap() {
                                CallDecision::Admitted => None,
                                CallDecision::RateLimited(decision) => Some(decision),
                                other => panic!("{other:?}"),
                            }
                        } else {
                            Some(limiter.check(&key).await.unwrap())
                        };
                        answers.push(decision);
                    }
                    let [expected, got] = [&answers[0], &answers[1]];
                    let context =
                        format!("check {n} of {checks:?}, {points} points, block {blocking}");
                    match (expected, got) {
                        (None, None) => {}
                        (Some(e), Some(g)) => {
                            prop_assert_eq!(e.allowed, g.allowed, "{}", context);
                            if e.allowed {
                                prop_assert_eq!(e.remaining, g.remaining, "{}", context);
                            } else {
                                let (e, g) =
                                    (e.retry_after.as_secs_f64(), g.retry_after.as_secs_f64());
                                prop_assert!(
                                    (e - g).abs() <= 1.0,
                                    "retry {} against {}: {}",
                                    g,
                                    e,
                                    context
                                );
                            }
                        }
                        // An admission answers `Admitted` for an allowed request.
                        (e, g) => prop_assert!(false, "{:?} against {:?}: {}", g, e, context),
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}
