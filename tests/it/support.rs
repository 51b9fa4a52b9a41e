//! Shared end-to-end harness: a mock upstream and a Perishable router on real 127.0.0.1 sockets.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use perishable::{Config, ConfigBuilder, SessionObject};
use perishable_mock::{MockOptions, MockUpstream};
use serde_json::{Value, json};

/// The signing secret every test config uses (tests forge tokens with it).
pub const SECRET: &str = "test-secret-test-secret-test-secret!";
/// The server's upstream key: must reach the mock, never a client.
pub const SERVER_KEY: &str = "sk-server-key-never-leaks";
/// The User-Agent the test client sends.
pub const UA: &str = "perishable-tests/1.0";

/// Serves `app` on 127.0.0.1:0 with connect info and TCP_NODELAY; returns the address.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// An upstream that takes every connection and holds it open without writing a byte; returns
/// its address and the number of connections it has taken.
pub async fn silent_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (addr, accepted)
}

/// A config pointed at `base_url`, with the test secret and key, proof of work at 8 bits.
pub fn config(base_url: &str) -> ConfigBuilder {
    Config::builder()
        .upstream_base_url(base_url)
        .upstream_api_key(SERVER_KEY)
        .session_jwt_secret(SECRET)
        .pow_difficulty(8)
}

/// A running mock upstream and a Perishable proxy in front of it.
pub struct Proxy {
    pub addr: SocketAddr,
    pub mock: MockUpstream,
    pub http: reqwest::Client,
}

impl Proxy {
    /// Starts a mock (with `options`) and a proxy whose config `tweak` may change.
    pub async fn start_with(
        options: MockOptions,
        tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Self {
        let mock = MockUpstream::start(options.api_key(SERVER_KEY))
            .await
            .unwrap();
        let config = tweak(config(&mock.base_url())).build().unwrap();
        let addr = serve(perishable::router(config)).await;
        Self {
            addr,
            mock,
            http: client(),
        }
    }

    /// A mock with default options and the default test config.
    pub async fn start() -> Self {
        Self::start_with(MockOptions::new(), |c| c).await
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Mints a session for `fingerprint` (solving the proof of work).
    pub async fn mint(&self, fingerprint: &str) -> SessionObject {
        let response = self.mint_response(fingerprint).await;
        assert_eq!(response.status(), 200, "mint failed");
        response.json().await.unwrap()
    }

    /// The raw mint response for `fingerprint` with human-like entropy and a solved challenge.
    pub async fn mint_response(&self, fingerprint: &str) -> reqwest::Response {
        let body = json!({
            "fingerprint": fingerprint,
            "entropy": human_entropy(),
            "pow": self.solved_pow().await,
        });
        self.http
            .post(self.url("/session"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// A fresh solved `pow` object (or null when proof of work is off).
    pub async fn solved_pow(&self) -> Value {
        let challenge: Value = self
            .http
            .get(self.url("/challenge"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let difficulty = challenge["difficulty"].as_u64().unwrap() as u8;
        if difficulty == 0 {
            return Value::Null;
        }
        let c = challenge["challenge"].as_str().unwrap();
        json!({ "challenge": c, "nonce": perishable::pow::solve(c, difficulty) })
    }

    /// An authenticated request builder for `/openai/{path}`.
    pub fn openai(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        fingerprint: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(&format!("/openai/{path}")))
            .bearer_auth(token)
            .header("x-perishable-fingerprint", fingerprint)
    }
}

/// A reqwest client with the test User-Agent.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(UA)
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

/// A jittered, curved pointer trace with varied timing: scores well above the threshold.
pub fn human_entropy() -> Value {
    let mut seed: u64 = 42;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut t = 0.0;
    let pointer: Vec<Value> = (0..80)
        .map(|i| {
            t += 8.0 + 30.0 * rand();
            let a = f64::from(i) / 15.0;
            json!([
                t.round(),
                (300.0 + 120.0 * a.cos() + 5.0 * rand()).round(),
                (200.0 + 80.0 * (1.3 * a).sin() + 5.0 * rand()).round()
            ])
        })
        .collect();
    json!({ "pointer": pointer, "keys": [], "elapsed_ms": t.round() })
}

/// The PROTOCOL error code of a response body.
pub async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A `redis-server` child process on a free port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts one on a free port. Tests that call this are marked
    /// `#[cfg_attr(perishable_missing_redis, ignore = "...")]` (see `tests/build.rs`).
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self { port, child: None };
        redis.spawn();
        redis
    }

    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (apt-get install redis-server): {e}")
            });
        self.child = Some(child);
        // Wait until it accepts connections.
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The repository's root directory.
pub fn repo() -> std::path::PathBuf {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// The Python interpreter the SDK tests run: `$PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Declares a test on the memory store and one on Redis, each running `$run` with `$url`
/// bound to the store URL (`None`: memory).
macro_rules! on_both_stores {
    ($memory:ident, $redis:ident, |$url:ident| $run:expr) => {
        #[tokio::test]
        async fn $memory() {
            let $url: Option<String> = None;
            $run.await;
        }

        #[tokio::test]
        #[cfg_attr(
            perishable_missing_redis,
            ignore = "needs redis-server on the PATH (apt-get install redis-server)"
        )]
        async fn $redis() {
            let redis = $crate::support::Redis::start();
            let $url = Some(redis.url());
            $run.await;
        }
    };
}
pub(crate) use on_both_stores;
