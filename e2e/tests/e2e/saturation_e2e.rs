//! What only the kernel sees of a loaded Flask server, end to end on the
//! real kernel: how long connections wait in the listen backlog before a
//! gunicorn sync worker accepts them, measured from the kernel's end of the
//! TCP handshake (`sock:inet_sock_set_state`) to the accept.

use flask_ebpf_exporter_e2e as support;

use std::{
    process::Command,
    sync::{Arc, Barrier},
    time::Duration,
};

use support::*;

/// gunicorn sync serving tests/fixtures/app.py with `workers` workers.
fn gunicorn_sync(venv: &std::path::Path, workers: u32) -> (Running, u16) {
    let port = free_port();
    let server = spawn_process(
        "gunicorn",
        Command::new(venv.join("bin/gunicorn"))
            .args(["--no-control-socket", "-k", "sync", "-w"])
            .arg(workers.to_string())
            .args(["-b", &format!("127.0.0.1:{port}"), "app:app"])
            .current_dir(workspace().join("tests/fixtures"))
            .env("ORACLE", "0"),
    );
    wait_for_port(port, Duration::from_secs(20));
    (server, port)
}

/// The `/debug/pods` load entry of the server on `port` (null until seen).
fn server_load(exporter: &Exporter, port: u16) -> serde_json::Value {
    let Ok(page) = exporter.debug_page("/debug/pods") else {
        return serde_json::Value::Null;
    };
    let pods: serde_json::Value = serde_json::from_slice(&page.body).unwrap_or_default();
    let port = port.to_string();
    pods["load"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|load| load["identity"]["port"].as_str() == Some(port.as_str()))
                .cloned()
        })
        .unwrap_or_default()
}

/// `clients` requests to `target` at once, each on its own connection.
fn at_once(port: u16, target: &'static str, clients: usize) {
    let start = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                http_get(port, target).map(|response| response.status)
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("client").expect("response"), 200);
    }
}

/// The accept-queue histogram of `port`: (cumulative count by bucket, sum).
fn accept_queue(samples: &[Sample], port: u16) -> (Vec<(f64, f64)>, f64) {
    let port = port.to_string();
    let ours = |s: &&Sample| {
        s.labels.get("port") == Some(&port)
            && s.labels.get("phase").map(String::as_str) == Some("accept_queue")
    };
    let buckets = samples
        .iter()
        .filter(ours)
        .filter(|s| s.name == "flask_http_request_queue_seconds_bucket")
        .filter_map(|s| Some((s.labels.get("le")?.parse().ok()?, s.value)))
        .collect();
    let sum = samples
        .iter()
        .filter(ours)
        .filter(|s| s.name == "flask_http_request_queue_seconds_sum")
        .map(|s| s.value)
        .sum();
    (buckets, sum)
}

fn below(buckets: &[(f64, f64)], le: f64) -> f64 {
    buckets
        .iter()
        .find(|(bound, _)| *bound == le)
        .map_or(0.0, |(_, count)| *count)
}

/// Eight clients at once against one sync worker that takes 200 ms a
/// request: the worker accepts one connection at a time, so the last waits
/// about 7 × 200 ms in the backlog, and the waits add up to about
/// (0 + 1 + … + 7) × 200 ms. With eight workers nobody waits.
#[test]
fn queue_time_grows_with_busy_workers_and_stays_near_zero_with_enough() {
    let venv = require_prerequisites();
    const CLIENTS: usize = 8;
    const WORK: f64 = 0.2;
    for workers in [1, 8] {
        let (server, port) = gunicorn_sync(&venv, workers);
        // With buckets: the test reads how the waits spread.
        let exporter = Exporter::start(&["--port", &port.to_string(), "--queue-time-buckets"]);
        // Bursts of quick requests until every worker has booted and
        // imported the app (a worker still importing makes others wait).
        for _ in 0..3 {
            at_once(port, "/", CLIENTS);
        }
        let warmed = 3.0 * CLIENTS as f64;
        let before = eventually(
            Duration::from_secs(10),
            || exporter.metrics(),
            |samples| below(&accept_queue(samples, port).0, f64::INFINITY) == warmed,
        );
        let (before, sum_before) = accept_queue(&before, port);
        at_once(port, "/slow?seconds=0.2", CLIENTS);
        let samples = eventually(
            Duration::from_secs(10),
            || exporter.metrics(),
            |samples| {
                below(&accept_queue(samples, port).0, f64::INFINITY) == warmed + CLIENTS as f64
            },
        );
        let (after, sum_after) = accept_queue(&samples, port);
        // The burst alone: counts by bucket, and the sum of its waits.
        let buckets: Vec<(f64, f64)> = after
            .iter()
            .map(|&(le, count)| (le, count - below(&before, le)))
            .collect();
        let sum = sum_after - sum_before;
        let excerpt: Vec<String> = samples
            .iter()
            .filter(|s| s.name.starts_with("flask_http_request_queue_seconds"))
            .filter(|s| s.labels.get("port") == Some(&port.to_string()))
            .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
            .collect();
        println!(
            "gunicorn sync -w {workers}, {CLIENTS} clients at once on 200 ms requests (after {warmed} warm-up requests):"
        );
        for line in &excerpt {
            println!("  {line}");
        }
        println!("  the burst alone: {buckets:?}, sum {sum:.3} s");
        let all = CLIENTS as f64;
        assert_eq!(below(&buckets, f64::INFINITY), all);
        // /debug/pods shows the same server: its queue time, workers and
        // completeness.
        let load = eventually(
            Duration::from_secs(5),
            || server_load(&exporter, port),
            |load| load["requests_seen"].as_f64() == Some(warmed + all + 0.0),
        );
        println!("  /debug/pods: {load}");
        assert_eq!(load["completeness"].as_f64(), Some(1.0), "{load}");
        assert_eq!(load["in_flight"].as_f64(), Some(0.0), "{load}");
        let p99 = load["queue_p99_seconds"].as_f64().unwrap_or(0.0);
        if workers == 1 {
            // Waits of 0, 0.2, …, 1.4 s: the last above 1 s, none above 2.5 s.
            let expected_sum = WORK * (0..CLIENTS).sum::<usize>() as f64;
            assert!(
                (expected_sum * 0.8..expected_sum * 1.3).contains(&sum),
                "waits add up to {sum} s, expected about {expected_sum} s"
            );
            assert!(
                below(&buckets, 1.0) < all,
                "none waited past 1 s: {buckets:?}"
            );
            assert!(below(&buckets, 1.0) >= 4.0, "{buckets:?}");
            assert_eq!(below(&buckets, 2.5), all);
            // The burst's last waits dominate every wait seen.
            assert!(p99 > 1.0, "p99 {p99}");
            assert_eq!(load["workers"].as_f64(), Some(1.0), "{load}");
        } else {
            // Over every wait seen (warm-up included, when workers were
            // still booting), far below one busy worker's.
            assert!(p99 < 0.5, "p99 {p99}");
            // Each worker counts once it has answered (three bursts of
            // eight almost always reach all of them).
            let seen_workers = load["workers"].as_f64().unwrap_or(0.0);
            assert!((2.0..=f64::from(workers)).contains(&seen_workers), "{load}");
            // Near zero against the 200 ms of work (eight workers waking
            // on two cores take a few ms).
            assert_eq!(
                below(&buckets, 0.05),
                all,
                "with a free worker for every client, one waited: {buckets:?}"
            );
            assert!(sum < 0.2, "waits add up to {sum} s");
        }
        drop(exporter);
        drop(server);
    }
}

/// The `_sum` of a size histogram for (method, path) on `port`.
/// The kernel's handshake map at its smallest (16 entries) while 40
/// clients wait at once on one busy worker: the handshakes it forgot are
/// counted, and every accepted connection either has its queue time or is
/// counted as forgotten. No request is lost for it.
#[test]
fn forgotten_handshakes_are_counted_and_every_connection_accounted_for() {
    let venv = require_prerequisites();
    const CLIENTS: usize = 40;
    let (_server, port) = gunicorn_sync(&venv, 1);
    let exporter = Exporter::start(&[
        "--port",
        &port.to_string(),
        "--kernel-handshakes",
        "16",
        "--queue-time-buckets",
    ]);
    let forgotten =
        |samples: &[Sample]| value(samples, "flask_ebpf_exporter_handshakes_forgotten_total");
    let requests = |samples: &[Sample]| sum_for_port(samples, "flask_http_request_total", port);
    at_once(port, "/", 2);
    let before = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| requests(samples) == 2.0,
    );
    let queued_before = below(&accept_queue(&before, port).0, f64::INFINITY);
    assert_eq!(queued_before + forgotten(&before), 2.0, "the warm-up's two");
    at_once(port, "/slow?seconds=0.05", CLIENTS);
    let after = eventually(
        Duration::from_secs(15),
        || exporter.metrics(),
        |samples| requests(samples) == 2.0 + CLIENTS as f64,
    );
    assert_eq!(
        requests(&after),
        2.0 + CLIENTS as f64,
        "every request counted"
    );
    let queued = below(&accept_queue(&after, port).0, f64::INFINITY) - queued_before;
    let lost_track = forgotten(&after) - forgotten(&before);
    println!(
        "{CLIENTS} clients on one worker, 16 handshake entries: {queued} with queue time, {lost_track} forgotten"
    );
    assert_eq!(queued + lost_track, CLIENTS as f64);
    // 40 waited at once in a map of 16: about 24 forgotten (a few fewer
    // when the worker took its first ones before the rest had connected).
    assert!(lost_track >= 20.0, "{lost_track}");
}

fn size_sum(samples: &[Sample], family: &str, method: &str, path: &str, port: u16) -> Option<f64> {
    let port = port.to_string();
    samples
        .iter()
        .find(|s| {
            s.name == format!("{family}_sum")
                && s.labels.get("port") == Some(&port)
                && s.labels.get("method").map(String::as_str) == Some(method)
                && s.labels.get("path").map(String::as_str) == Some(path)
        })
        .map(|s| s.value)
}

/// Body sizes as the server moved them equal what curl sent and received:
/// a 1 MiB body written at once, one streamed in 64 writes (whose bytes the
/// kernel counts without copying), an uploaded body, and a chunked one.
#[test]
fn body_sizes_equal_what_the_client_sent_and_received() {
    let venv = require_prerequisites();
    let (server, port) = gunicorn_sync(&venv, 2);
    let exporter = Exporter::start(&["--port", &port.to_string(), "--body-sizes", "summary"]);
    let upload = "u".repeat(3000);
    let cases: [(&str, &str, &str, Option<&str>); 4] = [
        ("GET", "/big", "/big", None),
        ("GET", "/download?pieces=64&size=16384", "/download", None),
        ("POST", "/echo", "/echo", Some(upload.as_str())),
        ("GET", "/stream", "/stream", None),
    ];
    let mut expected = Vec::new();
    for (method, target, path, body) in cases {
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{size_upload}",
        ])
        .args(["-X", method])
        .arg(format!("http://127.0.0.1:{port}{target}"));
        if let Some(body) = body {
            curl.args(["--data-binary", body]);
        }
        let output = curl.output().expect("curl");
        let measured = String::from_utf8_lossy(&output.stdout).to_string();
        let mut sizes = measured
            .split_whitespace()
            .map(|n| n.parse::<f64>().expect("size"));
        let (downloaded, uploaded) = (sizes.next().expect("down"), sizes.next().expect("up"));
        println!("{method} {target}: curl downloaded {downloaded} and uploaded {uploaded} bytes");
        expected.push((method, path, downloaded, uploaded));
    }
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| {
            expected.iter().all(|(method, path, _, _)| {
                size_sum(
                    samples,
                    "flask_http_response_size_bytes",
                    method,
                    path,
                    port,
                )
                .is_some()
            })
        },
    );
    for (method, path, downloaded, uploaded) in expected {
        let response = size_sum(
            &samples,
            "flask_http_response_size_bytes",
            method,
            path,
            port,
        );
        let request = size_sum(
            &samples,
            "flask_http_request_size_bytes",
            method,
            path,
            port,
        );
        println!("{method} {path}: the agent saw {request:?} bytes in, {response:?} out");
        assert_eq!(response, Some(downloaded), "{method} {path} response");
        assert_eq!(request, Some(uploaded), "{method} {path} request");
    }
    drop(exporter);
    drop(server);
}

/// `family`'s value for the server on `port`.
fn gauge(samples: &[Sample], family: &str, port: u16) -> Option<f64> {
    let port = port.to_string();
    samples
        .iter()
        .find(|s| s.name == family && s.labels.get("port") == Some(&port))
        .map(|s| s.value)
}

/// Two sync workers: while four 3 s requests run, both workers are busy
/// (the other two requests wait in the backlog, unread), so requests in
/// flight equal workers; once they are answered none is in flight.
#[test]
fn in_flight_requests_and_workers_show_a_saturated_server() {
    let venv = require_prerequisites();
    let (server, port) = gunicorn_sync(&venv, 2);
    let exporter = Exporter::start(&["--port", &port.to_string()]);
    // Until both workers have answered.
    let samples = eventually(
        Duration::from_secs(20),
        || {
            at_once(port, "/", 4);
            std::thread::sleep(Duration::from_millis(1100));
            exporter.metrics()
        },
        |samples| gauge(samples, "flask_http_workers", port) == Some(2.0),
    );
    assert_eq!(
        gauge(&samples, "flask_http_requests_in_flight", port),
        Some(0.0)
    );
    let clients = std::thread::spawn(move || at_once(port, "/slow?seconds=3", 4));
    let busy = eventually(
        Duration::from_secs(3),
        || exporter.metrics(),
        |samples| gauge(samples, "flask_http_requests_in_flight", port) == Some(2.0),
    );
    let in_flight = gauge(&busy, "flask_http_requests_in_flight", port);
    let workers = gauge(&busy, "flask_http_workers", port);
    println!("4 clients on 2 sync workers: {in_flight:?} requests in flight, {workers:?} workers");
    assert_eq!(in_flight, Some(2.0), "one request read by each worker");
    assert_eq!(workers, Some(2.0));
    clients.join().expect("clients");
    let idle = eventually(
        Duration::from_secs(5),
        || exporter.metrics(),
        |samples| gauge(samples, "flask_http_requests_in_flight", port) == Some(0.0),
    );
    assert_eq!(
        gauge(&idle, "flask_http_requests_in_flight", port),
        Some(0.0)
    );
    assert_eq!(gauge(&idle, "flask_http_workers", port), Some(2.0));
    drop(exporter);
    drop(server);
}

/// Sums `family` over the series of the server on `port`.
fn sum_for_port(samples: &[Sample], family: &str, port: u16) -> f64 {
    let port = port.to_string();
    samples
        .iter()
        .filter(|s| s.name == family && s.labels.get("port") == Some(&port))
        .map(|s| s.value)
        .sum()
}

/// A one-page ring buffer cannot hold /cookie's 5 KiB response, so the
/// kernel drops it: those requests are read but never answered as far as
/// the agent knows, and count as lost. Completeness falls to about half,
/// and the shipped alert's expression, evaluated by a real Prometheus with
/// the shipped rules, fires.
#[test]
fn lost_requests_lower_completeness_and_the_alert_expression_fires() {
    let venv = require_prerequisites();
    let (server, port) = gunicorn_sync(&venv, 2);
    let exporter = Exporter::start(&["--port", &port.to_string(), "--ring-buffer-bytes", "4096"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = serde_json::json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [workspace().join("manifests/prometheus/rules.yaml").to_str().expect("path")],
        "scrape_configs": [{
            "job_name": "flask-ebpf-exporter",
            "static_configs": [{"targets": [exporter.address.to_string()]}],
        }],
    });
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(&config_file, config.to_string()).expect("config");
    let (_prometheus, prometheus_port) = start_prometheus(&config_file, &dir.path().join("data"));

    // Until Prometheus has two scrapes of every series, traffic keeps coming.
    let alert = "workload:flask_http_requests_complete:ratio_rate5m < 0.99";
    let mut answered = 0;
    let fired = eventually(
        Duration::from_secs(40),
        || {
            for _ in 0..5 {
                if http_get(port, "/").is_ok_and(|r| r.status == 200) {
                    answered += 1;
                }
                // The client gets its 5 KiB answer; the agent never sees it.
                let _ = http_get(port, "/cookie");
            }
            std::thread::sleep(Duration::from_millis(500));
            prometheus_query(prometheus_port, alert)
        },
        |result| !result.is_empty(),
    );
    let samples = exporter.metrics();
    let completed = sum_for_port(&samples, "flask_http_request_total", port);
    let seen = sum_for_port(&samples, "flask_http_requests_seen_total", port);
    let lost = sum_for_port(&samples, "flask_http_requests_lost_total", port);
    println!(
        "one-page ring buffer: {completed} exchanges of {seen} requests seen ({lost} lost), \
         {answered} small answers; Prometheus: {fired:?}"
    );
    assert!(!fired.is_empty(), "the alert expression never fired");
    let ratio: f64 = fired[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    assert!(ratio < 0.99, "{ratio}");
    assert_eq!(seen, completed + lost);
    // About half: every /cookie is lost, and a one-page ring may drop a
    // small answer too when events come together.
    assert!(
        lost > 0.0 && completed > 0.0,
        "{lost} lost, {completed} completed"
    );
    assert!(
        (0.2..0.8).contains(&(completed / seen)),
        "{completed} of {seen}"
    );
    assert!(
        value(&samples, "flask_ebpf_exporter_events_lost_total") > 0.0,
        "the kernel counted the dropped events"
    );
    drop(exporter);
    drop(server);
}

/// Runs `f` on a thread that has entered `pid`'s network namespace (the
/// thread's only: the test process stays where it is).
fn in_network_of<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("netns");
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on a namespace fd we hold, for this thread only.
        let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the server's network namespace")
}

/// A server alone in its network namespace (as a pod is), with a listen
/// backlog of 1 and one sync worker busy 1 s a request: twenty clients at
/// once overflow its accept queue. The agent's count equals the kernel's.
#[test]
fn accept_queue_overflows_are_counted_for_a_server_alone_in_its_network() {
    let venv = require_prerequisites();
    let port = free_port();
    let script = format!(
        "ip link set lo up && exec {} --no-control-socket -k sync -w 1 --backlog 1 -b 127.0.0.1:{port} app:app",
        venv.join("bin/gunicorn").display()
    );
    let server = spawn_process(
        "gunicorn in its own network",
        Command::new("unshare")
            .args(["--net", "sh", "-c", &script])
            .current_dir(workspace().join("tests/fixtures"))
            .env("ORACLE", "0"),
    );
    let pid = server.child.id();
    // Until unshare has run, the process is still in the node's namespace.
    let own = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let moved = eventually(
        Duration::from_secs(10),
        || std::fs::read_link(format!("/proc/{pid}/ns/net")).ok(),
        |namespace| {
            namespace
                .as_ref()
                .is_some_and(|namespace| *namespace != own)
        },
    );
    assert!(moved.is_some_and(|namespace| namespace != own));
    let ready = in_network_of(pid, move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if http_get(port, "/").is_ok_and(|r| r.status == 200) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    assert!(ready, "the server never answered in its network namespace");
    let exporter = Exporter::start(&["--port", &port.to_string()]);
    // A request the agent sees, so it knows the server's worker.
    assert!(in_network_of(pid, move || http_get(port, "/").is_ok()));
    // Its counter starts once the agent has read the namespace's count.
    let port_label = port.to_string();
    let started = eventually(
        Duration::from_secs(5),
        || exporter.metrics(),
        |samples| {
            samples.iter().any(|s| {
                s.name == "flask_http_listen_overflows_total"
                    && s.labels.get("port") == Some(&port_label)
            })
        },
    );
    assert_eq!(
        sum_for_port(&started, "flask_http_listen_overflows_total", port),
        0.0
    );
    let before = kernel_listen_overflows(pid);
    in_network_of(pid, move || {
        let clients: Vec<_> = (0..20)
            .map(|_| std::thread::spawn(move || http_get(port, "/slow?seconds=1").is_ok()))
            .collect();
        for client in clients {
            let _ = client.join();
        }
    });
    let overflowed = kernel_listen_overflows(pid) - before;
    let samples = eventually(
        Duration::from_secs(5),
        || exporter.metrics(),
        |samples| sum_for_port(samples, "flask_http_listen_overflows_total", port) >= overflowed,
    );
    let counted = sum_for_port(&samples, "flask_http_listen_overflows_total", port);
    println!(
        "backlog 1, 20 clients: the kernel counted {overflowed} overflows, the agent {counted}"
    );
    assert!(overflowed > 0.0, "the accept queue never overflowed");
    assert_eq!(counted, overflowed);
    drop(exporter);
    drop(server);
}

/// Two connections from one client address and port, to two servers at
/// once: the kernel keeps each handshake by its own socket, so neither
/// accept takes the other's. (Keyed by the client's address and port, the
/// second handshake replaced the first: the busy server's connection lost
/// its queue time, counted as forgotten.)
#[test]
fn handshakes_from_one_client_port_to_two_servers_stay_apart() {
    use std::io::{Read as _, Write as _};

    use socket2::{Domain, Socket, Type};

    let venv = require_prerequisites();
    let (_busy_server, busy) = gunicorn_sync(&venv, 1);
    let (_idle_server, idle) = gunicorn_sync(&venv, 1);
    let exporter = Exporter::start(&["--port", &format!("{busy},{idle}")]);
    let forgotten =
        |samples: &[Sample]| value(samples, "flask_ebpf_exporter_handshakes_forgotten_total");
    let requests =
        |samples: &[Sample], port| sum_for_port(samples, "flask_http_request_total", port);
    at_once(busy, "/", 1);
    at_once(idle, "/", 1);
    let before = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| requests(samples, busy) == 1.0 && requests(samples, idle) == 1.0,
    );

    // The busy server's only worker is held for a second.
    let slow = std::thread::spawn(move || http_get(busy, "/slow?seconds=1"));
    std::thread::sleep(Duration::from_millis(200));
    let client = |port: u16, local: u16| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], local)).into())
            .expect("bind");
        socket
            .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
            .expect("connect");
        let mut stream = std::net::TcpStream::from(socket);
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .expect("request");
        stream
    };
    // Waits in the busy server's accept queue...
    let mut waiting = client(busy, 0);
    let local = waiting.local_addr().expect("local address").port();
    std::thread::sleep(Duration::from_millis(100));
    // ...while the same client port is accepted at once by the other.
    let mut at_once_stream = client(idle, local);
    let mut response = Vec::new();
    at_once_stream.read_to_end(&mut response).expect("response");
    assert!(response.starts_with(b"HTTP/1.1 200"));
    response.clear();
    waiting.read_to_end(&mut response).expect("response");
    assert!(response.starts_with(b"HTTP/1.1 200"));
    assert_eq!(
        slow.join().expect("slow client").expect("response").status,
        200
    );

    let after = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| requests(samples, busy) == 3.0 && requests(samples, idle) == 2.0,
    );
    let waited = |port| accept_queue(&after, port).1 - accept_queue(&before, port).1;
    println!(
        "client port {local}: waited {:.3} s at the busy server, {:.3} s at the idle one",
        waited(busy),
        waited(idle)
    );
    assert_eq!(
        forgotten(&after),
        forgotten(&before),
        "no handshake forgotten"
    );
    assert!(
        waited(busy) >= 0.5,
        "the busy server's wait: {}",
        waited(busy)
    );
    assert!(
        waited(idle) < 0.1,
        "the idle server's wait: {}",
        waited(idle)
    );
}
