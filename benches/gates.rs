//! Mints per second on one core, for each mint gate (`docs/gates.md`):
//!
//! ```text
//! cargo bench --bench gates
//! ```
//!
//! Each iteration is one `POST /session` handled by the session engine (`Sessions::mint`) on a
//! current-thread runtime: the body parsed, the policy's gates checked, the session cap taken in
//! the memory store, the token signed. Each mint uses a fresh fingerprint (so the cap never
//! refuses) and fresh evidence, made outside the timed part: a solved challenge, an ID token, a
//! Play Integrity token. Cost per mint is the figure; mints per second per core is its inverse.
//!
//! - `pow_entropy`: the default policy (the server's cost does not depend on the difficulty; the
//!   client's does).
//! - `oidc`: an ES256 ID token against a local issuer; the JWKS is fetched by the first mint and
//!   cached, so this is the signature and the claims.
//! - `captcha`: a local siteverify on loopback, answering at once; the figure includes its HTTP
//!   round trip (served on the same core).
//! - `play_integrity`: a verdict decrypted (AES key unwrap, AES-GCM) and verified (ES256).
//! - `app_attest`: a registered key's assertion verified (ECDSA P-256), its counter raised.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::Request;
use perishable::{Config, ConfigBuilder, Perishable};
use serde_json::{Value, json};

#[path = "support/pow.rs"]
mod pow;

const UA: &str = "perishable-bench/1.0";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn base() -> ConfigBuilder {
    Config::builder()
        .upstream_api_key("sk-bench")
        .session_jwt_secret("bench-secret-bench-secret-bench-secret!!")
        .rate_limit_mint_per_ip(1_000_000_000)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A fresh fingerprint per mint.
fn fingerprint() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("bench-device-{:012}", N.fetch_add(1, Ordering::Relaxed))
}

/// A jittered, curved pointer trace with keys: scores above the default threshold.
fn samples() -> Value {
    let mut seed: u64 = 7;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        f64::from((seed >> 33) as u32) / f64::from(u32::MAX)
    };
    let mut t = 0.0;
    let pointer: Vec<Value> = (0..80)
        .map(|i| {
            t += 8.0 + 20.0 * rand();
            let a = f64::from(i) / 15.0;
            json!([
                t.round(),
                (300.0 + 120.0 * a.cos() + 5.0 * rand()).round(),
                (200.0 + 80.0 * (1.3 * a).sin() + 5.0 * rand()).round()
            ])
        })
        .collect();
    let keys: Vec<Value> = (0..12)
        .map(|i| json!((t + 90.0 * f64::from(i) + 40.0 * rand()).round()))
        .collect();
    json!({"pointer": pointer, "keys": keys, "elapsed_ms": (t + 1200.0).round()})
}

fn head() -> Request<()> {
    Request::post("/session")
        .header("user-agent", UA)
        .body(())
        .unwrap()
}

/// Benchmarks minting with `perishable`, each body from `body` (untimed).
fn bench_mint(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    perishable: &Perishable,
    body: impl Fn() -> Vec<u8>,
) {
    let sessions = perishable.sessions().clone();
    let head = head();
    // One mint first: it must pass (and fetches what the gate caches).
    rt.block_on(sessions.mint(&head, &body())).unwrap();
    c.bench_function(&format!("mint/{name}"), |b| {
        b.iter_batched(
            &body,
            |body| rt.block_on(sessions.mint(&head, &body)).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

fn pow_entropy(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let perishable = Perishable::new(base().pow_difficulty(8).build().unwrap()).unwrap();
    let samples = samples();
    let sessions = perishable.sessions().clone();
    bench_mint(c, rt, "pow_entropy", &perishable, || {
        let challenge = sessions.challenge();
        let nonce = pow::solve(&challenge.challenge, challenge.difficulty);
        serde_json::to_vec(&json!({
            "fingerprint": fingerprint(),
            "entropy": samples,
            "pow": {"challenge": challenge.challenge, "nonce": nonce},
        }))
        .unwrap()
    });
}

/// Serves `app` on 127.0.0.1 on the bench runtime; returns its base URL.
fn serve(rt: &tokio::runtime::Runtime, app: axum::Router) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn oidc(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}]});
    let url = serve(
        rt,
        axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || async move { axum::Json(jwks) }),
        ),
    );
    let perishable = Perishable::new(
        base()
            .mint_policies([["oidc"]])
            .mint_oidc_issuer(url.clone())
            .mint_oidc_jwks_url(format!("{url}/jwks"))
            .mint_oidc_audience("bench-app")
            .build()
            .unwrap(),
    )
    .unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".to_owned());
    let user = AtomicU64::new(0);
    bench_mint(c, rt, "oidc", &perishable, || {
        let now = unix_now();
        let claims = json!({"iss": url, "aud": "bench-app", "iat": now, "exp": now + 600,
            "sub": format!("user-{}", user.fetch_add(1, Ordering::Relaxed))});
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        serde_json::to_vec(&json!({"fingerprint": fingerprint(), "id_token": token})).unwrap()
    });
}

fn captcha(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let url = serve(
        rt,
        axum::Router::new().route(
            "/siteverify",
            axum::routing::post(|| async {
                axum::Json(json!({"success": true, "hostname": "app.example.com"}))
            }),
        ),
    );
    let perishable = Perishable::new(
        base()
            .mint_policies([["captcha"]])
            .mint_captcha_provider("turnstile")
            .mint_captcha_secret("bench-secret")
            .mint_captcha_verify_url(format!("{url}/siteverify"))
            .build()
            .unwrap(),
    )
    .unwrap();
    bench_mint(c, rt, "captcha", &perishable, || {
        serde_json::to_vec(&json!({"fingerprint": fingerprint(), "captcha": "token"})).unwrap()
    });
}

fn play_integrity(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrap as _};

    let rng = SystemRandom::new();
    let mut decryption = [0u8; 32];
    rng.fill(&mut decryption).unwrap();
    let signing = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let spki = signing.public_key().as_der().unwrap();
    let perishable = Perishable::new(
        base()
            .mint_policies([["play_integrity"]])
            .mint_play_integrity_package_names(["com.example.app"])
            .mint_play_integrity_decryption_key(STANDARD.encode(decryption))
            .mint_play_integrity_verification_key(STANDARD.encode(spki.as_ref()))
            .build()
            .unwrap(),
    )
    .unwrap();
    let sessions = perishable.sessions().clone();
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    bench_mint(c, rt, "play_integrity", &perishable, || {
        let challenge = sessions.challenge().challenge;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let payload = json!({
            "requestDetails": {"requestPackageName": "com.example.app",
                "requestHash": perishable::fingerprint::hash(&challenge),
                "timestampMillis": now_ms.to_string()},
            "appIntegrity": {"appRecognitionVerdict": "PLAY_RECOGNIZED",
                "packageName": "com.example.app", "certificateSha256Digest": []},
            "deviceIntegrity": {"deviceRecognitionVerdict": ["MEETS_DEVICE_INTEGRITY"]},
        });
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"ES256"}"#),
            b64(payload.to_string().as_bytes())
        );
        let signature = signing.sign(&rng, input.as_bytes()).unwrap();
        let jws = format!("{input}.{}", b64(signature.as_ref()));
        let mut content_key = [0u8; 32];
        rng.fill(&mut content_key).unwrap();
        let mut wrapped = [0u8; 40];
        AesKek::new(&AES_256, &decryption)
            .unwrap()
            .wrap(&content_key, &mut wrapped)
            .unwrap();
        let mut iv = [0u8; 12];
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
        let token = format!(
            "{header}.{}.{}.{}.{}",
            b64(&wrapped),
            b64(&iv),
            b64(&ciphertext),
            b64(tag.as_ref())
        );
        serde_json::to_vec(&json!({"fingerprint": fingerprint(), "attestation":
            {"format": "play-integrity", "token": token, "challenge": challenge}}))
        .unwrap()
    });
}

/// `app_attest` in its steady state: a registered key minting with assertions (a registration
/// happens once per install). The key is registered in the store directly.
fn app_attest(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    use std::sync::atomic::{AtomicU32, Ordering};

    use aws_lc_rs::digest::{SHA256, digest};
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair as Device};
    use perishable::store::AppAttestKey;

    const APP_ID: &str = "ABCDE12345.com.example.app";
    let rng = SystemRandom::new();
    let pkcs8 = Device::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let device = Device::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let point = device.public_key().as_ref().to_vec();
    let key_id = digest(&SHA256, &point);
    let key_id_b64 = STANDARD.encode(key_id.as_ref());
    let perishable = Perishable::new(
        base()
            .mint_policies([["app_attest"]])
            .mint_app_attest_app_ids([APP_ID])
            // Every mint is the one attested key's: the session cap follows it.
            .session_max_per_fingerprint(u32::MAX)
            .build()
            .unwrap(),
    )
    .unwrap();
    // The store keys a record by the key id in base64url (the wire carries standard base64).
    let stored_id = URL_SAFE_NO_PAD.encode(key_id.as_ref());
    let record = AppAttestKey::new(point, APP_ID, false, 0, unix_now());
    assert!(
        rt.block_on(perishable.store().register_app_attest_key(
            &stored_id,
            &record,
            unix_now() + 3600,
        ))
        .unwrap()
    );
    let sessions = perishable.sessions().clone();
    let counter = AtomicU32::new(0);
    let rp_id_hash = digest(&SHA256, APP_ID.as_bytes());
    bench_mint(c, rt, "app_attest", &perishable, || {
        let challenge = sessions.challenge().challenge;
        let mut auth_data = rp_id_hash.as_ref().to_vec();
        auth_data.push(0);
        auth_data.extend_from_slice(&(counter.fetch_add(1, Ordering::Relaxed) + 1).to_be_bytes());
        let client_data_hash = digest(&SHA256, challenge.as_bytes());
        let nonce = digest(
            &SHA256,
            &[&auth_data[..], client_data_hash.as_ref()].concat(),
        );
        let signature = device.sign(&rng, nonce.as_ref()).unwrap();
        let mut assertion = Vec::new();
        ciborium::ser::into_writer(
            &ciborium::Value::Map(vec![
                (
                    ciborium::Value::from("signature"),
                    ciborium::Value::Bytes(signature.as_ref().to_vec()),
                ),
                (
                    ciborium::Value::from("authenticatorData"),
                    ciborium::Value::Bytes(auth_data),
                ),
            ]),
            &mut assertion,
        )
        .unwrap();
        serde_json::to_vec(&json!({"fingerprint": fingerprint(), "attestation": {
            "format": "apple-app-attest", "key_id": key_id_b64,
            "assertion": STANDARD.encode(assertion), "challenge": challenge}}))
        .unwrap()
    });
}

fn gates(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    pow_entropy(c, &rt);
    oidc(c, &rt);
    captcha(c, &rt);
    play_integrity(c, &rt);
    app_attest(c, &rt);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    targets = gates
}
criterion_main!(benches);
