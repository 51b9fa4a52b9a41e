//! End-to-end tests of the upstream client over TLS, on real 127.0.0.1 sockets: the mock
//! upstream is served over rustls with a self-signed rcgen certificate, and an
//! [`UpstreamService`] built on an [`UpstreamClient`] forwards chat completions to it (plain and
//! streamed, over HTTP/2 and HTTP/1.1), carrying the server key. A client that does not trust
//! the certificate (the default platform verifier, or a config trusting another certificate),
//! or that reaches the server by a name the certificate does not cover, must refuse it:
//! `502 upstream_unavailable`, and nothing reaches the upstream.
//!
//! Most tests drive the `UpstreamService` directly with `tower::ServiceExt::oneshot`; the last
//! one goes through the whole router, built with `Perishable::with_client`, over HTTP.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{SERVER_KEY, config};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use perishable::Body;
use perishable::store::MemoryStore;
use perishable::upstream::rustls::{self, RootCertStore, pki_types};
use perishable::upstream::{UpstreamClient, UpstreamService};
use perishable_mock::{MockOptions, MockUpstream};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Every exchange gets this long, so a regression cannot hang the suite.
const DEADLINE: Duration = Duration::from_secs(20);

/// A self-signed certificate (its own trust anchor) and its key.
struct Cert {
    der: pki_types::CertificateDer<'static>,
    key: pki_types::PrivateKeyDer<'static>,
}

impl Cert {
    /// A fresh certificate for `names` (DNS names or IP addresses).
    fn new(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        Self {
            der: certified.cert.der().clone(),
            key: pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()).into(),
        }
    }
}

/// What the TLS server saw.
#[derive(Default)]
struct Seen {
    /// The ALPN protocol of each completed handshake.
    alpn: Vec<Option<Vec<u8>>>,
    /// Handshakes that failed (the client refused the certificate, or sent garbage).
    failed_handshakes: usize,
    /// The HTTP version of each request that reached the mock.
    versions: Vec<Version>,
}

/// The mock upstream served over TLS on 127.0.0.1.
struct TlsUpstream {
    mock: MockUpstream,
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl TlsUpstream {
    /// Serves a mock (requiring the server key) with `cert`, offering `alpn` (HTTP/2 is served
    /// when the client negotiates `h2`: hyper-util's `server-auto` and `http2` are enabled).
    async fn start(cert: &Cert, alpn: &[&[u8]]) -> Self {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], cert.key.clone_key())
            .unwrap();
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let mock = MockUpstream::new(
            MockOptions::new()
                .api_key(SERVER_KEY)
                .chunk_interval(Duration::from_millis(10))
                .stream_deltas(4),
        );
        let seen = Arc::new(Mutex::new(Seen::default()));
        let versions = seen.clone();
        let app = mock.router().map_request(move |req: Request<Incoming>| {
            versions.lock().unwrap().versions.push(req.version());
            req
        });

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let (acceptor, stats, app) = (acceptor.clone(), stats.clone(), app.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            stats.lock().unwrap().failed_handshakes += 1;
                            return;
                        }
                    };
                    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    stats.lock().unwrap().alpn.push(alpn);
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Self { mock, port, seen }
    }

    /// `https://{host}:PORT/v1`.
    fn base_url(&self, host: &str) -> String {
        format!("https://{host}:{}/v1", self.port)
    }
}

/// A rustls client config trusting only `trusted`.
fn trusting(trusted: &Cert) -> rustls::ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// An upstream service sending to `base_url` through the client `make_client` builds.
fn service(
    base_url: &str,
    make_client: impl FnOnce(&perishable::Config) -> UpstreamClient,
) -> UpstreamService {
    let config = config(base_url)
        .upstream_connect_timeout_ms(5_000)
        .build()
        .unwrap();
    let client = make_client(&config);
    UpstreamService::with_client(&config, client, Arc::new(MemoryStore::new())).unwrap()
}

/// Sends `POST /openai/chat/completions` with `body` through `svc`.
async fn chat(svc: &UpstreamService, body: &Value) -> Response<Body> {
    let request = Request::post("/openai/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    tokio::time::timeout(DEADLINE, svc.clone().oneshot(request))
        .await
        .expect("the service answers in time")
        .unwrap()
}

/// The whole body of `response`, as data frames in the order they arrived.
async fn frames(response: Response<Body>) -> Vec<Bytes> {
    let mut body = std::pin::pin!(response.into_body());
    let mut frames = Vec::new();
    loop {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("the body ends in time");
        match frame {
            None => return frames,
            Some(frame) => {
                if let Ok(data) = frame.unwrap().into_data() {
                    frames.push(data);
                }
            }
        }
    }
}

/// The body of `response` as JSON.
async fn json_body(response: Response<Body>) -> Value {
    serde_json::from_slice(&frames(response).await.concat()).unwrap()
}

/// Asserts `response` is `502 upstream_unavailable` in the PROTOCOL error shape.
async fn assert_unavailable(response: Response<Body>) {
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = json_body(response).await;
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    assert_eq!(body["error"]["type"], "upstream_error", "{body}");
}

/// A chat completion request, streamed or not.
fn completion(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello over TLS"}],
        "stream": stream,
    })
}

/// The mock's reply to [`completion`]: its first 4 words (the mock sends 4 deltas).
const REPLY: &str = "You said: hello over";

/// A plain and a streamed completion through a client trusting the upstream's certificate;
/// the server offers `alpn` and the requests must arrive as `version`.
async fn completions_over_tls(alpn: &[&[u8]], version: Version) {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, alpn).await;
    let svc = service(&upstream.base_url("127.0.0.1"), |config| {
        UpstreamClient::with_tls_config(config, trusting(&cert))
    });

    // Not streamed: one JSON chat completion.
    let response = chat(&svc, &completion(false)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let request_id = response.headers()["x-request-id"].to_str().unwrap();
    assert!(request_id.starts_with("req_mock_"), "{request_id}");
    let body = json_body(response).await;
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(body["model"], "gpt-4o-mini", "{body}");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant", "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], REPLY, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");

    // Streamed: SSE events arrive chunk by chunk and end with `data: [DONE]`.
    let response = chat(&svc, &completion(true)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let frames = frames(response).await;
    assert!(
        frames.len() >= 2,
        "the events arrive in separate chunks, got {frames:?}"
    );
    let text = String::from_utf8(frames.concat()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect();
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|chunk| {
            assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, REPLY, "{text}");

    // Both requests reached the mock over TLS with the server key (the mock also refuses any
    // other key with 401), in the expected HTTP version.
    let requests = upstream.mock.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.path_and_query, "/v1/chat/completions");
        let expected = format!("Bearer {SERVER_KEY}");
        assert_eq!(request.header("authorization"), Some(expected.as_str()));
    }
    assert_eq!(requests[1].body_json().unwrap()["stream"], true);
    // A streamed request asks for an uncompressed answer.
    assert_eq!(requests[1].header("accept-encoding"), Some("identity"));
    let seen = upstream.seen.lock().unwrap();
    assert_eq!(seen.versions, vec![version, version]);
    assert_eq!(seen.failed_handshakes, 0);
    let negotiated = if version == Version::HTTP_2 {
        &b"h2"[..]
    } else {
        &b"http/1.1"[..]
    };
    assert!(!seen.alpn.is_empty());
    for alpn in &seen.alpn {
        assert_eq!(alpn.as_deref(), Some(negotiated));
    }
    if version == Version::HTTP_2 {
        // One multiplexed TLS connection, reused from the pool for the second request.
        assert_eq!(seen.alpn.len(), 1, "handshakes: {:?}", seen.alpn);
    }
}

#[tokio::test]
async fn completions_reach_an_https_upstream_over_http2() {
    completions_over_tls(&[b"h2", b"http/1.1"], Version::HTTP_2).await;
}

#[tokio::test]
async fn completions_reach_an_https_upstream_over_http1() {
    completions_over_tls(&[b"http/1.1"], Version::HTTP_11).await;
}

/// Asserts that `svc` answers 502 and that the upstream refused no request because none
/// arrived: the TLS handshake failed.
async fn assert_refused(svc: &UpstreamService, upstream: &TlsUpstream) {
    assert_unavailable(chat(svc, &completion(false)).await).await;
    assert_unavailable(chat(svc, &completion(true)).await).await;
    assert!(upstream.mock.requests().is_empty());
    let seen = upstream.seen.lock().unwrap();
    assert!(seen.versions.is_empty());
    assert!(seen.alpn.is_empty(), "handshakes: {:?}", seen.alpn);
    // The connection was made, then the handshake failed: a refusal of the certificate, not
    // an unreachable port.
    assert!(seen.failed_handshakes >= 1);
}

#[tokio::test]
async fn the_default_client_refuses_a_self_signed_upstream() {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &[b"h2", b"http/1.1"]).await;
    let svc = service(&upstream.base_url("127.0.0.1"), |config| {
        UpstreamClient::new(config).unwrap()
    });
    assert_refused(&svc, &upstream).await;
}

#[tokio::test]
async fn a_client_trusting_another_certificate_refuses_the_upstream() {
    let cert = Cert::new(&["localhost", "127.0.0.1"]);
    let other = Cert::new(&["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&cert, &[b"h2", b"http/1.1"]).await;
    let svc = service(&upstream.base_url("127.0.0.1"), |config| {
        UpstreamClient::with_tls_config(config, trusting(&other))
    });
    assert_refused(&svc, &upstream).await;
}

#[tokio::test]
async fn a_trusted_certificate_for_another_name_is_refused() {
    // The certificate covers `localhost` only, not the address 127.0.0.1.
    let cert = Cert::new(&["localhost"]);
    let upstream = TlsUpstream::start(&cert, &[b"h2", b"http/1.1"]).await;
    let by_address = service(&upstream.base_url("127.0.0.1"), |config| {
        UpstreamClient::with_tls_config(config, trusting(&cert))
    });
    assert_refused(&by_address, &upstream).await;

    // The same trust, by the name the certificate covers: accepted.
    let by_name = service(&upstream.base_url("localhost"), |config| {
        UpstreamClient::with_tls_config(config, trusting(&cert))
    });
    let response = chat(&by_name, &completion(false)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_body(response).await;
    assert_eq!(body["choices"][0]["message"]["content"], REPLY, "{body}");
    assert_eq!(upstream.mock.requests().len(), 1);
}

#[tokio::test]
async fn the_router_forwards_to_an_https_upstream_through_a_given_client() {
    let cert = Cert::new(&["localhost"]);
    let upstream = TlsUpstream::start(&cert, &[b"h2", b"http/1.1"]).await;
    let config = config(&upstream.base_url("localhost")).build().unwrap();
    let client = UpstreamClient::with_tls_config(&config, trusting(&cert));
    let perishable =
        perishable::Perishable::with_client(config, Arc::new(MemoryStore::new()), client).unwrap();
    let addr = crate::support::serve(perishable::router_from(&perishable)).await;
    let proxy = crate::support::Proxy {
        addr,
        mock: MockUpstream::new(MockOptions::new()),
        http: crate::support::client(),
    };
    let session = proxy.mint("device-tls-router").await;
    let response = proxy
        .openai(
            reqwest::Method::POST,
            "chat/completions",
            &session.token,
            "device-tls-router",
        )
        .json(&completion(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    let requests = upstream.mock.requests();
    assert_eq!(requests.len(), 1, "one request reached the TLS upstream");
    assert_eq!(
        requests[0].header("authorization"),
        Some(format!("Bearer {SERVER_KEY}").as_str())
    );
}
