//! Tests of the mock OpenAI-compatible upstream (`perishable_mock`).

use std::time::Duration;

use base64::Engine as _;
use perishable_mock::{MockOptions, MockUpstream};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

async fn start(options: MockOptions) -> (MockUpstream, Client) {
    let mock = MockUpstream::start(options).await.unwrap();
    (mock, Client::new())
}

fn url(mock: &MockUpstream, path: &str) -> String {
    format!("{}{path}", mock.base_url())
}

/// Polls `check` every 10 ms for up to 2 s.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

fn assert_openai_error(body: &Value, code: Option<&str>, param: Option<&str>) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["code"], json!(code), "{body}");
    assert_eq!(error["param"], json!(param), "{body}");
}

/// Splits an SSE body into the JSON payloads of its events and whether it ended in [DONE].
fn sse_payloads(body: &str) -> (Vec<Value>, bool) {
    let mut payloads = Vec::new();
    let mut done = false;
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            done = true;
        } else {
            assert!(!done, "event after [DONE]");
            payloads.push(serde_json::from_str(data).unwrap());
        }
    }
    (payloads, done)
}

#[tokio::test]
async fn base_url_and_addr() {
    let idle = MockUpstream::new(MockOptions::new());
    assert_eq!(idle.addr(), None);
    assert_eq!(idle.base_url(), "http://127.0.0.1:0/v1");

    let (mock, _) = start(MockOptions::new()).await;
    let addr = mock.addr().unwrap();
    assert_eq!(
        mock.base_url(),
        format!("http://127.0.0.1:{}/v1", addr.port())
    );
}

#[tokio::test]
async fn chat_completion_non_streaming() {
    let (mock, client) = start(MockOptions::new()).await;
    let response = client
        .post(url(&mock, "/chat/completions"))
        .json(&json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello there world"},
            ],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert!(
        headers["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_mock_")
    );
    assert_eq!(headers["set-cookie"], "__mock_session=1; Path=/; HttpOnly");
    assert_eq!(headers["openai-processing-ms"], "1");

    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["system_fingerprint"], "fp_mock");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["refusal"], Value::Null);
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(
        content,
        "You said: hello there world. This is the Perishable mock upstream, streaming one word at a time."
    );
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], 5);
    assert_eq!(
        usage["completion_tokens"],
        content.split_whitespace().count()
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn chat_completion_content_parts_and_truncation() {
    let (mock, client) = start(MockOptions::new().stream_deltas(3)).await;
    let long = "x".repeat(500);
    let body: Value = client
        .post(url(&mock, "/chat/completions"))
        .json(&json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": null},
                {"role": "user", "content": [
                    {"type": "text", "text": long},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                ]},
            ],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Exactly 3 deltas, cycling through the words of the reply.
    let expected = format!("You said: {}.", "x".repeat(200));
    assert_eq!(body["choices"][0]["message"]["content"], expected);
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["prompt_tokens"], 2);
}

#[tokio::test]
async fn chat_completion_streams_one_event_per_chunk() {
    let (mock, client) = start(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(30))
            .stream_deltas(4),
    )
    .await;
    let mut response = client
        .post(url(&mock, "/chat/completions"))
        .json(&json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert!(response.headers().contains_key("x-request-id"));

    let mut chunks = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        chunks.push(String::from_utf8(chunk.to_vec()).unwrap());
    }
    // role, 4 content deltas, finish, [DONE]
    assert_eq!(chunks.len(), 7, "{chunks:?}");
    for chunk in &chunks {
        assert!(chunk.starts_with("data: "), "{chunk:?}");
        assert!(chunk.ends_with("\n\n"), "{chunk:?}");
        assert_eq!(chunk.matches("\n\n").count(), 1, "{chunk:?}");
    }
    assert_eq!(chunks.last().unwrap(), "data: [DONE]\n\n");

    let (payloads, done) = sse_payloads(&chunks.concat());
    assert!(done);
    assert_eq!(payloads.len(), 6);
    let id = payloads[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-mock-"));
    for payload in &payloads {
        assert_eq!(payload["id"], id);
        assert_eq!(payload["object"], "chat.completion.chunk");
        assert_eq!(payload["model"], "gpt-4o-mini");
        assert_eq!(payload["system_fingerprint"], "fp_mock");
        assert!(payload.get("usage").is_none(), "{payload}");
        assert_eq!(payload["choices"][0]["index"], 0);
    }
    assert_eq!(
        payloads[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let content: String = payloads[1..5]
        .iter()
        .map(|p| {
            assert_eq!(p["choices"][0]["finish_reason"], Value::Null);
            p["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(content, "You said: hi. This");
    assert_eq!(payloads[5]["choices"][0]["delta"], json!({}));
    assert_eq!(payloads[5]["choices"][0]["finish_reason"], "stop");

    assert_eq!(mock.completed_streams(), 1);
    assert!(eventually(|| mock.active_streams() == 0).await);
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk() {
    let (mock, client) = start(MockOptions::new().chunk_interval(Duration::ZERO)).await;
    let request = |include_usage: Option<bool>| {
        let mut body = json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "messages": [{"role": "user", "content": "one two"}],
        });
        if let Some(include) = include_usage {
            body["stream_options"] = json!({ "include_usage": include });
        }
        client
            .post(url(&mock, "/chat/completions"))
            .json(&body)
            .send()
    };

    let text = request(Some(true)).await.unwrap().text().await.unwrap();
    let (payloads, done) = sse_payloads(&text);
    assert!(done);
    let (last, rest) = payloads.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 2);
    let deltas = rest.len() - 2; // role chunk and finish chunk
    assert_eq!(last["usage"]["completion_tokens"], deltas);
    assert_eq!(last["usage"]["total_tokens"], deltas + 2);
    for payload in rest {
        assert_eq!(payload["usage"], Value::Null);
        assert!(payload.get("usage").is_some());
    }

    for include in [None, Some(false)] {
        let text = request(include).await.unwrap().text().await.unwrap();
        let (payloads, done) = sse_payloads(&text);
        assert!(done);
        assert!(payloads.iter().all(|p| p.get("usage").is_none()));
        assert!(payloads.iter().all(|p| p["choices"] != json!([])));
    }
    assert_eq!(mock.completed_streams(), 3);
}

#[tokio::test]
async fn legacy_completions() {
    let (mock, client) = start(MockOptions::new().chunk_interval(Duration::ZERO)).await;
    let body: Value = client
        .post(url(&mock, "/completions"))
        .json(&json!({"model": "gpt-3.5-turbo-instruct", "prompt": "say this"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-mock-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "gpt-3.5-turbo-instruct");
    let choice = &body["choices"][0];
    assert!(
        choice["text"]
            .as_str()
            .unwrap()
            .starts_with("You said: say this.")
    );
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["index"], 0);
    assert_eq!(body["usage"]["prompt_tokens"], 2);

    let text = client
        .post(url(&mock, "/completions"))
        .json(&json!({"model": "m", "prompt": "say this", "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (payloads, done) = sse_payloads(&text);
    assert!(done);
    let streamed: String = payloads
        .iter()
        .map(|p| p["choices"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(streamed, choice["text"].as_str().unwrap());
    assert_eq!(
        payloads.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(
        payloads
            .iter()
            .all(|p| p["object"] == "text_completion" && p["choices"][0]["logprobs"].is_null())
    );
}

#[tokio::test]
async fn bad_requests() {
    let (mock, client) = start(MockOptions::new()).await;
    for path in ["/chat/completions", "/completions", "/embeddings"] {
        let response = client
            .post(url(&mock, path))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_openai_error(&response.json().await.unwrap(), None, None);

        let response = client
            .post(url(&mock, path))
            .json(&json!({"messages": [], "input": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_openai_error(&response.json().await.unwrap(), None, Some("model"));
    }
    let response = client
        .post(url(&mock, "/embeddings"))
        .json(&json!({"model": "m", "input": "x", "encoding_format": "int8"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_openai_error(
        &response.json().await.unwrap(),
        None,
        Some("encoding_format"),
    );
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let (mock, client) = start(MockOptions::new()).await;
    let embed = |input: Value, format: Option<&str>| {
        let mut body = json!({"model": "text-embedding-3-small", "input": input});
        if let Some(format) = format {
            body["encoding_format"] = json!(format);
        }
        let request = client.post(url(&mock, "/embeddings")).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()
        }
    };

    let floats = embed(json!(["hello world", "goodbye"]), None).await;
    assert_eq!(floats["object"], "list");
    assert_eq!(floats["model"], "text-embedding-3-small");
    assert_eq!(floats["usage"]["prompt_tokens"], 3);
    assert_eq!(floats["usage"]["total_tokens"], 3);
    let data = floats["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let vectors: Vec<Vec<f32>> = data
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    for vector in &vectors {
        assert_eq!(vector.len(), 16);
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
    assert_ne!(vectors[0], vectors[1]);

    // Deterministic, and the same with "float" spelled out.
    let single = embed(json!("hello world"), Some("float")).await;
    let again: Vec<f32> = single["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(again, vectors[0]);

    let encoded = embed(json!(["hello world", "goodbye"]), Some("base64")).await;
    for (item, vector) in encoded["data"].as_array().unwrap().iter().zip(&vectors) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(item["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(&decoded, vector);
    }

    // Token inputs: a flat token array is one input; an array of token arrays is several.
    let tokens = embed(json!([1, 2, 3]), None).await;
    assert_eq!(tokens["data"].as_array().unwrap().len(), 1);
    assert_eq!(tokens["usage"]["prompt_tokens"], 3);
    let tokens = embed(json!([[1, 2], [3]]), None).await;
    assert_eq!(tokens["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn models_list_get_and_404() {
    let (mock, client) = start(MockOptions::new()).await;
    let list: Value = client
        .get(url(&mock, "/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            assert_eq!(m["created"], 1_700_000_000);
            assert_eq!(m["owned_by"], "perishable-mock");
            m["id"].as_str().unwrap()
        })
        .collect();
    assert!(ids.contains(&"gpt-4o-mini"));
    assert!(ids.contains(&"text-embedding-3-small"));

    let model: Value = client
        .get(url(&mock, "/models/gpt-4o-mini"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        model,
        json!({"id": "gpt-4o-mini", "object": "model", "created": 1_700_000_000, "owned_by": "perishable-mock"})
    );

    let response = client
        .get(url(&mock, "/models/no-such-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_openai_error(
        &response.json().await.unwrap(),
        Some("model_not_found"),
        Some("model"),
    );
}

#[tokio::test]
async fn unknown_urls_are_404() {
    let (mock, client) = start(MockOptions::new()).await;
    let response = client.post(url(&mock, "/nope?x=1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.headers()["set-cookie"],
        "__mock_session=1; Path=/; HttpOnly"
    );
    let body: Value = response.json().await.unwrap();
    assert_openai_error(&body, Some("unknown_url"), None);
    assert_eq!(
        body["error"]["message"],
        "Unknown request URL: POST /v1/nope."
    );

    // A known path with the wrong method is unknown too, as with OpenAI.
    let response = client
        .get(url(&mock, "/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "Unknown request URL: GET /v1/chat/completions."
    );
}

#[tokio::test]
async fn api_key_is_enforced() {
    let (mock, client) = start(MockOptions::new().api_key("sk-right")).await;
    for authorization in [
        None,
        Some("Bearer sk-wrong"),
        Some("sk-right"),
        Some("bearer sk-right"),
    ] {
        let mut request = client.get(url(&mock, "/models"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_openai_error(&body, Some("invalid_api_key"), None);
        assert_eq!(body["error"]["message"], "Incorrect API key provided.");
    }
    let response = client
        .get(url(&mock, "/models"))
        .bearer_auth("sk-right")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Refused requests are recorded too.
    assert_eq!(mock.requests().len(), 5);
}

#[tokio::test]
async fn requests_are_recorded() {
    let (mock, client) = start(MockOptions::new()).await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    client
        .post(url(&mock, "/chat/completions?api-version=1"))
        .bearer_auth("sk-forwarded")
        .header("x-custom", "yes")
        .json(&body)
        .send()
        .await
        .unwrap();
    client.delete(url(&mock, "/unknown")).send().await.unwrap();

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path_and_query, "/v1/chat/completions?api-version=1");
    assert_eq!(first.header("authorization"), Some("Bearer sk-forwarded"));
    assert_eq!(first.headers["x-custom"], "yes");
    assert_eq!(first.body_json(), Some(body.clone()));
    assert_eq!(first.body, serde_json::to_vec(&body).unwrap());
    assert_eq!(requests[1].method, "DELETE");
    assert_eq!(requests[1].path_and_query, "/v1/unknown");
    assert!(requests[1].body.is_empty());

    mock.clear();
    assert!(mock.requests().is_empty());

    let (quiet, client) = start(MockOptions::new().record(false)).await;
    client.get(url(&quiet, "/models")).send().await.unwrap();
    assert!(quiet.requests().is_empty());
}

#[tokio::test]
async fn recording_is_bounded() {
    let (mock, client) = start(MockOptions::new()).await;
    for i in 0..1005 {
        client
            .get(url(&mock, &format!("/models?i={i}")))
            .send()
            .await
            .unwrap();
    }
    let requests = mock.requests();
    assert_eq!(requests.len(), 1000);
    assert_eq!(requests[0].path_and_query, "/v1/models?i=5");
    assert_eq!(requests[999].path_and_query, "/v1/models?i=1004");
}

#[tokio::test]
async fn dropped_client_drops_the_stream() {
    let (mock, client) = start(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(20))
            .stream_deltas(200),
    )
    .await;
    let mut response = client
        .post(url(&mock, "/chat/completions"))
        .json(&json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(mock.active_streams(), 1);
    drop(response);
    drop(client);
    assert!(
        eventually(|| mock.active_streams() == 0).await,
        "the upstream stream was not dropped"
    );
    assert_eq!(mock.completed_streams(), 0);
}

#[tokio::test]
async fn router_works_in_process() {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let mock = MockUpstream::new(MockOptions::new().chunk_interval(Duration::ZERO));
    let request = axum::http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "yo"}]})
                .to_string(),
        ))
        .unwrap();
    let response = mock.router().oneshot(request).await.unwrap();
    assert_eq!(response.status(), axum::http::StatusCode::OK);
    assert_eq!(mock.active_streams(), 1);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let (payloads, done) = sse_payloads(std::str::from_utf8(&body).unwrap());
    assert!(done);
    assert!(!payloads.is_empty());
    assert_eq!(mock.active_streams(), 0);
    assert_eq!(mock.completed_streams(), 1);
    assert_eq!(mock.requests().len(), 1);
}
