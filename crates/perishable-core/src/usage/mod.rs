//! Usage accounting: reading `usage` from responses as they stream past, and hiding what the
//! proxy's own `include_usage` added (see "Metered calls" in `docs/protocol.md`).
//!
//! A [`UsageTap`] sits in the response body. What it reads is the JSON, never its spelling: any
//! spacing, any key order, escapes in keys, one line or many.
//!
//! - **JSON responses** pass through untouched. The tap scans them incrementally for the
//!   top-level `usage` member ([`crate::json::MemberFinder`]), with bounded memory whatever the
//!   body's size and wherever `usage` sits (chat and text completions, embeddings, the
//!   Responses API).
//! - **Event streams** pass through untouched too. The tap parses them per the WHATWG rules
//!   (`usage/sse.rs`: LF, CR or CRLF line ends, several `data:` lines, comments, other
//!   fields, any split) and reads `usage` from the events that can carry it: a data object with a
//!   top-level `usage` object (chat and text completions with `include_usage`, on a chunk of its
//!   own, on the final choice chunk, or on every chunk as vLLM's `continuous_usage_stats` does:
//!   the last one wins), or a `response` object with a `usage` object (the Responses API's
//!   `response.completed`). Only events whose data mentions `usage` (or escapes a letter of it)
//!   are parsed.
//! - **Event streams whose usage the proxy asked for** (the client did not) are rewritten, event
//!   by event, each complete event passed on at once:
//!   - the usage-only event (`choices` an empty array, `usage` an object) is dropped;
//!   - the top-level `usage` member of every other event (`"usage": null`, or a usage object on
//!     a choice chunk) is removed, with exactly one separating comma, whatever the spacing;
//!   - every other byte passes unchanged.
//! - **A compressed response** (an upstream that ignored `Accept-Encoding: identity`): gzip and
//!   deflate are decoded for the reader, in bounded steps. The client gets the bytes as sent,
//!   except when usage must be hidden: then it gets the decoded, rewritten events (the service
//!   drops `Content-Encoding`). Other encodings cannot be read: the usage counts as unread.
//!
//! When a response's usage cannot be read, the reservation stands; the caller counts
//! `perishable_usage_unread_total` and logs a warning.

mod sse;
mod tap;

use serde::Deserialize;

pub(crate) use tap::{Encoding, TapMode, UsageTap};

/// Tokens one response used, as the upstream reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Usage {
    /// Prompt (input) tokens.
    pub(crate) prompt_tokens: u64,
    /// Completion (output) tokens.
    pub(crate) completion_tokens: u64,
    /// All tokens counted against the budget.
    pub(crate) total_tokens: u64,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl Usage {
    /// A usage object (`{"prompt_tokens": …}` or the Responses API's `{"input_tokens": …}`).
    pub(crate) fn parse(raw: &[u8]) -> Option<Self> {
        let raw: RawUsage = serde_json::from_slice(raw).ok()?;
        let prompt = raw.prompt_tokens.unwrap_or(0);
        let completion = raw.completion_tokens.unwrap_or(0);
        Some(Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: raw
                .total_tokens
                .unwrap_or(prompt.saturating_add(completion)),
        })
    }
}
