//! Kubelet-style cgroups made by a test, so real processes sit where a
//! kubelet would put a pod's container. Everything lives under a parent
//! cgroup named for the test process and is removed on drop; nothing the
//! test did not create is touched.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// The cgroup driver whose layout to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
    /// in the v2 hierarchy and the v1 `name=systemd` one.
    Systemd,
    /// `kubepods/burstable/pod<uid>/<id>` in the v1 `memory` and `pids`
    /// hierarchies (the v2 one on a host without v1).
    Cgroupfs,
}

impl Driver {
    /// Where the kubelet's driver puts container `container_id` of a
    /// Burstable pod, relative to a hierarchy's root.
    pub fn kubelet_path(self, pod_uid: &str, container_id: &str) -> String {
        match self {
            Driver::Systemd => {
                let uid_ = pod_uid.replace('-', "_");
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{container_id}.scope"
                )
            }
            Driver::Cgroupfs => format!("kubepods/burstable/pod{pod_uid}/{container_id}"),
        }
    }
}

/// The v2 hierarchy: `/sys/fs/cgroup/unified` on hybrid hosts, else the root.
fn unified_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|root| root.join("cgroup.procs").exists() && root.join("cgroup.controllers").exists())
}

fn v1_roots(names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|name| Path::new("/sys/fs/cgroup").join(name))
        .filter(|root| {
            root.join("cgroup.procs").exists() && !root.join("cgroup.controllers").exists()
        })
        .collect()
}

/// One container's cgroups, in every hierarchy the driver uses.
pub struct PodCgroups {
    /// Innermost directories, whose `cgroup.procs` take the process.
    pub leaves: Vec<PathBuf>,
    /// Directories this test created, outermost first.
    created: Vec<PathBuf>,
}

impl PodCgroups {
    pub fn create(driver: Driver, pod_uid: &str, container_id: &str) -> PodCgroups {
        static CREATED: AtomicU32 = AtomicU32::new(0);
        // A parent per pod, so each tree is removed whole when it drops.
        let parent = format!(
            "flask-ebpf-exporter-test-{}-{}",
            std::process::id(),
            CREATED.fetch_add(1, Ordering::SeqCst)
        );
        let (roots, relative) = match driver {
            Driver::Systemd => {
                let mut roots: Vec<PathBuf> = unified_root().into_iter().collect();
                roots.extend(v1_roots(&["systemd"]));
                (roots, driver.kubelet_path(pod_uid, container_id))
            }
            Driver::Cgroupfs => {
                let mut roots = v1_roots(&["memory", "pids"]);
                if roots.is_empty() {
                    roots.extend(unified_root());
                }
                (roots, driver.kubelet_path(pod_uid, container_id))
            }
        };
        let relative = format!("{parent}/{relative}");
        assert!(
            !roots.is_empty(),
            "no cgroup hierarchy to create {driver:?} cgroups in"
        );
        let mut created = Vec::new();
        let mut leaves = Vec::new();
        for root in roots {
            let mut dir = root.clone();
            for component in relative.split('/') {
                dir.push(component);
                if !dir.exists() {
                    fs::create_dir(&dir).unwrap_or_else(|error| {
                        panic!("creating cgroup {}: {error}", dir.display())
                    });
                    created.push(dir.clone());
                }
            }
            leaves.push(dir);
        }
        PodCgroups { leaves, created }
    }

    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.leaves
            .iter()
            .map(|leaf| leaf.join("cgroup.procs"))
            .collect()
    }

    /// What `/proc/<pid>/cgroup` says, for failure messages.
    pub fn describe(pid: u32) -> String {
        fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        // A cgroup can go once its processes have exited.
        for dir in self.created.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
