//! The routes stage's counters.

use prometheus::{IntCounter, Registry};

use crate::telemetry::{Budget, Budgets, counter};

/// What the routes stage counts. It owns these counters: `/metrics` reads
/// them as they are.
#[derive(Clone, Debug)]
pub struct RouteCounters {
    pub path_overflow: IntCounter,
    pub routes_retired: IntCounter,
    /// A served path needed new learner nodes past the workload's budget.
    pub learner_budget: IntCounter,
    /// A route longer than [`MAX_PATH_LABEL_BYTES`].
    pub label_budget: IntCounter,
    /// Served requests no rule read from the app's source takes.
    pub source_misses: IntCounter,
    /// A new process not asked about past [`MAX_OUTSTANDING_ASKS`].
    pub discovery_asks_budget: IntCounter,
    /// Requests whose path `--excluded-paths` matches.
    pub excluded: IntCounter,
}

impl RouteCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        Ok(RouteCounters {
            learner_budget: budgets.counter(Budget::LearnedRouteNodes),
            discovery_asks_budget: budgets.counter(Budget::RouteDiscoveryAsks),
            label_budget: budgets.counter(Budget::PathLabelBytes),
            path_overflow: counter(
                registry,
                "flask_ebpf_exporter_path_overflow_total",
                "Requests whose path label was replaced by <other> under the per-server cap",
            )?,
            source_misses: counter(
                registry,
                "flask_ebpf_exporter_route_discovery_misses_total",
                "Requests an app served (status other than 404, 405, 308) that no rule read from its source takes: rules registered at run time, or a harvest that could not follow everything; they are labelled from learned templates",
            )?,
            excluded: counter(
                registry,
                "flask_ebpf_exporter_excluded_path_requests_total",
                "Requests not counted because --excluded-paths matches their path",
            )?,
            routes_retired: counter(
                registry,
                "flask_ebpf_exporter_routes_retired_total",
                "Path labels whose series were removed when a learned parameter replaced them",
            )?,
        })
    }
}
