//! Statistics and printing.

use std::time::Duration;

/// Durations, sorted.
pub(crate) struct Samples(pub(crate) Vec<Duration>);

impl Samples {
    pub(crate) fn new(mut times: Vec<Duration>) -> Self {
        times.sort_unstable();
        Self(times)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The nearest-rank percentile, `p` in (0, 1]. Panics if empty.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        let rank = (p * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
}

pub(crate) fn row(name: &str, value: String) {
    println!("  {name:<36}{value}");
}

pub(crate) fn millis(time: Duration) -> String {
    format!("{:.0} ms", time.as_secs_f64() * 1e3)
}

pub(crate) fn micros(time: Duration) -> String {
    format!("{:.1} us", time.as_secs_f64() * 1e6)
}
