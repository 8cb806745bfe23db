//! Who served a request: the identity labels added to every `flask_*`
//! series.
//!
//! - Local mode ([`local`]): the server's process name and port.
//! - Kubernetes mode: pid → `/proc/<pid>/cgroup` ([`cgroup`], cached per
//!   process in [`containers`]) → container ID / pod UID → this node's pods
//!   ([`pods`]), kept current by a watch on the API server ([`kubernetes`]).
//!
//! A connection is tied to its process when first seen
//! ([`IdentityStage::resolve`]); its exchanges get their identity when
//! recorded ([`attribution`]), because a pod may become known only after its
//! first requests.

pub mod attribution;
pub mod cgroup;
pub mod containers;
pub mod kubernetes;
pub mod local;
pub mod pods;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use self::{containers::PodIdentity, local::LocalIdentity, pods::SharedPodIndex};
use crate::exchange::{Identity, IdentityLabels, Origin, SERVER_LABELS, ServedBy};

/// The identity stage of either mode.
#[derive(Debug)]
pub enum IdentityStage {
    Local(LocalIdentity),
    Pods(PodIdentity),
}

impl IdentityStage {
    /// Whom a new connection is served by; `None`: not monitored (filtered
    /// out, not in a pod, or its process is already gone).
    pub fn resolve(&mut self, origin: &Origin) -> Option<ServedBy> {
        match self {
            IdentityStage::Local(local) => local.resolve(origin),
            IdentityStage::Pods(pods) => pods.resolve(origin.tgid).map(ServedBy::Container),
        }
    }

    /// Takes the answers of lookups made off the pipeline thread; whether
    /// any came (exchanges held for them may go on).
    pub fn settle(&mut self) -> bool {
        match self {
            IdentityStage::Local(local) => local.settle(),
            IdentityStage::Pods(_) => false,
        }
    }

    /// Whether every accept in the process's cgroup may be left
    /// unfollowed: its container is in a pod selected out, and the node's
    /// cgroup layout singles the container out (Kubernetes mode).
    pub fn cgroup_selected_out(&mut self, tgid: u32) -> bool {
        match self {
            IdentityStage::Local(_) => false,
            IdentityStage::Pods(pods) => pods.cgroup_selected_out(tgid),
        }
    }

    /// Grows when a pod selected out becomes selected (Kubernetes mode):
    /// what was judged not monitored must be followed again.
    pub fn selections(&self) -> u64 {
        match self {
            IdentityStage::Local(_) => 0,
            IdentityStage::Pods(pods) => pods.selections(),
        }
    }

    /// Label names added to every `flask_*` series.
    pub fn label_names(&self) -> &'static [&'static str] {
        match self {
            IdentityStage::Local(_) => &SERVER_LABELS,
            IdentityStage::Pods(pods) => pods.grain().label_names(),
        }
    }

    /// The identity of requests whose server is not known in time.
    pub fn unknown(&self) -> IdentityLabels {
        match self {
            IdentityStage::Local(_) => IdentityLabels::unknown_server(),
            IdentityStage::Pods(pods) => pods.grain().unknown(),
        }
    }

    /// The node's pods (Kubernetes mode), for attribution.
    pub fn pod_index(&self) -> Option<&SharedPodIndex> {
        match self {
            IdentityStage::Local(_) => None,
            IdentityStage::Pods(pods) => Some(pods.index()),
        }
    }

    /// Forgets processes that exited or whose pid now names another process.
    /// `runs`: whether a pid still names the process started at a time.
    pub fn forget_exited(&mut self, runs: &dyn Fn(u32, u64) -> bool) {
        match self {
            IdentityStage::Local(local) => local.forget_exited(runs),
            IdentityStage::Pods(pods) => pods.forget_exited(),
        }
    }

    /// Identities gone for longer than `grace` (deleted or relabelled
    /// pods): their series should go.
    pub fn purge(&mut self, now: Instant, grace: Duration) -> Vec<Arc<Identity>> {
        match self {
            IdentityStage::Local(_) => Vec::new(),
            IdentityStage::Pods(pods) => pods.purge(now, grace),
        }
    }
}
