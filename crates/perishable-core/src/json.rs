//! One strict reading of a JSON body, byte-exact edits to it, and an incremental search of a
//! response body for one top-level member.
//!
//! The proxy meters what clients spend, so every decision it takes about a request body (is it
//! streaming, how many tokens may it ask for) must be about the same document the upstream will
//! read. Two parsers that disagree about a body are a way around the meter: a body with two
//! `"stream"` keys, a number one parser reads as infinity, a lone surrogate one parser replaces
//! and another refuses. So a request body is parsed once, here, by [`parse_object`] in
//! [`Mode::Strict`], which refuses everything Python's `json` and Go's `encoding/json` (what
//! upstreams are written in) might read differently from each other or from us; every check
//! reads that one parse, and whatever it refuses is answered 400 and never forwarded.
//!
//! The parse only records where the top-level members are (byte ranges), it builds no tree: the
//! checks that need a member's value read it from its range. When the proxy must change the body
//! (add `"stream_options"`, lower `max_tokens`), it does not re-serialize: [`insert_member`],
//! [`replace_value`] and [`remove_member`] describe a replacement of a byte range and [`apply`]
//! performs it, so every other byte (key order, number spelling, escapes, whitespace) reaches the
//! upstream as the client sent it.
//!
//! Response bodies come from the upstream, may be of any size and arrive in pieces; the proxy
//! needs only their top-level `usage` member. [`MemberFinder`] follows the document's structure
//! piece by piece with a few counters and flags, and keeps only the bytes of the member it looks
//! for, up to a bound.
//!
//! Nothing here recurses on the input's nesting: an adversarial body of a million `[` costs a
//! counter, not a stack frame each.

use std::ops::Range;

use bytes::Bytes;
use memchr::{memchr, memchr2};

/// Deepest nesting a request body may have (objects and arrays), counted with the top level
/// object as depth 1.
///
/// Real chat requests nest a handful of levels (messages, content parts, tool schemas); 64 leaves
/// room for deep JSON schemas while keeping any parser behind us far from its own limits.
pub(crate) const MAX_DEPTH: usize = 64;

/// Deepest nesting accepted in [`Mode::Lenient`]: the upstream is trusted, but a bound still
/// keeps the parser's explicit stack a fixed size.
const LENIENT_MAX_DEPTH: usize = 512;

/// What a value is, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `{ ... }`
    Object,
    /// `[ ... ]`
    Array,
    /// `"..."`
    String,
    /// A number (in [`Mode::Lenient`] also `NaN`, `Infinity` and `-Infinity`).
    Number,
    /// `true` or `false`.
    Bool,
    /// `null`.
    Null,
}

/// How strictly [`parse_object`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Request bodies: RFC 8259 and nothing else, plus the refusals that keep every upstream
    /// parser reading the same document we read (see [`parse_object`]).
    Strict,
    /// Upstream responses (trusted, may be Python-written): additionally accepts the literals
    /// `NaN`, `Infinity`, `-Infinity` as numbers, numbers out of f64 range, lone surrogate
    /// escapes, duplicate keys (all kept in `members`), and nesting up to 512.
    Lenient,
}

/// One member of the top-level object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// The key, decoded (escapes resolved). In [`Mode::Lenient`] a lone surrogate escape decodes
    /// to U+FFFD, as a `String` cannot hold it.
    pub(crate) key: String,
    /// The key's string token, quotes included (byte offsets into the parsed slice).
    pub(crate) key_span: Range<usize>,
    /// The value, from its first to its last byte (end exclusive, so `&bytes[value]` is the
    /// value's text).
    pub(crate) value: Range<usize>,
    /// What the value is.
    pub(crate) kind: Kind,
}

/// The top-level object of a document: where its members are, not what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Object {
    /// Top-level members in document order.
    pub(crate) members: Vec<Member>,
    /// Offset of the opening `{`.
    pub(crate) open: usize,
    /// Offset of the closing `}`.
    pub(crate) close: usize,
}

impl Object {
    /// The member named `key`.
    ///
    /// A Strict parse has no duplicate top-level keys. A Lenient one may, and then this is the
    /// LAST member with that key, the one Python's `json` and Go's `encoding/json` keep.
    pub(crate) fn get(&self, key: &str) -> Option<&Member> {
        self.members.iter().rev().find(|member| member.key == key)
    }
}

/// Why a body was refused. The messages are shown to API clients, so they name at most a key and
/// a byte offset, never a piece of the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JsonError {
    /// The body is not UTF-8 (RFC 8259 section 8.1), or it is UTF-16/32 (a NUL byte among the
    /// first four, which ASCII text in those encodings always has). `at` is the first bad byte.
    #[error("the body is not valid UTF-8 (byte {at})")]
    NotUtf8 {
        /// Offset of the first byte that is not UTF-8.
        at: usize,
    },
    /// The body starts with a byte order mark (UTF-8 `EF BB BF`, or a UTF-16/32 one). Python
    /// skips a UTF-8 one, Go refuses it: refused here so nobody has to guess.
    #[error("the body starts with a byte order mark")]
    ByteOrderMark,
    /// Not JSON: an unexpected byte (or the end of the input) at `at`.
    #[error("the body is not valid JSON (byte {at})")]
    Syntax {
        /// Offset of the unexpected byte, or the input's length when it ended too early.
        at: usize,
    },
    /// A `\u` escape of half a surrogate pair without its other half: Python keeps it, Go
    /// replaces it with U+FFFD, many others refuse the body.
    #[error("the body has an unpaired surrogate escape (byte {at})")]
    LoneSurrogate {
        /// Offset of the escape's backslash.
        at: usize,
    },
    /// A number with a fraction or exponent beyond f64 range (`1e400`): Python reads infinity,
    /// Go refuses.
    #[error("the body has a number out of range (byte {at})")]
    NumberOutOfRange {
        /// Offset of the number's first byte.
        at: usize,
    },
    /// Objects and arrays nested deeper than [`MAX_DEPTH`] (512 in [`Mode::Lenient`]).
    #[error("nesting deeper than 64")]
    TooDeep,
    /// The document is valid JSON but not an object.
    #[error("the body is not a JSON object")]
    NotAnObject,
    /// The top-level object has this key twice (Strict only): which one counts is up to each
    /// parser.
    #[error("duplicate key {}", shown_key(.0))]
    DuplicateKey(String),
}

/// A key as an error message may show it: quoted, escaped, and cut at 64 characters, so a
/// client cannot make the proxy echo a megabyte or a control character.
fn shown_key(key: &str) -> String {
    const SHOWN: usize = 64;
    let mut shown: String = key.chars().take(SHOWN).collect();
    let cut = shown.len() < key.len();
    shown = format!("{shown:?}");
    if cut {
        shown.push_str("...");
    }
    shown
}

/// Parses `bytes` as exactly one JSON object (optional whitespace around it: space, `\t`, `\n`,
/// `\r` only), recording where its top-level members are.
///
/// In [`Mode::Strict`] (request bodies) it refuses, beyond RFC 8259's grammar:
///
/// - anything but UTF-8, and any byte order mark: Python decodes UTF-16/32 and skips a UTF-8 BOM
///   where Go refuses;
/// - a lone surrogate escape (`"\ud800"`): each parser does something else with it;
/// - a number with a fraction or an exponent whose f64 value is not finite (`1e400`): Python
///   reads infinity, Go refuses. Integers of any length pass: Python reads them exactly;
/// - nesting deeper than [`MAX_DEPTH`];
/// - a key twice in the top-level object (compared decoded, so `"a"` and `"\u0061"` are the
///   same key): Python and Go keep the last, other readers the first, and the top-level keys
///   are what the proxy checks. Deeper duplicates are left alone.
///
/// After one UTF-8 check of the whole body, it is read in one pass with no allocation but the
/// members list and the top-level keys; nesting is followed with a counter and a bit stack,
/// never with recursion.
pub(crate) fn parse_object(bytes: &[u8], mode: Mode) -> Result<Object, JsonError> {
    let text = check_encoding(bytes)?;
    let parser = Parser {
        bytes,
        text,
        lenient: mode == Mode::Lenient,
        max_depth: match mode {
            Mode::Strict => MAX_DEPTH,
            Mode::Lenient => LENIENT_MAX_DEPTH,
        },
    };
    let start = parser.skip_ws(0);
    match bytes.get(start) {
        Some(b'{') => {
            let object = parser.top_object(start)?;
            if mode == Mode::Strict {
                check_duplicates(&object.members)?;
            }
            Ok(object)
        }
        Some(_) => {
            // Valid JSON that is not an object gets its own answer; invalid JSON its syntax
            // error.
            let (end, _) = parser.value(start, 0)?;
            parser.expect_end(end)?;
            Err(JsonError::NotAnObject)
        }
        None => Err(JsonError::Syntax { at: start }),
    }
}

/// Refuses byte order marks and text that is not UTF-8, once, up front: the parser after it can
/// treat the body as a `str` and never look at multi-byte sequences again.
fn check_encoding(bytes: &[u8]) -> Result<&str, JsonError> {
    const BOMS: [&[u8]; 5] = [
        &[0xEF, 0xBB, 0xBF],       // UTF-8
        &[0x00, 0x00, 0xFE, 0xFF], // UTF-32BE
        &[0xFF, 0xFE, 0x00, 0x00], // UTF-32LE (before UTF-16LE, its prefix)
        &[0xFE, 0xFF],             // UTF-16BE
        &[0xFF, 0xFE],             // UTF-16LE
    ];
    if BOMS.iter().any(|bom| bytes.starts_with(bom)) {
        return Err(JsonError::ByteOrderMark);
    }
    // JSON text starts with an ASCII character; in UTF-16 or UTF-32 that comes with a NUL byte
    // among the first four (RFC 4627 section 3). NUL is valid UTF-8, so say it here.
    if let Some(at) = memchr(0, bytes.get(..4).unwrap_or(bytes)) {
        return Err(JsonError::NotUtf8 { at });
    }
    std::str::from_utf8(bytes).map_err(|error| JsonError::NotUtf8 {
        at: error.valid_up_to(),
    })
}

/// Refuses a key present twice among `members`. Few members (the usual case) are compared pairwise;
/// many are sorted, so a body of a hundred thousand keys costs `n log n`, not `n²`.
fn check_duplicates(members: &[Member]) -> Result<(), JsonError> {
    const PAIRWISE: usize = 16;
    let duplicate = |key: &str| Err(JsonError::DuplicateKey(key.to_owned()));
    if members.len() <= PAIRWISE {
        for (i, member) in members.iter().enumerate() {
            if members
                .iter()
                .skip(i + 1)
                .any(|other| other.key == member.key)
            {
                return duplicate(&member.key);
            }
        }
        return Ok(());
    }
    let mut keys: Vec<&str> = members.iter().map(|member| member.key.as_str()).collect();
    keys.sort_unstable();
    match keys.windows(2).find(|pair| pair.first() == pair.last()) {
        Some(pair) => duplicate(pair.first().copied().unwrap_or_default()),
        None => Ok(()),
    }
}

/// One parse of one body.
struct Parser<'a> {
    bytes: &'a [u8],
    /// The same bytes, known to be UTF-8: decoded keys are slices of it.
    text: &'a str,
    lenient: bool,
    max_depth: usize,
}

/// Which open containers are objects (bit set) and which arrays, by depth: enough for 512 levels
/// in a fixed 64 bytes.
struct Nesting([u64; LENIENT_MAX_DEPTH / 64]);

impl Nesting {
    fn set(&mut self, depth: usize, object: bool) {
        if let Some(word) = self.0.get_mut(depth / 64) {
            let bit = 1u64 << (depth % 64);
            if object {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    fn is_object(&self, depth: usize) -> bool {
        self.0
            .get(depth / 64)
            .is_some_and(|word| word & (1u64 << (depth % 64)) != 0)
    }
}

impl Parser<'_> {
    /// The offset of the first non-whitespace byte at or after `i`.
    #[inline]
    fn skip_ws(&self, mut i: usize) -> usize {
        while let Some(&byte) = self.bytes.get(i) {
            if !matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            i += 1;
        }
        i
    }

    /// Only whitespace may follow the document.
    fn expect_end(&self, end: usize) -> Result<(), JsonError> {
        let end = self.skip_ws(end);
        if end == self.bytes.len() {
            Ok(())
        } else {
            Err(JsonError::Syntax { at: end })
        }
    }

    /// The top-level object, whose `{` is at `open`.
    fn top_object(&self, open: usize) -> Result<Object, JsonError> {
        let mut members = Vec::new();
        let mut i = self.skip_ws(open + 1);
        if self.bytes.get(i) == Some(&b'}') {
            self.expect_end(i + 1)?;
            return Ok(Object {
                members,
                open,
                close: i,
            });
        }
        loop {
            if self.bytes.get(i) != Some(&b'"') {
                return Err(JsonError::Syntax { at: i });
            }
            let (key_end, escaped) = self.string(i + 1)?;
            let key_span = i..key_end;
            let key = self.decode_key(i + 1..key_end - 1, escaped)?;
            let value_start = self.colon(key_end)?;
            let (value_end, kind) = self.value(value_start, 1)?;
            members.push(Member {
                key,
                key_span,
                value: value_start..value_end,
                kind,
            });
            i = self.skip_ws(value_end);
            match self.bytes.get(i) {
                Some(b',') => i = self.skip_ws(i + 1),
                Some(b'}') => {
                    self.expect_end(i + 1)?;
                    return Ok(Object {
                        members,
                        open,
                        close: i,
                    });
                }
                _ => return Err(JsonError::Syntax { at: i }),
            }
        }
    }

    /// After a key ending at `i`: whitespace, `:`, whitespace; returns where the value starts.
    #[inline]
    fn colon(&self, i: usize) -> Result<usize, JsonError> {
        let i = self.skip_ws(i);
        if self.bytes.get(i) != Some(&b':') {
            return Err(JsonError::Syntax { at: i });
        }
        Ok(self.skip_ws(i + 1))
    }

    /// The key whose body (between the quotes) is `body`, decoded.
    fn decode_key(&self, body: Range<usize>, escaped: bool) -> Result<String, JsonError> {
        let at = body.start;
        let Some(raw) = self.text.get(body) else {
            return Err(JsonError::Syntax { at });
        };
        if !escaped {
            return Ok(raw.to_owned());
        }
        let mut out = Vec::with_capacity(raw.len());
        if !unescape(raw.as_bytes(), &mut out, true) {
            return Err(JsonError::Syntax { at });
        }
        String::from_utf8(out).map_err(|_| JsonError::Syntax { at })
    }

    /// One complete value starting at `start` (its first byte, not whitespace), inside `base`
    /// open containers. Returns the offset just past it and its kind.
    ///
    /// Nested containers are followed iteratively: `depth` counts them and `nesting` remembers
    /// which are objects, so the input's nesting never becomes the call stack's.
    fn value(&self, start: usize, base: usize) -> Result<(usize, Kind), JsonError> {
        let bytes = self.bytes;
        let mut nesting = Nesting([0; LENIENT_MAX_DEPTH / 64]);
        let mut depth = base;
        let mut i = start;
        let kind = match bytes.get(start) {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            Some(b'"') => Kind::String,
            Some(b't' | b'f') => Kind::Bool,
            Some(b'n') => Kind::Null,
            _ => Kind::Number,
        };
        'value: loop {
            // A value starts at `i`.
            match bytes.get(i) {
                Some(b'"') => i = self.string(i + 1)?.0,
                Some(b'{') => {
                    depth += 1;
                    if depth > self.max_depth {
                        return Err(JsonError::TooDeep);
                    }
                    nesting.set(depth - 1, true);
                    i = self.skip_ws(i + 1);
                    match bytes.get(i) {
                        Some(b'}') => {
                            i += 1;
                            depth -= 1;
                        }
                        Some(b'"') => {
                            i = self.colon(self.string(i + 1)?.0)?;
                            continue 'value;
                        }
                        _ => return Err(JsonError::Syntax { at: i }),
                    }
                }
                Some(b'[') => {
                    depth += 1;
                    if depth > self.max_depth {
                        return Err(JsonError::TooDeep);
                    }
                    nesting.set(depth - 1, false);
                    i = self.skip_ws(i + 1);
                    if bytes.get(i) == Some(&b']') {
                        i += 1;
                        depth -= 1;
                    } else {
                        continue 'value;
                    }
                }
                Some(b'-' | b'0'..=b'9') => i = self.number(i)?,
                Some(b't') => i = self.literal(i, b"true")?,
                Some(b'f') => i = self.literal(i, b"false")?,
                Some(b'n') => i = self.literal(i, b"null")?,
                Some(b'N') if self.lenient => i = self.literal(i, b"NaN")?,
                Some(b'I') if self.lenient => i = self.literal(i, b"Infinity")?,
                _ => return Err(JsonError::Syntax { at: i }),
            }
            // A value ended at `i`: close containers until one continues.
            loop {
                if depth == base {
                    return Ok((i, kind));
                }
                i = self.skip_ws(i);
                let object = nesting.is_object(depth - 1);
                match bytes.get(i) {
                    Some(b',') => {
                        i = self.skip_ws(i + 1);
                        if object {
                            if bytes.get(i) != Some(&b'"') {
                                return Err(JsonError::Syntax { at: i });
                            }
                            i = self.colon(self.string(i + 1)?.0)?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if object => {
                        i += 1;
                        depth -= 1;
                    }
                    Some(b']') if !object => {
                        i += 1;
                        depth -= 1;
                    }
                    _ => return Err(JsonError::Syntax { at: i }),
                }
            }
        }
    }

    /// Exactly `literal` at `i`; returns the offset past it.
    #[inline]
    fn literal(&self, i: usize, literal: &[u8]) -> Result<usize, JsonError> {
        if self.bytes.get(i..i + literal.len()) == Some(literal) {
            Ok(i + literal.len())
        } else {
            Err(JsonError::Syntax { at: i })
        }
    }

    /// A string whose body starts at `i` (just past the opening quote). Returns the offset past
    /// the closing quote, and whether the string has escapes.
    ///
    /// Most strings are short (keys, roles) or have an escape every line or so: those are read
    /// eight bytes at a time by [`string_stop`], which finds quote, backslash and control
    /// character in one pass. A run longer than 128 bytes (a base64 image, a long paragraph) is
    /// handed to memchr, which jumps to the next quote or backslash with SIMD, and the bytes
    /// jumped over are checked for control characters in a loop the compiler vectorizes. On the
    /// sample bodies of the timing test this mix beat both memchr alone (short runs pay its setup
    /// cost) and the word scan alone (2x slower on a 1 MB base64 string).
    #[inline]
    fn string(&self, mut i: usize) -> Result<(usize, bool), JsonError> {
        /// How far the word-at-a-time scan looks before handing over to memchr.
        const SHORT: usize = 128;
        let bytes = self.bytes;
        let mut escaped = false;
        loop {
            let rest = bytes.get(i..).unwrap_or_default();
            let found = match string_stop(rest.get(..SHORT).unwrap_or(rest)) {
                Some(found) => found,
                None if rest.len() <= SHORT => return Err(JsonError::Syntax { at: bytes.len() }),
                None => {
                    let Some(found) = memchr2(b'"', b'\\', rest) else {
                        return Err(JsonError::Syntax {
                            at: control_char(rest).map_or(bytes.len(), |at| i + at),
                        });
                    };
                    if let Some(at) = control_char(rest.get(..found).unwrap_or_default()) {
                        return Err(JsonError::Syntax { at: i + at });
                    }
                    found
                }
            };
            i += found;
            match bytes.get(i) {
                Some(b'"') => return Ok((i + 1, escaped)),
                Some(b'\\') => {
                    escaped = true;
                    i = self.escape(i)?;
                }
                // A control character.
                _ => return Err(JsonError::Syntax { at: i }),
            }
        }
    }

    /// The escape whose backslash is at `i`; returns the offset past it.
    fn escape(&self, i: usize) -> Result<usize, JsonError> {
        match self.bytes.get(i + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
            Some(b'u') => {
                let unit = hex4(self.bytes, i + 2)?;
                let lone = if (0xD800..0xDC00).contains(&unit) {
                    // A high surrogate counts only with a low one right after it.
                    let low = if self.bytes.get(i + 6..i + 8) == Some(b"\\u".as_slice()) {
                        Some(hex4(self.bytes, i + 8)?)
                    } else {
                        None
                    };
                    match low {
                        Some(low) if (0xDC00..0xE000).contains(&low) => return Ok(i + 12),
                        _ => true,
                    }
                } else {
                    (0xDC00..0xE000).contains(&unit)
                };
                if lone && !self.lenient {
                    return Err(JsonError::LoneSurrogate { at: i });
                }
                Ok(i + 6)
            }
            _ => Err(JsonError::Syntax { at: i + 1 }),
        }
    }

    /// A number starting at `start` (RFC 8259 grammar exactly); returns the offset past it.
    fn number(&self, start: usize) -> Result<usize, JsonError> {
        let bytes = self.bytes;
        let digit = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
        let mut i = start;
        if bytes.get(i) == Some(&b'-') {
            i += 1;
            if self.lenient && bytes.get(i) == Some(&b'I') {
                return self.literal(i, b"Infinity");
            }
        }
        let int_start = i;
        match bytes.get(i) {
            // No leading zeros: after a `0` comes the fraction, the exponent, or the end.
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while digit(i) {
                    i += 1;
                }
            }
            _ => return Err(JsonError::Syntax { at: i }),
        }
        let int_digits = i - int_start;
        let mut fraction = false;
        if bytes.get(i) == Some(&b'.') {
            i += 1;
            if !digit(i) {
                return Err(JsonError::Syntax { at: i });
            }
            while digit(i) {
                i += 1;
            }
            fraction = true;
        }
        let mut exponent: Option<i64> = None;
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            i += 1;
            let negative = bytes.get(i) == Some(&b'-');
            if matches!(bytes.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !digit(i) {
                return Err(JsonError::Syntax { at: i });
            }
            let mut value: i64 = 0;
            while let Some(&d) = bytes.get(i).filter(|d| d.is_ascii_digit()) {
                value = value.saturating_mul(10).saturating_add(i64::from(d - b'0'));
                i += 1;
            }
            exponent = Some(if negative { -value } else { value });
        }
        if self.lenient || !(fraction || exponent.is_some()) {
            // Integers are read exactly by Python whatever their length.
            return Ok(i);
        }
        // The value is below 10^(int_digits + exponent): when that is at most 10^308 it is
        // finite for sure, and the exact check (a float parse) is only for the rare rest.
        let magnitude = i64::try_from(int_digits)
            .unwrap_or(i64::MAX)
            .saturating_add(exponent.unwrap_or(0));
        if magnitude > 308 {
            let finite = self
                .text
                .get(start..i)
                .and_then(|number| number.parse::<f64>().ok())
                .is_some_and(f64::is_finite);
            if !finite {
                return Err(JsonError::NumberOutOfRange { at: start });
            }
        }
        Ok(i)
    }
}

/// The offset of the first byte of `bytes` that ends a run of plain string text: a quote, a
/// backslash, or a control character (below 0x20, not allowed raw).
///
/// Eight bytes at a time in a `u64` (SWAR): for each condition, `(x - 0x01..) & !x & 0x80..`
/// sets the high bit of a byte that is zero (or below the bound). A borrow can only produce false
/// hits in bytes after a true one, so the lowest hit (the first byte, as the word is read little
/// endian) is exact.
#[inline]
fn string_stop(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(word);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let stops = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (word.wrapping_sub(ONES * 0x20) & !word);
        let stops = stops & HIGH;
        if stops != 0 {
            return Some(offset + (stops.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)
        .map(|at| offset + at)
}

/// The offset of the first byte below 0x20 in `bytes`, which a JSON string may not hold raw.
///
/// The fast answer (none) comes from an OR-reduction without early exit, which the compiler
/// vectorizes; only when there is one is it looked for byte by byte.
#[inline]
fn control_char(bytes: &[u8]) -> Option<usize> {
    let any = bytes.iter().fold(false, |any, &byte| any | (byte < 0x20));
    if any {
        bytes.iter().position(|&byte| byte < 0x20)
    } else {
        None
    }
}

/// The four hex digits at `i`, as a UTF-16 code unit.
fn hex4(bytes: &[u8], i: usize) -> Result<u32, JsonError> {
    let mut unit = 0;
    for at in i..i + 4 {
        let digit = bytes
            .get(at)
            .and_then(|&byte| char::from(byte).to_digit(16))
            .ok_or(JsonError::Syntax { at })?;
        unit = unit * 16 + digit;
    }
    Ok(unit)
}

/// Appends the decoded text of the string body `raw` (between the quotes) to `out`, as UTF-8.
/// Returns `false` on a malformed escape, or on a lone surrogate unless `replace_lone` (which
/// decodes it to U+FFFD).
fn unescape(raw: &[u8], out: &mut Vec<u8>, replace_lone: bool) -> bool {
    let mut i = 0;
    while let Some(found) = memchr(b'\\', raw.get(i..).unwrap_or_default()) {
        out.extend_from_slice(raw.get(i..i + found).unwrap_or_default());
        i += found;
        let decoded = match raw.get(i + 1) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let Ok(unit) = hex4(raw, i + 2) else {
                    return false;
                };
                let low = if (0xD800..0xDC00).contains(&unit)
                    && raw.get(i + 6..i + 8) == Some(b"\\u".as_slice())
                {
                    hex4(raw, i + 8)
                        .ok()
                        .filter(|low| (0xDC00..0xE000).contains(low))
                } else {
                    None
                };
                let decoded = match low {
                    Some(low) => {
                        i += 6;
                        char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                    }
                    None => char::from_u32(unit),
                };
                match decoded {
                    Some(decoded) => {
                        i += 4;
                        decoded
                    }
                    None if replace_lone => {
                        i += 4;
                        char::REPLACEMENT_CHARACTER
                    }
                    None => return false,
                }
            }
            _ => return false,
        };
        i += 2;
        out.extend_from_slice(decoded.encode_utf8(&mut [0; 4]).as_bytes());
    }
    out.extend_from_slice(raw.get(i..).unwrap_or_default());
    true
}

/// One replacement of a byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Edit {
    /// The bytes replaced (empty to insert).
    pub(crate) range: Range<usize>,
    /// What replaces them (empty to remove).
    pub(crate) with: Vec<u8>,
}

impl Edit {
    /// This edit of a nested value, moved to where that value starts (`offset`) in the whole
    /// document.
    pub(crate) fn shifted(self, offset: usize) -> Self {
        Self {
            range: self.range.start + offset..self.range.end + offset,
            with: self.with,
        }
    }
}

/// The object value of `member`, parsed strictly on its own: where it starts in `body`, its
/// bytes and its members. `None` when the member is not an object.
pub(crate) fn nested_object<'a>(
    body: &'a [u8],
    member: &Member,
) -> Option<(usize, &'a [u8], Object)> {
    if member.kind != Kind::Object {
        return None;
    }
    let slice = body.get(member.value.clone())?;
    let object = parse_object(slice, Mode::Strict).ok()?;
    Some((member.value.start, slice, object))
}

/// A string member's value, decoded (the parser validated it).
pub(crate) fn string(body: &[u8], member: &Member) -> String {
    body.get(member.value.clone())
        .and_then(|raw| serde_json::from_slice::<String>(raw).ok())
        .unwrap_or_default()
}

/// The field of `fields` that `key` differs from only in case, as Go's `encoding/json` folds
/// keys (its simple folding maps `ſ` to `s` and the Kelvin sign to `k` too). A reader that folds
/// would take such a key for the field, so the proxy refuses it rather than read past it.
pub(crate) fn folds_to<'f>(key: &str, fields: &[&'f str]) -> Option<&'f str> {
    if key.len() > 32 {
        return None;
    }
    let folded: String = key
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| match c {
            '\u{017f}' => 's',
            '\u{212a}' => 'k',
            c => c,
        })
        .collect();
    fields
        .iter()
        .find(|field| **field == folded && **field != key)
        .copied()
}

/// Applies non-overlapping edits (in any order: they are sorted by position) to `bytes`,
/// returning the new body. Returns `bytes` itself (no copy: a `Bytes` clone) when `edits` is
/// empty.
///
/// Edits come from [`insert_member`], [`replace_value`] and [`remove_member`] on a parse of
/// `bytes`, so they fit; were one to overlap the previous or run past the end, it is clipped
/// rather than panicking.
pub(crate) fn apply(bytes: &Bytes, mut edits: Vec<Edit>) -> Bytes {
    if edits.is_empty() {
        return bytes.clone();
    }
    // Stable: two insertions at one offset keep the order they were given in.
    edits.sort_by_key(|edit| (edit.range.start, edit.range.end));
    let added: usize = edits.iter().map(|edit| edit.with.len()).sum();
    let mut out = Vec::with_capacity(bytes.len() + added);
    let mut at = 0;
    for edit in edits {
        let start = edit.range.start.clamp(at, bytes.len());
        let end = edit.range.end.clamp(start, bytes.len());
        out.extend_from_slice(bytes.get(at..start).unwrap_or_default());
        out.extend_from_slice(&edit.with);
        at = end;
    }
    out.extend_from_slice(bytes.get(at..).unwrap_or_default());
    Bytes::from(out)
}

/// An edit that inserts the member `"key":raw_value` as the last member of `object`: right
/// after the last member's value (with a leading comma), or right before the `}` of an empty
/// object. Whatever whitespace stood before the `}` stays there. `key` is escaped as needed;
/// `raw_value` is JSON text inserted as is.
pub(crate) fn insert_member(object: &Object, key: &str, raw_value: &[u8]) -> Edit {
    let mut with = Vec::with_capacity(key.len() + raw_value.len() + 4);
    let at = match object.members.last() {
        Some(last) => {
            with.push(b',');
            last.value.end
        }
        None => object.close,
    };
    write_string(key, &mut with);
    with.push(b':');
    with.extend_from_slice(raw_value);
    Edit {
        range: at..at,
        with,
    }
}

/// `text` as a JSON string token: quotes, backslashes and control characters escaped.
fn write_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX.get(usize::from(byte >> 4)).copied().unwrap_or(b'0'));
                out.push(HEX.get(usize::from(byte & 0xF)).copied().unwrap_or(b'0'));
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

/// An edit that replaces the value of `member` by `raw_value` (JSON text inserted as is).
pub(crate) fn replace_value(member: &Member, raw_value: &[u8]) -> Edit {
    Edit {
        range: member.value.clone(),
        with: raw_value.to_vec(),
    }
}

/// An edit that removes `object.members[index]` and exactly one separating comma, leaving the
/// document valid:
///
/// - a member that is not the last: from its key's first byte up to the next member's key's
///   first byte (so `"a": 1, "usage": null, "b": 2` becomes `"a": 1, "b": 2`);
/// - the last member (not the only one): from the end of the previous member's value to the end
///   of this member's value (`"a": 1, "usage": null}` becomes `"a": 1}`);
/// - the only member: from its key's first byte to its value's last byte (`{"usage": null}`
///   becomes `{}`).
///
/// An `index` past the members gives an edit that changes nothing.
pub(crate) fn remove_member(object: &Object, index: usize) -> Edit {
    let members = &object.members;
    let range = match (
        index.checked_sub(1).and_then(|i| members.get(i)),
        members.get(index),
        members.get(index + 1),
    ) {
        (_, Some(member), Some(next)) => member.key_span.start..next.key_span.start,
        (Some(previous), Some(member), None) => previous.value.end..member.value.end,
        (None, Some(member), None) => member.key_span.start..member.value.end,
        (_, None, _) => object.close..object.close,
    };
    Edit {
        range,
        with: Vec::new(),
    }
}

/// Where a [`MemberFinder`] is in the top-level object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Before the `{`.
    Start,
    /// Just after the `{`: a key or `}`.
    FirstKey,
    /// After a `,`: a key.
    Key,
    /// Inside a top-level key.
    InKey,
    /// After a key: the `:`.
    Colon,
    /// After the `:`: a value's first byte.
    ValueStart,
    /// Inside a top-level value that is a string.
    InString,
    /// Inside a top-level value that is an object or an array (`depth` open containers).
    Nested,
    /// Inside a top-level value that is a number or a literal.
    Scalar,
    /// After a top-level value: `,` or `}`.
    AfterValue,
    /// After the closing `}`: only whitespace.
    Done,
}

/// Finds the value of one member of the top-level object of a JSON document that arrives in
/// pieces, with bounded memory: the captured value is at most `max_value_bytes` (larger:
/// [`too_large`](Self::too_large) and the capture is dropped). Key comparison is on the decoded
/// key (so `"\u0075sage"` matches "usage"). When the key occurs more than once at the top level,
/// the LAST complete occurrence wins. Members of nested objects never match.
///
/// It follows only the document's structure (strings, brackets, top-level separators) and does
/// not validate: a lenient reader of a trusted upstream. Its memory is a few counters and flags,
/// the raw bytes of the current top-level key (at most six bytes per byte of the key searched,
/// the longest spelling that can still match), and the capture. Strings are skipped with memchr.
#[derive(Debug)]
pub(crate) struct MemberFinder {
    key: &'static str,
    max_value_bytes: usize,
    step: Step,
    /// Open containers inside the current top-level value ([`Step::Nested`]).
    depth: usize,
    /// Inside a string nested in the current top-level value.
    in_string: bool,
    /// The last byte seen was a backslash inside a string: the next byte is escaped.
    escape: bool,
    /// The raw bytes (escapes unresolved) of the top-level key being read.
    key_raw: Vec<u8>,
    /// The key being read is longer than any spelling of `key`.
    key_overflow: bool,
    /// Scratch space for decoding an escaped key.
    decoded: Vec<u8>,
    /// The current top-level member's key is `key`.
    matched: bool,
    /// The bytes of the current occurrence's value so far, while `capturing`.
    capture: Vec<u8>,
    capturing: bool,
    /// The last complete occurrence.
    found: Option<Vec<u8>>,
    failed: bool,
    too_large: bool,
}

impl MemberFinder {
    /// A finder of the top-level member `key`, keeping its value up to `max_value_bytes`.
    pub(crate) fn new(key: &'static str, max_value_bytes: usize) -> Self {
        Self {
            key,
            max_value_bytes,
            step: Step::Start,
            depth: 0,
            in_string: false,
            escape: false,
            key_raw: Vec::new(),
            key_overflow: false,
            decoded: Vec::new(),
            matched: false,
            capture: Vec::new(),
            capturing: false,
            found: None,
            failed: false,
            too_large: false,
        }
    }

    /// Reads the next piece of the document.
    pub(crate) fn feed(&mut self, piece: &[u8]) {
        if self.failed {
            return;
        }
        // Where in this piece the capture (if any) resumes.
        let mut capture_from = 0;
        let mut i = 0;
        while i < piece.len() {
            match self.step {
                Step::Start
                | Step::FirstKey
                | Step::Key
                | Step::Colon
                | Step::ValueStart
                | Step::AfterValue
                | Step::Done => {
                    let Some(&byte) = piece.get(i) else { break };
                    if matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
                        i += 1;
                        continue;
                    }
                    if self.step == Step::ValueStart {
                        if self.matched {
                            self.capture.clear();
                            self.capturing = true;
                            capture_from = i;
                        }
                        self.step = match byte {
                            b'"' => Step::InString,
                            b'{' | b'[' => {
                                self.depth = 1;
                                self.in_string = false;
                                Step::Nested
                            }
                            b',' | b'}' | b']' | b':' => return self.fail(),
                            _ => Step::Scalar,
                        };
                        i += 1;
                        continue;
                    }
                    self.step = match (self.step, byte) {
                        (Step::Start, b'{') => Step::FirstKey,
                        (Step::FirstKey | Step::Key, b'"') => {
                            self.key_raw.clear();
                            self.key_overflow = false;
                            Step::InKey
                        }
                        (Step::FirstKey, b'}') | (Step::AfterValue, b'}') => Step::Done,
                        (Step::Colon, b':') => Step::ValueStart,
                        (Step::AfterValue, b',') => Step::Key,
                        _ => return self.fail(),
                    };
                    i += 1;
                }
                Step::InKey => {
                    let (end, closed) = self.string_end(piece, i);
                    let raw = piece.get(i..end).unwrap_or_default();
                    if self.key_raw.len() + raw.len() <= self.key.len() * 6 {
                        self.key_raw.extend_from_slice(raw);
                    } else {
                        self.key_overflow = true;
                    }
                    if closed {
                        self.matched = self.key_matches();
                        self.step = Step::Colon;
                        i = end + 1;
                    } else {
                        i = end;
                    }
                }
                Step::InString => {
                    let (end, closed) = self.string_end(piece, i);
                    if closed {
                        i = end + 1;
                        self.value_end(piece, capture_from, i);
                    } else {
                        i = end;
                    }
                }
                Step::Nested => {
                    if self.in_string {
                        let (end, closed) = self.string_end(piece, i);
                        self.in_string = !closed;
                        i = if closed { end + 1 } else { end };
                        continue;
                    }
                    // Outside strings only brackets and quotes matter.
                    while let Some(&byte) = piece.get(i) {
                        i += 1;
                        match byte {
                            b'"' => {
                                self.in_string = true;
                                break;
                            }
                            b'{' | b'[' => self.depth += 1,
                            b'}' | b']' => {
                                self.depth -= 1;
                                if self.depth == 0 {
                                    self.value_end(piece, capture_from, i);
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Step::Scalar => {
                    let rest = piece.get(i..).unwrap_or_default();
                    match rest
                        .iter()
                        .position(|byte| matches!(byte, b',' | b'}' | b' ' | b'\n' | b'\r' | b'\t'))
                    {
                        Some(at) => {
                            // The delimiter is not part of the value; `AfterValue` reads it.
                            i += at;
                            self.value_end(piece, capture_from, i);
                        }
                        None => i = piece.len(),
                    }
                }
            }
        }
        if self.capturing {
            self.capture_more(piece.get(capture_from..).unwrap_or_default());
        }
    }

    /// The raw bytes of the value found so far (complete values only): the last complete
    /// occurrence of the key. `None` when none has completed, when the last one was too large,
    /// or when the scan failed.
    pub(crate) fn value(&self) -> Option<&[u8]> {
        if self.failed {
            return None;
        }
        self.found.as_deref()
    }

    /// The input so far is not a JSON object (first non-whitespace byte not `{`), or broke the
    /// scanner's state machine.
    #[cfg(test)]
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    /// The last occurrence of the key had a value larger than `max_value_bytes`: it was dropped,
    /// and [`value`](Self::value) is `None` unless a later occurrence completes.
    #[cfg(test)]
    pub(crate) fn too_large(&self) -> bool {
        self.too_large
    }

    fn fail(&mut self) {
        self.failed = true;
        self.capturing = false;
        self.capture = Vec::new();
        self.found = None;
    }

    /// Inside a string, from `i` in `piece`: the offset of the closing quote and `true`, or the
    /// piece's length and `false` when the string goes on in the next piece (with `escape` set
    /// when the piece ends on a backslash).
    fn string_end(&mut self, piece: &[u8], mut i: usize) -> (usize, bool) {
        if self.escape {
            if i >= piece.len() {
                return (piece.len(), false);
            }
            self.escape = false;
            i += 1;
        }
        loop {
            let Some(found) = memchr2(b'"', b'\\', piece.get(i..).unwrap_or_default()) else {
                return (piece.len(), false);
            };
            let at = i + found;
            if piece.get(at) == Some(&b'"') {
                return (at, true);
            }
            if at + 1 < piece.len() {
                i = at + 2;
            } else {
                self.escape = true;
                return (piece.len(), false);
            }
        }
    }

    /// Whether the key just read is the one searched, compared decoded.
    fn key_matches(&mut self) -> bool {
        if self.key_overflow {
            return false;
        }
        if memchr(b'\\', &self.key_raw).is_none() {
            return self.key_raw == self.key.as_bytes();
        }
        self.decoded.clear();
        unescape(&self.key_raw, &mut self.decoded, false) && self.decoded == self.key.as_bytes()
    }

    /// The current top-level value ended just before `end` in `piece`.
    fn value_end(&mut self, piece: &[u8], capture_from: usize, end: usize) {
        self.step = Step::AfterValue;
        if self.capturing {
            self.capture_more(piece.get(capture_from..end).unwrap_or_default());
            if self.capturing {
                self.capturing = false;
                self.found = Some(std::mem::take(&mut self.capture));
                self.too_large = false;
            }
        }
    }

    /// Adds `bytes` to the capture, or drops it when it would outgrow the bound.
    fn capture_more(&mut self, bytes: &[u8]) {
        if self.capture.len() + bytes.len() > self.max_value_bytes {
            self.capturing = false;
            self.capture = Vec::new();
            self.found = None;
            self.too_large = true;
        } else {
            self.capture.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use serde_json::{Map, Value, json};

    fn strict(body: &[u8]) -> Result<Object, JsonError> {
        parse_object(body, Mode::Strict)
    }

    fn lenient(body: &[u8]) -> Result<Object, JsonError> {
        parse_object(body, Mode::Lenient)
    }

    /// `{"a":[[...]]}` nested `depth` deep, the top level object counting as 1.
    fn nested(depth: usize) -> Vec<u8> {
        let mut body = b"{\"a\":".to_vec();
        body.extend(std::iter::repeat_n(b'[', depth - 1));
        body.extend(std::iter::repeat_n(b']', depth - 1));
        body.push(b'}');
        body
    }

    /// The text of `range` in `body`.
    fn text(body: &[u8], range: Range<usize>) -> &str {
        std::str::from_utf8(&body[range]).unwrap()
    }

    #[test]
    fn refuses_invalid_utf8() {
        assert_eq!(
            strict(b"{\"a\":\"\xff\"}"),
            Err(JsonError::NotUtf8 { at: 6 })
        );
        // An overlong encoding of '"' and a UTF-8-encoded surrogate.
        assert_eq!(
            strict(b"{\"a\":\"\xc0\xa2\"}"),
            Err(JsonError::NotUtf8 { at: 6 })
        );
        assert_eq!(
            strict(b"{\"a\":\"\xed\xa0\x80\"}"),
            Err(JsonError::NotUtf8 { at: 6 })
        );
        assert_eq!(
            JsonError::NotUtf8 { at: 6 }.to_string(),
            "the body is not valid UTF-8 (byte 6)"
        );
    }

    #[test]
    fn refuses_byte_order_marks_and_utf16() {
        assert_eq!(strict(b"\xEF\xBB\xBF{}"), Err(JsonError::ByteOrderMark));
        assert_eq!(strict(b"\xFF\xFE{\0}\0"), Err(JsonError::ByteOrderMark));
        assert_eq!(strict(b"\xFE\xFF\0{\0}"), Err(JsonError::ByteOrderMark));
        assert_eq!(
            strict(b"\0\0\xFE\xFF\0\0\0{\0\0\0}"),
            Err(JsonError::ByteOrderMark)
        );
        // `{}` in UTF-16LE and UTF-16BE without a mark: valid UTF-8, NUL-interleaved.
        assert_eq!(strict(b"{\0}\0"), Err(JsonError::NotUtf8 { at: 1 }));
        assert_eq!(strict(b"\0{\0}"), Err(JsonError::NotUtf8 { at: 0 }));
        assert_eq!(strict(b" \0{\0}\0"), Err(JsonError::NotUtf8 { at: 1 }));
        // A BOM is only refused at the start; elsewhere it is text.
        assert!(strict("{\"a\":\"\u{feff}\"}".as_bytes()).is_ok());
    }

    #[test]
    fn refuses_lone_surrogates() {
        for body in [
            br#"{"a":"\ud800"}"#.as_slice(),
            br#"{"a":"\udc00"}"#,
            br#"{"a":"\ud800\u0041"}"#,
            br#"{"a":"\uDBFF\uDBFF"}"#,
            br#"{"a":"\ud800x\udc00"}"#,
            br#"{"a":"\udc00\ud800"}"#,
        ] {
            assert_eq!(
                strict(body),
                Err(JsonError::LoneSurrogate { at: 6 }),
                "{body:?}"
            );
        }
        assert_eq!(
            strict(br#"{"\ud800":1}"#),
            Err(JsonError::LoneSurrogate { at: 2 })
        );
        assert_eq!(
            strict(br#"{"a":[{"b":"x\udfff"}]}"#),
            Err(JsonError::LoneSurrogate { at: 13 })
        );
        // A pair is fine, and decodes to one character.
        let object = strict(br#"{"\ud83d\ude00":"\uD83D\uDE00"}"#).unwrap();
        assert_eq!(object.members[0].key, "\u{1F600}");
    }

    #[test]
    fn refuses_raw_control_characters_in_strings() {
        assert_eq!(
            strict(b"{\"a\":\"x\ny\"}"),
            Err(JsonError::Syntax { at: 7 })
        );
        assert_eq!(strict(b"{\"a\":\"\t\"}"), Err(JsonError::Syntax { at: 6 }));
        assert_eq!(strict(b"{\"a\x1f\":1}"), Err(JsonError::Syntax { at: 3 }));
        // After an escape, and in an unterminated string.
        assert_eq!(
            strict(b"{\"a\":[\"\\n\x01\"]}"),
            Err(JsonError::Syntax { at: 9 })
        );
        assert_eq!(strict(b"{\"a\":\"xx\x00"), Err(JsonError::Syntax { at: 8 }));
        // 0x7f is not a control character for JSON.
        assert!(strict(b"{\"a\":\"\x7f\"}").is_ok());
    }

    #[test]
    fn refuses_numbers_out_of_f64_range() {
        for number in ["1e400", "-1e999", "0.1e99999", "1E+309", "-2.5e308"] {
            let body = format!("{{\"a\":{number}}}");
            assert_eq!(
                strict(body.as_bytes()),
                Err(JsonError::NumberOutOfRange { at: 5 }),
                "{number}"
            );
        }
        let long_float = format!("{{\"a\":{}.5}}", "9".repeat(400));
        assert_eq!(
            strict(long_float.as_bytes()),
            Err(JsonError::NumberOutOfRange { at: 5 })
        );
        // In range, or only underflowing to zero: fine.
        for number in [
            "1e308",
            "1.7976931348623157e308",
            "0.0e99999",
            "1e-400",
            "-0.0",
            "0.00001e310",
            "123.456e-7",
        ] {
            let body = format!("{{\"a\":{number}}}");
            assert!(strict(body.as_bytes()).is_ok(), "{number}");
        }
        // Integers of any length are read exactly by Python.
        let long_integer = format!("{{\"a\":-{}}}", "9".repeat(1000));
        assert!(strict(long_integer.as_bytes()).is_ok());
    }

    #[test]
    fn refuses_numbers_and_literals_outside_the_grammar() {
        for (value, at) in [
            ("01", 6),
            ("-01", 7),
            ("00", 6),
            ("+1", 5),
            (".5", 5),
            ("1.", 7),
            ("1.e5", 7),
            ("-", 6),
            ("-a", 6),
            ("1e", 7),
            ("1e+", 8),
            ("0x10", 6),
            ("NaN", 5),
            ("Infinity", 5),
            ("-Infinity", 6),
            ("tru", 5),
            ("True", 5),
            ("nul", 5),
            ("falsey", 10),
            ("undefined", 5),
        ] {
            let body = format!("{{\"a\":{value}}}");
            assert_eq!(
                strict(body.as_bytes()),
                Err(JsonError::Syntax { at }),
                "{value}"
            );
        }
    }

    #[test]
    fn refuses_other_syntax_errors() {
        for (body, at) in [
            ("", 0),
            ("   ", 3),
            ("{", 1),
            ("{\"a\"", 4),
            ("{\"a\":", 5),
            ("{\"a\":1", 6),
            ("{\"a\":1,}", 7),
            ("{,}", 1),
            ("{\"a\" 1}", 5),
            ("{'a':1}", 1),
            ("{a:1}", 1),
            ("{\"a\":1 \"b\":2}", 7),
            ("{\"a\":[1 2]}", 8),
            ("{\"a\":[1,]}", 8),
            ("{\"a\":{\"b\"}}", 9),
            ("{\"a\":{\"b\":1,}}", 12),
            ("{\"a\":[}", 6),
            ("{\"a\":\"\\x\"}", 7),
            ("{\"a\":\"\\u12\"}", 10),
            ("{\"a\":\"\\U0041\"}", 7),
            ("{\"a\":\"unterminated}", 19),
            ("{\"a\":1}\u{a0}", 7),
            ("\u{c}{}", 0),
            ("[1,]", 3),
        ] {
            assert_eq!(
                strict(body.as_bytes()),
                Err(JsonError::Syntax { at }),
                "{body}"
            );
        }
    }

    #[test]
    fn refuses_trailing_bytes() {
        assert_eq!(strict(b"{}x"), Err(JsonError::Syntax { at: 2 }));
        assert_eq!(strict(b"{} {}"), Err(JsonError::Syntax { at: 3 }));
        assert_eq!(strict(b"{\"a\":1}}"), Err(JsonError::Syntax { at: 7 }));
        assert_eq!(strict(b"{}  \0"), Err(JsonError::Syntax { at: 4 }));
        assert!(strict(b" \t\r\n{} \t\r\n").is_ok());
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        for body in ["[]", "\"x\"", "1", "null", " [1, {\"a\": 2}] ", "true"] {
            assert_eq!(
                strict(body.as_bytes()),
                Err(JsonError::NotAnObject),
                "{body}"
            );
        }
    }

    #[test]
    fn limits_nesting() {
        assert!(strict(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(strict(&nested(MAX_DEPTH + 1)), Err(JsonError::TooDeep));
        let objects = |depth: usize| {
            let mut body = "{\"a\":".repeat(depth);
            body.push('1');
            body.push_str(&"}".repeat(depth));
            body
        };
        assert!(strict(objects(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            strict(objects(MAX_DEPTH + 1).as_bytes()),
            Err(JsonError::TooDeep)
        );
        assert!(lenient(&nested(LENIENT_MAX_DEPTH)).is_ok());
        assert_eq!(
            lenient(&nested(LENIENT_MAX_DEPTH + 1)),
            Err(JsonError::TooDeep)
        );
        assert_eq!(JsonError::TooDeep.to_string(), "nesting deeper than 64");
    }

    #[test]
    fn a_mebibyte_of_brackets_is_too_deep_not_a_stack_overflow() {
        let brackets = vec![b'['; 1 << 20];
        assert_eq!(strict(&brackets), Err(JsonError::TooDeep));
        assert_eq!(lenient(&brackets), Err(JsonError::TooDeep));
        let mut in_object = b"{\"a\":".to_vec();
        in_object.extend(std::iter::repeat_n(b'[', 1 << 20));
        assert_eq!(strict(&in_object), Err(JsonError::TooDeep));
        let objects = "{\"a\":".repeat(1 << 18);
        assert_eq!(lenient(objects.as_bytes()), Err(JsonError::TooDeep));
    }

    #[test]
    fn refuses_duplicate_top_level_keys() {
        assert_eq!(
            strict(br#"{"a":1,"a":2}"#),
            Err(JsonError::DuplicateKey("a".into()))
        );
        assert_eq!(
            strict(br#"{"a":1,"\u0061":2}"#),
            Err(JsonError::DuplicateKey("a".into()))
        );
        assert_eq!(
            strict(br#"{"stream":false,"b":1,"str\u0065am":true}"#),
            Err(JsonError::DuplicateKey("stream".into()))
        );
        // Many keys (the sorted path), the duplicate far apart.
        let mut many: Vec<String> = (0..100).map(|i| format!("\"k{i}\":{i}")).collect();
        many.push("\"k7\":0".into());
        let body = format!("{{{}}}", many.join(","));
        assert_eq!(
            strict(body.as_bytes()),
            Err(JsonError::DuplicateKey("k7".into()))
        );
        many.pop();
        assert!(strict(format!("{{{}}}", many.join(",")).as_bytes()).is_ok());
        // Deeper duplicates are not the proxy's business; keys differing in case are distinct.
        assert!(strict(br#"{"a":{"b":1,"b":2},"c":[{"d":1,"d":2}]}"#).is_ok());
        assert!(strict(br#"{"a":1,"A":2}"#).is_ok());
    }

    #[test]
    fn duplicate_key_messages_are_bounded() {
        assert_eq!(
            JsonError::DuplicateKey("model".into()).to_string(),
            "duplicate key \"model\""
        );
        let long = JsonError::DuplicateKey(format!("\n{}", "x".repeat(1000))).to_string();
        assert!(long.len() < 100, "{long}");
        assert!(long.starts_with("duplicate key \"\\nxxx"), "{long}");
        assert!(!long.contains('\n'));
    }

    #[test]
    fn lenient_accepts_what_python_writes() {
        let body = br#"{"a":NaN,"b":Infinity,"c":-Infinity,"d":1e400,"e":"\ud800","f":"\udc00x","a":[NaN,{"g":-1e999}]}"#;
        let object = lenient(body).unwrap();
        let keys: Vec<&str> = object.members.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c", "d", "e", "f", "a"]);
        assert!(
            object.members[..4]
                .iter()
                .all(|member| member.kind == Kind::Number)
        );
        assert_eq!(text(body, object.members[2].value.clone()), "-Infinity");
        // The last duplicate is the one Python and Go keep.
        let a = object.get("a").unwrap();
        assert_eq!(text(body, a.value.clone()), "[NaN,{\"g\":-1e999}]");
        assert_eq!(a.kind, Kind::Array);
        let object = lenient(br#"{"\ud800":1}"#).unwrap();
        assert_eq!(object.members[0].key, "\u{FFFD}");
        for refused in [
            strict(br#"{"a":NaN}"#),
            strict(br#"{"a":1,"a":2}"#),
            strict(&nested(100)),
        ] {
            assert!(refused.is_err());
        }
        assert!(lenient(&nested(100)).is_ok());
    }

    #[test]
    fn lenient_still_refuses_bad_syntax() {
        for body in [
            "{\"a\":1,}",
            "{\"a\":nan}",
            "{\"a\":-NaN}",
            "{\"a\":infinity}",
            "{\"a\":+Infinity}",
            "{\"a\":01}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\u{1}\"}",
            "{}x",
            "",
        ] {
            assert!(
                matches!(lenient(body.as_bytes()), Err(JsonError::Syntax { .. })),
                "{body}"
            );
        }
        assert_eq!(lenient(b"\xEF\xBB\xBF{}"), Err(JsonError::ByteOrderMark));
        assert_eq!(lenient(b"[NaN]"), Err(JsonError::NotAnObject));
    }

    #[test]
    fn spans_point_at_the_right_bytes() {
        let body = br#" { "model" : "gpt-4o" , "n":12345678901234567890123,"m":[1,{"x":2}] ,"str\u0065am":true, "o":{}, "z":null, "f":false, "s":"a\"b" } "#;
        let object = strict(body).unwrap();
        assert_eq!(object.open, 1);
        assert_eq!(object.close, body.len() - 2);
        let expected = [
            ("model", "\"model\"", "\"gpt-4o\"", Kind::String),
            ("n", "\"n\"", "12345678901234567890123", Kind::Number),
            ("m", "\"m\"", "[1,{\"x\":2}]", Kind::Array),
            ("stream", "\"str\\u0065am\"", "true", Kind::Bool),
            ("o", "\"o\"", "{}", Kind::Object),
            ("z", "\"z\"", "null", Kind::Null),
            ("f", "\"f\"", "false", Kind::Bool),
            ("s", "\"s\"", "\"a\\\"b\"", Kind::String),
        ];
        assert_eq!(object.members.len(), expected.len());
        for (member, (key, key_text, value_text, kind)) in object.members.iter().zip(expected) {
            assert_eq!(member.key, key);
            assert_eq!(text(body, member.key_span.clone()), key_text);
            assert_eq!(text(body, member.value.clone()), value_text);
            assert_eq!(member.kind, kind);
        }
        assert_eq!(
            text(body, object.get("stream").unwrap().value.clone()),
            "true"
        );
        assert!(object.get("missing").is_none());
        let empty = strict(b"{ }").unwrap();
        assert_eq!((empty.open, empty.close, empty.members.len()), (0, 2, 0));
    }

    #[test]
    fn keys_are_decoded() {
        let object =
            strict(br#"{"str\u0065am":true,"a\"\\\/\b\f\n\r\t":1,"\u00e9\u20AC":2}"#).unwrap();
        let keys: Vec<&str> = object.members.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["stream", "a\"\\/\u{8}\u{c}\n\r\t", "é€"]);
    }

    #[test]
    fn edits_in_place() {
        let body = Bytes::from_static(br#"{"a": 1, "usage": null, "b": 2}"#);
        let object = strict(&body).unwrap();
        let removed = |index| apply(&body, vec![remove_member(&object, index)]);
        assert_eq!(removed(1), &br#"{"a": 1, "b": 2}"#[..]);
        assert_eq!(removed(0), &br#"{"usage": null, "b": 2}"#[..]);
        assert_eq!(removed(2), &br#"{"a": 1, "usage": null}"#[..]);
        assert_eq!(removed(3), body);
        let only = Bytes::from_static(br#"{"usage": null}"#);
        let edit = remove_member(&strict(&only).unwrap(), 0);
        assert_eq!(apply(&only, vec![edit]), &b"{}"[..]);

        let empty = Bytes::from_static(b"{ }");
        let edit = insert_member(
            &strict(&empty).unwrap(),
            "stream_options",
            br#"{"include_usage":true}"#,
        );
        assert_eq!(
            apply(&empty, vec![edit]),
            &br#"{ "stream_options":{"include_usage":true}}"#[..]
        );
        let edit = insert_member(&object, "k\"\n", b"true");
        assert_eq!(
            apply(&body, vec![edit]),
            &br#"{"a": 1, "usage": null, "b": 2,"k\"\u000a":true}"#[..]
        );

        // Several edits, given out of order.
        let edits = vec![
            insert_member(&object, "c", b"3"),
            replace_value(&object.members[0], b"10"),
            remove_member(&object, 1),
        ];
        assert_eq!(apply(&body, edits), &br#"{"a": 10, "b": 2,"c":3}"#[..]);

        // No edit: the very same buffer.
        let same = apply(&body, Vec::new());
        assert_eq!(same.as_ptr(), body.as_ptr());
    }

    #[test]
    fn finder_finds_the_top_level_member() {
        let find = |body: &[u8]| {
            let mut finder = MemberFinder::new("usage", 1 << 10);
            finder.feed(body);
            assert!(!finder.failed(), "{:?}", String::from_utf8_lossy(body));
            finder
                .value()
                .map(|value| String::from_utf8(value.to_vec()).unwrap())
        };
        assert_eq!(
            find(br#"{"id":"x","usage":{"total_tokens":3}}"#).as_deref(),
            Some(r#"{"total_tokens":3}"#)
        );
        assert_eq!(find(br#"{"usage" : 12 , "b":1}"#).as_deref(), Some("12"));
        assert_eq!(find(br#"{"usage":-1.5e3}"#).as_deref(), Some("-1.5e3"));
        assert_eq!(find(br#"{"usage":NaN}"#).as_deref(), Some("NaN"));
        assert_eq!(find(br#"{"usage":"a\"}"}"#).as_deref(), Some(r#""a\"}""#));
        assert_eq!(find(br#"{"\u0075sage":[1]}"#).as_deref(), Some("[1]"));
        assert_eq!(
            find(br#"{"usage":1,"usage":{"n":2}}"#).as_deref(),
            Some(r#"{"n":2}"#)
        );
        // Not at the top level, or not a key, or another key.
        assert_eq!(find(br#"{"a":{"usage":1},"b":[{"usage":2}]}"#), None);
        assert_eq!(
            find(br#"{"text":"\"usage\":{}","usages":1,"usag":2}"#),
            None
        );
        assert_eq!(find(br#"{"\u0075sage\u0000":1,"\ud800":2}"#), None);
        assert_eq!(find(b"{}"), None);
    }

    #[test]
    fn finder_fails_on_what_is_not_an_object() {
        for body in [
            &b"[{\"usage\":1}]"[..],
            b"\"usage\"",
            b"x",
            b"{\"usage\":1}x",
            b"{\"a\" 1}",
        ] {
            let mut finder = MemberFinder::new("usage", 1 << 10);
            finder.feed(body);
            assert!(finder.failed(), "{body:?}");
            assert_eq!(finder.value(), None);
        }
        let mut finder = MemberFinder::new("usage", 1 << 10);
        finder.feed(b"  \n");
        assert!(!finder.failed());
        finder.feed(b"{\"usage\":1}\n");
        assert!(!finder.failed());
        assert_eq!(finder.value(), Some(&b"1"[..]));
    }

    #[test]
    fn finder_bounds_the_capture() {
        let mut finder = MemberFinder::new("usage", 8);
        finder.feed(br#"{"usage":[1,2,3,4,5]"#);
        assert!(finder.too_large());
        assert_eq!(finder.value(), None);
        finder.feed(br#","usage":[1,2]}"#);
        assert!(!finder.too_large());
        assert_eq!(finder.value(), Some(&b"[1,2]"[..]));
        // Fits exactly, in pieces.
        let mut finder = MemberFinder::new("usage", 8);
        for piece in [&br#"{"usage":"#[..], b"\"12", b"3456\"", b"}"] {
            finder.feed(piece);
        }
        assert!(!finder.too_large());
        assert_eq!(finder.value(), Some(&b"\"123456\""[..]));
        // A later occurrence too large drops the earlier one: the last one counts.
        let mut finder = MemberFinder::new("usage", 4);
        finder.feed(br#"{"usage":1,"usage":123456}"#);
        assert!(finder.too_large());
        assert_eq!(finder.value(), None);
        // A long key is not buffered beyond what could still match.
        let mut finder = MemberFinder::new("usage", 4);
        let long_key = format!("{{\"{}\":1,\"usage\":2}}", "u".repeat(100_000));
        finder.feed(long_key.as_bytes());
        assert!(finder.key_raw.capacity() <= 64);
        assert_eq!(finder.value(), Some(&b"2"[..]));
    }

    // ---- property tests ----

    /// Strings with anything in them: arbitrary unicode, and the characters that need escapes.
    fn arb_string() -> impl Strategy<Value = String> {
        let special = prop_oneof![
            Just('"'),
            Just('\\'),
            Just('/'),
            Just('\n'),
            Just('\u{0}'),
            Just('\u{1f}'),
            Just('\u{7f}'),
            Just('é'),
            Just('€'),
            Just('\u{FFFF}'),
            Just('\u{1F600}'),
            Just('\u{10FFFF}'),
            Just('a'),
            // Neighbours of the bytes the string scan stops at, and multi-byte characters
            // holding bytes alike in their low bits.
            Just('!'),
            Just('#'),
            Just('['),
            Just(']'),
            Just('¢'),
            Just('Ü'),
            Just('\u{722}'),
            any::<char>(),
        ];
        prop_oneof![
            "[a-z_]{0,8}",
            any::<String>(),
            prop::collection::vec(special, 0..10).prop_map(String::from_iter),
        ]
    }

    /// Numbers serde_json reads back exactly: integers, and short binary fractions.
    fn arb_number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (any::<i16>(), 0..=16i32)
                .prop_map(|(mantissa, shift)| Value::from(f64::from(mantissa) / 2f64.powi(shift))),
        ]
    }

    /// Any value, nested at most 5 deep (6 inside a top-level object).
    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            arb_number(),
            arb_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((arb_string(), inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    fn arb_map() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::vec((arb_string(), arb_value()), 0..8)
            .prop_map(|members| members.into_iter().collect())
    }

    /// How a document is written out.
    #[derive(Debug, Clone, Copy)]
    enum Spelling {
        /// `serde_json::to_vec`.
        Compact,
        /// `serde_json::to_vec_pretty`.
        Pretty,
        /// Python's `json.dumps` defaults: `", "` and `": "`, non-ASCII as `\uxxxx`.
        Python,
        /// Every character of every string as an upper-case `\uXXXX` escape (`/` as `\/`).
        Escaped,
    }

    fn arb_spelling() -> impl Strategy<Value = Spelling> {
        prop_oneof![
            Just(Spelling::Compact),
            Just(Spelling::Pretty),
            Just(Spelling::Python),
            Just(Spelling::Escaped),
        ]
    }

    fn spell(value: &Value, spelling: Spelling, out: &mut Vec<u8>) {
        match spelling {
            Spelling::Compact => out.extend(serde_json::to_vec(value).unwrap()),
            Spelling::Pretty => out.extend(serde_json::to_vec_pretty(value).unwrap()),
            Spelling::Python | Spelling::Escaped => match value {
                Value::Object(map) => {
                    out.push(b'{');
                    for (i, (key, value)) in map.iter().enumerate() {
                        if i > 0 {
                            out.extend(b", ");
                        }
                        spell_string(key, spelling, out);
                        out.extend(b": ");
                        spell(value, spelling, out);
                    }
                    out.push(b'}');
                }
                Value::Array(items) => {
                    out.push(b'[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.extend(b", ");
                        }
                        spell(item, spelling, out);
                    }
                    out.push(b']');
                }
                Value::String(string) => spell_string(string, spelling, out),
                other => out.extend(serde_json::to_vec(other).unwrap()),
            },
        }
    }

    fn spell_string(string: &str, spelling: Spelling, out: &mut Vec<u8>) {
        let all = matches!(spelling, Spelling::Escaped);
        if !all && !matches!(spelling, Spelling::Python) {
            out.extend(serde_json::to_vec(string).unwrap());
            return;
        }
        out.push(b'"');
        for c in string.chars() {
            match c {
                '/' if all => out.extend(b"\\/"),
                '"' if !all => out.extend(b"\\\""),
                '\\' if !all => out.extend(b"\\\\"),
                '\n' if !all => out.extend(b"\\n"),
                '\t' if !all => out.extend(b"\\t"),
                ' '..='~' if !all => out.push(c as u8),
                _ => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        let escape = if all {
                            format!("\\u{unit:04X}")
                        } else {
                            format!("\\u{unit:04x}")
                        };
                        out.extend(escape.as_bytes());
                    }
                }
            }
        }
        out.push(b'"');
    }

    /// A top-level object with these members, in this order (duplicates included).
    fn spell_members(members: &[(String, Value)], spelling: Spelling) -> Vec<u8> {
        let (open, separator, colon, close) = match spelling {
            Spelling::Compact => ("{", ",", ":", "}"),
            Spelling::Pretty => ("{\n  ", ",\n  ", ": ", "\n}"),
            Spelling::Python | Spelling::Escaped => ("{", ", ", ": ", "}"),
        };
        let mut out = open.as_bytes().to_vec();
        for (i, (key, value)) in members.iter().enumerate() {
            if i > 0 {
                out.extend(separator.as_bytes());
            }
            spell_string(key, spelling, &mut out);
            out.extend(colon.as_bytes());
            spell(value, spelling, &mut out);
        }
        out.extend(close.as_bytes());
        out
    }

    fn parsed(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn finds_a_control_character_anywhere_in_a_string() {
        // Every position: the word-at-a-time scan, its remainder, and the memchr path beyond.
        for len in [1, 7, 8, 9, 127, 128, 129, 300] {
            for at in 0..len {
                let mut body = b"{\"a\":\"".to_vec();
                let start = body.len();
                body.extend(std::iter::repeat_n(b'x', len));
                body[start + at] = 0x1f;
                body.extend(b"\"}");
                assert_eq!(
                    strict(&body),
                    Err(JsonError::Syntax { at: start + at }),
                    "len {len}, at {at}"
                );
                // The same string, unterminated.
                body.truncate(start + len);
                assert_eq!(
                    strict(&body),
                    Err(JsonError::Syntax { at: start + at }),
                    "len {len}, at {at}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn refuses_exactly_the_raw_control_characters(
            text in prop::collection::vec(prop_oneof![
                8 => any::<char>(),
                1 => Just('\n'),
                1 => Just('"'),
                1 => Just('\\'),
                1 => Just('x'),
            ], 0..400).prop_map(String::from_iter)
        ) {
            // Quotes and backslashes escaped, control characters left raw.
            let mut body = b"{\"a\":\"".to_vec();
            let start = body.len();
            for c in text.chars() {
                if c == '"' || c == '\\' {
                    body.push(b'\\');
                }
                body.extend(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
            body.extend(b"\"}");
            match body.iter().skip(start).position(|&byte| byte < 0x20) {
                Some(at) => prop_assert_eq!(strict(&body), Err(JsonError::Syntax { at: start + at })),
                None => {
                    let object = strict(&body).unwrap();
                    prop_assert_eq!(parsed(&body[object.members[0].value.clone()]), Value::String(text));
                }
            }
        }

        #[test]
        fn parses_every_spelling_of_every_object(map in arb_map(), spelling in arb_spelling()) {
            let mut doc = Vec::new();
            spell(&Value::Object(map.clone()), spelling, &mut doc);
            prop_assert_eq!(parsed(&doc), Value::Object(map.clone()));
            let object = strict(&doc).unwrap();
            prop_assert_eq!(&lenient(&doc).unwrap(), &object);
            let keys: Vec<&String> = object.members.iter().map(|m| &m.key).collect();
            prop_assert_eq!(keys, map.keys().collect::<Vec<_>>());
            for (member, (key, value)) in object.members.iter().zip(&map) {
                prop_assert_eq!(&parsed(&doc[member.value.clone()]), value);
                prop_assert_eq!(&parsed(&doc[member.key_span.clone()]), &Value::String(key.clone()));
                let kind = match value {
                    Value::Object(_) => Kind::Object,
                    Value::Array(_) => Kind::Array,
                    Value::String(_) => Kind::String,
                    Value::Number(_) => Kind::Number,
                    Value::Bool(_) => Kind::Bool,
                    Value::Null => Kind::Null,
                };
                prop_assert_eq!(member.kind, kind);
            }
            prop_assert_eq!(doc.get(object.open), Some(&b'{'));
            prop_assert_eq!(doc.get(object.close), Some(&b'}'));
        }

        #[test]
        fn other_documents_are_not_objects(value in arb_value(), spelling in arb_spelling()) {
            let mut doc = Vec::new();
            spell(&value, spelling, &mut doc);
            let result = strict(&doc);
            if value.is_object() {
                prop_assert!(result.is_ok());
            } else {
                prop_assert_eq!(result, Err(JsonError::NotAnObject));
            }
        }

        #[test]
        fn edits_change_only_their_range(
            map in arb_map(),
            spelling in arb_spelling(),
            new_value in arb_value(),
            pick in any::<Index>(),
        ) {
            let mut doc = Vec::new();
            spell(&Value::Object(map.clone()), spelling, &mut doc);
            let doc = Bytes::from(doc);
            let object = strict(&doc).unwrap();
            let raw = serde_json::to_vec(&new_value).unwrap();

            let key = "stream_options\u{1}\"";
            if !map.contains_key(key) {
                let edit = insert_member(&object, key, &raw);
                let out = apply(&doc, vec![edit.clone()]);
                let inserted = strict(&out).unwrap();
                prop_assert_eq!(inserted.members.len(), object.members.len() + 1);
                prop_assert_eq!(&inserted.members.last().unwrap().key, key);
                prop_assert_eq!(parsed(&out[inserted.get(key).unwrap().value.clone()]), new_value.clone());
                let mut expected = map.clone();
                expected.insert(key.to_owned(), new_value.clone());
                prop_assert_eq!(parsed(&out), Value::Object(expected));
                let mut back = out.to_vec();
                back.drain(edit.range.start..edit.range.start + edit.with.len());
                prop_assert_eq!(&back[..], &doc[..]);
            }

            if !object.members.is_empty() {
                let index = pick.index(object.members.len());
                let member = &object.members[index];

                let out = apply(&doc, vec![replace_value(member, &raw)]);
                let start = member.value.start;
                prop_assert_eq!(&out[..start], &doc[..start]);
                prop_assert_eq!(&out[start + raw.len()..], &doc[member.value.end..]);
                let mut expected = map.clone();
                expected.insert(member.key.clone(), new_value.clone());
                prop_assert_eq!(parsed(&out), Value::Object(expected));

                let edit = remove_member(&object, index);
                let out = apply(&doc, vec![edit.clone()]);
                let remaining = strict(&out).unwrap();
                prop_assert_eq!(remaining.members.len(), object.members.len() - 1);
                let mut expected = map.clone();
                expected.remove(&member.key);
                prop_assert_eq!(parsed(&out), Value::Object(expected));
                let mut outside = doc[..edit.range.start].to_vec();
                outside.extend_from_slice(&doc[edit.range.end..]);
                prop_assert_eq!(&out[..], &outside[..]);
            }
        }

        #[test]
        fn finder_finds_usage_in_any_pieces(
            others in prop::collection::vec((arb_string(), arb_decoy()), 0..6),
            usage in arb_decoy(),
            earlier in prop::option::of(arb_decoy()),
            at in any::<Index>(),
            earlier_at in any::<Index>(),
            spelling in arb_spelling(),
            sizes in arb_pieces(),
        ) {
            let mut members: Vec<(String, Value)> =
                others.into_iter().filter(|(key, _)| key != "usage").collect();
            let position = at.index(members.len() + 1);
            members.insert(position, ("usage".to_owned(), usage.clone()));
            if let Some(earlier) = earlier {
                members.insert(earlier_at.index(position + 1), ("usage".to_owned(), earlier));
            }
            let doc = spell_members(&members, spelling);
            // The document says what Python would read.
            let object = lenient(&doc).unwrap();
            prop_assert_eq!(parsed(&doc[object.get("usage").unwrap().value.clone()]), usage.clone());

            let mut finder = MemberFinder::new("usage", 1 << 20);
            let mut rest = &doc[..];
            for &size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, tail) = rest.split_at(size.min(rest.len()));
                finder.feed(piece);
                rest = tail;
            }
            prop_assert!(!finder.failed());
            prop_assert!(!finder.too_large());
            prop_assert_eq!(parsed(finder.value().unwrap()), usage);
        }
    }

    /// Values, some of them holding `usage` where it must not be found.
    fn arb_decoy() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => arb_value(),
            1 => arb_value().prop_map(|value| json!({ "usage": value })),
            1 => arb_value().prop_map(|value| json!([{ "usage": value }, "usage"])),
            1 => Just(json!("\"usage\":{}")),
            1 => Just(json!("\\\"usage\\\":{\"total_tokens\":1}, \"usage\": 2}")),
            1 => Just(json!({ "a": { "usage": { "total_tokens": 9 } }, "b": "}" })),
        ]
    }

    /// Piece sizes, used in turn: all single bytes, small, or larger.
    fn arb_pieces() -> impl Strategy<Value = Vec<usize>> {
        prop_oneof![
            Just(vec![1]),
            prop::collection::vec(1usize..8, 1..12),
            prop::collection::vec(1usize..300, 1..12),
        ]
    }

    /// A chat request of about `size` bytes: messages of `content`.
    fn chat_request(size: usize, content: &str) -> Vec<u8> {
        let mut messages = Vec::new();
        let mut total = 0;
        while total < size {
            total += content.len() + 40;
            let role = if messages.len() % 2 == 0 {
                "user"
            } else {
                "assistant"
            };
            messages.push(json!({ "role": role, "content": content }));
        }
        serde_json::to_vec(&json!({
            "model": "gpt-4o-mini",
            "messages": messages,
            "temperature": 0.7,
            "max_tokens": 1024,
            "stream": true,
            "tools": [{ "type": "function", "function": { "name": "f", "parameters": {
                "type": "object", "properties": { "a": { "type": "array", "items": { "type": "number" } } }
            } } }],
        }))
        .unwrap()
    }

    #[test]
    #[ignore = "timing; run by hand: cargo test --release -p perishable-core --lib json::tests::timing -- --ignored --nocapture"]
    fn timing_against_serde_json() {
        use std::hint::black_box;
        use std::time::{Duration, Instant};
        let ascii = "The quick brown fox jumps over the lazy dog, and then some more words to \
                     make a paragraph of a typical length.\n"
            .repeat(4);
        let mixed = "The quick brown fox \"jumps\" over the lazy dog.\nCafé, naïve, 東京, 😀 \
                     and some more text to make a paragraph of typical length. "
            .repeat(4);
        let image = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}]}}]}}"#,
            "QUJDRGVmZ2gxMjM0NTY3OA+/".repeat(40_000)
        );
        let bodies = [
            ("1 MiB English chat", chat_request(1 << 20, &ascii), 100),
            (
                "1 MiB mixed-script chat",
                chat_request(1 << 20, &mixed),
                100,
            ),
            ("1 MB base64 image", image.into_bytes(), 100),
            ("2 KiB chat", chat_request(2 << 10, &mixed), 20_000),
        ];
        for (name, body, rounds) in bodies {
            assert!(strict(&body).is_ok());
            // The best of several batches: the least disturbed by whatever else runs.
            let time = |run: &dyn Fn()| {
                (0..7)
                    .map(|_| {
                        let start = Instant::now();
                        for _ in 0..rounds {
                            run();
                        }
                        start.elapsed() / rounds
                    })
                    .min()
                    .unwrap_or(Duration::ZERO)
            };
            let ours = time(&|| {
                black_box(strict(black_box(&body)).is_ok());
            });
            let value = time(&|| {
                black_box(serde_json::from_slice::<Value>(black_box(&body)).is_ok());
            });
            let ignored = time(&|| {
                black_box(
                    serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).is_ok(),
                );
            });
            let utf8 = time(&|| {
                black_box(std::str::from_utf8(black_box(&body)).is_ok());
            });
            let finder = time(&|| {
                let mut finder = MemberFinder::new("usage", 1 << 16);
                for piece in black_box(&body).chunks(16 << 10) {
                    finder.feed(piece);
                }
                black_box(finder.value().is_some());
            });
            let rate = |took: Duration| body.len() as f64 / took.as_secs_f64() / 1e6;
            eprintln!(
                "{name} ({} bytes): parse_object {ours:?} ({:.0} MB/s; of which from_utf8 {utf8:?}), \
                 serde_json Value {value:?} ({:.0} MB/s), serde_json IgnoredAny {ignored:?}, \
                 MemberFinder {finder:?} ({:.0} MB/s)",
                body.len(),
                rate(ours),
                rate(value),
                rate(finder),
            );
        }
    }
}
