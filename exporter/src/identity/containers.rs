//! Kubernetes mode's side of a connection: its process's container, read
//! from `/proc/<pid>/cgroup` once per process; the container's pod is looked
//! up per exchange in the pod index (see `attribution.rs`).

use std::{collections::HashMap, sync::Arc};

use prometheus::IntGauge;
use tracing::info;

use super::{
    cgroup::{container_of, unified_cgroup_is_own},
    pods::{SharedPodIndex, lock_index},
};
use crate::{
    exchange::{ContainerRef, Identity, PodGrain},
    procfs,
};

#[derive(Debug)]
pub struct ProcessEntry {
    start_ticks: u64,
    /// `None`: the process is in no pod.
    pub container: Option<Arc<ContainerRef>>,
}

/// Processes → containers, cached per process, and the node's pod index.
#[derive(Debug)]
pub struct PodIdentity {
    index: SharedPodIndex,
    processes: HashMap<u32, ProcessEntry>,
    /// The pods gauge, kept current here as pods are purged.
    pods_known: IntGauge,
}

impl PodIdentity {
    pub fn new(index: SharedPodIndex, pods_known: IntGauge) -> Self {
        PodIdentity {
            index,
            processes: HashMap::new(),
            pods_known,
        }
    }

    /// Which labels the pods' identities keep.
    pub fn grain(&self) -> PodGrain {
        lock_index(&self.index).grain()
    }

    pub fn index(&self) -> &SharedPodIndex {
        &self.index
    }

    /// The processes seen serving, by pid.
    pub fn processes(&self) -> &HashMap<u32, ProcessEntry> {
        &self.processes
    }

    /// The container a new connection's process runs in; `None` when it is
    /// in no pod, already gone, or its pod is known to be selected out (so
    /// that the kernel stops following its listener).
    pub fn resolve(&mut self, tgid: u32) -> Option<Arc<ContainerRef>> {
        let container = self.container_of(tgid)?;
        if lock_index(&self.index).selected_out(&container) {
            return None;
        }
        Some(container)
    }

    /// Whether the process's container is in a pod selected out and its v2
    /// cgroup is the container's own: then the kernel may ignore every
    /// accept in that cgroup, whichever process makes it.
    pub fn cgroup_selected_out(&mut self, tgid: u32) -> bool {
        let Some(container) = self.container_of(tgid) else {
            return false;
        };
        if !lock_index(&self.index).selected_out(&container) {
            return false;
        }
        procfs::cgroups(tgid).is_some_and(|cgroups| unified_cgroup_is_own(&cgroups, &container))
    }

    /// Changes by which a pod selected out became selected.
    pub fn selections(&self) -> u64 {
        lock_index(&self.index).selections()
    }

    /// The container a process runs in, cached per process.
    fn container_of(&mut self, tgid: u32) -> Option<Arc<ContainerRef>> {
        if let Some(entry) = self.processes.get(&tgid) {
            return entry.container.clone();
        }
        let stat = procfs::stat(tgid)?;
        let container = container_of(&procfs::cgroups(tgid)?).map(Arc::new);
        if container.is_none() {
            info!(tgid, process = %stat.name, "HTTP server outside any pod: not monitored in Kubernetes mode");
        }
        self.processes.insert(
            tgid,
            ProcessEntry {
                start_ticks: stat.start_ticks,
                container: container.clone(),
            },
        );
        container
    }

    /// Forgets processes that exited or whose pid now names another process.
    pub fn forget_exited(&mut self) {
        self.processes.retain(|&tgid, entry| {
            procfs::stat(tgid).is_some_and(|stat| stat.start_ticks == entry.start_ticks)
        });
    }

    /// Pods deleted, or identities relabelled, more than `grace` ago leave
    /// the index; returns the identities whose series should go.
    pub fn purge(
        &mut self,
        now: std::time::Instant,
        grace: std::time::Duration,
    ) -> Vec<Arc<Identity>> {
        let mut index = lock_index(&self.index);
        let released = index.purge_deleted(now, grace);
        self.pods_known.set(index.len() as i64);
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_is_resolved_again() {
        let mut identity = PodIdentity::new(
            SharedPodIndex::default(),
            IntGauge::new("pods", "pods").expect("gauge"),
        );
        let own = std::process::id();
        assert_eq!(identity.resolve(own), None, "the test runs outside any pod");
        assert_eq!(identity.processes.len(), 1);
        identity.forget_exited();
        assert_eq!(identity.processes.len(), 1, "same process, same start time");
        // As if the pid now named a process started at another time.
        if let Some(entry) = identity.processes.get_mut(&own) {
            entry.start_ticks += 1;
        }
        identity.forget_exited();
        assert!(identity.processes.is_empty());
    }
}
