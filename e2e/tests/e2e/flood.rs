//! A flood the agent cannot keep up with, on the real kernel. It lives in a
//! module of its own: `cargo xtask test` runs modules one after another, so
//! its 40 s of wrk never share the node with another test's exporter (a
//! small ring buffer elsewhere would lose that test's traffic to it).

use flask_ebpf_exporter_e2e as support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::*;

/// A v1 cpu cgroup of this test's that holds a process to a share of a
/// CPU; the process goes back to the root cgroup when dropped.
struct Throttled {
    dir: std::path::PathBuf,
    pid: u32,
}

impl Throttled {
    fn new(pid: u32, percent_of_a_cpu: u32) -> Throttled {
        let dir = std::path::PathBuf::from(format!("/sys/fs/cgroup/cpu/fbe-throttle-{pid}"));
        std::fs::create_dir(&dir).expect("cpu cgroup");
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000").expect("period");
        std::fs::write(
            dir.join("cpu.cfs_quota_us"),
            (percent_of_a_cpu * 1000).to_string(),
        )
        .expect("quota");
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("move");
        Throttled { dir, pid }
    }
}

impl Drop for Throttled {
    fn drop(&mut self) {
        let _ = std::fs::write("/sys/fs/cgroup/cpu/cgroup.procs", self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_flood_it_cannot_keep_up_with_does_not_wedge_the_agent() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornSync, false);
    let exporter = Exporter::start(&["--port", &app.port.to_string()]);
    // Held to 3 % of a CPU, the agent reads far fewer events than wrk's
    // traffic makes: the ring buffer never empties for 40 s.
    let throttled = Throttled::new(exporter.process.child.id(), 3);
    let load = Command::new("wrk")
        .args(["-t2", "-c16", "-d40s"])
        .arg(format!("http://127.0.0.1:{}/items/1", app.port))
        .stdout(Stdio::null())
        .spawn()
        .expect("wrk");
    std::thread::sleep(Duration::from_secs(36));
    // Past the 30 s after which a loop that never turns counts as stalled.
    let alive = http_get_at(exporter.address, "/healthz").map(|r| (r.status, r.body));
    let mut load = load;
    let _ = load.wait();
    drop(throttled);
    let (status, body) = alive.expect("healthz answers");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let samples = exporter.metrics();
    assert!(
        value(&samples, "flask_ebpf_exporter_events_lost_total") > 0.0,
        "the flood overflowed the ring buffer"
    );
}
