//! `reqwest_middleware::Middleware` for [`Client`] (feature `middleware`).

use http::Extensions;
use reqwest_middleware::{Middleware, Next};

use crate::client::Client;
use crate::error::Error;

fn to_middleware_error(error: Error) -> reqwest_middleware::Error {
    match error {
        Error::Http(e) => reqwest_middleware::Error::Reqwest(e),
        other => reqwest_middleware::Error::middleware(other),
    }
}

/// Authenticates every request under the base URL, like [`Client::send`] (fresh headers, one
/// retry on a stale proof or a replaced session); others pass untouched.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let perishable = perishable_client::Client::builder("https://api.example.com/ai")
///     .fingerprint("install-6f1c2a4e-0b7d")
///     .build()?;
/// let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(perishable.clone())
///     .build();
/// let models = http
///     .get(format!("{}/models", perishable.openai_base_url()))
///     .send()
///     .await?;
/// # Ok(()) }
/// ```
#[async_trait::async_trait]
impl Middleware for Client {
    async fn handle(
        &self,
        mut request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        if !self.is_ours(request.url(), request.method()) {
            return next.run(request, extensions).await;
        }
        let session = self.session().await.map_err(to_middleware_error)?;
        self.authorize(&mut request, &session)
            .map_err(to_middleware_error)?;
        let retry = request.try_clone();
        let response = next.clone().run(request, extensions).await?;
        self.observe(&response);
        if let Some(mut again) = retry
            && let Some(session) = self
                .retry_session(&response, &session)
                .await
                .map_err(to_middleware_error)?
        {
            drop(response);
            self.authorize(&mut again, &session)
                .map_err(to_middleware_error)?;
            let response = next.run(again, extensions).await?;
            self.observe(&response);
            return Ok(response);
        }
        Ok(response)
    }
}
