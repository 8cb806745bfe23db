//! Per-route statistics for `/debug/routes`: requests by method and
//! status, a duration histogram with the exported buckets (for p50/p99),
//! first and last seen, and a few sample paths.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use crate::{
    exchange::RouteSource,
    metrics::{DURATION_BUCKETS, exported_method},
};

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
    /// Counts per bucket of [`DURATION_BUCKETS`], plus one for +Inf.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
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
            buckets: [0; DURATION_BUCKETS.len() + 1],
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
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket] += 1;
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
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        for sample in other.samples {
            if self.samples.len() < SAMPLES_PER_ROUTE && !self.samples.contains(&sample) {
                self.samples.push(sample);
            }
        }
    }

    /// The q-quantile of durations, interpolated within buckets as
    /// Prometheus' `histogram_quantile` does.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let rank = q * self.requests as f64;
        let mut below = 0u64;
        for (index, count) in self.buckets.iter().enumerate() {
            if (below + count) as f64 >= rank && *count > 0 {
                let Some(&upper) = DURATION_BUCKETS.get(index) else {
                    // In +Inf: Prometheus answers the highest finite bound.
                    return DURATION_BUCKETS.last().copied();
                };
                let lower = if index == 0 {
                    0.0
                } else {
                    DURATION_BUCKETS[index - 1]
                };
                let within = (rank - below as f64) / *count as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += count;
        }
        DURATION_BUCKETS.last().copied()
    }
}
