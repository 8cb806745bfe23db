//! Each identity's own series handles, so releasing an identity or
//! retiring one of its routes removes exactly those series, within the
//! per-workload budget of series.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};

use super::{
    families::{Families, Observed, ObservedFamily},
    options::QUEUE_BUCKETS,
    otel::{RouteHandles, Variant},
    saturation::{ListenOverflows, NetworkCounts, QUEUE_PHASES},
    status::StatusLabel,
};
use crate::exchange::{Identity, LostRequests, WorkloadKey};

/// A series' label values: its own, then its identity's.
pub(super) fn with_labels<'a>(own: &[&'a str], identity: &'a [String]) -> Vec<&'a str> {
    own.iter()
        .copied()
        .chain(identity.iter().map(String::as_str))
        .collect()
}

/// The series of one (route, method, status) of an identity: what
/// `--max-series-per-workload` counts.
#[derive(Debug, Default)]
pub(super) struct RouteSeries {
    /// `flask_http_request_duration_seconds` (prometheus-flask-exporter's
    /// names).
    pub(super) latency: Option<Observed>,
    /// OpenTelemetry's families, by what else labels them (one, mostly:
    /// the HTTP version and the listening port rarely vary, and under
    /// `--group-by endpoint` one endpoint may have several rules).
    pub(super) otel: Vec<(Variant, RouteHandles)>,
    /// Whether it counts against the workload's budget (all but a status
    /// class's, made past it).
    pub(super) counted: bool,
}

/// The handles of one identity's series.
#[derive(Debug)]
pub(super) struct IdentitySeries {
    pub(super) workload: WorkloadKey,
    /// The identity's label values, in the families' order.
    pub(super) label_values: Vec<String>,
    /// `flask_http_request_duration_seconds`, by route (the `group_by`
    /// label's value), then (method, status).
    pub(super) durations: HashMap<Arc<str>, HashMap<(&'static str, StatusLabel), RouteSeries>>,
    /// `flask_http_request_total` and, for status 500,
    /// `flask_http_request_exceptions_total`, by (method, status).
    pub(super) totals: HashMap<(&'static str, StatusLabel), (IntCounter, Option<IntCounter>)>,
    /// Series of this identity counted against its workload's budget.
    pub(super) counted: usize,
    /// `flask_http_request_queue_seconds`, by phase, once a connection's
    /// accept was seen.
    pub(super) queue: Option<[Observed; 2]>,
    /// The accept queue's time with buckets, whichever the exported
    /// family's shape, for `/debug/pods`' quantiles (never exported).
    pub(super) queue_detail: Option<Histogram>,
    /// `flask_http_request_size_bytes` and `flask_http_response_size_bytes`,
    /// by path, then method.
    pub(super) sizes: HashMap<Arc<str>, HashMap<&'static str, [Observed; 2]>>,
    /// `flask_http_requests_in_flight` and `flask_http_workers`, made at
    /// the first exchange.
    pub(super) saturation: Option<[IntGauge; 2]>,
    /// Processes seen answering, while they run (bounded by the
    /// processes of one server); the last one, to skip the set's lookup.
    pub(super) workers: HashSet<u32>,
    pub(super) last_worker: u32,
    /// `flask_http_requests_seen_total` and `flask_http_requests_lost_total`
    /// by reason, made on first use.
    pub(super) completeness: Option<(IntCounter, [IntCounter; 3])>,
    /// `flask_http_listen_overflows_total`, made once a network namespace
    /// of the identity's own was read.
    pub(super) overflows: Option<ListenOverflows>,
    /// `http_server_active_requests`, made at the first exchange.
    pub(super) active: Option<IntGauge>,
    /// Each worker's network namespace, read once while it runs.
    pub(super) namespaces: HashMap<u32, Option<u64>>,
}

impl IdentitySeries {
    pub(super) fn new(identity: &Identity) -> Self {
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
            queue_detail: None,
            sizes: HashMap::new(),
            saturation: None,
            workers: HashSet::new(),
            last_worker: 0,
            completeness: None,
            overflows: None,
            active: None,
            namespaces: HashMap::new(),
        }
    }

    /// The requests-seen and lost-by-reason series, made on first use.
    pub(super) fn completeness(&mut self, families: &Families) -> &(IntCounter, [IntCounter; 3]) {
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

    /// The network namespaces its running workers are in, each with one
    /// of those workers; read once per worker.
    pub(super) fn network_namespaces(&mut self, network: &dyn NetworkCounts) -> Vec<(u64, u32)> {
        let workers = &self.workers;
        self.namespaces.retain(|worker, _| workers.contains(worker));
        let mut found: Vec<(u64, u32)> = Vec::new();
        for &worker in workers {
            let namespace = *self
                .namespaces
                .entry(worker)
                .or_insert_with(|| network.namespace(worker));
            if let Some(namespace) = namespace
                && !found.iter().any(|(seen, _)| *seen == namespace)
            {
                found.push((namespace, worker));
            }
        }
        found
    }

    /// The in-flight and workers gauges, made on first use.
    pub(super) fn saturation(&mut self, families: &Families) -> &[IntGauge; 2] {
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
    pub(super) fn sizes(
        &mut self,
        families: &[ObservedFamily; 2],
        method: &'static str,
        path: &Arc<str>,
    ) -> &[Observed; 2] {
        let labels = &self.label_values;
        self.sizes
            .entry(path.clone())
            .or_default()
            .entry(method)
            .or_insert_with(|| {
                let values = with_labels(&[method, path], labels);
                families
                    .each_ref()
                    .map(|family| family.with_label_values(&values))
            })
    }

    /// The queue-time series, by phase, made on first use, and the accept
    /// queue's detail for the debug page.
    pub(super) fn queue(&mut self, families: &Families) -> (&[Observed; 2], &Histogram) {
        let labels = &self.label_values;
        let exported = self.queue.get_or_insert_with(|| {
            QUEUE_PHASES.map(|phase| {
                families
                    .queue
                    .with_label_values(&with_labels(&[phase], labels))
            })
        });
        let detail = self.queue_detail.get_or_insert_with(|| {
            let opts = HistogramOpts::new("accept_queue_seconds", "For /debug/pods")
                .buckets(QUEUE_BUCKETS.to_vec());
            Histogram::with_opts(opts).expect("a valid name and increasing buckets")
        });
        (exported, detail)
    }

    /// Whether the series of (method, path, status) are made.
    pub(super) fn has_route(&self, method: &'static str, path: &str, status: StatusLabel) -> bool {
        self.durations
            .get(path)
            .is_some_and(|by_key| by_key.contains_key(&(method, status)))
    }

    /// The series of (method, path, status), made on first use (the
    /// prometheus-flask-exporter duration series with them, when exported),
    /// and the identity's label values.
    pub(super) fn route(
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
    pub(super) fn totals(
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

    pub(super) fn values<'a>(&'a self, own: &[&'a str]) -> Vec<&'a str> {
        with_labels(own, &self.label_values)
    }

    /// Removes the duration series of one path; returns how many there
    /// were, and gives back the room of those that counted.
    pub(super) fn remove_path(&mut self, path: &str, families: &Families) -> usize {
        for method in self
            .sizes
            .remove(path)
            .into_iter()
            .flat_map(HashMap::into_keys)
        {
            let values = self.values(&[method, path]);
            for family in families.sizes.iter().flatten() {
                family.remove_label_values(&values);
            }
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
    pub(super) fn remove_all(mut self, families: &Families) -> usize {
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
        self.queue_detail = None;
        if self.queue.take().is_some() {
            for phase in QUEUE_PHASES {
                families.queue.remove_label_values(&self.values(&[phase]));
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
pub(super) struct Room<'a> {
    pub(super) per_workload: &'a mut HashMap<WorkloadKey, usize>,
    pub(super) max: usize,
    pub(super) refused: &'a IntCounter,
    /// Made across the node's workloads, and the node's bound.
    pub(super) node_made: &'a mut usize,
    pub(super) node_max: usize,
    pub(super) node_refused: &'a IntCounter,
}

impl Room<'_> {
    /// Takes room for one new series of `series`'s workload, within its
    /// workload's bound and the node's; a refusal is counted under the
    /// bound that refused.
    pub(super) fn take(&mut self, series: &mut IdentitySeries) -> bool {
        let made = self
            .per_workload
            .entry(series.workload.clone())
            .or_default();
        if *made >= self.max {
            self.refused.inc();
            return false;
        }
        if *self.node_made >= self.node_max {
            self.node_refused.inc();
            return false;
        }
        *made += 1;
        *self.node_made += 1;
        series.counted += 1;
        true
    }
}
