//! What the exporter does when the host is not as it needs: no privileges,
//! no tracefs, a ring buffer too small for the traffic (a flood it cannot
//! keep up with is in flood.rs). Real kernel, real binary; the tracefs case
//! runs in a private mount namespace.

use flask_ebpf_exporter_e2e as support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

fn run_to_exit(command: &mut Command) -> (i32, String) {
    let output = command.stdin(Stdio::null()).output().expect("run exporter");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs the exporter under `setpriv` with the given privilege changes; it
/// must fail, naming the capabilities it lacks. Returns what it wrote to
/// stderr.
fn refused_under_setpriv(setpriv_args: &[&str]) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, stderr) = run_to_exit(
        Command::new("setpriv")
            .args(setpriv_args)
            .arg(support::agent_binary())
            .args(["--listen", &listen, "--debug-listen", "127.0.0.1:0"]),
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("cannot capture: missing capabilities: CAP_BPF"),
        "{stderr}"
    );
    stderr
}

#[test]
fn without_privileges_it_exits_naming_what_is_missing() {
    require_prerequisites();
    let as_nobody = refused_under_setpriv(&[
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]);
    assert!(
        as_nobody.contains("add BPF, PERFMON, SYS_PTRACE, DAC_READ_SEARCH"),
        "{as_nobody}"
    );

    // Root without the BPF capabilities (CAP_SYS_ADMIN would stand in for
    // them) is told exactly those two.
    let without_caps = refused_under_setpriv(&[
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-bpf,-perfmon,-sys_admin",
    ]);
    assert!(
        without_caps.contains("add BPF, PERFMON to the container's"),
        "{without_caps}"
    );
}

#[test]
fn without_tracefs_it_exits_saying_how_to_mount_it() {
    require_prerequisites();
    let listen = format!("127.0.0.1:{}", free_port());
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; \
         umount /sys/kernel/debug 2>/dev/null; exec {} --listen {listen} --debug-listen 127.0.0.1:0",
        support::agent_binary().display()
    );
    let (code, stderr) = run_to_exit(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_ne!(code, 0);
    assert!(stderr.contains("tracefs is not mounted"), "{stderr}");
    assert!(
        stderr.contains("mount -t tracefs tracefs /sys/kernel/tracing"),
        "{stderr}"
    );
}

#[test]
fn ring_buffer_overflow_is_counted_and_later_traffic_is_exact() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornGthread, false);
    // One page of ring buffer: an event carrying a full 4 KiB copy cannot
    // fit, so the kernel must drop it. /cookie's 5 KiB response head makes
    // one every time (a large body would not: the agent has the kernel
    // count its bytes without copying them, once it has read the head).
    let exporter = Exporter::start(&[
        "--path-label",
        "raw",
        "--port",
        &app.port.to_string(),
        "--ring-buffer-bytes",
        "4096",
    ]);
    let port = app.port;
    // The agent must be following this server before the burst, or the
    // burst may pass unseen on a cold machine: a request it has counted
    // shows that (the small events of "/" fit the page).
    assert_eq!(http_get(port, "/").expect("get /").status, 200);
    let root_counted = |samples: &[Sample]| {
        samples.iter().any(|s| {
            s.name == "flask_http_request_duration_seconds_count"
                && s.labels.get("path").map(String::as_str) == Some("/")
                && s.value >= 1.0
        })
    };
    let before = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| root_counted(s),
    );
    assert!(
        root_counted(&before),
        "the agent counted the request before the burst"
    );
    let burst: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut sent = 0u64;
                for _ in 0..25 {
                    if http_get(port, "/cookie").is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let burst_sent: u64 = burst
        .into_iter()
        .map(|t| t.join().expect("burst thread"))
        .sum();
    assert!(burst_sent > 0, "the app served the burst");
    let after_burst = eventually(
        Duration::from_secs(5),
        || exporter.metrics(),
        |s| value(s, "flask_ebpf_exporter_events_lost_total") > 0.0,
    );
    assert!(
        value(&after_burst, "flask_ebpf_exporter_events_lost_total") > 0.0,
        "the burst overflowed the ring buffer"
    );
    let counted_in_burst = value(&after_burst, "flask_http_request_total");
    assert!(
        counted_in_burst <= burst_sent as f64,
        "never more than was served"
    );
    assert_eq!(
        http_get(exporter.port, "/healthz").expect("healthz").status,
        200
    );

    // Quiet traffic afterwards is counted exactly.
    for _ in 0..20 {
        assert_eq!(http_get(port, "/items/5").expect("get").status, 200);
    }
    let port_label = port.to_string();
    let items = |samples: &[Sample]| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == "flask_http_request_duration_seconds_count")
            .filter(|s| {
                s.labels.get("port") == Some(&port_label)
                    && s.labels.get("path").map(String::as_str) == Some("/items/5")
            })
            .map(|s| s.value)
            .sum()
    };
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |s| items(s) >= 20.0,
    );
    assert_eq!(items(&samples), 20.0);
}
