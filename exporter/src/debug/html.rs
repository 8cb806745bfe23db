//! The debug pages as HTML for people: maud templates, no script, sortable
//! route rows and an optional refresh.

use std::collections::BTreeMap;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{DebugSnapshot, PageOptions, RouteOrder, reports::registered_at};

/// A duration for people: milliseconds below 1 s, with the precision the
/// sketch has.
pub(super) fn duration_text(seconds: f64) -> String {
    match seconds {
        s if s < 0.01 => format!("{:.2} ms", s * 1e3),
        s if s < 1.0 => format!("{:.1} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

pub(super) fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), duration_text)
}

pub(super) fn counts<K: std::fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    map.iter()
        .map(|(key, count)| format!("{key} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The page's style: readable without any script.
pub(super) const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#1b1b1b}\
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
pub(super) fn page(title: &str, here: &str, options: &PageOptions, body: Markup) -> Markup {
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
pub(super) fn sort_header(label: &str, order: RouteOrder, options: &PageOptions) -> Markup {
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
