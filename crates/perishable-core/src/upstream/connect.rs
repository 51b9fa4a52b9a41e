//! The upstream connections: hyper-rustls's connector, with the TLS state kept off the
//! connection when there is no TLS.
//!
//! hyper-rustls's `MaybeHttpsStream` holds a rustls connection inline: about 1.1 KiB, carried by
//! every pooled connection even to a cleartext upstream (a local Ollama or vLLM), where the
//! stream itself is 32 bytes. [`Connector`] hands the pool an [`UpstreamIo`] instead: the TCP
//! stream as is, or the TLS stream boxed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::BoxError;

type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;

/// One upstream connection: cleartext, or TLS (boxed: see the [module docs](self)).
#[derive(Debug)]
pub(crate) enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<Stream>),
}

impl From<Stream> for UpstreamIo {
    fn from(stream: Stream) -> Self {
        match stream {
            MaybeHttpsStream::Http(tcp) => Self::Plain(tcp),
            tls @ MaybeHttpsStream::Https(_) => Self::Tls(Box::new(tls)),
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(tcp) => tcp.connected(),
            Self::Tls(tls) => tls.connected(),
        }
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(tcp) => tcp.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// hyper-rustls's connector, handing out [`UpstreamIo`].
#[derive(Clone, Debug)]
pub(crate) struct Connector(pub(crate) HttpsConnector<HttpConnector>);

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(UpstreamIo::from) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cleartext_connection_carries_no_tls_state() {
        // The point of the type: a pooled cleartext connection stays small.
        assert!(std::mem::size_of::<UpstreamIo>() <= 64);
        assert!(std::mem::size_of::<Stream>() > 512);
    }
}
