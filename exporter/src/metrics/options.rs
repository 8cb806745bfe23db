//! The request series' options, as prometheus-flask-exporter names them
//! (`group_by`, `buckets`, `default_latency_as_histogram`...), and its
//! buckets.

use std::sync::Arc;

use crate::exchange::Route;

/// What names a request's route in the per-route series, as
/// prometheus-flask-exporter's `group_by`, whose value names the label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// `path`: the route (`--path-label route`) or the request path (`raw`).
    #[default]
    Path,
    /// `url_rule`: Flask's rule; `None` for requests no rule takes.
    #[value(name = "url_rule")]
    UrlRule,
    /// `endpoint`: the view's endpoint, from the rule read from the app's
    /// source; the route where no endpoint is known (a learned route or a
    /// user rule); `None` for requests no rule takes.
    Endpoint,
}

impl GroupBy {
    /// The label's name.
    pub fn label_name(self) -> &'static str {
        match self {
            GroupBy::Path => "path",
            GroupBy::UrlRule => "url_rule",
            GroupBy::Endpoint => "endpoint",
        }
    }

    /// The label's value for a route.
    pub(super) fn value(self, route: &Route) -> &Arc<str> {
        match (self, &route.endpoint) {
            (GroupBy::Endpoint, Some(endpoint)) => endpoint,
            _ => &route.path,
        }
    }
}

/// Which names the request series go by (`--metric-names`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricNames {
    /// prometheus-flask-exporter's (`flask_http_*`).
    #[default]
    Flask,
    /// OpenTelemetry's HTTP server conventions (`http_server_*`); what
    /// they have no name for keeps its `flask_http_*` name.
    Otel,
    Both,
}

impl MetricNames {
    pub(super) fn flask(self) -> bool {
        self != MetricNames::Otel
    }

    pub fn otel(self) -> bool {
        self != MetricNames::Flask
    }
}

/// Whether and how request and response body sizes are exported
/// (`--body-sizes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BodySizes {
    /// Not exported: prometheus-flask-exporter has no such families, and
    /// they would be the agent's largest per route.
    #[default]
    Off,
    /// A count and a sum per (method, route): mean body sizes.
    Summary,
    /// Buckets as well, for quantiles.
    Histogram,
}

/// How the request series are made: prometheus-flask-exporter's options,
/// and the bound on what one workload may make.
#[derive(Clone, Debug)]
pub struct SeriesOptions {
    pub names: MetricNames,
    pub group_by: GroupBy,
    /// Upper bounds of the duration histogram's buckets (+Inf is added).
    pub buckets: Vec<f64>,
    /// `false`: durations as a summary (a count and a sum), as
    /// `default_latency_as_histogram=False` has them.
    pub latency_as_histogram: bool,
    /// Whether and how body sizes are exported.
    pub body_sizes: BodySizes,
    /// `true`: queue time as a histogram with buckets; `false` (the
    /// default): as a summary, a count and a sum, which keeps its mean at a
    /// fraction of the series.
    pub queue_buckets: bool,
    /// Duration series per workload; further ones go under
    /// [`OVERFLOW_PATH`].
    pub max_series_per_workload: usize,
    /// The same series across the node's workloads; further ones go under
    /// [`OVERFLOW_PATH`] too.
    pub max_series: usize,
}

impl Default for SeriesOptions {
    fn default() -> Self {
        SeriesOptions {
            names: MetricNames::Flask,
            group_by: GroupBy::Path,
            buckets: DURATION_BUCKETS.to_vec(),
            latency_as_histogram: true,
            body_sizes: BodySizes::Off,
            queue_buckets: false,
            max_series_per_workload: 2000,
            max_series: 20_000,
        }
    }
}

/// prometheus-flask-exporter's default buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Buckets of `flask_http_request_queue_seconds`: from 100 µs (a server
/// with idle workers) to 10 s (one far behind).
pub const QUEUE_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets of the body-size histograms, in bytes: 64 B to 64 MiB by 4×.
pub const SIZE_BUCKETS: [f64; 11] = [
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
