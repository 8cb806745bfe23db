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

/// One request and the final response to it: what every later stage needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub method: String,
    /// The request target as sent, query string included (the routes stage
    /// removes it).
    pub target: String,
    pub status: u16,
    /// When the server read the first byte of the request.
    pub started_ns: u64,
    /// When the server wrote the last byte of the response.
    pub finished_ns: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Exchange {
    pub fn duration_seconds(&self) -> f64 {
        self.finished_ns.saturating_sub(self.started_ns) as f64 / 1e9
    }
}

/// Things worth counting that are not exchanges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// Bytes that did not parse as HTTP/1.x where a message had to start.
    pub unparsed_bytes: u64,
    /// Heads or chunk lines that fell outside the copied prefix.
    pub truncated_captures: u64,
    /// Responses with no request waiting for them.
    pub unpaired_responses: u64,
    /// Requests dropped without a response (gap, reset, close, overflow).
    pub abandoned_requests: u64,
}

impl HttpStats {
    pub fn add(&mut self, other: &HttpStats) {
        self.unparsed_bytes += other.unparsed_bytes;
        self.truncated_captures += other.truncated_captures;
        self.unpaired_responses += other.unpaired_responses;
        self.abandoned_requests += other.abandoned_requests;
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
    pub stats: HttpStats,
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

fn looks_like_response_start(bytes: &[u8]) -> bool {
    bytes.starts_with(b"HTTP/1.")
}

impl HttpConnection {
    pub fn new() -> Self {
        HttpConnection {
            request: ReaderState::fresh_head(),
            response: ReaderState::fresh_head(),
            pending: VecDeque::new(),
            in_flight: None,
            seen_request: false,
            stats: HttpStats::default(),
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
    pub fn on_read(&mut self, segment: Segment<'_>) {
        let mut pos: u64 = 0;
        let total = segment.byte_count;
        while pos < total {
            let captured = segment.captured.get(pos as usize..).unwrap_or(&[]);
            let remaining = total - pos;
            match &mut self.request {
                ReaderState::Opaque => return,
                ReaderState::Desync => {
                    if pos == 0 && looks_like_request_start(captured) {
                        self.request = ReaderState::fresh_head();
                        continue;
                    }
                    return;
                }
                ReaderState::Body(body) => match body.advance(remaining, captured) {
                    BodyStep::Continues(used) => {
                        self.add_request_bytes(used);
                        return;
                    }
                    BodyStep::Ended(used) => {
                        pos += used;
                        self.add_request_bytes(used);
                        self.request = ReaderState::fresh_head();
                    }
                    BodyStep::Lost => {
                        self.stats.truncated_captures += 1;
                        self.request = ReaderState::Desync;
                        return;
                    }
                },
                ReaderState::Head { buffer, started_ns } => {
                    if buffer.is_empty() {
                        *started_ns = segment.timestamp_ns;
                    }
                    let started = *started_ns;
                    let held = buffer.len() as u64;
                    match parse_head_across(buffer, captured, parse_request_head) {
                        HeadParse::Complete { head, consumed } => {
                            pos += consumed as u64;
                            self.seen_request = true;
                            self.push_request(PendingRequest {
                                method: head.method,
                                target: head.target,
                                started_ns: started,
                                bytes: held + consumed as u64,
                            });
                            self.request = match head.body {
                                None => ReaderState::fresh_head(),
                                Some(body) => ReaderState::Body(body),
                            };
                        }
                        HeadParse::Partial => {
                            if (captured.len() as u64) < remaining {
                                // Part of the head was not copied.
                                self.stats.truncated_captures += 1;
                                self.request = ReaderState::Desync;
                            }
                            return;
                        }
                        HeadParse::Invalid => {
                            self.stats.unparsed_bytes += held + remaining;
                            self.request = if self.seen_request {
                                ReaderState::Desync
                            } else {
                                self.response = ReaderState::Opaque;
                                ReaderState::Opaque
                            };
                            return;
                        }
                    }
                }
            }
        }
    }

    fn push_request(&mut self, request: PendingRequest) {
        if self.pending.len() >= MAX_PENDING_REQUESTS {
            self.pending.pop_front();
            self.stats.abandoned_requests += 1;
        }
        self.pending.push_back(request);
    }

    fn add_request_bytes(&mut self, bytes: u64) {
        if let Some(last) = self.pending.back_mut() {
            last.bytes += bytes;
        }
    }

    /// Bytes the server wrote; completed exchanges are appended to `out`.
    pub fn on_write(&mut self, segment: Segment<'_>, out: &mut Vec<Exchange>) {
        let mut pos: u64 = 0;
        let total = segment.byte_count;
        while pos < total {
            let captured = segment.captured.get(pos as usize..).unwrap_or(&[]);
            let remaining = total - pos;
            match &mut self.response {
                ReaderState::Opaque => return,
                ReaderState::Desync => {
                    if pos == 0 && looks_like_response_start(captured) {
                        self.response = ReaderState::fresh_head();
                        continue;
                    }
                    self.extend_in_flight(remaining, segment.timestamp_ns);
                    return;
                }
                ReaderState::Body(body) => match body.advance(remaining, captured) {
                    BodyStep::Continues(used) => {
                        self.extend_in_flight(used, segment.timestamp_ns);
                        return;
                    }
                    BodyStep::Ended(used) => {
                        pos += used;
                        self.extend_in_flight(used, segment.timestamp_ns);
                        self.finish_response(out);
                    }
                    BodyStep::Lost => {
                        // The response still ends at the last byte written
                        // before the next response head or the close.
                        self.stats.truncated_captures += 1;
                        self.extend_in_flight(remaining, segment.timestamp_ns);
                        self.response = ReaderState::Desync;
                        return;
                    }
                },
                ReaderState::Head { buffer, .. } => {
                    if buffer.is_empty() && pos == 0 && self.in_flight.is_some() {
                        // A response whose end was lost is followed by a new
                        // head: the old one ended with the previous write.
                        self.finish_response(out);
                        continue;
                    }
                    let held = buffer.len() as u64;
                    match parse_head_across(buffer, captured, parse_response_head) {
                        HeadParse::Complete { head, consumed } => {
                            pos += consumed as u64;
                            self.start_response(head, held + consumed as u64, segment, out);
                        }
                        HeadParse::Partial => {
                            if (captured.len() as u64) < remaining {
                                self.stats.truncated_captures += 1;
                                self.response = ReaderState::Desync;
                            }
                            return;
                        }
                        HeadParse::Invalid => {
                            self.stats.unparsed_bytes += held + remaining;
                            self.response = ReaderState::Desync;
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
        segment: Segment<'_>,
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
            last_write_ns: segment.timestamp_ns,
        });
        if status == 101 {
            // Upgraded (e.g. WebSocket): the exchange ends here, HTTP ends too.
            self.finish_response(out);
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
            None => self.finish_response(out),
            Some(body) => self.response = ReaderState::Body(body),
        }
    }

    fn extend_in_flight(&mut self, bytes: u64, timestamp_ns: u64) {
        if let Some(response) = &mut self.in_flight {
            response.bytes += bytes;
            response.last_write_ns = timestamp_ns;
        }
    }

    fn finish_response(&mut self, out: &mut Vec<Exchange>) {
        self.response = ReaderState::fresh_head();
        let Some(response) = self.in_flight.take() else {
            return;
        };
        let Some(request) = self.pending.pop_front() else {
            self.stats.unpaired_responses += 1;
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
    pub fn on_gap(&mut self) {
        self.stats.abandoned_requests += self.pending.len() as u64;
        self.pending.clear();
        self.in_flight = None;
        if !matches!(self.request, ReaderState::Opaque) {
            self.request = ReaderState::Desync;
            self.response = ReaderState::Desync;
        }
    }

    /// The server closed the connection: a response delimited by the close,
    /// or whose framing was lost, ends with its last write.
    pub fn on_close(&mut self, out: &mut Vec<Exchange>) {
        let ends_at_close = matches!(
            self.response,
            ReaderState::Body(Body::UntilClose) | ReaderState::Desync
        );
        if ends_at_close && self.in_flight.is_some() {
            self.finish_response(out);
        }
        self.stats.abandoned_requests += self.pending.len() as u64;
        self.pending.clear();
    }

    /// Ends a response whose framing was lost once nothing was written for
    /// `idle_ns`, so a kept-alive idle connection does not hold it forever.
    pub fn expire_unframed(&mut self, now_ns: u64, idle_ns: u64, out: &mut Vec<Exchange>) {
        let unframed = matches!(self.response, ReaderState::Desync);
        let idle = self
            .in_flight
            .as_ref()
            .is_some_and(|response| now_ns.saturating_sub(response.last_write_ns) >= idle_ns);
        if unframed && idle {
            self.finish_response(out);
            self.response = ReaderState::Desync;
        }
    }
}

#[cfg(test)]
mod tests;
