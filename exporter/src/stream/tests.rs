use std::sync::Arc;

use exporter_common::{DIRECTION_READ, DIRECTION_WRITE, EventHeader};
use prometheus::Registry;
use proptest::prelude::*;

use super::*;
use crate::{
    capture::IgnoreReason,
    exchange::{Identity, IdentityLabels},
    telemetry::Budgets,
};

const OK_EMPTY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// An event on fd 7 of tgid 100: (kind, connection generation, seq, bytes).
type Step<'a> = (EventKind, u64, u32, &'a [u8]);

/// Feeds the events as the pipeline does, with `resolve` naming whom
/// each new connection is served by. Stream offsets are counted as the
/// kernel does, from the steps of this call.
fn feed(
    table: &mut ConnectionTable,
    resolve: &dyn Fn(&Origin) -> Option<ServedBy>,
    steps: &[Step<'_>],
    out: &mut Vec<CapturedExchange>,
) {
    let mut offsets: HashMap<(u64, Option<u32>), u32> = HashMap::new();
    for &(kind, conn_id, seq, data) in steps {
        let offset = offsets.entry((conn_id, direction_of(kind))).or_default();
        let event = event_at(kind, conn_id, seq, *offset, data.len() as u32, data);
        *offset += data.len() as u32;
        handle(table, resolve, &event, out);
    }
}

/// An event on fd 7 of tgid 100 whose `byte_count` bytes begin at
/// stream offset `offset`, and begin with `data`.
fn event_at(
    kind: EventKind,
    conn_id: u64,
    seq: u32,
    offset: u32,
    byte_count: u32,
    data: &[u8],
) -> RawEvent<'_> {
    RawEvent {
        kind,
        header: EventHeader {
            kind: kind as u32,
            tgid: 100,
            fd: 7,
            seq,
            conn_id,
            timestamp_ns: conn_id * 1000 + u64::from(seq),
            byte_count,
            offset,
            captured_len: data.len() as u32,
            // seq 1: the first event after an accept, which says
            // where (LISTENER, + 1); others say nothing.
            aux: if seq == 1 { LISTENER + 1 } else { 0 },
            handshake_ns: 0,
            local_port: 0,
            _pad: 0,
        },
        data,
    }
}

fn handle(
    table: &mut ConnectionTable,
    resolve: &dyn Fn(&Origin) -> Option<ServedBy>,
    event: &RawEvent<'_>,
    out: &mut Vec<CapturedExchange>,
) {
    if let Handled::NewConnection(origin) = table.handle(event, out) {
        table.open(event, resolve(&origin), None, out);
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
    assert_eq!(table.counters().connections_evicted.get(), 1);
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

/// A forgotten handshake counts for a monitored server only: at once when
/// its server is known, when the lookup answers for one being looked up,
/// and never for one the answer leaves out.
#[test]
fn forgotten_handshakes_count_for_monitored_servers_once_known() {
    let mut table = table();
    let mut out = Vec::new();
    let slots: Vec<Arc<ServerSlot>> = (0..3).map(|_| Arc::default()).collect();
    let served: [Option<ServedBy>; 5] = [
        Some(server("8000")),
        None,
        Some(ServedBy::PendingServer(slots[0].clone())),
        Some(ServedBy::PendingServer(slots[1].clone())),
        Some(ServedBy::PendingServer(slots[2].clone())),
    ];
    for (conn_id, served_by) in (1..).zip(served) {
        let mut event = event_at(EventKind::Read, conn_id, 1, 0, 4, b"GET ");
        event.header.handshake_ns = HANDSHAKE_FORGOTTEN;
        if let Handled::NewConnection(_) = table.handle(&event, &mut out) {
            table.open(&event, served_by, None, &mut out);
        }
    }
    let counter = table.counters.handshakes_forgotten.clone();
    let forgotten = || counter.get();
    assert_eq!(forgotten(), 1, "the known server's");
    slots[0].fill(Some(Arc::new(Identity::new(
        IdentityLabels::unknown_server(),
    ))));
    slots[1].fill(None);
    table.settle_forgotten_handshakes();
    assert_eq!(forgotten(), 2, "and the one the lookup found monitored");
    assert_eq!(table.forgotten_awaiting_lookup.len(), 1, "one still asked");
    slots[2].fill(None);
    table.settle_forgotten_handshakes();
    assert_eq!(forgotten(), 2);
    assert!(table.forgotten_awaiting_lookup.is_empty());
    // Past the bound one counts at once, and the budget says so.
    let pending = ServedBy::PendingServer(Arc::default());
    for _ in 0..MAX_FORGOTTEN_AWAITING_LOOKUP + 1 {
        table.forgotten_handshake(Some(&pending));
    }
    assert_eq!(forgotten(), 3);
    assert_eq!(table.counters.forgotten_handshakes_budget.get(), 1);
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
        &|_, _, _| panic!("an exited process's connections need no kernel lookup"),
        &mut out,
    );
    // One liveness check for the process, whose connection is gone.
    assert_eq!(asked.into_inner(), vec![100]);
    assert!(table.is_empty());
    // The close-delimited response ended with the process.
    assert_eq!(out.len(), 1);
}

#[test]
fn idle_connections_the_kernel_lost_are_counted_and_let_go() {
    let mut table = table();
    let mut out = Vec::new();
    for fd in [7, 8] {
        let event = event_on(fd, EventKind::Read, 1, b"GET /a HTTP/1.1\r\n\r\n");
        handle(&mut table, &labels, &event, &mut out);
    }
    let second = 1_000_000_000;
    // Active a moment ago: not looked up.
    table.reap(second, &|_| true, &|_, _, _| panic!("looked up"), &mut out);
    assert_eq!(table.len(), 2);
    // Idle 6 s: looked up; the kernel still holds fd 8's only.
    let looked_up = std::cell::RefCell::new(Vec::new());
    table.reap(
        6 * second,
        &|_| true,
        &|tgid, fd, conn_id| {
            looked_up.borrow_mut().push((tgid, fd, conn_id));
            fd == 8
        },
        &mut out,
    );
    let mut looked_up = looked_up.into_inner();
    looked_up.sort_unstable();
    assert_eq!(looked_up, vec![(200, 7, 1), (200, 8, 1)]);
    assert_eq!(table.counters().connections_evicted.get(), 1);
    assert_eq!(table.len(), 1);
    // Its request can never be answered as far as this side knows.
    assert_eq!(table.counters().http.abandoned_requests.get(), 1);
}

#[test]
fn a_long_body_is_skipped_in_the_kernel_and_counted_from_the_offsets() {
    let mut table = table();
    let mut out = Vec::new();
    let request = b"GET /big HTTP/1.1\r\n\r\n";
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
    let head_len = head.len() as u32;
    let first = [&head[..], &[b'x'; 4096]].concat();
    handle(
        &mut table,
        &labels,
        &event_at(EventKind::Read, 1, 1, 0, request.len() as u32, request),
        &mut out,
    );
    handle(
        &mut table,
        &labels,
        &event_at(EventKind::Write, 1, 2, 0, first.len() as u32, &first),
        &mut out,
    );
    let body_end = head_len + 100_000;
    let skips: Vec<_> = table
        .take_kernel_filters()
        .filter(|filter| matches!(filter, KernelFilter::SkipBody { .. }))
        .collect();
    assert_eq!(
        skips,
        vec![KernelFilter::SkipBody {
            tgid: 100,
            fd: 7,
            conn_id: 1,
            direction: DIRECTION_WRITE,
            until: body_end,
        }]
    );
    // One more write was reported before the kernel got the request;
    // asking again would ask the same.
    handle(
        &mut table,
        &labels,
        &event_at(EventKind::Write, 1, 3, first.len() as u32, 8192, b""),
        &mut out,
    );
    assert_eq!(table.take_kernel_filters().count(), 0);
    assert!(out.is_empty());
    // Then writes went by unreported, up to the one that ended the body:
    // it is reported from the body's end on (nothing after it here).
    handle(
        &mut table,
        &labels,
        &event_at(EventKind::Write, 1, 4, body_end, 0, b""),
        &mut out,
    );
    assert_eq!(out.len(), 1, "the response ended with the body");
    assert_eq!(out[0].exchange.status, 200);
    assert_eq!(out[0].exchange.response_bytes, u64::from(body_end));
    assert_eq!(
        table.counters().body_bytes_skipped.get(),
        u64::from(body_end) - first.len() as u64 - 8192
    );
    // The next exchange on the connection pairs as usual.
    let next = b"GET /next HTTP/1.1\r\n\r\n";
    handle(
        &mut table,
        &labels,
        &event_at(
            EventKind::Read,
            1,
            5,
            request.len() as u32,
            next.len() as u32,
            next,
        ),
        &mut out,
    );
    handle(
        &mut table,
        &labels,
        &event_at(
            EventKind::Write,
            1,
            6,
            body_end,
            OK_EMPTY.len() as u32,
            OK_EMPTY,
        ),
        &mut out,
    );
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].exchange.target, "/next");
}

#[test]
fn a_skipped_request_body_ends_where_the_next_pipelined_request_is_copied() {
    let mut table = table();
    let mut out = Vec::new();
    let upload = b"POST /upload HTTP/1.1\r\nContent-Length: 50000\r\n\r\n";
    let body_end = upload.len() as u32 + 50_000;
    handle(
        &mut table,
        &labels,
        &event_at(EventKind::Read, 1, 1, 0, upload.len() as u32, upload),
        &mut out,
    );
    let asked: Vec<_> = table.take_kernel_filters().collect();
    assert_eq!(
        asked,
        vec![KernelFilter::SkipBody {
            tgid: 100,
            fd: 7,
            conn_id: 1,
            direction: DIRECTION_READ,
            until: body_end,
        }]
    );
    // The read that ended the body also held the next request: the
    // kernel reports (and copies) from the body's end.
    let next = b"GET /after HTTP/1.1\r\n\r\n";
    handle(
        &mut table,
        &labels,
        &event_at(EventKind::Read, 1, 2, body_end, next.len() as u32, next),
        &mut out,
    );
    for (seq, offset) in [(3, 0), (4, OK_EMPTY.len() as u32)] {
        handle(
            &mut table,
            &labels,
            &event_at(
                EventKind::Write,
                1,
                seq,
                offset,
                OK_EMPTY.len() as u32,
                OK_EMPTY,
            ),
            &mut out,
        );
    }
    let targets: Vec<_> = out.iter().map(|c| c.exchange.target.as_str()).collect();
    assert_eq!(targets, ["/upload", "/after"]);
    assert_eq!(out[0].exchange.request_bytes, u64::from(body_end));
}

#[test]
fn short_bodies_and_unknown_ends_are_not_skipped() {
    let filters = kernel_filters(
        &labels,
        &[
            (
                EventKind::Read,
                1,
                1,
                b"POST /a HTTP/1.1\r\nContent-Length: 1000\r\n\r\n",
            ),
            (
                EventKind::Write,
                1,
                2,
                b"HTTP/1.0 200 OK\r\n\r\nuntil close",
            ),
        ],
    );
    assert!(
        !filters
            .iter()
            .any(|filter| matches!(filter, KernelFilter::SkipBody { .. })),
        "{filters:?}"
    );
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
            byte_count: data.len() as u32,
            offset: 0,
            captured_len: data.len() as u32,
            aux: 0,
            handshake_ns: 0,
            local_port: 0,
            _pad: 0,
        },
        data,
    }
}

#[test]
fn partial_heads_stay_within_their_budget_oldest_given_up_first() {
    let mut table = ConnectionTable::holding_at_most(
        counters(),
        HeldBytes {
            partial_heads: 1000,
            ..HeldBytes::default()
        },
    );
    let mut out = Vec::new();
    let head_start = |n: u64| format!("GET /r{n} HTTP/1.1\r\nCookie: {}", "c".repeat(300));
    for fd in 0..5u32 {
        let data = head_start(u64::from(fd));
        let event = event_on(fd, EventKind::Read, 0, data.as_bytes());
        if let Handled::NewConnection(origin) = table.handle(&event, &mut out) {
            table.open(&event, labels(&origin), None, &mut out);
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

/// Requests pipelined with long targets on connections whose server has
/// not answered: their targets stay within the node-wide budget, the
/// connection that goes over gives up its oldest (counted), and every
/// response still pairs with its own request.
#[test]
fn waiting_requests_targets_stay_within_their_budget() {
    let mut table = ConnectionTable::holding_at_most(
        counters(),
        HeldBytes {
            pending_targets: 10_000,
            ..HeldBytes::default()
        },
    );
    let mut out = Vec::new();
    let request = |n: usize| format!("GET /r{n}/{} HTTP/1.1\r\n\r\n", "t".repeat(3000));
    let target_len = request(0).find(" HTTP").expect("target") - 4;
    // fd 1 holds one waiting request; fd 2 pipelines five.
    let first = request(0);
    let event = event_on(1, EventKind::Read, 0, first.as_bytes());
    if let Handled::NewConnection(origin) = table.handle(&event, &mut out) {
        table.open(&event, labels(&origin), None, &mut out);
    }
    let pipelined: String = (1..=5).map(request).collect();
    let (mut seq, mut offset) = (0, 0);
    for piece in pipelined.as_bytes().chunks(request(1).len()) {
        let mut event = event_on(2, EventKind::Read, seq, piece);
        event.header.offset = offset;
        if let Handled::NewConnection(origin) = table.handle(&event, &mut out) {
            table.open(&event, labels(&origin), None, &mut out);
        }
        seq += 1;
        offset += piece.len() as u32;
        assert!(
            table.pending_target_bytes() <= 10_000,
            "{}",
            table.pending_target_bytes()
        );
    }
    // Six targets of ~3 KiB in 10,000 bytes: fd 2 gave up its three oldest.
    assert_eq!(table.counters().pending_target_budget.get(), 3);
    assert_eq!(table.counters().http.abandoned_requests.get(), 3);
    assert_eq!(table.pending_target_bytes(), 3 * target_len);
    // Five answers on fd 2: the three given up make no exchange, the last
    // two pair with their own requests; fd 1's request kept its target.
    let mut written = 0;
    for n in 0..5 {
        let answer = format!("HTTP/1.1 20{n} OK\r\nContent-Length: 0\r\n\r\n");
        let mut event = event_on(2, EventKind::Write, seq + n, answer.as_bytes());
        event.header.offset = written;
        written += answer.len() as u32;
        table.handle(&event, &mut out);
    }
    let answered: Vec<(u16, &str)> = out
        .iter()
        .map(|c| (c.exchange.status, c.exchange.target.get(..4).unwrap_or("")))
        .collect();
    assert_eq!(answered, [(203, "/r4/"), (204, "/r5/")]);
    table.handle(&event_on(1, EventKind::Write, 1, OK_EMPTY), &mut out);
    assert!(out[2].exchange.target.starts_with("/r0/"));
    assert_eq!(table.pending_target_bytes(), 0);
}

/// The kernel programs' bookkeeping for one connection, as
/// `exporter-ebpf/src/programs/io.rs` keeps it: per-direction offsets and
/// body bytes to skip, sequence numbers, a copy of at most `capture` bytes.
/// (The real programs are exercised by the end-to-end tests.)
struct KernelModel {
    seq: u32,
    offsets: [u32; 2],
    skip: [u32; 2],
    capture: usize,
    clock: u64,
}

impl KernelModel {
    /// One syscall that moved `bytes`; the event it makes, if any.
    fn syscall<'a>(&mut self, kind: EventKind, bytes: &'a [u8]) -> Option<RawEvent<'a>> {
        self.clock += 1;
        let slot = usize::from(kind != EventKind::Read);
        let moved = bytes.len() as u32;
        let start = self.offsets[slot];
        self.offsets[slot] = start.wrapping_add(moved);
        let skipped = if self.skip[slot] == 0 {
            0
        } else if moved < self.skip[slot] {
            self.skip[slot] -= moved;
            return None;
        } else {
            std::mem::replace(&mut self.skip[slot], 0)
        };
        self.seq += 1;
        let reported = &bytes[skipped as usize..];
        let copied = &reported[..reported.len().min(self.capture)];
        Some(RawEvent {
            kind,
            header: EventHeader {
                kind: kind as u32,
                tgid: 100,
                fd: 7,
                seq: self.seq,
                conn_id: 1,
                timestamp_ns: self.clock,
                byte_count: reported.len() as u32,
                offset: start.wrapping_add(skipped),
                captured_len: copied.len() as u32,
                aux: if self.seq == 1 { LISTENER + 1 } else { 0 },
                handshake_ns: 0,
                local_port: 0,
                _pad: 0,
            },
            data: copied,
        })
    }

    fn control(&mut self, filter: &KernelFilter) {
        if let KernelFilter::SkipBody {
            direction, until, ..
        } = *filter
        {
            let slot = direction as usize;
            let ahead = until.wrapping_sub(self.offsets[slot]) as i32;
            self.skip[slot] = ahead.max(0) as u32;
        }
    }
}

/// A request and its response as bytes on the wire, with what the exchange
/// must come out as: (method, target, status, request bytes, response bytes).
type Wire = (Vec<u8>, Vec<u8>, (String, String, u16, u64, u64));

fn arb_wire() -> impl Strategy<Value = Wire> {
    (
        any::<bool>(),
        0usize..120_000,
        prop::sample::select(vec![200u16, 201, 404, 500]),
        0usize..200_000,
        prop::option::of(1usize..70_000),
        0u32..1000,
    )
        .prop_map(|(post, request_body, status, response_body, chunk, n)| {
            let (method, body) = if post {
                ("POST", request_body)
            } else {
                ("GET", 0)
            };
            let target = format!("/r/{n}");
            let mut request = format!("{method} {target} HTTP/1.1\r\nHost: h\r\n").into_bytes();
            if post {
                request.extend_from_slice(format!("Content-Length: {body}\r\n").as_bytes());
            }
            request.extend_from_slice(b"\r\n");
            request.resize(request.len() + body, b'q');
            let mut response = format!("HTTP/1.1 {status} X\r\n").into_bytes();
            match chunk {
                Some(chunk) => {
                    response.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    let mut left = response_body;
                    while left > 0 {
                        let n = left.min(chunk);
                        response.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                        response.resize(response.len() + n, b'r');
                        response.extend_from_slice(b"\r\n");
                        left -= n;
                    }
                    response.extend_from_slice(b"0\r\n\r\n");
                }
                None => {
                    response.extend_from_slice(
                        format!("Content-Length: {response_body}\r\n\r\n").as_bytes(),
                    );
                    response.resize(response.len() + response_body, b'r');
                }
            }
            let expected = (
                method.to_owned(),
                target,
                status,
                request.len() as u64,
                response.len() as u64,
            );
            (request, response, expected)
        })
}

/// Cuts `bytes` into syscalls of the sizes in `sizes`, cycled.
fn syscalls<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for size in sizes.iter().cycle() {
        if start >= bytes.len() {
            break;
        }
        let end = (start + size).min(bytes.len());
        out.push(&bytes[start..end]);
        start = end;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the syscall sizes and however late the kernel gets the
    /// request to skip a body, every exchange comes out exactly: with the
    /// time of its first read and last write, and all its bytes.
    #[test]
    fn skipping_bodies_in_the_kernel_loses_no_exchange(
        wires in prop::collection::vec(arb_wire(), 1..5),
        sizes in prop::collection::vec(1usize..16_384, 1..8),
        lag in 0usize..4,
    ) {
        // Everything a syscall moves fits the copy: a body's end is where
        // the skip can make a difference, never a cut head.
        let mut kernel = KernelModel {
            seq: 0,
            offsets: [0; 2],
            skip: [0; 2],
            capture: 16_384,
            clock: 0,
        };
        let mut table = table();
        let mut out = Vec::new();
        // Requests reach the kernel `lag` syscalls after they were made.
        let mut in_flight: std::collections::VecDeque<(usize, KernelFilter)> = Default::default();
        let mut expected = Vec::new();
        let mut syscall = 0usize;
        for (request, response, exchange) in &wires {
            let reads = syscalls(request, &sizes);
            let writes = syscalls(response, &sizes);
            let started = kernel.clock + 1;
            for (kind, bytes) in reads.iter().map(|b| (EventKind::Read, *b))
                .chain(writes.iter().map(|b| (EventKind::Write, *b)))
            {
                while in_flight.front().is_some_and(|(due, _)| *due <= syscall) {
                    let (_, filter) = in_flight.pop_front().expect("front");
                    kernel.control(&filter);
                }
                syscall += 1;
                if let Some(event) = kernel.syscall(kind, bytes) {
                    handle(&mut table, &labels, &event, &mut out);
                    for filter in table.take_kernel_filters() {
                        in_flight.push_back((syscall + lag, filter));
                    }
                }
            }
            let (method, target, status, request_bytes, response_bytes) = exchange.clone();
            expected.push((method, target, status, request_bytes, response_bytes, started, kernel.clock));
        }
        let got: Vec<_> = out.iter().map(|captured| {
            let e = &captured.exchange;
            (e.method.to_string(), e.target.clone(), e.status, e.request_bytes, e.response_bytes,
             e.started_ns, e.finished_ns)
        }).collect();
        prop_assert_eq!(got, expected);
        let http = &table.counters().http;
        prop_assert_eq!(
            [http.truncated_captures.get(), http.unparsed_bytes.get(), http.abandoned_requests.get()],
            [0, 0, 0]
        );
    }
}
