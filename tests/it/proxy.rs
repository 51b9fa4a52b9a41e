//! End-to-end tests of `/openai/{path}` forwarding over real 127.0.0.1 sockets: which headers
//! cross the proxy, the path and model allow-lists, the body limit, streaming without
//! buffering, cancellation, and the upstream failure modes (PROTOCOL "Forwarding rules").
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;
use perishable_mock::MockOptions;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const FP: &str = "device-proxy-tests-1";

/// Asserts a Perishable error: status, `error.code` and `error.type`.
async fn expect_error(response: reqwest::Response, status: u16, code: &str, kind: &str) {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// A started proxy and a session on it.
async fn proxy_with(
    options: MockOptions,
    tweak: impl FnOnce(perishable::ConfigBuilder) -> perishable::ConfigBuilder,
) -> (Proxy, String) {
    let proxy = Proxy::start_with(options, tweak).await;
    let token = proxy.mint(FP).await.token;
    (proxy, token)
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

/// Sends a hand-written HTTP/1.1 request (so the path is not normalized by a URL parser) and
/// returns the status and the JSON body.
async fn raw_request(addr: SocketAddr, method: &str, path: &str, token: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {UA}\r\n\
         Authorization: Bearer {token}\r\nX-Perishable-Fingerprint: {FP}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("the proxy did not answer the raw request")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let start = body
        .find('{')
        .unwrap_or_else(|| panic!("no JSON body: {text:?}"));
    let end = body.rfind('}').unwrap();
    (status, serde_json::from_str(&body[start..=end]).unwrap())
}

/// Reads one HTTP request head (up to the blank line) from a raw socket.
async fn read_head(socket: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut byte).await.unwrap();
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&byte[..n]);
    }
}

/// Polls `check` every 20 ms for up to 5 s.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..250 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

#[tokio::test]
async fn client_credentials_are_replaced_and_headers_filtered() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini")).unwrap();
    let response = proxy
        .openai(Method::POST, "chat/completions?foo=bar&x=1", &token, FP)
        .header("content-type", "application/json")
        .header("cookie", "session=browser-cookie")
        .header("dpop", "eyJhbGciOiJFUzI1NiJ9.e30.sig")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .header("x-stainless-lang", "js")
        .header("openai-beta", "assistants=v2")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");

    // Back to the client: upstream headers pass, Set-Cookie does not.
    assert!(headers.get("set-cookie").is_none(), "{headers:?}");
    let request_id = headers["x-request-id"].to_str().unwrap();
    assert!(request_id.starts_with("req_mock_"), "{request_id}");
    assert_eq!(headers["openai-processing-ms"], "1");

    // What the upstream saw.
    let seen = proxy.mock.requests();
    assert_eq!(seen.len(), 1);
    let last = &seen[0];
    assert_eq!(last.method, Method::POST);
    assert_eq!(last.path_and_query, "/v1/chat/completions?foo=bar&x=1");
    assert_eq!(last.body, body, "the body is forwarded byte for byte");
    let auth: Vec<_> = last.headers.get_all("authorization").iter().collect();
    assert_eq!(auth.len(), 1, "{:?}", last.headers);
    assert_eq!(auth[0], format!("Bearer {SERVER_KEY}").as_str());
    for gone in [
        "cookie",
        "dpop",
        "x-perishable-fingerprint",
        "proxy-authorization",
    ] {
        assert!(
            !last.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    for (name, value) in &last.headers {
        let value = value.to_str().unwrap_or_default();
        assert!(
            !value.contains(&token),
            "the session token leaked in {name}"
        );
        assert!(!value.contains(FP), "the fingerprint leaked in {name}");
    }
    assert_eq!(last.header("x-stainless-lang"), Some("js"));
    assert_eq!(last.header("openai-beta"), Some("assistants=v2"));
    assert_eq!(last.header("content-type"), Some("application/json"));
    assert_eq!(last.header("user-agent"), Some(UA));
    // Host is the upstream's, not the proxy's.
    let mock_host = proxy.mock.addr().unwrap().to_string();
    assert_eq!(last.header("host"), Some(mock_host.as_str()));
}

/// A body with a `Content-Encoding` cannot be forwarded as sent (the header is never forwarded,
/// and cannot be listed): `415`, metered call or not, before the upstream; and the mint, which
/// reads its body as it comes, refuses one too.
#[tokio::test]
async fn encoded_bodies_are_refused_metered_or_not() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;
    for encoding in ["gzip", "deflate", "br", "identity"] {
        let response = proxy
            .openai(Method::POST, "chat/completions", &token, FP)
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(chat_body("gpt-4o-mini").to_string())
            .send()
            .await
            .unwrap();
        expect_error(
            response,
            415,
            "unsupported_media_type",
            "invalid_request_error",
        )
        .await;
    }
    assert!(proxy.mock.requests().is_empty());
    // The same call without the header passes: the refusal was the encoding's.
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let body = json!({
        "fingerprint": "device-encoded-mint-1",
        "entropy": human_entropy(),
        "pow": proxy.solved_pow().await,
    });
    let response = proxy
        .http
        .post(proxy.url("/session"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    expect_error(
        response,
        415,
        "unsupported_media_type",
        "invalid_request_error",
    )
    .await;
}

#[tokio::test]
async fn query_string_passes_on_get() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;
    let response = proxy
        .openai(Method::GET, "models?limit=5&order=desc", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = proxy.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(seen[0].path_and_query, "/v1/models?limit=5&order=desc");
}

#[tokio::test]
async fn disallowed_paths_never_reach_the_upstream() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;
    for path in [
        "files",
        "fine_tuning/jobs",
        "batches",
        "organization/users",
        "models/gpt-4o-mini/extra",
        "assistants",
    ] {
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let response = proxy
                .openai(method.clone(), path, &token, FP)
                .json(&json!({"purpose": "fine-tune"}))
                .send()
                .await
                .unwrap();
            expect_error(response, 403, "path_not_allowed", "permission_error").await;
        }
    }
    // Raw paths: nothing normalizes them before the proxy sees them.
    for path in [
        "/openai/models/../files",
        "/openai/models/..",
        "/openai/models/.",
        "/openai/models/%2e%2e",
        "/openai",
        "/openai/",
        "/openai/chat/completions/../../files",
        "/openai/models/%2e%2e/files",
        "/openai/models/%2E%2E/files",
        "/openai/models/..%2Ffiles",
        "/openai/models%2F..%2Ffiles",
        "/openai/./files",
        "/openai//files",
        "/openai/models/..%5Cfiles",
    ] {
        for method in ["GET", "POST"] {
            let (status, body) = raw_request(proxy.addr, method, path, &token).await;
            assert_eq!(status, 403, "{method} {path}: {body}");
            assert_eq!(body["error"]["code"], "path_not_allowed", "{path}: {body}");
            assert_eq!(body["error"]["type"], "permission_error", "{path}: {body}");
        }
    }
    assert!(
        proxy.mock.requests().is_empty(),
        "refused paths reached the upstream: {:?}",
        proxy
            .mock
            .requests()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );
    // The same session and a raw allowed path do pass (so the refusals above are about the path).
    let (status, body) = raw_request(proxy.addr, "GET", "/openai/models", &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(proxy.mock.requests().len(), 1);
}

/// The default list names a method for each path: the same path with an admin-grade method
/// (deleting a fine-tuned model, listing the organization's stored completions) is refused, and
/// an entry without a method lets every method through.
#[tokio::test]
async fn default_paths_pass_only_with_their_method() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;
    for (method, path) in [
        (Method::DELETE, "models/ft:gpt-4o-mini:org:custom"),
        (Method::POST, "models/gpt-4o-mini"),
        (Method::DELETE, "models"),
        (Method::GET, "chat/completions"),
        (Method::DELETE, "chat/completions"),
        (Method::GET, "responses"),
        (Method::PUT, "embeddings"),
    ] {
        let response = proxy
            .openai(method.clone(), path, &token, FP)
            .send()
            .await
            .unwrap();
        expect_error(response, 403, "path_not_allowed", "permission_error").await;
    }
    assert!(proxy.mock.requests().is_empty());
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = proxy
        .openai(Method::GET, "models/gpt-4o-mini", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.mock.requests().len(), 2);

    // Listed without a method: every method passes.
    let (proxy, token) = proxy_with(MockOptions::new(), |c| {
        c.upstream_allowed_paths(["models/*"])
    })
    .await;
    let response = proxy
        .openai(
            Method::DELETE,
            "models/ft:gpt-4o-mini:org:custom",
            &token,
            FP,
        )
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), 403);
    let seen = proxy.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::DELETE);
}

/// A metered call declares its body type once: with two `Content-Type` headers the upstream
/// might read the body by the one the proxy did not check.
#[tokio::test]
async fn a_metered_call_with_two_content_types_is_refused() {
    let (proxy, token) =
        proxy_with(MockOptions::new(), |c| c.budget_tokens_per_window(100_000)).await;
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    for (first, second) in [
        ("application/json", "text/plain"),
        ("text/plain", "application/json"),
        ("application/json", "application/json"),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!(
            "POST /openai/chat/completions HTTP/1.1\r\nHost: {}\r\nUser-Agent: {UA}\r\n\
             Authorization: Bearer {token}\r\nX-Perishable-Fingerprint: {FP}\r\n\
             Content-Type: {first}\r\nContent-Type: {second}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            proxy.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with("HTTP/1.1 415 "),
            "{first}, {second}: {text}"
        );
        assert!(text.contains("unsupported_media_type"), "{text}");
    }
    assert!(proxy.mock.requests().is_empty());
}

#[tokio::test]
async fn model_allow_list() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| {
        c.upstream_allowed_models(["gpt-4o-mini"])
    })
    .await;

    for model in ["gpt-4o", "o1", "GPT-4O-MINI", "gpt-4o-mini "] {
        let response = proxy
            .openai(Method::POST, "chat/completions", &token, FP)
            .json(&chat_body(model))
            .send()
            .await
            .unwrap();
        expect_error(response, 403, "model_not_allowed", "permission_error").await;
    }
    assert!(proxy.mock.requests().is_empty());

    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model"], "gpt-4o-mini");
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn duplicate_model_keys_are_refused() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| {
        c.upstream_allowed_models(["gpt-4o-mini"])
    })
    .await;
    for body in [
        r#"{"model":"gpt-4o","model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    ] {
        let response = proxy
            .openai(Method::POST, "chat/completions", &token, FP)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert!(
            status == 400 || status == 403,
            "a body with two models must be refused, got {status}: {text}"
        );
        let error: Value = serde_json::from_str(&text).unwrap();
        let code = error["error"]["code"].as_str().unwrap();
        assert!(
            ["invalid_json", "model_not_allowed"].contains(&code),
            "{error}"
        );
    }
    assert!(proxy.mock.requests().is_empty());
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    const LIMIT: usize = 1024;
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c.upstream_max_body_bytes(LIMIT)).await;
    let big = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "x".repeat(4 * LIMIT)}],
    });

    // With Content-Length.
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&big)
        .send()
        .await
        .unwrap();
    expect_error(response, 413, "body_too_large", "invalid_request_error").await;

    // Chunked, with no Content-Length: the limit is enforced while reading.
    let bytes = serde_json::to_vec(&big).unwrap();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(256).map(|c| Ok(c.to_vec())).collect();
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    expect_error(response, 413, "body_too_large", "invalid_request_error").await;
    assert!(proxy.mock.requests().is_empty());

    // Just under the limit passes, chunked too.
    let small = serde_json::to_vec(&chat_body("gpt-4o-mini")).unwrap();
    assert!(small.len() < LIMIT);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        small.chunks(16).map(|c| Ok(c.to_vec())).collect();
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.mock.requests().len(), 1);
    assert_eq!(proxy.mock.requests()[0].body, small);
}

#[tokio::test]
async fn default_body_limit_is_one_mib() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;
    let content = |len: usize| json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(len)}]});
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&content(1024 * 1024 + 1))
        .send()
        .await
        .unwrap();
    expect_error(response, 413, "body_too_large", "invalid_request_error").await;
    assert!(proxy.mock.requests().is_empty());
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&content(1000 * 1000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn streamed_events_arrive_one_by_one() {
    let (proxy, token) = proxy_with(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(50))
            .stream_deltas(6),
        |c| c,
    )
    .await;
    let mut body = chat_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let mut response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    assert!(response.headers().get("set-cookie").is_none());

    let mut chunks: Vec<String> = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        if chunks.is_empty() {
            // The first event was passed on while the upstream was still streaming.
            assert_eq!(proxy.mock.active_streams(), 1);
            assert_eq!(proxy.mock.completed_streams(), 0);
        }
        chunks.push(String::from_utf8(chunk.to_vec()).unwrap());
    }

    let whole: String = chunks.concat();
    let events: Vec<&str> = whole.split("\n\n").filter(|e| !e.is_empty()).collect();
    for chunk in &chunks {
        assert!(chunk.starts_with("data: "), "{chunk:?}");
        assert!(chunk.ends_with("\n\n"), "{chunk:?}");
        assert_eq!(chunk.matches("\n\n").count(), 1, "merged events: {chunk:?}");
    }
    assert_eq!(chunks.len(), events.len());
    assert_eq!(chunks.last().unwrap(), "data: [DONE]\n\n");
    let deltas = events
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert_eq!(deltas, 6);
    // role + 6 deltas + finish + [DONE]
    assert!(chunks.len() >= 9, "{chunks:?}");
    assert_eq!(proxy.mock.completed_streams(), 1);
    assert!(eventually(|| proxy.mock.active_streams() == 0).await);
}

#[tokio::test]
async fn dropping_the_client_cancels_the_upstream_stream() {
    let (proxy, token) = proxy_with(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(100))
            .stream_deltas(500),
        |c| c,
    )
    .await;
    let client = client();
    let mut body = chat_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let mut response = client
        .post(proxy.url("/openai/chat/completions"))
        .bearer_auth(&token)
        .header("x-perishable-fingerprint", FP)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(proxy.mock.active_streams(), 1);

    drop(response);
    drop(client);
    assert!(
        eventually(|| proxy.mock.active_streams() == 0).await,
        "the upstream stream is still open after the client went away"
    );
    assert_eq!(proxy.mock.completed_streams(), 0);
}

#[tokio::test]
async fn refused_connection_is_502() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (proxy, token) = proxy_with(MockOptions::new(), |c| {
        c.upstream_base_url(format!("http://{dead}/v1"))
    })
    .await;
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        proxy.openai(Method::GET, "models", &token, FP).send(),
    )
    .await
    .unwrap()
    .unwrap();
    expect_error(response, 502, "upstream_unavailable", "upstream_error").await;
}

#[tokio::test]
async fn silent_upstream_is_504() {
    let (silent, accepted) = silent_upstream().await;
    let (proxy, token) = proxy_with(MockOptions::new(), |c| {
        c.upstream_base_url(format!("http://{silent}/v1"))
            .upstream_first_byte_timeout_ms(300)
    })
    .await;
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        proxy.openai(Method::GET, "models", &token, FP).send(),
    )
    .await
    .expect("the proxy never gave up on a silent upstream")
    .unwrap();
    expect_error(response, 504, "upstream_timeout", "upstream_error").await;
    assert!(accepted.load(Ordering::SeqCst) >= 1);
}

/// An upstream that quotes the server's key back (in a header, an error body, a stream that
/// splits it between two chunks) never shows it to the client: every byte of it is `*`.
#[tokio::test]
async fn an_echoed_key_is_masked() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut byte).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&byte[..n]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let auth = head
                .lines()
                .find_map(|l| l.strip_prefix("authorization: "))
                .unwrap_or_default()
                .to_owned();
            if head.starts_with("GET ") {
                let body =
                    format!(r#"{{"error":{{"message":"Incorrect API key provided: {auth}"}}}}"#);
                let answer = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                     x-echo-auth: {auth}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            } else {
                let event = format!("data: {{\"echo\":\"{auth}\"}}\n\n");
                let (first, second) = event.split_at(event.find(SERVER_KEY).unwrap() + 5);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                socket.write_all(head.as_bytes()).await.unwrap();
                for part in [first, second] {
                    let chunk = format!("{:x}\r\n{part}\r\n", part.len());
                    socket.write_all(chunk.as_bytes()).await.unwrap();
                    socket.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                socket.write_all(b"0\r\n\r\n").await.unwrap();
            }
        }
    });
    let (proxy, token) = proxy_with(MockOptions::new(), |c| {
        c.upstream_base_url(format!("http://{echo}/v1"))
    })
    .await;
    let masked = "*".repeat(SERVER_KEY.len());

    let response = proxy
        .openai(Method::GET, "models", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let header = response.headers()["x-echo-auth"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(header, format!("Bearer {masked}"));
    let body = response.text().await.unwrap();
    assert!(!body.contains(SERVER_KEY), "{body}");
    assert!(body.contains(&format!("Bearer {masked}")), "{body}");

    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert_eq!(body, format!("data: {{\"echo\":\"Bearer {masked}\"}}\n\n"));
}

#[tokio::test]
async fn stalled_stream_ends_cleanly() {
    const EVENT: &str = "data: {\"n\":1}\n\n";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            read_head(&mut socket).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                        cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
            let chunk = format!("{:x}\r\n{EVENT}\r\n", EVENT.len());
            socket.write_all(head.as_bytes()).await.unwrap();
            socket.write_all(chunk.as_bytes()).await.unwrap();
            socket.flush().await.unwrap();
            // Then silence, with the connection held open.
            held.push(socket);
        }
    });
    let (proxy, token) = proxy_with(MockOptions::new(), |c| {
        c.upstream_base_url(format!("http://{stalled}/v1"))
            .upstream_idle_timeout_ms(300)
    })
    .await;
    let mut response = proxy
        .openai(Method::GET, "models", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("the first event never arrived")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], EVENT.as_bytes());
    let end = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("the body never ended after the upstream went silent");
    match end {
        Ok(None) => {}
        other => panic!("expected a clean end of body, got {other:?}"),
    }
}

#[tokio::test]
async fn embeddings_and_models_pass_through() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;

    let response = proxy
        .openai(Method::POST, "embeddings", &token, FP)
        .json(&json!({"model": "text-embedding-3-small", "input": ["hello world", "bye"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 16);

    let response = proxy
        .openai(Method::GET, "models", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "gpt-4o-mini"),
        "{body}"
    );

    let response = proxy
        .openai(Method::GET, "models/gpt-4o-mini", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], "gpt-4o-mini");
    assert_eq!(body["object"], "model");

    let paths: Vec<String> = proxy
        .mock
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert_eq!(
        paths,
        [
            "POST /v1/embeddings",
            "GET /v1/models",
            "GET /v1/models/gpt-4o-mini"
        ]
    );
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let (proxy, token) = proxy_with(MockOptions::new(), |c| c).await;
    let response = proxy
        .openai(Method::GET, "models/no-such-model", &token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().get("set-cookie").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert_eq!(proxy.mock.requests().len(), 1);
}

/// The tower stack of the README mounted with axum's `nest_service`, which strips the mount
/// point: the upstream service forwards what is left of the path.
#[tokio::test]
async fn the_upstream_service_works_under_nest_service() {
    use tower::ServiceBuilder;
    let mock = perishable_mock::MockUpstream::start(MockOptions::new().api_key(SERVER_KEY))
        .await
        .unwrap();
    let perishable =
        perishable::Perishable::new(config(&mock.base_url()).build().unwrap()).unwrap();
    let proxy = ServiceBuilder::new()
        .layer(perishable.verify_layer())
        .layer(perishable.rate_limit_layer())
        .service(perishable.upstream_service());
    let app = axum::Router::new()
        .route_service("/challenge", perishable.session_service())
        .route_service("/session", perishable.session_service())
        .nest_service("/openai", proxy);
    let addr = serve(app).await;
    let proxy = Proxy {
        addr,
        mock,
        http: client(),
    };
    let token = proxy.mint(FP).await.token;
    for path in ["models", "chat/completions"] {
        let request = if path == "models" {
            proxy.openai(Method::GET, path, &token, FP)
        } else {
            proxy.openai(Method::POST, path, &token, FP).json(
                &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
            )
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let paths: Vec<String> = proxy
        .mock
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(paths, ["/v1/models", "/v1/chat/completions"]);
}
