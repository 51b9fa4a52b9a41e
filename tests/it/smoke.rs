//! Smoke test: mint a session and complete a chat through the proxy.
use crate::support::*;

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

/// The configuration file of `docs/protocol.md`, as written there (with a signing secret long
/// enough in place of its `"..."`), loads: every key it names is a key of `Config`.
#[test]
fn the_protocol_configuration_file_loads() {
    let doc = std::fs::read_to_string(crate::support::repo().join("docs/protocol.md")).unwrap();
    let section = doc.split_once("## Configuration").unwrap().1;
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let len = section[start..].find("```").unwrap();
    let toml = section[start..start + len].replace(
        r#"jwt_secret = "...""#,
        r#"jwt_secret = "a-signing-secret-of-at-least-32-bytes""#,
    );
    let config = perishable::Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mint().policies, [["pow", "entropy"]]);
    assert!(!config.realtime().enabled);
    assert_eq!(config.server().body_timeout_ms, 30_000);
}
