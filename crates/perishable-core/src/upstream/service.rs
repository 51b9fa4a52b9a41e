//! [`UpstreamService`]: the forwarding Service itself; see the [module docs](super).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, FutureExt, TryFutureExt};
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;

use super::client::UpstreamClient;
use super::headers::UpstreamHeaders;
use super::request::{Endpoint, Metered, RequestPolicy};
use super::response::{Answered, client_response};
use crate::body::{Body, BoxError, KeyMask};
use crate::budget::{Admitted, Budget};
use crate::client_ip::ClientIpResolver;
use crate::config::{Config, ConfigError};
use crate::dpop::DeferredReplay;
use crate::error::{Chain, Error, ErrorCode};
use crate::header_rules::{forwarded_header_name, static_header};
use crate::path::AllowList;
use crate::rate_limit::Deferred;
use crate::store::{MemoryStore, Store};
use crate::token::VerifiedSession;

/// Forwards requests to the upstream; see the [module docs](super).
#[derive(Clone, Debug)]
pub struct UpstreamService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: UpstreamClient,
    /// `upstream.base_url` (normalized by the config); each request appends `/{path}?{query}`.
    base_url: String,
    /// Where `{path}` starts in the path of an upstream URI.
    path_start: usize,
    /// What the proxy sends upstream of its own, and which client headers it forwards.
    headers: UpstreamHeaders,
    allow_list: AllowList,
    /// Whether a cost gate applies (a budget, the completion or stream cap, a model
    /// allow-list): then every call's body is read by the request model.
    metered: bool,
    policy: RequestPolicy,
    max_body_bytes: usize,
    body_timeout: Duration,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    /// The server's key, masked in whatever the upstream sends back.
    key_mask: Option<KeyMask>,
    budget: Budget,
    /// Which IP a call counts against for the per-IP budget.
    client_ip: ClientIpResolver,
}

impl UpstreamService {
    /// A service for the `[upstream]` and `[budget]` sections of `config`, with its own
    /// connection pool, keeping budget state in its own memory store.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        Self::with_store(config, Arc::new(MemoryStore::new()))
    }

    /// Like [`new`](Self::new), keeping budget and stream-cap state in `store`.
    pub fn with_store(config: &Config, store: Arc<dyn Store>) -> Result<Self, ConfigError> {
        Self::with_client(config, UpstreamClient::new(config)?, store)
    }

    /// A service that sends through `client` (to share one pool across services, or to trust
    /// your own certificates: see [`UpstreamClient::with_tls_config`]).
    pub fn with_client(
        config: &Config,
        client: UpstreamClient,
        store: Arc<dyn Store>,
    ) -> Result<Self, ConfigError> {
        let u = config.upstream();
        let authorization = match u.api_key.as_ref().filter(|k| !k.expose().is_empty()) {
            None => {
                tracing::info!(
                    upstream = %config.upstream_base_url(),
                    "no upstream key: calls are forwarded without Authorization (a keyless upstream)"
                );
                None
            }
            Some(key) => {
                let mut value =
                    HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| {
                        ConfigError::Invalid {
                            key: "upstream.api_key",
                            reason: "contains characters not allowed in a header".to_owned(),
                        }
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let invalid = |key: &'static str| move |reason| ConfigError::Invalid { key, reason };
        let allow_list =
            AllowList::new(&u.allowed_paths).map_err(invalid("upstream.allowed_paths"))?;
        let forward = u
            .forward_headers
            .iter()
            .map(|name| forwarded_header_name(name))
            .collect::<Result<_, _>>()
            .map_err(invalid("upstream.forward_headers"))?;
        let fixed = u
            .headers
            .iter()
            .map(|(name, value)| static_header(name, value))
            .collect::<Result<_, _>>()
            .map_err(invalid("upstream.headers"))?;
        let base = http::Uri::try_from(config.upstream_base_url()).ok();
        let host = base
            .as_ref()
            .filter(|base| base.scheme() == Some(&http::uri::Scheme::HTTP))
            .and_then(|base| {
                let host = base.host()?;
                let value = match base.port_u16() {
                    Some(port) if port != 80 => format!("{host}:{port}"),
                    _ => host.to_owned(),
                };
                HeaderValue::try_from(value).ok()
            });
        let path_start = base
            .as_ref()
            .map_or(0, |base| base.path().trim_end_matches('/').len())
            + 1;
        let budget = Budget::new(
            config.budget().clone(),
            store,
            config.store().on_unavailable,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                base_url: config.upstream_base_url().to_owned(),
                path_start,
                headers: UpstreamHeaders {
                    authorization,
                    host,
                    forward,
                    fixed,
                },
                allow_list,
                metered: budget.meters() || !u.allowed_models.is_empty(),
                policy: RequestPolicy::new(u.allowed_models.clone(), config.budget()),
                max_body_bytes: u.max_body_bytes,
                body_timeout: Duration::from_millis(config.server().body_timeout_ms),
                first_byte_timeout: Duration::from_millis(u.first_byte_timeout_ms),
                idle_timeout: Duration::from_millis(u.idle_timeout_ms),
                key_mask: u
                    .api_key
                    .as_ref()
                    .and_then(|key| KeyMask::new(key.expose().as_bytes())),
                budget,
                client_ip: ClientIpResolver::new(config.server().trusted_proxies.clone()),
            }),
        })
    }
}

impl UpstreamService {
    /// What the Realtime route shares with this service: the connection pool, the headers it
    /// sends upstream, the budget, the mask of the server's key.
    pub(crate) fn realtime_parts(
        &self,
    ) -> (UpstreamClient, UpstreamHeaders, Budget, Option<KeyMask>) {
        let inner = &self.inner;
        (
            inner.client.clone(),
            inner.headers.clone(),
            inner.budget.clone(),
            inner.key_mask.clone(),
        )
    }
}

impl<B> tower::Service<Request<B>> for UpstreamService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        // Shared, not copied (claims behind an `Arc`).
        let session = req.extensions().get::<VerifiedSession>().cloned();
        let session_id = session.as_ref().map(|s| s.claims.clone());
        // Combinators, not an async block: the read and send steps then share the box's
        // space, which keeps this per-request allocation small.
        // A rate-limit count left to this call (`Perishable::proxy_rate_limit_layer`): made with
        // the admission, or on its own for a call refused before it.
        let mut deferred = req.extensions_mut().remove::<Deferred>();
        // Likewise a DPoP proof's replay record (`Perishable::proxy_verify_layer`): made with
        // the admission, before anything is forwarded.
        let replay = req.extensions_mut().remove::<DeferredReplay>();
        let forward = match Inner::start(&inner, req, session, &mut deferred, replay) {
            Ok(read) => Either::Left(read.and_then(move |prepared| inner.send(prepared))),
            Err(error) => {
                if let Some(deferred) = deferred {
                    deferred.count_anyway();
                }
                Either::Right(std::future::ready(Err(error)))
            }
        };
        UpstreamFuture::new(Box::pin(forward.map(move |result| {
            Ok(match result {
                Ok(response) => response,
                Err(error) => match session_id {
                    Some(claims) => error.with_session(claims.jti.clone()),
                    None => error,
                }
                .into_response(),
            })
        })))
    }
}

crate::macros::opaque_future! {
    /// The response future of [`UpstreamService`]: the upstream's response, or a refusal.
    pub type UpstreamFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;
}

/// The `{path}` to forward: what follows the first `/openai/` in the URI (the service serves `/openai/*` itself, at the root or under a prefix a
/// router left in the path); else the whole path, as a router that strips its mount point leaves
/// it (`nest_service("/openai", upstream)` in axum sees `/chat/completions`).
pub(crate) fn upstream_path<B>(req: &Request<B>) -> &str {
    const PREFIX: &str = crate::route::PROXY_PREFIX;
    let path = req.uri().path();
    match path.strip_prefix(PREFIX) {
        Some(rest) => rest,
        None => match memchr::memmem::find(path.as_bytes(), PREFIX.as_bytes()) {
            Some(i) => &path[i + PREFIX.len()..],
            None => path.trim_start_matches('/'),
        },
    }
}

/// Who a call is from, for its admission: its session, its IP (when metered) and the
/// rate-limit count left to it.
struct Caller {
    session: Option<VerifiedSession>,
    ip: Option<std::net::IpAddr>,
    deferred: Option<Deferred>,
    replay: Option<DeferredReplay>,
}

/// A request checked, read and admitted, ready to go upstream.
struct Prepared {
    request: Request<Full<Bytes>>,
    hide_usage: bool,
    admitted: Admitted,
}

impl Inner {
    /// The checks that need no I/O, then a future that reads the body and takes the budget's
    /// admission. It owns what it needs (not the whole request), so it stays small.
    fn start<B>(
        this: &Arc<Self>,
        req: Request<B>,
        session: Option<VerifiedSession>,
        deferred: &mut Option<Deferred>,
        replay: Option<DeferredReplay>,
    ) -> Result<impl Future<Output = Result<Prepared, Error>> + Send + 'static, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let path = upstream_path(&req);
        if !this.allow_list.allows(req.method(), path) {
            return Err(Error::new(
                ErrorCode::PathNotAllowed,
                format!(
                    "{} on the path {path:?} is not allowed through this proxy (the upstream \
                     service forwards what follows /openai/ in the request path, or the whole \
                     path where a router stripped its mount point, as axum's nest_service does)",
                    req.method()
                ),
            ));
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > this.max_body_bytes as u64) {
            return Err(Error::new(
                ErrorCode::BodyTooLarge,
                format!("the request body is over {} bytes", this.max_body_bytes),
            ));
        }
        // A WebRTC client secret is always read: its life is capped to the session's.
        let metered = this.metered || Endpoint::of(path) == Endpoint::ClientSecrets;
        if metered {
            this.policy.check_head(req.method(), req.headers())?;
        } else {
            // `Content-Encoding` is never sent upstream (nor can it be listed in
            // `upstream.forward_headers`): the upstream would take the encoded bytes for the body.
            crate::body::refuse_encoded(req.headers(), "a request body")?;
        }
        let uri = this.upstream_uri(path, req.uri().query())?;
        let ip = if metered {
            this.client_ip.resolve(&req)
        } else {
            None
        };
        let (parts, body) = req.into_parts();
        let http::request::Parts {
            method, headers, ..
        } = parts;
        Ok(this.clone().read_and_admit(
            method,
            uri,
            headers,
            Caller {
                session,
                ip,
                deferred: deferred.take(),
                replay,
            },
            body,
        ))
    }

    /// The `{path}` part of an upstream URI made by [`upstream_uri`](Self::upstream_uri).
    fn path_of<'u>(&self, uri: &'u http::Uri) -> &'u str {
        uri.path().get(self.path_start..).unwrap_or_default()
    }

    async fn read_and_admit<B>(
        self: Arc<Self>,
        method: http::Method,
        uri: http::Uri,
        mut headers: http::HeaderMap,
        caller: Caller,
        body: B,
    ) -> Result<Prepared, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Caller {
            session,
            ip,
            deferred,
            replay,
        } = caller;
        // A call refused before its admission is still counted.
        let counted = |error: Error, deferred: Option<Deferred>| {
            if let Some(deferred) = deferred {
                deferred.count_anyway();
            }
            error
        };
        // Boxed: a sub-future held inline would make every request's future larger.
        let body = match Box::pin(crate::body::read_limited(
            body,
            self.max_body_bytes,
            self.body_timeout,
            "the request body",
        ))
        .await
        {
            Ok(body) => body,
            Err(error) => return Err(counted(error, deferred)),
        };

        let endpoint = Endpoint::of(self.path_of(&uri));
        let metering = self.metered || endpoint == Endpoint::ClientSecrets;
        let metered = if metering {
            let remaining = session
                .as_ref()
                .map(|s| s.claims.exp.saturating_sub(crate::clock::unix_now()));
            let tier = session.as_ref().and_then(|s| s.claims.tier.as_deref());
            match self
                .policy
                .meter_for(tier, endpoint, &method, &headers, body, remaining)
            {
                Ok(metered) => metered,
                Err(error) => return Err(counted(error, deferred)),
            }
        } else {
            Metered {
                body,
                ..Metered::default()
            }
        };
        // One store call: the deferred count, the stream slot and the reservation.
        let admitted = if metering || deferred.is_some() || replay.is_some() {
            Box::pin(self.budget.admit_counted(
                session.as_ref(),
                ip,
                metered.streaming,
                metered.reserve,
                deferred,
                replay,
            ))
            .await?
        } else {
            Admitted::default()
        };
        let Metered {
            body, hide_usage, ..
        } = metered;
        let headers = self.headers.prepare(&mut headers, body.len());
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(Prepared {
            request,
            hide_usage,
            admitted,
        })
    }

    async fn send(self: Arc<Self>, prepared: Prepared) -> Result<Response<Body>, Error> {
        let Prepared {
            request: upstream_req,
            hide_usage,
            admitted,
        } = prepared;
        // For the logs (a clone shares the URI's bytes).
        let uri = upstream_req.uri().clone();
        let path = self.path_of(&uri);
        let started = tokio::time::Instant::now();
        let response = match tokio::time::timeout(
            self.first_byte_timeout,
            self.client.request(upstream_req),
        )
        .await
        {
            Err(_) => {
                tracing::warn!(
                    path = %path,
                    first_byte_timeout_ms = self.first_byte_timeout.as_millis() as u64,
                    "the upstream did not answer in time"
                );
                // Nothing was spent: give back the reservation and the stream slot.
                self.budget.release(admitted);
                return Err(Error::new(
                    ErrorCode::UpstreamTimeout,
                    "the upstream did not answer in time",
                ));
            }
            Ok(Err(e)) => {
                tracing::warn!(path = %path, error = %Chain(&e), "the upstream could not be reached");
                self.budget.release(admitted);
                return Err(Error::new(
                    ErrorCode::UpstreamUnavailable,
                    "the upstream could not be reached",
                ));
            }
            Ok(Ok(response)) => response,
        };
        let first_byte = started.elapsed();
        let status = response.status();
        metrics::histogram!("perishable_upstream_first_byte_seconds")
            .record(first_byte.as_secs_f64());
        let span = tracing::Span::current();
        span.record("upstream_status", status.as_u16());
        span.record("upstream_first_byte_us", first_byte.as_micros() as u64);
        tracing::debug!(
            path = %path,
            status = status.as_u16(),
            first_byte_us = first_byte.as_micros() as u64,
            "upstream answered"
        );

        Ok(client_response(
            response,
            Answered {
                path,
                hide_usage,
                budget: self.budget.clone(),
                admitted,
                started,
                idle_timeout: self.idle_timeout,
                key_mask: self.key_mask.clone(),
            },
        ))
    }

    /// `{base_url}/{path}?{query}`. `path` comes from a request URI, so it is already valid in
    /// one; should it not be, `403 path_not_allowed`.
    fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<http::Uri, Error> {
        let mut uri = String::with_capacity(
            self.base_url.len() + 1 + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        uri.push_str(&self.base_url);
        uri.push('/');
        uri.push_str(path);
        if let Some(query) = query {
            uri.push('?');
            uri.push_str(query);
        }
        http::Uri::try_from(uri).map_err(|_| {
            Error::new(
                ErrorCode::PathNotAllowed,
                "the path is not a valid URL path",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::stream;
    use http::StatusCode;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::Body;

    /// An address nothing listens on: bound, then released.
    fn closed_base_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("http://127.0.0.1:{port}/v1")
    }

    /// The base of every test config: an upstream that refuses connections, so a request the
    /// service failed to refuse shows up as `502 upstream_unavailable`, never on the network.
    fn builder() -> crate::ConfigBuilder {
        Config::builder()
            .upstream_api_key("sk-test")
            .upstream_base_url(closed_base_url())
            .upstream_connect_timeout_ms(2_000)
    }

    fn service(builder: crate::ConfigBuilder) -> UpstreamService {
        UpstreamService::new(&builder.build().unwrap()).unwrap()
    }

    /// Sends `req` (with a deadline, so a regression cannot hang the suite); returns status
    /// and error code.
    async fn send<B>(svc: UpstreamService, req: Request<B>) -> (StatusCode, String, String)
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let svc = ServiceBuilder::new().service(svc);
        let response = tokio::time::timeout(Duration::from_secs(10), svc.oneshot(req))
            .await
            .expect("the service answers")
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        (
            status,
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            body["error"]["type"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }

    fn post(path: &str, body: &'static str) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    }

    fn chunks(
        parts: Vec<&'static str>,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
        StreamBody::new(stream::iter(
            parts
                .into_iter()
                .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))),
        ))
    }

    #[tokio::test]
    async fn a_disallowed_path_is_refused() {
        let svc = service(builder());
        for path in [
            "/openai/files",
            "/openai/fine_tuning/jobs",
            "/openai/organization/users",
            "/openai/",
            "/elsewhere",
        ] {
            let got = send(svc.clone(), post(path, "{}")).await;
            assert_eq!(
                got,
                (
                    StatusCode::FORBIDDEN,
                    "path_not_allowed".to_owned(),
                    "permission_error".to_owned()
                ),
                "{path}"
            );
        }
    }

    /// Mounted where a router stripped the mount point (axum's `nest_service("/openai", ..)`):
    /// the whole path is the upstream path.
    #[tokio::test]
    async fn a_stripped_mount_point_leaves_the_upstream_path() {
        let svc = service(builder());
        for (method, path) in [
            (http::Method::POST, "/chat/completions"),
            (http::Method::GET, "/models"),
            (http::Method::GET, "/ai/openai/models"),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let (status, code, _) = send(svc.clone(), req).await;
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
                "{path} passes the allow-list"
            );
        }
        let req = Request::get("/files").body(Body::empty()).unwrap();
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("nest_service"),
            "the refusal says how to mount: {text}"
        );
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_without_reading() {
        let svc = service(builder().upstream_max_body_bytes(16));
        let req = Request::post("/openai/chat/completions")
            .header(header::CONTENT_LENGTH, "17")
            .body(Body::from("{\"model\":\"x1234\"}"))
            .unwrap();
        let (status, code, kind) = send(svc.clone(), req).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(code, "body_too_large");
        assert_eq!(kind, "invalid_request_error");

        // A body that never ends: the Content-Length alone decides.
        let never = StreamBody::new(stream::pending::<Result<Frame<Bytes>, Infallible>>());
        let req = Request::post("/openai/chat/completions")
            .header(header::CONTENT_LENGTH, "1000000")
            .body(never)
            .unwrap();
        let (status, code, _) = send(svc, req).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
        );
    }

    #[tokio::test]
    async fn a_body_of_unknown_size_over_the_limit_is_refused() {
        let svc = service(builder().upstream_max_body_bytes(16));
        let req = Request::post("/openai/chat/completions")
            .body(chunks(vec!["{\"mo", "del\":", "\"gpt-", "4o\"}  "]))
            .unwrap();
        assert!(req.headers().get(header::CONTENT_LENGTH).is_none());
        let (status, code, _) = send(svc.clone(), req).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
        );

        // A body that lies about its length (declares less than it sends) is still cut off.
        let req = Request::post("/openai/chat/completions")
            .header(header::CONTENT_LENGTH, "4")
            .body(chunks(vec!["{}  ", "                 "]))
            .unwrap();
        let (status, code, _) = send(svc, req).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
        );
    }

    #[tokio::test]
    async fn a_body_at_the_limit_passes() {
        let svc = service(builder().upstream_max_body_bytes(16));
        let req = Request::post("/openai/chat/completions")
            .body(chunks(vec!["{\"a\":", "\"0123456\"}"]))
            .unwrap();
        let (status, code, _) = send(svc, req).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_GATEWAY, "upstream_unavailable")
        );
    }

    #[tokio::test]
    async fn a_model_off_the_allow_list_is_refused() {
        let svc = service(builder().upstream_allowed_models(["gpt-4o-mini"]));
        for body in [
            r#"{"model":"gpt-4o","messages":[]}"#,
            r#"{"model":"gpt-4o-mini-2","messages":[]}"#,
            r#"{"messages":[]}"#,
            r#"{"model":null}"#,
        ] {
            let got = send(svc.clone(), post("/openai/chat/completions", body)).await;
            assert_eq!(
                got,
                (
                    StatusCode::FORBIDDEN,
                    "model_not_allowed".to_owned(),
                    "permission_error".to_owned()
                ),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn an_allowed_model_passes_the_check() {
        let svc = service(builder().upstream_allowed_models(["gpt-4o-mini"]));
        for body in [
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
            // An escaped name is the same name.
            r#"{"model":"gpt\u002d4o-mini","messages":[]}"#,
        ] {
            let got = send(svc.clone(), post("/openai/chat/completions", body)).await;
            assert_eq!(
                (got.0, got.1.as_str()),
                (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn duplicate_or_unreadable_model_fields_are_invalid_json() {
        let svc = service(builder().upstream_allowed_models(["gpt-4o-mini"]));
        for body in [
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o","model":"gpt-4o-mini"}"#,
            r#"{"model":"gpt-4o-mini""#,
            r#"{"model":["gpt-4o-mini"]}"#,
        ] {
            let got = send(svc.clone(), post("/openai/chat/completions", body)).await;
            let code = if body.contains('[') && !body.starts_with('[') {
                "invalid_parameter"
            } else {
                "invalid_json"
            };
            assert_eq!(
                got,
                (
                    StatusCode::BAD_REQUEST,
                    code.to_owned(),
                    "invalid_request_error".to_owned()
                ),
                "{body}"
            );
        }
    }

    /// serde lets a struct deserialize from a JSON array (`[model, stream]`), so an array body
    /// naming an allowed model passes the check and is forwarded, though the protocol and the
    /// refusal message ask for a JSON object.
    #[tokio::test]
    async fn an_array_body_is_not_an_object_naming_a_model() {
        let svc = service(builder().upstream_allowed_models(["gpt-4o-mini"]));
        for body in [r#"["gpt-4o-mini"]"#, r#"["gpt-4o-mini",true]"#] {
            let got = send(svc.clone(), post("/openai/chat/completions", body)).await;
            assert_eq!(
                (got.0, got.1.as_str()),
                (StatusCode::BAD_REQUEST, "invalid_json"),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_502() {
        let svc = service(builder());
        let req = Request::get("/openai/models").body(Body::empty()).unwrap();
        let got = send(svc, req).await;
        assert_eq!(
            got,
            (
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable".to_owned(),
                "upstream_error".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn a_refusal_names_the_verified_session() {
        let svc = service(builder());
        let mut req = post("/openai/files", "{}");
        req.extensions_mut().insert(VerifiedSession {
            claims: std::sync::Arc::new(crate::token::Claims {
                iss: "perishable".to_owned(),
                aud: "perishable".to_owned(),
                jti: "session-1".to_owned(),
                iat: 0,
                nbf: 0,
                exp: u64::MAX,
                auth_time: 0,
                fp: "fp".to_owned(),
                ua: None,
                cnf: None,
                usr: None,
                tier: None,
            }),
        });
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let refusal = response
            .extensions()
            .get::<crate::error::Refusal>()
            .unwrap();
        assert_eq!(refusal.code, ErrorCode::PathNotAllowed);
        assert_eq!(refusal.session_id.as_deref(), Some("session-1"));
    }
}
#[cfg(test)]
mod future_size {
    use super::*;
    use http_body_util::BodyExt;

    /// Every proxied request boxes this future once. Kept under 1 KiB, the allocation stays in
    /// glibc's per-thread cache; past it, each request takes malloc's slow path (and consolidates
    /// the free lists), which showed up in the load harness's profile.
    #[tokio::test]
    async fn the_per_request_future_stays_under_1_kib() {
        let config = Config::builder().upstream_api_key("sk").build().unwrap();
        let svc = UpstreamService::new(&config).unwrap();
        let body = http_body_util::Empty::<Bytes>::new()
            .map_err(|e| -> BoxError { match e {} })
            .boxed_unsync();
        let req = Request::post("/openai/chat/completions")
            .body(body)
            .unwrap();
        let read = Inner::start(&svc.inner, req, None, &mut None, None)
            .ok()
            .unwrap();
        let inner = svc.inner.clone();
        let forward = read.and_then(move |prepared| inner.send(prepared));
        let size = std::mem::size_of_val(&forward);
        assert!(size <= 1000, "the per-request future is {size} bytes");
    }
}
