//! The Redis scenario: one Perishable with the memory store, one with Redis on loopback, and
//! one with Redis behind a delay line of 250 µs each way (a TCP relay in this process: what a
//! network between an instance and Redis adds), each with a token budget, so every call is
//! rate limited, revocation-checked and reserved. Closed loop at concurrency 1 and 64,
//! alternating slices; then Redis's own command counts per call (`INFO commandstats`).
//!
//! Redis runs on core 1, with the load generator and the mock; each proxy on core 0. Beside the
//! latencies it reports each process's CPU time per call (from `/proc`), the time Redis spends
//! in the admission script, and a `PING` from core 0: the round trip a proxy pays.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{self, Target};
use crate::stats::{Dist, r1, r3};
use crate::{Settings, Sut, mint_slots, spawn_sut_with};

/// One-way delay of the delay line.
const DELAY: Duration = Duration::from_micros(250);

/// A `redis-server` on a free port, stopped when dropped.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Started on core 1 when `pin`, beside the load generator and the mock: everything outside the
/// system under test shares that core, as it would be another machine's.
fn start_redis(pin: bool) -> Option<RedisServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let mut command = if pin {
        let mut taskset = std::process::Command::new("taskset");
        taskset.args(["-c", "1", "redis-server"]);
        taskset
    } else {
        std::process::Command::new("redis-server")
    };
    let child = command
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let server = RedisServer { child, port };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Calls and µs spent per command since the server started.
fn command_calls(port: u16) -> HashMap<String, (u64, u64)> {
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return HashMap::new();
    };
    if conn
        .write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .is_err()
    {
        return HashMap::new();
    }
    let mut reader = BufReader::new(conn);
    let mut header = String::new();
    let _ = reader.read_line(&mut header);
    let len: usize = header.trim_start_matches('$').trim().parse().unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = reader.read_exact(&mut body);
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                rest.split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some((name.to_owned(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// A TCP relay to `to` that delays every byte by [`DELAY`] each way, in order. OS threads
/// with `std::thread::sleep`, whose overshoot on Linux is tens of µs: tokio's timer has a 1 ms
/// resolution, four times the delay itself.
fn delay_line(to: SocketAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = std::net::TcpStream::connect(to) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            delayed(client, server2);
            delayed(server, client2);
        }
    });
    addr
}

/// Copies `from` to `to` on two threads, each chunk written [`DELAY`] after it was read.
fn delayed(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + DELAY, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
}

/// CPU time (user + system, all threads) `pid` has used, in µs; 0 where `/proc` is missing.
fn cpu_us(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces), from field 3 on: utime is 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // `rest` starts at field 3, so field n is at index n - 3. Clock ticks are 100 per second.
    (ticks(11) + ticks(12)) * 10_000.0
}

/// [`ping_round_trip`] from a thread moved to core 0, where each system under test runs: the
/// round trip as the proxy pays it, from one core to the other. `None` without `taskset`.
fn ping_from_core_0(addr: SocketAddr) -> Option<Duration> {
    std::thread::spawn(move || {
        // This thread's id, as `taskset -p` takes it: `/proc/thread-self` is `<pid>/task/<tid>`.
        let link = std::fs::read_link("/proc/thread-self").ok()?;
        let tid = link.file_name()?.to_str()?.to_owned();
        let moved = std::process::Command::new("taskset")
            .args(["-pc", "0", &tid])
            .stdout(std::process::Stdio::null())
            .status()
            .ok()?
            .success();
        moved.then(|| ping_round_trip(addr))
    })
    .join()
    .ok()
    .flatten()
}

/// The median time of a `PING` through `addr`: one round trip to Redis.
fn ping_round_trip(addr: SocketAddr) -> Duration {
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return Duration::ZERO;
    };
    let _ = conn.set_nodelay(true);
    let mut times = Vec::new();
    let mut reply = [0u8; 7];
    for _ in 0..200 {
        let started = Instant::now();
        if conn.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() || conn.read_exact(&mut reply).is_err()
        {
            return Duration::ZERO;
        }
        times.push(started.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

async fn target(
    name: &'static str,
    upstream: &str,
    pin: bool,
    store: Option<String>,
    slots: usize,
) -> (Sut, Target) {
    target_with(name, upstream, pin, store, slots, true).await
}

async fn target_with(
    name: &'static str,
    upstream: &str,
    pin: bool,
    store: Option<String>,
    slots: usize,
    budget: bool,
) -> (Sut, Target) {
    let mut env = vec![(
        "PERISHABLE_LOAD_BUDGET",
        if budget { "on" } else { "off" }.to_owned(),
    )];
    if let Some(url) = store {
        env.push(("PERISHABLE_LOAD_STORE", url));
    }
    let sut = spawn_sut_with(name, "perishable", upstream, false, pin, &env).await;
    let slots = mint_slots(sut.addr, slots, false).await;
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

pub async fn scenario(upstream: &str, pin: bool, settings: &Settings) -> Option<Value> {
    let Some(redis) = start_redis(pin) else {
        println!("\n== redis: skipped (no redis-server on the PATH) ==");
        return None;
    };
    let direct: SocketAddr = ([127, 0, 0, 1], redis.port).into();
    let delayed_addr = delay_line(direct);
    let loopback_rtt = ping_round_trip(direct);
    let delayed_rtt = ping_round_trip(delayed_addr);
    // The proxies run on core 0, Redis here on core 1: their round trip crosses cores.
    let proxy_rtt = if pin { ping_from_core_0(direct) } else { None };
    println!(
        "\n== redis: a PING takes {:.0} us on loopback ({} from the proxies' core), {:.0} us \
         through the delay line ==",
        loopback_rtt.as_secs_f64() * 1e6,
        proxy_rtt.map_or("not measured".to_owned(), |d| format!(
            "{:.0} us",
            d.as_secs_f64() * 1e6
        )),
        delayed_rtt.as_secs_f64() * 1e6
    );
    let slots = settings.conc;
    let (_m, memory) = target("memory", upstream, pin, None, slots).await;
    let (_r, loopback) = target(
        "redis",
        upstream,
        pin,
        Some(format!("redis://{direct}/")),
        slots,
    )
    .await;
    let (_d, delayed) = target(
        "redis_250us",
        upstream,
        pin,
        Some(format!("redis://{delayed_addr}/")),
        slots,
    )
    .await;
    // The same behind the delay line without a budget: the rate limit alone.
    let (_n, unbudgeted) = target_with(
        "redis_250us_no_budget",
        upstream,
        pin,
        Some(format!("redis://{delayed_addr}/")),
        slots,
        false,
    )
    .await;
    let targets = [memory, loopback, delayed, unbudgeted];
    // Warm-up: connections, scripts loaded, revocation copies synchronised.
    for t in &targets {
        let _ = client::closed_loop(t, 4, Duration::from_millis(500), 0).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Commands and round trips per call, on the loopback instance alone.
    let before = command_calls(redis.port);
    let run = client::closed_loop(&targets[1], 1, Duration::from_millis(500), 0).await;
    let after = command_calls(redis.port);
    let calls = run.latencies.len().max(1) as f64;
    let mut per_call: BTreeMap<String, f64> = BTreeMap::new();
    let mut script_us = 0.0;
    for (name, (n, us)) in &after {
        let (n0, us0) = before.get(name).copied().unwrap_or((0, 0));
        let delta = n.saturating_sub(n0);
        if delta > 0 {
            per_call.insert(name.clone(), r3(delta as f64 / calls));
        }
        if name == "evalsha" {
            script_us = us.saturating_sub(us0) as f64 / calls;
        }
    }
    let total: f64 = per_call.values().sum();

    let mut rows = serde_json::Map::new();
    for conc in [1, settings.conc] {
        let mut measured: BTreeMap<String, client::Run> = BTreeMap::new();
        // CPU per target: the proxy's, Redis's, and this process's (the load and the mock).
        let mut cpu: BTreeMap<String, [f64; 3]> = BTreeMap::new();
        let redis_pid = redis.child.id();
        let own_pid = std::process::id();
        for round in 0..settings.rounds.max(2) {
            for t in crate::rotated(&targets, round) {
                let pids = [t.pid.unwrap_or(0), redis_pid, own_pid];
                let before = pids.map(cpu_us);
                let run = client::closed_loop(&t, conc, settings.slice, 0).await;
                let after = pids.map(cpu_us);
                let used = cpu.entry(t.name.clone()).or_default();
                for i in 0..3 {
                    used[i] += after[i] - before[i];
                }
                measured.entry(t.name.clone()).or_default().merge(run);
            }
        }
        let memory_rps = measured.get("memory").map_or(0.0, client::Run::rps);
        let memory_p50 = measured
            .get("memory")
            .map_or(0.0, |r| Dist::new(r.latencies.clone()).p50_us());
        println!("\n== redis: a budgeted chat completion, concurrency {conc} ==");
        let mut row = serde_json::Map::new();
        for t in &targets {
            let Some(run) = measured.get(&t.name) else {
                continue;
            };
            let dist = Dist::new(run.latencies.clone());
            let calls = run.latencies.len().max(1) as f64;
            let [proxy_cpu, redis_cpu, load_cpu] = cpu
                .get(&t.name)
                .copied()
                .unwrap_or_default()
                .map(|us| us / calls);
            println!(
                "{:<12} {:>8.0} rps ({:.2}x memory), p50 {:>7.1} us (+{:.1}), p99 {:>7.1} us, errors {}, \
                 cpu per call: proxy {proxy_cpu:.0} us, redis {redis_cpu:.0} us, load+mock {load_cpu:.0} us",
                t.name,
                run.rps(),
                run.rps() / memory_rps.max(1.0),
                dist.p50_us(),
                dist.p50_us() - memory_p50,
                dist.p99_us(),
                run.errors,
            );
            row.insert(
                t.name.clone(),
                json!({
                    "rps": r1(run.rps()),
                    "rps_over_memory": r3(run.rps() / memory_rps.max(1.0)),
                    "p50_us": r1(dist.p50_us()),
                    "p99_us": r1(dist.p99_us()),
                    "added_p50_us": r1(dist.p50_us() - memory_p50),
                    "errors": run.errors,
                    "cpu_per_call_us": {
                        "proxy": r1(proxy_cpu),
                        "redis": r1(redis_cpu),
                        "load_and_mock": r1(load_cpu),
                    },
                }),
            );
        }
        rows.insert(format!("c{conc}"), Value::Object(row));
    }
    let rtt_us = delayed_rtt.as_secs_f64() * 1e6;
    rows.insert(
        "ping_loopback_us".into(),
        json!(r1(loopback_rtt.as_secs_f64() * 1e6)),
    );
    rows.insert("ping_delayed_us".into(), json!(r1(rtt_us)));
    if let Some(proxy_rtt) = proxy_rtt {
        let proxy_rtt_us = proxy_rtt.as_secs_f64() * 1e6;
        rows.insert("ping_from_proxy_core_us".into(), json!(r1(proxy_rtt_us)));
        if let Some(added) = rows
            .get("c1")
            .and_then(|r| r.get("redis"))
            .and_then(|r| r.get("added_p50_us"))
            .and_then(Value::as_f64)
        {
            println!(
                "on loopback (a PING from the proxies' core takes {proxy_rtt_us:.0} us): +{added:.0} us \
                 at p50 = {:.2} round trips",
                added / proxy_rtt_us.max(1.0)
            );
            rows.insert(
                "loopback_added_round_trips".into(),
                json!(r3(added / proxy_rtt_us.max(1.0))),
            );
        }
    }
    if let Some(added) = rows
        .get("c1")
        .and_then(|r| r.get("redis_250us"))
        .and_then(|r| r.get("added_p50_us"))
        .and_then(Value::as_f64)
    {
        println!(
            "with a {} us one-way delay (a PING takes {rtt_us:.0} us): +{added:.0} us at p50 = {:.2} round trips",
            DELAY.as_micros(),
            added / rtt_us.max(1.0)
        );
        rows.insert(
            "delayed_added_round_trips".into(),
            json!(r3(added / rtt_us.max(1.0))),
        );
    }
    println!(
        "Redis commands per call: {total:.2} ({})",
        per_call
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    rows.insert("commands_per_call".into(), json!(per_call));
    rows.insert("commands_per_call_total".into(), json!(r3(total)));
    println!("Redis time in scripts per call (INFO commandstats, I/O excluded): {script_us:.1} us");
    rows.insert("script_us_per_call".into(), json!(r1(script_us)));
    Some(Value::Object(rows))
}
