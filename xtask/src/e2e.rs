//! Runs the end-to-end crate (e2e/) as root: its test binary one module at
//! a time, so that no module's agent or load shares the node with
//! another's, then its benchmarks once each as checks.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{image, run};

const PACKAGE: &str = "flask-ebpf-exporter-e2e";

/// `cargo_args` go to every `cargo test`; `test_args` to the test binary.
pub(crate) fn run_all(
    root: &Path,
    cargo_args: &[String],
    test_args: &[String],
) -> anyhow::Result<()> {
    // Cargo builds no binary for another package's tests: the tests start
    // the one built here.
    run(Command::new("cargo")
        .args(["build", "-p", "flask-ebpf-exporter"])
        .current_dir(root))?;
    let mut failed = Vec::new();
    for module in modules(root)? {
        let status = cargo_test(root, cargo_args)
            .args(["--test", "e2e", "--"])
            .arg(format!("{module}::"))
            .args(test_args)
            .status()
            .context("cargo test")?;
        if !status.success() {
            failed.push(module);
        }
    }
    let benches = cargo_test(root, cargo_args)
        .arg("--benches")
        .status()
        .context("cargo test --benches")?;
    if !benches.success() {
        failed.push("the benchmarks' checks".to_owned());
    }
    if !failed.is_empty() {
        bail!("end-to-end tests failed in: {}", failed.join(", "));
    }
    Ok(())
}

fn cargo_test(root: &Path, cargo_args: &[String]) -> Command {
    let mut command = Command::new("cargo");
    command
        .args(["test", "-p", PACKAGE])
        .args(cargo_args)
        .env("FLASK_EBPF_VENV", root.join(".venv"))
        .env("FLASK_EBPF_IMAGE", image::AGENT_IMAGE)
        .env("FLASK_EBPF_APP_IMAGE", image::APP_IMAGE)
        .current_dir(root);
    eprintln!("+ {command:?}");
    command
}

/// The test binary's modules, from its own list (`module::test: test`).
fn modules(root: &Path) -> anyhow::Result<Vec<String>> {
    let output = cargo_test(root, &[])
        .args(["--test", "e2e", "--", "--list"])
        .output()
        .context("cargo test -- --list")?;
    if !output.status.success() {
        bail!(
            "listing the end-to-end tests failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut modules: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .filter_map(|test| test.split_once("::"))
        .map(|(module, _)| module.to_owned())
        .collect();
    modules.dedup();
    if modules.is_empty() {
        bail!("the end-to-end binary lists no tests");
    }
    Ok(modules)
}
