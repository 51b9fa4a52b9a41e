//! Usage read from every form an OpenAI-compatible upstream may answer in, and hidden exactly
//! when the proxy asked for it ("Metered calls" in `docs/protocol.md`).
//!
//! Every call here is metered (a token budget applies). What the proxy read is observed through
//! the budget: a [`RecordingStore`] store records each reservation and each settlement, and the usage
//! read is `reserved - delta`. Requests name a ceiling far above what the mock uses, so a usage
//! that was not read (no settlement at all) cannot pass for one that was.
//!
//! - Streamed chat and text completions in every JSON style, line end and usage placement of
//!   the mock: through the proxy, a client that did not ask for usage gets the bytes the mock
//!   sends a client that did not ask; one that asked gets the mock's bytes untouched.
//! - The Responses API, embeddings and JSON bodies (of any size) are read and never changed.
//! - A client that accepts gzip still gets identity: the proxy asks for it.
//! - The official Python SDK copes with every form (`tests/python/sdk_formats.py`).
//! - No event is held back: an in-test upstream writes the next event only once the client has
//!   the previous one.
//! - Usage that cannot be read keeps the reservation and counts `perishable_usage_unread_total`.
//! - Any chunking of any generated stream gives the same bytes and usage (a property test).
//!

use std::convert::Infallible;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use perishable::Perishable;
use perishable_mock::{Gzip, JsonStyle, LineEnding, MockOptions, MockUpstream, UsagePlacement};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use reqwest::Method;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

const FP: &str = "device-usage-formats";
/// Content deltas of every mock answer.
const DELTAS: usize = 4;
/// The ceiling every completion request names: its reservation is far above its usage.
const MAX_TOKENS: u64 = 1000;
/// How long a test waits for something that should come at once.
const PATIENCE: Duration = Duration::from_secs(5);

const STYLES: [JsonStyle; 3] = [JsonStyle::Compact, JsonStyle::Python, JsonStyle::Pretty];
const ENDINGS: [LineEnding; 3] = [LineEnding::Lf, LineEnding::CrLf, LineEnding::Cr];
const PLACEMENTS: [UsagePlacement; 3] = [
    UsagePlacement::SeparateChunk,
    UsagePlacement::FinalChoiceChunk,
    UsagePlacement::EveryChunk,
];

// ---------------------------------------------------------------------------------------------
// Harness: a proxy on a store that records reservations and settlements.
// ---------------------------------------------------------------------------------------------

/// A response, read to its end.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap().to_vec();
        Self {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn encoding(&self) -> Option<&str> {
        self.header("content-encoding")
    }
}

/// A proxy in front of an upstream, on a [`RecordingStore`], with a session minted.
struct Harness {
    proxy: Proxy,
    ledger: Arc<RecordingStore>,
    token: String,
    /// The ledger before the latest call.
    mark: Mark,
}

impl Harness {
    /// A mock (with `options` and the server's key) and a proxy in front of it.
    async fn start(options: MockOptions) -> Self {
        let mock = MockUpstream::start(options.api_key(SERVER_KEY))
            .await
            .unwrap();
        let base_url = mock.base_url();
        Self::in_front_of(&base_url, mock).await
    }

    /// A proxy in front of `base_url` (`mock` is only kept, for [`Harness::start`]).
    async fn in_front_of(base_url: &str, mock: MockUpstream) -> Self {
        // Every call is metered; a bucket far larger than any call, refilled over a day. The
        // request rate limit is out of the way (the property test makes many calls).
        let config = config(base_url)
            .budget_tokens_per_window(1_000_000)
            .budget_window_secs(86_400)
            .rate_limit_points(1_000_000)
            .build()
            .unwrap();
        let ledger = Arc::new(RecordingStore::in_memory());
        let perishable = Perishable::with_store(config, ledger.clone()).unwrap();
        let addr = serve(perishable::router_from(&perishable)).await;
        let proxy = Proxy {
            addr,
            mock,
            http: client(),
        };
        let token = proxy.mint(FP).await.token;
        Self {
            proxy,
            ledger,
            token,
            mark: Mark::default(),
        }
    }

    fn mock(&self) -> &MockUpstream {
        &self.proxy.mock
    }

    /// `body` posted through the proxy to `/openai/{path}`, with `headers`; not yet read.
    fn request(
        &mut self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        self.mark = self.ledger.mark();
        let mut request = self
            .proxy
            .openai(Method::POST, path, &self.token, FP)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
    }

    /// `body` posted through the proxy, read to its end.
    async fn post(&mut self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        let reply = Reply::read(self.request(path, body, headers).send().await.unwrap()).await;
        assert_eq!(
            reply.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        reply
    }

    /// Asserts the usage the proxy read for the latest call.
    async fn expect_usage(&self, total: u64, what: &str) {
        let read = self.ledger.usage_since(self.mark, what).await;
        assert_eq!(read, total, "{what}: the usage the proxy settled on");
    }

    /// The latest request the mock received.
    fn last_received(&self) -> perishable_mock::RecordedRequest {
        self.mock().requests().last().unwrap().clone()
    }
}

/// `body` sent straight to the mock, with the server's key and `headers`.
async fn direct(mock: &MockUpstream, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut request = client()
        .post(format!("{}/{path}", mock.base_url()))
        .bearer_auth(SERVER_KEY)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let reply = Reply::read(request.send().await.unwrap()).await;
    assert_eq!(reply.status, 200, "direct {path}");
    reply
}

/// Whether two bodies are the same bytes; if not, says how they differ: their lengths and
/// where they part.
fn same_bytes(got: &[u8], want: &[u8], what: &str) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let from = at.saturating_sub(120);
    let around = |bytes: &[u8]| {
        let to = bytes.len().min(at + 240);
        format!("{:?}", String::from_utf8_lossy(&bytes[from.min(to)..to]))
    };
    Err(format!(
        "{what}: the bytes differ at offset {at} (got {} bytes, want {}); from offset {from}:\n got: {}\nwant: {}",
        got.len(),
        want.len(),
        around(got),
        around(want)
    ))
}

fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if let Err(difference) = same_bytes(got, want, what) {
        panic!("{difference}");
    }
}

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut plain)
        .unwrap();
    plain
}

// ---------------------------------------------------------------------------------------------
// Reading what the mock sent, independently of the proxy.
// ---------------------------------------------------------------------------------------------

/// The dispatched events of a stream, per WHATWG: (event type, data). Lines end with CRLF, LF
/// or CR; an unfinished last event is left out.
fn sse_events(body: &[u8]) -> Vec<(Option<String>, String)> {
    let text = std::str::from_utf8(body).unwrap();
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(['\r', '\n']) {
        lines.push(&rest[..at]);
        let end = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[at + end..];
    }
    let mut events = Vec::new();
    let (mut event, mut data): (Option<String>, Option<String>) = (None, None);
    for line in lines {
        if line.is_empty() {
            if let Some(data) = data.take() {
                events.push((event.take(), data));
            }
            event = None;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            "event" => event = Some(value.to_owned()),
            _ => {}
        }
    }
    events
}

/// The events of a stream with their data parsed (a string when it is not JSON): what a
/// client reads, whatever the spelling.
fn event_values(body: &[u8]) -> Vec<(Option<String>, Value)> {
    sse_events(body)
        .into_iter()
        .map(|(event, data)| {
            let value = serde_json::from_str(&data).unwrap_or(Value::String(data));
            (event, value)
        })
        .collect()
}

/// The total of a usage object.
fn total_of(usage: &Value) -> u64 {
    usage["total_tokens"].as_u64().unwrap_or_else(|| {
        usage["prompt_tokens"].as_u64().unwrap_or(0)
            + usage["completion_tokens"].as_u64().unwrap_or(0)
    })
}

/// The usage total a body reports, as a reader should find it: the top-level `usage` of a
/// JSON body; in a stream, the last `usage` object of an event's data, or of its `response`.
fn usage_total(body: &[u8]) -> Option<u64> {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return value.get("usage").filter(|u| u.is_object()).map(total_of);
    }
    event_values(body)
        .iter()
        .filter_map(|(_, data)| {
            [&data["usage"], &data["response"]["usage"]]
                .into_iter()
                .find(|u| u.is_object())
                .map(total_of)
        })
        .next_back()
}

// ---------------------------------------------------------------------------------------------
// 1. Streamed completions in every form: hidden exactly, or untouched.
// ---------------------------------------------------------------------------------------------

/// One way an upstream spells its streams.
#[derive(Debug, Clone, Copy)]
struct Form {
    style: JsonStyle,
    ending: LineEnding,
    placement: UsagePlacement,
}

fn all_forms() -> Vec<Form> {
    let mut forms = Vec::new();
    for style in STYLES {
        for ending in ENDINGS {
            for placement in PLACEMENTS {
                forms.push(Form {
                    style,
                    ending,
                    placement,
                });
            }
        }
    }
    forms
}

/// A deterministic mock in `form`, sending its events as fast as it can.
fn form_options(form: Form) -> MockOptions {
    MockOptions::new()
        .deterministic(true)
        .stream_deltas(DELTAS)
        .chunk_interval(Duration::ZERO)
        .json_style(form.style)
        .line_ending(form.ending)
        .usage_placement(form.placement)
}

/// A chat completion request (with quotes and text outside ASCII, which the mock echoes).
fn chat_request(stream: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "max_tokens": MAX_TOKENS,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say \"héllo\" to 漢字 and 😀 please"},
        ],
    });
    if stream {
        body["stream"] = json!(true);
    }
    body
}

fn completion_request(stream: bool) -> Value {
    let mut body = json!({
        "model": "gpt-3.5-turbo-instruct",
        "max_tokens": MAX_TOKENS,
        "prompt": "say \"héllo\" to 漢字 😀",
    });
    if stream {
        body["stream"] = json!(true);
    }
    body
}

/// How a request says it did not ask for usage: `stream_options` absent, `include_usage`
/// false, or `stream_options` null.
fn not_asking(request: &Value, variant: usize) -> Value {
    let mut body = request.clone();
    match variant % 3 {
        1 => body["stream_options"] = json!({"include_usage": false}),
        2 => body["stream_options"] = Value::Null,
        _ => {}
    }
    body
}

fn asking(request: &Value) -> Value {
    let mut body = request.clone();
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// A streamed `request` to `path` of a mock in `form`, through the proxy: a client that did not
/// ask for usage gets the mock's stream without usage (byte for byte when `exact`, else event
/// for event) and the proxy reads the usage; a client that asked gets the mock's bytes.
async fn stream_in_form(path: &str, request: &Value, form: Form, variant: usize, exact: bool) {
    let what = format!("{path} {form:?}");
    let mut h = Harness::start(form_options(form)).await;
    let not_asked = not_asking(request, variant);
    let asked = asking(request);

    let plain = direct(h.mock(), path, &not_asked, &[]).await;
    let with_usage = direct(h.mock(), path, &asked, &[]).await;
    assert_eq!(usage_total(&plain.body), None, "{what}");
    let total = usage_total(&with_usage.body).unwrap_or_else(|| panic!("{what}: no usage"));
    assert_ne!(plain.body, with_usage.body, "{what}");

    // Not asked: the proxy asks, reads and hides.
    let through = h.post(path, &not_asked, &[]).await;
    let sent = h.last_received().body_json().unwrap();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "{what}: the proxy did not ask for usage: {sent}"
    );
    assert_eq!(
        through.header("content-type"),
        Some("text/event-stream"),
        "{what}"
    );
    assert_eq!(
        event_values(&through.body),
        event_values(&plain.body),
        "{what}: the client's events are not the ones sent without usage"
    );
    if exact {
        assert_same_bytes(&through.body, &plain.body, &what);
    }
    h.expect_usage(total, &what).await;

    // Asked: untouched, both ways.
    let through = h.post(path, &asked, &[]).await;
    assert_eq!(
        h.last_received().body,
        serde_json::to_vec(&asked).unwrap(),
        "{what}: the request was edited"
    );
    assert_same_bytes(&through.body, &with_usage.body, &format!("{what}, asked"));
    h.expect_usage(total, &format!("{what}, asked")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_in_every_form_hide_exactly_the_injected_usage() {
    let forms = all_forms();
    for (variant, form) in forms.into_iter().enumerate() {
        if form.style == JsonStyle::Pretty {
            continue;
        }
        stream_in_form("chat/completions", &chat_request(true), form, variant, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_chat_streams_hide_the_injected_usage_event_for_event() {
    let forms = all_forms();
    for (variant, form) in forms.into_iter().enumerate() {
        if form.style != JsonStyle::Pretty {
            continue;
        }
        stream_in_form(
            "chat/completions",
            &chat_request(true),
            form,
            variant,
            false,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completion_streams_hide_exactly_the_injected_usage() {
    for (variant, style) in STYLES.into_iter().enumerate() {
        for ending in ENDINGS {
            let form = Form {
                style,
                ending,
                placement: UsagePlacement::SeparateChunk,
            };
            let exact = style != JsonStyle::Pretty;
            stream_in_form(
                "completions",
                &completion_request(true),
                form,
                variant,
                exact,
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_streams_hide_the_injected_usage_byte_for_byte() {
    for (variant, form) in all_forms().into_iter().enumerate() {
        if form.style == JsonStyle::Pretty {
            stream_in_form("chat/completions", &chat_request(true), form, variant, true).await;
        }
    }
    for ending in ENDINGS {
        let form = Form {
            style: JsonStyle::Pretty,
            ending,
            placement: UsagePlacement::SeparateChunk,
        };
        stream_in_form("completions", &completion_request(true), form, 0, true).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2, 3. JSON bodies and the Responses API: read, never changed.
// ---------------------------------------------------------------------------------------------

/// `body` to `path` directly and through the proxy: the same bytes; the request untouched;
/// the usage read. Returns the body.
async fn untouched_and_read(h: &mut Harness, path: &str, body: &Value, what: &str) -> Vec<u8> {
    let what = format!("{what} {path} {body}");
    let upstream = direct(h.mock(), path, body, &[]).await;
    let through = h.post(path, body, &[]).await;
    assert_eq!(
        h.last_received().body,
        serde_json::to_vec(body).unwrap(),
        "{what}: the request was edited"
    );
    assert_same_bytes(&through.body, &upstream.body, &what);
    assert_eq!(
        through.header("content-type"),
        upstream.header("content-type")
    );
    let total = usage_total(&upstream.body).unwrap_or_else(|| panic!("{what}: no usage"));
    h.expect_usage(total, &what).await;
    through.body
}

fn responses_request(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "input": "tell me about \"quotes\" and 漢字",
        "max_output_tokens": MAX_TOKENS,
        "stream": stream,
    })
}

fn embeddings_request() -> Value {
    json!({"model": "text-embedding-3-small", "input": ["one two three", "four 😀"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_embeddings_and_json_usage_is_read_and_nothing_changed() {
    for style in STYLES {
        for ending in ENDINGS {
            let what = format!("{style:?} {ending:?}");
            let options = MockOptions::new()
                .deterministic(true)
                .stream_deltas(DELTAS)
                .chunk_interval(Duration::ZERO)
                .json_style(style)
                .line_ending(ending);
            let mut h = Harness::start(options).await;
            let streamed =
                untouched_and_read(&mut h, "responses", &responses_request(true), &what).await;
            let names: Vec<Option<String>> = sse_events(&streamed)
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            assert_eq!(
                names.last(),
                Some(&Some("response.completed".to_owned())),
                "{what}"
            );
            if ending != LineEnding::Lf {
                continue; // JSON bodies have no line ends
            }
            untouched_and_read(&mut h, "responses", &responses_request(false), &what).await;
            untouched_and_read(&mut h, "embeddings", &embeddings_request(), &what).await;
            untouched_and_read(&mut h, "chat/completions", &chat_request(false), &what).await;
            untouched_and_read(&mut h, "completions", &completion_request(false), &what).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_far_from_the_end_of_a_large_json_body_is_read() {
    const PADDING: usize = 20_000;
    for style in STYLES {
        let what = format!("{style:?}, {PADDING} bytes after usage");
        let options = MockOptions::new()
            .deterministic(true)
            .stream_deltas(DELTAS)
            .json_style(style)
            .padding_bytes(PADDING);
        let mut h = Harness::start(options).await;
        for (path, body) in [
            ("chat/completions", chat_request(false)),
            ("completions", completion_request(false)),
            ("responses", responses_request(false)),
            ("embeddings", embeddings_request()),
        ] {
            let body = untouched_and_read(&mut h, path, &body, &what).await;
            let usage_at = body
                .windows(7)
                .position(|w| w == b"\"usage\"")
                .unwrap_or_else(|| panic!("{what}: {path}"));
            assert!(body.len() - usage_at > PADDING, "{what}: {path}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. An upstream that gzips anyway.
// ---------------------------------------------------------------------------------------------

/// Asserts the proxy asked the mock for `identity`, whatever the client accepted.
fn asked_for_identity(h: &Harness, what: &str) {
    let received = h.last_received();
    let values: Vec<&HeaderValue> = received.headers.get_all("accept-encoding").iter().collect();
    assert_eq!(values, ["identity"], "{what}: Accept-Encoding upstream");
}

// An upstream that gzips anyway (`Gzip::Always`): each write is decoded at once (flate2's
// write decoders keep their output until a flush, which the tap makes after every step), so a
// one-frame JSON answer's usage is read, a stream's last event reaches a hiding client, and no
// event waits for the next frame.

/// JSON answers of a mock that gzips per `gzip`, to a client that accepts gzip: the proxy asks
/// for identity; the client gets the bytes the mock sends the proxy, and the usage is read.
async fn json_to_a_client_accepting_gzip(gzip: Gzip, styles: &[JsonStyle]) {
    for &style in styles {
        let options = MockOptions::new()
            .deterministic(true)
            .stream_deltas(DELTAS)
            .json_style(style)
            .gzip(gzip);
        let mut h = Harness::start(options).await;
        for (path, body) in [
            ("chat/completions", chat_request(false)),
            ("completions", completion_request(false)),
            ("responses", responses_request(false)),
            ("embeddings", embeddings_request()),
        ] {
            let what = format!("{gzip:?} {style:?} {path}");
            // What the mock sends the proxy, which asks for identity.
            let upstream = direct(h.mock(), path, &body, &[("accept-encoding", "identity")]).await;
            let gzipped = gzip == Gzip::Always;
            assert_eq!(upstream.encoding(), gzipped.then_some("gzip"), "{what}");
            if gzip == Gzip::WhenAccepted {
                // Not vacuous: this mock does gzip for a client that accepts it.
                let accepted = direct(h.mock(), path, &body, &[("accept-encoding", "gzip")]).await;
                assert_eq!(accepted.encoding(), Some("gzip"), "{what}");
            }
            let through = h.post(path, &body, &[("accept-encoding", "gzip")]).await;
            asked_for_identity(&h, &what);
            assert_eq!(through.encoding(), upstream.encoding(), "{what}");
            assert_same_bytes(&through.body, &upstream.body, &what);
            let plain = if gzipped {
                gunzip(&through.body)
            } else {
                through.body.clone()
            };
            let total = usage_total(&plain).unwrap_or_else(|| panic!("{what}: no usage"));
            h.expect_usage(total, &what).await;
        }
    }
}

/// Streams of a mock that gzips per `gzip`, to a client that accepts gzip: hiding, the client
/// gets the decoded stream without usage and without `Content-Encoding`; asked (and for the
/// Responses API), the bytes as sent. The usage is read each time.
async fn streams_to_a_client_accepting_gzip(gzip: Gzip) {
    let forms = [
        Form {
            style: JsonStyle::Compact,
            ending: LineEnding::Lf,
            placement: UsagePlacement::SeparateChunk,
        },
        Form {
            style: JsonStyle::Python,
            ending: LineEnding::CrLf,
            placement: UsagePlacement::FinalChoiceChunk,
        },
        Form {
            style: JsonStyle::Compact,
            ending: LineEnding::Cr,
            placement: UsagePlacement::EveryChunk,
        },
    ];
    for (variant, form) in forms.into_iter().enumerate() {
        let what = format!("{gzip:?} {form:?}");
        let mut h = Harness::start(form_options(form).gzip(gzip)).await;
        let gzipped = gzip == Gzip::Always;
        let identity = [("accept-encoding", "identity")];
        let not_asked = not_asking(&chat_request(true), variant);
        let asked = asking(&chat_request(true));
        let plain = direct(h.mock(), "chat/completions", &not_asked, &identity).await;
        let with_usage = direct(h.mock(), "chat/completions", &asked, &identity).await;
        assert_eq!(plain.encoding(), gzipped.then_some("gzip"), "{what}");
        let decode = |body: &[u8]| {
            if gzipped { gunzip(body) } else { body.to_vec() }
        };
        let total = usage_total(&decode(&with_usage.body)).unwrap();

        // Hiding: the client gets the decoded stream, without usage and without
        // Content-Encoding.
        let through = h
            .post(
                "chat/completions",
                &not_asked,
                &[("accept-encoding", "gzip")],
            )
            .await;
        asked_for_identity(&h, &what);
        assert_eq!(through.encoding(), None, "{what}");
        assert_eq!(through.header("content-length"), None, "{what}");
        assert_same_bytes(&through.body, &decode(&plain.body), &what);
        h.expect_usage(total, &what).await;

        // Asked: the bytes as sent.
        let through = h
            .post("chat/completions", &asked, &[("accept-encoding", "gzip")])
            .await;
        asked_for_identity(&h, &what);
        assert_eq!(through.encoding(), with_usage.encoding(), "{what}, asked");
        assert_same_bytes(&through.body, &with_usage.body, &format!("{what}, asked"));
        h.expect_usage(total, &format!("{what}, asked")).await;

        // The Responses API: never hidden, passed on as sent.
        let body = responses_request(true);
        let upstream = direct(h.mock(), "responses", &body, &identity).await;
        let through = h
            .post("responses", &body, &[("accept-encoding", "gzip")])
            .await;
        asked_for_identity(&h, &what);
        assert_eq!(through.encoding(), upstream.encoding(), "{what}, responses");
        assert_same_bytes(&through.body, &upstream.body, &format!("{what}, responses"));
        let total = usage_total(&decode(&upstream.body)).unwrap();
        h.expect_usage(total, &format!("{what}, responses")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_to_a_client_accepting_gzip_comes_in_identity_and_is_read() {
    json_to_a_client_accepting_gzip(Gzip::WhenAccepted, &STYLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_a_client_accepting_gzip_come_in_identity_and_are_read() {
    streams_to_a_client_accepting_gzip(Gzip::WhenAccepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_json_is_passed_on_as_sent_and_its_usage_read() {
    json_to_a_client_accepting_gzip(Gzip::Always, &STYLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_streams_are_decoded_only_to_hide_usage() {
    streams_to_a_client_accepting_gzip(Gzip::Always).await;
}

// ---------------------------------------------------------------------------------------------
// 5. The official Python SDK.
// ---------------------------------------------------------------------------------------------

/// The prompt of every SDK call; the mock echoes it.
const SDK_PROMPT: &str = "Hello from the \"SDK\" in every format";

/// A mock that spells its answers some way: JSON style, line ends, usage placement, gzip.
type SdkForm = (JsonStyle, LineEnding, UsagePlacement, Gzip);

/// `tests/python/sdk_formats.py` through a proxy in front of a mock in each of `forms`.
async fn official_python_sdk_in(forms: &[SdkForm]) {
    for &(style, ending, placement, gzip) in forms {
        let what = format!("{style:?} {ending:?} {placement:?} {gzip:?}");
        let options = MockOptions::new()
            .stream_deltas(DELTAS)
            .chunk_interval(Duration::from_millis(2))
            .json_style(style)
            .line_ending(ending)
            .usage_placement(placement)
            .gzip(gzip);
        let h = Harness::start(options).await;

        // What the mock answers the SDK's calls, asked directly.
        let gunzipped = |reply: Reply| {
            if reply.encoding() == Some("gzip") {
                gunzip(&reply.body)
            } else {
                reply.body
            }
        };
        let messages = json!([{"role": "user", "content": SDK_PROMPT}]);
        let chat: Value = serde_json::from_slice(&gunzipped(
            direct(
                h.mock(),
                "chat/completions",
                &json!({"model": "m", "messages": messages}),
                &[],
            )
            .await,
        ))
        .unwrap();
        let completion: Value = serde_json::from_slice(&gunzipped(
            direct(
                h.mock(),
                "completions",
                &json!({"model": "m", "prompt": SDK_PROMPT}),
                &[],
            )
            .await,
        ))
        .unwrap();
        let response: Value = serde_json::from_slice(&gunzipped(
            direct(
                h.mock(),
                "responses",
                &json!({"model": "m", "input": SDK_PROMPT}),
                &[],
            )
            .await,
        ))
        .unwrap();
        let embedding: Value = serde_json::from_slice(&gunzipped(
            direct(
                h.mock(),
                "embeddings",
                &json!({"model": "m", "input": SDK_PROMPT}),
                &[],
            )
            .await,
        ))
        .unwrap();
        let chat_text = chat["choices"][0]["message"]["content"].as_str().unwrap();
        let chat_total = total_of(&chat["usage"]);
        let completion_text = completion["choices"][0]["text"].as_str().unwrap();
        let response_text = response["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap();
        h.mock().clear();

        let mark = h.ledger.mark();
        let result = run_sdk_script("sdk_formats.py", h.proxy.url(""), SDK_PROMPT).await;
        println!("sdk_formats.py ({what}): {result}");

        // Streamed chat without usage: no usage-only chunk, no usage member, the whole text.
        let hidden = &result["chat_hidden"];
        assert_eq!(hidden["content"], chat_text, "{what}");
        assert_eq!(hidden["finish_reason"], "stop", "{what}");
        assert_eq!(hidden["chunks"], DELTAS + 2, "{what}: role, deltas, stop");
        assert_eq!(hidden["usage_chunks"], 0, "{what}");
        assert_eq!(hidden["usage_members"], 0, "{what}");
        // Asked for: the usage arrives as the mock places it.
        let asked = &result["chat_asked"];
        assert_eq!(asked["content"], chat_text, "{what}");
        assert_eq!(asked["usage_total"], chat_total, "{what}");
        let usage_chunks = u64::from(placement == UsagePlacement::SeparateChunk);
        assert_eq!(asked["usage_chunks"], usage_chunks, "{what}");
        // Not streamed.
        assert_eq!(result["chat_json"]["content"], chat_text, "{what}");
        assert_eq!(result["chat_json"]["usage_total"], chat_total, "{what}");
        // Text completion.
        assert_eq!(result["text_stream"]["text"], completion_text, "{what}");
        assert_eq!(result["text_stream"]["usage_members"], 0, "{what}");
        // Responses.
        let responses = &result["responses"];
        let types = responses["types"].as_array().unwrap();
        assert_eq!(types.first().unwrap(), "response.created", "{what}");
        assert_eq!(types.last().unwrap(), "response.completed", "{what}");
        assert_eq!(responses["text"], response_text, "{what}");
        assert_eq!(responses["output_text"], response_text, "{what}");
        assert_eq!(
            responses["usage_total"],
            total_of(&response["usage"]),
            "{what}"
        );
        // Embeddings.
        assert_eq!(result["embeddings"]["dims"], 16, "{what}");
        assert_eq!(
            result["embeddings"]["usage_total"],
            total_of(&embedding["usage"]),
            "{what}"
        );

        // Upstream: identity asked every time; usage asked for the streamed completions.
        let seen = h.mock().requests();
        let paths: Vec<&str> = seen.iter().map(|r| r.path_and_query.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/v1/chat/completions",
                "/v1/chat/completions",
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/responses",
                "/v1/embeddings"
            ],
            "{what}"
        );
        for request in &seen {
            let values: Vec<&HeaderValue> =
                request.headers.get_all("accept-encoding").iter().collect();
            assert_eq!(values, ["identity"], "{what}: {}", request.path_and_query);
        }
        for index in [0, 1, 3] {
            let body = seen[index].body_json().unwrap();
            assert_eq!(
                body["stream_options"]["include_usage"], true,
                "{what}: {body}"
            );
        }
        assert!(seen[4].body_json().unwrap().get("stream_options").is_none());

        // The budget settled on every usage: six calls, each read.
        let settled = h.ledger.settlements_since(mark, 6, &what).await;
        assert_eq!(settled.len(), 6, "{what}: {settled:?}");
        let reserved: u64 = h.ledger.reserved()[mark.reserved..].iter().sum();
        let given_back: i64 = settled.iter().sum();
        let used = 3 * chat_total
            + total_of(&completion["usage"])
            + total_of(&response["usage"])
            + total_of(&embedding["usage"]);
        assert_eq!(
            i64::try_from(reserved).unwrap() - given_back,
            i64::try_from(used).unwrap(),
            "{what}: the usage settled on"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    perishable_missing_openai,
    ignore = "needs the openai Python package (python3 -m pip install openai)"
)]
async fn official_python_sdk_reads_every_form() {
    official_python_sdk_in(&[
        (
            JsonStyle::Python,
            LineEnding::CrLf,
            UsagePlacement::SeparateChunk,
            Gzip::Never,
        ),
        (
            JsonStyle::Pretty,
            LineEnding::Cr,
            UsagePlacement::FinalChoiceChunk,
            Gzip::Never,
        ),
        (
            JsonStyle::Compact,
            LineEnding::Lf,
            UsagePlacement::EveryChunk,
            Gzip::WhenAccepted,
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    perishable_missing_openai,
    ignore = "needs the openai Python package (python3 -m pip install openai)"
)]
async fn official_python_sdk_reads_gzipped_answers() {
    official_python_sdk_in(&[(
        JsonStyle::Python,
        LineEnding::Lf,
        UsagePlacement::SeparateChunk,
        Gzip::Always,
    )])
    .await;
}

// ---------------------------------------------------------------------------------------------
// An upstream in the test: it answers with what the test writes, when the test writes it.
// ---------------------------------------------------------------------------------------------

/// How the [`Scripted`] upstream answers: its headers, and the pieces of its body.
type Answer = (Vec<(String, String)>, mpsc::UnboundedReceiver<Bytes>);

/// A request the [`Scripted`] upstream received, waiting for its answer.
struct Incoming {
    body: Bytes,
    reply: oneshot::Sender<Answer>,
}

impl Incoming {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// Answers 200 with `headers`; the body is what the test sends on the returned sender,
    /// one write per piece, and ends when the sender is dropped.
    fn answer(self, headers: &[(&str, &str)]) -> mpsc::UnboundedSender<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        let headers = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        self.reply.send((headers, rx)).ok().unwrap();
        tx
    }
}

/// An upstream whose every answer the test writes, piece by piece.
struct Scripted {
    base_url: String,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
}

impl Scripted {
    async fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Incoming>();
        let app = Router::new().fallback(move |request: Request| {
            let tx = tx.clone();
            async move {
                let body = axum::body::to_bytes(request.into_body(), usize::MAX)
                    .await
                    .unwrap();
                let (reply, answer) = oneshot::channel();
                tx.send(Incoming { body, reply }).ok().unwrap();
                let (headers, pieces) = answer.await.unwrap();
                let stream = futures_util::stream::unfold(pieces, |mut pieces| async move {
                    let piece = pieces.recv().await?;
                    Some((Ok::<Bytes, Infallible>(piece), pieces))
                });
                let mut response = Response::new(Body::from_stream(stream));
                for (name, value) in headers {
                    response.headers_mut().insert(
                        HeaderName::try_from(name).unwrap(),
                        HeaderValue::try_from(value).unwrap(),
                    );
                }
                response
            }
        });
        let addr = serve(app).await;
        Self {
            base_url: format!("http://{addr}/v1"),
            incoming: tokio::sync::Mutex::new(rx),
        }
    }

    /// The next request the upstream received.
    async fn next(&self) -> Incoming {
        let mut incoming = self.incoming.lock().await;
        tokio::time::timeout(PATIENCE, incoming.recv())
            .await
            .expect("no request reached the upstream (did the proxy refuse the call?)")
            .unwrap()
    }

    /// A proxy in front of this upstream.
    async fn harness(&self) -> Harness {
        // The mock is not used: the upstream is this one.
        Harness::in_front_of(&self.base_url, MockUpstream::new(MockOptions::new())).await
    }
}

const EVENT_STREAM: (&str, &str) = ("content-type", "text/event-stream");

/// A compact chat chunk; `usage` is put last when given.
fn chunk(choices: Value, usage: Option<Value>) -> Value {
    let mut chunk = Map::new();
    chunk.insert("id".into(), json!("chatcmpl-scripted"));
    chunk.insert("object".into(), json!("chat.completion.chunk"));
    chunk.insert("created".into(), json!(1_700_000_000));
    chunk.insert("model".into(), json!("gpt-4o-mini"));
    chunk.insert("choices".into(), choices);
    if let Some(usage) = usage {
        chunk.insert("usage".into(), usage);
    }
    Value::Object(chunk)
}

// ---------------------------------------------------------------------------------------------
// 6. No event is held back.
// ---------------------------------------------------------------------------------------------

/// Reads a client's response as it comes.
struct Reader {
    response: reqwest::Response,
    got: Vec<u8>,
}

impl Reader {
    /// Reads until the client has exactly `want` (`PATIENCE` at most: generous, since the
    /// upstream writes nothing more until this returns).
    async fn until(&mut self, want: &[u8], what: &str) {
        let read = tokio::time::timeout(PATIENCE, async {
            while self.got.len() < want.len() {
                match self.response.chunk().await.unwrap() {
                    Some(chunk) => self.got.extend_from_slice(&chunk),
                    None => break,
                }
            }
        })
        .await;
        if read.is_err() {
            panic!(
                "{what}: the client did not get the event: it has {:?}, wants {:?}",
                String::from_utf8_lossy(&self.got),
                String::from_utf8_lossy(want)
            );
        }
        assert_same_bytes(&self.got, want, what);
    }

    async fn rest(mut self) -> Vec<u8> {
        while let Some(chunk) = self.response.chunk().await.unwrap() {
            self.got.extend_from_slice(&chunk);
        }
        self.got
    }
}

/// An in-test upstream writes a stream event by event, each in two writes (`gzip`: each event
/// gzipped and sync-flushed, as the mock does), and writes the next only once the client has
/// received this one, whole (or, for the event the proxy drops, at once).
async fn events_pass_one_by_one(ending: &str, hide: bool, gzip: bool) {
    use std::io::Write;
    let what = format!("ending {ending:?}, hide {hide}, gzip {gzip}");
    let upstream = Scripted::start().await;
    let mut h = upstream.harness().await;
    let usage = json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10});
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
    let null = Some(Value::Null);
    let chunks = [
        chunk(
            choice(json!({"role": "assistant", "content": ""}), Value::Null),
            null.clone(),
        ),
        chunk(
            choice(json!({"content": "one "}), Value::Null),
            null.clone(),
        ),
        chunk(
            choice(json!({"content": "two "}), Value::Null),
            null.clone(),
        ),
        chunk(
            choice(json!({"content": "three"}), Value::Null),
            null.clone(),
        ),
        chunk(choice(json!({}), json!("stop")), null),
        chunk(json!([]), Some(usage)),
    ];
    // (the event, what a client that did not ask gets of it).
    let mut events: Vec<(String, String)> = chunks
        .iter()
        .map(|with| {
            let mut without = with.clone();
            let usage = without.as_object_mut().unwrap().remove("usage").unwrap();
            let kept = if usage.is_object() {
                String::new() // the usage-only event
            } else {
                format!("data: {without}{ending}{ending}")
            };
            (format!("data: {with}{ending}{ending}"), kept)
        })
        .collect();
    let comment = format!(": keep-alive{ending}{ending}");
    events.insert(2, (comment.clone(), comment));
    let done = format!("data: [DONE]{ending}{ending}");
    events.push((done.clone(), done));

    let mut request = chat_request(true);
    if !hide {
        request = asking(&request);
    }
    let response = tokio::spawn(h.request("chat/completions", &request, &[]).send());
    let incoming = upstream.next().await;
    assert_eq!(
        incoming.json()["stream_options"]["include_usage"],
        true,
        "{what}"
    );
    let tx = if gzip {
        incoming.answer(&[EVENT_STREAM, ("content-encoding", "gzip")])
    } else {
        incoming.answer(&[EVENT_STREAM])
    };
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut pending = Some(response);
    let mut reader: Option<Reader> = None;
    let mut expected = Vec::new();
    for (k, (event, kept)) in events.iter().enumerate() {
        let written = if gzip {
            encoder.write_all(event.as_bytes()).unwrap();
            encoder.flush().unwrap();
            std::mem::take(encoder.get_mut())
        } else {
            event.clone().into_bytes()
        };
        // Two writes: the first half is held (half an event), the second lets it through.
        let (first, second) = written.split_at(written.len() / 2);
        tx.send(Bytes::copy_from_slice(first)).unwrap();
        tx.send(Bytes::copy_from_slice(second)).unwrap();
        if let Some(response) = pending.take() {
            let response = response.await.unwrap().unwrap();
            assert_eq!(response.status(), 200, "{what}");
            let encoding = response.headers().get("content-encoding");
            assert_eq!(encoding.is_some(), gzip && !hide, "{what}");
            reader = Some(Reader {
                response,
                got: Vec::new(),
            });
        }
        let kept = if hide { kept.as_bytes() } else { &written[..] };
        expected.extend_from_slice(kept);
        if !kept.is_empty() {
            // Event k reaches the client before the upstream may write event k + 1.
            let reader = reader.as_mut().unwrap();
            reader.until(&expected, &format!("{what}, event {k}")).await;
        }
    }
    if gzip {
        let trailer = encoder.finish().unwrap();
        if !hide {
            expected.extend_from_slice(&trailer);
        }
        tx.send(Bytes::from(trailer)).unwrap();
    }
    drop(tx);
    let got = reader.unwrap().rest().await;
    assert_same_bytes(&got, &expected, &what);
    h.expect_usage(10, &what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_reaches_the_client_before_the_upstream_writes_the_next() {
    for ending in ["\n", "\r\n"] {
        for hide in [true, false] {
            events_pass_one_by_one(ending, hide, false).await;
        }
    }
    // Gzipped, but passed on as sent: nothing is decoded for the client.
    events_pass_one_by_one("\n", false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gzipped_event_is_decoded_before_the_upstream_writes_the_next() {
    for ending in ["\n", "\r\n"] {
        events_pass_one_by_one(ending, true, true).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Usage that cannot be read.
// ---------------------------------------------------------------------------------------------

/// A counter's value in a snapshot.
fn counter(snapshotter: &Snapshotter, name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            let key = key.key();
            key.name() == name && {
                let mut got: Vec<(&str, &str)> =
                    key.labels().map(|l| (l.key(), l.value())).collect();
                let mut want = labels.to_vec();
                got.sort_unstable();
                want.sort_unstable();
                got == want
            }
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

/// One answer whose usage cannot be read: whether the client asked to stream and for usage,
/// the headers and the body the upstream answers with.
struct Unreadable {
    what: &'static str,
    stream: bool,
    asked: bool,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static [u8],
}

async fn unreadable_usage_cases() {
    let upstream = Scripted::start().await;
    let mut h = upstream.harness().await;
    let sse_without_usage: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
    let cases = [
        Unreadable {
            what: "a stream in an encoding the proxy cannot read",
            stream: true,
            asked: false,
            headers: vec![EVENT_STREAM, ("content-encoding", "br")],
            body: b"\x1b\x8f\x00\xf8\xff data: {\"usage\":{\"total_tokens\":5}}\n\n\x00\x01",
        },
        Unreadable {
            what: "the same, usage asked for by the client",
            stream: true,
            asked: true,
            headers: vec![EVENT_STREAM, ("content-encoding", "br")],
            body: b"\x0b\x02\x80not brotli\xff\xfe",
        },
        Unreadable {
            what: "a stream without usage (the upstream ignored include_usage)",
            stream: true,
            asked: false,
            headers: vec![EVENT_STREAM],
            body: sse_without_usage,
        },
        Unreadable {
            what: "a JSON body without usage",
            stream: false,
            asked: false,
            headers: vec![("content-type", "application/json")],
            body: b"{\"id\":\"c\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}",
        },
        Unreadable {
            what: "a JSON body in an encoding the proxy cannot read",
            stream: false,
            asked: false,
            headers: vec![("content-type", "application/json"), ("content-encoding", "br")],
            body: b"\x8b\x03\x80{\"usage\":{\"prompt_tokens\":1,\"total_tokens\":2}}\x03",
        },
    ];
    for case in &cases {
        let mut request = chat_request(case.stream);
        if case.asked {
            request = asking(&request);
        }
        let response = tokio::spawn(h.request("chat/completions", &request, &[]).send());
        let tx = upstream.next().await.answer(&case.headers);
        tx.send(Bytes::from_static(case.body)).unwrap();
        drop(tx);
        let reply = Reply::read(response.await.unwrap().unwrap()).await;
        assert_eq!(reply.status, 200, "{}", case.what);
        // Passed on as sent.
        assert_same_bytes(&reply.body, case.body, case.what);
        let encoding = case
            .headers
            .iter()
            .find(|(name, _)| *name == "content-encoding")
            .map(|(_, value)| *value);
        assert_eq!(reply.encoding(), encoding, "{}", case.what);
    }

    // A readable one last: settled, as the only settlement.
    let response = tokio::spawn(
        h.request("chat/completions", &chat_request(false), &[])
            .send(),
    );
    let tx = upstream
        .next()
        .await
        .answer(&[("content-type", "application/json")]);
    tx.send(Bytes::from_static(
        b"{\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3,\"total_tokens\":7}}",
    ))
    .unwrap();
    drop(tx);
    Reply::read(response.await.unwrap().unwrap()).await;
    h.expect_usage(7, "the readable answer").await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        h.ledger.reserved().len(),
        cases.len() + 1,
        "one reservation per call"
    );
    assert_eq!(
        h.ledger.settled().len(),
        1,
        "a call whose usage was not read settled: its reservation must stand"
    );
}

/// Runs on one thread with a recorder of its own (`metrics::with_local_recorder`), so no other
/// test of this binary can touch its counters, and nothing is installed globally.
#[test]
fn unreadable_usage_keeps_the_reservation_and_is_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(unreadable_usage_cases());
    });
    let unread = counter(
        &snapshotter,
        "perishable_usage_unread_total",
        &[("route", "chat/completions")],
    );
    assert_eq!(
        unread, 5,
        "perishable_usage_unread_total{{route=chat/completions}}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Any stream, any chunking.
// ---------------------------------------------------------------------------------------------

/// Python's `json.dumps` spelling: `", "`, `": "`, and everything outside printable ASCII as
/// `\uXXXX`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut units = [0_u16; 2];
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                write!(writer, "{c}")?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

fn spell(style: JsonStyle, value: &Value) -> Vec<u8> {
    match style {
        JsonStyle::Compact => serde_json::to_vec(value).unwrap(),
        JsonStyle::Pretty => serde_json::to_vec_pretty(value).unwrap(),
        _ => {
            let mut out = Vec::new();
            let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            serde::Serialize::serialize(value, &mut serializer).unwrap();
            out
        }
    }
}

/// One event: each line of the JSON on a `data:` line of its own.
fn event(style: JsonStyle, eol: &str, value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    for line in spell(style, value).split(|b| *b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.extend_from_slice(eol.as_bytes());
    }
    out.extend_from_slice(eol.as_bytes());
    out
}

/// A generated stream.
#[derive(Debug, Clone)]
struct Case {
    contents: Vec<String>,
    style: JsonStyle,
    eol: &'static str,
    placement: UsagePlacement,
    /// The client asked for usage itself.
    asked: bool,
    /// A member after `usage` in each chunk.
    trailing: bool,
    prompt_tokens: u64,
    cuts: Vec<Index>,
    bytewise: bool,
}

impl Case {
    /// What the upstream sends, what a client that did not ask gets, and the usage total.
    fn render(&self) -> (Vec<u8>, Vec<u8>, u64) {
        let completion = self.contents.len() as u64;
        let usage = |completion: u64| {
            json!({
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
            })
        };
        let make = |choices: Value, usage: Option<Value>| {
            let mut value = chunk(choices, usage);
            if self.trailing {
                value["x_trace"] = json!("after \"usage\": null");
            }
            value
        };
        let mut pieces = vec![json!({"role": "assistant", "content": ""})];
        pieces.extend(self.contents.iter().map(|c| json!({ "content": c })));
        pieces.push(json!({}));
        let last = pieces.len() - 1;
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for (i, delta) in pieces.into_iter().enumerate() {
            let finish = if i == last {
                json!("stop")
            } else {
                Value::Null
            };
            let choices = json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
            let member = match self.placement {
                UsagePlacement::SeparateChunk => Some(Value::Null),
                UsagePlacement::FinalChoiceChunk => (i == last).then(|| usage(completion)),
                _ => Some(usage((i as u64).min(completion))),
            };
            with.extend(event(self.style, self.eol, &make(choices.clone(), member)));
            without.extend(event(self.style, self.eol, &make(choices, None)));
        }
        if self.placement == UsagePlacement::SeparateChunk {
            with.extend(event(
                self.style,
                self.eol,
                &make(json!([]), Some(usage(completion))),
            ));
        }
        for out in [&mut with, &mut without] {
            out.extend_from_slice(format!("data: [DONE]{0}{0}", self.eol).as_bytes());
        }
        (with, without, self.prompt_tokens + completion)
    }

    /// `bytes` cut where the case says.
    fn pieces(&self, bytes: &[u8]) -> Vec<Bytes> {
        if self.bytewise {
            return bytes.chunks(1).map(Bytes::copy_from_slice).collect();
        }
        let mut at: Vec<usize> = self.cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.extend([0, bytes.len()]);
        at.sort_unstable();
        at.dedup();
        at.windows(2)
            .map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]]))
            .collect()
    }
}

fn content_strategy() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        6 => prop::char::range(' ', '~').prop_map(String::from),
        1 => Just("\"".to_owned()),
        1 => Just("\\".to_owned()),
        1 => Just("é".to_owned()),
        1 => Just("漢".to_owned()),
        1 => Just("😀".to_owned()),
        1 => Just("\n".to_owned()),
        1 => Just("\r".to_owned()),
        1 => Just("\u{2028}".to_owned()),
        1 => Just("\"usage\": null, ".to_owned()),
        1 => Just("\"choices\":[],\"usage\":{\"total_tokens\":1}".to_owned()),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(content_strategy(), 0..6),
        prop::sample::select(STYLES.to_vec()),
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
        prop::sample::select(PLACEMENTS.to_vec()),
        any::<bool>(),
        any::<bool>(),
        1..400_u64,
        prop::collection::vec(any::<Index>(), 0..40),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(contents, style, eol, placement, asked, trailing, prompt_tokens, cuts, bytewise)| {
                Case {
                    contents,
                    style,
                    eol,
                    placement,
                    asked,
                    trailing,
                    prompt_tokens,
                    cuts,
                    bytewise,
                }
            },
        )
}

/// One generated case through the proxy.
async fn run_case(
    upstream: &Scripted,
    h: &mut Harness,
    case: &Case,
    exact_pretty: bool,
) -> Result<(), TestCaseError> {
    let (with, without, total) = case.render();
    let mut request = chat_request(true);
    if case.asked {
        request = asking(&request);
    }
    let response = tokio::spawn(h.request("chat/completions", &request, &[]).send());
    let incoming = upstream.next().await;
    prop_assert_eq!(&incoming.json()["stream_options"]["include_usage"], true);
    let tx = incoming.answer(&[EVENT_STREAM]);
    for piece in case.pieces(&with) {
        tx.send(piece).unwrap();
        tokio::task::yield_now().await;
    }
    drop(tx);
    let reply = Reply::read(response.await.unwrap().unwrap()).await;
    prop_assert_eq!(reply.status, 200);
    let want = if case.asked { &with } else { &without };
    if exact_pretty || case.style != JsonStyle::Pretty || case.asked {
        same_bytes(&reply.body, want, "the client's bytes").map_err(TestCaseError::fail)?;
    } else {
        prop_assert_eq!(
            event_values(&reply.body),
            event_values(want),
            "the client's events"
        );
    }
    let read = h.ledger.usage_since(h.mark, "the generated stream").await;
    prop_assert_eq!(read, total, "the usage the proxy settled on");
    Ok(())
}

/// Runs generated cases (32 by default) through one proxy in front of a scripted upstream.
fn any_stream_any_chunking(exact_pretty: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let upstream = runtime.block_on(Scripted::start());
    let harness = Mutex::new(runtime.block_on(upstream.harness()));
    // 32 cases, or `PROPTEST_CASES` for a longer search.
    let default = ProptestConfig::default();
    let config = ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            32
        },
        failure_persistence: None,
        ..default
    };
    let mut runner = TestRunner::new(config);
    let outcome = runner.run(&case_strategy(), |case| {
        let mut h = harness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        runtime.block_on(run_case(&upstream, &mut h, &case, exact_pretty))
    });
    if let Err(error) = outcome {
        panic!("{error}");
    }
}

#[test]
fn any_stream_in_any_chunking_is_read_and_hidden_exactly() {
    any_stream_any_chunking(false);
}

#[test]
fn any_pretty_stream_in_any_chunking_is_hidden_byte_for_byte() {
    any_stream_any_chunking(true);
}
