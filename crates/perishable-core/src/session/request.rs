//! What a request presents: the token and its scheme in `Authorization`, the one `DPoP`
//! header, and the URL a DPoP proof must name (`htu`).

use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request};

use crate::dpop::{DPOP_HEADER, Htu, OriginalUri};
use crate::error::{Error, ErrorCode};

/// How the token was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scheme {
    Bearer,
    Dpop,
}

/// The URL a DPoP proof for `req` must name; see [`crate::dpop`]: `public_url` (the router's
/// public URL, without a trailing slash) and the request path when it is set, else the
/// request's host and its original path (before any `nest` stripped a prefix).
pub(super) fn expected_htu<B>(
    public_url: Option<&str>,
    req: &Request<B>,
) -> Result<ExpectedHtu, Error> {
    if let Some(base) = public_url {
        return Ok(ExpectedHtu::Exact(format!("{base}{}", req.uri().path())));
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .ok_or_else(|| {
            Error::new(
                ErrorCode::InvalidDpopProof,
                "the request has no Host header to check the DPoP proof's htu against",
            )
        })?;
    let path = match req.extensions().get::<OriginalUri>() {
        Some(OriginalUri(uri)) => uri.path().to_owned(),
        None => req.uri().path().to_owned(),
    };
    Ok(ExpectedHtu::HostAndPath { host, path })
}

/// An owned expected `htu`, borrowed as [`Htu`].
pub(super) enum ExpectedHtu {
    Exact(String),
    HostAndPath { host: String, path: String },
}

impl ExpectedHtu {
    pub(super) fn as_htu(&self) -> Htu<'_> {
        match self {
            Self::Exact(url) => Htu::Exact(url),
            Self::HostAndPath { host, path } => Htu::HostAndPath { host, path },
        }
    }
}

/// The one value of header `name`, if any; `Err(())` when it comes more than once: which one a
/// proxy in front read is anyone's guess, so neither is used.
pub(super) fn at_most_one<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    match values.next() {
        Some(_) => Err(()),
        None => Ok(first),
    }
}

/// The one `DPoP` header, if any (several are refused).
pub(super) fn single_dpop_header(headers: &HeaderMap) -> Result<Option<&str>, Error> {
    let Some(value) = at_most_one(headers, &DPOP_HEADER)
        .map_err(|()| Error::new(ErrorCode::InvalidDpopProof, "send exactly one DPoP header"))?
    else {
        return Ok(None);
    };
    value
        .to_str()
        .map(Some)
        .map_err(|_| Error::new(ErrorCode::InvalidDpopProof, "the DPoP header is malformed"))
}

/// Whether `Authorization` presents a token with the `DPoP` scheme (a refusal then challenges
/// in that scheme, even when it refuses the header).
pub(super) fn presents_dpop_scheme(headers: &HeaderMap) -> bool {
    headers
        .get(AUTHORIZATION)
        .is_some_and(|value| matches!(scheme_and_token(value.as_bytes()), Ok((Scheme::Dpop, _))))
}

fn missing_token() -> Error {
    Error::new(
        ErrorCode::MissingToken,
        "a session token is required: Authorization: Bearer <token>",
    )
}

/// The scheme and token of `Authorization: Bearer <token>` or `Authorization: DPoP <token>`.
/// The token stays bytes: the verified-token cache is looked up with them, and only a token not
/// seen before is checked as text (by [`TokenCodec`](crate::token::TokenCodec)).
pub(super) fn presented_token(headers: &HeaderMap) -> Result<(Scheme, &[u8]), Error> {
    let value = at_most_one(headers, &AUTHORIZATION)
        .map_err(|()| {
            Error::new(
                ErrorCode::InvalidToken,
                "send one Authorization header, not several",
            )
        })?
        .ok_or_else(missing_token)?;
    scheme_and_token(value.as_bytes())
}

/// One `Authorization` value, split into its scheme and its token.
fn scheme_and_token(value: &[u8]) -> Result<(Scheme, &[u8]), Error> {
    let malformed = || {
        Error::new(
            ErrorCode::InvalidToken,
            "the Authorization header is malformed",
        )
    };
    // Split at the first space; only the token must be text (the scheme is compared as bytes).
    let space = memchr::memchr(b' ', value).ok_or_else(malformed)?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    let scheme = if scheme.eq_ignore_ascii_case(b"bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case(b"dpop") {
        Scheme::Dpop
    } else {
        return Err(Error::new(
            ErrorCode::InvalidToken,
            "the Authorization scheme must be Bearer or DPoP",
        ));
    };
    let token = token.trim_ascii();
    if token.is_empty() {
        return Err(missing_token());
    }
    Ok((scheme, token))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn token(value: &[u8]) -> Result<(Scheme, Vec<u8>), ErrorCode> {
        presented_token(&headers(&[("authorization", value)]))
            .map(|(scheme, token)| (scheme, token.to_vec()))
            .map_err(|e| e.code())
    }

    #[test]
    fn the_authorization_scheme_and_token_are_read() {
        assert_eq!(token(b"Bearer abc"), Ok((Scheme::Bearer, b"abc".to_vec())));
        // Schemes are case-insensitive; the token is trimmed, and may hold spaces no further.
        assert_eq!(token(b"bEaReR abc"), Ok((Scheme::Bearer, b"abc".to_vec())));
        assert_eq!(token(b"DPoP abc"), Ok((Scheme::Dpop, b"abc".to_vec())));
        assert_eq!(token(b"dpop  abc  "), Ok((Scheme::Dpop, b"abc".to_vec())));
        // The token stays bytes: only a token not seen before is checked as text.
        assert_eq!(
            token(b"Bearer \xfftok"),
            Ok((Scheme::Bearer, b"\xfftok".to_vec()))
        );
    }

    #[test]
    fn a_missing_or_malformed_authorization_is_refused() {
        assert_eq!(
            presented_token(&HeaderMap::new()).unwrap_err().code(),
            ErrorCode::MissingToken
        );
        assert_eq!(token(b"Bearer"), Err(ErrorCode::InvalidToken));
        assert_eq!(token(b"Bearer "), Err(ErrorCode::MissingToken));
        assert_eq!(token(b"Bearer    "), Err(ErrorCode::MissingToken));
        assert_eq!(token(b"Basic dXNlcjpwYXNz"), Err(ErrorCode::InvalidToken));
        assert_eq!(token(b"Bearerabc def"), Err(ErrorCode::InvalidToken));
        // Two headers, even the same one twice: refused.
        let mut twice = HeaderMap::new();
        twice.append(AUTHORIZATION, http::HeaderValue::from_static("Bearer abc"));
        twice.append(AUTHORIZATION, http::HeaderValue::from_static("Bearer abc"));
        assert_eq!(
            presented_token(&twice).unwrap_err().code(),
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn exactly_one_dpop_header_is_taken() {
        assert_eq!(single_dpop_header(&HeaderMap::new()).unwrap(), None);
        let one = headers(&[("dpop", b"proof")]);
        assert_eq!(single_dpop_header(&one).unwrap(), Some("proof"));
        let two = headers(&[("dpop", b"a"), ("dpop", b"b")]);
        assert_eq!(
            single_dpop_header(&two).unwrap_err().code(),
            ErrorCode::InvalidDpopProof
        );
        let binary = headers(&[("dpop", b"\xff")]);
        assert_eq!(
            single_dpop_header(&binary).unwrap_err().code(),
            ErrorCode::InvalidDpopProof
        );
    }

    fn htu(public_url: Option<&str>, req: &Request<()>) -> Result<String, ErrorCode> {
        let expected = expected_htu(public_url, req).map_err(|e| e.code())?;
        Ok(match expected.as_htu() {
            Htu::Exact(url) => format!("exact {url}"),
            Htu::HostAndPath { host, path } => format!("{host} {path}"),
        })
    }

    #[test]
    fn htu_is_the_public_url_and_the_path_when_set() {
        let req = Request::post("/session")
            .header(HOST, "internal:8080")
            .body(())
            .unwrap();
        assert_eq!(
            htu(Some("https://api.example.com/ai"), &req),
            Ok("exact https://api.example.com/ai/session".to_owned())
        );
    }

    #[test]
    fn htu_is_the_host_and_the_original_path_otherwise() {
        // The Host header, and the path as the router saw it.
        let req = Request::post("/session")
            .header(HOST, "app.example.com:8443")
            .body(())
            .unwrap();
        assert_eq!(
            htu(None, &req),
            Ok("app.example.com:8443 /session".to_owned())
        );
        // An absolute URI's authority wins over Host.
        let req = Request::post("http://proxy.example.com/session")
            .header(HOST, "other")
            .body(())
            .unwrap();
        assert_eq!(htu(None, &req), Ok("proxy.example.com /session".to_owned()));
        // Under a `nest`, the original URI keeps the prefix the router stripped.
        let mut req = Request::post("/session")
            .header(HOST, "app.example.com")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(OriginalUri("/ai/session".parse().unwrap()));
        assert_eq!(
            htu(None, &req),
            Ok("app.example.com /ai/session".to_owned())
        );
        // No host at all: the proof cannot be checked.
        let req = Request::post("/session").body(()).unwrap();
        assert_eq!(htu(None, &req), Err(ErrorCode::InvalidDpopProof));
    }
}
