//! Shared parts of the end-to-end tests and benchmarks: the real exporter
//! binary, real Flask apps under real servers, a raw HTTP/1.1 client (so
//! tests control keep-alive, pipelining and 100-continue byte for byte),
//! and a reader of the Prometheus text format. README.md says how to run
//! and write them.

pub mod cgroups;
pub mod containers;
pub mod daemonset;
pub mod kube_api;
pub mod routes_traffic;

mod prometheus;
pub use prometheus::*;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The agent under test: `FLASK_EBPF_EXPORTER_BIN`, or the binary cargo
/// built in this test's own target directory and profile. It is not a
/// dependency cargo can build for us, so a stale one is refused.
pub fn agent_binary() -> PathBuf {
    // Every agent a test starts asks; the source tree is walked once.
    static AGENT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    AGENT.get_or_init(checked_agent_binary).clone()
}

fn checked_agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLASK_EBPF_EXPORTER_BIN") {
        return path.into();
    }
    let agent = built_binary("flask-ebpf-exporter");
    let built = modified(&agent);
    for crate_dir in ["exporter", "exporter-ebpf", "exporter-common"] {
        if let Some((newest, source)) = newest_source(&workspace().join(crate_dir).join("src")) {
            assert!(
                newest <= built,
                "{} is older than {}: build it again (`cargo build -p flask-ebpf-exporter`; \
                 `cargo xtask test` does)",
                agent.display(),
                source.display()
            );
        }
    }
    agent
}

/// A binary of this workspace, from the target directory and profile this
/// test or benchmark was built in (`target/<profile>/deps/<test>`).
pub fn built_binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("the test's own path");
    let binary = test
        .parent()
        .and_then(std::path::Path::parent)
        .expect("a test binary sits in <target>/<profile>/deps")
        .join(name);
    assert!(
        binary.exists(),
        "no {} (build it first: `cargo build -p {name}`, or run `cargo xtask test`)",
        binary.display()
    );
    binary
}

/// Scratch space kept with the build (`<target>/tmp`), as cargo gives
/// integration tests in `CARGO_TARGET_TMPDIR`.
pub fn target_tmpdir() -> PathBuf {
    let test = std::env::current_exe().expect("the test's own path");
    let dir = test
        .ancestors()
        .nth(3)
        .expect("a test binary sits in <target>/<profile>/deps")
        .join("tmp");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

fn modified(path: &std::path::Path) -> std::time::SystemTime {
    std::fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The most recently modified file under `dir`, and when.
fn newest_source(dir: &std::path::Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_source(&path)
        } else {
            Some((modified(&path), path))
        };
        if let Some(candidate) = candidate
            && newest.as_ref().is_none_or(|(time, _)| candidate.0 > *time)
        {
            newest = Some(candidate);
        }
    }
    newest
}

/// These tests load BPF programs into the running kernel and start real
/// servers: without root or the venv they must fail loudly, not pass.
pub fn require_prerequisites() -> PathBuf {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "eBPF end-to-end tests must run as root"
    );
    require_venv()
}

/// The Python venv `cargo xtask setup` makes (Flask, gunicorn, the tools).
pub fn require_venv() -> PathBuf {
    let venv = std::env::var("FLASK_EBPF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join(".venv"));
    assert!(
        venv.join("bin/python").exists(),
        "no Python venv at {} (run `cargo xtask setup`)",
        venv.display()
    );
    venv
}

/// Flask itself, asked about a fixture app (`module:app` or
/// `module:factory()`) by tests/fixtures/print_rules.py: its rules, or with
/// `--match` the rule its router gives each `METHOD PATH` line of `input`.
pub fn flask_oracle(venv: &std::path::Path, spec: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(venv.join("bin/python"))
        .arg("print_rules.py")
        .arg(spec)
        .args(args)
        .current_dir(workspace().join("tests/fixtures"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_owned();
    // Written from a thread: a long input must not block on a full stdout.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write");
    assert!(
        output.status.success(),
        "print_rules.py {spec}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// Resident memory of a process, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed (with its process group) when dropped.
pub struct Running {
    pub child: Child,
    pub name: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill has no memory preconditions; the group is the child's own.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

pub fn spawn_process(name: &str, command: &mut Command) -> Running {
    use std::os::unix::process::CommandExt as _;
    // Own process group, so teardown reaches workers too.
    command.process_group(0).stdin(Stdio::null());
    let child = command
        .spawn()
        .unwrap_or_else(|error| panic!("starting {name}: {error}"));
    Running {
        child,
        name: name.to_owned(),
    }
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exporter under test.
pub struct Exporter {
    pub process: Running,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub address: SocketAddr,
    pub port: u16,
    /// The `/debug/*` pages (`--debug-listen`).
    pub debug_address: SocketAddr,
}

impl Exporter {
    /// Starts the exporter and waits until it is ready.
    pub fn start(extra_args: &[&str]) -> Exporter {
        Exporter::start_until(extra_args, "/readyz")
    }

    /// Starts the exporter and waits until `endpoint` answers 200.
    pub fn start_until(extra_args: &[&str], endpoint: &str) -> Exporter {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Exporter::start_on(address, extra_args, endpoint)
    }

    /// Starts the exporter listening on `address`; waits until `endpoint`
    /// answers 200.
    pub fn start_on(address: SocketAddr, extra_args: &[&str], endpoint: &str) -> Exporter {
        let debug_address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new(agent_binary());
        command
            .arg(format!("--listen={address}"))
            .arg(format!("--debug-listen={debug_address}"))
            .args(extra_args)
            // E2E_EXPORTER_LOG raises the exporter's log level when debugging a test.
            .env(
                "FLASK_EBPF_EXPORTER_LOG",
                std::env::var("E2E_EXPORTER_LOG").unwrap_or_else(|_| "info".to_owned()),
            );
        let process = spawn_process("flask-ebpf-exporter", &mut command);
        let exporter = Exporter {
            process,
            address,
            port: address.port(),
            debug_address,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while exporter.status_of(endpoint) != 200 {
            assert!(
                Instant::now() < deadline,
                "exporter's {endpoint} not 200 within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        exporter
    }

    pub fn status_of(&self, endpoint: &str) -> u16 {
        http_get_at(self.address, endpoint).map_or(0, |response| response.status)
    }

    /// A `/debug/*` page, from the debug listener.
    pub fn debug_page(&self, path: &str) -> std::io::Result<Response> {
        http_get_at(self.debug_address, path)
    }

    pub fn metrics(&self) -> Vec<Sample> {
        let response = http_get_at(self.address, "/metrics").expect("scrape exporter");
        assert_eq!(response.status, 200);
        parse_exposition(&String::from_utf8_lossy(&response.body))
    }
}

/// Servers the core issue names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    GunicornSync,
    GunicornGthread,
    Werkzeug,
}

pub struct App {
    pub process: Running,
    pub port: u16,
    /// prometheus-flask-exporter's multiprocess files, under gunicorn sync's
    /// several workers.
    _multiprocess_dir: Option<tempfile::TempDir>,
}

impl App {
    pub fn start(venv: &std::path::Path, server: Server, oracle: bool) -> App {
        App::start_in(venv, server, oracle, &[])
    }

    /// Starts the app with its process placed in these cgroups first (their
    /// `cgroup.procs` files), as a container runtime would.
    pub fn start_in(
        venv: &std::path::Path,
        server: Server,
        oracle: bool,
        cgroup_procs: &[PathBuf],
    ) -> App {
        App::start_fixture(venv, "app", server, oracle, cgroup_procs)
    }

    /// Starts `tests/fixtures/<fixture>.py` (its `app`) under `server`.
    pub fn start_fixture(
        venv: &std::path::Path,
        fixture: &str,
        server: Server,
        oracle: bool,
        cgroup_procs: &[PathBuf],
    ) -> App {
        App::start_with_oracle(venv, fixture, server, oracle, cgroup_procs, &[])
    }

    /// [`App::start_fixture`], with prometheus-flask-exporter configured by
    /// `oracle_options` (`tests/fixtures/oracle.py`'s `ORACLE_*` variables).
    pub fn start_with_oracle(
        venv: &std::path::Path,
        fixture: &str,
        server: Server,
        oracle: bool,
        cgroup_procs: &[PathBuf],
        oracle_options: &[(&str, &str)],
    ) -> App {
        let port = free_port();
        let wsgi_app = format!("{fixture}:app");
        let script = format!("{fixture}.py");
        let fixtures = workspace().join("tests/fixtures");
        let bind = format!("127.0.0.1:{port}");
        // With several workers, each has its own registry: the oracle is
        // prometheus-flask-exporter's multiprocess mode, which sums them.
        let multiprocess_dir = (oracle && server == Server::GunicornSync)
            .then(|| tempfile::tempdir().expect("multiprocess dir"));
        let mut command = match server {
            Server::GunicornSync => {
                let mut c = Command::new(venv.join("bin/gunicorn"));
                if let Some(dir) = &multiprocess_dir {
                    c.args(["-c", "gunicorn_multiprocess.py"])
                        .env("PROMETHEUS_MULTIPROC_DIR", dir.path());
                }
                c.args([
                    "--no-control-socket",
                    "-k",
                    "sync",
                    "-w",
                    "2",
                    "-b",
                    &bind,
                    &wsgi_app,
                ]);
                c
            }
            Server::GunicornGthread => {
                let mut c = Command::new(venv.join("bin/gunicorn"));
                c.args([
                    "--no-control-socket",
                    "-k",
                    "gthread",
                    "-w",
                    "1",
                    "--threads",
                    "4",
                    "-b",
                    &bind,
                    &wsgi_app,
                ]);
                c
            }
            Server::Werkzeug => {
                let mut c = Command::new(venv.join("bin/python"));
                c.arg(&script).arg(port.to_string());
                c
            }
        };
        if !cgroup_procs.is_empty() {
            command = in_cgroups(&command, cgroup_procs);
        }
        let oracle_mode = match (oracle, &multiprocess_dir) {
            (false, _) => "0",
            (true, None) => "1",
            (true, Some(_)) => "multiprocess",
        };
        command
            .current_dir(&fixtures)
            .env("ORACLE", oracle_mode)
            .envs(oracle_options.iter().copied());
        let process = spawn_process(&format!("{server:?}"), &mut command);
        wait_for_port(port, Duration::from_secs(20));
        App {
            process,
            port,
            _multiprocess_dir: multiprocess_dir,
        }
    }
}

/// `command`, run after its process moved itself into these cgroups (their
/// `cgroup.procs` files), as a container runtime places a container.
pub fn in_cgroups(command: &Command, cgroup_procs: &[PathBuf]) -> Command {
    let mut wrapped = Command::new("sh");
    wrapped
        .arg("-c")
        .arg(r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 1; shift; done; shift; exec "$@""#)
        .arg("sh")
        .args(cgroup_procs)
        .arg("--")
        .arg(command.get_program())
        .args(command.get_args());
    wrapped
}

/// A response as the test client read it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub close: bool,
}

/// Reads one response from `stream`, given the method of its request.
pub fn read_response(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    method: &str,
) -> std::io::Result<Response> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = parsed.parse(buffer) {
            let status = parsed.code.unwrap_or(0);
            let header = |name: &str| {
                parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
            };
            let close = header("connection").is_some_and(|v| v.contains("close"))
                || parsed.version == Some(0)
                    && !header("connection").is_some_and(|v| v.contains("keep-alive"));
            let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
            let length = header("content-length").and_then(|v| v.trim().parse::<usize>().ok());
            buffer.drain(..head_len);
            if (100..200).contains(&status) {
                continue;
            }
            let no_body = method == "HEAD" || status == 204 || status == 304;
            let body = if no_body {
                Vec::new()
            } else if chunked {
                read_chunked(stream, buffer)?
            } else if let Some(length) = length {
                fill(stream, buffer, length)?;
                buffer.drain(..length).collect()
            } else {
                stream.read_to_end(buffer)?;
                std::mem::take(buffer)
            };
            return Ok(Response {
                status,
                body,
                close,
            });
        }
        read_more(stream, buffer)?;
    }
}

fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 65536];
    let n = stream.read(&mut chunk)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    while buffer.len() < want {
        read_more(stream, buffer)?;
    }
    Ok(())
}

fn read_chunked(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(at) = buffer.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            read_more(stream, buffer)?;
        };
        let size_text = String::from_utf8_lossy(&buffer[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        buffer.drain(..line_end + 2);
        if size == 0 {
            // Trailers end with an empty line.
            loop {
                if let Some(at) = buffer.windows(2).position(|w| w == b"\r\n") {
                    let empty = at == 0;
                    buffer.drain(..at + 2);
                    if empty {
                        return Ok(body);
                    }
                } else {
                    read_more(stream, buffer)?;
                }
            }
        }
        fill(stream, buffer, size + 2)?;
        body.extend(buffer.drain(..size));
        buffer.drain(..2);
    }
}

pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

pub fn http_get(port: u16, target: &str) -> std::io::Result<Response> {
    http_get_at(SocketAddr::from(([127, 0, 0, 1], port)), target)
}

/// `GET /items/0` to `/items/{count - 1}` of the fixture app, each
/// answered 200; returns how many were sent.
pub fn get_items(port: u16, count: u32) -> u32 {
    for n in 0..count {
        let response = http_get(port, &format!("/items/{n}")).expect("GET /items/<n>");
        assert_eq!(response.status, 200, "/items/{n}");
    }
    count
}

pub fn http_get_at(address: SocketAddr, target: &str) -> std::io::Result<Response> {
    http_get_within(address, target, Duration::from_secs(10))
}

/// A GET that waits up to `timeout` for its response: one whose handshake's
/// last ACK an overflowing accept queue dropped waits for the server's
/// retransmitted SYN-ACK.
pub fn http_get_within(
    address: SocketAddr,
    target: &str,
    timeout: Duration,
) -> std::io::Result<Response> {
    let head = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    one_exchange(address, &head, "GET", timeout)
}

/// Sends `head` on a connection of its own and reads the response to
/// `method`, waiting up to `timeout`.
fn one_exchange(
    address: SocketAddr,
    head: &str,
    method: &str,
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(head.as_bytes())?;
    read_response(&mut stream, &mut Vec::new(), method)
}

/// One request of `method` without a body, on a connection of its own.
pub fn http_request(port: u16, method: &str, target: &str) -> std::io::Result<Response> {
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    one_exchange(
        SocketAddr::from(([127, 0, 0, 1], port)),
        &head,
        method,
        Duration::from_secs(10),
    )
}

/// One sample of the text exposition format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let value: f64 = match value.parse() {
            Ok(v) => v,
            Err(_) => continue,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if name.is_empty() {
            return labels;
        }
        if chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(name.trim_start_matches(',').trim().to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// Per (method, path, status) request counts from the duration histogram.
pub fn counts_by_route(
    samples: &[Sample],
    filter: impl Fn(&Sample) -> bool,
) -> BTreeMap<(String, String, String), u64> {
    let mut counts = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .filter(|s| filter(s))
    {
        let key = |k: &str| sample.labels.get(k).cloned().unwrap_or_default();
        *counts
            .entry((key("method"), key("path"), key("status")))
            .or_insert(0) += sample.value as u64;
    }
    counts
}

pub fn value(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// The sum of the samples of `name` whose `label` is `wanted`.
pub fn labelled(samples: &[Sample], name: &str, label: &str, wanted: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.labels.get(label).map(String::as_str) == Some(wanted))
        .map(|s| s.value)
        .sum()
}

/// Connections the kernel side stopped following, `by` how ("listener",
/// "cgroup" or "connection").
pub fn ignored_by(samples: &[Sample], by: &str) -> f64 {
    labelled(
        samples,
        "flask_ebpf_exporter_connections_ignored_total",
        "by",
        by,
    )
}

/// Listening sockets the kernel side ignores the connections of.
pub fn listeners_ignored(samples: &[Sample]) -> f64 {
    value(samples, "flask_ebpf_exporter_listeners_ignored")
}

/// `TcpExt: ListenOverflows` of `pid`'s network namespace, as the kernel
/// counts it.
pub fn kernel_listen_overflows(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/netstat")).expect("netstat");
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .find(|pair| pair[0].starts_with("TcpExt:"))
        .and_then(|pair| {
            pair[0]
                .split_whitespace()
                .zip(pair[1].split_whitespace())
                .find(|(name, _)| *name == "ListenOverflows")
                .and_then(|(_, value)| value.parse().ok())
        })
        .expect("ListenOverflows")
}

/// Polls until `check` holds or the timeout passes; returns the last value.
pub fn eventually<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let value = probe();
        if check(&value) || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Saves Chromium's rendering of `url` as a PNG at `file`, at the size the
/// manual's screenshots have.
pub fn screenshot(url: &str, file: &std::path::Path) {
    let status = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1500,900",
        ])
        .arg(format!("--screenshot={}", file.display()))
        .arg(url)
        .status()
        .expect("chromium (Debian package chromium; cargo xtask setup installs it)");
    assert!(status.success(), "chromium --screenshot {url}");
}
