//! A server exits and another process gets its pid at once (the host's
//! pid_max may be small, and pods fork). What the agent kept by pid (the
//! identity of a listening socket, its verdicts) must not carry over: the
//! new server's requests count under its own labels. Real kernel, real
//! servers; the pid is handed over with `ns_last_pid`, as CRIU does. In a
//! module of its own (`cargo xtask test` runs modules one after another), so
//! no other test forks in between.

use flask_ebpf_exporter_e2e as support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::*;

/// Python's own HTTP server on `port`, answering 200 for `/`.
fn http_server(venv: &std::path::Path, port: u16) -> Running {
    let server = spawn_process(
        "http.server",
        Command::new(venv.join("bin/python"))
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(std::env::temp_dir()),
    );
    wait_for_port(port, Duration::from_secs(10));
    server
}

/// Requests counted for the server on `port`.
fn counted(exporter: &Exporter, port: u16) -> f64 {
    labelled(
        &exporter.metrics(),
        "flask_http_request_total",
        "port",
        &port.to_string(),
    )
}

/// The next process forked on the host gets `pid` (when nothing else forks
/// first).
fn hand_over(pid: u32) {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
        .expect("write ns_last_pid (root, host pid namespace)");
}

#[test]
fn a_reused_pid_is_not_taken_for_the_server_that_had_it() {
    let venv = require_prerequisites();
    let exporter = Exporter::start(&["--route-discovery", "off"]);
    let (first_port, second_port) = (free_port(), free_port());

    let first = http_server(&venv, first_port);
    let pid = first.child.id();
    for _ in 0..3 {
        assert_eq!(http_get(first_port, "/").expect("request").status, 200);
    }
    let before = eventually(
        Duration::from_secs(10),
        || counted(&exporter, first_port),
        |count| *count >= 3.0,
    );
    assert_eq!(before, 3.0);
    drop(first);

    // Another server under the same pid, within the agent's reap interval.
    let started = Instant::now();
    let second = loop {
        hand_over(pid);
        let candidate = http_server(&venv, second_port);
        if candidate.child.id() == pid {
            break candidate;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "pid {pid} was not handed over"
        );
    };
    println!("pid {pid} reused after {:?}", started.elapsed());
    for _ in 0..4 {
        assert_eq!(http_get(second_port, "/").expect("request").status, 200);
    }
    let second_count = eventually(
        Duration::from_secs(10),
        || counted(&exporter, second_port),
        |count| *count >= 4.0,
    );
    assert_eq!(
        (counted(&exporter, first_port), second_count),
        (3.0, 4.0),
        "the second server's requests under its own port, none under the first's"
    );
    drop(second);
}
