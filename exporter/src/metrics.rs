//! Metric families: prometheus-flask-exporter's names, label keys and
//! buckets, plus the identity labels of the serving process or pod, plus the
//! exporter's own health counters.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// prometheus-flask-exporter's default buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Methods kept as sent; anything else is exported as `OTHER` so a client
/// cannot mint series by inventing methods.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

pub struct Metrics {
    registry: Registry,
    duration: HistogramVec,
    requests: IntCounterVec,
    exceptions: IntCounterVec,
    pub events_read: IntCounter,
    pub events_lost: IntCounter,
    pub events_malformed: IntCounter,
    pub unparsed_bytes: IntCounter,
    pub truncated_captures: IntCounter,
    pub unpaired_responses: IntCounter,
    pub abandoned_requests: IntCounter,
    pub sequence_gaps: IntCounter,
    pub connections_opened: IntCounter,
    pub connections_tracked: IntGauge,
    pub path_overflow: IntCounter,
    pub routes_retired: IntCounter,
    pub unattributed_requests: IntCounter,
    pub excluded_requests: IntCounter,
    pub requests_held: IntGauge,
    pub identities_removed: IntCounter,
    /// Identity label names, in the order `observe` receives their values.
    identity_labels: Vec<String>,
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let counter = IntCounter::new(name, help)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// The labels removal decides by.
struct SeriesLabels<'a> {
    path: Option<&'a str>,
    identity: Vec<String>,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let gauge = IntGauge::new(name, help)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

fn label_refs(labels: &[String]) -> Vec<&str> {
    labels.iter().map(String::as_str).collect()
}

/// Brings a counter up to a running total kept elsewhere.
pub fn advance_to(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

impl Metrics {
    /// `identity_labels` are added to every `flask_*` family after pfe's own.
    pub fn new(identity_labels: &[&str]) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let with_identity = |own: &[&'static str]| -> Vec<String> {
            own.iter()
                .chain(identity_labels)
                .map(|label| (*label).to_owned())
                .collect()
        };

        let duration_labels = with_identity(&["method", "path", "status"]);
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "flask_http_request_duration_seconds",
                "Flask HTTP request duration in seconds",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &label_refs(&duration_labels),
        )?;
        let status_labels = with_identity(&["method", "status"]);
        let requests = IntCounterVec::new(
            Opts::new("flask_http_request_total", "Total number of HTTP requests"),
            &label_refs(&status_labels),
        )?;
        let exceptions = IntCounterVec::new(
            Opts::new(
                "flask_http_request_exceptions_total",
                "Total number of HTTP requests which resulted in an exception \
                 (counted here as responses with status 500)",
            ),
            &label_refs(&status_labels),
        )?;
        let info = IntGaugeVec::new(
            Opts::new(
                "flask_exporter_info",
                "Information about the Prometheus Flask exporter",
            ),
            &["version"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for collector in [
            Box::new(duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests.clone()),
            Box::new(exceptions.clone()),
            Box::new(info),
        ] {
            registry.register(collector)?;
        }

        let connections_tracked = gauge(
            &registry,
            "flask_ebpf_exporter_connections_tracked",
            "Server-side connections currently followed",
        )?;
        let requests_held = gauge(
            &registry,
            "flask_ebpf_exporter_requests_held",
            "Requests waiting for their pod to become known",
        )?;

        Ok(Metrics {
            events_read: counter(
                &registry,
                "flask_ebpf_exporter_events_read_total",
                "Events read from the BPF ring buffer",
            )?,
            events_lost: counter(
                &registry,
                "flask_ebpf_exporter_events_lost_total",
                "Events the kernel dropped because the ring buffer was full",
            )?,
            events_malformed: counter(
                &registry,
                "flask_ebpf_exporter_events_malformed_total",
                "Ring buffer records that did not decode as events",
            )?,
            unparsed_bytes: counter(
                &registry,
                "flask_ebpf_exporter_unparsed_bytes_total",
                "Bytes on server connections that did not parse as HTTP/1.x",
            )?,
            truncated_captures: counter(
                &registry,
                "flask_ebpf_exporter_truncated_captures_total",
                "HTTP heads or chunk lines beyond the copied prefix of a buffer",
            )?,
            unpaired_responses: counter(
                &registry,
                "flask_ebpf_exporter_unpaired_responses_total",
                "Responses with no request waiting for them",
            )?,
            abandoned_requests: counter(
                &registry,
                "flask_ebpf_exporter_abandoned_requests_total",
                "Requests that ended without a response being seen",
            )?,
            sequence_gaps: counter(
                &registry,
                "flask_ebpf_exporter_sequence_gaps_total",
                "Connections on which events went missing",
            )?,
            connections_opened: counter(
                &registry,
                "flask_ebpf_exporter_connections_total",
                "Server-side connections followed since start",
            )?,
            path_overflow: counter(
                &registry,
                "flask_ebpf_exporter_path_overflow_total",
                "Requests whose path label was replaced by <other> under the per-server cap",
            )?,
            routes_retired: counter(
                &registry,
                "flask_ebpf_exporter_routes_retired_total",
                "Path labels whose series were removed when a learned parameter replaced them",
            )?,
            unattributed_requests: counter(
                &registry,
                "flask_ebpf_exporter_unattributed_requests_total",
                "Requests exported with identity \"<unknown>\": their pod was not known in time",
            )?,
            excluded_requests: counter(
                &registry,
                "flask_ebpf_exporter_excluded_requests_total",
                "Requests of pods selected out by annotation or namespace filter",
            )?,
            identities_removed: counter(
                &registry,
                "flask_ebpf_exporter_identities_removed_total",
                "Label sets whose series were removed after their pod was deleted",
            )?,
            connections_tracked,
            requests_held,
            identity_labels: identity_labels
                .iter()
                .map(|label| (*label).to_owned())
                .collect(),
            registry,
            duration,
            requests,
            exceptions,
        })
    }

    /// Records one exchange.
    pub fn observe(
        &self,
        method: &str,
        path: &str,
        status: u16,
        identity: &[String],
        seconds: f64,
    ) {
        let method = KNOWN_METHODS
            .iter()
            .find(|known| known.eq_ignore_ascii_case(method))
            .copied()
            .unwrap_or("OTHER");
        let status_text = status.to_string();
        let mut labels: Vec<&str> = Vec::with_capacity(3 + identity.len());
        labels.extend([method, path, status_text.as_str()]);
        labels.extend(identity.iter().map(String::as_str));
        self.duration.with_label_values(&labels).observe(seconds);
        labels.remove(1);
        self.requests.with_label_values(&labels).inc();
        if status == 500 {
            self.exceptions.with_label_values(&labels).inc();
        }
    }

    /// Where other stages register their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Removes every `flask_*` series carrying these identity label values;
    /// returns how many went.
    pub fn remove_identity(&self, identity: &[String]) -> usize {
        self.remove_where(&|series| series.identity.iter().eq(identity.iter()))
    }

    /// Removes the duration series with this `path` whose identity labels
    /// satisfy `identity_matches`; returns how many went. (Only the
    /// histogram carries `path`.)
    pub fn remove_route(&self, path: &str, identity_matches: &dyn Fn(&[String]) -> bool) -> usize {
        self.remove_where(&|series| series.path == Some(path) && identity_matches(&series.identity))
    }

    /// Removes every `flask_*` request series `doomed` picks.
    fn remove_where(&self, doomed: &dyn Fn(&SeriesLabels<'_>) -> bool) -> usize {
        let mut removed = 0;
        for family in self.registry.gather() {
            let own_labels: &[&str] = match family.name() {
                "flask_http_request_duration_seconds" => &["method", "path", "status"],
                "flask_http_request_total" | "flask_http_request_exceptions_total" => {
                    &["method", "status"]
                }
                _ => continue,
            };
            for metric in family.get_metric() {
                let value = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|pair| pair.name() == name)
                        .map_or("", |pair| pair.value())
                };
                let series = SeriesLabels {
                    path: own_labels.contains(&"path").then(|| value("path")),
                    identity: self
                        .identity_labels
                        .iter()
                        .map(|name| value(name).to_owned())
                        .collect(),
                };
                if !doomed(&series) {
                    continue;
                }
                let values: Vec<&str> = own_labels
                    .iter()
                    .copied()
                    .chain(self.identity_labels.iter().map(String::as_str))
                    .map(value)
                    .collect();
                let gone = match family.name() {
                    "flask_http_request_duration_seconds" => {
                        self.duration.remove_label_values(&values)
                    }
                    "flask_http_request_total" => self.requests.remove_label_values(&values),
                    _ => self.exceptions.remove_label_values(&values),
                };
                removed += usize::from(gone.is_ok());
            }
        }
        removed
    }

    /// The text exposition format.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|error| prometheus::Error::Msg(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_pfe_names_labels_and_buckets() {
        let metrics = Metrics::new(&["process", "port"]).expect("metrics");
        let identity = ["gunicorn".to_owned(), "8000".to_owned()];
        metrics.observe("GET", "/a", 200, &identity, 0.3);
        metrics.observe("GET", "/a", 500, &identity, 0.001);
        metrics.observe("BREW", "/pot", 418, &identity, 0.001);
        let text = metrics.encode().expect("encode");
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

        let other = ["gunicorn".to_owned(), "9000".to_owned()];
        metrics.observe("GET", "/a", 200, &other, 0.3);
        // Histogram series (3) + request totals (3) + one exception total.
        assert_eq!(metrics.remove_identity(&identity), 7);
        let text = metrics.encode().expect("encode");
        assert!(!text.contains("port=\"8000\""), "{text}");
        assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"9000\",process=\"gunicorn\",status=\"200\"} 1"));
        assert_eq!(metrics.remove_identity(&identity), 0);

        metrics.observe("GET", "/b", 200, &other, 0.3);
        let removed = metrics.remove_route("/a", &|labels| labels[1] == "9000");
        assert_eq!(removed, 1, "the /a histogram series of port 9000 only");
        let text = metrics.encode().expect("encode");
        assert!(!text.contains("path=\"/a\""), "{text}");
        assert!(text.contains("path=\"/b\""));
        // Request totals carry no path and stay.
        assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"9000\",process=\"gunicorn\",status=\"200\"} 2"));
    }
}
