//! The capture stage: the kernel programs loaded and attached
//! (`loader.rs`), events read from the BPF ring buffer and decoded
//! (`events.rs`), and the stream stage's [`KernelFilter`] decisions applied
//! to the kernel's maps, directly or over the control channel
//! (`control.rs`), with what this side remembers of them (`verdicts.rs`).
//! Its counters mirror the kernel's own (`counters.rs`).

mod control;
mod counters;
mod events;
mod loader;
mod program_stats;
mod server_scans;
mod socket_offsets;
mod verdicts;

pub use self::counters::CaptureCounters;
pub use self::events::{DecodeError, RawEvent, decode_event};
pub use self::loader::{ATTACHMENTS, CaptureError, CaptureOptions, FLOOR_OBJECT};
pub use self::verdicts::IgnoreReason;

use std::{os::fd::AsRawFd, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, ring_buf::RingBufItem},
};
use exporter_common::{
    CONTROL_SKIP_BODY, ConnKey, ConnState, ControlRequest, EVENT_HEADER_LEN, EventHeader,
    EventKind, LISTENER_CGROUP_UNMONITORED, LISTENER_IGNORED, ListenerState, MAP_NAMES,
    MAX_CAPTURE_BYTES,
};
use tracing::{debug, info, warn};

use self::control::{control, forget_server, ignore_connection, mark_server};
use self::counters::{mirror, per_cpu_sum};
use self::loader::{
    EBPF_OBJECT, attach, configure, map_error, permission_denied, raise_memlock_limit,
    seed_servers, take_map,
};
use self::server_scans::{ServerScan, ServerScanned, ServerScans};
use self::verdicts::{
    IgnoredListeners, MAX_IGNORED_LISTENERS, MAX_SERVER_PROCESSES, ServerProcesses,
};
use crate::{preflight::Granted, procfs};

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
