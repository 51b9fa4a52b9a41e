use tower::Layer;

use super::Verify;
use crate::session::Sessions;

/// Applies [`Verify`] to a service; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    sessions: Sessions,
    defer: bool,
}

impl VerifyLayer {
    /// Checks requests against `sessions`.
    pub fn new(sessions: Sessions) -> Self {
        Self {
            sessions,
            defer: false,
        }
    }

    /// Leaves DPoP replay records to the upstream Service's admission (see
    /// [`Perishable::proxy_verify_layer`](crate::Perishable::proxy_verify_layer)).
    pub(crate) fn deferring(mut self) -> Self {
        self.defer = true;
        self
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = Verify<S>;

    fn layer(&self, inner: S) -> Verify<S> {
        Verify::new(inner, self.sessions.clone()).deferring(self.defer)
    }
}
