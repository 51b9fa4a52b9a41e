//! The Perishable proxy as a program: the PROTOCOL routes at `/`.
//!
//! ```text
//! cargo run --example perishable-proxy -- [--config FILE] [--port N] [--host ADDR] [--upstream URL]
//! ```
//!
//! Configuration: defaults < the config file (`--config FILE`, or `./perishable.toml` when present)
//! < environment (`OPENAI_API_KEY`, `OPENAI_BASE_URL`, `PORT`, `PERISHABLE_JWT_SECRET`,
//! `PERISHABLE_STORE_URL`, `PERISHABLE_CAPTCHA_SECRET`) < flags. With neither an API key nor a
//! base URL anywhere (a file that names OpenAI's URL has named one) it starts the built-in mock
//! upstream on loopback and proxies to it, so the demo works offline. A base URL without a key
//! is a keyless upstream (a local Ollama or vLLM).
//!
//! `GET /` serves a demo page: a chat box that streams through the proxy with the browser client
//! (`/client.js`), and a Realtime tab (text mode) that talks over a WebSocket to
//! `/openai/realtime`. With no `cors.allowed_origins` and no `server.public_url` configured, the
//! proxy's own origins (`http://127.0.0.1:PORT`, `http://localhost:PORT`) are allowed, so the
//! page can call it.
//!
//! With the built-in mock upstream, the Realtime route is on (`realtime.enabled = true`: the mock
//! speaks the Realtime API) unless the config file sets `realtime.enabled` itself. With a real
//! upstream it follows the configuration, where it is off by default.
//!
//! Logs go to stderr; set `RUST_LOG=perishable=debug` for more. With `--metrics ADDR` (or
//! `PERISHABLE_METRICS_ADDR`) the metrics are served in Prometheus format at
//! `http://ADDR/metrics`, on that separate listener only: never under the public routes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use perishable::{Config, ConfigBuilder};
use perishable_mock::{MockOptions, MockUpstream};

const USAGE: &str = "\
perishable-proxy: an OpenAI-compatible proxy that never gives clients the API key

USAGE:
    perishable-proxy [--config FILE] [--port N] [--host ADDR] [--upstream URL] [--metrics ADDR]

OPTIONS:
    --config FILE    PROTOCOL config file, TOML or JSON (default: ./perishable.toml when present)
    --port N         port to listen on (default: $PORT, else 8080)
    --host ADDR      address to listen on (default: 127.0.0.1)
    --upstream URL   upstream base URL (overrides upstream.base_url and $OPENAI_BASE_URL)
    --metrics ADDR   serve Prometheus metrics on a separate listener, e.g. 127.0.0.1:9464
                     (default: $PERISHABLE_METRICS_ADDR; off when unset)
    -h, --help       this text

ENVIRONMENT:
    OPENAI_API_KEY, OPENAI_BASE_URL, PORT, PERISHABLE_JWT_SECRET, PERISHABLE_STORE_URL,
    PERISHABLE_CAPTCHA_SECRET, PERISHABLE_METRICS_ADDR
    With neither an API key nor a base URL, a built-in mock upstream is served so the demo works
    offline, with the Realtime route on unless the config file sets realtime.enabled; a base URL
    without a key is a keyless upstream (a local Ollama or vLLM).";

struct Args {
    config: Option<PathBuf>,
    port: Option<u16>,
    host: Option<IpAddr>,
    upstream: Option<String>,
    metrics: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        port: None,
        host: None,
        upstream: None,
        metrics: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--config" => args.config = Some(PathBuf::from(value("--config")?)),
            "--port" => {
                let v = value("--port")?;
                args.port = Some(
                    v.parse()
                        .map_err(|_| format!("--port: {v:?} is not a port"))?,
                );
            }
            "--host" => {
                let v = value("--host")?;
                args.host = Some(
                    v.parse()
                        .map_err(|_| format!("--host: {v:?} is not an IP address"))?,
                );
            }
            "--upstream" => args.upstream = Some(value("--upstream")?),
            "--metrics" => {
                let v = value("--metrics")?;
                args.metrics = Some(
                    v.parse()
                        .map_err(|_| format!("--metrics: {v:?} is not an address (IP:PORT)"))?,
                );
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(args)
}

/// The demo page: a chat box streaming through the proxy with the browser client.
async fn demo_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("demo/index.html"))
}

/// The configuration, and what its file sets itself (whatever the value: a file that names
/// OpenAI's URL has named a base URL).
struct Loaded {
    builder: ConfigBuilder,
    /// The file has `realtime.enabled`.
    sets_realtime: bool,
    /// The file has `upstream.base_url`.
    sets_base_url: bool,
}

fn load(args: &Args) -> Result<Loaded, String> {
    let default_file = PathBuf::from("perishable.toml");
    let file = match &args.config {
        Some(path) => Some(path.clone()),
        None if default_file.exists() => Some(default_file),
        None => None,
    };
    let mut loaded = match &file {
        Some(path) => {
            tracing::info!(file = %path.display(), "reading the configuration");
            let builder = ConfigBuilder::from_file(path).map_err(|e| e.to_string())?;
            Loaded {
                builder,
                sets_realtime: file_sets(path, "realtime", "enabled"),
                sets_base_url: file_sets(path, "upstream", "base_url"),
            }
        }
        None => Loaded {
            builder: Config::builder(),
            sets_realtime: false,
            sets_base_url: false,
        },
    };
    loaded.builder = loaded.builder.apply_env(|k| std::env::var(k).ok());
    if let Some(url) = &args.upstream {
        loaded.builder = loaded.builder.upstream_base_url(url.clone());
    }
    Ok(loaded)
}

/// Whether the config file at `path` has `section.key`. It is read as `ConfigBuilder::from_file`
/// reads it: JSON when its name ends in `.json` or its text starts with `{`, TOML otherwise.
fn file_sets(path: &Path, section: &str, key: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    if path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{') {
        serde_json::from_str::<serde_json::Value>(&text)
            .is_ok_and(|v| v.get(section).and_then(|r| r.get(key)).is_some())
    } else {
        toml::from_str::<toml::Table>(&text)
            .is_ok_and(|t| t.get(section).and_then(|r| r.get(key)).is_some())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,perishable=info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never in a log file or a collector.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perishable-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let Loaded {
        mut builder,
        sets_realtime,
        sets_base_url,
    } = load(&args)?;

    let metrics = match args.metrics {
        Some(addr) => Some(addr),
        None => match std::env::var("PERISHABLE_METRICS_ADDR") {
            Ok(v) if !v.is_empty() => Some(
                v.parse()
                    .map_err(|_| format!("PERISHABLE_METRICS_ADDR: {v:?} is not an address"))?,
            ),
            _ => None,
        },
    };
    if let Some(addr) = metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
        tracing::info!("metrics in Prometheus format at http://{addr}/metrics");
    }

    // The mock only when neither a key nor a base URL is given: a base URL alone is a keyless
    // upstream (a local Ollama or vLLM), forwarded to without Authorization.
    let base_url_given = args.upstream.is_some()
        || std::env::var("OPENAI_BASE_URL").is_ok_and(|v| !v.is_empty())
        || sets_base_url;
    if !builder.has_upstream_api_key() && !base_url_given {
        let key = format!("sk-mock-{}", std::process::id());
        let mock = MockUpstream::start(MockOptions::new().api_key(key.clone()).record(false))
            .await
            .map_err(|e| format!("cannot start the mock upstream: {e}"))?;
        tracing::warn!(
            mock = %mock.base_url(),
            "no OPENAI_API_KEY and no OPENAI_BASE_URL: serving the built-in mock upstream (set OPENAI_API_KEY to use OpenAI, or OPENAI_BASE_URL for a keyless upstream)"
        );
        builder = builder
            .upstream_base_url(mock.base_url())
            .upstream_api_key(key);
        // The mock speaks Realtime, so the demo's Realtime tab works offline too.
        if !sets_realtime {
            tracing::info!(
                "the built-in mock speaks Realtime: GET /openai/realtime is on (set realtime.enabled in the config file to choose)"
            );
            builder = builder.realtime_enabled(true);
        }
    }
    let port = match args.port {
        Some(p) => p,
        None => match std::env::var("PORT") {
            Ok(v) if !v.is_empty() => v
                .parse()
                .map_err(|_| format!("PORT: {v:?} is not a port"))?,
            _ => 8080,
        },
    };
    let host = args.host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;

    if !builder.has_cors_allowed_origins() && !builder.has_server_public_url() {
        let own = [
            format!("http://127.0.0.1:{}", local.port()),
            format!("http://localhost:{}", local.port()),
        ];
        tracing::info!(origins = ?own, "no cors.allowed_origins: allowing the demo page's own origins");
        builder = builder.cors_allowed_origins(own);
    }
    let config = builder.build().map_err(|e| e.to_string())?;
    let upstream = config.upstream_base_url().to_owned();

    let app = axum::Router::new()
        .route("/", axum::routing::get(demo_page))
        .merge(perishable::try_router::<()>(config).map_err(|e| e.to_string())?);
    // One line on stdout, for people and scripts; the log says where calls go.
    tracing::info!(%upstream, "forwarding /openai to the upstream");
    println!("perishable-proxy listening on http://{local}");

    // HTTP/1.1 with the peer address on every request (for the per-IP limits), TCP_NODELAY, a
    // 30 s limit on request headers, and a graceful stop on Ctrl-C.
    perishable::serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await;
    Ok(())
}
