//! A mock OpenAI-compatible upstream that speaks the real OpenAI wire format.
//!
//! [`MockUpstream`] answers `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/embeddings`, `GET /v1/models` and `GET /v1/models/{id}` with bodies shaped
//! like the real OpenAI API (including `text/event-stream` streaming, one event per body
//! chunk), so the official SDKs can talk to it. It is used by the example proxy when no
//! API key is configured, by the end-to-end tests (it records every request it receives)
//! and by the load harness.
//!
//! Every response carries `x-request-id: req_mock_<n>`, `openai-processing-ms: 1` and a
//! `set-cookie: __mock_session=1; Path=/; HttpOnly` header, so a proxy's header filtering
//! can be observed. Unknown routes answer 404 in the OpenAI error shape.
//!
//! # Example
//!
//! ```
//! use perishable::mock::{MockOptions, MockUpstream};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! // Bind 127.0.0.1 on a free port and serve in the background.
//! let mock = MockUpstream::start(
//!     MockOptions::new()
//!         .chunk_interval(Duration::from_millis(5))
//!         .stream_deltas(3)
//!         .api_key("sk-test"),
//! )
//! .await?;
//! assert!(mock.base_url().starts_with("http://127.0.0.1:"));
//! assert!(mock.base_url().ends_with("/v1"));
//!
//! // Point an OpenAI client (or the proxy) at `mock.base_url()`, then inspect
//! // what it received:
//! assert!(mock.requests().is_empty());
//! assert_eq!(mock.active_streams(), 0);
//!
//! // The same routes can be mounted in-process, without a socket:
//! let _app: axum::Router = mock.router();
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;

/// How many recorded requests are kept; older ones are dropped first.
const MAX_RECORDED: usize = 1000;
/// Largest request body the mock reads.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Dimensions of the mock embedding vectors.
const EMBEDDING_DIMS: usize = 16;
/// `created` timestamp of the listed models.
const MODEL_CREATED: u64 = 1_700_000_000;
/// The models that `GET /v1/models` lists.
const MODELS: &[&str] = &["gpt-4o-mini", "text-embedding-3-small"];
/// Longest excerpt of the user's message echoed back in a reply, in characters.
const ECHO_LIMIT: usize = 200;
/// The final event of every streamed response.
const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Options of a [`MockUpstream`], built with [`MockOptions::new`] and its setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockOptions {
    /// Pause between two events of a streamed response (the first event is sent at once).
    /// Default: 20 ms.
    pub chunk_interval: Duration,
    /// Number of content deltas in a chat or text completion reply, cycling through the
    /// words of the reply. `None` (the default): one delta per word of the reply text.
    pub stream_deltas: Option<usize>,
    /// When set, requests whose `Authorization` header is not exactly `Bearer <key>` are
    /// answered 401 with code `invalid_api_key`. Default: `None` (no check).
    pub api_key: Option<String>,
    /// Record every request (see [`MockUpstream::requests`]). Default: `true`.
    pub record: bool,
    /// Fixed `id`s and `created` times, so two identical requests get byte-identical answers
    /// (to compare what a client receives with and without something in between). Default:
    /// `false`.
    pub deterministic: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            chunk_interval: Duration::from_millis(20),
            stream_deltas: None,
            api_key: None,
            record: true,
            deterministic: false,
        }
    }
}

impl MockOptions {
    /// The default options: 20 ms between events, one delta per word, no API key check,
    /// recording on.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the pause between two events of a streamed response.
    #[must_use]
    pub fn chunk_interval(mut self, interval: Duration) -> Self {
        self.chunk_interval = interval;
        self
    }

    /// Makes every completion reply exactly `deltas` content deltas long.
    #[must_use]
    pub fn stream_deltas(mut self, deltas: usize) -> Self {
        self.stream_deltas = Some(deltas);
        self
    }

    /// Requires `Authorization: Bearer <key>` on every request.
    #[must_use]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Turns request recording on or off.
    #[must_use]
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// Sets [`deterministic`](Self::deterministic).
    #[must_use]
    pub fn deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }
}

/// One request as the mock received it, recorded before it was answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request method.
    pub method: Method,
    /// The path with its query string, e.g. `/v1/chat/completions`.
    pub path_and_query: String,
    /// All request headers.
    pub headers: HeaderMap,
    /// The request body (empty when it could not be read).
    pub body: Bytes,
}

impl RecordedRequest {
    /// The value of header `name`, when present and valid UTF-8.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON, when it is JSON.
    #[must_use]
    pub fn body_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A mock OpenAI-compatible upstream: a cheap, cloneable handle to shared state.
///
/// See the [module documentation](self) for an example.
#[derive(Debug, Clone)]
pub struct MockUpstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: MockOptions,
    addr: OnceLock<SocketAddr>,
    next_id: AtomicU64,
    requests: Mutex<VecDeque<RecordedRequest>>,
    active_streams: AtomicUsize,
    completed_streams: AtomicUsize,
}

impl MockUpstream {
    /// Creates the mock's state; mount [`router`](Self::router) or call
    /// [`serve`](Self::serve) to answer requests, or use [`start`](Self::start) instead.
    #[must_use]
    pub fn new(options: MockOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                options,
                addr: OnceLock::new(),
                next_id: AtomicU64::new(0),
                requests: Mutex::new(VecDeque::new()),
                active_streams: AtomicUsize::new(0),
                completed_streams: AtomicUsize::new(0),
            }),
        }
    }

    /// The mock's routes (all under `/v1`, anything else answers 404), for mounting
    /// in-process.
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&self.inner))
    }

    /// Serves the mock on `listener` (with `TCP_NODELAY` on accepted sockets) until the
    /// process ends. The first listener served becomes [`addr`](Self::addr).
    ///
    /// # Errors
    ///
    /// When the listener's local address cannot be read, or serving fails.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        // Only the first address is kept; serving a second listener is allowed.
        let _ = self.inner.addr.set(local);
        let listener = listener.tap_io(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "mock upstream: could not set TCP_NODELAY");
            }
        });
        axum::serve(listener, self.router()).await
    }

    /// Binds `127.0.0.1` on a free port, serves the mock there on a spawned tokio task and
    /// returns its handle.
    ///
    /// # Errors
    ///
    /// When the port cannot be bound.
    pub async fn start(options: MockOptions) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let mock = Self::new(options);
        let _ = mock.inner.addr.set(listener.local_addr()?);
        let server = mock.clone();
        tokio::spawn(async move {
            if let Err(error) = server.serve(listener).await {
                tracing::error!(%error, "mock upstream stopped");
            }
        });
        Ok(mock)
    }

    /// The address the mock listens on, once started with [`start`](Self::start) or
    /// [`serve`](Self::serve).
    #[must_use]
    pub fn addr(&self) -> Option<SocketAddr> {
        self.inner.addr.get().copied()
    }

    /// The OpenAI base URL of the mock, `http://127.0.0.1:PORT/v1`
    /// (`http://127.0.0.1:0/v1` when it is not listening).
    #[must_use]
    pub fn base_url(&self) -> String {
        match self.addr() {
            Some(addr) => format!("http://{addr}/v1"),
            None => "http://127.0.0.1:0/v1".to_owned(),
        }
    }

    /// A snapshot of the recorded requests, oldest first (the last 1000 are kept).
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.recorded().iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        self.inner.recorded().clear();
    }

    /// Streamed responses whose body is still alive (neither finished nor dropped).
    #[must_use]
    pub fn active_streams(&self) -> usize {
        self.inner.active_streams.load(Ordering::SeqCst)
    }

    /// Streamed responses that sent their final `data: [DONE]` event.
    #[must_use]
    pub fn completed_streams(&self) -> usize {
        self.inner.completed_streams.load(Ordering::SeqCst)
    }
}

impl Inner {
    fn recorded(&self) -> MutexGuard<'_, VecDeque<RecordedRequest>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, request: RecordedRequest) {
        let mut recorded = self.recorded();
        while recorded.len() >= MAX_RECORDED {
            recorded.pop_front();
        }
        recorded.push_back(request);
    }

    /// Records the request, checks the API key and routes it.
    async fn respond(self: &Arc<Self>, n: u64, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, MAX_BODY).await.ok();
        if self.options.record {
            let path_and_query = parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
            self.record(RecordedRequest {
                method: parts.method.clone(),
                path_and_query,
                headers: parts.headers.clone(),
                body: body.clone().unwrap_or_default(),
            });
        }
        if let Some(key) = &self.options.api_key {
            let expected = format!("Bearer {key}");
            let given = parts.headers.get(header::AUTHORIZATION);
            if given.map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
                return openai_error(
                    StatusCode::UNAUTHORIZED,
                    "Incorrect API key provided.",
                    None,
                    Some("invalid_api_key"),
                );
            }
        }
        let Some(body) = body else {
            return openai_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The request body is too large or could not be read.",
                None,
                None,
            );
        };
        let path = parts.uri.path();
        let method = &parts.method;
        if *method == Method::POST {
            match path {
                "/v1/chat/completions" => return self.chat_completions(n, &body),
                "/v1/completions" => return self.completions(n, &body),
                "/v1/embeddings" => return embeddings(&body),
                _ => {}
            }
        } else if *method == Method::GET {
            if path == "/v1/models" {
                return list_models();
            }
            if let Some(id) = path.strip_prefix("/v1/models/")
                && !id.is_empty()
            {
                return get_model(id);
            }
        }
        openai_error(
            StatusCode::NOT_FOUND,
            &format!("Unknown request URL: {method} {path}."),
            None,
            Some("unknown_url"),
        )
    }

    /// `POST /v1/chat/completions`.
    fn chat_completions(self: &Arc<Self>, n: u64, body: &[u8]) -> Response {
        let (request, model) = match parse_request(body) {
            Ok(parsed) => parsed,
            Err(error) => return error.into_response(),
        };
        let Some(messages) = request.get("messages").and_then(Value::as_array) else {
            return invalid_request("Missing required parameter: 'messages'.", Some("messages"));
        };
        let prompt_tokens = messages
            .iter()
            .map(|message| word_count(&content_text(message.get("content"))))
            .sum::<usize>()
            .max(1);
        let last_user = messages
            .iter()
            .rev()
            .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
            .map(|message| content_text(message.get("content")))
            .unwrap_or_default();
        let deltas = self.deltas(&reply_text(&last_user));
        let usage = usage_json(prompt_tokens, deltas.len());
        let (id, created) = self.id_and_created("chatcmpl-mock", n);

        if !wants_stream(&request) {
            let content: String = deltas.concat();
            return Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": usage,
                "system_fingerprint": "fp_mock",
            }))
            .into_response();
        }

        let include_usage = wants_usage(&request);
        let chunk = |delta: Value, finish_reason: Value| {
            let mut chunk = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{
                    "index": 0,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                }],
            });
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            event(&chunk)
        };
        let mut events = Vec::with_capacity(deltas.len() + 4);
        events.push(chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        ));
        for delta in &deltas {
            events.push(chunk(json!({ "content": delta }), Value::Null));
        }
        events.push(chunk(json!({}), json!("stop")));
        if include_usage {
            events.push(event(&json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [],
                "usage": usage,
            })));
        }
        events.push(Bytes::from_static(DONE_EVENT));
        self.stream_response(events)
    }

    /// `POST /v1/completions` (legacy text completions).
    fn completions(self: &Arc<Self>, n: u64, body: &[u8]) -> Response {
        let (request, model) = match parse_request(body) {
            Ok(parsed) => parsed,
            Err(error) => return error.into_response(),
        };
        let prompt = match request.get("prompt") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(items)) => items.iter().map(input_text).collect::<Vec<_>>().join(" "),
            Some(other) => input_text(other),
        };
        let deltas = self.deltas(&reply_text(&prompt));
        let usage = usage_json(word_count(&prompt).max(1), deltas.len());
        let (id, created) = self.id_and_created("cmpl-mock", n);

        if !wants_stream(&request) {
            let text: String = deltas.concat();
            return Json(json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{
                    "text": text,
                    "index": 0,
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": usage,
            }))
            .into_response();
        }

        let include_usage = wants_usage(&request);
        let chunk = |text: &str, finish_reason: Value| {
            let mut chunk = json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{
                    "text": text,
                    "index": 0,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                }],
            });
            if include_usage {
                chunk["usage"] = Value::Null;
            }
            event(&chunk)
        };
        let mut events = Vec::with_capacity(deltas.len() + 3);
        for delta in &deltas {
            events.push(chunk(delta, Value::Null));
        }
        events.push(chunk("", json!("stop")));
        if include_usage {
            events.push(event(&json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            })));
        }
        events.push(Bytes::from_static(DONE_EVENT));
        self.stream_response(events)
    }

    /// Splits a reply into content deltas whose concatenation is the reply text: one per
    /// word, or exactly `stream_deltas` cycling through the words.
    /// A response id and `created` time: fixed when the mock is deterministic.
    fn id_and_created(&self, prefix: &str, n: u64) -> (String, u64) {
        if self.options.deterministic {
            (prefix.to_owned(), FIXED_CREATED)
        } else {
            (format!("{prefix}-{n}"), unix_now())
        }
    }

    fn deltas(&self, reply: &str) -> Vec<String> {
        let words: Vec<&str> = reply.split_whitespace().collect();
        let count = self.options.stream_deltas.unwrap_or(words.len());
        if words.is_empty() {
            return Vec::new();
        }
        (0..count)
            .map(|i| {
                let word = words[i % words.len()];
                if i + 1 < count {
                    format!("{word} ")
                } else {
                    word.to_owned()
                }
            })
            .collect()
    }

    /// A `text/event-stream` response that sends `events` one body chunk at a time.
    fn stream_response(self: &Arc<Self>, events: Vec<Bytes>) -> Response {
        let stream = EventStream::new(Arc::clone(self), events);
        let mut response = Response::new(Body::from_stream(stream));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

/// The single handler: every request goes through it, so every one is recorded and
/// carries the mock's headers.
async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let n = inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let mut response = inner.respond(n, request).await;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("req_mock_{n}")) {
        headers.insert("x-request-id", value);
    }
    headers.append(
        header::SET_COOKIE,
        HeaderValue::from_static("__mock_session=1; Path=/; HttpOnly"),
    );
    headers.insert("openai-processing-ms", HeaderValue::from_static("1"));
    response
}

/// Streams pre-rendered SSE events, pausing `chunk_interval` between two of them. Dropping
/// it (the client went away) drops its guard, which updates the active-stream count.
struct EventStream {
    events: std::vec::IntoIter<Bytes>,
    interval: Duration,
    pause: Pin<Box<Sleep>>,
    pausing: bool,
    guard: StreamGuard,
}

struct StreamGuard {
    inner: Arc<Inner>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.inner.active_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EventStream {
    fn new(inner: Arc<Inner>, events: Vec<Bytes>) -> Self {
        inner.active_streams.fetch_add(1, Ordering::SeqCst);
        Self {
            events: events.into_iter(),
            interval: inner.options.chunk_interval,
            pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
            pausing: false,
            guard: StreamGuard { inner },
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.pausing {
            if this.pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pausing = false;
        }
        let Some(event) = this.events.next() else {
            return Poll::Ready(None);
        };
        if this.events.as_slice().is_empty() {
            this.guard
                .inner
                .completed_streams
                .fetch_add(1, Ordering::SeqCst);
        } else if !this.interval.is_zero() {
            this.pause.as_mut().reset(Instant::now() + this.interval);
            this.pausing = true;
        }
        Poll::Ready(Some(Ok(event)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.events.size_hint()
    }
}

/// `POST /v1/embeddings`.
fn embeddings(body: &[u8]) -> Response {
    let (request, model) = match parse_request(body) {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    // Each input as (text to hash, token count).
    let inputs: Option<Vec<(String, usize)>> = match request.get("input") {
        Some(Value::String(text)) => Some(vec![(text.clone(), word_count(text))]),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                Some(vec![(
                    input_text(&Value::Array(items.clone())),
                    items.len(),
                )])
            } else {
                items
                    .iter()
                    .map(|item| match item {
                        Value::String(text) => Some((text.clone(), word_count(text))),
                        Value::Array(tokens) if tokens.iter().all(Value::is_number) => {
                            Some((input_text(item), tokens.len()))
                        }
                        _ => None,
                    })
                    .collect()
            }
        }
        _ => None,
    };
    let Some(inputs) = inputs else {
        return invalid_request(
            "'input' must be a string, an array of strings or an array of token arrays.",
            Some("input"),
        );
    };
    let base64 = match request.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(_) => {
            return invalid_request(
                "'encoding_format' must be 'float' or 'base64'.",
                Some("encoding_format"),
            );
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, (text, _))| {
            let vector = embed(text);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = inputs
        .iter()
        .map(|(_, tokens)| tokens)
        .sum::<usize>()
        .max(1);
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// `GET /v1/models`.
fn list_models() -> Response {
    let data: Vec<Value> = MODELS.iter().map(|id| model_json(id)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`.
fn get_model(id: &str) -> Response {
    if MODELS.contains(&id) {
        Json(model_json(id)).into_response()
    } else {
        openai_error(
            StatusCode::NOT_FOUND,
            &format!("The model '{id}' does not exist or you do not have access to it."),
            Some("model"),
            Some("model_not_found"),
        )
    }
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": MODEL_CREATED, "owned_by": "perishable-mock"})
}

/// A deterministic unit vector derived from an FNV-1a hash of `text`.
fn embed(text: &str) -> [f32; EMBEDDING_DIMS] {
    let mut state = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut vector = [0.0_f32; EMBEDDING_DIMS];
    for value in &mut vector {
        // splitmix64 step
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 24 random bits mapped to [-1, 1).
        *value = ((z >> 40) as f32 / (1_u32 << 23) as f32) - 1.0;
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > f32::EPSILON {
        for value in &mut vector {
            *value /= norm;
        }
    } else {
        vector = [0.0; EMBEDDING_DIMS];
        vector[0] = 1.0;
    }
    vector
}

/// Why a request body was refused: the error message and the offending parameter.
struct BadRequest(&'static str, Option<&'static str>);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        invalid_request(self.0, self.1)
    }
}

/// Parses a JSON object body with a non-empty string `model`.
fn parse_request(body: &[u8]) -> Result<(Value, String), BadRequest> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return Err(BadRequest(
                "We could not parse the JSON body of your request. The OpenAI API expects a JSON object.",
                None,
            ));
        }
    };
    match request.get("model").and_then(Value::as_str) {
        Some(model) if !model.is_empty() => {
            let model = model.to_owned();
            Ok((request, model))
        }
        _ => Err(BadRequest(
            "You must provide a model parameter.",
            Some("model"),
        )),
    }
}

fn wants_stream(request: &Value) -> bool {
    request.get("stream").and_then(Value::as_bool) == Some(true)
}

fn wants_usage(request: &Value) -> bool {
    request
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// The text of a message `content`: a string, or the joined texts of its text parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| match part {
                Value::String(text) => Some(text.as_str()),
                Value::Object(_) if part.get("type").and_then(Value::as_str) == Some("text") => {
                    part.get("text").and_then(Value::as_str)
                }
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The text of a prompt or embedding input: a string as is, token arrays as their numbers.
fn input_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(items) => items.iter().map(input_text).collect::<Vec<_>>().join(" "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn reply_text(said: &str) -> String {
    let said: String = said.chars().take(ECHO_LIMIT).collect();
    format!("You said: {said}. This is the Perishable mock upstream, streaming one word at a time.")
}

fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The `created` time of deterministic answers.
const FIXED_CREATED: u64 = 1_700_000_000;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn invalid_request(message: &str, param: Option<&str>) -> Response {
    openai_error(StatusCode::BAD_REQUEST, message, param, None)
}

/// An error in the OpenAI shape: `{"error":{"message","type","param","code"}}`.
fn openai_error(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = json!({
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    });
    (status, Json(body)).into_response()
}
