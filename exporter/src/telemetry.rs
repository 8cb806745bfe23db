//! The agent's own telemetry, apart from the request series of `metrics/`:
//! registering counters and gauges, the budgets every stage counts its
//! bounds in, and the text encoding of the registry. Every stage may use
//! it; it uses no stage.

use prometheus::{Encoder as _, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

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

/// A bound on what captured traffic, pod specs or container files can make
/// the agent hold, counted when reached. docs/limits.md has a row for each
/// (a test holds it to this list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Budget {
    /// Series per workload whose labels captured responses set.
    Series,
    /// The same series, node-wide.
    NodeSeries,
    /// Nodes of one workload's route learner.
    LearnedRouteNodes,
    /// Bytes of one `path` label.
    PathLabelBytes,
    /// Compiled rule regexes of one workload.
    WorkloadRuleRegexBytes,
    /// Compiled rule regexes of the node.
    RuleRegexBytes,
    /// Targets of requests waiting for their responses, node-wide.
    PendingTargetBytes,
    /// Heads not complete yet, node-wide.
    PartialHeadBytes,
    /// Methods and targets of requests held for their pod or server.
    HeldRequestBytes,
    /// Reading one app's source for its rules.
    RouteDiscoveryParse,
    /// Harvests kept to compare a new process's source with.
    RouteDiscoveryCache,
    /// Processes asked about and not answered yet.
    RouteDiscoveryAsks,
    /// Exchanges waiting for their workload's rules from its source.
    SourceRulesWait,
    /// One look at a process's sockets in `/proc`.
    ProcScan,
    /// Local mode's listeners waiting to be looked up.
    LocalServerLookups,
    /// Listening sockets the agent remembers as not followed.
    IgnoredListeners,
    /// Server processes the agent remembers, to clear their kernel bits.
    ServerProcesses,
    /// Forgotten handshakes waiting for their server's lookup.
    ForgottenHandshakes,
}

impl Budget {
    pub const ALL: [Budget; 18] = [
        Budget::Series,
        Budget::NodeSeries,
        Budget::LearnedRouteNodes,
        Budget::PathLabelBytes,
        Budget::WorkloadRuleRegexBytes,
        Budget::RuleRegexBytes,
        Budget::PendingTargetBytes,
        Budget::PartialHeadBytes,
        Budget::HeldRequestBytes,
        Budget::RouteDiscoveryParse,
        Budget::RouteDiscoveryCache,
        Budget::RouteDiscoveryAsks,
        Budget::SourceRulesWait,
        Budget::ProcScan,
        Budget::LocalServerLookups,
        Budget::IgnoredListeners,
        Budget::ServerProcesses,
        Budget::ForgottenHandshakes,
    ];

    /// Its `budget` label value.
    pub fn label(self) -> &'static str {
        match self {
            Budget::Series => "series",
            Budget::NodeSeries => "node_series",
            Budget::LearnedRouteNodes => "learned_route_nodes",
            Budget::PathLabelBytes => "path_label_bytes",
            Budget::WorkloadRuleRegexBytes => "workload_rule_regex_bytes",
            Budget::RuleRegexBytes => "rule_regex_bytes",
            Budget::PendingTargetBytes => "pending_target_bytes",
            Budget::PartialHeadBytes => "partial_head_bytes",
            Budget::HeldRequestBytes => "held_request_bytes",
            Budget::RouteDiscoveryParse => "route_discovery_parse",
            Budget::RouteDiscoveryCache => "route_discovery_cache",
            Budget::RouteDiscoveryAsks => "route_discovery_asks",
            Budget::SourceRulesWait => "source_rules_wait",
            Budget::ProcScan => "proc_scan",
            Budget::LocalServerLookups => "local_server_lookups",
            Budget::IgnoredListeners => "ignored_listeners",
            Budget::ServerProcesses => "server_processes",
            Budget::ForgottenHandshakes => "forgotten_handshakes",
        }
    }

    /// The flag that sets or lifts the bound, if one does.
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Budget::Series => Some("--max-series-per-workload"),
            Budget::NodeSeries => Some("--max-series"),
            Budget::HeldRequestBytes => Some("--pod-wait"),
            Budget::RouteDiscoveryParse
            | Budget::RouteDiscoveryCache
            | Budget::RouteDiscoveryAsks
            | Budget::SourceRulesWait => Some("--route-discovery off"),
            _ => None,
        }
    }
}

/// `flask_ebpf_exporter_budget_exhausted_total{budget}`: one family for every
/// [`Budget`]; each stage takes the counters of its own.
#[derive(Clone, Debug)]
pub struct Budgets(IntCounterVec);

impl Budgets {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let family = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_budget_exhausted_total",
                "Times a bound on what captured traffic or pod specs can make the agent hold \
                 was reached, by budget (see docs/limits.md)",
            ),
            &["budget"],
        )?;
        registry.register(Box::new(family.clone()))?;
        Ok(Budgets(family))
    }

    /// The counter of one budget, exported from zero.
    pub fn counter(&self, budget: Budget) -> IntCounter {
        self.0.with_label_values(&[budget.label()])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn each_budget_has_a_label_of_its_own_exported_from_zero() {
        let labels: HashSet<&str> = Budget::ALL.iter().map(|budget| budget.label()).collect();
        assert_eq!(labels.len(), Budget::ALL.len());
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("register");
        for budget in Budget::ALL {
            budgets.counter(budget);
        }
        let text = encode(&registry).expect("encode");
        for label in labels {
            assert!(
                text.contains(&format!(
                    "flask_ebpf_exporter_budget_exhausted_total{{budget=\"{label}\"}} 0"
                )),
                "{label} missing from:\n{text}"
            );
        }
    }
}
