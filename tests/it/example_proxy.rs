//! The example proxy binary as a user runs it (`cargo run --example perishable-proxy`): it serves
//! over HTTP/1.1, closes a connection whose request headers trickle in for more than 30 s, serves
//! the Realtime route with its built-in mock unless the config file says otherwise, and on
//! Ctrl-C (SIGINT) stops taking connections and exits.
//!
//! It runs the binary `cargo test --workspace` builds beside the tests: after changing the
//! example, run the whole suite (or `cargo build --example perishable-proxy`) so the binary is
//! not stale.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The example proxy on a free port, with the built-in mock upstream; kills it when dropped.
struct Example {
    child: Child,
    addr: SocketAddr,
}

/// The example proxy's command, with none of the PROTOCOL environment variables set.
fn command(extra_args: &[&str]) -> Command {
    let mut command = Command::new(crate::support::example_binary());
    command
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(extra_args)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("PORT")
        .env_remove("PERISHABLE_STORE_URL")
        .env_remove("PERISHABLE_JWT_SECRET")
        .env("RUST_LOG", "warn")
        .current_dir(std::env::temp_dir());
    command
}

impl Example {
    fn start() -> Self {
        Self::spawn(command(&[]))
    }

    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the example proxy (built by cargo test)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the proxy says where it listens")
                .unwrap();
            if let Some(url) = line.strip_prefix("perishable-proxy listening on http://") {
                break url.trim().parse().unwrap();
            }
        };
        Self { child, addr }
    }

    /// Mints a session for device `fingerprint` with `http` (`POST /session`) and returns its
    /// token.
    async fn mint(&self, http: &reqwest::Client, fingerprint: &str) -> String {
        let session: serde_json::Value = http
            .post(format!("http://{}/session", self.addr))
            .json(&serde_json::json!({ "fingerprint": fingerprint }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        session["token"]
            .as_str()
            .expect("a session token")
            .to_owned()
    }

    fn health(&self) -> String {
        self.raw("GET /health")
    }

    /// The whole answer to `<method> <path>` on a connection of its own.
    fn raw(&self, request_line: &str) -> String {
        let mut tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(
            format!("{request_line} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        answer
    }
}

/// `HEAD /health` answers as `GET /health` does, without the body: what a load balancer's check
/// may send.
#[test]
fn head_health_is_get_without_the_body() {
    let proxy = Example::start();
    let get = proxy.raw("GET /health");
    let head = proxy.raw("HEAD /health");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let (head_headers, head_body) = head.split_once("\r\n\r\n").unwrap();
    assert_eq!(head_body, "", "{head}");
    let (_, get_body) = get.split_once("\r\n\r\n").unwrap();
    assert_eq!(get_body, r#"{"status":"ok"}"#);
    assert!(
        head_headers
            .to_ascii_lowercase()
            .contains(&format!("content-length: {}", get_body.len())),
        "{head_headers}"
    );
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_client_that_trickles_its_headers_is_cut_off_after_30_s() {
    let proxy = Example::start();
    let mut slow = TcpStream::connect(proxy.addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    // Without the header read timeout the connection stays open: the read below then times out
    // instead of seeing the close.
    slow.set_read_timeout(Some(Duration::from_secs(45)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = slow.read(&mut buf);
    let waited = started.elapsed();
    let closed = match &read {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(
        closed,
        "the connection should be closed, got {read:?} after {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(25) && waited < Duration::from_secs(44),
        "closed after {waited:?}, expected about 30 s"
    );
    // Other clients were served all along.
    assert!(proxy.health().starts_with("HTTP/1.1 200 OK"));
}

#[test]
fn ctrl_c_stops_the_proxy() {
    let mut proxy = Example::start();
    assert!(proxy.health().starts_with("HTTP/1.1 200 OK"));
    let status = Command::new("kill")
        .args(["-INT", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the proxy is still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Exited by itself, successfully: its listener went with it. (Connecting to the old port
    // proves nothing here: the other tests in this binary bind free ports all the time.)
    assert!(exited.success(), "exit status {exited}");
}

/// A base URL without a key is a keyless upstream (a local Ollama or vLLM): calls are forwarded
/// to it without `Authorization`, and the built-in mock is not started.
#[test]
fn a_base_url_without_a_key_is_a_keyless_upstream() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = runtime
        .block_on(perishable_mock::MockUpstream::start(
            perishable_mock::MockOptions::new(),
        ))
        .unwrap();
    let config =
        std::env::temp_dir().join(format!("perishable-keyless-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[pow]\ndifficulty = 0\n[session]\nmin_entropy_score = 0\n",
    )
    .unwrap();
    let mut command = command(&["--config", config.to_str().unwrap()]);
    command.env("OPENAI_BASE_URL", mock.base_url());
    let proxy = Example::spawn(command);

    runtime.block_on(async {
        let http = reqwest::Client::builder()
            .user_agent("keyless-test/1.0")
            .build()
            .unwrap();
        let base = format!("http://{}", proxy.addr);
        let token = proxy.mint(&http, "device-keyless-1").await;
        let models = http
            .get(format!("{base}/openai/models"))
            .bearer_auth(token)
            .header("x-perishable-fingerprint", "device-keyless-1")
            .send()
            .await
            .unwrap();
        assert_eq!(models.status(), 200);
    });
    let received = mock.requests();
    assert_eq!(received.len(), 1, "the call reached the keyless upstream");
    assert_eq!(received[0].path_and_query, "/v1/models");
    assert!(
        received[0].header("authorization").is_none(),
        "no Authorization is sent to a keyless upstream"
    );
    let _ = std::fs::remove_file(config);
}

/// With its built-in mock the example serves the Realtime route, for the demo's Realtime tab
/// (the mock speaks Realtime), unless the config file sets `realtime.enabled` itself.
#[test]
fn the_built_in_mock_serves_realtime_unless_the_config_file_says() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    const UA: &str = "example-realtime-test/1.0";
    const FP: &str = "device-example-realtime-1";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let gates = "[pow]\ndifficulty = 0\n[session]\nmin_entropy_score = 0\n";
    for (name, file, opens) in [
        ("silent", gates.to_owned(), true),
        ("on", format!("{gates}[realtime]\nenabled = true\n"), true),
        (
            "off",
            format!("{gates}[realtime]\nenabled = false\n"),
            false,
        ),
    ] {
        let config = std::env::temp_dir().join(format!(
            "perishable-example-realtime-{name}-{}.toml",
            std::process::id()
        ));
        std::fs::write(&config, file).unwrap();
        let proxy = Example::spawn(command(&["--config", config.to_str().unwrap()]));
        let status = runtime.block_on(async {
            let http = reqwest::Client::builder().user_agent(UA).build().unwrap();
            let token = proxy.mint(&http, FP).await;
            let mut request = format!("ws://{}/openai/realtime?model=gpt-realtime", proxy.addr)
                .into_client_request()
                .unwrap();
            let headers = request.headers_mut();
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
            headers.insert("x-perishable-fingerprint", FP.parse().unwrap());
            headers.insert("user-agent", UA.parse().unwrap());
            match tokio_tungstenite::connect_async(request).await {
                Ok((mut socket, response)) => {
                    let first = tokio::time::timeout(Duration::from_secs(10), socket.next())
                        .await
                        .expect("an event within 10 s")
                        .expect("the connection is open")
                        .expect("a frame");
                    let event: serde_json::Value =
                        serde_json::from_str(first.to_text().unwrap()).unwrap();
                    assert_eq!(event["type"], "session.created", "{name}: {event}");
                    response.status().as_u16()
                }
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    response.status().as_u16()
                }
                Err(e) => panic!("{name}: {e}"),
            }
        });
        // Off, the upgrade is an ordinary call to a path not allowed: 403 path_not_allowed.
        let expected = if opens { 101 } else { 403 };
        assert_eq!(status, expected, "{name}: the handshake got {status}");
        let _ = std::fs::remove_file(config);
    }
}

/// An invalid base URL is refused at start, with the key named, mock or not.
#[test]
fn an_invalid_base_url_is_refused() {
    let output = command(&[])
        .env("OPENAI_BASE_URL", "not a url")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("upstream.base_url") && stderr.contains("absolute http or https URL"),
        "{stderr}"
    );
}

/// OpenAI without a key is a mistake, and the message says how to fix it.
#[test]
fn openai_without_a_key_names_the_variable() {
    let output = command(&[])
        .env("OPENAI_BASE_URL", "https://api.openai.com/v1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("OPENAI_API_KEY"), "{stderr}");
}

/// `rediss://`: the store over TLS. The server's certificate is checked against the platform's
/// roots, or the file `SSL_CERT_FILE` names: trusted, the proxy is ready and mints (a session
/// slot taken on the Redis); not trusted, `/health` says the store is unreachable.
#[test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server on the PATH (apt-get install redis-server)"
)]
fn a_rediss_store_is_reached_over_tls() {
    let redis = crate::support::Redis::start_tls();
    let config =
        std::env::temp_dir().join(format!("perishable-rediss-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[pow]\ndifficulty = 0\n[session]\nmin_entropy_score = 0\n",
    )
    .unwrap();
    let start = |trust: bool| {
        let mut command = command(&["--config", config.to_str().unwrap()]);
        command.env("PERISHABLE_STORE_URL", redis.url());
        if trust {
            command.env("SSL_CERT_FILE", redis.ca_pem());
        } else {
            command.env_remove("SSL_CERT_FILE");
        }
        Example::spawn(command)
    };

    let trusted = start(true);
    let health = trusted.health();
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let minted = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{}/session", trusted.addr))
            .json(&serde_json::json!({"fingerprint": "device-rediss-1"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(minted, 200, "a mint takes a session slot on the Redis");

    let untrusted = start(false);
    let health = untrusted.health();
    assert!(
        health.starts_with("HTTP/1.1 503") && health.contains("unreachable"),
        "a certificate the platform does not trust must not be accepted: {health}"
    );
    let _ = std::fs::remove_file(config);
}

/// A Redis Cluster over TLS, named by `PERISHABLE_STORE_URL` as its nodes (`rediss://a,b,c`):
/// the proxy is ready, mints (a session slot on the cluster) and proxies a budgeted call (a
/// split admission and its settlement), every node reached over TLS with the test CA.
#[test]
#[cfg_attr(
    perishable_missing_redis,
    ignore = "needs redis-server and redis-cli on the PATH (apt-get install redis-server)"
)]
fn a_rediss_cluster_is_reached_over_tls() {
    let cluster = crate::support::RedisCluster::start_tls();
    let config = std::env::temp_dir().join(format!(
        "perishable-rediss-cluster-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        "[pow]\ndifficulty = 0\n[session]\nmin_entropy_score = 0\n[budget]\ntokens_per_window = 100000\n",
    )
    .unwrap();
    let mut command = command(&["--config", config.to_str().unwrap()]);
    command
        .env("PERISHABLE_STORE_URL", cluster.url())
        .env("SSL_CERT_FILE", cluster.ca_pem());
    let proxy = Example::spawn(command);
    let health = proxy.health();
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let token = proxy.mint(&http, "device-rediss-cluster-1").await;
        let chat = http
            .post(format!("http://{}/openai/chat/completions", proxy.addr))
            .bearer_auth(token)
            .header("x-perishable-fingerprint", "device-rediss-cluster-1")
            .json(&serde_json::json!({
                "model": "gpt-4o-mini",
                "max_tokens": 20,
                "messages": [{"role": "user", "content": "hi"}]
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(chat.status(), 200, "{:?}", chat.text().await);
    });
    let _ = std::fs::remove_file(config);
}
