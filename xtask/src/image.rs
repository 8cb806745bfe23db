//! `cargo xtask image`: builds the Dockerfile with podman, from local
//! stand-ins for its two public base images (no image registry is reachable
//! from the build machines). The stand-ins are made from Debian's own
//! packages: a bookworm root by debootstrap, then
//! `xtask/images/rust-bookworm.Containerfile` (the builder: the official
//! image's apt suites and this machine's Rust toolchain) and
//! `xtask/images/distroless-cc.Containerfile` (the runtime: glibc, libgcc,
//! CA certificates, no shell). Each is rebuilt only when its recipe changes.
//!
//! The end-to-end container tests also need an app image
//! (`tests/fixtures/containers/flask-app.Containerfile`), built the same way.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

/// The agent's image, as the DaemonSet names it (manifests/daemonset.yaml).
pub(crate) const AGENT_IMAGE: &str = "localhost/flask-ebpf-exporter:0.1.0";
/// The Flask app the container tests run in their pods.
pub(crate) const APP_IMAGE: &str = "localhost/flask-ebpf-exporter-test/flask-app:1";
const DEBIAN_STAND_IN: &str = "localhost/stand-in/debian:bookworm";
const BUILDER_STAND_IN: &str = "localhost/stand-in/rust:1.95-bookworm";
const RUNTIME_STAND_IN: &str = "localhost/stand-in/distroless/cc-debian12";
/// The label holding the hash of the recipe an image was built from.
const RECIPE_LABEL: &str = "io.flask-ebpf-exporter.recipe";
/// The Rust toolchain the builder stand-in carries: the one running this.
const RUST_TOOLCHAIN: &str = "stable-x86_64-unknown-linux-gnu";

/// Podman as this machine can run it: its default runtime (crun) refuses
/// the host's hybrid cgroups, and its default ulimits exceed the sandbox's.
pub(crate) fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--cgroup-manager", "cgroupfs", "--runtime", "runc"]);
    command
}

fn podman_build(recipe_hash: &str) -> Command {
    let mut command = podman();
    command.args([
        "build",
        "--network",
        "host",
        "--ulimit",
        "nofile=1024:4096",
        "--ulimit",
        "nproc=1024:1024",
        "--label",
        &format!("{RECIPE_LABEL}={recipe_hash}"),
    ]);
    command
}

/// `cargo xtask image [--tag NAME] [--test-app]`: the agent's image, from
/// the Dockerfile; with `--test-app`, the container tests' app image only.
pub(crate) fn image(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut tag = AGENT_IMAGE.to_owned();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tag" => tag = args.next().context("--tag NAME")?.clone(),
            "--test-app" => return build_app_image(root),
            other => bail!("unknown image option {other}"),
        }
    }
    build_agent_image(root, &tag)
}

/// Builds the agent's image unless one built from the same sources is there.
pub(crate) fn build_agent_image(root: &Path, tag: &str) -> anyhow::Result<()> {
    let debian = debian_stand_in(root)?;
    let builder = builder_stand_in(root, debian)?;
    let runtime = stand_in(
        root,
        RUNTIME_STAND_IN,
        "xtask/images/distroless-cc.Containerfile",
        debian,
        &[],
    )?;
    let sources = sources_hash(root, &[builder, runtime])?;
    if image_recipe(tag).as_deref() == Some(sources.as_str()) {
        eprintln!("{tag} is up to date with the sources");
        return Ok(());
    }
    run(podman_build(&sources)
        .args(["--build-arg", &format!("BUILDER_IMAGE={builder}")])
        .args(["--build-arg", &format!("RUNTIME_IMAGE={runtime}")])
        .args(["-f", "Dockerfile", "-t", tag, "."])
        .current_dir(root))?;
    eprintln!("built {tag}");
    prune_untagged()
}

/// Copies the agent's binary out of the image `tag` to `dest`.
pub(crate) fn copy_agent_binary(tag: &str, dest: &Path) -> anyhow::Result<()> {
    let output = podman()
        .args(["create", tag])
        .output()
        .context("podman create")?;
    if !output.status.success() {
        bail!(
            "podman create {tag}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let container = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let copied = run(podman()
        .arg("cp")
        .arg(format!("{container}:/usr/local/bin/flask-ebpf-exporter"))
        .arg(dest));
    run(podman().args(["rm", &container]))?;
    copied
}

/// Removes the untagged images builds of this project leave (the builder
/// stage, an image a rebuild took the tag from): each carries the recipe
/// label, and the builder stage alone is gigabytes.
fn prune_untagged() -> anyhow::Result<()> {
    run(podman().args([
        "image",
        "prune",
        "--force",
        "--filter",
        &format!("label={RECIPE_LABEL}"),
    ]))
}

/// The app image the container tests run.
pub(crate) fn build_app_image(root: &Path) -> anyhow::Result<()> {
    let debian = debian_stand_in(root)?;
    let recipe = "tests/fixtures/containers/flask-app.Containerfile";
    let mut files = vec![
        recipe.to_owned(),
        "tests/fixtures/app.py".to_owned(),
        "tests/fixtures/oracle.py".to_owned(),
    ];
    let mut hostile: Vec<String> = std::fs::read_dir(root.join("tests/fixtures/hostile"))
        .context("tests/fixtures/hostile")?
        .filter_map(|entry| {
            Some(format!(
                "tests/fixtures/hostile/{}",
                entry.ok()?.file_name().to_str()?
            ))
        })
        .collect();
    hostile.sort();
    files.extend(hostile);
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let hash = recipe_hash(root, &files, debian)?;
    if image_recipe(APP_IMAGE).as_deref() == Some(hash.as_str()) {
        return Ok(());
    }
    run(podman_build(&hash)
        .args(["--build-arg", &format!("BASE={debian}")])
        .args(["-f", recipe, "-t", APP_IMAGE, "tests/fixtures"])
        .current_dir(root))?;
    prune_untagged()
}

/// A Debian bookworm root made by debootstrap, imported as an image, with
/// the apt sources the official Debian image has.
fn debian_stand_in(root: &Path) -> anyhow::Result<&'static str> {
    let sources = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                   Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                   Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
                   Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
    let mut hasher = DefaultHasher::new();
    sources.hash(&mut hasher);
    let hash = format!("{:016x}", hasher.finish());
    if image_recipe(DEBIAN_STAND_IN).as_deref() == Some(hash.as_str()) {
        return Ok(DEBIAN_STAND_IN);
    }
    let work = root.join("target/images");
    let tree = work.join("debian-bookworm");
    if tree.exists() {
        std::fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&tree)
        .arg("http://deb.debian.org/debian"))?;
    std::fs::remove_file(tree.join("etc/apt/sources.list")).ok();
    std::fs::write(tree.join("etc/apt/sources.list.d/debian.sources"), sources)?;
    let tarball = work.join("debian-bookworm.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&tarball)
        .arg("."))?;
    run(podman()
        .args([
            "import",
            "--change",
            "CMD [\"bash\"]",
            "--change",
            &format!("LABEL {RECIPE_LABEL}={hash}"),
        ])
        .arg(&tarball)
        .arg(DEBIAN_STAND_IN))?;
    std::fs::remove_file(&tarball).ok();
    std::fs::remove_dir_all(&tree).ok();
    Ok(DEBIAN_STAND_IN)
}

/// The builder's stand-in, carrying this machine's Rust toolchain.
fn builder_stand_in(root: &Path, debian: &str) -> anyhow::Result<&'static str> {
    let home = std::env::var("HOME").context("HOME")?;
    let rustup_home = std::env::var("RUSTUP_HOME").unwrap_or_else(|_| format!("{home}/.rustup"));
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let toolchain = Path::new(&rustup_home)
        .join("toolchains")
        .join(RUST_TOOLCHAIN);
    let toolchain = toolchain
        .canonicalize()
        .with_context(|| format!("the Rust toolchain at {}", toolchain.display()))?;
    let rustup = Path::new(&cargo_home).join("bin/rustup");
    let volumes = [
        format!("{}:/toolchain:ro", toolchain.display()),
        format!("{}:/rustup:ro", rustup.display()),
        "/etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro".to_owned(),
    ];
    stand_in(
        root,
        BUILDER_STAND_IN,
        "xtask/images/rust-bookworm.Containerfile",
        debian,
        &volumes,
    )
}

/// Builds `recipe` from `debian` as `name`, unless an image built from the
/// same recipe is there.
fn stand_in(
    root: &Path,
    name: &'static str,
    recipe: &str,
    debian: &str,
    volumes: &[String],
) -> anyhow::Result<&'static str> {
    let hash = recipe_hash(root, &[recipe], debian)?;
    if image_recipe(name).as_deref() == Some(hash.as_str()) {
        return Ok(name);
    }
    let mut command = podman_build(&hash);
    for volume in volumes {
        command.args(["-v", volume]);
    }
    let context = root.join("target/images/empty-context");
    std::fs::create_dir_all(&context)?;
    run(command
        .args(["--build-arg", &format!("BASE={debian}")])
        .arg("-f")
        .arg(root.join(recipe))
        .args(["-t", name])
        .arg(&context))?;
    Ok(name)
}

/// A hash of what the Dockerfile builds from: the commit, uncommitted
/// changes, untracked files, and the base images' IDs.
fn sources_hash(root: &Path, bases: &[&str]) -> anyhow::Result<String> {
    let git = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let output = Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .context("git")?;
        if !output.status.success() {
            bail!("git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(output.stdout)
    };
    let mut hasher = DefaultHasher::new();
    git(&["rev-parse", "HEAD"])?.hash(&mut hasher);
    git(&["diff", "HEAD", "--binary"])?.hash(&mut hasher);
    let untracked = git(&["ls-files", "--others", "--exclude-standard", "-z"])?;
    for name in untracked
        .split(|&byte| byte == 0)
        .filter(|name| !name.is_empty())
    {
        name.hash(&mut hasher);
        let path = root.join(String::from_utf8_lossy(name).as_ref());
        std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
    }
    for base in bases {
        image_id(base)?.hash(&mut hasher);
    }
    Ok(format!("{:016x}", hasher.finish()))
}

/// A hash of the files a recipe is made of and of its base image's ID.
fn recipe_hash(root: &Path, files: &[&str], base: &str) -> anyhow::Result<String> {
    let mut hasher = DefaultHasher::new();
    for file in files {
        let text = std::fs::read(root.join(file)).with_context(|| format!("reading {file}"))?;
        text.hash(&mut hasher);
    }
    image_id(base)?.hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}

fn image_id(name: &str) -> anyhow::Result<String> {
    let output = podman()
        .args(["image", "inspect", "--format", "{{.Id}}", name])
        .output()
        .context("podman image inspect")?;
    if !output.status.success() {
        bail!("no image {name}");
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The recipe hash an image was built from, if it exists.
fn image_recipe(name: &str) -> Option<String> {
    let output = podman()
        .args([
            "image",
            "inspect",
            "--format",
            &format!("{{{{index .Labels \"{RECIPE_LABEL}\"}}}}"),
            name,
        ])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
