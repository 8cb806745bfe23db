//! accept(2) and accept4(2): a connection starts being followed, unless
//! its listener or its container's cgroup was found not worth it.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use exporter_common::{
    CONN_IGNORED, CONN_UNSEEN, ConnKey, ConnState, FILTERED_AT_ACCEPT, FILTERED_BY_CGROUP,
    LISTENER_CGROUP_UNMONITORED, LISTENER_IGNORED, LISTENER_RECHECK_EVERY,
};

use super::{
    kernel::{current_cgroup, local_port, now_ns, return_value, socket_of, syscall_args},
    maps::{
        cgroup_unmonitored, config, count_filtered, enable_cgroup_filter, follow, is_server,
        listener, mark_cgroup_unmonitored, mark_server, take_handshake,
    },
};

#[tracepoint]
pub(crate) fn accept_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let config = config();
    if (id >> 32) as u32 == config.self_tgid {
        return 0;
    }
    let cgroup = current_cgroup();
    if config.cgroup_filter != 0 && cgroup_unmonitored(cgroup) {
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
    let Some(ret) = return_value(&ctx) else {
        return 0;
    };
    if ret < 0 {
        return 0;
    }
    let tgid = (id >> 32) as u32;
    let now = now_ns();
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
    follow(&key, &state);
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

/// Whether a connection just accepted on `listener`, in `cgroup`, is left
/// unfollowed: its listener was found not worth following, and this is not
/// one of the connections still followed so that userspace notices a
/// change (none is, for a cgroup not monitored).
#[inline(always)]
fn listener_ignored(key: &ConnKey, cgroup: u64) -> bool {
    let Some(state) = listener(key) else {
        return false;
    };
    // A plain increment: a lost race only shifts which connection is rechecked.
    state.accepts = state.accepts.wrapping_add(1);
    let accepts = state.accepts;
    let verdict = state.verdict;
    if verdict & LISTENER_CGROUP_UNMONITORED != 0 {
        // Never the root cgroup (id 1), which holds every process of a
        // host whose runtime leaves the v2 hierarchy alone.
        if cgroup > 1 && mark_cgroup_unmonitored(cgroup) {
            enable_cgroup_filter();
        }
        return true;
    }
    verdict & LISTENER_IGNORED != 0 && accepts % LISTENER_RECHECK_EVERY != 0
}
