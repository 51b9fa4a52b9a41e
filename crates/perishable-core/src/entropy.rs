//! Interaction entropy: a server-side score (0 to 100) of the raw pointer and key samples a client
//! sends with `POST /session`.
//!
//! The score is computed here from the samples; a score sent by the client is never read. It is a
//! speed bump for naive scripts, not a proof of humanity: a determined attacker can synthesise
//! samples that pass. It adds up three parts:
//!
//! | part | points | what earns them |
//! |---|---|---|
//! | volume | 0 to 20 | one point per two samples (pointer and keys together), capped at 20 |
//! | timing | 0 to 40 | irregular timing: the coefficient of variation (standard deviation / mean) of the intervals between pointer samples, of the pointer speed, and of the intervals between key presses; the largest counts, 0.3 or more earns all 40 |
//! | geometry | 0 to 40 | a curved, wobbly path: 20 for how far the path is from a straight line (1 − chord / path length, 0.1 or more earns all 20), 20 for how much the turning angle varies between segments (standard deviation, 0.2 rad or more earns all 20) |
//!
//! Samples are read at the resolution the browser client reports them, 0.1 ms and 0.1 px:
//! noise finer than that (a script's `16 ± 0.0001` ms) is not variation. Two kinds of pointer
//! trace then earn no timing or geometry points at all, only their volume: one whose samples
//! come at constant intervals (all within a tenth of a millisecond of each other; a zero-length
//! trace, all at one time, included), and one whose
//! samples all lie within half a pixel of one straight line (a pointer that never moved
//! included), whatever its timing. `docs/protocol.md` promises both score below the default
//! threshold, whatever the other part would earn.
//!
//! So an empty trace scores 0; a constant-interval trace, or a perfectly straight one, scores
//! only its volume (at most 20); a circle at constant speed earns the curvature part but little
//! timing; a jittered, curved trace with varied timing
//! scores well above the default threshold of 50. Samples with time going backwards earn no
//! timing or geometry points. Typing alone can pass: 30 key presses with human rhythm earn
//! 15 + 40; at constant intervals they earn only their volume.

use serde::Deserialize;

/// Most pointer samples, and most key times, one request may carry.
pub(crate) const MAX_SAMPLES: usize = 512;

/// The raw interaction samples of `POST /session` (`entropy` in `docs/protocol.md`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct Entropy {
    /// Pointer samples: `[t_ms, x, y]`.
    pub(crate) pointer: Vec<[f64; 3]>,
    /// Key-press times in milliseconds.
    pub(crate) keys: Vec<f64>,
    /// How long the client collected samples, in milliseconds (informational).
    pub(crate) elapsed_ms: Option<f64>,
}

impl Entropy {
    /// Whether the sample counts are within the limit (512 pointer samples, 512 key times).
    pub(crate) fn within_limits(&self) -> bool {
        self.pointer.len() <= MAX_SAMPLES && self.keys.len() <= MAX_SAMPLES
    }
}

/// Mean and coefficient of variation of `values` (0 when fewer than 2 or the mean is ~0).
fn coefficient_of_variation(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if mean.abs() < 1e-9 {
        return 0.0;
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean.abs()
}

fn std_dev(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt()
}

fn monotonic(times: impl Iterator<Item = f64>) -> bool {
    let mut last = f64::NEG_INFINITY;
    for t in times {
        if !t.is_finite() || t < last {
            return false;
        }
        last = t;
    }
    true
}

/// Float noise, not a hand.
const CONSTANT: f64 = 1e-6;

/// The resolution the browser client reports samples at: a tenth of a millisecond, of a pixel.
const RESOLUTION: f64 = 0.1;

/// `value` at [`RESOLUTION`].
fn tenth(value: f64) -> f64 {
    (value / RESOLUTION).round() * RESOLUTION
}

/// The largest minus the smallest of `values` (0 for none). Intervals of a constant step read
/// at a tenth differ by at most a tenth.
fn spread(values: &[f64]) -> f64 {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if values.is_empty() { 0.0 } else { max - min }
}

/// How far from one line (in pixels) every sample of a straight trace lies.
const HALF_PIXEL: f64 = 0.5;

/// Whether every sample lies within half a pixel of one straight line: the line from the first
/// sample to the one farthest from it (back and forth on it included). A pointer that never
/// moved more than half a pixel is straight too.
fn on_one_line(pointer: &[[f64; 3]]) -> bool {
    let Some(first) = pointer.first() else {
        return true;
    };
    let offset = |s: &[f64; 3]| (s[1] - first[1], s[2] - first[2]);
    let Some((dx, dy)) = pointer
        .iter()
        .map(offset)
        .max_by(|a, b| a.0.hypot(a.1).total_cmp(&b.0.hypot(b.1)))
    else {
        return true;
    };
    let length = dx.hypot(dy);
    if length <= HALF_PIXEL {
        return true;
    }
    // The distance of each sample from the line: |cross product| / length.
    pointer
        .iter()
        .map(offset)
        .all(|(x, y)| (dx * y - dy * x).abs() <= HALF_PIXEL * length)
}

fn scaled(value: f64, full_at: f64, points: f64) -> f64 {
    (value / full_at).clamp(0.0, 1.0) * points
}

/// Scores the samples from 0 to 100; see the [module docs](self) for how.
pub(crate) fn score(samples: &Entropy) -> u8 {
    let pointer: Vec<[f64; 3]> = samples
        .pointer
        .iter()
        .take(MAX_SAMPLES)
        .filter(|s| s.iter().all(|v| v.is_finite()))
        .map(|s| s.map(tenth))
        .collect();
    let keys: Vec<f64> = samples
        .keys
        .iter()
        .take(MAX_SAMPLES)
        .map(|&t| tenth(t))
        .collect();

    let volume = ((pointer.len() + keys.len()) as f64 / 2.0).min(20.0);

    let pointer_ok = pointer.len() >= 3 && monotonic(pointer.iter().map(|s| s[0]));
    let keys_ok = keys.len() >= 3 && monotonic(keys.iter().copied());

    let mut timing_cv: f64 = 0.0;
    let mut geometry = 0.0;
    if pointer_ok {
        let mut intervals = Vec::with_capacity(pointer.len());
        let mut speeds = Vec::with_capacity(pointer.len());
        let mut segments = Vec::with_capacity(pointer.len());
        for w in pointer.windows(2) {
            let (dt, dx, dy) = (w[1][0] - w[0][0], w[1][1] - w[0][1], w[1][2] - w[0][2]);
            let dist = dx.hypot(dy);
            intervals.push(dt);
            if dt > 0.0 {
                speeds.push(dist / dt);
            }
            if dist > 0.0 {
                segments.push((dx, dy, dist));
            }
        }
        // Constant intervals (or none: all at one time), or every sample on one line: a
        // script's trace, whatever else it varies. It earns nothing but its volume.
        let constant = spread(&intervals) <= RESOLUTION + CONSTANT;
        if !constant && !on_one_line(&pointer) {
            timing_cv = timing_cv
                .max(coefficient_of_variation(&intervals))
                .max(coefficient_of_variation(&speeds));

            let path: f64 = segments.iter().map(|s| s.2).sum();
            if path > 0.0 {
                let (first, last) = (pointer[0], pointer[pointer.len() - 1]);
                let chord = (last[1] - first[1]).hypot(last[2] - first[2]);
                geometry += scaled(1.0 - chord / path, 0.1, 20.0);
            }
            let turns: Vec<f64> = segments
                .windows(2)
                .map(|w| {
                    let (a, b) = (w[0], w[1]);
                    let cross = a.0 * b.1 - a.1 * b.0;
                    let dot = a.0 * b.0 + a.1 * b.1;
                    cross.atan2(dot)
                })
                .collect();
            geometry += scaled(std_dev(&turns), 0.2, 20.0);
        }
    }
    if keys_ok {
        let intervals: Vec<f64> = keys.windows(2).map(|w| w[1] - w[0]).collect();
        timing_cv = timing_cv.max(coefficient_of_variation(&intervals));
    }
    let timing = scaled(timing_cv, 0.3, 40.0);

    (volume + timing + geometry).round().clamp(0.0, 100.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [0, 1).
    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    fn human_trace() -> Entropy {
        let mut seed = 7;
        let mut t = 0.0;
        let pointer = (0..120)
            .map(|i| {
                t += 8.0 + 30.0 * lcg(&mut seed);
                let a = i as f64 / 20.0;
                [
                    t,
                    200.0 + 150.0 * a.cos() + 6.0 * lcg(&mut seed),
                    300.0 + 90.0 * (1.7 * a).sin() + 6.0 * lcg(&mut seed),
                ]
            })
            .collect();
        Entropy {
            pointer,
            keys: vec![],
            elapsed_ms: Some(t),
        }
    }

    #[test]
    fn empty_scores_zero() {
        assert_eq!(score(&Entropy::default()), 0);
    }

    #[test]
    fn constant_interval_straight_line_scores_below_threshold() {
        let e = Entropy {
            pointer: (0..200)
                .map(|i| {
                    [
                        i as f64 * 16.0,
                        10.0 + i as f64 * 3.0,
                        20.0 + i as f64 * 2.0,
                    ]
                })
                .collect(),
            ..Entropy::default()
        };
        assert!(score(&e) <= 20, "{}", score(&e));
    }

    /// What `docs/protocol.md` promises: constant-interval and perfectly straight traces score
    /// below the default threshold, whatever the other part varies.
    #[test]
    fn a_script_that_varies_only_one_thing_stays_below_threshold() {
        let zigzag = |t: &dyn Fn(usize) -> f64| Entropy {
            pointer: (0..40)
                .map(|i| [t(i), 16.0 * i as f64, 10.0 * (i % 2) as f64])
                .collect(),
            ..Entropy::default()
        };
        // A zigzag at constant intervals, and one all at one time.
        for e in [zigzag(&|i| 16.0 * i as f64), zigzag(&|_| 0.0)] {
            assert!(score(&e) <= 20, "{}", score(&e));
        }
        // A straight line with varied intervals, and one going back and forth.
        let line = Entropy {
            pointer: (0..40)
                .map(|i| {
                    let t = (0..i).map(|k| if k % 2 == 0 { 10.0 } else { 30.0 }).sum();
                    [t, 3.0 * i as f64, 2.0 * i as f64]
                })
                .collect(),
            ..Entropy::default()
        };
        assert!(score(&line) <= 20, "{}", score(&line));
        let mut seed = 5;
        let mut t = 0.0;
        let back_and_forth = Entropy {
            pointer: (0..60)
                .map(|_| {
                    t += 5.0 + 40.0 * lcg(&mut seed);
                    let along = 200.0 * lcg(&mut seed);
                    [t, 10.0 + 3.0 * along, 20.0 + 2.0 * along]
                })
                .collect(),
            ..Entropy::default()
        };
        assert!(score(&back_and_forth) <= 20, "{}", score(&back_and_forth));
        // Noise finer than the client's resolution (0.1 ms, 0.1 px) is no variation: a
        // metronome jittered by a ten-thousandth of a millisecond, a line by a thousandth of a
        // pixel, a pointer that never moved but for a billionth of one.
        let mut seed = 11;
        let mut noise = |size: f64| (lcg(&mut seed) - 0.5) * 2.0 * size;
        let jittered = Entropy {
            pointer: (0..200)
                .map(|i| {
                    let a = i as f64 / 20.0;
                    [
                        16.0 * i as f64 + noise(1e-4),
                        100.0 * a.cos(),
                        80.0 * (1.7 * a).sin(),
                    ]
                })
                .collect(),
            ..Entropy::default()
        };
        assert!(score(&jittered) <= 20, "{}", score(&jittered));
        let mut t = 0.0;
        let mut gaps = [10.0, 30.0, 17.0].into_iter().cycle();
        let line = Entropy {
            pointer: (0..200)
                .map(|i| {
                    t += gaps.next().unwrap();
                    [t, 5.0 * i as f64, 100.0 + noise(1e-3)]
                })
                .collect(),
            ..Entropy::default()
        };
        assert!(score(&line) <= 20, "{}", score(&line));
        let mut t = 0.0;
        let mut timing = 13;
        let still = Entropy {
            pointer: (0..200)
                .map(|_| {
                    t += 5.0 + 40.0 * lcg(&mut timing);
                    [t, 300.0 + noise(1e-9), 200.0 + noise(1e-9)]
                })
                .collect(),
            ..Entropy::default()
        };
        assert!(score(&still) <= 20, "{}", score(&still));
    }

    proptest::proptest! {
        /// Any trace on one line, or at constant intervals, earns only its volume.
        #[test]
        fn lines_and_metronomes_earn_only_their_volume(
            points in proptest::collection::vec((0.0f64..1e4, -1e3f64..1e3, 0.0f64..1e3), 3..200),
            (ax, ay) in (-5.0f64..5.0, -5.0f64..5.0),
            step in 1.0f64..100.0,
        ) {
            let volume = (points.len() as f64 / 2.0).min(20.0).round() as u8;
            let mut t = 0.0;
            let line = Entropy {
                pointer: points
                    .iter()
                    .map(|&(dt, along, _)| {
                        t += dt;
                        [t, 100.0 + ax * along, 50.0 + ay * along]
                    })
                    .collect(),
                ..Entropy::default()
            };
            proptest::prop_assert!(score(&line) <= volume, "line: {}", score(&line));
            let metronome = Entropy {
                pointer: points
                    .iter()
                    .enumerate()
                    .map(|(i, &(_, x, y))| [step * i as f64, x, y])
                    .collect(),
                ..Entropy::default()
            };
            proptest::prop_assert!(score(&metronome) <= volume, "metronome: {}", score(&metronome));
        }
    }

    #[test]
    fn constant_speed_circle_scores_below_threshold() {
        let e = Entropy {
            pointer: (0..200)
                .map(|i| {
                    let a = i as f64 / 30.0;
                    [i as f64 * 16.0, 100.0 * a.cos(), 100.0 * a.sin()]
                })
                .collect(),
            ..Entropy::default()
        };
        let s = score(&e);
        assert!(s < 50, "{s}");
    }

    #[test]
    fn constant_interval_keys_score_below_threshold() {
        let e = Entropy {
            keys: (0..100).map(|i| i as f64 * 100.0).collect(),
            ..Entropy::default()
        };
        assert!(score(&e) <= 20, "{}", score(&e));
    }

    #[test]
    fn jittered_curved_trace_with_varied_timing_scores_above_threshold() {
        let s = score(&human_trace());
        assert!(s >= 80, "{s}");
    }

    #[test]
    fn human_typing_alone_passes() {
        let mut seed = 3;
        let mut t = 0.0;
        let keys = (0..30)
            .map(|_| {
                t += 60.0 + 250.0 * lcg(&mut seed);
                t
            })
            .collect();
        let s = score(&Entropy {
            keys,
            ..Entropy::default()
        });
        assert!(s >= 50, "{s}");
    }

    #[test]
    fn time_going_backwards_earns_nothing_but_volume() {
        let mut e = human_trace();
        e.pointer.reverse();
        assert!(score(&e) <= 20);
    }

    #[test]
    fn client_cannot_exceed_limits() {
        let e = Entropy {
            pointer: vec![[0.0, 0.0, 0.0]; MAX_SAMPLES + 1],
            ..Entropy::default()
        };
        assert!(!e.within_limits());
    }
}
