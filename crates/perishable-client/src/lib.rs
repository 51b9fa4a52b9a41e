//! A native Rust client for [Perishable](https://github.com/perishable-rs/perishable): call
//! an OpenAI-compatible API through a Perishable proxy without holding the API key.
//!
//! The proxy hands out short-lived session tokens (JWTs) bound to a device fingerprint, to the
//! User-Agent that minted them and, with DPoP (RFC 9449), to a P-256 key the client holds.
//! [`Client`] follows the wire protocol (`docs/protocol.md` in the repository):
//!
//! - **mint**: `GET /challenge`, the proof of work solved on a blocking thread, then
//!   `POST /session` with the fingerprint, the app's recorded [`Interaction`] samples and a
//!   DPoP proof;
//! - **refresh** (`POST /session/refresh`) within the refresh margin of the expiry (60 s by
//!   default), and a new mint when refresh is refused (past the absolute lifetime, revoked);
//!   concurrent callers share one mint or refresh;
//! - **authenticate** every call under the base URL: `Authorization: DPoP <token>` (or
//!   `Bearer`), `X-Perishable-Fingerprint`, `User-Agent` and a fresh DPoP proof with `ath`,
//!   retried once with a fresh proof on `invalid_dpop_proof` (or with the server's
//!   `DPoP-Nonce` on `use_dpop_nonce`), and once with a new session on `token_expired`,
//!   `session_revoked` or `invalid_token`;
//! - **revoke** (`DELETE /session`).
//!
//! Refusals come back as [`Error::Refused`] with the status, `code` and `message` of the
//! OpenAI error shape. Neither errors nor `Debug` output ever show the token or the key.
//!
//! # Example
//!
//! ```no_run
//! use perishable_client::{Client, Interaction};
//! use reqwest::Method;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder("https://api.example.com/ai")
//!     // A stable per-install id the app generated once and stored.
//!     .fingerprint("install-6f1c2a4e-0b7d-4c55-9a39-3be1d2f0c8aa")
//!     // The session is bound to it: keep it stable.
//!     .user_agent("MyApp/2.3 (iOS 18)")
//!     .build()?;
//!
//! // Before the first call, hand over what the user really did (touch moves, key times);
//! // `record_interaction` can also be fed event by event.
//! client.set_interaction(
//!     Interaction::new()
//!         .pointer(0.0, 120.0, 310.0)
//!         .pointer(16.0, 126.5, 305.0)
//!         .pointer(35.0, 131.0, 297.5)
//!         .key(410.0)
//!         .key(530.0),
//! );
//!
//! let body = serde_json::json!({
//!     "model": "gpt-4o-mini",
//!     "messages": [{ "role": "user", "content": "Hello" }],
//! });
//! let request = client
//!     .request(Method::POST, "chat/completions")
//!     .await?
//!     .header("content-type", "application/json")
//!     .body(body.to_string());
//! let response = perishable_client::check(client.send(request).await?).await?;
//! println!("{}", response.text().await?);
//!
//! // Keep the DPoP key across launches: store this in the Keychain / Keystore, and pass it
//! // back with `.dpop_key(stored)`.
//! let _pkcs8 = client.dpop_key().map(|key| key.pkcs8_der().to_vec());
//!
//! client.revoke().await?;
//! # Ok(()) }
//! ```
//!
//! With another HTTP client (or an OpenAI SDK that lets you add headers), ask for the headers
//! of each call with [`Client::headers`]; use each set once, since a DPoP proof cannot be
//! replayed:
//!
//! ```no_run
//! # async fn run(client: perishable_client::Client) -> perishable_client::Result<()> {
//! let url = format!("{}/models", client.openai_base_url());
//! let headers = client.headers(&http::Method::GET, &url).await?;
//! # Ok(()) }
//! ```
//!
//! # Interaction samples and the entropy gate
//!
//! The server scores the interaction samples itself and refuses a mint that scores under
//! `session.min_entropy_score` (`400 insufficient_entropy`). Send the samples your app really
//! recorded; this crate never fabricates them. A CLI, a daemon or a test has no user to
//! record: its operator sets `session.min_entropy_score = 0` on the server. For native apps,
//! touch samples are weak evidence and the proof of work only costs CPU; see `docs/native.md`
//! in the repository for the gates that suit apps.
//!
//! # Mint gates
//!
//! Servers whose `mint.policies` need more than the proof of work and the samples get the
//! evidence from the app at every mint: [`ClientBuilder::id_token_source`] (the `oidc` gate),
//! [`ClientBuilder::captcha_source`] (`captcha`), and [`ClientBuilder::attestation_source`]
//! (`app_attest`, `play_integrity`), which is handed the mint's challenge and returns an
//! [`Attestation`] bound to it:
//!
//! ```no_run
//! use perishable_client::{Attestation, AttestationChallenge, Client};
//!
//! /// The app's bridge to DCAppAttestService (Swift), for its stored key.
//! async fn assert_with_app_attest(client_data_hash: [u8; 32]) -> Option<Vec<u8>> {
//!     # let _ = client_data_hash;
//!     None
//! }
//!
//! # fn run() -> perishable_client::Result<()> {
//! let client = Client::builder("https://api.example.com/ai")
//!     .fingerprint("install-6f1c2a4e-0b7d-4c55-9a39-3be1d2f0c8aa")
//!     .attestation_source(|challenge: AttestationChallenge| async move {
//!         let key_id = "n2wKNmOS1JvGB9uZgUxNHOXvDv4Wh4E9UqyXW8JYQwA="; // kept since generateKey
//!         let assertion = assert_with_app_attest(challenge.client_data_hash()).await?;
//!         Some(Attestation::app_attest_assertion(key_id, &assertion))
//!     })
//!     .build()?;
//! # let _ = client; Ok(()) }
//! ```
//!
//! # Features
//!
//! - `middleware`: `reqwest_middleware::Middleware` for [`Client`], so a
//!   `reqwest_middleware::ClientWithMiddleware` authenticates every call under the base URL.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod attestation;
mod client;
mod dpop;
mod error;
mod interaction;
#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
mod middleware;
pub mod pow;
mod session;
mod time;

pub use attestation::{Attestation, AttestationChallenge};
pub use client::{
    Client, ClientBuilder, DEFAULT_REFRESH_MARGIN, DEFAULT_USER_AGENT, DPOP_HEADER,
    FINGERPRINT_HEADER, IntoRequest,
};
pub use dpop::DpopKey;
pub use error::{Error, Result, check};
pub use interaction::{Interaction, MAX_SAMPLES};
pub use session::{Session, TokenType};

pub use reqwest;
