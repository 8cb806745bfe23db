//! Overhead benchmark: a Flask app under gunicorn `-k sync -w 2`, loaded by
//! wrk, in three variants run alternately in one invocation: bare; bare with
//! flask-ebpf-exporter attached; and instrumented with
//! prometheus-flask-exporter (multiprocess mode, as several workers need).
//! Prints throughput and CPU per request (app and exporter) and their ratios,
//! the kernel programs' run time per request (`BPF_ENABLE_STATS`, program by
//! program), and the events and bytes the kernel handed over per request.
//! Two more variants put a floor under the kernel side: do-nothing
//! programs attached where the agent's are, and on raw `sys_enter`/
//! `sys_exit` (the raw-tracepoint alternative): what any program on those
//! hooks costs, before it does anything.
//! Then a non-HTTP neighbour: redis-server under redis-benchmark, bare,
//! with the agent attached (default flags, as a user runs it), and beside
//! the do-nothing programs, alternated: its throughput, its own CPU per
//! operation, and what the kernel side ran and read per operation.
//!
//! `cargo xtask bench` (or `cargo bench -p flask-ebpf-exporter-e2e --bench
//! overhead -- [--rounds N] [--seconds S]`) runs 3 rounds of 5 s; under
//! `cargo test` the same code runs one round of 2 s and checks that the
//! exporter counted every request wrk completed. Root and the venv are
//! needed either way.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use flask_ebpf_exporter::capture::FLOOR_OBJECT;
use flask_ebpf_exporter_e2e as support;
use support::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Bare,
    Ebpf,
    Pfe,
    /// Bare, with do-nothing programs on the agent's tracepoints.
    FloorTracepoints,
    /// Bare, with a do-nothing program on raw sys_enter and sys_exit.
    FloorRaw,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare",
            Variant::Ebpf => "flask-ebpf-exporter",
            Variant::Pfe => "prometheus-flask-exporter",
            Variant::FloorTracepoints => "empty progs, agent's hooks",
            Variant::FloorRaw => "empty prog, raw sys_*",
        }
    }
}

/// Loads and attaches the do-nothing program of a floor variant; it stays
/// attached while the returned object lives.
fn attach_floor(variant: Variant) -> Option<aya::Ebpf> {
    use aya::programs::{RawTracePoint, TracePoint};
    let mut ebpf = match variant {
        Variant::FloorTracepoints | Variant::FloorRaw => {
            aya::Ebpf::load(FLOOR_OBJECT).expect("loading the floor programs")
        }
        _ => return None,
    };
    if variant == Variant::FloorTracepoints {
        let program: &mut TracePoint = ebpf
            .program_mut("empty_tracepoint")
            .and_then(|program| program.try_into().ok())
            .expect("empty_tracepoint");
        program.load().expect("loading empty_tracepoint");
        for (_, category, tracepoints) in flask_ebpf_exporter::capture::ATTACHMENTS {
            for tracepoint in *tracepoints {
                program.attach(category, tracepoint).expect("attaching");
            }
        }
    } else {
        let program: &mut RawTracePoint = ebpf
            .program_mut("empty_raw_tracepoint")
            .and_then(|program| program.try_into().ok())
            .expect("empty_raw_tracepoint");
        program.load().expect("loading empty_raw_tracepoint");
        for tracepoint in ["sys_enter", "sys_exit"] {
            program.attach(tracepoint).expect("attaching");
        }
    }
    Some(ebpf)
}

struct Measurement {
    requests_per_second: f64,
    app_cpu_us_per_request: f64,
    exporter_cpu_us_per_request: f64,
    /// Requests the exporter counted minus requests wrk completed.
    counted_minus_completed: Option<f64>,
    /// What the agent's kernel side and ring buffer cost per request.
    kernel: Option<KernelCost>,
}

/// The agent's kernel-side work per unit of load (request or operation).
#[derive(Default)]
struct KernelCost {
    /// Program name → (runs, run time in ns) per unit.
    programs: BTreeMap<String, (f64, f64)>,
    events: f64,
    bytes: f64,
}

impl KernelCost {
    fn bpf_ns(&self) -> f64 {
        self.programs.values().map(|(_, ns)| ns).sum()
    }
}

/// Run count and run time (ns) of each BPF program a process holds, by
/// name. Run time is kept only while BPF stats are enabled.
fn bpf_program_stats(pid: u32) -> BTreeMap<String, (u64, u64)> {
    // A process's programs are the `prog_id:` lines of its fds' fdinfo.
    let mut ids = BTreeSet::new();
    if let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for entry in entries.flatten() {
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            ids.extend(text.lines().find_map(|line| {
                line.strip_prefix("prog_id:")
                    .and_then(|id| id.trim().parse::<u32>().ok())
            }));
        }
    }
    let mut stats = BTreeMap::new();
    for program in aya::programs::loaded_programs().flatten() {
        if ids.contains(&program.id()) {
            let name = program.name_as_str().unwrap_or("?").to_owned();
            let entry: &mut (u64, u64) = stats.entry(name).or_default();
            entry.0 += program.run_count();
            entry.1 += program.run_time().as_nanos() as u64;
        }
    }
    stats
}

/// A snapshot of the agent's counters of kernel-side work.
struct KernelSnapshot {
    programs: BTreeMap<String, (u64, u64)>,
    events: f64,
    bytes: f64,
}

impl KernelSnapshot {
    fn take(exporter: &Exporter) -> KernelSnapshot {
        let samples = exporter.metrics();
        KernelSnapshot {
            programs: bpf_program_stats(exporter.process.child.id()),
            events: value(&samples, "flask_ebpf_exporter_events_read_total"),
            bytes: value(&samples, "flask_ebpf_exporter_event_bytes_read_total"),
        }
    }

    /// The programs this process holds (the floor variants'), which read
    /// no events.
    fn take_own() -> KernelSnapshot {
        KernelSnapshot {
            programs: bpf_program_stats(std::process::id()),
            events: 0.0,
            bytes: 0.0,
        }
    }

    /// What happened since `before`, per unit of `load`.
    fn since(&self, before: &KernelSnapshot, load: f64) -> KernelCost {
        let programs = self
            .programs
            .iter()
            .map(|(name, (runs, ns))| {
                let (runs_before, ns_before) =
                    before.programs.get(name).copied().unwrap_or_default();
                let per_unit = |now: u64, then: u64| now.saturating_sub(then) as f64 / load;
                (
                    name.clone(),
                    (per_unit(*runs, runs_before), per_unit(*ns, ns_before)),
                )
            })
            .collect();
        KernelCost {
            programs,
            events: (self.events - before.events) / load,
            bytes: (self.bytes - before.bytes) / load,
        }
    }
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
    let floor = attach_floor(variant);

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
    let snapshot = || match (&exporter, &floor) {
        (Some(exporter), _) => Some(KernelSnapshot::take(exporter)),
        (None, Some(_)) => Some(KernelSnapshot::take_own()),
        (None, None) => None,
    };
    let kernel_before = snapshot();
    let (requests, requests_per_second) = wrk(port, seconds);
    let app_cpu = tree_cpu_seconds(app.child.id()) - app_cpu_before;
    let exporter_cpu_used = exporter
        .as_ref()
        .map_or(0.0, |e| exporter_cpu(e) - exporter_cpu_before);
    let counted_minus_completed = exporter
        .as_ref()
        .map(|e| settled(e) - warm_count - requests);
    let kernel = snapshot()
        .zip(kernel_before)
        .map(|(after, before)| after.since(&before, requests));
    drop(floor);
    Measurement {
        requests_per_second,
        app_cpu_us_per_request: app_cpu / requests * 1e6,
        exporter_cpu_us_per_request: exporter_cpu_used / requests * 1e6,
        counted_minus_completed,
        kernel,
    }
}

/// (operations completed, operations per second) of a redis-benchmark run
/// of GET and SET with 20 clients.
fn redis_benchmark(port: u16, operations: u64) -> (f64, f64) {
    let output = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "get,set", "-c", "20", "-q"])
        .args(["-n", &operations.to_string()])
        .output()
        .expect("redis-benchmark (cargo xtask setup installs redis-tools)");
    let text = String::from_utf8_lossy(&output.stdout);
    // Lines such as "SET: 81037.28 requests per second, p50=0.135 msec";
    // progress updates before them end in a carriage return.
    let rates: Vec<f64> = text
        .split(['\r', '\n'])
        .filter_map(|line| {
            let (_, rest) = line.split_once(": ")?;
            rest.split_once(" requests per second")?
                .0
                .trim()
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(rates.len(), 2, "redis-benchmark printed:\n{text}");
    // Both tests run `operations` each; the rate of the two together is the
    // harmonic combination of theirs.
    let seconds: f64 = rates.iter().map(|rate| operations as f64 / rate).sum();
    let total = 2.0 * operations as f64;
    (total, total / seconds)
}

/// Redis, a neighbour that is no HTTP server: bare, beside the agent, or
/// beside the do-nothing programs on the agent's tracepoints.
/// Returns (operations per second, redis-server's CPU µs per operation,
/// the kernel side's cost).
fn measure_redis(variant: Variant, operations: u64) -> (f64, f64, Option<KernelCost>) {
    let port = free_port();
    let mut redis = Command::new("redis-server");
    redis
        // Both loopbacks, as Redis's default configuration binds.
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "-::1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let redis = spawn_process("redis-server", &mut redis);
    wait_for_port(port, Duration::from_secs(10));
    // Default flags: the agent follows the whole node, as a user runs it.
    let exporter = (variant == Variant::Ebpf).then(|| Exporter::start(&[]));
    let floor = attach_floor(variant);
    let snapshot = || match (&exporter, &floor) {
        (Some(exporter), _) => Some(KernelSnapshot::take(exporter)),
        (None, Some(_)) => Some(KernelSnapshot::take_own()),
        (None, None) => None,
    };
    // Warm up: the agent sees the listener's first connections.
    redis_benchmark(port, operations / 10);
    let before = snapshot();
    let cpu_before = tree_cpu_seconds(redis.child.id());
    let (completed, per_second) = redis_benchmark(port, operations);
    let cpu = tree_cpu_seconds(redis.child.id()) - cpu_before;
    let cost = snapshot()
        .zip(before)
        .map(|(after, before)| after.since(&before, completed));
    (per_second, cpu / completed * 1e6, cost)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// A ratio to bare taken round by round (each variant beside the bare run
/// of its own round, which cancels the machine's slower drifts): the mean,
/// the half-width of its 95 % interval, and how many rounds would bring
/// that half-width to ±1 %. ("–" with a single round.)
fn paired_ratio(values: &[f64], bare: &[f64]) -> String {
    let ratios: Vec<f64> = values.iter().zip(bare).map(|(v, b)| v / b).collect();
    let n = ratios.len() as f64;
    let mean = ratios.iter().sum::<f64>() / n;
    if ratios.len() < 2 {
        return format!("{mean:.3}");
    }
    let variance = ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let half_width = 1.96 * (variance / n).sqrt();
    let rounds_for_one_percent = (n * (half_width / 0.01).powi(2)).ceil().max(1.0);
    format!("{mean:.3} ±{half_width:.3} (±1 % needs ≈ {rounds_for_one_percent:.0} rounds)")
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
    // The kernel keeps programs' run time while this fd is open (it adds
    // ≈ 20 ns to each run of the agent's programs, and nothing elsewhere).
    let _bpf_stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (root)");

    let variants = [
        Variant::Bare,
        Variant::Ebpf,
        Variant::Pfe,
        Variant::FloorTracepoints,
        Variant::FloorRaw,
    ];
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
    println!("\npaired per round, mean vs bare ±95 %: req/s; app µs/req");
    let per_round = |index: usize, f: &dyn Fn(&Measurement) -> f64| -> Vec<f64> {
        results[index].iter().map(f).collect()
    };
    for (index, variant) in variants.iter().enumerate().skip(1) {
        println!(
            "{:<27} {};  {}",
            variant.name(),
            paired_ratio(
                &per_round(index, &|m| m.requests_per_second),
                &per_round(0, &|m| m.requests_per_second)
            ),
            paired_ratio(
                &per_round(index, &|m| m.app_cpu_us_per_request),
                &per_round(0, &|m| m.app_cpu_us_per_request)
            ),
        );
    }
    for (variant, runs) in variants.iter().zip(&results) {
        let costs: Vec<&KernelCost> = runs.iter().filter_map(|m| m.kernel.as_ref()).collect();
        print_kernel_cost(variant.name(), "per Flask request", &costs);
    }

    // The neighbour: as many operations per round as take about `seconds`.
    let operations = if full { 40_000 * seconds } else { 10_000 };
    println!(
        "\nredis-server, redis-benchmark -t get,set -c 20 -n {operations}, {rounds} rounds, variants alternate"
    );
    let redis_variants = [Variant::Bare, Variant::Ebpf, Variant::FloorTracepoints];
    let mut ops: Vec<Vec<f64>> = redis_variants.iter().map(|_| Vec::new()).collect();
    let mut cpu: Vec<Vec<f64>> = redis_variants.iter().map(|_| Vec::new()).collect();
    let mut costs: Vec<Vec<KernelCost>> = redis_variants.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let mut line = format!("  round {}", round + 1);
        for (index, &variant) in redis_variants.iter().enumerate() {
            let (per_second, cpu_per_op, cost) = measure_redis(variant, operations);
            line += &format!(
                "  {} {per_second:>6.0} ops/s {cpu_per_op:>5.2} µs CPU/op",
                variant.name()
            );
            ops[index].push(per_second);
            cpu[index].push(cpu_per_op);
            costs[index].extend(cost);
        }
        println!("{line}");
    }
    println!("paired per round, mean vs bare ±95 %: ops/s; redis-server µs/op");
    for (index, variant) in redis_variants.iter().enumerate().skip(1) {
        println!(
            "{:<27} {};  {}",
            variant.name(),
            paired_ratio(&ops[index], &ops[0]),
            paired_ratio(&cpu[index], &cpu[0])
        );
    }
    let medians: Vec<f64> = ops.iter_mut().map(|runs| median(runs)).collect();
    let cpu_medians: Vec<f64> = cpu.iter_mut().map(|runs| median(runs)).collect();
    for ((variant, per_second), cpu_per_op) in redis_variants.iter().zip(&medians).zip(&cpu_medians)
    {
        println!(
            "median {:<27} {per_second:>8.0} ops/s  {:.3}× of bare   redis-server {cpu_per_op:.2} µs CPU/op  {:.3}× of bare",
            variant.name(),
            per_second / medians[0],
            cpu_per_op / cpu_medians[0]
        );
    }
    for (variant, runs) in redis_variants.iter().zip(&costs) {
        print_kernel_cost(
            variant.name(),
            "per Redis operation",
            &runs.iter().collect::<Vec<_>>(),
        );
    }
}

/// Medians over rounds of the agent's kernel-side work per unit of load,
/// program by program.
fn print_kernel_cost(who: &str, unit: &str, runs: &[&KernelCost]) {
    if runs.is_empty() {
        return;
    }
    let median_of = |f: &dyn Fn(&KernelCost) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(|cost| f(cost)).collect();
        median(&mut values)
    };
    println!(
        "\n{who}: kernel side {unit} (medians): BPF {:.0} ns, {:.2} events, {:.0} event bytes",
        median_of(&KernelCost::bpf_ns),
        median_of(&|cost| cost.events),
        median_of(&|cost| cost.bytes)
    );
    println!("  program               runs  ns/run   ns");
    let names: BTreeSet<&String> = runs.iter().flat_map(|cost| cost.programs.keys()).collect();
    for name in names {
        let runs_per_unit = median_of(&|cost| cost.programs.get(name).map_or(0.0, |p| p.0));
        let ns_per_unit = median_of(&|cost| cost.programs.get(name).map_or(0.0, |p| p.1));
        if runs_per_unit == 0.0 {
            continue;
        }
        println!(
            "  {name:<18} {runs_per_unit:>7.2}  {:>6.0}  {ns_per_unit:>5.0}",
            ns_per_unit / runs_per_unit
        );
    }
}
