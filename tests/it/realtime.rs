//! The Realtime route over real WebSockets: a tungstenite client, the proxy and the mock's
//! Realtime API, on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{SinkExt, StreamExt};
use perishable::{ConfigBuilder, Perishable};
use perishable_mock::{MockOptions, MockUpstream};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{
    Proxy, RecordingStore, SERVER_KEY, UA, client, config, on_both_stores, serve,
};

const FP: &str = "realtime-device-1";
const MODEL: &str = "gpt-realtime";

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The proxy with the Realtime route on, a budget, and the model allow-list.
async fn start(tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> Proxy {
    Proxy::start_with(MockOptions::new().chunk_interval(Duration::ZERO), |c| {
        tweak(
            c.realtime_enabled(true)
                .upstream_allowed_models([MODEL])
                .budget_tokens_per_window(100_000)
                .rate_limit_mint_per_ip(1_000),
        )
    })
    .await
}

fn ws_url(proxy: &Proxy, model: &str) -> String {
    format!("ws://{}/openai/realtime?model={model}", proxy.addr)
}

/// A handshake request with `headers`.
fn handshake(url: &str, headers: &[(&str, String)]) -> http::Request<()> {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    request
}

/// The usual headers of a non-browser client.
fn headers(token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {token}")),
        ("x-perishable-fingerprint", FP.to_owned()),
        ("user-agent", UA.to_owned()),
    ]
}

async fn connect(url: &str, headers: &[(&str, String)]) -> Socket {
    let (socket, response) = tokio_tungstenite::connect_async(handshake(url, headers))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    socket
}

/// The HTTP refusal of a handshake: its status and error code.
async fn refused(url: &str, headers: &[(&str, String)]) -> (u16, String) {
    match tokio_tungstenite::connect_async(handshake(url, headers)).await {
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or(b"{}"))
                .unwrap_or(Value::Null);
            (
                status,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
        Ok((_, response)) => panic!("the handshake passed: {}", response.status()),
        Err(e) => panic!("not an HTTP refusal: {e}"),
    }
}

/// The next text event, as JSON (skipping pings and pongs).
async fn next_event(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("an event within 10 s")
            .expect("the connection is open")
            .expect("a frame");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Events until one of type `kind`; returns them all, that one last.
async fn events_until(socket: &mut Socket, kind: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = next_event(socket).await;
        let done = event["type"] == kind;
        events.push(event);
        if done {
            return events;
        }
    }
}

async fn send(socket: &mut Socket, event: Value) {
    socket.send(Message::text(event.to_string())).await.unwrap();
}

/// The close frame the proxy sends, within `within`.
async fn closed(socket: &mut Socket, within: Duration) -> (CloseCode, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the connection closes in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (frame.code, frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None => panic!("closed without a close frame"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the connection failed: {e}"),
        }
    }
}

#[tokio::test]
async fn a_session_talks_to_the_realtime_api_through_the_proxy() {
    let proxy = start(|c| c).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;

    let created = next_event(&mut socket).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], MODEL);
    send(
        &mut socket,
        json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
               "content": [{"type": "input_text", "text": "hello there"}]}}),
    )
    .await;
    send(
        &mut socket,
        json!({"type": "response.create", "event_id": "e1"}),
    )
    .await;
    let events = events_until(&mut socket, "response.done").await;
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert!(text.contains("You said: hello there"), "{text}");
    let done = events.last().unwrap();
    assert_eq!(done["response"]["status"], "completed");
    assert!(done["response"]["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Ping and close are relayed.
    socket.send(Message::Ping(b"hi"[..].into())).await.unwrap();
    socket
        .close(Some(tungstenite::protocol::CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();

    // The upstream saw the server key, never the session token, and the client's events.
    let handshake = proxy
        .mock
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.starts_with("/v1/realtime"))
        .unwrap();
    assert_eq!(
        handshake.path_and_query,
        format!("/v1/realtime?model={MODEL}")
    );
    assert_eq!(
        handshake.header("authorization").unwrap(),
        format!("Bearer {SERVER_KEY}")
    );
    for (name, value) in &handshake.headers {
        let value = value.to_str().unwrap_or_default();
        assert!(!value.contains(&session.token), "{name} carries the token");
        assert!(!value.contains(FP), "{name} carries the fingerprint");
    }
    let events = proxy.mock.realtime_events();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[1],
        json!({"type": "response.create", "event_id": "e1"}).to_string()
    );
}

#[tokio::test]
async fn a_browser_sends_its_credentials_as_subprotocols() {
    let proxy = start(|c| c).await;
    let session = proxy.mint(FP).await;
    let protocols = format!(
        "realtime, openai-insecure-api-key.{}, perishable-fingerprint.{}",
        session.token,
        URL_SAFE_NO_PAD.encode(FP)
    );
    let request = handshake(
        &ws_url(&proxy, MODEL),
        &[
            ("sec-websocket-protocol", protocols),
            ("user-agent", UA.to_owned()),
        ],
    );
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    let handshake = proxy.mock.requests().pop().unwrap();
    for (name, value) in &handshake.headers {
        let value = value.to_str().unwrap_or_default();
        assert!(!value.contains(&session.token), "{name} carries the token");
        assert!(
            !value.contains("perishable-fingerprint") && !value.contains("insecure-api-key"),
            "{name} carries our subprotocols"
        );
    }

    // The wrong fingerprint, or none, is refused before the upgrade.
    let url = ws_url(&proxy, MODEL);
    for fingerprint in [Some("another-device"), None] {
        let mut protocols = format!("realtime, openai-insecure-api-key.{}", session.token);
        if let Some(fp) = fingerprint {
            protocols.push_str(&format!(
                ", perishable-fingerprint.{}",
                URL_SAFE_NO_PAD.encode(fp)
            ));
        }
        let (status, code) = refused(
            &url,
            &[
                ("sec-websocket-protocol", protocols),
                ("user-agent", UA.to_owned()),
            ],
        )
        .await;
        assert_eq!((status, code.as_str()), (401, "fingerprint_mismatch"));
    }
}

#[tokio::test]
async fn refusals_come_before_the_upgrade() {
    let proxy = start(|c| c.cors_allowed_origins(["https://app.example"])).await;
    let session = proxy.mint(FP).await;
    let token = session.token.clone();
    let url = ws_url(&proxy, MODEL);

    let none: Vec<(&str, String)> = vec![("x-perishable-fingerprint", FP.to_owned())];
    assert_eq!(refused(&url, &none).await, (401, "missing_token".into()));
    let mut wrong = headers(&token);
    wrong[1].1 = "another-device".into();
    assert_eq!(
        refused(&url, &wrong).await,
        (401, "fingerprint_mismatch".into())
    );
    assert_eq!(
        refused(&ws_url(&proxy, "gpt-5-pro"), &headers(&token)).await,
        (403, "model_not_allowed".into())
    );
    assert_eq!(
        refused(
            &format!("ws://{}/openai/realtime", proxy.addr),
            &headers(&token)
        )
        .await,
        (400, "invalid_parameter".into())
    );
    let mut evil = headers(&token);
    evil.push(("origin", "https://evil.example".into()));
    assert_eq!(
        refused(&url, &evil).await,
        (403, "origin_not_allowed".into())
    );
    let mut allowed = headers(&token);
    allowed.push(("origin", "https://app.example".into()));
    connect(&url, &allowed).await;

    // Nothing refused reached the upstream.
    let handshakes = proxy
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.starts_with("/v1/realtime"))
        .count();
    assert_eq!(handshakes, 1);
}

#[tokio::test]
async fn the_route_is_off_unless_enabled() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c).await;
    let session = proxy.mint(FP).await;
    assert_eq!(
        refused(&ws_url(&proxy, MODEL), &headers(&session.token)).await,
        (403, "path_not_allowed".into())
    );
}

#[tokio::test]
async fn dpop_bound_sessions_send_a_proof_with_the_handshake() {
    let proxy = start(|c| {
        c.session_dpop(perishable::config::DpopMode::Required)
            .session_min_entropy_score(0)
    })
    .await;
    let client = perishable_client::Client::builder(proxy.url(""))
        .fingerprint(FP)
        .user_agent(UA)
        .build()
        .unwrap();
    let session = client.session().await.unwrap();
    let key = client.dpop_key().unwrap();
    let url = ws_url(&proxy, MODEL);
    let htu = format!("http://{}/openai/realtime", proxy.addr);

    let bound = |proof: Option<String>| {
        let mut h = vec![
            ("authorization", format!("DPoP {}", session.token())),
            ("x-perishable-fingerprint", FP.to_owned()),
            ("user-agent", UA.to_owned()),
        ];
        if let Some(proof) = proof {
            h.push(("dpop", proof));
        }
        h
    };
    assert_eq!(
        refused(&url, &bound(None)).await,
        (401, "dpop_required".into())
    );
    let proof = key.proof("GET", &htu, Some(session.token())).unwrap();
    let mut socket = connect(&url, &bound(Some(proof.clone()))).await;
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    // The same proof again is a replay.
    assert_eq!(
        refused(&url, &bound(Some(proof))).await,
        (401, "invalid_dpop_proof".into())
    );
    // A browser sends the proof as a subprotocol.
    let proof = key.proof("GET", &htu, Some(session.token())).unwrap();
    let protocols = format!(
        "realtime, openai-insecure-api-key.{}, perishable-fingerprint.{}, perishable-dpop.{proof}",
        session.token(),
        URL_SAFE_NO_PAD.encode(FP)
    );
    drop(socket);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut socket = connect(
        &url,
        &[
            ("sec-websocket-protocol", protocols),
            ("user-agent", UA.to_owned()),
        ],
    )
    .await;
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
}

/// A proxy over a [`RecordingStore`] on `store_url`, and its mock.
async fn recorded(
    store_url: Option<&str>,
    mock: &MockUpstream,
    tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (Proxy, Arc<RecordingStore>) {
    static PREFIXES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut builder = tweak(
        config(&mock.base_url())
            .realtime_enabled(true)
            .rate_limit_mint_per_ip(1_000),
    );
    if let Some(url) = store_url {
        let prefix = format!(
            "rt{}x{}",
            std::process::id(),
            PREFIXES.fetch_add(1, Ordering::Relaxed)
        );
        builder = builder.store_url(url).store_key_prefix(prefix);
    }
    let config = builder.build().unwrap();
    let store = Perishable::new(config.clone()).unwrap().store().clone();
    let spy = Arc::new(RecordingStore::new(store));
    let perishable = Perishable::with_store(config, spy.clone()).unwrap();
    let addr = serve(perishable::router_from(&perishable)).await;
    (
        Proxy {
            addr,
            mock: mock.clone(),
            http: client(),
        },
        spy,
    )
}

async fn budget_is_reserved_per_response_and_settled_on_usage(store_url: Option<String>) {
    let mock = MockUpstream::start(
        MockOptions::new()
            .chunk_interval(Duration::ZERO)
            .stream_deltas(7)
            .api_key(SERVER_KEY),
    )
    .await
    .unwrap();
    let (proxy, spy) = recorded(store_url.as_deref(), &mock, |c| {
        c.budget_tokens_per_window(1_000)
            .budget_window_secs(10_000_000)
            .budget_default_reserve_tokens(300)
    })
    .await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    next_event(&mut socket).await;

    // A ceiling of its own: that is reserved; the usage (1 input + 7 output) settles it.
    let mark = spy.mark();
    send(
        &mut socket,
        json!({"type": "response.create", "response": {"max_output_tokens": 100}}),
    )
    .await;
    let done = events_until(&mut socket, "response.done").await;
    assert_eq!(done.last().unwrap()["response"]["usage"]["total_tokens"], 8);
    assert_eq!(spy.reserved()[mark.reserved..], [100]);
    assert_eq!(spy.settlements_since(mark, 1, "settled").await, [92]);

    // No ceiling: the session's is "inf", so the default reserve.
    let mark = spy.mark();
    send(&mut socket, json!({"type": "response.create"})).await;
    events_until(&mut socket, "response.done").await;
    assert_eq!(spy.reserved()[mark.reserved..], [300]);
    assert_eq!(spy.settlements_since(mark, 1, "settled").await, [292]);

    // More than the budget holds: not forwarded, an error event instead.
    let before = mock.realtime_events().len();
    send(
        &mut socket,
        json!({"type": "response.create", "event_id": "big", "response": {"max_output_tokens": 999}}),
    )
    .await;
    let error = next_event(&mut socket).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "budget_exhausted");
    assert_eq!(error["error"]["event_id"], "big");
    assert_eq!(mock.realtime_events().len(), before);

    // A response the server starts by itself (voice activity detection) is reserved when it
    // starts, and settled the same way.
    let mark = spy.mark();
    send(
        &mut socket,
        json!({"type": "input_audio_buffer.append", "audio": "AAAA"}),
    )
    .await;
    send(&mut socket, json!({"type": "input_audio_buffer.commit"})).await;
    events_until(&mut socket, "response.done").await;
    assert_eq!(spy.reserved()[mark.reserved..], [300]);
    assert_eq!(spy.settlements_since(mark, 1, "settled").await, [292]);

    // One the budget cannot cover (the session's ceiling is now more than what is left) is
    // cancelled upstream, but what it used before the cancel arrived is still charged: its
    // `response.done` settles on its usage with nothing reserved.
    send(
        &mut socket,
        json!({"type": "session.update", "session": {"max_output_tokens": 990}}),
    )
    .await;
    events_until(&mut socket, "session.updated").await;
    let mark = spy.mark();
    send(&mut socket, json!({"type": "input_audio_buffer.commit"})).await;
    let events = events_until(&mut socket, "response.done").await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "error" && e["error"]["code"] == "budget_exhausted"),
        "{events:?}"
    );
    let used = events.last().unwrap()["response"]["usage"]["total_tokens"]
        .as_i64()
        .unwrap();
    assert!(used > 0);
    // The mock ran it to the end before the cancel could arrive; the cancel comes all the same.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !mock
        .realtime_events()
        .iter()
        .any(|e| e.contains("response.cancel"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy did not cancel it upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spy.reserved()[mark.reserved..], [] as [u64; 0]);
    assert_eq!(spy.settlements_since(mark, 1, "charged").await, [-used]);
}

on_both_stores!(
    budget_is_reserved_per_response_memory,
    budget_is_reserved_per_response_redis,
    |url| budget_is_reserved_per_response_and_settled_on_usage(url)
);

#[tokio::test]
async fn the_cap_lowers_a_responses_ceiling_in_place() {
    let proxy = start(|c| c.budget_max_completion_tokens(5)).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    next_event(&mut socket).await;
    // Spelt by hand: the proxy edits the one member, every other byte passes.
    socket
        .send(Message::text(
            r#"{"type": "response.create", "response": {"max_output_tokens": "inf", "instructions": "hi"}}"#,
        ))
        .await
        .unwrap();
    let events = events_until(&mut socket, "response.done").await;
    let deltas = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .count();
    assert_eq!(deltas, 5);
    assert_eq!(
        proxy.mock.realtime_events().last().unwrap(),
        r#"{"type": "response.create", "response": {"max_output_tokens": 5, "instructions": "hi"}}"#
    );
    // A session.update naming a model outside the allow-list is not forwarded.
    send(
        &mut socket,
        json!({"type": "session.update", "session": {"model": "gpt-5-pro"}}),
    )
    .await;
    let error = next_event(&mut socket).await;
    assert_eq!(error["error"]["code"], "model_not_allowed");
    // Nor what the proxy cannot meter.
    socket
        .send(Message::text(r#"{"type":"response.create","type":"x"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut socket).await["error"]["code"],
        "invalid_json"
    );
    socket.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(
        next_event(&mut socket).await["error"]["code"],
        "invalid_json"
    );
    assert!(
        !proxy
            .mock
            .realtime_events()
            .iter()
            .any(|e| e.contains("gpt-5-pro") || e.contains(r#""type":"x""#))
    );
}

/// A client message over `upstream.max_body_bytes` ends the connection with 1009 (message too
/// big), and nothing of it reaches the upstream.
#[tokio::test]
async fn a_message_over_the_limit_closes_with_1009() {
    let proxy = start(|c| c.upstream_max_body_bytes(4096)).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    next_event(&mut socket).await;
    let before = proxy.mock.realtime_events().len();
    let big = json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "x".repeat(8192)}]}});
    // The proxy may close before the whole message is written: the send itself may fail.
    let _ = socket.send(Message::text(big.to_string())).await;
    let (code, reason) = closed(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(code, CloseCode::Size, "{reason}");
    assert!(reason.contains("max_body_bytes"), "{reason}");
    assert_eq!(proxy.mock.realtime_events().len(), before);
}

#[tokio::test]
async fn a_revoked_session_closes_its_connection() {
    let proxy = start(|c| c).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    next_event(&mut socket).await;
    let revoked = proxy
        .http
        .delete(proxy.url("/session"))
        .bearer_auth(&session.token)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let (code, reason) = closed(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "session revoked")
    );
}

#[tokio::test]
async fn an_expired_session_or_a_long_connection_is_closed() {
    let proxy = start(|c| c.session_ttl_secs(2)).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    let (code, reason) = closed(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "session expired")
    );

    let proxy = start(|c| c.realtime_max_duration_secs(1)).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    let (code, reason) = closed(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "realtime.max_duration_secs reached")
    );
}

#[tokio::test]
async fn connections_per_session_are_capped() {
    let proxy = start(|c| c.realtime_max_connections_per_session(1)).await;
    let session = proxy.mint(FP).await;
    let url = ws_url(&proxy, MODEL);
    let mut first = connect(&url, &headers(&session.token)).await;
    next_event(&mut first).await;
    assert_eq!(
        refused(&url, &headers(&session.token)).await,
        (429, "rate_limited".into())
    );
    first.close(None).await.unwrap();
    // The slot is given back once the connection has ended.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio_tungstenite::connect_async(handshake(&url, &headers(&session.token))).await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the slot was not given back: {e}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_slows_the_upstream_down() {
    let proxy = start(|c| c).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    next_event(&mut socket).await;
    let sent_before = proxy.mock.realtime_sent();
    // 200 MB the client does not read.
    const COUNT: u64 = 20_000;
    send(
        &mut socket,
        json!({"type": "mock.flood", "count": COUNT, "size": 10_000}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stalled = proxy.mock.realtime_sent() - sent_before;
    assert!(
        stalled < COUNT / 2,
        "the upstream wrote {stalled} of {COUNT} events to a client that reads nothing"
    );
    // Nothing is lost: reading again, every event arrives, in order.
    for i in 0..COUNT {
        let event = next_event(&mut socket).await;
        let delta = event["delta"].as_str().unwrap();
        assert!(delta.starts_with(&format!("flood {i} ")), "event {i}");
    }
}

/// Two instances on one Redis share the budget of a client's Realtime connections.
#[tokio::test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
async fn two_instances_share_the_budget_on_redis() {
    let redis = crate::support::Redis::start();
    // Three deltas 300 ms apart: a response holds its reservation for about a second.
    let mock = MockUpstream::start(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(300))
            .stream_deltas(3)
            .api_key(SERVER_KEY),
    )
    .await
    .unwrap();
    let tweak = |c: ConfigBuilder| {
        c.budget_tokens_per_window(250)
            .budget_window_secs(10_000_000)
            .store_url(redis.url())
            .store_key_prefix(format!("rtshared{}", std::process::id()))
            .realtime_enabled(true)
            .realtime_max_connections_per_session(2)
    };
    let a = serve(perishable::router(
        tweak(config(&mock.base_url())).build().unwrap(),
    ))
    .await;
    let b = serve(perishable::router(
        tweak(config(&mock.base_url())).build().unwrap(),
    ))
    .await;
    let minting = Proxy {
        addr: a,
        mock: mock.clone(),
        http: client(),
    };
    let session = minting.mint(FP).await;
    let url = |addr| format!("ws://{addr}/openai/realtime?model={MODEL}");
    let mut on_a = connect(&url(a), &headers(&session.token)).await;
    let mut on_b = connect(&url(b), &headers(&session.token)).await;
    next_event(&mut on_a).await;
    next_event(&mut on_b).await;
    send(
        &mut on_a,
        json!({"type": "response.create", "response": {"max_output_tokens": 200}}),
    )
    .await;
    assert_eq!(next_event(&mut on_a).await["type"], "response.created");
    // While a's response runs it holds 200 of 250: b cannot take 100.
    send(
        &mut on_b,
        json!({"type": "response.create", "event_id": "b1", "response": {"max_output_tokens": 100}}),
    )
    .await;
    let refused = next_event(&mut on_b).await;
    assert_eq!(refused["error"]["code"], "budget_exhausted", "{refused}");
    // a's response used 4 tokens (1 in, 3 out): once settled, b can take 240.
    events_until(&mut on_a, "response.done").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        send(
            &mut on_b,
            json!({"type": "response.create", "event_id": "b2", "response": {"max_output_tokens": 240}}),
        )
        .await;
        let event = next_event(&mut on_b).await;
        if event["type"] == "response.created" {
            break;
        }
        assert_eq!(event["error"]["code"], "budget_exhausted");
        assert!(
            tokio::time::Instant::now() < deadline,
            "a's usage never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The official Python SDK's Realtime client (`client.realtime.connect`), unchanged, with the
/// session token as its API key.
#[tokio::test]
#[cfg_attr(
    perishable_missing_openai_realtime,
    ignore = "needs the openai Python package with its Realtime extra (pip install 'openai[realtime]')"
)]
async fn the_official_python_sdk_talks_realtime_through_the_proxy() {
    let proxy = start(|c| c.budget_tokens_per_window(50_000)).await;
    let result = crate::support::run_sdk_script(
        "sdk_realtime.py",
        proxy.url(""),
        "Hello over the Realtime API",
    )
    .await;
    assert_eq!(result["session_model"], MODEL);
    assert!(result["deltas"].as_u64().unwrap() > 1, "{result}");
    assert!(
        result["text"]
            .as_str()
            .unwrap()
            .starts_with("You said: Hello over the Realtime API"),
        "{result}"
    );
    assert_eq!(result["status"], "completed");
    assert!(result["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(result["refusal_code"], "budget_exhausted");
    assert_eq!(result["refusal_type"], "rate_limit_error");
    // The SDK's default headers reached the upstream; the session token did not.
    let handshake = proxy
        .mock
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.starts_with("/v1/realtime"))
        .unwrap();
    assert_eq!(
        handshake.header("authorization").unwrap(),
        format!("Bearer {SERVER_KEY}")
    );
}

/// `realtime/client_secrets` (WebRTC): forwarded only when listed, its life capped to the
/// session's, its model kept to the allow-list.
#[tokio::test]
async fn a_client_secret_lives_no_longer_than_its_session() {
    let proxy = start(|c| {
        c.session_ttl_secs(120)
            .upstream_allowed_paths(["chat/completions", "realtime/client_secrets"])
    })
    .await;
    let session = proxy.mint(FP).await;
    let create = |body: Value| {
        proxy
            .openai(
                reqwest::Method::POST,
                "realtime/client_secrets",
                &session.token,
                FP,
            )
            .json(&body)
            .send()
    };
    let response = create(json!({
        "expires_after": {"anchor": "created_at", "seconds": 3600},
        "session": {"type": "realtime", "model": MODEL},
    }))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let secret: Value = response.json().await.unwrap();
    assert!(secret["value"].as_str().unwrap().starts_with("ek_mock_"));
    let sent = proxy.mock.requests().pop().unwrap().body_json().unwrap();
    let seconds = sent["expires_after"]["seconds"].as_u64().unwrap();
    assert!((100..=120).contains(&seconds), "{seconds}");
    // Without expires_after, one is added.
    let response = create(json!({"session": {"type": "realtime", "model": MODEL}}))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = proxy.mock.requests().pop().unwrap().body_json().unwrap();
    assert!(sent["expires_after"]["seconds"].as_u64().unwrap() <= 120);
    // Another model: refused.
    let response = create(json!({"session": {"type": "realtime", "model": "gpt-5-pro"}}))
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        crate::support::error_code(response).await,
        "model_not_allowed"
    );

    // Not listed in upstream.allowed_paths (the default): refused.
    let proxy = start(|c| c).await;
    let session = proxy.mint(FP).await;
    let response = proxy
        .openai(
            reqwest::Method::POST,
            "realtime/client_secrets",
            &session.token,
            FP,
        )
        .json(&json!({"session": {"type": "realtime", "model": MODEL}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        crate::support::error_code(response).await,
        "path_not_allowed"
    );
}

/// Pings are answered, and the upstream's close code and reason reach the client.
#[tokio::test]
async fn pings_and_close_codes_are_relayed() {
    let proxy = start(|c| c).await;
    let session = proxy.mint(FP).await;
    let mut socket = connect(&ws_url(&proxy, MODEL), &headers(&session.token)).await;
    next_event(&mut socket).await;
    socket
        .send(Message::Ping(b"are you there"[..].into()))
        .await
        .unwrap();
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Pong(payload) => break payload,
            Message::Text(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(&pong[..], b"are you there");
    send(
        &mut socket,
        json!({"type": "mock.close", "code": 4001, "reason": "upstream says bye"}),
    )
    .await;
    let (code, reason) = closed(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::from(4001), "upstream says bye")
    );
}
