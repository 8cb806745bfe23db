//! The two directions of a connection, as one reader drives them:
//! requests (client to server) and responses, each with what its heads,
//! bodies and losses mean for pairing.

use super::{
    HttpConnection, HttpCounters, InFlightResponse, ReaderState,
    heads::{
        Framing, HeadParse, RequestHead, ResponseHead, looks_like_request_start,
        parse_request_head, parse_response_head, start_line,
    },
};
use crate::exchange::Exchange;

/// What differs between the two directions of a connection; the reading
/// itself ([`HttpConnection::advance`]) is the same for both.
pub(super) trait Direction {
    type Head;
    fn reader(connection: &mut HttpConnection) -> &mut ReaderState;
    fn parse_head(bytes: &[u8]) -> HeadParse<Self::Head>;
    /// Whether a lost reader may start over at a segment whose copied bytes
    /// are these: only where a message can begin.
    fn may_resync(connection: &HttpConnection, bytes: &[u8]) -> bool;
    /// Bytes of the current message (body, or bytes after lost framing).
    /// Bytes of the message in progress; `content`: how many of them are
    /// its body's payload, `None` when its framing was lost.
    fn add_bytes(
        connection: &mut HttpConnection,
        bytes: u64,
        content: Option<u64>,
        timestamp_ns: u64,
    );
    fn body_ended(
        connection: &mut HttpConnection,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    );
    /// Before a head is read from the start of a segment.
    fn head_begins(
        connection: &mut HttpConnection,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    );
    fn head_parsed(
        connection: &mut HttpConnection,
        head: Self::Head,
        at: HeadAt,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    );
    /// A head went on past the copied bytes; `copied` is what was copied of
    /// it. Its start line may still be read. The reader is lost after it.
    fn head_cut(
        connection: &mut HttpConnection,
        copied: &[u8],
        at: HeadAt,
        counters: &HttpCounters,
    );
    /// Bytes where a head had to start are not HTTP; returns what the
    /// reader does next.
    fn unparsable(connection: &mut HttpConnection, counters: &HttpCounters) -> ReaderState;
    /// The reader lost track inside a message.
    fn track_lost(connection: &mut HttpConnection);
}

/// Where a head was: its bytes and times.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeadAt {
    /// Bytes it took (or, when cut, the bytes the segment had left).
    pub(super) bytes: u64,
    /// When its first byte was moved.
    pub(super) started_ns: u64,
    /// When the segment that ended it was moved.
    pub(super) timestamp_ns: u64,
}

/// Bytes the server read.
pub(super) struct Requests;

impl Direction for Requests {
    type Head = RequestHead;

    fn reader(connection: &mut HttpConnection) -> &mut ReaderState {
        &mut connection.request
    }

    fn parse_head(bytes: &[u8]) -> HeadParse<RequestHead> {
        parse_request_head(bytes)
    }

    fn may_resync(connection: &HttpConnection, bytes: &[u8]) -> bool {
        !connection.request_awaits_boundary
            && connection.pending.is_empty()
            && looks_like_request_start(bytes)
    }

    fn add_bytes(
        connection: &mut HttpConnection,
        bytes: u64,
        content: Option<u64>,
        _timestamp_ns: u64,
    ) {
        let Some(last) = connection.pending.back_mut() else {
            return;
        };
        match content {
            Some(content) => {
                last.bytes += bytes;
                last.body_bytes = last.body_bytes.map(|body| body + content);
            }
            // After lost framing the bytes belong to no known request, and
            // the last one's body size is unknown.
            None => last.body_bytes = None,
        }
    }

    fn body_ended(connection: &mut HttpConnection, _: &HttpCounters, _: &mut Vec<Exchange>) {
        connection.request = ReaderState::fresh_head();
    }

    fn head_begins(_: &mut HttpConnection, _: &HttpCounters, _: &mut Vec<Exchange>) {}

    fn head_parsed(
        connection: &mut HttpConnection,
        head: RequestHead,
        at: HeadAt,
        counters: &HttpCounters,
        _: &mut Vec<Exchange>,
    ) {
        connection.seen_request = true;
        let framing = head.framing;
        let refused = framing == Framing::Ambiguous;
        connection.push_request(head, at, Some(0), refused, counters);
        connection.request = if refused {
            // The server answers 400 and closes; nothing after it can be
            // trusted to be read as the server reads it.
            counters.ambiguous_requests.inc();
            ReaderState::Opaque
        } else {
            match framing.request_body() {
                None => ReaderState::fresh_head(),
                Some(body) => ReaderState::Body(body),
            }
        };
    }

    fn head_cut(
        connection: &mut HttpConnection,
        copied: &[u8],
        at: HeadAt,
        counters: &HttpCounters,
    ) {
        counters.truncated_captures.inc();
        // Its request line still names the exchange; where its body ends
        // is unknown.
        if let Some(head) = start_line(copied, parse_request_head) {
            connection.seen_request = true;
            connection.push_request(head, at, None, false, counters);
        }
        Self::track_lost(connection);
    }

    fn track_lost(connection: &mut HttpConnection) {
        connection.request_awaits_boundary = true;
    }

    fn unparsable(connection: &mut HttpConnection, _: &HttpCounters) -> ReaderState {
        // Garbage before any request: not HTTP at all. After one: lost track.
        if connection.seen_request {
            connection.request_awaits_boundary = true;
            ReaderState::Desync
        } else {
            connection.response = ReaderState::Opaque;
            ReaderState::Opaque
        }
    }
}

/// Bytes the server wrote.
pub(super) struct Responses;

impl Direction for Responses {
    type Head = ResponseHead;

    fn reader(connection: &mut HttpConnection) -> &mut ReaderState {
        &mut connection.response
    }

    fn parse_head(bytes: &[u8]) -> HeadParse<ResponseHead> {
        parse_response_head(bytes)
    }

    fn may_resync(_: &HttpConnection, bytes: &[u8]) -> bool {
        bytes.starts_with(b"HTTP/1.")
    }

    fn add_bytes(
        connection: &mut HttpConnection,
        bytes: u64,
        content: Option<u64>,
        timestamp_ns: u64,
    ) {
        // A response whose framing was lost still ends at its last write
        // before the next head or the close, its body size unknown.
        if let Some(response) = &mut connection.in_flight {
            response.bytes += bytes;
            response.last_write_ns = timestamp_ns;
            response.body_bytes = content.and_then(|content| Some(response.body_bytes? + content));
        }
    }

    fn body_ended(
        connection: &mut HttpConnection,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        connection.finish_response(counters, out);
    }

    fn head_begins(
        connection: &mut HttpConnection,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        // A response whose end was lost is followed by a new head: the old
        // one ended with the previous write.
        if connection.in_flight.is_some() {
            connection.finish_response(counters, out);
        }
    }

    fn head_parsed(
        connection: &mut HttpConnection,
        head: ResponseHead,
        at: HeadAt,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        connection.start_response(head, at, counters, out);
    }

    fn head_cut(
        connection: &mut HttpConnection,
        copied: &[u8],
        at: HeadAt,
        counters: &HttpCounters,
    ) {
        counters.truncated_captures.inc();
        match start_line(copied, parse_response_head) {
            // The status is known, the end is not: it ends at the next
            // head, the close, or after a quiet while.
            Some(head) if !(100..200).contains(&head.status) => {
                connection.in_flight = Some(InFlightResponse {
                    status: head.status,
                    bytes: at.bytes,
                    body_bytes: None,
                    last_write_ns: at.timestamp_ns,
                });
            }
            _ => connection.abandon_answered_request(counters),
        }
    }

    fn unparsable(connection: &mut HttpConnection, counters: &HttpCounters) -> ReaderState {
        // A head had to start here, so a response did: it answered the
        // oldest request, whose exchange is lost.
        connection.abandon_answered_request(counters);
        ReaderState::Desync
    }

    // A response that lost its framing ends at the next head or the close.
    fn track_lost(_: &mut HttpConnection) {}
}
