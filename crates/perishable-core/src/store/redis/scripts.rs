//! The Lua scripts of the Redis store: each one runs atomically, in one round trip, on Redis's
//! clock (`TIME`), so instances with drifting clocks still agree.
//!
//! Every script touches the keys of one slot only when the store is given keys that share a
//! hash tag; on Redis Cluster the store splits a call by slot first (`cluster.rs`).

/// `now` (Unix ms) and `now_us` (Unix µs): Redis's clock, read once per script.
macro_rules! clock_lua {
    () => {
        r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"
    };
}

/// `gcra(key, interval, burst, block)`: GCRA with the same semantics as governor: a burst of
/// `burst`, one request replenished every `interval` µs, and a block of `block` µs after going
/// over, at `now_us` (`clock_lua`). Returns `allowed (0|1), remaining, retry_after_us`.
///
/// The record under `key` is the theoretical arrival time (Unix µs), followed by the end of the
/// block (Unix µs) while one holds: one `GET` and at most one `SET` per check. It is kept until
/// the client is back to a full burst, or the block ends, whichever is later.
macro_rules! gcra_lua {
    () => {
        r"
local function gcra(key, interval, burst, block)
  local tat, blocked_until = now_us, 0
  local v = redis.call('GET', key)
  if v then
    local t, b = string.match(v, '^(%d+) (%d+)$')
    if t then
      tat, blocked_until = tonumber(t), tonumber(b)
    else
      tat = tonumber(v) or now_us
    end
  end
  if blocked_until > now_us then
    return 0, 0, blocked_until - now_us
  end
  local stored = tat
  if tat < now_us then tat = now_us end
  local new_tat = tat + interval
  local allow_at = new_tat - interval * burst
  if now_us < allow_at then
    local retry = allow_at - now_us
    if block > 0 then
      if block > retry then retry = block end
      local keep = stored - now_us
      if retry > keep then keep = retry end
      redis.call('SET', key, string.format('%d %d', stored, now_us + retry), 'PX', math.ceil(keep / 1000) + 1)
    end
    return 0, 0, retry
  end
  redis.call('SET', key, string.format('%d', new_tat), 'PX', math.ceil((new_tat - now_us) / 1000) + 1)
  return 1, math.floor((now_us - allow_at) / interval), 0
end
"
    };
}

/// GCRA (`gcra_lua`) for the limiter key `KEYS[1]`, with `ARGV` = interval, burst, block.
/// Returns `{allowed (0|1), remaining, retry_after_us}`.
pub(super) const GCRA: &str = concat!(
    clock_lua!(),
    gcra_lua!(),
    r"
local allowed, remaining, retry =
  gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return {allowed, remaining, retry}
"
);

/// Takes a slot for `ARGV[1]` (until `ARGV[2]`, Unix s) under every key, unless one holds
/// `ARGV[3]` live sessions. Returns -1 when admitted, else the seconds until a slot frees up.
pub(super) const ADMIT: &str = r"
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
pub(super) const REPLACE: &str = r"
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
  redis.call('ZADD', key, tonumber(ARGV[3]), ARGV[2])
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('EXPIREAT', key, tonumber(last[2]) + 1)
end
return 1
";

/// Token-bucket records, and the token-bucket functions of the scripts: needs `now`
/// (`clock_lua`).
///
/// A bucket is a string `tokens ms`, its level at Unix ms `ms`, kept until 1 s after it is full
/// again; a missing key is a full bucket. `stored(key, cap, secs)` is the level now (capacity
/// `cap`, refilled from empty in `secs` s), `store(key, tokens, cap, secs)` changes it, and
/// `flush()` writes every change once, at the end: a bucket settled and then reserved in one
/// script is read once and written once. The same arithmetic as the memory store's
/// (`store/memory/`), in f64.
///
/// For the buckets of a call, `KEYS[i]` with capacity `ARGV[2i]` and refill time `ARGV[2i+1]`:
/// `level(i)`, `put(i, tokens)`, and `take_all(amount)`.
macro_rules! bucket_lua {
    () => {
        r"
local dirty, order = {}, {}
local function stored(key, cap, secs)
  local d = dirty[key]
  if d then
    -- Written full (deleted), or above this capacity: full.
    if d[1] >= d[2] or d[1] > cap then return cap end
    return d[1]
  end
  local v = redis.call('GET', key)
  if not v then return cap end
  local held, ms = string.match(v, '^(%S+) (%S+)$')
  held, ms = tonumber(held), tonumber(ms)
  if not held or not ms then return cap end
  local elapsed = now - ms
  if elapsed < 0 then elapsed = 0 end
  local tokens = held + elapsed * cap / (secs * 1000)
  if tokens > cap then tokens = cap end
  return tokens
end
local function store(key, tokens, cap, secs)
  if not dirty[key] then order[#order + 1] = key end
  dirty[key] = {tokens, cap, secs}
end
local function flush()
  for _, key in ipairs(order) do
    local d = dirty[key]
    local tokens, cap, secs = d[1], d[2], d[3]
    if tokens >= cap then
      redis.call('DEL', key)
    else
      local ttl = math.ceil((cap - tokens) * (secs * 1000) / cap) + 1000
      if ttl > 1099511627776 then ttl = 1099511627776 end
      redis.call('SET', key, string.format('%.17g %d', tokens, now), 'PX', string.format('%d', ttl))
    end
  end
end
local function params(i)
  local cap = tonumber(ARGV[2 * i])
  local secs = tonumber(ARGV[2 * i + 1])
  if cap < 1 then cap = 1 end
  if secs < 1 then secs = 1 end
  return cap, secs
end
local function level(i)
  local cap, secs = params(i)
  return stored(KEYS[i], cap, secs)
end
local function put(i, tokens)
  local cap, secs = params(i)
  store(KEYS[i], tokens, cap, secs)
end
-- The index of the last key before i equal to KEYS[i], or nil.
local function earlier(i)
  for k = i - 1, 1, -1 do
    if KEYS[k] == KEYS[i] then return k end
  end
  return nil
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
-- A key named twice keeps its last level, which has seen both changes.
local function put_all(after)
  for i = 1, NB do put(i, after[i]) end
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

/// `settle_many(k, a)`: applies the settlements whose count is `ARGV[a]` and whose keys start at
/// `KEYS[k]`: per settlement `n, delta`, then `n` times `capacity, refill seconds` for the next
/// `n` keys. Each bucket as `SETTLE` does it: refilled to now, `delta` added (never above
/// capacity). Needs `bucket_lua` before it; the changes are written by `flush()`.
macro_rules! settle_many_lua {
    () => {
        r"
local function settle_many(k, a)
  local count = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, count do
    local n, delta = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    a = a + 2
    for _ = 1, n do
      local key = KEYS[k]
      local cap, secs = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
      if cap < 1 then cap = 1 end
      if secs < 1 then secs = 1 end
      a, k = a + 2, k + 1
      store(key, stored(key, cap, secs) + delta, cap, secs)
    end
  end
end
"
    };
}

/// Takes `ARGV[1]` tokens from every bucket in `KEYS` or from none (see `bucket_lua`). Returns
/// `{1}`, or `{0, index (0-based), tokens available, retry_after_secs}` for the short bucket
/// that takes longest to hold the amount.
pub(super) const RESERVE: &str = concat!(
    "local NB = #KEYS\n",
    clock_lua!(),
    bucket_lua!(),
    r"
local short = take_all(tonumber(ARGV[1]))
flush()
if short then return {0, short[1], short[2], short[3]} end
return {1}
"
);

/// Adds `ARGV[1]` tokens to every bucket in `KEYS` (see `bucket_lua`), never above capacity.
pub(super) const SETTLE: &str = concat!(
    "local NB = #KEYS\n",
    clock_lua!(),
    bucket_lua!(),
    r"
local delta = tonumber(ARGV[1])
put_all(levels_after(function(i, tokens)
  local cap = params(i)
  tokens = tokens + delta
  if tokens > cap then tokens = cap end
  return tokens
end))
flush()
return 1
"
);

/// A proxied call's admission in one round trip ([`Store::admit_call`]): the rate limit (GCRA,
/// as `GCRA`), then the stream slot and the token reservation (as `ACQUIRE` and `RESERVE`), or
/// neither.
///
/// `KEYS`: the `NB` buckets, then the DPoP replay key when a proof is recorded, then the
/// limiter's key when rated, then the stream counter when a slot is asked.
/// `ARGV`: the amount, each bucket's capacity and refill time, then the replay key's expiry
/// (Unix ms), then the GCRA interval, burst and block (µs) when rated, then the stream max and
/// expiry when a slot is asked, then the settlements it carries (`SA` arguments for
/// `settle_many`, whose `SK` keys come last in `KEYS`), then `NB`, rated, slot and replay (`0`/`1`
/// each), `SK` and `SA`. The settlements apply first, whatever the answer. Returns `{0}`
/// admitted, `{1, remaining, retry_us}` rate limited, `{2}` streams full,
/// `{3, index (0-based), tokens available, retry_after_secs}` a short bucket, or `{4}` a
/// replayed proof (nothing taken).
pub(super) const ADMIT_CALL: &str = concat!(
    "local NB = tonumber(ARGV[#ARGV - 5])\n",
    clock_lua!(),
    bucket_lua!(),
    settle_many_lua!(),
    gcra_lua!(),
    r"
local SK, SA = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
if SA > 0 then settle_many(#KEYS - SK + 1, #ARGV - 6 - SA + 1) end
local rated = ARGV[#ARGV - 4] == '1'
local slotted = ARGV[#ARGV - 3] == '1'
local replay = ARGV[#ARGV - 2] == '1'
local function decide()
  local a = 2 * NB + 2
  local k = NB + 1
  if replay then
    if not redis.call('SET', KEYS[k], 1, 'PXAT', ARGV[a], 'NX') then return {4} end
    a = a + 1
    k = k + 1
  end
  if rated then
    local allowed, _, retry = gcra(KEYS[k], tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
    if allowed == 0 then return {1, 0, retry} end
    a = a + 3
    k = k + 1
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
end
-- The settlements carried apply whatever the answer.
local reply = decide()
flush()
return reply
"
);

/// Takes a stream slot of session `KEYS[1]` (max `ARGV[1]`, held until `ARGV[2]` at most).
pub(super) const ACQUIRE: &str = r"
local open = tonumber(redis.call('GET', KEYS[1]) or '0')
if open >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIREAT', KEYS[1], tonumber(ARGV[2]) + 1)
return 1
";

/// Gives back a stream slot of session `KEYS[1]`.
pub(super) const RELEASE: &str = r"
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
";

/// Registers App Attest key `KEYS[1]` unless it exists: `ARGV` = public key, App ID,
/// development (`0`/`1`), counter, registration time, expiry (Unix ms). Returns 1 when
/// registered, 0 when the key was already there (first writer wins).
pub(super) const REGISTER_KEY: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'pk', ARGV[1], 'app', ARGV[2], 'dev', ARGV[3], 'ctr', ARGV[4], 'at', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
return 1
";

/// Raises the counter of App Attest key `KEYS[1]` to `ARGV[1]` when strictly above the stored
/// one, then keeps the key until `ARGV[2]` (Unix ms). Returns 1 when raised, 0 when the key is
/// missing or its counter is not below (compare and set).
pub(super) const ADVANCE_KEY: &str = r"
local current = redis.call('HGET', KEYS[1], 'ctr')
if not current then return 0 end
if tonumber(ARGV[1]) <= tonumber(current) then return 0 end
redis.call('HSET', KEYS[1], 'ctr', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
";
