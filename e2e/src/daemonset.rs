//! The agent's container as manifests/daemonset.yaml asks for it, turned
//! into the options `ctr run` gives containerd: every field of the pod spec,
//! the container and its security context is either translated or named
//! here as having no bearing on a single container, and any other field
//! fails the test, so the manifest and what the tests run cannot drift
//! apart.
//!
//! Two things a kubelet does are done otherwise: the pod's service account
//! becomes a kubeconfig mounted read-only (the in-test API server speaks
//! plain HTTP), and the user is the image's own (`ctr run` cannot set one),
//! which must be the one the manifest names.

use std::path::Path;

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, SecurityContext},
    },
    apimachinery::pkg::api::resource::Quantity,
};
use serde_json::Value;

use super::{containers::image_field, workspace};

/// Where the kubeconfig is mounted in the agent's container.
const KUBECONFIG_IN_CONTAINER: &str = "/var/run/flask-ebpf-exporter/kubeconfig";

/// Every capability Linux has, for `drop: [ALL]`.
const ALL_CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Pod spec fields, and what each means for the one container run here.
const POD_FIELDS: &[(&str, &str)] = &[
    ("serviceAccountName", "replaced by a mounted kubeconfig"),
    ("hostPID", "translated"),
    ("hostNetwork", "translated"),
    ("dnsPolicy", "the host's resolver either way"),
    ("tolerations", "scheduling"),
    ("terminationGracePeriodSeconds", "stopping"),
    ("containers", "translated"),
    ("volumes", "translated (hostPath)"),
];
const CONTAINER_FIELDS: &[(&str, &str)] = &[
    ("name", "a name"),
    ("image", "replaced by the image under test"),
    ("imagePullPolicy", "pulling"),
    ("args", "translated"),
    ("env", "translated"),
    ("ports", "hostNetwork: the agent's own port"),
    ("livenessProbe", "polled by the test"),
    ("readinessProbe", "polled by the test"),
    ("resources", "translated (limits)"),
    ("securityContext", "translated"),
    ("volumeMounts", "translated"),
];
const SECURITY_FIELDS: &[&str] = &[
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "seccompProfile",
    "capabilities",
];

/// The DaemonSet, as shipped or as a test changed it.
#[derive(Clone)]
pub struct AgentManifest {
    pub daemonset: DaemonSet,
}

/// What `ctr run` is given for the agent's container.
pub struct CtrRun {
    pub options: Vec<String>,
    pub args: Vec<String>,
}

impl AgentManifest {
    pub fn shipped() -> AgentManifest {
        let path = workspace().join("manifests/daemonset.yaml");
        let text = std::fs::read_to_string(&path).expect("manifests/daemonset.yaml");
        AgentManifest {
            daemonset: serde_yaml_ng::from_str(&text).expect("a DaemonSet"),
        }
    }

    pub fn pod(&self) -> &PodSpec {
        self.daemonset
            .spec
            .as_ref()
            .and_then(|spec| spec.template.spec.as_ref())
            .expect("the DaemonSet has a pod spec")
    }

    pub fn pod_mut(&mut self) -> &mut PodSpec {
        self.daemonset
            .spec
            .as_mut()
            .and_then(|spec| spec.template.spec.as_mut())
            .expect("the DaemonSet has a pod spec")
    }

    pub fn container(&self) -> &Container {
        let containers = &self.pod().containers;
        assert_eq!(containers.len(), 1, "one container, the agent");
        &containers[0]
    }

    pub fn container_mut(&mut self) -> &mut Container {
        &mut self.pod_mut().containers[0]
    }

    pub fn security_mut(&mut self) -> &mut SecurityContext {
        self.container_mut()
            .security_context
            .get_or_insert_with(Default::default)
    }

    /// The readiness probe's path and port number.
    pub fn readiness(&self) -> (String, u16) {
        let container = self.container();
        let get = container
            .readiness_probe
            .as_ref()
            .and_then(|probe| probe.http_get.as_ref())
            .expect("an HTTP readiness probe");
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port) => *port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|port| port.name.as_deref() == Some(name))
                .map(|port| port.container_port)
                .expect("the probe's named port"),
        };
        (get.path.clone().unwrap_or_default(), port as u16)
    }

    /// `ctr run` options and the agent's arguments, for node `node` whose
    /// API server `kubeconfig` points at; a `Localhost` seccomp profile is
    /// looked up under `seccomp_root`, as the kubelet's is.
    pub fn ctr_run(
        &self,
        image: &str,
        node: &str,
        kubeconfig: &Path,
        seccomp_root: &Path,
    ) -> CtrRun {
        reject_unknown(
            &serde_json::to_value(self.pod()).expect("pod spec"),
            POD_FIELDS,
        );
        let container = self.container();
        reject_unknown(
            &serde_json::to_value(container).expect("container"),
            CONTAINER_FIELDS,
        );
        let mut options = Vec::new();
        let pod = self.pod();
        if pod.host_pid == Some(true) {
            // The CRI plugin leaves the pid namespace out of the spec: the
            // container's processes are the host's. Joining this test's (the
            // host's) is that.
            options.extend([
                "--with-ns".to_owned(),
                format!("pid:/proc/{}/ns/pid", std::process::id()),
            ]);
        }
        if pod.host_network == Some(true) {
            options.push("--net-host".to_owned());
        }
        options.extend(security_options(
            container.security_context.as_ref(),
            image,
            seccomp_root,
        ));
        for mount in container.volume_mounts.iter().flatten() {
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|volume| volume.name == mount.name)
                .unwrap_or_else(|| panic!("no volume {}", mount.name));
            let host_path = volume
                .host_path
                .as_ref()
                .unwrap_or_else(|| panic!("volume {} is not a hostPath", volume.name));
            let access = if mount.read_only == Some(true) {
                "ro"
            } else {
                "rw"
            };
            options.extend([
                "--mount".to_owned(),
                format!(
                    "type=bind,src={},dst={},options=rbind:{access}",
                    host_path.path, mount.mount_path
                ),
            ]);
        }
        for variable in container.env.iter().flatten() {
            let value = match (&variable.value, &variable.value_from) {
                (Some(value), None) => value.clone(),
                (None, Some(from)) => {
                    let field = from
                        .field_ref
                        .as_ref()
                        .map(|field| field.field_path.as_str());
                    assert_eq!(field, Some("spec.nodeName"), "env {}", variable.name);
                    node.to_owned()
                }
                other => panic!("env {} is {other:?}", variable.name),
            };
            options.extend(["--env".to_owned(), format!("{}={value}", variable.name)]);
        }
        if let Some(limits) = container
            .resources
            .as_ref()
            .and_then(|resources| resources.limits.as_ref())
        {
            for (resource, quantity) in limits {
                match resource.as_str() {
                    "memory" => {
                        options.extend(["--memory-limit".to_owned(), bytes(quantity).to_string()])
                    }
                    "cpu" => options.extend([
                        "--cpu-period".to_owned(),
                        "100000".to_owned(),
                        "--cpu-quota".to_owned(),
                        (millicores(quantity) * 100).to_string(),
                    ]),
                    other => panic!("limit {other} is not translated"),
                }
            }
        }
        // In place of the service account: the in-test API server.
        options.extend([
            "--mount".to_owned(),
            format!(
                "type=bind,src={},dst={KUBECONFIG_IN_CONTAINER},options=rbind:ro",
                kubeconfig.display()
            ),
            "--env".to_owned(),
            format!("KUBECONFIG={KUBECONFIG_IN_CONTAINER}"),
        ]);
        let mut args: Vec<String> = container.command.iter().flatten().cloned().collect();
        args.extend(container.args.iter().flatten().cloned());
        if !args.is_empty() && container.command.is_none() {
            // `ctr run` replaces the whole process: the image's entrypoint
            // comes first, as Kubernetes keeps it when only args are given.
            let entrypoint = image_field(image, "{{join .Config.Entrypoint \" \"}}");
            let mut whole: Vec<String> = entrypoint.split_whitespace().map(str::to_owned).collect();
            whole.extend(args);
            args = whole;
        }
        CtrRun { options, args }
    }
}

/// The security context, as containerd's spec options.
fn security_options(
    context: Option<&SecurityContext>,
    image: &str,
    seccomp_root: &Path,
) -> Vec<String> {
    let Some(context) = context else {
        return Vec::new();
    };
    let value = serde_json::to_value(context).expect("securityContext");
    for key in value
        .as_object()
        .into_iter()
        .flat_map(|object| object.keys())
    {
        assert!(
            SECURITY_FIELDS.contains(&key.as_str()),
            "securityContext.{key} is not translated for the container tests"
        );
    }
    let mut options = Vec::new();
    if context.privileged == Some(true) {
        options.push("--privileged".to_owned());
    }
    // ctr sets no_new_privs unless told otherwise, as the CRI plugin does for
    // allowPrivilegeEscalation: false.
    if context.allow_privilege_escalation != Some(false) {
        options.push("--allow-new-privs".to_owned());
    }
    if context.read_only_root_filesystem == Some(true) {
        options.push("--read-only".to_owned());
    }
    // The user is the image's: it must be the one the manifest names.
    let image_user = image_field(image, "{{.Config.User}}");
    let (image_uid, image_gid) = image_user
        .split_once(':')
        .map_or((image_user.as_str(), None), |(uid, gid)| (uid, Some(gid)));
    let image_uid: i64 = if image_uid.is_empty() {
        0
    } else {
        image_uid.parse().expect("a numeric USER in the image")
    };
    assert_eq!(
        context.run_as_user.unwrap_or(image_uid),
        image_uid,
        "the manifest's runAsUser is not the image's USER"
    );
    if let Some(group) = context.run_as_group {
        assert_eq!(
            Some(group.to_string().as_str()),
            image_gid,
            "the manifest's runAsGroup is not the image's"
        );
    }
    if context.run_as_non_root == Some(true) {
        assert_ne!(image_uid, 0, "runAsNonRoot with an image running as root");
    }
    if let Some(capabilities) = &context.capabilities {
        let added: Vec<String> = capabilities.add.iter().flatten().cloned().collect();
        let mut dropped: Vec<String> = Vec::new();
        for name in capabilities.drop.iter().flatten() {
            match name.as_str() {
                "ALL" => dropped.extend(ALL_CAPABILITIES.iter().map(|cap| (*cap).to_owned())),
                other => dropped.push(other.to_owned()),
            }
        }
        // Kubernetes drops, then adds; ctr adds, then drops.
        dropped.retain(|cap| !added.contains(cap));
        for cap in added {
            options.extend(["--cap-add".to_owned(), format!("CAP_{cap}")]);
        }
        for cap in dropped {
            options.extend(["--cap-drop".to_owned(), format!("CAP_{cap}")]);
        }
    }
    // containerd computes its default profile from the capabilities above.
    if let Some(profile) = &context.seccomp_profile {
        match profile.type_.as_str() {
            "RuntimeDefault" => options.push("--seccomp".to_owned()),
            "Unconfined" => {}
            "Localhost" => {
                let file = profile
                    .localhost_profile
                    .as_deref()
                    .expect("a Localhost profile names its file");
                options.extend([
                    "--seccomp".to_owned(),
                    "--seccomp-profile".to_owned(),
                    seccomp_root.join(file).display().to_string(),
                ]);
            }
            other => panic!("seccompProfile type {other}"),
        }
    }
    options
}

fn reject_unknown(object: &Value, known: &[(&str, &str)]) {
    for key in object
        .as_object()
        .into_iter()
        .flat_map(|object| object.keys())
    {
        assert!(
            known.iter().any(|(field, _)| field == key),
            "{key} is not translated for the container tests (e2e/src/daemonset.rs)"
        );
    }
}

/// A memory quantity in bytes (`256Mi`, `1Gi`, `64000000`).
fn bytes(quantity: &Quantity) -> u64 {
    let text = quantity.0.as_str();
    let (number, unit) =
        text.split_at(text.find(|c: char| c.is_alphabetic()).unwrap_or(text.len()));
    let number: u64 = number.parse().expect("a whole number");
    let factor = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("memory unit {other}"),
    };
    number * factor
}

/// A CPU quantity in millicores (`500m`, `1`).
fn millicores(quantity: &Quantity) -> u64 {
    let text = quantity.0.as_str();
    match text.strip_suffix('m') {
        Some(milli) => milli.parse().expect("millicores"),
        None => text.parse::<u64>().expect("cores") * 1000,
    }
}
