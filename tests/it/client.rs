//! The client against the real Perishable router and a mock upstream, over 127.0.0.1 sockets:
//! proof of work at 8 bits, DPoP required.

mod harness;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use harness::*;
use perishable_client::{Client, DpopKey, Error, Interaction, TokenType};
use reqwest::Method;
use serde_json::{Value, json};

fn chat(stream: bool) -> String {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    })
    .to_string()
}

/// Polls `session()` until `done` holds for the new session, within `deadline`.
async fn wait_for(
    client: &Client,
    deadline: Duration,
    done: impl Fn(&perishable_client::Session) -> bool,
) -> perishable_client::Session {
    let until = Instant::now() + deadline;
    loop {
        let session = client.session().await.unwrap();
        if done(&session) {
            return session;
        }
        assert!(
            Instant::now() < until,
            "nothing changed within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn mints_a_dpop_bound_session_and_calls_chat_completions() {
    let server = Server::start().await;
    let client = server.client().build().unwrap();
    let session = client.session().await.unwrap();
    assert_eq!(session.token_type(), TokenType::Dpop);
    let key = client.dpop_key().unwrap();
    let claims = claims(session.token());
    assert_eq!(claims["cnf"]["jkt"], key.thumbprint());
    assert_eq!(claims["jti"], session.session_id());
    assert!(!format!("{session:?}").contains(session.token()));

    let response = client
        .send(
            client
                .request(Method::POST, "chat/completions")
                .await
                .unwrap()
                .header("content-type", "application/json")
                .body(chat(false)),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );

    // The upstream saw the server's key, never the session, the proof or the fingerprint.
    let seen = server.mock.requests();
    let last = seen.last().unwrap();
    assert_eq!(last.path_and_query, "/v1/chat/completions");
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {SERVER_KEY}").as_str())
    );
    assert!(last.header("dpop").is_none());
    assert!(last.header("x-perishable-fingerprint").is_none());
    assert_eq!(last.header("user-agent"), Some(UA));

    // One session served both calls.
    assert_eq!(
        client.session().await.unwrap().session_id(),
        session.session_id()
    );
}

#[tokio::test]
async fn streams_chat_completions() {
    let server = Server::start().await;
    let client = server.client().build().unwrap();
    let request = client
        .request(Method::POST, "/chat/completions")
        .await
        .unwrap()
        .header("content-type", "application/json")
        .body(chat(true));
    let mut response = client.send(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = response.chunk().await.unwrap() {
        chunks += 1;
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(chunks > 1, "one chunk per event: {chunks}");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let content: String = events
        .iter()
        .filter(|e| **e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(!content.is_empty(), "{text}");
}

#[tokio::test]
async fn recorded_samples_are_sent_and_scored_by_the_server() {
    // The default entropy gate (50): no samples is refused with its code...
    let server = Server::start_with(|c| c.session_min_entropy_score(50)).await;
    let empty = server.client().build().unwrap();
    let err = empty.session().await.unwrap_err();
    assert_eq!(err.code(), Some("insufficient_entropy"), "{err}");
    assert_eq!(err.status(), Some(400));
    match &err {
        Error::Refused {
            what,
            kind,
            message,
            ..
        } => {
            assert_eq!(*what, "POST /session");
            assert_eq!(kind.as_deref(), Some("invalid_request_error"));
            assert!(!message.is_empty());
        }
        other => panic!("{other:?}"),
    }

    // ...a straight, constant-interval line too...
    let line = (0..100).fold(Interaction::new(), |i, n| {
        let n = f64::from(n);
        i.pointer(n * 16.0, 100.0 + n * 3.0, 200.0 + n * 2.0)
    });
    let robot = server.client().interaction(line).build().unwrap();
    assert_eq!(
        robot.session().await.unwrap_err().code(),
        Some("insufficient_entropy")
    );

    // ...and a recorded, curved, jittered trace passes: the samples reached the server.
    let human = server
        .client()
        .interaction(recorded_trace())
        .build()
        .unwrap();
    assert_eq!(human.session().await.unwrap().token_type(), TokenType::Dpop);

    // Samples can also come from a source asked at every mint.
    let sourced = server
        .client()
        .interaction_source(recorded_trace)
        .build()
        .unwrap();
    sourced.session().await.unwrap();

    // Or be recorded into the client as events arrive.
    let recording = server.client().build().unwrap();
    for s in recorded_trace().pointer_samples() {
        recording.record_interaction(|i| i.push_pointer(s[0], s[1], s[2]));
    }
    recording.session().await.unwrap();
}

#[tokio::test]
async fn refreshes_before_expiry_and_re_mints_after_the_lifetime() {
    let server = Server::start_with(|c| c.session_ttl_secs(2).session_max_lifetime_secs(4)).await;
    let client = server
        .client()
        .refresh_margin(Duration::from_secs(1))
        .build()
        .unwrap();
    let first = client.session().await.unwrap();
    let first_claims = claims(first.token());
    assert_eq!(first.lifetime(), 2);

    // Within a second of expiry: refreshed (same auth_time, new jti).
    let refreshed = wait_for(&client, Duration::from_secs(8), |s| {
        s.session_id() != first.session_id()
    })
    .await;
    let refreshed_claims = claims(refreshed.token());
    assert_eq!(refreshed_claims["auth_time"], first_claims["auth_time"]);
    assert_eq!(refreshed.token_type(), TokenType::Dpop);

    // The old token was revoked by the refresh: a call with it (and a valid proof) fails.
    let url = format!("{}/models", client.openai_base_url());
    let key = client.dpop_key().unwrap();
    let stale = client
        .http()
        .get(&url)
        .header("authorization", format!("DPoP {}", first.token()))
        .header("dpop", key.proof("GET", &url, Some(first.token())).unwrap())
        .header("x-perishable-fingerprint", FP)
        .header("user-agent", UA)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 401);
    assert_eq!(error_code(stale).await, "session_revoked");

    // Past the absolute lifetime (4 s from the first mint) refresh is refused: a new mint.
    let reminted = wait_for(&client, Duration::from_secs(12), |s| {
        claims(s.token())["auth_time"] != first_claims["auth_time"]
    })
    .await;
    let response = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_ne!(reminted.session_id(), refreshed.session_id());
}

#[tokio::test]
async fn revoke_ends_the_session() {
    let server = Server::start().await;
    let client = server.client().build().unwrap();
    let url = format!("{}/models", client.openai_base_url());
    let before = client.session().await.unwrap();
    // Headers made before the revocation, sent after it.
    let headers = client.headers(&Method::GET, &url).await.unwrap();
    client.revoke().await.unwrap();
    let response = reqwest::Client::new()
        .get(&url)
        .headers(headers)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(error_code(response).await, "session_revoked");

    // Revoking again is a no-op; the next call mints a new session.
    client.revoke().await.unwrap();
    let after = client.session().await.unwrap();
    assert_ne!(after.session_id(), before.session_id());
    let ok = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_stolen_token_is_refused_without_the_key() {
    let server = Server::start().await;
    let client = server.client().build().unwrap();
    let session = client.session().await.unwrap();
    let token = session.token();
    let url = format!("{}/models", client.openai_base_url());
    let http = reqwest::Client::new();
    let call = |scheme: &str, fp: &str, ua: &str, proof: Option<String>| {
        let mut request = http
            .get(&url)
            .header("authorization", format!("{scheme} {token}"))
            .header("x-perishable-fingerprint", fp)
            .header("user-agent", ua);
        if let Some(proof) = proof {
            request = request.header("dpop", proof);
        }
        request.send()
    };

    // Token and fingerprint, no key: no proof, or the Bearer scheme.
    let r = call("DPoP", FP, UA, None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "dpop_required");
    let r = call("Bearer", FP, UA, None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "dpop_required");

    // A proof from the thief's own key.
    let thief = DpopKey::generate().unwrap();
    let r = call(
        "DPoP",
        FP,
        UA,
        Some(thief.proof("GET", &url, Some(token)).unwrap()),
    )
    .await
    .unwrap();
    assert!(r.status() == 401 || r.status() == 400, "{}", r.status());
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains(r#"error="invalid_dpop_proof""#)
    );
    assert_eq!(error_code(r).await, "invalid_dpop_proof");

    // Even with the key: another device's fingerprint, or another User-Agent.
    let key = client.dpop_key().unwrap();
    let r = call(
        "DPoP",
        "another-device-fingerprint",
        UA,
        Some(key.proof("GET", &url, Some(token)).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "fingerprint_mismatch");
    let r = call(
        "DPoP",
        FP,
        "curl/8.0",
        Some(key.proof("GET", &url, Some(token)).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "fingerprint_mismatch");

    // The owner still gets through.
    let ok = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn refusals_map_to_typed_errors() {
    // DPoP required and the client has none: 401 dpop_required at the mint.
    let server = Server::start().await;
    let bearer = server.client().no_dpop().build().unwrap();
    let err = bearer.session().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.code(), Some("dpop_required"));

    // A forbidden path: the response comes back as is, and `check` types it.
    let client = server.client().build().unwrap();
    let response = client
        .send(client.request(Method::GET, "files").await.unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let err = perishable_client::check(response).await.unwrap_err();
    assert_eq!(err.code(), Some("path_not_allowed"));
    assert_eq!(err.status(), Some(403));
    let shown = format!("{err} {err:?}");
    let token = client.session().await.unwrap();
    assert!(!shown.contains(token.token()), "{shown}");

    // headers() never sends the token outside the base URL.
    assert!(matches!(
        client
            .headers(&Method::GET, "https://elsewhere.example/openai/models")
            .await,
        Err(Error::Url(_))
    ));
}

#[tokio::test]
async fn bearer_sessions_where_dpop_is_optional() {
    let server =
        Server::start_with(|c| c.session_dpop(perishable::config::DpopMode::Optional)).await;
    let client = server.client().no_dpop().build().unwrap();
    let session = client.session().await.unwrap();
    assert_eq!(session.token_type(), TokenType::Bearer);
    let headers = client
        .headers(
            &Method::GET,
            &format!("{}/models", client.openai_base_url()),
        )
        .await
        .unwrap();
    assert!(
        headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer ")
    );
    assert!(headers["authorization"].is_sensitive());
    assert!(!headers.contains_key("dpop"));
    assert_eq!(headers["x-perishable-fingerprint"], FP);
    assert_eq!(headers["user-agent"], UA);
    let ok = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_stored_key_binds_the_next_launch_to_the_same_key() {
    let server = Server::start().await;
    let first = server.client().build().unwrap();
    let stored = first.dpop_key().unwrap().pkcs8_der().to_vec();
    let thumbprint = first.dpop_key().unwrap().thumbprint().to_owned();
    drop(first);
    let relaunched = server.client().dpop_key(&stored).build().unwrap();
    let session = relaunched.session().await.unwrap();
    assert_eq!(claims(session.token())["cnf"]["jkt"], thumbprint);
}

#[tokio::test]
async fn headers_work_with_any_http_client() {
    let server = Server::start().await;
    let client = server.client().build().unwrap();
    let url = format!("{}/models?limit=5", client.openai_base_url());
    let headers = client.headers(&Method::GET, &url).await.unwrap();
    assert!(
        headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("DPoP ")
    );
    assert!(headers["dpop"].is_sensitive());
    let proof = headers["dpop"].to_str().unwrap();
    let proof_claims = claims(proof);
    assert_eq!(proof_claims["htm"], "GET");
    assert_eq!(
        proof_claims["htu"],
        format!("{}/models", client.openai_base_url()),
        "htu has no query"
    );
    let response = reqwest::Client::new()
        .get(&url)
        .headers(headers)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn concurrent_callers_share_one_mint() {
    let server = Server::start().await;
    let client = server.client().build().unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.session().await.unwrap() })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().session_id().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

#[tokio::test]
async fn send_retries_once_with_a_fresh_proof() {
    // Protocol 1.1 says 401; servers before it said 400: the client reads WWW-Authenticate.
    retries_a_refused_proof(StatusCode::UNAUTHORIZED).await;
    retries_a_refused_proof(StatusCode::BAD_REQUEST).await;
}

async fn retries_a_refused_proof(status: StatusCode) {
    let (front, _server) = Front::start(Refusal {
        path_suffix: "/openai/models",
        status,
        headers: vec![(
            "www-authenticate",
            r#"DPoP realm="perishable", error="invalid_dpop_proof", algs="ES256 EdDSA""#,
        )],
        body: r#"{"error":{"message":"bad proof","type":"authentication_error","code":"invalid_dpop_proof"}}"#,
    })
    .await;
    let client = Client::builder(front.base())
        .fingerprint(FP)
        .user_agent(UA)
        .build()
        .unwrap();
    let response = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let calls: Vec<Seen> = front
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with("/openai/models"))
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (a, b) = (
        calls[0].headers["dpop"].to_str().unwrap(),
        calls[1].headers["dpop"].to_str().unwrap(),
    );
    assert_ne!(claims(a)["jti"], claims(b)["jti"], "a fresh proof");
}

#[tokio::test]
async fn send_follows_a_dpop_nonce() {
    let (front, _server) = Front::start(Refusal {
        path_suffix: "/openai/models",
        status: StatusCode::UNAUTHORIZED,
        headers: vec![
            ("www-authenticate", r#"DPoP error="use_dpop_nonce""#),
            ("dpop-nonce", "server-nonce-1"),
        ],
        body: r#"{"error":{"message":"nonce","type":"authentication_error","code":"use_dpop_nonce"}}"#,
    })
    .await;
    let client = Client::builder(front.base())
        .fingerprint(FP)
        .user_agent(UA)
        .build()
        .unwrap();
    let response = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let calls: Vec<Seen> = front
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with("/openai/models"))
        .collect();
    assert_eq!(calls.len(), 2);
    assert!(
        claims(calls[0].headers["dpop"].to_str().unwrap())
            .get("nonce")
            .is_none()
    );
    assert_eq!(
        claims(calls[1].headers["dpop"].to_str().unwrap())["nonce"],
        "server-nonce-1"
    );
}

#[tokio::test]
async fn send_re_mints_once_after_a_revoked_session() {
    let (front, _server) = Front::start(Refusal {
        path_suffix: "/openai/models",
        status: StatusCode::UNAUTHORIZED,
        headers: vec![(
            "www-authenticate",
            r#"Bearer realm="perishable", error="invalid_token", error_description="session_revoked""#,
        )],
        body: r#"{"error":{"message":"revoked","type":"authentication_error","code":"session_revoked"}}"#,
    })
    .await;
    let client = Client::builder(front.base())
        .fingerprint(FP)
        .user_agent(UA)
        .build()
        .unwrap();
    let first = client.session().await.unwrap();
    let response = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let second = client.session().await.unwrap();
    assert_ne!(first.session_id(), second.session_id());
    let mints = front
        .seen()
        .iter()
        .filter(|s| s.method == "POST" && s.path == "/ai/session")
        .count();
    assert_eq!(mints, 2);
    // Every mint and call carried the User-Agent the session is bound to.
    assert!(front.seen().iter().all(|s| s.headers["user-agent"] == UA));
}

#[tokio::test]
async fn the_middleware_authenticates_calls_under_the_base_url() {
    let (front, _server) = Front::start(Refusal {
        path_suffix: "/openai/models",
        status: StatusCode::UNAUTHORIZED,
        headers: vec![(
            "www-authenticate",
            r#"DPoP realm="perishable", error="invalid_dpop_proof""#,
        )],
        body: "{}",
    })
    .await;
    let client = Client::builder(front.base())
        .fingerprint(FP)
        .user_agent(UA)
        .build()
        .unwrap();
    let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(client.clone())
        .build();
    let response = http
        .get(format!("{}/models", client.openai_base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let health = http
        .get(format!("{}/health", client.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let seen = front.seen();
    let health_seen = seen.iter().find(|s| s.path == "/ai/health").unwrap();
    assert!(!health_seen.headers.contains_key("authorization"));
    assert_eq!(
        seen.iter()
            .filter(|s| s.path.ends_with("/openai/models"))
            .count(),
        2
    );
}

/// The client against the example proxy as a user runs it (its own process, a config file
/// with the default 16-bit proof of work, DPoP required and the entropy gate on), in front of
/// the mock upstream: it mints with a proof of work, the recorded samples and a DPoP key, and
/// streams a chat completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mints_and_streams_through_the_example_proxy() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mock = perishable_mock::MockUpstream::start(
        perishable_mock::MockOptions::new()
            .api_key(SERVER_KEY)
            .chunk_interval(Duration::from_millis(2)),
    )
    .await
    .unwrap();
    let config = std::env::temp_dir().join(format!(
        "perishable-client-example-{}.toml",
        std::process::id()
    ));
    std::fs::write(&config, "[session]\ndpop = \"required\"\n").unwrap();
    let mut child = Command::new(crate::support::example_binary())
        .args(["--host", "127.0.0.1", "--port", "0", "--config"])
        .arg(&config)
        .env("OPENAI_API_KEY", SERVER_KEY)
        .env("OPENAI_BASE_URL", mock.base_url())
        .env_remove("PORT")
        .env_remove("PERISHABLE_STORE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let child = Kill(child);
    let addr = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("perishable-proxy listening on ")
                    .map(str::to_owned)
            })
            .expect("the proxy says where it listens")
    })
    .await
    .unwrap();

    let client = Client::builder(addr)
        .fingerprint(FP)
        .user_agent(UA)
        .interaction(recorded_trace())
        .build()
        .unwrap();
    let session = client.session().await.unwrap();
    assert_eq!(session.token_type(), TokenType::Dpop);
    assert_eq!(
        claims(session.token())["cnf"]["jkt"],
        client.dpop_key().unwrap().thumbprint()
    );
    let response = client
        .send(
            client
                .request(Method::POST, "chat/completions")
                .await
                .unwrap()
                .header("content-type", "application/json")
                .body(chat(true)),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let last = mock.requests().pop().unwrap();
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {SERVER_KEY}").as_str())
    );
    drop(child);
    let _ = std::fs::remove_file(config);
}
