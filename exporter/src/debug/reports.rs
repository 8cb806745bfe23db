//! What the debug pages show, as plain serializable reports built from
//! the stages' views: routes and why each is named so, pods and servers,
//! connections.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    exchange::RouteSource,
    identity::{IdentityStage, attribution::Attribution, pods::lock_index},
    metrics::ServerLoad,
    routes::{
        SourceRulesView, WorkloadRoutesView,
        discovery::{HarvestedRule, rules::SourceRules},
    },
    stream::ConnectionTable,
};

pub(super) fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RoutesReport {
    pub workloads: Vec<WorkloadReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkloadReport {
    /// The workload's identity labels (server in local mode).
    pub workload: BTreeMap<String, String>,
    pub routes: Vec<RouteReport>,
    /// Nodes in the learned-route trie (bounded).
    pub learned_nodes: usize,
    /// Its url rules as read from its source, once read.
    pub source_rules: Option<SourceRulesReport>,
}

/// What route discovery found for a workload: the harvest itself, shared
/// with the routes stage (a harvest may hold thousands of rules, so the
/// snapshot taken every second copies none of them), written out only
/// when a page is asked for.
#[derive(Clone, Debug)]
pub struct SourceRulesReport {
    pub harvest: Arc<SourceRules>,
    /// Requests the app served that no rule read from its source takes.
    pub misses: u64,
}

/// As JSON: `entrypoint` (how the app was found, `gunicorn shop.wsgi:app`),
/// `rules` (each with its methods, endpoint and `file:line` inside the
/// app's container), `files_parsed`, `unresolved` (what could not be
/// followed, and why) and `misses`.
impl Serialize for SourceRulesReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        /// One rule, with where it was registered.
        struct RuleAt<'a>(&'a HarvestedRule);
        impl Serialize for RuleAt<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut rule = serializer.serialize_struct("SourceRule", 4)?;
                rule.serialize_field("rule", &self.0.rule)?;
                rule.serialize_field("methods", &self.0.methods)?;
                rule.serialize_field("endpoint", &self.0.endpoint)?;
                rule.serialize_field("at", &registered_at(self.0))?;
                rule.end()
            }
        }
        let discovery = &self.harvest.discovery;
        let rules: Vec<RuleAt<'_>> = discovery.rules.iter().map(RuleAt).collect();
        let mut report = serializer.serialize_struct("SourceRulesReport", 5)?;
        report.serialize_field("entrypoint", &discovery.entrypoint)?;
        report.serialize_field("rules", &rules)?;
        report.serialize_field("files_parsed", &discovery.files.len())?;
        report.serialize_field("unresolved", &discovery.unresolved)?;
        report.serialize_field("misses", &self.misses)?;
        report.end()
    }
}

/// `file:line` of a rule's registration.
pub(super) fn registered_at(rule: &HarvestedRule) -> String {
    format!("{}:{}", rule.file.display(), rule.line)
}

#[derive(Clone, Debug, Serialize)]
pub struct RouteReport {
    pub path: String,
    /// Flask's endpoint of the rule that named it, when read from the
    /// source.
    pub endpoint: Option<String>,
    /// Where the name came from: user_rule, source_rule, learned,
    /// heuristic, raw, unmatched or overflow.
    pub source: RouteSource,
    /// Why, in a sentence.
    pub why: String,
    pub requests: u64,
    /// Responses with status 500 to 599.
    pub errors: u64,
    pub methods: BTreeMap<&'static str, u64>,
    pub statuses: BTreeMap<u16, u64>,
    /// From a quantile sketch of the route's durations (within 2 %).
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    pub first_seen: f64,
    pub last_seen: f64,
    pub sample_paths: Vec<String>,
}

impl RoutesReport {
    pub fn new(views: Vec<WorkloadRoutesView>) -> Self {
        let workloads = views
            .into_iter()
            .map(|view| WorkloadReport {
                workload: owned_pairs(view.workload.pairs()),
                learned_nodes: view.learned_nodes,
                source_rules: view.source_rules.as_ref().map(|source| SourceRulesReport {
                    harvest: source.rules.clone(),
                    misses: source.misses,
                }),
                routes: view
                    .routes
                    .into_iter()
                    .map(|(path, stats)| RouteReport {
                        why: why(stats.source, &path, view.source_rules.as_ref()),
                        path: path.to_string(),
                        endpoint: stats.endpoint.as_deref().map(str::to_owned),
                        source: stats.source,
                        requests: stats.requests,
                        errors: stats.statuses.range(500..600).map(|(_, count)| count).sum(),
                        p50_seconds: stats.quantile(0.5),
                        p99_seconds: stats.quantile(0.99),
                        methods: stats.methods,
                        statuses: stats.statuses,
                        first_seen: unix_seconds(stats.first_seen),
                        last_seen: unix_seconds(stats.last_seen),
                        sample_paths: stats.samples,
                    })
                    .collect(),
            })
            .collect();
        RoutesReport { workloads }
    }
}

/// Why a route has its name, in a sentence.
pub(super) fn why(
    source: RouteSource,
    path: &str,
    source_rules: Option<&SourceRulesView>,
) -> String {
    match source {
        RouteSource::UserRule => {
            "matched a rule given by --route, --routes-file or the pod's annotation".to_owned()
        }
        RouteSource::SourceRule => {
            let at = source_rules
                .and_then(|source| source.rules.registered(path))
                .map(registered_at);
            match at {
                Some(at) => format!("matched the rule registered at {at} in the app's source"),
                None => "matched a rule read from the app's source".to_owned(),
            }
        }
        RouteSource::Learned => "learned from this workload's traffic: a position took too many \
             values to be a literal, and no rule read from the source takes these requests"
            .to_owned(),
        RouteSource::Heuristic => "segments that look like identifiers (numbers, UUIDs, hashes) \
             replaced by parameters, until traffic or a rule says more"
            .to_owned(),
        RouteSource::Raw => "--path-label raw: the request path as sent".to_owned(),
        RouteSource::Unmatched => "no rule takes these requests: Flask's router answered 404, \
             405 or a redirect, labelled None as prometheus-flask-exporter labels them"
            .to_owned(),
        RouteSource::Overflow => "past the workload's bound on routes or series: counted \
             together so that clients cannot mint series"
            .to_owned(),
    }
}

pub(super) fn owned_pairs(pairs: Vec<(&str, &str)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Who serves: local servers or this node's pods, and the processes mapped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PodsReport {
    pub mode: &'static str,
    /// Local mode: listening sockets and the identity they resolve to.
    pub servers: Vec<ServerRow>,
    /// Kubernetes mode: the node's pods as the watch knows them.
    pub pods: Vec<PodRow>,
    /// Kubernetes mode: processes seen serving, and their container.
    pub processes: Vec<ProcessRow>,
    /// Each server's queue time, requests in flight, workers and
    /// completeness.
    pub load: Vec<ServerLoad>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServerRow {
    pub pid: u32,
    pub listen_fd: u32,
    /// `None`: filtered out, or the process was gone.
    pub identity: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PodRow {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub workload: String,
    pub workload_kind: String,
    pub containers: BTreeMap<String, String>,
    pub monitored: bool,
    pub routes_annotation: bool,
    /// Seconds since the pod was deleted, while its series stay.
    pub deleted_seconds_ago: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectionsReport {
    pub tracked: usize,
    /// Connections followed per process.
    pub by_process: BTreeMap<u32, usize>,
    pub opened_total: u64,
    pub sequence_gaps: u64,
    pub unparsed_bytes: u64,
    pub truncated_captures: u64,
    pub unpaired_responses: u64,
    pub abandoned_requests: u64,
    /// Requests waiting for their pod to become known.
    pub requests_held: usize,
}

impl PodsReport {
    pub fn new(identity: &IdentityStage, now: Instant) -> Self {
        match identity {
            IdentityStage::Local(local) => PodsReport {
                mode: "local",
                servers: local
                    .servers()
                    .into_iter()
                    .map(|(pid, listen_fd, identity)| ServerRow {
                        pid,
                        listen_fd,
                        identity: identity.map(|identity| owned_pairs(identity.labels.pairs())),
                    })
                    .collect(),
                ..PodsReport::default()
            },
            IdentityStage::Pods(pods) => {
                let mut processes: Vec<ProcessRow> = pods
                    .processes()
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
                let mut rows: Vec<PodRow> = lock_index(pods.index())
                    .pods()
                    .map(|(info, deleted_at)| PodRow {
                        namespace: info.namespace.clone(),
                        pod: info.name.clone(),
                        uid: info.uid.to_string(),
                        workload: info.workload.name.clone(),
                        workload_kind: info.workload.kind.clone(),
                        containers: info.container_ids.iter().cloned().collect(),
                        monitored: info.selected,
                        routes_annotation: info.routes.is_some(),
                        deleted_seconds_ago: deleted_at
                            .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                    })
                    .collect();
                rows.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
                PodsReport {
                    mode: "kubernetes",
                    pods: rows,
                    processes,
                    ..PodsReport::default()
                }
            }
        }
    }
}

impl ConnectionsReport {
    pub fn new(table: &ConnectionTable, attribution: &Attribution) -> Self {
        let counters = table.counters();
        ConnectionsReport {
            tracked: table.len(),
            by_process: table.per_process(),
            opened_total: counters.connections_opened.get(),
            sequence_gaps: counters.sequence_gaps.get(),
            unparsed_bytes: counters.http.unparsed_bytes.get(),
            truncated_captures: counters.http.truncated_captures.get(),
            unpaired_responses: counters.http.unpaired_responses.get(),
            abandoned_requests: counters.http.abandoned_requests.get(),
            requests_held: attribution.counters().held.get().max(0) as usize,
        }
    }
}
