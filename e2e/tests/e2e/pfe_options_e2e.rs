//! prometheus-flask-exporter's own options, given to the agent by their
//! names, against prometheus-flask-exporter configured the same way in the
//! same app: tests/fixtures/routes_app.py under gunicorn gthread, on the
//! real kernel, with the same randomized traffic. For each option the
//! request families have the same label names, the same series and the
//! same counts.
//!
//! prometheus-flask-exporter never counts its own `/metrics`; the agent
//! sees the test's scrape of it, so it is given `--excluded-paths /metrics$`
//! as well. prometheus_client's `_created` samples have no counterpart.

use flask_ebpf_exporter_e2e as support;

use std::{collections::BTreeMap, time::Duration};

use support::{
    routes_traffic::{Traffic, send},
    *,
};

/// The families prometheus-flask-exporter exports per request.
const REQUEST_FAMILIES: [&str; 3] = [
    "flask_http_request_duration_seconds",
    "flask_http_request_total",
    "flask_http_request_exceptions_total",
];

/// A sample's name and labels, without the agent's identity labels.
type SeriesKey = (String, BTreeMap<String, String>);

/// The request families' samples, comparable across the two exporters:
/// counts compared by value; bucket bounds and sums by presence only, since
/// the app times a request from inside Flask and the kernel from the read
/// of its first byte to the write of its last.
fn comparable(samples: &[Sample], port: Option<&str>) -> BTreeMap<SeriesKey, Option<f64>> {
    samples
        .iter()
        .filter(|s| REQUEST_FAMILIES.iter().any(|f| s.name.starts_with(f)))
        .filter(|s| !s.name.ends_with("_created"))
        .filter(|s| port.is_none_or(|port| s.labels.get("port").map(String::as_str) == Some(port)))
        .map(|s| {
            let mut labels = s.labels.clone();
            labels.remove("port");
            labels.remove("process");
            // prometheus_client writes bounds as Python floats ("5.0").
            if let Some(le) = labels.get_mut("le")
                && let Ok(bound) = le.parse::<f64>()
                && bound.is_finite()
            {
                *le = bound.to_string();
            }
            let counted = s.name.ends_with("_count")
                || s.name.ends_with("_total")
                || labels.get("le").is_some_and(|le| le == "+Inf");
            ((s.name.clone(), labels), counted.then_some(s.value))
        })
        .collect()
}

/// What both exporters exported for the same traffic.
struct Compared {
    ours_text: String,
    flask_text: String,
    ours: BTreeMap<SeriesKey, Option<f64>>,
    flask: BTreeMap<SeriesKey, Option<f64>>,
    /// The agent's own samples (health counters included).
    ours_samples: Vec<Sample>,
}

/// Runs the app with prometheus-flask-exporter configured by `oracle`
/// (tests/fixtures/oracle.py) and the agent with `flags`, sends the same
/// randomized traffic, and waits until the agent's counts stop differing.
fn compare(oracle: &[(&str, &str)], flags: &[&str]) -> Compared {
    let venv = require_prerequisites();
    let app = App::start_with_oracle(
        &venv,
        "routes_app",
        Server::GunicornGthread,
        true,
        &[],
        oracle,
    );
    let port = app.port.to_string();
    let mut args = vec!["--port", port.as_str(), "--excluded-paths", "/metrics$"];
    args.extend_from_slice(flags);
    let exporter = Exporter::start(&args);
    let mut traffic = Traffic::new(23);
    for _ in 0..300 {
        send(app.port, &traffic.next_request());
    }
    let flask_text = String::from_utf8_lossy(
        &http_get(app.port, "/metrics")
            .expect("prometheus-flask-exporter's /metrics")
            .body,
    )
    .into_owned();
    let flask = comparable(&parse_exposition(&flask_text), None);
    assert!(!flask.is_empty(), "{flask_text}");
    let ours_text = eventually(
        Duration::from_secs(15),
        || {
            String::from_utf8_lossy(
                &http_get_at(exporter.address, "/metrics")
                    .expect("the agent's /metrics")
                    .body,
            )
            .into_owned()
        },
        |text| comparable(&parse_exposition(text), Some(&port)) == flask,
    );
    let ours_samples = parse_exposition(&ours_text);
    Compared {
        ours: comparable(&ours_samples, Some(&port)),
        ours_text,
        flask_text,
        flask,
        ours_samples,
    }
}

/// Asserts both exporters exported the same; shows only what differs.
fn assert_same(compared: &Compared) {
    let differing: Vec<String> = compared
        .ours
        .iter()
        .filter(|(key, value)| compared.flask.get(*key) != Some(*value))
        .map(|(key, value)| format!("ours only: {key:?} {value:?}"))
        .chain(
            compared
                .flask
                .iter()
                .filter(|(key, value)| compared.ours.get(*key) != Some(*value))
                .map(|(key, value)| format!("prometheus-flask-exporter only: {key:?} {value:?}")),
        )
        .take(20)
        .collect();
    assert!(differing.is_empty(), "{}", differing.join("\n"));
}

/// The label names of the duration family's samples (less `le` and the
/// agent's identity labels).
fn duration_label_names(series: &BTreeMap<SeriesKey, Option<f64>>) -> Vec<String> {
    let mut names: Vec<String> = series
        .keys()
        .filter(|(name, _)| name.starts_with("flask_http_request_duration_seconds"))
        .flat_map(|(_, labels)| labels.keys().cloned())
        .filter(|name| name != "le")
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The values one label takes on the duration family's samples.
fn label_values(series: &BTreeMap<SeriesKey, Option<f64>>, label: &str) -> Vec<String> {
    let mut values: Vec<String> = series
        .keys()
        .filter_map(|(_, labels)| labels.get(label).cloned())
        .collect();
    values.sort();
    values.dedup();
    values
}

#[test]
fn group_by_endpoint_labels_requests_with_flasks_endpoint() {
    let compared = compare(
        &[("ORACLE_GROUP_BY", "endpoint")],
        &["--group-by", "endpoint"],
    );
    assert_same(&compared);
    assert_eq!(
        duration_label_names(&compared.ours),
        ["endpoint", "method", "status"]
    );
    let endpoints = label_values(&compared.ours, "endpoint");
    // View functions' names, and None for what no rule takes.
    for endpoint in ["item", "review", "file_meta", "language", "None"] {
        assert!(
            endpoints.iter().any(|e| e == endpoint),
            "{endpoint} in {endpoints:?}"
        );
    }
    eprintln!(
        "group_by=endpoint: {} samples equal, endpoints {endpoints:?}",
        compared.ours.len()
    );
}

#[test]
fn group_by_url_rule_names_the_label_url_rule() {
    let compared = compare(
        &[("ORACLE_GROUP_BY", "url_rule")],
        &["--group-by", "url_rule"],
    );
    assert_same(&compared);
    assert_eq!(
        duration_label_names(&compared.ours),
        ["method", "status", "url_rule"]
    );
    assert!(label_values(&compared.ours, "url_rule").contains(&"/items/<int:item_id>".to_owned()));
}

#[test]
fn excluded_paths_are_left_out_as_prometheus_flask_exporter_leaves_them() {
    let compared = compare(
        &[("ORACLE_EXCLUDED_PATHS", "/health\n/files/")],
        &[
            "--group-by",
            "url_rule",
            "--excluded-paths",
            "/health",
            "--excluded-paths",
            "/files/",
        ],
    );
    assert_same(&compared);
    let rules = label_values(&compared.ours, "url_rule");
    assert!(
        !rules
            .iter()
            .any(|rule| rule.starts_with("/health") || rule.starts_with("/files/")),
        "{rules:?}"
    );
    // The traffic reached them: the agent counted what it left out.
    assert!(
        value(
            &compared.ours_samples,
            "flask_ebpf_exporter_excluded_path_requests_total"
        ) >= 10.0,
        "{}",
        compared.ours_text
    );
}

#[test]
fn buckets_are_the_ones_given() {
    let bounds = "0.001,0.01,0.1,1";
    let compared = compare(
        &[("ORACLE_BUCKETS", bounds)],
        &["--group-by", "url_rule", "--buckets", bounds],
    );
    // Same series, same `le` bounds, same counts.
    assert_same(&compared);
    let les = label_values(&compared.ours, "le");
    assert_eq!(les, ["+Inf", "0.001", "0.01", "0.1", "1"], "{les:?}");
}

#[test]
fn latency_as_a_summary_when_not_as_a_histogram() {
    let compared = compare(
        &[("ORACLE_LATENCY_AS_HISTOGRAM", "0")],
        &[
            "--group-by",
            "url_rule",
            "--default-latency-as-histogram",
            "false",
        ],
    );
    assert_same(&compared);
    for text in [&compared.ours_text, &compared.flask_text] {
        assert!(
            text.contains("# TYPE flask_http_request_duration_seconds summary"),
            "{text}"
        );
        assert!(!text.contains("flask_http_request_duration_seconds_bucket"));
    }
    assert!(
        compared
            .ours
            .keys()
            .any(|(name, _)| name == "flask_http_request_duration_seconds_sum")
    );
}
