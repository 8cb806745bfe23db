//! Which pod and container a process runs in, read from `/proc/<pid>/cgroup`
//! as the kubelet lays cgroups out:
//!
//! - systemd driver: `…/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (also `crio-<id>.scope`, `docker-<id>.scope`; guaranteed pods have no QoS part);
//! - cgroupfs driver: `…/kubepods/burstable/pod<uid>/<id>`.
//!
//! Paths are matched by their components, not anchored at the root: inside a
//! cgroup namespace they start with `/../..`, and nested clusters (kind) put
//! the kubelet's tree under another one.

use procfs::ProcessCGroups;

use crate::exchange::{ContainerRef, PodUid};

/// Strips the runtime prefix from a pod status `containerID`
/// (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`).
pub fn bare_container_id(status_id: &str) -> &str {
    status_id.split_once("://").map_or(status_id, |(_, id)| id)
}

/// The pod and container of a process, from its cgroups (`/proc/<pid>/cgroup`).
/// The unified (v2) hierarchy is preferred; a v1 hierarchy is used when the
/// process is placed only there (cgroup v1 and hybrid hosts). `None`: the
/// process is not in a pod.
pub fn container_of(cgroups: &ProcessCGroups) -> Option<ContainerRef> {
    let mut found: Vec<(bool, ContainerRef)> = cgroups
        .0
        .iter()
        .filter_map(|cgroup| Some((cgroup.hierarchy == 0, parse_cgroup_path(&cgroup.pathname)?)))
        .collect();
    // A container ID beats a bare pod; then the unified line beats v1 ones.
    found.sort_by_key(|(unified, found)| (found.container_id.is_none(), !unified));
    found.into_iter().next().map(|(_, found)| found)
}

/// Whether the process's cgroup in the unified (v2) hierarchy is
/// `container`'s own, so that a kernel check of the v2 cgroup id (all a
/// syscall tracepoint can read) singles the container out. Not so on a
/// hybrid host whose runtime places containers in v1 hierarchies only:
/// there every container's processes share one v2 cgroup (the root, or the
/// runtime's service).
pub fn unified_cgroup_is_own(cgroups: &ProcessCGroups, container: &ContainerRef) -> bool {
    container.container_id.is_some()
        && cgroups
            .0
            .iter()
            .filter(|cgroup| cgroup.hierarchy == 0)
            .any(|cgroup| parse_cgroup_path(&cgroup.pathname).as_ref() == Some(container))
}

/// The pod and container named by one cgroup path.
pub fn parse_cgroup_path(path: &str) -> Option<ContainerRef> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let pod_index = kubelet_pod_index(&components)?;
    let pod_uid = pod_uid_of(components[pod_index])?;
    let container_id = components
        .get(pod_index + 1)
        .and_then(|component| container_id_of(component));
    Some(ContainerRef {
        pod_uid,
        container_id,
    })
}

/// Where the kubelet's layout puts a pod: right below the kubelet's root,
/// or below the root's QoS class. The root is the shallowest `kubepods`
/// component: a container may make sub-cgroups named like another pod's
/// below its own, never above it. Seen from inside a cgroup namespace the
/// root may lie above the view (`..`): the path then starts at the QoS
/// class or the pod.
fn kubelet_pod_index(components: &[&str]) -> Option<usize> {
    let start = match components.iter().position(|c| is_kubelet_root(c)) {
        Some(root) => root + 1,
        None => match components.iter().take_while(|c| **c == "..").count() {
            0 => return None,
            above => above,
        },
    };
    let is_pod = |index: usize| {
        components
            .get(index)
            .is_some_and(|c| pod_uid_of(c).is_some())
    };
    if is_pod(start) {
        return Some(start);
    }
    let below_qos = components.get(start).is_some_and(|c| is_qos_class(c));
    (below_qos && is_pod(start + 1)).then_some(start + 1)
}

/// `kubepods` (cgroupfs) or `[<cgroup root>-]kubepods.slice` (systemd; kind's
/// kubelet has `kubelet-kubepods.slice`).
fn is_kubelet_root(component: &str) -> bool {
    component == "kubepods"
        || component == "kubepods.slice"
        || component.ends_with("-kubepods.slice")
}

/// `burstable` or `besteffort` (cgroupfs), or the systemd slices named so.
fn is_qos_class(component: &str) -> bool {
    matches!(component, "burstable" | "besteffort")
        || (component.contains("kubepods")
            && (component.ends_with("-burstable.slice")
                || component.ends_with("-besteffort.slice")))
}

/// `pod<uid>` (cgroupfs) or `[kubelet-]kubepods[-<qos>]-pod<uid>.slice` (systemd).
fn pod_uid_of(component: &str) -> Option<PodUid> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let uid = match name.strip_prefix("pod") {
        Some(uid) => uid,
        None if name.contains("kubepods") => name.rsplit_once("-pod")?.1,
        None => return None,
    };
    PodUid::parse(uid)
}

/// `<runtime>-<id>.scope` (systemd) or a bare `<id>` (cgroupfs).
fn container_id_of(component: &str) -> Option<String> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    // conmon is CRI-O's monitor process, never the container.
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    let plausible = id.len() >= 12 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    plausible.then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The container named by the text of a `/proc/<pid>/cgroup` file.
    fn parse_proc_cgroup(text: &str) -> Option<ContainerRef> {
        use procfs::FromRead as _;
        container_of(&ProcessCGroups::from_read(text.as_bytes()).ok()?)
    }

    const UID: &str = "4f0c5b5e-8d1a-4c1e-9d3e-6b2f6a1c2d3e";
    const ID: &str = "9b2f1c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcdef";
    /// Another tenant's pod and container.
    const OTHER_UID: &str = "0a1b2c3d-0000-4000-8000-00000000beef";
    const OTHER_ID: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn container(id: Option<&str>) -> Option<ContainerRef> {
        Some(ContainerRef {
            pod_uid: PodUid::parse(UID).expect("a uid"),
            container_id: id.map(str::to_owned),
        })
    }

    #[test]
    fn only_a_v2_cgroup_of_the_container_itself_is_its_own() {
        use procfs::FromRead as _;
        let uid_ = UID.replace('-', "_");
        let own = |text: &str| {
            let cgroups = ProcessCGroups::from_read(text.as_bytes()).expect("parses");
            let container = container_of(&cgroups).expect("in a container");
            unified_cgroup_is_own(&cgroups, &container)
        };
        // systemd driver on a hybrid host: the v2 hierarchy mirrors it.
        assert!(own(&format!(
            "1:name=systemd:/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope\n\
             0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        )));
        // cgroupfs driver on a hybrid host: v1 only, the v2 root for all.
        assert!(!own(&format!(
            "4:memory:/kubepods/burstable/pod{UID}/{ID}\n0::/\n"
        )));
        // The runtime's service in v2: shared by every container.
        assert!(!own(&format!(
            "4:memory:/kubepods/burstable/pod{UID}/{ID}\n0::/system.slice/containerd.service\n"
        )));
        // The pod's cgroup, not a container's (CRI-O's conmon).
        assert!(!own(&format!(
            "0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope\n"
        )));
    }

    #[test]
    fn kubelet_layouts() {
        let uid_ = UID.replace('-', "_");
        let other_ = OTHER_UID.replace('-', "_");
        let table: Vec<(String, Option<ContainerRef>)> = vec![
            // systemd driver, containerd, cgroup v2
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                container(Some(ID)),
            ),
            // systemd driver, guaranteed QoS (no QoS slice)
            (
                format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                container(Some(ID)),
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope"
                ),
                container(Some(ID)),
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-{ID}.scope"
                ),
                container(Some(ID)),
            ),
            // CRI-O's conmon sits beside the container: a pod, no container
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-conmon-{ID}.scope"
                ),
                container(None),
            ),
            // cgroupfs driver, cgroup v1 controllers
            (
                format!("12:memory:/kubepods/burstable/pod{UID}/{ID}"),
                container(Some(ID)),
            ),
            (
                format!("4:cpu,cpuacct:/kubepods/pod{UID}/{ID}"),
                container(Some(ID)),
            ),
            (
                format!("1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}"),
                container(Some(ID)),
            ),
            // inside the exporter's own cgroup namespace
            (
                format!("0::/../../kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                container(Some(ID)),
            ),
            // kind: a kubelet inside a container, both drivers
            (
                format!(
                    "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                container(Some(ID)),
            ),
            (
                format!(
                    "11:pids:/docker/0123456789ab0123456789ab/kubepods/besteffort/pod{UID}/{ID}"
                ),
                container(Some(ID)),
            ),
            // a process in the pod cgroup itself, or a sub-cgroup of the container
            (format!("0::/kubepods/burstable/pod{UID}"), container(None)),
            (
                format!(
                    "0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope/init"
                ),
                container(Some(ID)),
            ),
            // A container's own sub-cgroups named like another pod's: the
            // kubelet's layout still names the container they sit in.
            (
                format!(
                    "0::/kubepods/burstable/pod{UID}/{ID}/kubepods/besteffort/pod{OTHER_UID}/{OTHER_ID}"
                ),
                container(Some(ID)),
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope/kubepods-besteffort-pod{other_}.slice/cri-containerd-{OTHER_ID}.scope"
                ),
                container(Some(ID)),
            ),
            (
                format!("0::/kubepods/burstable/pod{UID}/pod{OTHER_UID}/{OTHER_ID}"),
                container(None),
            ),
            // pod-like names outside the kubelet's layout
            (format!("0::/system.slice/pod{UID}/{ID}"), None),
            (format!("0::/kubepods/guaranteed/pod{UID}/{ID}"), None),
            // not pods
            ("0::/system.slice/containerd.service".to_owned(), None),
            (
                "0::/user.slice/user-0.slice/session-3.scope".to_owned(),
                None,
            ),
            (
                "0::/kubepods.slice/kubepods-burstable.slice".to_owned(),
                None,
            ),
            (
                "4:memory:/process_api/b9129cb9d4a9ad83417963ff6406c40d".to_owned(),
                None,
            ),
            ("0::/podcast/episode".to_owned(), None),
            ("0::/".to_owned(), None),
            ("garbage".to_owned(), None),
            (String::new(), None),
        ];
        for (line, expected) in table {
            assert_eq!(parse_proc_cgroup(&line), expected, "{line}");
        }
    }

    #[test]
    fn hybrid_host_prefers_a_container_then_the_unified_line() {
        let uid_ = UID.replace('-', "_");
        // cgroup v1 only (cgroupfs driver): the unified line is the root.
        let v1_only = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{ID}\n4:memory:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/\n0::/\n"
        );
        assert_eq!(parse_proc_cgroup(&v1_only), container(Some(ID)));
        // hybrid, systemd driver: every hierarchy names the container.
        let other = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let hybrid = format!(
            "4:memory:/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{other}.scope\n0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse_proc_cgroup(&hybrid), container(Some(ID)));
        // v2 only knows the pod; a v1 controller knows the container.
        let partial = format!(
            "0::/kubepods/burstable/pod{UID}\n4:memory:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(parse_proc_cgroup(&partial), container(Some(ID)));
    }

    #[test]
    fn uids_and_status_ids() {
        assert_eq!(
            PodUid::parse("4F0C5B5E_8D1A_4C1E_9D3E_6B2F6A1C2D3E")
                .map(|uid| uid.as_str().to_owned()),
            Some(UID.to_owned())
        );
        assert_eq!(PodUid::parse("4f0c5b5e-8d1a-4c1e-9d3e"), None);
        assert_eq!(PodUid::parse("zzzzzzzz-8d1a-4c1e-9d3e-6b2f6a1c2d3e"), None);
        assert_eq!(bare_container_id(&format!("containerd://{ID}")), ID);
        assert_eq!(bare_container_id(&format!("cri-o://{ID}")), ID);
        assert_eq!(bare_container_id(ID), ID);
    }
}
