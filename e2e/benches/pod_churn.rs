//! Memory under pod churn: the real exporter in Kubernetes mode while pods
//! come and go. Each cycle creates a kubelet-style cgroup, a Pod object in
//! the in-test API server and a real HTTP server process in the cgroup,
//! sends it three requests, then deletes pod, process and cgroup (a few
//! pods overlap). The pods belong to a Deployment rolled out every
//! [`PODS_PER_ROLLOUT`] pods (a new ReplicaSet each time). Prints the
//! exporter's resident memory after warm-up and at the end, and the
//! requests it made of the API server, per new pod and per second; checks
//! that nothing of the deleted pods stays behind.
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
    kube_api::{KubeApi, PodSpec, PodUids, container_id, owned_by, pod},
    *,
};

const NODE: &str = "node-a";
/// This file's pod UIDs.
const PODS: PodUids = PodUids(0xc4c4);
const NAMESPACE: &str = "churn";
/// Pods alive at once.
const OVERLAP: usize = 4;
/// Pods created per ReplicaSet of the churned Deployment.
const PODS_PER_ROLLOUT: usize = 10;

/// The ReplicaSet pod `n` belongs to.
fn replica_set(n: usize) -> String {
    format!("web-{:08x}", n / PODS_PER_ROLLOUT)
}

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
    let replica_set = replica_set(n);
    if n.is_multiple_of(PODS_PER_ROLLOUT) {
        api.put_object(owned_by(
            "ReplicaSet",
            NAMESPACE,
            &replica_set,
            ("Deployment", "web"),
        ));
    }
    api.put_pod(pod(&PodSpec {
        namespace: NAMESPACE,
        name: &name,
        uid: &PODS.uid(n),
        node: NODE,
        owner: Some(("ReplicaSet", &replica_set)),
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
    api_load(&api.requests(), cycles, churn_time);
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

/// The requests the exporter made of the API server, by kind: the pod
/// list and watch of its node, and owner lookups.
fn api_load(requests: &[String], pods: usize, took: Duration) {
    let count = |kind: &dyn Fn(&str) -> bool| requests.iter().filter(|r| kind(r)).count();
    let pod_lists = count(&|r| r.contains("/api/v1/pods") && !r.contains("watch=true"));
    let pod_watches = count(&|r| r.contains("/api/v1/pods") && r.contains("watch=true"));
    let replica_sets = count(&|r| r.contains("/replicasets/"));
    let other = requests.len() - pod_lists - pod_watches - replica_sets;
    let seconds = took.as_secs_f64();
    println!(
        "API requests over {pods} new pods in {seconds:.0} s ({:.2} pods/s), {} ReplicaSets:",
        pods as f64 / seconds,
        pods.div_ceil(PODS_PER_ROLLOUT)
    );
    println!("| request | count | per new pod | per second |");
    println!("|---|---|---|---|");
    for (kind, n) in [
        ("list pods (fieldSelector spec.nodeName)", pod_lists),
        ("watch pods (fieldSelector spec.nodeName)", pod_watches),
        ("get ReplicaSet (owner lookup, cached)", replica_sets),
        ("other", other),
    ] {
        println!(
            "| {kind} | {n} | {:.3} | {:.3} |",
            n as f64 / pods as f64,
            n as f64 / seconds
        );
    }
    assert!(
        replica_sets <= pods.div_ceil(PODS_PER_ROLLOUT),
        "one lookup per ReplicaSet at most: {replica_sets}"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName")),
        "only this node's pods"
    );
}
