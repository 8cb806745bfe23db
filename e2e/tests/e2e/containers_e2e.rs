//! The agent as users deploy it: the image `cargo xtask image` builds, run
//! by a real containerd (Debian's, with runc) with exactly the security
//! context manifests/daemonset.yaml asks for (e2e/src/daemonset.rs derives
//! the runtime options from the manifest), watching Flask apps that run in
//! real containers: an overlay root unpacked from an image, a network
//! namespace per pod set up by the CNI bridge plugin, and the cgroups each
//! kubelet driver gives them, made by runc. The in-test API server
//! (e2e/src/kube_api.rs) reports the containers' IDs as the kubelet does.

use flask_ebpf_exporter_e2e as support;

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use support::{
    cgroups::Driver,
    containers::{
        Container, Containerd, PodNetwork, agent_image, app_image, image_field, kubelet_cgroup,
        podman, remove_pod_cgroups,
    },
    daemonset::AgentManifest,
    kube_api::{KubeApi, PodSpec, PodUids, owned_by, pod},
    *,
};

const NODE: &str = "node-c";
/// This file's pod UIDs.
const PODS: PodUids = PodUids(0xc0c0);

/// One agent at a time listens on the manifest's port and loads programs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The agent's container, started from `manifest` against `api`.
fn start_agent(
    containerd: &Containerd,
    manifest: &AgentManifest,
    api: &KubeApi,
    seccomp_root: &Path,
) -> Container {
    let image = agent_image();
    let run = manifest.ctr_run(&image, NODE, Path::new(api.kubeconfig()), seccomp_root);
    containerd.run("flask-ebpf-exporter", &image, &run.options, &run.args)
}

/// Polls the manifest's readiness probe until it answers 200.
fn wait_ready(agent: &mut Container, manifest: &AgentManifest) -> SocketAddr {
    let (path, port) = manifest.readiness();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, _) = eventually(
        Duration::from_secs(30),
        || {
            let status = http_get_at(address, &path).map_or(0, |r| r.status);
            (status, agent.running())
        },
        |&(status, running)| status == 200 || !running,
    );
    assert_eq!(status, 200, "{path} never answered 200: {}", agent.output());
    address
}

fn scrape(address: SocketAddr) -> Vec<Sample> {
    let response = http_get_at(address, "/metrics").expect("scrape the agent");
    assert_eq!(response.status, 200);
    parse_exposition(&String::from_utf8_lossy(&response.body))
}

/// A `/proc/<pid>/status` field.
fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The capability bits of `names` (pod-spec names), as /proc shows sets.
fn capability_bits(names: &[String]) -> String {
    let bit = |name: &str| match name {
        "DAC_READ_SEARCH" => 2,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} has no bit here"),
    };
    let set: u64 = names.iter().map(|name| 1u64 << bit(name)).sum();
    format!("{set:016x}")
}

#[test]
fn the_image_holds_the_binary_alone_and_runs_as_the_manifests_user() {
    require_prerequisites();
    let image = agent_image();
    let manifest = AgentManifest::shipped();
    assert_eq!(
        image_field(&image, "{{json .Config.Entrypoint}}"),
        r#"["/usr/local/bin/flask-ebpf-exporter"]"#
    );
    let security = manifest
        .container()
        .security_context
        .clone()
        .expect("a security context");
    let user = image_field(&image, "{{.Config.User}}");
    assert_eq!(
        user,
        format!(
            "{}:{}",
            security.run_as_user.expect("runAsUser"),
            security.run_as_group.expect("runAsGroup")
        ),
        "the image's USER is the manifest's user"
    );
    assert_eq!(security.run_as_non_root, Some(true));
    let port = manifest.readiness().1;
    assert!(
        image_field(&image, "{{json .Config.ExposedPorts}}").contains(&format!("\"{port}/tcp\"")),
        "the image exposes the manifest's port {port}"
    );

    let mounted = podman()
        .args(["image", "mount", &image])
        .output()
        .expect("podman image mount");
    assert!(mounted.status.success(), "podman image mount {image}");
    let root = std::path::PathBuf::from(String::from_utf8_lossy(&mounted.stdout).trim());
    let unmount = || {
        let _ = podman().args(["image", "unmount", &image]).output();
    };
    let present: Vec<&str> = [
        "bin/sh",
        "bin/bash",
        "usr/bin/sh",
        "bin/busybox",
        "usr/bin/apt-get",
        "usr/bin/dpkg",
    ]
    .into_iter()
    .filter(|path| root.join(path).exists())
    .collect();
    let capabilities = std::process::Command::new("getcap")
        .arg(root.join("usr/local/bin/flask-ebpf-exporter"))
        .output()
        .expect("getcap");
    let interpreter = root.join("lib64/ld-linux-x86-64.so.2").exists();
    unmount();
    assert!(
        present.is_empty(),
        "no shell, no package manager: {present:?}"
    );
    assert!(interpreter, "glibc's loader is in the image");
    // Permitted only: exec never fails for a capability the runtime did not
    // grant; the agent raises them and names any that is missing.
    let capabilities = String::from_utf8_lossy(&capabilities.stdout);
    assert!(
        capabilities.contains("cap_dac_read_search,cap_sys_ptrace,cap_perfmon,cap_bpf=p"),
        "file capabilities: {capabilities}"
    );
    let size: u64 = image_field(&image, "{{.Size}}").parse().expect("size");
    println!("image {image}: {:.1} MB", size as f64 / 1e6);
    assert!(size < 40_000_000, "image of {size} bytes");
}

#[test]
fn the_agent_starts_under_the_manifests_exact_security_context() {
    let _turn = one_at_a_time();
    require_prerequisites();
    let containerd = Containerd::start();
    containerd.import(&agent_image());
    let api = KubeApi::start();
    let manifest = AgentManifest::shipped();
    let seccomp_root = tempfile::tempdir().expect("tempdir");
    let mut agent = start_agent(&containerd, &manifest, &api, seccomp_root.path());
    let address = wait_ready(&mut agent, &manifest);
    let samples = scrape(address);
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_kubernetes_synced"),
        1.0
    );

    // What the kernel says the agent holds: exactly the manifest's.
    let security = manifest
        .container()
        .security_context
        .clone()
        .expect("context");
    let added: Vec<String> = security
        .capabilities
        .and_then(|caps| caps.add)
        .expect("capabilities added");
    let pid = agent.pid;
    assert_eq!(status_field(pid, "CapEff"), capability_bits(&added));
    assert_eq!(status_field(pid, "CapBnd"), capability_bits(&added));
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "the runtime's default profile"
    );
    let uid = security.run_as_user.expect("runAsUser").to_string();
    assert!(
        status_field(pid, "Uid")
            .split_whitespace()
            .all(|id| id == uid),
        "runs as {uid}: {}",
        status_field(pid, "Uid")
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root_mount = mountinfo
        .lines()
        .find(|line| line.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert!(
        root_mount
            .split_whitespace()
            .nth(5)
            .is_some_and(|options| options.starts_with("ro")),
        "read-only root: {root_mount}"
    );
    println!(
        "{}",
        agent
            .output()
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Each piece the manifest grants, taken away once: the agent exits with
/// one line naming what is missing and how to grant it.
#[test]
fn each_missing_grant_is_named_in_one_line() {
    let _turn = one_at_a_time();
    require_prerequisites();
    let containerd = Containerd::start();
    containerd.import(&agent_image());
    let api = KubeApi::start();
    let seccomp_root = tempfile::tempdir().expect("tempdir");
    // A profile that lets everything through but the two calls the agent
    // needs beyond an ordinary program, as older runtimes' defaults do.
    for syscall in ["bpf", "perf_event_open"] {
        std::fs::write(
            seccomp_root.path().join(format!("refuses-{syscall}.json")),
            format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],"syscalls":[{{"names":["{syscall}"],"action":"SCMP_ACT_ERRNO","errnoRet":1}}]}}"#
            ),
        )
        .expect("profile");
    }
    type Change = fn(&mut AgentManifest);
    let cases: [(&str, Change, &[&str]); 5] = [
        (
            "capability BPF",
            |m| {
                let caps = m.security_mut().capabilities.as_mut().expect("caps");
                caps.add.as_mut().expect("add").retain(|cap| cap != "BPF");
            },
            &[
                "missing capabilities: CAP_BPF",
                "add BPF to the container's",
            ],
        ),
        (
            "the tracefs mount",
            |m| {
                m.container_mut().volume_mounts = None;
                m.pod_mut().volumes = None;
            },
            &["tracefs is not mounted", "a hostPath volume"],
        ),
        (
            "hostPID",
            |m| m.pod_mut().host_pid = Some(false),
            &["not in the host's PID namespace", "set hostPID: true"],
        ),
        (
            "a seccomp profile allowing bpf",
            |m| {
                let profile = m.security_mut().seccomp_profile.as_mut().expect("seccomp");
                profile.type_ = "Localhost".to_owned();
                profile.localhost_profile = Some("refuses-bpf.json".to_owned());
            },
            &[
                "a seccomp profile refuses the bpf (errno 1) system call",
                "securityContext.seccompProfile",
            ],
        ),
        (
            "a seccomp profile allowing perf_event_open",
            |m| {
                let profile = m.security_mut().seccomp_profile.as_mut().expect("seccomp");
                profile.type_ = "Localhost".to_owned();
                profile.localhost_profile = Some("refuses-perf_event_open.json".to_owned());
            },
            &["a seccomp profile refuses the perf_event_open (errno 1) system call"],
        ),
    ];
    for (piece, change, said) in cases {
        let mut manifest = AgentManifest::shipped();
        change(&mut manifest);
        let mut agent = start_agent(&containerd, &manifest, &api, seccomp_root.path());
        let (code, output) = agent.exit_within(Duration::from_secs(30));
        assert_ne!(code, 0, "without {piece} the agent must exit: {output}");
        let errors: Vec<&str> = output
            .lines()
            .filter(|line| line.starts_with("Error:"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line without {piece}: {output}");
        for words in said {
            assert!(errors[0].contains(words), "without {piece}: {}", errors[0]);
        }
        println!("without {piece}: {}", errors[0]);
    }
}

/// A runtime whose default profile predates CAP_BPF's: Debian's podman 4.3
/// applies containers-common 0.50's `seccomp.json`, the profile CRI-O's
/// `RuntimeDefault` was before containers/common 0.60 (CRI-O 1.31). It
/// allows `bpf` and `perf_event_open` only with CAP_SYS_ADMIN. Run with the
/// manifest's capabilities and tracefs mount, the agent names both calls.
#[test]
fn an_older_runtimes_default_profile_is_named() {
    let _turn = one_at_a_time();
    require_prerequisites();
    let manifest = AgentManifest::shipped();
    let added = manifest
        .container()
        .security_context
        .as_ref()
        .and_then(|context| context.capabilities.as_ref())
        .and_then(|caps| caps.add.clone())
        .expect("capabilities added");
    let mut command = podman();
    command.args([
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:4096",
        "--ulimit",
        "nproc=1024:1024",
        "--pid",
        "host",
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--security-opt",
        "no-new-privileges",
        "--cap-drop",
        "ALL",
        "-v",
        "/sys/kernel/tracing:/sys/kernel/tracing:ro",
    ]);
    for cap in &added {
        command.args(["--cap-add", &format!("CAP_{cap}")]);
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let output = command
        .arg(agent_image())
        .args(["--listen", &listen])
        .output()
        .expect("podman run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(
            "a seccomp profile refuses the bpf (errno 1) and perf_event_open (errno 1) system calls"
        ) && errors[0].contains("type: Unconfined"),
        "{}",
        errors[0]
    );
    println!("podman 4.3's default profile: {}", errors[0]);
}

/// A Flask container's command: gunicorn on `port`, serving `app`
/// (`module:app`, `module:factory()`).
fn gunicorn(port: u16, app: &str, extra: &str) -> Vec<String> {
    vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!("exec gunicorn --bind 0.0.0.0:{port} {extra} '{app}'"),
    ]
}

/// One container of a test pod: its name, ID and command.
struct ContainerPlan {
    name: &'static str,
    id: String,
    command: Vec<String>,
}

/// A pod of real containers: its network, its containers, the kubelet
/// driver's cgroups.
struct TestPod {
    // Containers first: they stop before their network and cgroups go.
    containers: Vec<Container>,
    network: PodNetwork,
    uid: String,
    driver: Driver,
}

impl TestPod {
    fn start(
        containerd: &Containerd,
        app_image: &str,
        driver: Driver,
        uid: &str,
        plans: &[ContainerPlan],
    ) -> TestPod {
        let network = PodNetwork::create(&uid[..8]);
        let containers = plans
            .iter()
            .map(|plan| {
                let options = vec![
                    "--with-ns".to_owned(),
                    format!("network:{}", network.path()),
                    "--cgroup".to_owned(),
                    kubelet_cgroup(driver, uid, &plan.id),
                ];
                containerd.run(&plan.id, app_image, &options, &plan.command)
            })
            .collect();
        TestPod {
            containers,
            network,
            uid: uid.to_owned(),
            driver,
        }
    }

    fn address(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.network.address, port))
    }

    fn stop(&mut self) {
        for container in &mut self.containers {
            container.stop();
        }
        remove_pod_cgroups(self.driver, &self.uid);
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `address` answers `path` with 200.
fn wait_serving(address: SocketAddr, path: &str, container: &mut Container) {
    let (status, _) = eventually(
        Duration::from_secs(30),
        || {
            let status = http_get_at(address, path).map(|r| r.status);
            (status, container.running())
        },
        |(status, running)| status.as_ref().is_ok_and(|&s| s == 200) || !running,
    );
    assert_eq!(
        status.as_ref().ok(),
        Some(&200),
        "{address}: {status:?} {}",
        container.output()
    );
}

/// Requests counted per (pod, container), from `flask_http_request_total`.
fn requests_by_container(samples: &[Sample]) -> BTreeMap<(String, String), u64> {
    let mut counts = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.name == "flask_http_request_total")
    {
        let label = |name: &str| sample.labels.get(name).cloned().unwrap_or_default();
        *counts
            .entry((label("pod"), label("container")))
            .or_default() += sample.value as u64;
    }
    counts
}

/// The path labels of a pod's container.
fn paths_of(samples: &[Sample], pod: &str, container: &str) -> Vec<String> {
    let mut paths: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .filter(|s| s.labels.get("pod").is_some_and(|p| p == pod))
        .filter(|s| s.labels.get("container").is_some_and(|c| c == container))
        .filter_map(|s| s.labels.get("path").cloned())
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

fn get_n(address: SocketAddr, path: &str, times: u64) -> u64 {
    for _ in 0..times {
        let response = http_get_at(address, path).expect("request");
        assert!(response.status == 200 || response.status == 404, "{path}");
    }
    times
}

/// Two pods under one kubelet driver, the agent in its container:
/// - `web`, a Deployment's pod: two Flask containers (8000 and 8001) and a
///   sidecar that echoes bytes, not HTTP;
/// - `orders-0`, a StatefulSet's pod: one Flask container on 8000 too, whose
///   routes exist only in its own overlay root, and a sidecar that serves
///   nothing; its accept queue overflows.
fn pods_in_containers(driver: Driver, first_pod: usize) {
    let _turn = one_at_a_time();
    require_prerequisites();
    let app_image = app_image();
    let containerd = Containerd::start();
    containerd.import(&agent_image());
    containerd.import(&app_image);
    let api = KubeApi::start();
    api.put_object(owned_by(
        "ReplicaSet",
        "shop",
        "web-6c9f8d7b5",
        ("Deployment", "web"),
    ));

    let id = |n: usize| format!("{:08x}{:056x}", 0xc0c0_0000u32 as usize + first_pod, n);
    let web_uid = PODS.uid(first_pod);
    let web_plan = [
        ContainerPlan {
            name: "web",
            id: id(1),
            command: gunicorn(8000, "app:app", "--workers 2"),
        },
        ContainerPlan {
            name: "admin",
            id: id(2),
            command: gunicorn(8001, "app:app", "--workers 1 --threads 4"),
        },
        ContainerPlan {
            name: "echo",
            id: id(3),
            command: vec![
                "python3".to_owned(),
                "-c".to_owned(),
                "import socketserver as s\n\
                 class H(s.StreamRequestHandler):\n    def handle(self):\n        self.wfile.write(self.rfile.readline())\n\
                 s.ThreadingTCPServer(('0.0.0.0', 9000), H).serve_forever()"
                    .to_owned(),
            ],
        },
    ];
    let orders_uid = PODS.uid(first_pod + 1);
    let orders_plan = [
        ContainerPlan {
            name: "orders",
            id: id(4),
            // Its own routes, written in its own root: /things/ for /items/.
            command: vec![
                "sh".to_owned(),
                "-c".to_owned(),
                "sed 's#/items/#/things/#' app.py > things.py && \
                 exec gunicorn --bind 0.0.0.0:8000 --workers 1 --backlog 1 things:app"
                    .to_owned(),
            ],
        },
        ContainerPlan {
            name: "sleeper",
            id: id(5),
            command: vec!["sleep".to_owned(), "infinity".to_owned()],
        },
    ];
    // A tenant's pod whose source makes route discovery's helper run out
    // of memory (under the agent's own memory limit) or time.
    let evil_uid = PODS.uid(first_pod + 2);
    let evil_plan = [ContainerPlan {
        name: "web",
        id: id(6),
        command: gunicorn(8000, "memory_hog:create_app()", "--workers 1"),
    }];
    let mut web = TestPod::start(&containerd, &app_image, driver, &web_uid, &web_plan);
    let mut orders = TestPod::start(&containerd, &app_image, driver, &orders_uid, &orders_plan);
    let mut evil = TestPod::start(&containerd, &app_image, driver, &evil_uid, &evil_plan);
    for (name, uid, owner, plan) in [
        (
            "web-6c9f8d7b5-x7k2p",
            &web_uid,
            ("ReplicaSet", "web-6c9f8d7b5"),
            &web_plan[..],
        ),
        (
            "orders-0",
            &orders_uid,
            ("StatefulSet", "orders"),
            &orders_plan[..],
        ),
        ("evil-0", &evil_uid, ("StatefulSet", "evil"), &evil_plan[..]),
    ] {
        let containers: Vec<(&str, Option<&str>)> =
            plan.iter().map(|c| (c.name, Some(c.id.as_str()))).collect();
        api.put_pod(pod(&PodSpec {
            namespace: "shop",
            name,
            uid,
            node: NODE,
            owner: Some(owner),
            containers: &containers,
            annotations: &[],
        }));
    }
    // Each container sits where the kubelet's driver puts it, made by runc.
    for (pod, plan) in [(&web, &web_plan[..]), (&orders, &orders_plan[..])] {
        for (container, planned) in pod.containers.iter().zip(plan) {
            let cgroups =
                std::fs::read_to_string(format!("/proc/{}/cgroup", container.pid)).expect("cgroup");
            let path = kubelet_cgroup(driver, &pod.uid, &planned.id);
            assert!(cgroups.contains(&path), "{path} not in\n{cgroups}");
        }
    }
    wait_serving(web.address(8000), "/", &mut web.containers[0]);
    wait_serving(web.address(8001), "/", &mut web.containers[1]);
    wait_serving(orders.address(8000), "/", &mut orders.containers[0]);
    wait_serving(evil.address(8000), "/things/1", &mut evil.containers[0]);

    let mut manifest = AgentManifest::shipped();
    manifest
        .container_mut()
        .args
        .get_or_insert_with(Vec::new)
        .extend(["--deleted-pod-grace=3s".to_owned()]);
    let seccomp_root = tempfile::tempdir().expect("tempdir");
    let mut agent = start_agent(&containerd, &manifest, &api, seccomp_root.path());
    let agent_address = wait_ready(&mut agent, &manifest);

    let mut expected = BTreeMap::new();
    let count = |pod: &str, container: &str| (pod.to_owned(), container.to_owned());
    let web_pod = "web-6c9f8d7b5-x7k2p";
    let mut served = 0;
    for n in 0..6 {
        served += get_n(web.address(8000), &format!("/items/{n}?token=secret"), 1);
    }
    served += get_n(web.address(8000), "/missing", 2);
    expected.insert(count(web_pod, "web"), served);
    expected.insert(
        count(web_pod, "admin"),
        get_n(web.address(8001), "/items/7", 4),
    );
    let mut evil_served = 0;
    for n in 1..=12 {
        evil_served += get_n(evil.address(8000), &format!("/things/{n}"), 1);
    }
    expected.insert(count("evil-0", "web"), evil_served);
    let mut orders_served = get_n(orders.address(8000), "/things/3", 5);
    orders_served += get_n(orders.address(8000), "/missing", 1);
    // The sidecar's bytes are no HTTP: no series.
    for _ in 0..5 {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(web.address(9000)).expect("echo");
        stream
            .write_all(b"GET / HTTP/1.1 not really\n")
            .expect("write");
        let mut echoed = Vec::new();
        let _ = stream.read_to_end(&mut echoed);
    }

    // Accept-queue overflows, counted in orders-0's own network namespace:
    // one sync worker, a backlog of 1, eight clients at once.
    let orders_pid = orders.containers[0].pid;
    let before = kernel_listen_overflows(orders_pid);
    let started = eventually(
        Duration::from_secs(10),
        || scrape(agent_address),
        |samples| {
            labelled(
                samples,
                "flask_http_listen_overflows_total",
                "pod",
                "orders-0",
            ) == 0.0
                && samples.iter().any(|s| {
                    s.name == "flask_http_listen_overflows_total"
                        && s.labels.get("pod").is_some_and(|p| p == "orders-0")
                })
        },
    );
    assert!(
        started
            .iter()
            .any(|s| s.name == "flask_http_listen_overflows_total"
                && s.labels.get("pod").is_some_and(|p| p == "orders-0")),
        "orders-0 is alone in its network namespace: its overflows are exported"
    );
    let address = orders.address(8000);
    // Eight clients overflow a queue that holds two, yet every dropped
    // handshake is retried within the kernel's first few SYN timeouts.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                http_get_within(address, "/slow?seconds=0.3", Duration::from_secs(90))
                    .map(|response| response.status)
            })
        })
        .collect();
    for client in clients {
        match client.join().expect("client") {
            Ok(200) => orders_served += 1,
            other => panic!("every client is served in the end, but one got {other:?}"),
        }
    }
    let overflowed = kernel_listen_overflows(orders_pid) - before;
    expected.insert(count("orders-0", "orders"), orders_served);

    let samples = eventually(
        Duration::from_secs(20),
        || scrape(agent_address),
        |samples| {
            requests_by_container(samples) == expected
                && labelled(
                    samples,
                    "flask_http_listen_overflows_total",
                    "pod",
                    "orders-0",
                ) >= overflowed
        },
    );
    assert_eq!(
        requests_by_container(&samples),
        expected,
        "{}",
        agent.output()
    );
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_unattributed_requests_total"),
        0.0
    );
    assert!(agent.running(), "{}", agent.output());
    assert_eq!(
        http_get_at(agent_address, "/healthz")
            .map(|r| r.status)
            .ok(),
        Some(200)
    );
    // The evil pod's helper gave up; its routes are learned from traffic.
    assert_eq!(paths_of(&samples, "evil-0", "web"), ["/things/<int>"]);
    // Routes read from each container's own root.
    assert_eq!(
        paths_of(&samples, web_pod, "web"),
        ["/items/<int:item_id>", "None"]
    );
    assert_eq!(
        paths_of(&samples, web_pod, "admin"),
        ["/items/<int:item_id>"]
    );
    assert_eq!(
        paths_of(&samples, "orders-0", "orders"),
        ["/slow", "/things/<int:item_id>", "None"]
    );
    let counted = labelled(
        &samples,
        "flask_http_listen_overflows_total",
        "pod",
        "orders-0",
    );
    println!(
        "{driver:?}: orders-0's accept queue overflowed {overflowed} times (kernel), {counted} (agent)"
    );
    assert!(overflowed > 0.0, "the accept queue never overflowed");
    assert_eq!(counted, overflowed);
    // web has two servers in one network namespace: neither is its own.
    assert_eq!(
        labelled(
            &samples,
            "flask_http_listen_overflows_total",
            "pod",
            web_pod
        ),
        0.0
    );
    for sample in &samples {
        assert!(
            !sample.labels.values().any(|v| v.contains("secret")),
            "query strings never leave the node: {sample:?}"
        );
    }

    // Deleting a pod removes its series, once the grace period is over.
    web.stop();
    api.delete_pod("shop", web_pod);
    let samples = eventually(
        Duration::from_secs(15),
        || scrape(agent_address),
        |samples| {
            !samples
                .iter()
                .any(|s| s.labels.get("pod").is_some_and(|p| p == web_pod))
        },
    );
    assert!(
        !samples
            .iter()
            .any(|s| s.labels.get("pod").is_some_and(|p| p == web_pod)),
        "{web_pod}'s series outlived its grace period"
    );
    assert_eq!(
        requests_by_container(&samples).get(&count("orders-0", "orders")),
        Some(&orders_served)
    );
    drop(agent);
    orders.stop();
    evil.stop();
}

#[test]
fn pods_in_containers_under_the_systemd_driver() {
    pods_in_containers(Driver::Systemd, 1);
}

#[test]
fn pods_in_containers_under_the_cgroupfs_driver() {
    pods_in_containers(Driver::Cgroupfs, 3);
}
