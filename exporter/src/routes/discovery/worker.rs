//! Harvests run off the pipeline's thread: reading and parsing an app's
//! source takes milliseconds to seconds, and the pipeline must keep
//! draining the ring buffer meanwhile.

use std::{
    sync::mpsc::{self, Receiver, Sender},
    thread,
};

use prometheus::IntCounter;
use tracing::{info, warn};

use super::{Discovery, ParseBudget, discover};
use crate::exchange::WorkloadKey;

/// A thread that reads apps' rules from their source, one at a time.
pub struct DiscoveryWorker {
    requests: Sender<(WorkloadKey, u32)>,
    results: Receiver<(WorkloadKey, Discovery)>,
}

impl DiscoveryWorker {
    /// `spent` counts harvests that ran out of `budget`.
    pub fn start(budget: ParseBudget, spent: IntCounter) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<(WorkloadKey, u32)>();
        let (outgoing, results) = mpsc::channel();
        thread::Builder::new()
            .name("route-discovery".to_owned())
            .spawn(move || {
                for (workload, tgid) in incoming {
                    let discovery = discover(tgid, budget);
                    if discovery.budget_spent {
                        spent.inc();
                    }
                    info!(
                        tgid,
                        entrypoint = discovery.entrypoint.as_deref().unwrap_or("none found"),
                        rules = discovery.rules.len(),
                        files = discovery.files,
                        unresolved = discovery.unresolved.len(),
                        "url rules read from the app's source"
                    );
                    for reason in &discovery.unresolved {
                        warn!(tgid, "route discovery: {reason}");
                    }
                    if outgoing.send((workload, discovery)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(DiscoveryWorker { requests, results })
    }

    /// Reads the source of the app `tgid` serves, for `workload`.
    pub fn ask(&self, workload: WorkloadKey, tgid: u32) {
        // The thread only ends with the worker.
        let _ = self.requests.send((workload, tgid));
    }

    /// Harvests finished since the last call.
    pub fn finished(&self) -> impl Iterator<Item = (WorkloadKey, Discovery)> + '_ {
        self.results.try_iter()
    }
}
