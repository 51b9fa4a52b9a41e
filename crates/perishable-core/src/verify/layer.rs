use tower::Layer;

use super::Verify;
use crate::session::Sessions;

/// Applies [`Verify`] to a service; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    sessions: Sessions,
}

impl VerifyLayer {
    /// Checks requests against `sessions`.
    pub fn new(sessions: Sessions) -> Self {
        Self { sessions }
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = Verify<S>;

    fn layer(&self, inner: S) -> Verify<S> {
        Verify::new(inner, self.sessions.clone())
    }
}
