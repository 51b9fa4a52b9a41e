//! Micro-benchmarks of every check on Perishable's hot path, through the public API only.
//!
//! ```text
//! cargo bench --bench micro
//! taskset -c 0 cargo bench --bench micro     # pinned, as in docs/performance.md
//! ```
//!
//! Groups:
//!
//! - `token`: session token verification, HS256 and EdDSA, every check every time
//!   (`TokenCodec::verify_uncached`) and through the cache of already-verified tokens
//!   (`TokenCodec::verify`, a hit: the token was seen before and its `exp` is still ahead).
//! - `dpop`: one DPoP proof verification (ES256 and EdDSA proof keys), every RFC 9449 check but
//!   the replay record.
//! - `fingerprint`: the constant-time fingerprint check (`fingerprint::matches`).
//! - `rate_limit`: one in-memory decision, on the `Limiter` directly and through the
//!   `RateLimiter` trait object the layer calls (`MemoryStore::rate_limiter`).
//! - `verify_plus_rate_limit`: what an authenticated request costs before the upstream:
//!   `Sessions::verify` (token, revocation lookup, fingerprint, User-Agent) plus the rate-limit
//!   decision, with the verified-token cache (the default) and without it
//!   (`session.verified_cache_size = 0`). The issue's target is 5 µs.
//! - `entropy`: `entropy::score` of a human-like trace and of the largest trace accepted.
//! - `pow`: `ProofOfWork::check` of a solved challenge (16 bits, the default).
//! - `stack`: one whole request through `origin_layer`, `verify_layer`, `rate_limit_layer` and an
//!   in-process upstream `service_fn`, with `ServiceExt::oneshot`; and the upstream alone, to
//!   subtract. A DPoP-bound variant makes a fresh proof per request outside the timing.
#![allow(missing_docs, clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use perishable::config::{Algorithm, DpopMode};
use perishable::dpop::{DpopSigner, DpopVerifier, Expected, Htu};
use perishable::entropy::Entropy;
use perishable::fingerprint;
use perishable::pow::{PowSolution, ProofOfWork};
use perishable::store::{Limiter, MemoryStore, RatePolicy, Store};
use perishable::token::Claims;
use perishable::{Body, Config, Perishable};
use tower::{ServiceBuilder, ServiceExt, service_fn};

const FINGERPRINT: &str = "bench-device-0123456789";
const UA: &str = "perishable-bench/1.0";
const SECRET: &str = "bench-secret-bench-secret-bench-secret!!";
const HOST: &str = "127.0.0.1:8080";
const PATH: &str = "/openai/chat/completions";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn config(algorithm: Algorithm, dpop: DpopMode) -> Config {
    config_with_cache(algorithm, dpop, true)
}

fn config_with_cache(algorithm: Algorithm, dpop: DpopMode, cache: bool) -> Config {
    let mut builder = Config::builder()
        .upstream_api_key("sk-bench")
        .session_algorithm(algorithm)
        .session_dpop(dpop)
        .rate_limit_points(1_000_000_000)
        .rate_limit_duration_secs(60);
    if !cache {
        builder = builder.session_verified_cache_size(0);
    }
    if algorithm == Algorithm::HS256 {
        builder = builder.session_jwt_secret(SECRET);
    }
    builder.build().unwrap()
}

fn perishable(algorithm: Algorithm, dpop: DpopMode) -> Perishable {
    Perishable::new(config(algorithm, dpop)).unwrap()
}

/// A session token as `POST /session` would mint it (bound to `FINGERPRINT` and `UA`).
fn token(p: &Perishable, jkt: Option<String>) -> String {
    let now = now();
    let claims = Claims {
        iss: p.config().session().issuer.clone(),
        aud: p.config().session().audience.clone(),
        jti: "bench-jti-0123456789abcdef".to_owned(),
        iat: now,
        nbf: now,
        exp: now + 3600,
        auth_time: now,
        fp: fingerprint::hash(FINGERPRINT),
        ua: Some(fingerprint::hash(UA)),
        cnf: jkt.map(|jkt| perishable::token::Confirmation { jkt }),
        usr: None,
        tier: None,
    };
    p.sessions().codec().sign(&claims).unwrap()
}

fn request(token: &str, dpop: Option<&str>) -> Request<Body> {
    let scheme = if dpop.is_some() { "DPoP" } else { "Bearer" };
    let mut builder = Request::post(PATH)
        .header(http::header::HOST, HOST)
        .header(http::header::AUTHORIZATION, format!("{scheme} {token}"))
        .header("x-perishable-fingerprint", FINGERPRINT)
        .header(http::header::USER_AGENT, UA)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(proof) = dpop {
        builder = builder.header("dpop", proof);
    }
    builder
        .body(Body::full(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn token_verification(c: &mut Criterion) {
    let mut group = c.benchmark_group("token");
    for (name, alg) in [("hs256", Algorithm::HS256), ("eddsa", Algorithm::EdDSA)] {
        let p = perishable(alg, DpopMode::Optional);
        let token = token(&p, None);
        let codec = p.sessions().codec().clone();
        assert!(codec.verify(&token).is_ok());
        group.bench_function(format!("{name}_verify_uncached"), |b| {
            b.iter(|| codec.verify_uncached(&token).unwrap())
        });
        group.bench_function(format!("{name}_verify_cached"), |b| {
            b.iter(|| codec.verify(&token).unwrap())
        });
    }
    group.finish();
}

fn dpop_verification(c: &mut Criterion) {
    let mut group = c.benchmark_group("dpop");
    let htu = format!("http://{HOST}{PATH}");
    let verifier = DpopVerifier::new(60, 5);
    for (name, signer) in [
        ("es256_verify", DpopSigner::generate_es256()),
        ("eddsa_verify", DpopSigner::generate_ed25519()),
    ] {
        let access_token = "an-access-token";
        let proof = signer.proof("POST", &htu, Some(access_token));
        let expected = Expected {
            htm: "POST",
            htu: Htu::HostAndPath {
                host: HOST,
                path: PATH,
            },
            access_token: Some(access_token),
            jkt: Some(signer.thumbprint()),
        };
        let at = now();
        assert!(verifier.verify(&proof, &expected, at).is_ok());
        group.bench_function(name, |b| {
            b.iter(|| verifier.verify(&proof, &expected, at).unwrap())
        });
    }
    group.finish();
}

fn fingerprint_check(c: &mut Criterion) {
    let fp = fingerprint::hash(FINGERPRINT);
    assert!(fingerprint::matches(FINGERPRINT.as_bytes(), &fp));
    c.bench_function("fingerprint/matches", |b| {
        b.iter(|| fingerprint::matches(FINGERPRINT.as_bytes(), &fp))
    });
}

fn policy() -> RatePolicy {
    RatePolicy {
        name: "session",
        points: 1_000_000_000,
        window: Duration::from_secs(60),
        block: Duration::from_secs(60),
    }
}

fn rate_limit(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("rate_limit");
    let limiter = Limiter::<String>::new(policy());
    let key = fingerprint::hash(FINGERPRINT);
    group.bench_function("limiter_check", |b| b.iter(|| limiter.check(&key).unwrap()));
    let store = MemoryStore::new();
    let dyn_limiter = store.rate_limiter(policy());
    group.bench_function("store_rate_limiter_check", |b| {
        b.iter(|| rt.block_on(dyn_limiter.check(&key)).unwrap())
    });
    // Many clients: 10,000 distinct keys, cycled.
    let keys: Vec<String> = (0..10_000)
        .map(|i| fingerprint::hash(&format!("device-{i}")))
        .collect();
    let mut i = 0;
    group.bench_function("limiter_check_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            limiter.check(&keys[i]).unwrap()
        })
    });
    group.finish();
}

fn verify_plus_rate_limit(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("verify_plus_rate_limit");
    for (name, alg, cache) in [
        ("hs256", Algorithm::HS256, true),
        ("hs256_nocache", Algorithm::HS256, false),
        ("eddsa", Algorithm::EdDSA, true),
        ("eddsa_nocache", Algorithm::EdDSA, false),
    ] {
        let p = Perishable::new(config_with_cache(alg, DpopMode::Optional, cache)).unwrap();
        let token = token(&p, None);
        let req = request(&token, None);
        let limiter = p.store().rate_limiter(policy());
        let sessions = p.sessions().clone();
        assert!(rt.block_on(sessions.verify(&req)).is_ok());
        group.bench_function(format!("{name}_verify_only"), |b| {
            b.iter(|| rt.block_on(sessions.verify(&req)).unwrap())
        });
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let session = sessions.verify(&req).await.unwrap();
                    limiter
                        .check(session.fingerprint_hash())
                        .await
                        .unwrap()
                        .allowed
                })
            })
        });
    }
    group.finish();
}

/// A jittered, curved pointer trace with varied timing (what a person's mouse makes).
fn human_trace(samples: usize, keys: usize) -> Entropy {
    let mut seed: u64 = 42;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut t = 0.0;
    let pointer = (0..samples)
        .map(|i| {
            t += 8.0 + 30.0 * rand();
            let a = i as f64 / 15.0;
            [
                t,
                300.0 + 120.0 * a.cos() + 5.0 * rand(),
                200.0 + 80.0 * (1.3 * a).sin() + 5.0 * rand(),
            ]
        })
        .collect();
    let mut k = 0.0;
    let keys = (0..keys)
        .map(|_| {
            k += 60.0 + 140.0 * rand();
            k
        })
        .collect();
    Entropy {
        pointer,
        keys,
        elapsed_ms: Some(t),
    }
}

fn entropy(c: &mut Criterion) {
    let mut group = c.benchmark_group("entropy");
    let human = human_trace(80, 0);
    assert!(perishable::entropy::score(&human) >= 50);
    group.bench_function("score_80_pointer", |b| {
        b.iter(|| perishable::entropy::score(&human))
    });
    let largest = human_trace(512, 512);
    group.bench_function("score_512_pointer_512_keys", |b| {
        b.iter(|| perishable::entropy::score(&largest))
    });
    group.finish();
}

fn proof_of_work(c: &mut Criterion) {
    let pow = ProofOfWork::new([7u8; 32], 16, Duration::from_secs(300));
    let at = now();
    let challenge = pow.challenge(at);
    let solution = PowSolution {
        nonce: perishable::pow::solve(&challenge.challenge, 16),
        challenge: challenge.challenge,
    };
    assert!(pow.check(Some(&solution), at).is_ok());
    c.bench_function("pow/check_16_bits", |b| {
        b.iter(|| pow.check(Some(&solution), at).unwrap())
    });
}

fn upstream_stub()
-> impl tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|req: Request<Body>| async move {
        drop(req);
        Ok::<_, Infallible>(Response::new(Body::full(Bytes::from_static(
            br#"{"id":"chatcmpl-bench","object":"chat.completion"}"#,
        ))))
    })
}

fn stack(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("stack");

    let upstream = upstream_stub();
    group.bench_function("upstream_stub_only", |b| {
        b.iter_batched(
            || request("unused", None),
            |req| rt.block_on(upstream.clone().oneshot(req)).unwrap(),
            BatchSize::SmallInput,
        )
    });

    for (name, alg) in [("hs256", Algorithm::HS256), ("eddsa", Algorithm::EdDSA)] {
        let p = perishable(alg, DpopMode::Optional);
        let token = token(&p, None);
        let svc = ServiceBuilder::new()
            .layer(p.origin_layer())
            .layer(p.verify_layer())
            .layer(p.rate_limit_layer())
            .service(upstream_stub());
        let first = rt
            .block_on(svc.clone().oneshot(request(&token, None)))
            .unwrap();
        assert_eq!(first.status(), 200);
        group.bench_function(format!("oneshot_{name}"), |b| {
            b.iter_batched(
                || request(&token, None),
                |req| rt.block_on(svc.clone().oneshot(req)).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }

    // DPoP-bound session: a fresh proof per request (made in the untimed setup).
    let p = perishable(Algorithm::HS256, DpopMode::Required);
    let signer = Arc::new(DpopSigner::generate_es256());
    let token = token(&p, Some(signer.thumbprint().to_owned()));
    let htu = format!("http://{HOST}{PATH}");
    let svc = ServiceBuilder::new()
        .layer(p.origin_layer())
        .layer(p.verify_layer())
        .layer(p.rate_limit_layer())
        .service(upstream_stub());
    let make = || {
        let proof = signer.proof("POST", &htu, Some(&token));
        request(&token, Some(&proof))
    };
    let first = rt.block_on(svc.clone().oneshot(make())).unwrap();
    assert_eq!(first.status(), 200);
    group.bench_function("oneshot_hs256_dpop_es256", |b| {
        b.iter_batched(
            make,
            |req| rt.block_on(svc.clone().oneshot(req)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = token_verification, dpop_verification, fingerprint_check, rate_limit,
        verify_plus_rate_limit, entropy, proof_of_work, stack
}
criterion_main!(benches);
