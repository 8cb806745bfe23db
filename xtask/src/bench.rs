//! Overhead benchmark: a Flask app under gunicorn `-k sync -w 2`, loaded by
//! wrk, in three variants run alternately in one invocation:
//! bare; bare with flask-ebpf-exporter attached; and instrumented with
//! prometheus-flask-exporter (multiprocess mode, as several workers need).
//! Prints throughput and CPU per request (app and exporter) and their ratios.

use std::{
    fs,
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

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
}

/// A child in its own process group, ended with the group on drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command) -> anyhow::Result<Group> {
    use std::os::unix::process::CommandExt as _;
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Group(
        command
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?,
    ))
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
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

fn wrk(port: u16, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let output = Command::new("wrk")
        .args([
            "-t2",
            "-c8",
            &format!("-d{seconds}s"),
            &format!("http://127.0.0.1:{port}/items/1"),
        ])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let requests = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .context("wrk printed no request count")?;
    let per_second = text
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("wrk printed no Requests/sec")?;
    Ok((requests, per_second))
}

fn scrape_count(port: u16, app_port: u16) -> anyhow::Result<f64> {
    use std::io::{Read as _, Write as _};
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let port_label = format!("port=\"{app_port}\"");
    Ok(text
        .lines()
        .filter(|line| line.starts_with("flask_http_request_total{") && line.contains(&port_label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn measure(
    root: &Path,
    variant: Variant,
    seconds: u64,
    round: usize,
) -> anyhow::Result<Measurement> {
    let venv = root.join(".venv");
    let fixtures = root.join("tests/fixtures");
    let port = 18_000 + round as u16 * 10 + variant as u16;
    let multiproc_dir = std::env::temp_dir().join(format!("pfe-bench-{port}"));
    let _ = fs::remove_dir_all(&multiproc_dir);
    fs::create_dir_all(&multiproc_dir)?;
    let mut gunicorn = Command::new(venv.join("bin/gunicorn"));
    gunicorn
        .args([
            "--no-control-socket",
            "-k",
            "sync",
            "-w",
            "2",
            "-b",
            &format!("127.0.0.1:{port}"),
        ])
        .current_dir(&fixtures);
    if variant == Variant::Pfe {
        gunicorn
            .args(["-c", "gunicorn_multiprocess.py"])
            .env("ORACLE", "multiprocess")
            .env("PROMETHEUS_MULTIPROC_DIR", &multiproc_dir);
    }
    gunicorn.arg("app:app");
    let app = spawn(&mut gunicorn)?;
    wait_for_port(port)?;

    let exporter_port = port + 5;
    let exporter = if variant == Variant::Ebpf {
        let binary = root.join("target/release/flask-ebpf-exporter");
        let group = spawn(Command::new(binary).args([
            "--listen",
            &format!("127.0.0.1:{exporter_port}"),
            "--path-label",
            "raw",
            "--port",
            &port.to_string(),
        ]))?;
        wait_for_port(exporter_port)?;
        // Attached once /readyz answers 200.
        std::thread::sleep(Duration::from_secs(3));
        Some(group)
    } else {
        None
    };

    // Warm up, then measure (after the exporter has counted the warm-up).
    wrk(port, 1)?;
    let warm_count = match &exporter {
        Some(_) => {
            std::thread::sleep(Duration::from_secs(2));
            scrape_count(exporter_port, port)?
        }
        None => 0.0,
    };
    let app_cpu_before = tree_cpu_seconds(app.0.id());
    let exporter_cpu_before = exporter
        .as_ref()
        .map_or(0.0, |e| tree_cpu_seconds(e.0.id()));
    let (requests, requests_per_second) = wrk(port, seconds)?;
    let app_cpu = tree_cpu_seconds(app.0.id()) - app_cpu_before;
    let exporter_cpu = exporter
        .as_ref()
        .map_or(0.0, |e| tree_cpu_seconds(e.0.id()) - exporter_cpu_before);
    if exporter.is_some() {
        std::thread::sleep(Duration::from_secs(2));
        let counted = scrape_count(exporter_port, port)? - warm_count;
        // wrk stops with requests in flight; their responses may still count.
        if (counted - requests).abs() > 16.0 {
            eprintln!("  warning: exporter counted {counted} requests, wrk completed {requests}");
        }
    }
    drop(exporter);
    drop(app);
    let _ = fs::remove_dir_all(&multiproc_dir);
    Ok(Measurement {
        requests_per_second,
        app_cpu_us_per_request: app_cpu / requests * 1e6,
        exporter_cpu_us_per_request: exporter_cpu / requests * 1e6,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn overhead(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut rounds = 3usize;
    let mut seconds = 5u64;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--rounds" => rounds = iter.next().context("--rounds N")?.parse()?,
            "--seconds" => seconds = iter.next().context("--seconds N")?.parse()?,
            other => bail!("unknown bench argument {other}"),
        }
    }
    let variants = [Variant::Bare, Variant::Ebpf, Variant::Pfe];
    let mut results: Vec<Vec<Measurement>> = variants.iter().map(|_| Vec::new()).collect();
    println!(
        "gunicorn -k sync -w 2, wrk -t2 -c8 GET /items/1, {rounds} rounds x {seconds} s, variants alternate"
    );
    for round in 0..rounds {
        for (index, &variant) in variants.iter().enumerate() {
            let m = measure(root, variant, seconds, round)?;
            println!(
                "  round {} {:<27} {:>8.0} req/s  app {:>6.1} µs CPU/req  exporter {:>5.1} µs CPU/req",
                round + 1,
                variant.name(),
                m.requests_per_second,
                m.app_cpu_us_per_request,
                m.exporter_cpu_us_per_request
            );
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
    Ok(())
}
