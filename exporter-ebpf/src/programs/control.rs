//! Userspace's requests: the agent writes a [`ControlRequest`] to
//! [`exporter_common::CONTROL_FD`], and [`super::io`] hands the pointer
//! here from the agent's own write.

use exporter_common::{
    CONN_IGNORED, CONTROL_FORGET_SERVER, CONTROL_IGNORE_CONNECTION, CONTROL_MARK_SERVER,
    CONTROL_SKIP_BODY, ConnKey, ControlRequest, DIRECTION_WRITE, FILTERED_ON_REQUEST,
};

use super::{
    kernel::read_user,
    maps::{connection, count_filtered, mark_server},
};

/// Applies the request at `pointer`. A connection's state is changed in
/// place, and only if it is still the connection userspace meant: a newer
/// one on the same fd is a new map element, which this does not touch.
pub(super) fn control(pointer: u64) -> u32 {
    let Some(request) = read_user::<ControlRequest>(pointer) else {
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
    let Some(state) = connection(&key) else {
        return 0;
    };
    if state.conn_id != request.conn_id {
        return 0;
    }
    if request.op == CONTROL_IGNORE_CONNECTION {
        state.flags |= CONN_IGNORED;
        count_filtered(FILTERED_ON_REQUEST);
    } else if request.op == CONTROL_SKIP_BODY {
        let (offset, skip) = if request.direction == DIRECTION_WRITE {
            (state.write_offset, &mut state.write_skip)
        } else {
            (state.read_offset, &mut state.read_skip)
        };
        // Userspace counts from the events it has read; the connection may
        // have moved on since, even past the end.
        let ahead = request.skip_until.wrapping_sub(offset) as i32;
        *skip = if ahead > 0 { ahead as u32 } else { 0 };
    }
    0
}
