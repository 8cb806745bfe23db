//! `--metric-names`: OpenTelemetry's HTTP server names beside, or instead
//! of, prometheus-flask-exporter's, on the real kernel with
//! tests/fixtures/routes_app.py under gunicorn gthread.

use flask_ebpf_exporter_e2e as support;

use std::{collections::BTreeMap, io::Write as _, time::Duration};

use support::{
    routes_traffic::{Request, Traffic, send},
    *,
};

/// (method, route, status) → requests, from a duration family's counts.
fn counts(
    samples: &[Sample],
    family: &str,
    [method, route, status]: [&str; 3],
) -> BTreeMap<(String, String, String), u64> {
    let mut counts = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.name == format!("{family}_count"))
    {
        let label = |name: &str| sample.labels.get(name).cloned().unwrap_or_default();
        *counts
            .entry((label(method), label(route), label(status)))
            .or_default() += sample.value as u64;
    }
    counts
}

/// Sends `GET target HTTP/1.0`; returns the status.
fn send_http10(port: u16, target: &str) -> u16 {
    let mut stream = connect(port);
    stream
        .write_all(format!("GET {target} HTTP/1.0\r\n\r\n").as_bytes())
        .expect("send");
    read_response(&mut stream, &mut Vec::new(), "GET")
        .expect("response")
        .status
}

#[test]
fn opentelemetry_names_count_what_prometheus_flask_exporters_count() {
    let venv = require_prerequisites();
    let app = App::start_fixture(&venv, "routes_app", Server::GunicornGthread, false, &[]);
    let port = app.port.to_string();
    let exporter = Exporter::start(&[
        "--port",
        &port,
        "--metric-names",
        "both",
        "--group-by",
        "url_rule",
        "--body-sizes",
        "histogram",
    ]);
    let mut traffic = Traffic::new(5);
    for _ in 0..200 {
        send(app.port, &traffic.next_request());
    }
    for _ in 0..3 {
        assert_eq!(
            send(
                app.port,
                &Request {
                    method: "GET",
                    target: "/boom".to_owned()
                }
            ),
            500
        );
    }
    assert_eq!(send_http10(app.port, "/health"), 200);
    let sent = 204;
    let samples = eventually(
        Duration::from_secs(15),
        || exporter.metrics(),
        |samples| {
            value(samples, "http_server_request_duration_seconds_count") >= sent as f64
                && value(samples, "flask_http_request_duration_seconds_count") >= sent as f64
                // Sampled once a second.
                && samples.iter().any(|s| s.name == "http_server_active_requests")
        },
    );
    let flask: BTreeMap<_, _> = counts(
        &samples,
        "flask_http_request_duration_seconds",
        ["method", "url_rule", "status"],
    )
    .into_iter()
    // The conventions' names: `_OTHER` for unknown methods, no route for
    // what no rule takes.
    .map(|((method, rule, status), count)| {
        let method = if method == "OTHER" {
            "_OTHER".to_owned()
        } else {
            method
        };
        let rule = if rule == "None" { String::new() } else { rule };
        ((method, rule, status), count)
    })
    .collect();
    let otel = counts(
        &samples,
        "http_server_request_duration_seconds",
        [
            "http_request_method",
            "http_route",
            "http_response_status_code",
        ],
    );
    assert_eq!(otel, flask);
    assert_eq!(otel.values().sum::<u64>(), sent);

    let otel_samples: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "http_server_request_duration_seconds_count")
        .collect();
    for sample in &otel_samples {
        // An empty label is an absent one to Prometheus.
        let label = |name: &str| {
            sample
                .labels
                .get(name)
                .map(String::as_str)
                .filter(|value| !value.is_empty())
        };
        assert_eq!(label("server_port"), Some(port.as_str()), "{sample:?}");
        assert_eq!(label("url_scheme"), Some("http"));
        let error_type = if label("http_response_status_code") == Some("500") {
            Some("500")
        } else {
            None
        };
        assert_eq!(label("error_type"), error_type, "{sample:?}");
    }
    let by_version = |version: &str| {
        otel_samples
            .iter()
            .filter(|s| {
                s.labels.get("network_protocol_version").map(String::as_str) == Some(version)
            })
            .map(|s| s.value)
            .sum::<f64>()
    };
    assert_eq!(by_version("1.0"), 1.0, "the one HTTP/1.0 request");
    assert_eq!(by_version("1.1"), (sent - 1) as f64);
    assert!(
        samples.iter().any(|s| s.name == "http_server_active_requests"
            && s.labels.get("port") == Some(&port)),
        "active requests per server"
    );
    assert!(value(&samples, "http_server_response_body_size_bytes_count") >= (sent - 10) as f64);
}

#[test]
fn opentelemetry_names_alone_replace_the_ones_they_name() {
    let venv = require_prerequisites();
    let app = App::start_fixture(&venv, "routes_app", Server::GunicornGthread, false, &[]);
    let port = app.port.to_string();
    let exporter = Exporter::start(&["--port", &port, "--metric-names", "otel"]);
    let mut traffic = Traffic::new(6);
    for _ in 0..50 {
        send(app.port, &traffic.next_request());
    }
    let samples = eventually(
        Duration::from_secs(15),
        || exporter.metrics(),
        |samples| {
            value(samples, "http_server_request_duration_seconds_count") >= 50.0
                && samples.iter().any(|s| s.name == "flask_http_workers")
        },
    );
    for gone in [
        "flask_http_request_duration_seconds_count",
        "flask_http_request_total",
        "flask_http_response_size_bytes_count",
        "flask_http_requests_in_flight",
        // Optional in the conventions, and off by default (--body-sizes).
        "http_server_request_body_size_bytes_count",
        "http_server_response_body_size_bytes_count",
    ] {
        assert!(!samples.iter().any(|s| s.name == gone), "{gone}");
    }
    // The conventions have no name for these: they keep theirs.
    assert_eq!(value(&samples, "flask_http_requests_seen_total"), 50.0);
    assert!(samples.iter().any(|s| s.name == "flask_http_workers"));
}
