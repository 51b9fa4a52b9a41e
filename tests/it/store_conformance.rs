//! The `Store` contract (`perishable_core::store::conformance`) on both stores.

use perishable_core::store::{MemoryStore, RedisStore, conformance};

use crate::support::Redis;

#[tokio::test]
async fn the_memory_store() {
    conformance::run(&MemoryStore::new()).await;
}

#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn the_redis_store() {
    let redis = Redis::start();
    let store = RedisStore::new(
        &redis.url(),
        "conformance",
        std::time::Duration::from_secs(2),
    )
    .unwrap();
    conformance::run(&store).await;
}
