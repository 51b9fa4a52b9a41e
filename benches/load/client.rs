//! The load generator: hyper HTTP/1.1 connections (one per concurrency slot, kept alive,
//! TCP_NODELAY), closed-loop and fixed-rate request loops, streaming readers.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use perishable::dpop::DpopSigner;
use tokio::net::{TcpSocket, TcpStream};

use crate::servers::unix_ns;

/// The User-Agent every request sends (sessions are bound to it).
pub const UA: &str = "perishable-load/1.0";

/// Body of the non-streaming request.
pub const CHAT_BODY: &[u8] =
    br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;

/// Body of a streamed request whose chunks carry their send time.
pub fn stamped_body(n: usize, interval_ms: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"bench:stamped:{n}:{interval_ms}"}}]}}"#
    ))
}

/// Body of a streamed request of `n` events of `size` bytes, `interval_ms` apart, counted by
/// the mock under `tag`.
pub fn bulk_body(size: usize, interval_ms: u64, n: usize, tag: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"bench:bulk:{size}:{interval_ms}:{n}:{tag}"}}]}}"#
    ))
}

/// The credentials of one client (one concurrency slot).
#[derive(Clone)]
pub struct Slot {
    pub headers: HeaderMap,
    /// DPoP-bound: the key and token (each request needs a fresh proof).
    pub dpop: Option<(Arc<DpopSigner>, String)>,
}

/// Something to send load to: the mock itself, a proxy, a peer.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// `/v1` for the mock, `/openai` for the proxies.
    pub base_path: String,
    pub slots: Vec<Slot>,
    /// Process to read RSS and CPU time from.
    pub pid: Option<u32>,
}

impl Target {
    pub fn path(&self, rest: &str) -> String {
        format!("{}/{rest}", self.base_path.trim_end_matches('/'))
    }

    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i % self.slots.len()]
    }

    pub fn is_dpop(&self) -> bool {
        self.slots.iter().any(|s| s.dpop.is_some())
    }
}

/// A source of request heads for one slot: its headers, plus a fresh DPoP proof when bound
/// (proofs are made ahead of the timed loop by [`Heads::prefill`]).
pub struct Heads {
    slot: Slot,
    host: HeaderValue,
    htu: String,
    uri: String,
    proofs: Vec<HeaderValue>,
    pub made_inline: usize,
}

impl Heads {
    pub fn new(target: &Target, i: usize, path: &str) -> Self {
        let uri = target.path(path);
        Self {
            slot: target.slot(i).clone(),
            host: HeaderValue::from_str(&target.host).expect("host"),
            htu: format!("http://{}{}", target.host, uri),
            uri,
            proofs: Vec::new(),
            made_inline: 0,
        }
    }

    /// Makes `n` DPoP proofs ahead (no-op for bearer slots).
    pub fn prefill(&mut self, n: usize) {
        if let Some((signer, token)) = &self.slot.dpop {
            self.proofs.extend((0..n).map(|_| {
                HeaderValue::from_str(&signer.proof("POST", &self.htu, Some(token))).expect("proof")
            }));
        }
    }

    pub fn request(&mut self, body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.parse().expect("uri");
        let headers = req.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (k, v) in &self.slot.headers {
            headers.insert(k.clone(), v.clone());
        }
        if let Some((signer, token)) = &self.slot.dpop {
            let proof = match self.proofs.pop() {
                Some(p) => p,
                None => {
                    self.made_inline += 1;
                    HeaderValue::from_str(&signer.proof("POST", &self.htu, Some(token)))
                        .expect("proof")
                }
            };
            headers.insert(HeaderName::from_static("dpop"), proof);
        }
        req
    }
}

/// One kept-alive HTTP/1.1 connection with TCP_NODELAY.
pub async fn connect(addr: SocketAddr) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    handshake(stream).await
}

/// A connection whose receive buffer is fixed at `rcvbuf` bytes (a slow mobile client).
pub async fn connect_small(
    addr: SocketAddr,
    rcvbuf: u32,
) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(rcvbuf)?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    handshake(stream).await
}

async fn handshake(stream: TcpStream) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole response: `Ok(status)` or an error.
pub async fn roundtrip(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<u16, ()> {
    sender.ready().await.map_err(|_| ())?;
    let response = sender.send_request(req).await.map_err(|_| ())?;
    let status = response.status().as_u16();
    response.into_body().collect().await.map_err(|_| ())?;
    Ok(status)
}

/// What a request loop measured.
#[derive(Debug, Default)]
pub struct Run {
    /// Latencies in ns.
    pub latencies: Vec<i64>,
    pub errors: u64,
    pub wall: Duration,
    /// Requests sent more than 2 ms after their scheduled time (fixed-rate only).
    pub late: u64,
    pub proofs_made_inline: usize,
}

impl Run {
    pub fn merge(&mut self, other: Run) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.wall += other.wall;
        self.late += other.late;
        self.proofs_made_inline += other.proofs_made_inline;
    }

    pub fn rps(&self) -> f64 {
        if self.wall.is_zero() {
            return 0.0;
        }
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

async fn open_slots(
    target: &Target,
    conc: usize,
    proofs_per_slot: usize,
) -> Vec<(SendRequest<Full<Bytes>>, Heads)> {
    let mut slots = Vec::with_capacity(conc);
    for i in 0..conc {
        let sender = connect(target.addr).await.expect("connect to the target");
        let mut heads = Heads::new(target, i, "chat/completions");
        heads.prefill(proofs_per_slot);
        slots.push((sender, heads));
    }
    slots
}

/// Closed loop: `conc` connections each send the next request as soon as the last one is read,
/// for `duration`.
pub async fn closed_loop(
    target: &Target,
    conc: usize,
    duration: Duration,
    proofs_per_slot: usize,
) -> Run {
    let slots = open_slots(target, conc, proofs_per_slot).await;
    let start = Instant::now();
    let deadline = start + duration;
    let body = Bytes::from_static(CHAT_BODY);
    let mut tasks = tokio::task::JoinSet::new();
    for (mut sender, mut heads) in slots {
        let body = body.clone();
        let addr = target.addr;
        tasks.spawn_local(async move {
            let mut run = Run::default();
            // Bounded: one request per round trip until the deadline, at most 10 M.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= deadline {
                    break;
                }
                let req = heads.request(body.clone());
                let t0 = Instant::now();
                match roundtrip(&mut sender, req).await {
                    Ok(200) => run.latencies.push(t0.elapsed().as_nanos() as i64),
                    Ok(_) => run.errors += 1,
                    Err(()) => {
                        run.errors += 1;
                        match connect(addr).await {
                            Ok(s) => sender = s,
                            Err(_) => break,
                        }
                    }
                }
            }
            run.proofs_made_inline = heads.made_inline;
            run
        });
    }
    let mut total = Run::default();
    while let Some(run) = tasks.join_next().await {
        total.merge(run.expect("a load task"));
    }
    total.wall = start.elapsed();
    total
}

/// Concurrency 1, interleaved: one connection per target, and each turn sends one request to
/// every target in turn (the order rotating), so every target is measured under the same
/// conditions, request by request, and drift on the machine cancels out of the differences.
/// Each run's `wall` is the sum of its own latencies (one request in flight: RPS = 1 / mean).
pub async fn interleaved(targets: &[Target], duration: Duration, proofs: usize) -> Vec<Run> {
    let mut slots = Vec::with_capacity(targets.len());
    for t in targets {
        let mut slot = open_slots(t, 1, proofs).await;
        slots.push(slot.pop().expect("one slot"));
    }
    let mut runs: Vec<Run> = targets.iter().map(|_| Run::default()).collect();
    let body = Bytes::from_static(CHAT_BODY);
    let deadline = Instant::now() + duration;
    let n = targets.len();
    let mut turn = 0usize;
    while Instant::now() < deadline {
        for k in 0..n {
            let i = (turn + k) % n;
            let (sender, heads) = &mut slots[i];
            let req = heads.request(body.clone());
            let t0 = Instant::now();
            match roundtrip(sender, req).await {
                Ok(200) => {
                    let took = t0.elapsed();
                    runs[i].latencies.push(took.as_nanos() as i64);
                    runs[i].wall += took;
                }
                Ok(_) => runs[i].errors += 1,
                Err(()) => {
                    runs[i].errors += 1;
                    match connect(targets[i].addr).await {
                        Ok(s) => *sender = s,
                        Err(_) => return runs,
                    }
                }
            }
        }
        turn += 1;
    }
    for (run, (_, heads)) in runs.iter_mut().zip(&slots) {
        run.proofs_made_inline = heads.made_inline;
    }
    runs
}

/// Fixed rate: requests are due `1/rate` apart; each goes out on an idle connection of `conns`.
/// Latency is measured from the moment the request is sent.
pub async fn fixed_rate(
    target: &Target,
    conns: usize,
    rate: f64,
    duration: Duration,
    proofs_per_slot: usize,
) -> Run {
    let slots = open_slots(target, conns, proofs_per_slot).await;
    let body = Bytes::from_static(CHAT_BODY);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    // One worker at a time waits on the queue (an mpsc receiver wakes only its last poller).
    let rx = Rc::new(tokio::sync::Mutex::new(rx));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (mut sender, mut heads) in slots {
        let rx = rx.clone();
        let body = body.clone();
        tasks.spawn_local(async move {
            let mut run = Run::default();
            loop {
                let due = rx.lock().await.recv().await;
                let Some(due) = due else { break };
                let req = heads.request(body.clone());
                let t0 = Instant::now();
                if t0.duration_since(due) > Duration::from_millis(2) {
                    run.late += 1;
                }
                match roundtrip(&mut sender, req).await {
                    Ok(200) => run.latencies.push(t0.elapsed().as_nanos() as i64),
                    _ => run.errors += 1,
                }
            }
            run.proofs_made_inline = heads.made_inline;
            run
        });
    }
    let total_requests = (rate * duration.as_secs_f64()) as u64;
    let mut sent = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total_requests {
        ticker.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due_now = ((elapsed * rate) as u64).min(total_requests);
        while sent < due_now {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            let _ = tx.send(due);
            sent += 1;
        }
    }
    drop(tx);
    let mut total = Run::default();
    while let Some(run) = tasks.join_next().await {
        total.merge(run.expect("a load task"));
    }
    total.wall = start.elapsed();
    total
}

/// What streaming readers measured.
#[derive(Debug, Default, Clone)]
pub struct StreamRun {
    /// Request sent to first content chunk, ns.
    pub ttfb: Vec<i64>,
    /// Between two content chunks as received, ns.
    pub gaps: Vec<i64>,
    /// |received gap - sent gap|: how much the path distorted the spacing, ns.
    pub jitter: Vec<i64>,
    /// Written by the mock to read by the client, ns.
    pub transit: Vec<i64>,
    pub chunks: u64,
    pub expected: u64,
    /// Reads that held more than one event.
    pub merged: u64,
    pub lost: u64,
    pub errors: u64,
}

impl StreamRun {
    pub fn merge(&mut self, o: StreamRun) {
        self.ttfb.extend(o.ttfb);
        self.gaps.extend(o.gaps);
        self.jitter.extend(o.jitter);
        self.transit.extend(o.transit);
        self.chunks += o.chunks;
        self.expected += o.expected;
        self.merged += o.merged;
        self.lost += o.lost;
        self.errors += o.errors;
    }
}

/// The `(seq, stamp)` pairs of the stamped chunks in one read, and how many SSE events it held.
fn parse_stamps(data: &[u8], out: &mut Vec<(u64, i64)>) -> usize {
    let text = String::from_utf8_lossy(data);
    let events = text.matches("data:").count();
    // Our content is `<seq>:<ns>;`; a proxy may re-encode the JSON around it.
    let mut rest: &str = &text;
    while let Some(i) = rest.find("\"content\":") {
        rest = &rest[i + "\"content\":".len()..];
        let Some(q) = rest.find('"') else { break };
        let body = &rest[q + 1..];
        let end = body.find(';').unwrap_or(0);
        let item = &body[..end];
        if let Some((seq, ns)) = item.split_once(':')
            && let (Ok(seq), Ok(ns)) = (seq.parse(), ns.parse())
        {
            out.push((seq, ns));
        }
        rest = body;
    }
    events
}

/// One streamed request of `n` stamped chunks on `sender`.
pub async fn one_stream(
    sender: &mut SendRequest<Full<Bytes>>,
    heads: &mut Heads,
    n: usize,
    interval_ms: u64,
) -> StreamRun {
    let mut run = StreamRun {
        expected: n as u64,
        ..StreamRun::default()
    };
    let req = heads.request(stamped_body(n, interval_ms));
    if sender.ready().await.is_err() {
        run.errors += 1;
        run.lost += n as u64;
        return run;
    }
    let t0 = Instant::now();
    let Ok(response) = sender.send_request(req).await else {
        run.errors += 1;
        run.lost += n as u64;
        return run;
    };
    if response.status() != 200 {
        run.errors += 1;
        run.lost += n as u64;
        let _ = response.into_body().collect().await;
        return run;
    }
    let mut body = response.into_body();
    let mut stamps = Vec::with_capacity(4);
    let mut last: Option<(Instant, i64, u64)> = None;
    let mut next_seq = 1u64;
    // Bounded by the stream itself (n events then [DONE]) and by a timeout per read.
    let per_read = Duration::from_millis(interval_ms * 50 + 10_000);
    loop {
        let frame = match tokio::time::timeout(per_read, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => {
                run.errors += 1;
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        let now_unix = unix_ns();
        stamps.clear();
        let events = parse_stamps(&data, &mut stamps);
        if events > 1 {
            run.merged += 1;
        }
        for &(seq, sent) in &stamps {
            if seq != next_seq {
                run.lost += seq.saturating_sub(next_seq);
            }
            next_seq = seq + 1;
            run.chunks += 1;
            run.transit.push(now_unix - sent);
            match last {
                None => run.ttfb.push((now - t0).as_nanos() as i64),
                Some((at, sent_before, _)) => {
                    let gap = (now - at).as_nanos() as i64;
                    run.gaps.push(gap);
                    run.jitter.push((gap - (sent - sent_before)).abs());
                }
            }
            last = Some((now, sent, seq));
        }
    }
    run.lost += (n as u64 + 1).saturating_sub(next_seq);
    run
}

/// `conc` concurrent streams, one per slot, `n` chunks `interval_ms` apart each. Their starts
/// are spread evenly over one interval, so time to first byte measures one request, not a
/// burst of `conc` arriving together.
pub async fn streams(target: &Target, conc: usize, n: usize, interval_ms: u64) -> StreamRun {
    streams_phased(target, conc, n, interval_ms, 0.0).await
}

/// [`streams`], with every start shifted by `phase` (0 to 1) of the stagger between two
/// streams: targets measured at once, each with its own phase, never have their chunks due at
/// the same instant.
pub async fn streams_phased(
    target: &Target,
    conc: usize,
    n: usize,
    interval_ms: u64,
    phase: f64,
) -> StreamRun {
    let mut tasks = tokio::task::JoinSet::new();
    let stagger = Duration::from_millis(interval_ms.max(1)) / conc.max(1) as u32;
    let start = tokio::time::Instant::now()
        + Duration::from_millis(5)
        + stagger.mul_f64(phase.clamp(0.0, 1.0));
    for i in 0..conc {
        let mut heads = Heads::new(target, i, "chat/completions");
        heads.prefill(1);
        let addr = target.addr;
        tasks.spawn_local(async move {
            let Ok(mut sender) = connect(addr).await else {
                return StreamRun {
                    errors: 1,
                    expected: n as u64,
                    lost: n as u64,
                    ..StreamRun::default()
                };
            };
            tokio::time::sleep_until(start + stagger * i as u32).await;
            one_stream(&mut sender, &mut heads, n, interval_ms).await
        });
    }
    let mut total = StreamRun::default();
    while let Some(run) = tasks.join_next().await {
        total.merge(run.expect("a stream task"));
    }
    total
}

/// Starts a stream on a new connection and waits for its first chunk; the returned body keeps
/// it open. `rcvbuf` fixes the client's receive buffer.
pub async fn open_stream(
    target: &Target,
    i: usize,
    body: Bytes,
    rcvbuf: Option<u32>,
) -> Result<(SendRequest<Full<Bytes>>, hyper::body::Incoming, usize), String> {
    let mut sender = match rcvbuf {
        Some(size) => connect_small(target.addr, size).await,
        None => connect(target.addr).await,
    }
    .map_err(|e| format!("connect: {e}"))?;
    let mut heads = Heads::new(target, i, "chat/completions");
    let req = heads.request(body);
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .map_err(|_| "no first chunk in 30 s".to_owned())?;
    let read = match first {
        Some(Ok(frame)) => frame.into_data().map_or(0, |d| d.len()),
        _ => return Err("the stream ended before its first chunk".to_owned()),
    };
    Ok((sender, body, read))
}

/// A raw HTTP/1.1 stream for the slow client: the request written by hand on a socket whose
/// receive buffer is fixed at `rcvbuf` bytes, so the client itself buffers nothing beyond
/// what it reads (4 KB a second).
pub async fn open_raw_stream(
    target: &Target,
    i: usize,
    body: &[u8],
    rcvbuf: u32,
) -> std::io::Result<TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(rcvbuf)?;
    let mut stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let mut head = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        target.path("chat/completions"),
        target.host,
        body.len()
    );
    let slot = target.slot(i);
    for (k, v) in &slot.headers {
        head.push_str(k.as_str());
        head.push_str(": ");
        head.push_str(v.to_str().unwrap_or_default());
        head.push_str("\r\n");
    }
    if let Some((signer, token)) = &slot.dpop {
        let htu = format!("http://{}{}", target.host, target.path("chat/completions"));
        head.push_str("dpop: ");
        head.push_str(&signer.proof("POST", &htu, Some(token)));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    Ok(stream)
}
