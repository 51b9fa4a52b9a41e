//! Micro-benchmarks of every check on Perishable's hot path, through the public API only.
//!
//! ```text
//! cargo bench --bench micro
//! taskset -c 0 cargo bench --bench micro     # pinned, as in docs/performance.md
//! ```
//!
//! Groups:
//!
//! - `dpop`: `Sessions::verify` of a DPoP-bound session (ES256 and EdDSA proof keys) with a fresh
//!   proof per request, made outside the timing: every RFC 9449 check and the replay record, on
//!   top of what `verify_plus_rate_limit/hs256_verify_only` measures.
//! - `rate_limit`: one in-memory decision through the `RateLimiter` trait object the layer calls
//!   (`MemoryStore::rate_limiter`): `check_now` (what the layer uses on a memory store) and
//!   `check` (the future), for one client and for 10,000 clients cycled.
//! - `verify_plus_rate_limit`: what an authenticated request costs before the upstream:
//!   `Sessions::verify` (token, revocation lookup, fingerprint, User-Agent) plus the rate-limit
//!   decision, with the verified-token cache (the default) and without it
//!   (`session.verified_cache_size = 0`); `*_verify_only` is the session check alone, so the
//!   `nocache` variants are a token's full verification (signature and claims). The issue's
//!   target is 5 µs.
//! - `stack`: one whole request through `origin_layer`, `verify_layer`, `rate_limit_layer` and an
//!   in-process upstream `service_fn`, with `ServiceExt::oneshot`; and the upstream alone, to
//!   subtract. A DPoP-bound variant makes a fresh proof per request outside the timing.
//!
//! Sessions are minted by `Sessions::mint` through a gate of the bench's own that admits every
//! mint. The cost of the mint gates themselves (the proof of work, the entropy score, ...) is
//! `cargo bench --bench gates`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use perishable::config::{Algorithm, DpopMode};
use perishable::dpop::DpopSigner;
use perishable::fingerprint;
use perishable::gate::{Evidence, Facts, Gate, GateFuture};
use perishable::store::{MemoryStore, RatePolicy, Store};
use perishable::{Body, Config, Perishable};
use tower::{ServiceBuilder, ServiceExt, service_fn};

const FINGERPRINT: &str = "bench-device-0123456789";
const UA: &str = "perishable-bench/1.0";
const SECRET: &str = "bench-secret-bench-secret-bench-secret!!";
const HOST: &str = "127.0.0.1:8080";
const PATH: &str = "/openai/chat/completions";

fn config(algorithm: Algorithm, dpop: DpopMode) -> Config {
    config_with_cache(algorithm, dpop, true)
}

fn config_with_cache(algorithm: Algorithm, dpop: DpopMode, cache: bool) -> Config {
    let mut builder = Config::builder()
        .upstream_api_key("sk-bench")
        .session_algorithm(algorithm)
        .session_dpop(dpop)
        .mint_policies([["open"]])
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

/// The bench's mint gate: admits every mint, so a session costs only the mint itself.
#[derive(Debug)]
struct Open;

impl Gate for Open {
    fn name(&self) -> &str {
        "open"
    }

    fn check<'a>(&'a self, _: &'a Evidence<'a>) -> GateFuture<'a> {
        Box::pin(std::future::ready(Ok(Facts::default())))
    }
}

fn perishable_with(config: Config) -> Perishable {
    Perishable::builder(config).gate(Open).build().unwrap()
}

fn perishable(algorithm: Algorithm, dpop: DpopMode) -> Perishable {
    perishable_with(config(algorithm, dpop))
}

/// A session token minted by `POST /session` for `FINGERPRINT` and `UA`; bound to `signer`'s key
/// when there is one.
fn token(p: &Perishable, signer: Option<&DpopSigner>) -> String {
    let mut head = Request::post("/session")
        .header(http::header::HOST, HOST)
        .header(http::header::USER_AGENT, UA);
    if let Some(signer) = signer {
        head = head.header(
            "dpop",
            signer.proof("POST", &format!("http://{HOST}/session"), None),
        );
    }
    let body = format!(r#"{{"fingerprint":"{FINGERPRINT}"}}"#);
    let minted = runtime()
        .block_on(p.sessions().mint(&head.body(()).unwrap(), body.as_bytes()))
        .unwrap();
    assert_eq!(
        minted.token_type,
        if signer.is_some() { "DPoP" } else { "Bearer" }
    );
    minted.token
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

fn dpop_verification(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("dpop");
    let htu = format!("http://{HOST}{PATH}");
    for (name, signer) in [
        ("es256_session_verify", DpopSigner::generate_es256()),
        ("eddsa_session_verify", DpopSigner::generate_ed25519()),
    ] {
        let p = perishable(Algorithm::HS256, DpopMode::Required);
        let token = token(&p, Some(&signer));
        let sessions = p.sessions().clone();
        let make = || request(&token, Some(&signer.proof("POST", &htu, Some(&token))));
        assert!(rt.block_on(sessions.verify(&make())).is_ok());
        group.bench_function(name, |b| {
            b.iter_batched(
                make,
                |req| rt.block_on(sessions.verify(&req)).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
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
    let store = MemoryStore::new();
    let limiter = store.rate_limiter(policy());
    let key = fingerprint::hash(FINGERPRINT);
    assert!(limiter.check_now(&key).unwrap().allowed);
    group.bench_function("store_rate_limiter_check_now", |b| {
        b.iter(|| limiter.check_now(&key).unwrap())
    });
    group.bench_function("store_rate_limiter_check", |b| {
        b.iter(|| rt.block_on(limiter.check(&key)).unwrap())
    });
    // Many clients: 10,000 distinct keys, cycled.
    let keys: Vec<String> = (0..10_000)
        .map(|i| fingerprint::hash(&format!("device-{i}")))
        .collect();
    let mut i = 0;
    group.bench_function("store_rate_limiter_check_now_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            limiter.check_now(&keys[i]).unwrap()
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
        let p = perishable_with(config_with_cache(alg, DpopMode::Optional, cache));
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
    let token = token(&p, Some(&signer));
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
    targets = dpop_verification, rate_limit, verify_plus_rate_limit, stack
}
criterion_main!(benches);
