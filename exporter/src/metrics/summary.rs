//! A summary of a count and a sum, with no quantiles: what
//! prometheus_client's `Summary` exports, and so what prometheus-flask-exporter
//! exports for latencies with `default_latency_as_histogram=False`. The
//! prometheus crate has no summary; this one plugs into its `MetricVec`, so
//! its children are made, removed and gathered as a histogram's are.

use std::sync::Arc;

use prometheus::{
    core::{Atomic, AtomicF64, AtomicU64, Describer, Metric, MetricVec, MetricVecBuilder, Opts},
    proto,
};

/// One summary series.
#[derive(Clone, Debug)]
pub struct Summary(Arc<SummaryCore>);

#[derive(Debug)]
struct SummaryCore {
    label_pairs: Vec<proto::LabelPair>,
    count: AtomicU64,
    sum: AtomicF64,
}

impl Summary {
    pub fn observe(&self, value: f64) {
        self.0.count.inc_by(1);
        self.0.sum.inc_by(value);
    }

    pub fn count(&self) -> u64 {
        self.0.count.get()
    }

    pub fn sum(&self) -> f64 {
        self.0.sum.get()
    }
}

impl Metric for Summary {
    fn metric(&self) -> proto::Metric {
        let mut metric = proto::Metric::from_label(self.0.label_pairs.clone());
        let mut summary = proto::Summary::default();
        summary.set_sample_count(self.count());
        summary.set_sample_sum(self.sum());
        metric.set_summary(summary);
        metric
    }
}

/// Makes the children of a [`SummaryVec`].
#[derive(Clone, Copy, Debug)]
pub struct SummaryBuilder;

impl MetricVecBuilder for SummaryBuilder {
    type M = Summary;
    type P = Opts;

    fn build<V: AsRef<str>>(&self, opts: &Opts, values: &[V]) -> prometheus::Result<Summary> {
        let desc = opts.describe()?;
        if desc.variable_labels.len() != values.len() {
            return Err(prometheus::Error::InconsistentCardinality {
                expect: desc.variable_labels.len(),
                got: values.len(),
            });
        }
        let mut label_pairs = desc.const_label_pairs.clone();
        for (name, value) in desc.variable_labels.iter().zip(values) {
            let mut pair = proto::LabelPair::default();
            pair.set_name(name.clone());
            pair.set_value(value.as_ref().to_owned());
            label_pairs.push(pair);
        }
        label_pairs.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(Summary(Arc::new(SummaryCore {
            label_pairs,
            count: AtomicU64::new(0),
            sum: AtomicF64::new(0.0),
        })))
    }
}

/// Summaries by label values.
pub type SummaryVec = MetricVec<SummaryBuilder>;

/// A summary family with these label names.
pub fn summary_vec(opts: Opts, label_names: &[&str]) -> prometheus::Result<SummaryVec> {
    let opts = opts.variable_labels(label_names.iter().map(|&name| name.to_owned()).collect());
    MetricVec::create(proto::MetricType::SUMMARY, SummaryBuilder, opts)
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;

    fn exposition(registry: &prometheus::Registry) -> String {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .expect("encode");
        String::from_utf8(text).expect("UTF-8")
    }

    #[test]
    fn a_summary_exports_its_count_and_sum_as_prometheus_client_does() {
        let registry = prometheus::Registry::new();
        let family = summary_vec(
            Opts::new(
                "flask_http_request_duration_seconds",
                "Flask HTTP request duration in seconds",
            ),
            &["method", "status"],
        )
        .expect("summary");
        registry
            .register(Box::new(family.clone()))
            .expect("register");
        let child = family.with_label_values(&["GET", "200"]);
        child.observe(0.25);
        child.observe(0.5);
        let text = exposition(&registry);
        assert!(
            text.contains("# TYPE flask_http_request_duration_seconds summary"),
            "{text}"
        );
        assert!(text.contains(
            "flask_http_request_duration_seconds_count{method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "flask_http_request_duration_seconds_sum{method=\"GET\",status=\"200\"} 0.75"
        ));
        assert!(!text.contains("quantile"), "{text}");
        family
            .remove_label_values(&["GET", "200"])
            .expect("removed");
        assert!(!exposition(&registry).contains("_count"));
        assert!(family.get_metric_with_label_values(&["GET"]).is_err());
    }
}
