//! Abuse gates over real sockets: DPoP key binding, proof of work, session caps and client IP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use perishable::config::DpopMode;
use perishable::dpop::DpopSigner;
use perishable::{ConfigBuilder, SessionObject};
use perishable_mock::{MockOptions, MockUpstream};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const FP: &str = "device-abuse-gates-1";
const CHAT: &str = "/openai/chat/completions";
const MODELS: &str = "/openai/models";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A jti no other proof in this process uses.
fn unique_jti(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{nanos}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// base64url(SHA-256(token)): a proof's `ath` for `token`.
fn ath(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// The (unverified) claims of a JWT.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("the response has no {name} header: {headers:?}"))
        .to_str()
        .unwrap()
}

/// Asserts a PROTOCOL error (status, `error.code`, `error.type`) and returns its headers.
async fn expect_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
    kind: &str,
) -> HeaderMap {
    let got = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "expected {status} {code}, got {got}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], code, "{text}");
    assert_eq!(body["error"]["type"], kind, "{text}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{text}"
    );
    headers
}

/// On an authenticated request, `401 invalid_dpop_proof` with
/// `WWW-Authenticate: DPoP ... error="invalid_dpop_proof"` (RFC 9449 section 7.1).
async fn expect_bad_proof(response: reqwest::Response) {
    let headers = expect_error(response, 401, "invalid_dpop_proof", "authentication_error").await;
    expect_dpop_challenge(&headers);
}

/// On a mint, `400 invalid_dpop_proof`, with the same `WWW-Authenticate: DPoP` challenge.
async fn expect_bad_mint_proof(response: reqwest::Response) {
    let headers = expect_error(response, 400, "invalid_dpop_proof", "invalid_request_error").await;
    expect_dpop_challenge(&headers);
}

fn expect_dpop_challenge(headers: &reqwest::header::HeaderMap) {
    let challenge = header(headers, "www-authenticate");
    assert!(challenge.starts_with("DPoP"), "{challenge}");
    assert!(
        challenge.contains(r#"error="invalid_dpop_proof""#),
        "{challenge}"
    );
}

/// `401 dpop_required` with a `WWW-Authenticate: DPoP ...` challenge.
async fn expect_dpop_required(response: reqwest::Response) {
    let headers = expect_error(response, 401, "dpop_required", "authentication_error").await;
    let challenge = header(&headers, "www-authenticate");
    assert!(challenge.starts_with("DPoP"), "{challenge}");
}

/// A 401 with `code`, carrying `WWW-Authenticate`.
async fn expect_401(response: reqwest::Response, code: &str) -> String {
    let headers = expect_error(response, 401, code, "authentication_error").await;
    header(&headers, "www-authenticate").to_owned()
}

/// A 429 with `code`, carrying `Retry-After` (whole seconds), `RateLimit-Policy` and `RateLimit`.
async fn expect_429(response: reqwest::Response, code: &str) -> HeaderMap {
    let headers = expect_error(response, 429, code, "rate_limit_error").await;
    let retry: u64 = header(&headers, "retry-after")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(retry >= 1, "Retry-After {retry}");
    assert!(!header(&headers, "ratelimit-policy").is_empty());
    assert!(!header(&headers, "ratelimit").is_empty());
    headers
}

/// A `POST /session` body for `fingerprint` with good entropy and a solved challenge.
async fn mint_body(proxy: &Proxy, fingerprint: &str) -> Value {
    json!({
        "fingerprint": fingerprint,
        "entropy": human_entropy(),
        "pow": proxy.solved_pow().await,
    })
}

/// `POST {path}` with `body` and extra headers.
async fn post_session_at(
    proxy: &Proxy,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = proxy.http.post(proxy.url(path)).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// `POST /session` with `body` and extra headers.
async fn post_session(proxy: &Proxy, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    post_session_at(proxy, "/session", body, headers).await
}

/// A mint for `fingerprint`, with a `DPoP` header when `proof` is given.
async fn mint_with_proof(
    proxy: &Proxy,
    fingerprint: &str,
    proof: Option<&str>,
) -> reqwest::Response {
    let body = mint_body(proxy, fingerprint).await;
    match proof {
        Some(proof) => post_session(proxy, &body, &[("dpop", proof)]).await,
        None => post_session(proxy, &body, &[]).await,
    }
}

/// A session bound to `key` (asserting the mint worked and the binding is right).
async fn mint_bound(proxy: &Proxy, fingerprint: &str, key: &DpopSigner) -> SessionObject {
    let proof = key.proof("POST", &proxy.url("/session"), None);
    let response = mint_with_proof(proxy, fingerprint, Some(&proof)).await;
    assert_eq!(response.status(), 200, "bound mint failed");
    let session: SessionObject = response.json().await.unwrap();
    assert_eq!(session.token_type, "DPoP");
    assert_eq!(claims_of(&session.token)["cnf"]["jkt"], key.thumbprint());
    session
}

/// A request to `url` with `Authorization: <scheme> <token>`, the fingerprint, and `proof`.
fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    scheme: &str,
    token: &str,
    fingerprint: &str,
    proof: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut request = http
        .request(method, url)
        .header("authorization", format!("{scheme} {token}"))
        .header("x-perishable-fingerprint", fingerprint);
    if let Some(proof) = proof {
        request = request.header("dpop", proof);
    }
    request
}

/// `GET /openai/models` as the key holder: `DPoP` scheme and a fresh proof.
async fn models_as_holder(
    proxy: &Proxy,
    key: &DpopSigner,
    token: &str,
    fingerprint: &str,
) -> reqwest::Response {
    let proof = key.proof("GET", &proxy.url(MODELS), Some(token));
    call(
        &proxy.http,
        Method::GET,
        &proxy.url(MODELS),
        "DPoP",
        token,
        fingerprint,
        Some(&proof),
    )
    .send()
    .await
    .unwrap()
}

/// A mock and a proxy built from `base` (plus the harness settings and `tweak`), with the
/// router nested at `mount` when it is not empty.
async fn start_from(
    base: ConfigBuilder,
    mount: &str,
    tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> Proxy {
    let mock = MockUpstream::start(MockOptions::new().api_key(SERVER_KEY))
        .await
        .unwrap();
    let config = tweak(
        base.upstream_base_url(mock.base_url())
            .upstream_api_key(SERVER_KEY)
            .session_jwt_secret(SECRET)
            .pow_difficulty(8),
    )
    .build()
    .unwrap();
    let router: axum::Router = perishable::router(config);
    let app = if mount.is_empty() {
        router
    } else {
        axum::Router::new().nest(mount, router)
    };
    let addr = serve(app).await;
    Proxy {
        addr,
        mock,
        http: client(),
    }
}

fn leading_zero_bits(challenge: &str, nonce: &str) -> u32 {
    let digest = Sha256::new()
        .chain_update(challenge.as_bytes())
        .chain_update(nonce.as_bytes())
        .finalize();
    u128::from_be_bytes(digest[..16].try_into().unwrap()).leading_zeros()
}

async fn fresh_challenge(proxy: &Proxy) -> Value {
    let response = proxy
        .http
        .get(proxy.url("/challenge"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn pow_body(fingerprint: &str, challenge: &str, nonce: &str) -> Value {
    json!({
        "fingerprint": fingerprint,
        "entropy": human_entropy(),
        "pow": { "challenge": challenge, "nonce": nonce },
    })
}

// ---------------------------------------------------------------------------------------------
// 1. DPoP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dpop_bound_mint_binds_the_key_and_fresh_proofs_work() {
    let proxy = Proxy::start_with(
        MockOptions::new()
            .stream_deltas(3)
            .chunk_interval(Duration::from_millis(10)),
        |c| c,
    )
    .await;
    let key = DpopSigner::generate_es256();
    let session = mint_bound(&proxy, FP, &key).await;
    assert!(session.expires_in > 0);

    // GET /openai/models with a fresh proof.
    let response = models_as_holder(&proxy, &key, &session.token, FP).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    // The query is not part of htu.
    let proof = key.proof("GET", &proxy.url(MODELS), Some(&session.token));
    let response = call(
        &proxy.http,
        Method::GET,
        &proxy.url("/openai/models?limit=1"),
        "DPoP",
        &session.token,
        FP,
        Some(&proof),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);

    // A streamed chat completion with a fresh proof.
    let proof = key.proof("POST", &proxy.url(CHAT), Some(&session.token));
    let mut response = call(
        &proxy.http,
        Method::POST,
        &proxy.url(CHAT),
        "DPoP",
        &session.token,
        FP,
        Some(&proof),
    )
    .json(&json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": true,
    }))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = header(response.headers(), "content-type").to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // The upstream got the server's key and neither the token nor the proof.
    let seen = proxy.mock.requests();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {SERVER_KEY}").as_str())
        );
        assert!(request.header("dpop").is_none());
    }
}

#[tokio::test]
async fn ed25519_keys_bind_sessions_too() {
    let proxy = Proxy::start().await;
    let key = DpopSigner::generate_ed25519();
    let session = mint_bound(&proxy, FP, &key).await;
    let response = models_as_holder(&proxy, &key, &session.token, FP).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn mint_proofs_are_checked() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.rate_limit_mint_per_ip(100)).await;
    let key = DpopSigner::generate_es256();
    let session_url = proxy.url("/session");

    // Wrong method, wrong URL, stale: refused, and no session is minted.
    let wrong_htm = key.proof("GET", &session_url, None);
    expect_bad_mint_proof(mint_with_proof(&proxy, FP, Some(&wrong_htm)).await).await;
    let wrong_htu = key.proof("POST", &proxy.url("/session/refresh"), None);
    expect_bad_mint_proof(mint_with_proof(&proxy, FP, Some(&wrong_htu)).await).await;
    let other_host = key.proof("POST", "http://evil.example:1234/session", None);
    expect_bad_mint_proof(mint_with_proof(&proxy, FP, Some(&other_host)).await).await;
    let stale = key.sign(&json!({
        "jti": unique_jti("stale-mint"),
        "htm": "POST",
        "htu": session_url,
        "iat": now() - 120,
    }));
    expect_bad_mint_proof(mint_with_proof(&proxy, FP, Some(&stale)).await).await;
    expect_bad_mint_proof(mint_with_proof(&proxy, FP, Some("not.a.proof")).await).await;

    // A good proof works once; the same proof string on a second mint is a replay.
    let proof = key.proof("POST", &session_url, None);
    let response = mint_with_proof(&proxy, FP, Some(&proof)).await;
    assert_eq!(response.status(), 200);
    let session: SessionObject = response.json().await.unwrap();
    assert_eq!(session.token_type, "DPoP");
    assert_eq!(claims_of(&session.token)["cnf"]["jkt"], key.thumbprint());
    expect_bad_mint_proof(mint_with_proof(&proxy, "device-abuse-gates-2", Some(&proof)).await)
        .await;

    // Any scheme is fine for the session htu when public_url is unset.
    let https = key.proof("POST", &format!("https://{}/session", proxy.addr), None);
    let response = mint_with_proof(&proxy, "device-abuse-gates-3", Some(&https)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_stolen_dpop_token_is_useless_without_the_key() {
    let proxy = Proxy::start().await;
    let key = DpopSigner::generate_es256();
    let session = mint_bound(&proxy, FP, &key).await;
    let token = session.token.as_str();
    let models_url = proxy.url(MODELS);

    // The attacker copied the token, the fingerprint and the User-Agent, but not the key.
    let thief = client();
    let attacker_key = DpopSigner::generate_es256();
    let steal = |scheme: &str, proof: Option<&str>| {
        call(
            &thief,
            Method::GET,
            &proxy.url(MODELS),
            scheme,
            token,
            FP,
            proof,
        )
        .send()
    };

    // Bearer scheme, with or without a proof.
    expect_dpop_required(steal("Bearer", None).await.unwrap()).await;
    let holder_proof = key.proof("GET", &models_url, Some(token));
    expect_dpop_required(steal("Bearer", Some(&holder_proof)).await.unwrap()).await;
    // DPoP scheme without a proof.
    expect_dpop_required(steal("DPoP", None).await.unwrap()).await;
    // A proof from the attacker's key, otherwise perfect.
    let other_key = attacker_key.proof("GET", &models_url, Some(token));
    expect_bad_proof(steal("DPoP", Some(&other_key)).await.unwrap()).await;

    // Proofs from the right key that are wrong in one way each.
    let wrong_method = key.proof("POST", &models_url, Some(token));
    expect_bad_proof(steal("DPoP", Some(&wrong_method)).await.unwrap()).await;
    let wrong_url = key.proof("GET", &proxy.url("/openai/embeddings"), Some(token));
    expect_bad_proof(steal("DPoP", Some(&wrong_url)).await.unwrap()).await;
    let wrong_host = key.proof("GET", "http://evil.example/openai/models", Some(token));
    expect_bad_proof(steal("DPoP", Some(&wrong_host)).await.unwrap()).await;
    let stale = key.sign(&json!({
        "jti": unique_jti("stale"),
        "htm": "GET",
        "htu": models_url,
        "iat": now() - 120,
        "ath": ath(token),
    }));
    expect_bad_proof(steal("DPoP", Some(&stale)).await.unwrap()).await;
    let future = key.sign(&json!({
        "jti": unique_jti("future"),
        "htm": "GET",
        "htu": models_url,
        "iat": now() + 120,
        "ath": ath(token),
    }));
    expect_bad_proof(steal("DPoP", Some(&future)).await.unwrap()).await;
    let other_token = key.proof("GET", &models_url, Some(&format!("{token}x")));
    expect_bad_proof(steal("DPoP", Some(&other_token)).await.unwrap()).await;
    let no_ath = key.proof("GET", &models_url, None);
    expect_bad_proof(steal("DPoP", Some(&no_ath)).await.unwrap()).await;
    // Two DPoP headers.
    let response = call(
        &thief,
        Method::GET,
        &proxy.url(MODELS),
        "DPoP",
        token,
        FP,
        None,
    )
    .header("dpop", key.proof("GET", &models_url, Some(token)))
    .header("dpop", key.proof("GET", &models_url, Some(token)))
    .send()
    .await
    .unwrap();
    expect_bad_proof(response).await;

    // None of that reached the upstream.
    assert!(proxy.mock.requests().is_empty());

    // A proof the holder used is refused when replayed, byte for byte.
    let proof = key.proof("GET", &models_url, Some(token));
    let response = call(
        &proxy.http,
        Method::GET,
        &proxy.url(MODELS),
        "DPoP",
        token,
        FP,
        Some(&proof),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    expect_bad_proof(steal("DPoP", Some(&proof)).await.unwrap()).await;
    // Even by the holder.
    let response = call(
        &proxy.http,
        Method::GET,
        &proxy.url(MODELS),
        "DPoP",
        token,
        FP,
        Some(&proof),
    )
    .send()
    .await
    .unwrap();
    expect_bad_proof(response).await;
    assert_eq!(proxy.mock.requests().len(), 1);

    // The session itself is unharmed: a fresh proof still works.
    let response = models_as_holder(&proxy, &key, token, FP).await;
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.mock.requests().len(), 2);
}

#[tokio::test]
async fn a_bearer_session_sent_with_the_dpop_scheme_is_refused() {
    let proxy = Proxy::start().await;
    let session = proxy.mint(FP).await;
    assert_eq!(session.token_type, "Bearer");
    assert!(claims_of(&session.token).get("cnf").is_none());
    let key = DpopSigner::generate_es256();
    let proof = key.proof("GET", &proxy.url(MODELS), Some(&session.token));
    for proof in [None, Some(proof.as_str())] {
        let response = call(
            &proxy.http,
            Method::GET,
            &proxy.url(MODELS),
            "DPoP",
            &session.token,
            FP,
            proof,
        )
        .send()
        .await
        .unwrap();
        let challenge = expect_401(response, "invalid_token").await;
        assert!(challenge.contains("invalid_token"), "{challenge}");
    }
    assert!(proxy.mock.requests().is_empty());
    // With its own scheme it works.
    let response = call(
        &proxy.http,
        Method::GET,
        &proxy.url(MODELS),
        "Bearer",
        &session.token,
        FP,
        None,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn dpop_required_refuses_unbound_mints() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.session_dpop(DpopMode::Required)).await;
    expect_dpop_required(mint_with_proof(&proxy, FP, None).await).await;
    let key = DpopSigner::generate_es256();
    let session = mint_bound(&proxy, FP, &key).await;
    let response = models_as_holder(&proxy, &key, &session.token, FP).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn dpop_off_ignores_the_proof_on_mint() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.session_dpop(DpopMode::Off)).await;
    let key = DpopSigner::generate_es256();
    let proof = key.proof("POST", &proxy.url("/session"), None);
    let response = mint_with_proof(&proxy, FP, Some(&proof)).await;
    assert_eq!(response.status(), 200);
    let session: SessionObject = response.json().await.unwrap();
    assert_eq!(session.token_type, "Bearer");
    assert!(claims_of(&session.token).get("cnf").is_none());
    // A bearer session: no proof needed.
    let response = proxy
        .openai(Method::GET, "models", &session.token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn dpop_off_ignores_even_malformed_dpop_headers() {
    // `DpopMode::Off`: "DPoP headers are ignored; every session is a bearer session."
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.session_dpop(DpopMode::Off)).await;
    let body = mint_body(&proxy, FP).await;
    let response = post_session(&proxy, &body, &[("dpop", "not-a-proof")]).await;
    assert_eq!(response.status(), 200);
    let body = mint_body(&proxy, FP).await;
    let key = DpopSigner::generate_es256();
    let one = key.proof("POST", &proxy.url("/session"), None);
    let two = key.proof("POST", &proxy.url("/session"), None);
    let response = post_session(&proxy, &body, &[("dpop", &one), ("dpop", &two)]).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "two DPoP headers with DPoP off: {text}");
    let session: SessionObject = serde_json::from_str(&text).unwrap();
    assert_eq!(session.token_type, "Bearer");
}

#[tokio::test]
async fn public_url_is_the_htu_base() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.server_public_url("https://api.example.com/ai")
            .rate_limit_mint_per_ip(100)
    })
    .await;
    let key = DpopSigner::generate_es256();

    // The mint proof names the public /session URL; the local one is refused.
    let local = key.proof("POST", &proxy.url("/session"), None);
    expect_bad_mint_proof(mint_with_proof(&proxy, FP, Some(&local)).await).await;
    let public = key.proof("POST", "https://api.example.com/ai/session", None);
    let response = mint_with_proof(&proxy, FP, Some(&public)).await;
    assert_eq!(response.status(), 200);
    let session: SessionObject = response.json().await.unwrap();
    assert_eq!(session.token_type, "DPoP");
    let token = session.token.as_str();

    let get = |proof: String| {
        call(
            &proxy.http,
            Method::GET,
            &proxy.url(MODELS),
            "DPoP",
            token,
            FP,
            Some(&proof),
        )
        .send()
    };
    let response = get(key.proof(
        "GET",
        "https://api.example.com/ai/openai/models",
        Some(token),
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    // The local URL, the public one without the mount, or with another scheme: refused.
    for htu in [
        proxy.url(MODELS),
        "https://api.example.com/openai/models".to_owned(),
        "http://api.example.com/ai/openai/models".to_owned(),
    ] {
        let response = get(key.proof("GET", &htu, Some(token))).await.unwrap();
        expect_bad_proof(response).await;
    }
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn a_nested_router_checks_htu_against_the_full_path() {
    // Mounted at /ai with a public URL: the proof names the public URL plus the path below it.
    let proxy = start_from(ConfigBuilder::default(), "/ai", |c| {
        c.pow_difficulty(0)
            .server_public_url("https://api.example.com/ai")
    })
    .await;
    let key = DpopSigner::generate_es256();
    let body = json!({ "fingerprint": FP, "entropy": human_entropy() });
    let proof = key.proof("POST", "https://api.example.com/ai/session", None);
    let response = post_session_at(&proxy, "/ai/session", &body, &[("dpop", &proof)]).await;
    assert_eq!(response.status(), 200);
    let session: SessionObject = response.json().await.unwrap();
    let token = session.token.as_str();
    let path = "/ai/openai/models";
    let get = |htu: String| {
        let proof = key.proof("GET", &htu, Some(token));
        call(
            &proxy.http,
            Method::GET,
            &proxy.url(path),
            "DPoP",
            token,
            FP,
            Some(&proof),
        )
        .send()
    };
    let response = get("https://api.example.com/ai/openai/models".to_owned())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    expect_bad_proof(get(proxy.url(path)).await.unwrap()).await;
    expect_bad_proof(
        get("https://api.example.com/ai/ai/openai/models".to_owned())
            .await
            .unwrap(),
    )
    .await;

    // Mounted at /ai without a public URL: the Host header and the path as the client sent it.
    let proxy = start_from(ConfigBuilder::default(), "/ai", |c| c.pow_difficulty(0)).await;
    let proof = key.proof("POST", &proxy.url("/ai/session"), None);
    let response = post_session_at(&proxy, "/ai/session", &body, &[("dpop", &proof)]).await;
    assert_eq!(response.status(), 200);
    let session: SessionObject = response.json().await.unwrap();
    let token = session.token.as_str();
    let get = |htu: String| {
        let proof = key.proof("GET", &htu, Some(token));
        call(
            &proxy.http,
            Method::GET,
            &proxy.url(path),
            "DPoP",
            token,
            FP,
            Some(&proof),
        )
        .send()
    };
    let response = get(proxy.url(path)).await.unwrap();
    assert_eq!(response.status(), 200);
    // The path with the mount stripped is not the URL the client asked for.
    expect_bad_proof(get(proxy.url(MODELS)).await.unwrap()).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Refresh and revoke of key-bound sessions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_of_a_bound_session_needs_its_key() {
    let proxy = Proxy::start().await;
    let key = DpopSigner::generate_es256();
    let other = DpopSigner::generate_es256();
    let session = mint_bound(&proxy, FP, &key).await;
    let old = session.token.as_str();
    let refresh_url = proxy.url("/session/refresh");
    let refresh = |scheme: &str, proof: Option<String>| {
        call(
            &proxy.http,
            Method::POST,
            &proxy.url("/session/refresh"),
            scheme,
            old,
            FP,
            proof.as_deref(),
        )
        .send()
    };

    // Without a proof, with the Bearer scheme, with another key's proof, with a proof for
    // another URL: refused.
    expect_dpop_required(refresh("DPoP", None).await.unwrap()).await;
    let proof = key.proof("POST", &refresh_url, Some(old));
    expect_dpop_required(refresh("Bearer", Some(proof)).await.unwrap()).await;
    let proof = other.proof("POST", &refresh_url, Some(old));
    expect_bad_proof(refresh("DPoP", Some(proof)).await.unwrap()).await;
    let proof = key.proof("POST", &proxy.url("/session"), Some(old));
    expect_bad_proof(refresh("DPoP", Some(proof)).await.unwrap()).await;
    let proof = key.proof("GET", &refresh_url, Some(old));
    expect_bad_proof(refresh("DPoP", Some(proof)).await.unwrap()).await;

    // The refused refreshes revoked nothing.
    assert_eq!(models_as_holder(&proxy, &key, old, FP).await.status(), 200);

    // With the key: a new token bound to the same key.
    let proof = key.proof("POST", &refresh_url, Some(old));
    let response = refresh("DPoP", Some(proof)).await.unwrap();
    assert_eq!(response.status(), 200);
    let fresh: SessionObject = response.json().await.unwrap();
    assert_eq!(fresh.token_type, "DPoP");
    assert_ne!(fresh.token, old);
    assert_ne!(fresh.session_id, session.session_id);
    assert_eq!(claims_of(&fresh.token)["cnf"]["jkt"], key.thumbprint());

    // The old token is revoked; the new one needs the same key.
    let challenge = expect_401(
        models_as_holder(&proxy, &key, old, FP).await,
        "session_revoked",
    )
    .await;
    assert!(!challenge.is_empty());
    assert_eq!(
        models_as_holder(&proxy, &key, &fresh.token, FP)
            .await
            .status(),
        200
    );
    expect_bad_proof(models_as_holder(&proxy, &other, &fresh.token, FP).await).await;
    expect_dpop_required(
        call(
            &proxy.http,
            Method::GET,
            &proxy.url(MODELS),
            "Bearer",
            &fresh.token,
            FP,
            None,
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
}

#[tokio::test]
async fn revoke_of_a_bound_session_needs_its_key() {
    let proxy = Proxy::start().await;
    let key = DpopSigner::generate_es256();
    let other = DpopSigner::generate_es256();
    let session = mint_bound(&proxy, FP, &key).await;
    let token = session.token.as_str();
    let session_url = proxy.url("/session");
    let revoke = |scheme: &str, proof: Option<String>| {
        call(
            &proxy.http,
            Method::DELETE,
            &proxy.url("/session"),
            scheme,
            token,
            FP,
            proof.as_deref(),
        )
        .send()
    };

    expect_dpop_required(revoke("DPoP", None).await.unwrap()).await;
    expect_dpop_required(revoke("Bearer", None).await.unwrap()).await;
    let proof = other.proof("DELETE", &session_url, Some(token));
    expect_bad_proof(revoke("DPoP", Some(proof)).await.unwrap()).await;
    let proof = key.proof("POST", &session_url, Some(token));
    expect_bad_proof(revoke("DPoP", Some(proof)).await.unwrap()).await;
    assert_eq!(
        models_as_holder(&proxy, &key, token, FP).await.status(),
        200
    );

    let proof = key.proof("DELETE", &session_url, Some(token));
    let response = revoke("DPoP", Some(proof)).await.unwrap();
    assert_eq!(response.status(), 204);

    expect_401(
        models_as_holder(&proxy, &key, token, FP).await,
        "session_revoked",
    )
    .await;
    assert_eq!(proxy.mock.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 3. Proof of work
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn challenge_has_the_protocol_shape() {
    let proxy = Proxy::start().await;
    let response = proxy
        .http
        .get(proxy.url("/challenge"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let challenge: Value = response.json().await.unwrap();
    let object = challenge.as_object().unwrap();
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["algorithm", "challenge", "difficulty", "expires_at"]);
    assert!(!challenge["challenge"].as_str().unwrap().is_empty());
    assert_eq!(challenge["difficulty"], 8);
    assert_eq!(challenge["algorithm"], "SHA-256");
    assert!(challenge["expires_at"].as_u64().unwrap() > now());
    // Each challenge is fresh.
    let again = fresh_challenge(&proxy).await;
    assert_ne!(again["challenge"], challenge["challenge"]);
}

#[tokio::test]
async fn mint_without_pow_is_refused() {
    let proxy = Proxy::start().await;
    for body in [
        json!({ "fingerprint": FP, "entropy": human_entropy() }),
        json!({ "fingerprint": FP, "entropy": human_entropy(), "pow": null }),
    ] {
        let response = post_session(&proxy, &body, &[]).await;
        expect_error(response, 400, "pow_required", "invalid_request_error").await;
    }
}

#[tokio::test]
async fn wrong_nonces_are_refused() {
    let proxy = Proxy::start().await;
    let first = fresh_challenge(&proxy).await;
    let first = first["challenge"].as_str().unwrap();
    let first_nonce = perishable_client::pow::solve(first, 8);

    // A nonce that solves another challenge (and, checked here, not this one).
    let target = loop {
        let c = fresh_challenge(&proxy).await;
        let c = c["challenge"].as_str().unwrap().to_owned();
        if leading_zero_bits(&c, &first_nonce) < 8 {
            break c;
        }
    };
    let response = post_session(&proxy, &pow_body(FP, &target, &first_nonce), &[]).await;
    expect_error(response, 400, "pow_invalid", "invalid_request_error").await;

    // A nonce one bit short of the difficulty.
    let mut n = 0u64;
    let short = loop {
        let nonce = format!("short{n}");
        if leading_zero_bits(&target, &nonce) == 7 {
            break nonce;
        }
        n += 1;
    };
    let response = post_session(&proxy, &pow_body(FP, &target, &short), &[]).await;
    expect_error(response, 400, "pow_invalid", "invalid_request_error").await;

    // The refused attempts did not use the challenge up: a real solution still works.
    let good = perishable_client::pow::solve(&target, 8);
    let response = post_session(&proxy, &pow_body(FP, &target, &good), &[]).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn expired_challenges_are_refused() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.pow_challenge_ttl_secs(1)).await;
    let challenge = fresh_challenge(&proxy).await;
    let expires_at = challenge["expires_at"].as_u64().unwrap();
    assert!(expires_at <= now() + 1);
    let c = challenge["challenge"].as_str().unwrap();
    let nonce = perishable_client::pow::solve(c, 8);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(now() > expires_at);
    let response = post_session(&proxy, &pow_body(FP, c, &nonce), &[]).await;
    expect_error(response, 400, "pow_invalid", "invalid_request_error").await;
}

#[tokio::test]
async fn a_challenge_is_accepted_once() {
    let proxy = Proxy::start().await;
    let pow = proxy.solved_pow().await;
    let body = |fp: &str| json!({ "fingerprint": fp, "entropy": human_entropy(), "pow": pow });
    let response = post_session(&proxy, &body(FP), &[]).await;
    assert_eq!(response.status(), 200);
    // Replayed, for the same device or another.
    for fp in [FP, "device-abuse-gates-2"] {
        let response = post_session(&proxy, &body(fp), &[]).await;
        expect_error(response, 400, "pow_invalid", "invalid_request_error").await;
    }
}

#[tokio::test]
async fn forged_challenges_are_refused() {
    let proxy = Proxy::start().await;
    let challenge = fresh_challenge(&proxy).await;
    let challenge = challenge["challenge"].as_str().unwrap();
    let parts: Vec<&str> = challenge.split('.').collect();
    assert_eq!(parts.len(), 3, "{challenge}");
    let payload = URL_SAFE_NO_PAD.decode(parts[1]).unwrap();

    // Altered: one random byte flipped, or the expiry pushed out; each solved honestly.
    let mut flipped = payload.clone();
    flipped[0] ^= 1;
    let mut later = payload.clone();
    let exp_at = payload.len() - 9;
    let mut exp = [0u8; 8];
    exp.copy_from_slice(&payload[exp_at..exp_at + 8]);
    let pushed = u64::from_be_bytes(exp) + 3600;
    later[exp_at..exp_at + 8].copy_from_slice(&pushed.to_be_bytes());
    for altered in [flipped, later] {
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(altered),
            parts[2]
        );
        let nonce = perishable_client::pow::solve(&forged, 8);
        let response = post_session(&proxy, &pow_body(FP, &forged, &nonce), &[]).await;
        expect_error(response, 400, "pow_invalid", "invalid_request_error").await;
    }
    // The MAC of another challenge on this payload.
    let other = fresh_challenge(&proxy).await;
    let other_mac = other["challenge"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(2)
        .unwrap()
        .to_owned();
    let forged = format!("{}.{}.{other_mac}", parts[0], parts[1]);
    let nonce = perishable_client::pow::solve(&forged, 8);
    let response = post_session(&proxy, &pow_body(FP, &forged, &nonce), &[]).await;
    expect_error(response, 400, "pow_invalid", "invalid_request_error").await;

    // A challenge from another server (another signing secret), solved correctly.
    let elsewhere = Proxy::start_with(MockOptions::new(), |c| {
        c.session_jwt_secret("another-secret-another-secret-another!")
    })
    .await;
    let foreign = fresh_challenge(&elsewhere).await;
    let foreign = foreign["challenge"].as_str().unwrap();
    let nonce = perishable_client::pow::solve(foreign, 8);
    let response = post_session(&proxy, &pow_body(FP, foreign, &nonce), &[]).await;
    expect_error(response, 400, "pow_invalid", "invalid_request_error").await;
    // It is a good solution where it was issued.
    let response = post_session(&elsewhere, &pow_body(FP, foreign, &nonce), &[]).await;
    assert_eq!(response.status(), 200);

    // The untouched challenge, solved, is accepted here.
    let nonce = perishable_client::pow::solve(challenge, 8);
    let response = post_session(&proxy, &pow_body(FP, challenge, &nonce), &[]).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn difficulty_zero_switches_pow_off() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.pow_difficulty(0)).await;
    let challenge = fresh_challenge(&proxy).await;
    assert_eq!(challenge["difficulty"], 0);
    assert_eq!(challenge["algorithm"], "SHA-256");
    let body = json!({ "fingerprint": FP, "entropy": human_entropy() });
    let response = post_session(&proxy, &body, &[]).await;
    assert_eq!(response.status(), 200);
    let session: SessionObject = response.json().await.unwrap();
    let response = proxy
        .openai(Method::GET, "models", &session.token, FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// 4. Session caps
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sessions_are_capped_per_fingerprint() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.session_max_per_fingerprint(2).rate_limit_mint_per_ip(100)
    })
    .await;
    let first = proxy.mint(FP).await;
    let second = proxy.mint(FP).await;
    let headers = expect_429(proxy.mint_response(FP).await, "too_many_sessions").await;
    let retry: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!(
        retry <= 600,
        "Retry-After {retry} is past the token lifetime"
    );
    let policy = header(&headers, "ratelimit-policy");
    assert!(policy.contains("q=2"), "{policy}");
    let limit = header(&headers, "ratelimit");
    assert!(limit.contains("r=0"), "{limit}");

    // Another device is not affected.
    let elsewhere = proxy.mint("device-abuse-gates-2").await;
    assert_eq!(elsewhere.token_type, "Bearer");

    // The two sessions still work; revoking one frees a slot, once.
    for session in [&first, &second] {
        let response = proxy
            .openai(Method::GET, "models", &session.token, FP)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let response = proxy
        .http
        .delete(proxy.url("/session"))
        .bearer_auth(&first.token)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let third = proxy.mint(FP).await;
    expect_429(proxy.mint_response(FP).await, "too_many_sessions").await;

    // A refresh moves a slot, it does not free one.
    let response = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&third.token)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    expect_429(proxy.mint_response(FP).await, "too_many_sessions").await;
}

#[tokio::test]
async fn bound_sessions_are_capped_per_key() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.session_max_per_fingerprint(2).rate_limit_mint_per_ip(100)
    })
    .await;
    let key = DpopSigner::generate_es256();
    let first = mint_bound(&proxy, "device-key-a", &key).await;
    mint_bound(&proxy, "device-key-b", &key).await;
    // A third device with the same key: the key is full.
    let proof = key.proof("POST", &proxy.url("/session"), None);
    let response = mint_with_proof(&proxy, "device-key-c", Some(&proof)).await;
    let headers = expect_429(response, "too_many_sessions").await;
    assert!(header(&headers, "ratelimit-policy").contains("q=2"));
    // That device itself has room: unbound, or with another key.
    let response = mint_with_proof(&proxy, "device-key-c", None).await;
    assert_eq!(response.status(), 200);
    mint_bound(&proxy, "device-key-c", &DpopSigner::generate_es256()).await;

    // Revoking one of the key's sessions frees its slot under the key.
    let session_url = proxy.url("/session");
    let proof = key.proof("DELETE", &session_url, Some(&first.token));
    let response = call(
        &proxy.http,
        Method::DELETE,
        &session_url,
        "DPoP",
        &first.token,
        "device-key-a",
        Some(&proof),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 204);
    mint_bound(&proxy, "device-key-d", &key).await;
    let proof = key.proof("POST", &session_url, None);
    let response = mint_with_proof(&proxy, "device-key-e", Some(&proof)).await;
    expect_429(response, "too_many_sessions").await;
}

// ---------------------------------------------------------------------------------------------
// 5. Client IP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.rate_limit_mint_per_ip(1)).await;
    let body = mint_body(&proxy, FP).await;
    let response = post_session(&proxy, &body, &[("x-forwarded-for", "203.0.113.1")]).await;
    assert_eq!(response.status(), 200);
    let body = mint_body(&proxy, "device-abuse-gates-2").await;
    let response = post_session(&proxy, &body, &[("x-forwarded-for", "203.0.113.2")]).await;
    expect_429(response, "rate_limited").await;
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_is_the_client() {
    let base =
        ConfigBuilder::from_json_str(r#"{"server":{"trusted_proxies":["127.0.0.0/8"]}}"#).unwrap();
    let proxy = start_from(base, "", |c| c.rate_limit_mint_per_ip(1)).await;
    let mint_from = |xff: Option<&'static str>, fp: &'static str| {
        let proxy = &proxy;
        async move {
            let body = mint_body(proxy, fp).await;
            match xff {
                Some(xff) => post_session(proxy, &body, &[("x-forwarded-for", xff)]).await,
                None => post_session(proxy, &body, &[]).await,
            }
        }
    };
    // Two clients behind the proxy: each has its own limit.
    assert_eq!(
        mint_from(Some("203.0.113.1"), "device-ip-1").await.status(),
        200
    );
    assert_eq!(
        mint_from(Some("203.0.113.2"), "device-ip-2").await.status(),
        200
    );
    // The same client again: refused.
    expect_429(
        mint_from(Some("203.0.113.1"), "device-ip-3").await,
        "rate_limited",
    )
    .await;
    // A spoofed left-most entry does not change the key: the right-most untrusted hop counts.
    expect_429(
        mint_from(Some("198.51.100.7, 203.0.113.2"), "device-ip-4").await,
        "rate_limited",
    )
    .await;
    // Trusted hops are skipped.
    assert_eq!(
        mint_from(Some("203.0.113.3, 127.0.0.2"), "device-ip-5")
            .await
            .status(),
        200
    );
    expect_429(
        mint_from(Some("203.0.113.3"), "device-ip-6").await,
        "rate_limited",
    )
    .await;
    // No header: the peer itself is the client.
    assert_eq!(mint_from(None, "device-ip-7").await.status(), 200);
    expect_429(mint_from(None, "device-ip-8").await, "rate_limited").await;
}
