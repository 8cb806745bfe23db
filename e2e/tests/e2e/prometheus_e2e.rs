//! The shipped Prometheus files against a real Prometheus (Debian's 2.42):
//! `promtool test rules` on the rules, and a real scrape of the running
//! exporter (Kubernetes mode, a Flask app in a kubelet-style cgroup) through
//! the SAME relabel_configs as manifests/prometheus/scrape-config.yaml.
//! Debian's Prometheus has no kubernetes_sd, so the targets come from
//! file_sd carrying the labels `role: node` produces.

use flask_ebpf_exporter_e2e as support;

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{
    cgroups::{Driver, PodCgroups},
    kube_api::{KubeApi, PodSpec, owned_by, pod},
    *,
};

fn prometheus_dir() -> std::path::PathBuf {
    workspace().join("manifests/prometheus")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus; cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "promtool {args:?}:\n{report}");
    report
}

#[test]
fn rules_pass_promtool_unit_tests() {
    let report = promtool(&["check", "rules", "rules.yaml"], &prometheus_dir());
    assert!(report.contains("SUCCESS"), "{report}");
    let report = promtool(&["test", "rules", "rules_test.yaml"], &prometheus_dir());
    assert!(report.contains("SUCCESS"), "{report}");
}

#[test]
fn node_role_scrape_config_collects_per_pod_series() {
    let venv = require_prerequisites();
    // The node's InternalIP: a loopback address of its own, so the shipped
    // port 9810 is free whatever else runs.
    let pid = std::process::id();
    let node_ip = format!("127.{}.{}.1", (pid >> 8) & 0xff, pid & 0xff);

    // The cluster side: a Deployment's pod on this node.
    let api = KubeApi::start();
    let dir = tempfile::tempdir().expect("tempdir");
    api.put_object(owned_by(
        "ReplicaSet",
        "shop",
        "web-6c9f8d7b5",
        ("Deployment", "web"),
    ));
    let uid = "0000000a-5c0e-4bbb-8ccc-000000000000";
    let container_id = format!("{:064x}", 0xa_u32);
    api.put_pod(pod(&PodSpec {
        namespace: "shop",
        name: "web-6c9f8d7b5-q7x2m",
        uid,
        node: "node-a",
        owner: Some(("ReplicaSet", "web-6c9f8d7b5")),
        containers: &[("web", Some(&container_id))],
        annotations: &[],
    }));
    let cgroups = PodCgroups::create(Driver::Systemd, uid, &container_id);
    let app = App::start_in(
        &venv,
        Server::GunicornGthread,
        false,
        &cgroups.procs_files(),
    );
    let exporter = Exporter::start_on(
        format!("{node_ip}:9810").parse().expect("address"),
        &api.exporter_args("node-a", &[]),
        "/readyz",
    );

    // The shipped job, with kubernetes_sd swapped for file_sd and nothing
    // else changed.
    let targets = dir.path().join("nodes.json");
    let shipped = shipped_prometheus_config("scrape-config.yaml");
    let job = file_sd_node_job(&shipped, &targets);
    let relabel_configs = job["relabel_configs"].clone();
    // What `role: node` gives a node target (kubelet port, node metadata).
    let node_target = json!([{
        "targets": [format!("{node_ip}:10250")],
        "labels": {
            "__meta_kubernetes_node_name": "node-a",
            "__meta_kubernetes_node_address_InternalIP": node_ip,
            "__meta_kubernetes_node_address_Hostname": "node-a",
            "__meta_kubernetes_node_provider_id": "aws:///eu-west-1a/i-0123456789abcdef0",
            "__meta_kubernetes_node_label_kubernetes_io_hostname": "node-a",
            "__meta_kubernetes_node_labelpresent_kubernetes_io_hostname": "true",
            "__meta_kubernetes_node_label_topology_kubernetes_io_zone": "eu-west-1a",
            "__meta_kubernetes_node_label_topology_kubernetes_io_region": "eu-west-1",
            "__meta_kubernetes_node_label_node_kubernetes_io_instance_type": "m6i.large",
            "__meta_kubernetes_node_annotation_node_alpha_kubernetes_io_ttl": "0",
        }
    }]);
    fs::write(&targets, node_target.to_string()).expect("targets");
    // JSON is YAML: the config is written as JSON.
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [prometheus_dir().join("rules.yaml").to_str().expect("path")],
        "scrape_configs": [job],
    });
    let config_file = dir.path().join("prometheus.yml");
    fs::write(&config_file, config.to_string()).expect("config");
    let report = promtool(
        &["check", "config", config_file.to_str().expect("path")],
        dir.path(),
    );
    assert!(report.contains("SUCCESS"), "{report}");

    let (_prometheus, prometheus_port) = start_prometheus(&config_file, &dir.path().join("data"));

    let sent = get_items(app.port, 5);

    // The target: relabelled to the agent's port, with node and zone labels.
    let deadline = Instant::now() + Duration::from_secs(30);
    let target = loop {
        let data = prometheus_api(prometheus_port, "/api/v1/targets");
        let active = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(up) = active.iter().find(|t| t["health"] == "up") {
            break up.clone();
        }
        assert!(Instant::now() < deadline, "no healthy target: {active:#?}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let labels = &target["labels"];
    assert_eq!(labels["instance"], format!("{node_ip}:9810"), "{target:#}");
    assert_eq!(labels["node"], "node-a");
    assert_eq!(labels["zone"], "eu-west-1a");
    assert_eq!(labels["region"], "eu-west-1");
    assert_eq!(labels["instance_type"], "m6i.large");
    assert_eq!(labels["job"], "flask-ebpf-exporter");
    assert_eq!(
        target["scrapeUrl"],
        format!("http://{node_ip}:9810/metrics")
    );

    // Per-pod series, read back through the query API.
    let promql = r#"sum by (namespace, pod, container, workload, workload_kind, node, path) (flask_http_request_total{job="flask-ebpf-exporter"})"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = loop {
        let result = prometheus_query(prometheus_port, promql);
        let total: f64 = result
            .iter()
            .filter_map(|sample| sample["value"][1].as_str()?.parse::<f64>().ok())
            .sum();
        if total >= f64::from(sent) || Instant::now() > deadline {
            break result;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(result.len(), 1, "{result:#?}");
    let metric = &result[0]["metric"];
    assert_eq!(metric["namespace"], "shop");
    assert_eq!(metric["pod"], "web-6c9f8d7b5-q7x2m");
    assert_eq!(metric["container"], "web");
    assert_eq!(metric["workload"], "web");
    assert_eq!(metric["workload_kind"], "Deployment");
    assert_eq!(metric["node"], "node-a");
    assert_eq!(result[0]["value"][1], sent.to_string());

    // The shipped recording rules run on the real series.
    let deadline = Instant::now() + Duration::from_secs(30);
    let recorded = loop {
        let recorded =
            prometheus_query(prometheus_port, "workload_path:flask_http_requests:rate5m");
        if !recorded.is_empty() || Instant::now() > deadline {
            break recorded;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        recorded
            .iter()
            .any(|sample| sample["metric"]["path"] == "/items/<int:item_id>"
                && sample["metric"]["workload"] == "web"),
        "{recorded:#?}"
    );
    assert_eq!(
        relabel_configs,
        shipped["scrape_configs"][0]["relabel_configs"]
    );

    // Traffic of every kind the dashboards show, just before they are read.
    for n in 0..30 {
        let target = match n % 5 {
            0 => "/boom".to_owned(),
            1 => "/missing".to_owned(),
            _ => format!("/items/{n}"),
        };
        http_get(app.port, &target).expect("request");
    }
    let until_scraped = |promql: &str| {
        eventually(
            Duration::from_secs(30),
            || prometheus_query(prometheus_port, promql),
            |result| !result.is_empty(),
        )
    };
    until_scraped(r#"flask_http_request_total{status="500"}"#);
    // Two scrapes past the last request, so that rates over it are up to date.
    std::thread::sleep(Duration::from_secs(3));
    dashboard_panels_return_data(prometheus_port);
    prometheus_flask_exporters_example_queries_return_data(prometheus_port);
    drop((app, exporter, cgroups));
}

/// Whether a query's answer holds a number (not only NaN: a quantile of no
/// requests is NaN, and a panel of it shows nothing).
fn has_a_number(result: &[Value]) -> bool {
    result.iter().any(|sample| {
        sample["value"][1]
            .as_str()
            .and_then(|value| value.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// What Grafana's `label_values(SELECTOR, LABEL)` variable query lists.
fn label_values(port: u16, definition: &str) -> Vec<String> {
    let inner = definition
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a label_values query: {definition}"));
    let (selector, label) = inner.rsplit_once(',').expect("selector, label");
    let encoded =
        percent_encoding::utf8_percent_encode(selector.trim(), percent_encoding::NON_ALPHANUMERIC);
    prometheus_api(
        port,
        &format!("/api/v1/label/{}/values?match[]={encoded}", label.trim()),
    )
    .as_array()
    .into_iter()
    .flatten()
    .filter_map(|value| value.as_str().map(str::to_owned))
    .collect()
}

/// manifests/grafana/flask-ebpf-exporter.json against the real Prometheus
/// scraping the agent: its variables list this pod's namespace, workload and
/// pod, and every panel's every query, with them substituted as Grafana
/// substitutes them, returns a number.
fn dashboard_panels_return_data(port: u16) {
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(workspace().join("manifests/grafana/flask-ebpf-exporter.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    // Variables in order: each one's query may use the ones before.
    let mut chosen: Vec<(String, String)> = vec![
        ("$__rate_interval".to_owned(), "1m".to_owned()),
        ("$__range".to_owned(), "5m".to_owned()),
    ];
    let substitute = |text: &str, chosen: &[(String, String)]| {
        chosen.iter().fold(text.to_owned(), |text, (name, value)| {
            text.replace(name, value)
        })
    };
    let expected = [
        ("namespace", "shop"),
        ("workload", "web"),
        ("pod", "web-6c9f8d7b5-q7x2m"),
    ];
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().expect("name");
        let definition = substitute(variable["definition"].as_str().expect("query"), &chosen);
        let values = label_values(port, &definition);
        let (_, wanted) = expected
            .iter()
            .find(|(expected, _)| *expected == name)
            .unwrap_or_else(|| panic!("unexpected variable {name}"));
        assert_eq!(values, [*wanted], "${name}: {definition}");
        chosen.push((format!("${name}"), values[0].clone()));
    }
    assert_eq!(chosen.len(), 2 + expected.len());
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or_default();
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let promql = substitute(target["expr"].as_str().expect("expr"), &chosen);
            assert!(!promql.contains('$'), "{title}: {promql}");
            let result = prometheus_query(port, &promql);
            assert!(
                has_a_number(&result),
                "{title}: {promql} returned {result:?}"
            );
            checked += 1;
        }
    }
    eprintln!("dashboard: {checked} queries returned data");
    assert!(checked >= 18);
}

/// The queries of prometheus-flask-exporter's example dashboard
/// (dashboards/flask_webapp.json in its repository) that read its request
/// families, as written there: a user's existing dashboard keeps working.
/// Its two other panels read the app's own process_* metrics, which the
/// agent does not export for it.
fn prometheus_flask_exporters_example_queries_return_data(port: u16) {
    for promql in [
        r#"rate(flask_http_request_duration_seconds_count{status="200"}[30s])"#,
        r#"sum(rate(flask_http_request_duration_seconds_count{status!="200"}[30s]))"#,
        "increase(flask_http_request_total[1m])",
        r#"rate(flask_http_request_duration_seconds_sum{status="200"}[30s]) / rate(flask_http_request_duration_seconds_count{status="200"}[30s])"#,
        r#"histogram_quantile(0.5, rate(flask_http_request_duration_seconds_bucket{status="200"}[30s]))"#,
        r#"histogram_quantile(0.9, rate(flask_http_request_duration_seconds_bucket{status="200"}[30s]))"#,
        r#"increase(flask_http_request_duration_seconds_bucket{status="200",le="0.25"}[30s]) / ignoring (le) increase(flask_http_request_duration_seconds_count{status="200"}[30s])"#,
    ] {
        let result = prometheus_query(port, promql);
        assert!(has_a_number(&result), "{promql} returned {result:?}");
    }
}

/// Prometheus asks for gzip (`Accept-Encoding: gzip`) and gets it; a
/// client that does not ask gets the text as is.
#[test]
fn metrics_are_gzipped_for_clients_that_ask() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornSync, false);
    let exporter = Exporter::start(&["--port", &app.port.to_string()]);
    get_items(app.port, 5);
    let counted = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| value(samples, "flask_http_request_total") >= 5.0,
    );
    assert_eq!(value(&counted, "flask_http_request_total"), 5.0);
    let get = |accept: &str| {
        let head = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n");
        let mut stream = std::net::TcpStream::connect(exporter.address).expect("connect");
        std::io::Write::write_all(&mut stream, head.as_bytes()).expect("send");
        read_response(&mut stream, &mut Vec::new(), "GET").expect("response")
    };
    let plain = get("");
    assert!(plain.body.starts_with(b"# "), "text as is");
    let zipped = get("Accept-Encoding: gzip\r\n");
    assert_eq!(zipped.status, 200);
    assert!(zipped.body.starts_with(&[0x1f, 0x8b]), "gzip");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&zipped.body[..]),
        &mut text,
    )
    .expect("gunzip");
    let samples = parse_exposition(&text);
    assert_eq!(value(&samples, "flask_http_request_total"), 5.0);
    assert!(
        zipped.body.len() * 4 < plain.body.len(),
        "{} bytes gzipped against {}",
        zipped.body.len(),
        plain.body.len()
    );
}
