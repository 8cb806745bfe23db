//! The scale model: what one node's agent exports, and what that costs
//! Prometheus. The agent's own stages (`pipeline::Stages`: attribution,
//! routes, metrics) are driven with synthetic pods of a Kubernetes node:
//! 100 pods (25 Deployments × 4 replicas), each serving 20 routes × 3
//! statuses, then 1,000 churn cycles in which a pod is deleted and a new
//! replica of its workload serves. No kernel is involved: requests enter
//! as the stream stage hands them on, with the identities the pod index
//! gives them, and pods are deleted and purged as the watch and the
//! upkeep do.
//!
//! Printed per grain (`--aggregate-by container`, the default, and
//! `workload`): series on /metrics, its bytes, encode time per scrape, the
//! process's RSS and live heap (each grain in a fresh process). Then the
//! real Prometheus (Debian's package) scrapes the default grain's /metrics
//! every 5 s for 3 minutes while traffic goes on; its memory per head
//! series is printed beside the agent's figures.
//!
//! `cargo bench -p flask-ebpf-exporter-e2e --bench scale` runs the full
//! model; under `cargo test`, 12 pods, 20 cycles and 15 s of Prometheus, as
//! a check. Either way it fails if churned pods leave series behind.

use flask_ebpf_exporter_e2e as support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::VecDeque,
    io::{Read as _, Write as _},
    net::TcpListener,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser as _;
use flask_ebpf_exporter::{
    config::Config,
    exchange::{CapturedExchange, ContainerRef, Exchange, PodGrain, PodUid, Queued, ServedBy},
    identity::{
        IdentityStage,
        containers::PodIdentity,
        pods::{PodIndex, PodInfo, Selection, SharedPodIndex, Workload, lock_index},
    },
    metrics::NoNetwork,
    pipeline::{HandOffs, Stages},
    telemetry::{Budgets, encode},
};
use prometheus::{IntGauge, Registry};
use support::{
    kube_api::{PodSpec, PodUids, container_id, pod},
    *,
};

/// Bytes the heap holds now (a counting allocator).
struct CountingAllocator;

static LIVE_HEAP: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// count is a side effect.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_HEAP.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_HEAP.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_HEAP.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as for realloc's caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const NODE: &str = "node-a";
const PODS: PodUids = PodUids(0x5ca1);
const REPLICAS: usize = 4;
const ROUTES: usize = 20;
const STATUSES: [u16; 3] = [200, 404, 500];

/// The model's size.
#[derive(Clone, Copy)]
struct Size {
    pods: usize,
    churn: usize,
    prometheus_for: Duration,
    scrape_every: Duration,
}

impl Size {
    fn new(full: bool) -> Size {
        match full {
            true => Size {
                pods: 100,
                churn: 1000,
                prometheus_for: Duration::from_secs(180),
                scrape_every: Duration::from_secs(5),
            },
            false => Size {
                pods: 12,
                churn: 20,
                prometheus_for: Duration::from_secs(15),
                scrape_every: Duration::from_secs(1),
            },
        }
    }
}

/// A synthetic pod: which container its server runs in, and its pid.
struct SyntheticPod {
    n: usize,
    container: Arc<ContainerRef>,
}

/// One node's agent stages, its pods, and the traffic they serve.
struct Node {
    registry: Registry,
    stages: Stages,
    hand_offs: HandOffs,
    index: SharedPodIndex,
    live: VecDeque<SyntheticPod>,
    clock_ns: u64,
    sent: u64,
}

impl Node {
    fn new(grain: PodGrain) -> Node {
        let rules: Vec<String> = (0..ROUTES)
            .map(|route| format!("--route=GET /api/r{route}/<int:id>"))
            .collect();
        let grain = match grain {
            PodGrain::Container => "container",
            PodGrain::Workload => "workload",
        };
        let mut flags = vec![
            "flask-ebpf-exporter".to_owned(),
            "--mode=kubernetes".to_owned(),
            format!("--node-name={NODE}"),
            format!("--aggregate-by={grain}"),
            "--route-discovery=off".to_owned(),
            "--deleted-pod-grace=0s".to_owned(),
        ];
        flags.extend(rules);
        let config = Config::try_parse_from(flags).expect("flags");
        let settings = config.settings().expect("valid flags");
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let flask_ebpf_exporter::config::Mode::Kubernetes { grain, .. } = settings.mode else {
            panic!("Kubernetes mode");
        };
        let index: SharedPodIndex = Arc::new(std::sync::Mutex::new(PodIndex::new(grain)));
        let pods_known = IntGauge::new("pods", "pods").expect("gauge");
        let identity = IdentityStage::Pods(PodIdentity::new(index.clone(), pods_known));
        let stages = Stages::new(settings.stages, identity, &registry, &budgets).expect("stages");
        Node {
            registry,
            stages,
            hand_offs: HandOffs::default(),
            index,
            live: VecDeque::new(),
            clock_ns: 1_000_000_000,
            sent: 0,
        }
    }

    /// Pod `n` (a replica of workload `n % workloads`) appears on the node.
    fn add_pod(&mut self, n: usize, workloads: usize) {
        let (uid, id) = (PODS.uid(n), container_id(n));
        let workload = format!("app-{}", n % workloads);
        let name = format!("{workload}-{n}");
        let object = pod(&PodSpec {
            namespace: "shop",
            name: &name,
            uid: &uid,
            node: NODE,
            owner: None,
            containers: &[("web", Some(&id))],
            annotations: &[],
        });
        let object = serde_json::from_value(object).expect("a Pod");
        let owner = Workload {
            kind: "Deployment".to_owned(),
            name: workload,
        };
        let info = PodInfo::from_pod(&object, owner, &Selection::default()).expect("pod info");
        lock_index(&self.index).apply(info, Instant::now());
        self.live.push_back(SyntheticPod {
            n,
            container: Arc::new(ContainerRef {
                pod_uid: PodUid::parse(&uid).expect("uid"),
                container_id: Some(id),
            }),
        });
    }

    /// The oldest pod is deleted, and purged as its grace period ends.
    fn delete_oldest(&mut self) {
        if let Some(gone) = self.live.pop_front() {
            lock_index(&self.index).delete(&gone.container.pod_uid, Instant::now());
        }
        self.stages.release_gone(Instant::now());
    }

    /// One request of every (route, status) to each pod in `pods`.
    fn serve(&mut self, pods: std::ops::Range<usize>) {
        for at in pods {
            let pod = &self.live[at];
            let tgid = 100_000 + pod.n as u32;
            for route in 0..ROUTES {
                for status in STATUSES {
                    self.clock_ns += 1_000_000;
                    let started_ns = self.clock_ns;
                    let exchange = Exchange {
                        method: http::Method::GET,
                        target: format!("/api/r{route}/{}", self.sent % 1000),
                        version: http::Version::HTTP_11,
                        server_port: None,
                        status,
                        started_ns,
                        // 0.5 to 64 ms: the buckets fill.
                        finished_ns: started_ns + 500_000 + (self.sent % 128) * 500_000,
                        request_bytes: 120,
                        response_bytes: 800,
                        request_body_bytes: None,
                        response_body_bytes: None,
                        queued: Some(Queued {
                            handshake_ns: started_ns - 40_000,
                            accepted_ns: started_ns - 20_000,
                        }),
                    };
                    self.hand_offs.captured.push(CapturedExchange {
                        served_by: ServedBy::Container(pod.container.clone()),
                        tgid,
                        exchange,
                    });
                    self.sent += 1;
                }
            }
        }
        self.stages.record(&mut self.hand_offs);
        self.stages
            .metrics
            .set_saturation(&Default::default(), &|_| true, &NoNetwork);
    }

    fn serve_all(&mut self) {
        self.serve(0..self.live.len());
    }
}

/// What one node exports, measured.
struct Figures {
    series: usize,
    request_series: usize,
    bytes: usize,
    encode: Duration,
    /// What Prometheus receives: the exposition gzipped (it asks for
    /// gzip), and the time that takes at the default level.
    gzip_bytes: usize,
    gzip: Duration,
    rss_kib: u64,
    heap_bytes: i64,
    removed: f64,
}

impl Figures {
    fn line(&self) -> String {
        format!(
            "FIGURES {} {} {} {} {} {} {} {} {}",
            self.series,
            self.request_series,
            self.bytes,
            self.encode.as_nanos(),
            self.gzip_bytes,
            self.gzip.as_nanos(),
            self.rss_kib,
            self.heap_bytes,
            self.removed
        )
    }

    fn parse(line: &str) -> Figures {
        let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
        let number = |at: usize| -> f64 { fields[at].parse().expect("a figure") };
        Figures {
            series: number(0) as usize,
            request_series: number(1) as usize,
            bytes: number(2) as usize,
            encode: Duration::from_nanos(number(3) as u64),
            gzip_bytes: number(4) as usize,
            gzip: Duration::from_nanos(number(5) as u64),
            rss_kib: number(6) as u64,
            heap_bytes: number(7) as i64,
            removed: number(8),
        }
    }
}

/// Builds a node of `size.pods` pods, churns it, and measures it; returns
/// the node too, still serving.
fn model(grain: PodGrain, size: Size) -> (Node, Figures) {
    let workloads = size.pods / REPLICAS;
    let heap_before = LIVE_HEAP.load(Ordering::Relaxed);
    let mut node = Node::new(grain);
    for n in 0..size.pods {
        node.add_pod(n, workloads);
    }
    node.serve_all();
    let before_churn = sample_lines(&encode(&node.registry).expect("encode"));
    for cycle in 0..size.churn {
        node.delete_oldest();
        node.add_pod(size.pods + cycle, workloads);
        let newest = node.live.len() - 1;
        node.serve(newest..newest + 1);
    }
    node.serve_all();
    let text = encode(&node.registry).expect("encode");
    let series = sample_lines(&text);
    assert_eq!(
        series, before_churn,
        "after {} churn cycles the node exports what it did before: deleted pods' series go",
        size.churn
    );
    let mut encodes: Vec<Duration> = (0..21)
        .map(|_| {
            let started = Instant::now();
            let text = encode(&node.registry).expect("encode");
            let took = started.elapsed();
            assert!(!text.is_empty());
            took
        })
        .collect();
    encodes.sort();
    let request_series = text
        .lines()
        .filter(|line| line.starts_with("flask_http_"))
        .count();
    let removed = parse_exposition(&text)
        .iter()
        .filter(|s| s.name == "flask_ebpf_exporter_identities_removed_total")
        .map(|s| s.value)
        .sum();
    let gzip_started = Instant::now();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(text.as_bytes()).expect("gzip");
    let gzipped = gzip.finish().expect("gzip");
    let figures = Figures {
        series,
        request_series,
        bytes: text.len(),
        encode: encodes[encodes.len() / 2],
        gzip_bytes: gzipped.len(),
        gzip: gzip_started.elapsed(),
        rss_kib: rss_kib(std::process::id()),
        heap_bytes: LIVE_HEAP.load(Ordering::Relaxed) - heap_before,
        removed,
    };
    (node, figures)
}

fn sample_lines(text: &str) -> usize {
    text.lines().filter(|line| !line.starts_with('#')).count()
}

/// Serves `registry` as /metrics on a port of its own: an empty page
/// until `full` is set (Prometheus' baseline), then the exposition.
fn serve_metrics(registry: Registry, full: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head);
            let body = match full.load(Ordering::SeqCst) {
                true => encode(&registry).expect("encode"),
                false => String::new(),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// Prometheus' memory and head series, from its own /metrics.
struct PrometheusMemory {
    rss: f64,
    heap: f64,
    head_series: f64,
}

fn prometheus_memory(port: u16) -> PrometheusMemory {
    let response = http_get(port, "/metrics").expect("Prometheus' /metrics");
    let samples = parse_exposition(&String::from_utf8_lossy(&response.body));
    PrometheusMemory {
        rss: value(&samples, "process_resident_memory_bytes"),
        heap: value(&samples, "go_memstats_heap_inuse_bytes"),
        head_series: value(&samples, "prometheus_tsdb_head_series"),
    }
}

/// The real Prometheus scrapes `node` for `size.prometheus_for` while its
/// pods keep serving; returns its memory before and after.
fn scraped_by_prometheus(node: &mut Node, size: Size) -> (PrometheusMemory, PrometheusMemory) {
    let full = Arc::new(AtomicBool::new(false));
    let port = serve_metrics(node.registry.clone(), full.clone());
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("prometheus.yml");
    let every = format!("{}s", size.scrape_every.as_secs());
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: {every}\nscrape_configs:\n  - job_name: node\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .expect("config");
    let (_prometheus, prometheus_port) = start_prometheus_with(
        &config,
        &[format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        )],
    );
    // The baseline: Prometheus scraping an empty page for a while.
    std::thread::sleep(size.scrape_every * 4);
    let baseline = prometheus_memory(prometheus_port);
    full.store(true, Ordering::SeqCst);
    let until = Instant::now() + size.prometheus_for;
    while Instant::now() < until {
        node.serve_all();
        std::thread::sleep(Duration::from_secs(1));
    }
    (baseline, prometheus_memory(prometheus_port))
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let size = Size::new(full);
    // Each grain is measured in a process of its own, so one's memory is
    // not the other's.
    if std::env::args().any(|arg| arg == "--workload-grain") {
        let (_, figures) = model(PodGrain::Workload, size);
        println!("{}", figures.line());
        return;
    }
    let prometheus = prometheus_version();
    let started = Instant::now();
    let (mut node, per_container) = model(PodGrain::Container, size);
    let mut child = std::process::Command::new(std::env::current_exe().expect("this bench"));
    child.arg("--workload-grain");
    if full {
        child.arg("--bench");
    }
    let output = child.output().expect("the workload grain's run");
    assert!(output.status.success(), "{output:?}");
    let per_workload = Figures::parse(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|line| line.starts_with("FIGURES"))
            .expect("figures"),
    );
    let workloads = size.pods / REPLICAS;
    println!(
        "scale model: {} pods ({workloads} Deployments × {REPLICAS}) × {ROUTES} routes × {} statuses, {} churn cycles (measured in {:.0} s)",
        size.pods,
        STATUSES.len(),
        size.churn,
        started.elapsed().as_secs_f64()
    );
    println!(
        "| --aggregate-by | series on /metrics | flask_http_ series | per pod | bytes | gzipped | encode per scrape | gzip per scrape | RSS | live heap | label sets removed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (grain, figures) in [("container", &per_container), ("workload", &per_workload)] {
        println!(
            "| {grain} | {} | {} | {:.0} | {} | {} | {:.1} ms | {:.1} ms | {:.1} MiB | {:.1} MiB | {} |",
            figures.series,
            figures.request_series,
            figures.request_series as f64 / size.pods as f64,
            figures.bytes,
            figures.gzip_bytes,
            figures.encode.as_secs_f64() * 1e3,
            figures.gzip.as_secs_f64() * 1e3,
            figures.rss_kib as f64 / 1024.0,
            figures.heap_bytes as f64 / (1024.0 * 1024.0),
            figures.removed,
        );
    }
    assert_eq!(
        per_container.removed, size.churn as f64,
        "each churned pod's label set removed"
    );
    assert_eq!(
        per_workload.removed, 0.0,
        "a workload's series stay while a replica serves"
    );
    assert!(per_workload.request_series * 2 < per_container.request_series);

    let (baseline, scraped) = scraped_by_prometheus(&mut node, size);
    let grown = |after: f64, before: f64| (after - before) / scraped.head_series.max(1.0);
    println!(
        "Prometheus {} scraping it every {} s for {} s: {} head series; per series {:.0} bytes of RSS, {:.0} of Go heap in use (RSS {:.0} → {:.0} MiB)",
        prometheus,
        size.scrape_every.as_secs(),
        size.prometheus_for.as_secs(),
        scraped.head_series,
        grown(scraped.rss, baseline.rss),
        grown(scraped.heap, baseline.heap),
        baseline.rss / 1048576.0,
        scraped.rss / 1048576.0,
    );
    assert!(
        scraped.head_series >= per_container.series as f64,
        "Prometheus holds every series: {} of {}",
        scraped.head_series,
        per_container.series
    );
    cluster_table(
        &[("container", &per_container), ("workload", &per_workload)],
        grown(scraped.rss, baseline.rss),
    );
}

/// Nodes like the model's, in clusters of 100, 1,000 and 5,000: what
/// Prometheus holds and receives, from the figures measured above.
fn cluster_table(grains: &[(&str, &Figures)], prometheus_bytes_per_series: f64) {
    const SHARD_SERIES: f64 = 10e6;
    const SCRAPE_EVERY_S: f64 = 30.0;
    println!(
        "Clusters of such nodes, scraped every {SCRAPE_EVERY_S} s (the shipped scrape configs), at {prometheus_bytes_per_series:.0} bytes of Prometheus memory per series:"
    );
    println!(
        "| nodes | --aggregate-by | series | Prometheus memory | shards of 10 M series | scrape traffic (gzip) | agent CPU per scrape, per node |"
    );
    println!("|---|---|---|---|---|---|---|");
    for nodes in [100.0, 1_000.0, 5_000.0] {
        for (grain, figures) in grains {
            let series = nodes * figures.series as f64;
            println!(
                "| {nodes} | {grain} | {:.1} M | {:.0} GiB | {:.0} | {:.1} MB/s | {:.0} ms |",
                series / 1e6,
                series * prometheus_bytes_per_series / f64::from(1 << 30),
                (series / SHARD_SERIES).ceil(),
                nodes * figures.gzip_bytes as f64 / SCRAPE_EVERY_S / 1e6,
                (figures.encode + figures.gzip).as_secs_f64() * 1e3,
            );
        }
    }
}

/// The installed Prometheus' version; fails, saying what to do, when there
/// is none.
fn prometheus_version() -> String {
    let output = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .expect("the scale model needs Prometheus (cargo xtask setup installs Debian's)");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap_or("?")
        .to_owned()
}
