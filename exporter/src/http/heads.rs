//! Request and response heads, parsed with httparse, and what their headers
//! say about the body, as RFC 9112 §6.3 and gunicorn read them.

use smallvec::SmallVec;

use super::body::{Body, Chunked};

/// Longest request or response head accepted; longer is treated as garbage.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines parsed in one head.
const MAX_HEADERS: usize = 128;

pub(super) enum HeadParse<T> {
    Complete { head: T, consumed: usize },
    Partial,
    Invalid,
}

pub(super) struct RequestHead {
    pub method: http::Method,
    pub target: String,
    pub version: http::Version,
    pub framing: Framing,
}

pub(super) struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
}

/// What a message's headers say about its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// Neither Content-Length nor Transfer-Encoding.
    Unstated,
    Length(u64),
    Chunked,
    /// A response whose Transfer-Encoding does not end in chunked: it ends
    /// when the connection closes.
    UntilClose,
    /// Framing a server must refuse (a request: Content-Length twice, or
    /// not digits, or beside Transfer-Encoding; Transfer-Encoding not ending
    /// in chunked, chunked twice, or on HTTP/1.0), or that leaves a
    /// response's end unknown (Content-Lengths that disagree or do not
    /// parse).
    Ambiguous,
}

impl Framing {
    /// The body a request has; `None` for none.
    pub(super) fn request_body(self) -> Option<Body> {
        match self {
            Framing::Length(0) | Framing::Unstated => None,
            Framing::Length(length) => Some(Body::Length(length)),
            Framing::Chunked => Some(Body::Chunked(Chunked::new())),
            // Refused before a body is read (see `request_framing`).
            Framing::UntilClose | Framing::Ambiguous => None,
        }
    }

    /// The body a response has when it has one (not HEAD, 204 or 304);
    /// `None` for none, and for an end that cannot be known.
    pub(super) fn response_body(self) -> Option<Body> {
        match self {
            Framing::Length(0) => None,
            Framing::Length(length) => Some(Body::Length(length)),
            Framing::Chunked => Some(Body::Chunked(Chunked::new())),
            Framing::Unstated | Framing::UntilClose => Some(Body::UntilClose),
            Framing::Ambiguous => None,
        }
    }
}

/// Content-Length values and transfer codings, as sent (inline: a head
/// has one or two of them, and parsing one allocates nothing).
struct FramingHeaders<'a> {
    lengths: SmallVec<[&'a [u8]; 2]>,
    /// The codings of every Transfer-Encoding header, in order, without
    /// the whitespace around them (compared ignoring case).
    codings: Option<SmallVec<[&'a [u8]; 2]>>,
}

impl<'a> FramingHeaders<'a> {
    fn read(headers: &[httparse::Header<'a>]) -> Self {
        let mut lengths = SmallVec::new();
        let mut codings: Option<SmallVec<[&'a [u8]; 2]>> = None;
        for header in headers {
            if header.name.eq_ignore_ascii_case("content-length") {
                lengths.push(header.value);
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                let list = codings.get_or_insert_with(SmallVec::new);
                list.extend(header.value.split(|&b| b == b',').map(<[u8]>::trim_ascii));
            }
        }
        FramingHeaders { lengths, codings }
    }

    /// Whether the codings end in exactly one chunked.
    fn chunked_last(codings: &[&[u8]]) -> bool {
        let chunked = |coding: &[u8]| coding.eq_ignore_ascii_case(b"chunked");
        codings.last().is_some_and(|last| chunked(last))
            && codings.iter().filter(|coding| chunked(coding)).count() == 1
    }
}

/// `1*DIGIT`, optional whitespace around it.
fn length_value(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A request's framing, as a strict server (gunicorn) judges it: anything
/// it would refuse with 400 or 501 is [`Framing::Ambiguous`].
fn request_framing(headers: &[httparse::Header<'_>], http_1_0: bool) -> Framing {
    let framing = FramingHeaders::read(headers);
    if let Some(codings) = &framing.codings {
        let known = codings.iter().all(|coding| {
            [
                &b"chunked"[..],
                b"gzip",
                b"deflate",
                b"compress",
                b"identity",
            ]
            .iter()
            .any(|name| coding.eq_ignore_ascii_case(name))
        });
        // Chunked once and last (so nothing after it), nothing unknown, no
        // Content-Length beside it, not on HTTP/1.0.
        let chunked = FramingHeaders::chunked_last(codings);
        if !known || !chunked || http_1_0 || !framing.lengths.is_empty() {
            return Framing::Ambiguous;
        }
        return Framing::Chunked;
    }
    match framing.lengths[..] {
        [] => Framing::Unstated,
        [value] => length_value(value).map_or(Framing::Ambiguous, Framing::Length),
        _ => Framing::Ambiguous,
    }
}

/// A response's framing: Transfer-Encoding wins over Content-Length; equal
/// Content-Lengths (repeated, or as a list) count once.
fn response_framing(headers: &[httparse::Header<'_>]) -> Framing {
    let framing = FramingHeaders::read(headers);
    if let Some(codings) = &framing.codings {
        return if FramingHeaders::chunked_last(codings) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
    }
    let mut lengths = framing
        .lengths
        .iter()
        .flat_map(|value| value.split(|&b| b == b','))
        .map(length_value);
    let Some(first) = lengths.next() else {
        return Framing::Unstated;
    };
    match first {
        Some(length) if lengths.all(|other| other == Some(length)) => Framing::Length(length),
        _ => Framing::Ambiguous,
    }
}

pub(super) fn parse_request_head(bytes: &[u8]) -> HeadParse<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(consumed)) => {
            let (Some(method), Some(target)) = (request.method, request.path) else {
                return HeadParse::Invalid;
            };
            // A token httparse accepted; standard methods and short
            // extensions are held without allocating.
            let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
                return HeadParse::Invalid;
            };
            let framing = request_framing(request.headers, request.version == Some(0));
            HeadParse::Complete {
                head: RequestHead {
                    method,
                    target: crate::exchange::targets::take(target),
                    version: if request.version == Some(0) {
                        http::Version::HTTP_10
                    } else {
                        http::Version::HTTP_11
                    },
                    framing,
                },
                consumed,
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD_BYTES => HeadParse::Partial,
        _ => HeadParse::Invalid,
    }
}

pub(super) fn parse_response_head(bytes: &[u8]) -> HeadParse<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(consumed)) => {
            let Some(status) = response.code else {
                return HeadParse::Invalid;
            };
            HeadParse::Complete {
                head: ResponseHead {
                    status,
                    framing: response_framing(response.headers),
                },
                consumed,
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD_BYTES => HeadParse::Partial,
        _ => HeadParse::Invalid,
    }
}

/// The first line of a head whose rest was not copied, parsed alone: a
/// request's method and target, or a response's status, survive a head
/// larger than the capture.
pub(super) fn start_line<T>(bytes: &[u8], parse: fn(&[u8]) -> HeadParse<T>) -> Option<T> {
    let end = bytes.windows(2).position(|pair| pair == b"\r\n")?;
    let mut line = bytes[..end].to_vec();
    line.extend_from_slice(b"\r\n\r\n");
    match parse(&line) {
        HeadParse::Complete { head, .. } => Some(head),
        HeadParse::Partial | HeadParse::Invalid => None,
    }
}

/// Feeds a head parser the part of the head held from earlier segments plus
/// the copied bytes of this one. Returns the parse and how many of this
/// segment's bytes belong to the head (when complete).
pub(super) fn parse_head_across<T>(
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
    // Parsed again only when the new bytes may end the head (or pass its
    // bound): a head sent a byte at a time costs its length once, not its
    // length squared. Bytes the parser would refuse are then found at the
    // head's end rather than at once; the bound holds either way.
    let seam = held.saturating_sub(2);
    if buffer.len() < MAX_HEAD_BYTES && !may_end_a_head(&buffer[seam..]) {
        return HeadParse::Partial;
    }
    match parse(buffer) {
        HeadParse::Complete { head, consumed } => HeadParse::Complete {
            head,
            consumed: consumed.saturating_sub(held),
        },
        other => other,
    }
}

/// Whether `bytes` hold the empty line that ends a head (`\n\n`, or
/// `\n\r\n`: httparse takes a bare LF as a line's end).
fn may_end_a_head(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .any(|pair| pair == b"\n\n" || pair == b"\n\r")
}

/// Whether copied bytes at a segment start look like a request line.
pub(super) fn looks_like_request_start(bytes: &[u8]) -> bool {
    let Some(space) = bytes.iter().take(16).position(|&b| b == b' ') else {
        return false;
    };
    space > 0
        && bytes[..space].iter().all(|b| b.is_ascii_uppercase())
        && bytes.len() > space + 1
        && bytes[space + 1] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> Framing {
        match parse_request_head(head.as_bytes()) {
            HeadParse::Complete { head, .. } => head.framing,
            _ => panic!("not a complete head: {head:?}"),
        }
    }

    fn response(head: &str) -> Framing {
        match parse_response_head(head.as_bytes()) {
            HeadParse::Complete { head, .. } => head.framing,
            _ => panic!("not a complete head: {head:?}"),
        }
    }

    #[test]
    fn request_framing_as_a_strict_server_reads_it() {
        let get = |headers: &str| request(&format!("POST / HTTP/1.1\r\nHost: a\r\n{headers}\r\n"));
        assert_eq!(get(""), Framing::Unstated);
        assert_eq!(get("Content-Length: 5\r\n"), Framing::Length(5));
        assert_eq!(get("Content-Length:  5 \r\n"), Framing::Length(5));
        assert_eq!(get("Transfer-Encoding: chunked\r\n"), Framing::Chunked);
        assert_eq!(
            get("Transfer-Encoding: gzip, chunked\r\n"),
            Framing::Chunked
        );
        for refused in [
            "Content-Length: +5\r\n",
            "Content-Length: 5.0\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: \r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: xchunked\r\n",
        ] {
            assert_eq!(get(refused), Framing::Ambiguous, "{refused:?}");
        }
        assert_eq!(
            request("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Framing::Ambiguous
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let get = |headers: &str| response(&format!("HTTP/1.1 200 OK\r\n{headers}\r\n"));
        assert_eq!(get(""), Framing::Unstated);
        assert_eq!(
            get("Content-Length: 5\r\nContent-Length: 5\r\n"),
            Framing::Length(5)
        );
        assert_eq!(get("Content-Length: 5, 5\r\n"), Framing::Length(5));
        assert_eq!(
            get("Content-Length: 5\r\nContent-Length: 6\r\n"),
            Framing::Ambiguous
        );
        assert_eq!(get("Content-Length: +5\r\n"), Framing::Ambiguous);
        assert_eq!(
            get("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
            Framing::Chunked,
            "Transfer-Encoding wins"
        );
        assert_eq!(get("Transfer-Encoding: gzip\r\n"), Framing::UntilClose);
    }

    #[test]
    fn start_lines_survive_a_cut_head() {
        let cut = b"HTTP/1.1 201 CREATED\r\nSet-Cookie: aaaaaaaaaaaa";
        assert_eq!(
            start_line(cut, parse_response_head).map(|h| h.status),
            Some(201)
        );
        let cut = b"GET /items/7?q=1 HTTP/1.1\r\nCookie: aaaaaaaa";
        let head = start_line(cut, parse_request_head).expect("request line");
        assert_eq!(
            (head.method.as_str(), head.target.as_str()),
            ("GET", "/items/7?q=1")
        );
        assert!(start_line(b"GET /items/7?q=1 HTTP/1", parse_request_head).is_none());
    }

    /// A head of nearly 64 KiB sent a byte at a time is parsed at its end,
    /// not at every byte; its framing and where it ends are the same.
    #[test]
    fn a_head_sent_a_byte_at_a_time_is_parsed_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static PARSED_BYTES: AtomicUsize = AtomicUsize::new(0);
        fn counting(bytes: &[u8]) -> HeadParse<RequestHead> {
            PARSED_BYTES.fetch_add(bytes.len(), Ordering::Relaxed);
            parse_request_head(bytes)
        }
        let mut head = b"POST /items HTTP/1.1\r\nContent-Length: 5\r\n".to_vec();
        while head.len() < MAX_HEAD_BYTES - 700 {
            let line = format!("X-Filler: {}\r\n", "a".repeat(600));
            head.extend_from_slice(line.as_bytes());
        }
        head.extend_from_slice(b"\r\nhello");
        let mut buffer = Vec::new();
        let mut ended = None;
        for (at, byte) in head.iter().enumerate() {
            match parse_head_across(&mut buffer, std::slice::from_ref(byte), counting) {
                HeadParse::Partial => {}
                HeadParse::Complete { head, consumed } => {
                    ended = Some((at, consumed, head.framing));
                    break;
                }
                HeadParse::Invalid => panic!("invalid at {at}"),
            }
        }
        let body_at = head.len() - b"hello".len();
        assert_eq!(ended, Some((body_at - 1, 1, Framing::Length(5))));
        // Each line's end is a candidate; the head's length is parsed a few
        // times, never once per byte.
        let parsed = PARSED_BYTES.load(Ordering::Relaxed);
        assert!(
            parsed < 4 * head.len(),
            "{parsed} bytes parsed for a {}-byte head",
            head.len()
        );
    }
}
