//! Observability for every request: one tracing span, request and refusal metrics, and refusals
//! to the audit hook.
//!
//! [`ObserveLayer`] wraps the whole stack. For each request it opens an `INFO` span
//! `perishable.request` with the fields `route`, `method`, `status`, `latency_us`, `session_id`
//! (filled in by the verification or mint), `upstream_status` and `upstream_first_byte_us`
//! (filled in by the upstream Service). It never records the token, the fingerprint or any
//! header, and it marks the request's credentials sensitive ([`SENSITIVE_HEADERS`]: their
//! `Debug` then prints `Sensitive`) for any layer inside it that logs headers. Mark them in a
//! layer of your own too if one outside it logs them (tower-http's
//! `SetSensitiveRequestHeadersLayer`, as `examples/embed.rs` does). It emits no per-chunk
//! events.
//!
//! Metrics, through the [`metrics`] facade (the embedding app installs the exporter):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `perishable_requests_total` | counter | `route`, `status` |
//! | `perishable_request_duration_seconds` | histogram | `route` (until the response head) |
//! | `perishable_refusals_total` | counter | `code` (the PROTOCOL code) |
//! | `perishable_sessions_total` | counter | `event`: `minted`, `refreshed`, `revoked` |
//! | `perishable_upstream_first_byte_seconds` | histogram | |
//! | `perishable_upstream_duration_seconds` | histogram | (until the response body ends) |
//! | `perishable_upstream_bytes_total` | counter | |
//! | `perishable_tokens_total` | counter | `kind`: `prompt`, `completion` |
//! | `perishable_rate_limiter_keys` | gauge | `policy` (in-memory limiter, at each prune) |
//! | `perishable_store_errors_total` | counter | `op` |
//!
//! Routes are labelled from the end of the path, so the labels stay few whatever the mount
//! point: `health`, `challenge`, `mint`, `refresh`, `revoke`, `client`, `openai`, `other`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response};
use tower::{Layer, Service};

use crate::audit::{Audit, AuditEvent};
use crate::error::Refusal;

/// The request headers [`Observe`] marks sensitive: `Authorization`, `Cookie`, `DPoP` and
/// `X-Perishable-Fingerprint`.
pub const SENSITIVE_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::COOKIE,
    crate::dpop::DPOP_HEADER,
    crate::fingerprint::FINGERPRINT_HEADER,
];

/// Marks [`SENSITIVE_HEADERS`] sensitive, in one pass over the headers (what tower-http's
/// `SetSensitiveRequestHeadersLayer` does with a hashed lookup per name).
fn mark_sensitive(headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if SENSITIVE_HEADERS.contains(name) {
            value.set_sensitive(true);
        }
    }
}

/// The route label of a request; see the [module docs](self).
pub fn route_label<B>(req: &Request<B>) -> &'static str {
    let path = req.uri().path().trim_end_matches('/');
    if path.contains("/openai/") || path.ends_with("/openai") {
        "openai"
    } else if path.ends_with("/session/refresh") {
        "refresh"
    } else if path.ends_with("/session") {
        match *req.method() {
            Method::DELETE => "revoke",
            _ => "mint",
        }
    } else if path.ends_with("/challenge") {
        "challenge"
    } else if path.ends_with("/health") {
        "health"
    } else if path.ends_with("/client.js") {
        "client"
    } else {
        "other"
    }
}

/// Applies [`Observe`]; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct ObserveLayer {
    audit: Audit,
}

impl ObserveLayer {
    /// Observes requests, sending refusals to `audit`.
    pub fn new(audit: Audit) -> Self {
        Self { audit }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            audit: self.audit.clone(),
        }
    }
}

/// Middleware that traces and measures every request; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    audit: Audit,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Observe<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        mark_sensitive(req.headers_mut());
        let route = route_label(&req);
        let span = tracing::info_span!(
            "perishable.request",
            route,
            method = %req.method(),
            status = tracing::field::Empty,
            latency_us = tracing::field::Empty,
            session_id = tracing::field::Empty,
            upstream_status = tracing::field::Empty,
            upstream_first_byte_us = tracing::field::Empty,
        );
        let started = Instant::now();
        let inner = span.in_scope(|| self.inner.call(req));
        ObserveFuture {
            inner,
            span,
            started,
            route,
            audit: self.audit.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Observe`]: the inner future, polled inside the request span,
    /// then the request's metrics and audit event. Not boxed.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        started: Instant,
        route: &'static str,
        audit: Audit,
    }
}

impl<F> std::fmt::Debug for ObserveFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserveFuture")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl<F, ResBody, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.span.enter();
            match this.inner.poll(cx) {
                Poll::Ready(result) => result,
                Poll::Pending => return Poll::Pending,
            }
        };
        if let Ok(response) = &result {
            let route = *this.route;
            let status = response.status().as_u16();
            let elapsed = this.started.elapsed();
            this.span.record("status", status);
            this.span.record("latency_us", elapsed.as_micros() as u64);
            metrics::counter!(
                "perishable_requests_total",
                "route" => route,
                "status" => status_label(status),
            )
            .increment(1);
            metrics::histogram!("perishable_request_duration_seconds", "route" => route)
                .record(elapsed.as_secs_f64());
            if let Some(Refusal { code, session_id }) = response.extensions().get::<Refusal>() {
                metrics::counter!("perishable_refusals_total", "code" => code.as_str())
                    .increment(1);
                this.audit.emit(|| AuditEvent::Refused {
                    code: *code,
                    route,
                    session_id: session_id.clone(),
                });
            }
        }
        Poll::Ready(result)
    }
}

/// Status codes as static label values (no allocation per request).
fn status_label(status: u16) -> &'static str {
    const EXACT: [(u16, &str); 14] = [
        (200, "200"),
        (204, "204"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (413, "413"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, label)) = EXACT.iter().find(|(code, _)| *code == status) {
        return label;
    }
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    #[tokio::test]
    async fn credentials_are_marked_sensitive_for_the_layers_inside() {
        let app = ServiceBuilder::new()
            .layer(ObserveLayer::default())
            .service(service_fn(|req: Request<()>| async move {
                let marked: Vec<(String, bool)> = req
                    .headers()
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.is_sensitive()))
                    .collect();
                Ok::<_, Infallible>(Response::new(marked))
            }));
        let req = Request::post("/openai/chat/completions")
            .header("authorization", "Bearer a")
            .header("authorization", "Bearer b")
            .header("cookie", "c=1")
            .header("dpop", "proof")
            .header("x-perishable-fingerprint", "device")
            .header("content-type", "application/json")
            .header("user-agent", "sdk")
            .body(())
            .unwrap();
        let marked = app.oneshot(req).await.unwrap().into_body();
        let sensitive: Vec<&str> = marked
            .iter()
            .filter(|(_, s)| *s)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(
            sensitive,
            [
                "authorization",
                "authorization",
                "cookie",
                "dpop",
                "x-perishable-fingerprint"
            ]
        );
        assert_eq!(marked.len(), 7);
    }
}
