//! An adversary's traffic against real Flask apps, on the real kernel, for
//! 30 s: pipelined requests with invented methods, deep typed paths, 2 KiB
//! segments and slugs on routes that answer 200 for any value, smuggling
//! shapes, TLS, HTTP/2 and binary bytes against gunicorn, and 300 slow
//! heads of ~60 KiB against Werkzeug. The agent must stay small, keep
//! /metrics small, learn nothing the app does not serve, stay alive, and
//! afterwards count legitimate requests exactly.

use flask_ebpf_exporter_e2e as support;

use std::{
    collections::BTreeSet,
    io::Write,
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use support::{routes_traffic::uuid, *};

const ATTACK: Duration = Duration::from_secs(32);
/// Hostile requests and connections the attack makes at least: on a slow
/// or busy machine it goes on past `ATTACK` until they are made, so the
/// test's strength does not depend on the machine's speed.
const MIN_HOSTILE: u64 = 20_000;
/// Past this the attack stops even short of `MIN_HOSTILE`, and the test
/// fails saying so.
const ATTACK_LIMIT: Duration = Duration::from_secs(150);
const SLOW_HEADS: usize = 300;

fn letters(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| rng.random_range(b'a'..=b'z') as char)
        .collect()
}

/// One hostile request line: (method, target).
fn hostile_request(rng: &mut StdRng) -> (String, String) {
    match rng.random_range(0..8) {
        // Invented methods, on known paths and not.
        0 => {
            let length = rng.random_range(3..10);
            (
                letters(rng, length).to_uppercase(),
                format!("/items/{}", rng.random_range(0..100)),
            )
        }
        // Deep paths of random typed segments: 404.
        1 => {
            let depth = rng.random_range(3..12);
            let segments: Vec<String> = (0..depth)
                .map(|_| match rng.random_range(0..5) {
                    0 => format!("{}.{}", rng.random_range(0..999), rng.random_range(0..99)),
                    1 => format!(
                        "20{:02}-0{}-1{}",
                        rng.random_range(0..99),
                        rng.random_range(1..9),
                        rng.random_range(0..9)
                    ),
                    2 => format!("{:016x}", rng.random::<u64>()),
                    3 => uuid(rng),
                    _ => letters(rng, 8),
                })
                .collect();
            ("GET".to_owned(), format!("/{}", segments.join("/")))
        }
        // 2 KiB slugs on routes that answer 200 for any value.
        2 => ("GET".to_owned(), format!("/tags/{}", letters(rng, 2048))),
        3 => (
            "GET".to_owned(),
            format!("/blog/2026/{}", letters(rng, 2048)),
        ),
        // Many short values, and deep varied file paths: 200.
        4 => ("GET".to_owned(), format!("/tags/{}", letters(rng, 8))),
        5 => {
            let depth = rng.random_range(1..6);
            let parts: Vec<String> = (0..depth).map(|_| letters(rng, 6)).collect();
            ("GET".to_owned(), format!("/files/{}.bin", parts.join("/")))
        }
        6 => ("GET".to_owned(), format!("/users/{}", uuid(rng))),
        // A 2 KiB segment the app does not serve: 404.
        _ => ("GET".to_owned(), format!("/{}/x", letters(rng, 2048))),
    }
}

/// Pipelines batches of hostile requests on keep-alive connections until
/// `stop`; counts the responses read.
fn pipeline_attack(port: u16, seed: u64, stop: Arc<AtomicBool>, answered: Arc<AtomicU64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buffer = Vec::new();
        'connection: while !stop.load(Ordering::Relaxed) {
            let batch: Vec<(String, String)> = (0..20).map(|_| hostile_request(&mut rng)).collect();
            let wire: String = batch
                .iter()
                .map(|(method, target)| format!("{method} {target} HTTP/1.1\r\nHost: h\r\n\r\n"))
                .collect();
            if stream.write_all(wire.as_bytes()).is_err() {
                break;
            }
            for (method, _) in &batch {
                match read_response(&mut stream, &mut buffer, method) {
                    Ok(response) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                        if response.close {
                            break 'connection;
                        }
                    }
                    Err(_) => break 'connection,
                }
            }
        }
    }
}

/// Requests a server must refuse, and bytes that are not HTTP/1.x at all.
fn garbage_attack(port: u16, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let shapes: [&[u8]; 7] = [
        b"POST /items HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /items HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
        b"POST /items HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /items HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xde\xad\xbe\xef\x00\x00\x00",
        b"\x00\xff\x13\x37GET / HTTP/1.1\r\n\r\n\x7f\x80",
    ];
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = stream.write_all(shapes[n % shapes.len()]);
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 4096]);
            sent.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
    }
}

/// Opens slow heads of ~60 KiB, written a line at a time, never finished.
fn slow_heads(port: u16, stop: Arc<AtomicBool>) -> Vec<TcpStream> {
    let mut streams: Vec<TcpStream> = (0..SLOW_HEADS)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    for stream in &mut streams {
        let _ = stream.write_all(b"GET /items/1 HTTP/1.1\r\nHost: h\r\n");
    }
    for line in 0..60 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        for stream in &mut streams {
            let _ = stream.write_all(format!("X-Pad-{line}: {}\r\n", "p".repeat(1000)).as_bytes());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    streams
}

/// Requests the app serves, and the path label each must get.
fn legitimate() -> Vec<(&'static str, &'static str)> {
    vec![
        ("/items/7", "/items/<int>"),
        ("/items/42/reviews", "/items/<int>/reviews"),
        ("/users/me", "/users/me"),
        ("/health", "/health"),
        ("/prices/9.99", "/prices/<float>"),
    ]
}

fn duration_count(samples: &[Sample], port: &str, path: &str) -> u64 {
    samples
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .filter(|s| s.labels.get("port").map(String::as_str) == Some(port))
        .filter(|s| s.labels.get("path").map(String::as_str) == Some(path))
        .filter(|s| s.labels.get("status").map(String::as_str) == Some("200"))
        .map(|s| s.value as u64)
        .sum()
}

/// Literal segments of the app's routes (and the labels with no route).
const SERVED_LITERALS: [&str; 18] = [
    "items", "featured", "reviews", "users", "me", "orders", "files", "meta", "prices", "tags",
    "related", "blog", "docs", "search", "lang", "reports", "boom", "health",
];

#[test]
fn an_adversary_cannot_grow_blind_or_fool_the_agent() {
    let venv = require_prerequisites();
    let app = App::start_fixture(&venv, "routes_app", Server::GunicornGthread, false, &[]);
    let slow_target = App::start_fixture(&venv, "routes_app", Server::Werkzeug, false, &[]);
    let port = app.port.to_string();
    // The learner under attack: rules from the app's source would name the
    // legitimate routes without it.
    let exporter = Exporter::start(&["--route-discovery", "off"]);
    let pid = exporter.process.child.id();

    // The app's own traffic first, so its routes are known.
    for round in 0..20 {
        for (target, _) in legitimate() {
            let target = target.replace("/7", &format!("/{}", 7 + round));
            assert_eq!(http_get(app.port, &target).expect("request").status, 200);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_before = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let garbage = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut attackers = Vec::new();
    for seed in 0..4 {
        let (stop, answered) = (stop.clone(), answered.clone());
        attackers.push(std::thread::spawn(move || {
            pipeline_attack(app.port, seed, stop, answered)
        }));
    }
    {
        let (stop, garbage) = (stop.clone(), garbage.clone());
        attackers.push(std::thread::spawn(move || {
            garbage_attack(app.port, stop, garbage)
        }));
    }
    let slow = {
        let stop = stop.clone();
        let port = slow_target.port;
        std::thread::spawn(move || slow_heads(port, stop))
    };
    let mut healthy_throughout = true;
    let made = || answered.load(Ordering::Relaxed) + garbage.load(Ordering::Relaxed);
    while started.elapsed() < ATTACK || (made() < MIN_HOSTILE && started.elapsed() < ATTACK_LIMIT) {
        std::thread::sleep(Duration::from_secs(2));
        healthy_throughout &= exporter.status_of("/healthz") == 200;
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.join().expect("attacker");
    }
    let slow_streams = slow.join().expect("slow heads");
    let attack_time = started.elapsed();
    let hostile = answered.load(Ordering::Relaxed) + garbage.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kib(pid);
    drop(slow_streams);

    let response = http_get_at(exporter.address, "/metrics").expect("metrics");
    let text = String::from_utf8_lossy(&response.body).into_owned();
    let samples = parse_exposition(&text);
    let longest_label = samples
        .iter()
        .flat_map(|s| s.labels.values())
        .map(String::len)
        .max()
        .unwrap_or(0);
    let paths: BTreeSet<String> = samples
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .filter(|s| s.labels.get("port") == Some(&port))
        .filter_map(|s| s.labels.get("path").cloned())
        .collect();
    let series = samples
        .iter()
        .filter(|s| s.name.starts_with("flask_http_request"))
        .count();
    let budgets: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "flask_ebpf_exporter_budget_exhausted_total" && s.value > 0.0)
        .map(|s| format!("{}={}", s.labels["budget"], s.value))
        .collect();
    eprintln!(
        "hostile run: {hostile} requests and connections in {attack_time:?}; exporter RSS {rss_before} KiB before, {rss_after} KiB after; /metrics {} bytes, {series} request series, longest label {longest_label} bytes; budgets hit: {budgets:?}; paths {paths:?}",
        text.len()
    );

    assert!(attack_time >= Duration::from_secs(30));
    assert!(
        hostile >= MIN_HOSTILE,
        "only {hostile} hostile requests in {attack_time:?}"
    );
    assert!(healthy_throughout, "/healthz failed during the attack");
    assert_eq!(exporter.status_of("/healthz"), 200);
    assert!(
        rss_after.saturating_sub(rss_before) <= 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert!(
        text.len() <= 1024 * 1024,
        "/metrics is {} bytes",
        text.len()
    );
    assert!(longest_label <= 1024, "a label of {longest_label} bytes");
    for path in &paths {
        let attacker_only: Vec<&str> = path
            .split('/')
            .filter(|segment| !segment.is_empty() && !segment.starts_with('<'))
            .filter(|segment| *segment != "None" && !SERVED_LITERALS.contains(segment))
            .collect();
        assert!(
            attacker_only.is_empty(),
            "{path} is made of segments only the attacker sent"
        );
    }

    // Legitimate requests afterwards count exactly, under their templates.
    let before: Vec<u64> = legitimate()
        .iter()
        .map(|(_, label)| duration_count(&samples, &port, label))
        .collect();
    for (target, _) in legitimate() {
        for _ in 0..10 {
            assert_eq!(http_get(app.port, target).expect("request").status, 200);
        }
    }
    let expected: Vec<u64> = before.iter().map(|count| count + 10).collect();
    let counted = |samples: &Vec<Sample>| -> Vec<u64> {
        legitimate()
            .iter()
            .map(|(_, label)| duration_count(samples, &port, label))
            .collect()
    };
    let after = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| counted(s) == expected,
    );
    assert_eq!(counted(&after), expected, "{:?}", legitimate());
}

/// An app answers with whatever status a client asks for (Werkzeug sends
/// "999 UNKNOWN"): statuses outside 100–599 share one value, and past the
/// series budget new statuses count under their class, in the request
/// totals as in the durations, every request still counted.
#[test]
fn statuses_a_client_chooses_stay_few() {
    const BUDGET: usize = 12;
    let venv = require_prerequisites();
    let app = App::start_fixture(&venv, "statuses", Server::GunicornGthread, false, &[]);
    let budget = BUDGET.to_string();
    let exporter = Exporter::start(&["--max-series-per-workload", &budget]);
    let port = app.port.to_string();
    let mut sent = 0;
    for code in [200, 404, 600, 999, 700]
        .into_iter()
        .chain(201..260)
        .chain(500..520)
    {
        let response = http_get(app.port, &format!("/status/{code}")).expect("request");
        assert_eq!(u32::from(response.status), code);
        sent += 1;
    }
    let of_app = |samples: &[Sample], name: &str| -> Vec<Sample> {
        samples
            .iter()
            .filter(|s| s.name == name && s.labels.get("port") == Some(&port))
            .cloned()
            .collect()
    };
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| {
            let totals = of_app(samples, "flask_http_request_total");
            totals.iter().map(|s| s.value).sum::<f64>() >= f64::from(sent)
        },
    );
    let totals = of_app(&samples, "flask_http_request_total");
    let durations = of_app(&samples, "flask_http_request_duration_seconds_count");
    for family in [&totals, &durations] {
        assert_eq!(family.iter().map(|s| s.value).sum::<f64>(), f64::from(sent));
    }
    let count_of = |family: &[Sample], status: &str| -> f64 {
        family
            .iter()
            .filter(|s| s.labels.get("status").map(String::as_str) == Some(status))
            .map(|s| s.value)
            .sum()
    };
    // 600, 999 and 700 are not HTTP's.
    assert_eq!(count_of(&totals, "<other>"), 3.0, "{totals:?}");
    assert_eq!(count_of(&totals, "200"), 1.0);
    assert!(count_of(&totals, "2xx") > 0.0 && count_of(&totals, "5xx") > 0.0);
    // The budget, then one series per class made past it.
    assert!(
        totals.len() + durations.len() <= BUDGET + 2 * 2,
        "{} series: {totals:?} {durations:?}",
        totals.len() + durations.len()
    );
    assert!(
        labelled(
            &samples,
            "flask_ebpf_exporter_budget_exhausted_total",
            "budget",
            "series"
        ) > 0.0
    );
    for sample in totals.iter().chain(&durations) {
        let status = &sample.labels["status"];
        let exact = status
            .parse::<u16>()
            .is_ok_and(|code| (100..600).contains(&code));
        assert!(
            exact || ["<other>", "2xx", "5xx"].contains(&status.as_str()),
            "{status}"
        );
    }
}

/// Two servers whose clients choose their statuses, flooding both: past
/// the node's bound (`--max-series`) neither makes a new series, whichever
/// asks, and the series made before the flood keep counting exactly.
#[test]
fn the_node_bound_holds_across_servers_under_a_flood() {
    const NODE_BUDGET: usize = 6;
    let venv = require_prerequisites();
    let apps =
        [0, 1].map(|_| App::start_fixture(&venv, "statuses", Server::GunicornGthread, false, &[]));
    let ports = apps.each_ref().map(|app| app.port.to_string());
    // Only these two servers: the other tests' servers, which share the
    // node, would fill the bound too.
    let exporter = Exporter::start(&[
        "--max-series",
        &NODE_BUDGET.to_string(),
        "--port",
        &ports.join(","),
    ]);
    // The legitimate series fill the node's bound: a duration and a request
    // total for 200 on both servers, and for 201 on the first.
    let legitimate = [(0, 200), (1, 200), (0, 201)];
    let send_legitimate = || {
        for (app, code) in legitimate {
            let target = format!("/status/{code}");
            assert_eq!(
                http_get(apps[app].port, &target).expect("request").status,
                code
            );
        }
    };
    let exact = |samples: &[Sample], app: usize, code: u16| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == "flask_http_request_duration_seconds_count")
            .filter(|s| s.labels.get("port") == Some(&ports[app]))
            .filter(|s| s.labels.get("status") == Some(&code.to_string()))
            .map(|s| s.value)
            .sum()
    };
    let counted = |samples: &Vec<Sample>| legitimate.map(|(app, code)| exact(samples, app, code));
    send_legitimate();
    let before = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| counted(samples) == [1.0; 3],
    );
    assert_eq!(counted(&before), [1.0; 3]);

    // The flood: every status a client may choose, on both servers, from
    // four clients at once.
    let flood: Vec<std::thread::JoinHandle<u64>> = (0..4)
        .map(|client| {
            let ports = apps.each_ref().map(|app| app.port);
            std::thread::spawn(move || {
                let mut sent = 0;
                for code in (202..300).chain(500..600).filter(|code| code % 4 == client) {
                    for port in ports {
                        http_get(port, &format!("/status/{code}")).expect("request");
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let flooded: u64 = flood.into_iter().map(|c| c.join().expect("client")).sum();
    send_legitimate();
    let after = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| counted(samples) == [2.0; 3],
    );
    assert_eq!(counted(&after), [2.0; 3], "the legitimate series, exact");
    let of_servers: Vec<&Sample> = after
        .iter()
        .filter(|s| {
            s.name == "flask_http_request_duration_seconds_count"
                || s.name == "flask_http_request_total"
        })
        .filter(|s| ports.iter().any(|port| s.labels.get("port") == Some(port)))
        .collect();
    let exact_series = of_servers
        .iter()
        .filter(|s| s.labels["status"].parse::<u16>().is_ok())
        .count();
    let everything: f64 = of_servers
        .iter()
        .filter(|s| s.name == "flask_http_request_total")
        .map(|s| s.value)
        .sum();
    eprintln!(
        "{flooded} flooding requests on two servers: {exact_series} series of exact statuses, {} in all",
        of_servers.len()
    );
    assert_eq!(exact_series, NODE_BUDGET, "the node's bound, and no more");
    assert_eq!(everything, flooded as f64 + 6.0, "every request counted");
    assert!(
        labelled(
            &after,
            "flask_ebpf_exporter_budget_exhausted_total",
            "budget",
            "node_series"
        ) > 0.0
    );
    assert_eq!(
        labelled(
            &after,
            "flask_ebpf_exporter_budget_exhausted_total",
            "budget",
            "series"
        ),
        0.0
    );
}

/// Whether the agent closed `stream` within `within` (EOF or reset).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut byte = [0u8; 512];
    loop {
        match std::io::Read::read(stream, &mut byte) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Anyone who reaches the node reaches /metrics: connections that send
/// nothing, send a head a byte at a time, or idle after a response are
/// closed at the header timeout; past the connection limit a connection
/// is closed at once. Each is counted, and scrapes go on.
#[test]
fn the_agents_own_port_bounds_its_connections() {
    let exporter = Exporter::start(&["--http-max-connections", "4", "--http-header-timeout", "1s"]);
    let counted = |name: &str| labelled(&exporter.metrics(), name, "listener", "metrics");
    let refused_before = counted("flask_ebpf_exporter_http_connections_refused_total");
    let mut silent: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(exporter.address).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut one_too_many = TcpStream::connect(exporter.address).expect("connect");
    assert!(
        closed_within(&mut one_too_many, Duration::from_millis(500)),
        "a fifth connection was served"
    );
    // The silent four go at the header timeout.
    for stream in &mut silent {
        assert!(closed_within(stream, Duration::from_secs(3)), "still open");
    }
    // A head sent a byte every 200 ms does not keep its connection.
    let mut trickle = TcpStream::connect(exporter.address).expect("connect");
    let started = Instant::now();
    for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" {
        if trickle.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    assert!(closed_within(&mut trickle, Duration::from_secs(2)));
    assert!(started.elapsed() < Duration::from_secs(5));
    // A kept-alive connection idle after its response goes as well.
    let mut idle = TcpStream::connect(exporter.address).expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut answer = [0u8; 64];
    let read = std::io::Read::read(&mut idle, &mut answer).expect("answer");
    assert!(answer[..read].starts_with(b"HTTP/1.1 200"));
    assert!(closed_within(&mut idle, Duration::from_secs(3)));

    let samples = eventually(
        Duration::from_secs(5),
        || exporter.metrics(),
        |samples| {
            labelled(
                samples,
                "flask_ebpf_exporter_http_connections_timed_out_total",
                "listener",
                "metrics",
            ) >= 6.0
        },
    );
    let of_metrics = |name: &str| labelled(&samples, name, "listener", "metrics");
    assert_eq!(
        of_metrics("flask_ebpf_exporter_http_connections_refused_total") - refused_before,
        1.0
    );
    assert_eq!(
        of_metrics("flask_ebpf_exporter_http_connections_timed_out_total"),
        6.0
    );
    // Only the scrape that read these is open.
    assert_eq!(of_metrics("flask_ebpf_exporter_http_connections"), 1.0);
    assert_eq!(exporter.status_of("/healthz"), 200);
}
