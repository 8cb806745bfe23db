//! Series per (method, route, status): what the agent exports for one app
//! against what prometheus-flask-exporter exports for the same requests.
//! The shop fixture (15 rules) runs under gunicorn, 2 sync workers, with
//! prometheus-flask-exporter in multiprocess mode (as gunicorn users run
//! it), and the agent watches the same server in local mode. Requests
//! cover 20 (method, route, status) combinations, one request path each,
//! so that prometheus-flask-exporter's `path` label (the request's path)
//! makes as many as the agent's (the rule).
//!
//! Counted for the agent: every sample with the server's `port` label (its
//! request series and its per-server ones); for prometheus-flask-exporter:
//! every `flask_*` sample, and apart, what its Python process adds.
//!
//! `cargo bench -p flask-ebpf-exporter-e2e --bench series` prints them;
//! under `cargo test` the same run checks that the agent's defaults stay
//! within prometheus-flask-exporter's + 10 % (root and the venv needed).

use flask_ebpf_exporter_e2e as support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use support::*;

/// The requests, each sent `ROUNDS` times, and the status each gets.
const REQUESTS: &[(&str, &str, u16)] = &[
    ("GET", "/catalog/", 200),
    ("GET", "/catalog/items/5", 200),
    ("GET", "/catalog/items/1000", 404),
    ("GET", "/catalog/assets/css/site.css", 200),
    ("POST", "/catalog/audit", 200),
    ("GET", "/catalog/audit", 405),
    ("GET", "/catalog/tags/python", 200),
    ("GET", "/catalog/items/5/reviews", 200),
    ("POST", "/catalog/items/5/reviews", 201),
    ("GET", "/api/v1/orders", 200),
    ("POST", "/api/v1/orders", 201),
    ("GET", "/api/v1/orders/7", 200),
    ("DELETE", "/api/v1/orders/7", 204),
    ("GET", "/health", 200),
    ("PUT", "/health", 405),
    ("GET", "/manage/users", 200),
    ("DELETE", "/manage/users", 200),
    ("GET", "/manage", 200),
    ("GET", "/assets/missing.css", 404),
    ("GET", "/nowhere", 404),
];
const ROUNDS: usize = 5;
/// The most the agent's series may exceed prometheus-flask-exporter's by.
const MAX_RATIO: f64 = 1.10;

/// What one exporter's /metrics holds for the app.
struct Count {
    /// Series of the request families and the server's own.
    series: usize,
    /// Series by family (the sample's name without `_bucket`, `_sum`,
    /// `_count`).
    by_family: BTreeMap<String, usize>,
    /// Distinct (method, route or path, status) of the duration series.
    combinations: usize,
}

fn count(samples: &[Sample], belongs: impl Fn(&Sample) -> bool) -> Count {
    let mine: Vec<&Sample> = samples.iter().filter(|s| belongs(s)).collect();
    let combinations: BTreeSet<(String, String, String)> = mine
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .map(|s| {
            let label = |name: &str| s.labels.get(name).cloned().unwrap_or_default();
            (label("method"), label("path"), label("status"))
        })
        .collect();
    let mut by_family = BTreeMap::new();
    for sample in &mine {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| sample.name.strip_suffix(suffix))
            .unwrap_or(&sample.name);
        *by_family.entry(family.to_owned()).or_default() += 1;
    }
    Count {
        series: mine.len(),
        by_family,
        combinations: combinations.len(),
    }
}

/// Sends every request `ROUNDS` times.
fn send_requests(port: u16) {
    for _ in 0..ROUNDS {
        for (method, target, status) in REQUESTS {
            let response = http_request(port, method, target).expect("request");
            assert_eq!(response.status, *status, "{method} {target}");
        }
    }
}

/// An agent started with `args` watches the app's port while the requests
/// are sent: what it exports for the app.
fn agent_series(app_port: u16, args: &[&str]) -> Count {
    let port = app_port.to_string();
    let mut all_args = vec!["--port", &port];
    all_args.extend_from_slice(args);
    let exporter = Exporter::start(&all_args);
    send_requests(app_port);
    let sent = (REQUESTS.len() * ROUNDS) as f64;
    let samples = eventually(
        Duration::from_secs(20),
        || exporter.metrics(),
        // Everything counted, and the server's gauges, which the agent's
        // once-a-second upkeep makes, are in.
        |samples| {
            labelled(
                samples,
                "flask_http_request_duration_seconds_count",
                "port",
                &port,
            ) >= sent
                && samples
                    .iter()
                    .any(|s| s.name == "flask_http_workers" && s.labels.get("port") == Some(&port))
        },
    );
    count(&samples, |s| s.labels.get("port") == Some(&port))
}

fn main() {
    let venv = require_venv();
    let app = App::start_fixture(&venv, "shop_oracle", Server::GunicornSync, true, &[]);
    let ours = agent_series(app.port, &[]);
    let detailed = agent_series(
        app.port,
        &["--body-sizes", "histogram", "--queue-time-buckets"],
    );
    // Scraped after the agents' counts: the scrape is a request too.
    let theirs = http_get(app.port, "/metrics").expect("scrape prometheus-flask-exporter");
    let theirs = parse_exposition(&String::from_utf8_lossy(&theirs.body));
    let python = theirs
        .iter()
        .filter(|s| !s.name.starts_with("flask_"))
        .count();
    let theirs = count(&theirs, |s| s.name.starts_with("flask_"));
    for (who, count) in [
        ("the agent", &ours),
        ("the agent, detailed", &detailed),
        ("pfe", &theirs),
    ] {
        assert_eq!(count.combinations, REQUESTS.len(), "{who}'s combinations");
    }
    let per = |count: &Count| count.series as f64 / count.combinations as f64;
    let ratio = |count: &Count| per(count) / per(&theirs);
    println!(
        "shop under gunicorn (2 sync workers), {} (method, route, status) combinations",
        REQUESTS.len()
    );
    println!(
        "  flask-ebpf-exporter, defaults              {:>5} series  {:>5.1} per combination  {:.2}× pfe",
        ours.series,
        per(&ours),
        ratio(&ours)
    );
    println!(
        "  flask-ebpf-exporter, --body-sizes histogram --queue-time-buckets\n                                             {:>5} series  {:>5.1} per combination  {:.2}× pfe",
        detailed.series,
        per(&detailed),
        ratio(&detailed)
    );
    println!(
        "  prometheus-flask-exporter (multiprocess)   {:>5} series  {:>5.1} per combination  (+{python} of its Python process)",
        theirs.series,
        per(&theirs)
    );
    for (who, count) in [
        ("flask-ebpf-exporter, defaults", &ours),
        ("prometheus-flask-exporter", &theirs),
    ] {
        let families: Vec<String> = count
            .by_family
            .iter()
            .map(|(family, series)| format!("{family} {series}"))
            .collect();
        println!("  {who}: {}", families.join(", "));
    }
    assert!(
        ratio(&ours) <= MAX_RATIO,
        "{:.2}× prometheus-flask-exporter's series per combination, above {MAX_RATIO}",
        ratio(&ours)
    );
}
