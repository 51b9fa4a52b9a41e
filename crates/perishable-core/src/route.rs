//! The route table of the wire protocol (`docs/protocol.md`, "Routes"): one list that the axum
//! router, its dispatch, the session Service, the metrics labels and the upstream Service all
//! read.
//!
//! Paths are relative to the mount point: under `Router::nest("/ai", ...)` a request to
//! `/ai/session` is routed as `/session` (axum strips the prefix first).

use http::Method;

/// One route of the protocol.
///
/// ```
/// use http::Method;
/// use perishable_core::Route;
///
/// assert_eq!(Route::of(&Method::POST, "/session"), Some(Route::Mint));
/// assert_eq!(Route::of(&Method::DELETE, "/session"), Some(Route::Revoke));
/// assert_eq!(Route::of(&Method::GET, "/openai/models"), Some(Route::Proxy));
/// assert_eq!(Route::of(&Method::GET, "/openai/realtime"), Some(Route::Realtime));
/// assert_eq!(Route::of(&Method::POST, "/openai/realtime"), Some(Route::Proxy));
/// assert_eq!(Route::of(&Method::GET, "/session"), None); // 405: no route takes GET there
/// assert_eq!(Route::Mint.label(), "mint");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// `GET /health`: readiness.
    Health,
    /// `GET /challenge`: a proof-of-work challenge.
    Challenge,
    /// `GET /client.js`: the browser client (served by `perishable-axum`).
    ClientJs,
    /// `POST /session`: mint a session.
    Mint,
    /// `POST /session/refresh`: trade a token for a fresh one.
    Refresh,
    /// `DELETE /session`: revoke the presented token.
    Revoke,
    /// Any method on `/openai` and `/openai/{path}`: the proxy to the upstream.
    Proxy,
    /// `GET /openai/realtime`: the Realtime WebSocket (served by the proxy's stack, through
    /// [`RealtimeLayer`](crate::realtime::RealtimeLayer)).
    Realtime,
}

/// The prefix of the proxied paths: `/openai/{path}` forwards `{path}`.
pub(crate) const PROXY_PREFIX: &str = "/openai/";

impl Route {
    /// Every route, in the order of `docs/protocol.md`.
    pub const ALL: [Route; 8] = [
        Self::Health,
        Self::Challenge,
        Self::ClientJs,
        Self::Mint,
        Self::Refresh,
        Self::Revoke,
        Self::Proxy,
        Self::Realtime,
    ];

    /// The route that serves `method` on `path`, if any. `None` is a `404` when no route has
    /// the path ([`has_path`](Self::has_path)), else a `405`.
    pub fn of(method: &Method, path: &str) -> Option<Self> {
        if Self::is_proxied(path) {
            if path == Self::Realtime.path() && method == Method::GET {
                return Some(Self::Realtime);
            }
            return Some(Self::Proxy);
        }
        // `HEAD` is `GET` without the body (RFC 9110, 9.3.2), which the server leaves out: a load
        // balancer may check `/health` with it.
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        Self::ALL
            .into_iter()
            .find(|route| route.path() == path && route.method() == Some(method))
    }

    /// Whether some route has `path`, with whatever method.
    pub fn has_path(path: &str) -> bool {
        Self::is_proxied(path) || Self::ALL.iter().any(|route| route.path() == path)
    }

    /// Whether `path` is the proxy's: `/openai` or under `/openai/`.
    pub fn is_proxied(path: &str) -> bool {
        path.strip_prefix("/openai")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The route's path; the proxy's is its root, `/openai`.
    pub const fn path(self) -> &'static str {
        match self {
            Self::Health => "/health",
            Self::Challenge => "/challenge",
            Self::ClientJs => "/client.js",
            Self::Mint | Self::Revoke => "/session",
            Self::Refresh => "/session/refresh",
            Self::Proxy => "/openai",
            Self::Realtime => "/openai/realtime",
        }
    }

    /// The route's method; `None` for the proxy, which takes any.
    pub const fn method(self) -> Option<&'static Method> {
        match self {
            Self::Health | Self::Challenge | Self::ClientJs | Self::Realtime => Some(&Method::GET),
            Self::Mint | Self::Refresh => Some(&Method::POST),
            Self::Revoke => Some(&Method::DELETE),
            Self::Proxy => None,
        }
    }

    /// The route's name in the `route` field of the request span and the `route` label of the
    /// metrics (`docs/observability.md`). A request no route serves is labelled `other`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Challenge => "challenge",
            Self::ClientJs => "client",
            Self::Mint => "mint",
            Self::Refresh => "refresh",
            Self::Revoke => "revoke",
            Self::Proxy => "openai",
            Self::Realtime => "realtime",
        }
    }

    /// Whether the route needs a verified session (`docs/protocol.md`, "Authenticated
    /// requests").
    pub const fn is_authenticated(self) -> bool {
        matches!(
            self,
            Self::Refresh | Self::Revoke | Self::Proxy | Self::Realtime
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_is_its_method_on_its_exact_path() {
        for route in Route::ALL {
            let method = route.method().cloned().unwrap_or(Method::PATCH);
            assert_eq!(Route::of(&method, route.path()), Some(route), "{route:?}");
        }
        // No prefix, no trailing slash, no other method.
        for (method, path) in [
            (Method::POST, "/ai/session"),
            (Method::POST, "/session/"),
            (Method::GET, "/session"),
            (Method::HEAD, "/session"),
            (Method::POST, "/health"),
            (Method::GET, "/"),
            (Method::GET, ""),
        ] {
            assert_eq!(Route::of(&method, path), None, "{method} {path}");
        }
        assert!(Route::has_path("/session"));
        assert!(!Route::has_path("/ai/session"));
        // `HEAD` finds the `GET` routes.
        assert_eq!(Route::of(&Method::HEAD, "/health"), Some(Route::Health));
        assert_eq!(
            Route::of(&Method::HEAD, "/challenge"),
            Some(Route::Challenge)
        );
    }

    #[test]
    fn the_proxy_owns_openai_and_below_only() {
        for path in [
            "/openai",
            "/openai/",
            "/openai/chat/completions",
            "/openai//x",
        ] {
            assert!(Route::is_proxied(path), "{path}");
            assert_eq!(Route::of(&Method::DELETE, path), Some(Route::Proxy));
        }
        for path in [
            "/",
            "/openaix",
            "/openai-x/y",
            "/session",
            "/x/openai/y",
            "",
        ] {
            assert!(!Route::is_proxied(path), "{path}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<_> = Route::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Route::ALL.len());
        assert!(!labels.contains(&"other"));
    }
}
