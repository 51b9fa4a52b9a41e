//! End to end in real headless Chromium: `tests/browser/run.mjs` drives the demo page and the
//! browser client (`/client.js`) through a proxy, streams with the official `openai` npm SDK,
//! replays the page's token from Node, tries a disallowed origin, and saves a screenshot; its
//! Realtime suite opens `/openai/realtime` with the client's helper and with the SDK's
//! `OpenAIRealtimeWebSocket`, tries handshakes the proxy must refuse, and uses the demo's
//! Realtime tab.
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use axum::response::Html;
use axum::routing::get;
use axum::serve::ListenerExt;
use perishable::config::DpopMode;
use perishable_mock::{MockOptions, MockUpstream};
use serde_json::Value;

/// Chromium, found the usual ways: `CHROME_PATH` (or `CHROMIUM`), then `chromium`,
/// `chromium-browser`, `google-chrome` and `google-chrome-stable` on the `PATH`.
fn chromium() -> Option<PathBuf> {
    for var in ["CHROME_PATH", "CHROMIUM"] {
        if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(path));
        }
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&dirs).map(move |dir| dir.join(name)))
    .find(|candidate| candidate.is_file())
}
/// How long the browser script may run.
const TIMEOUT: Duration = Duration::from_secs(180);

/// One Chromium at a time: the browser tests would otherwise share two cores between two of them.
static CHROMIUM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    crate::support::repo()
}

fn node() -> String {
    std::env::var("NODE").unwrap_or_else(|_| "node".to_owned())
}

/// Chromium, Node and the npm packages; `Err` says what is missing.
fn prerequisites() -> Result<(), String> {
    match chromium() {
        Some(path) if path.exists() => {}
        Some(path) => return Err(format!("{} is missing", path.display())),
        None => {
            return Err(
                "no Chromium: set CHROME_PATH, or put chromium or google-chrome on the PATH \
                 (apt-get install -y chromium)"
                    .to_owned(),
            );
        }
    }
    let modules = repo().join("tests/browser/node_modules");
    for package in ["playwright-core", "esbuild", "openai"] {
        if !modules.join(package).exists() {
            return Err(format!(
                "{} is missing (npm ci --prefix tests/browser)",
                modules.join(package).display()
            ));
        }
    }
    match Command::new(node()).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{} --version failed: {}",
            node(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", node())),
    }
}

/// Serves `app` on an already bound listener, with connect info and TCP_NODELAY.
fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
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
}

/// Runs `command` to completion, killing it after `timeout`.
fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            return Err(format!(
                "did not finish within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&err)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `tests/browser/run.mjs` against `url` with `args` (one Chromium at a time), and returns
/// its JSON line once it passed.
async fn run_script(url: &str, args: &[&str], screenshot: &std::path::Path) -> Value {
    let _one_at_a_time = CHROMIUM.lock().await;
    let script = repo().join("tests/browser/run.mjs");
    let mut command = Command::new(node());
    command
        .arg(&script)
        .arg(url)
        .args(args)
        .env("SCREENSHOT", screenshot)
        .env("CHROMIUM", chromium().unwrap_or_default());
    let output = tokio::task::spawn_blocking(move || run_with_timeout(command, TIMEOUT))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("node {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "run.mjs printed no JSON ({}); stdout: {stdout}\nstderr: {stderr}",
                output.status
            )
        });
    let result: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("run.mjs printed {line:?}, not JSON: {e}"));
    println!("run.mjs: {result}");
    assert!(
        output.status.success() && result["ok"] == true,
        "run.mjs failed ({}): {}\nstderr: {stderr}",
        output.status,
        serde_json::to_string_pretty(&result["failures"]).unwrap()
    );
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    perishable_missing_browser,
    ignore = "needs Chromium, Node.js >= 20 and `npm ci --prefix tests/browser`"
)]
async fn browser_client_in_headless_chromium() {
    if let Err(why) = prerequisites() {
        panic!(
            "the browser test needs Chromium, Node and the npm packages \
             (apt-get install -y chromium; npm ci --prefix tests/browser): {why}"
        );
    }

    // A mock upstream slow enough (40 ms between chunks) that incremental arrival shows.
    let mock = MockUpstream::start(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(40))
            .api_key(crate::support::SERVER_KEY),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    // The default 16-bit proof of work, as a real deployment would ask of the browser.
    let config = crate::support::config(&mock.base_url())
        .pow_difficulty(16)
        .cors_allowed_origins([url.clone()])
        .build()
        .unwrap();
    let app = axum::Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("../../examples/demo/index.html")) }),
        )
        .merge(perishable::router(config));
    serve(listener, app);

    let screenshot = repo().join("target/test-artifacts/demo.png");
    let _ = std::fs::remove_file(&screenshot);
    let result = run_script(&url, &[], &screenshot).await;

    // The module as the router serves it.
    let module = &result["module"];
    assert_eq!(module["status"], 200);
    assert!(
        module["content_type"]
            .as_str()
            .unwrap()
            .starts_with("text/javascript"),
        "{module}"
    );
    assert!(
        module["cache_control"]
            .as_str()
            .unwrap()
            .contains("max-age"),
        "{module}"
    );
    assert_eq!(module["same_as_repo"], true);

    // 1. A DPoP-bound session, then a stream through the official SDK, chunk by chunk.
    assert_eq!(result["mint"]["token_type"], "DPoP", "{}", result["mint"]);
    let stream = &result["stream"];
    let chunks = stream["content_chunks"].as_u64().unwrap();
    let distinct = stream["distinct_times"].as_u64().unwrap();
    let (first, last) = (
        stream["first_ms"].as_f64().unwrap(),
        stream["last_ms"].as_f64().unwrap(),
    );
    assert!(chunks >= 3, "{stream}");
    assert!(distinct >= 3, "chunks arrived together: {stream}");
    assert!(
        last - first >= 200.0,
        "the first chunk should arrive well before the last: {stream}"
    );
    assert_eq!(stream["finish"], "stop");

    // The SDK's request headers pass the proxy's CORS list (User-Agent is dropped by the client).
    for header in result["sdk_headers"].as_array().unwrap() {
        let header = header.as_str().unwrap();
        assert!(
            header == "user-agent" || perishable::CORS_ALLOWED_HEADERS.contains(&header),
            "the openai SDK sends {header:?}, which CORS_ALLOWED_HEADERS does not allow"
        );
    }

    // 2. The token replayed from Node, with fingerprint and User-Agent but without the key.
    let replay = &result["replay"];
    assert_eq!(replay["bearer"]["status"], 401, "{replay}");
    assert_eq!(replay["bearer"]["code"], "dpop_required", "{replay}");
    assert_eq!(replay["dpop_without_proof"]["status"], 401, "{replay}");
    assert_eq!(replay["dpop_without_proof"]["code"], "dpop_required");
    assert_eq!(replay["dpop_foreign_key"]["status"], 401, "{replay}");
    assert_eq!(replay["dpop_foreign_key"]["code"], "invalid_dpop_proof");
    if !replay["dpop_reused_page_proof"].is_null() {
        assert_eq!(replay["dpop_reused_page_proof"]["status"], 401, "{replay}");
        assert_eq!(
            replay["dpop_reused_page_proof"]["code"],
            "invalid_dpop_proof"
        );
    }

    // 3. A page on another origin could not mint.
    let disallowed = &result["disallowed"];
    assert_eq!(disallowed["minted"], false, "{disallowed}");
    let refused_by_origin = disallowed["node_challenge_with_origin"]["status"] == 403
        && disallowed["node_challenge_with_origin"]["code"] == "origin_not_allowed";
    let failed_cors = disallowed["error"]
        .as_str()
        .is_some_and(|e| e.contains("fetch"));
    assert!(refused_by_origin || failed_cors, "{disallowed}");

    // 4. The demo streamed an answer, and its screenshot was saved.
    assert_eq!(result["demo"]["state"], "done", "{}", result["demo"]);
    let size = std::fs::metadata(&screenshot)
        .unwrap_or_else(|e| panic!("{}: {e}", screenshot.display()))
        .len();
    assert!(size > 0, "{} is empty", screenshot.display());

    // What reached the upstream: the SDK's stream, its models list, and the demo's stream, each
    // with the server's key; no replay got through, and no session header was forwarded.
    let seen = mock.requests();
    let paths: Vec<String> = seen
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert_eq!(
        paths,
        [
            "POST /v1/chat/completions",
            "GET /v1/models",
            "POST /v1/chat/completions"
        ],
        "requests that reached the upstream"
    );
    for request in &seen {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {}", crate::support::SERVER_KEY).as_str())
        );
        for name in ["dpop", "x-perishable-fingerprint", "cookie"] {
            assert!(
                request.header(name).is_none(),
                "{name} reached the upstream"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    perishable_missing_browser,
    ignore = "needs Chromium, Node.js >= 20 and `npm ci --prefix tests/browser`"
)]
async fn realtime_from_headless_chromium() {
    if let Err(why) = prerequisites() {
        panic!(
            "the browser test needs Chromium, Node and the npm packages \
             (apt-get install -y chromium; npm ci --prefix tests/browser): {why}"
        );
    }

    // The mock's Realtime API, a word every 40 ms, behind a proxy with the route on and DPoP
    // required: every session the page gets is key-bound, so every handshake carries a proof.
    let mock = MockUpstream::start(
        MockOptions::new()
            .chunk_interval(Duration::from_millis(40))
            .api_key(crate::support::SERVER_KEY),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let config = crate::support::config(&mock.base_url())
        .pow_difficulty(16)
        .cors_allowed_origins([url.clone()])
        .session_dpop(DpopMode::Required)
        .realtime_enabled(true)
        // The page opens its sockets one after another; a closed one's slot is given back in
        // the background, so leave room rather than race it.
        .realtime_max_connections_per_session(4)
        .upstream_allowed_models(["gpt-4o-mini", "gpt-realtime"])
        .build()
        .unwrap();
    let app = axum::Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("../../examples/demo/index.html")) }),
        )
        .merge(perishable::router(config));
    serve(listener, app);

    let screenshot = repo().join("target/test-artifacts/demo.png");
    let realtime_screenshot = repo().join("target/test-artifacts/demo-realtime.png");
    let _ = std::fs::remove_file(&realtime_screenshot);
    let result = run_script(&url, &["--realtime"], &screenshot).await;

    // 1 and 2. The helper's socket and the SDK's: a conversation each, on a key-bound session.
    for name in ["raw", "sdk"] {
        let talk = &result[name];
        assert_eq!(talk["protocol"], "realtime", "{talk}");
        assert_eq!(talk["token_type"], "DPoP", "{talk}");
        assert_eq!(talk["model"], "gpt-realtime", "{talk}");
        assert_eq!(talk["status"], "completed", "{talk}");
        assert!(talk["deltas"].as_u64().unwrap() >= 3, "{talk}");
        assert!(
            talk["distinct_times"].as_u64().unwrap() >= 3,
            "the deltas arrived together: {talk}"
        );
        assert!(
            talk["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "{talk}"
        );
    }
    assert_eq!(result["sdk"]["websocket_restored"], true);

    // A refresh revoked the token an open connection used: the proxy closed it.
    let refresh = &result["refresh"];
    assert_ne!(refresh["before"], refresh["after"], "{refresh}");
    assert_eq!(refresh["a_close"]["code"], 1008, "{refresh}");

    // 3. What the proxy refused never opened.
    let refused = &result["refused"];
    for case in [
        "wrong_fingerprint",
        "without_proof",
        "replayed_proof",
        "without_token",
    ] {
        assert_eq!(refused[case]["opened"], false, "{case}: {refused}");
    }
    assert_eq!(refused["first_use"]["opened"], true, "{refused}");

    // 4. The demo's Realtime tab, and its screenshot.
    assert_eq!(result["demo"]["log_state"], "done", "{}", result["demo"]);
    let size = std::fs::metadata(&realtime_screenshot)
        .unwrap_or_else(|e| panic!("{}: {e}", realtime_screenshot.display()))
        .len();
    assert!(size > 0, "{} is empty", realtime_screenshot.display());

    // The upstream saw six handshakes (the helper's, the SDK's, two around the refresh, the
    // proof's first use, the demo's), each with the server key and none of the page's
    // credentials.
    let handshakes: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.starts_with("/v1/realtime"))
        .collect();
    assert_eq!(handshakes.len(), 6, "handshakes that reached the upstream");
    for request in &handshakes {
        assert_eq!(request.path_and_query, "/v1/realtime?model=gpt-realtime");
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {}", crate::support::SERVER_KEY).as_str())
        );
        for name in ["dpop", "x-perishable-fingerprint", "cookie"] {
            assert!(
                request.header(name).is_none(),
                "{name} reached the upstream"
            );
        }
        let protocols = request.header("sec-websocket-protocol").unwrap_or("");
        assert!(
            !protocols.contains("openai-insecure-api-key") && !protocols.contains("perishable-"),
            "a credential subprotocol reached the upstream: {protocols}"
        );
    }
    // The conversations' events reached the upstream: three user messages, three responses.
    let events = mock.realtime_events();
    let count = |kind: &str| {
        events
            .iter()
            .filter(|e| e.contains(&format!("\"type\":\"{kind}\"")))
            .count()
    };
    assert_eq!(count("conversation.item.create"), 3, "{events:?}");
    assert_eq!(count("response.create"), 3, "{events:?}");
}
