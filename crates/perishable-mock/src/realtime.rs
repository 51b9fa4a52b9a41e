//! `GET /v1/realtime?model=M`: enough of OpenAI's Realtime API over WebSocket (text mode) for
//! tests, the example proxy and the load harness.
//!
//! - On connect: `session.created`, its `session` naming the model, `"max_output_tokens": "inf"`
//!   (`max_response_output_tokens` when the client asked for the beta protocol).
//! - `session.update` → `session.updated` with the updated ceiling.
//! - `conversation.item.create` → `conversation.item.created`; its text counts as input.
//! - `input_audio_buffer.append` / `commit` → `input_audio_buffer.committed`, then a response
//!   the server starts by itself, as server voice activity detection does.
//! - `response.create` → `response.created`, one `response.output_text.delta` per word
//!   (`response.text.delta` in beta; at most the response's or session's ceiling, paced by
//!   [`MockOptions::chunk_interval`](crate::MockOptions::chunk_interval)), `response.done` with
//!   `usage`.
//! - `response.cancel` → the response in progress ends `cancelled`.
//! - `mock.flood` with `count` (and `size`, bytes of padding each) → that many
//!   `response.output_text.delta` events at once (a server that outruns its reader, for
//!   backpressure tests; [`MockUpstream::realtime_sent`](crate::MockUpstream::realtime_sent)
//!   counts what was written).
//! - `mock.close` with `code` and `reason` → the server closes the connection with them.
//! - Anything else that is not JSON with a `type` → an `error` event naming its `event_id`.
//!
//! The handshake is recorded like any request; every client event is recorded too
//! ([`MockUpstream::realtime_events`](crate::MockUpstream::realtime_events)).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{Answer, BadRequest, Inner, RecordedRequest, parse_object, reply_text, unix_now};

/// Serves a Realtime handshake.
pub(crate) async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    if inner.options.record {
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        inner.record(RecordedRequest {
            method: parts.method.clone(),
            path_and_query,
            headers: parts.headers.clone(),
            body: bytes::Bytes::new(),
        });
    }
    if let Some(key) = &inner.options.api_key {
        let expected = format!("Bearer {key}");
        let given = parts.headers.get(header::AUTHORIZATION);
        if given.map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
            return error_response(StatusCode::UNAUTHORIZED, "Incorrect API key provided.");
        }
    }
    let model = parts.uri.query().and_then(|query| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == "model")
            .map(|(_, value)| value.to_owned())
    });
    let Some(model) = model.filter(|m| !m.is_empty()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'model'.",
        );
    };
    let beta = parts
        .headers
        .get("openai-beta")
        .is_some_and(|v| v.as_bytes() == b"realtime=v1");
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &inner).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .protocols(["realtime"])
        .on_upgrade(move |socket| Session::new(inner, model, beta).run(socket))
}

fn error_response(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

/// One connection's state.
struct Session {
    inner: Arc<Inner>,
    model: String,
    beta: bool,
    /// The session's ceiling on output tokens (`None`: `"inf"`).
    ceiling: Option<u64>,
    /// Words of input since the last response.
    input_words: usize,
    /// Text of the last conversation item, echoed by the next response.
    last_said: String,
}

impl Session {
    fn new(inner: Arc<Inner>, model: String, beta: bool) -> Self {
        Self {
            inner,
            model,
            beta,
            ceiling: None,
            input_words: 0,
            last_said: String::new(),
        }
    }

    fn id(&self, prefix: &str) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{prefix}_mock_{n}")
    }

    fn session_json(&self) -> Value {
        let ceiling = self.ceiling.map_or_else(|| json!("inf"), |n| json!(n));
        let field = if self.beta {
            "max_response_output_tokens"
        } else {
            "max_output_tokens"
        };
        json!({
            "id": "sess_mock",
            "object": "realtime.session",
            "type": "realtime",
            "model": self.model,
            "output_modalities": ["text"],
            field: ceiling,
        })
    }

    async fn run(mut self, socket: WebSocket) {
        use futures_util::{SinkExt, StreamExt};
        let (mut sink, mut stream) = socket.split();
        // Events out go through a queue, so a response streams while the next event is read.
        let (out, mut queue) = mpsc::channel::<Message>(16);
        let sent = self.inner.realtime_sent.clone();
        let writer = tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            let _ = sink.close().await;
        });
        let created = json!({"type": "session.created", "event_id": self.id("event"), "session": self.session_json()});
        if send(&out, &created).await.is_err() {
            return;
        }
        // The response in progress, and its cancel flag.
        let mut responding: Option<(tokio::task::JoinHandle<()>, Arc<AtomicBool>)> = None;
        while let Some(Ok(message)) = stream.next().await {
            let text = match message {
                Message::Text(text) => text.to_string(),
                Message::Close(frame) => {
                    let _ = out.send(Message::Close(frame)).await;
                    break;
                }
                Message::Binary(_) => {
                    let _ = send(&out, &self.error(None, "Binary frames are not supported.")).await;
                    continue;
                }
                _ => continue,
            };
            self.inner.record_realtime(text.clone());
            let event: Value = match serde_json::from_str(&text) {
                Ok(event @ Value::Object(_)) => event,
                _ => {
                    let _ = send(&out, &self.error(None, "Invalid JSON.")).await;
                    continue;
                }
            };
            let event_id = event
                .get("event_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            match event
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
            {
                "session.update" => {
                    let session = event.get("session").cloned().unwrap_or_default();
                    for field in ["max_output_tokens", "max_response_output_tokens"] {
                        match session.get(field) {
                            Some(Value::Number(n)) => self.ceiling = n.as_u64(),
                            Some(Value::String(s)) if s == "inf" => self.ceiling = None,
                            _ => {}
                        }
                    }
                    if let Some(model) = session.get("model").and_then(Value::as_str) {
                        self.model = model.to_owned();
                    }
                    let updated = json!({"type": "session.updated", "event_id": self.id("event"), "session": self.session_json()});
                    let _ = send(&out, &updated).await;
                }
                "conversation.item.create" => {
                    let item = event.get("item").cloned().unwrap_or_default();
                    let said = item_text(&item);
                    self.input_words += said.split_whitespace().count();
                    self.last_said = said;
                    let created = json!({"type": "conversation.item.created", "event_id": self.id("event"), "item": item});
                    let _ = send(&out, &created).await;
                }
                "input_audio_buffer.append" => {
                    let audio = event
                        .get("audio")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    // About one token per 100 bytes of base64 audio.
                    self.input_words += audio.len().div_ceil(100);
                }
                "input_audio_buffer.commit" => {
                    let committed = json!({"type": "input_audio_buffer.committed", "event_id": self.id("event"), "item_id": self.id("item")});
                    let _ = send(&out, &committed).await;
                    // Server voice activity detection: a response starts by itself.
                    self.last_said = "(audio)".to_owned();
                    responding = Some(self.respond(&out, None, None));
                }
                "response.create" => {
                    let response = event.get("response").cloned().unwrap_or_default();
                    let mut ceiling = self.ceiling;
                    for field in ["max_output_tokens", "max_response_output_tokens"] {
                        match response.get(field) {
                            Some(Value::Number(n)) => ceiling = n.as_u64(),
                            Some(Value::String(s)) if s == "inf" => ceiling = None,
                            _ => {}
                        }
                    }
                    responding = Some(self.respond(&out, ceiling, event_id));
                }
                "response.cancel" => {
                    if let Some((_, cancelled)) = &responding {
                        cancelled.store(true, Ordering::Relaxed);
                    }
                }
                "mock.flood" => {
                    let count = event.get("count").and_then(Value::as_u64).unwrap_or(0);
                    let size = event.get("size").and_then(Value::as_u64).unwrap_or(0);
                    let padding = "x".repeat(usize::try_from(size).unwrap_or(0).min(1 << 20));
                    let delta = self.delta_type();
                    for i in 0..count {
                        let event = json!({"type": delta, "response_id": "resp_flood", "delta": format!("flood {i} {padding}")});
                        if send(&out, &event).await.is_err() {
                            break;
                        }
                    }
                }
                "mock.close" => {
                    // The server ends the connection with this close code and reason.
                    let code = event.get("code").and_then(Value::as_u64).unwrap_or(1000);
                    let reason = event
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let frame = axum::extract::ws::CloseFrame {
                        code: u16::try_from(code).unwrap_or(1000),
                        reason: reason.into(),
                    };
                    let _ = out.send(Message::Close(Some(frame))).await;
                    break;
                }
                "" => {
                    let _ = send(
                        &out,
                        &self.error(event_id.as_deref(), "Missing required parameter: 'type'."),
                    )
                    .await;
                }
                _ => {}
            }
        }
        if let Some((task, _)) = responding {
            task.abort();
        }
        drop(out);
        let _ = writer.await;
    }

    fn delta_type(&self) -> &'static str {
        if self.beta {
            "response.text.delta"
        } else {
            "response.output_text.delta"
        }
    }

    fn error(&self, about: Option<&str>, message: &str) -> Value {
        json!({
            "type": "error",
            "event_id": self.id("event"),
            "error": {"type": "invalid_request_error", "code": "invalid_value", "message": message, "param": null, "event_id": about},
        })
    }

    /// Streams a response in the background: created, deltas, done with usage.
    fn respond(
        &mut self,
        out: &mpsc::Sender<Message>,
        ceiling: Option<u64>,
        _event_id: Option<String>,
    ) -> (tokio::task::JoinHandle<()>, Arc<AtomicBool>) {
        let cancelled = Arc::new(AtomicBool::new(false));
        let cancel = cancelled.clone();
        let id = self.id("resp");
        let reply = reply_text(&self.last_said);
        let mut words: Vec<String> = reply.split_whitespace().map(|w| format!("{w} ")).collect();
        if let Some(deltas) = self.inner.options.stream_deltas {
            words = (0..deltas)
                .map(|i| words[i % words.len()].clone())
                .collect();
        }
        if let Some(ceiling) = ceiling {
            words.truncate(usize::try_from(ceiling).unwrap_or(usize::MAX));
        }
        let input = std::mem::take(&mut self.input_words).max(1);
        let delta = self.delta_type();
        let interval = self.inner.options.chunk_interval;
        let out = out.clone();
        let created = json!({"type": "response.created", "event_id": self.id("event"), "response": {"id": id, "object": "realtime.response", "status": "in_progress", "output": [], "usage": null}});
        let done_id = self.id("event");
        let delta_ids: Vec<String> = words.iter().map(|_| self.id("event")).collect();
        let task = tokio::spawn(async move {
            if send(&out, &created).await.is_err() {
                return;
            }
            let mut sent = 0;
            for (word, event_id) in words.iter().zip(delta_ids) {
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                sent += 1;
                let event =
                    json!({"type": delta, "event_id": event_id, "response_id": id, "delta": word});
                if send(&out, &event).await.is_err() {
                    return;
                }
            }
            let output = sent;
            let status = if output < words.len() {
                "cancelled"
            } else {
                "completed"
            };
            let done = json!({
                "type": "response.done",
                "event_id": done_id,
                "response": {
                    "id": id,
                    "object": "realtime.response",
                    "status": status,
                    "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": words[..output].concat()}]}],
                    "usage": {
                        "total_tokens": input + output,
                        "input_tokens": input,
                        "output_tokens": output,
                        "input_token_details": {"text_tokens": input, "audio_tokens": 0, "cached_tokens": 0},
                        "output_token_details": {"text_tokens": output, "audio_tokens": 0},
                    },
                },
            });
            let _ = send(&out, &done).await;
        });
        (task, cancelled)
    }
}

/// The text of a conversation item's content parts.
fn item_text(item: &Value) -> String {
    item.get("content")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

async fn send(out: &mpsc::Sender<Message>, event: &Value) -> Result<(), ()> {
    out.send(Message::text(event.to_string()))
        .await
        .map_err(|_| ())
}

/// `POST /v1/realtime/client_secrets`: a secret for a WebRTC session, living
/// `expires_after.seconds` (default 600, at most 7200, at least 10).
pub(crate) fn client_secret(n: u64, body: &[u8]) -> Result<Answer, BadRequest> {
    let request = parse_object(body)?;
    let seconds = request
        .get("expires_after")
        .and_then(|e| e.get("seconds"))
        .and_then(Value::as_u64)
        .unwrap_or(600);
    if !(10..=7200).contains(&seconds) {
        return Err(BadRequest(
            "expires_after.seconds must be between 10 and 7200.",
            Some("expires_after.seconds"),
        ));
    }
    let session = request.get("session").cloned().unwrap_or_else(|| json!({}));
    Ok(Answer::ok(json!({
        "value": format!("ek_mock_{n}"),
        "expires_at": unix_now() + seconds,
        "session": session,
    })))
}
