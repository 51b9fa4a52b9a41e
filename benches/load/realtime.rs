//! The Realtime scenario: latency added per frame, and memory per open connection.
//!
//! - Latency: one WebSocket straight to the mock (`/v1/realtime`) and one through the Perishable
//!   proxy (`/openai/realtime`), used alternately, round by round. A round trip is one
//!   `conversation.item.create` out and its `conversation.item.created` back: two frames through
//!   the proxy. The added latency per round trip is the proxy's p50 (p99) minus the direct one.
//! - Memory: `n` connections opened through the proxy, each waiting for its `session.created`;
//!   the proxy's RSS growth divided by `n`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::stats::{Dist, r1};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const MODEL: &str = "gpt-realtime";

async fn connect(url: &str, headers: &HeaderMap) -> Result<Socket, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    for (name, value) in headers {
        request.headers_mut().append(name, value.clone());
    }
    // TCP_NODELAY, as every other socket of the harness.
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .map_err(|e| e.to_string())?;
    // Wait for session.created.
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("session.created") => {
                return Ok(socket);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before session.created".to_owned()),
        }
    }
}

/// One round trip: an item out, its `conversation.item.created` back; the time in ns.
async fn round_trip(socket: &mut Socket, event: &str) -> i64 {
    let started = Instant::now();
    socket
        .send(Message::text(event.to_owned()))
        .await
        .expect("send");
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("conversation.item.created") => break,
            Some(Ok(_)) => {}
            other => panic!("the Realtime connection ended: {other:?}"),
        }
    }
    i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX)
}

/// Latency per round trip: direct, through the bare relay at `bare`, and through the proxy at
/// `proxy` (with `headers`).
pub async fn latency(
    mock: SocketAddr,
    bare: SocketAddr,
    proxy: SocketAddr,
    headers: &HeaderMap,
    rounds: usize,
    per_round: usize,
) -> Value {
    let mut direct = connect(
        &format!("ws://{mock}/v1/realtime?model={MODEL}"),
        &HeaderMap::new(),
    )
    .await
    .expect("connect to the mock");
    let mut relayed = connect(
        &format!("ws://{bare}/openai/realtime?model={MODEL}"),
        &HeaderMap::new(),
    )
    .await
    .expect("connect through the bare relay");
    let mut through = connect(
        &format!("ws://{proxy}/openai/realtime?model={MODEL}"),
        headers,
    )
    .await
    .expect("connect through the proxy");
    let event = json!({"type": "conversation.item.create", "item": {"type": "message",
        "role": "user", "content": [{"type": "input_text", "text": "ping"}]}})
    .to_string();
    // Warm-up.
    for _ in 0..50 {
        round_trip(&mut direct, &event).await;
        round_trip(&mut relayed, &event).await;
        round_trip(&mut through, &event).await;
    }
    let mut direct_ns = Vec::new();
    let mut relayed_ns = Vec::new();
    let mut through_ns = Vec::new();
    for round in 0..rounds {
        // The order rotates round by round.
        for which in 0..3 {
            for _ in 0..per_round {
                match (which + round) % 3 {
                    0 => direct_ns.push(round_trip(&mut direct, &event).await),
                    1 => relayed_ns.push(round_trip(&mut relayed, &event).await),
                    _ => through_ns.push(round_trip(&mut through, &event).await),
                }
            }
        }
    }
    let direct = Dist::new(direct_ns);
    let relayed = Dist::new(relayed_ns);
    let through = Dist::new(through_ns);
    json!({
        "round_trips": rounds * per_round,
        "direct_p50_us": r1(direct.p50_us()),
        "direct_p99_us": r1(direct.p99_us()),
        "bare_p50_us": r1(relayed.p50_us()),
        "bare_p99_us": r1(relayed.p99_us()),
        "perishable_p50_us": r1(through.p50_us()),
        "perishable_p99_us": r1(through.p99_us()),
        "added_p50_us": r1(through.p50_us() - direct.p50_us()),
        "added_p99_us": r1(through.p99_us() - direct.p99_us()),
        "added_over_bare_p50_us": r1(through.p50_us() - relayed.p50_us()),
        "added_over_bare_p99_us": r1(through.p99_us() - relayed.p99_us()),
    })
}

/// Memory per open connection through the proxy (process `pid`), at `n` connections.
pub async fn memory(proxy: SocketAddr, pid: u32, headers: &HeaderMap, n: usize) -> Value {
    let url = format!("ws://{proxy}/openai/realtime?model={MODEL}");
    // Warm the process: a few connections opened and closed.
    for _ in 0..4 {
        if let Ok(mut socket) = connect(&url, headers).await {
            let _ = socket.close(None).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_rss = crate::rss_kb(pid);
    let started = Instant::now();
    let mut open = Vec::with_capacity(n);
    let mut errors = 0usize;
    let mut first_error = String::new();
    let batch = 100;
    let mut i = 0;
    while i < n {
        let mut set = tokio::task::JoinSet::new();
        for _ in i..(i + batch).min(n) {
            let url = url.clone();
            let headers = headers.clone();
            set.spawn_local(async move { connect(&url, &headers).await });
        }
        while let Some(result) = set.join_next().await {
            match result.expect("connect task") {
                Ok(socket) => open.push(socket),
                Err(e) => {
                    errors += 1;
                    if first_error.is_empty() {
                        first_error = e;
                    }
                }
            }
        }
        i += batch;
    }
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = crate::rss_kb(pid);
    let opened = open.len();
    for mut socket in open {
        let _ = socket.close(None).await;
    }
    let per_connection = if opened > 0 {
        rss.saturating_sub(base_rss) as f64 / opened as f64
    } else {
        0.0
    };
    json!({
        "connections": n,
        "opened": opened,
        "open_secs": r1(open_secs),
        "base_rss_kb": base_rss,
        "rss_kb": rss,
        "rss_kb_per_connection": r1(per_connection),
        "errors": errors,
        "first_error": first_error,
    })
}
