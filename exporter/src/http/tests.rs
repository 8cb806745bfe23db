use super::pending::MAX_PENDING_REQUESTS;
use super::*;
use proptest::prelude::*;

/// One exchange as a test writes it on the wire.
#[derive(Clone, Debug)]
struct WireExchange {
    method: &'static str,
    target: String,
    request: Vec<u8>,
    status: u16,
    response: Vec<u8>,
}

fn chunked_body(body_len: usize, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = body_len;
    while left > 0 {
        let n = left.min(chunk.max(1));
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend(std::iter::repeat_n(b'x', n));
        out.extend_from_slice(b"\r\n");
        left -= n;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// What one generated exchange looks like before it is written out.
struct WireSpec {
    method: &'static str,
    target: String,
    request_body: usize,
    request_chunked: bool,
    expect_continue: bool,
    status: u16,
    response_body: usize,
    response_chunked: bool,
}

fn wire_exchange(spec: WireSpec) -> WireExchange {
    let WireSpec {
        method,
        target,
        request_body,
        request_chunked,
        expect_continue,
        status,
        response_body,
        response_chunked,
    } = spec;
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: test\r\nUser-Agent: t\r\n");
    let mut request_body_bytes = Vec::new();
    if request_body > 0 {
        if request_chunked {
            request.push_str("Transfer-Encoding: chunked\r\n");
            request_body_bytes = chunked_body(request_body, 7);
        } else {
            request.push_str(&format!("Content-Length: {request_body}\r\n"));
            request_body_bytes = vec![b'b'; request_body];
        }
        if expect_continue {
            request.push_str("Expect: 100-continue\r\n");
        }
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend(request_body_bytes);

    let mut response = Vec::new();
    if expect_continue && request_body > 0 {
        response.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let no_body = method == "HEAD" || status == 204 || status == 304;
    let mut head = format!("HTTP/1.1 {status} Whatever\r\nServer: test\r\n");
    if response_chunked && !no_body {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        response.extend_from_slice(head.as_bytes());
        response.extend(chunked_body(response_body, 5));
    } else {
        if status != 204 && status != 304 {
            head.push_str(&format!("Content-Length: {response_body}\r\n"));
        }
        head.push_str("\r\n");
        response.extend_from_slice(head.as_bytes());
        if !no_body {
            response.extend(std::iter::repeat_n(b'r', response_body));
        }
    }
    WireExchange {
        method,
        target,
        request,
        status,
        response,
    }
}

fn arb_exchange() -> impl Strategy<Value = WireExchange> {
    (
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
        ]),
        "/[a-z0-9]{0,8}(/[a-z0-9]{1,6}){0,2}(\\?[a-z]=[0-9]{1,3})?",
        0usize..3000,
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![200u16, 201, 204, 301, 304, 404, 500]),
        0usize..5000,
        any::<bool>(),
    )
        .prop_map(
            |(method, target, body, req_chunked, expect, status, resp_body, resp_chunked)| {
                let body = if matches!(method, "POST" | "PUT" | "PATCH") {
                    body
                } else {
                    0
                };
                wire_exchange(WireSpec {
                    method,
                    target,
                    request_body: body,
                    request_chunked: req_chunked,
                    expect_continue: expect,
                    status,
                    response_body: resp_body,
                    response_chunked: resp_chunked,
                })
            },
        )
}

/// Splits `len` bytes into segments at the given relative cut points.
fn cut(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    points.push(0);
    points.push(len);
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| (w[0], w[1])).collect()
}

/// Feeds reads and writes in a given interleaving; every segment is fully
/// copied. Returns the exchanges and the timestamp each was expected to have.
struct Harness {
    connection: HttpConnection,
    counters: HttpCounters,
    out: Vec<Exchange>,
    clock: u64,
}

fn counters() -> HttpCounters {
    HttpCounters::register(&prometheus::Registry::new()).expect("counters")
}

/// Every counter's value, in declaration order.
fn counts(counters: &HttpCounters) -> [u64; 4] {
    [
        counters.unparsed_bytes.get(),
        counters.truncated_captures.get(),
        counters.unpaired_responses.get(),
        counters.abandoned_requests.get(),
    ]
}

impl Harness {
    fn new() -> Self {
        Harness {
            connection: HttpConnection::new(),
            counters: counters(),
            out: Vec::new(),
            clock: 0,
        }
    }
    fn read(&mut self, bytes: &[u8]) -> u64 {
        self.clock += 1;
        let segment = Segment {
            timestamp_ns: self.clock,
            byte_count: bytes.len() as u64,
            captured: bytes,
        };
        self.connection.on_read(segment, &self.counters);
        self.clock
    }
    fn write(&mut self, bytes: &[u8]) -> u64 {
        self.write_partly(bytes.len() as u64, bytes)
    }
    /// A write of `byte_count` bytes of which only `captured` were copied.
    fn write_partly(&mut self, byte_count: u64, captured: &[u8]) -> u64 {
        self.clock += 1;
        let segment = Segment {
            timestamp_ns: self.clock,
            byte_count,
            captured,
        };
        self.connection
            .on_write(segment, &self.counters, &mut self.out);
        self.clock
    }
}

/// Index of the segment holding byte `offset`.
fn segment_of(segments: &[(usize, usize)], offset: usize) -> usize {
    segments
        .iter()
        .position(|&(start, end)| offset >= start && offset < end)
        .unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Keep-alive, one request at a time, every message split at arbitrary
    /// points: each exchange comes out once, in order, with exact byte
    /// counts and the timestamps of its first read and last write.
    #[test]
    fn sequential_exchanges_survive_any_split(
        exchanges in prop::collection::vec(arb_exchange(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut harness = Harness::new();
        let mut expected = Vec::new();
        for exchange in &exchanges {
            let mut started = None;
            for (start, end) in cut(exchange.request.len(), &cuts) {
                let ts = harness.read(&exchange.request[start..end]);
                started.get_or_insert(ts);
            }
            let mut finished = 0;
            for (start, end) in cut(exchange.response.len(), &cuts) {
                finished = harness.write(&exchange.response[start..end]);
            }
            expected.push((exchange.method.to_owned(), exchange.target.clone(), exchange.status,
                started.unwrap_or(0), finished, exchange.request.len() as u64));
        }
        let got: Vec<_> = harness.out.iter().map(|e| (e.method.to_string(), e.target.clone(), e.status,
            e.started_ns, e.finished_ns, e.request_bytes)).collect();
        prop_assert_eq!(got, expected);
        let final_responses: Vec<u64> = exchanges.iter().map(|e| {
            // Interim 100 Continue heads are not part of the final response's bytes.
            let interim = if e.response.starts_with(b"HTTP/1.1 100") { 25 } else { 0 };
            (e.response.len() - interim) as u64
        }).collect();
        let got_bytes: Vec<u64> = harness.out.iter().map(|e| e.response_bytes).collect();
        prop_assert_eq!(got_bytes, final_responses);
        prop_assert_eq!(counts(&harness.counters), [0; 4]);
    }

    /// Pipelined: all requests arrive in arbitrary reads before any response
    /// is written; responses are then written in arbitrary writes.
    #[test]
    fn pipelined_exchanges_pair_in_order(
        exchanges in prop::collection::vec(arb_exchange(), 1..8),
        read_cuts in prop::collection::vec(any::<usize>(), 0..10),
        write_cuts in prop::collection::vec(any::<usize>(), 0..10),
    ) {
        let requests: Vec<u8> = exchanges.iter().flat_map(|e| e.request.clone()).collect();
        let responses: Vec<u8> = exchanges.iter().flat_map(|e| e.response.clone()).collect();
        let read_segments = cut(requests.len(), &read_cuts);
        let write_segments = cut(responses.len(), &write_cuts);
        let mut harness = Harness::new();
        for &(start, end) in &read_segments {
            harness.read(&requests[start..end]);
        }
        let reads = read_segments.len() as u64;
        for &(start, end) in &write_segments {
            harness.write(&responses[start..end]);
        }
        let mut request_offset = 0;
        let mut response_offset = 0;
        let mut expected = Vec::new();
        for exchange in &exchanges {
            let started = segment_of(&read_segments, request_offset) as u64 + 1;
            response_offset += exchange.response.len();
            let finished = reads + segment_of(&write_segments, response_offset - 1) as u64 + 1;
            request_offset += exchange.request.len();
            expected.push((exchange.method, exchange.target.clone(), exchange.status, started, finished));
        }
        let got: Vec<_> = harness.out.iter()
            .map(|e| (e.method.as_str(), e.target.clone(), e.status, e.started_ns, e.finished_ns))
            .collect();
        let expected: Vec<_> = expected.iter().map(|(m, t, s, a, b)| (*m, t.clone(), *s, *a, *b)).collect();
        prop_assert_eq!(got, expected);
    }

    /// Arbitrary bytes with arbitrary copied prefixes never panic, never
    /// leave more than the bounded number of requests waiting.
    #[test]
    fn arbitrary_bytes_never_panic(
        segments in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..300), 0u64..400), 0..40),
    ) {
        let mut connection = HttpConnection::new();
        let counters = counters();
        let mut out = Vec::new();
        for (is_read, bytes, extra) in &segments {
            let segment = Segment { timestamp_ns: 1, byte_count: bytes.len() as u64 + extra, captured: bytes };
            if *is_read { connection.on_read(segment, &counters) } else { connection.on_write(segment, &counters, &mut out) }
        }
        connection.on_close(&counters, &mut out);
        prop_assert!(connection.pending_requests() <= MAX_PENDING_REQUESTS);
    }
}

#[test]
fn non_http_first_bytes_make_the_connection_opaque_and_are_counted() {
    let mut harness = Harness::new();
    let tls_hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    harness.read(&tls_hello);
    harness.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    assert!(harness.connection.is_opaque());
    assert!(harness.out.is_empty());
    assert_eq!(
        harness.counters.unparsed_bytes.get(),
        tls_hello.len() as u64
    );
}

#[test]
fn malformed_request_after_good_one_loses_nothing_that_was_good() {
    let mut harness = Harness::new();
    harness.read(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
    harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    harness.read(b"GET /bad HTTP/1.1\r\nBad Header Line\r\n\r\n");
    harness.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(harness.out.len(), 1);
    assert_eq!(harness.out[0].target, "/ok");
    assert!(harness.counters.unparsed_bytes.get() > 0);
    // Resynchronises at the next request that starts a read.
    harness.read(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n");
    harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        harness.out.last().map(|e| e.target.as_str()),
        Some("/again")
    );
}

#[test]
fn close_delimited_response_ends_at_its_last_write() {
    let mut harness = Harness::new();
    harness.read(b"GET /stream HTTP/1.0\r\n\r\n");
    let head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n";
    harness.write(head);
    let last = harness.write(&[b'z'; 1000]);
    assert!(harness.out.is_empty());
    harness
        .connection
        .on_close(&harness.counters, &mut harness.out);
    assert_eq!(harness.out.len(), 1);
    assert_eq!(harness.out[0].finished_ns, last);
    assert_eq!(harness.out[0].response_bytes, head.len() as u64 + 1000);
}

#[test]
fn uncopied_body_bytes_are_skipped_by_count() {
    // A 1 MiB body written in 64 KiB writes of which only 4 KiB are copied.
    let mut harness = Harness::new();
    harness.read(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n");
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n";
    harness.write(head);
    let body = vec![b'x'; 4096];
    let mut last = 0;
    for _ in 0..16 {
        assert!(harness.out.is_empty());
        last = harness.write_partly(65536, &body);
    }
    assert_eq!(harness.out.len(), 1);
    assert_eq!(harness.out[0].finished_ns, last);
    assert_eq!(harness.out[0].response_bytes, head.len() as u64 + 1_048_576);
}

#[test]
fn lost_chunk_framing_ends_the_response_at_the_next_head() {
    let mut harness = Harness::new();
    harness.read(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n");
    harness.read(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n");
    harness.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    // A chunk whose size line was not copied.
    let chunk = harness.write_partly(9000, &[]);
    let second = harness.write(b"HTTP/1.1 404 NOT FOUND\r\nContent-Length: 0\r\n\r\n");
    let got: Vec<_> = harness
        .out
        .iter()
        .map(|e| (e.target.as_str(), e.status, e.finished_ns))
        .collect();
    assert_eq!(got, vec![("/a", 200, chunk), ("/b", 404, second)]);
    assert_eq!(harness.counters.truncated_captures.get(), 1);
}

#[test]
fn gap_abandons_in_flight_requests_and_resynchronises() {
    let mut harness = Harness::new();
    harness.read(b"GET /lost HTTP/1.1\r\nHost: a\r\n\r\n");
    harness.connection.on_gap(&harness.counters);
    harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    harness.read(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    harness.write(b"HTTP/1.1 201 CREATED\r\nContent-Length: 0\r\n\r\n");
    let got: Vec<_> = harness
        .out
        .iter()
        .map(|e| (e.target.as_str(), e.status))
        .collect();
    assert_eq!(got, vec![("/next", 201)]);
    assert_eq!(harness.counters.abandoned_requests.get(), 1);
}

#[test]
fn two_interim_continues_then_final_response() {
    let mut harness = Harness::new();
    let head = b"POST /upload HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n";
    harness.read(head);
    harness.write(b"HTTP/1.1 100 Continue\r\n\r\n");
    harness.write(b"HTTP/1.1 100 Continue\r\n\r\n");
    harness.read(b"abc");
    harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let got: Vec<_> = harness
        .out
        .iter()
        .map(|e| (e.target.as_str(), e.status, e.request_bytes))
        .collect();
    assert_eq!(got, vec![("/upload", 200, head.len() as u64 + 3)]);
}

/// (method, target, status) of each exchange so far.
fn exchanges(harness: &Harness) -> Vec<(String, String, u16)> {
    harness
        .out
        .iter()
        .map(|e| (e.method.to_string(), e.target.clone(), e.status))
        .collect()
}

fn triple(method: &str, target: &str, status: u16) -> (String, String, u16) {
    (method.to_owned(), target.to_owned(), status)
}

#[test]
fn a_response_head_bigger_than_the_capture_keeps_its_status_and_the_pairing() {
    let mut harness = Harness::new();
    harness.read(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
    let head = format!(
        "HTTP/1.1 201 CREATED\r\nSet-Cookie: {}\r\nContent-Length: 2\r\n\r\nok",
        "c".repeat(5000)
    );
    // One write, of which the first 4 KiB were copied.
    let cut = harness.write_partly(head.len() as u64, &head.as_bytes()[..4096]);
    harness.read(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n");
    harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        exchanges(&harness),
        [triple("GET", "/a", 201), triple("GET", "/b", 200)]
    );
    assert_eq!(harness.out[0].finished_ns, cut);
    assert_eq!(harness.out[0].response_bytes, head.len() as u64);
    assert_eq!(harness.counters.truncated_captures.get(), 1);
}

#[test]
fn an_unreadable_response_head_costs_exactly_one_exchange() {
    let mut harness = Harness::new();
    harness.read(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
    harness.write(b"HTTP/1.1 2OO NOT A STATUS\r\n\r\n");
    harness.read(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n");
    harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(exchanges(&harness), [triple("GET", "/b", 200)]);
    assert_eq!(harness.counters.abandoned_requests.get(), 1);
    assert_eq!(harness.counters.unpaired_responses.get(), 0);
}

#[test]
fn requests_a_server_must_refuse_end_the_following_and_invent_nothing() {
    for smuggling in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 30\r\n",
        "Content-Length: +30\r\n",
        "Transfer-Encoding: gzip\r\n",
    ] {
        let mut harness = Harness::new();
        harness.read(b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n");
        harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let request = format!(
            "POST /x HTTP/1.1\r\nHost: h\r\n{smuggling}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
        );
        harness.read(request.as_bytes());
        harness
            .write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        harness.read(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(
            exchanges(&harness),
            [triple("GET", "/ok", 200)],
            "{smuggling:?}"
        );
        assert_eq!(harness.counters.ambiguous_requests.get(), 1);
        assert_eq!(harness.counters.unpaired_responses.get(), 0);
    }
}

#[test]
fn body_bytes_that_look_like_a_request_never_resynchronise() {
    let mut harness = Harness::new();
    // A head larger than the capture: its request line survives, where
    // its body ends does not.
    let head = format!(
        "POST /upload HTTP/1.1\r\nCookie: {}\r\nContent-Length: 31\r\n\r\n",
        "k".repeat(5000)
    );
    harness.connection.on_read(
        Segment {
            timestamp_ns: 1,
            byte_count: head.len() as u64,
            captured: &head.as_bytes()[..4096],
        },
        &harness.counters,
    );
    // The body, chosen by the client, in a read of its own.
    harness.read(b"GET /phantom HTTP/1.1\r\nH: h\r\n\r\n");
    harness.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    harness.read(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
    harness.write(b"HTTP/1.1 204 NO CONTENT\r\n\r\n");
    assert_eq!(
        exchanges(&harness),
        [triple("POST", "/upload", 200), triple("GET", "/next", 204)]
    );
    assert_eq!(harness.counters.truncated_captures.get(), 1);
}

#[test]
fn a_response_whose_client_went_away_counts_with_the_status_written() {
    let mut harness = Harness::new();
    let failed = |harness: &mut Harness, bytes: &[u8]| {
        harness.clock += 1;
        let segment = Segment {
            timestamp_ns: harness.clock,
            byte_count: 0,
            captured: bytes,
        };
        harness
            .connection
            .on_write_failed(segment, &harness.counters, &mut harness.out);
        harness.clock
    };
    // The whole response failed to go.
    harness.read(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n");
    let gone = failed(
        &mut harness,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    );
    // The head went, the body did not.
    harness.read(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n");
    harness.write(b"HTTP/1.1 503 SERVICE UNAVAILABLE\r\nContent-Length: 100\r\n\r\n");
    failed(&mut harness, &[b'x'; 100]);
    assert_eq!(
        exchanges(&harness),
        [triple("GET", "/slow", 200), triple("GET", "/big", 503)]
    );
    assert_eq!(harness.out[0].finished_ns, gone);
    assert_eq!(harness.counters.client_gone.get(), 2);
    // Bytes that are no response make nothing.
    harness.read(b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n");
    failed(&mut harness, b"garbage");
    assert_eq!(harness.out.len(), 2);
}
