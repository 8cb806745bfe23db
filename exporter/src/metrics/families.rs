//! The metric families registered once (prometheus-flask-exporter's and
//! the kernel-side ones), from which each identity's series are made.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::{
    options::{BodySizes, MetricNames, QUEUE_BUCKETS, SIZE_BUCKETS, SeriesOptions},
    otel::OtelFamilies,
    summary::{Summary, SummaryVec, summary_vec},
};

/// One series of observed values: a histogram's, or a summary's count and
/// sum.
#[derive(Clone, Debug)]
pub(super) enum Observed {
    Histogram(Histogram),
    Summary(Summary),
}

impl Observed {
    pub(super) fn observe(&self, value: f64) {
        match self {
            Observed::Histogram(histogram) => histogram.observe(value),
            Observed::Summary(summary) => summary.observe(value),
        }
    }
}

/// A family of observed values, with buckets (a histogram) or without (a
/// summary of a count and a sum).
#[derive(Clone, Debug)]
pub(super) enum ObservedFamily {
    Histogram(HistogramVec),
    Summary(SummaryVec),
}

impl ObservedFamily {
    /// A histogram with `buckets`, or a summary when `None`.
    fn new(opts: Opts, labels: &[&str], buckets: Option<&[f64]>) -> prometheus::Result<Self> {
        Ok(match buckets {
            Some(buckets) => ObservedFamily::Histogram(HistogramVec::new(
                HistogramOpts::from(opts).buckets(buckets.to_vec()),
                labels,
            )?),
            None => ObservedFamily::Summary(summary_vec(opts, labels)?),
        })
    }

    pub(super) fn with_label_values(&self, values: &[&str]) -> Observed {
        match self {
            ObservedFamily::Histogram(family) => {
                Observed::Histogram(family.with_label_values(values))
            }
            ObservedFamily::Summary(family) => Observed::Summary(family.with_label_values(values)),
        }
    }

    pub(super) fn remove_label_values(&self, values: &[&str]) {
        // Only an identity with the same labels could have removed it.
        let _ = match self {
            ObservedFamily::Histogram(family) => family.remove_label_values(values),
            ObservedFamily::Summary(family) => family.remove_label_values(values),
        };
    }

    pub(super) fn collector(&self) -> Box<dyn prometheus::core::Collector> {
        match self {
            ObservedFamily::Histogram(family) => Box::new(family.clone()),
            ObservedFamily::Summary(family) => Box::new(family.clone()),
        }
    }
}

/// The request families.
#[derive(Clone, Debug)]
pub(super) struct Families {
    pub(super) names: MetricNames,
    /// `http_server_*`, with OpenTelemetry's names.
    pub(super) otel: Option<OtelFamilies>,
    pub(super) duration: ObservedFamily,
    pub(super) requests: IntCounterVec,
    pub(super) exceptions: IntCounterVec,
    pub(super) queue: ObservedFamily,
    /// `flask_http_request_size_bytes` and `flask_http_response_size_bytes`,
    /// unless `--body-sizes off`.
    pub(super) sizes: Option<[ObservedFamily; 2]>,
    pub(super) in_flight: IntGaugeVec,
    pub(super) workers: IntGaugeVec,
    pub(super) seen: IntCounterVec,
    pub(super) lost: IntCounterVec,
    pub(super) overflows: IntCounterVec,
}

impl Families {
    pub(super) fn register(
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
        let duration = ObservedFamily::new(
            duration_opts,
            &duration_labels,
            options
                .latency_as_histogram
                .then_some(options.buckets.as_slice()),
        )?;

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
        let queue = ObservedFamily::new(
            Opts::new(
                "flask_http_request_queue_seconds",
                "Time a connection waited before the server had its first request: \
                 phase=\"accept_queue\" from the kernel's end of the TCP handshake to the \
                 server's accept (the listen backlog, where requests wait while every worker \
                 is busy), phase=\"first_read\" from the accept to the first byte of the \
                 request the server read. Once per connection whose accept was seen",
            ),
            &with_identity(&["phase"]),
            // Buckets only when asked: they would be most of its series.
            options.queue_buckets.then_some(&QUEUE_BUCKETS),
        )?;
        let size = |name: &str, help: &str, buckets: Option<&[f64]>| {
            ObservedFamily::new(
                Opts::new(name, help),
                &with_identity(&["method", route_label]),
                buckets,
            )
        };
        let sizes = match options.body_sizes {
            BodySizes::Off => None,
            shape => {
                let buckets = (shape == BodySizes::Histogram).then_some(SIZE_BUCKETS.as_slice());
                Some([
                    size(
                        "flask_http_request_size_bytes",
                        "Bytes of request bodies the server read: the payload, without chunked \
                         framing (requests whose head was read whole)",
                        buckets,
                    )?,
                    size(
                        "flask_http_response_size_bytes",
                        "Bytes of response bodies the server wrote: the payload, without chunked \
                         framing (responses whose head was read whole)",
                        buckets,
                    )?,
                ])
            }
        };
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
        let mut flask_named: Vec<Box<dyn prometheus::core::Collector>> = vec![
            duration.collector(),
            Box::new(requests.clone()),
            Box::new(exceptions.clone()),
            Box::new(in_flight.clone()),
        ];
        flask_named.extend(sizes.iter().flatten().map(ObservedFamily::collector));
        let kernel_only: [Box<dyn prometheus::core::Collector>; 6] = [
            queue.collector(),
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
                (options.body_sizes != BodySizes::Off).then_some(&SIZE_BUCKETS[..]),
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
            sizes,
            in_flight,
            workers,
            seen,
            lost,
            overflows,
        })
    }
}
