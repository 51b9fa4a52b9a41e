//! The processes and servers of the harness: the Perishable proxy and the bare hyper proxy (each
//! run as a child process, one current-thread runtime, pinned to core 0), and the mock upstream
//! (in the harness process, on core 1).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::serve::ListenerExt;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use perishable::config::DpopMode;
use perishable_mock::{MockOptions, MockUpstream};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// The server's upstream key (what the proxies add; the mock does not check it).
pub const SERVER_KEY: &str = "sk-bench-server-key";
/// The session signing secret of the Perishable proxies.
pub const SECRET: &str = "bench-secret-bench-secret-bench-secret!!";

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Ends this process when its parent closes our stdin (the harness went away).
fn exit_with_parent() {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
}

fn announce(addr: SocketAddr) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "LISTENING {addr}");
    let _ = out.flush();
}

/// The Perishable proxy: `perishable::router(config)` served as the example proxy serves it
/// (hyper's HTTP/1.1 server, connect info, TCP_NODELAY).
pub fn run_perishable(upstream: &str, gates: bool) {
    exit_with_parent();
    let mut builder = perishable::Config::builder()
        .upstream_base_url(upstream)
        .upstream_api_key(SERVER_KEY)
        .session_jwt_secret(SECRET)
        .pow_difficulty(8)
        .session_ttl_secs(3600)
        .session_max_per_fingerprint(1_000)
        .rate_limit_points(1_000_000_000)
        .rate_limit_duration_secs(60)
        .rate_limit_mint_per_ip(1_000_000)
        .realtime_enabled(true)
        .realtime_max_connections_per_session(1_000_000);
    // The Redis scenario: a shared store, and a budget without DPoP.
    if let Ok(url) = std::env::var("PERISHABLE_LOAD_STORE") {
        builder = builder
            .store_url(url)
            .store_key_prefix(format!("load{}", std::process::id()));
    }
    if std::env::var("PERISHABLE_LOAD_BUDGET").as_deref() == Ok("on") {
        builder = builder
            .budget_tokens_per_window(1 << 40)
            .budget_window_secs(3600)
            .budget_max_completion_tokens(100_000);
    }
    if gates {
        builder = builder
            .session_dpop(DpopMode::Required)
            .budget_tokens_per_window(1 << 40)
            .budget_window_secs(3600)
            .budget_max_completion_tokens(100_000)
            .budget_include_usage(true)
            .budget_max_concurrent_streams(10_000);
    }
    let config = builder.build().expect("a valid config");
    current_thread().block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        announce(listener.local_addr().expect("local addr"));
        let perishable = perishable::Perishable::new(config).expect("perishable");
        let app = match std::env::var("PERISHABLE_LOAD_STACK").as_deref() {
            // Ablations, to see where the time goes (docs/performance.md): the upstream
            // Service alone, or with the session check and rate limit, without the router's
            // outer layers. Other routes (sessions) still go to the full router.
            Ok(stack @ ("upstream" | "verify")) => {
                let upstream = tower::ServiceBuilder::new()
                    .option_layer((stack == "verify").then(|| perishable.verify_layer()))
                    .option_layer((stack == "verify").then(|| perishable.rate_limit_layer()))
                    .service(perishable.upstream_service());
                Router::new()
                    .route("/openai/{*path}", axum::routing::any_service(upstream))
                    .fallback_service(perishable::router_from::<()>(&perishable))
            }
            _ => perishable::router_from(&perishable),
        };
        // As the example proxy serves it.
        perishable::serve(listener, app, std::future::pending()).await;
    });
}

/// The bare pass-through proxy: hyper server, pooled hyper-util client, no checks. It maps
/// `/openai/{path}` to `{upstream}/{path}` like Perishable, copies method, headers and body,
/// sets the server key, and streams the response body back frame by frame.
pub fn run_bare(upstream: &str) {
    exit_with_parent();
    let upstream: Uri = upstream.parse().expect("an upstream URL");
    let authority = upstream.authority().expect("an upstream host").clone();
    let base_path = upstream.path().trim_end_matches('/').to_owned();
    current_thread().block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(connector);
        let authorization = HeaderValue::from_str(&format!("Bearer {SERVER_KEY}")).expect("key");
        let host = HeaderValue::from_str(authority.as_str()).expect("host");
        let state = Arc::new((client, authority, base_path, authorization, host));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        announce(listener.local_addr().expect("local addr"));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors or similar: back off and go on.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        let (client, authority, base_path, authorization, host) = &*state;
                        let (mut parts, body) = req.into_parts();
                        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
                        let rest = path.strip_prefix("/openai").unwrap_or(path);
                        let uri = Uri::builder()
                            .scheme("http")
                            .authority(authority.clone())
                            .path_and_query(format!("{base_path}{rest}"))
                            .build();
                        let Ok(uri) = uri else {
                            return Ok::<_, Infallible>(status_only(StatusCode::BAD_REQUEST));
                        };
                        parts.uri = uri;
                        for h in [
                            header::CONNECTION,
                            header::TRANSFER_ENCODING,
                            header::UPGRADE,
                        ] {
                            parts.headers.remove(h);
                        }
                        parts.headers.insert(header::HOST, host.clone());
                        parts
                            .headers
                            .insert(header::AUTHORIZATION, authorization.clone());
                        match client.request(Request::from_parts(parts, body)).await {
                            Ok(response) => Ok(response.map(BareBody::Upstream)),
                            Err(_) => Ok(status_only(StatusCode::BAD_GATEWAY)),
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

fn status_only(status: StatusCode) -> Response<BareBody> {
    let mut response = Response::new(BareBody::Empty);
    *response.status_mut() = status;
    response
}

/// The bare proxy's response body: the upstream's, or nothing.
enum BareBody {
    Upstream(Incoming),
    Empty,
}

impl hyper::body::Body for BareBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Upstream(body) => Pin::new(body).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(body) => body.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Upstream(body) => body.size_hint(),
            Self::Empty => hyper::body::SizeHint::with_exact(0),
        }
    }
}

/// Counters of the mock's instrumented streams.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Bytes the bulk streams have handed to hyper (written, or about to be), by tag.
    pub bulk_bytes: [AtomicU64; 8],
    /// Bulk streams alive.
    pub bulk_active: AtomicU64,
    /// Stamped streams alive.
    pub stamped_active: AtomicU64,
}

struct MockState {
    builtin: Router,
    stats: Arc<MockStats>,
}

/// Starts the mock upstream on `port` (0: a free one) on the current runtime: the built-in
/// `perishable_mock` (64 deltas 20 ms apart, recording off), plus two instrumented streams
/// chosen by a marker in the request body, so they work through any OpenAI-compatible proxy:
///
/// - `bench:stamped:N:MS`: N SSE chat-completion chunks MS apart, each carrying
///   `<seq>:<unix ns when written>;` as its content, then `data: [DONE]`;
/// - `bench:bulk:BYTES:MS:N:TAG`: N events of BYTES bytes MS apart, counted in [`MockStats`]
///   under TAG (0 to 7).
pub async fn start_mock(port: u16) -> std::io::Result<(SocketAddr, Arc<MockStats>)> {
    let builtin = MockUpstream::new(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(20))
            .stream_deltas(64)
            .record(false),
    );
    let stats = Arc::new(MockStats::default());
    let state = Arc::new(MockState {
        builtin: builtin.router(),
        stats: stats.clone(),
    });
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().fallback(mock_handler).with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, stats))
}

async fn mock_handler(
    State(state): State<Arc<MockState>>,
    req: Request<axum::body::Body>,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
        return axum::response::IntoResponse::into_response(StatusCode::PAYLOAD_TOO_LARGE);
    };
    if parts.uri.path().ends_with("/chat/completions") {
        if let Some(spec) = marker(&body, "bench:stamped:") {
            let mut it = spec.split(':');
            let n = it.next().and_then(|v| v.parse().ok()).unwrap_or(64);
            let ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(20);
            let stream = BenchStream::new(
                Kind::Stamped,
                n,
                Duration::from_millis(ms),
                state.stats.clone(),
            );
            return sse(stream);
        }
        if let Some(spec) = marker(&body, "bench:bulk:") {
            let mut it = spec.split(':');
            let size = it.next().and_then(|v| v.parse().ok()).unwrap_or(4096);
            let ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(20);
            let n = it.next().and_then(|v| v.parse().ok()).unwrap_or(500);
            let tag = it.next().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0) % 8;
            let stream = BenchStream::new(
                Kind::Bulk(size, tag),
                n,
                Duration::from_millis(ms),
                state.stats.clone(),
            );
            return sse(stream);
        }
    }
    let req = Request::from_parts(parts, axum::body::Body::from(body));
    match state.builtin.clone().oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The text after `prefix` in `body`, up to the next character that is not a digit or `:`.
fn marker<'a>(body: &'a [u8], prefix: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(prefix)? + prefix.len();
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == ':'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

fn sse(stream: BenchStream) -> axum::response::Response {
    let mut response = axum::response::Response::new(axum::body::Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[derive(Clone, Copy)]
enum Kind {
    Stamped,
    Bulk(usize, usize),
}

/// An instrumented SSE stream: the first event at once, then one every `interval` (never in a
/// burst: a stream that was not polled for a while sends one event and waits again).
struct BenchStream {
    kind: Kind,
    remaining: usize,
    seq: usize,
    interval: Duration,
    pause: Pin<Box<Sleep>>,
    pausing: bool,
    done_sent: bool,
    stats: Arc<MockStats>,
}

impl BenchStream {
    fn new(kind: Kind, n: usize, interval: Duration, stats: Arc<MockStats>) -> Self {
        match kind {
            Kind::Stamped => stats.stamped_active.fetch_add(1, Ordering::Relaxed),
            Kind::Bulk(..) => stats.bulk_active.fetch_add(1, Ordering::Relaxed),
        };
        Self {
            kind,
            remaining: n,
            seq: 0,
            interval,
            pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
            pausing: false,
            done_sent: false,
            stats,
        }
    }
}

impl Drop for BenchStream {
    fn drop(&mut self) {
        match self.kind {
            Kind::Stamped => self.stats.stamped_active.fetch_sub(1, Ordering::Relaxed),
            Kind::Bulk(..) => self.stats.bulk_active.fetch_sub(1, Ordering::Relaxed),
        };
    }
}

/// Unix time in nanoseconds (the same clock in every process of this machine).
pub fn unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl futures_util::Stream for BenchStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.pausing {
            if this.pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pausing = false;
        }
        if this.remaining == 0 {
            if this.done_sent {
                return Poll::Ready(None);
            }
            this.done_sent = true;
            return Poll::Ready(Some(Ok(Bytes::from_static(b"data: [DONE]\n\n"))));
        }
        this.remaining -= 1;
        this.seq += 1;
        let event = match this.kind {
            Kind::Stamped => Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}:{};\"}},\"finish_reason\":null}}]}}\n\n",
                this.seq,
                unix_ns()
            )),
            Kind::Bulk(size, tag) => {
                let mut event = Vec::with_capacity(size);
                event.extend_from_slice(b"data: ");
                event.resize(size.max(8) - 2, b'x');
                event.extend_from_slice(b"\n\n");
                this.stats.bulk_bytes[tag].fetch_add(event.len() as u64, Ordering::Relaxed);
                Bytes::from(event)
            }
        };
        this.pause.as_mut().reset(Instant::now() + this.interval);
        this.pausing = true;
        Poll::Ready(Some(Ok(event)))
    }
}

/// The bare WebSocket relay, the Realtime scenario's baseline: accepts any WebSocket, opens
/// `{upstream}/realtime?{query}` (as `ws://`), and copies messages both ways with no check, no
/// parse and no metering, on one current-thread runtime like the proxies.
// The handshake callback's error type is tungstenite's, large by its design.
#[allow(clippy::result_large_err)]
pub fn run_bare_ws(upstream: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{
        Request as WsRequest, Response as WsResponse,
    };

    exit_with_parent();
    let base = upstream.replacen("http://", "ws://", 1);
    current_thread().block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        announce(listener.local_addr().expect("local addr"));
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let base = base.clone();
            tokio::spawn(async move {
                let mut query = String::new();
                let accepted =
                    tokio_tungstenite::accept_hdr_async(tcp, |req: &WsRequest, res: WsResponse| {
                        query = req.uri().query().unwrap_or_default().to_owned();
                        Ok(res)
                    })
                    .await;
                let Ok(client) = accepted else { return };
                let url = format!("{base}/realtime?{query}");
                let Ok((upstream, _)) =
                    tokio_tungstenite::connect_async_with_config(url, None, true).await
                else {
                    return;
                };
                let (mut client_tx, mut client_rx) = client.split();
                let (mut upstream_tx, mut upstream_rx) = upstream.split();
                let up = async {
                    while let Some(Ok(message)) = client_rx.next().await {
                        if upstream_tx.send(message).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async {
                    while let Some(Ok(message)) = upstream_rx.next().await {
                        if client_tx.send(message).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! {
                    () = up => {}
                    () = down => {}
                }
            });
        }
    });
}
