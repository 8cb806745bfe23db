//! What the kernel side should stop following or copying, decided from
//! what a connection showed: bodies to skip by count, connections and
//! listeners that are not HTTP or not monitored.

use exporter_common::{DIRECTION_READ, DIRECTION_WRITE, EventKind};

use crate::capture::{IgnoreReason, KernelFilter, RawEvent};

use super::Connection;

/// A body with at least this many bytes still to come is skipped in the
/// kernel (one control write), rather than copied syscall by syscall.
pub(super) const MIN_BODY_SKIP_BYTES: u64 = 32 * 1024;

/// Most body bytes one skip request covers (the kernel's offsets are 32-bit).
pub(super) const MAX_BODY_SKIP_BYTES: u64 = 1 << 30;

/// A connection that is not HTTP is followed until the server has written
/// (what it writes classifies the listener), or for this many events.
pub(super) const EVENTS_TO_HEAR_THE_SERVER: u32 = 8;

/// Whether the first bytes a server wrote can start an HTTP/1.x response.
pub(super) fn starts_like_response(bytes: &[u8]) -> bool {
    const START: &[u8] = b"HTTP/";
    bytes.starts_with(START) || START.starts_with(bytes)
}

/// The stream direction of an event's bytes ([`DIRECTION_READ`],
/// [`DIRECTION_WRITE`]); `None` for a close.
pub(super) fn direction_of(kind: EventKind) -> Option<u32> {
    match kind {
        EventKind::Read => Some(DIRECTION_READ),
        EventKind::Write | EventKind::WriteFailed => Some(DIRECTION_WRITE),
        EventKind::Close | EventKind::Heartbeat | EventKind::ProcessExit => None,
    }
}

/// What the kernel side should do differently for `connection` after
/// `event`: stop following it or its listener, or skip a body.
pub(super) fn decide_kernel_side(
    key: (u32, u32),
    connection: &mut Connection,
    event: &RawEvent<'_>,
    out: &mut Vec<KernelFilter>,
) {
    decide_kernel_filter(key, connection, event, out);
    ask_to_skip_body(key, connection, event, out);
}

/// Asks the kernel to count, not copy, the rest of a long body in the
/// event's direction (a slow upload, a streamed download): only the byte
/// counts matter, and the head or chunk-size line after it is copied.
pub(super) fn ask_to_skip_body(
    (tgid, fd): (u32, u32),
    connection: &mut Connection,
    event: &RawEvent<'_>,
    out: &mut Vec<KernelFilter>,
) {
    let Some(direction) = direction_of(event.kind) else {
        return;
    };
    if connection.ignored || connection.served_by.is_none() {
        return;
    }
    let Some(left) = connection.http.body_left(direction == DIRECTION_READ) else {
        return;
    };
    if left < MIN_BODY_SKIP_BYTES {
        return;
    }
    let slot = direction as usize;
    let until = connection.next_offset[slot].wrapping_add(left.min(MAX_BODY_SKIP_BYTES) as u32);
    if connection.skip_asked[slot] == Some(until) {
        return;
    }
    connection.skip_asked[slot] = Some(until);
    out.push(KernelFilter::SkipBody {
        tgid,
        fd,
        conn_id: connection.conn_id,
        direction,
        until,
    });
}

/// Whether the kernel side should stop following `connection` or the
/// connections of its listener, after `event`. A listener is judged by what
/// its server writes, never by what a client sends: a Flask server answers
/// a client's garbage with `HTTP/1.1 400`, Redis with `-ERR`.
pub(super) fn decide_kernel_filter(
    (tgid, fd): (u32, u32),
    connection: &mut Connection,
    event: &RawEvent<'_>,
    out: &mut Vec<KernelFilter>,
) {
    // A closing connection needs no request: the kernel forgets it itself.
    if connection.ignored || event.kind == EventKind::Close {
        return;
    }
    connection.events = connection.events.saturating_add(1);
    let ignore = if connection.served_by.is_none() {
        if let Some(listen_fd) = connection.listener {
            out.push(KernelFilter::Listener {
                tgid,
                listen_fd,
                ignore: Some(IgnoreReason::Unmonitored),
            });
        }
        Some(IgnoreReason::Unmonitored)
    } else {
        hear_the_server(tgid, connection, event, out)
    };
    if let Some(reason) = ignore {
        connection.ignored = true;
        out.push(KernelFilter::IgnoreConnection {
            tgid,
            fd,
            conn_id: connection.conn_id,
            reason,
        });
    }
}

/// Judges the listener by the server's first bytes on a connection whose
/// every event arrived; whether the connection is not HTTP.
pub(super) fn hear_the_server(
    tgid: u32,
    connection: &mut Connection,
    event: &RawEvent<'_>,
    out: &mut Vec<KernelFilter>,
) -> Option<IgnoreReason> {
    let wrote = matches!(event.kind, EventKind::Write | EventKind::WriteFailed);
    if wrote && !connection.server_spoke {
        connection.server_spoke = true;
        // Only the server's very first bytes say what it speaks, and only
        // when the kernel could copy them.
        if connection.complete && !event.data.is_empty() {
            let http = starts_like_response(event.data);
            if let Some(listen_fd) = connection.listener {
                out.push(KernelFilter::Listener {
                    tgid,
                    listen_fd,
                    ignore: (!http).then_some(IgnoreReason::NotHttp),
                });
            }
            if !http {
                return Some(IgnoreReason::NotHttp);
            }
        }
    }
    let heard = connection.server_spoke || connection.events >= EVENTS_TO_HEAR_THE_SERVER;
    (connection.http.is_not_http() && heard).then_some(IgnoreReason::NotHttp)
}
