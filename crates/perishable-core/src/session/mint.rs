//! Minting (`POST /session`): the body parsed into a [`MintRequest`] (a `docs/protocol.md`
//! code for each fault), the synchronous checks (entropy, proof of work, DPoP proof), then the
//! store (the session cap, the replay records) and the signed token.

use http::Request;
use http::header::USER_AGENT;
use serde_json::{Map, Value};

use super::request::{expected_htu, single_dpop_header};
use super::{SessionObject, Sessions, cap_keys};
use crate::audit::AuditEvent;
use crate::clock::unix_now;
use crate::config::DpopMode;
use crate::dpop::Expected;
use crate::entropy::{Entropy, MAX_SAMPLES};
use crate::error::{Error, ErrorCode, RateLimitInfo};
use crate::fingerprint;
use crate::gate::app_attest::{self, AppAttestPassed};
use crate::gate::{Builtins, Evidence};
use crate::pow::PowSolution;
use crate::store::{self, Admission, Set, Store, StoreError};
use crate::token::{Claims, Confirmation, hash_b64, new_jti};

/// A validated `POST /session` body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MintRequest {
    /// The client's fingerprint (validated).
    pub(crate) fingerprint: String,
    /// Interaction samples (within limits).
    pub(crate) entropy: Entropy,
    /// The proof of work, when given.
    pub(crate) pow: Option<PowSolution>,
    /// The body's other members: the evidence of the other gates (`captcha`, `id_token`, and
    /// those of the app's own gates).
    pub(crate) extra: Map<String, Value>,
}

fn invalid_json(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorCode::InvalidJson, message)
}

impl MintRequest {
    /// Parses and validates a body.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, Error> {
        // Strictly first, as a metered body is: a duplicate key (two fingerprints, the last
        // one winning), a lone surrogate or a number out of range is refused, not guessed at.
        let strict = |bytes: &[u8]| {
            crate::json::parse_object(bytes, crate::json::Mode::Strict).map_err(|e| {
                invalid_json(format!(
                    "the body must be a JSON object with fingerprint, entropy and pow: {e}"
                ))
            })
        };
        let object = strict(body)?;
        // The objects the gates read are members of their own: no duplicates there either.
        for member in &object.members {
            if matches!(member.key.as_str(), "pow" | "entropy")
                && member.kind == crate::json::Kind::Object
            {
                strict(&body[member.value.clone()])?;
            }
        }
        // Each field is kept as JSON first, so a wrong type gets its own error code.
        let mut raw: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
            invalid_json(format!(
                "the body must be a JSON object with fingerprint, entropy and pow: {}",
                e.classify_message()
            ))
        })?;
        let fingerprint = match raw.remove("fingerprint") {
            None | Some(Value::Null) => {
                return Err(Error::new(
                    ErrorCode::MissingFingerprint,
                    "the fingerprint is required",
                ));
            }
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(Error::new(
                    ErrorCode::InvalidFingerprint,
                    "the fingerprint must be a string",
                ));
            }
        };
        fingerprint::validate(&fingerprint)?;
        let entropy: Entropy = match raw.remove("entropy") {
            None | Some(Value::Null) => Entropy::default(),
            // An object, not the same fields as an array (which serde would also take).
            Some(v @ Value::Object(_)) => serde_json::from_value(v).map_err(|_| {
                invalid_json(
                    "entropy must be {\"pointer\": [[t_ms, x, y], ...], \"keys\": [t_ms, ...], \"elapsed_ms\": n}",
                )
            })?,
            Some(_) => {
                return Err(invalid_json(
                    "entropy must be {\"pointer\": [[t_ms, x, y], ...], \"keys\": [t_ms, ...], \"elapsed_ms\": n}",
                ));
            }
        };
        if !entropy.within_limits() {
            return Err(invalid_json(format!(
                "entropy may hold at most {MAX_SAMPLES} pointer samples and {MAX_SAMPLES} key times"
            )));
        }
        let pow = match raw.remove("pow") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(serde_json::from_value(v).map_err(|_| {
                invalid_json("pow must be {\"challenge\": string, \"nonce\": string}")
            })?),
            Some(_) => {
                return Err(invalid_json(
                    "pow must be {\"challenge\": string, \"nonce\": string}",
                ));
            }
        };
        Ok(Self {
            fingerprint,
            entropy,
            pow,
            extra: raw,
        })
    }
}

trait ClassifyMessage {
    fn classify_message(&self) -> &'static str;
}

impl ClassifyMessage for serde_json::Error {
    fn classify_message(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "malformed JSON"
            }
            serde_json::error::Category::Data => "not an object of the expected shape",
            serde_json::error::Category::Io => "unreadable",
        }
    }
}

impl Sessions {
    /// Mints a session from a `POST /session` request (its head, and its body already read).
    pub async fn mint(&self, req: &Request<()>, body: &[u8]) -> Result<SessionObject, Error> {
        let request = MintRequest::parse(body)?;
        let mut pending = self.check_mint(req, &request)?;
        // The gates, cheapest first; a provider is called only when the local checks passed.
        let evidence = Evidence {
            fingerprint: &request.fingerprint,
            body: &request.extra,
            headers: req.headers(),
            client_ip: self.inner.client_ip.resolve(req),
        };
        let builtins = Builtins {
            pow: &self.inner.pow,
            solution: request.pow.as_ref(),
            entropy_score: crate::entropy::score(&request.entropy),
            min_entropy_score: self.inner.min_entropy_score,
            now: pending.claims.iat,
            store: self.inner.store.as_ref(),
        };
        let passed = self.inner.policies.check(&evidence, &builtins).await?;
        pending.claims.usr = passed.facts.user;
        pending.claims.tier = passed.facts.tier;
        pending.pow_used = passed.pow_used;
        pending.attestation_used = passed.attestation_used;
        pending.captcha_used = passed.captcha_used;
        pending.app_attest = passed.app_attest;
        pending.policy = passed.policy;
        self.finish_mint(pending).await
    }

    /// The synchronous checks of a mint: the DPoP proof, then the claims.
    fn check_mint(&self, req: &Request<()>, request: &MintRequest) -> Result<PendingMint, Error> {
        let now = unix_now();
        // With DPoP off, DPoP headers are not even parsed.
        let presented = match self.inner.dpop_mode {
            DpopMode::Off => None,
            _ => single_dpop_header(req.headers())?,
        };
        let (cnf, dpop_seen) = match (self.inner.dpop_mode, presented) {
            (DpopMode::Off, _) | (DpopMode::Optional, None) => (None, None),
            (_, Some(proof)) => {
                let htu = expected_htu(self.inner.public_url.as_deref(), req)?;
                let expected = Expected {
                    htm: req.method().as_str(),
                    htu: htu.as_htu(),
                    access_token: None,
                    jkt: None,
                };
                let verified = self.inner.dpop.verify(proof, &expected, now)?;
                let seen = (
                    verified.replay_id(),
                    self.inner.dpop.replay_until(&verified),
                );
                (Some(Confirmation { jkt: verified.jkt }), Some(seen))
            }
            (DpopMode::Required, None) => {
                return Err(Error::new(
                    ErrorCode::DpopRequired,
                    "this service requires key-bound sessions: send a DPoP proof",
                ));
            }
        };
        let claims = Claims {
            iss: self.inner.issuer.clone(),
            aud: self.inner.audience.clone(),
            jti: new_jti(),
            iat: now,
            nbf: now,
            exp: now + self.inner.ttl_secs,
            auth_time: now,
            fp: fingerprint::hash(&request.fingerprint),
            ua: self.inner.bind_user_agent.then(|| {
                hash_b64(
                    req.headers()
                        .get(USER_AGENT)
                        .map_or(&[][..], |v| v.as_bytes()),
                )
            }),
            cnf,
            usr: None,
            tier: None,
        };
        Ok(PendingMint {
            claims,
            pow_used: None,
            attestation_used: None,
            captcha_used: None,
            app_attest: None,
            dpop_seen,
            policy: String::new(),
        })
    }

    /// The stateful steps of a mint: the cap, then the replay records, then the token.
    async fn finish_mint(&self, pending: PendingMint) -> Result<SessionObject, Error> {
        let PendingMint {
            claims,
            pow_used,
            attestation_used,
            captcha_used,
            app_attest,
            dpop_seen,
            policy,
        } = pending;
        let store = &self.inner.store;
        let slots = cap_keys(&claims);
        let admission = match store
            .admit_session(
                &slots,
                &claims.jti,
                claims.exp,
                self.inner.max_per_fingerprint,
            )
            .await
        {
            Ok(admission) => admission,
            // A cap, not a rate limit: it fails closed whatever `store.on_unavailable` says.
            Err(e) => return Err(store::refuse("admit_session", &e)),
        };
        if let Admission::Full { retry_after_secs } = admission {
            return Err(Error::new(
                ErrorCode::TooManySessions,
                format!(
                    "at most {} live sessions per device: revoke one or wait for it to expire",
                    self.inner.max_per_fingerprint
                ),
            )
            .with_rate_limit(RateLimitInfo {
                policy: "sessions",
                quota: self.inner.max_per_fingerprint,
                window_secs: self.inner.ttl_secs,
                remaining: 0,
                retry_after: std::time::Duration::from_secs(retry_after_secs),
            }));
        }
        // The cap had room: only now use up the challenge and the proof, and register the App
        // Attest key or raise its counter.
        let recorded = async {
            // Each piece of one-time evidence, recorded once: the second mint showing it is
            // refused with its gate's code. An attestation is bound to a challenge: one mint
            // per challenge, recorded apart from the proof of work, which may use the same
            // challenge in the same mint.
            let once = [
                (
                    &pow_used,
                    Set::PowUsed,
                    ErrorCode::PowInvalid,
                    "the challenge was already used",
                ),
                (
                    &attestation_used,
                    Set::PowUsed,
                    ErrorCode::AttestationInvalid,
                    "the attestation's challenge was already used",
                ),
                (
                    &captcha_used,
                    Set::PowUsed,
                    ErrorCode::CaptchaInvalid,
                    "the captcha token was already used",
                ),
            ];
            for (used, set, code, message) in once {
                if let Some(refusal) = record_once(store.as_ref(), used, set, code, message).await?
                {
                    return Ok(Some(refusal));
                }
            }
            // After the challenge: a replayed registration or assertion is refused by it first.
            if let Some(passed) = &app_attest
                && let Err(refusal) = app_attest::record(store.as_ref(), passed)
                    .await
                    .map_err(|e| ("app_attest_key", e))?
            {
                return Ok(Some(refusal.into()));
            }
            let proof = "the DPoP proof was already used (jti)";
            if let Some(refusal) = record_once(
                store.as_ref(),
                &dpop_seen,
                Set::DpopSeen,
                ErrorCode::InvalidDpopProof,
                proof,
            )
            .await?
            {
                return Ok(Some(refusal));
            }
            Ok::<_, (&'static str, StoreError)>(None)
        }
        .await;
        let refusal = match recorded {
            Ok(None) => None,
            Ok(Some(refusal)) => Some(refusal),
            Err((op, e)) => Some(store::refuse(op, &e)),
        };
        let signed = match refusal {
            Some(refusal) => Err(refusal),
            None => self.issue(&claims, claims.iat),
        };
        match &signed {
            Ok(session) => {
                tracing::Span::current().record("session_id", session.session_id.as_str());
                metrics::counter!("perishable_sessions_total", "event" => "minted").increment(1);
                // Policies come from the configuration: a bounded set of labels.
                metrics::counter!("perishable_mint_policy_total", "policy" => policy.clone())
                    .increment(1);
                self.inner.audit.emit(|| AuditEvent::Minted {
                    session_id: session.session_id.clone(),
                    key_bound: claims.cnf.is_some(),
                    expires_at: session.expires_at,
                    policy: policy.clone(),
                    user: claims.usr.is_some(),
                });
            }
            Err(_) => {
                // Give the slot back; a failure here only delays its release until `exp`.
                let _ = store.release_session(&slots, &claims.jti).await;
            }
        }
        signed
    }
}

/// Records `used` (an id, and until when) in `set`, once: the refusal `code` when it was there
/// already; nothing to do when there is nothing to record.
async fn record_once(
    store: &dyn Store,
    used: &Option<(String, u64)>,
    set: Set,
    code: ErrorCode,
    message: &'static str,
) -> Result<Option<Error>, (&'static str, StoreError)> {
    let Some((id, until)) = used else {
        return Ok(None);
    };
    let first = store
        .insert_once(set, id, *until)
        .await
        .map_err(|e| ("insert_once", e))?;
    Ok((!first).then(|| Error::new(code, message)))
}

/// A mint that passed its synchronous checks.
struct PendingMint {
    claims: Claims,
    /// The challenge to record as used, and until when.
    pow_used: Option<(String, u64)>,
    /// The attestation's challenge to record as used, and until when.
    attestation_used: Option<(String, u64)>,
    /// The captcha token (hashed) to record as used, and until when.
    captcha_used: Option<(String, u64)>,
    /// The App Attest key to register, or whose counter to raise.
    app_attest: Option<AppAttestPassed>,
    /// The DPoP proof to record as seen, and until when.
    dpop_seen: Option<(String, u64)>,
    /// The mint policy that passed (`"pow+entropy"`).
    policy: String,
}

#[cfg(test)]
mod tests {
    use super::super::testing::{FP, UA, config, mint, sessions};
    use super::*;

    async fn refused(sessions: &Sessions, req: &Request<()>, body: &str) -> ErrorCode {
        sessions
            .mint(req, body.as_bytes())
            .await
            .unwrap_err()
            .code()
    }

    fn head() -> Request<()> {
        Request::post("/session")
            .header(USER_AGENT, UA)
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn a_mint_signs_the_claims_of_the_device() {
        let sessions = sessions(config());
        let minted = mint(&sessions).await;
        assert_eq!(minted.token_type, "Bearer");
        assert_eq!(minted.expires_in, 600);
        let claims = sessions.codec().verify(&minted.token).unwrap();
        assert_eq!(claims.jti, minted.session_id);
        assert_eq!(claims.fp, fingerprint::hash(FP));
        assert_eq!(claims.ua, Some(hash_b64(UA.as_bytes())));
        assert_eq!(claims.auth_time, claims.iat);
        assert_eq!(claims.cnf, None);
    }

    #[tokio::test]
    async fn the_gates_refuse_before_the_store_is_touched() {
        // Interaction below the threshold: refused, and the device's one slot stays free.
        let sessions = sessions(
            config()
                .session_min_entropy_score(50)
                .session_max_per_fingerprint(1),
        );
        let body = format!(r#"{{"fingerprint":"{FP}"}}"#);
        assert_eq!(
            refused(&sessions, &head(), &body).await,
            ErrorCode::InsufficientEntropy
        );
        // Proof of work on, none given.
        let with_pow = super::super::testing::sessions(config().pow_difficulty(8));
        assert_eq!(
            refused(&with_pow, &head(), &body).await,
            ErrorCode::PowRequired
        );
    }

    #[tokio::test]
    async fn the_session_cap_counts_live_sessions_per_device() {
        let sessions = sessions(config().session_max_per_fingerprint(2));
        mint(&sessions).await;
        mint(&sessions).await;
        let body = format!(r#"{{"fingerprint":"{FP}"}}"#);
        let e = sessions.mint(&head(), body.as_bytes()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooManySessions);
        // Another device has its own slots.
        let other = r#"{"fingerprint":"another-device-2"}"#;
        assert!(sessions.mint(&head(), other.as_bytes()).await.is_ok());
    }

    #[tokio::test]
    async fn dpop_required_refuses_a_mint_without_a_proof() {
        let sessions = sessions(config().session_dpop(DpopMode::Required));
        let body = format!(r#"{{"fingerprint":"{FP}"}}"#);
        assert_eq!(
            refused(&sessions, &head(), &body).await,
            ErrorCode::DpopRequired
        );
    }

    fn code(body: &str) -> ErrorCode {
        MintRequest::parse(body.as_bytes()).unwrap_err().code()
    }

    #[test]
    fn each_fault_has_its_code() {
        assert_eq!(code("{"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::InvalidJson);
        assert_eq!(code("{}"), ErrorCode::MissingFingerprint);
        assert_eq!(
            code(r#"{"fingerprint":null}"#),
            ErrorCode::MissingFingerprint
        );
        assert_eq!(code(r#"{"fingerprint":42}"#), ErrorCode::InvalidFingerprint);
        assert_eq!(
            code(r#"{"fingerprint":"short"}"#),
            ErrorCode::InvalidFingerprint
        );
        assert_eq!(
            code(r#"{"fingerprint":"device-123456","entropy":{"pointer":"x"}}"#),
            ErrorCode::InvalidJson
        );
        assert_eq!(
            code(r#"{"fingerprint":"device-123456","pow":{"challenge":1}}"#),
            ErrorCode::InvalidJson
        );
        let many = format!(
            r#"{{"fingerprint":"device-123456","entropy":{{"keys":[{}]}}}}"#,
            vec!["1"; MAX_SAMPLES + 1].join(",")
        );
        assert_eq!(code(&many), ErrorCode::InvalidJson);
        // Read strictly: two fingerprints (which one?), the proof or the samples as arrays.
        for body in [
            r#"{"fingerprint":"device-123456","fingerprint":"device-654321"}"#,
            r#"{"fingerprint":"device-123456","pow":["c","n"]}"#,
            r#"{"fingerprint":"device-123456","entropy":[[[0,1,2]],[5],9]}"#,
            r#"{"fingerprint":"device-123456","pow":{"challenge":"a","challenge":"b","nonce":"n"}}"#,
            r#"{"fingerprint":"device-123456","entropy":{"pointer":[],"pointer":[[0,1,2]]}}"#,
            "{\"fingerprint\":\"device-\\ud800-123456\"}",
        ] {
            assert_eq!(code(body), ErrorCode::InvalidJson, "{body}");
        }
    }

    #[test]
    fn a_good_body_parses() {
        let r = MintRequest::parse(
            br#"{"fingerprint":"device-123456","entropy":{"pointer":[[0,1,2]],"keys":[5],"elapsed_ms":9},"pow":{"challenge":"c","nonce":"n"}}"#,
        )
        .unwrap();
        assert_eq!(r.fingerprint, "device-123456");
        assert_eq!(r.entropy.pointer, vec![[0.0, 1.0, 2.0]]);
        assert_eq!(r.pow.unwrap().nonce, "n");
    }
}
