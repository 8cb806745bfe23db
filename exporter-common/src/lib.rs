//! `#[repr(C)]` types that cross the kernel/userspace boundary.
//!
//! Every event the kernel programs send through the ring buffer starts with an
//! [`EventHeader`], followed by `captured_len` bytes copied from the start of
//! the syscall's buffer.
#![no_std]

/// Largest prefix of one syscall buffer the kernel may copy. The runtime cap
/// (`CaptureConfig::capture_bytes`) is at most this.
pub const MAX_CAPTURE_BYTES: usize = 16 * 1024;

/// The fd the exporter closes on purpose so the kernel side can prove, end to
/// end, that programs are attached and events reach userspace (`/readyz`).
/// No process can have an fd this large (`fs.nr_open` caps fds far below it).
pub const HEARTBEAT_FD: u32 = 999_999_937;

/// The fd the exporter writes a [`ControlRequest`] to, so that its own
/// kernel programs act on a connection in place (a map update from
/// userspace could land on a newer connection that reused the fd). The
/// write fails with EBADF after the tracepoint has run.
pub const CONTROL_FD: u32 = HEARTBEAT_FD - 2;

/// [`ControlRequest::op`]: stop following the connection (no more read or
/// write events; its close is still reported).
pub const CONTROL_IGNORE_CONNECTION: u32 = 1;

/// [`ControlRequest::op`]: the process `tgid` is no server to follow (it
/// exited, or every listening socket it holds is ignored); its syscalls
/// stop at the first check. Its next followed accept makes it one again.
pub const CONTROL_FORGET_SERVER: u32 = 2;

/// [`ControlRequest::op`]: the process `tgid` is a server to follow again
/// (what is monitored changed).
pub const CONTROL_MARK_SERVER: u32 = 3;

/// Pids below this have a bit in the kernel's set of server processes:
/// the kernel's own limit on 64-bit (PID_MAX_LIMIT, 4 Mi).
pub const PID_LIMIT: u32 = 4 * 1024 * 1024;
/// Words of 64 pids in that set (512 KiB of kernel memory).
pub const SERVER_PID_WORDS: u32 = PID_LIMIT / 64;

/// [`ControlRequest::op`]: the bytes the connection moves in
/// [`ControlRequest::direction`] up to stream offset
/// [`ControlRequest::skip_until`] are body bytes userspace skips by count:
/// the kernel counts them without copying or reporting them, but for the
/// syscall that reaches the offset (see [`EventHeader::offset`]).
pub const CONTROL_SKIP_BODY: u32 = 4;

/// [`ControlRequest::direction`]: bytes the server read.
pub const DIRECTION_READ: u32 = 0;
/// [`ControlRequest::direction`]: bytes the server wrote.
pub const DIRECTION_WRITE: u32 = 1;

/// What the exporter asks of its kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlRequest {
    pub op: u32,
    pub tgid: u32,
    pub fd: u32,
    /// [`DIRECTION_READ`] or [`DIRECTION_WRITE`] ([`CONTROL_SKIP_BODY`]).
    pub direction: u32,
    /// Acts only if the connection at (tgid, fd) is still this one.
    pub conn_id: u64,
    /// [`CONTROL_SKIP_BODY`]: the stream offset (wrapping, as
    /// [`EventHeader::offset`]) where the bytes to skip end.
    pub skip_until: u32,
    pub _pad: u32,
}

/// [`ConnState::flags`]: no read or write events for this connection.
pub const CONN_IGNORED: u32 = 1;
/// [`ConnState::flags`]: userspace never heard of this connection (ignored
/// at accept), so its close is not reported either.
pub const CONN_UNSEEN: u32 = 2;

/// [`ListenerState::verdict`] bit: connections accepted on this listening
/// socket are not followed, but for one in [`LISTENER_RECHECK_EVERY`],
/// which userspace uses to notice a change.
pub const LISTENER_IGNORED: u32 = 1;
/// [`ListenerState::verdict`] bit: the listener's process sits in a (v2)
/// cgroup of its own container, which is not monitored (a pod selected
/// out): its next accept adds that cgroup to those whose accepts are never
/// followed, whichever process makes them.
pub const LISTENER_CGROUP_UNMONITORED: u32 = 2;
pub const LISTENER_RECHECK_EVERY: u32 = 64;

/// Value of the kernel's listener map, keyed by (tgid, listening fd) as a
/// [`ConnKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerState {
    pub verdict: u32,
    /// Connections accepted since the verdict (the kernel's count).
    pub accepts: u32,
}

/// Slots of the kernel's `FILTERED` array: connections the kernel stopped
/// following, by how.
pub const FILTERED_AT_ACCEPT: u32 = 0;
pub const FILTERED_ON_REQUEST: u32 = 1;
pub const FILTERED_BY_CGROUP: u32 = 2;
pub const FILTERED_SLOTS: u32 = 3;
/// The slots, as userspace names them.
pub const FILTERED_NAMES: [&str; FILTERED_SLOTS as usize] = ["listener", "connection", "cgroup"];

/// Slots of the kernel's `MAP_INSERT_FAILURES` array: which map an insert
/// failed in (`servers`: a pid past [`PID_LIMIT`], which no kernel hands
/// out).
pub const CONNS_MAP: u32 = 0;
pub const SERVERS_MAP: u32 = 1;
pub const MAP_SLOTS: u32 = 2;
/// The maps by slot, as userspace names them.
pub const MAP_NAMES: [&str; MAP_SLOTS as usize] = ["connections", "servers"];

/// What a syscall did on a tracked connection. (An accept makes no event
/// of its own: the connection's first read or write says where it was
/// accepted, see [`EventHeader::aux`].)
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes the server received (read, readv, recvfrom, recvmsg).
    Read = 2,
    /// Bytes the server sent (write, writev, sendto, sendmsg, sendfile).
    Write = 3,
    /// The server closed the connection.
    Close = 4,
    /// The exporter's own heartbeat close() was seen.
    Heartbeat = 5,
    /// A write to a client that went away failed (EPIPE, ECONNRESET; the
    /// errno is `aux`). Nothing moved (`byte_count` is 0); the captured
    /// bytes are the start of what the server tried to send.
    WriteFailed = 6,
    /// A server process's main thread exited (`sched:sched_process_exit`):
    /// its pid may be reused at once, so what is kept by pid is forgotten
    /// before any event of a process that reuses it.
    ProcessExit = 7,
}

impl EventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            2 => Self::Read,
            3 => Self::Write,
            4 => Self::Close,
            5 => Self::Heartbeat,
            6 => Self::WriteFailed,
            7 => Self::ProcessExit,
            _ => return None,
        })
    }
}

/// Fixed part of every ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    pub tgid: u32,
    pub fd: u32,
    /// Per-connection event counter, so userspace sees events lost in between.
    pub seq: u32,
    /// Connection generation: distinguishes a reused fd from the connection
    /// that had it before (the kernel time at which tracking began).
    pub conn_id: u64,
    /// `bpf_ktime_get_ns()` at syscall exit (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// Bytes the syscall transferred from [`Self::offset`] on (its return
    /// value, less a skipped start), even when only a prefix of them was
    /// copied. (One syscall moves less than 2 GiB.)
    pub byte_count: u32,
    /// `Read`, `Write`, `WriteFailed`: where in the connection's stream in
    /// this direction (bytes since the kernel began following it, modulo
    /// 2^32) the reported bytes begin. Bytes between the end of the
    /// previous event in this direction and this offset were moved by
    /// syscalls the kernel did not report, or by the start of this one:
    /// body bytes userspace asked it to skip ([`CONTROL_SKIP_BODY`]),
    /// unless events were lost in between (a `seq` gap).
    pub offset: u32,
    /// Bytes copied after this header (≤ byte_count, ≤ MAX_CAPTURE_BYTES).
    pub captured_len: u32,
    /// Kind-specific. `Read`, `Write`: on the first event of a connection
    /// whose accept the kernel saw, the listening fd + 1 (0 otherwise).
    /// `WriteFailed`: the errno.
    pub aux: u32,
    /// On the first event of a connection whose accept the kernel saw:
    /// when the kernel completed its TCP handshake (`bpf_ktime_get_ns`),
    /// so `conn_id - handshake_ns` is the time it waited in the listener's
    /// accept queue. 0 when the kernel side could not find the accepted
    /// socket (see [`SocketOffsets`]); [`HANDSHAKE_FORGOTTEN`] when it did,
    /// and none was kept for it.
    pub handshake_ns: u64,
    /// The local TCP port of the connection's socket: for an accepted
    /// connection, the port its server listens on. 0 when the kernel side
    /// could not read it (see [`SocketOffsets`]).
    pub local_port: u32,
    pub _pad: u32,
}

pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

impl EventHeader {
    /// The header as the kernel writes it into the ring buffer (native
    /// byte order), for tests and the replay benchmark.
    pub fn to_bytes(&self) -> [u8; EVENT_HEADER_LEN] {
        // SAFETY: `#[repr(C)]` of u32s and u64s in an order with no padding,
        // so every byte is initialised.
        unsafe { core::mem::transmute_copy(self) }
    }
}

/// A tracked connection: key of the kernel's connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Value of the kernel's connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// When tracking began: the accept's time, for an accepted connection.
    pub conn_id: u64,
    pub seq: u32,
    /// [`CONN_IGNORED`], [`CONN_UNSEEN`].
    pub flags: u32,
    /// The listening fd + 1 it was accepted on; 0 when picked up mid-stream.
    pub listener: u32,
    /// Bytes moved so far, per direction (wrapping): see
    /// [`EventHeader::offset`].
    pub read_offset: u32,
    pub write_offset: u32,
    /// Body bytes still to be counted without being reported, per direction
    /// ([`CONTROL_SKIP_BODY`]).
    pub read_skip: u32,
    pub write_skip: u32,
    /// The local port of its socket, 0 if unknown: see
    /// [`EventHeader::local_port`].
    pub local_port: u32,
    /// When the kernel completed the connection's handshake, if seen.
    pub handshake_ns: u64,
}

/// Entries of the kernel's handshake map: connections whose handshake is
/// done and whose accept has not come yet, node-wide (LRU: the oldest is
/// forgotten, and its connection has no queue time).
pub const HANDSHAKE_ENTRIES: u32 = 16_384;

/// `handshake_ns` of an accept whose socket had no handshake kept: the map
/// forgot it (more connections waited at once than it holds), or the
/// handshake ended before the programs were attached. No kernel time is 1.
pub const HANDSHAKE_FORGOTTEN: u64 = 1;

/// Settings userspace writes into the `CONFIG` array before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// The exporter's own tgid: never tracked.
    pub self_tgid: u32,
    /// How many bytes of each buffer to copy (≤ MAX_CAPTURE_BYTES).
    pub capture_bytes: u32,
    /// Events are submitted without waking userspace (which drains the ring
    /// every few milliseconds) until this many bytes wait in the ring.
    pub wakeup_bytes: u64,
    /// Non-zero once a cgroup is ignored ([`LISTENER_CGROUP_UNMONITORED`]):
    /// only then does an accept look its cgroup up.
    pub cgroup_filter: u32,
    pub _pad: u32,
    pub sockets: SocketOffsets,
}

/// Where, in the running kernel's structures, the kernel side finds the
/// socket behind a descriptor: from the task, its descriptor table, then
/// the file's socket and its `struct sock` (byte offsets, read from the
/// kernel's BTF by userspace). The handshake map is keyed by that `struct
/// sock`, which the TCP state tracepoint names too, so connections of
/// different network namespaces or ports never share an entry; the sock
/// also holds the connection's local port. `socket_sk` zero: unknown, and
/// no socket is looked up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOffsets {
    /// `task_struct.files`
    pub task_files: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdtable_max_fds: u32,
    /// `fdtable.fd`
    pub fdtable_fd: u32,
    /// `file.private_data` (a socket file's `struct socket`)
    pub file_private_data: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_num`: the local port, in host byte order.
    pub sock_num: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data `#[repr(C)]` types with no padding
    // holes that matter to the kernel (padding is explicit).
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CaptureConfig {}
}
