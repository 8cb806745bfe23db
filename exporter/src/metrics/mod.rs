//! The request series: prometheus-flask-exporter's families, names, label
//! keys and buckets, plus the labels of the identity that served each
//! request.
//!
//! Series belong to the identity that made them: each identity keeps the
//! handles of its series ([`IdentitySeries`]), so releasing an identity or
//! retiring one of its routes removes exactly those series and nothing is
//! looked up by family name. The stages' own health counters are registered
//! by the stages themselves, with `telemetry`'s helpers.

pub mod otel;
pub mod status;
pub mod summary;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use serde::Serialize;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use self::{
    otel::{OtelFamilies, RouteHandles, Variant},
    status::StatusLabel,
    summary::{Summary, SummaryVec, summary_vec},
};
use crate::{
    exchange::{
        AttributedExchange, Identity, LostRequests, OVERFLOW_PATH, Route, RouteSource, WorkloadKey,
    },
    telemetry::{Budget, Budgets, counter},
};

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
    fn value(self, route: &Route) -> &Arc<str> {
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
    fn flask(self) -> bool {
        self != MetricNames::Otel
    }

    pub fn otel(self) -> bool {
        self != MetricNames::Flask
    }
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
    /// Duration series per workload; further ones go under
    /// [`OVERFLOW_PATH`].
    pub max_series_per_workload: usize,
}

impl Default for SeriesOptions {
    fn default() -> Self {
        SeriesOptions {
            names: MetricNames::Flask,
            group_by: GroupBy::Path,
            buckets: DURATION_BUCKETS.to_vec(),
            latency_as_histogram: true,
            max_series_per_workload: 2000,
        }
    }
}

/// One duration series.
#[derive(Clone, Debug)]
enum Latency {
    Histogram(Histogram),
    Summary(Summary),
}

impl Latency {
    fn observe(&self, seconds: f64) {
        match self {
            Latency::Histogram(histogram) => histogram.observe(seconds),
            Latency::Summary(summary) => summary.observe(seconds),
        }
    }
}

/// The duration family, as [`SeriesOptions::latency_as_histogram`] has it.
#[derive(Clone, Debug)]
enum LatencyFamily {
    Histogram(HistogramVec),
    Summary(SummaryVec),
}

impl LatencyFamily {
    fn with_label_values(&self, values: &[&str]) -> Latency {
        match self {
            LatencyFamily::Histogram(family) => {
                Latency::Histogram(family.with_label_values(values))
            }
            LatencyFamily::Summary(family) => Latency::Summary(family.with_label_values(values)),
        }
    }

    fn remove_label_values(&self, values: &[&str]) {
        // Only an identity with the same labels could have removed it.
        let _ = match self {
            LatencyFamily::Histogram(family) => family.remove_label_values(values),
            LatencyFamily::Summary(family) => family.remove_label_values(values),
        };
    }

    fn collector(&self) -> Box<dyn prometheus::core::Collector> {
        match self {
            LatencyFamily::Histogram(family) => Box::new(family.clone()),
            LatencyFamily::Summary(family) => Box::new(family.clone()),
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
fn histogram_quantile(histogram: &Histogram, q: f64) -> Option<f64> {
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

/// Methods kept as sent; anything else is exported as `OTHER` so a client
/// cannot mint series by inventing methods.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The `method` label of a request method.
pub fn exported_method(method: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("OTHER")
}

/// A series' label values: its own, then its identity's.
fn with_labels<'a>(own: &[&'a str], identity: &'a [String]) -> Vec<&'a str> {
    own.iter()
        .copied()
        .chain(identity.iter().map(String::as_str))
        .collect()
}

/// The series of one (route, method, status) of an identity: what
/// `--max-series-per-workload` counts.
#[derive(Debug, Default)]
struct RouteSeries {
    /// `flask_http_request_duration_seconds` (prometheus-flask-exporter's
    /// names).
    latency: Option<Latency>,
    /// OpenTelemetry's families, by what else labels them (one, mostly:
    /// the HTTP version and the listening port rarely vary, and under
    /// `--group-by endpoint` one endpoint may have several rules).
    otel: Vec<(Variant, RouteHandles)>,
    /// Whether it counts against the workload's budget (all but a status
    /// class's, made past it).
    counted: bool,
}

/// The handles of one identity's series.
#[derive(Debug)]
struct IdentitySeries {
    workload: WorkloadKey,
    /// The identity's label values, in the families' order.
    label_values: Vec<String>,
    /// `flask_http_request_duration_seconds`, by route (the `group_by`
    /// label's value), then (method, status).
    durations: HashMap<Arc<str>, HashMap<(&'static str, StatusLabel), RouteSeries>>,
    /// `flask_http_request_total` and, for status 500,
    /// `flask_http_request_exceptions_total`, by (method, status).
    totals: HashMap<(&'static str, StatusLabel), (IntCounter, Option<IntCounter>)>,
    /// Series of this identity counted against its workload's budget.
    counted: usize,
    /// `flask_http_request_queue_seconds`, by phase, once a connection's
    /// accept was seen.
    queue: Option<[Histogram; 2]>,
    /// `flask_http_request_size_bytes` and `flask_http_response_size_bytes`,
    /// by path, then method.
    sizes: HashMap<Arc<str>, HashMap<&'static str, [Histogram; 2]>>,
    /// `flask_http_requests_in_flight` and `flask_http_workers`, made at
    /// the first exchange.
    saturation: Option<[IntGauge; 2]>,
    /// Processes seen answering, while they run (bounded by the
    /// processes of one server); the last one, to skip the set's lookup.
    workers: HashSet<u32>,
    last_worker: u32,
    /// `flask_http_requests_seen_total` and `flask_http_requests_lost_total`
    /// by reason, made on first use.
    completeness: Option<(IntCounter, [IntCounter; 3])>,
    /// `flask_http_listen_overflows_total` and the namespace's count when
    /// last read, while the server is alone in its network namespace.
    overflows: Option<(IntCounter, u64)>,
    /// `http_server_active_requests`, made at the first exchange.
    active: Option<IntGauge>,
    /// The network namespace of `last_worker` when last read, and that
    /// worker (read again only when the worker changes).
    namespace: Option<(u32, Option<u64>)>,
}

impl IdentitySeries {
    fn new(identity: &Identity) -> Self {
        IdentitySeries {
            workload: identity.workload.clone(),
            label_values: identity
                .labels
                .pairs()
                .into_iter()
                .map(|(_, value)| value.to_owned())
                .collect(),
            durations: HashMap::new(),
            totals: HashMap::new(),
            counted: 0,
            queue: None,
            sizes: HashMap::new(),
            saturation: None,
            workers: HashSet::new(),
            last_worker: 0,
            completeness: None,
            overflows: None,
            active: None,
            namespace: None,
        }
    }

    /// The requests-seen and lost-by-reason series, made on first use.
    fn completeness(&mut self, families: &Families) -> &(IntCounter, [IntCounter; 3]) {
        let labels = &self.label_values;
        self.completeness.get_or_insert_with(|| {
            (
                families.seen.with_label_values(&with_labels(&[], labels)),
                LostRequests::REASONS.map(|reason| {
                    families
                        .lost
                        .with_label_values(&with_labels(&[reason], labels))
                }),
            )
        })
    }

    /// The in-flight and workers gauges, made on first use.
    fn saturation(&mut self, families: &Families) -> &[IntGauge; 2] {
        let labels = &self.label_values;
        self.saturation.get_or_insert_with(|| {
            let values = with_labels(&[], labels);
            [
                families.in_flight.with_label_values(&values),
                families.workers.with_label_values(&values),
            ]
        })
    }

    /// The body-size series of (method, path), made on first use.
    fn sizes(
        &mut self,
        families: &Families,
        method: &'static str,
        path: &Arc<str>,
    ) -> &[Histogram; 2] {
        let labels = &self.label_values;
        self.sizes
            .entry(path.clone())
            .or_default()
            .entry(method)
            .or_insert_with(|| {
                let values = with_labels(&[method, path], labels);
                [
                    families.request_size.with_label_values(&values),
                    families.response_size.with_label_values(&values),
                ]
            })
    }

    /// The queue-time series, by phase, made on first use.
    fn queue(&mut self, families: &Families) -> &[Histogram; 2] {
        let labels = &self.label_values;
        self.queue.get_or_insert_with(|| {
            QUEUE_PHASES.map(|phase| {
                families
                    .queue
                    .with_label_values(&with_labels(&[phase], labels))
            })
        })
    }

    /// Whether the series of (method, path, status) are made.
    fn has_route(&self, method: &'static str, path: &str, status: StatusLabel) -> bool {
        self.durations
            .get(path)
            .is_some_and(|by_key| by_key.contains_key(&(method, status)))
    }

    /// The series of (method, path, status), made on first use (the
    /// prometheus-flask-exporter duration series with them, when exported),
    /// and the identity's label values.
    fn route(
        &mut self,
        families: &Families,
        method: &'static str,
        path: Arc<str>,
        status: StatusLabel,
        counted: bool,
    ) -> (&mut RouteSeries, &[String]) {
        let labels = &self.label_values;
        let route = self
            .durations
            .entry(path.clone())
            .or_default()
            .entry((method, status))
            .or_insert_with(|| RouteSeries {
                latency: families.names.flask().then(|| {
                    let status = status.to_string();
                    families
                        .duration
                        .with_label_values(&with_labels(&[method, &path, &status], labels))
                }),
                otel: Vec::new(),
                counted,
            });
        (route, labels)
    }

    /// The request total of (method, status), and for 500 the exceptions
    /// total, made on first use.
    fn totals(
        &mut self,
        families: &Families,
        method: &'static str,
        status: StatusLabel,
    ) -> (IntCounter, Option<IntCounter>) {
        if let Some(handles) = self.totals.get(&(method, status)) {
            return handles.clone();
        }
        let status_text = status.to_string();
        let values = self.values(&[method, &status_text]);
        let handles = (
            families.requests.with_label_values(&values),
            (status == StatusLabel::Code(500))
                .then(|| families.exceptions.with_label_values(&values)),
        );
        self.totals.insert((method, status), handles.clone());
        handles
    }

    fn values<'a>(&'a self, own: &[&'a str]) -> Vec<&'a str> {
        with_labels(own, &self.label_values)
    }

    /// Removes the duration series of one path; returns how many there
    /// were, and gives back the room of those that counted.
    fn remove_path(&mut self, path: &str, families: &Families) -> usize {
        for method in self
            .sizes
            .remove(path)
            .into_iter()
            .flat_map(HashMap::into_keys)
        {
            let values = self.values(&[method, path]);
            let _ = families.request_size.remove_label_values(&values);
            let _ = families.response_size.remove_label_values(&values);
        }
        let Some(by_method_status) = self.durations.remove(path) else {
            return 0;
        };
        let made = by_method_status.len();
        for ((method, status), route) in by_method_status {
            self.counted -= usize::from(route.counted);
            if route.latency.is_some() {
                let status = status.to_string();
                families
                    .duration
                    .remove_label_values(&self.values(&[method, path, &status]));
            }
            if let Some(otel) = &families.otel {
                for (variant, _) in &route.otel {
                    otel.remove_route(variant, method, status, &self.label_values);
                }
            }
        }
        made
    }

    /// Removes every series; returns how many went.
    fn remove_all(mut self, families: &Families) -> usize {
        let paths: Vec<Arc<str>> = self.durations.keys().cloned().collect();
        let mut removed = 0;
        for path in paths {
            removed += self.remove_path(&path, families);
        }
        for ((method, status), (_, exceptions)) in std::mem::take(&mut self.totals) {
            let status = status.to_string();
            let values = self.values(&[method, &status]);
            let _ = families.requests.remove_label_values(&values);
            removed += 1;
            if exceptions.is_some() {
                let _ = families.exceptions.remove_label_values(&values);
                removed += 1;
            }
        }
        if self.queue.take().is_some() {
            for phase in QUEUE_PHASES {
                let _ = families.queue.remove_label_values(&self.values(&[phase]));
                removed += 1;
            }
        }
        if self.overflows.take().is_some() {
            let _ = families.overflows.remove_label_values(&self.values(&[]));
            removed += 1;
        }
        if self.completeness.take().is_some() {
            let _ = families.seen.remove_label_values(&self.values(&[]));
            for reason in LostRequests::REASONS {
                let _ = families.lost.remove_label_values(&self.values(&[reason]));
            }
            removed += 1 + LostRequests::REASONS.len();
        }
        if self.active.take().is_some()
            && let Some(otel) = &families.otel
        {
            otel.remove_active(&self.label_values);
            removed += 1;
        }
        if self.saturation.take().is_some() {
            let values = self.values(&[]);
            let _ = families.in_flight.remove_label_values(&values);
            let _ = families.workers.remove_label_values(&values);
            removed += 2;
        }
        removed
    }
}

/// The room left in the workloads' series budgets.
struct Room<'a> {
    per_workload: &'a mut HashMap<WorkloadKey, usize>,
    max: usize,
    refused: &'a IntCounter,
}

impl Room<'_> {
    /// Takes room for one new series of `series`'s workload; a refusal is
    /// counted.
    fn take(&mut self, series: &mut IdentitySeries) -> bool {
        let made = self
            .per_workload
            .entry(series.workload.clone())
            .or_default();
        if *made >= self.max {
            self.refused.inc();
            return false;
        }
        *made += 1;
        series.counted += 1;
        true
    }
}

/// The request families.
#[derive(Clone, Debug)]
struct Families {
    names: MetricNames,
    /// `http_server_*`, with OpenTelemetry's names.
    otel: Option<OtelFamilies>,
    duration: LatencyFamily,
    requests: IntCounterVec,
    exceptions: IntCounterVec,
    queue: HistogramVec,
    request_size: HistogramVec,
    response_size: HistogramVec,
    in_flight: IntGaugeVec,
    workers: IntGaugeVec,
    seen: IntCounterVec,
    lost: IntCounterVec,
    overflows: IntCounterVec,
}

impl Families {
    fn register(
        registry: &Registry,
        identity_labels: &[&str],
        options: &SeriesOptions,
    ) -> Result<Self, prometheus::Error> {
        let with_identity = |own: &[&'static str]| -> Vec<&str> {
            own.iter().chain(identity_labels).copied().collect()
        };
        let route_label = options.group_by.label_name();
        let duration_opts = Opts::new(
            "flask_http_request_duration_seconds",
            "Flask HTTP request duration in seconds",
        );
        let duration_labels = with_identity(&["method", route_label, "status"]);
        let duration = if options.latency_as_histogram {
            LatencyFamily::Histogram(HistogramVec::new(
                HistogramOpts::from(duration_opts).buckets(options.buckets.clone()),
                &duration_labels,
            )?)
        } else {
            LatencyFamily::Summary(summary_vec(duration_opts, &duration_labels)?)
        };
        let requests = IntCounterVec::new(
            Opts::new("flask_http_request_total", "Total number of HTTP requests"),
            &with_identity(&["method", "status"]),
        )?;
        let exceptions = IntCounterVec::new(
            Opts::new(
                "flask_http_request_exceptions_total",
                "Total number of HTTP requests which resulted in an exception \
                 (counted here as responses with status 500)",
            ),
            &with_identity(&["method", "status"]),
        )?;
        let queue = HistogramVec::new(
            HistogramOpts::new(
                "flask_http_request_queue_seconds",
                "Time a connection waited before the server had its first request: \
                 phase=\"accept_queue\" from the kernel's end of the TCP handshake to the \
                 server's accept (the listen backlog, where requests wait while every worker \
                 is busy), phase=\"first_read\" from the accept to the first byte of the \
                 request the server read. Once per connection whose accept was seen",
            )
            .buckets(QUEUE_BUCKETS.to_vec()),
            &with_identity(&["phase"]),
        )?;
        let size = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(SIZE_BUCKETS.to_vec()),
                &with_identity(&["method", route_label]),
            )
        };
        let request_size = size(
            "flask_http_request_size_bytes",
            "Bytes of request bodies the server read: the payload, without chunked \
             framing (requests whose head was read whole)",
        )?;
        let response_size = size(
            "flask_http_response_size_bytes",
            "Bytes of response bodies the server wrote: the payload, without chunked \
             framing (responses whose head was read whole)",
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "flask_http_requests_in_flight",
                "Requests the server has read and not yet answered (sampled once a second)",
            ),
            identity_labels,
        )?;
        let workers = IntGaugeVec::new(
            Opts::new(
                "flask_http_workers",
                "Processes seen answering the server's requests that still run (a gunicorn \
                 master's workers; the master itself answers none)",
            ),
            identity_labels,
        )?;
        let seen = IntCounterVec::new(
            Opts::new(
                "flask_http_requests_seen_total",
                "Requests the server read: those answered (flask_http_request_total) and those \
                 lost (flask_http_requests_lost_total)",
            ),
            identity_labels,
        )?;
        let lost = IntCounterVec::new(
            Opts::new(
                "flask_http_requests_lost_total",
                "Requests the server read that made no exchange, by reason: sequence_gap \
                 (pending when events went missing, mostly a full ring buffer), \
                 unpaired_response (answered, but the request was not read whole), abandoned \
                 (never answered before the connection closed)",
            ),
            &with_identity(&["reason"]),
        )?;
        let overflows = IntCounterVec::new(
            Opts::new(
                "flask_http_listen_overflows_total",
                "Connections the kernel refused because an accept queue was full, in the \
                 server's network namespace (TcpExt ListenOverflows, counted from when the agent \
                 first read it; a pod's other listeners, such as a sidecar's, count too). Only \
                 for a server in a network namespace of its own: not the agent's, and no other \
                 followed server's",
            ),
            identity_labels,
        )?;
        let info = IntGaugeVec::new(
            Opts::new(
                "flask_exporter_info",
                "Information about the Prometheus Flask exporter",
            ),
            &["version"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // The families OpenTelemetry has names for go under one name or
        // both; the others have only theirs.
        let flask_named: [Box<dyn prometheus::core::Collector>; 6] = [
            duration.collector(),
            Box::new(requests.clone()),
            Box::new(exceptions.clone()),
            Box::new(request_size.clone()),
            Box::new(response_size.clone()),
            Box::new(in_flight.clone()),
        ];
        let kernel_only: [Box<dyn prometheus::core::Collector>; 6] = [
            Box::new(queue.clone()),
            Box::new(workers.clone()),
            Box::new(seen.clone()),
            Box::new(lost.clone()),
            Box::new(overflows.clone()),
            Box::new(info),
        ];
        let flask = options.names.flask().then_some(flask_named);
        for collector in flask.into_iter().flatten().chain(kernel_only) {
            registry.register(collector)?;
        }
        let otel = match options.names.otel() {
            true => Some(OtelFamilies::register(
                registry,
                identity_labels,
                &options.buckets,
                &SIZE_BUCKETS,
            )?),
            false => None,
        };
        Ok(Families {
            names: options.names,
            otel,
            duration,
            requests,
            exceptions,
            queue,
            request_size,
            response_size,
            in_flight,
            workers,
            seen,
            lost,
            overflows,
        })
    }
}

/// The metrics stage: observes routed exchanges into their identity's
/// series, and removes an identity's series when it is released.
#[derive(Debug)]
pub struct RequestMetrics {
    families: Families,
    series: HashMap<Arc<Identity>, IdentitySeries>,
    identities_removed: IntCounter,
    /// Duration series made per workload, against the budget.
    series_per_workload: HashMap<WorkloadKey, usize>,
    options: SeriesOptions,
    series_budget: IntCounter,
}

impl RequestMetrics {
    /// `identity_labels`: the mode's label names, added to every `flask_*`
    /// family after prometheus-flask-exporter's own.
    pub fn register(
        registry: &Registry,
        identity_labels: &[&str],
        budgets: &Budgets,
        options: SeriesOptions,
    ) -> Result<Self, prometheus::Error> {
        Ok(RequestMetrics {
            families: Families::register(registry, identity_labels, &options)?,
            series: HashMap::new(),
            series_per_workload: HashMap::new(),
            options,
            series_budget: budgets.counter(Budget::Series),
            identities_removed: counter(
                registry,
                "flask_ebpf_exporter_identities_removed_total",
                "Label sets whose series were removed after their pod was deleted or relabelled",
            )?,
        })
    }

    /// Counts one exchange under its route.
    pub fn observe(&mut self, attributed: &AttributedExchange, route: &Route) {
        let identity = &attributed.identity;
        let exchange = &attributed.exchange;
        let method = exported_method(exchange.method.as_str());
        let exact = StatusLabel::of(exchange.status);
        if !self.series.contains_key(identity) {
            self.series
                .insert(identity.clone(), IdentitySeries::new(identity));
        }
        let Some(series) = self.series.get_mut(identity) else {
            return;
        };
        let grouped = self.options.group_by.value(route);
        // A new series is made within the workload's budget; past it the
        // request counts under the overflow path and its status's class,
        // series bounded by methods and classes and not counted.
        let mut room = Room {
            per_workload: &mut self.series_per_workload,
            max: self.options.max_series_per_workload,
            refused: &self.series_budget,
        };
        let (path, status, counted) =
            if series.has_route(method, grouped, exact) || room.take(series) {
                (grouped.clone(), exact, true)
            } else {
                (Arc::from(OVERFLOW_PATH), exact.class(), false)
            };
        let (route_series, label_values) =
            series.route(&self.families, method, path.clone(), status, counted);
        let seconds = exchange.duration_seconds();
        if let Some(latency) = &route_series.latency {
            latency.observe(seconds);
        }
        if let Some(otel) = &self.families.otel {
            // http_route is the rule whatever --group-by names; none for
            // what no route takes.
            let variant = Variant {
                route: match &*path {
                    OVERFLOW_PATH => path.clone(),
                    _ if route.source == RouteSource::Unmatched => Arc::from(""),
                    _ => route.path.clone(),
                },
                version: exchange.version,
                server_port: exchange.server_port,
            };
            let at = match route_series
                .otel
                .iter()
                .position(|(made, _)| *made == variant)
            {
                Some(at) => at,
                None => {
                    let handles = otel.route_handles(&variant, method, status, label_values);
                    route_series.otel.push((variant, handles));
                    route_series.otel.len() - 1
                }
            };
            let handles = &route_series.otel[at].1;
            handles.duration.observe(seconds);
            if let Some(bytes) = exchange.request_body_bytes {
                handles.request_size.observe(bytes as f64);
            }
            if let Some(bytes) = exchange.response_body_bytes {
                handles.response_size.observe(bytes as f64);
            }
        }
        // Sizes go under the path the duration went under (within the same
        // budget), when the heads were read whole.
        if self.options.names.flask()
            && (exchange.request_body_bytes.is_some() || exchange.response_body_bytes.is_some())
        {
            let [request_size, response_size] = series.sizes(&self.families, method, &path);
            if let Some(bytes) = exchange.request_body_bytes {
                request_size.observe(bytes as f64);
            }
            if let Some(bytes) = exchange.response_body_bytes {
                response_size.observe(bytes as f64);
            }
        }
        if series.last_worker != attributed.tgid {
            series.last_worker = attributed.tgid;
            series.workers.insert(attributed.tgid);
        }
        if self.options.names.flask() {
            // flask_http_request_total carries no path: past the budget, a
            // new status counts under its class.
            let status = if series.totals.contains_key(&(method, exact)) || room.take(series) {
                exact
            } else {
                exact.class()
            };
            let (requests, exceptions) = series.totals(&self.families, method, status);
            requests.inc();
            if let Some(exceptions) = exceptions {
                exceptions.inc();
            }
        }
        series.completeness(&self.families).0.inc();
        if let (Some(queued), Some(first_read)) =
            (exchange.queued, exchange.accept_to_read_seconds())
        {
            let [accept_queue, read] = series.queue(&self.families);
            accept_queue.observe(queued.accept_queue_seconds());
            read.observe(first_read);
        }
    }

    /// Each server's load and completeness, for `/debug/pods`.
    pub fn server_loads(&self) -> Vec<ServerLoad> {
        let mut loads: Vec<ServerLoad> = self
            .series
            .iter()
            .map(|(identity, series)| {
                let (seen, lost) = match &series.completeness {
                    Some((seen, lost)) => (seen.get(), lost.iter().map(IntCounter::get).sum()),
                    None => (0, 0),
                };
                let [in_flight, workers] = series
                    .saturation
                    .as_ref()
                    .map_or([0, 0], |gauges| gauges.each_ref().map(IntGauge::get));
                let queue = series.queue.as_ref().map(|[accept_queue, _]| accept_queue);
                ServerLoad {
                    identity: identity
                        .labels
                        .pairs()
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), value.to_owned()))
                        .collect(),
                    queue_p50_seconds: queue.and_then(|h| histogram_quantile(h, 0.5)),
                    queue_p99_seconds: queue.and_then(|h| histogram_quantile(h, 0.99)),
                    in_flight,
                    workers,
                    requests_seen: seen,
                    requests_completed: seen.saturating_sub(lost),
                    completeness: (seen > 0).then(|| (seen - lost) as f64 / seen as f64),
                }
            })
            .collect();
        loads.sort_by(|a, b| a.identity.cmp(&b.identity));
        loads
    }

    /// Requests `identity`'s server read that made no exchange.
    pub fn record_lost(&mut self, identity: &Arc<Identity>, lost: LostRequests) {
        let series = self
            .series
            .entry(identity.clone())
            .or_insert_with(|| IdentitySeries::new(identity));
        let (seen, by_reason) = series.completeness(&self.families);
        for (counter, count) in by_reason.iter().zip(lost.by_reason()) {
            counter.inc_by(u64::from(count));
            seen.inc_by(u64::from(count));
        }
    }

    /// Once a second: each identity's requests in flight (`in_flight`, by
    /// identity; absent is none) and the workers that answered it and still
    /// run (`running`).
    pub fn set_saturation(
        &mut self,
        in_flight: &HashMap<Arc<Identity>, i64>,
        running: &dyn Fn(u32) -> bool,
        network: &dyn NetworkCounts,
    ) {
        let mut servers_per_namespace: HashMap<u64, usize> = HashMap::new();
        let mut namespaces = Vec::with_capacity(self.series.len());
        for (identity, series) in &mut self.series {
            series.workers.retain(|&tgid| running(tgid));
            if !series.workers.contains(&series.last_worker) {
                series.last_worker = series.workers.iter().next().copied().unwrap_or(0);
            }
            let running_workers = series.workers.len() as i64;
            let requests_in_flight = in_flight.get(identity).copied().unwrap_or(0);
            let [requests, workers] = series.saturation(&self.families);
            requests.set(requests_in_flight);
            workers.set(running_workers);
            if let Some(otel) = &self.families.otel {
                let labels = &series.label_values;
                series
                    .active
                    .get_or_insert_with(|| otel.active(labels))
                    .set(requests_in_flight);
            }
            let worker = series.last_worker;
            let namespace = match series.namespace {
                Some((read_for, namespace)) if read_for == worker => namespace,
                _ => {
                    let namespace = (worker != 0).then(|| network.namespace(worker)).flatten();
                    series.namespace = Some((worker, namespace));
                    namespace
                }
            };
            if let Some(namespace) = namespace {
                *servers_per_namespace.entry(namespace).or_default() += 1;
            }
            namespaces.push(namespace);
        }
        // Accept-queue overflows are counted per network namespace: they are
        // a server's own only where it is alone, and never the node's.
        let own = network.own_namespace();
        for ((_, series), namespace) in self.series.iter_mut().zip(namespaces) {
            let Some(namespace) = namespace else {
                continue;
            };
            if Some(namespace) == own || servers_per_namespace.get(&namespace) != Some(&1) {
                continue;
            }
            let Some(count) = network.listen_overflows(series.last_worker) else {
                continue;
            };
            match &mut series.overflows {
                Some((counter, last)) => {
                    counter.inc_by(count.saturating_sub(*last));
                    *last = count;
                }
                None => {
                    let counter = self
                        .families
                        .overflows
                        .with_label_values(&series.values(&[]));
                    series.overflows = Some((counter, count));
                }
            }
        }
    }

    /// The identity is gone (its pod deleted, or relabelled, past the grace
    /// period): its series go. Returns how many.
    pub fn release(&mut self, identity: &Identity) -> usize {
        self.identities_removed.inc();
        let Some(series) = self.series.remove(identity) else {
            return 0;
        };
        self.forget_durations(&series.workload, series.counted);
        series.remove_all(&self.families)
    }

    /// A learned parameter replaced this route of the workload: its duration
    /// series go (its requests count under the template from now on; the
    /// request totals carry no path and stay). Returns how many.
    pub fn retire_route(&mut self, workload: &WorkloadKey, path: &str) -> usize {
        let (mut removed, mut freed) = (0, 0);
        for series in self
            .series
            .values_mut()
            .filter(|series| series.workload == *workload)
        {
            let counted = series.counted;
            removed += series.remove_path(path, &self.families);
            freed += counted - series.counted;
        }
        self.forget_durations(workload, freed);
        removed
    }

    fn forget_durations(&mut self, workload: &WorkloadKey, removed: usize) {
        if let Some(count) = self.series_per_workload.get_mut(workload) {
            *count = count.saturating_sub(removed);
            if *count == 0 {
                self.series_per_workload.remove(workload);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        exchange::{Exchange, IdentityLabels, RouteSource},
        telemetry::encode,
    };

    fn exchange(
        identity: &Arc<Identity>,
        method: &str,
        status: u16,
        seconds: f64,
    ) -> AttributedExchange {
        AttributedExchange {
            identity: identity.clone(),
            rules: None,
            tgid: 1,
            exchange: Exchange::sample(method, "/", status, seconds),
        }
    }

    fn budgets(registry: &Registry) -> Budgets {
        Budgets::register(registry).expect("budgets")
    }

    /// Request metrics of local mode's identity labels.
    fn request_metrics(registry: &Registry, options: SeriesOptions) -> RequestMetrics {
        RequestMetrics::register(registry, &["process", "port"], &budgets(registry), options)
            .expect("metrics")
    }

    fn options(max_series_per_workload: usize) -> SeriesOptions {
        SeriesOptions {
            max_series_per_workload,
            ..SeriesOptions::default()
        }
    }

    fn route(path: &str) -> Route {
        Route {
            path: Arc::from(path),
            endpoint: None,
            source: RouteSource::Raw,
        }
    }

    fn server(port: &str) -> Arc<Identity> {
        Arc::new(Identity::new(IdentityLabels::Server {
            process: "gunicorn".to_owned(),
            port: port.to_owned(),
        }))
    }

    #[test]
    fn exposes_pfe_names_labels_and_buckets() {
        let registry = Registry::new();
        let mut metrics = request_metrics(&registry, options(100));
        let identity = server("8000");
        metrics.observe(&exchange(&identity, "GET", 200, 0.3), &route("/a"));
        metrics.observe(&exchange(&identity, "GET", 500, 0.001), &route("/a"));
        metrics.observe(&exchange(&identity, "BREW", 418, 0.001), &route("/pot"));
        let text = encode(&registry).expect("encode");
        assert!(text.contains(
            "flask_http_request_duration_seconds_bucket{method=\"GET\",path=\"/a\",port=\"8000\",process=\"gunicorn\",status=\"200\",le=\"0.5\"} 1"
        ), "{text}");
        assert!(text.contains(
            "flask_http_request_duration_seconds_bucket{method=\"GET\",path=\"/a\",port=\"8000\",process=\"gunicorn\",status=\"200\",le=\"0.25\"} 0"
        ));
        assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"500\"} 1"));
        assert!(text.contains("flask_http_request_exceptions_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"500\"} 1"));
        assert!(!text.contains("flask_http_request_exceptions_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\""));
        assert!(text.contains("flask_http_request_total{method=\"OTHER\",port=\"8000\",process=\"gunicorn\",status=\"418\"} 1"));
        assert!(text.contains("flask_exporter_info{version="));

        let other = server("9000");
        metrics.observe(&exchange(&other, "GET", 200, 0.3), &route("/a"));
        // Histogram series (3) + request totals (3) + one exception total +
        // requests seen and lost by reason (4).
        assert_eq!(metrics.release(&identity), 11);
        let text = encode(&registry).expect("encode");
        assert!(!text.contains("port=\"8000\""), "{text}");
        assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"9000\",process=\"gunicorn\",status=\"200\"} 1"));
        assert_eq!(metrics.release(&identity), 0);

        metrics.observe(&exchange(&other, "GET", 200, 0.3), &route("/b"));
        let removed = metrics.retire_route(&other.workload, "/a");
        assert_eq!(removed, 1, "the /a histogram series of port 9000 only");
        let text = encode(&registry).expect("encode");
        assert!(!text.contains("path=\"/a\""), "{text}");
        assert!(text.contains("path=\"/b\""));
        // Request totals carry no path and stay.
        assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"9000\",process=\"gunicorn\",status=\"200\"} 2"));
    }

    #[test]
    fn group_by_names_the_route_label_and_a_summary_replaces_the_histogram() {
        let registry = Registry::new();
        let mut metrics = request_metrics(
            &registry,
            SeriesOptions {
                group_by: GroupBy::Endpoint,
                latency_as_histogram: false,
                ..SeriesOptions::default()
            },
        );
        let identity = server("8000");
        let rule = |path: &str, endpoint: Option<&str>| Route {
            path: Arc::from(path),
            endpoint: endpoint.map(Arc::from),
            source: RouteSource::SourceRule,
        };
        // Two rules of one view count as its endpoint; a route with no
        // endpoint keeps its rule.
        metrics.observe(
            &exchange(&identity, "GET", 200, 0.25),
            &rule("/", Some("index")),
        );
        metrics.observe(
            &exchange(&identity, "GET", 200, 0.5),
            &rule("/index", Some("index")),
        );
        metrics.observe(
            &exchange(&identity, "GET", 200, 0.5),
            &rule("/learned/<id>", None),
        );
        metrics.observe(&exchange(&identity, "GET", 404, 0.5), &rule("None", None));
        let text = encode(&registry).expect("encode");
        assert!(
            text.contains("# TYPE flask_http_request_duration_seconds summary"),
            "{text}"
        );
        assert!(text.contains("flask_http_request_duration_seconds_count{endpoint=\"index\",method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\"} 2"), "{text}");
        assert!(text.contains("flask_http_request_duration_seconds_sum{endpoint=\"index\",method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\"} 0.75"));
        assert!(text.contains("endpoint=\"/learned/<id>\""));
        assert!(text.contains("endpoint=\"None\""));
        assert!(!text.contains("path=\""), "no path label: {text}");
        assert!(!text.contains("_bucket"), "{text}");

        let registry = Registry::new();
        let mut metrics = request_metrics(
            &registry,
            SeriesOptions {
                group_by: GroupBy::UrlRule,
                buckets: vec![0.1, 1.0],
                ..SeriesOptions::default()
            },
        );
        let mut sized = exchange(&identity, "GET", 200, 0.25);
        sized.exchange.response_body_bytes = Some(100);
        metrics.observe(&sized, &rule("/", Some("index")));
        let text = encode(&registry).expect("encode");
        let buckets: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("flask_http_request_duration_seconds_bucket"))
            .collect();
        assert_eq!(buckets.len(), 3, "0.1, 1 and +Inf: {buckets:?}");
        assert!(text.contains("flask_http_request_duration_seconds_bucket{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\",url_rule=\"/\",le=\"1\"} 1"), "{text}");
        // Our own per-route families take the same label.
        assert!(text.contains("flask_http_response_size_bytes_count{method=\"GET\",port=\"8000\",process=\"gunicorn\",url_rule=\"/\"} 1"), "{text}");
        assert!(!text.contains("path=\""), "{text}");
    }

    #[test]
    fn opentelemetry_names_label_as_the_conventions_translate() {
        let registry = Registry::new();
        let mut metrics = request_metrics(
            &registry,
            SeriesOptions {
                names: MetricNames::Otel,
                ..SeriesOptions::default()
            },
        );
        let identity = server("8000");
        let rule = |path: &str, source| Route {
            path: Arc::from(path),
            endpoint: None,
            source,
        };
        let mut served = exchange(&identity, "GET", 200, 0.25);
        served.exchange.server_port = Some(8000);
        served.exchange.response_body_bytes = Some(100);
        metrics.observe(&served, &rule("/items/<int:id>", RouteSource::SourceRule));
        let mut failed = exchange(&identity, "BREW", 500, 0.25);
        failed.exchange.version = http::Version::HTTP_10;
        metrics.observe(&failed, &rule("/items/<int:id>", RouteSource::SourceRule));
        metrics.observe(
            &exchange(&identity, "GET", 404, 0.25),
            &rule("None", RouteSource::Unmatched),
        );
        metrics.set_saturation(&HashMap::new(), &|_| true, &NoNetwork);
        let text = encode(&registry).expect("encode");
        assert!(text.contains("http_server_request_duration_seconds_count{error_type=\"\",http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/items/<int:id>\",network_protocol_version=\"1.1\",port=\"8000\",process=\"gunicorn\",server_port=\"8000\",url_scheme=\"http\"} 1"), "{text}");
        assert!(text.contains("http_server_request_duration_seconds_count{error_type=\"500\",http_request_method=\"_OTHER\",http_response_status_code=\"500\",http_route=\"/items/<int:id>\",network_protocol_version=\"1.0\",port=\"8000\",process=\"gunicorn\",server_port=\"\",url_scheme=\"http\"} 1"), "{text}");
        assert!(
            text.contains("http_route=\"\""),
            "no route for the router's 404: {text}"
        );
        assert!(text.contains("http_server_response_body_size_bytes_sum{error_type=\"\",http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/items/<int:id>\",network_protocol_version=\"1.1\",port=\"8000\",process=\"gunicorn\",server_port=\"8000\",url_scheme=\"http\"} 100"), "{text}");
        assert!(text.contains("http_server_active_requests{port=\"8000\",process=\"gunicorn\",url_scheme=\"http\"} 0"), "{text}");
        // What the conventions name goes by their names only; what they do
        // not keeps prometheus-flask-exporter's style.
        for gone in [
            "flask_http_request_duration_seconds",
            "flask_http_request_total",
            "flask_http_requests_in_flight",
            "flask_http_response_size_bytes",
        ] {
            assert!(!text.contains(&format!("# TYPE {gone} ")), "{gone}: {text}");
        }
        assert!(
            text.contains("flask_http_requests_seen_total{port=\"8000\",process=\"gunicorn\"} 3")
        );
        // Released with their identity.
        assert!(metrics.release(&identity) > 0);
        let text = encode(&registry).expect("encode");
        assert!(!text.contains("port=\"8000\""), "{text}");
    }

    /// No network namespace is known.
    struct NoNetwork;

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

    #[test]
    fn identities_with_the_same_labels_share_their_series() {
        let registry = Registry::new();
        let mut metrics = request_metrics(&registry, options(100));
        let (first, again) = (server("8000"), server("8000"));
        metrics.observe(&exchange(&first, "GET", 200, 0.01), &route("/a"));
        metrics.observe(&exchange(&again, "GET", 200, 0.01), &route("/a"));
        let text = encode(&registry).expect("encode");
        assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\"} 2"), "{text}");
        // One histogram and one total, requests seen and lost by reason.
        assert_eq!(metrics.release(&again), 6);
        assert!(
            !encode(&registry)
                .expect("encode")
                .contains("flask_http_request_total{")
        );
    }

    /// The `label` values of the lines of `family` (by prefix), sorted.
    fn label_values(registry: &Registry, family: &str, label: &str) -> Vec<String> {
        let text = encode(registry).expect("encode");
        let mut values: Vec<String> = text
            .lines()
            .filter(|line| line.starts_with(family))
            .filter_map(|line| {
                line.split(&format!("{label}=\""))
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        values.sort();
        values
    }

    #[test]
    fn a_workload_past_its_series_budget_counts_under_other() {
        let registry = Registry::new();
        let budgets = budgets(&registry);
        // Room for the request total of (GET, 200) and three durations.
        let mut metrics =
            RequestMetrics::register(&registry, &["process", "port"], &budgets, options(4))
                .expect("metrics");
        let identity = server("8000");
        for n in 0..10 {
            metrics.observe(
                &exchange(&identity, "GET", 200, 0.01),
                &route(&format!("/p{n}")),
            );
        }
        let paths = |registry: &Registry| -> Vec<String> {
            let text = encode(registry).expect("encode");
            let mut paths: Vec<String> = text
                .lines()
                .filter(|line| line.starts_with("flask_http_request_duration_seconds_count"))
                .filter_map(|line| {
                    line.split("path=\"")
                        .nth(1)?
                        .split('"')
                        .next()
                        .map(str::to_owned)
                })
                .collect();
            paths.sort();
            paths
        };
        assert_eq!(paths(&registry), ["/p0", "/p1", "/p2", OVERFLOW_PATH]);
        assert_eq!(budgets.counter(Budget::Series).get(), 7);
        assert_eq!(
            label_values(
                &registry,
                "flask_http_request_duration_seconds_count",
                "status"
            ),
            ["200", "200", "200", "2xx"]
        );
        // A retired route frees its room.
        assert_eq!(metrics.retire_route(&identity.workload, "/p0"), 1);
        metrics.observe(&exchange(&identity, "GET", 200, 0.01), &route("/p9"));
        assert_eq!(paths(&registry), ["/p1", "/p2", "/p9", OVERFLOW_PATH]);
    }

    /// Statuses are written by the app: any three digits parse. Those
    /// outside HTTP's share one value, and no family grows past the
    /// budget by statuses, the request total included.
    #[test]
    fn statuses_share_one_value_outside_http_and_stay_within_the_budget() {
        let registry = Registry::new();
        let budgets = budgets(&registry);
        let mut metrics =
            RequestMetrics::register(&registry, &["process", "port"], &budgets, options(20))
                .expect("metrics");
        let identity = server("8000");
        for status in [600, 999, 0, 700] {
            metrics.observe(&exchange(&identity, "GET", status, 0.01), &route("/"));
        }
        assert_eq!(
            label_values(&registry, "flask_http_request_total", "status"),
            ["<other>"]
        );
        for status in 100..600 {
            metrics.observe(&exchange(&identity, "GET", status, 0.01), &route("/"));
        }
        let totals = label_values(&registry, "flask_http_request_total", "status");
        let durations = label_values(
            &registry,
            "flask_http_request_duration_seconds_count",
            "status",
        );
        // 20 series of room: the <other> duration and total, then nine of
        // each; past it, the classes.
        assert_eq!(
            totals.len() + durations.len(),
            20 + 2 * 5,
            "{totals:?} {durations:?}"
        );
        for classes in [&totals, &durations] {
            for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
                assert!(
                    classes.iter().any(|value| value == class),
                    "{class} in {classes:?}"
                );
            }
        }
        assert_eq!(budgets.counter(Budget::Series).get(), 2 * (500 - 9));
    }
}
