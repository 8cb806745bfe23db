//! Developer and CI tasks: `cargo xtask setup | run | image | test | bench | scale`.
//!
//! `setup` is idempotent: it installs only what is missing (Debian packages,
//! bpf-linker built against Debian's LLVM, tracefs, the Python venv the tests
//! and benchmark use). docs/architecture.md, "Building the kernel programs", says why.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

mod demo;
mod e2e;
mod guest_root;
mod image;
mod kernels;

/// Debian packages of the BPF toolchain (rustc-web with a prebuilt bpf
/// `core`). The LLVM that bpf-linker links against follows rustc-web's LLVM,
/// so it is added after.
const TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    // setcap, for the file capabilities of the image's binary.
    "libcap2-bin",
];
/// Debian packages of the real components the tests and benchmark use.
const TEST_PACKAGES: &[&str] = &[
    "python3-venv",
    "wrk",
    "prometheus",
    "redis-server",
    "redis-tools",
    // saturation_e2e compares body sizes with what curl sent and received.
    "curl",
    // debug_pages_e2e renders the debug pages in a real browser (headless).
    "chromium",
];
/// Debian packages that build the image and run the container tests: podman
/// (with runc; crun refuses hybrid cgroups), containerd, the CNI plugins
/// that give pods their networks, and debootstrap for the base images.
const CONTAINER_PACKAGES: &[&str] = &[
    "podman",
    "buildah",
    "runc",
    "containerd",
    "containernetworking-plugins",
    "debootstrap",
    "iproute2",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets under fuzz/fuzz_targets.
const FUZZ_TARGETS: &[&str] = &[
    "http_connection",
    "event_decoding",
    "flask_rules",
    "routes_annotation",
    "cgroup_paths",
    "route_learner",
    "python_source",
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("help", &[]));
    // `cargo xtask run -- --flag`: what follows `--` goes to the program.
    let rest = rest.strip_prefix(&["--".to_owned()][..]).unwrap_or(rest);
    let root = workspace_root()?;
    match task {
        // The image build (Dockerfile) needs only the toolchain.
        "setup" if rest.iter().any(|arg| arg == "--toolchain-only") => setup_toolchain(&mut false),
        "setup" => setup(&root),
        "image" => {
            setup(&root)?;
            image::image(&root, rest)
        }
        "run" => {
            setup(&root)?;
            run(Command::new("cargo")
                .args(["build", "--release"])
                .current_dir(&root))?;
            let binary = root.join("target/release/flask-ebpf-exporter");
            let error = exec(Command::new(binary).args(rest));
            Err(error).context("starting the exporter")
        }
        "test" => {
            setup(&root)?;
            test(&root, rest)
        }
        "demo" => {
            setup(&root)?;
            demo::demo(&root, rest)
        }
        "fuzz" => {
            setup(&root)?;
            fuzz(&root, rest)
        }
        "docs" => {
            // The generated reference tables (exporter/tests/reference_docs.rs).
            run(Command::new("cargo")
                .args([
                    "test",
                    "-p",
                    "flask-ebpf-exporter",
                    "--test",
                    "reference_docs",
                ])
                .env("UPDATE_DOCS", "1")
                .current_dir(&root))
        }
        "kernels" => {
            setup(&root)?;
            kernels::kernels(&root, rest)
        }
        "bench" => {
            setup(&root)?;
            // e2e/benches/overhead.rs (arguments go to it), then the
            // userspace replay, exporter/benches/replay.rs, route
            // discovery's harvest, e2e/benches/route_discovery.rs, and the
            // series per route against prometheus-flask-exporter's,
            // e2e/benches/series.rs. The e2e benchmarks start the release
            // binary built here.
            run(Command::new("cargo")
                .args(["build", "--release", "-p", "flask-ebpf-exporter"])
                .current_dir(&root))?;
            run(Command::new("cargo")
                .args([
                    "bench",
                    "-p",
                    "flask-ebpf-exporter-e2e",
                    "--bench",
                    "overhead",
                    "--",
                ])
                .args(rest)
                .current_dir(&root))?;
            for (package, bench) in [
                ("flask-ebpf-exporter", "replay"),
                ("flask-ebpf-exporter-e2e", "route_discovery"),
                ("flask-ebpf-exporter-e2e", "series"),
            ] {
                run(Command::new("cargo")
                    .args(["bench", "-p", package, "--bench", bench])
                    .current_dir(&root))?;
            }
            Ok(())
        }
        "scale" => {
            setup(&root)?;
            // The scale model (e2e/benches/scale.rs): a node's series,
            // /metrics and memory, Prometheus' memory per series, and
            // clusters of such nodes; then the API server's load under pod
            // churn, from the real exporter (e2e/benches/pod_churn.rs).
            run(Command::new("cargo")
                .args(["build", "--release", "-p", "flask-ebpf-exporter"])
                .current_dir(&root))?;
            for bench in ["scale", "pod_churn"] {
                run(Command::new("cargo")
                    .args(["bench", "-p", "flask-ebpf-exporter-e2e", "--bench", bench])
                    .current_dir(&root))?;
            }
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n  setup   install what this machine lacks (idempotent); --toolchain-only: just what building needs\n  run     setup, build, and run the exporter (arguments go to it)\n  image   setup, then the agent's image from the Dockerfile, with podman and local stand-ins for its base images (--tag NAME; --test-app: the container tests' app image)\n  demo    setup, then a Flask app, the agent watching it and a little traffic; prints what to open (--seconds N: stop after N)\n  test    setup, then formatting, clippy and every test, eBPF ones included, Debian 13's kernel in a VM, and a short run of every fuzz target\n  fuzz    setup, then every fuzz target for --seconds N (60) each; --dev builds without optimization\n  bench   setup, then the overhead benchmark, the userspace replay, route discovery's harvest and the series per route against prometheus-flask-exporter's\n  scale   setup, then the scale model (a node's series, /metrics and memory; Prometheus' memory per series; clusters of 100 to 5,000 nodes) and the API server's load under pod churn\n  docs    rewrite the manual's generated tables (docs/configuration.md's flags) from the code\n  kernels setup, then the agent on Debian's kernels in virtual machines (--kernel NAME, repeatable; default all; --agent-image TAG: run that image's binary instead of a release build)"
            );
            if task == "help" {
                Ok(())
            } else {
                bail!("unknown task {task}")
            }
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = env::var("CARGO_MANIFEST_DIR").context("run through `cargo xtask`")?;
    Ok(Path::new(&manifest)
        .parent()
        .context("xtask/ has a parent")?
        .to_path_buf())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("spawning {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

#[cfg(unix)]
fn exec(command: &mut Command) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    command.exec()
}

/// Installs the Debian packages not installed yet; runs `apt-get update`
/// once, the first time anything is missing.
fn install_missing(packages: &[String], updated: &mut bool) -> anyhow::Result<()> {
    let missing: Vec<&String> = packages
        .iter()
        .filter(|package| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package.as_str()])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !*updated {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        *updated = true;
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn setup(root: &Path) -> anyhow::Result<()> {
    let mut apt_updated = false;
    setup_toolchain(&mut apt_updated)?;
    let packages: Vec<String> = TEST_PACKAGES
        .iter()
        .chain(CONTAINER_PACKAGES)
        .map(|p| (*p).to_owned())
        .collect();
    install_missing(&packages, &mut apt_updated)?;

    if !Path::new("/sys/kernel/tracing/events/syscalls").is_dir()
        && !Path::new("/sys/kernel/debug/tracing/events/syscalls").is_dir()
    {
        run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))?;
    }

    let has_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if !has_cargo_fuzz {
        run(Command::new(cargo()).args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))?;
    }

    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    let requirements = root.join("tests/fixtures/requirements.txt");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let stamp = venv.join(".requirements-installed");
    let wanted =
        std::fs::read_to_string(&requirements).context("tests/fixtures/requirements.txt")?;
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "-r"])
            .arg(&requirements))?;
        std::fs::write(&stamp, wanted)?;
    }
    Ok(())
}

/// What building needs: Debian's BPF toolchain and bpf-linker.
fn setup_toolchain(apt_updated: &mut bool) -> anyhow::Result<()> {
    let packages: Vec<String> = TOOLCHAIN_PACKAGES.iter().map(|p| (*p).to_owned()).collect();
    install_missing(&packages, apt_updated)?;
    let llvm_major = debian_llvm_major()?;
    install_missing(&[format!("llvm-{llvm_major}-dev")], apt_updated)?;

    let has_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !has_linker {
        run(Command::new(cargo())
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm_major}")))?;
    }
    Ok(())
}

/// The cargo running this task: the toolchain the image's builder has,
/// where `cargo +stable` would ask rustup for a toolchain it may not have.
fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// LLVM major version of Debian's rustc, which bpf-linker must match.
fn debian_llvm_major() -> anyhow::Result<String> {
    let output = Command::new("/usr/bin/rustc")
        .arg("-vV")
        .output()
        .context("/usr/bin/rustc -vV")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .map(str::to_owned)
        .context("no LLVM version in /usr/bin/rustc -vV")
}

/// Runs every fuzz target (cargo-fuzz, libFuzzer with AddressSanitizer, on
/// the nightly toolchain) for `--seconds N` each; `--dev` builds them
/// unoptimized, which is quicker to build and slower to run. A crash fails
/// the run and leaves its input under fuzz/artifacts/<target>/.
fn fuzz(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut seconds = "60".to_owned();
    let mut dev = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().context("--seconds N")?.clone(),
            "--dev" => dev = true,
            other => bail!("unknown fuzz option {other}"),
        }
    }
    for target in FUZZ_TARGETS {
        let mut command = Command::new("cargo");
        command.args(["+nightly", "fuzz", "run"]);
        if dev {
            command.arg("--dev");
        }
        run(command
            .arg(target)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
            ])
            .current_dir(root))?;
    }
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args(["fmt", "--all", "--check"])
        .current_dir(root))?;
    // The container tests run the agent's image and an app image.
    image::build_agent_image(root, image::AGENT_IMAGE)?;
    image::build_app_image(root)?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(root))?;
    // The kernel programs build with Debian's toolchain, which has no
    // clippy: rustc's lints (the workspace's among them) check them there.
    let ebpf_toolchain = std::env::var("EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".to_owned());
    run(Command::new("rustup")
        .args(["run", &ebpf_toolchain, "cargo", "check", "--bins"])
        .args(["-p", "exporter-ebpf", "--target", "bpfel-unknown-none"])
        .env("RUSTFLAGS", "-D warnings")
        .current_dir(root))?;
    // Arguments before `--` go to cargo, those after it to the tests.
    let (cargo_args, test_args) = match extra.iter().position(|arg| arg == "--") {
        Some(at) => (&extra[..at], &extra[at + 1..]),
        None => (extra, &[][..]),
    };
    run(Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--exclude",
            "flask-ebpf-exporter-e2e",
        ])
        .arg("--all-targets")
        .args(cargo_args)
        .arg("--")
        .args(test_args)
        .current_dir(root))?;
    // The end-to-end tests load programs into the real kernel: root only.
    e2e::run_all(root, cargo_args, test_args)?;
    // One kernel that is not this machine's, in a VM: the fastest to boot
    // of `cargo xtask kernels`' list, Debian 13's, running the image's
    // binary (a second release build would cost CI minutes).
    kernels::kernels(
        root,
        &[
            "--kernel".to_owned(),
            "trixie-cloud".to_owned(),
            "--agent-image".to_owned(),
            image::AGENT_IMAGE.to_owned(),
        ],
    )?;
    // A smoke run of each fuzz target: it builds and finds nothing quickly.
    fuzz(
        root,
        &["--seconds".to_owned(), "5".to_owned(), "--dev".to_owned()],
    )
}
