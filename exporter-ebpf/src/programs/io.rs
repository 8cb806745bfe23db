//! Reads and writes of the processes that accept connections: for a
//! followed connection, or one a read shows to start with a request line,
//! an event of where the bytes fall in the connection and their first
//! bytes; the agent's own writes to the control fd go to [`control`].

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use exporter_common::{
    CONN_IGNORED, CONTROL_FD, ConnKey, ConnState, EVENT_HEADER_LEN, EventHeader, EventKind,
};

use super::{
    buffers::{
        BufferShape, IoArgs, UserBuffer, copy_prefix, past, starts_like_request, user_buffer,
    },
    control::control,
    kernel::{local_port, now_ns, read_user, return_value, socket_of, syscall_args},
    maps::{config, connection, emit, follow, is_server, scratch},
};

/// errno values of a write to a peer that went away.
const EPIPE: i64 = 32;
const ECONNRESET: i64 = 104;

#[tracepoint]
pub(crate) fn read_exit_flat(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Read, BufferShape::Flat)
}

#[tracepoint]
pub(crate) fn read_exit_iovec(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Read, BufferShape::Iovec)
}

#[tracepoint]
pub(crate) fn read_exit_msghdr(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Read, BufferShape::Msghdr)
}

#[tracepoint]
pub(crate) fn write_exit_flat(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::Flat)
}

#[tracepoint]
pub(crate) fn write_exit_iovec(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::Iovec)
}

#[tracepoint]
pub(crate) fn write_exit_msghdr(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::Msghdr)
}

/// sendfile(out_fd, in_fd, ...): file bytes are not in user memory, so only
/// the count is reported.
#[tracepoint]
pub(crate) fn sendfile_exit(ctx: TracePointContext) -> u32 {
    io_exit(&ctx, EventKind::Write, BufferShape::None)
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
    let state = connection(&key);
    match &state {
        Some(state) if state.flags & CONN_IGNORED != 0 => return 0,
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
    let Some(ret) = return_value(ctx) else {
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
    let now = now_ns();
    let Some(at) = next_in_connection(state, &key, &args, buffer, moved, now) else {
        return 0;
    };
    let config = config();
    let Some(scratch) = scratch() else {
        return 0;
    };
    let (kind, copy_len) = if failed_write {
        // What the server tried to send.
        let attempted = buffer.length;
        let copy_len = copy_prefix(&mut scratch.bytes, buffer, attempted, &config);
        (EventKind::WriteFailed as u32, copy_len)
    } else {
        let reported = moved - at.skipped;
        let copy_len = copy_prefix(
            &mut scratch.bytes,
            past(buffer, at.skipped),
            reported as u64,
            &config,
        );
        (args.kind, copy_len)
    };
    scratch.write_header(EventHeader {
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
    });
    let Some(event) = scratch.bytes.get(..EVENT_HEADER_LEN + copy_len) else {
        return 0;
    };
    emit(event, &config);
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
    state: Option<&mut ConnState>,
    key: &ConnKey,
    args: &IoArgs,
    buffer: UserBuffer,
    moved: u32,
    now: u64,
) -> Option<Position> {
    if let Some(state) = state {
        let (offset, skip) = if args.kind == EventKind::Write as u32 {
            (&mut state.write_offset, &mut state.write_skip)
        } else {
            (&mut state.read_offset, &mut state.read_skip)
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
        state.seq = state.seq.wrapping_add(1);
        return Some(Position {
            conn_id: state.conn_id,
            seq: state.seq,
            listener: state.listener,
            offset: start.wrapping_add(skipped),
            skipped,
            handshake_ns: state.handshake_ns,
            local_port: state.local_port,
        });
    }
    if buffer.address == 0 {
        return None;
    }
    if args.kind != EventKind::Read as u32 || moved < 4 {
        return None;
    }
    let prefix = read_user::<[u8; 4]>(buffer.address)?;
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
    if !follow(key, &state) {
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
