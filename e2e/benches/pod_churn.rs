//! Memory under pod churn: the real exporter in Kubernetes mode while pods
//! come and go. Each cycle creates a kubelet-style cgroup, a Pod object in
//! the in-test API server and a real HTTP server process in the cgroup,
//! sends it three requests, then deletes pod, process and cgroup (a few
//! pods overlap). Prints the exporter's resident memory after warm-up and
//! at the end, and checks that nothing of the deleted pods stays behind.
//!
//! `cargo bench -p flask-ebpf-exporter-e2e --bench pod_churn` runs 1,000 cycles
//! (`POD_CHURN_CYCLES` sets another number); under `cargo test` the same
//! code runs 30 as a check (root and the venv are needed either way).

use flask_ebpf_exporter_e2e as support;

use std::{
    collections::VecDeque,
    process::Command,
    time::{Duration, Instant},
};

use support::{
    cgroups::{Driver, PodCgroups},
    kube_api::{KubeApi, PodSpec, PodUids, container_id, pod},
    *,
};

const NODE: &str = "node-a";
/// This file's pod UIDs.
const PODS: PodUids = PodUids(0xc4c4);
const NAMESPACE: &str = "churn";
/// Pods alive at once.
const OVERLAP: usize = 4;

struct ChurnPod {
    n: usize,
    // Before the cgroups: the process exits before they are removed.
    server: Running,
    _cgroups: PodCgroups,
}

fn start_pod(venv: &std::path::Path, api: &KubeApi, n: usize) -> ChurnPod {
    let cgroups = PodCgroups::create(Driver::Systemd, &PODS.uid(n), &container_id(n));
    let id = container_id(n);
    let name = format!("churn-{n}");
    api.put_pod(pod(&PodSpec {
        namespace: NAMESPACE,
        name: &name,
        uid: &PODS.uid(n),
        node: NODE,
        owner: None,
        containers: &[("web", Some(&id))],
        annotations: &[],
    }));
    let port = free_port();
    let mut server = Command::new(venv.join("bin/python"));
    server.args([
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        &port.to_string(),
    ]);
    // The wrapper is what runs: directory and output are set on it.
    let mut server = in_cgroups(&server, &cgroups.procs_files());
    server
        .current_dir(workspace().join("tests/fixtures"))
        .stderr(std::process::Stdio::null());
    let server = spawn_process(&name, &mut server);
    wait_for_port(port, Duration::from_secs(10));
    for target in ["/", "/app.py", &format!("/missing-{}", n % 5)] {
        http_get(port, target).expect("request");
    }
    ChurnPod {
        n,
        server,
        _cgroups: cgroups,
    }
}

fn end_pod(api: &KubeApi, churned: ChurnPod) {
    drop(churned.server);
    api.delete_pod(NAMESPACE, &format!("churn-{}", churned.n));
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let cycles = std::env::var("POD_CHURN_CYCLES")
        .ok()
        .and_then(|cycles| cycles.parse().ok())
        .unwrap_or(if full { 1000 } else { 30 });
    let warm_up = cycles / 10;
    let venv = require_prerequisites();
    let api = KubeApi::start();
    let exporter = Exporter::start(&api.exporter_args(NODE, &["--deleted-pod-grace", "1s"]));
    let pid = exporter.process.child.id();
    let rss_start = rss_kib(pid);

    let started = Instant::now();
    let mut live = VecDeque::new();
    let mut rss_warm = 0;
    // RSS at every tenth of the run, to tell a plateau from a leak.
    let mut rss_steps = Vec::new();
    for n in 0..cycles {
        live.push_back(start_pod(&venv, &api, n));
        if live.len() > OVERLAP
            && let Some(oldest) = live.pop_front()
        {
            end_pod(&api, oldest);
        }
        if n + 1 == warm_up {
            rss_warm = rss_kib(pid);
        }
        if (n + 1) % warm_up.max(1) == 0 {
            rss_steps.push((n + 1, rss_kib(pid)));
        }
    }
    while let Some(pod) = live.pop_front() {
        end_pod(&api, pod);
    }
    let churn_time = started.elapsed();

    // After the grace period every churned pod is gone from the exporter.
    let settled = |samples: &Vec<Sample>| {
        value(samples, "flask_ebpf_exporter_kubernetes_pods") == 0.0
            && value(samples, "flask_ebpf_exporter_identities_removed_total") >= cycles as f64
    };
    let samples = eventually(Duration::from_secs(30), || exporter.metrics(), settled);
    let rss_end = rss_kib(pid);
    let leftover = samples
        .iter()
        .filter(|s| s.labels.get("namespace").is_some_and(|ns| ns == NAMESPACE))
        .count();
    println!(
        "pod churn: {cycles} create/delete cycles in {:.1} s ({:.1} cycles/s), 3 requests per pod",
        churn_time.as_secs_f64(),
        cycles as f64 / churn_time.as_secs_f64()
    );
    println!("| exporter RSS | KiB |");
    println!("|---|---|");
    println!("| after start | {rss_start} |");
    println!("| after {warm_up} cycles | {rss_warm} |");
    println!("| after {cycles} cycles, grace over | {rss_end} |");
    let steps: Vec<String> = rss_steps
        .iter()
        .map(|(cycle, kib)| format!("{cycle}: {kib}"))
        .collect();
    println!("RSS (KiB) during the run, by cycle: {}", steps.join(", "));
    println!(
        "growth from warm-up to end: {:+} KiB ({:.3}×)",
        rss_end as i64 - rss_warm as i64,
        rss_end as f64 / rss_warm.max(1) as f64
    );
    println!(
        "series left of deleted pods: {leftover}; pods known: {}; label sets removed: {}; unattributed requests: {}",
        value(&samples, "flask_ebpf_exporter_kubernetes_pods"),
        value(&samples, "flask_ebpf_exporter_identities_removed_total"),
        value(&samples, "flask_ebpf_exporter_unattributed_requests_total"),
    );
    assert!(
        settled(&samples),
        "deleted pods still known to the exporter"
    );
    assert_eq!(leftover, 0, "series of deleted pods still exported");
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_unattributed_requests_total"),
        0.0
    );
}
