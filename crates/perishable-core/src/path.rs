//! The path allow-list for `/openai/{path}`.
//!
//! A pattern is a `/`-separated list of segments; `*` matches exactly one non-empty segment
//! (`models/*` matches `models/gpt-4o` but not `models` or `models/a/b`). A requested path with an
//! empty, `.` or `..` segment, a backslash, or a percent-encoded `/`, `\` or `.` never matches,
//! so no path can climb out of the allow-list once the upstream decodes or normalizes it.
//!
//! A pattern may start with a method and a space (`GET models/*`): then only that method passes
//! (`GET` also lets `HEAD` through). Without one, any method does. The defaults name theirs: the
//! same path can be an inference call with one method and an admin-grade one with another
//! (`DELETE models/{id}` deletes a fine-tuned model, `GET chat/completions` lists the stored
//! completions of the whole organization).

use http::Method;

/// One allowed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathPattern {
    /// The one method that may pass, when the pattern names one.
    method: Option<Method>,
    segments: Vec<Segment>,
    /// The whole pattern, when it has no `*`: a path equal to it matches.
    exact: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Exact(String),
    Any,
}

impl PathPattern {
    /// Parses a pattern such as `chat/completions`, `models/*` or `GET models/*`.
    pub(crate) fn parse(pattern: &str) -> Result<Self, String> {
        let (method, path) = match pattern.split_once(' ') {
            Some((method, path)) => {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!(
                        "{pattern:?}: a pattern is a path, or a method in capitals, one space \
                         and a path (\"GET models/*\")"
                    ));
                }
                let method = Method::from_bytes(method.as_bytes())
                    .map_err(|_| format!("{pattern:?} has an invalid method"))?;
                (Some(method), path)
            }
            None => (None, pattern),
        };
        let trimmed = path.trim_matches('/');
        if trimmed.is_empty() {
            return Err(format!("{pattern:?} is empty"));
        }
        let segments = trimmed
            .split('/')
            .map(|s| match s {
                "*" => Ok(Segment::Any),
                s if is_safe_segment(s) && !s.contains(char::is_whitespace) => {
                    Ok(Segment::Exact(s.to_owned()))
                }
                _ => Err(format!("{pattern:?} has an invalid segment {s:?}")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exact = (!segments.contains(&Segment::Any)).then(|| trimmed.to_owned());
        Ok(Self {
            method,
            segments,
            exact,
        })
    }

    /// Whether a request with `method` may use this pattern (`GET` lets `HEAD` through).
    fn allows_method(&self, method: &Method) -> bool {
        match &self.method {
            None => true,
            Some(m) => m == method || (*m == Method::GET && *method == Method::HEAD),
        }
    }

    /// Whether `path` (without leading slash) matches.
    pub(crate) fn matches(&self, path: &str) -> bool {
        let mut parts = path.split('/');
        for segment in &self.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            match segment {
                Segment::Any => {}
                Segment::Exact(s) if s == part => {}
                Segment::Exact(_) => return false,
            }
        }
        parts.next().is_none()
    }
}

fn is_safe_segment(s: &str) -> bool {
    if s.is_empty() || s == "." || s == ".." || s.contains('\\') {
        return false;
    }
    // No percent-encoded '/', '\\' or '.', in either case (and no allocation).
    !s.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c') | (b'2', b'e')
            )
    })
}

/// The allowed paths.
#[derive(Debug, Clone)]
pub(crate) struct AllowList {
    patterns: Vec<PathPattern>,
}

impl AllowList {
    /// An allow-list from patterns (already validated by the config).
    pub(crate) fn new<'a>(patterns: impl IntoIterator<Item = &'a String>) -> Result<Self, String> {
        Ok(Self {
            patterns: patterns
                .into_iter()
                .map(|p| PathPattern::parse(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether `path` (without leading slash) may pass with `method`.
    pub(crate) fn allows(&self, method: &Method, path: &str) -> bool {
        let mut patterns = self.patterns.iter().filter(|p| p.allows_method(method));
        // A path equal to a pattern without `*` passes: its segments were checked as the
        // pattern's. Only the others are split.
        patterns.clone().any(|p| p.exact.as_deref() == Some(path))
            || (!path.is_empty()
                && path.split('/').all(is_safe_segment)
                && patterns.any(|p| p.matches(path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> AllowList {
        let defaults: Vec<String> = crate::config::DEFAULT_ALLOWED_PATHS
            .iter()
            .map(|s| s.to_string())
            .collect();
        AllowList::new(&defaults).unwrap()
    }

    #[test]
    fn defaults() {
        let l = list();
        for (method, ok) in [
            (Method::POST, "chat/completions"),
            (Method::POST, "completions"),
            (Method::POST, "embeddings"),
            (Method::GET, "models"),
            (Method::HEAD, "models"),
            (Method::GET, "models/gpt-4o"),
            (Method::POST, "responses"),
            (Method::POST, "moderations"),
        ] {
            assert!(l.allows(&method, ok), "{method} {ok}");
        }
        // The same paths with the methods that make them admin-grade.
        for (method, no) in [
            (Method::DELETE, "models/ft:gpt-4o:org:x"),
            (Method::POST, "models/gpt-4o"),
            (Method::PUT, "models"),
            (Method::GET, "chat/completions"),
            (Method::DELETE, "chat/completions"),
            (Method::GET, "responses"),
            (Method::HEAD, "embeddings"),
        ] {
            assert!(!l.allows(&method, no), "{method} {no}");
        }
        for no in [
            "files",
            "fine_tuning/jobs",
            "batches",
            "organization/users",
            "models/a/b",
            "chat/completions/",
            "chat//completions",
            "models/..",
            "models/%2e%2e",
            "models/x%2Ffiles",
            "chat/completions/../../files",
            "",
        ] {
            for method in [Method::GET, Method::POST] {
                assert!(!l.allows(&method, no), "{method} {no}");
            }
        }
    }

    #[test]
    fn a_pattern_without_a_method_lets_any_through() {
        let l = AllowList::new(&["files".to_owned(), "DELETE files/*".to_owned()]).unwrap();
        for method in [Method::GET, Method::POST, Method::DELETE, Method::PATCH] {
            assert!(l.allows(&method, "files"), "{method}");
        }
        assert!(l.allows(&Method::DELETE, "files/f1"));
        assert!(!l.allows(&Method::GET, "files/f1"));
        assert!(!l.allows(&Method::HEAD, "files/f1"));
    }

    proptest::proptest! {
        /// Whatever the method and path, the default list lets through exactly its inference
        /// endpoints with `POST` and `models` with `GET` or `HEAD`.
        #[test]
        fn the_defaults_pass_only_their_methods(
            method in proptest::sample::select(vec![
                "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
                "PROPFIND", "get", "Post",
            ]),
            path in proptest::sample::select(vec![
                "chat/completions", "completions", "embeddings", "responses", "moderations",
                "models", "models/gpt-4o", "models/ft:x:y", "models/a/b", "files", "batches",
                "chat/completions/c1", "responses/r1", "", "models/",
            ]),
        ) {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let expected = matches!(
                (method.as_str(), path),
                (
                    "POST",
                    "chat/completions" | "completions" | "embeddings" | "responses" | "moderations"
                ) | ("GET" | "HEAD", "models" | "models/gpt-4o" | "models/ft:x:y")
            );
            proptest::prop_assert_eq!(list().allows(&method, path), expected, "{} {}", method, path);
        }
    }

    #[test]
    fn invalid_patterns() {
        assert!(PathPattern::parse("").is_err());
        assert!(PathPattern::parse("a/../b").is_err());
        assert!(PathPattern::parse("a//b").is_err());
        assert!(PathPattern::parse("get models").is_err());
        assert!(PathPattern::parse(" models").is_err());
        assert!(PathPattern::parse("GET ").is_err());
        assert!(PathPattern::parse("GET  models").is_err());
        assert!(PathPattern::parse("GET models extra").is_err());
        assert_eq!(
            PathPattern::parse("GET models/*").unwrap().method,
            Some(Method::GET)
        );
    }
}
