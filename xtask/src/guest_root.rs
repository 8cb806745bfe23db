//! The kernel matrix's guest root, as an initramfs: busybox, the agent
//! built here, this machine's Python with the standard library and the
//! fixture app's packages from the test venv, the app, and
//! xtask/guest/{init,traffic.py}. Shared libraries are those `ldd` names,
//! copied with the symlinks that lead to them, so the guest's paths are
//! this machine's.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

/// Standard library directories the app never imports.
const UNUSED_STDLIB: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "unittest",
];
/// The app's packages (tests/fixtures/app.py under gunicorn), with their
/// `.dist-info` directories.
const APP_PACKAGES: &[&str] = &[
    "flask",
    "werkzeug",
    "jinja2",
    "markupsafe",
    "itsdangerous",
    "click",
    "blinker",
    "gunicorn",
    "packaging",
];

/// Builds `work/root.cpio.gz` around the `agent` binary and returns its path.
pub(crate) fn build(root: &Path, work: &Path, agent_binary: &Path) -> anyhow::Result<PathBuf> {
    let staging = work.join("root");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    for dir in ["proc", "sys", "dev", "tmp", "etc", "app", "guest", "venv"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    fs::write(staging.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    let mut elves = Vec::new();

    mirror(&staging, Path::new("/bin/busybox"))?;
    install(&root.join("xtask/guest/init"), &staging.join("init"), 0o755)?;
    install(
        &root.join("xtask/guest/traffic.py"),
        &staging.join("guest/traffic.py"),
        0o644,
    )?;
    for file in ["app.py", "oracle.py"] {
        install(
            &root.join("tests/fixtures").join(file),
            &staging.join("app").join(file),
            0o644,
        )?;
    }

    let agent = staging.join("flask-ebpf-exporter");
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(agent_binary)
        .arg(&agent))?;
    elves.push(agent);

    let python = fs::canonicalize("/usr/bin/python3").context("this machine's python3")?;
    let version = python
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("python"))
        .context("python3's version")?
        .to_owned();
    mirror(&staging, Path::new("/usr/bin/python3"))?;
    elves.push(staging.join(python.strip_prefix("/")?));
    let stdlib = PathBuf::from(format!("/usr/lib/python{version}"));
    copy_tree(&stdlib, &staging.join(stdlib.strip_prefix("/")?), &|name| {
        !UNUSED_STDLIB.contains(&name) && !name.starts_with("config-")
    })?;
    let site = root.join(format!(".venv/lib/python{version}/site-packages"));
    for entry in fs::read_dir(&site).context("the test venv (cargo xtask setup)")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_lowercase();
        let wanted = APP_PACKAGES.iter().any(|package| {
            name == *package
                || name.starts_with(&format!("{package}-")) && name.ends_with(".dist-info")
        });
        if wanted {
            copy_tree(
                &entry.path(),
                &staging.join("venv/site-packages").join(entry.file_name()),
                &|_| true,
            )?;
        }
    }
    collect_shared_objects(&staging, &mut elves)?;

    let mut libraries = BTreeSet::new();
    for elf in &elves {
        libraries.extend(needed_libraries(elf)?);
    }
    for library in &libraries {
        mirror(&staging, library)?;
    }

    let archive = work.join("root.cpio.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
        .arg(&archive)
        .current_dir(&staging))?;
    Ok(archive)
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies a directory tree, leaving out the top-level entries `keep`
/// refuses (symlinks inside are copied as the files they point to).
fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&str) -> bool) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if !keep(&name.to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            copy_tree(&path, &to.join(&name), &|_| true)?;
        } else if path.is_file() {
            fs::copy(&path, to.join(&name))?;
        }
    }
    Ok(())
}

/// The extension modules copied, which need libraries of their own.
fn collect_shared_objects(dir: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            collect_shared_objects(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "so") {
            found.push(path);
        }
    }
    Ok(())
}

/// The libraries `ldd` says an ELF file loads, its loader included, as
/// this machine names them.
fn needed_libraries(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(elf).output().context("ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("not found") {
        bail!(
            "{} needs libraries this machine lacks:\n{text}",
            elf.display()
        );
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `path` into `staging` at the same place, recreating each symlink
/// on the way (merged /usr, the loader's /lib64 link) and what it points to.
fn mirror(staging: &Path, path: &Path) -> anyhow::Result<()> {
    let mut walked = PathBuf::from("/");
    let components: Vec<Component> = path.components().skip(1).collect();
    for (index, component) in components.iter().enumerate() {
        walked.push(component);
        let inside = staging.join(walked.strip_prefix("/")?);
        let meta = fs::symlink_metadata(&walked)
            .with_context(|| format!("{} (for {})", walked.display(), path.display()))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&walked)?;
            if fs::symlink_metadata(&inside).is_err() {
                if let Some(parent) = inside.parent() {
                    fs::create_dir_all(parent)?;
                }
                symlink(&target, &inside)?;
            }
            let base = walked.parent().unwrap_or(Path::new("/"));
            let mut resolved = normalize(&base.join(&target));
            for rest in &components[index + 1..] {
                resolved.push(rest);
            }
            return mirror(staging, &resolved);
        }
        if meta.is_dir() {
            fs::create_dir_all(&inside)?;
        } else if fs::symlink_metadata(&inside).is_err() {
            fs::copy(&walked, &inside)?;
        }
    }
    Ok(())
}

/// `a/b/../c` as `a/c`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
