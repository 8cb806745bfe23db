//! Per-connection reassembly: routes each kernel event to the connection it
//! belongs to (keyed by tgid, fd and generation), notices lost events from
//! sequence gaps, and hands bytes in order to the HTTP stage.

use std::collections::HashMap;

use exporter_common::EventKind;
use tracing::debug;

use crate::{
    capture::RawEvent,
    http::{Exchange, HttpConnection, HttpStats, Segment},
    identity::{Origin, ServedBy},
};

/// A connection idle this long is forgotten (its close was lost).
const IDLE_CONNECTION_NS: u64 = 15 * 60 * 1_000_000_000;
/// A response whose framing was lost ends after this long without writes.
const UNFRAMED_RESPONSE_IDLE_NS: u64 = 5 * 1_000_000_000;

#[derive(Debug)]
struct Connection {
    conn_id: u64,
    last_seq: u32,
    /// `None`: not monitored; its bytes are dropped.
    served_by: Option<ServedBy>,
    http: HttpConnection,
    last_event_ns: u64,
}

/// Counters of what happened to connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub connections_opened: u64,
    pub sequence_gaps: u64,
    pub http: HttpStats,
}

/// A finished exchange and who served it.
#[derive(Clone, Debug)]
pub struct ServedExchange {
    pub served_by: ServedBy,
    pub exchange: Exchange,
}

#[derive(Debug, Default)]
pub struct ConnectionTable {
    connections: HashMap<(u32, u32), Connection>,
    stats: StreamStats,
}

impl ConnectionTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections followed per process.
    pub fn per_process(&self) -> std::collections::BTreeMap<u32, usize> {
        let mut counts = std::collections::BTreeMap::new();
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

    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Feeds one event; finished exchanges are appended to `out`.
    /// `resolve` names a new connection's server (`None` to ignore it).
    pub fn handle(
        &mut self,
        event: &RawEvent<'_>,
        resolve: &mut dyn FnMut(&Origin) -> Option<ServedBy>,
        out: &mut Vec<ServedExchange>,
    ) {
        let header = &event.header;
        let key = (header.tgid, header.fd);
        let mut exchanges = Vec::new();

        if let Some(existing) = self.connections.get(&key)
            && existing.conn_id != header.conn_id
        {
            // The fd now belongs to a new connection: the old one's close was lost.
            if let Some(mut old) = self.connections.remove(&key) {
                old.http.on_close(&mut exchanges);
                collect(&mut self.stats, &mut old, &mut exchanges, out);
            }
        }

        if event.kind == EventKind::Close && !self.connections.contains_key(&key) {
            return;
        }
        let connection = match self.connections.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let origin = Origin {
                    tgid: header.tgid,
                    fd: header.fd,
                    listen_fd: (event.kind == EventKind::Accept).then_some(header.aux),
                };
                self.stats.connections_opened += 1;
                entry.insert(Connection {
                    conn_id: header.conn_id,
                    // So that the first event is never taken for a gap.
                    last_seq: header.seq.wrapping_sub(1),
                    served_by: resolve(&origin),
                    http: HttpConnection::new(),
                    last_event_ns: header.timestamp_ns,
                })
            }
        };

        let expected = connection.last_seq.wrapping_add(1);
        // A repeated seq is two threads racing on one counter, not a loss.
        if header.seq != expected && header.seq != connection.last_seq {
            self.stats.sequence_gaps += 1;
            debug!(
                tgid = header.tgid,
                fd = header.fd,
                expected,
                got = header.seq,
                "events lost on connection"
            );
            connection.http.on_gap();
        }
        connection.last_seq = header.seq;
        connection.last_event_ns = header.timestamp_ns;

        let segment = Segment {
            timestamp_ns: header.timestamp_ns,
            byte_count: header.byte_count,
            captured: event.data,
        };
        match event.kind {
            EventKind::Read if connection.served_by.is_some() => connection.http.on_read(segment),
            EventKind::Write if connection.served_by.is_some() => {
                connection.http.on_write(segment, &mut exchanges)
            }
            EventKind::Close => connection.http.on_close(&mut exchanges),
            _ => {}
        }
        collect(&mut self.stats, connection, &mut exchanges, out);
        if event.kind == EventKind::Close {
            self.connections.remove(&key);
        }
    }

    /// Periodic upkeep: ends responses whose framing was lost, forgets
    /// connections of exited processes and long-idle ones.
    pub fn reap(
        &mut self,
        now_ns: u64,
        process_alive: &dyn Fn(u32) -> bool,
        out: &mut Vec<ServedExchange>,
    ) {
        let mut alive: HashMap<u32, bool> = HashMap::new();
        let mut exchanges = Vec::new();
        self.connections.retain(|&(tgid, _), connection| {
            let process_alive = *alive.entry(tgid).or_insert_with(|| process_alive(tgid));
            connection
                .http
                .expire_unframed(now_ns, UNFRAMED_RESPONSE_IDLE_NS, &mut exchanges);
            let idle = now_ns.saturating_sub(connection.last_event_ns) >= IDLE_CONNECTION_NS;
            let keep = process_alive && !idle;
            if !keep {
                connection.http.on_close(&mut exchanges);
            }
            collect(&mut self.stats, connection, &mut exchanges, out);
            keep
        });
    }
}

/// Moves a connection's exchanges to `out` with its identity, and its
/// counters to the table's totals.
fn collect(
    stats: &mut StreamStats,
    connection: &mut Connection,
    exchanges: &mut Vec<Exchange>,
    out: &mut Vec<ServedExchange>,
) {
    stats.http.add(&connection.http.stats);
    connection.http.stats = HttpStats::default();
    if let Some(served_by) = &connection.served_by {
        out.extend(exchanges.drain(..).map(|exchange| ServedExchange {
            served_by: served_by.clone(),
            exchange,
        }));
    }
    exchanges.clear();
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use exporter_common::EventHeader;

    use super::*;

    const OK_EMPTY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    /// An event on fd 7 of tgid 100: (kind, connection generation, seq, bytes).
    type Step<'a> = (EventKind, u64, u32, &'a [u8]);

    fn feed(
        table: &mut ConnectionTable,
        resolve: &mut dyn FnMut(&Origin) -> Option<ServedBy>,
        steps: &[Step<'_>],
        out: &mut Vec<ServedExchange>,
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
                    aux: 3,
                },
                data,
            };
            table.handle(&event, resolve, out);
        }
    }

    fn labels(origin: &Origin) -> Option<ServedBy> {
        Some(ServedBy::Labels(Arc::from(vec![format!(
            "listen{:?}",
            origin.listen_fd
        )])))
    }

    #[test]
    fn reused_fd_is_a_new_connection_and_gaps_are_noticed() {
        let mut table = ConnectionTable::new();
        let mut out = Vec::new();
        feed(
            &mut table,
            &mut labels,
            &[
                (EventKind::Accept, 1, 0, b""),
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
        assert_eq!(
            out[0].served_by,
            ServedBy::Labels(Arc::from(vec!["listenNone".to_owned()]))
        );
        assert_eq!(table.stats().http.abandoned_requests, 1);
        // seq 5 after 1: events 2..4 were lost.
        feed(
            &mut table,
            &mut labels,
            &[(EventKind::Read, 2, 5, b"GET /c HTTP/1.1\r\n\r\n")],
            &mut out,
        );
        assert_eq!(table.stats().sequence_gaps, 1);
        feed(
            &mut table,
            &mut labels,
            &[(EventKind::Close, 2, 6, b"")],
            &mut out,
        );
        assert!(table.is_empty());
        assert_eq!(table.stats().connections_opened, 2);
    }

    #[test]
    fn excluded_connections_produce_nothing() {
        let mut table = ConnectionTable::new();
        let mut out = Vec::new();
        feed(
            &mut table,
            &mut |_| None,
            &[
                (EventKind::Read, 1, 0, b"GET /a HTTP/1.1\r\n\r\n"),
                (EventKind::Write, 1, 1, OK_EMPTY),
            ],
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn connections_of_exited_processes_are_reaped() {
        let mut table = ConnectionTable::new();
        let mut out = Vec::new();
        feed(
            &mut table,
            &mut labels,
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
}
