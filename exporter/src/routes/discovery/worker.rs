//! Harvests run off the pipeline's thread: reading and parsing an app's
//! source takes milliseconds to seconds, and the pipeline must keep
//! draining the ring buffer meanwhile. The worker keeps each workload's
//! last harvest: a later process of the workload that runs the same files
//! costs a stat per file, and one that runs other files is read again.

use std::{
    collections::HashMap,
    sync::mpsc::{self, Receiver, Sender},
    thread,
};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tracing::{info, warn};

use super::{Discovery, ParseBudget, discover, runs_the_same_source};
use crate::{exchange::WorkloadKey, metrics::Budgets};

/// Workloads whose last harvest is kept; past it, one is dropped (and read
/// again if it comes back).
pub const CACHED_WORKLOADS: usize = 1024;

/// What became of one process's source.
#[derive(Debug)]
pub enum Outcome {
    /// Read (the first process of its workload, or one whose files differ).
    Harvested(Box<Discovery>),
    /// The same entrypoint and files as the workload's last harvest.
    Unchanged,
}

/// What the worker counts.
#[derive(Clone, Debug)]
pub struct DiscoveryCounters {
    /// Harvests that ran out of their parse budget.
    pub budget_spent: IntCounter,
    /// Cached harvests dropped past [`CACHED_WORKLOADS`].
    pub cache_budget: IntCounter,
    pub harvested: IntCounter,
    pub unchanged: IntCounter,
}

impl DiscoveryCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        let processes = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_route_discovery_processes_total",
                "Server processes whose source was looked at: outcome=\"harvested\" read and parsed (a workload's first process, or one running other files than the last one read), outcome=\"unchanged\" the same entrypoint and file stamps as its workload's last harvest",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(processes.clone()))?;
        Ok(DiscoveryCounters {
            budget_spent: budgets.counter("route_discovery_parse"),
            cache_budget: budgets.counter("route_discovery_cache"),
            harvested: processes.with_label_values(&["harvested"]),
            unchanged: processes.with_label_values(&["unchanged"]),
        })
    }
}

/// A thread that reads apps' rules from their source, one at a time.
pub struct DiscoveryWorker {
    requests: Sender<(WorkloadKey, u32)>,
    results: Receiver<(WorkloadKey, Outcome)>,
}

impl DiscoveryWorker {
    pub fn start(budget: ParseBudget, counters: DiscoveryCounters) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<(WorkloadKey, u32)>();
        let (outgoing, results) = mpsc::channel();
        thread::Builder::new()
            .name("route-discovery".to_owned())
            .spawn(move || {
                let mut cache: HashMap<WorkloadKey, Discovery> = HashMap::new();
                for (workload, tgid) in incoming {
                    let outcome = match cache.get(&workload) {
                        Some(previous) if runs_the_same_source(tgid, previous, budget) => {
                            counters.unchanged.inc();
                            Outcome::Unchanged
                        }
                        _ => {
                            let discovery = harvest(tgid, budget, &counters);
                            if cache.len() >= CACHED_WORKLOADS
                                && !cache.contains_key(&workload)
                                && let Some(dropped) = cache.keys().next().cloned()
                            {
                                cache.remove(&dropped);
                                counters.cache_budget.inc();
                            }
                            cache.insert(workload.clone(), discovery.clone());
                            Outcome::Harvested(Box::new(discovery))
                        }
                    };
                    if outgoing.send((workload, outcome)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(DiscoveryWorker { requests, results })
    }

    /// Reads the source of the app `tgid` serves, for `workload`, unless
    /// it is the one last read for the workload.
    pub fn ask(&self, workload: WorkloadKey, tgid: u32) {
        // The thread only ends with the worker.
        let _ = self.requests.send((workload, tgid));
    }

    /// Answers since the last call, in the order asked.
    pub fn finished(&self) -> impl Iterator<Item = (WorkloadKey, Outcome)> + '_ {
        self.results.try_iter()
    }
}

fn harvest(tgid: u32, budget: ParseBudget, counters: &DiscoveryCounters) -> Discovery {
    let discovery = discover(tgid, budget);
    counters.harvested.inc();
    if discovery.budget_spent {
        counters.budget_spent.inc();
    }
    info!(
        tgid,
        entrypoint = discovery.entrypoint.as_deref().unwrap_or("none found"),
        rules = discovery.rules.len(),
        files = discovery.files.len(),
        unresolved = discovery.unresolved.len(),
        "url rules read from the app's source"
    );
    for reason in &discovery.unresolved {
        warn!(tgid, "route discovery: {reason}");
    }
    discovery
}
