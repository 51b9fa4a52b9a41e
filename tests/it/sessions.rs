//! End-to-end tests of sessions: minting, the token's shape, every refusal on authenticated
//! requests and on `POST /session`, refresh, revocation, rate limits and `/health`, each
//! checked for status, `error.code` and `error.type` as the PROTOCOL gives them.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use perishable_mock::MockOptions;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const FP: &str = "device-sessions-test-1";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Asserts a Perishable error (status, `error.code`, `error.type`) and returns its headers.
async fn expect_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
    kind: &str,
) -> reqwest::header::HeaderMap {
    let got = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "expected {code}, body: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    if status == 401 {
        assert!(
            headers.contains_key("www-authenticate"),
            "401 without WWW-Authenticate ({code})"
        );
    }
    headers
}

/// Asserts a 401 with `code` (type `authentication_error`, and a `WWW-Authenticate` header).
async fn expect_401(response: reqwest::Response, code: &str) {
    expect_error(response, 401, code, "authentication_error").await;
}

/// Asserts a 400 mint refusal with `code`.
async fn expect_400(response: reqwest::Response, code: &str) {
    expect_error(response, 400, code, "invalid_request_error").await;
}

/// A proxy whose per-IP mint limit does not get in the way of many mint attempts.
async fn start() -> Proxy {
    Proxy::start_with(MockOptions::new(), |c| c.rate_limit_mint_per_ip(1000)).await
}

/// `GET /openai/models` with `token` and `fingerprint`.
async fn models(proxy: &Proxy, token: &str, fingerprint: &str) -> reqwest::Response {
    proxy
        .openai(Method::GET, "models", token, fingerprint)
        .send()
        .await
        .unwrap()
}

/// `POST /session` with a raw JSON body.
async fn post_session(proxy: &Proxy, body: &Value) -> reqwest::Response {
    proxy
        .http
        .post(proxy.url("/session"))
        .json(body)
        .send()
        .await
        .unwrap()
}

fn validation() -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&["perishable"]);
    validation.set_issuer(&["perishable"]);
    validation
}

/// The verified claims of a token signed with SECRET.
fn claims_of(token: &str) -> Value {
    jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation(),
    )
    .unwrap()
    .claims
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

/// Signs `claims` with `secret` as an `at+jwt` HS256 token with `kid`.
fn forge(claims: &Value, kid: &str, secret: &str) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("at+jwt".to_owned());
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn b64_sha256(data: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(data.as_bytes()))
}

/// A body for `POST /session`.
fn mint_body(fingerprint: &str, entropy: Value, pow: Value) -> Value {
    json!({"fingerprint": fingerprint, "entropy": entropy, "pow": pow})
}

/// A constant-interval, constant-speed straight line.
fn straight_line() -> Value {
    let pointer: Vec<Value> = (0..100)
        .map(|i| json!([i * 16, 100 + i * 3, 200 + i * 2]))
        .collect();
    json!({"pointer": pointer, "keys": [], "elapsed_ms": 1600})
}

async fn fresh_challenge(proxy: &Proxy) -> Value {
    proxy
        .http
        .get(proxy.url("/challenge"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A nonce that does NOT solve `challenge` at `difficulty`.
fn wrong_nonce(challenge: &str, difficulty: u8) -> String {
    (0u64..)
        .map(|n| format!("wrong-{n}"))
        .find(|nonce| {
            let digest = Sha256::new()
                .chain_update(challenge.as_bytes())
                .chain_update(nonce.as_bytes())
                .finalize();
            u128::from_be_bytes(digest[..16].try_into().unwrap()).leading_zeros()
                < u32::from(difficulty)
        })
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Minting and the token

#[tokio::test]
async fn mint_returns_the_session_object() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.session_ttl_secs(300)).await;
    let before = now();
    let response = proxy.mint_response(FP).await;
    assert_eq!(response.status(), 200);
    let object: Value = response.json().await.unwrap();
    let after = now();
    let keys: Vec<&String> = object.as_object().unwrap().keys().collect();
    for key in [
        "token",
        "token_type",
        "session_id",
        "expires_at",
        "expires_in",
    ] {
        assert!(object.get(key).is_some(), "{key} missing: {object}");
    }
    assert_eq!(keys.len(), 5, "{object}");
    assert_eq!(object["token_type"], "Bearer");
    let token = object["token"].as_str().unwrap();
    let expires_in = object["expires_in"].as_u64().unwrap();
    assert!((298..=300).contains(&expires_in), "{object}");
    let expires_at = object["expires_at"].as_u64().unwrap();
    assert!(
        (before + 300..=after + 300).contains(&expires_at),
        "{object}"
    );
    let claims = claims_of(token);
    assert_eq!(object["session_id"], claims["jti"]);
    assert_eq!(object["expires_at"], claims["exp"]);

    // The token works.
    assert_eq!(models(&proxy, token, FP).await.status(), 200);
}

#[tokio::test]
async fn token_header_and_claims() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.session_ttl_secs(300)).await;
    let token = proxy.mint(FP).await.token;

    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    assert_eq!(header.alg, Algorithm::HS256);
    assert!(header.kid.as_deref().is_some_and(|k| !k.is_empty()));

    let claims = claims_of(&token);
    assert_eq!(claims["iss"], "perishable");
    assert_eq!(claims["aud"], "perishable");
    let jti = claims["jti"].as_str().unwrap();
    assert!(jti.len() >= 22, "jti too short for 128 bits: {jti}");
    for key in ["iat", "nbf", "exp", "auth_time"] {
        assert!(claims[key].is_u64(), "{key}: {claims}");
    }
    let iat = claims["iat"].as_u64().unwrap();
    assert!(claims["nbf"].as_u64().unwrap() <= iat);
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 300);
    assert_eq!(claims["auth_time"].as_u64().unwrap(), iat);
    assert_eq!(claims["fp"], perishable::fingerprint::hash(FP));
    assert_eq!(claims["fp"], b64_sha256(FP));
    let ua = claims["ua"].as_str().expect("ua is bound by default");
    assert!(!ua.is_empty() && ua != UA);
    assert!(claims.get("cnf").is_none(), "{claims}");

    // No personal data: neither the raw fingerprint nor the User-Agent is in the payload.
    let payload = token.split('.').nth(1).unwrap();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert!(!payload.contains(FP), "{payload}");
    assert!(!payload.contains(UA), "{payload}");

    // Each mint is a new session id.
    let other = proxy.mint(FP).await.token;
    assert_ne!(claims_of(&other)["jti"], claims["jti"]);
}

#[tokio::test]
async fn user_agent_binding_can_be_switched_off() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.session_bind_user_agent(false)).await;
    let token = proxy.mint(FP).await.token;
    assert!(claims_of(&token).get("ua").is_none());
    let response = proxy
        .openai(Method::GET, "models", &token, FP)
        .header("user-agent", "another-agent/2.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn challenge_shape() {
    let proxy = start().await;
    let before = now();
    let challenge = fresh_challenge(&proxy).await;
    assert!(
        challenge["challenge"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );
    assert_eq!(challenge["difficulty"], 8);
    assert_eq!(challenge["algorithm"], "SHA-256");
    assert!(challenge["expires_at"].as_u64().unwrap() > before);
    assert_ne!(
        fresh_challenge(&proxy).await["challenge"],
        challenge["challenge"]
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals on authenticated requests

#[tokio::test]
async fn fingerprint_and_user_agent_must_match() {
    let proxy = start().await;
    let token = proxy.mint(FP).await.token;
    assert_eq!(models(&proxy, &token, FP).await.status(), 200);

    expect_401(
        models(&proxy, &token, "device-someone-else").await,
        "fingerprint_mismatch",
    )
    .await;

    let missing = proxy
        .http
        .get(proxy.url("/openai/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_401(missing, "fingerprint_mismatch").await;

    let other_ua = proxy
        .openai(Method::GET, "models", &token, FP)
        .header("user-agent", "evil-agent/6.6")
        .send()
        .await
        .unwrap();
    expect_401(other_ua, "fingerprint_mismatch").await;

    // Only the first request reached the upstream.
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn expired_token_is_refused() {
    let proxy = start().await;
    let token = proxy.mint(FP).await.token;
    let mut claims = claims_of(&token);
    let t = now();
    claims["iat"] = json!(t - 1200);
    claims["nbf"] = json!(t - 1200);
    claims["auth_time"] = json!(t - 1200);
    claims["exp"] = json!(t - 600);
    let expired = forge(&claims, &kid_of(&token), SECRET);
    expect_401(models(&proxy, &expired, FP).await, "token_expired").await;

    // The same forging with a live exp is accepted: the refusal above is about exp alone.
    claims["exp"] = json!(t + 600);
    let live = forge(&claims, &kid_of(&token), SECRET);
    assert_eq!(models(&proxy, &live, FP).await.status(), 200);
}

#[tokio::test]
async fn invalid_tokens_are_refused() {
    let proxy = start().await;
    let token = proxy.mint(FP).await.token;
    let kid = kid_of(&token);
    let claims = claims_of(&token);
    let mut parts = token.split('.');
    let (header, payload, signature) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );

    // Tampered payload: one character flipped.
    let mut tampered_payload: Vec<char> = payload.chars().collect();
    let mid = tampered_payload.len() / 2;
    tampered_payload[mid] = if tampered_payload[mid] == 'A' {
        'B'
    } else {
        'A'
    };
    let tampered_payload: String = tampered_payload.into_iter().collect();
    let tampered = format!("{header}.{tampered_payload}.{signature}");

    // Claims re-encoded with another fingerprint hash, keeping the original signature.
    let mut swapped = claims.clone();
    swapped["fp"] = json!(b64_sha256("device-attacker"));
    let swapped_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&swapped).unwrap());
    let swapped = format!("{header}.{swapped_payload}.{signature}");

    let none_header =
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "at+jwt", "kid": kid}).to_string());
    let alg_none = format!("{none_header}.{payload}.");
    let alg_none_signed = format!("{none_header}.{payload}.{signature}");

    let other_key = forge(&claims, &kid, "another-secret-another-secret-another!");
    let unknown_kid = forge(&claims, "some-other-kid", SECRET);

    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("someone-else");
    let wrong_aud = forge(&wrong_aud, &kid, SECRET);

    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("someone-else");
    let wrong_iss = forge(&wrong_iss, &kid, SECRET);

    let mut plain_jwt = Header::new(Algorithm::HS256);
    plain_jwt.kid = Some(kid.clone());
    let wrong_typ = jsonwebtoken::encode(
        &plain_jwt,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();

    let mut not_yet = claims.clone();
    not_yet["nbf"] = json!(now() + 3600);
    let not_yet = forge(&not_yet, &kid, SECRET);

    for (name, bad) in [
        ("tampered", tampered.as_str()),
        ("swapped claims", swapped.as_str()),
        ("alg none", alg_none.as_str()),
        ("alg none with signature", alg_none_signed.as_str()),
        ("other key", other_key.as_str()),
        ("unknown kid", unknown_kid.as_str()),
        ("wrong audience", wrong_aud.as_str()),
        ("wrong issuer", wrong_iss.as_str()),
        ("wrong typ", wrong_typ.as_str()),
        ("not yet valid", not_yet.as_str()),
        ("garbage", "not-a-jwt"),
    ] {
        let response = models(&proxy, bad, FP).await;
        assert_eq!(response.status(), 401, "{name}");
        expect_401(response, "invalid_token").await;
    }
    // The genuine token still works.
    assert_eq!(models(&proxy, &token, FP).await.status(), 200);
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn missing_token_is_refused() {
    let proxy = start().await;
    let response = proxy
        .http
        .get(proxy.url("/openai/models"))
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    expect_401(response, "missing_token").await;
    let response = proxy
        .http
        .post(proxy.url("/openai/chat/completions"))
        .json(&json!({"model": "gpt-4o-mini", "messages": []}))
        .send()
        .await
        .unwrap();
    expect_401(response, "missing_token").await;
    assert!(proxy.mock.requests().is_empty());
}

#[tokio::test]
async fn revoked_session_is_refused() {
    let proxy = start().await;
    let token = proxy.mint(FP).await.token;
    let other = proxy.mint(FP).await.token;
    assert_eq!(models(&proxy, &token, FP).await.status(), 200);

    let response = proxy
        .http
        .delete(proxy.url("/session"))
        .bearer_auth(&token)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    expect_401(models(&proxy, &token, FP).await, "session_revoked").await;
    // Revoking twice, or refreshing a revoked session, is refused the same way.
    let again = proxy
        .http
        .delete(proxy.url("/session"))
        .bearer_auth(&token)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    expect_401(again, "session_revoked").await;
    let refresh = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&token)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    expect_401(refresh, "session_revoked").await;
    // Another session of the same device is untouched.
    assert_eq!(models(&proxy, &other, FP).await.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Mint refusals

#[tokio::test]
async fn mint_refuses_bad_bodies() {
    let proxy = start().await;

    let response = proxy
        .http
        .post(proxy.url("/session"))
        .header("content-type", "application/json")
        .body("{\"fingerprint\": \"device-1234\", ")
        .send()
        .await
        .unwrap();
    expect_400(response, "invalid_json").await;

    let pow = proxy.solved_pow().await;
    let no_fingerprint = json!({"entropy": human_entropy(), "pow": pow});
    expect_400(
        post_session(&proxy, &no_fingerprint).await,
        "missing_fingerprint",
    )
    .await;

    for fingerprint in [
        "short".to_owned(),
        "1234567".to_owned(),
        "device-héllo-wörld".to_owned(),
        "device\u{7f}control".to_owned(),
        "device\ttab-inside".to_owned(),
        "x".repeat(513),
    ] {
        let body = mint_body(&fingerprint, human_entropy(), pow.clone());
        expect_400(post_session(&proxy, &body).await, "invalid_fingerprint").await;
    }
}

#[tokio::test]
async fn mint_requires_entropy() {
    let proxy = start().await;
    let pow = proxy.solved_pow().await;
    for entropy in [
        json!({"pointer": [], "keys": [], "elapsed_ms": 0}),
        json!({}),
        straight_line(),
        json!({"keys": (0..40).map(|i| i * 100).collect::<Vec<_>>(), "elapsed_ms": 4000}),
    ] {
        let body = mint_body(FP, entropy, pow.clone());
        expect_400(post_session(&proxy, &body).await, "insufficient_entropy").await;
    }
    // No entropy at all.
    let body = json!({"fingerprint": FP, "pow": pow});
    expect_400(post_session(&proxy, &body).await, "insufficient_entropy").await;
    // A client-sent score is never trusted.
    let body = mint_body(
        FP,
        json!({"pointer": [], "keys": [], "elapsed_ms": 0, "score": 100}),
        pow.clone(),
    );
    expect_400(post_session(&proxy, &body).await, "insufficient_entropy").await;
}

#[tokio::test]
async fn a_refused_mint_does_not_use_up_the_challenge() {
    let proxy = start().await;
    let pow = proxy.solved_pow().await;
    let body = mint_body(FP, straight_line(), pow.clone());
    expect_400(post_session(&proxy, &body).await, "insufficient_entropy").await;
    let body = mint_body("short", human_entropy(), pow.clone());
    expect_400(post_session(&proxy, &body).await, "invalid_fingerprint").await;
    let body = mint_body(FP, human_entropy(), pow);
    assert_eq!(post_session(&proxy, &body).await.status(), 200);
}

#[tokio::test]
async fn mint_requires_proof_of_work() {
    let proxy = start().await;
    let body = json!({"fingerprint": FP, "entropy": human_entropy()});
    expect_400(post_session(&proxy, &body).await, "pow_required").await;
    let body = mint_body(FP, human_entropy(), Value::Null);
    expect_400(post_session(&proxy, &body).await, "pow_required").await;
}

#[tokio::test]
async fn wrong_nonce_is_refused() {
    let proxy = start().await;
    let challenge = fresh_challenge(&proxy).await;
    let c = challenge["challenge"].as_str().unwrap();
    let difficulty = challenge["difficulty"].as_u64().unwrap() as u8;
    let pow = json!({"challenge": c, "nonce": wrong_nonce(c, difficulty)});
    expect_400(
        post_session(&proxy, &mint_body(FP, human_entropy(), pow)).await,
        "pow_invalid",
    )
    .await;
    // The right nonce for the same challenge works.
    let pow = json!({"challenge": c, "nonce": perishable_client::pow::solve(c, difficulty)});
    assert_eq!(
        post_session(&proxy, &mint_body(FP, human_entropy(), pow))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn expired_challenge_is_refused() {
    // A life of 3 s (counted in whole seconds: at least 2 s of it left when issued) and a
    // difficulty solved at once, so the fresh challenge below is used well within its life even
    // on a loaded machine.
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.pow_challenge_ttl_secs(3)
            .pow_difficulty(4)
            .rate_limit_mint_per_ip(1000)
    })
    .await;
    let pow = proxy.solved_pow().await;
    tokio::time::sleep(Duration::from_millis(4100)).await;
    expect_400(
        post_session(&proxy, &mint_body(FP, human_entropy(), pow)).await,
        "pow_invalid",
    )
    .await;
    // A fresh one works.
    let pow = proxy.solved_pow().await;
    assert_eq!(
        post_session(&proxy, &mint_body(FP, human_entropy(), pow))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn replayed_challenge_is_refused() {
    let proxy = start().await;
    let pow = proxy.solved_pow().await;
    let first = post_session(&proxy, &mint_body(FP, human_entropy(), pow.clone())).await;
    assert_eq!(first.status(), 200);
    let again = post_session(&proxy, &mint_body(FP, human_entropy(), pow.clone())).await;
    expect_400(again, "pow_invalid").await;
    // Also for another device: the challenge itself is used up.
    let other = post_session(
        &proxy,
        &mint_body("device-another-one", human_entropy(), pow),
    )
    .await;
    expect_400(other, "pow_invalid").await;
}

#[tokio::test]
async fn forged_challenges_are_refused() {
    let proxy = start().await;
    // From another server (another secret).
    let stranger = Proxy::start_with(MockOptions::new(), |c| {
        c.session_jwt_secret("a-completely-different-secret-of-32+bytes")
    })
    .await;
    let foreign = stranger.solved_pow().await;
    expect_400(
        post_session(&proxy, &mint_body(FP, human_entropy(), foreign)).await,
        "pow_invalid",
    )
    .await;

    // A genuine challenge with its middle part altered (and then solved).
    let challenge = fresh_challenge(&proxy).await;
    let c = challenge["challenge"].as_str().unwrap();
    let parts: Vec<&str> = c.split('.').collect();
    assert!(parts.len() >= 2, "{c}");
    let mut tampered = parts.clone();
    let middle = parts.len() / 2;
    let mut chars: Vec<char> = parts[middle].chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let altered: String = chars.into_iter().collect();
    tampered[middle] = &altered;
    let tampered = tampered.join(".");
    let pow = json!({"challenge": tampered, "nonce": perishable_client::pow::solve(&tampered, 8)});
    expect_400(
        post_session(&proxy, &mint_body(FP, human_entropy(), pow)).await,
        "pow_invalid",
    )
    .await;

    // Made up entirely.
    for made_up in ["v1.AAAA.BBBB", "anything", ""] {
        let pow = json!({"challenge": made_up, "nonce": perishable_client::pow::solve(made_up, 8)});
        expect_400(
            post_session(&proxy, &mint_body(FP, human_entropy(), pow)).await,
            "pow_invalid",
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Refresh

#[tokio::test]
async fn refresh_trades_the_token() {
    let proxy = start().await;
    let old = proxy.mint(FP).await.token;
    let old_claims = claims_of(&old);
    // Let the clock move so a reset auth_time would show.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let response = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&old)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let object: Value = response.json().await.unwrap();
    assert_eq!(object["token_type"], "Bearer");
    let new = object["token"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    let new_claims = claims_of(&new);
    assert_eq!(object["session_id"], new_claims["jti"]);
    assert_ne!(new_claims["jti"], old_claims["jti"]);
    assert_eq!(new_claims["fp"], old_claims["fp"]);
    assert_eq!(new_claims["ua"], old_claims["ua"]);
    assert_eq!(new_claims["auth_time"], old_claims["auth_time"]);
    assert!(new_claims["iat"].as_u64().unwrap() > old_claims["auth_time"].as_u64().unwrap());

    expect_401(models(&proxy, &old, FP).await, "session_revoked").await;
    assert_eq!(models(&proxy, &new, FP).await.status(), 200);

    // Refresh needs the same fingerprint as any authenticated call.
    let response = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&new)
        .header("x-perishable-fingerprint", "device-someone-else")
        .send()
        .await
        .unwrap();
    expect_401(response, "fingerprint_mismatch").await;
    assert_eq!(models(&proxy, &new, FP).await.status(), 200);
}

#[tokio::test]
async fn refresh_cannot_pass_the_max_lifetime() {
    const MAX: u64 = 3600;
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.session_ttl_secs(600).session_max_lifetime_secs(MAX)
    })
    .await;
    let token = proxy.mint(FP).await.token;
    let kid = kid_of(&token);
    let t = now();
    let mut claims = claims_of(&token);
    claims["iat"] = json!(t - 10);
    claims["nbf"] = json!(t - 10);
    claims["exp"] = json!(t + 590);

    // Past the absolute lifetime: refused.
    claims["auth_time"] = json!(t - MAX - 100);
    let too_old = forge(&claims, &kid, SECRET);
    let response = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&too_old)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    expect_401(response, "token_expired").await;

    // Near the end of its lifetime: refreshed, but not beyond it.
    let auth_time = t - MAX + 100;
    claims["auth_time"] = json!(auth_time);
    let nearly = forge(&claims, &kid, SECRET);
    let response = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&nearly)
        .header("x-perishable-fingerprint", FP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let object: Value = response.json().await.unwrap();
    let refreshed = claims_of(object["token"].as_str().unwrap());
    assert_eq!(refreshed["auth_time"], auth_time);
    assert!(
        refreshed["exp"].as_u64().unwrap() <= auth_time + MAX,
        "{refreshed}"
    );
    assert!(
        object["expires_at"].as_u64().unwrap() <= auth_time + MAX,
        "{object}"
    );
    assert!(object["expires_in"].as_u64().unwrap() <= 100, "{object}");
}

// ---------------------------------------------------------------------------------------------
// Rate limits and health

#[tokio::test]
async fn rate_limit_per_fingerprint() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.rate_limit_points(3)
            .rate_limit_duration_secs(1)
            .rate_limit_block_duration_secs(1)
    })
    .await;
    let token = proxy.mint(FP).await.token;
    let other = proxy.mint("device-sessions-other").await.token;

    for i in 0..3 {
        assert_eq!(
            models(&proxy, &token, FP).await.status(),
            200,
            "request {i}"
        );
    }
    let headers = expect_error(
        models(&proxy, &token, FP).await,
        429,
        "rate_limited",
        "rate_limit_error",
    )
    .await;
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    let policy = headers["ratelimit-policy"].to_str().unwrap();
    assert!(policy.contains("q=3") && policy.contains("w=1"), "{policy}");
    let limit = headers["ratelimit"].to_str().unwrap();
    assert!(limit.contains("r=0") && limit.contains("t="), "{limit}");
    assert_eq!(
        proxy.mock.requests().len(),
        3,
        "the refused request went upstream"
    );

    // Another device is not affected.
    assert_eq!(
        models(&proxy, &other, "device-sessions-other")
            .await
            .status(),
        200
    );

    tokio::time::sleep(Duration::from_millis(2200)).await;
    for i in 0..3 {
        assert_eq!(
            models(&proxy, &token, FP).await.status(),
            200,
            "after the window, {i}"
        );
    }
}

#[tokio::test]
async fn a_client_over_the_limit_stays_blocked() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.rate_limit_points(3)
            .rate_limit_duration_secs(1)
            .rate_limit_block_duration_secs(3)
    })
    .await;
    let token = proxy.mint(FP).await.token;
    for i in 0..3 {
        assert_eq!(
            models(&proxy, &token, FP).await.status(),
            200,
            "request {i}"
        );
    }
    let headers = expect_error(
        models(&proxy, &token, FP).await,
        429,
        "rate_limited",
        "rate_limit_error",
    )
    .await;
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((2..=3).contains(&retry_after), "Retry-After: {retry_after}");

    // The window has refilled, but the block (3 s) still holds.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    expect_error(
        models(&proxy, &token, FP).await,
        429,
        "rate_limited",
        "rate_limit_error",
    )
    .await;

    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(models(&proxy, &token, FP).await.status(), 200);
}

#[tokio::test]
async fn mint_is_limited_per_ip() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.rate_limit_mint_per_ip(2)).await;
    assert_eq!(proxy.mint_response("device-mint-1").await.status(), 200);
    assert_eq!(proxy.mint_response("device-mint-2").await.status(), 200);
    let headers = expect_error(
        proxy.mint_response("device-mint-3").await,
        429,
        "rate_limited",
        "rate_limit_error",
    )
    .await;
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert!(headers.contains_key("ratelimit-policy"));
    assert!(headers.contains_key("ratelimit"));
}

/// `POST /session` for `fingerprint` (good entropy, solved challenge) with an `X-Forwarded-For`.
async fn mint_forwarded_for(
    proxy: &Proxy,
    fingerprint: &str,
    forwarded_for: &str,
) -> reqwest::Response {
    let body = mint_body(fingerprint, human_entropy(), proxy.solved_pow().await);
    proxy
        .http
        .post(proxy.url("/session"))
        .header("x-forwarded-for", forwarded_for)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn forwarded_for_is_ignored_unless_the_peer_is_trusted() {
    // No trusted proxies: the socket peer (127.0.0.1) is the client, whatever the header says.
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.rate_limit_mint_per_ip(2)).await;
    for (i, ip) in ["203.0.113.1", "203.0.113.2"].into_iter().enumerate() {
        let response = mint_forwarded_for(&proxy, &format!("device-xff-{i}"), ip).await;
        assert_eq!(response.status(), 200);
    }
    let response = mint_forwarded_for(&proxy, "device-xff-2", "203.0.113.3").await;
    expect_error(response, 429, "rate_limited", "rate_limit_error").await;

    // 127.0.0.1 trusted: the right-most untrusted X-Forwarded-For address is the client.
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.rate_limit_mint_per_ip(2)
            .server_trusted_proxies(["127.0.0.0/8".parse().unwrap()])
    })
    .await;
    for i in 0..2 {
        let response =
            mint_forwarded_for(&proxy, &format!("device-xff-a{i}"), "6.6.6.6, 203.0.113.1").await;
        assert_eq!(response.status(), 200);
    }
    let response = mint_forwarded_for(&proxy, "device-xff-a2", "6.6.6.7, 203.0.113.1").await;
    expect_error(response, 429, "rate_limited", "rate_limit_error").await;
    let response = mint_forwarded_for(&proxy, "device-xff-b0", "203.0.113.2").await;
    assert_eq!(response.status(), 200, "another client behind the proxy");
}

#[tokio::test]
async fn health_needs_no_token() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| {
        c.rate_limit_points(1).rate_limit_mint_per_ip(1)
    })
    .await;
    for i in 0..10 {
        let request = proxy.http.get(proxy.url("/health"));
        let request = if i % 2 == 0 {
            request
        } else {
            request.bearer_auth("garbage")
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"status": "ok"}));
    }
}
