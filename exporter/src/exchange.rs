//! What the stages hand each other from HTTP pairing on, as plain data:
//!
//! ```text
//! http      → Exchange              a request and its final response
//! stream    → CapturedExchange      + whom the connection was served by (ServedBy)
//! identity  → AttributedExchange    + who served it (Identity: typed labels, workload)
//! routes    → Route                 its path label and where the label came from
//! metrics   ← (AttributedExchange, Route)
//! ```
//!
//! No stage calls back into another: each takes one of these and returns
//! the next.

use std::{
    fmt,
    hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash, Hasher},
    sync::{Arc, OnceLock},
};

use serde::Serialize;

use crate::rules::flask::RuleSet;

/// Spare request-target strings. A target is copied into one when its
/// request is read and handed back once its exchange is recorded, so the
/// steady path allocates none. One pool per thread: the pipeline is one
/// thread, and nothing else needs locking for it. Bounded in strings and in
/// the capacity each may keep, since targets come from any client.
pub mod targets {
    use std::cell::RefCell;

    const MAX_SPARE: usize = 1024;
    /// Longer strings are dropped rather than kept: at most 512 KiB spare.
    const MAX_KEPT_CAPACITY: usize = 512;

    thread_local! {
        static SPARE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// `text` in a string of the pool (a new one when none is spare).
    pub fn take(text: &str) -> String {
        let mut target = SPARE.with_borrow_mut(Vec::pop).unwrap_or_default();
        target.push_str(text);
        target
    }

    /// Keeps `target`'s buffer for a later [`take`].
    pub fn give_back(mut target: String) {
        if target.capacity() > MAX_KEPT_CAPACITY {
            return;
        }
        target.clear();
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < MAX_SPARE {
                spare.push(target);
            }
        });
    }
    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn buffers_are_reused_within_bounds() {
            let first = take("/items/1");
            let buffer = first.as_ptr();
            give_back(first);
            let second = take("/items/2");
            assert_eq!(second, "/items/2");
            assert_eq!(second.as_ptr(), buffer, "the same buffer");
            // A long target's buffer is not kept.
            give_back(take(&"x".repeat(MAX_KEPT_CAPACITY + 1)));
            assert_eq!(SPARE.with_borrow(Vec::len), 0);
            // Nor more than MAX_SPARE of them.
            for _ in 0..MAX_SPARE + 10 {
                give_back(String::with_capacity(8));
            }
            assert_eq!(SPARE.with_borrow(Vec::len), MAX_SPARE);
        }
    }
}

/// One request and the final response to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub method: http::Method,
    /// The request target as sent, query string included (the routes stage
    /// removes it).
    pub target: String,
    /// HTTP/1.0 or HTTP/1.1, as the request line has it.
    pub version: http::Version,
    /// The port the server accepted the connection on, when read (only for
    /// OpenTelemetry's names).
    pub server_port: Option<u16>,
    pub status: u16,
    /// When the server read the first byte of the request.
    pub started_ns: u64,
    /// When the server wrote the last byte of the response.
    pub finished_ns: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Body payload bytes (chunked framing not counted), when the head was
    /// read whole and the framing kept.
    pub request_body_bytes: Option<u64>,
    pub response_body_bytes: Option<u64>,
    /// On the first exchange of a connection whose accept the kernel saw,
    /// with the end of its handshake: how long it waited to be accepted.
    pub queued: Option<Queued>,
}

#[cfg(test)]
impl Exchange {
    /// For unit tests: `method target`, answered with `status` after
    /// `seconds`, on HTTP/1.1 with no bodies.
    pub fn sample(method: &str, target: &str, status: u16, seconds: f64) -> Exchange {
        Exchange {
            method: method.parse().expect("a method"),
            target: target.to_owned(),
            version: http::Version::HTTP_11,
            server_port: None,
            status,
            started_ns: 0,
            finished_ns: (seconds * 1e9) as u64,
            request_bytes: 0,
            response_bytes: 0,
            queued: None,
            request_body_bytes: None,
            response_body_bytes: None,
        }
    }
}

/// Requests a connection read that will never make an exchange, by why,
/// since they were last taken: the other side of completeness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostRequests {
    /// Pending when events went missing (a full ring buffer, mostly).
    pub sequence_gap: u32,
    /// Answered by a response whose request was never read whole (its
    /// read was lost, or its head could not be read).
    pub unpaired_response: u32,
    /// Never answered before the connection closed, or past the pipelining
    /// bound.
    pub abandoned: u32,
}

impl LostRequests {
    /// `reason` label values, in [`Self::by_reason`]'s order.
    pub const REASONS: [&'static str; 3] = ["sequence_gap", "unpaired_response", "abandoned"];

    pub fn by_reason(&self) -> [u32; 3] {
        [self.sequence_gap, self.unpaired_response, self.abandoned]
    }

    pub fn is_empty(&self) -> bool {
        self.by_reason().iter().all(|&count| count == 0)
    }
}

/// When a connection's TCP handshake completed and when the server
/// accepted it (CLOCK_MONOTONIC ns): between the two it sat in the
/// listener's accept queue, and from the accept on the server had it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queued {
    pub handshake_ns: u64,
    pub accepted_ns: u64,
}

impl Queued {
    /// Handshake to accept: the wait in the listener's accept queue.
    pub fn accept_queue_seconds(&self) -> f64 {
        self.accepted_ns.saturating_sub(self.handshake_ns) as f64 / 1e9
    }
}

impl Exchange {
    /// Accept to the first byte of this (the connection's first) request
    /// the server read, when the connection's accept was seen.
    pub fn accept_to_read_seconds(&self) -> Option<f64> {
        let queued = self.queued?;
        Some(self.started_ns.saturating_sub(queued.accepted_ns) as f64 / 1e9)
    }

    /// What holding it costs, in bytes of what a client chose: its method
    /// and target.
    pub fn held_bytes(&self) -> usize {
        self.method.as_str().len() + self.target.len()
    }

    pub fn duration_seconds(&self) -> f64 {
        self.finished_ns.saturating_sub(self.started_ns) as f64 / 1e9
    }
}

/// Where a connection lives: enough to find its process and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub tgid: u32,
    pub fd: u32,
    /// The listening fd it was accepted from, when the accept was seen.
    pub listen_fd: Option<u32>,
    /// Its socket's local port (its server's, for an accepted connection),
    /// as the kernel read it.
    pub port: Option<u16>,
}

/// Whom a connection's exchanges belong to, as found when it was first seen.
#[derive(Clone, Debug, PartialEq)]
pub enum ServedBy {
    /// Known at once (local mode: the server process tree).
    Server(Arc<Identity>),
    /// Local mode, a listener whose server is being looked up in `/proc`
    /// off the pipeline thread: the answer fills the slot.
    PendingServer(Arc<ServerSlot>),
    /// A process in a pod; the pod is looked up per exchange, because it
    /// may become known only after its first requests.
    Container(Arc<ContainerRef>),
}

/// Where a local server's identity lands once looked up: `Some(None)`
/// when its filters leave it out.
#[derive(Debug, Default, PartialEq)]
pub struct ServerSlot(OnceLock<Option<Arc<Identity>>>);

impl ServerSlot {
    /// The answer, once there (`Some(None)`: not monitored).
    pub fn get(&self) -> Option<Option<&Arc<Identity>>> {
        self.0.get().map(Option::as_ref)
    }

    /// Fills the slot; the first answer stays.
    pub fn fill(&self, identity: Option<Arc<Identity>>) {
        let _ = self.0.set(identity);
    }
}

/// An exchange and the connection's [`ServedBy`].
#[derive(Clone, Debug)]
pub struct CapturedExchange {
    pub served_by: ServedBy,
    /// The process that answered (where its app's source is read from).
    pub tgid: u32,
    pub exchange: Exchange,
}

/// The `path` of requests past a workload's bound on routes or series.
pub const OVERFLOW_PATH: &str = "<other>";

/// The value of every identity label when the pod could not be found.
pub const UNKNOWN: &str = "<unknown>";

/// Label names of local mode's identity, in exposition order.
pub const SERVER_LABELS: [&str; 2] = ["process", "port"];
/// Label names of Kubernetes mode's identity, in exposition order.
pub const POD_LABELS: [&str; 5] = ["namespace", "pod", "container", "workload", "workload_kind"];
/// The same under `--aggregate-by workload`: pod and container dropped.
pub const WORKLOAD_LABELS: [&str; 3] = ["namespace", "workload", "workload_kind"];

/// Which of a pod's labels its series keep (`--aggregate-by`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PodGrain {
    /// A series set per container of each pod.
    #[default]
    Container,
    /// One per workload on the node: the sum over its pods and containers.
    Workload,
}

impl PodGrain {
    /// The identity label names, in exposition order.
    pub fn label_names(self) -> &'static [&'static str] {
        match self {
            PodGrain::Container => &POD_LABELS,
            PodGrain::Workload => &WORKLOAD_LABELS,
        }
    }

    /// The identity labels of a pod's container at this grain.
    pub fn labels(self, pod: PodLabels<'_>) -> IdentityLabels {
        let PodLabels {
            namespace,
            pod,
            container,
            workload,
            workload_kind,
        } = pod;
        match self {
            PodGrain::Container => IdentityLabels::Pod {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                container: container.to_owned(),
                workload: workload.to_owned(),
                workload_kind: workload_kind.to_owned(),
            },
            PodGrain::Workload => IdentityLabels::Workload(WorkloadKey::Pod {
                namespace: namespace.to_owned(),
                workload: workload.to_owned(),
                workload_kind: workload_kind.to_owned(),
            }),
        }
    }

    /// A pod's container the node's watch does not know.
    pub fn unknown(self) -> IdentityLabels {
        self.labels(PodLabels {
            namespace: UNKNOWN,
            pod: UNKNOWN,
            container: UNKNOWN,
            workload: UNKNOWN,
            workload_kind: UNKNOWN,
        })
    }
}

/// What a pod's container is called, before [`PodGrain`] picks labels.
#[derive(Clone, Copy, Debug)]
pub struct PodLabels<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub container: &'a str,
    pub workload: &'a str,
    pub workload_kind: &'a str,
}

/// The labels every `flask_*` series of one identity carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityLabels {
    /// Local mode: a server process tree (its root's name) and its port.
    Server { process: String, port: String },
    /// Kubernetes mode: a container of a pod.
    Pod {
        namespace: String,
        pod: String,
        container: String,
        workload: String,
        workload_kind: String,
    },
    /// Kubernetes mode under `--aggregate-by workload`: every pod and
    /// container of a workload on the node.
    Workload(WorkloadKey),
}

impl IdentityLabels {
    /// A local server whose lookup did not answer in time.
    pub fn unknown_server() -> Self {
        IdentityLabels::Server {
            process: UNKNOWN.to_owned(),
            port: UNKNOWN.to_owned(),
        }
    }

    /// (name, value) in [`SERVER_LABELS`] or [`POD_LABELS`] order.
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        match self {
            IdentityLabels::Server { process, port } => named(SERVER_LABELS, [process, port]),
            IdentityLabels::Pod {
                namespace,
                pod,
                container,
                workload,
                workload_kind,
            } => named(
                POD_LABELS,
                [namespace, pod, container, workload, workload_kind],
            ),
            IdentityLabels::Workload(workload) => workload.pairs(),
        }
    }

    /// What route learning and the route cap are kept per: the server in
    /// local mode, the workload in Kubernetes mode.
    pub fn workload(&self) -> WorkloadKey {
        match self {
            IdentityLabels::Server { process, port } => WorkloadKey::Server {
                process: process.clone(),
                port: port.clone(),
            },
            IdentityLabels::Pod {
                namespace,
                workload,
                workload_kind,
                ..
            } => WorkloadKey::Pod {
                namespace: namespace.clone(),
                workload: workload.clone(),
                workload_kind: workload_kind.clone(),
            },
            IdentityLabels::Workload(workload) => workload.clone(),
        }
    }
}

/// Label names paired with their values.
fn named<'a, const N: usize>(
    names: [&'static str; N],
    values: [&'a String; N],
) -> Vec<(&'static str, &'a str)> {
    names.into_iter().zip(values.map(String::as_str)).collect()
}

/// The workload part of identity labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKey {
    Server {
        process: String,
        port: String,
    },
    Pod {
        namespace: String,
        workload: String,
        workload_kind: String,
    },
}

impl WorkloadKey {
    /// (label name, value), as the identity labels name them.
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        match self {
            WorkloadKey::Server { process, port } => named(SERVER_LABELS, [process, port]),
            WorkloadKey::Pod {
                namespace,
                workload,
                workload_kind,
            } => named(WORKLOAD_LABELS, [namespace, workload, workload_kind]),
        }
    }
}

/// Who served an exchange. Two identities with the same labels are the
/// same identity: they share their series.
#[derive(Clone, Debug)]
pub struct Identity {
    pub labels: IdentityLabels,
    pub workload: WorkloadKey,
    /// Of `labels`, computed once: identities key the per-exchange lookups
    /// of routes and metrics.
    hash: u64,
}

impl Identity {
    pub fn new(labels: IdentityLabels) -> Self {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(&labels);
        Identity {
            workload: labels.workload(),
            labels,
            hash,
        }
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.labels == other.labels
    }
}

impl Eq for Identity {}

impl Hash for Identity {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// An exchange and who served it.
#[derive(Clone, Debug)]
pub struct AttributedExchange {
    pub identity: Arc<Identity>,
    /// User rules the served pod's annotation gives its workload.
    pub rules: Option<Arc<RuleSet>>,
    /// The process that answered.
    pub tgid: u32,
    pub exchange: Exchange,
}

/// Where a route's name came from (shown by `/debug/routes`, by
/// [`RouteSource::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSource {
    /// A user rule matched.
    UserRule,
    /// A rule read from the app's own source matched.
    SourceRule,
    /// A template with a parameter learned from the workload's traffic.
    Learned,
    /// Literal segments and parameters typed by how values look.
    Heuristic,
    /// The request path as is (`--path-label raw`).
    Raw,
    /// No route takes the request.
    Unmatched,
    /// Past the workload's cap.
    Overflow,
}

impl RouteSource {
    /// Its name in `/debug/routes`' JSON and pages.
    pub fn name(self) -> &'static str {
        match self {
            RouteSource::UserRule => "user_rule",
            RouteSource::SourceRule => "source_rule",
            RouteSource::Learned => "learned",
            RouteSource::Heuristic => "heuristic",
            RouteSource::Raw => "raw",
            RouteSource::Unmatched => "unmatched",
            RouteSource::Overflow => "overflow",
        }
    }
}

impl Serialize for RouteSource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// The route of an exchange: its `path` (or `url_rule`) label, and its
/// endpoint when the rule that named it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub path: Arc<str>,
    /// Flask's `request.endpoint`: from a rule read from the app's source.
    pub endpoint: Option<Arc<str>>,
    pub source: RouteSource,
}

/// A pod UID in its canonical form (`8-4-4-4-12` lower-case hex).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    /// Accepts the UID as the API has it or as systemd slice names spell it
    /// (underscores for dashes).
    pub fn parse(text: &str) -> Option<PodUid> {
        let canonical = text.replace('_', "-").to_ascii_lowercase();
        let groups: Vec<&str> = canonical.split('-').collect();
        let shaped = groups.iter().map(|group| group.len()).eq([8, 4, 4, 4, 12]);
        let hex = groups
            .iter()
            .all(|group| group.bytes().all(|b| b.is_ascii_hexdigit()));
        (shaped && hex).then_some(PodUid(canonical))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a process sits in the kubelet's cgroup tree.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub pod_uid: PodUid,
    /// The runtime's container ID, without the `containerd://` style prefix
    /// the pod status adds. `None` when the process sits in the pod's cgroup
    /// itself rather than a container's.
    pub container_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_their_labels_and_name_their_workload() {
        let labels = IdentityLabels::Pod {
            namespace: "shop".to_owned(),
            pod: "web-1".to_owned(),
            container: "app".to_owned(),
            workload: "web".to_owned(),
            workload_kind: "Deployment".to_owned(),
        };
        let identity = Identity::new(labels.clone());
        assert_eq!(identity, Identity::new(labels.clone()));
        assert_ne!(identity, Identity::new(PodGrain::Container.unknown()));
        assert_eq!(
            identity.workload.pairs(),
            [
                ("namespace", "shop"),
                ("workload", "web"),
                ("workload_kind", "Deployment")
            ]
        );
        assert_eq!(
            labels
                .pairs()
                .into_iter()
                .map(|(name, _)| name)
                .collect::<Vec<_>>(),
            POD_LABELS
        );
        // Aggregated: the same workload, pod and container gone.
        let pod = PodLabels {
            namespace: "shop",
            pod: "web-1",
            container: "app",
            workload: "web",
            workload_kind: "Deployment",
        };
        assert_eq!(PodGrain::Container.labels(pod), labels);
        let aggregated = Identity::new(PodGrain::Workload.labels(pod));
        let other_pod = PodLabels {
            pod: "web-2",
            container: "sidecar",
            ..pod
        };
        assert_eq!(
            aggregated,
            Identity::new(PodGrain::Workload.labels(other_pod))
        );
        assert_eq!(aggregated.workload, identity.workload);
        assert_eq!(
            aggregated.labels.pairs(),
            identity.workload.pairs(),
            "namespace, workload and its kind only"
        );
        let server = IdentityLabels::Server {
            process: "gunicorn".to_owned(),
            port: "8000".to_owned(),
        };
        assert_eq!(
            server.workload().pairs(),
            [("process", "gunicorn"), ("port", "8000")]
        );
    }
}
