//! An incremental event-stream (server-sent events) parser, per the WHATWG HTML standard,
//! "9.2.6 Interpreting an event stream", that keeps every byte it is given.
//!
//! The usage tap needs two views of each event: its raw bytes, to forward them (or drop them)
//! exactly as the upstream sent them, and its decoded data, to read the JSON in it. [`EventParser`]
//! cuts the stream into [`Segment`]s whose raw bytes, concatenated, give back the input exactly;
//! each complete [`Event`] also carries its data buffer and where each data line's value sits in
//! the raw bytes, so [`Event::raw_without`] can delete a byte range of the data (a JSON member,
//! even one spread over several `data:` lines) and still produce a well-formed event.
//!
//! The rules, as the standard gives them:
//!
//! - Lines end with CRLF, LF or CR. A CR ends its line at once; an LF right after it (even in
//!   the next piece) belongs to the same line end.
//! - A blank line dispatches the event. Lines that start with `:` are comments.
//! - `field:value`, with one leading space of the value stripped; a line without a colon is a
//!   field whose value is empty.
//! - `data` appends its value and a `\n` to the data buffer, whose last `\n` is removed at
//!   dispatch (so the data is the values joined with `\n`); `event` sets the event type; `id`
//!   (ignored when it contains NUL) and `retry` set the stream's last event ID and reconnection
//!   time, which a proxy has no use for: they are recognised and dropped. Other fields are ignored.
//! - A UTF-8 byte order mark at the very start of the stream is skipped, once.
//!
//! Choices the standard leaves open, since it describes a consumer that keeps only what it
//! dispatches:
//!
//! - Data stays bytes: the standard decodes the stream as UTF-8 first (invalid sequences become
//!   U+FFFD); since CR, LF and `:` are ASCII, cutting lines and fields on bytes gives the same
//!   structure, and invalid UTF-8 is left for the JSON parser to refuse. Only the event type is
//!   decoded (lossily).
//! - Every blank line closes an [`Event`], even one with no data line (comments only, `event:
//!   ping`, or a bare blank line between events such as the third `\n` of `\n\n\n`, which is an
//!   `Event` whose raw bytes are that line end and nothing else). Such an event has empty
//!   `data_lines`; the standard would not dispatch it, but its bytes must still be forwarded.
//!   An event has `data_lines` non-empty exactly when the standard dispatches it (`data` alone,
//!   with no colon, dispatches an event with empty data).
//! - An event's raw bytes end with the line end of its blank line. When that line end is a CRLF
//!   whose LF arrives in a later piece, the event has already been emitted at the CR, and the LF
//!   comes out as [`Segment::Other`].
//! - An event longer than `max_event_bytes` (counting its bytes up to, not including, the line
//!   end of its blank line) is never held: once it is seen to be too long, its bytes so far and
//!   the rest of it come out as [`Segment::Other`] as they arrive, and its data is not decoded.
//!   Whether an event is too long does not depend on how the stream is split.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use memchr::{memchr, memchr2};

/// The UTF-8 byte order mark.
const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// One piece of the stream, in order. Concatenating `raw` of every segment gives back the input
/// exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// A complete event: its lines up to and including the line end of the blank line that
    /// dispatched it.
    Event(Event),
    /// Bytes that belong to no event: a leading BOM; the LF of a CRLF whose CR ended the blank
    /// line of the previous event (arriving in the next piece); the bytes of an over-long event;
    /// the unfinished event at the end of the stream.
    Other(Bytes),
}

/// A complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// Every byte of the event as received.
    pub(crate) raw: Bytes,
    /// The data buffer per WHATWG: the `data` values joined with `\n` (no trailing `\n`). Empty
    /// when the event has no data line.
    pub(crate) data: Vec<u8>,
    /// Where each data line's value sits: `raw[line.value]` is the value (after `data:` and the
    /// one optional space), and it starts at `line.offset` in `data`. In stream order.
    pub(crate) data_lines: Vec<DataLine>,
    /// The last `event` field value, if any (`Some("")` for `event:` with an empty value).
    pub(crate) event_type: Option<String>,
}

/// Where one data line's value sits, in [`Event::raw`] and in [`Event::data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DataLine {
    /// The value's bytes in `raw`.
    pub(crate) value: Range<usize>,
    /// Where the value starts in `data`.
    pub(crate) offset: usize,
}

impl Event {
    /// `raw` with the bytes of `data[range]` removed, line by line.
    ///
    /// For each data line, the part of its value that falls in `range` is cut. A data line whose
    /// whole value falls in `range` together with one of the `\n`s that join it to its
    /// neighbours goes entirely (its `data:` prefix and its line end too), and takes that `\n`
    /// with it: this is how a member printed on lines of its own (pretty-printed JSON over
    /// several `data:` lines) is removed as if it had never been written. Everything else is
    /// kept: other fields, comments, the line ends of kept lines. The result is a well-formed
    /// event whose data is `data[..range.start]` + the `\n`s of `data[range]` that no removed
    /// line took + `data[range.end..]`.
    ///
    /// Since `\n` is JSON whitespace, deleting a whole JSON member (with its comma) leaves valid
    /// JSON. A data line cut down to nothing whose joining `\n`s are not in `range` stays as an
    /// empty `data:` line. When a cut removes the start of a value written without the optional
    /// space (`data:x y`) and what is left starts with a space, a space is put after the colon
    /// so the remaining space is not taken for the optional one.
    ///
    /// `range` is clamped to `data`; an empty range gives `raw` back unchanged.
    pub(crate) fn raw_without(&self, range: Range<usize>) -> Bytes {
        let end = range.end.min(self.data.len());
        let start = range.start.min(end);
        if start == end {
            return self.raw.clone();
        }
        // The data lines come from the parser; a hand-made event whose positions do not fit
        // `raw` is given back unchanged rather than cut wrongly.
        self.cut(start, end)
            .map_or_else(|| self.raw.clone(), Bytes::from)
    }

    fn cut(&self, start: usize, end: usize) -> Option<Vec<u8>> {
        let raw: &[u8] = &self.raw;
        let mut out = Vec::with_capacity(raw.len());
        // Raw bytes up to here are already in `out` (or cut).
        let mut copied = 0;
        // Whether the `\n` joining the current line to the previous one is still in the data
        // (a removed line takes one with it).
        let mut joined_before = true;
        let last = self.data_lines.len().saturating_sub(1);
        for (i, line) in self.data_lines.iter().enumerate() {
            let len = line.value.end.checked_sub(line.value.start)?;
            let line_end = line.offset + len;
            let whole = start <= line.offset && line_end <= end;
            let newline_before = i > 0 && joined_before && start < line.offset;
            let newline_after = i < last && line_end < end;
            if whole && (newline_before || newline_after) {
                let (from, to) = self.line_bounds(line)?;
                out.extend_from_slice(raw.get(copied..from)?);
                copied = to;
                // The `\n` before goes with the line when it is in the range; else the one after
                // does, and the next line is then no longer joined to anything before it.
                joined_before = newline_before;
                continue;
            }
            joined_before = true;
            let cut_from = start.clamp(line.offset, line_end);
            let cut_to = end.clamp(cut_from, line_end);
            if cut_from == cut_to {
                continue;
            }
            let raw_from = line.value.start + (cut_from - line.offset);
            let raw_to = line.value.start + (cut_to - line.offset);
            out.extend_from_slice(raw.get(copied..raw_from)?);
            let no_space = line
                .value
                .start
                .checked_sub(1)
                .and_then(|colon| raw.get(colon))
                == Some(&b':');
            if raw_from == line.value.start
                && raw_to < line.value.end
                && raw.get(raw_to) == Some(&b' ')
                && no_space
            {
                out.push(b' ');
            }
            copied = raw_to;
        }
        out.extend_from_slice(raw.get(copied..)?);
        Some(out)
    }

    /// Where a data line starts (its `data` field name) and ends (after its line end) in `raw`.
    fn line_bounds(&self, line: &DataLine) -> Option<(usize, usize)> {
        let raw: &[u8] = &self.raw;
        let colon = if raw.get(line.value.start.checked_sub(1)?) == Some(&b':') {
            line.value.start - 1
        } else {
            // `data: value`: the optional space sits between the colon and the value.
            line.value.start.checked_sub(2)?
        };
        let from = colon.checked_sub(b"data".len())?;
        if raw.get(from..=colon)? != b"data:" {
            return None;
        }
        let to = match raw.get(line.value.end) {
            Some(b'\r') if raw.get(line.value.end + 1) == Some(&b'\n') => line.value.end + 2,
            Some(b'\r' | b'\n') => line.value.end + 1,
            _ => return None,
        };
        Some((from, to))
    }
}

/// The fields of the event being read, from its complete lines.
#[derive(Debug, Default)]
struct Fields {
    data: Vec<u8>,
    data_lines: Vec<DataLine>,
    event_type: Option<String>,
}

impl Fields {
    fn clear(&mut self) {
        self.data.clear();
        self.data_lines.clear();
        self.event_type = None;
    }

    fn take_event(&mut self, raw: Bytes) -> Event {
        Event {
            raw,
            data: std::mem::take(&mut self.data),
            data_lines: std::mem::take(&mut self.data_lines),
            event_type: self.event_type.take(),
        }
    }

    /// Reads one complete, non-blank line that starts `at` bytes into the event.
    fn line(&mut self, line: &[u8], at: usize) {
        let (name, value_start) = match memchr(b':', line) {
            Some(0) => return, // a comment
            Some(colon) => {
                let space = line.get(colon + 1) == Some(&b' ');
                (
                    line.get(..colon).unwrap_or_default(),
                    colon + 1 + usize::from(space),
                )
            }
            None => (line, line.len()),
        };
        let value = line.get(value_start..).unwrap_or_default();
        match name {
            b"data" => {
                if !self.data_lines.is_empty() {
                    self.data.push(b'\n');
                }
                self.data_lines.push(DataLine {
                    value: at + value_start..at + line.len(),
                    offset: self.data.len(),
                });
                self.data.extend_from_slice(value);
            }
            b"event" => self.event_type = Some(String::from_utf8_lossy(value).into_owned()),
            // `id` and `retry` (and any other field) change nothing the proxy reads.
            _ => {}
        }
    }
}

/// What the parser is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// At the start of the stream: `buf` holds the bytes of a BOM matched so far.
    Bom,
    /// Reading an event: `buf` holds its bytes that came in earlier pieces.
    Event,
    /// Passing on an over-long event until its blank line.
    Skip {
        /// The last byte passed on ended a line (so a line end now makes a blank line).
        at_line_start: bool,
    },
}

/// An incremental WHATWG event-stream parser that keeps at most one incomplete event.
#[derive(Debug)]
pub(crate) struct EventParser {
    max_event_bytes: usize,
    mode: Mode,
    /// The held bytes: a partial BOM, or the incomplete event.
    buf: BytesMut,
    /// Where the current line starts, counted from the start of the event.
    line_start: usize,
    /// The fields of the incomplete event's complete lines.
    fields: Fields,
    /// The last byte seen was a CR that ended a line: an LF next belongs to that line end.
    after_cr: bool,
}

/// Where the line end found at `at` ends, and whether it is a CR at the very end of `bytes`
/// (so an LF may follow in the next piece).
fn line_end(bytes: &[u8], at: usize) -> (usize, bool) {
    if bytes.get(at) == Some(&b'\r') {
        match bytes.get(at + 1) {
            Some(b'\n') => (at + 2, false),
            Some(_) => (at + 1, false),
            None => (at + 1, true),
        }
    } else {
        (at + 1, false)
    }
}

impl EventParser {
    /// `max_event_bytes`: an event longer than this (not counting the line end of its blank
    /// line) is not held: its bytes so far and the rest of it, until its blank line, come out
    /// as [`Segment::Other`] (and its data is not decoded), so memory stays bounded.
    pub(crate) fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            mode: Mode::Bom,
            buf: BytesMut::new(),
            line_start: 0,
            fields: Fields::default(),
            after_cr: false,
        }
    }

    /// Bytes currently held: the incomplete event (or the first bytes of a BOM, at most 2).
    /// Never more than `max_event_bytes` for an event.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next piece of the stream, split anywhere, and appends to `out` every segment
    /// this piece completes, in order. An event comes out as soon as the line end of its blank
    /// line is seen (at the CR of a CRLF, without waiting for the LF).
    pub(crate) fn feed(&mut self, piece: &Bytes, out: &mut Vec<Segment>) {
        let bytes: &[u8] = piece;
        if bytes.is_empty() {
            return;
        }
        let mut pos = 0;
        if self.mode == Mode::Bom {
            while let (Some(&byte), Some(&want)) = (bytes.get(pos), BOM.get(self.buf.len())) {
                if byte != want {
                    break;
                }
                self.buf.extend_from_slice(&[byte]);
                pos += 1;
            }
            if self.buf.len() == BOM.len() {
                self.buf.clear();
                out.push(Segment::Other(if pos == BOM.len() {
                    piece.slice(..pos)
                } else {
                    Bytes::from_static(BOM)
                }));
            } else if pos == bytes.len() {
                return; // maybe a BOM still
            }
            // Otherwise not a BOM: what matched is the start of the first line.
            self.mode = Mode::Event;
        }

        // Where the bytes not yet emitted or held begin: the event's part in this piece (its
        // offset in the event is `buf.len()`), or the over-long bytes still to pass on.
        let mut from = pos;
        if std::mem::take(&mut self.after_cr) && bytes.get(pos) == Some(&b'\n') {
            // The LF of a CRLF whose CR ended the previous piece.
            pos += 1;
            match self.mode {
                Mode::Event if self.buf.is_empty() => {
                    // The CR ended a blank line: that event is out already.
                    out.push(Segment::Other(piece.slice(from..pos)));
                    from = pos;
                }
                // Part of the held event, copied with what follows it.
                Mode::Event => self.line_start += 1,
                // Passed on with what follows it.
                Mode::Bom | Mode::Skip { .. } => {}
            }
        }

        loop {
            let rest = bytes.get(pos..).unwrap_or_default();
            let found = memchr2(b'\r', b'\n', rest).map(|at| pos + at);
            match self.mode {
                Mode::Skip { at_line_start } => {
                    let Some(at) = found else {
                        self.mode = Mode::Skip {
                            at_line_start: at_line_start && rest.is_empty(),
                        };
                        if from < bytes.len() {
                            out.push(Segment::Other(piece.slice(from..)));
                        }
                        return;
                    };
                    let (end, cr) = line_end(bytes, at);
                    self.after_cr = cr;
                    let blank = at_line_start && at == pos;
                    pos = end;
                    self.mode = Mode::Skip {
                        at_line_start: true,
                    };
                    if blank {
                        out.push(Segment::Other(piece.slice(from..end)));
                        from = end;
                        self.mode = Mode::Event;
                        self.line_start = 0;
                    }
                }
                Mode::Event | Mode::Bom => {
                    let Some(at) = found else {
                        self.hold_rest(piece, from, out);
                        return;
                    };
                    let (end, cr) = line_end(bytes, at);
                    self.after_cr = cr;
                    pos = end;
                    from = self.end_line(piece, from, at, end, out);
                }
            }
        }
    }

    /// A line of the event (starting at `line_start` in the event) ended: its content ends at
    /// `at` in the piece and its line end at `end`. The event's part in this piece starts at
    /// `from`, right after the held bytes. Returns where the bytes not yet emitted or held now
    /// begin: `from` again when the event goes on in this piece, `end` otherwise.
    fn end_line(
        &mut self,
        piece: &Bytes,
        from: usize,
        at: usize,
        end: usize,
        out: &mut Vec<Segment>,
    ) -> usize {
        let held = self.buf.len();
        let content_end = held + (at - from);
        let blank = content_end == self.line_start;
        let length = if blank {
            content_end
        } else {
            held + (end - from)
        };
        if length > self.max_event_bytes {
            self.pass_on(piece, from, end, out);
            self.mode = if blank {
                Mode::Event
            } else {
                Mode::Skip {
                    at_line_start: true,
                }
            };
            return end;
        }
        if held > 0 {
            self.buf
                .extend_from_slice(piece.get(from..end).unwrap_or_default());
        }
        if blank {
            let raw = if held > 0 {
                self.buf.split().freeze()
            } else {
                piece.slice(from..end)
            };
            out.push(Segment::Event(self.fields.take_event(raw)));
            self.line_start = 0;
            return end;
        }
        let event: &[u8] = if held > 0 {
            &self.buf
        } else {
            piece.get(from..).unwrap_or_default()
        };
        let line = event.get(self.line_start..content_end).unwrap_or_default();
        self.fields.line(line, self.line_start);
        self.line_start = content_end + (end - at);
        if held > 0 { end } else { from }
    }

    /// The piece ended inside an event that starts (in this piece) at `from`: hold it, or pass
    /// it on if it is too long already.
    fn hold_rest(&mut self, piece: &Bytes, from: usize, out: &mut Vec<Segment>) {
        let rest = piece.get(from..).unwrap_or_default();
        let length = self.buf.len() + rest.len();
        if length > self.max_event_bytes {
            let at_line_start = length == self.line_start;
            self.pass_on(piece, from, piece.len(), out);
            self.mode = Mode::Skip { at_line_start };
        } else {
            self.buf.extend_from_slice(rest);
        }
    }

    /// Passes on the held bytes and `piece[from..end]` as [`Segment::Other`], and forgets the
    /// event.
    fn pass_on(&mut self, piece: &Bytes, from: usize, end: usize, out: &mut Vec<Segment>) {
        if !self.buf.is_empty() {
            out.push(Segment::Other(self.buf.split().freeze()));
        }
        if from < end {
            out.push(Segment::Other(piece.slice(from..end)));
        }
        self.fields.clear();
        self.line_start = 0;
    }

    /// The stream ended: the incomplete event held (if any) comes out as [`Segment::Other`]
    /// (per WHATWG an unfinished event is not dispatched, but its bytes must still be
    /// forwarded). The parser is then ready for a new stream.
    pub(crate) fn finish(&mut self, out: &mut Vec<Segment>) {
        if !self.buf.is_empty() {
            out.push(Segment::Other(self.buf.split().freeze()));
        }
        self.mode = Mode::Bom;
        self.line_start = 0;
        self.fields.clear();
        self.after_cr = false;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    /// Feeds `pieces` to a parser, then finishes; returns the segments.
    fn parse_pieces(max: usize, pieces: &[&[u8]]) -> Vec<Segment> {
        let mut parser = EventParser::new(max);
        let mut out = Vec::new();
        for piece in pieces {
            parser.feed(&Bytes::copy_from_slice(piece), &mut out);
        }
        parser.finish(&mut out);
        out
    }

    fn parse(input: &[u8]) -> Vec<Segment> {
        parse_pieces(usize::MAX, &[input])
    }

    fn joined(segments: &[Segment]) -> Vec<u8> {
        let mut all = Vec::new();
        for segment in segments {
            match segment {
                Segment::Event(event) => all.extend_from_slice(&event.raw),
                Segment::Other(bytes) => all.extend_from_slice(bytes),
            }
        }
        all
    }

    fn events(segments: &[Segment]) -> Vec<&Event> {
        segments
            .iter()
            .filter_map(|segment| match segment {
                Segment::Event(event) => Some(event),
                Segment::Other(_) => None,
            })
            .collect()
    }

    /// The data of every event, as strings.
    fn datas(segments: &[Segment]) -> Vec<String> {
        events(segments)
            .iter()
            .map(|event| String::from_utf8(event.data.clone()).unwrap())
            .collect()
    }

    /// Parses `input` whole, byte by byte, and split at every point in two; checks the bytes
    /// come back and the events are the same each way; returns the whole parse.
    fn parse_every_way(input: &[u8]) -> Vec<Segment> {
        let whole = parse(input);
        assert_eq!(joined(&whole), input);
        let strip = |segments: &[Segment]| -> Vec<(Vec<u8>, Option<String>, usize)> {
            events(segments)
                .iter()
                .map(|e| (e.data.clone(), e.event_type.clone(), e.data_lines.len()))
                .collect()
        };
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        let one_by_one = parse_pieces(usize::MAX, &bytewise);
        assert_eq!(joined(&one_by_one), input);
        assert_eq!(strip(&one_by_one), strip(&whole));
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let two = parse_pieces(usize::MAX, &[a, b]);
            assert_eq!(joined(&two), input, "cut at {cut}");
            assert_eq!(strip(&two), strip(&whole), "cut at {cut}");
        }
        whole
    }

    #[test]
    fn lf_line_ends() {
        let out = parse_every_way(b"data: a\n\ndata: b\n\n");
        assert_eq!(datas(&out), ["a", "b"]);
        let Segment::Event(first) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(&first.raw[..], b"data: a\n\n");
        assert_eq!(
            first.data_lines,
            [DataLine {
                value: 6..7,
                offset: 0
            }]
        );
        assert_eq!(first.event_type, None);
    }

    #[test]
    fn crlf_line_ends() {
        let out = parse_every_way(b"data: a\r\n\r\ndata: b\r\n\r\n");
        assert_eq!(datas(&out), ["a", "b"]);
        assert_eq!(out.len(), 2);
        // The CR of the blank line completes the event; its LF, in the next piece, is `Other`.
        let split = parse_pieces(usize::MAX, &[b"data: a\r\n\r", b"\ndata: b\r", b"\n\r\n"]);
        assert_eq!(
            split,
            [
                Segment::Event(Event {
                    raw: Bytes::from_static(b"data: a\r\n\r"),
                    data: b"a".to_vec(),
                    data_lines: vec![DataLine {
                        value: 6..7,
                        offset: 0
                    }],
                    event_type: None,
                }),
                Segment::Other(Bytes::from_static(b"\n")),
                Segment::Event(Event {
                    raw: Bytes::from_static(b"data: b\r\n\r\n"),
                    data: b"b".to_vec(),
                    data_lines: vec![DataLine {
                        value: 6..7,
                        offset: 0
                    }],
                    event_type: None,
                }),
            ]
        );
    }

    #[test]
    fn cr_line_ends() {
        let out = parse_every_way(b"data: a\r\rdata: b\rdata: c\r\r");
        assert_eq!(datas(&out), ["a", "b\nc"]);
    }

    #[test]
    fn cr_completes_the_event_at_once() {
        let mut parser = EventParser::new(usize::MAX);
        let mut out = Vec::new();
        parser.feed(&Bytes::from_static(b"data: a\r\r"), &mut out);
        assert_eq!(datas(&out), ["a"]);
        assert_eq!(parser.held(), 0);
        // A CR then a lone LF in the next piece are one line end, not a second blank line.
        parser.feed(&Bytes::from_static(b"\n"), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], Segment::Other(Bytes::from_static(b"\n")));
        // But a CR, then a CR: a CR line end and a blank line.
        parser.feed(&Bytes::from_static(b"data: b\r"), &mut out);
        parser.feed(&Bytes::from_static(b"\r"), &mut out);
        assert_eq!(datas(&out), ["a", "b"]);
    }

    #[test]
    fn mixed_line_ends() {
        let out = parse_every_way(b"data: a\r\ndata: b\rdata: c\n\r\nevent: x\rdata: d\r\n\n");
        assert_eq!(datas(&out), ["a\nb\nc", "d"]);
        assert_eq!(events(&out)[1].event_type.as_deref(), Some("x"));
    }

    #[test]
    fn several_data_lines() {
        let input = b"data: a\ndata: b\n\n";
        let out = parse_every_way(input);
        assert_eq!(datas(&out), ["a\nb"]);
        let event = events(&out)[0];
        assert_eq!(
            event.data_lines,
            [
                DataLine {
                    value: 6..7,
                    offset: 0
                },
                DataLine {
                    value: 14..15,
                    offset: 2
                },
            ]
        );
        for line in &event.data_lines {
            let len = line.value.len();
            assert_eq!(
                event.raw[line.value.clone()],
                event.data[line.offset..line.offset + len]
            );
        }
    }

    #[test]
    fn one_optional_space() {
        assert_eq!(datas(&parse_every_way(b"data:x\n\n")), ["x"]);
        assert_eq!(datas(&parse_every_way(b"data:  x\n\n")), [" x"]);
        assert_eq!(datas(&parse_every_way(b"data: \n\n")), [""]);
        assert_eq!(datas(&parse_every_way(b"data:x: y\n\n")), ["x: y"]);
    }

    #[test]
    fn comments() {
        let out = parse_every_way(b": keep-alive\n\n:data: no\ndata: yes\n: more\n\n");
        assert_eq!(datas(&out), ["", "yes"]);
        let keep_alive = events(&out)[0];
        assert_eq!(&keep_alive.raw[..], b": keep-alive\n\n");
        assert!(keep_alive.data_lines.is_empty());
    }

    #[test]
    fn event_id_and_retry_fields() {
        let out = parse_every_way(
            b"event: first\nid: 7\nretry: 1000\nevent: delta\ndata: d\nid: a\0b\n\nevent: ping\n\nevent:\ndata: e\n\n",
        );
        assert_eq!(datas(&out), ["d", "", "e"]);
        let types: Vec<_> = events(&out).iter().map(|e| e.event_type.clone()).collect();
        assert_eq!(
            types,
            [
                Some("delta".to_owned()),
                Some("ping".to_owned()),
                Some(String::new())
            ]
        );
    }

    #[test]
    fn event_type_is_lossy_utf8() {
        let out = parse_every_way(b"event: \xFFx\ndata: \xFF\n\n");
        assert_eq!(events(&out)[0].event_type.as_deref(), Some("\u{FFFD}x"));
        assert_eq!(events(&out)[0].data, b"\xFF");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let out = parse_every_way(b"foo: bar\ndata: d\nDATA: no\ndatas: no\n data: no\nbaz\n\n");
        assert_eq!(datas(&out), ["d"]);
        assert_eq!(events(&out)[0].data_lines.len(), 1);
    }

    #[test]
    fn a_line_without_colon_is_a_field_with_an_empty_value() {
        let out = parse_every_way(b"data\n\n");
        let event = events(&out)[0];
        assert_eq!(event.data, b"");
        assert_eq!(
            event.data_lines,
            [DataLine {
                value: 4..4,
                offset: 0
            }]
        );
        assert_eq!(datas(&parse_every_way(b"data\ndata\n\n")), ["\n"]);
        assert_eq!(
            datas(&parse_every_way(b"data: a\ndata\ndata: b\n\n")),
            ["a\n\nb"]
        );
        let out = parse_every_way(b"event\ndata: x\n\n");
        assert_eq!(events(&out)[0].event_type.as_deref(), Some(""));
    }

    #[test]
    fn blank_lines_between_events_are_empty_events() {
        let out = parse_every_way(b"\ndata: a\n\n\n\r\n");
        let raws: Vec<&[u8]> = events(&out).iter().map(|e| &e.raw[..]).collect();
        assert_eq!(raws, [&b"\n"[..], b"data: a\n\n", b"\n", b"\r\n"]);
        assert!(
            events(&out)
                .iter()
                .all(|e| e.data.is_empty() || e.data == b"a")
        );
        assert_eq!(
            events(&out)
                .iter()
                .filter(|e| !e.data_lines.is_empty())
                .count(),
            1
        );
    }

    #[test]
    fn a_bom_at_the_start_is_skipped_once() {
        let out = parse_every_way(b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n");
        assert_eq!(out[0], Segment::Other(Bytes::from_static(BOM)));
        // The second BOM is part of the line: the field is not `data`.
        assert_eq!(datas(&out), ["a", ""]);
        let split = parse_pieces(usize::MAX, &[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"]);
        assert_eq!(split[0], Segment::Other(Bytes::from_static(BOM)));
        assert_eq!(datas(&split), ["a"]);
        // Only the first bytes of a BOM: they start the first line.
        let out = parse_every_way(b"\xEF\xBBdata: a\n\ndata: b\n\n");
        assert_eq!(datas(&out), ["", "b"]);
        assert_eq!(&events(&out)[0].raw[..], b"\xEF\xBBdata: a\n\n");
        let out = parse_every_way(b"\xEF\n\n");
        assert_eq!(events(&out).len(), 1);
        // A stream that is only part of a BOM.
        assert_eq!(
            parse_pieces(usize::MAX, &[b"\xEF", b"\xBB"]),
            [Segment::Other(Bytes::from_static(b"\xEF\xBB"))]
        );
    }

    #[test]
    fn an_unterminated_event_goes_out_at_finish() {
        let mut parser = EventParser::new(usize::MAX);
        let mut out = Vec::new();
        parser.feed(&Bytes::from_static(b"data: a\n\ndata: b\n"), &mut out);
        assert_eq!(datas(&out), ["a"]);
        assert_eq!(parser.held(), 8);
        parser.finish(&mut out);
        assert_eq!(out[1], Segment::Other(Bytes::from_static(b"data: b\n")));
        assert_eq!(parser.held(), 0);
        // A CR-terminated line held at the end of the stream: the same.
        let out = parse_pieces(usize::MAX, &[b"data: b\r"]);
        assert_eq!(out, [Segment::Other(Bytes::from_static(b"data: b\r"))]);
    }

    #[test]
    fn whole_events_in_a_piece_are_not_copied() {
        let piece = Bytes::from_static(b"data: a\n\ndata: b\n\ndata: c");
        let mut parser = EventParser::new(usize::MAX);
        let mut out = Vec::new();
        parser.feed(&piece, &mut out);
        let Segment::Event(second) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(second.raw.as_ptr(), piece[9..].as_ptr());
    }

    #[test]
    fn an_over_long_event_is_passed_on_not_held() {
        let input: &[u8] =
            b"data: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\ndata: more\n\ndata: b\n\n: c\r\n\r\n";
        for size in 1..input.len() {
            let mut parser = EventParser::new(16);
            let mut out = Vec::new();
            for piece in input.chunks(size) {
                parser.feed(&Bytes::copy_from_slice(piece), &mut out);
                assert!(parser.held() <= 16, "held {}", parser.held());
            }
            parser.finish(&mut out);
            assert_eq!(joined(&out), input, "pieces of {size}");
            assert_eq!(datas(&out), ["b", ""], "pieces of {size}");
        }
        // The limit counts the event without its blank line's line end.
        let exact = b"data: 0123456789\r\n";
        assert_eq!(exact.len(), 18);
        assert_eq!(datas(&parse_pieces(18, &[exact, b"\r\n"])), ["0123456789"]);
        assert_eq!(
            datas(&parse_pieces(17, &[exact, b"\r\n"])),
            Vec::<String>::new()
        );
        // An over-long event that never ends: everything is passed on as it comes.
        let mut parser = EventParser::new(5);
        let mut out = Vec::new();
        parser.feed(&Bytes::from_static(b"data: 1234"), &mut out);
        parser.feed(&Bytes::from_static(b"5\r"), &mut out);
        parser.feed(&Bytes::from_static(b"\ndata: x"), &mut out);
        assert_eq!(parser.held(), 0);
        assert_eq!(joined(&out), b"data: 12345\r\ndata: x");
        // Its blank line ends the skipping; the next event is read again.
        parser.feed(&Bytes::from_static(b"\n"), &mut out);
        parser.feed(&Bytes::from_static(b"\n"), &mut out);
        parser.feed(&Bytes::from_static(b"data\n\n"), &mut out);
        assert_eq!(datas(&out), [""]);
        assert_eq!(joined(&out), b"data: 12345\r\ndata: x\n\ndata\n\n");
    }

    #[test]
    fn raw_without_cuts_values_line_by_line() {
        let input = b"event: chunk\r\ndata: {\"id\":1,\"usage\"\r\n: between\r\ndata: :null,\r\ndata: \"x\":2}\r\n\r\n";
        let event = events(&parse(input))[0].clone();
        let data = String::from_utf8(event.data.clone()).unwrap();
        assert_eq!(data, "{\"id\":1,\"usage\"\n:null,\n\"x\":2}");
        let start = data.find("\"usage\"").unwrap();
        let end = data.find("\"x\"").unwrap();
        let cut = event.raw_without(start..end);
        // The middle line is wholly in the range, with the newline before it: it goes, and
        // takes that newline; the comment between stays.
        assert_eq!(
            &cut[..],
            b"event: chunk\r\ndata: {\"id\":1,\r\n: between\r\ndata: \"x\":2}\r\n\r\n"
        );
        let again = events(&parse(&cut))[0].clone();
        assert_eq!(again.data, b"{\"id\":1,\n\"x\":2}");
        assert_eq!(again.event_type.as_deref(), Some("chunk"));
        let json: serde_json::Value = serde_json::from_slice(&again.data).unwrap();
        assert_eq!(json, serde_json::json!({"id": 1, "x": 2}));
        // Nothing to cut, or out of range: unchanged.
        assert_eq!(event.raw_without(3..3), event.raw);
        assert_eq!(event.raw_without(500..900), event.raw);
        assert_eq!(
            event.raw_without(0..900),
            // All of it: two lines go with the two joining newlines, one stays empty.
            Bytes::from_static(b"event: chunk\r\n: between\r\ndata: \r\n\r\n")
        );
    }

    #[test]
    fn raw_without_keeps_a_space_that_would_become_the_optional_one() {
        let event = events(&parse(b"data:x y\ndata:  z\n\n"))[0].clone();
        assert_eq!(event.data, b"x y\n z");
        let cut = event.raw_without(0..1);
        assert_eq!(&cut[..], b"data:  y\ndata:  z\n\n");
        assert_eq!(events(&parse(&cut))[0].data, b" y\n z");
        // With the optional space there already, nothing to add.
        let event = events(&parse(b"data: x y\n\n"))[0].clone();
        assert_eq!(&event.raw_without(0..1)[..], b"data:  y\n\n");
    }

    /// One line of a generated event.
    #[derive(Debug, Clone)]
    enum Line {
        Data { space: bool, text: String },
        BareData,
        Event(String),
        Id(String),
        Retry(u32),
        Comment(String),
        Unknown(String, String),
    }

    #[derive(Debug, Clone, Copy)]
    enum End {
        Lf,
        CrLf,
        Cr,
    }

    fn line_strategy() -> impl Strategy<Value = Line> {
        let text = "[^\r\n]{0,12}";
        prop_oneof![
            4 => (any::<bool>(), text).prop_map(|(space, text)| Line::Data { space, text }),
            1 => Just(Line::BareData),
            1 => text.prop_map(Line::Event),
            1 => text.prop_map(Line::Id),
            1 => any::<u32>().prop_map(Line::Retry),
            1 => text.prop_map(Line::Comment),
            1 => ("[a-z]{1,6}", text)
                .prop_filter("a known field", |(name, _)| {
                    !["data", "event", "id", "retry"].contains(&name.as_str())
                })
                .prop_map(|(name, text)| Line::Unknown(name, text)),
        ]
    }

    fn end_strategy() -> impl Strategy<Value = End> {
        prop_oneof![Just(End::Lf), Just(End::CrLf), Just(End::Cr)]
    }

    /// What one generated event must parse to.
    #[derive(Debug)]
    struct Expected {
        data: Vec<u8>,
        event_type: Option<String>,
        /// Its length, not counting the line end of its blank line.
        length: usize,
        /// Where the line end of its blank line starts in the stream.
        blank_end: usize,
    }

    /// Writes the generated stream; returns it and the events it holds.
    fn render(
        bom: bool,
        stream: &[(Vec<(Line, End)>, End)],
        tail: Option<&str>,
    ) -> (Vec<u8>, Vec<Expected>) {
        let mut out = Vec::new();
        let mut expected = Vec::new();
        if bom {
            out.extend_from_slice(BOM);
        }
        let mut after_cr = false;
        let mut put_end = |out: &mut Vec<u8>, end: End, blank: bool| {
            // A lone LF right after a CR would join it: write that blank line's end as CRLF.
            let end = match end {
                End::Lf if blank && after_cr => End::CrLf,
                end => end,
            };
            out.extend_from_slice(match end {
                End::Lf => b"\n",
                End::CrLf => b"\r\n",
                End::Cr => b"\r",
            });
            after_cr = matches!(end, End::Cr);
        };
        for (lines, blank_end) in stream {
            let start = out.len();
            let mut values: Vec<String> = Vec::new();
            let mut event_type = None;
            for (line, end) in lines {
                let text = match line {
                    Line::Data { space, text } => {
                        let written = format!("{}{text}", if *space { " " } else { "" });
                        values.push(written.strip_prefix(' ').unwrap_or(&written).to_owned());
                        format!("data:{written}")
                    }
                    Line::BareData => {
                        values.push(String::new());
                        "data".to_owned()
                    }
                    Line::Event(text) => {
                        let text = format!(" {text}");
                        event_type = Some(text[1..].to_owned());
                        format!("event:{text}")
                    }
                    Line::Id(text) => format!("id: {text}"),
                    Line::Retry(ms) => format!("retry: {ms}"),
                    Line::Comment(text) => format!(":{text}"),
                    Line::Unknown(name, text) => format!("{name}: {text}"),
                };
                out.extend_from_slice(text.as_bytes());
                put_end(&mut out, *end, false);
            }
            let length = out.len() - start;
            expected.push(Expected {
                data: values.join("\n").into_bytes(),
                event_type,
                length,
                blank_end: out.len(),
            });
            put_end(&mut out, *blank_end, true);
        }
        if let Some(tail) = tail {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(tail.as_bytes());
        }
        (out, expected)
    }

    /// Cut points for `len` bytes from `cuts`, sorted, each piece non-empty.
    fn pieces(input: &[u8], cuts: &[Index]) -> Vec<Bytes> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        at.push(0);
        at.push(input.len());
        at.sort_unstable();
        at.dedup();
        at.windows(2)
            .map(|w| Bytes::copy_from_slice(&input[w[0]..w[1]]))
            .collect()
    }

    /// Feeds `pieces`; checks each event is emitted by the feed that brought the line end of its
    /// blank line, and what is held; returns the segments.
    fn check_feed(max: usize, input: &[u8], pieces: &[Bytes], expected: &[Expected]) {
        let mut parser = EventParser::new(max);
        let mut out = Vec::new();
        let mut fed = 0;
        let mut emitted_at = Vec::new();
        for piece in pieces {
            parser.feed(piece, &mut out);
            let before = fed;
            fed += piece.len();
            while emitted_at.len() < out.len() {
                emitted_at.push((before, fed));
            }
            assert!(parser.held() <= max.max(2), "held {}", parser.held());
        }
        let before_finish = out.len();
        parser.finish(&mut out);
        assert!(
            out[before_finish..]
                .iter()
                .all(|s| matches!(s, Segment::Other(_)))
        );
        assert_eq!(joined(&out), input);
        let got: Vec<(&Event, (usize, usize))> = out
            .iter()
            .zip(emitted_at.iter().chain(std::iter::repeat(&(fed, fed))))
            .filter_map(|(segment, at)| match segment {
                Segment::Event(event) => Some((event, *at)),
                Segment::Other(_) => None,
            })
            .collect();
        let wanted: Vec<&Expected> = expected.iter().filter(|e| e.length <= max).collect();
        assert_eq!(got.len(), wanted.len());
        for ((event, (before, after)), want) in got.iter().zip(&wanted) {
            assert_eq!(event.data, want.data);
            assert_eq!(event.event_type, want.event_type);
            assert!(
                *before <= want.blank_end && want.blank_end < *after,
                "emitted after bytes {before}..{after}, blank line end at {}",
                want.blank_end
            );
            for line in &event.data_lines {
                let len = line.value.len();
                assert_eq!(
                    event.raw.get(line.value.clone()),
                    event.data.get(line.offset..line.offset + len)
                );
            }
        }
    }

    fn stream_strategy() -> impl Strategy<Value = Vec<(Vec<(Line, End)>, End)>> {
        prop::collection::vec(
            (
                prop::collection::vec((line_strategy(), end_strategy()), 0..7),
                end_strategy(),
            ),
            1..=20,
        )
    }

    proptest! {
        #[test]
        fn any_split_parses_the_same(
            bom in any::<bool>(),
            stream in stream_strategy(),
            tail in prop::option::of("[^\r\n]{0,8}"),
            cuts in prop::collection::vec(any::<Index>(), 0..16),
            max in prop_oneof![Just(usize::MAX), 0usize..120],
        ) {
            let (input, expected) = render(bom, &stream, tail.as_deref());
            let whole = [Bytes::from(input.clone())];
            check_feed(max, &input, &whole, &expected);
            check_feed(max, &input, &pieces(&input, &cuts), &expected);
            let bytewise: Vec<Bytes> = input.chunks(1).map(Bytes::copy_from_slice).collect();
            check_feed(max, &input, &bytewise, &expected);
        }
    }

    /// What `raw_without` leaves of the data of `lines` (joined with `\n`) without
    /// `start..end`, computed on the data alone: a line wholly in the range with a joining
    /// newline in it goes with one such newline (the one before it first); other lines lose
    /// what of their value is in the range, and the other newlines in the range stay.
    fn model_cut(lines: &[String], start: usize, end: usize) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::new();
        let mut offset = 0;
        let mut joined_before = true;
        let last = lines.len() - 1;
        // Whether the newline that joins line i to line i - 1 is kept.
        let mut keep_newline_before = false;
        for (i, line) in lines.iter().enumerate() {
            let line_end = offset + line.len();
            let whole = start <= offset && line_end <= end;
            let before = i > 0 && joined_before && start < offset;
            let after = i < last && line_end < end;
            if i > 0 && keep_newline_before {
                out.push(b'\n');
            }
            if whole && (before || after) {
                // The newline before goes with the line, else the one after does.
                if before && i > 0 && keep_newline_before {
                    out.pop();
                }
                keep_newline_before = before;
                joined_before = before;
            } else {
                let bytes = line.as_bytes();
                for (k, byte) in bytes.iter().enumerate() {
                    let at = offset + k;
                    if at < start || at >= end {
                        out.push(*byte);
                    }
                }
                keep_newline_before = true;
                joined_before = true;
            }
            offset = line_end + 1;
        }
        out
    }

    /// A JSON value for a generated member.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<i32>().prop_map(serde_json::Value::from),
            "[ a-z:é\"\\\\]{0,6}".prop_map(serde_json::Value::from),
        ]
    }

    proptest! {
        #[test]
        fn raw_without_removes_the_range(
            members in prop::collection::vec(json_value(), 1..5),
            breaks in prop::collection::vec(any::<bool>(), 24),
            spaces in prop::collection::vec(any::<bool>(), 24),
            ends in prop::collection::vec(end_strategy(), 24),
            comments in prop::collection::vec(any::<bool>(), 24),
            range in (any::<Index>(), any::<Index>()),
            member in any::<Index>(),
        ) {
            // The object's tokens, and where each member (key to value) starts and ends.
            let mut tokens = vec!["{".to_owned()];
            let mut spans = Vec::new();
            for (i, value) in members.iter().enumerate() {
                if i > 0 {
                    tokens.push(",".to_owned());
                }
                let first = tokens.len();
                tokens.push(format!("\"k{i}\""));
                tokens.push(":".to_owned());
                tokens.push(value.to_string());
                spans.push((first, tokens.len()));
            }
            tokens.push("}".to_owned());
            // Lines: tokens joined, broken where `breaks` says.
            let mut lines = vec![String::new()];
            let mut token_at = Vec::new(); // where each token starts in the data
            let mut data_len = 0;
            for (i, token) in tokens.iter().enumerate() {
                if i > 0 && breaks[i % breaks.len()] {
                    lines.push(String::new());
                    data_len += 1;
                }
                token_at.push(data_len);
                data_len += token.len();
                lines.last_mut().unwrap().push_str(token);
            }
            token_at.push(data_len);
            let mut raw = b"event: e\n".to_vec();
            for (i, line) in lines.iter().enumerate() {
                if comments[i % comments.len()] {
                    raw.extend_from_slice(b": c\r\n");
                }
                raw.extend_from_slice(if spaces[i % spaces.len()] { b"data: " } else { b"data:" });
                raw.extend_from_slice(line.as_bytes());
                raw.extend_from_slice(match ends[i % ends.len()] {
                    End::Lf => b"\n",
                    End::CrLf => b"\r\n",
                    End::Cr => b"\r",
                });
            }
            raw.extend_from_slice(b"\r\n");
            let event = events(&parse(&raw))[0].clone();
            let data = lines.join("\n").into_bytes();
            prop_assert_eq!(&event.data, &data);

            // Any range: the data loses it, all but the newlines no removed line took.
            let (a, b) = (range.0.index(data.len() + 1), range.1.index(data.len() + 1));
            let (start, end) = (a.min(b), a.max(b));
            let want = model_cut(&lines, start, end);
            let cut = event.raw_without(start..end);
            let reparsed = parse(&cut);
            prop_assert_eq!(reparsed.len(), 1);
            let again = events(&reparsed)[0];
            prop_assert_eq!(&again.data, &want);
            prop_assert_eq!(again.event_type.as_deref(), Some("e"));

            // A whole member (with its comma): still JSON, without it.
            let m = member.index(members.len());
            let (first, last) = spans[m];
            let (from, to) = if m + 1 < members.len() {
                (token_at[first], token_at[spans[m + 1].0])
            } else if m > 0 {
                (token_at[first - 1], token_at[last])
            } else {
                (token_at[first], token_at[last])
            };
            let again = events(&parse(&event.raw_without(from..to)))[0].clone();
            let json: serde_json::Value = serde_json::from_slice(&again.data).unwrap();
            let mut object = serde_json::Map::new();
            for (i, value) in members.iter().enumerate() {
                if i != m {
                    object.insert(format!("k{i}"), value.clone());
                }
            }
            prop_assert_eq!(json, serde_json::Value::Object(object));
        }
    }
}
