use std::sync::Arc;

use tower::Layer;

use super::{Realtime, RealtimeService};

/// Applies [`RealtimeService`] to a service (the upstream Service); see the
/// [module docs](super). Made by [`Perishable::realtime_layer`](crate::Perishable::realtime_layer).
#[derive(Debug, Clone)]
pub struct RealtimeLayer {
    /// `None`: `realtime.enabled` is off, and every request passes on.
    realtime: Option<Arc<Realtime>>,
}

impl RealtimeLayer {
    pub(crate) fn new(realtime: Option<Arc<Realtime>>) -> Self {
        Self { realtime }
    }
}

impl<S> Layer<S> for RealtimeLayer {
    type Service = RealtimeService<S>;

    fn layer(&self, inner: S) -> RealtimeService<S> {
        RealtimeService::new(inner, self.realtime.clone())
    }
}
