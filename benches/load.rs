//! Load harness: Perishable side by side with the direct call, a bare hyper proxy and (with
//! `benches/peers/`) other proxies, on loopback, in one run.
//!
//! ```text
//! cargo bench --bench load                         # about 3 minutes
//! PERISHABLE_LOAD_QUICK=1 cargo bench --bench load # about 30 seconds
//! ```
//!
//! Layout (2 cores): this process re-executes itself under `taskset -c 1` and runs the load
//! generator and the mock upstream there, on one current-thread runtime. Each system under test
//! (the bare proxy, the Perishable proxy, the Perishable proxy with every gate on) is this same
//! binary re-executed with `PERISHABLE_LOAD_ROLE`, under `taskset -c 0`, on one current-thread
//! runtime. Every socket has `TCP_NODELAY`.
//!
//! Scenarios, each alternating the targets round by round (the order rotates each round):
//! non-streaming at concurrency 1 and 64 (closed loop) and at a fixed rate; streaming (64
//! chunks 20 ms apart, stamped with the mock's send time); memory per open stream at 1k and 5k
//! streams; a slow client (one read a second, the mock writing 4 KB every 20 ms); Realtime
//! (latency added per WebSocket round trip, memory per open connection at 1k connections);
//! Redis (the memory store against Redis on loopback and behind a 250 µs one-way delay, with a
//! budget, at concurrency 1 and 64; Redis commands and round trips per call).
//!
//! Output: a table on stdout and JSON in `target/load-results.json` (`PERISHABLE_LOAD_OUT`).
//! The environment variables are listed in `docs/performance.md`.
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "load/client.rs"]
mod client;
#[path = "support/pow.rs"]
mod pow;
#[path = "load/realtime.rs"]
mod realtime;
#[path = "load/redis.rs"]
mod redis;
#[path = "load/servers.rs"]
mod servers;
#[path = "load/stats.rs"]
mod stats;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue, USER_AGENT};
use perishable::dpop::DpopSigner;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use client::{Run, Slot, StreamRun, Target, UA};
use servers::MockStats;
use stats::{Dist, r1, r3};

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    quick: bool,
    rounds: usize,
    slice: Duration,
    conc: usize,
    rate: Option<f64>,
    rate_conns: usize,
    streams: usize,
    scale: Vec<usize>,
    slow_secs: u64,
    slow_clients: usize,
    /// Realtime connections opened for the memory figure.
    realtime_conns: usize,
    skip: Vec<String>,
    mock_port: u16,
    targets_file: Option<String>,
    out: String,
    pin: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    env(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Settings {
    fn from_env() -> Self {
        let quick = env("PERISHABLE_LOAD_QUICK").is_some_and(|v| v != "0");
        let scale = env("PERISHABLE_LOAD_SCALE")
            .unwrap_or_else(|| if quick { "1000" } else { "1000,5000" }.to_owned())
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        Self {
            quick,
            rounds: env_parse("PERISHABLE_LOAD_ROUNDS", if quick { 1 } else { 3 }),
            slice: Duration::from_secs_f64(env_parse(
                "PERISHABLE_LOAD_SECS",
                if quick { 1.0 } else { 2.0 },
            )),
            conc: env_parse("PERISHABLE_LOAD_CONC", 64),
            rate: env("PERISHABLE_LOAD_RATE").and_then(|v| v.parse().ok()),
            rate_conns: env_parse("PERISHABLE_LOAD_RATE_CONNS", 32),
            streams: env_parse("PERISHABLE_LOAD_STREAMS", 16),
            scale,
            slow_secs: env_parse("PERISHABLE_LOAD_SLOW_SECS", if quick { 9 } else { 60 }),
            slow_clients: env_parse("PERISHABLE_LOAD_SLOW_CLIENTS", 8),
            realtime_conns: env_parse("PERISHABLE_LOAD_REALTIME_CONNS", 1_000),
            skip: env("PERISHABLE_LOAD_SKIP")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            mock_port: env_parse("PERISHABLE_LOAD_MOCK_PORT", 0),
            targets_file: env("PERISHABLE_LOAD_TARGETS_FILE"),
            out: env("PERISHABLE_LOAD_OUT").unwrap_or_else(|| {
                format!("{}/target/load-results.json", env!("CARGO_MANIFEST_DIR"))
            }),
            pin: env("PERISHABLE_LOAD_NO_PIN").is_none(),
        }
    }

    fn runs(&self, scenario: &str) -> bool {
        !self.skip.iter().any(|s| s == scenario)
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.iter().any(|a| a == "--test") && !args.iter().any(|a| a == "--bench") {
        println!("load: a benchmark, not a test; run `cargo bench --bench load`");
        return;
    }
    match env("PERISHABLE_LOAD_ROLE").as_deref() {
        Some("perishable") => servers::run_perishable(&upstream_env(), gates_env()),
        Some("bare") => servers::run_bare(&upstream_env()),
        Some("bare_ws") => servers::run_bare_ws(&upstream_env()),
        Some(other) => panic!("unknown PERISHABLE_LOAD_ROLE {other:?}"),
        None => harness(),
    }
}

fn upstream_env() -> String {
    env("PERISHABLE_LOAD_UPSTREAM").expect("PERISHABLE_LOAD_UPSTREAM")
}

fn gates_env() -> bool {
    env("PERISHABLE_LOAD_GATES").as_deref() == Some("on")
}

fn taskset_available() -> bool {
    std::process::Command::new("taskset")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn harness() {
    let settings = Settings::from_env();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Pin the load generator and the mock to core 1, re-executing under taskset once.
    if settings.pin && cores >= 2 && env("PERISHABLE_LOAD_PINNED").is_none() && taskset_available()
    {
        let exe = std::env::current_exe().expect("current exe");
        let status = std::process::Command::new("taskset")
            .arg("-c")
            .arg("1")
            .arg(exe)
            .args(std::env::args().skip(1))
            .env("PERISHABLE_LOAD_PINNED", "1")
            .status()
            .expect("taskset");
        std::process::exit(status.code().unwrap_or(1));
    }
    let pinned = env("PERISHABLE_LOAD_PINNED").is_some();
    if !pinned {
        eprintln!(
            "load: not pinned (cores: {cores}, taskset: {}); the system under test shares cores \
             with the load generator",
            taskset_available()
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(settings, pinned && taskset_available()));
}

// ---------------------------------------------------------------------------------------------
// Systems under test

struct Sut {
    name: &'static str,
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    addr: SocketAddr,
    pid: u32,
}

impl Drop for Sut {
    fn drop(&mut self) {
        // Closing its stdin ends it cleanly (a profiler wrapping it then writes its output).
        drop(self.stdin.take());
        if env("PERISHABLE_LOAD_SUT_WRAPPER").is_some() {
            for _ in 0..600 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.start_kill();
    }
}

async fn spawn_sut(name: &'static str, role: &str, upstream: &str, gates: bool, pin: bool) -> Sut {
    spawn_sut_with(name, role, upstream, gates, pin, &[]).await
}

/// [`spawn_sut`] with more environment variables for the system under test.
async fn spawn_sut_with(
    name: &'static str,
    role: &str,
    upstream: &str,
    gates: bool,
    pin: bool,
    extra: &[(&str, String)],
) -> Sut {
    let exe = std::env::current_exe().expect("current exe");
    // `PERISHABLE_LOAD_SUT_WRAPPER`: a command to run each system under test under (a
    // profiler, e.g. "valgrind --tool=callgrind"), split on spaces.
    let mut argv: Vec<String> = Vec::new();
    if pin {
        argv.extend(["taskset".to_owned(), "-c".to_owned(), "0".to_owned()]);
    }
    if let Some(wrapper) = env("PERISHABLE_LOAD_SUT_WRAPPER") {
        argv.extend(wrapper.split_whitespace().map(str::to_owned));
    }
    argv.push(exe.to_string_lossy().into_owned());
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd.env("PERISHABLE_LOAD_ROLE", role)
        .env("PERISHABLE_LOAD_UPSTREAM", upstream)
        .env("PERISHABLE_LOAD_GATES", if gates { "on" } else { "off" })
        .env_remove("PERISHABLE_LOAD_PINNED")
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn a system under test");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the system under test did not start in 120 s")
        .expect("read its stdout")
        .expect("it printed nothing");
    let addr = line
        .strip_prefix("LISTENING ")
        .expect("LISTENING <addr>")
        .parse()
        .expect("an address");
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::task::spawn_local(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pid = child.id().expect("pid");
    Sut {
        name,
        child,
        stdin: Some(stdin),
        addr,
        pid,
    }
}

/// A jittered, curved pointer trace with varied timing: what `POST /session` wants to see.
fn human_entropy() -> Value {
    let mut seed: u64 = 42;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut t = 0.0;
    let pointer: Vec<Value> = (0..80)
        .map(|i| {
            t += 8.0 + 30.0 * rand();
            let a = f64::from(i) / 15.0;
            json!([
                t,
                (300.0 + 120.0 * a.cos() + 5.0 * rand()).round(),
                (200.0 + 80.0 * (1.3 * a).sin() + 5.0 * rand()).round()
            ])
        })
        .collect();
    json!({ "pointer": pointer, "keys": [], "elapsed_ms": t })
}

/// Mints `n` sessions over HTTP (challenge, proof of work, entropy; a DPoP key each when
/// `dpop`), one fingerprint per slot.
async fn mint_slots(addr: SocketAddr, n: usize, dpop: bool) -> Vec<Slot> {
    let http = reqwest::Client::builder()
        .user_agent(UA)
        .tcp_nodelay(true)
        .build()
        .expect("reqwest");
    let base = format!("http://{addr}");
    let mut slots = Vec::with_capacity(n);
    for i in 0..n {
        let fingerprint = format!("load-device-{i:05}-0123456789abcdef");
        let challenge: Value = http
            .get(format!("{base}/challenge"))
            .send()
            .await
            .expect("GET /challenge")
            .json()
            .await
            .expect("challenge JSON");
        let difficulty = challenge["difficulty"].as_u64().unwrap_or(0) as u8;
        let pow = if difficulty == 0 {
            Value::Null
        } else {
            let c = challenge["challenge"].as_str().expect("challenge");
            json!({ "challenge": c, "nonce": pow::solve(c, difficulty) })
        };
        let mut req = http.post(format!("{base}/session")).json(&json!({
            "fingerprint": fingerprint,
            "entropy": human_entropy(),
            "pow": pow,
        }));
        let signer = dpop.then(|| Arc::new(DpopSigner::generate_es256()));
        if let Some(signer) = &signer {
            req = req.header(
                "dpop",
                signer.proof("POST", &format!("{base}/session"), None),
            );
        }
        let response = req.send().await.expect("POST /session");
        let status = response.status();
        let session: Value = response.json().await.expect("session JSON");
        assert_eq!(status, 200, "mint refused: {session}");
        let token = session["token"].as_str().expect("token").to_owned();
        let mut headers = HeaderMap::new();
        let scheme = if dpop { "DPoP" } else { "Bearer" };
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("{scheme} {token}")).expect("token header"),
        );
        headers.insert(
            HeaderName::from_static("x-perishable-fingerprint"),
            HeaderValue::from_str(&fingerprint).expect("fingerprint"),
        );
        headers.insert(USER_AGENT, HeaderValue::from_static(UA));
        slots.push(Slot {
            headers,
            dpop: signer.map(|s| (s, token)),
        });
    }
    slots
}

fn plain_slot(extra: &[(String, String)]) -> Slot {
    let mut headers = HeaderMap::new();
    headers.insert(USER_AGENT, HeaderValue::from_static(UA));
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer sk-client-holds-no-key"),
    );
    for (k, v) in extra {
        headers.insert(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    Slot {
        headers,
        dpop: None,
    }
}

async fn perishable_target(
    name: &'static str,
    upstream: &str,
    gates: bool,
    slots: usize,
    pin: bool,
) -> (Sut, Target) {
    let sut = spawn_sut(name, "perishable", upstream, gates, pin).await;
    let slots = mint_slots(sut.addr, slots, gates).await;
    let target = Target {
        name: name.to_owned(),
        addr: sut.addr,
        host: sut.addr.to_string(),
        base_path: "/openai".to_owned(),
        slots,
        pid: Some(sut.pid),
    };
    (sut, target)
}

async fn bare_target(upstream: &str, pin: bool) -> (Sut, Target) {
    let sut = spawn_sut("bare", "bare", upstream, false, pin).await;
    let target = Target {
        name: "bare".to_owned(),
        addr: sut.addr,
        host: sut.addr.to_string(),
        base_path: "/openai".to_owned(),
        slots: vec![plain_slot(&[])],
        pid: Some(sut.pid),
    };
    (sut, target)
}

/// Targets from `PERISHABLE_LOAD_TARGETS_FILE`:
/// `[{"name": "litellm", "url": "http://127.0.0.1:4000/v1", "headers": {..}, "pid": 123}]`.
fn external_targets(path: &str) -> Vec<Target> {
    let text = std::fs::read_to_string(path).expect("read PERISHABLE_LOAD_TARGETS_FILE");
    let list: Vec<Value> = serde_json::from_str(&text).expect("a JSON array of targets");
    list.iter()
        .map(|t| {
            let url: http::Uri = t["url"].as_str().expect("url").parse().expect("a URL");
            let authority = url.authority().expect("host:port").as_str().to_owned();
            let addr: SocketAddr = authority.parse().expect("an IP:port (loopback only)");
            let extra: Vec<(String, String)> = t["headers"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            Target {
                name: t["name"].as_str().expect("name").to_owned(),
                addr,
                host: authority,
                base_path: url.path().to_owned(),
                slots: vec![plain_slot(&extra)],
                pid: t["pid"].as_u64().map(|p| p as u32),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// /proc readings

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS:")
}

/// CPU time of every thread of `pid`, in ns (`/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Bytes queued in the kernel on `pid`'s TCP sockets: (unread receive queues, unsent send
/// queues), from `ss -tnp`. Where a proxy leaves upstream data unread, it applies backpressure.
fn socket_queues(pid: u32) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ss")
        .args(["-tnpH"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("pid={pid},");
    let (mut recv, mut send) = (0u64, 0u64);
    for line in text.lines().filter(|l| l.contains(&needle)) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 2 {
            recv += fields[1].parse::<u64>().unwrap_or(0);
            send += fields[2].parse::<u64>().unwrap_or(0);
        }
    }
    Some((recv, send))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_owned();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let nofile = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    json!({
        "commit": if dirty { format!("{commit}+changes") } else { commit },
        "loadavg_at_start": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "cores": cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        "cpu": model,
        "mem_gib": r1(mem_kb as f64 / 1024.0 / 1024.0),
        "kernel": kernel,
        "open_files_soft_hard": nofile,
    })
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// One target's merged closed-loop or fixed-rate runs.
#[derive(Default)]
struct Measured {
    run: Run,
    cpu_ns: u64,
}

fn rotated<T: Clone>(items: &[T], round: usize) -> Vec<T> {
    let mut v = items.to_vec();
    if !v.is_empty() {
        let n = round % v.len();
        v.rotate_left(n);
    }
    v
}

fn proofs_for(target: &Target, est_rps: f64, conc: usize, secs: f64) -> usize {
    if !target.is_dpop() {
        return 0;
    }
    (est_rps * secs * 1.3 / conc as f64).ceil() as usize + 16
}

/// The targets the harness starts itself (the others are peers).
const OWN_TARGETS: [&str; 4] = ["direct", "bare", "perishable", "perishable_gates"];

/// Closed loop at `conc`, `rounds` alternating slices per target.
async fn closed_scenario(
    targets: &[Target],
    conc: usize,
    settings: &Settings,
) -> BTreeMap<String, Measured> {
    let mut out: BTreeMap<String, Measured> = BTreeMap::new();
    let secs = settings.slice.as_secs_f64();
    // At concurrency 1 the harness's own targets are measured request by request (see
    // `client::interleaved`), for as long as their alternating slices would take. Peers (from
    // `PERISHABLE_LOAD_TARGETS_FILE`) keep their own slices: a request to a peer takes
    // milliseconds, and would leave the others idle (and cold) between two requests.
    let (own, peers): (Vec<Target>, Vec<Target>) = targets
        .iter()
        .cloned()
        .partition(|t| conc == 1 && OWN_TARGETS.contains(&t.name.as_str()));
    for round in 0..settings.rounds {
        if !own.is_empty() {
            let span = settings.slice.mul_f64(own.len() as f64);
            let proofs = own
                .iter()
                .map(|t| proofs_for(t, 8_000.0 / own.len() as f64, 1, span.as_secs_f64()))
                .max()
                .unwrap_or(0);
            let cpu0: Vec<u64> = own.iter().map(|t| cpu_ns(t.pid)).collect();
            let runs = client::interleaved(&own, span, proofs).await;
            for ((t, run), c0) in own.iter().zip(runs).zip(cpu0) {
                let m = out.entry(t.name.clone()).or_default();
                m.cpu_ns += cpu_ns(t.pid).saturating_sub(c0);
                m.run.merge(run);
            }
        }
        for t in rotated(&peers, round) {
            let m = out.entry(t.name.clone()).or_default();
            let est = if m.run.latencies.is_empty() {
                if conc == 1 { 8_000.0 } else { 15_000.0 }
            } else {
                m.run.rps()
            };
            let proofs = proofs_for(&t, est, conc, secs);
            let cpu0 = cpu_ns(t.pid);
            let run = client::closed_loop(&t, conc, settings.slice, proofs).await;
            m.cpu_ns += cpu_ns(t.pid).saturating_sub(cpu0);
            m.run.merge(run);
        }
    }
    out
}

async fn rate_scenario(
    targets: &[Target],
    rate: f64,
    settings: &Settings,
) -> BTreeMap<String, Measured> {
    let mut out: BTreeMap<String, Measured> = BTreeMap::new();
    let secs = settings.slice.as_secs_f64();
    for round in 0..settings.rounds {
        for t in rotated(targets, round) {
            let m = out.entry(t.name.clone()).or_default();
            let proofs = proofs_for(&t, rate * 1.2, settings.rate_conns, secs);
            let cpu0 = cpu_ns(t.pid);
            let run =
                client::fixed_rate(&t, settings.rate_conns, rate, settings.slice, proofs).await;
            m.cpu_ns += cpu_ns(t.pid).saturating_sub(cpu0);
            m.run.merge(run);
        }
    }
    out
}

/// Where [`stream_scenario`] keeps the direct streams measured beside `target`.
fn paired_direct(target: &str) -> String {
    format!("direct beside {target}")
}

/// Streaming. Each target streams in its own slice, beside a set of direct streams started at
/// the same time (half a stagger apart): the direct call uses neither the proxies' core nor
/// any proxy, so each target is compared with a baseline measured in its own window, and a
/// stall of the machine lands on both (in alternating slices, one target's window could hold
/// a stall its baseline's missed). Proxies never stream at the same time as each other, so
/// none waits for another on their shared core. The `direct` row is every paired run together.
async fn stream_scenario(targets: &[Target], settings: &Settings) -> BTreeMap<String, StreamRun> {
    let mut out: BTreeMap<String, StreamRun> = BTreeMap::new();
    let Some(direct) = targets.iter().find(|t| t.name == "direct").cloned() else {
        return out;
    };
    let others: Vec<Target> = targets
        .iter()
        .filter(|t| t.name != "direct")
        .cloned()
        .collect();
    for round in 0..settings.rounds.max(2) {
        for t in rotated(&others, round) {
            let (base, run) = tokio::join!(
                client::streams_phased(&direct, settings.streams, 64, 20, 0.0),
                client::streams_phased(&t, settings.streams, 64, 20, 0.5),
            );
            out.entry("direct".to_owned())
                .or_default()
                .merge(base.clone());
            out.entry(paired_direct(&t.name)).or_default().merge(base);
            out.entry(t.name.clone()).or_default().merge(run);
        }
    }
    out
}

fn latency_rows(measured: &BTreeMap<String, Measured>, order: &[String]) -> Value {
    let dist: BTreeMap<&String, Dist> = measured
        .iter()
        .map(|(k, m)| (k, Dist::new(m.run.latencies.clone())))
        .collect();
    let direct = dist.get(&"direct".to_owned()).cloned().unwrap_or_default();
    let bare = dist.get(&"bare".to_owned()).cloned().unwrap_or_default();
    let rps_of = |name: &str| measured.get(name).map_or(0.0, |m| m.run.rps());
    let (direct_rps, bare_rps) = (rps_of("direct"), rps_of("bare"));
    let mut rows = serde_json::Map::new();
    for name in order {
        let (Some(m), Some(d)) = (measured.get(name), dist.get(name)) else {
            continue;
        };
        let rps = m.run.rps();
        let n = m.run.latencies.len().max(1) as f64;
        rows.insert(
            name.clone(),
            json!({
                "requests": m.run.latencies.len(),
                "p50_us": r1(d.p50_us()),
                "p99_us": r1(d.p99_us()),
                "max_us": r1(d.max_us()),
                "rps": r1(rps),
                "added_p50_us": r1(d.p50_us() - direct.p50_us()),
                "added_p99_us": r1(d.p99_us() - direct.p99_us()),
                "added_over_bare_p50_us": r1(d.p50_us() - bare.p50_us()),
                "added_over_bare_p99_us": r1(d.p99_us() - bare.p99_us()),
                "rps_ratio": if bare_rps > 0.0 { r3(rps / bare_rps) } else { 0.0 },
                "rps_ratio_direct": if direct_rps > 0.0 { r3(rps / direct_rps) } else { 0.0 },
                "cpu_us_per_req": if m.cpu_ns > 0 { r1(m.cpu_ns as f64 / 1000.0 / n) } else { 0.0 },
                "cpu_util": if m.cpu_ns > 0 { r3(m.cpu_ns as f64 / 1e9 / m.run.wall.as_secs_f64()) } else { 0.0 },
                "late_dispatches": m.run.late,
                "proofs_made_inline": m.run.proofs_made_inline,
                "errors": m.run.errors,
            }),
        );
    }
    Value::Object(rows)
}

fn stream_rows(measured: &BTreeMap<String, StreamRun>, order: &[String]) -> Value {
    let d = |r: &StreamRun| {
        (
            Dist::new(r.ttfb.clone()),
            Dist::new(r.gaps.clone()),
            Dist::new(r.jitter.clone()),
            Dist::new(r.transit.clone()),
        )
    };
    let all_direct = measured.get("direct").map(d).unwrap_or_default();
    let mut rows = serde_json::Map::new();
    for name in order {
        let Some(r) = measured.get(name) else {
            continue;
        };
        // Each target against the direct streams measured beside it.
        let direct = measured
            .get(&paired_direct(name))
            .map(d)
            .unwrap_or_else(|| all_direct.clone());
        let (ttfb, gaps, jitter, transit) = d(r);
        rows.insert(
            name.clone(),
            json!({
                "streams": r.ttfb.len(),
                "ttfb_p50_us": r1(ttfb.p50_us()),
                "ttfb_p99_us": r1(ttfb.p99_us()),
                "ttfb_added_us": r1(ttfb.p50_us() - direct.0.p50_us()),
                "ttfb_added_p99_us": r1(ttfb.p99_us() - direct.0.p99_us()),
                "gap_p50_us": r1(gaps.p50_us()),
                "gap_p99_us": r1(gaps.p99_us()),
                "gap_raw_added_p99_us": r1(gaps.p99_us() - direct.1.p99_us()),
                "gap_jitter_p99_us": r1(jitter.p99_us()),
                "gap_added_p99_us": r1(jitter.p99_us() - direct.2.p99_us()),
                "chunk_transit_p50_us": r1(transit.p50_us()),
                "chunk_transit_p99_us": r1(transit.p99_us()),
                "chunk_added_p50_us": r1(transit.p50_us() - direct.3.p50_us()),
                "chunk_added_p99_us": r1(transit.p99_us() - direct.3.p99_us()),
                "chunks": r.chunks,
                "expected_chunks": r.expected,
                "lost": r.lost,
                "merged": r.merged,
                "errors": r.errors,
            }),
        );
    }
    Value::Object(rows)
}

/// Memory per open stream: a fresh process, `n` streams opened (chunks 1 s apart), RSS read.
async fn scale_one(
    kind: &'static str,
    upstream: &str,
    n: usize,
    pin: bool,
    stats: &MockStats,
) -> Value {
    let (sut, target) = if kind == "bare" {
        bare_target(upstream, pin).await
    } else {
        perishable_target("perishable", upstream, false, 64, pin).await
    };
    // Warm the process: pools, lazy statics, the allocator.
    let _ = client::closed_loop(&target, 8, Duration::from_millis(300), 0).await;
    let _ = client::streams(&target, 8, 3, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_rss = rss_kb(sut.pid);
    let base_fds = open_fds(sut.pid);
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut holders = tokio::task::JoinSet::new();
    let mut opened = 0usize;
    let mut errors = 0usize;
    let mut first_error = String::new();
    let body = client::stamped_body(120, 1000);
    let batch = 200;
    let mut i = 0;
    while i < n {
        let mut batch_set = tokio::task::JoinSet::new();
        for j in i..(i + batch).min(n) {
            let target = target.clone();
            let body = body.clone();
            batch_set.spawn_local(async move { client::open_stream(&target, j, body, None).await });
        }
        while let Some(res) = batch_set.join_next().await {
            match res.expect("open task") {
                Ok((sender, mut body, _)) => {
                    opened += 1;
                    let mut stop = stop_rx.clone();
                    holders.spawn_local(async move {
                        let _sender = sender;
                        // Bounded: the stream has 120 chunks; stop ends it earlier.
                        loop {
                            tokio::select! {
                                _ = stop.changed() => break,
                                frame = http_body_util::BodyExt::frame(&mut body) => {
                                    if !matches!(frame, Some(Ok(_))) { break }
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    errors += 1;
                    if first_error.is_empty() {
                        first_error = e;
                    }
                }
            }
        }
        i += batch;
    }
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = rss_kb(sut.pid);
    let fds = open_fds(sut.pid);
    let mock_streams = stats.stamped_active.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    while holders.join_next().await.is_some() {}
    // Let the mock see the streams go (bounded wait).
    for _ in 0..100 {
        if stats.stamped_active.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sut);
    let per_stream = if opened > 0 {
        rss.saturating_sub(base_rss) as f64 / opened as f64
    } else {
        0.0
    };
    json!({
        "target": kind,
        "streams": n,
        "opened": opened,
        "open_secs": r1(open_secs),
        "base_rss_kb": base_rss,
        "rss_kb": rss,
        "rss_kb_per_stream": r1(per_stream),
        "fds_before": base_fds,
        "fds_open": fds,
        "mock_streams_open": mock_streams,
        "errors": errors,
        "first_error": first_error,
    })
}

/// A slow client: `k` streams of 4 KB events every 20 ms, each read 4 KB a second from a raw
/// socket with a 16 KB receive buffer (no client-side buffering to hide the backpressure). The
/// mock counts what it wrote under `tag`, so several targets can run at once.
async fn slow_one(
    target: Target,
    pid: Option<u32>,
    secs: u64,
    k: usize,
    tag: usize,
    stats: Arc<MockStats>,
) -> Value {
    use tokio::io::AsyncReadExt;
    let counter = || stats.bulk_bytes[tag].load(Ordering::Relaxed);
    let base_rss = pid.map_or(0, rss_kb);
    let bytes0 = counter();
    let chunks = (secs as usize + 5) * 50;
    let body = client::bulk_body(4096, 20, chunks, tag);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let read_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut readers = tokio::task::JoinSet::new();
    let mut errors = 0u64;
    for i in 0..k {
        match client::open_raw_stream(&target, i, &body, 16 * 1024).await {
            Ok(mut stream) => {
                let read_total = read_total.clone();
                let mut stop = stop_rx.clone();
                readers.spawn_local(async move {
                    let mut buf = vec![0u8; 4096];
                    // Bounded: one read a second until stopped or the stream ends.
                    for _ in 0..3_600 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                read_total.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                        tokio::select! {
                            _ = stop.changed() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                });
            }
            Err(_) => errors += 1,
        }
    }
    let t0 = Instant::now();
    let third = Duration::from_secs(secs) / 3;
    let mut marks = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(third).await;
        marks.push((
            t0.elapsed().as_secs_f64(),
            counter() - bytes0,
            pid.map_or(0, rss_kb),
        ));
    }
    let read = read_total.load(Ordering::Relaxed);
    let queues = pid.and_then(socket_queues);
    let _ = stop_tx.send(true);
    while readers.join_next().await.is_some() {}
    let k = k.max(1) as f64;
    let kib = |b: u64| r1(b as f64 / 1024.0 / k);
    let (t1, b1, _) = marks[1];
    let (t2, b2, rss_end) = marks[2];
    let last_third_rate = (b2 - b1) as f64 / 1024.0 / k / (t2 - t1).max(0.001);
    let nominal = 4096.0 / 1024.0 / 0.020;
    json!({
        "target": target.name,
        "clients": k as u64,
        "secs": secs,
        "mock_written_kb_per_stream": marks.iter().map(|m| kib(m.1)).collect::<Vec<_>>(),
        "at_secs": marks.iter().map(|m| r1(m.0)).collect::<Vec<_>>(),
        "unthrottled_kb_per_stream_end": r1(nominal * t2),
        "mock_write_rate_last_third_kb_s": r1(last_third_rate),
        "nominal_rate_kb_s": r1(nominal),
        "client_read_kb_per_stream": kib(read),
        "in_flight_kb_per_stream": r1((b2 as f64 - read as f64) / 1024.0 / k),
        "stalled": last_third_rate < nominal * 0.25,
        "proxy_unread_kb_per_stream": queues.map(|q| kib(q.0)),
        "proxy_unsent_kb_per_stream": queues.map(|q| kib(q.1)),
        "proxy_rss_kb": std::iter::once(base_rss).chain(marks.iter().map(|m| m.2)).collect::<Vec<_>>(),
        "proxy_rss_growth_kb_per_stream": r1(rss_end.saturating_sub(base_rss) as f64 / k),
        "errors": errors,
    })
}

// ---------------------------------------------------------------------------------------------
// Printing

fn print_latency_table(title: &str, rows: &Value) {
    println!("\n== {title} ==");
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9} {:>6} {:>6}",
        "target",
        "p50 us",
        "p99 us",
        "rps",
        "+p50 dir",
        "+p99 dir",
        "+p50 bare",
        "+p99 bare",
        "rps/bare",
        "cpu us/r",
        "cpu%",
        "errors"
    );
    if let Some(rows) = rows.as_object() {
        for (name, r) in rows {
            println!(
                "{:<18} {:>9.1} {:>9.1} {:>9.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8.3} {:>9.1} {:>6.0} {:>6}",
                name,
                r["p50_us"].as_f64().unwrap_or(0.0),
                r["p99_us"].as_f64().unwrap_or(0.0),
                r["rps"].as_f64().unwrap_or(0.0),
                r["added_p50_us"].as_f64().unwrap_or(0.0),
                r["added_p99_us"].as_f64().unwrap_or(0.0),
                r["added_over_bare_p50_us"].as_f64().unwrap_or(0.0),
                r["added_over_bare_p99_us"].as_f64().unwrap_or(0.0),
                r["rps_ratio"].as_f64().unwrap_or(0.0),
                r["cpu_us_per_req"].as_f64().unwrap_or(0.0),
                r["cpu_util"].as_f64().unwrap_or(0.0) * 100.0,
                r["errors"].as_u64().unwrap_or(0),
            );
            let p50 = r["p50_us"].as_f64().unwrap_or(0.0);
            if (35_000.0..=45_000.0).contains(&p50) {
                println!("   ^ {name}: p50 near 40 ms: that is Nagle/delayed ACK, not the proxy");
            }
        }
    }
}

fn print_stream_table(rows: &Value) {
    println!("\n== streaming: 64 chunks 20 ms apart ==");
    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>5} {:>6} {:>6}",
        "target",
        "streams",
        "ttfb p50",
        "+ttfb",
        "gap p99",
        "+gap raw",
        "jit p99",
        "+gap p99",
        "chunk+50",
        "chunk+99",
        "chunks",
        "lost",
        "merged",
        "errors"
    );
    if let Some(rows) = rows.as_object() {
        for (name, r) in rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<18} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>5} {:>6} {:>6}",
                name,
                r["streams"].as_u64().unwrap_or(0),
                f("ttfb_p50_us"),
                f("ttfb_added_us"),
                f("gap_p99_us"),
                f("gap_raw_added_p99_us"),
                f("gap_jitter_p99_us"),
                f("gap_added_p99_us"),
                f("chunk_added_p50_us"),
                f("chunk_added_p99_us"),
                r["chunks"].as_u64().unwrap_or(0),
                r["lost"].as_u64().unwrap_or(0),
                r["merged"].as_u64().unwrap_or(0),
                r["errors"].as_u64().unwrap_or(0),
            );
            if (35_000.0..=45_000.0).contains(&f("ttfb_p50_us")) {
                println!("   ^ {name}: first byte near 40 ms: that is Nagle, not the proxy");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

fn check(name: &str, ok: bool, detail: String, checks: &mut Vec<Value>) {
    println!("{:<5} {name}: {detail}", if ok { "PASS" } else { "MISS" });
    checks.push(json!({ "target": name, "pass": ok, "measured": detail }));
}

async fn run(settings: Settings, pin: bool) {
    let started = Instant::now();
    let machine = machine();
    println!("perishable load harness: {machine}");
    println!(
        "layout: load generator + mock on core 1, each system under test on core 0 (pinned: {pin}); \
         rounds {}, slice {:.1} s, concurrency {}, quick {}",
        settings.rounds,
        settings.slice.as_secs_f64(),
        settings.conc,
        settings.quick
    );

    let (mock_addr, stats) = servers::start_mock(settings.mock_port)
        .await
        .expect("start the mock upstream");
    let upstream = format!("http://{mock_addr}/v1");
    println!("mock upstream: {upstream}");

    let direct = Target {
        name: "direct".to_owned(),
        addr: mock_addr,
        host: mock_addr.to_string(),
        base_path: "/v1".to_owned(),
        slots: vec![plain_slot(&[])],
        pid: None,
    };
    let (bare_sut, bare) = bare_target(&upstream, pin).await;
    let slots = settings.conc.max(settings.streams).max(settings.rate_conns);
    let (p_sut, perishable) = perishable_target("perishable", &upstream, false, slots, pin).await;
    let mut suts = vec![bare_sut, p_sut];
    let mut targets = vec![direct.clone(), bare.clone(), perishable.clone()];
    if settings.runs("gates") {
        let (g_sut, gates) =
            perishable_target("perishable_gates", &upstream, true, slots, pin).await;
        suts.push(g_sut);
        targets.push(gates);
    }
    if let Some(file) = &settings.targets_file {
        targets.extend(external_targets(file));
    }
    let order: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    println!(
        "targets: {}",
        targets
            .iter()
            .map(|t| format!("{} ({}{})", t.name, t.addr, t.base_path))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for s in &suts {
        println!("  {} pid {} rss {} kB", s.name, s.pid, rss_kb(s.pid));
    }

    // Warm-up, not recorded.
    for t in &targets {
        let proofs = proofs_for(t, 8_000.0, 1, 0.3);
        let _ = client::closed_loop(t, 1, Duration::from_millis(300), proofs).await;
        let proofs = proofs_for(t, 15_000.0, settings.conc, 0.3);
        let _ = client::closed_loop(t, settings.conc, Duration::from_millis(300), proofs).await;
        let _ = client::streams(t, 2, 3, 5).await;
    }

    let mut results = serde_json::Map::new();
    results.insert("machine".into(), machine);
    results.insert(
        "settings".into(),
        json!({
            "rounds": settings.rounds,
            "slice_secs": settings.slice.as_secs_f64(),
            "concurrency": settings.conc,
            "streams": settings.streams,
            "pinned": pin,
            "quick": settings.quick,
        }),
    );
    let mut scenarios = serde_json::Map::new();

    if settings.runs("c1") {
        let m = closed_scenario(&targets, 1, &settings).await;
        let rows = latency_rows(&m, &order);
        print_latency_table("non-streaming, concurrency 1 (closed loop)", &rows);
        scenarios.insert("c1".into(), rows);
    }
    let mut c64_min_rps = f64::MAX;
    if settings.runs("c64") {
        let m = closed_scenario(&targets, settings.conc, &settings).await;
        for v in m.values() {
            c64_min_rps = c64_min_rps.min(v.run.rps());
        }
        let rows = latency_rows(&m, &order);
        print_latency_table(
            &format!("non-streaming, concurrency {} (closed loop)", settings.conc),
            &rows,
        );
        scenarios.insert(format!("c{}", settings.conc), rows);
    }
    if settings.runs("rate") {
        let rate = settings.rate.unwrap_or(if c64_min_rps < f64::MAX {
            (c64_min_rps * 0.25).floor().max(50.0)
        } else {
            1_000.0
        });
        let m = rate_scenario(&targets, rate, &settings).await;
        let mut rows = latency_rows(&m, &order);
        print_latency_table(
            &format!(
                "non-streaming, fixed rate {rate:.0} req/s on {} connections",
                settings.rate_conns
            ),
            &rows,
        );
        if let Some(o) = rows.as_object_mut() {
            o.insert("rate_rps".into(), json!(rate));
        }
        scenarios.insert("fixed_rate".into(), rows);
    }
    if settings.runs("stream") {
        let m = stream_scenario(&targets, &settings).await;
        let rows = stream_rows(&m, &order);
        print_stream_table(&rows);
        scenarios.insert("streaming".into(), rows);
    }
    if settings.runs("realtime") {
        let headers = perishable.slots[0].headers.clone();
        let per_round = if settings.quick { 300 } else { 1_000 };
        let bare_ws = spawn_sut("bare_ws", "bare_ws", &upstream, false, pin).await;
        let latency = realtime::latency(
            mock_addr,
            bare_ws.addr,
            perishable.addr,
            &headers,
            settings.rounds.max(2) * 2,
            per_round,
        )
        .await;
        drop(bare_ws);
        println!(
            "\n== realtime: one WebSocket round trip (an event out, its answer back) ==\n\
             direct p50 {} us p99 {} us; bare relay p50 {} us p99 {} us; perishable p50 {} us p99 {} us; added over direct p50 {} us p99 {} us, over the bare relay p50 {} us p99 {} us ({} round trips each)",
            latency["direct_p50_us"],
            latency["direct_p99_us"],
            latency["bare_p50_us"],
            latency["bare_p99_us"],
            latency["perishable_p50_us"],
            latency["perishable_p99_us"],
            latency["added_p50_us"],
            latency["added_p99_us"],
            latency["added_over_bare_p50_us"],
            latency["added_over_bare_p99_us"],
            latency["round_trips"],
        );
        let p_pid = suts
            .iter()
            .find(|s| s.name == "perishable")
            .map_or(0, |s| s.pid);
        let memory =
            realtime::memory(perishable.addr, p_pid, &headers, settings.realtime_conns).await;
        println!(
            "realtime memory: {} connections opened in {} s, RSS {} -> {} kB, {} KiB/connection, errors {} {}",
            memory["opened"],
            memory["open_secs"],
            memory["base_rss_kb"],
            memory["rss_kb"],
            memory["rss_kb_per_connection"],
            memory["errors"],
            memory["first_error"].as_str().unwrap_or_default(),
        );
        scenarios.insert(
            "realtime".into(),
            json!({"latency": latency, "memory": memory}),
        );
    }

    // The long-lived processes are no longer needed; scale and slow start fresh ones.
    drop(suts);

    if settings.runs("scale") {
        println!("\n== scale: memory per open stream (fresh process each) ==");
        let mut rows = serde_json::Map::new();
        for &n in &settings.scale {
            for kind in ["bare", "perishable"] {
                let row = scale_one(kind, &upstream, n, pin, &stats).await;
                println!(
                    "{:<12} {:>6} streams: opened {:>6} in {:>5.1} s, RSS {:>7} -> {:>7} kB, {:>6.1} KiB/stream, fds {} -> {}, errors {} {}",
                    kind,
                    n,
                    row["opened"],
                    row["open_secs"].as_f64().unwrap_or(0.0),
                    row["base_rss_kb"],
                    row["rss_kb"],
                    row["rss_kb_per_stream"].as_f64().unwrap_or(0.0),
                    row["fds_before"],
                    row["fds_open"],
                    row["errors"],
                    row["first_error"].as_str().unwrap_or_default(),
                );
                rows.insert(format!("{kind}_{n}"), row);
            }
        }
        scenarios.insert("scale".into(), Value::Object(rows));
    }

    if settings.runs("slow") {
        println!(
            "\n== slow client: {} streams per target, all targets at once; the mock writes 4 KB every 20 ms, each client reads 4 KB a second (16 KB receive buffer), {} s ==",
            settings.slow_clients, settings.slow_secs
        );
        let (bare_sut, bare_t) = bare_target(&upstream, pin).await;
        let (p_sut, p_t) =
            perishable_target("perishable", &upstream, false, settings.slow_clients, pin).await;
        for t in [&bare_t, &p_t] {
            let _ = client::closed_loop(t, 4, Duration::from_millis(200), 0).await;
            let _ = client::streams(t, 4, 3, 5).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut runs = tokio::task::JoinSet::new();
        for (tag, (t, pid)) in [
            (direct.clone(), None),
            (bare_t, Some(bare_sut.pid)),
            (p_t, Some(p_sut.pid)),
        ]
        .into_iter()
        .enumerate()
        {
            runs.spawn_local(slow_one(
                t,
                pid,
                settings.slow_secs,
                settings.slow_clients,
                tag,
                stats.clone(),
            ));
        }
        let mut rows = serde_json::Map::new();
        while let Some(row) = runs.join_next().await {
            let row = row.expect("slow client task");
            println!(
                "{:<12} mock wrote {} KiB/stream at {} s (unthrottled {:.0}); last third {:>6.1} KiB/s (nominal {:.0}); client read {:>5.1} KiB/stream; in flight {:>7.1} KiB/stream; stalled {}; proxy RSS {} kB; proxy kernel queues: unread {} / unsent {} KiB/stream",
                row["target"].as_str().unwrap_or_default(),
                row["mock_written_kb_per_stream"],
                row["at_secs"],
                row["unthrottled_kb_per_stream_end"].as_f64().unwrap_or(0.0),
                row["mock_write_rate_last_third_kb_s"]
                    .as_f64()
                    .unwrap_or(0.0),
                row["nominal_rate_kb_s"].as_f64().unwrap_or(0.0),
                row["client_read_kb_per_stream"].as_f64().unwrap_or(0.0),
                row["in_flight_kb_per_stream"].as_f64().unwrap_or(0.0),
                row["stalled"],
                row["proxy_rss_kb"],
                row["proxy_unread_kb_per_stream"],
                row["proxy_unsent_kb_per_stream"],
            );
            let name = row["target"].as_str().unwrap_or_default().to_owned();
            rows.insert(name, row);
        }
        drop((bare_sut, p_sut));
        scenarios.insert("slow_client".into(), Value::Object(rows));
    }

    if settings.runs("redis")
        && let Some(rows) = redis::scenario(&upstream, pin, &settings).await
    {
        scenarios.insert("redis".into(), rows);
    }

    // The issue's targets.
    println!("\n== targets ==");
    let mut checks = Vec::new();
    let get = |scenario: &str, target: &str, field: &str| {
        scenarios
            .get(scenario)
            .and_then(|s| s.get(target))
            .and_then(|r| r.get(field))
            .and_then(Value::as_f64)
    };
    if let (Some(p50), Some(p99)) = (
        get("c1", "perishable", "added_over_bare_p50_us"),
        get("c1", "perishable", "added_over_bare_p99_us"),
    ) {
        check(
            "added over bare, c1, p50 <= 25 us and p99 <= 60 us",
            p50 <= 25.0 && p99 <= 60.0,
            format!("p50 {p50:.1} us, p99 {p99:.1} us"),
            &mut checks,
        );
    }
    let c64 = format!("c{}", settings.conc);
    if let Some(ratio) = get(&c64, "perishable", "rps_ratio") {
        check(
            &format!("rps at {} connections >= 0.85x bare", settings.conc),
            ratio >= 0.85,
            format!("{ratio:.3}x"),
            &mut checks,
        );
    }
    if let Some(ttfb) = get("streaming", "perishable", "ttfb_added_us") {
        check(
            "streaming ttfb added over direct <= 300 us",
            ttfb <= 300.0,
            format!("{ttfb:.1} us"),
            &mut checks,
        );
    }
    if let Some(gap) = get("streaming", "perishable", "gap_added_p99_us") {
        check(
            "streaming gap added p99 <= 50 us",
            gap <= 50.0,
            format!("{gap:.1} us (jitter p99 over direct's)"),
            &mut checks,
        );
    }
    if let (Some(lost), Some(merged)) = (
        get("streaming", "perishable", "lost"),
        get("streaming", "perishable", "merged"),
    ) {
        check(
            "no chunk lost or merged",
            lost == 0.0 && merged == 0.0,
            format!("lost {lost}, merged {merged}"),
            &mut checks,
        );
    }
    if let Some(scale) = scenarios.get("scale").and_then(Value::as_object) {
        for (key, row) in scale {
            if key.starts_with("perishable") {
                let kb = row["rss_kb_per_stream"].as_f64().unwrap_or(0.0);
                check(
                    &format!("memory per stream at {} streams <= 32 KiB", row["streams"]),
                    kb <= 32.0 && row["errors"].as_u64() == Some(0),
                    format!("{kb:.1} KiB ({} errors)", row["errors"]),
                    &mut checks,
                );
            }
        }
    }
    if let Some(row) = scenarios
        .get("slow_client")
        .and_then(|s| s.get("perishable"))
    {
        let growth = row["proxy_rss_growth_kb_per_stream"]
            .as_f64()
            .unwrap_or(f64::MAX);
        let queued = row["proxy_unread_kb_per_stream"].as_f64().unwrap_or(0.0)
            + row["proxy_unsent_kb_per_stream"].as_f64().unwrap_or(0.0);
        check(
            "slow client: the proxy holds no stream data in user space (RSS growth <= 256 KiB/stream)",
            growth <= 256.0,
            format!(
                "RSS growth {growth} KiB/stream while the mock wrote {} KiB/stream; {queued:.0} KiB/stream sit in the proxy's kernel socket queues; mock write rate in the last third {} of {} KiB/s (stalled: {})",
                row["mock_written_kb_per_stream"][2],
                row["mock_write_rate_last_third_kb_s"],
                row["nominal_rate_kb_s"],
                row["stalled"]
            ),
            &mut checks,
        );
    }
    for (peer, lat_x, rps_x) in [("litellm", 10.0, 10.0), ("portkey", 5.0, 3.0)] {
        if let (Some(ours), Some(theirs)) = (
            get("c1", "perishable", "added_p50_us"),
            get("c1", peer, "added_p50_us"),
        ) {
            let x = theirs / ours.max(1.0);
            check(
                &format!("added latency (c1 p50 over direct) >= {lat_x}x lower than {peer}"),
                x >= lat_x,
                format!("{ours:.1} us vs {theirs:.1} us: {x:.1}x"),
                &mut checks,
            );
        }
        if let (Some(ours), Some(theirs)) = (get(&c64, "perishable", "rps"), get(&c64, peer, "rps"))
        {
            let x = ours / theirs.max(1.0);
            check(
                &format!("rps at {} connections >= {rps_x}x {peer}'s", settings.conc),
                x >= rps_x,
                format!("{ours:.0} vs {theirs:.0}: {x:.1}x"),
                &mut checks,
            );
        }
    }
    results.insert("scenarios".into(), Value::Object(scenarios));
    results.insert("targets".into(), Value::Array(checks));
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg = loadavg
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    println!("load average at the end: {loadavg} (other work on the machine skews every figure)");
    results.insert("loadavg_at_end".into(), json!(loadavg));
    results.insert(
        "elapsed_secs".into(),
        json!(r1(started.elapsed().as_secs_f64())),
    );
    let text = serde_json::to_string_pretty(&Value::Object(results)).expect("JSON");
    if let Some(dir) = std::path::Path::new(&settings.out).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&settings.out, text) {
        Ok(()) => println!("\nwrote {}", settings.out),
        Err(e) => eprintln!("could not write {}: {e}", settings.out),
    }
    println!("elapsed {:.1} s", started.elapsed().as_secs_f64());
}
