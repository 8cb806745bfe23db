//! Per-route statistics for `/debug/routes`: requests by method and
//! status, a quantile sketch of durations, first and last seen, and a few
//! sample paths.
//!
//! The sketch is finer than the exported histogram: quantiles interpolated
//! inside prometheus-flask-exporter's first bucket (0 to 5 ms) read 2.5 ms
//! for every fast route; DDSketch answers any quantile within 2 % of a
//! value actually observed.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use sketches_ddsketch::{Config, DDSketch};

use crate::{exchange::RouteSource, metrics::exported_method};

/// The sketch's relative accuracy, and its bins: 512 cover 1 µs to 20 s at
/// 2 %; past them the lowest collapse (high quantiles stay exact to 2 %).
/// At most 4 KiB a route (8 bytes a bin), within the routes' own budget.
const SKETCH_ALPHA: f64 = 0.02;
const SKETCH_BINS: u32 = 512;
const SKETCH_MIN_SECONDS: f64 = 1e-6;

/// Durations in seconds.
#[derive(Clone)]
pub struct DurationSketch(DDSketch);

impl DurationSketch {
    fn new() -> Self {
        DurationSketch(DDSketch::new(Config::new(
            SKETCH_ALPHA,
            SKETCH_BINS,
            SKETCH_MIN_SECONDS,
        )))
    }
}

impl std::fmt::Debug for DurationSketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DurationSketch({} values)", self.0.count())
    }
}

/// Sample paths kept per route, and their length.
const SAMPLES_PER_ROUTE: usize = 5;
const SAMPLE_CHARS: usize = 120;

/// Statistics of one route of one workload.
#[derive(Clone, Debug)]
pub struct RouteStats {
    pub source: RouteSource,
    /// Flask's endpoint of the rule that named the route, when a rule with
    /// one did (rules read from the app's source).
    pub endpoint: Option<Arc<str>>,
    pub requests: u64,
    pub methods: BTreeMap<&'static str, u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub durations: DurationSketch,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Request paths (no query string), at most [`SAMPLES_PER_ROUTE`].
    pub samples: Vec<String>,
}

impl RouteStats {
    pub fn new(source: RouteSource, endpoint: Option<Arc<str>>, now: SystemTime) -> Self {
        RouteStats {
            source,
            endpoint,
            requests: 0,
            methods: BTreeMap::new(),
            statuses: BTreeMap::new(),
            durations: DurationSketch::new(),
            first_seen: now,
            last_seen: now,
            samples: Vec::new(),
        }
    }

    pub fn record(&mut self, method: &str, path: &str, status: u16, seconds: f64, now: SystemTime) {
        self.requests += 1;
        // As the `method` label has it: a client cannot grow the map.
        *self.methods.entry(exported_method(method)).or_default() += 1;
        *self.statuses.entry(status).or_default() += 1;
        self.durations.0.add(seconds);
        self.last_seen = now;
        if self.samples.len() < SAMPLES_PER_ROUTE && !self.samples.iter().any(|s| s == path) {
            let mut sample: String = path.chars().take(SAMPLE_CHARS).collect();
            if path.chars().count() > SAMPLE_CHARS {
                sample.push('…');
            }
            self.samples.push(sample);
        }
    }

    /// Adds another route's statistics (a route merged into this one).
    pub fn absorb(&mut self, other: RouteStats) {
        self.requests += other.requests;
        for (method, count) in other.methods {
            *self.methods.entry(method).or_default() += count;
        }
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        // Both sketches have the same configuration, the one merge needs.
        let _ = self.durations.0.merge(&other.durations.0);
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        for sample in other.samples {
            if self.samples.len() < SAMPLES_PER_ROUTE && !self.samples.contains(&sample) {
                self.samples.push(sample);
            }
        }
    }

    /// The q-quantile of durations, within 2 % of an observed value.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.durations.0.quantile(q).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both fall in prometheus-flask-exporter's first bucket (0 to 5 ms),
    /// where interpolation reads 2.5 ms for either.
    #[test]
    fn a_1_ms_route_and_a_4_ms_route_read_differently() {
        let now = SystemTime::now();
        let quantiles = |millis: f64| {
            let mut stats = RouteStats::new(RouteSource::SourceRule, None, now);
            for n in 0..100 {
                // ±5 % around the route's time.
                let seconds = millis / 1e3 * (0.95 + f64::from(n) / 1000.0);
                stats.record("GET", "/x", 200, seconds, now);
            }
            (
                stats.quantile(0.5).expect("p50"),
                stats.quantile(0.99).expect("p99"),
            )
        };
        let (fast_p50, fast_p99) = quantiles(1.0);
        let (slow_p50, slow_p99) = quantiles(4.0);
        assert!((0.00098..=0.00102).contains(&fast_p50), "{fast_p50}");
        assert!((0.00392..=0.00408).contains(&slow_p50), "{slow_p50}");
        assert!(
            fast_p99 < 0.0011 && slow_p99 > 0.0039,
            "{fast_p99} {slow_p99}"
        );
    }
}
