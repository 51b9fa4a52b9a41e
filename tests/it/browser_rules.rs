//! End-to-end tests of the PROTOCOL "Browser rules": CORS preflights answered before any
//! authentication for the configured origins only, and `403 origin_not_allowed` for a present,
//! disallowed `Origin`.
use crate::support::*;
use perishable_mock::MockOptions;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

const APP: &str = "https://app.example";
const EVIL: &str = "https://evil.example";
const FP: &str = "device-browser-tests-1";
const REQUESTED_HEADERS: [&str; 4] = [
    "authorization",
    "x-perishable-fingerprint",
    "dpop",
    "content-type",
];

async fn start_app_only() -> Proxy {
    Proxy::start_with(MockOptions::new(), |c| c.cors_allowed_origins([APP])).await
}

/// Asserts a Perishable error: status, `error.code` and `error.type`.
async fn expect_error(response: reqwest::Response, status: u16, code: &str, kind: &str) {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
}

/// All values of header `name`, comma-split, trimmed and lowercased.
fn header_list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The preflight a browser sends before `POST /openai/chat/completions` from `origin`.
async fn preflight(proxy: &Proxy, origin: &str) -> reqwest::Response {
    proxy
        .http
        .request(Method::OPTIONS, proxy.url("/openai/chat/completions"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            REQUESTED_HEADERS.join(","),
        )
        .send()
        .await
        .unwrap()
}

fn chat_body() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn preflight_from_an_allowed_origin_needs_no_token() {
    let proxy = start_app_only().await;
    let response = preflight(&proxy, APP).await;
    assert!(
        response.status().is_success(),
        "preflight refused: {}",
        response.status()
    );
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], APP);
    assert!(
        header_list(headers, "vary").contains(&"origin".to_owned()),
        "{headers:?}"
    );
    let allowed = header_list(headers, "access-control-allow-headers");
    for wanted in REQUESTED_HEADERS {
        assert!(
            allowed.contains(&wanted.to_owned()),
            "{wanted}: {allowed:?}"
        );
    }
    let methods = header_list(headers, "access-control-allow-methods");
    assert!(methods.contains(&"post".to_owned()), "{methods:?}");
    assert!(headers.get("www-authenticate").is_none());
    // Preflights on the session routes are answered too.
    for path in ["/session", "/session/refresh", "/challenge"] {
        let response = proxy
            .http
            .request(Method::OPTIONS, proxy.url(path))
            .header("origin", APP)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,dpop")
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        assert_eq!(response.headers()["access-control-allow-origin"], APP);
    }
    assert!(
        proxy.mock.requests().is_empty(),
        "a preflight reached the upstream"
    );
}

#[tokio::test]
async fn preflight_from_another_origin_is_refused() {
    let proxy = start_app_only().await;
    for origin in [
        EVIL,
        "http://app.example",
        "https://app.example:8443",
        "https://app.example.evil.example",
        "https://sub.app.example",
        "null",
    ] {
        let response = preflight(&proxy, origin).await;
        let allow_origin = response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            allow_origin.is_none() || allow_origin.as_deref() == Some(APP),
            "{origin} was allowed: {allow_origin:?}"
        );
        expect_error(response, 403, "origin_not_allowed", "permission_error").await;
    }
    assert!(proxy.mock.requests().is_empty());
}

#[tokio::test]
async fn requests_from_another_origin_are_refused() {
    let proxy = start_app_only().await;

    // Minting.
    let body = json!({
        "fingerprint": FP,
        "entropy": human_entropy(),
        "pow": proxy.solved_pow().await,
    });
    let response = proxy
        .http
        .post(proxy.url("/session"))
        .header("origin", EVIL)
        .json(&body)
        .send()
        .await
        .unwrap();
    // The answer depends on the origin: no shared cache may give it to another one.
    let vary = response.headers().get_all("vary").iter();
    assert!(
        vary.flat_map(|v| v.to_str().unwrap().split(','))
            .any(|v| v.trim().eq_ignore_ascii_case("origin")),
        "{:?}",
        response.headers()
    );
    expect_error(response, 403, "origin_not_allowed", "permission_error").await;

    // Even with a valid session, an authenticated call from the wrong origin never goes upstream.
    let token = proxy.mint(FP).await.token;
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .header("origin", EVIL)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    expect_error(response, 403, "origin_not_allowed", "permission_error").await;
    let response = proxy
        .http
        .post(proxy.url("/session/refresh"))
        .bearer_auth(&token)
        .header("x-perishable-fingerprint", FP)
        .header("origin", EVIL)
        .send()
        .await
        .unwrap();
    expect_error(response, 403, "origin_not_allowed", "permission_error").await;
    assert!(proxy.mock.requests().is_empty());

    // The same session still works from the allowed origin, which is told so.
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .header("origin", APP)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
    let exposed = header_list(response.headers(), "access-control-expose-headers");
    assert!(exposed.contains(&"x-request-id".to_owned()), "{exposed:?}");
    assert!(
        header_list(response.headers(), "vary").contains(&"origin".to_owned()),
        "{:?}",
        response.headers()
    );
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn mint_from_the_allowed_origin_works() {
    let proxy = start_app_only().await;
    let body = json!({
        "fingerprint": FP,
        "entropy": human_entropy(),
        "pow": proxy.solved_pow().await,
    });
    let response = proxy
        .http
        .post(proxy.url("/session"))
        .header("origin", APP)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
    let object: Value = response.json().await.unwrap();
    assert!(object["token"].is_string());

    // A refusal from the allowed origin is readable by the page.
    let response = proxy
        .http
        .get(proxy.url("/openai/models"))
        .header("origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
    expect_error(response, 401, "missing_token", "authentication_error").await;
}

#[tokio::test]
async fn requests_without_origin_are_unaffected() {
    let proxy = start_app_only().await;
    let token = proxy.mint(FP).await.token;
    let response = proxy
        .openai(Method::POST, "chat/completions", &token, FP)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Not a browser's request: no CORS headers, but the `Vary` that keeps a shared cache from
    // handing this answer to a page.
    let headers = response.headers();
    assert!(
        !headers
            .keys()
            .any(|name| name.as_str().starts_with("access-control-")),
        "{headers:?}"
    );
    let vary = header_list(headers, "vary");
    for wanted in [
        "origin",
        "access-control-request-method",
        "access-control-request-headers",
    ] {
        assert!(vary.contains(&wanted.to_owned()), "{vary:?}");
    }
    let response = proxy.http.get(proxy.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(header_list(response.headers(), "vary").contains(&"origin".to_owned()));
    assert_eq!(proxy.mock.requests().len(), 1);
}

#[tokio::test]
async fn wildcard_allows_any_origin() {
    let proxy = Proxy::start_with(MockOptions::new(), |c| c.cors_allowed_origins(["*"])).await;
    for origin in [
        EVIL,
        "https://anything.example:8443",
        "http://localhost:3000",
    ] {
        let response = preflight(&proxy, origin).await;
        assert!(
            response.status().is_success(),
            "{origin}: {}",
            response.status()
        );
        let headers = response.headers();
        let allow_origin = headers["access-control-allow-origin"].to_str().unwrap();
        assert!(
            allow_origin == "*" || allow_origin == origin,
            "{allow_origin}"
        );
        // Every origin gets the same answer, but the preflight still says it varies with the
        // origin, as every other one does (docs/protocol.md, Browser rules).
        assert!(
            header_list(headers, "vary").contains(&"origin".to_owned()),
            "{headers:?}"
        );
        // "*" means no credentials.
        assert!(
            headers
                .get("access-control-allow-credentials")
                .is_none_or(|v| v != "true"),
            "{headers:?}"
        );
        let allowed = header_list(headers, "access-control-allow-headers");
        for wanted in REQUESTED_HEADERS {
            assert!(
                allowed.contains(&wanted.to_owned()),
                "{wanted}: {allowed:?}"
            );
        }

        let body = json!({
            "fingerprint": FP,
            "entropy": human_entropy(),
            "pow": proxy.solved_pow().await,
        });
        let response = proxy
            .http
            .post(proxy.url("/session"))
            .header("origin", origin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "mint from {origin}");
        let token = response.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let response = proxy
            .openai(Method::GET, "models", &token, FP)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "call from {origin}");
    }
}
