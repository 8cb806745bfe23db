//! The shipped Kubernetes manifests against Kubernetes' own schemas
//! (kubernetes-validate, offline, from the test venv).

use std::{fs, path::PathBuf, process::Command};

use flask_ebpf_exporter_e2e as support;

/// A current Kubernetes release, as kubernetes-validate names it.
const KUBERNETES_VERSION: &str = "1.35.0";

#[test]
fn manifests_pass_kubernetes_validate_strict() {
    let venv = support::require_venv();
    let manifests = support::workspace().join("manifests");
    let mut files: Vec<PathBuf> = fs::read_dir(&manifests)
        .expect("manifests/")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.push(manifests.join("example/flask-app.yaml"));
    let output = Command::new(venv.join("bin/kubernetes-validate"))
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("run kubernetes-validate (cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    for resource in [
        "namespace/flask-ebpf-exporter",
        "serviceaccount/flask-ebpf-exporter",
        "clusterrole/flask-ebpf-exporter",
        "clusterrolebinding/flask-ebpf-exporter",
        "daemonset/flask-ebpf-exporter",
        "deployment/flask-demo",
        "service/flask-demo",
        "configmap/flask-demo",
    ] {
        assert!(
            report.contains(&format!("passed for resource {resource} ")),
            "{resource} not validated:\n{report}"
        );
    }
    assert!(
        !report.contains("ERROR") && !report.contains("WARN"),
        "{report}"
    );
}
