//! Observability end to end (the `observe` and `audit` module docs): the metrics through a
//! test recorder, the `perishable.request` span and every log line free of secrets and
//! fingerprints, and the audit hook.

#![allow(clippy::unwrap_used)]

// The shared harness; this binary uses part of it.
#[allow(unused_macros, unused_imports)]
#[path = "../it/support.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use perishable::audit::AuditEvent;
use perishable::dpop::DpopSigner;
use perishable::{ErrorCode, Perishable, SessionObject};
use perishable_mock::{MockOptions, MockUpstream};
use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use tracing_subscriber::fmt::format::FmtSpan;

/// The tests here share the global recorder and subscriber: they run one at a time, each on a
/// current-thread runtime (whose tasks stop with the test), so each sees only its own metrics.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The global metrics recorder, installed once for the whole binary.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().unwrap();
        snapshotter
    })
}

/// Everything written by the global tracing subscriber (every span and event, at TRACE).
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Capture(logs.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            // Span fields are printed when a span opens and closes (with what was recorded).
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
}

fn logs_text() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned()
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the recorder and the subscriber (whichever test comes first) and takes the turn.
async fn setup() -> tokio::sync::MutexGuard<'static, ()> {
    snapshotter();
    captured_logs();
    SERIAL.lock().await
}

/// Metrics summed over snapshots (taking a snapshot resets the recorder's counters).
#[derive(Default, Debug)]
struct Metrics {
    counters: HashMap<String, u64>,
    histograms: HashMap<String, Vec<f64>>,
}

impl Metrics {
    /// `name{label=value,...}`, labels sorted.
    fn id(name: &str, labels: &[(&str, &str)]) -> String {
        let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        format!("{name}{{{}}}", labels.join(","))
    }

    fn collect(&mut self) {
        for (key, _, _, value) in snapshotter().snapshot().into_vec() {
            let key = key.key();
            let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
            let id = Self::id(key.name(), &labels);
            match value {
                DebugValue::Counter(n) => *self.counters.entry(id).or_default() += n,
                DebugValue::Histogram(values) => self
                    .histograms
                    .entry(id)
                    .or_default()
                    .extend(values.into_iter().map(|v| v.0)),
                DebugValue::Gauge(_) => {}
            }
        }
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .get(&Self::id(name, labels))
            .copied()
            .unwrap_or(0)
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> &[f64] {
        self.histograms
            .get(&Self::id(name, labels))
            .map_or(&[], Vec::as_slice)
    }
}

fn chat(content: &str, stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream,
           "messages": [{"role": "user", "content": content}]})
}

async fn refresh(proxy: &Proxy, session: &SessionObject, fp: &str) -> SessionObject {
    let response = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&session.token)
        .header("x-perishable-fingerprint", fp)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn revoke(proxy: &Proxy, session: &SessionObject, fp: &str) {
    let response = proxy
        .http
        .delete(proxy.url("/session"))
        .bearer_auth(&session.token)
        .header("x-perishable-fingerprint", fp)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_count_requests_refusals_sessions_tokens_and_upstream() {
    let _turn = setup().await;
    // Forget what earlier tests recorded.
    snapshotter().snapshot();

    let options = MockOptions::new()
        .deterministic(true)
        .stream_deltas(6)
        .chunk_interval(Duration::from_millis(5));
    // A budget makes every call metered: the proxy then asks streams for their usage.
    let proxy = Proxy::start_with(options, |c| c.budget_tokens_per_window(1_000_000)).await;
    let fp = "device-metrics-01";
    let session = proxy.mint(fp).await; // GET /challenge, POST /session

    // Non-streamed: 3 prompt words, 6 completion deltas.
    let plain = chat("one two three", false);
    let response = proxy
        .openai(Method::POST, "chat/completions", &session.token, fp)
        .json(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let json_bytes = response.bytes().await.unwrap().len() as u64;
    // Streamed: 5 prompt words, 6 completion deltas (usage asked for by the proxy).
    let streamed = chat("four five six seven eight", true);
    let response = proxy
        .openai(Method::POST, "chat/completions", &session.token, fp)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    // Refused: no token.
    let refused = proxy
        .http
        .get(proxy.url("/openai/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(error_code(refused).await, "missing_token");
    let refreshed = refresh(&proxy, &session, fp).await;
    revoke(&proxy, &refreshed, fp).await;

    // What the upstream sent for the stream (the proxy asked it for usage): the deterministic
    // mock answers this direct request with the same bytes.
    let mut asked = streamed.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let stream_bytes = client()
        .post(format!("{}/chat/completions", proxy.mock.base_url()))
        .bearer_auth(SERVER_KEY)
        .json(&asked)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len() as u64;

    // The end-of-body hook runs as the proxy sees each body end: wait for both.
    let mut m = Metrics::default();
    for _ in 0..100 {
        m.collect();
        if m.histogram("perishable_upstream_duration_seconds", &[])
            .len()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    m.collect();

    let requests = |route: &str, status: &str| {
        m.counter(
            "perishable_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("challenge", "200"), 1, "{m:#?}");
    assert_eq!(requests("mint", "200"), 1, "{m:#?}");
    assert_eq!(requests("openai", "200"), 2, "{m:#?}");
    assert_eq!(requests("openai", "401"), 1, "{m:#?}");
    assert_eq!(requests("refresh", "200"), 1, "{m:#?}");
    assert_eq!(requests("revoke", "204"), 1, "{m:#?}");
    let total: u64 = m
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with("perishable_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 7, "{m:#?}");

    assert_eq!(
        m.counter("perishable_refusals_total", &[("code", "missing_token")]),
        1
    );
    let refusals: u64 = m
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with("perishable_refusals_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(refusals, 1, "{m:#?}");

    for event in ["minted", "refreshed", "revoked"] {
        assert_eq!(
            m.counter("perishable_sessions_total", &[("event", event)]),
            1,
            "{event}: {m:#?}"
        );
    }

    assert_eq!(
        m.counter("perishable_tokens_total", &[("kind", "prompt")]),
        3 + 5,
        "{m:#?}"
    );
    assert_eq!(
        m.counter("perishable_tokens_total", &[("kind", "completion")]),
        6 + 6,
        "{m:#?}"
    );

    for name in [
        "perishable_upstream_first_byte_seconds",
        "perishable_upstream_duration_seconds",
    ] {
        let values = m.histogram(name, &[]);
        assert_eq!(values.len(), 2, "{name}: one per upstream request: {m:#?}");
        assert!(values.iter().all(|v| *v >= 0.0), "{name}: {values:?}");
    }
    assert_eq!(
        m.histogram(
            "perishable_request_duration_seconds",
            &[("route", "openai")]
        )
        .len(),
        3
    );
    assert_eq!(
        m.histogram("perishable_request_duration_seconds", &[("route", "mint")])
            .len(),
        1
    );
    // Every byte the upstream sent, the usage the client never saw included.
    assert_eq!(
        m.counter("perishable_upstream_bytes_total", &[]),
        json_bytes + stream_bytes,
        "{m:#?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_or_fingerprint_in_spans_or_logs() {
    let _turn = setup().await;
    const PUBLIC: &str = "https://ai.perishable.test";
    let options = MockOptions::new()
        .stream_deltas(3)
        .chunk_interval(Duration::from_millis(5));
    let proxy = Proxy::start_with(options, |c| c.server_public_url(PUBLIC)).await;
    let start = captured_logs().lock().unwrap().len();

    let fp = "fp-SECRET-device-12345";
    let session = proxy.mint(fp).await;
    let token = session.token.clone();
    let ok = proxy
        .openai(Method::POST, "chat/completions", &token, fp)
        .json(&chat("hello there", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    ok.bytes().await.unwrap();
    let streamed = proxy
        .openai(Method::POST, "chat/completions", &token, fp)
        .json(&chat("hello there", true))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    streamed.bytes().await.unwrap();

    // Refusals: a wrong fingerprint, a forged signature.
    let wrong_fp = "fp-SECRET-wrong-00000";
    let wrong = proxy
        .openai(Method::GET, "models", &token, wrong_fp)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(error_code(wrong).await, "fingerprint_mismatch");
    let (unsigned, signature) = token.rsplit_once('.').unwrap();
    let forged_signature: String = signature
        .chars()
        .rev()
        .map(|c| if c == 'A' { 'B' } else { c })
        .collect();
    let forged = format!("{unsigned}.{forged_signature}");
    let bad = proxy
        .openai(Method::GET, "models", &forged, fp)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(error_code(bad).await, "invalid_token");

    // A key-bound session and a request with its proof.
    let dpop_fp = "fp-SECRET-dpop-67890";
    let key = DpopSigner::generate_es256();
    let mint_proof = key.proof("POST", &format!("{PUBLIC}/session"), None);
    let minted: Value = proxy
        .http
        .post(proxy.url("/session"))
        .header("dpop", &mint_proof)
        .json(&json!({
            "fingerprint": dpop_fp,
            "entropy": human_entropy(),
            "pow": proxy.solved_pow().await,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(minted["token_type"], "DPoP", "{minted}");
    let dpop_token = minted["token"].as_str().unwrap().to_owned();
    let proof = key.proof("GET", &format!("{PUBLIC}/openai/models"), Some(&dpop_token));
    let bound = proxy
        .http
        .get(proxy.url("/openai/models"))
        .header("authorization", format!("DPoP {dpop_token}"))
        .header("dpop", &proof)
        .header("x-perishable-fingerprint", dpop_fp)
        .send()
        .await
        .unwrap();
    assert_eq!(bound.status(), 200);
    bound.bytes().await.unwrap();

    revoke(&proxy, &session, fp).await;

    // Spans close as their responses are handed over: wait for the revocation's.
    let mut logs = String::new();
    for _ in 0..100 {
        logs = logs_text();
        if logs[start..].contains("route=\"revoke\"") && logs[start..].contains("status=204") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ours = &logs[start..];

    // What must show.
    assert!(ours.contains("perishable.request"), "{ours}");
    for route in ["mint", "openai", "revoke", "challenge"] {
        assert!(
            ours.contains(&format!("route=\"{route}\"")),
            "{route}: {ours}"
        );
    }
    // The proxied request's span closes with the session and both statuses.
    let session_field = format!("session_id=\"{}\"", session.session_id);
    assert!(
        ours.lines()
            .any(|line| line.contains("perishable.request{route=\"openai\"")
                && line.contains(&session_field)
                && line.contains("upstream_status=200")
                && line.contains(" status=200")
                && line.contains("latency_us=")),
        "no openai span with {session_field}: {ours}"
    );
    assert!(ours.contains("status=200") && ours.contains("status=401"));

    // What must not, anywhere in what was captured.
    let mut secrets: Vec<(String, String)> = vec![
        ("the server's key".into(), SERVER_KEY.into()),
        ("the JWT secret".into(), SECRET.into()),
        ("a fingerprint".into(), "fp-SECRET".into()),
        ("a fingerprint".into(), "device-12345".into()),
        ("a fingerprint".into(), "dpop-67890".into()),
        ("a fingerprint".into(), "wrong-00000".into()),
        (
            "a fingerprint hash".into(),
            perishable::fingerprint::hash(fp),
        ),
    ];
    for (what, jwt) in [
        ("the session token", &token),
        ("the forged token", &forged),
        ("the key-bound token", &dpop_token),
        ("the mint DPoP proof", &mint_proof),
        ("the request DPoP proof", &proof),
    ] {
        secrets.push((what.into(), jwt.clone()));
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        // The payload whole, and any 16 characters of the signature.
        secrets.push((format!("{what}'s payload"), parts[1].into()));
        let signature: Vec<char> = parts[2].chars().collect();
        for window in signature.windows(16) {
            secrets.push((format!("{what}'s signature"), window.iter().collect()));
        }
    }
    for (what, secret) in &secrets {
        let leaks: Vec<&str> = logs
            .lines()
            .filter(|line| line.contains(secret.as_str()))
            .collect();
        assert!(
            leaks.is_empty(),
            "{what} ({secret}) appears in the logs:\n{}",
            leaks.join("\n")
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn audit_hook_receives_session_events_and_refusals() {
    let _turn = setup().await;
    let mock = MockUpstream::start(MockOptions::new().api_key(SERVER_KEY))
        .await
        .unwrap();
    let perishable = Perishable::new(config(&mock.base_url()).build().unwrap()).unwrap();
    let events: Arc<Mutex<Vec<AuditEvent>>> = Arc::default();
    let sink = events.clone();
    perishable
        .on_audit(move |event| sink.lock().unwrap().push(event.clone()))
        .unwrap();
    assert!(
        perishable.on_audit(|_| {}).is_err(),
        "a second hook is refused"
    );
    let addr = serve(perishable::router_from(&perishable)).await;
    let proxy = Proxy {
        addr,
        mock,
        http: client(),
    };
    let fp = "device-audit-001";

    let first = proxy.mint(fp).await;
    // Refused after verification: the session is known.
    let not_allowed = proxy
        .openai(Method::GET, "files", &first.token, fp)
        .send()
        .await
        .unwrap();
    assert_eq!(not_allowed.status(), 403);
    let second = refresh(&proxy, &first, fp).await;
    assert_ne!(second.session_id, first.session_id);
    revoke(&proxy, &second, fp).await;
    // Refused before any session.
    let missing = proxy
        .http
        .get(proxy.url("/openai/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    missing.bytes().await.unwrap();

    let events = events.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![
            AuditEvent::Minted {
                session_id: first.session_id.clone(),
                key_bound: false,
                expires_at: first.expires_at,
                policy: "pow+entropy".to_owned(),
                user: false,
            },
            AuditEvent::Refused {
                code: ErrorCode::PathNotAllowed,
                route: "openai",
                session_id: Some(first.session_id.clone()),
            },
            AuditEvent::Refreshed {
                old_session_id: first.session_id.clone(),
                session_id: second.session_id.clone(),
                expires_at: second.expires_at,
            },
            AuditEvent::Revoked {
                session_id: second.session_id.clone(),
            },
            AuditEvent::Refused {
                code: ErrorCode::MissingToken,
                route: "openai",
                session_id: None,
            },
        ]
    );
}
