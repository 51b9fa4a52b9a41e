//! [`Interaction`]: the pointer, touch and key samples the app recorded, sent with a mint.

use serde::Serialize;
use serde::ser::SerializeStruct;

/// Most pointer samples, and most key times, a mint may carry (the PROTOCOL's limit). When more
/// are recorded, the oldest are dropped.
pub const MAX_SAMPLES: usize = 512;

/// Interaction samples the app recorded from its user: pointer or touch moves (`[t_ms, x, y]`)
/// and key-press times (never which key), sent as `entropy` with `POST /session`.
///
/// The server scores them itself (volume, irregular timing, curved paths) and refuses a mint
/// below `session.min_entropy_score` with `400 insufficient_entropy`. Record **real** events
/// (a touch move handler, a key handler); this crate never makes samples up. A command-line
/// tool or a test has no user to record: its operator sets `session.min_entropy_score = 0`
/// on the server instead. Times are milliseconds from any fixed origin (such as when recording
/// began) and must not go backwards; coordinates are in any fixed unit (points, pixels).
/// Non-finite values are ignored, and only the latest [`MAX_SAMPLES`] of each kind are kept.
///
/// ```
/// use perishable_client::Interaction;
///
/// // Built from a recording...
/// let samples = Interaction::new()
///     .pointer(0.0, 120.5, 300.0)
///     .pointer(17.0, 124.0, 296.5)
///     .key(250.0)
///     .elapsed_ms(1_200.0);
/// assert_eq!(samples.pointer_samples().len(), 1 + 1);
///
/// // ...or recorded as events arrive.
/// let mut recorder = Interaction::new();
/// recorder.push_pointer(0.0, 10.0, 10.0);
/// recorder.push_key(42.0);
/// assert!(!recorder.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Interaction {
    pointer: Vec<[f64; 3]>,
    keys: Vec<f64>,
    elapsed_ms: Option<f64>,
}

impl Interaction {
    /// No samples.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pointer or touch sample: `t_ms` milliseconds, at `x`, `y`.
    #[must_use]
    pub fn pointer(mut self, t_ms: f64, x: f64, y: f64) -> Self {
        self.push_pointer(t_ms, x, y);
        self
    }

    /// Adds a key-press time in milliseconds.
    #[must_use]
    pub fn key(mut self, t_ms: f64) -> Self {
        self.push_key(t_ms);
        self
    }

    /// Sets how long the samples were collected over, in milliseconds (default: the latest
    /// sample time).
    #[must_use]
    pub fn elapsed_ms(mut self, ms: f64) -> Self {
        self.set_elapsed_ms(ms);
        self
    }

    /// Records a pointer or touch sample.
    pub fn push_pointer(&mut self, t_ms: f64, x: f64, y: f64) {
        if t_ms.is_finite() && x.is_finite() && y.is_finite() {
            if self.pointer.len() == MAX_SAMPLES {
                self.pointer.remove(0);
            }
            self.pointer.push([t_ms, x, y]);
        }
    }

    /// Records a key-press time.
    pub fn push_key(&mut self, t_ms: f64) {
        if t_ms.is_finite() {
            if self.keys.len() == MAX_SAMPLES {
                self.keys.remove(0);
            }
            self.keys.push(t_ms);
        }
    }

    /// Sets how long the samples were collected over, in milliseconds.
    pub fn set_elapsed_ms(&mut self, ms: f64) {
        if ms.is_finite() && ms >= 0.0 {
            self.elapsed_ms = Some(ms);
        }
    }

    /// The pointer samples, `[t_ms, x, y]`, oldest first.
    pub fn pointer_samples(&self) -> &[[f64; 3]] {
        &self.pointer
    }

    /// The key-press times, oldest first.
    pub fn key_times(&self) -> &[f64] {
        &self.keys
    }

    /// Whether no sample was recorded.
    pub fn is_empty(&self) -> bool {
        self.pointer.is_empty() && self.keys.is_empty()
    }

    /// Drops every sample.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_ms.unwrap_or_else(|| {
            let last_pointer = self.pointer.last().map_or(0.0, |s| s[0]);
            let last_key = self.keys.last().copied().unwrap_or(0.0);
            last_pointer.max(last_key).max(0.0)
        })
    }
}

/// The PROTOCOL `entropy` object: `{"pointer": [[t_ms, x, y], ...], "keys": [t_ms, ...],
/// "elapsed_ms": n}`.
impl Serialize for Interaction {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Entropy", 3)?;
        s.serialize_field("pointer", &self.pointer)?;
        s.serialize_field("keys", &self.keys)?;
        s.serialize_field("elapsed_ms", &self.elapsed().round())?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_to_the_protocol_shape() {
        let i = Interaction::new()
            .pointer(0.0, 1.0, 2.0)
            .pointer(16.5, 3.0, f64::NAN)
            .pointer(20.0, 4.0, 5.0)
            .key(30.0);
        let v = serde_json::to_value(&i).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pointer": [[0.0, 1.0, 2.0], [20.0, 4.0, 5.0]], "keys": [30.0], "elapsed_ms": 30.0})
        );
        assert_eq!(
            serde_json::to_value(Interaction::new()).unwrap(),
            serde_json::json!({"pointer": [], "keys": [], "elapsed_ms": 0.0})
        );
    }

    #[test]
    fn keeps_the_latest_samples() {
        let mut i = Interaction::new();
        for t in 0..(MAX_SAMPLES + 10) {
            i.push_pointer(t as f64, 0.0, 0.0);
            i.push_key(t as f64);
        }
        assert_eq!(i.pointer_samples().len(), MAX_SAMPLES);
        assert_eq!(i.key_times().len(), MAX_SAMPLES);
        assert_eq!(i.pointer_samples()[0][0], 10.0);
        assert_eq!(i.key_times()[0], 10.0);
        i.clear();
        assert!(i.is_empty());
    }
}
