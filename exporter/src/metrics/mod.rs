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
pub use self::saturation::{NetworkCounts, NoNetwork, QUEUE_PHASES, ServerLoad};

use std::{collections::HashMap, sync::Arc};

use prometheus::{IntCounter, IntGauge, Registry};

use self::{
    families::Families,
    otel::Variant,
    saturation::{ListenOverflows, histogram_quantile},
    series::{IdentitySeries, Room, with_labels},
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
            if let Some([request_size, response_size]) = &handles.sizes {
                if let Some(bytes) = exchange.request_body_bytes {
                    request_size.observe(bytes as f64);
                }
                if let Some(bytes) = exchange.response_body_bytes {
                    response_size.observe(bytes as f64);
                }
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
    /// identity; absent is none), the workers that answered it and still
    /// run (`running`), and its network namespaces' accept-queue overflows.
    pub fn set_saturation(
        &mut self,
        in_flight: &HashMap<Arc<Identity>, i64>,
        running: &dyn Fn(u32) -> bool,
        network: &dyn NetworkCounts,
    ) {
        let mut identities_per_namespace: HashMap<u64, usize> = HashMap::new();
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
            let theirs = series.network_namespaces(network);
            for (namespace, _) in &theirs {
                *identities_per_namespace.entry(*namespace).or_default() += 1;
            }
            namespaces.push(theirs);
        }
        // Accept-queue overflows are counted per network namespace: they are
        // an identity's own only in namespaces where it is alone (a pod's,
        // or each pod's of an aggregated workload), and never the node's.
        let own = network.own_namespace();
        for ((_, series), theirs) in self.series.iter_mut().zip(namespaces) {
            let counts: Vec<(u64, u64)> = theirs
                .into_iter()
                .filter(|(namespace, _)| {
                    Some(*namespace) != own && identities_per_namespace.get(namespace) == Some(&1)
                })
                .filter_map(|(namespace, worker)| {
                    Some((namespace, network.listen_overflows(worker)?))
                })
                .collect();
            if counts.is_empty() && series.overflows.is_none() {
                continue;
            }
            let overflows = series.overflows.get_or_insert_with(|| {
                ListenOverflows::new(
                    self.families
                        .overflows
                        .with_label_values(&with_labels(&[], &series.label_values)),
                )
            });
            overflows.advance(counts);
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
mod tests;
