//! `budget.include_usage` never changes what a client receives: a stream through the proxy,
//! which asks the upstream for usage and hides it, is byte for byte the stream the upstream
//! sends a client that did not ask; a client that asked gets the usage chunk; with the option
//! off nothing is injected; and events still arrive one by one.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use perishable_mock::{MockOptions, MockUpstream};
use reqwest::Method;
use serde_json::{Value, json};

const FP: &str = "device-usage-bytes";
/// Deltas of every mock answer.
const DELTAS: usize = 8;

/// A deterministic mock (fixed ids and times: two identical requests get identical bytes).
fn mock_options() -> MockOptions {
    MockOptions::new()
        .deterministic(true)
        .stream_deltas(DELTAS)
        .chunk_interval(Duration::from_millis(5))
}

fn chat_stream() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "tell me about bytes on the wire"},
        ],
    })
}

fn completion_stream() -> Value {
    json!({"model": "gpt-3.5-turbo-instruct", "stream": true, "prompt": "say it once"})
}

/// Every chunk of a response body, as `reqwest` hands them over.
async fn chunks(mut response: reqwest::Response) -> Vec<Bytes> {
    assert_eq!(response.status(), 200);
    let mut chunks = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        chunks.push(chunk);
    }
    chunks
}

/// `body` sent straight to the mock, with the server's key.
async fn direct(mock: &MockUpstream, path: &str, body: &Value) -> Vec<Bytes> {
    let response = client()
        .post(format!("{}/{path}", mock.base_url()))
        .bearer_auth(SERVER_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    chunks(response).await
}

/// `body` sent through the proxy.
async fn proxied(proxy: &Proxy, token: &str, path: &str, body: &Value) -> Vec<Bytes> {
    let response = proxy
        .openai(Method::POST, path, token, FP)
        .json(body)
        .send()
        .await
        .unwrap();
    chunks(response).await
}

fn concat(chunks: &[Bytes]) -> String {
    String::from_utf8(chunks.concat()).unwrap()
}

/// The events of a stream.
fn events(text: &str) -> Vec<&str> {
    text.split_inclusive("\n\n").collect()
}

/// Chunks that hold exactly one complete event.
fn single_event_chunks(chunks: &[Bytes]) -> usize {
    chunks
        .iter()
        .filter(|c| {
            let text = std::str::from_utf8(c).unwrap();
            text.ends_with("\n\n") && text.matches("\n\n").count() == 1
        })
        .count()
}

/// The body the mock received last (the proxy's request, sent after the direct one).
fn last_received(mock: &MockUpstream) -> perishable_mock::RecordedRequest {
    mock.requests().last().unwrap().clone()
}

#[tokio::test]
async fn hidden_usage_leaves_the_stream_byte_identical() {
    // A budget makes the calls metered: the proxy then asks streams for their usage.
    let proxy = Proxy::start_with(mock_options(), |c| c.budget_tokens_per_window(1_000_000)).await;
    let token = proxy.mint(FP).await.token;

    for (path, body, expected_events) in [
        // role + 8 deltas + stop + [DONE]
        ("chat/completions", chat_stream(), DELTAS + 3),
        // 8 deltas + stop + [DONE]
        ("completions", completion_stream(), DELTAS + 2),
    ] {
        let plain = direct(&proxy.mock, path, &body).await;
        let asked_directly = last_received(&proxy.mock).body_json().unwrap();
        assert!(asked_directly.get("stream_options").is_none());

        let through = proxied(&proxy, &token, path, &body).await;
        // Not vacuous: the proxy did ask the upstream for usage...
        let asked = last_received(&proxy.mock).body_json().unwrap();
        assert_eq!(asked["stream_options"]["include_usage"], true, "{asked}");
        // ... which then sent a usage chunk and `"usage":null` members.
        let mut with_usage = body.clone();
        with_usage["stream_options"] = json!({"include_usage": true});
        let upstream_sent = concat(&direct(&proxy.mock, path, &with_usage).await);
        assert!(upstream_sent.contains("\"usage\":null"), "{upstream_sent}");
        assert!(upstream_sent.contains("\"choices\":[]"), "{upstream_sent}");

        // The client gets exactly the bytes it gets without include_usage.
        let (plain_text, through_text) = (concat(&plain), concat(&through));
        assert_eq!(through_text, plain_text, "{path}: the bytes differ");
        assert!(!through_text.contains("usage"), "{through_text}");
        assert_eq!(
            events(&through_text).len(),
            expected_events,
            "{through_text}"
        );

        // Event by event, as the upstream sent them: no merging.
        assert_eq!(single_event_chunks(&plain), expected_events, "{plain:?}");
        assert_eq!(
            single_event_chunks(&through),
            expected_events,
            "{path}: events were merged or split: {through:?}"
        );
    }
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_it() {
    let proxy = Proxy::start_with(mock_options(), |c| c).await;
    let token = proxy.mint(FP).await.token;
    let mut body = chat_stream();
    body["stream_options"] = json!({"include_usage": true});

    let upstream = direct(&proxy.mock, "chat/completions", &body).await;
    let through = proxied(&proxy, &token, "chat/completions", &body).await;
    // The proxy sent the client's body as it was.
    assert_eq!(
        last_received(&proxy.mock).body,
        serde_json::to_vec(&body).unwrap()
    );
    let text = concat(&through);
    assert_eq!(text, concat(&upstream));

    // The usage chunk: 3 + 6 prompt words, 8 deltas.
    let usage: Vec<Value> = events(&text)
        .iter()
        .filter_map(|e| e.trim_end().strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|chunk| chunk["choices"] == json!([]))
        .collect();
    assert_eq!(usage.len(), 1, "{text}");
    assert_eq!(
        usage[0]["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17})
    );
    assert_eq!(text.matches("\"usage\":null").count(), DELTAS + 2);
    assert_eq!(single_event_chunks(&through), DELTAS + 4);
}

#[tokio::test]
async fn include_usage_off_injects_nothing() {
    let proxy = Proxy::start_with(mock_options(), |c| c.budget_include_usage(false)).await;
    let token = proxy.mint(FP).await.token;

    for (path, body) in [
        ("chat/completions", chat_stream()),
        ("completions", completion_stream()),
    ] {
        let plain = direct(&proxy.mock, path, &body).await;
        let through = proxied(&proxy, &token, path, &body).await;
        let received = last_received(&proxy.mock);
        assert_eq!(
            received.body,
            serde_json::to_vec(&body).unwrap(),
            "{path}: the body was rewritten"
        );
        assert_eq!(concat(&through), concat(&plain));
    }
}
