//! `/debug/routes`, `/debug/pods` and `/debug/connections`: which routes
//! the agent captured and why it named them so, who it thinks served them,
//! and what it is following. The pipeline publishes a snapshot once a
//! second; the endpoints serve it as JSON, or as an HTML page to a browser
//! (`Accept: text/html`) or with `?format=html`.
//!
//! Nothing here comes from headers or bodies, and sample paths have their
//! query string removed (the routes stage keeps them so) and are
//! length-capped.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Instant, SystemTime},
};

use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::{Deserialize, Serialize};

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

fn unix_seconds(time: SystemTime) -> f64 {
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
fn registered_at(rule: &HarvestedRule) -> String {
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
fn why(source: RouteSource, path: &str, source_rules: Option<&SourceRulesView>) -> String {
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

/// A duration for people: milliseconds below 1 s, with the precision the
/// sketch has.
fn duration_text(seconds: f64) -> String {
    match seconds {
        s if s < 0.01 => format!("{:.2} ms", s * 1e3),
        s if s < 1.0 => format!("{:.1} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

/// How an HTML page is shown: `?sort=requests|errors|p99&refresh=SECONDS`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(default)]
pub struct PageOptions {
    pub sort: RouteOrder,
    /// Seconds between reloads; 0: never.
    pub refresh: u32,
}

impl Default for PageOptions {
    fn default() -> Self {
        PageOptions {
            sort: RouteOrder::Requests,
            refresh: 5,
        }
    }
}

/// The order of `/debug/routes`' rows, largest first.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouteOrder {
    #[default]
    Requests,
    Errors,
    P99,
}

impl RouteOrder {
    fn name(self) -> &'static str {
        match self {
            RouteOrder::Requests => "requests",
            RouteOrder::Errors => "errors",
            RouteOrder::P99 => "p99",
        }
    }

    /// `routes` ordered largest first (ties by path).
    fn sorted(self, routes: &[RouteReport]) -> Vec<&RouteReport> {
        let mut sorted: Vec<&RouteReport> = routes.iter().collect();
        sorted.sort_by(|a, b| {
            let order = match self {
                RouteOrder::Requests => b.requests.cmp(&a.requests),
                RouteOrder::Errors => b.errors.cmp(&a.errors),
                RouteOrder::P99 => b
                    .p99_seconds
                    .unwrap_or(0.0)
                    .total_cmp(&a.p99_seconds.unwrap_or(0.0)),
            };
            order.then_with(|| a.path.cmp(&b.path))
        });
        sorted
    }
}

fn owned_pairs(pairs: Vec<(&str, &str)>) -> BTreeMap<String, String> {
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

/// What the endpoints serve.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DebugSnapshot {
    pub updated_at: f64,
    pub routes: RoutesReport,
    pub pods: PodsReport,
    pub connections: ConnectionsReport,
}

/// The latest snapshot, shared by the pipeline (writer) and the endpoints.
#[derive(Debug, Default)]
pub struct DebugState {
    snapshot: Mutex<Arc<DebugSnapshot>>,
}

impl DebugState {
    pub fn publish(&self, mut snapshot: DebugSnapshot) {
        snapshot.updated_at = unix_seconds(SystemTime::now());
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }

    pub fn latest(&self) -> Arc<DebugSnapshot> {
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), duration_text)
}

fn counts<K: std::fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    map.iter()
        .map(|(key, count)| format!("{key} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The page's style: readable without any script.
const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#1b1b1b}\
nav a{margin-right:1em}nav .refresh{color:#555}\
table{border-collapse:collapse;margin-bottom:2em;font-size:.92em}\
td,th{border-bottom:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}\
th{background:#f3f4f6;position:sticky;top:0}th a{color:inherit}tr:nth-child(even) td{background:#fafafa}\
td.number{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
.source{display:inline-block;padding:0 .4em;border-radius:.3em;background:#e5e7eb;font-size:.85em}\
.source-source_rule,.source-user_rule{background:#d1fae5}.source-learned,.source-heuristic{background:#fef3c7}\
.source-unmatched,.source-overflow{background:#fee2e2}.why{color:#555;font-size:.85em;max-width:28em}\
.errors{color:#b91c1c;font-weight:600}code{font-family:ui-monospace,monospace;font-size:1em}small{color:#555}";

/// A page's head, navigation and auto-refresh; `here` is its path, whose
/// links keep `options` but the one they change.
fn page(title: &str, here: &str, options: &PageOptions, body: Markup) -> Markup {
    let refresh_link = |refresh: u32| {
        format!(
            "{here}?format=html&sort={}&refresh={refresh}",
            options.sort.name()
        )
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if options.refresh > 0 {
                    meta http-equiv="refresh" content=(options.refresh);
                }
                title { (title) " · flask-ebpf-exporter" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                nav {
                    a href="/debug/routes?format=html" { "Routes" }
                    a href="/debug/pods?format=html" { "Pods" }
                    a href="/debug/connections?format=html" { "Connections" }
                    span.refresh {
                        @if options.refresh > 0 {
                            "Refreshes every " (options.refresh) " s · "
                            a #refresh-toggle href=(refresh_link(0)) { "Stop auto-refresh" }
                        } @else {
                            "Auto-refresh is off · "
                            a #refresh-toggle href=(refresh_link(5)) { "Refresh every 5 s" }
                        }
                    }
                }
                h1 { (title) }
                (body)
            }
        }
    }
}

/// A column header that sorts by `order`, marked when it does.
fn sort_header(label: &str, order: RouteOrder, options: &PageOptions) -> Markup {
    let href = format!(
        "/debug/routes?format=html&sort={}&refresh={}",
        order.name(),
        options.refresh
    );
    html! {
        th.number {
            a href=(href) data-sort=(order.name()) { (label) }
            @if options.sort == order { " ▼" }
        }
    }
}

pub fn routes_html(snapshot: &DebugSnapshot, options: &PageOptions) -> Markup {
    page(
        "Captured routes",
        "/debug/routes",
        options,
        html! {
            @if snapshot.routes.workloads.is_empty() { p { "No requests captured yet." } }
            @for workload in &snapshot.routes.workloads {
                h2 { @for (name, value) in &workload.workload { (name) "=" code { (value) } " " } }
                p {
                    (workload.routes.len()) " routes, "
                    (workload.routes.iter().map(|r| r.requests).sum::<u64>()) " requests. "
                    small { "Durations from the first request byte the server read to the last response byte it wrote; quantiles within 2 %." }
                }
                table.routes {
                    thead {
                        tr {
                            th { "Route" } th { "Endpoint" } th { "Named by" }
                            (sort_header("Requests", RouteOrder::Requests, options))
                            (sort_header("5xx", RouteOrder::Errors, options))
                            th.number { "p50" }
                            (sort_header("p99", RouteOrder::P99, options))
                            th { "Statuses" } th { "Methods" } th { "Sample paths" }
                        }
                    }
                    tbody {
                        @for route in options.sort.sorted(&workload.routes) {
                            tr data-route=(route.path) {
                                td { code { (route.path) } }
                                td { @if let Some(endpoint) = &route.endpoint { code { (endpoint) } } @else { "–" } }
                                td {
                                    span class=(format!("source source-{}", route.source.name())) { (route.source.name().replace('_', " ")) }
                                    div.why { (route.why) }
                                }
                                td.number.requests { (route.requests) }
                                td.number.errors-count {
                                    @if route.errors > 0 { span.errors { (route.errors) } } @else { "0" }
                                }
                                td.number.p50 { (seconds(route.p50_seconds)) }
                                td.number.p99 { (seconds(route.p99_seconds)) }
                                td.statuses { @for (status, count) in &route.statuses { (status) " × " (count) br; } }
                                td { (counts(&route.methods)) }
                                td { @for sample in &route.sample_paths { code { (sample) } br; } }
                            }
                        }
                    }
                }
                @if let Some(source) = &workload.source_rules {
                    @let discovery = &source.harvest.discovery;
                    h3 { "Rules read from the app's source" }
                    p {
                        "Entrypoint: " code { (discovery.entrypoint.as_deref().unwrap_or("not found")) }
                        "; " (discovery.files.len()) " files parsed; "
                        (source.misses) " served requests no rule takes."
                    }
                    table {
                        tr { th { "rule" } th { "methods" } th { "endpoint" } th { "registered at" } }
                        @for rule in &discovery.rules {
                            tr {
                                td { code { (rule.rule) } }
                                td { (rule.methods.iter().map(String::as_str).collect::<Vec<_>>().join(", ")) }
                                td { code { (rule.endpoint) } }
                                td { code { (registered_at(rule)) } }
                            }
                        }
                    }
                    @if !discovery.unresolved.is_empty() {
                        p { "Not followed:" }
                        ul { @for reason in &discovery.unresolved { li { (reason) } } }
                    }
                }
            }
        },
    )
}

pub fn pods_html(snapshot: &DebugSnapshot, options: &PageOptions) -> Markup {
    let pods = &snapshot.pods;
    page(
        "Who serves",
        "/debug/pods",
        options,
        html! {
            p { "Mode: " (pods.mode) }
            @if !pods.servers.is_empty() {
                table {
                    tr { th { "pid" } th { "listening fd" } th { "identity" } }
                    @for server in &pods.servers {
                        tr { td { (server.pid) } td { (server.listen_fd) } td {
                            @match &server.identity {
                                Some(identity) => { @for (name, value) in identity { (name) "=" code { (value) } " " } }
                                None => { "not monitored" }
                            }
                        } }
                    }
                }
            }
            @if !pods.load.is_empty() {
                h2 { "Load" }
                table {
                    tr { th { "server" } th { "queue p50" } th { "queue p99" } th { "in flight" } th { "workers" } th { "requests seen" } th { "completed" } }
                    @for load in &pods.load {
                        tr {
                            td { @for (name, value) in &load.identity { (name) "=" code { (value) } " " } }
                            td { (load.queue_p50_seconds.map_or_else(|| "–".to_owned(), duration_text)) }
                            td { (load.queue_p99_seconds.map_or_else(|| "–".to_owned(), duration_text)) }
                            td { (load.in_flight) } td { (load.workers) }
                            td { (load.requests_seen) }
                            td { (load.completeness.map_or_else(|| "–".to_owned(), |c| format!("{:.1} %", c * 100.0))) }
                        }
                    }
                }
            }
            @if !pods.pods.is_empty() {
                table {
                    tr { th { "namespace" } th { "pod" } th { "workload" } th { "containers" } th { "monitored" } th { "deleted" } }
                    @for pod in &pods.pods {
                        tr {
                            td { (pod.namespace) } td { (pod.pod) }
                            td { (pod.workload_kind) "/" (pod.workload) }
                            td { @for (name, id) in &pod.containers { (name) " " code { (id) } br; } }
                            td { (pod.monitored) }
                            td { (pod.deleted_seconds_ago.map_or_else(String::new, |s| format!("{s:.0} s ago"))) }
                        }
                    }
                }
            }
            @if !pods.processes.is_empty() {
                table {
                    tr { th { "pid" } th { "pod UID" } th { "container ID" } }
                    @for process in &pods.processes {
                        tr { td { (process.pid) } td { (process.pod_uid.clone().unwrap_or_default()) } td { code { (process.container_id.clone().unwrap_or_default()) } } }
                    }
                }
            }
        },
    )
}

pub fn connections_html(snapshot: &DebugSnapshot, options: &PageOptions) -> Markup {
    let connections = &snapshot.connections;
    page(
        "Connections",
        "/debug/connections",
        options,
        html! {
            table {
                tr { th { "tracked now" } td { (connections.tracked) } }
                tr { th { "opened in all" } td { (connections.opened_total) } }
                tr { th { "sequence gaps" } td { (connections.sequence_gaps) } }
                tr { th { "unparsed bytes" } td { (connections.unparsed_bytes) } }
                tr { th { "truncated captures" } td { (connections.truncated_captures) } }
                tr { th { "unpaired responses" } td { (connections.unpaired_responses) } }
                tr { th { "abandoned requests" } td { (connections.abandoned_requests) } }
                tr { th { "requests held for their pod" } td { (connections.requests_held) } }
            }
            table {
                tr { th { "pid" } th { "connections" } }
                @for (pid, count) in &connections.by_process { tr { td { (pid) } td { (count) } } }
            }
        },
    )
}
