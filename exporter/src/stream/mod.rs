//! Per-connection reassembly: routes each kernel event to the connection it
//! belongs to (keyed by tgid, fd and generation), notices lost events from
//! sequence gaps, and hands bytes in order to the HTTP stage. What the
//! kernel side should stop following is decided in `kernel_side.rs`; the
//! node-wide budgets of held bytes are in `held_bytes.rs`.

mod counters;
mod held_bytes;
mod kernel_side;

pub use self::counters::StreamCounters;
pub use self::held_bytes::{HeldBytes, MAX_PARTIAL_HEAD_BYTES, MAX_PENDING_TARGET_BYTES};
use self::held_bytes::{PartialHeads, PendingTargets};
use self::kernel_side::{decide_kernel_side, direction_of};

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    sync::Arc,
};

use exporter_common::{EventKind, HANDSHAKE_FORGOTTEN};
use tracing::debug;

use crate::{
    capture::{KernelFilter, RawEvent},
    exchange::{CapturedExchange, Exchange, LostRequests, Origin, Queued, ServedBy, ServerSlot},
    http::{HttpConnection, Segment},
};

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
/// Forgotten handshakes waiting for their server's lookup, at most; past
/// it one counts at once, monitored or not.
const MAX_FORGOTTEN_AWAITING_LOOKUP: usize = 1024;

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

/// What [`ConnectionTable::handle`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Done,
    /// The event opens a connection the table does not know: find whom it
    /// is served by and hand the event to [`ConnectionTable::open`].
    NewConnection(Origin),
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
    /// Servers being looked up (local mode) that had a connection whose
    /// handshake the kernel forgot: it counts once the answer says the
    /// server is monitored ([`Self::settle_forgotten_handshakes`]).
    forgotten_awaiting_lookup: Vec<Arc<ServerSlot>>,
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
            forgotten_awaiting_lookup: Vec::new(),
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

    /// Counts a connection whose handshake the kernel forgot, if its server
    /// is monitored: at once when that is known, else when its lookup
    /// answers.
    fn forgotten_handshake(&mut self, served_by: Option<&ServedBy>) {
        match served_by {
            None => {}
            Some(ServedBy::PendingServer(slot)) => {
                if self.forgotten_awaiting_lookup.len() < MAX_FORGOTTEN_AWAITING_LOOKUP {
                    self.forgotten_awaiting_lookup.push(slot.clone());
                } else {
                    self.counters.forgotten_handshakes_budget.inc();
                    self.counters.handshakes_forgotten.inc();
                }
            }
            Some(_) => self.counters.handshakes_forgotten.inc(),
        }
    }

    /// Counts the forgotten handshakes of servers whose lookups answered
    /// that they are monitored; drops those of servers left out, and of
    /// lookups no one can answer any more (refused, and their connections
    /// gone).
    pub fn settle_forgotten_handshakes(&mut self) {
        let counter = &self.counters.handshakes_forgotten;
        self.forgotten_awaiting_lookup
            .retain(|slot| match slot.get() {
                Some(Some(_)) => {
                    counter.inc();
                    false
                }
                Some(None) => false,
                None => Arc::strong_count(slot) > 1,
            });
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
        if accepted_on.is_some() && header.handshake_ns == HANDSHAKE_FORGOTTEN {
            self.forgotten_handshake(served_by.as_ref());
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
