//! Overhead benchmark: a Flask app under gunicorn `-k sync -w 2`, loaded by
//! wrk, in three variants run alternately in one invocation: bare; bare with
//! flask-ebpf-exporter attached; and instrumented with
//! prometheus-flask-exporter (multiprocess mode, as several workers need).
//! Prints throughput and CPU per request (app and exporter) and their ratios.
//!
//! `cargo xtask bench` (or `cargo bench -p flask-ebpf-exporter --bench
//! overhead -- [--rounds N] [--seconds S]`) runs 3 rounds of 5 s; under
//! `cargo test` the same code runs one round of 2 s and checks that the
//! exporter counted every request wrk completed. Root and the venv are
//! needed either way.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Bare,
    Ebpf,
    Pfe,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare",
            Variant::Ebpf => "flask-ebpf-exporter",
            Variant::Pfe => "prometheus-flask-exporter",
        }
    }
}

struct Measurement {
    requests_per_second: f64,
    app_cpu_us_per_request: f64,
    exporter_cpu_us_per_request: f64,
    /// Requests the exporter counted minus requests wrk completed.
    counted_minus_completed: Option<f64>,
}

/// User + system CPU seconds of a process and all its descendants.
fn tree_cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    let mut stack = vec![pid];
    while let Some(pid) = stack.pop() {
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(close) = stat.rfind(')')
        {
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat (11 and 12 after comm).
            let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            total += (utime + stime) / ticks;
        }
        if let Ok(children) = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            stack.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    total
}

/// (requests completed, requests per second) of a wrk run.
fn wrk(port: u16, seconds: u64) -> (f64, f64) {
    let output = Command::new("wrk")
        .args([
            "-t2",
            "-c8",
            &format!("-d{seconds}s"),
            &format!("http://127.0.0.1:{port}/items/1"),
        ])
        .output()
        .expect("wrk (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let requests = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("wrk printed no request count:\n{text}"));
    let per_second = text
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("wrk printed no Requests/sec:\n{text}"));
    (requests, per_second)
}

fn counted(exporter: &Exporter) -> f64 {
    value(&exporter.metrics(), "flask_http_request_total")
}

fn measure(venv: &std::path::Path, variant: Variant, seconds: u64) -> Measurement {
    let port = free_port();
    let multiproc_dir = tempfile::tempdir().expect("tempdir");
    let mut gunicorn = Command::new(venv.join("bin/gunicorn"));
    gunicorn
        .args(["--no-control-socket", "-k", "sync", "-w", "2", "-b"])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(workspace().join("tests/fixtures"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if variant == Variant::Pfe {
        gunicorn
            .args(["-c", "gunicorn_multiprocess.py"])
            .env("ORACLE", "multiprocess")
            .env("PROMETHEUS_MULTIPROC_DIR", multiproc_dir.path());
    }
    gunicorn.arg("app:app");
    let app = spawn_process("gunicorn", &mut gunicorn);
    wait_for_port(port, Duration::from_secs(30));
    let exporter = (variant == Variant::Ebpf)
        .then(|| Exporter::start(&["--path-label", "raw", "--port", &port.to_string()]));

    // Warm up, then measure (after the exporter has counted the warm-up).
    wrk(port, 1);
    let settled = |exporter: &Exporter| {
        std::thread::sleep(Duration::from_secs(2));
        counted(exporter)
    };
    let warm_count = exporter.as_ref().map_or(0.0, settled);
    let app_cpu_before = tree_cpu_seconds(app.child.id());
    let exporter_cpu = |e: &Exporter| tree_cpu_seconds(e.process.child.id());
    let exporter_cpu_before = exporter.as_ref().map_or(0.0, exporter_cpu);
    let (requests, requests_per_second) = wrk(port, seconds);
    let app_cpu = tree_cpu_seconds(app.child.id()) - app_cpu_before;
    let exporter_cpu_used = exporter
        .as_ref()
        .map_or(0.0, |e| exporter_cpu(e) - exporter_cpu_before);
    let counted_minus_completed = exporter
        .as_ref()
        .map(|e| settled(e) - warm_count - requests);
    Measurement {
        requests_per_second,
        app_cpu_us_per_request: app_cpu / requests * 1e6,
        exporter_cpu_us_per_request: exporter_cpu_used / requests * 1e6,
        counted_minus_completed,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|arg| arg == "--bench");
    let (mut rounds, mut seconds) = if full { (3usize, 5u64) } else { (1, 2) };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut number = || iter.next().and_then(|n| n.parse().ok());
        match arg.as_str() {
            "--rounds" => rounds = number().expect("--rounds N") as usize,
            "--seconds" => seconds = number().expect("--seconds N"),
            _ => {}
        }
    }
    let venv = require_prerequisites();
    // SAFETY: set before any thread starts; the exporters' info lines would
    // drown the table.
    unsafe { std::env::set_var("E2E_EXPORTER_LOG", "warn") };

    let variants = [Variant::Bare, Variant::Ebpf, Variant::Pfe];
    let mut results: Vec<Vec<Measurement>> = variants.iter().map(|_| Vec::new()).collect();
    println!(
        "gunicorn -k sync -w 2, wrk -t2 -c8 GET /items/1, {rounds} rounds x {seconds} s, variants alternate"
    );
    for round in 0..rounds {
        for (index, &variant) in variants.iter().enumerate() {
            let m = measure(&venv, variant, seconds);
            println!(
                "  round {} {:<27} {:>8.0} req/s  app {:>6.1} µs CPU/req  exporter {:>5.1} µs CPU/req",
                round + 1,
                variant.name(),
                m.requests_per_second,
                m.app_cpu_us_per_request,
                m.exporter_cpu_us_per_request
            );
            // wrk stops with requests in flight; their responses may still
            // count, so a few more than it completed is right.
            if let Some(difference) = m.counted_minus_completed {
                assert!(
                    (0.0..=16.0).contains(&difference),
                    "the exporter counted {difference:+} requests against what wrk completed"
                );
            }
            results[index].push(m);
        }
    }
    let summary: Vec<(f64, f64, f64)> = results
        .iter()
        .map(|runs| {
            let mut rps: Vec<f64> = runs.iter().map(|m| m.requests_per_second).collect();
            let mut app: Vec<f64> = runs.iter().map(|m| m.app_cpu_us_per_request).collect();
            let mut exporter: Vec<f64> =
                runs.iter().map(|m| m.exporter_cpu_us_per_request).collect();
            (median(&mut rps), median(&mut app), median(&mut exporter))
        })
        .collect();
    let (bare_rps, bare_app, _) = summary[0];
    println!(
        "\nmedians               req/s  vs bare   app µs/req  vs bare   exporter µs/req  total µs/req vs bare"
    );
    for (variant, (rps, app, exporter)) in variants.iter().zip(&summary) {
        println!(
            "{:<27} {:>7.0}  {:>6.3}   {:>9.1}  {:>6.3}   {:>14.1}  {:>6.3}",
            variant.name(),
            rps,
            rps / bare_rps,
            app,
            app / bare_app,
            exporter,
            (app + exporter) / bare_app
        );
    }
}
