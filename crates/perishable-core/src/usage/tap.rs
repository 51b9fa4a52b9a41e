//! [`UsageTap`]: reads a response's `usage` as it streams past, and hides what the proxy's own
//! `include_usage` added; see the [module docs](super).

use bytes::{Bytes, BytesMut};

use super::Usage;
use super::sse::{Event, EventParser, Segment};
use crate::json::{self, Kind, MemberFinder, Mode};

/// What the tap does with the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TapMode {
    /// A JSON body: find its top-level `usage`.
    Json,
    /// An event stream: read `usage` from the events that carry it.
    Events,
    /// An event stream whose usage the proxy asked for: read it and hide it from the client.
    EventsHidingUsage,
}

/// How the upstream encoded the body (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
    Deflate,
    /// Anything else (`br`, `zstd`, ...): the usage cannot be read.
    Unknown,
}

impl Encoding {
    /// The encoding a `Content-Encoding` header names.
    pub(crate) fn of(header: Option<&http::HeaderValue>) -> Self {
        let Some(value) = header.and_then(|v| v.to_str().ok()) else {
            return Self::Identity;
        };
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("identity") {
            Self::Identity
        } else if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
            Self::Gzip
        } else if value.eq_ignore_ascii_case("deflate") {
            Self::Deflate
        } else {
            Self::Unknown
        }
    }
}

/// The largest event held back while hiding, and the largest usage value kept.
const MAX_EVENT: usize = 1024 * 1024;
const MAX_USAGE_VALUE: usize = 64 * 1024;
/// Compressed input is decoded this many bytes at a time, so one step's output stays bounded
/// (deflate expands at most about 1032 times).
const DECODE_STEP: usize = 512;
/// Past this many decoded bytes, a compressed body is no longer read (a decompression bomb costs
/// the reader nothing more; the reservation stands).
const MAX_DECODED: u64 = 256 * 1024 * 1024;

/// Reads usage from a response body as it passes; see the [module docs](self).
pub(crate) struct UsageTap {
    mode: TapMode,
    decoder: Option<Decoder>,
    /// The encoding cannot be decoded: nothing is read.
    opaque: bool,
    json: Option<MemberFinder>,
    events: Option<EventParser>,
    /// Segments completed by the latest piece (kept to reuse its allocation).
    segments: Vec<Segment>,
    /// An event was just dropped: an LF that completes its CRLF goes with it.
    dropped: bool,
    usage: Option<Usage>,
}

impl std::fmt::Debug for UsageTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageTap")
            .field("mode", &self.mode)
            .field("usage", &self.usage)
            .finish_non_exhaustive()
    }
}

impl UsageTap {
    pub(crate) fn new(mode: TapMode, encoding: Encoding) -> Self {
        let decoder = match encoding {
            Encoding::Gzip => Some(Decoder::gzip()),
            Encoding::Deflate => Some(Decoder::deflate()),
            Encoding::Identity | Encoding::Unknown => None,
        };
        Self {
            mode,
            decoder,
            opaque: encoding == Encoding::Unknown,
            json: (mode == TapMode::Json).then(|| MemberFinder::new("usage", MAX_USAGE_VALUE)),
            events: (mode != TapMode::Json).then(|| EventParser::new(MAX_EVENT)),
            segments: Vec::new(),
            dropped: false,
            usage: None,
        }
    }

    /// The usage seen so far.
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the client's body is not the upstream's: events are dropped or rewritten (and,
    /// for a compressed stream, decoded).
    pub(crate) fn rewrites(&self) -> bool {
        self.mode == TapMode::EventsHidingUsage && !self.opaque
    }

    /// Whether the client gets decoded bytes (the service then drops `Content-Encoding`).
    pub(crate) fn decodes_for_client(&self) -> bool {
        self.rewrites() && self.decoder.is_some()
    }

    /// Takes one data frame; returns what to send the client now (`None`: nothing yet).
    pub(crate) fn frame(&mut self, data: Bytes) -> Option<Bytes> {
        if self.opaque {
            return Some(data);
        }
        let plain = match self.decoder.as_mut() {
            None => data.clone(),
            Some(decoder) => match decoder.decode(&data) {
                Some(plain) => plain,
                None => {
                    // Undecodable: read nothing more, and pass the rest on as it came.
                    self.opaque = true;
                    self.decoder = None;
                    return Some(data);
                }
            },
        };
        match self.mode {
            TapMode::Json => {
                if let Some(finder) = self.json.as_mut() {
                    finder.feed(&plain);
                }
                Some(data)
            }
            TapMode::Events => {
                self.parse(&plain);
                for segment in std::mem::take(&mut self.segments) {
                    if let Segment::Event(event) = segment {
                        self.read_event(&event);
                    }
                }
                Some(data)
            }
            TapMode::EventsHidingUsage => {
                self.parse(&plain);
                self.hide()
            }
        }
    }

    /// The body ended: returns what is left to send the client.
    pub(crate) fn finish(&mut self) -> Option<Bytes> {
        if self.opaque {
            return None;
        }
        match self.mode {
            TapMode::Json => {
                if let Some(finder) = self.json.take()
                    && let Some(value) = finder.value()
                {
                    self.usage = Usage::parse(value).or(self.usage);
                }
                None
            }
            TapMode::Events => {
                if let Some(parser) = self.events.as_mut() {
                    parser.finish(&mut self.segments);
                }
                self.segments.clear();
                None
            }
            TapMode::EventsHidingUsage => {
                if let Some(parser) = self.events.as_mut() {
                    parser.finish(&mut self.segments);
                }
                self.hide()
            }
        }
    }

    fn parse(&mut self, plain: &Bytes) {
        if let Some(parser) = self.events.as_mut() {
            parser.feed(plain, &mut self.segments);
        }
    }

    /// Passes on the segments completed so far, without what the injection added.
    fn hide(&mut self) -> Option<Bytes> {
        let mut out = BytesMut::new();
        let mut single: Option<Bytes> = None;
        for segment in std::mem::take(&mut self.segments) {
            let kept = match segment {
                Segment::Event(event) => {
                    let kept = self.hide_event(&event);
                    self.dropped = kept.is_none();
                    kept
                }
                Segment::Other(bytes) => {
                    let dropped = std::mem::take(&mut self.dropped);
                    if dropped && bytes.first() == Some(&b'\n') {
                        Some(bytes.slice(1..))
                    } else {
                        Some(bytes)
                    }
                }
            };
            let Some(kept) = kept.filter(|b| !b.is_empty()) else {
                continue;
            };
            // The usual case, one event per frame, is passed on without a copy.
            match single.take() {
                None if out.is_empty() => single = Some(kept),
                previous => {
                    if let Some(previous) = previous {
                        out.extend_from_slice(&previous);
                    }
                    out.extend_from_slice(&kept);
                }
            }
        }
        single.or_else(|| (!out.is_empty()).then(|| out.freeze()))
    }

    /// One event as the client gets it: `None` to drop it.
    fn hide_event(&mut self, event: &Event) -> Option<Bytes> {
        let Some(object) = self.read_event(event) else {
            return Some(event.raw.clone());
        };
        let Some(index) = object.members.iter().rposition(|m| m.key == "usage") else {
            return Some(event.raw.clone());
        };
        let usage = &object.members[index];
        let no_choices = object.get("choices").is_some_and(|choices| {
            choices.kind == Kind::Array
                && event
                    .data
                    .get(choices.value.clone())
                    .and_then(|raw| raw.get(1..raw.len().saturating_sub(1)))
                    .is_some_and(|inside| inside.iter().all(u8::is_ascii_whitespace))
        });
        if usage.kind == Kind::Object && no_choices {
            return None;
        }
        let edit = json::remove_member(&object, index);
        Some(event.raw_without(whole_lines(&event.data, edit.range)))
    }

    /// Reads usage from one event; returns its data object when it may carry usage.
    fn read_event(&mut self, event: &Event) -> Option<json::Object> {
        if !mentions_usage(&event.data) {
            return None;
        }
        let object = json::parse_object(&event.data, Mode::Lenient).ok()?;
        if let Some(usage) = object.get("usage")
            && usage.kind == Kind::Object
            && let Some(parsed) = event.data.get(usage.value.clone()).and_then(Usage::parse)
        {
            self.usage = Some(parsed);
        } else if let Some(response) = object.get("response")
            && response.kind == Kind::Object
            && let Some(raw) = event.data.get(response.value.clone())
            && let Ok(inner) = json::parse_object(raw, Mode::Lenient)
            && let Some(usage) = inner.get("usage")
            && usage.kind == Kind::Object
            && let Some(parsed) = raw.get(usage.value.clone()).and_then(Usage::parse)
        {
            self.usage = Some(parsed);
        }
        Some(object)
    }
}

/// `range` (a member and its comma), widened to whole lines when the member sits on lines of its
/// own, as pretty-printed JSON over several `data:` lines puts it: from the start of its first
/// line to the start of the line after it. The event then loses those lines entirely
/// ([`Event::raw_without`]), as if they had never been written, instead of keeping them empty.
fn whole_lines(data: &[u8], range: std::ops::Range<usize>) -> std::ops::Range<usize> {
    let line_start = |at: usize| {
        data.get(..at)
            .and_then(|before| memchr::memrchr(b'\n', before))
            .map_or(0, |newline| newline + 1)
    };
    let blank = |r: std::ops::Range<usize>| {
        data.get(r)
            .is_some_and(|bytes| bytes.iter().all(u8::is_ascii_whitespace))
    };
    let (from, to) = (line_start(range.start), line_start(range.end));
    if from > 0 && to > range.start && blank(from..range.start) && blank(to..range.end) {
        from..to
    } else {
        range
    }
}

/// Whether `data` could hold a member named `usage`: it contains the word, or a `\u00XX` escape
/// of one of its letters (a key may spell any letter that way). Never wrong the other way: data
/// this refuses cannot name `usage`.
fn mentions_usage(data: &[u8]) -> bool {
    if memchr::memmem::find(data, b"usage").is_some() {
        return true;
    }
    memchr::memmem::find_iter(data, b"\\u00").any(|at| {
        let hex = data.get(at + 4..at + 6).unwrap_or_default();
        let lower = hex.to_ascii_lowercase();
        matches!(&lower[..], b"75" | b"73" | b"61" | b"67" | b"65")
    })
}

/// A gzip or deflate decoder that yields its output in bounded steps.
struct Decoder {
    kind: DecoderKind,
    decoded: u64,
}

enum DecoderKind {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    /// HTTP's `deflate` is zlib-wrapped, though some servers send raw deflate: decided from the
    /// first two bytes.
    Deflate(Option<DeflateKind>),
}

enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

impl Decoder {
    fn gzip() -> Self {
        Self {
            kind: DecoderKind::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            decoded: 0,
        }
    }

    fn deflate() -> Self {
        Self {
            kind: DecoderKind::Deflate(None),
            decoded: 0,
        }
    }

    /// Decodes one piece; `None` when it cannot be decoded (or decodes to too much).
    fn decode(&mut self, input: &[u8]) -> Option<Bytes> {
        use std::io::Write;
        let mut out = BytesMut::new();
        for step in input.chunks(DECODE_STEP) {
            let sink = match &mut self.kind {
                // `flush` hands over what this step decoded: without it the decoder keeps the
                // output until the next write, one frame late (or never, for the last).
                DecoderKind::Gzip(d) => {
                    d.write_all(step).ok()?;
                    d.flush().ok()?;
                    d.get_mut()
                }
                DecoderKind::Deflate(kind) => {
                    let d = kind.get_or_insert_with(|| {
                        let zlib = step.len() >= 2
                            && step[0] & 0x0f == 8
                            && (u16::from(step[0]) << 8 | u16::from(step[1])) % 31 == 0;
                        if zlib {
                            DeflateKind::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
                        } else {
                            DeflateKind::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
                        }
                    });
                    match d {
                        DeflateKind::Zlib(d) => {
                            d.write_all(step).ok()?;
                            d.flush().ok()?;
                            d.get_mut()
                        }
                        DeflateKind::Raw(d) => {
                            d.write_all(step).ok()?;
                            d.flush().ok()?;
                            d.get_mut()
                        }
                    }
                }
            };
            self.decoded += sink.len() as u64;
            if self.decoded > MAX_DECODED {
                return None;
            }
            out.extend_from_slice(sink);
            sink.clear();
        }
        Some(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tap: &mut UsageTap, frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            if let Some(b) = tap.frame(Bytes::copy_from_slice(f)) {
                out.extend_from_slice(&b);
            }
        }
        if let Some(b) = tap.finish() {
            out.extend_from_slice(&b);
        }
        out
    }

    fn tap(mode: TapMode) -> UsageTap {
        UsageTap::new(mode, Encoding::Identity)
    }

    const FIVE: Usage = Usage {
        prompt_tokens: 3,
        completion_tokens: 2,
        total_tokens: 5,
    };

    #[test]
    fn any_spelling_of_usage_is_read_and_hidden() {
        for (with, without) in [
            // OpenAI's compact spelling.
            (
                "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\ndata: [DONE]\n\n",
                "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n",
            ),
            // Python's json.dumps, CRLF line ends.
            (
                "data: {\"id\": \"c\", \"choices\": [{\"delta\": {\"content\": \"Hi\"}}], \"usage\": null}\r\n\r\ndata: {\"id\": \"c\", \"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 2, \"total_tokens\": 5}}\r\n\r\ndata: [DONE]\r\n\r\n",
                "data: {\"id\": \"c\", \"choices\": [{\"delta\": {\"content\": \"Hi\"}}]}\r\n\r\ndata: [DONE]\r\n\r\n",
            ),
            // The usage member first, CR line ends.
            (
                "data: {\"usage\": null, \"choices\": [{\"delta\": {}}]}\r\rdata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2},\"choices\":[ ]}\r\r",
                "data: {\"choices\": [{\"delta\": {}}]}\r\r",
            ),
            // Usage on the final choice chunk, an escaped key.
            (
                "data: {\"choices\":[{\"finish_reason\":\"stop\"}],\"\\u0075sage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
                "data: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\n",
            ),
        ] {
            let mut t = tap(TapMode::EventsHidingUsage);
            let out = run(&mut t, &[with.as_bytes()]);
            assert_eq!(String::from_utf8(out).unwrap(), without, "{with}");
            assert_eq!(t.usage(), Some(FIVE), "{with}");
            // Every split reads and hides the same.
            for cut in 0..=with.len() {
                let mut t = tap(TapMode::EventsHidingUsage);
                let out = run(&mut t, &[&with.as_bytes()[..cut], &with.as_bytes()[cut..]]);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    without,
                    "cut {cut}: {with}"
                );
                assert_eq!(t.usage(), Some(FIVE));
                let mut t = tap(TapMode::Events);
                let out = run(&mut t, &[&with.as_bytes()[..cut], &with.as_bytes()[cut..]]);
                assert_eq!(out, with.as_bytes(), "observing changes nothing");
                assert_eq!(t.usage(), Some(FIVE));
            }
        }
    }

    #[test]
    fn pretty_events_lose_the_usage_lines_entirely() {
        for (with, without) in [
            // A member in the middle, on a line of its own.
            (
                "data: {\ndata:   \"usage\": null,\ndata:   \"choices\": [1]\ndata: }\n\n",
                "data: {\ndata:   \"choices\": [1]\ndata: }\n\n",
            ),
            // The last member, its comma on the line before, CRLF line ends.
            (
                "data: {\r\ndata:   \"choices\": [1],\r\ndata:   \"usage\": null\r\ndata: }\r\n\r\n",
                "data: {\r\ndata:   \"choices\": [1]\r\ndata: }\r\n\r\n",
            ),
            // A usage object over several lines, on a choice chunk.
            (
                "data: {\ndata:   \"choices\": [1],\ndata:   \"usage\": {\ndata:     \"prompt_tokens\": 3,\ndata:     \"completion_tokens\": 2\ndata:   },\ndata:   \"id\": \"x\"\ndata: }\n\n",
                "data: {\ndata:   \"choices\": [1],\ndata:   \"id\": \"x\"\ndata: }\n\n",
            ),
        ] {
            let mut t = tap(TapMode::EventsHidingUsage);
            let out = run(&mut t, &[with.as_bytes()]);
            assert_eq!(String::from_utf8(out).unwrap(), without, "{with}");
        }
    }

    #[test]
    fn pretty_events_over_several_data_lines() {
        let with = "data: {\n data:   \"choices\": [],\ndata:   \"usage\": {\"prompt_tokens\": 3,\ndata: \"completion_tokens\": 2}\ndata: }\n\n";
        let mut t = tap(TapMode::Events);
        run(&mut t, &[with.as_bytes()]);
        assert_eq!(t.usage(), Some(FIVE));
    }

    #[test]
    fn responses_api_completed_event() {
        let mut t = tap(TapMode::Events);
        run(
            &mut t,
            &[b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\nevent: response.completed\ndata: {\"type\": \"response.completed\", \"response\": {\"usage\": {\"input_tokens\": 3, \"output_tokens\": 2}}}\n\n"],
        );
        assert_eq!(t.usage(), Some(FIVE));
    }

    #[test]
    fn complete_events_are_not_held_back() {
        let mut t = tap(TapMode::EventsHidingUsage);
        let first = t.frame(Bytes::from_static(
            b"data: {\"choices\":[{}],\"usage\":null}\r\n\r\n",
        ));
        assert_eq!(
            first.as_deref(),
            Some(&b"data: {\"choices\":[{}]}\r\n\r\n"[..])
        );
        let partial = t.frame(Bytes::from_static(b"data: {\"id\""));
        assert!(partial.is_none(), "half an event waits for its end");
    }

    #[test]
    fn json_usage_anywhere_in_a_large_body() {
        let body = format!(
            "{{\"id\": \"x\", \"usage\": {{\"prompt_tokens\": 3, \"completion_tokens\": 2}}, \"metadata\": {{\"padding\": \"{}\"}}}}",
            "x".repeat(100_000)
        );
        let mut t = tap(TapMode::Json);
        let frames: Vec<&[u8]> = body.as_bytes().chunks(1000).collect();
        let out = run(&mut t, &frames);
        assert_eq!(out, body.as_bytes());
        assert_eq!(t.usage(), Some(FIVE));
    }

    #[test]
    fn gzip_is_decoded_for_the_reader_and_passed_on_as_sent() {
        use std::io::Write;
        let body = br#"{"object":"list","usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(body).unwrap();
        let gz = encoder.finish().unwrap();
        let mut t = UsageTap::new(TapMode::Json, Encoding::Gzip);
        let frames: Vec<&[u8]> = gz.chunks(7).collect();
        assert_eq!(run(&mut t, &frames), gz);
        assert_eq!(t.usage(), Some(FIVE));
        // An encoding it cannot read: untouched, no usage.
        let mut t = UsageTap::new(TapMode::EventsHidingUsage, Encoding::Unknown);
        assert_eq!(run(&mut t, &[b"abc"]), b"abc");
        assert_eq!(t.usage(), None);
    }

    #[test]
    fn a_usage_free_event_is_not_parsed_but_an_escaped_one_is() {
        assert!(!mentions_usage(
            br#"{"choices":[{"delta":{"content":"caf\u00e9"}}]}"#
        ));
        assert!(mentions_usage(br#"{"\u0075sage":null}"#));
        assert!(mentions_usage(br#"{"u\u0073age":null}"#));
    }
}
