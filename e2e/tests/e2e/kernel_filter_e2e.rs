//! What the kernel side stops following, on the real kernel: a non-HTTP
//! neighbour (redis-server under redis-benchmark) costs no events once its
//! listener has been heard; a client's binary bytes cannot make a Flask
//! listener ignored; a listener judged not HTTP is judged again when its
//! server speaks HTTP; servers the agent does not monitor are not followed.
//!
//! The tests take turns (one lock): they count the agent's events, which
//! another test's traffic would add to.

use flask_ebpf_exporter_e2e as support;

use std::{
    io::{Read, Write},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use support::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn redis_benchmark(port: u16, clients: u32, operations: u32) {
    let status = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "get,set", "-q"])
        .args(["-c", &clients.to_string(), "-n", &operations.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("redis-benchmark (cargo xtask setup installs redis-tools)");
    assert!(status.success());
}

/// Requests counted for the server on `port` (local mode's `port` label).
fn counted_on(exporter: &Exporter, port: u16) -> f64 {
    let port = port.to_string();
    exporter
        .metrics()
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .filter(|s| s.labels.get("port") == Some(&port))
        .map(|s| s.value)
        .sum()
}

#[test]
fn a_non_http_neighbour_costs_no_events_once_heard() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_prerequisites();
    let port = free_port();
    let _redis = spawn_process(
        "redis-server",
        Command::new("redis-server")
            // Both loopbacks, as Redis's default configuration binds: a
            // listener no client uses is never judged.
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "-::1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null()),
    );
    wait_for_port(port, Duration::from_secs(10));
    // Default flags: every server on the node is followed until it shows
    // what it speaks.
    let exporter = Exporter::start(&[]);

    // A client that stays connected across the verdict.
    let mut resident = connect(port);
    let ping = |stream: &mut std::net::TcpStream| {
        stream.write_all(b"PING\r\n").expect("ping");
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).expect("pong");
        assert_eq!(&reply, b"+PONG\r\n");
    };
    ping(&mut resident);
    let heard = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| {
            listeners_ignored(s) >= 1.0
                && ignored_by(s, "connection") >= 1.0
                && value(s, "flask_ebpf_exporter_processes_ignored_total") >= 1.0
        },
    );
    assert!(
        listeners_ignored(&heard) >= 1.0,
        "Redis's listener is judged by its +PONG"
    );
    // Its used listener ignored, the other holding no connection,
    // redis-server is no server to the kernel: its reads and writes stop at
    // the first check.
    assert!(
        value(&heard, "flask_ebpf_exporter_processes_ignored_total") >= 1.0,
        "redis-server is forgotten as a server"
    );
    assert!(
        ignored_by(&heard, "connection") >= 1.0,
        "the connection that showed it is no longer followed"
    );

    let before = value(&heard, "flask_ebpf_exporter_events_read_total");
    for _ in 0..2_000 {
        ping(&mut resident);
    }
    // 40,000 operations on new connections.
    redis_benchmark(port, 20, 20_000);
    // The kernel's counts reach /metrics once a second.
    let after = eventually(
        Duration::from_secs(5),
        || exporter.metrics(),
        |s| ignored_by(s, "listener") >= 15.0,
    );
    let events = value(&after, "flask_ebpf_exporter_events_read_total") - before;
    let operations = 2_000.0 + 40_000.0;
    eprintln!(
        "redis neighbour: {events} events for {operations} operations; connections ignored at accept {}",
        ignored_by(&after, "listener")
    );
    // Heartbeats, and a sampled connection in 64 followed until heard.
    assert!(
        events / operations <= 0.01,
        "{events} events for {operations} operations"
    );
    // redis-benchmark opens about 20 connections for its two tests.
    assert!(
        ignored_by(&after, "listener") >= 15.0,
        "new connections of the listener are ignored at accept"
    );
}

#[test]
fn binary_bytes_from_a_client_cannot_blind_a_flask_listener() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornGthread, false);
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &app.port.to_string()]);
    // TLS and binary bytes first: the server answers them with HTTP 400.
    let hostile: [&[u8]; 3] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\x00\x01\x02\x03\xff\xfe\xfd\r\n\r\n",
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    ];
    let mut answered_400 = 0;
    for bytes in hostile {
        let mut stream = connect(app.port);
        stream.write_all(bytes).expect("write");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        // gunicorn answers a bad request line with 400; bytes without a
        // line end it just closes on.
        if answer.starts_with(b"HTTP/1.1 400") {
            answered_400 += 1;
        } else {
            assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        }
    }
    assert!(answered_400 >= 1, "the server answered the client's bytes");
    let sent = 100;
    for _ in 0..sent {
        assert_eq!(http_get(app.port, "/items/3").expect("get").status, 200);
    }
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| {
            labelled(
                s,
                "flask_http_request_duration_seconds_count",
                "path",
                "/items/3",
            ) >= f64::from(sent)
        },
    );
    assert_eq!(
        labelled(
            &samples,
            "flask_http_request_duration_seconds_count",
            "path",
            "/items/3"
        ),
        f64::from(sent),
        "every request after the binary bytes is counted"
    );
    assert_eq!(listeners_ignored(&samples), 0.0);
    assert_eq!(ignored_by(&samples, "listener"), 0.0);
}

#[test]
fn a_listener_that_starts_speaking_http_is_followed_again() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let venv = require_prerequisites();
    let port = free_port();
    let fixture = workspace().join("tests/fixtures/turncoat_server.py");
    let _server = spawn_process(
        "turncoat_server",
        Command::new(venv.join("bin/python"))
            .arg(&fixture)
            .args([&port.to_string(), "3"]),
    );
    wait_for_port(port, Duration::from_secs(10));
    let exporter = Exporter::start(&["--path-label", "raw", "--port", &port.to_string()]);
    // wait_for_port's probe was the first of the three non-HTTP answers.
    for _ in 0..2 {
        let mut stream = connect(port);
        stream
            .write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("write");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(answer.starts_with(b"-ERR"));
    }
    let judged = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| listeners_ignored(s) >= 1.0,
    );
    assert_eq!(listeners_ignored(&judged), 1.0, "judged not HTTP");

    // Now it answers HTTP; the kernel still follows one connection in 64,
    // whose answer clears the verdict.
    let mut sent = 0;
    while counted_on(&exporter, port) == 0.0 {
        assert!(sent < 200, "never followed again after {sent} requests");
        assert_eq!(http_get(port, "/x").expect("get").status, 200);
        sent += 1;
        if sent % 16 == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let cleared = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| listeners_ignored(s) == 0.0,
    );
    assert_eq!(listeners_ignored(&cleared), 0.0, "judged HTTP again");
    // The loop's last requests may still be on their way to /metrics.
    std::thread::sleep(Duration::from_millis(1500));
    let counted = counted_on(&exporter, port);
    for _ in 0..20 {
        assert_eq!(http_get(port, "/x").expect("get").status, 200);
    }
    let samples = eventually(
        Duration::from_secs(10),
        || counted_on(&exporter, port),
        |&now| now >= counted + 20.0,
    );
    assert_eq!(samples, counted + 20.0, "every later request is counted");
}

#[test]
fn a_server_that_exits_is_forgotten_by_the_kernel_side() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let venv = require_prerequisites();
    let exporter = Exporter::start(&[]);
    let servers = |samples: &[Sample]| value(samples, "flask_ebpf_exporter_server_processes");
    // The gauge is brought up to date once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let at_start = servers(&exporter.metrics());
    // Started after the agent: its workers become servers at their accepts.
    let app = App::start(&venv, Server::GunicornSync, false);
    let with_app = eventually(
        Duration::from_secs(10),
        || {
            assert_eq!(http_get(app.port, "/").expect("get").status, 200);
            exporter.metrics()
        },
        |s| servers(s) >= at_start + 2.0,
    );
    assert!(
        servers(&with_app) >= at_start + 2.0,
        "gunicorn's two workers: {} then {}",
        at_start,
        servers(&with_app)
    );
    // Gone: forgotten at the next upkeep (every 5 s).
    drop(app);
    let after = eventually(
        Duration::from_secs(12),
        || exporter.metrics(),
        |s| servers(s) <= at_start,
    );
    assert!(
        servers(&after) <= at_start,
        "{} server processes after the app exited, {at_start} before it",
        servers(&after)
    );
}

#[test]
fn servers_the_agent_does_not_monitor_are_not_followed() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornSync, false);
    // Monitors another port only.
    let exporter = Exporter::start(&["--port", &free_port().to_string()]);
    let get = |n: usize| {
        for _ in 0..n {
            assert_eq!(http_get(app.port, "/").expect("get").status, 200);
        }
    };
    // gunicorn's two workers each accept on the listening socket: each is
    // judged at a first connection (connections accepted until the verdict
    // reaches the kernel are followed, then dropped in userspace).
    get(20);
    let judged = eventually(
        Duration::from_secs(10),
        || {
            get(1);
            exporter.metrics()
        },
        |s| listeners_ignored(s) >= 2.0,
    );
    assert_eq!(listeners_ignored(&judged), 2.0, "one verdict per worker");
    // The kernel's counts reach /metrics once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let before = ignored_by(&exporter.metrics(), "listener");
    let sent = 100.0;
    get(100);
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| ignored_by(s, "listener") - before >= 0.95 * sent,
    );
    let ignored = ignored_by(&samples, "listener") - before;
    eprintln!("unmonitored server: {ignored} of {sent} connections ignored at accept");
    // One in 64 per worker is still followed, to notice a change.
    assert!(ignored >= 0.95 * sent, "{ignored} of {sent}");
    assert_eq!(value(&samples, "flask_http_request_total"), 0.0);
}

/// More connections than the kernel's connection map holds: the ones it
/// evicted make no close event, so this side finds them gone at its reap,
/// counts them and lets them go; nothing stays held, and new traffic counts.
#[test]
fn connections_the_kernel_map_evicted_are_counted_and_let_go() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let venv = require_prerequisites();
    // gthread keeps idle connections open (2 s of keep-alive).
    let app = App::start(&venv, Server::GunicornGthread, false);
    let port = app.port.to_string();
    let exporter = Exporter::start(&["--port", &port, "--kernel-connections", "16"]);
    let mut connections: Vec<_> = (0..64).map(|_| connect(app.port)).collect();
    for stream in &mut connections {
        stream
            .write_all(b"GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let response = read_response(stream, &mut Vec::new(), "GET").expect("response");
        assert_eq!(response.status, 200);
    }
    // The server closes them after its keep-alive; this side looks for
    // the ones the kernel forgot once they are 5 s idle (reaped every 5 s).
    let evicted = |s: &[Sample]| value(s, "flask_ebpf_exporter_connections_evicted_total");
    let tracked = |s: &[Sample]| value(s, "flask_ebpf_exporter_connections_tracked");
    let samples = eventually(
        Duration::from_secs(20),
        || exporter.metrics(),
        |s| evicted(s) > 0.0 && tracked(s) == 0.0,
    );
    assert!(evicted(&samples) > 0.0, "evictions counted");
    assert_eq!(tracked(&samples), 0.0, "no connection held after its end");
    drop(connections);
    // The agent goes on counting what it can follow.
    let before = counted_on(&exporter, app.port);
    for _ in 0..8 {
        assert_eq!(http_get(app.port, "/").expect("get").status, 200);
    }
    let after = eventually(
        Duration::from_secs(10),
        || counted_on(&exporter, app.port),
        |&n| n >= before + 8.0,
    );
    assert_eq!(after, before + 8.0);
}
