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
//! | `perishable_refusals_total` | counter | `code` (the protocol code) |
//! | `perishable_sessions_total` | counter | `event`: `minted`, `refreshed`, `revoked` |
//! | `perishable_upstream_first_byte_seconds` | histogram | |
//! | `perishable_upstream_duration_seconds` | histogram | (until the response body ends) |
//! | `perishable_upstream_bytes_total` | counter | |
//! | `perishable_tokens_total` | counter | `kind`: `prompt`, `completion` |
//! | `perishable_rate_limiter_keys` | gauge | `policy` (in-memory limiter, at each prune) |
//! | `perishable_store_errors_total` | counter | `op` |
//!
//! Routes are labelled from the route table ([`Route::label`], on the path below the mount
//! point), so the labels stay few: `health`, `challenge`, `mint`, `refresh`, `revoke`,
//! `client`, `openai`, and `other` for a request no route serves.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use metrics::{Key, Label, Level, Metadata};
use tower::{Layer, Service};

use crate::audit::{Audit, AuditEvent};
use crate::error::Refusal;
use crate::route::Route;

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

/// The route label of a request: its [`Route`]'s, or `other` when no route serves it.
pub(crate) fn route_label<B>(req: &Request<B>) -> &'static str {
    Route::of(req.method(), req.uri().path()).map_or("other", Route::label)
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

impl<S> Observe<S> {
    crate::macros::define_inner_service_accessors!();
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
            let (request_labels, route_labels) = labels(route, status);
            metrics::with_recorder(|recorder| {
                recorder
                    .register_counter(
                        &Key::from_static_parts("perishable_requests_total", request_labels),
                        &METADATA,
                    )
                    .increment(1);
                recorder
                    .register_histogram(
                        &Key::from_static_parts(
                            "perishable_request_duration_seconds",
                            route_labels,
                        ),
                        &METADATA,
                    )
                    .record(elapsed.as_secs_f64());
            });
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

/// The metadata of the request metrics (what `metrics::counter!` would make).
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Every route label: each route's, then `other` (a request no route serves).
const ROUTES: [&str; Route::ALL.len() + 1] = {
    let mut labels = ["other"; Route::ALL.len() + 1];
    let mut i = 0;
    while i < Route::ALL.len() {
        labels[i] = Route::ALL[i].label();
        i += 1;
    }
    labels
};

/// Every status label.
const STATUSES: [&str; 21] = [
    "200", "204", "304", "400", "401", "403", "404", "405", "408", "413", "415", "429", "500",
    "502", "503", "504", "1xx", "2xx", "3xx", "4xx", "5xx",
];

/// `[route, status]` pairs, route-major, and `[route]` alone.
type LabelTable = (Box<[[Label; 2]]>, Box<[[Label; 1]]>);

/// The `[route, status]` and `[route]` labels of the request metrics, for every route and
/// status, made once: a key over static labels allocates nothing per request (the
/// `metrics::counter!` macro builds a vector of labels when their values are not literals).
static LABELS: LazyLock<LabelTable> = LazyLock::new(|| {
    let pairs = ROUTES
        .iter()
        .flat_map(|route| {
            STATUSES.iter().map(|status| {
                [
                    Label::from_static_parts("route", route),
                    Label::from_static_parts("status", status),
                ]
            })
        })
        .collect();
    let routes = ROUTES
        .iter()
        .map(|route| [Label::from_static_parts("route", route)])
        .collect();
    (pairs, routes)
});

/// The labels of `route` (one of [`route_label`]'s) and `status`.
fn labels(route: &str, status: u16) -> (&'static [Label], &'static [Label]) {
    let r = ROUTES
        .iter()
        .position(|r| *r == route)
        .unwrap_or(ROUTES.len() - 1);
    let s = status_index(status);
    let (pairs, routes) = &*LABELS;
    (&pairs[r * STATUSES.len() + s], &routes[r])
}

/// The status codes with a label of their own, in the order of [`STATUSES`]; every other
/// status is labelled by its class.
const EXACT_STATUSES: [u16; 16] = [
    200, 204, 304, 400, 401, 403, 404, 405, 408, 413, 415, 429, 500, 502, 503, 504,
];

/// Where `status`'s label is in [`STATUSES`].
fn status_index(status: u16) -> usize {
    match EXACT_STATUSES.iter().position(|code| *code == status) {
        Some(exact) => exact,
        None => EXACT_STATUSES.len() + usize::from(status.clamp(100, 599) / 100 - 1),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    #[test]
    fn every_route_and_status_has_its_labels() {
        let pairs = |labels: &[Label]| -> Vec<(String, String)> {
            labels
                .iter()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect()
        };
        for route in ROUTES {
            for (status, label) in [(200, "200"), (429, "429"), (418, "4xx"), (599, "5xx")] {
                let (both, alone) = labels(route, status);
                assert_eq!(
                    pairs(both),
                    [
                        ("route".to_owned(), route.to_owned()),
                        ("status".to_owned(), label.to_owned())
                    ]
                );
                assert_eq!(pairs(alone), [("route".to_owned(), route.to_owned())]);
            }
        }
        // Each exact code and each class lands on its own label.
        for (status, label) in [(100, "1xx"), (204, "204"), (299, "2xx"), (304, "304")]
            .into_iter()
            .chain([
                (307, "3xx"),
                (504, "504"),
                (505, "5xx"),
                (0, "1xx"),
                (999, "5xx"),
            ])
        {
            assert_eq!(STATUSES[status_index(status)], label, "{status}");
        }
        for (i, code) in EXACT_STATUSES.iter().enumerate() {
            assert_eq!(STATUSES[i], code.to_string());
        }
    }

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
