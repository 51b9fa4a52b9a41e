//! End to end with the official `openai` Python package: `tests/python/sdk_client.py` mints a
//! session over HTTP (challenge, proof of work, entropy) and then uses `openai.OpenAI` through
//! the proxy: a streamed chat completion, embeddings, the models list and two refusals.
use std::time::Duration;

use crate::support::*;
use perishable_mock::MockOptions;

/// The prompt the script sends; the mock echoes it back.
const PROMPT: &str = "Hello from the official OpenAI Python SDK";
/// The User-Agent the script sets on the SDK and on its own session requests.
const SDK_UA: &str = "perishable-sdk-test/1.0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    perishable_missing_openai,
    ignore = "needs the openai Python package (python3 -m pip install openai)"
)]
async fn official_python_sdk_through_the_proxy() {
    let proxy = Proxy::start_with(
        MockOptions::new().chunk_interval(Duration::from_millis(5)),
        |c| c,
    )
    .await;
    let url = proxy.url("");
    let result = run_sdk_script("sdk_client.py", url, PROMPT).await;
    println!("sdk_client.py: {result}");

    // (a) Streaming: several chunks whose deltas add up to the mock's reply.
    let chunks = result["chunks"].as_u64().unwrap();
    assert!(chunks > 1, "expected several stream chunks, got {chunks}");
    assert_eq!(
        result["content"],
        format!(
            "You said: {PROMPT}. This is the Perishable mock upstream, streaming one word at a time."
        )
    );
    assert_eq!(result["finish_reason"], "stop");

    // (b) Embeddings, decoded from base64 by the SDK: 16 dims, unit length.
    assert_eq!(result["embedding_dims"], 16);
    let norm = result["embedding_norm"].as_f64().unwrap();
    assert!((norm - 1.0).abs() < 1e-3, "embedding norm {norm}");

    // (c) Models.
    let models: Vec<&str> = result["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(models.contains(&"gpt-4o-mini"), "models: {models:?}");

    // (d), (e) Refusals raise the SDK's usual exceptions with the PROTOCOL codes.
    assert_eq!(result["auth_error_status"], 401);
    assert_eq!(result["auth_error_code"], "fingerprint_mismatch");
    assert_eq!(result["path_error_status"], 403);
    assert_eq!(result["path_error_code"], "path_not_allowed");

    // What reached the upstream: the three allowed calls, each with the server's key, the
    // SDK's User-Agent, and no trace of the session token or the fingerprint.
    let token = result["session_token"].as_str().unwrap();
    assert!(!token.is_empty());
    let seen = proxy.mock.requests();
    let paths: Vec<String> = seen
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert_eq!(
        paths,
        [
            "POST /v1/chat/completions",
            "POST /v1/embeddings",
            "GET /v1/models"
        ],
        "requests that reached the upstream"
    );
    for request in &seen {
        let what = format!("{} {}", request.method, request.path_and_query);
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {SERVER_KEY}").as_str()),
            "{what}: upstream Authorization"
        );
        assert_eq!(request.headers.get_all("authorization").iter().count(), 1);
        assert_eq!(request.header("user-agent"), Some(SDK_UA), "{what}");
        assert!(
            request.header("x-perishable-fingerprint").is_none(),
            "{what}: fingerprint header forwarded"
        );
        for (name, value) in &request.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains(token),
                "{what}: the session token reached the upstream in {name}"
            );
        }
        assert!(
            !String::from_utf8_lossy(&request.body).contains(token),
            "{what}: the session token reached the upstream in the body"
        );
    }
    let chat = seen[0].body_json().unwrap();
    assert_eq!(chat["stream"], true);
    assert_eq!(chat["messages"][0]["content"], PROMPT);
}
