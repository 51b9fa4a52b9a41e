//! Two Perishable routers on two ports sharing one real `redis-server`: limits, revocations,
//! caps and replay caches hold across both; Redis stopping and coming back; GCRA on Redis agrees
//! with governor in memory.
//!
//! Each test starts its own `redis-server` on a free port and stops it. Without the binary the
//! tests print that they were skipped, and fail when `CI` is set (`.ci/run` installs it).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use perishable::config::OnUnavailable;
use perishable::dpop::DpopSigner;
use perishable::mock::{MockOptions, MockUpstream};
use perishable::store::{MemoryStore, RatePolicy, RedisStore, Store};
use perishable::{ConfigBuilder, SessionObject};
use serde_json::{Value, json};

/// Two proxies in front of one mock, sharing the Redis at `url`.
struct Pair {
    a: Proxy,
    b: Proxy,
}

async fn proxy_on(mock: &MockUpstream, config: ConfigBuilder) -> Proxy {
    let addr: SocketAddr = serve(perishable::router(config.build().unwrap())).await;
    Proxy {
        addr,
        mock: mock.clone(),
        http: client(),
    }
}

async fn pair(redis: &Redis, tweak: impl Fn(ConfigBuilder) -> ConfigBuilder) -> Pair {
    let mock = MockUpstream::start(MockOptions::new().api_key(SERVER_KEY))
        .await
        .unwrap();
    // A fresh prefix per test: tests share nothing even on one server.
    let prefix = format!("t{}", perishable::token::hash_b64(redis.url().as_bytes()));
    let config = || {
        tweak(
            common::config(&mock.base_url())
                .store_url(redis.url())
                .store_key_prefix(prefix.clone())
                .store_timeout_ms(300),
        )
    };
    Pair {
        a: proxy_on(&mock, config()).await,
        b: proxy_on(&mock, config()).await,
    }
}

async fn models(proxy: &Proxy, session: &SessionObject, fp: &str) -> reqwest::Response {
    proxy
        .openai(reqwest::Method::GET, "models", &session.token, fp)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn rate_limit_holds_across_instances() {
    let Some(redis) = Redis::start() else { return };
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
async fn revocation_holds_across_instances() {
    let Some(redis) = Redis::start() else { return };
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
async fn session_cap_counts_across_instances() {
    let Some(redis) = Redis::start() else { return };
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
async fn pow_solution_and_dpop_proof_work_once_across_instances() {
    let Some(redis) = Redis::start() else { return };
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
    assert_eq!(replayed.status(), 400);
    assert_eq!(error_code(replayed).await, "invalid_dpop_proof");
}

#[tokio::test]
async fn redis_outage_fails_closed_then_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let p = pair(&redis, |c| c.pow_difficulty(0)).await;
    let s = p.a.mint("device-out-001").await;
    assert_eq!(models(&p.a, &s, "device-out-001").await.status(), 200);

    redis.stop();
    let refused = models(&p.a, &s, "device-out-001").await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(body["error"]["type"], "api_error");
    let mint = p.b.mint_response("device-out-002").await;
    assert_eq!(mint.status(), 503, "closed: mints are refused too");
    // Routes that need no store keep working.
    let health = p.a.http.get(p.a.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);

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
}

#[tokio::test]
async fn redis_outage_fail_open_skips_limits_only() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let p = pair(&redis, |c| {
        c.pow_difficulty(0)
            .store_on_unavailable(OnUnavailable::Open)
            .rate_limit_mint_per_ip(100)
    })
    .await;
    let s = p.a.mint("device-open-01").await;
    redis.stop();
    // Limits are skipped: a mint (rate limit per IP, session cap; no proof of work) goes through.
    let minted = p.b.mint_response("device-open-02").await;
    assert_eq!(minted.status(), 200, "open: limits are skipped");
    // Revocation checks still fail closed.
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
async fn redis_gcra_agrees_with_governor() {
    let Some(redis) = Redis::start() else { return };
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
