//! What only the kernel sees of a server's load: the network counts it
//! reads, requests in flight against workers, and the quantiles read from
//! the queue-time histograms.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use prometheus::{Histogram, IntCounter};

/// What the kernel counts per network namespace, read through a process
/// in it (procfs in the agent; fixed values in tests).
pub trait NetworkCounts {
    /// The network namespace of process `tgid`.
    fn namespace(&self, tgid: u32) -> Option<u64>;
    /// The agent's own network namespace (the node's).
    fn own_namespace(&self) -> Option<u64>;
    /// Accept-queue overflows in the network namespace of `tgid`.
    fn listen_overflows(&self, tgid: u32) -> Option<u64>;
}

/// Knows no network namespace, so no listen overflows are counted: for
/// what drives the metrics stage without a kernel (tests, benchmarks).
pub struct NoNetwork;

impl NetworkCounts for NoNetwork {
    fn namespace(&self, _: u32) -> Option<u64> {
        None
    }
    fn own_namespace(&self) -> Option<u64> {
        None
    }
    fn listen_overflows(&self, _: u32) -> Option<u64> {
        None
    }
}

/// `flask_http_listen_overflows_total` of one identity: the sum, over the
/// network namespaces it has to itself, of what each counted since first
/// read.
#[derive(Debug)]
pub(super) struct ListenOverflows {
    counter: IntCounter,
    /// Each namespace's count when last read.
    last: HashMap<u64, u64>,
}

impl ListenOverflows {
    pub(super) fn new(counter: IntCounter) -> Self {
        ListenOverflows {
            counter,
            last: HashMap::new(),
        }
    }

    /// Adds what each namespace counted since its last reading (a namespace
    /// read for the first time, or again after it was shared, only sets its
    /// baseline: what it counted before may be another server's).
    pub(super) fn advance(&mut self, counts: Vec<(u64, u64)>) {
        let mut read = HashMap::with_capacity(counts.len());
        for (namespace, count) in counts {
            if let Some(before) = self.last.get(&namespace) {
                self.counter.inc_by(count.saturating_sub(*before));
            }
            read.insert(namespace, count);
        }
        self.last = read;
    }
}

/// One server's load, as `/debug/pods` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ServerLoad {
    pub identity: BTreeMap<String, String>,
    /// Accept-queue wait quantiles, interpolated in the histogram's buckets
    /// as Prometheus' `histogram_quantile` does.
    pub queue_p50_seconds: Option<f64>,
    pub queue_p99_seconds: Option<f64>,
    pub in_flight: i64,
    pub workers: i64,
    pub requests_seen: u64,
    pub requests_completed: u64,
    /// completed / seen.
    pub completeness: Option<f64>,
}

/// The `q` quantile of a histogram's observations, linearly interpolated
/// inside the bucket it falls in (`histogram_quantile`'s method); the
/// highest finite bound when it falls past it.
pub(super) fn histogram_quantile(histogram: &Histogram, q: f64) -> Option<f64> {
    use prometheus::core::Metric as _;
    let metric = histogram.metric();
    let data = metric.get_histogram();
    let total = data.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for bucket in data.get_bucket() {
        let (upper, count) = (bucket.upper_bound(), bucket.cumulative_count());
        if count as f64 >= rank {
            let inside = (count - below) as f64;
            let fraction = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some(lower + (upper - lower) * fraction);
        }
        (lower, below) = (upper, count);
    }
    Some(lower)
}

/// `phase` values of `flask_http_request_queue_seconds`.
pub const QUEUE_PHASES: [&str; 2] = ["accept_queue", "first_read"];
