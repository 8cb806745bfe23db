//! `cargo xtask kernels [--kernel NAME]…`: the agent on the kernels users
//! run, in virtual machines. Each kernel comes from Debian's packages (the
//! newest of its suite), boots under qemu (TCG: nested KVM fails on the
//! build machines) with an initramfs holding busybox, the agent built here,
//! Python with Flask and gunicorn, tests/fixtures/app.py and
//! xtask/guest/{init,traffic.py}. The guest sends a known mix of requests
//! and prints the agent's /metrics; this side compares the two and prints,
//! per kernel, whether the programs loaded (or the agent's refusal), the
//! counts, the rule text and the BPF run time per request.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{install_missing, run};

/// A kernel of the matrix: Debian's package for it, and whether the agent
/// must refuse it (below its minimum).
struct Kernel {
    name: &'static str,
    suite: &'static str,
    /// The meta-package naming the suite's newest kernel of this flavour.
    package: &'static str,
    refused: bool,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "bookworm-cloud",
        suite: "bookworm",
        package: "linux-image-cloud-amd64",
        refused: false,
    },
    Kernel {
        name: "bookworm-generic",
        suite: "bookworm",
        package: "linux-image-amd64",
        refused: false,
    },
    Kernel {
        name: "trixie-cloud",
        suite: "trixie",
        package: "linux-image-cloud-amd64",
        refused: false,
    },
    Kernel {
        name: "sid-cloud",
        suite: "sid",
        package: "linux-image-cloud-amd64",
        refused: false,
    },
    Kernel {
        name: "bullseye-cloud",
        suite: "bullseye",
        package: "linux-image-cloud-amd64",
        refused: true,
    },
];

const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];
/// How long one guest may run, boot to power-off.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
const MARKER: &str = "KERNEL-MATRIX";

/// `cargo xtask kernels [--kernel NAME]… [--agent-image TAG]`: with
/// `--agent-image`, the guests run the binary of that image (what users
/// deploy) instead of a release build made here.
pub(crate) fn kernels(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut names = Vec::new();
    let mut agent_image = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--kernel" => names.push(args.next().context("--kernel NAME")?.clone()),
            "--agent-image" => agent_image = Some(args.next().context("--agent-image TAG")?),
            other => bail!("unknown option {other}"),
        }
    }
    let chosen: Vec<&Kernel> = if names.is_empty() {
        KERNELS.iter().collect()
    } else {
        names
            .iter()
            .map(|name| {
                KERNELS
                    .iter()
                    .find(|kernel| kernel.name == name)
                    .with_context(|| format!("no kernel {name} (known: {})", known()))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let packages: Vec<String> = HOST_PACKAGES.iter().map(|p| (*p).to_owned()).collect();
    install_missing(&packages, &mut false)?;
    let work = root.join("target/kernels");
    fs::create_dir_all(&work)?;
    let agent = match agent_image {
        Some(tag) => {
            let agent = work.join("flask-ebpf-exporter");
            crate::image::copy_agent_binary(tag, &agent)?;
            agent
        }
        None => {
            run(Command::new("cargo")
                .args(["build", "--release", "-p", "flask-ebpf-exporter"])
                .current_dir(root))?;
            root.join("target/release/flask-ebpf-exporter")
        }
    };
    let initramfs = crate::guest_root::build(root, &work, &agent)?;
    let apt = Apt::new(&work)?;
    let mut failures = Vec::new();
    for kernel in chosen {
        let vmlinuz = apt.kernel_image(kernel)?;
        let started = Instant::now();
        let log = work.join(format!("{}.log", kernel.name));
        let mut output = boot(&vmlinuz, &initramfs)?;
        fs::write(&log, &output)?;
        let mut report = Report::read(&output);
        if report.uname.is_none() {
            // The guest kernel died before init ran: qemu's TCG with two
            // vCPUs now and then oopses a kernel that patches its own text
            // at boot. That says nothing of the agent, so once is forgiven.
            println!(
                "\n{}: the guest kernel did not reach init (console in {}); booting it again",
                kernel.name,
                log.display()
            );
            fs::rename(&log, log.with_extension("first-boot.log"))?;
            output = boot(&vmlinuz, &initramfs)?;
            fs::write(&log, &output)?;
            report = Report::read(&output);
        }
        println!(
            "\n{} ({} {}), {:.0} s in the VM",
            kernel.name,
            kernel.suite,
            kernel.package,
            started.elapsed().as_secs_f64()
        );
        if let Err(failure) = report.judge(kernel) {
            println!("  FAILED: {failure}");
            failures.push(format!("{}: {failure}", kernel.name));
        }
    }
    if !failures.is_empty() {
        bail!("kernels failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

fn known() -> String {
    KERNELS
        .iter()
        .map(|kernel| kernel.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// apt with a state of its own, so that other suites' kernels can be
/// downloaded without touching the machine's sources.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(work: &Path) -> anyhow::Result<Self> {
        let dir = work.join("apt");
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        // A stable suite's newest kernel is in its -security or -updates
        // pocket.
        let mut sources = String::new();
        for suite in ["bookworm", "trixie", "bullseye"] {
            sources.push_str(&format!(
                "deb http://deb.debian.org/debian {suite} main\n\
                 deb http://deb.debian.org/debian {suite}-updates main\n\
                 deb http://deb.debian.org/debian-security {suite}-security main\n"
            ));
        }
        sources.push_str("deb http://deb.debian.org/debian sid main\n");
        fs::write(dir.join("sources.list"), sources)?;
        let apt = Apt { dir };
        let fresh = fs::metadata(apt.dir.join("lists"))
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(24 * 3600))
            && fs::read_dir(apt.dir.join("lists"))?.count() > 2;
        if !fresh {
            run(apt.command("apt-get").args(["update", "-q"]))?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let dir = self.dir.display();
        let mut command = Command::new(program);
        command.args([
            "-o".to_owned(),
            format!("Dir::Etc::SourceList={dir}/sources.list"),
            "-o".to_owned(),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            "-o".to_owned(),
            format!("Dir::State::Lists={dir}/lists"),
            "-o".to_owned(),
            format!("Dir::Cache={dir}/cache"),
        ]);
        command
    }

    /// The kernel image of `kernel`'s package, downloaded and unpacked once.
    fn kernel_image(&self, kernel: &Kernel) -> anyhow::Result<PathBuf> {
        let package = self.newest(kernel)?;
        self.vmlinuz_of(&package, 0)?
            .with_context(|| format!("{package} and what it depends on hold no vmlinuz"))
    }

    /// The `vmlinuz` a package holds, or one its kernel dependencies hold
    /// (sid splits the image into linux-binary-*).
    fn vmlinuz_of(&self, package: &str, depth: usize) -> anyhow::Result<Option<PathBuf>> {
        let unpacked = self.dir.join("unpacked").join(package);
        if !unpacked.is_dir() {
            let debs = self.dir.join("debs");
            fs::create_dir_all(&debs)?;
            run(self
                .command("apt-get")
                .args(["download", "-q", package])
                .current_dir(&debs))?;
            let deb = fs::read_dir(&debs)?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .find(|path| {
                    path.file_name().is_some_and(|name| {
                        name.to_string_lossy().starts_with(&format!("{package}_"))
                    })
                })
                .with_context(|| format!("no .deb of {package} downloaded"))?;
            fs::create_dir_all(&unpacked)?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        }
        if let Some(found) = find_vmlinuz(&unpacked)? {
            return Ok(Some(found));
        }
        if depth >= 2 {
            return Ok(None);
        }
        for dependency in self.depends(package)? {
            if (dependency.starts_with("linux-binary-") || dependency.starts_with("linux-image-"))
                && let Some(found) = self.vmlinuz_of(&dependency, depth + 1)?
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// What a package depends on, by name.
    fn depends(&self, package: &str) -> anyhow::Result<Vec<String>> {
        let output = self
            .command("apt-cache")
            .args(["depends", package])
            .output()
            .context("apt-cache depends")?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                line.trim()
                    .trim_start_matches('|')
                    .strip_prefix("Depends: ")
            })
            .map(|name| name.trim().to_owned())
            .collect())
    }

    /// The versioned package the meta-package's newest version in the
    /// suite (any of its pockets) points to.
    fn newest(&self, kernel: &Kernel) -> anyhow::Result<String> {
        let madison = self
            .command("apt-cache")
            .args(["madison", kernel.package])
            .output()
            .context("apt-cache madison")?;
        // "pkg | version | url suite/main amd64 Packages", newest first.
        let madison = String::from_utf8_lossy(&madison.stdout);
        let version = madison
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('|').map(str::trim).collect();
                let pocket = fields.get(2)?.split_whitespace().nth(1)?;
                let suite = pocket.split('/').next()?;
                (suite == kernel.suite || suite.starts_with(&format!("{}-", kernel.suite)))
                    .then(|| fields[1].to_owned())
            })
            .next()
            .with_context(|| format!("no {} in {}", kernel.package, kernel.suite))?;
        self.depends(&format!("{}={version}", kernel.package))?
            .into_iter()
            .find(|name| name.starts_with("linux-image-") && name != kernel.package)
            .with_context(|| format!("{} {version} depends on no kernel", kernel.package))
    }
}

/// The kernel image below an unpacked package: `boot/vmlinuz-*`, or
/// `usr/lib/modules/*/vmlinuz` where newer packages put it.
fn find_vmlinuz(unpacked: &Path) -> anyhow::Result<Option<PathBuf>> {
    let entries = |dir: PathBuf| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let in_boot = entries(unpacked.join("boot")).into_iter().find(|path| {
        path.file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
    });
    let in_modules = || {
        entries(unpacked.join("usr/lib/modules"))
            .into_iter()
            .map(|dir| dir.join("vmlinuz"))
            .find(|path| path.is_file())
    };
    Ok(in_boot.or_else(in_modules))
}

/// Boots a guest and returns its console output.
fn boot(vmlinuz: &Path, initramfs: &Path) -> anyhow::Result<String> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args([
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut stdout = child.stdout.take().context("qemu's output")?;
    let reader = std::thread::spawn(move || {
        let mut output = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut output);
        output
    });
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.wait();
    let output = reader.join().unwrap_or_default();
    Ok(String::from_utf8_lossy(&output).replace('\r', ""))
}

/// What a guest printed.
#[derive(Debug, Default)]
struct Report {
    uname: Option<String>,
    ready: bool,
    sent: BTreeMap<String, u64>,
    metrics: String,
    agent_log: String,
}

impl Report {
    fn read(output: &str) -> Self {
        let mut report = Report::default();
        let mut section: Option<&str> = None;
        for line in output.lines() {
            // The console's escape sequences may come before a marker.
            if let Some(at) = line.find(MARKER) {
                let rest = line[at + MARKER.len()..].trim();
                let (word, value) = rest.split_once(' ').unwrap_or((rest, ""));
                match word {
                    "uname" => report.uname = Some(value.to_owned()),
                    "agent-ready" => report.ready = true,
                    "sent" => {
                        if let Some((series, count)) = value.rsplit_once(' ')
                            && let Ok(count) = count.parse()
                        {
                            report.sent.insert(series.to_owned(), count);
                        }
                    }
                    "metrics-begin" => section = Some("metrics"),
                    "agent-log-begin" => section = Some("log"),
                    "metrics-end" | "agent-log-end" => section = None,
                    _ => {}
                }
                continue;
            }
            match section {
                Some("metrics") => {
                    report.metrics.push_str(line);
                    report.metrics.push('\n');
                }
                Some("log") => {
                    report.agent_log.push_str(line);
                    report.agent_log.push('\n');
                }
                _ => {}
            }
        }
        report
    }

    /// Prints what the guest showed; an error when it is not what `kernel`
    /// must show.
    fn judge(&self, kernel: &Kernel) -> anyhow::Result<()> {
        let uname = self.uname.as_deref().unwrap_or("(no boot)");
        println!("  kernel {uname}");
        if !self.ready {
            let refusal = self.agent_log.trim();
            println!("  agent not ready: {refusal}");
            if kernel.refused && refusal.contains("needs Linux") {
                return Ok(());
            }
            bail!("the agent did not become ready: {refusal}");
        }
        if kernel.refused {
            bail!("the agent started on a kernel below its minimum");
        }
        println!("  programs loaded, agent ready");
        let counted = counted_by_series(&self.metrics);
        let mut exact = true;
        for (series, sent) in &self.sent {
            let got = counted.get(series).copied().unwrap_or(0);
            println!("  {series:<40} sent {sent:>4}  counted {got:>4}");
            exact &= got == *sent;
        }
        for (series, got) in &counted {
            if !self.sent.contains_key(series) {
                println!("  {series:<40} sent    0  counted {got:>4}");
                exact = false;
            }
        }
        let requests: u64 = self.sent.values().sum();
        if let Some(nanoseconds) = bpf_run_time_ns(&self.metrics) {
            println!(
                "  BPF run time {:.1} µs per request (TCG: not comparable across kernels or with hardware)",
                nanoseconds / requests.max(1) as f64 / 1e3
            );
        }
        if !exact {
            bail!("counts differ from the requests answered");
        }
        if self.sent.is_empty() {
            bail!("no traffic was sent");
        }
        Ok(())
    }
}

/// Requests counted by "METHOD path status": the duration histogram's
/// counts (`flask_http_request_total` has no path, as in
/// prometheus-flask-exporter).
fn counted_by_series(metrics: &str) -> BTreeMap<String, u64> {
    let mut counted = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("flask_http_request_duration_seconds_count{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split("\",")
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|value| value.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let key = format!("{} {} {}", label("method"), label("path"), label("status"));
        *counted.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0) as u64;
    }
    counted
}

/// The agent's own programs' run time, when it exports it.
fn bpf_run_time_ns(metrics: &str) -> Option<f64> {
    let total: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("flask_ebpf_exporter_bpf_program_run_seconds_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    (total > 0.0).then_some(total * 1e9)
}
