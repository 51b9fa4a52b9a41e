//! [`RedisStore`]: shared state on Redis, for several instances (cargo feature `redis`): one
//! primary, or a Redis Cluster (`connection.rs`).
//!
//! Every call has a timeout (`store.timeout_ms`); a failure is a [`StoreError`] that the
//! failure policy turns into a refusal or a skipped limit, never a panic or a hang. Keys are
//! `<store.key_prefix>:<kind>:{<id>}`: the braces are a hash tag, so every key about one
//! identity (a client, a session, a bucket) falls in one cluster slot (`cluster.rs`). Each key
//! expires with what it records:
//!
//! | key | type | expires |
//! |---|---|---|
//! | `<p>:rl:<policy>:{<client>}` | GCRA: the theoretical arrival time (Unix µs), then the end of the block (Unix µs) while one holds | when the client is back to a full burst and any block is over |
//! | `<p>:pow:{<challenge>}` (also `attest:<challenge>`, `captcha:<hash>`), `<p>:dpop:{<jkt.jti>}` | `SET NX` marker | with the challenge or proof window; a captcha token after 10 minutes |
//! | `<p>:revoked` | sorted set of revoked token ids, scored by expiry (Unix ms) | with its last entry; expired entries are dropped on each revocation |
//! | `<p>:caps:{fp:<hash>}`, `<p>:caps:{jkt:<thumbprint>}` | sorted set of live sessions, scored by `exp` | with its newest session |
//! | `<p>:budget:{<bucket>}` (e.g. `<p>:budget:{fp:<hash>}`) | token bucket: the string `<tokens> <ms>`, the level (a float, `%.17g`; negative: a debt) at Unix ms `ms` on Redis's clock | 1 s after it is full again (a missing key is a full bucket; a full one is deleted) |
//! | `<p>:streams:{<jti>}` | open-stream counter | with the session |
//! | `<p>:appattest:{<key id>}` | App Attest key: hash `{pk, app, dev, ctr, at}` (public key bytes, App ID, development `0`/`1`, counter, registration time) | `mint.app_attest.key_retention_secs` after its last mint |
//!
//! Revocations are also published on `<p>:revocations`: each instance keeps a copy of the
//! revoked set fed by that channel, so checking a token costs no round trip (`revocations.rs`).
//!
//! Rate limiting, cap admission, token buckets and App Attest keys are Lua scripts
//! (`scripts.rs`): one round trip, atomic, on Redis's clock (`TIME`), so instances with
//! drifting clocks still agree. A proxied call's whole admission is one script
//! (`admission.rs`); its settlement is batched off the critical path (`settlements.rs`).

mod admission;
mod cluster;
mod connection;
mod revocations;
#[macro_use]
mod scripts;
mod settlements;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::{AsyncCommands, Script};
use tokio::sync::OnceCell;

use self::cluster::{by_slot, script_per_slot, tag};
use self::connection::Conn;
use self::scripts::{
    ACQUIRE, ADMIT, ADMIT_CALL, ADVANCE_KEY, GCRA, REGISTER_KEY, RELEASE, REPLACE, RESERVE, SETTLE,
};
use super::{
    Admission, AppAttestKey, Bucket, CallAdmission, CallDecision, RateDecision, RateLimiter,
    RatePolicy, Reservation, Set, Store, StoreError, StoreFuture,
};
use crate::config::{ConfigError, StoreConfig};

/// Shared state on Redis: see [`crate::store`], and `docs/scaling.md` for the key layout. One
/// primary (one multiplexed, auto-reconnecting connection) or a Redis Cluster, a timeout per
/// call, keys under `store.key_prefix` (hash-tagged by identity) that expire with what they
/// record, and every multi-step decision as an atomic Lua script on Redis's clock.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// One client per node `store.url` names (one, or a cluster's seeds): the connection is
    /// made from all of them, the revocation subscription from one at a time.
    nodes: Vec<redis::Client>,
    conn: OnceCell<Conn>,
    prefix: String,
    timeout: Duration,
    gcra: Script,
    admit: Script,
    replace: Script,
    reserve: Script,
    settle: Script,
    acquire: Script,
    release: Script,
    register_key: Script,
    advance_key: Script,
    revoke: Script,
    admit_call: Script,
    settle_many: Script,
    /// The settlements waiting for an admission to carry them, or for their task
    /// ([`settlements`]).
    settlements: Arc<settlements::Queue>,
    /// The local copy of the revoked set, fed by pub/sub ([`revocations`]).
    revocations: Arc<revocations::Revocations>,
}

impl fmt::Debug for RedisStore {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("nodes", &self.inner.nodes.len())
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the Redis at `url`, with keys under `prefix:` and `timeout` per call.
    /// Connects on first use.
    ///
    /// `url` is `redis://[[user]:password@]host:port[/db]`, or `rediss://` for TLS (rustls,
    /// checking the server's certificate against the platform's roots or the PEM file
    /// `SSL_CERT_FILE` names). For a Redis Cluster, name one node or several, separated by
    /// commas: `redis://:pw@10.0.0.1:7000,10.0.0.2:7000` (an item without a scheme takes the
    /// first one's scheme and credentials). One URL that leads to a cluster node is a cluster.
    ///
    /// ```
    /// use std::time::Duration;
    /// use perishable_core::store::RedisStore;
    ///
    /// let one = RedisStore::new("redis://127.0.0.1:6379/", "perishable", Duration::from_millis(500))?;
    /// let cluster = RedisStore::new(
    ///     "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
    ///     "perishable",
    ///     Duration::from_millis(500),
    /// )?;
    /// # Ok::<(), perishable_core::config::ConfigError>(())
    /// ```
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "store.url",
            reason,
        };
        let nodes = connection::node_urls(url)
            .map_err(invalid)?
            .iter()
            .map(|node| redis::Client::open(node.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| invalid("is not a valid Redis URL".to_owned()))?;
        if nodes.len() > 1 {
            // Checked now rather than on the first call: the nodes must agree on credentials
            // and TLS.
            redis::cluster::ClusterClient::new(
                nodes.iter().map(|n| n.get_connection_info().clone()),
            )
            .map_err(|e| {
                invalid(format!(
                    "does not name a usable cluster: {}",
                    e.detail().unwrap_or("the nodes disagree")
                ))
            })?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                nodes,
                conn: OnceCell::new(),
                prefix: prefix.to_owned(),
                timeout,
                gcra: Script::new(GCRA),
                admit: Script::new(ADMIT),
                replace: Script::new(REPLACE),
                reserve: Script::new(RESERVE),
                settle: Script::new(SETTLE),
                acquire: Script::new(ACQUIRE),
                release: Script::new(RELEASE),
                register_key: Script::new(REGISTER_KEY),
                advance_key: Script::new(ADVANCE_KEY),
                revoke: Script::new(revocations::REVOKE),
                admit_call: Script::new(ADMIT_CALL),
                settle_many: Script::new(settlements::SETTLE_MANY),
                settlements: Arc::default(),
                revocations: Arc::default(),
            }),
        })
    }

    pub(crate) fn from_config(store: &StoreConfig) -> Result<Self, ConfigError> {
        Self::new(
            &store.url,
            &store.key_prefix,
            Duration::from_millis(store.timeout_ms),
        )
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The settlement task waits on the queue: tell it the store is gone.
        self.settlements.close();
    }
}

impl Inner {
    /// `<prefix>:<kind>:{<id>}`: the key of `id`, tagged with it (see [`cluster`]).
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{}", self.prefix, tag(id))
    }

    /// The sorted set of revoked token ids (one key: one slot).
    fn revoked_key(&self) -> String {
        format!("{}:revoked", self.prefix)
    }

    /// The connection, made on first use (see [`connection`]).
    async fn conn(&self) -> Result<Conn, StoreError> {
        self.conn
            .get_or_try_init(|| connection::connect(&self.nodes, self.timeout))
            .await
            .cloned()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Runs `op` on the connection, within the timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self.conn().await?;
            op(conn)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout)?
    }

    /// The keys of `buckets` grouped by slot, each with its index, capacity and refill time.
    fn bucket_groups(&self, conn: &Conn, buckets: &[Bucket]) -> Vec<Vec<(String, BucketArgs)>> {
        by_slot(
            conn,
            buckets.iter().enumerate().map(|(index, b)| {
                let args = BucketArgs {
                    index,
                    capacity: b.capacity.max(1),
                    secs: b.window_secs.max(1),
                };
                (self.key("budget", &b.key), args)
            }),
        )
    }
}

/// A bucket in a script call: its index among the caller's buckets, capacity and refill time.
#[derive(Debug, Clone, Copy)]
struct BucketArgs {
    index: usize,
    capacity: u64,
    secs: u64,
}

/// Adds each bucket's key (`KEYS[i]`) and its capacity and refill time (`ARGV[2i]`,
/// `ARGV[2i+1]`, after the amount or delta in `ARGV[1]`) to a bucket script's call.
fn bucket_args(call: &mut redis::ScriptInvocation<'_>, group: &[(String, BucketArgs)]) {
    for (key, args) in group {
        call.key(key).arg(args.capacity).arg(args.secs);
    }
}

/// A Redis GCRA limiter for one policy.
struct RedisRateLimiter {
    store: Arc<Inner>,
    policy: RatePolicy,
    interval_us: u64,
    block_us: u64,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl RateLimiter for RedisRateLimiter {
    fn check<'a>(&'a self, key: &'a str) -> StoreFuture<'a, RateDecision> {
        Box::pin(async move {
            let tat = self.store.key(&format!("rl:{}", self.policy.name), key);
            let (allowed, remaining, retry_us): (i64, i64, i64) = self
                .store
                .run(|mut conn| async move {
                    self.store
                        .gcra
                        .key(tat)
                        .arg(self.interval_us)
                        .arg(self.policy.points)
                        .arg(self.block_us)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            Ok(RateDecision {
                allowed: allowed == 1,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
                retry_after: Duration::from_micros(u64::try_from(retry_us.max(0)).unwrap_or(0)),
            })
        })
    }

    fn policy(&self) -> &RatePolicy {
        &self.policy
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `expires_at` (Unix seconds) as Unix ms, at least a second ahead, so that an entry that expires
/// now is still written.
fn expiry_ms(expires_at: u64) -> u64 {
    expires_at.saturating_mul(1000).max(now_ms() + 1000)
}

/// An App Attest record from `HMGET pk app dev ctr at`: `None` when the key is missing.
fn app_attest_record(fields: Vec<Option<Vec<u8>>>) -> Result<Option<AppAttestKey>, StoreError> {
    let malformed = || StoreError::Unavailable("malformed App Attest record".to_owned());
    let [public_key, app_id, development, counter, created_at]: [Option<Vec<u8>>; 5] =
        fields.try_into().map_err(|_| malformed())?;
    if public_key.is_none() && app_id.is_none() && counter.is_none() {
        return Ok(None);
    }
    let text = |field: Option<Vec<u8>>| {
        field
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(malformed)
    };
    let number = |field: Option<Vec<u8>>| {
        text(field).and_then(|t| t.parse::<u64>().map_err(|_| malformed()))
    };
    Ok(Some(AppAttestKey {
        public_key: public_key.ok_or_else(malformed)?,
        app_id: text(app_id)?,
        development: match text(development)?.as_str() {
            "1" => true,
            "0" => false,
            _ => return Err(malformed()),
        },
        counter: u32::try_from(number(counter)?).map_err(|_| malformed())?,
        created_at: number(created_at)?,
    }))
}

/// The GCRA parameters of a policy: one request every `interval_us`, a burst of `points`, a
/// block of `block_us` after going over.
struct Gcra {
    points: u32,
    interval_us: u64,
    block_us: u64,
}

impl Gcra {
    fn of(policy: &RatePolicy) -> Self {
        let points = policy.points.max(1);
        let window = policy.window.max(Duration::from_millis(1));
        Self {
            points,
            interval_us: (window.as_micros() as u64 / u64::from(points)).max(1),
            block_us: policy.block.as_micros() as u64,
        }
    }
}

impl Store for RedisStore {
    fn rate_limiter(&self, policy: RatePolicy) -> Arc<dyn RateLimiter> {
        let gcra = Gcra::of(&policy);
        Arc::new(RedisRateLimiter {
            store: self.inner.clone(),
            block_us: gcra.block_us,
            policy: RatePolicy {
                points: gcra.points,
                window: policy.window.max(Duration::from_millis(1)),
                ..policy
            },
            interval_us: gcra.interval_us,
        })
    }

    fn insert_once<'a>(&'a self, set: Set, id: &'a str, expires_at: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let at_ms = expiry_ms(expires_at);
            if set == Set::Revoked {
                // Recorded and published at once: every instance's copy learns of it.
                let inner = &self.inner;
                let fresh: i64 = inner
                    .run(|mut conn| async move {
                        inner
                            .revoke
                            .key(inner.revoked_key())
                            .arg(at_ms)
                            .arg(id)
                            .arg(revocations::channel(&inner.prefix))
                            .arg(format!("{id} {at_ms}"))
                            .invoke_async(&mut conn)
                            .await
                    })
                    .await?;
                inner.revocations.insert(id, at_ms, now_ms());
                return Ok(fresh == 1);
            }
            let key = self.inner.key(set.name(), id);
            let set: Option<String> = self
                .inner
                .run(|mut conn| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(1)
                        .arg("PXAT")
                        .arg(at_ms)
                        .arg("NX")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            Ok(set.is_some())
        })
    }

    fn contains<'a>(&'a self, set: Set, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            if let Some(known) = self.contains_now(set, id) {
                return Ok(known);
            }
            if set == Set::Revoked {
                let inner = &self.inner;
                let key = inner.revoked_key();
                let (until, legacy): (Option<f64>, bool) = inner
                    .run(|mut conn| async move {
                        let until = conn.zscore(key, id).await?;
                        // On one primary, a revocation recorded by 0.1 (`revocations.rs`).
                        let legacy = !conn.is_cluster()
                            && conn
                                .exists(format!("{}:revoked:{id}", inner.prefix))
                                .await?;
                        Ok((until, legacy))
                    })
                    .await?;
                return Ok(legacy || until.is_some_and(|until| until > now_ms() as f64));
            }
            let key = self.inner.key(set.name(), id);
            self.inner
                .run(|mut conn| async move { conn.exists(key).await })
                .await
        })
    }

    /// Revocations come from the local copy once it is synchronised (`redis/revocations.rs`): no
    /// round trip. Anything else, or before then, asks Redis.
    fn contains_now(&self, set: Set, id: &str) -> Option<bool> {
        if set != Set::Revoked {
            return None;
        }
        let copy = &self.inner.revocations;
        if !copy.synced() {
            revocations::start(&self.inner);
        }
        copy.contains(id, now_ms())
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.inner
                .run(|mut conn| async move {
                    redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .map(|_| ())
                })
                .await
        })
    }

    fn admit_session<'a>(
        &'a self,
        keys: &'a [String],
        jti: &'a str,
        exp: u64,
        max: u32,
    ) -> StoreFuture<'a, Admission> {
        Box::pin(async move {
            let inner = &self.inner;
            let waits: Vec<(Vec<String>, i64)> = inner
                .run(|conn| async move {
                    let keys = keys.iter().map(|k| inner.key("caps", k));
                    let replies = script_per_slot::<i64>(&conn, &inner.admit, keys, |call| {
                        call.arg(jti).arg(exp).arg(max.max(1));
                    })
                    .await;
                    let mut waits = Vec::with_capacity(replies.len());
                    let mut failure = None;
                    for (keys, reply) in replies {
                        match reply {
                            Ok(wait) => waits.push((keys, wait)),
                            Err(e) => failure = Some(e),
                        }
                    }
                    let refused = failure.is_some() || waits.iter().any(|(_, wait)| *wait >= 0);
                    if refused {
                        // All or none: the groups that admitted the session let it go again.
                        let admitted = waits.iter().filter(|(_, wait)| *wait < 0);
                        let _ = join_all(admitted.flat_map(|(keys, _)| keys).map(|key| {
                            let mut conn = conn.clone();
                            async move { conn.zrem::<_, _, i64>(key, jti).await }
                        }))
                        .await;
                    }
                    match failure {
                        Some(e) => Err(e),
                        None => Ok(waits),
                    }
                })
                .await?;
            let wait = waits.iter().map(|(_, wait)| *wait).max().unwrap_or(-1);
            Ok(match u64::try_from(wait) {
                Ok(secs) => Admission::Full {
                    retry_after_secs: secs.max(1),
                },
                Err(_) => Admission::Admitted,
            })
        })
    }

    fn release_session<'a>(&'a self, keys: &'a [String], jti: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            inner
                .run(|conn| async move {
                    let groups = by_slot(&conn, keys.iter().map(|k| (inner.key("caps", k), ())));
                    let replies = join_all(groups.iter().map(|group| {
                        let mut conn = conn.clone();
                        let mut pipe = redis::pipe();
                        for (key, ()) in group {
                            pipe.zrem(key, jti).ignore();
                        }
                        async move { pipe.query_async::<()>(&mut conn).await }
                    }))
                    .await;
                    replies.into_iter().collect::<Result<(), _>>()
                })
                .await
        })
    }

    fn replace_session<'a>(
        &'a self,
        keys: &'a [String],
        old: &'a str,
        new: &'a str,
        exp: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            inner
                .run(|conn| async move {
                    let keys = keys.iter().map(|k| inner.key("caps", k));
                    let replies = script_per_slot::<i64>(&conn, &inner.replace, keys, |call| {
                        call.arg(old).arg(new).arg(exp);
                    })
                    .await;
                    replies
                        .into_iter()
                        .try_for_each(|(_, reply)| reply.map(|_| ()))
                })
                .await
        })
    }

    fn reserve_tokens<'a>(
        &'a self,
        buckets: &'a [Bucket],
        amount: u64,
    ) -> StoreFuture<'a, Reservation> {
        Box::pin(async move {
            if buckets.is_empty() {
                return Ok(Reservation::Reserved);
            }
            let inner = &self.inner;
            let (replies, groups) = inner
                .run(|conn| async move {
                    let groups = inner.bucket_groups(&conn, buckets);
                    let replies = join_all(groups.iter().map(|group| {
                        let mut conn = conn.clone();
                        let mut call = inner.reserve.prepare_invoke();
                        call.arg(amount);
                        bucket_args(&mut call, group);
                        async move { call.invoke_async::<Vec<i64>>(&mut conn).await }
                    }))
                    .await;
                    let taken = |reply: &redis::RedisResult<Vec<i64>>| {
                        matches!(reply.as_ref().map(Vec::as_slice), Ok([1]))
                    };
                    if !replies.iter().all(taken) {
                        // All or none: the groups that reserved give it back.
                        let give_back = groups.iter().zip(&replies).filter(|(_, r)| taken(r));
                        let _ = join_all(give_back.map(|(group, _)| {
                            let mut conn = conn.clone();
                            let mut call = inner.settle.prepare_invoke();
                            call.arg(amount);
                            bucket_args(&mut call, group);
                            async move { call.invoke_async::<i64>(&mut conn).await }
                        }))
                        .await;
                    }
                    Ok((replies, groups))
                })
                .await?;
            // The short bucket that takes longest to hold the amount, as one script finds it.
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            let mut short: Option<Reservation> = None;
            for (group, reply) in groups.iter().zip(replies) {
                match reply
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?
                    .as_slice()
                {
                    [1] => {}
                    [0, bucket, available, retry] => {
                        let retry_after_secs = count(*retry).max(1);
                        let bucket = usize::try_from(*bucket)
                            .ok()
                            .and_then(|at| group.get(at))
                            .map(|(_, args)| args.index)
                            .ok_or_else(|| {
                                StoreError::Unavailable("unexpected reply".to_owned())
                            })?;
                        let longer = match short {
                            Some(Reservation::Exhausted {
                                retry_after_secs: r,
                                ..
                            }) => retry_after_secs > r,
                            _ => true,
                        };
                        if longer {
                            short = Some(Reservation::Exhausted {
                                bucket,
                                available: count(*available),
                                retry_after_secs,
                            });
                        }
                    }
                    _ => return Err(StoreError::Unavailable("unexpected reply".to_owned())),
                }
            }
            Ok(short.unwrap_or(Reservation::Reserved))
        })
    }

    /// Batched with the other settlements waiting at the time (`redis/settlements.rs`).
    fn settle_tokens<'a>(&'a self, buckets: &'a [Bucket], delta: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if buckets.is_empty() || delta == 0 {
                return Ok(());
            }
            settlements::settle(&self.inner, buckets, delta).await
        })
    }

    fn acquire_stream<'a>(&'a self, session: &'a str, max: u32, exp: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let key = self.inner.key("streams", session);
            let ok: i64 = self
                .inner
                .run(|mut conn| async move {
                    self.inner
                        .acquire
                        .key(key)
                        .arg(max)
                        .arg(exp)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            Ok(ok == 1)
        })
    }

    fn release_stream<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = self.inner.key("streams", session);
            self.inner
                .run(|mut conn| async move {
                    self.inner
                        .release
                        .key(key)
                        .invoke_async::<i64>(&mut conn)
                        .await
                        .map(|_| ())
                })
                .await
        })
    }

    /// One script, one round trip (`ADMIT_CALL`); on a cluster one script per slot, sent
    /// together (`redis/admission.rs`).
    fn admit_call<'a>(&'a self, call: CallAdmission<'a>) -> StoreFuture<'a, CallDecision> {
        Box::pin(async move {
            let inner = &self.inner;
            let keys = admission::CallKeys::new(inner, &call);
            inner
                .run(|conn| async move { keys.admit(inner, conn).await })
                .await?
                .into_result()
        })
    }

    fn register_app_attest_key<'a>(
        &'a self,
        key_id: &'a str,
        key: &'a AppAttestKey,
        expires_at: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let redis_key = self.inner.key("appattest", key_id);
            let registered: i64 = self
                .inner
                .run(|mut conn| async move {
                    self.inner
                        .register_key
                        .key(redis_key)
                        .arg(key.public_key.as_slice())
                        .arg(key.app_id.as_str())
                        .arg(u8::from(key.development))
                        .arg(key.counter)
                        .arg(key.created_at)
                        .arg(expiry_ms(expires_at))
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            Ok(registered == 1)
        })
    }

    fn app_attest_key<'a>(&'a self, key_id: &'a str) -> StoreFuture<'a, Option<AppAttestKey>> {
        Box::pin(async move {
            let redis_key = self.inner.key("appattest", key_id);
            let fields: Vec<Option<Vec<u8>>> = self
                .inner
                .run(|mut conn| async move {
                    redis::cmd("HMGET")
                        .arg(redis_key)
                        .arg(&["pk", "app", "dev", "ctr", "at"])
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            app_attest_record(fields)
        })
    }

    fn advance_app_attest_counter<'a>(
        &'a self,
        key_id: &'a str,
        counter: u32,
        expires_at: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let redis_key = self.inner.key("appattest", key_id);
            let raised: i64 = self
                .inner
                .run(|mut conn| async move {
                    self.inner
                        .advance_key
                        .key(redis_key)
                        .arg(counter)
                        .arg(expiry_ms(expires_at))
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            Ok(raised == 1)
        })
    }
}
