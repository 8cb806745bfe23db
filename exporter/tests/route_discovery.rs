//! Route discovery against its oracle, Flask itself: the rules the agent
//! reads from each fixture app's source, without running it, must be the
//! rules Flask's url_map has once the app is built (`print_rules.py`).

mod support;

use std::{collections::BTreeSet, process::Command};

use flask_ebpf_exporter::routes::discovery::{
    ParseBudget, ProcessRoot,
    entrypoint::{self, ProcessStart},
    harvest_entrypoint,
};
use support::*;

/// Flask's own rules of `spec` (`module:app` or `module:factory()`).
fn flask_rules(venv: &std::path::Path, spec: &str) -> BTreeSet<String> {
    let output = Command::new(venv.join("bin/python"))
        .arg("print_rules.py")
        .arg(spec)
        .current_dir(workspace().join("tests/fixtures"))
        .output()
        .expect("python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What the agent reads for a server started as `argv` in the fixtures.
fn harvested(argv: &str) -> (BTreeSet<String>, Vec<String>) {
    let start = ProcessStart {
        argv: argv.split_whitespace().map(str::to_owned).collect(),
        environment: Vec::new(),
        cwd: workspace().join("tests/fixtures"),
    };
    // This process's own root: the host's filesystem.
    let tree = ProcessRoot::of(std::process::id());
    let entrypoint = entrypoint::find(&start, &|_| None).expect("entrypoint");
    let discovery = harvest_entrypoint(&entrypoint, &tree, ParseBudget::default());
    let rules = discovery.rules_text().lines().map(str::to_owned).collect();
    (rules, discovery.unresolved)
}

#[test]
fn harvested_rules_are_flasks_own() {
    let venv = require_prerequisites();
    for (argv, spec) in [
        ("gunicorn -w 2 app:app", "app:app"),
        ("gunicorn routes_app:app", "routes_app:app"),
        ("gunicorn -k gthread shop:create_app()", "shop:create_app()"),
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
