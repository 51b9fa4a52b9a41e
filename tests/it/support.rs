//! Shared end-to-end harness: a mock upstream and a Perishable router on real 127.0.0.1 sockets.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use perishable::store::{
    Admission, AppAttestKey, Bucket, RateLimiter, RatePolicy, Reservation, Set, Store, StoreFuture,
};
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
        json!({ "challenge": c, "nonce": perishable_client::pow::solve(c, difficulty) })
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
    /// For a TLS-only server: the directory with its certificates (`ca.pem` is the root).
    tls: Option<std::path::PathBuf>,
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
        let mut redis = Self {
            port,
            child: None,
            tls: None,
        };
        redis.spawn();
        redis
    }

    /// Starts one that speaks only TLS (`rediss://`), with a certificate for `localhost` and
    /// `127.0.0.1` issued by a fresh test CA, whose certificate is [`Redis::ca_pem`].
    pub fn start_tls() -> Self {
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "perishable-redis-tls-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        write_test_certificates(&dir);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            child: None,
            tls: Some(dir),
        };
        redis.spawn();
        redis
    }

    /// The test CA of a server from [`Redis::start_tls`].
    pub fn ca_pem(&self) -> std::path::PathBuf {
        self.tls.as_ref().expect("a TLS server").join("ca.pem")
    }

    pub fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(dir) => tls_server_args(&mut command, dir, self.port),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
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

    /// Freezes the server (`SIGSTOP`): connections stay open and nothing answers, as when
    /// Redis hangs rather than goes away. [`Redis::resume`] thaws it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a server [`Redis::pause`] froze (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// `redis://127.0.0.1:PORT/`, or `rediss://localhost:PORT/` for a TLS server.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}/", self.port),
            Some(_) => format!("rediss://localhost:{}/", self.port),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes a fresh test CA (`ca.pem`) and a server certificate it issued for `localhost` and
/// `127.0.0.1` (`server.pem`, `server.key`) into `dir`.
fn write_test_certificates(dir: &std::path::Path) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "perishable test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

/// `redis-server` arguments for TLS only on `port`, with the certificates in `dir` (also for
/// a cluster's bus).
fn tls_server_args<'c>(
    command: &'c mut Command,
    dir: &std::path::Path,
    port: u16,
) -> &'c mut Command {
    command
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(dir.join("server.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .args(["--tls-auth-clients", "no", "--tls-cluster", "yes"])
}

/// A three-node Redis Cluster (three primaries, no replicas) on free loopback ports, made with
/// `redis-cli --cluster create`; every node is killed on drop.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
    tls: bool,
}

impl RedisCluster {
    /// Starts the nodes, joins them and waits until the cluster is `ok`. Tests that call this
    /// are marked `#[cfg_attr(perishable_missing_redis, ignore = "...")]`.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// The same, speaking only TLS (`rediss://`, the cluster bus too), with a certificate from
    /// a fresh test CA whose certificate is [`RedisCluster::ca_pem`].
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    /// The test CA of a cluster from [`RedisCluster::start_tls`].
    pub fn ca_pem(&self) -> std::path::PathBuf {
        assert!(self.tls, "a TLS cluster");
        self.dir.join("ca.pem")
    }

    /// `redis-cli` aimed at the node on `port`, speaking TLS when the cluster does.
    fn cli(&self, port: u16) -> Command {
        let mut cli = Command::new("redis-cli");
        cli.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        if self.tls {
            cli.arg("--tls")
                .arg("--cacert")
                .arg(self.dir.join("ca.pem"));
        }
        cli
    }

    fn start_with(tls: bool) -> Self {
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "perishable-redis-cluster-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // A node also listens on its port + 10000 (the cluster bus): both must be free.
        let mut ports = Vec::new();
        let mut listeners = Vec::new();
        while ports.len() < 3 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            if port > 55_000 || ports.contains(&port) {
                listeners.push(listener);
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                ports.push(port);
            }
            listeners.push(listener);
        }
        drop(listeners);
        if tls {
            write_test_certificates(&dir);
        }
        let mut cluster = Self {
            ports,
            children: Vec::new(),
            dir,
            tls,
        };
        cluster.spawn_nodes();
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = cluster
            .cli(cluster.ports[0])
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (installed with redis-server)");
        assert!(created.success(), "redis-cli --cluster create failed");
        // Every node must see the whole slot map before a client's first command.
        for _ in 0..400 {
            if cluster.ports.iter().all(|&port| {
                cluster
                    .cli(port)
                    .args(["CLUSTER", "INFO"])
                    .output()
                    .is_ok_and(|out| {
                        String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
                    })
            }) {
                return cluster;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the Redis Cluster did not reach cluster_state:ok");
    }

    /// Starts every node (again, after [`stop`](Self::stop): each keeps its `nodes-<port>.conf`,
    /// so the cluster forms again with the same slots) and waits until each accepts connections.
    pub fn spawn_nodes(&mut self) {
        for &port in &self.ports {
            let mut command = Command::new("redis-server");
            if self.tls {
                tls_server_args(&mut command, &self.dir, port);
            } else {
                command.args(["--port", &port.to_string()]);
            }
            let child = command
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--save", "", "--appendonly", "no"])
                .current_dir(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start redis-server (apt-get install redis-server): {e}")
                });
            self.children.push(child);
        }
        for &port in &self.ports {
            let up = (0..200).any(|_| {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || {
                    std::thread::sleep(Duration::from_millis(25));
                    false
                }
            });
            assert!(up, "redis-server (cluster node) did not start");
        }
    }

    /// Kills every node.
    pub fn stop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3` (`rediss://` for TLS): every node, as
    /// `store.url` takes them.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{}", nodes.join(","))
    }

    /// A command's calls on every node together (`INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        self.ports
            .iter()
            .map(|&port| {
                let stats = redis_reply(port, &["INFO", "commandstats"]);
                let prefix = format!("cmdstat_{command}:calls=");
                stats
                    .lines()
                    .find_map(|line| line.strip_prefix(&prefix))
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The node that holds `key`, by asking each: `EXISTS` answers `:1` on its owner only (the
    /// others answer `MOVED`).
    pub fn owner_of(&self, key: &str) -> Option<u16> {
        self.ports
            .iter()
            .copied()
            .find(|&port| redis_reply(port, &["EXISTS", key]).starts_with(":1"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends one command to the Redis on `port` over RESP and returns its whole reply as text
/// (a bulk string's contents, or a status, error or integer line).
pub fn redis_reply(port: u16, args: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    conn.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    match line.strip_prefix('$').map(|n| n.trim().parse::<i64>()) {
        Some(Ok(n)) if n >= 0 => {
            let mut body = vec![0u8; usize::try_from(n).unwrap() + 2];
            reader.read_exact(&mut body).unwrap();
            String::from_utf8_lossy(&body[..body.len() - 2]).into_owned()
        }
        _ => line.trim_end().to_owned(),
    }
}

/// `GET /openai/models` with `session` from device `fp`.
pub async fn models(proxy: &Proxy, session: &SessionObject, fp: &str) -> reqwest::Response {
    proxy
        .openai(reqwest::Method::GET, "models", &session.token, fp)
        .send()
        .await
        .unwrap()
}

/// Revokes `session` (`DELETE /session`) on `proxy`.
pub async fn revoke(proxy: &Proxy, session: &SessionObject, fp: &str) {
    let revoked = proxy
        .http
        .delete(proxy.url("/session"))
        .bearer_auth(&session.token)
        .header("x-perishable-fingerprint", fp)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
}

/// Waits until `proxy` refuses `session` as revoked.
pub async fn refused_within(proxy: &Proxy, session: &SessionObject, fp: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let response = models(proxy, session, fp).await;
        if response.status() == 401 {
            assert_eq!(error_code(response).await, "session_revoked");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepted after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two proxies in front of one mock upstream, sharing one store.
pub struct Pair {
    pub a: Proxy,
    pub b: Proxy,
}

/// A [`Pair`] on the store at `store_url`, under `prefix`, with a store timeout of
/// `timeout_ms`, each configured by `tweak`.
pub async fn pair_on(
    store_url: String,
    prefix: String,
    timeout_ms: u64,
    tweak: impl Fn(ConfigBuilder) -> ConfigBuilder,
) -> Pair {
    let mock = MockUpstream::start(MockOptions::new().api_key(SERVER_KEY))
        .await
        .unwrap();
    let proxy = || async {
        let config = tweak(
            config(&mock.base_url())
                .store_url(store_url.clone())
                .store_key_prefix(prefix.clone())
                .store_timeout_ms(timeout_ms),
        );
        Proxy {
            addr: serve(perishable::router(config.build().unwrap())).await,
            mock: mock.clone(),
            http: client(),
        }
    };
    Pair {
        a: proxy().await,
        b: proxy().await,
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

/// A [`Store`](perishable::store::Store) that hands every operation to a real one (memory or
/// Redis) and records what the proxy asked of the budget: every bucket named, every reservation
/// tried and passed, every settlement, and the stream slots given back.
#[derive(Debug)]
pub struct RecordingStore {
    inner: Arc<dyn Store>,
    /// Every bucket a reservation named, in the order first seen.
    buckets: Mutex<Vec<Bucket>>,
    /// The amount of every reservation tried, in order.
    tried: Mutex<Vec<u64>>,
    /// The amount of every reservation that passed, in order.
    reserved: Mutex<Vec<u64>>,
    /// The delta of every settlement, in order.
    settled: Mutex<Vec<i64>>,
    /// Completed `release_stream` calls.
    streams_released: AtomicUsize,
    /// How long each settlement waits before it reaches the inner store.
    settle_delay: Duration,
}

/// How many reservations and settlements a [`RecordingStore`] had recorded at some point.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mark {
    pub reserved: usize,
    pub settled: usize,
}

/// How long to wait for what the proxy does after a response ends (settling, giving back a
/// stream slot: spawned tasks).
const AFTERWARDS: Duration = Duration::from_secs(5);

impl RecordingStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            buckets: Mutex::default(),
            tried: Mutex::default(),
            reserved: Mutex::default(),
            settled: Mutex::default(),
            streams_released: AtomicUsize::new(0),
            settle_delay: Duration::ZERO,
        }
    }

    /// Each settlement waits `delay` before it reaches the inner store (a slow store).
    pub fn slow_settlements(mut self, delay: Duration) -> Self {
        self.settle_delay = delay;
        self
    }

    /// On a fresh [`MemoryStore`](perishable::store::MemoryStore).
    pub fn in_memory() -> Self {
        Self::new(Arc::new(perishable::store::MemoryStore::new()))
    }

    /// The buckets seen so far whose key starts with `prefix` (`fp:`, `sid:`, `ip:`, `global`).
    pub fn buckets(&self, prefix: &str) -> Vec<Bucket> {
        self.buckets
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b.key.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The one bucket seen whose key starts with `prefix`.
    pub fn only(&self, prefix: &str) -> Bucket {
        let mut found = self.buckets(prefix);
        assert_eq!(found.len(), 1, "one {prefix} bucket: {found:?}");
        found.remove(0)
    }

    /// The amounts of the reservations tried so far, passed or not.
    pub fn tried(&self) -> Vec<u64> {
        self.tried.lock().unwrap().clone()
    }

    /// The amounts of the reservations that passed so far.
    pub fn reserved(&self) -> Vec<u64> {
        self.reserved.lock().unwrap().clone()
    }

    /// The settlements made so far.
    pub fn settled(&self) -> Vec<i64> {
        self.settled.lock().unwrap().clone()
    }

    /// Where the records stand now.
    pub fn mark(&self) -> Mark {
        Mark {
            reserved: self.reserved.lock().unwrap().len(),
            settled: self.settled.lock().unwrap().len(),
        }
    }

    /// The whole tokens `bucket` holds now (0 in debt). Reserving more than its capacity never
    /// passes and takes nothing: the refusal says what the bucket holds.
    pub async fn level(&self, bucket: &Bucket) -> u64 {
        match self
            .inner
            .reserve_tokens(std::slice::from_ref(bucket), bucket.capacity + 1)
            .await
            .unwrap()
        {
            Reservation::Exhausted { available, .. } => available,
            other => panic!("a reservation above capacity passed: {other:?}"),
        }
    }

    /// Waits (settlement is spawned after the response ends) until `bucket` holds exactly
    /// `expected` tokens.
    pub async fn wait_level(&self, bucket: &Bucket, expected: u64, what: &str) {
        let deadline = tokio::time::Instant::now() + AFTERWARDS;
        loop {
            let level = self.level(bucket).await;
            if level == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} holds {level} tokens, expected {expected}",
                bucket.key
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (the slot is given back in a spawned task) until exactly `expected` stream slots
    /// have been given back to the store.
    pub async fn wait_streams_released(&self, expected: usize, what: &str) {
        let deadline = tokio::time::Instant::now() + AFTERWARDS;
        loop {
            let released = self.streams_released.load(Ordering::SeqCst);
            if released == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {released} stream slots given back, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `count` settlements have been made since `mark`; returns them.
    pub async fn settlements_since(&self, mark: Mark, count: usize, what: &str) -> Vec<i64> {
        let deadline = tokio::time::Instant::now() + AFTERWARDS;
        loop {
            let settled = self.settled();
            if settled.len() >= mark.settled + count {
                return settled[mark.settled..].to_vec();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} settlement(s) since the call, expected {count}: the usage was not \
                 read (the reservation stands)",
                settled.len() - mark.settled
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The usage the proxy read for the one call made since `mark`: its reservation minus what
    /// its settlement gave back.
    pub async fn usage_since(&self, mark: Mark, what: &str) -> u64 {
        let reserved = self.reserved();
        assert_eq!(
            reserved.len(),
            mark.reserved + 1,
            "{what}: one reservation per call"
        );
        let reserved = reserved[mark.reserved];
        let delta = self.settlements_since(mark, 1, what).await[0];
        u64::try_from(i64::try_from(reserved).unwrap() - delta).unwrap()
    }
}

impl Store for RecordingStore {
    fn rate_limiter(&self, policy: RatePolicy) -> Arc<dyn RateLimiter> {
        self.inner.rate_limiter(policy)
    }

    fn insert_once<'a>(&'a self, set: Set, id: &'a str, expires_at: u64) -> StoreFuture<'a, bool> {
        self.inner.insert_once(set, id, expires_at)
    }

    fn contains<'a>(&'a self, set: Set, id: &'a str) -> StoreFuture<'a, bool> {
        self.inner.contains(set, id)
    }

    fn contains_now(&self, set: Set, id: &str) -> Option<bool> {
        self.inner.contains_now(set, id)
    }

    fn insert_once_now(&self, set: Set, id: &str, expires_at: u64) -> Option<bool> {
        self.inner.insert_once_now(set, id, expires_at)
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.inner.ping()
    }

    fn admit_session<'a>(
        &'a self,
        keys: &'a [String],
        jti: &'a str,
        exp: u64,
        max: u32,
    ) -> StoreFuture<'a, Admission> {
        self.inner.admit_session(keys, jti, exp, max)
    }

    fn release_session<'a>(&'a self, keys: &'a [String], jti: &'a str) -> StoreFuture<'a, ()> {
        self.inner.release_session(keys, jti)
    }

    fn replace_session<'a>(
        &'a self,
        keys: &'a [String],
        old: &'a str,
        new: &'a str,
        exp: u64,
    ) -> StoreFuture<'a, ()> {
        self.inner.replace_session(keys, old, new, exp)
    }

    fn reserve_tokens<'a>(
        &'a self,
        buckets: &'a [Bucket],
        amount: u64,
    ) -> StoreFuture<'a, Reservation> {
        {
            let mut seen = self.buckets.lock().unwrap();
            for bucket in buckets {
                if !seen.iter().any(|b| b.key == bucket.key) {
                    seen.push(bucket.clone());
                }
            }
        }
        self.tried.lock().unwrap().push(amount);
        Box::pin(async move {
            let answer = self.inner.reserve_tokens(buckets, amount).await;
            if matches!(answer, Ok(Reservation::Reserved)) {
                self.reserved.lock().unwrap().push(amount);
            }
            answer
        })
    }

    fn settle_tokens<'a>(&'a self, buckets: &'a [Bucket], delta: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            tokio::time::sleep(self.settle_delay).await;
            let done = self.inner.settle_tokens(buckets, delta).await;
            self.settled.lock().unwrap().push(delta);
            done
        })
    }

    fn acquire_stream<'a>(&'a self, session: &'a str, max: u32, exp: u64) -> StoreFuture<'a, bool> {
        self.inner.acquire_stream(session, max, exp)
    }

    fn release_stream<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Counted once the store has freed the slot, so a waiter may rely on it.
            let released = self.inner.release_stream(session).await;
            self.streams_released.fetch_add(1, Ordering::SeqCst);
            released
        })
    }

    fn register_app_attest_key<'a>(
        &'a self,
        key_id: &'a str,
        key: &'a AppAttestKey,
        expires_at: u64,
    ) -> StoreFuture<'a, bool> {
        self.inner.register_app_attest_key(key_id, key, expires_at)
    }

    fn app_attest_key<'a>(&'a self, key_id: &'a str) -> StoreFuture<'a, Option<AppAttestKey>> {
        self.inner.app_attest_key(key_id)
    }

    fn advance_app_attest_counter<'a>(
        &'a self,
        key_id: &'a str,
        counter: u32,
        expires_at: u64,
    ) -> StoreFuture<'a, bool> {
        self.inner
            .advance_app_attest_counter(key_id, counter, expires_at)
    }
}

/// Runs `tests/python/{script}` with the proxy's URL and `SDK_PROMPT=prompt` (120 s at most),
/// and returns the JSON object on the last line it printed.
pub async fn run_sdk_script(script: &str, url: String, prompt: &str) -> Value {
    let path = repo().join("tests/python").join(script);
    let prompt = prompt.to_owned();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            Command::new(python())
                .arg(&path)
                .arg(&url)
                .env("SDK_PROMPT", prompt)
                .env("PYTHONUNBUFFERED", "1")
                .output()
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("{script} did not finish within 120 s"))
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{script} printed nothing; stderr: {stderr}"));
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{script} printed {line:?}, not JSON: {e}"))
}

/// The example proxy as `cargo test --workspace` builds it beside the tests
/// (`target/<profile>/examples/perishable-proxy`, from `examples/perishable-proxy.rs`).
pub fn example_binary() -> std::path::PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop(); // the test binary
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join("examples").join("perishable-proxy");
    assert!(
        binary.exists(),
        "{} is missing: run the whole suite (cargo test --workspace), or \
         cargo build --example perishable-proxy first",
        binary.display()
    );
    binary
}
