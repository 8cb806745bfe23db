use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or};

use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf,
        bpf_task_pt_regs,
    },
    macros::{map, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use exporter_common::{
    CONN_IGNORED, CONN_UNSEEN, CONNS_MAP, CONTROL_FD, CONTROL_FORGET_SERVER,
    CONTROL_IGNORE_CONNECTION, CONTROL_MARK_SERVER, CONTROL_SKIP_BODY, CaptureConfig, ConnKey,
    ConnState, ControlRequest, DIRECTION_WRITE, EVENT_HEADER_LEN, EventHeader, EventKind,
    FILTERED_AT_ACCEPT, FILTERED_BY_CGROUP, FILTERED_ON_REQUEST, FILTERED_SLOTS, HANDSHAKE_ENTRIES,
    HANDSHAKE_FORGOTTEN, HEARTBEAT_FD, LISTENER_CGROUP_UNMONITORED, LISTENER_IGNORED,
    LISTENER_RECHECK_EVERY, ListenerState, MAP_SLOTS, MAX_CAPTURE_BYTES, SERVER_PID_WORDS,
    SERVERS_MAP, SocketOffsets,
};

/// Offsets in the syscall tracepoint records (see
/// /sys/kernel/tracing/events/syscalls/*/format): arguments are 8 bytes each
/// from offset 16; the return value of a sys_exit_* record is at 16.
const ARG0: usize = 16;
const RET: usize = 16;

/// errno values of a write to a peer that went away.
const EPIPE: i64 = 32;
const ECONNRESET: i64 = 104;

/// bpf_ringbuf_output / bpf_ringbuf_query flags (uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Events to userspace. Userspace may resize it before loading.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Server-side connections being followed, by (tgid, fd).
#[map]
static CONNS: LruHashMap<ConnKey, ConnState> = LruHashMap::with_max_entries(65_536, 0);

/// Listening sockets, by (tgid, listening fd), whose connections userspace
/// found not worth following (not HTTP, or not monitored). Written by
/// userspace; LRU, so a node with many listeners forgets the oldest verdict
/// (its connections are followed again, then ignored again).
#[map]
static LISTENERS: LruHashMap<ConnKey, ListenerState> = LruHashMap::with_max_entries(4_096, 0);

/// Cgroups (v2 ids) that hold only containers userspace does not monitor
/// (pods selected out): accepts in them are not followed. Learnt at an
/// accept on a listener userspace marked [`LISTENER_CGROUP_UNMONITORED`];
/// cleared by userspace; LRU, so a forgotten cgroup's next connection is
/// judged again.
#[map]
static UNMONITORED_CGROUPS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4_096, 0);

/// Connections the kernel stopped following, per CPU, by how:
/// [`FILTERED_AT_ACCEPT`], [`FILTERED_ON_REQUEST`].
#[map]
static FILTERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(FILTERED_SLOTS, 0);

/// Processes that accept connections, one bit per pid: the first check of
/// every read and write of every process on the node, so it is an array
/// (one cache line touched) rather than a hash map (several). Reads of
/// unknown fds in these processes are checked for an HTTP request start,
/// so connections accepted before the exporter started are picked up at
/// their next request. Set at a followed accept and by userspace at start;
/// cleared on userspace's request ([`CONTROL_FORGET_SERVER`]).
#[map]
static SERVER_PIDS: Array<u64> = Array::with_max_entries(SERVER_PID_WORDS, 0);

/// Failed map inserts, per CPU, by map: [`CONNS_MAP`], [`SERVERS_MAP`],
/// (the syscall arguments are read at exit from the task's registers, so
/// no map holds them between entry and exit).
#[map]
static MAP_INSERT_FAILURES: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAP_SLOTS, 0);

#[map]
static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// When the kernel completed the handshake of each connection not yet
/// accepted, by its `struct sock`: the accept that takes the connection
/// off the listener's queue looks it up and removes it.
#[map]
static HANDSHAKES: LruHashMap<u64, u64> = LruHashMap::with_max_entries(HANDSHAKE_ENTRIES, 0);

/// Events the ring buffer had no room for, per CPU.
#[map]
static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Where an event is assembled before it is copied to the ring buffer (too
/// large for the 512-byte BPF stack).
#[map]
static SCRATCH: PerCpuArray<EventBuffer> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct EventBuffer {
    bytes: [u8; EVENT_HEADER_LEN + MAX_CAPTURE_BYTES],
}

/// How the user buffer of an I/O syscall is described.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum BufferShape {
    /// A plain pointer (read, write, recvfrom, sendto).
    Flat = 0,
    /// A `struct iovec *` (readv, writev); the first iovec is captured.
    Iovec = 1,
    /// A `struct user_msghdr *` (recvmsg, sendmsg); its first iovec is captured.
    Msghdr = 2,
    /// No user buffer (sendfile): only the byte count is reported.
    None = 3,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoArgs {
    fd: u32,
    kind: u32,
    shape: BufferShape,
    _pad: u32,
    buffer: u64,
    /// Bytes asked for, for a flat buffer (read and write's count).
    length: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Offset of `msg_iov` in `struct user_msghdr` (after msg_name and msg_namelen).
const MSGHDR_IOV_OFFSET: u64 = 16;

fn config() -> CaptureConfig {
    match CONFIG.get(0) {
        Some(config) => *config,
        None => CaptureConfig::default(),
    }
}

/// Counts a failed insert into map number `map`.
fn count_insert_failure(map: u32) {
    if let Some(failures) = MAP_INSERT_FAILURES.get_ptr_mut(map) {
        // Per-CPU slot: no other writer.
        unsafe { *failures += 1 };
    }
}

fn count_filtered(slot: u32) {
    if let Some(filtered) = FILTERED.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer.
        unsafe { *filtered += 1 };
    }
}

fn count_lost_event() {
    if let Some(lost) = LOST_EVENTS.get_ptr_mut(0) {
        // Per-CPU slot: no other writer.
        unsafe { *lost += 1 };
    }
}

/// Userspace drains the ring on a timer, so most events are submitted
/// without a wakeup (a wakeup per event costs the app's CPUs context
/// switches); only a filling ring wakes the reader early.
fn output_flags(config: &CaptureConfig) -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= config.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

fn emit_header(header: &EventHeader) {
    if EVENTS
        .output::<EventHeader>(header, output_flags(&config()))
        .is_err()
    {
        count_lost_event();
    }
}

// ---------------------------------------------------------------- servers

#[inline(always)]
fn is_server(tgid: u32) -> bool {
    match SERVER_PIDS.get(tgid / 64) {
        Some(word) => *word & (1 << (tgid % 64)) != 0,
        None => false,
    }
}

/// Sets or clears a server's bit. Atomic (BPF's `lock |=` and `&=`), as
/// other CPUs and userspace's control requests change other bits of the
/// same word; through intrinsics because the BPF target has no
/// compare-and-swap, so `AtomicU64` offers no read-modify-write there.
#[inline(always)]
fn mark_server(tgid: u32, server: bool) {
    let Some(word) = SERVER_PIDS.get_ptr_mut(tgid / 64) else {
        count_insert_failure(SERVERS_MAP);
        return;
    };
    let bit = 1u64 << (tgid % 64);
    // SAFETY: a valid, aligned u64 of the array.
    unsafe {
        if server {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, bit);
        } else {
            atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(word, !bit);
        }
    }
}

// ---------------------------------------------------------------- accept

#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let config = config();
    if (id >> 32) as u32 == config.self_tgid {
        return 0;
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if config.cgroup_filter != 0 && unsafe { UNMONITORED_CGROUPS.get(&cgroup) }.is_some() {
        // A container not monitored: none of its processes is a server.
        let tgid = (id >> 32) as u32;
        if is_server(tgid) {
            mark_server(tgid, false);
        }
        count_filtered(FILTERED_BY_CGROUP);
        return 0;
    }
    let Some([listen_fd, _, _]) = syscall_args() else {
        return 0;
    };
    let listen_fd = listen_fd as u32;
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return 0;
    };
    if ret < 0 {
        return 0;
    }
    let tgid = (id >> 32) as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    let key = ConnKey {
        tgid,
        fd: ret as u32,
    };
    let ignored = listener_ignored(
        &ConnKey {
            tgid,
            fd: listen_fd,
        },
        cgroup,
    );
    // A process that is no server is not followed at all: no entry is
    // needed to mark the connection ignored.
    if ignored && !is_server(tgid) {
        count_filtered(FILTERED_AT_ACCEPT);
        return 0;
    }
    // An ignored connection makes no event: its socket is not needed.
    let sock = if ignored {
        None
    } else {
        socket_of(&config.sockets, ret as u32)
    };
    let state = ConnState {
        conn_id: now,
        seq: 0,
        flags: if ignored {
            CONN_IGNORED | CONN_UNSEEN
        } else {
            0
        },
        listener: listen_fd.wrapping_add(1),
        handshake_ns: sock.map_or(0, take_handshake),
        local_port: sock.map_or(0, |sock| local_port(&config.sockets, sock)),
        ..ConnState::default()
    };
    if CONNS.insert(&key, &state, 0).is_err() {
        count_insert_failure(CONNS_MAP);
    }
    if ignored {
        count_filtered(FILTERED_AT_ACCEPT);
        return 0;
    }
    // A read is much cheaper than an atomic update, and the process is
    // almost always known already.
    if !is_server(tgid) {
        mark_server(tgid, true);
    }
    // No event: the connection's first read or write carries the listener
    // (one ring-buffer output fewer per connection).
    0
}

/// When the kernel completed the handshake of the connection an accept
/// returned as `sock`: [`HANDSHAKE_FORGOTTEN`] when none was kept for it.
#[inline(always)]
fn take_handshake(sock: u64) -> u64 {
    let Some(&at) = (unsafe { HANDSHAKES.get(&sock) }) else {
        return HANDSHAKE_FORGOTTEN;
    };
    let _ = HANDSHAKES.remove(&sock);
    at
}

/// The `struct sock` behind the current task's `fd`: task → files → fdt →
/// fd[fd] → file → socket → sk. `None` when the offsets are unknown or a
/// read failed.
#[inline(always)]
fn socket_of(offsets: &SocketOffsets, fd: u32) -> Option<u64> {
    if offsets.socket_sk == 0 {
        return None;
    }
    // SAFETY: every read goes through bpf_probe_read_kernel, which fails
    // cleanly on a bad address; the offsets come from this kernel's BTF.
    unsafe {
        let task = bpf_get_current_task_btf() as u64;
        let files = read_kernel_u64(task + offsets.task_files as u64)?;
        let table = read_kernel_u64(files + offsets.files_fdt as u64)?;
        let max_fds =
            bpf_probe_read_kernel((table + offsets.fdtable_max_fds as u64) as *const u32).ok()?;
        if fd >= max_fds {
            return None;
        }
        let descriptors = read_kernel_u64(table + offsets.fdtable_fd as u64)?;
        let file = read_kernel_u64(descriptors + fd as u64 * 8)?;
        let socket = read_kernel_u64(file + offsets.file_private_data as u64)?;
        let sock = read_kernel_u64(socket + offsets.socket_sk as u64)?;
        (sock != 0).then_some(sock)
    }
}

/// The local port of `sock` (0 when unreadable).
#[inline(always)]
fn local_port(offsets: &SocketOffsets, sock: u64) -> u32 {
    // SAFETY: as in `socket_of`.
    unsafe { bpf_probe_read_kernel((sock + offsets.sock_num as u64) as *const u16) }
        .map_or(0, u32::from)
}

/// A pointer-sized kernel value at `address`; `None` when unreadable or
/// null.
#[inline(always)]
unsafe fn read_kernel_u64(address: u64) -> Option<u64> {
    let value = unsafe { bpf_probe_read_kernel(address as *const u64) }.ok()?;
    (value != 0).then_some(value)
}

// ---------------------------------------------------------------- TCP

/// Offsets in the `sock:inet_sock_set_state` record
/// (/sys/kernel/tracing/events/sock/inet_sock_set_state/format).
/// `skaddr`: the `struct sock`.
const STATE_SKADDR: usize = 8;
/// `oldstate` and `newstate`, read as one u64.
const STATE_OLD_NEW: usize = 16;
/// `sport`, `dport`, `family`, `protocol`, read as one u64.
const STATE_PORTS: usize = 24;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const IPPROTO_TCP: u16 = 6;

/// A passive connection's handshake is done (SYN_RECV → ESTABLISHED): it
/// now waits in its listener's accept queue. Its time is kept for the
/// accept (node-wide, one map update per connection accepted).
#[tracepoint]
pub fn tcp_state_change(ctx: TracePointContext) -> u32 {
    // It runs at every TCP state change on the node: aligned loads straight
    // from the record (a tracepoint's context may be read directly), no
    // helper call until the change is the one wanted.
    let record = ctx.as_ptr() as *const u64;
    // SAFETY: 8-byte aligned offsets inside the record (see its format).
    let states = unsafe { core::ptr::read(record.add(STATE_OLD_NEW / 8)) };
    // x86_64 is little-endian: oldstate in the low half.
    if states != (TCP_SYN_RECV as u32 as u64) | ((TCP_ESTABLISHED as u32 as u64) << 32) {
        return 0;
    }
    let ports = unsafe { core::ptr::read(record.add(STATE_PORTS / 8)) };
    if (ports >> 48) as u16 != IPPROTO_TCP {
        return 0;
    }
    let sock = unsafe { core::ptr::read(record.add(STATE_SKADDR / 8)) };
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = HANDSHAKES.insert(&sock, &now, 0);
    0
}

/// Whether a connection just accepted on `listener`, in `cgroup`, is left
/// unfollowed: its listener was found not worth following, and this is not
/// one of the connections still followed so that userspace notices a
/// change (none is, for a cgroup not monitored).
#[inline(always)]
fn listener_ignored(listener: &ConnKey, cgroup: u64) -> bool {
    let Some(state) = LISTENERS.get_ptr_mut(listener) else {
        return false;
    };
    // A plain increment: a lost race only shifts which connection is rechecked.
    let accepts = unsafe {
        (*state).accepts = (*state).accepts.wrapping_add(1);
        (*state).accepts
    };
    let verdict = unsafe { (*state).verdict };
    if verdict & LISTENER_CGROUP_UNMONITORED != 0 {
        // Never the root cgroup (id 1), which holds every process of a
        // host whose runtime leaves the v2 hierarchy alone.
        if cgroup > 1
            && UNMONITORED_CGROUPS.insert(&cgroup, &0, 0).is_ok()
            && let Some(config) = CONFIG.get_ptr_mut(0)
        {
            unsafe { (*config).cgroup_filter = 1 };
        }
        return true;
    }
    verdict & LISTENER_IGNORED != 0 && accepts % LISTENER_RECHECK_EVERY != 0
}

// ---------------------------------------------------------------- control

/// A [`ControlRequest`] the exporter wrote to [`CONTROL_FD`]. The
/// connection's state is changed in place, and only if it is still the
/// connection userspace meant: a newer one on the same fd is a new map
/// element, which this does not touch.
fn control(pointer: u64) -> u32 {
    let Ok(request) = (unsafe { bpf_probe_read_user(pointer as *const ControlRequest) }) else {
        return 0;
    };
    if request.op == CONTROL_FORGET_SERVER || request.op == CONTROL_MARK_SERVER {
        mark_server(request.tgid, request.op == CONTROL_MARK_SERVER);
        return 0;
    }
    let key = ConnKey {
        tgid: request.tgid,
        fd: request.fd,
    };
    let Some(state) = CONNS.get_ptr_mut(&key) else {
        return 0;
    };
    if unsafe { (*state).conn_id } != request.conn_id {
        return 0;
    }
    if request.op == CONTROL_IGNORE_CONNECTION {
        unsafe { (*state).flags |= CONN_IGNORED };
        count_filtered(FILTERED_ON_REQUEST);
    } else if request.op == CONTROL_SKIP_BODY {
        // SAFETY: a valid entry of CONNS.
        let (offset, skip) = unsafe {
            if request.direction == DIRECTION_WRITE {
                ((*state).write_offset, &mut (*state).write_skip)
            } else {
                ((*state).read_offset, &mut (*state).read_skip)
            }
        };
        // Userspace counts from the events it has read; the connection may
        // have moved on since, even past the end.
        let ahead = request.skip_until.wrapping_sub(offset) as i32;
        *skip = if ahead > 0 { ahead as u32 } else { 0 };
    }
    0
}

// ---------------------------------------------------------------- read / write

/// The syscall's first three arguments, read at its exit from the registers
/// the task entered the kernel with (x86_64: rdi, rsi, rdx; the kernel
/// leaves them as they were). This spares an enter program and a map entry
/// per syscall.
#[inline(always)]
fn syscall_args() -> Option<[u64; 3]> {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    // rdx, rsi and rdi sit next to each other in pt_regs.
    let [rdx, rsi, rdi] =
        unsafe { bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rdx) as *const [u64; 3]) }
            .ok()?;
    Some([rdi, rsi, rdx])
}

#[tracepoint]
pub fn read_exit_flat(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Read, BufferShape::Flat)
}

#[tracepoint]
pub fn read_exit_iovec(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Read, BufferShape::Iovec)
}

#[tracepoint]
pub fn read_exit_msghdr(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Read, BufferShape::Msghdr)
}

#[tracepoint]
pub fn write_exit_flat(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::Flat)
}

#[tracepoint]
pub fn write_exit_iovec(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::Iovec)
}

#[tracepoint]
pub fn write_exit_msghdr(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::Msghdr)
}

/// sendfile(out_fd, in_fd, ...): file bytes are not in user memory, so only
/// the count is reported.
#[tracepoint]
pub fn sendfile_exit(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::None)
}

/// Where the bytes a syscall transferred are in user memory.
#[derive(Clone, Copy)]
struct UserBuffer {
    /// 0: none known (sendfile, or an unreadable iovec).
    address: u64,
    length: u64,
}

const NO_BUFFER: UserBuffer = UserBuffer {
    address: 0,
    length: 0,
};

/// The user address and length of the bytes a syscall transferred. A plain
/// struct, not an `Option`: LLVM leaves a `None`'s payload undefined, and
/// the verifier refuses a program that copies an undefined register.
fn user_buffer(args: &IoArgs) -> UserBuffer {
    match args.shape {
        BufferShape::Flat => UserBuffer {
            address: args.buffer,
            length: args.length,
        },
        BufferShape::Iovec => first_iovec(args.buffer),
        BufferShape::Msghdr => {
            match unsafe { bpf_probe_read_user((args.buffer + MSGHDR_IOV_OFFSET) as *const u64) } {
                Ok(iov) => first_iovec(iov),
                Err(_) => NO_BUFFER,
            }
        }
        BufferShape::None => NO_BUFFER,
    }
}

fn first_iovec(pointer: u64) -> UserBuffer {
    match unsafe { bpf_probe_read_user(pointer as *const Iovec) } {
        Ok(iov) => UserBuffer {
            address: iov.base,
            length: iov.len,
        },
        Err(_) => NO_BUFFER,
    }
}

/// First four bytes of an HTTP/1.x request line, for the methods servers see.
fn starts_like_request(prefix: [u8; 4]) -> bool {
    matches!(
        &prefix,
        b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"PATC" | b"OPTI" | b"TRAC" | b"CONN"
    )
}

#[inline(always)]
fn io_exit(ctx: &TracePointContext, kind: EventKind, shape: BufferShape) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // Only processes that accept connections have connections to follow
    // (and the agent itself, for its control requests).
    if !is_server(tgid) {
        if kind == EventKind::Write
            && tgid == config().self_tgid
            && let Some([fd, buffer, _]) = syscall_args()
            && fd == CONTROL_FD as u64
        {
            return control(buffer);
        }
        return 0;
    }
    let Some([fd, buffer, length]) = syscall_args() else {
        return 0;
    };
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    let state = CONNS.get_ptr_mut(&key);
    match state {
        Some(state) if unsafe { (*state).flags } & CONN_IGNORED != 0 => return 0,
        Some(_) => {}
        // Reads of untracked fds of server processes are checked for a
        // request start, to pick up connections accepted before the
        // exporter started.
        None if kind != EventKind::Read => return 0,
        None => {}
    }
    let args = IoArgs {
        fd: key.fd,
        kind: kind as u32,
        shape,
        _pad: 0,
        buffer: if shape == BufferShape::None {
            0
        } else {
            buffer
        },
        length: if shape == BufferShape::Flat {
            length
        } else {
            0
        },
    };
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return 0;
    };
    // A write the client never got: the server still meant its status.
    let failed_write =
        args.kind == EventKind::Write as u32 && (ret == -EPIPE || ret == -ECONNRESET);
    if ret <= 0 && !failed_write {
        return 0;
    }
    // What moved, or for a failed write nothing.
    let moved = if failed_write { 0 } else { ret as u32 };
    let buffer = user_buffer(&args);
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(at) = next_in_connection(state, &key, &args, buffer, moved, now) else {
        return 0;
    };
    let config = config();
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let scratch = unsafe { &mut (*scratch).bytes };
    let (kind, copy_len) = if failed_write {
        // What the server tried to send.
        let attempted = buffer.length;
        let copy_len = copy_prefix(scratch, buffer, attempted, &config);
        (EventKind::WriteFailed as u32, copy_len)
    } else {
        let reported = moved - at.skipped;
        let copy_len = copy_prefix(scratch, past(buffer, at.skipped), reported as u64, &config);
        (args.kind, copy_len)
    };
    let header = EventHeader {
        kind,
        tgid: key.tgid,
        fd: args.fd,
        seq: at.seq,
        conn_id: at.conn_id,
        timestamp_ns: now,
        byte_count: moved - at.skipped,
        offset: at.offset,
        captured_len: copy_len as u32,
        aux: if failed_write {
            -ret as u32
        } else if at.seq == 1 {
            // The first event after the accept: where it was accepted.
            at.listener
        } else {
            0
        },
        handshake_ns: if at.seq == 1 { at.handshake_ns } else { 0 },
        local_port: at.local_port,
        _pad: 0,
    };
    unsafe { core::ptr::write_unaligned(scratch.as_mut_ptr() as *mut EventHeader, header) };
    let Some(event) = scratch.get(..EVENT_HEADER_LEN + copy_len) else {
        return 0;
    };
    if EVENTS.output::<[u8]>(event, output_flags(&config)).is_err() {
        count_lost_event();
    }
    0
}

/// Where a syscall's bytes fall in its connection.
struct Position {
    conn_id: u64,
    seq: u32,
    /// The listening fd + 1, 0 if unknown.
    listener: u32,
    /// Stream offset of the first byte reported.
    offset: u32,
    /// Bytes at the start of the syscall's that were skipped (a body's
    /// end); the rest are reported.
    skipped: u32,
    /// When its handshake completed, 0 if unknown.
    handshake_ns: u64,
    /// Its socket's local port, 0 if unknown.
    local_port: u32,
}

/// Where this syscall's `moved` bytes fall in the connection, from its
/// entry in CONNS (`state`, looked up once by the caller), and the
/// connection's counts moved on. An untracked fd of a server process
/// starts being followed only when a read begins with a request line.
/// `None`: nothing to report (not followed, or all body bytes to skip).
#[inline(always)]
fn next_in_connection(
    state: Option<*mut ConnState>,
    key: &ConnKey,
    args: &IoArgs,
    buffer: UserBuffer,
    moved: u32,
    now: u64,
) -> Option<Position> {
    if let Some(state) = state {
        // SAFETY: a valid entry of CONNS. Plain updates: two threads of one
        // process rarely use one connection at once, and userspace treats a
        // repeated seq as harmless (only a jump means lost events).
        let (offset, skip) = unsafe {
            if args.kind == EventKind::Write as u32 {
                (&mut (*state).write_offset, &mut (*state).write_skip)
            } else {
                (&mut (*state).read_offset, &mut (*state).read_skip)
            }
        };
        let start = *offset;
        *offset = start.wrapping_add(moved);
        let skipped = if *skip == 0 || moved == 0 {
            0
        } else if moved < *skip {
            // Inside a body userspace skips: counted by the offset alone.
            *skip -= moved;
            return None;
        } else {
            // The body ends in this syscall: reported, for its time and
            // for what follows the body.
            core::mem::replace(skip, 0)
        };
        return Some(unsafe {
            (*state).seq = (*state).seq.wrapping_add(1);
            Position {
                conn_id: (*state).conn_id,
                seq: (*state).seq,
                listener: (*state).listener,
                offset: start.wrapping_add(skipped),
                skipped,
                handshake_ns: (*state).handshake_ns,
                local_port: (*state).local_port,
            }
        });
    }
    if buffer.address == 0 {
        return None;
    }
    if args.kind != EventKind::Read as u32 || moved < 4 {
        return None;
    }
    let prefix = unsafe { bpf_probe_read_user(buffer.address as *const [u8; 4]) }.ok()?;
    if !starts_like_request(prefix) {
        return None;
    }
    // Rare (connections older than the agent): the settings and the
    // socket walk are paid once per connection picked up, not per syscall.
    let offsets = config().sockets;
    let local_port = socket_of(&offsets, key.fd).map_or(0, |sock| local_port(&offsets, sock));
    let state = ConnState {
        conn_id: now,
        read_offset: moved,
        local_port,
        ..ConnState::default()
    };
    if CONNS.insert(key, &state, 0).is_err() {
        count_insert_failure(CONNS_MAP);
        return None;
    }
    Some(Position {
        conn_id: now,
        seq: 0,
        listener: 0,
        offset: 0,
        skipped: 0,
        handshake_ns: 0,
        local_port,
    })
}

/// The part of `buffer` after its first `skipped` bytes (none when they
/// cover the buffer, or it is not a flat one the kernel knows).
#[inline(always)]
fn past(buffer: UserBuffer, skipped: u32) -> UserBuffer {
    let skipped = skipped as u64;
    if buffer.address == 0 || skipped >= buffer.length {
        return NO_BUFFER;
    }
    UserBuffer {
        address: buffer.address + skipped,
        length: buffer.length - skipped,
    }
}

/// Copies the first bytes the syscall moved (at most the configured
/// capture size) after the header in `scratch`; returns how many.
#[inline(always)]
fn copy_prefix(
    scratch: &mut [u8; EVENT_HEADER_LEN + MAX_CAPTURE_BYTES],
    buffer: UserBuffer,
    moved: u64,
    config: &CaptureConfig,
) -> usize {
    let UserBuffer { address, length } = buffer;
    if address == 0 {
        return 0;
    }
    let mut limit = config.capture_bytes as u64;
    if limit > moved {
        limit = moved;
    }
    if limit > length {
        limit = length;
    }
    let mut copy_len = limit as usize;
    if copy_len > MAX_CAPTURE_BYTES {
        copy_len = MAX_CAPTURE_BYTES;
    }
    if let Some(destination) = scratch.get_mut(EVENT_HEADER_LEN..EVENT_HEADER_LEN + copy_len)
        && unsafe { bpf_probe_read_user_buf(address as *const u8, destination) }.is_err()
    {
        copy_len = 0;
    }
    copy_len
}

// ---------------------------------------------------------------- exit

/// A server process's main thread exits: userspace forgets what it keeps
/// by its pid before a process that reuses the pid makes any event (the
/// ring buffer keeps their order). The server bit stays: userspace clears
/// it once the process is gone (threads may outlive the main one).
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if id as u32 != tgid || !is_server(tgid) {
        return 0;
    }
    emit_header(&EventHeader {
        kind: EventKind::ProcessExit as u32,
        tgid,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ..EventHeader::default()
    });
    0
}

// ---------------------------------------------------------------- close

#[tracepoint]
pub fn close_enter(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(ARG0) }) else {
        return 0;
    };
    let fd = fd as u32;
    if fd == HEARTBEAT_FD && tgid == config().self_tgid {
        emit_header(&EventHeader {
            kind: EventKind::Heartbeat as u32,
            tgid,
            fd,
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            ..EventHeader::default()
        });
        return 0;
    }
    // Followed connections belong to servers. (An entry left by a process
    // since found to be none ages out of the LRU map.)
    if !is_server(tgid) {
        return 0;
    }
    let key = ConnKey { tgid, fd };
    let Some(state) = (unsafe { CONNS.get(&key) }).copied() else {
        return 0;
    };
    let _ = CONNS.remove(&key);
    if state.flags & CONN_UNSEEN != 0 {
        return 0;
    }
    emit_header(&EventHeader {
        kind: EventKind::Close as u32,
        tgid,
        fd,
        seq: state.seq.wrapping_add(1),
        conn_id: state.conn_id,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ..EventHeader::default()
    });
    0
}
