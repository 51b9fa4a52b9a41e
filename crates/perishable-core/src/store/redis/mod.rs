//! [`RedisStore`]: shared state on Redis, for several instances (cargo feature `redis`).
//!
//! One multiplexed, auto-reconnecting connection ([`ConnectionManager`]), made lazily on first
//! use. Every call has a timeout (`store.timeout_ms`); a failure is a [`StoreError`] that the
//! failure policy turns into a refusal or a skipped limit, never a panic or a hang. Keys are
//! `<store.key_prefix>:<kind>:<id>`, and each one expires with what it records:
//!
//! | key | type | expires |
//! |---|---|---|
//! | `<p>:rl:<policy>:<client>` | GCRA theoretical arrival time (µs) | when the client is back to a full burst |
//! | `<p>:rlb:<policy>:<client>` | block marker | after the block duration |
//! | `<p>:revoked:<jti>`, `<p>:pow:<challenge>`, `<p>:dpop:<jkt.jti>` | `SET NX` marker | with the token, challenge or proof window |
//! | `<p>:caps:fp:<hash>`, `<p>:caps:jkt:<thumbprint>` | sorted set of live sessions, scored by `exp` | with its newest session |
//! | `<p>:budget:<bucket>` (e.g. `<p>:budget:fp:<hash>`) | token bucket: hash `{tokens, ms}`, the level (a float, `%.17g`; negative: a debt) at Unix ms `ms` on Redis's clock | 1 s after it is full again (a missing key is a full bucket; a full one is deleted) |
//! | `<p>:streams:<jti>` | open-stream counter | with the session |
//! | `<p>:appattest:<key id>` | App Attest key: hash `{pk, app, dev, ctr, at}` (public key bytes, App ID, development `0`/`1`, counter, registration time) | `mint.app_attest.key_retention_secs` after its last mint |
//!
//! Revocations are also published on `<p>:revocations`: each instance keeps a copy of the
//! revoked set fed by that channel, so checking a token costs no round trip (`revocations.rs`).
//!
//! Rate limiting, cap admission, token buckets and App Attest keys are Lua scripts: one round trip, atomic, on
//! Redis's clock (`TIME`), so instances with drifting clocks still agree. Redis Cluster is not
//! supported (the cap and budget scripts touch keys in several slots); use a single primary (with
//! replicas for failover).

mod revocations;
mod settlements;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::OnceCell;

use super::{
    Admission, AppAttestKey, Bucket, CallAdmission, CallDecision, RateDecision, RateLimiter,
    RatePolicy, Reservation, Set, Store, StoreError, StoreFuture,
};
use crate::config::{ConfigError, StoreConfig};

/// GCRA with the same semantics as governor: a burst of `burst`, one request replenished every
/// `interval` µs, and a block of `block` µs after going over.
/// Returns `{allowed (0|1), remaining, retry_after_us}`.
const GCRA: &str = r"
local tat_key, block_key = KEYS[1], KEYS[2]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local block = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local blocked = redis.call('PTTL', block_key)
if blocked > 0 then
  return {0, 0, blocked * 1000}
end
local tat = tonumber(redis.call('GET', tat_key) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if now < allow_at then
  local retry = allow_at - now
  if block > 0 then
    if block > retry then retry = block end
    redis.call('SET', block_key, 1, 'PX', math.ceil(retry / 1000))
  end
  return {0, 0, retry}
end
redis.call('SET', tat_key, new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / interval), 0}
";

/// Takes a slot for `ARGV[1]` (until `ARGV[2]`, Unix s) under every key, unless one holds
/// `ARGV[3]` live sessions. Returns -1 when admitted, else the seconds until a slot frees up.
const ADMIT: &str = r"
local jti, exp, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = tonumber(redis.call('TIME')[1])
local wait = -1
for _, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= max then
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local w = tonumber(first[2]) - now
    if w > wait then wait = w end
  end
end
if wait >= 0 then
  if wait < 1 then wait = 1 end
  return wait
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, exp, jti)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('EXPIREAT', key, tonumber(last[2]) + 1)
end
return -1
";

/// Moves the slots of `ARGV[1]` to `ARGV[2]` (until `ARGV[3]`).
const REPLACE: &str = r"
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
  redis.call('ZADD', key, tonumber(ARGV[3]), ARGV[2])
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('EXPIREAT', key, tonumber(last[2]) + 1)
end
return 1
";

/// The shared start of the token-bucket scripts: `now` (Unix ms, Redis's clock), `level(i)`
/// and `put(i, tokens)` for bucket `KEYS[i]`, whose capacity is `ARGV[2i]` and refill time
/// `ARGV[2i+1]` s. The same arithmetic as the memory store's (`memory.rs`, `Buckets`), in f64.
macro_rules! bucket_lua {
    () => {
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function params(i)
  local cap = tonumber(ARGV[2 * i])
  local secs = tonumber(ARGV[2 * i + 1])
  if cap < 1 then cap = 1 end
  if secs < 1 then secs = 1 end
  return cap, secs
end
-- The tokens bucket i holds now: a missing key is a full bucket.
local function level(i)
  local cap, secs = params(i)
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ms')
  if not v[1] or not v[2] then return cap end
  local elapsed = now - tonumber(v[2])
  if elapsed < 0 then elapsed = 0 end
  local tokens = tonumber(v[1]) + elapsed * cap / (secs * 1000)
  if tokens > cap then tokens = cap end
  return tokens
end
-- Records bucket i at `tokens` now: deleted when full, else kept until 1 s after it is full.
local function put(i, tokens)
  local cap, secs = params(i)
  if tokens >= cap then
    redis.call('DEL', KEYS[i])
    return
  end
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tokens), 'ms', string.format('%d', now))
  local ttl = math.ceil((cap - tokens) * (secs * 1000) / cap) + 1000
  if ttl > 1099511627776 then ttl = 1099511627776 end
  redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl))
end
-- The index of the last key before i equal to KEYS[i], or nil.
local function earlier(i)
  for k = i - 1, 1, -1 do
    if KEYS[k] == KEYS[i] then return k end
  end
  return nil
end
-- Whether a key after i equals KEYS[i].
local function later(i)
  for k = i + 1, NB do
    if KEYS[k] == KEYS[i] then return true end
  end
  return false
end
-- Each bucket's level after change(i, tokens), a key named twice seeing its earlier change.
local function levels_after(change)
  local after = {}
  for i = 1, NB do
    local j = earlier(i)
    local tokens
    if j then tokens = after[j] else tokens = level(i) end
    after[i] = change(i, tokens)
  end
  return after
end
local function put_all(after)
  for i = 1, NB do
    if not later(i) then put(i, after[i]) end
  end
end
-- Takes `amount` from every bucket, or from none: nil when taken, else
-- {index (0-based), tokens available, retry_after_secs} of the short bucket that takes longest
-- to hold the amount.
local function take_all(amount)
  local short = nil
  local after = levels_after(function(i, tokens)
    if tokens >= amount then return tokens - amount end
    local cap, secs = params(i)
    local target = amount
    if target > cap then target = cap end
    local retry = math.ceil((target - tokens) * secs / cap)
    if retry < 1 then retry = 1 end
    if retry > 4294967296 then retry = 4294967296 end
    if not short or retry > short[3] then
      local available = 0
      if tokens > 0 then available = math.floor(tokens) end
      short = {i - 1, available, retry}
    end
    return tokens
  end)
  if short then return short end
  put_all(after)
  return nil
end
"
    };
}

/// Takes `ARGV[1]` tokens from every bucket in `KEYS` or from none (see `bucket_lua`). Returns
/// `{1}`, or `{0, index (0-based), tokens available, retry_after_secs}` for the short bucket
/// that takes longest to hold the amount.
const RESERVE: &str = concat!(
    "local NB = #KEYS\n",
    bucket_lua!(),
    r"
local short = take_all(tonumber(ARGV[1]))
if short then return {0, short[1], short[2], short[3]} end
return {1}
"
);

/// Adds `ARGV[1]` tokens to every bucket in `KEYS` (see `bucket_lua`), never above capacity.
const SETTLE: &str = concat!(
    "local NB = #KEYS\n",
    bucket_lua!(),
    r"
local delta = tonumber(ARGV[1])
put_all(levels_after(function(i, tokens)
  local cap = params(i)
  tokens = tokens + delta
  if tokens > cap then tokens = cap end
  return tokens
end))
return 1
"
);

/// A proxied call's admission in one round trip ([`Store::admit_call`]): the rate limit (GCRA,
/// as `GCRA`), then the stream slot and the token reservation (as `ACQUIRE` and `RESERVE`), or
/// neither.
///
/// `KEYS`: the `NB` buckets, then the DPoP replay key when a proof is recorded, then the
/// limiter's TAT and block keys when rated, then the stream counter when a slot is asked.
/// `ARGV`: the amount, each bucket's capacity and refill time, then the replay key's expiry
/// (Unix ms), then the GCRA interval, burst and block (µs) when rated, then the stream max and
/// expiry when a slot is asked, then `NB`, rated, slot and replay (`0`/`1` each). Returns `{0}`
/// admitted, `{1, remaining, retry_us}` rate limited, `{2}` streams full,
/// `{3, index (0-based), tokens available, retry_after_secs}` a short bucket, or `{4}` a
/// replayed proof (nothing taken).
const ADMIT_CALL: &str = concat!(
    "local NB = tonumber(ARGV[#ARGV - 3])\n",
    bucket_lua!(),
    r"
local rated = ARGV[#ARGV - 2] == '1'
local slotted = ARGV[#ARGV - 1] == '1'
local replay = ARGV[#ARGV] == '1'
local a = 2 * NB + 2
local k = NB + 1
if replay then
  if not redis.call('SET', KEYS[k], 1, 'PXAT', ARGV[a], 'NX') then return {4} end
  a = a + 1
  k = k + 1
end
if rated then
  local tat_key, block_key = KEYS[k], KEYS[k + 1]
  local interval, burst, block = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local tt = redis.call('TIME')
  local now_us = tonumber(tt[1]) * 1000000 + tonumber(tt[2])
  local blocked = redis.call('PTTL', block_key)
  if blocked > 0 then return {1, 0, blocked * 1000} end
  local tat = tonumber(redis.call('GET', tat_key) or now_us)
  if tat < now_us then tat = now_us end
  local new_tat = tat + interval
  local allow_at = new_tat - interval * burst
  if now_us < allow_at then
    local retry = allow_at - now_us
    if block > 0 then
      if block > retry then retry = block end
      redis.call('SET', block_key, 1, 'PX', math.ceil(retry / 1000))
    end
    return {1, 0, retry}
  end
  redis.call('SET', tat_key, new_tat, 'PX', math.ceil((new_tat - now_us) / 1000) + 1)
  a = a + 3
  k = k + 2
end
local stream_key = nil
if slotted then
  stream_key = KEYS[k]
  local open = tonumber(redis.call('GET', stream_key) or '0')
  if open >= tonumber(ARGV[a]) then return {2} end
end
local amount = tonumber(ARGV[1])
if NB > 0 and amount > 0 then
  local short = take_all(amount)
  if short then return {3, short[1], short[2], short[3]} end
end
if slotted then
  redis.call('INCR', stream_key)
  redis.call('EXPIREAT', stream_key, tonumber(ARGV[a + 1]) + 1)
end
return {0}
"
);

/// Takes a stream slot of session `KEYS[1]` (max `ARGV[1]`, held until `ARGV[2]` at most).
const ACQUIRE: &str = r"
local open = tonumber(redis.call('GET', KEYS[1]) or '0')
if open >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIREAT', KEYS[1], tonumber(ARGV[2]) + 1)
return 1
";

/// Gives back a stream slot of session `KEYS[1]`.
const RELEASE: &str = r"
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
";

/// Registers App Attest key `KEYS[1]` unless it exists: `ARGV` = public key, App ID,
/// development (`0`/`1`), counter, registration time, expiry (Unix ms). Returns 1 when
/// registered, 0 when the key was already there (first writer wins).
const REGISTER_KEY: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'pk', ARGV[1], 'app', ARGV[2], 'dev', ARGV[3], 'ctr', ARGV[4], 'at', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
return 1
";

/// Raises the counter of App Attest key `KEYS[1]` to `ARGV[1]` when strictly above the stored
/// one, then keeps the key until `ARGV[2]` (Unix ms). Returns 1 when raised, 0 when the key is
/// missing or its counter is not below (compare and set).
const ADVANCE_KEY: &str = r"
local current = redis.call('HGET', KEYS[1], 'ctr')
if not current then return 0 end
if tonumber(ARGV[1]) <= tonumber(current) then return 0 end
redis.call('HSET', KEYS[1], 'ctr', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
";

/// Shared state on Redis: see [`crate::store`]. One multiplexed, auto-reconnecting connection,
/// a timeout per call, keys under `store.key_prefix` that expire with what they record, and rate
/// limiting and cap admission as atomic Lua scripts on Redis's clock.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
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
    /// The queue of the task that batches settlements ([`settlements`]), started on first use.
    settlements: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<settlements::Settlement>>,
    /// The local copy of the revoked set, fed by pub/sub ([`revocations`]).
    revocations: Arc<revocations::Revocations>,
}

impl fmt::Debug for RedisStore {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://[:password@]host:port[/db]`, or `rediss://` for
    /// TLS: rustls, checking the server's certificate against the platform's roots or the PEM
    /// file `SSL_CERT_FILE` names), with keys under `prefix:` and `timeout` per call. Connects
    /// on first use.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, ConfigError> {
        let client = redis::Client::open(url).map_err(|_| ConfigError::Invalid {
            key: "store.url",
            reason: "is not a valid Redis URL".to_owned(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
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
                settlements: std::sync::OnceLock::new(),
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

impl Inner {
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    /// Adds each bucket's key (`KEYS[i]`) and its capacity and refill time (`ARGV[2i]`,
    /// `ARGV[2i+1]`, after the amount or delta in `ARGV[1]`) to a bucket script's call.
    fn bucket_keys(&self, call: &mut redis::ScriptInvocation<'_>, buckets: &[Bucket]) {
        for bucket in buckets {
            // Redis Cluster (unsupported) would need a call's keys in one slot: a hash tag.
            call.key(self.key("budget", &bucket.key))
                .arg(bucket.capacity.max(1))
                .arg(bucket.window_secs.max(1));
        }
    }

    /// Runs `op` on the connection, within the timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self
                .conn
                .get_or_try_init(|| async {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout))
                        .set_number_of_retries(1)
                        .set_max_delay(Duration::from_secs(1));
                    ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                })
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
                .clone();
            op(conn)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout)?
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
            let block = self.store.key(&format!("rlb:{}", self.policy.name), key);
            let (allowed, remaining, retry_us): (i64, i64, i64) = self
                .store
                .run(|mut conn| async move {
                    self.store
                        .gcra
                        .key(tat)
                        .key(block)
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
            let key = self.inner.key(set.name(), id);
            let at_ms = expiry_ms(expires_at);
            if set == Set::Revoked {
                // Recorded and published at once: every instance's copy learns of it.
                let inner = &self.inner;
                let fresh: i64 = inner
                    .run(|mut conn| async move {
                        inner
                            .revoke
                            .key(key)
                            .arg(at_ms)
                            .arg(revocations::channel(&inner.prefix))
                            .arg(format!("{id} {at_ms}"))
                            .invoke_async(&mut conn)
                            .await
                    })
                    .await?;
                inner.revocations.insert(id, at_ms, now_ms());
                return Ok(fresh == 1);
            }
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
            copy.start(self.inner.client.clone(), self.inner.prefix.clone());
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
            let wait: i64 = self
                .inner
                .run(|mut conn| async move {
                    let mut call = self.inner.admit.prepare_invoke();
                    for key in keys {
                        call.key(self.inner.key("caps", key));
                    }
                    call.arg(jti).arg(exp).arg(max.max(1));
                    call.invoke_async(&mut conn).await
                })
                .await?;
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
            self.inner
                .run(|mut conn| async move {
                    let mut pipe = redis::pipe();
                    for key in keys {
                        pipe.zrem(self.inner.key("caps", key), jti).ignore();
                    }
                    pipe.query_async::<()>(&mut conn).await
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
            self.inner
                .run(|mut conn| async move {
                    let mut call = self.inner.replace.prepare_invoke();
                    for key in keys {
                        call.key(self.inner.key("caps", key));
                    }
                    call.arg(old).arg(new).arg(exp);
                    call.invoke_async::<i64>(&mut conn).await.map(|_| ())
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
            let reply: Vec<i64> = self
                .inner
                .run(|mut conn| async move {
                    let mut call = self.inner.reserve.prepare_invoke();
                    call.arg(amount);
                    self.inner.bucket_keys(&mut call, buckets);
                    call.invoke_async(&mut conn).await
                })
                .await?;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(match reply.as_slice() {
                [1] => Reservation::Reserved,
                [0, bucket, available, retry] => Reservation::Exhausted {
                    bucket: usize::try_from(*bucket).unwrap_or(0),
                    available: count(*available),
                    retry_after_secs: count(*retry).max(1),
                },
                _ => return Err(StoreError::Unavailable("unexpected reply".to_owned())),
            })
        })
    }

    /// Batched with the other settlements waiting at the time (`redis/settlements.rs`).
    fn settle_tokens<'a>(&'a self, buckets: &'a [Bucket], delta: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if buckets.is_empty() || delta == 0 {
                return Ok(());
            }
            if tokio::runtime::Handle::try_current().is_ok() {
                let queue = self.inner.settlements.get_or_init(|| {
                    let (queue, settler) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(settlements::run(Arc::downgrade(&self.inner), settler));
                    queue
                });
                let (done, answer) = tokio::sync::oneshot::channel();
                let settlement = settlements::Settlement {
                    buckets: buckets.to_vec(),
                    delta,
                    done,
                };
                if queue.send(settlement).is_ok() {
                    return answer.await.unwrap_or_else(|_| {
                        Err(StoreError::Unavailable("settlement dropped".to_owned()))
                    });
                }
            }
            self.inner
                .run(|mut conn| async move {
                    let mut call = self.inner.settle.prepare_invoke();
                    call.arg(delta);
                    self.inner.bucket_keys(&mut call, buckets);
                    call.invoke_async::<i64>(&mut conn).await.map(|_| ())
                })
                .await
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

    /// One script, one round trip (`ADMIT_CALL`).
    fn admit_call<'a>(&'a self, call: CallAdmission<'a>) -> StoreFuture<'a, CallDecision> {
        Box::pin(async move {
            let inner = &self.inner;
            let reserving = call.amount > 0 && !call.buckets.is_empty();
            let buckets = if reserving { call.buckets } else { &[] };
            let reply: Vec<i64> = inner
                .run(|mut conn| async move {
                    let mut invocation = inner.admit_call.prepare_invoke();
                    invocation.arg(call.amount);
                    inner.bucket_keys(&mut invocation, buckets);
                    if let Some((id, expires_at)) = call.replay {
                        invocation
                            .key(inner.key(Set::DpopSeen.name(), id))
                            .arg(expiry_ms(expires_at));
                    }
                    if let Some((limiter, key)) = call.rate {
                        let gcra = Gcra::of(limiter.policy());
                        let name = limiter.policy().name;
                        invocation
                            .key(inner.key(&format!("rl:{name}"), key))
                            .key(inner.key(&format!("rlb:{name}"), key))
                            .arg(gcra.interval_us)
                            .arg(gcra.points)
                            .arg(gcra.block_us);
                    }
                    if let Some((jti, max, exp)) = call.stream {
                        invocation.key(inner.key("streams", jti)).arg(max).arg(exp);
                    }
                    invocation
                        .arg(buckets.len())
                        .arg(u8::from(call.rate.is_some()))
                        .arg(u8::from(call.stream.is_some()))
                        .arg(u8::from(call.replay.is_some()));
                    invocation.invoke_async(&mut conn).await
                })
                .await?;
            let field = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
            Ok(match reply.first() {
                Some(0) => CallDecision::Admitted,
                Some(1) => CallDecision::RateLimited(RateDecision {
                    allowed: false,
                    remaining: u32::try_from(field(1)).unwrap_or(u32::MAX),
                    retry_after: Duration::from_micros(field(2)),
                }),
                Some(2) => CallDecision::StreamsFull,
                Some(3) => CallDecision::Exhausted {
                    bucket: usize::try_from(field(1)).unwrap_or(0),
                    available: field(2),
                    retry_after_secs: field(3),
                },
                Some(4) => CallDecision::Replayed,
                _ => {
                    return Err(StoreError::Unavailable(
                        "malformed admission reply".to_owned(),
                    ));
                }
            })
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
