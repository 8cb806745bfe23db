//! What the Dockerfile relies on, checked without building it (the image
//! itself is built by `cargo xtask image` and run by
//! e2e/tests/e2e/containers_e2e.rs): its base images are build arguments
//! defaulting to the public ones, the set-up step it runs works, the binary
//! path it copies is the one cargo produces, and the port and entrypoint
//! match the DaemonSet.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Instructions with continuation lines joined, comments dropped.
fn instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
            (
                keyword.to_uppercase(),
                rest.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn all(keyword: &str) -> Vec<String> {
    instructions()
        .into_iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, rest)| rest)
        .collect()
}

#[test]
fn builder_uses_the_projects_setup_and_the_workspace_toolchain() {
    let from = all("FROM");
    assert_eq!(
        from,
        ["${BUILDER_IMAGE} AS build", "${RUNTIME_IMAGE}"],
        "a build stage and a runtime stage, both from build arguments"
    );
    let arguments = all("ARG");
    let cargo_toml = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let rust_version = cargo_toml
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("workspace rust-version");
    assert!(
        arguments.contains(&format!(
            "BUILDER_IMAGE=docker.io/library/rust:{rust_version}-bookworm"
        )),
        "the builder image should default to rust-version {rust_version}: {arguments:?}"
    );
    assert!(
        arguments.contains(&"RUNTIME_IMAGE=gcr.io/distroless/cc-debian12".to_owned()),
        "{arguments:?}"
    );
    let run = all("RUN").join(" && ");
    assert!(run.contains("cargo xtask setup --toolchain-only"), "{run}");
    assert!(
        run.contains("cargo build --release --locked -p flask-ebpf-exporter"),
        "{run}"
    );
    assert!(
        root().join("Cargo.lock").is_file(),
        "--locked needs Cargo.lock"
    );

    // The set-up step the builder runs exists and works (on a machine that
    // already has the toolchain it changes nothing).
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["setup", "--toolchain-only"])
        .env("CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run xtask");
    assert!(status.success());
}

#[test]
fn runtime_stage_runs_the_release_binary_on_the_daemonsets_port() {
    let run = all("RUN").join(" && ");
    assert!(
        run.contains(
            "install --strip -m 0755 target/release/flask-ebpf-exporter /flask-ebpf-exporter"
        ),
        "{run}"
    );
    let copy = all("COPY");
    assert!(
        copy.contains(
            &"--from=build /flask-ebpf-exporter /usr/local/bin/flask-ebpf-exporter".to_owned()
        ),
        "{copy:?}"
    );
    assert_eq!(
        all("ENTRYPOINT"),
        ["[\"/usr/local/bin/flask-ebpf-exporter\"]"]
    );
    // The binary cargo builds has that name.
    let manifest =
        std::fs::read_to_string(root().join("exporter/Cargo.toml")).expect("exporter/Cargo.toml");
    assert!(manifest.contains("[[bin]]\nname = \"flask-ebpf-exporter\""));

    let daemonset =
        std::fs::read_to_string(root().join("manifests/daemonset.yaml")).expect("daemonset");
    let port = all("EXPOSE").join(" ");
    assert!(
        daemonset.contains(&format!("containerPort: {port}")),
        "EXPOSE {port}"
    );
    assert!(daemonset.contains("image: flask-ebpf-exporter:"));
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for path in ["target", ".venv"] {
        assert!(
            ignored.lines().any(|line| line == path),
            "{path} not in .dockerignore"
        );
    }
}
