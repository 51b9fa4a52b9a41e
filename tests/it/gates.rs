//! Mint gates end to end (`docs/gates.md`): a local OpenID Connect issuer (discovery, a JWKS,
//! ES256 ID tokens) and a local captcha `siteverify` server on 127.0.0.1, in front of real
//! proxies; policies of alternatives; the `usr` claim, per-user budgets across sessions, tiers;
//! a gate of the app's own.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use perishable::gate::{Evidence, Facts, Gate, GateFuture};
use perishable::{ConfigBuilder, Error, ErrorCode, Perishable};
use perishable_mock::{MockOptions, MockUpstream};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

pub(crate) const AUDIENCE: &str = "my-app";

/// A local OpenID Connect issuer: discovery and a JWKS with one ES256 key.
pub(crate) struct Issuer {
    pub(crate) url: String,
    key: jsonwebtoken::EncodingKey,
    kid: String,
}

impl Issuer {
    pub(crate) async fn start() -> Self {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let kid = "test-key-1".to_owned();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let discovery = json!({"issuer": url, "jwks_uri": format!("{url}/jwks")});
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || async move { axum::Json(discovery) }),
            )
            .route("/jwks", get(move || async move { axum::Json(jwks) }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            key: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            kid,
        }
    }

    /// An ID token for `sub` with `extra` claims merged in, valid for 10 minutes.
    pub(crate) fn token(&self, sub: &str, extra: Value) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = json!({
            "iss": self.url, "sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 600,
        });
        if let (Some(claims), Value::Object(extra)) = (claims.as_object_mut(), extra) {
            claims.extend(extra);
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

/// A proxy in front of a mock, built with `tweak` and `gates`.
async fn proxy(
    tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    gates: Vec<Invitation>,
) -> Proxy {
    let mock = MockUpstream::start(MockOptions::new().api_key(SERVER_KEY))
        .await
        .unwrap();
    let config = tweak(config(&mock.base_url()).rate_limit_mint_per_ip(1_000))
        .build()
        .unwrap();
    let mut builder = Perishable::builder(config);
    for gate in gates {
        builder = builder.gate(gate);
    }
    let perishable = builder.build().unwrap();
    let addr = serve(perishable::router_from(&perishable)).await;
    Proxy {
        addr,
        mock,
        http: client(),
    }
}

fn oidc(issuer: &Issuer) -> impl FnOnce(ConfigBuilder) -> ConfigBuilder + '_ {
    move |c: ConfigBuilder| {
        c.mint_policies([["oidc"]])
            .mint_oidc_issuer(issuer.url.clone())
            .mint_oidc_audience(AUDIENCE)
    }
}

async fn mint(proxy: &Proxy, body: Value) -> reqwest::Response {
    proxy
        .http
        .post(proxy.url("/session"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn minted(proxy: &Proxy, body: Value) -> Value {
    let response = mint(proxy, body).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

pub(crate) fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn an_id_token_mints_a_session_for_its_user() {
    let issuer = Issuer::start().await;
    let proxy = proxy(oidc(&issuer), vec![]).await;

    // No ID token, a forged one, one for another audience: refused, and named.
    let response = mint(&proxy, json!({"fingerprint": "device-oidc-1"})).await;
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    assert_eq!(error_code(response).await, "id_token_required");
    let mut forged = issuer.token("alice", json!({}));
    forged.push('x');
    for bad in [
        forged,
        issuer.token("alice", json!({"aud": "another-app"})),
        issuer.token("alice", json!({"iss": "https://evil.example"})),
        issuer.token("alice", json!({"exp": 1_000})),
    ] {
        let response = mint(
            &proxy,
            json!({"fingerprint": "device-oidc-1", "id_token": bad}),
        )
        .await;
        assert_eq!(response.status(), 401);
        assert_eq!(error_code(response).await, "invalid_id_token");
    }

    // A good one: no proof of work or samples needed under this policy; the token carries the
    // user as a hash of iss and sub, nothing personal.
    let session = minted(
        &proxy,
        json!({"fingerprint": "device-oidc-1", "id_token": issuer.token("alice", json!({}))}),
    )
    .await;
    let claims = claims(session["token"].as_str().unwrap());
    let usr = claims["usr"].as_str().unwrap();
    assert_eq!(usr.len(), 43, "base64url SHA-256");
    assert!(!claims.to_string().contains("alice"));
    let token = session["token"].as_str().unwrap();
    let models = proxy
        .openai(Method::GET, "models", token, "device-oidc-1")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);

    // The same user on another device is the same user.
    let other = minted(
        &proxy,
        json!({"fingerprint": "device-oidc-2", "id_token": issuer.token("alice", json!({}))}),
    )
    .await;
    assert_eq!(
        crate::gates::claims(other["token"].as_str().unwrap())["usr"],
        usr
    );
}

#[tokio::test]
async fn a_users_budget_spans_all_their_sessions_and_tiers_set_it() {
    let issuer = Issuer::start().await;
    let proxy = proxy(
        |c| {
            oidc(&issuer)(c)
                .mint_oidc_tier_claim("plan")
                .budget_tokens_per_window(60)
                .budget_tier_tokens_per_window("pro", 100_000)
                .budget_window_secs(86_400)
        },
        vec![],
    )
    .await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]});
    let call = |token: String, fp: &'static str| {
        let request = proxy
            .openai(Method::POST, "chat/completions", &token, fp)
            .json(&body);
        async move { request.send().await.unwrap() }
    };

    // Two devices of one free user share one budget of 60 tokens: each call reserves 20 plus
    // its prompt, so the third call (from either device) does not fit.
    let a = minted(
        &proxy,
        json!({"fingerprint": "device-free-1", "id_token": issuer.token("bob", json!({}))}),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = minted(
        &proxy,
        json!({"fingerprint": "device-free-2", "id_token": issuer.token("bob", json!({}))}),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut statuses = Vec::new();
    for (token, fp) in [
        (a.clone(), "device-free-1"),
        (b.clone(), "device-free-2"),
        (a.clone(), "device-free-1"),
        (b.clone(), "device-free-2"),
    ] {
        let response = call(token, fp).await;
        statuses.push(response.status().as_u16());
        let _ = response.bytes().await;
    }
    assert!(
        statuses.contains(&429),
        "one user's budget across two sessions: {statuses:?}"
    );
    let refused = call(b, "device-free-2").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(error_code(refused).await, "budget_exhausted");

    // A pro user has the pro budget: the same calls all pass.
    let pro = minted(
        &proxy,
        json!({"fingerprint": "device-pro-1", "id_token": issuer.token("carol", json!({"plan": "pro"}))}),
    )
    .await;
    let pro_token = pro["token"].as_str().unwrap().to_owned();
    assert_eq!(claims(&pro_token)["tier"], "pro");
    for _ in 0..5 {
        let response = call(pro_token.clone(), "device-pro-1").await;
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await;
    }
}

/// A tier's `points`: its users' rate limit instead of `rate_limit.points`, per user across
/// their sessions; users of other tiers, and without one, keep the default.
async fn tier_points(store_url: Option<String>) {
    let issuer = Issuer::start().await;
    let proxy = proxy(
        |c| {
            let c = oidc(&issuer)(c)
                .mint_oidc_tier_claim("plan")
                .rate_limit_points(2)
                .rate_limit_duration_secs(3_600)
                .budget_tier_points("pro", 5);
            match &store_url {
                Some(url) => c.store_url(url.clone()),
                None => c,
            }
        },
        vec![],
    )
    .await;
    let session = |sub: &'static str, plan: Option<&'static str>, fp: &'static str| {
        let extra = plan.map_or(json!({}), |plan| json!({ "plan": plan }));
        let body = json!({"fingerprint": fp, "id_token": issuer.token(sub, extra)});
        let proxy = &proxy;
        async move {
            minted(proxy, body).await["token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let calls = |token: String, fp: &'static str, n: usize| {
        let proxy = &proxy;
        async move {
            let mut statuses = Vec::new();
            let mut last = None;
            for _ in 0..n {
                let response = proxy
                    .openai(Method::GET, "models", &token, fp)
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
                last = Some(response);
            }
            (statuses, last.unwrap())
        }
    };

    // Free (a plan with no tier section) and no plan at all: the default 2.
    for (sub, plan, fp) in [
        ("gina", Some("free"), "device-tier-1"),
        ("hank", None, "device-tier-2"),
    ] {
        let (statuses, refused) = calls(session(sub, plan, fp).await, fp, 3).await;
        assert_eq!(statuses, [200, 200, 429], "{sub}");
        assert_eq!(
            refused.headers()["ratelimit-policy"],
            "\"session\";q=2;w=3600"
        );
        assert_eq!(error_code(refused).await, "rate_limited");
    }
    // Pro: 5, shared by all of the user's sessions and devices.
    let (statuses, _) = calls(
        session("ivy", Some("pro"), "device-tier-3").await,
        "device-tier-3",
        3,
    )
    .await;
    assert_eq!(statuses, [200, 200, 200]);
    let (statuses, refused) = calls(
        session("ivy", Some("pro"), "device-tier-4").await,
        "device-tier-4",
        3,
    )
    .await;
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(
        refused.headers()["ratelimit-policy"],
        "\"session\";q=5;w=3600"
    );
}

on_both_stores!(
    a_tiers_points_set_its_users_rate_limit_memory,
    a_tiers_points_set_its_users_rate_limit_redis,
    |url| tier_points(url)
);

/// A tier's `max_completion_tokens`: its users' completion cap instead of
/// `budget.max_completion_tokens`.
#[tokio::test]
async fn a_tiers_completion_cap_replaces_the_default() {
    let issuer = Issuer::start().await;
    let proxy = proxy(
        |c| {
            oidc(&issuer)(c)
                .mint_oidc_tier_claim("plan")
                .budget_max_completion_tokens(16)
                .budget_tier_max_completion_tokens("pro", 64)
        },
        vec![],
    )
    .await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}]});
    for (sub, plan, fp, cap) in [
        ("jack", None, "device-cap-1", 16),
        ("kate", Some("pro"), "device-cap-2", 64),
    ] {
        let extra = plan.map_or(json!({}), |plan: &str| json!({ "plan": plan }));
        let token = minted(
            &proxy,
            json!({"fingerprint": fp, "id_token": issuer.token(sub, extra)}),
        )
        .await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        proxy.mock.clear();
        let response = proxy
            .openai(Method::POST, "chat/completions", &token, fp)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await;
        let sent = proxy.mock.requests()[0].body_json().unwrap();
        assert_eq!(sent["max_tokens"], cap, "{sub}");
    }
}

/// The `captcha` gate's settings, with `verify_url` for the provider's siteverify.
fn with_captcha(c: ConfigBuilder, verify_url: String) -> ConfigBuilder {
    c.mint_captcha_provider("turnstile")
        .mint_captcha_secret("captcha-secret")
        .mint_captcha_verify_url(verify_url)
        .mint_captcha_hostnames(["example.com"])
}

/// A local siteverify server: accepts the token `good` solved on `example.com` once, and
/// tokens starting `lax` every time (a provider that does not refuse a token seen twice).
async fn siteverify() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    async fn verify(
        State(seen): State<Arc<Mutex<Vec<String>>>>,
        body: String,
    ) -> axum::Json<Value> {
        let token = body
            .split('&')
            .find_map(|pair| pair.strip_prefix("response="))
            .unwrap_or_default()
            .to_owned();
        let field = format!("response={token}");
        let replay = seen
            .lock()
            .unwrap()
            .iter()
            .any(|form| form.split('&').any(|pair| pair == field));
        seen.lock().unwrap().push(body.clone());
        axum::Json(match (token.as_str(), replay) {
            (lax, _) if lax.starts_with("lax") => {
                json!({"success": true, "hostname": "example.com"})
            }
            ("good", false) => json!({"success": true, "hostname": "example.com"}),
            (_, true) => json!({"success": false, "error-codes": ["timeout-or-duplicate"]}),
            _ => json!({"success": false, "error-codes": ["invalid-input-response"]}),
        })
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/siteverify", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/siteverify", post(verify))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test]
async fn policies_are_alternatives_and_a_refusal_names_its_gate() {
    let issuer = Issuer::start().await;
    let (verify_url, seen) = siteverify().await;
    // Signed-in users, or anyone who solves the captcha.
    let proxy = proxy(
        |c| {
            with_captcha(c, verify_url)
                .mint_policies(vec![vec!["oidc"], vec!["captcha"]])
                .mint_oidc_issuer(issuer.url.clone())
                .mint_oidc_audience(AUDIENCE)
        },
        vec![],
    )
    .await;

    // Neither: the first policy's missing evidence is named.
    let response = mint(&proxy, json!({"fingerprint": "device-alt-1"})).await;
    assert_eq!(error_code(response).await, "id_token_required");
    // A wrong captcha: that refusal is about evidence shown, so it is the one named.
    let response = mint(
        &proxy,
        json!({"fingerprint": "device-alt-1", "captcha": "bad"}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_code(response).await, "captcha_invalid");
    // The captcha alternative: passes once; the server got the secret and the token.
    minted(
        &proxy,
        json!({"fingerprint": "device-alt-1", "captcha": "good"}),
    )
    .await;
    let form = seen.lock().unwrap().last().unwrap().clone();
    assert!(form.contains("secret=captcha-secret") && form.contains("response=good"));
    assert!(form.contains("remoteip=127.0.0.1"), "{form}");
    assert!(form.contains("idempotency_key="), "{form}");
    // The same captcha again is a replay.
    let response = mint(
        &proxy,
        json!({"fingerprint": "device-alt-1", "captcha": "good"}),
    )
    .await;
    assert_eq!(error_code(response).await, "captcha_invalid");
    // The identity alternative.
    let session = minted(
        &proxy,
        json!({"fingerprint": "device-alt-1", "id_token": issuer.token("dave", json!({}))}),
    )
    .await;
    assert!(claims(session["token"].as_str().unwrap())["usr"].is_string());
}

/// With the default policy beside a captcha one, a refused captcha is the refusal named: a low
/// interaction score (a trace is never missing) says less about what the client sent.
#[tokio::test]
async fn a_refused_captcha_is_named_before_a_low_score() {
    let (verify_url, _seen) = siteverify().await;
    let proxy = proxy(
        |c| {
            with_captcha(c, verify_url).mint_policies(vec![vec!["pow", "entropy"], vec!["captcha"]])
        },
        vec![],
    )
    .await;
    let response = mint(
        &proxy,
        json!({"fingerprint": "device-low-1", "captcha": "bad"}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_code(response).await, "captcha_invalid");
    // Without a captcha, the low score is what is named, as under the default policy alone.
    let response = mint(&proxy, json!({"fingerprint": "device-low-1"})).await;
    assert_eq!(error_code(response).await, "insufficient_entropy");
}

/// A captcha token mints once, even from a provider that would accept it again: the mint
/// records it (hashed), so a replay, or the same token in two mints at once, mints one session.
#[tokio::test]
async fn a_captcha_token_mints_once_whatever_the_provider_says() {
    let (verify_url, seen) = siteverify().await;
    let proxy = proxy(
        |c| with_captcha(c, verify_url).mint_policies(vec![vec!["captcha"]]),
        vec![],
    )
    .await;
    minted(
        &proxy,
        json!({"fingerprint": "device-lax-1", "captcha": "lax-1"}),
    )
    .await;
    let response = mint(
        &proxy,
        json!({"fingerprint": "device-lax-1", "captcha": "lax-1"}),
    )
    .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "captcha_invalid");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{body}"
    );
    // The provider was asked both times and said yes both times: the refusal is the proxy's.
    assert_eq!(
        seen.lock()
            .unwrap()
            .iter()
            .filter(|f| f.contains("response=lax-1"))
            .count(),
        2
    );
    // Eight mints at once with one token, from other devices: one session.
    let statuses = futures_util::future::join_all((0..8).map(|i| {
        let proxy = &proxy;
        async move {
            mint(
                proxy,
                json!({"fingerprint": format!("device-lax-at-once-{i}"), "captcha": "lax-2"}),
            )
            .await
            .status()
        }
    }))
    .await;
    assert_eq!(
        statuses.iter().filter(|s| s.is_success()).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| s.is_success() || s.as_u16() == 400),
        "{statuses:?}"
    );
}

/// A gate of the app's own: a closed beta's invitation code.
#[derive(Debug)]
struct Invitation;

impl Gate for Invitation {
    fn name(&self) -> &str {
        "invitation"
    }

    fn check<'a>(&'a self, evidence: &'a Evidence<'a>) -> GateFuture<'a> {
        let outcome = match evidence.field("invitation").and_then(Value::as_str) {
            Some("BETA-2026") => Ok(Facts::user(format!("invited:{}", evidence.fingerprint()))),
            _ => Err(Error::new(
                ErrorCode::InvalidJson,
                "an invitation code is required",
            )),
        };
        Box::pin(std::future::ready(outcome))
    }
}

#[tokio::test]
async fn an_apps_own_gate_joins_the_policies() {
    let proxy = proxy(
        |c| c.mint_policies([["invitation", "pow"]]),
        vec![Invitation],
    )
    .await;
    let response = mint(&proxy, json!({"fingerprint": "device-beta-1"})).await;
    assert_eq!(response.status(), 400);
    // The proof of work is checked first (cheapest); without it, pow_required.
    assert_eq!(error_code(response).await, "pow_required");
    let response = mint(
        &proxy,
        json!({"fingerprint": "device-beta-1", "pow": proxy.solved_pow().await}),
    )
    .await;
    assert_eq!(error_code(response).await, "invalid_json");
    let session = minted(
        &proxy,
        json!({"fingerprint": "device-beta-1", "invitation": "BETA-2026", "pow": proxy.solved_pow().await}),
    )
    .await;
    assert!(claims(session["token"].as_str().unwrap())["usr"].is_string());

    // A policy naming a gate nobody registered is refused when the runtime is built.
    let config = config("http://127.0.0.1:9/v1")
        .mint_policies([["invitaton"]])
        .build()
        .unwrap();
    let error = Perishable::new(config).unwrap_err().to_string();
    assert!(error.contains("invitaton"), "{error}");
}

/// The native client brings the user's ID token to every mint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_client_mints_with_an_id_token() {
    let issuer = Arc::new(Issuer::start().await);
    let proxy = proxy(oidc(&issuer), vec![]).await;
    let source = issuer.clone();
    let client = perishable_client::Client::builder(proxy.url(""))
        .fingerprint("device-native-1")
        .user_agent(UA)
        .id_token_source(move || Some(source.token("erin", json!({}))))
        .build()
        .unwrap();
    let session = client.session().await.unwrap();
    assert!(claims(session.token())["usr"].is_string());
    let response = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// What the Play Console hands out (a decryption and a verification key) and what Google
/// keeps, to build integrity tokens as Google does: a JWS (ES256) inside a JWE (A256KW,
/// A256GCM).
struct Google {
    decryption: [u8; 32],
    signing: EcdsaKeyPair,
}

impl Google {
    fn new() -> Self {
        use aws_lc_rs::rand::SecureRandom as _;
        let mut decryption = [0; 32];
        SystemRandom::new().fill(&mut decryption).unwrap();
        Self {
            decryption,
            signing: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
        }
    }

    fn decryption_key(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.decryption)
    }

    fn verification_key(&self) -> String {
        use aws_lc_rs::encoding::AsDer as _;
        let spki = self.signing.public_key().as_der().unwrap();
        base64::engine::general_purpose::STANDARD.encode(spki.as_ref())
    }

    /// The verdict of `package` on a device meeting device integrity, for `request_hash`.
    fn token(&self, package: &str, request_hash: &str) -> String {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrap as _};
        use aws_lc_rs::rand::SecureRandom as _;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let payload = json!({
            "requestDetails": {
                "requestPackageName": package,
                "requestHash": request_hash,
                "timestampMillis": (now_ms - 2_000).to_string(),
            },
            "appIntegrity": {"appRecognitionVerdict": "PLAY_RECOGNIZED", "packageName": package,
                "certificateSha256Digest": ["pJBkwS2T8l3fMmp_3NKfj4d8f5_3y1gDaCZlH9dkAwA"],
                "versionCode": "42"},
            "deviceIntegrity": {"deviceRecognitionVerdict": ["MEETS_DEVICE_INTEGRITY"]},
        });
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"ES256"}"#),
            b64(payload.to_string().as_bytes())
        );
        let signature = self
            .signing
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        let jws = format!("{input}.{}", b64(signature.as_ref()));

        let rng = SystemRandom::new();
        let mut content_key = [0; 32];
        rng.fill(&mut content_key).unwrap();
        let mut wrapped = [0; 40];
        AesKek::new(&AES_256, &self.decryption)
            .unwrap()
            .wrap(&content_key, &mut wrapped)
            .unwrap();
        let mut iv = [0; 12];
        rng.fill(&mut iv).unwrap();
        let header = b64(br#"{"alg":"A256KW","enc":"A256GCM"}"#);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &content_key).unwrap());
        let mut ciphertext = jws.into_bytes();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(header.as_bytes()),
                &mut ciphertext,
            )
            .unwrap();
        format!(
            "{header}.{}.{}.{}.{}",
            b64(&wrapped),
            b64(&iv),
            b64(&ciphertext),
            b64(tag.as_ref())
        )
    }
}

#[tokio::test]
async fn a_play_integrity_verdict_bound_to_a_challenge_mints_once() {
    let google = Google::new();
    let proxy = proxy(
        |c| {
            c.mint_policies([["play_integrity"]])
                .mint_play_integrity_package_names(["com.example.app"])
                .mint_play_integrity_decryption_key(google.decryption_key())
                .mint_play_integrity_verification_key(google.verification_key())
        },
        vec![],
    )
    .await;
    let challenge = |proxy: &Proxy| {
        let request = proxy.http.get(proxy.url("/challenge"));
        async move {
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            body["challenge"].as_str().unwrap().to_owned()
        }
    };
    // The app asks Play Integrity for a verdict whose requestHash is the base64url SHA-256 of a
    // challenge from GET /challenge, and sends both.
    let request_hash = |challenge: &str| perishable::fingerprint::hash(challenge);
    let attestation = |token: String, challenge: &str| json!({"format": "play-integrity", "token": token, "challenge": challenge});

    let response = mint(&proxy, json!({"fingerprint": "device-android-1"})).await;
    assert_eq!(error_code(response).await, "attestation_required");

    let c = challenge(&proxy).await;
    let good = google.token("com.example.app", &request_hash(&c));
    let session = minted(
        &proxy,
        json!({"fingerprint": "device-android-1", "attestation": attestation(good.clone(), &c)}),
    )
    .await;
    assert_eq!(session["token_type"], "Bearer");
    // The same verdict and challenge again: a replay.
    let response = mint(
        &proxy,
        json!({"fingerprint": "device-android-1", "attestation": attestation(good, &c)}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_code(response).await, "attestation_invalid");

    // A verdict for another challenge, another package, or from another key: refused.
    let c2 = challenge(&proxy).await;
    let other = Google::new();
    for token in [
        google.token("com.example.app", &request_hash("v1.another.challenge")),
        google.token("com.evil.app", &request_hash(&c2)),
        other.token("com.example.app", &request_hash(&c2)),
    ] {
        let response = mint(
            &proxy,
            json!({"fingerprint": "device-android-1", "attestation": attestation(token, &c2)}),
        )
        .await;
        assert_eq!(error_code(response).await, "attestation_invalid");
    }
    // A challenge this server did not issue.
    let forged = "v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.AAAA";
    let response = mint(
        &proxy,
        json!({"fingerprint": "device-android-1",
               "attestation": attestation(google.token("com.example.app", &request_hash(forged)), forged)}),
    )
    .await;
    assert_eq!(error_code(response).await, "attestation_invalid");
}
