//! What the host and the agent's container must grant before the kernel
//! programs load: capabilities, the host's PID namespace, tracefs, BTF, and
//! a seccomp profile that lets `bpf` and `perf_event_open` through. Each
//! piece that is missing becomes one sentence saying what it is for and how
//! to grant it, so that a DaemonSet that cannot start says why in its log.

use std::{fmt, path::Path};

use caps::{CapSet, Capability};

/// Where tracepoints live when tracefs is mounted (either place works).
pub const TRACEFS_SYSCALLS: [&str; 2] = [
    "/sys/kernel/tracing/events/syscalls",
    "/sys/kernel/debug/tracing/events/syscalls",
];

/// The kernel's own type information, which `bpf_get_current_task_btf` and
/// `bpf_task_pt_regs` need.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`), fixed
/// since Linux 3.8.
const HOST_PID_NAMESPACE: &str = "pid:[4026531836]";

/// The capabilities the agent needs, what each is for, and the name a pod
/// spec's `capabilities.add` gives it.
pub const REQUIRED: [(Capability, &str, &str); 4] = [
    (
        Capability::CAP_BPF,
        "BPF",
        "load the kernel programs and create their maps",
    ),
    (
        Capability::CAP_PERFMON,
        "PERFMON",
        "attach them to tracepoints and read syscall buffers",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "SYS_PTRACE",
        "read other processes' /proc/<pid>/fd and /proc/<pid>/root",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "DAC_READ_SEARCH",
        "read /proc entries and files of processes owned by other users",
    ),
];

/// One thing the agent lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Capabilities not in the effective set (nor raisable from the
    /// permitted one), by their pod-spec names.
    Capabilities(Vec<&'static str>),
    /// The agent sees another PID namespace than the host's: the kernel
    /// reports host pids, which it then cannot look up in /proc.
    HostPidNamespace { seen: String },
    /// No tracefs with syscall tracepoints.
    Tracefs,
    /// tracefs is mounted but its tracepoints cannot be read.
    TracefsUnreadable,
    /// No BTF for the running kernel.
    KernelBtf,
    /// A kernel older than [`MINIMUM_KERNEL`]: `release` as it names
    /// itself.
    KernelTooOld { release: String },
    /// System calls the kernel never saw: a seccomp filter (mode 2 in
    /// /proc/self/status) answered them, although the capabilities are
    /// held. With the errno it answered.
    SeccompRefuses(Vec<(&'static str, i32)>),
    /// System calls the kernel refused although the capabilities are held
    /// and no seccomp filter is set: an LSM or lockdown.
    KernelRefuses(Vec<(&'static str, i32)>),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Capabilities(names) => {
                let why: Vec<String> = REQUIRED
                    .iter()
                    .filter(|(_, name, _)| names.contains(name))
                    .map(|(_, name, purpose)| format!("CAP_{name} to {purpose}"))
                    .collect();
                write!(
                    f,
                    "missing capabilities: {}; add {} to the container's \
                     securityContext.capabilities.add (manifests/daemonset.yaml asks for all \
                     four), or run it as root on a host",
                    why.join(", "),
                    names.join(", ")
                )
            }
            Missing::HostPidNamespace { seen } => write!(
                f,
                "not in the host's PID namespace (/proc/self/ns/pid is {seen}): the kernel \
                 reports the host's process IDs, which this /proc does not show; set \
                 hostPID: true in the pod spec (or run with --pid host)"
            ),
            Missing::Tracefs => write!(
                f,
                "tracefs is not mounted (no syscall tracepoints under /sys/kernel/tracing or \
                 /sys/kernel/debug/tracing): on a host, mount it with \
                 `mount -t tracefs tracefs /sys/kernel/tracing`; in a container, mount the \
                 node's /sys/kernel/tracing at the same path (a hostPath volume, read-only)"
            ),
            Missing::TracefsUnreadable => write!(
                f,
                "tracefs is mounted but its syscall tracepoints cannot be read: grant \
                 CAP_DAC_READ_SEARCH, or run as root"
            ),
            Missing::KernelBtf => write!(
                f,
                "the kernel has no BTF ({KERNEL_BTF} is missing): the programs read a \
                 syscall's arguments from the task's registers at its exit, which needs a \
                 kernel built with CONFIG_DEBUG_INFO_BTF (Linux 5.15 or later; distribution \
                 kernels have it)"
            ),
            Missing::KernelTooOld { release } => write!(
                f,
                "this kernel is Linux {release}, and the agent needs Linux {}.{} or newer",
                MINIMUM_KERNEL.0, MINIMUM_KERNEL.1
            ),
            Missing::SeccompRefuses(calls) => write!(
                f,
                "a seccomp profile refuses the {} although the capabilities needed are held: \
                 set the container's securityContext.seccompProfile to one that allows {} \
                 (the runtime's default does from containerd 1.6.9 and CRI-O 1.31 on; with an \
                 older runtime use type: Unconfined)",
                system_calls(calls),
                them(calls)
            ),
            Missing::KernelRefuses(calls) => write!(
                f,
                "the kernel refuses the {} although the capabilities needed are held and no \
                 seccomp filter is set: an LSM (SELinux, AppArmor) or kernel lockdown forbids {}",
                system_calls(calls),
                them(calls)
            ),
        }
    }
}

/// "bpf system call (errno 1)", or several joined by "and".
fn system_calls(calls: &[(&str, i32)]) -> String {
    let named: Vec<String> = calls
        .iter()
        .map(|(call, errno)| format!("{call} (errno {errno})"))
        .collect();
    match named.len() {
        1 => format!("{} system call", named[0]),
        _ => format!("{} system calls", named.join(" and ")),
    }
}

fn them(calls: &[(&str, i32)]) -> &'static str {
    if calls.len() == 1 { "it" } else { "them" }
}

/// Everything missing, in the order it was found; one line.
#[derive(Debug, thiserror::Error)]
pub struct NotGranted(pub Vec<Missing>);

impl fmt::Display for NotGranted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sentences: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "cannot capture: {}", sentences.join("; "))
    }
}

/// Shows that [`check`] passed: what loading the programs takes.
#[derive(Debug)]
pub struct Granted(());

/// Checks every piece; `Err` lists all that are missing. Capabilities held
/// in the permitted set only (file capabilities without the effective bit,
/// which keep the binary startable when the runtime grants fewer) are raised
/// into the effective set first. Capabilities belong to a thread and pass
/// to the threads it starts: call this before starting any.
pub fn check() -> Result<Granted, NotGranted> {
    // Below the minimum nothing else matters: one sentence says so.
    if let Some(release) = kernel_too_old() {
        return Err(NotGranted(vec![Missing::KernelTooOld { release }]));
    }
    let mut missing = Vec::new();
    let lacking = raise_capabilities();
    if !lacking.is_empty() {
        missing.push(Missing::Capabilities(lacking.clone()));
    }
    if let Some(seen) = foreign_pid_namespace() {
        missing.push(Missing::HostPidNamespace { seen });
    }
    match tracefs() {
        Tracefs::Available => {}
        // Said already, with the capability that reads it.
        Tracefs::Inaccessible if lacking.contains(&"DAC_READ_SEARCH") => {}
        Tracefs::Inaccessible => missing.push(Missing::TracefsUnreadable),
        Tracefs::Missing => missing.push(Missing::Tracefs),
    }
    if !Path::new(KERNEL_BTF).exists() {
        missing.push(Missing::KernelBtf);
    }
    let refused: Vec<(&'static str, i32)> = [
        ("bpf", "BPF", probe_bpf as fn() -> Probe),
        ("perf_event_open", "PERFMON", probe_perf_event_open),
    ]
    .into_iter()
    .filter(|(_, needs, _)| !lacking.contains(needs))
    .filter_map(|(call, _, probe)| match probe() {
        Probe::Refused(errno) => Some((call, errno)),
        Probe::Reached => None,
    })
    .collect();
    if !refused.is_empty() {
        missing.push(match seccomp_filtered() {
            true => Missing::SeccompRefuses(refused),
            false => Missing::KernelRefuses(refused),
        });
    }
    match missing.is_empty() {
        true => Ok(Granted(())),
        false => Err(NotGranted(missing)),
    }
}

/// The oldest kernel the programs load on: they read a syscall's arguments
/// from the task's registers at its exit (`bpf_task_pt_regs`, Linux 5.15).
pub const MINIMUM_KERNEL: (u8, u8) = (5, 15);

/// The running kernel's release, when it is older than [`MINIMUM_KERNEL`].
fn kernel_too_old() -> Option<String> {
    let version = procfs::KernelVersion::current().ok()?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    ((version.major, version.minor) < MINIMUM_KERNEL).then(|| release.trim().to_owned())
}

/// Raises each required capability found in the permitted set; returns the
/// pod-spec names of those still not effective. CAP_SYS_ADMIN stands in for
/// CAP_BPF and CAP_PERFMON, as the kernel lets it.
fn raise_capabilities() -> Vec<&'static str> {
    let has = |set, cap| caps::has_cap(None, set, cap).unwrap_or(false);
    let admin = has(CapSet::Effective, Capability::CAP_SYS_ADMIN);
    REQUIRED
        .iter()
        .filter(|(cap, _, _)| {
            let implied = admin && matches!(cap, Capability::CAP_BPF | Capability::CAP_PERFMON);
            if implied || has(CapSet::Effective, *cap) {
                return false;
            }
            !(has(CapSet::Permitted, *cap) && caps::raise(None, CapSet::Effective, *cap).is_ok())
        })
        .map(|(_, name, _)| *name)
        .collect()
}

/// The PID namespace this process sees, when it is not the host's.
fn foreign_pid_namespace() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let seen = link.to_string_lossy().into_owned();
    (seen != HOST_PID_NAMESPACE).then_some(seen)
}

/// Whether syscall tracepoints can be attached to.
#[derive(Debug, PartialEq, Eq)]
pub enum Tracefs {
    Available,
    /// Mounted, but this process may not read it.
    Inaccessible,
    Missing,
}

pub fn tracefs() -> Tracefs {
    if TRACEFS_SYSCALLS.iter().any(|dir| Path::new(dir).is_dir()) {
        return Tracefs::Available;
    }
    if crate::procfs::is_mounted("tracefs") {
        Tracefs::Inaccessible
    } else {
        Tracefs::Missing
    }
}

/// Whether a seccomp filter is set on this process (`Seccomp: 2`).
fn seccomp_filtered() -> bool {
    procfs::process::Process::myself()
        .and_then(|me| me.status())
        .map(|status| status.seccomp == Some(2))
        .unwrap_or(false)
}

/// What the kernel answered a system call made only to see whether it
/// reaches the kernel.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Reached,
    Refused(i32),
}

/// Calls `syscall` with arguments the kernel rejects once it looks at them:
/// `reached` is the errno that shows it did.
fn probe(call: impl FnOnce() -> libc::c_long, reached: i32) -> Probe {
    let result = call();
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if result >= 0 || errno == reached {
        return Probe::Reached;
    }
    match errno {
        libc::EPERM | libc::EACCES | libc::ENOSYS => Probe::Refused(errno),
        // Anything else came from the kernel's own checks.
        _ => Probe::Reached,
    }
}

/// `bpf` with a command no kernel has: EINVAL once the kernel reads it.
fn probe_bpf() -> Probe {
    // SAFETY: no pointer is passed (size 0), and an unknown command changes
    // nothing.
    probe(
        || unsafe { libc::syscall(libc::SYS_bpf, -1, std::ptr::null::<u8>(), 0) },
        libc::EINVAL,
    )
}

/// `perf_event_open` with no attributes: EFAULT once the kernel reads them.
fn probe_perf_event_open() -> Probe {
    // SAFETY: a null attribute pointer is read by the kernel, which answers
    // EFAULT; nothing is opened.
    probe(
        || unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                std::ptr::null::<u8>(),
                0,
                -1,
                -1,
                0,
            )
        },
        libc::EFAULT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_missing_piece_says_how_to_grant_it() {
        let all = NotGranted(vec![
            Missing::Capabilities(vec!["BPF", "SYS_PTRACE"]),
            Missing::HostPidNamespace {
                seen: "pid:[4026532200]".to_owned(),
            },
            Missing::Tracefs,
            Missing::SeccompRefuses(vec![("bpf", libc::EPERM), ("perf_event_open", libc::EPERM)]),
        ])
        .to_string();
        assert!(!all.contains('\n'), "one line: {all}");
        for wanted in [
            "CAP_BPF to load the kernel programs",
            "CAP_SYS_PTRACE to read other processes'",
            "add BPF, SYS_PTRACE to the container's securityContext.capabilities.add",
            "hostPID: true",
            "pid:[4026532200]",
            "a hostPath volume",
            "mount -t tracefs tracefs /sys/kernel/tracing",
            "a seccomp profile refuses the bpf (errno 1) and perf_event_open (errno 1) system calls",
            "securityContext.seccompProfile",
        ] {
            assert!(all.contains(wanted), "{wanted:?} not in {all}");
        }
        assert!(!all.contains("CAP_PERFMON"), "{all}");
    }

    /// Below the minimum, one sentence names the kernel found and the one
    /// needed; this host's kernel is not refused.
    #[test]
    fn an_old_kernel_is_refused_in_one_sentence() {
        let refused = NotGranted(vec![Missing::KernelTooOld {
            release: "5.10.0-32-cloud-amd64".to_owned(),
        }])
        .to_string();
        assert_eq!(
            refused,
            "cannot capture: this kernel is Linux 5.10.0-32-cloud-amd64, and the agent needs \
             Linux 5.15 or newer"
        );
        assert_eq!(
            kernel_too_old(),
            None,
            "the tests' own kernel is new enough"
        );
    }

    /// Tests run as root on a host: every piece is granted, and each probe
    /// reaches the kernel.
    #[test]
    fn root_on_the_host_is_granted_everything() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        assert_eq!(probe_bpf(), Probe::Reached);
        assert_eq!(probe_perf_event_open(), Probe::Reached);
        assert_eq!(foreign_pid_namespace(), None);
    }
}
