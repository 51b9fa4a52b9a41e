//! Token budgets end to end (the `budget` module docs), on the memory store and on a real
//! `redis-server`: a budget spent exactly, refused, and allowed again in the next window;
//! concurrent requests held back by their reservations; a cut stream charged its reservation;
//! the completion cap; the concurrent-stream cap; and a request whose upstream cannot be
//! reached (`502 upstream_unavailable`) or does not answer in time (`504 upstream_timeout`)
//! giving back its token reservation and its stream slot.
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::FutureExt;
use perishable::mock::{MockOptions, MockUpstream};
use perishable::store::{Admission, RateLimiter, RatePolicy, Reservation, Set, Store, StoreFuture};
use perishable::{ConfigBuilder, Perishable};
use reqwest::Method;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Harness: a spying store, a proxy on it, budget windows.
// ---------------------------------------------------------------------------------------------

/// A [`Store`] that hands every operation to the real one (memory or Redis) and remembers the
/// budget keys it was asked to reserve under, so a test can read how many tokens the current
/// window holds once the (spawned) settlement has run; and counts the stream slots given back.
#[derive(Debug)]
struct Spy {
    inner: Arc<dyn Store>,
    budget_keys: Mutex<Vec<String>>,
    /// Completed `release_stream` calls.
    streams_released: AtomicUsize,
}

impl Spy {
    /// Tokens used and reserved in the current window under the one budget key seen so far.
    async fn used(&self, window_secs: u64) -> u64 {
        let key = {
            let keys = self.budget_keys.lock().unwrap();
            assert_eq!(keys.len(), 1, "one client, one budget key: {keys:?}");
            keys[0].clone()
        };
        // A limit of 0 admits nothing: the store answers with what the window holds and
        // reserves nothing (`used >= limit`).
        match self
            .inner
            .reserve_tokens(&key, 0, 0, window_secs)
            .await
            .unwrap()
        {
            Reservation::Exhausted { used, .. } => used,
            Reservation::Reserved { .. } => panic!("a limit of 0 admitted a reservation"),
        }
    }

    /// Waits (up to 1 s: settlement is spawned after the response ends) until the current
    /// window holds exactly `expected` tokens.
    async fn wait_used(&self, window_secs: u64, expected: u64, what: &str) {
        let mut used = 0;
        for _ in 0..100 {
            used = self.used(window_secs).await;
            if used == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: the budget holds {used} tokens, expected {expected}");
    }

    /// Waits (up to 1 s: the slot is given back in a spawned task) until exactly `expected`
    /// stream slots have been given back to the store.
    async fn wait_streams_released(&self, expected: usize, what: &str) {
        let mut released = 0;
        for _ in 0..100 {
            released = self.streams_released.load(Ordering::SeqCst);
            if released == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: {released} stream slots given back, expected {expected}");
    }
}

impl Store for Spy {
    fn rate_limiter(&self, policy: RatePolicy) -> Arc<dyn RateLimiter> {
        self.inner.rate_limiter(policy)
    }

    fn insert_once<'a>(&'a self, set: Set, id: &'a str, expires_at: u64) -> StoreFuture<'a, bool> {
        self.inner.insert_once(set, id, expires_at)
    }

    fn contains<'a>(&'a self, set: Set, id: &'a str) -> StoreFuture<'a, bool> {
        self.inner.contains(set, id)
    }

    fn admit_session<'a>(
        &'a self,
        keys: &'a [String],
        jti: &'a str,
        exp: u64,
        max: u32,
    ) -> StoreFuture<'a, Admission> {
        self.inner.admit_session(keys, jti, exp, max)
    }

    fn release_session<'a>(&'a self, keys: &'a [String], jti: &'a str) -> StoreFuture<'a, ()> {
        self.inner.release_session(keys, jti)
    }

    fn replace_session<'a>(
        &'a self,
        keys: &'a [String],
        old: &'a str,
        new: &'a str,
        exp: u64,
    ) -> StoreFuture<'a, ()> {
        self.inner.replace_session(keys, old, new, exp)
    }

    fn reserve_tokens<'a>(
        &'a self,
        key: &'a str,
        amount: u64,
        limit: u64,
        window_secs: u64,
    ) -> StoreFuture<'a, Reservation> {
        {
            let mut keys = self.budget_keys.lock().unwrap();
            if !keys.iter().any(|k| k == key) {
                keys.push(key.to_owned());
            }
        }
        self.inner.reserve_tokens(key, amount, limit, window_secs)
    }

    fn settle_tokens<'a>(
        &'a self,
        key: &'a str,
        window: u64,
        window_secs: u64,
        delta: i64,
    ) -> StoreFuture<'a, ()> {
        self.inner.settle_tokens(key, window, window_secs, delta)
    }

    fn acquire_stream<'a>(&'a self, session: &'a str, max: u32, exp: u64) -> StoreFuture<'a, bool> {
        self.inner.acquire_stream(session, max, exp)
    }

    fn release_stream<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Counted once the store has freed the slot, so a waiter may rely on it.
            let released = self.inner.release_stream(session).await;
            self.streams_released.fetch_add(1, Ordering::SeqCst);
            released
        })
    }
}

/// A proxy whose store is spied on.
struct Setup {
    proxy: Proxy,
    spy: Arc<Spy>,
}

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

/// Starts a mock (with `options`) and a proxy in front of it, on the memory store or (with
/// `store_url`) on Redis under a key prefix of its own.
async fn start(
    store_url: Option<&str>,
    options: MockOptions,
    tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> Setup {
    let mock = MockUpstream::start(options.api_key(SERVER_KEY))
        .await
        .unwrap();
    let mut builder = tweak(config(&mock.base_url()));
    if let Some(url) = store_url {
        let prefix = format!(
            "budgets{}x{}",
            std::process::id(),
            PREFIXES.fetch_add(1, Ordering::Relaxed)
        );
        builder = builder.store_url(url).store_key_prefix(prefix);
    }
    let config = builder.build().unwrap();
    // The store `store.url` names, built as the library builds it, behind the spy.
    let store = Perishable::new(config.clone()).unwrap().store().clone();
    let spy = Arc::new(Spy {
        inner: store,
        budget_keys: Mutex::default(),
        streams_released: AtomicUsize::new(0),
    });
    let perishable = Perishable::with_store(config, spy.clone()).unwrap();
    let addr = serve(perishable::router_from(&perishable)).await;
    Setup {
        proxy: Proxy {
            addr,
            mock,
            http: client(),
        },
        spy,
    }
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

/// The fixed budget window we are in (windows are aligned to the Unix epoch).
fn window_index(window_secs: u64) -> u64 {
    now().as_secs() / window_secs
}

/// Sleeps until just after the next window starts.
async fn sleep_to_next_window(window_secs: u64) {
    let n = now();
    let next = Duration::from_secs((n.as_secs() / window_secs + 1) * window_secs);
    tokio::time::sleep(next - n + Duration::from_millis(30)).await;
}

/// Runs `attempt`, whose assertions only hold within one budget window. Should a window
/// boundary pass while it runs (the budget then resets) and an assertion fail, the attempt is
/// made again (at most 3 times). With `align`, each attempt starts just after a window starts.
async fn in_one_window<T, F, Fut>(window_secs: u64, align: bool, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    for _ in 0..3 {
        if align {
            sleep_to_next_window(window_secs).await;
        }
        let started = window_index(window_secs);
        let outcome = AssertUnwindSafe(attempt()).catch_unwind().await;
        let crossed = window_index(window_secs) != started;
        match outcome {
            Ok(value) => return value,
            Err(panic) if !crossed => std::panic::resume_unwind(panic),
            Err(_) => eprintln!("a budget window ended during the attempt: trying again"),
        }
    }
    panic!("three attempts in a row crossed a budget window boundary");
}

/// A chat completion request naming `max_tokens` (when given).
fn chat(content: &str, max_tokens: Option<u64>, stream: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
    });
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    if stream {
        body["stream"] = json!(true);
    }
    body
}

async fn send(proxy: &Proxy, token: &str, fp: &str, body: &Value) -> reqwest::Response {
    proxy
        .openai(Method::POST, "chat/completions", token, fp)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A request's reservation: its prompt estimated at one token per 4 bytes of the body the
/// proxy sends, plus its completion ceiling.
fn reservation(body: &Value, ceiling: u64) -> u64 {
    (serde_json::to_vec(body).unwrap().len() as u64).div_ceil(4) + ceiling
}

/// Asserts a `429 budget_exhausted` with its headers; returns `Retry-After`.
async fn assert_budget_exhausted(response: reqwest::Response, limit: u64, window: u64) -> u64 {
    assert_eq!(response.status(), 429, "expected 429 budget_exhausted");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let retry_after: u64 = header("retry-after").parse().unwrap();
    assert!(
        (1..=window).contains(&retry_after),
        "Retry-After {retry_after} is not within the {window} s window"
    );
    let policy = header("ratelimit-policy");
    assert!(
        policy.contains(&format!("q={limit}")) && policy.contains(&format!("w={window}")),
        "RateLimit-Policy: {policy}"
    );
    let ratelimit = header("ratelimit");
    assert!(ratelimit.contains("r=0"), "RateLimit: {ratelimit}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exhausted", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    retry_after
}

/// The usage a streamed response reported to a client that asked for it.
fn stream_usage(text: &str) -> u64 {
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| chunk["usage"]["total_tokens"].as_u64())
        .last()
        .unwrap_or_else(|| panic!("no usage in the stream: {text}"))
}

// ---------------------------------------------------------------------------------------------
// A budget spent exactly, refused, allowed again in the next window.
// ---------------------------------------------------------------------------------------------

/// Budget window, seconds.
const W: u64 = 3;
/// Tokens per window.
const LIMIT: u64 = 31;
/// Five words: the mock counts 5 prompt tokens.
const FIVE_WORDS: &str = "alpha beta gamma delta epsilon";
/// The mock answers with 5 deltas: 5 completion tokens.
const DELTAS: usize = 5;
/// So each request really uses 5 + 5 = 10 tokens.
const USAGE: u64 = 10;

/// The arithmetic. Each request reserves ceil(body/4) + 20 (`max_tokens: 20`) ≈ 47 tokens, more
/// than the whole budget of 31, and really uses 10. A request is admitted while the window's
/// used + reserved tokens are under 31, so once each request is settled to its real usage:
///
/// | request | window before | admitted | window after settlement |
/// |---|---|---|---|
/// | 1 | 0  | yes | 10 |
/// | 2 | 10 | yes | 20 |
/// | 3 | 20 | yes | 30 |
/// | 4 | 30 | yes | 40 |
/// | 5 | 40 | no: `429 budget_exhausted` | 40 |
///
/// Without settlement the second would already be refused (47 ≥ 31); settled to the completion
/// alone (5 each) seven would pass.
async fn budget_spent_exactly(store_url: Option<String>, stream: bool) {
    let fp = "device-budget-exact";
    let body = chat(FIVE_WORDS, Some(20), stream);
    assert!(
        reservation(&body, 20) >= LIMIT,
        "one reservation fills the budget"
    );
    let (setup, token, retry_after) = in_one_window(W, true, || {
        let store_url = store_url.clone();
        let body = body.clone();
        async move {
            let setup = start(
                store_url.as_deref(),
                MockOptions::new()
                    .stream_deltas(DELTAS)
                    .chunk_interval(Duration::from_millis(5)),
                |c| c.budget_tokens_per_window(LIMIT).budget_window_secs(W),
            )
            .await;
            let proxy = &setup.proxy;
            let token = proxy.mint(fp).await.token;
            for i in 1..=4 {
                let response = send(proxy, &token, fp, &body).await;
                assert_eq!(response.status(), 200, "request {i} is within the budget");
                // Read to the end: a stream settles when it ends.
                let text = response.text().await.unwrap();
                if stream {
                    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
                }
                setup
                    .spy
                    .wait_used(W, USAGE * i, &format!("after request {i}"))
                    .await;
            }
            assert_eq!(proxy.mock.requests().len(), 4);

            let refused = send(proxy, &token, fp, &body).await;
            let retry_after = assert_budget_exhausted(refused, LIMIT, W).await;
            assert_eq!(
                proxy.mock.requests().len(),
                4,
                "the refused request never reached the upstream"
            );
            assert_eq!(setup.spy.used(W).await, 40, "a refusal reserves nothing");
            (setup, token, retry_after)
        }
    })
    .await;

    // Retry-After points at the end of the window: then the budget is whole again.
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let proxy = &setup.proxy;
    let again = send(proxy, &token, fp, &body).await;
    assert_eq!(again.status(), 200, "a new window, a new budget");
    again.text().await.unwrap();
    assert_eq!(proxy.mock.requests().len(), 5);
    setup.spy.wait_used(W, USAGE, "in the next window").await;
}

#[tokio::test]
async fn budget_spent_exactly_non_streamed_memory() {
    budget_spent_exactly(None, false).await;
}

#[tokio::test]
async fn budget_spent_exactly_streamed_memory() {
    budget_spent_exactly(None, true).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn budget_spent_exactly_non_streamed_redis() {
    let Some(redis) = Redis::start() else { return };
    budget_spent_exactly(Some(redis.url()), false).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn budget_spent_exactly_streamed_redis() {
    let Some(redis) = Redis::start() else { return };
    budget_spent_exactly(Some(redis.url()), true).await;
}

// ---------------------------------------------------------------------------------------------
// Concurrent requests cannot all slip under the limit.
// ---------------------------------------------------------------------------------------------

/// Eight streamed requests at once, each reserving R = ceil(body/4) + 10 tokens and really
/// using 10 + 10 = 20, against a budget of R + 2 that one reservation nearly fills. The
/// reservations count at once, so while the (slow) streams run, the first two are admitted
/// (0 and R are under R + 2) and the rest refused (2R is not). Whatever the timing, the spec's
/// bound holds: the real usage goes past the budget by one request's usage at most. Without
/// reservations all eight would pass: 160 tokens against a bound of R + 22 ≈ 70.
async fn concurrent_requests_are_held_back(store_url: Option<String>) {
    const WINDOW: u64 = 3600;
    let fp = "device-budget-race";
    let ten_words = "one two three four five six seven eight nine ten";
    // The client asks for usage itself, so the proxy sends its body unchanged (R is exact) and
    // the client sees each request's real usage.
    let mut body = chat(ten_words, Some(10), true);
    body["stream_options"] = json!({"include_usage": true});
    let one_usage = 20;
    let limit = reservation(&body, 10) + 2;
    assert!(8 * one_usage > limit + one_usage);

    in_one_window(WINDOW, false, || {
        let store_url = store_url.clone();
        let body = body.clone();
        async move {
            let setup = start(
                store_url.as_deref(),
                MockOptions::new()
                    .stream_deltas(10)
                    .chunk_interval(Duration::from_millis(50)),
                |c| c.budget_tokens_per_window(limit),
            )
            .await;
            let proxy = &setup.proxy;
            let token = proxy.mint(fp).await.token;
            let outcomes = futures_util::future::join_all((0..8).map(|_| async {
                let response = send(proxy, &token, fp, &body).await;
                let status = response.status().as_u16();
                (status, response.text().await.unwrap())
            }))
            .await;

            let mut admitted = 0;
            let mut real_usage = 0;
            for (status, text) in &outcomes {
                match status {
                    200 => {
                        admitted += 1;
                        let usage = stream_usage(text);
                        assert_eq!(usage, one_usage, "the mock's usage: 10 words + 10 deltas");
                        real_usage += usage;
                    }
                    429 => {
                        let error: Value = serde_json::from_str(text).unwrap();
                        assert_eq!(error["error"]["code"], "budget_exhausted", "{text}");
                    }
                    other => panic!("unexpected {other}: {text}"),
                }
            }
            assert!(admitted >= 1, "the first request is within the budget");
            assert!(
                admitted < 8,
                "the reservations held some back: {outcomes:?}"
            );
            assert_eq!(
                proxy.mock.requests().len(),
                admitted as usize,
                "only admitted requests reach the upstream"
            );
            assert!(
                real_usage <= limit + one_usage,
                "{admitted} requests used {real_usage} tokens of a budget of {limit}"
            );
            setup
                .spy
                .wait_used(WINDOW, real_usage, "after the streams settled")
                .await;
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_requests_are_held_back_memory() {
    concurrent_requests_are_held_back(None).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn concurrent_requests_are_held_back_redis() {
    let Some(redis) = Redis::start() else { return };
    concurrent_requests_are_held_back(Some(redis.url())).await;
}

// ---------------------------------------------------------------------------------------------
// A stream cut before its usage keeps its reservation.
// ---------------------------------------------------------------------------------------------

/// A slow stream reserving Rc = ceil(body/4) + 100 is cut after its first chunk, before its
/// usage arrives: it stays charged Rc. The budget is Rc + 60, and each following request
/// really uses 5 + 10 = 15, so they pass at Rc, Rc + 15, Rc + 30 and Rc + 45, and the fifth
/// (at Rc + 60) is refused. Had the cut stream been refunded, or settled to any usage it might
/// have had (at most 5 + 10), at least 13 would pass.
async fn cut_stream_keeps_its_reservation(store_url: Option<String>) {
    const WINDOW: u64 = 3600;
    let fp = "device-budget-cut";
    let mut cut_body = chat(FIVE_WORDS, Some(100), true);
    cut_body["stream_options"] = json!({"include_usage": true});
    let cut_reservation = reservation(&cut_body, 100);
    let limit = cut_reservation + 60;
    let follow_up = chat(FIVE_WORDS, Some(10), false);

    in_one_window(WINDOW, false, || {
        let store_url = store_url.clone();
        let cut_body = cut_body.clone();
        let follow_up = follow_up.clone();
        async move {
            let setup = start(
                store_url.as_deref(),
                MockOptions::new()
                    .stream_deltas(10)
                    .chunk_interval(Duration::from_millis(100)),
                |c| c.budget_tokens_per_window(limit),
            )
            .await;
            let proxy = &setup.proxy;
            let token = proxy.mint(fp).await.token;

            let mut cut = send(proxy, &token, fp, &cut_body).await;
            assert_eq!(cut.status(), 200);
            let first = cut.chunk().await.unwrap().unwrap();
            assert!(first.starts_with(b"data: "), "{first:?}");
            drop(cut);
            // The proxy notices on its next write and cancels the upstream request.
            for _ in 0..500 {
                if proxy.mock.active_streams() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(proxy.mock.active_streams(), 0, "the upstream was cancelled");
            assert_eq!(proxy.mock.completed_streams(), 0);
            setup
                .spy
                .wait_used(WINDOW, cut_reservation, "after the cut stream")
                .await;

            for i in 1..=4 {
                let response = send(proxy, &token, fp, &follow_up).await;
                assert_eq!(response.status(), 200, "follow-up {i}");
                response.text().await.unwrap();
                setup
                    .spy
                    .wait_used(
                        WINDOW,
                        cut_reservation + 15 * i,
                        &format!("after follow-up {i}"),
                    )
                    .await;
            }
            let refused = send(proxy, &token, fp, &follow_up).await;
            assert_budget_exhausted(refused, limit, WINDOW).await;
            assert_eq!(proxy.mock.requests().len(), 5);
        }
    })
    .await;
}

#[tokio::test]
async fn cut_stream_keeps_its_reservation_memory() {
    cut_stream_keeps_its_reservation(None).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn cut_stream_keeps_its_reservation_redis() {
    let Some(redis) = Redis::start() else { return };
    cut_stream_keeps_its_reservation(Some(redis.url())).await;
}

// ---------------------------------------------------------------------------------------------
// The completion cap.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn completion_cap_lowers_or_adds_the_ceiling() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.budget_max_completion_tokens(50)).await;
    let fp = "device-budget-cap";
    let token = proxy.mint(fp).await.token;
    // Sends `body` to `path` and returns the body the upstream received.
    let upstream_body = |path: &'static str, body: Value| {
        let proxy = &proxy;
        let token = &token;
        async move {
            let before = proxy.mock.requests().len();
            let response = proxy
                .openai(Method::POST, path, token, fp)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
            response.bytes().await.unwrap();
            let requests = proxy.mock.requests();
            assert_eq!(requests.len(), before + 1);
            requests.last().unwrap().clone()
        }
    };

    let over = upstream_body("chat/completions", chat("hi", Some(5000), false)).await;
    let sent = over.body_json().unwrap();
    assert_eq!(sent["max_tokens"], 50, "{sent}");
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");

    let over = upstream_body(
        "chat/completions",
        json!({"model": "gpt-4o-mini", "max_completion_tokens": 5000,
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(over.body_json().unwrap()["max_completion_tokens"], 50);

    let none = upstream_body("chat/completions", chat("hi", None, false)).await;
    let sent = none.body_json().unwrap();
    assert_eq!(sent["max_completion_tokens"], 50, "{sent}");
    assert!(sent.get("max_tokens").is_none(), "{sent}");

    // Streamed too.
    let none = upstream_body("chat/completions", chat("hi", None, true)).await;
    assert_eq!(none.body_json().unwrap()["max_completion_tokens"], 50);

    // Legacy completions get `max_tokens`.
    let none = upstream_body(
        "completions",
        json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}),
    )
    .await;
    assert_eq!(none.body_json().unwrap()["max_tokens"], 50);

    // Under the cap: the body passes byte for byte.
    let under = chat("hi", Some(10), false);
    let received = upstream_body("chat/completions", under.clone()).await;
    assert_eq!(received.body, serde_json::to_vec(&under).unwrap());
}

// ---------------------------------------------------------------------------------------------
// The concurrent-stream cap.
// ---------------------------------------------------------------------------------------------

/// Polls (up to 2 s) until a new stream on the session is admitted; returns its body.
async fn stream_when_free(proxy: &Proxy, token: &str, fp: &str) -> String {
    let body = chat("hello", None, true);
    for _ in 0..100 {
        let response = send(proxy, token, fp, &body).await;
        match response.status().as_u16() {
            200 => return response.text().await.unwrap(),
            429 => assert_eq!(error_code(response).await, "rate_limited"),
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the stream slot was never freed");
}

async fn concurrent_stream_cap(store_url: Option<String>) {
    let setup = start(
        store_url.as_deref(),
        MockOptions::new()
            .stream_deltas(10)
            .chunk_interval(Duration::from_millis(50)),
        |c| c.budget_max_concurrent_streams(1),
    )
    .await;
    let proxy = &setup.proxy;
    let fp = "device-stream-cap";
    let token = proxy.mint(fp).await.token;
    let stream = chat("hello", None, true);

    let mut first = send(proxy, &token, fp, &stream).await;
    assert_eq!(first.status(), 200);
    first.chunk().await.unwrap().unwrap();

    let second = send(proxy, &token, fp, &stream).await;
    assert_eq!(second.status(), 429);
    let retry_after = second.headers().get("retry-after").cloned();
    let error: Value = second.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limited", "{error}");
    assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");
    assert!(retry_after.is_some(), "a 429 carries Retry-After");
    assert_eq!(
        proxy.mock.requests().len(),
        1,
        "the refused stream never left"
    );

    // Only streams count: a plain request passes meanwhile.
    let plain = send(proxy, &token, fp, &chat("hello", None, false)).await;
    assert_eq!(plain.status(), 200);
    plain.text().await.unwrap();
    // The cap is per session: another session may stream.
    let other_fp = "device-stream-cap-2";
    let other = proxy.mint(other_fp).await.token;
    let parallel = send(proxy, &other, other_fp, &stream).await;
    assert_eq!(parallel.status(), 200);

    // The slot is freed when the stream ends...
    while first.chunk().await.unwrap().is_some() {}
    parallel.text().await.unwrap();
    let text = stream_when_free(proxy, &token, fp).await;
    assert!(text.ends_with("data: [DONE]\n\n"));

    // ... or when the client goes away.
    let mut cut = send(proxy, &token, fp, &stream).await;
    assert_eq!(cut.status(), 200);
    cut.chunk().await.unwrap().unwrap();
    let refused = send(proxy, &token, fp, &stream).await;
    assert_eq!(refused.status(), 429, "the cut stream still holds the slot");
    drop(cut);
    stream_when_free(proxy, &token, fp).await;
}

#[tokio::test]
async fn concurrent_stream_cap_memory() {
    concurrent_stream_cap(None).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn concurrent_stream_cap_redis() {
    let Some(redis) = Redis::start() else { return };
    concurrent_stream_cap(Some(redis.url())).await;
}

// ---------------------------------------------------------------------------------------------
// An upstream that fails gives back what the request took.
// ---------------------------------------------------------------------------------------------

/// How the upstream fails.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// Nothing listens at `upstream.base_url`: `502 upstream_unavailable`.
    Unreachable,
    /// The upstream takes the connection and never answers: `504 upstream_timeout` once
    /// `upstream.first_byte_timeout_ms` ([`FIRST_BYTE_TIMEOUT_MS`]) has passed.
    Silent,
}

/// `upstream.first_byte_timeout_ms` for the failing upstreams.
const FIRST_BYTE_TIMEOUT_MS: u64 = 200;

impl Failure {
    /// The status and error code the client gets.
    fn error(self) -> (u16, &'static str) {
        match self {
            Self::Unreachable => (502, "upstream_unavailable"),
            Self::Silent => (504, "upstream_timeout"),
        }
    }

    /// Starts the failing upstream; returns its base URL and, for a silent one, the number of
    /// connections it has taken.
    async fn upstream(self) -> (String, Option<Arc<AtomicUsize>>) {
        match self {
            Self::Unreachable => (closed_upstream(), None),
            Self::Silent => {
                let (base_url, accepted) = silent_base_url().await;
                (base_url, Some(accepted))
            }
        }
    }
}

/// A base URL nothing listens on: a 127.0.0.1 port bound, then let go.
fn closed_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

/// [`silent_upstream`] as a base URL.
async fn silent_base_url() -> (String, Arc<AtomicUsize>) {
    let (addr, accepted) = silent_upstream().await;
    (format!("http://{addr}/v1"), accepted)
}

/// Asserts the `status` and error `code` a failed upstream gives the client.
async fn assert_upstream_error(response: reqwest::Response, error: (u16, &str), what: &str) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
    assert_eq!(
        (status, body["error"]["code"].as_str().unwrap_or_default()),
        error,
        "{what}: {text}"
    );
}

/// Requests in a row against a failing upstream.
const FAILED_REQUESTS: usize = 3;

/// Each request reserves ceil(body/4) + 600 tokens against a budget of 600: one reservation
/// fills it, so were a failed request's reservation kept (until the window ends), the next
/// request would get `429 budget_exhausted`. Nothing was spent, so each failure gives the
/// reservation back and every request gets the upstream's error.
async fn failed_upstream_gives_back_its_reservation(store_url: Option<String>, failure: Failure) {
    const WINDOW: u64 = 3600;
    const LIMIT: u64 = 600;
    let fp = "device-budget-failed-upstream";
    let body = chat(FIVE_WORDS, Some(600), false);
    assert!(
        reservation(&body, 600) >= LIMIT,
        "one reservation fills the budget"
    );
    let (base_url, accepted) = failure.upstream().await;
    let setup = start(store_url.as_deref(), MockOptions::new(), |c| {
        c.upstream_base_url(base_url)
            .upstream_first_byte_timeout_ms(FIRST_BYTE_TIMEOUT_MS)
            .budget_tokens_per_window(LIMIT)
            .budget_window_secs(WINDOW)
    })
    .await;
    let proxy = &setup.proxy;
    let token = proxy.mint(fp).await.token;

    for i in 1..=FAILED_REQUESTS {
        let response = send(proxy, &token, fp, &body).await;
        let what = format!("request {i} (never 429 budget_exhausted)");
        assert_upstream_error(response, failure.error(), &what).await;
        // Released in a spawned task: wait for it before the next request.
        setup
            .spy
            .wait_used(WINDOW, 0, &format!("after failed request {i}"))
            .await;
        if let Some(accepted) = &accepted {
            assert!(
                accepted.load(Ordering::SeqCst) >= i,
                "request {i} reached the silent upstream"
            );
        }
    }
}

#[tokio::test]
async fn unreachable_upstream_gives_back_its_reservation_memory() {
    failed_upstream_gives_back_its_reservation(None, Failure::Unreachable).await;
}

#[tokio::test]
async fn silent_upstream_gives_back_its_reservation_memory() {
    failed_upstream_gives_back_its_reservation(None, Failure::Silent).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn unreachable_upstream_gives_back_its_reservation_redis() {
    let Some(redis) = Redis::start() else { return };
    failed_upstream_gives_back_its_reservation(Some(redis.url()), Failure::Unreachable).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn silent_upstream_gives_back_its_reservation_redis() {
    let Some(redis) = Redis::start() else { return };
    failed_upstream_gives_back_its_reservation(Some(redis.url()), Failure::Silent).await;
}

/// One stream per session (`budget.max_concurrent_streams = 1`): were a failed stream's slot
/// kept (until the session ends), the next stream would get `429 rate_limited`. Each failure
/// gives the slot back, so every stream gets the upstream's error.
async fn failed_stream_gives_back_its_slot(store_url: Option<String>, failure: Failure) {
    let fp = "device-stream-failed-upstream";
    let (base_url, accepted) = failure.upstream().await;
    let setup = start(store_url.as_deref(), MockOptions::new(), |c| {
        c.upstream_base_url(base_url)
            .upstream_first_byte_timeout_ms(FIRST_BYTE_TIMEOUT_MS)
            .budget_max_concurrent_streams(1)
    })
    .await;
    let proxy = &setup.proxy;
    let token = proxy.mint(fp).await.token;
    let stream = chat("hello", None, true);

    for i in 1..=FAILED_REQUESTS {
        let response = send(proxy, &token, fp, &stream).await;
        let what = format!("stream {i} (never 429 rate_limited)");
        assert_upstream_error(response, failure.error(), &what).await;
        setup
            .spy
            .wait_streams_released(i, &format!("after failed stream {i}"))
            .await;
        if let Some(accepted) = &accepted {
            assert!(
                accepted.load(Ordering::SeqCst) >= i,
                "stream {i} reached the silent upstream"
            );
        }
    }
}

#[tokio::test]
async fn unreachable_upstream_gives_back_its_stream_slot_memory() {
    failed_stream_gives_back_its_slot(None, Failure::Unreachable).await;
}

#[tokio::test]
async fn silent_upstream_gives_back_its_stream_slot_memory() {
    failed_stream_gives_back_its_slot(None, Failure::Silent).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn unreachable_upstream_gives_back_its_stream_slot_redis() {
    let Some(redis) = Redis::start() else { return };
    failed_stream_gives_back_its_slot(Some(redis.url()), Failure::Unreachable).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn silent_upstream_gives_back_its_stream_slot_redis() {
    let Some(redis) = Redis::start() else { return };
    failed_stream_gives_back_its_slot(Some(redis.url()), Failure::Silent).await;
}
