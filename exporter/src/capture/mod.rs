//! Loads the kernel programs, attaches them to syscall tracepoints, seeds the
//! set of server processes, and reads events from the BPF ring buffer.

mod program_stats;
mod server_scans;
mod socket_offsets;

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsRawFd,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, ring_buf::RingBufItem},
    programs::TracePoint,
};
use exporter_common::{
    CONTROL_FD, CONTROL_FORGET_SERVER, CONTROL_IGNORE_CONNECTION, CONTROL_MARK_SERVER,
    CONTROL_SKIP_BODY, CaptureConfig, ConnKey, ConnState, ControlRequest, EVENT_HEADER_LEN,
    EventHeader, EventKind, FILTERED_NAMES, LISTENER_CGROUP_UNMONITORED, LISTENER_IGNORED,
    ListenerState, MAP_NAMES, MAX_CAPTURE_BYTES, PID_LIMIT, SocketOffsets,
};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tracing::{debug, info, warn};

use self::program_stats::ProgramStats;
use self::server_scans::{ServerScan, ServerScanned, ServerScans};
use crate::{
    preflight::Granted,
    procfs,
    telemetry::{Budget, Budgets, counter, gauge},
};

/// What the kernel side should stop (or resume) following or copying,
/// decided from what a connection showed. Plain data: the stream stage
/// decides, this stage applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFilter {
    /// The connection's bytes in `direction` ([`DIRECTION_READ`],
    /// [`DIRECTION_WRITE`]) up to stream offset `until` are body bytes,
    /// skipped by count: the kernel need not copy or report them.
    SkipBody {
        tgid: u32,
        fd: u32,
        conn_id: u64,
        direction: u32,
        until: u32,
    },
    /// No more read and write events for this connection (its close still
    /// comes).
    IgnoreConnection {
        tgid: u32,
        fd: u32,
        conn_id: u64,
        reason: IgnoreReason,
    },
    /// The process behind this listening socket sits in a (v2) cgroup of
    /// its own container, which is not monitored (a pod selected out): its
    /// next accept there makes the kernel ignore every accept in that
    /// cgroup, whichever process makes it. Applied after the listener's
    /// [`KernelFilter::Listener`] verdict.
    IgnoreCgroup { tgid: u32, listen_fd: u32 },
    /// Whether connections accepted on this listening socket are worth
    /// following. `Some(reason)`: not (but for the few the kernel still
    /// follows, so a change is noticed).
    Listener {
        tgid: u32,
        listen_fd: u32,
        ignore: Option<IgnoreReason>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    /// Not HTTP/1.x: TLS, another protocol, or upgraded (WebSocket).
    NotHttp,
    /// Not a server this agent monitors (`--port`, `--pid`, outside any pod).
    Unmonitored,
}

impl IgnoreReason {
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::NotHttp => "not_http",
            IgnoreReason::Unmonitored => "unmonitored",
        }
    }
}

/// Listening sockets this side remembers as ignored (the kernel's own map
/// holds as many, LRU). Processes in any pod can open listeners.
const MAX_IGNORED_LISTENERS: usize = 4_096;

/// The listening sockets this side told the kernel to ignore, within a
/// budget of entries. Past it a verdict still reaches the kernel but is not
/// remembered here (counted); from then on a listener found speaking HTTP
/// is cleared in the kernel even when it is not remembered.
#[derive(Debug)]
struct IgnoredListeners {
    /// Why each is ignored, and the start time of its process (a reused
    /// pid is another process, whose listeners are judged anew).
    listeners: HashMap<ConnKey, (IgnoreReason, u64)>,
    max: usize,
    /// Some verdict went unremembered: the kernel may hold ones not here.
    unremembered: bool,
    budget: IntCounter,
}

impl IgnoredListeners {
    fn new(max: usize, budget: IntCounter) -> Self {
        IgnoredListeners {
            listeners: HashMap::new(),
            max,
            unremembered: false,
            budget,
        }
    }

    /// Remembers a listener told to be ignored, and why, for the process
    /// started at `process_start`; whether it is new here.
    fn remember(&mut self, listener: ConnKey, reason: IgnoreReason, process_start: u64) -> bool {
        if let Some(known) = self.listeners.get_mut(&listener) {
            *known = (reason, process_start);
            return false;
        }
        if self.listeners.len() >= self.max {
            self.unremembered = true;
            self.budget.inc();
            return false;
        }
        self.listeners
            .insert(listener, (reason, process_start))
            .is_none()
    }

    /// Why the listener is remembered as ignored.
    fn reason_of(&self, listener: &ConnKey) -> Option<IgnoreReason> {
        self.listeners.get(listener).map(|&(reason, _)| reason)
    }

    /// Forgets the listeners ignored for `reason`; returns them.
    fn forget_ignored_for(&mut self, reason: IgnoreReason) -> Vec<ConnKey> {
        self.forget_where(|_, why, _| why == reason)
    }

    /// Forgets the listeners `pick` names; returns them.
    fn forget_where(&mut self, pick: impl Fn(&ConnKey, IgnoreReason, u64) -> bool) -> Vec<ConnKey> {
        self.listeners
            .extract_if(|listener, &mut (why, start)| pick(listener, why, start))
            .map(|(listener, _)| listener)
            .collect()
    }

    /// Forgets a listener found speaking HTTP: (whether it was remembered,
    /// whether the kernel may hold a verdict for it).
    fn forget(&mut self, listener: &ConnKey) -> (bool, bool) {
        let remembered = self.listeners.remove(listener).is_some();
        (remembered, remembered || self.unremembered)
    }

    /// The listening fds of `tgid` told to be ignored.
    fn fds_of(&self, tgid: u32) -> impl Iterator<Item = u32> + '_ {
        self.listeners
            .keys()
            .filter(move |listener| listener.tgid == tgid)
            .map(|listener| listener.fd)
    }

    /// Forgets the listeners of processes that exited, or whose pid names
    /// another process now (`runs`: whether a pid still names the process
    /// started then); returns them.
    fn forget_exited(&mut self, runs: &dyn Fn(u32, u64) -> bool) -> Vec<ConnKey> {
        self.forget_where(|listener, _, start| !runs(listener.tgid, start))
    }

    fn len(&self) -> usize {
        self.listeners.len()
    }
}

/// Server processes this side remembers, at most. Pods can start processes.
const MAX_SERVER_PROCESSES: usize = 65_536;

/// The pids this side marked, or saw the kernel mark, as servers, so that
/// their bits are cleared when they exit; within a budget of entries. Past
/// it a pid is not remembered (counted): if it exits, its bit stays set, so
/// the kernel looks a little further into whatever process reuses the pid.
/// That costs time, never an exchange.
#[derive(Debug)]
struct ServerProcesses {
    pids: HashSet<u32>,
    max: usize,
    budget: IntCounter,
}

impl ServerProcesses {
    fn new(max: usize, budget: IntCounter) -> Self {
        ServerProcesses {
            pids: HashSet::new(),
            max,
            budget,
        }
    }

    fn remember(&mut self, tgid: u32) {
        if self.pids.contains(&tgid) {
            return;
        }
        if self.pids.len() >= self.max {
            self.budget.inc();
            return;
        }
        self.pids.insert(tgid);
    }

    fn forget(&mut self, tgid: u32) {
        self.pids.remove(&tgid);
    }

    /// Forgets the pids of processes that exited; returns them.
    fn forget_exited(&mut self, alive: &dyn Fn(u32) -> bool) -> Vec<u32> {
        self.pids.extract_if(|&tgid| !alive(tgid)).collect()
    }

    fn len(&self) -> usize {
        self.pids.len()
    }
}

/// The compiled kernel programs, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/exporter-ebpf"));

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

/// One event as read from the ring buffer.
#[derive(Clone, Copy, Debug)]
pub struct RawEvent<'a> {
    pub kind: EventKind,
    pub header: EventHeader,
    /// The copied prefix of the syscall's buffer.
    pub data: &'a [u8],
}

impl RawEvent<'_> {
    /// The listening fd the connection was accepted on, when this is its
    /// first event and the kernel saw the accept.
    pub fn accepted_on(&self) -> Option<u32> {
        match self.kind {
            EventKind::Read | EventKind::Write if self.header.aux > 0 => Some(self.header.aux - 1),
            _ => None,
        }
    }

    /// The local port of the connection's socket, when the kernel read it.
    pub fn local_port(&self) -> Option<u16> {
        u16::try_from(self.header.local_port)
            .ok()
            .filter(|&port| port != 0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("event claims {claimed} captured bytes but carries {carried}")]
    Length { claimed: u32, carried: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
}

/// Reads an event the kernel wrote: a header, then the copied bytes.
pub fn decode_event(bytes: &[u8]) -> Result<RawEvent<'_>, DecodeError> {
    if bytes.len() < EVENT_HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked; EventHeader is plain old data; unaligned read.
    let header: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let carried = bytes.len() - EVENT_HEADER_LEN;
    let captured = header.captured_len as usize;
    if captured > carried {
        return Err(DecodeError::Length {
            claimed: header.captured_len,
            carried,
        });
    }
    let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::Kind(header.kind))?;
    Ok(RawEvent {
        kind,
        header,
        data: &bytes[EVENT_HEADER_LEN..EVENT_HEADER_LEN + captured],
    })
}

/// What the capture stage counts. The stage owns these counters: `/metrics`
/// reads them as they are.
#[derive(Clone, Debug)]
pub struct CaptureCounters {
    pub events_read: IntCounter,
    /// Bytes of those events: what the kernel copied for userspace.
    pub event_bytes_read: IntCounter,
    /// Mirrors the kernel's own count (the `LOST_EVENTS` map).
    pub events_lost: IntCounter,
    pub events_malformed: IntCounter,
    /// Mirror the kernel's counts of failed map inserts, by map
    /// ([`MAP_NAMES`] order).
    pub map_insert_failures: Vec<IntCounter>,
    /// Mirror the kernel's counts of connections it stopped following, by
    /// how ([`FILTERED_NAMES`] order).
    pub connections_ignored: Vec<IntCounter>,
    /// Listening sockets whose connections the kernel does not follow.
    pub listeners_ignored: IntGauge,
    /// Listener verdicts past what this side remembers.
    pub ignored_listeners_budget: IntCounter,
    /// Processes found with nothing to follow: the kernel no longer looks
    /// past their pid.
    pub processes_ignored: IntCounter,
    /// Processes the kernel side treats as servers.
    pub server_processes: IntGauge,
    /// Server processes past what this side remembers.
    pub server_processes_budget: IntCounter,
    /// The kernel programs' runs and run time.
    programs: ProgramStats,
}

impl CaptureCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        let failures = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_kernel_map_insert_failures_total",
                "Inserts into the kernel side's maps that failed, by map: what they would have followed is not seen",
            ),
            &["map"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        let ignored = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_connections_ignored_total",
                "Connections the kernel side stopped following, by how: at accept, because their listener is not HTTP or not monitored (listener) or their container's cgroup is not monitored (cgroup), or once the connection showed it (connection)",
            ),
            &["by"],
        )?;
        registry.register(Box::new(ignored.clone()))?;
        Ok(CaptureCounters {
            ignored_listeners_budget: budgets.counter(Budget::IgnoredListeners),
            server_processes_budget: budgets.counter(Budget::ServerProcesses),
            server_processes: gauge(
                registry,
                "flask_ebpf_exporter_server_processes",
                "Processes the kernel side looks at past its first check: those that held a listening socket when the agent started or accepted a followed connection since, until they exit or are found to serve nothing to follow",
            )?,
            processes_ignored: counter(
                registry,
                "flask_ebpf_exporter_processes_ignored_total",
                "Times a process was found with nothing to follow (each listening socket it holds is not HTTP, not monitored, or holds no connection): the kernel then stops at its pid, until one of its connections is followed again",
            )?,
            connections_ignored: FILTERED_NAMES
                .iter()
                .map(|name| ignored.with_label_values(&[*name]))
                .collect(),
            listeners_ignored: gauge(
                registry,
                "flask_ebpf_exporter_listeners_ignored",
                "Listening sockets whose connections are not followed (not HTTP, or not monitored); one in 64 of their connections still is, so that a change is noticed",
            )?,
            map_insert_failures: MAP_NAMES
                .iter()
                .map(|name| failures.with_label_values(&[*name]))
                .collect(),
            events_read: counter(
                registry,
                "flask_ebpf_exporter_events_read_total",
                "Events read from the BPF ring buffer",
            )?,
            event_bytes_read: counter(
                registry,
                "flask_ebpf_exporter_event_bytes_read_total",
                "Bytes of the events read from the BPF ring buffer (headers and copied payload)",
            )?,
            events_lost: counter(
                registry,
                "flask_ebpf_exporter_events_lost_total",
                "Events the kernel dropped because the ring buffer was full",
            )?,
            events_malformed: counter(
                registry,
                "flask_ebpf_exporter_events_malformed_total",
                "Ring buffer records that did not decode as events",
            )?,
            programs: ProgramStats::register(registry)?,
        })
    }
}

/// Attached programs and the maps userspace reads.
pub struct Capture {
    // Dropping `Ebpf` detaches the programs; keep it alive.
    _ebpf: Ebpf,
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    map_insert_failures: PerCpuArray<MapData, u64>,
    filtered: PerCpuArray<MapData, u64>,
    listeners: BpfHashMap<MapData, ConnKey, ListenerState>,
    connections: BpfHashMap<MapData, ConnKey, ConnState>,
    unmonitored_cgroups: BpfHashMap<MapData, u64, u32>,
    ignored_listeners: IgnoredListeners,
    /// Looks at a process's sockets once one of its listeners is ignored.
    server_scans: ServerScans,
    /// Pids the kernel may hold as servers (seeded, or seen accepting).
    servers: ServerProcesses,
    counters: CaptureCounters,
    malformed_logged: bool,
}

/// A record still in the ring buffer; it is released when dropped.
pub struct EventItem<'a> {
    item: RingBufItem<'a>,
    /// `None`: the record did not decode (counted when read).
    decoded: Option<(EventKind, EventHeader)>,
}

impl EventItem<'_> {
    /// The event, if the record decoded as one.
    pub fn event(&self) -> Option<RawEvent<'_>> {
        let (kind, header) = self.decoded?;
        let end = EVENT_HEADER_LEN + header.captured_len as usize;
        Some(RawEvent {
            kind,
            header,
            data: self.item.get(EVENT_HEADER_LEN..end)?,
        })
    }
}

impl Capture {
    /// Loads and attaches the programs; `_granted` shows that the host and
    /// the container grant what that needs.
    pub fn load(
        _granted: &Granted,
        options: CaptureOptions,
        counters: CaptureCounters,
    ) -> Result<Self, CaptureError> {
        if options.capture_bytes == 0 || options.capture_bytes as usize > MAX_CAPTURE_BYTES {
            return Err(CaptureError::CaptureBytes);
        }
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", options.ring_buffer_bytes)
            .map_max_entries("CONNS", options.kernel_connections)
            .map_max_entries("HANDSHAKES", options.kernel_handshakes)
            .load(EBPF_OBJECT)
            .map_err(|error| {
                if permission_denied(&error) {
                    CaptureError::NotPermitted(error.to_string())
                } else {
                    CaptureError::Load(error)
                }
            })?;
        configure(&mut ebpf, options)?;
        let mut servers = ServerProcesses::new(
            MAX_SERVER_PROCESSES,
            counters.server_processes_budget.clone(),
        );
        for tgid in seed_servers(&mut ebpf)? {
            servers.remember(tgid);
        }
        counters.server_processes.set(servers.len() as i64);
        attach(&mut ebpf)?;
        let events =
            RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?).map_err(map_error("EVENTS"))?;
        let lost = PerCpuArray::try_from(take_map(&mut ebpf, "LOST_EVENTS")?)
            .map_err(map_error("LOST_EVENTS"))?;
        let map_insert_failures =
            PerCpuArray::try_from(take_map(&mut ebpf, "MAP_INSERT_FAILURES")?)
                .map_err(map_error("MAP_INSERT_FAILURES"))?;
        let filtered = PerCpuArray::try_from(take_map(&mut ebpf, "FILTERED")?)
            .map_err(map_error("FILTERED"))?;
        let listeners = BpfHashMap::try_from(take_map(&mut ebpf, "LISTENERS")?)
            .map_err(map_error("LISTENERS"))?;
        let connections =
            BpfHashMap::try_from(take_map(&mut ebpf, "CONNS")?).map_err(map_error("CONNS"))?;
        let unmonitored_cgroups = BpfHashMap::try_from(take_map(&mut ebpf, "UNMONITORED_CGROUPS")?)
            .map_err(map_error("UNMONITORED_CGROUPS"))?;
        info!(
            capture_bytes = options.capture_bytes,
            ring_buffer_bytes = options.ring_buffer_bytes,
            kernel_connections = options.kernel_connections,
            "BPF programs attached to syscall tracepoints"
        );
        Ok(Capture {
            _ebpf: ebpf,
            events,
            lost,
            map_insert_failures,
            filtered,
            listeners,
            connections,
            unmonitored_cgroups,
            ignored_listeners: IgnoredListeners::new(
                MAX_IGNORED_LISTENERS,
                counters.ignored_listeners_budget.clone(),
            ),
            servers,
            counters,
            server_scans: ServerScans::start(procfs::throttle::ScanThrottle::new(
                Duration::from_secs(1),
                MAX_IGNORED_LISTENERS,
            ))
            .map_err(CaptureError::Thread)?,
            malformed_logged: false,
        })
    }

    /// Whether the kernel side still follows the connection `conn_id` on
    /// (tgid, fd): `false` when its connection map no longer holds it
    /// (evicted, or closed with the close event lost). A failed lookup
    /// counts as followed: nothing is given up on a doubt.
    pub fn follows(&self, tgid: u32, fd: u32, conn_id: u64) -> bool {
        match self.connections.get(&ConnKey { tgid, fd }, 0) {
            Ok(state) => state.conn_id == conn_id,
            Err(aya::maps::MapError::KeyNotFound) => false,
            Err(error) => {
                debug!(%error, "could not look up a connection in the kernel");
                true
            }
        }
    }

    /// Tells the kernel side what to stop or resume following.
    pub fn apply(&mut self, filter: KernelFilter) {
        match filter {
            KernelFilter::IgnoreConnection {
                tgid, fd, conn_id, ..
            } => ignore_connection(tgid, fd, conn_id),
            KernelFilter::IgnoreCgroup { tgid, listen_fd } => {
                let listener = ConnKey {
                    tgid,
                    fd: listen_fd,
                };
                if self.mark_listener(listener, LISTENER_IGNORED | LISTENER_CGROUP_UNMONITORED) {
                    debug!(
                        tgid,
                        listen_fd, "the container's cgroup is ignored from its next accept"
                    );
                }
            }
            KernelFilter::SkipBody {
                tgid,
                fd,
                conn_id,
                direction,
                until,
            } => control(ControlRequest {
                op: CONTROL_SKIP_BODY,
                tgid,
                fd,
                direction,
                conn_id,
                skip_until: until,
                ..ControlRequest::default()
            }),
            KernelFilter::Listener {
                tgid,
                listen_fd,
                ignore,
            } => self.judge_listener(
                ConnKey {
                    tgid,
                    fd: listen_fd,
                },
                ignore,
            ),
        }
    }

    /// Adds `bits` to the listener's verdict in the kernel, keeping those it
    /// has (a cgroup mark survives a later connection's verdict); whether
    /// the kernel took it.
    fn mark_listener(&mut self, listener: ConnKey, bits: u32) -> bool {
        let kept = self
            .listeners
            .get(&listener, 0)
            .map_or(0, |state| state.verdict);
        let state = ListenerState {
            verdict: kept | bits,
            accepts: 0,
        };
        match self.listeners.insert(listener, state, 0) {
            Ok(()) => true,
            Err(error) => {
                warn!(%error, "could not write a listener verdict to the kernel");
                false
            }
        }
    }

    fn judge_listener(&mut self, listener: ConnKey, ignore: Option<IgnoreReason>) {
        match ignore {
            Some(reason) => {
                if !self.mark_listener(listener, LISTENER_IGNORED) {
                    return;
                }
                // Connections accepted before the verdict reach here one by
                // one: the process's sockets are looked at once.
                let judged_before = self.ignored_listeners.reason_of(&listener) == Some(reason);
                let process_start = procfs::stat(listener.tgid).map_or(0, |stat| stat.start_ticks);
                if self
                    .ignored_listeners
                    .remember(listener, reason, process_start)
                {
                    info!(
                        tgid = listener.tgid,
                        listen_fd = listener.fd,
                        reason = reason.as_str(),
                        "connections on this listening socket are no longer followed"
                    );
                }
                // Whether the process has anything left to follow is looked
                // at on another thread, and settled when it answers.
                if !judged_before {
                    let remembered = self.ignored_listeners.reason_of(&listener).is_some();
                    let scan = ServerScan {
                        listener,
                        ignored_fds: self.ignored_fds_with(listener),
                    };
                    self.server_scans.ask(scan, remembered);
                }
            }
            None => {
                let (remembered, in_kernel) = self.ignored_listeners.forget(&listener);
                if in_kernel {
                    // The server speaks HTTP there: follow every connection.
                    let _ = self.listeners.remove(&listener);
                }
                if remembered {
                    info!(
                        tgid = listener.tgid,
                        listen_fd = listener.fd,
                        "listening socket speaks HTTP: its connections are followed again"
                    );
                }
            }
        }
        self.counters
            .listeners_ignored
            .set(self.ignored_listeners.len() as i64);
    }

    /// The listening fds of `listener`'s process that are ignored, itself
    /// included (even when past the remembered budget), in order.
    fn ignored_fds_with(&self, listener: ConnKey) -> Vec<u32> {
        let mut fds: Vec<u32> = self.ignored_listeners.fds_of(listener.tgid).collect();
        fds.push(listener.fd);
        fds.sort_unstable();
        fds.dedup();
        fds
    }

    /// Settles the looks at processes that answered: a process with nothing
    /// to follow is no server to the kernel (its reads and writes stop at
    /// the first check, and its later connections on ignored listeners
    /// leave no entry). An answer about listeners whose verdicts changed
    /// since it was asked is stale and let go.
    pub fn settle_server_scans(&mut self) {
        let answered: Vec<ServerScanned> = self.server_scans.answers().collect();
        for answer in answered {
            let listener = answer.scan.listener;
            let still_ignored = self
                .listeners
                .get(&listener, 0)
                .is_ok_and(|state| state.verdict & LISTENER_IGNORED != 0);
            if !answer.nothing_to_follow
                || !still_ignored
                || self.ignored_fds_with(listener) != answer.scan.ignored_fds
            {
                continue;
            }
            let tgid = listener.tgid;
            forget_server(tgid);
            self.servers.forget(tgid);
            self.counters.processes_ignored.inc();
            debug!(
                tgid,
                "nothing this process holds is followed: the kernel stops at its pid"
            );
        }
    }

    /// Follows again every listener and cgroup ignored as not monitored,
    /// and marks the listeners' processes as servers again: what is
    /// monitored changed (a pod became selected). Each is judged anew at its next connection.
    /// Connections already ignored stay so until they close.
    pub fn follow_unmonitored_again(&mut self) {
        let cgroups: Vec<u64> = self
            .unmonitored_cgroups
            .keys()
            .filter_map(Result::ok)
            .collect();
        for cgroup in &cgroups {
            let _ = self.unmonitored_cgroups.remove(cgroup);
        }
        let listeners = self
            .ignored_listeners
            .forget_ignored_for(IgnoreReason::Unmonitored);
        for listener in &listeners {
            let _ = self.listeners.remove(listener);
            mark_server(listener.tgid);
            self.servers.remember(listener.tgid);
        }
        if !listeners.is_empty() || !cgroups.is_empty() {
            info!(
                listeners = listeners.len(),
                cgroups = cgroups.len(),
                "what is monitored changed: listening sockets and cgroups not monitored are followed again"
            );
        }
        self.counters
            .listeners_ignored
            .set(self.ignored_listeners.len() as i64);
    }

    /// Forgets the listener verdicts and server marks of processes that
    /// exited.
    /// A server's main thread exited: its listener verdicts go (a process
    /// that reuses the pid is judged anew). Its server bit stays until it
    /// is gone ([`Self::forget_exited`]).
    pub fn forget_verdicts_of(&mut self, tgid: u32) {
        for listener in self
            .ignored_listeners
            .forget_where(|listener, _, _| listener.tgid == tgid)
        {
            let _ = self.listeners.remove(&listener);
        }
        self.counters
            .listeners_ignored
            .set(self.ignored_listeners.len() as i64);
    }

    /// `alive`: whether a pid runs; `runs`: whether it still names the
    /// process started at a start time.
    pub fn forget_exited(&mut self, alive: &dyn Fn(u32) -> bool, runs: &dyn Fn(u32, u64) -> bool) {
        for listener in self.ignored_listeners.forget_exited(runs) {
            let _ = self.listeners.remove(&listener);
        }
        for tgid in self.servers.forget_exited(alive) {
            forget_server(tgid);
        }
        self.counters
            .listeners_ignored
            .set(self.ignored_listeners.len() as i64);
    }

    pub fn counters(&self) -> &CaptureCounters {
        &self.counters
    }

    /// Brings the counters the kernel keeps (events the ring buffer had no
    /// room for, failed map inserts) up to date, and says so when they grew.
    pub fn sync_kernel_counters(&self) {
        self.counters.programs.sync(&self._ebpf);
        self.counters
            .server_processes
            .set(self.servers.len() as i64);
        let lost = per_cpu_sum(&self.lost, 0);
        if mirror(&self.counters.events_lost, lost) {
            warn!(
                lost_total = lost,
                "the kernel dropped events: ring buffer full (raise --ring-buffer-bytes)"
            );
        }
        for (slot, counter) in self.counters.connections_ignored.iter().enumerate() {
            mirror(counter, per_cpu_sum(&self.filtered, slot as u32));
        }
        for (slot, (counter, map)) in self
            .counters
            .map_insert_failures
            .iter()
            .zip(MAP_NAMES)
            .enumerate()
        {
            let failures = per_cpu_sum(&self.map_insert_failures, slot as u32);
            if mirror(counter, failures) {
                warn!(
                    map,
                    failures_total = failures,
                    "inserts into a kernel map failed: some traffic is not followed"
                );
            }
        }
    }

    /// Waits up to `timeout` for events (less if the kernel forces a wakeup
    /// because the ring is filling).
    pub fn wait(&self, timeout: Duration) {
        let mut pollfd = libc::pollfd {
            fd: self.events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        if ready < 0 {
            debug!(error = %std::io::Error::last_os_error(), "poll on ring buffer");
        }
    }

    /// The next record waiting in the ring buffer; one that does not decode
    /// is counted and logged once.
    pub fn next_event(&mut self) -> Option<EventItem<'_>> {
        let item = self.events.next()?;
        self.counters.events_read.inc();
        self.counters.event_bytes_read.inc_by(item.len() as u64);
        let decoded = match decode_event(&item) {
            Ok(event) => {
                if event.accepted_on().is_some() {
                    self.servers.remember(event.header.tgid);
                }
                Some((event.kind, event.header))
            }
            Err(error) => {
                self.counters.events_malformed.inc();
                if !self.malformed_logged {
                    warn!(%error, "malformed event from the ring buffer (logged once; see flask_ebpf_exporter_events_malformed_total)");
                    self.malformed_logged = true;
                }
                None
            }
        };
        Some(EventItem { item, decoded })
    }
}

/// Tells the kernel side its settings, and to ignore the agent itself.
fn configure(ebpf: &mut Ebpf, options: CaptureOptions) -> Result<(), CaptureError> {
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
fn seed_servers(ebpf: &mut Ebpf) -> Result<HashSet<u32>, CaptureError> {
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
fn attach(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
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

/// Asks the kernel side to stop following a connection.
fn ignore_connection(tgid: u32, fd: u32, conn_id: u64) {
    control(ControlRequest {
        op: CONTROL_IGNORE_CONNECTION,
        tgid,
        fd,
        conn_id,
        ..ControlRequest::default()
    });
}

/// Asks the kernel side to stop treating `tgid` as a server.
fn forget_server(tgid: u32) {
    control(ControlRequest {
        op: CONTROL_FORGET_SERVER,
        tgid,
        ..ControlRequest::default()
    });
}

/// Asks the kernel side to treat `tgid` as a server again.
fn mark_server(tgid: u32) {
    control(ControlRequest {
        op: CONTROL_MARK_SERVER,
        tgid,
        ..ControlRequest::default()
    });
}

/// A write of `request` to [`CONTROL_FD`], which the agent's own write
/// tracepoint reads.
fn control(request: ControlRequest) {
    // SAFETY: a valid buffer of the request's size; the fd is one no
    // process can hold, so the write only returns EBADF.
    unsafe {
        libc::write(
            CONTROL_FD as i32,
            (&raw const request).cast(),
            std::mem::size_of::<ControlRequest>(),
        )
    };
}

/// Sums one slot of a per-CPU counter array (0 when unreadable, logged).
fn per_cpu_sum(array: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    match array.get(&slot, 0) {
        Ok(per_cpu) => per_cpu.iter().sum(),
        Err(error) => {
            warn!(%error, "could not read a kernel counter");
            0
        }
    }
}

/// Brings a counter up to a total the kernel keeps; whether it grew.
fn mirror(counter: &IntCounter, total: u64) -> bool {
    let counted = counter.get();
    if total <= counted {
        return false;
    }
    counter.inc_by(total - counted);
    true
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, CaptureError> {
    ebpf.map_mut(name).ok_or(CaptureError::Missing(name))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::Missing(name))
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

fn permission_or(name: &'static str, source: aya::programs::ProgramError) -> CaptureError {
    if permission_denied(&source) {
        CaptureError::NotPermitted(format!("{name}: {source}"))
    } else {
        CaptureError::Program { name, source }
    }
}

/// Whether a syscall somewhere in the error's chain failed with EPERM or
/// EACCES (aya keeps the `io::Error` as each error's source).
fn permission_denied(error: &(dyn std::error::Error + 'static)) -> bool {
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
fn raise_memlock_limit() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_listeners_stay_within_their_budget_and_still_clear() {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let budget = budgets.counter(Budget::IgnoredListeners);
        let mut ignored = IgnoredListeners::new(2, budget.clone());
        let listener = |fd| ConnKey { tgid: 100, fd };
        const START: u64 = 5;
        assert!(ignored.remember(listener(3), IgnoreReason::NotHttp, START));
        assert!(
            !ignored.remember(listener(3), IgnoreReason::NotHttp, START),
            "already remembered"
        );
        assert!(ignored.remember(listener(4), IgnoreReason::NotHttp, START));
        // Past the budget: not remembered, counted.
        assert!(!ignored.remember(listener(5), IgnoreReason::NotHttp, START));
        assert_eq!(ignored.len(), 2);
        assert_eq!(budget.get(), 1);
        // A remembered listener found speaking HTTP is cleared; so is one
        // that went unremembered, which the kernel may still hold.
        assert_eq!(ignored.forget(&listener(3)), (true, true));
        assert_eq!(ignored.forget(&listener(5)), (false, true));
        // Listeners of exited processes are let go.
        assert!(ignored.remember(listener(6), IgnoreReason::NotHttp, START));
        let gone = ignored.forget_exited(&|tgid, _| tgid != 100);
        assert_eq!(gone.len(), 2);
        assert_eq!(ignored.len(), 0);
        // So are those of a process whose pid now names another.
        assert!(ignored.remember(listener(7), IgnoreReason::NotHttp, START + 1));
        assert!(ignored.remember(listener(8), IgnoreReason::NotHttp, START));
        let runs = |tgid, start| tgid == 100 && start == START;
        assert_eq!(ignored.forget_exited(&runs), vec![listener(7)]);
        assert_eq!(ignored.len(), 1);
        // Within budget, nothing unknown is cleared in the kernel.
        let mut within = IgnoredListeners::new(2, budget);
        assert_eq!(within.forget(&listener(9)), (false, false));
    }

    #[test]
    fn server_processes_stay_within_their_budget() {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let budget = budgets.counter(Budget::ServerProcesses);
        let mut servers = ServerProcesses::new(2, budget.clone());
        servers.remember(10);
        servers.remember(10);
        servers.remember(11);
        assert_eq!(budget.get(), 0, "a pid remembered twice is one entry");
        // Past the budget: not remembered, counted.
        servers.remember(12);
        assert_eq!(servers.len(), 2);
        assert_eq!(budget.get(), 1);
        // Exited processes are let go, which makes room.
        assert_eq!(servers.forget_exited(&|tgid| tgid != 10), vec![10]);
        servers.remember(12);
        assert_eq!(servers.len(), 2);
        servers.forget(11);
        assert_eq!(servers.forget_exited(&|_| false), vec![12]);
        assert_eq!(budget.get(), 1);
    }

    fn event_bytes(header: EventHeader, data: &[u8]) -> Vec<u8> {
        [&header.to_bytes()[..], data].concat()
    }

    #[test]
    fn decodes_header_and_captured_prefix() {
        let header = EventHeader {
            kind: EventKind::Read as u32,
            tgid: 7,
            fd: 9,
            seq: 3,
            conn_id: 11,
            timestamp_ns: 13,
            byte_count: 1000,
            offset: 17,
            captured_len: 5,
            aux: 0,
            handshake_ns: 19,
            local_port: 8000,
            _pad: 0,
        };
        let bytes = event_bytes(header, b"GET /");
        let event = decode_event(&bytes).expect("valid event");
        assert_eq!(event.kind, EventKind::Read);
        assert_eq!(event.header, header);
        assert_eq!(event.data, b"GET /");
        assert_eq!(event.local_port(), Some(8000));
    }

    #[test]
    fn rejects_events_that_lie_about_their_length() {
        let header = EventHeader {
            kind: 2,
            captured_len: 50,
            ..EventHeader::default()
        };
        let bytes = event_bytes(header, b"short");
        assert_eq!(
            decode_event(&bytes).err(),
            Some(DecodeError::Length {
                claimed: 50,
                carried: 5
            })
        );
        assert_eq!(
            decode_event(&bytes[..10]).err(),
            Some(DecodeError::Short(10))
        );
        let unknown = event_bytes(
            EventHeader {
                kind: 99,
                ..EventHeader::default()
            },
            b"",
        );
        assert_eq!(decode_event(&unknown).err(), Some(DecodeError::Kind(99)));
    }
}
