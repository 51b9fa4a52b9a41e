//! The streamed upstream response body, with the idle-between-chunks timeout.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

pin_project_lite::pin_project! {
    /// The upstream's body, passed on frame by frame as it arrives.
    ///
    /// When the upstream stays silent for longer than the idle timeout, the body ends cleanly
    /// (a warning is logged) instead of holding the client's connection open. Dropping it drops
    /// the upstream response, which closes the upstream connection: that is how a client that goes
    /// away cancels the upstream request.
    #[derive(Debug)]
    pub struct UpstreamBody {
        #[pin]
        inner: reqwest::Body,
        #[pin]
        idle: Sleep,
        timeout: Duration,
        done: bool,
    }
}

impl UpstreamBody {
    pub(crate) fn new(inner: reqwest::Body, timeout: Duration) -> Self {
        Self {
            inner,
            idle: tokio::time::sleep(timeout),
            timeout,
            done: false,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.as_mut().reset(Instant::now() + *this.timeout);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                *this.done = true;
                tracing::warn!(error = %e, "the upstream response broke off");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                *this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match this.idle.poll(cx) {
                Poll::Ready(()) => {
                    *this.done = true;
                    tracing::warn!(
                        idle_timeout_ms = this.timeout.as_millis() as u64,
                        "the upstream went silent; ending the response"
                    );
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
