//! Percentiles and small helpers over recorded samples.

/// Exact percentiles of a set of samples (nanoseconds, or any unit), sorted once.
#[derive(Debug, Clone, Default)]
pub struct Dist {
    sorted: Vec<i64>,
}

impl Dist {
    pub fn new(mut samples: Vec<i64>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// The `q` quantile (0..=1), nearest rank; 0 when empty.
    pub fn q(&self, q: f64) -> i64 {
        if self.sorted.is_empty() {
            return 0;
        }
        let rank = (q * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn p50_us(&self) -> f64 {
        us(self.q(0.50))
    }

    pub fn p99_us(&self) -> f64 {
        us(self.q(0.99))
    }

    pub fn max_us(&self) -> f64 {
        us(self.sorted.last().copied().unwrap_or(0))
    }
}

/// Nanoseconds to microseconds.
pub fn us(ns: i64) -> f64 {
    ns as f64 / 1_000.0
}

/// Rounds to one decimal, for JSON and tables.
pub fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Rounds to three decimals.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
