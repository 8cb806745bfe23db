//! Route labels on the real kernel with a real Flask app of 21 rules
//! (tests/fixtures/routes_app.py) under gunicorn, driven by randomized
//! traffic (e2e/src/routes_traffic.rs):
//!
//! - with the app's rules given, every request's `path` equals Flask's
//!   `url_rule`, checked against prometheus-flask-exporter with
//!   `group_by='url_rule'` in the same app;
//! - with heuristics alone, how each rule's requests group is measured;
//! - a flood of random URLs stays under the cap;
//! - the debug endpoints show the routes and never a query string or header.

use flask_ebpf_exporter_e2e as support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use support::{
    routes_traffic::{Request, Traffic, send},
    *,
};

fn rules_file(venv: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("routes.txt");
    std::fs::write(&path, flask_oracle(venv, "routes_app:app", &[], "")).expect("write rules");
    path
}

/// (method, path, status) → requests, from an exposition's histogram.
fn by_route(samples: &[Sample], port: u16) -> BTreeMap<(String, String, String), u64> {
    let port = port.to_string();
    counts_by_route(samples, |s| s.labels.get("port").is_none_or(|p| *p == port))
}

fn scrape(port: u16) -> Vec<Sample> {
    let response = http_get(port, "/metrics").expect("scrape");
    parse_exposition(&String::from_utf8_lossy(&response.body))
}

fn debug_page(exporter: &Exporter, path: &str) -> String {
    let response = exporter.debug_page(path).expect("debug endpoint");
    assert_eq!(response.status, 200, "{path}");
    // Only on the debug listener, never beside /metrics.
    assert_eq!(
        exporter.status_of(path),
        404,
        "{path} on the metrics listener"
    );
    String::from_utf8_lossy(&response.body).into_owned()
}

#[test]
fn with_user_rules_path_is_flasks_url_rule_for_every_request() {
    let venv = require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = rules_file(&venv, dir.path());
    path_is_flasks_url_rule(
        &venv,
        &["--routes-file", rules.to_str().expect("path")],
        "user_rule",
    );
}

/// No flag at all: the rules are read from the app's source.
#[test]
fn with_no_configuration_path_is_flasks_url_rule_for_every_request() {
    let venv = require_prerequisites();
    path_is_flasks_url_rule_under(&venv, Server::GunicornGthread, &[], "source_rule");
}

/// The same under gunicorn sync's two workers (prometheus-flask-exporter in
/// its multiprocess mode sums them) and under Werkzeug's own server.
#[test]
fn with_no_configuration_under_gunicorn_sync_too() {
    let venv = require_prerequisites();
    path_is_flasks_url_rule_under(&venv, Server::GunicornSync, &[], "source_rule");
}

#[test]
fn with_no_configuration_under_werkzeug_too() {
    let venv = require_prerequisites();
    path_is_flasks_url_rule_under(&venv, Server::Werkzeug, &[], "source_rule");
}

/// Serves routes_app's traffic mix and compares every series with
/// prometheus-flask-exporter's `group_by='url_rule'` in the same app; rules
/// come from `source` (`user_rule` or `source_rule`).
fn path_is_flasks_url_rule(venv: &std::path::Path, flags: &[&str], source_of_rules: &str) {
    path_is_flasks_url_rule_under(venv, Server::GunicornGthread, flags, source_of_rules);
}

fn path_is_flasks_url_rule_under(
    venv: &std::path::Path,
    server: Server,
    flags: &[&str],
    source_of_rules: &str,
) {
    let app = App::start_fixture(venv, "routes_app", server, true, &[]);
    let port = app.port.to_string();
    let mut args = vec!["--port", port.as_str()];
    args.extend_from_slice(flags);
    let exporter = Exporter::start(&args);

    let mut traffic = Traffic::new(11);
    let mut sent = 0;
    for _ in 0..700 {
        send(app.port, &traffic.next_request());
        sent += 1;
    }
    // With group_by='url_rule' prometheus-flask-exporter names the label
    // `url_rule`; ours stays `path`.
    let mut flask_samples = scrape(app.port);
    for sample in &mut flask_samples {
        if let Some(rule) = sample.labels.remove("url_rule") {
            sample.labels.insert("path".to_owned(), rule);
        }
    }
    let mut flask = by_route(&flask_samples, app.port);
    // prometheus-flask-exporter leaves out its own /metrics.
    flask.retain(|(_, path, _), _| path != "/metrics");
    assert_eq!(flask.values().sum::<u64>(), sent);
    let ours = eventually(
        Duration::from_secs(15),
        || {
            let mut counts = by_route(&exporter.metrics(), app.port);
            counts.retain(|(_, path, _), _| path != "/metrics");
            counts
        },
        |counts| *counts == flask,
    );
    assert_eq!(ours, flask, "path labels differ from Flask's url_rule");
    let rules_seen: BTreeSet<&String> = flask.keys().map(|(_, path, _)| path).collect();
    eprintln!(
        "{server:?}: {sent} requests, {} (method, url_rule, status) series, {} url_rules incl. None: all equal to prometheus-flask-exporter's",
        flask.len(),
        rules_seen.len()
    );
    assert!(rules_seen.len() >= 21, "traffic reached {rules_seen:?}");

    // The debug view: every rule seen, named by a user rule; nothing from
    // query strings or headers.
    let routes: serde_json::Value = eventually(
        Duration::from_secs(5),
        || {
            serde_json::from_str::<serde_json::Value>(&debug_page(&exporter, "/debug/routes"))
                .expect("JSON")
        },
        |json| {
            json["workloads"][0]["routes"]
                .as_array()
                .is_some_and(|r| r.len() >= rules_seen.len())
        },
    );
    let listed = routes["workloads"][0]["routes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for route in &listed {
        let path = route["path"].as_str().unwrap_or_default();
        let source = route["source"].as_str().unwrap_or_default();
        match path {
            "None" => assert_eq!(source, "unmatched"),
            // prometheus-flask-exporter's own endpoint is not among the
            // app's rules the test gave: learned from traffic.
            "/metrics" => assert_eq!(source, "heuristic"),
            _ => assert_eq!(source, source_of_rules, "{route}"),
        }
        assert!(route["requests"].as_u64().unwrap_or(0) > 0);
        assert!(route["p50_seconds"].as_f64().is_some() && route["p99_seconds"].as_f64().is_some());
        assert!(route["first_seen"].as_f64() <= route["last_seen"].as_f64());
        let samples = route["sample_paths"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!samples.is_empty() && samples.len() <= 5, "{route}");
    }
    if source_of_rules == "source_rule" {
        // What discovery found, where, and what it could not follow.
        let found = &routes["workloads"][0]["source_rules"];
        let entrypoint = match server {
            Server::Werkzeug => "python ",
            _ => "gunicorn routes_app:app",
        };
        assert!(
            found["entrypoint"]
                .as_str()
                .is_some_and(|e| e.starts_with(entrypoint)),
            "{found}"
        );
        assert_eq!(found["rules"].as_array().map(Vec::len), Some(21), "{found}");
        assert_eq!(
            found["unresolved"].as_array().map(Vec::len),
            Some(0),
            "{found}"
        );
        let item_rule = found["rules"]
            .as_array()
            .and_then(|rules| rules.iter().find(|r| r["rule"] == "/items/<int:item_id>"))
            .cloned()
            .unwrap_or_default();
        // Where the fixture registers it.
        let line = std::fs::read_to_string(workspace().join("tests/fixtures/routes_app.py"))
            .expect("fixture")
            .lines()
            .position(|line| line.starts_with("@app.route(\"/items/<int:item_id>\""))
            .expect("the rule's line")
            + 1;
        assert!(
            item_rule["at"]
                .as_str()
                .is_some_and(|at| at.ends_with(&format!("routes_app.py:{line}"))),
            "{item_rule}"
        );
        // prometheus-flask-exporter's /metrics is registered at run time:
        // each scrape of it is a miss, named by learning (the debug page is
        // a snapshot taken once a second).
        let misses = |json: &serde_json::Value| {
            json["workloads"][0]["source_rules"]["misses"]
                .as_u64()
                .unwrap_or(0)
        };
        let later = eventually(
            Duration::from_secs(5),
            || {
                serde_json::from_str::<serde_json::Value>(&debug_page(&exporter, "/debug/routes"))
                    .expect("JSON")
            },
            |json| misses(json) >= 1,
        );
        assert!(misses(&later) >= 1, "{later}");
    }
    let items = listed
        .iter()
        .find(|route| route["path"] == "/items/<int:item_id>")
        .expect("/items/<int:item_id> listed");
    for method in ["GET", "PUT", "DELETE"] {
        assert!(
            items["methods"][method].as_u64().unwrap_or(0) > 0,
            "{items}"
        );
    }
    assert!(
        items["statuses"]["404"].as_u64().unwrap_or(0) > 0,
        "a view's own 404s keep the rule"
    );
    for page in [
        "/debug/routes",
        "/debug/routes?format=html",
        "/debug/pods",
        "/debug/pods?format=html",
        "/debug/connections",
        "/debug/connections?format=html",
    ] {
        let body = debug_page(&exporter, page);
        for secret in ["secret", "hunter2", "token=", "session=", "shop.example"] {
            assert!(!body.contains(secret), "{page} shows {secret:?}");
        }
        // Only on the debug listener: the node address carries /metrics alone.
        assert_eq!(exporter.status_of(page), 404, "{page} beside /metrics");
    }
    let html = debug_page(&exporter, "/debug/routes?format=html");
    assert!(
        html.contains("/items/&lt;int:item_id&gt;"),
        "escaped rule text in the page"
    );
    let pods: serde_json::Value =
        serde_json::from_str(&debug_page(&exporter, "/debug/pods")).expect("JSON");
    assert_eq!(pods["mode"], "local");
    assert!(
        pods["servers"].as_array().is_some_and(|servers| servers
            .iter()
            .any(|s| s["identity"]["port"].as_str() == Some(app.port.to_string().as_str()))),
        "{pods}"
    );
    // The debug pages are a snapshot taken once a second.
    let connections: serde_json::Value = eventually(
        Duration::from_secs(5),
        || serde_json::from_str(&debug_page(&exporter, "/debug/connections")).expect("JSON"),
        |connections: &serde_json::Value| connections["opened_total"].as_u64().unwrap_or(0) >= sent,
    );
    assert!(
        connections["opened_total"].as_u64().unwrap_or(0) >= sent,
        "{connections}"
    );
}

/// Which path labels a rule's requests got: counts before and after.
fn labels_of_rule(
    before: &BTreeMap<(String, String, String), u64>,
    after: &BTreeMap<(String, String, String), u64>,
) -> BTreeSet<String> {
    after
        .iter()
        .filter(|(key, count)| before.get(*key).copied().unwrap_or(0) < **count)
        .map(|((_, path, _), _)| path.clone())
        .collect()
}

#[test]
fn with_heuristics_alone_rules_group_into_templates_and_floods_stay_bounded() {
    let venv = require_prerequisites();
    let app = App::start_fixture(&venv, "routes_app", Server::GunicornGthread, false, &[]);
    let cap = 200;
    let exporter = Exporter::start(&[
        "--port",
        &app.port.to_string(),
        "--max-paths-per-workload",
        &cap.to_string(),
        "--route-discovery",
        "off",
    ]);
    let mut traffic = Traffic::new(23);
    // Only the test talks to the app: every request it sent is counted
    // once the exporter has caught up.
    let mut sent: u64 = 0;
    // Learning: what an app serves in its first minutes.
    for _ in 0..1500 {
        let rule = traffic.random_rule();
        send(app.port, &traffic.for_rule(rule));
        sent += 1;
    }
    // The per-route counts once `flask_http_request_total` (no path, so
    // never retired) has counted all `sent` requests.
    let settle = |exporter: &Exporter, sent: u64| {
        let samples = eventually(
            Duration::from_secs(20),
            || exporter.metrics(),
            |samples| value(samples, "flask_http_request_total") as u64 == sent,
        );
        assert_eq!(value(&samples, "flask_http_request_total") as u64, sent);
        // One scrape reads the histogram before the total, so it can catch a
        // request between the two; the next scrape has it in both.
        by_route(&exporter.metrics(), app.port)
    };
    let rule_names = [
        "/",
        "/health",
        "/items",
        "/items/featured",
        "/items/<int:item_id>",
        "/items/<int:item_id>/reviews",
        "/items/<int:item_id>/reviews/<int:review_id>",
        "/users/me",
        "/users/<uuid:user_id>",
        "/users/<uuid:user_id>/orders/<int:order_id>",
        "/files/<path:file_path>",
        "/files/<path:file_path>/meta",
        "/prices/<float:amount>",
        "/tags/<tag>",
        "/tags/<tag>/related",
        "/blog/<int(fixed_digits=4):year>/<slug>",
        "/docs/",
        "/search",
        "/lang/<any(en, fr, de):code>",
        "/reports/<int(min=1, max=12):month>",
    ];
    let mut templates_of_rule: Vec<BTreeSet<String>> = Vec::new();
    // Measuring: each rule's next requests, one rule at a time.
    let mut before = settle(&exporter, sent);
    for rule in 0..Traffic::RULES {
        for _ in 0..30 {
            send(app.port, &traffic.for_rule(rule));
            sent += 1;
        }
        let after = settle(&exporter, sent);
        templates_of_rule.push(labels_of_rule(&before, &after));
        before = after;
    }
    let mut rules_of_template: BTreeMap<&String, Vec<&str>> = BTreeMap::new();
    for (rule, templates) in templates_of_rule.iter().enumerate() {
        for template in templates {
            rules_of_template
                .entry(template)
                .or_default()
                .push(rule_names[rule]);
        }
    }
    eprintln!("| Flask rule | templates its requests got |\n|---|---|");
    for (rule, templates) in templates_of_rule.iter().enumerate() {
        let list: Vec<&str> = templates.iter().map(String::as_str).collect();
        eprintln!("| `{}` | `{}` |", rule_names[rule], list.join("`, `"));
    }
    let one_template = templates_of_rule.iter().filter(|t| t.len() == 1).count();
    let mixed: Vec<_> = rules_of_template
        .iter()
        .filter(|(_, rules)| rules.len() > 1)
        .collect();
    eprintln!(
        "{one_template} of {} rules map to exactly one template; templates mixing rules: {mixed:?}",
        Traffic::RULES
    );
    assert!(
        templates_of_rule.iter().all(|t| !t.is_empty()),
        "every rule counted"
    );
    // The literal values seen before a position became a parameter have no
    // series left: the template took them over.
    let exported: BTreeSet<&String> = before.keys().map(|(_, path, _)| path).collect();
    for path in &exported {
        let parameter = match path.split('/').nth(1) {
            Some("tags" | "blog") => "<string>",
            Some("files") => "<path>",
            _ => continue,
        };
        assert!(
            path.contains(parameter),
            "{path} still exported: {exported:?}"
        );
    }
    eprintln!(
        "{} path labels exported after learning: {exported:?}",
        exported.len()
    );
    assert!(
        one_template >= 17,
        "only {one_template} rules map to one template"
    );
    assert!(mixed.is_empty(), "templates mixing rules: {mixed:?}");

    // A scanner's flood of random URLs (404s) and of random tags (200s).
    for _ in 0..2000 {
        send(app.port, &traffic.random_url());
        sent += 1;
    }
    for n in 0..500 {
        send(
            app.port,
            &Request {
                method: "GET",
                target: format!("/tags/flood-{n}-{}", n * 7),
            },
        );
        sent += 1;
    }
    let after_flood = settle(&exporter, sent);
    let paths: BTreeSet<&String> = after_flood.keys().map(|(_, path, _)| path).collect();
    eprintln!(
        "after 2,500 flood requests: {} distinct path labels (cap {cap}), {} series of the request histogram",
        paths.len(),
        after_flood.len()
    );
    assert!(
        paths.len() <= cap,
        "{} paths over the cap of {cap}",
        paths.len()
    );
    assert!(
        paths.contains(&"None".to_owned()),
        "unmatched 404s collapse into None"
    );
    // `settle` checked that every request, the flood's included, was counted.
    assert_eq!(
        after_flood.values().sum::<u64>() - before.values().sum::<u64>(),
        2500,
        "the flood's requests are in the histogram too"
    );
}
