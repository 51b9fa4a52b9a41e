//! The response body of Perishable's services: a whole buffer, or an upstream stream.
//!
//! One concrete type (no boxing) so the upstream's chunks pass straight through: each frame the
//! upstream yields is handed to the server as is, never merged or held back.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::error::{Error, ErrorCode};
mod scrub;
mod upstream;

pub(crate) use scrub::{KeyMask, Scrub};
pub(crate) use upstream::UpstreamBody;
pub(crate) use upstream::{Accounting, Settle};

/// Errors a body can yield (only an upstream stream can fail).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A response body: empty, a whole buffer, or a streamed upstream response.
    #[derive(Debug)]
    pub struct Body {
        #[pin]
        kind: Kind,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind {
        Full { bytes: Option<Bytes> },
        Upstream { #[pin] body: UpstreamBody },
    }
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full { bytes: None },
        }
    }

    /// A whole buffer.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            kind: Kind::Full {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    pub(crate) fn upstream(body: UpstreamBody) -> Self {
        Self {
            kind: Kind::Upstream { body },
        }
    }
}

impl Default for Body {
    fn default() -> Self {
        Self::empty()
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Self::full(s)
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Self::full(Bytes::from_static(s.as_bytes()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            KindProj::Upstream { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { bytes } => bytes.is_none(),
            Kind::Upstream { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { bytes: None } => SizeHint::with_exact(0),
            Kind::Full { bytes: Some(b) } => SizeHint::with_exact(b.len() as u64),
            Kind::Upstream { body } => body.size_hint(),
        }
    }
}

/// Refuses a request whose body is encoded (`415 unsupported_media_type`; `what` names the
/// body): Perishable reads bodies as they arrive, and never forwards `Content-Encoding`, so an
/// encoded body would be read, or taken upstream, as something it is not.
pub(crate) fn refuse_encoded(headers: &http::HeaderMap, what: &str) -> Result<(), Error> {
    if headers.contains_key(http::header::CONTENT_ENCODING) {
        return Err(Error::new(
            ErrorCode::UnsupportedMediaType,
            format!("{what} must not have a Content-Encoding: send it uncompressed"),
        ));
    }
    Ok(())
}

/// Reads a request body of at most `limit` bytes within `deadline` (`server.body_timeout_ms`):
/// `413 body_too_large` past the limit, `408 body_timeout` past the deadline (`what` names the
/// body in the messages), `400 invalid_json` when it cannot be read. A body in one frame (the
/// common case) comes back without a copy.
///
/// The deadline covers the whole body, not each read: a client that trickles a byte every
/// second would otherwise hold a connection (and a task) forever.
pub(crate) async fn read_limited<B>(
    body: B,
    limit: usize,
    deadline: std::time::Duration,
    what: &str,
) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    let read = http_body_util::Limited::new(body, limit).collect();
    let Ok(result) = tokio::time::timeout(deadline, read).await else {
        return Err(Error::new(
            ErrorCode::BodyTimeout,
            format!("{what} did not arrive within {} ms", deadline.as_millis()),
        ));
    };
    match result {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::new(
            ErrorCode::BodyTooLarge,
            format!("{what} is over {limit} bytes"),
        )),
        Err(_) => Err(Error::new(
            ErrorCode::InvalidJson,
            "the request body could not be read",
        )),
    }
}
