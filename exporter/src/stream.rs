//! Per-connection reassembly: routes each kernel event to the connection it
//! belongs to (keyed by tgid, fd and generation), notices lost events from
//! sequence gaps, and hands bytes in order to the HTTP stage.

use std::collections::{BTreeMap, BTreeSet, HashMap, hash_map::Entry};

use exporter_common::EventKind;
use prometheus::{IntCounter, IntGauge, Registry};
use tracing::debug;

use crate::{
    capture::{IgnoreReason, KernelFilter, RawEvent},
    exchange::{CapturedExchange, Exchange, Origin, ServedBy},
    http::{HttpConnection, HttpCounters, Segment},
    metrics::{Budgets, counter, gauge},
};

/// Bytes all connections together may hold of heads not complete yet;
/// beyond it the oldest are given up first.
pub const MAX_PARTIAL_HEAD_BYTES: usize = 16 * 1024 * 1024;

/// A connection idle this long is forgotten (its close was lost).
const IDLE_CONNECTION_NS: u64 = 15 * 60 * 1_000_000_000;
/// A response whose framing was lost ends after this long without writes.
const UNFRAMED_RESPONSE_IDLE_NS: u64 = 5 * 1_000_000_000;
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
    http: HttpConnection,
    last_event_ns: u64,
    /// Its entry in the table's partial-head index, while it holds one:
    /// (bytes, when the oldest began).
    partial: Option<(usize, u64)>,
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
}

/// What this stage and the HTTP stage under it count. The stage owns these
/// counters: `/metrics` and `/debug/connections` read them as they are.
#[derive(Clone, Debug)]
pub struct StreamCounters {
    pub connections_opened: IntCounter,
    pub sequence_gaps: IntCounter,
    pub connections_tracked: IntGauge,
    /// Partial heads given up to stay within [`MAX_PARTIAL_HEAD_BYTES`].
    pub partial_head_budget: IntCounter,
    pub http: HttpCounters,
}

impl StreamCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        Ok(StreamCounters {
            partial_head_budget: budgets.counter("partial_head_bytes"),
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

#[derive(Debug)]
pub struct ConnectionTable {
    connections: HashMap<(u32, u32), Connection>,
    counters: StreamCounters,
    partial_heads: PartialHeads,
    max_partial_head_bytes: usize,
    /// Decisions for the kernel side, until the pipeline takes them.
    kernel_filters: Vec<KernelFilter>,
    /// Exchanges one event finished, before they are tagged (kept so that
    /// handling an event allocates nothing).
    finished: Vec<Exchange>,
}

impl ConnectionTable {
    pub fn new(counters: StreamCounters) -> Self {
        Self::with_partial_head_budget(counters, MAX_PARTIAL_HEAD_BYTES)
    }

    /// A table whose connections hold at most `max_partial_head_bytes` of
    /// heads not complete yet, all together.
    pub fn with_partial_head_budget(
        counters: StreamCounters,
        max_partial_head_bytes: usize,
    ) -> Self {
        ConnectionTable {
            connections: HashMap::new(),
            counters,
            partial_heads: PartialHeads::default(),
            max_partial_head_bytes,
            kernel_filters: Vec::new(),
            finished: Vec::new(),
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

    /// Gives up the oldest partial heads until the rest fit the budget.
    fn enforce_partial_head_budget(&mut self) {
        while self.partial_heads.bytes > self.max_partial_head_bytes {
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
                    out,
                );
                decide_kernel_filter(key, entry.get_mut(), event, &mut self.kernel_filters);
                if closed {
                    let gone = entry.remove();
                    self.partial_heads.forget(key, &gone);
                    self.counters.connections_tracked.dec();
                } else {
                    self.partial_heads.account(key, entry.get_mut());
                    self.enforce_partial_head_budget();
                }
                return Handled::Done;
            }
            // The fd now belongs to a new connection: the old one's close was lost.
            let mut old = entry.remove();
            self.partial_heads.forget(key, &old);
            self.counters.connections_tracked.dec();
            old.http.on_close(&self.counters.http, &mut self.finished);
            tag(&old, &mut self.finished, out);
        }
        if event.kind == EventKind::Close {
            return Handled::Done;
        }
        Handled::NewConnection(Origin {
            tgid: header.tgid,
            fd: header.fd,
            listen_fd: event.accepted_on(),
        })
    }

    /// Starts following the connection `event` opens (see [`Self::handle`])
    /// and feeds it the event. `served_by`: `None` when it is not monitored.
    pub fn open(
        &mut self,
        event: &RawEvent<'_>,
        served_by: Option<ServedBy>,
        out: &mut Vec<CapturedExchange>,
    ) {
        let header = &event.header;
        self.counters.connections_opened.inc();
        let accepted_on = event.accepted_on();
        let mut connection = Connection {
            conn_id: header.conn_id,
            // So that the first event is never taken for a gap.
            last_seq: header.seq.wrapping_sub(1),
            served_by,
            http: HttpConnection::new(),
            last_event_ns: header.timestamp_ns,
            partial: None,
            listener: accepted_on,
            complete: accepted_on.is_some(),
            server_spoke: false,
            events: 0,
            ignored: false,
        };
        let closed = feed(
            &mut connection,
            event,
            &self.counters,
            &mut self.finished,
            out,
        );
        let key = (header.tgid, header.fd);
        decide_kernel_filter(key, &mut connection, event, &mut self.kernel_filters);
        if !closed {
            self.partial_heads.account(key, &mut connection);
            self.connections.insert(key, connection);
            self.counters.connections_tracked.inc();
            self.enforce_partial_head_budget();
        }
    }

    /// Periodic upkeep: ends responses whose framing was lost, forgets
    /// connections of exited processes and long-idle ones.
    pub fn reap(
        &mut self,
        now_ns: u64,
        process_alive: &dyn Fn(u32) -> bool,
        out: &mut Vec<CapturedExchange>,
    ) {
        let mut alive: HashMap<u32, bool> = HashMap::new();
        let counters = &self.counters;
        let partial_heads = &mut self.partial_heads;
        self.connections.retain(|&key @ (tgid, _), connection| {
            let process_alive = *alive.entry(tgid).or_insert_with(|| process_alive(tgid));
            let mut exchanges = Vec::new();
            connection.http.expire_unframed(
                now_ns,
                UNFRAMED_RESPONSE_IDLE_NS,
                &counters.http,
                &mut exchanges,
            );
            let idle = now_ns.saturating_sub(connection.last_event_ns) >= IDLE_CONNECTION_NS;
            let keep = process_alive && !idle;
            if !keep {
                connection.http.on_close(&counters.http, &mut exchanges);
                partial_heads.forget(key, connection);
            }
            tag(connection, &mut exchanges, out);
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
    out: &mut Vec<CapturedExchange>,
) -> bool {
    let header = &event.header;
    let expected = connection.last_seq.wrapping_add(1);
    // A repeated seq is two threads racing on one counter, not a loss.
    if header.seq != expected && header.seq != connection.last_seq {
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

    let segment = Segment {
        timestamp_ns: header.timestamp_ns,
        byte_count: header.byte_count,
        captured: event.data,
    };
    let monitored = connection.served_by.is_some();
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
    tag(connection, exchanges, out);
    event.kind == EventKind::Close
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

/// Moves a connection's exchanges to `out` with whom it is served by.
fn tag(connection: &Connection, exchanges: &mut Vec<Exchange>, out: &mut Vec<CapturedExchange>) {
    match &connection.served_by {
        Some(served_by) => out.extend(exchanges.drain(..).map(|exchange| CapturedExchange {
            served_by: served_by.clone(),
            exchange,
        })),
        None => exchanges.clear(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use exporter_common::EventHeader;

    use super::*;
    use crate::exchange::{Identity, IdentityLabels};

    const OK_EMPTY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    /// An event on fd 7 of tgid 100: (kind, connection generation, seq, bytes).
    type Step<'a> = (EventKind, u64, u32, &'a [u8]);

    /// Feeds the events as the pipeline does, with `resolve` naming whom
    /// each new connection is served by.
    fn feed(
        table: &mut ConnectionTable,
        resolve: &dyn Fn(&Origin) -> Option<ServedBy>,
        steps: &[Step<'_>],
        out: &mut Vec<CapturedExchange>,
    ) {
        for &(kind, conn_id, seq, data) in steps {
            let event = RawEvent {
                kind,
                header: EventHeader {
                    kind: kind as u32,
                    tgid: 100,
                    fd: 7,
                    seq,
                    conn_id,
                    timestamp_ns: conn_id * 1000 + u64::from(seq),
                    byte_count: data.len() as u64,
                    captured_len: data.len() as u32,
                    // seq 1: the first event after an accept, which says
                    // where (LISTENER, + 1); others say nothing.
                    aux: if seq == 1 { LISTENER + 1 } else { 0 },
                },
                data,
            };
            if let Handled::NewConnection(origin) = table.handle(&event, out) {
                table.open(&event, resolve(&origin), out);
            }
        }
    }

    fn server(port: &str) -> ServedBy {
        ServedBy::Server(Arc::new(Identity::new(IdentityLabels::Server {
            process: "python".to_owned(),
            port: port.to_owned(),
        })))
    }

    /// Names the server after the listening fd the connection came from.
    fn labels(origin: &Origin) -> Option<ServedBy> {
        Some(server(&format!("listen{:?}", origin.listen_fd)))
    }

    fn counters() -> StreamCounters {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        StreamCounters::register(&registry, &budgets).expect("counters")
    }

    fn table() -> ConnectionTable {
        ConnectionTable::new(counters())
    }

    #[test]
    fn reused_fd_is_a_new_connection_and_gaps_are_noticed() {
        let mut table = table();
        let mut out = Vec::new();
        feed(
            &mut table,
            &labels,
            &[
                (EventKind::Read, 1, 1, b"GET /a HTTP/1.0\r\n\r\n"),
                // The old connection's close was lost; fd 7 is reused by
                // connection 2, picked up mid-stream (no accept seen).
                (EventKind::Read, 2, 0, b"GET /b HTTP/1.1\r\n\r\n"),
                (EventKind::Write, 2, 1, OK_EMPTY),
            ],
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].exchange.target, "/b");
        assert_eq!(out[0].served_by, server("listenNone"));
        assert_eq!(table.counters().http.abandoned_requests.get(), 1);
        // seq 5 after 1: events 2..4 were lost.
        feed(
            &mut table,
            &labels,
            &[(EventKind::Read, 2, 5, b"GET /c HTTP/1.1\r\n\r\n")],
            &mut out,
        );
        assert_eq!(table.counters().sequence_gaps.get(), 1);
        feed(
            &mut table,
            &labels,
            &[(EventKind::Close, 2, 6, b"")],
            &mut out,
        );
        assert!(table.is_empty());
        assert_eq!(table.counters().connections_opened.get(), 2);
    }

    #[test]
    fn excluded_connections_produce_nothing() {
        let mut table = table();
        let mut out = Vec::new();
        feed(
            &mut table,
            &|_| None,
            &[
                (EventKind::Read, 1, 0, b"GET /a HTTP/1.1\r\n\r\n"),
                (EventKind::Write, 1, 1, OK_EMPTY),
            ],
            &mut out,
        );
        assert!(out.is_empty());
    }

    /// What the table decided for the kernel while fed `steps`.
    fn kernel_filters(
        resolve: &dyn Fn(&Origin) -> Option<ServedBy>,
        steps: &[Step<'_>],
    ) -> Vec<KernelFilter> {
        let mut table = table();
        feed(&mut table, resolve, steps, &mut Vec::new());
        table.take_kernel_filters().collect()
    }

    const LISTENER: u32 = 3;

    fn ignore_connection(conn_id: u64, reason: IgnoreReason) -> KernelFilter {
        KernelFilter::IgnoreConnection {
            tgid: 100,
            fd: 7,
            conn_id,
            reason,
        }
    }

    fn listener(ignore: Option<IgnoreReason>) -> KernelFilter {
        KernelFilter::Listener {
            tgid: 100,
            listen_fd: LISTENER,
            ignore,
        }
    }

    #[test]
    fn a_listener_is_judged_by_what_its_server_writes() {
        // Redis: the client's bytes are not HTTP, nor is the answer.
        let redis = kernel_filters(
            &labels,
            &[
                (EventKind::Read, 1, 1, b"*1\r\n$4\r\nPING\r\n"),
                (EventKind::Write, 1, 2, b"+PONG\r\n"),
                (EventKind::Read, 1, 3, b"*1\r\n$4\r\nPING\r\n"),
            ],
        );
        assert_eq!(
            redis,
            [
                listener(Some(IgnoreReason::NotHttp)),
                ignore_connection(1, IgnoreReason::NotHttp)
            ]
        );
        // A Flask server answers a client's garbage with HTTP: the listener
        // stays followed; only that connection is not HTTP.
        let flask = kernel_filters(
            &labels,
            &[
                (EventKind::Read, 1, 1, b"\x16\x03\x01\x02\x00\x01\x00\r\n"),
                (EventKind::Write, 1, 2, b"HTTP/1.1 400 Bad Request\r\n\r\n"),
            ],
        );
        assert_eq!(
            flask,
            [listener(None), ignore_connection(1, IgnoreReason::NotHttp)]
        );
        // HTTP both ways: nothing to ignore, the listener speaks HTTP.
        let http = kernel_filters(
            &labels,
            &[
                (EventKind::Read, 1, 1, b"GET /a HTTP/1.1\r\n\r\n"),
                (EventKind::Write, 1, 2, OK_EMPTY),
            ],
        );
        assert_eq!(http, [listener(None)]);
    }

    #[test]
    fn only_a_complete_connection_judges_its_listener() {
        // Events were lost before the first write seen: it may be a body.
        let after_gap = kernel_filters(
            &labels,
            &[
                (EventKind::Read, 1, 1, b"GET /a HTTP/1.1\r\n\r\n"),
                (EventKind::Write, 1, 5, b"binary body bytes"),
            ],
        );
        assert!(after_gap.is_empty(), "{after_gap:?}");
        // Picked up mid-stream: no listener known, nothing judged.
        let mid_stream = kernel_filters(
            &labels,
            &[
                (EventKind::Read, 1, 4, b"GET /a HTTP/1.1\r\n\r\n"),
                (EventKind::Write, 1, 5, OK_EMPTY),
            ],
        );
        assert!(mid_stream.is_empty(), "{mid_stream:?}");
        // The first write's bytes could not be copied: the next write may
        // be a body, so nothing is judged.
        let uncopied = kernel_filters(
            &labels,
            &[
                (EventKind::Read, 1, 1, b"GET /a HTTP/1.1\r\n\r\n"),
                (EventKind::Write, 1, 2, b""),
                (EventKind::Write, 1, 3, b"binary body bytes"),
            ],
        );
        assert!(uncopied.is_empty(), "{uncopied:?}");
        // A client whose server never answers is followed for a while.
        let garbage: Vec<Step<'_>> = (1..=8)
            .map(|seq| (EventKind::Read, 1, seq, &b"\x00\x01garbage"[..]))
            .collect();
        assert_eq!(
            kernel_filters(&labels, &garbage),
            [ignore_connection(1, IgnoreReason::NotHttp)]
        );
    }

    #[test]
    fn unmonitored_connections_and_their_listener_are_ignored_at_once() {
        let filters = kernel_filters(
            &|_| None,
            &[(EventKind::Read, 1, 1, b"GET /a HTTP/1.1\r\n\r\n")],
        );
        assert_eq!(
            filters,
            [
                listener(Some(IgnoreReason::Unmonitored)),
                ignore_connection(1, IgnoreReason::Unmonitored)
            ]
        );
    }

    #[test]
    fn connections_of_exited_processes_are_reaped() {
        let mut table = table();
        let mut out = Vec::new();
        feed(
            &mut table,
            &labels,
            &[
                (EventKind::Read, 1, 0, b"GET /a HTTP/1.0\r\n\r\n"),
                (EventKind::Write, 1, 1, b"HTTP/1.0 200 OK\r\n\r\nbody"),
            ],
            &mut out,
        );
        let asked = std::cell::RefCell::new(Vec::new());
        table.reap(
            3_000,
            &|tgid| {
                asked.borrow_mut().push(tgid);
                false
            },
            &mut out,
        );
        // One liveness check for the process, whose connection is gone.
        assert_eq!(asked.into_inner(), vec![100]);
        assert!(table.is_empty());
        // The close-delimited response ended with the process.
        assert_eq!(out.len(), 1);
    }

    /// An event of connection 1 on `fd` of tgid 200.
    fn event_on(fd: u32, kind: EventKind, seq: u32, data: &[u8]) -> RawEvent<'_> {
        RawEvent {
            kind,
            header: EventHeader {
                kind: kind as u32,
                tgid: 200,
                fd,
                seq,
                conn_id: 1,
                timestamp_ns: 10 + u64::from(fd) + u64::from(seq),
                byte_count: data.len() as u64,
                captured_len: data.len() as u32,
                aux: 0,
            },
            data,
        }
    }

    #[test]
    fn partial_heads_stay_within_their_budget_oldest_given_up_first() {
        let mut table = ConnectionTable::with_partial_head_budget(counters(), 1000);
        let mut out = Vec::new();
        let head_start = |n: u64| format!("GET /r{n} HTTP/1.1\r\nCookie: {}", "c".repeat(300));
        for fd in 0..5u32 {
            let data = head_start(u64::from(fd));
            let event = event_on(fd, EventKind::Read, 0, data.as_bytes());
            if let Handled::NewConnection(origin) = table.handle(&event, &mut out) {
                table.open(&event, labels(&origin), &mut out);
            }
            assert!(
                table.partial_head_bytes() <= 1000,
                "{}",
                table.partial_head_bytes()
            );
        }
        // Five heads of ~330 bytes: the two oldest were given up.
        assert_eq!(table.counters().partial_head_budget.get(), 2);
        assert_eq!(table.partial_head_bytes(), 3 * head_start(0).len());
        // A given-up head keeps its request line: the exchange still pairs.
        let event = event_on(0, EventKind::Write, 1, OK_EMPTY);
        assert_eq!(table.handle(&event, &mut out), Handled::Done);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].exchange.target, "/r0");
        // Closing the others releases what they held.
        for fd in 1..5u32 {
            table.handle(&event_on(fd, EventKind::Close, 1, b""), &mut out);
        }
        assert_eq!(table.partial_head_bytes(), 0);
    }
}
