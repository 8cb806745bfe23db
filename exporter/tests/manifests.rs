//! The shipped Kubernetes manifests, checked against what the binary really
//! accepts. Kubernetes' own schemas check them in e2e/ (manifest_schemas),
//! where the venv with kubernetes-validate is.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, Parser as _};
use flask_ebpf_exporter::{
    config::Config,
    preflight::TRACEFS_SYSCALLS,
    server::{HEALTHZ_PATH, READYZ_PATH},
};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> PathBuf {
    workspace().join("manifests")
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn top_level_yaml() -> BTreeSet<String> {
    fs::read_dir(manifests())
        .expect("manifests/")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect()
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization: serde_json::Value = read_yaml(&manifests().join("Kustomization"));
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|resource| resource.as_str().map(str::to_owned))
        .collect();
    // `kubectl apply -f manifests/` and `-k manifests/` install the same set.
    assert_eq!(listed, top_level_yaml());
}

fn exporter_container(daemonset: &DaemonSet) -> &Container {
    let spec = daemonset.spec.as_ref().expect("spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

#[test]
fn daemonset_runs_the_binary_as_it_accepts() {
    let daemonset: DaemonSet = read_yaml(&manifests().join("daemonset.yaml"));
    let container = exporter_container(&daemonset);

    // Every environment variable is one the CLI reads, and its value (or,
    // for the downward API, a stand-in) parses together with the args.
    let cli = Config::command();
    let mut argv = vec!["flask-ebpf-exporter".to_owned()];
    argv.extend(container.args.clone().unwrap_or_default());
    for variable in container.env.as_deref().unwrap_or_default() {
        let argument = cli
            .get_arguments()
            .find(|arg| {
                arg.get_env()
                    .is_some_and(|env| env == variable.name.as_str())
            })
            .unwrap_or_else(|| panic!("the binary does not read {}", variable.name));
        let value = match (&variable.value, &variable.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(source)) => {
                let field = source.field_ref.as_ref().expect("fieldRef");
                assert_eq!(
                    (variable.name.as_str(), field.field_path.as_str()),
                    ("NODE_NAME", "spec.nodeName"),
                    "only the node name comes from the downward API"
                );
                "node-a".to_owned()
            }
            (None, None) => panic!("{} has no value", variable.name),
        };
        let long = argument.get_long().expect("long flag");
        argv.push(format!("--{long}={value}"));
    }
    let config = Config::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert_eq!(config.node_name.as_deref(), Some("node-a"));

    // The port Prometheus scrapes is the one the binary listens on.
    let ports = container.ports.as_deref().expect("ports");
    let metrics = ports
        .iter()
        .find(|port| port.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(metrics.container_port, i32::from(config.listen.port()));
    assert_eq!(metrics.host_port, Some(metrics.container_port));
    assert!(
        config.listen.ip().is_unspecified(),
        "reachable at the node's address"
    );

    // Probes use the endpoints the binary serves.
    let probe = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("httpGet probe");
        (get.path.unwrap_or_default(), get.port)
    };
    let named =
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".to_owned());
    assert_eq!(
        probe(&container.liveness_probe),
        (HEALTHZ_PATH.to_owned(), named.clone())
    );
    assert_eq!(
        probe(&container.readiness_probe),
        (READYZ_PATH.to_owned(), named)
    );

    // Least privilege: named capabilities, nothing privileged.
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"])
    );

    let pod = daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(
        pod.host_pid,
        Some(true),
        "the node's processes must be visible"
    );
    assert_eq!(pod.host_network, Some(true), "served on the node's address");
    // tracefs is mounted where the binary looks for it.
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    assert!(
        mounts.iter().any(|mount| TRACEFS_SYSCALLS
            .iter()
            .any(|dir| dir.starts_with(&format!("{}/", mount.mount_path)))),
        "no tracefs mount at {TRACEFS_SYSCALLS:?}"
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "runs on every node, tainted ones included"
    );
}

#[test]
fn rbac_grants_the_service_account_only_what_the_agent_calls() {
    let daemonset: DaemonSet = read_yaml(&manifests().join("daemonset.yaml"));
    let account: ServiceAccount = read_yaml(&manifests().join("serviceaccount.yaml"));
    let binding: ClusterRoleBinding = read_yaml(&manifests().join("clusterrolebinding.yaml"));
    let role: ClusterRole = read_yaml(&manifests().join("clusterrole.yaml"));
    let pod = daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(daemonset.metadata.namespace, account.metadata.namespace);
    let subject = &binding.subjects.as_deref().expect("subjects")[0];
    assert_eq!(
        (Some(subject.name.clone()), subject.namespace.clone()),
        (
            account.metadata.name.clone(),
            account.metadata.namespace.clone()
        )
    );
    assert_eq!(Some(binding.role_ref.name.clone()), role.metadata.name);

    // (API group, resource) → verbs: the pod watch lists and watches pods;
    // owners are fetched with get (identity/kubernetes.rs).
    let granted: BTreeSet<(String, String, String)> = role
        .rules
        .iter()
        .flatten()
        .flat_map(|rule| {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            let verbs = rule.verbs.clone();
            groups.into_iter().flat_map(move |group| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |resource| {
                    let group = group.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |verb| (group.clone(), resource.clone(), verb))
                })
            })
        })
        .collect();
    let wanted: BTreeSet<(String, String, String)> = [
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("apps", "replicasets", "get"),
        ("batch", "jobs", "get"),
    ]
    .iter()
    .map(|(g, r, v)| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(granted, wanted);
}

#[test]
fn pod_monitor_selects_the_agents_metrics_port() {
    // No offline schema exists for the Prometheus Operator's CRDs; check it
    // against the DaemonSet it must select.
    let monitor: serde_json::Value = read_yaml(&manifests().join("prometheus/podmonitor.yaml"));
    let daemonset: DaemonSet = read_yaml(&manifests().join("daemonset.yaml"));
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "PodMonitor");
    let labels = daemonset
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|meta| meta.labels.clone())
        .expect("pod labels");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(labels.get(key).map(String::as_str), value.as_str(), "{key}");
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(
        endpoint["honorLabels"], true,
        "the series' namespace/pod labels must win"
    );
    let container = exporter_container(&daemonset);
    assert!(
        container
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("metrics"))
    );
}
