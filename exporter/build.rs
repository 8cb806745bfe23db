//! Builds the kernel programs (exporter-ebpf) for bpfel-unknown-none with
//! Debian's rustc-web toolchain and its prebuilt bpf `core`; the object lands
//! in OUT_DIR and is embedded in the binary. docs/architecture.md says why
//! this toolchain.
//!
//! aya-build relays every line of its inner cargo as a `cargo:warning`,
//! which a reader takes for problems. So the build runs in a second run of
//! this script, and its relayed lines are shown only when it fails.
use std::process::Command;

use anyhow::{Context as _, bail};

/// Set in the second run: build, printing whatever aya-build prints.
const INNER_RUN: &str = "FLASK_EBPF_EXPORTER_INNER_BUILD";

fn main() -> anyhow::Result<()> {
    if std::env::var_os(INNER_RUN).is_some() {
        return build_kernel_programs();
    }
    let script = std::env::current_exe().context("the build script's path")?;
    let output = Command::new(script)
        .env(INNER_RUN, "1")
        .output()
        .context("running the kernel programs' build")?;
    let failed = !output.status.success();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // Cargo's own instructions (rerun-if-…) always pass through.
        if failed || !line.starts_with("cargo:warning=") {
            println!("{line}");
        }
    }
    if failed {
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        bail!(
            "building the kernel programs failed ({}): see the lines above",
            output.status
        );
    }
    Ok(())
}

fn build_kernel_programs() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let workspace = std::path::Path::new(&manifest_dir)
        .parent()
        .context("exporter/ has a parent")?;
    let ebpf_dir = workspace.join("exporter-ebpf");
    let common_dir = workspace.join("exporter-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    let toolchain = std::env::var("EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".to_owned());
    println!("cargo:rerun-if-env-changed=EBPF_TOOLCHAIN");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "exporter-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
