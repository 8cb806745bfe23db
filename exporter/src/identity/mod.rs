//! Who served a request: the identity labels added to every `flask_*`
//! series.
//!
//! - Local mode ([`local`]): the server's process name and port.
//! - Kubernetes mode: pid → `/proc/<pid>/cgroup` ([`cgroup`]) → container
//!   ID / pod UID → this node's pods ([`pods`]), kept current by a watch on
//!   the API server ([`kubernetes`]).
//!
//! A connection is tied to its process when first seen ([`Identity::resolve`]);
//! its exchanges get labels when recorded ([`Attribution`]), because a pod
//! may become known only after its first requests.

pub mod cgroup;
pub mod kubernetes;
pub mod local;
pub mod pods;

use std::{
    collections::{HashMap, VecDeque},
    fs,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use prometheus::IntGauge;
use tracing::{info, warn};

use self::{
    cgroup::{ContainerRef, parse_proc_cgroup},
    local::{LocalIdentity, read_stat},
    pods::{Lookup, PodIndex, unknown_labels},
};
use crate::{
    debug::{PodsReport, ProcessRow, ServerRow},
    http::Exchange,
    routes::flask_rules::RuleSet,
    stream::ServedExchange,
};

/// Label values, in the order of the mode's label names.
pub type IdentityLabels = Arc<[String]>;

/// Where a connection lives: enough to find its process and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub tgid: u32,
    pub fd: u32,
    /// The listening fd it was accepted from, when the accept was seen.
    pub listen_fd: Option<u32>,
}

/// Whom a connection's exchanges belong to.
#[derive(Clone, Debug, PartialEq)]
pub enum ServedBy {
    /// Labels known at once (local mode).
    Labels(IdentityLabels),
    /// A process in a pod; the pod's labels are looked up per exchange.
    Container(Arc<ContainerRef>),
}

/// The identity stage of either mode.
#[derive(Debug)]
pub enum Identity {
    Local(LocalIdentity),
    Pods(PodIdentity),
}

impl Identity {
    /// What a new connection belongs to; `None`: not monitored (filtered
    /// out, not in a pod, or its process is already gone).
    pub fn resolve(&mut self, origin: &Origin) -> Option<ServedBy> {
        match self {
            Identity::Local(local) => local.resolve(origin).map(ServedBy::Labels),
            Identity::Pods(pods) => pods.resolve(origin.tgid).map(ServedBy::Container),
        }
    }

    /// Label names added to every `flask_*` series.
    pub fn label_names(&self) -> &'static [&'static str] {
        match self {
            Identity::Local(_) => &local::LOCAL_LABELS,
            Identity::Pods(_) => &pods::POD_LABELS,
        }
    }

    /// Names of the [`Self::workload_key`] values.
    pub fn workload_label_names(&self) -> &'static [&'static str] {
        match self {
            Identity::Local(_) => &local::LOCAL_LABELS,
            Identity::Pods(_) => &["namespace", "workload", "workload_kind"],
        }
    }

    /// What route learning and the route cap are kept per: the server in
    /// local mode, the workload (namespace, workload, kind) in Kubernetes
    /// mode.
    pub fn workload_key(&self, labels: &IdentityLabels) -> IdentityLabels {
        match self {
            Identity::Local(_) => labels.clone(),
            Identity::Pods(_) => pods::workload_labels(labels),
        }
    }

    /// Forgets processes that exited or whose pid now names another process.
    pub fn forget_exited(&mut self, alive: &dyn Fn(u32) -> bool) {
        match self {
            Identity::Local(local) => local.forget_exited(alive),
            Identity::Pods(pods) => pods.forget_exited(),
        }
    }

    /// Label sets of pods deleted more than `grace` ago: their series go.
    pub fn purge_deleted(&mut self, now: Instant, grace: Duration) -> Vec<IdentityLabels> {
        match self {
            Identity::Local(_) => Vec::new(),
            Identity::Pods(pods) => {
                let mut index = pods.index();
                let purged = index.purge_deleted(now, grace);
                pods.pods_known.set(index.len() as i64);
                purged
            }
        }
    }

    /// Who serves, for `/debug/pods`.
    pub fn report(&self) -> PodsReport {
        let named = |labels: &IdentityLabels| {
            self.label_names()
                .iter()
                .map(|name| (*name).to_owned())
                .zip(labels.iter().cloned())
                .collect()
        };
        match self {
            Identity::Local(local) => PodsReport {
                mode: "local",
                servers: local
                    .servers()
                    .into_iter()
                    .map(|(pid, listen_fd, labels)| ServerRow {
                        pid,
                        listen_fd,
                        identity: labels.as_ref().map(named),
                    })
                    .collect(),
                ..PodsReport::default()
            },
            Identity::Pods(pods) => {
                let mut processes: Vec<ProcessRow> = pods
                    .processes
                    .iter()
                    .map(|(&pid, entry)| ProcessRow {
                        pid,
                        pod_uid: entry.container.as_ref().map(|c| c.pod_uid.to_string()),
                        container_id: entry
                            .container
                            .as_ref()
                            .and_then(|c| c.container_id.clone()),
                    })
                    .collect();
                processes.sort_by_key(|row| row.pid);
                PodsReport {
                    mode: "kubernetes",
                    pods: pods.index().rows(Instant::now()),
                    processes,
                    ..PodsReport::default()
                }
            }
        }
    }
}

/// The pod index shared by the Kubernetes watch (writer) and the pipeline.
pub type SharedPodIndex = Arc<Mutex<PodIndex>>;

pub fn lock_index(index: &SharedPodIndex) -> MutexGuard<'_, PodIndex> {
    // The index stays consistent between statements, so a panic elsewhere
    // leaves nothing half-written worth refusing.
    index.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct ProcessEntry {
    start_ticks: u64,
    container: Option<Arc<ContainerRef>>,
}

/// Kubernetes mode: processes → containers, cached per process.
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

    fn index(&self) -> MutexGuard<'_, PodIndex> {
        lock_index(&self.index)
    }

    fn resolve(&mut self, tgid: u32) -> Option<Arc<ContainerRef>> {
        if let Some(entry) = self.processes.get(&tgid) {
            return entry.container.clone();
        }
        let stat = read_stat(tgid)?;
        let cgroup = fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
        let container = parse_proc_cgroup(&cgroup).map(Arc::new);
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

    fn forget_exited(&mut self) {
        self.processes.retain(|&tgid, entry| {
            read_stat(tgid).is_some_and(|stat| stat.start_ticks == entry.start_ticks)
        });
    }
}

/// Receives each attributed exchange: its identity labels, the user rules
/// its workload's pods carry (if any), and the exchange.
pub type Recorder<'a> = dyn FnMut(&IdentityLabels, Option<&RuleSet>, &Exchange) + 'a;

/// Limits on traffic held while its pod is looked up.
#[derive(Clone, Copy, Debug)]
pub struct HoldLimits {
    /// How long an exchange waits for its pod before it is exported under
    /// the unknown identity.
    pub wait: Duration,
    /// Most exchanges held at once; beyond it they are exported as unknown
    /// at once.
    pub max_held: usize,
}

/// What happened to exchanges at the identity stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttributionStats {
    /// Exported under the unknown identity.
    pub unattributed: u64,
    /// Dropped on purpose: their pod is selected out.
    pub excluded: u64,
}

/// Gives exchanges their labels, holding those whose pod is not known yet.
#[derive(Debug)]
pub struct Attribution {
    limits: HoldLimits,
    held: VecDeque<(Instant, ServedExchange)>,
    /// Index generation the held exchanges were last tried against.
    tried_generation: u64,
    unknown: IdentityLabels,
    pub stats: AttributionStats,
}

impl Attribution {
    pub fn new(limits: HoldLimits) -> Self {
        Attribution {
            limits,
            held: VecDeque::new(),
            tried_generation: 0,
            unknown: unknown_labels(),
            stats: AttributionStats::default(),
        }
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Labels `served` (and held exchanges now due or resolvable) and hands
    /// each to `record`; the rest wait.
    pub fn attribute(
        &mut self,
        identity: &Identity,
        served: &mut Vec<ServedExchange>,
        now: Instant,
        record: &mut Recorder<'_>,
    ) {
        if served.is_empty() && self.held.is_empty() {
            return;
        }
        let index = match identity {
            Identity::Pods(pods) => Some(&pods.index),
            Identity::Local(_) => None,
        };
        let mut index = index.map(lock_index);
        // Held exchanges first: they came before the new ones.
        let generation = index.as_ref().map_or(0, |index| index.generation());
        let due = self
            .held
            .front()
            .is_some_and(|(deadline, _)| *deadline <= now);
        if !self.held.is_empty() && (due || generation != self.tried_generation) {
            self.tried_generation = generation;
            for (deadline, exchange) in std::mem::take(&mut self.held) {
                self.place(index.as_deref_mut(), exchange, deadline, now, record);
            }
        }
        for exchange in served.drain(..) {
            let deadline = now + self.limits.wait;
            self.place(index.as_deref_mut(), exchange, deadline, now, record);
        }
    }

    fn place(
        &mut self,
        index: Option<&mut PodIndex>,
        served: ServedExchange,
        deadline: Instant,
        now: Instant,
        record: &mut Recorder<'_>,
    ) {
        let container = match &served.served_by {
            ServedBy::Labels(labels) => return record(labels, None, &served.exchange),
            ServedBy::Container(container) => container,
        };
        let give_up = deadline <= now || self.held.len() >= self.limits.max_held;
        let Some(index) = index else {
            self.stats.unattributed += 1;
            return record(&self.unknown, None, &served.exchange);
        };
        match index.lookup(container, give_up) {
            Lookup::Known(labels) => {
                let rules = index.workload_rules(&labels);
                record(&labels, rules.as_deref(), &served.exchange)
            }
            Lookup::Excluded => self.stats.excluded += 1,
            Lookup::Pending if give_up => {
                if self.stats.unattributed == 0 {
                    warn!(pod_uid = %container.pod_uid, container_id = ?container.container_id,
                        "traffic of a pod this node's watch does not know: exported with identity labels \"<unknown>\" (logged once; see flask_ebpf_exporter_unattributed_requests_total)");
                }
                self.stats.unattributed += 1;
                record(&self.unknown, None, &served.exchange);
            }
            Lookup::Pending => self.held.push_back((deadline, served)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        cgroup::PodUid,
        pods::{PodInfo, UNKNOWN, Workload},
        *,
    };

    const UID: &str = "11111111-2222-3333-4444-555555555555";
    const ID: &str = "abcdefabcdefabcdef";

    fn exchange(target: &str) -> Exchange {
        Exchange {
            method: "GET".to_owned(),
            target: target.to_owned(),
            status: 200,
            started_ns: 1,
            finished_ns: 2,
            request_bytes: 10,
            response_bytes: 20,
        }
    }

    fn served(target: &str) -> ServedExchange {
        ServedExchange {
            served_by: ServedBy::Container(Arc::new(ContainerRef {
                pod_uid: PodUid::parse(UID).expect("uid"),
                container_id: Some(ID.to_owned()),
            })),
            exchange: exchange(target),
        }
    }

    fn pod_info(selected: bool) -> PodInfo {
        PodInfo {
            uid: PodUid::parse(UID).expect("uid"),
            namespace: "shop".to_owned(),
            name: "web-1".to_owned(),
            workload: Workload {
                kind: "Deployment".to_owned(),
                name: "web".to_owned(),
            },
            container_ids: vec![("app".to_owned(), ID.to_owned())],
            app_containers: vec!["app".to_owned(), "proxy".to_owned()],
            selected,
            routes: Some("GET /orders/<int:id>\n/bad/<nope:x>\n".to_owned()),
        }
    }

    fn pods() -> (Identity, SharedPodIndex) {
        let index = SharedPodIndex::default();
        let gauge = IntGauge::new("pods", "pods").expect("gauge");
        (
            Identity::Pods(PodIdentity::new(index.clone(), gauge)),
            index,
        )
    }

    /// Runs one attribution pass and returns (pod label, target) recorded.
    fn pass(
        attribution: &mut Attribution,
        identity: &Identity,
        mut served: Vec<ServedExchange>,
        now: Instant,
    ) -> Vec<(String, String)> {
        let mut recorded = Vec::new();
        attribution.attribute(
            identity,
            &mut served,
            now,
            &mut |labels, rules, exchange| {
                if labels[1] == "web-1" {
                    assert!(rules.is_some_and(|rules| rules.len() == 1));
                }
                recorded.push((labels[1].clone(), exchange.target.clone()));
            },
        );
        assert!(served.is_empty());
        recorded
    }

    #[test]
    fn traffic_waits_for_its_pod_then_is_attributed_in_order() {
        let (identity, index) = pods();
        let mut attribution = Attribution::new(HoldLimits {
            wait: Duration::from_secs(5),
            max_held: 100,
        });
        let start = Instant::now();
        let early = pass(
            &mut attribution,
            &identity,
            vec![served("/1"), served("/2")],
            start,
        );
        assert!(early.is_empty());
        assert_eq!(attribution.held(), 2);
        // Nothing changed: still held, even when new traffic comes.
        let later = pass(
            &mut attribution,
            &identity,
            vec![served("/3")],
            start + Duration::from_secs(1),
        );
        assert!(later.is_empty());
        assert_eq!(
            lock_index(&index).apply(pod_info(true)),
            1,
            "one bad rule line"
        );
        // The annotation's rules reach the recorder (the bad line skipped).
        let rules = lock_index(&index).workload_rules(&[
            "shop".to_owned(),
            "web-1".to_owned(),
            "app".to_owned(),
            "web".to_owned(),
            "Deployment".to_owned(),
        ]);
        assert_eq!(rules.map(|r| r.len()), Some(1));
        let resolved = pass(
            &mut attribution,
            &identity,
            vec![served("/4")],
            start + Duration::from_secs(2),
        );
        let targets: Vec<&str> = resolved.iter().map(|(_, target)| target.as_str()).collect();
        assert_eq!(targets, ["/1", "/2", "/3", "/4"]);
        assert!(resolved.iter().all(|(pod, _)| pod == "web-1"));
        assert_eq!(attribution.held(), 0);
        assert_eq!(attribution.stats, AttributionStats::default());
    }

    #[test]
    fn unknown_after_the_wait_or_beyond_the_cap_and_nothing_lost() {
        let (identity, index) = pods();
        let mut attribution = Attribution::new(HoldLimits {
            wait: Duration::from_secs(5),
            max_held: 2,
        });
        let start = Instant::now();
        // The third exchange finds the queue full: unknown at once.
        let now = pass(
            &mut attribution,
            &identity,
            vec![served("/1"), served("/2"), served("/3")],
            start,
        );
        assert_eq!(now, [(UNKNOWN.to_owned(), "/3".to_owned())]);
        let due = pass(
            &mut attribution,
            &identity,
            Vec::new(),
            start + Duration::from_secs(5),
        );
        assert_eq!(due.len(), 2);
        assert!(due.iter().all(|(pod, _)| pod == UNKNOWN));
        assert_eq!(attribution.stats.unattributed, 3);
        // An opted-out pod's traffic is dropped on purpose, and counted.
        lock_index(&index).apply(pod_info(false));
        assert!(pass(&mut attribution, &identity, vec![served("/4")], start).is_empty());
        assert_eq!(attribution.stats.excluded, 1);
        assert_eq!(attribution.held(), 0);
    }

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
