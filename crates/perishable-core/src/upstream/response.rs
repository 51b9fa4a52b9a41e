//! The response side of the upstream Service: what the client gets back from the upstream's
//! answer. Its status and headers minus hop-by-hop ones and `Set-Cookie` (`X-Accel-Buffering: no`
//! on event streams), and its body passed on frame by frame, with the usage tap and the
//! end-of-body settlement riding along ([`crate::body`], [`crate::usage`]). The server's key is
//! masked wherever the upstream echoes it, headers and body ([`KeyMask`]).

use std::time::Duration;

use http::Response;
use http::header::{self, HeaderValue};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::headers::strip_response_headers;
use super::request::Endpoint;
use crate::body::{Accounting, Body, KeyMask, Settle, UpstreamBody};
use crate::budget::{Admitted, Budget};
use crate::usage::{Encoding, TapMode};

static X_ACCEL_BUFFERING: header::HeaderName = header::HeaderName::from_static("x-accel-buffering");

/// What the response side needs of the request that was sent.
pub(super) struct Answered<'a> {
    /// The `{path}` forwarded, for the metric label of the endpoint.
    pub(super) path: &'a str,
    /// The proxy asked for the usage on the client's behalf: hide it.
    pub(super) hide_usage: bool,
    pub(super) budget: Budget,
    pub(super) admitted: Admitted,
    /// When the request went upstream.
    pub(super) started: Instant,
    /// `upstream.idle_timeout_ms`.
    pub(super) idle_timeout: Duration,
    /// The server's key, to mask in what comes back (none: no key, or too short to search).
    pub(super) key_mask: Option<KeyMask>,
}

/// The client's response to the upstream's `response`.
pub(super) fn client_response(
    response: Response<Incoming>,
    answered: Answered<'_>,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_response_headers(&mut parts.headers);
    if let Some(mask) = &answered.key_mask {
        mask.mask_headers(&mut parts.headers);
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes);
    let is_event_stream = content_type.is_some_and(|v| v.starts_with(b"text/event-stream"));
    let is_json = content_type.is_some_and(|v| v.starts_with(b"application/json"));
    if is_event_stream {
        parts
            .headers
            .insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
    }
    let failed = !parts.status.is_success();
    let tap = match (failed, is_event_stream, is_json) {
        (true, _, _) => None,
        (false, true, _) if answered.hide_usage => Some(TapMode::EventsHidingUsage),
        (false, true, _) => Some(TapMode::Events),
        (false, false, true) => Some(TapMode::Json),
        _ => None,
    };
    let encoding = Encoding::of(parts.headers.get(header::CONTENT_ENCODING));
    let path = answered.path;
    let endpoint = Endpoint::of(path);
    let on_done = Settle {
        budget: answered.budget,
        expects_usage: answered.admitted.reserved() > 0 && endpoint.reports_usage(),
        route: endpoint.label(path),
        admitted: answered.admitted,
        started: answered.started,
        failed,
    };
    let accounting = Accounting::new(tap, encoding, on_done);
    if accounting.rewrites() {
        // The body is rewritten: its length changes.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if accounting.decodes_for_client() {
        parts.headers.remove(header::CONTENT_ENCODING);
    }
    Response::from_parts(
        parts,
        Body::upstream(UpstreamBody::new(
            body,
            answered.idle_timeout,
            accounting,
            answered.key_mask.as_ref().map(KeyMask::stream),
        )),
    )
}
