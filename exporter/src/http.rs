//! HTTP/1.x on one server-side connection: request and response heads with
//! httparse, body framing (Content-Length, chunked, until close, none), and
//! pairing of responses with requests in order (keep-alive, pipelining).
//!
//! Input is a sequence of [`Segment`]s, one per syscall: the total number of
//! bytes the syscall moved and the prefix of them the kernel copied. Bodies
//! are skipped by count, so they need not be copied; heads and chunk-size
//! lines must lie in copied bytes, and when they do not the reader says so
//! and resynchronises at the next message that starts a segment.

use std::collections::VecDeque;

use prometheus::{IntCounter, Registry};

use crate::{exchange::Exchange, metrics::counter};

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

/// What the HTTP stage counts that is not an exchange. The stage owns these
/// counters: `/metrics` and `/debug/connections` read them as they are.
#[derive(Clone, Debug)]
pub struct HttpCounters {
    /// Bytes that did not parse as HTTP/1.x where a message had to start.
    pub unparsed_bytes: IntCounter,
    /// Heads or chunk lines that fell outside the copied prefix.
    pub truncated_captures: IntCounter,
    /// Responses with no request waiting for them.
    pub unpaired_responses: IntCounter,
    /// Requests dropped without a response (gap, reset, close, overflow).
    pub abandoned_requests: IntCounter,
}

impl HttpCounters {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(HttpCounters {
            unparsed_bytes: counter(
                registry,
                "flask_ebpf_exporter_unparsed_bytes_total",
                "Bytes on server connections that did not parse as HTTP/1.x",
            )?,
            truncated_captures: counter(
                registry,
                "flask_ebpf_exporter_truncated_captures_total",
                "HTTP heads or chunk lines beyond the copied prefix of a buffer",
            )?,
            unpaired_responses: counter(
                registry,
                "flask_ebpf_exporter_unpaired_responses_total",
                "Responses with no request waiting for them",
            )?,
            abandoned_requests: counter(
                registry,
                "flask_ebpf_exporter_abandoned_requests_total",
                "Requests that ended without a response being seen",
            )?,
        })
    }
}

/// Longest request or response head accepted; longer is treated as garbage.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines parsed in one head.
const MAX_HEADERS: usize = 128;
/// Most pipelined requests waiting for responses on one connection.
const MAX_PENDING_REQUESTS: usize = 256;
/// Longest chunk-size line (hex size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug)]
struct PendingRequest {
    method: String,
    target: String,
    started_ns: u64,
    bytes: u64,
}

/// A message body being skipped, by how it ends.
#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// What skipping a body did with the bytes a segment has left.
enum BodyStep {
    /// Used all of them; the body goes on.
    Continues(u64),
    /// The body ended after this many of them.
    Ended(u64),
    /// A chunk-size line fell outside the copied bytes or was not one.
    Lost,
}

impl Body {
    /// Consumes bytes `[0, available)` of which `captured` are known.
    fn advance(&mut self, available: u64, captured: &[u8]) -> BodyStep {
        match self {
            Body::Length(left) => {
                let take = (*left).min(available);
                *left -= take;
                if *left == 0 {
                    BodyStep::Ended(take)
                } else {
                    BodyStep::Continues(take)
                }
            }
            Body::Chunked(chunked) => chunked.advance(available, captured),
            Body::UntilClose => BodyStep::Continues(available),
        }
    }
}

/// Incremental chunked-encoding decoder that skips chunk data by count.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Chunked {
    /// Reading a chunk-size line (bytes so far).
    SizeLine(Vec<u8>),
    /// Skipping chunk data, then its CRLF (`remaining` includes the 2 bytes).
    Data { remaining: u64 },
    /// After the last chunk: trailer lines until an empty line.
    Trailer { line: Vec<u8> },
}

impl Chunked {
    fn new() -> Self {
        Chunked::SizeLine(Vec::new())
    }

    fn advance(&mut self, available: u64, captured: &[u8]) -> BodyStep {
        let mut pos: u64 = 0;
        while pos < available {
            match self {
                Chunked::Data { remaining } => {
                    let take = (*remaining).min(available - pos);
                    *remaining -= take;
                    pos += take;
                    if *remaining == 0 {
                        *self = Chunked::SizeLine(Vec::new());
                    }
                }
                Chunked::SizeLine(line) => {
                    if !push_line_byte(line, captured, &mut pos) {
                        return BodyStep::Lost;
                    }
                    if line.ends_with(b"\r\n") {
                        let Some(size) = parse_chunk_size(&line[..line.len() - 2]) else {
                            return BodyStep::Lost;
                        };
                        *self = if size == 0 {
                            Chunked::Trailer { line: Vec::new() }
                        } else {
                            Chunked::Data {
                                remaining: size + 2,
                            }
                        };
                    }
                }
                Chunked::Trailer { line } => {
                    if !push_line_byte(line, captured, &mut pos) {
                        return BodyStep::Lost;
                    }
                    if line.ends_with(b"\r\n") {
                        if line.len() == 2 {
                            return BodyStep::Ended(pos);
                        }
                        line.clear();
                    }
                }
            }
        }
        BodyStep::Continues(available)
    }
}

/// Appends the byte at `pos` to a line being read; false when that byte was
/// not copied or the line is too long to be a chunk line.
fn push_line_byte(line: &mut Vec<u8>, captured: &[u8], pos: &mut u64) -> bool {
    let Some(byte) = captured.get(*pos as usize).copied() else {
        return false;
    };
    if line.len() >= MAX_CHUNK_LINE {
        return false;
    }
    line.push(byte);
    *pos += 1;
    true
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
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
    last_write_ns: u64,
}

/// Both directions of one HTTP/1.x server connection.
#[derive(Debug)]
pub struct HttpConnection {
    request: ReaderState,
    response: ReaderState,
    pending: VecDeque<PendingRequest>,
    in_flight: Option<InFlightResponse>,
    /// Whether any request has parsed: garbage before the first one makes the
    /// whole connection opaque; garbage later is a desync.
    seen_request: bool,
}

impl Default for HttpConnection {
    fn default() -> Self {
        Self::new()
    }
}

enum HeadParse<T> {
    Complete { head: T, consumed: usize },
    Partial,
    Invalid,
}

struct RequestHead {
    method: String,
    target: String,
    body: Option<Body>,
}

struct ResponseHead {
    status: u16,
    framing: Framing,
}

/// What a message's headers say about its body.
struct Framing {
    chunked: bool,
    content_length: Option<u64>,
}

impl Framing {
    /// The body the headers announce; `without_length` is what a message
    /// with neither header has (a request: none; a response: until close).
    fn body(&self, without_length: Option<Body>) -> Option<Body> {
        if self.chunked {
            return Some(Body::Chunked(Chunked::new()));
        }
        match self.content_length {
            Some(0) => None,
            Some(length) => Some(Body::Length(length)),
            None => without_length,
        }
    }
}

/// `None` when a Content-Length does not parse.
fn header_framing(headers: &[httparse::Header<'_>]) -> Option<Framing> {
    let mut chunked = false;
    let mut content_length = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides; servers here send only `chunked`.
            chunked = std::str::from_utf8(header.value)
                .map(|v| {
                    v.rsplit(',')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .eq_ignore_ascii_case("chunked")
                })
                .unwrap_or(false);
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())?;
            content_length = Some(length);
        }
    }
    Some(Framing {
        chunked,
        content_length,
    })
}

fn parse_request_head(bytes: &[u8]) -> HeadParse<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(consumed)) => {
            let (Some(method), Some(target)) = (request.method, request.path) else {
                return HeadParse::Invalid;
            };
            let Some(framing) = header_framing(request.headers) else {
                return HeadParse::Invalid;
            };
            HeadParse::Complete {
                head: RequestHead {
                    method: method.to_owned(),
                    target: target.to_owned(),
                    body: framing.body(None),
                },
                consumed,
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD_BYTES => HeadParse::Partial,
        _ => HeadParse::Invalid,
    }
}

fn parse_response_head(bytes: &[u8]) -> HeadParse<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(consumed)) => {
            let Some(status) = response.code else {
                return HeadParse::Invalid;
            };
            let Some(framing) = header_framing(response.headers) else {
                return HeadParse::Invalid;
            };
            HeadParse::Complete {
                head: ResponseHead { status, framing },
                consumed,
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD_BYTES => HeadParse::Partial,
        _ => HeadParse::Invalid,
    }
}

/// Feeds a head parser the part of the head held from earlier segments plus
/// the copied bytes of this one. Returns the parse and how many of this
/// segment's bytes belong to the head (when complete).
fn parse_head_across<T>(
    buffer: &mut Vec<u8>,
    segment_bytes: &[u8],
    parse: fn(&[u8]) -> HeadParse<T>,
) -> HeadParse<T> {
    if buffer.is_empty() {
        let result = parse(segment_bytes);
        if matches!(result, HeadParse::Partial) {
            buffer.extend_from_slice(segment_bytes);
        }
        return result;
    }
    let held = buffer.len();
    buffer.extend_from_slice(segment_bytes);
    match parse(buffer) {
        HeadParse::Complete { head, consumed } => HeadParse::Complete {
            head,
            consumed: consumed.saturating_sub(held),
        },
        other => other,
    }
}

/// Whether copied bytes at a segment start look like a request line, for
/// resynchronising after lost bytes.
fn looks_like_request_start(bytes: &[u8]) -> bool {
    let Some(space) = bytes.iter().take(16).position(|&b| b == b' ') else {
        return false;
    };
    space > 0
        && bytes[..space].iter().all(|b| b.is_ascii_uppercase())
        && bytes.len() > space + 1
        && bytes[space + 1] == b'/'
}

/// What differs between the two directions of a connection; the reading
/// itself ([`HttpConnection::advance`]) is the same for both.
trait Direction {
    type Head;
    fn reader(connection: &mut HttpConnection) -> &mut ReaderState;
    fn parse_head(bytes: &[u8]) -> HeadParse<Self::Head>;
    /// Whether copied bytes at a segment start may begin a message, to
    /// resynchronise after lost bytes.
    fn starts_message(bytes: &[u8]) -> bool;
    /// Bytes of the current message (body, or bytes after lost framing).
    fn add_bytes(connection: &mut HttpConnection, bytes: u64, framed: bool, timestamp_ns: u64);
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
        head_bytes: u64,
        started_ns: u64,
        timestamp_ns: u64,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    );
    /// What the reader does after bytes that are not HTTP.
    fn unparsable(connection: &mut HttpConnection) -> ReaderState;
}

/// Bytes the server read.
struct Requests;

impl Direction for Requests {
    type Head = RequestHead;

    fn reader(connection: &mut HttpConnection) -> &mut ReaderState {
        &mut connection.request
    }

    fn parse_head(bytes: &[u8]) -> HeadParse<RequestHead> {
        parse_request_head(bytes)
    }

    fn starts_message(bytes: &[u8]) -> bool {
        looks_like_request_start(bytes)
    }

    fn add_bytes(connection: &mut HttpConnection, bytes: u64, framed: bool, _timestamp_ns: u64) {
        // After lost framing the bytes belong to no known request.
        if framed && let Some(last) = connection.pending.back_mut() {
            last.bytes += bytes;
        }
    }

    fn body_ended(connection: &mut HttpConnection, _: &HttpCounters, _: &mut Vec<Exchange>) {
        connection.request = ReaderState::fresh_head();
    }

    fn head_begins(_: &mut HttpConnection, _: &HttpCounters, _: &mut Vec<Exchange>) {}

    fn head_parsed(
        connection: &mut HttpConnection,
        head: RequestHead,
        head_bytes: u64,
        started_ns: u64,
        _timestamp_ns: u64,
        counters: &HttpCounters,
        _: &mut Vec<Exchange>,
    ) {
        connection.seen_request = true;
        if connection.pending.len() >= MAX_PENDING_REQUESTS {
            connection.pending.pop_front();
            counters.abandoned_requests.inc();
        }
        connection.pending.push_back(PendingRequest {
            method: head.method,
            target: head.target,
            started_ns,
            bytes: head_bytes,
        });
        connection.request = match head.body {
            None => ReaderState::fresh_head(),
            Some(body) => ReaderState::Body(body),
        };
    }

    fn unparsable(connection: &mut HttpConnection) -> ReaderState {
        // Garbage before any request: not HTTP at all. After one: lost track.
        if connection.seen_request {
            ReaderState::Desync
        } else {
            connection.response = ReaderState::Opaque;
            ReaderState::Opaque
        }
    }
}

/// Bytes the server wrote.
struct Responses;

impl Direction for Responses {
    type Head = ResponseHead;

    fn reader(connection: &mut HttpConnection) -> &mut ReaderState {
        &mut connection.response
    }

    fn parse_head(bytes: &[u8]) -> HeadParse<ResponseHead> {
        parse_response_head(bytes)
    }

    fn starts_message(bytes: &[u8]) -> bool {
        bytes.starts_with(b"HTTP/1.")
    }

    fn add_bytes(connection: &mut HttpConnection, bytes: u64, _framed: bool, timestamp_ns: u64) {
        // A response whose framing was lost still ends at its last write
        // before the next head or the close.
        if let Some(response) = &mut connection.in_flight {
            response.bytes += bytes;
            response.last_write_ns = timestamp_ns;
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
        head_bytes: u64,
        _started_ns: u64,
        timestamp_ns: u64,
        counters: &HttpCounters,
        out: &mut Vec<Exchange>,
    ) {
        connection.start_response(head, head_bytes, timestamp_ns, counters, out);
    }

    fn unparsable(_: &mut HttpConnection) -> ReaderState {
        ReaderState::Desync
    }
}

impl HttpConnection {
    pub fn new() -> Self {
        HttpConnection {
            request: ReaderState::fresh_head(),
            response: ReaderState::fresh_head(),
            pending: VecDeque::new(),
            in_flight: None,
            seen_request: false,
        }
    }

    /// Whether the connection turned out not to speak HTTP/1.x.
    pub fn is_opaque(&self) -> bool {
        matches!(self.request, ReaderState::Opaque)
    }

    /// Requests read but not yet answered.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
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
                    if pos == 0 && D::starts_message(captured) {
                        *D::reader(self) = ReaderState::fresh_head();
                        continue;
                    }
                    D::add_bytes(self, remaining, false, now);
                    return;
                }
                ReaderState::Body(body) => match body.advance(remaining, captured) {
                    BodyStep::Continues(used) => {
                        D::add_bytes(self, used, true, now);
                        return;
                    }
                    BodyStep::Ended(used) => {
                        pos += used;
                        D::add_bytes(self, used, true, now);
                        D::body_ended(self, counters, out);
                    }
                    BodyStep::Lost => {
                        counters.truncated_captures.inc();
                        D::add_bytes(self, remaining, false, now);
                        *D::reader(self) = ReaderState::Desync;
                        return;
                    }
                },
                ReaderState::Head { buffer, started_ns } => {
                    if buffer.is_empty() {
                        *started_ns = now;
                        if pos == 0 {
                            D::head_begins(self, counters, out);
                        }
                    }
                    let ReaderState::Head { buffer, started_ns } = D::reader(self) else {
                        continue;
                    };
                    let started = *started_ns;
                    let held = buffer.len() as u64;
                    match parse_head_across(buffer, captured, D::parse_head) {
                        HeadParse::Complete { head, consumed } => {
                            pos += consumed as u64;
                            let bytes = held + consumed as u64;
                            D::head_parsed(self, head, bytes, started, now, counters, out);
                        }
                        HeadParse::Partial => {
                            if (captured.len() as u64) < remaining {
                                // Part of the head was not copied.
                                counters.truncated_captures.inc();
                                *D::reader(self) = ReaderState::Desync;
                            }
                            return;
                        }
                        HeadParse::Invalid => {
                            counters.unparsed_bytes.inc_by(held + remaining);
                            let next = D::unparsable(self);
                            *D::reader(self) = next;
                            return;
                        }
                    }
                }
            }
        }
    }

    fn start_response(
        &mut self,
        head: ResponseHead,
        head_bytes: u64,
        timestamp_ns: u64,
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
            .is_some_and(|request| request.method.eq_ignore_ascii_case("HEAD"));
        self.in_flight = Some(InFlightResponse {
            status,
            bytes: head_bytes,
            last_write_ns: timestamp_ns,
        });
        if status == 101 {
            // Upgraded (e.g. WebSocket): the exchange ends here, HTTP ends too.
            self.finish_response(counters, out);
            self.response = ReaderState::Opaque;
            self.request = ReaderState::Opaque;
            return;
        }
        let body = if request_is_head || status == 204 || status == 304 {
            None
        } else {
            head.framing.body(Some(Body::UntilClose))
        };
        match body {
            // A head-only response ends with the write that finished its head.
            None => self.finish_response(counters, out),
            Some(body) => self.response = ReaderState::Body(body),
        }
    }

    fn finish_response(&mut self, counters: &HttpCounters, out: &mut Vec<Exchange>) {
        self.response = ReaderState::fresh_head();
        let Some(response) = self.in_flight.take() else {
            return;
        };
        let Some(request) = self.pending.pop_front() else {
            counters.unpaired_responses.inc();
            return;
        };
        out.push(Exchange {
            method: request.method,
            target: request.target,
            status: response.status,
            started_ns: request.started_ns,
            finished_ns: response.last_write_ns,
            request_bytes: request.bytes,
            response_bytes: response.bytes,
        });
    }

    /// Events were lost in between: whatever was in progress cannot be trusted.
    pub fn on_gap(&mut self, counters: &HttpCounters) {
        counters
            .abandoned_requests
            .inc_by(self.pending.len() as u64);
        self.pending.clear();
        self.in_flight = None;
        if !matches!(self.request, ReaderState::Opaque) {
            self.request = ReaderState::Desync;
            self.response = ReaderState::Desync;
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
