//! The server's API key, masked out of what the upstream sends back.
//!
//! OpenAI masks a key it echoes in an error, but an OpenAI-compatible upstream need not (a
//! debugging server, a gateway that quotes the `Authorization` it refused). Every byte of the
//! key that comes back, in a response header, a body or a Realtime event, becomes `*`: the same
//! length, so `Content-Length` and JSON strings stay valid, and nothing else changes.
//!
//! A streamed body can split the key between two frames: the end of a frame that could be the
//! start of the key is held back until the next frame shows whether it is. Only such an end is
//! held (a frame ending in `"\n\n"` never is), so streaming is not slowed. What the upstream
//! encoded (`Content-Encoding: gzip` passed through to the client) is not searched, and neither
//! is a key shorter than [`MIN_KEY_LEN`] bytes: masking every `x` of a response for a key `x`
//! would garble it, and so short a key guards nothing.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;

/// Keys shorter than this are not searched for.
pub(crate) const MIN_KEY_LEN: usize = 8;

/// The key to mask, shared by every response of one upstream Service.
#[derive(Clone)]
pub(crate) struct KeyMask {
    inner: Arc<Inner>,
}

struct Inner {
    key: Box<[u8]>,
    finder: Finder<'static>,
}

impl std::fmt::Debug for KeyMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyMask(**redacted**)")
    }
}

impl KeyMask {
    /// A mask for `key`, or `None` when it is too short to search for.
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        (key.len() >= MIN_KEY_LEN).then(|| Self {
            inner: Arc::new(Inner {
                key: key.into(),
                finder: Finder::new(key).into_owned(),
            }),
        })
    }

    /// Whether the key is in `bytes`.
    pub(crate) fn is_in(&self, bytes: &[u8]) -> bool {
        self.inner.finder.find(bytes).is_some()
    }

    /// Masks every whole occurrence of the key in `bytes`; whether there was one.
    pub(crate) fn mask_in_place(&self, bytes: &mut [u8]) -> bool {
        let len = self.inner.key.len();
        let mut from = 0;
        while let Some(at) = self.inner.finder.find(&bytes[from..]) {
            bytes[from + at..from + at + len].fill(b'*');
            from += at + len;
        }
        from > 0
    }

    /// Masks the key in every header value. Only a value that holds it is copied; `*` is valid
    /// wherever the key's bytes were, so the masked value always rebuilds.
    pub(crate) fn mask_headers(&self, headers: &mut http::HeaderMap) {
        for value in headers.values_mut() {
            if self.is_in(value.as_bytes()) {
                let mut bytes = value.as_bytes().to_vec();
                self.mask_in_place(&mut bytes);
                if let Ok(masked) = http::HeaderValue::from_bytes(&bytes) {
                    *value = masked;
                }
            }
        }
    }

    /// `bytes` with every occurrence of the key masked (no copy when there is none).
    pub(crate) fn mask(&self, bytes: Bytes) -> Bytes {
        if !self.is_in(&bytes) {
            return bytes;
        }
        let mut owned = BytesMut::from(&bytes[..]);
        self.mask_in_place(&mut owned);
        owned.freeze()
    }

    /// The length of the longest end of `bytes` that is the start of the key, but not all of
    /// it: what a stream must hold until its next frame.
    fn partial_end(&self, bytes: &[u8]) -> usize {
        let key = &self.inner.key;
        let from = bytes.len() - (key.len() - 1).min(bytes.len());
        memchr::memchr_iter(key[0], &bytes[from..])
            .map(|at| from + at)
            .find(|&at| key.starts_with(&bytes[at..]))
            .map_or(0, |at| bytes.len() - at)
    }

    /// A scrubber for one streamed body.
    pub(crate) fn stream(&self) -> Scrub {
        Scrub {
            mask: self.clone(),
            held: BytesMut::new(),
        }
    }
}

/// Masks the key in one streamed body, frame by frame.
#[derive(Debug)]
pub(crate) struct Scrub {
    mask: KeyMask,
    /// The end of the last frame that may be the start of the key.
    held: BytesMut,
}

impl Scrub {
    /// What of `data` can go to the client now, masked; `None` when all of it is held.
    pub(crate) fn frame(&mut self, data: Bytes) -> Option<Bytes> {
        if self.held.is_empty() {
            let hold = self.mask.partial_end(&data);
            if hold == 0 {
                return Some(self.mask.mask(data));
            }
        }
        let mut joined = std::mem::take(&mut self.held);
        joined.extend_from_slice(&data);
        self.mask.mask_in_place(&mut joined);
        let hold = self.mask.partial_end(&joined);
        self.held = joined.split_off(joined.len() - hold);
        (!joined.is_empty()).then(|| joined.freeze())
    }

    /// What is still held, at the end of the body: not the key, since the body ended.
    pub(crate) fn finish(&mut self) -> Option<Bytes> {
        (!self.held.is_empty()).then(|| std::mem::take(&mut self.held).freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"sk-test-SECRET-0123456789";

    fn scrubbed(frames: &[&[u8]]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut scrub = KeyMask::new(KEY).unwrap().stream();
        let mut out = Vec::new();
        let mut sent = Vec::new();
        for frame in frames {
            if let Some(b) = scrub.frame(Bytes::copy_from_slice(frame)) {
                out.extend_from_slice(&b);
                sent.push(b.to_vec());
            }
        }
        if let Some(b) = scrub.finish() {
            out.extend_from_slice(&b);
            sent.push(b.to_vec());
        }
        (out, sent)
    }

    #[test]
    fn the_key_is_masked_whole_or_split() {
        let body = b"{\"error\":\"Incorrect API key provided: Bearer sk-test-SECRET-0123456789\"}";
        let masked = {
            let mut m = body.to_vec();
            assert!(KeyMask::new(KEY).unwrap().mask_in_place(&mut m));
            m
        };
        assert!(!masked.windows(6).any(|w| w == b"SECRET"));
        assert_eq!(masked.len(), body.len());
        for cut in 0..=body.len() {
            for cut2 in cut..=body.len() {
                let (out, _) = scrubbed(&[&body[..cut], &body[cut..cut2], &body[cut2..]]);
                assert_eq!(out, masked, "cut at {cut} and {cut2}");
            }
        }
    }

    #[test]
    fn frames_without_a_start_of_the_key_pass_at_once() {
        let (out, sent) = scrubbed(&[b"data: {\"a\":1}\n\n", b"data: [DONE]\n\n"]);
        assert_eq!(out, b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert_eq!(sent.len(), 2, "each frame went out as it came");
        // An end that could start the key waits for the next frame, then goes with it.
        let (out, sent) = scrubbed(&[b"is sk", b"y blue\n\n"]);
        assert_eq!(out, b"is sky blue\n\n");
        assert_eq!(sent, [b"is ".to_vec(), b"sky blue\n\n".to_vec()]);
    }

    #[test]
    fn a_short_key_is_not_searched_for() {
        assert!(KeyMask::new(b"x").is_none());
        assert!(KeyMask::new(&KEY[..MIN_KEY_LEN]).is_some());
    }

    proptest::proptest! {
        /// Whatever the frames, the output is the input with every occurrence of the key
        /// masked, and nothing of the key goes out.
        #[test]
        fn any_framing_gives_the_masked_body(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(KEY.to_vec()),
                    proptest::strategy::Just(KEY[..7].to_vec()),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20),
                ],
                0..8,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let body: Vec<u8> = parts.concat();
            let mut expected = body.clone();
            KeyMask::new(KEY).unwrap().mask_in_place(&mut expected);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            let mut frames = Vec::new();
            let mut last = 0;
            for cut in cuts {
                frames.push(&body[last..cut]);
                last = cut;
            }
            frames.push(&body[last..]);
            let (out, _) = scrubbed(&frames);
            proptest::prop_assert_eq!(&out, &expected);
            proptest::prop_assert!(!out.windows(KEY.len()).any(|w| w == KEY));
        }
    }
}
