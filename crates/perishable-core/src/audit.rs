//! The audit hook: session mints, refreshes, revocations and refusals, for the embedding app's
//! own storage.
//!
//! Register one callback with [`Perishable::on_audit`](crate::Perishable::on_audit). It is called
//! inline, on the request's task, so it must be quick: hand the event to a channel or a buffer
//! and store it elsewhere. Events carry session ids, never tokens or fingerprints.
//!
//! ```
//! use perishable_core::{Config, Perishable};
//! use perishable_core::audit::AuditEvent;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let perishable = Perishable::new(Config::builder().upstream_api_key("sk-test").build()?)?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<AuditEvent>();
//! perishable.on_audit(move |event| {
//!     let _ = tx.send(event.clone());
//! })?;
//! // ... serve `perishable_axum::router_from(&perishable)`, and elsewhere:
//! // while let Some(event) = rx.recv().await { store(event) }
//! # drop(rx); Ok(()) }
//! ```

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::error::ErrorCode;

/// Something that happened to a session, or a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditEvent {
    /// A session was minted.
    Minted {
        /// The new session's id (`jti`).
        session_id: String,
        /// Whether it is bound to a DPoP key.
        key_bound: bool,
        /// When its token expires (Unix seconds).
        expires_at: u64,
        /// The mint policy that passed: its gates joined with `+` (`"pow+entropy"`, `"oidc"`).
        policy: String,
        /// Whether the session carries `usr`: the user an identity gate named, or the key an
        /// `app_attest` mint attested.
        user: bool,
    },
    /// A session was refreshed: the old token is revoked, a new one issued.
    Refreshed {
        /// The old session id.
        old_session_id: String,
        /// The new session id.
        session_id: String,
        /// When the new token expires (Unix seconds).
        expires_at: u64,
    },
    /// A session was revoked (`DELETE /session`).
    Revoked {
        /// The session id.
        session_id: String,
    },
    /// A request was refused with an error of the protocol.
    Refused {
        /// The protocol code.
        code: ErrorCode,
        /// The route (`mint`, `openai`, ...).
        route: &'static str,
        /// The session, when the refusal came after it was verified.
        session_id: Option<String>,
    },
}

type Hook = Box<dyn Fn(&AuditEvent) + Send + Sync>;

/// Where audit events go: nowhere until a hook is registered.
#[derive(Clone, Default)]
pub struct Audit {
    hook: Arc<OnceLock<Hook>>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit")
            .field("registered", &self.hook.get().is_some())
            .finish()
    }
}

/// A hook was already registered.
#[derive(Debug, thiserror::Error)]
#[error("an audit hook is already registered")]
pub struct AuditAlreadySet;

impl Audit {
    /// Registers the hook (once).
    pub fn set(
        &self,
        hook: impl Fn(&AuditEvent) + Send + Sync + 'static,
    ) -> Result<(), AuditAlreadySet> {
        self.hook.set(Box::new(hook)).map_err(|_| AuditAlreadySet)
    }

    /// Whether a hook is registered (events are only built when one is).
    pub fn is_set(&self) -> bool {
        self.hook.get().is_some()
    }

    /// Sends `event` to the hook, if any.
    pub fn emit(&self, event: impl FnOnce() -> AuditEvent) {
        if let Some(hook) = self.hook.get() {
            hook(&event());
        }
    }
}
