//! Real containers for the end-to-end tests, made the way a kubelet has
//! them made: a containerd of the test's own (Debian's containerd with
//! runc), images imported from podman's store, a network namespace per pod
//! set up by the real CNI bridge plugin, and each container in the cgroup
//! the kubelet's driver would give it, which runc creates itself from the
//! `cgroupsPath` containerd hands it.
//!
//! `ctr run` builds its OCI spec with the same containerd spec options the
//! CRI plugin uses (capabilities, then the default seccomp profile computed
//! from them, read-only root, no new privileges), so a container run here
//! gets what the kubelet would ask containerd for.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use super::{Running, cgroups::Driver, spawn_process};

/// The namespace the CRI plugin keeps Kubernetes' containers in.
const NAMESPACE: &str = "k8s.io";

/// The agent's image, as `cargo xtask image` tags it.
pub fn agent_image() -> String {
    required_image("FLASK_EBPF_IMAGE", "localhost/flask-ebpf-exporter:0.1.0")
}

/// The container tests' app image, as `cargo xtask image --test-app` tags it.
pub fn app_image() -> String {
    required_image(
        "FLASK_EBPF_APP_IMAGE",
        "localhost/flask-ebpf-exporter-test/flask-app:1",
    )
}

/// The image named by `variable`, or `default`, failing loudly when podman
/// does not have it.
fn required_image(variable: &str, default: &str) -> String {
    let image = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    let status = podman()
        .args(["image", "exists", &image])
        .status()
        .expect("podman");
    assert!(
        status.success(),
        "no image {image} in podman's store: `cargo xtask test` builds it (or `cargo xtask image [--test-app]`)"
    );
    image
}

/// Podman as this machine runs it (its default crun refuses hybrid cgroups).
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--cgroup-manager", "cgroupfs", "--runtime", "runc"]);
    command
}

/// What `podman image inspect` says of `image`, by Go template.
pub fn image_field(image: &str, template: &str) -> String {
    let output = podman()
        .args(["image", "inspect", "--format", template, image])
        .output()
        .expect("podman image inspect");
    assert!(output.status.success(), "podman image inspect {image}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A containerd daemon with its own root, state and socket under a
/// directory the test owns; stopped and removed on drop.
pub struct Containerd {
    socket: PathBuf,
    dir: PathBuf,
    process: Option<Running>,
}

impl Containerd {
    pub fn start() -> Containerd {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/var/tmp/flask-ebpf-exporter-containerd-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("containerd dir");
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{socket}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
            ),
        )
        .expect("containerd config");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let process = spawn_process(
            "containerd",
            Command::new("containerd")
                .arg("--config")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log),
        );
        let containerd = Containerd {
            socket,
            dir,
            process: Some(process),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !containerd
            .ctr()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    /// `ctr`, talking to this daemon in the CRI plugin's namespace.
    pub fn ctr(&self) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
        command
    }

    /// Copies `image` from podman's store into this containerd.
    pub fn import(&self, image: &str) {
        let archive = self.dir.join("image.tar");
        let _ = fs::remove_file(&archive);
        let saved = podman()
            .args(["save", "--format", "oci-archive", "-o"])
            .arg(&archive)
            .arg(image)
            .output()
            .expect("podman save");
        assert!(
            saved.status.success(),
            "podman save {image}: {}",
            String::from_utf8_lossy(&saved.stderr)
        );
        let imported = self
            .ctr()
            .args(["images", "import"])
            .arg(&archive)
            .output()
            .expect("ctr images import");
        assert!(
            imported.status.success(),
            "ctr images import {image}: {}",
            String::from_utf8_lossy(&imported.stderr)
        );
        let _ = fs::remove_file(&archive);
    }

    /// Starts container `id` from `image` with `ctr run` and `options`,
    /// running `args` (the image's entrypoint and command when empty), and
    /// waits until its process exists. Its output goes to files this
    /// returns a handle on.
    pub fn run(&self, id: &str, image: &str, options: &[String], args: &[String]) -> Container {
        let pid_file = self.dir.join(format!("{id}.pid"));
        let output = self.dir.join(format!("{id}.out"));
        let _ = fs::remove_file(&pid_file);
        let log = fs::File::create(&output).expect("container output");
        let client = spawn_process(
            "ctr run",
            self.ctr()
                .args(["run", "--rm", "--pid-file"])
                .arg(&pid_file)
                .args(options)
                .arg(image)
                .arg(id)
                .args(args)
                .stdout(log.try_clone().expect("clone"))
                .stderr(log),
        );
        let mut container = Container {
            id: id.to_owned(),
            pid: 0,
            output,
            client,
            ctr: self.ctr(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.trim().parse().ok())
            {
                container.pid = pid;
                return container;
            }
            if let Ok(Some(status)) = container.client.child.try_wait() {
                panic!(
                    "container {id} did not start ({status}): {}",
                    container.output()
                );
            }
            assert!(Instant::now() < deadline, "container {id} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks a failed test left behind, then the daemon, then its files.
        let tasks = self.ctr().args(["tasks", "ls", "--quiet"]).output();
        for id in tasks
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default()
            .split_whitespace()
        {
            let _ = self
                .ctr()
                .args(["tasks", "kill", "--all", "--signal", "SIGKILL", id])
                .output();
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.ctr().args(["tasks", "delete", "--force", id]).output();
            let _ = self.ctr().args(["containers", "delete", id]).output();
        }
        drop(self.process.take());
        let _ = Command::new("umount")
            .arg("--recursive")
            .arg("--lazy")
            .arg(self.dir.join("root"))
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running container; killed when dropped.
pub struct Container {
    pub id: String,
    /// Its first process, as the host sees it.
    pub pid: u32,
    output: PathBuf,
    client: Running,
    ctr: Command,
}

impl Container {
    /// What the container wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Whether its task still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.client.child.try_wait(), Ok(None))
    }

    /// Waits for the container to exit by itself: its exit code and output.
    pub fn exit_within(&mut self, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.client.child.try_wait() {
                return (status.code().unwrap_or(-1), self.output());
            }
            assert!(
                Instant::now() < deadline,
                "container {} still runs after {timeout:?}: {}",
                self.id,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the container's processes and waits for `ctr run --rm` to
    /// remove it.
    pub fn stop(&mut self) {
        if !self.running() {
            return;
        }
        let mut kill = Command::new(self.ctr.get_program());
        kill.args(self.ctr.get_args())
            .args(["task", "kill", "--all", "--signal", "SIGKILL", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = kill.status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the kubelet's driver puts a container of a Burstable pod, as the
/// CRI plugin passes it to runc (`cgroupsPath`); runc's cgroupfs manager
/// creates it in every hierarchy. PID 1 here is not systemd, so the systemd
/// driver's names are made by the cgroupfs manager too.
pub fn kubelet_cgroup(driver: Driver, pod_uid: &str, container_id: &str) -> String {
    format!("/{}", driver.kubelet_path(pod_uid, container_id))
}

/// Removes the pod-level cgroups runc left (it removes only each container's
/// own), in every hierarchy, once the pod's containers are gone; and their
/// QoS and `kubepods` parents when nothing else is left in them.
pub fn remove_pod_cgroups(driver: Driver, pod_uid: &str) {
    let path = driver.kubelet_path(pod_uid, "x");
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let mut dir = hierarchy.path().join(&path);
        // The pod's own directory may wait for its last process to exit.
        let mut deadline = Instant::now() + Duration::from_secs(5);
        while dir.pop() && dir != hierarchy.path() {
            while dir.exists() && fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            deadline = Instant::now();
        }
    }
}

/// A pod's network namespace, set up as the kubelet has its CNI plugin do
/// it: `eth0` on a bridge with an address of the pod network, and `lo` up.
pub struct PodNetwork {
    pub name: String,
    pub address: Ipv4Addr,
    cni_config: String,
}

/// The bridge and subnet every test pod network uses.
const CNI_BRIDGE: &str = "fee-cni0";
const CNI_SUBNET: &str = "10.88.0.0/16";

impl PodNetwork {
    pub fn create(pod: &str) -> PodNetwork {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fee-{}-{}-{pod}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::SeqCst)
        );
        // One address book for every pod network, as on a node.
        let ipam_dir = super::target_tmpdir().join("cni-addresses");
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(status.success(), "ip netns add {name}");
        let cni_config = format!(
            r#"{{"cniVersion":"1.0.0","name":"flask-ebpf-exporter-test","type":"bridge","bridge":"{CNI_BRIDGE}","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{CNI_SUBNET}"}}]],"dataDir":"{}"}}}}"#,
            ipam_dir.display()
        );
        let mut network = PodNetwork {
            name,
            address: Ipv4Addr::UNSPECIFIED,
            cni_config,
        };
        cni(
            "loopback",
            "ADD",
            &network.name,
            "lo",
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        );
        let result = cni("bridge", "ADD", &network.name, "eth0", &network.cni_config);
        let result: serde_json::Value = serde_json::from_str(&result).expect("CNI result");
        let address = result["ips"][0]["address"]
            .as_str()
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("no address in CNI result {result}"));
        network.address = address;
        network
    }

    /// The path containers join it by (`--with-ns network:<path>`).
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        cni("bridge", "DEL", &self.name, "eth0", &self.cni_config);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs CNI plugin `plugin` (Debian's containernetworking-plugins) as the
/// runtime does: the command and namespace in the environment, the network
/// config on stdin. Returns its result.
fn cni(plugin: &str, command: &str, netns: &str, interface: &str, config: &str) -> String {
    use std::io::Write as _;
    let plugins = Path::new("/usr/lib/cni");
    let mut child = Command::new(plugins.join(plugin))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", netns)
        .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
        .env("CNI_IFNAME", interface)
        .env("CNI_PATH", plugins)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("CNI plugin {plugin}: {error}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.as_bytes())
        .expect("CNI config");
    let output = child.wait_with_output().expect("CNI plugin");
    if command == "ADD" {
        assert!(
            output.status.success(),
            "CNI {plugin} {command}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}
