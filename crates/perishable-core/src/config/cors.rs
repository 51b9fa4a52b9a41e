//! `[cors]`: which browser origins may call.

use serde::Deserialize;

use super::ConfigError;

/// `[cors]`: which browser origins may call.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), or `["*"]` for any (then no credentials).
    pub allowed_origins: Vec<String>,
}

impl CorsConfig {
    /// Checks every key of the section.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.allowed_origins.len() > 1 && self.allowed_origins.iter().any(|o| o == "*") {
            return Err(ConfigError::invalid(
                "cors.allowed_origins",
                "\"*\" allows every origin: list it alone, or list exact origins",
            ));
        }
        for origin in &self.allowed_origins {
            if origin != "*" && !is_origin(origin) {
                return Err(ConfigError::invalid(
                    "cors.allowed_origins",
                    format!("{origin:?} is not an origin (scheme://host[:port]) or \"*\""),
                ));
            }
        }
        Ok(())
    }
}

fn is_origin(s: &str) -> bool {
    match url::Url::parse(s) {
        Ok(url) => {
            url.host().is_some() && url.origin().ascii_serialization() == s.trim_end_matches('/')
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact_or_the_wildcard() {
        let origins = |list: &[&str]| CorsConfig {
            allowed_origins: list.iter().map(|s| (*s).to_owned()).collect(),
        };
        assert!(
            origins(&["https://app.example.com", "http://localhost:5173"])
                .validate()
                .is_ok()
        );
        assert!(origins(&["*"]).validate().is_ok());
        assert!(
            origins(&["*", "https://app.example.com"])
                .validate()
                .is_err()
        );
        for bad in [
            "https://app.example.com/path",
            "app.example.com",
            "",
            "*.example.com",
        ] {
            assert!(origins(&[bad]).validate().is_err(), "{bad}");
        }
    }
}
