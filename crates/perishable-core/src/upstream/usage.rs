//! Usage accounting: reading `usage` from responses as they stream past.
//!
//! A [`UsageTap`] sits in the response body. It never delays a chunk the client can use:
//!
//! - **JSON responses** pass through untouched. The tap keeps the last 8 KiB and, at the end,
//!   parses the last `"usage":{…}` object in it (OpenAI puts `usage` at the end of completions,
//!   embeddings and responses).
//! - **Event streams** pass through untouched too. The tap copies each frame aside, splits it
//!   into events at blank lines, and parses only the events that mention `"usage":{` (the final
//!   chunk of a chat completion with `stream_options.include_usage`, or `response.completed`).
//! - **Event streams whose usage the proxy asked for** (the client did not) are rewritten:
//!   - the usage-only event (`"choices":[]` with a `usage` object) is dropped;
//!   - the `"usage":null` member that OpenAI then adds to every other chunk is removed.
//!
//!   So the client gets the same bytes it would have got without `include_usage`. Complete
//!   events are passed on as soon as they arrive; only an event cut across two network frames
//!   waits for its end (an SSE client cannot use half an event anyway).

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

/// The searchers, built once: building one costs more than a short search.
static EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\":"));
static USAGE_OBJECT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\":{"));
static NO_CHOICES: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\":[]"));
static USAGE_NULL_BEFORE: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b",\"usage\":null"));
static USAGE_NULL_AFTER: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"usage\":null,"));

/// Tokens one response used, as the upstream reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// All tokens counted against the budget.
    pub total_tokens: u64,
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

/// Parses the object that follows the last `"usage":` in `bytes`, if it is one.
fn parse_last_usage(bytes: &[u8]) -> Option<Usage> {
    // The last match, found forwards: the forward search is vectorized, the reverse one is not.
    let at = USAGE_KEY.find_iter(bytes).last()?;
    let rest = &bytes[at + b"\"usage\":".len()..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[start] != b'{' {
        return None;
    }
    let mut values = serde_json::Deserializer::from_slice(&rest[start..]).into_iter::<RawUsage>();
    let raw = values.next()?.ok()?;
    let prompt = raw.prompt_tokens.unwrap_or(0);
    let completion = raw.completion_tokens.unwrap_or(0);
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: raw.total_tokens.unwrap_or(prompt + completion),
    })
}

/// What the tap does with the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TapMode {
    /// A JSON body: read `usage` at the end.
    Json,
    /// An event stream: read `usage` from the events that carry it.
    Events,
    /// An event stream whose usage the proxy asked for: read it and hide it from the client.
    EventsHidingUsage,
}

/// The largest partial event or JSON tail kept aside.
const MAX_CARRY: usize = 1024 * 1024;
const JSON_TAIL: usize = 8 * 1024;

/// Reads usage from a response body as it passes; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct UsageTap {
    mode: TapMode,
    /// Events mode: the start of an event not yet complete. JSON mode: the body's tail before
    /// `last` (at most `JSON_TAIL` bytes).
    carry: BytesMut,
    /// JSON mode: the last frame, shared with the client's copy (a one-frame body, the common
    /// case, is never copied).
    last: Option<Bytes>,
    usage: Option<Usage>,
}

impl UsageTap {
    pub(crate) fn new(mode: TapMode) -> Self {
        Self {
            mode,
            carry: BytesMut::new(),
            last: None,
            usage: None,
        }
    }

    /// The usage seen so far.
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the tap drops events (the client's body is not the upstream's).
    pub(crate) fn rewrites(&self) -> bool {
        self.mode == TapMode::EventsHidingUsage
    }

    /// Takes one data frame; returns what to send the client now (`None`: nothing yet).
    pub(crate) fn frame(&mut self, data: Bytes) -> Option<Bytes> {
        match self.mode {
            TapMode::Json => {
                if let Some(older) = self.last.replace(data.clone()) {
                    self.carry.extend_from_slice(&older);
                    if self.carry.len() > JSON_TAIL {
                        let cut = self.carry.len() - JSON_TAIL;
                        let _ = self.carry.split_to(cut);
                    }
                }
                Some(data)
            }
            TapMode::Events => {
                // Whole events are read in place; only a cut event is copied aside.
                let mut rest: &[u8] = &data;
                if !self.carry.is_empty() {
                    // The blank line may straddle the two frames.
                    let straddles =
                        self.carry.last() == Some(&b'\n') && rest.first() == Some(&b'\n');
                    let end = if straddles {
                        Some(1)
                    } else {
                        EVENT_END.find(rest).map(|end| end + 2)
                    };
                    match end {
                        Some(end) => {
                            self.carry.extend_from_slice(&rest[..end]);
                            let event = self.carry.split();
                            self.read_event(&event);
                            rest = &rest[end..];
                        }
                        None => {
                            self.carry.extend_from_slice(rest);
                            rest = &[];
                        }
                    }
                }
                while let Some(end) = EVENT_END.find(rest) {
                    let (event, after) = rest.split_at(end + 2);
                    self.read_event(event);
                    rest = after;
                }
                self.carry.extend_from_slice(rest);
                if self.carry.len() > MAX_CARRY {
                    self.carry.clear();
                }
                Some(data)
            }
            TapMode::EventsHidingUsage => {
                self.carry.extend_from_slice(&data);
                let mut out = BytesMut::new();
                while let Some(end) = EVENT_END.find(&self.carry) {
                    let event = self.carry.split_to(end + 2);
                    if self.read_event(&event) && is_usage_only(&event) {
                        continue;
                    }
                    strip_usage_null(&event, &mut out);
                }
                if self.carry.len() > MAX_CARRY {
                    // Not an event stream after all: pass it on as is.
                    out.extend_from_slice(&self.carry.split());
                }
                (!out.is_empty()).then(|| out.freeze())
            }
        }
    }

    /// The body ended: returns what is left to send the client.
    pub(crate) fn finish(&mut self) -> Option<Bytes> {
        match self.mode {
            TapMode::Json => {
                if self.usage.is_none() {
                    let last = self.last.take().unwrap_or_default();
                    self.usage = if self.carry.is_empty() {
                        parse_last_usage(&last)
                    } else {
                        self.carry.extend_from_slice(&last);
                        parse_last_usage(&self.carry)
                    };
                }
                self.carry.clear();
                self.last = None;
                None
            }
            TapMode::Events => {
                let rest = self.carry.split();
                self.read_event(&rest);
                None
            }
            TapMode::EventsHidingUsage => {
                let rest = self.carry.split();
                (!rest.is_empty()).then(|| rest.freeze())
            }
        }
    }

    /// Reads usage from one event; `true` when it carried a usage object.
    fn read_event(&mut self, event: &[u8]) -> bool {
        if USAGE_OBJECT.find(event).is_none() {
            return false;
        }
        match parse_last_usage(event) {
            Some(usage) => {
                self.usage = Some(usage);
                true
            }
            None => false,
        }
    }
}

/// The usage-only chunk of a chat completion: no choices, only usage.
fn is_usage_only(event: &[u8]) -> bool {
    NO_CHOICES.find(event).is_some()
}

/// Copies `event` into `out` without its `"usage":null` member.
fn strip_usage_null(event: &[u8], out: &mut BytesMut) {
    let mut rest = event;
    loop {
        let comma_before = USAGE_NULL_BEFORE.find(rest);
        let comma_after = USAGE_NULL_AFTER.find(rest);
        match (comma_before, comma_after) {
            (Some(i), _) => {
                out.extend_from_slice(&rest[..i]);
                rest = &rest[i + b",\"usage\":null".len()..];
            }
            (None, Some(i)) => {
                out.extend_from_slice(&rest[..i]);
                rest = &rest[i + b"\"usage\":null,".len()..];
            }
            (None, None) => {
                out.extend_from_slice(rest);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tap: &mut UsageTap, frames: &[&str]) -> String {
        let mut out = Vec::new();
        for f in frames {
            if let Some(b) = tap.frame(Bytes::copy_from_slice(f.as_bytes())) {
                out.extend_from_slice(&b);
            }
        }
        if let Some(b) = tap.finish() {
            out.extend_from_slice(&b);
        }
        String::from_utf8(out).unwrap()
    }

    const WITH_USAGE: [&str; 4] = [
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
        "data: [DONE]\n\n",
    ];
    const WITHOUT_USAGE: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";

    #[test]
    fn hiding_usage_gives_the_bytes_without_it() {
        let mut tap = UsageTap::new(TapMode::EventsHidingUsage);
        assert_eq!(run(&mut tap, &WITH_USAGE), WITHOUT_USAGE);
        assert_eq!(tap.usage().unwrap().total_tokens, 5);
    }

    #[test]
    fn events_split_across_frames_are_rejoined() {
        let all: String = WITH_USAGE.concat();
        let frames: Vec<&str> = vec![&all[..7], &all[7..100], &all[100..230], &all[230..]];
        let mut tap = UsageTap::new(TapMode::EventsHidingUsage);
        assert_eq!(run(&mut tap, &frames), WITHOUT_USAGE);
        let mut tap = UsageTap::new(TapMode::Events);
        assert_eq!(run(&mut tap, &frames), all, "observing changes nothing");
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                total_tokens: 5
            })
        );
    }

    #[test]
    fn complete_events_are_not_held_back() {
        let mut tap = UsageTap::new(TapMode::EventsHidingUsage);
        let first = tap.frame(Bytes::from_static(WITH_USAGE[0].as_bytes()));
        assert!(first.is_some(), "a complete event goes out at once");
        let partial = tap.frame(Bytes::from_static(b"data: {\"id\""));
        assert!(partial.is_none(), "half an event waits for its end");
    }

    #[test]
    fn json_usage_at_the_end_and_responses_api_names() {
        let mut tap = UsageTap::new(TapMode::Json);
        let body = format!(
            "{{\"object\":\"list\",\"data\":[{}],\"usage\":{{\"prompt_tokens\":7,\"total_tokens\":7}}}}",
            vec!["1.0"; 5000].join(",")
        );
        let out = run(&mut tap, &[&body[..9000], &body[9000..]]);
        assert_eq!(out, body);
        assert_eq!(tap.usage().unwrap().total_tokens, 7);

        let mut tap = UsageTap::new(TapMode::Events);
        run(
            &mut tap,
            &[
                "event: response.completed\ndata: {\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":6}}}\n\n",
            ],
        );
        assert_eq!(tap.usage().unwrap().total_tokens, 10);
    }

    #[test]
    fn every_two_frame_split_reads_the_same_usage() {
        let all: String = WITH_USAGE.concat();
        let five = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
        });
        for cut in 0..=all.len() {
            let frames = [&all[..cut], &all[cut..]];
            let mut tap = UsageTap::new(TapMode::Events);
            assert_eq!(run(&mut tap, &frames), all, "cut at {cut}");
            assert_eq!(tap.usage(), five, "events, cut at {cut}");
            let mut tap = UsageTap::new(TapMode::EventsHidingUsage);
            assert_eq!(run(&mut tap, &frames), WITHOUT_USAGE, "cut at {cut}");
            assert_eq!(tap.usage(), five, "hiding, cut at {cut}");
        }
        let json =
            r#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        for cut in 0..=json.len() {
            let mut tap = UsageTap::new(TapMode::Json);
            assert_eq!(run(&mut tap, &[&json[..cut], &json[cut..]]), json);
            assert_eq!(tap.usage(), five, "json, cut at {cut}");
        }
    }
}
