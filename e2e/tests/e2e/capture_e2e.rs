//! End to end on the real kernel: the exporter binary attached with eBPF,
//! real Flask apps under gunicorn sync (2 workers), gunicorn gthread and
//! Werkzeug's HTTP/1.1 server, a traffic mix sent over raw sockets, and the
//! exported counts compared with what was served and with
//! prometheus-flask-exporter running inside the app (where it can).

use flask_ebpf_exporter_e2e as support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use support::*;

type Tally = BTreeMap<(String, String, String), u64>;

/// Sends requests, reconnecting whenever the server closes, and tallies
/// every response received by (method, path without query, status).
struct Client {
    port: u16,
    connection: Option<(TcpStream, Vec<u8>)>,
    tally: Tally,
}

fn path_of(target: &str) -> String {
    target.split('?').next().unwrap_or(target).to_owned()
}

impl Client {
    fn new(port: u16) -> Self {
        Client {
            port,
            connection: None,
            tally: Tally::new(),
        }
    }

    fn record(&mut self, method: &str, path: &str, status: u16) {
        *self
            .tally
            .entry((method.to_owned(), path.to_owned(), status.to_string()))
            .or_insert(0) += 1;
    }

    fn stream(&mut self) -> &mut (TcpStream, Vec<u8>) {
        let port = self.port;
        self.connection
            .get_or_insert_with(|| (connect(port), Vec::new()))
    }

    /// One request on the kept-alive connection; `label_path` is the path
    /// Flask will see (decoded), for the tally.
    fn send(
        &mut self,
        method: &str,
        target: &str,
        label_path: &str,
        body: &[u8],
        expect_continue: bool,
    ) -> u16 {
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: test\r\nUser-Agent: e2e\r\n");
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            head.push_str(&format!(
                "Content-Length: {}\r\nContent-Type: application/octet-stream\r\n",
                body.len()
            ));
        }
        if expect_continue {
            head.push_str("Expect: 100-continue\r\n");
        }
        head.push_str("\r\n");
        let (stream, buffer) = self.stream();
        stream.write_all(head.as_bytes()).expect("write head");
        if expect_continue {
            // Wait for the interim response before the body, as curl does.
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut chunk = [0u8; 4096];
            while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
        }
        stream.write_all(body).expect("write body");
        let response = read_response(stream, buffer, method).expect("response");
        if response.close {
            self.connection = None;
        }
        self.record(method, label_path, response.status);
        response.status
    }

    /// Several requests in one write, then their responses. Servers that
    /// close after one response answer fewer; only answered ones count.
    fn pipeline(&mut self, targets: &[&str]) -> usize {
        let batch: String = targets
            .iter()
            .map(|t| format!("GET {t} HTTP/1.1\r\nHost: test\r\n\r\n"))
            .collect();
        let mut answered = Vec::new();
        {
            let (stream, buffer) = self.stream();
            stream.write_all(batch.as_bytes()).expect("write batch");
            for target in targets {
                match read_response(stream, buffer, "GET") {
                    Ok(response) => {
                        answered.push((path_of(target), response.status));
                        if response.close {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        self.connection = None;
        let count = answered.len();
        for (path, status) in answered {
            self.record("GET", &path, status);
        }
        count
    }
}

/// The traffic mix of the core issue. Returns how many of the pipelined
/// batch's requests were answered.
fn send_traffic_mix(client: &mut Client) -> usize {
    for target in [
        "/",
        "/",
        "/",
        "/items/1",
        "/items/2",
        "/items/3?x=1&y=2",
        "/items/4?q=%20a",
    ] {
        client.send("GET", target, &path_of(target), b"", false);
    }
    client.send("GET", "/items/%31%32", "/items/12", b"", false);
    client.send("PUT", "/items/7", "/items/7", br#"{"name":"seven"}"#, false);
    client.send("PATCH", "/items/7", "/items/7", b"{}", false);
    client.send("DELETE", "/items/3", "/items/3", b"", false);
    client.send("HEAD", "/items/1", "/items/1", b"", false);
    client.send("OPTIONS", "/items/1", "/items/1", b"", false);
    client.send("POST", "/items/1", "/items/1", b"x", false); // 405
    for code in [301, 302, 304, 400, 403, 404, 418] {
        let target = format!("/status/{code}");
        client.send("GET", &target, &target, b"", false);
    }
    client.send("GET", "/boom", "/boom", b"", false);
    client.send("GET", "/no/such/route", "/no/such/route", b"", false);
    client.send("GET", "/big", "/big", b"", false);
    client.send("GET", "/stream", "/stream", b"", false);
    client.send("GET", "/file", "/file", b"", false);
    client.send("GET", "/file", "/file", b"", false);
    client.send("POST", "/echo", "/echo", &vec![b'u'; 300 * 1024], true);
    client.send("POST", "/echo", "/echo", &vec![b'v'; 300 * 1024], false);
    client.send("POST", "/echo", "/echo", b"small", false);
    let pipelined = client.pipeline(&["/items/21", "/items/22", "/", "/status/404", "/items/23"]);
    for _ in 0..2 {
        client.send("GET", "/slow?seconds=0.3", "/slow", b"", false);
    }
    pipelined
}

fn exported_for(exporter: &Exporter, app_port: u16) -> (Vec<Sample>, Tally) {
    let samples = exporter.metrics();
    let port = app_port.to_string();
    let tally = counts_by_route(&samples, |s| {
        s.labels.get("port") == Some(&port)
            && s.labels.get("path").map(String::as_str) != Some("/metrics")
    });
    (samples, tally)
}

fn bucket(samples: &[Sample], app_port: u16, path: &str, le: &str) -> f64 {
    let port = app_port.to_string();
    samples
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_bucket")
        .filter(|s| {
            s.labels.get("port") == Some(&port)
                && s.labels.get("path").map(String::as_str) == Some(path)
        })
        .filter(|s| s.labels.get("le").map(String::as_str) == Some(le))
        .map(|s| s.value)
        .sum()
}

fn serves_traffic_mix_exactly(server: Server) {
    let venv = require_prerequisites();
    let app = App::start(&venv, server, true);
    // Narrowing to the app's port keeps parallel tests apart.
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &app.port.to_string()]);

    let mut client = Client::new(app.port);
    let pipelined = send_traffic_mix(&mut client);
    if server == Server::GunicornGthread {
        // gthread answers a whole pipelined batch on one connection
        // (sync workers and Werkzeug answer one request, then close).
        assert_eq!(pipelined, 5, "all pipelined requests answered");
    }
    client.connection = None;
    let sent = client.tally.clone();
    assert!(
        sent.values().sum::<u64>() >= 30,
        "the mix was answered: {sent:?}"
    );

    let (samples, exported) = eventually(
        Duration::from_secs(10),
        || exported_for(&exporter, app.port),
        |(_, tally)| *tally == sent,
    );
    assert_eq!(
        exported, sent,
        "{server:?}: exported counts per (method, path, status) differ from what was served"
    );

    let oracle = http_get(app.port, "/metrics").expect("scrape prometheus-flask-exporter");
    let oracle = parse_exposition(&String::from_utf8_lossy(&oracle.body));
    let oracle = counts_by_route(&oracle, |s| {
        s.labels.get("path").map(String::as_str) != Some("/metrics")
    });
    assert_eq!(
        exported, oracle,
        "{server:?}: exported counts differ from prometheus-flask-exporter's"
    );

    // The 0.3 s endpoint lands above the 0.25 bucket and within 0.5.
    assert_eq!(bucket(&samples, app.port, "/slow", "0.25"), 0.0);
    assert_eq!(bucket(&samples, app.port, "/slow", "0.5"), 2.0);
    // 500s are what prometheus-flask-exporter counts as exceptions.
    let port = app.port.to_string();
    let exceptions: f64 = samples
        .iter()
        .filter(|s| {
            s.name == "flask_http_request_exceptions_total" && s.labels.get("port") == Some(&port)
        })
        .map(|s| s.value)
        .sum();
    assert_eq!(exceptions, 1.0);
    // A gunicorn master and its workers are one server.
    let processes: std::collections::BTreeSet<_> = samples
        .iter()
        .filter(|s| s.name == "flask_http_request_total" && s.labels.get("port") == Some(&port))
        .filter_map(|s| s.labels.get("process").cloned())
        .collect();
    assert_eq!(
        processes.len(),
        1,
        "one series set per server: {processes:?}"
    );
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_events_lost_total"),
        0.0
    );
    drop(app);
}

#[test]
fn gunicorn_sync_two_workers() {
    serves_traffic_mix_exactly(Server::GunicornSync);
}

#[test]
fn gunicorn_gthread() {
    serves_traffic_mix_exactly(Server::GunicornGthread);
}

#[test]
fn werkzeug_http11() {
    serves_traffic_mix_exactly(Server::Werkzeug);
}

#[test]
fn non_http_and_malformed_bytes_make_no_series_and_are_counted() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornGthread, false);
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &app.port.to_string()]);

    // A TLS ClientHello start and binary noise on a served port.
    let mut tls = connect(app.port);
    tls.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0xde, 0xad, 0xbe, 0xef,
    ])
    .expect("write");
    let _ = tls.read(&mut [0u8; 1024]);
    // A request with a broken header line.
    let mut malformed = connect(app.port);
    malformed
        .write_all(b"GET /items/1 HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        .expect("write");
    let _ = malformed.read(&mut [0u8; 1024]);
    drop((tls, malformed));

    let mut client = Client::new(app.port);
    client.send("GET", "/", "/", b"", false);
    let sent = client.tally.clone();
    let (samples, exported) = eventually(
        Duration::from_secs(10),
        || exported_for(&exporter, app.port),
        |(samples, tally)| {
            *tally == sent && value(samples, "flask_ebpf_exporter_unparsed_bytes_total") >= 15.0
        },
    );
    assert_eq!(exported, sent, "only the good request makes a series");
    assert!(value(&samples, "flask_ebpf_exporter_unparsed_bytes_total") >= 15.0);
    let response = http_get(exporter.port, "/healthz").expect("healthz");
    assert_eq!(response.status, 200, "still alive");
}

#[test]
fn connection_accepted_before_the_exporter_started_is_picked_up() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornGthread, false);
    let mut client = Client::new(app.port);
    client.send("GET", "/items/1", "/items/1", b"", false);
    assert!(
        client.connection.is_some(),
        "gthread keeps the connection alive"
    );

    let exporter = Exporter::start(&["--path-label", "raw", "--port", &app.port.to_string()]);
    client.tally.clear();
    client.send("GET", "/items/2", "/items/2", b"", false);
    client.send("GET", "/items/3", "/items/3", b"", false);
    let sent = client.tally.clone();
    let (_, exported) = eventually(
        Duration::from_secs(10),
        || exported_for(&exporter, app.port),
        |(_, t)| *t == sent,
    );
    assert_eq!(exported, sent);
}

/// readv/writev and recvmsg/sendmsg, with head and body in two iovecs of
/// one call: only the first iovec is copied, the body is skipped by count.
#[test]
fn vectored_syscalls_are_captured() {
    let venv = require_prerequisites();
    for mode in ["msg", "iov"] {
        let port = free_port();
        let mut command = std::process::Command::new(venv.join("bin/python"));
        command
            .arg(workspace().join("tests/fixtures/vectored_server.py"))
            .arg(port.to_string())
            .arg(mode);
        let server = spawn_process(&format!("vectored {mode}"), &mut command);
        wait_for_port(port, Duration::from_secs(10));
        let exporter = Exporter::start(&["--path-label", "raw", "--port", &port.to_string()]);
        let mut client = Client::new(port);
        for target in ["/v", "/v", "/v", "/missing"] {
            client.send("GET", target, target, b"", false);
        }
        let sent = client.tally.clone();
        let (_, exported) = eventually(
            Duration::from_secs(10),
            || exported_for(&exporter, port),
            |(_, t)| *t == sent,
        );
        assert_eq!(exported, sent, "{mode}");
        drop(server);
    }
}

/// Closes a connection with a reset (SO_LINGER 0): the server's next write
/// fails with ECONNRESET or EPIPE.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    let done = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(done, 0, "SO_LINGER");
    drop(stream);
}

#[test]
fn a_client_gone_before_the_response_still_counts_with_its_status() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornSync, false);
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &app.port.to_string()]);
    for _ in 0..3 {
        let mut impatient = connect(app.port);
        impatient
            .write_all(b"GET /slow?seconds=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        std::thread::sleep(Duration::from_millis(50));
        reset(impatient);
    }
    let slow = |samples: &Vec<Sample>| {
        counts_by_route(samples, |s| {
            s.labels.get("port") == Some(&app.port.to_string())
        })
        .get(&("GET".to_owned(), "/slow".to_owned(), "200".to_owned()))
        .copied()
    };
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| slow(samples) == Some(3),
    );
    assert_eq!(slow(&samples), Some(3), "counted with the status written");
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_client_gone_total"),
        3.0
    );
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_abandoned_requests_total"),
        0.0
    );
}

#[test]
fn a_response_head_past_the_capture_keeps_its_status_and_the_pairing() {
    let venv = require_prerequisites();
    // gthread keeps the connection alive: every request below shares it.
    let app = App::start(&venv, Server::GunicornGthread, false);
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &app.port.to_string()]);
    let mut client = Client::new(app.port);
    for _ in 0..3 {
        // A 5 KiB Set-Cookie: the head is longer than the 4 KiB copied.
        assert_eq!(client.send("GET", "/cookie", "/cookie", b"", false), 201);
        assert_eq!(client.send("GET", "/items/2", "/items/2", b"", false), 200);
        assert_eq!(
            client.send("GET", "/status/418", "/status/418", b"", false),
            418
        );
    }
    assert!(client.connection.is_some(), "one kept-alive connection");
    let sent = client.tally.clone();
    let (_, exported) = eventually(
        Duration::from_secs(10),
        || exported_for(&exporter, app.port),
        |(_, tally)| *tally == sent,
    );
    assert_eq!(exported, sent);
}

/// An upload of `pieces` × 16 KiB, one piece every 5 ms, to /echo; the
/// response's status.
fn slow_upload(port: u16, pieces: usize) -> u16 {
    let piece = vec![b'u'; 16 * 1024];
    let mut stream = connect(port);
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        pieces * piece.len()
    );
    stream.write_all(head.as_bytes()).expect("write head");
    for _ in 0..pieces {
        std::thread::sleep(Duration::from_millis(5));
        stream.write_all(&piece).expect("write piece");
    }
    read_response(&mut stream, &mut Vec::new(), "POST")
        .expect("response")
        .status
}

/// Bodies that take longer than the agent takes to read their head (a
/// streamed download, a slow upload) are counted by the kernel instead of
/// being copied syscall by syscall, and their exchanges count as before.
#[test]
fn long_bodies_are_counted_in_the_kernel_not_copied() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornSync, false);
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &app.port.to_string()]);
    let before = exporter.metrics();
    const PIECES: usize = 64;
    let mut client = Client::new(app.port);
    for _ in 0..2 {
        // 64 writes of 16 KiB, 5 ms apart, after a head with Content-Length.
        let target = format!("/download?pieces={PIECES}");
        assert_eq!(client.send("GET", &target, "/download", b"", false), 200);
        assert_eq!(slow_upload(app.port, PIECES), 201);
        client.record("POST", "/echo", 201);
    }
    let sent = client.tally.clone();
    let (samples, exported) = eventually(
        Duration::from_secs(10),
        || exported_for(&exporter, app.port),
        |(_, tally)| *tally == sent,
    );
    assert_eq!(exported, sent);
    let delta = |name: &str| value(&samples, name) - value(&before, name);
    let body_bytes = (4 * PIECES * 16 * 1024) as f64;
    let skipped = delta("flask_ebpf_exporter_body_bytes_skipped_total");
    let events = delta("flask_ebpf_exporter_events_read_total");
    let event_bytes = delta("flask_ebpf_exporter_event_bytes_read_total");
    println!(
        "4 exchanges with 1 MiB bodies: {events} events, {event_bytes} bytes read, \
         {skipped} of {body_bytes} body bytes counted in the kernel"
    );
    // The agent asks within a turn of the head (10 ms here, of a 320 ms
    // body): most of each body goes by uncopied.
    assert!(skipped >= body_bytes / 2.0, "skipped {skipped}");
    // Copied, each download alone would be 65 write events of 4 KiB.
    assert!(events <= 4.0 * 20.0, "{events} events");
    assert!(event_bytes <= 4.0 * 20.0 * 4144.0, "{event_bytes} bytes");
}

#[test]
fn threads_blocked_in_reads_never_hide_new_traffic() {
    let venv = require_prerequisites();
    // Werkzeug's threaded server: a thread blocked in a read per connection.
    let app = App::start(&venv, Server::Werkzeug, false);
    let port = app.port.to_string();
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &port]);
    // Threads blocked in reads hold no kernel state: the arguments of a
    // syscall are read at its exit.
    let idle: Vec<TcpStream> = (0..192).map(|_| connect(app.port)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut client = Client::new(app.port);
    for _ in 0..5 {
        client.send("GET", "/", "/", b"", false);
    }
    let sent = client.tally.clone();
    let (samples, exported) = eventually(
        Duration::from_secs(10),
        || exported_for(&exporter, app.port),
        |(_, tally)| *tally == sent,
    );
    assert_eq!(exported, sent, "new traffic seen past the blocked reads");
    // Inserts that fail in the kernel would be counted, map by map.
    let maps: Vec<&str> = samples
        .iter()
        .filter(|s| s.name == "flask_ebpf_exporter_kernel_map_insert_failures_total")
        .filter_map(|s| s.labels.get("map").map(String::as_str))
        .collect();
    assert_eq!(maps.len(), exporter_common::MAP_NAMES.len(), "{maps:?}");
    drop(idle);
}

/// With the kernel's BPF statistics on (as `kernel.bpf_stats_enabled=1`
/// sets them, here for as long as this test holds the fd), the agent
/// exports what each of its programs ran and cost: every accepted
/// connection ran `accept_exit`.
#[test]
fn the_kernel_programs_cost_is_exported_while_statistics_are_on() {
    let venv = require_prerequisites();
    let _statistics =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (root)");
    let app = App::start(&venv, Server::GunicornGthread, false);
    let exporter = Exporter::start(&["--port", &app.port.to_string()]);
    for _ in 0..5 {
        assert_eq!(http_get(app.port, "/").expect("response").status, 200);
    }
    let program = |samples: &[Sample], family: &str| {
        samples
            .iter()
            .find(|s| {
                s.name == family
                    && s.labels.get("program").map(String::as_str) == Some("accept_exit")
            })
            .map_or(0.0, |s| s.value)
    };
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| program(samples, "flask_ebpf_exporter_bpf_program_runs_total") >= 5.0,
    );
    assert!(program(&samples, "flask_ebpf_exporter_bpf_program_runs_total") >= 5.0);
    let seconds = program(
        &samples,
        "flask_ebpf_exporter_bpf_program_run_seconds_total",
    );
    assert!(seconds > 0.0 && seconds < 1.0, "{seconds} s");
}
