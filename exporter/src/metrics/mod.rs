//! The request series: prometheus-flask-exporter's families, names, label
//! keys and buckets, plus the labels of the identity that served each
//! request.
//!
//! Series belong to the identity that made them: each identity keeps the
//! handles of its series (`series.rs`), so releasing an identity or
//! retiring one of its routes removes exactly those series and nothing is
//! looked up by family name. The families are registered once
//! (`families.rs`), with prometheus-flask-exporter's options (`options.rs`);
//! `saturation.rs` holds what only the kernel sees of a server's load. The
//! stages' own health counters are not here: see `telemetry`.

mod families;
mod options;
pub mod otel;
mod saturation;
mod series;
pub mod status;
pub mod summary;

pub use self::options::{
    BodySizes, DURATION_BUCKETS, GroupBy, MetricNames, QUEUE_BUCKETS, SIZE_BUCKETS, SeriesOptions,
};
pub use self::saturation::{NetworkCounts, QUEUE_PHASES, ServerLoad};

use std::{collections::HashMap, sync::Arc};

use prometheus::{IntCounter, IntGauge, Registry};

use self::{
    families::Families,
    otel::Variant,
    saturation::histogram_quantile,
    series::{IdentitySeries, Room},
    status::StatusLabel,
};
use crate::{
    exchange::{
        AttributedExchange, Identity, LostRequests, OVERFLOW_PATH, Route, RouteSource, WorkloadKey,
    },
    telemetry::{Budget, Budgets, counter},
};

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

/// The metrics stage: observes routed exchanges into their identity's
/// series, and removes an identity's series when it is released.
#[derive(Debug)]
pub struct RequestMetrics {
    families: Families,
    series: HashMap<Arc<Identity>, IdentitySeries>,
    identities_removed: IntCounter,
    /// Duration series made per workload, against the budget.
    series_per_workload: HashMap<WorkloadKey, usize>,
    /// The same, node-wide, against the node's budget.
    node_series: usize,
    options: SeriesOptions,
    series_budget: IntCounter,
    node_series_budget: IntCounter,
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
            node_series: 0,
            options,
            series_budget: budgets.counter(Budget::Series),
            node_series_budget: budgets.counter(Budget::NodeSeries),
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
        // A new series is made within the workload's budget and the
        // node's; past either the request counts under the overflow path
        // and its status's class, series bounded by methods and classes and
        // not counted. Series already made are never taken back for room.
        let mut room = Room {
            per_workload: &mut self.series_per_workload,
            max: self.options.max_series_per_workload,
            refused: &self.series_budget,
            node_made: &mut self.node_series,
            node_max: self.options.max_series,
            node_refused: &self.node_series_budget,
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
            && let Some(size_families) = &self.families.sizes
            && (exchange.request_body_bytes.is_some() || exchange.response_body_bytes.is_some())
        {
            let [request_size, response_size] = series.sizes(size_families, method, &path);
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
            let ([accept_queue, read], detail) = series.queue(&self.families);
            accept_queue.observe(queued.accept_queue_seconds());
            detail.observe(queued.accept_queue_seconds());
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
                let queue = series.queue_detail.as_ref();
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
        self.node_series = self.node_series.saturating_sub(removed);
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
                body_sizes: BodySizes::Summary,
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
    fn the_node_bound_refuses_new_series_and_keeps_the_ones_made() {
        let registry = Registry::new();
        let mut metrics = request_metrics(
            &registry,
            SeriesOptions {
                max_series: 4,
                ..SeriesOptions::default()
            },
        );
        let (a, b) = (server("8000"), server("9000"));
        // Two workloads, a duration and a request total each: the node's 4.
        metrics.observe(&exchange(&a, "GET", 200, 0.01), &route("/a"));
        metrics.observe(&exchange(&b, "GET", 200, 0.01), &route("/a"));
        // A new route of either is refused, and counted under the overflow
        // path and its status's class; what was made keeps counting.
        metrics.observe(&exchange(&b, "GET", 200, 0.01), &route("/b"));
        metrics.observe(&exchange(&a, "GET", 200, 0.01), &route("/a"));
        let text = encode(&registry).expect("encode");
        let duration = |port: &str, path: &str, status: &str| {
            format!(
                "flask_http_request_duration_seconds_count{{method=\"GET\",path=\"{path}\",port=\"{port}\",process=\"gunicorn\",status=\"{status}\"}}"
            )
        };
        assert!(
            text.contains(&format!("{} 2", duration("8000", "/a", "200"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1", duration("9000", "/a", "200"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1", duration("9000", OVERFLOW_PATH, "2xx"))),
            "{text}"
        );
        assert!(!text.contains("path=\"/b\""), "{text}");
        assert!(
            text.contains("flask_ebpf_exporter_budget_exhausted_total{budget=\"node_series\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("flask_ebpf_exporter_budget_exhausted_total{budget=\"series\"} 0"),
            "{text}"
        );
        // A released workload gives its room back.
        metrics.release(&a);
        metrics.observe(&exchange(&b, "GET", 200, 0.01), &route("/b"));
        let text = encode(&registry).expect("encode");
        assert!(
            text.contains(&format!("{} 1", duration("9000", "/b", "200"))),
            "{text}"
        );
    }

    #[test]
    fn body_sizes_are_off_by_default_and_a_count_and_a_sum_or_buckets_when_asked() {
        let identity = server("8000");
        let mut sized = exchange(&identity, "POST", 201, 0.01);
        sized.exchange.request_body_bytes = Some(300);
        sized.exchange.response_body_bytes = Some(20);
        let size_lines = |options: SeriesOptions| {
            let registry = Registry::new();
            let mut metrics = request_metrics(&registry, options);
            metrics.observe(&sized, &route("/orders"));
            let text = encode(&registry).expect("encode");
            text.lines()
                .filter(|line| line.contains("_size_bytes") && !line.starts_with('#'))
                .map(str::to_owned)
                .collect::<Vec<String>>()
        };
        assert_eq!(size_lines(SeriesOptions::default()), Vec::<String>::new());
        let summaries = size_lines(SeriesOptions {
            body_sizes: BodySizes::Summary,
            ..SeriesOptions::default()
        });
        assert_eq!(summaries.len(), 4, "a count and a sum each: {summaries:?}");
        assert!(summaries.contains(&"flask_http_request_size_bytes_sum{method=\"POST\",path=\"/orders\",port=\"8000\",process=\"gunicorn\"} 300".to_owned()), "{summaries:?}");
        assert!(summaries.contains(&"flask_http_response_size_bytes_count{method=\"POST\",path=\"/orders\",port=\"8000\",process=\"gunicorn\"} 1".to_owned()), "{summaries:?}");
        let histograms = size_lines(SeriesOptions {
            body_sizes: BodySizes::Histogram,
            ..SeriesOptions::default()
        });
        assert_eq!(
            histograms.len(),
            2 * (SIZE_BUCKETS.len() + 3),
            "buckets, +Inf, count and sum each: {histograms:?}"
        );
        assert!(histograms.contains(&"flask_http_request_size_bytes_bucket{method=\"POST\",path=\"/orders\",port=\"8000\",process=\"gunicorn\",le=\"256\"} 0".to_owned()), "{histograms:?}");
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
