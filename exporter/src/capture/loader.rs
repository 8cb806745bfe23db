//! Loading the kernel programs: the embedded objects, the settings and
//! maps they start with, the servers already running, and the tracepoints
//! each program attaches to.

use std::collections::{HashMap, HashSet};

use aya::{Ebpf, maps::Array, programs::TracePoint};
use exporter_common::{CaptureConfig, MAX_CAPTURE_BYTES, PID_LIMIT, SocketOffsets};
use tracing::{debug, info, warn};

use super::socket_offsets;

/// The compiled kernel programs, built by build.rs.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/exporter-ebpf"));

/// Programs that do nothing on the same hooks (exporter-ebpf/src/floor.rs):
/// the overhead benchmark's floor, what attaching anything there costs.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));

/// Each program, the tracepoint category, and the tracepoints it is
/// attached to: syscalls, then the TCP handshake's end (for the accept
/// queue's wait).
pub const ATTACHMENTS: &[(&str, &str, &[&str])] = &[
    (
        "accept_exit",
        "syscalls",
        &["sys_exit_accept", "sys_exit_accept4"],
    ),
    (
        "read_exit_flat",
        "syscalls",
        &["sys_exit_read", "sys_exit_recvfrom"],
    ),
    ("read_exit_iovec", "syscalls", &["sys_exit_readv"]),
    ("read_exit_msghdr", "syscalls", &["sys_exit_recvmsg"]),
    (
        "write_exit_flat",
        "syscalls",
        &["sys_exit_write", "sys_exit_sendto"],
    ),
    ("write_exit_iovec", "syscalls", &["sys_exit_writev"]),
    ("write_exit_msghdr", "syscalls", &["sys_exit_sendmsg"]),
    ("sendfile_exit", "syscalls", &["sys_exit_sendfile64"]),
    ("close_enter", "syscalls", &["sys_enter_close"]),
    ("tcp_state_change", "sock", &["inet_sock_set_state"]),
    ("process_exit", "sched", &["sched_process_exit"]),
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Refused although [`preflight::check`] found every capability held and
    /// both system calls reaching the kernel.
    #[error(
        "the kernel refused to load the BPF programs although the capabilities are held \
         (an LSM such as SELinux or AppArmor, or kernel lockdown, may forbid it): {0}"
    )]
    NotPermitted(String),
    #[error("could not load the BPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("BPF object lacks {0}")]
    Missing(&'static str),
    #[error("--capture-bytes must be between 1 and {MAX_CAPTURE_BYTES}")]
    CaptureBytes,
    #[error("could not start a thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Clone, Copy, Debug)]
pub struct CaptureOptions {
    /// Bytes copied from the start of each buffer.
    pub capture_bytes: u32,
    /// Ring buffer size; a power of two, a multiple of the page size.
    pub ring_buffer_bytes: u32,
    /// Entries of the kernel's connection map.
    pub kernel_connections: u32,
    /// Entries of the kernel's handshake map.
    pub kernel_handshakes: u32,
}

/// Tells the kernel side its settings, and to ignore the agent itself.
pub(super) fn configure(ebpf: &mut Ebpf, options: CaptureOptions) -> Result<(), CaptureError> {
    let mut config: Array<_, CaptureConfig> =
        Array::try_from(map_mut(ebpf, "CONFIG")?).map_err(map_error("CONFIG"))?;
    let sockets = socket_offsets::socket_offsets().unwrap_or_else(|error| {
        warn!(
            %error,
            "accepted connections' sockets cannot be found: no queue time \
             (flask_http_request_queue_seconds phase=\"accept_queue\") is measured"
        );
        SocketOffsets::default()
    });
    let settings = CaptureConfig {
        self_tgid: std::process::id(),
        capture_bytes: options.capture_bytes,
        wakeup_bytes: u64::from(options.ring_buffer_bytes / 4),
        sockets,
        ..CaptureConfig::default()
    };
    config.set(0, settings, 0).map_err(map_error("CONFIG"))
}

/// Marks the processes that already hold a listening socket as servers, so
/// connections they accepted before the agent started are picked up at
/// their next request. Before the programs are attached, so no kernel
/// write races these; returns the pids marked.
pub(super) fn seed_servers(ebpf: &mut Ebpf) -> Result<HashSet<u32>, CaptureError> {
    let mut server_pids: Array<_, u64> =
        Array::try_from(map_mut(ebpf, "SERVER_PIDS")?).map_err(map_error("SERVER_PIDS"))?;
    let self_tgid = std::process::id();
    let seeded: HashSet<u32> = crate::procfs::sockets::listening_processes()
        .into_iter()
        .filter(|&tgid| tgid != self_tgid && tgid < PID_LIMIT)
        .collect();
    let mut words: HashMap<u32, u64> = HashMap::new();
    for tgid in &seeded {
        *words.entry(tgid / 64).or_default() |= 1 << (tgid % 64);
    }
    for (index, word) in words {
        if let Err(error) = server_pids.set(index, word, 0) {
            warn!(%error, "could not seed server processes");
        }
    }
    info!(
        processes = seeded.len(),
        "seeded processes that hold listening TCP sockets"
    );
    Ok(seeded)
}

/// Loads every program and attaches it to its tracepoints.
pub(super) fn attach(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    for &(name, category, tracepoints) in ATTACHMENTS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(CaptureError::Missing(name))?
            .try_into()
            .map_err(|source| CaptureError::Program { name, source })?;
        program
            .load()
            .map_err(|source| permission_or(name, source))?;
        for tracepoint in tracepoints {
            program
                .attach(category, tracepoint)
                .map_err(|source| permission_or(name, source))?;
        }
    }
    Ok(())
}

pub(super) fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, CaptureError> {
    ebpf.map_mut(name).ok_or(CaptureError::Missing(name))
}

pub(super) fn take_map(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::Missing(name))
}

pub(super) fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

pub(super) fn permission_or(
    name: &'static str,
    source: aya::programs::ProgramError,
) -> CaptureError {
    if permission_denied(&source) {
        CaptureError::NotPermitted(format!("{name}: {source}"))
    } else {
        CaptureError::Program { name, source }
    }
}

/// Whether a syscall somewhere in the error's chain failed with EPERM or
/// EACCES (aya keeps the `io::Error` as each error's source).
pub(super) fn permission_denied(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io_error) = error.downcast_ref::<std::io::Error>()
            && io_error.kind() == std::io::ErrorKind::PermissionDenied
        {
            return true;
        }
        current = error.source();
    }
    false
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK; newer ones to the cgroup,
/// where failing to raise the limit is harmless.
pub(super) fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; fine on kernels that charge BPF memory to cgroups"
        );
    }
}
