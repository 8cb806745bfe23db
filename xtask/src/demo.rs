//! `cargo xtask demo`: an uninstrumented Flask app (xtask/demo/shop.py)
//! under gunicorn, the agent watching it, and a little traffic; prints the
//! URLs to open and a few lines of `/metrics`, then keeps a request a second
//! flowing until Ctrl-C (or `--seconds N`).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Children killed when the demo ends, however it ends.
struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `preferred` when nothing listens there, else a free port.
fn port(preferred: u16) -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, preferred))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// One request on its own connection; the status and the body.
fn request(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .context("a status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} not ready after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The demo's traffic: the n-th request.
fn nth_request(n: u64) -> (&'static str, String) {
    match n % 10 {
        0 => ("GET", "/".to_owned()),
        1..=4 => ("GET", format!("/catalog/items/{}", n % 97)),
        5 => ("GET", "/catalog/items/500".to_owned()),
        6 => ("GET", "/catalog/search?q=tea".to_owned()),
        7 => ("POST", "/orders".to_owned()),
        8 => ("GET", "/checkout".to_owned()),
        _ => ("GET", "/no/such/page".to_owned()),
    }
}

pub(crate) fn demo(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let seconds: Option<u64> = match args {
        [] => None,
        [flag, value] if flag == "--seconds" => Some(value.parse().context("--seconds N")?),
        _ => bail!("usage: cargo xtask demo [--seconds N]"),
    };
    // The tests give the binary they built.
    let binary = match std::env::var_os("FLASK_EBPF_EXPORTER_BIN") {
        Some(binary) => PathBuf::from(binary),
        None => {
            crate::run(
                Command::new("cargo")
                    .args(["build", "--release", "-p", "flask-ebpf-exporter"])
                    .current_dir(root),
            )?;
            root.join("target/release/flask-ebpf-exporter")
        }
    };
    let (app_port, metrics_port, debug_port) = (port(8000)?, port(9810)?, port(9811)?);
    let log = root.join("target/demo-exporter.log");
    let mut running = Running(Vec::new());
    running.0.push(
        Command::new(root.join(".venv/bin/gunicorn"))
            .args(["--no-control-socket", "-w", "2", "-b"])
            .arg(format!("127.0.0.1:{app_port}"))
            .arg("shop:app")
            .current_dir(root.join("xtask/demo"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting gunicorn (cargo xtask setup makes the venv)")?,
    );
    running.0.push(
        Command::new(&binary)
            .arg(format!("--listen=127.0.0.1:{metrics_port}"))
            .arg(format!("--debug-listen=127.0.0.1:{debug_port}"))
            .arg(format!("--port={app_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("the agent's log")?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?,
    );
    wait_for("the app", Duration::from_secs(20), || {
        request(app_port, "GET", "/").is_ok()
    })?;
    wait_for(
        &format!("the agent (its log: {})", log.display()),
        Duration::from_secs(30),
        || request(metrics_port, "GET", "/readyz").is_ok_and(|(status, _)| status == 200),
    )?;
    let mut sent = 0;
    for _ in 0..100 {
        let (method, path) = nth_request(sent);
        request(app_port, method, &path)?;
        sent += 1;
    }
    // Every request counted, and the debug pages' snapshot taken.
    let counted = |body: &str| -> f64 {
        body.lines()
            .filter(|line| line.starts_with("flask_http_request_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    wait_for("the requests in /metrics", Duration::from_secs(15), || {
        request(metrics_port, "GET", "/metrics")
            .is_ok_and(|(_, body)| counted(&body) >= sent as f64)
    })?;
    thread::sleep(Duration::from_millis(1100));
    let (_, metrics) = request(metrics_port, "GET", "/metrics")?;
    println!(
        "\nflask-ebpf-exporter demo: a Flask app with no instrumentation, under gunicorn (2 workers),\n\
         and the agent capturing its requests from the kernel. {sent} requests sent, one a second more.\n\n\
         Open:\n  \
         app            http://127.0.0.1:{app_port}/catalog/items/7\n  \
         metrics        http://127.0.0.1:{metrics_port}/metrics\n  \
         routes         http://127.0.0.1:{debug_port}/debug/routes?format=html\n  \
         who serves     http://127.0.0.1:{debug_port}/debug/pods?format=html\n\n\
         A few lines of /metrics:"
    );
    let mut shown: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("flask_http_request_duration_seconds_count{")
                || line.starts_with("flask_http_request_total{")
        })
        .collect();
    shown.sort();
    for line in shown.iter().take(10) {
        println!("  {line}");
    }
    println!(
        "\nThe agent's log: {}. Ctrl-C stops the demo.",
        log.display()
    );
    let deadline = seconds.map(|seconds| Instant::now() + Duration::from_secs(seconds));
    while deadline.is_none_or(|deadline| Instant::now() < deadline) {
        thread::sleep(Duration::from_secs(1));
        let (method, path) = nth_request(sent);
        // A request refused while the app restarts is no reason to stop.
        let _ = request(app_port, method, &path);
        sent += 1;
    }
    Ok(())
}
