//! Metered calls end to end ("Metered calls" and "Forwarding rules" in `docs/protocol.md`):
//! each way past the meter from the security report, as a regression test over real sockets.
//! Every refusal is checked twice: the status and code the client gets, and that the mock
//! upstream received nothing (or exactly the bytes it should have).
//!
//! - bodies the strict parser refuses (`400 invalid_json`) or that are not plain JSON
//!   (`415 unsupported_media_type`), after the budget is spent: never a 200;
//! - concurrent streams asking for many choices (`n`), reserved for all of them;
//! - ceilings, flags and counts of a type a lax upstream reads differently
//!   (`400 invalid_parameter`), and keys differing from a metered one only in case;
//! - embeddings and moderations, reserved for their prompt;
//! - an escaped `"str\u0065am"` key, which is `stream`;
//! - edits in place: every byte the proxy does not own reaches the upstream as sent;
//! - headers upstream by allow-list, and the CORS preflight that goes with it;
//! - the body deadline against a client trickling its body (`408 body_timeout`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use perishable::ConfigBuilder;
use perishable_mock::MockOptions;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Harness.
// ---------------------------------------------------------------------------------------------

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

/// A window so long that nothing refills during a test.
const LONG_WINDOW: u64 = 10_000_000;
const FP: &str = "device-metered-calls";
const APP: &str = "https://app.example";

/// A mock and a proxy, on the memory store or (with `store_url`) on Redis under a key prefix
/// of its own; request rate limits out of the way.
async fn start(
    store_url: Option<&str>,
    options: MockOptions,
    tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> Proxy {
    Proxy::start_with(options, |c| {
        let c = tweak(
            c.rate_limit_points(100_000)
                .rate_limit_mint_per_ip(1_000)
                .budget_window_secs(LONG_WINDOW),
        );
        match store_url {
            Some(url) => c.store_url(url).store_key_prefix(format!(
                "metered{}x{}",
                std::process::id(),
                PREFIXES.fetch_add(1, Ordering::Relaxed)
            )),
            None => c,
        }
    })
    .await
}

/// `POST /openai/{path}` with `body` as is, declared `content_type` (none: no header) and
/// `encoding` (`Content-Encoding`).
async fn post(
    proxy: &Proxy,
    token: &str,
    path: &str,
    body: impl Into<reqwest::Body>,
    content_type: Option<&str>,
    encoding: Option<&str>,
) -> reqwest::Response {
    let mut request = proxy.openai(Method::POST, path, token, FP).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(encoding) = encoding {
        request = request.header("content-encoding", encoding);
    }
    request.send().await.unwrap()
}

/// `POST /openai/{path}` of a JSON body.
async fn post_json(proxy: &Proxy, token: &str, path: &str, body: &[u8]) -> reqwest::Response {
    post(
        proxy,
        token,
        path,
        body.to_vec(),
        Some("application/json"),
        None,
    )
    .await
}

/// Asserts a Perishable error: status and `error.code`.
async fn expect_error(response: reqwest::Response, status: u16, code: &str, what: &str) {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
    assert_eq!(
        (got, body["error"]["code"].as_str().unwrap_or_default()),
        (status, code),
        "{what}: {text}"
    );
}

/// A chat completion body (compact JSON) with `extra` members merged in.
fn chat(extra: Value) -> Vec<u8> {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "alpha beta gamma delta epsilon"}],
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    serde_json::to_vec(&body).unwrap()
}

/// A call's reservation: `ceiling` per choice plus the prompt, one token per 4 bytes.
fn reservation(body: &[u8], ceiling: u64, choices: u64) -> u64 {
    (body.len() as u64).div_ceil(4) + ceiling * choices
}

/// `text` in UTF-16LE, with a byte order mark when `bom`.
fn utf16le(text: &str, bom: bool) -> Vec<u8> {
    let mut out = if bom { vec![0xFF, 0xFE] } else { Vec::new() };
    out.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `arrays` nested arrays: as the value of a top-level member, `arrays + 1` levels deep
/// counting the top-level object.
fn nested(arrays: usize) -> String {
    format!("{}{}", "[".repeat(arrays), "]".repeat(arrays))
}

// ---------------------------------------------------------------------------------------------
// Once the budget is spent, no body gets through by being unreadable.
// ---------------------------------------------------------------------------------------------

/// A body the proxy cannot meter, how it is sent, and the refusal it gets.
struct Refused {
    what: &'static str,
    body: Vec<u8>,
    content_type: &'static str,
    encoding: Option<&'static str>,
    status: u16,
    code: &'static str,
}

/// Bodies that once went through unreserved because the budget's parse gave up on them,
/// while an upstream read them anyway.
fn unmeterable_bodies() -> Vec<Refused> {
    let valid = String::from_utf8(chat(json!({"max_tokens": 20}))).unwrap();
    // `valid` with one more member, `"x": raw`.
    let member = |raw: &str| format!("{},\"x\":{raw}}}", valid.trim_end_matches('}')).into_bytes();
    let json = "application/json";
    let invalid_json = |what, body| Refused {
        what,
        body,
        content_type: json,
        encoding: None,
        status: 400,
        code: "invalid_json",
    };
    let unsupported = |what, body, content_type, encoding| Refused {
        what,
        body,
        content_type,
        encoding,
        status: 415,
        code: "unsupported_media_type",
    };
    vec![
        invalid_json(
            "a lone surrogate",
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \ud800"}],"max_tokens":20}"#
                .to_vec(),
        ),
        invalid_json(
            "a lone low surrogate",
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\udc00 hi"}],"max_tokens":20}"#
                .to_vec(),
        ),
        invalid_json("a number out of range", member("1e400")),
        invalid_json("a negative number out of range", member("-1e400")),
        invalid_json("65 levels of nesting", member(&nested(64))),
        invalid_json(
            "a UTF-8 byte order mark",
            [b"\xEF\xBB\xBF".as_slice(), valid.as_bytes()].concat(),
        ),
        invalid_json("UTF-16LE", utf16le(&valid, false)),
        invalid_json("UTF-16LE with its byte order mark", utf16le(&valid, true)),
        invalid_json(
            "a byte that is not UTF-8",
            b"{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}],\"max_tokens\":20}"
                .to_vec(),
        ),
        invalid_json(
            "a duplicate top-level key",
            br#"{"model":"gpt-4o-mini","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"max_tokens":100000}"#
                .to_vec(),
        ),
        unsupported(
            "UTF-16LE, declared",
            utf16le(&valid, false),
            "application/json; charset=utf-16le",
            None,
        ),
        unsupported("gzip", gzip(valid.as_bytes()), json, Some("gzip")),
        unsupported("identity, encoded", valid.clone().into_bytes(), json, Some("identity")),
        unsupported("text/plain", valid.clone().into_bytes(), "text/plain", None),
    ]
}

/// The budget fits one call (R + 5, and a call really uses 5 + 5 = 10): once it is spent, a
/// metered call gets `429 budget_exhausted`. Each unmeterable body then gets its 400 or 415,
/// never a 200, and never reaches the upstream. Bodies just inside the parser's limits are
/// metered (`429`), so the refusals above are the parser's, not the budget's. Listing models
/// reserves nothing and still passes.
async fn unmeterable_bodies_are_refused_after_a_429(store_url: Option<String>) {
    let valid = chat(json!({"max_tokens": 20}));
    let capacity = reservation(&valid, 20, 1) + 5;
    let proxy = start(
        store_url.as_deref(),
        MockOptions::new().stream_deltas(5),
        |c| c.budget_tokens_per_window(capacity),
    )
    .await;
    let token = proxy.mint(FP).await.token;

    let first = post_json(&proxy, &token, "chat/completions", &valid).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let spent = post_json(&proxy, &token, "chat/completions", &valid).await;
    expect_error(spent, 429, "budget_exhausted", "the budget is spent").await;
    assert_eq!(proxy.mock.requests().len(), 1);

    for refused in unmeterable_bodies() {
        let response = post(
            &proxy,
            &token,
            "chat/completions",
            refused.body,
            Some(refused.content_type),
            refused.encoding,
        )
        .await;
        expect_error(response, refused.status, refused.code, refused.what).await;
        assert_eq!(
            proxy.mock.requests().len(),
            1,
            "{}: reached the upstream",
            refused.what
        );
    }

    let valid_text = String::from_utf8(valid).unwrap();
    let member = |raw: &str| format!("{},\"x\":{raw}}}", valid_text.trim_end_matches('}'));
    for (what, body) in [
        ("64 levels of nesting", member(&nested(63))),
        ("a surrogate pair", member(r#""\ud83d\ude00""#)),
        ("a large number in range", member("1e300")),
        ("a long integer", member("12345678901234567890123")),
    ] {
        let response = post_json(&proxy, &token, "chat/completions", body.as_bytes()).await;
        expect_error(response, 429, "budget_exhausted", what).await;
    }
    assert_eq!(proxy.mock.requests().len(), 1);

    let models = proxy
        .openai(Method::GET, "models", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200, "listing models reserves nothing");
    assert_eq!(proxy.mock.requests().len(), 2);
}

on_both_stores!(
    unmeterable_bodies_are_refused_after_a_429_memory,
    unmeterable_bodies_are_refused_after_a_429_redis,
    |url| unmeterable_bodies_are_refused_after_a_429(url)
);

// ---------------------------------------------------------------------------------------------
// Many choices: reserved for every one of them.
// ---------------------------------------------------------------------------------------------

/// 40 streams at once, each asking for `n = 128` choices of at most 16 tokens: each reserves
/// R = 128 × 16 + ceil(body/4), against a budget of 3R + 100. The mock streams slowly (128 × 3
/// events, 20 ms apart), so no stream settles while the others are admitted: exactly three
/// pass, 37 get `429 budget_exhausted`, and only three reach the upstream. Were `n` left out
/// of the reservation, all 40 would pass (40 × (16 + ceil(body/4)) is under the budget).
async fn many_choices_are_reserved_for_each(store_url: Option<String>) {
    const N: u64 = 128;
    const CEILING: u64 = 16;
    let body = chat(json!({"stream": true, "n": N, "max_tokens": CEILING}));
    let r = reservation(&body, CEILING, N);
    let capacity = 3 * r + 100;
    assert!(40 * reservation(&body, CEILING, 1) < capacity);
    let proxy = start(
        store_url.as_deref(),
        MockOptions::new()
            .stream_deltas(1)
            .chunk_interval(Duration::from_millis(20)),
        |c| c.budget_tokens_per_window(capacity),
    )
    .await;
    let token = proxy.mint(FP).await.token;

    // The responses are held (not read) until every call has its answer.
    let responses = futures_util::future::join_all(
        (0..40).map(|_| post_json(&proxy, &token, "chat/completions", &body)),
    )
    .await;
    let mut admitted = Vec::new();
    let mut refused = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => admitted.push(response),
            429 => {
                refused += 1;
                expect_error(response, 429, "budget_exhausted", "over the budget").await;
            }
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!((admitted.len(), refused), (3, 37));
    let requests = proxy.mock.requests();
    assert_eq!(
        requests.len(),
        3,
        "only admitted streams reach the upstream"
    );
    for request in &requests {
        assert_eq!(request.body_json().unwrap()["n"], N);
    }
    drop(admitted);
}

on_both_stores!(
    many_choices_are_reserved_for_each_memory,
    many_choices_are_reserved_for_each_redis,
    |url| many_choices_are_reserved_for_each(url)
);

// ---------------------------------------------------------------------------------------------
// Members of a type or spelling the proxy cannot meter.
// ---------------------------------------------------------------------------------------------

/// Sends each `(path, body)` and expects `400 invalid_parameter`; nothing reaches the upstream.
async fn expect_invalid_parameters(cases: &[(&str, &str)]) {
    let proxy = start(None, MockOptions::new(), |c| {
        c.budget_tokens_per_window(1_000_000)
    })
    .await;
    let token = proxy.mint(FP).await.token;
    for (path, body) in cases {
        let response = post_json(&proxy, &token, path, body.as_bytes()).await;
        expect_error(response, 400, "invalid_parameter", body).await;
    }
    assert!(
        proxy.mock.requests().is_empty(),
        "{:?}",
        proxy.mock.requests()
    );
}

/// A lax upstream reads `100000.0`, `"100000"` or `1e5` as 100000, and a negative ceiling as
/// no ceiling: a ceiling must be an integer literal, `stream` a boolean, `n` and `best_of`
/// integers of at least 1.
#[tokio::test]
async fn members_of_the_wrong_type_are_invalid_parameters() {
    expect_invalid_parameters(&[
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":100000.0}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":"100000"}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":-1}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":1e5}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":true}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":18446744073709551616}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_completion_tokens":"5"}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","max_output_tokens":-5}"#,
        ),
        (
            "completions",
            r#"{"model":"gpt-4o-mini","max_tokens":[100]}"#,
        ),
        (
            "responses",
            r#"{"model":"gpt-4o-mini","max_output_tokens":1.5}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","stream":"true"}"#,
        ),
        ("chat/completions", r#"{"model":"gpt-4o-mini","stream":1}"#),
        ("chat/completions", r#"{"model":"gpt-4o-mini","n":0}"#),
        ("chat/completions", r#"{"model":"gpt-4o-mini","n":"4"}"#),
        ("completions", r#"{"model":"gpt-4o-mini","best_of":2.0}"#),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":"yes"}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":"no"}}"#,
        ),
        ("chat/completions", r#"{"model":["gpt-4o-mini"]}"#),
    ])
    .await;
}

/// Go's `encoding/json` (Ollama, among others) matches keys case-insensitively: a key that
/// folds to a metered member is refused, however it is spelt or escaped.
#[tokio::test]
async fn keys_differing_only_in_case_are_invalid_parameters() {
    expect_invalid_parameters(&[
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","Stream":true}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","\u0053tream":true}"#,
        ),
        (
            "chat/completions",
            "{\"model\":\"gpt-4o-mini\",\"\u{17f}tream\":true}",
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","MAX_TOKENS":100000}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","Max_Completion_Tokens":100000}"#,
        ),
        (
            "responses",
            r#"{"model":"gpt-4o-mini","Max_Output_Tokens":100000}"#,
        ),
        ("chat/completions", r#"{"model":"gpt-4o-mini","N":128}"#),
        ("completions", r#"{"model":"gpt-4o-mini","Best_Of":20}"#),
        ("chat/completions", r#"{"Model":"gpt-4o-mini"}"#),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"Stream_Options":{"include_usage":false}}"#,
        ),
        (
            "chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"Include_Usage":false}}"#,
        ),
    ])
    .await;
}

/// `null` is absent, and a ceiling spelt as an integer is fine: these pass.
#[tokio::test]
async fn integer_ceilings_and_nulls_pass() {
    let proxy = start(None, MockOptions::new(), |c| {
        c.budget_tokens_per_window(1_000_000)
    })
    .await;
    let token = proxy.mint(FP).await.token;
    for extra in [
        json!({"max_tokens": 100}),
        json!({"max_tokens": null, "n": null, "stream": null, "stream_options": null}),
        json!({"max_completion_tokens": 0, "n": 2}),
    ] {
        let response = post_json(&proxy, &token, "chat/completions", &chat(extra.clone())).await;
        assert_eq!(response.status(), 200, "{extra}");
        response.bytes().await.unwrap();
    }
    assert_eq!(proxy.mock.requests().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Embeddings and moderations reserve their prompt.
// ---------------------------------------------------------------------------------------------

/// A budget of 1000. An input estimated over the whole budget is refused at once. One that
/// fits (about 910 tokens estimated, 514 words really used) passes once; the same again is
/// refused, since what is left cannot cover its prompt. A moderation reports no usage, so it
/// keeps its whole reservation. Were these endpoints free, every call would pass.
async fn prompt_only_endpoint_reserves_its_prompt(path: &str, model: &str) {
    const CAPACITY: u64 = 1_000;
    let body = |words: usize| {
        serde_json::to_vec(&json!({"model": model, "input": "abcdef ".repeat(words)})).unwrap()
    };
    let proxy = start(None, MockOptions::new(), |c| {
        c.budget_tokens_per_window(CAPACITY)
    })
    .await;
    let token = proxy.mint(FP).await.token;

    let huge = body(600);
    assert!(reservation(&huge, 0, 1) > CAPACITY);
    let response = post_json(&proxy, &token, path, &huge).await;
    expect_error(response, 429, "budget_exhausted", "over the whole budget").await;
    assert!(proxy.mock.requests().is_empty());

    let large = body(514);
    let r = reservation(&large, 0, 1);
    assert!(r <= CAPACITY && r > CAPACITY / 2, "{r}");
    let first = post_json(&proxy, &token, path, &large).await;
    assert_eq!(first.status(), 200, "{path}");
    first.bytes().await.unwrap();
    let again = post_json(&proxy, &token, path, &large).await;
    expect_error(
        again,
        429,
        "budget_exhausted",
        "what is left cannot cover it",
    )
    .await;
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn embeddings_reserve_their_prompt() {
    prompt_only_endpoint_reserves_its_prompt("embeddings", "text-embedding-3-small").await;
}

#[tokio::test]
async fn moderations_reserve_their_prompt() {
    prompt_only_endpoint_reserves_its_prompt("moderations", "omni-moderation-latest").await;
}

// ---------------------------------------------------------------------------------------------
// An escaped key is the key.
// ---------------------------------------------------------------------------------------------

/// `"str\u0065am": true` is `"stream": true` to every JSON parser, the mock's included: it
/// streams, so with `max_concurrent_streams = 1` and the first such call held open, the
/// second gets `429 rate_limited` and never leaves. The first got `include_usage` added.
#[tokio::test]
async fn an_escaped_stream_key_is_seen_as_streaming() {
    let proxy = start(
        None,
        MockOptions::new()
            .stream_deltas(50)
            .chunk_interval(Duration::from_millis(100)),
        |c| c.budget_max_concurrent_streams(1),
    )
    .await;
    let token = proxy.mint(FP).await.token;
    let body = br#"{"model":"gpt-4o-mini","str\u0065am":true,"messages":[{"role":"user","content":"hi"}]}"#;

    let mut first = post_json(&proxy, &token, "chat/completions", body).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let chunk = first.chunk().await.unwrap().unwrap();
    assert!(chunk.starts_with(b"data: "), "{chunk:?}");

    let second = post_json(&proxy, &token, "chat/completions", body).await;
    expect_error(second, 429, "rate_limited", "a second stream").await;
    let requests = proxy.mock.requests();
    assert_eq!(requests.len(), 1, "the refused stream never left");
    let mut expected = body[..body.len() - 1].to_vec();
    expected.extend_from_slice(br#","stream_options":{"include_usage":true}}"#);
    assert_eq!(
        String::from_utf8_lossy(&requests[0].body),
        String::from_utf8_lossy(&expected)
    );
    drop(first);
}

// ---------------------------------------------------------------------------------------------
// Edits in place.
// ---------------------------------------------------------------------------------------------

/// A body with a Structured Outputs schema whose properties are not in alphabetical order, an
/// integer no `f64` holds, escapes, odd whitespace and `"stream": true` last, under a cap of
/// 64: the upstream gets exactly the client's bytes, with the ceiling's value replaced (or
/// `max_completion_tokens` added) and `stream_options` added after the last member.
#[tokio::test]
async fn edits_preserve_every_other_byte() {
    let proxy = start(None, MockOptions::new().stream_deltas(3), |c| {
        c.budget_max_completion_tokens(64)
            .budget_tokens_per_window(1_000_000)
    })
    .await;
    let token = proxy.mint(FP).await.token;

    let head = "{ \"model\" :\t\"gpt-4o-mini\",\r\n  \"messages\" : [ {\"role\":\"user\",\
        \"content\":\"caf\\u00e9 \\\"quoted\\\" \\\\ \\/ \\t\\ud83d\\ude00 na\u{ef}ve\"} ],\n  \
        \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"point\", \
        \"strict\": true, \"schema\": {\"type\": \"object\", \"properties\": {\"zeta\": \
        {\"type\": \"number\"}, \"alpha\": {\"type\": \"string\"}, \"mid\": {\"type\": \
        \"integer\", \"minimum\": -0.0e-0}}, \"required\": [\"zeta\", \"alpha\", \"mid\"], \
        \"additionalProperties\": false}}},\n  \"seed\" : 12345678901234567890123 ,\n  \
        \"temperature\":1.0E0,\n";
    let stream_last = "  \"stream\"  :  true";
    let tail = "\n\t}  \n";
    let include_usage = ",\"stream_options\":{\"include_usage\":true}";

    // A ceiling above the cap: its value is replaced, in place.
    let sent = format!("{head}  \"max_tokens\" :  100000 ,\n{stream_last}{tail}");
    let expected = format!("{head}  \"max_tokens\" :  64 ,\n{stream_last}{include_usage}{tail}");
    // No ceiling: the cap's member is added, then `stream_options`.
    let sent_bare = format!("{head}{stream_last}{tail}");
    let expected_bare =
        format!("{head}{stream_last},\"max_completion_tokens\":64{include_usage}{tail}");
    // A ceiling under the cap, usage asked for: nothing to edit.
    let sent_kept = format!(
        "{head}  \"max_completion_tokens\":12,\"stream_options\" : {{ \"include_usage\" : true }},\n\
         {stream_last}{tail}"
    );

    for (sent, expected) in [
        (&sent, &expected),
        (&sent_bare, &expected_bare),
        (&sent_kept, &sent_kept),
    ] {
        let before = proxy.mock.requests().len();
        let response = post_json(&proxy, &token, "chat/completions", sent.as_bytes()).await;
        assert_eq!(response.status(), 200, "{sent}");
        response.bytes().await.unwrap();
        let requests = proxy.mock.requests();
        assert_eq!(requests.len(), before + 1);
        let received = &requests.last().unwrap().body;
        assert_eq!(
            String::from_utf8(received.to_vec()).unwrap(),
            *expected,
            "the upstream's bytes"
        );
        assert_eq!(
            requests.last().unwrap().header("content-length"),
            Some(expected.len().to_string().as_str())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Headers upstream by allow-list.
// ---------------------------------------------------------------------------------------------

/// What a client may try to slip upstream: credentials, billing, the client's identity.
const FORBIDDEN: [(&str, &str); 12] = [
    ("openai-organization", "org-client"),
    ("openai-project", "proj_client"),
    ("forwarded", "for=198.51.100.1"),
    ("x-forwarded-for", "198.51.100.1"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "http"),
    ("x-real-ip", "198.51.100.1"),
    ("api-key", "sk-client-azure"),
    ("x-api-key", "sk-client-anthropic"),
    ("cookie", "session=client"),
    ("dpop", "not-a-proof"),
    ("x-other", "not listed"),
];

/// What the official SDKs send that an upstream may use.
const ALLOWED: [(&str, &str); 5] = [
    ("accept", "application/json"),
    ("openai-beta", "assistants=v2"),
    ("idempotency-key", "stainless-node-retry-1"),
    ("x-stainless-lang", "js"),
    ("x-stainless-retry-count", "0"),
];

/// Sends a metered call with every forbidden header, the allowed ones, `X-Trace-Id` and
/// `Accept-Encoding: gzip, deflate`; returns the headers the upstream received.
async fn upstream_headers(proxy: &Proxy) -> http::HeaderMap {
    let token = proxy.mint(FP).await.token;
    let mut request = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, deflate")
        .header("x-trace-id", "trace-1")
        .body(chat(json!({"max_tokens": 5})));
    for (name, value) in FORBIDDEN.iter().chain(&ALLOWED) {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    response.bytes().await.unwrap();
    let requests = proxy.mock.requests();
    assert_eq!(requests.len(), 1);
    requests[0].headers.clone()
}

fn names(headers: &http::HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = headers.keys().map(http::HeaderName::as_str).collect();
    names.sort_unstable();
    names
}

/// Only the allow-list passes; the server's key, and `Accept-Encoding: identity` whatever
/// the client accepts.
#[tokio::test]
async fn only_allowed_headers_reach_the_upstream() {
    let proxy = start(None, MockOptions::new(), |c| {
        c.budget_tokens_per_window(1_000_000)
    })
    .await;
    let headers = upstream_headers(&proxy).await;
    assert_eq!(
        names(&headers),
        [
            "accept",
            "accept-encoding",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "idempotency-key",
            "openai-beta",
            "user-agent",
            "x-stainless-lang",
            "x-stainless-retry-count",
        ]
    );
    for (name, value) in ALLOWED {
        assert_eq!(headers[name], value, "{name}");
    }
    assert_eq!(headers["user-agent"], UA);
    assert_eq!(headers["content-type"], "application/json");
    let authorization: Vec<_> = headers.get_all("authorization").iter().collect();
    assert_eq!(authorization, [format!("Bearer {SERVER_KEY}").as_str()]);
    let accept_encoding: Vec<_> = headers.get_all("accept-encoding").iter().collect();
    assert_eq!(accept_encoding, ["identity"]);
}

/// `upstream.forward_headers` adds one name and nothing else; a static `OpenAI-Project`
/// replaces the client's (one value, the server's).
#[tokio::test]
async fn forward_headers_and_static_headers() {
    let proxy = start(None, MockOptions::new(), |c| {
        c.budget_tokens_per_window(1_000_000)
            .upstream_forward_headers(["x-trace-id"])
            .upstream_header("OpenAI-Project", "proj_server")
    })
    .await;
    let headers = upstream_headers(&proxy).await;
    assert_eq!(headers["x-trace-id"], "trace-1");
    let project: Vec<_> = headers.get_all("openai-project").iter().collect();
    assert_eq!(project, ["proj_server"]);
    for (name, _) in FORBIDDEN {
        if name != "openai-project" {
            assert!(!headers.contains_key(name), "{name} reached the upstream");
        }
    }
    assert!(!headers.contains_key("x-perishable-fingerprint"));
    assert_eq!(headers["accept-encoding"], "identity");
}

/// The `Access-Control-Allow-Headers` of a preflight from an allowed origin asking for
/// `requested`.
async fn allowed_by_preflight(proxy: &Proxy, requested: &str) -> Vec<String> {
    let response = proxy
        .http
        .request(Method::OPTIONS, proxy.url("/openai/chat/completions"))
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", requested)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
    response
        .headers()
        .get_all("access-control-allow-headers")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A preflight allows what is forwarded (and `upstream.forward_headers`), never the billing
/// headers a client may not choose.
#[tokio::test]
async fn preflight_allows_forwarded_headers_only() {
    for forward in [false, true] {
        let proxy = start(None, MockOptions::new(), |c| {
            let c = c.cors_allowed_origins([APP]);
            if forward {
                c.upstream_forward_headers(["x-trace-id"])
            } else {
                c
            }
        })
        .await;
        for requested in [
            "openai-organization",
            "openai-project",
            "content-type,openai-organization",
        ] {
            let allowed = allowed_by_preflight(&proxy, requested).await;
            assert!(
                !allowed.contains(&"openai-organization".to_owned())
                    && !allowed.contains(&"openai-project".to_owned()),
                "{requested}: {allowed:?}"
            );
        }
        let allowed = allowed_by_preflight(&proxy, "x-stainless-lang,content-type").await;
        assert!(
            allowed.contains(&"x-stainless-lang".to_owned()),
            "{allowed:?}"
        );
        let allowed = allowed_by_preflight(&proxy, "x-trace-id").await;
        assert_eq!(
            allowed.contains(&"x-trace-id".to_owned()),
            forward,
            "{allowed:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The body deadline.
// ---------------------------------------------------------------------------------------------

/// Sends `head` (a request head declaring `Content-Length: 100`) over a raw socket, then one
/// byte every 200 ms; returns the status and JSON body of the answer.
async fn trickle(addr: SocketAddr, head: String) -> (u16, Value) {
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickler = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b" ").await.is_err() {
                break;
            }
        }
        writer
    });

    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let (status, body) = loop {
        let n = reader.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed without an answer");
        received.extend_from_slice(&buf[..n]);
        let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
        let status: u16 = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .expect("a Content-Length")
            .trim()
            .parse()
            .unwrap();
        if received.len() >= end + 4 + length {
            break (status, received[end + 4..end + 4 + length].to_vec());
        }
    };
    trickler.abort();
    (status, serde_json::from_slice(&body).unwrap())
}

/// A client that sends its headers, then its body a byte every 200 ms, gets
/// `408 body_timeout` once `server.body_timeout_ms` (500) has passed, on a proxied call and on
/// `POST /session`; the proxied call never reaches the upstream.
#[tokio::test]
async fn a_trickled_body_times_out() {
    let proxy = start(None, MockOptions::new(), |c| {
        c.server_body_timeout_ms(500)
            .budget_tokens_per_window(1_000_000)
    })
    .await;
    let token = proxy.mint(FP).await.token;
    let proxied = format!(
        "POST /openai/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         X-Perishable-Fingerprint: {FP}\r\nUser-Agent: {UA}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        proxy.addr
    );
    let mint = format!(
        "POST /session HTTP/1.1\r\nHost: {}\r\nUser-Agent: {UA}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        proxy.addr
    );
    for (what, head) in [("a proxied call", proxied), ("POST /session", mint)] {
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(10), trickle(proxy.addr, head))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"));
        assert_eq!(status, 408, "{what}: {body}");
        assert_eq!(body["error"]["code"], "body_timeout", "{what}: {body}");
    }
    assert!(proxy.mock.requests().is_empty());
}
