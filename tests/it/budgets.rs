//! Token budgets end to end (the `budget` module docs, "Budgets" in `docs/protocol.md`), on the
//! memory store and on a real `redis-server`: token buckets spent and refused with their
//! headers, refilled continuously (no fresh budget at what used to be a window boundary); the
//! per-client, per-IP and global scopes; concurrent calls held back by their reservations; a cut
//! stream keeping its reservation; the completion cap; the concurrent-stream cap; and a call
//! whose upstream cannot be reached (`502`) or does not answer in time (`504`) giving back its
//! reservation and its stream slot.
//!
//! Bucket levels are read through a spying store: reserving one token more than a bucket's
//! capacity never passes, takes nothing, and answers with what the bucket holds.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::*;
use perishable::config::BudgetScope;
use perishable::{ConfigBuilder, Perishable};
use perishable_mock::{MockOptions, MockUpstream};
use reqwest::Method;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Harness: a proxy on a recording store (`support::RecordingStore`), request bodies and their reservations.
// ---------------------------------------------------------------------------------------------

/// A proxy whose store is spied on.
struct Setup {
    proxy: Proxy,
    spy: Arc<RecordingStore>,
}

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

/// Starts a mock (with `options`) and a proxy in front of it, on the memory store or (with
/// `store_url`) on Redis under a key prefix of its own. Request rate limits are out of the way
/// (tests poll and mint more than a browser would).
async fn start(
    store_url: Option<&str>,
    options: MockOptions,
    tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> Setup {
    let mock = MockUpstream::start(options.api_key(SERVER_KEY))
        .await
        .unwrap();
    let mut builder = tweak(
        config(&mock.base_url())
            .rate_limit_points(100_000)
            .rate_limit_mint_per_ip(1_000),
    );
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
    let spy = Arc::new(RecordingStore::new(store));
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

/// A window so long that refill during a test is far below one token (capacities here are at
/// most a few thousand tokens): levels only change by what calls take and give back.
const LONG_WINDOW: u64 = 10_000_000;
/// Five words: the mock counts 5 prompt tokens.
const FIVE_WORDS: &str = "alpha beta gamma delta epsilon";

/// A chat completion body, as the client sends it (compact JSON).
fn chat_body(content: &str, max_tokens: Option<u64>, stream: bool) -> Vec<u8> {
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
    serde_json::to_vec(&body).unwrap()
}

/// [`chat_body`], streamed, asking for usage itself: the proxy forwards it unchanged and the
/// client sees the call's real usage.
fn stream_with_usage(content: &str, max_tokens: u64) -> Vec<u8> {
    let mut body: Value =
        serde_json::from_slice(&chat_body(content, Some(max_tokens), true)).unwrap();
    body["stream_options"] = json!({"include_usage": true});
    serde_json::to_vec(&body).unwrap()
}

/// A call's reservation: its completion ceiling plus its prompt, estimated at one token per
/// 4 bytes of the body the client sent.
fn reservation(body: &[u8], ceiling: u64) -> u64 {
    (body.len() as u64).div_ceil(4) + ceiling
}

/// A non-streamed chat body of `content` whose reservation is exactly `target`: `max_tokens`
/// is what the prompt estimate leaves (trailing spaces in the content break a tie at a digit
/// boundary; they are not words).
fn chat_reserving(content: &str, target: u64) -> Vec<u8> {
    for pad in 0..4 {
        let content = format!("{content}{}", " ".repeat(pad));
        let mut max_tokens = target;
        for _ in 0..4 {
            let body = chat_body(&content, Some(max_tokens), false);
            if reservation(&body, max_tokens) == target {
                return body;
            }
            max_tokens = target - (body.len() as u64).div_ceil(4);
        }
    }
    panic!("no body reserves exactly {target}");
}

async fn send(proxy: &Proxy, token: &str, fp: &str, body: &[u8]) -> reqwest::Response {
    proxy
        .openai(Method::POST, "chat/completions", token, fp)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

/// A reqwest client (with the test User-Agent) whose connections come from `ip`, a loopback
/// address other than 127.0.0.1: another client IP to the proxy.
fn client_from(ip: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(UA)
        .local_address(IpAddr::V4(ip))
        .build()
        .unwrap()
}

/// The same proxy, reached from `ip`.
fn from_ip(proxy: &Proxy, ip: Ipv4Addr) -> Proxy {
    Proxy {
        addr: proxy.addr,
        mock: proxy.mock.clone(),
        http: client_from(ip),
    }
}

/// Another loopback address, for a second client IP (Linux routes all of 127/8 to `lo`).
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Asserts a `429 budget_exhausted` from the bucket of `policy` (`tokens`, `tokens_ip`,
/// `tokens_global`) with its headers; returns `Retry-After`.
async fn assert_budget_exhausted(
    response: reqwest::Response,
    policy: &str,
    capacity: u64,
    window: u64,
) -> u64 {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    assert_eq!(status, 429, "expected 429 budget_exhausted: {text}");
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header: {text}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let retry_after: u64 = header("retry-after").parse().unwrap();
    assert!(
        (1..=window).contains(&retry_after),
        "Retry-After {retry_after} is not within the {window} s window"
    );
    assert_eq!(
        header("ratelimit-policy"),
        format!("\"{policy}\";q={capacity};w={window}")
    );
    let ratelimit = header("ratelimit");
    let remaining: u64 = ratelimit
        .strip_prefix(&format!("\"{policy}\";r="))
        .and_then(|rest| rest.split(';').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("RateLimit: {ratelimit}"));
    let body: Value = serde_json::from_str(&text).unwrap();
    // `r` is what the bucket holds, as the message says: too little for this call. (A call
    // larger than the whole bucket is refused without asking the store: 0 there.)
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{remaining} of {capacity} tokens left"))
            || (remaining == 0 && message.contains("more than the whole")),
        "RateLimit: {ratelimit}, message: {message}"
    );
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

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

// ---------------------------------------------------------------------------------------------
// A budget spent and refused, with its headers; nothing refused reaches the upstream.
// ---------------------------------------------------------------------------------------------

/// The mock answers with 5 deltas: with [`FIVE_WORDS`], each call really uses 5 + 5 = 10.
const DELTAS: usize = 5;
const USAGE: u64 = 10;

/// Each call reserves R = ceil(body/4) + 20 and really uses 10, against a bucket of
/// C = R + 35. A call passes while the bucket holds R; each leaves 10 spent once settled:
///
/// | call | bucket before | admitted | bucket after settlement |
/// |---|---|---|---|
/// | 1 | R + 35 | yes | R + 25 |
/// | 2 | R + 25 | yes | R + 15 |
/// | 3 | R + 15 | yes | R + 5 |
/// | 4 | R + 5 | yes | R - 5 |
/// | 5 | R - 5 | no: `429 budget_exhausted`, nothing taken | R - 5 |
///
/// Without settlement the second call would be refused; settled to its completion alone,
/// seven would pass.
async fn budget_spent_and_refused(store_url: Option<String>, stream: bool) {
    let fp = "device-budget-spent";
    let body = chat_body(FIVE_WORDS, Some(20), stream);
    let r = reservation(&body, 20);
    let capacity = r + 3 * USAGE + 5;
    let setup = start(
        store_url.as_deref(),
        MockOptions::new()
            .stream_deltas(DELTAS)
            .chunk_interval(Duration::from_millis(5)),
        |c| {
            c.budget_tokens_per_window(capacity)
                .budget_window_secs(LONG_WINDOW)
        },
    )
    .await;
    let proxy = &setup.proxy;
    let token = proxy.mint(fp).await.token;

    for i in 1..=4 {
        let response = send(proxy, &token, fp, &body).await;
        assert_eq!(response.status(), 200, "call {i} is within the budget");
        // Read to the end: a stream settles when it ends.
        let text = response.text().await.unwrap();
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
        let bucket = setup.spy.only("fp:");
        assert_eq!(
            (bucket.capacity, bucket.window_secs),
            (capacity, LONG_WINDOW)
        );
        setup
            .spy
            .wait_level(&bucket, capacity - USAGE * i, &format!("after call {i}"))
            .await;
    }
    assert_eq!(setup.spy.tried(), vec![r; 4], "each call reserved R");
    assert_eq!(proxy.mock.requests().len(), 4);

    let refused = send(proxy, &token, fp, &body).await;
    assert_budget_exhausted(refused, "tokens", capacity, LONG_WINDOW).await;
    assert_eq!(
        proxy.mock.requests().len(),
        4,
        "the refused call never reached the upstream"
    );
    let bucket = setup.spy.only("fp:");
    assert_eq!(
        setup.spy.level(&bucket).await,
        capacity - 4 * USAGE,
        "a refusal takes nothing"
    );
    assert_eq!(setup.spy.buckets("").len(), 1, "only the client's bucket");
}

on_both_stores!(
    budget_spent_and_refused_non_streamed_memory,
    budget_spent_and_refused_non_streamed_redis,
    |url| budget_spent_and_refused(url, false)
);
on_both_stores!(
    budget_spent_and_refused_streamed_memory,
    budget_spent_and_refused_streamed_redis,
    |url| budget_spent_and_refused(url, true)
);

/// A call that could cost more than the whole bucket is refused at once, whatever the bucket
/// holds, and never reaches the upstream.
async fn a_call_over_capacity_is_refused_at_once(store_url: Option<String>) {
    let fp = "device-budget-over";
    let body = chat_body(FIVE_WORDS, Some(500), false);
    let capacity = reservation(&body, 500) - 1;
    let setup = start(store_url.as_deref(), MockOptions::new(), |c| {
        c.budget_tokens_per_window(capacity)
            .budget_window_secs(LONG_WINDOW)
    })
    .await;
    let proxy = &setup.proxy;
    let token = proxy.mint(fp).await.token;
    let refused = send(proxy, &token, fp, &body).await;
    assert_budget_exhausted(refused, "tokens", capacity, LONG_WINDOW).await;
    assert!(proxy.mock.requests().is_empty());
    // The bucket is full, and still refuses it.
    let refused = send(proxy, &token, fp, &body).await;
    assert_budget_exhausted(refused, "tokens", capacity, LONG_WINDOW).await;
    assert!(proxy.mock.requests().is_empty());
    // A call that fits passes.
    let fits = send(proxy, &token, fp, &chat_body(FIVE_WORDS, Some(10), false)).await;
    assert_eq!(fits.status(), 200);
}

on_both_stores!(
    a_call_over_capacity_is_refused_at_once_memory,
    a_call_over_capacity_is_refused_at_once_redis,
    |url| a_call_over_capacity_is_refused_at_once(url)
);

// ---------------------------------------------------------------------------------------------
// Continuous refill: calls pass again, and no fresh budget at a former window boundary.
// ---------------------------------------------------------------------------------------------

/// A bucket of 300 tokens refilled over 3 s (100 tokens a second). One call reserves exactly
/// 280 and really uses 280 (1 prompt word + 279 deltas): the bucket is left with 20. The same
/// call right after is refused, with a `Retry-After` within the window; polled, it passes
/// again once the bucket has refilled, which cannot take less than (280 - 20) / 100 = 2.6 s.
async fn refill_admits_calls_again(store_url: Option<String>) {
    const CAPACITY: u64 = 300;
    const WINDOW: u64 = 3;
    const CALL: u64 = 280;
    let fp = "device-budget-refill";
    let body = chat_reserving("hi", CALL);
    let setup = start(
        store_url.as_deref(),
        MockOptions::new().stream_deltas(CALL as usize - 1),
        |c| {
            c.budget_tokens_per_window(CAPACITY)
                .budget_window_secs(WINDOW)
        },
    )
    .await;
    let proxy = &setup.proxy;
    let token = proxy.mint(fp).await.token;

    // Before the reservation: the bucket cannot refill faster than from here.
    let spent = Instant::now();
    let first = send(proxy, &token, fp, &body).await;
    assert_eq!(first.status(), 200);
    let reply: Value = first.json().await.unwrap();
    assert_eq!(
        reply["usage"]["total_tokens"], CALL,
        "usage equals the reservation"
    );

    let refused = send(proxy, &token, fp, &body).await;
    assert_budget_exhausted(refused, "tokens", CAPACITY, WINDOW).await;
    assert_eq!(proxy.mock.requests().len(), 1);

    // Poll (generously: up to 20 s) until the bucket has refilled enough.
    let mut admitted = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = send(proxy, &token, fp, &body).await;
        match response.status().as_u16() {
            200 => {
                response.bytes().await.unwrap();
                admitted = true;
                break;
            }
            429 => assert_eq!(error_code(response).await, "budget_exhausted"),
            other => panic!("unexpected {other}"),
        }
    }
    assert!(admitted, "the bucket never refilled");
    let waited = spent.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "refilled 260 tokens in {waited:?}: faster than 100 tokens a second"
    );
    assert_eq!(
        proxy.mock.requests().len(),
        2,
        "refusals never went upstream"
    );
}

on_both_stores!(
    refill_admits_calls_again_memory,
    refill_admits_calls_again_redis,
    |url| refill_admits_calls_again(url)
);

/// The old budgets counted in fixed windows aligned to the Unix epoch, so a client could
/// spend its budget just before a boundary and a whole fresh one just after. A bucket of
/// 1000 tokens refilled over 10 s is spent whole 1.5 s before such a boundary (one call
/// reserving and using exactly 1000). Just after the boundary the bucket holds only what
/// refilled since (100 tokens a second): a call reserving the whole budget is refused, a
/// small call within the refill passes.
async fn no_double_spend_across_a_former_window_boundary(store_url: Option<String>) {
    const CAPACITY: u64 = 1000;
    const WINDOW: u64 = 10;
    let fp = "device-budget-boundary";
    let spend = chat_reserving("hi", CAPACITY);
    let small = chat_body("hi", Some(10), false);
    let small_reservation = reservation(&small, 10);
    // Half a second after the boundary the bucket holds at least 50 tokens.
    assert!(small_reservation <= 50);

    for attempt in 1..=3 {
        let setup = start(
            store_url.as_deref(),
            MockOptions::new().stream_deltas(CAPACITY as usize - 1),
            |c| {
                c.budget_tokens_per_window(CAPACITY)
                    .budget_window_secs(WINDOW)
            },
        )
        .await;
        let proxy = &setup.proxy;
        let token = proxy.mint(fp).await.token;

        // 1.5 s before the next boundary of the old fixed windows.
        let window_ms = WINDOW * 1000;
        let phase = (unix_now().as_millis() % u128::from(window_ms)) as u64;
        let target = window_ms - 1500;
        let wait = (target + window_ms - phase) % window_ms;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let window = unix_now().as_secs() / WINDOW;
        let before_spend = Instant::now();

        let response = send(proxy, &token, fp, &spend).await;
        assert_eq!(response.status(), 200);
        let reply: Value = response.json().await.unwrap();
        assert_eq!(reply["usage"]["total_tokens"], CAPACITY);
        if unix_now().as_secs() / WINDOW != window {
            eprintln!("attempt {attempt}: the spend ended after the boundary; trying again");
            continue;
        }

        // Half a second into the next window, where the old budget would be whole again.
        let now = unix_now();
        let next = Duration::from_secs((now.as_secs() / WINDOW + 1) * WINDOW);
        tokio::time::sleep(next - now + Duration::from_millis(500)).await;

        let client = setup.spy.only("fp:");
        let level = setup.spy.level(&client).await;
        let elapsed = before_spend.elapsed().as_secs_f64();
        let refilled_at_most = (elapsed * (CAPACITY / WINDOW) as f64).ceil() as u64 + 1;
        assert!(
            level <= refilled_at_most,
            "{level} tokens {elapsed:.2} s after spending all {CAPACITY}"
        );
        assert!(
            level < CAPACITY / 2,
            "no fresh budget at the boundary: {level}"
        );

        let whole = send(proxy, &token, fp, &spend).await;
        let retry_after = assert_budget_exhausted(whole, "tokens", CAPACITY, WINDOW).await;
        assert!(
            retry_after > 1,
            "Retry-After {retry_after}: the bucket is far from full"
        );

        let within = send(proxy, &token, fp, &small).await;
        assert_eq!(within.status(), 200, "a call within the refill passes");
        within.bytes().await.unwrap();
        assert_eq!(proxy.mock.requests().len(), 2);
        return;
    }
    panic!("three attempts in a row could not spend before the boundary");
}

on_both_stores!(
    no_double_spend_across_a_former_window_boundary_memory,
    no_double_spend_across_a_former_window_boundary_redis,
    |url| no_double_spend_across_a_former_window_boundary(url)
);

// ---------------------------------------------------------------------------------------------
// Scopes: per client (or per session), per IP, global.
// ---------------------------------------------------------------------------------------------

/// With the default scope, two sessions of one fingerprint draw on one bucket; with
/// `budget.scope = "session"` each has its own. The bucket fits one call (R + 5; the call
/// uses 10).
async fn client_and_session_scopes(store_url: Option<String>) {
    let fp = "device-budget-scope";
    let body = chat_body(FIVE_WORDS, Some(20), false);
    let capacity = reservation(&body, 20) + 5;
    for scope in [BudgetScope::Client, BudgetScope::Session] {
        let setup = start(
            store_url.as_deref(),
            MockOptions::new().stream_deltas(DELTAS),
            |c| {
                c.budget_tokens_per_window(capacity)
                    .budget_window_secs(LONG_WINDOW)
                    .budget_scope(scope)
            },
        )
        .await;
        let proxy = &setup.proxy;
        let first = proxy.mint(fp).await.token;
        let second = proxy.mint(fp).await.token;
        let response = send(proxy, &first, fp, &body).await;
        assert_eq!(response.status(), 200, "{scope:?}");
        response.bytes().await.unwrap();
        let prefix = match scope {
            BudgetScope::Client => "fp:",
            _ => "sid:",
        };
        let bucket = setup.spy.only(prefix);
        setup
            .spy
            .wait_level(&bucket, capacity - USAGE, &format!("{scope:?}"))
            .await;

        let other_session = send(proxy, &second, fp, &body).await;
        match scope {
            BudgetScope::Client => {
                assert_budget_exhausted(other_session, "tokens", capacity, LONG_WINDOW).await;
                assert_eq!(proxy.mock.requests().len(), 1);
            }
            _ => {
                assert_eq!(other_session.status(), 200, "a session budget of its own");
                other_session.bytes().await.unwrap();
                assert_eq!(setup.spy.buckets("sid:").len(), 2);
            }
        }
    }
}

on_both_stores!(
    client_and_session_scopes_memory,
    client_and_session_scopes_redis,
    |url| client_and_session_scopes(url)
);

/// Two fingerprints from 127.0.0.1 share `per_ip_tokens_per_window` (R + 15: two calls of
/// the first one fit, each using 10), though each has a large client budget of its own; a
/// client from another IP is not affected.
async fn per_ip_budget_is_shared(store_url: Option<String>) {
    const CLIENT: u64 = 100_000;
    let body = chat_body(FIVE_WORDS, Some(20), false);
    let capacity = reservation(&body, 20) + USAGE + 5;
    let setup = start(
        store_url.as_deref(),
        MockOptions::new().stream_deltas(DELTAS),
        |c| {
            c.budget_tokens_per_window(CLIENT)
                .budget_per_ip_tokens_per_window(capacity)
                .budget_window_secs(LONG_WINDOW)
        },
    )
    .await;
    let proxy = &setup.proxy;
    let a = proxy.mint("device-ip-a").await.token;
    let b = proxy.mint("device-ip-b").await.token;
    for i in 1..=2 {
        let response = send(proxy, &a, "device-ip-a", &body).await;
        assert_eq!(response.status(), 200, "call {i} of a");
        response.bytes().await.unwrap();
        let ip = setup.spy.only("ip:");
        assert_eq!(ip.key, "ip:127.0.0.1");
        setup
            .spy
            .wait_level(&ip, capacity - USAGE * i, &format!("after call {i}"))
            .await;
    }
    let refused = send(proxy, &b, "device-ip-b", &body).await;
    assert_budget_exhausted(refused, "tokens_ip", capacity, LONG_WINDOW).await;
    assert_eq!(proxy.mock.requests().len(), 2);

    // Nothing was taken from b's own bucket (all or nothing), a's holds what a spent.
    let clients = setup.spy.buckets("fp:");
    assert_eq!(clients.len(), 2, "{clients:?}");
    let mut levels = Vec::new();
    for bucket in &clients {
        levels.push(setup.spy.level(bucket).await);
    }
    levels.sort_unstable();
    assert_eq!(levels, [CLIENT - 2 * USAGE, CLIENT]);

    if cfg!(target_os = "linux") {
        let elsewhere = from_ip(proxy, OTHER_IP);
        let c = elsewhere.mint("device-ip-c").await.token;
        let response = send(&elsewhere, &c, "device-ip-c", &body).await;
        assert_eq!(response.status(), 200, "another IP has its own bucket");
        response.bytes().await.unwrap();
        assert_eq!(setup.spy.buckets("ip:").len(), 2);
    }
}

on_both_stores!(
    per_ip_budget_is_shared_memory,
    per_ip_budget_is_shared_redis,
    |url| per_ip_budget_is_shared(url)
);

/// One global bucket (R + 15) for every client, whatever its fingerprint or IP.
async fn global_budget_is_shared(store_url: Option<String>) {
    let body = chat_body(FIVE_WORDS, Some(20), false);
    let capacity = reservation(&body, 20) + USAGE + 5;
    let setup = start(
        store_url.as_deref(),
        MockOptions::new().stream_deltas(DELTAS),
        |c| {
            c.budget_global_tokens_per_window(capacity)
                .budget_window_secs(LONG_WINDOW)
        },
    )
    .await;
    let proxy = &setup.proxy;
    let a = proxy.mint("device-global-a").await.token;
    for i in 1..=2 {
        let response = send(proxy, &a, "device-global-a", &body).await;
        assert_eq!(response.status(), 200, "call {i}");
        response.bytes().await.unwrap();
        let global = setup.spy.only("global");
        setup
            .spy
            .wait_level(&global, capacity - USAGE * i, &format!("after call {i}"))
            .await;
    }
    let b = proxy.mint("device-global-b").await.token;
    let refused = send(proxy, &b, "device-global-b", &body).await;
    assert_budget_exhausted(refused, "tokens_global", capacity, LONG_WINDOW).await;
    if cfg!(target_os = "linux") {
        let elsewhere = from_ip(proxy, OTHER_IP);
        let c = elsewhere.mint("device-global-c").await.token;
        let refused = send(&elsewhere, &c, "device-global-c", &body).await;
        assert_budget_exhausted(refused, "tokens_global", capacity, LONG_WINDOW).await;
    }
    assert_eq!(proxy.mock.requests().len(), 2);
    assert_eq!(setup.spy.buckets("").len(), 1, "only the global bucket");
}

on_both_stores!(
    global_budget_is_shared_memory,
    global_budget_is_shared_redis,
    |url| global_budget_is_shared(url)
);

// ---------------------------------------------------------------------------------------------
// Concurrency: reservations hold calls back.
// ---------------------------------------------------------------------------------------------

/// Eight streamed calls at once, each reserving R = ceil(body/4) + 10 and really using
/// 10 + 10 = 20, against a bucket of R + 2 that one reservation nearly fills. While the (slow)
/// streams run, the reservations count: the first is admitted and the rest refused. Whatever
/// the timing, the real usage stays within the budget plus one call's usage. Without
/// reservations all eight would pass: 160 tokens.
async fn concurrent_requests_are_held_back(store_url: Option<String>) {
    let fp = "device-budget-race";
    let ten_words = "one two three four five six seven eight nine ten";
    let body = stream_with_usage(ten_words, 10);
    let one_usage = 20;
    let capacity = reservation(&body, 10) + 2;
    assert!(8 * one_usage > capacity + one_usage);

    let setup = start(
        store_url.as_deref(),
        MockOptions::new()
            .stream_deltas(10)
            .chunk_interval(Duration::from_millis(50)),
        |c| {
            c.budget_tokens_per_window(capacity)
                .budget_window_secs(LONG_WINDOW)
        },
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
    assert!(admitted >= 1, "the first call is within the budget");
    assert!(
        admitted < 8,
        "the reservations held some back: {outcomes:?}"
    );
    assert_eq!(
        proxy.mock.requests().len(),
        admitted as usize,
        "only admitted calls reach the upstream"
    );
    assert!(
        real_usage <= capacity + one_usage,
        "{admitted} calls used {real_usage} tokens of a budget of {capacity}"
    );
    let bucket = setup.spy.only("fp:");
    setup
        .spy
        .wait_level(&bucket, capacity - real_usage, "after the streams settled")
        .await;
}

on_both_stores!(
    concurrent_requests_are_held_back_memory,
    concurrent_requests_are_held_back_redis,
    |url| concurrent_requests_are_held_back(url)
);

/// The scope a concurrency test spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `budget.tokens_per_window`: one session.
    Client,
    /// `budget.per_ip_tokens_per_window`: eight fingerprints from 127.0.0.1.
    Ip,
    /// `budget.global_tokens_per_window`: eight fingerprints, from two IPs on Linux.
    Global,
}

impl Scope {
    fn policy(self) -> &'static str {
        match self {
            Self::Client => "tokens",
            Self::Ip => "tokens_ip",
            Self::Global => "tokens_global",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::Client => "fp:",
            Self::Ip => "ip:",
            Self::Global => "global",
        }
    }

    fn configure(self, c: ConfigBuilder, capacity: u64) -> ConfigBuilder {
        let c = c.budget_window_secs(LONG_WINDOW);
        match self {
            Self::Client => c.budget_tokens_per_window(capacity),
            Self::Ip => c.budget_per_ip_tokens_per_window(capacity),
            Self::Global => c.budget_global_tokens_per_window(capacity),
        }
    }
}

/// What 40 concurrent calls at one scope did.
struct Spent {
    capacity: u64,
    reservation: u64,
    admitted: u64,
    /// The usage of each admitted call, as its client saw it.
    usage: Vec<u64>,
}

/// Fires 40 streamed calls at once (asking for usage themselves, so each client sees what
/// its call really used) from the sessions of `scope`, against a bucket of `capacity`
/// (computed from the body's reservation by `capacity_of`). Checks every answer is a 200 or a
/// `429 budget_exhausted` from that scope's bucket, that only admitted calls reached the
/// upstream, and waits for the bucket to settle.
async fn forty_at_once(
    store_url: Option<&str>,
    scope: Scope,
    body: &[u8],
    ceiling: u64,
    options: MockOptions,
    capacity_of: impl FnOnce(u64) -> u64,
) -> Spent {
    let r = reservation(body, ceiling);
    let capacity = capacity_of(r);
    let setup = start(store_url, options, |c| scope.configure(c, capacity)).await;
    let proxy = &setup.proxy;
    let elsewhere = from_ip(proxy, OTHER_IP);
    let mut sessions = Vec::new();
    let count = if scope == Scope::Client { 1 } else { 8 };
    for i in 0..count {
        let fp = format!("device-forty-{i}");
        let via = if scope == Scope::Global && i % 2 == 1 && cfg!(target_os = "linux") {
            &elsewhere
        } else {
            proxy
        };
        let token = via.mint(&fp).await.token;
        sessions.push((via, token, fp));
    }

    let outcomes = futures_util::future::join_all((0..40).map(|i| {
        let (via, token, fp) = &sessions[i % sessions.len()];
        async move {
            let response = send(via, token, fp, body).await;
            let status = response.status().as_u16();
            let policy = response
                .headers()
                .get("ratelimit-policy")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, policy, response.text().await.unwrap())
        }
    }))
    .await;

    let mut usage = Vec::new();
    for (status, policy, text) in &outcomes {
        match status {
            200 => usage.push(stream_usage(text)),
            429 => {
                let error: Value = serde_json::from_str(text).unwrap();
                assert_eq!(error["error"]["code"], "budget_exhausted", "{text}");
                assert_eq!(
                    policy.as_deref(),
                    Some(format!("\"{}\";q={capacity};w={LONG_WINDOW}", scope.policy()).as_str())
                );
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let admitted = usage.len() as u64;
    assert!(
        admitted >= 1,
        "{scope:?}: the first call is within the budget"
    );
    assert!(admitted < 40, "{scope:?}: the reservations held some back");
    assert_eq!(
        proxy.mock.requests().len() as u64,
        admitted,
        "{scope:?}: only admitted calls reach the upstream"
    );
    let bucket = setup.spy.only(scope.prefix());
    let spent: u64 = usage.iter().sum();
    setup
        .spy
        .wait_level(
            &bucket,
            capacity.saturating_sub(spent),
            &format!("{scope:?} after settlement"),
        )
        .await;
    Spent {
        capacity,
        reservation: r,
        admitted,
        usage,
    }
}

/// 40 concurrent calls at each scope, each reserving R = ceil(body/4) + 30 and really using
/// 5 + 5 = 10, against a bucket of 2R + 7: the total really spent stays within the budget
/// plus one call's difference between its reservation and its usage, and the bucket ends
/// holding exactly the budget minus what was spent. Without reservations all 40 would pass
/// (400 tokens).
async fn forty_concurrent_calls_stay_within_the_budget(store_url: Option<String>, scope: Scope) {
    let body = stream_with_usage(FIVE_WORDS, 30);
    let spent = forty_at_once(
        store_url.as_deref(),
        scope,
        &body,
        30,
        MockOptions::new()
            .stream_deltas(DELTAS)
            .chunk_interval(Duration::from_millis(20)),
        |r| 2 * r + 7,
    )
    .await;
    assert!(spent.usage.iter().all(|u| *u == USAGE), "{:?}", spent.usage);
    let total = spent.admitted * USAGE;
    assert!(40 * USAGE > spent.capacity + spent.reservation);
    assert!(
        total <= spent.capacity + (spent.reservation - USAGE),
        "{scope:?}: {} calls spent {total} of a budget of {}",
        spent.admitted,
        spent.capacity
    );
}

on_both_stores!(
    forty_concurrent_calls_stay_within_the_client_budget_memory,
    forty_concurrent_calls_stay_within_the_client_budget_redis,
    |url| forty_concurrent_calls_stay_within_the_budget(url, Scope::Client)
);
on_both_stores!(
    forty_concurrent_calls_stay_within_the_ip_budget_memory,
    forty_concurrent_calls_stay_within_the_ip_budget_redis,
    |url| forty_concurrent_calls_stay_within_the_budget(url, Scope::Ip)
);
on_both_stores!(
    forty_concurrent_calls_stay_within_the_global_budget_memory,
    forty_concurrent_calls_stay_within_the_global_budget_redis,
    |url| forty_concurrent_calls_stay_within_the_budget(url, Scope::Global)
);

/// The documented bound when the prompt estimate is low: 200 one-letter words (`"a a a …"`,
/// 2 bytes a token, as a real tokenizer counts them too) are estimated at about half their
/// real count. Each call reserves R = ceil(body/4) + 5 and really uses U = 200 + 5, more than
/// R. Each admitted call overshoots by at most its own difference U − R (docs/protocol.md,
/// "Budgets"): 40 slow streams at once against a bucket of 1000 spend at most
/// 1000 + admitted × (U − R), and no more calls are admitted than the bucket covers.
async fn underestimated_concurrent_calls_overshoot_by_their_own_difference(
    store_url: Option<String>,
) {
    let content = "a ".repeat(200);
    let body = stream_with_usage(content.trim_end(), 5);
    let spent = forty_at_once(
        store_url.as_deref(),
        Scope::Client,
        &body,
        5,
        MockOptions::new()
            .stream_deltas(5)
            .chunk_interval(Duration::from_millis(100)),
        |_| 1000,
    )
    .await;
    let usage = spent.usage[0];
    assert!(
        usage > spent.reservation,
        "the estimate is low: {usage} > {}",
        spent.reservation
    );
    let total: u64 = spent.usage.iter().sum();
    let admitted = spent.admitted;
    assert_eq!(
        admitted,
        spent.capacity / spent.reservation,
        "exactly the calls the bucket covers are admitted"
    );
    assert!(
        total <= spent.capacity + admitted * (usage - spent.reservation),
        "{admitted} calls each reserving {} spent {total} of a budget of {}: over by more \
         than their own {} tokens each",
        spent.reservation,
        spent.capacity,
        usage - spent.reservation
    );
}

#[tokio::test]
async fn underestimated_concurrent_calls_overshoot_by_their_own_difference_memory() {
    underestimated_concurrent_calls_overshoot_by_their_own_difference(None).await;
}

// ---------------------------------------------------------------------------------------------
// A stream cut before its usage keeps its reservation.
// ---------------------------------------------------------------------------------------------

/// A slow stream reserving Rc = ceil(body/4) + 100 is cut after its first chunk, before its
/// usage arrives: it stays charged Rc. The bucket is Rc + Rf + 45, where each follow-up
/// reserves Rf and really uses 5 + 10 = 15: four follow-ups pass (at Rf + 45, Rf + 30,
/// Rf + 15 and Rf left) and the fifth is refused. Had the cut stream been refunded, or
/// settled to any usage it might have had (at most 5 + 10), at least ten would pass.
async fn cut_stream_keeps_its_reservation(store_url: Option<String>) {
    let fp = "device-budget-cut";
    let cut_body = stream_with_usage(FIVE_WORDS, 100);
    let cut_reservation = reservation(&cut_body, 100);
    let follow_up = chat_body(FIVE_WORDS, Some(10), false);
    let follow_reservation = reservation(&follow_up, 10);
    let capacity = cut_reservation + follow_reservation + 45;

    let setup = start(
        store_url.as_deref(),
        MockOptions::new()
            .stream_deltas(10)
            .chunk_interval(Duration::from_millis(100)),
        |c| {
            c.budget_tokens_per_window(capacity)
                .budget_window_secs(LONG_WINDOW)
        },
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
    let bucket = setup.spy.only("fp:");
    // Give a (wrong) settlement time to happen, then check the reservation stands.
    tokio::time::sleep(Duration::from_millis(200)).await;
    setup
        .spy
        .wait_level(&bucket, capacity - cut_reservation, "after the cut stream")
        .await;

    for i in 1..=4 {
        let response = send(proxy, &token, fp, &follow_up).await;
        assert_eq!(response.status(), 200, "follow-up {i}");
        response.bytes().await.unwrap();
        setup
            .spy
            .wait_level(
                &bucket,
                capacity - cut_reservation - 15 * i,
                &format!("after follow-up {i}"),
            )
            .await;
    }
    let refused = send(proxy, &token, fp, &follow_up).await;
    assert_budget_exhausted(refused, "tokens", capacity, LONG_WINDOW).await;
    assert_eq!(proxy.mock.requests().len(), 5);
}

on_both_stores!(
    cut_stream_keeps_its_reservation_memory,
    cut_stream_keeps_its_reservation_redis,
    |url| cut_stream_keeps_its_reservation(url)
);

// ---------------------------------------------------------------------------------------------
// The completion cap.
// ---------------------------------------------------------------------------------------------

/// `budget.max_completion_tokens = 50`: a ceiling above it is lowered, none is added; either
/// way the call reserves its prompt plus 50, not its own ceiling or the default 4096.
async fn completion_cap_lowers_or_adds_the_ceiling(store_url: Option<String>) {
    const CAP: u64 = 50;
    let setup = start(store_url.as_deref(), MockOptions::new(), |c| {
        c.budget_max_completion_tokens(CAP)
            .budget_tokens_per_window(100_000)
            .budget_window_secs(LONG_WINDOW)
    })
    .await;
    let proxy = &setup.proxy;
    let fp = "device-budget-cap";
    let token = proxy.mint(fp).await.token;
    // Sends `body` to `path`; returns the body the upstream received and what was reserved.
    let upstream_body = |path: &'static str, body: Vec<u8>| {
        let proxy = &proxy;
        let token = &token;
        let spy = &setup.spy;
        async move {
            let before = proxy.mock.requests().len();
            let response = proxy
                .openai(Method::POST, path, token, fp)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
            let requests = proxy.mock.requests();
            assert_eq!(requests.len(), before + 1);
            let reserved = *spy.tried().last().unwrap();
            (requests.last().unwrap().clone(), reserved)
        }
    };

    let body = chat_body("hi", Some(5000), false);
    let (over, reserved) = upstream_body("chat/completions", body.clone()).await;
    let sent = over.body_json().unwrap();
    assert_eq!(sent["max_tokens"], CAP, "{sent}");
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");
    assert_eq!(reserved, reservation(&body, CAP));

    let body = serde_json::to_vec(
        &json!({"model": "gpt-4o-mini", "max_completion_tokens": 5000,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .unwrap();
    let (over, reserved) = upstream_body("chat/completions", body.clone()).await;
    assert_eq!(over.body_json().unwrap()["max_completion_tokens"], CAP);
    assert_eq!(reserved, reservation(&body, CAP));

    let body = chat_body("hi", None, false);
    let (none, reserved) = upstream_body("chat/completions", body.clone()).await;
    let sent = none.body_json().unwrap();
    assert_eq!(sent["max_completion_tokens"], CAP, "{sent}");
    assert!(sent.get("max_tokens").is_none(), "{sent}");
    assert_eq!(
        reserved,
        reservation(&body, CAP),
        "the cap, not the default 4096"
    );

    // Streamed too.
    let body = chat_body("hi", None, true);
    let (none, reserved) = upstream_body("chat/completions", body.clone()).await;
    assert_eq!(none.body_json().unwrap()["max_completion_tokens"], CAP);
    assert_eq!(reserved, reservation(&body, CAP));

    // Legacy completions get `max_tokens`.
    let body =
        serde_json::to_vec(&json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"})).unwrap();
    let (none, reserved) = upstream_body("completions", body.clone()).await;
    assert_eq!(none.body_json().unwrap()["max_tokens"], CAP);
    assert_eq!(reserved, reservation(&body, CAP));

    // Under the cap: the body passes byte for byte, and reserves its own ceiling.
    let under = chat_body("hi", Some(10), false);
    let (received, reserved) = upstream_body("chat/completions", under.clone()).await;
    assert_eq!(received.body, under);
    assert_eq!(reserved, reservation(&under, 10));
}

on_both_stores!(
    completion_cap_lowers_or_adds_the_ceiling_memory,
    completion_cap_lowers_or_adds_the_ceiling_redis,
    |url| completion_cap_lowers_or_adds_the_ceiling(url)
);

// ---------------------------------------------------------------------------------------------
// The concurrent-stream cap.
// ---------------------------------------------------------------------------------------------

/// Polls (up to 5 s) until a new stream on the session is admitted; returns its body.
async fn stream_when_free(proxy: &Proxy, token: &str, fp: &str) -> String {
    let body = chat_body("hello", None, true);
    for _ in 0..250 {
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
    let stream = chat_body("hello", None, true);

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

    // Only streams count: a plain call passes meanwhile.
    let plain = send(proxy, &token, fp, &chat_body("hello", None, false)).await;
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

on_both_stores!(
    concurrent_stream_cap_memory,
    concurrent_stream_cap_redis,
    |url| concurrent_stream_cap(url)
);

// ---------------------------------------------------------------------------------------------
// An upstream that fails gives back what the call took.
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
                let (addr, accepted) = silent_upstream().await;
                (format!("http://{addr}/v1"), Some(accepted))
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

/// Calls in a row against a failing upstream.
const FAILED_REQUESTS: usize = 3;

/// Each call reserves ceil(body/4) + 600 against a bucket of exactly that: one reservation
/// empties it, so were a failed call's reservation kept, the next call would get
/// `429 budget_exhausted`. Nothing was spent, so each failure gives the reservation back (the
/// bucket is full again) and every call gets the upstream's error.
async fn failed_upstream_gives_back_its_reservation(store_url: Option<String>, failure: Failure) {
    let fp = "device-budget-failed-upstream";
    let body = chat_body(FIVE_WORDS, Some(600), false);
    let capacity = reservation(&body, 600);
    let (base_url, accepted) = failure.upstream().await;
    let setup = start(store_url.as_deref(), MockOptions::new(), |c| {
        c.upstream_base_url(base_url)
            .upstream_first_byte_timeout_ms(FIRST_BYTE_TIMEOUT_MS)
            .budget_tokens_per_window(capacity)
            .budget_window_secs(LONG_WINDOW)
    })
    .await;
    let proxy = &setup.proxy;
    let token = proxy.mint(fp).await.token;

    for i in 1..=FAILED_REQUESTS {
        let response = send(proxy, &token, fp, &body).await;
        let what = format!("call {i} (never 429 budget_exhausted)");
        assert_upstream_error(response, failure.error(), &what).await;
        // Given back in a spawned task: wait for it before the next call.
        let bucket = setup.spy.only("fp:");
        setup
            .spy
            .wait_level(&bucket, capacity, &format!("after failed call {i}"))
            .await;
        if let Some(accepted) = &accepted {
            assert!(
                accepted.load(Ordering::SeqCst) >= i,
                "call {i} reached the silent upstream"
            );
        }
    }
    assert_eq!(setup.spy.tried(), vec![capacity; FAILED_REQUESTS]);
}

on_both_stores!(
    unreachable_upstream_gives_back_its_reservation_memory,
    unreachable_upstream_gives_back_its_reservation_redis,
    |url| failed_upstream_gives_back_its_reservation(url, Failure::Unreachable)
);
on_both_stores!(
    silent_upstream_gives_back_its_reservation_memory,
    silent_upstream_gives_back_its_reservation_redis,
    |url| failed_upstream_gives_back_its_reservation(url, Failure::Silent)
);

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
    let stream = chat_body("hello", None, true);

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

on_both_stores!(
    unreachable_upstream_gives_back_its_stream_slot_memory,
    unreachable_upstream_gives_back_its_stream_slot_redis,
    |url| failed_stream_gives_back_its_slot(url, Failure::Unreachable)
);
on_both_stores!(
    silent_upstream_gives_back_its_stream_slot_memory,
    silent_upstream_gives_back_its_stream_slot_redis,
    |url| failed_stream_gives_back_its_slot(url, Failure::Silent)
);

/// `perishable::serve` returns only once the settlements of the calls it served have reached
/// the store (`store::settled`), so a process that exits right after loses none, even on a
/// slow store.
#[tokio::test]
async fn serve_returns_after_the_settlements_reach_the_store() {
    let mock = MockUpstream::start(MockOptions::new().api_key(SERVER_KEY))
        .await
        .unwrap();
    let config = config(&mock.base_url())
        .budget_tokens_per_window(100_000)
        .build()
        .unwrap();
    let spy = Arc::new(RecordingStore::in_memory().slow_settlements(Duration::from_millis(500)));
    let perishable = Perishable::with_store(config, spy.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(perishable::serve(
        listener,
        perishable::router_from(&perishable),
        async {
            let _ = stopped.await;
        },
    ));
    let proxy = Proxy {
        addr,
        mock,
        http: client(),
    };
    let session = proxy.mint("device-settle-at-exit").await;
    let response = proxy
        .openai(
            Method::POST,
            "chat/completions",
            &session.token,
            "device-settle-at-exit",
        )
        .header("content-type", "application/json")
        .body(chat_body(FIVE_WORDS, Some(50), false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    // Stopped at once: the settlement is still waiting on the slow store.
    stop.send(()).unwrap();
    drop(proxy);
    server.await.unwrap();
    assert_eq!(
        spy.settled().len(),
        1,
        "serve returned before the call's settlement reached the store"
    );
}
