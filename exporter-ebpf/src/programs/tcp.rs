//! TCP state changes: when a passive connection's handshake completed, for
//! the accept that takes it off its listener's queue.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use super::{
    kernel::{now_ns, record_word},
    maps::record_handshake,
};

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
pub(crate) fn tcp_state_change(ctx: TracePointContext) -> u32 {
    // It runs at every TCP state change on the node: aligned loads straight
    // from the record, no helper call until the change is the one wanted.
    let states = record_word::<STATE_OLD_NEW>(&ctx);
    // x86_64 is little-endian: oldstate in the low half.
    if states != (TCP_SYN_RECV as u32 as u64) | ((TCP_ESTABLISHED as u32 as u64) << 32) {
        return 0;
    }
    let ports = record_word::<STATE_PORTS>(&ctx);
    if (ports >> 48) as u16 != IPPROTO_TCP {
        return 0;
    }
    let sock = record_word::<STATE_SKADDR>(&ctx);
    record_handshake(sock, now_ns());
    0
}
