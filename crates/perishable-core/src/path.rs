//! The path allow-list for `/openai/{path}`.
//!
//! A pattern is a `/`-separated list of segments; `*` matches exactly one non-empty segment
//! (`models/*` matches `models/gpt-4o` but not `models` or `models/a/b`). A requested path with an
//! empty, `.` or `..` segment, a backslash, or a percent-encoded `/`, `\` or `.` never matches,
//! so no path can climb out of the allow-list once the upstream decodes or normalizes it.

/// One allowed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathPattern {
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
    /// Parses a pattern such as `chat/completions` or `models/*`.
    pub(crate) fn parse(pattern: &str) -> Result<Self, String> {
        let trimmed = pattern.trim_matches('/');
        if trimmed.is_empty() {
            return Err(format!("{pattern:?} is empty"));
        }
        let segments = trimmed
            .split('/')
            .map(|s| match s {
                "*" => Ok(Segment::Any),
                s if is_safe_segment(s) => Ok(Segment::Exact(s.to_owned())),
                _ => Err(format!("{pattern:?} has an invalid segment {s:?}")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exact = (!segments.contains(&Segment::Any)).then(|| trimmed.to_owned());
        Ok(Self { segments, exact })
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

    /// Whether `path` (without leading slash) may pass.
    pub(crate) fn allows(&self, path: &str) -> bool {
        // A path equal to a pattern without `*` passes: its segments were checked as the
        // pattern's. Only the others are split.
        self.patterns
            .iter()
            .any(|p| p.exact.as_deref() == Some(path))
            || (!path.is_empty()
                && path.split('/').all(is_safe_segment)
                && self.patterns.iter().any(|p| p.matches(path)))
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
        for ok in [
            "chat/completions",
            "embeddings",
            "models",
            "models/gpt-4o",
            "responses",
        ] {
            assert!(l.allows(ok), "{ok}");
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
            assert!(!l.allows(no), "{no}");
        }
    }

    #[test]
    fn invalid_patterns() {
        assert!(PathPattern::parse("").is_err());
        assert!(PathPattern::parse("a/../b").is_err());
        assert!(PathPattern::parse("a//b").is_err());
    }
}
