//! Apps whose source is built to make route discovery run away
//! (tests/fixtures/hostile/), each served by real gunicorn beside a
//! well-behaved app, with the real agent in local mode on the real kernel.
//! Route discovery parses each in a helper process with bounds of its own:
//! the agent stays up and small, a harvest that fails is counted and its
//! app's routes are learned from traffic, and the well-behaved app keeps
//! Flask's own rule text with exact counts.

use flask_ebpf_exporter_e2e as support;

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use support::*;

/// What becomes of each hostile app's routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expected {
    /// Its rule text, read from its source up to the bound it hit.
    RuleText,
    /// No rule from its source: the template learned from its traffic.
    Learned,
}

/// Each fixture, the gunicorn app it serves, and what its routes become.
const HOSTILE: [(&str, &str, Expected); 9] = [
    ("self_blueprint", "app", Expected::RuleText),
    ("blueprint_cycle", "app", Expected::RuleText),
    ("blueprint_explosion", "app", Expected::RuleText),
    ("deep_sum", "app", Expected::RuleText),
    ("deep_import", "app", Expected::RuleText),
    ("string_doubling", "app", Expected::RuleText),
    ("fifo_import", "app", Expected::RuleText),
    // The factory runs out of time before it returns its app.
    ("nested_calls", "create_app()", Expected::Learned),
    // Its helper copies hundreds of MiB at every call: it runs out of
    // memory or time, and is counted either way.
    ("memory_hog", "create_app()", Expected::Learned),
];

/// The agent's resident memory after all of it, at most (it starts near
/// 40 MiB; the harvests' memory is the helpers').
const RSS_BOUND_KIB: u64 = 150 * 1024;

fn serve(venv: &Path, dir: &Path, module: &str, app: &str) -> (Running, u16) {
    let port = free_port();
    let server = spawn_process(
        module,
        Command::new(venv.join("bin/gunicorn"))
            .args(["--no-control-socket", "-w", "1", "-b"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("{module}:{app}"))
            .current_dir(dir),
    );
    wait_for_port(port, Duration::from_secs(20));
    (server, port)
}

/// Requests counted per path label, for one server's port.
fn paths_for(samples: &[Sample], port: u16) -> BTreeMap<String, f64> {
    let port = port.to_string();
    let mut paths = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .filter(|s| s.labels.get("port") == Some(&port))
    {
        let path = sample.labels.get("path").cloned().unwrap_or_default();
        *paths.entry(path).or_insert(0.0) += sample.value;
    }
    paths
}

#[test]
fn no_source_an_app_holds_takes_the_agent_down() {
    let venv = require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    for (module, _, _) in HOSTILE {
        std::fs::copy(
            workspace().join(format!("tests/fixtures/hostile/{module}.py")),
            dir.path().join(format!("{module}.py")),
        )
        .expect("copy fixture");
    }
    // Git keeps no FIFOs: the one fifo_import names is made here.
    let fifo = std::ffi::CString::new(
        dir.path()
            .join("fifo_module.py")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

    let exporter = Exporter::start(&[]);
    let rss_before = rss_kib(exporter.process.child.id());
    let good = App::start(&venv, Server::GunicornSync, false);
    let hostile: Vec<(&str, Expected, Running, u16)> = HOSTILE
        .iter()
        .map(|&(module, app, expected)| {
            let (server, port) = serve(&venv, dir.path(), module, app);
            (module, expected, server, port)
        })
        .collect();

    let started = Instant::now();
    for (_, _, _, port) in &hostile {
        for n in 1..=12 {
            let response = http_get(*port, &format!("/things/{n}")).expect("request");
            assert_eq!(response.status, 200);
        }
    }
    for n in 1..=10 {
        assert_eq!(
            http_get(good.port, &format!("/items/{n}"))
                .expect("get")
                .status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(http_get(good.port, "/missing").expect("get").status, 404);
    }

    let gave_up = |samples: &[Sample]| {
        ["failed", "timed_out"]
            .iter()
            .map(|outcome| {
                labelled(
                    samples,
                    "flask_ebpf_exporter_route_discovery_processes_total",
                    "outcome",
                    outcome,
                )
            })
            .sum::<f64>()
    };
    let parse_budget_spent = |samples: &[Sample]| {
        labelled(
            samples,
            "flask_ebpf_exporter_budget_exhausted_total",
            "budget",
            "route_discovery_parse",
        )
    };
    let all_counted = |samples: &Vec<Sample>| {
        hostile
            .iter()
            .all(|(_, _, _, port)| paths_for(samples, *port).values().sum::<f64>() == 12.0)
            && paths_for(samples, good.port).values().sum::<f64>() == 12.0
            && gave_up(samples) + parse_budget_spent(samples) >= 2.0
    };
    let samples = eventually(Duration::from_secs(60), || exporter.metrics(), all_counted);
    println!(
        "every request counted {:?} after the traffic began",
        started.elapsed()
    );
    assert_eq!(
        http_get(exporter.port, "/healthz").expect("healthz").status,
        200
    );

    for (module, expected, _, port) in &hostile {
        let paths = paths_for(&samples, *port);
        let wanted = match expected {
            Expected::RuleText => "/things/<int:thing_id>",
            Expected::Learned => "/things/<int>",
        };
        assert_eq!(
            paths,
            BTreeMap::from([(wanted.to_owned(), 12.0)]),
            "{module}: its requests under {wanted}"
        );
    }
    assert_eq!(
        paths_for(&samples, good.port),
        BTreeMap::from([
            ("/items/<int:item_id>".to_owned(), 10.0),
            ("None".to_owned(), 2.0)
        ]),
        "the well-behaved app keeps Flask's own rule text, counted exactly"
    );

    let outcome = |name: &str| {
        labelled(
            &samples,
            "flask_ebpf_exporter_route_discovery_processes_total",
            "outcome",
            name,
        )
    };
    println!(
        "route discovery: harvested {}, unchanged {}, failed {}, timed_out {}, not_retried {}",
        outcome("harvested"),
        outcome("unchanged"),
        outcome("failed"),
        outcome("timed_out"),
        outcome("not_retried")
    );
    // nested_calls runs out of its parse time in the helper. memory_hog
    // runs out of memory, or of time first on a fast machine (the helper
    // killed, or its harvest cut at the budget): counted either way.
    assert!(
        parse_budget_spent(&samples) >= 1.0,
        "nested_calls ran out of time, counted"
    );
    assert!(
        gave_up(&samples) + parse_budget_spent(&samples) >= 2.0,
        "memory_hog's helper died, was killed or ran out of time, counted"
    );
    // Each well-behaved or bounded app harvested once, its workers after
    // it unchanged.
    assert!(outcome("harvested") + gave_up(&samples) >= 10.0);

    let rss_after = rss_kib(exporter.process.child.id());
    println!("agent RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(rss_after < RSS_BOUND_KIB, "agent RSS {rss_after} KiB");
    drop(hostile);
    drop(good);
}
