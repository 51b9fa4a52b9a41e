//! The HTTP client of the gates that ask a provider (the OIDC issuer's keys, the captcha's
//! siteverify): pooled, over rustls with the platform verifier, no redirects, every exchange
//! within a deadline and a size limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::ConfigError;
use crate::error::Chain;

/// How long an idle connection to a provider stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// A pooled HTTP/1.1 + h2 client over rustls (platform verifier), like the upstream client.
pub(super) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client whose connects give up after `connect_timeout`. It follows no redirects.
pub(super) fn http_client(connect_timeout: Duration) -> Result<HttpClient, ConfigError> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .and_then(rustls_platform_verifier::BuilderVerifierExt::with_platform_verifier)
        .map_err(|e| ConfigError::invalid("gate", format!("cannot set up TLS: {e}")))?
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false);
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// A response read in full.
pub(super) struct HttpReply {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

/// Why an exchange failed (never carries request or response bodies).
#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Request(String),
    #[error("response body unreadable or too large: {0}")]
    Body(String),
}

/// Sends `request` and reads the response, all within `timeout`, the body up to `max_body`.
pub(super) async fn send(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
) -> Result<HttpReply, HttpError> {
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| HttpError::Request(Chain(&e).to_string()))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| HttpError::Body(e.to_string()))?
            .to_bytes();
        Ok(HttpReply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

/// `raw` as a request URI: `https`, or `http` to a loopback host (`localhost`, `127.0.0.0/8`,
/// `::1`); no credentials in it. `key` names the setting in the error.
pub(super) fn endpoint(key: &'static str, raw: &str) -> Result<Uri, ConfigError> {
    let url =
        url::Url::parse(raw).map_err(|e| ConfigError::invalid(key, format!("not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::invalid(
            key,
            "credentials in the URL are not accepted",
        ));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => {}
        "http" if loopback => {}
        _ => {
            return Err(ConfigError::invalid(
                key,
                format!("{raw:?} must be an https URL (http only to a loopback host)"),
            ));
        }
    }
    let mut url = url;
    url.set_fragment(None);
    url.as_str()
        .parse::<Uri>()
        .map_err(|e| ConfigError::invalid(key, format!("not a request URI: {e}")))
}

/// A minimal HTTP/1.1 server for the gates' tests: one request per connection.
#[cfg(test)]
pub(super) mod test_http {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// A request as received.
    #[derive(Debug, Clone)]
    pub(crate) struct Received {
        pub(crate) method: String,
        pub(crate) path: String,
        pub(crate) headers: Vec<(String, String)>,
        pub(crate) body: Vec<u8>,
    }

    impl Received {
        pub(crate) fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// What to answer.
    pub(crate) enum Reply {
        /// A status, extra headers and a body.
        Send(u16, Vec<(String, String)>, Vec<u8>),
        /// Keep the connection open and never answer.
        Hang,
    }

    impl Reply {
        pub(crate) fn json(status: u16, body: &serde_json::Value) -> Self {
            Self::Send(
                status,
                vec![("content-type".into(), "application/json".into())],
                body.to_string().into_bytes(),
            )
        }
    }

    /// Serves `handler` on a fresh 127.0.0.1 port until the runtime ends.
    pub(crate) async fn serve<F>(handler: F) -> SocketAddr
    where
        F: Fn(Received) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    match handler(request) {
                        Reply::Hang => std::future::pending::<()>().await,
                        Reply::Send(status, headers, body) => {
                            let mut head = format!(
                                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                                body.len()
                            );
                            for (name, value) in headers {
                                head.push_str(&format!("{name}: {value}\r\n"));
                            }
                            head.push_str("\r\n");
                            let _ = stream.write_all(head.as_bytes()).await;
                            let _ = stream.write_all(&body).await;
                            let _ = stream.shutdown().await;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Received> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..end].to_vec()).ok()?;
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_owned();
        let path = first.next()?.to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = buf[end + 4..].to_vec();
        while body.len() < length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Received {
            method,
            path,
            headers,
            body,
        })
    }
}
