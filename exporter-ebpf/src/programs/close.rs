//! The ends: close(2) of a followed connection (and the agent's heartbeat),
//! and a server process's exit.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use exporter_common::{CONN_UNSEEN, ConnKey, EventHeader, EventKind, HEARTBEAT_FD};

use super::{
    kernel::{first_argument, now_ns},
    maps::{config, emit_header, is_server, unfollow},
};

#[tracepoint]
pub(crate) fn close_enter(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let Some(fd) = first_argument(&ctx) else {
        return 0;
    };
    let fd = fd as u32;
    if fd == HEARTBEAT_FD && tgid == config().self_tgid {
        emit_header(&EventHeader {
            kind: EventKind::Heartbeat as u32,
            tgid,
            fd,
            timestamp_ns: now_ns(),
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
    let Some(state) = unfollow(&key) else {
        return 0;
    };
    if state.flags & CONN_UNSEEN != 0 {
        return 0;
    }
    emit_header(&EventHeader {
        kind: EventKind::Close as u32,
        tgid,
        fd,
        seq: state.seq.wrapping_add(1),
        conn_id: state.conn_id,
        timestamp_ns: now_ns(),
        ..EventHeader::default()
    });
    0
}

/// A server process's main thread exits: userspace forgets what it keeps
/// by its pid before a process that reuses the pid makes any event (the
/// ring buffer keeps their order). The server bit stays: userspace clears
/// it once the process is gone (threads may outlive the main one).
#[tracepoint]
pub(crate) fn process_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if id as u32 != tgid || !is_server(tgid) {
        return 0;
    }
    emit_header(&EventHeader {
        kind: EventKind::ProcessExit as u32,
        tgid,
        timestamp_ns: now_ns(),
        ..EventHeader::default()
    });
    0
}
