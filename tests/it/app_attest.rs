//! The `app_attest` mint gate end to end (`docs/gates.md`): App Attest attestations and
//! assertions made as an iPhone makes them (a CBOR attestation object whose `x5c` chain comes
//! from a stand-in for Apple's CA, the nonce extension, authenticator data, a COSE key;
//! assertions signed by the device key over `SHA-256(authenticatorData || clientDataHash)`),
//! sent to real proxies on 127.0.0.1 on the memory store and on a real Redis: registration,
//! assertions, every kind of tampering, replays (also concurrent ones), the session keyed on
//! the attested key, and the native client's `attestation_source`.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ciborium::Value as Cbor;
use perishable::ConfigBuilder;
use perishable_mock::MockOptions;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DnType, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData, SigningKey,
};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::gates::{AUDIENCE, Issuer, claims};
use crate::support::*;

const APP_ID: &str = "ABCDE12345.com.example.app";
const OTHER_APP_ID: &str = "ABCDE12345.com.example.other";
/// The credential certificate's nonce extension (Apple's OID).
const NONCE_OID: &[u64] = &[1, 2, 840, 113_635, 100, 8, 2];
/// The AAGUIDs of Apple's two environments.
const AAGUID_PRODUCTION: [u8; 16] = *b"appattest\0\0\0\0\0\0\0";
const AAGUID_DEVELOPMENT: [u8; 16] = *b"appattestdevelop";

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
    }
    hash.finalize().into()
}

fn cbor(value: &Cbor) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).unwrap();
    out
}

/// A stand-in for Apple's App Attestation CA: a P-384 root and a P-384 intermediate.
struct AppleCa {
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

impl AppleCa {
    fn new(name: &str) -> Self {
        let params = |cn: String| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let key = || KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let root = CertifiedIssuer::self_signed(params(format!("{name} Root CA")), key()).unwrap();
        let intermediate =
            CertifiedIssuer::signed_by(params(format!("{name} CA 1")), key(), &root).unwrap();
        Self { root, intermediate }
    }

    /// What `mint.app_attest.root_ca_pem` is set to.
    fn root_pem(&self) -> String {
        self.root.pem()
    }
}

/// What an attestation says; each test changes one thing.
#[derive(Clone)]
struct Claim {
    app_id: &'static str,
    aaguid: [u8; 16],
}

impl Default for Claim {
    fn default() -> Self {
        Self {
            app_id: APP_ID,
            aaguid: AAGUID_PRODUCTION,
        }
    }
}

/// An app install's Secure Enclave key: P-256, signing ECDSA-SHA256 (DER).
struct Device {
    key: KeyPair,
    point: Vec<u8>,
}

impl Device {
    fn new() -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let point = key.der_bytes().to_vec();
        assert_eq!(point.len(), 65, "an uncompressed P-256 point");
        Self { key, point }
    }

    /// Apple's key identifier: SHA-256 of the public key.
    fn key_id(&self) -> [u8; 32] {
        sha256(&[&self.point])
    }

    /// `generateKey`'s keyId: standard base64 of the key identifier.
    fn key_id_b64(&self) -> String {
        STANDARD.encode(self.key_id())
    }

    /// `attestKey(keyId, clientDataHash)`'s attestation object, certified by `ca`.
    fn attest(&self, ca: &AppleCa, client_data_hash: &[u8; 32], claim: &Claim) -> Vec<u8> {
        let key_id = self.key_id();
        let cose = cbor(&Cbor::Map(vec![
            (Cbor::from(1), Cbor::from(2)),
            (Cbor::from(3), Cbor::from(-7)),
            (Cbor::from(-1), Cbor::from(1)),
            (Cbor::from(-2), Cbor::Bytes(self.point[1..33].to_vec())),
            (Cbor::from(-3), Cbor::Bytes(self.point[33..].to_vec())),
        ]));
        let mut auth_data = sha256(&[claim.app_id.as_bytes()]).to_vec();
        auth_data.push(0x40); // attested credential data
        auth_data.extend_from_slice(&0u32.to_be_bytes());
        auth_data.extend_from_slice(&claim.aaguid);
        auth_data.extend_from_slice(&32u16.to_be_bytes());
        auth_data.extend_from_slice(&key_id);
        auth_data.extend_from_slice(&cose);

        let nonce = sha256(&[&auth_data, client_data_hash]);
        let mut extension = vec![0x30, 0x24, 0xA1, 0x22, 0x04, 0x20];
        extension.extend_from_slice(&nonce);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, URL_SAFE_NO_PAD.encode(key_id));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(NONCE_OID, extension));
        let leaf = params.signed_by(&self.key, &ca.intermediate).unwrap();
        cbor(&Cbor::Map(vec![
            (Cbor::from("fmt"), Cbor::from("apple-appattest")),
            (
                Cbor::from("attStmt"),
                Cbor::Map(vec![
                    (
                        Cbor::from("x5c"),
                        Cbor::Array(vec![
                            Cbor::Bytes(leaf.der().to_vec()),
                            Cbor::Bytes(ca.intermediate.der().to_vec()),
                        ]),
                    ),
                    (Cbor::from("receipt"), Cbor::Bytes(b"receipt".to_vec())),
                ]),
            ),
            (Cbor::from("authData"), Cbor::Bytes(auth_data)),
        ]))
    }

    /// `generateAssertion(keyId, clientDataHash)`'s assertion with sign counter `counter`.
    fn assert(&self, app_id: &str, counter: u32, client_data_hash: &[u8; 32]) -> Vec<u8> {
        let mut auth_data = sha256(&[app_id.as_bytes()]).to_vec();
        auth_data.push(0);
        auth_data.extend_from_slice(&counter.to_be_bytes());
        let nonce = sha256(&[&auth_data, client_data_hash]);
        let signature = self.key.sign(&nonce).unwrap();
        cbor(&Cbor::Map(vec![
            (Cbor::from("signature"), Cbor::Bytes(signature)),
            (Cbor::from("authenticatorData"), Cbor::Bytes(auth_data)),
        ]))
    }
}

/// clientDataHash: SHA-256 of the challenge's UTF-8 bytes.
fn client_data_hash(challenge: &str) -> [u8; 32] {
    sha256(&[challenge.as_bytes()])
}

/// The mint body of a registration.
fn registration(fp: &str, key_id: &str, object: &[u8], challenge: &str) -> Value {
    json!({"fingerprint": fp, "attestation": {
        "format": "apple-app-attest", "key_id": key_id,
        "attestation_object": STANDARD.encode(object), "challenge": challenge}})
}

/// The mint body of an assertion.
fn assertion(fp: &str, key_id: &str, assertion: &[u8], challenge: &str) -> Value {
    json!({"fingerprint": fp, "attestation": {
        "format": "apple-app-attest", "key_id": key_id,
        "assertion": STANDARD.encode(assertion), "challenge": challenge}})
}

/// A proxy whose one policy is `app_attest`, trusting `ca`.
async fn proxy(
    ca: &AppleCa,
    store_url: Option<&str>,
    tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> Proxy {
    let root = ca.root_pem();
    Proxy::start_with(MockOptions::new(), move |c| {
        let c = c
            .mint_policies([["app_attest"]])
            .mint_app_attest_app_ids([APP_ID])
            .mint_app_attest_root_ca_pem(root)
            .rate_limit_mint_per_ip(1_000)
            .session_max_per_fingerprint(100);
        let c = match store_url {
            Some(url) => c.store_url(url),
            None => c,
        };
        tweak(c)
    })
    .await
}

impl Proxy {
    /// A fresh `GET /challenge` challenge.
    async fn challenge(&self) -> String {
        let body: Value = self
            .http
            .get(self.url("/challenge"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["challenge"].as_str().unwrap().to_owned()
    }

    async fn post_session(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/session"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Mints with `body`: the session's token, or the refusal's status and code.
    async fn try_mint(&self, body: &Value) -> Result<String, (u16, String)> {
        let response = self.post_session(body).await;
        let status = response.status().as_u16();
        if status == 200 {
            let session: Value = response.json().await.unwrap();
            Ok(session["token"].as_str().unwrap().to_owned())
        } else {
            Err((status, error_code(response).await))
        }
    }

    /// A key registered with a fresh challenge: the session's token.
    async fn register(&self, ca: &AppleCa, device: &Device, fp: &str) -> String {
        let challenge = self.challenge().await;
        let object = device.attest(ca, &client_data_hash(&challenge), &Claim::default());
        self.try_mint(&registration(fp, &device.key_id_b64(), &object, &challenge))
            .await
            .unwrap()
    }
}

fn invalid() -> Result<String, (u16, String)> {
    Err((400, "attestation_invalid".to_owned()))
}

/// Registration, then assertions with rising counters; every replay refused, also when several
/// run at once.
async fn register_then_assert(store_url: Option<String>) {
    let ca = AppleCa::new("Test Apple");
    let proxy = proxy(&ca, store_url.as_deref(), |c| c).await;
    let device = Device::new();
    let key_id = device.key_id_b64();
    let fp = "iphone-install-0001";

    // No attestation of this format: required.
    for body in [
        json!({"fingerprint": fp}),
        json!({"fingerprint": fp, "attestation": {"format": "play-integrity", "token": "t", "challenge": "c"}}),
    ] {
        assert_eq!(
            proxy.try_mint(&body).await,
            Err((400, "attestation_required".to_owned()))
        );
    }

    // First mint: the key registers; the session keys on it.
    let challenge = proxy.challenge().await;
    let object = device.attest(&ca, &client_data_hash(&challenge), &Claim::default());
    let registered = registration(fp, &key_id, &object, &challenge);
    let token = proxy.try_mint(&registered).await.unwrap();
    let usr = claims(&token)["usr"].as_str().unwrap().to_owned();
    assert_eq!(usr.len(), 43, "base64url SHA-256");
    assert!(!token.contains(&key_id) && !token.contains(&URL_SAFE_NO_PAD.encode(device.key_id())));
    let models = proxy
        .openai(Method::GET, "models", &token, fp)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);

    // The same registration again: its challenge is used up.
    assert_eq!(proxy.try_mint(&registered).await, invalid());
    // A new attestation of the registered key, with a fresh challenge: first writer won.
    let challenge = proxy.challenge().await;
    let object = device.attest(&ca, &client_data_hash(&challenge), &Claim::default());
    assert_eq!(
        proxy
            .try_mint(&registration(fp, &key_id, &object, &challenge))
            .await,
        invalid()
    );

    // Later mints: assertions with rising counters, the same client.
    let challenge = proxy.challenge().await;
    let first = device.assert(APP_ID, 1, &client_data_hash(&challenge));
    let token = proxy
        .try_mint(&assertion(fp, &key_id, &first, &challenge))
        .await
        .unwrap();
    assert_eq!(claims(&token)["usr"], usr);
    // The same assertion and challenge: a replay.
    assert_eq!(
        proxy
            .try_mint(&assertion(fp, &key_id, &first, &challenge))
            .await,
        invalid()
    );
    // The same counter with a fresh challenge: a replayed counter.
    let challenge = proxy.challenge().await;
    let again = device.assert(APP_ID, 1, &client_data_hash(&challenge));
    assert_eq!(
        proxy
            .try_mint(&assertion(fp, &key_id, &again, &challenge))
            .await,
        invalid()
    );
    // An assertion over another challenge than the one sent.
    let (signed, sent) = (proxy.challenge().await, proxy.challenge().await);
    let other = device.assert(APP_ID, 2, &client_data_hash(&signed));
    assert_eq!(
        proxy.try_mint(&assertion(fp, &key_id, &other, &sent)).await,
        invalid()
    );
    // Counters may jump.
    let challenge = proxy.challenge().await;
    let jump = device.assert(APP_ID, 9, &client_data_hash(&challenge));
    proxy
        .try_mint(&assertion(fp, &key_id, &jump, &challenge))
        .await
        .unwrap();

    // Six mints at once with counter 10, each with its own fresh challenge: exactly one passes.
    let mut bodies = Vec::new();
    for _ in 0..6 {
        let challenge = proxy.challenge().await;
        let signed = device.assert(APP_ID, 10, &client_data_hash(&challenge));
        bodies.push(assertion(fp, &key_id, &signed, &challenge));
    }
    let outcomes =
        futures_util::future::join_all(bodies.iter().map(|body| proxy.try_mint(body))).await;
    let passed = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(passed, 1, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| o.is_ok() || *o == invalid()),
        "{outcomes:?}"
    );

    // An assertion by a key never registered.
    let stranger = Device::new();
    let challenge = proxy.challenge().await;
    let signed = stranger.assert(APP_ID, 1, &client_data_hash(&challenge));
    let response = proxy
        .post_session(&assertion(fp, &stranger.key_id_b64(), &signed, &challenge))
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "attestation_invalid");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown App Attest key"),
        "{body}"
    );
}

on_both_stores!(
    a_key_registers_then_mints_with_assertions_memory,
    a_key_registers_then_mints_with_assertions_redis,
    |url| register_then_assert(url)
);

/// Concurrent registrations of one key (each attestation valid, each with its own challenge):
/// exactly one registers.
async fn concurrent_registrations(store_url: Option<String>) {
    let ca = AppleCa::new("Test Apple");
    let proxy = proxy(&ca, store_url.as_deref(), |c| c).await;
    let device = Device::new();
    let mut bodies = Vec::new();
    for i in 0..6 {
        let challenge = proxy.challenge().await;
        let object = device.attest(&ca, &client_data_hash(&challenge), &Claim::default());
        bodies.push(registration(
            &format!("iphone-install-10{i}"),
            &device.key_id_b64(),
            &object,
            &challenge,
        ));
    }
    let outcomes =
        futures_util::future::join_all(bodies.iter().map(|body| proxy.try_mint(body))).await;
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().all(|o| o.is_ok() || *o == invalid()),
        "{outcomes:?}"
    );
}

on_both_stores!(
    a_key_registers_once_under_concurrency_memory,
    a_key_registers_once_under_concurrency_redis,
    |url| concurrent_registrations(url)
);

#[tokio::test]
async fn every_tampered_attestation_is_refused() {
    let ca = AppleCa::new("Test Apple");
    let proxy = proxy(&ca, None, |c| c).await;
    let device = Device::new();
    let key_id = device.key_id_b64();
    let fp = "iphone-install-0002";
    let attest_with = |claim: Claim, challenge: &str| {
        let object = device.attest(&ca, &client_data_hash(challenge), &claim);
        registration(fp, &key_id, &object, challenge)
    };

    // A chain to another root.
    let other_ca = AppleCa::new("Test Apple");
    let challenge = proxy.challenge().await;
    let object = device.attest(&other_ca, &client_data_hash(&challenge), &Claim::default());
    assert_eq!(
        proxy
            .try_mint(&registration(fp, &key_id, &object, &challenge))
            .await,
        invalid()
    );
    // The nonce of another challenge (both issued by this server).
    let (signed, sent) = (proxy.challenge().await, proxy.challenge().await);
    let object = device.attest(&ca, &client_data_hash(&signed), &Claim::default());
    assert_eq!(
        proxy
            .try_mint(&registration(fp, &key_id, &object, &sent))
            .await,
        invalid()
    );
    // Another app of the same team.
    let other_app = Claim {
        app_id: OTHER_APP_ID,
        ..Claim::default()
    };
    let challenge = proxy.challenge().await;
    assert_eq!(
        proxy.try_mint(&attest_with(other_app, &challenge)).await,
        invalid()
    );
    // A key from Apple's development environment, while development = false.
    let development = Claim {
        aaguid: AAGUID_DEVELOPMENT,
        ..Claim::default()
    };
    let challenge = proxy.challenge().await;
    assert_eq!(
        proxy
            .try_mint(&attest_with(development.clone(), &challenge))
            .await,
        invalid()
    );
    // A key id that is not the attested key's.
    let challenge = proxy.challenge().await;
    let object = device.attest(&ca, &client_data_hash(&challenge), &Claim::default());
    let impostor = Device::new().key_id_b64();
    assert_eq!(
        proxy
            .try_mint(&registration(fp, &impostor, &object, &challenge))
            .await,
        invalid()
    );
    // A challenge this server did not issue, for a correctly built attestation.
    let forged = "v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.AAAA";
    assert_eq!(
        proxy.try_mint(&attest_with(Claim::default(), forged)).await,
        invalid()
    );
    // Evidence malformed on the wire: url-safe base64, trailing garbage, both proofs at once.
    let challenge = proxy.challenge().await;
    let mut body = attest_with(Claim::default(), &challenge);
    body["attestation"]["key_id"] = json!(URL_SAFE_NO_PAD.encode(device.key_id()));
    assert_eq!(proxy.try_mint(&body).await, invalid());
    let mut body = attest_with(Claim::default(), &challenge);
    let object = body["attestation"]["attestation_object"]
        .as_str()
        .unwrap()
        .to_owned();
    body["attestation"]["attestation_object"] = json!(format!("{object}AAAA"));
    assert_eq!(proxy.try_mint(&body).await, invalid());
    let mut body = attest_with(Claim::default(), &challenge);
    body["attestation"]["assertion"] = json!("AAAA");
    assert_eq!(proxy.try_mint(&body).await, invalid());

    // None of these used the challenge: the genuine attestation still registers with it.
    proxy
        .try_mint(&attest_with(Claim::default(), &challenge))
        .await
        .unwrap();
    // A challenge used by one mint cannot serve another, even another device's.
    let other = Device::new();
    let object = other.attest(&ca, &client_data_hash(&challenge), &Claim::default());
    assert_eq!(
        proxy
            .try_mint(&registration(fp, &other.key_id_b64(), &object, &challenge))
            .await,
        invalid()
    );

    // With development = true, the development key registers.
    let lenient = self::proxy(&ca, None, |c| c.mint_app_attest_development(true)).await;
    let challenge = lenient.challenge().await;
    lenient
        .try_mint(&attest_with(development, &challenge))
        .await
        .unwrap();
}

/// The session keys on the attested key: fingerprints are free to invent, the key is not.
#[tokio::test]
async fn the_session_cap_follows_the_attested_key_across_fingerprints() {
    let ca = AppleCa::new("Test Apple");
    let proxy = proxy(&ca, None, |c| c.session_max_per_fingerprint(1)).await;
    let device = Device::new();
    proxy.register(&ca, &device, "iphone-install-0003").await;
    let challenge = proxy.challenge().await;
    let signed = device.assert(APP_ID, 1, &client_data_hash(&challenge));
    let body = assertion(
        "invented-fingerprint-1",
        &device.key_id_b64(),
        &signed,
        &challenge,
    );
    assert_eq!(
        proxy.try_mint(&body).await,
        Err((429, "too_many_sessions".to_owned()))
    );
    // Another device has its own slot.
    proxy
        .register(&ca, &Device::new(), "iphone-install-0004")
        .await;
}

/// With an identity gate in the same policy, the session is the user's, not the device's.
#[tokio::test]
async fn a_signed_in_user_comes_before_the_attested_key() {
    let ca = AppleCa::new("Test Apple");
    let issuer = Issuer::start().await;
    let issuer_url = issuer.url.clone();
    let proxy = proxy(&ca, None, |c| {
        c.mint_policies([["oidc", "app_attest"]])
            .mint_oidc_issuer(issuer_url)
            .mint_oidc_audience(AUDIENCE)
    })
    .await;
    let device = Device::new();
    let challenge = proxy.challenge().await;
    let object = device.attest(&ca, &client_data_hash(&challenge), &Claim::default());
    let mut body = registration(
        "iphone-install-0005",
        &device.key_id_b64(),
        &object,
        &challenge,
    );
    // The attestation alone does not pass this policy.
    assert_eq!(
        proxy.try_mint(&body).await,
        Err((401, "id_token_required".to_owned()))
    );
    body["id_token"] = json!(issuer.token("frank", json!({})));
    let token = proxy.try_mint(&body).await.unwrap();
    let user = URL_SAFE_NO_PAD.encode(sha256(&[issuer.url.as_bytes(), b"\0", b"frank"]));
    assert_eq!(claims(&token)["usr"], user);
}

/// What the app keeps: whether its key is registered, and the last counter it used.
#[derive(Default)]
struct AppState {
    registered: bool,
    counter: u32,
    sent: Vec<&'static str>,
}

/// The native client asks the app for an attestation at every mint: a registration first,
/// assertions afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_client_registers_then_asserts() {
    let ca = Arc::new(AppleCa::new("Test Apple"));
    let proxy = proxy(&ca, None, |c| c).await;
    let device = Arc::new(Device::new());
    let state = Arc::new(Mutex::new(AppState::default()));
    let (source_ca, source_device, source_state) = (ca.clone(), device.clone(), state.clone());
    let client = perishable_client::Client::builder(proxy.url(""))
        .fingerprint("iphone-install-0006")
        .user_agent(UA)
        .attestation_source(move |challenge: perishable_client::AttestationChallenge| {
            let (ca, device, state) = (
                source_ca.clone(),
                source_device.clone(),
                source_state.clone(),
            );
            async move {
                let mut state = state.lock().unwrap();
                let key_id = device.key_id_b64();
                let hash = challenge.client_data_hash();
                if state.registered {
                    state.counter += 1;
                    state.sent.push("assertion");
                    let signed = device.assert(APP_ID, state.counter, &hash);
                    Some(perishable_client::Attestation::app_attest_assertion(
                        key_id, &signed,
                    ))
                } else {
                    state.registered = true;
                    state.sent.push("attestation");
                    let object = device.attest(&ca, &hash, &Claim::default());
                    Some(perishable_client::Attestation::app_attest_key(
                        key_id, &object,
                    ))
                }
            }
        })
        .build()
        .unwrap();
    let first = client.session().await.unwrap();
    let usr = claims(first.token())["usr"].clone();
    assert!(usr.is_string());
    let response = client
        .send(client.request(Method::GET, "models").await.unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // A new mint (after a revocation): an assertion by the registered key, the same client.
    client.revoke().await.unwrap();
    let second = client.session().await.unwrap();
    assert_eq!(claims(second.token())["usr"], usr);
    assert_eq!(state.lock().unwrap().sent, ["attestation", "assertion"]);
}
