//! Smoke test: mint a session and complete a chat through the proxy.
#![allow(clippy::unwrap_used)]
mod common;
use common::*;

#[tokio::test]
async fn mint_and_complete() {
    let proxy = Proxy::start().await;
    let session = proxy.mint("device-smoke-1").await;
    assert_eq!(session.token_type, "Bearer");
    let response = proxy
        .openai(
            reqwest::Method::POST,
            "chat/completions",
            &session.token,
            "device-smoke-1",
        )
        .json(
            &serde_json::json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("set-cookie").is_none());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    let seen = proxy.mock.requests();
    let last = seen.last().unwrap();
    assert_eq!(
        last.headers["authorization"],
        format!("Bearer {SERVER_KEY}")
    );
}
