//! What reading an app's rules from its source costs: a generated Flask app
//! of 2,000 rules in 200 files (a factory registering 199 blueprint
//! modules of 10 rules each: decorators with converters and methods,
//! f-strings of a package constant, `add_url_rule` with a `MethodView`),
//! harvested in this process and as the agent does, in a helper process
//! started for it (served by a real gunicorn, whose /proc the helper
//! starts from), side by side with Python importing the same app and
//! building its url_map. Prints harvest time, peak heap and what the result
//! keeps, and checks the rules equal Flask's own.
//!
//! `cargo bench -p flask-ebpf-exporter-e2e --bench route_discovery` harvests 20
//! times; under `cargo test` a 20-file app once, as a check (the venv is
//! needed either way, for Flask's side).

use flask_ebpf_exporter_e2e as support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use flask_ebpf_exporter::routes::discovery::{
    ParseBudget, ProcessRoot,
    entrypoint::{AppObject, AppSource, Entrypoint},
    harvest_entrypoint,
    helper::{self, HelperOutcome, HelperProgram},
    rules::SourceRules,
};
use support::*;

/// Tracks heap bytes in use and their peak, so a harvest's can be shown.
struct PeakAllocator;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting beside it does not allocate.
unsafe impl GlobalAlloc for PeakAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller upholds GlobalAlloc\'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds GlobalAlloc\'s contract, passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        grew(new_size);
        // SAFETY: the caller upholds GlobalAlloc\'s contract, passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: PeakAllocator = PeakAllocator;

const RULES_PER_MODULE: usize = 10;

/// Writes package `big` into `dir`: `modules` blueprint modules and an
/// `__init__.py` with the factory and nine rules of its own (with the
/// static rule, ten). Returns the number of rules Flask will have.
fn generate(dir: &Path, modules: usize) -> usize {
    let package = dir.join("big");
    std::fs::create_dir_all(&package).expect("mkdir");
    for n in 1..=modules {
        let mut module = String::new();
        let _ = write!(
            module,
            r#""""Section {n}: its own blueprint, prefix given at registration."""

from flask import Blueprint, abort
from flask.views import MethodView

from . import API

PREFIX = "/s{n}"
bp = Blueprint("section{n}", __name__)


@bp.get("/")
def index():
    return "section {n}"


@bp.get("/items/<int:item_id>")
def item(item_id):
    if item_id > 1000:
        abort(404)
    return "item"


@bp.route("/items/<int:item_id>/reviews", methods=["GET", "POST"])
def reviews(item_id):
    return "reviews"


@bp.get("/users/<uuid:user_id>")
def user(user_id):
    return "user"


@bp.get("/files/<path:name>")
def files(name):
    return "file"


@bp.post(f"{{API}}/orders")
def create_order():
    return "created", 201


@bp.route(f"{{API}}/orders/<int:order_id>", methods=["GET", "PUT", "DELETE"])
def order(order_id):
    return "order"


@bp.get("/prices/<float:amount>")
def price(amount):
    return "price"


@bp.get("/tags/<slug>/", strict_slashes=False)
def tag(slug):
    return "tag"


class Things(MethodView):
    def get(self, thing):
        return "thing"

    def patch(self, thing):
        return "patched"


bp.add_url_rule("/things/<thing>", view_func=Things.as_view("things"))
"#
        );
        std::fs::write(package.join(format!("section_{n:03}.py")), module).expect("write module");
    }
    let mut init = String::from(
        "\"\"\"A generated app: a factory registering every section's blueprint.\"\"\"\n\nfrom flask import Flask\n\nAPI = \"/api/v2\"\n\n\ndef create_app():\n    app = Flask(__name__)\n",
    );
    for n in 1..=modules {
        let _ = writeln!(init, "    from . import section_{n:03}");
        let _ = writeln!(
            init,
            "    app.register_blueprint(section_{n:03}.bp, url_prefix=section_{n:03}.PREFIX)"
        );
    }
    for n in 1..=9 {
        let _ = write!(
            init,
            "\n    @app.get(\"/top/{n}/<int:id>\")\n    def top_{n}(id):\n        return \"top\"\n"
        );
    }
    init.push_str("\n    return app\n");
    std::fs::write(package.join("__init__.py"), init).expect("write __init__");
    modules * RULES_PER_MODULE + 10
}

/// Flask's rules of the generated app, and how long Python takes to import
/// it and build its url_map.
fn flask_side(venv: &Path, dir: &Path) -> (BTreeSet<String>, Duration) {
    let rules = Command::new(venv.join("bin/python"))
        .arg("print_rules.py")
        .arg("big:create_app()")
        .current_dir(workspace().join("tests/fixtures"))
        .env("PYTHONPATH", dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python");
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stderr)
    );
    let timed = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import time; t = time.perf_counter(); import big; big.create_app(); print(time.perf_counter() - t)",
        ])
        .env("PYTHONPATH", dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python");
    let seconds: f64 = String::from_utf8_lossy(&timed.stdout)
        .trim()
        .parse()
        .expect("seconds");
    (
        String::from_utf8_lossy(&rules.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        Duration::from_secs_f64(seconds),
    )
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let venv = require_prerequisites();
    let (modules, rounds) = if full { (199, 20) } else { (19, 1) };
    let dir = tempfile::tempdir().expect("tempdir");
    let expected_rules = generate(dir.path(), modules);
    let entrypoint = Entrypoint {
        server: "gunicorn",
        source: AppSource::Module("big".to_owned()),
        object: AppObject::Factory("create_app".to_owned()),
        search_path: vec![PathBuf::from(dir.path())],
        site_packages: Vec::new(),
    };
    let tree = ProcessRoot::of(std::process::id());
    let source_bytes: u64 = std::fs::read_dir(dir.path().join("big"))
        .expect("package")
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();

    let mut times = Vec::new();
    let mut peaks = Vec::new();
    let mut kept = 0;
    let mut last = None;
    for _ in 0..rounds {
        // The previous round's result goes first: each starts from the same heap.
        drop(last.take());
        let before = IN_USE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let started = Instant::now();
        let discovery = harvest_entrypoint(&entrypoint, &tree, ParseBudget::default());
        times.push(started.elapsed());
        peaks.push(PEAK.load(Ordering::Relaxed) - before);
        kept = IN_USE.load(Ordering::Relaxed).saturating_sub(before);
        last = Some(discovery);
    }
    let Some(discovery) = last else {
        return;
    };
    assert!(
        discovery.unresolved.is_empty(),
        "{:?}",
        discovery.unresolved
    );
    let harvested: BTreeSet<String> = discovery.rules_text().lines().map(str::to_owned).collect();
    let (flask, python_import) = flask_side(&venv, dir.path());
    assert_eq!(discovery.rules.len(), expected_rules);
    assert_eq!(harvested, flask, "the harvest differs from Flask's url_map");
    let in_helper = helper_times(&venv, dir.path(), rounds, &harvested);
    // Compiling the harvest into a matcher, on the worker's thread.
    let mut compile_times = Vec::new();
    let mut regex_bytes = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let rules = SourceRules::new(discovery.clone(), Default::default());
        compile_times.push(started.elapsed());
        assert_eq!(rules.set.len(), discovery.rules.len());
        regex_bytes = rules.set.regex_bytes();
    }
    compile_times.sort();

    times.sort();
    peaks.sort();
    let median = times[times.len() / 2];
    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    println!(
        "route discovery: {} rules in {} files ({:.1} KiB of source), equal to Flask's url_map",
        discovery.rules.len(),
        discovery.files.len(),
        source_bytes as f64 / 1024.0
    );
    println!(
        "  harvest: median {:.1} ms, min {:.1} ms, max {:.1} ms over {rounds} rounds ({:.1} µs per rule)",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e6 / discovery.rules.len() as f64
    );
    println!(
        "  in a helper process, its start included: median {:.1} ms, min {:.1} ms, max {:.1} ms (helper / in-process = {:.2})",
        in_helper[in_helper.len() / 2].as_secs_f64() * 1e3,
        in_helper[0].as_secs_f64() * 1e3,
        in_helper[in_helper.len() - 1].as_secs_f64() * 1e3,
        in_helper[in_helper.len() / 2].as_secs_f64() / median.as_secs_f64()
    );
    println!(
        "  compiled into a matcher: median {:.1} ms, {:.0} KiB of compiled regex",
        compile_times[compile_times.len() / 2].as_secs_f64() * 1e3,
        regex_bytes as f64 / 1024.0
    );
    println!(
        "  heap: peak {:.1} MiB during a harvest, {:.2} MiB kept by its result",
        mib(peaks[peaks.len() / 2]),
        mib(kept)
    );
    println!(
        "  beside it, Python importing the app and building its url_map: {:.1} ms (harvest / import = {:.2})",
        python_import.as_secs_f64() * 1e3,
        median.as_secs_f64() / python_import.as_secs_f64()
    );
    let budget = ParseBudget::default();
    println!(
        "  within the default budget: {} of {} files, {:.2} of {} MiB, {:.0} ms of {} s",
        discovery.files.len(),
        budget.files,
        source_bytes as f64 / (1024.0 * 1024.0),
        budget.bytes / (1024 * 1024),
        median.as_secs_f64() * 1e3,
        budget.time.as_secs()
    );
}

/// Harvest times in a helper process, as the agent runs it, of the app
/// served by a real gunicorn from `dir`; sorted. Each answer must equal
/// `expected`.
fn helper_times(
    venv: &Path,
    dir: &Path,
    rounds: usize,
    expected: &BTreeSet<String>,
) -> Vec<Duration> {
    let port = free_port();
    let server = spawn_process(
        "gunicorn",
        Command::new(venv.join("bin/gunicorn"))
            .args(["--no-control-socket", "-w", "1", "-b"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("big:create_app()")
            .current_dir(dir),
    );
    wait_for_port(port, Duration::from_secs(30));
    let program = HelperProgram(support::agent_binary());
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            let outcome =
                helper::harvest(&program, server.child.id(), None, ParseBudget::default());
            let took = started.elapsed();
            let HelperOutcome::Harvested(discovery) = outcome else {
                panic!("the helper did not harvest: {outcome:?}");
            };
            let rules: BTreeSet<String> =
                discovery.rules_text().lines().map(str::to_owned).collect();
            assert_eq!(&rules, expected, "the helper's rules differ");
            took
        })
        .collect();
    times.sort();
    times
}
