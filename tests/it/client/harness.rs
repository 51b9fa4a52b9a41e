//! The real Perishable router (mounted at `/ai`) and a mock upstream on 127.0.0.1 sockets, and
//! a recording front proxy that can refuse chosen requests first.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

pub use crate::support::{SERVER_KEY, error_code, serve};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use perishable::ConfigBuilder;
use perishable::config::DpopMode;
use perishable_client::{Client, ClientBuilder, Interaction};
use perishable_mock::{MockOptions, MockUpstream};
use serde_json::Value;

pub const UA: &str = "perishable-client-tests/1.0";
pub const FP: &str = "install-0b7d-4c55-9a39-3be1d2f0c8aa";

/// The test config: proof of work at 8 bits, DPoP required, the entropy gate off, mint limits
/// out of the way.
pub fn config(upstream: &str) -> ConfigBuilder {
    crate::support::config(upstream)
        .session_dpop(DpopMode::Required)
        .session_min_entropy_score(0)
        .rate_limit_mint_per_ip(1000)
}

/// A mock upstream and the router in front of it, at `http://127.0.0.1:PORT/ai`.
pub struct Server {
    pub addr: SocketAddr,
    pub mock: MockUpstream,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(|c| c).await
    }

    pub async fn start_with(tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> Self {
        let mock = MockUpstream::start(
            MockOptions::new()
                .api_key(SERVER_KEY)
                .chunk_interval(Duration::from_millis(2)),
        )
        .await
        .unwrap();
        let config = tweak(config(&mock.base_url())).build().unwrap();
        let addr = serve(Router::new().nest("/ai", perishable::router(config))).await;
        Self { addr, mock }
    }

    pub fn base(&self) -> String {
        format!("http://{}/ai", self.addr)
    }

    /// A client builder for this server with the test fingerprint and User-Agent.
    pub fn client(&self) -> ClientBuilder {
        Client::builder(self.base()).fingerprint(FP).user_agent(UA)
    }
}

/// The claims of a JWT, unverified (the tests only read them).
pub fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// Samples recorded from a (simulated) hand: a jittered, curved trace with varied timing, as
/// the repository's own tests use. Scores well above the default threshold of 50.
pub fn recorded_trace() -> Interaction {
    let mut seed: u64 = 42;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut samples = Interaction::new();
    let mut t = 0.0;
    for i in 0..80 {
        t += 8.0 + 30.0 * rand();
        let a = f64::from(i) / 15.0;
        samples.push_pointer(
            t,
            (300.0 + 120.0 * a.cos() + 5.0 * rand()).round(),
            (200.0 + 80.0 * (1.3 * a).sin() + 5.0 * rand()).round(),
        );
    }
    samples.elapsed_ms(t)
}

// ---------------------------------------------------------------------------------------------
// A front proxy: forwards everything to the server, records what it saw, and answers the first
// matching request itself with a scripted refusal.

/// One scripted refusal: for the first request whose path ends with `path_suffix`.
#[derive(Clone)]
pub struct Refusal {
    pub path_suffix: &'static str,
    pub status: StatusCode,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: &'static str,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

#[derive(Clone)]
struct FrontState {
    upstream: String,
    http: reqwest::Client,
    refusal: Arc<Mutex<Option<Refusal>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

pub struct Front {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Front {
    /// A front for `server` (which must have `server.public_url` = this front's base, so DPoP
    /// proofs made for the front's URLs verify).
    pub async fn start(refusal: Refusal) -> (Self, Server) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let public = format!("http://{addr}/ai");
        let server = Server::start_with(|c| c.server_public_url(public)).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = FrontState {
            upstream: format!("http://{}", server.addr),
            http: reqwest::Client::new(),
            refusal: Arc::new(Mutex::new(Some(refusal))),
            seen: seen.clone(),
        };
        let app = Router::new().fallback(forward).with_state(state);
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (Self { addr, seen }, server)
    }

    pub fn base(&self) -> String {
        format!("http://{}/ai", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn forward(State(state): State<FrontState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    state.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers.clone(),
    });
    let scripted = {
        let mut refusal = state.refusal.lock().unwrap();
        match refusal.as_ref() {
            Some(r) if parts.uri.path().ends_with(r.path_suffix) => refusal.take(),
            _ => None,
        }
    };
    if let Some(r) = scripted {
        let mut response = (r.status, r.body).into_response();
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        for (name, value) in r.headers {
            response
                .headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        return response;
    }
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let mut headers = parts.headers.clone();
    headers.remove("host");
    let upstream = state
        .http
        .request(parts.method, format!("{}{path}", state.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = upstream.status();
    let headers = upstream.headers().clone();
    let bytes: Bytes = upstream.bytes().await.unwrap();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    for (name, value) in &headers {
        if name != "transfer-encoding" && name != "content-length" && name != "connection" {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}
