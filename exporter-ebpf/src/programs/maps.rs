//! The maps the programs share with each other and with userspace, and the
//! few safe accessors every program uses on them. Map values are plain
//! memory the kernel keeps valid while a program runs: the accessors below
//! are the only places that turn its pointers into references.

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or};

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use exporter_common::{
    CaptureConfig, ConnKey, ConnState, EVENT_HEADER_LEN, EventHeader, FILTERED_SLOTS,
    HANDSHAKE_ENTRIES, HANDSHAKE_FORGOTTEN, ListenerState, MAP_SLOTS, MAX_CAPTURE_BYTES,
    SERVER_PID_WORDS, SERVERS_MAP,
};

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
/// accept on a listener userspace marked
/// [`exporter_common::LISTENER_CGROUP_UNMONITORED`]; cleared by userspace;
/// LRU, so a forgotten cgroup's next connection is judged again.
#[map]
static UNMONITORED_CGROUPS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4_096, 0);

/// Connections the kernel stopped following, per CPU, by how:
/// [`exporter_common::FILTERED_AT_ACCEPT`] and the other `FILTERED_*` slots.
#[map]
static FILTERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(FILTERED_SLOTS, 0);

/// Processes that accept connections, one bit per pid: the first check of
/// every read and write of every process on the node, so it is an array
/// (one cache line touched) rather than a hash map (several). Reads of
/// unknown fds in these processes are checked for an HTTP request start,
/// so connections accepted before the exporter started are picked up at
/// their next request. Set at a followed accept and by userspace at start;
/// cleared on userspace's request
/// ([`exporter_common::CONTROL_FORGET_SERVER`]).
#[map]
static SERVER_PIDS: Array<u64> = Array::with_max_entries(SERVER_PID_WORDS, 0);

/// Failed map inserts, per CPU, by map: [`exporter_common::CONNS_MAP`],
/// [`SERVERS_MAP`] (the syscall arguments are read at exit from the task's
/// registers, so no map holds them between entry and exit).
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

/// An event being assembled: its header, then the bytes captured.
#[repr(C)]
pub(super) struct EventBuffer {
    pub(super) bytes: [u8; EVENT_HEADER_LEN + MAX_CAPTURE_BYTES],
}

impl EventBuffer {
    pub(super) fn write_header(&mut self, header: EventHeader) {
        // SAFETY: the buffer is longer than a header; unaligned writes are
        // allowed anywhere in it.
        unsafe { core::ptr::write_unaligned(self.bytes.as_mut_ptr() as *mut EventHeader, header) };
    }
}

/// This CPU's event buffer.
#[inline(always)]
pub(super) fn scratch() -> Option<&'static mut EventBuffer> {
    // SAFETY: a per-CPU value, valid while the program runs, and no other
    // program runs on this CPU until this one ends.
    SCRATCH.get_ptr_mut(0).map(|buffer| unsafe { &mut *buffer })
}

/// The settings userspace wrote before attaching the programs.
pub(super) fn config() -> CaptureConfig {
    match CONFIG.get(0) {
        Some(config) => *config,
        None => CaptureConfig::default(),
    }
}

/// Turns on the cgroup check at accept (off until a cgroup is learnt, so
/// nodes without one pay nothing).
#[inline(always)]
pub(super) fn enable_cgroup_filter() {
    if let Some(config) = CONFIG.get_ptr_mut(0) {
        // SAFETY: the map's one value, valid while the program runs; a
        // plain store of a flag only ever set here.
        unsafe { (*config).cgroup_filter = 1 };
    }
}

/// The state of the connection `key`, to update in place. Plain updates:
/// two threads of one process rarely use one connection at once, and
/// userspace treats a repeated seq as harmless (only a jump means lost
/// events).
#[inline(always)]
pub(super) fn connection(key: &ConnKey) -> Option<&'static mut ConnState> {
    // SAFETY: a value of CONNS, valid while the program runs (an LRU
    // eviction frees it only after an RCU grace period).
    CONNS.get_ptr_mut(key).map(|state| unsafe { &mut *state })
}

/// Starts following `key`; counted when the map refuses.
#[inline(always)]
pub(super) fn follow(key: &ConnKey, state: &ConnState) -> bool {
    let inserted = CONNS.insert(key, state, 0).is_ok();
    if !inserted {
        count_insert_failure(exporter_common::CONNS_MAP);
    }
    inserted
}

/// Stops following `key`, returning what was kept for it.
#[inline(always)]
pub(super) fn unfollow(key: &ConnKey) -> Option<ConnState> {
    let state = connection(key).map(|state| *state)?;
    let _ = CONNS.remove(key);
    Some(state)
}

/// Userspace's verdict on the listening socket `key`, to update in place.
#[inline(always)]
pub(super) fn listener(key: &ConnKey) -> Option<&'static mut ListenerState> {
    // SAFETY: a value of LISTENERS, valid while the program runs.
    LISTENERS
        .get_ptr_mut(key)
        .map(|state| unsafe { &mut *state })
}

#[inline(always)]
pub(super) fn cgroup_unmonitored(cgroup: u64) -> bool {
    // SAFETY: the value is only tested for presence, not read.
    unsafe { UNMONITORED_CGROUPS.get(&cgroup) }.is_some()
}

#[inline(always)]
pub(super) fn mark_cgroup_unmonitored(cgroup: u64) -> bool {
    UNMONITORED_CGROUPS.insert(&cgroup, &0, 0).is_ok()
}

/// Keeps when the handshake of `sock` completed, for its accept.
#[inline(always)]
pub(super) fn record_handshake(sock: u64, at: u64) {
    let _ = HANDSHAKES.insert(&sock, &at, 0);
}

/// When the kernel completed the handshake of the connection an accept
/// returned as `sock`: [`HANDSHAKE_FORGOTTEN`] when none was kept for it.
#[inline(always)]
pub(super) fn take_handshake(sock: u64) -> u64 {
    // SAFETY: a value of HANDSHAKES, copied out before its removal.
    let Some(&at) = (unsafe { HANDSHAKES.get(&sock) }) else {
        return HANDSHAKE_FORGOTTEN;
    };
    let _ = HANDSHAKES.remove(&sock);
    at
}

#[inline(always)]
pub(super) fn is_server(tgid: u32) -> bool {
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
pub(super) fn mark_server(tgid: u32, server: bool) {
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

/// Adds one to this CPU's `slot` of `counters`.
#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, slot: u32) {
    if let Some(count) = counters.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot: no other writer while the program runs.
        unsafe { *count += 1 };
    }
}

/// Counts a failed insert into map number `map`.
pub(super) fn count_insert_failure(map: u32) {
    bump(&MAP_INSERT_FAILURES, map);
}

/// Counts a connection no longer followed, in `slot` (how).
pub(super) fn count_filtered(slot: u32) {
    bump(&FILTERED, slot);
}

/// Userspace drains the ring on a timer, so most events are submitted
/// without a wakeup (a wakeup per event costs the app's CPUs context
/// switches); only a filling ring wakes the reader early.
#[inline(always)]
fn output_flags(config: &CaptureConfig) -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= config.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Sends an event of a header alone.
pub(super) fn emit_header(header: &EventHeader) {
    if EVENTS
        .output::<EventHeader>(header, output_flags(&config()))
        .is_err()
    {
        bump(&LOST_EVENTS, 0);
    }
}

/// Sends an assembled event (header and captured bytes).
#[inline(always)]
pub(super) fn emit(event: &[u8], config: &CaptureConfig) {
    if EVENTS.output::<[u8]>(event, output_flags(config)).is_err() {
        bump(&LOST_EVENTS, 0);
    }
}
