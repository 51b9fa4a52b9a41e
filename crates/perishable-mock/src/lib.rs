#![cfg_attr(docsrs, feature(doc_cfg))]
//! A mock OpenAI-compatible upstream that speaks the real OpenAI wire format.
//!
//! [`MockUpstream`] answers these routes with bodies shaped like the real OpenAI API
//! (including `text/event-stream` streaming, one event per body chunk), so the official
//! SDKs can talk to it:
//!
//! - `POST /v1/chat/completions` and `POST /v1/completions` (legacy text completions),
//!   streamed or not, with `n` choices (billed for `best_of` when larger) and
//!   `stream_options.include_usage`;
//! - `POST /v1/responses` (the Responses API), streamed (named `response.*` events) or not;
//! - `POST /v1/embeddings`;
//! - `POST /v1/moderations` (no usage, like the real API);
//! - `GET /v1/models` and `GET /v1/models/{id}`;
//! - `POST /v1/realtime/client_secrets` (an `ek_mock_<n>` secret for WebRTC);
//! - `GET /v1/realtime?model=M` upgraded to a WebSocket: the Realtime API in text mode
//!   (session events, `response.create` streamed as text deltas, `response.done` with usage;
//!   see [`realtime_events`](MockUpstream::realtime_events)).
//!
//! It is used by the example proxy when no API key is configured, by the end-to-end tests
//! (it records every request it receives) and by the load harness.
//!
//! Every response carries `x-request-id: req_mock_<n>`, `openai-processing-ms: 1` and a
//! `set-cookie: __mock_session=1; Path=/; HttpOnly` header, so a proxy's header filtering
//! can be observed. Unknown routes answer 404 in the OpenAI error shape.
//!
//! A proxy that reads `usage` must cope with every form a real OpenAI-compatible server
//! sends, so [`MockOptions`] can also make the mock speak the variants seen in the wild
//! (the defaults are OpenAI's own):
//!
//! - [`json_style`](MockOptions::json_style): compact JSON, Python's `json.dumps` spelling
//!   or pretty-printed JSON (over several `data:` lines in a stream);
//! - [`line_ending`](MockOptions::line_ending): `\n`, `\r\n` or `\r` in event streams;
//! - [`usage_placement`](MockOptions::usage_placement): where a streamed `usage` goes (a
//!   separate chunk, the last choice chunk, or a running total on every chunk);
//! - [`gzip`](MockOptions::gzip): gzip bodies and streams, when asked or always;
//! - [`padding_bytes`](MockOptions::padding_bytes): bytes after `usage` in a JSON answer.
//!
//! # Example
//!
//! ```
//! use perishable_mock::{MockOptions, MockUpstream};
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
//!
//! A server that spells its stream like a Python one, with `\r\n` line ends and the usage
//! on the chunk that finishes the choice:
//!
//! ```
//! use perishable_mock::{JsonStyle, LineEnding, MockOptions, MockUpstream, UsagePlacement};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mock = MockUpstream::start(
//!     MockOptions::new()
//!         .chunk_interval(Duration::ZERO)
//!         .stream_deltas(2)
//!         .json_style(JsonStyle::Python)
//!         .line_ending(LineEnding::CrLf)
//!         .usage_placement(UsagePlacement::FinalChoiceChunk),
//! )
//! .await?;
//! let body = reqwest::Client::new()
//!     .post(format!("{}/chat/completions", mock.base_url()))
//!     .body(
//!         r#"{"model": "gpt-4o-mini", "stream": true,
//!             "stream_options": {"include_usage": true},
//!             "messages": [{"role": "user", "content": "hi"}]}"#,
//!     )
//!     .send()
//!     .await?
//!     .text()
//!     .await?;
//! let events: Vec<&str> = body.split_terminator("\r\n\r\n").collect();
//! assert_eq!(events.last(), Some(&"data: [DONE]"));
//! let last_chunk = events[events.len() - 2];
//! assert!(last_chunk.contains(r#""finish_reason": "stop""#));
//! assert!(last_chunk.contains(
//!     r#""usage": {"completion_tokens": 2, "prompt_tokens": 1, "total_tokens": 3}"#
//! ));
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod realtime;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::serve::ListenerExt;
use base64::Engine as _;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value, json};
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
/// Largest `n` of a completion request, as with OpenAI.
const MAX_CHOICES: u64 = 128;
/// Largest `best_of` of a completion request, as with OpenAI.
const MAX_BEST_OF: u64 = 20;
/// The model a moderation answer names when the request named none.
const MODERATION_MODEL: &str = "omni-moderation-latest";
/// The categories of a moderation result, as the omni models list them.
const MODERATION_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// How the mock spells JSON: every JSON body and the data of every streamed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum JsonStyle {
    /// No whitespace at all, `{"a":1,"b":["é"]}`, as OpenAI sends it. The default.
    #[default]
    Compact,
    /// Python's `json.dumps` defaults, as Python servers send it: `", "` and `": "` between
    /// members, and every character outside printable ASCII escaped as `\uXXXX`
    /// (`ensure_ascii=True`; UTF-16 surrogate pairs above U+FFFF), so
    /// `{"a": 1, "b": ["\u00e9"]}`. Numbers keep Rust's shortest spelling.
    Python,
    /// Multi-line and indented by two spaces. In an event stream each line goes on its own
    /// `data:` line: a reader joins them with `\n`, which is JSON whitespace.
    Pretty,
}

/// The line end of event streams: after every line, and the blank line ending each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LineEnding {
    /// `\n`, as OpenAI sends it. The default.
    #[default]
    Lf,
    /// `\r\n`.
    CrLf,
    /// `\r` alone, which the event-stream grammar allows too.
    Cr,
}

impl LineEnding {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Self::Lf => b"\n",
            Self::CrLf => b"\r\n",
            Self::Cr => b"\r",
        }
    }
}

/// Where a streamed chat or text completion puts its `usage` when the request asked for it
/// (`stream_options.include_usage: true`). A request that did not ask gets no usage in any
/// placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UsagePlacement {
    /// As OpenAI: every chunk has `"usage": null`, and a last chunk before `[DONE]` has
    /// `"choices": []` and the usage object. The default.
    #[default]
    SeparateChunk,
    /// As some compatible servers: no `null` members; the usage object rides on the last
    /// chunk, the one whose choice has a `finish_reason`. No usage-only chunk.
    FinalChoiceChunk,
    /// As vLLM's `continuous_usage_stats`: every chunk carries a running usage object (the
    /// completion tokens sent so far); the last chunk's is the total. No usage-only chunk.
    EveryChunk,
}

/// When the mock gzips its answers (`Content-Encoding: gzip`), JSON bodies and event
/// streams alike. A stream is one gzip stream, sync-flushed after each event, so every body
/// chunk still carries exactly one event that decodes as soon as it arrives; the last chunk
/// carries the gzip trailer too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Gzip {
    /// Never: plain bodies whatever the request accepts. The default.
    #[default]
    Never,
    /// When the request's `Accept-Encoding` accepts gzip (`gzip`, `x-gzip` or `*` with a
    /// non-zero quality), as many real servers do.
    WhenAccepted,
    /// Always, even to `Accept-Encoding: identity`: an upstream that ignores the header.
    Always,
}

/// Options of a [`MockUpstream`], built with [`MockOptions::new`] and its setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockOptions {
    /// Pause between two events of a streamed response (the first event is sent at once).
    /// Default: 20 ms.
    pub chunk_interval: Duration,
    /// Number of content deltas in a chat, text completion or Responses reply, cycling
    /// through the words of the reply. `None` (the default): one delta per word of the
    /// reply text.
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
    /// How JSON bodies and event data are spelled. Default: [`JsonStyle::Compact`].
    pub json_style: JsonStyle,
    /// The line end of event streams. Default: [`LineEnding::Lf`].
    pub line_ending: LineEnding,
    /// Where a streamed completion puts the usage it was asked for. Default:
    /// [`UsagePlacement::SeparateChunk`].
    pub usage_placement: UsagePlacement,
    /// When answers are gzipped. Default: [`Gzip::Never`].
    pub gzip: Gzip,
    /// When non-zero, every non-streamed answer that carries `usage` (chat and text
    /// completions, embeddings, responses) ends with a top-level
    /// `"metadata": {"padding": "xxx…"}` member of that many `x`s, after `usage`: the usage
    /// is then more than this many bytes before the end of the body, so a reader that only
    /// looks at the body's tail (say its last 8 KiB) misses it. A Responses object's own
    /// `metadata` gets the `padding` member. Default: 0 (no padding).
    pub padding_bytes: usize,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            chunk_interval: Duration::from_millis(20),
            stream_deltas: None,
            api_key: None,
            record: true,
            deterministic: false,
            json_style: JsonStyle::default(),
            line_ending: LineEnding::default(),
            usage_placement: UsagePlacement::default(),
            gzip: Gzip::default(),
            padding_bytes: 0,
        }
    }
}

impl MockOptions {
    /// The default options: 20 ms between events, one delta per word, no API key check,
    /// recording on, and OpenAI's own spelling (compact JSON, `\n` line ends, a separate
    /// usage chunk, no gzip, no padding).
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

    /// Sets [`json_style`](Self::json_style).
    #[must_use]
    pub fn json_style(mut self, style: JsonStyle) -> Self {
        self.json_style = style;
        self
    }

    /// Sets [`line_ending`](Self::line_ending).
    #[must_use]
    pub fn line_ending(mut self, line_ending: LineEnding) -> Self {
        self.line_ending = line_ending;
        self
    }

    /// Sets [`usage_placement`](Self::usage_placement).
    #[must_use]
    pub fn usage_placement(mut self, placement: UsagePlacement) -> Self {
        self.usage_placement = placement;
        self
    }

    /// Sets [`gzip`](Self::gzip).
    #[must_use]
    pub fn gzip(mut self, gzip: Gzip) -> Self {
        self.gzip = gzip;
        self
    }

    /// Sets [`padding_bytes`](Self::padding_bytes).
    #[must_use]
    pub fn padding_bytes(mut self, bytes: usize) -> Self {
        self.padding_bytes = bytes;
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
    realtime_events: Mutex<VecDeque<String>>,
    realtime_sent: Arc<AtomicU64>,
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
                realtime_events: Mutex::new(VecDeque::new()),
                realtime_sent: Arc::new(AtomicU64::new(0)),
                active_streams: AtomicUsize::new(0),
                completed_streams: AtomicUsize::new(0),
            }),
        }
    }

    /// The mock's routes (all under `/v1`, anything else answers 404), for mounting
    /// in-process.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/realtime", axum::routing::get(realtime::handle))
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

    /// Forgets the recorded requests and Realtime events.
    pub fn clear(&self) {
        self.inner.recorded().clear();
        self.inner
            .realtime_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Realtime server events written to a socket so far, over every connection (a write
    /// waits while the peer does not read: this stalls under backpressure).
    #[must_use]
    pub fn realtime_sent(&self) -> u64 {
        self.inner.realtime_sent.load(Ordering::Relaxed)
    }

    /// The Realtime client events received so far over every connection, oldest first, as
    /// their text (the last 1000 are kept; none when recording is off). The handshakes are in
    /// [`requests`](Self::requests).
    #[must_use]
    pub fn realtime_events(&self) -> Vec<String> {
        self.inner
            .realtime_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Streamed responses whose body is still alive (neither finished nor dropped).
    #[must_use]
    pub fn active_streams(&self) -> usize {
        self.inner.active_streams.load(Ordering::SeqCst)
    }

    /// Streamed responses that sent their last event (`data: [DONE]`, or
    /// `response.completed` for the Responses API).
    #[must_use]
    pub fn completed_streams(&self) -> usize {
        self.inner.completed_streams.load(Ordering::SeqCst)
    }
}

impl Inner {
    fn recorded(&self) -> MutexGuard<'_, VecDeque<RecordedRequest>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record_realtime(&self, event: String) {
        if !self.options.record {
            return;
        }
        let mut recorded = self
            .realtime_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while recorded.len() >= MAX_RECORDED {
            recorded.pop_front();
        }
        recorded.push_back(event);
    }

    fn record(&self, request: RecordedRequest) {
        let mut recorded = self.recorded();
        while recorded.len() >= MAX_RECORDED {
            recorded.pop_front();
        }
        recorded.push_back(request);
    }

    /// Records the request, checks the API key and routes it.
    async fn respond(self: &Arc<Self>, n: u64, request: Request) -> Answer {
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
            let answer = match path {
                "/v1/chat/completions" => Some(self.chat_completions(n, &body)),
                "/v1/completions" => Some(self.completions(n, &body)),
                "/v1/responses" => Some(self.responses(n, &body)),
                "/v1/embeddings" => Some(embeddings(&body)),
                "/v1/moderations" => Some(self.moderations(n, &body)),
                "/v1/realtime/client_secrets" => Some(realtime::client_secret(n, &body)),
                _ => None,
            };
            if let Some(answer) = answer {
                return answer.unwrap_or_else(Answer::from);
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
    fn chat_completions(&self, n: u64, body: &[u8]) -> Result<Answer, BadRequest> {
        let (request, model) = parse_request(body)?;
        let Some(messages) = request.get("messages").and_then(Value::as_array) else {
            return Err(BadRequest(
                "Missing required parameter: 'messages'.",
                Some("messages"),
            ));
        };
        let choices = Choices::of(&request)?;
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
        // The real API bills every generated choice: `best_of` of them when it is larger.
        let completion_tokens = deltas.len() * choices.billed;
        let (id, created) = self.id_and_created("chatcmpl-mock", n);

        if !wants_stream(&request) {
            let content: String = deltas.concat();
            let choices: Vec<Value> = (0..choices.n)
                .map(|index| {
                    json!({
                        "index": index,
                        "message": {"role": "assistant", "content": content, "refusal": null},
                        "logprobs": null,
                        "finish_reason": "stop",
                    })
                })
                .collect();
            return Ok(Answer::ok(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage_json(prompt_tokens, completion_tokens),
                "system_fingerprint": "fp_mock",
            })));
        }

        let base = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
        });
        let usage = wants_usage(&request).then_some((prompt_tokens, completion_tokens));
        let events =
            self.completion_events(&base, choices.n, true, &deltas, usage, |index, piece| {
                let (delta, finish_reason) = match piece {
                    Piece::Role => (json!({"role": "assistant", "content": ""}), Value::Null),
                    Piece::Text(text) => (json!({ "content": text }), Value::Null),
                    Piece::Finish => (json!({}), json!("stop")),
                };
                json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                })
            });
        Ok(Answer::Stream(events))
    }

    /// `POST /v1/completions` (legacy text completions).
    fn completions(&self, n: u64, body: &[u8]) -> Result<Answer, BadRequest> {
        let (request, model) = parse_request(body)?;
        let choices = Choices::of(&request)?;
        let prompt = match request.get("prompt") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(items)) => items.iter().map(input_text).collect::<Vec<_>>().join(" "),
            Some(other) => input_text(other),
        };
        let deltas = self.deltas(&reply_text(&prompt));
        let prompt_tokens = word_count(&prompt).max(1);
        let completion_tokens = deltas.len() * choices.billed;
        let (id, created) = self.id_and_created("cmpl-mock", n);

        if !wants_stream(&request) {
            let text: String = deltas.concat();
            let choices: Vec<Value> = (0..choices.n)
                .map(|index| {
                    json!({
                        "text": text,
                        "index": index,
                        "logprobs": null,
                        "finish_reason": "stop",
                    })
                })
                .collect();
            return Ok(Answer::ok(json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage_json(prompt_tokens, completion_tokens),
            })));
        }

        let base = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
        });
        let usage = wants_usage(&request).then_some((prompt_tokens, completion_tokens));
        let events =
            self.completion_events(&base, choices.n, false, &deltas, usage, |index, piece| {
                let (text, finish_reason) = match piece {
                    Piece::Role => ("", Value::Null),
                    Piece::Text(text) => (text, Value::Null),
                    Piece::Finish => ("", json!("stop")),
                };
                json!({
                    "text": text,
                    "index": index,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                })
            });
        Ok(Answer::Stream(events))
    }

    /// The events of a streamed chat or text completion: for each step (the role when
    /// `role_first`, each delta, the finish), one chunk per choice, interleaved as OpenAI
    /// does; the usage (prompt, completion tokens) where the options place it, when the
    /// request asked for it; then `[DONE]`. `choice` renders one choice of a chunk.
    fn completion_events(
        &self,
        base: &Value,
        choices: usize,
        role_first: bool,
        deltas: &[String],
        usage: Option<(usize, usize)>,
        choice: impl Fn(usize, Piece<'_>) -> Value,
    ) -> Vec<SseEvent> {
        let mut steps: Vec<Piece<'_>> = Vec::with_capacity(deltas.len() + 2);
        if role_first {
            steps.push(Piece::Role);
        }
        steps.extend(deltas.iter().map(|delta| Piece::Text(delta)));
        steps.push(Piece::Finish);
        let pieces: Vec<(usize, Piece<'_>)> = steps
            .into_iter()
            .flat_map(|piece| (0..choices).map(move |index| (index, piece)))
            .collect();
        let placement = self.options.usage_placement;
        let last = pieces.len().saturating_sub(1);
        let mut sent = 0;
        let mut events = Vec::with_capacity(pieces.len() + 2);
        for (step, (index, piece)) in pieces.into_iter().enumerate() {
            if let Piece::Text(_) = piece {
                sent += 1;
            }
            let mut chunk = base.clone();
            chunk["choices"] = json!([choice(index, piece)]);
            if let Some((prompt_tokens, completion_tokens)) = usage {
                let member = match placement {
                    UsagePlacement::SeparateChunk => Some(Value::Null),
                    UsagePlacement::FinalChoiceChunk => {
                        (step == last).then(|| usage_json(prompt_tokens, completion_tokens))
                    }
                    // A running total; the last chunk's is the billed total, which counts
                    // the `best_of` choices never sent too.
                    UsagePlacement::EveryChunk => Some(usage_json(
                        prompt_tokens,
                        if step == last {
                            completion_tokens
                        } else {
                            sent
                        },
                    )),
                };
                if let Some(member) = member {
                    chunk["usage"] = member;
                }
            }
            events.push(SseEvent::Data(None, chunk));
        }
        if let Some((prompt_tokens, completion_tokens)) = usage
            && placement == UsagePlacement::SeparateChunk
        {
            let mut chunk = base.clone();
            chunk["choices"] = json!([]);
            chunk["usage"] = usage_json(prompt_tokens, completion_tokens);
            events.push(SseEvent::Data(None, chunk));
        }
        events.push(SseEvent::Done);
        events
    }

    /// `POST /v1/responses` (the Responses API): a `response` object with one message, or
    /// when streamed the named `response.*` events the official SDKs expect, each numbered
    /// by `sequence_number`, the usage in the last one (`response.completed`); no `[DONE]`.
    fn responses(&self, n: u64, body: &[u8]) -> Result<Answer, BadRequest> {
        let (request, model) = parse_request(body)?;
        let instructions = match request.get("instructions") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(_) => {
                return Err(BadRequest(
                    "'instructions' must be a string.",
                    Some("instructions"),
                ));
            }
        };
        // The input as (role, text) messages.
        let messages: Vec<(String, String)> = match request.get("input") {
            Some(Value::String(text)) => vec![("user".to_owned(), text.clone())],
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => ("user".to_owned(), text.clone()),
                    _ => (
                        item.get("role")
                            .and_then(Value::as_str)
                            .unwrap_or("user")
                            .to_owned(),
                        content_text(item.get("content")),
                    ),
                })
                .collect(),
            _ => {
                return Err(BadRequest(
                    "Missing required parameter: 'input'.",
                    Some("input"),
                ));
            }
        };
        let input_tokens = (instructions.as_deref().map_or(0, word_count)
            + messages
                .iter()
                .map(|(_, text)| word_count(text))
                .sum::<usize>())
        .max(1);
        let last_user = messages
            .iter()
            .rev()
            .find(|(role, _)| role == "user")
            .map(|(_, text)| text.as_str())
            .unwrap_or_default();
        let deltas = self.deltas(&reply_text(last_user));
        let text: String = deltas.concat();
        let usage = json!({
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": deltas.len(),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + deltas.len(),
        });
        let (id, created) = self.id_and_created("resp_mock", n);
        let (item_id, _) = self.id_and_created("msg_mock", n);
        let response = |status: &str, output: Value, usage: Value| {
            json!({
                "id": id,
                "object": "response",
                "created_at": created,
                "status": status,
                "background": false,
                "error": null,
                "incomplete_details": null,
                "instructions": instructions,
                "max_output_tokens": null,
                "model": model,
                "output": output,
                "parallel_tool_calls": true,
                "previous_response_id": null,
                "reasoning": {"effort": null, "summary": null},
                "store": true,
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage,
                "user": null,
                "metadata": {},
            })
        };
        let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        let message = |status: &str, content: Value| {
            json!({
                "type": "message",
                "id": item_id,
                "status": status,
                "role": "assistant",
                "content": content,
            })
        };
        let done_message = message("completed", json!([part(&text)]));
        let completed = response("completed", json!([done_message]), usage);

        if !wants_stream(&request) {
            return Ok(Answer::ok(completed));
        }

        // Named events whose data repeats the name as `type`, numbered from 0.
        let mut events = Vec::with_capacity(deltas.len() + 8);
        let mut push = |name: &'static str, mut data: Value| {
            data["type"] = json!(name);
            data["sequence_number"] = json!(events.len());
            events.push(SseEvent::Data(Some(name), data));
        };
        let in_progress = response("in_progress", json!([]), Value::Null);
        push("response.created", json!({ "response": in_progress }));
        push("response.in_progress", json!({ "response": in_progress }));
        push(
            "response.output_item.added",
            json!({"output_index": 0, "item": message("in_progress", json!([]))}),
        );
        // The members of an event about the one content part of the one output item.
        let at = |mut members: Value| {
            members["item_id"] = json!(item_id);
            members["output_index"] = json!(0);
            members["content_index"] = json!(0);
            members
        };
        push(
            "response.content_part.added",
            at(json!({ "part": part("") })),
        );
        for delta in &deltas {
            push(
                "response.output_text.delta",
                at(json!({"delta": delta, "logprobs": []})),
            );
        }
        push(
            "response.output_text.done",
            at(json!({"text": text, "logprobs": []})),
        );
        push(
            "response.content_part.done",
            at(json!({ "part": part(&text) })),
        );
        push(
            "response.output_item.done",
            json!({"output_index": 0, "item": done_message}),
        );
        push("response.completed", json!({ "response": completed }));
        Ok(Answer::Stream(events))
    }

    /// `POST /v1/moderations`: nothing is ever flagged. One result per input string (one
    /// for an array of content parts); no usage, as with OpenAI.
    fn moderations(&self, n: u64, body: &[u8]) -> Result<Answer, BadRequest> {
        let request = parse_object(body)?;
        let results = match request.get("input") {
            Some(Value::String(_)) => 1,
            Some(Value::Array(items))
                if !items.is_empty() && items.iter().all(Value::is_string) =>
            {
                items.len()
            }
            Some(Value::Array(items))
                if !items.is_empty() && items.iter().all(Value::is_object) =>
            {
                1
            }
            _ => {
                return Err(BadRequest(
                    "'input' must be a string, an array of strings or an array of content parts.",
                    Some("input"),
                ));
            }
        };
        let model = match request.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.as_str(),
            _ => MODERATION_MODEL,
        };
        let (id, _) = self.id_and_created("modr-mock", n);
        let per_category = |value: Value| -> Map<String, Value> {
            MODERATION_CATEGORIES
                .iter()
                .map(|category| ((*category).to_owned(), value.clone()))
                .collect()
        };
        let result = json!({
            "flagged": false,
            "categories": per_category(json!(false)),
            "category_scores": per_category(json!(0.0001)),
            "category_applied_input_types": per_category(json!(["text"])),
        });
        Ok(Answer::ok(json!({
            "id": id,
            "model": model,
            "results": vec![result; results],
        })))
    }

    /// A response id and `created` time: fixed when the mock is deterministic.
    fn id_and_created(&self, prefix: &str, n: u64) -> (String, u64) {
        if self.options.deterministic {
            (prefix.to_owned(), FIXED_CREATED)
        } else {
            (format!("{prefix}-{n}"), unix_now())
        }
    }

    /// Splits a reply into content deltas whose concatenation is the reply text: one per
    /// word, or exactly `stream_deltas` cycling through the words.
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

    /// Spells an answer out per the options: its JSON style, line ends, padding and gzip
    /// (`gzip`: whether this request gets a gzipped answer).
    fn render(self: &Arc<Self>, answer: Answer, gzip: bool) -> Response {
        match answer {
            Answer::Json(status, value) => {
                let body = self.json_body(status, &value);
                let body = if gzip {
                    gzip_chunks(vec![Bytes::from(body)]).concat()
                } else {
                    body
                };
                let mut response = Response::new(Body::from(body));
                *response.status_mut() = status;
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                if gzip {
                    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                response
            }
            Answer::Stream(events) => {
                let mut chunks: Vec<Bytes> = events.iter().map(|e| self.sse_bytes(e)).collect();
                if gzip {
                    chunks = gzip_chunks(chunks);
                }
                self.stream_response(chunks, gzip)
            }
        }
    }

    /// A JSON body in the options' style, padded after `usage` when asked.
    fn json_body(&self, status: StatusCode, value: &Value) -> Vec<u8> {
        let style = self.options.json_style;
        let padding = self.options.padding_bytes;
        match value {
            Value::Object(members)
                if padding > 0 && status.is_success() && members.contains_key("usage") =>
            {
                // The padding goes into a `metadata` member written last, after `usage`.
                let mut metadata = match members.get("metadata") {
                    Some(Value::Object(metadata)) => metadata.clone(),
                    _ => Map::new(),
                };
                metadata.insert("padding".to_owned(), json!("x".repeat(padding)));
                style.to_vec(&MetadataLast {
                    members,
                    metadata: Value::Object(metadata),
                })
            }
            _ => style.to_vec(value),
        }
    }

    /// One event of a stream, in the options' JSON style and line ends.
    fn sse_bytes(&self, event: &SseEvent) -> Bytes {
        let eol = self.options.line_ending.as_bytes();
        let mut out = Vec::new();
        match event {
            SseEvent::Done => {
                out.extend_from_slice(b"data: [DONE]");
                out.extend_from_slice(eol);
            }
            SseEvent::Data(name, data) => {
                if let Some(name) = name {
                    out.extend_from_slice(b"event: ");
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(eol);
                }
                // Pretty JSON spans several lines: one `data:` line each. A reader joins
                // them with "\n", which is JSON whitespace. The other styles are one line.
                let json = self.options.json_style.to_vec(data);
                for line in json.split(|byte| *byte == b'\n') {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(line);
                    out.extend_from_slice(eol);
                }
            }
        }
        out.extend_from_slice(eol);
        Bytes::from(out)
    }

    /// A `text/event-stream` response that sends `events` one body chunk at a time.
    fn stream_response(self: &Arc<Self>, events: Vec<Bytes>, gzip: bool) -> Response {
        let stream = EventStream::new(Arc::clone(self), events);
        let mut response = Response::new(Body::from_stream(stream));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if gzip {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        response
    }

    /// Whether the answer to a request with these headers is gzipped.
    fn gzips(&self, headers: &HeaderMap) -> bool {
        match self.options.gzip {
            Gzip::Never => false,
            Gzip::WhenAccepted => accepts_gzip(headers),
            Gzip::Always => true,
        }
    }
}

/// The single handler: every request goes through it, so every one is recorded and
/// carries the mock's headers.
async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let n = inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let gzip = inner.gzips(request.headers());
    let answer = inner.respond(n, request).await;
    let mut response = inner.render(answer, gzip);
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

/// What a route answers, before [`Inner::render`] spells it out per the options.
enum Answer {
    /// A JSON body with its status.
    Json(StatusCode, Value),
    /// A `text/event-stream` body.
    Stream(Vec<SseEvent>),
}

impl Answer {
    fn ok(value: Value) -> Self {
        Self::Json(StatusCode::OK, value)
    }
}

/// One server-sent event.
enum SseEvent {
    /// JSON data, with an `event:` name (the Responses API names its events).
    Data(Option<&'static str>, Value),
    /// `data: [DONE]`, the end of a chat or text completion stream.
    Done,
}

/// One piece of a streamed completion choice.
#[derive(Debug, Clone, Copy)]
enum Piece<'a> {
    /// The chat role chunk, first.
    Role,
    /// A content delta.
    Text(&'a str),
    /// The chunk with the `finish_reason`.
    Finish,
}

/// How many choices a completion request gets (`n`), and how many it is billed for
/// (`best_of` when larger).
struct Choices {
    n: usize,
    billed: usize,
}

impl Choices {
    fn of(request: &Value) -> Result<Self, BadRequest> {
        let n = match request.get("n") {
            None | Some(Value::Null) => 1,
            Some(n) => match n.as_u64() {
                Some(n @ 1..=MAX_CHOICES) => n,
                _ => {
                    return Err(BadRequest(
                        "'n' must be an integer between 1 and 128.",
                        Some("n"),
                    ));
                }
            },
        };
        let best_of = match request.get("best_of") {
            None | Some(Value::Null) => n,
            Some(best_of) => match best_of.as_u64() {
                Some(best_of @ 1..=MAX_BEST_OF) if best_of >= n => best_of,
                _ => {
                    return Err(BadRequest(
                        "'best_of' must be an integer between 1 and 20, and at least 'n'.",
                        Some("best_of"),
                    ));
                }
            },
        };
        // Both are at most 128, so they fit any usize.
        let count = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        Ok(Self {
            n: count(n),
            billed: count(best_of.max(n)),
        })
    }
}

/// An object serialized with its `metadata` member replaced and written last, whatever the
/// key order of the map: the padding of [`MockOptions::padding_bytes`] then follows `usage`.
struct MetadataLast<'a> {
    members: &'a Map<String, Value>,
    metadata: Value,
}

impl Serialize for MetadataLast<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.members {
            if key != "metadata" {
                map.serialize_entry(key, value)?;
            }
        }
        map.serialize_entry("metadata", &self.metadata)?;
        map.end()
    }
}

impl JsonStyle {
    /// `value` spelled in this style.
    fn to_vec<T: Serialize + ?Sized>(self, value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        // Serializing JSON values into a Vec cannot fail: their keys are strings.
        let _ = match self {
            Self::Compact => value.serialize(&mut serde_json::Serializer::new(&mut out)),
            Self::Python => value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out,
                PythonFormatter,
            )),
            Self::Pretty => value.serialize(&mut serde_json::Serializer::pretty(&mut out)),
        };
        out
    }
}

/// The spelling of Python's `json.dumps` defaults: `", "` and `": "` separators and
/// `ensure_ascii`, which escapes everything outside printable ASCII (DEL included) as
/// lowercase `\uXXXX` UTF-16 units. serde_json already escapes `"`, `\` and the control
/// characters as Python does.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut units = [0_u16; 2];
        let mut start = 0;
        for (at, c) in fragment.char_indices() {
            if (' '..='~').contains(&c) {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..at])?;
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = at + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Gzips `chunks` as one gzip stream, sync-flushed after each chunk so that each compressed
/// chunk decodes as soon as it arrives; the last one also carries the gzip trailer.
fn gzip_chunks(chunks: Vec<Bytes>) -> Vec<Bytes> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    let mut out = Vec::with_capacity(chunks.len().max(1));
    let last = chunks.len().saturating_sub(1);
    // Writing into a Vec cannot fail.
    for (index, chunk) in chunks.iter().enumerate() {
        let _ = encoder.write_all(chunk);
        let _ = if index == last {
            encoder.try_finish()
        } else {
            encoder.flush()
        };
        out.push(Bytes::from(std::mem::take(encoder.get_mut())));
    }
    if out.is_empty() {
        let _ = encoder.try_finish();
        out.push(Bytes::from(std::mem::take(encoder.get_mut())));
    }
    out
}

/// Whether `Accept-Encoding` accepts gzip: `gzip` or `x-gzip`, else `*`, with a non-zero
/// quality.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    let values = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok());
    for item in values.flat_map(|value| value.split(',')) {
        let mut params = item.split(';');
        let coding = params.next().unwrap_or_default().trim();
        let refused = params.any(|param| {
            let param = param.trim();
            let quality = param
                .strip_prefix("q=")
                .or_else(|| param.strip_prefix("Q="));
            quality.is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
        });
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(!refused);
        } else if coding == "*" {
            any = Some(!refused);
        }
    }
    gzip.or(any).unwrap_or(false)
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
fn embeddings(body: &[u8]) -> Result<Answer, BadRequest> {
    let (request, model) = parse_request(body)?;
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
        return Err(BadRequest(
            "'input' must be a string, an array of strings or an array of token arrays.",
            Some("input"),
        ));
    };
    let base64 = match request.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(_) => {
            return Err(BadRequest(
                "'encoding_format' must be 'float' or 'base64'.",
                Some("encoding_format"),
            ));
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
    Ok(Answer::ok(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// `GET /v1/models`.
fn list_models() -> Answer {
    let data: Vec<Value> = MODELS.iter().map(|id| model_json(id)).collect();
    Answer::ok(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
fn get_model(id: &str) -> Answer {
    if MODELS.contains(&id) {
        Answer::ok(model_json(id))
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

impl From<BadRequest> for Answer {
    fn from(BadRequest(message, param): BadRequest) -> Self {
        openai_error(StatusCode::BAD_REQUEST, message, param, None)
    }
}

/// Parses a JSON object body.
fn parse_object(body: &[u8]) -> Result<Value, BadRequest> {
    match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(BadRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON object.",
            None,
        )),
    }
}

/// Parses a JSON object body with a non-empty string `model`.
fn parse_request(body: &[u8]) -> Result<(Value, String), BadRequest> {
    let request = parse_object(body)?;
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
                // Chat's text parts, and the Responses API's input and output text parts.
                Value::Object(_)
                    if matches!(
                        part.get("type").and_then(Value::as_str),
                        Some("text" | "input_text" | "output_text")
                    ) =>
                {
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

/// The `created` time of deterministic answers.
const FIXED_CREATED: u64 = 1_700_000_000;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// An error in the OpenAI shape: `{"error":{"message","type","param","code"}}`.
fn openai_error(
    status: StatusCode,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Answer {
    let body = json!({
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    });
    Answer::Json(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use flate2::write::GzDecoder as GzWriteDecoder;
    use http_body_util::BodyExt as _;
    use std::io::Read as _;
    use tower::ServiceExt as _;

    /// A mock that answers at once, with fixed ids, three deltas per reply.
    fn options() -> MockOptions {
        MockOptions::new()
            .chunk_interval(Duration::ZERO)
            .stream_deltas(3)
            .deterministic(true)
    }

    /// An answer: its status, headers and body chunks as they came.
    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        chunks: Vec<Bytes>,
    }

    impl Reply {
        fn body(&self) -> Vec<u8> {
            self.chunks.concat()
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body()).unwrap()
        }

        fn encoding(&self) -> Option<&str> {
            self.headers
                .get(header::CONTENT_ENCODING)
                .map(|value| value.to_str().unwrap())
        }
    }

    /// Sends `body` to `path` in-process, with `headers`.
    async fn send(
        options: MockOptions,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mock = MockUpstream::new(options);
        let mut request = Request::post(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        let response = mock.router().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = response.into_body();
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                chunks.push(data);
            }
        }
        Reply {
            status,
            headers,
            chunks,
        }
    }

    async fn post(options: MockOptions, path: &str, body: &Value) -> Reply {
        send(options, path, body, &[]).await
    }

    /// A WHATWG event-stream reader: the (event name, data) of each dispatched event. Lines
    /// end in CRLF, LF or CR; `data` lines are joined with "\n"; one space after the colon
    /// is dropped; an unterminated last line is ignored.
    fn sse_events(body: &[u8]) -> Vec<(Option<String>, String)> {
        let mut rest = std::str::from_utf8(body).unwrap();
        let mut events = Vec::new();
        let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
        while let Some(end) = rest.find(['\r', '\n']) {
            let line = &rest[..end];
            let eol = if rest[end..].starts_with("\r\n") {
                2
            } else {
                1
            };
            rest = &rest[end + eol..];
            if line.is_empty() {
                match data.take() {
                    Some(data) => events.push((name.take(), data)),
                    None => name = None,
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "data" => match &mut data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                "event" => name = Some(value.to_owned()),
                _ => {}
            }
        }
        events
    }

    /// The JSON data of a chat or text completion stream, checking it ends in `[DONE]`.
    fn completion_chunks(body: &[u8]) -> Vec<Value> {
        let mut events = sse_events(body);
        assert_eq!(events.pop(), Some((None, "[DONE]".to_owned())));
        events
            .into_iter()
            .map(|(name, data)| {
                assert_eq!(name, None);
                serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data:?}"))
            })
            .collect()
    }

    fn chat(stream: bool, include_usage: Option<bool>) -> Value {
        let mut body = json!({
            "model": "gpt-4o-mini",
            "stream": stream,
            "messages": [{"role": "user", "content": "héllo 😀 there"}],
        });
        if let Some(include) = include_usage {
            body["stream_options"] = json!({ "include_usage": include });
        }
        body
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn python_style_spells_like_json_dumps() {
        let value = json!({"b": [1, "é😀\u{7f}\n\"x"], "a": {"c": null, "d": 1.5}});
        // The output of Python's `json.dumps` on the same value (keys sorted).
        assert_eq!(
            String::from_utf8(JsonStyle::Python.to_vec(&value)).unwrap(),
            r#"{"a": {"c": null, "d": 1.5}, "b": [1, "\u00e9\ud83d\ude00\u007f\n\"x"]}"#
        );
        assert_eq!(
            JsonStyle::Compact.to_vec(&value),
            serde_json::to_vec(&value).unwrap()
        );
        assert_eq!(
            JsonStyle::Pretty.to_vec(&value),
            serde_json::to_vec_pretty(&value).unwrap()
        );
    }

    #[test]
    fn accept_encoding() {
        let accepts = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(value).unwrap(),
            );
            accepts_gzip(&headers)
        };
        assert!(accepts("gzip"));
        assert!(accepts("br, GZIP;q=0.5, deflate"));
        assert!(accepts("x-gzip"));
        assert!(accepts("*"));
        assert!(!accepts("identity"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("*, gzip;q=0.0"));
        assert!(!accepts("br, deflate"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn every_style_and_line_ending_streams_parseable_events() {
        for style in [JsonStyle::Compact, JsonStyle::Python, JsonStyle::Pretty] {
            for ending in [LineEnding::Lf, LineEnding::CrLf, LineEnding::Cr] {
                let what = format!("{style:?} {ending:?}");
                let reply = post(
                    options().json_style(style).line_ending(ending),
                    "/v1/chat/completions",
                    &chat(true, Some(true)),
                )
                .await;
                assert_eq!(reply.status, StatusCode::OK, "{what}");
                // role, 3 deltas, finish, usage, [DONE]: one body chunk each.
                assert_eq!(reply.chunks.len(), 7, "{what}");
                let eol = ending.as_bytes();
                for chunk in &reply.chunks {
                    assert!(chunk.ends_with(&[eol, eol].concat()), "{what}: {chunk:?}");
                    assert_eq!(sse_events(chunk).len(), 1, "{what}: {chunk:?}");
                    let lone_lf = chunk
                        .iter()
                        .enumerate()
                        .any(|(at, byte)| *byte == b'\n' && (at == 0 || chunk[at - 1] != b'\r'));
                    assert_eq!(lone_lf, ending == LineEnding::Lf, "{what}: {chunk:?}");
                    assert_eq!(
                        chunk.contains(&b'\r'),
                        ending != LineEnding::Lf,
                        "{what}: {chunk:?}"
                    );
                }
                let body = reply.body();
                let chunks = completion_chunks(&body);
                assert_eq!(chunks.len(), 6, "{what}");
                let (usage_chunk, rest) = chunks.split_last().unwrap();
                assert_eq!(usage_chunk["choices"], json!([]), "{what}");
                assert_eq!(
                    usage_chunk["usage"],
                    json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}),
                    "{what}"
                );
                for chunk in rest {
                    assert_eq!(chunk.get("usage"), Some(&Value::Null), "{what}");
                }
                let content: String = rest
                    .iter()
                    .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
                    .collect();
                assert_eq!(content, "You said: héllo", "{what}");
                match style {
                    JsonStyle::Compact => {
                        assert!(contains(&body, "héllo".as_bytes()), "{what}");
                        assert!(contains(&body, br#""choices":[]"#), "{what}");
                    }
                    JsonStyle::Python => {
                        assert!(body.is_ascii(), "{what}");
                        assert!(contains(&body, br#"h\u00e9llo"#), "{what}");
                        assert!(contains(&body, br#""choices": [], "#), "{what}");
                    }
                    JsonStyle::Pretty => {
                        // The usage chunk spans several `data:` lines.
                        let lines = [&b"data:   \"usage\": {"[..], eol].concat();
                        assert!(contains(&body, &lines), "{what}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn styles_apply_to_json_bodies() {
        let embeddings = json!({"model": "text-embedding-3-small", "input": ["é", "b"]});
        for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/nope"] {
            let body = if path == "/v1/embeddings" {
                embeddings.clone()
            } else {
                chat(false, None)
            };
            let compact = post(options(), path, &body).await;
            let python = post(options().json_style(JsonStyle::Python), path, &body).await;
            let pretty = post(options().json_style(JsonStyle::Pretty), path, &body).await;
            assert_eq!(python.json(), compact.json(), "{path}");
            assert_eq!(pretty.json(), compact.json(), "{path}");
            assert!(python.body().is_ascii(), "{path}");
            assert!(contains(&python.body(), b"\": "), "{path}");
            assert!(contains(&pretty.body(), b"\n  \""), "{path}");
            for reply in [&compact, &python, &pretty] {
                assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
            }
        }
    }

    #[tokio::test]
    async fn usage_on_the_final_choice_chunk() {
        for n in [1, 2] {
            let mut body = chat(true, Some(true));
            body["n"] = json!(n);
            let reply = post(
                options().usage_placement(UsagePlacement::FinalChoiceChunk),
                "/v1/chat/completions",
                &body,
            )
            .await;
            let chunks = completion_chunks(&reply.body());
            // role, 3 deltas and finish for each choice; no usage-only chunk.
            assert_eq!(chunks.len(), 5 * n);
            let (last, rest) = chunks.split_last().unwrap();
            assert_eq!(last["choices"][0]["finish_reason"], "stop");
            assert_eq!(last["choices"][0]["index"], n - 1);
            assert_eq!(
                last["usage"],
                json!({"prompt_tokens": 3, "completion_tokens": 3 * n, "total_tokens": 3 + 3 * n})
            );
            for chunk in rest {
                assert!(chunk.get("usage").is_none(), "{chunk}");
                assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
            }
        }
    }

    #[tokio::test]
    async fn usage_on_every_chunk() {
        let reply = post(
            options().usage_placement(UsagePlacement::EveryChunk),
            "/v1/chat/completions",
            &chat(true, Some(true)),
        )
        .await;
        let chunks = completion_chunks(&reply.body());
        assert_eq!(chunks.len(), 5);
        let sent: Vec<u64> = chunks
            .iter()
            .map(|chunk| {
                assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
                let usage = &chunk["usage"];
                assert_eq!(usage["prompt_tokens"], 3);
                let completion = usage["completion_tokens"].as_u64().unwrap();
                assert_eq!(usage["total_tokens"], 3 + completion);
                completion
            })
            .collect();
        assert_eq!(sent, [0, 1, 2, 3, 3]);

        // Legacy completions too, billed for `best_of` in the last total.
        let reply = post(
            options().usage_placement(UsagePlacement::EveryChunk),
            "/v1/completions",
            &json!({"model": "m", "prompt": "hi", "stream": true, "best_of": 2,
                    "stream_options": {"include_usage": true}}),
        )
        .await;
        let chunks = completion_chunks(&reply.body());
        let sent: Vec<&Value> = chunks
            .iter()
            .map(|chunk| &chunk["usage"]["completion_tokens"])
            .collect();
        assert_eq!(sent, [1, 2, 3, 6]);
    }

    #[tokio::test]
    async fn no_usage_unless_asked_in_any_placement() {
        for placement in [
            UsagePlacement::SeparateChunk,
            UsagePlacement::FinalChoiceChunk,
            UsagePlacement::EveryChunk,
        ] {
            for include in [None, Some(false)] {
                let reply = post(
                    options().usage_placement(placement),
                    "/v1/chat/completions",
                    &chat(true, include),
                )
                .await;
                let chunks = completion_chunks(&reply.body());
                assert_eq!(chunks.len(), 5, "{placement:?}");
                assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
            }
        }
    }

    #[tokio::test]
    async fn gzip_when_accepted_always_or_never() {
        let gunzip = |body: &[u8]| {
            let mut plain = Vec::new();
            GzDecoder::new(body).read_to_end(&mut plain).unwrap();
            plain
        };
        for stream in [false, true] {
            let body = chat(stream, Some(true));
            let plain = post(options(), "/v1/chat/completions", &body).await;
            assert_eq!(plain.encoding(), None);
            let cases = [
                (Gzip::Never, "gzip, br", false),
                (Gzip::WhenAccepted, "gzip, br", true),
                (Gzip::WhenAccepted, "identity", false),
                (Gzip::Always, "identity", true),
            ];
            for (gzip, accept, gzipped) in cases {
                let what = format!("{gzip:?} {accept} stream={stream}");
                let reply = send(
                    options().gzip(gzip),
                    "/v1/chat/completions",
                    &body,
                    &[("accept-encoding", accept)],
                )
                .await;
                assert_eq!(reply.status, StatusCode::OK, "{what}");
                if !gzipped {
                    assert_eq!(reply.encoding(), None, "{what}");
                    assert_eq!(reply.chunks, plain.chunks, "{what}");
                    continue;
                }
                assert_eq!(reply.encoding(), Some("gzip"), "{what}");
                assert_eq!(gunzip(&reply.body()), plain.body(), "{what}");
                // Each chunk decodes into exactly its plain event on arrival.
                assert_eq!(reply.chunks.len(), plain.chunks.len(), "{what}");
                let mut decoder = GzWriteDecoder::new(Vec::new());
                for (gzipped, plain) in reply.chunks.iter().zip(&plain.chunks) {
                    decoder.write_all(gzipped).unwrap();
                    decoder.flush().unwrap();
                    assert_eq!(&std::mem::take(decoder.get_mut()), plain, "{what}");
                }
                decoder.try_finish().unwrap();
            }
        }

        // Embeddings (and every other JSON body) too.
        let embeddings = json!({"model": "text-embedding-3-small", "input": "hi"});
        let plain = post(options(), "/v1/embeddings", &embeddings).await;
        let reply = send(
            options().gzip(Gzip::WhenAccepted),
            "/v1/embeddings",
            &embeddings,
            &[("accept-encoding", "gzip")],
        )
        .await;
        assert_eq!(reply.encoding(), Some("gzip"));
        assert_eq!(gunzip(&reply.body()), plain.body());
    }

    #[tokio::test]
    async fn padding_puts_usage_far_from_the_end() {
        const PADDING: usize = 10_000;
        let requests = [
            ("/v1/chat/completions", chat(false, None)),
            ("/v1/completions", json!({"model": "m", "prompt": "hi"})),
            ("/v1/embeddings", json!({"model": "m", "input": "hi"})),
            ("/v1/responses", json!({"model": "m", "input": "hi"})),
        ];
        for (path, body) in requests {
            for style in [JsonStyle::Compact, JsonStyle::Python, JsonStyle::Pretty] {
                let what = format!("{path} {style:?}");
                let plain = post(options().json_style(style), path, &body).await;
                let padded = post(
                    options().json_style(style).padding_bytes(PADDING),
                    path,
                    &body,
                )
                .await;
                let mut value = padded.json();
                let metadata = value.as_object_mut().unwrap().remove("metadata").unwrap();
                assert_eq!(metadata["padding"], "x".repeat(PADDING), "{what}");
                let mut expected = plain.json();
                expected.as_object_mut().unwrap().remove("metadata");
                assert_eq!(value, expected, "{what}");
                // The whole usage object ends more than PADDING bytes before the end.
                let body = padded.body();
                let key = body
                    .windows(7)
                    .position(|w| w == b"\"usage\"")
                    .unwrap_or_else(|| panic!("{what}"));
                let mut depth = 0;
                let mut end = key;
                for (at, byte) in body.iter().enumerate().skip(key) {
                    match byte {
                        b'{' => depth += 1,
                        b'}' if depth == 1 => {
                            end = at + 1;
                            break;
                        }
                        b'}' => depth -= 1,
                        _ => {}
                    }
                }
                assert!(end > key, "{what}");
                let usage: Value = serde_json::from_slice(
                    body[key + 7..end]
                        .strip_prefix(b":")
                        .map(<[u8]>::trim_ascii_start)
                        .unwrap_or_else(|| panic!("{what}")),
                )
                .unwrap();
                assert_eq!(usage, expected["usage"], "{what}");
                assert!(body.len() - end > PADDING, "{what}");
                assert!(!contains(&body[end..], b"usage"), "{what}");
            }
        }
        // Answers without usage are not padded.
        let reply = post(
            options().padding_bytes(PADDING),
            "/v1/moderations",
            &json!({"input": "hi"}),
        )
        .await;
        assert!(reply.json().get("metadata").is_none());
    }

    #[tokio::test]
    async fn responses_not_streamed() {
        let reply = post(
            options(),
            "/v1/responses",
            &json!({
                "model": "gpt-4o-mini",
                "instructions": "Be brief.",
                "input": [
                    {"role": "user", "content": "first question"},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
                    {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": "hello there"}]},
                ],
            }),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let body = reply.json();
        assert_eq!(body["object"], "response");
        assert_eq!(body["id"], "resp_mock");
        assert_eq!(body["created_at"], FIXED_CREATED);
        assert_eq!(body["status"], "completed");
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["instructions"], "Be brief.");
        let output = body["output"].as_array().unwrap();
        assert_eq!(output.len(), 1);
        assert_eq!(output[0]["type"], "message");
        assert_eq!(output[0]["id"], "msg_mock");
        assert_eq!(output[0]["status"], "completed");
        assert_eq!(output[0]["role"], "assistant");
        assert_eq!(output[0]["content"][0]["type"], "output_text");
        assert_eq!(output[0]["content"][0]["text"], "You said: hello");
        assert_eq!(output[0]["content"][0]["annotations"], json!([]));
        assert_eq!(
            body["usage"],
            json!({
                "input_tokens": 8,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 3,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 11,
            })
        );

        let reply = post(options(), "/v1/responses", &json!({"model": "m"})).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.json()["error"]["param"], "input");
    }

    #[tokio::test]
    async fn responses_streamed() {
        let body = json!({"model": "gpt-4o-mini", "input": "hello there", "stream": true});
        for ending in [LineEnding::Lf, LineEnding::CrLf] {
            let reply = post(options().line_ending(ending), "/v1/responses", &body).await;
            assert_eq!(reply.headers[header::CONTENT_TYPE], "text/event-stream");
            let events = sse_events(&reply.body());
            assert_eq!(events.len(), reply.chunks.len());
            let names: Vec<&str> = events
                .iter()
                .map(|(name, _)| name.as_deref().unwrap())
                .collect();
            assert_eq!(
                names,
                [
                    "response.created",
                    "response.in_progress",
                    "response.output_item.added",
                    "response.content_part.added",
                    "response.output_text.delta",
                    "response.output_text.delta",
                    "response.output_text.delta",
                    "response.output_text.done",
                    "response.content_part.done",
                    "response.output_item.done",
                    "response.completed",
                ]
            );
            let data: Vec<Value> = events
                .iter()
                .map(|(_, data)| serde_json::from_str(data).unwrap())
                .collect();
            let mut text = String::new();
            for (number, (name, data)) in names.iter().zip(&data).enumerate() {
                assert_eq!(data["type"], *name);
                assert_eq!(data["sequence_number"], number);
                if *name == "response.output_text.delta" {
                    assert_eq!(data["item_id"], "msg_mock");
                    assert_eq!(data["output_index"], 0);
                    assert_eq!(data["content_index"], 0);
                    text.push_str(data["delta"].as_str().unwrap());
                }
            }
            assert_eq!(text, "You said: hello");
            assert_eq!(data[0]["response"]["status"], "in_progress");
            assert_eq!(data[0]["response"]["usage"], Value::Null);
            assert_eq!(data[7]["text"], text);
            assert_eq!(data[9]["item"]["content"][0]["text"], text);
            let completed = &data[10]["response"];
            assert_eq!(completed["status"], "completed");
            assert_eq!(completed["id"], data[0]["response"]["id"]);
            assert_eq!(completed["output"][0]["content"][0]["text"], text);
            assert_eq!(completed["usage"]["input_tokens"], 2);
            assert_eq!(completed["usage"]["output_tokens"], 3);
            assert_eq!(completed["usage"]["total_tokens"], 5);
        }
    }

    #[tokio::test]
    async fn moderations() {
        let reply = post(
            options(),
            "/v1/moderations",
            &json!({"input": ["one", "two", "three"]}),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let body = reply.json();
        assert_eq!(body["id"], "modr-mock");
        assert_eq!(body["model"], MODERATION_MODEL);
        assert!(body.get("usage").is_none());
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 3);
        for result in results {
            assert_eq!(result["flagged"], false);
            let categories = result["categories"].as_object().unwrap();
            assert_eq!(categories.len(), MODERATION_CATEGORIES.len());
            assert!(categories.values().all(|flag| *flag == false));
            assert_eq!(
                result["category_scores"].as_object().unwrap().len(),
                MODERATION_CATEGORIES.len()
            );
        }

        let body = post(
            options(),
            "/v1/moderations",
            &json!({"model": "omni-moderation-2024-09-26", "input": "hi"}),
        )
        .await
        .json();
        assert_eq!(body["model"], "omni-moderation-2024-09-26");
        assert_eq!(body["results"].as_array().unwrap().len(), 1);

        let reply = post(options(), "/v1/moderations", &json!({"input": 3})).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.json()["error"]["param"], "input");
    }

    #[tokio::test]
    async fn n_choices_and_best_of_billing() {
        let mut body = chat(false, None);
        body["n"] = json!(3);
        let reply = post(options(), "/v1/chat/completions", &body).await;
        let value = reply.json();
        let choices = value["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        for (index, choice) in choices.iter().enumerate() {
            assert_eq!(choice["index"], index);
            assert_eq!(choice["message"]["content"], "You said: héllo");
        }
        assert_eq!(
            value["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12})
        );

        // Streamed: per-choice chunks, interleaved.
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks =
            completion_chunks(&post(options(), "/v1/chat/completions", &body).await.body());
        let (usage, rest) = chunks.split_last().unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 9);
        let indexes: Vec<&Value> = rest.iter().map(|c| &c["choices"][0]["index"]).collect();
        assert_eq!(indexes, [0, 1, 2].repeat(5));

        // Legacy completions: n choices, billed for best_of.
        let value = post(
            options(),
            "/v1/completions",
            &json!({"model": "m", "prompt": "one two", "n": 2, "best_of": 3}),
        )
        .await
        .json();
        assert_eq!(value["choices"].as_array().unwrap().len(), 2);
        assert_eq!(value["choices"][1]["index"], 1);
        assert_eq!(
            value["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11})
        );

        for (n, best_of) in [
            (json!(0), Value::Null),
            (json!(1.5), Value::Null),
            (json!(2), json!(1)),
        ] {
            let mut body = chat(false, None);
            body["n"] = n;
            body["best_of"] = best_of;
            let reply = post(options(), "/v1/chat/completions", &body).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        }
    }

    #[tokio::test]
    async fn deterministic_answers_are_identical() {
        let requests = [
            (
                "/v1/responses",
                json!({"model": "m", "input": "hi", "stream": true}),
            ),
            ("/v1/responses", json!({"model": "m", "input": "hi"})),
            ("/v1/moderations", json!({"input": "hi"})),
            ("/v1/chat/completions", chat(true, Some(true))),
        ];
        for (path, body) in requests {
            let options = options().gzip(Gzip::Always);
            let first = post(options.clone(), path, &body).await;
            let second = post(options, path, &body).await;
            assert_eq!(first.chunks, second.chunks, "{path}");
        }
    }
}
