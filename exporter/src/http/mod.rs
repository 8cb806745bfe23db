//! HTTP/1.x on one server-side connection: request and response heads with
//! httparse, body framing (Content-Length, chunked, until close, none), and
//! pairing of responses with requests in order (keep-alive, pipelining).
//!
//! Input is a sequence of [`Segment`]s, one per syscall: the total number of
//! bytes the syscall moved and the prefix of them the kernel copied. Bodies
//! are skipped by count, so they need not be copied; heads and chunk-size
//! lines must lie in copied bytes, and when they do not the reader says so
//! and resynchronises at the next message that starts a segment.

use self::{
    body::{Body, BodyStep},
    heads::{
        Framing, HeadParse, RequestHead, ResponseHead, parse_head_across, parse_response_head,
        start_line,
    },
    pending::{PendingRequest, PendingRequests},
};
use crate::exchange::{Exchange, LostRequests};

mod body;
mod counters;
mod direction;
mod heads;
mod pending;

pub use self::counters::HttpCounters;
use self::direction::{Direction, HeadAt, Requests, Responses};

/// Bytes one syscall moved on the connection.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// Kernel monotonic time at syscall exit.
    pub timestamp_ns: u64,
    /// How many bytes the syscall moved.
    pub byte_count: u64,
    /// The first bytes of them (possibly all, possibly none).
    pub captured: &'a [u8],
}

/// Where one direction's reader is.
#[derive(Debug)]
enum ReaderState {
    /// Accumulating a head; `buffer` holds the part seen in earlier segments.
    Head { buffer: Vec<u8>, started_ns: u64 },
    /// Skipping a body.
    Body(Body),
    /// Lost track (missing bytes); wait for a segment that starts a message.
    Desync,
    /// Not HTTP, or upgraded to another protocol: ignore from here on.
    Opaque,
}

impl ReaderState {
    fn fresh_head() -> Self {
        ReaderState::Head {
            buffer: Vec::new(),
            started_ns: 0,
        }
    }
}

/// The response being written to the oldest pending request.
#[derive(Debug)]
struct InFlightResponse {
    status: u16,
    bytes: u64,
    /// Its body's payload bytes so far, when its head was read whole and
    /// its framing kept.
    body_bytes: Option<u64>,
    last_write_ns: u64,
}

/// Both directions of one HTTP/1.x server connection.
#[derive(Debug)]
pub struct HttpConnection {
    request: ReaderState,
    response: ReaderState,
    pending: PendingRequests,
    in_flight: Option<InFlightResponse>,
    /// Whether any request has parsed: garbage before the first one makes the
    /// whole connection opaque; garbage later is a desync.
    seen_request: bool,
    /// The request reader lost track and may pick it up again only at a
    /// message boundary: once a response ended and nothing is pending.
    /// Until then a read that starts like a request may be body bytes.
    request_awaits_boundary: bool,
    /// Requests lost since last taken ([`Self::take_lost`]).
    lost: LostRequests,
}

impl Default for HttpConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpConnection {
    pub fn new() -> Self {
        HttpConnection {
            request: ReaderState::fresh_head(),
            response: ReaderState::fresh_head(),
            pending: PendingRequests::default(),
            in_flight: None,
            seen_request: false,
            request_awaits_boundary: false,
            lost: LostRequests::default(),
        }
    }

    /// Requests lost since the last call, by why.
    pub fn take_lost(&mut self) -> LostRequests {
        std::mem::take(&mut self.lost)
    }

    /// A connection's state, for another connection: as [`Self::new`],
    /// keeping the request queue's buffer when it is small (so that a new
    /// connection allocates nothing).
    pub fn recycle(mut self) -> Self {
        const KEPT_QUEUE: usize = 8;
        HttpConnection {
            pending: std::mem::take(&mut self.pending).recycled(KEPT_QUEUE),
            ..HttpConnection::new()
        }
    }

    /// Whether the connection turned out not to speak HTTP/1.x.
    pub fn is_opaque(&self) -> bool {
        matches!(self.request, ReaderState::Opaque)
    }

    /// Requests read whose response has not ended.
    pub fn requests_in_flight(&self) -> usize {
        self.pending
            .iter()
            .filter(|request| !request.refused)
            .count()
    }

    /// Neither direction will be read as HTTP again: bytes that were not
    /// HTTP before any request, or an upgrade (101, e.g. WebSocket).
    pub fn is_not_http(&self) -> bool {
        matches!(self.request, ReaderState::Opaque) && matches!(self.response, ReaderState::Opaque)
    }

    /// Body bytes certain to come next from the client (`read`) or the
    /// server: see [`Body::known_left`].
    pub fn body_left(&self, read: bool) -> Option<u64> {
        match if read { &self.request } else { &self.response } {
            ReaderState::Body(body) => body.known_left(),
            _ => None,
        }
    }

    /// Requests read but not yet answered.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Bytes held of heads not complete yet, and when the oldest began.
    pub fn partial_heads(&self) -> Option<(usize, u64)> {
        let held = |state: &ReaderState| match state {
            ReaderState::Head { buffer, started_ns } if !buffer.is_empty() => {
                Some((buffer.len(), *started_ns))
            }
            _ => None,
        };
        match (held(&self.request), held(&self.response)) {
            (None, None) => None,
            (one, other) => {
                let (one, other) = (one.unwrap_or((0, u64::MAX)), other.unwrap_or((0, u64::MAX)));
                Some((one.0 + other.0, one.1.min(other.1)))
            }
        }
    }

    /// Gives up the heads not complete yet, as if the capture had cut them
    /// where they are: their start lines still count.
    pub fn drop_partial_heads(&mut self, counters: &HttpCounters) {
        self.cut_partial_head::<Requests>(counters);
        self.cut_partial_head::<Responses>(counters);
    }

    fn cut_partial_head<D: Direction>(&mut self, counters: &HttpCounters) {
        let ReaderState::Head { buffer, started_ns } = D::reader(self) else {
            return;
        };
        if buffer.is_empty() {
            return;
        }
        let copied = std::mem::take(buffer);
        let started_ns = *started_ns;
        *D::reader(self) = ReaderState::Desync;
        let at = HeadAt {
            bytes: copied.len() as u64,
            started_ns,
            timestamp_ns: started_ns,
        };
        D::head_cut(self, &copied, at, counters);
    }

    /// Bytes the server read.
    pub fn on_read(&mut self, segment: Segment<'_>, counters: &HttpCounters) {
        // Reading requests completes no exchange.
        self.advance::<Requests>(segment, counters, &mut Vec::new());
    }

    /// Bytes the server wrote; completed exchanges are appended to `out`.
    pub fn on_write(
        &mut self,
        segment: Segment<'_>,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        self.advance::<Responses>(segment, counters, out);
    }

    /// A write that failed because the client went away (EPIPE,
    /// ECONNRESET); `attempted` holds what the server tried to send. The
    /// exchange still counts, with the status the server wrote, as its
    /// access log has it.
    pub fn on_write_failed(
        &mut self,
        attempted: Segment<'_>,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        let at_head =
            matches!(&self.response, ReaderState::Head { buffer, .. } if buffer.is_empty());
        if self.in_flight.is_none() && at_head {
            // The response would have begun with this write.
            match start_line(attempted.captured, parse_response_head) {
                Some(head) if !(100..200).contains(&head.status) => {
                    self.in_flight = Some(InFlightResponse {
                        status: head.status,
                        bytes: 0,
                        body_bytes: None,
                        last_write_ns: attempted.timestamp_ns,
                    });
                }
                _ => return,
            }
        }
        if let Some(response) = &mut self.in_flight {
            response.last_write_ns = attempted.timestamp_ns;
            counters.client_gone.inc();
            self.finish_response(counters, out);
        }
    }

    /// Reads one segment in direction `D`: heads, then bodies skipped by
    /// count, as many messages as the segment holds.
    fn advance<D: Direction>(
        &mut self,
        segment: Segment<'_>,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        let mut pos: u64 = 0;
        let total = segment.byte_count;
        let now = segment.timestamp_ns;
        while pos < total {
            let captured = segment.captured.get(pos as usize..).unwrap_or(&[]);
            let remaining = total - pos;
            match D::reader(self) {
                ReaderState::Opaque => return,
                ReaderState::Desync => {
                    if pos == 0 && D::may_resync(self, captured) {
                        *D::reader(self) = ReaderState::fresh_head();
                        continue;
                    }
                    D::add_bytes(self, remaining, None, now);
                    return;
                }
                ReaderState::Body(body) => {
                    let mut content = 0;
                    match body.advance(remaining, captured, &mut content) {
                        BodyStep::Continues(used) => {
                            D::add_bytes(self, used, Some(content), now);
                            return;
                        }
                        BodyStep::Ended(used) => {
                            pos += used;
                            D::add_bytes(self, used, Some(content), now);
                            D::body_ended(self, counters, out);
                        }
                        BodyStep::Lost => {
                            counters.truncated_captures.inc();
                            D::add_bytes(self, remaining, None, now);
                            *D::reader(self) = ReaderState::Desync;
                            D::track_lost(self);
                            return;
                        }
                    }
                }
                ReaderState::Head { buffer, started_ns } => {
                    if buffer.is_empty() {
                        *started_ns = now;
                        if pos == 0 {
                            D::head_begins(self, counters, out);
                        }
                    }
                    match self.read_head::<D>(captured, remaining, now, counters, out) {
                        // The head ended inside the segment: go on after it.
                        Some(consumed) => pos += consumed,
                        None => return,
                    }
                }
            }
        }
    }

    /// Reads what this segment holds of a head; `Some(bytes it took)` when
    /// the head ended in it.
    fn read_head<D: Direction>(
        &mut self,
        captured: &[u8],
        remaining: u64,
        now: u64,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) -> Option<u64> {
        let ReaderState::Head { buffer, started_ns } = D::reader(self) else {
            // `head_begins` ended a response and the state moved on.
            return Some(0);
        };
        let started_ns = *started_ns;
        let held = buffer.len() as u64;
        match parse_head_across(buffer, captured, D::parse_head) {
            HeadParse::Complete { head, consumed } => {
                let at = HeadAt {
                    bytes: held + consumed as u64,
                    started_ns,
                    timestamp_ns: now,
                };
                D::head_parsed(self, head, at, counters, out);
                Some(consumed as u64)
            }
            HeadParse::Partial => {
                if (captured.len() as u64) < remaining {
                    // Part of the head was not copied.
                    let copied = std::mem::take(buffer);
                    *D::reader(self) = ReaderState::Desync;
                    let at = HeadAt {
                        bytes: held + remaining,
                        started_ns,
                        timestamp_ns: now,
                    };
                    D::head_cut(self, &copied, at, counters);
                }
                None
            }
            HeadParse::Invalid => {
                counters.unparsed_bytes.inc_by(held + remaining);
                let next = D::unparsable(self, counters);
                *D::reader(self) = next;
                None
            }
        }
    }

    fn push_request(
        &mut self,
        head: RequestHead,
        at: HeadAt,
        body_bytes: Option<u64>,
        refused: bool,
        counters: &HttpCounters,
    ) {
        let made_room = self.pending.push(PendingRequest {
            method: head.method,
            target: head.target,
            version: head.version,
            started_ns: at.started_ns,
            bytes: at.bytes,
            body_bytes,
            refused,
        });
        for _ in made_room {
            counters.abandoned_requests.inc();
            self.lost.abandoned += 1;
        }
    }

    /// Bytes of the targets of requests waiting for their responses.
    pub fn pending_target_bytes(&self) -> usize {
        self.pending.target_bytes()
    }

    /// Gives up the oldest request waiting for its response that holds
    /// target bytes, counted as abandoned; its response will pair with it
    /// and make no exchange. False when none holds any.
    pub fn abandon_oldest_request(&mut self, counters: &HttpCounters) -> bool {
        let Some(counted) = self.pending.hollow_oldest() else {
            return false;
        };
        if counted {
            counters.abandoned_requests.inc();
            self.lost.abandoned += 1;
        }
        true
    }

    /// A response began whose head could not be read: it answers the
    /// oldest request, which is lost (and counted) so that later responses
    /// still pair with their own requests.
    fn abandon_answered_request(&mut self, counters: &HttpCounters) {
        if let Some(request) = self.pending.pop_front()
            && !request.refused
        {
            counters.abandoned_requests.inc();
            self.lost.unpaired_response += 1;
        }
    }

    fn start_response(
        &mut self,
        head: ResponseHead,
        at: HeadAt,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        let status = head.status;
        if (100..200).contains(&status) && status != 101 {
            // Interim (100 Continue, 103 Early Hints): the final response follows.
            self.response = ReaderState::fresh_head();
            return;
        }
        let request_is_head = self
            .pending
            .front()
            .is_some_and(|request| request.method.as_str().eq_ignore_ascii_case("HEAD"));
        self.in_flight = Some(InFlightResponse {
            status,
            bytes: at.bytes,
            body_bytes: Some(0),
            last_write_ns: at.timestamp_ns,
        });
        if status == 101 {
            // Upgraded (e.g. WebSocket): the exchange ends here, HTTP ends too.
            self.finish_response(counters, out);
            self.response = ReaderState::Opaque;
            self.request = ReaderState::Opaque;
            return;
        }
        if request_is_head || status == 204 || status == 304 {
            // A head-only response ends with the write that finished its head.
            return self.finish_response(counters, out);
        }
        match head.framing.response_body() {
            Some(body) => self.response = ReaderState::Body(body),
            None if head.framing == Framing::Ambiguous => {
                // Its status is known, its end is not: it ends at the next
                // head, the close, or after a quiet while.
                self.response = ReaderState::Desync;
            }
            None => self.finish_response(counters, out),
        }
    }

    fn finish_response(&mut self, counters: &HttpCounters, out: &mut Vec<Exchange>) {
        self.response = ReaderState::fresh_head();
        let Some(response) = self.in_flight.take() else {
            return;
        };
        // A message boundary: the client's next bytes start a request.
        self.request_awaits_boundary = false;
        let Some(request) = self.pending.pop_front() else {
            counters.unpaired_responses.inc();
            self.lost.unpaired_response += 1;
            return;
        };
        if request.refused {
            return;
        }
        out.push(Exchange {
            method: request.method,
            target: request.target,
            version: request.version,
            server_port: None,
            status: response.status,
            started_ns: request.started_ns,
            finished_ns: response.last_write_ns,
            request_bytes: request.bytes,
            response_bytes: response.bytes,
            request_body_bytes: request.body_bytes,
            response_body_bytes: response.body_bytes,
            queued: None,
        });
    }

    /// Events were lost in between: whatever was in progress cannot be trusted.
    pub fn on_gap(&mut self, counters: &HttpCounters) {
        counters
            .abandoned_requests
            .inc_by(self.pending.len() as u64);
        self.lost.sequence_gap += self.requests_in_flight() as u32;
        self.pending.clear();
        self.in_flight = None;
        if !matches!(self.request, ReaderState::Opaque) {
            self.request = ReaderState::Desync;
            self.response = ReaderState::Desync;
            self.request_awaits_boundary = true;
        }
    }

    /// The server closed the connection: a response delimited by the close,
    /// or whose framing was lost, ends with its last write.
    pub fn on_close(&mut self, counters: &HttpCounters, out: &mut Vec<Exchange>) {
        let ends_at_close = matches!(
            self.response,
            ReaderState::Body(Body::UntilClose) | ReaderState::Desync
        );
        if ends_at_close && self.in_flight.is_some() {
            self.finish_response(counters, out);
        }
        counters
            .abandoned_requests
            .inc_by(self.pending.len() as u64);
        self.lost.abandoned += self.requests_in_flight() as u32;
        self.pending.clear();
    }

    /// Ends a response whose framing was lost once nothing was written for
    /// `idle_ns`, so a kept-alive idle connection does not hold it forever.
    pub fn expire_unframed(
        &mut self,
        now_ns: u64,
        idle_ns: u64,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        let unframed = matches!(self.response, ReaderState::Desync);
        let idle = self
            .in_flight
            .as_ref()
            .is_some_and(|response| now_ns.saturating_sub(response.last_write_ns) >= idle_ns);
        if unframed && idle {
            self.finish_response(counters, out);
            self.response = ReaderState::Desync;
        }
    }
}

#[cfg(test)]
mod tests;
