//! The streamed upstream response body, with the idle-between-chunks timeout.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{BoxError, Scrub};
use crate::budget::{Admitted, Budget};
use crate::usage::{Encoding, TapMode, Usage, UsageTap};

/// What is done once a response body is done (a value, not a boxed closure: one allocation
/// less per request): the upstream metrics, and the budget settled with the usage seen.
pub(crate) struct Settle {
    pub(crate) budget: Budget,
    pub(crate) admitted: Admitted,
    /// When the request went upstream.
    pub(crate) started: Instant,
    /// The upstream answered with an error status.
    pub(crate) failed: bool,
    /// The call was reserved against a budget and its endpoint reports usage: usage that
    /// cannot be read is counted and logged.
    pub(crate) expects_usage: bool,
    /// The metric label of the endpoint (a fixed string).
    pub(crate) route: &'static str,
}

impl Settle {
    /// Whether the body ended normally or not (the client went away, the upstream broke off),
    /// the budget settles the same way, with the usage seen.
    fn run(self, usage: Option<Usage>) {
        metrics::histogram!("perishable_upstream_duration_seconds")
            .record(self.started.elapsed().as_secs_f64());
        if let Some(u) = usage {
            metrics::counter!("perishable_tokens_total", "kind" => "prompt")
                .increment(u.prompt_tokens);
            metrics::counter!("perishable_tokens_total", "kind" => "completion")
                .increment(u.completion_tokens);
        } else if self.expects_usage && !self.failed {
            metrics::counter!("perishable_usage_unread_total", "route" => self.route).increment(1);
            tracing::warn!(
                route = self.route,
                "the response's usage could not be read; its whole reservation stands"
            );
        }
        self.budget.settle(self.admitted, usage, self.failed);
    }
}

/// Usage accounting and the end-of-response hook, riding along with the body.
pub(crate) struct Accounting {
    tap: Option<UsageTap>,
    on_done: Option<Settle>,
}

impl Accounting {
    pub(crate) fn new(mode: Option<TapMode>, encoding: Encoding, on_done: Settle) -> Self {
        Self {
            tap: mode.map(|mode| UsageTap::new(mode, encoding)),
            on_done: Some(on_done),
        }
    }

    /// Whether the client's body differs from the upstream's (its length and, when decoded,
    /// its `Content-Encoding` no longer hold).
    pub(crate) fn rewrites(&self) -> bool {
        self.tap.as_ref().is_some_and(UsageTap::rewrites)
    }

    /// Whether the client gets the body decoded.
    pub(crate) fn decodes_for_client(&self) -> bool {
        self.tap.as_ref().is_some_and(UsageTap::decodes_for_client)
    }

    fn done(&mut self) {
        if let Some(on_done) = self.on_done.take() {
            // A JSON body's usage is read from its tail: finish the tap if the end was missed.
            if let Some(tap) = self.tap.as_mut()
                && tap.usage().is_none()
            {
                let _ = tap.finish();
            }
            on_done.run(self.tap.as_ref().and_then(UsageTap::usage));
        }
    }
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting")
            .field("tap", &self.tap)
            .finish_non_exhaustive()
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the body was discarded).
        self.done();
    }
}

pin_project_lite::pin_project! {
    /// The upstream's body, passed on frame by frame as it arrives.
    ///
    /// When the upstream stays silent for longer than the idle timeout, the body ends cleanly
    /// (a warning is logged) instead of holding the client's connection open. Dropping it drops
    /// the upstream response, which closes the upstream connection: that is how a client that goes
    /// away cancels the upstream request.
    #[derive(Debug)]
    pub(crate) struct UpstreamBody {
        #[pin]
        inner: hyper::body::Incoming,
        // Armed when the body starts waiting for the upstream, not on every frame: a body whose
        // frames are all there when read (a JSON answer) never touches the timer.
        #[pin]
        idle: Option<Sleep>,
        // A frame came since the timer was armed: arm it again before waiting.
        rearm: bool,
        timeout: Duration,
        done: bool,
        accounting: Option<Box<Accounting>>,
        // Masks the server's key in what goes to the client, after the tap.
        scrub: Option<Scrub>,
    }
}

impl UpstreamBody {
    pub(crate) fn new(
        inner: hyper::body::Incoming,
        timeout: Duration,
        accounting: Accounting,
        scrub: Option<Scrub>,
    ) -> Self {
        Self {
            inner,
            idle: None,
            rearm: true,
            timeout,
            done: false,
            accounting: Some(Box::new(accounting)),
            scrub,
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
        loop {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    *this.rearm = true;
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    metrics::counter!("perishable_upstream_bytes_total")
                        .increment(data.len() as u64);
                    let tap = this.accounting.as_mut().and_then(|a| a.tap.as_mut());
                    let out = match tap {
                        None => Some(data),
                        Some(tap) => tap.frame(data),
                    };
                    let out = match (out, this.scrub.as_mut()) {
                        (Some(out), Some(scrub)) => scrub.frame(out),
                        (out, _) => out,
                    };
                    // The upstream's declared length is all here: end now, so that hyper can
                    // finish the response without waiting for the upstream connection to say so.
                    if this.inner.is_end_stream() {
                        *this.done = true;
                        let tail = finish(this.accounting, this.scrub);
                        return Poll::Ready(join(out, tail).map(|b| Ok(Frame::data(b))));
                    }
                    match out {
                        Some(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        // Half an event: wait for the rest.
                        None => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.done = true;
                    tracing::warn!(error = %crate::error::Chain(&e), "the upstream response broke off");
                    if let Some(mut accounting) = this.accounting.take() {
                        accounting.done();
                    }
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    let tail = finish(this.accounting, this.scrub);
                    return Poll::Ready(tail.map(|b| Ok(Frame::data(b))));
                }
                Poll::Pending => {
                    if std::mem::take(this.rearm) {
                        let deadline = Instant::now() + *this.timeout;
                        match this.idle.as_mut().as_pin_mut() {
                            Some(idle) => idle.reset(deadline),
                            None => this.idle.set(Some(tokio::time::sleep_until(deadline))),
                        }
                    }
                    let Some(idle) = this.idle.as_mut().as_pin_mut() else {
                        return Poll::Pending;
                    };
                    return match idle.poll(cx) {
                        Poll::Ready(()) => {
                            *this.done = true;
                            tracing::warn!(
                                idle_timeout_ms = this.timeout.as_millis() as u64,
                                "the upstream went silent; ending the response"
                            );
                            let tail = finish(this.accounting, this.scrub);
                            Poll::Ready(tail.map(|b| Ok(Frame::data(b))))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not the inner body's end: the accounting must see the end of the stream (`poll_frame`
        // ends it with the last frame when the upstream's length says it is the last).
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        match self.accounting.as_ref().and_then(|a| a.tap.as_ref()) {
            // Events are dropped on the way: the length is not the upstream's.
            Some(tap) if tap.rewrites() => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

/// Ends the accounting: flushes what the tap held back (masked) and what the scrubber held,
/// and runs the end hook.
fn finish(accounting: &mut Option<Box<Accounting>>, scrub: &mut Option<Scrub>) -> Option<Bytes> {
    let tail = accounting.take().and_then(|mut accounting| {
        let tail = accounting.tap.as_mut().and_then(UsageTap::finish);
        accounting.done();
        tail
    });
    match scrub {
        Some(scrub) => {
            let tail = tail.and_then(|tail| scrub.frame(tail));
            join(tail, scrub.finish())
        }
        None => tail,
    }
}

/// `a` then `b`, without a copy when either is missing.
fn join(a: Option<Bytes>, b: Option<Bytes>) -> Option<Bytes> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let mut joined = BytesMut::with_capacity(a.len() + b.len());
            joined.extend_from_slice(&a);
            joined.extend_from_slice(&b);
            Some(joined.freeze())
        }
        (a, b) => a.or(b),
    }
}
