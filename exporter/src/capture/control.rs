//! Requests to the kernel side over its control channel: a write to an
//! impossible fd, which the agent's own `write` tracepoint reads and
//! applies in place.

use exporter_common::{
    CONTROL_FD, CONTROL_FORGET_SERVER, CONTROL_IGNORE_CONNECTION, CONTROL_MARK_SERVER,
    ControlRequest,
};

/// Asks the kernel side to stop following a connection.
pub(super) fn ignore_connection(tgid: u32, fd: u32, conn_id: u64) {
    control(ControlRequest {
        op: CONTROL_IGNORE_CONNECTION,
        tgid,
        fd,
        conn_id,
        ..ControlRequest::default()
    });
}

/// Asks the kernel side to stop treating `tgid` as a server.
pub(super) fn forget_server(tgid: u32) {
    control(ControlRequest {
        op: CONTROL_FORGET_SERVER,
        tgid,
        ..ControlRequest::default()
    });
}

/// Asks the kernel side to treat `tgid` as a server again.
pub(super) fn mark_server(tgid: u32) {
    control(ControlRequest {
        op: CONTROL_MARK_SERVER,
        tgid,
        ..ControlRequest::default()
    });
}

/// A write of `request` to [`CONTROL_FD`], which the agent's own write
/// tracepoint reads.
pub(super) fn control(request: ControlRequest) {
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
