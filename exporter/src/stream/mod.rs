//! Per-connection reassembly: routes each kernel event to the connection it
//! belongs to (keyed by tgid, fd and generation), notices lost events from
//! sequence gaps, and hands bytes in order to the HTTP stage.

use std::collections::{BTreeMap, BTreeSet, HashMap, hash_map::Entry};

use exporter_common::{DIRECTION_READ, DIRECTION_WRITE, EventKind, HANDSHAKE_FORGOTTEN};
use prometheus::{IntCounter, IntGauge, Registry};
use tracing::debug;

use crate::{
    capture::{IgnoreReason, KernelFilter, RawEvent},
    exchange::{CapturedExchange, Exchange, LostRequests, Origin, Queued, ServedBy},
    http::{HttpConnection, HttpCounters, Segment},
    telemetry::{Budget, Budgets, counter, gauge},
};

/// Bytes all connections together may hold of heads not complete yet;
/// beyond it the oldest are given up first.
pub const MAX_PARTIAL_HEAD_BYTES: usize = 16 * 1024 * 1024;

/// Bytes all connections together may hold of the targets of requests
/// waiting for their responses; past it the connection that went over
/// gives up its oldest.
pub const MAX_PENDING_TARGET_BYTES: usize = 16 * 1024 * 1024;

/// HTTP states of closed connections kept for new ones, at most.
const MAX_SPARE_CONNECTIONS: usize = 256;

/// A connection idle this long is forgotten (its close was lost).
const IDLE_CONNECTION_NS: u64 = 15 * 60 * 1_000_000_000;
/// A connection idle this long is checked against the kernel's connection
/// map at the reap: an entry evicted there makes no more events, not even
/// its close.
const EVICTION_CHECK_IDLE_NS: u64 = 5 * 1_000_000_000;
/// Most connections checked so at one reap (one map lookup each); the
/// rest are checked at the next.
const MAX_EVICTION_CHECKS: usize = 4_096;
/// A response whose framing was lost ends after this long without writes.
const UNFRAMED_RESPONSE_IDLE_NS: u64 = 5 * 1_000_000_000;
/// A body with at least this many bytes still to come is skipped in the
/// kernel (one control write), rather than copied syscall by syscall.
const MIN_BODY_SKIP_BYTES: u64 = 32 * 1024;
/// Most body bytes one skip request covers (the kernel's offsets are 32-bit).
const MAX_BODY_SKIP_BYTES: u64 = 1 << 30;

/// A connection that is not HTTP is followed until the server has written
/// (what it writes classifies the listener), or for this many events.
const EVENTS_TO_HEAR_THE_SERVER: u32 = 8;

/// Whether the first bytes a server wrote can start an HTTP/1.x response.
fn starts_like_response(bytes: &[u8]) -> bool {
    const START: &[u8] = b"HTTP/";
    bytes.starts_with(START) || START.starts_with(bytes)
}

#[derive(Debug)]
struct Connection {
    conn_id: u64,
    last_seq: u32,
    /// `None`: not monitored; its bytes are dropped.
    served_by: Option<ServedBy>,
    /// The port it was accepted on, when read.
    server_port: Option<u16>,
    http: HttpConnection,
    last_event_ns: u64,
    /// Its entry in the table's partial-head index, while it holds one:
    /// (bytes, when the oldest began).
    partial: Option<(usize, u64)>,
    /// Its share of the table's pending-target bytes, when last counted.
    pending_target_bytes: usize,
    /// The listening fd it was accepted on; `None` when picked up mid-stream.
    listener: Option<u32>,
    /// Every event since the accept arrived (no sequence gap): the first
    /// write seen is then the server's first write.
    complete: bool,
    /// The server has written on it.
    server_spoke: bool,
    events: u32,
    /// The kernel was asked to stop following it.
    ignored: bool,
    /// Per direction (read, write): the stream offset where the next
    /// reported bytes are expected, and the end of the last body skip asked.
    next_offset: [u32; 2],
    skip_asked: [Option<u32>; 2],
    /// Its wait in the accept queue, until its first exchange carries it.
    queued: Option<Queued>,
}

/// What this stage and the HTTP stage under it count. The stage owns these
/// counters: `/metrics` and `/debug/connections` read them as they are.
#[derive(Clone, Debug)]
pub struct StreamCounters {
    pub connections_opened: IntCounter,
    pub sequence_gaps: IntCounter,
    pub connections_tracked: IntGauge,
    /// Body bytes the kernel counted without copying or reporting them.
    pub body_bytes_skipped: IntCounter,
    /// Connections the kernel forgot while this side followed them.
    pub connections_evicted: IntCounter,
    /// Partial heads given up to stay within [`MAX_PARTIAL_HEAD_BYTES`].
    pub partial_head_budget: IntCounter,
    /// Waiting requests given up to stay within
    /// [`MAX_PENDING_TARGET_BYTES`].
    pub pending_target_budget: IntCounter,
    /// Accepted connections whose handshake the kernel's map no longer
    /// held: no queue time for them.
    pub handshakes_forgotten: IntCounter,
    pub http: HttpCounters,
}

impl StreamCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        Ok(StreamCounters {
            partial_head_budget: budgets.counter(Budget::PartialHeadBytes),
            pending_target_budget: budgets.counter(Budget::PendingTargetBytes),
            handshakes_forgotten: counter(
                registry,
                "flask_ebpf_exporter_handshakes_forgotten_total",
                "Accepted connections with no queue time because the kernel's handshake map \
                 (--kernel-handshakes entries, node-wide) had forgotten their handshake: more \
                 connections waited to be accepted at once than it holds, or their handshake \
                 ended before the agent started",
            )?,
            connections_opened: counter(
                registry,
                "flask_ebpf_exporter_connections_total",
                "Server-side connections followed since start",
            )?,
            sequence_gaps: counter(
                registry,
                "flask_ebpf_exporter_sequence_gaps_total",
                "Connections on which events went missing",
            )?,
            body_bytes_skipped: counter(
                registry,
                "flask_ebpf_exporter_body_bytes_skipped_total",
                "Request and response body bytes the kernel side counted without copying them, at the agent's request",
            )?,
            connections_evicted: counter(
                registry,
                "flask_ebpf_exporter_connections_evicted_total",
                "Connections whose end this side never saw because the kernel side forgot them: evicted from its connection map when more than --kernel-connections were followed at once (or, rarely, their close event was lost to a full ring buffer, which events_lost_total also counts)",
            )?,
            connections_tracked: gauge(
                registry,
                "flask_ebpf_exporter_connections_tracked",
                "Server-side connections currently followed",
            )?,
            http: HttpCounters::register(registry)?,
        })
    }
}

/// What [`ConnectionTable::handle`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Done,
    /// The event opens a connection the table does not know: find whom it
    /// is served by and hand the event to [`ConnectionTable::open`].
    NewConnection(Origin),
}

/// Connections holding partial heads, oldest first, and their bytes.
#[derive(Debug, Default)]
struct PartialHeads {
    oldest: BTreeSet<(u64, (u32, u32))>,
    bytes: usize,
}

impl PartialHeads {
    /// Brings the index up to date with what `connection` holds now.
    fn account(&mut self, key: (u32, u32), connection: &mut Connection) {
        let now = connection.http.partial_heads();
        if now == connection.partial {
            return;
        }
        if let Some((bytes, since)) = connection.partial.take() {
            self.oldest.remove(&(since, key));
            self.bytes -= bytes;
        }
        if let Some((bytes, since)) = now {
            self.oldest.insert((since, key));
            self.bytes += bytes;
        }
        connection.partial = now;
    }

    fn forget(&mut self, key: (u32, u32), connection: &Connection) {
        if let Some((bytes, since)) = connection.partial {
            self.oldest.remove(&(since, key));
            self.bytes -= bytes;
        }
    }
}

/// The bytes of the waiting requests' targets, over all connections: the
/// sum of each connection's share when it was last counted.
#[derive(Debug, Default)]
struct PendingTargets {
    bytes: usize,
}

impl PendingTargets {
    fn account(&mut self, connection: &mut Connection) {
        let now = connection.http.pending_target_bytes();
        self.bytes = self.bytes - connection.pending_target_bytes + now;
        connection.pending_target_bytes = now;
    }

    fn forget(&mut self, connection: &Connection) {
        self.bytes -= connection.pending_target_bytes;
    }

    /// Past `max`, `connection` (the one that went over) gives up its
    /// oldest waiting requests, counted, until the rest fit or it holds
    /// none.
    fn enforce(&mut self, max: usize, connection: &mut Connection, counters: &StreamCounters) {
        while self.bytes > max && connection.http.abandon_oldest_request(&counters.http) {
            counters.pending_target_budget.inc();
            self.account(connection);
        }
    }
}

/// What all connections together may hold.
#[derive(Clone, Copy, Debug)]
pub struct HeldBytes {
    /// Heads not complete yet.
    pub partial_heads: usize,
    /// Targets of requests waiting for their responses.
    pub pending_targets: usize,
}

impl Default for HeldBytes {
    fn default() -> Self {
        HeldBytes {
            partial_heads: MAX_PARTIAL_HEAD_BYTES,
            pending_targets: MAX_PENDING_TARGET_BYTES,
        }
    }
}

#[derive(Debug)]
pub struct ConnectionTable {
    connections: HashMap<(u32, u32), Connection>,
    counters: StreamCounters,
    partial_heads: PartialHeads,
    pending_targets: PendingTargets,
    max_held: HeldBytes,
    /// Decisions for the kernel side, until the pipeline takes them.
    kernel_filters: Vec<KernelFilter>,
    /// Exchanges one event finished, before they are tagged (kept so that
    /// handling an event allocates nothing).
    finished: Vec<Exchange>,
    /// HTTP states of closed connections, for new ones (likewise).
    spare: Vec<HttpConnection>,
    /// Requests lost on monitored connections, for the caller to count by
    /// identity ([`Self::take_losses`]).
    losses: Vec<(ServedBy, LostRequests)>,
}

impl ConnectionTable {
    pub fn new(counters: StreamCounters) -> Self {
        Self::holding_at_most(counters, HeldBytes::default())
    }

    /// A table whose connections hold at most `max_held`, all together.
    pub fn holding_at_most(counters: StreamCounters, max_held: HeldBytes) -> Self {
        ConnectionTable {
            connections: HashMap::new(),
            counters,
            partial_heads: PartialHeads::default(),
            pending_targets: PendingTargets::default(),
            max_held,
            kernel_filters: Vec::new(),
            finished: Vec::new(),
            losses: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// What the kernel side should stop or resume following, decided since
    /// the last call.
    pub fn take_kernel_filters(&mut self) -> std::vec::Drain<'_, KernelFilter> {
        self.kernel_filters.drain(..)
    }

    /// Bytes of heads not complete yet, over all connections.
    pub fn partial_head_bytes(&self) -> usize {
        self.partial_heads.bytes
    }

    /// Bytes of waiting requests' targets, over all connections.
    pub fn pending_target_bytes(&self) -> usize {
        self.pending_targets.bytes
    }

    /// Gives up the oldest partial heads until the rest fit the budget.
    fn enforce_partial_head_budget(&mut self) {
        while self.partial_heads.bytes > self.max_held.partial_heads {
            let Some(&(since, key)) = self.partial_heads.oldest.first() else {
                return;
            };
            let Some(connection) = self.connections.get_mut(&key) else {
                self.partial_heads.oldest.remove(&(since, key));
                continue;
            };
            connection.http.drop_partial_heads(&self.counters.http);
            self.partial_heads.account(key, connection);
            self.counters.partial_head_budget.inc();
        }
    }

    /// Connections followed per process.
    pub fn per_process(&self) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        for &(tgid, _) in self.connections.keys() {
            *counts.entry(tgid).or_default() += 1;
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// Requests lost since the last call, by connection's server and why.
    pub fn take_losses(&mut self) -> Vec<(ServedBy, LostRequests)> {
        std::mem::take(&mut self.losses)
    }

    /// Requests read and not yet answered, per monitored connection that
    /// has any, with whom the connection is served by.
    pub fn requests_in_flight(&self) -> impl Iterator<Item = (&ServedBy, usize)> {
        self.connections.values().filter_map(|connection| {
            let count = connection.http.requests_in_flight();
            Some((connection.served_by.as_ref()?, count)).filter(|_| count > 0)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn counters(&self) -> &StreamCounters {
        &self.counters
    }

    /// Feeds one event of a known connection; finished exchanges are
    /// appended to `out`. An event that opens a connection is not consumed:
    /// the caller finds its [`ServedBy`] and passes it to [`Self::open`].
    pub fn handle(&mut self, event: &RawEvent<'_>, out: &mut Vec<CapturedExchange>) -> Handled {
        let header = &event.header;
        let key = (header.tgid, header.fd);
        if let Entry::Occupied(mut entry) = self.connections.entry(key) {
            if entry.get().conn_id == header.conn_id {
                let closed = feed(
                    entry.get_mut(),
                    event,
                    &self.counters,
                    &mut self.finished,
                    Tagged {
                        exchanges: out,
                        losses: &mut self.losses,
                    },
                );
                decide_kernel_side(key, entry.get_mut(), event, &mut self.kernel_filters);
                if closed {
                    let gone = entry.remove();
                    self.partial_heads.forget(key, &gone);
                    self.pending_targets.forget(&gone);
                    self.counters.connections_tracked.dec();
                    self.keep_spare(gone.http);
                } else {
                    let connection = entry.into_mut();
                    self.pending_targets.account(connection);
                    self.pending_targets.enforce(
                        self.max_held.pending_targets,
                        connection,
                        &self.counters,
                    );
                    self.partial_heads.account(key, connection);
                    self.enforce_partial_head_budget();
                }
                return Handled::Done;
            }
            // The fd now belongs to a new connection: the kernel forgot the
            // old one (its close was never reported).
            self.counters.connections_evicted.inc();
            let mut old = entry.remove();
            self.partial_heads.forget(key, &old);
            self.pending_targets.forget(&old);
            self.counters.connections_tracked.dec();
            old.http.on_close(&self.counters.http, &mut self.finished);
            tag(
                header.tgid,
                &mut old,
                &mut self.finished,
                Tagged {
                    exchanges: out,
                    losses: &mut self.losses,
                },
            );
            self.keep_spare(old.http);
        }
        if event.kind == EventKind::Close {
            return Handled::Done;
        }
        Handled::NewConnection(Origin {
            tgid: header.tgid,
            fd: header.fd,
            listen_fd: event.accepted_on(),
            port: event.local_port(),
        })
    }

    /// Starts following the connection `event` opens (see [`Self::handle`])
    /// and feeds it the event. `served_by`: `None` when it is not monitored;
    /// `server_port`: the port it was accepted on, when read.
    pub fn open(
        &mut self,
        event: &RawEvent<'_>,
        served_by: Option<ServedBy>,
        server_port: Option<u16>,
        out: &mut Vec<CapturedExchange>,
    ) {
        let header = &event.header;
        self.counters.connections_opened.inc();
        let accepted_on = event.accepted_on();
        if served_by.is_some()
            && accepted_on.is_some()
            && header.handshake_ns == HANDSHAKE_FORGOTTEN
        {
            self.counters.handshakes_forgotten.inc();
        }
        let mut connection = Connection {
            conn_id: header.conn_id,
            // So that the first event is never taken for a gap.
            last_seq: header.seq.wrapping_sub(1),
            served_by,
            server_port,
            http: self.spare.pop().unwrap_or_default(),
            last_event_ns: header.timestamp_ns,
            partial: None,
            pending_target_bytes: 0,
            listener: accepted_on,
            complete: accepted_on.is_some(),
            server_spoke: false,
            events: 0,
            ignored: false,
            next_offset: [0; 2],
            skip_asked: [None; 2],
            // The kernel knows the handshake's end only for an accept it
            // saw, which is also when the connection's id is the accept's time.
            queued: (accepted_on.is_some()
                && header.handshake_ns > HANDSHAKE_FORGOTTEN
                && header.handshake_ns <= header.conn_id)
                .then_some(Queued {
                    handshake_ns: header.handshake_ns,
                    accepted_ns: header.conn_id,
                }),
        };
        let closed = feed(
            &mut connection,
            event,
            &self.counters,
            &mut self.finished,
            Tagged {
                exchanges: out,
                losses: &mut self.losses,
            },
        );
        let key = (header.tgid, header.fd);
        decide_kernel_side(key, &mut connection, event, &mut self.kernel_filters);
        if !closed {
            self.pending_targets.account(&mut connection);
            self.pending_targets.enforce(
                self.max_held.pending_targets,
                &mut connection,
                &self.counters,
            );
            self.partial_heads.account(key, &mut connection);
            self.connections.insert(key, connection);
            self.counters.connections_tracked.inc();
            self.enforce_partial_head_budget();
        }
    }

    fn keep_spare(&mut self, http: HttpConnection) {
        if self.spare.len() < MAX_SPARE_CONNECTIONS {
            self.spare.push(http.recycle());
        }
    }

    /// The cgroup of the connection `event` opened holds only what is not
    /// monitored: the kernel may ignore every accept in it (learnt at its
    /// listener's next accept; after [`Self::open`] judged the listener).
    pub fn ignore_cgroup(&mut self, event: &RawEvent<'_>) {
        if let Some(listen_fd) = event.accepted_on() {
            self.kernel_filters.push(KernelFilter::IgnoreCgroup {
                tgid: event.header.tgid,
                listen_fd,
            });
        }
    }

    /// Periodic upkeep: ends responses whose framing was lost, forgets
    /// connections of exited processes, long-idle ones, and idle ones the
    /// kernel no longer follows (`kernel_follows(tgid, fd, conn_id)`).
    pub fn reap(
        &mut self,
        now_ns: u64,
        process_alive: &dyn Fn(u32) -> bool,
        kernel_follows: &dyn Fn(u32, u32, u64) -> bool,
        out: &mut Vec<CapturedExchange>,
    ) {
        let mut alive: HashMap<u32, bool> = HashMap::new();
        let counters = &self.counters;
        let partial_heads = &mut self.partial_heads;
        let pending_targets = &mut self.pending_targets;
        let losses = &mut self.losses;
        let mut eviction_checks = 0;
        self.connections.retain(|&key @ (tgid, fd), connection| {
            let process_alive = *alive.entry(tgid).or_insert_with(|| process_alive(tgid));
            let mut exchanges = Vec::new();
            connection.http.expire_unframed(
                now_ns,
                UNFRAMED_RESPONSE_IDLE_NS,
                &counters.http,
                &mut exchanges,
            );
            let idle_ns = now_ns.saturating_sub(connection.last_event_ns);
            let evicted = process_alive
                && idle_ns >= EVICTION_CHECK_IDLE_NS
                && eviction_checks < MAX_EVICTION_CHECKS
                && {
                    eviction_checks += 1;
                    !kernel_follows(tgid, fd, connection.conn_id)
                };
            if evicted {
                counters.connections_evicted.inc();
                debug!(tgid, fd, "the kernel no longer follows this connection");
            }
            let keep = process_alive && idle_ns < IDLE_CONNECTION_NS && !evicted;
            if !keep {
                connection.http.on_close(&counters.http, &mut exchanges);
                partial_heads.forget(key, connection);
                pending_targets.forget(connection);
            }
            tag(
                tgid,
                connection,
                &mut exchanges,
                Tagged {
                    exchanges: out,
                    losses,
                },
            );
            keep
        });
        self.counters
            .connections_tracked
            .set(self.connections.len() as i64);
    }
}

/// Hands one event to its connection's HTTP stage; returns whether the
/// connection closed.
fn feed(
    connection: &mut Connection,
    event: &RawEvent<'_>,
    counters: &StreamCounters,
    exchanges: &mut Vec<Exchange>,
    out: Tagged<'_>,
) -> bool {
    let header = &event.header;
    let expected = connection.last_seq.wrapping_add(1);
    // A repeated seq is two threads racing on one counter, not a loss.
    let lost = header.seq != expected && header.seq != connection.last_seq;
    if lost {
        counters.sequence_gaps.inc();
        connection.complete = false;
        debug!(
            tgid = header.tgid,
            fd = header.fd,
            expected,
            got = header.seq,
            "events lost on connection"
        );
        connection.http.on_gap(&counters.http);
    }
    connection.last_seq = header.seq;
    connection.last_event_ns = header.timestamp_ns;

    let monitored = connection.served_by.is_some();
    let read = event.kind == EventKind::Read;
    if let Some(direction) = direction_of(event.kind) {
        // Bytes between the last event in this direction and this one were
        // moved without being reported: body bytes the kernel was asked to
        // skip (or, after lost events, anything).
        let next_offset = &mut connection.next_offset[direction as usize];
        let unreported = header.offset.wrapping_sub(*next_offset);
        *next_offset = header.offset.wrapping_add(header.byte_count);
        if unreported > 0 {
            if !lost {
                counters.body_bytes_skipped.inc_by(u64::from(unreported));
            }
            let skipped = Segment {
                timestamp_ns: header.timestamp_ns,
                byte_count: u64::from(unreported),
                captured: &[],
            };
            if monitored && read {
                connection.http.on_read(skipped, &counters.http);
            } else if monitored {
                connection.http.on_write(skipped, &counters.http, exchanges);
            }
        }
    }
    let segment = Segment {
        timestamp_ns: header.timestamp_ns,
        byte_count: u64::from(header.byte_count),
        captured: event.data,
    };
    match event.kind {
        EventKind::Read if monitored => connection.http.on_read(segment, &counters.http),
        EventKind::Write if monitored => {
            connection.http.on_write(segment, &counters.http, exchanges)
        }
        EventKind::WriteFailed if monitored => {
            connection
                .http
                .on_write_failed(segment, &counters.http, exchanges)
        }
        EventKind::Close => connection.http.on_close(&counters.http, exchanges),
        _ => {}
    }
    tag(event.header.tgid, connection, exchanges, out);
    event.kind == EventKind::Close
}

/// The stream direction of an event's bytes ([`DIRECTION_READ`],
/// [`DIRECTION_WRITE`]); `None` for a close.
fn direction_of(kind: EventKind) -> Option<u32> {
    match kind {
        EventKind::Read => Some(DIRECTION_READ),
        EventKind::Write | EventKind::WriteFailed => Some(DIRECTION_WRITE),
        EventKind::Close | EventKind::Heartbeat | EventKind::ProcessExit => None,
    }
}

/// What the kernel side should do differently for `connection` after
/// `event`: stop following it or its listener, or skip a body.
fn decide_kernel_side(
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
fn ask_to_skip_body(
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
fn decide_kernel_filter(
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
fn hear_the_server(
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

/// Where a connection's exchanges and lost requests go, tagged with whom
/// it is served by.
struct Tagged<'a> {
    exchanges: &'a mut Vec<CapturedExchange>,
    losses: &'a mut Vec<(ServedBy, LostRequests)>,
}

/// Moves a connection's exchanges, and requests it lost, to `out` with whom
/// it is served by; the first exchange carries the connection's wait to be
/// accepted.
fn tag(tgid: u32, connection: &mut Connection, exchanges: &mut Vec<Exchange>, out: Tagged<'_>) {
    if let Some(first) = exchanges.first_mut()
        && let Some(queued) = connection.queued.take()
    {
        first.queued = Some(queued);
    }
    let lost = connection.http.take_lost();
    if !lost.is_empty()
        && let Some(served_by) = &connection.served_by
    {
        out.losses.push((served_by.clone(), lost));
    }
    match &connection.served_by {
        Some(served_by) => {
            out.exchanges
                .extend(exchanges.drain(..).map(|exchange| CapturedExchange {
                    served_by: served_by.clone(),
                    tgid,
                    exchange: Exchange {
                        server_port: connection.server_port,
                        ..exchange
                    },
                }))
        }
        None => exchanges.clear(),
    }
}

#[cfg(test)]
mod tests;
