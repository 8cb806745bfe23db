//! The request series: prometheus-flask-exporter's families, names, label
//! keys and buckets, plus the labels of the identity that served each
//! request.
//!
//! Series belong to the identity that made them: each identity keeps the
//! handles of its series ([`IdentitySeries`]), so releasing an identity or
//! retiring one of its routes removes exactly those series and nothing is
//! looked up by family name. The stages' own health counters are registered
//! by the stages themselves, with [`counter`] and [`gauge`].

use std::{collections::HashMap, sync::Arc};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::exchange::{AttributedExchange, Identity, Route, WorkloadKey};

/// prometheus-flask-exporter's default buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Methods kept as sent; anything else is exported as `OTHER` so a client
/// cannot mint series by inventing methods.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn exported_method(method: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("OTHER")
}

/// A counter registered in `registry`.
pub fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<IntCounter, prometheus::Error> {
    let counter = IntCounter::new(name, help)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// A gauge registered in `registry`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let gauge = IntGauge::new(name, help)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

/// The text exposition format of everything registered.
pub fn encode(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buffer = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buffer)?;
    String::from_utf8(buffer).map_err(|error| prometheus::Error::Msg(error.to_string()))
}

/// The handles of one identity's series.
#[derive(Debug)]
struct IdentitySeries {
    workload: WorkloadKey,
    /// The identity's label values, in the families' order.
    label_values: Vec<String>,
    /// `flask_http_request_duration_seconds`, by path, then (method, status).
    durations: HashMap<Arc<str>, HashMap<(&'static str, u16), Histogram>>,
    /// `flask_http_request_total` and, for status 500,
    /// `flask_http_request_exceptions_total`, by (method, status).
    totals: HashMap<(&'static str, u16), (IntCounter, Option<IntCounter>)>,
}

impl IdentitySeries {
    fn values<'a>(&'a self, own: &[&'a str]) -> Vec<&'a str> {
        own.iter()
            .copied()
            .chain(self.label_values.iter().map(String::as_str))
            .collect()
    }

    /// Removes the duration series of one path; returns how many went.
    fn remove_path(&mut self, path: &str, families: &Families) -> usize {
        let Some(by_method_status) = self.durations.remove(path) else {
            return 0;
        };
        by_method_status
            .into_keys()
            .filter(|(method, status)| {
                let status = status.to_string();
                let values = self.values(&[method, path, &status]);
                families.duration.remove_label_values(&values).is_ok()
            })
            .count()
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
            removed += usize::from(families.requests.remove_label_values(&values).is_ok());
            if exceptions.is_some() {
                removed += usize::from(families.exceptions.remove_label_values(&values).is_ok());
            }
        }
        removed
    }
}

/// The three request families.
#[derive(Clone, Debug)]
struct Families {
    duration: HistogramVec,
    requests: IntCounterVec,
    exceptions: IntCounterVec,
}

impl Families {
    fn register(registry: &Registry, identity_labels: &[&str]) -> Result<Self, prometheus::Error> {
        let with_identity = |own: &[&'static str]| -> Vec<&str> {
            own.iter().chain(identity_labels).copied().collect()
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "flask_http_request_duration_seconds",
                "Flask HTTP request duration in seconds",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &with_identity(&["method", "path", "status"]),
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
        Ok(Families {
            duration,
            requests,
            exceptions,
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
}

impl RequestMetrics {
    /// `identity_labels`: the mode's label names, added to every `flask_*`
    /// family after prometheus-flask-exporter's own.
    pub fn register(
        registry: &Registry,
        identity_labels: &[&str],
    ) -> Result<Self, prometheus::Error> {
        Ok(RequestMetrics {
            families: Families::register(registry, identity_labels)?,
            series: HashMap::new(),
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
        if !self.series.contains_key(identity) {
            let series = IdentitySeries {
                workload: identity.workload.clone(),
                label_values: identity
                    .labels
                    .pairs()
                    .into_iter()
                    .map(|(_, value)| value.to_owned())
                    .collect(),
                durations: HashMap::new(),
                totals: HashMap::new(),
            };
            self.series.insert(identity.clone(), series);
        }
        let Some(series) = self.series.get_mut(identity) else {
            return;
        };
        let exchange = &attributed.exchange;
        let method = exported_method(&exchange.method);
        let status = exchange.status;
        let families = &self.families;

        if !series.durations.contains_key(&*route.path) {
            series.durations.insert(route.path.clone(), HashMap::new());
        }
        let cached = series
            .durations
            .get(&*route.path)
            .and_then(|by_key| by_key.get(&(method, status)))
            .cloned();
        let histogram = cached.unwrap_or_else(|| {
            let status_text = status.to_string();
            let histogram = families.duration.with_label_values(&series.values(&[
                method,
                &route.path,
                &status_text,
            ]));
            if let Some(by_key) = series.durations.get_mut(&*route.path) {
                by_key.insert((method, status), histogram.clone());
            }
            histogram
        });
        histogram.observe(exchange.duration_seconds());

        let (requests, exceptions) = match series.totals.get(&(method, status)) {
            Some(handles) => handles.clone(),
            None => {
                let status_text = status.to_string();
                let values = series.values(&[method, &status_text]);
                let handles = (
                    families.requests.with_label_values(&values),
                    (status == 500).then(|| families.exceptions.with_label_values(&values)),
                );
                series.totals.insert((method, status), handles.clone());
                handles
            }
        };
        requests.inc();
        if let Some(exceptions) = exceptions {
            exceptions.inc();
        }
    }

    /// The identity is gone (its pod deleted, or relabelled, past the grace
    /// period): its series go. Returns how many.
    pub fn release(&mut self, identity: &Identity) -> usize {
        self.identities_removed.inc();
        self.series
            .remove(identity)
            .map_or(0, |series| series.remove_all(&self.families))
    }

    /// A learned parameter replaced this route of the workload: its duration
    /// series go (its requests count under the template from now on; the
    /// request totals carry no path and stay). Returns how many.
    pub fn retire_route(&mut self, workload: &WorkloadKey, path: &str) -> usize {
        self.series
            .values_mut()
            .filter(|series| series.workload == *workload)
            .map(|series| series.remove_path(path, &self.families))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::{Exchange, IdentityLabels, RouteSource};

    fn exchange(
        identity: &Arc<Identity>,
        method: &str,
        status: u16,
        seconds: f64,
    ) -> AttributedExchange {
        AttributedExchange {
            identity: identity.clone(),
            rules: None,
            exchange: Exchange {
                method: method.to_owned(),
                target: "/".to_owned(),
                status,
                started_ns: 0,
                finished_ns: (seconds * 1e9) as u64,
                request_bytes: 0,
                response_bytes: 0,
            },
        }
    }

    fn route(path: &str) -> Route {
        Route {
            path: Arc::from(path),
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
        let mut metrics =
            RequestMetrics::register(&registry, &["process", "port"]).expect("metrics");
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
        // Histogram series (3) + request totals (3) + one exception total.
        assert_eq!(metrics.release(&identity), 7);
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
    fn identities_with_the_same_labels_share_their_series() {
        let registry = Registry::new();
        let mut metrics =
            RequestMetrics::register(&registry, &["process", "port"]).expect("metrics");
        let (first, again) = (server("8000"), server("8000"));
        metrics.observe(&exchange(&first, "GET", 200, 0.01), &route("/a"));
        metrics.observe(&exchange(&again, "GET", 200, 0.01), &route("/a"));
        let text = encode(&registry).expect("encode");
        assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\"} 2"), "{text}");
        assert_eq!(metrics.release(&again), 2);
        assert!(
            !encode(&registry)
                .expect("encode")
                .contains("flask_http_request_total{")
        );
    }
}
