//! The cost of shared state: each store operation an authenticated request makes, in memory and
//! on a real Redis on loopback, measured side by side in one run.
//!
//! ```text
//! cargo bench --features redis --bench store
//! ```
//!
//! Starts its own `redis-server` on a free port (and stops it); without one, only the memory
//! store is measured. An authenticated request makes two store calls (revocation lookup, rate
//! limit), three with DPoP (the proof's replay record).
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use perishable::store::{
    Bucket, CallAdmission, CallDecision, MemoryStore, RatePolicy, RedisStore, Set, Store,
};

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<(Redis, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((redis, format!("redis://127.0.0.1:{port}/")));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

fn bench_store(c: &mut Criterion, name: &str, store: Arc<dyn Store>, rt: &tokio::runtime::Runtime) {
    let policy = RatePolicy {
        name: "bench",
        points: u32::MAX,
        window: Duration::from_secs(60),
        block: Duration::ZERO,
    };
    let limiter = store.rate_limiter(policy);
    let mut group = c.benchmark_group(name);
    group.bench_function("rate_limit_check", |b| {
        b.to_async(rt)
            .iter(|| async { limiter.check("fp-hash-of-one-client").await.unwrap() })
    });
    group.bench_function("revocation_lookup", |b| {
        b.to_async(rt).iter(|| async {
            store
                .contains(Set::Revoked, "jti-0123456789abcdef")
                .await
                .unwrap()
        })
    });
    let n = AtomicU64::new(0);
    group.bench_function("replay_insert", |b| {
        b.to_async(rt).iter(|| async {
            let id = format!("jkt.{}", n.fetch_add(1, Ordering::Relaxed));
            store
                .insert_once(Set::DpopSeen, &id, 4_000_000_000)
                .await
                .unwrap()
        })
    });
    group.bench_function("ping", |b| {
        b.to_async(rt)
            .iter(|| async { store.ping().await.unwrap() })
    });
    // A budgeted call's whole admission, as under steady traffic: the previous call's
    // settlement is queued (on Redis the admission carries it), then the rate-limit count and a
    // reservation at the three scopes (one script on Redis).
    let buckets = [
        Bucket::new("fp:one-client", u64::MAX / 4, 60),
        Bucket::new("ip:127.0.0.1", u64::MAX / 4, 60),
        Bucket::new("global", u64::MAX / 4, 60),
    ];
    group.bench_function("call_admission", |b| {
        b.to_async(rt).iter(|| async {
            let settling = tokio::spawn({
                let store = store.clone();
                let buckets = buckets.clone();
                async move { store.settle_tokens(&buckets, 60).await }
            });
            tokio::task::yield_now().await;
            let mut call = CallAdmission::new();
            call.rate = Some((&*limiter, "fp-hash-of-one-client"));
            call.buckets = &buckets;
            call.amount = 100;
            let decision = store.admit_call(call).await.unwrap();
            assert_eq!(decision, CallDecision::Admitted);
            settling.await.unwrap().unwrap();
        })
    });
    group.bench_function("authenticated_request", |b| {
        b.to_async(rt).iter(|| async {
            store
                .contains(Set::Revoked, "jti-0123456789abcdef")
                .await
                .unwrap();
            limiter.check("fp-hash-of-one-client").await.unwrap()
        })
    });
    group.finish();
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    bench_store(c, "memory", Arc::new(MemoryStore::new()), &rt);
    match start_redis() {
        Some((_redis, url)) => {
            let store = Arc::new(RedisStore::new(&url, "bench", Duration::from_secs(2)).unwrap());
            bench_store(c, "redis", store, &rt);
        }
        None => eprintln!("redis-server not found: measured the memory store only"),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = stores
}
criterion_main!(benches);
