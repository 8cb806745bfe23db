//! Route discovery against its oracle, Flask itself: the rules the agent
//! reads from each fixture app's source, without running it, must be the
//! rules Flask's url_map has once the app is built (`print_rules.py`).

mod support;

use std::collections::BTreeSet;

use flask_ebpf_exporter::routes::{
    SourceRules,
    discovery::{
        Discovery, ParseBudget, ProcessRoot,
        entrypoint::{self, ProcessStart},
        harvest_entrypoint,
    },
    flask_rules::{NO_RULE, RuleMatch},
};
use support::*;

/// Flask's own rules of `spec` (`module:app` or `module:factory()`).
fn flask_rules(venv: &std::path::Path, spec: &str) -> BTreeSet<String> {
    flask_oracle(venv, spec, &[], "")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What the agent reads for a server started as `argv` in the fixtures.
fn harvested(argv: &str) -> (BTreeSet<String>, Vec<String>) {
    let discovery = discovered(argv);
    let rules = discovery.rules_text().lines().map(str::to_owned).collect();
    (rules, discovery.unresolved)
}

fn discovered(argv: &str) -> Discovery {
    let start = ProcessStart {
        argv: argv.split_whitespace().map(str::to_owned).collect(),
        environment: Vec::new(),
        cwd: workspace().join("tests/fixtures"),
    };
    // This process's own root: the host's filesystem.
    let tree = ProcessRoot::of(std::process::id());
    let entrypoint = entrypoint::find(&start, &|_| None).expect("entrypoint");
    harvest_entrypoint(&entrypoint, &tree, ParseBudget::default())
}

#[test]
fn harvested_rules_are_flasks_own() {
    let venv = require_prerequisites();
    for (argv, spec) in [
        ("gunicorn -w 2 app:app", "app:app"),
        ("gunicorn routes_app:app", "routes_app:app"),
        ("gunicorn -k gthread shop:create_app()", "shop:create_app()"),
        ("gunicorn slashes:app", "slashes:app"),
        ("gunicorn slashes:lenient", "slashes:lenient"),
    ] {
        let (rules, unresolved) = harvested(argv);
        assert_eq!(rules, flask_rules(&venv, spec), "{argv}");
        assert!(unresolved.is_empty(), "{argv}: {unresolved:?}");
    }
}

#[test]
fn a_script_run_directly_is_found_too() {
    let venv = require_prerequisites();
    let (rules, _) = harvested("python3 routes_app.py 8080");
    assert_eq!(rules, flask_rules(&venv, "routes_app:app"));
}

/// Slashes decide labels too: a lax rule takes a request with or without
/// its trailing slash, a strict one redirects it (no rule, `None`).
#[test]
fn trailing_slashes_are_routed_as_flask_routes_them() {
    let venv = require_prerequisites();
    for spec in ["slashes:app", "slashes:lenient"] {
        let rules = SourceRules::new(discovered(&format!("gunicorn {spec}")));
        let mut requests = String::new();
        for path in [
            "/strict",
            "/strict/",
            "/lax",
            "/lax/",
            "/bare",
            "/bare/",
            "/listing/3",
            "/listing/3/",
            "/listing/x",
            "/parts/lax",
            "/parts/lax/",
            "/parts/strict",
            "/parts/strict/",
            "/before",
            "/before/",
            "/after",
            "/after/",
            "/kept",
            "/kept/",
            "/shelf/from-blueprint",
            "/shelf/from-blueprint/",
            "/static/a.css",
            "/static/a.css/",
            "/nothing/",
        ] {
            for method in ["GET", "POST"] {
                requests.push_str(&format!("{method} {path}\n"));
            }
        }
        let flask = flask_oracle(&venv, spec, &["--match"], &requests);
        let mut lax = 0;
        for (request, expected) in requests.lines().zip(flask.lines()) {
            let (method, path) = request.split_once(' ').expect("request");
            let ours = match rules.set.match_path(path, method) {
                RuleMatch::Rule(rule) => rule,
                RuleMatch::NoRule => NO_RULE,
            };
            assert_eq!(ours, expected, "{spec}: {request}");
            if expected != NO_RULE
                && !expected.contains('<')
                && path.ends_with('/') != expected.ends_with('/')
            {
                lax += 1;
            }
        }
        assert_eq!(flask.lines().count(), requests.lines().count());
        assert!(
            lax >= 2,
            "{spec}: only {lax} requests matched across a slash"
        );
    }
}
