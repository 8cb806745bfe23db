//! Builds the kernel programs (exporter-ebpf) for bpfel-unknown-none with
//! Debian's rustc-web toolchain and its prebuilt bpf `core`; the object lands
//! in OUT_DIR and is embedded in the binary. README.md, "Building the kernel
//! programs", says why this toolchain.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
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
