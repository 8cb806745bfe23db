//! Route discovery against its oracle, Flask itself: the rules the agent
//! reads from each fixture app's source, without running it, must be the
//! rules Flask's url_map has once the app is built (`print_rules.py`).

use flask_ebpf_exporter_e2e as support;

use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use flask_ebpf_exporter::routes::{
    discovery::rules::SourceRules,
    discovery::worker::{DiscoveryCounters, DiscoveryWorker, Outcome},
    discovery::{
        Discovery, ParseBudget, ProcessRoot, discover,
        entrypoint::{self, ProcessStart},
        harvest_entrypoint,
        helper::HelperProgram,
    },
};
use flask_ebpf_exporter::{
    exchange::WorkloadKey,
    rules::flask::{NO_RULE, RuleMatch},
    telemetry::Budgets,
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
        executable: None,
    };
    // This process's own root: the host's filesystem.
    let tree = ProcessRoot::of(std::process::id());
    let entrypoint = entrypoint::find(&start, &|_| None).expect("entrypoint");
    harvest_entrypoint(&entrypoint, &tree, ParseBudget::default())
}

/// With Flask itself on the search path (`PYTHONPATH` naming the
/// site-packages, as a container without a venv may run it), the harvest
/// still knows `Flask` as Flask: its rules are Flask's own.
#[test]
fn flask_on_the_search_path_is_still_flask() {
    let venv = require_prerequisites();
    let site_packages = std::fs::read_dir(venv.join("lib"))
        .expect("venv lib")
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages"))
        .find(|path| path.join("flask").is_dir())
        .expect("flask in the venv");
    let start = ProcessStart {
        argv: ["python3", "-m", "gunicorn", "-k", "gthread", "app:app"]
            .map(str::to_owned)
            .to_vec(),
        environment: vec![("PYTHONPATH".to_owned(), site_packages.display().to_string())],
        cwd: workspace().join("tests/fixtures"),
        executable: None,
    };
    let tree = ProcessRoot::of(std::process::id());
    let entrypoint = entrypoint::find(&start, &|_| None).expect("entrypoint");
    let discovery = harvest_entrypoint(&entrypoint, &tree, ParseBudget::default());
    let rules: BTreeSet<String> = discovery.rules_text().lines().map(str::to_owned).collect();
    assert_eq!(
        rules,
        flask_rules(&venv, "app:app"),
        "{:?}",
        discovery.unresolved
    );
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

/// `--group-by endpoint` labels requests with the endpoint of the rule
/// read from the source: it must be Flask's `rule.endpoint` (blueprint
/// prefixes, `endpoint=`, `MethodView.as_view` names, Flask-RESTful's
/// lower-cased class names, `static`).
#[test]
fn harvested_endpoints_are_flasks_own() {
    let venv = require_prerequisites();
    for (argv, spec) in [
        ("gunicorn -w 2 app:app", "app:app"),
        ("gunicorn routes_app:app", "routes_app:app"),
        ("gunicorn -k gthread shop:create_app()", "shop:create_app()"),
        ("gunicorn slashes:lenient", "slashes:lenient"),
    ] {
        let harvested: BTreeSet<String> = discovered(argv)
            .rules
            .iter()
            .map(|rule| format!("{} {}", rule.rule, rule.endpoint))
            .collect();
        let flask: BTreeSet<String> = flask_oracle(&venv, spec, &["--endpoints"], "")
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(harvested, flask, "{argv}");
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
        let rules = SourceRules::new(discovered(&format!("gunicorn {spec}")), Default::default());
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

/// What the agent finds for a running process, from its /proc alone.
fn discovered_from_proc(server: &Running) -> Discovery {
    discover(server.child.id(), ParseBudget::default())
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        if entry.file_name() == "__pycache__" {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A venv's `lib/pythonX.Y/site-packages`.
fn site_packages_of(venv: &Path) -> std::path::PathBuf {
    std::fs::read_dir(venv.join("lib"))
        .expect("lib")
        .next()
        .expect("lib/pythonX.Y")
        .expect("entry")
        .path()
        .join("site-packages")
}

/// An app installed as a package: a venv of its own whose site-packages
/// hold `shop` (laid out as pip installs it), served by gunicorn from a
/// working directory with no source in it. The agent finds it as the
/// interpreter would, from the process's command line and executable.
#[test]
fn an_app_installed_into_site_packages_is_read_from_there() {
    let venv = require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    let app_venv = dir.path().join("app-venv");
    let made = Command::new(venv.join("bin/python"))
        .args(["-m", "venv", "--without-pip"])
        .arg(&app_venv)
        .status()
        .expect("python -m venv");
    assert!(made.success());
    let site_packages = site_packages_of(&app_venv);
    copy_tree(
        &workspace().join("tests/fixtures/shop"),
        &site_packages.join("shop"),
    );
    // Flask and gunicorn come from the test venv, as a dependency would.
    let test_site_packages = site_packages_of(&venv);
    std::fs::write(
        site_packages.join("dependencies.pth"),
        format!("{}\n", test_site_packages.display()),
    )
    .expect("pth");
    let empty = dir.path().join("srv");
    std::fs::create_dir(&empty).expect("mkdir");
    let port = free_port();
    let server = spawn_process(
        "gunicorn",
        Command::new(app_venv.join("bin/python"))
            .args(["-m", "gunicorn", "-b", &format!("127.0.0.1:{port}")])
            .arg("shop:create_app()")
            .current_dir(&empty)
            .env_remove("PYTHONPATH"),
    );
    wait_for_port(port, Duration::from_secs(20));

    let discovery = discovered_from_proc(&server);
    let rules: BTreeSet<String> = discovery.rules_text().lines().map(str::to_owned).collect();
    assert_eq!(rules, flask_rules(&venv, "shop:create_app()"));
    assert!(
        discovery.unresolved.is_empty(),
        "{:?}",
        discovery.unresolved
    );
    assert!(
        discovery
            .rules
            .iter()
            .all(|rule| rule.file.starts_with(&site_packages)),
        "rules read from elsewhere: {:?}",
        discovery.rules.iter().map(|r| &r.file).collect::<Vec<_>>()
    );
    // Flask itself sits in site-packages too, and is not read.
    assert!(discovery.files.len() <= 4, "read {:?}", discovery.files);
}

/// `flask run` finds its app in FLASK_APP or `--app`, also as
/// `python -m flask`; the agent reads the same variable and option.
#[test]
fn flask_run_is_found_by_flask_app_and_its_app_option() {
    let venv = require_prerequisites();
    for (spec, how) in [
        ("shop:create_app()", "FLASK_APP"),
        ("slashes:lenient", "--app"),
    ] {
        let port = free_port();
        let mut command = match how {
            "FLASK_APP" => {
                let mut command = Command::new(venv.join("bin/flask"));
                command.env("FLASK_APP", spec.trim_end_matches("()"));
                command.arg("run");
                command
            }
            _ => {
                let mut command = Command::new(venv.join("bin/python"));
                command.args(["-m", "flask", "--app", spec, "run"]);
                command
            }
        };
        command
            .args(["--port", &port.to_string()])
            .current_dir(workspace().join("tests/fixtures"));
        let server = spawn_process("flask run", &mut command);
        wait_for_port(port, Duration::from_secs(20));
        let discovery = discovered_from_proc(&server);
        let rules: BTreeSet<String> = discovery.rules_text().lines().map(str::to_owned).collect();
        assert_eq!(rules, flask_rules(&venv, spec), "{how}");
        assert!(
            discovery
                .entrypoint
                .as_deref()
                .is_some_and(|found| found.starts_with("flask run")),
            "{:?}",
            discovery.entrypoint
        );
    }
}

fn serve(venv: &Path, dir: &Path, spec: &str) -> Running {
    let port = free_port();
    let server = spawn_process(
        "gunicorn",
        Command::new(venv.join("bin/gunicorn"))
            .args(["-b", &format!("127.0.0.1:{port}"), spec])
            .current_dir(dir),
    );
    wait_for_port(port, Duration::from_secs(20));
    server
}

fn answer(worker: &DiscoveryWorker) -> Outcome {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, outcome)) = worker.finished().next() {
            return outcome;
        }
        assert!(std::time::Instant::now() < deadline, "no answer");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A workload's harvest is kept: a later process running the same files
/// costs a stat per file, and one started after the source changed is read
/// again, its new rule included.
#[test]
fn a_workloads_harvest_is_kept_until_a_process_runs_other_files() {
    let venv = require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    copy_tree(
        &workspace().join("tests/fixtures/shop"),
        &dir.path().join("shop"),
    );
    let registry = prometheus::Registry::new();
    let budgets = Budgets::register(&registry).expect("budgets");
    let counters = DiscoveryCounters::register(&registry, &budgets).expect("counters");
    let worker = DiscoveryWorker::start(
        HelperProgram(support::agent_binary()),
        ParseBudget::default(),
        counters.clone(),
    )
    .expect("worker");
    let workload = WorkloadKey::Server {
        process: "gunicorn".to_owned(),
        port: "8000".to_owned(),
    };
    let spec = "shop:create_app()";

    let first = serve(&venv, dir.path(), spec);
    worker.ask(workload.clone(), first.child.id());
    let Outcome::Harvested(harvest) = answer(&worker) else {
        panic!("the first process is read");
    };
    assert_eq!(
        harvest.discovery.rules.len(),
        flask_rules(&venv, spec).len()
    );
    // Compiled on the worker's thread: the matcher comes with the harvest.
    assert_eq!(harvest.set.len(), harvest.discovery.rules.len());
    drop(first);

    let same = serve(&venv, dir.path(), spec);
    worker.ask(workload.clone(), same.child.id());
    assert!(matches!(answer(&worker), Outcome::Unchanged));
    drop(same);

    // A new release: one more route in one module.
    let views = dir.path().join("shop/views.py");
    let mut source = std::fs::read_to_string(&views).expect("views");
    source.push_str(
        "\n\n@catalog.get(\"/new/<int:new_id>\")\ndef new_thing(new_id):\n    return \"new\\n\"\n",
    );
    std::fs::write(&views, source).expect("write");
    let changed = serve(&venv, dir.path(), spec);
    worker.ask(workload.clone(), changed.child.id());
    let Outcome::Harvested(again) = answer(&worker) else {
        panic!("a process running changed files is read again");
    };
    assert!(
        again
            .discovery
            .rules
            .iter()
            .any(|rule| rule.rule == "/catalog/new/<int:new_id>"),
        "{:?}",
        again.discovery.rules_text()
    );
    assert_eq!(counters.harvested.get(), 2);
    assert_eq!(counters.unchanged.get(), 1);
}
